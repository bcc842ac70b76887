//! The storage node driver: accepts connections, routes messages to segment
//! cores, carries out their actions on the disk and the wire.
//!
//! Everything protocol-shaped is in [`crate::segment::SegmentCore`]; this
//! file only moves bytes. Each connection is one task that decodes frames and
//! calls into the segment under its lock; disk completions arrive on disk
//! threads and run the same action loop; acknowledgements are queued on the
//! connection's bounded send queue (a full queue drops the ack, which is safe
//! because the next ack carries a newer SCL).
//!
//! A malformed, oversized or wrong-version frame, or a payload that is not a
//! valid message, closes only the connection it came on, with a logged reason.

use crate::block_segment::{BlockAction, BlockSegmentConfig, BlockSegmentCore};
use crate::disk::{DiskBackend, LogDisk, MemoryVolumeStore, StdFileDisk, UringDisk, UringRing};
use crate::log_format::{LOG_FORMAT_VERSION, ScanResult, log_format_version, scan_log};
use crate::segment::{Action, LogWrite, PeerRepairStats, RecoveryReport, ReplyTo, SegmentConfig, SegmentCore};
use common::ids::{Epoch, NodeId, PgId};
use common::limits::{NODE_CONNECTIONS_MAX, NODE_SEGMENTS_MAX};
use common::message::{ErrorCode, ErrorResponse, Message, PageImage, SegmentStatus, SetMembershipRequest};
use common::transport::{Connection, FrameSender, Transport};
use parking_lot::{Mutex, RwLock};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use thiserror::Error;
use tokio::sync::{Notify, Semaphore};
use tokio::task::AbortHandle;
use tracing::{debug, error, info, warn};

/// How often idle segments get a chance to coalesce and clean, and each
/// segment may ask a peer for records it lacks (gossip).
const BACKGROUND_INTERVAL: Duration = Duration::from_millis(20);
/// How long a node waits for its new segments' first log write at start.
const SEGMENT_CREATION_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a node could not start.
#[derive(Debug, Error)]
pub enum NodeError {
    #[error("storage node I/O: {0}")]
    Io(#[from] io::Error),
    #[error("segment {pg} could not be opened: {reason}")]
    Segment { pg: PgId, reason: String },
    #[error("invalid node configuration: {0}")]
    Config(String),
}

/// What a node hosts and where.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub node: NodeId,
    /// Where to listen ("127.0.0.1:0" for any free port).
    pub listen_address: String,
    /// One subdirectory per segment lives here (unused by the memory backend).
    pub data_directory: PathBuf,
    pub disk: DiskBackend,
    /// Durable images for the memory backend, shared across restarts.
    pub memory_store: MemoryVolumeStore,
    pub segments: Vec<SegmentConfig>,
    /// Segments of block volumes (the file system's shared disk).
    pub block_segments: Vec<BlockSegmentConfig>,
    /// For each hosted redo segment, the addresses of the nodes holding the
    /// other segments of its PG: whom it gossips with. Also settable while
    /// running ([`StorageNode::set_peers`]).
    pub peers: BTreeMap<PgId, Vec<String>>,
    /// Size of each log file of a segment this node creates when a
    /// membership change places a new segment here.
    pub new_segment_log_file_bytes: u64,
}

/// What the driver does for one action of a core.
enum Step {
    Write(LogWrite),
    Send(ReplyTo, Message),
    Delete(u64),
}

/// A segment state machine the driver runs: a redo segment or a block
/// segment. Both log through the same disks with the same driver.
trait LogCore: Send + fmt::Debug + 'static {
    type Action: Send;
    fn write_done(&mut self, id: u64) -> Vec<Self::Action>;
    fn write_failed(&mut self, id: u64, reason: String) -> Vec<Self::Action>;
    fn background(&mut self) -> Vec<Self::Action>;
    fn pg(&self) -> PgId;
    fn step(action: Self::Action) -> Step;
}

impl LogCore for SegmentCore {
    type Action = Action;
    fn write_done(&mut self, id: u64) -> Vec<Action> {
        SegmentCore::write_done(self, id)
    }
    fn write_failed(&mut self, id: u64, reason: String) -> Vec<Action> {
        SegmentCore::write_failed(self, id, reason)
    }
    fn background(&mut self) -> Vec<Action> {
        SegmentCore::background(self)
    }
    fn pg(&self) -> PgId {
        self.config().pg
    }
    fn step(action: Action) -> Step {
        match action {
            Action::Write(write) => Step::Write(write),
            Action::Ack { to, ack } => Step::Send(to, Message::AppendAck(ack)),
            Action::Refuse { to, error } => Step::Send(to, Message::Error(error)),
            Action::Status { to, status } => Step::Send(to, Message::Status(status)),
            Action::DeleteFile(file) => Step::Delete(file),
        }
    }
}

impl LogCore for BlockSegmentCore {
    type Action = BlockAction;
    fn write_done(&mut self, id: u64) -> Vec<BlockAction> {
        BlockSegmentCore::write_done(self, id)
    }
    fn write_failed(&mut self, id: u64, reason: String) -> Vec<BlockAction> {
        BlockSegmentCore::write_failed(self, id, reason)
    }
    fn background(&mut self) -> Vec<BlockAction> {
        BlockSegmentCore::background(self)
    }
    fn pg(&self) -> PgId {
        self.config().pg
    }
    fn step(action: BlockAction) -> Step {
        match action {
            BlockAction::Write(write) => Step::Write(write),
            BlockAction::Send { to, message } => Step::Send(to, message),
            BlockAction::DeleteFile(file) => Step::Delete(file),
        }
    }
}

/// One segment core with its disk.
#[derive(Debug)]
struct SegmentDriver<C> {
    core: Mutex<C>,
    disk: Arc<dyn LogDisk>,
    replies: Arc<Replies>,
    /// Wakes the node's catch-up streaming (see `stream_catch_ups`) when a
    /// write completes: a catch-up's next batch may be due.
    write_completed: Arc<Notify>,
}

/// The send queues of open connections, by connection id.
#[derive(Debug, Default)]
struct Replies {
    senders: Mutex<HashMap<ReplyTo, FrameSender>>,
}

impl Replies {
    fn send(&self, to: ReplyTo, message: &Message) {
        let sender = self.senders.lock().get(&to).cloned();
        if let Some(sender) = sender
            && let Err(error) = sender.try_send(message.encode())
        {
            debug!(connection = to, %error, "reply dropped");
        }
    }
}

impl<C: LogCore> SegmentDriver<C> {
    /// Carries out actions until none are left. Writes that complete
    /// synchronously (memory disk) feed their follow-ups back into the loop
    /// instead of recursing.
    fn run(self: &Arc<Self>, actions: Vec<C::Action>) {
        let mut pending = actions;
        while !pending.is_empty() {
            let mut follow_ups = Vec::new();
            for action in pending {
                match C::step(action) {
                    Step::Write(write) => {
                        let id = write.id;
                        let driver = self.clone();
                        let done = Box::new(move |result| {
                            let actions = driver.completed(id, result);
                            driver.run(actions);
                        });
                        if let Some(result) = self.disk.write_durable(write, done) {
                            follow_ups.extend(self.completed(id, result));
                        }
                    }
                    Step::Send(to, message) => self.replies.send(to, &message),
                    Step::Delete(file) => {
                        if let Err(error) = self.disk.delete_file(file) {
                            warn!(%error, file, "could not delete a cleaned log file");
                        }
                    }
                }
            }
            pending = follow_ups;
        }
    }

    fn completed(&self, id: u64, result: io::Result<()>) -> Vec<C::Action> {
        let actions = {
            let mut core = self.core.lock();
            match result {
                Ok(()) => core.write_done(id),
                Err(error) => {
                    error!(pg = %core.pg(), %error, "log write failed; the segment stops taking writes");
                    core.write_failed(id, error.to_string())
                }
            }
        };
        self.write_completed.notify_one();
        actions
    }

    fn background(self: &Arc<Self>) {
        let actions = self.core.lock().background();
        self.run(actions);
    }
}

#[derive(Debug)]
struct NodeShared {
    node: NodeId,
    /// Grows when a membership change places a new segment here.
    segments: RwLock<BTreeMap<PgId, RedoDriver>>,
    /// What a new segment is created with.
    config: NodeConfig,
    ring: Option<Arc<UringRing>>,
    write_completed: Arc<Notify>,
    /// Gossip peers of each redo segment, and the connections to them.
    peers: Mutex<BTreeMap<PgId, Vec<String>>>,
    peer_links: PeerLinks,
    block_segments: BTreeMap<PgId, BlockDriver>,
    replies: Arc<Replies>,
    next_connection: AtomicU64,
    connection_slots: Arc<Semaphore>,
    tasks: Mutex<Vec<AbortHandle>>,
}

impl NodeShared {
    fn segment(&self, pg: PgId) -> Option<RedoDriver> {
        self.segments.read().get(&pg).cloned()
    }

    fn redo_segments(&self) -> Vec<(PgId, RedoDriver)> {
        self.segments.read().iter().map(|(pg, driver)| (*pg, driver.clone())).collect()
    }

    fn set_peers(&self, pg: PgId, addresses: Vec<String>) {
        self.peers.lock().insert(pg, spread_peers(pg, addresses));
    }

    /// The segment a membership change places here: opened from its
    /// directory if it has a log there (the node restarted since, without
    /// it in its configuration), else created empty to repair itself from
    /// its peers.
    fn place_segment(&self, request: &SetMembershipRequest) -> Result<RedoDriver, String> {
        let pg = request.pg;
        let mut segments = self.segments.write();
        if let Some(driver) = segments.get(&pg) {
            return Ok(driver.clone());
        }
        if segments.len() + self.block_segments.len() >= NODE_SEGMENTS_MAX {
            return Err(format!("this node hosts NODE_SEGMENTS_MAX ({NODE_SEGMENTS_MAX}) segments"));
        }
        let segment = SegmentConfig {
            log_file_bytes: self.config.new_segment_log_file_bytes,
            ..SegmentConfig::new(pg, request.page_bytes as usize, request.pages_per_pg)
        };
        let disk = open_disk(&self.config, &segment_directory(pg), segment.log_file_bytes, &self.ring)
            .map_err(|error| format!("opening the new segment's disk: {error}"))?;
        let (driver, report, actions) = open_segment(segment, disk, self.replies.clone(), self.write_completed.clone())
            .map_err(|error| error.to_string())?;
        if report == RecoveryReport::default() {
            // A new replica takes its peers' whole page state.
            driver.core.lock().gossip_hydrate_now();
        }
        info!(%pg, recovered = ?report, "segment placed on this node by a membership change");
        segments.insert(pg, driver.clone());
        drop(segments);
        driver.run(actions);
        Ok(driver)
    }
}

/// The directory of a redo segment under the node's data directory.
fn segment_directory(pg: PgId) -> String {
    format!("pg-{:06}", pg.0)
}

/// A running storage node. [`StorageNode::stop`] (or drop) ends it like a
/// crash: tasks are aborted, nothing more is acknowledged, and whatever
/// reached fdatasync is what a restart finds.
#[derive(Debug)]
pub struct StorageNode {
    shared: Arc<NodeShared>,
    local_address: String,
    /// What each segment found in its log when the node started.
    pub recovery: BTreeMap<PgId, RecoveryReport>,
}

/// Opens the disk of a segment, in its own directory `name`.
fn open_disk(
    config: &NodeConfig,
    name: &str,
    log_file_bytes: u64,
    ring: &Option<Arc<UringRing>>,
) -> io::Result<Arc<dyn LogDisk>> {
    let directory = config.data_directory.join(name);
    Ok(match config.disk {
        DiskBackend::Std => Arc::new(StdFileDisk::open(&directory, log_file_bytes)?),
        DiskBackend::IoUring => {
            Arc::new(UringDisk::open(&directory, log_file_bytes, ring.clone().expect("ring started for io_uring"))?)
        }
        DiskBackend::Memory => Arc::new(config.memory_store.disk(&format!("{}/{name}", config.node))),
    })
}

type RedoDriver = Arc<SegmentDriver<SegmentCore>>;
type BlockDriver = Arc<SegmentDriver<BlockSegmentCore>>;

/// Reads a segment's log back: `None` for a new segment (nothing but
/// zeros), else what the scan found, with a torn tail already zeroed.
fn read_log(disk: &dyn LogDisk, pg: PgId) -> io::Result<Option<ScanResult>> {
    let files = disk.read_all()?;
    if files.iter().all(|(_, bytes)| bytes.iter().all(|byte| *byte == 0)) {
        return Ok(None);
    }
    if let Some(version) = log_format_version(&files).filter(|version| *version != LOG_FORMAT_VERSION) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{pg}: the log is in format version {version}; this build reads version {LOG_FORMAT_VERSION}"),
        ));
    }
    let scan = scan_log(&files);
    if scan.truncated_tail_bytes > 0 {
        let (end, bytes) = (scan.end, scan.truncated_tail_bytes);
        warn!(%pg, bytes, file = end.file, offset = end.offset, "torn log tail truncated");
        disk.zero(end, bytes)?;
    }
    Ok(Some(scan))
}

/// Opens (or creates) one segment from its disk.
fn open_segment(
    segment: SegmentConfig,
    disk: Arc<dyn LogDisk>,
    replies: Arc<Replies>,
    write_completed: Arc<Notify>,
) -> Result<(RedoDriver, RecoveryReport, Vec<Action>), NodeError> {
    let pg = segment.pg;
    let (core, report, actions) = match read_log(disk.as_ref(), pg)? {
        None => {
            let (core, actions) =
                SegmentCore::create(segment, Epoch::INITIAL).map_err(|reason| NodeError::Segment { pg, reason })?;
            (core, RecoveryReport::default(), actions)
        }
        Some(scan) => {
            let (core, report) =
                SegmentCore::recover(segment, scan).map_err(|reason| NodeError::Segment { pg, reason })?;
            if report.mid_log_corruptions > 0 {
                error!(%pg, corruptions = report.mid_log_corruptions, scl = %report.segment_complete_lsn,
                    "corrupt records in the middle of the log: segment needs repair");
            }
            (core, report, Vec::new())
        }
    };
    Ok((Arc::new(SegmentDriver { core: Mutex::new(core), disk, replies, write_completed }), report, actions))
}

/// Opens (or creates) one block segment from its disk.
fn open_block_segment(
    segment: BlockSegmentConfig,
    disk: Arc<dyn LogDisk>,
    replies: Arc<Replies>,
    write_completed: Arc<Notify>,
) -> Result<(BlockDriver, Vec<BlockAction>), NodeError> {
    let pg = segment.pg;
    let (core, actions) = match read_log(disk.as_ref(), pg)? {
        None => BlockSegmentCore::create(segment).map_err(|reason| NodeError::Segment { pg, reason })?,
        Some(scan) => {
            let (core, corruptions) =
                BlockSegmentCore::recover(segment, scan).map_err(|reason| NodeError::Segment { pg, reason })?;
            if corruptions > 0 {
                error!(%pg, corruptions, "corrupt entries in the middle of a block log: segment needs repair");
            }
            (core, Vec::new())
        }
    };
    Ok((Arc::new(SegmentDriver { core: Mutex::new(core), disk, replies, write_completed }), actions))
}

impl StorageNode {
    /// Opens every segment (recovering from its log), then starts serving.
    pub async fn start(config: NodeConfig, transport: Arc<dyn Transport>) -> Result<StorageNode, NodeError> {
        let segment_count = config.segments.len() + config.block_segments.len();
        if segment_count > NODE_SEGMENTS_MAX {
            return Err(NodeError::Config(format!(
                "{segment_count} segments; NODE_SEGMENTS_MAX is {NODE_SEGMENTS_MAX}"
            )));
        }
        let ring = match config.disk {
            DiskBackend::IoUring => Some(UringRing::start()?),
            _ => None,
        };
        let replies = Arc::new(Replies::default());
        let write_completed = Arc::new(Notify::new());
        let mut segments = BTreeMap::new();
        let mut recovery = BTreeMap::new();
        let mut first_actions = Vec::new();
        for segment in &config.segments {
            let disk = open_disk(&config, &segment_directory(segment.pg), segment.log_file_bytes, &ring)?;
            let (driver, report, actions) =
                open_segment(segment.clone(), disk, replies.clone(), write_completed.clone())?;
            if segments.insert(segment.pg, driver.clone()).is_some() {
                return Err(NodeError::Config(format!("{} listed twice", segment.pg)));
            }
            recovery.insert(segment.pg, report);
            first_actions.push((driver, actions));
        }
        let mut block_segments = BTreeMap::new();
        let mut first_block_actions = Vec::new();
        for segment in &config.block_segments {
            let name = format!("block-pg-{:06}", segment.pg.0);
            let disk = open_disk(&config, &name, segment.log_file_bytes, &ring)?;
            let (driver, actions) =
                open_block_segment(segment.clone(), disk, replies.clone(), write_completed.clone())?;
            if block_segments.insert(segment.pg, driver.clone()).is_some() {
                return Err(NodeError::Config(format!("block {} listed twice", segment.pg)));
            }
            first_block_actions.push((driver, actions));
        }
        for (driver, actions) in &mut first_actions {
            driver.run(std::mem::take(actions));
        }
        for (driver, actions) in &mut first_block_actions {
            driver.run(std::mem::take(actions));
        }
        // A new segment serves only once its first checkpoint (and with it the
        // zero-filled first log file) is durable: otherwise the first appends
        // would wait behind that file's creation.
        let deadline = tokio::time::Instant::now() + SEGMENT_CREATION_TIMEOUT;
        let busy = || {
            first_actions.iter().any(|(driver, _)| !driver.core.lock().is_idle())
                || first_block_actions.iter().any(|(driver, _)| !driver.core.lock().is_idle())
        };
        while busy() {
            if tokio::time::Instant::now() > deadline {
                return Err(NodeError::Config(format!(
                    "new segments were not durably created within {SEGMENT_CREATION_TIMEOUT:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let mut listener = transport.bind(config.listen_address.clone()).await?;
        let local_address = listener.local_address().to_string();
        let shared = Arc::new(NodeShared {
            node: config.node,
            segments: RwLock::new(segments),
            ring,
            write_completed: write_completed.clone(),
            peers: Mutex::new(
                config.peers.iter().map(|(pg, addresses)| (*pg, spread_peers(*pg, addresses.clone()))).collect(),
            ),
            peer_links: PeerLinks {
                transport: transport.clone(),
                senders: Mutex::new(HashMap::new()),
                batch_arrived: Notify::new(),
            },
            block_segments,
            replies,
            next_connection: AtomicU64::new(1),
            connection_slots: Arc::new(Semaphore::new(NODE_CONNECTIONS_MAX)),
            tasks: Mutex::new(Vec::new()),
            config: config.clone(),
        });
        info!(node = %config.node, address = %local_address, segments = shared.segments.read().len(),
            block_segments = shared.block_segments.len(), "storage node serving");

        let accept_shared = shared.clone();
        let accept = tokio::spawn(async move {
            while let Ok(connection) = listener.accept().await {
                let Ok(permit) = accept_shared.connection_slots.clone().try_acquire_owned() else {
                    warn!(peer = %connection.peer, "refusing connection: NODE_CONNECTIONS_MAX ({NODE_CONNECTIONS_MAX}) reached");
                    continue;
                };
                let connection_shared = accept_shared.clone();
                let task = tokio::spawn(async move {
                    serve_connection(&connection_shared, connection).await;
                    drop(permit);
                });
                let mut tasks = accept_shared.tasks.lock();
                tasks.retain(|handle| !handle.is_finished());
                tasks.push(task.abort_handle());
            }
        });
        let background_shared = shared.clone();
        let background = tokio::spawn(async move {
            let mut interval = tokio::time::interval(BACKGROUND_INTERVAL);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                interval.tick().await;
                background_shared.redo_segments().iter().for_each(|(_, driver)| driver.background());
                background_shared.block_segments.values().for_each(SegmentDriver::background);
                gossip_round(&background_shared);
            }
        });
        let streaming_shared = shared.clone();
        let streaming = tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = write_completed.notified() => {}
                    () = streaming_shared.peer_links.batch_arrived.notified() => {}
                }
                stream_catch_ups(&streaming_shared);
            }
        });
        shared.tasks.lock().extend([accept.abort_handle(), background.abort_handle(), streaming.abort_handle()]);
        Ok(StorageNode { shared, local_address, recovery })
    }

    pub fn node(&self) -> NodeId {
        self.shared.node
    }

    /// The address clients connect to.
    pub fn local_address(&self) -> &str {
        &self.local_address
    }

    /// A segment's state, read directly (for tools and tests).
    pub fn segment_status(&self, pg: PgId) -> Option<SegmentStatus> {
        self.shared.segment(pg).map(|driver| driver.core.lock().status(0))
    }

    /// What a segment took from its peers (gossip, repair) since the node started.
    pub fn peer_repair_stats(&self, pg: PgId) -> Option<PeerRepairStats> {
        self.shared.segment(pg).map(|driver| driver.core.lock().peer_repair_stats())
    }

    /// Sets whom the segment of `pg` gossips with.
    pub fn set_peers(&self, pg: PgId, addresses: Vec<String>) {
        self.shared.set_peers(pg, addresses);
    }

    /// Stops the node as a crash would: no goodbye, no flush, no more acks.
    pub fn stop(&self) {
        for task in self.shared.tasks.lock().drain(..) {
            task.abort();
        }
        self.shared.replies.senders.lock().clear();
    }
}

impl Drop for StorageNode {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn serve_connection(shared: &NodeShared, mut connection: Connection) {
    let id = shared.next_connection.fetch_add(1, Ordering::Relaxed);
    shared.replies.senders.lock().insert(id, connection.sender.clone());
    debug!(connection = id, peer = %connection.peer, "connection opened");
    while let Some(frame) = connection.receiver.recv().await {
        let frame = match frame {
            Ok(frame) => frame,
            Err(error) => {
                warn!(peer = %connection.peer, %error, "closing connection: bad frame");
                break;
            }
        };
        let message = match Message::decode(&frame) {
            Ok(message) => message,
            Err(error) => {
                warn!(peer = %connection.peer, %error, "closing connection: bad message");
                break;
            }
        };
        if let Err(reason) = handle(shared, id, &connection.sender, message) {
            warn!(peer = %connection.peer, reason, "closing connection: protocol violation");
            break;
        }
    }
    shared.replies.senders.lock().remove(&id);
    debug!(connection = id, peer = %connection.peer, "connection closed");
}

/// Connections to peer nodes for gossip, one per address, opened on first
/// use; answers come back on a task per connection.
struct PeerLinks {
    transport: Arc<dyn Transport>,
    /// `None` while connecting.
    senders: Mutex<HashMap<String, Option<FrameSender>>>,
    /// A batch from a peer came in: the next request may be due.
    batch_arrived: Notify,
}

impl fmt::Debug for PeerLinks {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.debug_struct("PeerLinks").field("connected", &self.senders.lock().len()).finish()
    }
}

/// A segment asks its peers in list order, starting with the first: each
/// PG's list starts at a different peer, so the repair of a node's many
/// segments spreads over its peers.
fn spread_peers(pg: PgId, mut addresses: Vec<String>) -> Vec<String> {
    if !addresses.is_empty() {
        let first = pg.0 as usize % addresses.len();
        addresses.rotate_left(first);
    }
    addresses
}

/// One gossip round: every redo segment that should ask a peer for
/// records does (see `SegmentCore::gossip_due`). A peer not connected yet
/// is connected in the background; that round's request is lost, and the
/// segment asks again.
fn gossip_round(shared: &Arc<NodeShared>) {
    ask_peers(shared, |core, peer_count| core.gossip_due(peer_count));
}

/// Between rounds, after a write completed or a batch from a peer
/// arrived: every catch-up in progress asks for its next batch if it is
/// due (see `SegmentCore::catch_up_request_due`).
fn stream_catch_ups(shared: &Arc<NodeShared>) {
    ask_peers(shared, |core, peer_count| core.catch_up_request_due(peer_count));
}

/// Sends each redo segment's request, if `due` gives one, to the peer it names.
fn ask_peers(shared: &Arc<NodeShared>, mut due: impl FnMut(&mut SegmentCore, usize) -> Option<(usize, Message)>) {
    let peers = shared.peers.lock().clone();
    for (pg, driver) in &shared.redo_segments() {
        let Some(addresses) = peers.get(pg).filter(|addresses| !addresses.is_empty()) else { continue };
        let Some((index, request)) = due(&mut driver.core.lock(), addresses.len()) else { continue };
        let request = request.encode();
        let address = &addresses[index];
        let link = shared.peer_links.senders.lock().get(address).cloned();
        match link {
            Some(Some(sender)) => {
                if sender.try_send(request).is_err() {
                    shared.peer_links.senders.lock().remove(address);
                }
            }
            Some(None) => {} // connecting
            None => {
                shared.peer_links.senders.lock().insert(address.clone(), None);
                connect_peer(shared.clone(), address.clone());
            }
        }
    }
}

fn connect_peer(shared: Arc<NodeShared>, address: String) {
    let tasks = shared.clone();
    let task = tokio::spawn(async move {
        let mut connection = match shared.peer_links.transport.connect(address.clone()).await {
            Ok(connection) => connection,
            Err(error) => {
                debug!(%address, %error, "gossip: peer not reachable");
                tokio::time::sleep(BACKGROUND_INTERVAL * 10).await;
                shared.peer_links.senders.lock().remove(&address);
                return;
            }
        };
        shared.peer_links.senders.lock().insert(address.clone(), Some(connection.sender.clone()));
        while let Some(Ok(frame)) = connection.receiver.recv().await {
            match Message::decode(&frame) {
                Ok(Message::RecordBatch(batch)) => {
                    if let Some(driver) = shared.segment(batch.pg) {
                        debug!(pg = %batch.pg, records = batch.records.len(), more = batch.more, "records from a peer arrived");
                        let actions = driver.core.lock().gossip_received(batch);
                        driver.run(actions);
                        shared.peer_links.batch_arrived.notify_one();
                    }
                }
                Ok(Message::HydrateBatch(batch)) => {
                    if let Some(driver) = shared.segment(batch.pg) {
                        debug!(pg = %batch.pg, transfer = batch.transfer, next = ?batch.next.map(|cursor| cursor.page_position), versions = batch.versions.len(), records = batch.records.len(),
                            last = batch.next.is_none(), "repair batch arrived");
                        let actions = driver.core.lock().hydrate_received(batch);
                        driver.run(actions);
                        shared.peer_links.batch_arrived.notify_one();
                    }
                }
                Ok(_) => {} // a refusal: the segment asks another peer in time
                Err(error) => {
                    warn!(%address, %error, "gossip: closing connection to peer: bad message");
                    break;
                }
            }
        }
        shared.peer_links.senders.lock().remove(&address);
    });
    let mut tasks = tasks.tasks.lock();
    tasks.retain(|handle| !handle.is_finished());
    tasks.push(task.abort_handle());
}

fn unknown_segment(request_id: u64, pg: PgId) -> Message {
    Message::Error(ErrorResponse {
        request_id,
        pg,
        code: ErrorCode::UnknownSegment,
        message: format!("this node hosts no segment of {pg}"),
    })
}

fn reply(sender: &FrameSender, message: &Message) {
    if let Err(error) = sender.try_send(message.encode()) {
        debug!(%error, "reply dropped");
    }
}

/// Handles one message; `Err` closes the connection.
fn handle(shared: &NodeShared, connection: ReplyTo, sender: &FrameSender, message: Message) -> Result<(), String> {
    match message {
        Message::Append(request) => match shared.segment(request.pg) {
            Some(driver) => {
                let actions = driver.core.lock().append(request, connection);
                driver.run(actions);
            }
            None => reply(sender, &unknown_segment(0, request.pg)),
        },
        Message::ReadPage(request) => {
            let response = match shared.segment(request.pg) {
                None => unknown_segment(request.request_id, request.pg),
                Some(driver) => match driver.core.lock().read_page(request.page, request.read_point, request.epoch) {
                    Ok((page_lsn, image)) => Message::PageImage(PageImage {
                        request_id: request.request_id,
                        pg: request.pg,
                        page: request.page,
                        read_point: request.read_point,
                        page_lsn,
                        image,
                    }),
                    Err(refusal) => Message::Error(ErrorResponse {
                        request_id: request.request_id,
                        pg: request.pg,
                        code: refusal.code,
                        message: refusal.message,
                    }),
                },
            };
            reply(sender, &response);
        }
        Message::SealEpoch(request) => match shared.segment(request.pg) {
            Some(driver) => {
                let actions = driver.core.lock().seal(request.request_id, request.epoch, connection);
                driver.run(actions);
            }
            None => reply(sender, &unknown_segment(request.request_id, request.pg)),
        },
        Message::OpenEpoch(request) => match shared.segment(request.pg) {
            Some(driver) => {
                let actions =
                    driver.core.lock().open_epoch(request.request_id, request.epoch, request.truncations, connection);
                driver.run(actions);
            }
            None => reply(sender, &unknown_segment(request.request_id, request.pg)),
        },
        Message::SetMembership(request) => match shared.place_segment(&request) {
            Ok(driver) => {
                shared.set_peers(request.pg, request.peers.clone());
                let actions = driver.core.lock().set_membership(
                    request.request_id,
                    request.epoch,
                    request.membership_epoch,
                    connection,
                );
                driver.run(actions);
            }
            Err(message) => {
                warn!(pg = %request.pg, %message, "cannot place a segment");
                let refusal = ErrorResponse {
                    request_id: request.request_id,
                    pg: request.pg,
                    code: ErrorCode::InvalidRequest,
                    message,
                };
                reply(sender, &Message::Error(refusal));
            }
        },
        Message::FetchRecords(request) => {
            let response = match shared.segment(request.pg) {
                Some(driver) => match driver.core.lock().fetch_records(&request) {
                    Ok(batch) => Message::RecordBatch(batch),
                    Err(refusal) => Message::Error(ErrorResponse {
                        request_id: request.request_id,
                        pg: request.pg,
                        code: refusal.code,
                        message: refusal.message,
                    }),
                },
                None => unknown_segment(request.request_id, request.pg),
            };
            reply(sender, &response);
        }
        Message::Hydrate(request) => {
            let response = match shared.segment(request.pg) {
                Some(driver) => match driver.core.lock().hydrate(&request) {
                    Ok(batch) => Message::HydrateBatch(batch),
                    Err(refusal) => Message::Error(ErrorResponse {
                        request_id: request.request_id,
                        pg: request.pg,
                        code: refusal.code,
                        message: refusal.message,
                    }),
                },
                None => unknown_segment(request.request_id, request.pg),
            };
            reply(sender, &response);
        }
        Message::StatusRequest(request) => {
            let response = match shared.segment(request.pg) {
                Some(driver) => Message::Status(driver.core.lock().status(request.request_id)),
                None => unknown_segment(request.request_id, request.pg),
            };
            reply(sender, &response);
        }
        Message::BlockWrite(write) => match shared.block_segments.get(&write.pg) {
            Some(driver) => {
                let actions = driver.core.lock().write(write, connection);
                driver.run(actions);
            }
            None => reply(sender, &unknown_segment(write.request_id, write.pg)),
        },
        Message::Fence(fence) => match shared.block_segments.get(&fence.pg) {
            Some(driver) => {
                let actions = driver.core.lock().fence(fence, connection);
                driver.run(actions);
            }
            None => reply(sender, &unknown_segment(fence.request_id, fence.pg)),
        },
        Message::BlockRead(read) => {
            let response = match shared.block_segments.get(&read.pg) {
                Some(driver) => driver.core.lock().read(&read),
                None => unknown_segment(read.request_id, read.pg),
            };
            reply(sender, &response);
        }
        other => return Err(format!("a client sent {other:?}, which only servers send")),
    }
    Ok(())
}
