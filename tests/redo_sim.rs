//! The seeded simulation of the redo protocol (`lab sim`, `src/sim.rs`):
//! a thousand seeds pass every invariant while the faults they claim to
//! inject really happen, a planted bug is caught within that budget, and
//! a seed replays exactly.

use lab::sim::{PlantedBug, SimReport, run_seed, run_seed_logged};

const SEEDS: u64 = 1000;

/// Runs `seeds`, failing with every failing seed; returns the reports.
fn pass(seeds: std::ops::RangeInclusive<u64>) -> Vec<SimReport> {
    let mut reports = Vec::new();
    let mut failures = Vec::new();
    for seed in seeds {
        match run_seed(seed, None) {
            Ok(report) => reports.push(report),
            Err(error) => failures.push((seed, error.to_string())),
        }
    }
    assert!(failures.is_empty(), "failing seeds (replay with lab sim --seed S): {failures:?}");
    reports
}

/// The thousand seeds, in two halves (the test harness runs them at once).
/// Each half must also have exercised what the simulation claims to:
/// front-end crashes and zombies followed by recoveries, node crashes,
/// dropped messages, reads served during AZ+1 outages, gossip and repair.
#[test]
fn seeds_1_to_500_keep_every_invariant() {
    check_coverage(&pass(1..=SEEDS / 2));
}

#[test]
fn seeds_501_to_1000_keep_every_invariant() {
    check_coverage(&pass(SEEDS / 2 + 1..=SEEDS));
}

fn check_coverage(reports: &[SimReport]) {
    let sum = |field: fn(&SimReport) -> u64| reports.iter().map(field).sum::<u64>();
    let seeds = reports.len() as u64;
    assert!(sum(|report| report.frontend_failures) > seeds / 4, "front-end failures were injected");
    assert!(sum(|report| report.recoveries) > seeds, "recoveries beyond each run's first");
    assert!(sum(|report| report.crashes) > seeds, "node crashes were injected");
    assert!(sum(|report| report.messages_dropped) > seeds, "messages were dropped");
    assert!(sum(|report| report.reads_during_az_outage) > 0, "reads were served during AZ+1 outages");
    assert!(sum(|report| report.commits_acknowledged) > seeds * 100, "commits were acknowledged");
    assert!(sum(|report| report.gossip_records) > 0, "segments filled holes from their peers");
    assert!(sum(|report| report.hydrate_batches) > 0, "segments too far behind rebuilt from a peer's page state");
}

#[test]
fn an_ack_counted_twice_is_caught_within_the_seed_budget() {
    let caught = (1..=SEEDS).find_map(|seed| run_seed(seed, Some(PlantedBug::AckCountedTwice)).err());
    let error = caught.expect("the planted bug went unnoticed over every seed").to_string();
    assert!(error.contains("PGCL"), "caught by the quorum check: {error}");
}

#[test]
fn a_seed_replays_exactly() {
    for seed in [3, 77] {
        let (first, second) =
            (run_seed_logged(seed, None).0.expect("passes"), run_seed_logged(seed, None).0.expect("passes"));
        assert_eq!(first.events, second.events, "seed {seed}: the event logs differ");
        assert_eq!(first.digest, second.digest);
        assert!(first.events.len() > 1000, "seed {seed} ran only {} events", first.events.len());
        let (quick, again) = (run_seed(seed, None).expect("passes"), run_seed(seed, None).expect("passes"));
        assert_eq!(quick.digest, again.digest, "seed {seed}: the digest of an unlogged run differs");
    }
}
