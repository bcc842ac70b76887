//! The SQL server over the wire: tokio-postgres against `server::spawn`
//! over a `MemoryKv` on 127.0.0.1:0, with the simple and the extended
//! query protocol, both authentication modes, every error path's
//! SQLSTATE, and transaction semantics across connections.

use std::future::Future;
use std::ops::Bound;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use db_frontend::sql::kv::{Entries, KvError, KvStore, KvTxn, MemoryKv, MemoryTxn, TreeId};
use db_frontend::sql::pgbench::init_pgbench_sized;
use db_frontend::sql::server::{self, ServerConfig, ServerHandle};
use tokio::net::TcpListener;
use tokio_postgres::types::Type;
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

/// Every test finishes within this or fails.
const TEST_TIMEOUT: Duration = Duration::from_secs(30);

async fn bounded<F: Future<Output = ()>>(test: F) {
    tokio::time::timeout(TEST_TIMEOUT, test).await.expect("the test timed out");
}

async fn start<S: KvStore>(store: S, config: ServerConfig) -> ServerHandle {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    server::spawn(listener, store, config).unwrap()
}

async fn connect_as(server: &ServerHandle, user: &str, password: &str) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::Config::new()
        .host("127.0.0.1")
        .port(server.address.port())
        .user(user)
        .password(password)
        .dbname("postgres")
        .connect(NoTls)
        .await?;
    tokio::spawn(async move {
        let _ = connection.await; // ends when the client or the server goes
    });
    Ok(client)
}

async fn connect(server: &ServerHandle) -> Client {
    connect_as(server, "lab", "").await.unwrap()
}

fn code(error: &tokio_postgres::Error) -> String {
    error.code().map(|code| code.code().to_owned()).unwrap_or_else(|| format!("no SQLSTATE: {error}"))
}

async fn simple_code(client: &Client, sql: &str) -> String {
    code(&client.simple_query(sql).await.expect_err(sql))
}

/// The data rows of a simple query, as text.
async fn simple_rows(client: &Client, sql: &str) -> Vec<Vec<Option<String>>> {
    let messages = client.simple_query(sql).await.unwrap();
    messages
        .iter()
        .filter_map(|message| match message {
            SimpleQueryMessage::Row(row) => {
                Some((0..row.len()).map(|index| row.get(index).map(str::to_owned)).collect())
            }
            _ => None,
        })
        .collect()
}

/// The row counts of a simple query's command completions.
async fn completions(client: &Client, sql: &str) -> Vec<u64> {
    let messages = client.simple_query(sql).await.unwrap();
    messages
        .iter()
        .filter_map(|message| match message {
            SimpleQueryMessage::CommandComplete(count) => Some(*count),
            _ => None,
        })
        .collect()
}

fn text(values: &[&str]) -> Vec<Option<String>> {
    values.iter().map(|value| if *value == "NULL" { None } else { Some((*value).to_owned()) }).collect()
}

#[tokio::test]
async fn the_simple_protocol_runs_every_statement_type() {
    bounded(async {
        let server = start(MemoryKv::default(), ServerConfig::trust()).await;
        let client = connect(&server).await;
        client.simple_query("CREATE TABLE t (id INT PRIMARY KEY, name TEXT, n BIGINT, ok BOOL)").await.unwrap();
        client.simple_query("CREATE TABLE IF NOT EXISTS t (id INT)").await.unwrap();
        assert_eq!(
            completions(
                &client,
                "INSERT INTO t VALUES (1, 'one', 10, true), (2, 'two', NULL, false), (3, NULL, 30, NULL)"
            )
            .await,
            vec![3]
        );
        assert_eq!(completions(&client, "INSERT INTO t (name, id) VALUES ('four', 4)").await, vec![1]);
        assert_eq!(
            simple_rows(&client, "SELECT id, name, n * 2 AS twice, ok FROM t WHERE id >= 2 ORDER BY id DESC LIMIT 2")
                .await,
            vec![text(&["4", "four", "NULL", "NULL"]), text(&["3", "NULL", "60", "NULL"])]
        );
        assert_eq!(simple_rows(&client, "SELECT * FROM t WHERE id = 1").await, vec![text(&["1", "one", "10", "t"])]);
        assert_eq!(
            simple_rows(&client, "SELECT count(*), count(n), sum(n), min(name), max(id) FROM t").await,
            vec![text(&["4", "2", "40", "four", "4"])]
        );
        assert_eq!(simple_rows(&client, "SELECT 1, 'x', NULL IS NULL").await, vec![text(&["1", "x", "t"])]);
        assert_eq!(completions(&client, "UPDATE t SET n = n + 1 WHERE n IS NOT NULL").await, vec![2]);
        assert_eq!(simple_rows(&client, "SELECT n FROM t WHERE id = 3").await, vec![text(&["31"])]);
        assert_eq!(completions(&client, "DELETE FROM t WHERE id = 2 OR NOT ok").await, vec![1]);
        assert_eq!(
            simple_rows(&client, "SELECT id FROM t ORDER BY id OFFSET 1").await,
            vec![text(&["3"]), text(&["4"])]
        );
        // The harmless ones.
        client
            .simple_query("SET application_name = 'x'; VACUUM t; SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")
            .await
            .unwrap();
        assert_eq!(simple_rows(&client, "SHOW transaction_isolation").await, vec![text(&["serializable"])]);
        assert!(
            simple_rows(&client, "SELECT version()").await[0][0]
                .as_deref()
                .is_some_and(|v| v.starts_with("PostgreSQL"))
        );
        client.simple_query("TRUNCATE t").await.unwrap();
        assert_eq!(simple_rows(&client, "SELECT count(*) FROM t").await, vec![text(&["0"])]);
        client.simple_query("DROP TABLE t").await.unwrap();
        client.simple_query("DROP TABLE IF EXISTS t").await.unwrap();
        assert_eq!(simple_code(&client, "SELECT * FROM t").await, "42P01");
        drop(client);
        server.stop().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn every_error_has_its_sqlstate_and_the_session_goes_on() {
    bounded(async {
        let server = start(MemoryKv::default(), ServerConfig::trust()).await;
        let client = connect(&server).await;
        client.simple_query("CREATE TABLE t (id INT PRIMARY KEY, v INT NOT NULL, s TEXT)").await.unwrap();
        client.simple_query("CREATE TABLE k (name TEXT PRIMARY KEY)").await.unwrap();
        client.simple_query("INSERT INTO t VALUES (1, 1, 'a')").await.unwrap();
        let long = "x".repeat(300);
        let huge = "y".repeat(2_000);
        let cases = [
            ("SELEC 1", "42601"),
            ("SELECT id, count(*) FROM t GROUP BY id", "0A000"),
            ("CREATE INDEX i ON t (v)", "0A000"),
            ("SELECT * FROM nope", "42P01"),
            ("CREATE TABLE t (x INT)", "42P07"),
            ("SELECT nope FROM t", "42703"),
            ("INSERT INTO t VALUES (1, 2, 'b')", "23505"),
            ("INSERT INTO t VALUES (2, NULL, 'b')", "23502"),
            ("INSERT INTO t VALUES ('two', 2, 'b')", "22P02"),
            ("SELECT 2147483647 + 1", "22003"),
            ("INSERT INTO t VALUES (3000000000, 1, 'b')", "22003"),
            ("SELECT v / 0 FROM t", "22012"),
            ("UPDATE t SET v = 'a' || 'b'", "42804"),
            ("SELECT * FROM t WHERE v", "42804"),
            ("SELECT s + 1 FROM t", "42883"),
            (&format!("INSERT INTO k VALUES ('{long}')"), "54000"),
            (&format!("INSERT INTO t VALUES (5, 5, '{huge}')"), "54000"),
            ("SHOW nonsense", "42704"),
        ];
        for (sql, expected) in cases {
            assert_eq!(simple_code(&client, sql).await, expected, "{sql}");
            // The session is still usable after each error.
            assert_eq!(simple_rows(&client, "SELECT count(*) FROM t").await, vec![text(&["1"])]);
        }
        // A multi-statement string stops at its first error.
        assert_eq!(
            simple_code(&client, "INSERT INTO t VALUES (7, 7, 'c'); SELECT 1/0; INSERT INTO t VALUES (8, 8, 'd')")
                .await,
            "22012"
        );
        assert_eq!(simple_rows(&client, "SELECT id FROM t ORDER BY id").await, vec![text(&["1"]), text(&["7"])]);
        drop(client);
        server.stop().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn the_extended_protocol_binds_typed_parameters_and_describes_results() {
    bounded(async {
        let server = start(MemoryKv::default(), ServerConfig::trust()).await;
        let client = connect(&server).await;
        client
            .batch_execute("CREATE TABLE acc (aid INT PRIMARY KEY, bid BIGINT, abalance INT, note TEXT, ok BOOL)")
            .await
            .unwrap();
        let insert =
            client.prepare("INSERT INTO acc (aid, bid, abalance, note, ok) VALUES ($1, $2, $3, $4, $5)").await.unwrap();
        assert_eq!(insert.params(), &[Type::INT4, Type::INT8, Type::INT4, Type::TEXT, Type::BOOL]);
        for aid in 1..=5i32 {
            let note = format!("n{aid}");
            let inserted =
                client.execute(&insert, &[&aid, &i64::from(aid * 10), &0i32, &note, &(aid % 2 == 0)]).await.unwrap();
            assert_eq!(inserted, 1);
        }
        let null_note: Option<&str> = None;
        client.execute(&insert, &[&6i32, &60i64, &0i32, &null_note, &true]).await.unwrap();

        let update = "UPDATE acc SET abalance = abalance + $1 WHERE aid = $2";
        assert_eq!(client.execute(update, &[&-17i32, &3i32]).await.unwrap(), 1);
        let select = client.prepare("SELECT abalance, bid, note, ok FROM acc WHERE aid = $1").await.unwrap();
        assert_eq!(select.params(), &[Type::INT4]);
        let types: Vec<&Type> = select.columns().iter().map(|column| column.type_()).collect();
        assert_eq!(types, vec![&Type::INT4, &Type::INT8, &Type::TEXT, &Type::BOOL]);
        let row = client.query_one(&select, &[&3i32]).await.unwrap();
        assert_eq!(row.get::<_, i32>(0), -17);
        assert_eq!(row.get::<_, i64>(1), 30);
        assert_eq!(row.get::<_, &str>(2), "n3");
        assert!(!row.get::<_, bool>(3));
        let row = client.query_one(&select, &[&6i32]).await.unwrap();
        assert_eq!(row.get::<_, Option<&str>>(2), None);

        let range = client
            .query("SELECT aid FROM acc WHERE aid > $1 AND aid <= $2 ORDER BY aid DESC", &[&2i32, &4i32])
            .await
            .unwrap();
        assert_eq!(range.iter().map(|row| row.get::<_, i32>(0)).collect::<Vec<_>>(), vec![4, 3]);
        let count = client.query_one("SELECT count(*) FROM acc WHERE ok = $1", &[&true]).await.unwrap();
        assert_eq!(count.get::<_, i64>(0), 3);
        let limited = client.query("SELECT note FROM acc LIMIT $1", &[&2i64]).await.unwrap();
        assert_eq!(limited.len(), 2);
        // A client-declared type (INT8 for an INT key) is honoured.
        let typed = client.prepare_typed("SELECT aid FROM acc WHERE aid = $1", &[Type::INT8]).await.unwrap();
        assert_eq!(client.query_one(&typed, &[&5i64]).await.unwrap().get::<_, i32>(0), 5);
        assert_eq!(client.execute("DELETE FROM acc WHERE aid >= $1", &[&5i32]).await.unwrap(), 2);

        // Errors over the extended protocol carry SQLSTATEs too.
        assert_eq!(code(&client.prepare("SELEC 1").await.unwrap_err()), "42601");
        assert_eq!(code(&client.prepare("SELECT * FROM nope WHERE x = $1").await.unwrap_err()), "42P01");
        assert_eq!(code(&client.execute(&insert, &[&1i32, &1i64, &0i32, &"dup", &true]).await.unwrap_err()), "23505");
        assert_eq!(code(&client.query("SELECT abalance / $1 FROM acc", &[&0i32]).await.unwrap_err()), "22012");
        let overflow = client.query("SELECT aid + $1 FROM acc", &[&i32::MAX]).await.unwrap_err();
        assert_eq!(code(&overflow), "22003");
        assert_eq!(client.query_one("SELECT count(*) FROM acc", &[]).await.unwrap().get::<_, i64>(0), 4);
        drop(client);
        server.stop().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn transactions_roll_back_fail_and_commit_across_connections() {
    bounded(async {
        let server = start(MemoryKv::default(), ServerConfig::trust()).await;
        let first = connect(&server).await;
        first.batch_execute("CREATE TABLE t (id INT PRIMARY KEY)").await.unwrap();

        // ROLLBACK undoes.
        first.batch_execute("BEGIN; INSERT INTO t VALUES (1); INSERT INTO t VALUES (2)").await.unwrap();
        assert_eq!(simple_rows(&first, "SELECT count(*) FROM t").await, vec![text(&["2"])]);
        first.batch_execute("ROLLBACK").await.unwrap();
        assert_eq!(simple_rows(&first, "SELECT count(*) FROM t").await, vec![text(&["0"])]);

        // An error fails the block: 25P02 until its end; COMMIT rolls back.
        first.batch_execute("BEGIN").await.unwrap();
        first.batch_execute("INSERT INTO t VALUES (1)").await.unwrap();
        assert_eq!(simple_code(&first, "INSERT INTO t VALUES (1)").await, "23505");
        assert_eq!(simple_code(&first, "SELECT 1").await, "25P02");
        assert_eq!(code(&first.query("SELECT id FROM t WHERE id = $1", &[&1i32]).await.unwrap_err()), "25P02");
        let messages = first.simple_query("COMMIT").await.unwrap();
        assert!(matches!(messages.as_slice(), [SimpleQueryMessage::CommandComplete(0)]));
        assert_eq!(simple_rows(&first, "SELECT count(*) FROM t").await, vec![text(&["0"])]);

        // The same over the extended protocol, with a ROLLBACK.
        first.execute("BEGIN", &[]).await.unwrap();
        first.execute("INSERT INTO t VALUES ($1)", &[&5i32]).await.unwrap();
        assert_eq!(code(&first.execute("INSERT INTO t VALUES ($1)", &[&5i32]).await.unwrap_err()), "23505");
        assert_eq!(code(&first.execute("INSERT INTO t VALUES ($1)", &[&6i32]).await.unwrap_err()), "25P02");
        first.execute("ROLLBACK", &[]).await.unwrap();

        // A commit is visible to another connection.
        let second = connect(&server).await;
        let transaction =
            "START TRANSACTION; INSERT INTO t VALUES (10); UPDATE t SET id = id + 1 WHERE id = 10; COMMIT";
        first.batch_execute(transaction).await.unwrap();
        assert_eq!(simple_rows(&second, "SELECT id FROM t").await, vec![text(&["11"])]);
        let row = second.query_one("SELECT id FROM t WHERE id = $1", &[&11i32]).await.unwrap();
        assert_eq!(row.get::<_, i32>(0), 11);

        // A block holds the store only from its first statement that needs
        // it: a BEGIN alone holds nobody up.
        first.batch_execute("BEGIN").await.unwrap();
        let alone = tokio::time::timeout(Duration::from_secs(5), second.batch_execute("INSERT INTO t VALUES (20)"));
        alone.await.expect("not held up by an empty block").unwrap();
        assert_eq!(simple_rows(&first, "SELECT count(*) FROM t").await, vec![text(&["2"])]);
        first.batch_execute("ROLLBACK").await.unwrap();
        second.batch_execute("DELETE FROM t WHERE id = 20").await.unwrap();

        // A connection that goes away mid-block is rolled back, and frees
        // the store for the others.
        first.batch_execute("BEGIN; INSERT INTO t VALUES (99)").await.unwrap();
        drop(first);
        assert_eq!(simple_rows(&second, "SELECT id FROM t").await, vec![text(&["11"])]);
        drop(second);
        server.stop().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn scram_admits_the_right_password_only() {
    bounded(async {
        let server = start(MemoryKv::default(), ServerConfig::scram("lab", "pencil")).await;
        let client = connect_as(&server, "lab", "pencil").await.unwrap();
        assert_eq!(simple_rows(&client, "SELECT 41 + 1").await, vec![text(&["42"])]);
        let wrong = connect_as(&server, "lab", "crayon").await.unwrap_err();
        assert_eq!(code(&wrong), "28P01");
        let stranger = connect_as(&server, "mallory", "pencil").await.unwrap_err();
        assert_eq!(code(&stranger), "28P01");
        drop(client);
        server.stop().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn a_client_past_the_connection_limit_is_refused() {
    bounded(async {
        let config = ServerConfig { max_connections: 1, ..ServerConfig::trust() };
        let server = start(MemoryKv::default(), config).await;
        let first = connect(&server).await;
        let refused = connect_as(&server, "lab", "").await.unwrap_err();
        assert_eq!(code(&refused), "53300");
        assert_eq!(simple_rows(&first, "SELECT 1").await, vec![text(&["1"])]);
        drop(first);
        // The slot frees when the first connection ends.
        let mut admitted = None;
        for _ in 0..100 {
            if let Ok(client) = connect_as(&server, "lab", "").await {
                admitted = Some(client);
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let admitted = admitted.expect("a freed slot admits the next client");
        assert_eq!(simple_rows(&admitted, "SELECT 2").await, vec![text(&["2"])]);
        drop(admitted);
        server.stop().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn the_pgbench_script_runs_in_both_protocols() {
    bounded(async {
        let store = MemoryKv::default();
        init_pgbench_sized(&store, 1, 1_000).await.unwrap();
        let server = start(store, ServerConfig::trust()).await;
        let client = connect(&server).await;
        assert_eq!(simple_rows(&client, "select count(*) from pgbench_branches").await, vec![text(&["1"])]);
        client.batch_execute("vacuum pgbench_branches; vacuum pgbench_tellers; truncate pgbench_history").await.unwrap();
        for (aid, tid, delta) in [(17, 3, 250), (999, 7, -40)] {
            let script = format!(
                "BEGIN;
                 UPDATE pgbench_accounts SET abalance = abalance + {delta} WHERE aid = {aid};
                 SELECT abalance FROM pgbench_accounts WHERE aid = {aid};
                 UPDATE pgbench_tellers SET tbalance = tbalance + {delta} WHERE tid = {tid};
                 UPDATE pgbench_branches SET bbalance = bbalance + {delta} WHERE bid = 1;
                 INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES ({tid}, 1, {aid}, {delta}, CURRENT_TIMESTAMP);
                 END;"
            );
            assert_eq!(simple_rows(&client, &script).await, vec![text(&[&delta.to_string()])]);
        }
        // pgbench -M extended sends each command with $n parameters.
        client.execute("BEGIN", &[]).await.unwrap();
        client.execute("UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2", &[&5i32, &17i32]).await.unwrap();
        let balance = client.query_one("SELECT abalance FROM pgbench_accounts WHERE aid = $1", &[&17i32]).await.unwrap();
        assert_eq!(balance.get::<_, i32>(0), 255);
        client.execute("UPDATE pgbench_tellers SET tbalance = tbalance + $1 WHERE tid = $2", &[&5i32, &3i32]).await.unwrap();
        client.execute("UPDATE pgbench_branches SET bbalance = bbalance + $1 WHERE bid = $2", &[&5i32, &1i32]).await.unwrap();
        let history = "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES ($1, $2, $3, $4, CURRENT_TIMESTAMP)";
        client.execute(history, &[&3i32, &1i32, &17i32, &5i32]).await.unwrap();
        client.execute("END", &[]).await.unwrap();
        let sums = "SELECT (SELECT 1) FROM pgbench_branches";
        assert_eq!(code(&client.query(sums, &[]).await.unwrap_err()), "0A000");
        for table in ["pgbench_accounts", "pgbench_tellers", "pgbench_branches"] {
            let column = match table {
                "pgbench_accounts" => "abalance",
                "pgbench_tellers" => "tbalance",
                _ => "bbalance",
            };
            let sum = client.query_one(&format!("SELECT sum({column}) FROM {table}"), &[]).await.unwrap();
            assert_eq!(sum.get::<_, i64>(0), 215, "{table}");
        }
        let history = client.query_one("SELECT count(*), sum(delta), min(mtime) FROM pgbench_history", &[]).await.unwrap();
        assert_eq!((history.get::<_, i64>(0), history.get::<_, i64>(1)), (3, 215));
        assert_eq!(history.get::<_, &str>(2).len(), "2026-01-01 00:00:00.000000".len());
        drop(client);
        server.stop().await.unwrap();
    })
    .await;
}

/// A store that fails every `begin` while `broken` is set, like a fenced
/// volume.
#[derive(Clone, Debug, Default)]
struct BreakableKv {
    inner: MemoryKv,
    broken: Arc<AtomicBool>,
}

#[derive(Debug)]
struct BreakableTxn(MemoryTxn);

impl KvStore for BreakableKv {
    type Txn = BreakableTxn;
    async fn begin(&self) -> Result<BreakableTxn, KvError> {
        if self.broken.load(Ordering::Relaxed) {
            return Err(KvError::Storage("the volume is fenced".into()));
        }
        Ok(BreakableTxn(self.inner.begin().await?))
    }
}

impl KvTxn for BreakableTxn {
    async fn get(&mut self, tree: TreeId, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        self.0.get(tree, key).await
    }
    async fn put(&mut self, tree: TreeId, key: &[u8], value: &[u8]) -> Result<(), KvError> {
        self.0.put(tree, key, value).await
    }
    async fn delete(&mut self, tree: TreeId, key: &[u8]) -> Result<bool, KvError> {
        self.0.delete(tree, key).await
    }
    async fn scan(
        &mut self,
        tree: TreeId,
        start: Bound<Vec<u8>>,
        end: Bound<Vec<u8>>,
        limit: Option<usize>,
    ) -> Result<Entries, KvError> {
        self.0.scan(tree, start, end, limit).await
    }
    async fn create_tree(&mut self) -> Result<TreeId, KvError> {
        self.0.create_tree().await
    }
    async fn drop_tree(&mut self, tree: TreeId) -> Result<(), KvError> {
        self.0.drop_tree(tree).await
    }
    async fn commit(self) -> Result<(), KvError> {
        self.0.commit().await
    }
    async fn rollback(self) -> Result<(), KvError> {
        self.0.rollback().await
    }
}

#[tokio::test]
async fn a_storage_failure_is_58030_and_storeless_statements_still_answer() {
    bounded(async {
        let store = BreakableKv::default();
        let server = start(store.clone(), ServerConfig::trust()).await;
        let client = connect(&server).await;
        client.batch_execute("CREATE TABLE t (id INT PRIMARY KEY)").await.unwrap();
        store.broken.store(true, Ordering::Relaxed);
        assert_eq!(simple_code(&client, "SELECT * FROM t").await, "58030");
        // BEGIN needs no storage; the block's first statement that does
        // fails with 58030 and fails the block.
        client.batch_execute("BEGIN").await.unwrap();
        assert_eq!(simple_code(&client, "SELECT * FROM t").await, "58030");
        assert_eq!(simple_code(&client, "SELECT * FROM t").await, "25P02");
        client.batch_execute("ROLLBACK").await.unwrap();
        assert_eq!(simple_rows(&client, "SELECT 1").await, vec![text(&["1"])]);
        store.broken.store(false, Ordering::Relaxed);
        assert_eq!(simple_rows(&client, "SELECT count(*) FROM t").await, vec![text(&["0"])]);
        drop(client);
        server.stop().await.unwrap();
    })
    .await;
}
