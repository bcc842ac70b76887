//! # frangipani: the file system over the shared block volume
//!
//! Frangipani (F97) on this kit: workstations with coherent write-back
//! caches driven by the lock service, each with its own write-ahead log in
//! the shared storage, over the block volume of `storage_node::block_client`
//! (which refuses writes of fenced leases and stale fencing tokens).
//!
//! - [`layout`], [`inode`], [`directory`], [`bitmap`]: the on-disk formats,
//!   drawn in `docs/frangipani-layout.md`.
//! - [`wal`]: the metadata log as pure data structures: log blocks with
//!   sequence numbers, the end found where they stop growing, reclaiming
//!   the oldest quarter after write-back, and replay by version.
//! - [`metadata`]: how a logged update changes a metadata block, and the
//!   records between two images.
//! - [`device`]: the block device a workstation writes (the block volume,
//!   or an in-memory one for tests).
//! - [`fs`]: the workstation: file-system operations under locks, the
//!   cache, the log writer, write-back, revokes, the recovery demon.
//! - [`fsck`]: the offline check of a whole volume.
//! - [`fuse`]: the FUSE mount (`fuser`).

pub mod bitmap;
pub mod device;
pub mod directory;
pub mod fs;
pub mod fsck;
pub mod fuse;
pub mod inode;
pub mod layout;
pub mod metadata;
pub mod wal;
