//! # frangipani (not built yet)
//!
//! The Frangipani file system over the shared block volume, with coherent
//! write-back caches, per-workstation WALs and recovery. Its design is issue
//! #6; this crate is an empty placeholder in the workspace layout until then.
//! Nothing here is claimed to work.
