//! Crash recovery of the writer, as a pure state machine (A17 §4.3, A18 §2.3).
//!
//! A writer that starts on a volume, fresh or after a crash, first
//! recovers it. [`RecoveryCore`] decides every step; a driver only moves
//! its messages (`client.rs` over tokio, `lab sim` over the simulated
//! network) and ticks it.
//!
//! 1. **Probe.** Ask every segment for its status, until a read quorum
//!    (3 of 6) of every PG answered. The new epoch lies in the next
//!    thousand above every epoch seen (any epoch a writer ever opened was
//!    durable on a write quorum, which every read quorum meets), at an
//!    offset the driver draws at random: two recoveries that race never
//!    pick the same epoch, so the higher one fences the lower, which is
//!    then an ordinary zombie.
//! 2. **Seal** at that epoch on a write quorum (4 of 6) of every PG. A
//!    sealed segment refuses the older epochs, so nothing more can become
//!    durable for the old writer, and each answer carries the segment's
//!    SCL, its truncation list's epoch and the highest VDL it was told. A
//!    segment already at a newer epoch (a rival recovery) sends the probe
//!    back, one epoch higher.
//! 3. **Fetch.** Everything at or below the highest VDL any sealed
//!    segment was told (`X`) is durable. Above it, per PG, the records of
//!    the sealed segment with the highest SCL are read (its SCL covers
//!    every record the old writer made durable there: any 3 of the sealed
//!    segments meet every write quorum). So is the truncation list with
//!    the highest epoch among the answers, which holds every range of
//!    every epoch that ever opened.
//! 4. **Decide.** Records voided by that list are dropped. From `X` the
//!    volume chain (`prev_volume_lsn`) is followed through the fetched
//!    records of all PGs while it links up: that is VCL. VDL is the last
//!    consistency point at or below it. Everything above VDL that any
//!    writer may have written is truncated by a new range tagged with the
//!    new epoch, up to `LSN_ALLOCATION_LIMIT_MAX` above the higher of VDL
//!    and the end of every earlier range (an earlier writer allocated at
//!    most that far above its own VDL or range); the new writer allocates
//!    above it.
//!
//! The result, a [`RecoveredLog`], seeds the new [`super::writer::WriterCore`],
//! which opens each segment with the truncation list before appending to
//! it (`OpenEpoch`), re-sends the recovered records to segments that lack
//! them, and counts them durable once 4 of 6 hold them, as any other record.
//! During a membership change (A18 §4.1) every quorum above is counted in
//! each member set: a read quorum is 3 of 6 of either set, a write quorum
//! 4 of 6 of both. A segment that reports a newer membership epoch than
//! the geometry's means the geometry is out of date: recovery stops with
//! an error rather than count quorums among the wrong segments.
//!
//! Nothing here grows with the log: the work is the records above `X`,
//! bounded by what was in flight when the old writer died.

use common::ids::{Epoch, Lsn, MembershipEpoch, NodeId, PgId, ReplicaIndex};
use common::limits::{LSN_ALLOCATION_LIMIT_MAX, TRUNCATIONS_MAX};
use common::message::{
    ErrorCode, FetchRecordsRequest, Message, RecordBatch, SealEpochRequest, SegmentStatus, StatusRequest, Truncation,
};
use common::redo::RedoRecord;
use std::collections::BTreeMap;

use super::geometry::{READ_QUORUM, VolumeGeometry};

/// Ticks without an answer after which a fetch moves to another segment.
const FETCH_PATIENCE_TICKS: u32 = 10;

/// Epochs are chosen in strides of this: the stride counts recoveries, the
/// offset in it (drawn at random) keeps racing recoveries apart.
pub const EPOCH_STRIDE: u64 = 1000;

/// What recovery found: where the new writer starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecoveredLog {
    /// The new writer's epoch, sealed on a write quorum of every PG.
    pub epoch: Epoch,
    /// Durable on a write quorum everywhere: no record at or below it is read.
    pub start: Lsn,
    /// The records above `start` up to `volume_durable`, in LSN order: the
    /// volume's tail, which the new writer makes durable on 4 of 6 again.
    pub records: Vec<RedoRecord>,
    /// The recovered VDL: the last consistency point of the tail (or `start`).
    pub volume_durable: Lsn,
    /// The truncation list to open every segment with; the last range is
    /// this epoch's own, from `volume_durable` up.
    pub truncations: Vec<Truncation>,
    /// Per PG, its last record at or below `start` (its segment chain's
    /// link for the first record of the tail, or of the new writer).
    pub pg_last_at_start: Vec<Lsn>,
}

impl RecoveredLog {
    /// The range this epoch truncated; the new writer allocates above it.
    pub fn own_truncation(&self) -> Truncation {
        *self.truncations.last().expect("a recovered log carries its own range")
    }
}

/// Why recovery cannot go on.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RecoveryError {
    #[error("{pg}: only {left} sealed segments are left to read; a read quorum is {READ_QUORUM}")]
    LostReadQuorum { pg: PgId, left: usize },
    #[error("the truncation list would hold {count} ranges; TRUNCATIONS_MAX is {TRUNCATIONS_MAX}")]
    TooManyTruncations { count: usize },
    #[error("{pg} on {node}: {reason}")]
    Refused { pg: PgId, node: NodeId, reason: String },
    #[error(
        "{pg} on {node} holds {seen}, newer than the geometry's {known}: the volume's membership changed since (use the recorded one)"
    )]
    StaleMembership { pg: PgId, node: NodeId, seen: MembershipEpoch, known: MembershipEpoch },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Quorum {
    Read,
    Write,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Phase {
    Probe,
    Seal,
    Fetch,
    Done,
}

/// The read of one PG's records above `start` from one sealed segment.
#[derive(Clone, Debug)]
struct Fetch {
    replica: ReplicaIndex,
    /// Highest LSN received so far (ask above it next).
    above: Lsn,
    records: Vec<RedoRecord>,
    /// The first record's segment backlink: the PG's last record at or below `start`.
    first_prev_segment: Option<Lsn>,
    done: bool,
    silent_ticks: u32,
    request_id: u64,
}

/// The recovery procedure of one new writer.
#[derive(Debug)]
pub struct RecoveryCore {
    geometry: VolumeGeometry,
    phase: Phase,
    /// The epoch being sealed (meaningful from the seal phase on).
    epoch: Epoch,
    /// The next seal uses an epoch above this (raised by rivals).
    epoch_floor: Epoch,
    /// This recovery's offset within an epoch stride, 1..EPOCH_STRIDE.
    epoch_offset: u64,
    /// Probe answers, or seal answers at `epoch`, per segment.
    answers: BTreeMap<(PgId, ReplicaIndex), SegmentStatus>,
    start: Lsn,
    fetches: BTreeMap<PgId, Fetch>,
    /// The sealed segment whose truncation list is read, and what it said.
    list_holder: Option<(PgId, ReplicaIndex)>,
    list: Option<Vec<Truncation>>,
    next_request: u64,
    result: Option<Result<RecoveredLog, RecoveryError>>,
}

/// A message the driver must send to a node.
pub type Outgoing = (NodeId, Message);

impl RecoveryCore {
    /// A recovery that will seal at an epoch above every epoch it sees,
    /// `random` picking its offset in the next stride (see [`EPOCH_STRIDE`]).
    pub fn new(geometry: VolumeGeometry, random: u64) -> Self {
        RecoveryCore {
            geometry,
            phase: Phase::Probe,
            epoch: Epoch::NONE,
            epoch_floor: Epoch::NONE,
            epoch_offset: 1 + random % (EPOCH_STRIDE - 1),
            answers: BTreeMap::new(),
            start: Lsn::ZERO,
            fetches: BTreeMap::new(),
            list_holder: None,
            list: None,
            next_request: 1,
            result: None,
        }
    }

    /// The first messages: a status request to every segment.
    pub fn start(&mut self) -> Vec<Outgoing> {
        self.unanswered_requests()
    }

    /// The epoch being sealed, once the probe chose it.
    pub fn epoch(&self) -> Option<Epoch> {
        (self.phase != Phase::Probe).then_some(self.epoch)
    }

    /// The outcome, once recovery finished (or failed).
    pub fn result(&self) -> Option<&Result<RecoveredLog, RecoveryError>> {
        self.result.as_ref()
    }

    pub fn take_result(&mut self) -> Option<Result<RecoveredLog, RecoveryError>> {
        self.result.take()
    }

    /// What recovery is waiting for, for a timeout's message.
    pub fn waiting_for(&self) -> String {
        let short = |quorum: Quorum| {
            (0..self.geometry.pg_count())
                .map(PgId)
                .find(|pg| !self.has_quorum(*pg, quorum))
                .map(|pg| {
                    let answered: Vec<String> = self
                        .answers
                        .keys()
                        .filter(|(answered, _)| *answered == pg)
                        .map(|(_, slot)| slot.to_string())
                        .collect();
                    format!("{pg} has answers from [{}] only", answered.join(", "))
                })
                .unwrap_or_default()
        };
        match self.phase {
            Phase::Probe => format!("status from a read quorum of every PG: {}", short(Quorum::Read)),
            Phase::Seal => {
                format!("the seal at {} on a write quorum of every PG: {}", self.epoch, short(Quorum::Write))
            }
            Phase::Fetch => {
                let pending: Vec<String> = self
                    .fetches
                    .iter()
                    .filter(|(_, fetch)| !fetch.done)
                    .map(|(pg, fetch)| format!("{pg} from {}", fetch.replica))
                    .collect();
                format!("the records above {} ({})", self.start, pending.join(", "))
            }
            Phase::Done => "nothing".into(),
        }
    }

    fn replica_on(&self, pg: PgId, node: NodeId) -> Option<ReplicaIndex> {
        self.geometry.slot_on(pg, node)
    }

    fn node_of(&self, pg: PgId, replica: ReplicaIndex) -> NodeId {
        self.geometry.segment(pg, replica).node
    }

    fn request_id(&mut self) -> u64 {
        self.next_request += 1;
        self.next_request
    }

    /// Every request still waiting for an answer (sent again on each tick).
    fn unanswered_requests(&mut self) -> Vec<Outgoing> {
        let mut outgoing = Vec::new();
        match self.phase {
            Phase::Probe | Phase::Seal => {
                for pg in 0..self.geometry.pg_count() {
                    for replica in self.geometry.slots(PgId(pg)) {
                        let pg = PgId(pg);
                        if self.answers.contains_key(&(pg, replica)) {
                            continue;
                        }
                        let request_id = self.request_id();
                        let message = if self.phase == Phase::Probe {
                            Message::StatusRequest(StatusRequest { request_id, pg })
                        } else {
                            Message::SealEpoch(SealEpochRequest { request_id, pg, epoch: self.epoch })
                        };
                        outgoing.push((self.node_of(pg, replica), message));
                    }
                }
            }
            Phase::Fetch => {
                let pending: Vec<(PgId, ReplicaIndex, Lsn)> = self
                    .fetches
                    .iter()
                    .filter(|(_, fetch)| !fetch.done)
                    .map(|(pg, fetch)| (*pg, fetch.replica, fetch.above))
                    .collect();
                for (pg, replica, above) in pending {
                    let request_id = self.request_id();
                    self.fetches.get_mut(&pg).expect("listed").request_id = request_id;
                    outgoing.push((self.node_of(pg, replica), self.fetch_request(request_id, pg, above)));
                }
                if self.list.is_none()
                    && let Some((pg, replica)) = self.list_holder
                    && self.fetches.get(&pg).is_none_or(|fetch| fetch.replica != replica)
                {
                    // Its list only: nothing lies above the top of the LSN space.
                    let request_id = self.request_id();
                    outgoing.push((self.node_of(pg, replica), self.fetch_request(request_id, pg, Lsn(u64::MAX))));
                }
            }
            Phase::Done => {}
        }
        outgoing
    }

    fn fetch_request(&self, request_id: u64, pg: PgId, above: Lsn) -> Message {
        Message::FetchRecords(FetchRecordsRequest { request_id, pg, epoch: self.epoch, above, through: Lsn(u64::MAX) })
    }

    /// Time passed: requests still unanswered are sent again, and a fetch
    /// whose segment stays silent moves to another one.
    pub fn tick(&mut self) -> Vec<Outgoing> {
        if self.phase == Phase::Fetch {
            let silent: Vec<PgId> = self
                .fetches
                .iter_mut()
                .filter(|(_, fetch)| !fetch.done)
                .filter_map(|(pg, fetch)| {
                    fetch.silent_ticks += 1;
                    (fetch.silent_ticks >= FETCH_PATIENCE_TICKS).then_some(*pg)
                })
                .collect();
            for pg in silent {
                let replica = self.fetches[&pg].replica;
                self.give_up_on(pg, replica);
            }
        }
        self.unanswered_requests()
    }

    /// A node's answer. Returns what to send next.
    pub fn receive(&mut self, node: NodeId, message: Message) -> Vec<Outgoing> {
        match (self.phase.clone(), message) {
            (Phase::Probe, Message::Status(status)) => {
                let Some(replica) = self.replica_on(status.pg, node) else { return Vec::new() };
                let known = self.geometry.membership(status.pg).epoch;
                if status.membership_epoch > known {
                    let (pg, seen) = (status.pg, status.membership_epoch);
                    self.fail(RecoveryError::StaleMembership { pg, node, seen, known });
                    return Vec::new();
                }
                self.answers.insert((status.pg, replica), status);
                if self.every_pg_has(Quorum::Read) {
                    let seen = self.answers.values().map(|status| status.epoch).max().unwrap_or(Epoch::NONE);
                    let stride = seen.max(self.epoch_floor).0 / EPOCH_STRIDE + 1;
                    self.epoch = Epoch(stride * EPOCH_STRIDE + self.epoch_offset);
                    self.phase = Phase::Seal;
                    self.answers.clear();
                    return self.unanswered_requests();
                }
                Vec::new()
            }
            (Phase::Seal, Message::Status(status)) => {
                let Some(replica) = self.replica_on(status.pg, node) else { return Vec::new() };
                if status.epoch > self.epoch {
                    return self.outbid(status.epoch);
                }
                if status.epoch == self.epoch {
                    self.answers.insert((status.pg, replica), status);
                }
                if self.every_pg_has(Quorum::Write) {
                    return self.begin_fetch();
                }
                Vec::new()
            }
            (Phase::Seal, Message::Error(error)) if error.code == ErrorCode::StaleEpoch => {
                // A rival recovery sealed at our epoch or later.
                self.outbid(self.epoch)
            }
            (Phase::Fetch, Message::RecordBatch(batch)) => self.take_batch(node, batch),
            (Phase::Fetch, Message::Error(error)) if error.request_id != 0 => {
                if let Some(replica) = self.replica_on(error.pg, node) {
                    if error.code == ErrorCode::StaleEpoch {
                        // A newer recovery sealed this segment: it will win.
                        let reason = format!("sealed past {} during recovery: {}", self.epoch, error.message);
                        self.fail(RecoveryError::Refused { pg: error.pg, node, reason });
                        return Vec::new();
                    }
                    self.give_up_on(error.pg, replica);
                    return self.unanswered_requests();
                }
                Vec::new()
            }
            _ => Vec::new(),
        }
    }

    fn every_pg_has(&self, quorum: Quorum) -> bool {
        (0..self.geometry.pg_count()).all(|pg| self.has_quorum(PgId(pg), quorum))
    }

    /// Whether the answers of `pg` make `quorum` (in every member set of a
    /// membership change, see the module docs).
    fn has_quorum(&self, pg: PgId, quorum: Quorum) -> bool {
        let answered = |slot: ReplicaIndex| self.answers.contains_key(&(pg, slot));
        match quorum {
            Quorum::Read => self.geometry.is_read_quorum(pg, answered),
            Quorum::Write => self.geometry.is_write_quorum(pg, answered),
        }
    }

    /// Someone sealed at `epoch` or later: probe again and go above it.
    fn outbid(&mut self, epoch: Epoch) -> Vec<Outgoing> {
        self.epoch_floor = self.epoch_floor.max(epoch);
        self.phase = Phase::Probe;
        self.answers.clear();
        self.unanswered_requests()
    }

    fn begin_fetch(&mut self) -> Vec<Outgoing> {
        self.phase = Phase::Fetch;
        self.start = self.answers.values().map(|status| status.volume_durable_hint).max().unwrap_or(Lsn::ZERO);
        for pg in 0..self.geometry.pg_count() {
            if let Some(replica) = self.most_complete(PgId(pg)) {
                self.fetches.insert(PgId(pg), self.new_fetch(replica));
            }
        }
        self.list_holder = self.highest_list_holder();
        self.unanswered_requests()
    }

    fn new_fetch(&self, replica: ReplicaIndex) -> Fetch {
        Fetch {
            replica,
            above: self.start,
            records: Vec::new(),
            first_prev_segment: None,
            done: false,
            silent_ticks: 0,
            request_id: 0,
        }
    }

    /// The sealed segment of `pg` with the highest SCL (lowest replica on ties).
    fn most_complete(&self, pg: PgId) -> Option<ReplicaIndex> {
        self.answers
            .iter()
            .filter(|((answered, _), _)| *answered == pg)
            .max_by_key(|((_, replica), status)| (status.segment_complete_lsn, std::cmp::Reverse(*replica)))
            .map(|((_, replica), _)| *replica)
    }

    fn highest_list_holder(&self) -> Option<(PgId, ReplicaIndex)> {
        self.answers
            .iter()
            .max_by_key(|((pg, replica), status)| (status.open_epoch, std::cmp::Reverse((*pg, *replica))))
            .map(|(key, _)| *key)
    }

    /// A sealed segment cannot be read: forget its answer and read another,
    /// as long as a read quorum of the PG's answers is left.
    fn give_up_on(&mut self, pg: PgId, replica: ReplicaIndex) {
        self.answers.remove(&(pg, replica));
        let left = self.answers.keys().filter(|(answered, _)| *answered == pg).count();
        if !self.has_quorum(pg, Quorum::Read) {
            self.fail(RecoveryError::LostReadQuorum { pg, left });
            return;
        }
        if self.fetches.get(&pg).is_some_and(|fetch| fetch.replica == replica)
            && let Some(next) = self.most_complete(pg)
        {
            self.fetches.insert(pg, self.new_fetch(next));
        }
        if self.list_holder == Some((pg, replica)) && self.list.is_none() {
            self.list_holder = self.highest_list_holder();
        }
    }

    fn fail(&mut self, error: RecoveryError) {
        self.phase = Phase::Done;
        self.result = Some(Err(error));
    }

    fn take_batch(&mut self, node: NodeId, batch: RecordBatch) -> Vec<Outgoing> {
        let Some(replica) = self.replica_on(batch.pg, node) else { return Vec::new() };
        if self.list.is_none() && self.list_holder == Some((batch.pg, replica)) {
            self.list = Some(batch.truncations.clone());
        }
        let Some(fetch) = self.fetches.get_mut(&batch.pg) else { return self.finish_if_done() };
        if fetch.replica != replica || fetch.done || batch.request_id != fetch.request_id {
            return self.finish_if_done(); // a stale or duplicated answer
        }
        fetch.silent_ticks = 0;
        if fetch.first_prev_segment.is_none() {
            fetch.first_prev_segment = batch.records.first().map(|record| record.prev_segment_lsn);
        }
        if let Some(last) = batch.records.last() {
            fetch.above = last.lsn;
        }
        fetch.records.extend(batch.records);
        if batch.more {
            let request_id = self.request_id();
            let (pg, above) = (batch.pg, self.fetches[&batch.pg].above);
            self.fetches.get_mut(&pg).expect("present").request_id = request_id;
            return vec![(node, self.fetch_request(request_id, pg, above))];
        }
        fetch.done = true;
        self.finish_if_done()
    }

    fn finish_if_done(&mut self) -> Vec<Outgoing> {
        if self.phase != Phase::Fetch || self.list.is_none() || self.fetches.values().any(|fetch| !fetch.done) {
            return Vec::new();
        }
        self.phase = Phase::Done;
        let list = self.list.take().expect("checked");
        let answers = &self.answers;
        let fetches = std::mem::take(&mut self.fetches);
        let result =
            decide(self.epoch, self.start, list, fetches, |pg, replica| answers[&(pg, replica)].segment_complete_lsn);
        self.result = Some(result);
        Vec::new()
    }
}

/// Step 4: from the fetched tails and the newest truncation list, the
/// recovered log.
fn decide(
    epoch: Epoch,
    start: Lsn,
    list: Vec<Truncation>,
    fetches: BTreeMap<PgId, Fetch>,
    scl_of: impl Fn(PgId, ReplicaIndex) -> Lsn,
) -> Result<RecoveredLog, RecoveryError> {
    let voided = |lsn: Lsn| list.iter().any(|range| range.contains(lsn));
    let pg_last_at_start: Vec<Lsn> = fetches
        .iter()
        .map(|(pg, fetch)| fetch.first_prev_segment.unwrap_or_else(|| scl_of(*pg, fetch.replica)).min(start))
        .collect();
    let mut tail: Vec<RedoRecord> = fetches
        .into_values()
        .flat_map(|fetch| fetch.records)
        .filter(|record| record.lsn > start && !voided(record.lsn))
        .collect();
    tail.sort_by_key(|record| record.lsn);
    tail.dedup_by_key(|record| record.lsn);
    // The volume chain from `start`: VCL is where it stops linking.
    let mut complete = start;
    let mut durable = start;
    let mut linked = 0;
    for record in &tail {
        if record.prev_volume_lsn != complete {
            break;
        }
        complete = record.lsn;
        linked += 1;
        if record.consistency_point {
            durable = record.lsn;
        }
    }
    tail.truncate(linked);
    tail.retain(|record| record.lsn <= durable);
    // Any earlier writer allocated at most LSN_ALLOCATION_LIMIT_MAX above
    // the higher of its VDL (at most `durable` now) and its own range.
    let highest_range_end = list.iter().map(|range| range.through).max().unwrap_or(Lsn::ZERO);
    let through = Lsn(durable.max(highest_range_end).0 + LSN_ALLOCATION_LIMIT_MAX);
    let own = Truncation { epoch, above: durable, through };
    let mut truncations = list;
    // A range that starts where this one does is inside it (nothing became
    // durable since): keep only this one, so the list grows only with
    // epochs that committed something.
    truncations.retain(|range| range.above != own.above);
    truncations.push(own);
    if truncations.len() > TRUNCATIONS_MAX {
        return Err(RecoveryError::TooManyTruncations { count: truncations.len() });
    }
    Ok(RecoveredLog { epoch, start, records: tail, volume_durable: durable, truncations, pg_last_at_start })
}
