//! The volume writer and reader.

pub mod client;
pub mod geometry;
pub mod quorum;
pub mod recovery;
pub mod writer;
