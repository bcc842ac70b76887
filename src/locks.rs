//! `lab locks sim`: the lock service's seeded simulation from the command line.
//!
//! Runs many seeds (with a progress bar and a summary), or replays one seed
//! and prints its event log, so a failing seed from the test suite can be
//! examined: `lab locks sim --seed S --log`.

use anyhow::{Result, bail};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use lockserver::sim::{self, SimConfig, SimReport};
use serde::Serialize;
use std::path::PathBuf;

/// Most seeds in one `lab locks sim` run.
const SEEDS_MAX: u64 = 10_000_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Preset {
    /// 3 clerks, 4 locks, 5% loss, 2% duplicates, 1% long delays, crashes.
    Default,
    /// 5 clerks on 3 locks, 15% loss, 10% duplicates, 5% long delays, more crashes.
    HeavyFaults,
    /// 8 clerks on 16 locks.
    ManyClerks,
}

impl Preset {
    fn config(self) -> SimConfig {
        match self {
            Preset::Default => SimConfig::default(),
            Preset::HeavyFaults => SimConfig::heavy_faults(),
            Preset::ManyClerks => SimConfig::many_clerks(),
        }
    }
}

#[derive(Debug, Args)]
pub struct SimOptions {
    /// Seeds to run, starting at --first-seed
    #[arg(long, default_value_t = 1000)]
    pub seeds: u64,
    #[arg(long, default_value_t = 0)]
    pub first_seed: u64,
    /// Run only this seed (overrides --seeds)
    #[arg(long)]
    pub seed: Option<u64>,
    /// With --seed: print every event of the run
    #[arg(long, requires = "seed")]
    pub log: bool,
    /// Fault and contention shape
    #[arg(long, value_enum, default_value_t = Preset::Default)]
    pub preset: Preset,
    /// Write the summary as JSON to this file
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// What a multi-seed run found.
#[derive(Debug, Serialize)]
pub struct SimSummary {
    pub preset: Preset,
    pub seeds: u64,
    pub first_failure: Option<(u64, String)>,
    /// Counts over every seed that passed (`log_hash` unused).
    pub totals: SimReport,
}

pub fn run(options: &SimOptions) -> Result<()> {
    let config = options.preset.config();
    if let Some(seed) = options.seed {
        let (result, log) = sim::run_logged(seed, &config);
        if options.log {
            for line in &log {
                println!("{line}");
            }
        }
        return match result {
            Ok(report) => {
                println!(
                    "seed {seed}: every property held ({} events, log hash {:016x})",
                    report.events, report.log_hash
                );
                Ok(())
            }
            Err(error) => bail!("seed {seed} fails: {error}"),
        };
    }
    if options.seeds == 0 || options.seeds > SEEDS_MAX {
        bail!("--seeds must be between 1 and {SEEDS_MAX}, not {}", options.seeds);
    }
    let bar = ProgressBar::new(options.seeds);
    bar.set_style(ProgressStyle::with_template("{bar:40} {pos}/{len} seeds {msg} ({eta})")?);
    let mut summary =
        SimSummary { preset: options.preset, seeds: 0, first_failure: None, totals: SimReport::default() };
    for seed in options.first_seed..options.first_seed + options.seeds {
        summary.seeds += 1;
        match sim::run(seed, &config) {
            Ok(report) => summary.totals.add(&report),
            Err(error) => {
                summary.first_failure = Some((seed, error));
                break;
            }
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    println!("{}", render(&summary));
    if let Some(path) = &options.json {
        std::fs::write(path, serde_json::to_string_pretty(&summary)?)?;
        println!("JSON: {}", path.display());
    }
    if let Some((seed, error)) = &summary.first_failure {
        let preset = options.preset.to_possible_value().map(|value| value.get_name().to_string()).unwrap_or_default();
        bail!("seed {seed} fails: {error}\nreplay it with: lab locks sim --preset {preset} --seed {seed} --log");
    }
    Ok(())
}

fn render(summary: &SimSummary) -> String {
    let verdict = match &summary.first_failure {
        None => "every property held".to_string(),
        Some((seed, _)) => format!("FAILED at seed {seed}"),
    };
    [
        format!("{} seeds ({:?}): {verdict}", summary.seeds, summary.preset),
        format!("  events processed      {:>12}", summary.totals.events),
        format!("  operations            {:>12}", summary.totals.operations),
        format!("  grants                {:>12}", summary.totals.grants),
        format!("  clerk crashes         {:>12}", summary.totals.crashes),
        format!("  server restarts       {:>12}", summary.totals.server_restarts),
        format!("  leases lost (clerk)   {:>12}", summary.totals.leases_lost),
        format!("  dead leases recovered {:>12}", summary.totals.recoveries),
        format!("  writes accepted       {:>12}", summary.totals.writes_accepted),
        format!("  writes fenced off     {:>12}", summary.totals.writes_refused),
        "  checked after every event: no conflicting holders within valid leases, server invariants,".into(),
        "  no fenced write accepted, no release before the fence, new tokens above all earlier ones (across".into(),
        "  server restarts), no reclaim refused, exact use counts, bounded waits once faults stop (except".into(),
        "  many-clerks); at the end: every request granted, nothing queued, every dead lease recovered.".into(),
    ]
    .join("\n")
}
