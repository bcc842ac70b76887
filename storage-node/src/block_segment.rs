//! The block segment: one replica of one protection group of a *block
//! volume* (the file system's shared disk, Petal's role), as a pure state
//! machine beside [`crate::segment::SegmentCore`].
//!
//! It shares the segment log format, the disks, the node and its driver
//! with the redo segment; only the entries differ (block versions and block
//! checkpoints, see [`crate::log_format`]). Writes are group-committed the
//! same way: everything that arrives while one log write is in flight goes
//! out as the next write with one fdatasync, and is acknowledged after it.
//!
//! ## What a segment keeps per block
//! The newest version under each of the last [`BLOCK_HISTORY_MAX`] fencing
//! tokens, newest first, ordered by `(fencing token, version)`: a later lock
//! grant always wins. A version is *never* the bare newest only: a reader
//! that must skip a version (see below) falls back to the next one.
//!
//! ## Fencing (F97 §4, the "lease margin" hole)
//! - A write whose lease epoch is fenced here, or queued to be fenced, is
//!   refused (`FencedEpoch`); so is one whose token is older than the
//!   newest this segment holds or has queued for the block
//!   (`StaleFencingToken`).
//! - A fence is logged in a block checkpoint (which lists every fence so
//!   far), never ahead of a write queued before it, and acknowledged after
//!   its fdatasync with the blocks the fenced epoch wrote here: every write
//!   of that epoch this segment accepted is durable no later than the
//!   fence, so the list is complete.
//! - A seal's repair (`repair: true`) is taken although its epoch is
//!   fenced, and its copy is marked *repaired* (in the log too). A segment
//!   that missed the fence may take a late write of the epoch, and may be
//!   fenced later still; it cannot tell that write from one in time. So
//!   once the epoch is sealed, readers trust only repaired copies of its
//!   writes, which the seal put on at least four fenced segments.
//! - A repair older than every version kept for the block is not stored,
//!   and answered `Superseded` (not counted by the seal).
//!
//! ## Invariants (asserted or tested)
//! - No write from an epoch is accepted after this segment logged (or
//!   queued) its fence, except a repair.
//! - No write carrying an older token than the newest held for the block is
//!   accepted, except a repair (which only adds history).
//! - Nothing is acknowledged before the fdatasync that made it durable.
//! - A fence is acknowledged only with every version of the epoch held here
//!   (no write queued before it is logged after it).

use crate::log_format::{
    BlockCheckpoint, BlockVersion, Entry, LogCursor, ScanResult, block_checkpoint_entry_bytes, block_item_bytes,
    encode_block_checkpoint_entry, encode_block_versions_entry,
};
use crate::segment::{LogWrite, ReplyTo};
use bytes::{Bytes, BytesMut};
use common::block_message::{
    BlockImage, BlockRead, BlockVersionInfo, BlockWrite, BlockWriteAck, FenceAck, FencePhase, FenceRequest, FencedBlock,
};
use common::ids::{BlockId, IdHashMap, IdHashSet, PgId};
use common::limits::{
    BLOCK_BYTES_MAX, BLOCK_HISTORY_MAX, ENTRY_OVERHEAD_GUARD, FENCE_ACK_BLOCKS_MAX, FENCED_EPOCHS_MAX,
    LOG_BATCH_BYTES_MAX, SEGMENT_QUEUED_BYTES_MAX,
};
use common::message::{ErrorCode, ErrorResponse, Message};
use std::collections::BTreeMap;

/// How a block segment is shaped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockSegmentConfig {
    pub pg: PgId,
    /// Block `b` belongs to PG `b / blocks_per_pg`.
    pub blocks_per_pg: u64,
    /// Largest block this volume stores.
    pub block_bytes_max: usize,
    pub log_file_bytes: u64,
    /// Log files kept before the cleaner frees the oldest.
    pub log_files_target: u64,
}

impl BlockSegmentConfig {
    pub fn new(pg: PgId, blocks_per_pg: u64, block_bytes_max: usize) -> Self {
        BlockSegmentConfig { pg, blocks_per_pg, block_bytes_max, log_file_bytes: 64 * 1024 * 1024, log_files_target: 8 }
    }

    fn write_bytes_max(&self) -> usize {
        LOG_BATCH_BYTES_MAX.min(self.log_file_bytes as usize / 2)
    }

    fn validate(&self) -> Result<(), String> {
        if self.block_bytes_max == 0 || self.block_bytes_max > BLOCK_BYTES_MAX {
            return Err(format!("block_bytes_max {} outside 1..=BLOCK_BYTES_MAX", self.block_bytes_max));
        }
        let checkpoint = block_checkpoint_entry_bytes(2 * FENCED_EPOCHS_MAX);
        let smallest = 2 * (block_item_bytes(self.block_bytes_max) + checkpoint + 2 * ENTRY_OVERHEAD_GUARD) as u64;
        if self.log_file_bytes < smallest || !self.log_file_bytes.is_multiple_of(8) {
            return Err(format!(
                "log_file_bytes {} must be a multiple of 8 and at least {smallest}",
                self.log_file_bytes
            ));
        }
        if self.blocks_per_pg == 0 || self.log_files_target < 2 {
            return Err("blocks_per_pg must be positive and log_files_target >= 2".into());
        }
        Ok(())
    }
}

/// What the driver must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BlockAction {
    /// Write and fdatasync, then call [`BlockSegmentCore::write_done`].
    Write(LogWrite),
    /// Send `message` on connection `to`.
    Send { to: ReplyTo, message: Message },
    /// Delete a log file that holds nothing live.
    DeleteFile(u64),
}

/// A durable version and the log file that holds it.
#[derive(Clone, Debug)]
struct StoredBlock {
    version: u64,
    lease_epoch: u64,
    fencing_token: u64,
    /// A seal's copy: the only kind of copy of a sealed epoch's write that
    /// readers trust.
    repaired: bool,
    data: Bytes,
    file: u64,
}

impl StoredBlock {
    fn key(&self) -> (u64, u64) {
        (self.fencing_token, self.version)
    }
}

/// Lease epochs in the order a segment learned them, and as a set.
#[derive(Debug, Default)]
struct EpochList {
    order: Vec<u64>,
    set: IdHashSet<u64>,
}

impl EpochList {
    fn insert(&mut self, epoch: u64) {
        if self.set.insert(epoch) {
            self.order.push(epoch);
        }
    }

    fn contains(&self, epoch: u64) -> bool {
        self.set.contains(&epoch)
    }
}

/// The log entry of a block write or repair.
fn logged(write: &BlockWrite) -> BlockVersion {
    BlockVersion {
        block: write.block,
        version: write.version,
        lease_epoch: write.lease_epoch,
        fencing_token: write.fencing_token,
        repaired: write.repair,
        data: write.data.clone(),
    }
}

/// Writes (and their waiters) queued or in flight for one block.
#[derive(Clone, Copy, Debug)]
struct Pending {
    newest: (u64, u64),
    count: usize,
}

#[derive(Debug)]
struct InFlight {
    id: u64,
    file: u64,
    /// Each write as logged, its request id and who waits for it.
    writes: Vec<(BlockVersion, u64, ReplyTo)>,
    relogged: Vec<BlockVersion>,
    fences: Vec<(FenceRequest, ReplyTo)>,
    delete_after: Vec<u64>,
}

/// One block segment replica.
#[derive(Debug)]
pub struct BlockSegmentCore {
    config: BlockSegmentConfig,
    failed: Option<String>,
    /// Durable history per block, newest first.
    blocks: IdHashMap<BlockId, Vec<StoredBlock>>,
    /// Durable fences and seals.
    fenced: EpochList,
    sealed: EpochList,
    /// Epochs whose fence is queued or in flight: already refused.
    fencing: IdHashSet<u64>,

    queued_writes: Vec<(BlockWrite, ReplyTo)>,
    queued_bytes: usize,
    queued_fences: Vec<(FenceRequest, ReplyTo)>,
    pending: IdHashMap<BlockId, Pending>,
    in_flight: Option<InFlight>,

    cursor: LogCursor,
    file_live: BTreeMap<u64, usize>,
    file_blocks: BTreeMap<u64, Vec<(BlockId, u64)>>,
    /// Files to delete once a checkpoint written after them is durable (0:
    /// the first checkpoint of a new segment, nothing to delete).
    checkpoint_due: Vec<u64>,
}

impl BlockSegmentCore {
    fn empty(config: BlockSegmentConfig) -> Result<BlockSegmentCore, String> {
        config.validate()?;
        let log_file_bytes = config.log_file_bytes;
        Ok(BlockSegmentCore {
            config,
            failed: None,
            blocks: IdHashMap::default(),
            fenced: EpochList::default(),
            sealed: EpochList::default(),
            fencing: IdHashSet::default(),
            queued_writes: Vec::new(),
            queued_bytes: 0,
            queued_fences: Vec::new(),
            pending: IdHashMap::default(),
            in_flight: None,
            cursor: LogCursor::new(log_file_bytes),
            file_live: BTreeMap::new(),
            file_blocks: BTreeMap::new(),
            checkpoint_due: Vec::new(),
        })
    }

    /// A brand-new segment; the returned write logs its first checkpoint.
    pub fn create(config: BlockSegmentConfig) -> Result<(BlockSegmentCore, Vec<BlockAction>), String> {
        let mut core = BlockSegmentCore::empty(config)?;
        core.checkpoint_due.push(0);
        let actions = core.start_write();
        Ok((core, actions))
    }

    /// Rebuilds a segment from its log. Returns it and the number of
    /// corrupt entries met in the middle of the log (the segment then needs
    /// repair from its peers).
    pub fn recover(config: BlockSegmentConfig, scan: ScanResult) -> Result<(BlockSegmentCore, usize), String> {
        let cursor = LogCursor::resume(config.log_file_bytes, &scan);
        let mut core = BlockSegmentCore::empty(config)?;
        let mut saw_checkpoint = false;
        for (position, entry) in scan.entries {
            match entry {
                Entry::BlockCheckpoint(checkpoint) => {
                    if checkpoint.pg != core.config.pg
                        || checkpoint.block_bytes_max as usize != core.config.block_bytes_max
                    {
                        return Err(format!(
                            "log belongs to block {} with {}-byte blocks, expected {} with {}-byte blocks",
                            checkpoint.pg, checkpoint.block_bytes_max, core.config.pg, core.config.block_bytes_max
                        ));
                    }
                    saw_checkpoint = true;
                    checkpoint.fenced.into_iter().for_each(|epoch| core.fenced.insert(epoch));
                    checkpoint.sealed.into_iter().for_each(|epoch| core.sealed.insert(epoch));
                }
                Entry::BlockVersions(versions) => {
                    for version in versions {
                        core.insert_version(version, position.file);
                    }
                }
                Entry::Redo(_) | Entry::PageVersions(_) | Entry::Checkpoint(_) => {
                    return Err("log holds redo entries: it belongs to a redo segment".into());
                }
            }
        }
        if !saw_checkpoint {
            return Err("log holds no block checkpoint: not a block segment log".into());
        }
        core.cursor = cursor;
        Ok((core, scan.corruptions.len()))
    }

    pub fn config(&self) -> &BlockSegmentConfig {
        &self.config
    }

    /// No log write in flight.
    pub fn is_idle(&self) -> bool {
        self.in_flight.is_none()
    }

    /// Durably fenced lease epochs, in the order learned.
    pub fn fenced(&self) -> &[u64] {
        &self.fenced.order
    }

    /// Durably sealed lease epochs, in the order learned.
    pub fn sealed(&self) -> &[u64] {
        &self.sealed.order
    }

    fn refuse(&self, to: ReplyTo, request_id: u64, code: ErrorCode, message: String) -> BlockAction {
        let error = ErrorResponse { request_id, pg: self.config.pg, code, message };
        BlockAction::Send { to, message: Message::Error(error) }
    }

    fn check_block(&self, block: BlockId) -> Result<(), String> {
        if block.0 / self.config.blocks_per_pg != u64::from(self.config.pg.0) {
            return Err(format!("{block} is not in {}", self.config.pg));
        }
        Ok(())
    }

    /// The newest `(token, version)` held or queued for `block`.
    fn newest_known(&self, block: BlockId) -> Option<(u64, u64)> {
        let durable = self.blocks.get(&block).and_then(|history| history.first()).map(StoredBlock::key);
        let pending = self.pending.get(&block).map(|pending| pending.newest);
        durable.max(pending)
    }

    /// A block write (or a seal's repair) from connection `from`.
    pub fn write(&mut self, write: BlockWrite, from: ReplyTo) -> Vec<BlockAction> {
        let request_id = write.request_id;
        if let Some(reason) = &self.failed {
            return vec![self.refuse(from, request_id, ErrorCode::DiskFailure, reason.clone())];
        }
        if let Err(problem) = self.check_block(write.block) {
            return vec![self.refuse(from, request_id, ErrorCode::InvalidRequest, problem)];
        }
        if write.data.len() > self.config.block_bytes_max {
            let problem =
                format!("{} bytes exceed this volume's {}-byte blocks", write.data.len(), self.config.block_bytes_max);
            return vec![self.refuse(from, request_id, ErrorCode::InvalidRequest, problem)];
        }
        let epoch = write.lease_epoch;
        if !write.repair && (self.fenced.contains(epoch) || self.fencing.contains(&epoch)) {
            let message = format!("lease epoch {epoch} is fenced: write to {} refused", write.block);
            return vec![self.refuse(from, request_id, ErrorCode::FencedEpoch, message)];
        }
        let history = self.blocks.get(&write.block);
        let held = history.and_then(|history| {
            history.iter().find(|stored| stored.fencing_token == write.fencing_token && stored.version >= write.version)
        });
        // Held already (a retransmission, or covered by a newer version of
        // the same grant); a repair must still mark its copy as repaired.
        if held.is_some_and(|held| !write.repair || held.repaired) {
            let ack = BlockWriteAck { request_id, pg: self.config.pg, block: write.block };
            return vec![BlockAction::Send { to: from, message: Message::BlockWriteAck(ack) }];
        }
        if !write.repair
            && let Some((newest_token, _)) = self.newest_known(write.block)
            && write.fencing_token < newest_token
        {
            let message = format!(
                "fencing token {} is older than {newest_token}, which {} already holds",
                write.fencing_token, write.block
            );
            return vec![self.refuse(from, request_id, ErrorCode::StaleFencingToken, message)];
        }
        if self.queued_bytes + write.data.len() > SEGMENT_QUEUED_BYTES_MAX {
            let message =
                format!("{} bytes queued; SEGMENT_QUEUED_BYTES_MAX is {SEGMENT_QUEUED_BYTES_MAX}", self.queued_bytes);
            return vec![self.refuse(from, request_id, ErrorCode::Busy, message)];
        }
        let key = (write.fencing_token, write.version);
        let pending = self.pending.entry(write.block).or_insert(Pending { newest: key, count: 0 });
        pending.newest = pending.newest.max(key);
        pending.count += 1;
        self.queued_bytes += write.data.len();
        self.queued_writes.push((write, from));
        self.start_write()
    }

    /// A fence or seal of a lease epoch from connection `from`.
    pub fn fence(&mut self, request: FenceRequest, from: ReplyTo) -> Vec<BlockAction> {
        let (request_id, epoch) = (request.request_id, request.lease_epoch);
        if let Some(reason) = &self.failed {
            return vec![self.refuse(from, request_id, ErrorCode::DiskFailure, reason.clone())];
        }
        if request.pg != self.config.pg {
            return vec![self.refuse(from, request_id, ErrorCode::InvalidRequest, format!("not {}", request.pg))];
        }
        let done = match request.phase {
            FencePhase::Fence => self.fenced.contains(epoch),
            FencePhase::Sealed => self.sealed.contains(epoch),
        };
        if done {
            return vec![BlockAction::Send { to: from, message: Message::FenceAck(self.fence_ack(&request)) }];
        }
        match request.phase {
            FencePhase::Fence if self.fenced.order.len() + self.fencing.len() >= FENCED_EPOCHS_MAX => {
                let fenced = self.fenced.order.len();
                let message = format!("{fenced} epochs fenced; FENCED_EPOCHS_MAX is {FENCED_EPOCHS_MAX}");
                return vec![self.refuse(from, request_id, ErrorCode::InvalidRequest, message)];
            }
            FencePhase::Fence => {
                self.fencing.insert(epoch);
            }
            FencePhase::Sealed if !self.fenced.contains(epoch) && !self.fencing.contains(&epoch) => {
                let message = format!("lease epoch {epoch} cannot be sealed before it is fenced here");
                return vec![self.refuse(from, request_id, ErrorCode::InvalidRequest, message)];
            }
            FencePhase::Sealed => {}
        }
        self.queued_fences.push((request, from));
        self.start_write()
    }

    fn fence_ack(&self, request: &FenceRequest) -> FenceAck {
        let mut blocks = Vec::new();
        let mut complete = true;
        if request.phase == FencePhase::Fence {
            let mut written: Vec<FencedBlock> = self
                .blocks
                .iter()
                .filter(|(block, _)| **block >= request.from_block)
                .filter_map(|(block, history)| {
                    let newest = history.iter().find(|stored| stored.lease_epoch == request.lease_epoch)?;
                    Some(FencedBlock { block: *block, version: newest.version, fencing_token: newest.fencing_token })
                })
                .collect();
            written.sort_by_key(|fenced| fenced.block);
            complete = written.len() <= FENCE_ACK_BLOCKS_MAX;
            written.truncate(FENCE_ACK_BLOCKS_MAX);
            blocks = written;
        }
        FenceAck {
            request_id: request.request_id,
            pg: self.config.pg,
            lease_epoch: request.lease_epoch,
            phase: request.phase,
            blocks,
            complete,
        }
    }

    /// Serves a block read from durable state.
    pub fn read(&self, request: &BlockRead) -> Message {
        if let Err(problem) = self.check_block(request.block) {
            let error = ErrorResponse {
                request_id: request.request_id,
                pg: self.config.pg,
                code: ErrorCode::InvalidRequest,
                message: problem,
            };
            return Message::Error(error);
        }
        let history = self.blocks.get(&request.block).map(Vec::as_slice).unwrap_or_default();
        let chosen = match request.want_token {
            0 => history.first(),
            token => history.iter().find(|stored| stored.fencing_token == token),
        };
        let sealed = &self.sealed.order;
        let cursor = if request.sealed_cursor as usize > sealed.len() { 0 } else { request.sealed_cursor };
        Message::BlockImage(BlockImage {
            request_id: request.request_id,
            pg: self.config.pg,
            block: request.block,
            history: history
                .iter()
                .map(|stored| BlockVersionInfo {
                    version: stored.version,
                    lease_epoch: stored.lease_epoch,
                    fencing_token: stored.fencing_token,
                    repaired: stored.repaired,
                })
                .collect(),
            data_token: chosen.map_or(0, |stored| stored.fencing_token),
            data: chosen.map(|stored| stored.data.clone()).unwrap_or_default(),
            sealed_cursor: cursor,
            sealed: sealed[cursor as usize..].to_vec(),
        })
    }

    /// Background work: the cleaner.
    pub fn background(&mut self) -> Vec<BlockAction> {
        self.start_write()
    }

    /// The write `id` is durable.
    pub fn write_done(&mut self, id: u64) -> Vec<BlockAction> {
        let in_flight = self.in_flight.take().expect("write_done without a write in flight");
        assert_eq!(in_flight.id, id, "write completions arrive in order, one at a time");
        let mut actions = Vec::new();
        for (version, request_id, from) in in_flight.writes {
            let (block, key, repair) = (version.block, (version.fencing_token, version.version), version.repaired);
            if let Some(pending) = self.pending.get_mut(&block) {
                pending.count -= 1;
                if pending.count == 0 {
                    self.pending.remove(&block);
                }
            }
            self.insert_version(version, in_flight.file);
            let repaired_here = self.blocks[&block].iter().any(|held| held.key() == key && held.repaired);
            let message = if !repair || repaired_here {
                Message::BlockWriteAck(BlockWriteAck { request_id, pg: self.config.pg, block })
            } else {
                let message = format!("repair of {block} under token {} is older than every version kept", key.0);
                let error = ErrorResponse { request_id, pg: self.config.pg, code: ErrorCode::Superseded, message };
                Message::Error(error)
            };
            actions.push(BlockAction::Send { to: from, message });
        }
        for version in in_flight.relogged {
            self.move_version(&version, in_flight.file);
        }
        for (request, _) in &in_flight.fences {
            let epoch = request.lease_epoch;
            match request.phase {
                FencePhase::Fence => {
                    self.fencing.remove(&epoch);
                    self.fenced.insert(epoch);
                }
                FencePhase::Sealed => self.sealed.insert(epoch),
            }
        }
        for (request, from) in &in_flight.fences {
            actions.push(BlockAction::Send { to: *from, message: Message::FenceAck(self.fence_ack(request)) });
        }
        actions.extend(in_flight.delete_after.into_iter().map(BlockAction::DeleteFile));
        actions.extend(self.start_write());
        actions
    }

    /// The write `id` failed: the segment stops taking writes and refuses
    /// everyone who waited.
    pub fn write_failed(&mut self, id: u64, reason: String) -> Vec<BlockAction> {
        let in_flight = self.in_flight.take().expect("write_failed without a write in flight");
        assert_eq!(in_flight.id, id);
        self.failed = Some(format!("log write failed: {reason}"));
        let in_flight_writes = in_flight.writes.into_iter().map(|(_, request_id, from)| (request_id, from));
        let queued_writes =
            std::mem::take(&mut self.queued_writes).into_iter().map(|(write, from)| (write.request_id, from));
        let fences = in_flight.fences.into_iter().chain(std::mem::take(&mut self.queued_fences));
        let waiters: Vec<(u64, ReplyTo)> =
            in_flight_writes.chain(queued_writes).chain(fences.map(|(fence, from)| (fence.request_id, from))).collect();
        self.queued_bytes = 0;
        self.pending.clear();
        self.fencing.clear();
        waiters
            .into_iter()
            .map(|(request_id, to)| self.refuse(to, request_id, ErrorCode::DiskFailure, reason.clone()))
            .collect()
    }

    /// Adds a durable version to its block's history: one entry per token
    /// (the highest version), newest first, at most BLOCK_HISTORY_MAX.
    fn insert_version(&mut self, version: BlockVersion, file: u64) {
        let history = self.blocks.entry(version.block).or_default();
        let stored = StoredBlock {
            version: version.version,
            lease_epoch: version.lease_epoch,
            fencing_token: version.fencing_token,
            repaired: version.repaired,
            data: version.data,
            file,
        };
        let mut dropped = Vec::new();
        if let Some(at) = history.iter().position(|held| held.fencing_token == stored.fencing_token) {
            let held = &history[at];
            let upgrade = held.version == stored.version && stored.repaired && !held.repaired;
            if held.version > stored.version || (held.version == stored.version && !upgrade) {
                return;
            }
            // A newer version of the grant, or the same one now repaired.
            dropped.push(history.remove(at).file);
        }
        let at = history.partition_point(|held| held.key() > stored.key());
        history.insert(at, stored);
        let mut kept = true;
        if history.len() > BLOCK_HISTORY_MAX {
            let oldest = history.pop().expect("history is over its limit");
            if at == BLOCK_HISTORY_MAX {
                kept = false;
            } else {
                dropped.push(oldest.file);
            }
        }
        if kept {
            *self.file_live.entry(file).or_default() += 1;
            self.file_blocks.entry(file).or_default().push((version.block, version.fencing_token));
        }
        for file in dropped {
            *self.file_live.get_mut(&file).expect("a held version's file is tracked") -= 1;
        }
    }

    /// A version the cleaner copied forward now lives in `file`.
    fn move_version(&mut self, version: &BlockVersion, file: u64) {
        let Some(history) = self.blocks.get_mut(&version.block) else { return };
        let Some(stored) = history
            .iter_mut()
            .find(|held| held.fencing_token == version.fencing_token && held.version == version.version)
        else {
            return;
        };
        if stored.file >= file {
            return;
        }
        let old = std::mem::replace(&mut stored.file, file);
        *self.file_live.get_mut(&old).expect("a live version's file is tracked") -= 1;
        *self.file_live.entry(file).or_default() += 1;
        self.file_blocks.entry(file).or_default().push((version.block, version.fencing_token));
    }

    /// When the log spans too many files, copies the oldest one's live
    /// versions forward, then (once it holds nothing) checkpoints and frees it.
    fn plan_cleaning(&mut self, budget: &mut usize) -> Vec<BlockVersion> {
        let Some((&oldest, &live)) = self.file_live.iter().next() else { return Vec::new() };
        if self.cursor.current_file() - oldest < self.config.log_files_target || self.checkpoint_due.contains(&oldest) {
            return Vec::new();
        }
        if live == 0 {
            self.file_live.remove(&oldest);
            self.file_blocks.remove(&oldest);
            self.checkpoint_due.push(oldest);
            return Vec::new();
        }
        let mut relog = Vec::new();
        for (block, token) in self.file_blocks.get(&oldest).cloned().unwrap_or_default() {
            let Some(stored) = self
                .blocks
                .get(&block)
                .and_then(|history| history.iter().find(|held| held.fencing_token == token && held.file == oldest))
            else {
                continue;
            };
            let item = block_item_bytes(stored.data.len());
            if *budget < item {
                break;
            }
            *budget -= item;
            relog.push(BlockVersion {
                block,
                version: stored.version,
                lease_epoch: stored.lease_epoch,
                fencing_token: stored.fencing_token,
                repaired: stored.repaired,
                data: stored.data.clone(),
            });
        }
        relog
    }

    fn start_write(&mut self) -> Vec<BlockAction> {
        if self.in_flight.is_some() || self.failed.is_some() {
            return Vec::new();
        }
        let checkpoint_bytes = block_checkpoint_entry_bytes(2 * FENCED_EPOCHS_MAX);
        let mut room = self.config.write_bytes_max() - checkpoint_bytes - 2 * ENTRY_OVERHEAD_GUARD;
        let mut take = 0;
        for (write, _) in &self.queued_writes {
            let item = block_item_bytes(write.data.len());
            if item > room {
                break;
            }
            room -= item;
            take += 1;
        }
        let relogged = self.plan_cleaning(&mut room);
        // A fence is logged only with (or after) every write queued before
        // it, so that its acknowledgement lists all the epoch's writes.
        let fences =
            if take == self.queued_writes.len() { std::mem::take(&mut self.queued_fences) } else { Vec::new() };
        if take == 0 && relogged.is_empty() && fences.is_empty() && self.checkpoint_due.is_empty() {
            return Vec::new();
        }
        let writes: Vec<(BlockVersion, u64, ReplyTo)> =
            self.queued_writes.drain(..take).map(|(write, from)| (logged(&write), write.request_id, from)).collect();
        self.queued_bytes -= writes.iter().map(|(version, _, _)| version.data.len()).sum::<usize>();
        let mut bytes = BytesMut::new();
        if !writes.is_empty() || !relogged.is_empty() {
            let versions = writes.iter().map(|(version, _, _)| version).chain(&relogged);
            encode_block_versions_entry(&mut bytes, self.cursor.take_sequence(), versions);
        }
        let delete_after = std::mem::take(&mut self.checkpoint_due);
        if !fences.is_empty() || !delete_after.is_empty() {
            let mut checkpoint = BlockCheckpoint {
                pg: self.config.pg,
                block_bytes_max: self.config.block_bytes_max as u32,
                fenced: self.fenced.order.clone(),
                sealed: self.sealed.order.clone(),
            };
            for (request, _) in &fences {
                let list = match request.phase {
                    FencePhase::Fence => &mut checkpoint.fenced,
                    FencePhase::Sealed => &mut checkpoint.sealed,
                };
                if !list.contains(&request.lease_epoch) {
                    list.push(request.lease_epoch);
                }
            }
            encode_block_checkpoint_entry(&mut bytes, self.cursor.take_sequence(), &checkpoint);
        }
        let (id, position) = self.cursor.place(bytes.len());
        self.file_live.entry(position.file).or_default();
        self.in_flight = Some(InFlight {
            id,
            file: position.file,
            writes,
            relogged,
            fences,
            delete_after: delete_after.into_iter().filter(|file| *file != 0).collect(),
        });
        vec![BlockAction::Write(LogWrite { id, position, bytes: bytes.freeze() })]
    }
}

#[cfg(test)]
#[path = "block_segment_tests.rs"]
mod tests;
