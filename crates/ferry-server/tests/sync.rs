//! The sync service through `SyncHandler`: uploads, buckets, LWW,
//! idempotency, bad input, auth, streaming and compaction.

mod common;

use common::*;
use ferry_core::Value;
use ferry_protocol::{ErrorCode, Outcome, StreamLine};
use ferry_server::{mint_token_at, SyncService};
use ferry_transport::SyncHandler;

fn ticket(id: &str, title: &str) -> ferry_core::CrudOp {
    put(
        "tickets",
        id,
        &[
            ("title", title.into()),
            ("status", "pending".into()),
            ("version", 0.into()),
        ],
    )
}

async fn up(svc: &SyncService, user: &str, client: &str, entries: Vec<ferry_core::CrudEntry>) -> Vec<Outcome> {
    let resp = SyncHandler::upload(svc, &token(user), upload_req(client, entries))
        .await
        .expect("upload accepted");
    resp.outcomes.into_iter().map(|o| o.outcome).collect()
}

#[tokio::test]
async fn upload_then_stream_places_rows_in_their_buckets() {
    let e = env();
    let out = up(
        &e.svc,
        "u1",
        "c1",
        vec![
            entry(1, ticket("t1", "first"), 1000, "c1"),
            entry(
                2,
                put(
                    "assignments",
                    "a1",
                    &[("ticket_id", "t1".into()), ("user_id", "u1".into())],
                ),
                1000,
                "c1",
            ),
            entry(
                3,
                put(
                    "assignments",
                    "a2",
                    &[("ticket_id", "t1".into()), ("user_id", "u2".into())],
                ),
                1000,
                "c1",
            ),
        ],
    )
    .await;
    assert_eq!(out, vec![Outcome::Applied; 3]);

    let mut c1 = TestClient::new("c1");
    let lines = c1.sync(&e.svc, &token("u1")).await;
    let StreamLine::Checkpoint(cp) = &lines[0] else {
        panic!("first line is a checkpoint: {:?}", lines[0]);
    };
    assert_eq!(cp.write_checkpoint, Some(3));
    let names: Vec<&str> = cp.buckets.iter().map(|b| b.bucket.as_str()).collect();
    assert_eq!(names, ["global[]", "my_assignments[\"u1\"]"]);
    // Checksums in the checkpoint equal the sum of the data sent.
    let ops = data_ops(&lines);
    for b in &cp.buckets {
        let sum = ops
            .iter()
            .filter(|(n, _)| *n == b.bucket)
            .fold(0u32, |s, (_, o)| s.wrapping_add(o.checksum));
        assert_eq!(sum, b.checksum, "{}", b.bucket);
    }
    assert_eq!(c1.buckets["global[]"].len(), 3);
    let mine: Vec<&String> = c1.buckets["my_assignments[\"u1\"]"].keys().map(|(_, id)| id).collect();
    assert_eq!(mine, ["a1"]);
    assert_eq!(c1.write_checkpoint, Some(3));

    // u2's own bucket has only u2's assignment; u1's never reaches u2.
    let mut c2 = TestClient::new("c2");
    c2.sync(&e.svc, &token("u2")).await;
    assert!(!c2.buckets.contains_key("my_assignments[\"u1\"]"));
    let theirs: Vec<&String> = c2.buckets["my_assignments[\"u2\"]"].keys().map(|(_, id)| id).collect();
    assert_eq!(theirs, ["a2"]);

    // Reassigning a2 to u1 moves it: REMOVE from u2's bucket, PUT in u1's.
    up(
        &e.svc,
        "u1",
        "c1",
        vec![entry(
            4,
            patch("assignments", "a2", &[("user_id", "u1".into())]),
            2000,
            "c1",
        )],
    )
    .await;
    c2.sync(&e.svc, &token("u2")).await;
    assert!(c2.buckets["my_assignments[\"u2\"]"].is_empty());
    c1.sync(&e.svc, &token("u1")).await;
    assert_eq!(c1.buckets["my_assignments[\"u1\"]"].len(), 2);
}

#[tokio::test]
async fn replayed_upload_returns_same_outcomes_and_writes_nothing() {
    let e = env();
    let entries = vec![
        entry(1, ticket("t1", "a"), 1000, "c1"),
        entry(2, put("nope", "x", &[]), 1000, "c1"),
        entry(3, patch("tickets", "t1", &[("title", "b".into())]), 2000, "c1"),
    ];
    let first = SyncHandler::upload(&e.svc, &token("u1"), upload_req("c1", entries.clone()))
        .await
        .expect("ok");
    let oplog = e.svc.db().oplog_len().expect("len");
    let again = SyncHandler::upload(&e.svc, &token("u1"), upload_req("c1", entries))
        .await
        .expect("ok");
    // The same outcomes (the answer's `hlc`, the server's clock when it
    // answered, moves on).
    assert_eq!(first.outcomes, again.outcomes);
    assert_eq!(first.write_checkpoint, again.write_checkpoint);
    assert_eq!(again.write_checkpoint, 3);
    assert_eq!(e.svc.db().oplog_len().expect("len"), oplog);
    // Another user cannot upload as this client.
    let err = SyncHandler::upload(
        &e.svc,
        &token("u2"),
        upload_req("c1", vec![entry(4, ticket("t2", "x"), 1, "c1")]),
    )
    .await
    .expect_err("foreign client id");
    assert_eq!(err.code, ErrorCode::Unauthorized);
}

#[tokio::test]
async fn column_level_last_write_wins() {
    let e = env();
    up(&e.svc, "u1", "c1", vec![entry(1, ticket("t1", "v1"), 2000, "c1")]).await;
    // Older patch of title loses.
    let out = up(
        &e.svc,
        "u2",
        "c2",
        vec![entry(1, patch("tickets", "t1", &[("title", "old".into())]), 1000, "c2")],
    )
    .await;
    match &out[0] {
        Outcome::Merged { row, reason } => {
            assert_eq!(row.as_ref().expect("row")["title"], Value::from("v1"));
            assert!(reason.contains("title"), "{reason}");
        }
        o => panic!("expected merged, got {o:?}"),
    }
    // Newer one wins.
    let out = up(
        &e.svc,
        "u2",
        "c2",
        vec![entry(2, patch("tickets", "t1", &[("title", "v2".into())]), 3000, "c2")],
    )
    .await;
    assert_eq!(out, vec![Outcome::Applied]);
    // Concurrent edits of disjoint columns both apply, whatever the order.
    let a = up(
        &e.svc,
        "u1",
        "c1",
        vec![entry(2, patch("tickets", "t1", &[("title", "v3".into())]), 5000, "c1")],
    )
    .await;
    let b = up(
        &e.svc,
        "u2",
        "c2",
        vec![entry(
            3,
            patch("tickets", "t1", &[("status", "done".into())]),
            4000,
            "c2",
        )],
    )
    .await;
    assert_eq!((a, b), (vec![Outcome::Applied], vec![Outcome::Applied]));
    // Same wall time and counter: the client id (HLC node) breaks the tie.
    let t = up(
        &e.svc,
        "u1",
        "c1",
        vec![entry(
            3,
            patch("tickets", "t1", &[("description", "x".into())]),
            6000,
            "c1",
        )],
    )
    .await;
    let u = up(
        &e.svc,
        "u2",
        "c2",
        vec![entry(
            4,
            patch("tickets", "t1", &[("description", "y".into())]),
            6000,
            "c2",
        )],
    )
    .await;
    assert_eq!((t, u), (vec![Outcome::Applied], vec![Outcome::Applied]), "c2 > c1");

    let mut c = TestClient::new("c3");
    c.sync(&e.svc, &token("u3")).await;
    let row = &c.rows()[&("tickets".to_owned(), "t1".to_owned())];
    assert_eq!(row["title"], Value::from("v3"));
    assert_eq!(row["status"], Value::from("done"));
    assert_eq!(row["description"], Value::from("y"));
}

#[tokio::test]
async fn deletes_tombstone_and_beat_only_older_writes() {
    let e = env();
    up(&e.svc, "u1", "c1", vec![entry(1, ticket("t1", "a"), 1000, "c1")]).await;
    let mut c = TestClient::new("c1");
    c.sync(&e.svc, &token("u1")).await;
    assert_eq!(c.rows().len(), 1);
    // A delete older than the last edit loses.
    let out = up(&e.svc, "u2", "c2", vec![entry(1, delete("tickets", "t1"), 500, "c2")]).await;
    assert!(matches!(&out[0], Outcome::Merged { row: Some(_), .. }), "{out:?}");
    // A newer delete wins; the row leaves every bucket.
    let out = up(&e.svc, "u2", "c2", vec![entry(2, delete("tickets", "t1"), 2000, "c2")]).await;
    assert_eq!(out, vec![Outcome::Applied]);
    c.sync(&e.svc, &token("u1")).await;
    assert!(c.rows().is_empty());
    // A stale put (older than the delete) does not resurrect it.
    let out = up(&e.svc, "u1", "c1", vec![entry(2, ticket("t1", "stale"), 1500, "c1")]).await;
    assert!(matches!(&out[0], Outcome::Merged { row: None, .. }), "{out:?}");
    // A newer put recreates it.
    let out = up(&e.svc, "u1", "c1", vec![entry(3, ticket("t1", "back"), 3000, "c1")]).await;
    assert_eq!(out, vec![Outcome::Applied]);
    c.sync(&e.svc, &token("u1")).await;
    assert_eq!(c.rows().len(), 1);
}

#[tokio::test]
async fn bad_input_is_rejected_with_reason_and_writes_nothing() {
    let mut options = ferry_server::ServiceOptions::default();
    options.limits.max_row_bytes = 64;
    let e = env_with(options);
    let big = "x".repeat(100);
    // Each op in a transaction of its own: a rejected op rejects every op
    // of its transaction (docs/adr/0005-transactions-all-or-nothing.md),
    // and this test looks at each op's own reason.
    let entries = vec![
        entry(1, put("nope", "x", &[]), 1000, "c1"),
        entry(2, put("tickets", "t1", &[("colour", "red".into())]), 1000, "c1"),
        entry(3, put("tickets", "t1", &[("version", "ten".into())]), 1000, "c1"),
        entry(4, put("tickets", "t1", &[("title", big.as_str().into())]), 1000, "c1"),
        entry(5, patch("tickets", "t9", &[("title", "x".into())]), 1000, "c1"),
    ];
    let request = ferry_protocol::UploadRequest {
        client_id: "c1".into(),
        transactions: entries
            .into_iter()
            .map(|e| ferry_protocol::UploadTransaction {
                tx_id: e.tx_id,
                ops: vec![e],
            })
            .collect(),
    };
    let out: Vec<Outcome> = SyncHandler::upload(&e.svc, &token("u1"), request)
        .await
        .expect("upload accepted")
        .outcomes
        .into_iter()
        .map(|o| o.outcome)
        .collect();
    let reasons: Vec<String> = out
        .iter()
        .map(|o| match o {
            Outcome::Rejected { reason } => reason.clone(),
            o => panic!("expected rejected, got {o:?}"),
        })
        .collect();
    assert!(reasons[0].contains("unknown table \"nope\""), "{}", reasons[0]);
    assert!(reasons[1].contains("unknown column \"colour\""), "{}", reasons[1]);
    assert!(
        reasons[2].contains("tickets.version is integer, got text value 'ten'"),
        "{}",
        reasons[2]
    );
    assert!(reasons[3].contains("over the limit of 64 bytes"), "{}", reasons[3]);
    assert!(reasons[4].contains("does not exist"), "{}", reasons[4]);
    assert_eq!(e.svc.db().oplog_len().expect("len"), 0);
    let table = e.svc.rules().schema().table("tickets").expect("table").clone();
    assert!(e.svc.db().get_row(&table, "t1").expect("read").is_none());
    // An upload of several transactions over the limit is refused as a
    // whole (the client sends them one by one).
    let small = ferry_server::ServiceOptions {
        max_upload_ops: 1,
        ..Default::default()
    };
    let e2 = env_with(small);
    let two = upload_txs(
        "c1",
        vec![
            (1, vec![entry(1, ticket("a", "a"), 1, "c1")]),
            (2, vec![entry(2, ticket("b", "b"), 1, "c1")]),
        ],
    );
    let err = SyncHandler::upload(&e2.svc, &token("u1"), two)
        .await
        .expect_err("too many ops");
    assert_eq!(err.code, ErrorCode::TooLarge);
    // One transaction over it is answered: each op rejected, recorded (a
    // replay gets the same answer), the client's seqs moved past it, so
    // its next transaction applies.
    let big = || {
        upload_req(
            "c1",
            vec![entry(1, ticket("a", "a"), 1, "c1"), entry(2, ticket("b", "b"), 1, "c1")],
        )
    };
    let answer = SyncHandler::upload(&e2.svc, &token("u1"), big())
        .await
        .expect("answered");
    for o in &answer.outcomes {
        assert!(
            matches!(&o.outcome, Outcome::Rejected { reason } if reason.contains("transaction 1 has 2 ops, over the limit of 1 ops")),
            "{o:?}"
        );
    }
    assert_eq!(answer.write_checkpoint, 2);
    let again = SyncHandler::upload(&e2.svc, &token("u1"), big()).await.expect("replay");
    assert_eq!(again.outcomes, answer.outcomes);
    assert_eq!(e2.svc.db().oplog_len().expect("len"), 0);
    let next = SyncHandler::upload(
        &e2.svc,
        &token("u1"),
        upload_txs("c1", vec![(3, vec![entry(3, ticket("c", "c"), 1, "c1")])]),
    )
    .await
    .expect("next");
    assert_eq!(next.outcomes[0].outcome, Outcome::Applied);
}

#[tokio::test]
async fn bad_tokens_are_unauthorized() {
    let e = env();
    let now_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("time")
        .as_secs();
    let cases = [
        (String::new(), "missing bearer token"),
        ("garbage".to_owned(), "malformed token"),
        (
            ferry_server::mint_token("other", "u1", 60, &serde_json::Map::new()),
            "bad token signature",
        ),
        (
            mint_token_at(SECRET, "u1", now_s - 100, 10, &serde_json::Map::new()),
            "token expired",
        ),
    ];
    for (tok, expected) in cases {
        let err = SyncHandler::stream(&e.svc, &tok, TestClient::new("c").dl.request("c"))
            .await
            .expect_err("refused");
        assert_eq!(err.code, ErrorCode::Unauthorized);
        assert!(err.message.contains(expected), "{} vs {expected}", err.message);
        let err = SyncHandler::upload(&e.svc, &tok, upload_req("c", vec![]))
            .await
            .expect_err("refused");
        assert_eq!(err.code, ErrorCode::Unauthorized);
    }
}

#[tokio::test]
async fn resume_sends_only_newer_ops() {
    let e = env();
    up(
        &e.svc,
        "u1",
        "c1",
        vec![
            entry(1, ticket("t1", "a"), 1000, "c1"),
            entry(2, ticket("t2", "b"), 1000, "c1"),
        ],
    )
    .await;
    let mut c = TestClient::new("c1");
    let first = c.sync(&e.svc, &token("u1")).await;
    let first_max = data_ops(&first).iter().map(|(_, o)| o.op_id).max().expect("ops");
    up(&e.svc, "u1", "c1", vec![entry(3, ticket("t3", "c"), 1000, "c1")]).await;
    let second = c.sync(&e.svc, &token("u1")).await;
    let ops = data_ops(&second);
    assert_eq!(ops.len(), 1, "{ops:?}");
    assert!(ops[0].1.op_id > first_max);
    assert_eq!(c.rows().len(), 3);
}

#[tokio::test]
async fn open_stream_gets_checkpoint_diff_after_another_upload() {
    let e = env();
    up(&e.svc, "u1", "c1", vec![entry(1, ticket("t1", "a"), 1000, "c1")]).await;
    let mut c = TestClient::new("c2");
    let mut rx = SyncHandler::stream(&e.svc, &token("u2"), c.dl.request("c2"))
        .await
        .expect("stream");
    while !c.feed(next(&mut rx).await) {}
    up(&e.svc, "u1", "c1", vec![entry(2, ticket("t2", "b"), 1000, "c1")]).await;
    let line = next(&mut rx).await;
    let StreamLine::CheckpointDiff(diff) = &line else {
        panic!("expected a checkpoint_diff, got {line:?}");
    };
    assert_eq!(diff.updated_buckets.len(), 1);
    assert_eq!(diff.updated_buckets[0].bucket, "global[]");
    c.feed(line);
    while !c.feed(next(&mut rx).await) {}
    assert_eq!(c.rows().len(), 2);
    // This client's own upload moves its write checkpoint on the stream.
    up(&e.svc, "u2", "c2", vec![entry(7, ticket("t3", "c"), 1000, "c2")]).await;
    while !c.feed(next(&mut rx).await) {}
    assert_eq!(c.write_checkpoint, Some(7));
    e.svc.shutdown();
    let last = next(&mut rx).await;
    assert!(
        matches!(last, StreamLine::Error(ref err) if err.code == ErrorCode::ShuttingDown),
        "{last:?}"
    );
}

#[tokio::test]
async fn keepalives_flow_and_data_lines_are_bounded() {
    let options = ferry_server::ServiceOptions {
        keepalive_interval_s: 1,
        max_ops_per_line: 2,
        ..Default::default()
    };
    let e = env_with(options);
    let entries = (1..=5)
        .map(|i| entry(i, ticket(&format!("t{i}"), "x"), 1000, "c1"))
        .collect();
    up(&e.svc, "u1", "c1", entries).await;
    let mut c = TestClient::new("c1");
    let mut rx = SyncHandler::stream(&e.svc, &token("u1"), c.dl.request("c1"))
        .await
        .expect("stream");
    let mut data_lines = 0;
    loop {
        let line = next(&mut rx).await;
        if let StreamLine::Data(d) = &line {
            assert!(d.ops.len() <= 2);
            data_lines += 1;
        }
        if c.feed(line) {
            break;
        }
    }
    assert_eq!(data_lines, 3);
    let line = next(&mut rx).await;
    assert!(
        matches!(line, StreamLine::Keepalive { token_expires_in_s } if token_expires_in_s > 3500),
        "{line:?}"
    );
}

#[tokio::test]
async fn compaction_keeps_convergence() {
    let e = env();
    up(
        &e.svc,
        "u1",
        "c1",
        vec![
            entry(1, ticket("t1", "v0"), 1000, "c1"),
            entry(2, ticket("t2", "x"), 1000, "c1"),
        ],
    )
    .await;
    let mut before = TestClient::new("before");
    before.sync(&e.svc, &token("u1")).await;
    for i in 0..20u64 {
        up(
            &e.svc,
            "u1",
            "c1",
            vec![entry(
                3 + i,
                patch("tickets", "t1", &[("title", format!("v{}", i + 1).into())]),
                2000 + i,
                "c1",
            )],
        )
        .await;
    }
    up(&e.svc, "u1", "c1", vec![entry(30, delete("tickets", "t2"), 9000, "c1")]).await;
    let mut mid = TestClient::new("mid");
    mid.sync(&e.svc, &token("u1")).await;
    let len_before = e.svc.db().oplog_len().expect("len");
    let cp_before = e
        .svc
        .checkpoint(&e.svc.authenticate(&token("u1")).expect("auth"), "x")
        .await
        .expect("cp");
    assert!(e.svc.compact_all().await.expect("compact") >= 1);
    let cp_after = e
        .svc
        .checkpoint(&e.svc.authenticate(&token("u1")).expect("auth"), "x")
        .await
        .expect("cp");
    assert_eq!(
        cp_before.buckets.iter().map(|b| b.checksum).collect::<Vec<_>>(),
        cp_after.buckets.iter().map(|b| b.checksum).collect::<Vec<_>>()
    );
    assert!(e.svc.db().oplog_len().expect("len") < len_before);
    up(&e.svc, "u1", "c1", vec![entry(31, ticket("t4", "new"), 9500, "c1")]).await;

    let mut fresh = TestClient::new("fresh");
    let lines = fresh.sync(&e.svc, &token("u1")).await;
    assert!(data_ops(&lines).len() < 10, "compacted log is short");
    before.sync(&e.svc, &token("u1")).await;
    mid.sync(&e.svc, &token("u1")).await;
    assert_eq!(before.rows(), fresh.rows());
    assert_eq!(mid.rows(), fresh.rows());
    let rows = fresh.rows();
    assert_eq!(rows.len(), 2);
    assert_eq!(
        rows[&("tickets".to_owned(), "t1".to_owned())]["title"],
        Value::from("v20")
    );
}
