//! How a logged update changes a metadata block (`docs/frangipani-layout.md`
//! §7): the one place that knows which blocks are framed (inodes and
//! directory blocks: magic, CRC32C, version) and which are raw bits
//! (bitmap portions).
//!
//! A [`Record`] replaces `bytes` at `offset` and makes the block `version`.
//! In a framed block the record patches the block image and then the
//! version field and the CRC are rewritten, so the block decodes with the
//! record's version; a raw block is only patched (its version is the block
//! volume's).

use crate::layout::{INODE_BYTES, Layout, SMALL_BLOCK_BYTES};
use crate::wal::Record;
use thiserror::Error;

/// How a metadata block is laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// magic at 0..4, CRC32C of 8.. at 4..8, version at 8..16.
    Framed { magic: [u8; 4], bytes: usize },
    /// Bits only (a bitmap portion).
    Raw { bytes: usize },
}

/// Why a record cannot apply.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum ApplyError {
    #[error("block {0} is not a metadata block")]
    NotMetadata(u64),
    #[error("a record of {length} bytes at {offset} does not fit in a {block_bytes}-byte block, or touches its frame")]
    OutOfBounds { offset: usize, length: usize, block_bytes: usize },
}

/// The framing of a metadata block; directory blocks are the small blocks
/// a directory owns, which only the caller knows (`directory`).
pub fn framing(layout: &Layout, block: u64, directory: bool) -> Result<Framing, ApplyError> {
    if layout.is_inode_block(block) {
        Ok(Framing::Framed { magic: *b"FINO", bytes: INODE_BYTES })
    } else if layout.is_bitmap_block(block) {
        Ok(Framing::Raw { bytes: SMALL_BLOCK_BYTES })
    } else if directory && layout.is_small_block(block) {
        Ok(Framing::Framed { magic: *b"FDIR", bytes: SMALL_BLOCK_BYTES })
    } else {
        Err(ApplyError::NotMetadata(block))
    }
}

/// The block after `record`; `image` is its current content (empty if
/// never written).
pub fn apply(framing: Framing, image: &[u8], record: &Record) -> Result<Vec<u8>, ApplyError> {
    let (bytes, first_patchable) = match framing {
        Framing::Framed { bytes, .. } => (bytes, 16),
        Framing::Raw { bytes } => (bytes, 0),
    };
    let (offset, length) = (usize::from(record.offset), record.bytes.len());
    if offset < first_patchable || offset + length > bytes {
        return Err(ApplyError::OutOfBounds { offset, length, block_bytes: bytes });
    }
    let mut out = if image.len() == bytes { image.to_vec() } else { vec![0; bytes] };
    out[offset..offset + length].copy_from_slice(&record.bytes);
    if let Framing::Framed { magic, .. } = framing {
        out[..4].copy_from_slice(&magic);
        out[8..16].copy_from_slice(&record.version.to_le_bytes());
        let checksum = crc32c::crc32c(&out[8..]);
        out[4..8].copy_from_slice(&checksum.to_le_bytes());
    }
    Ok(out)
}

/// The record that takes a framed block from `before` (empty: never
/// written) to `after`: the smallest span of payload bytes that differ,
/// which is what the workstation logs.
pub fn diff(before: &[u8], after: &[u8], block: u64, version: u64) -> Record {
    assert!(before.is_empty() || before.len() == after.len(), "a record changes a block of one size");
    let payload = |image: &[u8], at: usize| image.get(at).copied().unwrap_or(0);
    let differs = |at: &usize| payload(before, *at) != after[*at];
    let first = (16..after.len()).find(differs).unwrap_or(16);
    let last = (16..after.len()).rev().find(differs).map_or(first, |at| at + 1);
    Record { block, version, offset: first as u16, bytes: after[first..last].to_vec() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::directory::DirectoryBlock;
    use crate::inode::{Inode, Kind};
    use crate::layout::{ParameterBlock, Resource};

    #[test]
    fn a_logged_inode_change_replays_into_the_new_inode() {
        let layout = Layout::new(ParameterBlock::small()).expect("layout");
        let block = layout.inode_block(5);
        let framing = framing(&layout, block, false).expect("an inode block is metadata");
        let before = Inode { version: 3, kind: Kind::File, size: 10, ..Inode::free() };
        let after = Inode { version: 4, size: 4096, links: 2, ..before.clone() };
        let record = diff(&before.encode().expect("encodes"), &after.encode().expect("encodes"), block, 4);
        assert!(record.bytes.len() < 40, "a record carries only what changed: {} bytes", record.bytes.len());
        let replayed = apply(framing, &before.encode().expect("encodes"), &record).expect("fits");
        assert_eq!(Inode::decode(&replayed), Ok(after));
        // From a block never written, too (a new inode).
        let fresh = Inode { version: 1, kind: Kind::Directory, links: 2, ..Inode::free() };
        let record = diff(&[], &fresh.encode().expect("encodes"), block, 1);
        assert_eq!(Inode::decode(&apply(framing, &[], &record).expect("fits")), Ok(fresh));
    }

    #[test]
    fn a_logged_directory_change_replays_and_bitmaps_are_patched_raw() {
        let layout = Layout::new(ParameterBlock::small()).expect("layout");
        let block = layout.data_block(Resource::SmallBlock, 3);
        assert_eq!(framing(&layout, block, false), Err(ApplyError::NotMetadata(block)), "file data is not logged");
        let framing_of_directory = framing(&layout, block, true).expect("a directory block");
        let mut directory = DirectoryBlock::default();
        directory.version = 8;
        directory.insert(b"a", 10, Kind::File).expect("room");
        let before = directory.encode();
        directory.insert(b"b", 11, Kind::File).expect("room");
        directory.version = 9;
        let record = diff(&before, &directory.encode(), block, 9);
        let replayed = apply(framing_of_directory, &before, &record).expect("fits");
        assert_eq!(DirectoryBlock::decode(&replayed), Ok(directory));

        let bitmap = layout.bitmap_block(Resource::Inode, 0);
        let raw = framing(&layout, bitmap, false).expect("bitmaps are metadata");
        let patched =
            apply(raw, &[], &Record { block: bitmap, version: 2, offset: 0, bytes: vec![0b101] }).expect("fits");
        assert_eq!(patched[0], 0b101);
        let bad = Record { block, version: 1, offset: 4, bytes: vec![0; 4] };
        assert!(apply(framing_of_directory, &before, &bad).is_err(), "a record never touches the frame");
    }
}
