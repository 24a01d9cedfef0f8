//! Fan-out through the shared change feed: a commit is read once for all
//! the streams of a server, not once per stream; every stream still gets
//! every change, also one that stopped reading long enough to fall behind
//! the feed.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use ferry_core::{HlcTimestamp, Schema, Table, Value};
use ferry_protocol::{DataLineWriter, OplogEntry, StreamLine};
use ferry_server::{
    ChangesSince, CheckpointState, CommitReceiver, OpRange, ServiceOptions, SourceDb, SourceError, SourceTx,
    SqliteSourceDb, StoredOutcome, StoredRow, SyncRules, SyncService, FEED_CHANNEL_EVENTS,
};
use ferry_transport::SyncHandler;

/// SQLite that counts the reads streams make.
#[derive(Debug)]
struct Counting {
    inner: SqliteSourceDb,
    checkpoints: AtomicUsize,
    op_reads: AtomicUsize,
    feed_reads: AtomicUsize,
}

type R<T> = Result<T, SourceError>;

impl SourceDb for Counting {
    fn commits(&self) -> CommitReceiver {
        self.inner.commits()
    }
    fn migrate(&self, schema: &Schema) -> R<()> {
        self.inner.migrate(schema)
    }
    fn write(&self, work: &mut dyn FnMut(&mut dyn SourceTx) -> R<()>) -> R<()> {
        self.inner.write(work)
    }
    fn checkpoint(&self, client_id: &str, buckets: &[String]) -> R<CheckpointState> {
        self.checkpoints.fetch_add(1, Ordering::Relaxed);
        self.inner.checkpoint(client_id, buckets)
    }
    fn changes_since(&self, after_op_id: u64, clients: &[String]) -> R<ChangesSince> {
        self.feed_reads.fetch_add(1, Ordering::Relaxed);
        self.inner.changes_since(after_op_id, clients)
    }
    fn read_ops(&self, range: &OpRange<'_>) -> R<Vec<OplogEntry>> {
        self.inner.read_ops(range)
    }
    fn read_ops_into(&self, range: &OpRange<'_>, line: &mut DataLineWriter) -> R<Option<u64>> {
        self.op_reads.fetch_add(1, Ordering::Relaxed);
        self.inner.read_ops_into(range, line)
    }
    fn bucket_names(&self) -> R<Vec<String>> {
        self.inner.bucket_names()
    }
    fn oplog_len(&self) -> R<u64> {
        self.inner.oplog_len()
    }
    fn get_row(&self, table: &Table, id: &str) -> R<Option<StoredRow>> {
        self.inner.get_row(table, id)
    }
    fn client_owner(&self, client_id: &str) -> R<Option<String>> {
        self.inner.client_owner(client_id)
    }
    fn client_outcomes(&self, client_id: &str, after_seq: u64, limit: usize) -> R<Vec<(u64, StoredOutcome)>> {
        self.inner.client_outcomes(client_id, after_seq, limit)
    }
    fn meta(&self, key: &str) -> R<Option<String>> {
        self.inner.meta(key)
    }
    fn row_ids(&self, table: &Table, after_id: Option<&str>, limit: usize) -> R<Vec<String>> {
        self.inner.row_ids(table, after_id, limit)
    }
    fn max_clock(&self) -> R<Option<HlcTimestamp>> {
        self.inner.max_clock()
    }
}

fn service(dir: &std::path::Path) -> (SyncService, Arc<Counting>) {
    let db = Arc::new(Counting {
        inner: SqliteSourceDb::open_dir(dir).expect("db"),
        checkpoints: AtomicUsize::new(0),
        op_reads: AtomicUsize::new(0),
        feed_reads: AtomicUsize::new(0),
    });
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
