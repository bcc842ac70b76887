//! The FUSE mount (`fuser`): the kernel's requests, turned into calls on a
//! [`FileSystem`] and its answers (errors as errno values, never a panic).
//!
//! Coherence with other workstations: attributes and names are never
//! cached by the kernel (TTL zero). A file's pages are kept across opens
//! (`FOPEN_KEEP_CACHE`) only if its inode's version is the one this mount
//! last saw, after its own writes; any change from elsewhere drops them at
//! the next open. So a file closed on one workstation reads back current
//! when opened on another (close-to-open, as NFS gives).

use crate::fs::{Attr, FileSystem, FsError, SetAttr};
use crate::inode::Kind;
use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, MountOption, RenameFlags,
    ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite,
    Request, TimeOrNow,
};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::runtime::Handle;

/// The kernel keeps no attributes or names: another workstation may change them.
const TTL: Duration = Duration::ZERO;
/// FUSE request threads (a request waiting for a lock does not hold up the others).
const FUSE_THREADS: usize = 4;

/// A [`FileSystem`] as FUSE sees it.
#[derive(Debug)]
pub struct FuseAdapter {
    fs: Arc<FileSystem>,
    runtime: Handle,
    /// Per inode, the version the kernel's pages of it reflect.
    page_versions: parking_lot::Mutex<HashMap<u64, u64>>,
}

impl FuseAdapter {
    pub fn new(fs: Arc<FileSystem>, runtime: Handle) -> FuseAdapter {
        FuseAdapter { fs, runtime, page_versions: parking_lot::Mutex::new(HashMap::new()) }
    }

    fn block_on<T>(&self, future: impl Future<Output = T>) -> T {
        self.runtime.block_on(future)
    }
}

/// Mounts `fs` at `mountpoint` in the background; dropping the session unmounts.
pub fn mount(fs: Arc<FileSystem>, runtime: Handle, mountpoint: &Path) -> std::io::Result<fuser::BackgroundSession> {
    let mut config = Config::default();
    config.mount_options = vec![MountOption::FSName(format!("frangipani-{}", fs.workstation())), MountOption::RW];
    config.n_threads = Some(FUSE_THREADS);
    fuser::spawn_mount(FuseAdapter::new(fs, runtime), mountpoint, &config)
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

fn reply_entry(reply: ReplyEntry, result: Result<Attr, FsError>) {
    match result {
        Ok(attr) => reply.entry(&TTL, &file_attr(&attr), Generation(attr.generation)),
        Err(error) => reply.error(errno(&error)),
    }
}

fn reply_attr(reply: ReplyAttr, result: Result<Attr, FsError>) {
    match result {
        Ok(attr) => reply.attr(&TTL, &file_attr(&attr)),
        Err(error) => reply.error(errno(&error)),
    }
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
        reply_entry(reply, self.block_on(self.fs.lookup(parent.0, name.as_bytes())));
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        reply_attr(reply, self.block_on(self.fs.getattr(ino.0)));
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
        reply_attr(reply, self.block_on(self.fs.setattr(ino.0, change)));
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
        reply_entry(reply, self.block_on(created));
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        let owner = (req.uid(), req.gid());
        let created = self.fs.create(parent.0, name.as_bytes(), Kind::Directory, mode & !umask, owner, None);
        reply_entry(reply, self.block_on(created));
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
        reply_entry(reply, self.block_on(created));
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
        let renamed = self.fs.rename(parent.0, name.as_bytes(), newparent.0, newname.as_bytes());
        reply_empty(reply, self.block_on(renamed));
    }

    fn link(&self, _req: &Request, ino: INodeNo, newparent: INodeNo, newname: &OsStr, reply: ReplyEntry) {
        reply_entry(reply, self.block_on(self.fs.link(ino.0, newparent.0, newname.as_bytes())));
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
        // revokes the lock, which writes the data back first.
        reply.ok();
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
        match self.block_on(self.fs.create(parent.0, name.as_bytes(), Kind::File, mode & !umask, owner, None)) {
            Ok(attr) => {
                self.page_versions.lock().insert(attr.ino, attr.version);
                let generation = Generation(attr.generation);
                reply.created(&TTL, &file_attr(&attr), generation, FileHandle(0), FopenFlags::empty())
            }
            Err(error) => reply.error(errno(&error)),
        }
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        reply.ok(); // permissions are not enforced: every caller is the mounting user
    }
}
