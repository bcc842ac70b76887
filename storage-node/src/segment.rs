//! The segment: one replica of one protection group, as a pure state machine.
//!
//! [`SegmentCore`] does no I/O and reads no clock. The driver feeds it
//! appends, disk completions and read requests, and carries out the
//! [`Action`]s it returns: write these bytes at this log position and
//! fdatasync, acknowledge this connection, delete that log file.
//!
//! ## Foreground path (A17 §3.3, steps 1–2)
//! An append is validated (epoch, PG, page range, record CRCs, limits),
//! duplicates are dropped, and the records join the queue. While one log write
//! is in flight, everything that arrives is queued; when it completes, the
//! whole queue goes out as the next write with one fdatasync: group commit.
//! Only after that fdatasync are the records *durable*: they join the segment
//! chain, SCL advances, and every connection whose records were in the write
//! is acknowledged with the new SCL.
//!
//! ## Background path
//! - *Coalesce*: a page whose chain grew long is materialized at the highest
//!   of its LSNs at or below `min(SCL, writer's VDL)` (never above VDL: recovery
//!   may truncate above it) and the new page version is logged, piggybacked on
//!   the next write.
//! - *Garbage-collect*: once PGMRPL (the lowest read point) passes a durable
//!   version, older versions of that page and the records it subsumes go.
//! - *Clean*: when the log spans more files than `log_files_target` and at
//!   most half of what the oldest file logged is still live, that file's
//!   remaining live items are moved forward (its records' pages are
//!   coalesced, its live versions are re-logged); once empty, a checkpoint
//!   is logged and the file is deleted. A mostly-live file stays: moving
//!   it would rewrite about as much as it frees, so a segment whose live
//!   data outgrows the target simply spans more files.
//!
//! ## Invariants (asserted or checked)
//! - SCL only moves forward, and every record of the PG at or below SCL is
//!   durable here or subsumed by a durable version.
//! - A read is served only for `min_read_point <= read_point <= SCL`; the
//!   page chain it applies must link up exactly (each record's page backlink
//!   is the previous record applied), or the read fails instead of serving a
//!   wrong page.
//! - Nothing is acknowledged before the fdatasync that made it durable.

use crate::log_format::{
    Checkpoint, ENTRY_HEADER_BYTES, Entry, LogCursor, LogPosition, PageVersion, ScanResult, checkpoint_entry_bytes,
    encode_checkpoint_entry, encode_redo_entry, encode_versions_entry, redo_entry_bytes, version_item_bytes,
};
use crate::page_index::PageIndex;
use bytes::{Bytes, BytesMut};
use common::ids::{Epoch, IdHashMap, IdHashSet, Lsn, MembershipEpoch, PageId, PgId};
use common::limits::{
    ENTRY_OVERHEAD_GUARD, HYDRATE_BATCH_BYTES_MAX, LOG_BATCH_BYTES_MAX, PAGE_BYTES_MAX, PAGES_PER_PG_MAX,
    RECORD_BATCH_BYTES_MAX, RECORDS_PER_APPEND_MAX, SEGMENT_QUEUED_BYTES_MAX, TRUNCATIONS_MAX,
};
use common::message::{
    AppendAck, AppendRequest, ErrorCode, ErrorResponse, FetchRecordsRequest, HydrateBatch, HydrateCursor,
    HydrateRequest, Message, RecordBatch, SegmentStatus, Truncation, VersionImage,
};
use common::redo::{ChainApplier, RedoRecord};
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// Who waits for an acknowledgement (the driver's connection id).
pub type ReplyTo = u64;

/// How a segment is shaped and tuned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentConfig {
    pub pg: PgId,
    pub page_bytes: usize,
    /// Pages per protection group: page `p` belongs to PG `p / pages_per_pg`.
    pub pages_per_pg: u64,
    /// Size of each preallocated log file.
    pub log_file_bytes: u64,
    /// Log files kept before the cleaner frees the oldest.
    pub log_files_target: u64,
    /// A page is coalesced once this many records wait above its newest version.
    pub coalesce_chain_records: usize,
    /// Most page-version bytes logged with one write (keeps redo latency low).
    pub coalesce_bytes_per_write: usize,
}

impl SegmentConfig {
    pub fn new(pg: PgId, page_bytes: usize, pages_per_pg: u64) -> Self {
        SegmentConfig {
            pg,
            page_bytes,
            pages_per_pg,
            log_file_bytes: 64 * 1024 * 1024,
            log_files_target: 8,
            coalesce_chain_records: 32,
            coalesce_bytes_per_write: 256 * 1024,
        }
    }

    /// Largest single log write this segment produces.
    fn write_bytes_max(&self) -> usize {
        LOG_BATCH_BYTES_MAX.min(self.log_file_bytes as usize / 2)
    }

    fn validate(&self) -> Result<(), String> {
        if self.page_bytes == 0 || self.page_bytes > PAGE_BYTES_MAX {
            return Err(format!("page_bytes {} outside 1..=PAGE_BYTES_MAX", self.page_bytes));
        }
        let smallest_file = 4 * (self.page_bytes + ENTRY_OVERHEAD_GUARD) as u64;
        if self.log_file_bytes < smallest_file || !self.log_file_bytes.is_multiple_of(8) {
            return Err(format!(
                "log_file_bytes {} must be a multiple of 8 and at least {smallest_file}",
                self.log_file_bytes
            ));
        }
        if self.pages_per_pg == 0 || self.log_files_target < 2 || self.coalesce_chain_records == 0 {
            return Err("pages_per_pg, coalesce_chain_records must be positive and log_files_target >= 2".into());
        }
        if self.pages_per_pg > PAGES_PER_PG_MAX {
            return Err(format!("pages_per_pg {} exceeds PAGES_PER_PG_MAX ({PAGES_PER_PG_MAX})", self.pages_per_pg));
        }
        Ok(())
    }
}

/// What the driver must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Write `bytes` at `position` (creating the file if new), fdatasync, then
    /// call [`SegmentCore::write_done`] with `id`.
    Write(LogWrite),
    /// Send an append acknowledgement.
    Ack { to: ReplyTo, ack: AppendAck },
    /// Send a refusal.
    Refuse { to: ReplyTo, error: ErrorResponse },
    /// Send a status (the answer to a seal, once its epoch is durable).
    Status { to: ReplyTo, status: SegmentStatus },
    /// Delete a log file that holds nothing live.
    DeleteFile(u64),
}

/// One write of the log: whole entries, written with one write and one fdatasync.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogWrite {
    pub id: u64,
    pub position: LogPosition,
    pub bytes: Bytes,
}

/// What the segment found when it rebuilt itself from its log.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    pub records: usize,
    pub page_versions: usize,
    pub segment_complete_lsn: Lsn,
    pub highest_durable_lsn: Lsn,
    /// Bytes of a torn or corrupt tail that were cut off (the driver zeroes them).
    pub truncated_tail_bytes: u64,
    /// Corrupt entries in the middle of the log (the segment needs repair).
    pub mid_log_corruptions: usize,
}

/// What a segment took from its peers: records that filled holes, and
/// whole page states (hydrations) when records alone could not.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerRepairStats {
    pub records_received: u64,
    pub hydrations_completed: u64,
    /// Bytes of versions and records the hydrations brought.
    pub hydrated_bytes: u64,
}

/// Why a page could not be served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadRefusal {
    pub code: ErrorCode,
    pub message: String,
}

/// A durable record in its page's chain: its LSN, the log file that holds
/// it, and its encoded bytes exactly as the writer checksummed them (shared
/// with the frame or log buffer it arrived in). Materialization, recovery
/// and gossip decode it again, which checks its CRC once more before it is
/// used: corruption in memory is caught too. One lives in memory for every
/// record not yet subsumed by a page version, so it is kept small.
#[derive(Debug)]
struct ChainRecord {
    lsn: Lsn,
    file: u64,
    encoded: Bytes,
}

impl ChainRecord {
    fn decode(&self) -> Result<RedoRecord, String> {
        RedoRecord::decode(&self.encoded, 0)
            .map(|(record, _)| record)
            .map_err(|error| format!("record {} failed its check in memory: {error}", self.lsn))
    }
}

/// A durable page version and the log file that holds it.
#[derive(Debug, Clone)]
struct StoredVersion {
    image: Bytes,
    file: u64,
}

/// Everything the segment knows about one page. The page chains are the
/// only index of durable records: one hash probe per record on the append
/// path.
#[derive(Debug, Default)]
struct PageChain {
    versions: BTreeMap<Lsn, StoredVersion>,
    /// Durable records of this page (above SCL too), ascending. A sorted
    /// vector: chains are short (coalescing cuts them), and most pages have
    /// one or two records, for which a tree node would cost far more.
    records: Vec<ChainRecord>,
}

impl PageChain {
    fn newest_version_lsn(&self) -> Lsn {
        self.versions.keys().next_back().copied().unwrap_or(Lsn::ZERO)
    }

    /// The LSN of the page's latest change held, version or record.
    fn newest_lsn(&self) -> Lsn {
        self.records.last().map_or(Lsn::ZERO, |record| record.lsn).max(self.newest_version_lsn())
    }

    /// Index of the first record above `lsn`.
    fn first_above(&self, lsn: Lsn) -> usize {
        self.records.partition_point(|record| record.lsn <= lsn)
    }

    /// The page's records in `(above, up_to]`.
    fn records_between(&self, above: Lsn, up_to: Lsn) -> &[ChainRecord] {
        let start = self.first_above(above);
        &self.records[start..self.first_above(up_to).max(start)]
    }

    fn holds_record(&self, lsn: Lsn) -> bool {
        self.record(lsn).is_some()
    }

    fn record(&self, lsn: Lsn) -> Option<&ChainRecord> {
        let at = self.first_above(lsn);
        (at > 0 && self.records[at - 1].lsn == lsn).then(|| &self.records[at - 1])
    }

    fn remove_record(&mut self, lsn: Lsn) -> Option<ChainRecord> {
        let at = self.first_above(lsn);
        (at > 0 && self.records[at - 1].lsn == lsn).then(|| self.records.remove(at - 1))
    }

    /// Adds a record; false if the chain already holds its LSN.
    fn insert_record(&mut self, record: ChainRecord) -> bool {
        let at = self.first_above(record.lsn);
        if at > 0 && self.records[at - 1].lsn == record.lsn {
            return false;
        }
        if self.records.capacity() == 0 {
            // Most pages never get a second record: no room for four.
            self.records.reserve_exact(1);
        }
        self.records.insert(at, record);
        true
    }

    fn records_above_newest_version(&self) -> usize {
        self.records.len() - self.first_above(self.newest_version_lsn())
    }
}

/// The log write in flight.
#[derive(Debug)]
struct InFlight {
    id: u64,
    file: u64,
    redo: Vec<RedoRecord>,
    versions: Vec<PageVersion>,
    waiters: BTreeSet<ReplyTo>,
    /// Files to delete once this write (which carries a checkpoint) is durable.
    delete_after: Vec<u64>,
    /// Seals answered once this write (whose checkpoint carries their epoch) is durable.
    sealed: Vec<SealWaiter>,
    /// This write carries the last batch of a hydration: once durable, the
    /// segment is complete through the first value and serves no read below
    /// the second.
    completes_hydration: Option<(Lsn, Lsn)>,
}

/// Who waits for a seal: the connection and its request id.
type SealWaiter = (ReplyTo, u64);

/// A record's entry in its log file's list: which record, of which page.
pub(crate) type FileRecord = (Lsn, PageId);

/// One segment replica of a protection group.
#[derive(Debug)]
pub struct SegmentCore {
    config: SegmentConfig,
    epoch: Epoch,
    /// The newest membership of the PG this segment took (see `set_membership`).
    membership_epoch: MembershipEpoch,
    segment_complete_lsn: Lsn,
    highest_durable_lsn: Lsn,
    /// The writer's VDL as last reported: coalescing never goes above it.
    coalesce_bound: Lsn,
    min_read_point: Lsn,
    needs_repair: bool,
    failed: Option<String>,

    /// Durable records in page chains (not yet subsumed by a version).
    record_count: usize,
    /// Durable records above SCL, keyed by their segment backlink...
    parked_by_prev: IdHashMap<Lsn, Lsn>,
    /// ...and by their own LSN, to recognize duplicates.
    parked_lsns: IdHashSet<Lsn>,
    pages: PageIndex<PageChain>,

    queued: Vec<RedoRecord>,
    queued_bytes: usize,
    queued_waiters: BTreeSet<ReplyTo>,
    /// LSNs queued or in flight, so duplicates are not logged twice.
    pending_lsns: IdHashSet<Lsn>,
    in_flight: Option<InFlight>,

    coalesce_queue: BTreeSet<PageId>,
    pending_versions: Vec<PageVersion>,
    /// Durable versions waiting for PGMRPL to reach them before they GC older state.
    gc_waiting: BTreeMap<Lsn, Vec<PageId>>,

    cursor: LogCursor,
    /// Live items (records and versions) per log file.
    file_live: BTreeMap<u64, usize>,
    file_records: BTreeMap<u64, Vec<FileRecord>>,
    file_versions: BTreeMap<u64, Vec<(PageId, Lsn)>>,
    cleaning: Option<u64>,
    checkpoint_due: Vec<u64>,
    /// Seals (and opens) of the current epoch waiting for a checkpoint
    /// that carries it.
    seal_waiters: Vec<SealWaiter>,
    /// The current epoch or truncation list is not durable yet (a
    /// checkpoint must log it).
    seal_due: bool,

    /// The epoch whose writer's truncation list `truncations` is: appends
    /// are taken only when it is the current epoch (the epoch is *open*).
    open_epoch: Epoch,
    /// Ranges of records voided by recovering writers. No record inside one
    /// is ever held: those present when the list arrived were dropped, and
    /// later ones are refused.
    truncations: Vec<Truncation>,
    /// Durable records above `recent_floor` (the writer's VDL when this was
    /// last trimmed), ascending: what a recovering writer reads and a
    /// truncation drops, found without walking the whole log.
    recent: VecDeque<(Lsn, PageId)>,
    recent_floor: Lsn,
    /// The connection that appended last: told when gossip advances SCL.
    last_writer: Option<ReplyTo>,
    gossip: Gossip,
    /// Hydrate transfers served to peers, by id.
    transfers: BTreeMap<u64, Transfer>,
    next_transfer: u64,
    /// A hydrate batch received, waiting for its log write.
    /// Hydrate batches received, waiting for their log writes, oldest first.
    hydration_pending: VecDeque<(Vec<PageVersion>, Vec<RedoRecord>)>,
}

impl Hydration {
    /// The whole page state from `peer`.
    fn from_peer(peer: usize) -> Hydration {
        Hydration::changed_above(peer, Lsn::ZERO)
    }

    /// From `peer`, only the pages changed above `lsn` (this segment holds
    /// the rest, complete through `lsn`).
    fn changed_above(peer: usize, lsn: Lsn) -> Hydration {
        Hydration {
            changed_above: lsn,
            peer,
            transfer: 0,
            cursor: HydrateCursor::default(),
            paged_out: false,
            complete_through: Lsn::ZERO,
            min_read_point: Lsn::ZERO,
            retries: 0,
        }
    }
}

/// The oldest log file is cleaned only while at most this fraction of the
/// items logged in it is still live (see `plan_cleaning`).
const CLEAN_LIVE_NUMERATOR: usize = 1;
const CLEAN_LIVE_DENOMINATOR: usize = 2;

/// Hydrate batches a repair keeps received but not yet written before it
/// stops asking. A log write takes as many as fit (two of 3 MiB in an
/// 8 MiB write), so while it is on the disk one batch waits and one is on
/// the wire: the peer's serving and the network overlap the disk.
const HYDRATE_BATCHES_AHEAD: usize = 3;

/// Times a repair asks its peer again for a batch that did not come (a
/// request lost while the link connected, a busy peer) before it starts
/// over from another peer; starting over throws the batches so far away.
const HYDRATE_RETRIES: u32 = 3;

/// Rounds of [`SegmentCore::gossip_due`] a peer has to answer before the
/// segment asks another.
const GOSSIP_PATIENCE_ROUNDS: u32 = 5;

/// Every this many rounds a segment that sees no gap asks a peer for its SCL.
const GOSSIP_PROBE_ROUNDS: u32 = 25;

/// A segment's gossip with its peers.
#[derive(Debug, Default)]
struct Gossip {
    /// Calls of [`SegmentCore::gossip_due`] so far.
    rounds: u32,
    /// The request waiting for an answer, and rounds waited.
    outstanding: Option<(u64, u32)>,
    request_id: u64,
    /// Which peer to ask next (modulo their count).
    next_peer: usize,
    /// The highest SCL a peer reported.
    peer_complete: Lsn,
    /// The last answer's peer held more records than one batch carried.
    peer_has_more: bool,
    /// The last record of the chain fetched so far, queued or being
    /// written: the next fetch asks above it, not above SCL, so it can go
    /// out while the previous batch is still on its way to the disk.
    fetched_through: Lsn,
    records_received: u64,
    /// The repair in progress from a peer, if any.
    hydration: Option<Hydration>,
    /// Which peer the outstanding request went to.
    asked_peer: usize,
    hydrations_completed: u64,
    hydrated_bytes: u64,
}

/// Rebuilding this segment's page state from a peer (see [`HydrateRequest`]).
#[derive(Debug)]
struct Hydration {
    peer: usize,
    /// The peer's transfer id (0 until its first batch).
    transfer: u64,
    cursor: HydrateCursor,
    /// The last batch arrived and its write is durable or on its way.
    paged_out: bool,
    /// What the peer was complete through, and its pinned minimum read point.
    complete_through: Lsn,
    min_read_point: Lsn,
    /// Requests for the current batch that went unanswered.
    retries: u32,
    /// See [`HydrateRequest::changed_above`].
    changed_above: Lsn,
}

/// Rounds of [`SegmentCore::background`] a transfer may sit unasked
/// before the peer forgets it (and unpins its garbage collection).
const TRANSFER_IDLE_ROUNDS_MAX: u32 = 500;

/// A hydrate transfer this segment serves to a peer.
#[derive(Debug)]
struct Transfer {
    /// Garbage collection stays at or below this while the transfer lives.
    pin: Lsn,
    complete_through: Lsn,
    idle_rounds: u32,
}

impl SegmentCore {
    fn empty(config: SegmentConfig, epoch: Epoch) -> Result<SegmentCore, String> {
        config.validate()?;
        let log_file_bytes = config.log_file_bytes;
        let pages = PageIndex::new(u64::from(config.pg.0) * config.pages_per_pg, config.pages_per_pg);
        Ok(SegmentCore {
            config,
            epoch,
            membership_epoch: MembershipEpoch::INITIAL,
            segment_complete_lsn: Lsn::ZERO,
            highest_durable_lsn: Lsn::ZERO,
            coalesce_bound: Lsn::ZERO,
            min_read_point: Lsn::ZERO,
            needs_repair: false,
            failed: None,
            record_count: 0,
            parked_by_prev: IdHashMap::default(),
            parked_lsns: IdHashSet::default(),
            pages,
            queued: Vec::new(),
            queued_bytes: 0,
            queued_waiters: BTreeSet::new(),
            pending_lsns: IdHashSet::default(),
            in_flight: None,
            coalesce_queue: BTreeSet::new(),
            pending_versions: Vec::new(),
            gc_waiting: BTreeMap::new(),
            cursor: LogCursor::new(log_file_bytes),
            file_live: BTreeMap::new(),
            file_records: BTreeMap::new(),
            file_versions: BTreeMap::new(),
            cleaning: None,
            checkpoint_due: Vec::new(),
            seal_waiters: Vec::new(),
            seal_due: false,
            open_epoch: Epoch::NONE,
            truncations: Vec::new(),
            recent: VecDeque::new(),
            recent_floor: Lsn::ZERO,
            last_writer: None,
            gossip: Gossip::default(),
            transfers: BTreeMap::new(),
            next_transfer: 1,
            hydration_pending: VecDeque::new(),
        })
    }

    /// A brand-new segment. The returned write logs its first checkpoint.
    pub fn create(config: SegmentConfig, epoch: Epoch) -> Result<(SegmentCore, Vec<Action>), String> {
        let mut core = SegmentCore::empty(config, epoch)?;
        core.checkpoint_due.push(0);
        let actions = core.start_write();
        Ok((core, actions))
    }

    /// A brand-new segment already open at `epoch` with an empty
    /// truncation list: for a writer that knows the volume is empty
    /// (`WriterCore::new`: benchmarks and tests of one segment), instead of
    /// recovering it. The returned write logs both.
    pub fn create_open(config: SegmentConfig, epoch: Epoch) -> Result<(SegmentCore, Vec<Action>), String> {
        let mut core = SegmentCore::empty(config, epoch)?;
        core.open_epoch = epoch;
        core.truncations = vec![Truncation { epoch, above: Lsn::ZERO, through: Lsn::ZERO }];
        core.checkpoint_due.push(0);
        let actions = core.start_write();
        Ok((core, actions))
    }

    /// Rebuilds a segment from what [`crate::log_format::scan_log`] read back.
    ///
    /// Entries are replayed in log order. A checkpoint whose truncation list
    /// differs from the one applied so far voids the records logged before
    /// it inside its ranges, as the live segment did when the list arrived;
    /// records logged after it stay (a later writer may have vouched for
    /// them). SCL starts at the last checkpoint logged before the first
    /// corruption (SCL only drops at a truncation, which logs a checkpoint).
    pub fn recover(config: SegmentConfig, scan: ScanResult) -> Result<(SegmentCore, RecoveryReport), String> {
        let cursor = LogCursor::resume(config.log_file_bytes, &scan);
        let mut core = SegmentCore::empty(config, Epoch::INITIAL)?;
        let mut base = Lsn::ZERO;
        let mut saw_checkpoint = false;
        // (prev_segment_lsn, lsn, page) of every logged record still standing.
        let mut logged: Vec<(Lsn, Lsn, PageId)> = Vec::new();
        // A checkpoint logged after a corrupt entry may claim an SCL that covers
        // records lost in it: only checkpoints before the first corruption count.
        let first_corruption = scan.corruptions.first().map(|corruption| corruption.at);
        for (position, entry) in scan.entries {
            match entry {
                Entry::Checkpoint(checkpoint) => {
                    if checkpoint.pg != core.config.pg || checkpoint.page_bytes as usize != core.config.page_bytes {
                        return Err(format!(
                            "log belongs to {} with {}-byte pages, expected {} with {}-byte pages",
                            checkpoint.pg, checkpoint.page_bytes, core.config.pg, core.config.page_bytes
                        ));
                    }
                    saw_checkpoint = true;
                    core.epoch = core.epoch.max(checkpoint.epoch);
                    core.membership_epoch = core.membership_epoch.max(checkpoint.membership_epoch);
                    if first_corruption.is_none_or(|corrupt| position < corrupt) {
                        base = checkpoint.segment_complete_lsn;
                    }
                    core.min_read_point = core.min_read_point.max(checkpoint.min_read_point);
                    if checkpoint.open_epoch != core.open_epoch || checkpoint.truncations != core.truncations {
                        core.open_epoch = checkpoint.open_epoch;
                        core.truncations = checkpoint.truncations;
                        let truncations = &core.truncations;
                        let (voided, kept): (Vec<_>, Vec<_>) = logged
                            .into_iter()
                            .partition(|(_, lsn, _)| truncations.iter().any(|range| range.contains(*lsn)));
                        logged = kept;
                        for (_, lsn, page) in voided {
                            core.drop_record(page, lsn);
                        }
                    }
                }
                Entry::Redo(records) => {
                    let pg = core.config.pg;
                    for record in records.into_iter().filter(|record| record.pg == pg) {
                        // Every logged record was durable here, also one a
                        // version has since subsumed: all of them link the chain.
                        logged.push((record.prev_segment_lsn, record.lsn, record.page));
                        core.insert_durable_record(record, position.file);
                    }
                }
                Entry::PageVersions(versions) => {
                    for version in versions {
                        core.insert_durable_version(version, position.file);
                    }
                }
                Entry::BlockVersions(_) | Entry::BlockCheckpoint(_) => {
                    return Err("log holds block-volume entries: it belongs to a block segment".into());
                }
            }
        }
        if !saw_checkpoint && !logged.is_empty() {
            return Err("log holds records but no checkpoint: not a segment log".into());
        }
        core.segment_complete_lsn = base;
        core.highest_durable_lsn = base;
        core.coalesce_bound = core.min_read_point;
        core.recent_floor = core.min_read_point;
        let mut recent: Vec<(Lsn, PageId)> = Vec::new();
        for (prev, lsn, page) in logged {
            if lsn > core.recent_floor && core.pages.get(page).is_some_and(|chain| chain.holds_record(lsn)) {
                recent.push((lsn, page));
            }
            if lsn > base {
                // A record whose predecessor lies below the base follows the
                // base directly (the base need not be a record of this PG).
                core.park(prev.max(base), lsn);
                core.highest_durable_lsn = core.highest_durable_lsn.max(lsn);
            }
        }
        recent.sort_unstable();
        recent.dedup();
        core.recent = recent.into();
        core.advance_segment_complete_lsn();
        core.needs_repair = !scan.corruptions.is_empty();
        core.cursor = cursor;
        let page_ids: Vec<PageId> = core.pages.pages().collect();
        for page in page_ids {
            core.collect_page(page);
            core.consider_for_coalescing(page);
        }
        let report = RecoveryReport {
            records: core.record_count,
            page_versions: core.pages.values().map(|chain| chain.versions.len()).sum(),
            segment_complete_lsn: core.segment_complete_lsn,
            highest_durable_lsn: core.highest_durable_lsn,
            truncated_tail_bytes: scan.truncated_tail_bytes,
            mid_log_corruptions: scan.corruptions.len(),
        };
        Ok((core, report))
    }

    pub fn config(&self) -> &SegmentConfig {
        &self.config
    }

    /// The segment's state, as reported to clients.
    pub fn status(&self, request_id: u64) -> SegmentStatus {
        SegmentStatus {
            request_id,
            pg: self.config.pg,
            epoch: self.epoch,
            segment_complete_lsn: self.segment_complete_lsn,
            highest_durable_lsn: self.highest_durable_lsn,
            min_read_point: self.min_read_point,
            needs_repair: self.needs_repair,
            open_epoch: self.open_epoch,
            volume_durable_hint: self.coalesce_bound,
            membership_epoch: self.membership_epoch,
        }
    }

    /// The truncation list this segment holds (its writer's: see `open_epoch`).
    pub fn truncations(&self) -> &[Truncation] {
        &self.truncations
    }

    fn is_truncated(&self, lsn: Lsn) -> bool {
        self.truncations.iter().any(|range| range.contains(lsn))
    }

    /// Bytes of the checkpoint this segment logs now.
    fn checkpoint_bytes(&self) -> usize {
        checkpoint_entry_bytes(self.truncations.len())
    }

    pub fn segment_complete_lsn(&self) -> Lsn {
        self.segment_complete_lsn
    }

    /// Bytes queued behind the in-flight write.
    /// No log write is in flight (a new segment's first checkpoint is durable).
    pub fn is_idle(&self) -> bool {
        self.in_flight.is_none()
    }

    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes
    }

    /// Records held in memory (durable, not yet garbage-collected).
    pub fn record_count(&self) -> usize {
        self.record_count
    }

    /// Log files that still hold something.
    pub fn live_files(&self) -> Vec<u64> {
        self.file_live.keys().copied().collect()
    }

    fn ack(&self) -> AppendAck {
        AppendAck {
            pg: self.config.pg,
            epoch: self.epoch,
            segment_complete_lsn: self.segment_complete_lsn,
            highest_durable_lsn: self.highest_durable_lsn,
        }
    }

    fn refusal(&self, code: ErrorCode, message: String) -> ErrorResponse {
        ErrorResponse { request_id: 0, pg: self.config.pg, code, message }
    }

    fn check_epoch(&self, epoch: Epoch) -> Result<(), (ErrorCode, String)> {
        if epoch < self.epoch {
            Err((ErrorCode::StaleEpoch, format!("request {epoch} is older than segment {}", self.epoch)))
        } else if epoch > self.epoch {
            Err((ErrorCode::UnknownEpoch, format!("request {epoch} is newer than segment {}", self.epoch)))
        } else {
            Ok(())
        }
    }

    fn validate_record(&self, record: &RedoRecord) -> Result<(), String> {
        if record.pg != self.config.pg {
            return Err(format!("record {} is for {}, this segment is {}", record.lsn, record.pg, self.config.pg));
        }
        if record.page.0 / self.config.pages_per_pg != u64::from(self.config.pg.0) {
            return Err(format!("record {} writes {} outside {}", record.lsn, record.page, self.config.pg));
        }
        if record.encoded.len() + self.checkpoint_bytes() + 2 * ENTRY_OVERHEAD_GUARD > self.config.write_bytes_max() {
            return Err(format!(
                "record {} of {} bytes exceeds this segment's largest log write",
                record.lsn,
                record.encoded.len()
            ));
        }
        if record.op.extent_end() > self.config.page_bytes {
            return Err(format!("record {} writes past a {}-byte page", record.lsn, self.config.page_bytes));
        }
        if self.is_truncated(record.lsn) {
            return Err(format!("record {} lies in a truncated range: it is void", record.lsn));
        }
        Ok(())
    }

    /// An append from connection `from`.
    pub fn append(&mut self, request: AppendRequest, from: ReplyTo) -> Vec<Action> {
        if let Some(reason) = &self.failed {
            let error = self.refusal(ErrorCode::DiskFailure, reason.clone());
            return vec![Action::Refuse { to: from, error }];
        }
        if let Err((code, message)) = self.check_epoch(request.epoch) {
            return vec![Action::Refuse { to: from, error: self.refusal(code, message) }];
        }
        if self.open_epoch != self.epoch {
            let message = format!("{} is not open: its writer has not sent its truncation list", self.epoch);
            return vec![Action::Refuse { to: from, error: self.refusal(ErrorCode::NotOpen, message) }];
        }
        if request.membership_epoch < self.membership_epoch {
            let message = format!(
                "the append's {} is older than the segment's {}",
                request.membership_epoch, self.membership_epoch
            );
            return vec![Action::Refuse { to: from, error: self.refusal(ErrorCode::StaleMembership, message) }];
        }
        if let Some(problem) = request.records.iter().find_map(|record| self.validate_record(record).err()) {
            return vec![Action::Refuse { to: from, error: self.refusal(ErrorCode::InvalidRequest, problem) }];
        }
        let incoming: usize = request.records.iter().map(|record| record.encoded.len()).sum();
        if self.queued_bytes + incoming > SEGMENT_QUEUED_BYTES_MAX {
            let message =
                format!("{} bytes queued; SEGMENT_QUEUED_BYTES_MAX is {SEGMENT_QUEUED_BYTES_MAX}", self.queued_bytes);
            return vec![Action::Refuse { to: from, error: self.refusal(ErrorCode::Busy, message) }];
        }
        let mut actions = Vec::new();
        if request.min_read_point > self.min_read_point {
            self.min_read_point = request.min_read_point;
            self.collect_garbage();
        }
        if request.volume_durable_lsn > self.coalesce_bound {
            self.coalesce_bound = request.volume_durable_lsn;
            self.trim_recent();
        }
        self.last_writer = Some(from);
        let (accepted, problems) = self.queue_new_records(request.records);
        for problem in problems {
            actions.push(Action::Refuse { to: from, error: self.refusal(ErrorCode::InvalidRequest, problem) });
        }
        if accepted == 0 {
            // Nothing new: report where we are (the writer may have missed an ack).
            actions.push(Action::Ack { to: from, ack: self.ack() });
            return actions;
        }
        self.queued_waiters.insert(from);
        actions.extend(self.start_write());
        actions
    }

    /// Queues the records not held, queued or in flight yet (validated
    /// already); returns how many, and why any was refused.
    fn queue_new_records(&mut self, records: Vec<RedoRecord>) -> (usize, Vec<String>) {
        let mut accepted = 0;
        let mut problems = Vec::new();
        for record in records {
            let lsn = record.lsn;
            if lsn <= self.segment_complete_lsn || self.parked_lsns.contains(&lsn) || self.pending_lsns.contains(&lsn) {
                continue;
            }
            if record.prev_segment_lsn < self.segment_complete_lsn {
                // Another record already follows that backlink in the chain.
                problems.push(format!(
                    "record {lsn} links to {} below SCL {}: the chain already continues differently",
                    record.prev_segment_lsn, self.segment_complete_lsn
                ));
                continue;
            }
            self.pending_lsns.insert(lsn);
            self.queued_bytes += record.encoded.len();
            self.queued.push(record);
            accepted += 1;
        }
        (accepted, problems)
    }

    /// Gossip: whether this segment should ask a peer of its PG for records
    /// now, and which. It asks while its chain has a hole (records held
    /// above SCL) or it is behind what it knows exists (the writer's VDL,
    /// a peer's SCL), one request at a time, moving to the next of its
    /// `peer_count` peers when one has nothing or stays silent. Returns the
    /// peer's index and the request; the driver sends it and hands the
    /// answer to [`Self::gossip_received`].
    pub fn gossip_due(&mut self, peer_count: usize) -> Option<(usize, Message)> {
        if !self.may_ask_peers(peer_count) {
            return None;
        }
        if let Some(outstanding) = self.gossip.outstanding.as_mut() {
            outstanding.1 += 1;
            if outstanding.1 < GOSSIP_PATIENCE_ROUNDS {
                return None;
            }
            self.gossip.outstanding = None;
            self.gossip.fetched_through = Lsn::ZERO;
            match self.gossip.hydration.as_mut() {
                // The same batch from the same peer again.
                Some(hydration) if hydration.retries < HYDRATE_RETRIES => hydration.retries += 1,
                _ => {
                    self.gossip.next_peer += 1; // silent: try another
                    // A repair starts over from the next peer (batches
                    // already logged only added versions and records).
                    self.gossip.hydration = None;
                }
            }
        }
        self.gossip.rounds += 1;
        self.gossip.request_id += 1;
        let request_id = self.gossip.request_id;
        if self.gossip.hydration.is_none() && self.needs_repair {
            // Corruption left a hole records may not fill: rebuild from a peer.
            self.gossip.hydration = Some(Hydration::from_peer(self.gossip.next_peer % peer_count));
        }
        if self.gossip.hydration.is_some() {
            return self.next_hydrate_request(request_id, peer_count);
        }
        if let Some(request) = self.fetch_request(request_id, peer_count) {
            return Some(request);
        }
        if !self.gossip.rounds.is_multiple_of(GOSSIP_PROBE_ROUNDS) {
            return None;
        }
        // A probe: no records, only the peer's SCL (a segment that missed
        // the end of the log has no hole to see).
        Some(self.ask_for_records(request_id, peer_count, self.segment_complete_lsn))
    }

    /// A segment asks its peers only when it has some, works, and is open
    /// at its epoch (what it would take must pass its truncation list).
    fn may_ask_peers(&self, peer_count: usize) -> bool {
        peer_count > 0 && self.failed.is_none() && self.open_epoch == self.epoch
    }

    /// A request for the records this segment lacks, if it is behind and
    /// has room to queue them.
    fn fetch_request(&mut self, request_id: u64, peer_count: usize) -> Option<(usize, Message)> {
        let behind = self.highest_durable_lsn.max(self.gossip.peer_complete) > self.segment_complete_lsn;
        if !behind || self.queued_bytes > SEGMENT_QUEUED_BYTES_MAX / 2 {
            return None;
        }
        // With a hole, only what lies below the first record held above it.
        let through = self.parked_lsns.iter().min().map_or(Lsn(u64::MAX), |lowest| Lsn(lowest.0 - 1));
        Some(self.ask_for_records(request_id, peer_count, through))
    }

    fn ask_for_records(&mut self, request_id: u64, peer_count: usize, through: Lsn) -> (usize, Message) {
        let request = FetchRecordsRequest {
            request_id,
            pg: self.config.pg,
            epoch: self.epoch,
            above: self.segment_complete_lsn.max(self.gossip.fetched_through),
            through,
        };
        self.gossip.outstanding = Some((request_id, 0));
        let peer = self.gossip.next_peer % peer_count;
        self.gossip.asked_peer = peer;
        (peer, Message::FetchRecords(request))
    }

    /// The next batch request of the repair in progress, unless the last
    /// batch is still waiting for the disk or all of them came.
    fn next_hydrate_request(&mut self, request_id: u64, peer_count: usize) -> Option<(usize, Message)> {
        let hydration = self.gossip.hydration.as_ref()?;
        if hydration.paged_out || self.hydration_pending.len() >= HYDRATE_BATCHES_AHEAD {
            return None; // waiting for the disk
        }
        let room = self.config.write_bytes_max() - self.checkpoint_bytes() - 4 * ENTRY_OVERHEAD_GUARD;
        let request = HydrateRequest {
            request_id,
            pg: self.config.pg,
            epoch: self.epoch,
            transfer: hydration.transfer,
            cursor: hydration.cursor,
            bytes_max: room.min(HYDRATE_BATCH_BYTES_MAX) as u32,
            changed_above: hydration.changed_above,
        };
        let peer = hydration.peer % peer_count;
        self.gossip.outstanding = Some((request_id, 0));
        self.gossip.asked_peer = peer;
        Some((peer, Message::Hydrate(request)))
    }

    /// Between gossip rounds: the next batch of a catch-up in progress (a
    /// repair's, or records when the peer said it has more) as soon as the
    /// previous one is on its way to the disk, so catching up streams (one
    /// batch in the network while one is written) instead of taking one
    /// batch per round. Touches no round or patience counter.
    pub fn catch_up_request_due(&mut self, peer_count: usize) -> Option<(usize, Message)> {
        if !self.may_ask_peers(peer_count) || self.gossip.outstanding.is_some() {
            return None;
        }
        if self.gossip.hydration.is_some() {
            self.gossip.request_id += 1;
            return self.next_hydrate_request(self.gossip.request_id, peer_count);
        }
        if !self.gossip.peer_has_more {
            return None;
        }
        self.gossip.request_id += 1;
        self.fetch_request(self.gossip.request_id, peer_count)
    }

    /// A peer's answer to [`Self::gossip_due`]'s request: the records this
    /// segment lacks are made durable as an append's would be (those inside
    /// its truncation list are not taken), and the writer that last
    /// appended is told the new SCL when they are.
    pub fn gossip_received(&mut self, batch: RecordBatch) -> Vec<Action> {
        if self.gossip.outstanding.is_none_or(|(request_id, _)| request_id != batch.request_id) {
            return Vec::new(); // late or duplicated
        }
        self.gossip.outstanding = None;
        if batch.epoch != self.epoch || self.open_epoch != self.epoch || self.failed.is_some() {
            self.gossip.next_peer += 1;
            return Vec::new();
        }
        self.gossip.peer_complete = batch.segment_complete_lsn;
        self.gossip.peer_has_more = false;
        let chain_end = self.segment_complete_lsn.max(self.gossip.fetched_through);
        self.gossip.fetched_through = Lsn::ZERO;
        let continues = batch.records.first().is_some_and(|first| first.prev_segment_lsn <= chain_end);
        if !continues
            && batch.segment_complete_lsn > self.segment_complete_lsn
            && batch.min_read_point > self.segment_complete_lsn
        {
            // The peer collected records this segment lacks (subsumed by
            // its page versions): only its page state can bring it up, and
            // only that of the pages changed since this segment's SCL.
            self.gossip.hydration = Some(Hydration::changed_above(self.gossip.asked_peer, self.segment_complete_lsn));
            return Vec::new();
        }
        let last_lsn = batch.records.last().map_or(Lsn::ZERO, |record| record.lsn);
        let useful: Vec<RedoRecord> =
            batch.records.into_iter().filter(|record| self.validate_record(record).is_ok()).collect();
        let (accepted, _) = self.queue_new_records(useful);
        if accepted == 0 {
            if batch.segment_complete_lsn <= self.segment_complete_lsn {
                self.gossip.next_peer += 1; // nothing there: ask another next time
            }
            return Vec::new();
        }
        self.gossip.records_received += accepted as u64;
        self.gossip.peer_has_more = batch.more;
        if continues && batch.more {
            self.gossip.fetched_through = last_lsn;
        }
        if let Some(writer) = self.last_writer {
            self.queued_waiters.insert(writer);
        }
        self.start_write()
    }

    /// Serves a batch of a hydrate transfer to a peer: page by page (in
    /// the page index's stable order), the newest version at or below the
    /// transfer's pin and the records above it up to the SCL the transfer
    /// started at. Garbage collection stays at or below the pin while the
    /// transfer lives, so nothing a later batch needs goes away.
    pub fn hydrate(&mut self, request: &HydrateRequest) -> Result<HydrateBatch, ReadRefusal> {
        if let Err((code, message)) = self.check_epoch(request.epoch) {
            return Err(ReadRefusal { code, message });
        }
        if self.open_epoch != self.epoch || self.needs_repair || self.failed.is_some() {
            let message =
                format!("{} cannot serve its page state (not open, or needing repair itself)", self.config.pg);
            return Err(ReadRefusal { code: ErrorCode::NotOpen, message });
        }
        let transfer_id = if request.transfer == 0 {
            let id = self.next_transfer;
            self.next_transfer += 1;
            let transfer =
                Transfer { pin: self.min_read_point, complete_through: self.segment_complete_lsn, idle_rounds: 0 };
            self.transfers.insert(id, transfer);
            id
        } else {
            request.transfer
        };
        let Some(transfer) = self.transfers.get_mut(&transfer_id) else {
            let message = format!("transfer {transfer_id} expired: start again");
            return Err(ReadRefusal { code: ErrorCode::InvalidRequest, message });
        };
        transfer.idle_rounds = 0;
        let (pin, through) = (transfer.pin, transfer.complete_through);
        let budget =
            (request.bytes_max as usize).clamp(version_item_bytes(self.config.page_bytes) * 2, HYDRATE_BATCH_BYTES_MAX);
        let (mut versions, mut records, mut bytes) = (Vec::new(), Vec::new(), 0);
        let mut cursor = request.cursor;
        let mut next = None;
        'pages: while let Some((page, chain)) = self.pages.at(cursor.page_position as usize) {
            if cursor.after_lsn == Lsn::ZERO && chain.newest_lsn() <= request.changed_above {
                cursor.page_position += 1; // the asker holds this page as it is
                continue;
            }
            let base = chain.versions.range(..=pin).next_back();
            if cursor.after_lsn == Lsn::ZERO
                && let Some((lsn, version)) = base
            {
                if bytes > 0 && bytes + version_item_bytes(version.image.len()) > budget {
                    next = Some(cursor);
                    break;
                }
                bytes += version_item_bytes(version.image.len());
                versions.push(VersionImage { page, lsn: *lsn, image: version.image.clone() });
                cursor.after_lsn = *lsn;
            }
            let above = cursor.after_lsn.max(base.map_or(Lsn::ZERO, |(lsn, _)| *lsn));
            for held in chain.records_between(above, through) {
                if bytes > 0 && (bytes + held.encoded.len() > budget || records.len() == RECORDS_PER_APPEND_MAX) {
                    next = Some(HydrateCursor { after_lsn: cursor.after_lsn.max(Lsn(1)), ..cursor });
                    break 'pages;
                }
                bytes += held.encoded.len();
                records
                    .push(held.decode().map_err(|message| ReadRefusal { code: ErrorCode::InvalidRequest, message })?);
                cursor.after_lsn = held.lsn;
            }
            cursor = HydrateCursor { page_position: cursor.page_position + 1, after_lsn: Lsn::ZERO };
        }
        Ok(HydrateBatch {
            request_id: request.request_id,
            pg: self.config.pg,
            epoch: self.epoch,
            transfer: transfer_id,
            complete_through: through,
            min_read_point: pin,
            versions,
            records,
            next,
        })
    }

    /// A batch of this segment's own hydration arrived: it is logged with
    /// the next write; once the last one is durable, the segment is
    /// complete through the peer's SCL, no longer needs repair, and serves
    /// no read below the peer's pinned read point.
    pub fn hydrate_received(&mut self, batch: HydrateBatch) -> Vec<Action> {
        if self.gossip.outstanding.is_none_or(|(request_id, _)| request_id != batch.request_id) {
            return Vec::new();
        }
        self.gossip.outstanding = None;
        let Some(hydration) = self.gossip.hydration.as_mut() else { return Vec::new() };
        if batch.epoch != self.epoch || (hydration.transfer != 0 && hydration.transfer != batch.transfer) {
            self.gossip.hydration = None;
            return Vec::new();
        }
        hydration.transfer = batch.transfer;
        hydration.retries = 0;
        hydration.complete_through = batch.complete_through;
        hydration.min_read_point = batch.min_read_point;
        match batch.next {
            Some(cursor) => hydration.cursor = cursor,
            None => hydration.paged_out = true,
        }
        let truncations = &self.truncations;
        let records: Vec<RedoRecord> = batch
            .records
            .into_iter()
            .filter(|record| !truncations.iter().any(|range| range.contains(record.lsn)))
            .collect();
        let versions: Vec<PageVersion> = batch
            .versions
            .into_iter()
            .filter(|version| version.image.len() == self.config.page_bytes)
            .map(|version| PageVersion { page: version.page, lsn: version.lsn, image: version.image })
            .collect();
        self.gossip.hydrated_bytes += records.iter().map(|record| record.encoded.len() as u64).sum::<u64>()
            + versions.iter().map(|version| version.image.len() as u64).sum::<u64>();
        self.hydration_pending.push_back((versions, records));
        self.start_write()
    }

    /// Every batch of a hydration is durable: the segment holds the peer's
    /// page state through `complete_through` (versions for what the peer
    /// collected, records above them), so its chain is complete there; it
    /// serves no read below the peer's pinned read point (the write that
    /// carried the last batch logged both in its checkpoint), and it no
    /// longer needs repair.
    fn finish_hydration(&mut self, complete_through: Lsn, min_read_point: Lsn) {
        // What was written since is asked of the same peer first: if its
        // records do not link up either, a delta repair from it follows.
        if let Some(hydration) = self.gossip.hydration.take() {
            self.gossip.next_peer = hydration.peer;
        }
        self.gossip.hydrations_completed += 1;
        self.needs_repair = false;
        self.min_read_point = self.min_read_point.max(min_read_point);
        if complete_through > self.segment_complete_lsn {
            self.segment_complete_lsn = complete_through;
            let parked: Vec<(Lsn, Lsn)> = self.parked_by_prev.drain().collect();
            self.parked_lsns.clear();
            for (prev, lsn) in parked.into_iter().filter(|(_, lsn)| *lsn > complete_through) {
                // Its predecessor is complete now if it lies at or below.
                self.park(prev.max(complete_through), lsn);
            }
            self.advance_segment_complete_lsn();
        }
        self.highest_durable_lsn = self.parked_lsns.iter().copied().fold(self.segment_complete_lsn, Lsn::max);
    }

    /// What this segment took from its peers so far.
    pub fn peer_repair_stats(&self) -> PeerRepairStats {
        PeerRepairStats {
            records_received: self.gossip.records_received,
            hydrations_completed: self.gossip.hydrations_completed,
            hydrated_bytes: self.gossip.hydrated_bytes,
        }
    }

    /// Starts a repair from the next peer now (a new replica must take its
    /// peers' whole page state, not only what records they still hold).
    pub fn gossip_hydrate_now(&mut self) {
        if self.gossip.hydration.is_none() {
            self.gossip.hydration = Some(Hydration::from_peer(self.gossip.next_peer));
        }
    }

    /// Whether a repair from a peer is in progress.
    pub fn is_hydrating(&self) -> bool {
        self.gossip.hydration.is_some()
    }

    /// Background work when the driver has nothing else to do: coalesce,
    /// clean, and log the results.
    pub fn background(&mut self) -> Vec<Action> {
        let before = self.transfers.len();
        self.transfers.retain(|_, transfer| {
            transfer.idle_rounds += 1;
            transfer.idle_rounds <= TRANSFER_IDLE_ROUNDS_MAX
        });
        if self.transfers.len() < before {
            self.collect_garbage(); // unpinned
        }
        self.start_write()
    }

    /// Moves the segment to the newer volume `epoch` (a recovering writer
    /// fences the one it replaces). The segment refuses the older epoch at
    /// once, also its records still queued (not durable: refused as
    /// stale), so the status it answers is final for the older epoch. The
    /// answer goes to `from` once a checkpoint carrying the new epoch is
    /// durable, so a restart keeps it. A repeat of the current epoch is
    /// answered at once if it is durable, else with the pending checkpoint;
    /// an older epoch is refused.
    pub fn seal(&mut self, request_id: u64, epoch: Epoch, from: ReplyTo) -> Vec<Action> {
        if let Some(refusal) = self.refuse_epoch_change(request_id, epoch, from) {
            return vec![refusal];
        }
        let mut actions = if epoch > self.epoch { self.enter_epoch(epoch) } else { Vec::new() };
        actions.extend(self.answer_once_durable(request_id, from));
        actions
    }

    /// Opens `epoch` for appends with its writer's truncation list (the
    /// last range is the writer's own), sealing the segment at `epoch`
    /// first if it is older. The list replaces the segment's: the records
    /// held inside its ranges are dropped now (SCL falls back below the
    /// first one it covered), and none is taken later. Answered once a
    /// checkpoint carrying the list is durable. A repeat with the same list
    /// is answered as a seal is; another list for an open epoch is refused
    /// (one writer per epoch).
    pub fn open_epoch(
        &mut self,
        request_id: u64,
        epoch: Epoch,
        truncations: Vec<Truncation>,
        from: ReplyTo,
    ) -> Vec<Action> {
        if let Some(refusal) = self.refuse_epoch_change(request_id, epoch, from) {
            return vec![refusal];
        }
        let invalid = |message: String| {
            let error = ErrorResponse { request_id, ..self.refusal(ErrorCode::InvalidRequest, message) };
            vec![Action::Refuse { to: from, error }]
        };
        if truncations.len() > TRUNCATIONS_MAX {
            return invalid(format!("{} truncation ranges; TRUNCATIONS_MAX is {TRUNCATIONS_MAX}", truncations.len()));
        }
        if truncations.last().is_none_or(|own| own.epoch != epoch) {
            return invalid(format!("the truncation list of {epoch} must end with that epoch's own range"));
        }
        if epoch == self.epoch && self.open_epoch == epoch {
            if truncations != self.truncations {
                return invalid(format!("{epoch} is already open with another truncation list"));
            }
            return self.answer_once_durable(request_id, from);
        }
        let mut actions = if epoch > self.epoch { self.enter_epoch(epoch) } else { Vec::new() };
        // Ranges the segment held before were applied then, and nothing
        // inside them was taken since: only the new ones can cover records.
        let adopted: Vec<Truncation> =
            truncations.iter().filter(|range| !self.truncations.contains(range)).copied().collect();
        self.open_epoch = epoch;
        self.truncations = truncations;
        self.void_truncated_records(&adopted);
        self.seal_due = true;
        actions.extend(self.answer_once_durable(request_id, from));
        actions
    }

    /// One step of a membership change of the segment's PG (see
    /// [`common::message::SetMembershipRequest`]): the segment takes
    /// `membership_epoch` (and `epoch`, sealing at it if it is newer) and
    /// answers once a checkpoint carrying both is durable. From then on it
    /// refuses appends of older memberships. An older membership epoch
    /// than the segment's is refused; a repeat is answered as a seal is.
    pub fn set_membership(
        &mut self,
        request_id: u64,
        epoch: Epoch,
        membership_epoch: MembershipEpoch,
        from: ReplyTo,
    ) -> Vec<Action> {
        if let Some(refusal) = self.refuse_epoch_change(request_id, epoch, from) {
            return vec![refusal];
        }
        if membership_epoch < self.membership_epoch {
            let message = format!("{membership_epoch} is older than the segment's {}", self.membership_epoch);
            let error = ErrorResponse { request_id, ..self.refusal(ErrorCode::StaleMembership, message) };
            return vec![Action::Refuse { to: from, error }];
        }
        let mut actions = if epoch > self.epoch { self.enter_epoch(epoch) } else { Vec::new() };
        if membership_epoch > self.membership_epoch {
            self.membership_epoch = membership_epoch;
            self.seal_due = true;
        }
        actions.extend(self.answer_once_durable(request_id, from));
        actions
    }

    pub fn membership_epoch(&self) -> MembershipEpoch {
        self.membership_epoch
    }

    /// The refusal of a seal or an open at `epoch`, if the segment cannot take it.
    fn refuse_epoch_change(&self, request_id: u64, epoch: Epoch, from: ReplyTo) -> Option<Action> {
        let refuse = |code: ErrorCode, message: String| Action::Refuse {
            to: from,
            error: ErrorResponse { request_id, ..self.refusal(code, message) },
        };
        if let Some(reason) = &self.failed {
            return Some(refuse(ErrorCode::DiskFailure, reason.clone()));
        }
        (epoch < self.epoch)
            .then(|| refuse(ErrorCode::StaleEpoch, format!("{epoch} is older than the segment's {}", self.epoch)))
    }

    /// Moves to the newer `epoch`: the older one's queued records (not
    /// durable) are refused as stale, so the state answered is final for
    /// the older epoch, and a checkpoint logs the new epoch.
    fn enter_epoch(&mut self, epoch: Epoch) -> Vec<Action> {
        let message = format!("the segment was sealed at {epoch}");
        let stale = self.refusal(ErrorCode::StaleEpoch, message);
        let actions = std::mem::take(&mut self.queued_waiters)
            .into_iter()
            .map(|to| Action::Refuse { to, error: stale.clone() })
            .collect();
        for record in self.queued.drain(..) {
            self.pending_lsns.remove(&record.lsn);
        }
        self.queued_bytes = 0;
        self.epoch = epoch;
        self.seal_due = true;
        actions
    }

    /// Answers `from` with the status once the epoch and truncation list are
    /// durable: at once if they are, else with the checkpoint that logs them.
    fn answer_once_durable(&mut self, request_id: u64, from: ReplyTo) -> Vec<Action> {
        if self.seal_due {
            self.seal_waiters.push((from, request_id));
            return self.start_write();
        }
        // A write in flight with seal waiters carries the checkpoint that logs
        // the current epoch and list.
        if let Some(write) = self.in_flight.as_mut().filter(|write| !write.sealed.is_empty()) {
            write.sealed.push((from, request_id));
            return Vec::new();
        }
        vec![Action::Status { to: from, status: self.status(request_id) }]
    }

    /// Drops every held record inside the newly adopted ranges. If SCL lay above
    /// one, it falls back to the chain predecessor of the lowest record
    /// dropped at or below it, and the records still held above that wait
    /// to link up again.
    fn void_truncated_records(&mut self, adopted: &[Truncation]) {
        let lowest = adopted.iter().map(|range| range.above).min().unwrap_or(Lsn::ZERO);
        let mut held: Vec<(Lsn, PageId)> =
            adopted.iter().flat_map(|range| self.records_in(range.above, range.through)).collect();
        held.sort_unstable();
        let mut fallback: Option<Lsn> = None;
        for (lsn, page) in held {
            if lsn <= self.segment_complete_lsn && fallback.is_none() {
                let record = self.pages.get(page).and_then(|chain| chain.record(lsn)).map(ChainRecord::decode);
                fallback = Some(match record {
                    Some(Ok(record)) => record.prev_segment_lsn,
                    _ => lowest.min(self.segment_complete_lsn),
                });
            }
            self.drop_record(page, lsn);
        }
        let truncations = &self.truncations;
        let voided = |lsn: &Lsn| truncations.iter().any(|range| range.contains(*lsn));
        self.parked_lsns.retain(|lsn| !voided(lsn));
        self.parked_by_prev.retain(|_, next| !voided(next));
        self.recent.retain(|(lsn, _)| !voided(lsn));
        if let Some(fallback) = fallback {
            let old = self.segment_complete_lsn;
            self.segment_complete_lsn = fallback;
            for (lsn, page) in self.records_in(fallback, old) {
                let prev = self.pages.get(page).and_then(|chain| chain.record(lsn)).map(ChainRecord::decode);
                if let Some(Ok(record)) = prev {
                    self.park(record.prev_segment_lsn.max(fallback), lsn);
                }
            }
            self.advance_segment_complete_lsn();
        }
        self.highest_durable_lsn = self.parked_lsns.iter().copied().fold(self.segment_complete_lsn, Lsn::max);
    }

    /// Removes one durable record from its page chain (voided by a truncation).
    fn drop_record(&mut self, page: PageId, lsn: Lsn) {
        if let Some(record) = self.pages.get_mut(page).and_then(|chain| chain.remove_record(lsn)) {
            self.record_count -= 1;
            Self::release(&mut self.file_live, record.file);
        }
    }

    /// The held durable records in `(above, through]`, ascending: from
    /// `recent` when it reaches that low, else from every log file's list.
    fn records_in(&self, above: Lsn, through: Lsn) -> Vec<(Lsn, PageId)> {
        self.first_records_in(above, through, usize::MAX)
    }

    /// The lowest `limit` of [`Self::records_in`]; below `recent` it costs
    /// one pass over the file lists and a sort of only `limit` entries, so
    /// a peer catching up in batches is not sorted the whole log each time.
    fn first_records_in(&self, above: Lsn, through: Lsn, limit: usize) -> Vec<(Lsn, PageId)> {
        let in_range = |lsn: Lsn| above < lsn && lsn <= through;
        let held = |entry: &&(Lsn, PageId)| self.pages.get(entry.1).is_some_and(|chain| chain.holds_record(entry.0));
        let mut found: Vec<(Lsn, PageId)> = if above >= self.recent_floor {
            let start = self.recent.partition_point(|(lsn, _)| *lsn <= above);
            self.recent
                .range(start..)
                .take_while(|(lsn, _)| *lsn <= through)
                .filter(held)
                .take(limit)
                .copied()
                .collect()
        } else {
            self.file_records.values().flatten().filter(|(lsn, _)| in_range(*lsn)).filter(held).copied().collect()
        };
        if found.len() > limit {
            found.select_nth_unstable(limit);
            found.truncate(limit);
        }
        found.sort_unstable();
        found.dedup();
        found
    }

    /// Garbage collection's bound: the minimum read point, held lower while
    /// a hydrate transfer served to a peer pins it.
    fn gc_point(&self) -> Lsn {
        self.transfers.values().map(|transfer| transfer.pin).fold(self.min_read_point, Lsn::min)
    }

    /// Drops `recent` entries at or below the writer's VDL.
    fn trim_recent(&mut self) {
        while self.recent.front().is_some_and(|(lsn, _)| *lsn <= self.coalesce_bound) {
            self.recent.pop_front();
        }
        self.recent_floor = self.coalesce_bound;
    }

    /// Records in `(above, through]` at or below SCL, for a recovering
    /// writer or a peer filling a hole; at most one frame's worth.
    pub fn fetch_records(&self, request: &FetchRecordsRequest) -> Result<RecordBatch, ReadRefusal> {
        if let Err((code, message)) = self.check_epoch(request.epoch) {
            return Err(ReadRefusal { code, message });
        }
        let through = request.through.min(self.segment_complete_lsn);
        let mut records = Vec::new();
        let mut bytes = 0;
        let mut more = false;
        for (lsn, page) in self.first_records_in(request.above, through, RECORDS_PER_APPEND_MAX + 1) {
            let Some(held) = self.pages.get(page).and_then(|chain| chain.record(lsn)) else { continue };
            if records.len() == RECORDS_PER_APPEND_MAX || bytes + held.encoded.len() > RECORD_BATCH_BYTES_MAX {
                more = true;
                break;
            }
            let record = held.decode().map_err(|message| ReadRefusal { code: ErrorCode::InvalidRequest, message })?;
            bytes += held.encoded.len();
            records.push(record);
        }
        Ok(RecordBatch {
            request_id: request.request_id,
            pg: self.config.pg,
            epoch: self.epoch,
            segment_complete_lsn: self.segment_complete_lsn,
            open_epoch: self.open_epoch,
            truncations: self.truncations.clone(),
            min_read_point: self.min_read_point,
            records,
            more,
        })
    }

    /// The write `id` is durable.
    pub fn write_done(&mut self, id: u64) -> Vec<Action> {
        let in_flight = self.in_flight.take().expect("write_done without a write in flight");
        assert_eq!(in_flight.id, id, "write completions arrive in order, one at a time");
        let previous_scl = self.segment_complete_lsn;
        for record in in_flight.redo {
            self.pending_lsns.remove(&record.lsn);
            let lsn = record.lsn;
            if lsn <= self.segment_complete_lsn || self.parked_lsns.contains(&lsn) || self.is_truncated(lsn) {
                // Already held, or voided while this write was in flight.
                continue;
            }
            let prev = record.prev_segment_lsn;
            let page = record.page;
            self.insert_durable_record(record, in_flight.file);
            self.note_recent(lsn, page);
            self.highest_durable_lsn = self.highest_durable_lsn.max(lsn);
            if prev == self.segment_complete_lsn {
                // In order, the common case: the chain continues at once.
                self.segment_complete_lsn = lsn;
            } else {
                self.park(prev, lsn);
            }
            self.consider_for_coalescing(page);
        }
        self.advance_segment_complete_lsn();
        assert!(self.segment_complete_lsn >= previous_scl, "SCL moved backwards");
        for version in in_flight.versions {
            self.insert_durable_version(version, in_flight.file);
        }
        let mut waiters = in_flight.waiters;
        if let Some((complete_through, min_read_point)) = in_flight.completes_hydration {
            self.finish_hydration(complete_through, min_read_point);
            waiters.extend(self.last_writer);
        }
        self.collect_garbage();
        let mut actions: Vec<Action> = waiters.into_iter().map(|to| Action::Ack { to, ack: self.ack() }).collect();
        actions.extend(in_flight.delete_after.into_iter().map(Action::DeleteFile));
        for (to, request_id) in in_flight.sealed {
            actions.push(Action::Status { to, status: self.status(request_id) });
        }
        actions.extend(self.start_write());
        actions
    }

    /// The write `id` failed: the segment stops accepting writes and refuses
    /// everyone who waited (their records are not durable here).
    pub fn write_failed(&mut self, id: u64, reason: String) -> Vec<Action> {
        let in_flight = self.in_flight.take().expect("write_failed without a write in flight");
        assert_eq!(in_flight.id, id);
        self.failed = Some(format!("log write failed: {reason}"));
        let mut waiters = in_flight.waiters;
        waiters.append(&mut self.queued_waiters);
        self.queued.clear();
        self.queued_bytes = 0;
        self.pending_lsns.clear();
        let seals = in_flight.sealed.into_iter().chain(std::mem::take(&mut self.seal_waiters));
        let seal_refusals: Vec<Action> = seals
            .map(|(to, request_id)| {
                let error = ErrorResponse { request_id, ..self.refusal(ErrorCode::DiskFailure, reason.clone()) };
                Action::Refuse { to, error }
            })
            .collect();
        waiters
            .into_iter()
            .map(|to| Action::Refuse { to, error: self.refusal(ErrorCode::DiskFailure, reason.clone()) })
            .chain(seal_refusals)
            .collect()
    }

    /// Remembers a new durable record above the writer's VDL in `recent`.
    fn note_recent(&mut self, lsn: Lsn, page: PageId) {
        if lsn <= self.recent_floor {
            return;
        }
        if self.recent.back().is_none_or(|(last, _)| *last < lsn) {
            self.recent.push_back((lsn, page)); // in order: the common case
        } else {
            let at = self.recent.partition_point(|(held, _)| *held < lsn);
            self.recent.insert(at, (lsn, page));
        }
    }

    fn insert_durable_record(&mut self, record: RedoRecord, file: u64) {
        let (lsn, page) = (record.lsn, record.page);
        let chain_record = ChainRecord { lsn, file, encoded: record.encoded };
        if !self.pages.get_or_default(page).insert_record(chain_record) {
            return;
        }
        self.record_count += 1;
        *self.file_live.entry(file).or_default() += 1;
        self.file_records.entry(file).or_default().push((lsn, page));
    }

    /// A durable record above SCL whose chain predecessor `prev` is not
    /// complete yet.
    fn park(&mut self, prev: Lsn, lsn: Lsn) {
        self.parked_by_prev.insert(prev, lsn);
        self.parked_lsns.insert(lsn);
    }

    /// Adds a durable version (or moves a copied-forward one to its new
    /// file), then lets garbage collection drop whatever it supersedes.
    fn insert_durable_version(&mut self, version: PageVersion, file: u64) {
        let page = version.page;
        let lsn = version.lsn;
        let chain = self.pages.get_or_default(page);
        if let Some(previous) = chain.versions.insert(lsn, StoredVersion { image: version.image, file }) {
            Self::release(&mut self.file_live, previous.file);
        }
        *self.file_live.entry(file).or_default() += 1;
        self.file_versions.entry(file).or_default().push((page, lsn));
        if lsn > self.gc_point() {
            self.gc_waiting.entry(lsn).or_default().push(page);
        }
        self.collect_page(page);
    }

    fn release(file_live: &mut BTreeMap<u64, usize>, file: u64) {
        let live = file_live.get_mut(&file).expect("released item belongs to a tracked file");
        *live -= 1;
    }

    fn advance_segment_complete_lsn(&mut self) {
        while let Some(next) = self.parked_by_prev.remove(&self.segment_complete_lsn) {
            self.parked_lsns.remove(&next);
            self.segment_complete_lsn = next;
        }
    }

    fn consider_for_coalescing(&mut self, page: PageId) {
        if !self.coalesce_queue.contains(&page)
            && let Some(chain) = self.pages.get(page)
            && chain.records_above_newest_version() >= self.config.coalesce_chain_records
        {
            self.coalesce_queue.insert(page);
        }
    }

    /// Builds `page` as of `read_point`: its newest version at or below the
    /// read point, plus every record of its chain up to the read point.
    pub fn read_page(&self, page: PageId, read_point: Lsn, epoch: Epoch) -> Result<(Lsn, Bytes), ReadRefusal> {
        if let Err((code, message)) = self.check_epoch(epoch) {
            return Err(ReadRefusal { code, message });
        }
        if self.open_epoch != self.epoch {
            // It may still hold records its writer's list voids.
            let message = format!("{} is not open yet", self.epoch);
            return Err(ReadRefusal { code: ErrorCode::NotOpen, message });
        }
        if read_point > self.segment_complete_lsn {
            return Err(ReadRefusal {
                code: ErrorCode::ReadPointAboveComplete,
                message: format!("read point {read_point} is above SCL {}", self.segment_complete_lsn),
            });
        }
        if read_point < self.min_read_point {
            return Err(ReadRefusal {
                code: ErrorCode::ReadPointBelowMinimum,
                message: format!("read point {read_point} is below the minimum read point {}", self.min_read_point),
            });
        }
        if page.0 / self.config.pages_per_pg != u64::from(self.config.pg.0) {
            return Err(ReadRefusal {
                code: ErrorCode::InvalidRequest,
                message: format!("{page} is not in {}", self.config.pg),
            });
        }
        self.materialize(page, read_point).map_err(|message| ReadRefusal { code: ErrorCode::InvalidRequest, message })
    }

    fn materialize(&self, page: PageId, read_point: Lsn) -> Result<(Lsn, Bytes), String> {
        let Some(chain) = self.pages.get(page) else {
            return Ok((Lsn::ZERO, Bytes::from(vec![0u8; self.config.page_bytes])));
        };
        let (base_lsn, mut image) = match chain.versions.range(..=read_point).next_back() {
            Some((lsn, version)) => (*lsn, version.image.to_vec()),
            None => (Lsn::ZERO, vec![0u8; self.config.page_bytes]),
        };
        let mut applied = base_lsn;
        let mut applier = ChainApplier::default();
        for held in chain.records_between(base_lsn, read_point) {
            let record = held.decode()?;
            if record.prev_page_lsn != applied {
                return Err(format!(
                    "page chain of {page} is broken at {}: it links to {}, the last record applied is {applied}",
                    record.lsn, record.prev_page_lsn
                ));
            }
            applier.apply(&record.op, &mut image).map_err(|error| error.to_string())?;
            applied = record.lsn;
        }
        Ok((applied, Bytes::from(image)))
    }

    /// Drops versions older than the newest one at or below PGMRPL, and the
    /// records such a version subsumes.
    fn collect_garbage(&mut self) {
        let reached: Vec<Lsn> = self.gc_waiting.range(..=self.gc_point()).map(|(lsn, _)| *lsn).collect();
        for lsn in reached {
            for page in self.gc_waiting.remove(&lsn).unwrap_or_default() {
                self.collect_page(page);
            }
        }
    }

    fn collect_page(&mut self, page: PageId) {
        let gc_point = self.gc_point();
        let Some(chain) = self.pages.get_mut(page) else { return };
        let Some(keep) = chain.versions.range(..=gc_point).next_back().map(|(lsn, _)| *lsn) else { return };
        let older: Vec<Lsn> = chain.versions.range(..keep).map(|(lsn, _)| *lsn).collect();
        for lsn in older {
            let version = chain.versions.remove(&lsn).expect("listed above");
            Self::release(&mut self.file_live, version.file);
        }
        let subsumed = chain.first_above(keep);
        for record in chain.records.drain(..subsumed) {
            self.record_count -= 1;
            Self::release(&mut self.file_live, record.file);
        }
    }

    /// Materializes queued pages into new versions, within the write budget.
    fn plan_coalescing(&mut self, budget: &mut usize) {
        let bound = self.segment_complete_lsn.min(self.coalesce_bound);
        let candidates: Vec<PageId> = self.coalesce_queue.iter().copied().collect();
        for page in candidates {
            let item = version_item_bytes(self.config.page_bytes);
            if *budget < item {
                break;
            }
            let Some(chain) = self.pages.get(page) else { continue };
            let newest = chain.newest_version_lsn();
            if newest >= bound {
                continue;
            }
            let Some(target) = chain.records_between(newest, bound).last().map(|record| record.lsn) else {
                continue;
            };
            self.coalesce_queue.remove(&page);
            if self.pending_versions.iter().any(|version| version.page == page) {
                continue;
            }
            let (lsn, image) = self.materialize(page, target).expect("a chain at or below SCL links up");
            self.pending_versions.push(PageVersion { page, lsn, image });
            *budget -= item;
        }
    }

    /// When the log spans too many files, empties the oldest one.
    fn plan_cleaning(&mut self, budget: &mut usize) {
        let Some((&oldest, &live)) = self.file_live.iter().next() else { return };
        if self.cursor.current_file() - oldest < self.config.log_files_target || self.checkpoint_due.contains(&oldest) {
            return;
        }
        if live == 0 {
            self.file_live.remove(&oldest);
            self.file_records.remove(&oldest);
            self.file_versions.remove(&oldest);
            self.checkpoint_due.push(oldest);
            self.cleaning = None;
            return;
        }
        if self.cleaning == Some(oldest) {
            // Records still waiting for their versions to pass PGMRPL, or versions in flight.
            self.requeue_live_versions(oldest, budget);
            return;
        }
        let logged =
            self.file_records.get(&oldest).map_or(0, Vec::len) + self.file_versions.get(&oldest).map_or(0, Vec::len);
        if live * CLEAN_LIVE_DENOMINATOR > logged * CLEAN_LIVE_NUMERATOR {
            // Mostly live: moving it forward would write about as much as it
            // frees (live data beyond the target's room takes more files).
            return;
        }
        self.cleaning = Some(oldest);
        for (lsn, page) in self.file_records.get(&oldest).cloned().unwrap_or_default() {
            if self.pages.get(page).is_some_and(|chain| chain.holds_record(lsn)) {
                self.coalesce_queue.insert(page);
            }
        }
        self.requeue_live_versions(oldest, budget);
    }

    fn requeue_live_versions(&mut self, file: u64, budget: &mut usize) {
        for (page, lsn) in self.file_versions.get(&file).cloned().unwrap_or_default() {
            let item = version_item_bytes(self.config.page_bytes);
            if *budget < item {
                return;
            }
            let Some(version) = self.pages.get(page).and_then(|chain| chain.versions.get(&lsn)) else { continue };
            if version.file != file || self.pending_versions.iter().any(|pending| pending.page == page) {
                continue;
            }
            self.pending_versions.push(PageVersion { page, lsn, image: version.image.clone() });
            *budget -= item;
        }
    }

    /// Starts the next log write if none is in flight and there is work.
    fn start_write(&mut self) -> Vec<Action> {
        if self.in_flight.is_some() || self.failed.is_some() {
            return Vec::new();
        }
        // Redo first: it is what clients wait for.
        let write_max = self.config.write_bytes_max();
        let mut room = write_max - self.checkpoint_bytes() - 2 * ENTRY_OVERHEAD_GUARD;
        let mut take = 0;
        for record in &self.queued {
            if record.encoded.len() > room {
                break;
            }
            room -= record.encoded.len();
            take += 1;
        }
        // Hydration batches next, as many whole ones as fit.
        let mut hydration: Option<(Vec<PageVersion>, Vec<RedoRecord>)> = None;
        while let Some((versions, records)) = self.hydration_pending.front() {
            let bytes = 2 * ENTRY_HEADER_BYTES
                + versions.iter().map(|version| version_item_bytes(version.image.len())).sum::<usize>()
                + records.iter().map(|record| record.encoded.len()).sum::<usize>();
            if bytes > room {
                break;
            }
            room -= bytes;
            let (versions, records) = self.hydration_pending.pop_front().expect("a front batch");
            let taken = hydration.get_or_insert_default();
            taken.0.extend(versions);
            taken.1.extend(records);
        }
        let completes_hydration = match (&hydration, &self.gossip.hydration) {
            (Some(_), Some(state)) if state.paged_out && self.hydration_pending.is_empty() => {
                Some((state.complete_through, state.min_read_point))
            }
            _ => None,
        };
        // Then background work, in what room is left.
        let mut budget = self.config.coalesce_bytes_per_write.min(room);
        self.plan_cleaning(&mut budget);
        self.plan_coalescing(&mut budget);
        // The write that completes a hydration logs the SCL it reaches with it.
        let checkpoint = !self.checkpoint_due.is_empty() || self.seal_due || completes_hydration.is_some();
        if take == 0 && self.pending_versions.is_empty() && !checkpoint && hydration.is_none() {
            return Vec::new();
        }
        let (hydration_versions, hydration_records) = hydration.unwrap_or_default();
        let mut versions = hydration_versions;
        versions.append(&mut self.pending_versions);
        let versions_bytes = if versions.is_empty() {
            0
        } else {
            ENTRY_HEADER_BYTES + versions.iter().map(|version| version_item_bytes(version.image.len())).sum::<usize>()
        };
        let checkpoint_bytes = if checkpoint { self.checkpoint_bytes() } else { 0 };
        let mut redo: Vec<RedoRecord> = self.queued.drain(..take).collect();
        self.queued_bytes -= redo.iter().map(|record| record.encoded.len()).sum::<usize>();
        redo.extend(hydration_records.into_iter().filter(|record| !self.pending_lsns.contains(&record.lsn)));
        let redo_bytes: usize = redo.iter().map(|record| record.encoded.len()).sum();
        let waiters =
            if self.queued.is_empty() { std::mem::take(&mut self.queued_waiters) } else { self.queued_waiters.clone() };

        let mut bytes = BytesMut::with_capacity(redo_entry_bytes(redo_bytes) + versions_bytes + checkpoint_bytes);
        if !redo.is_empty() {
            encode_redo_entry(&mut bytes, self.cursor.take_sequence(), redo.iter());
        }
        if !versions.is_empty() {
            encode_versions_entry(&mut bytes, self.cursor.take_sequence(), versions.iter());
        }
        let delete_after = std::mem::take(&mut self.checkpoint_due);
        self.seal_due = false;
        let sealed = std::mem::take(&mut self.seal_waiters);
        if checkpoint {
            let checkpoint = Checkpoint {
                pg: self.config.pg,
                page_bytes: self.config.page_bytes as u32,
                epoch: self.epoch,
                segment_complete_lsn: completes_hydration
                    .map_or(self.segment_complete_lsn, |(through, _)| through.max(self.segment_complete_lsn)),
                min_read_point: completes_hydration
                    .map_or(self.min_read_point, |(_, pin)| pin.max(self.min_read_point)),
                open_epoch: self.open_epoch,
                membership_epoch: self.membership_epoch,
                truncations: self.truncations.clone(),
            };
            encode_checkpoint_entry(&mut bytes, self.cursor.take_sequence(), &checkpoint);
        }
        let (id, position) = self.cursor.place(bytes.len());
        self.file_live.entry(position.file).or_default();
        self.in_flight = Some(InFlight {
            id,
            file: position.file,
            redo,
            versions,
            waiters,
            delete_after: delete_after.into_iter().filter(|file| *file != 0).collect(),
            sealed,
            completes_hydration,
        });
        vec![Action::Write(LogWrite { id, position, bytes: bytes.freeze() })]
    }
}

#[cfg(test)]
#[path = "segment_tests.rs"]
mod tests;
