//! The server's imports: checked whole before anything is written,
//! committed in batches of at most `MAX_IMPORT_BATCH_OPS` ops (a stream
//! sees them batch by batch, and uploads get the writer between them),
//! bounded by `max_upload_ops`.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::probe::ProbeDb;
use common::*;
use ferry_core::{CrudOp, Value};
use ferry_server::{ServiceError, ServiceOptions, SourceDb, SyncRules, SyncService, MAX_IMPORT_BATCH_OPS};
use ferry_transport::SyncHandler;

fn ticket(i: usize) -> CrudOp {
    put(
        "tickets",
        &format!("t{i}"),
        &[
            ("title", format!("ticket {i}").into()),
            ("status", "open".into()),
            ("version", 1.into()),
        ],
    )
}

fn tickets(range: std::ops::Range<usize>) -> Vec<CrudOp> {
    range.map(ticket).collect()
}

/// Commits of `db` so far (its commit notification counter).
fn commits(db: &dyn SourceDb) -> u64 {
    *db.commits().borrow()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_gets_checkpoints_and_uploads_go_through_while_an_import_runs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = Arc::new(ProbeDb::open(dir.path()));
    let svc = SyncService::builder(db.clone(), SyncRules::ticket_tracker().expect("rules"), SECRET)
        .build()
        .expect("build");
    let total = 2 * MAX_IMPORT_BATCH_OPS + 10;
    // The import's second batch waits before it starts.
    let (held, release) = db.hold_write(1);
    let importer = {
        let svc = svc.clone();
        tokio::spawn(async move { svc.import(tickets(0..total)).await })
    };
    tokio::task::spawn_blocking(move || held.recv_timeout(Duration::from_secs(30)))
        .await
        .expect("join")
        .expect("the import's second batch is about to start");

    // A stream opens and gets a checkpoint of the first batch.
    let token = token("u1");
    let mut client = TestClient::new("c1");
    let mut rx = svc.stream(&token, client.dl.request("c1")).await.expect("stream opens");
    while !client.feed(next(&mut rx).await) {}
    assert_eq!(
        client.rows().len(),
        MAX_IMPORT_BATCH_OPS,
        "the first batch is committed"
    );

    // An upload gets the writer between the import's batches.
    let up = upload_req("c1", vec![entry(1, ticket(total + 1), 1_000, "c1")]);
    let answer = SyncHandler::upload(&svc, &token, up)
        .await
        .expect("upload while importing");
    assert_eq!(answer.write_checkpoint, 1);

    release.send(()).expect("release the import");
    let n = importer.await.expect("join").expect("import");
    assert_eq!(n, total);
    // The stream goes on with the rest of the import.
    while client.rows().len() < total + 1 {
        client.feed(next(&mut rx).await);
    }
    assert_eq!(client.rows().len(), total + 1);
}

#[tokio::test]
async fn imports_commit_in_bounded_batches() {
    let e = env_with(ServiceOptions {
        max_upload_ops: 2 * MAX_IMPORT_BATCH_OPS + 1,
        ..ServiceOptions::default()
    });
    let db = e.svc.db().clone();
    for (ops, batches) in [
        (MAX_IMPORT_BATCH_OPS, 1),
        (MAX_IMPORT_BATCH_OPS + 1, 2),
        (2 * MAX_IMPORT_BATCH_OPS + 1, 3),
    ] {
        let before = commits(db.as_ref());
        let start = 10 * MAX_IMPORT_BATCH_OPS * batches;
        let n = e.svc.import(tickets(start..start + ops)).await.expect("import");
        assert_eq!(n, ops);
        assert_eq!(
            commits(db.as_ref()) - before,
            batches as u64,
            "{ops} ops commit in {batches} transactions"
        );
    }
    assert_eq!(
        db.oplog_len().expect("len"),
        (4 * MAX_IMPORT_BATCH_OPS + 2) as u64,
        "one PUT per ticket"
    );
    // At most max_upload_ops per call.
    let over = e.svc.import(tickets(0..2 * MAX_IMPORT_BATCH_OPS + 2)).await;
    assert!(matches!(over, Err(ServiceError::TooLarge(_))), "{over:?}");
}

#[tokio::test]
async fn a_bad_row_refuses_the_import_before_anything_is_written() {
    let e = env_with(ServiceOptions {
        max_upload_ops: 3 * MAX_IMPORT_BATCH_OPS,
        max_row_encoded_bytes: 10_000,
        ..ServiceOptions::default()
    });
    let db = e.svc.db().clone();
    let bad = [
        (
            put("tickets", "bad", &[("no_such_column", "x".into())]),
            "no_such_column",
        ),
        (put("tickets", "bad", &[("version", "not a number".into())]), "bad"),
        (put("no_such_table", "bad", &[("title", "x".into())]), "no_such_table"),
        (
            put("tickets", "bad", &[("title", Value::Text("x".repeat(20_000)))]),
            "max_row_encoded_bytes",
        ),
        (
            put("tickets", "bad", &[("title", Value::Text("x".repeat(2_000_000)))]),
            "bad",
        ),
        (put("tickets", &"i".repeat(10_000), &[("title", "x".into())]), "tickets"),
    ];
    for (op, says) in bad {
        // The bad op sits in the third batch.
        let mut ops = tickets(0..2 * MAX_IMPORT_BATCH_OPS + 5);
        ops.push(op);
        ops.extend(tickets(5_000..5_010));
        let err = e.svc.import(ops).await.expect_err("refused");
        let ServiceError::BadRequest(message) = &err else {
            panic!("bad_request expected: {err:?}");
        };
        assert!(message.contains(says), "{message}");
        assert!(message.contains("nothing was imported"), "{message}");
        assert_eq!(db.oplog_len().expect("len"), 0, "nothing written: {message}");
    }
}

#[tokio::test]
async fn a_row_refused_on_what_is_stored_stops_the_import_after_the_batches_before() {
    // A PATCH whose merged row is over the limit: only known once the
    // stored row is read.
    let e = env_with(ServiceOptions {
        max_row_encoded_bytes: 2_000,
        ..ServiceOptions::default()
    });
    let db = e.svc.db().clone();
    let half = Value::Text("x".repeat(1_200));
    e.svc
        .import(vec![put("tickets", "big", &[("title", half.clone())])])
        .await
        .expect("setup");
    let mut ops = tickets(0..MAX_IMPORT_BATCH_OPS + 3);
    ops.push(patch("tickets", "big", &[("description", half)]));
    let err = e.svc.import(ops).await.expect_err("refused");
    let message = err.to_string();
    assert!(message.contains("tickets/big"), "{message}");
    assert!(
        message.contains(&format!("first {MAX_IMPORT_BATCH_OPS} ops were imported")),
        "{message}"
    );
    assert_eq!(
        db.oplog_len().expect("len"),
        1 + MAX_IMPORT_BATCH_OPS as u64,
        "the first batch is committed, the second rolled back"
    );
}
