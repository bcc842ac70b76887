//! Quorum tracking: from segment SCLs to PGCL, VCL and VDL.
//!
//! A pure state machine. Inputs: a record was allocated (its LSN, PG, and
//! whether it ends a mini-transaction), and a segment reported its SCL.
//! Outputs: the points on the log.
//!
//! - PGCL of a PG: the highest LSN that 4 of its 6 segments have completed,
//!   i.e. the 4th highest segment SCL. (A segment's SCL covers every record of
//!   its PG at or below it, so 4 SCLs >= L means every record <= L is on 4/6.)
//!   During a membership change (A18 §4.1) it is the lower of the 4th
//!   highest SCL among the old six and among the new six: 4/6 of both.
//! - VCL: the highest LSN such that every allocated record at or below it is
//!   complete in its own PG (A18 §2.3). A record in PG p is complete once
//!   PGCL(p) >= its LSN.
//! - VDL: the highest consistency point (CPL) at or below VCL.
//!
//! Invariants, asserted: PGCL, VCL and VDL never move backwards; VDL <= VCL
//! <= the highest allocated LSN. A segment's own SCL view may drop (a
//! restarted segment found corruption in the middle of its log), which never
//! lowers PGCL.

use common::ids::{Lsn, PgId, ReplicaIndex};
use std::collections::{BTreeSet, VecDeque};

use super::geometry::{JOINING_SLOT, SEGMENT_SLOTS, SEGMENTS_PER_PG, WRITE_QUORUM};

#[derive(Clone, Debug, Default)]
struct PgProgress {
    /// By slot: the six replicas, then the joining segment of a change.
    segment_complete: [Lsn; SEGMENT_SLOTS],
    /// During a membership change: the replica the joining slot replaces.
    replacing: Option<ReplicaIndex>,
    pg_complete: Lsn,
    /// Allocated LSNs of this PG above its PGCL, ascending.
    incomplete: VecDeque<Lsn>,
}

/// PGCL/VCL/VDL from acknowledgements.
#[derive(Clone, Debug)]
pub struct QuorumTracker {
    pgs: Vec<PgProgress>,
    /// (lowest incomplete LSN, pg) for every PG that has one.
    lowest_incomplete: BTreeSet<(Lsn, u32)>,
    highest_allocated: Lsn,
    /// Consistency points above VDL, ascending.
    consistency_points: VecDeque<Lsn>,
    volume_complete: Lsn,
    volume_durable: Lsn,
}

/// What one acknowledgement changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    pub pg_complete_advanced: bool,
    pub volume_complete: Lsn,
    pub volume_durable: Lsn,
    /// VDL moved: commit waiters may complete.
    pub volume_durable_advanced: bool,
}

impl PgProgress {
    /// The highest LSN on 4 of 6 of every member set.
    fn quorum_complete(&self) -> Lsn {
        let fourth_highest = |mut set: [Lsn; SEGMENTS_PER_PG]| {
            set.sort_unstable_by(|left, right| right.cmp(left));
            set[WRITE_QUORUM - 1]
        };
        let old: [Lsn; SEGMENTS_PER_PG] = std::array::from_fn(|replica| self.segment_complete[replica]);
        match self.replacing {
            None => fourth_highest(old),
            Some(replica) => {
                let mut new = old;
                new[replica.0 as usize] = self.segment_complete[JOINING_SLOT.0 as usize];
                fourth_highest(old).min(fourth_highest(new))
            }
        }
    }
}

impl QuorumTracker {
    /// A tracker for `pg_count` PGs whose log is complete and durable up to `start`.
    pub fn new(pg_count: u32, start: Lsn) -> Self {
        let pgs = (0..pg_count)
            .map(|_| PgProgress { segment_complete: [start; SEGMENT_SLOTS], pg_complete: start, ..Default::default() })
            .collect();
        QuorumTracker {
            pgs,
            lowest_incomplete: BTreeSet::new(),
            highest_allocated: start,
            consistency_points: VecDeque::new(),
            volume_complete: start,
            volume_durable: start,
        }
    }

    pub fn volume_complete_lsn(&self) -> Lsn {
        self.volume_complete
    }

    pub fn volume_durable_lsn(&self) -> Lsn {
        self.volume_durable
    }

    pub fn highest_allocated(&self) -> Lsn {
        self.highest_allocated
    }

    pub fn pg_complete_lsn(&self, pg: PgId) -> Lsn {
        self.pgs[pg.0 as usize].pg_complete
    }

    pub fn segment_complete_lsn(&self, pg: PgId, replica: ReplicaIndex) -> Lsn {
        self.pgs[pg.0 as usize].segment_complete[replica.0 as usize]
    }

    /// Records that `lsn` (strictly above every earlier one) belongs to `pg`.
    pub fn record_allocated(&mut self, lsn: Lsn, pg: PgId, consistency_point: bool) {
        assert!(lsn > self.highest_allocated, "LSNs are allocated in increasing order");
        self.highest_allocated = lsn;
        let progress = &mut self.pgs[pg.0 as usize];
        if progress.incomplete.is_empty() {
            self.lowest_incomplete.insert((lsn, pg.0));
        }
        progress.incomplete.push_back(lsn);
        if consistency_point {
            self.consistency_points.push_back(lsn);
        }
    }

    /// A membership change of `pg` entered its joint step: the joining
    /// segment (known complete through nothing yet) counts in place of
    /// `replica` in the new member set.
    pub fn begin_joint(&mut self, pg: PgId, replica: ReplicaIndex) {
        let progress = &mut self.pgs[pg.0 as usize];
        assert!(progress.replacing.is_none(), "one membership change per PG at a time");
        progress.replacing = Some(replica);
        progress.segment_complete[JOINING_SLOT.0 as usize] = Lsn::ZERO;
    }

    /// The change ended: settled (the joining segment takes the replica's
    /// place, with its SCL) or rolled back (it leaves).
    pub fn end_joint(&mut self, pg: PgId, settle: bool) {
        let progress = &mut self.pgs[pg.0 as usize];
        let replica = progress.replacing.take().expect("a membership change in progress");
        let joining = std::mem::take(&mut progress.segment_complete[JOINING_SLOT.0 as usize]);
        if settle {
            progress.segment_complete[replica.0 as usize] = joining;
        }
    }

    /// A segment reported its SCL. Stale (lower) reports are kept as the
    /// segment's own view but never lower PGCL.
    pub fn segment_acknowledged(&mut self, pg: PgId, slot: ReplicaIndex, segment_complete: Lsn) -> Progress {
        let progress = &mut self.pgs[pg.0 as usize];
        progress.segment_complete[slot.0 as usize] = segment_complete;
        let quorum_complete = progress.quorum_complete();
        let mut result = Progress {
            volume_complete: self.volume_complete,
            volume_durable: self.volume_durable,
            ..Progress::default()
        };
        if quorum_complete <= progress.pg_complete {
            return result;
        }
        progress.pg_complete = quorum_complete;
        result.pg_complete_advanced = true;
        if let Some(&lowest) = progress.incomplete.front() {
            self.lowest_incomplete.remove(&(lowest, pg.0));
            while progress.incomplete.front().is_some_and(|lsn| *lsn <= quorum_complete) {
                progress.incomplete.pop_front();
            }
            if let Some(&next) = progress.incomplete.front() {
                self.lowest_incomplete.insert((next, pg.0));
            }
        }
        self.advance_volume_points();
        result.volume_complete = self.volume_complete;
        result.volume_durable_advanced = self.volume_durable > result.volume_durable;
        result.volume_durable = self.volume_durable;
        result
    }

    fn advance_volume_points(&mut self) {
        let complete = match self.lowest_incomplete.first() {
            Some((lowest, _)) => Lsn(lowest.0 - 1),
            None => self.highest_allocated,
        };
        assert!(complete >= self.volume_complete, "VCL moved backwards: {} -> {complete}", self.volume_complete);
        self.volume_complete = complete;
        while self.consistency_points.front().is_some_and(|point| *point <= complete) {
            self.volume_durable = self.consistency_points.pop_front().expect("checked");
        }
        assert!(self.volume_durable <= self.volume_complete, "VDL above VCL");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn all_ack(tracker: &mut QuorumTracker, pg: u32, lsn: u64, replicas: &[u8]) -> Progress {
        let mut progress = Progress::default();
        for replica in replicas {
            progress = tracker.segment_acknowledged(PgId(pg), ReplicaIndex(*replica), Lsn(lsn));
        }
        progress
    }

    /// A17 §4.1: "complete to 1007, CPLs at 900/1000/1100 -> VDL 1000".
    #[test]
    fn brief_example_vdl_is_highest_cpl_at_or_below_vcl() {
        let mut tracker = QuorumTracker::new(1, Lsn::ZERO);
        for lsn in 1..=1100 {
            tracker.record_allocated(Lsn(lsn), PgId(0), [900, 1000, 1100].contains(&lsn));
        }
        let progress = all_ack(&mut tracker, 0, 1007, &[0, 1, 2, 3]);
        assert_eq!((progress.volume_complete, progress.volume_durable), (Lsn(1007), Lsn(1000)));
    }

    /// Table: (SCLs of the six segments) -> PGCL. PGCL is the 4th highest.
    #[test]
    fn pgcl_is_the_fourth_highest_scl() {
        let table: &[([u64; 6], u64)] = &[
            ([10, 10, 10, 10, 0, 0], 10),
            ([10, 10, 10, 0, 0, 0], 0),
            ([12, 11, 10, 9, 8, 7], 9),
            ([5, 5, 5, 5, 5, 5], 5),
            ([0, 20, 0, 20, 20, 19], 19),
            ([3, 1, 4, 1, 5, 9], 3),
        ];
        for (scls, expected) in table {
            let mut tracker = QuorumTracker::new(1, Lsn::ZERO);
            for lsn in 1..=20 {
                tracker.record_allocated(Lsn(lsn), PgId(0), true);
            }
            for (replica, scl) in scls.iter().enumerate() {
                tracker.segment_acknowledged(PgId(0), ReplicaIndex(replica as u8), Lsn(*scl));
            }
            assert_eq!(tracker.pg_complete_lsn(PgId(0)), Lsn(*expected), "SCLs {scls:?}");
        }
    }

    /// Table over two PGs: VCL waits for the slowest PG's lowest incomplete record.
    #[test]
    fn vcl_is_bounded_by_the_lowest_incomplete_record_of_any_pg() {
        let mut tracker = QuorumTracker::new(2, Lsn::ZERO);
        // LSNs 1,3,5 in PG 0; 2,4,6 in PG 1; every record a CPL.
        for lsn in 1..=6u64 {
            tracker.record_allocated(Lsn(lsn), PgId((lsn % 2 == 0) as u32), true);
        }
        let steps: &[(u32, u64, u64, u64)] = &[
            // (pg, SCL reported by 4 segments, expected VCL, expected VDL)
            (0, 5, 1, 1),
            (1, 2, 3, 3),
            (1, 6, 6, 6),
        ];
        for (pg, scl, vcl, vdl) in steps {
            let progress = all_ack(&mut tracker, *pg, *scl, &[0, 1, 2, 3]);
            assert_eq!((progress.volume_complete, progress.volume_durable), (Lsn(*vcl), Lsn(*vdl)));
        }
    }

    #[test]
    fn three_acks_are_not_enough_and_a_lower_report_never_lowers_pgcl() {
        let mut tracker = QuorumTracker::new(1, Lsn::ZERO);
        tracker.record_allocated(Lsn(1), PgId(0), true);
        assert_eq!(all_ack(&mut tracker, 0, 1, &[0, 1, 2]).volume_durable, Lsn::ZERO);
        assert!(all_ack(&mut tracker, 0, 1, &[5]).volume_durable_advanced);
        // Segment 0 restarts having lost its tail and reports 0.
        tracker.segment_acknowledged(PgId(0), ReplicaIndex(0), Lsn::ZERO);
        assert_eq!(tracker.pg_complete_lsn(PgId(0)), Lsn(1));
        assert_eq!(tracker.segment_complete_lsn(PgId(0), ReplicaIndex(0)), Lsn::ZERO);
    }

    #[test]
    fn vdl_waits_for_the_end_of_a_mini_transaction() {
        let mut tracker = QuorumTracker::new(1, Lsn::ZERO);
        tracker.record_allocated(Lsn(1), PgId(0), false);
        tracker.record_allocated(Lsn(2), PgId(0), false);
        tracker.record_allocated(Lsn(3), PgId(0), true);
        let progress = all_ack(&mut tracker, 0, 2, &[0, 1, 2, 3]);
        assert_eq!((progress.volume_complete, progress.volume_durable), (Lsn(2), Lsn::ZERO));
        let progress = all_ack(&mut tracker, 0, 3, &[0, 1, 2, 3]);
        assert_eq!(progress.volume_durable, Lsn(3));
    }

    /// Table: (SCLs of slots 0..=6 with slot 6 joining in place of
    /// replica 5) -> PGCL, the lower 4th highest of the two member sets.
    #[test]
    fn joint_pgcl_needs_four_of_both_member_sets() {
        let table: &[([u64; 7], u64)] = &[
            ([10, 10, 10, 10, 0, 0, 0], 10),
            ([10, 10, 10, 0, 0, 10, 0], 0),
            ([10, 10, 10, 0, 0, 0, 10], 0),
            ([10, 10, 10, 0, 0, 10, 10], 10),
            ([12, 11, 10, 9, 8, 20, 0], 9),
            ([20, 20, 20, 5, 5, 20, 7], 7),
        ];
        for (scls, expected) in table {
            let mut tracker = QuorumTracker::new(1, Lsn::ZERO);
            for lsn in 1..=20 {
                tracker.record_allocated(Lsn(lsn), PgId(0), true);
            }
            tracker.begin_joint(PgId(0), ReplicaIndex(5));
            for (slot, scl) in scls.iter().enumerate() {
                tracker.segment_acknowledged(PgId(0), ReplicaIndex(slot as u8), Lsn(*scl));
            }
            assert_eq!(tracker.pg_complete_lsn(PgId(0)), Lsn(*expected), "SCLs {scls:?}");
        }
    }

    #[test]
    fn a_settled_change_counts_the_joining_segment_as_the_replica() {
        let mut tracker = QuorumTracker::new(1, Lsn::ZERO);
        for lsn in 1..=4 {
            tracker.record_allocated(Lsn(lsn), PgId(0), true);
        }
        tracker.begin_joint(PgId(0), ReplicaIndex(0));
        all_ack(&mut tracker, 0, 2, &[0, 1, 2, 3, 4, 5, 6]);
        assert_eq!(tracker.pg_complete_lsn(PgId(0)), Lsn(2));
        tracker.end_joint(PgId(0), true);
        assert_eq!(tracker.segment_complete_lsn(PgId(0), ReplicaIndex(0)), Lsn(2), "slot 0 took the joining SCL");
        // After settling, slot 6 no longer counts: 3 of the six at 4 is not a quorum.
        all_ack(&mut tracker, 0, 4, &[6, 1, 2, 3]);
        assert_eq!(tracker.pg_complete_lsn(PgId(0)), Lsn(2));
        all_ack(&mut tracker, 0, 4, &[0]);
        assert_eq!(tracker.pg_complete_lsn(PgId(0)), Lsn(4));
    }

    #[test]
    fn a_rolled_back_change_forgets_the_joining_segment() {
        let mut tracker = QuorumTracker::new(1, Lsn::ZERO);
        tracker.record_allocated(Lsn(1), PgId(0), true);
        tracker.begin_joint(PgId(0), ReplicaIndex(4));
        all_ack(&mut tracker, 0, 1, &[6]);
        tracker.end_joint(PgId(0), false);
        assert_eq!(tracker.segment_complete_lsn(PgId(0), ReplicaIndex(4)), Lsn::ZERO);
        assert_eq!(tracker.segment_complete_lsn(PgId(0), JOINING_SLOT), Lsn::ZERO);
        all_ack(&mut tracker, 0, 1, &[0, 1, 2]);
        assert_eq!(tracker.pg_complete_lsn(PgId(0)), Lsn::ZERO);
    }

    proptest! {
        /// Against a brute-force model: random allocation over PGs, random
        /// (possibly stale, reordered) SCL reports consistent with delivery.
        #[test]
        fn matches_brute_force_model(
            pgs in proptest::collection::vec(0u32..3, 1..60),
            cpl_every in 1usize..4,
            reports in proptest::collection::vec((0u32..3, 0u8..6, any::<prop::sample::Index>()), 0..200),
        ) {
            let mut tracker = QuorumTracker::new(3, Lsn::ZERO);
            let mut is_cpl = Vec::new();
            for (index, pg) in pgs.iter().enumerate() {
                let cpl = index % cpl_every == cpl_every - 1;
                tracker.record_allocated(Lsn(index as u64 + 1), PgId(*pg), cpl);
                is_cpl.push(cpl);
            }
            let mut scls = [[0u64; 6]; 3];
            let (mut last_vcl, mut last_vdl) = (Lsn::ZERO, Lsn::ZERO);
            for (pg, replica, pick) in reports {
                // A segment's SCL must be an LSN of its PG (or 0).
                let mut candidates: Vec<u64> = vec![0];
                candidates.extend(pgs.iter().enumerate().filter(|(_, p)| **p == pg).map(|(i, _)| i as u64 + 1));
                let scl = candidates[pick.index(candidates.len())];
                scls[pg as usize][replica as usize] = scl;
                let progress = tracker.segment_acknowledged(PgId(pg), ReplicaIndex(replica), Lsn(scl));
                prop_assert!(progress.volume_complete >= last_vcl && progress.volume_durable >= last_vdl);
                last_vcl = progress.volume_complete;
                last_vdl = progress.volume_durable;
            }
            // Brute force: PGCL = max over time of the 4th highest SCL; a PGCL
            // never decreases, so recompute from the tracker's own monotone view.
            for (index, pg) in pgs.iter().enumerate() {
                let lsn = Lsn(index as u64 + 1);
                let complete = tracker.pg_complete_lsn(PgId(*pg)) >= lsn;
                prop_assert_eq!(lsn <= tracker.volume_complete_lsn(), complete && (0..index).all(|earlier| {
                    tracker.pg_complete_lsn(PgId(pgs[earlier])) >= Lsn(earlier as u64 + 1)
                }));
            }
            let expected_vdl = (1..=tracker.volume_complete_lsn().0).rev().find(|lsn| is_cpl[*lsn as usize - 1]).unwrap_or(0);
            prop_assert_eq!(tracker.volume_durable_lsn(), Lsn(expected_vdl));
            for (pg, segment_scls) in scls.iter().enumerate() {
                let mut sorted = *segment_scls;
                sorted.sort_unstable();
                prop_assert!(tracker.pg_complete_lsn(PgId(pg as u32)) >= Lsn(sorted[2]), "PGCL at least the current 4th highest");
            }
        }
    }
}
