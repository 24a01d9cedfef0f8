//! Streams wake on the source database's commit notifications, and look
//! for new ops on every keepalive, so a lost notification (another
//! server's commit, a dropped LISTEN connection) delays a change by at
//! most one keepalive interval.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use ferry_core::{HlcTimestamp, Schema, Table};
use ferry_protocol::{DataLineWriter, OplogEntry, StreamLine, StreamRequest};
use ferry_server::{
    CheckpointState, CommitReceiver, OpRange, ServiceOptions, SourceDb, SourceError, SourceTx, SqliteSourceDb,
    StoredOutcome, StoredRow, SyncRules, SyncService,
};

/// SQLite whose commit notifications never come.
#[derive(Debug)]
struct Silent {
    inner: SqliteSourceDb,
    _never: tokio::sync::watch::Sender<u64>,
    never: CommitReceiver,
}

type R<T> = Result<T, SourceError>;

impl SourceDb for Silent {
    fn commits(&self) -> CommitReceiver {
        self.never.clone()
    }
    fn migrate(&self, schema: &Schema) -> R<()> {
        self.inner.migrate(schema)
    }
    fn write(&self, work: &mut dyn FnMut(&mut dyn SourceTx) -> R<()>) -> R<()> {
        self.inner.write(work)
    }
    fn checkpoint(&self, client_id: &str, buckets: &[String]) -> R<CheckpointState> {
        self.inner.checkpoint(client_id, buckets)
    }
    fn read_ops(&self, range: &OpRange<'_>) -> R<Vec<OplogEntry>> {
        self.inner.read_ops(range)
    }
    fn read_ops_into(&self, range: &OpRange<'_>, line: &mut DataLineWriter) -> R<Option<u64>> {
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
    fn changes_since(&self, after_op_id: u64, clients: &[String]) -> R<ferry_server::ChangesSince> {
        self.inner.changes_since(after_op_id, clients)
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
    let (never_tx, never) = tokio::sync::watch::channel(0);
    let db = Arc::new(Silent {
        inner: SqliteSourceDb::open_dir(dir.path()).expect("open db"),
        _never: never_tx,
        never,
    });
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
