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
    /// The epoch a new volume and its segments start in.
    pub const INITIAL: Epoch = Epoch(1);
}

/// The position of a segment within its protection group: 0..6.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ReplicaIndex(pub u8);

impl fmt::Display for ReplicaIndex {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "replica:{}", self.0)
    }
}

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
}
