//! Test helpers shared by the workspace (feature `testkit`).
//!
//! [`check`] runs a proptest property with a seed that is printed when the
//! property fails, and replays a failure when given that seed through the
//! `FERRY_SEED` environment variable. Cases default to the strategy's
//! config; `FERRY_CASES` overrides the count.

use proptest::strategy::{Strategy, ValueTree};
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestError, TestRng, TestRunner};

/// The seed to use: `FERRY_SEED` if set, else one derived from the time.
pub fn seed_from_env() -> u64 {
    if let Some(seed) = std::env::var("FERRY_SEED").ok().and_then(|s| s.parse().ok()) {
        return seed;
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    nanos ^ u64::from(std::process::id()).rotate_left(32)
}

fn rng_for(seed: u64) -> TestRng {
    let mut bytes = [0u8; 32];
    for (i, chunk) in bytes.chunks_mut(8).enumerate() {
        chunk.copy_from_slice(
            &seed
                .wrapping_add(i as u64)
                .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                .to_le_bytes(),
        );
    }
    TestRng::from_seed(RngAlgorithm::ChaCha, &bytes)
}

/// Run `test` on `cases` inputs drawn from `strategy`. On failure, panic
/// with the property's name, the seed, the shrunk input and the command
/// line that replays it.
pub fn check<S, F>(name: &str, cases: u32, strategy: S, test: F)
where
    S: Strategy,
    S::Value: std::fmt::Debug,
    F: Fn(S::Value) -> Result<(), TestCaseError>,
{
    let seed = seed_from_env();
    let cases = std::env::var("FERRY_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(cases);
    let config = Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    };
    let mut runner = TestRunner::new_with_rng(config, rng_for(seed));
    match runner.run(&strategy, test) {
        Ok(()) => {}
        Err(TestError::Fail(reason, input)) => panic!(
            "property {name} failed with seed {seed}: {reason}\nminimal input: {input:#?}\nreplay: FERRY_SEED={seed} cargo test {name}"
        ),
        Err(TestError::Abort(reason)) => panic!("property {name} aborted with seed {seed}: {reason}"),
    }
}

/// Draw one value from a strategy with a fixed seed (for seeded simulations
/// that want proptest's generators without shrinking).
pub fn sample<S: Strategy>(strategy: &S, seed: u64) -> S::Value {
    let mut runner = TestRunner::new_with_rng(Config::default(), rng_for(seed));
    match strategy.new_tree(&mut runner) {
        Ok(tree) => tree.current(),
        Err(reason) => panic!("strategy rejected every value for seed {seed}: {reason}"),
    }
}
