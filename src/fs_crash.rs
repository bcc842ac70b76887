//! `lab fs crash-test`: kill -9 a workstation at seeded points in a
//! metadata workload, and check what survives.
//!
//! A volume is served in this process; workstation 1 stays mounted (a `lab
//! fs mount` process) for the whole run. For each point, workstation 0 is
//! mounted afresh (a new process, so a new lease that first replays what
//! its earlier leases logged), runs a seeded workload through its mount in
//! a directory of its own (mkdir, create and write, rename, link, unlink,
//! rmdir, with an fsync now and then), and is killed with SIGKILL after a
//! seeded number of operations. Then, through workstation 1:
//! - listing the directory waits out the dead lease and its recovery;
//! - the tree must equal the model after some operation between the last
//!   fsync and the kill (the log replays whole operations, in order);
//! - every file last written before that fsync has exactly its content;
//! - `fsck` (after workstation 1 writes back) reports the volume clean.

use anyhow::{Context, Result, bail, ensure};
use common::rng::SimRng;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use storage_node::DiskBackend;

use crate::fs::{FsServer, is_mounted};

/// Options of `lab fs crash-test`.
#[derive(Clone, Debug, clap::Args)]
pub struct CrashOptions {
    /// Crash points (one kill -9 each).
    #[arg(long, default_value_t = 200)]
    pub points: u32,
    /// Seed of the workloads and of where each kill falls.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Most operations before a kill.
    #[arg(long, default_value_t = 40)]
    pub operations_max: u64,
    /// Workstation lease in ms: how long the survivor waits for a dead one's locks.
    #[arg(long, default_value_t = 1000)]
    pub lease_ms: u64,
    /// Write the per-point results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// What one crash point saw.
#[derive(Clone, Debug, Serialize)]
pub struct CrashPoint {
    pub point: u32,
    pub operations: u64,
    /// Operations that had returned before the last fsync (must survive).
    pub synced_operations: u64,
    /// Which prefix of the workload survived (synced..=operations).
    pub survived_prefix: u64,
    /// From the kill to the survivor's first answer in the dead one's directory.
    pub takeover_ms: f64,
    pub fsck_problems: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct CrashReport {
    pub points: Vec<CrashPoint>,
}

/// A `lab fs mount` process.
#[derive(Debug)]
pub struct MountProcess {
    child: Child,
    pub dir: PathBuf,
    /// Reaped: its pid may belong to another process now.
    exited: bool,
}

impl MountProcess {
    pub fn start(lab: &Path, volume_file: &Path, dir: &Path, workstation: u32) -> Result<MountProcess> {
        std::fs::create_dir_all(dir)?;
        let dir = &dir.canonicalize()?;
        let child = Command::new(lab)
            .args(["fs", "mount"])
            .arg(dir)
            .args(["--workstation", &workstation.to_string(), "--volume"])
            .arg(volume_file)
            .stdout(Stdio::null())
            .spawn()
            .context("spawning lab fs mount")?;
        let mut mount = MountProcess { child, dir: dir.to_path_buf(), exited: false };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !is_mounted(dir) {
            if let Some(status) = mount.child.try_wait()? {
                mount.exited = true;
                bail!("lab fs mount exited with {status} (FUSE needs root and /dev/fuse)");
            }
            ensure!(Instant::now() < deadline, "{} not mounted within 20 s", dir.display());
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(mount)
    }

    /// SIGKILL: nothing is written back, nothing released.
    pub fn kill(&mut self) {
        if !self.exited {
            let _ = self.child.kill();
            let _ = self.child.wait();
            self.exited = true;
        }
        if is_mounted(&self.dir) {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
    }
}

impl Drop for MountProcess {
    fn drop(&mut self) {
        if !self.exited {
            // SIGTERM: it writes back and unmounts.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    self.exited = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.kill();
    }
}

/// The workload's view of its directory: subdirectories and files.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Tree {
    directories: BTreeSet<String>,
    /// Content, and the operation that last wrote it.
    files: BTreeMap<String, (Vec<u8>, u64)>,
}

impl Tree {
    fn names(&self) -> BTreeSet<String> {
        self.directories.iter().chain(self.files.keys()).cloned().collect()
    }
}

/// Runs one seeded operation in `root` and applies it to the model; returns
/// whether it was an fsync.
fn operation(rng: &mut SimRng, root: &Path, tree: &mut Tree, number: u64) -> Result<bool> {
    let directories: Vec<String> = std::iter::once(String::new()).chain(tree.directories.iter().cloned()).collect();
    let directory = directories[rng.below(directories.len() as u64) as usize].clone();
    let join = |name: &str| if directory.is_empty() { name.to_string() } else { format!("{directory}/{name}") };
    let file = join(&format!("f{}", rng.below(6)));
    match rng.below(10) {
        0..=3 => {
            let data: Vec<u8> = (0..rng.below(9000)).map(|_| rng.below(256) as u8).collect();
            std::fs::write(root.join(&file), &data)?;
            tree.files.insert(file, (data, number));
        }
        4 if tree.directories.len() < 4 && !directory.contains('/') => {
            let sub = join(&format!("d{}", rng.below(3)));
            if !tree.names().contains(&sub) {
                std::fs::create_dir(root.join(&sub))?;
                tree.directories.insert(sub);
            }
        }
        5 => {
            if tree.files.remove(&file).is_some() {
                std::fs::remove_file(root.join(&file))?;
            }
        }
        6 => {
            let target = join(&format!("f{}", rng.below(6)));
            if target != file
                && let Some(content) = tree.files.remove(&file)
            {
                std::fs::rename(root.join(&file), root.join(&target))?;
                tree.files.insert(target, content);
            }
        }
        7 => {
            if let Some(empty) = tree
                .directories
                .iter()
                .find(|dir| !tree.names().iter().any(|name| name.starts_with(&format!("{dir}/"))))
                .cloned()
            {
                std::fs::remove_dir(root.join(&empty))?;
                tree.directories.remove(&empty);
            }
        }
        _ => {
            // fsync: the whole workstation's log and dirty blocks.
            let mut handle = std::fs::OpenOptions::new().create(true).append(true).open(root.join("sync-marker"))?;
            handle.write_all(b".")?;
            handle.sync_all()?;
            let content = tree.files.get("sync-marker").map(|(content, _)| content.clone()).unwrap_or_default();
            tree.files.insert("sync-marker".into(), ([content, b".".to_vec()].concat(), number));
            return Ok(true);
        }
    }
    Ok(false)
}

/// Reads the tree under `root` as the model has it.
fn read_tree(root: &Path) -> Result<Tree> {
    let mut tree = Tree::default();
    let mut pending = vec![String::new()];
    while let Some(directory) = pending.pop() {
        for entry in std::fs::read_dir(root.join(&directory))? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().to_string();
            let path = if directory.is_empty() { name } else { format!("{directory}/{name}") };
            if entry.file_type()?.is_dir() {
                tree.directories.insert(path.clone());
                pending.push(path);
            } else {
                tree.files.insert(path.clone(), (std::fs::read(root.join(&path))?, 0));
            }
        }
    }
    Ok(tree)
}

/// Runs the crash points; `lab` is the `lab` executable (for the mounts).
pub fn run(options: &CrashOptions, lab: &Path, progress: impl Fn(&CrashPoint)) -> Result<CrashReport> {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let server = runtime.block_on(FsServer::start(None, DiskBackend::Std, options.lease_ms))?;
    let scratch = tempfile::tempdir()?;
    let volume_file = scratch.path().join("volume.json");
    server.volume.write(&volume_file)?;
    let survivor = MountProcess::start(lab, &volume_file, &scratch.path().join("survivor"), 1)?;
    let client = server.volume.block_client()?;
    let mut rng = SimRng::new(options.seed);
    let mut points = Vec::new();
    for point in 0..options.points {
        let mut victim = MountProcess::start(lab, &volume_file, &scratch.path().join("victim"), 0)?;
        let directory = format!("p{point}");
        std::fs::create_dir(victim.dir.join(&directory))?;
        let root = victim.dir.join(&directory);
        std::fs::File::open(&root)?.sync_all()?; // the directory itself survives
        let operations = 1 + rng.below(options.operations_max);
        let (mut tree, mut states) = (Tree::default(), vec![Tree::default()]);
        let mut synced = 0;
        for number in 1..=operations {
            if operation(&mut rng, &root, &mut tree, number)
                .with_context(|| format!("point {point}, operation {number}"))?
            {
                synced = number;
            }
            states.push(tree.clone());
        }
        victim.kill();
        let killed = Instant::now();
        let seen = read_tree(&survivor.dir.join(&directory))
            .with_context(|| format!("point {point}: reading after the crash"))?;
        let takeover_ms = killed.elapsed().as_secs_f64() * 1000.0;
        // The survivor's tree is the model after some operation from the last fsync on.
        let survived_prefix =
            (synced..=operations).rev().find(|prefix| states[*prefix as usize].names() == seen.names()).with_context(
                || format!("point {point}: the tree {:?} matches no state after operation {synced}", seen.names()),
            )?;
        for (path, (content, written)) in &states[survived_prefix as usize].files {
            if *written <= synced {
                ensure!(seen.files[path].0 == *content, "point {point}: {path}, written before the fsync, changed");
            }
        }
        // fsck, once the survivor has written back what recovery gave it.
        std::fs::File::open(survivor.dir.join(&directory))?.sync_all()?;
        let report = runtime.block_on(frangipani::fsck::check(&client))?;
        let result = CrashPoint {
            point,
            operations,
            synced_operations: synced,
            survived_prefix,
            takeover_ms,
            fsck_problems: report.problems,
        };
        progress(&result);
        ensure!(result.fsck_problems.is_empty(), "point {point}: fsck: {:?}", result.fsck_problems);
        points.push(result);
    }
    drop(survivor);
    let report = CrashReport { points };
    if let Some(path) = &options.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
    }
    Ok(report)
}

/// The summary table.
pub fn render(report: &CrashReport) -> String {
    let count = report.points.len();
    let mut takeovers: Vec<f64> = report.points.iter().map(|point| point.takeover_ms).collect();
    takeovers.sort_by(f64::total_cmp);
    let median = takeovers.get(count / 2).copied().unwrap_or(0.0);
    let worst = takeovers.last().copied().unwrap_or(0.0);
    let clean = report.points.iter().filter(|point| point.fsck_problems.is_empty()).count();
    let operations: u64 = report.points.iter().map(|point| point.operations).sum();
    let synced: u64 = report.points.iter().map(|point| point.synced_operations).sum();
    let beyond: u64 = report.points.iter().map(|point| point.survived_prefix - point.synced_operations).sum();
    format!(
        "crash points            {count}\n\
         fsck clean              {clean} of {count}\n\
         operations run          {operations}\n\
         fsynced, all survived   {synced}\n\
         past the fsync, kept    {beyond} (replayed from the log)\n\
         takeover after kill -9  median {median:.0} ms, worst {worst:.0} ms (lease expiry, seal, replay)\n"
    )
}
