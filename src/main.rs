//! `lab`: run, measure and break an Aurora-style storage cluster.

use anyhow::Result;
use clap::{Parser, Subcommand};
use lab::bench::fs::{self as fs_bench, FsBenchOptions};
use lab::bench::locks::{self as lock_bench, LocksOptions};
use lab::bench::pgbench::{self as pgbench_bench, PgbenchOptions};
use lab::bench::quorum_write::{self, QuorumWriteOptions};
use lab::bench::replica_lag::{self, ReplicaLagOptions};
use lab::crash::{self, CrashOptions as RedoCrashOptions};
use lab::demo::{self, DemoOptions};
use lab::fs::{self as lab_fs, FsckOptions, MountOptions, ServeOptions};
use lab::fs_crash::{self, CrashOptions};
use lab::locks::{self, SimOptions};
use lab::procs::{self, StorageNodeOptions, WriterOptions};
use lab::sim::{self as redo_sim, SimOptions as RedoSimOptions};
use lab::sql::{self as lab_sql, SqlOptions, UpOptions};

#[derive(Debug, Parser)]
#[command(
    name = "lab",
    version,
    about = "Research kit for Aurora-style shared storage and Frangipani-style locks",
    long_about = "Research kit for Aurora-style shared storage: six storage nodes taking log-only writes \
                  durable on 4 of 6 segment replicas, and the volume writer that owns the log.\n\n\
                  Set RUST_LOG (for example RUST_LOG=info) to see what the nodes and the writer do."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start an in-process cluster, load it, kill and restart two nodes, verify (under a minute).
    Demo(DemoOptions),
    /// Benchmarks, each with its baselines measured in the same run.
    #[command(subcommand)]
    Bench(Bench),
    /// The Frangipani lock service.
    #[command(subcommand)]
    Locks(Locks),
    /// The Frangipani file system: serve a volume, mount it with FUSE, check it.
    #[command(subcommand)]
    Fs(Fs),
    /// Seeded simulation of the redo protocol: the real recovery, writer and segment cores
    /// (gossip and repair too) over a lossy, reordering network and disks that lose unsynced
    /// writes, with node crashes, partitions, AZ+1 outages, front-end crashes and zombies;
    /// checks the invariants after every event. A failing seed prints itself and replays
    /// exactly with --seed S.
    Sim(RedoSimOptions),
    /// Crash experiments on a cluster of real processes on loopback (kill -9, slow links,
    /// flipped bytes): a timeline, the invariants checked, recovery times, data verified.
    /// Exits 1 if an invariant does not hold.
    Crash(RedoCrashOptions),
    /// Keep a cluster serving SQL over the PostgreSQL wire protocol (with read replicas
    /// if asked), print the psql command, and serve until Ctrl-C.
    Up(UpOptions),
    /// Run SQL against a running `lab up` (-c "..."), or fill the pgbench tables.
    Sql(SqlOptions),
    /// Run one role of a cluster as its own process (what `lab crash` starts).
    #[command(subcommand)]
    Node(Node),
}

#[derive(Debug, Subcommand)]
enum Node {
    /// Serve one storage node of a cluster file until killed.
    Storage(StorageNodeOptions),
    /// Recover the volume of a cluster file, then run a write load; prints `ready`, then one
    /// `ack WRITER VALUE` line per acknowledged commit.
    Writer(WriterOptions),
}

#[derive(Debug, Subcommand)]
enum Fs {
    /// Start six storage nodes with a block volume and a lock server; format the file system
    /// on first use; write the volume file that mounts read. Runs until Ctrl-C.
    Serve(ServeOptions),
    /// Mount the volume on a directory as one workstation (a coherent write-back cache and its
    /// own log). Several mounts, from separate processes, share the volume. Runs until the
    /// directory is unmounted or the process gets SIGINT/SIGTERM. Needs root and /dev/fuse.
    Mount(MountOptions),
    /// Check the whole volume offline (no mounts writing): dangling entries, link counts,
    /// orphan and doubly used blocks. Exits 1 if it finds any inconsistency.
    Fsck(FsckOptions),
    /// Kill -9 a mounted workstation at seeded points in a metadata workload; after each, the
    /// other workstation takes over once the lease lapses, everything fsynced must be there,
    /// and fsck must find the volume clean. Needs root and /dev/fuse.
    CrashTest(CrashOptions),
}

#[derive(Debug, Subcommand)]
enum Locks {
    /// Seeded simulation of a lock server and clerks over a lossy, reordering network with
    /// crashes and lease expiries; checks safety, fencing and liveness after every event.
    /// A failing seed replays exactly with --seed S --log.
    Sim(SimOptions),
}

#[derive(Debug, Subcommand)]
enum Bench {
    /// Commit latency of redo records on a six-node loopback cluster, against the
    /// one-disk fdatasync floors: (a) one fdatasync, (b) the 4th of six concurrent ones.
    QuorumWrite(QuorumWriteOptions),
    /// Lock service costs against a loopback round trip: cached and cold acquires, revoke
    /// ping-pong, throughput of N clerks, and server memory per lock and per clerk.
    Locks(LocksOptions),
    /// Modified-Andrew phases on a FUSE mount against a local directory (same run), scaling
    /// from 1 to 4 workstations (lock messages, revokes, storage round trips per operation),
    /// and the contention cases. Needs root and /dev/fuse.
    Fs(FsBenchOptions),
    /// How far read replicas trail the writer: lag p50/p99 (commit record logged to
    /// visible on the replica) at each target write rate.
    ReplicaLag(ReplicaLagOptions),
    /// pgbench side by side against (a) this kit, (b) PostgreSQL 15 with 5 streaming standbys
    /// and synchronous_standby_names = 'ANY 3 (...)', (c) PostgreSQL alone: tps, average and
    /// p99 latency, loopback bytes per transaction. Needs PostgreSQL 15 installed.
    Pgbench(PgbenchOptions),
}

/// Counts heap bytes only while a memory figure is being measured.
#[global_allocator]
static ALLOCATOR: lab::alloc_count::CountingAllocator = lab::alloc_count::CountingAllocator;

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        match cli.command {
            Command::Demo(options) => demo::run(options).await,
            Command::Up(options) => lab_sql::up(options).await,
            Command::Sql(options) => lab_sql::sql(options).await,
            Command::Locks(Locks::Sim(options)) => locks::run(&options),
            Command::Sim(options) => redo_sim::run(&options),
            Command::Node(Node::Storage(options)) => procs::run_storage_node(options).await,
            Command::Node(Node::Writer(options)) => procs::run_writer(options).await,
            Command::Crash(options) => {
                let report = crash::run(options, &std::env::current_exe()?).await?;
                println!("{}", crash::render(&report));
                anyhow::ensure!(report.all_held(), "an invariant did not hold");
                Ok(())
            }
            Command::Fs(Fs::Serve(options)) => lab_fs::serve(options).await,
            Command::Fs(Fs::Mount(options)) => lab_fs::mount(options).await,
            Command::Fs(Fs::Fsck(options)) => lab_fs::fsck(options).await,
            Command::Fs(Fs::CrashTest(options)) => {
                let lab = std::env::current_exe()?;
                let report = tokio::task::spawn_blocking(move || {
                    fs_crash::run(&options, &lab, |point| {
                        eprintln!(
                            "point {:>3}: {:>2} operations, {:>2} fsynced, {:>2} survived, takeover {:>5.0} ms",
                            point.point,
                            point.operations,
                            point.synced_operations,
                            point.survived_prefix,
                            point.takeover_ms
                        )
                    })
                })
                .await??;
                println!("{}", fs_crash::render(&report));
                Ok(())
            }
            Command::Bench(Bench::Locks(options)) => {
                let report = lock_bench::run(options).await?;
                println!("{}", lock_bench::render(&report));
                if let Some(path) = &report.options.json {
                    println!("JSON: {}", path.display());
                }
                Ok(())
            }
            Command::Bench(Bench::Fs(options)) => {
                let json = options.json.clone();
                let report = fs_bench::run(options, &std::env::current_exe()?).await?;
                println!("{}", fs_bench::render(&report));
                if let Some(path) = json {
                    println!("JSON: {}", path.display());
                }
                Ok(())
            }
            Command::Bench(Bench::Pgbench(options)) => {
                let report = pgbench_bench::run_bench(options).await?;
                println!("{}", pgbench_bench::render(&report));
                if let Some(path) = &report.options.json {
                    println!("JSON: {}", path.display());
                }
                Ok(())
            }
            Command::Bench(Bench::ReplicaLag(options)) => {
                let report = replica_lag::run(options).await?;
                println!("{}", replica_lag::render(&report));
                if let Some(path) = &report.options.json {
                    println!("JSON: {}", path.display());
                }
                Ok(())
            }
            Command::Bench(Bench::QuorumWrite(options)) => {
                let report = quorum_write::run(options).await?;
                println!("{}", quorum_write::render(&report));
                if let Some(path) = &report.options.json {
                    println!("JSON: {}", path.display());
                }
                if let Some(path) = &report.options.plot {
                    println!("plot: {}", path.display());
                }
                Ok(())
            }
        }
    })
}
