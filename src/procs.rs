//! The process shape of the cluster: one role per OS process, so that a
//! crash experiment's `kill -9` is real.
//!
//! - A **cluster file** (TOML) names the volume's shape and every storage
//!   node: id, AZ, address, data directory. Every process reads it:
//!   `lab node storage --cluster F --node I` serves node `I`;
//!   `lab node writer --cluster F` recovers the volume and runs a write load.
//!   Spare nodes host nothing until a membership change places segments
//!   on them; the writer records each new membership in the file
//!   (`membership`), which every process then places segments by.
//! - [`ProcessCluster`] starts, kills (SIGKILL) and restarts the node
//!   processes of a cluster file on loopback; dropping it kills them all.
//! - [`WriterProcess`] runs `lab node writer` and reads what it reports on
//!   stdout, one line per event: `ready <open_ms> <epoch> <vdl>` once the
//!   volume is open, `filled <records>` after a prefill, and `ack <writer>
//!   <value>` after every acknowledged commit, and `replaced <pg> <joint_ms>
//!   <caught_up_ms> <settled_ms> <target_lsn>` after each membership change
//!   `--replace` asked for. A line is written only once
//!   its commit returned, so every `ack` the harness reads, also after a
//!   kill, is a commit the volume promised to keep.
//!
//! The write load of `lab node writer`: writer `w` commits values
//! `value_base + 1, + 2, ...` in turn, each 8 bytes at offset `8 w` of a
//! page chosen from the value by [`page_of`], so a checker knows for any
//! value which page it went to.

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use common::ids::{AzId, Lsn, NodeId, PageId, PgId};
use common::message::{Message, SegmentStatus, StatusRequest};
use common::redo::PageOp;
use common::transport::{TcpTransport, Transport};
use db_frontend::volume::client::{VolumeClient, VolumeConfig};
use db_frontend::volume::geometry::{ClusterConfig, NodeSpec, SegmentPlacement, VolumeGeometry};
use db_frontend::volume::writer::PageChange;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};
use storage_node::{DiskBackend, NodeConfig, SegmentConfig, StorageNode};

/// How long a started process may take to report itself ready.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The shape of a volume in a cluster file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeSpec {
    pub pg_count: u32,
    pub pg_bytes: u64,
    pub page_bytes: usize,
    /// Size of each preallocated segment log file.
    pub log_file_bytes: u64,
    pub disk: DiskBackend,
}

/// One storage node in a cluster file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeEntry {
    pub id: u32,
    pub az: u8,
    pub address: String,
    pub data_directory: PathBuf,
    /// Not placed on: a spare for membership changes.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub spare: bool,
}

/// What every process of a cluster reads (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterFile {
    pub volume: VolumeSpec,
    pub nodes: Vec<NodeEntry>,
    /// The volume's geometry as the writer last recorded it (after a
    /// membership change); absent, the volume is placed on the non-spare
    /// nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub membership: Option<VolumeGeometry>,
}

impl ClusterFile {
    pub fn read(path: &Path) -> Result<ClusterFile> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading cluster file {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("{} is not a valid cluster file", path.display()))
    }

    pub fn write(&self, path: &Path) -> Result<()> {
        crate::write_atomically(path, &toml::to_string_pretty(self)?)
    }

    /// Six nodes on free loopback ports, two per AZ (node `i` in AZ `i % 3`,
    /// as `LocalCluster`), then `spares` spare nodes (the same rule), with
    /// data under `directory`.
    pub fn local(directory: &Path, volume: VolumeSpec, spares: u32) -> Result<ClusterFile> {
        let count = 6 + spares;
        let mut ports = free_listen_ports(count as usize)?.into_iter();
        let nodes = (0..count)
            .map(|id| {
                let port = ports.next().expect("a port per node");
                Ok(NodeEntry {
                    id,
                    az: (id % 3) as u8,
                    address: format!("127.0.0.1:{port}"),
                    data_directory: directory.join(format!("node-{id}")),
                    spare: id >= 6,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(ClusterFile { volume, nodes, membership: None })
    }

    /// Records `geometry` as the volume's membership in the file at `path`
    /// (read again first: other fields may have changed).
    pub fn record_membership(path: &Path, geometry: &VolumeGeometry) -> Result<()> {
        let mut file = ClusterFile::read(path)?;
        file.membership = Some(geometry.clone());
        file.write(path)
    }

    /// Where every PG's segments live.
    pub fn geometry(&self) -> Result<VolumeGeometry> {
        if let Some(geometry) = &self.membership {
            let volume = &self.volume;
            ensure!(
                geometry.pg_count() == volume.pg_count
                    && geometry.pg_bytes == volume.pg_bytes
                    && geometry.page_bytes == volume.page_bytes
                    && geometry.memberships.len() == geometry.segments.len(),
                "the cluster file's recorded membership does not match its volume"
            );
            return Ok(geometry.clone());
        }
        let nodes = self
            .nodes
            .iter()
            .filter(|node| !node.spare)
            .map(|node| NodeSpec { id: NodeId(node.id), az: AzId(node.az), address: node.address.clone() })
            .collect();
        VolumeGeometry::place(
            &ClusterConfig { nodes },
            self.volume.pg_count,
            self.volume.pg_bytes,
            self.volume.page_bytes,
        )
        .map_err(|reason| anyhow::anyhow!("the cluster file's volume cannot be placed: {reason}"))
    }

    /// The configuration of node `id`: its segments and their gossip peers.
    pub fn node_config(&self, id: u32) -> Result<NodeConfig> {
        let entry = self
            .nodes
            .iter()
            .find(|node| node.id == id)
            .with_context(|| format!("no node {id} in the cluster file"))?;
        let geometry = self.geometry()?;
        let segments = geometry
            .segments_on(NodeId(id))
            .into_iter()
            .map(|(pg, _)| SegmentConfig {
                log_file_bytes: self.volume.log_file_bytes,
                ..SegmentConfig::new(pg, self.volume.page_bytes, geometry.pages_per_pg())
            })
            .collect();
        Ok(NodeConfig {
            node: NodeId(id),
            listen_address: entry.address.clone(),
            data_directory: entry.data_directory.clone(),
            disk: self.volume.disk,
            memory_store: Default::default(),
            segments,
            block_segments: Vec::new(),
            peers: geometry.peers_of(NodeId(id)),
            new_segment_log_file_bytes: self.volume.log_file_bytes,
        })
    }
}

/// Options of `lab node storage`.
#[derive(Clone, Debug, clap::Args)]
pub struct StorageNodeOptions {
    /// The cluster file (TOML: the volume's shape and every node).
    #[arg(long)]
    pub cluster: PathBuf,
    /// Which node of the cluster file to serve.
    #[arg(long)]
    pub node: u32,
    /// Delay every frame this node sends by this many milliseconds (a slow link).
    #[arg(long, default_value_t = 0)]
    pub send_delay_ms: u64,
}

/// `lab node storage`: serves one node until killed. Prints one
/// `recovered <pg> <scl> <records> <mid_log_corruptions> <torn_tail_bytes>`
/// line per segment, then `serving <address>`.
pub async fn run_storage_node(options: StorageNodeOptions) -> Result<()> {
    let file = ClusterFile::read(&options.cluster)?;
    let config = file.node_config(options.node)?;
    let transport: Arc<dyn Transport> = if options.send_delay_ms > 0 {
        Arc::new(TcpTransport::with_send_delay(Duration::from_millis(options.send_delay_ms)))
    } else {
        Arc::new(TcpTransport::new())
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    let node = loop {
        // A killed predecessor's port may take a moment to free.
        match StorageNode::start(config.clone(), transport.clone()).await {
            Ok(node) => break node,
            Err(error) if Instant::now() < deadline => {
                tracing::debug!(%error, "start: retrying");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(error) => return Err(error).context("starting the storage node"),
        }
    };
    let mut out = std::io::stdout().lock();
    for (pg, report) in &node.recovery {
        writeln!(
            out,
            "recovered {} {} {} {} {}",
            pg.0,
            report.segment_complete_lsn.0,
            report.records,
            report.mid_log_corruptions,
            report.truncated_tail_bytes
        )?;
    }
    writeln!(out, "serving {}", node.local_address())?;
    out.flush()?;
    drop(out);
    tokio::signal::ctrl_c().await?;
    node.stop();
    Ok(())
}

/// Options of `lab node writer`.
#[derive(Clone, Debug, clap::Args)]
pub struct WriterOptions {
    /// The cluster file.
    #[arg(long)]
    pub cluster: PathBuf,
    /// Concurrent committers.
    #[arg(long, default_value_t = 8)]
    pub writers: u32,
    /// Pages the load writes to (from page 0).
    #[arg(long, default_value_t = 256)]
    pub pages: u64,
    /// Values start above this (use a higher base for each run).
    #[arg(long, default_value_t = 0)]
    pub value_base: u64,
    /// Before the load, commit this many records to distinct pages above
    /// `--pages` (a long log that never coalesces), spread round-robin
    /// over the PGs, then print `filled`.
    #[arg(long, default_value_t = 0)]
    pub fill: u64,
    /// Bytes each prefill record writes at the start of its page (the
    /// page size fills whole pages).
    #[arg(long, default_value_t = 8)]
    pub fill_bytes: usize,
    /// Stop after this many commits per writer (0: until killed).
    #[arg(long, default_value_t = 0)]
    pub commits: u64,
    /// Once the volume is open (and filled), replace every segment on this
    /// node by one on a spare node of its AZ while the load runs (a
    /// membership change per PG, all at once), and record each new
    /// membership in the cluster file.
    #[arg(long)]
    pub replace: Option<u32>,
}

/// The page writer `writer`'s value `value` goes to.
pub fn page_of(writer: u32, value: u64, pages: u64) -> PageId {
    let mut mixed = value ^ (u64::from(writer) << 48) ^ 0x9e37_79b9_7f4a_7c15;
    mixed = (mixed ^ (mixed >> 31)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    mixed = (mixed ^ (mixed >> 29)).wrapping_mul(0x94d0_49bb_1331_11eb);
    PageId((mixed ^ (mixed >> 32)) % pages)
}

/// The change that writes `value` for `writer` (8 bytes at offset `8 w`).
pub fn load_change(writer: u32, value: u64, pages: u64) -> PageChange {
    let data = Bytes::copy_from_slice(&value.to_le_bytes());
    PageChange { page: page_of(writer, value, pages), op: PageOp::Write { offset: writer * 8, data } }
}

/// `lab node writer`: recovers the volume, reports `ready`, runs the load.
pub async fn run_writer(options: WriterOptions) -> Result<()> {
    let file = ClusterFile::read(&options.cluster)?;
    let geometry = file.geometry()?;
    ensure!(u64::from(options.writers) * 8 <= geometry.page_bytes as u64, "--writers does not fit a page's slots");
    ensure!(
        options.pages + options.fill.div_ceil(u64::from(geometry.pg_count())) <= geometry.pages_per_pg(),
        "--pages + --fill exceeds the volume's pages"
    );
    ensure!(
        (8..=geometry.page_bytes).contains(&options.fill_bytes),
        "--fill-bytes must be from 8 to the page size {}",
        geometry.page_bytes
    );
    let fill_shape = FillShape {
        first_page: options.pages,
        pg_count: u64::from(geometry.pg_count()),
        pages_per_pg: geometry.pages_per_pg(),
        record_bytes: options.fill_bytes,
    };
    let started = Instant::now();
    let client = Arc::new(VolumeClient::open(VolumeConfig::new(geometry), Arc::new(TcpTransport::new())).await?);
    let points = client.points();
    println!(
        "ready {} {} {}",
        started.elapsed().as_micros() as f64 / 1000.0,
        client.epoch().0,
        points.volume_durable.0
    );
    if options.fill > 0 {
        fill(&client, fill_shape, options.fill).await?;
        println!("filled {}", options.fill);
    }
    let (lines, printed) = mpsc::channel::<String>();
    let printer = std::thread::spawn(move || {
        let mut out = std::io::stdout().lock();
        for line in printed {
            if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
                return;
            }
        }
    });
    let mut tasks = Vec::new();
    for writer in 0..options.writers {
        let (client, lines) = (client.clone(), lines.clone());
        let options = options.clone();
        tasks.push(tokio::spawn(async move {
            let mut value = options.value_base;
            while options.commits == 0 || value - options.value_base < options.commits {
                value += 1;
                client.commit(&[load_change(writer, value, options.pages)]).await?;
                if lines.send(format!("ack {writer} {value}")).is_err() {
                    break;
                }
            }
            anyhow::Ok(())
        }));
    }
    if let Some(node) = options.replace {
        let replacements = replace_node(&client, &options.cluster, &file, NodeId(node))?;
        let lines = lines.clone();
        tasks.push(tokio::spawn(async move {
            for report in futures::future::try_join_all(replacements).await? {
                let ms = |duration: Duration| duration.as_secs_f64() * 1000.0;
                let line = format!(
                    "replaced {} {:.1} {:.1} {:.1} {}",
                    report.pg.0,
                    ms(report.joint_durable_after),
                    ms(report.caught_up_after),
                    ms(report.settled_after),
                    report.catch_up_target.0
                );
                if lines.send(line).is_err() {
                    break;
                }
            }
            anyhow::Ok(())
        }));
    }
    drop(lines);
    for task in tasks {
        task.await??;
    }
    printer.join().map_err(|_| anyhow::anyhow!("the output thread panicked"))?;
    Ok(())
}

/// How long a membership change may take (its repair of 1 GiB included).
const REPLACEMENT_TIMEOUT: Duration = Duration::from_secs(600);

/// One membership change per PG with a segment on `node`: each replaces it
/// by a segment on a spare node of the same AZ that holds none of that PG.
fn replace_node(
    client: &Arc<VolumeClient>,
    cluster: &Path,
    file: &ClusterFile,
    node: NodeId,
) -> Result<Vec<impl std::future::Future<Output = Result<db_frontend::volume::client::ReplacementReport>> + use<>>> {
    let geometry = client.geometry();
    let hosted = geometry.segments_on(node);
    ensure!(!hosted.is_empty(), "{node} holds no segment of the volume");
    let mut changes = Vec::new();
    for (pg, replica) in hosted {
        let az = geometry.segment(pg, replica).az;
        let spare = file
            .nodes
            .iter()
            .find(|entry| entry.spare && AzId(entry.az) == az && geometry.slot_on(pg, NodeId(entry.id)).is_none())
            .with_context(|| format!("no spare node in {az} for {pg}"))?;
        let incoming = SegmentPlacement { node: NodeId(spare.id), az, address: spare.address.clone() };
        let (client, cluster) = (client.clone(), cluster.to_path_buf());
        changes.push(async move {
            let record = |geometry: &VolumeGeometry| {
                ClusterFile::record_membership(&cluster, geometry).map_err(|error| format!("{error:#}"))
            };
            Ok(client.replace_segment(pg, replica, incoming, &record, REPLACEMENT_TIMEOUT).await?)
        });
    }
    Ok(changes)
}

/// Where and how much the prefill writes.
#[derive(Clone, Copy, Debug)]
struct FillShape {
    /// The first page of each PG the prefill uses.
    first_page: u64,
    pg_count: u64,
    pages_per_pg: u64,
    record_bytes: usize,
}

impl FillShape {
    /// Record `index` goes to PG `index % pg_count`, so every PG gets an equal share.
    fn change(&self, index: u64) -> PageChange {
        let page = (index % self.pg_count) * self.pages_per_pg + self.first_page + index / self.pg_count;
        let data: Vec<u8> = index.to_le_bytes().iter().copied().cycle().take(self.record_bytes).collect();
        PageChange { page: PageId(page), op: PageOp::Write { offset: 0, data: Bytes::from(data) } }
    }
}

/// Commits `records` one-page mini-transactions to distinct pages, 64 at a time.
async fn fill(client: &Arc<VolumeClient>, shape: FillShape, records: u64) -> Result<()> {
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let (client, next) = (client.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let index = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if index >= records {
                    return anyhow::Ok(());
                }
                client.commit(&[shape.change(index)]).await?;
            }
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(())
}

/// Ports below Linux's default ephemeral range (32768-60999) that are free
/// now. A node restarted after `kill -9` binds its port again; a port the
/// kernel could hand out as some connection's local port (as one chosen
/// with port 0 is) may be taken by then.
fn free_listen_ports(count: usize) -> Result<Vec<u16>> {
    const FIRST: u16 = 20000;
    const LAST: u16 = 32000;
    let start = FIRST + (std::process::id() % u32::from(LAST - FIRST)) as u16;
    let ports: Vec<u16> = (0..LAST - FIRST)
        .map(|offset| FIRST + (start - FIRST + offset) % (LAST - FIRST))
        .filter(|port| std::net::TcpListener::bind(("127.0.0.1", *port)).is_ok())
        .take(count)
        .collect();
    ensure!(ports.len() == count, "fewer than {count} free loopback ports in {FIRST}-{LAST}");
    Ok(ports)
}

/// A started child process, killed with SIGKILL when dropped.
#[derive(Debug)]
pub struct KilledOnDrop {
    child: Child,
}

impl KilledOnDrop {
    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for KilledOnDrop {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Lines a child prints on stdout, read on a thread.
fn read_lines(stdout: ChildStdout) -> mpsc::Receiver<String> {
    let (lines, received) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if lines.send(line).is_err() {
                return;
            }
        }
    });
    received
}

/// What a storage node process said when it started.
#[derive(Clone, Debug, Default, Serialize)]
pub struct NodeStart {
    /// Per PG: (SCL, records, mid-log corruptions, torn-tail bytes).
    pub segments: BTreeMap<u32, (u64, usize, usize, u64)>,
    pub start_ms: f64,
}

/// The six storage node processes of a cluster file.
#[derive(Debug)]
pub struct ProcessCluster {
    pub lab: PathBuf,
    pub file: ClusterFile,
    pub path: PathBuf,
    nodes: Vec<Option<KilledOnDrop>>,
}

impl ProcessCluster {
    /// Writes `file` to `path` and starts every node.
    pub fn start(lab: &Path, file: ClusterFile, path: &Path) -> Result<ProcessCluster> {
        file.write(path)?;
        let count = file.nodes.len();
        let mut cluster = ProcessCluster { lab: lab.to_path_buf(), file, path: path.to_path_buf(), nodes: Vec::new() };
        cluster.nodes.resize_with(count, || None);
        for index in 0..count {
            cluster.restart(index, 0)?;
        }
        Ok(cluster)
    }

    pub fn address(&self, index: usize) -> &str {
        &self.file.nodes[index].address
    }

    pub fn is_running(&self, index: usize) -> bool {
        self.nodes[index].is_some()
    }

    /// `kill -9` node `index`.
    pub fn kill(&mut self, index: usize) {
        if let Some(mut node) = self.nodes[index].take() {
            node.kill();
        }
    }

    /// Starts node `index` (again) with a delay on what it sends, and waits
    /// until it serves; returns what its recovery found.
    pub fn restart(&mut self, index: usize, send_delay_ms: u64) -> Result<NodeStart> {
        ensure!(self.nodes[index].is_none(), "node {index} is running");
        let started = Instant::now();
        let mut child = Command::new(&self.lab)
            .args(["node", "storage", "--cluster"])
            .arg(&self.path)
            .args(["--node", &self.file.nodes[index].id.to_string(), "--send-delay-ms", &send_delay_ms.to_string()])
            .stdout(Stdio::piped())
            .spawn()
            .context("spawning lab node storage")?;
        let lines = read_lines(child.stdout.take().expect("piped"));
        let guard = KilledOnDrop { child };
        let mut report = NodeStart::default();
        loop {
            let line = lines
                .recv_timeout(START_TIMEOUT)
                .with_context(|| format!("node {index} did not start within {START_TIMEOUT:?}"))?;
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                ["recovered", pg, scl, records, corruptions, torn] => {
                    report
                        .segments
                        .insert(pg.parse()?, (scl.parse()?, records.parse()?, corruptions.parse()?, torn.parse()?));
                }
                ["serving", ..] => break,
                _ => bail!("node {index} printed {line:?}"),
            }
        }
        report.start_ms = started.elapsed().as_secs_f64() * 1000.0;
        self.nodes[index] = Some(guard);
        Ok(report)
    }

    /// Kills every node.
    pub fn stop(&mut self) {
        for index in 0..self.nodes.len() {
            self.kill(index);
        }
    }

    /// A segment's status, asked over TCP (`None`: the node does not answer).
    pub async fn status(&self, index: usize, pg: PgId) -> Option<SegmentStatus> {
        let transport = TcpTransport::new();
        let ask = async {
            let mut connection = transport.connect(self.address(index).to_string()).await.ok()?;
            connection.sender.send(Message::StatusRequest(StatusRequest { request_id: 1, pg }).encode()).await.ok()?;
            let frame = connection.receiver.recv().await?.ok()?;
            match Message::decode(&frame).ok()? {
                Message::Status(status) => Some(status),
                _ => None,
            }
        };
        tokio::time::timeout(Duration::from_secs(2), ask).await.ok().flatten()
    }

    /// A `lab node writer` process on this cluster.
    pub fn writer(&self, extra: &[String]) -> Result<WriterProcess> {
        WriterProcess::start(&self.lab, &self.path, extra)
    }
}

/// A running `lab node writer`.
#[derive(Debug)]
pub struct WriterProcess {
    process: KilledOnDrop,
    lines: mpsc::Receiver<String>,
    pub spawned: Instant,
    /// Milliseconds from spawn until `ready`, and the writer's own open time.
    pub ready_ms: f64,
    pub open_ms: f64,
    pub epoch: u64,
    pub recovered_vdl: Lsn,
    /// Acknowledged values per writer, in order.
    pub acks: BTreeMap<u32, Vec<u64>>,
    /// The membership changes `--replace` finished.
    pub replaced: Vec<Replaced>,
}

/// A `replaced` line: one PG's membership change, in milliseconds since it began.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Replaced {
    pub pg: u32,
    pub joint_durable_ms: f64,
    pub caught_up_ms: f64,
    pub settled_ms: f64,
    pub catch_up_target: u64,
}

impl WriterProcess {
    fn start(lab: &Path, cluster: &Path, extra: &[String]) -> Result<WriterProcess> {
        let spawned = Instant::now();
        let mut child = Command::new(lab)
            .args(["node", "writer", "--cluster"])
            .arg(cluster)
            .args(extra)
            .stdout(Stdio::piped())
            .spawn()
            .context("spawning lab node writer")?;
        let lines = read_lines(child.stdout.take().expect("piped"));
        let process = KilledOnDrop { child };
        let line = lines.recv_timeout(START_TIMEOUT).context("the writer did not open the volume in time")?;
        let words: Vec<&str> = line.split_whitespace().collect();
        let ["ready", open_ms, epoch, vdl] = words.as_slice() else { bail!("the writer printed {line:?}") };
        Ok(WriterProcess {
            process,
            lines,
            ready_ms: spawned.elapsed().as_secs_f64() * 1000.0,
            spawned,
            open_ms: open_ms.parse()?,
            epoch: epoch.parse()?,
            recovered_vdl: Lsn(vdl.parse()?),
            acks: BTreeMap::new(),
            replaced: Vec::new(),
        })
    }

    /// Reads what arrived; returns whether a `filled` line came.
    fn drain(&mut self, wait: Duration) -> Result<bool> {
        let deadline = Instant::now() + wait;
        let mut filled = false;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match self.lines.recv_timeout(left) {
                Ok(line) => line,
                Err(mpsc::RecvTimeoutError::Timeout) => return Ok(filled),
                Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(filled),
            };
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                ["ack", writer, value] => self.acks.entry(writer.parse()?).or_default().push(value.parse()?),
                ["filled", _] => filled = true,
                ["replaced", pg, joint, caught_up, settled, target] => self.replaced.push(Replaced {
                    pg: pg.parse()?,
                    joint_durable_ms: joint.parse()?,
                    caught_up_ms: caught_up.parse()?,
                    settled_ms: settled.parse()?,
                    catch_up_target: target.parse()?,
                }),
                _ => bail!("the writer printed {line:?}"),
            }
        }
    }

    /// Lets the load run for `duration`, collecting acknowledgements.
    pub fn run_for(&mut self, duration: Duration) -> Result<()> {
        self.drain(duration).map(|_| ())
    }

    /// Waits (at most `timeout`) for the prefill to finish.
    pub fn wait_filled(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.drain(Duration::from_millis(200))? {
                return Ok(());
            }
        }
        bail!("the prefill did not finish within {timeout:?}")
    }

    /// Waits (at most `timeout`) until `count` membership changes finished.
    pub fn wait_replaced(&mut self, count: usize, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while self.replaced.len() < count {
            ensure!(
                Instant::now() < deadline,
                "{} of {count} membership changes within {timeout:?}",
                self.replaced.len()
            );
            self.drain(Duration::from_millis(200))?;
        }
        Ok(())
    }

    /// `kill -9`, then reads every line it printed before dying.
    pub fn kill(&mut self) -> Result<()> {
        self.process.kill();
        while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(500)) {
            let words: Vec<&str> = line.split_whitespace().collect();
            if let ["ack", writer, value] = words.as_slice() {
                self.acks.entry(writer.parse()?).or_default().push(value.parse()?);
            }
        }
        Ok(())
    }

    pub fn ack_count(&self) -> usize {
        self.acks.values().map(Vec::len).sum()
    }
}
