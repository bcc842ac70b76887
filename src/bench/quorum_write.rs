//! `lab bench quorum-write`: commit latency of redo records on a six-node
//! cluster on loopback, against the disk and network floors of this machine.
//!
//! A *commit* is one mini-transaction of one redo record of `--record-bytes`
//! payload, written with [`VolumeClient::commit`]: it returns once VDL has
//! reached the record, i.e. once four of the six segments have fdatasync'ed
//! it and everything before it. Each writer is a closed loop.
//!
//! Every result is also given as a ratio to baseline (b), the quorum-shaped
//! fdatasync floor, and to (a), a lone fdatasync; `--disk memory` results are
//! given as a ratio to a loopback TCP round trip.

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::{Args, ValueEnum};
use common::ids::PageId;
use common::redo::PageOp;
use common::rng::SimRng;
use common::transport::{TcpTransport, Transport};
use db_frontend::volume::client::VolumeClient;
use db_frontend::volume::writer::PageChange;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use storage_node::DiskBackend;

use super::baselines;
use super::report::{LatencySummary, new_histogram, plot_latency_cdf, ratio, render_table};
use crate::cluster::{ClusterOptions, LocalCluster, NODE_COUNT};
use db_frontend::volume::geometry::WRITE_QUORUM;

/// Most concurrent writers a run accepts.
const WRITERS_MAX: usize = 4096;
/// Longest run accepted, in seconds.
const DURATION_SECONDS_MAX: f64 = 3600.0;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiskMode {
    /// Segment logs on files with fdatasync.
    Real,
    /// Segment logs in memory without fdatasync: protocol and network only.
    Memory,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FileBackend {
    /// std::fs files, one worker thread per segment.
    Std,
    /// io_uring, one ring per node.
    IoUring,
}

/// Options of `lab bench quorum-write`.
#[derive(Clone, Debug, Args, Serialize)]
pub struct QuorumWriteOptions {
    /// Concurrent writers, each committing one record at a time.
    #[arg(long, default_value_t = 1)]
    pub writers: usize,
    /// Payload bytes per redo record (the record adds a 60-byte header and op).
    #[arg(long, default_value_t = 128)]
    pub record_bytes: usize,
    /// Seconds of measured load per run.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Nodes whose acknowledgements are delayed by --slow-ms (user-space delay on their links).
    #[arg(long, default_value_t = 0)]
    pub slow_nodes: usize,
    /// Delay added to every frame a slow node sends, in milliseconds.
    #[arg(long, default_value_t = 20)]
    pub slow_ms: u64,
    /// Nodes stopped for the whole run (3 or more leaves no write quorum).
    #[arg(long, default_value_t = 0)]
    pub down: usize,
    /// Where segment logs live: real files with fdatasync, or memory.
    #[arg(long, value_enum, default_value_t = DiskMode::Real)]
    pub disk: DiskMode,
    /// File backend for --disk real.
    #[arg(long, value_enum, default_value_t = FileBackend::Std)]
    pub backend: FileBackend,
    /// Seconds spent on each disk baseline.
    #[arg(long, default_value_t = 3.0)]
    pub baseline_seconds: f64,
    /// Data directory (default: a temporary directory, removed afterwards).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write an SVG latency CDF to this file.
    #[arg(long)]
    pub plot: Option<PathBuf>,
}

impl QuorumWriteOptions {
    fn validate(&self) -> Result<()> {
        if self.writers == 0 || self.writers > WRITERS_MAX {
            bail!("--writers must be between 1 and {WRITERS_MAX}, not {}", self.writers);
        }
        if self.record_bytes == 0 || self.record_bytes > db_frontend::volume::geometry::PAGE_BYTES_DEFAULT {
            bail!("--record-bytes must be between 1 and the page size (8192), not {}", self.record_bytes);
        }
        if !(self.duration > 0.0 && self.duration <= DURATION_SECONDS_MAX) {
            bail!("--duration must be more than 0 and at most {DURATION_SECONDS_MAX} seconds");
        }
        if !(self.baseline_seconds > 0.0 && self.baseline_seconds <= DURATION_SECONDS_MAX) {
            bail!("--baseline-seconds must be more than 0 and at most {DURATION_SECONDS_MAX}");
        }
        if self.slow_nodes + self.down > NODE_COUNT {
            bail!("--slow-nodes {} plus --down {} exceeds the {NODE_COUNT} nodes", self.slow_nodes, self.down);
        }
        Ok(())
    }

    fn disk_backend(&self) -> DiskBackend {
        match (self.disk, self.backend) {
            (DiskMode::Memory, _) => DiskBackend::Memory,
            (DiskMode::Real, FileBackend::Std) => DiskBackend::Std,
            (DiskMode::Real, FileBackend::IoUring) => DiskBackend::IoUring,
        }
    }
}

/// What a closed-loop load measured.
#[derive(Debug)]
pub struct LoadResult {
    pub latency: Histogram<u64>,
    pub commits: u64,
    pub elapsed: Duration,
}

/// Runs `writers` closed-loop committers for `duration`, each committing one
/// record of `record_bytes` to a random page. Commits still in flight at the
/// end are not counted.
pub async fn run_load(
    client: &Arc<VolumeClient>,
    writers: usize,
    record_bytes: usize,
    duration: Duration,
    progress: Option<&ProgressBar>,
    seed: u64,
) -> Result<LoadResult> {
    let started = tokio::time::Instant::now();
    let deadline = started + duration;
    let committed = Arc::new(AtomicU64::new(0));
    let pages = client.geometry().page_count();
    let mut tasks = Vec::with_capacity(writers);
    for writer in 0..writers {
        let (client, committed) = (client.clone(), committed.clone());
        let mut rng = SimRng::new(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ writer as u64);
        tasks.push(tokio::spawn(async move {
            let mut latency = new_histogram();
            let payload = Bytes::from(vec![writer as u8; record_bytes]);
            loop {
                let change = PageChange {
                    page: PageId(rng.below(pages)),
                    op: PageOp::Write { offset: 0, data: payload.clone() },
                };
                let begun = Instant::now();
                tokio::select! {
                    result = client.commit(std::slice::from_ref(&change)) => {
                        result?;
                        latency.saturating_record(begun.elapsed().as_micros() as u64);
                        committed.fetch_add(1, Ordering::Relaxed);
                    }
                    _ = tokio::time::sleep_until(deadline) => return Ok::<_, anyhow::Error>(latency),
                }
                if tokio::time::Instant::now() >= deadline {
                    return Ok(latency);
                }
            }
        }));
    }
    if let Some(bar) = progress {
        let mut ticker = tokio::time::interval(Duration::from_millis(100));
        while tokio::time::Instant::now() < deadline {
            ticker.tick().await;
            let elapsed = started.elapsed();
            bar.set_position(elapsed.as_millis().min(duration.as_millis()) as u64);
            let commits = committed.load(Ordering::Relaxed);
            bar.set_message(format!("{commits} commits, {:.0}/s", commits as f64 / elapsed.as_secs_f64().max(1e-3)));
        }
    }
    let mut latency = new_histogram();
    for task in tasks {
        let writer_latency = task.await.context("a writer task failed")??;
        latency.add(&writer_latency).context("merging writer histograms")?;
    }
    Ok(LoadResult { latency, commits: committed.load(Ordering::Relaxed), elapsed: started.elapsed().min(duration) })
}

/// One cluster run and what it measured.
#[derive(Debug, Serialize)]
pub struct RunReport {
    pub name: String,
    pub writers: usize,
    pub slow_nodes: usize,
    pub slow_ms: u64,
    pub down: usize,
    pub commits: u64,
    pub commits_per_s: f64,
    pub latency_us: LatencySummary,
    /// Client bytes sent to the nodes (six copies of each record) per commit.
    pub bytes_sent_per_commit: f64,
    /// Bytes the client received (acknowledgements) per commit.
    pub bytes_received_per_commit: f64,
    pub p50_over_quorum_baseline: f64,
    pub p99_over_quorum_baseline: f64,
    pub p50_over_single_baseline: f64,
    /// Against the kernel's loopback TCP round trip (two blocking threads).
    pub p50_over_loopback_round_trips: f64,
    /// Against a round trip through the kit's own TCP transport (tokio tasks).
    pub p50_over_transport_round_trips: f64,
    #[serde(skip)]
    pub histogram: Histogram<u64>,
}

/// The whole benchmark's results.
#[derive(Debug, Serialize)]
pub struct QuorumWriteReport {
    pub options: QuorumWriteOptions,
    pub cores: usize,
    /// Baseline (a): one file, 4 KiB write + fdatasync.
    pub baseline_single_fdatasync_us: Option<LatencySummary>,
    /// Baseline (b): six files fdatasync'ed together, time to the 4th.
    pub baseline_quorum_fdatasync_us: Option<LatencySummary>,
    pub loopback_round_trip_us: LatencySummary,
    pub transport_round_trip_us: LatencySummary,
    pub runs: Vec<RunReport>,
    /// The last run's figures, repeated at the top level.
    pub commits_per_s: f64,
    pub latency_us: LatencySummary,
    pub bytes_sent_per_commit: f64,
}

struct RunSpec {
    name: String,
    slow_nodes: usize,
    down: usize,
}

/// Runs the benchmark: baselines first, then the cluster runs.
pub async fn run(options: QuorumWriteOptions) -> Result<QuorumWriteReport> {
    options.validate()?;
    let temporary = tempfile::Builder::new().prefix("lab-quorum-write-").tempdir()?;
    let root = options.data_dir.clone().unwrap_or_else(|| temporary.path().to_path_buf());
    let node_directories: Vec<PathBuf> = (0..NODE_COUNT).map(|index| root.join(format!("node-{index}"))).collect();
    for directory in &node_directories {
        std::fs::create_dir_all(directory).with_context(|| format!("creating {}", directory.display()))?;
    }
    let baseline_time = Duration::from_secs_f64(options.baseline_seconds);
    let (single, quorum) = if options.disk == DiskMode::Real {
        eprintln!("baseline (a): 4 KiB write + fdatasync on one file, {baseline_time:?}");
        let directory = root.clone();
        let single =
            tokio::task::spawn_blocking(move || baselines::single_file_fdatasync(&directory, baseline_time)).await??;
        eprintln!("baseline (b): six files fdatasync'ed together, time to the {WRITE_QUORUM}th, {baseline_time:?}");
        let directories = node_directories.clone();
        let quorum = tokio::task::spawn_blocking(move || {
            baselines::quorum_shaped_fdatasync(&directories, WRITE_QUORUM, baseline_time)
        })
        .await??;
        (Some(single), Some(quorum))
    } else {
        (None, None)
    };
    let loopback = tokio::task::spawn_blocking(baselines::loopback_round_trip).await??;
    let transport_trip = baselines::transport_round_trip().await?;
    let transport_summary = LatencySummary::of(&transport_trip);
    let single_summary = single.as_ref().map(LatencySummary::of);
    let quorum_summary = quorum.as_ref().map(LatencySummary::of);
    let loopback_summary = LatencySummary::of(&loopback);

    let mut specs = Vec::new();
    if options.slow_nodes > 0 || options.down > 0 {
        specs.push(RunSpec { name: "reference (no faults)".into(), slow_nodes: 0, down: 0 });
    }
    let mut name = format!("{} writer{}", options.writers, if options.writers == 1 { "" } else { "s" });
    if options.slow_nodes > 0 {
        name.push_str(&format!(", {} slow by {} ms", options.slow_nodes, options.slow_ms));
    }
    if options.down > 0 {
        name.push_str(&format!(", {} down", options.down));
    }
    specs.push(RunSpec { name, slow_nodes: options.slow_nodes, down: options.down });

    let mut runs = Vec::new();
    for (index, spec) in specs.into_iter().enumerate() {
        let directory = root.join(format!("run-{index}"));
        let run = run_cluster(&options, &spec, &directory, index as u64).await?;
        std::fs::remove_dir_all(&directory).ok();
        let latency = LatencySummary::of(&run.load.latency);
        let commits = run.load.commits.max(1) as f64;
        runs.push(RunReport {
            name: spec.name,
            writers: options.writers,
            slow_nodes: spec.slow_nodes,
            slow_ms: options.slow_ms,
            down: spec.down,
            commits: run.load.commits,
            commits_per_s: run.load.commits as f64 / run.load.elapsed.as_secs_f64(),
            latency_us: latency,
            bytes_sent_per_commit: run.bytes_sent as f64 / commits,
            bytes_received_per_commit: run.bytes_received as f64 / commits,
            p50_over_quorum_baseline: ratio(latency.p50_us as f64, quorum_summary.map_or(0.0, |b| b.p50_us as f64)),
            p99_over_quorum_baseline: ratio(latency.p99_us as f64, quorum_summary.map_or(0.0, |b| b.p99_us as f64)),
            p50_over_single_baseline: ratio(latency.p50_us as f64, single_summary.map_or(0.0, |b| b.p50_us as f64)),
            p50_over_loopback_round_trips: ratio(latency.p50_us as f64, loopback_summary.p50_us as f64),
            p50_over_transport_round_trips: ratio(latency.p50_us as f64, transport_summary.p50_us as f64),
            histogram: run.load.latency,
        });
    }
    let last = runs.last().expect("at least one run");
    let report = QuorumWriteReport {
        cores: std::thread::available_parallelism().map_or(1, |cores| cores.get()),
        baseline_single_fdatasync_us: single_summary,
        baseline_quorum_fdatasync_us: quorum_summary,
        loopback_round_trip_us: loopback_summary,
        transport_round_trip_us: transport_summary,
        commits_per_s: last.commits_per_s,
        latency_us: last.latency_us,
        bytes_sent_per_commit: last.bytes_sent_per_commit,
        runs,
        options,
    };
    if let Some(path) = &report.options.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &report.options.plot {
        let mut series: Vec<(String, &Histogram<u64>)> = Vec::new();
        if let Some(single) = &single {
            series.push(("baseline (a) fdatasync".into(), single));
        }
        if let Some(quorum) = &quorum {
            series.push(("baseline (b) 4th of 6 fdatasyncs".into(), quorum));
        }
        series.push(("loopback TCP round trip".into(), &loopback));
        series.push(("transport round trip".into(), &transport_trip));
        series.extend(report.runs.iter().map(|run| (run.name.clone(), &run.histogram)));
        plot_latency_cdf(path, "quorum-write commit latency CDF", &series)?;
    }
    Ok(report)
}

struct ClusterRun {
    load: LoadResult,
    bytes_sent: u64,
    bytes_received: u64,
}

async fn run_cluster(options: &QuorumWriteOptions, spec: &RunSpec, directory: &Path, seed: u64) -> Result<ClusterRun> {
    let mut cluster_options = ClusterOptions::new(directory, options.disk_backend());
    // Slow nodes first, then down nodes: indices cycle through the AZs.
    cluster_options.send_delays =
        (0..spec.slow_nodes).map(|index| (index, Duration::from_millis(options.slow_ms))).collect();
    let mut cluster = LocalCluster::start(&cluster_options).await?;
    for index in spec.slow_nodes..spec.slow_nodes + spec.down {
        cluster.kill(index);
    }
    if spec.down > NODE_COUNT - WRITE_QUORUM {
        eprintln!("warning: {} nodes down leaves no write quorum; no commit can complete", spec.down);
    }
    let transport = Arc::new(TcpTransport::new());
    let client = Arc::new(cluster.open_volume(transport.clone()).await?);
    let duration = Duration::from_secs_f64(options.duration);
    let bar = ProgressBar::new(duration.as_millis() as u64);
    bar.set_style(
        ProgressStyle::with_template("{prefix:>32} [{bar:30}] {elapsed_precise} {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(spec.name.clone());
    let traffic = transport.traffic();
    let (sent_before, received_before) = (traffic.bytes_sent(), traffic.bytes_received());
    let load = run_load(&client, options.writers, options.record_bytes, duration, Some(&bar), seed).await?;
    bar.finish();
    let bytes_sent = traffic.bytes_sent() - sent_before;
    let bytes_received = traffic.bytes_received() - received_before;
    client.close();
    cluster.stop();
    Ok(ClusterRun { load, bytes_sent, bytes_received })
}

/// The p50, p90, p99, p99.9 and max cells of a table row.
fn percentile_cells(summary: &LatencySummary) -> [String; 5] {
    [summary.p50_us, summary.p90_us, summary.p99_us, summary.p999_us, summary.max_us].map(|micros| micros.to_string())
}

/// The human-readable report.
pub fn render(report: &QuorumWriteReport) -> String {
    let mut rows = Vec::new();
    let mut baseline_row = |name: &str, summary: &LatencySummary| {
        let mut row = vec![name.to_string(), "-".into()];
        row.extend(percentile_cells(summary));
        row.extend(["-".into(), "-".into(), "-".into()]);
        rows.push(row);
    };
    if let Some(single) = &report.baseline_single_fdatasync_us {
        baseline_row("baseline (a) 4 KiB fdatasync", single);
    }
    if let Some(quorum) = &report.baseline_quorum_fdatasync_us {
        baseline_row("baseline (b) 4th of 6 fdatasyncs", quorum);
    }
    baseline_row("loopback TCP round trip", &report.loopback_round_trip_us);
    baseline_row("transport round trip", &report.transport_round_trip_us);
    for run in &report.runs {
        let versus = if report.baseline_quorum_fdatasync_us.is_some() {
            format!("{:.2}x / {:.2}x (b)", run.p50_over_quorum_baseline, run.p99_over_quorum_baseline)
        } else {
            format!("{:.1} / {:.1} RTT", run.p50_over_loopback_round_trips, run.p50_over_transport_round_trips)
        };
        let mut row = vec![run.name.clone(), format!("{:.0}", run.commits_per_s)];
        row.extend(percentile_cells(&run.latency_us));
        row.extend([
            versus,
            if report.baseline_single_fdatasync_us.is_some() {
                format!("{:.2}x (a)", run.p50_over_single_baseline)
            } else {
                "-".into()
            },
            format!("{:.0}", run.bytes_sent_per_commit),
        ]);
        rows.push(row);
    }
    render_table(
        &[
            "run",
            "commits/s",
            "p50 µs",
            "p90 µs",
            "p99 µs",
            "p99.9 µs",
            "max µs",
            "p50/p99 vs",
            "p50 vs",
            "B sent/commit",
        ],
        &rows,
    )
}
