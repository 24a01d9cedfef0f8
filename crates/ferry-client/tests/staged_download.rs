//! A fresh stream asked for (`Database::sync_now`, a pause, a token
//! refresh) while a checkpoint's ops are being staged or applied must not
//! lose any of them. Found by `multi_bucket.rs` about once in a hundred
//! runs: the stream session could be dropped at any await, for instance
//! after the download state counted a `data` line's ops as staged and
//! before the staging writer took them; the next stream resumed after
//! those ops, and the checkpoint switched in a range the staging area did
//! not hold, so the bucket states advanced without their rows (the
//! writer's own device showed the value before its acknowledged write,
//! for good).
//!
//! A store that holds every staging batch for a while, with a staging
//! budget of 1 KiB, makes the window wide: a checkpoint of two buckets
//! waits for room for its second bucket's ops while the test asks for a
//! fresh stream.

mod common;

use std::ops::Bound;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{client_options, client_schema, service, text, token};
use ferry_client::{ClientOptions, Database, StaticToken};
use ferry_core::{row_data, CrudEntry, RowData, Schema, SystemClock, Value};
use ferry_server::SyncService;
use ferry_sqlite::SqliteStore;
use ferry_store::{BatchOp, BucketEntry, BucketState, OverlayEntry, Rows, Store, StoreResult, WriteBatch};
use ferry_transport::{MemoryTransport, SyncHandler, Transport};

/// A store whose staging batches wait `hold_ms` before they apply, while
/// `holding` is set, or are lost (acknowledged, not written) while
/// `losing` is set.
#[derive(Debug)]
struct SlowStaging {
    inner: SqliteStore,
    holding: AtomicBool,
    losing: AtomicBool,
    hold_ms: u64,
    /// Staging batches that started applying.
    started: AtomicU64,
}

impl Store for SlowStaging {
    fn schema(&self) -> &Schema {
        self.inner.schema()
    }
    fn apply(&self, batch: WriteBatch) -> StoreResult<()> {
        let staging = batch.ops.iter().any(|op| matches!(op, BatchOp::PutStaged { .. }));
        if staging {
            self.started.fetch_add(1, Ordering::SeqCst);
            if self.holding.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(self.hold_ms));
            }
            if self.losing.swap(false, Ordering::SeqCst) {
                return Ok(());
            }
        }
        self.inner.apply(batch)
    }
    fn get_synced(&self, table: &str, id: &str) -> StoreResult<Option<RowData>> {
        self.inner.get_synced(table, id)
    }
    fn scan_synced(&self, table: &str) -> StoreResult<Rows> {
        self.inner.scan_synced(table)
    }
    fn scan_synced_index(
        &self,
        table: &str,
        index: &str,
        lower: Bound<Vec<Value>>,
        upper: Bound<Vec<Value>>,
    ) -> StoreResult<Rows> {
        self.inner.scan_synced_index(table, index, lower, upper)
    }
    fn scan_synced_index_limited(
        &self,
        table: &str,
        index: &str,
        lower: Bound<Vec<Value>>,
        upper: Bound<Vec<Value>>,
        reverse: bool,
        limit: usize,
    ) -> StoreResult<Rows> {
        self.inner
            .scan_synced_index_limited(table, index, lower, upper, reverse, limit)
    }
    fn get_overlay(&self, table: &str, id: &str) -> StoreResult<Option<OverlayEntry>> {
        self.inner.get_overlay(table, id)
    }
    fn scan_overlay(&self, table: &str) -> StoreResult<Vec<(String, OverlayEntry)>> {
        self.inner.scan_overlay(table)
    }
    fn queue_from(&self, from_seq: u64, limit: usize) -> StoreResult<Vec<CrudEntry>> {
        self.inner.queue_from(from_seq, limit)
    }
    fn queue_len(&self) -> StoreResult<u64> {
        self.inner.queue_len()
    }
    fn bucket_state(&self, bucket: &str) -> StoreResult<Option<BucketState>> {
        self.inner.bucket_state(bucket)
    }
    fn buckets(&self) -> StoreResult<Vec<(String, BucketState)>> {
        self.inner.buckets()
    }
    fn bucket_entry(&self, bucket: &str, table: &str, row_id: &str) -> StoreResult<Option<BucketEntry>> {
        self.inner.bucket_entry(bucket, table, row_id)
    }
    fn bucket_entries(&self, bucket: &str, after: Option<(&str, &str)>, limit: usize) -> StoreResult<Vec<BucketEntry>> {
        self.inner.bucket_entries(bucket, after, limit)
    }
    fn get_meta(&self, key: &str) -> StoreResult<Option<Vec<u8>>> {
        self.inner.get_meta(key)
    }
    fn staged_ops(&self, bucket: &str, after_op_id: u64, limit: usize) -> StoreResult<Vec<ferry_store::StagedOp>> {
        self.inner.staged_ops(bucket, after_op_id, limit)
    }
    fn staged_buckets(&self) -> StoreResult<Vec<String>> {
        self.inner.staged_buckets()
    }
}

fn connect(db: &Database, svc: &Arc<SyncService>, user: &str) {
    let handler: Arc<dyn SyncHandler> = svc.clone();
    let transport: Arc<dyn Transport> = Arc::new(MemoryTransport::new(handler));
    db.connect(transport, Arc::new(StaticToken(token(user))));
}

fn assignee(db: &Database) -> Option<Value> {
    db.local()
        .get("assignments", "a1")
        .expect("read")
        .and_then(|row| row.get("user_id").cloned())
}

/// Hold staging writes, reassign a1 to `user` and wait until the
/// checkpoint with that write started staging (and is held there).
async fn reassign_while_staging_held(store: &SlowStaging, alice: &Database, user: &str) {
    let before = store.started.load(Ordering::SeqCst);
    store.holding.store(true, Ordering::SeqCst);
    reassign(alice, user);
    started(store, before + 1).await;
}

/// Wait until `n` staging batches started applying.
async fn started(store: &SlowStaging, n: u64) {
    for _ in 0..1_000 {
        if store.started.load(Ordering::SeqCst) >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("nothing was staged within 5 s");
}

/// Alice's device on a [`SlowStaging`] store with a 1 KiB staging budget,
/// connected, after assigning a1 to bob.
async fn alice_after_first_assignment(dir: &std::path::Path, svc: &Arc<SyncService>) -> (Arc<SlowStaging>, Database) {
    let store = Arc::new(SlowStaging {
        inner: SqliteStore::open(dir.join("client.db"), client_schema()).expect("client store"),
        holding: AtomicBool::new(false),
        losing: AtomicBool::new(false),
        hold_ms: 300,
        started: AtomicU64::new(0),
    });
    let options = ClientOptions {
        staging_memory_bytes: 1024,
        ..client_options(1, Arc::new(SystemClock))
    };
    let alice = Database::open(store.clone(), options).expect("open client");
    connect(&alice, svc, "alice");
    alice
        .write(|tx| {
            tx.insert(
                "assignments",
                "a1",
                row_data([("ticket_id", text("t1")), ("user_id", text("bob"))]),
            )
        })
        .expect("assign to bob");
    assert!(alice.sync_now(10_000).await, "alice synced the first assignment");
    (store, alice)
}

fn reassign(alice: &Database, user: &str) {
    alice
        .write(|tx| tx.update("assignments", "a1", row_data([("user_id", text(user))])))
        .expect("reassign");
}

/// The writer's device shows a1 assigned to `user`, and each bucket holds
/// the row exactly when the server's does: always in `global`, in alice's
/// assignments only while it is hers; and at the op its state says.
fn check(alice: &Database, user: &str, round: usize) {
    assert_eq!(
        assignee(alice),
        Some(text(user)),
        "round {round}: the writer's device shows its own acknowledged write"
    );
    let local = alice.local();
    for (bucket, state) in local.store().buckets().expect("buckets") {
        let entries = local.store().bucket_entries(&bucket, None, 100).expect("entries");
        let holds = bucket == "global[]" || (bucket == "my_assignments[\"alice\"]" && user == "alice");
        assert_eq!(
            entries.len(),
            usize::from(holds),
            "round {round}: {bucket} (state {state:?}) holds {entries:?}"
        );
        if bucket == "global[]" {
            assert_eq!(
                entries[0].op_id, state.last_op_id,
                "round {round}: {bucket}'s entry is its last op"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_stream_asked_for_while_a_checkpoint_downloads_loses_nothing_of_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let svc = service(&dir.path().join("server"));
    let (store, alice) = alice_after_first_assignment(dir.path(), &svc).await;
    for (round, user) in ["alice", "carol", "bob", "alice"].into_iter().enumerate() {
        reassign_while_staging_held(&store, &alice, user).await;
        // The checkpoint with this write is being staged: ask for a fresh
        // stream now.
        assert!(alice.sync_now(10_000).await, "round {round}: caught up");
        store.holding.store(false, Ordering::SeqCst);
        check(&alice, user, round);
    }
    alice.close().await.expect("close");
}

/// Defence in depth: whatever loses a staged op (here a store that drops
/// a staging batch it acknowledged), the checkpoint is not switched in
/// without it: the client finds the staging area short of what the
/// checkpoint validated, discards it and downloads the ops again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_whose_staged_ops_went_missing_is_downloaded_again_not_applied() {
    let dir = tempfile::tempdir().expect("tempdir");
    let svc = service(&dir.path().join("server"));
    let (store, alice) = alice_after_first_assignment(dir.path(), &svc).await;
    for (round, user) in ["alice", "carol", "alice"].into_iter().enumerate() {
        store.losing.store(true, Ordering::SeqCst);
        reassign(&alice, user);
        assert!(alice.sync_now(10_000).await, "round {round}: caught up");
        assert!(
            !store.losing.load(Ordering::SeqCst),
            "round {round}: a staging batch was lost"
        );
        check(&alice, user, round);
    }
    alice.close().await.expect("close");
}

/// `Database::connect` on a connected database replaces the connection at
/// once, aborting its loops wherever they are: possibly after the
/// download state counted a line's ops and before the staging writer took
/// them. The next connection finds the staging area short of what the
/// checkpoint validated and downloads those ops again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_replaced_while_a_checkpoint_downloads_loses_nothing_of_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let svc = service(&dir.path().join("server"));
    let (store, alice) = alice_after_first_assignment(dir.path(), &svc).await;
    for (round, user) in ["alice", "carol", "bob", "alice"].into_iter().enumerate() {
        reassign_while_staging_held(&store, &alice, user).await;
        connect(&alice, &svc, "alice");
        store.holding.store(false, Ordering::SeqCst);
        assert!(alice.sync_now(10_000).await, "round {round}: caught up");
        check(&alice, user, round);
    }
    alice.close().await.expect("close");
}
