//! The block-volume messages: the shared disk of the file system (Petal's
//! role), served by the same storage nodes, segments and log as redo.
//!
//! Every block write carries `(block, version, lease epoch, fencing token,
//! bytes)` and is durable once 4 of the block's 6 segments acknowledge it.
//! A segment refuses a write whose lease epoch is fenced, or whose fencing
//! token is older than one it already holds for that block. A fence is
//! sealed in three steps, each on a write quorum of every PG:
//! [`FencePhase::Fence`] (refuse the epoch from now on; the acknowledgement
//! lists the blocks that epoch wrote), repairs (copy each such block's newest
//! version to every fenced segment), then [`FencePhase::Sealed`] (readers may
//! now ignore any copy of that epoch's writes held by a segment that was not
//! fenced when it took it). `docs/wire-format.md` §7 draws every payload.

use crate::codec::{CodecError, Reader, read_length_prefixed};
use crate::ids::{BlockId, PgId};
use crate::limits::{BLOCK_BYTES_MAX, BLOCK_HISTORY_MAX, FENCE_ACK_BLOCKS_MAX, FENCED_EPOCHS_MAX};
use bytes::{BufMut, Bytes};

/// One write of one block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockWrite {
    pub request_id: u64,
    pub pg: PgId,
    pub block: BlockId,
    /// Chosen by the writer, increasing for each write of the block under
    /// one fencing token.
    pub version: u64,
    /// The writer's lease epoch: refused once fenced.
    pub lease_epoch: u64,
    /// The grant of the lock covering the block: refused if older than one
    /// the segment holds for the block.
    pub fencing_token: u64,
    /// A seal's copy of a version a fenced segment accepted before its fence:
    /// taken although its epoch is fenced. Only a sealer sends these.
    pub repair: bool,
    pub data: Bytes,
}

/// A block write is durable on this segment (or superseded by a newer
/// version under the same token, which is as good).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockWriteAck {
    pub request_id: u64,
    pub pg: PgId,
    pub block: BlockId,
}

/// Asks for a block. The answer carries the segment's version history of the
/// block, the bytes of one version, and the sealed epochs the asker has not
/// seen from this segment yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockRead {
    pub request_id: u64,
    pub pg: PgId,
    pub block: BlockId,
    /// The version whose bytes to return, by its fencing token; 0 = newest.
    pub want_token: u64,
    /// How many of this segment's sealed epochs the asker already has.
    pub sealed_cursor: u32,
}

/// One version of a block a segment holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockVersionInfo {
    pub version: u64,
    pub lease_epoch: u64,
    pub fencing_token: u64,
    /// The segment knows `lease_epoch` is fenced and still holds this
    /// version: it took it before the fence, or from a seal's repair.
    pub repaired: bool,
}

impl BlockVersionInfo {
    /// The order of versions: a later lock grant wins, then a later version.
    pub fn key(&self) -> (u64, u64) {
        (self.fencing_token, self.version)
    }
}

/// A segment's answer to [`BlockRead`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockImage {
    pub request_id: u64,
    pub pg: PgId,
    pub block: BlockId,
    /// Newest first; empty for a block never written here.
    pub history: Vec<BlockVersionInfo>,
    /// The fencing token of the version whose bytes follow (0: none).
    pub data_token: u64,
    pub data: Bytes,
    /// Index in this segment's sealed list of `sealed[0]`.
    pub sealed_cursor: u32,
    /// Sealed lease epochs from `sealed_cursor` on, in the order the segment
    /// learned them.
    pub sealed: Vec<u64>,
}

/// The step of a fence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum FencePhase {
    /// Refuse the epoch's writes from now on, and list the blocks it wrote.
    Fence = 1,
    /// The repairs are done: readers may drop unfenced copies of its writes.
    Sealed = 2,
}

/// Fences a lease epoch on one segment. Idempotent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FenceRequest {
    pub request_id: u64,
    pub pg: PgId,
    pub lease_epoch: u64,
    pub phase: FencePhase,
    /// List the epoch's blocks from this block id on (paging).
    pub from_block: BlockId,
}

/// A block the fenced epoch wrote, and the newest version of it that epoch
/// wrote here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FencedBlock {
    pub block: BlockId,
    pub version: u64,
    pub fencing_token: u64,
}

/// The fence (or seal) is durable on this segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FenceAck {
    pub request_id: u64,
    pub pg: PgId,
    pub lease_epoch: u64,
    pub phase: FencePhase,
    /// Blocks from `from_block` on, ascending, at most FENCE_ACK_BLOCKS_MAX.
    pub blocks: Vec<FencedBlock>,
    /// False: ask again from the block after the last one listed.
    pub complete: bool,
}

pub(crate) fn encode_block_write(write: &BlockWrite, payload: &mut Vec<u8>) {
    payload.put_u64_le(write.request_id);
    payload.put_u32_le(write.pg.0);
    payload.put_u32_le(u32::from(write.repair));
    payload.put_u64_le(write.block.0);
    payload.put_u64_le(write.version);
    payload.put_u64_le(write.lease_epoch);
    payload.put_u64_le(write.fencing_token);
    payload.put_u32_le(write.data.len() as u32);
    payload.put_slice(&write.data);
}

pub(crate) fn decode_block_write(reader: &mut Reader<'_>, payload: &Bytes) -> Result<BlockWrite, CodecError> {
    let request_id = reader.u64()?;
    let pg = PgId(reader.u32()?);
    let repair = decode_flag(u64::from(reader.u32()?), "block write flags")?;
    Ok(BlockWrite {
        request_id,
        pg,
        repair,
        block: BlockId(reader.u64()?),
        version: reader.u64()?,
        lease_epoch: reader.u64()?,
        fencing_token: reader.u64()?,
        data: read_length_prefixed(reader, payload, BLOCK_BYTES_MAX, "block data")?,
    })
}

pub(crate) fn encode_block_write_ack(ack: &BlockWriteAck, payload: &mut Vec<u8>) {
    payload.put_u64_le(ack.request_id);
    payload.put_u32_le(ack.pg.0);
    payload.put_u32_le(0);
    payload.put_u64_le(ack.block.0);
}

pub(crate) fn decode_block_write_ack(reader: &mut Reader<'_>) -> Result<BlockWriteAck, CodecError> {
    let request_id = reader.u64()?;
    let pg = PgId(reader.u32()?);
    let _reserved = reader.u32()?;
    Ok(BlockWriteAck { request_id, pg, block: BlockId(reader.u64()?) })
}

pub(crate) fn encode_block_read(read: &BlockRead, payload: &mut Vec<u8>) {
    payload.put_u64_le(read.request_id);
    payload.put_u32_le(read.pg.0);
    payload.put_u32_le(read.sealed_cursor);
    payload.put_u64_le(read.block.0);
    payload.put_u64_le(read.want_token);
}

pub(crate) fn decode_block_read(reader: &mut Reader<'_>) -> Result<BlockRead, CodecError> {
    let request_id = reader.u64()?;
    let pg = PgId(reader.u32()?);
    let sealed_cursor = reader.u32()?;
    Ok(BlockRead { request_id, pg, sealed_cursor, block: BlockId(reader.u64()?), want_token: reader.u64()? })
}

pub(crate) fn encode_block_image(image: &BlockImage, payload: &mut Vec<u8>) {
    assert!(image.history.len() <= BLOCK_HISTORY_MAX && image.sealed.len() <= FENCED_EPOCHS_MAX);
    payload.put_u64_le(image.request_id);
    payload.put_u32_le(image.pg.0);
    payload.put_u16_le(image.history.len() as u16);
    payload.put_u16_le(image.sealed.len() as u16);
    payload.put_u64_le(image.block.0);
    payload.put_u32_le(image.sealed_cursor);
    payload.put_u32_le(0);
    payload.put_u64_le(image.data_token);
    for version in &image.history {
        payload.put_u64_le(version.version);
        payload.put_u64_le(version.lease_epoch);
        payload.put_u64_le(version.fencing_token);
        payload.put_u64_le(u64::from(version.repaired));
    }
    for epoch in &image.sealed {
        payload.put_u64_le(*epoch);
    }
    payload.put_u32_le(image.data.len() as u32);
    payload.put_slice(&image.data);
}

pub(crate) fn decode_block_image(reader: &mut Reader<'_>, payload: &Bytes) -> Result<BlockImage, CodecError> {
    let request_id = reader.u64()?;
    let pg = PgId(reader.u32()?);
    let history_count = reader.u16()? as usize;
    let sealed_count = reader.u16()? as usize;
    if history_count > BLOCK_HISTORY_MAX || sealed_count > FENCED_EPOCHS_MAX {
        let detail = format!("{history_count} versions, {sealed_count} sealed epochs");
        return Err(CodecError::Invalid { field: "block image counts", detail });
    }
    let block = BlockId(reader.u64()?);
    let sealed_cursor = reader.u32()?;
    let _reserved = reader.u32()?;
    let data_token = reader.u64()?;
    let mut history = Vec::with_capacity(history_count);
    for _ in 0..history_count {
        history.push(BlockVersionInfo {
            version: reader.u64()?,
            lease_epoch: reader.u64()?,
            fencing_token: reader.u64()?,
            repaired: decode_flag(reader.u64()?, "repaired")?,
        });
    }
    let sealed = (0..sealed_count).map(|_| reader.u64()).collect::<Result<Vec<u64>, _>>()?;
    let data = read_length_prefixed(reader, payload, BLOCK_BYTES_MAX, "block data")?;
    Ok(BlockImage { request_id, pg, block, history, data_token, data, sealed_cursor, sealed })
}

fn decode_flag(value: u64, field: &'static str) -> Result<bool, CodecError> {
    match value {
        0 => Ok(false),
        1 => Ok(true),
        other => Err(CodecError::Invalid { field, detail: other.to_string() }),
    }
}

fn decode_phase(value: u16) -> Result<FencePhase, CodecError> {
    match value {
        1 => Ok(FencePhase::Fence),
        2 => Ok(FencePhase::Sealed),
        other => Err(CodecError::Invalid { field: "fence phase", detail: other.to_string() }),
    }
}

pub(crate) fn encode_fence(fence: &FenceRequest, payload: &mut Vec<u8>) {
    payload.put_u64_le(fence.request_id);
    payload.put_u32_le(fence.pg.0);
    payload.put_u16_le(fence.phase as u16);
    payload.put_u16_le(0);
    payload.put_u64_le(fence.lease_epoch);
    payload.put_u64_le(fence.from_block.0);
}

pub(crate) fn decode_fence(reader: &mut Reader<'_>) -> Result<FenceRequest, CodecError> {
    let request_id = reader.u64()?;
    let pg = PgId(reader.u32()?);
    let phase = decode_phase(reader.u16()?)?;
    let _reserved = reader.u16()?;
    Ok(FenceRequest { request_id, pg, phase, lease_epoch: reader.u64()?, from_block: BlockId(reader.u64()?) })
}

pub(crate) fn encode_fence_ack(ack: &FenceAck, payload: &mut Vec<u8>) {
    assert!(ack.blocks.len() <= FENCE_ACK_BLOCKS_MAX, "fence ack exceeds FENCE_ACK_BLOCKS_MAX");
    payload.put_u64_le(ack.request_id);
    payload.put_u32_le(ack.pg.0);
    payload.put_u16_le(ack.phase as u16);
    payload.put_u16_le(u16::from(ack.complete));
    payload.put_u64_le(ack.lease_epoch);
    payload.put_u32_le(ack.blocks.len() as u32);
    payload.put_u32_le(0);
    for block in &ack.blocks {
        payload.put_u64_le(block.block.0);
        payload.put_u64_le(block.version);
        payload.put_u64_le(block.fencing_token);
    }
}

pub(crate) fn decode_fence_ack(reader: &mut Reader<'_>) -> Result<FenceAck, CodecError> {
    let request_id = reader.u64()?;
    let pg = PgId(reader.u32()?);
    let phase = decode_phase(reader.u16()?)?;
    let complete = decode_flag(u64::from(reader.u16()?), "fence ack complete")?;
    let lease_epoch = reader.u64()?;
    let count = reader.u32()? as usize;
    let _reserved = reader.u32()?;
    if count > FENCE_ACK_BLOCKS_MAX {
        return Err(CodecError::Invalid { field: "fence ack blocks", detail: count.to_string() });
    }
    let mut blocks = Vec::with_capacity(count);
    for _ in 0..count {
        blocks.push(FencedBlock {
            block: BlockId(reader.u64()?),
            version: reader.u64()?,
            fencing_token: reader.u64()?,
        });
    }
    Ok(FenceAck { request_id, pg, lease_epoch, phase, blocks, complete })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The payload sizes `docs/wire-format.md` §7 documents.
    #[test]
    fn payload_sizes_match_the_documentation() {
        let (pg, block) = (PgId(1), BlockId(2));
        let mut payload = Vec::new();
        let data = Bytes::from_static(b"12345");
        let write = BlockWrite {
            request_id: 1,
            pg,
            block,
            version: 1,
            lease_epoch: 1,
            fencing_token: 1,
            repair: false,
            data: data.clone(),
        };
        encode_block_write(&write, &mut payload);
        assert_eq!(payload.len(), 52 + 5);
        payload.clear();
        encode_block_write_ack(&BlockWriteAck { request_id: 1, pg, block }, &mut payload);
        assert_eq!(payload.len(), 24);
        payload.clear();
        encode_block_read(&BlockRead { request_id: 1, pg, block, want_token: 0, sealed_cursor: 0 }, &mut payload);
        assert_eq!(payload.len(), 32);
        payload.clear();
        let version = BlockVersionInfo { version: 1, lease_epoch: 1, fencing_token: 1, repaired: false };
        let image = BlockImage {
            request_id: 1,
            pg,
            block,
            history: vec![version; 2],
            data_token: 1,
            data,
            sealed_cursor: 0,
            sealed: vec![4, 5, 6],
        };
        encode_block_image(&image, &mut payload);
        assert_eq!(payload.len(), 40 + 2 * 32 + 3 * 8 + 4 + 5);
        payload.clear();
        let fence = FenceRequest { request_id: 1, pg, lease_epoch: 3, phase: FencePhase::Fence, from_block: block };
        encode_fence(&fence, &mut payload);
        assert_eq!(payload.len(), 32);
        payload.clear();
        let listed = FencedBlock { block, version: 1, fencing_token: 1 };
        let ack = FenceAck {
            request_id: 1,
            pg,
            lease_epoch: 3,
            phase: FencePhase::Fence,
            blocks: vec![listed; 3],
            complete: true,
        };
        encode_fence_ack(&ack, &mut payload);
        assert_eq!(payload.len(), 32 + 3 * 24);
    }
}
