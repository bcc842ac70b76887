//! A bitmap portion: one 4 KiB block of allocation bits
//! (`docs/frangipani-layout.md` §6). A workstation allocates from a portion
//! only while it holds that portion's lock. The block carries no header: its
//! version for log replay is the block volume's version of the block.

use crate::layout::{BITS_PER_PORTION, SMALL_BLOCK_BYTES};

/// The bits of one portion: bit `b` is bit `b % 8` (least significant
/// first) of byte `b / 8`; set means allocated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BitmapPortion {
    bits: Vec<u8>,
    /// Bits of this portion that stand for something (the last portion of
    /// a kind may cover fewer than 32,768 resources).
    valid: u64,
}

impl BitmapPortion {
    /// A portion read from its block (empty: never written, all free).
    pub fn decode(bytes: &[u8], valid: u64) -> Option<BitmapPortion> {
        assert!(valid <= BITS_PER_PORTION);
        let bits = match bytes.len() {
            0 => vec![0; SMALL_BLOCK_BYTES],
            SMALL_BLOCK_BYTES => bytes.to_vec(),
            _ => return None,
        };
        // Bits past the valid ones must be clear, or the block is not a bitmap of this shape.
        let stray = (valid..BITS_PER_PORTION).any(|bit| bits[(bit / 8) as usize] & (1 << (bit % 8)) != 0);
        (!stray).then_some(BitmapPortion { bits, valid })
    }

    pub fn encode(&self) -> Vec<u8> {
        self.bits.clone()
    }

    pub fn is_allocated(&self, bit: u64) -> bool {
        assert!(bit < self.valid, "bit {bit} is past this portion's {} bits", self.valid);
        self.bits[(bit / 8) as usize] & (1 << (bit % 8)) != 0
    }

    /// Takes the lowest free bit.
    pub fn allocate(&mut self) -> Option<u64> {
        let byte = self.bits.iter().position(|byte| *byte != 0xFF)?;
        let bit = byte as u64 * 8 + u64::from(self.bits[byte].trailing_ones());
        if bit >= self.valid {
            return None;
        }
        self.bits[byte] |= 1 << (bit % 8);
        Some(bit)
    }

    /// Frees `bit`; false if it was not allocated.
    pub fn free(&mut self, bit: u64) -> bool {
        let was = self.is_allocated(bit);
        self.bits[(bit / 8) as usize] &= !(1 << (bit % 8));
        was
    }

    /// Free bits left.
    pub fn free_count(&self) -> u64 {
        self.valid - self.bits.iter().map(|byte| u64::from(byte.count_ones())).sum::<u64>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_are_taken_lowest_first_freed_and_never_past_the_valid_ones() {
        let mut portion = BitmapPortion::decode(&[], 20).expect("an unwritten portion is all free");
        for expected in 0..20 {
            assert_eq!(portion.allocate(), Some(expected));
        }
        assert_eq!(portion.allocate(), None, "only 20 bits stand for something");
        assert_eq!(portion.free_count(), 0);
        assert!(portion.free(7));
        assert!(!portion.free(7), "freeing twice is reported");
        assert_eq!(portion.allocate(), Some(7));
        let again = BitmapPortion::decode(&portion.encode(), 20).expect("round trip");
        assert_eq!(again, portion);
        assert!(again.is_allocated(19) && again.is_allocated(7));
    }

    #[test]
    fn a_block_with_bits_set_past_its_valid_ones_is_refused() {
        let mut image = vec![0u8; SMALL_BLOCK_BYTES];
        image[3] = 1; // bit 24
        assert!(BitmapPortion::decode(&image, 24).is_none());
        assert!(BitmapPortion::decode(&image, 25).is_some());
        assert!(BitmapPortion::decode(&image[..100], 25).is_none());
        let full = BitmapPortion::decode(&vec![0xFF; SMALL_BLOCK_BYTES], BITS_PER_PORTION).expect("all taken");
        assert_eq!(full.free_count(), 0);
    }
}
