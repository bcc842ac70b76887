//! A workstation's metadata write-ahead log, as pure data structures
//! (F97 §4): what goes into each log block, how the end of the log is found
//! after a crash, when the oldest quarter may be reclaimed, and which
//! logged updates replay changes.
//!
//! The log is the workstation's region of `log_blocks` blocks
//! ([`crate::layout::Layout::log_block`]), used circularly: the log block
//! with sequence number `s` lives at index `s mod log_blocks`. A
//! transaction (the records of one file-system operation) never straddles
//! two log blocks, and a block is written whole, so a transaction is either
//! in the log or not. Sequence numbers only grow, so the end of the log is
//! where they stop growing. The caller writes log blocks in sequence order,
//! each once the one before is durable, so the live log has no gaps; a gap
//! ends it.
//!
//! ## A log block (4 KiB)
//! ```text
//! offset  size  field
//!      0     4  magic "FLOG"
//!      4     4  crc32c over bytes 8..(32 + records_bytes)
//!      8     8  sequence       this block's sequence number (from 1)
//!     16     8  oldest_live    the oldest sequence still live when written
//!     24     2  transactions   in this block
//!     26     2  records_bytes  bytes of records after the header
//!     28     4  reserved (0)
//!     32     n  transactions: count u16, then `count` records of
//!               block u64, version u64, offset u16, length u16, bytes
//! ```
//! A record says: metadata block `block` becomes version `version`, with
//! `length` bytes at `offset` replaced. Replay applies it only if the
//! block's version is older, so replaying a log twice, or replaying a
//! stale log over newer work, changes nothing.

use crate::layout::SMALL_BLOCK_BYTES;
use std::collections::BTreeMap;
use thiserror::Error;

const MAGIC: [u8; 4] = *b"FLOG";
const HEADER_BYTES: usize = 32;
const RECORD_HEADER_BYTES: usize = 20;
/// Bytes for transactions in one log block.
pub const LOG_BLOCK_PAYLOAD_BYTES: usize = SMALL_BLOCK_BYTES - HEADER_BYTES;

/// One logged metadata update.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub block: u64,
    /// The version the block has after the update.
    pub version: u64,
    pub offset: u16,
    pub bytes: Vec<u8>,
}

impl Record {
    fn encoded_len(&self) -> usize {
        RECORD_HEADER_BYTES + self.bytes.len()
    }
}

/// Why the log refused something.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum WalError {
    #[error("a transaction of {0} bytes does not fit in one log block ({LOG_BLOCK_PAYLOAD_BYTES})")]
    TransactionTooLarge(usize),
    #[error("the log is full: write back the metadata of its oldest blocks, then reclaim them")]
    Full,
}

/// A log block to write: its index in the log region and its image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogBlockWrite {
    pub index: u32,
    pub sequence: u64,
    pub image: Vec<u8>,
}

fn transaction_len(records: &[Record]) -> usize {
    2 + records.iter().map(Record::encoded_len).sum::<usize>()
}

/// The writing side of one workstation's log.
#[derive(Clone, Debug)]
pub struct LogWriter {
    log_blocks: u32,
    /// Sequence of the block being filled (not yet written, or written and
    /// still open for more transactions).
    current: u64,
    current_transactions: Vec<Vec<Record>>,
    /// The oldest sequence not reclaimed.
    oldest_live: u64,
    /// Per live log block: the metadata versions it carries.
    covers: BTreeMap<u64, Vec<(u64, u64)>>,
}

impl LogWriter {
    /// A log that starts empty (a new volume), or continues after
    /// [`scan`] found `next` as the next sequence and `oldest_live`.
    pub fn new(log_blocks: u32, next: u64, oldest_live: u64) -> LogWriter {
        assert!(log_blocks >= 4 && next >= 1 && oldest_live <= next);
        LogWriter { log_blocks, current: next, current_transactions: Vec::new(), oldest_live, covers: BTreeMap::new() }
    }

    fn current_bytes(&self) -> usize {
        self.current_transactions.iter().map(|transaction| transaction_len(transaction)).sum()
    }

    fn live_blocks(&self) -> u64 {
        self.current - self.oldest_live + 1
    }

    /// Adds a transaction to the open log block, starting the next block if
    /// it does not fit. Returns the block that was closed, to be written.
    pub fn append(&mut self, records: Vec<Record>) -> Result<Option<LogBlockWrite>, WalError> {
        let length = transaction_len(&records);
        if length > LOG_BLOCK_PAYLOAD_BYTES || records.len() > u16::MAX as usize {
            return Err(WalError::TransactionTooLarge(length));
        }
        let mut closed = None;
        if self.current_bytes() + length > LOG_BLOCK_PAYLOAD_BYTES {
            if self.live_blocks() >= u64::from(self.log_blocks) {
                return Err(WalError::Full);
            }
            closed = Some(self.image());
            self.current += 1;
            self.current_transactions.clear();
        }
        let covered = self.covers.entry(self.current).or_default();
        covered.extend(records.iter().map(|record| (record.block, record.version)));
        self.current_transactions.push(records);
        Ok(closed)
    }

    /// The open block as it is now, to write on a flush (sync, revoke, timer).
    /// It stays open: later transactions rewrite it with more in it.
    pub fn flush(&self) -> Option<LogBlockWrite> {
        (!self.current_transactions.is_empty()).then(|| self.image())
    }

    fn image(&self) -> LogBlockWrite {
        let mut image = Vec::with_capacity(SMALL_BLOCK_BYTES);
        image.extend_from_slice(&MAGIC);
        image.extend_from_slice(&[0; 4]);
        image.extend_from_slice(&self.current.to_le_bytes());
        image.extend_from_slice(&self.oldest_live.to_le_bytes());
        image.extend_from_slice(&(self.current_transactions.len() as u16).to_le_bytes());
        image.extend_from_slice(&(self.current_bytes() as u16).to_le_bytes());
        image.extend_from_slice(&[0; 4]);
        for transaction in &self.current_transactions {
            image.extend_from_slice(&(transaction.len() as u16).to_le_bytes());
            for record in transaction {
                image.extend_from_slice(&record.block.to_le_bytes());
                image.extend_from_slice(&record.version.to_le_bytes());
                image.extend_from_slice(&record.offset.to_le_bytes());
                image.extend_from_slice(&(record.bytes.len() as u16).to_le_bytes());
                image.extend_from_slice(&record.bytes);
            }
        }
        let checksum = crc32c::crc32c(&image[8..]);
        image[4..8].copy_from_slice(&checksum.to_le_bytes());
        image.resize(SMALL_BLOCK_BYTES, 0);
        let index = (self.current % u64::from(self.log_blocks)) as u32;
        LogBlockWrite { index, sequence: self.current, image }
    }

    /// The oldest quarter of the log (at least one block), and the metadata
    /// versions it carries: write those back, then call [`Self::reclaim`].
    pub fn oldest_quarter(&self) -> (u64, Vec<(u64, u64)>) {
        let quarter = (u64::from(self.log_blocks) / 4).max(1).min(self.current - self.oldest_live);
        let through = self.oldest_live + quarter;
        let versions = self.covers.range(self.oldest_live..through).flat_map(|(_, covered)| covered.clone()).collect();
        (through, versions)
    }

    /// Frees the log blocks below `through`, whose metadata the caller wrote back.
    pub fn reclaim(&mut self, through: u64) {
        assert!(through <= self.current, "the open block cannot be reclaimed");
        self.oldest_live = self.oldest_live.max(through);
        self.covers = self.covers.split_off(&self.oldest_live);
    }
}

/// What a scan of a log region found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Replay {
    /// Live transactions, oldest first.
    pub transactions: Vec<Vec<Record>>,
    /// The sequence the next log block gets.
    pub next_sequence: u64,
    /// The oldest live sequence recorded by the newest block.
    pub oldest_live: u64,
}

fn parse(image: &[u8]) -> Option<(u64, u64, Vec<Vec<Record>>)> {
    if image.len() < HEADER_BYTES || image[..4] != MAGIC {
        return None;
    }
    let u16_at = |at: usize| u16::from_le_bytes(image[at..at + 2].try_into().expect("two bytes"));
    let u64_at = |at: usize| u64::from_le_bytes(image[at..at + 8].try_into().expect("eight bytes"));
    let records_bytes = usize::from(u16_at(26));
    let end = HEADER_BYTES + records_bytes;
    if end > image.len() || crc32c::crc32c(&image[8..end]) != u32::from_le_bytes(image[4..8].try_into().ok()?) {
        return None;
    }
    let (sequence, oldest_live) = (u64_at(8), u64_at(16));
    let mut transactions = Vec::new();
    let mut at = HEADER_BYTES;
    for _ in 0..u16_at(24) {
        let count = usize::from(u16::from_le_bytes(image.get(at..at + 2)?.try_into().ok()?));
        at += 2;
        let mut records = Vec::with_capacity(count);
        for _ in 0..count {
            let header = image.get(at..at + RECORD_HEADER_BYTES)?;
            let length = usize::from(u16::from_le_bytes(header[18..20].try_into().ok()?));
            let bytes = image.get(at + RECORD_HEADER_BYTES..at + RECORD_HEADER_BYTES + length)?.to_vec();
            records.push(Record {
                block: u64::from_le_bytes(header[0..8].try_into().ok()?),
                version: u64::from_le_bytes(header[8..16].try_into().ok()?),
                offset: u16::from_le_bytes(header[16..18].try_into().ok()?),
                bytes,
            });
            at += RECORD_HEADER_BYTES + length;
        }
        transactions.push(records);
    }
    (at == end).then_some((sequence, oldest_live, transactions))
}

/// Reads a log region back (`blocks[i]` is log block `i`, `None` if never
/// written): the end is the highest sequence in a valid block at its
/// place; the live transactions run from the `oldest_live` that block
/// recorded, through contiguous sequence numbers, to the end.
pub fn scan(blocks: &[Option<Vec<u8>>]) -> Replay {
    let log_blocks = blocks.len() as u64;
    let mut by_sequence: BTreeMap<u64, (u64, Vec<Vec<Record>>)> = BTreeMap::new();
    for (index, image) in blocks.iter().enumerate() {
        if let Some((sequence, oldest_live, transactions)) = image.as_deref().and_then(parse)
            && sequence >= 1
            && sequence % log_blocks == index as u64
        {
            by_sequence.insert(sequence, (oldest_live, transactions));
        }
    }
    let Some((&end, (oldest_live, _))) = by_sequence.iter().next_back() else {
        return Replay { transactions: Vec::new(), next_sequence: 1, oldest_live: 1 };
    };
    let oldest_live = (*oldest_live).max(end.saturating_sub(log_blocks - 1)).max(1);
    let mut transactions = Vec::new();
    // Only a contiguous run ending at `end` is the log: an older block that
    // a gap separates from it was reclaimed, or is from an earlier lap.
    let mut start = end;
    while start > oldest_live && by_sequence.contains_key(&(start - 1)) {
        start -= 1;
    }
    for (_, (_, block)) in by_sequence.range(start..=end) {
        transactions.extend(block.iter().cloned());
    }
    Replay { transactions, next_sequence: end + 1, oldest_live: start }
}

/// The records of `transactions` that replay changes, given each block's
/// current version (`version_of`): those newer than the block, in log order
/// (an update logged as several spans is several records of one version).
pub fn to_apply(transactions: &[Vec<Record>], mut version_of: impl FnMut(u64) -> u64) -> Vec<Record> {
    let mut current: BTreeMap<u64, u64> = BTreeMap::new();
    transactions
        .iter()
        .flatten()
        .filter(|record| record.version > *current.entry(record.block).or_insert_with(|| version_of(record.block)))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(block: u64, version: u64, byte: u8) -> Record {
        Record { block, version, offset: 8, bytes: vec![byte; 100] }
    }

    /// Writes `writes` into a region the way the block store would.
    fn region(log_blocks: u32, writes: &[LogBlockWrite]) -> Vec<Option<Vec<u8>>> {
        let mut blocks = vec![None; log_blocks as usize];
        for write in writes {
            blocks[write.index as usize] = Some(write.image.clone());
        }
        blocks
    }

    #[test]
    fn transactions_come_back_in_order_and_the_end_is_where_sequences_drop() {
        let mut log = LogWriter::new(8, 1, 1);
        let mut writes = Vec::new();
        let mut expected = Vec::new();
        for n in 0..100u64 {
            let transaction = vec![record(n % 7, n + 1, n as u8), record(100 + n, n + 1, 1)];
            expected.push(transaction.clone());
            match log.append(transaction) {
                Ok(closed) => writes.extend(closed),
                Err(WalError::Full) => unreachable!("reclaimed in time"),
                Err(other) => panic!("{other}"),
            }
            if log.live_blocks() >= 6 {
                let (through, _) = log.oldest_quarter();
                log.reclaim(through);
            }
        }
        writes.extend(log.flush());
        let replay = scan(&region(8, &writes));
        assert_eq!(replay.next_sequence, log.current + 1);
        let live = &expected[expected.len() - replay.transactions.len()..];
        assert_eq!(replay.transactions, live, "the live tail, oldest first");
        assert!(replay.transactions.len() >= 10, "the log kept more than its last block");
    }

    #[test]
    fn a_full_log_refuses_until_its_oldest_quarter_is_written_back() {
        let mut log = LogWriter::new(4, 1, 1);
        let big = |n: u64| (0..30).map(|i| record(i, n, 0)).collect::<Vec<_>>();
        let mut appended = 0;
        loop {
            match log.append(big(appended + 1)) {
                Ok(_) => appended += 1,
                Err(WalError::Full) => break,
                Err(other) => panic!("{other}"),
            }
        }
        let (through, versions) = log.oldest_quarter();
        assert_eq!(through, 2, "a quarter of 4 blocks is one");
        assert!(versions.contains(&(0, 1)), "the first block carried version 1 of block 0");
        log.reclaim(through);
        assert!(log.append(big(99)).is_ok(), "room again after the reclaim");
        assert_eq!(
            log.append(vec![record(1, 1, 0); 40]),
            Err(WalError::TransactionTooLarge(2 + 40 * 120)),
            "a transaction never straddles two blocks"
        );
    }

    #[test]
    fn a_torn_or_foreign_block_ends_the_log_and_replay_never_goes_back() {
        let mut log = LogWriter::new(8, 1, 1);
        let mut writes = Vec::new();
        for n in 1..=60u64 {
            writes.extend(log.append(vec![record(5, n, n as u8)]).expect("room"));
        }
        let mut blocks = region(8, &writes);
        let last = writes.last().expect("written").clone();
        blocks[last.index as usize].as_mut().expect("written")[40] ^= 1;
        let replay = scan(&blocks);
        assert_eq!(replay.next_sequence, last.sequence, "the damaged block is the end");
        // Block 5 is already at version 50: only newer records apply.
        let apply = to_apply(&replay.transactions, |_| 50);
        assert!(apply.iter().all(|record| record.version > 50));
        assert!(to_apply(&replay.transactions, |_| u64::MAX).is_empty(), "a stale log undoes nothing");
        assert_eq!(scan(&vec![None; 8]), Replay { transactions: Vec::new(), next_sequence: 1, oldest_live: 1 });
    }

    /// Random appends, flushes and reclaims over many seeds: after every
    /// write, a scan of the region returns exactly the durable transactions
    /// of the blocks from its `oldest_live` on, in order, and never starts
    /// after the writer's oldest live block (nothing live is lost).
    #[test]
    fn a_scan_returns_exactly_the_durable_live_log_over_many_seeds() {
        for seed in 0..300 {
            let mut rng = common::rng::SimRng::new(seed);
            let log_blocks = 4 + rng.below(9) as u32;
            let mut log = LogWriter::new(log_blocks, 1, 1);
            let mut blocks: Vec<Option<Vec<u8>>> = vec![None; log_blocks as usize];
            let mut durable: BTreeMap<u64, Vec<Vec<Record>>> = BTreeMap::new();
            let mut write = |write: LogBlockWrite, log: &LogWriter, durable: &mut BTreeMap<u64, Vec<Vec<Record>>>| {
                let parsed = parse(&write.image).expect("a valid image").2;
                durable.insert(write.sequence, parsed);
                blocks[write.index as usize] = Some(write.image);
                let replay = scan(&blocks);
                assert_eq!(replay.next_sequence, durable.keys().next_back().expect("written") + 1, "seed {seed}");
                assert!(replay.oldest_live <= log.oldest_live.max(1), "seed {seed}: a live block was skipped");
                let expected: Vec<Vec<Record>> =
                    durable.range(replay.oldest_live..).flat_map(|(_, transactions)| transactions.clone()).collect();
                assert_eq!(replay.transactions, expected, "seed {seed}");
            };
            for step in 0..150u64 {
                let records = (0..1 + rng.below(4))
                    .map(|n| Record {
                        block: rng.below(50),
                        version: step * 10 + n + 1,
                        offset: rng.below(400) as u16,
                        bytes: vec![step as u8; 10 + rng.below(300) as usize],
                    })
                    .collect::<Vec<_>>();
                let closed = match log.append(records.clone()) {
                    Ok(closed) => closed,
                    Err(WalError::Full) => {
                        let (through, _) = log.oldest_quarter();
                        log.reclaim(through);
                        log.append(records).expect("room after a reclaim")
                    }
                    Err(other) => panic!("{other}"),
                };
                if let Some(closed) = closed {
                    write(closed, &log, &mut durable);
                }
                if rng.chance(0.2)
                    && let Some(open) = log.flush()
                {
                    write(open, &log, &mut durable);
                }
            }
        }
    }
}
