//! Initial-sync measurement (ignored; run in release):
//! `FERRY_PERF_ROWS=1000000 cargo test -p ferry-server --release --test perf -- --ignored --nocapture`

mod common;

use std::time::Instant;

use common::*;
use ferry_protocol::StreamLine;
use ferry_transport::SyncHandler;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement; run in release"]
async fn initial_sync_through_handler() {
    let rows: u64 = std::env::var("FERRY_PERF_ROWS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200_000);
    let e = env();
    let t0 = Instant::now();
    let batch = 10_000;
    let mut seq = 0;
    while seq < rows {
        let entries = (seq + 1..=(seq + batch).min(rows))
            .map(|i| {
                entry(
                    i,
                    put(
                        "tickets",
                        &format!("ticket-{i:08}"),
                        &[
                            ("title", format!("ticket number {i}").into()),
                            ("description", "some description text".into()),
                            ("status", "pending".into()),
                            ("created_at", "2025-01-01T00:00:00Z".into()),
                            ("updated_at", "2025-01-01T00:00:00Z".into()),
                            ("version", 0.into()),
                        ],
                    ),
                    1000,
                    "loader",
                )
            })
            .collect();
        SyncHandler::upload(&e.svc, &token("u1"), upload_req("loader", entries))
            .await
            .expect("upload");
        seq += batch;
    }
    let load_s = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let mut rx = SyncHandler::stream(&e.svc, &token("u1"), TestClient::new("c").dl.request("c"))
        .await
        .expect("stream");
    let mut ops = 0usize;
    loop {
        match next(&mut rx).await {
            StreamLine::Data(d) => ops += d.ops.len(),
            StreamLine::CheckpointComplete { .. } => break,
            _ => {}
        }
    }
    let stream_s = t1.elapsed().as_secs_f64();
    assert_eq!(ops as u64, rows);
    println!(
        "rows {rows}: load via upload {load_s:.2} s ({:.0} ops/s), stream through SyncHandler {stream_s:.2} s ({:.0} ops/s)",
        rows as f64 / load_s,
        rows as f64 / stream_s
    );
}
