//! The simulator's own promises: a seed replays byte for byte, a run of
//! seeds finds no violation, and a planted bug is caught.

use ferry_sim::{run_seed, run_seeds, SimOptions};

#[test]
fn a_seed_replays_byte_for_byte() {
    let options = SimOptions::default();
    for seed in [3, 11] {
        let a = run_seed(seed, &options).expect("run");
        let b = run_seed(seed, &options).expect("run again");
        assert_eq!(a.trace, b.trace, "seed {seed}: traces differ");
        assert_eq!(a.trace_hash, b.trace_hash);
        assert!(a.writes > 0, "seed {seed} wrote nothing");
    }
}

#[test]
fn seeds_run_without_violations() {
    let totals = run_seeds(1_000, 20, &SimOptions::default()).expect("run");
    if let Some(r) = totals.failed.first() {
        panic!("{}", r.explain().unwrap_or_default());
    }
    assert_eq!(totals.seeds, 20);
    assert!(totals.faults > 0, "faults were injected");
}

/// A checkpoint that confirms answered writes before its write checkpoint
/// covers them makes a device's own write vanish until the next
/// checkpoint: the checker must say so within a bounded number of seeds.
#[test]
fn a_planted_early_confirmation_is_caught() {
    let options = SimOptions {
        planted_confirm_early: true,
        ..SimOptions::default()
    };
    let mut caught = None;
    for seed in 0..50 {
        let report = run_seed(seed, &options).expect("run");
        if !report.violations.is_empty() {
            caught = Some((seed, report));
            break;
        }
    }
    let (seed, report) = caught.expect("the planted bug is caught within 50 seeds");
    let explained = report.explain().expect("an explanation");
    assert!(
        explained.contains(&format!("cargo xtask sim --seed {seed}")),
        "{explained}"
    );
    eprintln!("planted bug caught at seed {seed} (of 0..50)\n{explained}");
}
