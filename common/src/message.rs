//! The storage protocol: messages between the volume writer (or a reader) and
//! a storage node. Each travels in one [`crate::frame`]; the frame's kind byte
//! is the [`MessageKind`]. `docs/wire-format.md` draws every payload.
//!
//! Appends are not acknowledged one by one: a segment answers with an
//! [`AppendAck`] carrying its SCL, which covers every record at or below it.
//! The writer needs nothing more to advance PGCL, VCL and VDL.

use crate::block_message as block;
pub use crate::block_message::{
    BlockImage, BlockRead, BlockVersionInfo, BlockWrite, BlockWriteAck, FenceAck, FencePhase, FenceRequest, FencedBlock,
};
use crate::codec::{CodecError, Reader, read_length_prefixed};
use crate::frame::{Frame, FrameBuilder, encode_frame};
use crate::ids::{Epoch, Lsn, MembershipEpoch, PageId, PgId};
use crate::limits::{
    ADDRESS_BYTES_MAX, ERROR_MESSAGE_BYTES_MAX, FRAME_PAYLOAD_BYTES_MAX, PAGE_BYTES_MAX, RECORDS_PER_APPEND_MAX,
    SEGMENT_SLOTS, TRUNCATIONS_MAX,
};
use crate::redo::{RecordError, RedoRecord};
use bytes::{BufMut, Bytes};
use thiserror::Error;

/// The frame kind byte of each message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum MessageKind {
    Append = 1,
    AppendAck = 2,
    ReadPage = 3,
    PageImage = 4,
    StatusRequest = 5,
    Status = 6,
    Error = 7,
    BlockWrite = 8,
    BlockWriteAck = 9,
    BlockRead = 10,
    BlockImage = 11,
    Fence = 12,
    FenceAck = 13,
    SealEpoch = 14,
    OpenEpoch = 15,
    FetchRecords = 16,
    RecordBatch = 17,
    Hydrate = 18,
    HydrateBatch = 19,
    SetMembership = 20,
}

/// Bytes of the fixed part of an append payload, before the records.
pub const APPEND_HEADER_BYTES: usize = 40;

/// Records for one segment (protection group), plus the writer's view of the
/// log that the segment uses for background work.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppendRequest {
    pub pg: PgId,
    pub epoch: Epoch,
    /// The writer's VDL when it sent this: the segment may coalesce up to it,
    /// since nothing at or below VDL is ever truncated by recovery.
    pub volume_durable_lsn: Lsn,
    /// PGMRPL: the lowest read point of any reader; versions below it may be
    /// garbage-collected.
    pub min_read_point: Lsn,
    /// The PG membership the writer sends under: a segment that holds a
    /// newer one refuses the append (`StaleMembership`).
    pub membership_epoch: MembershipEpoch,
    pub records: Vec<RedoRecord>,
}

/// A segment's durable progress, sent after every group commit that made
/// something new durable, and in answer to a duplicate append.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AppendAck {
    pub pg: PgId,
    pub epoch: Epoch,
    /// Segment complete LSN: no hole in the segment chain at or below it.
    pub segment_complete_lsn: Lsn,
    /// Highest durable LSN held, complete or not. Above SCL means a hole.
    pub highest_durable_lsn: Lsn,
}

/// Asks for one page as of `read_point`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadPageRequest {
    pub request_id: u64,
    pub pg: PgId,
    pub epoch: Epoch,
    pub page: PageId,
    pub read_point: Lsn,
}

/// A materialized page.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageImage {
    pub request_id: u64,
    pub pg: PgId,
    pub page: PageId,
    pub read_point: Lsn,
    /// LSN of the newest record applied to this image (0: never written).
    pub page_lsn: Lsn,
    pub image: Bytes,
}

/// Asks a node for a segment's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatusRequest {
    pub request_id: u64,
    pub pg: PgId,
}

/// Moves a segment to a newer volume epoch: from then on it refuses every
/// request of an older one (the writer that recovers the volume fences the
/// one it replaces). Answered with a [`SegmentStatus`] once the new epoch is
/// durable; an older epoch than the segment's is refused (`StaleEpoch`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SealEpochRequest {
    pub request_id: u64,
    pub pg: PgId,
    pub epoch: Epoch,
}

/// One truncation range of a recovered volume (A17 §4.3): the writer that
/// recovered at `epoch` found the volume durable up to `above`, so the
/// records of older epochs in `(above, through]` (written, never made
/// durable) are void forever; that writer allocates above `through`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Truncation {
    pub epoch: Epoch,
    pub above: Lsn,
    pub through: Lsn,
}

impl Truncation {
    pub fn contains(&self, lsn: Lsn) -> bool {
        self.above < lsn && lsn <= self.through
    }
}

/// Bytes of one encoded [`Truncation`].
pub const TRUNCATION_BYTES: usize = 24;

/// Opens `epoch` for writing: the recovering writer's truncation list
/// (every range it respects, its own last) replaces the segment's. A
/// segment at an older epoch is sealed by it first. Answered with a
/// [`SegmentStatus`] once the list is durable; from then on the segment
/// takes appends of `epoch`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenEpochRequest {
    pub request_id: u64,
    pub pg: PgId,
    pub epoch: Epoch,
    pub truncations: Vec<Truncation>,
}

/// One step of a membership change of a PG (A18 §4.1), sent by the writer
/// to every segment of the PG's new membership: the segment durably takes
/// `membership_epoch` (refusing appends of older ones from then on) and
/// gossips with `peers` (the other members' addresses). A node that hosts
/// no segment of the PG creates it, empty, with the PG's shape
/// (`page_bytes`, `pages_per_pg`): the new segment repairs itself from its
/// peers. Answered with a [`SegmentStatus`] once durable; a stale volume
/// epoch is refused (`StaleEpoch`), an older membership epoch than the
/// segment's too (`StaleMembership`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetMembershipRequest {
    pub request_id: u64,
    pub pg: PgId,
    pub epoch: Epoch,
    pub membership_epoch: MembershipEpoch,
    pub page_bytes: u32,
    pub pages_per_pg: u64,
    pub peers: Vec<String>,
}

/// Asks for a segment's records in `(above, through]` that lie at or below
/// its SCL, in LSN order. A recovering writer asks the most complete
/// segment of each PG (`through` = `Lsn(u64::MAX)`); a peer segment fills a
/// hole in its chain (gossip). `epoch` must be the segment's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FetchRecordsRequest {
    pub request_id: u64,
    pub pg: PgId,
    pub epoch: Epoch,
    pub above: Lsn,
    pub through: Lsn,
}

/// The answer to a [`FetchRecordsRequest`]: up to one frame of records.
/// `more` says that records of the range at or below SCL remain: ask again
/// above the last one. It also carries what recovery needs of the
/// segment: its SCL and its truncation list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordBatch {
    pub request_id: u64,
    pub pg: PgId,
    pub epoch: Epoch,
    pub segment_complete_lsn: Lsn,
    /// The epoch whose writer wrote `truncations` (0: none yet).
    pub open_epoch: Epoch,
    pub truncations: Vec<Truncation>,
    /// The segment's minimum read point: it may have collected records at
    /// or below it (subsumed by page versions), so a peer further behind
    /// cannot be brought up with records alone ([`HydrateRequest`]).
    pub min_read_point: Lsn,
    pub records: Vec<RedoRecord>,
    pub more: bool,
}

/// Asks a peer for its whole page state, in batches (repair of a segment
/// too far behind for records alone, of a corrupt one, or of a new one).
/// `transfer` 0 starts a transfer: the peer pins its garbage collection at
/// its minimum read point and fixes its SCL at that moment; later batches
/// name the transfer and the cursor the previous batch returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HydrateRequest {
    pub request_id: u64,
    pub pg: PgId,
    pub epoch: Epoch,
    pub transfer: u64,
    /// Where to go on: a position in the peer's page list, and the last
    /// record of that page already sent (0: none, the version first).
    pub cursor: HydrateCursor,
    /// Most bytes of versions and records the asker can log in one write.
    pub bytes_max: u32,
    /// Only pages changed above this LSN (the asker holds the rest, being
    /// complete through it): 0 for the whole page state.
    pub changed_above: Lsn,
}

/// A position in a hydrate transfer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HydrateCursor {
    pub page_position: u64,
    pub after_lsn: Lsn,
}

/// One page version in a [`HydrateBatch`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VersionImage {
    pub page: PageId,
    pub lsn: Lsn,
    pub image: Bytes,
}

/// A batch of a hydrate transfer: for each page in turn, its newest
/// version at or below `min_read_point` and its records above that
/// version up to `complete_through`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HydrateBatch {
    pub request_id: u64,
    pub pg: PgId,
    pub epoch: Epoch,
    pub transfer: u64,
    /// The peer's SCL when the transfer started: once every batch is
    /// durable, the asker is complete through it.
    pub complete_through: Lsn,
    /// The peer's pinned minimum read point: the asker serves no read below it.
    pub min_read_point: Lsn,
    pub versions: Vec<VersionImage>,
    pub records: Vec<RedoRecord>,
    /// Where the next batch starts; `None`: this was the last.
    pub next: Option<HydrateCursor>,
}

/// A segment's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentStatus {
    pub request_id: u64,
    pub pg: PgId,
    pub epoch: Epoch,
    pub segment_complete_lsn: Lsn,
    pub highest_durable_lsn: Lsn,
    pub min_read_point: Lsn,
    /// A corrupt record was found in the middle of the log: the segment keeps
    /// serving what is below the hole but needs repair from its peers.
    pub needs_repair: bool,
    /// The epoch whose writer's truncation list the segment holds. Equal to
    /// `epoch` once that epoch is open for appends; 0 before any writer.
    pub open_epoch: Epoch,
    /// The highest VDL a writer told this segment: everything at or below
    /// it is durable on a write quorum of every PG. Recovery reads the
    /// records above it, never the whole log.
    pub volume_durable_hint: Lsn,
    /// The newest membership of its PG this segment holds durably.
    pub membership_epoch: MembershipEpoch,
}

impl SegmentStatus {
    /// The segment takes appends of its epoch.
    pub fn is_open(&self) -> bool {
        self.open_epoch == self.epoch
    }
}

/// Why a request was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum ErrorCode {
    /// The request carries an epoch older than the segment's.
    StaleEpoch = 1,
    /// The request carries an epoch newer than the segment knows.
    UnknownEpoch = 2,
    /// This node hosts no segment of that PG.
    UnknownSegment = 3,
    /// The read point is above the segment's SCL.
    ReadPointAboveComplete = 4,
    /// The read point is below the minimum read point (versions were collected).
    ReadPointBelowMinimum = 5,
    /// A record or request broke a limit or a rule.
    InvalidRequest = 6,
    /// The segment's disk queue is full.
    Busy = 7,
    /// The segment could not write to its disk.
    DiskFailure = 8,
    /// A block write carries a fenced lease epoch.
    FencedEpoch = 9,
    /// A block write carries a fencing token older than one the segment holds
    /// for that block.
    StaleFencingToken = 10,
    /// A repair older than every version the segment keeps of the block: not
    /// stored.
    Superseded = 11,
    /// The segment is at the request's epoch, but that epoch's writer has
    /// not opened it yet ([`OpenEpochRequest`]): no appends until then.
    NotOpen = 12,
    /// The request carries an older PG membership epoch than the segment's.
    StaleMembership = 13,
}

impl ErrorCode {
    fn from_u16(code: u16) -> Result<ErrorCode, CodecError> {
        Ok(match code {
            1 => ErrorCode::StaleEpoch,
            2 => ErrorCode::UnknownEpoch,
            3 => ErrorCode::UnknownSegment,
            4 => ErrorCode::ReadPointAboveComplete,
            5 => ErrorCode::ReadPointBelowMinimum,
            6 => ErrorCode::InvalidRequest,
            7 => ErrorCode::Busy,
            8 => ErrorCode::DiskFailure,
            9 => ErrorCode::FencedEpoch,
            10 => ErrorCode::StaleFencingToken,
            11 => ErrorCode::Superseded,
            12 => ErrorCode::NotOpen,
            13 => ErrorCode::StaleMembership,
            other => return Err(CodecError::Invalid { field: "error code", detail: other.to_string() }),
        })
    }
}

/// A refusal. `request_id` is 0 when the refused message was an append.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ErrorResponse {
    pub request_id: u64,
    pub pg: PgId,
    pub code: ErrorCode,
    pub message: String,
}

/// Every message of the storage protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    Append(AppendRequest),
    AppendAck(AppendAck),
    ReadPage(ReadPageRequest),
    PageImage(PageImage),
    StatusRequest(StatusRequest),
    Status(SegmentStatus),
    Error(ErrorResponse),
    BlockWrite(BlockWrite),
    BlockWriteAck(BlockWriteAck),
    BlockRead(BlockRead),
    BlockImage(BlockImage),
    Fence(FenceRequest),
    FenceAck(FenceAck),
    SealEpoch(SealEpochRequest),
    OpenEpoch(OpenEpochRequest),
    FetchRecords(FetchRecordsRequest),
    RecordBatch(RecordBatch),
    Hydrate(HydrateRequest),
    HydrateBatch(HydrateBatch),
    SetMembership(SetMembershipRequest),
}

/// Why a frame's payload is not a valid message.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum MessageError {
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error("bad record in append: {0}")]
    Record(#[from] RecordError),
    #[error("append carries {count} records, more than RECORDS_PER_APPEND_MAX ({RECORDS_PER_APPEND_MAX})")]
    TooManyRecords { count: usize },
    #[error("{count} truncation ranges, more than TRUNCATIONS_MAX ({TRUNCATIONS_MAX})")]
    TooManyTruncations { count: usize },
}

fn put_truncations(payload: &mut Vec<u8>, truncations: &[Truncation]) {
    payload.put_u32_le(truncations.len() as u32);
    for truncation in truncations {
        payload.put_u64_le(truncation.epoch.0);
        payload.put_u64_le(truncation.above.0);
        payload.put_u64_le(truncation.through.0);
    }
}

fn put_records(payload: &mut Vec<u8>, records: &[RedoRecord]) {
    payload.put_u32_le(records.len() as u32);
    for record in records {
        payload.put_slice(&record.encoded);
    }
}

/// A record count, then the records to the end of the payload.
fn read_records(reader: &mut Reader, payload: &Bytes) -> Result<Vec<RedoRecord>, MessageError> {
    let count = reader.u32()? as usize;
    if count > RECORDS_PER_APPEND_MAX {
        return Err(MessageError::TooManyRecords { count });
    }
    let mut records = Vec::with_capacity(count);
    let mut offset = reader.offset();
    for _ in 0..count {
        let (record, next) = RedoRecord::decode(payload, offset)?;
        records.push(record);
        offset = next;
    }
    if offset != payload.len() {
        return Err(CodecError::Trailing { trailing: payload.len() - offset }.into());
    }
    Ok(records)
}

fn read_truncations(reader: &mut Reader) -> Result<Vec<Truncation>, MessageError> {
    let count = reader.u32()? as usize;
    if count > TRUNCATIONS_MAX {
        return Err(MessageError::TooManyTruncations { count });
    }
    let mut truncations = Vec::with_capacity(count);
    for _ in 0..count {
        let (epoch, above, through) = (Epoch(reader.u64()?), Lsn(reader.u64()?), Lsn(reader.u64()?));
        if through < above {
            return Err(CodecError::Invalid { field: "truncation", detail: format!("({above}, {through}]") }.into());
        }
        truncations.push(Truncation { epoch, above, through });
    }
    Ok(truncations)
}

/// The fields of an append besides its records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AppendHeader {
    pub pg: PgId,
    pub epoch: Epoch,
    pub volume_durable_lsn: Lsn,
    pub min_read_point: Lsn,
    pub membership_epoch: MembershipEpoch,
}

/// Encodes an append frame from records that are already encoded (the
/// writer's hot path: one encoding, shared by the six segments' frames).
pub fn encode_append_frame<'a>(header: AppendHeader, encoded_records: impl Iterator<Item = &'a [u8]> + Clone) -> Bytes {
    let count = encoded_records.clone().count();
    let bytes: usize = encoded_records.clone().map(<[u8]>::len).sum();
    assert!(count <= RECORDS_PER_APPEND_MAX, "append exceeds RECORDS_PER_APPEND_MAX");
    assert!(APPEND_HEADER_BYTES + bytes <= FRAME_PAYLOAD_BYTES_MAX, "append exceeds FRAME_PAYLOAD_BYTES_MAX");
    let mut builder = FrameBuilder::new(MessageKind::Append as u8, APPEND_HEADER_BYTES + bytes);
    let payload = builder.payload();
    payload.put_u32_le(header.pg.0);
    payload.put_u32_le(count as u32);
    payload.put_u64_le(header.epoch.0);
    payload.put_u64_le(header.volume_durable_lsn.0);
    payload.put_u64_le(header.min_read_point.0);
    payload.put_u64_le(header.membership_epoch.0);
    for record in encoded_records {
        payload.put_slice(record);
    }
    builder.finish()
}

impl Message {
    /// Encodes this message as a complete frame.
    pub fn encode(&self) -> Bytes {
        let mut payload = Vec::new();
        let kind = match self {
            Message::Append(append) => {
                let header = AppendHeader {
                    pg: append.pg,
                    epoch: append.epoch,
                    volume_durable_lsn: append.volume_durable_lsn,
                    min_read_point: append.min_read_point,
                    membership_epoch: append.membership_epoch,
                };
                return encode_append_frame(header, append.records.iter().map(|record| &record.encoded[..]));
            }
            Message::AppendAck(ack) => {
                payload.put_u32_le(ack.pg.0);
                payload.put_u32_le(0);
                payload.put_u64_le(ack.epoch.0);
                payload.put_u64_le(ack.segment_complete_lsn.0);
                payload.put_u64_le(ack.highest_durable_lsn.0);
                MessageKind::AppendAck
            }
            Message::ReadPage(read) => {
                payload.put_u64_le(read.request_id);
                payload.put_u32_le(read.pg.0);
                payload.put_u32_le(0);
                payload.put_u64_le(read.epoch.0);
                payload.put_u64_le(read.page.0);
                payload.put_u64_le(read.read_point.0);
                MessageKind::ReadPage
            }
            Message::PageImage(image) => {
                payload.put_u64_le(image.request_id);
                payload.put_u32_le(image.pg.0);
                payload.put_u32_le(0);
                payload.put_u64_le(image.page.0);
                payload.put_u64_le(image.read_point.0);
                payload.put_u64_le(image.page_lsn.0);
                payload.put_u32_le(image.image.len() as u32);
                payload.put_slice(&image.image);
                MessageKind::PageImage
            }
            Message::StatusRequest(request) => {
                payload.put_u64_le(request.request_id);
                payload.put_u32_le(request.pg.0);
                payload.put_u32_le(0);
                MessageKind::StatusRequest
            }
            Message::SealEpoch(request) => {
                payload.put_u64_le(request.request_id);
                payload.put_u32_le(request.pg.0);
                payload.put_u32_le(0);
                payload.put_u64_le(request.epoch.0);
                MessageKind::SealEpoch
            }
            Message::Status(status) => {
                payload.put_u64_le(status.request_id);
                payload.put_u32_le(status.pg.0);
                payload.put_u32_le(u32::from(status.needs_repair));
                payload.put_u64_le(status.epoch.0);
                payload.put_u64_le(status.segment_complete_lsn.0);
                payload.put_u64_le(status.highest_durable_lsn.0);
                payload.put_u64_le(status.min_read_point.0);
                payload.put_u64_le(status.open_epoch.0);
                payload.put_u64_le(status.volume_durable_hint.0);
                payload.put_u64_le(status.membership_epoch.0);
                MessageKind::Status
            }
            Message::OpenEpoch(request) => {
                payload.put_u64_le(request.request_id);
                payload.put_u32_le(request.pg.0);
                payload.put_u32_le(0);
                payload.put_u64_le(request.epoch.0);
                put_truncations(&mut payload, &request.truncations);
                MessageKind::OpenEpoch
            }
            Message::FetchRecords(request) => {
                payload.put_u64_le(request.request_id);
                payload.put_u32_le(request.pg.0);
                payload.put_u32_le(0);
                payload.put_u64_le(request.epoch.0);
                payload.put_u64_le(request.above.0);
                payload.put_u64_le(request.through.0);
                MessageKind::FetchRecords
            }
            Message::RecordBatch(batch) => {
                payload.put_u64_le(batch.request_id);
                payload.put_u32_le(batch.pg.0);
                payload.put_u32_le(u32::from(batch.more));
                payload.put_u64_le(batch.epoch.0);
                payload.put_u64_le(batch.segment_complete_lsn.0);
                payload.put_u64_le(batch.open_epoch.0);
                payload.put_u64_le(batch.min_read_point.0);
                put_truncations(&mut payload, &batch.truncations);
                put_records(&mut payload, &batch.records);
                MessageKind::RecordBatch
            }
            Message::Hydrate(request) => {
                payload.put_u64_le(request.request_id);
                payload.put_u32_le(request.pg.0);
                payload.put_u32_le(request.bytes_max);
                payload.put_u64_le(request.epoch.0);
                payload.put_u64_le(request.transfer);
                payload.put_u64_le(request.cursor.page_position);
                payload.put_u64_le(request.cursor.after_lsn.0);
                payload.put_u64_le(request.changed_above.0);
                MessageKind::Hydrate
            }
            Message::HydrateBatch(batch) => {
                payload.put_u64_le(batch.request_id);
                payload.put_u32_le(batch.pg.0);
                payload.put_u32_le(u32::from(batch.next.is_some()));
                payload.put_u64_le(batch.epoch.0);
                payload.put_u64_le(batch.transfer);
                payload.put_u64_le(batch.complete_through.0);
                payload.put_u64_le(batch.min_read_point.0);
                let next = batch.next.unwrap_or_default();
                payload.put_u64_le(next.page_position);
                payload.put_u64_le(next.after_lsn.0);
                payload.put_u32_le(batch.versions.len() as u32);
                for version in &batch.versions {
                    payload.put_u64_le(version.page.0);
                    payload.put_u64_le(version.lsn.0);
                    payload.put_u32_le(version.image.len() as u32);
                    payload.put_slice(&version.image);
                }
                put_records(&mut payload, &batch.records);
                MessageKind::HydrateBatch
            }
            Message::SetMembership(request) => {
                payload.put_u64_le(request.request_id);
                payload.put_u32_le(request.pg.0);
                payload.put_u32_le(request.page_bytes);
                payload.put_u64_le(request.epoch.0);
                payload.put_u64_le(request.membership_epoch.0);
                payload.put_u64_le(request.pages_per_pg);
                assert!(request.peers.len() < SEGMENT_SLOTS, "a PG has at most SEGMENT_SLOTS - 1 peers");
                payload.put_u32_le(request.peers.len() as u32);
                for peer in &request.peers {
                    assert!(peer.len() <= ADDRESS_BYTES_MAX, "address longer than ADDRESS_BYTES_MAX");
                    payload.put_u16_le(peer.len() as u16);
                    payload.put_slice(peer.as_bytes());
                }
                MessageKind::SetMembership
            }
            Message::Error(error) => {
                let mut message = error.message.as_bytes();
                if message.len() > ERROR_MESSAGE_BYTES_MAX {
                    let mut end = ERROR_MESSAGE_BYTES_MAX;
                    while !error.message.is_char_boundary(end) {
                        end -= 1;
                    }
                    message = &message[..end];
                }
                payload.put_u64_le(error.request_id);
                payload.put_u32_le(error.pg.0);
                payload.put_u16_le(error.code as u16);
                payload.put_u16_le(message.len() as u16);
                payload.put_slice(message);
                MessageKind::Error
            }
            Message::BlockWrite(write) => {
                block::encode_block_write(write, &mut payload);
                MessageKind::BlockWrite
            }
            Message::BlockWriteAck(ack) => {
                block::encode_block_write_ack(ack, &mut payload);
                MessageKind::BlockWriteAck
            }
            Message::BlockRead(read) => {
                block::encode_block_read(read, &mut payload);
                MessageKind::BlockRead
            }
            Message::BlockImage(image) => {
                block::encode_block_image(image, &mut payload);
                MessageKind::BlockImage
            }
            Message::Fence(fence) => {
                block::encode_fence(fence, &mut payload);
                MessageKind::Fence
            }
            Message::FenceAck(ack) => {
                block::encode_fence_ack(ack, &mut payload);
                MessageKind::FenceAck
            }
        };
        encode_frame(kind as u8, &payload)
    }

    /// Decodes a frame's payload. Never panics on any input.
    pub fn decode(frame: &Frame) -> Result<Message, MessageError> {
        let payload = &frame.payload;
        let mut reader = Reader::new(payload);
        let message = match frame.kind {
            kind if kind == MessageKind::Append as u8 => {
                let pg = PgId(reader.u32()?);
                let count = reader.u32()? as usize;
                if count > RECORDS_PER_APPEND_MAX {
                    return Err(MessageError::TooManyRecords { count });
                }
                let epoch = Epoch(reader.u64()?);
                let volume_durable_lsn = Lsn(reader.u64()?);
                let min_read_point = Lsn(reader.u64()?);
                let membership_epoch = MembershipEpoch(reader.u64()?);
                let mut records = Vec::with_capacity(count);
                let mut offset = reader.offset();
                for _ in 0..count {
                    let (record, next) = RedoRecord::decode(payload, offset)?;
                    records.push(record);
                    offset = next;
                }
                if offset != payload.len() {
                    return Err(CodecError::Trailing { trailing: payload.len() - offset }.into());
                }
                return Ok(Message::Append(AppendRequest {
                    pg,
                    epoch,
                    volume_durable_lsn,
                    min_read_point,
                    membership_epoch,
                    records,
                }));
            }
            kind if kind == MessageKind::AppendAck as u8 => {
                let pg = PgId(reader.u32()?);
                let _reserved = reader.u32()?;
                Message::AppendAck(AppendAck {
                    pg,
                    epoch: Epoch(reader.u64()?),
                    segment_complete_lsn: Lsn(reader.u64()?),
                    highest_durable_lsn: Lsn(reader.u64()?),
                })
            }
            kind if kind == MessageKind::ReadPage as u8 => {
                let request_id = reader.u64()?;
                let pg = PgId(reader.u32()?);
                let _reserved = reader.u32()?;
                Message::ReadPage(ReadPageRequest {
                    request_id,
                    pg,
                    epoch: Epoch(reader.u64()?),
                    page: PageId(reader.u64()?),
                    read_point: Lsn(reader.u64()?),
                })
            }
            kind if kind == MessageKind::PageImage as u8 => {
                let request_id = reader.u64()?;
                let pg = PgId(reader.u32()?);
                let _reserved = reader.u32()?;
                let page = PageId(reader.u64()?);
                let read_point = Lsn(reader.u64()?);
                let page_lsn = Lsn(reader.u64()?);
                let image = read_length_prefixed(&mut reader, payload, PAGE_BYTES_MAX, "page image")?;
                Message::PageImage(PageImage { request_id, pg, page, read_point, page_lsn, image })
            }
            kind if kind == MessageKind::StatusRequest as u8 => {
                let request_id = reader.u64()?;
                let pg = PgId(reader.u32()?);
                let _reserved = reader.u32()?;
                Message::StatusRequest(StatusRequest { request_id, pg })
            }
            kind if kind == MessageKind::SealEpoch as u8 => {
                let request_id = reader.u64()?;
                let pg = PgId(reader.u32()?);
                let _reserved = reader.u32()?;
                Message::SealEpoch(SealEpochRequest { request_id, pg, epoch: Epoch(reader.u64()?) })
            }
            kind if kind == MessageKind::Status as u8 => {
                let request_id = reader.u64()?;
                let pg = PgId(reader.u32()?);
                let needs_repair = match reader.u32()? {
                    0 => false,
                    1 => true,
                    other => {
                        return Err(CodecError::Invalid { field: "needs_repair", detail: other.to_string() }.into());
                    }
                };
                Message::Status(SegmentStatus {
                    request_id,
                    pg,
                    epoch: Epoch(reader.u64()?),
                    segment_complete_lsn: Lsn(reader.u64()?),
                    highest_durable_lsn: Lsn(reader.u64()?),
                    min_read_point: Lsn(reader.u64()?),
                    needs_repair,
                    open_epoch: Epoch(reader.u64()?),
                    volume_durable_hint: Lsn(reader.u64()?),
                    membership_epoch: MembershipEpoch(reader.u64()?),
                })
            }
            kind if kind == MessageKind::OpenEpoch as u8 => {
                let request_id = reader.u64()?;
                let pg = PgId(reader.u32()?);
                let _reserved = reader.u32()?;
                let epoch = Epoch(reader.u64()?);
                let truncations = read_truncations(&mut reader)?;
                Message::OpenEpoch(OpenEpochRequest { request_id, pg, epoch, truncations })
            }
            kind if kind == MessageKind::FetchRecords as u8 => {
                let request_id = reader.u64()?;
                let pg = PgId(reader.u32()?);
                let _reserved = reader.u32()?;
                Message::FetchRecords(FetchRecordsRequest {
                    request_id,
                    pg,
                    epoch: Epoch(reader.u64()?),
                    above: Lsn(reader.u64()?),
                    through: Lsn(reader.u64()?),
                })
            }
            kind if kind == MessageKind::RecordBatch as u8 => {
                let request_id = reader.u64()?;
                let pg = PgId(reader.u32()?);
                let more = match reader.u32()? {
                    0 => false,
                    1 => true,
                    other => return Err(CodecError::Invalid { field: "more", detail: other.to_string() }.into()),
                };
                let epoch = Epoch(reader.u64()?);
                let segment_complete_lsn = Lsn(reader.u64()?);
                let open_epoch = Epoch(reader.u64()?);
                let min_read_point = Lsn(reader.u64()?);
                let truncations = read_truncations(&mut reader)?;
                let records = read_records(&mut reader, payload)?;
                return Ok(Message::RecordBatch(RecordBatch {
                    request_id,
                    pg,
                    epoch,
                    segment_complete_lsn,
                    open_epoch,
                    truncations,
                    min_read_point,
                    records,
                    more,
                }));
            }
            kind if kind == MessageKind::Hydrate as u8 => {
                let request_id = reader.u64()?;
                let pg = PgId(reader.u32()?);
                let bytes_max = reader.u32()?;
                let epoch = Epoch(reader.u64()?);
                let transfer = reader.u64()?;
                let cursor = HydrateCursor { page_position: reader.u64()?, after_lsn: Lsn(reader.u64()?) };
                let changed_above = Lsn(reader.u64()?);
                Message::Hydrate(HydrateRequest { request_id, pg, epoch, transfer, cursor, bytes_max, changed_above })
            }
            kind if kind == MessageKind::HydrateBatch as u8 => {
                let request_id = reader.u64()?;
                let pg = PgId(reader.u32()?);
                let has_next = match reader.u32()? {
                    0 => false,
                    1 => true,
                    other => return Err(CodecError::Invalid { field: "next", detail: other.to_string() }.into()),
                };
                let epoch = Epoch(reader.u64()?);
                let transfer = reader.u64()?;
                let complete_through = Lsn(reader.u64()?);
                let min_read_point = Lsn(reader.u64()?);
                let cursor = HydrateCursor { page_position: reader.u64()?, after_lsn: Lsn(reader.u64()?) };
                let count = reader.u32()? as usize;
                if count > RECORDS_PER_APPEND_MAX {
                    return Err(MessageError::TooManyRecords { count });
                }
                let mut versions = Vec::with_capacity(count);
                for _ in 0..count {
                    let page = PageId(reader.u64()?);
                    let lsn = Lsn(reader.u64()?);
                    let image = read_length_prefixed(&mut reader, payload, PAGE_BYTES_MAX, "page version")?;
                    versions.push(VersionImage { page, lsn, image });
                }
                let records = read_records(&mut reader, payload)?;
                let next = has_next.then_some(cursor);
                return Ok(Message::HydrateBatch(HydrateBatch {
                    request_id,
                    pg,
                    epoch,
                    transfer,
                    complete_through,
                    min_read_point,
                    versions,
                    records,
                    next,
                }));
            }
            kind if kind == MessageKind::SetMembership as u8 => {
                let request_id = reader.u64()?;
                let pg = PgId(reader.u32()?);
                let page_bytes = reader.u32()?;
                let epoch = Epoch(reader.u64()?);
                let membership_epoch = MembershipEpoch(reader.u64()?);
                let pages_per_pg = reader.u64()?;
                let count = reader.u32()? as usize;
                if count >= SEGMENT_SLOTS {
                    return Err(CodecError::Invalid { field: "peers", detail: format!("{count} peers") }.into());
                }
                let mut peers = Vec::with_capacity(count);
                for _ in 0..count {
                    let length = reader.u16()? as usize;
                    if length > ADDRESS_BYTES_MAX {
                        return Err(CodecError::Invalid { field: "peer", detail: format!("{length} bytes") }.into());
                    }
                    let address = std::str::from_utf8(reader.take(length)?)
                        .map_err(|error| CodecError::Invalid { field: "peer", detail: error.to_string() })?;
                    peers.push(address.to_string());
                }
                Message::SetMembership(SetMembershipRequest {
                    request_id,
                    pg,
                    epoch,
                    membership_epoch,
                    page_bytes,
                    pages_per_pg,
                    peers,
                })
            }
            kind if kind == MessageKind::Error as u8 => {
                let request_id = reader.u64()?;
                let pg = PgId(reader.u32()?);
                let code = ErrorCode::from_u16(reader.u16()?)?;
                let length = reader.u16()? as usize;
                if length > ERROR_MESSAGE_BYTES_MAX {
                    return Err(
                        CodecError::Invalid { field: "error message", detail: format!("{length} bytes") }.into()
                    );
                }
                let message = String::from_utf8_lossy(reader.take(length)?).into_owned();
                Message::Error(ErrorResponse { request_id, pg, code, message })
            }
            kind if kind == MessageKind::BlockWrite as u8 => {
                Message::BlockWrite(block::decode_block_write(&mut reader, payload)?)
            }
            kind if kind == MessageKind::BlockWriteAck as u8 => {
                Message::BlockWriteAck(block::decode_block_write_ack(&mut reader)?)
            }
            kind if kind == MessageKind::BlockRead as u8 => Message::BlockRead(block::decode_block_read(&mut reader)?),
            kind if kind == MessageKind::BlockImage as u8 => {
                Message::BlockImage(block::decode_block_image(&mut reader, payload)?)
            }
            kind if kind == MessageKind::Fence as u8 => Message::Fence(block::decode_fence(&mut reader)?),
            kind if kind == MessageKind::FenceAck as u8 => Message::FenceAck(block::decode_fence_ack(&mut reader)?),
            other => return Err(MessageError::UnknownKind(other)),
        };
        reader.finish()?;
        Ok(message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::decode_frame;
    use crate::redo::{PageOp, RecordFields};
    use bytes::BytesMut;
    use proptest::prelude::*;

    fn round_trip(message: Message) {
        let mut buffer = BytesMut::from(&message.encode()[..]);
        let frame = decode_frame(&mut buffer).unwrap().unwrap();
        assert_eq!(Message::decode(&frame).unwrap(), message);
    }

    /// The Append worked example of `docs/wire-format.md` §5, byte for byte.
    #[test]
    fn the_documented_append_example_is_what_the_encoder_writes() {
        let record = RecordFields {
            lsn: Lsn(5),
            prev_volume_lsn: Lsn(4),
            prev_segment_lsn: Lsn(4),
            prev_page_lsn: Lsn::ZERO,
            page: PageId(7),
            pg: PgId(0),
            consistency_point: true,
            op: PageOp::ZeroPage,
        }
        .seal();
        let frame = Message::Append(AppendRequest {
            pg: PgId(0),
            epoch: Epoch(1),
            volume_durable_lsn: Lsn(4),
            min_read_point: Lsn::ZERO,
            membership_epoch: MembershipEpoch::INITIAL,
            records: vec![record],
        })
        .encode();
        let documented = "\
            41 4b 01 01 60 00 00 00 32 4b 48 88 00 00 00 00 \
            01 00 00 00 01 00 00 00 00 00 00 00 04 00 00 00 \
            00 00 00 00 00 00 00 00 00 00 00 00 01 00 00 00 \
            00 00 00 00 38 00 00 00 d9 a2 74 04 05 00 00 00 \
            00 00 00 00 04 00 00 00 00 00 00 00 04 00 00 00 \
            00 00 00 00 00 00 00 00 00 00 00 00 07 00 00 00 \
            00 00 00 00 00 00 00 00 02 01 00 00";
        let hex: Vec<String> = frame.iter().map(|byte| format!("{byte:02x}")).collect();
        assert_eq!(hex.join(" "), documented.split_whitespace().collect::<Vec<_>>().join(" "));
    }

    #[test]
    fn every_message_round_trips() {
        let record = RecordFields {
            lsn: Lsn(3),
            prev_volume_lsn: Lsn(2),
            prev_segment_lsn: Lsn(1),
            prev_page_lsn: Lsn::ZERO,
            page: PageId(4),
            pg: PgId(1),
            consistency_point: false,
            op: PageOp::Write { offset: 0, data: Bytes::from_static(b"xyz") },
        }
        .seal();
        round_trip(Message::Append(AppendRequest {
            pg: PgId(1),
            epoch: Epoch(2),
            volume_durable_lsn: Lsn(1),
            min_read_point: Lsn(1),
            membership_epoch: MembershipEpoch(2),
            records: vec![record.clone()],
        }));
        round_trip(Message::AppendAck(AppendAck {
            pg: PgId(1),
            epoch: Epoch(2),
            segment_complete_lsn: Lsn(3),
            highest_durable_lsn: Lsn(9),
        }));
        round_trip(Message::ReadPage(ReadPageRequest {
            request_id: 8,
            pg: PgId(1),
            epoch: Epoch(1),
            page: PageId(4),
            read_point: Lsn(3),
        }));
        round_trip(Message::PageImage(PageImage {
            request_id: 8,
            pg: PgId(1),
            page: PageId(4),
            read_point: Lsn(3),
            page_lsn: Lsn(3),
            image: Bytes::from_static(&[1, 2, 3, 4]),
        }));
        round_trip(Message::StatusRequest(StatusRequest { request_id: 1, pg: PgId(0) }));
        round_trip(Message::SealEpoch(SealEpochRequest { request_id: 3, pg: PgId(1), epoch: Epoch(2) }));
        round_trip(Message::Status(SegmentStatus {
            request_id: 1,
            pg: PgId(0),
            epoch: Epoch(1),
            segment_complete_lsn: Lsn(10),
            highest_durable_lsn: Lsn(12),
            min_read_point: Lsn(4),
            needs_repair: true,
            open_epoch: Epoch(1),
            volume_durable_hint: Lsn(8),
            membership_epoch: MembershipEpoch(3),
        }));
        round_trip(Message::SetMembership(SetMembershipRequest {
            request_id: 9,
            pg: PgId(2),
            epoch: Epoch(4),
            membership_epoch: MembershipEpoch(2),
            page_bytes: 8192,
            pages_per_pg: 128,
            peers: vec!["127.0.0.1:20001".into(), "node-b:7".into()],
        }));
        let truncations = vec![Truncation { epoch: Epoch(2), above: Lsn(5), through: Lsn(105) }];
        round_trip(Message::OpenEpoch(OpenEpochRequest {
            request_id: 4,
            pg: PgId(1),
            epoch: Epoch(2),
            truncations: truncations.clone(),
        }));
        round_trip(Message::FetchRecords(FetchRecordsRequest {
            request_id: 5,
            pg: PgId(1),
            epoch: Epoch(2),
            above: Lsn(1),
            through: Lsn(u64::MAX),
        }));
        round_trip(Message::RecordBatch(RecordBatch {
            request_id: 5,
            pg: PgId(1),
            epoch: Epoch(2),
            segment_complete_lsn: Lsn(3),
            open_epoch: Epoch(2),
            truncations,
            min_read_point: Lsn(1),
            records: vec![record.clone()],
            more: true,
        }));
        let cursor = HydrateCursor { page_position: 4, after_lsn: Lsn(2) };
        round_trip(Message::Hydrate(HydrateRequest {
            request_id: 6,
            pg: PgId(1),
            epoch: Epoch(2),
            transfer: 3,
            cursor,
            bytes_max: 65536,
            changed_above: Lsn(9),
        }));
        for next in [Some(cursor), None] {
            round_trip(Message::HydrateBatch(HydrateBatch {
                request_id: 6,
                pg: PgId(1),
                epoch: Epoch(2),
                transfer: 3,
                complete_through: Lsn(3),
                min_read_point: Lsn(1),
                versions: vec![VersionImage { page: PageId(4), lsn: Lsn(2), image: Bytes::from_static(b"image") }],
                records: vec![record.clone()],
                next,
            }));
        }
        round_trip(Message::Error(ErrorResponse {
            request_id: 0,
            pg: PgId(2),
            code: ErrorCode::StaleEpoch,
            message: "epoch 1 < 2".into(),
        }));
    }

    #[test]
    fn every_block_message_round_trips() {
        use crate::ids::BlockId;
        let (pg, block) = (PgId(3), BlockId(77));
        round_trip(Message::BlockWrite(BlockWrite {
            request_id: 1,
            pg,
            block,
            version: 4,
            lease_epoch: 9,
            fencing_token: 12,
            repair: true,
            data: Bytes::from_static(b"block bytes"),
        }));
        round_trip(Message::BlockWriteAck(BlockWriteAck { request_id: 1, pg, block }));
        round_trip(Message::BlockRead(BlockRead { request_id: 2, pg, block, want_token: 12, sealed_cursor: 1 }));
        let version = BlockVersionInfo { version: 4, lease_epoch: 9, fencing_token: 12, repaired: true };
        round_trip(Message::BlockImage(BlockImage {
            request_id: 2,
            pg,
            block,
            history: vec![version, BlockVersionInfo { repaired: false, fencing_token: 3, ..version }],
            data_token: 12,
            data: Bytes::from_static(b"block bytes"),
            sealed_cursor: 1,
            sealed: vec![9, 10],
        }));
        round_trip(Message::Fence(FenceRequest {
            request_id: 3,
            pg,
            lease_epoch: 9,
            phase: FencePhase::Sealed,
            from_block: block,
        }));
        round_trip(Message::FenceAck(FenceAck {
            request_id: 3,
            pg,
            lease_epoch: 9,
            phase: FencePhase::Fence,
            blocks: vec![FencedBlock { block, version: 4, fencing_token: 12 }],
            complete: false,
        }));
    }

    proptest! {
        #[test]
        fn decode_never_panics(kind in 0u8..23, payload in proptest::collection::vec(any::<u8>(), 0..300)) {
            let frame = Frame { kind, payload: Bytes::from(payload) };
            let _ = Message::decode(&frame);
        }
    }
}
