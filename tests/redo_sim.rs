//! The seeded simulation of the redo protocol (`lab sim`, `src/sim.rs`):
//! a thousand seeds pass every invariant, a planted bug is caught within
//! that budget, and a seed replays exactly.

use lab::sim::{PlantedBug, failing_seeds, run_seed};

const SEEDS: u64 = 1000;

/// The thousand seeds, in two halves (the test harness runs them at once).
#[test]
fn seeds_1_to_500_keep_every_invariant() {
    let failures = failing_seeds(1..=SEEDS / 2, None);
    assert!(failures.is_empty(), "failing seeds (replay with lab sim --seed S): {failures:?}");
}

#[test]
fn seeds_501_to_1000_keep_every_invariant() {
    let failures = failing_seeds(SEEDS / 2 + 1..=SEEDS, None);
    assert!(failures.is_empty(), "failing seeds (replay with lab sim --seed S): {failures:?}");
}

#[test]
fn an_ack_counted_twice_is_caught_within_the_seed_budget() {
    let caught = (1..=SEEDS).find_map(|seed| run_seed(seed, Some(PlantedBug::AckCountedTwice)).err());
    let error = caught.expect("the planted bug went unnoticed over every seed");
    assert!(error.to_string().contains("PGCL"), "caught by the quorum check: {error}");
}

#[test]
fn a_seed_replays_exactly() {
    for seed in [3, 77] {
        let (first, second) = (run_seed(seed, None).expect("passes"), run_seed(seed, None).expect("passes"));
        assert_eq!(first.events, second.events, "seed {seed}: the event logs differ");
        assert_eq!(first.digest, second.digest);
        assert!(first.events.len() > 1000, "seed {seed} ran only {} events", first.events.len());
    }
}
