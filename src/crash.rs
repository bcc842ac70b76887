//! `lab crash SCENARIO`: crash experiments on a cluster of real processes.
//!
//! Each scenario starts six `lab node storage` processes on loopback (see
//! [`crate::procs`]), runs a write load, injects its fault with a real
//! `kill -9`, a user-space link delay or flipped bytes in a segment's
//! files, then checks what the Aurora model promises and prints a report:
//! a timeline, every invariant checked (held or not), recovery times and
//! the data verified. `--json FILE` writes the same report. The command
//! exits non-zero when an invariant does not hold.
//!
//! - `frontend`: kill the writer mid-load and restart it, `--cycles` times;
//!   every acknowledged commit must survive, writes must be accepted again
//!   within a second, and the time to accept writes must not grow with the
//!   log (measured after prefills of `--log-lengths` records).
//! - `storage-node`: kill any two nodes during the load, restart them.
//! - `az-plus-one`: kill a whole AZ and one more node: writes stop, reads
//!   go on; a fourth node back and every write completes.
//! - `corrupt-segment`: flip bytes inside entries of a node's log; the node
//!   detects every one, never serves a corrupt page, and repairs itself
//!   from its peers.
//! - `slow-az`: one AZ's nodes 20 ms slower on every frame they send; p99
//!   with and without.
//! - `repair`: fill `--repair-bytes` of pages over `--pgs` PGs, kill a node,
//!   and replace each of its segments by a new one on a spare node of its
//!   AZ with a membership change (joint quorum, then settled) while a load
//!   goes on; the new segments rebuild from their peers (each PG from a
//!   different peer): MB/s.

use anyhow::{Context, Result, ensure};
use common::ids::{Lsn, MembershipEpoch, NodeId, PageId, PgId};
use common::message::{Message, ReadPageRequest};
use common::rng::SimRng;
use common::transport::{TcpTransport, Transport};
use db_frontend::volume::client::{VolumeClient, VolumeConfig};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use storage_node::DiskBackend;
use storage_node::log_format::scan_log;

use crate::bench::report::{LatencySummary, new_histogram, render_table};
use crate::procs::{ClusterFile, ProcessCluster, VolumeSpec, WriterProcess, load_change, page_of};

/// Pages the crash loads write to.
const LOAD_PAGES: u64 = 256;
/// Concurrent committers of the crash loads.
const LOAD_WRITERS: u32 = 8;

/// The crash experiments.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// Kill -9 the writer mid-load and restart it, many times.
    Frontend,
    /// Kill -9 two storage nodes during the load and restart them.
    StorageNode,
    /// Kill an AZ and one more node: writes stop, reads go on.
    AzPlusOne,
    /// Flip bytes in a node's segment log: detected, never served, repaired.
    CorruptSegment,
    /// One AZ 20 ms slower: the effect on p99.
    SlowAz,
    /// Kill a node and replace each of its segments by one on a spare node (joint-quorum membership change) while writes go on; report MB/s.
    Repair,
}

/// Options of `lab crash`.
#[derive(Clone, Debug, clap::Args)]
pub struct CrashOptions {
    #[arg(value_enum)]
    pub scenario: Scenario,
    /// Write the report as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Seeds the random choices (which nodes, when, which bytes).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// frontend: kill and restart cycles.
    #[arg(long, default_value_t = 20)]
    pub cycles: u32,
    /// frontend: log lengths (records never coalesced) to measure recovery after.
    #[arg(long, value_delimiter = ',', default_value = "10000,1000000")]
    pub log_lengths: Vec<u64>,
    /// corrupt-segment: entries to corrupt.
    #[arg(long, default_value_t = 8)]
    pub corruptions: usize,
    /// slow-az: the extra delay on the slow AZ's frames, in milliseconds.
    #[arg(long, default_value_t = 20)]
    pub slow_ms: u64,
    /// repair: bytes of page data to fill the volume with (and rebuild).
    #[arg(long, default_value_t = 1 << 30)]
    pub repair_bytes: u64,
    /// PGs of the volume (the loads write to PG 0; repair fills them all).
    #[arg(long, default_value_t = 1)]
    pub pgs: u32,
    /// Keep the cluster's data here instead of a temp directory.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
}

/// One invariant the scenario checked.
#[derive(Clone, Debug, Serialize)]
pub struct Invariant {
    pub name: String,
    pub held: bool,
    pub detail: String,
}

/// What the acknowledged commits looked like afterwards.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DataVerified {
    pub acknowledged_commits: u64,
    pub pages_checked: u64,
    /// (page, writer) slots holding less than their last acknowledged value.
    pub lost: u64,
    /// Slots holding a value that was never written there.
    pub invented: u64,
}

/// The report of one scenario.
#[derive(Clone, Debug, Serialize)]
pub struct CrashReport {
    pub scenario: Scenario,
    pub seed: u64,
    /// (milliseconds since the start, what happened).
    pub timeline: Vec<(f64, String)>,
    pub invariants: Vec<Invariant>,
    pub data: DataVerified,
    /// Scenario-specific figures (recovery times, latencies, counts).
    pub figures: BTreeMap<String, serde_json::Value>,
}

impl CrashReport {
    pub fn all_held(&self) -> bool {
        self.invariants.iter().all(|invariant| invariant.held)
    }
}

/// What a scenario accumulates while it runs.
struct Run {
    started: Instant,
    report: CrashReport,
}

impl Run {
    fn note(&mut self, what: impl Into<String>) {
        let at = self.started.elapsed().as_secs_f64() * 1000.0;
        let what = what.into();
        eprintln!("{at:>9.1} ms  {what}");
        self.report.timeline.push((at, what));
    }

    fn check(&mut self, name: &str, held: bool, detail: impl Into<String>) {
        let detail = detail.into();
        self.note(format!("{} {name}: {detail}", if held { "holds:" } else { "FAILS:" }));
        self.report.invariants.push(Invariant { name: name.into(), held, detail });
    }

    fn figure(&mut self, name: &str, value: impl Serialize) {
        self.report.figures.insert(name.into(), serde_json::to_value(value).expect("serializable"));
    }
}

/// The values one writer process may have made durable without the harness
/// reading its `ack`: a writer commits `base + 1, + 2, ...` in turn, and
/// prints its acks from a separate thread, so when it is killed every value
/// above the last `ack` read, up to the end of its value range, may have
/// been committed or acknowledged unseen.
#[derive(Debug, Clone, Copy)]
struct UnseenTail {
    writer: u32,
    above: u64,
    end: u64,
}

/// Every value a process writer may use lies in `(base, base + RUN_VALUES)`.
const RUN_VALUES: u64 = 1 << 28;

/// Every acknowledged value per writer, and per killed process the values
/// that may have been written unseen (which may or may not have become durable).
#[derive(Debug, Default)]
struct Ledger {
    acked: BTreeMap<u32, BTreeSet<u64>>,
    unseen: Vec<UnseenTail>,
}

impl Ledger {
    /// Takes what a killed writer process acknowledged (its values started above `base`).
    fn absorb(&mut self, writer: &WriterProcess, base: u64) {
        for w in 0..LOAD_WRITERS {
            let values = writer.acks.get(&w).cloned().unwrap_or_default();
            let above = values.last().copied().unwrap_or(base);
            self.unseen.push(UnseenTail { writer: w, above, end: base + RUN_VALUES });
            self.acked.entry(w).or_default().extend(values);
        }
    }

    /// Whether `value` can be in writer `writer`'s slot: acknowledged, or
    /// in a killed process's unseen tail.
    fn may_hold(&self, writer: u32, value: u64) -> bool {
        self.acked.get(&writer).is_some_and(|values| values.contains(&value))
            || self.unseen.iter().any(|tail| tail.writer == writer && tail.above < value && value < tail.end)
    }

    fn acknowledged(&self) -> u64 {
        self.acked.values().map(|values| values.len() as u64).sum()
    }

    /// Reads every load page through a new writer (a recovery) and checks
    /// each (page, writer) slot: at least the last value acknowledged for
    /// it, and only ever a value written there.
    async fn verify(&self, client: &VolumeClient) -> Result<DataVerified> {
        let mut expected: BTreeMap<(u64, u32), u64> = BTreeMap::new();
        for (writer, values) in &self.acked {
            for value in values {
                let slot = expected.entry((page_of(*writer, *value, LOAD_PAGES).0, *writer)).or_default();
                *slot = (*slot).max(*value);
            }
        }
        let mut verified = DataVerified { acknowledged_commits: self.acknowledged(), ..DataVerified::default() };
        for page in 0..LOAD_PAGES {
            let read = client.read_page(PageId(page)).await?;
            verified.pages_checked += 1;
            for writer in 0..LOAD_WRITERS {
                let at = writer as usize * 8;
                let value = u64::from_le_bytes(read.image[at..at + 8].try_into().expect("8 bytes"));
                if value < expected.get(&(page, writer)).copied().unwrap_or(0) {
                    verified.lost += 1;
                }
                let written_here =
                    value == 0 || (page_of(writer, value, LOAD_PAGES).0 == page && self.may_hold(writer, value));
                if !written_here {
                    verified.invented += 1;
                }
            }
        }
        Ok(verified)
    }
}

fn load_args(value_base: u64) -> Vec<String> {
    [
        "--writers",
        &LOAD_WRITERS.to_string(),
        "--pages",
        &LOAD_PAGES.to_string(),
        "--value-base",
        &value_base.to_string(),
    ]
    .map(String::from)
    .to_vec()
}

/// Value bases: run `k`'s values lie above `k << 32`.
fn value_base(run: u64) -> u64 {
    run << 32
}

/// `lab crash`: runs the scenario and returns its report (written as JSON if asked).
pub async fn run(options: CrashOptions, lab: &Path) -> Result<CrashReport> {
    let temporary = tempfile::tempdir()?;
    let directory = options.data_dir.clone().unwrap_or_else(|| temporary.path().to_path_buf());
    std::fs::create_dir_all(&directory)?;
    ensure!(options.pgs >= 1, "--pgs must be at least 1");
    let volume = VolumeSpec {
        pg_count: options.pgs,
        pg_bytes: db_frontend::volume::geometry::PG_BYTES_DEFAULT,
        page_bytes: db_frontend::volume::geometry::PAGE_BYTES_DEFAULT,
        log_file_bytes: 64 * 1024 * 1024,
        disk: DiskBackend::Std,
    };
    // A repair replaces a node by a spare one (a membership change).
    let spares = u32::from(options.scenario == Scenario::Repair);
    let file = ClusterFile::local(&directory, volume, spares)?;
    let mut run = Run {
        started: Instant::now(),
        report: CrashReport {
            scenario: options.scenario,
            seed: options.seed,
            timeline: Vec::new(),
            invariants: Vec::new(),
            data: DataVerified::default(),
            figures: BTreeMap::new(),
        },
    };
    let cluster_path = directory.join("cluster.toml");
    let mut cluster = ProcessCluster::start(lab, file, &cluster_path)?;
    run.note(format!("six storage node processes serving (cluster file {})", cluster_path.display()));
    let mut rng = SimRng::new(options.seed);
    match options.scenario {
        Scenario::Frontend => frontend(&mut run, &mut cluster, &options, &mut rng).await?,
        Scenario::StorageNode => storage_node(&mut run, &mut cluster, &mut rng).await?,
        Scenario::AzPlusOne => az_plus_one(&mut run, &mut cluster).await?,
        Scenario::CorruptSegment => corrupt_segment(&mut run, &mut cluster, &options, &mut rng).await?,
        Scenario::SlowAz => slow_az(&mut run, &mut cluster, &options).await?,
        Scenario::Repair => repair(&mut run, &mut cluster, &options, &mut rng).await?,
    }
    cluster.stop();
    run.note("cluster stopped");
    let report = run.report;
    if let Some(path) = &options.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(report)
}

/// A writer in this process (a recovery of its own) on the process cluster.
async fn open_client(cluster: &ProcessCluster) -> Result<VolumeClient> {
    Ok(VolumeClient::open(VolumeConfig::new(cluster.file.geometry()?), Arc::new(TcpTransport::new())).await?)
}

async fn verify_ledger(run: &mut Run, cluster: &ProcessCluster, ledger: &Ledger, when: &str) -> Result<()> {
    let client = open_client(cluster).await?;
    let verified = ledger.verify(&client).await?;
    client.close();
    run.check(
        &format!("no acknowledged commit is lost {when}"),
        verified.lost == 0,
        format!(
            "{} acknowledged commits, {} pages read, {} slots behind",
            verified.acknowledged_commits, verified.pages_checked, verified.lost
        ),
    );
    run.check(
        &format!("nothing is visible that was not written {when}"),
        verified.invented == 0,
        format!("{} slots hold a value never written there", verified.invented),
    );
    run.report.data = verified;
    Ok(())
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

async fn frontend(run: &mut Run, cluster: &mut ProcessCluster, options: &CrashOptions, rng: &mut SimRng) -> Result<()> {
    ensure!(options.cycles > 0, "--cycles must be at least 1");
    let mut ledger = Ledger::default();
    let mut ready_ms = Vec::new();
    let mut open_ms = Vec::new();
    let progress = indicatif::ProgressBar::new(u64::from(options.cycles));
    for cycle in 0..u64::from(options.cycles) {
        let base = value_base(cycle + 1);
        let mut writer = cluster.writer(&load_args(base))?;
        ready_ms.push(writer.ready_ms);
        open_ms.push(writer.open_ms);
        let load = Duration::from_millis(300 + rng.below(1200));
        writer.run_for(load)?;
        writer.kill()?;
        run.note(format!(
            "cycle {}: writer at {} accepted writes {:.0} ms after its start (recovery {:.1} ms, found VDL {}), \
             {} commits acknowledged, killed -9 after {:.0} ms",
            cycle + 1,
            writer.epoch,
            writer.ready_ms,
            writer.open_ms,
            writer.recovered_vdl,
            writer.ack_count(),
            load.as_secs_f64() * 1000.0
        ));
        ledger.absorb(&writer, base);
        progress.inc(1);
    }
    progress.finish_and_clear();
    verify_ledger(run, cluster, &ledger, &format!("after {} cycles", options.cycles)).await?;
    let slowest = ready_ms.iter().copied().fold(0.0, f64::max);
    run.check(
        "writes are accepted again within 1 s of a restart",
        slowest < 1000.0,
        format!("slowest {slowest:.0} ms from process start to open (median {:.0} ms)", median(&mut ready_ms.clone())),
    );
    run.figure("cycles", options.cycles);
    run.figure("ready_ms", &ready_ms);
    run.figure("recovery_ms", &open_ms);

    // Recovery time against the length of the log since the last coalesce.
    let mut by_length = Vec::new();
    for (index, records) in options.log_lengths.iter().enumerate() {
        let base = value_base(u64::from(options.cycles) + 1 + index as u64 * 10);
        let mut args = load_args(base);
        args.extend(["--fill".to_string(), records.to_string()]);
        let mut filler = cluster.writer(&args)?;
        run.note(format!("prefilling {records} records to distinct pages (never coalesced)"));
        filler.wait_filled(Duration::from_secs(1800))?;
        filler.run_for(Duration::from_millis(300))?;
        filler.kill()?;
        ledger.absorb(&filler, base);
        let mut samples = Vec::new();
        for attempt in 0..5u64 {
            let attempt_base = base + (attempt + 1) * RUN_VALUES;
            let mut writer = cluster.writer(&load_args(attempt_base))?;
            samples.push(writer.open_ms);
            writer.run_for(Duration::from_millis(100))?;
            writer.kill()?;
            ledger.absorb(&writer, attempt_base);
        }
        let recovery = median(&mut samples);
        run.note(format!("after a log of {records} records: recovery median {recovery:.1} ms over 5 restarts"));
        by_length.push((*records, recovery, samples));
    }
    if by_length.len() >= 2 {
        let (short, long) = (&by_length[0], &by_length[by_length.len() - 1]);
        let growth = long.1 / short.1.max(0.001);
        run.check(
            "recovery time does not grow with the log",
            growth <= 1.5,
            format!("{:.1} ms after {} records, {:.1} ms after {}: {growth:.2}x", short.1, short.0, long.1, long.0),
        );
        run.figure("recovery_growth", growth);
    }
    run.figure("recovery_by_log_length", &by_length);
    verify_ledger(run, cluster, &ledger, "after the long logs").await
}

async fn storage_node(run: &mut Run, cluster: &mut ProcessCluster, rng: &mut SimRng) -> Result<()> {
    let mut ledger = Ledger::default();
    let base = value_base(1);
    let mut writer = cluster.writer(&load_args(base))?;
    writer.run_for(Duration::from_secs(1))?;
    let first = rng.below(6) as usize;
    let second = (first + 1 + rng.below(5) as usize) % 6;
    cluster.kill(first);
    cluster.kill(second);
    run.note(format!("killed -9 nodes {first} and {second} during the load"));
    let before = writer.ack_count();
    writer.run_for(Duration::from_secs(2))?;
    let during = writer.ack_count() - before;
    run.check("writes go on with two nodes down", during > 0, format!("{during} commits acknowledged in 2 s"));
    let restarted = Instant::now();
    for node in [first, second] {
        let start = cluster.restart(node, 0)?;
        run.note(format!(
            "node {node} restarted in {:.0} ms, its segments found {:?} (SCL, records, corruptions, torn bytes)",
            start.start_ms, start.segments
        ));
    }
    writer.run_for(Duration::from_secs(1))?;
    let caught_up = wait_caught_up(cluster, &[first, second], Duration::from_secs(60)).await;
    run.check(
        "the restarted nodes catch up",
        caught_up.is_some(),
        caught_up.map_or("not within 60 s".into(), |at| {
            format!("{:.0} ms after their restart", (at - restarted).as_secs_f64() * 1000.0)
        }),
    );
    writer.kill()?;
    ledger.absorb(&writer, base);
    verify_ledger(run, cluster, &ledger, "after the restarts").await
}

/// Waits until the SCL of `nodes` reaches the highest SCL of any node.
async fn wait_caught_up(cluster: &ProcessCluster, nodes: &[usize], timeout: Duration) -> Option<Instant> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let mut scls = Vec::new();
        for node in 0..6 {
            scls.push(cluster.status(node, PgId(0)).await.map(|status| status.segment_complete_lsn));
        }
        let highest = scls.iter().flatten().max().copied().unwrap_or(Lsn::ZERO);
        if nodes.iter().all(|node| scls[*node].is_some_and(|scl| scl >= highest)) {
            return Some(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

/// The highest value acknowledged per page, kept by the in-process loads.
type Acked = Arc<parking_lot::Mutex<BTreeMap<u64, u64>>>;

/// One committer in this process writing increasing values to slot 0 of
/// random pages; returns its task.
fn spawn_committer(
    client: Arc<VolumeClient>,
    acked: Acked,
    stop: Arc<AtomicBool>,
    commits: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<Result<()>> {
    tokio::spawn(async move {
        let mut value = 0u64;
        while !stop.load(Ordering::Relaxed) {
            value += 1;
            let change = load_change(0, value, LOAD_PAGES);
            let page = change.page.0;
            client.commit(&[change]).await?;
            let mut acked = acked.lock();
            let slot = acked.entry(page).or_default();
            *slot = (*slot).max(value);
            commits.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    })
}

async fn az_plus_one(run: &mut Run, cluster: &mut ProcessCluster) -> Result<()> {
    let client = Arc::new(open_client(cluster).await?);
    let (acked, stop, commits): (Acked, _, _) =
        (Arc::default(), Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
    let committer = spawn_committer(client.clone(), acked.clone(), stop.clone(), commits.clone());
    tokio::time::sleep(Duration::from_secs(1)).await;
    // AZ 0 is nodes 0 and 3; one more from AZ 1.
    let down = [0usize, 3, 1];
    for node in down {
        cluster.kill(node);
    }
    let killed = Instant::now();
    run.note(format!("killed -9 nodes {down:?}: AZ 0 and one node of AZ 1"));
    tokio::time::sleep(Duration::from_millis(300)).await; // commits in flight settle either way
    let commits_before = commits.load(Ordering::Relaxed);
    let (mut reads, mut read_errors, mut wrong) = (0u64, 0u64, 0u64);
    let outage = Instant::now();
    while outage.elapsed() < Duration::from_secs(2) {
        let page = reads % LOAD_PAGES;
        let floor = acked.lock().get(&page).copied().unwrap_or(0);
        match client.read_page(PageId(page)).await {
            Ok(read) => {
                reads += 1;
                let value = u64::from_le_bytes(read.image[..8].try_into().expect("8 bytes"));
                if value < floor || (value != 0 && page_of(0, value, LOAD_PAGES).0 != page) {
                    wrong += 1;
                }
            }
            Err(_) => read_errors += 1,
        }
    }
    let commits_during = commits.load(Ordering::Relaxed) - commits_before;
    run.check(
        "writes stop with an AZ and one more node down",
        commits_during == 0,
        format!("{commits_during} commits completed in 2 s"),
    );
    run.check(
        "reads go on from the three nodes left",
        reads > 0 && wrong == 0,
        format!("{reads} pages read in 2 s ({read_errors} refused), {wrong} not as acknowledged"),
    );
    run.figure("reads_during_outage", reads);
    cluster.restart(1, 0)?;
    let back = Instant::now();
    run.note("node 1 restarted: a write quorum again");
    let resumed = loop {
        if commits.load(Ordering::Relaxed) > commits_before {
            break Some(back.elapsed());
        }
        if back.elapsed() > Duration::from_secs(30) {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    run.check(
        "writes complete once a fourth node is back",
        resumed.is_some(),
        resumed.map_or("no commit within 30 s".into(), |after| {
            format!("first commit {:.0} ms after the restart", after.as_secs_f64() * 1000.0)
        }),
    );
    for node in [0, 3] {
        cluster.restart(node, 0)?;
    }
    run.note(format!("nodes 0 and 3 restarted, {:.1} s after the outage began", killed.elapsed().as_secs_f64()));
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    committer.await??;
    let mut behind = 0;
    let acked_values = acked.lock().clone();
    for (page, value) in acked_values {
        let read = client.read_page(PageId(page)).await?;
        if u64::from_le_bytes(read.image[..8].try_into().expect("8 bytes")) < value {
            behind += 1;
        }
    }
    run.check(
        "no acknowledged commit is lost",
        behind == 0,
        format!("{} commits, {behind} pages behind", commits.load(Ordering::Relaxed)),
    );
    run.report.data = DataVerified {
        acknowledged_commits: commits.load(Ordering::Relaxed),
        pages_checked: acked.lock().len() as u64,
        lost: behind,
        invented: 0,
    };
    client.close();
    Ok(())
}

/// Byte ranges of `node`'s log entries that hold records or versions, by file.
fn entry_ranges(directory: &Path) -> Result<Vec<(PathBuf, usize, usize)>> {
    let mut files: Vec<(u64, bytes::Bytes, PathBuf)> = Vec::new();
    for entry in std::fs::read_dir(directory)? {
        let path = entry?.path();
        let Some(number) = path.file_stem().and_then(|stem| stem.to_str()).and_then(|stem| stem.parse().ok()) else {
            continue;
        };
        files.push((number, bytes::Bytes::from(std::fs::read(&path)?), path));
    }
    files.sort_by_key(|(number, ..)| *number);
    let scan = scan_log(&files.iter().map(|(number, bytes, _)| (*number, bytes.clone())).collect::<Vec<_>>());
    let mut ranges = Vec::new();
    for window in scan.entries.windows(2) {
        let ((at, entry), (next, _)) = (&window[0], &window[1]);
        if at.file != next.file || matches!(entry, storage_node::log_format::Entry::Checkpoint(_)) {
            continue;
        }
        let path = files.iter().find(|(number, ..)| *number == at.file).expect("scanned").2.clone();
        ranges.push((path, at.offset as usize, next.offset as usize));
    }
    Ok(ranges)
}

async fn read_direct(
    address: &str,
    pg: PgId,
    page: PageId,
    read_point: Lsn,
    epoch: common::ids::Epoch,
) -> Option<Message> {
    let transport = TcpTransport::new();
    let mut connection = transport.connect(address.to_string()).await.ok()?;
    let request = ReadPageRequest { request_id: 1, pg, epoch, page, read_point };
    connection.sender.send(Message::ReadPage(request).encode()).await.ok()?;
    let frame = tokio::time::timeout(Duration::from_secs(2), connection.receiver.recv()).await.ok()??.ok()?;
    Message::decode(&frame).ok()
}

async fn corrupt_segment(
    run: &mut Run,
    cluster: &mut ProcessCluster,
    options: &CrashOptions,
    rng: &mut SimRng,
) -> Result<()> {
    let mut ledger = Ledger::default();
    let base = value_base(1);
    let mut writer = cluster.writer(&load_args(base))?;
    writer.run_for(Duration::from_secs(2))?;
    writer.kill()?;
    ledger.absorb(&writer, base);
    let victim = 2;
    cluster.kill(victim);
    let directory = cluster.file.nodes[victim].data_directory.join("pg-000000");
    let ranges = entry_ranges(&directory)?;
    ensure!(ranges.len() > options.corruptions * 3, "the log holds only {} entries", ranges.len());
    // Every third entry at most, never the last ones: each flip is its own mid-log corruption.
    let mut chosen = BTreeSet::new();
    while chosen.len() < options.corruptions {
        let index = rng.below((ranges.len() - 2) as u64) as usize;
        if !chosen.iter().any(|other: &usize| other.abs_diff(index) < 3) {
            chosen.insert(index);
        }
    }
    for index in &chosen {
        let (path, start, end) = &ranges[*index];
        let mut bytes = std::fs::read(path)?;
        let at = start + 32 + rng.below((end - start - 32) as u64) as usize;
        bytes[at] ^= 1 << rng.below(8);
        std::fs::write(path, bytes)?;
    }
    run.note(format!(
        "node {victim} killed; flipped one bit in each of {} of its {} log entries",
        chosen.len(),
        ranges.len()
    ));
    let start = cluster.restart(victim, 0)?;
    let (_, _, corruptions, torn) = start.segments.get(&0).copied().unwrap_or_default();
    let detected = corruptions + usize::from(torn > 0);
    run.check(
        "every injected corruption is detected",
        detected == chosen.len(),
        format!("{} injected, {corruptions} reported as mid-log corruption, torn tail {torn} bytes", chosen.len()),
    );
    run.figure("injected", chosen.len());
    run.figure("detected", detected);
    // Read every page straight from the node at every point up to its SCL
    // that the healthy node 0 can serve, before and during the repair.
    let (mut served, mut refused, mut compared, mut differing) = (0u64, 0u64, 0u64, 0u64);
    let healthy = cluster.status(0, PgId(0)).await.context("node 0 answers")?;
    let repair_started = Instant::now();
    let repaired = loop {
        let status = cluster.status(victim, PgId(0)).await;
        let point = status.map_or(Lsn::ZERO, |status| status.segment_complete_lsn.min(healthy.segment_complete_lsn));
        for page in 0..LOAD_PAGES {
            let reference = read_direct(cluster.address(0), PgId(0), PageId(page), point, healthy.epoch).await;
            match read_direct(cluster.address(victim), PgId(0), PageId(page), point, healthy.epoch).await {
                Some(Message::PageImage(image)) => {
                    served += 1;
                    // Node 0 serves only at or above its own minimum read point.
                    if let Some(Message::PageImage(good)) = &reference {
                        compared += 1;
                        if good.image != image.image || good.page_lsn != image.page_lsn {
                            differing += 1;
                        }
                    }
                }
                _ => refused += 1,
            }
        }
        if status
            .is_some_and(|status| !status.needs_repair && status.segment_complete_lsn >= healthy.segment_complete_lsn)
        {
            break Some(repair_started.elapsed());
        }
        if repair_started.elapsed() > Duration::from_secs(60) {
            break None;
        }
    };
    run.check(
        "no corrupt page is ever served",
        differing == 0 && compared > 0,
        format!(
            "{served} pages served by node {victim} during and after its repair ({refused} refused); {compared} \
             compared with node 0 at the same read point, {differing} differ"
        ),
    );
    run.check(
        "the node repairs itself from its peers",
        repaired.is_some(),
        repaired.map_or("not within 60 s".into(), |after| {
            format!("complete again {:.0} ms after its restart", after.as_secs_f64() * 1000.0)
        }),
    );
    verify_ledger(run, cluster, &ledger, "after the repair").await
}

async fn measure_latency(client: &Arc<VolumeClient>, duration: Duration) -> Result<LatencySummary> {
    let histogram = Arc::new(parking_lot::Mutex::new(new_histogram()));
    let deadline = Instant::now() + duration;
    let mut tasks = Vec::new();
    for writer in 0..LOAD_WRITERS {
        let (client, histogram) = (client.clone(), histogram.clone());
        tasks.push(tokio::spawn(async move {
            let mut value = 0;
            while Instant::now() < deadline {
                value += 1;
                let began = Instant::now();
                client.commit(&[load_change(writer, value, LOAD_PAGES)]).await?;
                histogram.lock().record(began.elapsed().as_micros() as u64).ok();
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let summary = LatencySummary::of(&histogram.lock());
    Ok(summary)
}

async fn slow_az(run: &mut Run, cluster: &mut ProcessCluster, options: &CrashOptions) -> Result<()> {
    let client = Arc::new(open_client(cluster).await?);
    let normal = measure_latency(&client, Duration::from_secs(5)).await?;
    run.note(format!(
        "all AZs normal: p50 {} µs, p99 {} µs over {} commits",
        normal.p50_us, normal.p99_us, normal.count
    ));
    // AZ 2 is nodes 2 and 5.
    for node in [2, 5] {
        cluster.kill(node);
        cluster.restart(node, options.slow_ms)?;
    }
    run.note(format!("nodes 2 and 5 (AZ 2) restarted with {} ms added to every frame they send", options.slow_ms));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let slow = measure_latency(&client, Duration::from_secs(5)).await?;
    run.note(format!("AZ 2 slow: p50 {} µs, p99 {} µs over {} commits", slow.p50_us, slow.p99_us, slow.count));
    let ratio = slow.p99_us as f64 / normal.p99_us.max(1) as f64;
    // A commit that waited for AZ 2 would take at least the added delay, so
    // a median under it shows the 4 of 6 quorum forms without the slow AZ.
    run.check(
        "4 of 6 does not wait for the slow AZ",
        slow.p50_us < options.slow_ms * 1000,
        format!(
            "p50 {} µs with AZ 2 slow against {} µs without; the added delay is {} ms",
            slow.p50_us, normal.p50_us, options.slow_ms
        ),
    );
    run.note(format!(
        "effect on p99: {} µs with AZ 2 slow against {} µs without ({ratio:.2}x)",
        slow.p99_us, normal.p99_us
    ));
    run.figure("normal", normal);
    run.figure("slow_az", slow);
    run.figure("p99_ratio", ratio);
    client.close();
    Ok(())
}

async fn repair(run: &mut Run, cluster: &mut ProcessCluster, options: &CrashOptions, rng: &mut SimRng) -> Result<()> {
    let page_bytes = cluster.file.volume.page_bytes as u64;
    let pages = options.repair_bytes.div_ceil(page_bytes);
    ensure!(pages > 0, "--repair-bytes must be at least one page");
    let pgs: Vec<PgId> = (0..options.pgs).map(PgId).collect();
    let base = value_base(1);
    let mut args = load_args(base);
    args.extend(["--fill".into(), pages.to_string(), "--fill-bytes".into(), page_bytes.to_string()]);
    let filled_at = Instant::now();
    let mut filler = cluster.writer(&args)?;
    filler.wait_filled(Duration::from_secs(3600))?;
    filler.kill()?;
    let mut ledger = Ledger::default();
    ledger.absorb(&filler, base);
    run.note(format!(
        "filled {pages} whole pages ({:.0} MiB) over {} PG(s) in {:.1} s",
        (pages * page_bytes) as f64 / 1048576.0,
        pgs.len(),
        filled_at.elapsed().as_secs_f64()
    ));
    let spare = cluster.file.nodes.iter().position(|node| node.spare).context("a repair cluster has a spare node")?;
    let az = cluster.file.nodes[spare].az;
    let candidates: Vec<usize> = (0..cluster.file.nodes.len())
        .filter(|index| !cluster.file.nodes[*index].spare && cluster.file.nodes[*index].az == az)
        .collect();
    let victim = candidates[rng.below(candidates.len() as u64) as usize];
    let witness = (0..cluster.file.nodes.len())
        .find(|index| *index != victim && !cluster.file.nodes[*index].spare)
        .expect("six nodes");
    cluster.kill(victim);
    run.note(format!("node {victim} killed -9: its segments are replaced by new ones on spare node {spare} (AZ {az})"));
    // The load goes on through the membership changes and the repair.
    let load_base = value_base(2);
    let mut args = load_args(load_base);
    args.extend(["--replace".into(), cluster.file.nodes[victim].id.to_string()]);
    let mut load = cluster.writer(&args)?;
    run.note("a writer recovers the volume, runs the load, and changes each PG's membership: joint, repair, settle");
    let replaced = load.wait_replaced(pgs.len(), Duration::from_secs(600));
    for change in &load.replaced {
        run.note(format!(
            "pg:{}: joint membership on a write quorum of both sets after {:.0} ms; the new segment complete through \
             {} after {:.0} ms; settled after {:.0} ms",
            change.pg, change.joint_durable_ms, change.catch_up_target, change.caught_up_ms, change.settled_ms
        ));
    }
    let all_replaced = replaced.is_ok();
    run.check(
        "every segment of the dead node is replaced (joint, then settled) while writes go on",
        all_replaced,
        match &replaced {
            Ok(()) => format!(
                "{} PG(s) moved to node {spare}; {} commits acknowledged meanwhile",
                pgs.len(),
                load.ack_count()
            ),
            Err(error) => format!("{error:#}"),
        },
    );
    let slowest_ms =
        load.replaced.iter().map(|change| change.caught_up_ms - change.joint_durable_ms).fold(0.0, f64::max);
    let rebuilt_bytes = pages * page_bytes;
    let mb_per_s = rebuilt_bytes as f64 / 1e6 / (slowest_ms / 1000.0).max(1e-3);
    run.check(
        "repair rebuilds at 200 MB/s or more",
        all_replaced && mb_per_s >= 200.0,
        format!(
            "{:.0} MiB of pages in {slowest_ms:.0} ms (joint membership durable to the new segment complete): {mb_per_s:.0} MB/s",
            rebuilt_bytes as f64 / 1048576.0
        ),
    );
    run.figure("rebuilt_bytes", rebuilt_bytes);
    run.figure("membership_changes", &load.replaced);
    run.figure("repair_mb_per_s", mb_per_s);
    cluster.file = ClusterFile::read(&cluster.path)?;
    let geometry = cluster.file.geometry()?;
    let (victim_id, spare_id) = (NodeId(cluster.file.nodes[victim].id), NodeId(cluster.file.nodes[spare].id));
    let settled = pgs.iter().all(|pg| {
        let membership = geometry.membership(*pg);
        membership.replacing.is_none() && membership.epoch == MembershipEpoch::INITIAL.next().next()
    });
    run.check(
        "the recorded membership names the new segments, two steps on",
        all_replaced
            && settled
            && geometry.segments_on(victim_id).is_empty()
            && geometry.segments_on(spare_id).len() == pgs.len(),
        format!(
            "node {victim} holds {} segments, node {spare} holds {}; membership epochs {:?}",
            geometry.segments_on(victim_id).len(),
            geometry.segments_on(spare_id).len(),
            pgs.iter().map(|pg| geometry.membership(*pg).epoch.0).collect::<Vec<_>>()
        ),
    );
    load.kill()?;
    ledger.absorb(&load, load_base);
    // The rebuilt pages against a peer's, at one read point (the load
    // stopped, so the minimum read point no longer moves).
    let (mut compared, mut differing) = (0u64, 0u64);
    for sample in 0..256u64.min(pages) {
        let index = sample * pages / 256.min(pages);
        let pg = PgId((index % u64::from(options.pgs)) as u32);
        let page =
            u64::from(pg.0) * cluster.file.geometry()?.pages_per_pg() + LOAD_PAGES + index / u64::from(options.pgs);
        let (Some(mine), Some(theirs)) = (cluster.status(spare, pg).await, cluster.status(witness, pg).await) else {
            continue;
        };
        let point = mine.segment_complete_lsn.min(theirs.segment_complete_lsn);
        let read = |at: usize| read_direct(cluster.address(at), pg, PageId(page), point, theirs.epoch);
        if let (Some(Message::PageImage(rebuilt)), Some(Message::PageImage(reference))) =
            (read(spare).await, read(witness).await)
        {
            compared += 1;
            if rebuilt.image != reference.image {
                differing += 1;
            }
        }
    }
    run.check(
        "rebuilt pages match a peer's",
        compared > 0 && differing == 0,
        format!(
            "{compared} filled pages read from node {spare} and node {witness} at the same point, {differing} differ"
        ),
    );
    verify_ledger(run, cluster, &ledger, "after the repair").await
}

/// The report as text: timeline, invariants, figures.
pub fn render(report: &CrashReport) -> String {
    let invariants: Vec<Vec<String>> = report
        .invariants
        .iter()
        .map(|invariant| {
            vec![
                invariant.name.clone(),
                if invariant.held { "holds" } else { "FAILS" }.into(),
                invariant.detail.clone(),
            ]
        })
        .collect();
    let name = clap::ValueEnum::to_possible_value(&report.scenario).map(|value| value.get_name().to_string());
    let mut text = format!("lab crash {} (seed {})\n\n", name.unwrap_or_default(), report.seed);
    text.push_str(&render_table(&["invariant", "result", "detail"], &invariants));
    text.push('\n');
    if report.data.pages_checked > 0 {
        text.push_str(&format!(
            "\ndata verified: {} acknowledged commits over {} pages; {} lost, {} invented\n",
            report.data.acknowledged_commits, report.data.pages_checked, report.data.lost, report.data.invented
        ));
    }
    // Short figures inline; long series are in the JSON report.
    for (name, value) in &report.figures {
        let shown = value.to_string();
        if shown.len() <= 160 {
            text.push_str(&format!("{name}: {shown}\n"));
        }
    }
    text
}
