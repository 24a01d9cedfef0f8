//! Live queries over a SQLite store with N synced tickets, through the
//! public API: the first result and the update latency (one local write
//! until the subscriber's diff arrives) of
//! `status = 'pending' ORDER BY updated_at DESC LIMIT 50`, served by the
//! index (status, updated_at) as a store-backed window, next to a query no
//! index serves (`... ORDER BY title DESC LIMIT 50`, whole table in
//! memory). Prints one JSON line per N and path, with the floor
//! (`sqlite_txn_us`: the same single-row write an app makes on plain
//! rusqlite, one new ticket inserted into a table of the app's shape that
//! holds the same N tickets, in the same file, right after the updates;
//! `of_floor` is the update median over it), the cheapest write
//! transaction on the file beside it (`sqlite_min_txn_us`, one integer of
//! a one-row table; `of_min_floor`), and the bytes the live query keeps
//! (`query_state_bytes`, from `LiveQuery::state_bytes`).
//!
//! `cargo run --release -p ferry-client --example live_store_bench -- 100000 1000000`
//! (`UPDATES=30000` for more updates than the default 200).

use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_client::query::{col, Order};
use ferry_client::{ClientOptions, Database, Query};
use ferry_core::{row_data, ColumnType, Schema, Table, Value};
use ferry_queue::{LocalDbOptions, QueueError, ServerChanges};
use ferry_sqlite::SqliteStore;

/// Updates timed per run, unless `UPDATES` says otherwise (each stays
/// pending: no server, so a large count measures a window over many
/// pending writes).
const UPDATES: usize = 200;
/// Bare SQLite transactions timed for the floor.
const FLOOR_TXNS: usize = 200;
/// How long an update waits for its diff before it counts as missed.
const DIFF_WAIT_MS: u64 = 1_000;
const LOAD_CHUNK_ROWS: usize = 10_000;

fn schema() -> Schema {
    Schema::new([Table::new("tickets")
        .column("title", ColumnType::Text)
        .column("status", ColumnType::Text)
        .column("updated_at", ColumnType::Integer)
        .index("by_status_updated", &["status", "updated_at"])])
    .expect("schema")
}

fn ticket(i: u64) -> ferry_core::RowData {
    let status = if i.is_multiple_of(10) { "pending" } else { "done" };
    row_data([
        ("title", Value::from(format!("ticket {i}"))),
        ("status", Value::from(status)),
        ("updated_at", Value::Integer(i as i64)),
    ])
}

fn rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|kb| kb.parse::<f64>().ok()))
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).copied().unwrap_or(0.0)
}

/// A connection of its own to the store's file, with the store's settings
/// (`SqliteStore::open`, `SqliteOptions::default()`): `journal_mode=WAL`,
/// `synchronous=NORMAL`.
fn floor_connection(file: &std::path::Path) -> Result<rusqlite::Connection, rusqlite::Error> {
    let conn = rusqlite::Connection::open(file)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    let _mode: String = conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    Ok(conn)
}

/// The median of `FLOOR_TXNS` timings of `txn(k)`, in microseconds.
fn median_us(mut txn: impl FnMut(i64) -> Result<(), rusqlite::Error>) -> Result<f64, rusqlite::Error> {
    let mut us = Vec::with_capacity(FLOOR_TXNS);
    for k in 0..FLOOR_TXNS as i64 {
        let t = Instant::now();
        txn(k)?;
        us.push(t.elapsed().as_secs_f64() * 1e6);
    }
    us.sort_by(f64::total_cmp);
    Ok(percentile(&us, 0.5))
}

/// The floor, `sqlite_txn_us`: the same write an app makes without Ferry,
/// on plain rusqlite. The N tickets are in a table of the app's shape
/// (`id` the primary key, the three columns, an index on
/// `(status, updated_at)`; `WITHOUT ROWID`, the cheaper of the two layouts:
/// one B-tree fewer than a rowid table's), in the store's file, and each
/// timed transaction (`BEGIN IMMEDIATE`, as the store's writes; one
/// `INSERT` of the same new ticket an update writes; `COMMIT`) inserts one
/// ticket. This is the cost of the write itself; what an update costs
/// beyond it is Ferry's (its queue entry, its overlay, the live query's
/// diff).
fn sqlite_txn_us(file: &std::path::Path, n: u64) -> Result<f64, rusqlite::Error> {
    let conn = floor_connection(file)?;
    conn.execute_batch(
        "CREATE TABLE bench_tickets (id TEXT PRIMARY KEY, title TEXT, status TEXT, updated_at INTEGER) WITHOUT ROWID;
         CREATE INDEX bench_tickets_by_status_updated ON bench_tickets(status, updated_at);",
    )?;
    let insert = "INSERT INTO bench_tickets (id, title, status, updated_at) VALUES (?1, ?2, ?3, ?4)";
    let mut i = 0;
    while i < n {
        conn.execute_batch("BEGIN")?;
        for j in i..(i + LOAD_CHUNK_ROWS as u64).min(n) {
            let status = if j.is_multiple_of(10) { "pending" } else { "done" };
            conn.prepare_cached(insert)?.execute(rusqlite::params![
                format!("t{j:08}"),
                format!("ticket {j}"),
                status,
                j as i64
            ])?;
        }
        conn.execute_batch("COMMIT")?;
        i += LOAD_CHUNK_ROWS as u64;
    }
    median_us(|k| {
        conn.execute_batch("BEGIN IMMEDIATE")?;
        conn.prepare_cached(insert)?.execute(rusqlite::params![
            format!("new{k:06}"),
            format!("zz new {k:06}"),
            "pending",
            n as i64 + k
        ])?;
        conn.execute_batch("COMMIT")
    })
}

/// `sqlite_min_txn_us`: the cheapest write transaction there is on the
/// file (`BEGIN IMMEDIATE`, an `UPDATE` of the one integer of a one-row
/// table, `COMMIT`): almost all system calls. The floor of earlier runs of
/// this benchmark, printed beside the one above.
fn sqlite_min_txn_us(file: &std::path::Path) -> Result<f64, rusqlite::Error> {
    let conn = floor_connection(file)?;
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS bench_floor (id INTEGER PRIMARY KEY, v INTEGER NOT NULL);
         INSERT OR IGNORE INTO bench_floor (id, v) VALUES (1, 0);",
    )?;
    median_us(|k| {
        conn.execute_batch("BEGIN IMMEDIATE")?;
        conn.prepare_cached("UPDATE bench_floor SET v = ?1 WHERE id = 1")?
            .execute([k])?;
        conn.execute_batch("COMMIT")
    })
}

fn run(n: u64, path: &str, query: &Query) -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("client.db");
    let store = Arc::new(SqliteStore::open(&file, schema())?);
    let options = ClientOptions {
        local: LocalDbOptions {
            client_id_seed: Some(1),
            ..LocalDbOptions::default()
        },
        ..ClientOptions::default()
    };
    let db = Database::open(store, options)?;
    let load_started = Instant::now();
    let mut i = 0;
    while i < n {
        let mut changes = ServerChanges::new();
        for j in i..(i + LOAD_CHUNK_ROWS as u64).min(n) {
            changes.put_row("tickets", format!("t{j:08}"), ticket(j));
        }
        db.local().apply_server_changes(changes, None)?;
        i += LOAD_CHUNK_ROWS as u64;
    }
    let load_ms = load_started.elapsed().as_secs_f64() * 1e3;
    let explain = db.explain(query)?;
    let (tx, rx) = mpsc::channel();
    let started = Instant::now();
    let (live, first) = db.live_query(query, move |d| {
        let _ = tx.send(d.added.len());
    })?;
    let first_result_ms = started.elapsed().as_secs_f64() * 1e3;
    assert_eq!(first.rows.len(), 50);
    let updates = std::env::var("UPDATES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(UPDATES);
    let mut update_us = Vec::with_capacity(updates);
    let mut missed_diffs = 0usize;
    for k in 0..updates as u64 {
        let id = format!("new{k:06}");
        let data = row_data([
            ("title", Value::from(format!("zz new {k:06}"))),
            ("status", Value::from("pending")),
            ("updated_at", Value::Integer((n + k) as i64)),
        ]);
        let t = Instant::now();
        db.write(|w| w.put("tickets", &id, data))
            .map_err(|e: QueueError| e.to_string())?;
        match rx.recv_timeout(Duration::from_millis(DIFF_WAIT_MS)) {
            Ok(_) => update_us.push(t.elapsed().as_secs_f64() * 1e6),
            Err(_) => missed_diffs += 1,
        }
    }
    update_us.sort_by(f64::total_cmp);
    // Before the floor's table and its connection.
    let rss_mb = rss_mb();
    let sqlite_txn_us = sqlite_txn_us(&file, n)?;
    let sqlite_min_txn_us = sqlite_min_txn_us(&file)?;
    let query_state_bytes = live.state_bytes()?;
    let median = percentile(&update_us, 0.5);
    println!(
        "{{\"engine\":\"ferry\",\"path\":\"{path}\",\"N\":{n},\"first_result_ms\":{first_result_ms:.2},\"update_median_us\":{median:.1},\"update_p99_us\":{:.1},\"sqlite_txn_us\":{sqlite_txn_us:.1},\"of_floor\":{:.2},\"sqlite_min_txn_us\":{sqlite_min_txn_us:.1},\"of_min_floor\":{:.2},\"query_state_bytes\":{query_state_bytes},\"rss_mb\":{rss_mb:.1},\"index_window\":{},\"store_load_ms\":{load_ms:.0},\"missed_diffs\":{missed_diffs}}}",
        percentile(&update_us, 0.99),
        median / sqlite_txn_us,
        median / sqlite_min_txn_us,
        explain.index_window().is_some(),
    );
    drop(live);
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let sizes: Vec<u64> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let sizes = if sizes.is_empty() { vec![100_000] } else { sizes };
    let indexed = Query::from("tickets")
        .filter(col("status").eq("pending"))
        .order_by(col("updated_at"), Order::Desc)
        .limit(50);
    let unindexed = Query::from("tickets")
        .filter(col("status").eq("pending"))
        .order_by(col("title"), Order::Desc)
        .limit(50);
    for n in sizes {
        run(n, "index_window", &indexed)?;
        run(n, "whole_collection", &unindexed)?;
    }
    Ok(())
}
