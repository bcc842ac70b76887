//! # lab: the research kit's command line, as a library
//!
//! The `lab` binary (`src/main.rs`) is a thin clap front end over these
//! modules, which the integration tests in `tests/` use too:
//!
//! - [`cluster`]: an in-process cluster of storage nodes on loopback, with
//!   kill/restart and per-node injected delay.
//! - [`bench`]: `lab bench quorum-write` and `lab bench locks`, their
//!   baselines, and the table/JSON/SVG reports.
//! - [`alloc_count`]: the counting allocator behind memory figures.
//! - [`demo`]: `lab demo`, the guided tour of a running cluster.
//! - [`locks`]: `lab locks sim`, the lock service's seeded simulation.
//! - [`fs`]: `lab fs serve`, `lab fs mount` and `lab fs fsck`: the Frangipani
//!   file system on the block volume, mounted with FUSE.
//! - [`fs_crash`]: `lab fs crash-test`, kill -9 at seeded points.
//! - [`sim`]: `lab sim`, the seeded simulation of the redo protocol.
//! - [`procs`]: the process shape: cluster files, `lab node storage` and
//!   `lab node writer`, and a cluster of node processes to kill.
//! - [`crash`]: `lab crash SCENARIO`, crash experiments on real processes.

pub mod alloc_count;
pub mod bench;
pub mod cluster;
pub mod crash;
pub mod demo;
pub mod fs;
pub mod fs_crash;
pub mod locks;
pub mod procs;
pub mod sim;
pub mod sql;

/// Writes `contents` to `path` through a temporary file and a rename, so a
/// reader (another `lab` process) never sees half a file.
pub(crate) fn write_atomically(path: &std::path::Path, contents: &str) -> anyhow::Result<()> {
    use anyhow::Context;
    let temporary = path.with_extension("tmp");
    std::fs::write(&temporary, contents).with_context(|| format!("writing {}", temporary.display()))?;
    std::fs::rename(&temporary, path).with_context(|| format!("renaming onto {}", path.display()))
}
