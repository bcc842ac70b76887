//! # common: what every crate of the kit agrees on
//!
//! This crate holds the small set of definitions that the storage nodes, the
//! database front end and (later) the lock service and Frangipani share:
//!
//! - [`ids`]: newtypes for every id and position (`Lsn`, `PgId`, `PageId`,
//!   `NodeId`, `Epoch`, ...). No bare `u64` crosses a crate boundary.
//! - [`limits`]: every limit of the system, named once. Inputs are checked
//!   against these on arrival; nothing is unbounded.
//! - [`frame`]: the versioned, CRC32C-checked wire frame (drawn byte by byte in
//!   `docs/wire-format.md`). Codecs only parse bytes; they never panic on input.
//! - [`redo`]: the redo record, the unit of the Aurora log, with its backlinks
//!   (previous LSN in the volume, in the segment, for the page) and its own
//!   CRC32C that travels from the writer to the disk and back.
//! - [`message`]: the storage protocol messages carried inside frames.
//! - [`transport`]: a connection abstraction with a TCP implementation and an
//!   in-memory one that can drop, duplicate, reorder, delay and partition under
//!   a seeded RNG.
//! - [`slotted`]: the slotted page of the SQL engine's B-tree and its
//!   physical-logical redo ops ("insert this cell at slot k"), applied
//!   byte-identically by the front end's cache and by the segments.
//! - [`rng`]: a tiny deterministic RNG so that every simulation replays from a
//!   seed, independent of any external crate's algorithm changes.
//!
//! Invariants kept here:
//! - Every encoded frame and record carries a CRC32C; a decoder that sees a bad
//!   checksum, a wrong version, an unknown kind or an oversized length returns
//!   an error and never a value.
//! - Little-endian, fixed-width fields everywhere; no varints, so the formats
//!   can be drawn byte by byte.

pub mod block_message;
pub mod codec;
pub mod frame;
pub mod ids;
pub mod limits;
pub mod message;
pub mod redo;
pub mod rng;
pub mod slotted;
pub mod transport;

pub use ids::*;
