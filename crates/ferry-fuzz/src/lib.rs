//! The logic of Ferry's fuzz targets: one plain function per decoder that
//! reads bytes from the network or the disk. The cargo-fuzz targets in
//! `fuzz/fuzz_targets/` (nightly, libFuzzer) call these functions, and so
//! does `tests/corpus.rs`, which replays every checked-in input of
//! `fuzz/corpus/<target>/` and `fuzz/artifacts/<target>/` on stable, so a
//! plain `cargo test` keeps the regression corpora green.
//!
//! Every function takes arbitrary bytes and checks what must hold for
//! them: decoding never panics, bad input is an error, and where an
//! encoder exists whatever decodes re-encodes to something that decodes to
//! the same value (compared with `==` and, stricter, by `Debug` form, which
//! tells `Integer(1)` from `Real(1.0)` and `0.0` from `-0.0`).
//!
//! Panics are the point here: a failed check panics (`assert!`, `panic!`)
//! so libFuzzer records the input as a crash. Those assertions are the only
//! places this crate panics on purpose; there is no `unwrap` or `expect`
//! outside them.

mod codec;
mod crdt;
mod protocol;
mod rules;

pub use codec::{entry_codec, index_key, row_codec};
pub use crdt::{crdt, crdt_input};
pub use protocol::{stream_line, upload};
pub use rules::sync_rules;

/// A fuzz target's logic: takes any bytes, panics only when a check fails.
pub type TargetFn = fn(&[u8]);

/// Every target, by the name of its file in `fuzz/fuzz_targets/` and of its
/// corpus directory `fuzz/corpus/<name>/`.
pub const TARGETS: &[(&str, TargetFn)] = &[
    ("stream_line", stream_line),
    ("upload", upload),
    ("row_codec", row_codec),
    ("entry_codec", entry_codec),
    ("index_key", index_key),
    ("sync_rules", sync_rules),
    ("crdt", crdt),
];

/// The target named `name`.
pub fn target(name: &str) -> Option<TargetFn> {
    TARGETS.iter().find(|(n, _)| *n == name).map(|(_, f)| *f)
}

/// Assert that two values are equal both by `==` and by their `Debug`
/// form (the stricter check: `Value`'s `==` equates `Integer(1)` with
/// `Real(1.0)`).
#[track_caller]
pub(crate) fn assert_same<T: PartialEq + std::fmt::Debug>(what: &str, before: &T, after: &T) {
    assert!(
        before == after,
        "{what}: round trip changed the value\nbefore: {before:?}\nafter:  {after:?}"
    );
    let (b, a) = (format!("{before:?}"), format!("{after:?}"));
    assert_eq!(b, a, "{what}: round trip changed the value's form");
}
