//! Volume geometry: protection groups and where their segments live.
//!
//! A volume is `pg_count` PGs of `pg_bytes` each (10 GiB by default). Each PG
//! has six segments on six distinct nodes, two in each of three AZs, so that
//! losing a whole AZ and one more node ("AZ+1") still leaves a read quorum,
//! and losing any two nodes still leaves a write quorum.

use common::ids::{AzId, NodeId, PageId, PgId, ReplicaIndex};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

pub use common::limits::{READ_QUORUM, SEGMENTS_PER_PG, WRITE_QUORUM};
/// Default protection group size: 10 GiB.
pub const PG_BYTES_DEFAULT: u64 = 10 * 1024 * 1024 * 1024;
/// Default page size.
pub const PAGE_BYTES_DEFAULT: usize = 8192;

/// One storage node of the cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSpec {
    pub id: NodeId,
    pub az: AzId,
    pub address: String,
}

/// The storage nodes a volume may use.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterConfig {
    pub nodes: Vec<NodeSpec>,
}

/// One segment of a PG.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentPlacement {
    pub node: NodeId,
    pub az: AzId,
    pub address: String,
}

/// Where each PG's six segments live, and how pages map to PGs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeGeometry {
    pub pg_bytes: u64,
    pub page_bytes: usize,
    /// `segments[pg][replica]`.
    pub segments: Vec<[SegmentPlacement; SEGMENTS_PER_PG]>,
}

impl VolumeGeometry {
    /// Places `pg_count` PGs on the cluster: two nodes from each of three
    /// AZs per PG, rotating through each AZ's nodes so load spreads evenly.
    pub fn place(cluster: &ClusterConfig, pg_count: u32, pg_bytes: u64, page_bytes: usize) -> Result<Self, String> {
        if page_bytes == 0 || page_bytes > common::limits::PAGE_BYTES_MAX || !page_bytes.is_power_of_two() {
            return Err(format!("page size {page_bytes} must be a power of two up to PAGE_BYTES_MAX"));
        }
        if pg_bytes < page_bytes as u64 || !pg_bytes.is_multiple_of(page_bytes as u64) {
            return Err(format!("PG size {pg_bytes} must be a positive multiple of the page size {page_bytes}"));
        }
        let pages_per_pg = pg_bytes / page_bytes as u64;
        if pages_per_pg > common::limits::PAGES_PER_PG_MAX {
            return Err(format!(
                "a PG of {pg_bytes} bytes holds {pages_per_pg} pages of {page_bytes} bytes; PAGES_PER_PG_MAX is {}",
                common::limits::PAGES_PER_PG_MAX
            ));
        }
        if pg_count == 0 {
            return Err("a volume needs at least one PG".into());
        }
        let mut by_az: BTreeMap<AzId, Vec<&NodeSpec>> = BTreeMap::new();
        let mut seen = BTreeSet::new();
        for node in &cluster.nodes {
            if !seen.insert(node.id) {
                return Err(format!("{} is listed twice", node.id));
            }
            by_az.entry(node.az).or_default().push(node);
        }
        if by_az.len() != 3 || by_az.values().any(|nodes| nodes.len() < 2) {
            let shape: Vec<String> = by_az.iter().map(|(az, nodes)| format!("{az}: {} nodes", nodes.len())).collect();
            return Err(format!(
                "a PG needs two nodes in each of exactly three AZs; the cluster has {}",
                if shape.is_empty() { "no nodes".to_string() } else { shape.join(", ") }
            ));
        }
        let segments = (0..pg_count as usize)
            .map(|pg| {
                let chosen: Vec<SegmentPlacement> = by_az
                    .values()
                    .flat_map(|nodes| {
                        (0..2).map(move |slot| {
                            let node = nodes[(pg * 2 + slot) % nodes.len()];
                            SegmentPlacement { node: node.id, az: node.az, address: node.address.clone() }
                        })
                    })
                    .collect();
                chosen.try_into().expect("three AZs times two nodes")
            })
            .collect();
        Ok(VolumeGeometry { pg_bytes, page_bytes, segments })
    }

    pub fn pg_count(&self) -> u32 {
        self.segments.len() as u32
    }

    pub fn pages_per_pg(&self) -> u64 {
        self.pg_bytes / self.page_bytes as u64
    }

    /// Pages in the whole volume.
    pub fn page_count(&self) -> u64 {
        self.pages_per_pg() * u64::from(self.pg_count())
    }

    /// The PG that holds `page`, or `None` past the end of the volume.
    pub fn pg_of(&self, page: PageId) -> Option<PgId> {
        let pg = page.0 / self.pages_per_pg();
        (pg < u64::from(self.pg_count())).then_some(PgId(pg as u32))
    }

    pub fn segment(&self, pg: PgId, replica: ReplicaIndex) -> &SegmentPlacement {
        &self.segments[pg.0 as usize][replica.0 as usize]
    }

    /// Every distinct node the volume uses, with its address.
    pub fn nodes(&self) -> BTreeMap<NodeId, String> {
        self.segments.iter().flatten().map(|placement| (placement.node, placement.address.clone())).collect()
    }

    /// The PGs (and replica index) that `node` hosts a segment of.
    /// For each PG with a segment on `node`, the addresses of the nodes
    /// holding its other segments (whom that segment gossips with).
    pub fn peers_of(&self, node: NodeId) -> BTreeMap<PgId, Vec<String>> {
        self.segments_on(node)
            .into_iter()
            .map(|(pg, _)| {
                let others = self.segments[pg.0 as usize]
                    .iter()
                    .filter(|placement| placement.node != node)
                    .map(|placement| placement.address.clone())
                    .collect();
                (pg, others)
            })
            .collect()
    }

    pub fn segments_on(&self, node: NodeId) -> Vec<(PgId, ReplicaIndex)> {
        let mut hosted = Vec::new();
        for (pg, placements) in self.segments.iter().enumerate() {
            for (replica, placement) in placements.iter().enumerate() {
                if placement.node == node {
                    hosted.push((PgId(pg as u32), ReplicaIndex(replica as u8)));
                }
            }
        }
        hosted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(per_az: &[usize]) -> ClusterConfig {
        let mut nodes = Vec::new();
        for (az, count) in per_az.iter().enumerate() {
            for _ in 0..*count {
                let id = NodeId(nodes.len() as u32);
                nodes.push(NodeSpec { id, az: AzId(az as u8), address: format!("node{}", id.0) });
            }
        }
        ClusterConfig { nodes }
    }

    #[test]
    fn every_pg_gets_two_distinct_nodes_per_az() {
        let geometry = VolumeGeometry::place(&cluster(&[3, 3, 4]), 5, 1 << 20, 8192).unwrap();
        for placements in &geometry.segments {
            let nodes: BTreeSet<NodeId> = placements.iter().map(|placement| placement.node).collect();
            assert_eq!(nodes.len(), SEGMENTS_PER_PG, "six distinct nodes");
            for az in 0..3 {
                assert_eq!(placements.iter().filter(|placement| placement.az == AzId(az)).count(), 2);
            }
        }
        assert_eq!(geometry.pg_of(PageId(128)), Some(PgId(1)));
        assert_eq!(geometry.pg_of(PageId(5 * 128)), None);
    }

    #[test]
    fn bad_shapes_are_refused_with_a_reason() {
        assert!(VolumeGeometry::place(&cluster(&[2, 2]), 1, 1 << 20, 8192).unwrap_err().contains("three AZs"));
        assert!(VolumeGeometry::place(&cluster(&[2, 2, 1]), 1, 1 << 20, 8192).is_err());
        assert!(VolumeGeometry::place(&cluster(&[2, 2, 2]), 1, 1000, 8192).is_err());
        assert!(VolumeGeometry::place(&cluster(&[2, 2, 2]), 1, 1 << 20, 1000).is_err());
        let too_many_pages = (common::limits::PAGES_PER_PG_MAX + 1) * 512;
        let error = VolumeGeometry::place(&cluster(&[2, 2, 2]), 1, too_many_pages, 512).unwrap_err();
        assert!(error.contains("PAGES_PER_PG_MAX"), "{error}");
    }
}
