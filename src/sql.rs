//! `lab up` and `lab sql`: a serving cluster with the SQL engine in front,
//! and a client for it.
//!
//! `lab up` starts the embedded shape (six storage nodes on loopback, data
//! in a temporary directory unless `--data-dir`), opens the SQL engine on
//! the volume (`AuroraKv`), serves it over the PostgreSQL wire protocol on
//! 127.0.0.1, starts `--replicas` read replicas on the next ports, prints
//! the psql commands, and serves until Ctrl-C. Password authentication
//! (SCRAM-SHA-256) is on unless `--trust`.
//!
//! `lab sql -c "..."` runs statements against a running server (simple
//! query protocol, as psql does) and prints each result as a table;
//! `lab sql init-pgbench --scale S` creates and fills the pgbench tables
//! over the wire, which `pgbench -i` cannot do (it needs COPY).

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use common::transport::TcpTransport;
use db_frontend::engine::replica::{REPLICAS_MAX, ReplicaKv};
use db_frontend::engine::{AuroraKv, CACHE_PAGES_DEFAULT};
use db_frontend::sql::pgbench::{ACCOUNTS_PER_BRANCH, PGBENCH_SCHEMA, TELLERS_PER_BRANCH};
use db_frontend::sql::server::{self, ServerConfig, ServerHandle};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;
use std::sync::Arc;
use storage_node::DiskBackend;
use tokio::net::TcpListener;
use tokio_postgres::{NoTls, SimpleQueryMessage};

use crate::bench::report::render_table;
use crate::cluster::{ClusterOptions, LocalCluster};

/// The port `lab up` serves on, and `lab sql` connects to, by default.
pub const PORT_DEFAULT: u16 = 5433;
/// The user `lab up` accepts by default.
pub const USER_DEFAULT: &str = "lab";
/// Rows per INSERT statement of `init-pgbench`.
const INSERT_ROWS: u64 = 1000;
/// INSERT statements per transaction of `init-pgbench`.
const INSERTS_PER_TRANSACTION: u64 = 10;

/// Options of `lab up`.
#[derive(Clone, Debug, Args)]
pub struct UpOptions {
    /// Port of the writer's server on 127.0.0.1; replicas take the next ones.
    #[arg(long, default_value_t = PORT_DEFAULT)]
    pub port: u16,
    /// Read replicas to start (0 to 15), each serving read-only SQL.
    #[arg(long, default_value_t = 0)]
    pub replicas: usize,
    /// The user clients log in as.
    #[arg(long, default_value = USER_DEFAULT)]
    pub user: String,
    /// The password (SCRAM-SHA-256); default: a random one, printed.
    #[arg(long, env = "LAB_PASSWORD")]
    pub password: Option<String>,
    /// No password at all (anyone on this machine may connect).
    #[arg(long)]
    pub trust: bool,
    /// Keep the storage nodes' data here (default: a temporary directory).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Pages of the engine's buffer cache (8 KiB each).
    #[arg(long, default_value_t = CACHE_PAGES_DEFAULT)]
    pub cache_pages: usize,
    /// File backend of the storage nodes: std or io-uring.
    #[arg(long, default_value = "std")]
    pub backend: DiskBackend,
}

/// A serving cluster: storage nodes, the writer and its replicas.
#[derive(Debug)]
pub struct Serving {
    pub writer: ServerHandle,
    pub replicas: Vec<(ReplicaKv, ServerHandle)>,
    pub store: AuroraKv,
    pub cluster: LocalCluster,
    _directory: Option<tempfile::TempDir>,
}

impl Serving {
    /// Starts everything `options` asks for; ports 0 pick free ones.
    pub async fn start(options: &UpOptions, config: ServerConfig) -> Result<Serving> {
        if options.replicas > REPLICAS_MAX {
            bail!("--replicas is at most {REPLICAS_MAX}, not {}", options.replicas);
        }
        let (directory, path) = match &options.data_dir {
            Some(path) => (None, path.clone()),
            None => {
                let directory = tempfile::Builder::new().prefix("lab-up-").tempdir()?;
                let path = directory.path().to_path_buf();
                (Some(directory), path)
            }
        };
        let cluster = LocalCluster::start(&ClusterOptions::new(&path, options.backend)).await?;
        let volume = Arc::new(cluster.open_volume(Arc::new(TcpTransport::new())).await?);
        let (store, _) = AuroraKv::open(volume, options.cache_pages).await?;
        let listen = |port: u16| async move {
            TcpListener::bind(("127.0.0.1", port)).await.with_context(|| format!("binding 127.0.0.1:{port}"))
        };
        let writer = server::spawn(listen(options.port).await?, store.clone(), config.clone())?;
        let mut replicas = Vec::new();
        for index in 0..options.replicas {
            let port = if options.port == 0 { 0 } else { options.port + 1 + index as u16 };
            let replica = ReplicaKv::start(&store, options.cache_pages).await?;
            let handle = server::spawn(listen(port).await?, replica.clone(), config.clone())?;
            replicas.push((replica, handle));
        }
        Ok(Serving { writer, replicas, store, cluster, _directory: directory })
    }

    /// Stops the servers, the replicas and the volume.
    pub async fn stop(mut self) -> Result<()> {
        self.writer.stop().await?;
        for (replica, handle) in self.replicas {
            handle.stop().await?;
            replica.stop().await;
        }
        self.store.volume().close();
        self.cluster.stop();
        Ok(())
    }
}

fn random_password() -> String {
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(7, |time| time.as_nanos());
    let mut rng = common::rng::SimRng::new(seed as u64 ^ u64::from(std::process::id()));
    (0..16).map(|_| char::from(b'a' + rng.below(26) as u8)).collect()
}

pub async fn up(options: UpOptions) -> Result<()> {
    let password = options.password.clone().unwrap_or_else(random_password);
    let config = if options.trust { ServerConfig::trust() } else { ServerConfig::scram(&options.user, &password) };
    let serving = Serving::start(&options, config).await?;
    let login = if options.trust { String::new() } else { format!("PGPASSWORD={password} ") };
    println!("Serving SQL on the Aurora-style volume (six storage nodes on loopback).");
    println!("  writer:    {login}psql -h 127.0.0.1 -p {} -U {} lab", serving.writer.address.port(), options.user);
    for (index, (_, handle)) in serving.replicas.iter().enumerate() {
        println!(
            "  replica {index}: {login}psql -h 127.0.0.1 -p {} -U {} lab   (read-only)",
            handle.address.port(),
            options.user
        );
    }
    println!(
        "  pgbench:   lab sql init-pgbench --scale 1 --port {0}; {login}pgbench -h 127.0.0.1 -p {0} -U {1} -n -T 10 lab",
        serving.writer.address.port(),
        options.user
    );
    println!("Ctrl-C stops everything.");
    tokio::signal::ctrl_c().await?;
    for (index, (replica, _)) in serving.replicas.iter().enumerate() {
        let lag = replica.lag();
        println!(
            "replica {index}: {} commits shown, lag p50 {:.2} ms, p99 {:.2} ms (from the commit acknowledgement)",
            lag.commits, lag.p50_ms, lag.p99_ms
        );
    }
    serving.stop().await
}

/// Where `lab sql` connects.
#[derive(Clone, Debug, Args)]
pub struct Connection {
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = PORT_DEFAULT)]
    pub port: u16,
    #[arg(long, default_value = USER_DEFAULT)]
    pub user: String,
    /// The password `lab up` printed (or set with LAB_PASSWORD / PGPASSWORD).
    #[arg(long, env = "PGPASSWORD")]
    pub password: Option<String>,
}

/// `lab sql`: statements against a running `lab up`.
#[derive(Clone, Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct SqlOptions {
    #[command(subcommand)]
    pub command: Option<SqlCommand>,
    /// Statements to run (separated by semicolons), as psql -c does.
    #[arg(short = 'c', long = "command")]
    pub statements: Option<String>,
    #[command(flatten)]
    pub connection: Connection,
}

#[derive(Clone, Debug, Subcommand)]
pub enum SqlCommand {
    /// Create the pgbench tables and fill them (100,000 accounts per scale unit),
    /// over the wire: `pgbench -i` needs COPY, which the engine does not have.
    InitPgbench {
        #[arg(long, default_value_t = 1)]
        scale: u32,
        #[command(flatten)]
        connection: Connection,
    },
}

async fn connect(connection: &Connection) -> Result<tokio_postgres::Client> {
    let mut config = tokio_postgres::Config::new();
    config.host(&connection.host).port(connection.port).user(&connection.user).dbname("lab");
    if let Some(password) = &connection.password {
        config.password(password);
    }
    let (client, driver) = config.connect(NoTls).await.with_context(|| {
        format!("connecting to {}:{} (is `lab up` running there?)", connection.host, connection.port)
    })?;
    tokio::spawn(async move {
        if let Err(error) = driver.await {
            tracing::warn!(%error, "the connection to the SQL server ended");
        }
    });
    Ok(client)
}

/// Describes a server error with its SQLSTATE, as psql does.
fn describe(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("ERROR:  {} (SQLSTATE {})", db.message(), db.code().code()),
        None => error.to_string(),
    }
}

pub async fn sql(options: SqlOptions) -> Result<()> {
    match (options.command, options.statements) {
        (Some(SqlCommand::InitPgbench { scale, connection }), _) => init_pgbench(&connection, scale).await,
        (None, Some(statements)) => run_statements(&options.connection, &statements).await,
        (None, None) => bail!("nothing to run: give -c \"STATEMENTS\" or a subcommand (see lab sql --help)"),
    }
}

async fn run_statements(connection: &Connection, statements: &str) -> Result<()> {
    let client = connect(connection).await?;
    let messages = client.simple_query(statements).await.map_err(|error| anyhow::anyhow!(describe(&error)))?;
    let mut columns: Vec<String> = Vec::new();
    let mut rows: Vec<Vec<String>> = Vec::new();
    for message in messages {
        match message {
            SimpleQueryMessage::RowDescription(description) => {
                columns = description.iter().map(|column| column.name().to_string()).collect();
            }
            SimpleQueryMessage::Row(row) => {
                if columns.is_empty() {
                    columns = row.columns().iter().map(|column| column.name().to_string()).collect();
                }
                rows.push((0..row.len()).map(|index| row.get(index).unwrap_or("NULL").to_string()).collect());
            }
            SimpleQueryMessage::CommandComplete(count) => {
                if !columns.is_empty() {
                    let headers: Vec<&str> = columns.iter().map(String::as_str).collect();
                    println!("{}", render_table(&headers, &rows));
                    println!("({} row{})\n", rows.len(), if rows.len() == 1 { "" } else { "s" });
                } else {
                    println!("OK ({count})");
                }
                columns.clear();
                rows.clear();
            }
            _ => {}
        }
    }
    Ok(())
}

/// Creates the pgbench tables on the server at `connection` and fills them.
pub async fn init_pgbench(connection: &Connection, scale: u32) -> Result<()> {
    if scale == 0 {
        bail!("--scale must be at least 1");
    }
    let client = connect(connection).await?;
    let fail = |error: tokio_postgres::Error| anyhow::anyhow!(describe(&error));
    client
        .simple_query(
            "DROP TABLE IF EXISTS pgbench_history; DROP TABLE IF EXISTS pgbench_tellers; \
             DROP TABLE IF EXISTS pgbench_accounts; DROP TABLE IF EXISTS pgbench_branches",
        )
        .await
        .map_err(fail)?;
    client.simple_query(PGBENCH_SCHEMA).await.map_err(fail)?;
    let scale = u64::from(scale);
    let accounts = scale * ACCOUNTS_PER_BRANCH;
    let values =
        |range: std::ops::Range<u64>, row: &dyn Fn(u64) -> String| range.map(row).collect::<Vec<_>>().join(", ");
    client
        .simple_query(&format!(
            "INSERT INTO pgbench_branches (bid, bbalance) VALUES {}",
            values(1..scale + 1, &|bid| format!("({bid}, 0)"))
        ))
        .await
        .map_err(fail)?;
    client
        .simple_query(&format!(
            "INSERT INTO pgbench_tellers (tid, bid, tbalance) VALUES {}",
            values(1..scale * TELLERS_PER_BRANCH + 1, &|tid| format!(
                "({tid}, {}, 0)",
                (tid - 1) / TELLERS_PER_BRANCH + 1
            ))
        ))
        .await
        .map_err(fail)?;
    let bar = ProgressBar::new(accounts);
    bar.set_style(ProgressStyle::with_template("accounts [{bar:30}] {pos}/{len} {per_sec}").expect("valid template"));
    let filler = " ".repeat(84);
    let mut first = 1;
    while first <= accounts {
        let mut batch = String::from("BEGIN;");
        for _ in 0..INSERTS_PER_TRANSACTION {
            if first > accounts {
                break;
            }
            let last = (first + INSERT_ROWS).min(accounts + 1);
            batch.push_str("INSERT INTO pgbench_accounts (aid, bid, abalance, filler) VALUES ");
            batch.push_str(&values(first..last, &|aid| {
                format!("({aid}, {}, 0, '{filler}')", (aid - 1) / ACCOUNTS_PER_BRANCH + 1)
            }));
            batch.push(';');
            first = last;
        }
        batch.push_str("COMMIT");
        client.simple_query(&batch).await.map_err(fail)?;
        bar.set_position(first - 1);
    }
    bar.finish_and_clear();
    println!(
        "pgbench tables at scale {scale}: {scale} branches, {} tellers, {accounts} accounts",
        scale * TELLERS_PER_BRANCH
    );
    Ok(())
}
