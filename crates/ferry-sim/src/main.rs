//! `ferry-sim --seeds N [--first S] [--seed S] [--steps N] [--planted-bug] [--trace]`:
//! runs seeds of the fleet simulation and prints the figures; a violation
//! prints its seed, the history that shows it and the replay command, and
//! the exit code is 1.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use ferry_sim::{run_seed, run_seeds, SimOptions};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut options = SimOptions::default();
    let mut seeds = 100u64;
    let mut first = 0u64;
    let mut single = None;
    let mut trace = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| -> Result<u64> {
            it.next()
                .with_context(|| format!("{name} needs a number"))?
                .parse()
                .with_context(|| format!("{name} needs a number"))
        };
        match a.as_str() {
            "--seeds" => seeds = value("--seeds")?,
            "--first" => first = value("--first")?,
            "--seed" => single = Some(value("--seed")?),
            "--steps" => options.steps = usize::try_from(value("--steps")?)?,
            "--planted-bug" => options.planted_confirm_early = true,
            "--trace" => trace = true,
            other => bail!("unknown argument {other:?}; usage: ferry-sim --seeds N [--first S] [--seed S] [--steps N] [--planted-bug] [--trace]"),
        }
    }
    let started = Instant::now();
    if let Some(seed) = single {
        let report = run_seed(seed, &options)?;
        if trace {
            for line in &report.trace {
                println!("{line}");
            }
        }
        println!(
            "seed {seed} ({}): {} writes, {} harness faults, {} ms simulated, trace hash {:016x}, {} violations",
            report.strategy,
            report.writes,
            report.faults.total(),
            report.simulated_ms,
            report.trace_hash,
            report.violations.len()
        );
        if let Some(e) = report.explain() {
            println!("{e}");
            std::process::exit(1);
        }
        return Ok(());
    }
    let totals = run_seeds(first, seeds, &options)?;
    println!(
        "sim: {} seeds ({}..{}), {} writes, {} harness faults (plus the transports' own), {} s simulated, {} violations, {:.1} s real time",
        totals.seeds,
        first,
        first + seeds,
        totals.writes,
        totals.faults,
        totals.simulated_ms / 1000,
        totals.failed.len(),
        started.elapsed().as_secs_f64()
    );
    if let Some(report) = totals.failed.first() {
        println!(
            "failing seeds: {:?}",
            totals.failed.iter().map(|r| r.seed).collect::<Vec<_>>()
        );
        if let Some(e) = report.explain() {
            println!("{e}");
        }
        std::process::exit(1);
    }
    Ok(())
}
