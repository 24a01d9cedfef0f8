//! The ferry-store conformance suite, run against sled, plus sled-specific
//! checks against the reference `MemoryStore`.

use std::ops::Bound;

use ferry_core::{row_data, ColumnType, CrudEntry, CrudOp, RowData, Schema, Table, Value};
use ferry_sled::{SledOptions, SledStore};
use ferry_store::testkit::Backend;
use ferry_store::{BatchOp, BucketEntry, BucketState, MemoryStore, OverlayEntry, Store, StoreResult, WriteBatch};

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

// ----- sled-specific checks, compared with MemoryStore -----

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

/// Everything readable from a store, as text.
fn dump(s: &dyn Store) -> String {
    let mut out = String::new();
    for t in ["tickets", "notes"] {
        out += &format!("{t} synced {:?}\n", s.scan_synced(t).expect("scan"));
        out += &format!("{t} overlay {:?}\n", s.scan_overlay(t).expect("scan"));
        out += &format!("{t} visible {:?}\n", s.scan_visible(t).expect("scan"));
    }
    for index in s.schema().table("tickets").expect("tickets").indexes.iter() {
        let rows = s
            .scan_synced_index("tickets", &index.name, Bound::Unbounded, Bound::Unbounded)
            .expect("index scan");
        out += &format!("index {} {:?}\n", index.name, rows);
    }
    out += &format!(
        "queue {} {:?}\n",
        s.queue_len().expect("len"),
        s.queue_from(0, usize::MAX).expect("queue")
    );
    for (name, state) in s.buckets().expect("buckets") {
        out += &format!(
            "bucket {name} {state:?} {:?}\n",
            s.bucket_entries(&name, None, usize::MAX).expect("entries")
        );
    }
    for k in ["", "k", "k\0x"] {
        out += &format!("meta {k:?} {:?}\n", s.get_meta(k).expect("meta"));
    }
    out
}

fn apply_both(sled: &SledStore, mem: &MemoryStore, batch: WriteBatch) {
    let a = sled.apply(batch.clone());
    let b = mem.apply(batch);
    assert_eq!(a.is_ok(), b.is_ok(), "sled {a:?} vs memory {b:?}");
    assert_eq!(dump(sled), dump(mem));
}

#[test]
fn matches_memory_store_on_mixed_batches() {
    let schema = schema_with(&[("by_status", &["status"]), ("by_sv", &["status", "version"])]);
    let sled = SledStore::temporary(schema.clone()).expect("open");
    let mem = MemoryStore::new(schema);

    let mut b = WriteBatch::new();
    for i in 0..10 {
        b.put_synced("tickets", format!("t{i}"), ticket(["a", "b"][i % 2], i as i64));
    }
    b.put_synced("tickets", "t3", ticket("c", 30));
    b.delete_synced("tickets", "t3");
    b.put_synced("tickets", "t3", ticket("d", 31));
    b.put_synced("notes", "n\0with nul", row_data([("body", Value::from("x"))]));
    b.append_queue(entry(1)).append_queue(entry(2)).append_queue(entry(3));
    b.complete_queue(2);
    b.append_queue(entry(4));
    b.put_meta("", vec![]).put_meta("k\0x", vec![7]);
    apply_both(&sled, &mem, b);

    let mut b = WriteBatch::new();
    b.put_overlay("tickets", "t1", OverlayEntry::Deleted);
    b.put_overlay("tickets", "zz", OverlayEntry::Row(RowData::new()));
    b.delete_synced("tickets", "t0");
    b.push(BatchOp::PutBucketEntry {
        bucket: "b é/1".into(),
        entry: BucketEntry {
            table: String::new(),
            row_id: String::new(),
            op_id: u64::MAX,
            checksum: 1,
        },
    });
    b.push(BatchOp::PutBucketState {
        bucket: "b é/1".into(),
        state: BucketState {
            last_op_id: u64::MAX,
            checksum: 1,
            count: 1,
        },
    });
    for (table, row_id, op_id) in [("tickets", "t2", 0), ("notes", "n\0with nul", 3), ("tickets", "t1", 5)] {
        b.push(BatchOp::PutBucketEntry {
            bucket: "b".into(),
            entry: BucketEntry {
                table: table.into(),
                row_id: row_id.into(),
                op_id,
                checksum: 2,
            },
        });
    }
    // Replaced later in the same batch.
    b.push(BatchOp::PutBucketEntry {
        bucket: "b".into(),
        entry: BucketEntry {
            table: "tickets".into(),
            row_id: "t1".into(),
            op_id: 6,
            checksum: 7,
        },
    });
    // Also in "b é/1", and in a bucket whose name extends "b".
    for bucket in ["b é/1", "b/x"] {
        b.push(BatchOp::PutBucketEntry {
            bucket: bucket.into(),
            entry: BucketEntry {
                table: "tickets".into(),
                row_id: "t2".into(),
                op_id: 1,
                checksum: 1,
            },
        });
    }
    b.push(BatchOp::PutBucketState {
        bucket: "b/x".into(),
        state: BucketState::default(),
    });
    b.complete_queue(u64::MAX);
    apply_both(&sled, &mem, b);
    // "b" has entries but no state, so dump does not show it: compare reads.
    for (after, limit) in [
        (None, usize::MAX),
        (None, 0),
        (None, 1),
        (Some(("", "")), 10),
        (Some(("notes", "n")), 10),
        (Some(("notes", "n\0with nul")), 10),
        (Some(("tickets", "t1")), 10),
        (Some(("tickets", "t2")), 10),
        (Some(("tickets\u{e9}", "")), 10),
    ] {
        for bucket in ["b", "b é/1", "b/x", "none"] {
            assert_eq!(
                sled.bucket_entries(bucket, after, limit).expect("sled"),
                mem.bucket_entries(bucket, after, limit).expect("memory"),
                "{bucket} {after:?} {limit}"
            );
        }
    }
    for (table, row_id) in [("tickets", "t1"), ("notes", "n\0with nul"), ("notes", "n"), ("", "")] {
        for bucket in ["b", "b é/1"] {
            assert_eq!(
                sled.bucket_entry(bucket, table, row_id).expect("sled"),
                mem.bucket_entry(bucket, table, row_id).expect("memory")
            );
        }
    }
    assert_eq!(sled.bucket_entries("b", None, usize::MAX).expect("entries").len(), 3);
    assert!(sled
        .bucket_entries("b é/1", Some(("tickets", "t2")), 10)
        .expect("entries")
        .is_empty());

    // A failing batch (unknown table at the end) changes nothing.
    let mut b = WriteBatch::new();
    b.put_synced("tickets", "t5", ticket("zzz", 0))
        .put_synced("ghost", "x", RowData::new());
    apply_both(&sled, &mem, b);

    let mut b = WriteBatch::new();
    b.push(BatchOp::DeleteBucket {
        bucket: "b é/1".into()
    });
    b.push(BatchOp::DeleteBucket { bucket: "b".into() });
    b.push(BatchOp::DeleteMeta { key: "".into() });
    apply_both(&sled, &mem, b);
    assert!(sled.bucket_entries("b", None, usize::MAX).expect("entries").is_empty());
    assert_eq!(sled.bucket_entries("b/x", None, usize::MAX).expect("entries").len(), 1);
}

#[test]
fn index_ranges_match_memory_store() {
    let schema = schema_with(&[("by_sv", &["status", "version"])]);
    let sled = SledStore::temporary(schema.clone()).expect("open");
    let mem = MemoryStore::new(schema);
    let mut b = WriteBatch::new();
    for i in 0..40i64 {
        b.put_synced(
            "tickets",
            format!("r{i:02}"),
            ticket(["x", "y", "x\0y", ""][(i % 4) as usize], i % 7 - 3),
        );
    }
    b.put_synced("tickets", "nulls", RowData::new());
    apply_both(&sled, &mem, b);
    let vals = [
        vec![],
        vec![Value::Null],
        vec![Value::from("x")],
        vec![Value::from("x\0y")],
        vec![Value::from("x"), Value::from(0)],
        vec![Value::from("y"), Value::from(-3)],
    ];
    let bounds = |v: &Vec<Value>| [Bound::Unbounded, Bound::Included(v.clone()), Bound::Excluded(v.clone())];
    for lv in &vals {
        for hv in &vals {
            for lo in bounds(lv) {
                for hi in bounds(hv) {
                    let a = sled
                        .scan_synced_index("tickets", "by_sv", lo.clone(), hi.clone())
                        .expect("sled");
                    let b = mem
                        .scan_synced_index("tickets", "by_sv", lo.clone(), hi.clone())
                        .expect("memory");
                    assert_eq!(a, b, "{lo:?} {hi:?}");
                }
            }
        }
    }
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
