//! What a single lock server keeps on disk, so that a restart is safe.
//!
//! Locks themselves are not kept: after a restart the clerks reclaim the
//! locks they hold (NFSv4's grace period, the first design of F97 §6). What
//! the new server must know is only what it cannot learn from them:
//! - every lease a clerk may still hold, or whose log may still need replay
//!   (so a clerk that does not come back is fenced and recovered, not
//!   forgotten);
//! - the last lease epoch handed out (epochs are never reused: storage
//!   refuses fenced ones forever);
//! - the server generation, which makes every fencing token of the new
//!   server larger than every token of the old one (storage refuses older
//!   tokens per block).
//!
//! [`crate::server::ServerOutput::Persist`] carries a whole registry; the
//! driver must make it durable before it carries out the outputs after it.
//!
//! ## On disk (`registry`, replaced atomically)
//! ```text
//! offset  size  field
//!      0     4  magic "LKSR"
//!      4     4  version (1)
//!      8     8  generation
//!     16     8  last_epoch
//!     24     4  lease count n
//!     28     4  crc32c over bytes 0..28 and the leases
//!     32  32×n  leases: epoch u64, clerk u64, attempt u64, flags u64
//!               (flags bit 0: expired, its fence and recovery pending)
//! ```

use crate::protocol::{ClerkId, LeaseEpoch};
use bytes::{BufMut, BytesMut};
use common::codec::Reader;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

const MAGIC: [u8; 4] = *b"LKSR";
const VERSION: u32 = 1;
const HEADER_BYTES: usize = 32;
const LEASE_BYTES: usize = 32;
const LEASE_EXPIRED: u64 = 1;
/// Fencing tokens of generation `g` are `g << TOKEN_GENERATION_SHIFT` and up.
pub const TOKEN_GENERATION_SHIFT: u32 = 40;

/// A lease the server knows of: live, or dead and not yet recovered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisteredLease {
    pub epoch: LeaseEpoch,
    pub clerk: ClerkId,
    /// The opening attempt it answered (a lower one is a delayed message).
    pub attempt: u64,
    /// Expired: a restart fences and recovers it instead of waiting for a
    /// reclaim.
    pub expired: bool,
}

/// The durable state of a lock server.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerRegistry {
    pub generation: u64,
    pub last_epoch: u64,
    pub leases: Vec<RegisteredLease>,
}

impl ServerRegistry {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = BytesMut::with_capacity(HEADER_BYTES + LEASE_BYTES * self.leases.len());
        out.put_slice(&MAGIC);
        out.put_u32_le(VERSION);
        out.put_u64_le(self.generation);
        out.put_u64_le(self.last_epoch);
        out.put_u32_le(self.leases.len() as u32);
        out.put_u32_le(0);
        for lease in &self.leases {
            out.put_u64_le(lease.epoch.0);
            out.put_u64_le(lease.clerk.0);
            out.put_u64_le(lease.attempt);
            out.put_u64_le(if lease.expired { LEASE_EXPIRED } else { 0 });
        }
        let checksum = crc32c::crc32c_append(crc32c::crc32c(&out[..28]), &out[HEADER_BYTES..]);
        out[28..32].copy_from_slice(&checksum.to_le_bytes());
        out.to_vec()
    }

    pub fn decode(bytes: &[u8]) -> Result<ServerRegistry, String> {
        if bytes.len() < HEADER_BYTES || bytes[..4] != MAGIC {
            return Err("not a lock server registry (bad magic or too short)".into());
        }
        let mut reader = Reader::new(&bytes[4..]);
        let read = |result: Result<u64, common::codec::CodecError>| result.map_err(|error| error.to_string());
        let version = reader.u32().map_err(|error| error.to_string())?;
        if version != VERSION {
            return Err(format!("registry version {version}, this build reads {VERSION}"));
        }
        let generation = read(reader.u64())?;
        let last_epoch = read(reader.u64())?;
        let count = reader.u32().map_err(|error| error.to_string())? as usize;
        let stored = reader.u32().map_err(|error| error.to_string())?;
        if bytes.len() != HEADER_BYTES + count * LEASE_BYTES {
            return Err(format!("registry of {} bytes cannot hold {count} leases", bytes.len()));
        }
        let actual = crc32c::crc32c_append(crc32c::crc32c(&bytes[..28]), &bytes[HEADER_BYTES..]);
        if actual != stored {
            return Err(format!("registry checksum mismatch: stored {stored:#010x}, computed {actual:#010x}"));
        }
        let mut leases = Vec::with_capacity(count);
        for _ in 0..count {
            let (epoch, clerk, attempt, flags) =
                (read(reader.u64())?, read(reader.u64())?, read(reader.u64())?, read(reader.u64())?);
            if flags & !LEASE_EXPIRED != 0 {
                return Err(format!("lease {epoch} has unknown flags {flags:#x}"));
            }
            leases.push(RegisteredLease {
                epoch: LeaseEpoch(epoch),
                clerk: ClerkId(clerk),
                attempt,
                expired: flags & LEASE_EXPIRED != 0,
            });
        }
        Ok(ServerRegistry { generation, last_epoch, leases })
    }
}

/// Where a lock server keeps its registry.
pub trait RegistryStore: Send + Sync + std::fmt::Debug {
    /// The registry last saved; the default one if none was.
    fn load(&self) -> io::Result<ServerRegistry>;
    /// Saves durably (returns once it would survive a crash).
    fn save(&self, registry: &ServerRegistry) -> io::Result<()>;
}

/// A registry in memory: survives a server restart within one process
/// (tests, benches, the embedded cluster), not a process crash.
#[derive(Debug, Default)]
pub struct MemoryRegistryStore(Mutex<ServerRegistry>);

impl RegistryStore for MemoryRegistryStore {
    fn load(&self) -> io::Result<ServerRegistry> {
        Ok(self.0.lock().clone())
    }

    fn save(&self, registry: &ServerRegistry) -> io::Result<()> {
        *self.0.lock() = registry.clone();
        Ok(())
    }
}

/// A registry file in a directory: written to a temporary file, fsynced,
/// renamed over the old one, and the directory fsynced.
#[derive(Debug)]
pub struct FileRegistryStore {
    directory: PathBuf,
}

impl FileRegistryStore {
    pub fn open(directory: &Path) -> io::Result<FileRegistryStore> {
        fs::create_dir_all(directory)?;
        Ok(FileRegistryStore { directory: directory.to_path_buf() })
    }

    fn path(&self) -> PathBuf {
        self.directory.join("registry")
    }
}

impl RegistryStore for FileRegistryStore {
    fn load(&self) -> io::Result<ServerRegistry> {
        match fs::read(self.path()) {
            Ok(bytes) => ServerRegistry::decode(&bytes).map_err(|reason| {
                io::Error::new(io::ErrorKind::InvalidData, format!("{}: {reason}", self.path().display()))
            }),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(ServerRegistry::default()),
            Err(error) => Err(error),
        }
    }

    fn save(&self, registry: &ServerRegistry) -> io::Result<()> {
        let temporary = self.directory.join("registry.tmp");
        let mut file = fs::File::create(&temporary)?;
        file.write_all(&registry.encode())?;
        file.sync_all()?;
        fs::rename(&temporary, self.path())?;
        fs::File::open(&self.directory)?.sync_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ServerRegistry {
        ServerRegistry {
            generation: 3,
            last_epoch: 17,
            leases: vec![
                RegisteredLease { epoch: LeaseEpoch(16), clerk: ClerkId(2), attempt: 9, expired: true },
                RegisteredLease { epoch: LeaseEpoch(17), clerk: ClerkId(4), attempt: 1, expired: false },
            ],
        }
    }

    #[test]
    fn a_registry_round_trips_and_damage_is_refused() {
        let bytes = sample().encode();
        assert_eq!(bytes.len(), HEADER_BYTES + 2 * LEASE_BYTES);
        assert_eq!(ServerRegistry::decode(&bytes), Ok(sample()));
        for at in [0, 8, 30, 40] {
            let mut damaged = bytes.clone();
            damaged[at] ^= 1;
            assert!(ServerRegistry::decode(&damaged).is_err(), "a flipped bit at {at} went unnoticed");
        }
        assert!(ServerRegistry::decode(&bytes[..bytes.len() - 1]).is_err());
    }

    #[test]
    fn the_file_store_keeps_the_last_save() {
        let directory = tempfile::tempdir().expect("temp dir");
        let store = FileRegistryStore::open(directory.path()).expect("store");
        assert_eq!(store.load().expect("empty"), ServerRegistry::default());
        store.save(&sample()).expect("saved");
        let mut next = sample();
        next.generation = 4;
        store.save(&next).expect("saved again");
        assert_eq!(FileRegistryStore::open(directory.path()).expect("reopened").load().expect("loaded"), next);
    }
}
