//! Live query benchmark: N tickets, a live `status = 'pending' ORDER BY
//! updated_at DESC LIMIT 50`, K single-row updates that each move a pending
//! ticket to the top. Prints one JSON line.
//!
//! `N=100000 K=1000 cargo run --release -p ferry-query --example live_query_bench`

use std::sync::{Arc, Mutex};
use std::time::Instant;

use ferry_core::{row_data, RowData, Value};
use ferry_query::{col, ChangeSet, Diff, Order, Query, QueryEngine};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n = env_usize("N", 100_000);
    let k = env_usize("K", 1_000);

    let mut db = QueryEngine::new();
    db.create_collection("tickets")?;
    // The app's view of a ticket: regenerated from its number and its
    // current updated_at, so the bench keeps no second copy of the rows.
    let ticket = |i: usize, updated_at: i64, version: i64| -> RowData {
        let status = match i % 3 {
            0 => "pending",
            1 => "open",
            _ => "done",
        };
        row_data([
            ("title", Value::from(format!("ticket {i}"))),
            (
                "description",
                Value::from(format!("description of ticket {i}, long enough to be realistic")),
            ),
            ("status", status.into()),
            ("deleted_at", Value::Null),
            ("created_at", Value::from(i as i64)),
            ("updated_at", Value::from(updated_at)),
            ("version", Value::from(version)),
        ])
    };
    let mut cs = ChangeSet::new();
    for i in 0..n {
        cs = cs.upsert("tickets", format!("t{i}"), ticket(i, i as i64, 1), false);
    }
    db.apply(cs)?;

    let q = Query::from("tickets")
        .filter(col("status").eq("pending"))
        .select_cols(["id", "title", "updated_at"])
        .order_by(col("updated_at"), Order::Desc)
        .limit(50);

    // What the subscriber last saw at position 0.
    let first_seen: Arc<Mutex<Option<String>>> = Arc::default();
    let sink = first_seen.clone();
    let callback = Box::new(move |d: &Diff| {
        let top = d
            .updated
            .iter()
            .find(|u| u.new_index == 0)
            .map(|u| &u.new)
            .or_else(|| d.added.iter().find(|a| a.index == 0).map(|a| &a.row));
        if let (Some(row), Ok(mut seen)) = (top, sink.lock()) {
            *seen = row.id().map(str::to_owned);
        }
    });

    let t0 = Instant::now();
    let (_sub, initial) = db.subscribe_with(&q, callback)?;
    let build = t0.elapsed();
    assert_eq!(initial.len(), 50.min(n.div_ceil(3)));

    let pending: Vec<usize> = (0..n).filter(|i| i % 3 == 0).collect();
    assert!(!pending.is_empty(), "N must be at least 1");
    let mut next_ts = n as i64;
    let mut rng: u64 = 0x2545_f491_4f6c_dd1d;
    let mut lat_us: Vec<f64> = Vec::with_capacity(k);
    for _ in 0..k {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let i = pending[(rng % pending.len() as u64) as usize];
        next_ts += 1;
        let cs = ChangeSet::new().upsert(
            "tickets",
            format!("t{i}"),
            ticket(i, next_ts, next_ts - n as i64 + 1),
            true,
        );

        let start = Instant::now();
        db.apply(cs)?;
        let elapsed = start.elapsed();

        let seen = first_seen.lock().map(|mut s| s.take()).unwrap_or_default();
        let want = format!("t{i}");
        assert_eq!(seen.as_deref(), Some(want.as_str()), "the updated ticket is first");
        lat_us.push(elapsed.as_secs_f64() * 1e6);
    }
    lat_us.sort_by(f64::total_cmp);
    let pick = |p: f64| -> f64 {
        if lat_us.is_empty() {
            return 0.0;
        }
        let idx = ((lat_us.len() as f64 * p).ceil() as usize).clamp(1, lat_us.len()) - 1;
        lat_us[idx]
    };
    println!(
        "{{\"engine\":\"ferry\",\"N\":{n},\"K\":{k},\"build_ms\":{:.3},\"update_median_us\":{:.3},\"update_p99_us\":{:.3}}}",
        build.as_secs_f64() * 1e3,
        pick(0.5),
        pick(0.99)
    );
    Ok(())
}
