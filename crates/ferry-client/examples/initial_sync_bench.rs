//! Initial sync benchmark: N ticket rows from a real server over HTTP into a
//! fresh client on SQLite.
//!
//! `cargo run --release -p ferry-client --example initial_sync_bench`
//!
//! Environment:
//! - `N` rows (default 1,000,000);
//! - `FERRY_BENCH_SERVER_DIR`: keep the server's data there and reuse it
//!   when it already holds exactly N ops (loading is not measured, but it
//!   takes a while);
//! - `FERRY_BENCH_RULES`: a sync rules file instead of the embedded ticket
//!   tracker rules (which the benchmark's rows follow);
//! - `BREAKDOWN=1`: also time each stage on its own (server read+encode,
//!   HTTP transport, client parse, download state machine, plan, store
//!   apply), printed to stderr.
//!
//! Prints one JSON line: `{"engine":"ferry","N":..,"sync_s":..,"rows_per_s":..}`
//! where `sync_s` runs from `connect` until the checkpoint holding every row
//! is applied (committed, so queryable); the row count is asserted after.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use ferry_client::StaticToken;
use ferry_core::{CrudOp, RowData, Value};
use ferry_http::HttpTransport;
use ferry_protocol::{decode_line, Download, DownloadLimits, Step, StreamLine, StreamRequest};
use ferry_queue::LocalDb;
use ferry_server::{mint_token, SyncRules, SyncService};
use ferry_sqlite::SqliteStore;
use ferry_transport::{SyncHandler, Transport};

mod bench_common;

use bench_common::{open_client, BenchServer, SECRET};

const LOAD_CHUNK_ROWS: u64 = 50_000;
const SYNC_TIMEOUT_MS: u64 = 600_000;

fn ticket(i: u64) -> (String, RowData) {
    let id = format!("ticket-{i:010}");
    let mut d = RowData::new();
    d.insert(
        "title".into(),
        Value::Text(format!("Ticket {i}: printer on fire in building {}", i % 97)),
    );
    d.insert(
        "description".into(),
        Value::Text(format!(
            "Reported by user {} on floor {}; the toner smells odd and paper jams.",
            i % 1013,
            i % 31
        )),
    );
    d.insert(
        "status".into(),
        Value::Text(["open", "in_progress", "done"][(i % 3) as usize].into()),
    );
    d.insert("deleted_at".into(), Value::Null);
    d.insert("created_at".into(), Value::Text("2026-11-26T10:00:00.000Z".into()));
    d.insert("updated_at".into(), Value::Text("2026-11-26T10:00:00.000Z".into()));
    d.insert("version".into(), Value::Integer(1));
    (id, d)
}

async fn load(service: &SyncService, n: u64) -> anyhow::Result<()> {
    let have = {
        let db = service.db().clone();
        tokio::task::spawn_blocking(move || db.oplog_len()).await??
    };
    if have == n {
        eprintln!("server already holds {n} ops: not loading");
        return Ok(());
    }
    if have != 0 {
        bail!("server data dir holds {have} ops, not {n}: use an empty directory");
    }
    let t = Instant::now();
    let mut next = 1;
    while next <= n {
        let end = (next + LOAD_CHUNK_ROWS - 1).min(n);
        let ops = (next..=end)
            .map(|i| {
                let (id, data) = ticket(i);
                CrudOp::Put {
                    table: "tickets".into(),
                    id,
                    data,
                }
            })
            .collect();
        service.import(ops).await?;
        next = end + 1;
    }
    eprintln!("loaded {n} rows in {:.1} s", t.elapsed().as_secs_f64());
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let n: u64 = std::env::var("N")
        .ok()
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(1_000_000);
    let breakdown = std::env::var("BREAKDOWN").is_ok_and(|v| v == "1");
    let tmp = tempfile::tempdir()?;
    let server_dir = match std::env::var("FERRY_BENCH_SERVER_DIR") {
        Ok(d) => PathBuf::from(d),
        Err(_) => tmp.path().join("server"),
    };
    let bench = BenchServer::start(server_dir).await?;
    let (server, rules) = (&bench.server, &bench.rules);
    load(&server.service, n).await?;

    let token = mint_token(SECRET, "bench-user", 3600, &serde_json::Map::new());
    let user = server.service.authenticate(&token)?;
    let target = server.service.checkpoint(&user, "bench-client").await?.last_op_id;
    let base_url = bench.base_url.clone();

    // The measured run: connect, wait for the checkpoint, count.
    let client_dir = tmp.path().join("client");
    std::fs::create_dir_all(&client_dir)?;
    let db = open_client(&client_dir, rules)?;
    let transport: Arc<dyn Transport> = Arc::new(HttpTransport::new(base_url.clone())?);
    let t0 = Instant::now();
    db.connect(transport, Arc::new(StaticToken(token.clone())));
    let done = db
        .wait_for_status(SYNC_TIMEOUT_MS, |s| s.last_applied_op_id.is_some_and(|id| id >= target))
        .await;
    let sync_s = t0.elapsed().as_secs_f64();
    if !done {
        bail!("sync did not finish within {SYNC_TIMEOUT_MS} ms: {:?}", db.status());
    }
    db.disconnect().await;
    let t_count = Instant::now();
    let count = db.local().scan("tickets")?.len() as u64;
    eprintln!(
        "counted {count} rows in {:.2} s (after the timer)",
        t_count.elapsed().as_secs_f64()
    );
    if count != n {
        bail!("client holds {count} tickets, expected {n}");
    }
    drop(db);

    if breakdown {
        stage_breakdown(&server.service, &base_url, &token, &tmp.path().join("stages"), rules, n).await?;
    }

    println!(
        "{}",
        serde_json::json!({
            "engine": "ferry",
            "N": n,
            "sync_s": (sync_s * 1000.0).round() / 1000.0,
            "rows_per_s": (n as f64 / sync_s).round(),
        })
    );
    bench.stop().await;
    Ok(())
}

fn is_complete(line: &[u8]) -> bool {
    line.starts_with(b"{\"checkpoint_complete\"")
}

/// Each stage of the pipeline on its own, in sequence.
async fn stage_breakdown(
    service: &SyncService,
    base_url: &str,
    token: &str,
    dir: &std::path::Path,
    rules: &SyncRules,
    n: u64,
) -> anyhow::Result<()> {
    let request = StreamRequest {
        client_id: "stages".into(),
        buckets: Vec::new(),
    };
    // 1. Server: read + encode, through the SyncHandler, as the HTTP route
    //    would (no socket).
    let t = Instant::now();
    let mut rx = SyncHandler::stream_lines(service, token, request.clone())
        .await
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let mut bytes = 0usize;
    while let Some(line) = rx.recv().await {
        let encoded = line.into_bytes();
        bytes += encoded.len();
        if is_complete(&encoded) {
            break;
        }
    }
    drop(rx);
    eprintln!(
        "stage server read+encode: {:.2} s ({} MB)",
        t.elapsed().as_secs_f64(),
        bytes / 1_000_000
    );

    // 2. The same plus HTTP to the client's line splitter.
    let transport = HttpTransport::new(base_url)?;
    let t = Instant::now();
    let mut stream = transport.open_stream(token, serde_json::to_vec(&request)?).await?;
    let mut lines = Vec::new();
    while let Some(line) = stream.next_line().await? {
        let complete = is_complete(&line);
        lines.push(line);
        if complete {
            break;
        }
    }
    drop(stream);
    eprintln!(
        "stage server+http (lines in hand): {:.2} s ({} lines)",
        t.elapsed().as_secs_f64(),
        lines.len()
    );

    // 3. Client parse.
    let t = Instant::now();
    let parsed: Vec<StreamLine> = lines
        .iter()
        .map(|l| decode_line(l, ferry_protocol::DEFAULT_MAX_LINE_BYTES))
        .collect::<Result<_, _>>()?;
    drop(lines);
    eprintln!("stage client parse: {:.2} s", t.elapsed().as_secs_f64());

    // 4. Download state machine (staging, checksums).
    let t = Instant::now();
    let mut download = Download::new(Vec::new(), DownloadLimits::default());
    let mut apply = None;
    for line in parsed {
        if let Step::Apply(a) = download.handle(line)? {
            apply = Some(a);
        }
    }
    let apply = apply.context("no checkpoint to apply")?;
    eprintln!("stage download handle: {:.2} s", t.elapsed().as_secs_f64());

    // 5. Plan and 6. store apply.
    std::fs::create_dir_all(dir)?;
    let store = SqliteStore::open(dir.join("client.db"), rules.schema().clone())?;
    let local = LocalDb::open(Arc::new(store))?;
    let t = Instant::now();
    let batch = ferry_client::apply::plan_checkpoint_owned(local.store().as_ref(), apply)?;
    eprintln!(
        "stage plan_checkpoint: {:.2} s ({} batch ops)",
        t.elapsed().as_secs_f64(),
        batch.len()
    );
    let t = Instant::now();
    local.apply_server_changes(batch, None)?;
    eprintln!("stage apply_server_changes: {:.2} s", t.elapsed().as_secs_f64());
    let count = local.scan("tickets")?.len() as u64;
    if count != n {
        bail!("stage client holds {count} tickets, expected {n}");
    }
    Ok(())
}
