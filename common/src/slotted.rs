//! Slotted pages and their physical-logical redo ops.
//!
//! The SQL engine's B-tree keeps its pages in this layout, and changes
//! them only with the ops below ("insert this cell at slot k"), never by
//! writing bytes or whole pages. The front end applies an op to its
//! cached copy; a storage segment applies the same op, with the same code,
//! when it materializes the page from its redo chain. Every op is
//! deterministic down to the byte (including when it compacts the cell
//! area), so the two copies stay identical, and a test checks that.
//!
//! ```text
//! offset  size  field
//!      0     1  kind            0 = never formatted (all zero), 1 = B-tree leaf,
//!                               2 = B-tree inner, 3 = meta, 4 = undo log
//!      1     1  level           0 for leaves, parent = child + 1
//!      2     2  slot_count      u16 LE
//!      4     4  cells_start     lowest byte of the cell area, u32 LE
//!      8     4  dead_bytes      bytes of removed cells not yet compacted away
//!     12     4  owner           the tree (or 0), u32 LE
//!     16     8  right           right sibling page (0 = none), u64 LE
//!     24     8  aux             kind-specific (an inner page's leftmost child,
//!                               the meta page's next never-used page), u64 LE
//!     32  4 x n slot array      per slot: cell offset u16 LE, cell length u16 LE
//!    ...        free space
//!  cells_start  cells           packed toward the end of the page
//! ```
//!
//! Invariants (checked by [`check`], and by the property test against a
//! `Vec` model): the slot array ends at or below `cells_start`; every
//! cell lies inside `[cells_start, page_bytes)`; cells do not overlap;
//! the cell bytes not referenced by a slot add up to `dead_bytes`.
//! Free space is `cells_start - (32 + 4 x slot_count) + dead_bytes`; an
//! insert that fits only with the dead bytes compacts the page first
//! (cells rewritten toward the end, in slot order).

use crate::codec::{CodecError, Reader};
use bytes::{BufMut, Bytes, BytesMut};

/// Bytes of the page header.
pub const HEADER_BYTES: usize = 32;
/// Bytes of one slot-array entry.
pub const SLOT_BYTES: usize = 4;
/// Longest cell: a cell's offset and length are u16.
pub const CELL_BYTES_MAX: usize = u16::MAX as usize;
/// Most cells a [`SlotOp::Format`] carries.
pub const FORMAT_CELLS_MAX: usize = 4096;

/// What a page holds (byte 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum PageKind {
    Unformatted = 0,
    Leaf = 1,
    Inner = 2,
    Meta = 3,
    Undo = 4,
}

impl PageKind {
    pub fn from_byte(byte: u8) -> Option<PageKind> {
        Some(match byte {
            0 => PageKind::Unformatted,
            1 => PageKind::Leaf,
            2 => PageKind::Inner,
            3 => PageKind::Meta,
            4 => PageKind::Undo,
            _ => return None,
        })
    }
}

/// The header fields a [`SlotOp::Format`] sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageHeader {
    pub kind: PageKind,
    pub level: u8,
    pub owner: u32,
    pub right: u64,
    pub aux: u64,
}

/// A physical-logical change to a slotted page.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SlotOp {
    /// Zero the page and write a header, then these cells in slot order.
    Format { header: PageHeader, cells: Vec<Bytes> },
    /// Insert a cell at `slot`, moving later slots up by one.
    Insert { slot: u16, cell: Bytes },
    /// Remove the cell at `slot`, moving later slots down by one.
    Delete { slot: u16 },
    /// Replace the cell at `slot` by another.
    Replace { slot: u16, cell: Bytes },
    /// Remove every cell from slot `keep` on.
    Truncate { keep: u16 },
    /// Set the header's `right` and `aux` links.
    SetLinks { right: u64, aux: u64 },
}

const SUB_FORMAT: u8 = 1;
const SUB_INSERT: u8 = 2;
const SUB_DELETE: u8 = 3;
const SUB_REPLACE: u8 = 4;
const SUB_TRUNCATE: u8 = 5;
const SUB_SET_LINKS: u8 = 6;

/// Why a slot op was refused. The page is left as it was.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SlotError {
    #[error("the page is not formatted (or its kind byte {0} is unknown)")]
    NotFormatted(u8),
    #[error("slot {slot} is past the {count} slots of the page")]
    NoSuchSlot { slot: usize, count: usize },
    #[error("a cell of {needed} bytes (with its slot) does not fit in {free} free bytes")]
    NoRoom { needed: usize, free: usize },
    #[error("a cell must be 1 to {CELL_BYTES_MAX} bytes, not {0}")]
    BadCell(usize),
    #[error("a page of {0} bytes cannot be slotted (512 to 65536)")]
    BadPageSize(usize),
    #[error("the page is inconsistent: {0}")]
    Corrupt(String),
}

fn u16_at(page: &[u8], at: usize) -> usize {
    u16::from_le_bytes([page[at], page[at + 1]]) as usize
}

fn u32_at(page: &[u8], at: usize) -> usize {
    u32::from_le_bytes(page[at..at + 4].try_into().expect("4 bytes")) as usize
}

fn u64_at(page: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(page[at..at + 8].try_into().expect("8 bytes"))
}

fn put_u16(page: &mut [u8], at: usize, value: usize) {
    page[at..at + 2].copy_from_slice(&(value as u16).to_le_bytes());
}

fn put_u32(page: &mut [u8], at: usize, value: usize) {
    page[at..at + 4].copy_from_slice(&(value as u32).to_le_bytes());
}

/// Read access to a slotted page's fields and cells.
#[derive(Clone, Copy, Debug)]
pub struct SlottedPage<'a> {
    bytes: &'a [u8],
}

impl<'a> SlottedPage<'a> {
    /// Views `bytes` as a slotted page; refuses an unformatted page or an
    /// inconsistent one (so no accessor can index out of bounds).
    pub fn new(bytes: &'a [u8]) -> Result<SlottedPage<'a>, SlotError> {
        check(bytes)?;
        Ok(SlottedPage { bytes })
    }

    pub fn kind(&self) -> PageKind {
        PageKind::from_byte(self.bytes[0]).expect("checked")
    }
    pub fn level(&self) -> u8 {
        self.bytes[1]
    }
    pub fn slot_count(&self) -> usize {
        u16_at(self.bytes, 2)
    }
    pub fn owner(&self) -> u32 {
        u32_at(self.bytes, 12) as u32
    }
    pub fn right(&self) -> u64 {
        u64_at(self.bytes, 16)
    }
    pub fn aux(&self) -> u64 {
        u64_at(self.bytes, 24)
    }
    pub fn header(&self) -> PageHeader {
        PageHeader { kind: self.kind(), level: self.level(), owner: self.owner(), right: self.right(), aux: self.aux() }
    }
    /// The cell in `slot` (which must be below [`Self::slot_count`]).
    pub fn cell(&self, slot: usize) -> &'a [u8] {
        let (offset, length) = slot_entry(self.bytes, slot);
        &self.bytes[offset..offset + length]
    }
    pub fn cells(&self) -> impl Iterator<Item = &'a [u8]> + '_ {
        (0..self.slot_count()).map(|slot| self.cell(slot))
    }
    /// Bytes a new cell (with its slot) may use.
    pub fn free_bytes(&self) -> usize {
        free_bytes(self.bytes)
    }
}

fn slot_entry(page: &[u8], slot: usize) -> (usize, usize) {
    let at = HEADER_BYTES + slot * SLOT_BYTES;
    (u16_at(page, at), u16_at(page, at + 2))
}

fn free_bytes(page: &[u8]) -> usize {
    let slots_end = HEADER_BYTES + u16_at(page, 2) * SLOT_BYTES;
    u32_at(page, 4) - slots_end + u32_at(page, 8)
}

/// Checks every invariant of the module docs.
pub fn check(page: &[u8]) -> Result<(), SlotError> {
    if !(512..=65536).contains(&page.len()) {
        return Err(SlotError::BadPageSize(page.len()));
    }
    match PageKind::from_byte(page[0]) {
        None | Some(PageKind::Unformatted) => return Err(SlotError::NotFormatted(page[0])),
        Some(_) => {}
    }
    let count = u16_at(page, 2);
    let cells_start = u32_at(page, 4);
    let slots_end = HEADER_BYTES + count * SLOT_BYTES;
    if slots_end > cells_start || cells_start > page.len() {
        return Err(SlotError::Corrupt(format!("{count} slots end at {slots_end}, cells start at {cells_start}")));
    }
    let mut extents: Vec<(usize, usize)> = (0..count).map(|slot| slot_entry(page, slot)).collect();
    extents.sort_unstable();
    let mut end_of_previous = cells_start;
    let mut used = 0;
    for (offset, length) in extents {
        if length == 0 || offset < end_of_previous || offset + length > page.len() {
            return Err(SlotError::Corrupt(format!("cell at {offset} of {length} bytes overlaps or lies outside")));
        }
        end_of_previous = offset + length;
        used += length;
    }
    let dead = u32_at(page, 8);
    if cells_start + used + dead != page.len() {
        return Err(SlotError::Corrupt(format!(
            "cells from {cells_start}: {used} bytes used and {dead} dead in a {}-byte page",
            page.len()
        )));
    }
    Ok(())
}

fn check_cell(cell: &[u8]) -> Result<(), SlotError> {
    if cell.is_empty() || cell.len() > CELL_BYTES_MAX { Err(SlotError::BadCell(cell.len())) } else { Ok(()) }
}

/// Rewrites the cell area packed toward the end, in slot order.
fn compact(page: &mut [u8]) {
    let count = u16_at(page, 2);
    let cells: Vec<Vec<u8>> = (0..count)
        .map(|slot| {
            let (offset, length) = slot_entry(page, slot);
            page[offset..offset + length].to_vec()
        })
        .collect();
    let mut cells_start = page.len();
    for (slot, cell) in cells.iter().enumerate() {
        cells_start -= cell.len();
        page[cells_start..cells_start + cell.len()].copy_from_slice(cell);
        let at = HEADER_BYTES + slot * SLOT_BYTES;
        put_u16(page, at, cells_start);
        put_u16(page, at + 2, cell.len());
    }
    let slots_end = HEADER_BYTES + count * SLOT_BYTES;
    page[slots_end..cells_start].fill(0);
    put_u32(page, 4, cells_start);
    put_u32(page, 8, 0);
}

fn insert(page: &mut [u8], slot: usize, cell: &[u8]) -> Result<(), SlotError> {
    check_cell(cell)?;
    let count = u16_at(page, 2);
    if slot > count {
        return Err(SlotError::NoSuchSlot { slot, count });
    }
    let needed = cell.len() + SLOT_BYTES;
    let free = free_bytes(page);
    if needed > free || count == u16::MAX as usize {
        return Err(SlotError::NoRoom { needed, free });
    }
    let slots_end = HEADER_BYTES + count * SLOT_BYTES;
    if u32_at(page, 4) - slots_end < needed {
        compact(page);
    }
    let cells_start = u32_at(page, 4) - cell.len();
    page[cells_start..cells_start + cell.len()].copy_from_slice(cell);
    let at = HEADER_BYTES + slot * SLOT_BYTES;
    page.copy_within(at..slots_end, at + SLOT_BYTES);
    put_u16(page, at, cells_start);
    put_u16(page, at + 2, cell.len());
    put_u16(page, 2, count + 1);
    put_u32(page, 4, cells_start);
    Ok(())
}

fn delete(page: &mut [u8], slot: usize) -> Result<(), SlotError> {
    let count = u16_at(page, 2);
    if slot >= count {
        return Err(SlotError::NoSuchSlot { slot, count });
    }
    let (offset, length) = slot_entry(page, slot);
    page[offset..offset + length].fill(0);
    let at = HEADER_BYTES + slot * SLOT_BYTES;
    let slots_end = HEADER_BYTES + count * SLOT_BYTES;
    page.copy_within(at + SLOT_BYTES..slots_end, at);
    page[slots_end - SLOT_BYTES..slots_end].fill(0);
    put_u16(page, 2, count - 1);
    if offset == u32_at(page, 4) {
        put_u32(page, 4, offset + length); // the lowest cell: its bytes are free at once
    } else {
        put_u32(page, 8, u32_at(page, 8) + length);
    }
    if count == 1 {
        put_u32(page, 4, page.len());
        put_u32(page, 8, 0);
    }
    Ok(())
}

fn format(page: &mut [u8], header: &PageHeader, cells: &[Bytes]) -> Result<(), SlotError> {
    if !(512..=65536).contains(&page.len()) {
        return Err(SlotError::BadPageSize(page.len()));
    }
    if header.kind == PageKind::Unformatted {
        return Err(SlotError::NotFormatted(0));
    }
    let needed: usize = cells.iter().map(|cell| cell.len() + SLOT_BYTES).sum::<usize>() + HEADER_BYTES;
    if needed > page.len() {
        return Err(SlotError::NoRoom { needed, free: page.len() - HEADER_BYTES });
    }
    for cell in cells {
        check_cell(cell)?;
    }
    page.fill(0);
    page[0] = header.kind as u8;
    page[1] = header.level;
    put_u32(page, 4, page.len());
    put_u32(page, 12, header.owner as usize);
    page[16..24].copy_from_slice(&header.right.to_le_bytes());
    page[24..32].copy_from_slice(&header.aux.to_le_bytes());
    for (slot, cell) in cells.iter().enumerate() {
        insert(page, slot, cell)?;
    }
    Ok(())
}

impl SlotOp {
    /// Applies the op to `page`, refusing one that does not fit; a refused
    /// op leaves the page unchanged.
    pub fn apply(&self, page: &mut [u8]) -> Result<(), SlotError> {
        if !matches!(self, SlotOp::Format { .. }) {
            check(page)?;
        }
        self.apply_to_checked(page)
    }

    /// [`Self::apply`] to a page that passes [`check`] (any page, for a
    /// format). Every op leaves a checked page passing `check` (a refused
    /// one leaves it unchanged), so a chain of ops on one page needs only
    /// the first check (`common::redo::ChainApplier`).
    pub fn apply_to_checked(&self, page: &mut [u8]) -> Result<(), SlotError> {
        match self {
            SlotOp::Format { header, cells } => format(page, header, cells),
            SlotOp::Insert { slot, cell } => insert(page, *slot as usize, cell),
            SlotOp::Delete { slot } => delete(page, *slot as usize),
            SlotOp::Replace { slot, cell } => {
                let slot = *slot as usize;
                check_cell(cell)?;
                let count = u16_at(page, 2);
                if slot >= count {
                    return Err(SlotError::NoSuchSlot { slot, count });
                }
                let (_, old_length) = slot_entry(page, slot);
                let free = free_bytes(page) + old_length + SLOT_BYTES;
                if cell.len() + SLOT_BYTES > free {
                    return Err(SlotError::NoRoom { needed: cell.len() + SLOT_BYTES, free });
                }
                delete(page, slot)?;
                insert(page, slot, cell)
            }
            SlotOp::Truncate { keep } => {
                let count = u16_at(page, 2);
                if *keep as usize > count {
                    return Err(SlotError::NoSuchSlot { slot: *keep as usize, count });
                }
                for slot in (*keep as usize..count).rev() {
                    delete(page, slot)?;
                }
                Ok(())
            }
            SlotOp::SetLinks { right, aux } => {
                page[16..24].copy_from_slice(&right.to_le_bytes());
                page[24..32].copy_from_slice(&aux.to_le_bytes());
                Ok(())
            }
        }
    }

    /// Bytes of the encoded body (the redo record's op-specific part).
    pub fn body_len(&self) -> usize {
        1 + match self {
            SlotOp::Format { cells, .. } => 24 + 2 + cells.iter().map(|cell| 2 + cell.len()).sum::<usize>(),
            SlotOp::Insert { cell, .. } | SlotOp::Replace { cell, .. } => 2 + cell.len(),
            SlotOp::Delete { .. } | SlotOp::Truncate { .. } => 2,
            SlotOp::SetLinks { .. } => 16,
        }
    }

    /// Appends the body: a sub-op byte, then its fields (docs/page-format.md).
    pub fn encode_into(&self, out: &mut BytesMut) {
        match self {
            SlotOp::Format { header, cells } => {
                assert!(cells.len() <= FORMAT_CELLS_MAX, "a format op carries at most FORMAT_CELLS_MAX cells");
                out.put_u8(SUB_FORMAT);
                out.put_u8(header.kind as u8);
                out.put_u8(header.level);
                out.put_u16_le(0);
                out.put_u32_le(header.owner);
                out.put_u64_le(header.right);
                out.put_u64_le(header.aux);
                out.put_u16_le(cells.len() as u16);
                for cell in cells {
                    out.put_u16_le(cell.len() as u16);
                    out.put_slice(cell);
                }
            }
            SlotOp::Insert { slot, cell } | SlotOp::Replace { slot, cell } => {
                out.put_u8(if matches!(self, SlotOp::Insert { .. }) { SUB_INSERT } else { SUB_REPLACE });
                out.put_u16_le(*slot);
                out.put_slice(cell);
            }
            SlotOp::Delete { slot } => {
                out.put_u8(SUB_DELETE);
                out.put_u16_le(*slot);
            }
            SlotOp::Truncate { keep } => {
                out.put_u8(SUB_TRUNCATE);
                out.put_u16_le(*keep);
            }
            SlotOp::SetLinks { right, aux } => {
                out.put_u8(SUB_SET_LINKS);
                out.put_u64_le(*right);
                out.put_u64_le(*aux);
            }
        }
    }

    /// Decodes a body; cells are zero-copy slices of `body`.
    pub fn decode(body: &Bytes) -> Result<SlotOp, CodecError> {
        let mut reader = Reader::new(body);
        let invalid = |detail: String| CodecError::Invalid { field: "slot op", detail };
        let op = match reader.u8()? {
            SUB_FORMAT => {
                let kind_byte = reader.u8()?;
                let kind = PageKind::from_byte(kind_byte)
                    .filter(|kind| *kind != PageKind::Unformatted)
                    .ok_or_else(|| invalid(format!("page kind {kind_byte}")))?;
                let level = reader.u8()?;
                if reader.u16()? != 0 {
                    return Err(invalid("reserved bytes are not zero".into()));
                }
                let owner = reader.u32()?;
                let right = reader.u64()?;
                let aux = reader.u64()?;
                let count = reader.u16()? as usize;
                if count > FORMAT_CELLS_MAX {
                    return Err(invalid(format!("{count} cells, more than FORMAT_CELLS_MAX")));
                }
                let mut cells = Vec::with_capacity(count);
                for _ in 0..count {
                    let length = reader.u16()? as usize;
                    let start = reader.offset();
                    reader.take(length)?;
                    cells.push(body.slice(start..start + length));
                }
                SlotOp::Format { header: PageHeader { kind, level, owner, right, aux }, cells }
            }
            sub @ (SUB_INSERT | SUB_REPLACE) => {
                let slot = reader.u16()?;
                let cell = body.slice(reader.offset()..);
                reader.take(cell.len())?;
                if sub == SUB_INSERT { SlotOp::Insert { slot, cell } } else { SlotOp::Replace { slot, cell } }
            }
            SUB_DELETE => SlotOp::Delete { slot: reader.u16()? },
            SUB_TRUNCATE => SlotOp::Truncate { keep: reader.u16()? },
            SUB_SET_LINKS => SlotOp::SetLinks { right: reader.u64()?, aux: reader.u64()? },
            other => return Err(invalid(format!("sub-op {other}"))),
        };
        reader.finish()?;
        Ok(op)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const PAGE: usize = 1024;

    fn leaf() -> PageHeader {
        PageHeader { kind: PageKind::Leaf, level: 0, owner: 7, right: 0, aux: 0 }
    }

    fn cells(page: &[u8]) -> Vec<Vec<u8>> {
        SlottedPage::new(page).unwrap().cells().map(<[u8]>::to_vec).collect()
    }

    #[test]
    fn the_documented_layout_is_what_format_and_insert_write() {
        let mut page = vec![0u8; PAGE];
        let header = PageHeader { kind: PageKind::Inner, level: 2, owner: 5, right: 9, aux: 11 };
        SlotOp::Format { header, cells: vec![Bytes::from_static(b"bb")] }.apply(&mut page).unwrap();
        SlotOp::Insert { slot: 0, cell: Bytes::from_static(b"aaa") }.apply(&mut page).unwrap();
        assert_eq!(&page[..4], &[2, 2, 2, 0]); // kind, level, two slots
        assert_eq!(u32_at(&page, 4), PAGE - 5); // "bb" at 1022, then "aaa" at 1019
        assert_eq!((u32_at(&page, 8), u32_at(&page, 12)), (0, 5));
        assert_eq!((u64_at(&page, 16), u64_at(&page, 24)), (9, 11));
        assert_eq!(slot_entry(&page, 0), (PAGE - 5, 3));
        assert_eq!(slot_entry(&page, 1), (PAGE - 2, 2));
        assert_eq!(&page[PAGE - 5..], b"aaabb");
        assert_eq!(free_bytes(&page), PAGE - HEADER_BYTES - 2 * SLOT_BYTES - 5);
    }

    #[test]
    fn refused_ops_leave_the_page_unchanged() {
        let mut page = vec![0u8; PAGE];
        assert_eq!(
            SlotOp::Insert { slot: 0, cell: Bytes::from_static(b"x") }.apply(&mut page),
            Err(SlotError::NotFormatted(0))
        );
        SlotOp::Format { header: leaf(), cells: vec![] }.apply(&mut page).unwrap();
        let before = page.clone();
        let big = Bytes::from(vec![1u8; PAGE]);
        assert!(matches!(SlotOp::Insert { slot: 0, cell: big }.apply(&mut page), Err(SlotError::NoRoom { .. })));
        assert_eq!(SlotOp::Delete { slot: 0 }.apply(&mut page), Err(SlotError::NoSuchSlot { slot: 0, count: 0 }));
        assert_eq!(SlotOp::Insert { slot: 0, cell: Bytes::new() }.apply(&mut page), Err(SlotError::BadCell(0)));
        assert_eq!(page, before);
    }

    #[derive(Clone, Debug)]
    enum ModelOp {
        Insert(usize, Vec<u8>),
        Delete(usize),
        Replace(usize, Vec<u8>),
        Truncate(usize),
    }

    fn model_op() -> impl Strategy<Value = ModelOp> {
        let cell = proptest::collection::vec(any::<u8>(), 1..120);
        prop_oneof![
            4 => (any::<usize>(), cell.clone()).prop_map(|(slot, cell)| ModelOp::Insert(slot, cell)),
            2 => any::<usize>().prop_map(ModelOp::Delete),
            2 => (any::<usize>(), cell).prop_map(|(slot, cell)| ModelOp::Replace(slot, cell)),
            1 => any::<usize>().prop_map(ModelOp::Truncate),
        ]
    }

    proptest! {
        /// Every op sequence keeps the invariants, matches a `Vec` of cells,
        /// refuses exactly what does not fit, and survives an encode/decode.
        #[test]
        fn slot_ops_match_a_vector_of_cells(ops in proptest::collection::vec(model_op(), 1..200)) {
            let mut page = vec![0u8; PAGE];
            SlotOp::Format { header: leaf(), cells: vec![] }.apply(&mut page).unwrap();
            let mut model: Vec<Vec<u8>> = Vec::new();
            for op in ops {
                let used: usize = model.iter().map(|cell| cell.len() + SLOT_BYTES).sum();
                let free = PAGE - HEADER_BYTES - used;
                let (op, fits) = match op {
                    ModelOp::Insert(slot, cell) => {
                        let slot = slot % (model.len() + 1);
                        let fits = cell.len() + SLOT_BYTES <= free;
                        if fits { model.insert(slot, cell.clone()); }
                        (SlotOp::Insert { slot: slot as u16, cell: Bytes::from(cell) }, fits)
                    }
                    ModelOp::Delete(slot) if !model.is_empty() => {
                        let slot = slot % model.len();
                        model.remove(slot);
                        (SlotOp::Delete { slot: slot as u16 }, true)
                    }
                    ModelOp::Replace(slot, cell) if !model.is_empty() => {
                        let slot = slot % model.len();
                        let fits = cell.len() <= free + model[slot].len();
                        if fits { model[slot] = cell.clone(); }
                        (SlotOp::Replace { slot: slot as u16, cell: Bytes::from(cell) }, fits)
                    }
                    ModelOp::Truncate(keep) => {
                        let keep = keep % (model.len() + 1);
                        model.truncate(keep);
                        (SlotOp::Truncate { keep: keep as u16 }, true)
                    }
                    ModelOp::Delete(_) | ModelOp::Replace(..) => continue,
                };
                let mut encoded = BytesMut::new();
                op.encode_into(&mut encoded);
                prop_assert_eq!(encoded.len(), op.body_len());
                let decoded = SlotOp::decode(&encoded.freeze()).unwrap();
                prop_assert_eq!(&decoded, &op);
                let before = page.clone();
                let result = decoded.apply(&mut page);
                prop_assert_eq!(result.is_ok(), fits, "{:?}", result);
                if !fits { prop_assert_eq!(&page, &before); }
                prop_assert!(check(&page).is_ok(), "{:?}", check(&page));
                prop_assert_eq!(cells(&page), model.clone());
                prop_assert_eq!(free_bytes(&page), PAGE - HEADER_BYTES - model.iter().map(|cell| cell.len() + SLOT_BYTES).sum::<usize>());
            }
            // A format from the cells gives the same cells (a split's new page).
            let mut copy = vec![0u8; PAGE];
            let as_bytes = model.iter().map(|cell| Bytes::from(cell.clone())).collect();
            SlotOp::Format { header: leaf(), cells: as_bytes }.apply(&mut copy).unwrap();
            prop_assert_eq!(cells(&copy), model);
        }

        /// Decoding never panics, whatever the bytes.
        #[test]
        fn decoding_arbitrary_bytes_never_panics(body in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = SlotOp::decode(&Bytes::from(body));
        }
    }
}
