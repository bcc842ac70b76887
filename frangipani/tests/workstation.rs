//! Workstations over an in-memory block device and a real lock server on
//! loopback: the file-system operations, coherence between two
//! workstations, log replay after a crash, and the stale-log case.

use common::transport::BoxFuture;
use common::transport::TcpTransport;
use frangipani::device::{BlockDevice, MemoryDevice};
use frangipani::fs::{self, FileSystem, FsConfig, FsError, LockService, ROOT_INODE, SetAttr};
use frangipani::inode::Kind;
use frangipani::layout::ParameterBlock;
use lockserver::{ClerkConfig, Fencer, LeaseEpoch, LockServer, ServerConfig};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug)]
struct MemoryFencer(Arc<MemoryDevice>);

impl Fencer for MemoryFencer {
    fn fence(&self, epoch: LeaseEpoch) -> BoxFuture<'static, ()> {
        self.0.fence(epoch.0);
        Box::pin(async {})
    }
}

struct Volume {
    device: Arc<MemoryDevice>,
    server: LockServer,
}

/// Leases of 600 ms, so a crashed workstation's locks come back quickly.
const LEASE_MICROS: u64 = 600_000;

async fn volume() -> Volume {
    volume_of(ParameterBlock::small()).await
}

async fn volume_of(parameters: ParameterBlock) -> Volume {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let device = Arc::new(MemoryDevice::default());
    fs::format(device.as_ref(), parameters).await.expect("format");
    let config = ServerConfig { lease_micros: LEASE_MICROS, retransmit_micros: 50_000 };
    let fencer = Arc::new(MemoryFencer(device.clone()));
    let server = LockServer::start(config, Arc::new(TcpTransport::new()), "127.0.0.1:0".into(), fencer)
        .await
        .expect("lock server");
    Volume { device, server }
}

impl Volume {
    async fn assert_clean(&self) {
        let report = frangipani::fsck::check(self.device.as_ref()).await.expect("fsck reads the volume");
        assert!(report.is_clean(), "fsck: {:#?}", report.problems);
    }

    async fn mount(&self, workstation: u32) -> Arc<FileSystem> {
        let locks = LockService {
            transport: Arc::new(TcpTransport::new()),
            addresses: vec![self.server.local_address().to_string()],
            clerk: ClerkConfig { lease_margin_micros: 100_000, renew_every_micros: 100_000, retransmit_micros: 50_000 },
            lease_timeout: Duration::from_secs(5),
        };
        let config = FsConfig { lock_timeout: Duration::from_secs(10), ..FsConfig::default() };
        let device: Arc<dyn BlockDevice> = self.device.clone();
        FileSystem::mount(workstation, device, locks, config).await.expect("mount")
    }
}

async fn create_file(fs: &FileSystem, parent: u64, name: &str) -> Result<u64, FsError> {
    Ok(fs.create(parent, name.as_bytes(), Kind::File, 0o644, (0, 0), None).await?.ino)
}

async fn mkdir(fs: &FileSystem, parent: u64, name: &str) -> Result<u64, FsError> {
    Ok(fs.create(parent, name.as_bytes(), Kind::Directory, 0o755, (0, 0), None).await?.ino)
}

async fn names(fs: &FileSystem, ino: u64) -> Vec<String> {
    let mut names: Vec<String> = fs
        .readdir(ino)
        .await
        .expect("readdir")
        .into_iter()
        .map(|entry| String::from_utf8(entry.name).expect("utf-8"))
        .filter(|name| name != "." && name != "..")
        .collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_behave_like_a_local_file_system() {
    let volume = volume().await;
    let fs = volume.mount(0).await;
    let dir = mkdir(&fs, ROOT_INODE, "dir").await.expect("mkdir");
    let file = create_file(&fs, dir, "file").await.expect("create");
    assert_eq!(create_file(&fs, dir, "file").await, Err(FsError::Exists));
    assert_eq!(fs.lookup(dir, b"missing").await, Err(FsError::NotFound));
    assert_eq!(create_file(&fs, dir, &"n".repeat(256)).await, Err(FsError::NameTooLong));

    // Data across a small/large boundary, and a hole.
    let data: Vec<u8> = (0..200_000u32).map(|n| (n % 251) as u8).collect();
    assert_eq!(fs.write(file, 10, &data).await, Ok(data.len()));
    let back = fs.read(file, 0, 300_000).await.expect("read");
    assert_eq!(back.len(), 200_010);
    assert_eq!(&back[..10], &[0; 10]);
    assert_eq!(&back[10..], &data[..]);
    let attr = fs.setattr(file, SetAttr { size: Some(5000), permissions: Some(0o600), ..SetAttr::default() }).await;
    let attr = attr.expect("truncate");
    assert_eq!((attr.size, attr.permissions), (5000, 0o600));
    assert_eq!(fs.read(file, 4990, 100).await.expect("read").len(), 10);
    fs.setattr(file, SetAttr { size: Some(8000), ..SetAttr::default() }).await.expect("extend");
    assert_eq!(fs.read(file, 5000, 3000).await.expect("read"), vec![0; 3000], "truncated bytes read back as zeros");

    // Names: link, rename, symlink, unlink, rmdir.
    fs.link(file, ROOT_INODE, b"hard").await.expect("link");
    assert_eq!(fs.getattr(file).await.expect("stat").links, 2);
    fs.rename(dir, b"file", ROOT_INODE, b"moved").await.expect("rename");
    assert_eq!(names(&fs, dir).await, Vec::<String>::new());
    assert_eq!(names(&fs, ROOT_INODE).await, ["dir", "hard", "moved"]);
    fs.rename(ROOT_INODE, b"moved", ROOT_INODE, b"hard").await.expect("rename onto another name of itself");
    let link = fs.create(ROOT_INODE, b"link", Kind::Symlink, 0o777, (0, 0), Some(b"hard")).await.expect("symlink");
    assert_eq!(fs.readlink(link.ino).await.expect("readlink"), b"hard");
    let sub = mkdir(&fs, dir, "sub").await.expect("mkdir");
    assert_eq!(fs.remove(ROOT_INODE, b"dir", true).await, Err(FsError::NotEmpty));
    assert_eq!(
        fs.rename(ROOT_INODE, b"dir", sub, b"loop").await,
        Err(FsError::Invalid("a directory cannot move under itself"))
    );
    assert_eq!(fs.remove(ROOT_INODE, b"dir", false).await, Err(FsError::IsDirectory));
    assert_eq!(fs.getattr(dir).await.expect("stat").links, 3, "a subdirectory's '..' counts");
    fs.remove(dir, b"sub", true).await.expect("rmdir");
    fs.remove(ROOT_INODE, b"dir", true).await.expect("rmdir");
    fs.remove(ROOT_INODE, b"moved", false).await.expect("unlink one name");
    assert_eq!(fs.getattr(file).await.expect("still linked").links, 1);
    fs.sync().await.expect("sync");
    let before = fs.statfs().await.expect("statfs");
    fs.remove(ROOT_INODE, b"hard", false).await.expect("unlink the last name");
    assert_eq!(fs.getattr(file).await, Err(FsError::NotFound));
    fs.sync().await.expect("sync");
    let after = fs.statfs().await.expect("statfs");
    assert_eq!(after.inodes_free, before.inodes_free + 1, "the inode is free again");
    assert!(after.small_free > before.small_free, "and its blocks");
    fs.unmount().await.expect("unmount");
    volume.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workstations_see_each_others_changes_at_once() {
    let volume = volume().await;
    let (a, b) = (volume.mount(0).await, volume.mount(1).await);
    let file = create_file(&a, ROOT_INODE, "shared").await.expect("create");
    for round in 0..20u8 {
        let (writer, reader) = if round % 2 == 0 { (&a, &b) } else { (&b, &a) };
        writer.write(file, u64::from(round) * 100, &[round; 100]).await.expect("write");
        let seen = reader.read(file, 0, 10_000).await.expect("read");
        assert_eq!(seen.len(), (usize::from(round) + 1) * 100, "round {round}: the reader sees the new size");
        assert_eq!(&seen[usize::from(round) * 100..], &[round; 100], "round {round}: and the new bytes");
        let name = format!("from-{round}");
        create_file(writer, ROOT_INODE, &name).await.expect("create");
        assert!(reader.lookup(ROOT_INODE, name.as_bytes()).await.is_ok(), "round {round}: the new name");
    }
    let (a_stats, b_stats) = (a.stats(), b.stats());
    assert!(a_stats.lock.flushes > 0 && b_stats.lock.flushes > 0, "sharing makes revokes: {a_stats:?} {b_stats:?}");
    a.sync().await.expect("sync");
    b.sync().await.expect("sync");
    volume.assert_clean().await;
}

/// What a FUSE mount's kernel would be told to forget.
#[derive(Debug, Default)]
struct RecordedReleases {
    inodes: parking_lot::Mutex<Vec<u64>>,
    everything: std::sync::atomic::AtomicU32,
}

impl fs::KernelCache for RecordedReleases {
    fn release_inode(&self, ino: u64) -> BoxFuture<'_, ()> {
        self.inodes.lock().push(ino);
        Box::pin(async {})
    }

    fn release_all(&self) {
        self.everything.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The kernel's cache is told to forget an inode before its lock goes to
/// another workstation (so before that one's operation can return), not on
/// a downgrade to shared, and everything once the lease is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kernel_cache_forgets_an_inode_before_its_lock_goes_and_everything_when_the_lease_does() {
    let volume = volume().await;
    let (a, b) = (volume.mount(0).await, volume.mount(1).await);
    let released = Arc::new(RecordedReleases::default());
    a.attach_kernel_cache(released.clone()).expect("attach");
    assert!(a.attach_kernel_cache(released.clone()).is_err(), "one kernel cache per file system");
    let file = create_file(&a, ROOT_INODE, "f").await.expect("create");
    a.write(file, 0, b"held exclusively by a").await.expect("write");
    // b reads: a's exclusive lock is only downgraded; the kernel keeps it.
    b.read(file, 0, 100).await.expect("read on b");
    assert!(!released.inodes.lock().contains(&file), "a downgrade keeps the kernel's cache");
    // b writes: a gives the lock up, after telling the kernel.
    b.write(file, 0, b"b").await.expect("write on b");
    assert!(released.inodes.lock().contains(&file), "released before b's write returned: {:?}", released.inodes);
    assert_eq!(released.everything.load(std::sync::atomic::Ordering::SeqCst), 0);
    volume.server.stop();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while released.everything.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        assert!(tokio::time::Instant::now() < deadline, "the lease lapsed without the kernel being told");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_workstations_log_is_replayed_by_another() {
    let volume = volume().await;
    let (a, b) = (volume.mount(0).await, volume.mount(1).await);
    let dir = mkdir(&a, ROOT_INODE, "work").await.expect("mkdir");
    for n in 0..30 {
        create_file(&a, dir, &format!("f{n}")).await.expect("create");
    }
    a.remove(dir, b"f7", false).await.expect("unlink");
    a.rename(dir, b"f8", ROOT_INODE, b"f8-moved").await.expect("rename");
    // The log is durable; no metadata block has been written back.
    a.flush_log().await.expect("log");
    let writes_before_crash = a.stats().storage_writes;
    a.crash();
    assert!(writes_before_crash < 10, "only log blocks were written ({writes_before_crash} writes)");

    // b waits for a's lease to lapse; the lock service has b replay a's log.
    let listed = names(&b, dir).await;
    assert_eq!(listed.len(), 28, "{listed:?}");
    assert!(!listed.contains(&"f7".to_string()) && !listed.contains(&"f8".to_string()));
    assert!(b.lookup(ROOT_INODE, b"f8-moved").await.is_ok());
    // Replaying again (a restarted demon) changes nothing.
    let dead_epoch = 1; // a's lease, the first the server granted
    assert_eq!(b.replay_log(0, dead_epoch).await, Ok(0));
    b.sync().await.expect("sync");
    volume.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_log_never_undoes_newer_work() {
    // F97 §4: a deletes "a"; b creates "a"; a crashes. Replaying a's log
    // (which holds the create and the delete) must not touch b's "a".
    let volume = volume().await;
    let (a, b) = (volume.mount(0).await, volume.mount(1).await);
    let first = create_file(&a, ROOT_INODE, "a").await.expect("create");
    a.write(first, 0, b"first").await.expect("write");
    a.remove(ROOT_INODE, b"a", false).await.expect("delete");
    a.flush_log().await.expect("log");
    let second = create_file(&b, ROOT_INODE, "a").await.expect("b creates a");
    b.write(second, 0, b"second, by b").await.expect("write");
    b.sync().await.expect("sync");
    a.crash();
    // Take a lock a held (the first file's) so that recovery has run.
    let c = volume.mount(2).await;
    let _ = c.getattr(first).await;
    let seen = c.lookup(ROOT_INODE, b"a").await.expect("b's a survives");
    assert_eq!(seen.ino, second);
    assert_eq!(c.read(second, 0, 100).await.expect("read"), b"second, by b");
    b.sync().await.expect("sync");
    c.sync().await.expect("sync");
    volume.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_log_is_reclaimed_mid_operation_without_writing_unlogged_changes() {
    // A 4-block log fills every few dozen operations: the operation that
    // finds it full writes back only logged state before reclaiming.
    let volume = volume_of(ParameterBlock { log_blocks: 4, ..ParameterBlock::small() }).await;
    let (a, b) = (volume.mount(0).await, volume.mount(1).await);
    let dir = mkdir(&a, ROOT_INODE, "many").await.expect("mkdir");
    // Run until an operation finds the log full, then crash at once: its
    // own transaction never reached the log.
    let mut created = 0;
    loop {
        let before = a.stats().log_block_writes;
        create_file(&a, dir, &format!("file-{created:03}")).await.expect("create");
        created += 1;
        if a.stats().log_block_writes > before {
            break; // this create reclaimed a quarter of the log
        }
        assert!(created < 1000, "the log never filled");
    }
    a.crash();
    let listed = names(&b, dir).await.len();
    assert!(listed == created - 1 || listed == created, "{listed} of {created} creates survived");
    b.sync().await.expect("sync");
    volume.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_file_is_not_found_and_a_damaged_volume_is_reported() {
    let volume = volume().await;
    let (a, b) = (volume.mount(0).await, volume.mount(1).await);
    let file = create_file(&a, ROOT_INODE, "doomed").await.expect("create");
    b.remove(ROOT_INODE, b"doomed", false).await.expect("delete on the other workstation");
    assert_eq!(a.write(file, 0, b"late").await, Err(FsError::NotFound), "an open file deleted elsewhere");
    assert_eq!(a.link(file, ROOT_INODE, b"revived").await, Err(FsError::NotFound));
    assert_eq!(a.read(file, 0, 10).await, Err(FsError::NotFound));
    assert_eq!(a.readdir(file).await, Err(FsError::NotFound));
    a.sync().await.expect("sync");
    b.sync().await.expect("sync");
    volume.assert_clean().await;

    // Damage: the root's link count, written over the file system's head.
    let block = frangipani::layout::Layout::new(ParameterBlock::small()).expect("layout").inode_block(ROOT_INODE);
    let stored = volume.device.read(block).await.expect("read");
    let mut root = frangipani::inode::Inode::decode(&stored.data).expect("decode");
    root.links += 5;
    root.version = stored.version + 1;
    let stamp = frangipani::device::Stamp { epoch: 0, token: u64::MAX };
    volume.device.write(block, root.version, stamp, root.encode().expect("encode")).await.expect("write");
    let report = frangipani::fsck::check(volume.device.as_ref()).await.expect("fsck");
    assert!(report.problems.iter().any(|problem| problem.contains("link count")), "{:?}", report.problems);
}
