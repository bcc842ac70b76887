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
//! - [`registry`]: what a single server keeps on disk so that a restart is
//!   safe (leases, last epoch, generation); clerks reclaim their locks.
//! - [`wire`]: the messages as frames (kinds 32–46 of the kit's framing).
//! - [`sim`]: a seeded simulation of a server and clerks over a lossy,
//!   reordering network with crashes and lease expiries, checking safety and
//!   liveness after every event.
//!
//! Fencing itself happens in storage: the embedder's [`Fencer`] seals a dead
//! epoch on the block volume (`storage_node::block_client`).
//!
//! Lock-server failure: mode 1 is a single server that restarts from its
//! [`registry`] while clerks reclaim their locks; mode 2 ([`replicated`]) is
//! three servers whose whole state is replicated with `openraft`.

pub mod clerk;
pub mod net;
pub mod protocol;
pub mod registry;
pub mod replicated;
pub mod server;
pub mod sim;
pub mod wire;

pub use clerk::{Acquire, ClerkConfig, ClerkCore, ClerkOutput};
pub use net::{Clerk, ClerkError, ClerkStats, Fencer, LockGuard, LockServer, Workstation};
pub use protocol::{ClerkId, FencingToken, LeaseEpoch, LockName, LockTable, Mode, ToClerk, ToServer};
pub use registry::{FileRegistryStore, MemoryRegistryStore, RegistryStore, ServerRegistry};
pub use replicated::{BoundReplica, ReplicatedLockServer};
pub use server::{LockServerCore, ServerConfig, ServerOutput};
