//! Little-endian fixed-width encoding helpers.
//!
//! [`Reader`] never panics on short or malformed input: every accessor returns
//! [`CodecError::Truncated`] when the bytes run out.

use bytes::{BufMut, Bytes, BytesMut};
use thiserror::Error;

/// A decoding failure of a fixed-layout structure.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum CodecError {
    #[error("truncated: needed {needed} more bytes at offset {offset}")]
    Truncated { offset: usize, needed: usize },
    #[error("invalid field {field}: {detail}")]
    Invalid { field: &'static str, detail: String },
    #[error("{trailing} trailing bytes after the message")]
    Trailing { trailing: usize },
}

/// Reads fixed-width little-endian fields from a byte slice.
#[derive(Debug)]
pub struct Reader<'a> {
    bytes: &'a [u8],
    offset: usize,
}

impl<'a> Reader<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Reader { bytes, offset: 0 }
    }

    /// Bytes consumed so far.
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// Bytes not yet consumed.
    pub fn remaining(&self) -> usize {
        self.bytes.len() - self.offset
    }

    pub fn take(&mut self, count: usize) -> Result<&'a [u8], CodecError> {
        if self.remaining() < count {
            return Err(CodecError::Truncated { offset: self.offset, needed: count - self.remaining() });
        }
        let slice = &self.bytes[self.offset..self.offset + count];
        self.offset += count;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], CodecError> {
        let mut array = [0u8; N];
        array.copy_from_slice(self.take(N)?);
        Ok(array)
    }

    pub fn u8(&mut self) -> Result<u8, CodecError> {
        Ok(self.array::<1>()?[0])
    }
    pub fn u16(&mut self) -> Result<u16, CodecError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    pub fn u32(&mut self) -> Result<u32, CodecError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    pub fn u64(&mut self) -> Result<u64, CodecError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// Fails unless every byte was consumed.
    pub fn finish(&self) -> Result<(), CodecError> {
        match self.remaining() {
            0 => Ok(()),
            trailing => Err(CodecError::Trailing { trailing }),
        }
    }
}

/// Appends fixed-width little-endian fields to a buffer.
pub trait WriteLe {
    fn put_le_u16(&mut self, value: u16);
    fn put_le_u32(&mut self, value: u32);
    fn put_le_u64(&mut self, value: u64);
}

impl WriteLe for BytesMut {
    fn put_le_u16(&mut self, value: u16) {
        self.put_u16_le(value)
    }
    fn put_le_u32(&mut self, value: u32) {
        self.put_u32_le(value)
    }
    fn put_le_u64(&mut self, value: u64) {
        self.put_u64_le(value)
    }
}

/// Reads a `u32` length then that many bytes, as a zero-copy slice of `source`.
pub fn read_length_prefixed(
    reader: &mut Reader<'_>,
    source: &Bytes,
    limit: usize,
    field: &'static str,
) -> Result<Bytes, CodecError> {
    let length = reader.u32()? as usize;
    if length > limit {
        return Err(CodecError::Invalid { field, detail: format!("length {length} exceeds limit {limit}") });
    }
    let start = reader.offset();
    reader.take(length)?;
    Ok(source.slice(start..start + length))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reader_reports_truncation_instead_of_panicking() {
        let mut reader = Reader::new(&[1, 2, 3]);
        assert_eq!(reader.u16().unwrap(), 0x0201);
        assert_eq!(reader.u32(), Err(CodecError::Truncated { offset: 2, needed: 3 }));
    }

    #[test]
    fn finish_rejects_trailing_bytes() {
        let mut reader = Reader::new(&[0; 5]);
        reader.u32().unwrap();
        assert_eq!(reader.finish(), Err(CodecError::Trailing { trailing: 1 }));
    }
}
