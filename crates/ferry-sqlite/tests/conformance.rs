//! The ferry-store conformance suite on SQLite, plus SQLite-specific tests
//! (index rebuilds on reopen, the in-memory variant, integer limits) and
//! direct comparisons against `MemoryStore`.

use std::ops::Bound;

use ferry_core::{row_data, ColumnType, CrudEntry, CrudOp, RowData, Schema, Table, Value};
use ferry_sqlite::{SqliteOptions, SqliteStore, Synchronous};
use ferry_store::testkit::{test_schema, Backend};
use ferry_store::{
    BatchOp, BucketEntry, BucketState, MemoryStore, OverlayEntry, Store, StoreError, StoreResult, WriteBatch,
};

#[derive(Debug, Clone, Copy, Default)]
struct SqliteBackend;

impl Backend for SqliteBackend {
    type Location = tempfile::TempDir;
    type Store = SqliteStore;

    fn fresh(&self) -> Self::Location {
        tempfile::tempdir().expect("temporary directory")
    }

    fn open(&self, location: &Self::Location, schema: Schema) -> StoreResult<Self::Store> {
        SqliteStore::open(location.path().join("ferry.db"), schema)
    }
}

ferry_store::conformance_tests!(SqliteBackend);

// ----- comparisons against MemoryStore -----

fn ticket(status: &str, version: i64) -> RowData {
    row_data([
        ("title", Value::from(format!("{status}-{version}"))),
        ("status", Value::from(status)),
        ("version", Value::from(version)),
        ("score", Value::from(version as f64 / 4.0)),
    ])
}

fn entry(seq: u64) -> CrudEntry {
    CrudEntry {
        seq,
        tx_id: seq / 2,
        op: CrudOp::Put {
            table: "tickets".into(),
            id: format!("q{seq}"),
            data: ticket("pending", seq as i64),
        },
        previous: None,
        metadata: None,
        hlc: None,
    }
}

/// Everything both stores hold, as comparable text.
fn dump(s: &dyn Store) -> String {
    let mut out = String::new();
    for t in ["tickets", "notes"] {
        out += &format!("{t} synced {:?}\n", s.scan_synced(t).expect("scan"));
        out += &format!("{t} overlay {:?}\n", s.scan_overlay(t).expect("scan"));
        out += &format!("{t} visible {:?}\n", s.scan_visible(t).expect("scan"));
    }
    for index in ["by_status", "by_version", "by_score", "by_status_version"] {
        let rows = s
            .scan_synced_index("tickets", index, Bound::Unbounded, Bound::Unbounded)
            .expect("index scan");
        out += &format!("{index} {rows:?}\n");
        let rows = s
            .scan_visible_index("tickets", index, Bound::Unbounded, Bound::Unbounded)
            .expect("index scan");
        out += &format!("{index} visible {rows:?}\n");
    }
    out += &format!("queue {:?}\n", s.queue_from(0, usize::MAX).expect("queue"));
    out += &format!("queue len {}\n", s.queue_len().expect("len"));
    for (name, state) in s.buckets().expect("buckets") {
        out += &format!(
            "bucket {name} {state:?} {:?}\n",
            s.bucket_entries(&name, None, usize::MAX).expect("entries")
        );
    }
    for k in ["k1", "k2"] {
        out += &format!("meta {k} {:?}\n", s.get_meta(k).expect("meta"));
    }
    out
}

fn both(batches: &[WriteBatch]) -> (SqliteStore, MemoryStore) {
    let sqlite = SqliteStore::open_in_memory(test_schema()).expect("open");
    let memory = MemoryStore::new(test_schema());
    for b in batches {
        let a = sqlite.apply(b.clone()).map_err(|e| e.to_string());
        let m = memory.apply(b.clone()).map_err(|e| e.to_string());
        assert_eq!(a, m, "batch {b:?}");
    }
    assert_eq!(dump(&sqlite), dump(&memory));
    (sqlite, memory)
}

#[test]
fn matches_memory_store_on_mixed_batches() {
    let mut b1 = WriteBatch::new();
    for i in 0..50i64 {
        b1.put_synced(
            "tickets",
            format!("t{i:03}"),
            ticket(["a", "b", "c"][(i % 3) as usize], (i * 13) % 17 - 8),
        );
    }
    b1.put_synced("tickets", "empty", RowData::new());
    b1.put_synced("notes", "n", row_data([("body", Value::from("x\0y"))]));
    b1.append_queue(entry(1)).append_queue(entry(2)).append_queue(entry(5));
    b1.put_meta("k1", vec![]);
    b1.push(BatchOp::PutBucketEntry {
        bucket: "b".into(),
        entry: BucketEntry {
            table: "tickets".into(),
            row_id: "t001".into(),
            op_id: 7,
            checksum: u32::MAX,
        },
    });
    // Same row in a bucket whose name extends "b": survives deleting "b".
    b1.push(BatchOp::PutBucketEntry {
        bucket: "b/x".into(),
        entry: BucketEntry {
            table: "tickets".into(),
            row_id: "t001".into(),
            op_id: i64::MAX as u64,
            checksum: 0,
        },
    });
    b1.push(BatchOp::PutBucketState {
        bucket: "b/x".into(),
        state: BucketState::default(),
    });
    b1.push(BatchOp::PutBucketState {
        bucket: "b".into(),
        state: BucketState {
            last_op_id: u64::MAX,
            checksum: u32::MAX,
            count: u64::MAX - 1,
        },
    });

    let mut b2 = WriteBatch::new();
    for i in (0..50i64).step_by(3) {
        b2.put_synced("tickets", format!("t{i:03}"), ticket("b", i));
    }
    for i in (0..50i64).step_by(7) {
        b2.delete_synced("tickets", format!("t{i:03}"));
    }
    b2.put_overlay("tickets", "t001", OverlayEntry::Deleted);
    b2.put_overlay("tickets", "t002", OverlayEntry::Row(ticket("z", 100)));
    b2.put_overlay("tickets", "new", OverlayEntry::Row(RowData::new()));
    b2.complete_queue(2);
    b2.append_queue(entry(9));

    // Refused: out of order.
    let mut b3 = WriteBatch::new();
    b3.put_synced("tickets", "never", ticket("a", 1)).append_queue(entry(9));
    // Refused: unknown table after valid writes.
    let mut b4 = WriteBatch::new();
    b4.delete_synced("tickets", "t003")
        .put_overlay("ghost", "x", OverlayEntry::Deleted);

    let mut b5 = WriteBatch::new();
    b5.delete_overlay("tickets", "t001").complete_queue(u64::MAX);
    b5.push(BatchOp::DeleteBucket { bucket: "b".into() });

    let (sqlite, memory) = both(&[b1, b2, b3, b4, b5]);
    for (lo, hi) in [
        (
            Bound::Included(vec![Value::from("b")]),
            Bound::Excluded(vec![Value::from("c")]),
        ),
        (Bound::Excluded(vec![Value::from("a")]), Bound::Unbounded),
        (
            Bound::Included(vec![Value::from("b"), Value::from(3)]),
            Bound::Included(vec![Value::from("b"), Value::from(20)]),
        ),
        (
            Bound::Included(vec![Value::from("c")]),
            Bound::Included(vec![Value::from("a")]),
        ),
    ] {
        let a = sqlite
            .scan_synced_index("tickets", "by_status_version", lo.clone(), hi.clone())
            .expect("scan");
        let m = memory
            .scan_synced_index("tickets", "by_status_version", lo.clone(), hi.clone())
            .expect("scan");
        assert_eq!(a, m, "{lo:?} {hi:?}");
        let a = sqlite
            .scan_visible_index("tickets", "by_status_version", lo.clone(), hi.clone())
            .expect("scan");
        let m = memory
            .scan_visible_index("tickets", "by_status_version", lo.clone(), hi.clone())
            .expect("scan");
        assert_eq!(a, m, "visible {lo:?} {hi:?}");
    }
}

#[test]
fn reads_with_limits_match_memory_store() {
    let mut b = WriteBatch::new();
    for seq in [3u64, 4, 10, 11, 12] {
        b.append_queue(entry(seq));
    }
    for (table, row_id, op_id) in [
        ("tickets", "r", 1u64),
        ("tickets", "r2", 5),
        ("notes", "r", 6),
        ("tickets", "", 20),
        ("notes", "r\u{e9}", 3),
        ("notes", "r\0x", 4),
        ("tickets", "r", 21),
    ] {
        b.push(BatchOp::PutBucketEntry {
            bucket: "x".into(),
            entry: BucketEntry {
                table: table.into(),
                row_id: row_id.into(),
                op_id,
                checksum: 1,
            },
        });
    }
    b.push(BatchOp::PutBucketState {
        bucket: "x".into(),
        state: BucketState::default(),
    });
    let (sqlite, memory) = both(&[b]);
    for (from, limit) in [
        (0, 0),
        (0, 2),
        (4, 2),
        (5, 10),
        (13, 1),
        (u64::MAX, 5),
        (i64::MAX as u64 + 1, 5),
    ] {
        assert_eq!(
            sqlite.queue_from(from, limit).expect("q"),
            memory.queue_from(from, limit).expect("q")
        );
    }
    for (after, limit) in [
        (None, 0),
        (None, 2),
        (None, usize::MAX),
        (Some(("", "")), 10),
        (Some(("notes", "r")), 2),
        (Some(("notes", "r\0")), 10),
        (Some(("notes", "zzz")), 10),
        (Some(("tickets", "")), 1),
        (Some(("tickets", "r2")), 3),
        (Some(("zzz", "")), 3),
    ] {
        assert_eq!(
            sqlite.bucket_entries("x", after, limit).expect("entries"),
            memory.bucket_entries("x", after, limit).expect("entries"),
            "{after:?} {limit}"
        );
    }
    for (table, row_id) in [
        ("tickets", "r"),
        ("notes", "r\0x"),
        ("notes", "r\0"),
        ("tickets", "nope"),
    ] {
        assert_eq!(
            sqlite.bucket_entry("x", table, row_id).expect("entry"),
            memory.bucket_entry("x", table, row_id).expect("entry")
        );
    }
    assert_eq!(sqlite.bucket_entry("y", "tickets", "r").expect("entry"), None);
}

// ----- SQLite specifics -----

#[test]
fn in_memory_store_works() {
    let s = SqliteStore::open_in_memory(test_schema()).expect("open");
    assert!(s.path().is_none());
    let mut b = WriteBatch::new();
    b.put_synced("tickets", "a", ticket("pending", 1))
        .append_queue(entry(1))
        .put_meta("k1", b"v".to_vec());
    s.apply(b).expect("apply");
    assert_eq!(s.get_synced("tickets", "a").expect("get"), Some(ticket("pending", 1)));
    assert_eq!(s.queue_len().expect("len"), 1);
    assert_eq!(s.get_meta("k1").expect("meta"), Some(b"v".to_vec()));
    let hits = s
        .scan_synced_index(
            "tickets",
            "by_version",
            Bound::Included(vec![1.into()]),
            Bound::Included(vec![1.into()]),
        )
        .expect("scan");
    assert_eq!(hits.len(), 1);
    // Two in-memory stores are independent.
    let other = SqliteStore::open_in_memory(test_schema()).expect("open");
    assert_eq!(other.get_synced("tickets", "a").expect("get"), None);
}

fn schema_with(indexes: &[(&str, &[&str])]) -> Schema {
    let mut t = Table::new("tickets")
        .column("title", ColumnType::Text)
        .column("status", ColumnType::Text)
        .column("version", ColumnType::Integer);
    for (name, cols) in indexes {
        t = t.index(*name, cols);
    }
    Schema::new([t]).expect("schema")
}

fn index_ids(s: &SqliteStore, index: &str) -> Vec<String> {
    s.scan_synced_index("tickets", index, Bound::Unbounded, Bound::Unbounded)
        .expect("scan")
        .into_iter()
        .map(|(id, _)| id)
        .collect()
}

#[test]
fn reopening_with_changed_indexes_rebuilds_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ferry.db");
    let rows = [("a", "x", 3), ("b", "z", 1), ("c", "y", 2)];
    {
        let s =
            SqliteStore::open(&path, schema_with(&[("by_title", &["title"]), ("by_x", &["status"])])).expect("open");
        let mut b = WriteBatch::new();
        for (id, title, version) in rows {
            b.put_synced(
                "tickets",
                id,
                row_data([
                    ("title", Value::from(title)),
                    ("status", Value::from(version)),
                    ("version", Value::from(version)),
                ]),
            );
        }
        s.apply(b).expect("apply");
        assert_eq!(index_ids(&s, "by_title"), ["a", "c", "b"]);
    }
    // by_title unchanged, by_x now on another column, by_version new.
    let s = SqliteStore::open(
        &path,
        schema_with(&[
            ("by_title", &["title"]),
            ("by_x", &["version"]),
            ("by_version", &["version"]),
        ]),
    )
    .expect("reopen");
    assert_eq!(index_ids(&s, "by_title"), ["a", "c", "b"]);
    assert_eq!(index_ids(&s, "by_version"), ["b", "c", "a"]);
    assert_eq!(index_ids(&s, "by_x"), ["b", "c", "a"]);
    drop(s);
    // Dropping every index, then adding one back, still gives right entries
    // (including rows written while the index did not exist).
    {
        let s = SqliteStore::open(&path, schema_with(&[])).expect("reopen");
        s.apply(
            WriteBatch::new()
                .put_synced("tickets", "d", row_data([("version", Value::from(0))]))
                .clone(),
        )
        .expect("apply");
        s.apply(WriteBatch::new().delete_synced("tickets", "a").clone())
            .expect("apply");
    }
    let s = SqliteStore::open(&path, schema_with(&[("by_version", &["version"])])).expect("reopen");
    assert_eq!(index_ids(&s, "by_version"), ["d", "b", "c"]);
    assert!(matches!(
        s.scan_synced_index("tickets", "by_title", Bound::Unbounded, Bound::Unbounded),
        Err(StoreError::UnknownIndex { .. })
    ));
}

#[test]
fn seqs_and_op_ids_above_i64_max_are_refused_cleanly() {
    let s = SqliteStore::open_in_memory(test_schema()).expect("open");
    let mut b = WriteBatch::new();
    b.put_synced("tickets", "a", ticket("pending", 1))
        .append_queue(entry(i64::MAX as u64 + 1));
    let err = s.apply(b).expect_err("too large");
    assert!(matches!(err, StoreError::InvalidInput(_)), "{err}");
    assert_eq!(
        s.get_synced("tickets", "a").expect("get"),
        None,
        "the batch rolled back"
    );

    let big = |op_id: u64| BatchOp::PutBucketEntry {
        bucket: "b".into(),
        entry: BucketEntry {
            table: "t".into(),
            row_id: "r".into(),
            op_id,
            checksum: 0,
        },
    };
    let mut b = WriteBatch::new();
    b.put_meta("k1", vec![1]).push(big(u64::MAX));
    let err = s.apply(b).expect_err("too large");
    assert!(matches!(err, StoreError::InvalidInput(_)), "{err}");
    assert_eq!(s.get_meta("k1").expect("meta"), None, "the batch rolled back");
    assert_eq!(s.bucket_entry("b", "t", "r").expect("entry"), None);

    // The largest supported values work and order correctly.
    let mut b = WriteBatch::new();
    b.append_queue(entry(1)).append_queue(entry(i64::MAX as u64));
    b.push(big(i64::MAX as u64));
    s.apply(b).expect("apply");
    let seqs: Vec<u64> = s.queue_from(0, 10).expect("q").iter().map(|e| e.seq).collect();
    assert_eq!(seqs, [1, i64::MAX as u64]);
    assert_eq!(
        s.bucket_entry("b", "t", "r").expect("entry").map(|e| e.op_id),
        Some(i64::MAX as u64)
    );
}

#[test]
fn options_are_accepted_and_data_is_durable_across_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ferry.db");
    let options = SqliteOptions {
        synchronous: Synchronous::Full,
        cache_size_kib: 1024,
        busy_timeout_ms: 100,
    };
    {
        let s = SqliteStore::open_with(&path, test_schema(), options).expect("open");
        s.apply(WriteBatch::new().put_meta("k1", b"v".to_vec()).clone())
            .expect("apply");
    }
    let s = SqliteStore::open(&path, test_schema()).expect("reopen");
    assert_eq!(s.get_meta("k1").expect("meta"), Some(b"v".to_vec()));
    assert_eq!(SqliteOptions::default().synchronous, Synchronous::Normal);
}

#[test]
fn a_held_write_lock_gives_a_retryable_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ferry.db");
    let options = SqliteOptions {
        busy_timeout_ms: 10,
        ..SqliteOptions::default()
    };
    let a = SqliteStore::open_with(&path, test_schema(), options).expect("open");
    let locker = rusqlite_connection(&path);
    locker.execute_batch("BEGIN IMMEDIATE").expect("lock");
    let err = a
        .apply(WriteBatch::new().put_meta("k1", vec![1]).clone())
        .expect_err("busy");
    assert!(matches!(err, StoreError::Backend { retryable: true, .. }), "{err}");
    locker.execute_batch("ROLLBACK").expect("unlock");
    a.apply(WriteBatch::new().put_meta("k1", vec![1]).clone())
        .expect("apply after unlock");
}

fn rusqlite_connection(path: &std::path::Path) -> rusqlite::Connection {
    rusqlite::Connection::open(path).expect("second connection")
}

#[test]
fn format_version_1_databases_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ferry.db");
    {
        let c = rusqlite_connection(&path);
        c.execute_batch(
            "CREATE TABLE ferry_bucket_ops (bucket TEXT, op_id INTEGER, PRIMARY KEY (bucket, op_id)) WITHOUT ROWID;
             INSERT INTO ferry_bucket_ops VALUES ('b', 1);
             PRAGMA user_version = 1;",
        )
        .expect("version 1 database");
    }
    let err = SqliteStore::open(&path, test_schema()).expect_err("version 1");
    assert!(matches!(err, StoreError::Backend { retryable: false, .. }), "{err}");
    assert!(err.to_string().contains("version 1"), "{err}");
    // Nothing was changed.
    let c = rusqlite_connection(&path);
    let version: i64 = c
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .expect("version");
    assert_eq!(version, 1);
    let n: i64 = c
        .query_row("SELECT count(*) FROM ferry_bucket_ops", [], |r| r.get(0))
        .expect("old table");
    assert_eq!(n, 1);
    drop(c);

    // A fresh database is created at the current version.
    let path = dir.path().join("new.db");
    drop(SqliteStore::open(&path, test_schema()).expect("open"));
    let version: i64 = rusqlite_connection(&path)
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .expect("version");
    assert_eq!(version, ferry_sqlite::FORMAT_VERSION);
    assert_eq!(version, 2);
}
