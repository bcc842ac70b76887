//! # lockserver: Frangipani's lock service
//!
//! Multiple-reader / single-writer locks with request, grant, revoke and
//! release, leases, and the dead-clerk sequence that closes the paper's
//! "lease margin" hole: expire, fence the epoch in storage, recover the dead
//! clerk's log under a recovery assignment, and only then release its locks.
//!
//! Layout:
//! - [`protocol`]: names, modes, lease epochs, fencing tokens and messages.
//! - [`server`]: the lock server as a pure state machine.
//! - [`clerk`]: a workstation's clerk as a pure state machine (sticky
//!   locks, flush-before-release, its own view of the lease).
//! - [`net`]: the tokio drivers, `LockServer` and `Clerk`, over the kit's
//!   transport.
//! - [`wire`]: the messages as frames (kinds 32–45 of the kit's framing).
//! - [`sim`]: a seeded simulation of a server and clerks over a lossy,
//!   reordering network with crashes and lease expiries, checking safety and
//!   liveness after every event.
//!
//! Not built yet (issue #3 continues): fencing inside the storage nodes, server restart with a reclaim grace
//! period, the replicated (openraft) mode, and `lab bench locks`.

pub mod clerk;
pub mod net;
pub mod protocol;
pub mod server;
pub mod sim;
pub mod wire;

pub use clerk::{Acquire, ClerkConfig, ClerkCore, ClerkOutput};
pub use net::{Clerk, ClerkError, Fencer, LockGuard, LockServer, Workstation};
pub use protocol::{ClerkId, FencingToken, LeaseEpoch, LockName, LockTable, Mode, ToClerk, ToServer};
pub use server::{LockServerCore, ServerConfig, ServerOutput};
