//! The B-tree, as a planner: pure functions from cached pages to the
//! mini-transaction that makes a change.
//!
//! Nothing here does I/O. Every function reads pages through a
//! [`PageView`]; when a page it needs is not there it stops with
//! [`PlanError::Missing`], the driver reads that page from storage into
//! its cache, and the function runs again from the start (it changed
//! nothing). A change is built in a [`MiniTransaction`]: each op is
//! applied to a private copy of its page as it is recorded, so later
//! steps of the same change see the pages as they will be, and the driver
//! installs the copies in its cache once the records are logged.
//!
//! ## Tree shape
//!
//! Pages are slotted (`common::slotted`). A leaf's cells are
//! `key length u16 LE, key, value`, sorted by key (unsigned bytes), and
//! its `right` link is the next leaf. An inner page's cells are
//! `key length u16 LE, key, child page u64 LE`; its `aux` is the leftmost
//! child, which holds the keys below the first cell's; cell i's child
//! holds the keys from its key up to the next cell's. A tree's root page
//! never moves: a root split moves the root's cells into two new pages
//! and reformats the root one level up. A split is one mini-transaction:
//! the new page's format (carrying its cells), the old page's truncation,
//! the separator's insert into the parent (splitting it in turn when
//! full), and the allocator's new high mark in the meta page. Deletes do
//! not merge pages: an empty leaf stays in its chain.

use std::collections::BTreeMap;
use std::ops::Bound;

use bytes::Bytes;
use common::PageId;
use common::redo::PageOp;
use common::slotted::{PageHeader, PageKind, SlotError, SlotOp, SlottedPage};

use crate::sql::kv::{Entries, above_start, below_end};
use crate::volume::writer::PageChange;

/// Pages as the driver's cache holds them.
pub trait PageView {
    fn page(&self, page: PageId) -> Option<&[u8]>;
}

/// Why a plan stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlanError {
    /// Read this page into the cache and plan again.
    Missing(PageId),
    /// A page is not what the tree needs there (a bug, or corruption).
    Corrupt(String),
}

impl From<SlotError> for PlanError {
    fn from(error: SlotError) -> Self {
        PlanError::Corrupt(error.to_string())
    }
}

/// The meta page: its cells name every tree's root, its `aux` is the
/// next never-used page and its `right` the next tree id.
pub const META_PAGE: PageId = PageId(0);

/// A change being planned: its records, and the pages they produce.
#[derive(Debug)]
pub struct MiniTransaction<'view, View> {
    view: &'view View,
    page_bytes: usize,
    /// The changed pages as they are after `changes`.
    changed: BTreeMap<PageId, Vec<u8>>,
    changes: Vec<PageChange>,
    /// The meta page's `aux` when the plan started, and now.
    allocated_from: u64,
    next_free: u64,
}

/// What a finished plan hands to the driver.
#[derive(Debug)]
pub struct Planned {
    /// The records, in order; the last one is the consistency point.
    pub changes: Vec<PageChange>,
    /// Every changed page as it is after the records.
    pub pages: BTreeMap<PageId, Vec<u8>>,
}

impl<'view, View: PageView> MiniTransaction<'view, View> {
    /// Starts a plan over `view`; the meta page must be cached.
    pub fn new(view: &'view View, page_bytes: usize) -> Result<Self, PlanError> {
        let meta = view.page(META_PAGE).ok_or(PlanError::Missing(META_PAGE))?;
        let next_free = SlottedPage::new(meta)?.aux();
        Ok(MiniTransaction {
            view,
            page_bytes,
            changed: BTreeMap::new(),
            changes: Vec::new(),
            allocated_from: next_free,
            next_free,
        })
    }

    /// A page as this plan sees it.
    pub fn read(&self, page: PageId) -> Result<SlottedPage<'_>, PlanError> {
        let bytes = match self.changed.get(&page) {
            Some(bytes) => bytes.as_slice(),
            None => self.view.page(page).ok_or(PlanError::Missing(page))?,
        };
        Ok(SlottedPage::new(bytes)?)
    }

    /// Records `op` on `page` and applies it to the plan's copy. A format
    /// needs no earlier image.
    pub fn apply(&mut self, page: PageId, op: SlotOp) -> Result<(), PlanError> {
        if !self.changed.contains_key(&page) {
            let image = match (&op, self.view.page(page)) {
                (_, Some(bytes)) => bytes.to_vec(),
                (SlotOp::Format { .. }, None) => vec![0; self.page_bytes],
                (_, None) => return Err(PlanError::Missing(page)),
            };
            self.changed.insert(page, image);
        }
        let image = self.changed.get_mut(&page).expect("inserted above");
        op.apply(image)?;
        self.changes.push(PageChange { page, op: PageOp::Slotted(op) });
        Ok(())
    }

    /// A page never used before.
    pub fn allocate(&mut self) -> PageId {
        let page = PageId(self.next_free);
        self.next_free += 1;
        page
    }

    /// Whether anything was recorded.
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    /// Ends the plan: the allocator's new mark goes into the meta page.
    pub fn finish(mut self) -> Result<Planned, PlanError> {
        if self.next_free != self.allocated_from {
            let right = self.read(META_PAGE)?.right();
            self.apply(META_PAGE, SlotOp::SetLinks { right, aux: self.next_free })?;
        }
        Ok(Planned { changes: self.changes, pages: self.changed })
    }
}

/// A leaf cell.
pub fn leaf_cell(key: &[u8], value: &[u8]) -> Bytes {
    let mut cell = Vec::with_capacity(2 + key.len() + value.len());
    cell.extend_from_slice(&(key.len() as u16).to_le_bytes());
    cell.extend_from_slice(key);
    cell.extend_from_slice(value);
    Bytes::from(cell)
}

/// An inner cell.
pub fn inner_cell(key: &[u8], child: PageId) -> Bytes {
    let mut cell = Vec::with_capacity(2 + key.len() + 8);
    cell.extend_from_slice(&(key.len() as u16).to_le_bytes());
    cell.extend_from_slice(key);
    cell.extend_from_slice(&child.0.to_le_bytes());
    Bytes::from(cell)
}

/// A cell's key, and what follows it (a value, or a child).
pub fn split_cell(cell: &[u8]) -> Result<(&[u8], &[u8]), PlanError> {
    let bad = || PlanError::Corrupt(format!("a cell of {} bytes is shorter than its key", cell.len()));
    let length = u16::from_le_bytes([*cell.first().ok_or_else(bad)?, *cell.get(1).ok_or_else(bad)?]) as usize;
    if cell.len() < 2 + length {
        return Err(bad());
    }
    Ok((&cell[2..2 + length], &cell[2 + length..]))
}

fn child_of(cell: &[u8]) -> Result<PageId, PlanError> {
    let (_, rest) = split_cell(cell)?;
    let bytes: [u8; 8] =
        rest.try_into().map_err(|_| PlanError::Corrupt("an inner cell's child is not 8 bytes".into()))?;
    Ok(PageId(u64::from_le_bytes(bytes)))
}

/// The first slot whose key is at or above `key`, and whether it equals.
fn search(page: &SlottedPage<'_>, key: &[u8]) -> Result<(usize, bool), PlanError> {
    let (mut low, mut high) = (0, page.slot_count());
    while low < high {
        let middle = (low + high) / 2;
        let (middle_key, _) = split_cell(page.cell(middle))?;
        if middle_key < key { low = middle + 1 } else { high = middle }
    }
    let equal = low < page.slot_count() && split_cell(page.cell(low))?.0 == key;
    Ok((low, equal))
}

/// In an inner page: the child for `key`, and the slot a separator for
/// that child's right neighbour goes to (0 for the leftmost child).
fn route(page: &SlottedPage<'_>, key: &[u8]) -> Result<(PageId, usize), PlanError> {
    let (slot, equal) = search(page, key)?;
    let at = if equal { slot + 1 } else { slot }; // cells below `at` have keys <= key
    if at == 0 { Ok((PageId(page.aux()), 0)) } else { Ok((child_of(page.cell(at - 1))?, at)) }
}

/// One step of a descent: an inner page and where its child's separator goes.
type PathStep = (PageId, usize);

/// Walks from `root` to the leaf for `key`.
fn descend<View: PageView>(
    plan: &MiniTransaction<'_, View>,
    root: PageId,
    key: &[u8],
) -> Result<(PageId, Vec<PathStep>), PlanError> {
    let mut path = Vec::new();
    let mut page = root;
    for _ in 0..=u8::MAX {
        let view = plan.read(page)?;
        match view.kind() {
            PageKind::Leaf => return Ok((page, path)),
            PageKind::Inner => {
                let (child, slot) = route(&view, key)?;
                path.push((page, slot));
                page = child;
            }
            other => return Err(PlanError::Corrupt(format!("{page} is a {other:?} page inside a tree"))),
        }
    }
    Err(PlanError::Corrupt(format!("the tree under {root} is deeper than 256 levels")))
}

/// The value stored under `key`.
pub fn get<View: PageView>(
    view: &View,
    page_bytes: usize,
    root: PageId,
    key: &[u8],
) -> Result<Option<Vec<u8>>, PlanError> {
    let plan = MiniTransaction::new(view, page_bytes)?;
    let (leaf, _) = descend(&plan, root, key)?;
    let page = plan.read(leaf)?;
    let (slot, equal) = search(&page, key)?;
    if !equal {
        return Ok(None);
    }
    Ok(Some(split_cell(page.cell(slot))?.1.to_vec()))
}

/// Appends to `out` the entries in the range, ascending, until `limit`
/// entries are in `out`. On [`PlanError::Missing`], `out` holds what was
/// found so far: continue after its last key.
pub fn scan<View: PageView>(
    view: &View,
    page_bytes: usize,
    root: PageId,
    start: &Bound<Vec<u8>>,
    end: &Bound<Vec<u8>>,
    limit: usize,
    out: &mut Entries,
) -> Result<(), PlanError> {
    let plan = MiniTransaction::new(view, page_bytes)?;
    let first_key: &[u8] = match start {
        Bound::Included(key) | Bound::Excluded(key) => key,
        Bound::Unbounded => &[],
    };
    let (mut leaf, _) = descend(&plan, root, first_key)?;
    loop {
        let page = plan.read(leaf)?;
        let (mut slot, _) = search(&page, first_key)?;
        while slot < page.slot_count() {
            if out.len() >= limit {
                return Ok(());
            }
            let (key, value) = split_cell(page.cell(slot))?;
            slot += 1;
            if !above_start(key, start) {
                continue;
            }
            if !below_end(key, end) {
                return Ok(());
            }
            out.push((key.to_vec(), value.to_vec()));
        }
        if page.right() == 0 {
            return Ok(());
        }
        leaf = PageId(page.right());
    }
}

/// Plans `key = value` into `plan` (insert or replace).
pub fn put<View: PageView>(
    plan: &mut MiniTransaction<'_, View>,
    root: PageId,
    key: &[u8],
    value: &[u8],
) -> Result<(), PlanError> {
    let (leaf, path) = descend(plan, root, key)?;
    let cell = leaf_cell(key, value);
    let (slot, equal) = {
        let page = plan.read(leaf)?;
        let (slot, equal) = search(&page, key)?;
        if equal {
            let old = page.cell(slot).len();
            if cell.len() <= page.free_bytes() + old {
                return plan.apply(leaf, SlotOp::Replace { slot: slot as u16, cell });
            }
        }
        (slot, equal)
    };
    if equal {
        plan.apply(leaf, SlotOp::Delete { slot: slot as u16 })?;
    }
    insert_cell(plan, leaf, path, slot, cell)
}

/// Plans the removal of `key`; whether it was there.
pub fn delete<View: PageView>(
    plan: &mut MiniTransaction<'_, View>,
    root: PageId,
    key: &[u8],
) -> Result<bool, PlanError> {
    let (leaf, _) = descend(plan, root, key)?;
    let (slot, equal) = search(&plan.read(leaf)?, key)?;
    if equal {
        plan.apply(leaf, SlotOp::Delete { slot: slot as u16 })?;
    }
    Ok(equal)
}

/// Plans a new, empty tree rooted at a new page.
pub fn create<View: PageView>(plan: &mut MiniTransaction<'_, View>, owner: u32) -> Result<PageId, PlanError> {
    let root = plan.allocate();
    let header = PageHeader { kind: PageKind::Leaf, level: 0, owner, right: 0, aux: 0 };
    plan.apply(root, SlotOp::Format { header, cells: Vec::new() })?;
    Ok(root)
}

/// Inserts `cell` at `slot` of `page`, splitting it (and its parents) when
/// it does not fit. `path` leads from the root to `page`'s parent.
fn insert_cell<View: PageView>(
    plan: &mut MiniTransaction<'_, View>,
    page: PageId,
    mut path: Vec<PathStep>,
    slot: usize,
    cell: Bytes,
) -> Result<(), PlanError> {
    let (header, mut cells, fits) = {
        let view = plan.read(page)?;
        let cells: Vec<Bytes> = view.cells().map(Bytes::copy_from_slice).collect();
        (view.header(), cells, cell.len() + common::slotted::SLOT_BYTES <= view.free_bytes())
    };
    if fits {
        return plan.apply(page, SlotOp::Insert { slot: slot as u16, cell });
    }
    cells.insert(slot, cell.clone());
    let middle = split_point(&cells);
    let leaf = header.kind == PageKind::Leaf;
    let (separator, right_aux, right_cells) = if leaf {
        (split_cell(&cells[middle])?.0.to_vec(), 0, cells[middle..].to_vec())
    } else {
        let promoted = &cells[middle];
        (split_cell(promoted)?.0.to_vec(), child_of(promoted)?.0, cells[middle + 1..].to_vec())
    };
    let left_cells = cells[..middle].to_vec();
    let Some((parent, parent_slot)) = path.pop() else {
        // The root splits: its halves move to two new pages.
        let (left, right) = (plan.allocate(), plan.allocate());
        let left_header = PageHeader { right: if leaf { right.0 } else { 0 }, ..header };
        plan.apply(left, SlotOp::Format { header: left_header, cells: left_cells })?;
        let right_header = PageHeader { right: header.right, aux: right_aux, ..header };
        plan.apply(right, SlotOp::Format { header: right_header, cells: right_cells })?;
        let root_header =
            PageHeader { kind: PageKind::Inner, level: header.level + 1, owner: header.owner, right: 0, aux: left.0 };
        return plan.apply(page, SlotOp::Format { header: root_header, cells: vec![inner_cell(&separator, right)] });
    };
    let right = plan.allocate();
    let right_header = PageHeader { right: header.right, aux: right_aux, ..header };
    plan.apply(right, SlotOp::Format { header: right_header, cells: right_cells })?;
    let kept = if slot < middle { middle - 1 } else { middle };
    plan.apply(page, SlotOp::Truncate { keep: kept as u16 })?;
    if slot < middle {
        plan.apply(page, SlotOp::Insert { slot: slot as u16, cell })?;
    }
    plan.apply(page, SlotOp::SetLinks { right: right.0, aux: header.aux })?;
    insert_cell(plan, parent, path, parent_slot, inner_cell(&separator, right))
}

/// Where to cut `cells` so that each half takes about half the bytes;
/// both halves keep at least one cell.
fn split_point(cells: &[Bytes]) -> usize {
    let total: usize = cells.iter().map(|cell| cell.len() + common::slotted::SLOT_BYTES).sum();
    let mut running = 0;
    for (index, cell) in cells.iter().enumerate() {
        running += cell.len() + common::slotted::SLOT_BYTES;
        if running * 2 >= total {
            return (index + 1).clamp(1, cells.len() - 1);
        }
    }
    cells.len() - 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    const PAGE_BYTES: usize = 8192;

    /// Two copies of the volume's pages: `cache`, where plans install the
    /// pages they produce, and `storage`, where only the records are
    /// replayed (as a segment materializes a page). They must stay equal.
    #[derive(Default)]
    struct Pages {
        cache: HashMap<PageId, Vec<u8>>,
        storage: HashMap<PageId, Vec<u8>>,
        /// Pages dropped from `cache`, to make plans read them again.
        evicted: Vec<PageId>,
    }

    impl PageView for Pages {
        fn page(&self, page: PageId) -> Option<&[u8]> {
            self.cache.get(&page).map(Vec::as_slice)
        }
    }

    impl Pages {
        fn new() -> Pages {
            let mut pages = Pages::default();
            let mut meta = vec![0; PAGE_BYTES];
            let header = PageHeader { kind: PageKind::Meta, level: 0, owner: 0, right: 1, aux: 10 };
            SlotOp::Format { header, cells: Vec::new() }.apply(&mut meta).unwrap();
            pages.cache.insert(META_PAGE, meta.clone());
            pages.storage.insert(META_PAGE, meta);
            pages
        }

        /// A volume with one empty tree, and its root.
        fn with_tree() -> (Pages, PageId) {
            let mut pages = Pages::new();
            let (root, planned) = pages.run(|view| {
                let mut plan = MiniTransaction::new(view, PAGE_BYTES)?;
                let root = create(&mut plan, 1)?;
                Ok((root, plan.finish()?))
            });
            pages.install(planned);
            (pages, root)
        }

        /// Runs `plan` as the engine does: a missing page is read from
        /// storage and the plan runs again.
        fn run<T>(&mut self, mut plan: impl FnMut(&Pages) -> Result<T, PlanError>) -> T {
            for _ in 0..100 {
                match plan(self) {
                    Ok(result) => return result,
                    Err(PlanError::Missing(page)) => {
                        let image = self.storage.get(&page).cloned().unwrap_or_else(|| vec![0; PAGE_BYTES]);
                        self.cache.insert(page, image);
                    }
                    Err(PlanError::Corrupt(reason)) => panic!("corrupt: {reason}"),
                }
            }
            panic!("a plan kept missing pages");
        }

        fn install(&mut self, planned: Planned) -> usize {
            let records = planned.changes.len();
            for change in planned.changes {
                let image = self.storage.entry(change.page).or_insert_with(|| vec![0; PAGE_BYTES]);
                change.op.apply(image).expect("a planned record applies to storage");
            }
            for (page, image) in planned.pages {
                assert_eq!(Some(&image), self.storage.get(&page), "{page}: the cache and storage differ");
                self.cache.insert(page, image);
            }
            records
        }

        fn evict_some(&mut self, rng: &mut u64) {
            let mut ids: Vec<PageId> = self.cache.keys().copied().filter(|page| *page != META_PAGE).collect();
            ids.sort();
            for page in ids {
                *rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                if *rng >> 62 == 0 {
                    self.cache.remove(&page);
                    self.evicted.push(page);
                }
            }
        }
    }

    /// Checks the whole tree: every page slotted and sorted, separators
    /// bounding their children, all leaves at level 0 and chained in key
    /// order. Returns every entry, in order.
    fn check_tree(pages: &Pages, root: PageId) -> Vec<(Vec<u8>, Vec<u8>)> {
        fn walk(
            pages: &Pages,
            page: PageId,
            low: Option<&[u8]>,
            high: Option<&[u8]>,
            leaves: &mut Vec<PageId>,
            level: Option<u8>,
        ) {
            let view = SlottedPage::new(&pages.storage[&page]).unwrap();
            if let Some(level) = level {
                assert_eq!(view.level(), level, "{page}: level");
            }
            let keys: Vec<&[u8]> = view.cells().map(|cell| split_cell(cell).unwrap().0).collect();
            assert!(keys.windows(2).all(|pair| pair[0] < pair[1]), "{page}: keys out of order");
            for key in &keys {
                assert!(
                    low.is_none_or(|low| *key >= low) && high.is_none_or(|high| *key < high),
                    "{page}: key out of its range"
                );
            }
            match view.kind() {
                PageKind::Leaf => {
                    assert_eq!(view.level(), 0);
                    leaves.push(page);
                }
                PageKind::Inner => {
                    let below = view.level() - 1;
                    let first_high = keys.first().copied().or(high);
                    walk(pages, PageId(view.aux()), low, first_high, leaves, Some(below));
                    for (index, cell) in view.cells().enumerate() {
                        let next_high = keys.get(index + 1).copied().or(high);
                        walk(pages, child_of(cell).unwrap(), Some(keys[index]), next_high, leaves, Some(below));
                    }
                }
                other => panic!("{page}: a {other:?} page in the tree"),
            }
        }
        let mut leaves = Vec::new();
        walk(pages, root, None, None, &mut leaves, None);
        for pair in leaves.windows(2) {
            assert_eq!(SlottedPage::new(&pages.storage[&pair[0]]).unwrap().right(), pair[1].0, "leaf chain");
        }
        let last = *leaves.last().unwrap();
        assert_eq!(SlottedPage::new(&pages.storage[&last]).unwrap().right(), 0);
        leaves
            .iter()
            .flat_map(|leaf| {
                let view = SlottedPage::new(&pages.storage[leaf]).unwrap();
                view.cells()
                    .map(|cell| {
                        let (key, value) = split_cell(cell).unwrap();
                        (key.to_vec(), value.to_vec())
                    })
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    #[derive(Clone, Debug)]
    enum Op {
        Put(u16, usize),
        Delete(u16),
        Scan(u16, u16, usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (any::<u16>(), 0..700usize).prop_map(|(key, length)| Op::Put(key, length)),
            2 => any::<u16>().prop_map(Op::Delete),
            1 => (any::<u16>(), any::<u16>(), 0..50usize).prop_map(|(low, high, limit)| Op::Scan(low, high, limit)),
        ]
    }

    fn key_of(key: u16) -> Vec<u8> {
        // Keys of varied lengths that still sort as the numbers do.
        let mut bytes = (key % 2048).to_be_bytes().to_vec();
        bytes.extend(std::iter::repeat_n(b'k', (key % 7) as usize * 40));
        bytes
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

        /// Puts, deletes and scans match a `BTreeMap`; the tree stays well
        /// formed through splits (root splits included); every plan's pages
        /// equal what replaying its records gives; plans that miss pages
        /// (evicted at random) read them and give the same result.
        #[test]
        fn a_btree_matches_a_btreemap(ops in proptest::collection::vec(op(), 1..700), seed in any::<u64>()) {
            let (mut pages, root) = Pages::with_tree();
            let mut rng = seed;
            let mut model = BTreeMap::new();
            for op in ops {
                pages.evict_some(&mut rng);
                match op {
                    Op::Put(key, length) => {
                        let (key, value) = (key_of(key), vec![(length % 251) as u8; length]);
                        let planned = pages.run(|view| {
                            let mut plan = MiniTransaction::new(view, PAGE_BYTES)?;
                            put(&mut plan, root, &key, &value)?;
                            plan.finish()
                        });
                        prop_assert!(!planned.changes.is_empty());
                        pages.install(planned);
                        model.insert(key, value);
                    }
                    Op::Delete(key) => {
                        let key = key_of(key);
                        let (found, planned) = pages.run(|view| {
                            let mut plan = MiniTransaction::new(view, PAGE_BYTES)?;
                            let found = delete(&mut plan, root, &key)?;
                            Ok((found, plan.finish()?))
                        });
                        prop_assert_eq!(found, model.remove(&key).is_some());
                        prop_assert_eq!(planned.changes.len(), usize::from(found));
                        pages.install(planned);
                    }
                    Op::Scan(low, high, limit) => {
                        let (start, end) = (Bound::Included(key_of(low)), Bound::Excluded(key_of(high)));
                        let mut out: Entries = Vec::new();
                        pages.run(|view| {
                            let from = match out.last() {
                                Some((key, _)) => Bound::Excluded(key.clone()),
                                None => start.clone(),
                            };
                            scan(view, PAGE_BYTES, root, &from, &end, limit, &mut out)
                        });
                        let expected: Vec<(Vec<u8>, Vec<u8>)> = model
                            .iter()
                            .filter(|(key, _)| above_start(key, &start) && below_end(key, &end))
                            .take(limit)
                            .map(|(key, value)| (key.clone(), value.clone()))
                            .collect();
                        prop_assert_eq!(out, expected);
                    }
                }
            }
            let all: Vec<(Vec<u8>, Vec<u8>)> = model.iter().map(|(key, value)| (key.clone(), value.clone())).collect();
            prop_assert_eq!(check_tree(&pages, root), all.clone());
            for (key, value) in &all {
                let found = pages.run(|view| get(view, PAGE_BYTES, root, key));
                prop_assert_eq!(found.as_ref(), Some(value));
            }
        }
    }

    #[test]
    fn filling_a_tree_splits_the_root_into_levels_and_keeps_its_page() {
        let (mut pages, root) = Pages::with_tree();
        let mut records_per_put = Vec::new();
        for index in 0..3000u32 {
            // Long keys: inner pages fill too, and the tree grows to three levels.
            let mut key = index.to_be_bytes().to_vec();
            key.extend_from_slice(&[b'k'; 200]);
            let planned = pages.run(|view| {
                let mut plan = MiniTransaction::new(view, PAGE_BYTES)?;
                put(&mut plan, root, &key, &[7; 100])?;
                plan.finish()
            });
            records_per_put.push(pages.install(planned));
        }
        let root_page = SlottedPage::new(&pages.storage[&root]).unwrap();
        assert_eq!(root_page.kind(), PageKind::Inner);
        assert_eq!(root_page.level(), 2, "leaves, one level of inner pages split in turn, the root");
        assert_eq!(check_tree(&pages, root).len(), 3000);
        // A put without a split is one record; a split is several (the new
        // page's format, the truncation, the links, the separator), in one plan.
        assert!(records_per_put.iter().all(|records| *records >= 1));
        let splits = records_per_put.iter().filter(|records| **records > 1).count();
        assert!((3000 / 40..3000 / 5).contains(&splits), "{splits} splits for 3000 puts of 300 bytes");
        assert!(records_per_put.iter().all(|records| *records == 1 || *records >= 4));
        // Nothing but slotted-page ops reached storage (no page images).
        assert!(pages.storage.values().all(|image| image.len() == PAGE_BYTES));
    }
}
