//! `lab bench fs`: a Modified-Andrew-style workload on a Frangipani mount and
//! on a local directory in the same run, then scaling over 1–4 workstations
//! and the paper's contention cases.
//!
//! - **Phases** (through the file-system interface, on a FUSE mount of
//!   workstation 0, on a local directory, and on the FUSE floor, an
//!   in-memory FUSE file system that shows what FUSE alone costs here): create the directories; copy
//!   a generated source tree (about 1,000 files); stat everything; read and
//!   grep everything; "compile" (read every source, write one output per
//!   source). Each phase ends with the data it wrote made durable (fsync of
//!   every file it wrote: `syncfs` locally, fsync on the mount, which
//!   writes back the workstation's whole cache).
//! - **Scaling**: 1 to 4 workstations (in this process, over the file-system
//!   API, so their counters are exact), each in its own directory, run the
//!   same workload at once. Per operation: lock messages, revokes, storage
//!   round trips (reads and writes, log blocks included).
//! - **Contention**: one writer appending to a file while readers read it,
//!   and two writers on one file; each operation under the other's lock
//!   costs a revoke.

use anyhow::{Context, Result, ensure};
use common::rng::SimRng;
use frangipani::fs::{FileSystem, FsStats, ROOT_INODE};
use frangipani::inode::Kind;
use serde::Serialize;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use storage_node::DiskBackend;

use crate::bench::fuse_floor;
use crate::bench::report::{ratio, render_table};
use crate::fs::{FsServer, mount_workstation};
use crate::fs_crash::MountProcess;

/// Options of `lab bench fs`.
#[derive(Clone, Debug, clap::Args)]
pub struct FsBenchOptions {
    /// Files in the generated source tree.
    #[arg(long, default_value_t = 1000)]
    pub files: usize,
    /// Most workstations in the scaling run.
    #[arg(long, default_value_t = 4)]
    pub workstations: u32,
    /// Seconds of each contention case.
    #[arg(long, default_value_t = 2.0)]
    pub contention_seconds: f64,
    /// Write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Clone, Debug, Serialize)]
pub struct PhaseResult {
    pub phase: &'static str,
    pub operations: u64,
    pub local_ms: f64,
    pub mount_ms: f64,
    /// The same phase on the FUSE floor (an in-memory FUSE file system).
    pub fuse_floor_ms: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct ScalingResult {
    pub workstations: u32,
    pub wall_ms: f64,
    pub operations: u64,
    pub lock_messages_per_op: f64,
    pub revokes_per_op: f64,
    pub storage_round_trips_per_op: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct ContentionResult {
    pub case: &'static str,
    pub operations: u64,
    pub operations_per_second: f64,
    pub revokes_per_op: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct FsBenchReport {
    pub files: usize,
    pub phases: Vec<PhaseResult>,
    pub scaling: Vec<ScalingResult>,
    pub contention: Vec<ContentionResult>,
}

const PHASES: [&str; 5] = ["mkdir", "copy", "stat", "grep", "compile"];
const DIRECTORIES: usize = 20;

/// The generated source tree: `files` C-like files of 1–12 KiB in
/// `DIRECTORIES` directories (path relative to the tree, content).
fn source_tree(files: usize) -> Vec<(String, Vec<u8>)> {
    let mut rng = SimRng::new(97);
    (0..files)
        .map(|n| {
            let lines = 20 + rng.below(400) as usize;
            let mut text = String::new();
            for line in 0..lines {
                let word = ["lock", "cache", "log", "inode", "revoke", "lease"][rng.below(6) as usize];
                text.push_str(&format!("static int {word}_{n}_{line}(void) {{ return {}; }}\n", rng.below(1000)));
            }
            (format!("src{}/file{n}.c", n % DIRECTORIES), text.into_bytes())
        })
        .collect()
}

/// Makes everything written under `path` durable: `syncfs` on a local
/// file system (every dirty file), fsync on a Frangipani mount (which
/// writes back the workstation's whole cache).
fn fsync_path(path: &Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let directory = std::fs::File::open(path)?;
    directory.sync_all()?;
    if unsafe { libc::syncfs(directory.as_raw_fd()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Runs the phases in `root`; returns (operations, time) per phase.
fn andrew(root: &Path, tree: &[(String, Vec<u8>)]) -> Result<Vec<(u64, Duration)>> {
    let mut results = Vec::new();
    let started = Instant::now();
    for directory in 0..DIRECTORIES {
        std::fs::create_dir_all(root.join(format!("src{directory}")))?;
        std::fs::create_dir_all(root.join(format!("out{directory}")))?;
    }
    fsync_path(root)?;
    results.push(((DIRECTORIES * 2) as u64, started.elapsed()));

    let started = Instant::now();
    for (path, content) in tree {
        let mut file = std::fs::File::create(root.join(path))?;
        file.write_all(content)?;
    }
    fsync_path(root)?; // one fsync writes back the workstation's whole cache
    results.push((tree.len() as u64, started.elapsed()));

    let started = Instant::now();
    let mut bytes = 0;
    for (path, _) in tree {
        bytes += std::fs::metadata(root.join(path))?.len();
    }
    ensure!(bytes == tree.iter().map(|(_, content)| content.len() as u64).sum::<u64>(), "stat sizes differ");
    results.push((tree.len() as u64, started.elapsed()));

    let started = Instant::now();
    let mut matches = 0;
    for (path, _) in tree {
        let content = std::fs::read(root.join(path))?;
        matches += content.windows(6).filter(|window| *window == b"revoke").count();
    }
    ensure!(matches > 0, "grep found nothing");
    results.push((tree.len() as u64, started.elapsed()));

    let started = Instant::now();
    for (path, _) in tree {
        let content = std::fs::read(root.join(path))?;
        let object: Vec<u8> = content.iter().step_by(2).map(|byte| byte.wrapping_mul(31)).collect();
        std::fs::write(root.join(path.replace("src", "out").replace(".c", ".o")), object)?;
    }
    fsync_path(root)?;
    results.push((tree.len() as u64 * 2, started.elapsed()));
    Ok(results)
}

/// The same workload over the file-system API in directory `directory`.
async fn andrew_api(fs: &FileSystem, directory: u64, tree: &[(String, Vec<u8>)]) -> Result<u64> {
    let mut operations = 0;
    let mut sources = Vec::new();
    let mut outputs = Vec::new();
    for index in 0..DIRECTORIES {
        sources.push(
            fs.create(directory, format!("src{index}").as_bytes(), Kind::Directory, 0o755, (0, 0), None).await?.ino,
        );
        outputs.push(
            fs.create(directory, format!("out{index}").as_bytes(), Kind::Directory, 0o755, (0, 0), None).await?.ino,
        );
        operations += 2;
    }
    let mut files = Vec::new();
    for (index, (path, content)) in tree.iter().enumerate() {
        let name = path.rsplit('/').next().expect("a name");
        let ino = fs.create(sources[index % DIRECTORIES], name.as_bytes(), Kind::File, 0o644, (0, 0), None).await?.ino;
        fs.write(ino, 0, content).await?;
        files.push((ino, name, content.len()));
        operations += 2;
    }
    fs.sync().await?;
    for (index, (_, name, _)) in files.iter().enumerate() {
        fs.lookup(sources[index % DIRECTORIES], name.as_bytes()).await?;
        operations += 1;
    }
    for (ino, _, length) in &files {
        fs.read(*ino, 0, *length).await?;
        operations += 1;
    }
    for (index, (ino, name, length)) in files.iter().enumerate() {
        let content = fs.read(*ino, 0, *length).await?;
        let object: Vec<u8> = content.iter().step_by(2).copied().collect();
        let out = fs.create(outputs[index % DIRECTORIES], name.as_bytes(), Kind::File, 0o644, (0, 0), None).await?.ino;
        fs.write(out, 0, &object).await?;
        operations += 3;
    }
    fs.sync().await?;
    Ok(operations)
}

fn per_op(before: &FsStats, after: &FsStats, operations: u64) -> (f64, f64, f64) {
    let messages = (after.lock.messages_sent - before.lock.messages_sent) as f64;
    let revokes = (after.lock.flushes - before.lock.flushes) as f64;
    let storage = (after.storage_reads + after.storage_writes - before.storage_reads - before.storage_writes) as f64;
    let operations = operations as f64;
    (ratio(messages, operations), ratio(revokes, operations), ratio(storage, operations))
}

async fn scaling(options: &FsBenchOptions, tree: &[(String, Vec<u8>)]) -> Result<Vec<ScalingResult>> {
    let mut results = Vec::new();
    for count in 1..=options.workstations {
        let server = FsServer::start(None, DiskBackend::Std, 5000).await?;
        // Workstation w allocates from portion w mod 4: 4..8 share none.
        let mut workstations = Vec::new();
        for index in 0..count {
            workstations.push(mount_workstation(&server.volume, 4 + index).await?);
        }
        let setup = &workstations[0];
        let mut directories = Vec::new();
        for index in 0..count {
            directories.push(
                setup
                    .create(ROOT_INODE, format!("w{index}").as_bytes(), Kind::Directory, 0o755, (0, 0), None)
                    .await?
                    .ino,
            );
        }
        setup.sync().await?;
        // Warm up: each takes its directory's lock and its own portions.
        for (fs, directory) in workstations.iter().zip(&directories) {
            fs.create(*directory, b"warm", Kind::File, 0o644, (0, 0), None).await?;
            let data_portion_warmup = fs.create(*directory, b"warm-data", Kind::File, 0o644, (0, 0), None).await?.ino;
            fs.write(data_portion_warmup, 0, &[1; 70_000]).await?;
        }
        let before: Vec<FsStats> = workstations.iter().map(|fs| fs.stats()).collect();
        let started = Instant::now();
        let runs = workstations.iter().zip(&directories).map(|(fs, directory)| andrew_api(fs, *directory, tree));
        let operations: Vec<u64> = futures::future::try_join_all(runs).await?;
        let wall = started.elapsed();
        let total_operations: u64 = operations.iter().sum();
        let mut sums = (0.0, 0.0, 0.0);
        for ((fs, before), operations) in workstations.iter().zip(&before).zip(&operations) {
            let (messages, revokes, storage) = per_op(before, &fs.stats(), *operations);
            let share = *operations as f64 / total_operations as f64;
            sums = (sums.0 + messages * share, sums.1 + revokes * share, sums.2 + storage * share);
        }
        for fs in &workstations {
            fs.unmount().await?;
        }
        results.push(ScalingResult {
            workstations: count,
            wall_ms: wall.as_secs_f64() * 1000.0,
            operations: total_operations,
            lock_messages_per_op: sums.0,
            revokes_per_op: sums.1,
            storage_round_trips_per_op: sums.2,
        });
    }
    Ok(results)
}

async fn contention(options: &FsBenchOptions) -> Result<Vec<ContentionResult>> {
    let duration = Duration::from_secs_f64(options.contention_seconds);
    let mut results = Vec::new();
    for (case, writers, readers) in [("1 writer, 3 readers of one file", 1u32, 3u32), ("2 writers on one file", 2, 0)] {
        let server = FsServer::start(None, DiskBackend::Std, 5000).await?;
        let mut workstations = Vec::new();
        for index in 0..writers + readers {
            workstations.push(Arc::new(mount_workstation(&server.volume, index).await?));
        }
        let file = workstations[0].create(ROOT_INODE, b"shared", Kind::File, 0o644, (0, 0), None).await?.ino;
        workstations[0].write(file, 0, &[7; 4096]).await?;
        let before: Vec<FsStats> = workstations.iter().map(|fs| fs.stats()).collect();
        let deadline = Instant::now() + duration;
        let tasks = workstations.iter().enumerate().map(|(index, fs)| {
            let fs = fs.clone();
            let writer = (index as u32) < writers;
            async move {
                let mut operations = 0u64;
                while Instant::now() < deadline {
                    if writer {
                        fs.write(file, (operations % 64) * 4096, &[index as u8; 4096]).await?;
                    } else {
                        fs.read(file, 0, 256 * 1024).await?;
                    }
                    operations += 1;
                }
                anyhow::Ok(operations)
            }
        });
        let operations: u64 = futures::future::try_join_all(tasks).await?.iter().sum();
        let revokes: u64 =
            workstations.iter().zip(&before).map(|(fs, before)| fs.stats().lock.flushes - before.lock.flushes).sum();
        for fs in &workstations {
            fs.unmount().await?;
        }
        results.push(ContentionResult {
            case,
            operations,
            operations_per_second: operations as f64 / duration.as_secs_f64(),
            revokes_per_op: ratio(revokes as f64, operations as f64),
        });
    }
    Ok(results)
}

/// Runs the benchmark; `lab` is the `lab` executable (for the FUSE mount).
pub async fn run(options: FsBenchOptions, lab: &Path) -> Result<FsBenchReport> {
    ensure!(options.files >= DIRECTORIES, "--files must be at least {DIRECTORIES}");
    ensure!((1..=4).contains(&options.workstations), "--workstations is 1..=4 (four bitmap portions of each kind)");
    let tree = source_tree(options.files);
    let server = FsServer::start(None, DiskBackend::Std, 5000).await?;
    let scratch = tempfile::tempdir()?;
    let volume_file = scratch.path().join("volume.json");
    server.volume.write(&volume_file)?;
    let local = scratch.path().join("local");
    std::fs::create_dir(&local)?;
    let (lab, mount_dir, tree_for_runs) = (lab.to_path_buf(), scratch.path().join("mount"), tree.clone());
    let floor_dir = scratch.path().join("fuse-floor");
    std::fs::create_dir(&floor_dir)?;
    let (local_results, mount_results, floor_results) = tokio::task::spawn_blocking(move || -> Result<_> {
        let local_results = andrew(&local, &tree_for_runs).context("on the local directory")?;
        let mount = MountProcess::start(&lab, &volume_file, &mount_dir, 0)?;
        let mount_results = andrew(&mount.dir.join("."), &tree_for_runs).context("on the mount")?;
        drop(mount);
        let floor = fuse_floor::mount(&floor_dir).context("mounting the FUSE floor (needs root and /dev/fuse)")?;
        let floor_results = andrew(&floor_dir, &tree_for_runs).context("on the FUSE floor");
        floor.umount_and_join().context("unmounting the FUSE floor")?;
        Ok((local_results, mount_results, floor_results?))
    })
    .await??;
    let millis = |results: &[(u64, Duration)], index: usize| results[index].1.as_secs_f64() * 1000.0;
    let phases = PHASES
        .iter()
        .enumerate()
        .map(|(index, phase)| PhaseResult {
            phase,
            operations: local_results[index].0,
            local_ms: millis(&local_results, index),
            mount_ms: millis(&mount_results, index),
            fuse_floor_ms: millis(&floor_results, index),
        })
        .collect();
    drop(server);
    let scaling = scaling(&options, &tree).await?;
    let contention = contention(&options).await?;
    let report = FsBenchReport { files: options.files, phases, scaling, contention };
    if let Some(path) = &options.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(report)
}

pub fn render(report: &FsBenchReport) -> String {
    let phase_rows: Vec<Vec<String>> = report
        .phases
        .iter()
        .map(|phase| {
            let times = ratio(phase.mount_ms, phase.local_ms);
            vec![
                phase.phase.to_string(),
                phase.operations.to_string(),
                format!("{:.1}", phase.local_ms),
                format!("{:.1}", phase.mount_ms),
                format!("{times:.2}x"),
                if times <= 3.0 { "yes".into() } else { "NO".into() },
                format!("{:.1}", phase.fuse_floor_ms),
                format!("{:.2}x", ratio(phase.fuse_floor_ms, phase.local_ms)),
                format!("{:.2}x", ratio(phase.mount_ms, phase.fuse_floor_ms)),
            ]
        })
        .collect();
    let scaling_rows: Vec<Vec<String>> = report
        .scaling
        .iter()
        .map(|row| {
            vec![
                row.workstations.to_string(),
                row.operations.to_string(),
                format!("{:.0}", row.wall_ms),
                format!("{:.4}", row.lock_messages_per_op),
                format!("{:.4}", row.revokes_per_op),
                format!("{:.4}", row.storage_round_trips_per_op),
            ]
        })
        .collect();
    let contention_rows: Vec<Vec<String>> = report
        .contention
        .iter()
        .map(|row| {
            vec![
                row.case.to_string(),
                row.operations.to_string(),
                format!("{:.0}", row.operations_per_second),
                format!("{:.3}", row.revokes_per_op),
            ]
        })
        .collect();
    let spread = |values: Vec<f64>| {
        let (low, high) =
            values.iter().fold((f64::MAX, 0.0f64), |(low, high), value| (low.min(*value), high.max(*value)));
        if low > 0.0 { (high / low - 1.0) * 100.0 } else { 0.0 }
    };
    let messages_spread = spread(report.scaling.iter().map(|row| row.lock_messages_per_op).collect());
    let storage_spread = spread(report.scaling.iter().map(|row| row.storage_round_trips_per_op).collect());
    let revokes: f64 = report.scaling.iter().map(|row| row.revokes_per_op).sum();
    format!(
        "Modified Andrew, {} files: FUSE mount (workstation 0) against a local directory, same run; \
         the FUSE floor is an in-memory FUSE file system (no locks, no storage, everything cached)\n{}\n\
         Scaling: each workstation in its own directory, same workload, at once (in process, file-system API)\n{}\n\
         spread from 1 to {} workstations: lock messages/op {messages_spread:.1}%, storage round trips/op {storage_spread:.1}% (target within 5%), revokes/op total {revokes:.4} (target 0)\n\n\
         Contention (F97 §9.3 cases)\n{}",
        report.files,
        render_table(
            &["phase", "ops", "local ms", "mount ms", "mount/local", "<= 3x", "floor ms", "floor/local", "mount/floor"],
            &phase_rows
        ),
        render_table(
            &["workstations", "ops", "wall ms", "lock msgs/op", "revokes/op", "storage RTs/op"],
            &scaling_rows
        ),
        report.scaling.len(),
        render_table(&["case", "ops", "ops/s", "revokes/op"], &contention_rows),
    )
}
