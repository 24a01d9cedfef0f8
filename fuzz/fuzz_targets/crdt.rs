#![no_main]

// The checks live in ferry_fuzz::crdt, which tests/corpus.rs replays on stable.
//
// ferry-conflict guards every call into automerge with catch_unwind (a
// panic inside automerge on malformed bytes becomes an error). libFuzzer's
// panic hook aborts at the panic, before that guard can catch it, so the
// target installs a quiet hook once: a panic the guard catches is then no
// crash, and a panic nothing catches still reaches libfuzzer-sys, which
// aborts and reports it.
static QUIET_PANICS: std::sync::Once = std::sync::Once::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    QUIET_PANICS.call_once(|| std::panic::set_hook(Box::new(|_| {})));
    ferry_fuzz::crdt(data)
});
