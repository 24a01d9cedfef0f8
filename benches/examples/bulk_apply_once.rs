//! One bulk apply of N synced rows (env `N`, default 1,000,000) into a fresh
//! store of the backend named by the first argument, timed, for looking at
//! one backend without criterion's repetitions:
//! `cargo run --release -p ferry-benches --example bulk_apply_once -- sled`.

use ferry_benches::{open, schema, tickets};
use ferry_store::WriteBatch;

fn main() {
    let backend = std::env::args().nth(1).unwrap_or_else(|| "sqlite".into());
    let n: usize = std::env::var("N")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    let rows = tickets(n);
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&backend, dir.path(), schema(false));
    let mut batch = WriteBatch::with_capacity(n);
    for t in &rows {
        batch.put_synced("tickets", t.id.clone(), t.data());
    }
    let start = std::time::Instant::now();
    store.apply(batch).expect("apply");
    let s = start.elapsed().as_secs_f64();
    println!(
        "{{\"backend\":\"{backend}\",\"N\":{n},\"apply_s\":{s:.3},\"rows_per_s\":{:.0}}}",
        n as f64 / s
    );
}
