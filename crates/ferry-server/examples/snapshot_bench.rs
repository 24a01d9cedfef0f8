//! Snapshot of existing rows: N ticket rows written straight into the
//! embedded SQLite source's `tickets` table (as another program would,
//! no clocks, no buckets), then one pass of `SyncService::rebucket_all`,
//! which gives each row its clocks, its bucket membership and its PUT op,
//! as a server pointed at a database that already holds data does in the
//! background at start.
//!
//! `cargo run --release -p ferry-server --example snapshot_bench`
//!
//! `N` rows (default 1,000,000). Prints one JSON line:
//! `{"N":..,"snapshot_s":..,"snapshot_rows_per_s":..}` where
//! `snapshot_s` is the pass alone (the rows' insert is not timed); the op
//! log's length is checked after.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use ferry_server::{SourceDb, SqliteSourceDb, SyncRules, SyncService};

const SECRET: &str = "snapshot-bench-secret";

fn main() -> anyhow::Result<()> {
    let n: u64 = match std::env::var("N") {
        Ok(v) => v.parse().context("N")?,
        Err(_) => 1_000_000,
    };
    let dir = tempfile::tempdir()?;
    let rules = SyncRules::ticket_tracker()?;
    // The source's tables, as the server makes them.
    {
        let db: Arc<dyn SourceDb> = Arc::new(SqliteSourceDb::open_dir(dir.path())?);
        drop(SyncService::builder(db, rules.clone(), SECRET).build()?);
    }
    {
        let conn = rusqlite::Connection::open(dir.path().join("source.db"))?;
        conn.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;")?;
        let tx = conn.unchecked_transaction()?;
        {
            let mut stmt = tx.prepare(
                "INSERT INTO tickets (id, title, description, status, deleted_at, created_at, updated_at, version) \
                 VALUES (?1, ?2, ?3, ?4, NULL, ?5, ?5, 1)",
            )?;
            for i in 1..=n {
                stmt.execute(rusqlite::params![
                    format!("ticket-{i:010}"),
                    format!("Ticket {i}: printer on fire in building {}", i % 97),
                    format!(
                        "Reported by user {} on floor {}; the toner smells odd and paper jams.",
                        i % 1013,
                        i % 31
                    ),
                    ["open", "in_progress", "done"][(i % 3) as usize],
                    "2026-11-26T10:00:00.000Z",
                ])?;
            }
        }
        tx.commit()?;
    }
    let db: Arc<dyn SourceDb> = Arc::new(SqliteSourceDb::open_dir(dir.path())?);
    let service = SyncService::builder(db.clone(), rules, SECRET).build()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let t = Instant::now();
    let changed = rt.block_on(service.rebucket_all())?;
    let snapshot_s = t.elapsed().as_secs_f64();
    if changed as u64 != n {
        bail!("the pass changed {changed} rows, expected {n}");
    }
    println!(
        "{}",
        serde_json::json!({
            "N": n,
            "snapshot_s": (snapshot_s * 1000.0).round() / 1000.0,
            "snapshot_rows_per_s": (n as f64 / snapshot_s).round(),
        })
    );
    Ok(())
}
