//! Newtypes for ids and log positions.
//!
//! Every id or position that crosses an API is one of these types, so that a
//! page number can never be passed where an LSN is expected.

use serde::{Deserialize, Serialize};
use std::fmt;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident($inner:ty), $prefix:literal) => {
        $(#[$doc])*
        #[derive(
            Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
        )]
        pub struct $name(pub $inner);

        impl fmt::Display for $name {
            fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(formatter, concat!($prefix, "{}"), self.0)
            }
        }
    };
}

id_type!(
    /// A log sequence number. LSNs are allocated by the single volume writer,
    /// strictly increasing across the whole volume. `Lsn::ZERO` means "none":
    /// it is the backlink of the first record of a chain.
    Lsn(u64),
    "lsn:"
);
id_type!(
    /// A protection group: a 10 GiB (by default) slice of the volume,
    /// replicated as six segments.
    PgId(u32),
    "pg:"
);
id_type!(
    /// A page of the volume. Page `p` lives in PG `p / pages_per_pg`.
    PageId(u64),
    "page:"
);
id_type!(
    /// A block of a block volume (the shared disk of the file system). Block
    /// `b` lives in PG `b / blocks_per_pg`; the block space is sparse.
    BlockId(u64),
    "block:"
);
id_type!(
    /// A storage node of the cluster.
    NodeId(u32),
    "node:"
);
id_type!(
    /// An availability zone.
    AzId(u8),
    "az:"
);
id_type!(
    /// A volume epoch. Storage refuses requests that carry an epoch other
    /// than the segment's own (a stale writer is fenced off).
    Epoch(u64),
    "epoch:"
);

id_type!(
    /// A PG's membership epoch (A18 §4.1): bumped by every step of a
    /// membership change and written to a write quorum. A segment refuses
    /// appends that carry an older one (a writer with a stale view).
    MembershipEpoch(u64),
    "membership:"
);

impl MembershipEpoch {
    /// The membership a PG is placed with.
    pub const INITIAL: MembershipEpoch = MembershipEpoch(1);

    pub fn next(self) -> MembershipEpoch {
        MembershipEpoch(self.0.checked_add(1).expect("membership epoch space exhausted"))
    }
}

impl Lsn {
    /// "No record": the backlink of the first record in a chain.
    pub const ZERO: Lsn = Lsn(0);
    /// The first LSN a fresh volume allocates.
    pub const FIRST: Lsn = Lsn(1);

    /// The LSN that follows this one.
    pub fn next(self) -> Lsn {
        Lsn(self.0.checked_add(1).expect("LSN space exhausted"))
    }
}

impl Epoch {
    /// "No epoch": what a segment that no writer ever opened reports as
    /// its open epoch.
    pub const NONE: Epoch = Epoch(0);
    /// The epoch a new volume and its segments start in.
    pub const INITIAL: Epoch = Epoch(1);

    /// The epoch after this one.
    pub fn next(self) -> Epoch {
        Epoch(self.0.checked_add(1).expect("epoch space exhausted"))
    }
}

/// The position of a segment within its protection group: 0..6.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ReplicaIndex(pub u8);

impl fmt::Display for ReplicaIndex {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "replica:{}", self.0)
    }
}

/// A hasher for the integer ids above: one multiply, no random seed.
///
/// Hash maps keyed by LSN or page id are on every record's path, where
/// SipHash's cost shows; and a fixed hasher makes iteration order the same
/// in every run, which deterministic simulation needs. Not for keys an
/// adversary chooses.
#[derive(Clone, Copy, Debug, Default)]
pub struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.write_u64(u64::from(*byte));
        }
    }

    fn write_u64(&mut self, value: u64) {
        // Fibonacci hashing: the high bits, which hashbrown uses, mix well.
        self.0 = (self.0.rotate_left(5) ^ value).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// A `HashMap` keyed by ids, hashed with [`IdHasher`].
pub type IdHashMap<K, V> = std::collections::HashMap<K, V, std::hash::BuildHasherDefault<IdHasher>>;
/// A `HashSet` of ids, hashed with [`IdHasher`].
pub type IdHashSet<K> = std::collections::HashSet<K, std::hash::BuildHasherDefault<IdHasher>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_order_and_display() {
        assert!(Lsn(3) < Lsn(4));
        assert_eq!(Lsn(7).next(), Lsn(8));
        assert_eq!(PgId(2).to_string(), "pg:2");
        assert_eq!(Lsn::ZERO.to_string(), "lsn:0");
    }
    #[test]
    fn id_hash_maps_iterate_in_the_same_order_every_time() {
        let build = || (0..1000u64).map(|page| (PageId(page * 7919), page)).collect::<IdHashMap<PageId, u64>>();
        let first: Vec<u64> = build().values().copied().collect();
        assert_eq!(first, build().values().copied().collect::<Vec<u64>>());
        let hashes: std::collections::BTreeSet<u64> = (0..1000u64)
            .map(|lsn| {
                std::hash::BuildHasher::hash_one(&std::hash::BuildHasherDefault::<IdHasher>::default(), Lsn(lsn))
            })
            .collect();
        assert_eq!(hashes.len(), 1000, "distinct ids hash apart");
    }
}
