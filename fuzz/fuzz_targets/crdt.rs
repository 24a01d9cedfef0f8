#![no_main]

// The checks live in ferry_fuzz::crdt, which tests/corpus.rs replays on stable.
libfuzzer_sys::fuzz_target!(|data: &[u8]| ferry_fuzz::crdt(data));
