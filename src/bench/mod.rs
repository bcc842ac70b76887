//! `lab bench`: measurements with their baselines taken in the same run.

pub mod baselines;
pub mod etcd;
pub mod fs;
pub mod fuse_floor;
pub mod locks;
pub mod pgbench;
pub mod quorum_write;
pub mod replica_lag;
pub mod report;
