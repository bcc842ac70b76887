//! The FUSE mount (`fuser`): the kernel's requests, turned into calls on a
//! [`FileSystem`] and its answers (errors as errno values, never a panic).
//!
//! Coherence with other workstations. The kernel keeps a name (directory,
//! name → inode) only while this workstation holds the directory's lock,
//! and an inode's attributes only while it holds the inode's lock; before
//! such a lock is released, [`KernelChannel`] makes the kernel forget them
//! (see there). A file's pages are kept across opens (`FOPEN_KEEP_CACHE`)
//! only if its inode's version is the one this mount last saw, after its
//! own writes; any change from elsewhere drops them at the next open. So a
//! file closed on one workstation reads back current when opened on
//! another (close-to-open, as NFS gives), and a name or size another
//! workstation changed is seen at once.

use crate::fs::{Attr, FileSystem, FsError, KernelCache, ROOT_INODE, SetAttr};
use crate::inode::Kind;
use common::transport::BoxFuture;
use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, MountOption, RenameFlags,
    ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite,
    Request, Session, TimeOrNow,
};
use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fs::File;
use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::runtime::Handle;
use tracing::{debug, warn};

/// How long the kernel may keep a name or attributes it was given under a
/// lock. Releasing the lock ends it sooner; this only bounds the damage of
/// a missed release.
const CACHE_TTL: Duration = Duration::from_secs(60);
/// FUSE request threads (a request waiting for a lock does not hold up the others).
const FUSE_THREADS: usize = 4;
/// `fuse_notify_code` values (linux/fuse.h).
const NOTIFY_INVAL_INODE: i32 = 2;
const NOTIFY_INC_EPOCH: i32 = 8;
/// How long a release waits for the kernel to take in an answer already
/// sent about the inode (see [`KernelChannel::release_inode`]).
const ANSWER_IN_FLIGHT_WAIT: Duration = Duration::from_millis(500);

/// The kernel's cache of names and attributes, kept coherent with the locks.
///
/// Two notifications, written to the mount's `/dev/fuse`, make the kernel
/// forget; neither takes an inode lock, so neither can wait on a request
/// that itself waits for the lock being released (which
/// `FUSE_NOTIFY_INVAL_ENTRY`, taking the directory's `i_rwsem`, could):
/// - attributes: `FUSE_NOTIFY_INVAL_INODE` with offset −1 (attributes only);
/// - names: `FUSE_NOTIFY_INC_EPOCH` (Linux 6.16), after which every name
///   the kernel got under an older epoch is looked up again at its next
///   use. On an older kernel names are not cached at all.
///
/// Answers that cross a release: the kernel notes the epoch and an
/// attribute version before it sends a lookup or getattr, and drops what
/// an answer brings if a notification came in between. Answers the kernel
/// does not check that way (create, mkdir, symlink, link, setattr, and a
/// lookup that may introduce the inode: a new inode has no attribute
/// version to check) carry no cached attributes. One gap is left: two
/// lookups of an inode the kernel does not know yet, the second cached;
/// a release between them finds nothing to invalidate (`ENOENT`). So
/// entry answers are counted per inode, less the kernel's forgets, and a
/// release that meets `ENOENT` for a counted inode tries again until the
/// kernel knows it (at most 500 ms). An answer computed across a release
/// is sent with nothing cached. A rename counts the moved name as one of
/// its new directory's.
#[derive(Debug, Default)]
pub struct KernelChannel {
    /// A duplicate of the session's `/dev/fuse` descriptor.
    device: OnceLock<File>,
    /// The kernel takes `FUSE_NOTIFY_INC_EPOCH` (names may be cached).
    epochs: OnceLock<bool>,
    state: parking_lot::Mutex<KernelState>,
}

#[derive(Debug, Default)]
struct KernelState {
    /// Releases so far: an answer computed across one caches nothing.
    releases: u64,
    /// Per inode, entry answers sent less the kernel's forgets: its lookup
    /// count plus answers on their way.
    lookups: HashMap<u64, u64>,
    /// Directories whose names the kernel may hold (since the last epoch).
    named: HashSet<u64>,
    /// New epochs written (each makes the kernel forget every name).
    epochs: u64,
}

/// What one answer may let the kernel cache.
#[derive(Clone, Copy, Debug)]
struct Ttls {
    entry: Duration,
    attr: Duration,
}

impl Ttls {
    const NONE: Ttls = Ttls { entry: Duration::ZERO, attr: Duration::ZERO };
}

impl KernelChannel {
    /// Takes the session's descriptor and finds out whether the kernel
    /// takes epochs (by bumping the epoch once: nothing is cached yet).
    fn connect(&self, device: File) {
        let channel = self.device.get_or_init(|| device);
        let epochs = match notify(channel, NOTIFY_INC_EPOCH, &[]) {
            Ok(()) => true,
            Err(error) => {
                warn!(%error, "the kernel takes no FUSE_NOTIFY_INC_EPOCH (Linux < 6.16): names are not cached");
                false
            }
        };
        let _ = self.epochs.set(epochs);
    }

    /// Where a request starts: answers are cacheable only if no release
    /// comes between this and [`Self::answer`].
    fn window(&self) -> u64 {
        self.state.lock().releases
    }

    /// What an answer about `ino` may let the kernel cache: its name in
    /// `parent` (if an entry answer) and, if `attrs_checked` (the kernel
    /// checks the answer against notifications sent meanwhile), its
    /// attributes. Counts entry answers.
    fn answer(&self, window: u64, ino: u64, parent: Option<u64>, attrs_checked: bool) -> Ttls {
        let mut state = self.state.lock();
        // An answer that may introduce the inode to the kernel: its
        // attributes are installed unchecked (a new inode has no attribute
        // version yet), so they are not cached.
        let mut attrs_checked = attrs_checked;
        if parent.is_some() {
            let lookups = state.lookups.entry(ino).or_default();
            attrs_checked &= *lookups > 0;
            *lookups += 1;
        }
        if state.releases != window || self.device.get().is_none() {
            return Ttls::NONE;
        }
        let mut ttls = Ttls::NONE;
        if let Some(parent) = parent
            && self.epochs.get() == Some(&true)
        {
            state.named.insert(parent);
            ttls.entry = CACHE_TTL;
        }
        if attrs_checked {
            ttls.attr = CACHE_TTL;
        }
        ttls
    }

    fn forget(&self, ino: u64, count: u64) {
        let mut state = self.state.lock();
        if let Some(lookups) = state.lookups.get_mut(&ino) {
            *lookups = lookups.saturating_sub(count);
            if *lookups == 0 {
                state.lookups.remove(&ino);
            }
        }
    }

    /// Starts a release: later answers cache nothing until their next
    /// window; if names in `directory` (any, for `None`) may be cached, a
    /// new epoch makes the kernel forget every name. The epoch is written
    /// under the state lock (the write does not block), so a release that
    /// finds no names to forget never overtakes the one that took them.
    fn begin_release(&self, device: &File, directory: Option<u64>) {
        let mut state = self.state.lock();
        state.releases += 1;
        let named = match directory {
            Some(directory) => state.named.contains(&directory),
            None => !state.named.is_empty(),
        };
        if named {
            state.named.clear();
            state.epochs += 1;
            if let Err(error) = notify(device, NOTIFY_INC_EPOCH, &[]) {
                warn!(%error, "FUSE_NOTIFY_INC_EPOCH failed");
            }
        }
    }

    /// A rename moves the kernel's name into `directory` (with its TTL):
    /// names there may be cached from now on.
    fn names_moved_into(&self, directory: u64) {
        if self.epochs.get() == Some(&true) {
            self.state.lock().named.insert(directory);
        }
    }

    /// Tells the kernel to drop `ino`'s attributes; `Ok(false)` if it does
    /// not know the inode.
    fn invalidate_attributes(device: &File, ino: u64) -> std::io::Result<bool> {
        let mut body = Vec::with_capacity(24);
        body.extend_from_slice(&ino.to_ne_bytes());
        body.extend_from_slice(&(-1i64).to_ne_bytes()); // offset −1: attributes only
        body.extend_from_slice(&0i64.to_ne_bytes());
        match notify(device, NOTIFY_INVAL_INODE, &body) {
            Ok(()) => Ok(true),
            Err(error) if error.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(error) => Err(error),
        }
    }

    fn answers_pending(&self, ino: u64) -> bool {
        self.state.lock().lookups.contains_key(&ino)
    }
}

/// Writes one notification (`fuse_out_header` with `unique` 0, then `body`).
fn notify(device: &File, code: i32, body: &[u8]) -> std::io::Result<()> {
    let length = (16 + body.len()) as u32;
    let mut message = Vec::with_capacity(length as usize);
    message.extend_from_slice(&length.to_ne_bytes());
    message.extend_from_slice(&code.to_ne_bytes());
    message.extend_from_slice(&0u64.to_ne_bytes());
    message.extend_from_slice(body);
    let written = (&*device).write(&message)?;
    if written != message.len() {
        return Err(std::io::Error::other("a notification was written in part"));
    }
    Ok(())
}

impl KernelCache for KernelChannel {
    fn release_inode(&self, ino: u64) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let Some(device) = self.device.get() else { return };
            self.begin_release(device, Some(ino));
            let deadline = tokio::time::Instant::now() + ANSWER_IN_FLIGHT_WAIT;
            let mut waits = 0u32;
            loop {
                match Self::invalidate_attributes(device, ino) {
                    Ok(true) => break,
                    Ok(false) if self.answers_pending(ino) && tokio::time::Instant::now() < deadline => {
                        // An answer introducing the inode may be on its
                        // way: wait for the kernel to take it in (or to
                        // forget it).
                        waits += 1;
                        tokio::time::sleep(Duration::from_micros(200)).await;
                    }
                    Ok(false) => break,
                    Err(error) => {
                        warn!(ino, %error, "FUSE_NOTIFY_INVAL_INODE failed");
                        break;
                    }
                }
            }
            if waits > 0 {
                debug!(ino, waits, "waited for an answer in flight before a release");
            }
        })
    }

    fn release_all(&self) {
        let Some(device) = self.device.get() else { return };
        self.begin_release(device, None);
        // The root is never looked up, but its attributes are cached too.
        let known: Vec<u64> = std::iter::once(ROOT_INODE).chain(self.state.lock().lookups.keys().copied()).collect();
        for ino in known {
            if let Err(error) = Self::invalidate_attributes(device, ino) {
                warn!(ino, %error, "FUSE_NOTIFY_INVAL_INODE failed");
            }
        }
    }
}

/// A [`FileSystem`] as FUSE sees it.
#[derive(Debug)]
pub struct FuseAdapter {
    fs: Arc<FileSystem>,
    runtime: Handle,
    kernel: Arc<KernelChannel>,
    /// Per inode, the version the kernel's pages of it reflect.
    page_versions: parking_lot::Mutex<HashMap<u64, u64>>,
}

impl FuseAdapter {
    fn new(fs: Arc<FileSystem>, runtime: Handle, kernel: Arc<KernelChannel>) -> FuseAdapter {
        FuseAdapter { fs, runtime, kernel, page_versions: parking_lot::Mutex::new(HashMap::new()) }
    }

    fn block_on<T>(&self, future: impl Future<Output = T>) -> T {
        self.runtime.block_on(future)
    }

    /// Answers with an entry of `parent`; its attributes are cached only if
    /// `attrs_checked` (see [`KernelChannel`]).
    fn reply_entry(
        &self,
        reply: ReplyEntry,
        window: u64,
        parent: INodeNo,
        attrs_checked: bool,
        result: Result<Attr, FsError>,
    ) {
        match result {
            Ok(attr) => {
                let ttls = self.kernel.answer(window, attr.ino, Some(parent.0), attrs_checked);
                reply.entry_with_ttls(&ttls.attr, &ttls.entry, &file_attr(&attr), Generation(attr.generation))
            }
            Err(error) => reply.error(errno(&error)),
        }
    }

    /// Makes an entry in `parent` (create-like answers: attributes are not cached).
    fn reply_created_entry(
        &self,
        reply: ReplyEntry,
        parent: INodeNo,
        created: impl Future<Output = Result<Attr, FsError>>,
    ) {
        let window = self.kernel.window();
        let result = self.block_on(created);
        self.reply_entry(reply, window, parent, false, result);
    }
}

/// Mounts `fs` at `mountpoint` in the background; dropping the session
/// unmounts. The kernel's cache of names and attributes is attached to
/// `fs` (see [`KernelChannel`]).
pub fn mount(fs: Arc<FileSystem>, runtime: Handle, mountpoint: &Path) -> std::io::Result<fuser::BackgroundSession> {
    let mut config = Config::default();
    config.mount_options = vec![MountOption::FSName(format!("frangipani-{}", fs.workstation())), MountOption::RW];
    config.n_threads = Some(FUSE_THREADS);
    let kernel = Arc::new(KernelChannel::default());
    let session = Session::new(FuseAdapter::new(fs.clone(), runtime, kernel.clone()), mountpoint, &config)?;
    kernel.connect(File::from(session.as_fd().try_clone_to_owned()?));
    fs.attach_kernel_cache(kernel).map_err(std::io::Error::other)?;
    session.spawn()
}

fn errno(error: &FsError) -> Errno {
    Errno::from_i32(error.errno())
}

fn time(nanos: i64) -> SystemTime {
    if nanos >= 0 {
        UNIX_EPOCH + Duration::from_nanos(nanos as u64)
    } else {
        UNIX_EPOCH - Duration::from_nanos(nanos.unsigned_abs())
    }
}

fn nanos(time: SystemTime) -> i64 {
    match time.duration_since(UNIX_EPOCH) {
        Ok(after) => after.as_nanos() as i64,
        Err(before) => -(before.duration().as_nanos() as i64),
    }
}

fn file_type(kind: Kind) -> FileType {
    match kind {
        Kind::Directory => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
        Kind::File | Kind::Free => FileType::RegularFile,
    }
}

fn file_attr(attr: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(attr.ino),
        size: attr.size,
        blocks: attr.allocated / 512,
        atime: time(attr.accessed),
        mtime: time(attr.modified),
        ctime: time(attr.changed),
        crtime: time(attr.changed),
        kind: file_type(attr.kind),
        perm: attr.permissions as u16,
        nlink: attr.links,
        uid: attr.uid,
        gid: attr.gid,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

fn time_or_now(value: Option<TimeOrNow>) -> Option<i64> {
    value.map(|value| match value {
        TimeOrNow::SpecificTime(time) => nanos(time),
        TimeOrNow::Now => nanos(SystemTime::now()),
    })
}

fn reply_data(reply: ReplyData, result: Result<Vec<u8>, FsError>) {
    match result {
        Ok(data) => reply.data(&data),
        Err(error) => reply.error(errno(&error)),
    }
}

fn reply_empty(reply: ReplyEmpty, result: Result<(), FsError>) {
    match result {
        Ok(()) => reply.ok(),
        Err(error) => reply.error(errno(&error)),
    }
}

impl fuser::Filesystem for FuseAdapter {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let window = self.kernel.window();
        let result = self.block_on(self.fs.lookup(parent.0, name.as_bytes()));
        self.reply_entry(reply, window, parent, true, result);
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.kernel.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let window = self.kernel.window();
        match self.block_on(self.fs.getattr(ino.0)) {
            Ok(attr) => reply.attr(&self.kernel.answer(window, ino.0, None, true).attr, &file_attr(&attr)),
            Err(error) => reply.error(errno(&error)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let change = SetAttr {
            permissions: mode.map(|mode| mode & 0o7777),
            uid,
            gid,
            size,
            accessed: time_or_now(atime),
            modified: time_or_now(mtime),
        };
        self.page_versions.lock().remove(&ino.0);
        // The kernel takes a setattr answer without checking it against
        // notifications sent meanwhile: nothing of it is cached.
        match self.block_on(self.fs.setattr(ino.0, change)) {
            Ok(attr) => reply.attr(&Duration::ZERO, &file_attr(&attr)),
            Err(error) => reply.error(errno(&error)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        reply_data(reply, self.block_on(self.fs.readlink(ino.0)));
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        if mode & libc::S_IFMT != libc::S_IFREG {
            return reply.error(Errno::from_i32(libc::EPERM)); // only regular files
        }
        let created =
            self.fs.create(parent.0, name.as_bytes(), Kind::File, mode & !umask, (req.uid(), req.gid()), None);
        self.reply_created_entry(reply, parent, created);
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        let owner = (req.uid(), req.gid());
        let created = self.fs.create(parent.0, name.as_bytes(), Kind::Directory, mode & !umask, owner, None);
        self.reply_created_entry(reply, parent, created);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(reply, self.block_on(self.fs.remove(parent.0, name.as_bytes(), false)));
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(reply, self.block_on(self.fs.remove(parent.0, name.as_bytes(), true)));
    }

    fn symlink(&self, req: &Request, parent: INodeNo, link_name: &OsStr, target: &Path, reply: ReplyEntry) {
        let owner = (req.uid(), req.gid());
        let target = target.as_os_str().as_bytes();
        let created = self.fs.create(parent.0, link_name.as_bytes(), Kind::Symlink, 0o777, owner, Some(target));
        self.reply_created_entry(reply, parent, created);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if !flags.is_empty() {
            return reply.error(Errno::from_i32(libc::EINVAL)); // RENAME_NOREPLACE, EXCHANGE: not supported
        }
        self.kernel.names_moved_into(newparent.0);
        let renamed = self.fs.rename(parent.0, name.as_bytes(), newparent.0, newname.as_bytes());
        reply_empty(reply, self.block_on(renamed));
    }

    fn link(&self, _req: &Request, ino: INodeNo, newparent: INodeNo, newname: &OsStr, reply: ReplyEntry) {
        self.reply_created_entry(reply, newparent, self.fs.link(ino.0, newparent.0, newname.as_bytes()));
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: fuser::OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        reply_data(reply, self.block_on(self.fs.read(ino.0, offset, size as usize)));
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: fuser::WriteFlags,
        _flags: fuser::OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.block_on(self.fs.write_versioned(ino.0, offset, data)) {
            Ok(written) => {
                // Our pages stay current only if nothing else changed the file.
                let mut versions = self.page_versions.lock();
                if versions.get(&ino.0) == Some(&written.version_before) {
                    versions.insert(ino.0, written.version_after);
                } else {
                    versions.remove(&ino.0);
                }
                reply.written(written.bytes as u32)
            }
            Err(error) => {
                self.page_versions.lock().remove(&ino.0);
                reply.error(errno(&error))
            }
        }
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: fuser::LockOwner, reply: ReplyEmpty) {
        // close(2): nothing to do. Another workstation that opens the file
        // revokes the lock, which writes the data back first. ENOSYS tells
        // the kernel so, and it sends no more flushes (one request less
        // per close).
        reply.error(Errno::from_i32(libc::ENOSYS));
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        reply.error(Errno::from_i32(libc::ENOTTY)); // no ioctls (isatty asks on every open)
    }

    fn getxattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, _size: u32, reply: fuser::ReplyXattr) {
        reply.error(Errno::from_i32(libc::ENODATA)); // no extended attributes
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, size: u32, reply: fuser::ReplyXattr) {
        if size == 0 { reply.size(0) } else { reply.data(&[]) }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: fuser::OpenFlags, reply: ReplyOpen) {
        match self.block_on(self.fs.getattr(ino.0)) {
            Ok(attr) => {
                let previous = self.page_versions.lock().insert(ino.0, attr.version);
                let flags =
                    if previous == Some(attr.version) { FopenFlags::FOPEN_KEEP_CACHE } else { FopenFlags::empty() };
                reply.opened(FileHandle(0), flags)
            }
            Err(error) => reply.error(errno(&error)),
        }
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        reply_empty(reply, self.block_on(self.fs.sync()));
    }

    fn fsyncdir(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        reply_empty(reply, self.block_on(self.fs.sync()));
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        match self.block_on(self.fs.readdir(ino.0)) {
            Ok(entries) => {
                for entry in entries.iter().filter(|entry| entry.cookie > offset) {
                    let name = OsStr::from_bytes(&entry.name);
                    if reply.add(INodeNo(entry.ino), entry.cookie, file_type(entry.kind), name) {
                        break; // the kernel's buffer is full; it asks again from here
                    }
                }
                reply.ok();
            }
            Err(error) => reply.error(errno(&error)),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.block_on(self.fs.statfs()) {
            Ok(space) => {
                let large_in_small = (crate::layout::LARGE_BLOCK_BYTES / crate::layout::SMALL_BLOCK_BYTES) as u64;
                let blocks = space.small_blocks + space.large_blocks * large_in_small;
                let free = space.small_free + space.large_free * large_in_small;
                let name_max = crate::directory::NAME_BYTES_MAX as u32;
                reply.statfs(blocks, free, free, space.inodes, space.inodes_free, 4096, name_max, 4096);
            }
            Err(error) => reply.error(errno(&error)),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let owner = (req.uid(), req.gid());
        let window = self.kernel.window();
        match self.block_on(self.fs.create(parent.0, name.as_bytes(), Kind::File, mode & !umask, owner, None)) {
            Ok(attr) => {
                self.page_versions.lock().insert(attr.ino, attr.version);
                let generation = Generation(attr.generation);
                // One TTL for the name and the attributes, which must not
                // be cached (see `KernelChannel`): neither is.
                self.kernel.answer(window, attr.ino, Some(parent.0), false);
                reply.created(&Duration::ZERO, &file_attr(&attr), generation, FileHandle(0), FopenFlags::empty())
            }
            Err(error) => reply.error(errno(&error)),
        }
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        reply.ok(); // permissions are not enforced: every caller is the mounting user
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A channel whose notifications go to /dev/null (the bookkeeping is
    /// what is tested; the kernel's side is in tests/fs_mount.rs).
    fn channel() -> KernelChannel {
        let channel = KernelChannel::default();
        channel.connect(File::options().write(true).open("/dev/null").expect("/dev/null"));
        channel
    }

    #[test]
    fn answers_cache_only_what_the_kernel_checks_and_nothing_across_a_release() {
        let channel = channel();
        let device = File::options().write(true).open("/dev/null").expect("/dev/null");
        let epochs = |channel: &KernelChannel| channel.state.lock().epochs;
        let window = channel.window();
        let introducing = channel.answer(window, 5, Some(1), true);
        assert_eq!((introducing.entry, introducing.attr), (CACHE_TTL, Duration::ZERO), "a new inode: unchecked");
        let lookup = channel.answer(window, 5, Some(1), true);
        assert_eq!((lookup.entry, lookup.attr), (CACHE_TTL, CACHE_TTL));
        let created = channel.answer(window, 6, Some(1), false);
        assert_eq!((created.entry, created.attr), (CACHE_TTL, Duration::ZERO), "create-like: the name only");
        let getattr = channel.answer(window, 7, None, true);
        assert_eq!((getattr.entry, getattr.attr), (Duration::ZERO, CACHE_TTL));
        channel.begin_release(&device, Some(2));
        assert_eq!(epochs(&channel), 0, "no names of directory 2 were given out");
        let crossed = channel.answer(window, 5, Some(1), true);
        assert_eq!((crossed.entry, crossed.attr), (Duration::ZERO, Duration::ZERO), "computed across a release");
        channel.begin_release(&device, Some(1));
        assert_eq!(epochs(&channel), 1, "names of directory 1 were given out: a new epoch");
        channel.begin_release(&device, None);
        assert_eq!(epochs(&channel), 1, "the epoch forgot them all");
        channel.names_moved_into(3);
        channel.begin_release(&device, Some(3));
        assert_eq!(epochs(&channel), 2, "a name renamed into directory 3 is one of its names");
    }

    #[test]
    fn entry_answers_are_counted_until_the_kernel_forgets_them() {
        let channel = channel();
        let window = channel.window();
        channel.answer(window, 5, Some(1), true);
        channel.answer(window, 5, Some(1), false);
        channel.answer(window, 9, None, true); // getattr: no lookup count
        assert!(channel.answers_pending(5) && !channel.answers_pending(9));
        channel.forget(5, 1);
        assert!(channel.answers_pending(5));
        channel.forget(5, 1);
        assert!(!channel.answers_pending(5));
        channel.forget(5, 3); // more than counted: no underflow
        assert!(!channel.answers_pending(5));
    }

    #[test]
    fn without_a_mount_nothing_is_cached() {
        let channel = KernelChannel::default();
        let answer = channel.answer(channel.window(), 5, Some(1), true);
        assert_eq!((answer.entry, answer.attr), (Duration::ZERO, Duration::ZERO));
    }

    #[tokio::test]
    async fn a_release_notifies_and_ends_the_window() {
        let channel = channel();
        let window = channel.window();
        channel.answer(window, 5, Some(1), true);
        channel.release_inode(1).await;
        assert_ne!(channel.window(), window);
        assert_eq!(channel.state.lock().epochs, 1);
        assert!(channel.state.lock().named.is_empty(), "the release started a new epoch");
        channel.release_all();
        assert_eq!(channel.answer(window, 5, Some(1), true).attr, Duration::ZERO);
    }
}
