//! The segment log on disk: numbered files of checksummed entries.
//!
//! A segment's log is a sequence of files `00000001.log`, `00000002.log`, ...
//! each preallocated to a fixed size and filled with entries from the start.
//! An entry never straddles two files. Every entry is 8-byte aligned:
//!
//! ```text
//! offset  size  field
//!      0     4  magic      "ASEG"
//!      4     2  version    LOG_FORMAT_VERSION (3)
//!      6     2  kind       1 = redo batch, 2 = page versions, 3 = checkpoint,
//!                          4 = block versions, 5 = block checkpoint
//!      8     4  body_len   bytes of body, u32 LE
//!     12     4  count      items in the body
//!     16     8  sequence   entry sequence number, +1 per entry, never reused
//!     24     4  crc32c     over bytes 0..24 and the body
//!     28     4  reserved   0
//!     32     n  body
//!   32+n     p  zero padding to the next multiple of 8
//! ```
//!
//! Bodies:
//! - redo batch: `count` redo records back to back, each in the record format
//!   of `common::redo` with its own CRC32C.
//! - page versions: `count` items of `page u64, lsn u64, length u32,
//!   crc32c u32 (over the image), image` (each item padded to 8 bytes).
//! - checkpoint: `epoch u64, segment_complete_lsn u64, min_read_point u64,
//!   pg u32, page_bytes u32, open_epoch u64, truncation_count u32, reserved
//!   u32, membership_epoch u64`, then `truncation_count` ranges of `epoch u64, above u64, through
//!   u64`: the segment chain is complete through `segment_complete_lsn`, so
//!   records at or below it that are absent were subsumed by page versions
//!   and garbage-collected; the ranges are the truncation list of the
//!   writer of `open_epoch`, and void the records logged before them;
//!   `membership_epoch` is the newest PG membership the segment took.
//! - block versions (block segments only): `count` items of `block u64,
//!   version u64, lease_epoch u64, fencing_token u64, length u32, flags u32
//!   (bit 0: a seal's repair), crc32c u32 (over the data), reserved u32, data`
//!   (each item padded to 8 bytes).
//! - block checkpoint (block segments only): `pg u32, block_bytes_max u32,
//!   fenced_count u32, sealed_count u32`, then `fenced_count` fenced lease
//!   epochs and `sealed_count` sealed ones, u64 each, in the order the
//!   segment learned them. Each checkpoint lists every fence so far, so old
//!   files can be deleted without losing one.
//!
//! Reading the log back ([`scan_log`]) tells three cases apart:
//! - a clean end: zeros (or the end of the file) where the next entry would be;
//! - a torn or corrupt *tail*: a bad entry with no valid entry after it. The
//!   tail is truncated; only unacknowledged writes can be lost this way, since
//!   a write is acknowledged after its fdatasync, and the next write starts
//!   only after the previous one's fdatasync returned;
//! - a corrupt entry in the *middle*: a bad entry followed by a valid one.
//!   Records inside it whose own CRC still holds are kept, the rest leave a
//!   hole in the segment chain (SCL stops below it), and the segment is
//!   marked as needing repair. Nothing is silently dropped.

use bytes::{BufMut, Bytes, BytesMut};
use common::codec::Reader;
use common::ids::{BlockId, Epoch, Lsn, MembershipEpoch, PageId, PgId};
use common::limits::{BLOCK_BYTES_MAX, FENCED_EPOCHS_MAX, LOG_BATCH_BYTES_MAX, PAGE_BYTES_MAX, TRUNCATIONS_MAX};
use common::message::{TRUNCATION_BYTES, Truncation};
use common::redo::RedoRecord;

pub const ENTRY_MAGIC: [u8; 4] = *b"ASEG";
pub const LOG_FORMAT_VERSION: u16 = 3;
pub const ENTRY_HEADER_BYTES: usize = 32;
/// Largest entry body: a group-commit batch, or a set of page versions.
pub const ENTRY_BODY_BYTES_MAX: usize = LOG_BATCH_BYTES_MAX + PAGE_BYTES_MAX;
const KIND_REDO: u16 = 1;
const KIND_PAGE_VERSIONS: u16 = 2;
const KIND_CHECKPOINT: u16 = 3;
const KIND_BLOCK_VERSIONS: u16 = 4;
const KIND_BLOCK_CHECKPOINT: u16 = 5;
const BLOCK_ITEM_HEADER_BYTES: usize = 48;
const BLOCK_FLAG_REPAIRED: u32 = 1;
const VERSION_ITEM_HEADER_BYTES: usize = 24;
const CHECKPOINT_BODY_BYTES: usize = 56;

/// Rounds up to the 8-byte alignment of entries.
pub fn aligned(length: usize) -> usize {
    length.div_ceil(8) * 8
}

/// Where a byte lives in the log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LogPosition {
    pub file: u64,
    pub offset: u64,
}

/// Where a segment's next log write goes, and how its entries and writes
/// are numbered: an entry never straddles two files, so a write that does
/// not fit in the current file starts the next one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogCursor {
    position: LogPosition,
    next_sequence: u64,
    next_write_id: u64,
    file_bytes: u64,
}

impl LogCursor {
    /// The cursor of an empty log of `file_bytes`-byte files.
    pub fn new(file_bytes: u64) -> LogCursor {
        LogCursor { position: LogPosition { file: 1, offset: 0 }, next_sequence: 1, next_write_id: 1, file_bytes }
    }

    /// The cursor after what [`scan_log`] read back.
    pub fn resume(file_bytes: u64, scan: &ScanResult) -> LogCursor {
        LogCursor { position: scan.end, next_sequence: scan.last_sequence + 1, next_write_id: 1, file_bytes }
    }

    /// The file the next write goes to (unless it must start a new one).
    pub fn current_file(&self) -> u64 {
        self.position.file
    }

    /// Takes the sequence number of the next entry.
    pub fn take_sequence(&mut self) -> u64 {
        let sequence = self.next_sequence;
        self.next_sequence += 1;
        sequence
    }

    /// Places a write of `length` bytes: returns its id and position.
    pub fn place(&mut self, length: usize) -> (u64, LogPosition) {
        if self.position.offset + length as u64 > self.file_bytes {
            self.position = LogPosition { file: self.position.file + 1, offset: 0 };
        }
        let position = self.position;
        self.position.offset += length as u64;
        let id = self.next_write_id;
        self.next_write_id += 1;
        (id, position)
    }
}

/// A materialized page image as of `lsn`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageVersion {
    pub page: PageId,
    pub lsn: Lsn,
    pub image: Bytes,
}

/// The segment's durable metadata.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    pub pg: PgId,
    pub page_bytes: u32,
    pub epoch: Epoch,
    pub segment_complete_lsn: Lsn,
    pub min_read_point: Lsn,
    /// The epoch whose writer's truncation list this is (0: none yet).
    pub open_epoch: Epoch,
    pub membership_epoch: MembershipEpoch,
    pub truncations: Vec<Truncation>,
}

/// One logged version of a block (a block segment's write or repair).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockVersion {
    pub block: BlockId,
    pub version: u64,
    pub lease_epoch: u64,
    pub fencing_token: u64,
    /// Written by a seal's repair: a dead epoch's write that stays readable.
    pub repaired: bool,
    pub data: Bytes,
}

/// A block segment's durable metadata: every fence it has taken.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockCheckpoint {
    pub pg: PgId,
    pub block_bytes_max: u32,
    pub fenced: Vec<u64>,
    pub sealed: Vec<u64>,
}

/// One decoded log entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    Redo(Vec<RedoRecord>),
    PageVersions(Vec<PageVersion>),
    Checkpoint(Checkpoint),
    BlockVersions(Vec<BlockVersion>),
    BlockCheckpoint(BlockCheckpoint),
}

fn put_header(out: &mut BytesMut, kind: u16, count: u32, sequence: u64) -> usize {
    let start = out.len();
    out.put_slice(&ENTRY_MAGIC);
    out.put_u16_le(LOG_FORMAT_VERSION);
    out.put_u16_le(kind);
    out.put_u32_le(0);
    out.put_u32_le(count);
    out.put_u64_le(sequence);
    out.put_u64_le(0);
    start
}

fn seal(out: &mut BytesMut, start: usize) {
    let body_len = out.len() - start - ENTRY_HEADER_BYTES;
    assert!(body_len <= ENTRY_BODY_BYTES_MAX, "log entry body exceeds ENTRY_BODY_BYTES_MAX");
    out[start + 8..start + 12].copy_from_slice(&(body_len as u32).to_le_bytes());
    let checksum = crc32c::crc32c_append(crc32c::crc32c(&out[start..start + 24]), &out[start + ENTRY_HEADER_BYTES..]);
    out[start + 24..start + 28].copy_from_slice(&checksum.to_le_bytes());
    let padded = aligned(out.len() - start);
    out.put_bytes(0, padded - (out.len() - start));
}

/// Appends a redo batch entry made of already-encoded records.
pub fn encode_redo_entry<'a>(out: &mut BytesMut, sequence: u64, records: impl Iterator<Item = &'a RedoRecord>) {
    let start = put_header(out, KIND_REDO, 0, sequence);
    let mut count = 0u32;
    for record in records {
        out.put_slice(&record.encoded);
        count += 1;
    }
    out[start + 12..start + 16].copy_from_slice(&count.to_le_bytes());
    seal(out, start);
}

/// Appends a page-versions entry.
pub fn encode_versions_entry<'a>(out: &mut BytesMut, sequence: u64, versions: impl Iterator<Item = &'a PageVersion>) {
    let start = put_header(out, KIND_PAGE_VERSIONS, 0, sequence);
    let mut count = 0u32;
    for version in versions {
        let item_start = out.len();
        out.put_u64_le(version.page.0);
        out.put_u64_le(version.lsn.0);
        out.put_u32_le(version.image.len() as u32);
        out.put_u32_le(crc32c::crc32c(&version.image));
        out.put_slice(&version.image);
        let padded = aligned(out.len() - item_start);
        out.put_bytes(0, padded - (out.len() - item_start));
        count += 1;
    }
    out[start + 12..start + 16].copy_from_slice(&count.to_le_bytes());
    seal(out, start);
}

/// Appends a checkpoint entry.
pub fn encode_checkpoint_entry(out: &mut BytesMut, sequence: u64, checkpoint: &Checkpoint) {
    let start = put_header(out, KIND_CHECKPOINT, 1, sequence);
    out.put_u64_le(checkpoint.epoch.0);
    out.put_u64_le(checkpoint.segment_complete_lsn.0);
    out.put_u64_le(checkpoint.min_read_point.0);
    out.put_u32_le(checkpoint.pg.0);
    out.put_u32_le(checkpoint.page_bytes);
    out.put_u64_le(checkpoint.open_epoch.0);
    out.put_u32_le(checkpoint.truncations.len() as u32);
    out.put_u32_le(0);
    out.put_u64_le(checkpoint.membership_epoch.0);
    for truncation in &checkpoint.truncations {
        out.put_u64_le(truncation.epoch.0);
        out.put_u64_le(truncation.above.0);
        out.put_u64_le(truncation.through.0);
    }
    seal(out, start);
}

/// Appends a block-versions entry.
pub fn encode_block_versions_entry<'a>(
    out: &mut BytesMut,
    sequence: u64,
    versions: impl Iterator<Item = &'a BlockVersion>,
) {
    let start = put_header(out, KIND_BLOCK_VERSIONS, 0, sequence);
    let mut count = 0u32;
    for version in versions {
        let item_start = out.len();
        out.put_u64_le(version.block.0);
        out.put_u64_le(version.version);
        out.put_u64_le(version.lease_epoch);
        out.put_u64_le(version.fencing_token);
        out.put_u32_le(version.data.len() as u32);
        out.put_u32_le(if version.repaired { BLOCK_FLAG_REPAIRED } else { 0 });
        out.put_u32_le(crc32c::crc32c(&version.data));
        out.put_u32_le(0);
        out.put_slice(&version.data);
        let padded = aligned(out.len() - item_start);
        out.put_bytes(0, padded - (out.len() - item_start));
        count += 1;
    }
    out[start + 12..start + 16].copy_from_slice(&count.to_le_bytes());
    seal(out, start);
}

/// Appends a block checkpoint entry.
pub fn encode_block_checkpoint_entry(out: &mut BytesMut, sequence: u64, checkpoint: &BlockCheckpoint) {
    let start = put_header(out, KIND_BLOCK_CHECKPOINT, 1, sequence);
    out.put_u32_le(checkpoint.pg.0);
    out.put_u32_le(checkpoint.block_bytes_max);
    out.put_u32_le(checkpoint.fenced.len() as u32);
    out.put_u32_le(checkpoint.sealed.len() as u32);
    for epoch in checkpoint.fenced.iter().chain(&checkpoint.sealed) {
        out.put_u64_le(*epoch);
    }
    seal(out, start);
}

/// Encoded size of one block version item.
pub fn block_item_bytes(data_bytes: usize) -> usize {
    aligned(BLOCK_ITEM_HEADER_BYTES + data_bytes)
}

/// Encoded size of a block checkpoint entry listing `epochs` fences and seals.
pub fn block_checkpoint_entry_bytes(epochs: usize) -> usize {
    aligned(ENTRY_HEADER_BYTES + 16 + 8 * epochs)
}

/// Encoded size of a redo entry holding records of `record_bytes` in total.
pub fn redo_entry_bytes(record_bytes: usize) -> usize {
    aligned(ENTRY_HEADER_BYTES + record_bytes)
}

/// Encoded size of one page version item.
pub fn version_item_bytes(image_bytes: usize) -> usize {
    aligned(VERSION_ITEM_HEADER_BYTES + image_bytes)
}

/// Encoded size of a checkpoint entry.
pub const CHECKPOINT_ENTRY_BYTES: usize = ENTRY_HEADER_BYTES + CHECKPOINT_BODY_BYTES;

/// Bytes of a checkpoint entry carrying `truncations` ranges.
pub fn checkpoint_entry_bytes(truncations: usize) -> usize {
    CHECKPOINT_ENTRY_BYTES + TRUNCATION_BYTES * truncations
}

/// A header that passed its own sanity checks (not yet the CRC).
struct Header {
    kind: u16,
    body_len: usize,
    count: u32,
    sequence: u64,
    checksum: u32,
}

fn parse_header(bytes: &[u8]) -> Option<Header> {
    if bytes.len() < ENTRY_HEADER_BYTES || bytes[..4] != ENTRY_MAGIC {
        return None;
    }
    let mut reader = Reader::new(&bytes[4..ENTRY_HEADER_BYTES]);
    let version = reader.u16().ok()?;
    let kind = reader.u16().ok()?;
    let body_len = reader.u32().ok()? as usize;
    let count = reader.u32().ok()?;
    let sequence = reader.u64().ok()?;
    let checksum = reader.u32().ok()?;
    if version != LOG_FORMAT_VERSION
        || !(KIND_REDO..=KIND_BLOCK_CHECKPOINT).contains(&kind)
        || body_len > ENTRY_BODY_BYTES_MAX
    {
        return None;
    }
    Some(Header { kind, body_len, count, sequence, checksum })
}

/// Tries to read a fully valid entry at `offset`: header sane, CRC good,
/// body decodes. Returns the entry, its sequence and its aligned length.
fn read_entry(file: &Bytes, offset: usize) -> Option<(Entry, u64, usize)> {
    let header = parse_header(&file[offset..])?;
    let end = offset + ENTRY_HEADER_BYTES + header.body_len;
    if end > file.len() {
        return None;
    }
    let actual =
        crc32c::crc32c_append(crc32c::crc32c(&file[offset..offset + 24]), &file[offset + ENTRY_HEADER_BYTES..end]);
    if actual != header.checksum {
        return None;
    }
    let body = file.slice(offset + ENTRY_HEADER_BYTES..end);
    let entry = decode_body(&header, &body)?;
    Some((entry, header.sequence, aligned(end - offset)))
}

fn decode_body(header: &Header, body: &Bytes) -> Option<Entry> {
    match header.kind {
        KIND_REDO => {
            let records = RedoRecord::decode_all(body).ok()?;
            (records.len() == header.count as usize).then_some(Entry::Redo(records))
        }
        KIND_PAGE_VERSIONS => {
            let mut versions = Vec::with_capacity(header.count as usize);
            let mut offset = 0;
            for _ in 0..header.count {
                let (version, next) = decode_version(body, offset)?;
                versions.push(version);
                offset = next;
            }
            (offset == body.len()).then_some(Entry::PageVersions(versions))
        }
        KIND_CHECKPOINT => {
            let mut reader = Reader::new(body);
            let epoch = Epoch(reader.u64().ok()?);
            let segment_complete_lsn = Lsn(reader.u64().ok()?);
            let min_read_point = Lsn(reader.u64().ok()?);
            let pg = PgId(reader.u32().ok()?);
            let page_bytes = reader.u32().ok()?;
            let open_epoch = Epoch(reader.u64().ok()?);
            let count = reader.u32().ok()? as usize;
            let _reserved = reader.u32().ok()?;
            let membership_epoch = MembershipEpoch(reader.u64().ok()?);
            if count > TRUNCATIONS_MAX {
                return None;
            }
            let mut truncations = Vec::with_capacity(count);
            for _ in 0..count {
                let (epoch, above, through) =
                    (Epoch(reader.u64().ok()?), Lsn(reader.u64().ok()?), Lsn(reader.u64().ok()?));
                truncations.push(Truncation { epoch, above, through });
            }
            reader.finish().ok()?;
            let checkpoint = Checkpoint {
                pg,
                page_bytes,
                epoch,
                segment_complete_lsn,
                min_read_point,
                open_epoch,
                membership_epoch,
                truncations,
            };
            Some(Entry::Checkpoint(checkpoint))
        }
        KIND_BLOCK_VERSIONS => {
            let mut versions = Vec::with_capacity(header.count as usize);
            let mut offset = 0;
            for _ in 0..header.count {
                let (version, next) = decode_block_version(body, offset)?;
                versions.push(version);
                offset = next;
            }
            (offset == body.len()).then_some(Entry::BlockVersions(versions))
        }
        KIND_BLOCK_CHECKPOINT => {
            let mut reader = Reader::new(body);
            let pg = PgId(reader.u32().ok()?);
            let block_bytes_max = reader.u32().ok()?;
            let fenced_count = reader.u32().ok()? as usize;
            let sealed_count = reader.u32().ok()? as usize;
            if fenced_count > FENCED_EPOCHS_MAX || sealed_count > FENCED_EPOCHS_MAX {
                return None;
            }
            let mut epochs = |count: usize| (0..count).map(|_| reader.u64().ok()).collect::<Option<Vec<u64>>>();
            let fenced = epochs(fenced_count)?;
            let sealed = epochs(sealed_count)?;
            reader.finish().ok()?;
            Some(Entry::BlockCheckpoint(BlockCheckpoint { pg, block_bytes_max, fenced, sealed }))
        }
        _ => None,
    }
}

fn decode_block_version(body: &Bytes, offset: usize) -> Option<(BlockVersion, usize)> {
    let mut reader = Reader::new(body.get(offset..)?);
    let block = BlockId(reader.u64().ok()?);
    let version = reader.u64().ok()?;
    let lease_epoch = reader.u64().ok()?;
    let fencing_token = reader.u64().ok()?;
    let length = reader.u32().ok()? as usize;
    let flags = reader.u32().ok()?;
    let checksum = reader.u32().ok()?;
    let _reserved = reader.u32().ok()?;
    if length > BLOCK_BYTES_MAX || flags & !BLOCK_FLAG_REPAIRED != 0 {
        return None;
    }
    let start = offset + BLOCK_ITEM_HEADER_BYTES;
    let data = body.get(start..start + length)?;
    if crc32c::crc32c(data) != checksum {
        return None;
    }
    let next = offset + aligned(BLOCK_ITEM_HEADER_BYTES + length);
    let data = body.slice(start..start + length);
    let repaired = flags & BLOCK_FLAG_REPAIRED != 0;
    Some((BlockVersion { block, version, lease_epoch, fencing_token, repaired, data }, next.min(body.len())))
}

fn decode_version(body: &Bytes, offset: usize) -> Option<(PageVersion, usize)> {
    let mut reader = Reader::new(body.get(offset..)?);
    let page = PageId(reader.u64().ok()?);
    let lsn = Lsn(reader.u64().ok()?);
    let length = reader.u32().ok()? as usize;
    let checksum = reader.u32().ok()?;
    if length > PAGE_BYTES_MAX {
        return None;
    }
    let start = offset + VERSION_ITEM_HEADER_BYTES;
    let image = body.get(start..start + length)?;
    if crc32c::crc32c(image) != checksum {
        return None;
    }
    let next = offset + aligned(VERSION_ITEM_HEADER_BYTES + length);
    Some((PageVersion { page, lsn, image: body.slice(start..start + length) }, next.min(body.len())))
}

/// A bad entry with valid entries after it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MidLogCorruption {
    pub at: LogPosition,
    /// Records of the bad entry whose own CRC still held; kept.
    pub salvaged_records: usize,
}

/// Everything read back from a segment's log.
#[derive(Debug, Default)]
pub struct ScanResult {
    /// Valid entries in log order, with where each one lives.
    pub entries: Vec<(LogPosition, Entry)>,
    /// Where the next entry goes.
    pub end: LogPosition,
    /// Sequence number of the last valid entry (0 if none).
    pub last_sequence: u64,
    /// A torn or corrupt tail was cut at `end`; this many bytes were not zeros.
    pub truncated_tail_bytes: u64,
    pub corruptions: Vec<MidLogCorruption>,
}

/// The format version a log was written in, from its first entry's
/// header (`None`: the first file does not start with an entry). A log of
/// another version is refused whole: the scan would take its entries for
/// a torn tail and cut them.
pub fn log_format_version(files: &[(u64, Bytes)]) -> Option<u16> {
    let (_, first) = files.first()?;
    (first.len() >= 6 && first[..4] == ENTRY_MAGIC).then(|| u16::from_le_bytes([first[4], first[5]]))
}

fn is_zero(bytes: &[u8]) -> bool {
    bytes.iter().all(|byte| *byte == 0)
}

/// The next offset at or after `from` (8-aligned) where a valid entry starts.
fn resync(file: &Bytes, from: usize) -> Option<usize> {
    let mut offset = aligned(from);
    while offset + ENTRY_HEADER_BYTES <= file.len() {
        if file[offset..offset + 4] == ENTRY_MAGIC && read_entry(file, offset).is_some() {
            return Some(offset);
        }
        offset += 8;
    }
    None
}

/// Salvages records with valid CRCs from a damaged redo entry at `offset`.
fn salvage_records(file: &Bytes, offset: usize) -> Vec<RedoRecord> {
    let Some(header) = parse_header(&file[offset..]) else { return Vec::new() };
    if header.kind != KIND_REDO {
        return Vec::new();
    }
    let end = (offset + ENTRY_HEADER_BYTES + header.body_len).min(file.len());
    let body = file.slice(offset + ENTRY_HEADER_BYTES..end);
    let mut records = Vec::new();
    let mut cursor = 0;
    while cursor + common::redo::RECORD_HEADER_BYTES <= body.len() {
        match RedoRecord::decode(&body, cursor) {
            Ok((record, next)) => {
                records.push(record);
                cursor = next;
            }
            // The length field may be the damaged part: skip the rest.
            Err(_) => break,
        }
    }
    records
}

/// Reads a segment's log files (in file-number order) back into entries,
/// classifying any damage as described in the module docs.
pub fn scan_log(files: &[(u64, Bytes)]) -> ScanResult {
    let mut result = ScanResult::default();
    let mut expected_sequence: Option<u64> = None;
    let mut file_index = 0;
    let mut offset = 0usize;
    result.end = LogPosition { file: files.first().map_or(1, |(number, _)| *number), offset: 0 };
    while file_index < files.len() {
        let (number, file) = &files[file_index];
        let at = LogPosition { file: *number, offset: offset as u64 };
        let at_end = offset + ENTRY_HEADER_BYTES > file.len()
            || (is_zero(&file[offset..offset + ENTRY_HEADER_BYTES]) && resync(file, offset + 8).is_none());
        if at_end {
            // Clean end of this file's data (a zeroed header with valid
            // entries after it is corruption, handled below).
            result.end = at;
            file_index += 1;
            offset = 0;
            continue;
        }
        match read_entry(file, offset) {
            Some((entry, sequence, length)) if expected_sequence.is_none_or(|expected| sequence >= expected) => {
                result.entries.push((at, entry));
                result.last_sequence = sequence;
                expected_sequence = Some(sequence + 1);
                offset += length;
                result.end = LogPosition { file: *number, offset: offset as u64 };
            }
            _ => {
                // A bad entry (or a stale one out of sequence). Is anything valid after it?
                let later_in_file = resync(file, offset + 8);
                let later_file = files[file_index + 1..].iter().position(|(_, later)| resync(later, 0).is_some());
                if later_in_file.is_none() && later_file.is_none() {
                    let damaged_end = file[offset..].iter().rposition(|byte| *byte != 0).map_or(0, |last| last + 1);
                    result.truncated_tail_bytes = damaged_end as u64;
                    result.end = at;
                    return result;
                }
                let salvaged = salvage_records(file, offset);
                result.corruptions.push(MidLogCorruption { at, salvaged_records: salvaged.len() });
                if !salvaged.is_empty() {
                    result.entries.push((at, Entry::Redo(salvaged)));
                }
                expected_sequence = None;
                match later_in_file {
                    Some(next) => offset = next,
                    None => {
                        file_index += 1 + later_file.expect("checked above");
                        offset = resync(&files[file_index].1, 0).expect("checked above");
                    }
                }
            }
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first entry of a new segment, as `docs/segment-log-format.md` §2.3
    /// draws it byte for byte.
    #[test]
    fn the_documented_checkpoint_example_is_what_the_encoder_writes() {
        let mut out = BytesMut::new();
        let checkpoint = Checkpoint {
            pg: PgId(0),
            page_bytes: 8192,
            epoch: Epoch(1),
            segment_complete_lsn: Lsn::ZERO,
            min_read_point: Lsn::ZERO,
            open_epoch: Epoch::NONE,
            membership_epoch: MembershipEpoch::INITIAL,
            truncations: Vec::new(),
        };
        encode_checkpoint_entry(&mut out, 1, &checkpoint);
        let documented = "\
            41 53 45 47 03 00 03 00 38 00 00 00 01 00 00 00 \
            01 00 00 00 00 00 00 00 8b d8 10 db 00 00 00 00 \
            01 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 \
            00 00 00 00 00 00 00 00 00 00 00 00 00 20 00 00 \
            00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 \
            01 00 00 00 00 00 00 00";
        let hex: Vec<String> = out.iter().map(|byte| format!("{byte:02x}")).collect();
        assert_eq!(hex.join(" "), documented.split_whitespace().collect::<Vec<_>>().join(" "));
        assert_eq!(out.len(), checkpoint_entry_bytes(0));
    }

    #[test]
    fn a_log_of_another_format_version_is_recognized() {
        let mut entry = BytesMut::new();
        encode_checkpoint_entry(
            &mut entry,
            1,
            &Checkpoint {
                pg: PgId(0),
                page_bytes: 4096,
                epoch: Epoch::INITIAL,
                segment_complete_lsn: Lsn::ZERO,
                min_read_point: Lsn::ZERO,
                open_epoch: Epoch::NONE,
                membership_epoch: MembershipEpoch(2),
                truncations: Vec::new(),
            },
        );
        let mut older = entry.to_vec();
        assert_eq!(log_format_version(&[(1, entry.freeze())]), Some(LOG_FORMAT_VERSION));
        older[4..6].copy_from_slice(&1u16.to_le_bytes());
        assert_eq!(log_format_version(&[(1, Bytes::from(older))]), Some(1));
        assert_eq!(log_format_version(&[(1, Bytes::from(vec![0u8; 64]))]), None);
    }
    use common::redo::{PageOp, RecordFields};

    fn record(lsn: u64) -> RedoRecord {
        RecordFields {
            lsn: Lsn(lsn),
            prev_volume_lsn: Lsn(lsn - 1),
            prev_segment_lsn: Lsn(lsn - 1),
            prev_page_lsn: Lsn::ZERO,
            page: PageId(lsn),
            pg: PgId(0),
            consistency_point: true,
            op: PageOp::Write { offset: 0, data: Bytes::from(vec![lsn as u8; 40]) },
        }
        .seal()
    }

    /// Three redo entries of two records each, in one file padded with zeros.
    fn three_entries() -> (BytesMut, Vec<usize>) {
        let mut file = BytesMut::new();
        let mut starts = Vec::new();
        for index in 0..3u64 {
            starts.push(file.len());
            let records = [record(index * 2 + 1), record(index * 2 + 2)];
            encode_redo_entry(&mut file, index + 1, records.iter());
        }
        file.put_bytes(0, 4096);
        (file, starts)
    }

    #[test]
    fn a_zeroed_header_before_valid_entries_is_corruption_not_the_end() {
        let (mut file, starts) = three_entries();
        file[starts[1]..starts[1] + ENTRY_HEADER_BYTES].fill(0);
        let scan = scan_log(&[(1, file.freeze())]);
        assert_eq!(scan.corruptions.len(), 1, "the zeroed entry is reported");
        assert_eq!(lsns(&scan), vec![1, 2, 5, 6], "entries after it are still read");
    }

    fn lsns(scan: &ScanResult) -> Vec<u64> {
        scan.entries
            .iter()
            .flat_map(|(_, entry)| match entry {
                Entry::Redo(records) => records.iter().map(|record| record.lsn.0).collect(),
                _ => Vec::new(),
            })
            .collect()
    }

    #[test]
    fn clean_log_reads_back_every_entry_and_finds_its_end() {
        let (mut file, starts) = three_entries();
        let checkpoint = Checkpoint {
            pg: PgId(3),
            page_bytes: 8192,
            epoch: Epoch(2),
            segment_complete_lsn: Lsn(6),
            min_read_point: Lsn(4),
            open_epoch: Epoch(2),
            membership_epoch: MembershipEpoch(2),
            truncations: vec![Truncation { epoch: Epoch(2), above: Lsn(6), through: Lsn(106) }],
        };
        let end = starts[2] + redo_entry_bytes(record(5).encoded.len() * 2);
        let mut tail = BytesMut::new();
        encode_checkpoint_entry(&mut tail, 4, &checkpoint);
        let version = PageVersion { page: PageId(1), lsn: Lsn(6), image: Bytes::from(vec![7u8; 100]) };
        encode_versions_entry(&mut tail, 5, [version.clone()].iter());
        file[end..end + tail.len()].copy_from_slice(&tail);
        let scan = scan_log(&[(1, file.freeze())]);
        assert_eq!(lsns(&scan), vec![1, 2, 3, 4, 5, 6]);
        assert_eq!(scan.entries[3].1, Entry::Checkpoint(checkpoint));
        assert_eq!(scan.entries[4].1, Entry::PageVersions(vec![version]));
        assert_eq!(scan.end, LogPosition { file: 1, offset: (end + tail.len()) as u64 });
        assert_eq!(scan.last_sequence, 5);
        assert!(scan.corruptions.is_empty());
        assert_eq!(scan.truncated_tail_bytes, 0);
    }

    #[test]
    fn torn_tail_is_truncated() {
        let (mut file, starts) = three_entries();
        // The last entry was half written: its second half never reached the disk.
        let half = starts[2] + 60;
        file[half..starts[2] + 400].fill(0);
        file[half - 1] ^= 0xff;
        let scan = scan_log(&[(1, file.freeze())]);
        assert_eq!(lsns(&scan), vec![1, 2, 3, 4]);
        assert_eq!(scan.end, LogPosition { file: 1, offset: starts[2] as u64 });
        assert!(scan.truncated_tail_bytes > 0);
        assert!(scan.corruptions.is_empty());
    }

    #[test]
    fn mid_log_corruption_is_reported_and_good_records_salvaged() {
        let (mut file, starts) = three_entries();
        // Damage the second record of the middle entry only.
        let second_record = starts[1] + ENTRY_HEADER_BYTES + record(3).encoded.len() + 70;
        file[second_record] ^= 0x01;
        let scan = scan_log(&[(1, file.freeze())]);
        assert_eq!(lsns(&scan), vec![1, 2, 3, 5, 6], "lsn 4 is lost and nothing else");
        assert_eq!(
            scan.corruptions,
            vec![MidLogCorruption { at: LogPosition { file: 1, offset: starts[1] as u64 }, salvaged_records: 1 }]
        );
    }

    #[test]
    fn damaged_header_in_the_middle_still_finds_later_entries() {
        let (mut file, starts) = three_entries();
        file[starts[1] + 9] ^= 0xff; // the body length field
        let scan = scan_log(&[(1, file.freeze())]);
        // The entry CRC fails, but both of its records carry good CRCs of their own.
        assert_eq!(lsns(&scan), vec![1, 2, 3, 4, 5, 6]);
        assert_eq!(
            scan.corruptions,
            vec![MidLogCorruption { at: LogPosition { file: 1, offset: starts[1] as u64 }, salvaged_records: 2 }]
        );
    }

    #[test]
    fn corruption_before_a_later_file_is_mid_log() {
        let (mut first, starts) = three_entries();
        first[starts[2] + 40] ^= 0x10;
        let mut second = BytesMut::new();
        encode_redo_entry(&mut second, 4, [record(7)].iter());
        let scan = scan_log(&[(1, first.freeze()), (2, second.freeze())]);
        assert_eq!(scan.corruptions.len(), 1);
        assert_eq!(*lsns(&scan).last().unwrap(), 7);
        assert_eq!(scan.end.file, 2);
    }
}
