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

/// A gap of unchanged bytes shorter than this is logged with its
/// neighbours: a second record would cost its 20-byte header.
const SPAN_GAP_MIN: usize = 24;

/// The records that take a metadata block from `before` (empty: never
/// written) to `after`, which is what the workstation logs: the spans of
/// payload bytes (past the frame of a framed block) that differ (gaps shorter than a record header are
/// bridged), all carrying `version`. Removing a directory entry changes its
/// slot and the count in the header, not the bytes between.
pub fn diff(framing: Framing, before: &[u8], after: &[u8], block: u64, version: u64) -> Vec<Record> {
    assert!(before.is_empty() || before.len() == after.len(), "a record changes a block of one size");
    let payload = |at: usize| before.get(at).copied().unwrap_or(0);
    let first_payload = match framing {
        Framing::Framed { .. } => 16,
        Framing::Raw { .. } => 0,
    };
    let mut records: Vec<Record> = Vec::new();
    let mut at = first_payload;
    while at < after.len() {
        if payload(at) == after[at] {
            at += 1;
            continue;
        }
        let first = at;
        let mut last = at + 1; // one past the last differing byte
        let mut probe = last;
        while probe < after.len() && probe - last < SPAN_GAP_MIN {
            if payload(probe) != after[probe] {
                last = probe + 1;
            }
            probe += 1;
        }
        records.push(Record { block, version, offset: first as u16, bytes: after[first..last].to_vec() });
        at = last;
    }
    if records.is_empty() {
        // Nothing changed but the version: one empty record still moves it.
        records.push(Record { block, version, offset: first_payload as u16, bytes: Vec::new() });
    }
    records
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::directory::DirectoryBlock;
    use crate::inode::{Inode, Kind};
    use crate::layout::{ParameterBlock, Resource};

    fn apply_all(framing: Framing, image: &[u8], records: &[Record]) -> Vec<u8> {
        records.iter().fold(image.to_vec(), |image, record| apply(framing, &image, record).expect("fits"))
    }

    #[test]
    fn a_logged_inode_change_replays_into_the_new_inode() {
        let layout = Layout::new(ParameterBlock::small()).expect("layout");
        let block = layout.inode_block(5);
        let framing = framing(&layout, block, false).expect("an inode block is metadata");
        let before = Inode { version: 3, kind: Kind::File, size: 10, ..Inode::free() };
        let after = Inode { version: 4, size: 4096, links: 2, ..before.clone() };
        let records = diff(framing, &before.encode().expect("encodes"), &after.encode().expect("encodes"), block, 4);
        let logged: usize = records.iter().map(|record| record.bytes.len()).sum();
        assert!(logged < 40, "records carry only what changed: {logged} bytes");
        let replayed = apply_all(framing, &before.encode().expect("encodes"), &records);
        assert_eq!(Inode::decode(&replayed), Ok(after));
        // From a block never written, too (a new inode).
        let fresh = Inode { version: 1, kind: Kind::Directory, links: 2, ..Inode::free() };
        let records = diff(framing, &[], &fresh.encode().expect("encodes"), block, 1);
        assert_eq!(Inode::decode(&apply_all(framing, &[], &records)), Ok(fresh));
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
        let records = diff(framing_of_directory, &before, &directory.encode(), block, 9);
        let replayed = apply_all(framing_of_directory, &before, &records);
        assert_eq!(DirectoryBlock::decode(&replayed), Ok(directory.clone()));

        // Removing an entry from a full block logs its slot and the header,
        // not the entries after it.
        for n in 0..150u64 {
            directory.insert(format!("entry-{n:07}").as_bytes(), 100 + n, Kind::File).expect("room");
        }
        let before = directory.encode();
        directory.remove(b"entry-0000003").expect("present");
        directory.version = 10;
        let records = diff(framing_of_directory, &before, &directory.encode(), block, 10);
        let logged: usize = records.iter().map(|record| record.bytes.len() + 20).sum();
        assert!(logged < 200, "removing one entry logs {logged} bytes in {} records", records.len());
        assert_eq!(DirectoryBlock::decode(&apply_all(framing_of_directory, &before, &records)), Ok(directory.clone()));
        let unchanged = diff(framing_of_directory, &directory.encode(), &directory.encode(), block, 11);
        assert_eq!(unchanged.len(), 1, "a version-only change is one empty record");
        assert_eq!(
            DirectoryBlock::decode(&apply_all(framing_of_directory, &directory.encode(), &unchanged))
                .map(|d| d.version),
            Ok(11)
        );

        let bitmap = layout.bitmap_block(Resource::Inode, 0);
        let raw = framing(&layout, bitmap, false).expect("bitmaps are metadata");
        let patched =
            apply(raw, &[], &Record { block: bitmap, version: 2, offset: 0, bytes: vec![0b101] }).expect("fits");
        assert_eq!(patched[0], 0b101);
        let bad = Record { block, version: 1, offset: 4, bytes: vec![0; 4] };
        assert!(apply(framing_of_directory, &before, &bad).is_err(), "a record never touches the frame");
    }
}
