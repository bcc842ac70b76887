//! A deterministic RNG (SplitMix64) for simulations and fault injection.
//!
//! It is written here rather than taken from a crate so that a seed replays
//! the same run forever, whatever happens to external algorithms.

/// SplitMix64: tiny, fast, and good enough for fault schedules.
#[derive(Clone, Debug)]
pub struct SimRng {
    state: u64,
}

impl SimRng {
    pub fn new(seed: u64) -> Self {
        SimRng { state: seed ^ 0x9E37_79B9_7F4A_7C15 }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut mixed = self.state;
        mixed = (mixed ^ (mixed >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        mixed = (mixed ^ (mixed >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        mixed ^ (mixed >> 31)
    }

    /// Uniform in `0..bound` (`bound` > 0).
    pub fn below(&mut self, bound: u64) -> u64 {
        assert!(bound > 0, "SimRng::below needs a positive bound");
        ((self.next_u64() as u128 * bound as u128) >> 64) as u64
    }

    /// True with probability `probability` (0.0..=1.0).
    pub fn chance(&mut self, probability: f64) -> bool {
        probability > 0.0 && (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 <= probability
    }

    /// A new independent generator derived from this one.
    pub fn fork(&mut self) -> SimRng {
        SimRng::new(self.next_u64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_sequence() {
        let mut first = SimRng::new(42);
        let mut second = SimRng::new(42);
        for _ in 0..100 {
            assert_eq!(first.next_u64(), second.next_u64());
        }
        assert_ne!(SimRng::new(1).next_u64(), SimRng::new(2).next_u64());
    }

    #[test]
    fn below_stays_in_range_and_chance_extremes_hold() {
        let mut rng = SimRng::new(7);
        for _ in 0..1000 {
            assert!(rng.below(6) < 6);
            assert!(!rng.chance(0.0));
            assert!(rng.chance(1.0));
        }
    }
}
