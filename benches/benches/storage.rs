//! Storage and write-path benchmarks, per backend:
//! - `local_write_batched`: one `LocalDb::write` of 1,000 inserts (visible
//!   state + upload queue in one transaction); throughput in ops/s.
//! - `local_write_single`: one write of one insert; latency.
//! - `bulk_apply`: applying N synced rows (env `FERRY_BULK_ROWS`, default
//!   1,000,000) in one batch, next to a plain rusqlite bulk insert of the
//!   same rows, the physical limit (sled on fewer rows, see below).

use std::sync::atomic::{AtomicU64, Ordering};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use ferry_benches::{open, plain_sqlite_insert, schema, tickets, BACKENDS};
use ferry_queue::{LocalDb, QueueError};
use ferry_store::WriteBatch;

const WRITE_BATCH_OPS: usize = 1_000;

fn local_write_batched(c: &mut Criterion) {
    let rows = tickets(WRITE_BATCH_OPS);
    let mut group = c.benchmark_group("local_write_batched");
    group.throughput(Throughput::Elements(WRITE_BATCH_OPS as u64));
    group.sample_size(20);
    for backend in BACKENDS {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = LocalDb::open(open(backend, dir.path(), schema(true))).expect("open");
        let round = AtomicU64::new(0);
        group.bench_function(backend, |b| {
            b.iter(|| {
                let r = round.fetch_add(1, Ordering::Relaxed);
                db.write(|tx| {
                    for t in &rows {
                        tx.put("tickets", &format!("{r}-{}", t.id), t.data())?;
                    }
                    Ok::<_, QueueError>(())
                })
                .expect("write");
            })
        });
    }
    group.finish();
}

fn local_write_single(c: &mut Criterion) {
    let rows = tickets(1);
    let mut group = c.benchmark_group("local_write_single");
    group.sample_size(30);
    for backend in BACKENDS {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = LocalDb::open(open(backend, dir.path(), schema(true))).expect("open");
        let round = AtomicU64::new(0);
        group.bench_function(backend, |b| {
            b.iter(|| {
                let r = round.fetch_add(1, Ordering::Relaxed);
                db.write(|tx| tx.put("tickets", &format!("{r}"), rows[0].data()))
                    .expect("write");
            })
        });
    }
    group.finish();
}

fn bulk_apply(c: &mut Criterion) {
    let n: usize = std::env::var("FERRY_BULK_ROWS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    let rows = tickets(n);
    let mut group = c.benchmark_group("bulk_apply");
    group.throughput(Throughput::Elements(n as u64));
    group.sample_size(10);
    group.bench_function("plain_rusqlite_insert", |b| {
        b.iter_batched(
            || tempfile::tempdir().expect("tempdir"),
            |dir| {
                plain_sqlite_insert(&dir.path().join("plain.db"), &rows).expect("insert");
                dir
            },
            BatchSize::PerIteration,
        )
    });
    for backend in BACKENDS {
        // sled 0.34 holds a whole batch in memory several times over (about
        // 6.5 KB per row measured here, growing faster than linearly): a
        // million-row batch does not fit in this machine's 24 GiB, so sled
        // is measured on fewer rows (`FERRY_BULK_ROWS_SLED`), named in the
        // benchmark id.
        let rows_here = if backend == "sled" {
            let sled_n: usize = std::env::var("FERRY_BULK_ROWS_SLED")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(200_000);
            &rows[..sled_n.min(n)]
        } else {
            &rows[..]
        };
        let id = if rows_here.len() == n {
            backend.to_owned()
        } else {
            format!("{backend}_{}_rows", rows_here.len())
        };
        group.throughput(Throughput::Elements(rows_here.len() as u64));
        // Each iteration gets a fresh store and batch (not timed), and the
        // store is closed before the next one: a large store per sample
        // must not pile up in memory.
        group.bench_function(id, |b| {
            b.iter_custom(|iters| {
                let mut total = std::time::Duration::ZERO;
                for _ in 0..iters {
                    let dir = tempfile::tempdir().expect("tempdir");
                    let store = open(backend, dir.path(), schema(false));
                    let mut batch = WriteBatch::with_capacity(rows_here.len());
                    for t in rows_here {
                        batch.put_synced("tickets", t.id.clone(), t.data());
                    }
                    let start = std::time::Instant::now();
                    store.apply(batch).expect("apply");
                    total += start.elapsed();
                    drop(store);
                    drop(dir);
                }
                total
            })
        });
    }
    group.finish();
}

criterion_group!(benches, local_write_batched, local_write_single, bulk_apply);
criterion_main!(benches);
