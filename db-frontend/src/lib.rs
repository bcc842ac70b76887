//! # db-frontend: the database side of the Aurora protocol
//!
//! Today this crate holds the *volume writer*: the single owner of the log.
//! It allocates LSNs, ships each redo record to the six segments of its
//! protection group, follows their SCLs from the acknowledgements, and from
//! them advances PGCL (4 of 6), VCL (everything at or below is complete) and
//! VDL (the highest consistency point at or below VCL). Commits complete
//! asynchronously when VDL reaches them. Pages are read from a single segment
//! known to be complete at the read point, hedged to a second one when slow.
//!
//! - [`volume::geometry`]: PGs, segment placement over AZs, page-to-PG mapping.
//! - [`volume::quorum`]: PGCL/VCL/VDL tracking, a pure state machine.
//! - [`volume::writer`]: LSN allocation, backlinks, batching, retransmission,
//!   read-target choice, commit bookkeeping, all pure.
//! - [`volume::client`]: the tokio driver that connects the writer to the nodes.
//!
//! The SQL engine, B-tree, replicas and recovery arrive with later issues.

pub mod engine;
pub mod sql;
pub mod volume;

pub use volume::client::{VolumeClient, VolumeConfig, VolumeError};
pub use volume::geometry::{ClusterConfig, NodeSpec, VolumeGeometry};
