//! The ferry-store conformance suite on SQLite (which includes the
//! comparisons against `MemoryStore`), plus SQLite-specific tests (index
//! rebuilds on reopen, the in-memory variant, integer limits, options, lock
//! errors, format versions).

use std::ops::Bound;

use ferry_core::{row_data, ColumnType, CrudEntry, Schema, Table, Value};
use ferry_sqlite::{SqliteOptions, SqliteStore, Synchronous};
use ferry_store::testkit::{put_entry, test_schema, ticket, Backend};
use ferry_store::{BatchOp, BucketEntry, Store, StoreError, StoreResult, WriteBatch};

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

// ----- SQLite specifics -----

/// A queue entry with this seq.
fn entry(seq: u64) -> CrudEntry {
    put_entry(seq, seq / 2, &format!("q{seq}"))
}

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
    assert_eq!(version, 4);
}

/// A large batch grows the WAL to about its size; once it is checkpointed
/// (here by the store's helper thread) the next write cuts the file back
/// to the store's WAL size limit.
#[test]
fn the_wal_is_cut_back_to_its_limit_after_a_large_batch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ferry.db");
    let limit: u64 = 256 * 1024;
    let s = SqliteStore::open_with_wal_limit(&path, test_schema(), SqliteOptions::default(), limit).expect("open");
    let wal = dir.path().join("ferry.db-wal");
    let wal_len = || std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
    let mut big = WriteBatch::new();
    // More ops than `apply` commits in place, so its helper checkpoints.
    for i in 0..100_000u32 {
        big.put_meta(format!("k{i:06}"), vec![7u8; 16]);
    }
    s.apply(big).expect("large batch");
    assert!(
        wal_len() > 4 * limit,
        "the large batch left a WAL of {} bytes",
        wal_len()
    );
    // Each small write after the helper's checkpoint restarts the WAL,
    // and SQLite cuts the file to the limit then.
    let mut cut = false;
    for i in 0..500u32 {
        s.apply(WriteBatch::new().put_meta("small", i.to_be_bytes().to_vec()).clone())
            .expect("small write");
        if wal_len() <= limit {
            cut = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(cut, "the WAL stayed at {} bytes, over the limit of {limit}", wal_len());
}

/// A download staged batch after batch leaves the copying of the WAL
/// into the database file to the store's helper thread, but the WAL stays
/// within about its size limit plus a few batches however much is
/// staged.
#[test]
fn staging_batch_after_batch_keeps_the_wal_near_its_limit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ferry.db");
    let limit: u64 = 4 * 1024 * 1024;
    let s = SqliteStore::open_with_wal_limit(&path, test_schema(), SqliteOptions::default(), limit).expect("open");
    let (largest, grown) = stage_notes(&s, &dir.path().join("ferry.db-wal"), 100, 2_000);
    let staged_bytes: u64 = 100 * 2_000 * 200;
    assert!(staged_bytes > 8 * limit);
    assert!(
        largest <= limit + 4 * grown,
        "staging {staged_bytes} bytes grew the WAL to {largest} bytes (limit {limit}, one batch {grown})"
    );
}

/// A reader in another process holding an old snapshot keeps the WAL from
/// starting over: staging goes on (the WAL grows instead) and every op
/// is staged.
#[test]
fn staging_goes_on_while_a_reader_holds_the_wal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ferry.db");
    let s =
        SqliteStore::open_with_wal_limit(&path, test_schema(), SqliteOptions::default(), 1024 * 1024).expect("open");
    s.apply(WriteBatch::new().put_meta("k", vec![1]).clone())
        .expect("first write");
    let reader = rusqlite_connection(&path);
    reader.execute_batch("BEGIN").expect("begin");
    let n: i64 = reader
        .query_row("SELECT count(*) FROM ferry_meta", [], |r| r.get(0))
        .expect("read");
    let (largest, _) = stage_notes(&s, &dir.path().join("ferry.db-wal"), 30, 2_000);
    assert!(
        largest > 4 * 1024 * 1024,
        "the WAL could not start over, yet stayed at {largest} bytes"
    );
    // The reader still sees its snapshot, then lets go.
    let again: i64 = reader
        .query_row("SELECT count(*) FROM ferry_meta", [], |r| r.get(0))
        .expect("read again");
    assert_eq!(n, again);
    reader.execute_batch("COMMIT").expect("end");
}

/// Stage `batches` batches of `per_batch` notes of 200 bytes into bucket
/// `global`, checking they are all staged; returns the largest WAL file
/// seen and the most one batch grew it, in bytes.
fn stage_notes(s: &SqliteStore, wal: &std::path::Path, batches: u64, per_batch: u64) -> (u64, u64) {
    use ferry_store::{StagedKind, StagedOp};
    let body = "x".repeat(200);
    let (mut largest, mut grown) = (0, 0);
    for b in 0..batches {
        let before = std::fs::metadata(wal).map(|m| m.len()).unwrap_or(0);
        let mut batch = WriteBatch::new();
        for i in 0..per_batch {
            let op_id = 1 + b * per_batch + i;
            batch.push(BatchOp::PutStaged {
                bucket: "global".into(),
                op: StagedOp {
                    op_id,
                    kind: StagedKind::Put,
                    table: "notes".into(),
                    row_id: format!("n{op_id:07}"),
                    data: Some(row_data([("body", Value::from(body.as_str()))])),
                    checksum: 1,
                },
            });
        }
        s.apply(batch).expect("stage");
        let after = std::fs::metadata(wal).map(|m| m.len()).unwrap_or(0);
        largest = largest.max(after);
        grown = grown.max(after.saturating_sub(before));
    }
    assert_eq!(
        s.staged_summary("global", 0).expect("summary").count,
        batches * per_batch
    );
    (largest, grown)
}
