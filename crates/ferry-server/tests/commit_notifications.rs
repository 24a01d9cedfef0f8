//! Streams wake on the source database's commit notifications, and look
//! for new ops on every keepalive, so a lost notification (another
//! server's commit, a dropped LISTEN connection) delays a change by at
//! most one keepalive interval.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use ferry_protocol::{StreamLine, StreamRequest};
use ferry_server::{ServiceOptions, SourceDb, SqliteSourceDb, SyncRules, SyncService};

fn ticket(id: &str) -> ferry_core::CrudOp {
    put(
        "tickets",
        id,
        &[
            ("title", "t".into()),
            ("status", "pending".into()),
            ("version", 0.into()),
        ],
    )
}

fn service(db: Arc<dyn SourceDb>, keepalive_interval_s: u64) -> SyncService {
    SyncService::builder(db, SyncRules::ticket_tracker().expect("rules"), SECRET)
        .options(ServiceOptions {
            keepalive_interval_s,
            ..ServiceOptions::default()
        })
        .build()
        .expect("build")
}

/// Reads lines until a `data` line with `id`, up to `within`.
async fn wait_for_row(rx: &mut tokio::sync::mpsc::Receiver<StreamLine>, id: &str, within: Duration) -> bool {
    let found = async {
        while let Some(line) = rx.recv().await {
            if let StreamLine::Data(d) = &line {
                if d.ops.iter().any(|o| o.object_id.as_deref() == Some(id)) {
                    return true;
                }
            }
        }
        false
    };
    tokio::time::timeout(within, found).await.unwrap_or(false)
}

#[tokio::test]
async fn a_commit_wakes_streams_through_the_database_notification() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = Arc::new(SqliteSourceDb::open_dir(dir.path()).expect("open db"));
    // Keepalives far apart: only the notification can wake the stream.
    let svc = service(db, 3600);
    let user = svc.authenticate(&token("u1")).expect("token");
    let mut rx = svc
        .open_stream(
            user.clone(),
            StreamRequest {
                client_id: "reader".into(),
                buckets: Vec::new(),
            },
        )
        .expect("stream");
    assert!(matches!(next(&mut rx).await, StreamLine::Checkpoint(_)));
    svc.upload(
        &user,
        upload_req("writer", vec![entry(1, ticket("t1"), 1000, "writer")]),
    )
    .await
    .expect("upload");
    assert!(wait_for_row(&mut rx, "t1", Duration::from_secs(10)).await);
}

#[tokio::test]
async fn a_lost_notification_is_made_up_for_at_the_next_keepalive() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = Arc::new(common::probe::ProbeDb::silent(dir.path()));
    let svc = service(db, 1);
    let user = svc.authenticate(&token("u1")).expect("token");
    let mut rx = svc
        .open_stream(
            user.clone(),
            StreamRequest {
                client_id: "reader".into(),
                buckets: Vec::new(),
            },
        )
        .expect("stream");
    // The first checkpoint is out before the write.
    assert!(matches!(next(&mut rx).await, StreamLine::Checkpoint(_)));
    svc.upload(
        &user,
        upload_req("writer", vec![entry(1, ticket("t1"), 1000, "writer")]),
    )
    .await
    .expect("upload");
    assert!(
        wait_for_row(&mut rx, "t1", Duration::from_secs(5)).await,
        "the keepalive's look for new ops found the write"
    );
}
