use super::*;
use crate::disk::{LogDisk, MemoryDisk};
use crate::log_format::scan_log;

const PG: PgId = PgId(0);

/// A block segment on a memory disk whose writes complete at once, unless
/// `hold_writes` keeps them in flight.
struct Harness {
    core: BlockSegmentCore,
    disk: MemoryDisk,
    held: Vec<LogWrite>,
    hold_writes: bool,
    sent: Vec<(ReplyTo, Message)>,
}

fn config() -> BlockSegmentConfig {
    BlockSegmentConfig {
        log_file_bytes: 2 * 1024 * 1024,
        log_files_target: 3,
        ..BlockSegmentConfig::new(PG, 1 << 20, 4096)
    }
}

impl Harness {
    fn new(config: BlockSegmentConfig) -> Harness {
        let (core, actions) = BlockSegmentCore::create(config).unwrap();
        let mut harness =
            Harness { core, disk: MemoryDisk::new(), held: Vec::new(), hold_writes: false, sent: Vec::new() };
        harness.run(actions);
        harness
    }

    fn run(&mut self, actions: Vec<BlockAction>) {
        let mut pending = actions;
        while !pending.is_empty() {
            let mut next = Vec::new();
            for action in pending {
                match action {
                    BlockAction::Write(write) if self.hold_writes => self.held.push(write),
                    BlockAction::Write(write) => {
                        let id = write.id;
                        self.disk.write_durable(write, Box::new(|_| {})).unwrap().unwrap();
                        next.extend(self.core.write_done(id));
                    }
                    BlockAction::Send { to, message } => self.sent.push((to, message)),
                    BlockAction::DeleteFile(file) => self.disk.delete_file(file).unwrap(),
                }
            }
            pending = next;
        }
    }

    fn release_held(&mut self) {
        self.hold_writes = false;
        for write in std::mem::take(&mut self.held) {
            let id = write.id;
            self.disk.write_durable(write, Box::new(|_| {})).unwrap().unwrap();
            let actions = self.core.write_done(id);
            self.run(actions);
        }
    }

    fn write(&mut self, block: u64, version: u64, epoch: u64, token: u64, data: &'static [u8]) -> Message {
        self.write_as(block, version, epoch, token, data, false)
    }

    fn write_as(
        &mut self,
        block: u64,
        version: u64,
        epoch: u64,
        token: u64,
        data: &'static [u8],
        repair: bool,
    ) -> Message {
        let request = BlockWrite {
            request_id: block * 1000 + version,
            pg: PG,
            block: BlockId(block),
            version,
            lease_epoch: epoch,
            fencing_token: token,
            repair,
            data: Bytes::from_static(data),
        };
        let actions = self.core.write(request, 1);
        self.run(actions);
        self.sent.pop().map(|(_, message)| message).expect("the write was answered")
    }

    fn fence(&mut self, epoch: u64, phase: FencePhase) -> Message {
        let request = FenceRequest { request_id: 9, pg: PG, lease_epoch: epoch, phase, from_block: BlockId(0) };
        let actions = self.core.fence(request, 2);
        self.run(actions);
        self.sent.pop().map(|(_, message)| message).expect("the fence was answered")
    }

    fn read(&self, block: u64, want_token: u64) -> BlockImage {
        let request = BlockRead { request_id: 1, pg: PG, block: BlockId(block), want_token, sealed_cursor: 0 };
        match self.core.read(&request) {
            Message::BlockImage(image) => image,
            other => panic!("read refused: {other:?}"),
        }
    }

    fn restart(&self) -> BlockSegmentCore {
        let (core, corruptions) =
            BlockSegmentCore::recover(self.core.config.clone(), scan_log(&self.disk.read_all().unwrap())).unwrap();
        assert_eq!(corruptions, 0);
        core
    }
}

fn error_code(message: &Message) -> Option<ErrorCode> {
    match message {
        Message::Error(error) => Some(error.code),
        _ => None,
    }
}

fn is_ack(message: &Message) -> bool {
    matches!(message, Message::BlockWriteAck(_))
}

#[test]
fn a_write_is_acknowledged_only_after_its_fdatasync_then_read_back() {
    let mut harness = Harness::new(config());
    harness.hold_writes = true;
    let request = BlockWrite {
        request_id: 5,
        pg: PG,
        block: BlockId(7),
        version: 1,
        lease_epoch: 3,
        fencing_token: 10,
        repair: false,
        data: Bytes::from_static(b"hello"),
    };
    let actions = harness.core.write(request, 1);
    harness.run(actions);
    assert!(harness.sent.is_empty(), "nothing is acknowledged before the write is durable");
    assert!(harness.read(7, 0).history.is_empty(), "reads serve durable state only");
    harness.release_held();
    assert!(is_ack(&harness.sent.pop().unwrap().1));
    let image = harness.read(7, 0);
    assert_eq!(&image.data[..], b"hello");
    assert_eq!((image.history[0].version, image.history[0].fencing_token, image.data_token), (1, 10, 10));
}

#[test]
fn older_tokens_are_refused_and_the_newest_version_per_token_is_kept() {
    let mut harness = Harness::new(config());
    assert!(is_ack(&harness.write(1, 1, 3, 10, b"a")));
    assert!(is_ack(&harness.write(1, 2, 3, 10, b"b")));
    // A reordered older version under the same grant is covered by the newer one.
    assert!(is_ack(&harness.write(1, 1, 3, 10, b"a")));
    assert_eq!(&harness.read(1, 0).data[..], b"b");
    // A later grant wins, even with a lower version number.
    assert!(is_ack(&harness.write(1, 1, 4, 11, b"c")));
    assert_eq!(error_code(&harness.write(1, 9, 3, 10, b"late")), Some(ErrorCode::StaleFencingToken));
    let image = harness.read(1, 0);
    assert_eq!(&image.data[..], b"c");
    let keys: Vec<(u64, u64)> = image.history.iter().map(BlockVersionInfo::key).collect();
    assert_eq!(keys, vec![(11, 1), (10, 2)]);
    assert_eq!(&harness.read(1, 10).data[..], b"b", "an older version is still served by its token");
}

#[test]
fn history_keeps_the_newest_versions_of_the_last_few_grants() {
    let mut harness = Harness::new(config());
    for token in 1..=(BLOCK_HISTORY_MAX as u64 + 2) {
        assert!(is_ack(&harness.write(3, 1, 1, token, b"x")));
    }
    let tokens: Vec<u64> = harness.read(3, 0).history.iter().map(|version| version.fencing_token).collect();
    let expected: Vec<u64> = (3..=(BLOCK_HISTORY_MAX as u64 + 2)).rev().collect();
    assert_eq!(tokens, expected);
    // A repair of a grant older than the history keeps nothing new.
    assert_eq!(error_code(&harness.write_as(3, 1, 1, 1, b"x", true)), Some(ErrorCode::Superseded));
    assert_eq!(harness.read(3, 0).history.len(), BLOCK_HISTORY_MAX);
}

#[test]
fn a_fenced_epoch_is_refused_from_the_moment_its_fence_is_queued() {
    let mut harness = Harness::new(config());
    assert!(is_ack(&harness.write(1, 1, 5, 10, b"before")));
    assert!(is_ack(&harness.write(2, 1, 6, 20, b"other clerk")));
    harness.hold_writes = true;
    let request =
        FenceRequest { request_id: 9, pg: PG, lease_epoch: 5, phase: FencePhase::Fence, from_block: BlockId(0) };
    let actions = harness.core.fence(request, 2);
    harness.run(actions);
    assert!(harness.sent.is_empty(), "the fence is acknowledged only once durable");
    assert_eq!(error_code(&harness.write(1, 2, 5, 10, b"late")), Some(ErrorCode::FencedEpoch));
    harness.release_held();
    let Message::FenceAck(ack) = harness.sent.pop().unwrap().1 else { panic!("expected a fence ack") };
    assert_eq!(ack.blocks, vec![FencedBlock { block: BlockId(1), version: 1, fencing_token: 10 }]);
    assert!(ack.complete);
    assert_eq!(error_code(&harness.write(3, 1, 5, 10, b"late")), Some(ErrorCode::FencedEpoch));
    assert!(is_ack(&harness.write(2, 2, 6, 20, b"live")), "other epochs still write");
    // What the epoch wrote in time is still served; it is not a repaired copy.
    let image = harness.read(1, 0);
    assert_eq!(&image.data[..], b"before");
    assert!(!image.history[0].repaired);
    // A seal's repair of that epoch's version is taken and marked, also where
    // the version is held already.
    assert!(is_ack(&harness.write_as(4, 1, 5, 10, b"repaired", true)));
    assert!(harness.read(4, 0).history[0].repaired);
    assert!(is_ack(&harness.write_as(1, 1, 5, 10, b"before", true)));
    assert!(harness.read(1, 0).history[0].repaired);
    assert_eq!(harness.core.fenced(), &[5]);
    let restarted = harness.restart();
    let request = BlockRead { request_id: 1, pg: PG, block: BlockId(1), want_token: 0, sealed_cursor: 0 };
    assert_eq!(restarted.read(&request), harness.core.read(&request), "the repaired mark is in the log");
}

/// A segment that missed the fence takes a late write, and only then hears
/// of the fence: the late write must not pass for one taken in time.
#[test]
fn a_late_write_taken_before_a_straggling_fence_is_not_trusted() {
    let mut harness = Harness::new(config());
    assert!(is_ack(&harness.write(1, 1, 5, 10, b"in time")));
    assert!(is_ack(&harness.write(1, 2, 5, 10, b"late")));
    assert!(matches!(harness.fence(5, FencePhase::Fence), Message::FenceAck(_)));
    assert!(matches!(harness.fence(5, FencePhase::Sealed), Message::FenceAck(_)));
    let image = harness.read(1, 0);
    assert!(!image.history[0].repaired);
    let sealed: IdHashSet<u64> = image.sealed.iter().copied().collect();
    assert_eq!(crate::block_client::choose_current(&[(0, image)], &sealed), None, "nothing trusted here");
}

/// A fence is never logged ahead of a write of its epoch queued before it,
/// so its acknowledgement lists that write.
#[test]
fn a_fence_waits_for_the_writes_queued_before_it() {
    let mut harness = Harness::new(BlockSegmentConfig { log_file_bytes: 64 * 1024 * 1024, ..config() });
    harness.hold_writes = true;
    static DATA: [u8; 4096] = [1; 4096];
    // More queued than one log write takes (2 MiB), all of epoch 1.
    for block in 0..700u64 {
        let request = BlockWrite {
            request_id: block,
            pg: PG,
            block: BlockId(block),
            version: 1,
            lease_epoch: 1,
            fencing_token: 1,
            repair: false,
            data: Bytes::from_static(&DATA),
        };
        let actions = harness.core.write(request, 1);
        harness.run(actions);
    }
    let request =
        FenceRequest { request_id: 9, pg: PG, lease_epoch: 1, phase: FencePhase::Fence, from_block: BlockId(0) };
    let actions = harness.core.fence(request, 2);
    harness.run(actions);
    harness.release_held();
    let mut listed = 0;
    for (to, message) in &harness.sent {
        if let (2, Message::FenceAck(ack)) = (to, message) {
            listed = ack.blocks.len();
        }
    }
    assert_eq!(listed, 700, "the fence lists every write queued before it");
}

#[test]
fn a_seal_needs_its_fence_and_is_listed_to_readers_from_their_cursor() {
    let mut harness = Harness::new(config());
    assert_eq!(error_code(&harness.fence(5, FencePhase::Sealed)), Some(ErrorCode::InvalidRequest));
    for epoch in [5, 8] {
        assert!(matches!(harness.fence(epoch, FencePhase::Fence), Message::FenceAck(_)));
        assert!(matches!(harness.fence(epoch, FencePhase::Sealed), Message::FenceAck(_)));
    }
    assert_eq!(harness.read(0, 0).sealed, vec![5, 8]);
    let request = BlockRead { request_id: 1, pg: PG, block: BlockId(0), want_token: 0, sealed_cursor: 1 };
    let Message::BlockImage(image) = harness.core.read(&request) else { panic!() };
    assert_eq!((image.sealed_cursor, image.sealed), (1, vec![8]));
    // Fencing again is idempotent: acknowledged at once, nothing logged twice.
    let again =
        FenceRequest { request_id: 9, pg: PG, lease_epoch: 5, phase: FencePhase::Fence, from_block: BlockId(0) };
    let actions = harness.core.fence(again, 2);
    assert!(!actions.iter().any(|action| matches!(action, BlockAction::Write(_))), "a repeated fence is not logged");
    assert!(actions.iter().any(|action| matches!(action, BlockAction::Send { message: Message::FenceAck(_), .. })));
    assert_eq!(harness.core.fenced(), &[5, 8]);
}

#[test]
fn a_fence_ack_lists_every_block_of_the_epoch_in_pages() {
    let mut harness = Harness::new(BlockSegmentConfig { log_file_bytes: 64 * 1024 * 1024, ..config() });
    let blocks = FENCE_ACK_BLOCKS_MAX as u64 + 5;
    for block in 0..blocks {
        assert!(is_ack(&harness.write(block, 1, 5, 10, b"")));
    }
    let Message::FenceAck(first) = harness.fence(5, FencePhase::Fence) else { panic!() };
    assert!(!first.complete);
    assert_eq!(first.blocks.len(), FENCE_ACK_BLOCKS_MAX);
    let next = BlockId(first.blocks.last().unwrap().block.0 + 1);
    let request = FenceRequest { request_id: 10, pg: PG, lease_epoch: 5, phase: FencePhase::Fence, from_block: next };
    let actions = harness.core.fence(request, 2);
    harness.run(actions);
    let Message::FenceAck(second) = harness.sent.pop().unwrap().1 else { panic!() };
    assert!(second.complete);
    let listed: Vec<u64> = first.blocks.iter().chain(&second.blocks).map(|fenced| fenced.block.0).collect();
    assert_eq!(listed, (0..blocks).collect::<Vec<u64>>());
}

#[test]
fn fences_seals_and_histories_survive_a_restart_and_log_cleaning() {
    let mut harness = Harness::new(BlockSegmentConfig { log_file_bytes: 256 * 1024, log_files_target: 2, ..config() });
    harness.fence(5, FencePhase::Fence);
    harness.fence(5, FencePhase::Sealed);
    static DATA: [u8; 4096] = [7; 4096];
    // Enough overwrites to roll through many files: the cleaner must copy the
    // live versions forward and keep the fences in its checkpoints.
    for round in 1..=80u64 {
        for block in 0..8u64 {
            assert!(is_ack(&harness.write(block, round, 6, 10 + round / 40, &DATA)));
        }
        let actions = harness.core.background();
        harness.run(actions);
    }
    let files = harness.disk.read_all().unwrap();
    assert!(files.first().unwrap().0 > 1, "the cleaner freed the first log files");
    assert!(files.len() <= 4, "the log stays near its target: {} files", files.len());
    let restarted = harness.restart();
    assert_eq!(restarted.fenced(), &[5]);
    assert_eq!(restarted.sealed(), &[5]);
    for block in 0..8u64 {
        let request = BlockRead { request_id: 1, pg: PG, block: BlockId(block), want_token: 0, sealed_cursor: 0 };
        assert_eq!(restarted.read(&request), harness.core.read(&request), "block {block} after restart");
    }
}

#[test]
fn bad_requests_are_refused_with_a_reason() {
    let mut harness = Harness::new(BlockSegmentConfig { blocks_per_pg: 16, ..config() });
    assert_eq!(error_code(&harness.write(16, 1, 1, 1, b"x")), Some(ErrorCode::InvalidRequest));
    static BIG: [u8; 4097] = [0; 4097];
    assert_eq!(error_code(&harness.write(1, 1, 1, 1, &BIG)), Some(ErrorCode::InvalidRequest));
    assert!(BlockSegmentCore::create(BlockSegmentConfig { block_bytes_max: BLOCK_BYTES_MAX + 1, ..config() }).is_err());
}
