//! The redo record: the only thing the front end ever sends to storage.
//!
//! A record changes one page. It carries three backlinks (A18 §2.2): the
//! previous LSN in the volume, the previous LSN in its protection group (the
//! *segment chain*, used to compute SCL and find holes) and the previous LSN
//! of its page (the *page chain*, used to materialize the page on demand).
//! The last record of a mini-transaction carries the CPL flag.
//!
//! ```text
//! offset  size  field
//!      0     4  length            whole record in bytes (header + body), u32 LE
//!      4     4  crc32c            CRC32C over bytes 8..length, u32 LE
//!      8     8  lsn
//!     16     8  prev_volume_lsn   previous record in the volume (0 = none)
//!     24     8  prev_segment_lsn  previous record in this PG (0 = none)
//!     32     8  prev_page_lsn     previous record of this page (0 = none)
//!     40     8  page
//!     48     4  pg
//!     52     1  op                1 = write bytes, 2 = zero page,
//!                                 3 = slotted-page op (see `slotted`)
//!     53     1  flags             bit 0 = CPL (consistency point)
//!     54     2  reserved          must be 0
//!     56     n  body              op-specific (see `PageOp`)
//! ```
//!
//! The record CRC is computed once by the writer and checked by the segment
//! on arrival, again after reading it back from disk, and never recomputed in
//! between: corruption anywhere on the path is caught end to end.

use crate::codec::{CodecError, Reader};
use crate::ids::{Lsn, PageId, PgId};
use crate::limits::RECORD_BODY_BYTES_MAX;
use crate::slotted::{SlotError, SlotOp};
use bytes::{BufMut, Bytes, BytesMut};
use thiserror::Error;

/// Bytes in a record header.
pub const RECORD_HEADER_BYTES: usize = 56;
const FLAG_CONSISTENCY_POINT: u8 = 1;
const OP_WRITE: u8 = 1;
const OP_ZERO_PAGE: u8 = 2;
const OP_SLOTTED: u8 = 3;

/// A change to one page.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PageOp {
    /// Copy `data` into the page at `offset`. Body: offset u32 LE, then data.
    Write { offset: u32, data: Bytes },
    /// Set every byte of the page to zero. Body: empty.
    ZeroPage,
    /// A physical-logical change to a slotted page (a B-tree page): "insert
    /// this cell at slot k". Body: see [`SlotOp::encode_into`].
    Slotted(SlotOp),
}

impl PageOp {
    fn code(&self) -> u8 {
        match self {
            PageOp::Write { .. } => OP_WRITE,
            PageOp::ZeroPage => OP_ZERO_PAGE,
            PageOp::Slotted(_) => OP_SLOTTED,
        }
    }

    /// Bytes of the encoded body.
    pub fn body_len(&self) -> usize {
        match self {
            PageOp::Write { data, .. } => 4 + data.len(),
            PageOp::ZeroPage => 0,
            PageOp::Slotted(op) => op.body_len(),
        }
    }

    /// Applies the change to `page`, refusing one that does not fit.
    pub fn apply(&self, page: &mut [u8]) -> Result<(), RecordError> {
        match self {
            PageOp::Write { offset, data } => {
                let start = *offset as usize;
                let end = start + data.len();
                if end > page.len() {
                    return Err(RecordError::OutsidePage { end, page_bytes: page.len() });
                }
                page[start..end].copy_from_slice(data);
            }
            PageOp::ZeroPage => page.fill(0),
            PageOp::Slotted(op) => op.apply(page)?,
        }
        Ok(())
    }

    /// The last byte offset this op touches (exclusive), for validation
    /// on arrival (a slotted op's fit is checked when it is applied).
    pub fn extent_end(&self) -> usize {
        match self {
            PageOp::Write { offset, data } => *offset as usize + data.len(),
            PageOp::ZeroPage | PageOp::Slotted(_) => 0,
        }
    }
}

/// Applies one page's chain of ops in order, like [`PageOp::apply`] op by
/// op, but checks a slotted page's layout ([`crate::slotted::check`]) only
/// before the first slotted op and again after a raw write: slotted ops
/// keep a checked page checked, and the per-op check (a sort of every
/// cell) was most of what materializing a page cost.
#[derive(Debug, Default)]
pub struct ChainApplier {
    slotted_checked: bool,
}

impl ChainApplier {
    pub fn apply(&mut self, op: &PageOp, page: &mut [u8]) -> Result<(), RecordError> {
        let PageOp::Slotted(slot_op) = op else {
            self.slotted_checked = false;
            return op.apply(page);
        };
        let formats = matches!(slot_op, SlotOp::Format { .. });
        if !self.slotted_checked && !formats {
            crate::slotted::check(page)?;
            self.slotted_checked = true;
        }
        let result = slot_op.apply_to_checked(page);
        if formats {
            self.slotted_checked = result.is_ok();
        }
        Ok(result?)
    }
}

/// Why a record was refused.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum RecordError {
    #[error("record checksum mismatch at lsn {lsn}: stored {expected:#010x}, computed {actual:#010x}")]
    BadChecksum { lsn: u64, expected: u32, actual: u32 },
    #[error("record body of {length} bytes exceeds RECORD_BODY_BYTES_MAX ({RECORD_BODY_BYTES_MAX})")]
    Oversized { length: usize },
    #[error("record length field {length} is shorter than the header")]
    BadLength { length: usize },
    #[error("unknown page op {0}")]
    UnknownOp(u8),
    #[error("record field {field} is invalid: {detail}")]
    Invalid { field: &'static str, detail: String },
    #[error("op writes up to byte {end} of a {page_bytes}-byte page")]
    OutsidePage { end: usize, page_bytes: usize },
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error(transparent)]
    Slotted(#[from] SlotError),
}

/// A decoded redo record. `encoded` is the exact byte image (header + body)
/// that was checksummed, shared zero-copy with the buffer it came from, so a
/// segment can log it without re-encoding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RedoRecord {
    pub lsn: Lsn,
    pub prev_volume_lsn: Lsn,
    pub prev_segment_lsn: Lsn,
    pub prev_page_lsn: Lsn,
    pub page: PageId,
    pub pg: PgId,
    /// The last record of a mini-transaction (a consistency point).
    pub consistency_point: bool,
    pub op: PageOp,
    pub encoded: Bytes,
}

/// The fields the writer chooses; [`RecordFields::encode`] seals them with a CRC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordFields {
    pub lsn: Lsn,
    pub prev_volume_lsn: Lsn,
    pub prev_segment_lsn: Lsn,
    pub prev_page_lsn: Lsn,
    pub page: PageId,
    pub pg: PgId,
    pub consistency_point: bool,
    pub op: PageOp,
}

impl RecordFields {
    /// Encoded size of this record.
    pub fn encoded_len(&self) -> usize {
        RECORD_HEADER_BYTES + self.op.body_len()
    }

    /// Appends the encoded record to `out`.
    pub fn encode_into(&self, out: &mut BytesMut) {
        let body_len = self.op.body_len();
        assert!(body_len <= RECORD_BODY_BYTES_MAX, "record body exceeds RECORD_BODY_BYTES_MAX");
        let start = out.len();
        let length = RECORD_HEADER_BYTES + body_len;
        out.reserve(length);
        out.put_u32_le(length as u32);
        out.put_u32_le(0);
        out.put_u64_le(self.lsn.0);
        out.put_u64_le(self.prev_volume_lsn.0);
        out.put_u64_le(self.prev_segment_lsn.0);
        out.put_u64_le(self.prev_page_lsn.0);
        out.put_u64_le(self.page.0);
        out.put_u32_le(self.pg.0);
        out.put_u8(self.op.code());
        out.put_u8(if self.consistency_point { FLAG_CONSISTENCY_POINT } else { 0 });
        out.put_u16_le(0);
        match &self.op {
            PageOp::Write { offset, data } => {
                out.put_u32_le(*offset);
                out.put_slice(data);
            }
            PageOp::ZeroPage => {}
            PageOp::Slotted(op) => op.encode_into(out),
        }
        let checksum = crc32c::crc32c(&out[start + 8..start + length]);
        out[start + 4..start + 8].copy_from_slice(&checksum.to_le_bytes());
    }

    /// Encodes into a standalone buffer and returns the decoded record.
    pub fn seal(&self) -> RedoRecord {
        let mut buffer = BytesMut::with_capacity(self.encoded_len());
        self.encode_into(&mut buffer);
        let (record, _) = RedoRecord::decode(&buffer.freeze(), 0).expect("a freshly sealed record decodes");
        record
    }
}

impl RedoRecord {
    /// Decodes and verifies the record starting at `offset` of `source`.
    /// Returns the record and the offset just past it.
    pub fn decode(source: &Bytes, offset: usize) -> Result<(RedoRecord, usize), RecordError> {
        let mut reader = Reader::new(&source[offset..]);
        let length = reader.u32()? as usize;
        if length < RECORD_HEADER_BYTES {
            return Err(RecordError::BadLength { length });
        }
        if length - RECORD_HEADER_BYTES > RECORD_BODY_BYTES_MAX {
            return Err(RecordError::Oversized { length: length - RECORD_HEADER_BYTES });
        }
        let expected = reader.u32()?;
        let covered = reader.take(length - 8)?;
        let mut fields = Reader::new(covered);
        let lsn = fields.u64()?;
        let actual = crc32c::crc32c(covered);
        if expected != actual {
            return Err(RecordError::BadChecksum { lsn, expected, actual });
        }
        let prev_volume_lsn = Lsn(fields.u64()?);
        let prev_segment_lsn = Lsn(fields.u64()?);
        let prev_page_lsn = Lsn(fields.u64()?);
        let page = PageId(fields.u64()?);
        let pg = PgId(fields.u32()?);
        let op_code = fields.u8()?;
        let flags = fields.u8()?;
        let reserved = fields.u16()?;
        if flags & !FLAG_CONSISTENCY_POINT != 0 || reserved != 0 {
            return Err(RecordError::Invalid {
                field: "flags",
                detail: format!("flags {flags:#x} reserved {reserved}"),
            });
        }
        if lsn == 0 || prev_segment_lsn.0 >= lsn || prev_page_lsn.0 >= lsn || prev_volume_lsn.0 >= lsn {
            return Err(RecordError::Invalid {
                field: "backlinks",
                detail: format!(
                    "lsn {lsn} with backlinks volume {prev_volume_lsn} segment {prev_segment_lsn} page {prev_page_lsn}"
                ),
            });
        }
        let body_start = offset + RECORD_HEADER_BYTES;
        let op = match op_code {
            OP_WRITE => {
                let write_offset = fields.u32()?;
                PageOp::Write { offset: write_offset, data: source.slice(body_start + 4..offset + length) }
            }
            OP_ZERO_PAGE => {
                fields.finish()?;
                PageOp::ZeroPage
            }
            OP_SLOTTED => PageOp::Slotted(SlotOp::decode(&source.slice(body_start..offset + length))?),
            other => return Err(RecordError::UnknownOp(other)),
        };
        let record = RedoRecord {
            lsn: Lsn(lsn),
            prev_volume_lsn,
            prev_segment_lsn,
            prev_page_lsn,
            page,
            pg,
            consistency_point: flags & FLAG_CONSISTENCY_POINT != 0,
            op,
            encoded: source.slice(offset..offset + length),
        };
        Ok((record, offset + length))
    }

    /// Decodes every record in `source`, which must hold whole records only.
    pub fn decode_all(source: &Bytes) -> Result<Vec<RedoRecord>, RecordError> {
        let mut records = Vec::new();
        let mut offset = 0;
        while offset < source.len() {
            let (record, next) = RedoRecord::decode(source, offset)?;
            records.push(record);
            offset = next;
        }
        Ok(records)
    }

    /// The writer-chosen fields of this record.
    pub fn fields(&self) -> RecordFields {
        RecordFields {
            lsn: self.lsn,
            prev_volume_lsn: self.prev_volume_lsn,
            prev_segment_lsn: self.prev_segment_lsn,
            prev_page_lsn: self.prev_page_lsn,
            page: self.page,
            pg: self.pg,
            consistency_point: self.consistency_point,
            op: self.op.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::slotted::{PageHeader, PageKind};
    use proptest::prelude::*;

    /// A chain applied with one layout check gives what op-by-op checked
    /// applies give: the same page, and the same refusals, also after a raw
    /// write that breaks the layout behind the slotted ops' back.
    #[test]
    fn a_chain_applier_matches_op_by_op_applies() {
        let header = PageHeader { kind: PageKind::Leaf, level: 0, owner: 1, right: 0, aux: 0 };
        let cell = |text: &'static [u8]| Bytes::from_static(text);
        let slotted = |op| PageOp::Slotted(op);
        let chain = vec![
            slotted(SlotOp::Format { header, cells: vec![cell(b"b")] }),
            slotted(SlotOp::Insert { slot: 0, cell: cell(b"a") }),
            slotted(SlotOp::Replace { slot: 1, cell: cell(b"bbb") }),
            slotted(SlotOp::Delete { slot: 5 }),
            slotted(SlotOp::Insert { slot: 2, cell: cell(b"c") }),
            PageOp::Write { offset: 2, data: Bytes::from_static(&[0xff, 0x7f]) },
            slotted(SlotOp::Insert { slot: 0, cell: cell(b"z") }),
            slotted(SlotOp::Format { header, cells: vec![] }),
            slotted(SlotOp::Insert { slot: 0, cell: cell(b"y") }),
        ];
        let (mut one_check, mut every_check) = (vec![0u8; 512], vec![0u8; 512]);
        let mut applier = ChainApplier::default();
        let mut refused = 0;
        for op in &chain {
            let (chained, alone) = (applier.apply(op, &mut one_check), op.apply(&mut every_check));
            assert_eq!(chained, alone, "{op:?}");
            refused += usize::from(alone.is_err());
            assert!(one_check == every_check, "the pages differ after {op:?}");
        }
        assert_eq!(refused, 2, "the missing slot, and the insert after the raw write broke the slot count");
    }

    fn sample(lsn: u64) -> RecordFields {
        RecordFields {
            lsn: Lsn(lsn),
            prev_volume_lsn: Lsn(lsn - 1),
            prev_segment_lsn: Lsn(lsn - 1),
            prev_page_lsn: Lsn::ZERO,
            page: PageId(9),
            pg: PgId(0),
            consistency_point: true,
            op: PageOp::Write { offset: 16, data: Bytes::from_static(b"redo") },
        }
    }

    #[test]
    fn round_trip_keeps_every_field() {
        let fields = sample(5);
        let record = fields.seal();
        assert_eq!(record.fields(), fields);
        assert_eq!(record.encoded.len(), fields.encoded_len());
    }

    #[test]
    fn apply_refuses_writes_past_the_page() {
        let mut page = vec![0u8; 8];
        let op = PageOp::Write { offset: 6, data: Bytes::from_static(b"abc") };
        assert_eq!(op.apply(&mut page), Err(RecordError::OutsidePage { end: 9, page_bytes: 8 }));
        PageOp::Write { offset: 5, data: Bytes::from_static(b"abc") }.apply(&mut page).unwrap();
        assert_eq!(&page, &[0, 0, 0, 0, 0, b'a', b'b', b'c']);
        PageOp::ZeroPage.apply(&mut page).unwrap();
        assert_eq!(page, vec![0; 8]);
    }

    #[test]
    fn backlinks_must_point_backwards() {
        let mut fields = sample(5);
        fields.prev_page_lsn = Lsn(5);
        let mut buffer = BytesMut::new();
        fields.encode_into(&mut buffer);
        assert!(matches!(RedoRecord::decode(&buffer.freeze(), 0), Err(RecordError::Invalid { .. })));
    }

    proptest! {
        #[test]
        fn every_bit_flip_is_caught(position in any::<prop::sample::Index>(), bit in 0u8..8) {
            let record = sample(77).seal();
            let mut corrupt = BytesMut::from(&record.encoded[..]);
            let index = position.index(corrupt.len());
            corrupt[index] ^= 1 << bit;
            prop_assert!(RedoRecord::decode(&corrupt.freeze(), 0).is_err());
        }
    }
}
