//! `lab bench replica-lag`: how far read replicas trail the writer.
//!
//! A six-node loopback cluster, the SQL engine's storage (`AuroraKv`) as
//! the writer, and up to 15 read replicas (`ReplicaKv`), each with a
//! reader doing point lookups. For each target rate, writer tasks commit
//! one-row transactions (a 100-byte value under a random key) at that
//! rate, paced; every replica records, per commit, the time from the
//! writer acknowledging it (durable) to the replica showing it, and from
//! the writer logging its commit record (which adds the wait for
//! durability). The report gives the
//! achieved rate and the worst replica's p50, p99 and max lag, against
//! the bars of A17 Table 4's order (5 ms at 1,000 writes/s, 10 ms at
//! 10,000).

use anyhow::{Context, Result, bail};
use clap::Args;
use common::rng::SimRng;
use common::transport::TcpTransport;
use db_frontend::engine::replica::{REPLICAS_MAX, ReplicaKv};
use db_frontend::engine::{AuroraKv, CACHE_PAGES_DEFAULT};
use db_frontend::sql::kv::{KvStore, KvTxn, TreeId};
use serde::Serialize;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use storage_node::DiskBackend;

use crate::bench::report::{LatencySummary, new_histogram, render_table};
use crate::cluster::{ClusterOptions, LocalCluster};

/// Keys the load writes over (and the readers look up).
const KEYS: u64 = 10_000;
/// A run counts only if it reached this fraction of its target rate.
const RATE_REACHED_FRACTION: f64 = 0.9;
/// Bytes of each value written.
const VALUE_BYTES: usize = 100;

/// Options of `lab bench replica-lag`.
#[derive(Clone, Debug, Args, Serialize)]
pub struct ReplicaLagOptions {
    /// Target writes (one-row committed transactions) per second, one run each.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    pub rates: Vec<u64>,
    /// Seconds of load per rate.
    #[arg(long, default_value_t = 5.0)]
    pub duration: f64,
    /// Read replicas (1 to 15).
    #[arg(long, default_value_t = 1)]
    pub replicas: usize,
    /// Concurrent writer tasks sharing the rate (their commits share group
    /// commit). Each owns every N-th slot of the schedule and skips a slot
    /// it is late for, so N must leave each commit room: with 16, a slot
    /// every 1.6 ms at 10,000/s, commits slower than that (p99 is a few ms)
    /// lose slots and the rate is missed with the engine not busy.
    #[arg(long, default_value_t = 64)]
    pub writers: usize,
    /// Write the report as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// One rate's result.
#[derive(Clone, Debug, Serialize)]
pub struct RateResult {
    pub target_writes_per_s: u64,
    pub achieved_writes_per_s: f64,
    pub transactions_shown: usize,
    /// The worst replica's, from the commit's acknowledgement on the writer.
    pub lag_p50_ms: f64,
    pub lag_p99_ms: f64,
    pub lag_max_ms: f64,
    /// The worst replica's, from the commit record's logging (adds the wait for durability).
    pub logged_lag_p99_ms: f64,
    /// The writers' commit latency (begin to durable), for comparison.
    pub commit: LatencySummary,
    /// The bar for this rate (5 ms up to 1,000 writes/s, 10 ms above).
    pub bar_p99_ms: f64,
    /// p99 under the bar, at 90% or more of the target rate.
    pub holds: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct ReplicaLagReport {
    pub options: ReplicaLagOptions,
    pub results: Vec<RateResult>,
}

/// The p99 bar for `rate`.
fn bar_for(rate: u64) -> f64 {
    if rate <= 1000 { 5.0 } else { 10.0 }
}

pub async fn run(options: ReplicaLagOptions) -> Result<ReplicaLagReport> {
    if options.replicas == 0 || options.replicas > REPLICAS_MAX {
        bail!("--replicas must be 1 to {REPLICAS_MAX}, not {}", options.replicas);
    }
    if options.rates.is_empty() || options.rates.contains(&0) {
        bail!("--rates needs at least one rate, each above 0");
    }
    if options.writers == 0 || options.duration.is_nan() || options.duration <= 0.0 {
        bail!("--writers and --duration must be above 0");
    }
    let directory = tempfile::tempdir().context("a temporary data directory")?;
    let cluster = LocalCluster::start(&ClusterOptions::new(directory.path(), DiskBackend::Std)).await?;
    let volume = Arc::new(cluster.open_volume(Arc::new(TcpTransport::new())).await?);
    let (store, _) = AuroraKv::open(volume.clone(), CACHE_PAGES_DEFAULT).await?;
    let tree = load_keys(&store).await?;
    let mut replicas = Vec::new();
    let stop_readers = Arc::new(AtomicBool::new(false));
    let mut readers = Vec::new();
    for index in 0..options.replicas {
        let replica = ReplicaKv::start(&store, CACHE_PAGES_DEFAULT).await?;
        readers.push(tokio::spawn(read_forever(replica.clone(), tree, index as u64, stop_readers.clone())));
        replicas.push(replica);
    }
    let mut results = Vec::new();
    for &rate in &options.rates {
        eprintln!("replica-lag: {rate} writes/s for {} s, {} replica(s) ...", options.duration, options.replicas);
        for replica in &replicas {
            replica.reset_lag();
        }
        let (achieved, commit) =
            write_at(&store, tree, rate, options.writers, Duration::from_secs_f64(options.duration)).await?;
        tokio::time::sleep(Duration::from_millis(200)).await; // the last ends reach the replicas
        let lags: Vec<_> = replicas.iter().map(ReplicaKv::lag).collect();
        let worst =
            |pick: fn(&db_frontend::engine::replica::LagReport) -> f64| lags.iter().map(pick).fold(0.0, f64::max);
        let lag_p99_ms = worst(|lag| lag.p99_ms);
        results.push(RateResult {
            target_writes_per_s: rate,
            achieved_writes_per_s: achieved,
            transactions_shown: lags.iter().map(|lag| lag.commits).min().unwrap_or(0),
            lag_p50_ms: worst(|lag| lag.p50_ms),
            lag_p99_ms,
            lag_max_ms: worst(|lag| lag.max_ms),
            logged_lag_p99_ms: worst(|lag| lag.logged_p99_ms),
            commit,
            bar_p99_ms: bar_for(rate),
            holds: lag_p99_ms < bar_for(rate) && achieved >= RATE_REACHED_FRACTION * rate as f64,
        });
    }
    stop_readers.store(true, Ordering::Relaxed);
    for reader in readers {
        reader.await?;
    }
    for replica in &replicas {
        replica.stop().await;
    }
    volume.close();
    let report = ReplicaLagReport { options, results };
    if let Some(path) = &report.options.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(report)
}

/// Creates the tree and writes every key once.
async fn load_keys(store: &AuroraKv) -> Result<TreeId> {
    let mut txn = store.begin().await?;
    let tree = txn.create_tree().await?;
    for key in 0..KEYS {
        txn.put(tree, &key.to_be_bytes(), &[0; VALUE_BYTES]).await?;
    }
    txn.commit().await?;
    Ok(tree)
}

/// Commits one-row transactions at `rate` for `duration` (a writer behind
/// its schedule skips the slots it missed); the achieved rate and the
/// commit latencies.
async fn write_at(
    store: &AuroraKv,
    tree: TreeId,
    rate: u64,
    writers: usize,
    duration: Duration,
) -> Result<(f64, LatencySummary)> {
    let committed = Arc::new(AtomicU64::new(0));
    let latencies = Arc::new(parking_lot::Mutex::new(new_histogram()));
    let started = Instant::now();
    let deadline = started + duration;
    let interval = Duration::from_secs_f64(writers as f64 / rate as f64);
    let mut tasks = Vec::new();
    for writer in 0..writers {
        let (store, committed, latencies) = (store.clone(), committed.clone(), latencies.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = SimRng::new(writer as u64 + 1);
            let mut next = Instant::now() + interval.mul_f64(writer as f64 / writers as f64);
            while next < deadline {
                tokio::time::sleep_until(next.into()).await;
                let began = Instant::now();
                while next <= began {
                    next += interval;
                }
                let key = rng.below(KEYS).to_be_bytes();
                let mut txn = store.begin().await?;
                txn.put(tree, &key, &[rng.below(256) as u8; VALUE_BYTES]).await?;
                txn.commit().await?;
                let _ = latencies.lock().record(began.elapsed().as_micros() as u64);
                committed.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let achieved = committed.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();
    Ok((achieved, LatencySummary::of(&latencies.lock())))
}

/// A replica's reader: a point lookup every millisecond.
async fn read_forever(replica: ReplicaKv, tree: TreeId, seed: u64, stop: Arc<AtomicBool>) {
    let mut rng = SimRng::new(seed + 1000);
    while !stop.load(Ordering::Relaxed) {
        if let Ok(mut txn) = replica.begin().await {
            let _ = txn.get(tree, &rng.below(KEYS).to_be_bytes()).await;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

pub fn render(report: &ReplicaLagReport) -> String {
    let rows: Vec<Vec<String>> = report
        .results
        .iter()
        .map(|result| {
            vec![
                result.target_writes_per_s.to_string(),
                format!("{:.0}", result.achieved_writes_per_s),
                result.transactions_shown.to_string(),
                format!("{:.2}", result.lag_p50_ms),
                format!("{:.2}", result.lag_p99_ms),
                format!("{:.2}", result.lag_max_ms),
                format!("{:.2}", result.logged_lag_p99_ms),
                format!("{:.2}", result.commit.p50_us as f64 / 1000.0),
                format!("< {:.0}", result.bar_p99_ms),
                match (
                    result.holds,
                    result.achieved_writes_per_s >= RATE_REACHED_FRACTION * result.target_writes_per_s as f64,
                ) {
                    (true, _) => "holds".into(),
                    (false, false) => "rate not reached".into(),
                    (false, true) => "FAILS".into(),
                },
            ]
        })
        .collect();
    let headers = [
        "writes/s",
        "achieved",
        "commits",
        "lag p50 ms",
        "lag p99 ms",
        "max ms",
        "from log p99",
        "commit p50 ms",
        "bar p99",
        "result",
    ];
    format!(
        "lab bench replica-lag ({} replica(s), worst one; lag = commit acknowledged on the writer -> visible on the replica; \
         'from log' = commit record logged -> visible, which adds the wait for durability)\n\n{}",
        report.options.replicas,
        render_table(&headers, &rows)
    )
}
