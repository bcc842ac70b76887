//! `lab bench pgbench`: the same pgbench workload against (a) this kit,
//! (b) PostgreSQL 15 with five streaming standbys and
//! `synchronous_standby_names = 'ANY 3 (s1,...,s5)'` (each commit on 4 of 6
//! copies, as the kit's), and (c) PostgreSQL with no synchronous standby.
//!
//! Everything runs on this machine, in a temporary directory: the kit as
//! `lab up` runs it (in process), the PostgreSQL servers as processes of
//! the `postgres` user when run as root (`initdb` refuses root). Each system
//! gets the same tables (scale `--scale`; the kit's filled by
//! `lab sql init-pgbench`, PostgreSQL's by `pgbench -i`) and the same
//! `pgbench -n -c C -T D -M MODE -l` run. Reported per system: tps (from
//! pgbench), average and p99 latency (from the per-transaction `-l` log),
//! and bytes sent over loopback per transaction (`/proc/net/dev`, interface
//! `lo`: the client's traffic plus replication or storage traffic; on one
//! machine that is all of it).

use anyhow::{Context, Result, bail, ensure};
use clap::Args;
use db_frontend::sql::server::ServerConfig;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::bench::report::{new_histogram, render_table};
use crate::sql::{Connection, Serving, UpOptions};

/// Where Debian puts the PostgreSQL 15 programs.
const POSTGRES_BIN: &str = "/usr/lib/postgresql/15/bin";
/// Standbys of setup (b).
const STANDBYS: usize = 5;
/// How long the standbys get to connect and become synchronous candidates.
const STANDBYS_READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Options of `lab bench pgbench`.
#[derive(Clone, Debug, Args, Serialize)]
pub struct PgbenchOptions {
    /// pgbench clients (-c).
    #[arg(long, default_value_t = 4)]
    pub clients: usize,
    /// Seconds each system runs (-T).
    #[arg(long, default_value_t = 30)]
    pub duration: u64,
    /// pgbench scale (100,000 accounts each).
    #[arg(long, default_value_t = 1)]
    pub scale: u32,
    /// Query protocol (-M): simple or extended.
    #[arg(long, default_value = "simple")]
    pub mode: String,
    /// Extra pgbench flags, e.g. "-N" or "-S".
    #[arg(long, default_value = "", allow_hyphen_values = true)]
    pub pgbench_flags: String,
    /// First port used (the kit; PostgreSQL takes the next seven).
    #[arg(long, default_value_t = 25433)]
    pub port: u16,
    /// Write the report as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// One system's figures.
#[derive(Clone, Debug, Serialize)]
pub struct SystemResult {
    pub system: String,
    pub transactions: u64,
    pub tps: f64,
    pub latency_avg_ms: f64,
    pub latency_p99_ms: f64,
    pub loopback_bytes_per_transaction: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct PgbenchReport {
    pub options: PgbenchOptions,
    pub results: Vec<SystemResult>,
    /// (a) tps / (b) tps; the bar is 3 or more.
    pub kit_tps_over_sync: f64,
    /// (a) bytes / (b) bytes per transaction; the bar is 0.5 or less.
    pub kit_bytes_over_sync: f64,
}

fn program(name: &str) -> PathBuf {
    let debian = Path::new(POSTGRES_BIN).join(name);
    if debian.exists() { debian } else { PathBuf::from(name) }
}

fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions and touches no memory of ours.
    unsafe { libc::geteuid() == 0 }
}

/// A PostgreSQL server program, as `postgres` when we are root.
fn postgres_command(name: &str) -> Command {
    if running_as_root() {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(program(name));
        command
    } else {
        Command::new(program(name))
    }
}

fn run(mut command: Command, what: &str) -> Result<String> {
    let output = command.stdin(Stdio::null()).output().with_context(|| format!("starting {what}"))?;
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    ensure!(output.status.success(), "{what} failed: {}", text.trim());
    Ok(text)
}

/// Bytes sent on the loopback interface so far.
fn loopback_sent_bytes() -> Result<u64> {
    let text = std::fs::read_to_string("/proc/net/dev").context("reading /proc/net/dev")?;
    for line in text.lines() {
        if let Some(rest) = line.trim().strip_prefix("lo:") {
            let fields: Vec<&str> = rest.split_whitespace().collect();
            return fields.get(8).context("lo's transmit bytes")?.parse().context("lo's transmit bytes");
        }
    }
    bail!("no loopback interface in /proc/net/dev")
}

/// Runs pgbench against `port` and reads its output and per-transaction log.
fn pgbench(
    options: &PgbenchOptions,
    system: &str,
    port: u16,
    directory: &Path,
    password: Option<&str>,
) -> Result<SystemResult> {
    let logs = directory.join(format!("log-{port}"));
    std::fs::create_dir_all(&logs)?;
    let mut command = Command::new(program("pgbench"));
    command
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", if password.is_some() { "lab" } else { "postgres" }])
        .args(["-n", "-c", &options.clients.to_string(), "-j", &options.clients.min(2).to_string()])
        .args(["-T", &options.duration.to_string(), "-M", &options.mode, "-l", "--log-prefix"])
        .arg(logs.join("pgbench"))
        .args(options.pgbench_flags.split_whitespace())
        .arg(if password.is_some() { "lab" } else { "postgres" });
    if let Some(password) = password {
        command.env("PGPASSWORD", password);
    }
    eprintln!("pgbench: {system}: {} clients for {} s ...", options.clients, options.duration);
    let sent_before = loopback_sent_bytes()?;
    let output = run(command, &format!("pgbench against {system}"))?;
    let sent = loopback_sent_bytes()? - sent_before;
    let tps = output
        .lines()
        .find_map(|line| line.strip_prefix("tps = ")?.split_whitespace().next()?.parse::<f64>().ok())
        .with_context(|| format!("no tps in pgbench's output: {output}"))?;
    let mut latencies = new_histogram();
    let mut total_us = 0u64;
    for entry in std::fs::read_dir(&logs)? {
        for line in std::fs::read_to_string(entry?.path())?.lines() {
            // client_id transaction_no time_us script_no epoch epoch_us
            if let Some(micros) = line.split_whitespace().nth(2).and_then(|field| field.parse::<u64>().ok()) {
                let _ = latencies.record(micros.max(1));
                total_us += micros;
            }
        }
    }
    let transactions = latencies.len();
    ensure!(transactions > 0, "pgbench against {system} logged no transaction");
    Ok(SystemResult {
        system: system.to_string(),
        transactions,
        tps,
        latency_avg_ms: total_us as f64 / transactions as f64 / 1000.0,
        latency_p99_ms: latencies.value_at_quantile(0.99) as f64 / 1000.0,
        loopback_bytes_per_transaction: sent as f64 / transactions as f64,
    })
}

/// A PostgreSQL data directory and the server running on it.
struct PostgresServer {
    data: PathBuf,
    port: u16,
}

impl PostgresServer {
    fn start(&self) -> Result<()> {
        let mut command = postgres_command("pg_ctl");
        command
            .arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(self.data.with_extension("log"))
            .args(["-w", "-t", "60", "start"]);
        run(command, &format!("PostgreSQL on port {}", self.port)).map(|_| ())
    }

    fn stop(&self) {
        let mut command = postgres_command("pg_ctl");
        command.arg("-D").arg(&self.data).args(["-m", "fast", "-w", "stop"]);
        if let Err(error) = run(command, "pg_ctl stop") {
            tracing::warn!(%error, port = self.port, "stopping PostgreSQL");
        }
    }

    fn psql(&self, sql: &str) -> Result<String> {
        let mut command = Command::new(program("psql"));
        command.args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "postgres", "-At", "-c", sql, "postgres"]);
        run(command, &format!("psql -c {sql}"))
    }
}

/// Writes `settings` at the end of one of the server's configuration files
/// (the last setting of a name wins).
fn configure(data: &Path, file: &str, settings: &str) -> Result<()> {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new().append(true).open(data.join(file))?;
    writeln!(file, "{settings}")?;
    Ok(())
}

/// Runs (b) then (c) on one primary: its five standbys, then none.
fn run_postgres(options: &PgbenchOptions, directory: &Path) -> Result<(SystemResult, SystemResult)> {
    let primary = PostgresServer { data: directory.join("primary"), port: options.port + 1 };
    let mut command = postgres_command("initdb");
    command.arg("-D").arg(&primary.data).args(["-U", "postgres", "--auth=trust", "--no-sync"]);
    run(command, "initdb")?;
    let socket = directory.display();
    configure(
        &primary.data,
        "postgresql.conf",
        &format!(
            "port = {}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{socket}'\nwal_level = replica\n\
             max_wal_senders = 10\nsynchronous_commit = on\nshared_buffers = 256MB\nmax_connections = 50",
            primary.port
        ),
    )?;
    let hba = primary.data.join("pg_hba.conf");
    let mut rules = std::fs::read_to_string(&hba)?;
    rules.push_str("\nhost replication all 127.0.0.1/32 trust\n");
    std::fs::write(&hba, rules)?;
    primary.start()?;
    let mut standbys: Vec<PostgresServer> = Vec::new();
    let result = (|| -> Result<(SystemResult, SystemResult)> {
        let mut init = Command::new(program("pgbench"));
        init.args(["-h", "127.0.0.1", "-p", &primary.port.to_string(), "-U", "postgres", "-i", "-q"]).args([
            "-s",
            &options.scale.to_string(),
            "postgres",
        ]);
        run(init, "pgbench -i")?;
        for index in 1..=STANDBYS {
            let standby =
                PostgresServer { data: directory.join(format!("s{index}")), port: options.port + 1 + index as u16 };
            let mut backup = postgres_command("pg_basebackup");
            backup
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &primary.port.to_string(),
                    "-U",
                    "postgres",
                    "-R",
                    "-X",
                    "stream",
                    "-D",
                ])
                .arg(&standby.data);
            run(backup, "pg_basebackup")?;
            configure(&standby.data, "postgresql.conf", &format!("port = {}", standby.port))?;
            // pg_basebackup -R wrote a primary_conninfo into the auto file,
            // which is read last: the standby's name goes there.
            configure(
                &standby.data,
                "postgresql.auto.conf",
                &format!(
                    "primary_conninfo = 'host=127.0.0.1 port={} user=postgres application_name=s{index}'",
                    primary.port
                ),
            )?;
            standby.start()?;
            standbys.push(standby);
        }
        primary.psql("ALTER SYSTEM SET synchronous_standby_names = 'ANY 3 (s1,s2,s3,s4,s5)'")?;
        primary.psql("SELECT pg_reload_conf()")?;
        let deadline = Instant::now() + STANDBYS_READY_TIMEOUT;
        loop {
            let quorum = primary.psql("SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'quorum'")?;
            if quorum.trim() == STANDBYS.to_string() {
                break;
            }
            ensure!(Instant::now() < deadline, "the standbys did not become quorum candidates: {}", quorum.trim());
            std::thread::sleep(Duration::from_millis(200));
        }
        let synchronous = pgbench(options, "(b) PostgreSQL, ANY 3 of 5 standbys", primary.port, directory, None)?;
        for standby in standbys.drain(..) {
            standby.stop();
        }
        primary.psql("ALTER SYSTEM SET synchronous_standby_names = ''")?;
        primary.psql("SELECT pg_reload_conf()")?;
        let alone = pgbench(options, "(c) PostgreSQL, no synchronous standby", primary.port, directory, None)?;
        Ok((synchronous, alone))
    })();
    for standby in &standbys {
        standby.stop();
    }
    primary.stop();
    result
}

pub async fn run_bench(options: PgbenchOptions) -> Result<PgbenchReport> {
    ensure!(
        options.clients > 0 && options.duration > 0 && options.scale > 0,
        "--clients, --duration and --scale must be above 0"
    );
    ensure!(options.mode == "simple" || options.mode == "extended", "--mode is simple or extended");
    let directory = tempfile::Builder::new().prefix("lab-pgbench-").tempdir()?;
    if running_as_root() {
        run(
            {
                let mut command = Command::new("chown");
                command.args(["-R", "postgres:postgres"]).arg(directory.path());
                command
            },
            "chown the bench directory to postgres",
        )?;
    }
    // (a) the kit.
    let password = "pgbench";
    let up = UpOptions {
        port: options.port,
        replicas: 0,
        user: "lab".into(),
        password: Some(password.into()),
        trust: false,
        data_dir: None,
        cache_pages: db_frontend::engine::CACHE_PAGES_DEFAULT,
        backend: storage_node::DiskBackend::Std,
    };
    let serving = Serving::start(&up, ServerConfig::scram("lab", password)).await?;
    let connection = Connection {
        host: "127.0.0.1".into(),
        port: serving.writer.address.port(),
        user: "lab".into(),
        password: Some(password.into()),
    };
    eprintln!("pgbench: (a) this kit: loading scale {} ...", options.scale);
    crate::sql::init_pgbench(&connection, options.scale).await?;
    let kit = {
        let (options, directory, port) = (options.clone(), directory.path().to_path_buf(), connection.port);
        tokio::task::spawn_blocking(move || {
            pgbench(&options, "(a) this kit, 6 storage nodes", port, &directory, Some(password))
        })
        .await??
    };
    serving.stop().await?;
    let (synchronous, alone) = {
        let (options, directory) = (options.clone(), directory.path().to_path_buf());
        tokio::task::spawn_blocking(move || run_postgres(&options, &directory)).await??
    };
    let report = PgbenchReport {
        kit_tps_over_sync: kit.tps / synchronous.tps,
        kit_bytes_over_sync: kit.loopback_bytes_per_transaction / synchronous.loopback_bytes_per_transaction,
        results: vec![kit, synchronous, alone],
        options,
    };
    if let Some(path) = &report.options.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(report)
}

pub fn render(report: &PgbenchReport) -> String {
    let rows: Vec<Vec<String>> = report
        .results
        .iter()
        .map(|result| {
            vec![
                result.system.clone(),
                result.transactions.to_string(),
                format!("{:.0}", result.tps),
                format!("{:.2}", result.latency_avg_ms),
                format!("{:.2}", result.latency_p99_ms),
                format!("{:.0}", result.loopback_bytes_per_transaction),
            ]
        })
        .collect();
    format!(
        "lab bench pgbench ({} clients, {} s, scale {}, -M {} {})\n\n{}\n\n(a)/(b) tps: {:.2}x (bar: 3x or more)   (a)/(b) bytes per transaction: {:.2}x (bar: 0.5x or less)",
        report.options.clients,
        report.options.duration,
        report.options.scale,
        report.options.mode,
        report.options.pgbench_flags,
        render_table(&["system", "transactions", "tps", "avg ms", "p99 ms", "loopback bytes/txn"], &rows),
        report.kit_tps_over_sync,
        report.kit_bytes_over_sync,
    )
}
