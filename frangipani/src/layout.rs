//! The on-disk layout of a Frangipani volume on the shared block volume
//! (F97 Fig. 4, scaled down and configurable).
//!
//! The block volume is a space of block ids, each block any size up to
//! `BLOCK_BYTES_MAX`, written whole with a version. The regions, in this
//! order from block 0, are dense, so the volume needs
//! [`Layout::total_blocks`] blocks (its PG count follows):
//!
//! | region | blocks | block size | what |
//! |---|---|---|---|
//! | parameters | 1 | 4 KiB | [`ParameterBlock`]: the shape of everything below |
//! | logs | `workstations × log_blocks` | 4 KiB | one private write-ahead log per workstation |
//! | bitmaps | see [`Layout::bitmap_blocks`] | 4 KiB | one bit per inode, small block and large block |
//! | inodes | `inodes` | 512 B | one inode per block: no false sharing between inode locks |
//! | small blocks | `small_blocks` | 4 KiB | a file's first 64 KiB |
//! | large blocks | `large_blocks` | 64 KiB | the rest of big files |
//!
//! Bitmaps are cut into *portions* of one bitmap block (32,768 bits) each,
//! and each portion covers one kind of resource (inodes, small blocks or
//! large blocks, in that order). Each portion is meant to be locked by one
//! workstation at a time, which then allocates from it alone, so different
//! workstations allocate without talking to each other (the allocator is
//! not built yet).
//!
//! `docs/frangipani-layout.md` draws the parameter block byte by byte.

use thiserror::Error;

/// Bytes of the parameter block, a log block, a bitmap block, a small block.
pub const SMALL_BLOCK_BYTES: usize = 4096;
/// Bytes of an inode block (one inode per block: a "sector" in F97).
pub const INODE_BYTES: usize = 512;
/// Bytes of a large block (the block volume's largest block).
pub const LARGE_BLOCK_BYTES: usize = common::limits::BLOCK_BYTES_MAX;
/// Bits in one bitmap portion (one bitmap block).
pub const BITS_PER_PORTION: u64 = (SMALL_BLOCK_BYTES * 8) as u64;
/// Most workstations a volume is made for.
pub const WORKSTATIONS_MAX: u32 = 1024;

const MAGIC: [u8; 4] = *b"FRGP";
const FORMAT_VERSION: u32 = 1;
/// Bytes of the parameter block that carry something (the rest is zero).
pub const PARAMETER_BYTES: usize = 48;

/// The kind of resource a bitmap bit stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Resource {
    Inode,
    SmallBlock,
    LargeBlock,
}

/// The shape of a volume: what the parameter block records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParameterBlock {
    pub workstations: u32,
    /// Blocks in each workstation's log.
    pub log_blocks: u32,
    pub inodes: u64,
    pub small_blocks: u64,
    pub large_blocks: u64,
}

/// Why a layout or parameter block is refused.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum LayoutError {
    #[error("invalid volume shape: {0}")]
    Invalid(String),
    #[error("not a Frangipani parameter block: {0}")]
    NotAParameterBlock(String),
}

impl ParameterBlock {
    /// A volume for tests and the demo: 8 workstations with 1,024-block
    /// (4 MiB) logs, and four bitmap portions of each resource (so four
    /// workstations allocate without sharing one): 131,072 inodes, 512 MiB
    /// of small and 8 GiB of large blocks. The block space is sparse:
    /// blocks never written take no room.
    pub fn small() -> ParameterBlock {
        let four_portions = 4 * BITS_PER_PORTION;
        ParameterBlock {
            workstations: 8,
            log_blocks: 1024,
            inodes: four_portions,
            small_blocks: four_portions,
            large_blocks: four_portions,
        }
    }

    /// The block image: magic, version, the shape, then a CRC32C over the
    /// bytes before it, zero-padded to a small block.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(SMALL_BLOCK_BYTES);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&self.workstations.to_le_bytes());
        out.extend_from_slice(&self.log_blocks.to_le_bytes());
        out.extend_from_slice(&self.inodes.to_le_bytes());
        out.extend_from_slice(&self.small_blocks.to_le_bytes());
        out.extend_from_slice(&self.large_blocks.to_le_bytes());
        let checksum = crc32c::crc32c(&out);
        out.extend_from_slice(&checksum.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        debug_assert_eq!(out.len(), PARAMETER_BYTES);
        out.resize(SMALL_BLOCK_BYTES, 0);
        out
    }

    /// Reads a parameter block back, refusing anything damaged or foreign.
    pub fn decode(bytes: &[u8]) -> Result<ParameterBlock, LayoutError> {
        let refuse = |why: String| Err(LayoutError::NotAParameterBlock(why));
        if bytes.len() < PARAMETER_BYTES {
            return refuse(format!("{} bytes, at least {PARAMETER_BYTES} needed", bytes.len()));
        }
        if bytes[..4] != MAGIC {
            return refuse("bad magic".into());
        }
        let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("four bytes"));
        let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("eight bytes"));
        if u32_at(4) != FORMAT_VERSION {
            return refuse(format!("format version {}, this build reads {FORMAT_VERSION}", u32_at(4)));
        }
        let (stored, actual) = (u32_at(40), crc32c::crc32c(&bytes[..40]));
        if stored != actual {
            return refuse(format!("checksum mismatch: stored {stored:#010x}, computed {actual:#010x}"));
        }
        let parameters = ParameterBlock {
            workstations: u32_at(8),
            log_blocks: u32_at(12),
            inodes: u64_at(16),
            small_blocks: u64_at(24),
            large_blocks: u64_at(32),
        };
        Layout::new(parameters)?;
        Ok(parameters)
    }
}

/// Where everything of a volume is, computed from its [`ParameterBlock`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub parameters: ParameterBlock,
    logs_base: u64,
    bitmaps_base: u64,
    inodes_base: u64,
    small_base: u64,
    large_base: u64,
    total: u64,
}

impl Layout {
    /// Lays the regions out, refusing shapes that cannot work.
    pub fn new(parameters: ParameterBlock) -> Result<Layout, LayoutError> {
        let invalid = |why: String| Err(LayoutError::Invalid(why));
        if parameters.workstations == 0 || parameters.workstations > WORKSTATIONS_MAX {
            return invalid(format!("{} workstations, outside 1..={WORKSTATIONS_MAX}", parameters.workstations));
        }
        if parameters.log_blocks < 4 {
            return invalid(format!("{} log blocks: at least 4, so a quarter can be reclaimed", parameters.log_blocks));
        }
        if parameters.inodes < 2 || parameters.small_blocks == 0 {
            return invalid("a volume needs at least the root inode and one small block".into());
        }
        let logs_base = 1;
        let logs = u64::from(parameters.workstations) * u64::from(parameters.log_blocks);
        let bitmaps_base = logs_base + logs;
        let bitmap_blocks = [parameters.inodes, parameters.small_blocks, parameters.large_blocks]
            .iter()
            .map(|count| count.div_ceil(BITS_PER_PORTION))
            .sum::<u64>();
        let inodes_base = bitmaps_base + bitmap_blocks;
        let small_base = inodes_base.checked_add(parameters.inodes);
        let large_base = small_base.and_then(|base| base.checked_add(parameters.small_blocks));
        let total = large_base.and_then(|base| base.checked_add(parameters.large_blocks));
        let (Some(small_base), Some(large_base), Some(total)) = (small_base, large_base, total) else {
            return invalid("the regions overflow the block space".into());
        };
        Ok(Layout { parameters, logs_base, bitmaps_base, inodes_base, small_base, large_base, total })
    }

    /// Blocks the volume needs, from block 0.
    pub fn total_blocks(&self) -> u64 {
        self.total
    }

    /// The parameter block's id.
    pub fn parameter_block(&self) -> u64 {
        0
    }

    /// Block `index` of workstation `workstation`'s log.
    pub fn log_block(&self, workstation: u32, index: u32) -> u64 {
        assert!(workstation < self.parameters.workstations && index < self.parameters.log_blocks);
        self.logs_base + u64::from(workstation) * u64::from(self.parameters.log_blocks) + u64::from(index)
    }

    /// How many inodes, small blocks or large blocks the volume has.
    pub fn count(&self, resource: Resource) -> u64 {
        match resource {
            Resource::Inode => self.parameters.inodes,
            Resource::SmallBlock => self.parameters.small_blocks,
            Resource::LargeBlock => self.parameters.large_blocks,
        }
    }

    /// The bits portion `portion` of `resource` covers (the last may cover fewer).
    pub fn portion_bits(&self, resource: Resource, portion: u64) -> u64 {
        (self.count(resource) - portion * BITS_PER_PORTION).min(BITS_PER_PORTION)
    }

    /// Bitmap portions (blocks) of one kind of resource.
    pub fn portions(&self, resource: Resource) -> u64 {
        self.count(resource).div_ceil(BITS_PER_PORTION)
    }

    /// Bitmap blocks in all.
    pub fn bitmap_blocks(&self) -> u64 {
        self.inodes_base - self.bitmaps_base
    }

    /// The bitmap block of portion `portion` of `resource`'s bitmap.
    pub fn bitmap_block(&self, resource: Resource, portion: u64) -> u64 {
        assert!(portion < self.portions(resource), "{resource:?} has no portion {portion}");
        let before = match resource {
            Resource::Inode => 0,
            Resource::SmallBlock => self.portions(Resource::Inode),
            Resource::LargeBlock => self.portions(Resource::Inode) + self.portions(Resource::SmallBlock),
        };
        self.bitmaps_base + before + portion
    }

    /// The portion holding the bit of resource number `number`, and the bit in it.
    pub fn bit_of(&self, resource: Resource, number: u64) -> (u64, u64) {
        assert!(number < self.count(resource), "{resource:?} {number} is outside the volume");
        (number / BITS_PER_PORTION, number % BITS_PER_PORTION)
    }

    /// The block of inode `inode`.
    pub fn inode_block(&self, inode: u64) -> u64 {
        assert!(inode < self.parameters.inodes, "inode {inode} is outside the volume");
        self.inodes_base + inode
    }

    /// The inode whose block is `block` (the inverse of [`Self::inode_block`]).
    pub fn inode_number(&self, block: u64) -> u64 {
        assert!(self.is_inode_block(block), "block {block} is not an inode block");
        block - self.inodes_base
    }

    /// The block id of small block `number`, or of large block `number`.
    pub fn data_block(&self, resource: Resource, number: u64) -> u64 {
        assert!(number < self.count(resource), "{resource:?} {number} is outside the volume");
        match resource {
            Resource::SmallBlock => self.small_base + number,
            Resource::LargeBlock => self.large_base + number,
            Resource::Inode => self.inode_block(number),
        }
    }

    /// Which small or large block `block` is (the inverse of [`Self::data_block`]).
    pub fn data_number(&self, block: u64) -> Option<(Resource, u64)> {
        let end = self.large_base + self.parameters.large_blocks;
        match block {
            _ if block >= end => None,
            _ if block >= self.large_base => Some((Resource::LargeBlock, block - self.large_base)),
            _ if block >= self.small_base => Some((Resource::SmallBlock, block - self.small_base)),
            _ => None,
        }
    }

    pub fn is_inode_block(&self, block: u64) -> bool {
        (self.inodes_base..self.small_base).contains(&block)
    }

    pub fn is_bitmap_block(&self, block: u64) -> bool {
        (self.bitmaps_base..self.inodes_base).contains(&block)
    }

    pub fn is_small_block(&self, block: u64) -> bool {
        (self.small_base..self.large_base).contains(&block)
    }

    /// The size of block `block`, by its region.
    pub fn block_bytes(&self, block: u64) -> usize {
        match block {
            _ if block >= self.large_base => LARGE_BLOCK_BYTES,
            _ if block >= self.small_base => SMALL_BLOCK_BYTES,
            _ if block >= self.inodes_base => INODE_BYTES,
            _ => SMALL_BLOCK_BYTES,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn a_parameter_block_round_trips_and_damage_is_refused() {
        let parameters = ParameterBlock::small();
        let image = parameters.encode();
        assert_eq!(image.len(), SMALL_BLOCK_BYTES);
        assert_eq!(ParameterBlock::decode(&image), Ok(parameters));
        for at in [0, 5, 9, 20, 41] {
            let mut damaged = image.clone();
            damaged[at] ^= 1;
            assert!(ParameterBlock::decode(&damaged).is_err(), "a flipped bit at byte {at} went unnoticed");
        }
        assert!(ParameterBlock::decode(&image[..PARAMETER_BYTES - 1]).is_err());
    }

    #[test]
    fn regions_are_dense_disjoint_and_sized_by_kind() {
        let layout = Layout::new(ParameterBlock::small()).expect("valid");
        let parameters = layout.parameters;
        let mut seen = BTreeSet::new();
        let mut claim = |block: u64| assert!(seen.insert(block), "block {block} claimed twice");
        claim(layout.parameter_block());
        for workstation in 0..parameters.workstations {
            for index in 0..parameters.log_blocks {
                claim(layout.log_block(workstation, index));
            }
        }
        for resource in [Resource::Inode, Resource::SmallBlock, Resource::LargeBlock] {
            for portion in 0..layout.portions(resource) {
                claim(layout.bitmap_block(resource, portion));
            }
        }
        for inode in 0..parameters.inodes {
            claim(layout.inode_block(inode));
        }
        for number in 0..parameters.small_blocks {
            claim(layout.data_block(Resource::SmallBlock, number));
        }
        for number in 0..parameters.large_blocks {
            claim(layout.data_block(Resource::LargeBlock, number));
        }
        assert_eq!(seen.len() as u64, layout.total_blocks(), "every block of the volume belongs to one region");
        assert_eq!(seen.last().copied(), Some(layout.total_blocks() - 1), "no gaps");
        assert_eq!(layout.total_blocks(), 401_421, "the figure in docs/frangipani-layout.md");
        assert_eq!(layout.block_bytes(layout.inode_block(7)), INODE_BYTES);
        assert_eq!(layout.block_bytes(layout.data_block(Resource::SmallBlock, 0)), SMALL_BLOCK_BYTES);
        assert_eq!(layout.block_bytes(layout.data_block(Resource::LargeBlock, 3)), LARGE_BLOCK_BYTES);
        assert_eq!(layout.block_bytes(layout.log_block(2, 5)), SMALL_BLOCK_BYTES);
    }

    #[test]
    fn each_bit_lives_in_exactly_one_portion() {
        let tiny = ParameterBlock { inodes: 4096, small_blocks: 16_384, large_blocks: 4096, ..ParameterBlock::small() };
        let layout = Layout::new(tiny).expect("valid");
        assert_eq!(layout.portions(Resource::Inode), 1);
        assert_eq!(layout.portions(Resource::SmallBlock), 1);
        let last = layout.parameters.small_blocks - 1;
        assert_eq!(layout.bit_of(Resource::SmallBlock, last), (0, last));
        let big = Layout::new(ParameterBlock { small_blocks: 3 * BITS_PER_PORTION + 1, ..tiny }).expect("valid");
        assert_eq!(big.portions(Resource::SmallBlock), 4);
        assert_eq!(big.bit_of(Resource::SmallBlock, 3 * BITS_PER_PORTION), (3, 0));
        assert_eq!(big.bitmap_blocks(), 1 + 4 + 1);
        let default = Layout::new(ParameterBlock::small()).expect("valid");
        for resource in [Resource::Inode, Resource::SmallBlock, Resource::LargeBlock] {
            assert_eq!(default.portions(resource), 4, "four workstations allocate apart");
        }
    }

    #[test]
    fn shapes_that_cannot_work_are_refused() {
        let small = ParameterBlock::small();
        for bad in [
            ParameterBlock { workstations: 0, ..small },
            ParameterBlock { workstations: WORKSTATIONS_MAX + 1, ..small },
            ParameterBlock { log_blocks: 3, ..small },
            ParameterBlock { inodes: 1, ..small },
            ParameterBlock { small_blocks: 0, ..small },
            ParameterBlock { large_blocks: u64::MAX, ..small },
        ] {
            assert!(Layout::new(bad).is_err(), "{bad:?} was taken");
        }
    }
}
