//! Read replicas: front ends that serve reads of the same volume, kept
//! current by the writer's redo stream.
//!
//! The writer sends every mini-transaction it logs, and a mark when a
//! transaction ends (its commit record, or the end of its rollback), over
//! a bounded stream ([`AuroraKv::subscribe`]). A replica keeps the
//! mini-transactions of the transaction in progress aside; once the
//! transaction's end is durable (VDL at or past it) it applies all of
//! them, whole, to the pages it has cached, and moves its read point to
//! that end. So a replica never shows half of a split (a split is inside
//! one mini-transaction) nor anything of a transaction that has not
//! committed (its changes are applied with its end, and a rolled-back
//! transaction's changes come with their undo). A page the replica does
//! not have it reads from storage at its read point; its read point is
//! held at the writer ([`VolumeClient::hold_read_point`]), so the
//! segments' garbage collection keeps every version such a read needs.
//!
//! Shape: a replica runs in the writer's process and reads pages through
//! the writer's [`VolumeClient`] (its connections to the segments), at its
//! own read point; the stream is an in-process channel. A replica that
//! falls more than [`STREAM_CAPACITY`] events behind drops its cache and
//! starts again at the next transaction end (nothing it shows is wrong
//! meanwhile: it keeps its old read point).
//!
//! Lag is measured two ways, per transaction: from the writer's commit
//! being acknowledged (durable, the client told) to the replica showing
//! it (the replica lag the bars are about); and from the writer logging the
//! commit record, which adds the wait for durability.

use std::collections::{BTreeMap, VecDeque};
use std::ops::Bound;
use std::sync::Arc;
use std::time::Instant;

use common::slotted::SlottedPage;
use common::{Lsn, PageId};
use parking_lot::Mutex as SyncMutex;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{Mutex, OwnedMutexGuard, broadcast};
use tokio::task::JoinHandle;

use super::btree::{self, META_PAGE, PageView as _, PlanError};
use super::{AuroraKv, PageCache, parse_directory_cell, scan_loading, storage_error};
use crate::sql::kv::{Entries, KvError, KvStore, KvTxn, TreeId};
use crate::volume::client::VolumeClient;
use crate::volume::writer::PageChange;

/// Events the writer's stream holds for a slow replica before it lags.
pub const STREAM_CAPACITY: usize = 65_536;
/// The most replicas `lab` starts on one volume.
pub const REPLICAS_MAX: usize = 15;
/// Lag samples a replica keeps (the latest ones).
const LAG_SAMPLES_MAX: usize = 100_000;
/// Transaction ends a replica remembers the showing time of.
const SHOWN_REMEMBERED_MAX: usize = 4096;

/// What the writer streams.
#[derive(Clone, Debug)]
pub enum Streamed {
    /// A logged mini-transaction whose consistency point is `lsn`.
    MiniTransaction { lsn: Lsn, changes: Arc<Vec<PageChange>> },
    /// No transaction is open once `lsn` is durable.
    TransactionEnd { lsn: Lsn, logged_at: Instant },
    /// The commit at `lsn` was acknowledged to its client (it is durable).
    Committed { lsn: Lsn, acknowledged_at: Instant },
}

/// A replica's lag samples, in microseconds, newest last.
#[derive(Debug, Default)]
struct LagSamples {
    /// Commit acknowledged on the writer -> shown here.
    acknowledged_to_shown: VecDeque<u64>,
    /// Commit record logged on the writer -> shown here.
    logged_to_shown: VecDeque<u64>,
    /// When recent transaction ends were shown, for their `Committed`.
    shown_at: BTreeMap<Lsn, Instant>,
}

impl LagSamples {
    fn push(samples: &mut VecDeque<u64>, micros: u64) {
        if samples.len() == LAG_SAMPLES_MAX {
            samples.pop_front();
        }
        samples.push_back(micros);
    }

    fn shown(&mut self, lsn: Lsn, logged_at: Instant) {
        let now = Instant::now();
        Self::push(&mut self.logged_to_shown, now.duration_since(logged_at).as_micros() as u64);
        self.shown_at.insert(lsn, now);
        while self.shown_at.len() > SHOWN_REMEMBERED_MAX {
            self.shown_at.pop_first();
        }
    }

    fn committed(&mut self, lsn: Lsn, acknowledged_at: Instant) {
        // Shown before the client heard of it: no lag at all.
        if let Some(shown) = self.shown_at.remove(&lsn) {
            let lag = shown.saturating_duration_since(acknowledged_at);
            Self::push(&mut self.acknowledged_to_shown, lag.as_micros() as u64);
        }
    }
}

/// Milliseconds at `quantile` of `sorted` (0 when it is empty).
fn quantile_ms(sorted: &[u64], quantile: f64) -> f64 {
    if sorted.is_empty() {
        0.0
    } else {
        sorted[((sorted.len() - 1) as f64 * quantile).round() as usize] as f64 / 1000.0
    }
}

/// A replica's state, behind its lock (readers and the applier).
#[derive(Debug)]
struct ReplicaState {
    cache: PageCache,
    /// Every read is at this transaction boundary.
    read_point: Lsn,
    failed: Option<String>,
}

#[derive(Debug)]
struct ReplicaShared {
    volume: Arc<VolumeClient>,
    page_bytes: usize,
    state: Arc<Mutex<ReplicaState>>,
    lags: SyncMutex<LagSamples>,
    applier: SyncMutex<Option<JoinHandle<()>>>,
}

/// A read replica, as a read-only [`KvStore`]. Cheap to clone.
#[derive(Clone, Debug)]
pub struct ReplicaKv {
    shared: Arc<ReplicaShared>,
}

/// Percentiles of a replica's lag.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LagReport {
    /// Commits whose lag was measured.
    pub commits: usize,
    /// From the commit's acknowledgement on the writer to the replica.
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Transaction ends (commits and rollbacks) shown.
    pub transactions: usize,
    /// From the commit record's logging on the writer to the replica.
    pub logged_p50_ms: f64,
    pub logged_p99_ms: f64,
}

impl ReplicaKv {
    /// Starts a replica of `writer`'s database with a cache of `cache_pages`.
    pub async fn start(writer: &AuroraKv, cache_pages: usize) -> Result<ReplicaKv, KvError> {
        let (stream, boundary) = writer.subscribe().await?;
        let volume = writer.volume().clone();
        volume.wait_durable(boundary).await.map_err(storage_error)?;
        let state = ReplicaState { cache: PageCache::with_capacity(cache_pages), read_point: boundary, failed: None };
        let shared = Arc::new(ReplicaShared {
            volume,
            page_bytes: writer.page_bytes(),
            state: Arc::new(Mutex::new(state)),
            lags: SyncMutex::new(LagSamples::default()),
            applier: SyncMutex::new(None),
        });
        let applier = tokio::spawn(apply_stream(shared.clone(), stream));
        *shared.applier.lock() = Some(applier);
        Ok(ReplicaKv { shared })
    }

    /// The transaction boundary reads are at.
    pub async fn read_point(&self) -> Lsn {
        self.shared.state.lock().await.read_point
    }

    /// Lag over the transactions shown so far (the latest 100,000).
    pub fn lag(&self) -> LagReport {
        let lags = self.shared.lags.lock();
        let mut acknowledged: Vec<u64> = lags.acknowledged_to_shown.iter().copied().collect();
        let mut logged: Vec<u64> = lags.logged_to_shown.iter().copied().collect();
        acknowledged.sort_unstable();
        logged.sort_unstable();
        LagReport {
            commits: acknowledged.len(),
            p50_ms: quantile_ms(&acknowledged, 0.5),
            p99_ms: quantile_ms(&acknowledged, 0.99),
            max_ms: quantile_ms(&acknowledged, 1.0),
            transactions: logged.len(),
            logged_p50_ms: quantile_ms(&logged, 0.5),
            logged_p99_ms: quantile_ms(&logged, 0.99),
        }
    }

    /// Forgets the lag samples so far.
    pub fn reset_lag(&self) {
        *self.shared.lags.lock() = LagSamples::default();
    }

    /// Whether a change is refused, as a replica must refuse it.
    pub async fn writes_refused(&self) -> bool {
        let Ok(mut txn) = self.begin().await else { return false };
        txn.put(TreeId(0), b"k", b"v").await == Err(KvError::ReadOnly)
            && txn.create_tree().await == Err(KvError::ReadOnly)
    }

    /// Stops applying the stream and releases the read point.
    pub async fn stop(&self) {
        if let Some(applier) = self.shared.applier.lock().take() {
            applier.abort();
        }
        let state = self.shared.state.lock().await;
        self.shared.volume.release_read_point(state.read_point);
    }
}

/// The applier: mini-transactions wait for their transaction's end; then
/// all of them are applied, to cached pages only, in one step.
async fn apply_stream(shared: Arc<ReplicaShared>, mut stream: broadcast::Receiver<Streamed>) {
    let mut pending: Vec<Arc<Vec<PageChange>>> = Vec::new();
    let mut resynchronizing = false;
    loop {
        let event = match stream.recv().await {
            Ok(event) => event,
            Err(RecvError::Closed) => return,
            Err(RecvError::Lagged(missed)) => {
                tracing::warn!(
                    missed,
                    "a replica fell behind the redo stream: it starts again at the next transaction end"
                );
                pending.clear();
                resynchronizing = true;
                continue;
            }
        };
        match event {
            Streamed::MiniTransaction { changes, .. } => pending.push(changes),
            Streamed::TransactionEnd { lsn, logged_at } => {
                if shared.volume.wait_durable(lsn).await.is_err() {
                    let mut state = shared.state.lock().await;
                    state.failed = Some("the writer's volume stopped: the replica stops".into());
                    return;
                }
                let mut state = shared.state.lock().await;
                if shared.volume.hold_read_point(lsn).is_err() {
                    state.failed = Some(format!("the replica's next read point {lsn} is below MRPL"));
                    return;
                }
                shared.volume.release_read_point(state.read_point);
                if resynchronizing {
                    state.cache.clear();
                    resynchronizing = false;
                } else {
                    for change in pending.iter().flat_map(|changes| changes.iter()) {
                        if let Some(image) = state.cache.image_mut(change.page)
                            && let Err(error) = change.op.apply(image)
                        {
                            // The cache no longer follows the log: start clean.
                            tracing::error!(%error, page = %change.page, "a replica could not apply a streamed record");
                            state.cache.clear();
                            break;
                        }
                    }
                }
                pending.clear();
                state.read_point = lsn;
                drop(state);
                shared.lags.lock().shown(lsn, logged_at);
            }
            Streamed::Committed { lsn, acknowledged_at } => shared.lags.lock().committed(lsn, acknowledged_at),
        }
    }
}

/// A read-only transaction on a replica: it holds the replica's lock, so
/// the read point does not move under it.
#[derive(Debug)]
pub struct ReplicaTxn {
    shared: Arc<ReplicaShared>,
    state: OwnedMutexGuard<ReplicaState>,
}

impl KvStore for ReplicaKv {
    type Txn = ReplicaTxn;

    async fn begin(&self) -> Result<ReplicaTxn, KvError> {
        let mut state = self.shared.state.clone().lock_owned().await;
        if let Some(reason) = &state.failed {
            return Err(KvError::Storage(reason.clone()));
        }
        let read_point = state.read_point;
        state.cache.evict(read_point); // every cached page is at the read point
        Ok(ReplicaTxn { shared: self.shared.clone(), state })
    }
}

impl ReplicaTxn {
    /// Runs `plan` until every page it needs is cached.
    async fn plan<T>(&mut self, mut plan: impl FnMut(&PageCache) -> Result<T, PlanError>) -> Result<T, KvError> {
        loop {
            match plan(&self.state.cache) {
                Ok(result) => return Ok(result),
                Err(PlanError::Missing(page)) => self.load(page).await?,
                Err(PlanError::Corrupt(reason)) => return Err(KvError::Storage(reason)),
            }
        }
    }

    async fn load(&mut self, page: PageId) -> Result<(), KvError> {
        let read_point = self.state.read_point;
        let read = self.shared.volume.read_page_at(page, read_point).await.map_err(storage_error)?;
        self.state.cache.install(page, read.image.to_vec(), read_point);
        Ok(())
    }

    async fn root(&mut self, tree: TreeId) -> Result<PageId, KvError> {
        let found = self
            .plan(|cache| {
                let meta = cache.page(META_PAGE).ok_or(PlanError::Missing(META_PAGE))?;
                let meta = SlottedPage::new(meta)?;
                for cell in meta.cells() {
                    let (id, root) =
                        parse_directory_cell(cell).map_err(|error| PlanError::Corrupt(error.to_string()))?;
                    if id == tree {
                        return Ok(Some(root));
                    }
                }
                Ok(None)
            })
            .await?;
        found.ok_or(KvError::NoSuchTree(tree))
    }
}

impl KvTxn for ReplicaTxn {
    async fn get(&mut self, tree: TreeId, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        let root = self.root(tree).await?;
        let page_bytes = self.shared.page_bytes;
        self.plan(|cache| btree::get(cache, page_bytes, root, key)).await
    }

    async fn put(&mut self, _tree: TreeId, _key: &[u8], _value: &[u8]) -> Result<(), KvError> {
        Err(KvError::ReadOnly)
    }

    async fn delete(&mut self, _tree: TreeId, _key: &[u8]) -> Result<bool, KvError> {
        Err(KvError::ReadOnly)
    }

    async fn scan(
        &mut self,
        tree: TreeId,
        start: Bound<Vec<u8>>,
        end: Bound<Vec<u8>>,
        limit: Option<usize>,
    ) -> Result<Entries, KvError> {
        let root = self.root(tree).await?;
        let (volume, read_point) = (&self.shared.volume, Some(self.state.read_point));
        scan_loading(&mut self.state.cache, volume, read_point, self.shared.page_bytes, root, (start, end), limit).await
    }

    async fn create_tree(&mut self) -> Result<TreeId, KvError> {
        Err(KvError::ReadOnly)
    }

    async fn drop_tree(&mut self, _tree: TreeId) -> Result<(), KvError> {
        Err(KvError::ReadOnly)
    }

    async fn commit(self) -> Result<(), KvError> {
        Ok(())
    }

    async fn rollback(self) -> Result<(), KvError> {
        Ok(())
    }
}
