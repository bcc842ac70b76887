//! The wire frame: every message between kit processes travels in one.
//!
//! ```text
//! offset  size  field
//!      0     2  magic        "AK" (0x41 0x4B)
//!      2     1  version      FRAME_VERSION (1)
//!      3     1  kind         message kind (see `message::MessageKind`)
//!      4     4  length       payload length in bytes, u32 LE, <= FRAME_PAYLOAD_BYTES_MAX
//!      8     4  crc32c       CRC32C over bytes 0..8 followed by the payload, u32 LE
//!     12     n  payload
//! ```
//!
//! The decoder checks magic, version and length *before* buffering the
//! payload, so an oversized or foreign frame is refused after 12 bytes.
//! `docs/wire-format.md` draws this and every payload byte by byte.

use crate::limits::FRAME_PAYLOAD_BYTES_MAX;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use thiserror::Error;

/// Frame header magic.
pub const FRAME_MAGIC: [u8; 2] = *b"AK";
/// The only frame version this build speaks.
pub const FRAME_VERSION: u8 = 1;
/// Bytes in a frame header.
pub const FRAME_HEADER_BYTES: usize = 12;

/// Why a frame was refused. Any of these closes the connection it came on.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum FrameError {
    #[error("bad magic {0:02x?}: not a kit peer")]
    BadMagic([u8; 2]),
    #[error("unsupported frame version {found} (this build speaks {FRAME_VERSION})")]
    UnsupportedVersion { found: u8 },
    #[error("frame payload of {length} bytes exceeds FRAME_PAYLOAD_BYTES_MAX ({FRAME_PAYLOAD_BYTES_MAX})")]
    Oversized { length: usize },
    #[error("frame checksum mismatch: header says {expected:#010x}, payload gives {actual:#010x}")]
    BadChecksum { expected: u32, actual: u32 },
}

/// A decoded frame: its kind byte and its payload (checksum already verified).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: u8,
    pub payload: Bytes,
}

fn frame_checksum(header_prefix: &[u8], payload: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(header_prefix), payload)
}

/// Encodes a complete frame (header + payload) ready to be written.
pub fn encode_frame(kind: u8, payload: &[u8]) -> Bytes {
    assert!(payload.len() <= FRAME_PAYLOAD_BYTES_MAX, "encoder asked to exceed FRAME_PAYLOAD_BYTES_MAX");
    let mut buffer = BytesMut::with_capacity(FRAME_HEADER_BYTES + payload.len());
    buffer.put_slice(&FRAME_MAGIC);
    buffer.put_u8(FRAME_VERSION);
    buffer.put_u8(kind);
    buffer.put_u32_le(payload.len() as u32);
    let checksum = frame_checksum(&buffer[..8], payload);
    buffer.put_u32_le(checksum);
    buffer.put_slice(payload);
    buffer.freeze()
}

/// Builds a frame in place: reserve the header, let the caller append the
/// payload, then [`FrameBuilder::finish`] fills length and checksum. Saves a
/// copy of large payloads on the hot path.
#[derive(Debug)]
pub struct FrameBuilder {
    buffer: BytesMut,
}

impl FrameBuilder {
    pub fn new(kind: u8, payload_capacity: usize) -> Self {
        let mut buffer = BytesMut::with_capacity(FRAME_HEADER_BYTES + payload_capacity);
        buffer.put_slice(&FRAME_MAGIC);
        buffer.put_u8(FRAME_VERSION);
        buffer.put_u8(kind);
        buffer.put_bytes(0, 8);
        FrameBuilder { buffer }
    }

    /// The payload being built.
    pub fn payload(&mut self) -> &mut BytesMut {
        &mut self.buffer
    }

    /// Payload bytes written so far.
    pub fn payload_len(&self) -> usize {
        self.buffer.len() - FRAME_HEADER_BYTES
    }

    pub fn finish(mut self) -> Bytes {
        let length = self.payload_len();
        assert!(length <= FRAME_PAYLOAD_BYTES_MAX, "frame builder exceeded FRAME_PAYLOAD_BYTES_MAX");
        self.buffer[4..8].copy_from_slice(&(length as u32).to_le_bytes());
        let checksum = frame_checksum(&self.buffer[..8], &self.buffer[FRAME_HEADER_BYTES..]);
        self.buffer[8..12].copy_from_slice(&checksum.to_le_bytes());
        self.buffer.freeze()
    }
}

/// Parses one frame from the front of `buffer`.
///
/// Returns `Ok(None)` when more bytes are needed, `Ok(Some(frame))` and
/// consumes the frame's bytes when one is complete, and `Err` on a frame that
/// must close the connection. It never allocates more than the declared
/// (already bounded) length.
pub fn decode_frame(buffer: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
    if buffer.len() >= 2 && buffer[..2] != FRAME_MAGIC {
        return Err(FrameError::BadMagic([buffer[0], buffer[1]]));
    }
    if buffer.len() >= 3 && buffer[2] != FRAME_VERSION {
        return Err(FrameError::UnsupportedVersion { found: buffer[2] });
    }
    if buffer.len() < FRAME_HEADER_BYTES {
        return Ok(None);
    }
    let length = u32::from_le_bytes(buffer[4..8].try_into().expect("4 bytes")) as usize;
    if length > FRAME_PAYLOAD_BYTES_MAX {
        return Err(FrameError::Oversized { length });
    }
    if buffer.len() < FRAME_HEADER_BYTES + length {
        buffer.reserve(FRAME_HEADER_BYTES + length - buffer.len());
        return Ok(None);
    }
    let expected = u32::from_le_bytes(buffer[8..12].try_into().expect("4 bytes"));
    let actual = frame_checksum(&buffer[..8], &buffer[FRAME_HEADER_BYTES..FRAME_HEADER_BYTES + length]);
    if expected != actual {
        return Err(FrameError::BadChecksum { expected, actual });
    }
    let kind = buffer[3];
    buffer.advance(FRAME_HEADER_BYTES);
    let payload = buffer.split_to(length).freeze();
    Ok(Some(Frame { kind, payload }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trip_and_partial_input() {
        let encoded = encode_frame(7, b"hello");
        let mut buffer = BytesMut::new();
        for (index, byte) in encoded.iter().enumerate() {
            buffer.put_u8(*byte);
            let decoded = decode_frame(&mut buffer).unwrap();
            if index + 1 < encoded.len() {
                assert!(decoded.is_none());
            } else {
                assert_eq!(decoded, Some(Frame { kind: 7, payload: Bytes::from_static(b"hello") }));
            }
        }
        assert!(buffer.is_empty());
    }

    #[test]
    fn builder_matches_encoder() {
        let mut builder = FrameBuilder::new(3, 16);
        builder.payload().put_slice(b"abc");
        assert_eq!(builder.finish(), encode_frame(3, b"abc"));
    }

    #[test]
    fn refuses_bad_magic_version_length_and_checksum() {
        let good = encode_frame(1, b"payload");
        let mut bad_magic = BytesMut::from(&good[..]);
        bad_magic[0] = b'X';
        assert!(matches!(decode_frame(&mut bad_magic), Err(FrameError::BadMagic(_))));

        let mut bad_version = BytesMut::from(&good[..]);
        bad_version[2] = 9;
        assert_eq!(decode_frame(&mut bad_version), Err(FrameError::UnsupportedVersion { found: 9 }));

        let mut oversized = BytesMut::from(&good[..FRAME_HEADER_BYTES]);
        oversized[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(decode_frame(&mut oversized), Err(FrameError::Oversized { .. })));

        let mut flipped = BytesMut::from(&good[..]);
        let last = flipped.len() - 1;
        flipped[last] ^= 0x40;
        assert!(matches!(decode_frame(&mut flipped), Err(FrameError::BadChecksum { .. })));
    }

    proptest! {
        #[test]
        fn any_single_byte_corruption_is_refused(payload in proptest::collection::vec(any::<u8>(), 0..200), position in any::<prop::sample::Index>(), flip in 1u8..=255) {
            let good = encode_frame(5, &payload);
            let mut corrupt = BytesMut::from(&good[..]);
            let index = position.index(corrupt.len());
            corrupt[index] ^= flip;
            // The kind byte is covered by the checksum too, so every flip is caught
            // (a length flip may instead leave the decoder waiting for more bytes).
            let decoded = decode_frame(&mut corrupt);
            prop_assert!(!matches!(decoded, Ok(Some(_))), "corrupt frame accepted: {:?}", decoded);
        }

        #[test]
        fn concatenated_frames_decode_in_order(payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 1..8)) {
            let mut buffer = BytesMut::new();
            for (kind, payload) in payloads.iter().enumerate() {
                buffer.put_slice(&encode_frame(kind as u8, payload));
            }
            for (kind, payload) in payloads.iter().enumerate() {
                let frame = decode_frame(&mut buffer).unwrap().unwrap();
                prop_assert_eq!(frame.kind, kind as u8);
                prop_assert_eq!(&frame.payload[..], &payload[..]);
            }
            prop_assert!(buffer.is_empty());
        }
    }
}
