//! A directory block: the entries of a directory kept in one of its small
//! blocks (`docs/frangipani-layout.md` §5). Directory blocks are metadata:
//! each carries a version for log replay, like an inode.
//!
//! Removing a name leaves a *free slot* (kind 0) of the same size in place,
//! so the logged change is the slot's kind and inode, not every entry after
//! it. A later name of exactly that length takes the slot back; when a name
//! does not fit otherwise, the free slots are dropped and the rest packed.

use crate::inode::Kind;
use crate::layout::SMALL_BLOCK_BYTES;
use thiserror::Error;

const MAGIC: [u8; 4] = *b"FDIR";
const HEADER_BYTES: usize = 24;
const ENTRY_HEADER_BYTES: usize = 10;
/// Longest file name (POSIX `NAME_MAX`).
pub const NAME_BYTES_MAX: usize = 255;

/// One name in a directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub name: Vec<u8>,
    pub inode: u64,
    pub kind: Kind,
}

/// Why a directory operation or block was refused.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum DirectoryError {
    #[error("a name of {0} bytes: names are 1..={NAME_BYTES_MAX} bytes without '/' or NUL")]
    BadName(usize),
    #[error("the name exists already")]
    Exists,
    #[error("no room left in this directory block")]
    Full,
    #[error("not a directory block: {0}")]
    Corrupt(String),
}

/// The entries of one directory block.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DirectoryBlock {
    /// Grows with every logged update of this block.
    pub version: u64,
    /// In block order; an entry of kind `Free` is a free slot.
    entries: Vec<Entry>,
}

fn check_name(name: &[u8]) -> Result<(), DirectoryError> {
    if name.is_empty() || name.len() > NAME_BYTES_MAX || name.contains(&b'/') || name.contains(&0) {
        return Err(DirectoryError::BadName(name.len()));
    }
    Ok(())
}

fn kind_code(kind: Kind) -> u8 {
    match kind {
        Kind::Free => 0,
        Kind::File => 1,
        Kind::Directory => 2,
        Kind::Symlink => 3,
    }
}

impl DirectoryBlock {
    /// The names in the block (not the free slots).
    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.entries.iter().filter(|entry| entry.kind != Kind::Free)
    }

    /// The names with their slot numbers, which stay put while other names
    /// come and go (until a full block is packed).
    pub fn slots(&self) -> impl Iterator<Item = (usize, &Entry)> {
        self.entries.iter().enumerate().filter(|(_, entry)| entry.kind != Kind::Free)
    }

    pub fn is_empty(&self) -> bool {
        self.entries().next().is_none()
    }

    fn used_bytes(&self) -> usize {
        self.entries.iter().map(|entry| ENTRY_HEADER_BYTES + entry.name.len()).sum()
    }

    /// The entry called `name`.
    pub fn lookup(&self, name: &[u8]) -> Option<&Entry> {
        self.entries().find(|entry| entry.name == name)
    }

    /// Adds a name; refuses a duplicate, a bad name, or a full block.
    pub fn insert(&mut self, name: &[u8], inode: u64, kind: Kind) -> Result<(), DirectoryError> {
        check_name(name)?;
        assert!(kind != Kind::Free, "a directory names only files, directories and links");
        if self.lookup(name).is_some() {
            return Err(DirectoryError::Exists);
        }
        let entry = Entry { name: name.to_vec(), inode, kind };
        if let Some(slot) =
            self.entries.iter_mut().find(|slot| slot.kind == Kind::Free && slot.name.len() == name.len())
        {
            *slot = entry;
            return Ok(());
        }
        let room = |entries: &[Entry]| {
            let used: usize = entries.iter().map(|entry| ENTRY_HEADER_BYTES + entry.name.len()).sum();
            HEADER_BYTES + used + ENTRY_HEADER_BYTES + name.len() <= SMALL_BLOCK_BYTES
        };
        if !room(&self.entries) {
            self.entries.retain(|entry| entry.kind != Kind::Free);
            if !room(&self.entries) {
                return Err(DirectoryError::Full);
            }
        }
        self.entries.push(entry);
        Ok(())
    }

    /// Removes a name, returning its entry; its slot stays, free.
    pub fn remove(&mut self, name: &[u8]) -> Option<Entry> {
        let slot = self.entries.iter_mut().find(|entry| entry.kind != Kind::Free && entry.name == name)?;
        let removed = slot.clone();
        slot.kind = Kind::Free;
        slot.inode = 0;
        // Trailing free slots go: the block ends at its last name.
        while self.entries.last().is_some_and(|entry| entry.kind == Kind::Free) {
            self.entries.pop();
        }
        Some(removed)
    }

    /// The 4 KiB block image.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(SMALL_BLOCK_BYTES);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&(self.entries.len() as u16).to_le_bytes());
        out.extend_from_slice(&(self.used_bytes() as u16).to_le_bytes());
        out.extend_from_slice(&[0; 4]);
        for entry in &self.entries {
            out.extend_from_slice(&entry.inode.to_le_bytes());
            out.push(kind_code(entry.kind));
            out.push(entry.name.len() as u8);
            out.extend_from_slice(&entry.name);
        }
        out.resize(SMALL_BLOCK_BYTES, 0);
        let checksum = crc32c::crc32c(&out[8..]);
        out[4..8].copy_from_slice(&checksum.to_le_bytes());
        out
    }

    /// The entry `name` in a block image, without decoding the others (the
    /// lookup path: no allocation but the answer). Checks the frame as
    /// [`Self::decode`] does.
    pub fn find(bytes: &[u8], name: &[u8]) -> Result<Option<Entry>, DirectoryError> {
        if bytes.is_empty() {
            return Ok(None);
        }
        let corrupt = |why: &str| Err(DirectoryError::Corrupt(why.to_string()));
        if bytes.len() != SMALL_BLOCK_BYTES || bytes[..4] != MAGIC {
            return corrupt("bad size or magic");
        }
        if u32::from_le_bytes(bytes[4..8].try_into().expect("4")) != crc32c::crc32c(&bytes[8..]) {
            return corrupt("checksum mismatch");
        }
        let count = usize::from(u16::from_le_bytes(bytes[16..18].try_into().expect("2")));
        let mut at = HEADER_BYTES;
        for _ in 0..count {
            let Some(header) = bytes.get(at..at + ENTRY_HEADER_BYTES) else { return corrupt("truncated entry") };
            let length = usize::from(header[9]);
            let start = at + ENTRY_HEADER_BYTES;
            at = start + length;
            if header[8] != 0 && bytes.get(start..at) == Some(name) {
                let kind = match header[8] {
                    1 => Kind::File,
                    2 => Kind::Directory,
                    3 => Kind::Symlink,
                    other => return Err(DirectoryError::Corrupt(format!("entry kind {other}"))),
                };
                let inode = u64::from_le_bytes(header[..8].try_into().expect("8"));
                return Ok(Some(Entry { name: name.to_vec(), inode, kind }));
            }
        }
        Ok(None)
    }

    /// Reads a directory block back; a block never written is empty.
    pub fn decode(bytes: &[u8]) -> Result<DirectoryBlock, DirectoryError> {
        if bytes.is_empty() {
            return Ok(DirectoryBlock::default());
        }
        let corrupt = |why: String| Err(DirectoryError::Corrupt(why));
        if bytes.len() != SMALL_BLOCK_BYTES || bytes[..4] != MAGIC {
            return corrupt(format!("{} bytes, or bad magic", bytes.len()));
        }
        let stored = u32::from_le_bytes(bytes[4..8].try_into().expect("4"));
        if stored != crc32c::crc32c(&bytes[8..]) {
            return corrupt("checksum mismatch".into());
        }
        let version = u64::from_le_bytes(bytes[8..16].try_into().expect("8"));
        let count = usize::from(u16::from_le_bytes(bytes[16..18].try_into().expect("2")));
        let mut entries = Vec::with_capacity(count);
        let mut at = HEADER_BYTES;
        for _ in 0..count {
            let Some(header) = bytes.get(at..at + ENTRY_HEADER_BYTES) else { return corrupt("truncated entry".into()) };
            let inode = u64::from_le_bytes(header[..8].try_into().expect("8"));
            let kind = match header[8] {
                0 => Kind::Free,
                1 => Kind::File,
                2 => Kind::Directory,
                3 => Kind::Symlink,
                other => return corrupt(format!("entry kind {other}")),
            };
            let length = usize::from(header[9]);
            let Some(name) = bytes.get(at + ENTRY_HEADER_BYTES..at + ENTRY_HEADER_BYTES + length) else {
                return corrupt("truncated name".into());
            };
            if check_name(name).is_err() {
                return corrupt("bad name".into());
            }
            entries.push(Entry { name: name.to_vec(), inode, kind });
            at += ENTRY_HEADER_BYTES + length;
        }
        let block = DirectoryBlock { version, entries };
        if usize::from(u16::from_le_bytes(bytes[18..20].try_into().expect("2"))) != block.used_bytes() {
            return corrupt("entry bytes do not add up".into());
        }
        Ok(block)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_names_are_checked() {
        let mut block = DirectoryBlock { version: 7, ..DirectoryBlock::default() };
        block.insert(b"a.txt", 12, Kind::File).expect("room");
        block.insert(b"sub", 13, Kind::Directory).expect("room");
        block.insert(&[b'n'; NAME_BYTES_MAX], 14, Kind::Symlink).expect("room");
        assert_eq!(block.insert(b"a.txt", 15, Kind::File), Err(DirectoryError::Exists));
        for bad in [&b""[..], b"a/b", b"nul\0", &[b'x'; NAME_BYTES_MAX + 1]] {
            assert_eq!(block.insert(bad, 16, Kind::File), Err(DirectoryError::BadName(bad.len())));
        }
        let decoded = DirectoryBlock::decode(&block.encode()).expect("decodes");
        assert_eq!(decoded, block);
        assert_eq!(decoded.lookup(b"sub").map(|entry| entry.inode), Some(13));
        for name in [&b"a.txt"[..], b"sub", b"missing", &[b'n'; NAME_BYTES_MAX]] {
            assert_eq!(
                DirectoryBlock::find(&block.encode(), name),
                Ok(decoded.lookup(name).cloned()),
                "find agrees with decode"
            );
        }
        let mut removed = decoded.clone();
        assert_eq!(removed.remove(b"a.txt").map(|entry| entry.inode), Some(12));
        assert!(removed.lookup(b"a.txt").is_none());
        assert_eq!(DirectoryBlock::decode(&[]), Ok(DirectoryBlock::default()));
    }

    #[test]
    fn a_full_block_says_so_and_damage_is_refused() {
        let mut block = DirectoryBlock::default();
        let mut inserted = 0;
        loop {
            let name = format!("file-{inserted:08}");
            match block.insert(name.as_bytes(), inserted, Kind::File) {
                Ok(()) => inserted += 1,
                Err(DirectoryError::Full) => break,
                Err(other) => panic!("{other}"),
            }
        }
        assert_eq!(inserted, ((SMALL_BLOCK_BYTES - HEADER_BYTES) / (ENTRY_HEADER_BYTES + 13)) as u64);
        let image = block.encode();
        assert_eq!(DirectoryBlock::decode(&image).expect("decodes").entries().count() as u64, inserted);
        // A freed slot is taken back by a name of its length; a longer name
        // fits once the free slots are packed away.
        let mut reused = block.clone();
        reused.remove(b"file-00000003").expect("present");
        reused.remove(b"file-00000004").expect("present");
        reused.insert(b"file-99999999", 1, Kind::File).expect("the freed slot");
        assert_eq!(reused.insert(b"file-999999990", 2, Kind::File), Ok(()), "packing made room");
        assert_eq!(reused.entries().count() as u64, inserted);
        assert_eq!(DirectoryBlock::decode(&reused.encode()), Ok(reused.clone()));
        for at in [0, 5, 9, 17, 30, 4095] {
            let mut damaged = image.clone();
            damaged[at] ^= 1;
            assert!(DirectoryBlock::decode(&damaged).is_err(), "a flipped bit at byte {at} went unnoticed");
        }
    }
}
