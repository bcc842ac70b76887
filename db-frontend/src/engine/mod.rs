//! # The storage engine: B-trees of 8 KiB pages in the Aurora volume
//!
//! [`AuroraKv`] is the real [`KvStore`] under the SQL engine. Every tree
//! is a B-tree ([`btree`]) of slotted pages (`common::slotted`). A
//! change to a page is a physical-logical redo record ("insert this cell
//! at slot k"); no page image is ever written to storage: the segments
//! build pages from those records when a page is read.
//!
//! ## Pages of the volume
//!
//! ```text
//! page 0            meta: a cell per tree (tree id u32 BE, root page u64 LE),
//!                   right = the next tree id, aux = the next never-used page
//! pages 1..=256     the undo log (see `undo`); page 1's aux = undo pages in use
//! pages 257..       B-tree pages, handed out in order
//! ```
//!
//! ## Mini-transactions and transactions
//!
//! Each change (a put, a delete, a tree created or dropped) is one
//! mini-transaction: its undo entry, its page changes (a whole split
//! included) and, if it took new pages, the allocator's mark in the meta
//! page. The volume marks its last record a consistency point, so VDL
//! never stops inside one and a recovered volume holds all of it or none.
//! A commit is one more record, which empties the undo log; it returns to
//! the client once VDL reaches it. A transaction's records are logged
//! deferred ([`VolumeClient::write_deferred`]): they leave with its
//! commit's durability wait, one frame and one log write per segment for
//! the whole transaction. Commits of concurrent sessions share the
//! volume's group commit: one transaction runs at a time (the single
//! writer of [`crate::sql::kv`]), but the next one starts while the
//! previous commit is still on its way to the disks. A writer that
//! crashes with a transaction open may have sent none of it (nothing to
//! undo) or some of it (undone at the next open).
//!
//! A rollback applies the undo entries backwards. A writer that starts on
//! a volume whose undo log is not empty (its predecessor crashed with a
//! transaction open) does the same before serving.
//!
//! ## The buffer cache
//!
//! Pages read or changed stay in a cache of `cache_pages` pages, evicted by
//! a clock. A page is evicted only once every change to it is durable
//! (its page LSN at or below VDL; Aurora's paper phrases the rule as
//! "page LSN >= VDL", by which it means the same guarantee: "all changes
//! in the page have been hardened in the log" and "on a cache miss, it is
//! sufficient to request a version of the page as of the current VDL").
//! A miss reads the page at VDL from one segment ([`VolumeClient::read_page`]).
//! Eviction runs when a transaction begins, never in the middle of one.

pub mod btree;
pub mod replica;
pub mod undo;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ops::Bound;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use common::slotted::{PageHeader, PageKind, SlotOp, SlottedPage};
use common::{Lsn, PageId};
use tokio::sync::{Mutex, OwnedMutexGuard};

use crate::sql::kv::{CATALOG_TREE, Entries, KvError, KvStore, KvTxn, TreeId, check_entry};
use crate::volume::client::VolumeClient;
use btree::{META_PAGE, MiniTransaction, PageView, PlanError, Planned};
use undo::{UNDO_HEAD, UNDO_PAGES_MAX, UndoEntry};

/// The smallest page the engine runs on: a page must hold four of the
/// largest cells (see `KEY_BYTES_MAX` and `VALUE_BYTES_MAX`).
pub const ENGINE_PAGE_BYTES_MIN: usize = 8192;
/// The cache never shrinks below this many pages.
pub const CACHE_PAGES_MIN: usize = 64;
/// The default cache: 16,384 pages (128 MiB of 8 KiB pages).
pub const CACHE_PAGES_DEFAULT: usize = 16_384;
/// Pages one plan may read from storage before it is declared stuck.
const PLAN_READS_MAX: usize = 1024;
/// The first B-tree page.
const FIRST_TREE_PAGE: u64 = UNDO_HEAD.0 + UNDO_PAGES_MAX;

/// One cached page.
#[derive(Debug)]
struct CachedPage {
    image: Vec<u8>,
    /// The last change's LSN: its mini-transaction's consistency point
    /// (or the LSN the page was read at).
    lsn: Lsn,
    /// Read since the clock hand last passed.
    referenced: AtomicBool,
}

/// Pages by id, with a clock for eviction.
#[derive(Debug, Default)]
pub(crate) struct PageCache {
    pages: HashMap<PageId, CachedPage>,
    clock: VecDeque<PageId>,
    capacity: usize,
}

impl PageView for PageCache {
    fn page(&self, page: PageId) -> Option<&[u8]> {
        let cached = self.pages.get(&page)?;
        cached.referenced.store(true, Ordering::Relaxed);
        Some(&cached.image)
    }
}

impl PageCache {
    pub(crate) fn with_capacity(capacity: usize) -> PageCache {
        PageCache { capacity: capacity.max(CACHE_PAGES_MIN), ..PageCache::default() }
    }

    pub(crate) fn image_mut(&mut self, page: PageId) -> Option<&mut Vec<u8>> {
        self.pages.get_mut(&page).map(|cached| &mut cached.image)
    }

    pub(crate) fn clear(&mut self) {
        self.pages.clear();
        self.clock.clear();
    }

    pub(crate) fn install(&mut self, page: PageId, image: Vec<u8>, lsn: Lsn) {
        let cached = CachedPage { image, lsn, referenced: AtomicBool::new(true) };
        if self.pages.insert(page, cached).is_none() {
            self.clock.push_back(page);
        }
    }

    /// Evicts pages until at most `capacity` remain, taking only pages
    /// whose every change is durable (LSN at or below `durable`).
    pub(crate) fn evict(&mut self, durable: Lsn) -> usize {
        let mut evicted = 0;
        let mut steps = 2 * self.clock.len();
        while self.pages.len() > self.capacity && steps > 0 {
            steps -= 1;
            let Some(page) = self.clock.pop_front() else { break };
            let cached = &self.pages[&page];
            if page == META_PAGE || cached.referenced.swap(false, Ordering::Relaxed) || cached.lsn > durable {
                self.clock.push_back(page);
                continue;
            }
            self.pages.remove(&page);
            evicted += 1;
        }
        evicted
    }
}

/// The engine's state, behind the one-transaction-at-a-time lock.
#[derive(Debug)]
struct EngineState {
    cache: PageCache,
    /// Tree -> root page, as the meta page's cells say.
    trees: BTreeMap<TreeId, PageId>,
    /// Undo pages holding entries of the open transaction (at least 1).
    undo_pages: u64,
    /// The consistency point of the last mini-transaction logged.
    last_logged: Lsn,
    /// A volume error left the cache ahead of the log: nothing more runs.
    failed: Option<String>,
}

#[derive(Debug)]
struct Shared {
    volume: Arc<VolumeClient>,
    page_bytes: usize,
    state: Arc<Mutex<EngineState>>,
    /// Every logged mini-transaction and transaction end, for replicas.
    replication: tokio::sync::broadcast::Sender<replica::Streamed>,
}

/// B-trees in an Aurora volume, as a [`KvStore`]. Cheap to clone.
#[derive(Clone, Debug)]
pub struct AuroraKv {
    shared: Arc<Shared>,
}

/// What [`AuroraKv::open`] found and did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenReport {
    /// The volume held no database yet: one was created.
    pub created: bool,
    /// Undo entries of a transaction the previous writer left open, now
    /// rolled back.
    pub rolled_back_entries: usize,
}

pub(crate) fn storage_error(error: impl std::fmt::Display) -> KvError {
    KvError::Storage(error.to_string())
}

impl AuroraKv {
    /// Opens the database in `volume` (creating it in an empty volume) and
    /// rolls back a transaction a crashed writer left open.
    pub async fn open(volume: Arc<VolumeClient>, cache_pages: usize) -> Result<(AuroraKv, OpenReport), KvError> {
        let page_bytes = volume.geometry().page_bytes;
        if page_bytes < ENGINE_PAGE_BYTES_MIN {
            return Err(KvError::Storage(format!(
                "the volume's {page_bytes}-byte pages are smaller than ENGINE_PAGE_BYTES_MIN ({ENGINE_PAGE_BYTES_MIN})"
            )));
        }
        let cache = PageCache::with_capacity(cache_pages);
        let state = EngineState { cache, trees: BTreeMap::new(), undo_pages: 1, last_logged: Lsn::ZERO, failed: None };
        let (replication, _) = tokio::sync::broadcast::channel(replica::STREAM_CAPACITY);
        let shared = Arc::new(Shared { volume, page_bytes, state: Arc::new(Mutex::new(state)), replication });
        let store = AuroraKv { shared };
        let mut state = store.shared.state.clone().lock_owned().await;
        let mut report = OpenReport { created: false, rolled_back_entries: 0 };
        store.load(&mut state, META_PAGE).await?;
        if state.cache.pages[&META_PAGE].image[0] == PageKind::Unformatted as u8 {
            store.create_database(&mut state).await?;
            report.created = true;
        } else {
            store.read_directory(&mut state)?;
            let entries = store.read_undo_log(&mut state).await?;
            report.rolled_back_entries = entries.len();
            if !entries.is_empty() {
                store.undo(&mut state, entries).await?;
            }
        }
        let durable = state.last_logged;
        drop(state);
        store.shared.volume.wait_durable(durable).await.map_err(storage_error)?;
        Ok((store, report))
    }

    /// The volume underneath.
    pub fn volume(&self) -> &Arc<VolumeClient> {
        &self.shared.volume
    }

    /// Pages in the cache now.
    pub async fn cached_pages(&self) -> usize {
        self.shared.state.lock().await.cache.pages.len()
    }

    /// Every cached page, for comparing with what storage serves.
    pub async fn cached_page_images(&self) -> Vec<(PageId, Vec<u8>)> {
        let state = self.shared.state.lock().await;
        let mut pages: Vec<(PageId, Vec<u8>)> =
            state.cache.pages.iter().map(|(page, cached)| (*page, cached.image.clone())).collect();
        pages.sort_unstable_by_key(|(page, _)| *page);
        pages
    }

    async fn create_database(&self, state: &mut EngineState) -> Result<(), KvError> {
        let page_bytes = self.shared.page_bytes;
        let mut empty_meta = vec![0; page_bytes];
        let meta_header = PageHeader { kind: PageKind::Meta, level: 0, owner: 0, right: 1, aux: FIRST_TREE_PAGE };
        SlotOp::Format { header: meta_header, cells: Vec::new() }.apply(&mut empty_meta).map_err(storage_error)?;
        // The meta page is formatted inside the plan; the view starts from
        // the formatted copy so that the plan can allocate.
        let view = SinglePage { page: META_PAGE, image: empty_meta };
        let mut plan = MiniTransaction::new(&view, page_bytes).map_err(plan_error)?;
        plan.apply(META_PAGE, SlotOp::Format { header: meta_header, cells: Vec::new() }).map_err(plan_error)?;
        let undo_header = PageHeader { kind: PageKind::Undo, level: 0, owner: 0, right: 0, aux: 1 };
        plan.apply(UNDO_HEAD, SlotOp::Format { header: undo_header, cells: Vec::new() }).map_err(plan_error)?;
        let root = btree::create(&mut plan, CATALOG_TREE.0).map_err(plan_error)?;
        plan.apply(META_PAGE, SlotOp::Insert { slot: 0, cell: directory_cell(CATALOG_TREE, root) })
            .map_err(plan_error)?;
        let planned = plan.finish().map_err(plan_error)?;
        let lsn = self.log(state, planned).await?;
        state.trees.insert(CATALOG_TREE, root);
        self.end_transaction(lsn);
        Ok(())
    }

    /// Tells replicas that no transaction is open once `lsn` is durable.
    fn end_transaction(&self, lsn: Lsn) {
        let _ = self
            .shared
            .replication
            .send(replica::Streamed::TransactionEnd { lsn, logged_at: std::time::Instant::now() });
    }

    /// A replica's start: the stream from the next transaction on, and the
    /// transaction boundary it starts at (held as a read point, so garbage
    /// collection keeps what a read there needs; the replica releases it).
    pub async fn subscribe(&self) -> Result<(tokio::sync::broadcast::Receiver<replica::Streamed>, Lsn), KvError> {
        let state = self.shared.state.lock().await; // no transaction is open
        let boundary = state.last_logged;
        self.shared
            .volume
            .hold_read_point(boundary)
            .map_err(|floor| KvError::Storage(format!("the last transaction end {boundary} is below MRPL {floor}")))?;
        Ok((self.shared.replication.subscribe(), boundary))
    }

    /// The page size the engine runs on.
    pub fn page_bytes(&self) -> usize {
        self.shared.page_bytes
    }

    fn read_directory(&self, state: &mut EngineState) -> Result<(), KvError> {
        let meta = SlottedPage::new(&state.cache.pages[&META_PAGE].image).map_err(storage_error)?;
        if meta.kind() != PageKind::Meta {
            return Err(KvError::Storage(format!(
                "page 0 of the volume is a {:?} page: no database here",
                meta.kind()
            )));
        }
        let mut trees = BTreeMap::new();
        for cell in meta.cells() {
            let (tree, root) = parse_directory_cell(cell)?;
            trees.insert(tree, root);
        }
        state.trees = trees;
        Ok(())
    }

    /// The undo entries left in the log, oldest first.
    async fn read_undo_log(&self, state: &mut EngineState) -> Result<Vec<UndoEntry>, KvError> {
        self.load(state, UNDO_HEAD).await?;
        let pages = SlottedPage::new(&state.cache.pages[&UNDO_HEAD].image).map_err(storage_error)?.aux();
        if !(1..=UNDO_PAGES_MAX).contains(&pages) {
            return Err(KvError::Storage(format!("the undo log claims {pages} pages")));
        }
        let mut entries = Vec::new();
        for index in 0..pages {
            let page = PageId(UNDO_HEAD.0 + index);
            self.load(state, page).await?;
            let view = SlottedPage::new(&state.cache.pages[&page].image).map_err(storage_error)?;
            for cell in view.cells() {
                entries.push(UndoEntry::decode(cell).map_err(KvError::Storage)?);
            }
        }
        state.undo_pages = pages;
        Ok(entries)
    }

    /// Reads `page` at VDL into the cache.
    async fn load(&self, state: &mut EngineState, page: PageId) -> Result<(), KvError> {
        let read = self.shared.volume.read_page(page).await.map_err(storage_error)?;
        state.cache.install(page, read.image.to_vec(), read.page_lsn);
        Ok(())
    }

    /// Runs `plan` until every page it needs is cached.
    async fn plan<T>(
        &self,
        state: &mut EngineState,
        mut plan: impl FnMut(&PageCache, &EngineStateView) -> Result<T, PlanError>,
    ) -> Result<T, KvError> {
        if let Some(reason) = &state.failed {
            return Err(KvError::Storage(reason.clone()));
        }
        for _ in 0..PLAN_READS_MAX {
            let view = EngineStateView { trees: &state.trees, undo_pages: state.undo_pages };
            match plan(&state.cache, &view) {
                Ok(result) => return Ok(result),
                Err(PlanError::Missing(page)) => self.load(state, page).await?,
                Err(PlanError::Corrupt(reason)) => return Err(KvError::Storage(reason)),
            }
        }
        Err(KvError::Storage(format!("a plan still missed pages after {PLAN_READS_MAX} reads")))
    }

    /// Logs a planned mini-transaction and installs its pages.
    async fn log(&self, state: &mut EngineState, planned: Planned) -> Result<Lsn, KvError> {
        match self.shared.volume.write_deferred(&planned.changes).await {
            Ok(lsn) => {
                for (page, image) in planned.pages {
                    state.cache.install(page, image, lsn);
                }
                state.last_logged = lsn;
                // No replica listening is not an error.
                let _ = self
                    .shared
                    .replication
                    .send(replica::Streamed::MiniTransaction { lsn, changes: Arc::new(planned.changes) });
                Ok(lsn)
            }
            Err(error) => {
                let reason = format!("the volume refused a mini-transaction ({error}); the engine stops");
                state.failed = Some(reason.clone());
                Err(KvError::Storage(reason))
            }
        }
    }

    /// Applies undo entries backwards, each as its own mini-transaction,
    /// then empties the undo log (logged, not waited for).
    async fn undo(&self, state: &mut EngineState, entries: Vec<UndoEntry>) -> Result<(), KvError> {
        let page_bytes = self.shared.page_bytes;
        for entry in entries.into_iter().rev() {
            let planned = self
                .plan(state, |cache, view| {
                    let mut plan = MiniTransaction::new(cache, page_bytes)?;
                    match &entry {
                        UndoEntry::Restore { tree, key, earlier } => {
                            let Some(root) = view.trees.get(tree) else { return Ok(None) };
                            match earlier {
                                Some(value) => btree::put(&mut plan, *root, key, value)?,
                                None => {
                                    btree::delete(&mut plan, *root, key)?;
                                }
                            }
                        }
                        UndoEntry::Created { tree } => remove_directory_cell(&mut plan, *tree)?,
                        UndoEntry::Dropped { tree, root } => insert_directory_cell(&mut plan, *tree, *root)?,
                    }
                    if plan.is_empty() { Ok(None) } else { plan.finish().map(Some) }
                })
                .await?;
            if let Some(planned) = planned {
                self.log(state, planned).await?;
            }
            match entry {
                UndoEntry::Created { tree } => {
                    state.trees.remove(&tree);
                }
                UndoEntry::Dropped { tree, root } => {
                    state.trees.insert(tree, root);
                }
                UndoEntry::Restore { .. } => {}
            }
        }
        self.empty_undo_log(state).await.map(|_| ())
    }

    /// The commit record: the undo log emptied.
    async fn empty_undo_log(&self, state: &mut EngineState) -> Result<Lsn, KvError> {
        let page_bytes = self.shared.page_bytes;
        let planned = self
            .plan(state, |cache, _| {
                let mut plan = MiniTransaction::new(cache, page_bytes)?;
                let header = PageHeader { kind: PageKind::Undo, level: 0, owner: 0, right: 0, aux: 1 };
                plan.apply(UNDO_HEAD, SlotOp::Format { header, cells: Vec::new() })?;
                plan.finish()
            })
            .await?;
        let lsn = self.log(state, planned).await?;
        state.undo_pages = 1;
        self.end_transaction(lsn);
        Ok(lsn)
    }
}

/// [`btree::scan`] over `cache`, reading each page it misses from
/// `volume` (at VDL, or at a replica's `read_point`) and going on after
/// the last key found.
pub(crate) async fn scan_loading(
    cache: &mut PageCache,
    volume: &VolumeClient,
    read_point: Option<Lsn>,
    page_bytes: usize,
    root: PageId,
    (start, end): (Bound<Vec<u8>>, Bound<Vec<u8>>),
    limit: Option<usize>,
) -> Result<Entries, KvError> {
    let limit = limit.unwrap_or(usize::MAX);
    let mut out = Entries::new();
    let mut from = start;
    loop {
        let found_before = out.len();
        match btree::scan(cache, page_bytes, root, &from, &end, limit, &mut out) {
            Ok(()) => return Ok(out),
            Err(PlanError::Missing(page)) => {
                let read = match read_point {
                    Some(point) => volume.read_page_at(page, point).await,
                    None => volume.read_page(page).await,
                };
                let read = read.map_err(storage_error)?;
                cache.install(page, read.image.to_vec(), read_point.unwrap_or(read.page_lsn));
            }
            Err(PlanError::Corrupt(reason)) => return Err(KvError::Storage(reason)),
        }
        if out.len() > found_before
            && let Some((last, _)) = out.last()
        {
            from = Bound::Excluded(last.clone());
        }
    }
}

/// What a plan may read of the engine state besides the cache.
#[derive(Debug)]
struct EngineStateView<'state> {
    trees: &'state BTreeMap<TreeId, PageId>,
    undo_pages: u64,
}

/// A view of one page (the meta page while a database is created).
#[derive(Debug)]
struct SinglePage {
    page: PageId,
    image: Vec<u8>,
}

impl PageView for SinglePage {
    fn page(&self, page: PageId) -> Option<&[u8]> {
        (page == self.page).then_some(self.image.as_slice())
    }
}

fn plan_error(error: PlanError) -> KvError {
    match error {
        PlanError::Missing(page) => KvError::Storage(format!("{page} was needed and not cached")),
        PlanError::Corrupt(reason) => KvError::Storage(reason),
    }
}

fn directory_cell(tree: TreeId, root: PageId) -> Bytes {
    let mut cell = Vec::with_capacity(12);
    cell.extend_from_slice(&tree.0.to_be_bytes());
    cell.extend_from_slice(&root.0.to_le_bytes());
    Bytes::from(cell)
}

pub(crate) fn parse_directory_cell(cell: &[u8]) -> Result<(TreeId, PageId), KvError> {
    if cell.len() != 12 {
        return Err(KvError::Storage(format!("a directory cell of {} bytes (12 expected)", cell.len())));
    }
    let tree = TreeId(u32::from_be_bytes(cell[..4].try_into().expect("4 bytes")));
    Ok((tree, PageId(u64::from_le_bytes(cell[4..].try_into().expect("8 bytes")))))
}

/// The directory slot of `tree`, and whether it is there.
fn directory_slot<View: PageView>(plan: &MiniTransaction<'_, View>, tree: TreeId) -> Result<(usize, bool), PlanError> {
    let meta = plan.read(META_PAGE)?;
    for (slot, cell) in meta.cells().enumerate() {
        let id =
            u32::from_be_bytes(cell[..4].try_into().map_err(|_| PlanError::Corrupt("a short directory cell".into()))?);
        if id >= tree.0 {
            return Ok((slot, id == tree.0));
        }
    }
    Ok((meta.slot_count(), false))
}

fn insert_directory_cell<View: PageView>(
    plan: &mut MiniTransaction<'_, View>,
    tree: TreeId,
    root: PageId,
) -> Result<(), PlanError> {
    let (slot, present) = directory_slot(plan, tree)?;
    if !present {
        plan.apply(META_PAGE, SlotOp::Insert { slot: slot as u16, cell: directory_cell(tree, root) })?;
    }
    Ok(())
}

fn remove_directory_cell<View: PageView>(plan: &mut MiniTransaction<'_, View>, tree: TreeId) -> Result<(), PlanError> {
    let (slot, present) = directory_slot(plan, tree)?;
    if present {
        plan.apply(META_PAGE, SlotOp::Delete { slot: slot as u16 })?;
    }
    Ok(())
}

/// Adds `entry` to the undo log inside `plan`; the undo pages in use after it.
fn log_undo<View: PageView>(
    plan: &mut MiniTransaction<'_, View>,
    undo_pages: u64,
    entry: &UndoEntry,
) -> Result<Result<u64, KvError>, PlanError> {
    let cell = entry.encode();
    let last = PageId(UNDO_HEAD.0 + undo_pages - 1);
    let page = plan.read(last)?;
    if cell.len() + common::slotted::SLOT_BYTES <= page.free_bytes() {
        let slot = page.slot_count() as u16;
        plan.apply(last, SlotOp::Insert { slot, cell })?;
        return Ok(Ok(undo_pages));
    }
    if undo_pages == UNDO_PAGES_MAX {
        return Ok(Err(KvError::TransactionTooLarge(format!(
            "its undo log fills UNDO_PAGES_MAX ({UNDO_PAGES_MAX}) pages"
        ))));
    }
    let next = PageId(UNDO_HEAD.0 + undo_pages);
    let header = PageHeader { kind: PageKind::Undo, level: 0, owner: 0, right: 0, aux: 0 };
    plan.apply(next, SlotOp::Format { header, cells: vec![cell] })?;
    plan.apply(UNDO_HEAD, SlotOp::SetLinks { right: 0, aux: undo_pages + 1 })?;
    Ok(Ok(undo_pages + 1))
}

/// An [`AuroraKv`] transaction.
#[derive(Debug)]
pub struct AuroraTxn {
    store: AuroraKv,
    /// `None` once committed or rolled back.
    state: Option<OwnedMutexGuard<EngineState>>,
    /// This transaction's undo entries, oldest first.
    undo: Vec<UndoEntry>,
}

impl KvStore for AuroraKv {
    type Txn = AuroraTxn;

    async fn begin(&self) -> Result<AuroraTxn, KvError> {
        let mut state = self.shared.state.clone().lock_owned().await;
        if let Some(reason) = &state.failed {
            return Err(KvError::Storage(reason.clone()));
        }
        let durable = self.shared.volume.points().volume_durable;
        state.cache.evict(durable);
        Ok(AuroraTxn { store: self.clone(), state: Some(state), undo: Vec::new() })
    }
}

impl AuroraTxn {
    fn state(&mut self) -> &mut EngineState {
        self.state.as_mut().expect("a transaction's state is held until it ends")
    }

    fn root(&mut self, tree: TreeId) -> Result<PageId, KvError> {
        self.state().trees.get(&tree).copied().ok_or(KvError::NoSuchTree(tree))
    }

    /// Plans `change` behind `entry`'s undo and logs both as one
    /// mini-transaction; what the plan that was logged returned.
    async fn change<R>(
        &mut self,
        entry: UndoEntry,
        change: impl Fn(&mut MiniTransaction<'_, PageCache>) -> Result<R, PlanError> + Send,
    ) -> Result<R, KvError> {
        let store = self.store.clone();
        let page_bytes = store.shared.page_bytes;
        let state = self.state.as_mut().expect("held until the transaction ends");
        let (planned, undo_pages, result) = store
            .plan(state, |cache, view| {
                let mut plan = MiniTransaction::new(cache, page_bytes)?;
                let undo_pages = match log_undo(&mut plan, view.undo_pages, &entry)? {
                    Ok(pages) => pages,
                    Err(refused) => return Ok(Err(refused)),
                };
                let result = change(&mut plan)?;
                Ok(Ok((plan.finish()?, undo_pages, result)))
            })
            .await??;
        store.log(state, planned).await?;
        state.undo_pages = undo_pages;
        self.undo.push(entry);
        Ok(result)
    }

    async fn get_value(&mut self, root: PageId, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        let store = self.store.clone();
        let page_bytes = store.shared.page_bytes;
        store.plan(self.state(), |cache, _| btree::get(cache, page_bytes, root, key)).await
    }
}

impl KvTxn for AuroraTxn {
    async fn get(&mut self, tree: TreeId, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        let root = self.root(tree)?;
        self.get_value(root, key).await
    }

    async fn put(&mut self, tree: TreeId, key: &[u8], value: &[u8]) -> Result<(), KvError> {
        check_entry(key, value)?;
        let root = self.root(tree)?;
        let earlier = self.get_value(root, key).await?;
        let entry = UndoEntry::Restore { tree, key: key.to_vec(), earlier };
        self.change(entry, |plan| btree::put(plan, root, key, value)).await
    }

    async fn delete(&mut self, tree: TreeId, key: &[u8]) -> Result<bool, KvError> {
        check_entry(key, &[])?;
        let root = self.root(tree)?;
        let Some(earlier) = self.get_value(root, key).await? else { return Ok(false) };
        let entry = UndoEntry::Restore { tree, key: key.to_vec(), earlier: Some(earlier) };
        self.change(entry, |plan| btree::delete(plan, root, key)).await?;
        Ok(true)
    }

    async fn scan(
        &mut self,
        tree: TreeId,
        start: Bound<Vec<u8>>,
        end: Bound<Vec<u8>>,
        limit: Option<usize>,
    ) -> Result<Entries, KvError> {
        let root = self.root(tree)?;
        let store = self.store.clone();
        let state = self.state.as_mut().expect("held until the transaction ends");
        if let Some(reason) = &state.failed {
            return Err(KvError::Storage(reason.clone()));
        }
        let volume = &store.shared.volume;
        scan_loading(&mut state.cache, volume, None, store.shared.page_bytes, root, (start, end), limit).await
    }

    async fn create_tree(&mut self) -> Result<TreeId, KvError> {
        let tree = {
            let state = self.state();
            let meta = SlottedPage::new(&state.cache.pages[&META_PAGE].image).map_err(storage_error)?;
            TreeId(u32::try_from(meta.right()).map_err(|_| KvError::Storage("tree ids are used up".into()))?)
        };
        let root = self
            .change(UndoEntry::Created { tree }, move |plan| {
                let root = btree::create(plan, tree.0)?;
                insert_directory_cell(plan, tree, root)?;
                let aux = plan.read(META_PAGE)?.aux();
                plan.apply(META_PAGE, SlotOp::SetLinks { right: u64::from(tree.0) + 1, aux })?;
                Ok(root)
            })
            .await?;
        self.state().trees.insert(tree, root);
        Ok(tree)
    }

    async fn drop_tree(&mut self, tree: TreeId) -> Result<(), KvError> {
        if tree == CATALOG_TREE {
            return Err(KvError::Undroppable(tree));
        }
        let root = self.root(tree)?;
        self.change(UndoEntry::Dropped { tree, root }, |plan| remove_directory_cell(plan, tree)).await?;
        self.state().trees.remove(&tree);
        Ok(())
    }

    async fn commit(mut self) -> Result<(), KvError> {
        let store = self.store.clone();
        let mut state = self.state.take().expect("held until the transaction ends");
        let wrote = !self.undo.is_empty();
        let wait_for = if wrote { store.empty_undo_log(&mut state).await? } else { state.last_logged };
        self.undo.clear();
        drop(state); // the next transaction may start: its commit comes after this one
        store.shared.volume.wait_durable(wait_for).await.map_err(storage_error)?;
        if wrote {
            let acknowledged =
                replica::Streamed::Committed { lsn: wait_for, acknowledged_at: std::time::Instant::now() };
            let _ = store.shared.replication.send(acknowledged);
        }
        Ok(())
    }

    async fn rollback(mut self) -> Result<(), KvError> {
        let store = self.store.clone();
        let mut state = self.state.take().expect("held until the transaction ends");
        let entries = std::mem::take(&mut self.undo);
        let undone = if entries.is_empty() { Ok(()) } else { store.undo(&mut state, entries).await };
        store.shared.volume.send_deferred();
        undone
    }
}

impl Drop for AuroraTxn {
    fn drop(&mut self) {
        let Some(mut state) = self.state.take() else { return };
        let entries = std::mem::take(&mut self.undo);
        if entries.is_empty() {
            return;
        }
        let store = self.store.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    if let Err(error) = store.undo(&mut state, entries).await {
                        tracing::error!(%error, "rolling back a dropped transaction failed");
                    }
                    store.shared.volume.send_deferred();
                });
            }
            Err(_) => {
                state.failed = Some("a transaction was dropped outside a runtime and could not be rolled back".into());
            }
        }
    }
}
