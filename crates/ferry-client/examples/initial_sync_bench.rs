//! Initial sync benchmark: N ticket rows from a real server over HTTP into a
//! fresh client on SQLite, server and client each in a process of its own.
//!
//! `cargo run --release -p ferry-client --example initial_sync_bench [-- 100000 1000000]`
//!
//! For each N (default 100,000 and 1,000,000) it starts this program again
//! as the server (`FERRY_BENCH_ROLE=server`: an embedded `ferry-server` in a
//! temporary directory, loaded with N rows through `SyncService::import`,
//! in chunks of 50,000 rows, each made while the one before imports,
//! while it serves), then again as the client (`FERRY_BENCH_ROLE=client`:
//! connect, wait for the checkpoint holding every row, count them, report
//! its own peak resident memory), and measures the floor: a plain rusqlite
//! bulk insert of the same rows into a fresh file. It prints one JSON line
//! per N:
//! `{"engine":"ferry","N":..,"sync_s":..,"rows_per_s":..,"floor_s":..,"client_peak_rss_mb":..,"server_load_rows_per_s":..}`
//! where `sync_s` runs from `connect` until the checkpoint is applied
//! (committed, so queryable).
//!
//! `FERRY_BENCH_RULES`: a sync rules file instead of the embedded ticket
//! tracker rules (which the benchmark's rows follow).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use ferry_client::StaticToken;
use ferry_http::HttpTransport;
use ferry_server::mint_token;
use ferry_transport::Transport;

mod bench_common;
#[path = "../../ferry-server/examples/ticket_rows/mod.rs"]
mod ticket_rows;

use bench_common::{open_client, BenchServer, SECRET};
use ticket_rows::tickets;

const LOAD_CHUNK_ROWS: u64 = 50_000;
const SYNC_TIMEOUT_MS: u64 = 900_000;
const ROLE: &str = "FERRY_BENCH_ROLE";

/// The peak resident memory of this process so far, in MB (`VmHWM`).
fn peak_rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// The server role: load N rows (in chunks of [`LOAD_CHUNK_ROWS`], the
/// next made while one imports), print `url load_s`, serve until stdin
/// closes.
async fn serve(n: u64) -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let bench = BenchServer::start(tmp.path().join("server")).await?;
    let service = &bench.server.service;
    let t = Instant::now();
    // Chunks of LOAD_CHUNK_ROWS rows, ids from 1; the next chunk's rows are
    // made on another thread while a chunk imports, as a loader streaming
    // rows in would.
    let mut ranges =
        (0..n.div_ceil(LOAD_CHUNK_ROWS)).map(|k| (k * LOAD_CHUNK_ROWS + 1, ((k + 1) * LOAD_CHUNK_ROWS).min(n)));
    let make = |(first, last): (u64, u64)| tokio::task::spawn_blocking(move || tickets(first, last));
    let mut making = ranges.next().map(make);
    while let Some(ops) = making.take() {
        let ops = ops.await?;
        making = ranges.next().map(make);
        service.import(ops).await?;
    }
    println!("{} {}", bench.base_url, t.elapsed().as_secs_f64());
    // Serve until the parent closes stdin.
    tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
    })
    .await?;
    bench.stop().await;
    Ok(())
}

/// The client role: sync N rows from `url`, print `sync_s peak_rss_mb`.
async fn client(n: u64, url: String) -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let rules = match std::env::var("FERRY_BENCH_RULES") {
        Ok(p) => ferry_server::SyncRules::from_file(Path::new(&p))?,
        Err(_) => ferry_server::SyncRules::ticket_tracker()?,
    };
    let token = mint_token(SECRET, "bench-user", 3600, &serde_json::Map::new());
    let db = open_client(&tmp.path().join("client"), &rules)?;
    let transport: Arc<dyn Transport> = Arc::new(HttpTransport::new(url)?);
    let t0 = Instant::now();
    db.connect(transport, Arc::new(StaticToken(token)));
    // The server loaded every row before it answered: the first checkpoint
    // holds them all.
    let done = db
        .wait_for_status(SYNC_TIMEOUT_MS, |s| {
            s.last_applied_op_id.is_some() && s.has_synced && !s.downloading
        })
        .await;
    let sync_s = t0.elapsed().as_secs_f64();
    if !done {
        bail!("sync did not finish within {SYNC_TIMEOUT_MS} ms: {:?}", db.status());
    }
    db.disconnect().await;
    let rss = peak_rss_mb();
    let count = db.local().store().scan_synced("tickets")?.len() as u64;
    if count != n {
        bail!("client holds {count} tickets, expected {n}");
    }
    println!("{sync_s} {rss}");
    Ok(())
}

fn run_one(n: u64, dir: &Path) -> anyhow::Result<serde_json::Value> {
    let exe = std::env::current_exe()?;
    let mut server = Command::new(&exe)
        .env(ROLE, "server")
        .env("N", n.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("start the server process")?;
    let mut first = String::new();
    BufReader::new(server.stdout.take().context("server stdout")?).read_line(&mut first)?;
    let mut parts = first.split_whitespace();
    let (Some(url), Some(load_s)) = (parts.next(), parts.next()) else {
        let _ = server.kill();
        bail!("the server process printed {first:?}");
    };
    let load_s: f64 = load_s.parse()?;
    let out = Command::new(&exe)
        .env(ROLE, "client")
        .env("N", n.to_string())
        .env("URL", url)
        .stderr(Stdio::inherit())
        .output()
        .context("run the client process")?;
    drop(server.stdin.take());
    let _ = server.wait();
    if !out.status.success() {
        bail!("the client process failed: {}", out.status);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut parts = text.split_whitespace();
    let (Some(sync_s), Some(rss)) = (parts.next(), parts.next()) else {
        bail!("the client process printed {text:?}");
    };
    let (sync_s, rss): (f64, f64) = (sync_s.parse()?, rss.parse()?);
    let floor_s = ticket_rows::floor_s(n, dir)?;
    Ok(serde_json::json!({
        "engine": "ferry",
        "N": n,
        "sync_s": round3(sync_s),
        "rows_per_s": (n as f64 / sync_s).round(),
        "floor_s": round3(floor_s),
        "client_peak_rss_mb": rss.round(),
        "server_load_rows_per_s": (n as f64 / load_s).round(),
    }))
}

fn main() -> anyhow::Result<()> {
    let n_env = || -> anyhow::Result<u64> { Ok(std::env::var("N")?.parse()?) };
    match std::env::var(ROLE).as_deref() {
        Ok("server") => {
            let n = n_env()?;
            return tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?
                .block_on(serve(n));
        }
        Ok("client") => {
            let (n, url) = (n_env()?, std::env::var("URL")?);
            return tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?
                .block_on(client(n, url));
        }
        _ => {}
    }
    let ns: Vec<u64> = match std::env::args().skip(1).collect::<Vec<_>>() {
        args if args.is_empty() => vec![100_000, 1_000_000],
        args => args.iter().map(|a| a.parse()).collect::<Result<_, _>>()?,
    };
    let tmp = tempfile::tempdir()?;
    let dir: PathBuf = tmp.path().to_path_buf();
    for n in ns {
        println!("{}", run_one(n, &dir)?);
    }
    Ok(())
}
