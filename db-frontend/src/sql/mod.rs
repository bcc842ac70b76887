//! # The SQL engine
//!
//! A small PostgreSQL-compatible SQL front end over the [`kv::KvStore`]
//! interface, built like toyDB: each statement goes
//!
//! ```text
//! text --sqlparser--> AST --plan--> Plan --exec--> Outcome --server--> wire
//! ```
//!
//! - [`kv`]: the storage interface (ordered trees of bytes, transactions)
//!   and [`kv::MemoryKv`], the in-memory reference store.
//! - [`types`]: column types (INT, BIGINT, TEXT, BOOL), values, schemas.
//! - [`encoding`]: memcomparable keys, versioned row records, catalog
//!   records (byte by byte in `docs/sql-format.md`).
//! - [`catalog`]: table schemas, kept in [`kv::CATALOG_TREE`].
//! - [`plan`]: AST to a type-checked [`plan::Plan`], choosing a key
//!   lookup, a key range or a full scan. Pure.
//! - [`expr`]: resolved expressions and their evaluation.
//! - [`exec`]: runs a plan inside one transaction.
//! - [`session`]: a client's statements and transaction block state.
//! - [`server`]: the PostgreSQL wire protocol (simple and extended query,
//!   trust or SCRAM-SHA-256) via `pgwire`.
//! - [`pgbench`]: builds pgbench's tables for a scale factor.
//!
//! ## Single-writer design
//!
//! The store runs transactions one at a time, so the engine needs no
//! locks, no MVCC and no conflict detection: every schedule is serial,
//! hence serializable. `SHOW transaction_isolation` says `serializable`.
//! The price is concurrency: a session inside `BEGIN` holds the store
//! until `COMMIT` or `ROLLBACK`, and other sessions' statements wait.
//! Commit releases the store before durability (early lock release, see
//! [`kv`]), so waiting is for execution, not for the log.

pub mod catalog;
pub mod encoding;
pub mod error;
pub mod exec;
pub mod expr;
pub mod kv;
pub mod pgbench;
pub mod plan;
pub mod server;
pub mod session;
pub mod types;

/// What `SHOW server_version` reports: recent enough that clients use
/// modern protocol features.
pub const SERVER_VERSION: &str = "15.0";
/// What `SELECT version()` reports.
pub const VERSION_TEXT: &str = "PostgreSQL 15.0 (aurora-lab SQL engine over a KvStore)";
