//! An in-memory disk holding the *durable* image of a segment's log.
//!
//! A write here is durable once `write_durable` returns (it stands for a
//! write + fdatasync that completed), so a killed node loses nothing that
//! was acknowledged, and everything a write that never started would have
//! held. [`MemoryDisk::crash_during`] models power loss in the middle of a
//! write: only a prefix of it reaches the medium (a torn tail), and
//! [`MemoryDisk::corrupt`] models bit rot.

use super::{LogDisk, WriteDone};
use crate::log_format::LogPosition;
use crate::segment::{Action, LogWrite, SegmentCore};
use bytes::Bytes;
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::io;
use std::sync::Arc;

type FileMap = BTreeMap<u64, Vec<u8>>;

/// The durable files of every segment of a node, by segment directory name,
/// so that a "restarted" node finds what the old one made durable.
#[derive(Clone, Debug, Default)]
pub struct MemoryVolumeStore {
    segments: Arc<Mutex<BTreeMap<String, Arc<Mutex<FileMap>>>>>,
}

impl MemoryVolumeStore {
    pub fn disk(&self, name: &str) -> MemoryDisk {
        let files = self.segments.lock().entry(name.to_string()).or_default().clone();
        MemoryDisk { files }
    }
}

/// One segment's log in memory.
#[derive(Clone, Debug, Default)]
pub struct MemoryDisk {
    files: Arc<Mutex<FileMap>>,
}

impl MemoryDisk {
    pub fn new() -> Self {
        MemoryDisk::default()
    }

    fn apply(files: &mut FileMap, position: LogPosition, bytes: &[u8]) {
        let file = files.entry(position.file).or_default();
        let end = position.offset as usize + bytes.len();
        if file.len() < end {
            file.resize(end, 0);
        }
        file[position.offset as usize..end].copy_from_slice(bytes);
    }

    /// Carries out `actions` for `core` on this disk, feeding every write's
    /// follow-ups back, until none are left (tests and benches: the memory
    /// disk completes each write before returning). `observe` sees every
    /// action first; writes and file deletions are then done here.
    ///
    /// # Panics
    /// If a write or a deletion fails.
    pub fn run_until_idle(&self, core: &mut SegmentCore, actions: Vec<Action>, mut observe: impl FnMut(&Action)) {
        let mut pending = actions;
        while !pending.is_empty() {
            let mut next = Vec::new();
            for action in pending {
                observe(&action);
                match action {
                    Action::Write(write) => {
                        let id = write.id;
                        let result = self.write_durable(write, Box::new(|_| {})).expect("completes at once");
                        result.expect("memory disk write");
                        next.extend(core.write_done(id));
                    }
                    Action::DeleteFile(file) => self.delete_file(file).expect("memory disk delete"),
                    Action::Ack { .. } | Action::Refuse { .. } | Action::Status { .. } => {}
                }
            }
            pending = next;
        }
    }

    /// Power loss in the middle of `torn`: only its first `kept_bytes` reach
    /// the medium (a torn tail for the next recovery to find).
    pub fn crash_during(&self, torn: &LogWrite, kept_bytes: usize) {
        let kept = kept_bytes.min(torn.bytes.len());
        Self::apply(&mut self.files.lock(), torn.position, &torn.bytes[..kept]);
    }

    /// Flips bits of byte `offset` of file `file` (bit rot).
    pub fn corrupt(&self, file: u64, offset: usize, mask: u8) {
        if let Some(bytes) = self.files.lock().get_mut(&file)
            && let Some(byte) = bytes.get_mut(offset)
        {
            *byte ^= mask;
        }
    }
}

impl LogDisk for MemoryDisk {
    fn read_all(&self) -> io::Result<Vec<(u64, Bytes)>> {
        Ok(self.files.lock().iter().map(|(number, bytes)| (*number, Bytes::copy_from_slice(bytes))).collect())
    }

    fn write_durable(&self, write: LogWrite, _done: WriteDone) -> Option<io::Result<()>> {
        Self::apply(&mut self.files.lock(), write.position, &write.bytes);
        Some(Ok(()))
    }

    fn zero(&self, position: LogPosition, length: u64) -> io::Result<()> {
        if let Some(file) = self.files.lock().get_mut(&position.file) {
            let start = (position.offset as usize).min(file.len());
            let end = (position.offset + length).min(file.len() as u64) as usize;
            file[start..end].fill(0);
        }
        Ok(())
    }

    fn delete_file(&self, file: u64) -> io::Result<()> {
        self.files.lock().remove(&file);
        Ok(())
    }
}
