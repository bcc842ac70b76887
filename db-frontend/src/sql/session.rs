//! A session: one client's statements and its transaction state.
//!
//! ## Transactions
//!
//! Outside a block, each statement runs in its own [`KvTxn`]: committed
//! when it succeeds, rolled back when it fails, so every statement is
//! atomic. Inside `BEGIN` ... `COMMIT`, one `KvTxn`, begun at the block's
//! first statement that needs the store, is shared by every statement up
//! to `COMMIT`. An error inside the block rolls that `KvTxn` back at once
//! (releasing the store for other sessions) and leaves the block
//! *failed*, as in PostgreSQL: later statements get `25P02` until
//! `ROLLBACK`, and `COMMIT` of a failed block reports `ROLLBACK`.
//!
//! The store runs one transaction at a time (single writer; see
//! [`super::kv`]), so schedules are serial and serializable: a block's
//! `KvTxn` begins with its first statement that needs the store (`BEGIN`
//! itself takes nothing, as PostgreSQL takes a serializable snapshot only
//! at the first statement), it holds the store until the block ends, and
//! other sessions wait in `KvStore::begin`. Statements that need no store
//! (`SET`, `SHOW`, `SELECT 1`) never wait.
//!
//! A session dropped with a block open rolls it back (dropping a `KvTxn`
//! rolls it back); [`Session::close`] does it explicitly.
//!
//! Multi-statement query strings run statement by statement, each on its
//! own unless inside a block, and stop at the first error (PostgreSQL
//! would run an unbracketed string as one implicit transaction).

use sqlparser::ast::Statement;

use super::catalog;
use super::error::{SqlError, SqlResult, sqlstate};
use super::exec::{self, Outcome};
use super::kv::{KvStore, KvTxn};
use super::plan::{self, OutputColumn, Planned, Tables};
use super::types::{DataType, Value, parse_text};

/// Where the session is, as `ReadyForQuery` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransactionState {
    /// No block open.
    Idle,
    /// Inside BEGIN..COMMIT.
    InBlock,
    /// Inside a block that failed; only ROLLBACK (or COMMIT) ends it.
    Failed,
}

/// One parameter as the wire protocol delivers it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WireParam {
    /// `None` for NULL.
    pub bytes: Option<Vec<u8>>,
    /// Binary format (else text).
    pub binary: bool,
}

/// Statement parameters: already values, or still wire bytes that are
/// decoded once the statement's parameter types are known.
#[derive(Clone, Debug, PartialEq)]
pub enum Params {
    Values(Vec<Value>),
    Wire { params: Vec<WireParam>, given: Vec<Option<DataType>> },
}

impl Params {
    /// No parameters.
    pub fn none() -> Params {
        Params::Values(Vec::new())
    }

    /// The types the client declared.
    fn given(&self) -> Vec<Option<DataType>> {
        match self {
            Params::Values(values) => values.iter().map(Value::data_type).collect(),
            Params::Wire { given, .. } => given.clone(),
        }
    }

    /// The values, decoded for the planned types.
    fn resolve(self, types: &[DataType]) -> SqlResult<Vec<Value>> {
        let count = match &self {
            Params::Values(values) => values.len(),
            Params::Wire { params, .. } => params.len(),
        };
        if count != types.len() {
            return Err(SqlError::new(
                sqlstate::PROTOCOL_VIOLATION,
                format!("the statement has {} parameters but {count} were given", types.len()),
            ));
        }
        match self {
            Params::Values(values) => Ok(values),
            Params::Wire { params, .. } => {
                params.iter().zip(types).map(|(param, &data_type)| decode_param(param, data_type)).collect()
            }
        }
    }
}

/// Decodes one wire parameter as `data_type`: text format is PostgreSQL
/// text input; binary integers are big-endian of 2, 4 or 8 bytes.
pub fn decode_param(param: &WireParam, data_type: DataType) -> SqlResult<Value> {
    let Some(bytes) = &param.bytes else {
        return Ok(Value::Null);
    };
    let bad = || SqlError::new(sqlstate::PROTOCOL_VIOLATION, format!("bad binary value for a {data_type} parameter"));
    if !param.binary || data_type == DataType::Text {
        let text = std::str::from_utf8(bytes)
            .map_err(|_| SqlError::new(sqlstate::INVALID_TEXT_REPRESENTATION, "parameter is not valid UTF-8"))?;
        return parse_text(text, data_type);
    }
    match data_type {
        DataType::Int | DataType::BigInt => {
            let wide = match bytes.len() {
                2 => i64::from(i16::from_be_bytes([bytes[0], bytes[1]])),
                4 => i64::from(i32::from_be_bytes(bytes[..4].try_into().map_err(|_| bad())?)),
                8 => i64::from_be_bytes(bytes[..8].try_into().map_err(|_| bad())?),
                _ => return Err(bad()),
            };
            Value::BigInt(wide).coerce_to(data_type)
        }
        DataType::Bool => match bytes.as_slice() {
            [flag] => Ok(Value::Bool(*flag != 0)),
            _ => Err(bad()),
        },
        DataType::Text => Err(bad()),
    }
}

/// A statement's parameter types and result columns, for Describe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Description {
    pub params: Vec<DataType>,
    pub columns: Vec<OutputColumn>,
}

/// One client's session over a store.
#[derive(Debug)]
pub struct Session<S: KvStore> {
    store: S,
    txn: Option<S::Txn>,
    state: TransactionState,
}

fn in_failed_block() -> SqlError {
    SqlError::new(
        sqlstate::IN_FAILED_SQL_TRANSACTION,
        "current transaction is aborted, commands ignored until end of transaction block",
    )
}

/// Reads the schemas `statement` names and plans it.
async fn plan_in<T: KvTxn>(txn: &mut T, statement: &Statement, given: &[Option<DataType>]) -> SqlResult<Planned> {
    let mut tables = Tables::new();
    for name in plan::referenced_tables(statement)? {
        if let std::collections::hash_map::Entry::Vacant(entry) = tables.entry(name) {
            let table = catalog::require_table(txn, entry.key()).await?;
            entry.insert(table);
        }
    }
    plan::plan(statement, &tables, given)
}

async fn run_in<T: KvTxn>(txn: &mut T, statement: &Statement, params: Params) -> SqlResult<Outcome> {
    let planned = plan_in(txn, statement, &params.given()).await?;
    let values = params.resolve(&planned.params)?;
    exec::execute(txn, &planned.plan, &planned.columns, &values).await
}

impl<S: KvStore> Session<S> {
    /// A new session, outside any block.
    pub fn new(store: S) -> Session<S> {
        Session { store, txn: None, state: TransactionState::Idle }
    }

    /// Where the session is.
    pub fn state(&self) -> TransactionState {
        self.state
    }

    /// Runs a query string of one or more statements (the simple query
    /// protocol). Stops at the first error, which is the last result.
    pub async fn execute_sql(&mut self, sql: &str) -> Vec<SqlResult<Outcome>> {
        let statements = match plan::parse(sql) {
            Ok(statements) => statements,
            Err(error) => {
                // A syntax error inside a block fails the block too.
                self.fail_block().await;
                return vec![Err(error)];
            }
        };
        let mut results = Vec::with_capacity(statements.len());
        for statement in &statements {
            let result = self.execute(statement, Params::none()).await;
            let failed = result.is_err();
            results.push(result);
            if failed {
                break;
            }
        }
        results
    }

    /// Runs one parsed statement.
    pub async fn execute(&mut self, statement: &Statement, params: Params) -> SqlResult<Outcome> {
        match statement {
            Statement::StartTransaction { .. } => return self.begin(statement).await,
            Statement::Commit { chain: false, .. } => return self.commit().await,
            Statement::Rollback { chain: false, savepoint: None } => return self.rollback().await,
            _ => {}
        }
        if self.state == TransactionState::Failed {
            return Err(in_failed_block());
        }
        let result = match (self.state, self.txn.as_mut()) {
            (_, Some(txn)) => run_in(txn, statement, params).await,
            // A block's transaction starts at its first statement that
            // needs the store (PostgreSQL takes a serializable snapshot
            // there too), so the store's transaction is not held from
            // BEGIN across the client's next round trip.
            (TransactionState::InBlock, None) if !plan::is_storeless(statement) => match self.store.begin().await {
                Ok(txn) => run_in(self.txn.insert(txn), statement, params).await,
                Err(error) => Err(error.into()),
            },
            _ => self.run_alone(statement, params).await,
        };
        if result.is_err() {
            self.fail_block().await;
        }
        result
    }

    /// Parameter and result types of a statement (for Describe).
    pub async fn describe(&mut self, statement: &Statement, given: &[Option<DataType>]) -> SqlResult<Description> {
        let control = matches!(
            statement,
            Statement::StartTransaction { .. } | Statement::Commit { .. } | Statement::Rollback { .. }
        );
        let planned = if control || plan::is_storeless(statement) {
            plan::plan(statement, &Tables::new(), given)?
        } else if self.state == TransactionState::Failed {
            return Err(in_failed_block());
        } else if let Some(txn) = self.txn.as_mut() {
            plan_in(txn, statement, given).await?
        } else {
            let mut txn = self.store.begin().await?;
            let planned = plan_in(&mut txn, statement, given).await;
            txn.rollback().await?;
            planned?
        };
        Ok(Description { params: planned.params, columns: planned.columns })
    }

    /// Rolls back an open block; for a connection that goes away.
    pub async fn close(&mut self) -> SqlResult<()> {
        self.state = TransactionState::Idle;
        match self.txn.take() {
            Some(txn) => Ok(txn.rollback().await?),
            None => Ok(()),
        }
    }

    /// A statement outside a block: its own transaction, or none.
    async fn run_alone(&mut self, statement: &Statement, params: Params) -> SqlResult<Outcome> {
        if plan::is_storeless(statement) {
            let planned = plan::plan(statement, &Tables::new(), &params.given())?;
            let values = params.resolve(&planned.params)?;
            return exec::execute_storeless(&planned.plan, &planned.columns, &values).unwrap_or_else(|| {
                Err(SqlError::new(sqlstate::INTERNAL_ERROR, "a storeless statement needs the store"))
            });
        }
        let mut txn = self.store.begin().await?;
        match run_in(&mut txn, statement, params).await {
            Ok(outcome) => {
                txn.commit().await?;
                Ok(outcome)
            }
            Err(error) => {
                if let Err(rollback) = txn.rollback().await {
                    tracing::warn!(%rollback, "rolling back a failed statement failed");
                }
                Err(error)
            }
        }
    }

    /// After an error inside a block: undo it now, and fail the block.
    async fn fail_block(&mut self) {
        if self.state == TransactionState::Idle {
            return;
        }
        self.state = TransactionState::Failed;
        if let Some(txn) = self.txn.take()
            && let Err(error) = txn.rollback().await
        {
            tracing::warn!(%error, "rolling back a failed transaction block failed");
        }
    }

    async fn begin(&mut self, statement: &Statement) -> SqlResult<Outcome> {
        // Validates the modes (and rejects BEGIN ... END blocks).
        plan::plan(statement, &Tables::new(), &[])?;
        match self.state {
            // PostgreSQL warns and carries on.
            TransactionState::InBlock => Ok(Outcome::Begin),
            TransactionState::Failed => Err(in_failed_block()),
            TransactionState::Idle => {
                // The store's transaction begins with the first statement
                // that needs it (`execute`).
                self.state = TransactionState::InBlock;
                Ok(Outcome::Begin)
            }
        }
    }

    async fn commit(&mut self) -> SqlResult<Outcome> {
        let state = std::mem::replace(&mut self.state, TransactionState::Idle);
        match (state, self.txn.take()) {
            (TransactionState::Failed, _) => Ok(Outcome::Rollback),
            (_, Some(txn)) => {
                txn.commit().await?;
                Ok(Outcome::Commit)
            }
            // COMMIT outside a block: PostgreSQL warns and reports COMMIT.
            (_, None) => Ok(Outcome::Commit),
        }
    }

    async fn rollback(&mut self) -> SqlResult<Outcome> {
        self.state = TransactionState::Idle;
        if let Some(txn) = self.txn.take() {
            txn.rollback().await?;
        }
        Ok(Outcome::Rollback)
    }
}

#[cfg(test)]
mod tests {
    use std::ops::Bound;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::sql::kv::{Entries, KvError, MemoryKv, MemoryTxn, TreeId};

    /// A store that counts how many entries the engine reads.
    #[derive(Clone, Debug, Default)]
    struct CountingKv {
        inner: MemoryKv,
        entries_read: Arc<AtomicUsize>,
    }

    #[derive(Debug)]
    struct CountingTxn {
        inner: MemoryTxn,
        entries_read: Arc<AtomicUsize>,
    }

    impl KvStore for CountingKv {
        type Txn = CountingTxn;
        async fn begin(&self) -> Result<CountingTxn, KvError> {
            Ok(CountingTxn { inner: self.inner.begin().await?, entries_read: self.entries_read.clone() })
        }
    }

    impl KvTxn for CountingTxn {
        async fn get(&mut self, tree: TreeId, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
            let found = self.inner.get(tree, key).await?;
            self.entries_read.fetch_add(usize::from(found.is_some()), Ordering::Relaxed);
            Ok(found)
        }
        async fn put(&mut self, tree: TreeId, key: &[u8], value: &[u8]) -> Result<(), KvError> {
            self.inner.put(tree, key, value).await
        }
        async fn delete(&mut self, tree: TreeId, key: &[u8]) -> Result<bool, KvError> {
            self.inner.delete(tree, key).await
        }
        async fn scan(
            &mut self,
            tree: TreeId,
            start: Bound<Vec<u8>>,
            end: Bound<Vec<u8>>,
            limit: Option<usize>,
        ) -> Result<Entries, KvError> {
            let entries = self.inner.scan(tree, start, end, limit).await?;
            self.entries_read.fetch_add(entries.len(), Ordering::Relaxed);
            Ok(entries)
        }
        async fn create_tree(&mut self) -> Result<TreeId, KvError> {
            self.inner.create_tree().await
        }
        async fn drop_tree(&mut self, tree: TreeId) -> Result<(), KvError> {
            self.inner.drop_tree(tree).await
        }
        async fn commit(self) -> Result<(), KvError> {
            self.inner.commit().await
        }
        async fn rollback(self) -> Result<(), KvError> {
            self.inner.rollback().await
        }
    }

    async fn one<S: KvStore>(session: &mut Session<S>, sql: &str) -> SqlResult<Outcome> {
        let mut results = session.execute_sql(sql).await;
        assert_eq!(results.len(), 1, "{sql}");
        results.remove(0)
    }

    async fn rows<S: KvStore>(session: &mut Session<S>, sql: &str) -> Vec<Vec<Value>> {
        match one(session, sql).await {
            Ok(Outcome::Rows { rows, .. }) => rows,
            other => panic!("{sql}: {other:?}"),
        }
    }

    async fn code<S: KvStore>(session: &mut Session<S>, sql: &str) -> &'static str {
        one(session, sql).await.expect_err(sql).code
    }

    fn ints(values: &[i64]) -> Vec<Vec<Value>> {
        values.iter().map(|value| vec![Value::Int(*value as i32)]).collect()
    }

    #[tokio::test]
    async fn key_lookups_and_ranges_read_only_their_rows() {
        let store = CountingKv::default();
        let mut session = Session::new(store.clone());
        one(&mut session, "CREATE TABLE t (id INT PRIMARY KEY, v INT)").await.unwrap();
        let values: Vec<String> = (1..=3000).map(|id| format!("({id}, {})", id % 7)).collect();
        let insert = format!("INSERT INTO t VALUES {}", values.join(", "));
        assert_eq!(one(&mut session, &insert).await, Ok(Outcome::Inserted(3000)));

        let read = |session_store: &CountingKv| session_store.entries_read.swap(0, Ordering::Relaxed);
        read(&store);
        assert_eq!(rows(&mut session, "SELECT v FROM t WHERE id = 10").await, ints(&[3]));
        // One catalog get, one row get.
        assert_eq!(read(&store), 2);
        assert_eq!(
            rows(&mut session, "SELECT id FROM t WHERE id > 2990 AND id <= 2993").await,
            ints(&[2991, 2992, 2993])
        );
        assert_eq!(read(&store), 1 + 3);
        assert_eq!(
            rows(&mut session, "SELECT count(*) FROM t WHERE id BETWEEN 100 AND 199").await,
            vec![vec![Value::BigInt(100)]]
        );
        assert_eq!(read(&store), 1 + 100);
        // A filter on a non-key column reads everything, in batches.
        assert_eq!(rows(&mut session, "SELECT count(*) FROM t WHERE v = 0").await, vec![vec![Value::BigInt(428)]]);
        assert_eq!(read(&store), 1 + 3000);
        // LIMIT without ORDER BY stops the scan early.
        assert_eq!(rows(&mut session, "SELECT id FROM t LIMIT 2 OFFSET 1").await, ints(&[2, 3]));
        assert_eq!(read(&store), 1 + 3);
        // An UPDATE by key reads one row too.
        assert_eq!(one(&mut session, "UPDATE t SET v = v + 1 WHERE id = 5").await, Ok(Outcome::Updated(1)));
        assert_eq!(read(&store), 2);
    }

    #[tokio::test]
    async fn select_projects_filters_sorts_and_aggregates() {
        let mut session = Session::new(MemoryKv::default());
        one(&mut session, "CREATE TABLE p (name TEXT PRIMARY KEY, age INT, city TEXT)").await.unwrap();
        let inserted = one(&mut session, "INSERT INTO p (name, age, city) VALUES ('ann', 31, 'oslo'), ('bob', NULL, 'rome'), ('cy', 25, 'oslo'), ('di', 40, NULL)").await;
        assert_eq!(inserted, Ok(Outcome::Inserted(4)));
        let text = |value: &str| Value::Text(value.to_owned());
        assert_eq!(
            rows(&mut session, "SELECT name, age * 2 AS double FROM p WHERE city = 'oslo' ORDER BY age DESC").await,
            vec![vec![text("ann"), Value::Int(62)], vec![text("cy"), Value::Int(50)]]
        );
        assert_eq!(
            rows(&mut session, "SELECT name FROM p WHERE age IS NULL OR NOT (age < 35)").await,
            vec![vec![text("bob")], vec![text("di")]]
        );
        assert_eq!(
            rows(&mut session, "SELECT name FROM p ORDER BY city, age DESC").await,
            vec![vec![text("ann")], vec![text("cy")], vec![text("bob")], vec![text("di")]]
        );
        assert_eq!(
            rows(&mut session, "SELECT count(*), count(age), sum(age), min(age), max(name) FROM p").await,
            vec![vec![Value::BigInt(4), Value::BigInt(3), Value::BigInt(96), Value::Int(25), text("di")]]
        );
        assert_eq!(rows(&mut session, "SELECT sum(age) FROM p WHERE age > 100").await, vec![vec![Value::Null]]);
        assert_eq!(
            rows(&mut session, "SELECT name FROM p WHERE name >= 'bob' AND name < 'd'").await,
            vec![vec![text("bob")], vec![text("cy")]]
        );
        assert_eq!(
            rows(&mut session, "SELECT 1 + 2, 'a' || 'b', NULL IS NULL").await,
            vec![vec![Value::Int(3), text("ab"), Value::Bool(true)]]
        );
        assert_eq!(rows(&mut session, "SELECT * FROM p WHERE age <> 31 AND age != 25").await.len(), 1);
        assert_eq!(code(&mut session, "SELECT name FROM p LIMIT -1").await, sqlstate::INVALID_ROW_COUNT_IN_LIMIT);
    }

    #[tokio::test]
    async fn writes_check_keys_nulls_and_ranges() {
        let mut session = Session::new(MemoryKv::default());
        one(&mut session, "CREATE TABLE t (id BIGINT PRIMARY KEY, n INT NOT NULL)").await.unwrap();
        one(&mut session, "INSERT INTO t VALUES (1, 10), (2, 20)").await.unwrap();
        assert_eq!(code(&mut session, "INSERT INTO t VALUES (3, 30), (1, 5)").await, sqlstate::UNIQUE_VIOLATION);
        // The failed statement left nothing behind.
        assert_eq!(rows(&mut session, "SELECT count(*) FROM t").await, vec![vec![Value::BigInt(2)]]);
        assert_eq!(code(&mut session, "INSERT INTO t VALUES (4, NULL)").await, sqlstate::NOT_NULL_VIOLATION);
        assert_eq!(code(&mut session, "INSERT INTO t (n) VALUES (4)").await, sqlstate::NOT_NULL_VIOLATION);
        assert_eq!(
            code(&mut session, "INSERT INTO t VALUES (5, 3000000000)").await,
            sqlstate::NUMERIC_VALUE_OUT_OF_RANGE
        );
        assert_eq!(code(&mut session, "UPDATE t SET n = n * 1000000000").await, sqlstate::NUMERIC_VALUE_OUT_OF_RANGE);
        assert_eq!(code(&mut session, "SELECT n / 0 FROM t").await, sqlstate::DIVISION_BY_ZERO);
        assert_eq!(code(&mut session, "INSERT INTO t VALUES ('x', 1)").await, sqlstate::INVALID_TEXT_REPRESENTATION);
        assert_eq!(code(&mut session, "UPDATE t SET id = 2 WHERE id = 1").await, sqlstate::UNIQUE_VIOLATION);
        assert_eq!(one(&mut session, "UPDATE t SET id = id + 10, n = n + 1").await, Ok(Outcome::Updated(2)));
        assert_eq!(
            rows(&mut session, "SELECT id, n FROM t").await,
            vec![vec![Value::BigInt(11), Value::Int(11)], vec![Value::BigInt(12), Value::Int(21)]]
        );
        assert_eq!(one(&mut session, "DELETE FROM t WHERE n > 15").await, Ok(Outcome::Deleted(1)));
        assert_eq!(one(&mut session, "TRUNCATE t").await, Ok(Outcome::Command("TRUNCATE TABLE")));
        assert_eq!(rows(&mut session, "SELECT count(*) FROM t").await, vec![vec![Value::BigInt(0)]]);
        assert_eq!(one(&mut session, "DROP TABLE t").await, Ok(Outcome::Command("DROP TABLE")));
        assert_eq!(code(&mut session, "SELECT * FROM t").await, sqlstate::UNDEFINED_TABLE);
        assert_eq!(one(&mut session, "DROP TABLE IF EXISTS t").await, Ok(Outcome::Command("DROP TABLE")));
    }

    #[tokio::test]
    async fn a_table_without_key_numbers_its_rows_and_a_composite_key_ranges() {
        let store = MemoryKv::default();
        let mut session = Session::new(store.clone());
        one(&mut session, "CREATE TABLE h (x INT)").await.unwrap();
        one(&mut session, "INSERT INTO h VALUES (1), (1)").await.unwrap();
        one(&mut session, "INSERT INTO h VALUES (2)").await.unwrap();
        assert_eq!(rows(&mut session, "SELECT x FROM h").await, ints(&[1, 1, 2]));
        // A new session over the same store sees the table and its row ids.
        let mut later = Session::new(store);
        one(&mut later, "INSERT INTO h VALUES (3)").await.unwrap();
        assert_eq!(rows(&mut later, "SELECT count(*) FROM h").await, vec![vec![Value::BigInt(4)]]);

        one(&mut later, "CREATE TABLE c (a TEXT, b INT, PRIMARY KEY (a, b))").await.unwrap();
        one(&mut later, "INSERT INTO c VALUES ('x', 2), ('x', 1), ('w', 9), ('y', 0), ('x\u{0}', 5)").await.unwrap();
        assert_eq!(rows(&mut later, "SELECT b FROM c WHERE a = 'x'").await, ints(&[1, 2]));
        assert_eq!(rows(&mut later, "SELECT b FROM c WHERE a > 'x'").await, ints(&[5, 0]));
        assert_eq!(rows(&mut later, "SELECT b FROM c WHERE a <= 'x'").await, ints(&[9, 1, 2]));
        assert_eq!(rows(&mut later, "SELECT b FROM c WHERE a = 'x' AND b = 2").await, ints(&[2]));
    }

    #[tokio::test]
    async fn blocks_commit_roll_back_and_fail_like_postgres() {
        let store = MemoryKv::default();
        let mut session = Session::new(store.clone());
        one(&mut session, "CREATE TABLE t (id INT PRIMARY KEY)").await.unwrap();
        assert_eq!(one(&mut session, "BEGIN").await, Ok(Outcome::Begin));
        assert_eq!(session.state(), TransactionState::InBlock);
        one(&mut session, "INSERT INTO t VALUES (1)").await.unwrap();
        assert_eq!(one(&mut session, "ROLLBACK").await, Ok(Outcome::Rollback));
        assert_eq!(rows(&mut session, "SELECT count(*) FROM t").await, vec![vec![Value::BigInt(0)]]);

        one(&mut session, "START TRANSACTION").await.unwrap();
        one(&mut session, "INSERT INTO t VALUES (1)").await.unwrap();
        assert_eq!(code(&mut session, "INSERT INTO t VALUES (1)").await, sqlstate::UNIQUE_VIOLATION);
        assert_eq!(session.state(), TransactionState::Failed);
        assert_eq!(code(&mut session, "SELECT 1").await, sqlstate::IN_FAILED_SQL_TRANSACTION);
        assert_eq!(one(&mut session, "COMMIT").await, Ok(Outcome::Rollback));
        assert_eq!(session.state(), TransactionState::Idle);
        assert_eq!(rows(&mut session, "SELECT count(*) FROM t").await, vec![vec![Value::BigInt(0)]]);

        let results = session.execute_sql("BEGIN; INSERT INTO t VALUES (7); END;").await;
        assert_eq!(results, vec![Ok(Outcome::Begin), Ok(Outcome::Inserted(1)), Ok(Outcome::Commit)]);
        assert_eq!(rows(&mut Session::new(store.clone()), "SELECT id FROM t").await, ints(&[7]));

        // A dropped connection's block is rolled back.
        one(&mut session, "BEGIN").await.unwrap();
        one(&mut session, "INSERT INTO t VALUES (8)").await.unwrap();
        session.close().await.unwrap();
        assert_eq!(rows(&mut Session::new(store), "SELECT id FROM t").await, ints(&[7]));
    }

    #[tokio::test]
    async fn parameters_decode_from_wire_text_and_binary() {
        let mut session = Session::new(MemoryKv::default());
        one(&mut session, "CREATE TABLE t (id INT PRIMARY KEY, name TEXT, ok BOOL)").await.unwrap();
        let statement = plan::parse("INSERT INTO t VALUES ($1, $2, $3)").unwrap().remove(0);
        let description = session.describe(&statement, &[]).await.unwrap();
        assert_eq!(description.params, vec![DataType::Int, DataType::Text, DataType::Bool]);
        let wire = |bytes: &[u8], binary| WireParam { bytes: Some(bytes.to_vec()), binary };
        let params = Params::Wire {
            params: vec![wire(&7i32.to_be_bytes(), true), wire(b"seven", false), wire(&[1], true)],
            given: vec![None; 3],
        };
        assert_eq!(session.execute(&statement, params).await, Ok(Outcome::Inserted(1)));
        let text = Params::Wire {
            params: vec![wire(b"8", false), WireParam { bytes: None, binary: false }, wire(b"f", false)],
            given: vec![None; 3],
        };
        assert_eq!(session.execute(&statement, text).await, Ok(Outcome::Inserted(1)));
        assert_eq!(
            rows(&mut session, "SELECT id, name, ok FROM t WHERE id = 7").await,
            vec![vec![Value::Int(7), Value::Text("seven".into()), Value::Bool(true)]]
        );
        let short = Params::Wire { params: vec![wire(b"9", false)], given: vec![None] };
        assert_eq!(session.execute(&statement, short).await.unwrap_err().code, sqlstate::PROTOCOL_VIOLATION);
        let select = plan::parse("SELECT name FROM t WHERE id = $1").unwrap().remove(0);
        let found = session.execute(&select, Params::Values(vec![Value::BigInt(8)])).await;
        assert_eq!(
            found,
            Ok(Outcome::Rows {
                columns: vec![OutputColumn { name: "name".into(), data_type: DataType::Text }],
                rows: vec![vec![Value::Null]]
            })
        );
    }
}
