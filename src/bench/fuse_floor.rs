//! The FUSE floor: a file system that keeps everything in memory, takes no
//! locks and talks to no storage, mounted with the same `fuser` setup as
//! Frangipani. `lab bench fs` runs the same phases on it, so each phase's
//! cost splits into what FUSE itself costs on this machine (kernel round
//! trips, context switches) and what Frangipani adds. It lets the kernel
//! cache everything (names, attributes, pages) for a minute: the most any
//! FUSE file system can get.

use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, MountOption, ReplyAttr,
    ReplyCreate, ReplyData, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyWrite, Request, TimeOrNow,
};
use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::path::Path;
use std::time::{Duration, SystemTime};

const TTL: Duration = Duration::from_secs(60);
/// As the Frangipani mount has.
const FUSE_THREADS: usize = 4;
const ROOT: u64 = 1;

#[derive(Debug)]
struct Node {
    attr: FileAttr,
    data: Vec<u8>,
    children: BTreeMap<OsString, u64>,
}

/// The in-memory file system (regular files and directories only).
#[derive(Debug)]
pub struct FloorFs {
    nodes: parking_lot::Mutex<HashMap<u64, Node>>,
}

fn attr(ino: u64, kind: FileType, perm: u16) -> FileAttr {
    let now = SystemTime::now();
    FileAttr {
        ino: INodeNo(ino),
        size: 0,
        blocks: 0,
        atime: now,
        mtime: now,
        ctime: now,
        crtime: now,
        kind,
        perm,
        nlink: if kind == FileType::Directory { 2 } else { 1 },
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

impl FloorFs {
    fn new() -> FloorFs {
        let root = Node { attr: attr(ROOT, FileType::Directory, 0o755), data: Vec::new(), children: BTreeMap::new() };
        FloorFs { nodes: parking_lot::Mutex::new(HashMap::from([(ROOT, root)])) }
    }

    /// Adds `name` to `parent`: its attributes, or the errno.
    fn make(&self, parent: INodeNo, name: &OsStr, kind: FileType, perm: u32) -> Result<FileAttr, Errno> {
        let mut nodes = self.nodes.lock();
        let ino = nodes.len() as u64 + 1;
        let directory = nodes.get_mut(&parent.0).ok_or(Errno::from_i32(libc::ENOENT))?;
        if directory.attr.kind != FileType::Directory {
            return Err(Errno::from_i32(libc::ENOTDIR));
        }
        if directory.children.contains_key(name) {
            return Err(Errno::from_i32(libc::EEXIST));
        }
        directory.children.insert(name.to_owned(), ino);
        let attr = attr(ino, kind, perm as u16 & 0o7777);
        nodes.insert(ino, Node { attr, data: Vec::new(), children: BTreeMap::new() });
        Ok(attr)
    }
}

/// Mounts the floor file system on `dir`; dropping the session unmounts.
pub fn mount(dir: &Path) -> std::io::Result<fuser::BackgroundSession> {
    let mut config = Config::default();
    config.mount_options = vec![MountOption::FSName("fuse-floor".into()), MountOption::RW];
    config.n_threads = Some(FUSE_THREADS);
    fuser::spawn_mount(FloorFs::new(), dir, &config)
}

impl fuser::Filesystem for FloorFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let nodes = self.nodes.lock();
        match nodes.get(&parent.0).and_then(|node| node.children.get(name)).and_then(|ino| nodes.get(ino)) {
            Some(node) => reply.entry(&TTL, &node.attr, Generation(0)),
            None => reply.error(Errno::from_i32(libc::ENOENT)),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.nodes.lock().get(&ino.0) {
            Some(node) => reply.attr(&TTL, &node.attr),
            None => reply.error(Errno::from_i32(libc::ENOENT)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut nodes = self.nodes.lock();
        let Some(node) = nodes.get_mut(&ino.0) else { return reply.error(Errno::from_i32(libc::ENOENT)) };
        if let Some(mode) = mode {
            node.attr.perm = mode as u16 & 0o7777;
        }
        if let Some(size) = size {
            node.data.resize(size as usize, 0);
            node.attr.size = size;
        }
        reply.attr(&TTL, &node.attr)
    }

    fn mkdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        match self.make(parent, name, FileType::Directory, mode & !umask) {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(error) => reply.error(error),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        match self.make(parent, name, FileType::RegularFile, mode & !umask) {
            Ok(attr) => reply.created(&TTL, &attr, Generation(0), FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE),
            Err(error) => reply.error(error),
        }
    }

    fn open(&self, _req: &Request, _ino: INodeNo, _flags: fuser::OpenFlags, reply: ReplyOpen) {
        reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE)
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
        let nodes = self.nodes.lock();
        let Some(node) = nodes.get(&ino.0) else { return reply.error(Errno::from_i32(libc::ENOENT)) };
        let start = (offset as usize).min(node.data.len());
        let end = (start + size as usize).min(node.data.len());
        reply.data(&node.data[start..end])
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
        let mut nodes = self.nodes.lock();
        let Some(node) = nodes.get_mut(&ino.0) else { return reply.error(Errno::from_i32(libc::ENOENT)) };
        let end = offset as usize + data.len();
        if node.data.len() < end {
            node.data.resize(end, 0);
        }
        node.data[offset as usize..end].copy_from_slice(data);
        node.attr.size = node.data.len() as u64;
        node.attr.mtime = SystemTime::now();
        reply.written(data.len() as u32)
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: fuser::LockOwner, reply: ReplyEmpty) {
        reply.error(Errno::from_i32(libc::ENOSYS)) // as the Frangipani mount: no flush on close
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        reply.ok()
    }

    fn fsyncdir(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        reply.ok()
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        reply.ok()
    }

    fn getxattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, _size: u32, reply: fuser::ReplyXattr) {
        reply.error(Errno::from_i32(libc::ENODATA)) // as the Frangipani mount: no extended attributes
    }
}
