//! Server bulk loading benchmark: N ticket rows through
//! `SyncService::import` into the embedded SQLite source database.
//!
//! `cargo run --release -p ferry-server --example import_bench`
//!
//! Environment:
//! - `N` rows (default 1,000,000);
//! - `CHUNK` rows per `import` call (default 50,000, as
//!   `ferry-client`'s `initial_sync_bench` loads them);
//! - `PIPELINE` (default 1): make the next chunk's rows on another thread
//!   while a chunk imports, as a loader streaming rows in would, so the
//!   figure is the server's; `PIPELINE=0` makes them in between, as
//!   `initial_sync_bench` does.
//!
//! The rows, the rules (the embedded ticket tracker rules: every ticket is
//! in the `global` bucket) and the chunks are those of `initial_sync_bench`.
//! Prints one JSON line:
//! `{"N":..,"load_s":..,"server_load_rows_per_s":..,"floor_s":..,"floor_rows_per_s":..,"of_floor":..}`
//! where `floor_s` is the same rows inserted with plain rusqlite into a
//! fresh file after the load (`initial_sync_bench`'s floor), and `load_s` runs
//! from the first `import` call until the last returned (making the rows
//! included, as `initial_sync_bench` measures it); the op log's length is
//! checked after. On stderr: the process's CPU time over the load (user +
//! system, `/proc/self/stat`) and the rows per CPU second, which a busy
//! machine changes less than the wall time.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use ferry_server::{ServiceOptions, SourceDb, SqliteSourceDb, SyncRules, SyncService};

mod ticket_rows;

use ticket_rows::tickets;

/// Rows per `import` call unless `CHUNK` says otherwise.
const DEFAULT_CHUNK_ROWS: u64 = 50_000;

/// Clock ticks per second of `/proc/self/stat` (`getconf CLK_TCK`, 100
/// on Linux).
const CLK_TCK: f64 = 100.0;

/// This process's user + system CPU seconds (0 where `/proc` is absent).
fn cpu_s() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // The fields after the command (which may hold spaces) in parens.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 (11 and 12 after the parens).
    (ticks(11) + ticks(12)) / CLK_TCK
}

fn env_u64(name: &str, default: u64) -> anyhow::Result<u64> {
    match std::env::var(name) {
        Ok(s) => s.parse().with_context(|| format!("{name}={s:?} is not a number")),
        Err(_) => Ok(default),
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let n = env_u64("N", 1_000_000)?;
    let chunk = env_u64("CHUNK", DEFAULT_CHUNK_ROWS)?.max(1);
    let pipeline = env_u64("PIPELINE", 1)? != 0;
    let tmp = tempfile::tempdir()?;
    let db = Arc::new(SqliteSourceDb::open_dir(tmp.path())?);
    let options = ServiceOptions {
        max_upload_ops: usize::try_from(chunk)?.max(ServiceOptions::default().max_upload_ops),
        ..ServiceOptions::default()
    };
    let service = SyncService::builder(db.clone(), SyncRules::ticket_tracker()?, "bench-secret")
        .options(options)
        .build()?;

    let t = Instant::now();
    let cpu_start = cpu_s();
    // Chunks of `chunk` rows, ids from 1.
    let mut ranges = (0..n.div_ceil(chunk)).map(|k| (k * chunk + 1, ((k + 1) * chunk).min(n)));
    let make = |(first, last): (u64, u64)| tokio::task::spawn_blocking(move || tickets(first, last));
    let mut making = ranges.next().map(make);
    while let Some(ops) = making.take() {
        let ops = ops.await?;
        if pipeline {
            making = ranges.next().map(make);
        }
        service.import(ops).await?;
        if !pipeline {
            making = ranges.next().map(make);
        }
    }
    let load_s = t.elapsed().as_secs_f64();
    let cpu = cpu_s() - cpu_start;

    let ops = {
        let db = db.clone();
        tokio::task::spawn_blocking(move || db.oplog_len()).await??
    };
    if ops != n {
        bail!("the op log holds {ops} entries after loading {n} rows");
    }
    eprintln!(
        "cpu_s {cpu:.3} ({:.0} rows per cpu second)",
        n as f64 / cpu.max(f64::EPSILON)
    );
    // The floor of the same run (the machine's speed varies threefold from
    // day to day): the rows inserted with plain rusqlite, no Ferry.
    let floor_s = ticket_rows::floor_s(n, tmp.path())?;
    let rows_per_s = n as f64 / load_s.max(f64::EPSILON);
    let floor_rows_per_s = n as f64 / floor_s.max(f64::EPSILON);
    println!(
        "{{\"N\":{n},\"load_s\":{load_s:.3},\"server_load_rows_per_s\":{rows_per_s:.0},\"floor_s\":{floor_s:.3},\"floor_rows_per_s\":{floor_rows_per_s:.0},\"of_floor\":{:.3}}}",
        rows_per_s / floor_rows_per_s.max(f64::EPSILON)
    );
    Ok(())
}
