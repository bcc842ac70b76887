//! `lab fs`: serve a Frangipani volume, mount it with FUSE from several
//! processes, check it offline.
//!
//! - `lab fs serve` starts six storage nodes with a block volume and a lock
//!   server whose fencer seals dead leases on the volume, formats the file
//!   system on first use, and writes a *volume file* (JSON: the block PG's
//!   six addresses, the lock server's address, the lease) for the others.
//! - `lab fs mount DIR --workstation N` mounts the volume at `DIR` as
//!   workstation `N` until it is unmounted (`umount DIR`) or sent SIGINT or
//!   SIGTERM (then it writes back what it holds and unmounts).
//! - `lab fs fsck` checks the whole volume and exits 1 if it is not clean.

use anyhow::{Context, Result, bail};
use common::transport::{BoxFuture, TcpTransport, Transport};
use frangipani::device::BlockDevice;
use frangipani::fs::{FileSystem, FsConfig, LockService};
use frangipani::layout::ParameterBlock;
use lockserver::{ClerkConfig, Fencer, FileRegistryStore, LeaseEpoch, LockServer, ServerConfig};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use storage_node::DiskBackend;
use storage_node::block_client::{BlockClient, BlockVolumeLayout, REPLICAS};
use tracing::info;

use crate::cluster::{ClusterOptions, LocalCluster};

/// Where a served volume is: what a mount or fsck needs to reach it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeFile {
    /// The six segment addresses of the block volume's PG.
    pub segments: Vec<String>,
    pub blocks_per_pg: u64,
    pub block_bytes_max: usize,
    pub lock_server: String,
    pub lease_ms: u64,
}

impl VolumeFile {
    pub fn read(path: &Path) -> Result<VolumeFile> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the volume file {} (start `lab fs serve` first)", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{} is not a volume file", path.display()))
    }

    pub fn write(&self, path: &Path) -> Result<()> {
        crate::write_atomically(path, &serde_json::to_string_pretty(self)?)
    }

    /// A client of the volume's blocks.
    pub fn block_client(&self) -> Result<BlockClient> {
        let segments: [String; REPLICAS] = self
            .segments
            .clone()
            .try_into()
            .map_err(|segments: Vec<String>| anyhow::anyhow!("{} segment addresses, not six", segments.len()))?;
        let layout = BlockVolumeLayout {
            blocks_per_pg: self.blocks_per_pg,
            block_bytes_max: self.block_bytes_max,
            pgs: vec![segments],
        };
        Ok(BlockClient::new(layout, Arc::new(TcpTransport::new())))
    }

    /// How a workstation reaches the lock service, with a clerk tuned to the lease.
    pub fn lock_service(&self) -> LockService {
        let lease_micros = self.lease_ms * 1000;
        LockService {
            transport: Arc::new(TcpTransport::new()),
            addresses: vec![self.lock_server.clone()],
            clerk: ClerkConfig {
                lease_margin_micros: lease_micros / 10,
                renew_every_micros: lease_micros / 6,
                retransmit_micros: (lease_micros / 20).max(20_000),
            },
            lease_timeout: Duration::from_millis(self.lease_ms * 4).max(Duration::from_secs(5)),
        }
    }
}

/// Seals a dead lease on the block volume before its recovery starts.
#[derive(Debug)]
struct SealingFencer(Arc<BlockClient>);

impl Fencer for SealingFencer {
    fn fence(&self, epoch: LeaseEpoch) -> BoxFuture<'static, ()> {
        let client = self.0.clone();
        Box::pin(async move {
            let report = client.seal_until_done(epoch.0).await;
            info!(epoch = epoch.0, blocks = report.blocks, repairs = report.repairs, "sealed a dead lease");
        })
    }
}

/// Options of `lab fs serve`.
#[derive(Clone, Debug, clap::Args)]
pub struct ServeOptions {
    /// Data directory of the six storage nodes (a temporary one if not given).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// File backend of the nodes: std, io-uring or memory.
    #[arg(long, default_value = "std")]
    pub disk: DiskBackend,
    /// Lease of each workstation, in milliseconds: a crashed workstation's
    /// locks come back this long after its last renewal.
    #[arg(long, default_value_t = 5000)]
    pub lease_ms: u64,
    /// Where to write the volume file that mounts and fsck read.
    #[arg(long, default_value = "frangipani-volume.json")]
    pub volume_file: PathBuf,
}

/// A served volume: storage nodes with a block volume and the lock server.
#[derive(Debug)]
pub struct FsServer {
    pub cluster: LocalCluster,
    pub lock_server: LockServer,
    pub volume: VolumeFile,
    _temporary: Option<tempfile::TempDir>,
}

impl FsServer {
    /// Starts the nodes and the lock server; formats the volume if it is new.
    pub async fn start(data_dir: Option<&Path>, disk: DiskBackend, lease_ms: u64) -> Result<FsServer> {
        if lease_ms < 200 {
            bail!("--lease-ms {lease_ms}: leases shorter than 200 ms expire under ordinary scheduling delays");
        }
        let temporary = match data_dir {
            Some(_) => None,
            None => Some(tempfile::tempdir().context("creating a temporary data directory")?),
        };
        let directory =
            data_dir.map(Path::to_path_buf).unwrap_or_else(|| temporary.as_ref().expect("made").path().into());
        let mut options = ClusterOptions::new(&directory, disk);
        options.block_pgs = 1;
        options.log_file_bytes = 16 * 1024 * 1024;
        let cluster = LocalCluster::start(&options).await?;
        let client = Arc::new(cluster.block_client(Arc::new(TcpTransport::new()))?);
        match frangipani::fs::read_layout(client.as_ref()).await {
            Ok(layout) => info!(blocks = layout.total_blocks(), "volume found"),
            Err(_) => {
                frangipani::fs::format(client.as_ref(), ParameterBlock::small()).await.context("formatting")?;
                info!("volume formatted");
            }
        }
        let config = ServerConfig { lease_micros: lease_ms * 1000, retransmit_micros: (lease_ms * 50).max(20_000) };
        let fencer = Arc::new(SealingFencer(client));
        let transport: Arc<dyn Transport> = Arc::new(TcpTransport::new());
        // The lock server's registry sits beside the volume, so a restarted
        // `serve` continues its lease epochs and fencing tokens (the volume
        // remembers the old ones) and lets clerks reclaim their locks.
        let registry = Arc::new(FileRegistryStore::open(&directory.join("lock-registry"))?);
        let lock_server =
            LockServer::start_with_registry(config, transport, "127.0.0.1:0".into(), fencer, registry).await?;
        let volume = VolumeFile {
            segments: (0..REPLICAS).map(|index| cluster.address(index).to_string()).collect(),
            blocks_per_pg: options.blocks_per_pg,
            block_bytes_max: common::limits::BLOCK_BYTES_MAX,
            lock_server: lock_server.local_address().to_string(),
            lease_ms,
        };
        Ok(FsServer { cluster, lock_server, volume, _temporary: temporary })
    }
}

/// `lab fs serve`: runs until SIGINT or SIGTERM.
pub async fn serve(options: ServeOptions) -> Result<()> {
    let server = FsServer::start(options.data_dir.as_deref(), options.disk, options.lease_ms).await?;
    server.volume.write(&options.volume_file)?;
    println!("volume served; volume file: {}", options.volume_file.display());
    println!("  lock server  {}", server.volume.lock_server);
    println!("  segments     {}", server.volume.segments.join(" "));
    println!("mount it with: lab fs mount DIR --workstation N --volume {}", options.volume_file.display());
    wait_for_signal().await?;
    println!("stopping");
    Ok(())
}

async fn wait_for_signal() -> Result<()> {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result?,
        _ = terminate.recv() => {}
    }
    Ok(())
}

/// Options of `lab fs mount`.
#[derive(Clone, Debug, clap::Args)]
pub struct MountOptions {
    /// An empty directory to mount on.
    pub dir: PathBuf,
    /// This workstation's number: its log region (0..8 on the default volume).
    #[arg(long)]
    pub workstation: u32,
    /// The volume file `lab fs serve` wrote.
    #[arg(long, default_value = "frangipani-volume.json")]
    pub volume: PathBuf,
}

/// Whether `canonical` (a path resolved before mounting: resolving it now
/// would go through the mount itself) is a mount point.
pub(crate) fn is_mounted(canonical: &Path) -> bool {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else { return false };
    let wanted = canonical.to_string_lossy().replace(' ', "\\040");
    mounts.lines().any(|line| line.split(' ').nth(1) == Some(wanted.as_str()))
}

/// Mounts a workstation of the volume on a directory.
pub async fn mount_workstation(volume: &VolumeFile, workstation: u32) -> Result<Arc<FileSystem>> {
    let device: Arc<dyn BlockDevice> = Arc::new(volume.block_client()?);
    let fs = FileSystem::mount(workstation, device, volume.lock_service(), FsConfig::default())
        .await
        .with_context(|| format!("mounting as workstation {workstation}"))?;
    Ok(fs)
}

/// `lab fs mount`: runs until the mount goes away or a signal comes.
pub async fn mount(options: MountOptions) -> Result<()> {
    let volume = VolumeFile::read(&options.volume)?;
    if !options.dir.is_dir() {
        bail!("{} is not a directory", options.dir.display());
    }
    let canonical = options.dir.canonicalize()?;
    let fs = mount_workstation(&volume, options.workstation).await?;
    let session = frangipani::fuse::mount(fs.clone(), tokio::runtime::Handle::current(), &options.dir)
        .with_context(|| format!("FUSE mount on {} (needs root and /dev/fuse)", options.dir.display()))?;
    println!("workstation {} mounted on {}", options.workstation, options.dir.display());
    let mut poll = tokio::time::interval(Duration::from_millis(200));
    let signal = wait_for_signal();
    tokio::pin!(signal);
    let unmounted_outside = loop {
        tokio::select! {
            result = &mut signal => {
                result?;
                break false;
            }
            _ = poll.tick() => {
                if !is_mounted(&canonical) {
                    break true;
                }
            }
        }
    };
    let synced = fs.sync().await;
    // Dropping the session unmounts; once unmounted from outside, only
    // its thread is left to join.
    let closing = move || if unmounted_outside { session.join() } else { session.umount_and_join() };
    tokio::task::spawn_blocking(closing).await?.context("closing the FUSE session")?;
    fs.unmount().await?;
    synced.context("writing back at unmount")?;
    println!("workstation {} unmounted", options.workstation);
    Ok(())
}

/// Options of `lab fs fsck`.
#[derive(Clone, Debug, clap::Args)]
pub struct FsckOptions {
    /// The volume file `lab fs serve` wrote.
    #[arg(long, default_value = "frangipani-volume.json")]
    pub volume: PathBuf,
}

/// `lab fs fsck`: prints the report; fails if the volume is not clean.
pub async fn fsck(options: FsckOptions) -> Result<()> {
    let volume = VolumeFile::read(&options.volume)?;
    let client = volume.block_client()?;
    let report = frangipani::fsck::check(&client).await?;
    println!(
        "{} directories, {} files, {} symbolic links, {} blocks in use",
        report.directories, report.files, report.symlinks, report.blocks
    );
    if report.is_clean() {
        println!("clean");
        return Ok(());
    }
    for problem in &report.problems {
        println!("  {problem}");
    }
    bail!("{} inconsistencies", report.problems.len())
}
