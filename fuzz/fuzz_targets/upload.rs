#![no_main]

// The checks live in ferry_fuzz::upload, which tests/corpus.rs replays on stable.
libfuzzer_sys::fuzz_target!(|data: &[u8]| ferry_fuzz::upload(data));
