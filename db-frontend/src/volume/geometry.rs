//! Volume geometry: protection groups and where their segments live.
//!
//! A volume is `pg_count` PGs of `pg_bytes` each (10 GiB by default). Each PG
//! has six segments on six distinct nodes, two in each of three AZs, so that
//! losing a whole AZ and one more node ("AZ+1") still leaves a read quorum,
//! and losing any two nodes still leaves a write quorum.
//!
//! **Membership change** (A18 §4.1). Each PG carries a membership epoch.
//! Replacing the segment at replica `r` (on node F) by one on node G takes
//! two steps, each bumping the epoch: first a *joint* membership, in which
//! G sits in the extra slot [`JOINING_SLOT`] and a write needs 4 of 6 of the
//! old members (ABCDEF) **and** 4 of 6 of the new ones (ABCDEG), a read 3
//! of 6 of either; then the PG *settles* on ABCDEG (G takes replica `r`),
//! or rolls back to ABCDEF. [`VolumeGeometry::member_sets`] gives the sets
//! a quorum is counted in.

use common::ids::{AzId, MembershipEpoch, NodeId, PageId, PgId, ReplicaIndex};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

pub use common::limits::{READ_QUORUM, SEGMENT_SLOTS, SEGMENTS_PER_PG, WRITE_QUORUM};

/// The slot of the incoming segment while a membership change is joint.
pub const JOINING_SLOT: ReplicaIndex = ReplicaIndex(SEGMENTS_PER_PG as u8);
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

/// A PG's membership beyond its six segments: its epoch, and the change
/// in progress if any.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PgMembership {
    pub epoch: MembershipEpoch,
    /// Joint: `incoming` is replacing the segment at `replica`.
    pub replacing: Option<Replacement>,
}

impl Default for PgMembership {
    fn default() -> Self {
        PgMembership { epoch: MembershipEpoch::INITIAL, replacing: None }
    }
}

/// A membership change in its joint step.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replacement {
    pub replica: ReplicaIndex,
    pub incoming: SegmentPlacement,
}

/// Where each PG's segments live, and how pages map to PGs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeGeometry {
    pub pg_bytes: u64,
    pub page_bytes: usize,
    /// `segments[pg][replica]`: the settled members.
    pub segments: Vec<[SegmentPlacement; SEGMENTS_PER_PG]>,
    /// `memberships[pg]`.
    pub memberships: Vec<PgMembership>,
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
        let segments: Vec<[SegmentPlacement; SEGMENTS_PER_PG]> = (0..pg_count as usize)
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
        let memberships = vec![PgMembership::default(); segments.len()];
        Ok(VolumeGeometry { pg_bytes, page_bytes, segments, memberships })
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

    /// The segment in `slot` of `pg` (`JOINING_SLOT`: the incoming one of
    /// a joint membership).
    pub fn segment(&self, pg: PgId, slot: ReplicaIndex) -> &SegmentPlacement {
        if slot == JOINING_SLOT {
            let replacing = self.memberships[pg.0 as usize].replacing.as_ref();
            &replacing.expect("the joining slot is used only in a joint membership").incoming
        } else {
            &self.segments[pg.0 as usize][slot.0 as usize]
        }
    }

    pub fn membership(&self, pg: PgId) -> &PgMembership {
        &self.memberships[pg.0 as usize]
    }

    /// The slots of `pg` in use: its six replicas, and the joining slot
    /// during a change.
    pub fn slots(&self, pg: PgId) -> Vec<ReplicaIndex> {
        let joint = self.memberships[pg.0 as usize].replacing.is_some();
        (0..SEGMENT_SLOTS as u8).map(ReplicaIndex).filter(|slot| joint || *slot != JOINING_SLOT).collect()
    }

    /// The member sets of `pg` a quorum is counted in: the six replicas,
    /// and during a change also the new six (the joining slot in place of
    /// the replica it replaces).
    pub fn member_sets(&self, pg: PgId) -> Vec<[ReplicaIndex; SEGMENTS_PER_PG]> {
        let old: [ReplicaIndex; SEGMENTS_PER_PG] = std::array::from_fn(|replica| ReplicaIndex(replica as u8));
        match &self.memberships[pg.0 as usize].replacing {
            None => vec![old],
            Some(replacement) => {
                let mut new = old;
                new[replacement.replica.0 as usize] = JOINING_SLOT;
                vec![old, new]
            }
        }
    }

    /// Whether the slots `answered` holds make a write quorum of `pg`: 4 of
    /// 6 of every member set.
    pub fn is_write_quorum(&self, pg: PgId, answered: impl Fn(ReplicaIndex) -> bool) -> bool {
        let sets = self.member_sets(pg);
        sets.iter().all(|set| set.iter().filter(|slot| answered(**slot)).count() >= WRITE_QUORUM)
    }

    /// Whether the slots `answered` holds make a read quorum of `pg`: 3 of
    /// 6 of any member set.
    pub fn is_read_quorum(&self, pg: PgId, answered: impl Fn(ReplicaIndex) -> bool) -> bool {
        let sets = self.member_sets(pg);
        sets.iter().any(|set| set.iter().filter(|slot| answered(**slot)).count() >= READ_QUORUM)
    }

    /// Every distinct node the volume uses, with its address.
    pub fn nodes(&self) -> BTreeMap<NodeId, String> {
        (0..self.pg_count())
            .flat_map(|pg| self.slots(PgId(pg)).into_iter().map(move |slot| self.segment(PgId(pg), slot)))
            .map(|placement| (placement.node, placement.address.clone()))
            .collect()
    }

    /// For each PG with a segment on `node`, the addresses of the nodes
    /// holding its other segments (whom that segment gossips with).
    pub fn peers_of(&self, node: NodeId) -> BTreeMap<PgId, Vec<String>> {
        self.segments_on(node).into_iter().map(|(pg, _)| (pg, self.peer_addresses(pg, node))).collect()
    }

    /// The addresses of the segments of `pg` other than the one on `node`.
    pub fn peer_addresses(&self, pg: PgId, node: NodeId) -> Vec<String> {
        self.slots(pg)
            .into_iter()
            .map(|slot| self.segment(pg, slot))
            .filter(|placement| placement.node != node)
            .map(|placement| placement.address.clone())
            .collect()
    }

    /// The PGs (and slot) that `node` hosts a segment of.
    pub fn segments_on(&self, node: NodeId) -> Vec<(PgId, ReplicaIndex)> {
        let mut hosted = Vec::new();
        for pg in (0..self.pg_count()).map(PgId) {
            hosted.extend(
                self.slots(pg).into_iter().filter(|slot| self.segment(pg, *slot).node == node).map(|slot| (pg, slot)),
            );
        }
        hosted
    }

    /// The slot of `pg` that `node` holds, if any.
    pub fn slot_on(&self, pg: PgId, node: NodeId) -> Option<ReplicaIndex> {
        self.slots(pg).into_iter().find(|slot| self.segment(pg, *slot).node == node)
    }

    /// First step of replacing the segment at `replica` of `pg` by one on
    /// `incoming`'s node: the joint membership, at the next epoch. The
    /// incoming node must be in the same AZ (two segments per AZ) and hold
    /// no segment of the PG yet.
    pub fn begin_replacement(
        &mut self,
        pg: PgId,
        replica: ReplicaIndex,
        incoming: SegmentPlacement,
    ) -> Result<MembershipEpoch, String> {
        let membership = self.memberships.get(pg.0 as usize).ok_or_else(|| format!("the volume has no {pg}"))?;
        if let Some(replacement) = &membership.replacing {
            return Err(format!("{pg} is already replacing {} by {}", replacement.replica, replacement.incoming.node));
        }
        let outgoing =
            self.segments[pg.0 as usize].get(replica.0 as usize).ok_or_else(|| format!("{pg} has no {replica}"))?;
        if outgoing.az != incoming.az {
            return Err(format!(
                "{} is in {} but the segment it would replace is in {}: a PG keeps two segments per AZ",
                incoming.node, incoming.az, outgoing.az
            ));
        }
        if self.slot_on(pg, incoming.node).is_some() {
            return Err(format!("{} already holds a segment of {pg}", incoming.node));
        }
        let membership = &mut self.memberships[pg.0 as usize];
        membership.epoch = membership.epoch.next();
        membership.replacing = Some(Replacement { replica, incoming });
        Ok(membership.epoch)
    }

    /// Second step: the incoming segment takes the replaced one's replica
    /// (`settle`), or leaves (`!settle`: a roll-back), at the next epoch.
    pub fn end_replacement(&mut self, pg: PgId, settle: bool) -> Result<MembershipEpoch, String> {
        let membership = self.memberships.get_mut(pg.0 as usize).ok_or_else(|| format!("the volume has no {pg}"))?;
        let replacement =
            membership.replacing.take().ok_or_else(|| format!("{pg} has no membership change in progress"))?;
        membership.epoch = membership.epoch.next();
        if settle {
            self.segments[pg.0 as usize][replacement.replica.0 as usize] = replacement.incoming;
        }
        Ok(membership.epoch)
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

    fn spare(geometry: &VolumeGeometry, pg: PgId, replica: ReplicaIndex, node: u32) -> SegmentPlacement {
        let outgoing = geometry.segment(pg, replica);
        SegmentPlacement { node: NodeId(node), az: outgoing.az, address: format!("node{node}") }
    }

    #[test]
    fn a_replacement_is_joint_then_settles_at_successive_epochs() {
        let mut geometry = VolumeGeometry::place(&cluster(&[3, 2, 2]), 1, 1 << 20, 8192).unwrap();
        let pg = PgId(0);
        let replica = ReplicaIndex(2);
        let outgoing = geometry.segment(pg, replica).node;
        let incoming = spare(&geometry, pg, replica, 99);
        assert_eq!(geometry.membership(pg).epoch, MembershipEpoch::INITIAL);
        assert_eq!(geometry.slots(pg).len(), SEGMENTS_PER_PG);

        let joint = geometry.begin_replacement(pg, replica, incoming.clone()).unwrap();
        assert_eq!(joint, MembershipEpoch::INITIAL.next());
        assert_eq!(geometry.slots(pg).len(), SEGMENT_SLOTS, "the joining slot is in use");
        assert_eq!(geometry.segment(pg, JOINING_SLOT).node, NodeId(99));
        assert_eq!(geometry.slot_on(pg, NodeId(99)), Some(JOINING_SLOT));
        let sets = geometry.member_sets(pg);
        assert_eq!(sets.len(), 2);
        assert_eq!(sets[1][replica.0 as usize], JOINING_SLOT);
        assert!(geometry.peer_addresses(pg, outgoing).contains(&"node99".to_string()));

        let settled = geometry.end_replacement(pg, true).unwrap();
        assert_eq!(settled, joint.next());
        assert_eq!(geometry.segment(pg, replica).node, NodeId(99));
        assert_eq!(geometry.slot_on(pg, outgoing), None, "the replaced node left the PG");
        assert_eq!(geometry.member_sets(pg).len(), 1);
        assert!(geometry.segments_on(outgoing).is_empty());
    }

    #[test]
    fn a_rolled_back_replacement_keeps_the_old_six() {
        let mut geometry = VolumeGeometry::place(&cluster(&[2, 2, 2]), 1, 1 << 20, 8192).unwrap();
        let pg = PgId(0);
        let before = geometry.segment(pg, ReplicaIndex(0)).node;
        let incoming = spare(&geometry, pg, ReplicaIndex(0), 42);
        geometry.begin_replacement(pg, ReplicaIndex(0), incoming).unwrap();
        let epoch = geometry.end_replacement(pg, false).unwrap();
        assert_eq!(epoch.0, MembershipEpoch::INITIAL.0 + 2, "a roll-back is a new membership too");
        assert_eq!(geometry.segment(pg, ReplicaIndex(0)).node, before);
        assert_eq!(geometry.slot_on(pg, NodeId(42)), None);
    }

    #[test]
    fn bad_replacements_are_refused_with_a_reason() {
        let mut geometry = VolumeGeometry::place(&cluster(&[2, 2, 2]), 1, 1 << 20, 8192).unwrap();
        let pg = PgId(0);
        let mut other_az = spare(&geometry, pg, ReplicaIndex(0), 50);
        other_az.az = AzId((other_az.az.0 + 1) % 3);
        let error = geometry.begin_replacement(pg, ReplicaIndex(0), other_az).unwrap_err();
        assert!(error.contains("two segments per AZ"), "{error}");

        let member = geometry.segment(pg, ReplicaIndex(1)).clone();
        let same_az_member = geometry
            .slots(pg)
            .into_iter()
            .map(|slot| geometry.segment(pg, slot).clone())
            .find(|placement| placement.az == member.az && placement.node != member.node)
            .unwrap();
        let error = geometry.begin_replacement(pg, ReplicaIndex(1), same_az_member).unwrap_err();
        assert!(error.contains("already holds"), "{error}");

        assert!(geometry.begin_replacement(PgId(7), ReplicaIndex(0), member.clone()).unwrap_err().contains("no pg"));
        assert!(geometry.end_replacement(pg, true).unwrap_err().contains("no membership change"));

        geometry.begin_replacement(pg, ReplicaIndex(0), spare(&geometry, pg, ReplicaIndex(0), 60)).unwrap();
        let error =
            geometry.begin_replacement(pg, ReplicaIndex(3), spare(&geometry, pg, ReplicaIndex(3), 61)).unwrap_err();
        assert!(error.contains("already replacing"), "{error}");
        assert_eq!(geometry.membership(pg).epoch, MembershipEpoch::INITIAL.next(), "a refused change takes no epoch");
    }

    /// Table: during a change a write needs 4/6 of both sets, a read 3/6
    /// of either. Slot 6 is the joining segment, replacing replica 5.
    #[test]
    fn joint_quorums_count_in_both_member_sets() {
        let mut geometry = VolumeGeometry::place(&cluster(&[2, 2, 2]), 1, 1 << 20, 8192).unwrap();
        let pg = PgId(0);
        geometry.begin_replacement(pg, ReplicaIndex(5), spare(&geometry, pg, ReplicaIndex(5), 70)).unwrap();
        let table: &[(&[u8], bool, bool)] = &[
            // (answered slots, write quorum, read quorum)
            (&[0, 1, 2, 3], true, true),
            (&[0, 1, 2, 5], false, true),
            (&[0, 1, 2, 6], false, true),
            (&[0, 1, 2, 5, 6], true, true),
            (&[0, 1, 5], false, true),
            (&[0, 1, 6], false, true),
            (&[5, 6], false, false),
            (&[0, 1], false, false),
            (&[3, 4, 5, 6], false, true),
        ];
        for (answered, write, read) in table {
            let holds = |slot: ReplicaIndex| answered.contains(&slot.0);
            assert_eq!(geometry.is_write_quorum(pg, holds), *write, "write quorum of {answered:?}");
            assert_eq!(geometry.is_read_quorum(pg, holds), *read, "read quorum of {answered:?}");
        }
    }
}
