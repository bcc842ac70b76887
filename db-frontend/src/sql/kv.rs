//! The storage interface the SQL engine runs on: ordered trees of
//! key/value bytes, changed inside transactions.
//!
//! Two implementations exist. [`MemoryKv`] keeps every tree in a
//! `BTreeMap`; it is the reference model the property tests compare the
//! real engine with, and it lets the SQL layer be tested without a
//! cluster. The real one (`crate::engine`) keeps each tree as a B-tree of
//! 8 KiB pages in the Aurora volume.
//!
//! ## Isolation: one transaction at a time
//!
//! [`KvStore::begin`] waits until no other transaction is open, so
//! transactions run one after another and every schedule is serial
//! (serializable, trivially). A transaction's commit releases the store
//! for the next one *before* it waits for durability (early lock
//! release): the next transaction may read what the first wrote, and is
//! itself acknowledged only after its own, later, commit is durable, so a
//! client never sees anything that a crash could take back. Read-only
//! transactions wait for durability of what they read in the same way.
//!
//! Keys compare as unsigned bytes. Both limits below are checked on
//! every call.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::ops::Bound;
use std::sync::Arc;

use thiserror::Error;
use tokio::sync::{Mutex, OwnedMutexGuard};

/// Longest key a tree takes. A B-tree page must hold at least four
/// cells of the longest key and value, so splits always make room.
pub const KEY_BYTES_MAX: usize = 256;
/// Longest value a tree takes.
pub const VALUE_BYTES_MAX: usize = 1536;

/// Key/value pairs, as a scan returns them.
pub type Entries = Vec<(Vec<u8>, Vec<u8>)>;

/// Names one ordered tree (a table, an index, the catalog).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TreeId(pub u32);

impl fmt::Display for TreeId {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "tree {}", self.0)
    }
}

/// The tree that exists in every store from the start; the SQL layer
/// keeps its catalog there.
pub const CATALOG_TREE: TreeId = TreeId(0);

/// Why a storage call failed.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum KvError {
    #[error("{0} does not exist")]
    NoSuchTree(TreeId),
    #[error("a key of {length} bytes is longer than KEY_BYTES_MAX ({KEY_BYTES_MAX})")]
    KeyTooLong { length: usize },
    #[error("a value of {length} bytes is longer than VALUE_BYTES_MAX ({VALUE_BYTES_MAX})")]
    ValueTooLong { length: usize },
    #[error("the transaction is too large: {0}")]
    TransactionTooLarge(String),
    #[error("{0} cannot be dropped")]
    Undroppable(TreeId),
    /// A change asked of a read replica.
    #[error("this is a read replica: it cannot change anything")]
    ReadOnly,
    /// The storage underneath failed (a volume error, a fenced writer, a
    /// closed store). The transaction's outcome is as the message says.
    #[error("storage: {0}")]
    Storage(String),
}

/// Checks a key and a value against the limits.
pub fn check_entry(key: &[u8], value: &[u8]) -> Result<(), KvError> {
    if key.len() > KEY_BYTES_MAX {
        return Err(KvError::KeyTooLong { length: key.len() });
    }
    if value.len() > VALUE_BYTES_MAX {
        return Err(KvError::ValueTooLong { length: value.len() });
    }
    Ok(())
}

/// A store of trees. Cheap to share: implementations are handles.
pub trait KvStore: Clone + Send + Sync + 'static {
    type Txn: KvTxn;
    /// Opens a transaction once no other one is open.
    fn begin(&self) -> impl Future<Output = Result<Self::Txn, KvError>> + Send;
}

/// One open transaction. Dropping it without [`KvTxn::commit`] or
/// [`KvTxn::rollback`] rolls it back.
pub trait KvTxn: Send + 'static {
    fn get(&mut self, tree: TreeId, key: &[u8]) -> impl Future<Output = Result<Option<Vec<u8>>, KvError>> + Send;
    /// Inserts or replaces.
    fn put(&mut self, tree: TreeId, key: &[u8], value: &[u8]) -> impl Future<Output = Result<(), KvError>> + Send;
    /// Whether the key was there.
    fn delete(&mut self, tree: TreeId, key: &[u8]) -> impl Future<Output = Result<bool, KvError>> + Send;
    /// Entries with keys in the range, ascending, at most `limit` of them.
    fn scan(
        &mut self,
        tree: TreeId,
        start: Bound<Vec<u8>>,
        end: Bound<Vec<u8>>,
        limit: Option<usize>,
    ) -> impl Future<Output = Result<Entries, KvError>> + Send;
    /// A new, empty tree.
    fn create_tree(&mut self) -> impl Future<Output = Result<TreeId, KvError>> + Send;
    /// Removes a tree and everything in it ([`CATALOG_TREE`] stays).
    fn drop_tree(&mut self, tree: TreeId) -> impl Future<Output = Result<(), KvError>> + Send;
    /// Makes every change durable; returns once it is.
    fn commit(self) -> impl Future<Output = Result<(), KvError>> + Send;
    /// Undoes every change of the transaction.
    fn rollback(self) -> impl Future<Output = Result<(), KvError>> + Send;
}

#[derive(Debug)]
struct MemoryState {
    trees: BTreeMap<TreeId, BTreeMap<Vec<u8>, Vec<u8>>>,
    next_tree: u32,
}

/// Every tree in a `BTreeMap`, in memory: the reference model.
#[derive(Clone, Debug)]
pub struct MemoryKv {
    state: Arc<Mutex<MemoryState>>,
}

impl Default for MemoryKv {
    fn default() -> Self {
        let trees = BTreeMap::from([(CATALOG_TREE, BTreeMap::new())]);
        MemoryKv { state: Arc::new(Mutex::new(MemoryState { trees, next_tree: 1 })) }
    }
}

impl MemoryKv {
    /// A copy of every tree, for comparing with another store.
    pub async fn snapshot(&self) -> BTreeMap<TreeId, BTreeMap<Vec<u8>, Vec<u8>>> {
        self.state.lock().await.trees.clone()
    }
}

/// What undoes one change of a [`MemoryTxn`].
#[derive(Debug)]
enum MemoryUndo {
    /// Put back (or remove, with `None`) the key's earlier value.
    Entry {
        tree: TreeId,
        key: Vec<u8>,
        earlier: Option<Vec<u8>>,
    },
    Created(TreeId),
    Dropped {
        tree: TreeId,
        entries: BTreeMap<Vec<u8>, Vec<u8>>,
    },
}

/// A [`MemoryKv`] transaction: it changes the trees in place and keeps
/// an undo list, applied backwards by a rollback (or a drop).
#[derive(Debug)]
pub struct MemoryTxn {
    state: OwnedMutexGuard<MemoryState>,
    undo: Vec<MemoryUndo>,
}

impl MemoryTxn {
    fn tree(&mut self, tree: TreeId) -> Result<&mut BTreeMap<Vec<u8>, Vec<u8>>, KvError> {
        self.state.trees.get_mut(&tree).ok_or(KvError::NoSuchTree(tree))
    }

    fn undo_all(&mut self) {
        while let Some(undo) = self.undo.pop() {
            match undo {
                MemoryUndo::Entry { tree, key, earlier } => {
                    let entries = self.state.trees.get_mut(&tree).expect("an undone entry's tree exists");
                    match earlier {
                        Some(value) => entries.insert(key, value),
                        None => entries.remove(&key),
                    };
                }
                MemoryUndo::Created(tree) => {
                    self.state.trees.remove(&tree);
                }
                MemoryUndo::Dropped { tree, entries } => {
                    self.state.trees.insert(tree, entries);
                }
            }
        }
    }
}

impl Drop for MemoryTxn {
    fn drop(&mut self) {
        self.undo_all(); // empty after a commit
    }
}

impl KvStore for MemoryKv {
    type Txn = MemoryTxn;

    async fn begin(&self) -> Result<MemoryTxn, KvError> {
        Ok(MemoryTxn { state: self.state.clone().lock_owned().await, undo: Vec::new() })
    }
}

impl KvTxn for MemoryTxn {
    async fn get(&mut self, tree: TreeId, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        Ok(self.tree(tree)?.get(key).cloned())
    }

    async fn put(&mut self, tree: TreeId, key: &[u8], value: &[u8]) -> Result<(), KvError> {
        check_entry(key, value)?;
        let earlier = self.tree(tree)?.insert(key.to_vec(), value.to_vec());
        self.undo.push(MemoryUndo::Entry { tree, key: key.to_vec(), earlier });
        Ok(())
    }

    async fn delete(&mut self, tree: TreeId, key: &[u8]) -> Result<bool, KvError> {
        check_entry(key, &[])?;
        let earlier = self.tree(tree)?.remove(key);
        let existed = earlier.is_some();
        if existed {
            self.undo.push(MemoryUndo::Entry { tree, key: key.to_vec(), earlier });
        }
        Ok(existed)
    }

    async fn scan(
        &mut self,
        tree: TreeId,
        start: Bound<Vec<u8>>,
        end: Bound<Vec<u8>>,
        limit: Option<usize>,
    ) -> Result<Entries, KvError> {
        let entries = self.tree(tree)?;
        let limit = limit.unwrap_or(usize::MAX);
        let empty = match (&start, &end) {
            (Bound::Included(low), Bound::Included(high)) => low > high,
            (Bound::Included(low) | Bound::Excluded(low), Bound::Included(high) | Bound::Excluded(high)) => low >= high,
            _ => false,
        };
        if empty {
            return Ok(Vec::new()); // BTreeMap::range panics on some of these
        }
        Ok(entries.range((start, end)).take(limit).map(|(key, value)| (key.clone(), value.clone())).collect())
    }

    async fn create_tree(&mut self) -> Result<TreeId, KvError> {
        let tree = TreeId(self.state.next_tree);
        self.state.next_tree += 1;
        self.state.trees.insert(tree, BTreeMap::new());
        self.undo.push(MemoryUndo::Created(tree));
        Ok(tree)
    }

    async fn drop_tree(&mut self, tree: TreeId) -> Result<(), KvError> {
        if tree == CATALOG_TREE {
            return Err(KvError::Undroppable(tree));
        }
        let entries = self.state.trees.remove(&tree).ok_or(KvError::NoSuchTree(tree))?;
        self.undo.push(MemoryUndo::Dropped { tree, entries });
        Ok(())
    }

    async fn commit(mut self) -> Result<(), KvError> {
        self.undo.clear();
        Ok(())
    }

    async fn rollback(mut self) -> Result<(), KvError> {
        self.undo_all();
        Ok(())
    }
}

/// Whether `key` is inside the range's lower bound.
pub fn above_start(key: &[u8], start: &Bound<Vec<u8>>) -> bool {
    match start {
        Bound::Included(low) => key >= low.as_slice(),
        Bound::Excluded(low) => key > low.as_slice(),
        Bound::Unbounded => true,
    }
}

/// Whether `key` is inside the range's upper bound.
pub fn below_end(key: &[u8], end: &Bound<Vec<u8>>) -> bool {
    match end {
        Bound::Included(high) => key <= high.as_slice(),
        Bound::Excluded(high) => key < high.as_slice(),
        Bound::Unbounded => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_rolled_back_transaction_leaves_nothing_and_a_committed_one_everything() {
        let store = MemoryKv::default();
        let mut txn = store.begin().await.unwrap();
        let tree = txn.create_tree().await.unwrap();
        txn.put(tree, b"a", b"1").await.unwrap();
        txn.rollback().await.unwrap();
        let mut txn = store.begin().await.unwrap();
        assert_eq!(txn.get(tree, b"a").await, Err(KvError::NoSuchTree(tree)));
        let tree = txn.create_tree().await.unwrap();
        txn.put(tree, b"a", b"1").await.unwrap();
        txn.put(tree, b"c", b"3").await.unwrap();
        txn.put(tree, b"b", b"2").await.unwrap();
        assert!(txn.delete(tree, b"c").await.unwrap());
        assert!(!txn.delete(tree, b"c").await.unwrap());
        txn.commit().await.unwrap();
        let mut txn = store.begin().await.unwrap();
        let all = txn.scan(tree, Bound::Unbounded, Bound::Unbounded, None).await.unwrap();
        assert_eq!(all, vec![(b"a".to_vec(), b"1".to_vec()), (b"b".to_vec(), b"2".to_vec())]);
        let empty = txn.scan(tree, Bound::Included(b"b".to_vec()), Bound::Excluded(b"a".to_vec()), None).await;
        assert_eq!(empty, Ok(Vec::new()));
        assert_eq!(txn.put(tree, &[0; KEY_BYTES_MAX + 1], b"").await, Err(KvError::KeyTooLong { length: 257 }));
        assert_eq!(txn.drop_tree(CATALOG_TREE).await, Err(KvError::Undroppable(CATALOG_TREE)));
    }
}
