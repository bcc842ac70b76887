//! The shared disk a workstation writes: the block volume of
//! `storage_node::block_client` (Petal's role), or an in-memory one with the
//! same rules for unit tests.
//!
//! Every write carries the block's version and a [`Stamp`]: the writer's
//! lease epoch and a fencing token. The device refuses a write of a fenced
//! epoch, and one whose token is older than the newest it holds for the
//! block; a read returns the newest version by `(token, version)`.

use bytes::Bytes;
use common::ids::BlockId;
use common::transport::BoxFuture;
use parking_lot::Mutex;
use std::collections::{BTreeSet, HashMap};
use std::fmt;
use storage_node::block_client::{BlockClient, BlockError};
use thiserror::Error;

/// Who writes: the lease the write is made under, and the highest fencing
/// token the workstation holds (tokens are one server-wide sequence, so a
/// later holder of any lock covering the block stamps higher).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    pub epoch: u64,
    pub token: u64,
}

/// A block as the device holds it; `data` is empty if it was never written.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stored {
    pub version: u64,
    /// The lease epoch of the write that made this version.
    pub lease_epoch: u64,
    pub data: Vec<u8>,
}

/// Why the device refused.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum DeviceError {
    /// The writer's lease was fenced: it must stop writing.
    #[error("fenced: {0}")]
    Fenced(String),
    /// A later lock holder wrote the block already.
    #[error("stale fencing token: {0}")]
    Stale(String),
    #[error("storage: {0}")]
    Io(String),
}

/// A block store shared by every workstation.
pub trait BlockDevice: Send + Sync + fmt::Debug {
    fn read(&self, block: u64) -> BoxFuture<'_, Result<Stored, DeviceError>>;
    fn write(&self, block: u64, version: u64, stamp: Stamp, data: Vec<u8>) -> BoxFuture<'_, Result<(), DeviceError>>;
}

impl From<BlockError> for DeviceError {
    fn from(error: BlockError) -> Self {
        match error {
            BlockError::Fenced { .. } => DeviceError::Fenced(error.to_string()),
            BlockError::StaleToken { .. } => DeviceError::Stale(error.to_string()),
            other => DeviceError::Io(other.to_string()),
        }
    }
}

impl BlockDevice for BlockClient {
    fn read(&self, block: u64) -> BoxFuture<'_, Result<Stored, DeviceError>> {
        Box::pin(async move {
            let read = BlockClient::read(self, BlockId(block)).await?;
            Ok(Stored { version: read.version, lease_epoch: read.lease_epoch, data: read.data.to_vec() })
        })
    }

    fn write(&self, block: u64, version: u64, stamp: Stamp, data: Vec<u8>) -> BoxFuture<'_, Result<(), DeviceError>> {
        Box::pin(async move {
            BlockClient::write(self, BlockId(block), version, stamp.epoch, stamp.token, Bytes::from(data)).await?;
            Ok(())
        })
    }
}

/// A block's newest `(token, version)`, the epoch that wrote it, and its bytes.
type MemoryBlock = ((u64, u64), u64, Vec<u8>);

#[derive(Debug, Default)]
struct MemoryBlocks {
    blocks: HashMap<u64, MemoryBlock>,
    fenced: BTreeSet<u64>,
}

/// A block device in memory, with the block volume's rules (fenced epochs,
/// stale tokens, newest by `(token, version)`), for unit tests.
#[derive(Debug, Default)]
pub struct MemoryDevice {
    inner: Mutex<MemoryBlocks>,
}

impl MemoryDevice {
    /// Refuses every later write of `epoch` (what the lock service's fencer does).
    pub fn fence(&self, epoch: u64) {
        self.inner.lock().fenced.insert(epoch);
    }
}

impl BlockDevice for MemoryDevice {
    fn read(&self, block: u64) -> BoxFuture<'_, Result<Stored, DeviceError>> {
        let stored = self.inner.lock().blocks.get(&block).map(|((_, version), epoch, data)| Stored {
            version: *version,
            lease_epoch: *epoch,
            data: data.clone(),
        });
        Box::pin(async move { Ok(stored.unwrap_or_default()) })
    }

    fn write(&self, block: u64, version: u64, stamp: Stamp, data: Vec<u8>) -> BoxFuture<'_, Result<(), DeviceError>> {
        let mut inner = self.inner.lock();
        let result = if inner.fenced.contains(&stamp.epoch) {
            Err(DeviceError::Fenced(format!("epoch {} is fenced", stamp.epoch)))
        } else {
            let key = (stamp.token, version);
            match inner.blocks.get(&block) {
                Some(((token, _), _, _)) if stamp.token < *token => {
                    Err(DeviceError::Stale(format!("block {block}: token {} < {token}", stamp.token)))
                }
                Some((held, _, _)) if key <= *held => Ok(()), // a repeat, or an older version: no change
                _ => {
                    inner.blocks.insert(block, (key, stamp.epoch, data));
                    Ok(())
                }
            }
        };
        Box::pin(async move { result })
    }
}
