//! Where a segment's log lives: the [`LogDisk`] trait and its backends.
//!
//! - [`StdFileDisk`]: one worker thread per segment doing `pwrite` + `fdatasync`.
//! - [`UringDisk`]: one io_uring per node; each log write is a `write` SQE
//!   linked to an `fsync(DATASYNC)` SQE, so many segments' writes and flushes
//!   are in flight at once from a single thread.
//! - [`MemoryDisk`]: the durable image in memory; tests tear a write
//!   (`crash_during`) or flip bits (`corrupt`) to model power loss and bit
//!   rot. Used by tests and `--disk memory`.
//!
//! Log files are preallocated by writing zeros once (a later fdatasync then
//! flushes only data, not the file size), and the next file is prepared in
//! the background, paced, once the log passes a quarter of the current one.

mod files;
mod memory;
mod std_file;
mod uring;

pub use files::LogFiles;
pub use memory::{MemoryDisk, MemoryVolumeStore};
pub use std_file::StdFileDisk;
pub use uring::{UringDisk, UringRing};

use crate::log_format::LogPosition;
use crate::segment::LogWrite;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::io;

/// Called when a submitted write is durable (or failed), from any thread.
pub type WriteDone = Box<dyn FnOnce(io::Result<()>) + Send>;

/// The durable home of one segment's log.
pub trait LogDisk: Send + Sync + std::fmt::Debug {
    /// Every log file, in file-number order, as it is on the durable medium.
    fn read_all(&self) -> io::Result<Vec<(u64, Bytes)>>;
    /// Writes then fdatasyncs. Returns `Some(result)` if it completed before
    /// returning (then `done` is dropped uncalled), `None` if `done` will be
    /// called later.
    fn write_durable(&self, write: LogWrite, done: WriteDone) -> Option<io::Result<()>>;
    /// Durably zeroes `length` bytes at `position` (a truncated tail).
    fn zero(&self, position: LogPosition, length: u64) -> io::Result<()>;
    /// Removes a log file that holds nothing live.
    fn delete_file(&self, file: u64) -> io::Result<()>;
}

/// Which backend a node's segments use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiskBackend {
    /// Plain `std::fs` files with a worker thread per segment.
    #[default]
    Std,
    /// io_uring, one ring per node.
    IoUring,
    /// In memory, no fdatasync: isolates protocol and network costs.
    Memory,
}

impl std::str::FromStr for DiskBackend {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "std" => Ok(DiskBackend::Std),
            "io-uring" | "uring" => Ok(DiskBackend::IoUring),
            "memory" => Ok(DiskBackend::Memory),
            other => Err(format!("unknown disk backend {other:?}: expected std, io-uring or memory")),
        }
    }
}
