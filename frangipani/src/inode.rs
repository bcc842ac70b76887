//! The inode: one 512-byte block per file, directory or symbolic link
//! (`docs/frangipani-layout.md` §4).
//!
//! Like every metadata block it carries a version number, which grows with
//! each logged update: log replay applies a record only to an older block.
//! A file's first 64 KiB live in 16 small blocks; the rest in large blocks,
//! 37 named directly and the others through one indirect large block (8,192
//! pointers), so a file holds at most 64 KiB + (37 + 8,192) × 64 KiB. A
//! symbolic link keeps its target in the inode itself.

use crate::layout::{INODE_BYTES, LARGE_BLOCK_BYTES, SMALL_BLOCK_BYTES};
use thiserror::Error;

const MAGIC: [u8; 4] = *b"FINO";
/// Small blocks a file starts with (its first 64 KiB).
pub const SMALL_POINTERS: usize = 16;
/// Large blocks named in the inode itself.
pub const LARGE_POINTERS: usize = 37;
/// Pointers in the indirect large block.
pub const INDIRECT_POINTERS: usize = LARGE_BLOCK_BYTES / 8;
/// Longest symbolic-link target kept in the inode.
pub const SYMLINK_BYTES_MAX: usize = (SMALL_POINTERS + LARGE_POINTERS + 1) * 8;
/// Largest file.
pub const FILE_BYTES_MAX: u64 =
    (SMALL_POINTERS * SMALL_BLOCK_BYTES) as u64 + ((LARGE_POINTERS + INDIRECT_POINTERS) * LARGE_BLOCK_BYTES) as u64;
/// "No block here" (a hole, or not allocated).
pub const NO_BLOCK: u64 = u64::MAX;
const POINTERS_AT: usize = 80;

/// What an inode is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A free inode (its number may be allocated).
    Free,
    File,
    Directory,
    Symlink,
}

impl Kind {
    fn code(self) -> u32 {
        match self {
            Kind::Free => 0,
            Kind::File => 1,
            Kind::Directory => 2,
            Kind::Symlink => 3,
        }
    }

    fn from_code(code: u32) -> Option<Kind> {
        Some(match code {
            0 => Kind::Free,
            1 => Kind::File,
            2 => Kind::Directory,
            3 => Kind::Symlink,
            _ => return None,
        })
    }
}

/// The blocks of a file or directory (`NO_BLOCK` where there is none).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockPointers {
    pub small: [u64; SMALL_POINTERS],
    pub large: [u64; LARGE_POINTERS],
    pub indirect: u64,
}

/// Where a file's bytes are, or a symbolic link's target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Content {
    Blocks(Box<BlockPointers>),
    Symlink(Vec<u8>),
}

impl Content {
    /// No blocks yet.
    pub fn empty() -> Content {
        Content::Blocks(Box::new(BlockPointers {
            small: [NO_BLOCK; SMALL_POINTERS],
            large: [NO_BLOCK; LARGE_POINTERS],
            indirect: NO_BLOCK,
        }))
    }
}

/// One inode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inode {
    /// Grows with every logged update of this block.
    pub version: u64,
    pub kind: Kind,
    /// Permission bits (the low 12 bits of `st_mode`).
    pub permissions: u32,
    pub links: u32,
    pub uid: u32,
    pub gid: u32,
    /// A directory's parent directory (itself for the root); 0 otherwise.
    /// Renaming a directory checks it against moving it under itself.
    pub parent: u32,
    pub size: u64,
    /// Times in nanoseconds since the Unix epoch.
    pub accessed: i64,
    pub modified: i64,
    pub changed: i64,
    /// Counts the reuses of this inode number (NFS-style generation).
    pub generation: u64,
    pub content: Content,
}

/// Why an inode block was refused.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum InodeError {
    #[error("not an inode block: {0}")]
    Corrupt(String),
    #[error("symbolic link target of {0} bytes exceeds SYMLINK_BYTES_MAX ({SYMLINK_BYTES_MAX})")]
    SymlinkTooLong(usize),
}

impl Inode {
    /// A free inode, as a new volume has it.
    pub fn free() -> Inode {
        Inode {
            version: 0,
            kind: Kind::Free,
            permissions: 0,
            links: 0,
            uid: 0,
            gid: 0,
            parent: 0,
            size: 0,
            accessed: 0,
            modified: 0,
            changed: 0,
            generation: 0,
            content: Content::empty(),
        }
    }

    /// The 512-byte block image.
    pub fn encode(&self) -> Result<Vec<u8>, InodeError> {
        let mut out = vec![0u8; INODE_BYTES];
        out[..4].copy_from_slice(&MAGIC);
        let mut put = |at: usize, bytes: &[u8]| out[at..at + bytes.len()].copy_from_slice(bytes);
        put(8, &self.version.to_le_bytes());
        put(16, &self.kind.code().to_le_bytes());
        put(20, &self.permissions.to_le_bytes());
        put(24, &self.links.to_le_bytes());
        put(28, &self.uid.to_le_bytes());
        put(32, &self.gid.to_le_bytes());
        put(36, &self.parent.to_le_bytes());
        // A symbolic link's size is its target's length.
        let size = match &self.content {
            Content::Symlink(target) => target.len() as u64,
            Content::Blocks(_) => self.size,
        };
        put(40, &size.to_le_bytes());
        put(48, &self.accessed.to_le_bytes());
        put(56, &self.modified.to_le_bytes());
        put(64, &self.changed.to_le_bytes());
        put(72, &self.generation.to_le_bytes());
        match &self.content {
            Content::Blocks(blocks) => {
                let pointers = blocks.small.iter().chain(&blocks.large).chain(std::iter::once(&blocks.indirect));
                for (index, pointer) in pointers.enumerate() {
                    put(POINTERS_AT + index * 8, &pointer.to_le_bytes());
                }
            }
            Content::Symlink(target) => {
                if target.len() > SYMLINK_BYTES_MAX {
                    return Err(InodeError::SymlinkTooLong(target.len()));
                }
                put(POINTERS_AT, target);
            }
        }
        let checksum = crc32c::crc32c(&out[8..]);
        out[4..8].copy_from_slice(&checksum.to_le_bytes());
        Ok(out)
    }

    /// Reads an inode block back; a block never written (empty) is a free inode.
    pub fn decode(bytes: &[u8]) -> Result<Inode, InodeError> {
        if bytes.is_empty() {
            return Ok(Inode::free());
        }
        let corrupt = |why: String| Err(InodeError::Corrupt(why));
        if bytes.len() != INODE_BYTES || bytes[..4] != MAGIC {
            return corrupt(format!("{} bytes, or bad magic", bytes.len()));
        }
        let (stored, actual) = (u32::from_le_bytes(bytes[4..8].try_into().expect("4")), crc32c::crc32c(&bytes[8..]));
        if stored != actual {
            return corrupt(format!("checksum mismatch: stored {stored:#010x}, computed {actual:#010x}"));
        }
        let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4"));
        let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8"));
        let Some(kind) = Kind::from_code(u32_at(16)) else { return corrupt(format!("kind {}", u32_at(16))) };
        let size = u64_at(40);
        let content = if kind == Kind::Symlink {
            let length = usize::try_from(size).unwrap_or(usize::MAX);
            if length > SYMLINK_BYTES_MAX {
                return corrupt(format!("symbolic link of {size} bytes"));
            }
            Content::Symlink(bytes[POINTERS_AT..POINTERS_AT + length].to_vec())
        } else {
            let pointer = |index: usize| u64_at(POINTERS_AT + index * 8);
            Content::Blocks(Box::new(BlockPointers {
                small: std::array::from_fn(pointer),
                large: std::array::from_fn(|index| pointer(SMALL_POINTERS + index)),
                indirect: pointer(SMALL_POINTERS + LARGE_POINTERS),
            }))
        };
        Ok(Inode {
            version: u64_at(8),
            kind,
            permissions: u32_at(20),
            links: u32_at(24),
            uid: u32_at(28),
            gid: u32_at(32),
            parent: u32_at(36),
            size,
            accessed: u64_at(48) as i64,
            modified: u64_at(56) as i64,
            changed: u64_at(64) as i64,
            generation: u64_at(72),
            content,
        })
    }
}

/// Where byte `offset` of a file lives: which pointer, and the offset in
/// that block. `None` past the largest file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Place {
    Small { index: usize, offset: usize },
    Large { index: usize, offset: usize },
    Indirect { index: usize, offset: usize },
}

/// The block that holds byte `offset` of a file.
pub fn place(offset: u64) -> Option<Place> {
    let small_bytes = (SMALL_POINTERS * SMALL_BLOCK_BYTES) as u64;
    if offset < small_bytes {
        let offset = offset as usize;
        return Some(Place::Small { index: offset / SMALL_BLOCK_BYTES, offset: offset % SMALL_BLOCK_BYTES });
    }
    let beyond = offset - small_bytes;
    let block = (beyond / LARGE_BLOCK_BYTES as u64) as usize;
    let within = (beyond % LARGE_BLOCK_BYTES as u64) as usize;
    if block < LARGE_POINTERS {
        Some(Place::Large { index: block, offset: within })
    } else if block < LARGE_POINTERS + INDIRECT_POINTERS {
        Some(Place::Indirect { index: block - LARGE_POINTERS, offset: within })
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Inode {
        let mut small = [NO_BLOCK; SMALL_POINTERS];
        small[0] = 7;
        small[15] = 9;
        let mut large = [NO_BLOCK; LARGE_POINTERS];
        large[36] = 1234;
        Inode {
            version: 42,
            kind: Kind::File,
            permissions: 0o644,
            links: 2,
            uid: 1000,
            gid: 100,
            parent: 3,
            size: 70_000,
            accessed: -5,
            modified: 1_700_000_000_000_000_000,
            changed: 1,
            generation: 3,
            content: Content::Blocks(Box::new(BlockPointers { small, large, indirect: 99 })),
        }
    }

    #[test]
    fn an_inode_fills_its_block_exactly_and_round_trips() {
        assert_eq!(POINTERS_AT + (SMALL_POINTERS + LARGE_POINTERS + 1) * 8, INODE_BYTES, "no byte to spare");
        let image = sample().encode().expect("encodes");
        assert_eq!(image.len(), INODE_BYTES);
        assert_eq!(Inode::decode(&image), Ok(sample()));
        let target = b"../elsewhere".to_vec();
        let link =
            Inode { kind: Kind::Symlink, size: target.len() as u64, content: Content::Symlink(target), ..sample() };
        assert_eq!(Inode::decode(&link.encode().expect("encodes")), Ok(link));
        assert_eq!(Inode::decode(&[]), Ok(Inode::free()), "a block never written is a free inode");
    }

    #[test]
    fn damage_and_oversized_links_are_refused() {
        let image = sample().encode().expect("encodes");
        for at in [0, 5, 9, 17, 100, 511] {
            let mut damaged = image.clone();
            damaged[at] ^= 1;
            assert!(Inode::decode(&damaged).is_err(), "a flipped bit at byte {at} went unnoticed");
        }
        let long =
            Inode { kind: Kind::Symlink, content: Content::Symlink(vec![b'x'; SYMLINK_BYTES_MAX + 1]), ..sample() };
        assert_eq!(long.encode(), Err(InodeError::SymlinkTooLong(SYMLINK_BYTES_MAX + 1)));
    }

    #[test]
    fn every_byte_of_the_largest_file_has_exactly_one_place() {
        assert_eq!(place(0), Some(Place::Small { index: 0, offset: 0 }));
        assert_eq!(place(65_535), Some(Place::Small { index: 15, offset: 4095 }));
        assert_eq!(place(65_536), Some(Place::Large { index: 0, offset: 0 }));
        let indirect_start = 65_536 + (LARGE_POINTERS * LARGE_BLOCK_BYTES) as u64;
        assert_eq!(place(indirect_start - 1), Some(Place::Large { index: 36, offset: LARGE_BLOCK_BYTES - 1 }));
        assert_eq!(place(indirect_start), Some(Place::Indirect { index: 0, offset: 0 }));
        assert_eq!(
            place(FILE_BYTES_MAX - 1),
            Some(Place::Indirect { index: INDIRECT_POINTERS - 1, offset: LARGE_BLOCK_BYTES - 1 })
        );
        assert_eq!(place(FILE_BYTES_MAX), None);
    }
}
