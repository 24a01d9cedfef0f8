//! Join and group-by live queries under single-row updates, against the
//! same queries recomputed from scratch.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use ferry_core::{row_data, RowData, Value};
use ferry_query::{col, count, ChangeSet, Query, QueryEngine};
use std::hint::black_box;
use std::time::Duration;

const TICKETS: usize = 10_000;
const STATUSES: [&str; 4] = ["pending", "open", "done", "blocked"];

fn ticket(i: usize, status: usize, version: i64) -> RowData {
    row_data([
        ("title", Value::from(format!("ticket {i}"))),
        ("status", STATUSES[status % STATUSES.len()].into()),
        ("version", version.into()),
    ])
}

fn engine() -> QueryEngine {
    let mut db = QueryEngine::new();
    let setup = |db: &mut QueryEngine| -> Result<(), ferry_query::QueryError> {
        db.create_collection("tickets")?;
        db.create_collection("assignments")?;
        let mut cs = ChangeSet::new();
        for i in 0..TICKETS {
            cs = cs.upsert("tickets", format!("t{i}"), ticket(i, i, 1), false);
            if i % 2 == 0 {
                cs = cs.upsert(
                    "assignments",
                    format!("a{i}"),
                    row_data([
                        ("ticket_id", Value::from(format!("t{i}"))),
                        ("user", Value::from(format!("u{}", i % 50))),
                    ]),
                    false,
                );
            }
        }
        db.apply(cs)?;
        Ok(())
    };
    if let Err(e) = setup(&mut db) {
        panic!("setup failed: {e}");
    }
    db
}

fn join_query() -> Query {
    Query::from_as("tickets", "t")
        .inner_join("assignments", "a", "t.id", "a.ticket_id")
        .filter(col("t.status").eq("pending"))
        .select([("id", col("t.id")), ("title", col("t.title")), ("user", col("a.user"))])
}

fn group_query() -> Query {
    Query::from("tickets")
        .group_by([col("status")])
        .select([("status", col("status")), ("n", count())])
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("live_query");
    g.sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));

    for (name, q) in [("join", join_query()), ("group_by", group_query())] {
        // Incremental: one row changes status; the live query emits its diff.
        let mut db = engine();
        if let Err(e) = db.subscribe(&q) {
            panic!("subscribe: {e}");
        }
        let mut step = 0usize;
        g.bench_function(format!("{name}/incremental_update"), |b| {
            b.iter_batched(
                || {
                    step += 1;
                    let i = (step * 7919) % TICKETS;
                    ChangeSet::new().upsert("tickets", format!("t{i}"), ticket(i, step, step as i64), true)
                },
                |cs| black_box(db.apply(cs).map(|d| d.len()).unwrap_or(0)),
                BatchSize::SmallInput,
            )
        });
        // From scratch: the same update, then the whole query evaluated
        // again with hash joins/grouping (a fresh operator graph).
        let mut db = engine();
        let mut step = 0usize;
        g.bench_function(format!("{name}/recompute"), |b| {
            b.iter_batched(
                || {
                    step += 1;
                    let i = (step * 7919) % TICKETS;
                    ChangeSet::new().upsert("tickets", format!("t{i}"), ticket(i, step, step as i64), true)
                },
                |cs| {
                    let applied = db.apply(cs).is_ok();
                    let n = match db.subscribe(&q) {
                        Ok((id, r)) => {
                            let _ = db.unsubscribe(id);
                            r.len()
                        }
                        Err(_) => 0,
                    };
                    black_box((applied, n))
                },
                BatchSize::SmallInput,
            )
        });
        // The reference evaluator (nested-loop joins) is quadratic; only
        // the group-by runs it at this size.
        if name == "group_by" {
            g.bench_function(format!("{name}/reference_query"), |b| {
                b.iter(|| black_box(db.query(&q).map(|r| r.len()).unwrap_or(0)))
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
