//! Undo entries: what takes a change of an open transaction back.
//!
//! Each change a transaction makes is one mini-transaction whose first
//! record appends an undo entry to the undo log (pages
//! [`UNDO_HEAD`]..[`UNDO_HEAD`] + [`UNDO_PAGES_MAX`]), so a change and its
//! undo become durable together or not at all. A commit is one record
//! that empties the undo log; a rollback, or the recovery of a writer
//! that crashed with a transaction open, applies the entries backwards
//! (each inverse its own mini-transaction, idempotent, so a rollback cut
//! short by a crash just runs again) and then empties the log.
//!
//! ```text
//! tag 1, restore an entry: tree u32 LE, key length u16 LE, key,
//!        present u8 (0 = the key was absent), the earlier value
//! tag 2, a tree was created: tree u32 LE
//! tag 3, a tree was dropped: tree u32 LE, root page u64 LE
//! ```

use bytes::Bytes;
use common::PageId;

use crate::sql::kv::TreeId;

/// The undo log's first page: its `aux` counts the undo pages in use.
pub const UNDO_HEAD: PageId = PageId(1);
/// Undo pages; a transaction whose undo needs more is refused.
pub const UNDO_PAGES_MAX: u64 = 256;

const TAG_RESTORE: u8 = 1;
const TAG_CREATED: u8 = 2;
const TAG_DROPPED: u8 = 3;

/// One undo entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UndoEntry {
    /// Put `key` back to `earlier` (remove it if `None`).
    Restore { tree: TreeId, key: Vec<u8>, earlier: Option<Vec<u8>> },
    /// Remove the tree from the directory.
    Created { tree: TreeId },
    /// Put the tree back into the directory.
    Dropped { tree: TreeId, root: PageId },
}

impl UndoEntry {
    pub fn encode(&self) -> Bytes {
        let mut cell = Vec::new();
        match self {
            UndoEntry::Restore { tree, key, earlier } => {
                cell.push(TAG_RESTORE);
                cell.extend_from_slice(&tree.0.to_le_bytes());
                cell.extend_from_slice(&(key.len() as u16).to_le_bytes());
                cell.extend_from_slice(key);
                cell.push(u8::from(earlier.is_some()));
                cell.extend_from_slice(earlier.as_deref().unwrap_or_default());
            }
            UndoEntry::Created { tree } => {
                cell.push(TAG_CREATED);
                cell.extend_from_slice(&tree.0.to_le_bytes());
            }
            UndoEntry::Dropped { tree, root } => {
                cell.push(TAG_DROPPED);
                cell.extend_from_slice(&tree.0.to_le_bytes());
                cell.extend_from_slice(&root.0.to_le_bytes());
            }
        }
        Bytes::from(cell)
    }

    pub fn decode(cell: &[u8]) -> Result<UndoEntry, String> {
        let bad = || format!("an undo entry of {} bytes is malformed", cell.len());
        let (&tag, rest) = cell.split_first().ok_or_else(bad)?;
        let tree = TreeId(u32::from_le_bytes(rest.get(..4).ok_or_else(bad)?.try_into().map_err(|_| bad())?));
        let rest = &rest[4..];
        match tag {
            TAG_RESTORE => {
                let length = u16::from_le_bytes(rest.get(..2).ok_or_else(bad)?.try_into().map_err(|_| bad())?) as usize;
                let key = rest.get(2..2 + length).ok_or_else(bad)?.to_vec();
                let (&present, value) = rest[2 + length..].split_first().ok_or_else(bad)?;
                let earlier = match present {
                    0 if value.is_empty() => None,
                    1 => Some(value.to_vec()),
                    _ => return Err(bad()),
                };
                Ok(UndoEntry::Restore { tree, key, earlier })
            }
            TAG_CREATED if rest.is_empty() => Ok(UndoEntry::Created { tree }),
            TAG_DROPPED => {
                let root = u64::from_le_bytes(rest.try_into().map_err(|_| bad())?);
                Ok(UndoEntry::Dropped { tree, root: PageId(root) })
            }
            _ => Err(bad()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn undo_entries_round_trip_and_malformed_ones_are_refused() {
        let entries = [
            UndoEntry::Restore { tree: TreeId(3), key: b"k".to_vec(), earlier: Some(b"old".to_vec()) },
            UndoEntry::Restore { tree: TreeId(3), key: b"k".to_vec(), earlier: None },
            UndoEntry::Restore { tree: TreeId(3), key: Vec::new(), earlier: Some(Vec::new()) },
            UndoEntry::Created { tree: TreeId(9) },
            UndoEntry::Dropped { tree: TreeId(9), root: PageId(77) },
        ];
        for entry in entries {
            let cell = entry.encode();
            assert_eq!(UndoEntry::decode(&cell), Ok(entry));
        }
        assert_eq!(&UndoEntry::Created { tree: TreeId(1) }.encode()[..], &[2, 1, 0, 0, 0]);
        assert!(UndoEntry::decode(&[]).is_err());
        assert!(UndoEntry::decode(&[7, 0, 0, 0, 0]).is_err()); // unknown tag
        assert!(UndoEntry::decode(&[2, 1, 0, 0]).is_err()); // short tree id
        assert!(UndoEntry::decode(&[1, 1, 0, 0, 0, 5, 0, b'k']).is_err()); // key longer than the cell
        assert!(UndoEntry::decode(&[1, 1, 0, 0, 0, 1, 0, b'k', 0, b'x']).is_err()); // absent, yet a value
        assert!(UndoEntry::decode(&[3, 1, 0, 0, 0, 1, 2]).is_err()); // short root
    }
}
