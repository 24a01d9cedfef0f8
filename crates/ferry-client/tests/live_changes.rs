//! Changes reach live queries with their rows: a commit does not read the
//! store back, and live results stay equal to a fresh query over the
//! store's visible state after random local writes, checkpoints,
//! confirmations and rollbacks.

use std::collections::BTreeSet;
use std::ops::Bound;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use ferry_client::query::{col, Order};
use ferry_client::{ClientOptions, Database, Query};
use ferry_core::{row_data, ColumnType, CrudEntry, RowData, Schema, Table, Value};
use ferry_query::QueryEngine;
use ferry_queue::{Answer, LocalDbOptions, ServerChanges};
use ferry_store::{BucketEntry, BucketState, MemoryStore, OverlayEntry, Rows, Store, StoreResult, WriteBatch};
use proptest::prelude::*;

/// A store that counts its row reads (synced and overlay rows, scans).
#[derive(Debug)]
struct CountingStore {
    inner: Box<dyn Store>,
    row_reads: AtomicU64,
    /// Reads of a whole index range.
    full_index_scans: AtomicU64,
    /// Overlay rows read (by id, or in a scan of the overlay).
    overlay_rows: AtomicU64,
}

impl CountingStore {
    fn reads(&self) -> u64 {
        self.row_reads.load(Ordering::SeqCst)
    }

    fn count(&self) {
        self.row_reads.fetch_add(1, Ordering::SeqCst);
    }
}

impl Store for CountingStore {
    fn schema(&self) -> &Schema {
        self.inner.schema()
    }
    fn apply(&self, batch: WriteBatch) -> StoreResult<()> {
        self.inner.apply(batch)
    }
    fn get_synced(&self, table: &str, id: &str) -> StoreResult<Option<RowData>> {
        self.count();
        self.inner.get_synced(table, id)
    }
    fn scan_synced(&self, table: &str) -> StoreResult<Rows> {
        self.count();
        self.inner.scan_synced(table)
    }
    fn scan_synced_index(
        &self,
        table: &str,
        index: &str,
        lower: Bound<Vec<Value>>,
        upper: Bound<Vec<Value>>,
    ) -> StoreResult<Rows> {
        self.count();
        self.full_index_scans.fetch_add(1, Ordering::SeqCst);
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
        self.count();
        self.inner
            .scan_synced_index_limited(table, index, lower, upper, reverse, limit)
    }
    fn get_overlay(&self, table: &str, id: &str) -> StoreResult<Option<OverlayEntry>> {
        self.count();
        self.overlay_rows.fetch_add(1, Ordering::SeqCst);
        self.inner.get_overlay(table, id)
    }
    fn scan_overlay(&self, table: &str) -> StoreResult<Vec<(String, OverlayEntry)>> {
        self.count();
        let rows = self.inner.scan_overlay(table)?;
        self.overlay_rows.fetch_add(rows.len() as u64, Ordering::SeqCst);
        Ok(rows)
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

fn schema() -> Schema {
    Schema::new([
        Table::new("tickets")
            .column("title", ColumnType::Text)
            .column("status", ColumnType::Text)
            .column("updated_at", ColumnType::Integer)
            .index("by_status", &["status"])
            .index("by_status_updated", &["status", "updated_at"]),
        Table::new("drafts").column("body", ColumnType::Text).local_only(),
    ])
    .expect("schema")
}

fn open() -> (Arc<CountingStore>, Database) {
    open_on(Box::new(MemoryStore::new(schema())))
}

fn open_on(inner: Box<dyn Store>) -> (Arc<CountingStore>, Database) {
    let store = Arc::new(CountingStore {
        inner,
        row_reads: AtomicU64::new(0),
        full_index_scans: AtomicU64::new(0),
        overlay_rows: AtomicU64::new(0),
    });
    let options = ClientOptions {
        local: LocalDbOptions {
            client_id_seed: Some(7),
            ..LocalDbOptions::default()
        },
        ..ClientOptions::default()
    };
    let db = Database::open(store.clone(), options).expect("open");
    (store, db)
}

/// A database on the memory (0), SQLite (1) or sled (2) store.
fn open_backend(backend: u8) -> (Arc<CountingStore>, Database) {
    match backend {
        1 => open_on(Box::new(
            ferry_sqlite::SqliteStore::open_in_memory(schema()).expect("sqlite"),
        )),
        2 => open_on(Box::new(ferry_sled::SledStore::temporary(schema()).expect("sled"))),
        _ => open(),
    }
}

fn ticket(status: &str, updated_at: i64) -> RowData {
    row_data([
        ("title", Value::from(format!("t{updated_at}"))),
        ("status", Value::from(status)),
        ("updated_at", Value::Integer(updated_at)),
    ])
}

fn queries() -> Vec<Query> {
    vec![
        Query::from("tickets")
            .filter(col("status").eq("pending"))
            .order_by(col("updated_at"), Order::Desc)
            .limit(3),
        Query::from("tickets").order_by(col("title"), Order::Asc),
        Query::from("drafts"),
        Query::from("tickets")
            .filter(col("status").eq("done"))
            .select_cols(["id", "updated_at"])
            .order_by(col("updated_at"), Order::Asc)
            .offset(1)
            .limit(2),
        Query::from("tickets").filter(col("status").eq("pending")).limit(2),
        Query::from("tickets")
            .filter(col("status").eq("pending").and(col("updated_at").gte(10)))
            .order_by(col("updated_at"), Order::Desc)
            .limit(1),
    ]
}

/// The queries evaluated from scratch over the store's visible state.
fn fresh(store: &dyn Store, queries: &[Query]) -> Vec<ferry_query::QueryResult> {
    let mut engine = QueryEngine::new();
    let mut cs = ferry_query::ChangeSet::new();
    for table in ["tickets", "drafts"] {
        engine.create_collection(table).expect("collection");
        let pending: BTreeSet<String> = store
            .scan_overlay(table)
            .expect("overlay")
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        for (id, data) in store.scan_visible(table).expect("scan") {
            let p = pending.contains(&id);
            cs = cs.upsert(table, id, data, p);
        }
    }
    engine.apply(cs).expect("load");
    queries.iter().map(|q| engine.query(q).expect("query")).collect()
}

#[test]
fn commits_hand_live_queries_their_rows_without_reading_the_store() {
    let (store, db) = open();
    let mut changes = ServerChanges::new();
    changes.put_row("tickets", "s1", ticket("pending", 1));
    db.local().apply_server_changes(changes, None).expect("checkpoint");
    let (live, first) = db.live_query(&queries()[0], |_| {}).expect("live");
    assert_eq!(first.rows.len(), 1);

    let before = store.reads();
    db.write(|tx| {
        tx.put("tickets", "l1", ticket("pending", 5))?;
        tx.put("drafts", "d1", row_data([("body", Value::from("x"))]))
    })
    .expect("write");
    assert_eq!(store.reads(), before, "a local write reads no rows");
    let mut changes = ServerChanges::new();
    changes.put_row("tickets", "s2", ticket("pending", 3));
    changes.delete_row("tickets", "s1");
    db.local().apply_server_changes(changes, None).expect("checkpoint");
    assert_eq!(
        store.reads(),
        before,
        "a checkpoint of rows without pending writes reads none"
    );

    let now = live.current().expect("current");
    let ids: Vec<&str> = now.rows.iter().filter_map(|r| r.id()).collect();
    assert_eq!(ids, ["l1", "s2"]);
    assert_eq!(now.rows.iter().map(|r| r.pending).collect::<Vec<_>>(), [true, false]);
}

#[test]
fn a_window_that_new_rows_keep_entering_shrinks_without_reading_the_store() {
    // Newest first, 3 rows: the window keeps 6 and shrinks past 12.
    let newest = &queries()[0];
    // Ascending, 2 rows after 1: ties on updated_at at its edge.
    let oldest = Query::from("tickets")
        .filter(col("status").eq("pending"))
        .order_by(col("updated_at"), Order::Asc)
        .offset(1)
        .limit(2);
    for backend in 0..3 {
        let (store, db) = open_backend(backend);
        let mut changes = ServerChanges::new();
        for i in 0..40i64 {
            changes.put_row("tickets", format!("s{i:02}"), ticket("pending", 100 + i / 3));
        }
        db.local().apply_server_changes(changes, None).expect("checkpoint");
        let diffs = Arc::new(AtomicU64::new(0));
        let seen = diffs.clone();
        let (live, _) = db
            .live_query(newest, move |_| {
                seen.fetch_add(1, Ordering::SeqCst);
            })
            .expect("live");
        let (low, _) = db.live_query(&oldest, |_| {}).expect("live");
        // Rows read by the writes (the checks read the store too).
        let mut reads = 0;
        // 30 rows enter at the top of the newest-first window, two per
        // commit, some tied with each other; as many at the bottom of the
        // other.
        for k in 0..30i64 {
            let before = store.reads();
            db.write(|tx| {
                tx.put("tickets", &format!("top{k:02}"), ticket("pending", 200 + k / 2))?;
                tx.put("tickets", &format!("low{k:02}"), ticket("pending", 99 - k / 2))
            })
            .expect("write");
            reads += store.reads() - before;
            let expected = fresh(store.as_ref(), &[newest.clone(), oldest.clone()]);
            assert_eq!(
                live.current().expect("current"),
                expected[0],
                "backend {backend}, write {k}"
            );
            assert_eq!(
                low.current().expect("current"),
                expected[1],
                "backend {backend}, write {k}"
            );
        }
        assert_eq!(
            reads, 0,
            "backend {backend}: the windows shrank in memory, reading nothing"
        );
        assert_eq!(
            diffs.load(Ordering::SeqCst),
            30,
            "backend {backend}: one diff per commit"
        );
        // Rows leaving now refill from the store past the new edge.
        for k in (0..30i64).rev() {
            db.write(|tx| tx.delete("tickets", &format!("top{k:02}")))
                .expect("delete");
            let expected = fresh(store.as_ref(), &[newest.clone(), oldest.clone()]);
            assert_eq!(
                live.current().expect("current"),
                expected[0],
                "backend {backend}, delete {k}"
            );
        }
    }
}

#[test]
fn a_window_over_many_pending_writes_reads_only_the_overlay_rows_it_needs() {
    const PENDING_ELSEWHERE: i64 = 400;
    for backend in 0..3 {
        let (store, db) = open_backend(backend);
        // Pending writes outside the window's range (never uploaded).
        for i in 0..PENDING_ELSEWHERE {
            db.write(|tx| tx.put("tickets", &format!("d{i:03}"), ticket("done", i)))
                .expect("put");
        }
        let (live, first) = db.live_query(&queries()[0], |_| {}).expect("live");
        assert!(first.rows.is_empty());
        store.overlay_rows.store(0, Ordering::SeqCst);
        // Rows entering the window (each pushes one out, and the window
        // reloads as its kept rows grow), then deletes of the rows it
        // shows (it refills from the store each time).
        for k in 0..40 {
            db.write(|tx| tx.put("tickets", &format!("p{k:02}"), ticket("pending", 100 + k)))
                .expect("put");
        }
        for k in (30..40).rev() {
            db.write(|tx| tx.delete("tickets", &format!("p{k:02}")))
                .expect("delete");
        }
        let now = live.current().expect("current");
        let ids: Vec<&str> = now.rows.iter().filter_map(|r| r.id()).collect();
        assert_eq!(ids, ["p29", "p28", "p27"], "backend {backend}");
        assert!(now.rows.iter().all(|r| r.pending), "backend {backend}");
        // A reload or refill that read the whole overlay would read the
        // 400 rows elsewhere each time.
        let read = store.overlay_rows.load(Ordering::SeqCst);
        assert!(
            read < PENDING_ELSEWHERE as u64,
            "backend {backend}: {read} overlay rows read for 50 writes"
        );
    }
}

#[derive(Clone, Debug)]
enum Step {
    Put {
        id: u8,
        pending: bool,
        at: i64,
    },
    Update {
        id: u8,
        at: i64,
    },
    Delete {
        id: u8,
    },
    Draft {
        id: u8,
    },
    Server {
        id: u8,
        pending: bool,
        at: i64,
        delete: bool,
    },
    /// Answer everything queued, rejecting the entry at this index.
    Answer {
        reject: Option<u8>,
    },
    /// A checkpoint confirming everything answered.
    Confirm,
}

fn step() -> impl Strategy<Value = Step> {
    let id = 0u8..12;
    prop_oneof![
        (id.clone(), any::<bool>(), 0i64..50).prop_map(|(id, pending, at)| Step::Put { id, pending, at }),
        (id.clone(), 0i64..50).prop_map(|(id, at)| Step::Update { id, at }),
        id.clone().prop_map(|id| Step::Delete { id }),
        id.clone().prop_map(|id| Step::Draft { id }),
        (id, any::<bool>(), 0i64..50, any::<bool>()).prop_map(|(id, pending, at, delete)| Step::Server {
            id,
            pending,
            at,
            delete
        }),
        proptest::option::of(0u8..4).prop_map(|reject| Step::Answer { reject }),
        Just(Step::Confirm),
    ]
}

fn status(pending: bool) -> &'static str {
    if pending {
        "pending"
    } else {
        "done"
    }
}

fn run(db: &Database, step: &Step) {
    let local = db.local();
    match step {
        Step::Put { id, pending, at } => {
            db.write(|tx| tx.put("tickets", &format!("r{id}"), ticket(status(*pending), *at)))
                .expect("put");
        }
        Step::Update { id, at } => {
            let _ = db.write(|tx| {
                tx.update(
                    "tickets",
                    &format!("r{id}"),
                    row_data([("updated_at", Value::Integer(*at))]),
                )
            });
        }
        Step::Delete { id } => {
            db.write(|tx| tx.delete("tickets", &format!("r{id}"))).expect("delete");
        }
        Step::Draft { id } => {
            db.write(|tx| tx.put("drafts", &format!("d{id}"), row_data([("body", Value::from("b"))])))
                .expect("draft");
        }
        Step::Server {
            id,
            pending,
            at,
            delete,
        } => {
            let mut changes = ServerChanges::new();
            if *delete {
                changes.delete_row("tickets", format!("r{id}"));
            } else {
                changes.put_row("tickets", format!("r{id}"), ticket(status(*pending), *at));
            }
            local.apply_server_changes(changes, None).expect("checkpoint");
        }
        Step::Answer { reject } => {
            let from = local.completed_through() + 1;
            let last = local.last_seq();
            if last < from {
                return;
            }
            let rejected = reject
                .map(|i| from + u64::from(i))
                .filter(|seq| *seq <= last)
                .map(|seq| vec![(seq, "refused".to_owned())])
                .unwrap_or_default();
            local
                .answer(&Answer {
                    through_seq: last,
                    rejected,
                    ..Answer::default()
                })
                .expect("answer");
        }
        Step::Confirm => {
            local
                .apply_server_changes(ServerChanges::new(), Some(local.completed_through()))
                .expect("confirm");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn live_results_equal_a_fresh_query(steps in proptest::collection::vec(step(), 1..60), backend in 0u8..3) {
        let (store, db) = open_backend(backend);
        let queries = queries();
        let lives: Vec<_> = queries
            .iter()
            .map(|q| db.live_query(q, |_| {}).expect("live").0)
            .collect();
        for step in &steps {
            run(&db, step);
            let expected = fresh(store.as_ref(), &queries);
            for (live, expected) in lives.iter().zip(&expected) {
                prop_assert_eq!(&live.current().expect("current"), expected, "after {:?}", step);
            }
        }
    }
}

#[test]
fn explain_uses_the_client_schemas_indexes() {
    let (_store, db) = open();
    let plan = db.explain(&queries()[0]).expect("explain");
    let scan = plan.access().index().expect("an index serves it");
    assert_eq!(scan.index, "by_status_updated");
    assert_eq!(scan.equal, [Value::from("pending")]);
    assert!(scan.serves_order && scan.reverse, "{plan}");
    assert!(plan.index_window().is_some(), "{plan}");
    assert!(plan.to_string().contains("index window on tickets, 6 rows"), "{plan}");
    for (i, q) in queries().iter().enumerate() {
        let windowed = db.explain(q).expect("explain").index_window().is_some();
        assert_eq!(windowed, [true, false, false, true, true, true][i], "{q:?}");
    }
    let plan = db.explain(&queries()[1]).expect("explain");
    assert_eq!(plan.access(), &ferry_query::Access::FullScan);
    assert!(
        plan.to_string()
            .contains("source tickets: keeps every row of the collection"),
        "{plan}"
    );
    let err = db.explain(&Query::from("nope")).expect_err("unknown table");
    assert!(err.to_string().contains("nope"), "{err}");
}

/// Rows leave a limited store-backed window (deleted, moved out of the
/// range, moved past its edge, by local writes and by checkpoints) until
/// it must read the rows after its edge, and come back into it; the
/// window's result equals a fresh query after every step, on every
/// backend, and it never reads the whole range.
#[test]
fn rows_leave_and_reenter_a_limited_window() {
    let windows = [
        Query::from("tickets")
            .filter(col("status").eq("pending"))
            .order_by(col("updated_at"), Order::Desc)
            .limit(3),
        Query::from("tickets")
            .filter(col("status").eq("pending"))
            .order_by(col("updated_at"), Order::Asc)
            .offset(1)
            .limit(2),
        Query::from("tickets")
            .filter(col("status").eq("pending").and(col("updated_at").lt(30)))
            .order_by(col("updated_at"), Order::Desc)
            .limit(2),
    ];
    for backend in 0..3 {
        let (store, db) = open_backend(backend);
        let mut changes = ServerChanges::new();
        // 40 pending rows, with ties on updated_at, and 40 done ones.
        for i in 0..80i64 {
            let status = if i % 2 == 0 { "pending" } else { "done" };
            changes.put_row("tickets", format!("s{i:02}"), ticket(status, i / 4));
        }
        db.local().apply_server_changes(changes, None).expect("checkpoint");
        let lives: Vec<_> = windows
            .iter()
            .map(|q| {
                assert!(db.explain(q).expect("explain").index_window().is_some(), "{q:?}");
                db.live_query(q, |_| {}).expect("live").0
            })
            .collect();
        let check = |what: &str| {
            let expected = fresh(store.as_ref(), &windows);
            for (i, (live, expected)) in lives.iter().zip(&expected).enumerate() {
                assert_eq!(
                    &live.current().expect("current"),
                    expected,
                    "backend {backend}, window {i}, after {what}"
                );
            }
        };
        check("the first result");
        let ids: Vec<String> = (0..80).step_by(2).map(|i| format!("s{i:02}")).collect();
        // Leave from both ends, by local deletes and moves out of range.
        for (n, id) in ids.iter().rev().take(12).chain(ids.iter().take(6)).enumerate() {
            db.write(|tx| {
                if n % 3 == 0 {
                    tx.delete("tickets", id)
                } else if n % 3 == 1 {
                    tx.update("tickets", id, row_data([("status", Value::from("done"))]))
                } else {
                    // Still pending, but in the middle of the range.
                    tx.update("tickets", id, row_data([("updated_at", Value::Integer(10))]))
                }
            })
            .expect("write");
            check(&format!("{id} left"));
        }
        // Checkpoints remove rows too.
        for id in ids.iter().rev().skip(12).take(6) {
            let mut changes = ServerChanges::new();
            changes.delete_row("tickets", id.clone());
            db.local().apply_server_changes(changes, None).expect("checkpoint");
            check(&format!("{id} deleted by a checkpoint"));
        }
        // Come back: at the top, at the bottom, tied with kept rows.
        for (n, id) in ids.iter().rev().take(18).enumerate() {
            let at = [100, -1, 5, 17][n % 4];
            db.write(|tx| tx.put("tickets", id, ticket("pending", at)))
                .expect("write");
            check(&format!("{id} came back at {at}"));
        }
        // Rejected writes roll back: the rows leave or come back again.
        let local = db.local();
        let from = local.completed_through() + 1;
        let last = local.last_seq();
        local
            .answer(&Answer {
                through_seq: last,
                rejected: (from..=last)
                    .step_by(3)
                    .map(|seq| (seq, "refused".to_owned()))
                    .collect(),
                ..Answer::default()
            })
            .expect("answer");
        check("rollbacks");
        local
            .apply_server_changes(ServerChanges::new(), Some(local.completed_through()))
            .expect("confirm");
        check("confirmation");
        assert_eq!(
            store.full_index_scans.load(Ordering::SeqCst),
            0,
            "backend {backend}: windows read limited index ranges only"
        );
    }
}

#[test]
fn an_index_windows_state_does_not_grow_with_the_table() {
    let window = Query::from("tickets")
        .filter(col("status").eq("pending"))
        .order_by(col("updated_at"), Order::Desc)
        .limit(5);
    let whole = Query::from("tickets")
        .filter(col("status").eq("pending"))
        .order_by(col("title"), Order::Desc)
        .limit(5);
    for backend in 0..3 {
        let mut sizes = Vec::new();
        for n in [200i64, 2_000] {
            let (_store, db) = open_backend(backend);
            let mut changes = ServerChanges::new();
            // Ids, titles and timestamps of one length at every n, so the
            // newest rows encode to the same sizes.
            for i in 0..n {
                let status = if i % 2 == 0 { "pending" } else { "done" };
                changes.put_row("tickets", format!("s{i:06}"), ticket(status, 1_000_000 + i));
            }
            db.local().apply_server_changes(changes, None).expect("checkpoint");
            let (live, first) = db.live_query(&window, |_| {}).expect("live");
            assert_eq!(first.rows.len(), 5);
            let (all, _) = db.live_query(&whole, |_| {}).expect("live");
            let bytes = live.state_bytes().expect("state bytes");
            // The window keeps its rows (5 plus a margin of 5) and no more.
            let row = format!("s{:06}", 0).len() + ferry_core::codec::encode_row(&ticket("pending", 1_000_000)).len();
            assert!(
                bytes >= 10 * row && bytes < 12 * row,
                "backend {backend}, n {n}: {bytes}"
            );
            // A query no index serves keeps the whole table.
            let done = format!("s{:06}", 0).len() + ferry_core::codec::encode_row(&ticket("done", 1_000_000)).len();
            let n_half = n as usize / 2;
            assert_eq!(
                all.state_bytes().expect("state bytes"),
                n_half * (row + done),
                "backend {backend}"
            );
            sizes.push(bytes);
        }
        assert_eq!(sizes[0], sizes[1], "backend {backend}");
    }
}
