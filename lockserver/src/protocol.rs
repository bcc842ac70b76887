//! Names, modes, and the messages between clerks and the lock server.
//!
//! The messages are asynchronous, as in Frangipani (F97 §5): `Request` and
//! `Release` go from clerk to server, `Grant` and `Revoke` from server to
//! clerk. An upgrade is a `Request` for `Exclusive` from a `Shared` holder;
//! a downgrade is a `Release` that keeps `Shared`. Every message may be
//! lost, delayed, duplicated or reordered: each side makes every message
//! idempotent and retransmits what it still waits for.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A clerk (one per workstation). Stable across the clerk's restarts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ClerkId(pub u64);

/// One lease: a clerk's session with the server. The server hands out a new
/// epoch for every lease, increasing; a clerk whose lease lapsed comes back
/// with a new epoch, and the old one is fenced. Every write a clerk sends to
/// shared storage carries its epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
pub struct LeaseEpoch(pub u64);

/// Carried by every grant: increases with each grant of the same lock, so
/// storage can refuse a write from an older holder of that lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
pub struct FencingToken(pub u64);

/// A lock: a table (a namespace, such as inodes or log regions) and an id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct LockName {
    pub table: u32,
    pub id: u64,
}

/// The table of recovery locks: `(RECOVERY_TABLE, dead epoch)` is held by
/// the clerk replaying a dead clerk's log, under that clerk's own lease.
pub const RECOVERY_TABLE: u32 = u32::MAX;

/// A lock table: a namespace of locks (inodes, log regions, bitmap
/// segments), named by a string. On the wire and in memory a table is the
/// CRC32C of its name, 4 bytes, the same in every process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LockTable(pub u32);

/// Two table names with the same 32-bit id in one process.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("lock table {name:?} has id {id:#010x}, which {other:?} already uses")]
pub struct TableNameCollision {
    pub name: String,
    pub other: String,
    pub id: u32,
}

impl LockTable {
    /// The table called `name`. Refuses a name whose id another name (or
    /// the recovery table) already has in this process.
    pub fn named(name: &str) -> Result<LockTable, TableNameCollision> {
        use std::collections::HashMap;
        use std::sync::{Mutex, OnceLock};
        static NAMES: OnceLock<Mutex<HashMap<u32, String>>> = OnceLock::new();
        let id = crc32c::crc32c(name.as_bytes());
        let collision = |other: &str| TableNameCollision { name: name.to_string(), other: other.to_string(), id };
        if id == RECOVERY_TABLE {
            return Err(collision("the recovery table"));
        }
        let mut names = NAMES.get_or_init(Mutex::default).lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        match names.get(&id) {
            Some(other) if other != name => Err(collision(other)),
            Some(_) => Ok(LockTable(id)),
            None => {
                names.insert(id, name.to_string());
                Ok(LockTable(id))
            }
        }
    }

    /// Lock `id` of this table.
    pub fn lock(self, id: u64) -> LockName {
        LockName { table: self.0, id }
    }
}

impl fmt::Display for LockName {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "lock {}/{}", self.table, self.id)
    }
}

/// Multiple readers or a single writer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Mode {
    Shared,
    Exclusive,
}

impl Mode {
    /// Whether two holders in these modes may coexist.
    pub fn compatible(self, other: Mode) -> bool {
        self == Mode::Shared && other == Mode::Shared
    }

    /// Whether holding `self` allows what `wanted` allows.
    pub fn covers(self, wanted: Mode) -> bool {
        self >= wanted
    }
}

/// Clerk to server.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToServer {
    /// Starts a lease (a new clerk, or one whose lease lapsed). `attempt`
    /// tells retransmissions of one opening apart from a new opening, and
    /// must grow across the clerk's restarts too (seed it from the wall
    /// clock): the server ignores an attempt lower than one it has seen, so
    /// a delayed opening from an earlier run cannot end the current lease.
    OpenLease { clerk: ClerkId, attempt: u64 },
    /// Heartbeat: extends the lease. `sequence` names this renewal in the answer.
    RenewLease { epoch: LeaseEpoch, sequence: u64 },
    /// Asks for `lock` in `mode` (an upgrade if `Shared` is held).
    Request { epoch: LeaseEpoch, lock: LockName, mode: Mode },
    /// Gives `lock` (held under `token`) up down to `keep`: `None` releases
    /// it, `Some(Shared)` downgrades an exclusive hold.
    Release { epoch: LeaseEpoch, lock: LockName, token: FencingToken, keep: Option<Mode> },
    /// The dead clerk's log is replayed.
    RecoveryDone { epoch: LeaseEpoch, dead: LeaseEpoch },
    /// After a server restart: every lock the lease holds, with its mode
    /// and token, answering the `ReclaimLocks` of the server run whose first
    /// token is `first_token` (another run ignores it: it may be stale). The
    /// first to arrive is taken; it may list a lock released since, which
    /// the clerk releases again when the server revokes it.
    Reclaim { epoch: LeaseEpoch, first_token: FencingToken, holdings: Vec<(LockName, Mode, FencingToken)> },
}

/// Server to clerk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToClerk {
    /// A lease for the opening `attempt`, valid for `duration_micros` from
    /// when the clerk sent it.
    LeaseGranted { attempt: u64, epoch: LeaseEpoch, duration_micros: u64 },
    /// The renewal `sequence` is in.
    LeaseRenewed { epoch: LeaseEpoch, sequence: u64 },
    /// The lease `epoch` is over: every lock held under it is lost.
    LeaseLost { epoch: LeaseEpoch },
    /// `lock` is held in `mode` under `token`.
    Grant { epoch: LeaseEpoch, lock: LockName, mode: Mode, token: FencingToken },
    /// Give `lock` (held in `held` under `token`) up down to `keep`, once
    /// its dirty state is flushed. A clerk that never saw the grant of
    /// `token` (it was lost) learns from this that it holds it.
    Revoke { epoch: LeaseEpoch, lock: LockName, token: FencingToken, held: Mode, keep: Option<Mode> },
    /// Replay the log of the dead lease `dead` (of clerk `dead_clerk`): its
    /// epoch is fenced in storage, and the recovery lock is yours.
    Recover { epoch: LeaseEpoch, dead: LeaseEpoch, dead_clerk: ClerkId },
    /// The server restarted and knows the lease but not its locks: send
    /// them all in a `Reclaim`. Every grant of the
    /// restarted server carries a token at or above `first_token`: a grant
    /// below it that arrives afterwards is a delayed one from the server
    /// that went away, and is ignored.
    ReclaimLocks { epoch: LeaseEpoch, first_token: FencingToken },
}

impl ToClerk {
    /// The lease the message is for.
    pub fn epoch(&self) -> LeaseEpoch {
        match self {
            ToClerk::LeaseGranted { epoch, .. }
            | ToClerk::LeaseRenewed { epoch, .. }
            | ToClerk::LeaseLost { epoch }
            | ToClerk::Grant { epoch, .. }
            | ToClerk::Revoke { epoch, .. }
            | ToClerk::Recover { epoch, .. }
            | ToClerk::ReclaimLocks { epoch, .. } => *epoch,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_name_gives_the_same_id_every_time_and_names_its_locks() {
        let inodes = LockTable::named("inodes").expect("a fresh name");
        assert_eq!(LockTable::named("inodes"), Ok(inodes));
        assert_eq!(inodes.0, crc32c::crc32c(b"inodes"), "the id is the CRC32C of the name, in every process");
        assert_ne!(LockTable::named("logs").expect("a fresh name"), inodes);
        assert_eq!(inodes.lock(7), LockName { table: inodes.0, id: 7 });
    }

    #[test]
    fn only_shared_with_shared_is_compatible() {
        assert!(Mode::Shared.compatible(Mode::Shared));
        assert!(!Mode::Shared.compatible(Mode::Exclusive));
        assert!(!Mode::Exclusive.compatible(Mode::Shared));
        assert!(!Mode::Exclusive.compatible(Mode::Exclusive));
        assert!(Mode::Exclusive.covers(Mode::Shared));
        assert!(!Mode::Shared.covers(Mode::Exclusive));
    }
}
