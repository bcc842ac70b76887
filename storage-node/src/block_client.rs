//! The client of a block volume: quorum writes, current reads, and the
//! three-step seal of a dead lease epoch.
//!
//! - **Write**: sent to the block's six segments, durable once four
//!   acknowledge. A segment that refuses it as fenced or stale ends the
//!   write at once with that error: the writer has lost its lease or its
//!   lock and must not retry.
//! - **Read**: sent to all six, decided on the first three answers. Each
//!   answer lists the segment's versions of the block and the epochs it has
//!   seen sealed. From each answer the reader takes the newest version that
//!   is not a possibly-late write of a sealed epoch (a sealed epoch's write
//!   counts only as a seal's repaired copy, see [`crate::block_segment`]),
//!   and returns the newest of those by `(fencing token, version)`. Why this
//!   is current: every write that completed is on four segments, and every
//!   seal put a repaired copy of the dead epoch's chosen versions on four
//!   fenced segments; any three answers meet both.
//!   Reads are current for a lock holder: the lock service grants a lock
//!   covering a dead holder's blocks only after their seal, and a live
//!   holder's writes are never skipped.
//! - **Seal**: for every PG, (1) fence the epoch on at least four segments,
//!   which return the blocks it wrote; (2) copy each such block's newest
//!   version of that epoch onto every fenced segment, marked as repaired,
//!   until four hold it; (3) mark the epoch sealed on four segments. Within
//!   one call, steps 2 and 3 are retried with the lists of step 1 until they
//!   succeed: running step 1 again could list a late write that a segment
//!   outside the first fence quorum took meanwhile. (A sealer that dies
//!   between steps 1 and 2 leaves that window to the next run: the decision
//!   of step 1 is not made durable. ARCHITECTURE.md §11 lists it.)

use bytes::Bytes;
use common::block_message::{
    BlockImage, BlockRead, BlockVersionInfo, BlockWrite, FenceAck, FencePhase, FenceRequest, FencedBlock,
};
use common::ids::{BlockId, IdHashSet, PgId};
use common::message::{ErrorCode, ErrorResponse, Message};
use common::transport::{FrameSender, Transport};
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tracing::{debug, warn};

/// Segments per PG, and how many make a write or a read quorum (the same
/// quorums as the redo volume's).
pub use common::limits::{READ_QUORUM, SEGMENTS_PER_PG as REPLICAS, WRITE_QUORUM};
/// How long an operation waits before resending to segments that have not answered.
const RESEND_INTERVAL: Duration = Duration::from_millis(100);

/// Where a block volume's segments are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockVolumeLayout {
    pub blocks_per_pg: u64,
    pub block_bytes_max: usize,
    /// The six segment addresses of each PG, in replica order.
    pub pgs: Vec<[String; REPLICAS]>,
}

impl BlockVolumeLayout {
    pub fn pg_of(&self, block: BlockId) -> Result<PgId, BlockError> {
        let pg = block.0 / self.blocks_per_pg;
        if pg >= self.pgs.len() as u64 {
            return Err(BlockError::OutOfRange { block, blocks: self.blocks_per_pg * self.pgs.len() as u64 });
        }
        Ok(PgId(pg as u32))
    }
}

/// Why a block operation failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BlockError {
    #[error("lease epoch {epoch} is fenced: {message}")]
    Fenced { epoch: u64, message: String },
    #[error("fencing token {token} is stale: {message}")]
    StaleToken { token: u64, message: String },
    #[error("{block} is outside the volume's {blocks} blocks")]
    OutOfRange { block: BlockId, blocks: u64 },
    #[error("{operation} on {pg} reached {answered} of the {needed} segments it needs within {waited:?}")]
    NoQuorum { operation: &'static str, pg: PgId, answered: usize, needed: usize, waited: Duration },
    #[error("a segment refused the request: {0}")]
    Refused(String),
}

/// A block as read: its newest current version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockData {
    /// 0: the block was never written.
    pub version: u64,
    pub lease_epoch: u64,
    pub fencing_token: u64,
    pub data: Bytes,
}

/// What a seal did, for logs and reports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SealReport {
    /// Blocks the dead epoch wrote, over every PG.
    pub blocks: usize,
    /// Repairs acknowledged by fenced segments.
    pub repairs: usize,
}

/// One answer to a request, with the replica it came from.
type Answer = (usize, Message);

#[derive(Debug, Default)]
struct Link {
    sender: Option<FrameSender>,
    reader: Option<AbortHandle>,
}

#[derive(Debug, Default)]
struct SealedView {
    /// Per replica: how many of its sealed epochs this client has.
    cursors: [u32; REPLICAS],
    epochs: IdHashSet<u64>,
}

#[derive(Debug)]
struct Shared {
    transport: Arc<dyn Transport>,
    links: Mutex<HashMap<String, Link>>,
    waiters: Mutex<HashMap<u64, (usize, mpsc::UnboundedSender<Answer>)>>,
    next_request: AtomicU64,
    sealed: Mutex<BTreeMap<PgId, SealedView>>,
}

/// A client of one block volume. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct BlockClient {
    layout: BlockVolumeLayout,
    shared: Arc<Shared>,
    /// How long one operation may take before it fails with `NoQuorum`.
    pub timeout: Duration,
}

impl Drop for BlockClient {
    fn drop(&mut self) {
        for link in self.shared.links.lock().values_mut() {
            if let Some(reader) = link.reader.take() {
                reader.abort();
            }
        }
    }
}

fn request_id_of(message: &Message) -> Option<u64> {
    match message {
        Message::BlockWriteAck(ack) => Some(ack.request_id),
        Message::BlockImage(image) => Some(image.request_id),
        Message::FenceAck(ack) => Some(ack.request_id),
        Message::Error(error) => Some(error.request_id),
        _ => None,
    }
}

impl BlockClient {
    pub fn new(layout: BlockVolumeLayout, transport: Arc<dyn Transport>) -> BlockClient {
        BlockClient {
            layout,
            shared: Arc::new(Shared {
                transport,
                links: Mutex::default(),
                waiters: Mutex::default(),
                next_request: AtomicU64::new(1),
                sealed: Mutex::default(),
            }),
            timeout: Duration::from_secs(10),
        }
    }

    /// A connection to `address`, opened if there is none.
    async fn sender(&self, address: &str) -> Option<FrameSender> {
        if let Some(sender) = self.shared.links.lock().get(address).and_then(|link| link.sender.clone()) {
            return Some(sender);
        }
        let connection = match self.shared.transport.connect(address.to_string()).await {
            Ok(connection) => connection,
            Err(error) => {
                debug!(address, %error, "block segment unreachable");
                return None;
            }
        };
        let shared = self.shared.clone();
        let link_address = address.to_string();
        let mut receiver = connection.receiver;
        let reader = tokio::spawn(async move {
            while let Some(Ok(frame)) = receiver.recv().await {
                let Ok(message) = Message::decode(&frame) else { break };
                let Some(request_id) = request_id_of(&message) else { continue };
                let waiter = shared.waiters.lock().get(&request_id).cloned();
                if let Some((replica, answers)) = waiter {
                    let _ = answers.send((replica, message));
                }
            }
            if let Some(link) = shared.links.lock().get_mut(&link_address) {
                link.sender = None;
            }
        });
        let mut links = self.shared.links.lock();
        let link = links.entry(address.to_string()).or_default();
        if let Some(old) = link.reader.replace(reader.abort_handle()) {
            old.abort();
        }
        link.sender = Some(connection.sender.clone());
        Some(connection.sender)
    }

    /// Sends `message(request_id)` to replica `replica` of `pg`; its answers
    /// arrive on `answers`.
    async fn send(
        &self,
        pg: PgId,
        replica: usize,
        answers: &mpsc::UnboundedSender<Answer>,
        message: impl FnOnce(u64) -> Message,
    ) -> u64 {
        let request_id = self.shared.next_request.fetch_add(1, Ordering::Relaxed);
        self.shared.waiters.lock().insert(request_id, (replica, answers.clone()));
        let address = &self.layout.pgs[pg.0 as usize][replica];
        if let Some(sender) = self.sender(address).await
            && sender.try_send(message(request_id).encode()).is_err()
        {
            debug!(address, "block request dropped: send queue full or closed");
        }
        request_id
    }

    fn forget(&self, request_ids: impl IntoIterator<Item = u64>) {
        let mut waiters = self.shared.waiters.lock();
        for request_id in request_ids {
            waiters.remove(&request_id);
        }
    }

    /// Sends `make(replica, request_id)` to each replica in `to`, resending
    /// to those `done` has not yet accepted, until `quorum` of them are done.
    /// `done` sees every answer and returns whether it completes that
    /// replica's part; an `Err` from it ends the operation.
    async fn quorum_round(
        &self,
        operation: &'static str,
        pg: PgId,
        to: &[usize],
        quorum: usize,
        mut make: impl FnMut(usize, u64) -> Message,
        mut done: impl FnMut(usize, Message) -> Result<bool, BlockError>,
    ) -> Result<Vec<usize>, BlockError> {
        let (answers_to, mut answers) = mpsc::unbounded_channel();
        let started = Instant::now();
        let mut finished: Vec<usize> = Vec::new();
        // Forgets the requests' waiters however this ends, cancellation included.
        let mut sent = Waiting { client: self, request_ids: Vec::new() };
        loop {
            for &replica in to.iter().filter(|replica| !finished.contains(replica)) {
                let request_id = self.send(pg, replica, &answers_to, |request_id| make(replica, request_id)).await;
                sent.request_ids.push(request_id);
            }
            let resend_at = Instant::now() + RESEND_INTERVAL;
            let mut failure = None;
            while finished.len() < quorum {
                let Ok(Some((replica, message))) = tokio::time::timeout_at(resend_at, answers.recv()).await else {
                    break;
                };
                if finished.contains(&replica) {
                    continue;
                }
                match done(replica, message) {
                    Ok(true) => finished.push(replica),
                    Ok(false) => {}
                    Err(error) => {
                        failure = Some(error);
                        break;
                    }
                }
            }
            if let Some(error) = failure {
                return Err(error);
            }
            if finished.len() >= quorum {
                return Ok(finished);
            }
            if started.elapsed() >= self.timeout {
                let waited = started.elapsed();
                return Err(BlockError::NoQuorum { operation, pg, answered: finished.len(), needed: quorum, waited });
            }
        }
    }

    /// Writes one block version; returns once four segments hold it.
    pub async fn write(
        &self,
        block: BlockId,
        version: u64,
        lease_epoch: u64,
        fencing_token: u64,
        data: Bytes,
    ) -> Result<(), BlockError> {
        let pg = self.layout.pg_of(block)?;
        if data.len() > self.layout.block_bytes_max {
            return Err(BlockError::Refused(format!(
                "{} bytes exceed the volume's {}-byte blocks",
                data.len(),
                self.layout.block_bytes_max
            )));
        }
        let write = BlockWrite { request_id: 0, pg, block, version, lease_epoch, fencing_token, repair: false, data };
        self.write_to(pg, &write, &all_replicas(), WRITE_QUORUM).await.map(|_| ())
    }

    async fn write_to(
        &self,
        pg: PgId,
        write: &BlockWrite,
        to: &[usize],
        quorum: usize,
    ) -> Result<Vec<usize>, BlockError> {
        let make = |_, request_id| Message::BlockWrite(BlockWrite { request_id, ..write.clone() });
        let done = |_, message| match message {
            Message::BlockWriteAck(_) => Ok(true),
            Message::Error(error) => refusal(error, write),
            _ => Ok(false),
        };
        self.quorum_round("block write", pg, to, quorum, make, done).await
    }

    /// Reads the current version of a block.
    pub async fn read(&self, block: BlockId) -> Result<BlockData, BlockError> {
        let pg = self.layout.pg_of(block)?;
        let mut images: Vec<(usize, BlockImage)> = Vec::new();
        let cursors = self.shared.sealed.lock().entry(pg).or_default().cursors;
        let make = |replica: usize, request_id| {
            Message::BlockRead(BlockRead { request_id, pg, block, want_token: 0, sealed_cursor: cursors[replica] })
        };
        let done = |replica, message| match message {
            Message::BlockImage(image) => {
                images.push((replica, image));
                Ok(true)
            }
            _ => Ok(false),
        };
        self.quorum_round("block read", pg, &all_replicas(), READ_QUORUM, make, done).await?;
        let Some((replica, chosen)) = self.choose_learning_sealed(pg, &images) else {
            return Ok(BlockData { version: 0, lease_epoch: 0, fencing_token: 0, data: Bytes::new() });
        };
        let carried = images.iter().find_map(|(_, image)| {
            let newest = image.history.first()?;
            (newest.key() == chosen.key() && image.data_token == chosen.fencing_token).then(|| image.data.clone())
        });
        let data = match carried {
            Some(data) => data,
            None => self.read_version(pg, block, replica, chosen.key()).await?.ok_or_else(|| {
                BlockError::Refused(format!("{block} changed while it was read (a newer grant wrote it): retry"))
            })?,
        };
        Ok(BlockData {
            version: chosen.version,
            lease_epoch: chosen.lease_epoch,
            fencing_token: chosen.fencing_token,
            data,
        })
    }

    /// Fetches the bytes of the version `(fencing token, version)` from one
    /// replica; `None` if the replica no longer holds that version.
    async fn read_version(
        &self,
        pg: PgId,
        block: BlockId,
        replica: usize,
        key: (u64, u64),
    ) -> Result<Option<Bytes>, BlockError> {
        let (token, _) = key;
        let mut data = None;
        let make = |_, request_id| {
            Message::BlockRead(BlockRead { request_id, pg, block, want_token: token, sealed_cursor: 0 })
        };
        let done = |_, message| match message {
            Message::BlockImage(image) => {
                let held = image.history.iter().any(|held| held.key() == key);
                data = (held && image.data_token == token).then_some(image.data);
                Ok(true)
            }
            _ => Ok(false),
        };
        self.quorum_round("block version read", pg, &[replica], 1, make, done).await?;
        Ok(data)
    }

    /// Merges the sealed epochs the answers carry into this client's view of `pg`,
    /// and chooses the current version among them against that view (under
    /// its lock: the set of sealed epochs only grows, and is not copied).
    fn choose_learning_sealed(&self, pg: PgId, images: &[(usize, BlockImage)]) -> Option<(usize, BlockVersionInfo)> {
        let mut views = self.shared.sealed.lock();
        let view = views.entry(pg).or_default();
        for (replica, image) in images {
            view.epochs.extend(image.sealed.iter().copied());
            view.cursors[*replica] = image.sealed_cursor.saturating_add(image.sealed.len() as u32);
        }
        choose_current(images, &view.epochs)
    }

    /// [`Self::seal`], tried again (after a pause) until it succeeds: what a
    /// lock service's fencer needs, since the dead lease's recovery waits
    /// for the seal.
    pub async fn seal_until_done(&self, epoch: u64) -> SealReport {
        let mut attempt = 0u64;
        loop {
            match self.seal(epoch).await {
                Ok(report) => return report,
                Err(error) => {
                    warn!(epoch, attempt, %error, "seal failed; retrying");
                    attempt += 1;
                    tokio::time::sleep(RESEND_INTERVAL).await;
                }
            }
        }
    }

    /// Seals lease epoch `epoch` on every PG: afterwards no write of that
    /// epoch is accepted by a fenced segment, and none that arrived late is
    /// ever visible to a read.
    pub async fn seal(&self, epoch: u64) -> Result<SealReport, BlockError> {
        let mut report = SealReport::default();
        for pg in (0..self.layout.pgs.len()).map(|pg| PgId(pg as u32)) {
            let (fenced, written) = self.fence_pg(pg, epoch).await?;
            report.blocks += written.len();
            for (block, (newest, holders)) in written {
                report.repairs +=
                    Self::until_quorum(|| self.repair(pg, block, epoch, newest, &holders, &fenced)).await?;
            }
            let make = |_, request_id| {
                let phase = FencePhase::Sealed;
                Message::Fence(FenceRequest { request_id, pg, lease_epoch: epoch, phase, from_block: BlockId(0) })
            };
            let done = |_, message| match message {
                Message::FenceAck(ack) => Ok(ack.phase == FencePhase::Sealed),
                _ => Ok(false),
            };
            Self::until_quorum(|| self.quorum_round("seal", pg, &fenced, WRITE_QUORUM, make, done)).await?;
        }
        Ok(report)
    }

    /// Runs `step` again while it fails only for want of a quorum (a fenced
    /// segment is down): the seal's later steps must keep the lists of its
    /// first.
    async fn until_quorum<T, F: std::future::Future<Output = Result<T, BlockError>>>(
        mut step: impl FnMut() -> F,
    ) -> Result<T, BlockError> {
        loop {
            match step().await {
                Err(BlockError::NoQuorum { operation, pg, answered, needed, .. }) => {
                    debug!(operation, %pg, answered, needed, "seal step short of a quorum; trying again");
                }
                result => return result,
            }
        }
    }

    /// Step 1: fences `epoch` on `pg` until at least four segments have it.
    /// Returns the fenced replicas and, per block the epoch wrote, its newest
    /// version there and the replicas that listed it.
    async fn fence_pg(&self, pg: PgId, epoch: u64) -> Result<(Vec<usize>, WrittenBlocks), BlockError> {
        // Paging cursors: `make` reads them, `done` moves them.
        let from = Mutex::new([BlockId(0); REPLICAS]);
        let mut written = WrittenBlocks::new();
        let make = |replica: usize, request_id| {
            let from_block = from.lock()[replica];
            Message::Fence(FenceRequest { request_id, pg, lease_epoch: epoch, phase: FencePhase::Fence, from_block })
        };
        let done = |replica: usize, message| match message {
            Message::FenceAck(FenceAck { blocks, complete, phase: FencePhase::Fence, .. }) => {
                for fenced in &blocks {
                    let entry = written.entry(fenced.block).or_insert((*fenced, Vec::new()));
                    let key = |listed: &FencedBlock| (listed.fencing_token, listed.version);
                    if key(fenced) > key(&entry.0) {
                        *entry = (*fenced, Vec::new());
                    }
                    if key(fenced) == key(&entry.0) {
                        entry.1.push(replica);
                    }
                }
                if let Some(last) = blocks.last() {
                    from.lock()[replica] = BlockId(last.block.0 + 1);
                }
                Ok(complete)
            }
            Message::Error(error) if error.code == ErrorCode::InvalidRequest => Err(BlockError::Refused(error.message)),
            _ => Ok(false),
        };
        let fenced = self.quorum_round("fence", pg, &all_replicas(), WRITE_QUORUM, make, done).await?;
        Ok((fenced, written))
    }

    /// Step 2 for one block: copies the epoch's newest version of it onto
    /// the fenced replicas until four hold it. Returns the repairs
    /// acknowledged: none if no replica that listed the version still holds
    /// it (each then holds BLOCK_HISTORY_MAX newer grants' versions).
    async fn repair(
        &self,
        pg: PgId,
        block: BlockId,
        epoch: u64,
        newest: FencedBlock,
        holders: &[usize],
        fenced: &[usize],
    ) -> Result<usize, BlockError> {
        let mut data = None;
        for &holder in holders {
            match self.read_version(pg, block, holder, (newest.fencing_token, newest.version)).await {
                Ok(Some(bytes)) => {
                    data = Some(bytes);
                    break;
                }
                Ok(None) => {}
                Err(error) => debug!(%error, holder, "repair source unavailable; trying the next"),
            }
        }
        let Some(data) = data else {
            debug!(%block, epoch, "no replica holds the version any more: superseded, nothing to repair");
            return Ok(0);
        };
        let write = BlockWrite {
            request_id: 0,
            pg,
            block,
            version: newest.version,
            lease_epoch: epoch,
            fencing_token: newest.fencing_token,
            repair: true,
            data,
        };
        Ok(self.write_to(pg, &write, fenced, WRITE_QUORUM).await?.len())
    }
}

/// Per block a fenced epoch wrote: its newest version there, and the
/// replicas that listed exactly that version.
type WrittenBlocks = BTreeMap<BlockId, (FencedBlock, Vec<usize>)>;

/// The request ids of one round, forgotten when the round ends.
struct Waiting<'a> {
    client: &'a BlockClient,
    request_ids: Vec<u64>,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.client.forget(self.request_ids.drain(..));
    }
}

fn all_replicas() -> [usize; REPLICAS] {
    std::array::from_fn(|replica| replica)
}

fn refusal(error: ErrorResponse, write: &BlockWrite) -> Result<bool, BlockError> {
    match error.code {
        ErrorCode::FencedEpoch => Err(BlockError::Fenced { epoch: write.lease_epoch, message: error.message }),
        ErrorCode::StaleFencingToken => {
            Err(BlockError::StaleToken { token: write.fencing_token, message: error.message })
        }
        ErrorCode::InvalidRequest => Err(BlockError::Refused(error.message)),
        // The segment keeps BLOCK_HISTORY_MAX later grants' versions of the
        // block: the repaired version would never be read there.
        ErrorCode::Superseded => Ok(true),
        // Busy, disk failure, unknown segment: another replica may take it.
        _ => Ok(false),
    }
}

/// The read rule: from each answer, the newest version that is not a
/// possibly-late write of a sealed epoch (a sealed epoch's write counts
/// only as a seal's repaired copy); then the newest of those. Returns the
/// replica that holds it and the version.
pub fn choose_current(images: &[(usize, BlockImage)], sealed: &IdHashSet<u64>) -> Option<(usize, BlockVersionInfo)> {
    images
        .iter()
        .filter_map(|(replica, image)| {
            let trusted =
                image.history.iter().find(|version| version.repaired || !sealed.contains(&version.lease_epoch));
            trusted.map(|version| (*replica, *version))
        })
        .max_by_key(|(_, version)| version.key())
}
