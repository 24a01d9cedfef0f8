//! Local writes (overlay and queue entries only) keep their overlay
//! entries in their queue rows, one page per commit; the visible state
//! must not notice: reads, reopening, other batches, failures, a second
//! store on the same file, a held write lock, many writes, and stores of
//! format version 3.

use ferry_core::CrudEntry;
use ferry_sqlite::SqliteStore;
use ferry_store::testkit::{put_entry, test_schema, ticket};
use ferry_store::{OverlayEntry, Store, StoreError, WriteBatch};

fn entry(seq: u64) -> CrudEntry {
    put_entry(seq, seq, &format!("t{seq}"))
}

/// A local write as `LocalDb` makes it: row `t<seq>` put, one queue entry.
fn local_write(seq: u64) -> WriteBatch {
    let mut b = WriteBatch::new();
    b.put_overlay(
        "tickets",
        format!("t{seq}"),
        OverlayEntry::Row(ticket("pending", seq as i64)),
    )
    .append_queue(entry(seq));
    b
}

fn overlay_ids(s: &SqliteStore) -> Vec<String> {
    s.scan_overlay("tickets")
        .expect("scan overlay")
        .into_iter()
        .map(|(id, _)| id)
        .collect()
}

fn queue_rows_with_overlay(path: &std::path::Path) -> i64 {
    rusqlite::Connection::open(path)
        .expect("connection")
        .query_row("SELECT count(*) FROM ferry_queue WHERE overlay IS NOT NULL", [], |r| {
            r.get(0)
        })
        .expect("count")
}

#[test]
fn local_writes_read_back_across_reopen_and_other_batches() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ferry.db");
    let s = SqliteStore::open(&path, test_schema()).expect("open");
    s.apply(WriteBatch::new().put_synced("tickets", "t1", ticket("done", 0)).clone())
        .expect("synced");
    for seq in 1..=3 {
        s.apply(local_write(seq)).expect("local write");
    }
    // A deletion and a write of a row another entry wrote, in one write.
    let mut b = WriteBatch::new();
    b.put_overlay("tickets", "t2", OverlayEntry::Deleted)
        .put_overlay("tickets", "t3", OverlayEntry::Row(ticket("late", 9)))
        .append_queue(entry(4))
        .append_queue(entry(5));
    s.apply(b).expect("two entries");
    assert_eq!(queue_rows_with_overlay(&path), 5, "the tail is in the queue");
    let check = |s: &SqliteStore| {
        assert_eq!(s.get_visible("tickets", "t1").expect("get"), Some(ticket("pending", 1)));
        assert_eq!(s.get_visible("tickets", "t2").expect("get"), None);
        assert_eq!(
            s.get_overlay("tickets", "t2").expect("get"),
            Some(OverlayEntry::Deleted)
        );
        assert_eq!(s.get_visible("tickets", "t3").expect("get"), Some(ticket("late", 9)));
        assert_eq!(s.get_overlay("notes", "t1").expect("get"), None);
        assert_eq!(overlay_ids(s), ["t1", "t2", "t3"]);
        assert_eq!(s.scan_overlay("notes").expect("scan"), Vec::new());
        let seqs: Vec<u64> = s.queue_from(0, 10).expect("queue").iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [1, 2, 3, 4, 5]);
    };
    check(&s);
    drop(s);
    let s = SqliteStore::open(&path, test_schema()).expect("reopen");
    check(&s);
    // Any other batch moves the tail into `ferry_overlay` first, then
    // applies its own ops over it.
    let mut b = WriteBatch::new();
    b.delete_overlay("tickets", "t1").complete_queue(2);
    s.apply(b).expect("rebase");
    assert_eq!(queue_rows_with_overlay(&path), 0);
    assert_eq!(s.get_visible("tickets", "t1").expect("get"), Some(ticket("done", 0)));
    assert_eq!(overlay_ids(&s), ["t2", "t3"]);
    s.apply(local_write(6)).expect("local write");
    drop(s);
    let s = SqliteStore::open(&path, test_schema()).expect("reopen");
    assert_eq!(overlay_ids(&s), ["t2", "t3", "t6"]);
    assert_eq!(s.queue_len().expect("len"), 4);
}

#[test]
fn a_refused_local_write_changes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ferry.db");
    let s = SqliteStore::open(&path, test_schema()).expect("open");
    s.apply(local_write(2)).expect("local write");
    let err = s.apply(local_write(1)).expect_err("seq out of order");
    assert!(matches!(err, StoreError::QueueOrder { .. }), "{err}");
    assert_eq!(overlay_ids(&s), ["t2"]);
    drop(s);
    let s = SqliteStore::open(&path, test_schema()).expect("reopen");
    assert_eq!(overlay_ids(&s), ["t2"]);
}

#[test]
fn a_write_without_overlay_entries_keeps_the_tail_whole() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ferry.db");
    let s = SqliteStore::open(&path, test_schema()).expect("open");
    s.apply(local_write(1)).expect("local write");
    // An insert-only table's write queues and keeps nothing.
    s.apply(WriteBatch::new().append_queue(entry(2)).clone())
        .expect("queue only");
    s.apply(local_write(3)).expect("local write");
    drop(s);
    let s = SqliteStore::open(&path, test_schema()).expect("reopen");
    assert_eq!(overlay_ids(&s), ["t1", "t3"]);
}

#[test]
fn another_store_on_the_file_sees_local_writes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ferry.db");
    let a = SqliteStore::open(&path, test_schema()).expect("open a");
    let b = SqliteStore::open(&path, test_schema()).expect("open b");
    a.apply(local_write(1)).expect("write a");
    assert_eq!(overlay_ids(&b), ["t1"]);
    assert_eq!(b.get_visible("tickets", "t1").expect("get"), Some(ticket("pending", 1)));
    b.apply(local_write(2)).expect("write b");
    assert_eq!(overlay_ids(&a), ["t1", "t2"]);
    a.apply(WriteBatch::new().delete_overlay("tickets", "t2").clone())
        .expect("rebase a");
    assert_eq!(overlay_ids(&b), ["t1"]);
    b.apply(local_write(3)).expect("write b");
    assert_eq!(overlay_ids(&a), ["t1", "t3"]);
    // Each knows the queue's end after its own writes, and learns of the
    // other's: a seq the other used is refused.
    a.apply(local_write(4)).expect("write a");
    let err = b.apply(local_write(4)).expect_err("seq taken by a");
    assert!(matches!(err, StoreError::QueueOrder { seq: 4, last: 4 }), "{err}");
    b.apply(local_write(5)).expect("write b");
    assert_eq!(overlay_ids(&a), ["t1", "t3", "t4", "t5"]);
}

#[test]
fn many_local_writes_stay_visible() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ferry.db");
    let s = SqliteStore::open(&path, test_schema()).expect("open");
    let n = 1_300;
    for seq in 1..=n {
        s.apply(local_write(seq)).expect("local write");
    }
    // The tail was moved to `ferry_overlay` on the way.
    assert!(queue_rows_with_overlay(&path) < n as i64);
    let check = |s: &SqliteStore| {
        assert_eq!(overlay_ids(s).len(), n as usize);
        for seq in [1, 511, 512, 513, 1_024, n] {
            let want = Some(ticket("pending", seq as i64));
            assert_eq!(s.get_visible("tickets", &format!("t{seq}")).expect("get"), want);
        }
    };
    check(&s);
    drop(s);
    check(&SqliteStore::open(&path, test_schema()).expect("reopen"));
}

#[test]
fn many_local_writes_of_one_row_keep_the_tail_short() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ferry.db");
    let s = SqliteStore::open(&path, test_schema()).expect("open");
    let n = 1_300;
    for seq in 1..=n {
        let mut b = WriteBatch::new();
        b.put_overlay("tickets", "t", OverlayEntry::Row(ticket("pending", seq as i64)))
            .append_queue(entry(seq));
        s.apply(b).expect("local write");
    }
    // One entry, but the queue rows carrying it are bounded too.
    assert!(queue_rows_with_overlay(&path) <= 512);
    assert_eq!(
        s.get_visible("tickets", "t").expect("get"),
        Some(ticket("pending", n as i64))
    );
    drop(s);
    let s = SqliteStore::open(&path, test_schema()).expect("reopen");
    assert_eq!(
        s.get_visible("tickets", "t").expect("get"),
        Some(ticket("pending", n as i64))
    );
    assert_eq!(s.queue_len().expect("len"), n);
}

#[test]
fn a_version_3_store_with_pending_writes_opens() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ferry.db");
    drop(SqliteStore::open(&path, test_schema()).expect("open"));
    {
        // As version 3 kept a pending write: its overlay in
        // `ferry_overlay`, its queue row without an overlay column.
        let c = rusqlite::Connection::open(&path).expect("connection");
        c.execute_batch(
            "ALTER TABLE ferry_queue DROP COLUMN overlay;
             PRAGMA user_version = 3;",
        )
        .expect("downgrade");
        c.execute(
            "INSERT INTO ferry_overlay (tbl, id, data) VALUES ('tickets', 't1', ?1)",
            [ferry_core::codec::encode_row(&ticket("pending", 1))],
        )
        .expect("old overlay");
        c.execute(
            "INSERT INTO ferry_queue (seq, entry) VALUES (1, ?1)",
            [ferry_core::codec::encode_entry(&entry(1))],
        )
        .expect("old queue row");
    }
    let s = SqliteStore::open(&path, test_schema()).expect("migrate");
    assert_eq!(overlay_ids(&s), ["t1"]);
    assert_eq!(s.queue_from(0, 10).expect("queue"), vec![entry(1)]);
    s.apply(local_write(2)).expect("local write");
    drop(s);
    let s = SqliteStore::open(&path, test_schema()).expect("reopen");
    assert_eq!(overlay_ids(&s), ["t1", "t2"]);
    assert_eq!(s.queue_len().expect("len"), 2);
    let version: i64 = rusqlite::Connection::open(&path)
        .expect("connection")
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .expect("version");
    assert_eq!(version, ferry_sqlite::FORMAT_VERSION);
}

#[test]
fn a_local_write_waits_for_a_held_write_lock_then_fails_retryably() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ferry.db");
    let options = ferry_sqlite::SqliteOptions {
        busy_timeout_ms: 10,
        ..ferry_sqlite::SqliteOptions::default()
    };
    let s = SqliteStore::open_with(&path, test_schema(), options).expect("open");
    s.apply(local_write(1)).expect("local write");
    let locker = rusqlite::Connection::open(&path).expect("connection");
    locker.execute_batch("BEGIN IMMEDIATE").expect("lock");
    let err = s.apply(local_write(2)).expect_err("busy");
    assert!(matches!(err, StoreError::Backend { retryable: true, .. }), "{err}");
    locker.execute_batch("ROLLBACK").expect("unlock");
    s.apply(local_write(2)).expect("local write after unlock");
    assert_eq!(overlay_ids(&s), ["t1", "t2"]);
    assert_eq!(s.queue_len().expect("len"), 2);
}
