//! The lock protocol on the wire: one message per [`common::frame`], in the
//! kit's frame format (magic, version, kind, length, CRC32C), with kinds
//! 32–46 so lock traffic can never be mistaken for storage traffic.
//! `docs/wire-format.md` draws every message byte by byte.
//!
//! All integers are little-endian. A mode is one byte (1 shared, 2
//! exclusive); a `keep` is one byte (0 nothing, 1 shared). A lock name is
//! its table (u32) then its id (u64).

use crate::protocol::{ClerkId, FencingToken, LeaseEpoch, LockName, Mode, ToClerk, ToServer};
use bytes::{BufMut, Bytes, BytesMut};
use common::codec::{CodecError, Reader, WriteLe};
use common::frame::{Frame, encode_frame};

/// Most locks one `Reclaim` lists (21 bytes each: well inside a frame). A
/// clerk holding more gives its lease up instead of reclaiming.
pub const RECLAIM_LOCKS_MAX: usize = 100_000;

/// Frame kinds of lock messages.
mod kind {
    pub const OPEN_LEASE: u8 = 32;
    pub const RENEW_LEASE: u8 = 33;
    pub const REQUEST: u8 = 34;
    pub const RELEASE: u8 = 35;
    pub const RECOVERY_DONE: u8 = 36;
    pub const RECLAIM: u8 = 37;
    pub const LEASE_GRANTED: u8 = 40;
    pub const LEASE_RENEWED: u8 = 41;
    pub const LEASE_LOST: u8 = 42;
    pub const GRANT: u8 = 43;
    pub const REVOKE: u8 = 44;
    pub const RECOVER: u8 = 45;
    pub const RECLAIM_LOCKS: u8 = 46;
}

/// Why a frame is not a lock message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("frame kind {0} is not a lock message for this side")]
    UnknownKind(u8),
    #[error("malformed lock message: {0}")]
    Codec(#[from] CodecError),
}

fn put_lock(buffer: &mut BytesMut, lock: LockName) {
    buffer.put_le_u32(lock.table);
    buffer.put_le_u64(lock.id);
}

fn mode_byte(mode: Mode) -> u8 {
    match mode {
        Mode::Shared => 1,
        Mode::Exclusive => 2,
    }
}

fn keep_byte(keep: Option<Mode>) -> u8 {
    keep.map_or(0, mode_byte)
}

fn read_lock(reader: &mut Reader<'_>) -> Result<LockName, CodecError> {
    Ok(LockName { table: reader.u32()?, id: reader.u64()? })
}

fn read_mode(reader: &mut Reader<'_>) -> Result<Mode, CodecError> {
    match reader.u8()? {
        1 => Ok(Mode::Shared),
        2 => Ok(Mode::Exclusive),
        other => Err(CodecError::Invalid { field: "mode", detail: format!("{other} is neither 1 nor 2") }),
    }
}

fn read_keep(reader: &mut Reader<'_>) -> Result<Option<Mode>, CodecError> {
    match reader.u8()? {
        0 => Ok(None),
        1 => Ok(Some(Mode::Shared)),
        other => Err(CodecError::Invalid { field: "keep", detail: format!("{other} is neither 0 nor 1") }),
    }
}

impl ToServer {
    /// The message as a complete frame.
    pub fn encode(&self) -> Bytes {
        let mut payload = BytesMut::with_capacity(32);
        let kind = match self {
            ToServer::OpenLease { clerk, attempt } => {
                payload.put_le_u64(clerk.0);
                payload.put_le_u64(*attempt);
                kind::OPEN_LEASE
            }
            ToServer::RenewLease { epoch, sequence } => {
                payload.put_le_u64(epoch.0);
                payload.put_le_u64(*sequence);
                kind::RENEW_LEASE
            }
            ToServer::Request { epoch, lock, mode } => {
                payload.put_le_u64(epoch.0);
                put_lock(&mut payload, *lock);
                payload.put_u8(mode_byte(*mode));
                kind::REQUEST
            }
            ToServer::Release { epoch, lock, token, keep } => {
                payload.put_le_u64(epoch.0);
                put_lock(&mut payload, *lock);
                payload.put_le_u64(token.0);
                payload.put_u8(keep_byte(*keep));
                kind::RELEASE
            }
            ToServer::RecoveryDone { epoch, dead } => {
                payload.put_le_u64(epoch.0);
                payload.put_le_u64(dead.0);
                kind::RECOVERY_DONE
            }
            ToServer::Reclaim { epoch, first_token, holdings } => {
                assert!(holdings.len() <= RECLAIM_LOCKS_MAX, "a reclaim lists at most RECLAIM_LOCKS_MAX locks");
                payload.put_le_u64(epoch.0);
                payload.put_le_u64(first_token.0);
                payload.put_le_u32(holdings.len() as u32);
                for (lock, mode, token) in holdings {
                    put_lock(&mut payload, *lock);
                    payload.put_u8(mode_byte(*mode));
                    payload.put_le_u64(token.0);
                }
                kind::RECLAIM
            }
        };
        encode_frame(kind, &payload)
    }

    pub fn decode(frame: &Frame) -> Result<ToServer, WireError> {
        let mut reader = Reader::new(&frame.payload);
        let message = match frame.kind {
            kind::OPEN_LEASE => ToServer::OpenLease { clerk: ClerkId(reader.u64()?), attempt: reader.u64()? },
            kind::RENEW_LEASE => ToServer::RenewLease { epoch: LeaseEpoch(reader.u64()?), sequence: reader.u64()? },
            kind::REQUEST => ToServer::Request {
                epoch: LeaseEpoch(reader.u64()?),
                lock: read_lock(&mut reader)?,
                mode: read_mode(&mut reader)?,
            },
            kind::RELEASE => ToServer::Release {
                epoch: LeaseEpoch(reader.u64()?),
                lock: read_lock(&mut reader)?,
                token: FencingToken(reader.u64()?),
                keep: read_keep(&mut reader)?,
            },
            kind::RECOVERY_DONE => {
                ToServer::RecoveryDone { epoch: LeaseEpoch(reader.u64()?), dead: LeaseEpoch(reader.u64()?) }
            }
            kind::RECLAIM => {
                let epoch = LeaseEpoch(reader.u64()?);
                let first_token = FencingToken(reader.u64()?);
                let count = reader.u32()? as usize;
                if count > RECLAIM_LOCKS_MAX {
                    let detail = format!("{count} locks, more than RECLAIM_LOCKS_MAX ({RECLAIM_LOCKS_MAX})");
                    return Err(CodecError::Invalid { field: "reclaim", detail }.into());
                }
                let mut holdings = Vec::with_capacity(count);
                for _ in 0..count {
                    holdings.push((read_lock(&mut reader)?, read_mode(&mut reader)?, FencingToken(reader.u64()?)));
                }
                ToServer::Reclaim { epoch, first_token, holdings }
            }
            other => return Err(WireError::UnknownKind(other)),
        };
        reader.finish()?;
        Ok(message)
    }
}

impl ToClerk {
    /// The message as a complete frame.
    pub fn encode(&self) -> Bytes {
        let mut payload = BytesMut::with_capacity(40);
        let kind = match self {
            ToClerk::LeaseGranted { attempt, epoch, duration_micros } => {
                payload.put_le_u64(*attempt);
                payload.put_le_u64(epoch.0);
                payload.put_le_u64(*duration_micros);
                kind::LEASE_GRANTED
            }
            ToClerk::LeaseRenewed { epoch, sequence } => {
                payload.put_le_u64(epoch.0);
                payload.put_le_u64(*sequence);
                kind::LEASE_RENEWED
            }
            ToClerk::LeaseLost { epoch } => {
                payload.put_le_u64(epoch.0);
                kind::LEASE_LOST
            }
            ToClerk::Grant { epoch, lock, mode, token } => {
                payload.put_le_u64(epoch.0);
                put_lock(&mut payload, *lock);
                payload.put_u8(mode_byte(*mode));
                payload.put_le_u64(token.0);
                kind::GRANT
            }
            ToClerk::Revoke { epoch, lock, token, held, keep } => {
                payload.put_le_u64(epoch.0);
                put_lock(&mut payload, *lock);
                payload.put_le_u64(token.0);
                payload.put_u8(mode_byte(*held));
                payload.put_u8(keep_byte(*keep));
                kind::REVOKE
            }
            ToClerk::Recover { epoch, dead, dead_clerk } => {
                payload.put_le_u64(epoch.0);
                payload.put_le_u64(dead.0);
                payload.put_le_u64(dead_clerk.0);
                kind::RECOVER
            }
            ToClerk::ReclaimLocks { epoch, first_token } => {
                payload.put_le_u64(epoch.0);
                payload.put_le_u64(first_token.0);
                kind::RECLAIM_LOCKS
            }
        };
        encode_frame(kind, &payload)
    }

    pub fn decode(frame: &Frame) -> Result<ToClerk, WireError> {
        let mut reader = Reader::new(&frame.payload);
        let message = match frame.kind {
            kind::LEASE_GRANTED => ToClerk::LeaseGranted {
                attempt: reader.u64()?,
                epoch: LeaseEpoch(reader.u64()?),
                duration_micros: reader.u64()?,
            },
            kind::LEASE_RENEWED => ToClerk::LeaseRenewed { epoch: LeaseEpoch(reader.u64()?), sequence: reader.u64()? },
            kind::LEASE_LOST => ToClerk::LeaseLost { epoch: LeaseEpoch(reader.u64()?) },
            kind::GRANT => ToClerk::Grant {
                epoch: LeaseEpoch(reader.u64()?),
                lock: read_lock(&mut reader)?,
                mode: read_mode(&mut reader)?,
                token: FencingToken(reader.u64()?),
            },
            kind::REVOKE => ToClerk::Revoke {
                epoch: LeaseEpoch(reader.u64()?),
                lock: read_lock(&mut reader)?,
                token: FencingToken(reader.u64()?),
                held: read_mode(&mut reader)?,
                keep: read_keep(&mut reader)?,
            },
            kind::RECOVER => ToClerk::Recover {
                epoch: LeaseEpoch(reader.u64()?),
                dead: LeaseEpoch(reader.u64()?),
                dead_clerk: ClerkId(reader.u64()?),
            },
            kind::RECLAIM_LOCKS => {
                ToClerk::ReclaimLocks { epoch: LeaseEpoch(reader.u64()?), first_token: FencingToken(reader.u64()?) }
            }
            other => return Err(WireError::UnknownKind(other)),
        };
        reader.finish()?;
        Ok(message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::frame::decode_frame;
    use proptest::prelude::*;

    fn frame_of(bytes: Bytes) -> Frame {
        let mut buffer = BytesMut::from(&bytes[..]);
        decode_frame(&mut buffer).expect("valid frame").expect("complete frame")
    }

    fn lock() -> impl Strategy<Value = LockName> {
        (any::<u32>(), any::<u64>()).prop_map(|(table, id)| LockName { table, id })
    }

    fn mode() -> impl Strategy<Value = Mode> {
        prop_oneof![Just(Mode::Shared), Just(Mode::Exclusive)]
    }

    fn keep() -> impl Strategy<Value = Option<Mode>> {
        prop_oneof![Just(None), Just(Some(Mode::Shared))]
    }

    fn to_server() -> impl Strategy<Value = ToServer> {
        prop_oneof![
            (any::<u64>(), any::<u64>())
                .prop_map(|(clerk, attempt)| ToServer::OpenLease { clerk: ClerkId(clerk), attempt }),
            (any::<u64>(), any::<u64>())
                .prop_map(|(epoch, sequence)| ToServer::RenewLease { epoch: LeaseEpoch(epoch), sequence }),
            (any::<u64>(), lock(), mode()).prop_map(|(epoch, lock, mode)| ToServer::Request {
                epoch: LeaseEpoch(epoch),
                lock,
                mode
            }),
            (any::<u64>(), lock(), any::<u64>(), keep()).prop_map(|(epoch, lock, token, keep)| ToServer::Release {
                epoch: LeaseEpoch(epoch),
                lock,
                token: FencingToken(token),
                keep
            }),
            (any::<u64>(), any::<u64>())
                .prop_map(|(epoch, dead)| ToServer::RecoveryDone { epoch: LeaseEpoch(epoch), dead: LeaseEpoch(dead) }),
            (any::<u64>(), any::<u64>(), proptest::collection::vec((lock(), mode(), any::<u64>()), 0..4)).prop_map(
                |(epoch, first, holdings)| ToServer::Reclaim {
                    epoch: LeaseEpoch(epoch),
                    first_token: FencingToken(first),
                    holdings: holdings
                        .into_iter()
                        .map(|(lock, mode, token)| (lock, mode, FencingToken(token)))
                        .collect()
                }
            ),
        ]
    }

    fn to_clerk() -> impl Strategy<Value = ToClerk> {
        prop_oneof![
            (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(attempt, epoch, duration_micros)| {
                ToClerk::LeaseGranted { attempt, epoch: LeaseEpoch(epoch), duration_micros }
            }),
            (any::<u64>(), any::<u64>())
                .prop_map(|(epoch, sequence)| ToClerk::LeaseRenewed { epoch: LeaseEpoch(epoch), sequence }),
            any::<u64>().prop_map(|epoch| ToClerk::LeaseLost { epoch: LeaseEpoch(epoch) }),
            (any::<u64>(), lock(), mode(), any::<u64>()).prop_map(|(epoch, lock, mode, token)| ToClerk::Grant {
                epoch: LeaseEpoch(epoch),
                lock,
                mode,
                token: FencingToken(token)
            }),
            (any::<u64>(), lock(), any::<u64>(), mode(), keep()).prop_map(|(epoch, lock, token, held, keep)| {
                ToClerk::Revoke { epoch: LeaseEpoch(epoch), lock, token: FencingToken(token), held, keep }
            }),
            (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(epoch, dead, clerk)| ToClerk::Recover {
                epoch: LeaseEpoch(epoch),
                dead: LeaseEpoch(dead),
                dead_clerk: ClerkId(clerk)
            }),
            (any::<u64>(), any::<u64>()).prop_map(|(epoch, first)| ToClerk::ReclaimLocks {
                epoch: LeaseEpoch(epoch),
                first_token: FencingToken(first)
            }),
        ]
    }

    proptest! {
        #[test]
        fn every_message_round_trips(to_server in to_server(), to_clerk in to_clerk()) {
            prop_assert_eq!(ToServer::decode(&frame_of(to_server.encode())).unwrap(), to_server);
            prop_assert_eq!(ToClerk::decode(&frame_of(to_clerk.encode())).unwrap(), to_clerk);
        }

        #[test]
        fn decoding_never_panics(kind in 0u8..64, payload in proptest::collection::vec(any::<u8>(), 0..64)) {
            let frame = Frame { kind, payload: Bytes::from(payload) };
            let _ = ToServer::decode(&frame);
            let _ = ToClerk::decode(&frame);
        }
    }

    /// The worked example of docs/wire-format.md §6.
    #[test]
    fn the_documented_request_encodes_as_drawn() {
        let request =
            ToServer::Request { epoch: LeaseEpoch(7), lock: LockName { table: 1, id: 42 }, mode: Mode::Exclusive };
        let encoded = request.encode();
        assert_eq!(&encoded[..8], &[0x41, 0x4B, 0x01, 0x22, 0x15, 0x00, 0x00, 0x00]);
        let payload: Vec<u8> = [&7u64.to_le_bytes()[..], &1u32.to_le_bytes(), &42u64.to_le_bytes(), &[2]].concat();
        assert_eq!(&encoded[12..], &payload[..]);
    }

    /// The payload sizes in the table of docs/wire-format.md §6.
    #[test]
    fn payload_sizes_are_the_documented_ones() {
        let (epoch, lock, token) = (LeaseEpoch(1), LockName { table: 1, id: 2 }, FencingToken(3));
        let to_server = [
            (ToServer::OpenLease { clerk: ClerkId(1), attempt: 1 }.encode(), 16),
            (ToServer::RenewLease { epoch, sequence: 1 }.encode(), 16),
            (ToServer::Request { epoch, lock, mode: Mode::Shared }.encode(), 21),
            (ToServer::Release { epoch, lock, token, keep: None }.encode(), 29),
            (ToServer::RecoveryDone { epoch, dead: epoch }.encode(), 16),
            (
                ToServer::Reclaim { epoch, first_token: token, holdings: vec![(lock, Mode::Shared, token); 2] }
                    .encode(),
                20 + 2 * 21,
            ),
        ];
        let to_clerk = [
            (ToClerk::LeaseGranted { attempt: 1, epoch, duration_micros: 1 }.encode(), 24),
            (ToClerk::LeaseRenewed { epoch, sequence: 1 }.encode(), 16),
            (ToClerk::LeaseLost { epoch }.encode(), 8),
            (ToClerk::Grant { epoch, lock, mode: Mode::Shared, token }.encode(), 29),
            (ToClerk::Revoke { epoch, lock, token, held: Mode::Exclusive, keep: None }.encode(), 30),
            (ToClerk::Recover { epoch, dead: epoch, dead_clerk: ClerkId(2) }.encode(), 24),
            (ToClerk::ReclaimLocks { epoch, first_token: token }.encode(), 16),
        ];
        for (frame, payload_bytes) in to_server.into_iter().chain(to_clerk) {
            assert_eq!(frame.len() - common::frame::FRAME_HEADER_BYTES, payload_bytes, "kind {}", frame[3]);
        }
    }

    #[test]
    fn bad_modes_trailing_bytes_and_foreign_kinds_are_refused() {
        let request =
            ToServer::Request { epoch: LeaseEpoch(1), lock: LockName { table: 1, id: 2 }, mode: Mode::Shared };
        let mut frame = frame_of(request.encode());
        let mut payload = frame.payload.to_vec();
        *payload.last_mut().expect("mode byte") = 9;
        frame.payload = Bytes::from(payload.clone());
        assert!(matches!(ToServer::decode(&frame), Err(WireError::Codec(CodecError::Invalid { field: "mode", .. }))));
        payload.push(0);
        frame.payload = Bytes::from(payload);
        assert!(ToServer::decode(&frame).is_err());
        frame.kind = 1; // a storage append
        assert_eq!(ToServer::decode(&frame), Err(WireError::UnknownKind(1)));
        let grant = ToClerk::LeaseLost { epoch: LeaseEpoch(3) };
        assert!(matches!(ToServer::decode(&frame_of(grant.encode())), Err(WireError::UnknownKind(42))));
    }
}
