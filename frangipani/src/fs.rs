//! A Frangipani workstation: the file system operations over a coherent
//! write-back cache of the shared block device, under the lock service's
//! locks, with metadata updates logged in the workstation's own log region
//! before they are written back (F97 §4–§6).
//!
//! ## Locks
//! - one per inode (table `frangipani.inode`): it covers the inode block and
//!   every block of the file or directory;
//! - one per bitmap portion (`frangipani.portion`): it covers that bitmap
//!   block; workstation `w` allocates from portion `w mod portions` first;
//! - one per replay of a log (`frangipani.recovery`, named by workstation
//!   and lease epoch): its fresh token stamps the replay's writes, and two
//!   replays of one lease's log take turns.
//!
//! An operation takes all its locks at once, in sorted order
//! ([`lockserver::Clerk::acquire_all`]), before it touches the cache. When
//! it finds it needs a lock it does not hold (the inode a directory entry
//! names, a bitmap portion), it undoes what it changed, adds the lock, and
//! runs again from the start with the larger set. Locks are sticky: the
//! clerk keeps them until the server revokes them. On a revoke the
//! workstation writes its log, then every dirty block, and drops the cached
//! blocks of a lock it gives up entirely ([`FileSystem::flush_for_revoke`]).
//!
//! ## Versions and stamps
//! Every block has one version in the block volume, which grows by one with
//! each update; for an inode or a directory block it is also the version in
//! its frame. A log record carries the version it makes, so replay applies
//! it only over an older block. Writes are stamped with the workstation's
//! lease epoch and the highest fencing token it ever received: the lock
//! server issues tokens from one sequence, so whoever writes a block after a
//! hand-off (of its inode lock, or of the bitmap portion through which it
//! was freed and reused) stamps higher than every earlier writer. A small
//! block is read before it is reused, so it continues its version (a stale
//! log record about its previous life as a directory block is older).
//!
//! ## Logging
//! Each operation's metadata changes are one transaction in the log
//! ([`crate::wal`]). A dirty metadata block is written back only after the
//! log holding its records is durable. File data is not logged: it is
//! durable after `fsync` (or a revoke, or the write-back timer).

use crate::bitmap::BitmapPortion;
use crate::device::{BlockDevice, DeviceError, Stamp, Stored};
use crate::directory::{DirectoryBlock, DirectoryError, Entry, NAME_BYTES_MAX};
use crate::inode::{Content, Inode, InodeError, Kind, NO_BLOCK, Place, SMALL_POINTERS, SYMLINK_BYTES_MAX, place};
use crate::layout::{
    BITS_PER_PORTION, LARGE_BLOCK_BYTES, Layout, LayoutError, ParameterBlock, Resource, SMALL_BLOCK_BYTES,
};
use crate::metadata::{self, Framing};
use crate::wal::{self, LogBlockWrite, LogWriter, Record, WalError};
use common::transport::{BoxFuture, Transport};
use lockserver::{Clerk, ClerkConfig, ClerkId, ClerkStats, LeaseEpoch, LockGuard, LockName, LockTable, Mode};
use std::collections::{BTreeMap, HashMap, btree_map};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;
use thiserror::Error;
use tracing::{debug, info, warn};

/// The root directory's inode number (inode 0 is never used).
pub const ROOT_INODE: u64 = 1;
/// An operation that keeps finding locks it lacks gives up after this many runs.
const OPERATION_RUNS_MAX: usize = 32;
/// Blocks written back (or log blocks read) at once (the storage nodes
/// commit a batch of writes with one fdatasync).
const STORAGE_PARALLEL: usize = 256;
/// A revoke's write-back is tried this many more times before the
/// workstation gives up its lease instead.
const REVOKE_WRITE_BACK_ATTEMPTS: u32 = 8;
/// Operations between checks of the cache's size and dirty blocks.
const CACHE_CHECK_EVERY: u64 = 64;
/// Free blocks (or inodes) read in one round when allocating: a storage
/// round trip per this many allocations.
const PREFETCH_BLOCKS: usize = 32;

/// Why a file-system operation failed; [`FsError::errno`] maps each to errno.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum FsError {
    #[error("no such file or directory")]
    NotFound,
    #[error("file exists")]
    Exists,
    #[error("directory not empty")]
    NotEmpty,
    #[error("no space left: {0}")]
    NoSpace(&'static str),
    #[error("name too long")]
    NameTooLong,
    #[error("not a directory")]
    NotDirectory,
    #[error("is a directory")]
    IsDirectory,
    #[error("invalid argument: {0}")]
    Invalid(&'static str),
    #[error("not permitted: {0}")]
    NotPermitted(&'static str),
    #[error("file too large")]
    TooLarge,
    #[error("lock service: {0}")]
    Locks(String),
    #[error("the lease was lost: cached changes are gone")]
    LeaseLost,
    #[error("storage: {0}")]
    Storage(String),
    #[error("damaged volume: {0}")]
    Corrupt(String),
}

impl FsError {
    /// The errno a system call reports for this error.
    pub fn errno(&self) -> i32 {
        match self {
            FsError::NotFound => libc::ENOENT,
            FsError::Exists => libc::EEXIST,
            FsError::NotEmpty => libc::ENOTEMPTY,
            FsError::NoSpace(_) => libc::ENOSPC,
            FsError::NameTooLong => libc::ENAMETOOLONG,
            FsError::NotDirectory => libc::ENOTDIR,
            FsError::IsDirectory => libc::EISDIR,
            FsError::Invalid(_) => libc::EINVAL,
            FsError::NotPermitted(_) => libc::EPERM,
            FsError::TooLarge => libc::EFBIG,
            FsError::Locks(_) | FsError::LeaseLost | FsError::Storage(_) | FsError::Corrupt(_) => libc::EIO,
        }
    }
}

impl From<DeviceError> for FsError {
    fn from(error: DeviceError) -> Self {
        match error {
            DeviceError::Fenced(_) => FsError::LeaseLost,
            other => FsError::Storage(other.to_string()),
        }
    }
}

impl From<InodeError> for FsError {
    fn from(error: InodeError) -> Self {
        match error {
            InodeError::SymlinkTooLong(_) => FsError::NameTooLong,
            InodeError::Corrupt(why) => FsError::Corrupt(why),
        }
    }
}

impl From<DirectoryError> for FsError {
    fn from(error: DirectoryError) -> Self {
        match error {
            DirectoryError::BadName(length) if length > NAME_BYTES_MAX => FsError::NameTooLong,
            DirectoryError::BadName(_) => FsError::Invalid("a name is 1..=255 bytes without '/' or NUL"),
            DirectoryError::Exists => FsError::Exists,
            DirectoryError::Full => FsError::NoSpace("directory block full"),
            DirectoryError::Corrupt(why) => FsError::Corrupt(why),
        }
    }
}

impl From<LayoutError> for FsError {
    fn from(error: LayoutError) -> Self {
        FsError::Corrupt(error.to_string())
    }
}

/// How an operation run ends early: with an error, or because it needs a
/// lock it does not hold (undo, take it, run again).
enum Fail {
    Fs(FsError),
    NeedLock,
}

impl<E: Into<FsError>> From<E> for Fail {
    fn from(error: E) -> Self {
        Fail::Fs(error.into())
    }
}

type Run<T> = Result<T, Fail>;

/// What `stat` shows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub kind: Kind,
    pub permissions: u32,
    pub links: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    /// Blocks allocated, in bytes.
    pub allocated: u64,
    pub accessed: i64,
    pub modified: i64,
    pub changed: i64,
    pub generation: u64,
    /// The inode's version: it changes with every change of the file.
    pub version: u64,
}

/// What a write did to its file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Written {
    pub bytes: usize,
    /// The inode's version before and after the write (every change of an
    /// inode makes it version + 1).
    pub version_before: u64,
    pub version_after: u64,
}

/// What `setattr` changes (`None`: leave as is).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SetAttr {
    pub permissions: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub accessed: Option<i64>,
    pub modified: Option<i64>,
}

/// One name in a directory listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    pub name: Vec<u8>,
    pub ino: u64,
    pub kind: Kind,
    /// Where the listing resumes after this entry: its block and slot, so
    /// names added or removed meanwhile do not shift the others.
    pub cookie: u64,
}

/// What `statfs` shows (read from the bitmaps without locks: a snapshot).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FsSpace {
    pub small_blocks: u64,
    pub small_free: u64,
    pub large_blocks: u64,
    pub large_free: u64,
    pub inodes: u64,
    pub inodes_free: u64,
}

/// Counters for benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FsStats {
    pub operations: u64,
    pub storage_reads: u64,
    pub storage_writes: u64,
    pub log_block_writes: u64,
    pub lock: ClerkStats,
}

/// Tuning of a workstation.
#[derive(Clone, Debug)]
pub struct FsConfig {
    /// How long an operation waits for its locks.
    pub lock_timeout: Duration,
    /// Write back once this many blocks are dirty.
    pub dirty_blocks_max: usize,
    /// Drop clean cached blocks once this many are cached.
    pub cached_blocks_max: usize,
}

impl Default for FsConfig {
    fn default() -> Self {
        FsConfig { lock_timeout: Duration::from_secs(60), dirty_blocks_max: 8192, cached_blocks_max: 65_536 }
    }
}

/// Where a workstation finds its lock service and how it talks to it.
#[derive(Clone, Debug)]
pub struct LockService {
    pub transport: Arc<dyn Transport>,
    /// One address, or every replica of a replicated service.
    pub addresses: Vec<String>,
    pub clerk: ClerkConfig,
    pub lease_timeout: Duration,
}

#[derive(Clone, Copy, Debug)]
struct Tables {
    inode: LockTable,
    portion: LockTable,
    recovery: LockTable,
}

impl Tables {
    fn new() -> Result<Tables, FsError> {
        let named = |name| LockTable::named(name).map_err(|error| FsError::Locks(error.to_string()));
        Ok(Tables {
            inode: named("frangipani.inode")?,
            portion: named("frangipani.portion")?,
            recovery: named("frangipani.recovery")?,
        })
    }

    fn inode(&self, ino: u64) -> LockName {
        self.inode.lock(ino)
    }

    fn portion(&self, resource: Resource, portion: u64) -> LockName {
        let kind = match resource {
            Resource::Inode => 0,
            Resource::SmallBlock => 1,
            Resource::LargeBlock => 2,
        };
        self.portion.lock(kind << 32 | portion)
    }

    /// The lock taken to replay the log that `workstation` wrote under
    /// lease `epoch` (`starting` false), or by `workstation` itself as
    /// lease `epoch` starts, to replay its earlier leases (`starting`
    /// true). One name per replay, so its grant is always fresh (a token
    /// above every token the replayed lease held) and never waits for that
    /// lease's own locks; two replays of one lease take turns.
    fn recovery(&self, workstation: u32, epoch: u64, starting: bool) -> LockName {
        let epoch_bits = epoch & ((1 << 39) - 1);
        self.recovery.lock(u64::from(workstation) << 40 | u64::from(starting) << 39 | epoch_bits)
    }
}

/// A cached block: its image, the version the image has, whether storage
/// has it, and the lock that covers it.
#[derive(Clone, Debug)]
struct Cached {
    version: u64,
    data: Vec<u8>,
    dirty: bool,
    lock: LockName,
}

#[derive(Debug, Default)]
struct State {
    blocks: HashMap<u64, Cached>,
    /// The log, once set up under the current lease (`log_epoch`).
    log: Option<LogWriter>,
    log_epoch: u64,
    /// Closed log blocks not yet written, oldest first.
    closed: Vec<LogBlockWrite>,
    /// The open log block has transactions not yet written.
    open_unflushed: bool,
    /// How often the open block has been written (its writes' versions grow).
    open_writes: (u64, u64),
}

impl State {
    /// Forgets everything cached and the log not yet written (a new lease).
    fn drop_cache(&mut self) {
        self.blocks.clear();
        self.closed.clear();
        self.open_unflushed = false;
        self.log = None;
    }

    fn dirty_count(&self) -> usize {
        self.blocks.values().filter(|cached| cached.dirty).count()
    }
}

/// One workstation's file system.
#[derive(Debug)]
pub struct FileSystem {
    workstation: u32,
    layout: Layout,
    device: Arc<dyn BlockDevice>,
    tables: Tables,
    config: FsConfig,
    clerk: Clerk,
    /// This file system, for tasks it starts.
    this: Weak<FileSystem>,
    state: tokio::sync::Mutex<State>,
    /// The highest fencing token received: every write is stamped with it.
    clock: AtomicU64,
    operations: AtomicU64,
    storage_reads: AtomicU64,
    storage_writes: AtomicU64,
    log_block_writes: AtomicU64,
    /// The kernel's cache of this file system, once mounted with FUSE.
    kernel_cache: OnceLock<Arc<dyn KernelCache>>,
}

/// What the kernel may cache of this file system (a FUSE mount's names and
/// attributes). It may keep only what a lock this workstation holds covers,
/// so before a lock goes to another workstation it is told to forget.
pub trait KernelCache: Send + Sync + std::fmt::Debug {
    /// The lock on inode `ino` is about to be released: forget the inode's
    /// attributes and, for a directory, the names in it.
    fn release_inode(&self, ino: u64) -> BoxFuture<'_, ()>;
    /// Every lock is gone (the lease lapsed): forget everything.
    fn release_all(&self);
}

/// The clerk's view of the workstation (the clerk is made before the file
/// system it serves, so it holds it weakly).
#[derive(Debug, Default)]
struct ClerkCallbacks(OnceLock<Weak<FileSystem>>);

impl lockserver::Workstation for ClerkCallbacks {
    fn flush(&self, lock: LockName, keep: Option<Mode>) -> BoxFuture<'static, ()> {
        let fs = self.0.get().and_then(Weak::upgrade);
        Box::pin(async move {
            if let Some(fs) = fs {
                fs.flush_for_revoke(lock, keep).await;
            }
        })
    }

    fn recover(&self, dead: LeaseEpoch, dead_clerk: ClerkId) -> BoxFuture<'static, ()> {
        let fs = self.0.get().and_then(Weak::upgrade);
        Box::pin(async move {
            let Some(fs) = fs else { return };
            let Some(workstation) = dead_clerk.0.checked_sub(1).and_then(|w| u32::try_from(w).ok()) else { return };
            // Retried until it succeeds: the dead workstation's locks stay
            // held until it does.
            for attempt in 0u32.. {
                match fs.replay_log(workstation, dead.0).await {
                    Ok(applied) => {
                        info!(workstation, epoch = dead.0, applied, "recovered a dead workstation's log");
                        return;
                    }
                    Err(error) => {
                        warn!(workstation, attempt, %error, "recovery failed; retrying");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        })
    }

    fn lease_lost(&self) {
        // The kernel forgets at once what it cached. This cache is dropped
        // by the next operation or write-back, which sees that the clerk's
        // lease is not the cache's (`check_lease`); its dirty blocks are
        // lost with the lease.
        warn!("lease lost");
        if let Some(fs) = self.0.get().and_then(Weak::upgrade) {
            fs.release_kernel_cache();
        }
    }
}

fn now_nanos() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos() as i64
}

/// How a logged block is framed (only directory blocks are logged among
/// data blocks); a pointer to anything else is damage.
fn framing_of(layout: &Layout, block: u64) -> Result<Framing, FsError> {
    metadata::framing(layout, block, true).map_err(|error| FsError::Corrupt(error.to_string()))
}

/// Writes a fresh volume: the parameter block and an empty root directory.
pub async fn format(device: &dyn BlockDevice, parameters: ParameterBlock) -> Result<Layout, FsError> {
    let layout = Layout::new(parameters)?;
    let stamp = Stamp { epoch: 0, token: 0 };
    let existing = device.read(layout.parameter_block()).await?;
    if !existing.data.is_empty() {
        return Err(FsError::Invalid("the volume is formatted already"));
    }
    let now = now_nanos();
    let root = Inode {
        version: 1,
        kind: Kind::Directory,
        permissions: 0o755,
        links: 2,
        parent: ROOT_INODE as u32,
        accessed: now,
        modified: now,
        changed: now,
        generation: 1,
        ..Inode::free()
    };
    device.write(layout.inode_block(ROOT_INODE), 1, stamp, root.encode()?).await?;
    let mut bitmap = BitmapPortion::decode(&[], BITS_PER_PORTION.min(parameters.inodes)).expect("an empty portion");
    for expected in [0, ROOT_INODE] {
        assert_eq!(bitmap.allocate(), Some(expected), "inodes 0 and 1 come first");
    }
    device.write(layout.bitmap_block(Resource::Inode, 0), 1, stamp, bitmap.encode()).await?;
    // Last: a volume is formatted once its parameter block is there.
    device.write(layout.parameter_block(), 1, stamp, parameters.encode()).await?;
    Ok(layout)
}

/// Reads a volume's layout from its parameter block.
pub async fn read_layout(device: &dyn BlockDevice) -> Result<Layout, FsError> {
    let stored = device.read(0).await?;
    if stored.data.is_empty() {
        return Err(FsError::Invalid("the volume is not formatted (no parameter block)"));
    }
    Ok(Layout::new(ParameterBlock::decode(&stored.data)?)?)
}

impl FileSystem {
    /// Mounts the volume on `device` as workstation `workstation` (its log
    /// region; clerk id `workstation + 1`).
    pub async fn mount(
        workstation: u32,
        device: Arc<dyn BlockDevice>,
        locks: LockService,
        config: FsConfig,
    ) -> Result<Arc<FileSystem>, FsError> {
        let layout = read_layout(device.as_ref()).await?;
        if workstation >= layout.parameters.workstations {
            return Err(FsError::Invalid("the volume has no log region for this workstation number"));
        }
        let callbacks = Arc::new(ClerkCallbacks::default());
        let clerk = Clerk::connect_replicated(
            ClerkId(u64::from(workstation) + 1),
            locks.clerk,
            locks.transport,
            locks.addresses,
            callbacks.clone(),
            locks.lease_timeout,
        )
        .await
        .map_err(|error| FsError::Locks(error.to_string()))?;
        let tables = Tables::new()?;
        let fs = Arc::new_cyclic(|this| FileSystem {
            workstation,
            layout,
            device,
            tables,
            config,
            clerk,
            this: this.clone(),
            state: tokio::sync::Mutex::new(State::default()),
            clock: AtomicU64::new(0),
            operations: AtomicU64::new(0),
            storage_reads: AtomicU64::new(0),
            storage_writes: AtomicU64::new(0),
            log_block_writes: AtomicU64::new(0),
            kernel_cache: OnceLock::new(),
        });
        callbacks.0.set(Arc::downgrade(&fs)).expect("set once");
        Ok(fs)
    }

    pub fn workstation(&self) -> u32 {
        self.workstation
    }

    /// Keeps `cache` (the kernel's, for a FUSE mount) coherent with the
    /// locks from now on. One per file system.
    pub fn attach_kernel_cache(&self, cache: Arc<dyn KernelCache>) -> Result<(), FsError> {
        self.kernel_cache.set(cache).map_err(|_| FsError::Invalid("a kernel cache is attached already"))
    }

    fn release_kernel_cache(&self) {
        if let Some(cache) = self.kernel_cache.get() {
            cache.release_all();
        }
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    pub fn stats(&self) -> FsStats {
        FsStats {
            operations: self.operations.load(Ordering::Relaxed),
            storage_reads: self.storage_reads.load(Ordering::Relaxed),
            storage_writes: self.storage_writes.load(Ordering::Relaxed),
            log_block_writes: self.log_block_writes.load(Ordering::Relaxed),
            lock: self.clerk.stats(),
        }
    }

    /// Writes the log and every dirty block, then stops the clerk (its
    /// locks are released when its lease lapses or the server sees it go).
    pub async fn unmount(&self) -> Result<(), FsError> {
        let result = self.sync().await;
        self.clerk.stop();
        result
    }

    /// Stops as a crash would: nothing more is written, nothing released.
    pub fn crash(&self) {
        self.clerk.stop();
    }

    /// The stamp of writes made under lease `epoch`.
    fn stamp(&self, epoch: u64) -> Stamp {
        Stamp { epoch, token: self.clock.load(Ordering::SeqCst) }
    }

    /// The cache belongs to the lease it was built under: once the clerk's
    /// lease is another (or none), the cache and the unwritten log are
    /// dropped, and nothing of them is ever written under the new lease.
    fn check_lease(&self, state: &mut State) -> Result<(), FsError> {
        if self.clerk.lease().map(|epoch| epoch.0) == Some(state.log_epoch) {
            return Ok(());
        }
        if state.log.is_some() {
            warn!(workstation = self.workstation, epoch = state.log_epoch, "lease lost: dropping the cache");
            self.release_kernel_cache();
        }
        state.drop_cache();
        Err(FsError::LeaseLost)
    }

    async fn device_read(&self, block: u64) -> Result<Stored, FsError> {
        self.storage_reads.fetch_add(1, Ordering::Relaxed);
        Ok(self.device.read(block).await?)
    }

    async fn device_write(&self, block: u64, version: u64, stamp: Stamp, data: Vec<u8>) -> Result<(), DeviceError> {
        self.storage_writes.fetch_add(1, Ordering::Relaxed);
        self.device.write(block, version, stamp, data).await
    }

    // ----- running operations -----

    /// Runs `body` under the locks it needs: starting from `first`, and
    /// adding each lock a run finds it lacks (the run's changes are undone).
    async fn run<T>(
        &self,
        first: &[(LockName, Mode)],
        mut body: impl AsyncFnMut(&mut Op<'_>) -> Run<T>,
    ) -> Result<T, FsError> {
        self.operations.fetch_add(1, Ordering::Relaxed);
        let mut want: BTreeMap<LockName, Mode> = BTreeMap::new();
        for (lock, mode) in first {
            let entry = want.entry(*lock).or_insert(*mode);
            *entry = (*entry).max(*mode);
        }
        for _ in 0..OPERATION_RUNS_MAX {
            let locks: Vec<(LockName, Mode)> = want.iter().map(|(lock, mode)| (*lock, *mode)).collect();
            let guards = self
                .clerk
                .acquire_all(&locks, self.config.lock_timeout)
                .await
                .map_err(|error| FsError::Locks(error.to_string()))?;
            self.note_tokens(&guards);
            let epoch = guards.first().map(|guard| guard.epoch.0).ok_or(FsError::Invalid("no locks"))?;
            if guards.iter().any(|guard| guard.epoch.0 != epoch)
                || self.clerk.lease().map(|lease| lease.0) != Some(epoch)
            {
                continue; // the lease changed while the locks were taken: take them again
            }
            let mut state = self.state.lock().await;
            if state.log_epoch != epoch || state.log.is_none() {
                // A new lease: what was cached under the old one is gone.
                let recovery = (self.tables.recovery(self.workstation, epoch, true), Mode::Exclusive);
                if let btree_map::Entry::Vacant(slot) = want.entry(recovery.0) {
                    slot.insert(recovery.1);
                    continue;
                }
                self.start_log(&mut state, epoch).await?;
            }
            let held = guards.iter().map(|guard| (guard.lock, guard.mode)).collect();
            let mut op = Op::new(self, &mut state, held);
            let outcome = body(&mut op).await;
            let outcome = match outcome {
                Ok(value) => op.commit().await.map(|()| value),
                Err(fail) => Err(fail),
            };
            match outcome {
                Ok(value) => {
                    drop(op);
                    if let Err(error) = self.write_back_if_full(&mut state).await {
                        // The operation is done and logged: report it so.
                        warn!(%error, "write-back of a full cache failed; it is retried later");
                    }
                    return Ok(value);
                }
                Err(Fail::NeedLock) => {
                    let needed = op.rollback();
                    for (lock, mode) in needed {
                        let entry = want.entry(lock).or_insert(mode);
                        *entry = (*entry).max(mode);
                    }
                }
                Err(Fail::Fs(error)) => {
                    op.rollback();
                    return Err(error);
                }
            }
        }
        Err(FsError::Locks("an operation kept needing more locks".into()))
    }

    /// Takes the locks of inodes about to be allocated in the background,
    /// all at once: the creates that use them then find them held (locks
    /// are sticky) instead of waiting a lock-server round trip each.
    fn take_locks_ahead(&self, inodes: Vec<u64>) {
        let Some(fs) = self.this.upgrade() else { return };
        tokio::spawn(async move {
            let acquires = inodes
                .iter()
                .map(|ino| fs.clerk.acquire(fs.tables.inode(*ino), Mode::Exclusive, fs.config.lock_timeout));
            for guard in futures::future::join_all(acquires).await.into_iter().flatten() {
                fs.note_tokens(std::slice::from_ref(&guard));
            }
        });
    }

    fn note_tokens(&self, guards: &[LockGuard]) {
        for guard in guards {
            self.clock.fetch_max(guard.token.0, Ordering::SeqCst);
        }
    }

    /// Sets the log up under lease `epoch`: first replays what earlier
    /// leases of this workstation left in it (under the recovery lock of
    /// this lease, which the caller holds), then starts after it, empty.
    /// (The lock service may have another workstation replay the same
    /// leases at the same time: replay applies only records newer than
    /// their blocks, so both write the same images.)
    async fn start_log(&self, state: &mut State, epoch: u64) -> Result<(), FsError> {
        state.drop_cache();
        let region = self.read_region(self.workstation).await?;
        self.replay(&select_epochs(&region, |written| written != epoch)).await?;
        let next = wal::scan(&select_epochs(&region, |_| true)).next_sequence;
        state.log = Some(LogWriter::new(self.layout.parameters.log_blocks, next, next));
        state.log_epoch = epoch;
        debug!(workstation = self.workstation, epoch, next, "log started");
        Ok(())
    }

    /// Every block of `workstation`'s log region, as the volume has it.
    async fn read_region(&self, workstation: u32) -> Result<Vec<Stored>, FsError> {
        let indexes: Vec<u32> = (0..self.layout.parameters.log_blocks).collect();
        let mut region = Vec::with_capacity(indexes.len());
        for chunk in indexes.chunks(STORAGE_PARALLEL) {
            let reads = chunk.iter().map(|index| self.device_read(self.layout.log_block(workstation, *index)));
            for stored in futures::future::join_all(reads).await {
                region.push(stored?);
            }
        }
        Ok(region)
    }

    /// Replays what `workstation` logged under lease `epoch` (the recovery
    /// demon's work), under that replay's lock. Returns how many blocks it
    /// wrote.
    pub async fn replay_log(&self, workstation: u32, epoch: u64) -> Result<usize, FsError> {
        let guard = self
            .clerk
            .acquire(self.tables.recovery(workstation, epoch, false), Mode::Exclusive, self.config.lock_timeout)
            .await
            .map_err(|error| FsError::Locks(error.to_string()))?;
        self.note_tokens(std::slice::from_ref(&guard));
        let region = self.read_region(workstation).await?;
        self.replay(&select_epochs(&region, |written| written == epoch)).await
    }

    /// Applies every live record of a log region (`wal::scan`) newer than
    /// its block, straight to storage. Restartable: replaying again changes
    /// nothing.
    async fn replay(&self, region: &[Option<Vec<u8>>]) -> Result<usize, FsError> {
        let replay = wal::scan(region);
        let mut current: BTreeMap<u64, Stored> = BTreeMap::new();
        for record in replay.transactions.iter().flatten() {
            if let btree_map::Entry::Vacant(slot) = current.entry(record.block) {
                slot.insert(self.device_read(record.block).await?);
            }
        }
        let records = wal::to_apply(&replay.transactions, |block| current[&block].version);
        let mut changed: BTreeMap<u64, (u64, Vec<u8>)> = BTreeMap::new();
        for record in records {
            let (version, image) =
                changed.entry(record.block).or_insert_with(|| (0, current[&record.block].data.clone()));
            let framing = framing_of(&self.layout, record.block)?;
            *image = metadata::apply(framing, image, &record)
                .map_err(|error| FsError::Corrupt(format!("log record: {error}")))?;
            *version = record.version;
        }
        let stamp = self.stamp(self.clerk.lease().ok_or(FsError::LeaseLost)?.0);
        let written = changed.len();
        for (block, (version, image)) in changed {
            match self.device_write(block, version, stamp, image).await {
                // A later lock holder wrote it: its version is newer.
                Err(DeviceError::Stale(_)) => {}
                other => other?,
            }
        }
        Ok(written)
    }

    // ----- write-back -----

    async fn write_log(&self, state: &mut State) -> Result<(), FsError> {
        self.check_lease(state)?;
        let stamp = self.stamp(state.log_epoch);
        let mut writes = std::mem::take(&mut state.closed);
        let closed = writes.len();
        if state.open_unflushed {
            writes.extend(state.log.as_ref().and_then(LogWriter::flush));
        }
        for (at, write) in writes.iter().enumerate() {
            let rewrites = if state.open_writes.0 == write.sequence { state.open_writes.1 + 1 } else { 1 };
            state.open_writes = (write.sequence, rewrites);
            let version = write.sequence << 32 | rewrites;
            let block = self.layout.log_block(self.workstation, write.index);
            self.log_block_writes.fetch_add(1, Ordering::Relaxed);
            if let Err(error) = self.device_write(block, version, stamp, write.image.clone()).await {
                // Keep the closed blocks not written, in order, for the next
                // try (the open one is imaged afresh then).
                state.closed = writes[at.min(closed)..closed].to_vec();
                return Err(error.into());
            }
        }
        state.open_unflushed = false;
        Ok(())
    }

    /// Writes back the dirty blocks `which` selects (after the log).
    async fn write_back(&self, state: &mut State, which: impl Fn(u64) -> bool) -> Result<(), FsError> {
        self.write_log(state).await?;
        let stamp = self.stamp(state.log_epoch);
        let dirty: Vec<(u64, u64, Vec<u8>)> = state
            .blocks
            .iter()
            .filter(|(block, cached)| cached.dirty && which(**block))
            .map(|(block, cached)| (*block, cached.version, cached.data.clone()))
            .collect();
        let mut dirty = dirty.into_iter().peekable();
        while dirty.peek().is_some() {
            let chunk: Vec<(u64, u64, Vec<u8>)> = dirty.by_ref().take(STORAGE_PARALLEL).collect();
            let written: Vec<(u64, u64)> = chunk.iter().map(|(block, version, _)| (*block, *version)).collect();
            let writes = chunk.into_iter().map(|(block, version, data)| self.device_write(block, version, stamp, data));
            let results = futures::future::join_all(writes).await;
            for ((block, version), result) in written.into_iter().zip(results) {
                result?;
                if let Some(cached) = state.blocks.get_mut(&block)
                    && cached.version == version
                {
                    cached.dirty = false;
                }
            }
        }
        Ok(())
    }

    async fn write_back_if_full(&self, state: &mut State) -> Result<(), FsError> {
        // Counting is a pass over the cache: done every few operations.
        if !self.operations.load(Ordering::Relaxed).is_multiple_of(CACHE_CHECK_EVERY) {
            return Ok(());
        }
        if state.dirty_count() > self.config.dirty_blocks_max {
            self.write_back(state, |_| true).await?;
        }
        if state.blocks.len() > self.config.cached_blocks_max {
            state.blocks.retain(|_, cached| cached.dirty);
        }
        Ok(())
    }

    /// Makes the log durable (the periodic log flush of F97 §4): the
    /// operations so far survive a crash of this workstation, replayed by
    /// another; their blocks stay dirty in the cache.
    pub async fn flush_log(&self) -> Result<(), FsError> {
        let mut state = self.state.lock().await;
        if state.log.is_none() {
            return Ok(());
        }
        self.write_log(&mut state).await
    }

    /// Makes everything durable: the log, then every dirty block (fsync).
    pub async fn sync(&self) -> Result<(), FsError> {
        let mut state = self.state.lock().await;
        if state.log.is_none() {
            return Ok(()); // nothing done under this lease
        }
        self.write_back(&mut state, |_| true).await
    }

    /// A revoke: write the log, then the dirty blocks, then drop the cached
    /// blocks of `lock` unless a shared hold is kept.
    async fn flush_for_revoke(&self, lock: LockName, keep: Option<Mode>) {
        let mut state = self.state.lock().await;
        if state.log.is_some() {
            let mut attempt = 0;
            loop {
                match self.write_back(&mut state, |_| true).await {
                    Ok(()) | Err(FsError::LeaseLost) => break,
                    Err(error) if attempt < REVOKE_WRITE_BACK_ATTEMPTS => {
                        warn!(%lock, attempt, %error, "write-back for a revoke failed; retrying");
                        attempt += 1;
                        tokio::time::sleep(Duration::from_millis(100 << attempt.min(5))).await;
                    }
                    Err(error) => {
                        // Releasing now would hand out blocks older than
                        // what this workstation logged. Stop instead: the
                        // lease lapses, and recovery replays the log.
                        warn!(%lock, %error, "write-back for a revoke keeps failing: stopping this workstation");
                        // Its lease will lapse unseen by the stopped clerk:
                        // the kernel forgets now.
                        self.release_kernel_cache();
                        self.clerk.stop();
                        return;
                    }
                }
            }
        }
        if keep.is_none() {
            state.blocks.retain(|_, cached| cached.lock != lock);
            drop(state);
            // A downgrade keeps what the kernel has: nobody can change it
            // while this workstation holds the lock shared.
            if let Some(cache) = self.kernel_cache.get()
                && self.tables.inode(lock.id) == lock
            {
                cache.release_inode(lock.id).await;
            }
        }
    }

    /// The log is full: write back what its oldest quarter covers, then
    /// reclaim that quarter.
    async fn reclaim_log(&self, state: &mut State) -> Result<(), FsError> {
        let (through, covered) = state.log.as_ref().expect("started").oldest_quarter();
        let covered: std::collections::HashSet<u64> = covered.into_iter().map(|(block, _)| block).collect();
        self.write_back(state, |block| covered.contains(&block)).await?;
        state.log.as_mut().expect("started").reclaim(through);
        Ok(())
    }

    // ----- operations -----

    pub async fn getattr(&self, ino: u64) -> Result<Attr, FsError> {
        let lock = self.tables.inode(ino);
        self.run(&[(lock, Mode::Shared)], async |op| op.attr(ino).await).await
    }

    pub async fn lookup(&self, parent: u64, name: &[u8]) -> Result<Attr, FsError> {
        check_name(name)?;
        self.run(&[(self.tables.inode(parent), Mode::Shared)], async |op| {
            let entry = op.find(parent, name).await?.ok_or(FsError::NotFound)?;
            op.attr(entry.inode).await
        })
        .await
    }

    pub async fn readdir(&self, ino: u64) -> Result<Vec<DirEntry>, FsError> {
        self.run(&[(self.tables.inode(ino), Mode::Shared)], async |op| {
            let inode = op.live_inode(ino, Mode::Shared).await?;
            if inode.kind != Kind::Directory {
                return Err(FsError::NotDirectory.into());
            }
            let mut out = vec![
                DirEntry { name: b".".to_vec(), ino, kind: Kind::Directory, cookie: 1 },
                DirEntry { name: b"..".to_vec(), ino: u64::from(inode.parent), kind: Kind::Directory, cookie: 2 },
            ];
            let Content::Blocks(pointers) = &inode.content else { return Err(FsError::NotDirectory.into()) };
            for (index, block) in pointers.small.iter().enumerate().filter(|(_, block)| **block != NO_BLOCK) {
                let directory = op.directory(*block, ino, Mode::Shared).await?;
                out.extend(directory.slots().map(|(slot, entry)| DirEntry {
                    name: entry.name.clone(),
                    ino: entry.inode,
                    kind: entry.kind,
                    cookie: 3 + (index * SMALL_BLOCK_BYTES + slot) as u64,
                }));
            }
            Ok(out)
        })
        .await
    }

    pub async fn readlink(&self, ino: u64) -> Result<Vec<u8>, FsError> {
        self.run(&[(self.tables.inode(ino), Mode::Shared)], async |op| {
            match op.live_inode(ino, Mode::Shared).await?.content {
                Content::Symlink(target) => Ok(target),
                Content::Blocks(_) => Err(FsError::Invalid("not a symbolic link").into()),
            }
        })
        .await
    }

    /// Makes a file, directory or symbolic link (`target`) called `name` in `parent`.
    pub async fn create(
        &self,
        parent: u64,
        name: &[u8],
        kind: Kind,
        permissions: u32,
        owner: (u32, u32),
        target: Option<&[u8]>,
    ) -> Result<Attr, FsError> {
        check_name(name)?;
        if target.is_some_and(|target| target.len() > SYMLINK_BYTES_MAX) {
            return Err(FsError::NameTooLong);
        }
        self.run(&[(self.tables.inode(parent), Mode::Exclusive)], async |op| {
            let mut directory = op.live_inode(parent, Mode::Exclusive).await?;
            if directory.kind != Kind::Directory {
                return Err(FsError::NotDirectory.into());
            }
            if op.find(parent, name).await?.is_some() {
                return Err(FsError::Exists.into());
            }
            let ino = op.allocate_inode().await?;
            let mut inode = op.inode(ino, Mode::Exclusive).await?;
            if inode.kind != Kind::Free {
                return Err(FsError::Corrupt(format!("inode {ino} is marked free but in use")).into());
            }
            let now = op.now;
            inode = Inode {
                version: inode.version,
                kind,
                permissions: permissions & 0o7777,
                links: if kind == Kind::Directory { 2 } else { 1 },
                uid: owner.0,
                gid: owner.1,
                parent: if kind == Kind::Directory { parent as u32 } else { 0 },
                size: 0,
                accessed: now,
                modified: now,
                changed: now,
                generation: inode.generation + 1,
                content: match target {
                    Some(target) => Content::Symlink(target.to_vec()),
                    None => Content::empty(),
                },
            };
            op.put_inode(ino, &inode)?;
            op.insert_entry(parent, &mut directory, name, ino, kind).await?;
            if kind == Kind::Directory {
                directory.links += 1;
            }
            directory.modified = now;
            directory.changed = now;
            op.put_inode(parent, &directory)?;
            op.attr(ino).await
        })
        .await
    }

    /// Removes `name` from `parent`: a file or link (`directory` false), or
    /// an empty directory (`directory` true).
    pub async fn remove(&self, parent: u64, name: &[u8], directory: bool) -> Result<(), FsError> {
        check_name(name)?;
        self.run(&[(self.tables.inode(parent), Mode::Exclusive)], async |op| {
            let mut parent_inode = op.live_inode(parent, Mode::Exclusive).await?;
            if parent_inode.kind != Kind::Directory {
                return Err(FsError::NotDirectory.into());
            }
            let entry = op.find(parent, name).await?.ok_or(FsError::NotFound)?;
            match (entry.kind == Kind::Directory, directory) {
                (true, false) => return Err(FsError::IsDirectory.into()),
                (false, true) => return Err(FsError::NotDirectory.into()),
                _ => {}
            }
            op.unlink_target(&entry).await?;
            op.remove_entry(parent, &parent_inode, name).await?;
            if directory {
                parent_inode.links -= 1;
            }
            parent_inode.modified = op.now;
            parent_inode.changed = op.now;
            op.put_inode(parent, &parent_inode)?;
            Ok(())
        })
        .await
    }

    /// A new name `name` in `parent` for the file `ino`.
    pub async fn link(&self, ino: u64, parent: u64, name: &[u8]) -> Result<Attr, FsError> {
        check_name(name)?;
        let locks = [(self.tables.inode(ino), Mode::Exclusive), (self.tables.inode(parent), Mode::Exclusive)];
        self.run(&locks, async |op| {
            let mut inode = op.live_inode(ino, Mode::Exclusive).await?;
            if inode.kind == Kind::Directory {
                return Err(FsError::NotPermitted("hard links to directories").into());
            }
            let mut directory = op.live_inode(parent, Mode::Exclusive).await?;
            if directory.kind != Kind::Directory {
                return Err(FsError::NotDirectory.into());
            }
            if op.find(parent, name).await?.is_some() {
                return Err(FsError::Exists.into());
            }
            op.insert_entry(parent, &mut directory, name, ino, inode.kind).await?;
            inode.links += 1;
            inode.changed = op.now;
            op.put_inode(ino, &inode)?;
            directory.modified = op.now;
            directory.changed = op.now;
            op.put_inode(parent, &directory)?;
            op.attr(ino).await
        })
        .await
    }

    /// Renames `from_parent/from` to `to_parent/to`, replacing a file or an
    /// empty directory there; one log transaction.
    pub async fn rename(&self, from_parent: u64, from: &[u8], to_parent: u64, to: &[u8]) -> Result<(), FsError> {
        check_name(from)?;
        check_name(to)?;
        let locks =
            [(self.tables.inode(from_parent), Mode::Exclusive), (self.tables.inode(to_parent), Mode::Exclusive)];
        self.run(&locks, async |op| {
            let mut source = op.live_inode(from_parent, Mode::Exclusive).await?;
            let mut destination = op.live_inode(to_parent, Mode::Exclusive).await?;
            if source.kind != Kind::Directory || destination.kind != Kind::Directory {
                return Err(FsError::NotDirectory.into());
            }
            let moved = op.find(from_parent, from).await?.ok_or(FsError::NotFound)?;
            let replaced = op.find(to_parent, to).await?;
            if replaced.as_ref().is_some_and(|entry| entry.inode == moved.inode) {
                return Ok(()); // two names of one file: nothing to do
            }
            let moving_directory = moved.kind == Kind::Directory;
            if moving_directory && from_parent != to_parent {
                // Not under itself: walk up from the destination.
                let mut at = to_parent;
                for depth in 0.. {
                    if at == ROOT_INODE {
                        break;
                    }
                    if at == moved.inode {
                        return Err(FsError::Invalid("a directory cannot move under itself").into());
                    }
                    if depth > op.fs.layout.parameters.inodes {
                        return Err(FsError::Corrupt("the parents of a directory form a cycle".into()).into());
                    }
                    at = u64::from(op.live_inode(at, Mode::Shared).await?.parent);
                }
            }
            let mut moved_inode = op.live_inode(moved.inode, Mode::Exclusive).await?;
            if let Some(replaced) = &replaced {
                match (replaced.kind == Kind::Directory, moving_directory) {
                    (true, false) => return Err(FsError::IsDirectory.into()),
                    (false, true) => return Err(FsError::NotDirectory.into()),
                    _ => {}
                }
                op.unlink_target(replaced).await?;
                op.remove_entry(to_parent, &destination, to).await?;
                if replaced.kind == Kind::Directory {
                    destination.links -= 1;
                }
            }
            op.remove_entry(from_parent, &source, from).await?;
            if from_parent == to_parent {
                destination = op.live_inode(to_parent, Mode::Exclusive).await?;
                if replaced.as_ref().is_some_and(|entry| entry.kind == Kind::Directory) {
                    destination.links -= 1;
                }
            }
            op.insert_entry(to_parent, &mut destination, to, moved.inode, moved.kind).await?;
            let now = op.now;
            if moving_directory && from_parent != to_parent {
                source.links -= 1;
                destination.links += 1;
                moved_inode.parent = to_parent as u32;
            }
            moved_inode.changed = now;
            op.put_inode(moved.inode, &moved_inode)?;
            destination.modified = now;
            destination.changed = now;
            if from_parent != to_parent {
                source.modified = now;
                source.changed = now;
                op.put_inode(from_parent, &source)?;
            }
            op.put_inode(to_parent, &destination)?;
            Ok(())
        })
        .await
    }

    pub async fn setattr(&self, ino: u64, change: SetAttr) -> Result<Attr, FsError> {
        self.run(&[(self.tables.inode(ino), Mode::Exclusive)], async |op| {
            let mut inode = op.live_inode(ino, Mode::Exclusive).await?;
            if inode.kind == Kind::Free {
                return Err(FsError::NotFound.into());
            }
            if let Some(size) = change.size {
                if inode.kind == Kind::Directory {
                    return Err(FsError::IsDirectory.into());
                }
                op.truncate(ino, &mut inode, size).await?;
                inode.modified = op.now;
            }
            if let Some(permissions) = change.permissions {
                inode.permissions = permissions & 0o7777;
            }
            inode.uid = change.uid.unwrap_or(inode.uid);
            inode.gid = change.gid.unwrap_or(inode.gid);
            inode.accessed = change.accessed.unwrap_or(inode.accessed);
            inode.modified = change.modified.unwrap_or(inode.modified);
            inode.changed = op.now;
            op.put_inode(ino, &inode)?;
            op.attr(ino).await
        })
        .await
    }

    pub async fn read(&self, ino: u64, offset: u64, length: usize) -> Result<Vec<u8>, FsError> {
        self.run(&[(self.tables.inode(ino), Mode::Shared)], async |op| {
            let inode = op.live_inode(ino, Mode::Shared).await?;
            let Content::Blocks(pointers) = &inode.content else {
                return Err(FsError::Invalid("not a regular file").into());
            };
            if inode.kind == Kind::Directory {
                return Err(FsError::IsDirectory.into());
            }
            let end = inode.size.min(offset.saturating_add(length as u64));
            let mut out = Vec::with_capacity(end.saturating_sub(offset) as usize);
            let mut at = offset;
            while at < end {
                let FileBlock { block, within, bytes, .. } = block_at(&op.fs.layout, pointers, at)?;
                let take = ((bytes - within) as u64).min(end - at) as usize;
                if block == NO_BLOCK {
                    out.resize(out.len() + take, 0);
                } else {
                    // A block allocated but never written back (its
                    // writer crashed before fsync) reads as zeros.
                    let cached = op.block(block, ino, Mode::Shared).await?;
                    let stored = cached.data.get(within..).unwrap_or_default();
                    let available = stored.len().min(take);
                    out.extend_from_slice(&stored[..available]);
                    out.resize(out.len() + take - available, 0);
                }
                at += take as u64;
            }
            Ok(out)
        })
        .await
    }

    /// Writes `data` at `offset`; returns the bytes written.
    pub async fn write(&self, ino: u64, offset: u64, data: &[u8]) -> Result<usize, FsError> {
        Ok(self.write_versioned(ino, offset, data).await?.bytes)
    }

    /// [`Self::write`], also telling the inode's version before and after
    /// (the FUSE mount keeps a file's pages across opens while only its own
    /// writes changed it).
    pub async fn write_versioned(&self, ino: u64, offset: u64, data: &[u8]) -> Result<Written, FsError> {
        let end = offset.checked_add(data.len() as u64).ok_or(FsError::TooLarge)?;
        if data.is_empty() {
            let version = self.getattr(ino).await?.version;
            return Ok(Written { bytes: 0, version_before: version, version_after: version });
        }
        if place(end - 1).is_none_or(|place| matches!(place, Place::Indirect { .. })) {
            return Err(FsError::TooLarge);
        }
        self.run(&[(self.tables.inode(ino), Mode::Exclusive)], async |op| {
            let mut inode = op.live_inode(ino, Mode::Exclusive).await?;
            if inode.kind == Kind::Directory {
                return Err(FsError::IsDirectory.into());
            }
            let mut at = offset;
            while at < end {
                let Content::Blocks(pointers) = &inode.content else {
                    return Err(FsError::Invalid("not a regular file").into());
                };
                let FileBlock { mut block, within, resource, bytes } = block_at(&op.fs.layout, pointers, at)?;
                if block == NO_BLOCK {
                    block = op.allocate_data(resource, ino).await?;
                    set_block_at(&mut inode, at, block);
                }
                let take = ((bytes - within) as u64).min(end - at) as usize;
                let from = (at - offset) as usize;
                op.patch_data(block, ino, within, &data[from..from + take]).await?;
                at += take as u64;
            }
            inode.size = inode.size.max(end);
            inode.modified = op.now;
            inode.changed = op.now;
            let version_before = inode.version;
            op.put_inode(ino, &inode)?;
            Ok(Written { bytes: data.len(), version_before, version_after: version_before + 1 })
        })
        .await
    }

    /// Free space, read from the bitmaps without locks (a snapshot).
    pub async fn statfs(&self) -> Result<FsSpace, FsError> {
        let parameters = self.layout.parameters;
        let mut free = [0u64; 3];
        for (slot, resource) in [Resource::Inode, Resource::SmallBlock, Resource::LargeBlock].into_iter().enumerate() {
            for portion in 0..self.layout.portions(resource) {
                let stored = self.device_read(self.layout.bitmap_block(resource, portion)).await?;
                free[slot] += decode_portion(&self.layout, resource, portion, &stored.data)?.free_count();
            }
        }
        Ok(FsSpace {
            inodes: parameters.inodes,
            inodes_free: free[0],
            small_blocks: parameters.small_blocks,
            small_free: free[1],
            large_blocks: parameters.large_blocks,
            large_free: free[2],
        })
    }
}

/// Bitmap portion `portion` of `resource` from its block's image.
pub(crate) fn decode_portion(
    layout: &Layout,
    resource: Resource,
    portion: u64,
    image: &[u8],
) -> Result<BitmapPortion, FsError> {
    BitmapPortion::decode(image, layout.portion_bits(resource, portion))
        .ok_or_else(|| FsError::Corrupt(format!("bitmap portion {portion} of {resource:?} does not decode")))
}

/// The blocks of a log region written under the leases `epoch_wanted`
/// selects (a block of another lease counts as never written).
fn select_epochs(region: &[Stored], epoch_wanted: impl Fn(u64) -> bool) -> Vec<Option<Vec<u8>>> {
    region
        .iter()
        .map(|stored| (!stored.data.is_empty() && epoch_wanted(stored.lease_epoch)).then(|| stored.data.clone()))
        .collect()
}

fn check_name(name: &[u8]) -> Result<(), FsError> {
    if name.len() > NAME_BYTES_MAX {
        return Err(FsError::NameTooLong);
    }
    if name.is_empty() || name.contains(&b'/') || name.contains(&0) || name == b"." || name == b".." {
        return Err(FsError::Invalid("a name is 1..=255 bytes without '/' or NUL, and not . or .."));
    }
    Ok(())
}

/// The small blocks a directory's entries live in.
fn directory_blocks(inode: &Inode) -> Vec<u64> {
    match &inode.content {
        Content::Blocks(pointers) => pointers.small.iter().copied().filter(|block| *block != NO_BLOCK).collect(),
        Content::Symlink(_) => Vec::new(),
    }
}

/// Where a file byte lives: its block (or `NO_BLOCK` in a hole), the
/// offset in it, and the block's kind and size.
struct FileBlock {
    block: u64,
    within: usize,
    resource: Resource,
    bytes: usize,
}

/// The block holding file byte `offset`. A pointer to anything but a data
/// block of the right kind is damage.
fn block_at(layout: &Layout, pointers: &crate::inode::BlockPointers, offset: u64) -> Result<FileBlock, FsError> {
    let (block, within, resource, bytes) = match place(offset) {
        Some(Place::Small { index, offset }) => {
            (pointers.small[index], offset, Resource::SmallBlock, SMALL_BLOCK_BYTES)
        }
        Some(Place::Large { index, offset }) => {
            (pointers.large[index], offset, Resource::LargeBlock, LARGE_BLOCK_BYTES)
        }
        // The indirect block is not used yet: files end before it.
        Some(Place::Indirect { .. }) | None => return Err(FsError::TooLarge),
    };
    if block != NO_BLOCK && layout.data_number(block).is_none_or(|(found, _)| found != resource) {
        return Err(FsError::Corrupt(format!("a file points at block {block}, not a {resource:?}")));
    }
    Ok(FileBlock { block, within, resource, bytes })
}

fn set_block_at(inode: &mut Inode, offset: u64, block: u64) {
    let Content::Blocks(pointers) = &mut inode.content else { unreachable!("files have blocks") };
    match place(offset) {
        Some(Place::Small { index, .. }) => pointers.small[index] = block,
        Some(Place::Large { index, .. }) => pointers.large[index] = block,
        _ => unreachable!("checked by block_at"),
    }
}

/// One run of an operation: the locks it holds, what it changed (to undo),
/// and the log records of its changes.
struct Op<'a> {
    fs: &'a FileSystem,
    state: &'a mut State,
    held: BTreeMap<LockName, Mode>,
    needed: Vec<(LockName, Mode)>,
    /// Each changed block as it was before the run (`None`: not cached).
    undo: HashMap<u64, Option<Cached>>,
    records: Vec<Record>,
    now: i64,
}

impl<'a> Op<'a> {
    fn new(fs: &'a FileSystem, state: &'a mut State, held: BTreeMap<LockName, Mode>) -> Op<'a> {
        Op { fs, state, held, needed: Vec::new(), undo: HashMap::new(), records: Vec::new(), now: now_nanos() }
    }

    /// Fails the run unless `lock` is held in `mode`; the next run takes it.
    fn require(&mut self, lock: LockName, mode: Mode) -> Run<()> {
        if self.held.get(&lock).is_some_and(|held| held.covers(mode)) {
            return Ok(());
        }
        self.needed.push((lock, mode));
        Err(Fail::NeedLock)
    }

    /// The cached block (read on a miss), which `lock` must cover.
    async fn cached(&mut self, block: u64, lock: LockName, mode: Mode) -> Run<&mut Cached> {
        self.require(lock, mode)?;
        if !self.state.blocks.contains_key(&block) {
            let stored = self.fs.device_read(block).await?;
            self.state.blocks.insert(block, Cached { version: stored.version, data: stored.data, dirty: false, lock });
        }
        let cached = self.state.blocks.get_mut(&block).expect("just cached");
        // A free block or inode read ahead under its portion's lock is now
        // covered by the lock it was asked for, which is held.
        cached.lock = lock;
        Ok(cached)
    }

    async fn block(&mut self, block: u64, owner: u64, mode: Mode) -> Run<&mut Cached> {
        let lock = self.fs.tables.inode(owner);
        self.cached(block, lock, mode).await
    }

    async fn inode(&mut self, ino: u64, mode: Mode) -> Run<Inode> {
        if ino == 0 || ino >= self.fs.layout.parameters.inodes {
            return Err(FsError::NotFound.into());
        }
        let block = self.fs.layout.inode_block(ino);
        let cached = self.block(block, ino, mode).await?;
        Ok(Inode::decode(&cached.data)?)
    }

    /// An inode in use: a free one (deleted, perhaps by another
    /// workstation) is not found.
    async fn live_inode(&mut self, ino: u64, mode: Mode) -> Run<Inode> {
        let inode = self.inode(ino, mode).await?;
        if inode.kind == Kind::Free {
            return Err(FsError::NotFound.into());
        }
        Ok(inode)
    }

    async fn attr(&mut self, ino: u64) -> Run<Attr> {
        let inode = self.live_inode(ino, Mode::Shared).await?;
        let allocated = match &inode.content {
            Content::Blocks(pointers) => {
                let small = pointers.small.iter().filter(|block| **block != NO_BLOCK).count() * SMALL_BLOCK_BYTES;
                let large = pointers.large.iter().filter(|block| **block != NO_BLOCK).count() * LARGE_BLOCK_BYTES;
                (small + large) as u64
            }
            Content::Symlink(_) => 0,
        };
        Ok(Attr {
            ino,
            kind: inode.kind,
            permissions: inode.permissions,
            links: inode.links,
            uid: inode.uid,
            gid: inode.gid,
            size: inode.size,
            allocated,
            accessed: inode.accessed,
            modified: inode.modified,
            changed: inode.changed,
            generation: inode.generation,
            version: inode.version,
        })
    }

    async fn directory(&mut self, block: u64, owner: u64, mode: Mode) -> Run<DirectoryBlock> {
        let cached = self.block(block, owner, mode).await?;
        Ok(DirectoryBlock::decode(&cached.data)?)
    }

    /// The entry `name` of directory `parent`.
    async fn find(&mut self, parent: u64, name: &[u8]) -> Run<Option<Entry>> {
        let inode = self.live_inode(parent, Mode::Shared).await?;
        if inode.kind != Kind::Directory {
            return Err(FsError::NotDirectory.into());
        }
        for block in directory_blocks(&inode) {
            let cached = self.block(block, parent, Mode::Shared).await?;
            if let Some(entry) = DirectoryBlock::find(&cached.data, name)? {
                return Ok(Some(entry));
            }
        }
        Ok(None)
    }

    /// Changes a cached block to `image` (version + 1), keeping the old one
    /// to undo; a metadata block's change is logged.
    fn change(&mut self, block: u64, image: Vec<u8>, logged: Option<Framing>) {
        let cached = self.state.blocks.get_mut(&block).expect("a block is read before it is changed");
        self.undo.entry(block).or_insert_with(|| Some(cached.clone()));
        let version = cached.version + 1;
        if let Some(framing) = logged {
            self.records.extend(metadata::diff(framing, &cached.data, &image, block, version));
        }
        cached.version = version;
        cached.data = image;
        cached.dirty = true;
    }

    /// The version a framed block gets on its next change.
    fn next_version(&self, block: u64) -> u64 {
        self.state.blocks[&block].version + 1
    }

    fn put_inode(&mut self, ino: u64, inode: &Inode) -> Run<()> {
        let block = self.fs.layout.inode_block(ino);
        let lock = self.fs.tables.inode(ino);
        self.require(lock, Mode::Exclusive)?;
        let mut inode = inode.clone();
        inode.version = self.next_version(block);
        let framing = framing_of(&self.fs.layout, block)?;
        self.change(block, inode.encode()?, Some(framing));
        Ok(())
    }

    fn put_directory(&mut self, block: u64, owner: u64, directory: &mut DirectoryBlock) -> Run<()> {
        self.require(self.fs.tables.inode(owner), Mode::Exclusive)?;
        directory.version = self.next_version(block);
        let framing = framing_of(&self.fs.layout, block)?;
        self.change(block, directory.encode(), Some(framing));
        Ok(())
    }

    async fn patch_data(&mut self, block: u64, owner: u64, at: usize, bytes: &[u8]) -> Run<()> {
        let cached = self.block(block, owner, Mode::Exclusive).await?;
        let mut image = cached.data.clone();
        let block_bytes = self.fs.layout.block_bytes(block);
        image.resize(block_bytes, 0);
        image[at..at + bytes.len()].copy_from_slice(bytes);
        self.change(block, image, None);
        Ok(())
    }

    /// Adds `name` to directory `parent` (whose inode is `directory`; a new
    /// block is allocated and recorded in it when the others are full).
    async fn insert_entry(&mut self, parent: u64, directory: &mut Inode, name: &[u8], ino: u64, kind: Kind) -> Run<()> {
        for block in directory_blocks(directory) {
            let mut entries = self.directory(block, parent, Mode::Exclusive).await?;
            match entries.insert(name, ino, kind) {
                Ok(()) => return self.put_directory(block, parent, &mut entries),
                Err(DirectoryError::Full) => continue,
                Err(other) => return Err(other.into()),
            }
        }
        let Content::Blocks(pointers) = &directory.content else { return Err(FsError::NotDirectory.into()) };
        let Some(slot) = pointers.small.iter().position(|block| *block == NO_BLOCK) else {
            return Err(FsError::NoSpace("a directory holds at most 16 blocks of names").into());
        };
        let block = self.allocate_data(Resource::SmallBlock, parent).await?;
        let Content::Blocks(pointers) = &mut directory.content else { unreachable!("checked above") };
        pointers.small[slot] = block;
        // A directory's blocks are never freed one by one: they fill from slot 0.
        directory.size = ((slot + 1) * SMALL_BLOCK_BYTES) as u64;
        let mut entries = DirectoryBlock::default();
        entries.insert(name, ino, kind)?;
        self.put_directory(block, parent, &mut entries)
    }

    async fn remove_entry(&mut self, parent: u64, directory: &Inode, name: &[u8]) -> Run<()> {
        for block in directory_blocks(directory) {
            let mut entries = self.directory(block, parent, Mode::Exclusive).await?;
            if entries.remove(name).is_some() {
                return self.put_directory(block, parent, &mut entries);
            }
        }
        Err(FsError::NotFound.into())
    }

    /// Drops one link to the entry's inode; frees it (and its blocks) at
    /// zero. A directory must be empty, and goes at once.
    async fn unlink_target(&mut self, entry: &Entry) -> Run<()> {
        let mut inode = self.live_inode(entry.inode, Mode::Exclusive).await?;
        if inode.kind == Kind::Directory {
            for block in directory_blocks(&inode) {
                if !self.directory(block, entry.inode, Mode::Shared).await?.is_empty() {
                    return Err(FsError::NotEmpty.into());
                }
            }
            inode.links = 0;
        } else {
            inode.links = inode.links.saturating_sub(1);
        }
        inode.changed = self.now;
        if inode.links == 0 {
            if let Content::Blocks(pointers) = &inode.content {
                let blocks = pointers.small.iter().chain(&pointers.large).filter(|block| **block != NO_BLOCK);
                for block in blocks.copied().collect::<Vec<u64>>() {
                    self.free_block(block).await?;
                }
            }
            self.free(Resource::Inode, entry.inode).await?;
            inode = Inode { version: inode.version, generation: inode.generation, ..Inode::free() };
        }
        self.put_inode(entry.inode, &inode)
    }

    /// Shortens or lengthens a file; frees whole blocks past the new end
    /// and zeroes the tail of the last one.
    async fn truncate(&mut self, ino: u64, inode: &mut Inode, size: u64) -> Run<()> {
        if size > 0 && place(size - 1).is_none_or(|place| matches!(place, Place::Indirect { .. })) {
            return Err(FsError::TooLarge.into());
        }
        // Only regular files: setattr refuses directories before this.
        let Content::Blocks(pointers) = &inode.content else {
            return Err(FsError::Invalid("a symbolic link has no bytes to truncate").into());
        };
        let mut pointers = pointers.clone();
        if size < inode.size {
            // Zero the tail of the block holding the new end.
            if size > 0 {
                let FileBlock { block, within, bytes, .. } = block_at(&self.fs.layout, &pointers, size)?;
                if block != NO_BLOCK && within > 0 {
                    self.patch_data(block, ino, within, &vec![0; bytes - within]).await?;
                }
            }
            let first_free_small = (size as usize).div_ceil(SMALL_BLOCK_BYTES);
            for index in first_free_small.min(SMALL_POINTERS)..SMALL_POINTERS {
                let block = std::mem::replace(&mut pointers.small[index], NO_BLOCK);
                if block != NO_BLOCK {
                    self.free_block(block).await?;
                }
            }
            let small_bytes = (SMALL_POINTERS * SMALL_BLOCK_BYTES) as u64;
            let first_free_large = (size.saturating_sub(small_bytes) as usize).div_ceil(LARGE_BLOCK_BYTES);
            for index in first_free_large..pointers.large.len() {
                let block = std::mem::replace(&mut pointers.large[index], NO_BLOCK);
                if block != NO_BLOCK {
                    self.free_block(block).await?;
                }
            }
        }
        inode.content = Content::Blocks(pointers);
        inode.size = size;
        Ok(())
    }

    /// Frees a data block. It stays cached under its portion's lock, with
    /// its version, for the next allocation; a dirty one stays dirty (it may
    /// be a directory block whose log records are newer than the volume's
    /// copy: written back, before the portion goes to another workstation,
    /// the volume is never older than a log record naming the block). A
    /// clean one keeps no bytes.
    async fn free_block(&mut self, block: u64) -> Run<()> {
        let (resource, number) = self
            .fs
            .layout
            .data_number(block)
            .ok_or_else(|| FsError::Corrupt(format!("a file points at block {block}, not a data block")))?;
        self.free(resource, number).await?;
        if let Some(cached) = self.state.blocks.get_mut(&block) {
            self.undo.entry(block).or_insert_with(|| Some(cached.clone()));
            let (portion, _) = self.fs.layout.bit_of(resource, number);
            cached.lock = self.fs.tables.portion(resource, portion);
            if !cached.dirty {
                cached.data = Vec::new();
            }
        }
        Ok(())
    }

    async fn bitmap(&mut self, resource: Resource, portion: u64) -> Run<(u64, BitmapPortion)> {
        let lock = self.fs.tables.portion(resource, portion);
        let block = self.fs.layout.bitmap_block(resource, portion);
        let fs = self.fs;
        let cached = self.cached(block, lock, Mode::Exclusive).await?;
        Ok((block, decode_portion(&fs.layout, resource, portion, &cached.data)?))
    }

    fn put_bitmap(&mut self, block: u64, bits: &BitmapPortion) {
        self.change(block, bits.encode(), Some(Framing::Raw { bytes: SMALL_BLOCK_BYTES }));
    }

    /// Takes the lowest free number of `resource`, from this workstation's
    /// portion first, then the others in turn.
    async fn allocate(&mut self, resource: Resource) -> Run<u64> {
        let portions = self.fs.layout.portions(resource);
        let first = u64::from(self.fs.workstation) % portions;
        for step in 0..portions {
            let portion = (first + step) % portions;
            let (block, mut bits) = self.bitmap(resource, portion).await?;
            if let Some(bit) = bits.allocate() {
                self.put_bitmap(block, &bits);
                return Ok(portion * BITS_PER_PORTION + bit);
            }
        }
        Err(FsError::NoSpace(match resource {
            Resource::Inode => "no free inodes",
            Resource::SmallBlock => "no free small blocks",
            Resource::LargeBlock => "no free large blocks",
        })
        .into())
    }

    /// Allocates a data block for `owner`. Its version continues from the
    /// newest known (a block may have been a directory block, whose old
    /// versions a log may still hold).
    async fn allocate_data(&mut self, resource: Resource, owner: u64) -> Run<u64> {
        let number = self.allocate(resource).await?;
        let block = self.fs.layout.data_block(resource, number);
        self.prefetch_free(resource, number).await?;
        let version = self.state.blocks[&block].version + 1;
        let (lock, bytes) = (self.fs.tables.inode(owner), self.fs.layout.block_bytes(block));
        let previous = self.state.blocks.insert(block, Cached { version, data: vec![0; bytes], dirty: true, lock });
        self.undo.entry(block).or_insert(previous);
        Ok(block)
    }

    /// Allocates an inode, holding its lock, with its block cached.
    async fn allocate_inode(&mut self) -> Run<u64> {
        let ino = self.allocate(Resource::Inode).await?;
        let lock = self.fs.tables.inode(ino);
        self.require(lock, Mode::Exclusive)?;
        self.prefetch_free(Resource::Inode, ino).await?;
        Ok(ino)
    }

    /// Caches the block of free resource `number` (a no-op if cached),
    /// reading it together with the next free ones of its portion in one
    /// round of parallel reads. They are cached under the portion's lock:
    /// while it is held, no one else may allocate (or write) them, and the
    /// last holder wrote back everything before giving it up.
    async fn prefetch_free(&mut self, resource: Resource, number: u64) -> Run<()> {
        let block_of = |number| match resource {
            Resource::Inode => self.fs.layout.inode_block(number),
            _ => self.fs.layout.data_block(resource, number),
        };
        if self.state.blocks.contains_key(&block_of(number)) {
            return Ok(());
        }
        let (portion, first_bit) = self.fs.layout.bit_of(resource, number);
        let (_, bits) = self.bitmap(resource, portion).await?;
        let valid = self.fs.layout.portion_bits(resource, portion);
        let mut wanted = vec![block_of(number)];
        for bit in first_bit + 1..valid {
            if wanted.len() >= PREFETCH_BLOCKS {
                break;
            }
            let block = block_of(portion * BITS_PER_PORTION + bit);
            if !bits.is_allocated(bit) && !self.state.blocks.contains_key(&block) {
                wanted.push(block);
            }
        }
        if resource == Resource::Inode {
            self.fs.take_locks_ahead(wanted.iter().map(|block| self.fs.layout.inode_number(*block)).collect());
        }
        let reads = futures::future::join_all(wanted.iter().map(|block| self.fs.device_read(*block))).await;
        let lock = self.fs.tables.portion(resource, portion);
        for (block, read) in wanted.into_iter().zip(reads) {
            let stored = read?;
            self.state.blocks.entry(block).or_insert(Cached {
                version: stored.version,
                data: stored.data,
                dirty: false,
                lock,
            });
        }
        Ok(())
    }

    async fn free(&mut self, resource: Resource, number: u64) -> Run<()> {
        let (portion, bit) = self.fs.layout.bit_of(resource, number);
        let (block, mut bits) = self.bitmap(resource, portion).await?;
        if !bits.free(bit) {
            return Err(FsError::Corrupt(format!("{resource:?} {number} freed but not allocated")).into());
        }
        self.put_bitmap(block, &bits);
        Ok(())
    }

    /// Logs the run's records as one transaction.
    async fn commit(&mut self) -> Run<()> {
        if self.records.is_empty() {
            return Ok(());
        }
        let records = std::mem::take(&mut self.records);
        loop {
            let log = self.state.log.as_mut().expect("started before any operation");
            match log.append(records.clone()) {
                Ok(closed) => {
                    self.state.closed.extend(closed);
                    self.state.open_unflushed = true;
                    return Ok(());
                }
                Err(WalError::Full) => {
                    // Reclaiming writes blocks back; this run's changes
                    // are not logged yet, so the blocks go back to their
                    // images before the run meanwhile.
                    let changed: Vec<(u64, Option<Cached>)> =
                        self.undo.keys().map(|block| (*block, self.state.blocks.get(block).cloned())).collect();
                    for (block, before) in &self.undo {
                        match before {
                            Some(cached) => self.state.blocks.insert(*block, cached.clone()),
                            None => self.state.blocks.remove(block),
                        };
                    }
                    let reclaimed = self.fs.reclaim_log(self.state).await;
                    for (block, after) in changed {
                        if let Some(before) = self.undo.get_mut(&block)
                            && let (Some(before), Some(now)) = (before.as_mut(), self.state.blocks.get(&block))
                        {
                            before.dirty = now.dirty; // written back, perhaps
                        }
                        match after {
                            Some(cached) => self.state.blocks.insert(block, cached),
                            None => self.state.blocks.remove(&block),
                        };
                    }
                    reclaimed?;
                }
                Err(WalError::TransactionTooLarge(bytes)) => {
                    warn!(bytes, "an operation's metadata changes do not fit in one log block");
                    return Err(FsError::NoSpace("an operation too large for one log block").into());
                }
            }
        }
    }

    /// Restores every block the run changed; returns the locks it lacked.
    fn rollback(&mut self) -> Vec<(LockName, Mode)> {
        for (block, before) in self.undo.drain() {
            match before {
                Some(cached) => self.state.blocks.insert(block, cached),
                None => self.state.blocks.remove(&block),
            };
        }
        self.records.clear();
        std::mem::take(&mut self.needed)
    }
}
