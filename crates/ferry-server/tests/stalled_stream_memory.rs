//! Memory of a stream whose client never reads while large commits go
//! by (its own test binary: the figure is the process's resident set,
//! which other tests running beside it would move).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::notes::{put_note, RULES};
use common::SECRET;
use ferry_core::CrudOp;
use ferry_server::{mint_token, ServiceOptions, SqliteSourceDb, SyncRules, SyncService, FEED_MAX_ENTRIES_PER_BUCKET};
use ferry_transport::SyncHandler;

fn rss_bytes() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// One stream whose client never reads, while large commits of the
/// buckets it follows go by: the server holds a bounded amount of memory
/// for it (its byte budget, and the feed's last `FEED_CHANNEL_EVENTS`
/// events, each carrying at most `FEED_MAX_CARRIED_BYTES` of entries), not
/// every recent commit's entries.
///
/// Before events had a byte bound, the stalled stream's broadcast
/// receiver kept the newest 256 events alive with every entry they
/// carried: measured here (debug build, 2 KB rows, 1,000 per commit, 60
/// commits) RSS grew 23 MB -> 438 MB, and 256 such commits pinned about
/// 650 MB. `PROBE_DRAIN=1` reads the stream instead, for comparison.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_never_reads_does_not_pin_every_recent_commit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let svc = SyncService::builder(
        Arc::new(SqliteSourceDb::open_dir(dir.path()).expect("db")),
        SyncRules::from_toml(RULES).expect("rules"),
        SECRET,
    )
    .options(ServiceOptions {
        keepalive_interval_s: 60,
        ..ServiceOptions::default()
    })
    .build()
    .expect("service");
    let mut claims = serde_json::Map::new();
    claims.insert("teams".into(), serde_json::json!(["t0"]));
    let stalled = svc
        .stream(
            &mint_token(SECRET, "u0", 3600, &claims),
            ferry_protocol::StreamRequest {
                client_id: "stalled".into(),
                buckets: vec![],
            },
        )
        .await
        .expect("stream");
    let mut stalled = Some(stalled);
    if std::env::var("PROBE_DRAIN").is_ok() {
        let mut rx = stalled.take().expect("stream");
        tokio::spawn(async move { while rx.recv().await.is_some() {} });
    }
    let body = "z".repeat(2_000);
    let before = rss_bytes();
    let started = Instant::now();
    let mut rows = 0;
    for round in 0..60 {
        let ops: Vec<CrudOp> = (0..FEED_MAX_ENTRIES_PER_BUCKET)
            .map(|k| put_note(&format!("r{round}-{k}"), "u0", "t0", &body))
            .collect();
        rows += ops.len();
        svc.import(ops).await.expect("import");
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let after = rss_bytes();
    eprintln!(
        "{rows} rows of 2 KB in {:?}: rss {} MB -> {} MB",
        started.elapsed(),
        before / 1_000_000,
        after / 1_000_000
    );
    let grown = after.saturating_sub(before);
    drop(stalled);
    assert!(
        grown < 150_000_000,
        "a stalled stream's server grew by {} MB for {} MB of rows",
        grown / 1_000_000,
        rows * 2 / 1_000
    );
}
