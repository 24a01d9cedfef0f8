//! Fan-out through the shared change feed: a commit is read once for all
//! the streams of a server, not once per stream; every stream still gets
//! every change, also one that stopped reading long enough to fall behind
//! the feed.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use common::probe::ProbeDb;
use common::*;
use ferry_core::Value;
use ferry_protocol::StreamLine;
use ferry_server::{ServiceOptions, SyncRules, SyncService, FEED_CHANNEL_EVENTS, STREAM_CATCH_UP_MS};
use ferry_transport::SyncHandler;

fn service(dir: &std::path::Path) -> (SyncService, Arc<ProbeDb>) {
    let db = Arc::new(ProbeDb::open(dir));
    let svc = SyncService::builder(db.clone(), SyncRules::ticket_tracker().expect("rules"), SECRET)
        .options(ServiceOptions::default())
        .build()
        .expect("service");
    (svc, db)
}

async fn write_ticket(svc: &SyncService, seq: u64, title: &str) {
    let answer = SyncHandler::upload(
        svc,
        &token("writer"),
        upload_req(
            "writer-client",
            vec![entry(
                seq,
                put("tickets", &format!("t{seq}"), &[("title", Value::from(title))]),
                1_000 + seq,
                "writer-client",
            )],
        ),
    )
    .await
    .expect("upload");
    assert_eq!(answer.outcomes.len(), 1);
}

/// Read a stream until a checkpoint at or past `op_id` is complete.
async fn until_op(c: &mut TestClient, rx: &mut tokio::sync::mpsc::Receiver<StreamLine>, op_id: u64) {
    loop {
        let line = next(rx).await;
        let done = matches!(&line, StreamLine::CheckpointComplete { last_op_id } if *last_op_id >= op_id);
        c.feed(line);
        if done {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_commit_is_read_once_for_all_streams() {
    const STREAMS: usize = 40;
    const WRITES: u64 = 10;
    let dir = tempfile::tempdir().expect("tempdir");
    let (svc, db) = service(dir.path());
    let mut streams = Vec::new();
    for i in 0..STREAMS {
        let mut c = TestClient::new(&format!("reader-{i}"));
        let mut rx = svc
            .stream(&token(&format!("reader-{i}")), c.dl.request(&c.id))
            .await
            .expect("stream");
        until_op(&mut c, &mut rx, 0).await;
        streams.push((c, rx));
    }
    let (checkpoints_before, reads_before) = (
        db.checkpoints.load(Ordering::Relaxed),
        db.op_reads.load(Ordering::Relaxed),
    );
    for seq in 1..=WRITES {
        write_ticket(&svc, seq, &format!("title {seq}")).await;
    }
    let last = svc.db().changes_since(u64::MAX, &[]).expect("last op").last_op_id;
    for (c, rx) in &mut streams {
        until_op(c, rx, last).await;
        assert_eq!(c.rows().len(), WRITES as usize, "{} has every ticket", c.id);
    }
    let checkpoints = db.checkpoints.load(Ordering::Relaxed) - checkpoints_before;
    let op_reads = db.op_reads.load(Ordering::Relaxed) - reads_before;
    let feed_reads = db.feed_reads.load(Ordering::Relaxed);
    eprintln!("{STREAMS} streams, {WRITES} writes: {checkpoints} stream checkpoints, {op_reads} stream op reads, {feed_reads} feed reads");
    // Per stream per write the database is not read (a stream reads it
    // again only after a keepalive or when it fell behind).
    assert!(
        checkpoints + op_reads < STREAMS * WRITES as usize / 4,
        "{checkpoints} checkpoints and {op_reads} op reads by streams for {WRITES} writes to {STREAMS} streams"
    );
    assert!(feed_reads <= 4 * WRITES as usize + 20, "{feed_reads} feed reads");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_falls_behind_the_feed_still_gets_everything() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (svc, _db) = service(dir.path());
    let mut slow = TestClient::new("slow");
    let mut rx = svc
        .stream(&token("slow"), slow.dl.request(&slow.id))
        .await
        .expect("stream");
    until_op(&mut slow, &mut rx, 0).await;
    // More commits than the feed keeps for a stream that does not read.
    let writes = FEED_CHANNEL_EVENTS as u64 + 40;
    for seq in 1..=writes {
        write_ticket(&svc, seq, "x").await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let last = svc.db().changes_since(u64::MAX, &[]).expect("last op").last_op_id;
    until_op(&mut slow, &mut rx, last).await;
    assert_eq!(slow.rows().len(), writes as usize);
}

/// Notes, each in its owner's bucket only.
const OWNED_NOTES: &str = r#"
[[tables]]
name = "notes"
columns = [{ name = "owner", type = "text" }, { name = "body", type = "text" }]

[[buckets]]
name = "mine"
parameters = ["sub"]
data = [{ table = "notes", where = { owner = "sub" } }]

[[permissions]]
table = "notes"
insert = "new.owner == auth.sub"
"#;

async fn write_note(svc: &SyncService, user: &str, client: &str, seq: u64) {
    let answer = SyncHandler::upload(
        svc,
        &token(user),
        upload_req(
            client,
            vec![entry(
                seq,
                put(
                    "notes",
                    &format!("{user}-{seq}"),
                    &[("owner", Value::from(user)), ("body", Value::from("b"))],
                ),
                1_000 + seq,
                client,
            )],
        ),
    )
    .await
    .expect("upload");
    assert!(
        matches!(answer.outcomes[0].outcome, ferry_protocol::Outcome::Applied),
        "{answer:?}"
    );
}

/// A commit goes only to the streams whose buckets it touches: a stream
/// of another user's bucket hears nothing of it, and when its own bucket
/// changes later it gets exactly its rows, with checksums that hold.
///
/// The stream may hear the op id move (a diff with no bucket in it:
/// within `STREAM_CATCH_UP_MS`, or at once when the change feed starts
/// only after those commits and the stream reads the database again),
/// never of alice's rows or buckets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_reaches_only_the_streams_whose_buckets_it_touches() {
    for late_feed in [false, true] {
        only_touched_streams_hear(late_feed).await;
    }
}

async fn only_touched_streams_hear(late_feed: bool) {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = Arc::new(ProbeDb::open(dir.path()));
    db.hold_first_feed_read.store(late_feed, Ordering::SeqCst);
    let svc = SyncService::builder(db.clone(), SyncRules::from_toml(OWNED_NOTES).expect("rules"), SECRET)
        .build()
        .expect("service");
    let mut bob = TestClient::new("bob-reader");
    let mut rx = svc
        .stream(&token("bob"), bob.dl.request(&bob.id))
        .await
        .expect("stream");
    until_op(&mut bob, &mut rx, 0).await;
    for seq in 1..=3 {
        write_note(&svc, "alice", "alice-writer", seq).await;
    }
    db.hold_first_feed_read.store(false, Ordering::SeqCst);
    let alice_last = svc.db().changes_since(u64::MAX, &[]).expect("last op").last_op_id;
    let mut bob_at = 0;
    let quiet_until = tokio::time::Instant::now() + Duration::from_millis(300);
    while let Ok(line) = tokio::time::timeout_at(quiet_until, rx.recv()).await {
        if let Some(StreamLine::CheckpointComplete { last_op_id }) = &line {
            bob_at = *last_op_id;
        }
        let only_the_op_id = match &line {
            Some(StreamLine::CheckpointDiff(d)) => d.updated_buckets.is_empty() && d.removed_buckets.is_empty(),
            Some(StreamLine::CheckpointComplete { .. }) => true,
            _ => false,
        };
        assert!(
            only_the_op_id,
            "bob's stream heard of alice's notes (late feed: {late_feed}): {line:?}"
        );
        bob.feed(line.expect("a line"));
    }
    // Yet bob's client learns that it is at alice's op id, soon.
    if bob_at < alice_last {
        let wait_ms = STREAM_CATCH_UP_MS + 2_000;
        tokio::time::timeout(Duration::from_millis(wait_ms), until_op(&mut bob, &mut rx, alice_last))
            .await
            .expect("bob's stream tells its op id within STREAM_CATCH_UP_MS");
    }
    assert!(bob.rows().is_empty(), "{:?}", bob.rows());
    write_note(&svc, "bob", "bob-writer", 1).await;
    let last = svc.db().changes_since(u64::MAX, &[]).expect("last op").last_op_id;
    until_op(&mut bob, &mut rx, last).await;
    let rows: Vec<String> = bob.rows().into_keys().map(|(_, id)| id).collect();
    assert_eq!(rows, ["bob-1"]);
    // Alice's notes, after bob's: a later stream of alice gets them all.
    let mut alice = TestClient::new("alice-reader");
    let mut arx = svc
        .stream(&token("alice"), alice.dl.request(&alice.id))
        .await
        .expect("stream");
    until_op(&mut alice, &mut arx, last).await;
    assert_eq!(alice.rows().len(), 3);
}
