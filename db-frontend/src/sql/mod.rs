//! The SQL engine: statements parsed with `sqlparser`, run over a
//! [`kv::KvStore`], served over the PostgreSQL wire protocol.

pub mod kv;
