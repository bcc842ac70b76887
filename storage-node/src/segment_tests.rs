//! Segment core tests: group commit, SCL and holes, epochs, recovery from
//! torn and corrupt logs, cleaning, and a reference-model property test of
//! page materialization.

use super::*;
use crate::disk::{LogDisk, MemoryDisk};
use crate::log_format::scan_log;
use common::message::AppendRequest;
use common::redo::{PageOp, RecordFields};
use proptest::prelude::*;
use std::collections::HashMap;

const PAGE_BYTES: usize = 256;
const PG: PgId = PgId(0);

fn config() -> SegmentConfig {
    SegmentConfig {
        log_file_bytes: 64 * 1024,
        log_files_target: 3,
        coalesce_chain_records: 4,
        coalesce_bytes_per_write: 4 * 1024,
        ..SegmentConfig::new(PG, PAGE_BYTES, 1 << 20)
    }
}

/// Allocates LSNs and backlinks the way the volume writer does, for one PG.
/// LSNs skip values now and then, as if other PGs took them.
#[derive(Default)]
struct RecordMaker {
    last_lsn: u64,
    last_segment: Lsn,
    last_page: HashMap<PageId, Lsn>,
}

impl RecordMaker {
    fn make(&mut self, page: u64, offset: u32, data: &[u8], skip: u64) -> RedoRecord {
        let lsn = Lsn(self.last_lsn + 1 + skip);
        let page = PageId(page);
        let record = RecordFields {
            lsn,
            prev_volume_lsn: Lsn(lsn.0 - 1),
            prev_segment_lsn: self.last_segment,
            prev_page_lsn: self.last_page.get(&page).copied().unwrap_or(Lsn::ZERO),
            page,
            pg: PG,
            consistency_point: true,
            op: PageOp::Write { offset, data: Bytes::copy_from_slice(data) },
        }
        .seal();
        self.last_lsn = lsn.0;
        self.last_segment = lsn;
        self.last_page.insert(page, lsn);
        record
    }
}

/// The truncation list of a writer that found nothing to truncate.
fn empty_truncation(epoch: Epoch) -> Truncation {
    Truncation { epoch, above: Lsn::ZERO, through: Lsn::ZERO }
}

/// A segment on a memory disk, driven synchronously, open at epoch 1.
struct Harness {
    config: SegmentConfig,
    core: SegmentCore,
    disk: MemoryDisk,
    acks: Vec<(ReplyTo, AppendAck)>,
    refusals: Vec<(ReplyTo, ErrorResponse)>,
    statuses: Vec<(ReplyTo, SegmentStatus)>,
    writes: Vec<LogWrite>,
    deleted: Vec<u64>,
}

impl Harness {
    fn new() -> Harness {
        Harness::with_config(config())
    }

    fn with_config(config: SegmentConfig) -> Harness {
        let (core, actions) = SegmentCore::create(config.clone(), Epoch::INITIAL).unwrap();
        let mut harness = Harness {
            config,
            core,
            disk: MemoryDisk::new(),
            acks: Vec::new(),
            refusals: Vec::new(),
            statuses: Vec::new(),
            writes: Vec::new(),
            deleted: Vec::new(),
        };
        harness.complete_all(actions);
        let opened = harness.core.open_epoch(0, Epoch::INITIAL, vec![empty_truncation(Epoch::INITIAL)], 0);
        harness.complete_all(opened);
        harness.writes.clear();
        harness.statuses.clear();
        harness
    }

    fn request(records: Vec<RedoRecord>, vdl: Lsn, min_read_point: Lsn) -> AppendRequest {
        AppendRequest {
            pg: PG,
            epoch: Epoch::INITIAL,
            volume_durable_lsn: vdl,
            min_read_point,
            membership_epoch: MembershipEpoch::INITIAL,
            records,
        }
    }

    /// Runs actions, completing each write at once, until none are left.
    fn complete_all(&mut self, actions: Vec<Action>) {
        let (writes, acks, refusals, statuses, deleted) =
            (&mut self.writes, &mut self.acks, &mut self.refusals, &mut self.statuses, &mut self.deleted);
        self.disk.run_until_idle(&mut self.core, actions, |action| match action {
            Action::Write(write) => writes.push(write.clone()),
            Action::Ack { to, ack } => acks.push((*to, *ack)),
            Action::Refuse { to, error } => refusals.push((*to, error.clone())),
            Action::Status { to, status } => statuses.push((*to, *status)),
            Action::DeleteFile(file) => deleted.push(*file),
        });
    }

    fn append(&mut self, records: Vec<RedoRecord>, from: ReplyTo) {
        let actions = self.core.append(Self::request(records, Lsn::ZERO, Lsn::ZERO), from);
        self.complete_all(actions);
    }

    fn restart(&mut self) -> RecoveryReport {
        let scan = scan_log(&self.disk.read_all().unwrap());
        let end = scan.end;
        let (core, report) = SegmentCore::recover(self.config.clone(), scan).unwrap();
        if report.truncated_tail_bytes > 0 {
            self.disk.zero(end, report.truncated_tail_bytes).unwrap();
        }
        self.core = core;
        report
    }

    /// Six single-record appends to page 1; record `i` writes 16 bytes of `i + 1`.
    fn append_six_records_to_page_one(&mut self) -> Vec<Lsn> {
        let mut maker = RecordMaker::default();
        let mut lsns = Vec::new();
        for index in 0..6u64 {
            let record = maker.make(1, 0, &[index as u8 + 1; 16], 0);
            lsns.push(record.lsn);
            self.append(vec![record], 1);
        }
        lsns
    }

    /// Flips one bit of the first payload byte matching `payload` on disk.
    fn corrupt_payload(&self, payload: &[u8]) {
        let (write, offset) = self
            .writes
            .iter()
            .find_map(|write| {
                write.bytes.windows(payload.len()).position(|window| window == payload).map(|at| (write, at))
            })
            .expect("the payload was written");
        self.disk.corrupt(write.position.file, write.position.offset as usize + offset, 0x80);
    }

    fn read(&self, page: u64, read_point: Lsn) -> Result<(Lsn, Bytes), ReadRefusal> {
        self.core.read_page(PageId(page), read_point, Epoch::INITIAL)
    }
}

#[test]
fn appends_are_acknowledged_only_after_their_write_and_group_committed() {
    let mut harness = Harness::new();
    let mut maker = RecordMaker::default();
    let first = maker.make(1, 0, b"a", 0);
    let actions = harness.core.append(Harness::request(vec![first], Lsn::ZERO, Lsn::ZERO), 7);
    assert!(matches!(actions.as_slice(), [Action::Write(_)]), "one write, no ack yet: {actions:?}");
    let Action::Write(write) = &actions[0] else { unreachable!() };
    // While it is in flight, two more connections append: they queue.
    let queued_one = harness.core.append(Harness::request(vec![maker.make(2, 0, b"b", 0)], Lsn::ZERO, Lsn::ZERO), 8);
    let queued_two = harness.core.append(Harness::request(vec![maker.make(3, 0, b"c", 0)], Lsn::ZERO, Lsn::ZERO), 9);
    assert!(queued_one.is_empty() && queued_two.is_empty());
    let after_first = harness.core.write_done(write.id);
    let acks: Vec<_> = after_first.iter().filter(|action| matches!(action, Action::Ack { .. })).collect();
    assert_eq!(acks.len(), 1);
    assert!(matches!(acks[0], Action::Ack { to: 7, ack } if ack.segment_complete_lsn == Lsn(1)));
    // The two queued appends go out together: one write, one fdatasync.
    let writes: Vec<_> = after_first.iter().filter(|action| matches!(action, Action::Write(_))).collect();
    assert_eq!(writes.len(), 1, "group commit");
    harness.complete_all(after_first);
    let last: Vec<_> = harness.acks.iter().map(|(to, ack)| (*to, ack.segment_complete_lsn)).collect();
    assert_eq!(last, vec![(7, Lsn(1)), (8, Lsn(3)), (9, Lsn(3))]);
}

#[test]
fn scl_stops_at_a_hole_and_jumps_when_it_is_filled() {
    let mut harness = Harness::new();
    let mut maker = RecordMaker::default();
    let records: Vec<_> = (0..5).map(|index| maker.make(index, 0, b"x", 1)).collect();
    harness.append(vec![records[0].clone(), records[1].clone(), records[3].clone(), records[4].clone()], 1);
    let ack = harness.acks.last().unwrap().1;
    assert_eq!(ack.segment_complete_lsn, records[1].lsn);
    assert_eq!(ack.highest_durable_lsn, records[4].lsn);
    assert!(harness.read(3, records[3].lsn).is_err(), "a read above SCL is refused");
    harness.append(vec![records[2].clone()], 1);
    assert_eq!(harness.acks.last().unwrap().1.segment_complete_lsn, records[4].lsn);
}

#[test]
fn duplicates_are_not_logged_twice_but_still_answered() {
    let mut harness = Harness::new();
    let mut maker = RecordMaker::default();
    let record = maker.make(1, 0, b"once", 0);
    harness.append(vec![record.clone()], 1);
    let writes_before = harness.writes.len();
    harness.append(vec![record.clone()], 2);
    assert_eq!(harness.writes.len(), writes_before, "no new write for a duplicate");
    assert_eq!(harness.acks.last().unwrap(), &(2, harness.core.ack()));
}

#[test]
fn stale_and_unknown_epochs_are_refused() {
    let mut harness = Harness::new();
    let mut maker = RecordMaker::default();
    for (epoch, code) in [(Epoch(0), ErrorCode::StaleEpoch), (Epoch(2), ErrorCode::UnknownEpoch)] {
        let mut request = Harness::request(vec![maker.make(1, 0, b"z", 0)], Lsn::ZERO, Lsn::ZERO);
        request.epoch = epoch;
        let actions = harness.core.append(request, 4);
        assert!(matches!(&actions[..], [Action::Refuse { to: 4, error }] if error.code == code), "{actions:?}");
        assert_eq!(harness.core.read_page(PageId(1), Lsn::ZERO, epoch).unwrap_err().code, code);
    }
}

/// A seal moves the segment to a newer epoch: the older writer is refused
/// at once, the answer comes only once a checkpoint carrying the epoch is
/// durable, and a restart keeps it (but not a seal whose checkpoint never
/// reached the disk: nobody was told it held). A repeated seal is answered
/// at once; an older one is refused.
#[test]
fn a_seal_fences_the_older_epoch_and_is_answered_once_durable() {
    let mut harness = Harness::new();
    let mut maker = RecordMaker::default();
    harness.append(vec![maker.make(1, 0, b"old", 0)], 1);
    let scl = harness.core.segment_complete_lsn();

    // A seal whose checkpoint is lost in a crash is forgotten.
    let lost = harness.core.seal(6, Epoch(2), 5);
    assert!(matches!(&lost[..], [Action::Write(_)]), "{lost:?}");
    harness.restart();
    assert_eq!(harness.core.status(0).epoch, Epoch::INITIAL);

    let actions = harness.core.seal(7, Epoch(2), 5);
    assert!(matches!(&actions[..], [Action::Write(_)]), "a checkpoint is logged first: {actions:?}");
    let zombie = Harness::request(vec![maker.make(1, 0, b"zombie", 0)], Lsn::ZERO, Lsn::ZERO);
    let refused = harness.core.append(zombie, 1);
    assert!(matches!(&refused[..], [Action::Refuse { error, .. }] if error.code == ErrorCode::StaleEpoch));
    assert_eq!(harness.core.read_page(PageId(1), scl, Epoch::INITIAL).unwrap_err().code, ErrorCode::StaleEpoch);
    assert!(harness.statuses.is_empty(), "not answered before the checkpoint is durable");
    harness.complete_all(actions);
    let (to, status) = *harness.statuses.last().expect("answered");
    assert_eq!((to, status.request_id, status.epoch, status.segment_complete_lsn), (5, 7, Epoch(2), scl));

    // Records of the old epoch still queued (not durable) when the seal
    // comes are refused, so the seal's status is final for that epoch.
    let mut queued_harness = Harness::new();
    let first = queued_harness.core.append(Harness::request(vec![maker.make(3, 0, b"a", 0)], Lsn::ZERO, Lsn::ZERO), 1);
    let queued = queued_harness.core.append(Harness::request(vec![maker.make(3, 0, b"b", 0)], Lsn::ZERO, Lsn::ZERO), 2);
    assert!(queued.is_empty(), "queued behind the write in flight: {queued:?}");
    let sealing = queued_harness.core.seal(1, Epoch(2), 9);
    assert!(
        matches!(&sealing[..], [Action::Refuse { to: 2, error }] if error.code == ErrorCode::StaleEpoch),
        "{sealing:?}"
    );
    assert_eq!(queued_harness.core.queued_bytes(), 0);
    // A repeat while the seal waits for the disk adds no checkpoint.
    assert!(queued_harness.core.seal(2, Epoch(2), 9).is_empty());
    queued_harness.complete_all(first);
    let answered: Vec<u64> = queued_harness.statuses.iter().map(|(_, status)| status.request_id).collect();
    assert_eq!(answered, vec![1, 2]);
    let sizes: Vec<usize> = queued_harness.writes.iter().map(|write| write.bytes.len()).collect();
    // Record a, then one checkpoint (with the one-range list) for both seals.
    assert_eq!(sizes.len(), 2, "{sizes:?}");
    assert_eq!(sizes[1], crate::log_format::checkpoint_entry_bytes(1), "{sizes:?}");

    let repeated = harness.core.seal(8, Epoch(2), 5);
    assert!(matches!(&repeated[..], [Action::Status { to: 5, status }] if status.request_id == 8), "{repeated:?}");
    let older = harness.core.seal(9, Epoch::INITIAL, 5);
    assert!(
        matches!(&older[..], [Action::Refuse { error, .. }] if error.code == ErrorCode::StaleEpoch && error.request_id == 9),
        "{older:?}"
    );

    harness.restart();
    assert_eq!(harness.core.status(0).epoch, Epoch(2), "the epoch survives a restart");
    let mut request = Harness::request(vec![maker.make(2, 0, b"new", 0)], Lsn::ZERO, Lsn::ZERO);
    request.epoch = Epoch(2);
    let not_open = harness.core.append(request.clone(), 1);
    assert!(
        matches!(&not_open[..], [Action::Refuse { error, .. }] if error.code == ErrorCode::NotOpen),
        "a sealed epoch takes no append before its writer opens it: {not_open:?}"
    );
    let opened = harness.core.open_epoch(10, Epoch(2), vec![empty_truncation(Epoch(2))], 5);
    harness.complete_all(opened);
    assert!(harness.statuses.last().is_some_and(|(_, status)| status.request_id == 10 && status.is_open()));
    let accepted = harness.core.append(request, 1);
    assert!(!accepted.iter().any(|action| matches!(action, Action::Refuse { .. })), "{accepted:?}");
}

/// A new membership is answered only once durable, fences appends of the
/// older membership, survives a restart (but not when its checkpoint was
/// lost), and an older one is refused.
#[test]
fn a_membership_change_fences_older_memberships_once_durable() {
    let mut harness = Harness::new();
    let mut maker = RecordMaker::default();
    let joint = MembershipEpoch::INITIAL.next();

    let lost = harness.core.set_membership(1, Epoch::INITIAL, joint, 3);
    assert!(matches!(&lost[..], [Action::Write(_)]), "{lost:?}");
    harness.restart();
    assert_eq!(harness.core.membership_epoch(), MembershipEpoch::INITIAL, "never durable, never answered");

    let actions = harness.core.set_membership(2, Epoch::INITIAL, joint, 3);
    assert!(harness.statuses.is_empty(), "not answered before its checkpoint is durable");
    harness.complete_all(actions);
    let (to, status) = *harness.statuses.last().expect("answered");
    assert_eq!((to, status.request_id, status.membership_epoch), (3, 2, joint));

    let stale = Harness::request(vec![maker.make(1, 0, b"old", 0)], Lsn::ZERO, Lsn::ZERO);
    let refused = harness.core.append(stale, 1);
    assert!(
        matches!(&refused[..], [Action::Refuse { error, .. }] if error.code == ErrorCode::StaleMembership),
        "{refused:?}"
    );
    let mut current = Harness::request(vec![maker.make(1, 0, b"new", 0)], Lsn::ZERO, Lsn::ZERO);
    current.membership_epoch = joint;
    let actions = harness.core.append(current, 1);
    harness.complete_all(actions);
    assert_eq!(harness.acks.len(), 1, "an append of the current membership is taken");

    let repeat = harness.core.set_membership(4, Epoch::INITIAL, joint, 3);
    assert!(matches!(&repeat[..], [Action::Status { status, .. }] if status.request_id == 4), "{repeat:?}");
    let older = harness.core.set_membership(5, Epoch::INITIAL, MembershipEpoch::INITIAL, 3);
    assert!(
        matches!(&older[..], [Action::Refuse { error, .. }] if error.code == ErrorCode::StaleMembership && error.request_id == 5),
        "{older:?}"
    );

    harness.restart();
    assert_eq!(harness.core.membership_epoch(), joint, "the membership survives a restart");
    assert_eq!(harness.core.status(0).membership_epoch, joint);
}

#[test]
fn records_outside_the_segment_are_refused() {
    let mut harness = Harness::new();
    let mut maker = RecordMaker::default();
    let mut outside_page = maker.make(1 << 20, 0, b"z", 0).fields();
    outside_page.page = PageId(1 << 20);
    let past_end = maker.make(1, PAGE_BYTES as u32 - 1, b"zz", 0);
    for record in [outside_page.seal(), past_end] {
        let actions = harness.core.append(Harness::request(vec![record], Lsn::ZERO, Lsn::ZERO), 3);
        assert!(matches!(&actions[..], [Action::Refuse { error, .. }] if error.code == ErrorCode::InvalidRequest));
    }
}

#[test]
fn restart_rebuilds_state_from_the_log() {
    let mut harness = Harness::new();
    let mut maker = RecordMaker::default();
    for index in 0..50u64 {
        harness.append(vec![maker.make(index % 5, (index % 8) as u32 * 8, &index.to_le_bytes(), index % 3)], 1);
    }
    let scl = harness.core.segment_complete_lsn();
    let before: Vec<_> = (0..5).map(|page| harness.read(page, scl).unwrap()).collect();
    let report = harness.restart();
    assert_eq!(report.segment_complete_lsn, scl);
    assert_eq!((report.truncated_tail_bytes, report.mid_log_corruptions), (0, 0));
    let after: Vec<_> = (0..5).map(|page| harness.read(page, scl).unwrap()).collect();
    assert_eq!(before, after);
    // And it keeps taking writes where it left off.
    harness.append(vec![maker.make(1, 0, b"after", 0)], 1);
    harness.restart();
    assert_eq!(harness.read(1, Lsn(maker.last_lsn)).unwrap().1[..5], *b"after");
}

#[test]
fn torn_tail_is_truncated_and_only_the_unacknowledged_write_is_lost() {
    let mut harness = Harness::new();
    let mut maker = RecordMaker::default();
    harness.append(vec![maker.make(1, 0, b"durable", 0)], 1);
    let acknowledged = harness.core.segment_complete_lsn();
    let torn_record = maker.make(1, 0, b"in flight when the power went", 0);
    let actions = harness.core.append(Harness::request(vec![torn_record.clone()], Lsn::ZERO, Lsn::ZERO), 1);
    let Some(Action::Write(write)) = actions.into_iter().next() else { panic!("expected a write") };
    harness.disk.crash_during(&write, write.bytes.len() / 2);
    let report = harness.restart();
    assert!(report.truncated_tail_bytes > 0);
    assert_eq!(report.mid_log_corruptions, 0);
    assert_eq!(report.segment_complete_lsn, acknowledged);
    assert!(!harness.core.status(0).needs_repair);
    assert_eq!(&harness.read(1, acknowledged).unwrap().1[..7], b"durable");
    // The writer resends what was never acknowledged; the zeroed tail takes it
    // cleanly and a restart finds a clean log.
    harness.append(vec![torn_record, maker.make(2, 0, b"next", 0)], 1);
    let report = harness.restart();
    assert_eq!((report.truncated_tail_bytes, report.mid_log_corruptions), (0, 0));
    assert_eq!(harness.read(2, Lsn(maker.last_lsn)).unwrap().1[..4], *b"next");
}

#[test]
fn corrupt_record_in_the_middle_is_never_served_and_flags_repair() {
    let mut harness = Harness::new();
    let lsns = harness.append_six_records_to_page_one();
    harness.corrupt_payload(&[3u8; 16]);
    let report = harness.restart();
    assert_eq!(report.mid_log_corruptions, 1);
    assert!(harness.core.status(0).needs_repair);
    assert_eq!(report.segment_complete_lsn, lsns[1], "SCL stops right below the corrupt record");
    assert_eq!(report.highest_durable_lsn, lsns[5], "records after the hole are kept, not dropped");
    assert_eq!(harness.read(1, lsns[1]).unwrap().1[..16], [2u8; 16]);
    for lsn in &lsns[2..] {
        let refusal = harness.read(1, *lsn).unwrap_err();
        assert_eq!(refusal.code, ErrorCode::ReadPointAboveComplete);
    }
    // Once a peer supplies the missing record again, the chain is whole.
    let (missing, _) = RedoRecord::decode(&maker_replay(&lsns, 2), 0).unwrap();
    harness.append(vec![missing], 1);
    assert_eq!(harness.core.segment_complete_lsn(), lsns[5]);
    assert_eq!(harness.read(1, lsns[5]).unwrap().1[..16], [6u8; 16]);
}

/// A checkpoint logged after a corrupt entry cannot vouch for the records
/// the corruption destroyed: SCL still stops below the hole.
#[test]
fn a_later_checkpoint_does_not_cover_a_corrupt_record() {
    let mut harness = Harness::new();
    let lsns = harness.append_six_records_to_page_one();
    let last = harness.writes.last().unwrap().clone();
    let mut checkpoint = BytesMut::new();
    let claim = Checkpoint {
        pg: PG,
        page_bytes: PAGE_BYTES as u32,
        epoch: Epoch::INITIAL,
        segment_complete_lsn: lsns[5],
        min_read_point: Lsn::ZERO,
        open_epoch: Epoch::INITIAL,
        membership_epoch: MembershipEpoch::INITIAL,
        truncations: vec![empty_truncation(Epoch::INITIAL)],
    };
    crate::log_format::encode_checkpoint_entry(&mut checkpoint, 1_000, &claim);
    let position = LogPosition { file: last.position.file, offset: last.position.offset + last.bytes.len() as u64 };
    let write = LogWrite { id: 999, position, bytes: checkpoint.freeze() };
    assert!(harness.disk.write_durable(write, Box::new(|_| {})).unwrap().is_ok());
    harness.corrupt_payload(&[3u8; 16]);
    let report = harness.restart();
    assert_eq!(report.mid_log_corruptions, 1);
    assert_eq!(report.segment_complete_lsn, lsns[1], "the checkpoint after the hole is not trusted");
    assert!(harness.read(1, lsns[3]).is_err(), "no page is served above the hole");
}

/// Re-creates the encoded record number `index` of the corrupt-record test.
fn maker_replay(lsns: &[Lsn], index: usize) -> Bytes {
    let mut maker = RecordMaker::default();
    let mut record = None;
    for step in 0..=index {
        record = Some(maker.make(1, 0, &[step as u8 + 1; 16], 0));
    }
    let record = record.unwrap();
    assert_eq!(record.lsn, lsns[index]);
    record.encoded
}

#[test]
fn coalescing_gc_and_cleaning_bound_memory_and_files_without_changing_pages() {
    let mut harness = Harness::new();
    let mut maker = RecordMaker::default();
    let mut model: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    for index in 0..3000u64 {
        let page = index % 7;
        let data = index.to_le_bytes();
        let offset = ((index * 13) % (PAGE_BYTES as u64 - 8)) as u32;
        let record = maker.make(page, offset, &data, 0);
        let image = model.entry(page).or_insert_with(|| vec![0u8; PAGE_BYTES]);
        image[offset as usize..offset as usize + 8].copy_from_slice(&data);
        let durable = harness.core.segment_complete_lsn();
        let actions = harness.core.append(Harness::request(vec![record], durable, durable), 1);
        harness.complete_all(actions);
    }
    for _ in 0..50 {
        let durable = harness.core.segment_complete_lsn();
        let actions = harness.core.append(Harness::request(Vec::new(), durable, durable), 1);
        harness.complete_all(actions);
        let actions = harness.core.background();
        harness.complete_all(actions);
    }
    let scl = harness.core.segment_complete_lsn();
    assert!(harness.core.record_count() < 200, "records were collected: {}", harness.core.record_count());
    assert!(!harness.deleted.is_empty(), "old log files were cleaned");
    assert!(harness.core.live_files().len() <= 4, "live files: {:?}", harness.core.live_files());
    for (page, image) in &model {
        assert_eq!(&harness.read(*page, scl).unwrap().1[..], &image[..], "page {page}");
    }
    harness.restart();
    for (page, image) in &model {
        assert_eq!(&harness.read(*page, scl).unwrap().1[..], &image[..], "page {page} after restart");
    }
}

#[derive(Clone, Debug)]
enum Step {
    Write {
        page: u64,
        offset: u32,
        data: Vec<u8>,
        skip: u64,
    },
    /// Advance the writer's VDL and PGMRPL to the segment's SCL (lets coalesce and GC run).
    Advance,
    Background,
    Restart,
    Read {
        page: u64,
        back: u64,
    },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => (0u64..6, 0u32..(PAGE_BYTES as u32 - 8), proptest::collection::vec(any::<u8>(), 1..8), 0u64..3)
            .prop_map(|(page, offset, data, skip)| Step::Write { page, offset, data, skip }),
        1 => Just(Step::Advance),
        1 => Just(Step::Background),
        1 => Just(Step::Restart),
        2 => (0u64..6, 0u64..20).prop_map(|(page, back)| Step::Read { page, back }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    /// A page read at read point R equals applying, in LSN order, every
    /// record at or below R to a zero page — through coalescing, garbage
    /// collection, cleaning and restarts.
    #[test]
    fn page_reads_match_a_reference_model(steps in proptest::collection::vec(step(), 1..120)) {
        let mut harness = Harness::new();
        let mut maker = RecordMaker::default();
        // The reference: every record ever written, by LSN.
        let mut log: BTreeMap<Lsn, (u64, u32, Vec<u8>)> = BTreeMap::new();
        let mut min_read_point = Lsn::ZERO;
        for step in steps {
            match step {
                Step::Write { page, offset, data, skip } => {
                    let record = maker.make(page, offset, &data, skip);
                    log.insert(record.lsn, (page, offset, data));
                    let actions = harness.core.append(Harness::request(vec![record], min_read_point, min_read_point), 1);
                    harness.complete_all(actions);
                }
                Step::Advance => {
                    min_read_point = harness.core.segment_complete_lsn();
                    let actions = harness.core.append(Harness::request(Vec::new(), min_read_point, min_read_point), 1);
                    harness.complete_all(actions);
                }
                Step::Background => {
                    let actions = harness.core.background();
                    harness.complete_all(actions);
                }
                Step::Restart => {
                    harness.restart();
                }
                Step::Read { page, back } => {
                    let scl = harness.core.segment_complete_lsn();
                    let read_point = Lsn(scl.0.saturating_sub(back).max(min_read_point.0));
                    let mut expected = vec![0u8; PAGE_BYTES];
                    let mut expected_lsn = Lsn::ZERO;
                    for (lsn, (record_page, offset, data)) in log.range(..=read_point) {
                        if *record_page == page {
                            expected[*offset as usize..*offset as usize + data.len()].copy_from_slice(data);
                            expected_lsn = *lsn;
                        }
                    }
                    let (page_lsn, image) = harness.read(page, read_point).unwrap();
                    prop_assert_eq!(&image[..], &expected[..]);
                    prop_assert_eq!(page_lsn, expected_lsn);
                }
            }
        }
    }
}

/// ARCHITECTURE.md §11 quotes what each in-memory record costs: keep it true.
#[test]
fn a_record_in_memory_costs_what_the_docs_say() {
    assert_eq!(std::mem::size_of::<super::ChainRecord>(), 48, "a record in its page chain");
    assert_eq!(std::mem::size_of::<super::FileRecord>(), 16, "its entry in its log file's list");
}

/// Opening an epoch with a truncation list drops the records held inside
/// its ranges (SCL falls back below them), refuses them from then on, and
/// a restart replays the same: records logged before the list stay void,
/// the new writer's records (linking below the range) complete the chain.
#[test]
fn opening_an_epoch_voids_truncated_records_and_a_restart_agrees() {
    let mut harness = Harness::new();
    let lsns = harness.append_six_records_to_page_one();
    assert_eq!(harness.core.segment_complete_lsn(), lsns[5]);
    let truncations =
        vec![empty_truncation(Epoch::INITIAL), Truncation { epoch: Epoch(2), above: lsns[2], through: Lsn(103) }];
    let opened = harness.core.open_epoch(1, Epoch(2), truncations.clone(), 7);
    harness.complete_all(opened);
    let (_, status) = *harness.statuses.last().expect("answered once durable");
    assert!(status.is_open() && status.epoch == Epoch(2));
    assert_eq!((status.segment_complete_lsn, status.highest_durable_lsn), (lsns[2], lsns[2]));
    let page_at =
        |harness: &Harness, point: Lsn| harness.core.read_page(PageId(1), point, Epoch(2)).map(|(_, image)| image[0]);
    assert_eq!(page_at(&harness, lsns[2]), Ok(3), "records 1-3 stand");
    assert_eq!(page_at(&harness, lsns[5]).unwrap_err().code, ErrorCode::ReadPointAboveComplete);

    // The new writer allocates above the range; its first record links to
    // the PG's last record below it.
    let mut maker = RecordMaker { last_lsn: 103, last_segment: lsns[2], ..RecordMaker::default() };
    maker.last_page.insert(PageId(1), lsns[2]);
    let next = maker.make(1, 0, &[9; 16], 0);
    let mut request = Harness::request(vec![next.clone()], lsns[2], Lsn::ZERO);
    request.epoch = Epoch(2);
    let actions = harness.core.append(request.clone(), 1);
    harness.complete_all(actions);
    assert_eq!(harness.core.segment_complete_lsn(), next.lsn);
    assert_eq!(page_at(&harness, next.lsn), Ok(9));

    // A voided record sent again is refused.
    let mut old = RecordMaker { last_lsn: lsns[2].0, last_segment: lsns[2], ..RecordMaker::default() };
    old.last_page.insert(PageId(1), lsns[2]);
    request.records = vec![old.make(1, 0, &[4; 16], 0)];
    let refused = harness.core.append(request, 1);
    assert!(matches!(&refused[..], [Action::Refuse { error, .. }] if error.code == ErrorCode::InvalidRequest));

    let report = harness.restart();
    assert_eq!(report.segment_complete_lsn, next.lsn, "the chain links across the range after a restart");
    assert_eq!(harness.core.truncations(), &truncations[..]);
    assert_eq!(page_at(&harness, next.lsn), Ok(9));
    assert_eq!(page_at(&harness, lsns[2]), Ok(3));
    let mut between = (lsns[3].0..=lsns[5].0).map(|lsn| page_at(&harness, Lsn(lsn)));
    assert!(between.all(|read| read.is_ok_and(|byte| byte == 3)), "no voided record is ever applied");
}

/// A later writer's list replaces the segment's: a record voided by an
/// older range that the later writer vouched for (and sent again) is held,
/// also after a restart, while the older records stay void.
#[test]
fn records_sent_again_under_a_later_list_survive_a_restart() {
    let mut harness = Harness::new();
    let lsns = harness.append_six_records_to_page_one();
    let first =
        vec![empty_truncation(Epoch::INITIAL), Truncation { epoch: Epoch(2), above: lsns[2], through: Lsn(103) }];
    let opened = harness.core.open_epoch(1, Epoch(2), first, 7);
    harness.complete_all(opened);
    assert_eq!(harness.core.segment_complete_lsn(), lsns[2]);
    // Epoch 3 vouches for records 4 and 5 (it found them elsewhere) and truncates above 5.
    let second =
        vec![empty_truncation(Epoch::INITIAL), Truncation { epoch: Epoch(3), above: lsns[4], through: Lsn(105) }];
    let opened = harness.core.open_epoch(2, Epoch(3), second, 7);
    harness.complete_all(opened);
    let mut maker = RecordMaker { last_lsn: lsns[2].0, last_segment: lsns[2], ..RecordMaker::default() };
    maker.last_page.insert(PageId(1), lsns[2]);
    let again = vec![maker.make(1, 0, &[4; 16], 0), maker.make(1, 0, &[5; 16], 0)];
    let mut request = Harness::request(again, lsns[2], Lsn::ZERO);
    request.epoch = Epoch(3);
    let actions = harness.core.append(request, 1);
    harness.complete_all(actions);
    assert_eq!(harness.core.segment_complete_lsn(), lsns[4]);
    harness.restart();
    assert_eq!(harness.core.segment_complete_lsn(), lsns[4]);
    let (_, image) = harness.core.read_page(PageId(1), lsns[4], Epoch(3)).expect("complete");
    assert_eq!(image[0], 5);
}

/// A record whose log write was in flight when a truncation voided its LSN
/// is not taken when the write completes.
#[test]
fn a_write_in_flight_when_its_records_are_voided_does_not_bring_them_back() {
    let mut harness = Harness::new();
    let mut maker = RecordMaker::default();
    let kept = maker.make(1, 0, b"k", 0);
    harness.append(vec![kept.clone()], 1);
    let in_flight = harness.core.append(Harness::request(vec![maker.make(1, 0, b"v", 0)], Lsn::ZERO, Lsn::ZERO), 1);
    assert!(matches!(&in_flight[..], [Action::Write(_)]));
    let truncations = vec![Truncation { epoch: Epoch(2), above: kept.lsn, through: Lsn(100) }];
    let opening = harness.core.open_epoch(1, Epoch(2), truncations, 7);
    harness.complete_all(in_flight);
    harness.complete_all(opening);
    assert_eq!(harness.core.status(0).highest_durable_lsn, kept.lsn);
    harness.restart();
    assert_eq!(harness.core.status(0).highest_durable_lsn, kept.lsn, "the voided record stays void on restart");
}

/// A recovering writer (or a peer) reads the records above a point: in
/// LSN order, only up to SCL, paged by frame size, found the same way
/// whether the point is above the writer's VDL (the recent index) or below
/// it (every log file's list).
#[test]
fn fetched_records_come_in_order_up_to_scl_and_in_pages() {
    let mut harness = Harness::new();
    let mut maker = RecordMaker::default();
    let mut lsns = Vec::new();
    for _ in 0..85 {
        let batch: Vec<RedoRecord> = (0..100u64).map(|index| maker.make(index % 5, 0, b"r", 0)).collect();
        lsns.extend(batch.iter().map(|record| record.lsn));
        harness.append(batch, 1);
    }
    let hole = maker.make(9, 0, b"after", 1);
    harness.append(vec![maker.make(9, 0, b"beyond", 0)], 1); // parked: its predecessor never came
    let fetch = |harness: &Harness, above: Lsn| {
        let request =
            FetchRecordsRequest { request_id: 3, pg: PG, epoch: Epoch::INITIAL, above, through: Lsn(u64::MAX) };
        harness.core.fetch_records(&request).expect("same epoch")
    };
    let lsns_of = |batch: &RecordBatch| batch.records.iter().map(|record| record.lsn).collect::<Vec<_>>();
    let first = fetch(&harness, lsns[9]);
    assert!(first.more, "a batch holds at most RECORDS_PER_APPEND_MAX records");
    assert_eq!(lsns_of(&first), lsns[10..10 + RECORDS_PER_APPEND_MAX].to_vec());
    let rest = fetch(&harness, *lsns_of(&first).last().unwrap());
    assert!(!rest.more);
    assert_eq!(lsns_of(&rest), lsns[10 + RECORDS_PER_APPEND_MAX..].to_vec(), "everything above, up to SCL");
    assert!(hole.lsn > harness.core.segment_complete_lsn());
    // The writer's VDL passes the 8,000th record: `recent` is trimmed, the
    // log files' lists still find what lies below.
    let vdl = Harness::request(Vec::new(), lsns[8000], Lsn::ZERO);
    let actions = harness.core.append(vdl, 1);
    harness.complete_all(actions);
    let below_floor = fetch(&harness, lsns[8100]);
    assert_eq!(lsns_of(&below_floor), lsns[8101..].to_vec());
    let from_the_log = fetch(&harness, lsns[7990]);
    assert_eq!(lsns_of(&from_the_log), lsns[7991..].to_vec());
    let stale =
        FetchRecordsRequest { request_id: 3, pg: PG, epoch: Epoch(2), above: Lsn::ZERO, through: Lsn(u64::MAX) };
    assert_eq!(harness.core.fetch_records(&stale).unwrap_err().code, ErrorCode::UnknownEpoch);
}

/// Runs one gossip exchange of `asking` with `peer`, if one is due.
fn gossip_once(asking: &mut Harness, peer: &mut Harness) -> bool {
    let Some((index, request)) = asking.core.gossip_due(1) else { return false };
    assert_eq!(index, 0);
    let actions = match request {
        Message::FetchRecords(request) => {
            let batch = peer.core.fetch_records(&request).expect("same epoch");
            asking.core.gossip_received(batch)
        }
        Message::Hydrate(request) => {
            let batch = peer.core.hydrate(&request).expect("a peer that can serve");
            asking.core.hydrate_received(batch)
        }
        other => panic!("gossip sent {other:?}"),
    };
    asking.complete_all(actions);
    true
}

/// A segment with a hole in its chain fills it from a peer (without the
/// writer), and one that missed the end of the log learns it from a
/// peer's SCL and fetches it; the writer that appended last hears the new
/// SCL. Records a truncation voided are not taken from a peer that still
/// holds them.
#[test]
fn gossip_fills_holes_and_tails_from_a_peer() {
    let (mut holey, mut full) = (Harness::new(), Harness::new());
    let mut maker = RecordMaker::default();
    let records: Vec<RedoRecord> = (0..6u64).map(|index| maker.make(1 + index % 2, 0, &[index as u8; 4], 0)).collect();
    full.append(records.clone(), 1);
    holey.append(vec![records[0].clone(), records[1].clone(), records[4].clone(), records[5].clone()], 9);
    assert_eq!(holey.core.segment_complete_lsn(), records[1].lsn);
    assert!(gossip_once(&mut holey, &mut full), "a hole asks at once");
    assert_eq!(holey.core.segment_complete_lsn(), records[5].lsn, "filled: SCL jumps over the parked records");
    assert_eq!(holey.core.peer_repair_stats().records_received, 2);
    assert_eq!(holey.acks.last().map(|(to, ack)| (*to, ack.segment_complete_lsn)), Some((9, records[5].lsn)));
    assert!(!gossip_once(&mut holey, &mut full), "nothing is asked without a reason");

    // Behind with no hole: a probe finds the peer's SCL ahead, then the tail comes.
    let more: Vec<RedoRecord> = (0..3u64).map(|index| maker.make(3, 0, &[index as u8; 4], 0)).collect();
    full.append(more.clone(), 1);
    let mut rounds = 0;
    while holey.core.segment_complete_lsn() < more[2].lsn {
        gossip_once(&mut holey, &mut full);
        rounds += 1;
        assert!(rounds <= 2 * super::GOSSIP_PROBE_ROUNDS, "the tail never came");
    }
    let (_, image) = holey.read(3, more[2].lsn).expect("readable at the new SCL");
    assert_eq!(image[..4], [2u8; 4]);
}

/// A peer that never applied a truncation still holds the voided records;
/// a segment that applied it does not take them from that peer.
#[test]
fn gossip_never_brings_back_a_voided_record() {
    let (mut opened, mut stale) = (Harness::new(), Harness::new());
    let mut maker = RecordMaker::default();
    let records: Vec<RedoRecord> = (0..4u64).map(|index| maker.make(1, 0, &[index as u8; 4], 0)).collect();
    stale.append(records.clone(), 1);
    opened.append(records[..2].to_vec(), 1);
    // Both are sealed at epoch 2; only `opened` gets the list voiding 3 and 4.
    let seal = stale.core.seal(1, Epoch(2), 5);
    stale.complete_all(seal);
    let truncations = vec![Truncation { epoch: Epoch(2), above: records[1].lsn, through: Lsn(100) }];
    let open = opened.core.open_epoch(1, Epoch(2), truncations, 5);
    opened.complete_all(open);
    // `opened` believes it is behind (a peer reported a higher SCL)...
    for _ in 0..super::GOSSIP_PROBE_ROUNDS * 2 {
        gossip_once(&mut opened, &mut stale);
    }
    assert_eq!(opened.core.segment_complete_lsn(), records[1].lsn, "the voided records were not taken");
    assert_eq!(opened.core.peer_repair_stats().records_received, 0);
}

/// Appends `count` records over pages 0..8 with the writer's VDL and MRPL
/// following along, so the segment coalesces pages and collects the
/// records its versions subsume.
fn write_and_collect(harness: &mut Harness, maker: &mut RecordMaker, count: u64) -> Lsn {
    let mut last = Lsn::ZERO;
    for index in 0..count {
        let record = maker.make(index % 8, (index % 16) as u32 * 8, &index.to_le_bytes(), 0);
        last = record.lsn;
        let actions = harness.core.append(Harness::request(vec![record], last, last), 1);
        harness.complete_all(actions);
    }
    for _ in 0..8 {
        let actions = harness.core.background();
        harness.complete_all(actions);
    }
    last
}

/// A segment behind a peer that collected the records it lacks cannot be
/// brought up by records: it rebuilds from the peer's page state
/// (hydration, in batches), then serves every page as the peer does, also
/// after a restart; an empty segment does the same, as a new replica would.
#[test]
fn a_segment_too_far_behind_hydrates_from_a_peer() {
    let (mut behind, mut peer) = (Harness::new(), Harness::new());
    let mut maker = RecordMaker::default();
    let early = write_and_collect(&mut peer, &mut maker, 10);
    let mut early_maker = RecordMaker::default();
    write_and_collect(&mut behind, &mut early_maker, 10);
    assert_eq!(behind.core.segment_complete_lsn(), early);
    let last = write_and_collect(&mut peer, &mut maker, 400);
    assert!(peer.core.record_count() < 400, "the peer collected records: {}", peer.core.record_count());
    let mut rounds = 0;
    while behind.core.segment_complete_lsn() < last {
        gossip_once(&mut behind, &mut peer);
        rounds += 1;
        assert!(rounds < 1000, "never caught up: SCL {}", behind.core.segment_complete_lsn());
    }
    let stats = behind.core.peer_repair_stats();
    assert_eq!(stats.hydrations_completed, 1, "one hydration");
    assert!(stats.hydrated_bytes > 0);
    assert_eq!(stats.records_received, 0, "records alone could not do it");
    let compare = |behind: &Harness, peer: &Harness| {
        for page in 0..8 {
            let ours = behind.core.read_page(PageId(page), last, Epoch::INITIAL).expect("readable");
            let theirs = peer.core.read_page(PageId(page), last, Epoch::INITIAL).expect("readable");
            assert_eq!(ours, theirs, "page {page}");
        }
    };
    compare(&behind, &peer);
    behind.restart();
    assert_eq!(behind.core.segment_complete_lsn(), last, "the jump survives a restart");
    compare(&behind, &peer);

    let mut fresh = Harness::new();
    fresh.core.gossip_hydrate_now();
    let mut rounds = 0;
    while fresh.core.segment_complete_lsn() < last {
        gossip_once(&mut fresh, &mut peer);
        rounds += 1;
        assert!(rounds < 1000, "the new replica never caught up");
    }
    compare(&fresh, &peer);
}

/// A repair's log write takes every received hydrate batch that fits: two
/// 3 MiB batches waiting behind a write go out together in the next one
/// (one fdatasync for both), and the repaired segment still serves every
/// page as its peer does, also after a restart.
#[test]
fn a_repair_logs_the_hydrate_batches_waiting_in_one_write() {
    let large = SegmentConfig { log_file_bytes: 32 * 1024 * 1024, ..SegmentConfig::new(PG, 8192, 1 << 20) };
    let (mut fresh, mut peer) = (Harness::with_config(large.clone()), Harness::with_config(large));
    let mut maker = RecordMaker::default();
    let pages = 1300u64; // a little over three batches of whole-page records
    for first in (0..pages).step_by(100) {
        let records = (first..first + 100).map(|page| maker.make(page, 0, &[page as u8; 8192], 0)).collect();
        peer.append(records, 1);
    }
    let through = peer.core.segment_complete_lsn();
    fresh.core.gossip_hydrate_now();
    let mut serve = |request: Option<(usize, Message)>| match request {
        Some((_, Message::Hydrate(request))) => peer.core.hydrate(&request).expect("the peer serves"),
        other => panic!("expected a hydrate request, got {other:?}"),
    };
    // The first batch's write stays on the disk while two more arrive.
    let first = serve(fresh.core.gossip_due(1));
    let on_the_disk = fresh.core.hydrate_received(first);
    assert!(matches!(on_the_disk.as_slice(), [Action::Write(_)]), "the first batch is written at once");
    for _ in 0..2 {
        let batch = serve(fresh.core.catch_up_request_due(1));
        assert!(fresh.core.hydrate_received(batch).is_empty(), "a batch waits behind the write in flight");
    }
    fresh.complete_all(on_the_disk);
    let sizes: Vec<usize> = fresh.writes.iter().map(|write| write.bytes.len()).collect();
    assert_eq!(sizes.len(), 2, "the two waiting batches went out in one write: {sizes:?}");
    assert!(sizes[1] > HYDRATE_BATCH_BYTES_MAX && sizes[1] <= LOG_BATCH_BYTES_MAX, "write sizes {sizes:?}");
    let mut rounds = 0;
    while fresh.core.segment_complete_lsn() < through {
        let batch = serve(fresh.core.catch_up_request_due(1).or_else(|| fresh.core.gossip_due(1)));
        let actions = fresh.core.hydrate_received(batch);
        fresh.complete_all(actions);
        rounds += 1;
        assert!(rounds < 10, "the repair never finished");
    }
    for restarted in [false, true] {
        if restarted {
            fresh.restart();
        }
        for page in (0..pages).step_by(97) {
            let ours = fresh.core.read_page(PageId(page), through, Epoch::INITIAL).expect("readable");
            assert_eq!(ours, peer.core.read_page(PageId(page), through, Epoch::INITIAL).expect("readable"));
        }
    }
}

/// A corrupt record in the middle of the log marks the segment as needing
/// repair; it hydrates from a peer on its own, and then serves the pages
/// the corruption had made unreadable.
#[test]
fn a_corrupt_segment_repairs_itself_from_a_peer() {
    let (mut corrupt, mut peer) = (Harness::new(), Harness::new());
    let lsns = corrupt.append_six_records_to_page_one();
    peer.append_six_records_to_page_one();
    corrupt.corrupt_payload(&[3u8; 16]);
    corrupt.restart();
    assert!(corrupt.core.status(0).needs_repair);
    assert!(corrupt.read(1, lsns[5]).is_err());
    let mut rounds = 0;
    while corrupt.core.status(0).needs_repair {
        gossip_once(&mut corrupt, &mut peer);
        rounds += 1;
        assert!(rounds < 100, "the repair never finished");
    }
    assert_eq!(corrupt.read(1, lsns[5]), peer.read(1, lsns[5]));
    assert_eq!(corrupt.core.segment_complete_lsn(), lsns[5]);
}
