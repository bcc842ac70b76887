//! # frangipani: the file system over the shared block volume (being built)
//!
//! Frangipani (F97) on this kit: workstations with coherent write-back
//! caches driven by the lock service, each with its own write-ahead log in
//! the shared storage, over the block volume of `storage_node::block_client`
//! (which already refuses writes of fenced leases).
//!
//! Built so far:
//! - [`layout`]: the on-disk layout (parameter block, per-workstation logs,
//!   bitmap portions, 512-byte inodes, small and large blocks), drawn in
//!   `docs/frangipani-layout.md`.
//! - [`inode`]: the 512-byte inode (version, kind, permissions, times, 16
//!   small-block pointers, 37 large-block pointers and one indirect large
//!   block; a symbolic link's target inline) and where each file byte lives.
//! - [`bitmap`]: a bitmap portion: allocate the lowest free bit, free one.
//! - [`directory`]: a directory block (versioned entries: name, inode, kind).
//! - [`metadata`]: how a logged update (a byte span and a version) changes
//!   a framed block (inode, directory) or a raw one (bitmap), and the record
//!   that takes a block from one image to the next.
//! - [`wal`]: the metadata write-ahead log as pure data structures: log
//!   blocks with sequence numbers, the end found where they stop growing,
//!   reclaiming the oldest quarter after write-back, and replay by version.
//!
//! Not built yet (issue #6 continues): the workstation that drives the log against the block volume, the cache,
//! the recovery demon, the FUSE mount, fsck and `lab bench fs`.

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
