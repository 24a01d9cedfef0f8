//! Sync status an app can show: the download progress of the checkpoint
//! under way (ops received of ops expected, per bucket and in total) and
//! the upload side (ops and transactions waiting, the oldest's age).

mod common;

use std::sync::Arc;
use std::time::Duration;

use ferry_client::SyncStatus;
use ferry_core::{row_data, ManualClock, SystemClock, Value};
use ferry_server::{ServiceOptions, SqliteSourceDb, SyncRules, SyncService};
use ferry_transport::FaultConfig;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_side_counts_waiting_ops_transactions_and_age() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(1_000_000));
    let db = common::client(dir.path(), 1, clock.clone());
    assert_eq!(
        (
            db.status().pending_ops,
            db.status().pending_transactions,
            db.status().oldest_pending_age_ms
        ),
        (0, 0, None)
    );
    db.write(|tx| {
        tx.insert("tickets", "t1", row_data([("title", Value::from("A"))]))?;
        tx.insert("tickets", "t2", row_data([("title", Value::from("B"))]))
    })
    .expect("write");
    clock.advance_ms(1_500);
    db.write(|tx| tx.update("tickets", "t1", row_data([("title", Value::from("C"))])))
        .expect("write");
    db.write(|tx| tx.delete("tickets", "t2")).expect("write");
    clock.advance_ms(500);
    let s = db.status();
    assert_eq!((s.pending_ops, s.pending_transactions), (4, 3));
    assert_eq!(s.oldest_pending_age_ms, Some(2_000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn download_progress_counts_ops_of_the_checkpoint_under_way() {
    const N: u64 = 120;
    let dir = tempfile::tempdir().expect("tempdir");
    let server_dir = dir.path().join("server");
    std::fs::create_dir_all(&server_dir).expect("server dir");
    let source = SqliteSourceDb::open_dir(&server_dir).expect("source");
    let service = Arc::new(
        SyncService::builder(
            Arc::new(source),
            SyncRules::ticket_tracker().expect("rules"),
            common::SECRET,
        )
        .options(ServiceOptions {
            max_ops_per_line: 10,
            ..ServiceOptions::default()
        })
        .build()
        .expect("service"),
    );

    // A writer fills the server.
    let writer_dir = dir.path().join("writer");
    std::fs::create_dir_all(&writer_dir).expect("writer dir");
    let writer = common::client(&writer_dir, 1, Arc::new(SystemClock));
    writer
        .write(|tx| {
            for i in 0..N {
                tx.insert("tickets", &format!("t{i}"), row_data([("title", Value::from("x"))]))?;
            }
            Ok::<_, ferry_queue::QueueError>(())
        })
        .expect("write");
    common::connect(&writer, service.clone(), FaultConfig::default(), 1, "alice");
    assert!(common::wait_caught_up(&writer, &service, 15_000).await, "writer synced");
    writer.disconnect().await;

    // A fresh client downloads it slowly, line by line, and every status it
    // shows on the way says how far it got.
    let reader_dir = dir.path().join("reader");
    std::fs::create_dir_all(&reader_dir).expect("reader dir");
    let reader = common::client(&reader_dir, 2, Arc::new(SystemClock));
    let mut statuses = reader.watch_status();
    let seen = tokio::spawn(async move {
        let mut seen: Vec<SyncStatus> = Vec::new();
        while statuses.changed().await.is_ok() {
            let s = statuses.borrow_and_update().clone();
            let done = s.has_synced;
            seen.push(s);
            if done {
                break;
            }
        }
        seen
    });
    let slow = FaultConfig {
        delay_line_per_mille: 1_000,
        max_delay_ms: 20,
        ..FaultConfig::default()
    };
    common::connect(&reader, service.clone(), slow, 2, "bob");
    assert!(common::wait_caught_up(&reader, &service, 30_000).await, "reader synced");
    let seen = tokio::time::timeout(Duration::from_secs(5), seen)
        .await
        .expect("statuses collected")
        .expect("collector");
    let progress: Vec<_> = seen.iter().filter_map(|s| s.download_progress.clone()).collect();
    assert!(
        progress
            .iter()
            .any(|p| p.ops_received > 0 && p.ops_received < p.ops_expected),
        "a partial download was shown: {progress:?}"
    );
    // Every op of the initial sync: the writer's tickets and its user row
    // if any; at least the tickets.
    for p in &progress {
        assert!(p.ops_expected >= N, "{p:?}");
        assert!(p.ops_received <= p.ops_expected, "{p:?}");
        let sum: u64 = p.buckets.iter().map(|b| b.ops_expected).sum();
        assert_eq!(sum, p.ops_expected, "{p:?}");
    }
    let received: Vec<u64> = progress.iter().map(|p| p.ops_received).collect();
    assert!(
        received.windows(2).all(|w| w[0] <= w[1]),
        "progress only grows: {received:?}"
    );
    let last = seen.last().expect("a status");
    assert!(last.has_synced && last.download_progress.is_none(), "{last:?}");
    assert_eq!(reader.status().pending_ops, 0);
}
