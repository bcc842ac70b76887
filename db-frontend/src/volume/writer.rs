//! The volume writer as a pure state machine: everything the log owner
//! decides, with no I/O and no clock (time comes in as microseconds).
//!
//! - **LSN allocation** (A17 §4.1): LSNs are handed out in order, never above
//!   `VDL + allocation limit`; [`WriterCore::allocate`] refuses past it and
//!   the driver waits for VDL to move.
//! - **Backlinks**: every record links to the previous record of the volume,
//!   of its PG (the segment chain) and of its page.
//! - **Shipping**: new records of a PG are encoded once and sent as one
//!   append frame, shared by all six segments. Records stay *retained* until
//!   every segment's SCL covers them, so a segment that missed a frame (drop,
//!   full queue, restart) gets them again from its SCL on, without help.
//! - **Quorum**: acknowledgements feed the [`QuorumTracker`]; commit waiters
//!   complete when VDL reaches their LSN.
//! - **Reads**: a page read goes to a segment whose acknowledged SCL is at
//!   or above the read point (no quorum read), preferring the fastest; the
//!   minimum read point (MRPL) that lets segments garbage-collect is the
//!   lowest active read point, or VDL when none is active.
//! - **PG-local points**: a segment only sees its own PG's records, so its
//!   SCL stops at the PG's last record even when VDL is far above it. Read
//!   points and MRPL are therefore sent to a PG as the highest LSN *of that
//!   PG* at or below them, which selects the same page versions. The writer
//!   keeps each PG's allocated LSNs from its MRPL up to compute this.

use bytes::{Bytes, BytesMut};
use common::ids::{Epoch, IdHashMap, Lsn, MembershipEpoch, NodeId, PageId, PgId, ReplicaIndex};
use common::limits::{
    FRAME_PAYLOAD_BYTES_MAX, LSN_ALLOCATION_LIMIT_MAX, RECORD_BODY_BYTES_MAX, RECORDS_PER_APPEND_MAX,
    WRITER_RETAINED_BYTES_MAX,
};
use common::message::{
    APPEND_HEADER_BYTES, AppendHeader, OpenEpochRequest, SegmentStatus, SetMembershipRequest, Truncation,
    encode_append_frame,
};
use common::redo::{PageOp, RecordFields};
use std::collections::{BTreeMap, HashMap, VecDeque};

use super::geometry::{JOINING_SLOT, SEGMENT_SLOTS, SegmentPlacement, VolumeGeometry};
use super::quorum::QuorumTracker;
use super::recovery::RecoveredLog;

/// Bytes of records packed into one append frame at most. Smaller than the
/// frame limit so that one frame never monopolizes a connection.
pub const APPEND_FRAME_BYTES_TARGET: usize = 1024 * 1024;

/// A segment that has not acknowledged anything new for this long, while
/// records it was sent are outstanding, is sent them again.
pub const RETRANSMIT_AFTER_MICROS: u64 = 200_000;

/// Weight of a new sample in a node's read-latency average (1/8, as TCP's SRTT).
const LATENCY_EWMA_SHIFT: u32 = 3;

/// One page change of a mini-transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageChange {
    pub page: PageId,
    pub op: PageOp,
}

/// Why a mini-transaction was not accepted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AllocationError {
    #[error("a mini-transaction needs at least one change")]
    Empty,
    #[error("{page} is outside the volume ({pages} pages)")]
    PageOutOfRange { page: PageId, pages: u64 },
    #[error("change to {page} writes up to byte {end} of a {page_bytes}-byte page")]
    OutsidePage { page: PageId, end: usize, page_bytes: usize },
    #[error("change to {page} has a {bytes}-byte body; RECORD_BODY_BYTES_MAX is {RECORD_BODY_BYTES_MAX}")]
    RecordTooLarge { page: PageId, bytes: usize },
    #[error("a mini-transaction of {records} records exceeds the LSN allocation limit of {limit}")]
    LargerThanLimit { records: u64, limit: u64 },
    #[error(
        "a newer writer sealed the volume: this writer's epoch {epoch} is over (commits not yet acknowledged may or may not be durable)"
    )]
    Fenced { epoch: Epoch },
    /// Retry once VDL moves (the driver waits for it).
    #[error("LSN allocation limit reached: VDL {durable} + limit {limit}")]
    LimitReached { durable: Lsn, limit: u64 },
    /// After a recovery, the writer does not know the last LSN of a page
    /// it has not written (its page backlink): the driver reads the page
    /// once ([`WriterCore::learn_page_lsn`]) and retries. Redo is applied
    /// lazily, so this costs one read per page, never a replay.
    #[error("the last LSN of {page} is not known yet (read it first)")]
    PageLsnUnknown { page: PageId },
}

/// The writer's view of one segment.
#[derive(Clone, Copy, Debug, Default)]
struct SegmentLink {
    connected: bool,
    /// Highest SCL this segment acknowledged.
    complete: Lsn,
    /// Highest LSN sent to it on the current connection.
    sent_up_to: Lsn,
    /// When records beyond `complete` were first outstanding without progress.
    waiting_since: Option<u64>,
    /// Records it still needed were dropped from retention: it needs repair.
    fell_behind: bool,
}

#[derive(Debug, Default)]
struct PgLog {
    /// Encoded records not yet sent, in LSN order.
    unsent: Vec<(Lsn, Bytes)>,
    /// Sent records not yet acknowledged by all six segments, in LSN order.
    retained: VecDeque<(Lsn, Bytes)>,
    last_lsn: Lsn,
    /// This PG's allocated LSNs, ascending; the front is the highest one at
    /// or below MRPL (trimmed as MRPL moves), so any point >= MRPL maps to
    /// the PG's last LSN at or below it.
    history: VecDeque<Lsn>,
    /// `retained` holds every record of this PG above this LSN: a segment
    /// complete below it cannot be brought up to date by the writer.
    retained_floor: Lsn,
    /// By slot (see [`VolumeGeometry::slots`]).
    links: [SegmentLink; SEGMENT_SLOTS],
    /// Slots whose status showed the PG's current membership epoch.
    membership_taken: [bool; SEGMENT_SLOTS],
    /// During a change: PGCL when it began. Every record at or below it
    /// may be on only 4 of the old six, so the joining segment must hold
    /// them all before the PG settles on the new six.
    joint_catch_up_target: Lsn,
}

impl PgLog {
    /// The highest LSN of this PG at or below `point` (0 if none).
    fn local_point(&self, point: Lsn) -> Lsn {
        let after = self.history.partition_point(|lsn| *lsn <= point);
        if after == 0 { Lsn::ZERO } else { self.history[after - 1] }
    }

    fn trim_history(&mut self, min_read_point: Lsn) {
        while self.history.len() >= 2 && self.history[1] <= min_read_point {
            self.history.pop_front();
        }
    }
}

/// A frame to send to a node.
#[derive(Clone, Debug)]
pub struct Outgoing {
    pub node: NodeId,
    pub frame: Bytes,
}

/// The points on the log, as the writer knows them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogPoints {
    pub highest_allocated: Lsn,
    pub volume_complete: Lsn,
    pub volume_durable: Lsn,
    pub min_read_point: Lsn,
}

/// What one segment looks like from the writer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentView {
    pub pg: PgId,
    pub replica: ReplicaIndex,
    pub node: NodeId,
    pub connected: bool,
    pub complete: Lsn,
    pub fell_behind: bool,
}

/// What an acknowledgement made durable.
#[derive(Debug)]
pub struct Durable<W> {
    /// Commit waiters whose LSN VDL has now reached.
    pub waiters: Vec<W>,
    /// VDL moved: allocations blocked on the LSN allocation limit may retry.
    pub volume_durable_advanced: bool,
}

impl<W> Durable<W> {
    fn nothing() -> Self {
        Durable { waiters: Vec::new(), volume_durable_advanced: false }
    }
}

impl<W> IntoIterator for Durable<W> {
    type Item = W;
    type IntoIter = std::vec::IntoIter<W>;
    fn into_iter(self) -> Self::IntoIter {
        self.waiters.into_iter()
    }
}

/// What a segment's status means to the writer.
#[derive(Debug)]
pub enum StatusOutcome<W> {
    /// The segment is at a newer epoch: a newer writer recovered the
    /// volume, and this one is fenced. Holds the commit waiters it still
    /// had when this fenced it (their commits may or may not be durable).
    Fenced(Vec<W>),
    /// The segment is sealed at an older epoch or not opened yet: send it
    /// this request; its answer is a status again.
    Open(OpenEpochRequest),
    /// The segment has not taken the PG's current membership (or is being
    /// placed by it): send it this request; its answer is a status again.
    SetMembership(SetMembershipRequest),
    /// The segment is open at this writer's epoch and counts as connected;
    /// this became durable.
    Connected(Durable<W>),
}

/// The log owner. `W` is whatever the driver uses to wake a commit waiter.
#[derive(Debug)]
pub struct WriterCore<W> {
    geometry: VolumeGeometry,
    epoch: Epoch,
    allocation_limit: u64,
    tracker: QuorumTracker,
    pgs: Vec<PgLog>,
    page_last_lsn: IdHashMap<PageId, Lsn>,
    encode_buffer: BytesMut,
    retained_bytes: usize,
    /// Bytes of records allocated and not yet handed to [`Self::flush`].
    unsent_bytes: usize,
    /// The highest LSN [`Self::flush`] has handed out for sending.
    highest_sent: Lsn,
    commit_waiters: BTreeMap<Lsn, Vec<W>>,
    /// Active read points and how many readers hold each.
    read_points: BTreeMap<Lsn, usize>,
    /// Mean read latency per node, in microseconds (unknown = 0, tried first).
    read_latency: HashMap<NodeId, u64>,
    next_read_choice: usize,
    /// A segment showed a newer epoch: another writer sealed the volume.
    fenced: bool,
    /// The truncation list segments are opened with; the last range is
    /// this epoch's own, and no LSN is allocated at or below its end.
    truncations: Vec<Truncation>,
    /// `page_last_lsn` knows every page ever written (a fresh volume); after
    /// a recovery only the pages of the recovered tail and those written
    /// or read since.
    pages_complete: bool,
}

impl<W> WriterCore<W> {
    /// A writer for a volume whose log is empty (nothing to recover): its
    /// truncation list is one empty range.
    pub fn new(geometry: VolumeGeometry, epoch: Epoch, allocation_limit: u64) -> Self {
        assert!(allocation_limit > 0, "the LSN allocation limit must be positive");
        assert!(
            allocation_limit <= LSN_ALLOCATION_LIMIT_MAX,
            "the LSN allocation limit is at most LSN_ALLOCATION_LIMIT_MAX"
        );
        let pgs = (0..geometry.pg_count()).map(|_| PgLog::default()).collect();
        WriterCore {
            truncations: vec![Truncation { epoch, above: Lsn::ZERO, through: Lsn::ZERO }],
            pages_complete: true,
            tracker: QuorumTracker::new(geometry.pg_count(), Lsn::ZERO),
            geometry,
            epoch,
            allocation_limit,
            pgs,
            page_last_lsn: IdHashMap::default(),
            encode_buffer: BytesMut::new(),
            retained_bytes: 0,
            unsent_bytes: 0,
            highest_sent: Lsn::ZERO,
            commit_waiters: BTreeMap::new(),
            read_points: BTreeMap::new(),
            read_latency: HashMap::new(),
            next_read_choice: 0,
            fenced: false,
        }
    }

    /// The writer that continues a recovered volume (see
    /// [`super::recovery`]): the recovered tail is allocated and retained,
    /// so every segment that lacks it gets it again, and it becomes
    /// durable as any record does, at 4 of 6. New LSNs start above the
    /// epoch's truncation range.
    pub fn recovered(geometry: VolumeGeometry, allocation_limit: u64, log: RecoveredLog) -> Self {
        let mut writer = WriterCore::new(geometry, log.epoch, allocation_limit);
        writer.tracker = QuorumTracker::new(writer.geometry.pg_count(), log.start);
        for (pg_log, last) in writer.pgs.iter_mut().zip(&log.pg_last_at_start) {
            pg_log.last_lsn = *last;
            pg_log.history.push_back(*last);
            pg_log.retained_floor = *last;
        }
        for record in log.records {
            let pg_log = &mut writer.pgs[record.pg.0 as usize];
            pg_log.last_lsn = record.lsn;
            pg_log.history.push_back(record.lsn);
            writer.retained_bytes += record.encoded.len();
            pg_log.retained.push_back((record.lsn, record.encoded));
            writer.tracker.record_allocated(record.lsn, record.pg, record.consistency_point);
            writer.page_last_lsn.insert(record.page, record.lsn);
        }
        writer.pages_complete = log.start == Lsn::ZERO;
        writer.truncations = log.truncations;
        writer
    }

    /// The truncation list this writer opens segments with.
    pub fn truncations(&self) -> &[Truncation] {
        &self.truncations
    }

    /// The request that opens this writer's epoch on a segment of `pg`.
    pub fn open_request(&self, request_id: u64, pg: PgId) -> OpenEpochRequest {
        OpenEpochRequest { request_id, pg, epoch: self.epoch, truncations: self.truncations.clone() }
    }

    fn own_truncation(&self) -> Truncation {
        *self.truncations.last().expect("a writer has its own truncation range")
    }

    /// A page's last LSN as read from storage, for a page this writer has
    /// not written (after a recovery). Ignored if already known.
    pub fn learn_page_lsn(&mut self, page: PageId, lsn: Lsn) {
        self.page_last_lsn.entry(page).or_insert(lsn);
    }

    pub fn geometry(&self) -> &VolumeGeometry {
        &self.geometry
    }

    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// A segment answered with `epoch` (an acknowledgement, a status) or
    /// refused this writer's epoch as stale (`None`: newer, not said which).
    /// A newer epoch means another writer sealed the volume: this one
    /// allocates nothing more, and the commit waiters it still had are
    /// handed back to be failed (their records may or may not be durable:
    /// the new writer's recovery decides). Returns them when this fences
    /// the writer (`None` otherwise).
    pub fn observe_epoch(&mut self, epoch: Option<Epoch>) -> Option<Vec<W>> {
        if self.fenced || epoch.is_some_and(|epoch| epoch <= self.epoch) {
            return None;
        }
        self.fenced = true;
        Some(std::mem::take(&mut self.commit_waiters).into_values().flatten().collect())
    }

    /// Hands back every commit waiter (the client is closing: they fail).
    pub fn take_commit_waiters(&mut self) -> Vec<W> {
        std::mem::take(&mut self.commit_waiters).into_values().flatten().collect()
    }

    pub fn is_fenced(&self) -> bool {
        self.fenced
    }

    /// Whether records already sent are still on their way to durability
    /// (deferred records not yet sent do not count).
    pub fn sent_in_flight(&self) -> bool {
        self.highest_sent > self.tracker.volume_durable_lsn()
    }

    /// Whether every allocated LSN is durable (nothing is in flight).
    pub fn all_durable(&self) -> bool {
        self.tracker.highest_allocated() == self.tracker.volume_durable_lsn()
    }

    pub fn points(&self) -> LogPoints {
        LogPoints {
            highest_allocated: self.tracker.highest_allocated(),
            volume_complete: self.tracker.volume_complete_lsn(),
            volume_durable: self.tracker.volume_durable_lsn(),
            min_read_point: self.min_read_point(),
        }
    }

    pub fn pg_complete_lsn(&self, pg: PgId) -> Lsn {
        self.tracker.pg_complete_lsn(pg)
    }

    /// Bytes of records kept for retransmission.
    pub fn retained_bytes(&self) -> usize {
        self.retained_bytes
    }

    /// Bytes of records allocated but not yet sent ([`Self::flush`] sends
    /// them).
    pub fn unsent_bytes(&self) -> usize {
        self.unsent_bytes
    }

    /// Every segment as the writer sees it.
    pub fn segments(&self) -> Vec<SegmentView> {
        let mut views = Vec::new();
        for (pg, log) in self.pgs.iter().enumerate() {
            let pg = PgId(pg as u32);
            for replica in self.geometry.slots(pg) {
                let link = &log.links[replica.0 as usize];
                views.push(SegmentView {
                    pg,
                    replica,
                    node: self.geometry.segment(pg, replica).node,
                    connected: link.connected,
                    complete: link.complete,
                    fell_behind: link.fell_behind,
                });
            }
        }
        views
    }

    /// Allocates LSNs for a mini-transaction, links and encodes its records,
    /// and queues them for sending. The last record is the consistency point;
    /// its LSN is returned (commit when VDL reaches it).
    pub fn allocate(&mut self, changes: &[PageChange]) -> Result<Lsn, AllocationError> {
        if self.fenced {
            return Err(AllocationError::Fenced { epoch: self.epoch });
        }
        if changes.is_empty() {
            return Err(AllocationError::Empty);
        }
        let mut pgs = Vec::with_capacity(changes.len());
        for change in changes {
            pgs.push(self.validate(change)?);
        }
        let records = changes.len() as u64;
        if records > self.allocation_limit {
            return Err(AllocationError::LargerThanLimit { records, limit: self.allocation_limit });
        }
        if !self.pages_complete
            && let Some(change) = changes.iter().find(|change| !self.page_last_lsn.contains_key(&change.page))
        {
            return Err(AllocationError::PageLsnUnknown { page: change.page });
        }
        let durable = self.tracker.volume_durable_lsn();
        let own = self.own_truncation();
        let first = self.tracker.highest_allocated().next().max(own.through.next());
        let last = first.0 + records - 1;
        // LSNs in flight above VDL; the truncated range between holds none.
        let skipped = if durable <= own.above { own.through.0 - own.above.0 } else { 0 };
        if last - durable.0 - skipped > self.allocation_limit {
            return Err(AllocationError::LimitReached { durable, limit: self.allocation_limit });
        }
        for (index, (change, pg)) in changes.iter().zip(pgs).enumerate() {
            let lsn = Lsn(first.0 + index as u64);
            let consistency_point = index + 1 == changes.len();
            let log = &mut self.pgs[pg.0 as usize];
            let fields = RecordFields {
                lsn,
                prev_volume_lsn: self.tracker.highest_allocated(),
                prev_segment_lsn: log.last_lsn,
                prev_page_lsn: self.page_last_lsn.insert(change.page, lsn).unwrap_or(Lsn::ZERO),
                page: change.page,
                pg,
                consistency_point,
                op: change.op.clone(),
            };
            fields.encode_into(&mut self.encode_buffer);
            let encoded = self.encode_buffer.split().freeze();
            log.last_lsn = lsn;
            log.history.push_back(lsn);
            self.unsent_bytes += encoded.len();
            log.unsent.push((lsn, encoded));
            self.tracker.record_allocated(lsn, pg, consistency_point);
        }
        Ok(Lsn(last))
    }

    fn validate(&self, change: &PageChange) -> Result<PgId, AllocationError> {
        let page = change.page;
        let pg = self
            .geometry
            .pg_of(page)
            .ok_or(AllocationError::PageOutOfRange { page, pages: self.geometry.page_count() })?;
        let end = change.op.extent_end();
        if end > self.geometry.page_bytes {
            return Err(AllocationError::OutsidePage { page, end, page_bytes: self.geometry.page_bytes });
        }
        if change.op.body_len() > RECORD_BODY_BYTES_MAX {
            return Err(AllocationError::RecordTooLarge { page, bytes: change.op.body_len() });
        }
        Ok(pg)
    }

    /// Registers a commit waiter. Returns it back if `lsn` is already durable.
    /// A fenced writer drops it (its commit cannot be known durable).
    pub fn wait_durable(&mut self, lsn: Lsn, waiter: W) -> Option<W> {
        if lsn <= self.tracker.volume_durable_lsn() {
            return Some(waiter);
        }
        if self.fenced {
            return None;
        }
        self.commit_waiters.entry(lsn).or_default().push(waiter);
        None
    }

    /// Whether any PG has records waiting to be sent, or a segment waits
    /// for a retransmission.
    pub fn has_work(&self) -> bool {
        self.pgs.iter().any(|log| {
            !log.unsent.is_empty()
                || log
                    .links
                    .iter()
                    .any(|link| link.connected && log.retained.back().is_some_and(|(last, _)| link.sent_up_to < *last))
        })
    }

    /// Moves unsent records to retention and returns the frames that bring
    /// every connected segment up to date. Segments in step share one frame.
    pub fn flush(&mut self, now_micros: u64) -> Vec<Outgoing> {
        if self.fenced {
            return Vec::new(); // the segments refuse this epoch now
        }
        let durable = self.tracker.volume_durable_lsn();
        let min_read_point = self.min_read_point();
        let mut outgoing = Vec::new();
        for pg_index in 0..self.pgs.len() {
            let pg = PgId(pg_index as u32);
            let membership_epoch = self.geometry.membership(pg).epoch;
            let log = &mut self.pgs[pg_index];
            for (lsn, encoded) in log.unsent.drain(..) {
                self.highest_sent = self.highest_sent.max(lsn);
                self.unsent_bytes -= encoded.len();
                self.retained_bytes += encoded.len();
                log.retained.push_back((lsn, encoded));
            }
            let Some(&(last, _)) = log.retained.back() else { continue };
            log.trim_history(min_read_point);
            let pg_min_read_point = log.local_point(min_read_point);
            let mut frames_from: HashMap<Lsn, Vec<Bytes>> = HashMap::new();
            for (replica, link) in log.links.iter_mut().enumerate() {
                if !link.connected || link.sent_up_to >= last {
                    continue;
                }
                let frames = frames_from.entry(link.sent_up_to).or_insert_with(|| {
                    let start = log.retained.partition_point(|(lsn, _)| *lsn <= link.sent_up_to);
                    let header = AppendHeader {
                        pg,
                        epoch: self.epoch,
                        volume_durable_lsn: durable,
                        min_read_point: pg_min_read_point,
                        membership_epoch,
                    };
                    append_frames(header, log.retained.range(start..))
                });
                let node = self.geometry.segment(pg, ReplicaIndex(replica as u8)).node;
                outgoing.extend(frames.iter().map(|frame| Outgoing { node, frame: frame.clone() }));
                link.sent_up_to = last;
                link.waiting_since.get_or_insert(now_micros);
            }
        }
        outgoing
    }

    /// A segment acknowledged: its SCL is `complete`. Returns the commit
    /// waiters that are now durable.
    ///
    /// Acknowledgements can arrive out of order (a reordering network, or
    /// answers to duplicated appends), so a lower SCL than one already seen
    /// is stale news and changes nothing. Only a fresh connection's status
    /// may lower a segment's SCL (see [`Self::segment_connected`]).
    pub fn acknowledged(&mut self, pg: PgId, replica: ReplicaIndex, complete: Lsn, now_micros: u64) -> Durable<W> {
        let Some(log) = self.pgs.get_mut(pg.0 as usize) else { return Durable::nothing() };
        let retained_floor = log.retained_floor;
        let link = &mut log.links[replica.0 as usize];
        if complete > link.complete {
            link.complete = complete;
            // Caught up from its peers: the writer can feed it again.
            link.fell_behind &= complete < retained_floor;
            link.waiting_since = (link.sent_up_to > complete).then_some(now_micros);
        } else if link.sent_up_to <= link.complete {
            link.waiting_since = None;
        }
        self.record_segment_complete(pg, replica)
    }

    /// Feeds the segment's SCL as the writer knows it to the quorum tracker,
    /// trims retention, and returns what became durable.
    fn record_segment_complete(&mut self, pg: PgId, replica: ReplicaIndex) -> Durable<W> {
        let slots = self.geometry.slots(pg);
        let log = &mut self.pgs[pg.0 as usize];
        let complete = log.links[replica.0 as usize].complete;
        let lowest = slots.iter().map(|slot| log.links[slot.0 as usize].complete).min().expect("six slots");
        while log.retained.front().is_some_and(|(lsn, _)| *lsn <= lowest) {
            let (lsn, encoded) = log.retained.pop_front().expect("checked");
            self.retained_bytes -= encoded.len();
            log.retained_floor = lsn;
        }
        let progress = self.tracker.segment_acknowledged(pg, replica, complete);
        if progress.pg_complete_advanced {
            self.enforce_retention_limit();
        }
        if !progress.volume_durable_advanced {
            return Durable::nothing();
        }
        let still_waiting = self.commit_waiters.split_off(&progress.volume_durable.next());
        let done = std::mem::replace(&mut self.commit_waiters, still_waiting);
        Durable { waiters: done.into_values().flatten().collect(), volume_durable_advanced: true }
    }

    /// Drops the oldest retained records past `WRITER_RETAINED_BYTES_MAX`.
    /// Only a segment far behind a write quorum can still need them; it is
    /// marked as needing repair from its peers.
    fn enforce_retention_limit(&mut self) {
        while self.retained_bytes > WRITER_RETAINED_BYTES_MAX {
            let Some(pg_index) = (0..self.pgs.len())
                .filter(|index| {
                    let log = &self.pgs[*index];
                    log.retained
                        .front()
                        .is_some_and(|(lsn, _)| *lsn <= self.tracker.pg_complete_lsn(PgId(*index as u32)))
                })
                .max_by_key(|index| self.pgs[*index].retained.len())
            else {
                return;
            };
            let log = &mut self.pgs[pg_index];
            let (lsn, encoded) = log.retained.pop_front().expect("filtered on a front record");
            self.retained_bytes -= encoded.len();
            log.retained_floor = lsn;
            for link in log.links.iter_mut().filter(|link| link.complete < lsn) {
                if !link.fell_behind {
                    tracing::warn!(pg = pg_index, %lsn, "segment fell behind the writer's retention; it needs repair");
                }
                link.fell_behind = true;
            }
        }
    }

    /// A connection to a segment opened and its status says SCL `complete`:
    /// everything above it is sent again on the next flush.
    ///
    /// A segment that lost acknowledged records (corruption found on
    /// restart) reports a lower SCL than before; the writer believes the
    /// report and resends from there. If retention no longer holds the
    /// records it lost, it is marked as needing repair from its peers.
    ///
    /// A status answer on a connection that already answered one (a
    /// duplicated or retried request) is only an acknowledgement.
    pub fn segment_connected(&mut self, pg: PgId, replica: ReplicaIndex, complete: Lsn, now_micros: u64) -> Durable<W> {
        let Some(log) = self.pgs.get_mut(pg.0 as usize) else { return Durable::nothing() };
        let retained_floor = log.retained_floor;
        let link = &mut log.links[replica.0 as usize];
        if link.connected {
            return self.acknowledged(pg, replica, complete, now_micros);
        }
        if complete < link.complete {
            tracing::warn!(%pg, replica = replica.0, before = %link.complete, now = %complete, "segment came back with a lower SCL");
        }
        // Whether the retained records reach down to what it holds.
        link.fell_behind = complete < retained_floor;
        link.complete = complete;
        link.connected = true;
        link.sent_up_to = link.complete;
        link.waiting_since = None;
        self.record_segment_complete(pg, replica)
    }

    /// A segment answered a status request (or a seal, or an open). The
    /// writer only counts a segment that is open at its own epoch;
    /// `open_request_id` names the open it sends otherwise.
    pub fn status_received(
        &mut self,
        replica: ReplicaIndex,
        status: &SegmentStatus,
        open_request_id: u64,
        now_micros: u64,
    ) -> StatusOutcome<W> {
        if status.epoch > self.epoch || self.fenced {
            return StatusOutcome::Fenced(self.observe_epoch(Some(status.epoch)).unwrap_or_default());
        }
        if let Some(log) = self.pgs.get_mut(status.pg.0 as usize) {
            let current = self.geometry.memberships[status.pg.0 as usize].epoch;
            log.membership_taken[replica.0 as usize] = status.membership_epoch >= current;
            if status.membership_epoch < current {
                return StatusOutcome::SetMembership(self.membership_request(open_request_id, status.pg, replica));
            }
        }
        if status.epoch < self.epoch || !status.is_open() {
            return StatusOutcome::Open(self.open_request(open_request_id, status.pg));
        }
        StatusOutcome::Connected(self.segment_connected(status.pg, replica, status.segment_complete_lsn, now_micros))
    }

    /// Whether the segment answered a status request on its current connection.
    pub fn is_connected(&self, pg: PgId, replica: ReplicaIndex) -> bool {
        self.pgs.get(pg.0 as usize).is_some_and(|log| log.links[replica.0 as usize].connected)
    }

    /// The connection to a segment closed.
    pub fn segment_disconnected(&mut self, pg: PgId, replica: ReplicaIndex) {
        if let Some(log) = self.pgs.get_mut(pg.0 as usize) {
            let link = &mut log.links[replica.0 as usize];
            link.connected = false;
            link.waiting_since = None;
        }
    }

    /// A frame for this segment could not be sent or was refused as busy:
    /// resend from its SCL on the next flush.
    pub fn resend_from_complete(&mut self, pg: PgId, replica: ReplicaIndex) {
        if let Some(log) = self.pgs.get_mut(pg.0 as usize) {
            let link = &mut log.links[replica.0 as usize];
            link.sent_up_to = link.complete;
            link.waiting_since = None;
        }
    }

    /// Segments that made no progress for `RETRANSMIT_AFTER_MICROS` are
    /// resent everything above their SCL. Returns whether a flush is due.
    pub fn tick(&mut self, now_micros: u64) -> bool {
        if self.fenced {
            return false;
        }
        for log in &mut self.pgs {
            for link in &mut log.links {
                if link.waiting_since.is_some_and(|since| now_micros.saturating_sub(since) >= RETRANSMIT_AFTER_MICROS) {
                    tracing::debug!(complete = %link.complete, sent_up_to = %link.sent_up_to, "segment silent: resending");
                    link.sent_up_to = link.complete;
                    link.waiting_since = None;
                }
            }
        }
        self.has_work()
    }

    /// The request that gives the segment in `slot` of `pg` the PG's
    /// current membership (and places it, if its node has none yet).
    pub fn membership_request(&self, request_id: u64, pg: PgId, slot: ReplicaIndex) -> SetMembershipRequest {
        let node = self.geometry.segment(pg, slot).node;
        let mut peers = self.geometry.peer_addresses(pg, node);
        if slot == JOINING_SLOT
            && let Some(replacement) = &self.geometry.membership(pg).replacing
        {
            // The joining segment repairs itself from the members that stay.
            let replaced = &self.geometry.segment(pg, replacement.replica).address;
            peers.retain(|address| address != replaced);
        }
        SetMembershipRequest {
            request_id,
            pg,
            epoch: self.epoch,
            membership_epoch: self.geometry.membership(pg).epoch,
            page_bytes: self.geometry.page_bytes as u32,
            pages_per_pg: self.geometry.pages_per_pg(),
            peers,
        }
    }

    /// First step of a membership change (A18 §4.1): the segment at
    /// `replica` of `pg` is to be replaced by one on `incoming`. From now on
    /// a record of the PG is complete once 4 of the old six and 4 of the
    /// new six hold it, and the joining segment is sent every record. The
    /// driver sends [`Self::membership_request`] to every slot that has not
    /// taken the new epoch ([`Self::membership_laggards`]).
    pub fn begin_replacement(
        &mut self,
        pg: PgId,
        replica: ReplicaIndex,
        incoming: SegmentPlacement,
    ) -> Result<MembershipEpoch, String> {
        let epoch = self.geometry.begin_replacement(pg, replica, incoming)?;
        self.tracker.begin_joint(pg, replica);
        let log = &mut self.pgs[pg.0 as usize];
        log.links[JOINING_SLOT.0 as usize] = SegmentLink::default();
        log.membership_taken = [false; SEGMENT_SLOTS];
        log.joint_catch_up_target = self.tracker.pg_complete_lsn(pg);
        Ok(epoch)
    }

    /// Whether the joint step of `pg`'s change may settle: its epoch is on
    /// a write quorum of both member sets, and the joining segment is
    /// complete through every record that was durable when it began (so
    /// every durable record is on 4 of the new six).
    pub fn replacement_may_settle(&self, pg: PgId) -> bool {
        let log = &self.pgs[pg.0 as usize];
        let joining = &log.links[JOINING_SLOT.0 as usize];
        self.geometry.membership(pg).replacing.is_some()
            && self.membership_durable(pg)
            && !joining.fell_behind
            && joining.complete >= log.joint_catch_up_target
    }

    /// The joining segment's SCL and the SCL it must reach to settle.
    pub fn joining_progress(&self, pg: PgId) -> Option<(Lsn, Lsn)> {
        self.geometry.membership(pg).replacing.as_ref()?;
        let log = &self.pgs[pg.0 as usize];
        Some((log.links[JOINING_SLOT.0 as usize].complete, log.joint_catch_up_target))
    }

    /// Second step: the PG settles on the new six (the joining segment
    /// takes the replaced one's replica, with its link), or rolls back to
    /// the old six. The new epoch goes to the members as the first did.
    pub fn end_replacement(&mut self, pg: PgId, settle: bool) -> Result<MembershipEpoch, String> {
        let replica = self.geometry.membership(pg).replacing.as_ref().map(|replacement| replacement.replica);
        let epoch = self.geometry.end_replacement(pg, settle)?;
        let replica = replica.expect("a change was in progress");
        self.tracker.end_joint(pg, settle);
        let log = &mut self.pgs[pg.0 as usize];
        let joining = std::mem::take(&mut log.links[JOINING_SLOT.0 as usize]);
        if settle {
            log.links[replica.0 as usize] = joining;
        }
        log.membership_taken = [false; SEGMENT_SLOTS];
        log.joint_catch_up_target = Lsn::ZERO;
        Ok(epoch)
    }

    /// Whether the PG's current membership epoch is on a write quorum of
    /// every member set.
    pub fn membership_durable(&self, pg: PgId) -> bool {
        let taken = &self.pgs[pg.0 as usize].membership_taken;
        self.geometry.is_write_quorum(pg, |slot| taken[slot.0 as usize])
    }

    /// The slots of `pg` not known to hold its current membership epoch.
    pub fn membership_laggards(&self, pg: PgId) -> Vec<ReplicaIndex> {
        let taken = &self.pgs[pg.0 as usize].membership_taken;
        self.geometry.slots(pg).into_iter().filter(|slot| !taken[slot.0 as usize]).collect()
    }

    /// Starts a read at the current VDL; hold it until [`Self::end_read`].
    pub fn begin_read(&mut self) -> Lsn {
        let point = self.tracker.volume_durable_lsn();
        *self.read_points.entry(point).or_default() += 1;
        point
    }

    /// Holds `point` (at or above MRPL) as a read point, as [`Self::begin_read`]
    /// holds VDL: a read replica's point, which garbage collection must
    /// respect. Released with [`Self::end_read`].
    pub fn hold_read_point(&mut self, point: Lsn) -> Result<(), Lsn> {
        let floor = self.min_read_point();
        if point < floor {
            return Err(floor);
        }
        *self.read_points.entry(point).or_default() += 1;
        Ok(())
    }

    pub fn end_read(&mut self, point: Lsn) {
        if let Some(count) = self.read_points.get_mut(&point) {
            *count -= 1;
            if *count == 0 {
                self.read_points.remove(&point);
            }
        }
    }

    /// The minimum read point: no reader will ask for a page older than this.
    pub fn min_read_point(&self) -> Lsn {
        self.read_points.keys().next().copied().unwrap_or(self.tracker.volume_durable_lsn())
    }

    /// The read point to send to `pg` for a volume read point (which must
    /// be at or above MRPL): the PG's last LSN at or below it.
    pub fn pg_read_point(&self, pg: PgId, read_point: Lsn) -> Lsn {
        self.pgs.get(pg.0 as usize).map_or(Lsn::ZERO, |log| log.local_point(read_point))
    }

    /// Segments of `pg` known complete at `pg_read_point` (see
    /// [`Self::pg_read_point`]), best first: connected ones with the lowest
    /// mean read latency, rotating among equals.
    pub fn read_targets(&mut self, pg: PgId, pg_read_point: Lsn) -> Vec<(ReplicaIndex, NodeId)> {
        let Some(log) = self.pgs.get(pg.0 as usize) else { return Vec::new() };
        let mut targets: Vec<(u64, usize, ReplicaIndex, NodeId)> = log
            .links
            .iter()
            .enumerate()
            .filter(|(_, link)| link.connected && !link.fell_behind && link.complete >= pg_read_point)
            .map(|(replica, _)| {
                let node = self.geometry.segment(pg, ReplicaIndex(replica as u8)).node;
                let latency = self.read_latency.get(&node).copied().unwrap_or(0);
                let rotation = (replica + self.next_read_choice) % SEGMENT_SLOTS;
                (latency, rotation, ReplicaIndex(replica as u8), node)
            })
            .collect();
        targets.sort_unstable();
        self.next_read_choice = self.next_read_choice.wrapping_add(1);
        targets.into_iter().map(|(_, _, replica, node)| (replica, node)).collect()
    }

    /// A read from `node` took `micros`.
    pub fn read_latency_sample(&mut self, node: NodeId, micros: u64) {
        let mean = self.read_latency.entry(node).or_insert(micros);
        *mean = *mean - (*mean >> LATENCY_EWMA_SHIFT) + (micros >> LATENCY_EWMA_SHIFT);
    }

    /// The mean read latency of the best node, for the hedging delay.
    pub fn fastest_read_latency(&self) -> Option<u64> {
        self.read_latency.values().min().copied()
    }
}

/// Packs records into append frames of at most `APPEND_FRAME_BYTES_TARGET`
/// bytes and `RECORDS_PER_APPEND_MAX` records.
fn append_frames<'a>(header: AppendHeader, records: impl Iterator<Item = &'a (Lsn, Bytes)>) -> Vec<Bytes> {
    const _: () =
        assert!(APPEND_FRAME_BYTES_TARGET + APPEND_HEADER_BYTES + RECORD_BODY_BYTES_MAX < FRAME_PAYLOAD_BYTES_MAX);
    let mut frames = Vec::new();
    let mut batch: Vec<&[u8]> = Vec::new();
    let mut batch_bytes = 0;
    let mut seal = |batch: &mut Vec<&[u8]>| {
        frames.push(encode_append_frame(header, batch.iter().copied()));
        batch.clear();
    };
    for (_, encoded) in records {
        if !batch.is_empty()
            && (batch.len() == RECORDS_PER_APPEND_MAX || batch_bytes + encoded.len() > APPEND_FRAME_BYTES_TARGET)
        {
            seal(&mut batch);
            batch_bytes = 0;
        }
        batch_bytes += encoded.len();
        batch.push(encoded);
    }
    if !batch.is_empty() {
        seal(&mut batch);
    }
    frames
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::geometry::{ClusterConfig, NodeSpec};
    use common::frame::decode_frame;
    use common::ids::AzId;
    use common::message::Message;

    fn geometry(pg_count: u32) -> VolumeGeometry {
        let nodes = (0..6)
            .map(|id| NodeSpec { id: NodeId(id), az: AzId((id / 2) as u8), address: format!("node-{id}") })
            .collect();
        VolumeGeometry::place(&ClusterConfig { nodes }, pg_count, 64 * 1024, 4096).expect("valid geometry")
    }

    fn write(page: u64, byte: u8) -> PageChange {
        PageChange { page: PageId(page), op: PageOp::Write { offset: 0, data: Bytes::from(vec![byte; 8]) } }
    }

    fn decode_append(frame: &Bytes) -> common::message::AppendRequest {
        let mut buffer = BytesMut::from(&frame[..]);
        let frame = decode_frame(&mut buffer).expect("valid").expect("complete");
        match Message::decode(&frame).expect("valid message") {
            Message::Append(append) => append,
            other => panic!("expected an append, got {other:?}"),
        }
    }

    fn connect_all<W>(writer: &mut WriterCore<W>, pg: u32) {
        for replica in 0..6 {
            writer.segment_connected(PgId(pg), ReplicaIndex(replica), Lsn::ZERO, 0);
        }
    }

    #[test]
    fn records_carry_volume_segment_and_page_backlinks() {
        let mut writer: WriterCore<u32> = WriterCore::new(geometry(2), Epoch::INITIAL, 100);
        connect_all(&mut writer, 0);
        connect_all(&mut writer, 1);
        // Pages 0 and 1 are in PG 0, page 16 in PG 1 (16 pages per PG).
        assert_eq!(writer.allocate(&[write(0, 1), write(16, 2)]), Ok(Lsn(2)));
        assert_eq!(writer.allocate(&[write(0, 3)]), Ok(Lsn(3)));
        assert_eq!(writer.allocate(&[write(1, 4), write(16, 5)]), Ok(Lsn(5)));
        let frames = writer.flush(0);
        assert_eq!(frames.len(), 12, "one frame per segment of each PG");
        let pg0 = decode_append(&frames.iter().find(|out| out.node == NodeId(0)).expect("node 0").frame);
        let links: Vec<_> = pg0
            .records
            .iter()
            .map(|r| (r.lsn.0, r.prev_volume_lsn.0, r.prev_segment_lsn.0, r.prev_page_lsn.0, r.consistency_point))
            .collect();
        assert_eq!(links, vec![(1, 0, 0, 0, false), (3, 2, 1, 1, true), (4, 3, 3, 0, false)]);
        let pg1 = decode_append(&frames.iter().find(|out| out.frame != frames[0].frame).expect("pg 1").frame);
        let links: Vec<_> = pg1.records.iter().map(|r| (r.lsn.0, r.prev_segment_lsn.0, r.prev_page_lsn.0)).collect();
        assert_eq!(links, vec![(2, 0, 0), (5, 2, 2)]);
    }

    #[test]
    fn unsent_records_are_counted_until_flushed_and_in_flight_until_durable() {
        let mut writer: WriterCore<u32> = WriterCore::new(geometry(1), Epoch::INITIAL, 100);
        connect_all(&mut writer, 0);
        writer.allocate(&[write(0, 1), write(1, 2)]).expect("room");
        let unsent = writer.unsent_bytes();
        assert!(unsent > 0, "allocated records wait unsent");
        assert!(!writer.sent_in_flight(), "nothing was sent yet");
        writer.allocate(&[write(2, 3)]).expect("room");
        assert!(writer.unsent_bytes() > unsent);
        let frames = writer.flush(0);
        assert_eq!(frames.len(), 6);
        assert_eq!(writer.unsent_bytes(), 0, "flush takes every unsent record");
        assert!(writer.sent_in_flight());
        for replica in 0..4 {
            writer.acknowledged(PgId(0), ReplicaIndex(replica), Lsn(3), 10);
        }
        assert!(!writer.sent_in_flight(), "VDL reached everything sent");
        writer.allocate(&[write(0, 4)]).expect("room");
        assert!(!writer.sent_in_flight(), "a record allocated but unsent is not in flight");
    }

    #[test]
    fn commit_waiters_complete_only_when_vdl_reaches_them() {
        let mut writer: WriterCore<&str> = WriterCore::new(geometry(1), Epoch::INITIAL, 100);
        connect_all(&mut writer, 0);
        let first = writer.allocate(&[write(0, 1)]).expect("room");
        let second = writer.allocate(&[write(1, 1), write(2, 2)]).expect("room");
        assert_eq!(writer.wait_durable(first, "first"), None);
        assert_eq!(writer.wait_durable(second, "second"), None);
        writer.flush(0);
        let mut woken = Vec::new();
        for replica in 0..3 {
            woken.extend(writer.acknowledged(PgId(0), ReplicaIndex(replica), Lsn(2), 10));
        }
        assert!(woken.is_empty(), "3 of 6 is not a write quorum");
        woken.extend(writer.acknowledged(PgId(0), ReplicaIndex(3), Lsn(2), 10));
        // SCL 2 covers LSN 1 (a CPL) and half of the second mini-transaction.
        assert_eq!(woken, vec!["first"]);
        assert_eq!(writer.points().volume_durable, Lsn(1));
        for replica in 0..4 {
            woken.extend(writer.acknowledged(PgId(0), ReplicaIndex(replica), Lsn(3), 20));
        }
        assert_eq!(woken, vec!["first", "second"]);
        assert_eq!(writer.wait_durable(second, "late"), Some("late"), "already durable");
    }

    #[test]
    fn a_newer_epoch_fences_the_writer_and_hands_back_its_waiters() {
        let mut writer: WriterCore<&str> = WriterCore::new(geometry(1), Epoch(2), 100);
        connect_all(&mut writer, 0);
        let lsn = writer.allocate(&[write(0, 1)]).expect("room");
        assert_eq!(writer.wait_durable(lsn, "waiting"), None);
        assert_eq!(writer.observe_epoch(Some(Epoch(2))), None, "its own epoch");
        assert_eq!(writer.observe_epoch(Some(Epoch(1))), None, "an older one");
        assert!(!writer.is_fenced());
        assert_eq!(writer.observe_epoch(Some(Epoch(3))), Some(vec!["waiting"]));
        assert!(writer.is_fenced());
        assert_eq!(writer.observe_epoch(None), None, "fenced once");
        assert_eq!(writer.allocate(&[write(0, 2)]), Err(AllocationError::Fenced { epoch: Epoch(2) }));
        assert_eq!(writer.wait_durable(Lsn(5), "late"), None, "dropped: it can never be known durable");
        assert!(writer.flush(0).is_empty() && !writer.tick(1_000_000), "nothing more is sent");
    }

    #[test]
    fn allocation_stops_at_vdl_plus_limit() {
        let mut writer: WriterCore<u32> = WriterCore::new(geometry(1), Epoch::INITIAL, 3);
        connect_all(&mut writer, 0);
        writer.allocate(&[write(0, 1), write(0, 2)]).expect("LSN 2 <= 0 + 3");
        assert_eq!(
            writer.allocate(&[write(0, 3), write(0, 4)]),
            Err(AllocationError::LimitReached { durable: Lsn::ZERO, limit: 3 })
        );
        assert_eq!(
            writer.allocate(&vec![write(0, 1); 4]),
            Err(AllocationError::LargerThanLimit { records: 4, limit: 3 })
        );
        writer.allocate(&[write(0, 3)]).expect("LSN 3 fits");
        writer.flush(0);
        for replica in 0..4 {
            writer.acknowledged(PgId(0), ReplicaIndex(replica), Lsn(2), 1);
        }
        assert_eq!(writer.allocate(&[write(0, 4), write(0, 5)]), Ok(Lsn(5)), "VDL 2 + 3");
    }

    #[test]
    fn bad_changes_are_refused_before_allocation() {
        let mut writer: WriterCore<u32> = WriterCore::new(geometry(1), Epoch::INITIAL, 100);
        assert_eq!(writer.allocate(&[]), Err(AllocationError::Empty));
        assert_eq!(
            writer.allocate(&[write(16, 0)]),
            Err(AllocationError::PageOutOfRange { page: PageId(16), pages: 16 })
        );
        let past_end =
            PageChange { page: PageId(0), op: PageOp::Write { offset: 4090, data: Bytes::from_static(&[0; 8]) } };
        assert_eq!(
            writer.allocate(&[write(0, 1), past_end]),
            Err(AllocationError::OutsidePage { page: PageId(0), end: 4098, page_bytes: 4096 })
        );
        assert_eq!(writer.points().highest_allocated, Lsn::ZERO, "nothing allocated for a refused change");
    }

    #[test]
    fn a_lagging_segment_gets_records_again_from_its_scl() {
        let mut writer: WriterCore<u32> = WriterCore::new(geometry(1), Epoch::INITIAL, 100);
        connect_all(&mut writer, 0);
        writer.allocate(&[write(0, 1)]).expect("room");
        writer.allocate(&[write(0, 2)]).expect("room");
        writer.flush(0);
        for replica in 0..5 {
            writer.acknowledged(PgId(0), ReplicaIndex(replica), Lsn(2), 100);
        }
        // Replica 5 restarted having kept only LSN 1.
        writer.segment_disconnected(PgId(0), ReplicaIndex(5));
        writer.allocate(&[write(0, 3)]).expect("room");
        let frames = writer.flush(200);
        assert_eq!(frames.len(), 5, "a disconnected segment is skipped");
        writer.segment_connected(PgId(0), ReplicaIndex(5), Lsn(1), 300);
        let frames = writer.flush(300);
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].node, writer.geometry().segment(PgId(0), ReplicaIndex(5)).node);
        let lsns: Vec<u64> = decode_append(&frames[0].frame).records.iter().map(|r| r.lsn.0).collect();
        assert_eq!(lsns, vec![2, 3]);
        assert!(writer.retained_bytes() > 0);
        for replica in 0..6 {
            writer.acknowledged(PgId(0), ReplicaIndex(replica), Lsn(3), 400);
        }
        assert_eq!(writer.retained_bytes(), 0, "retention ends once all six segments hold a record");
    }

    #[test]
    fn a_segment_back_with_a_lower_scl_is_believed_and_flagged_when_retention_is_gone() {
        let mut writer: WriterCore<u32> = WriterCore::new(geometry(1), Epoch::INITIAL, 100);
        connect_all(&mut writer, 0);
        for byte in 1..=3 {
            writer.allocate(&[write(0, byte)]).expect("room");
        }
        writer.flush(0);
        for replica in 0..6 {
            writer.acknowledged(PgId(0), ReplicaIndex(replica), Lsn(3), 1);
        }
        assert_eq!(writer.retained_bytes(), 0);
        // Replica 2 restarts having lost LSNs 2-3 to corruption.
        writer.segment_disconnected(PgId(0), ReplicaIndex(2));
        writer.segment_connected(PgId(0), ReplicaIndex(2), Lsn(1), 2);
        let view = &writer.segments()[2];
        assert_eq!(view.complete, Lsn(1));
        assert!(view.fell_behind, "records 2-3 are no longer retained: repair must come from peers");
        assert!(writer.read_targets(PgId(0), Lsn(1)).iter().all(|(replica, _)| replica.0 != 2));
        assert_eq!(writer.pg_complete_lsn(PgId(0)), Lsn(3), "PGCL never goes back");
    }

    /// The lossy-network test once hung here: acknowledgements 2 then a
    /// reordered, stale 1 from four segments left the tracker believing the
    /// stale SCLs, with nothing outstanding to bring another ack. A stale
    /// ack, and a duplicated status answer, must change nothing.
    #[test]
    fn stale_acknowledgements_and_repeated_status_do_not_lower_a_segment() {
        let mut writer: WriterCore<&str> = WriterCore::new(geometry(1), Epoch::INITIAL, 100);
        connect_all(&mut writer, 0);
        let first = writer.allocate(&[write(0, 1)]).expect("room");
        let second = writer.allocate(&[write(0, 2)]).expect("room");
        assert_eq!(writer.wait_durable(second, "second"), None);
        writer.flush(0);
        let mut woken = Vec::new();
        for replica in 0..3 {
            woken.extend(writer.acknowledged(PgId(0), ReplicaIndex(replica), second, 10));
            woken.extend(writer.acknowledged(PgId(0), ReplicaIndex(replica), first, 11));
        }
        woken.extend(writer.segment_connected(PgId(0), ReplicaIndex(3), second, 12));
        woken.extend(writer.segment_connected(PgId(0), ReplicaIndex(3), Lsn::ZERO, 13));
        assert_eq!(woken, vec!["second"], "four segments hold LSN 2");
        assert_eq!(writer.points().volume_durable, second);
        assert!(writer.segments()[..4].iter().all(|view| view.complete == second && !view.fell_behind));
    }

    #[test]
    fn silence_past_the_retransmit_delay_resends() {
        let mut writer: WriterCore<u32> = WriterCore::new(geometry(1), Epoch::INITIAL, 100);
        connect_all(&mut writer, 0);
        writer.allocate(&[write(0, 1)]).expect("room");
        assert_eq!(writer.flush(0).len(), 6);
        for replica in 0..5 {
            writer.acknowledged(PgId(0), ReplicaIndex(replica), Lsn(1), 10);
        }
        assert!(!writer.tick(RETRANSMIT_AFTER_MICROS - 1));
        assert!(writer.tick(RETRANSMIT_AFTER_MICROS));
        let frames = writer.flush(RETRANSMIT_AFTER_MICROS);
        assert_eq!(frames.len(), 1, "only the silent segment");
    }

    #[test]
    fn reads_go_to_complete_segments_fastest_first_and_hold_the_mrpl() {
        let mut writer: WriterCore<u32> = WriterCore::new(geometry(1), Epoch::INITIAL, 100);
        connect_all(&mut writer, 0);
        writer.allocate(&[write(0, 1)]).expect("room");
        writer.flush(0);
        for replica in [0, 2, 3, 5] {
            writer.acknowledged(PgId(0), ReplicaIndex(replica), Lsn(1), 10);
        }
        let point = writer.begin_read();
        assert_eq!(point, Lsn(1));
        let geometry = writer.geometry().clone();
        let node = |replica: u8| geometry.segment(PgId(0), ReplicaIndex(replica)).node;
        let (slow, fast) = (node(2), node(5));
        for replica in [0, 2, 3] {
            writer.read_latency_sample(node(replica), 5_000);
        }
        writer.read_latency_sample(fast, 100);
        let targets: Vec<u8> = writer.read_targets(PgId(0), point).iter().map(|(replica, _)| replica.0).collect();
        assert_eq!(targets.len(), 4, "only segments whose SCL covers the read point");
        assert_eq!(targets[0], 5, "fastest first");
        assert!(!targets.contains(&1) && !targets.contains(&4));
        assert_ne!(slow, fast);
        writer.allocate(&[write(0, 2)]).expect("room");
        writer.flush(20);
        for replica in 0..4 {
            writer.acknowledged(PgId(0), ReplicaIndex(replica), Lsn(2), 30);
        }
        assert_eq!(writer.points().min_read_point, Lsn(1), "an active read holds MRPL back");
        writer.end_read(point);
        assert_eq!(writer.points().min_read_point, Lsn(2));
    }

    #[test]
    fn reads_and_mrpl_use_the_pgs_own_last_lsn() {
        let mut writer: WriterCore<u32> = WriterCore::new(geometry(2), Epoch::INITIAL, 100);
        connect_all(&mut writer, 0);
        connect_all(&mut writer, 1);
        writer.allocate(&[write(16, 1)]).expect("room"); // LSN 1 in PG 1
        writer.allocate(&[write(0, 1), write(1, 1)]).expect("room"); // LSNs 2-3 in PG 0
        writer.flush(0);
        for replica in 0..6 {
            writer.acknowledged(PgId(1), ReplicaIndex(replica), Lsn(1), 1);
            writer.acknowledged(PgId(0), ReplicaIndex(replica), Lsn(3), 1);
        }
        let point = writer.begin_read();
        assert_eq!(point, Lsn(3));
        assert_eq!(writer.pg_read_point(PgId(1), point), Lsn(1), "PG 1 has nothing above LSN 1");
        assert_eq!(writer.read_targets(PgId(1), Lsn(1)).len(), 6, "SCL 1 is complete for PG 1 at volume point 3");
        assert_eq!(writer.pg_read_point(PgId(0), point), Lsn(3));
        writer.end_read(point);
        writer.allocate(&[write(0, 2)]).expect("room"); // LSN 4 in PG 0
        writer.allocate(&[write(17, 2)]).expect("room"); // LSN 5 in PG 1
        let frames = writer.flush(2);
        let to_pg1 = frames.iter().map(|out| decode_append(&out.frame)).find(|append| append.pg == PgId(1)).unwrap();
        assert_eq!(to_pg1.min_read_point, Lsn(1), "MRPL 3 is LSN 1 in PG 1's own terms");
    }

    /// Two segments that acknowledge 20 ms late still get each record once:
    /// slowness that keeps making progress is not silence.
    #[test]
    fn slow_but_progressing_segments_are_not_sent_records_twice() {
        let mut writer: WriterCore<u32> = WriterCore::new(geometry(1), Epoch::INITIAL, 1_000_000);
        connect_all(&mut writer, 0);
        let mut records_sent = 0;
        let lag = 200; // commits, at one per 100 µs: 20 ms
        for step in 1..=3_000u64 {
            let now = step * 100;
            writer.allocate(&[write(step % 16, 1)]).expect("room");
            records_sent += writer.flush(now).iter().map(|out| decode_append(&out.frame).records.len()).sum::<usize>();
            for replica in 0..4 {
                writer.acknowledged(PgId(0), ReplicaIndex(replica), Lsn(step), now);
            }
            if step > lag {
                for replica in 4..6 {
                    writer.acknowledged(PgId(0), ReplicaIndex(replica), Lsn(step - lag), now);
                }
            }
            writer.tick(now);
        }
        assert_eq!(records_sent, 6 * 3_000);
    }

    #[test]
    fn large_batches_split_into_bounded_frames() {
        let mut writer: WriterCore<u32> = WriterCore::new(geometry(1), Epoch::INITIAL, 1_000_000);
        connect_all(&mut writer, 0);
        let big = PageChange { page: PageId(0), op: PageOp::Write { offset: 0, data: Bytes::from(vec![7; 4000]) } };
        for _ in 0..600 {
            writer.allocate(std::slice::from_ref(&big)).expect("room");
        }
        let frames = writer.flush(0);
        let per_segment: Vec<&Outgoing> = frames.iter().filter(|out| out.node == NodeId(0)).collect();
        assert!(per_segment.len() >= 3, "600 x 4 KB does not fit one 1 MiB frame");
        let lsns: Vec<u64> =
            per_segment.iter().flat_map(|out| decode_append(&out.frame).records).map(|r| r.lsn.0).collect();
        assert_eq!(lsns, (1..=600).collect::<Vec<u64>>());
        assert!(per_segment.iter().all(|out| out.frame.len() <= APPEND_FRAME_BYTES_TARGET + 64 * 1024));
    }

    fn status(pg: PgId, complete: Lsn, membership_epoch: MembershipEpoch) -> SegmentStatus {
        SegmentStatus {
            request_id: 0,
            pg,
            epoch: Epoch::INITIAL,
            segment_complete_lsn: complete,
            highest_durable_lsn: complete,
            min_read_point: Lsn::ZERO,
            needs_repair: false,
            open_epoch: Epoch::INITIAL,
            volume_durable_hint: Lsn::ZERO,
            membership_epoch,
        }
    }

    /// The two-step change from the writer's side: the joint step needs its
    /// epoch on 4 of both sets and the joining segment caught up before it
    /// may settle; every record meanwhile goes to the joining segment too,
    /// and after settling the joining segment's link serves the replica.
    #[test]
    fn a_replacement_settles_only_once_joint_epoch_is_durable_and_the_newcomer_caught_up() {
        let pg = PgId(0);
        let replaced = ReplicaIndex(5);
        let mut writer: WriterCore<&str> = WriterCore::new(geometry(1), Epoch::INITIAL, 100);
        connect_all(&mut writer, 0);
        writer.allocate(&[write(0, 1)]).expect("room");
        writer.allocate(&[write(1, 2)]).expect("room");
        writer.flush(0);
        for replica in 0..6 {
            writer.acknowledged(pg, ReplicaIndex(replica), Lsn(2), 10);
        }
        let az = writer.geometry().segment(pg, replaced).az;
        let incoming = SegmentPlacement { node: NodeId(99), az, address: "node-99".into() };
        let joint = writer.begin_replacement(pg, replaced, incoming).expect("a valid change");
        assert_eq!(writer.membership_laggards(pg).len(), SEGMENT_SLOTS, "nobody holds the joint epoch yet");
        assert!(!writer.replacement_may_settle(pg));
        assert_eq!(writer.joining_progress(pg), Some((Lsn::ZERO, Lsn(2))), "it must catch up to PGCL 2");

        let request = writer.membership_request(1, pg, JOINING_SLOT);
        assert_eq!(request.membership_epoch, joint);
        assert_eq!(request.peers.len(), 5, "the joining segment repairs from the five that stay");
        assert!(!request.peers.contains(&writer.geometry().segment(pg, replaced).address));

        // A member that reports the old membership is sent the new one.
        let outcome = writer.status_received(ReplicaIndex(0), &status(pg, Lsn(2), MembershipEpoch::INITIAL), 7, 20);
        assert!(matches!(outcome, StatusOutcome::SetMembership(request) if request.membership_epoch == joint));
        for replica in [0, 1, 2, 5] {
            writer.status_received(ReplicaIndex(replica), &status(pg, Lsn(2), joint), 7, 20);
        }
        assert!(!writer.membership_durable(pg), "4 of the old six but 3 of the new six");
        writer.status_received(JOINING_SLOT, &status(pg, Lsn::ZERO, joint), 7, 20);
        assert!(writer.membership_durable(pg));
        assert!(!writer.replacement_may_settle(pg), "the newcomer holds nothing yet");

        // New records go to all seven; PGCL needs 4 of both sets.
        writer.allocate(&[write(2, 3)]).expect("room");
        let frames = writer.flush(30);
        assert!(frames.iter().any(|out| out.node == NodeId(99)), "the joining segment is sent the record");
        for replica in 0..4 {
            writer.acknowledged(pg, ReplicaIndex(replica), Lsn(3), 40);
        }
        assert_eq!(writer.pg_complete_lsn(pg), Lsn(3), "slots 0..=3 are 4 of both sets");
        assert_eq!(writer.membership_request(2, pg, JOINING_SLOT).membership_epoch, joint);

        writer.acknowledged(pg, JOINING_SLOT, Lsn(1), 50);
        assert!(!writer.replacement_may_settle(pg), "below its catch-up target");
        writer.acknowledged(pg, JOINING_SLOT, Lsn(3), 60);
        assert!(writer.replacement_may_settle(pg));

        let settled = writer.end_replacement(pg, true).expect("in progress");
        assert_eq!(settled, joint.next());
        assert_eq!(writer.geometry().segment(pg, replaced).node, NodeId(99));
        assert!(writer.is_connected(pg, replaced), "the joining link now serves the replica");
        assert_eq!(writer.membership_laggards(pg).len(), SEGMENT_SLOTS - 1);
        assert!(writer.joining_progress(pg).is_none());
        assert!(writer.end_replacement(pg, true).is_err(), "nothing left to settle");
    }
}
