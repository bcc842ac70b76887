//! # storage-node: Aurora-style segments behind a small server
//!
//! A storage node hosts *segments*: each is one of the six replicas of a
//! protection group (PG). The front end sends only redo records; a segment
//!
//! 1. validates and queues them, and persists them with one write and one
//!    fdatasync per batch (group commit), then acknowledges with its
//!    *segment complete LSN* (SCL): the highest LSN below which its segment
//!    chain (records linked by their `prev_segment_lsn` backlinks) has no hole;
//! 2. in the background, coalesces long page chains into new page versions
//!    (never above the writer's VDL), garbage-collects versions below the
//!    minimum read point (PGMRPL), and cleans old log files;
//! 3. serves a page as of a read point in `[PGMRPL, SCL]` by applying the
//!    page's redo chain to its newest version at or below that point. Pages
//!    are never built eagerly.
//!
//! A restarted node rebuilds every segment from its log. CRC32C on every
//! entry and record separates a torn tail (truncated) from corruption in the
//! middle (kept visible as a hole below which the segment still serves, and
//! flagged as needing repair).
//!
//! Layout:
//! - [`segment`]: the segment as a pure state machine (no I/O, no clock).
//! - [`page_index`]: the dense page -> chain index a segment keeps.
//! - [`log_format`]: the on-disk log format and the recovery scan.
//! - [`disk`]: the `LogDisk` trait with std-file, io_uring and memory backends.
//! - [`node`]: the tokio driver that connects cores to the network and disks.
//!
//! On-disk format: `docs/segment-log-format.md`. Wire format: `docs/wire-format.md`.

pub mod block_client;
pub mod block_segment;
pub mod disk;
pub mod log_format;
pub mod node;
pub mod page_index;
pub mod segment;

pub use disk::DiskBackend;
pub use node::{NodeConfig, NodeError, StorageNode};
pub use segment::{SegmentConfig, SegmentCore};
