//! # lockserver (not built yet)
//!
//! The Frangipani lock service: shared/exclusive locks with request, grant,
//! revoke, release, leases and fencing. Its design is issue #3; this crate is
//! an empty placeholder in the workspace layout until then. Nothing here is
//! claimed to work.
