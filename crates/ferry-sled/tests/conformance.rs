//! The ferry-store conformance suite, run against sled (which includes the
//! comparisons against `MemoryStore`), plus sled-specific checks (index
//! rebuilds on reopen, full-range op ids, the queue length count, options,
//! the lock on a second open, concurrent writers).

use std::ops::Bound;

use ferry_core::{row_data, ColumnType, CrudEntry, CrudOp, RowData, Schema, Table, Value};
use ferry_sled::{SledOptions, SledStore};
use ferry_store::testkit::{dump, Backend};
use ferry_store::{BatchOp, BucketEntry, BucketState, MemoryStore, Store, StoreResult, WriteBatch};

/// Opens sled stores in temporary directories.
#[derive(Debug, Clone, Copy, Default)]
struct SledBackend;

impl Backend for SledBackend {
    type Location = tempfile::TempDir;
    type Store = SledStore;

    fn fresh(&self) -> Self::Location {
        tempfile::tempdir().expect("temporary directory")
    }

    fn open(&self, location: &Self::Location, schema: Schema) -> StoreResult<Self::Store> {
        SledStore::open(location.path().join("ferry.sled"), schema)
    }
}

ferry_store::conformance_tests!(SledBackend);

// ----- sled-specific checks -----

fn schema_with(indexes: &[(&str, &[&str])]) -> Schema {
    let mut t = Table::new("tickets")
        .column("status", ColumnType::Text)
        .column("version", ColumnType::Integer);
    for (name, cols) in indexes {
        t = t.index(*name, cols);
    }
    Schema::new([t, Table::new("notes").column("body", ColumnType::Text)]).expect("schema")
}

fn ticket(status: &str, version: i64) -> RowData {
    row_data([("status", Value::from(status)), ("version", Value::from(version))])
}

fn entry(seq: u64) -> CrudEntry {
    CrudEntry {
        seq,
        tx_id: seq / 2,
        op: CrudOp::Delete {
            table: "tickets".into(),
            id: format!("r{seq}"),
        },
        previous: None,
        metadata: None,
        hlc: None,
    }
}

/// Op ids and bucket counters up to `u64::MAX` round-trip (SQLite stops at
/// `i64::MAX`, so the shared comparisons stay below it).
#[test]
fn op_ids_up_to_u64_max_round_trip() {
    let s = SledStore::temporary(schema_with(&[])).expect("open");
    let top = BucketEntry {
        table: String::new(),
        row_id: String::new(),
        op_id: u64::MAX,
        checksum: 1,
    };
    let below = BucketEntry {
        table: "tickets".into(),
        row_id: "t2".into(),
        op_id: u64::MAX - 1,
        checksum: 2,
    };
    let state = BucketState {
        last_op_id: u64::MAX,
        checksum: 1,
        count: u64::MAX,
    };
    let mut b = WriteBatch::new();
    for entry in [&below, &top] {
        b.push(BatchOp::PutBucketEntry {
            bucket: "b é/1".into(),
            entry: entry.clone(),
        });
    }
    b.push(BatchOp::PutBucketState {
        bucket: "b é/1".into(),
        state,
    });
    s.apply(b).expect("apply");
    assert_eq!(s.bucket_entry("b é/1", "", "").expect("entry"), Some(top.clone()));
    assert_eq!(
        s.bucket_entries("b é/1", None, usize::MAX).expect("entries"),
        vec![top, below]
    );
    assert_eq!(s.bucket_state("b é/1").expect("state"), Some(state));
}

#[test]
fn reopening_with_an_added_index_rebuilds_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ferry.sled");
    let rows: Vec<(String, RowData)> = (0..25i64)
        .map(|i| (format!("r{i:02}"), ticket(["open", "done"][(i % 2) as usize], 25 - i)))
        .collect();
    {
        let s = SledStore::open(&path, schema_with(&[])).expect("open");
        let mut b = WriteBatch::new();
        for (id, data) in &rows {
            b.put_synced("tickets", id.clone(), data.clone());
        }
        s.apply(b).expect("apply");
    }
    let schema = schema_with(&[("by_version", &["version"]), ("by_status", &["status"])]);
    let s = SledStore::open(&path, schema.clone()).expect("reopen");
    let mem = MemoryStore::new(schema);
    let mut b = WriteBatch::new();
    for (id, data) in &rows {
        b.put_synced("tickets", id.clone(), data.clone());
    }
    mem.apply(b).expect("apply");
    assert_eq!(dump(&s), dump(&mem));
    let by_version = s
        .scan_synced_index(
            "tickets",
            "by_version",
            Bound::Unbounded,
            Bound::Excluded(vec![Value::from(3)]),
        )
        .expect("scan");
    let ids: Vec<&str> = by_version.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(ids, ["r24", "r23"]);
    drop(s);

    // Changing an index's columns rebuilds it; dropping one and adding it
    // back later starts from the rows, not from stale entries.
    let s = SledStore::open(&path, schema_with(&[("by_version", &["status"])])).expect("reopen");
    let open = s
        .scan_synced_index(
            "tickets",
            "by_version",
            Bound::Included(vec!["open".into()]),
            Bound::Included(vec!["open".into()]),
        )
        .expect("scan");
    assert_eq!(open.len(), 13);
    s.apply(WriteBatch::new().delete_synced("tickets", "r00").clone())
        .expect("apply");
    drop(s);
    let s = SledStore::open(&path, schema_with(&[("by_version", &["version"])])).expect("reopen");
    let all = s
        .scan_synced_index("tickets", "by_version", Bound::Unbounded, Bound::Unbounded)
        .expect("scan");
    assert_eq!(all.len(), 24);
    assert_eq!(all.first().map(|(id, _)| id.as_str()), Some("r24"));
}

#[test]
fn queue_len_is_counted_at_open_and_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ferry.sled");
    {
        let s = SledStore::open(&path, schema_with(&[])).expect("open");
        let mut b = WriteBatch::new();
        for seq in 1..=10 {
            b.append_queue(entry(seq));
        }
        s.apply(b).expect("apply");
        assert_eq!(s.queue_len().expect("len"), 10);
    }
    let s = SledStore::open(&path, schema_with(&[])).expect("reopen");
    assert_eq!(s.queue_len().expect("len"), 10);
    s.apply(
        WriteBatch::new()
            .complete_queue(4)
            .append_queue(entry(11))
            .complete_queue(5)
            .clone(),
    )
    .expect("apply");
    assert_eq!(s.queue_len().expect("len"), 6);
    assert_eq!(s.queue_from(0, 1).expect("queue")[0].seq, 6);
}

#[test]
fn unflushed_options_still_read_back_and_flush() {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = SledOptions {
        cache_capacity_bytes: 1 << 20,
        flush_on_apply: false,
    };
    let s = SledStore::open_with(dir.path().join("ferry.sled"), schema_with(&[]), opts).expect("open");
    assert_eq!(s.options(), opts);
    s.apply(WriteBatch::new().put_meta("k", b"v".to_vec()).clone())
        .expect("apply");
    s.flush().expect("flush");
    assert_eq!(s.get_meta("k").expect("meta"), Some(b"v".to_vec()));
}

#[test]
fn a_second_open_of_the_same_path_is_a_retryable_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ferry.sled");
    let _first = SledStore::open(&path, schema_with(&[])).expect("open");
    match SledStore::open(&path, schema_with(&[])) {
        Err(e) => assert_eq!(e.kind(), ferry_core::ErrorKind::Transient, "{e}"),
        Ok(_) => panic!("a locked database opened twice"),
    }
}

#[test]
fn concurrent_writers_keep_indexes_consistent() {
    let schema = schema_with(&[("by_sv", &["status", "version"])]);
    let store = std::sync::Arc::new(SledStore::temporary(schema).expect("open"));
    let writers: Vec<_> = (0..4i64)
        .map(|w| {
            let store = store.clone();
            std::thread::spawn(move || {
                for i in 0..50i64 {
                    let mut b = WriteBatch::new();
                    // Every writer rewrites the same few rows.
                    for r in 0..3 {
                        b.put_synced(
                            "tickets",
                            format!("r{}", (i + r) % 5),
                            ticket(["a", "b"][(w % 2) as usize], i),
                        );
                    }
                    if i % 7 == 0 {
                        b.delete_synced("tickets", format!("r{}", w));
                    }
                    store.apply(b).expect("apply");
                    // Every read sees whole batches: each indexed row is the
                    // stored row.
                    let indexed = store
                        .scan_synced_index("tickets", "by_sv", Bound::Unbounded, Bound::Unbounded)
                        .expect("scan");
                    assert!(indexed.len() <= 5, "{indexed:?}");
                }
            })
        })
        .collect();
    for w in writers {
        w.join().expect("writer");
    }
    let rows = store.scan_synced("tickets").expect("scan");
    let indexed = store
        .scan_synced_index("tickets", "by_sv", Bound::Unbounded, Bound::Unbounded)
        .expect("scan");
    let mut expected = rows.clone();
    expected.sort_by(|a, b| {
        let key = |d: &RowData| (d.get("status").cloned(), d.get("version").cloned());
        key(&a.1).cmp(&key(&b.1)).then_with(|| a.0.cmp(&b.0))
    });
    assert_eq!(indexed, expected);
}
