//! Staged rows kept in the synced rows' layout (`ferry_staged_rows`): a
//! first sync switches in by renaming that table, and whatever the
//! staging area went through first (rows staged twice with other bytes,
//! ops dropped or replaced, an older store's inline ops) the result is
//! exactly the memory store's.

use ferry_core::{row_data, Value};
use ferry_sqlite::SqliteStore;
use ferry_store::testkit::test_schema;
use ferry_store::{BatchOp, BucketState, MemoryStore, StagedKind, StagedOp, Store, WriteBatch};

fn note(body: &str) -> ferry_core::RowData {
    row_data([("body", Value::from(body))])
}

fn put(op_id: u64, id: &str, body: &str) -> StagedOp {
    StagedOp {
        op_id,
        kind: StagedKind::Put,
        table: "notes".into(),
        row_id: id.into(),
        data: Some(note(body)),
        checksum: op_id as u32,
    }
}

fn stage(bucket: &str, ops: impl IntoIterator<Item = StagedOp>) -> WriteBatch {
    let mut b = WriteBatch::new();
    for op in ops {
        b.push(BatchOp::PutStaged {
            bucket: bucket.into(),
            op,
        });
    }
    b
}

fn delete(bucket: &str, through_op_id: u64) -> WriteBatch {
    let mut b = WriteBatch::new();
    b.push(BatchOp::DeleteStaged {
        bucket: bucket.into(),
        through_op_id,
    });
    b
}

/// A checkpoint's switch-in: bucket states, then each bucket's range.
fn switch(ranges: &[(&str, u64, u64)]) -> WriteBatch {
    let mut b = WriteBatch::new();
    for (bucket, _, through) in ranges {
        b.push(BatchOp::PutBucketState {
            bucket: (*bucket).into(),
            state: BucketState {
                last_op_id: *through,
                checksum: 0,
                count: 0,
            },
        });
    }
    for (bucket, from, through) in ranges {
        b.push(BatchOp::SwitchInStaged {
            bucket: (*bucket).into(),
            from_op_id: *from,
            through_op_id: *through,
        });
    }
    b
}

/// A bucket's entries: (table, row id, op id, checksum) each.
type Entries = Vec<(String, Vec<(String, String, u64, u32)>)>;

/// Everything a reader sees of the synced layer and bucket entries.
fn state(s: &dyn Store) -> (Vec<(String, ferry_core::RowData)>, Entries) {
    let rows = s.scan_synced("notes").expect("scan");
    let mut entries = Vec::new();
    for (bucket, _) in s.buckets().expect("buckets") {
        let e = s.bucket_entries(&bucket, None, usize::MAX).expect("entries");
        entries.push((
            bucket,
            e.into_iter()
                .map(|e| (e.table, e.row_id, e.op_id, e.checksum))
                .collect(),
        ));
    }
    (rows, entries)
}

/// Apply `batches` to a fresh SQLite store and a memory store; both end
/// equal. Returns the SQLite store and its directory.
fn both(batches: &[WriteBatch]) -> (SqliteStore, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = SqliteStore::open(dir.path().join("ferry.db"), test_schema()).expect("open");
    let m = MemoryStore::new(test_schema());
    for b in batches {
        s.apply(b.clone()).expect("sqlite apply");
        m.apply(b.clone()).expect("memory apply");
    }
    assert_eq!(state(&s), state(&m));
    (s, dir)
}

fn side_rows(dir: &tempfile::TempDir) -> i64 {
    let c = rusqlite::Connection::open(dir.path().join("ferry.db")).expect("second connection");
    c.query_row("SELECT count(*) FROM ferry_staged_rows", [], |r| r.get(0))
        .expect("count")
}

fn staged_count(dir: &tempfile::TempDir) -> i64 {
    let c = rusqlite::Connection::open(dir.path().join("ferry.db")).expect("second connection");
    c.query_row("SELECT count(*) FROM ferry_staged", [], |r| r.get(0))
        .expect("count")
}

#[test]
fn a_first_sync_over_two_buckets_switches_in_by_rename() {
    let a = stage(
        "a",
        (1..=300).map(|i| put(i, &format!("n{i:04}"), &format!("body {i}"))),
    );
    // Bucket b holds some of a's rows (the same bytes) and its own.
    let b = stage(
        "b",
        (1..=50)
            .map(|i| put(i, &format!("n{i:04}"), &format!("body {i}")))
            .chain((51..=80).map(|i| put(i, &format!("b{i:04}"), "b's own"))),
    );
    let (s, dir) = both(&[a, b, switch(&[("a", 1, 300), ("b", 1, 80)])]);
    assert_eq!(s.scan_synced("notes").expect("scan").len(), 330);
    assert_eq!(side_rows(&dir), 0, "the side table was renamed in");
    // The staged ops stay, with their rows, until deleted.
    assert_eq!(staged_count(&dir), 380);
    let ops = s.staged_ops("b", 0, usize::MAX).expect("ops");
    assert_eq!(ops.len(), 80);
    assert_eq!(ops[0].data, Some(note("body 1")));
    assert_eq!(ops[79].data, Some(note("b's own")));
    // Ops staged after the rename, before the old ones are deleted, keep
    // their own rows apart from the old ones'.
    s.apply(stage("a", [put(400, "n0002", "staged after")]))
        .expect("stage after rename");
    let old = s.staged_ops("a", 0, 2).expect("ops");
    assert_eq!(old[1].data, Some(note("body 2")));
    let new = s.staged_ops("a", 300, usize::MAX).expect("ops");
    assert_eq!(new[0].data, Some(note("staged after")));
    s.apply(delete("a", 400)).expect("delete a");
    s.apply(delete("b", 80)).expect("delete b");
    assert!(s.staged_buckets().expect("staged").is_empty());
    // The store goes on as usual: another download staged and switched in
    // over the rows now there, synced writes, a reopen.
    s.apply(stage("a", [put(301, "n0001", "changed"), put(302, "n0999", "new")]))
        .expect("stage again");
    s.apply(switch(&[("a", 301, 302)])).expect("switch in again");
    s.apply(WriteBatch::new().put_synced("notes", "direct", note("direct")).clone())
        .expect("synced write");
    drop(s);
    let s = SqliteStore::open(dir.path().join("ferry.db"), test_schema()).expect("reopen");
    assert_eq!(s.get_synced("notes", "n0001").expect("get"), Some(note("changed")));
    assert_eq!(s.get_synced("notes", "n0999").expect("get"), Some(note("new")));
    assert_eq!(s.get_synced("notes", "direct").expect("get"), Some(note("direct")));
    assert_eq!(s.scan_synced("notes").expect("scan").len(), 332);
}

#[test]
fn a_row_staged_with_other_bytes_applies_as_the_memory_store_does() {
    // The same row in two buckets with other bytes, and twice in one
    // bucket: the later staging keeps its row inline.
    let a = stage("a", [put(1, "x", "a1"), put(2, "y", "a2"), put(3, "x", "a3")]);
    let b = stage("b", [put(1, "x", "b1"), put(2, "z", "b2")]);
    let (s, _dir) = both(&[a.clone(), b.clone(), switch(&[("a", 1, 3), ("b", 1, 2)])]);
    assert_eq!(s.get_synced("notes", "x").expect("get"), Some(note("b1")));
    let (s, _dir) = both(&[a, b, switch(&[("b", 1, 2), ("a", 1, 3)])]);
    assert_eq!(s.get_synced("notes", "x").expect("get"), Some(note("a3")));
    // Staged ops read back with their own rows.
    let ops = s.staged_ops("a", 0, usize::MAX).expect("ops");
    let bodies: Vec<_> = ops.iter().map(|o| o.data.clone()).collect();
    assert_eq!(bodies, vec![Some(note("a1")), Some(note("a2")), Some(note("a3"))]);
}

#[test]
fn rows_of_dropped_or_replaced_ops_never_reach_the_synced_rows() {
    // Dropping part of a bucket's ops while another bucket is staged
    // leaves their rows behind in the side table: they must not be
    // renamed in.
    let (s, _dir) = both(&[
        stage("a", (1..=10).map(|i| put(i, &format!("a{i}"), "a"))),
        stage("b", [put(1, "b1", "b")]),
        delete("a", 5),
        switch(&[("a", 6, 10), ("b", 1, 1)]),
    ]);
    assert_eq!(s.get_synced("notes", "a1").expect("get"), None);
    assert_eq!(s.scan_synced("notes").expect("scan").len(), 6);
    // An op staged again under its op id with another row.
    let (s, _dir) = both(&[
        stage("a", [put(1, "old", "o"), put(2, "kept", "k")]),
        stage("a", [put(1, "new", "n")]),
        switch(&[("a", 1, 2)]),
    ]);
    assert_eq!(s.get_synced("notes", "old").expect("get"), None);
    assert_eq!(s.get_synced("notes", "new").expect("get"), Some(note("n")));
    // Metadata after the switch-ins leaves them free to rename; a synced
    // write after them, or a switch-in of part of what is staged, makes
    // them go the usual way.
    let mut meta_after = switch(&[("a", 1, 2)]);
    meta_after.put_meta("after", vec![1]);
    let (s, dir) = both(&[stage("a", [put(1, "p", "p"), put(2, "q", "q")]), meta_after]);
    assert_eq!(s.scan_synced("notes").expect("scan").len(), 2);
    assert_eq!(side_rows(&dir), 0, "renamed");
    let mut row_after = switch(&[("a", 1, 2)]);
    row_after.put_synced("notes", "z", note("z"));
    let (s, dir) = both(&[stage("a", [put(1, "p", "p"), put(2, "q", "q")]), row_after]);
    assert_eq!(s.scan_synced("notes").expect("scan").len(), 3);
    assert_eq!(side_rows(&dir), 2, "not renamed");
    let (s, dir) = both(&[
        stage("a", [put(1, "p", "p"), put(2, "q", "q"), put(3, "r", "r")]),
        switch(&[("a", 1, 2)]),
    ]);
    assert_eq!(s.get_synced("notes", "r").expect("get"), None);
    assert_eq!(side_rows(&dir), 3, "not renamed");
}

#[test]
fn a_version_2_store_with_staged_ops_is_migrated() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ferry.db");
    drop(SqliteStore::open(&path, test_schema()).expect("open"));
    {
        // As version 2 kept it: rows inline, no side tables.
        let c = rusqlite::Connection::open(&path).expect("connection");
        c.execute_batch(
            "ALTER TABLE ferry_staged DROP COLUMN side;
             DROP TABLE ferry_staged_rows;
             DROP TABLE ferry_staged_state;
             PRAGMA user_version = 2;",
        )
        .expect("downgrade");
        let data = ferry_core::codec::encode_row(&note("old"));
        c.execute(
            "INSERT INTO ferry_staged (bucket, op_id, kind, tbl, row_id, data, checksum) \
             VALUES ('a', 1, 0, 'notes', 'n1', ?1, 1)",
            [data],
        )
        .expect("old staged op");
    }
    let s = SqliteStore::open(&path, test_schema()).expect("migrate");
    let ops = s.staged_ops("a", 0, usize::MAX).expect("ops");
    assert_eq!(ops.len(), 1);
    assert_eq!(ops[0].data, Some(note("old")));
    s.apply(stage("a", [put(2, "n2", "new")])).expect("stage");
    s.apply(switch(&[("a", 1, 2)])).expect("switch in");
    assert_eq!(s.get_synced("notes", "n1").expect("get"), Some(note("old")));
    assert_eq!(s.get_synced("notes", "n2").expect("get"), Some(note("new")));
    let version: i64 = rusqlite::Connection::open(&path)
        .expect("connection")
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .expect("version");
    assert_eq!(version, ferry_sqlite::FORMAT_VERSION);
}
