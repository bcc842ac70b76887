//! `lab bench locks`: what the lock service costs, against a loopback round
//! trip measured in the same run.
//!
//! One `LockServer` and its `Clerk`s run in this process over loopback TCP
//! (`TcpTransport`). The workstation's flush is a no-op, so the revoke
//! figure is pure protocol. Measured:
//! - **cached acquire**: a lock the clerk already holds (sticky): no message;
//! - **cold acquire**: a lock nobody holds: `Request` then `Grant`;
//! - **revoke ping-pong**: two clerks take turns on one exclusive lock; each
//!   acquire is `Request`, `Revoke`, flush, `Release`, `Grant`;
//! - **throughput**: N clerks taking fresh locks (disjoint) for a while;
//! - **memory**: heap bytes per lock and per clerk on the server, and per
//!   lock on a clerk, counted by the process's allocator while a pure
//!   `LockServerCore` / `ClerkCore` takes on many of them.
//!
//! The same loops then run against etcd (see [`super::etcd`]) if an `etcd`
//! binary is installed: lock then unlock, on fresh names, on one name, and
//! alternating between two clients on one name (etcd has no sticky locks,
//! so its "cached" and "ping-pong" loops pay a full lock each time).

use super::baselines::loopback_round_trip;
use super::etcd::{Etcd, EtcdClient};
use super::report::{ratio, render_table};
use crate::alloc_count::Counting;
use anyhow::{Context, Result, bail};
use clap::Args;
use common::transport::{BoxFuture, TcpTransport, Transport};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use lockserver::protocol::{ClerkId, LeaseEpoch, LockName, Mode, ToServer};
use lockserver::{Clerk, ClerkConfig, ClerkCore, Fencer, LockServer, LockServerCore, ServerConfig, Workstation};
use serde::Serialize;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const ITERATIONS_MAX: u64 = 10_000_000;
const CLERKS_MAX: u64 = 64;
/// Locks and clerks the memory figures are averaged over.
const MEMORY_LOCKS: u64 = 100_000;
const MEMORY_CLERKS: u64 = 10_000;
/// How long one acquire may wait before the benchmark gives up.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);
/// etcd fsyncs every lock: its loops are capped at this many locks.
const ETCD_ITERATIONS_MAX: u64 = 1_000;

#[derive(Debug, Args, Serialize)]
pub struct LocksOptions {
    /// Acquires per latency measurement
    #[arg(long, default_value_t = 5_000)]
    pub iterations: u64,
    /// Clerks in the throughput run, each on its own locks
    #[arg(long, default_value_t = 4)]
    pub clerks: u64,
    /// Seconds of the throughput run
    #[arg(long, default_value_t = 3.0)]
    pub duration: f64,
    /// Write the results as JSON to this file
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// One latency measurement, in nanoseconds.
#[derive(Debug, Serialize)]
pub struct LatencyRow {
    pub name: String,
    pub count: u64,
    pub p50_ns: u64,
    pub p99_ns: u64,
    pub mean_ns: f64,
    /// p50 as loopback round trips.
    pub p50_round_trips: f64,
    /// The same loop against etcd, if it ran.
    pub etcd_p50_ns: Option<u64>,
    pub etcd_p99_ns: Option<u64>,
}

#[derive(Debug, Serialize)]
pub struct LocksReport {
    pub options: LocksOptions,
    pub loopback_round_trip_p50_ns: u64,
    pub latencies: Vec<LatencyRow>,
    pub throughput_acquires_per_s: f64,
    pub etcd_throughput_locks_per_s: Option<f64>,
    pub server_bytes_per_lock: f64,
    pub server_bytes_per_clerk: f64,
    pub clerk_bytes_per_lock: f64,
}

#[derive(Debug)]
struct NoStorage;

impl Fencer for NoStorage {
    fn fence(&self, _epoch: LeaseEpoch) -> BoxFuture<'static, ()> {
        Box::pin(async {})
    }
}

#[derive(Debug)]
struct CleanWorkstation;

impl Workstation for CleanWorkstation {
    fn flush(&self, _lock: LockName, _keep: Option<Mode>) -> BoxFuture<'static, ()> {
        Box::pin(async {})
    }
    fn recover(&self, _dead: LeaseEpoch, _dead_clerk: ClerkId) -> BoxFuture<'static, ()> {
        Box::pin(async {})
    }
    fn lease_lost(&self) {}
}

fn nanosecond_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid histogram bounds")
}

async fn connect(server: &LockServer, id: u64) -> Result<Clerk> {
    let transport: Arc<dyn Transport> = Arc::new(TcpTransport::with_direct_writes());
    Clerk::connect(
        ClerkId(id),
        ClerkConfig::default(),
        transport,
        server.local_address().to_string(),
        Arc::new(CleanWorkstation),
        Duration::from_secs(5),
    )
    .await
    .with_context(|| format!("clerk {id} could not get a lease"))
}

async fn timed_acquire(clerk: &Clerk, lock: LockName, histogram: &mut Histogram<u64>) -> Result<()> {
    let started = Instant::now();
    let guard = clerk.acquire(lock, Mode::Exclusive, ACQUIRE_TIMEOUT).await?;
    histogram.saturating_record(started.elapsed().as_nanos() as u64);
    drop(guard);
    Ok(())
}

pub async fn run(options: LocksOptions) -> Result<LocksReport> {
    if options.iterations == 0 || options.iterations > ITERATIONS_MAX {
        bail!("--iterations must be between 1 and {ITERATIONS_MAX}, not {}", options.iterations);
    }
    if options.clerks == 0 || options.clerks > CLERKS_MAX {
        bail!("--clerks must be between 1 and {CLERKS_MAX}, not {}", options.clerks);
    }
    if !(options.duration > 0.0 && options.duration <= 600.0) {
        bail!("--duration must be above 0 and at most 600 seconds, not {}", options.duration);
    }
    let bar = ProgressBar::new(7);
    bar.set_style(ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}")?);
    // First, while nothing else runs: the counter is process-wide.
    bar.set_message("memory");
    let (server_bytes_per_lock, server_bytes_per_clerk, clerk_bytes_per_lock) = measure_memory();
    bar.inc(1);
    bar.set_message("loopback round trip");
    let loopback = tokio::task::spawn_blocking(loopback_round_trip).await??;
    let loopback_p50_ns = loopback.value_at_quantile(0.5) * 1000;
    bar.inc(1);

    let transport: Arc<dyn Transport> = Arc::new(TcpTransport::with_direct_writes());
    let server =
        LockServer::start(ServerConfig::default(), transport, "127.0.0.1:0".into(), Arc::new(NoStorage)).await?;
    let a = connect(&server, 1).await?;
    let b = connect(&server, 2).await?;

    bar.set_message("cold acquires");
    let mut cold = nanosecond_histogram();
    for id in 0..options.iterations {
        timed_acquire(&a, LockName { table: 1, id }, &mut cold).await?;
    }
    bar.inc(1);

    bar.set_message("cached acquires");
    let mut cached = nanosecond_histogram();
    let sticky = LockName { table: 1, id: 0 };
    for _ in 0..options.iterations {
        timed_acquire(&a, sticky, &mut cached).await?;
    }
    bar.inc(1);

    bar.set_message("revoke ping-pong");
    let mut ping_pong = nanosecond_histogram();
    let contended = LockName { table: 2, id: 0 };
    for round in 0..options.iterations {
        let clerk = if round % 2 == 0 { &b } else { &a };
        timed_acquire(clerk, contended, &mut ping_pong).await?;
    }
    bar.inc(1);

    bar.set_message("throughput");
    let throughput = measure_throughput(&server, &options).await?;
    bar.inc(1);

    bar.set_message("etcd");
    let etcd_iterations = options.iterations.min(ETCD_ITERATIONS_MAX);
    let (etcd_clerks, etcd_duration) = (options.clerks, Duration::from_secs_f64(options.duration));
    let etcd = tokio::task::spawn_blocking(move || measure_etcd(etcd_iterations, etcd_clerks, etcd_duration)).await??;
    bar.finish_and_clear();

    let row = |name: &str, histogram: &Histogram<u64>, etcd: Option<&Histogram<u64>>| LatencyRow {
        name: name.to_string(),
        count: histogram.len(),
        p50_ns: histogram.value_at_quantile(0.5),
        p99_ns: histogram.value_at_quantile(0.99),
        mean_ns: histogram.mean(),
        p50_round_trips: ratio(histogram.value_at_quantile(0.5) as f64, loopback_p50_ns as f64),
        etcd_p50_ns: etcd.map(|histogram| histogram.value_at_quantile(0.5)),
        etcd_p99_ns: etcd.map(|histogram| histogram.value_at_quantile(0.99)),
    };
    let report = LocksReport {
        loopback_round_trip_p50_ns: loopback_p50_ns,
        latencies: vec![
            row("cached acquire (sticky)", &cached, etcd.as_ref().map(|etcd| &etcd.cached)),
            row("cold acquire", &cold, etcd.as_ref().map(|etcd| &etcd.cold)),
            row("revoke ping-pong acquire", &ping_pong, etcd.as_ref().map(|etcd| &etcd.ping_pong)),
        ],
        throughput_acquires_per_s: throughput,
        etcd_throughput_locks_per_s: etcd.as_ref().map(|etcd| etcd.throughput),
        server_bytes_per_lock,
        server_bytes_per_clerk,
        clerk_bytes_per_lock,
        options,
    };
    if let Some(path) = &report.options.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(report)
}

/// Clerks taking fresh locks of their own, in parallel, for the duration.
async fn measure_throughput(server: &LockServer, options: &LocksOptions) -> Result<f64> {
    let mut clerks = Vec::new();
    for index in 0..options.clerks {
        clerks.push(Arc::new(connect(server, 100 + index).await?));
    }
    let acquired = Arc::new(AtomicU64::new(0));
    let duration = Duration::from_secs_f64(options.duration);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (index, clerk) in clerks.iter().enumerate() {
        let (clerk, acquired) = (clerk.clone(), acquired.clone());
        tasks.push(tokio::spawn(async move {
            let mut id = 0;
            while started.elapsed() < duration {
                let lock = LockName { table: 10 + index as u32, id };
                drop(clerk.acquire(lock, Mode::Exclusive, ACQUIRE_TIMEOUT).await?);
                acquired.fetch_add(1, Ordering::Relaxed);
                id += 1;
            }
            Ok::<_, lockserver::ClerkError>(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(acquired.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64())
}

/// etcd's lock latencies for the same three loops, and its throughput.
struct EtcdFigures {
    cold: Histogram<u64>,
    cached: Histogram<u64>,
    ping_pong: Histogram<u64>,
    throughput: f64,
}

fn timed_etcd_lock(client: &mut EtcdClient, name: &str, histogram: &mut Histogram<u64>) -> Result<()> {
    let started = Instant::now();
    let key = client.lock(name)?;
    histogram.saturating_record(started.elapsed().as_nanos() as u64);
    client.unlock(&key)
}

/// `None` when there is no etcd on this machine.
fn measure_etcd(iterations: u64, clients: u64, duration: Duration) -> Result<Option<EtcdFigures>> {
    let directory = tempfile::tempdir()?;
    let Some(etcd) = Etcd::start(directory.path())? else { return Ok(None) };
    let port = etcd.client_port;
    let (mut a, mut b) = (EtcdClient::with_lease(port)?, EtcdClient::with_lease(port)?);
    let mut figures = EtcdFigures {
        cold: nanosecond_histogram(),
        cached: nanosecond_histogram(),
        ping_pong: nanosecond_histogram(),
        throughput: 0.0,
    };
    for id in 0..iterations {
        timed_etcd_lock(&mut a, &format!("cold/{id}"), &mut figures.cold)?;
    }
    for _ in 0..iterations {
        timed_etcd_lock(&mut a, "sticky", &mut figures.cached)?;
    }
    for round in 0..iterations {
        let client = if round % 2 == 0 { &mut b } else { &mut a };
        timed_etcd_lock(client, "contended", &mut figures.ping_pong)?;
    }
    let started = Instant::now();
    let threads: Vec<_> = (0..clients)
        .map(|index| {
            std::thread::spawn(move || -> Result<u64> {
                let mut client = EtcdClient::with_lease(port)?;
                let mut locked = 0;
                while started.elapsed() < duration {
                    let key = client.lock(&format!("throughput/{index}/{locked}"))?;
                    client.unlock(&key)?;
                    locked += 1;
                }
                Ok(locked)
            })
        })
        .collect();
    let mut locked = 0;
    for thread in threads {
        locked += thread.join().map_err(|_| anyhow::anyhow!("an etcd client thread panicked"))??;
    }
    figures.throughput = locked as f64 / started.elapsed().as_secs_f64();
    drop(etcd);
    Ok(Some(figures))
}

/// Heap bytes per lock and per clerk of the pure cores (no I/O buffers).
fn measure_memory() -> (f64, f64, f64) {
    let per = |bytes: i64, count: u64| bytes as f64 / count as f64;
    let counting = Counting::start();
    let mut server = LockServerCore::new(ServerConfig::default());
    for clerk in 0..MEMORY_CLERKS {
        server.handle(ClerkId(clerk), ToServer::OpenLease { clerk: ClerkId(clerk), attempt: 1 }, 0);
    }
    let per_clerk = per(counting.bytes(), MEMORY_CLERKS);
    let before_locks = counting.bytes();
    let epoch = server.live_lease(ClerkId(0)).expect("clerk 0 has a lease");
    for id in 0..MEMORY_LOCKS {
        let lock = LockName { table: 1, id };
        server.handle(ClerkId(0), ToServer::Request { epoch, lock, mode: Mode::Exclusive }, 0);
    }
    let server_per_lock = per(counting.bytes() - before_locks, MEMORY_LOCKS);
    drop(server);
    let before_clerk = counting.bytes();
    let (mut clerk, _) = ClerkCore::new(ClerkId(0), ClerkConfig::default(), 1, 0);
    clerk.on_message(
        lockserver::protocol::ToClerk::LeaseGranted { attempt: 1, epoch: LeaseEpoch(1), duration_micros: 30_000_000 },
        0,
    );
    for id in 0..MEMORY_LOCKS {
        let lock = LockName { table: 1, id };
        clerk.acquire(lock, Mode::Exclusive, 1);
        clerk.on_message(
            lockserver::protocol::ToClerk::Grant {
                epoch: LeaseEpoch(1),
                lock,
                mode: Mode::Exclusive,
                token: lockserver::protocol::FencingToken(1),
            },
            1,
        );
    }
    let clerk_per_lock = per(counting.bytes() - before_clerk, MEMORY_LOCKS);
    drop(clerk);
    (server_per_lock, per_clerk, clerk_per_lock)
}

pub fn render(report: &LocksReport) -> String {
    let headers = ["measurement", "p50 ns", "p99 ns", "mean ns", "p50 in RTTs", "target", "etcd p50 ns", "etcd p99 ns"];
    let targets = ["< 1 µs", "≤ 2 RTT", "≤ 3 RTT + flush"];
    let rows: Vec<Vec<String>> = report
        .latencies
        .iter()
        .zip(targets)
        .map(|(row, target)| {
            vec![
                row.name.clone(),
                row.p50_ns.to_string(),
                row.p99_ns.to_string(),
                format!("{:.0}", row.mean_ns),
                format!("{:.2}", row.p50_round_trips),
                target.to_string(),
                row.etcd_p50_ns.map_or("-".to_string(), |ns| ns.to_string()),
                row.etcd_p99_ns.map_or("-".to_string(), |ns| ns.to_string()),
            ]
        })
        .collect();
    let mut text = format!(
        "loopback TCP round trip (kernel) p50: {} ns\n\n{}",
        report.loopback_round_trip_p50_ns,
        render_table(&headers, &rows)
    );
    let etcd_throughput = match report.etcd_throughput_locks_per_s {
        Some(locks) => format!("{locks:.0} locks/s"),
        None => "not measured: no etcd binary (Debian: apt install etcd-server)".to_string(),
    };
    text.push_str(&format!(
        "\n\nthroughput: {:.0} acquires/s ({} clerks, each taking fresh locks of its own); etcd: {etcd_throughput}\n\
         server memory: {:.0} B per lock, {:.0} B per clerk (F97: 112 B and 104 B)\n\
         clerk memory: {:.0} B per lock (F97: 232 B)\n\
         etcd runs with its defaults: each lock and unlock is fsync'ed to its WAL; the kit's lock\n\
         server keeps locks in memory and saves only its lease registry (clerks reclaim their locks\n\
         after a restart, F97's first design), so the columns compare designs too.",
        report.throughput_acquires_per_s,
        report.options.clerks,
        report.server_bytes_per_lock,
        report.server_bytes_per_clerk,
        report.clerk_bytes_per_lock
    ));
    text
}
