//! A checkpoint's typed changes (`ServerChanges`) and the staging area as
//! a client drives them, on every backend: staged ops written through
//! `StagingArea`, switched in by `apply_server_changes` with pending
//! writes rebased on them and observers told of every row.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;

use common::{open, BACKENDS};
use ferry_core::{row_data, RowData, Value};
use ferry_queue::{ChangeSource, LocalDb, RowChange, ServerChanges, StagedSwitch, StagingBatch};
use ferry_store::{BucketEntry, BucketState, StagedKind, StagedOp};
use parking_lot::Mutex;

fn title(t: &str) -> RowData {
    row_data([("title", Value::from(t)), ("status", Value::from("pending"))])
}

fn staged_put(op_id: u64, id: &str, t: &str) -> StagedOp {
    StagedOp {
        op_id,
        kind: StagedKind::Put,
        table: "tickets".into(),
        row_id: id.into(),
        data: Some(title(t)),
        checksum: op_id as u32,
    }
}

fn each_backend(test: impl Fn(&str, LocalDb)) {
    for backend in BACKENDS {
        let dir = tempfile::tempdir().expect("tempdir");
        test(backend, LocalDb::open(open(backend, dir.path())).expect("open"));
    }
}

#[test]
fn staged_ops_switch_in_under_pending_writes() {
    each_backend(|backend, db| {
        db.write(|tx| tx.insert("tickets", "t1", title("mine"))).expect("write");
        let staging = db.staging_area();
        let mut writes = StagingBatch::new();
        writes
            .stage("global", staged_put(1, "t1", "server"))
            .stage("global", staged_put(2, "t2", "two"))
            .keep_resetting(&BTreeSet::from(["other".to_owned()]));
        assert_eq!(writes.len(), 3);
        staging.apply(writes).expect("stage");
        assert_eq!(staging.staged_buckets().expect("buckets"), ["global"], "{backend}");
        let summary = staging.staged_summary("global", 0).expect("summary");
        assert_eq!((summary.last_op_id, summary.count), (2, 2), "{backend}");
        assert_eq!(
            staging.resetting().expect("resetting"),
            BTreeSet::from(["other".to_owned()])
        );
        // Staged ops are invisible until switched in.
        assert_eq!(db.get("tickets", "t2").expect("get"), None, "{backend}");

        let seen: Arc<Mutex<Vec<RowChange>>> = Arc::default();
        let sink = seen.clone();
        db.set_observer(Some(Arc::new(move |source, rows: &[RowChange]| {
            assert_eq!(source, ChangeSource::Server);
            sink.lock().extend(rows.iter().cloned());
        })));
        let mut changes = ServerChanges::new();
        changes
            .set_bucket_state(
                "global",
                BucketState {
                    last_op_id: 2,
                    checksum: 3,
                    count: 2,
                },
            )
            .switch_in(StagedSwitch {
                bucket: "global".into(),
                from_op_id: 1,
                through_op_id: 2,
            })
            .keep_resetting(&BTreeSet::new());
        assert_eq!(changes.switches().len(), 1);
        assert_eq!(changes.rows().count(), 0, "switched rows are not listed");
        db.apply_server_changes(changes, None).expect("checkpoint");

        // The pending insert replays over the switched-in row.
        assert_eq!(db.get("tickets", "t1").expect("get"), Some(title("mine")), "{backend}");
        assert_eq!(
            db.store().get_synced("tickets", "t1").expect("synced"),
            Some(title("server")),
            "{backend}"
        );
        assert_eq!(db.get("tickets", "t2").expect("get"), Some(title("two")), "{backend}");
        assert_eq!(db.bucket_entries("global", None, 10).expect("entries").len(), 2);
        assert!(db.bucket_entry("global", "tickets", "t2").expect("entry").is_some());
        assert_eq!(db.buckets().expect("buckets").len(), 1, "{backend}");
        assert!(staging.resetting().expect("resetting").is_empty(), "{backend}");
        let seen: Vec<(String, Option<RowData>, bool)> = seen
            .lock()
            .iter()
            .map(|c| (c.id.clone(), c.row.clone(), c.pending))
            .collect();
        assert_eq!(
            seen,
            [
                ("t1".to_owned(), Some(title("mine")), true),
                ("t2".to_owned(), Some(title("two")), false)
            ],
            "{backend}"
        );

        let mut writes = StagingBatch::new();
        writes.delete_through("global", 2);
        staging.apply(writes).expect("drop switched");
        assert!(staging.staged_buckets().expect("buckets").is_empty(), "{backend}");
    });
}

#[test]
fn rows_and_buckets_apply_in_order_with_the_confirmation() {
    each_backend(|backend, db| {
        db.write(|tx| tx.insert("tickets", "t1", title("mine"))).expect("write");
        db.complete(1).expect("complete");
        let entry = |id: &str, op_id: u64| BucketEntry {
            table: "tickets".into(),
            row_id: id.into(),
            op_id,
            checksum: op_id as u32,
        };
        let mut changes = ServerChanges::with_capacity(8);
        changes
            .put_row("tickets", "t1", title("mine"))
            .put_bucket_entry("a", entry("t1", 1))
            .put_row("tickets", "t2", title("two"))
            .put_bucket_entry("b", entry("t2", 2))
            .set_bucket_state(
                "a",
                BucketState {
                    last_op_id: 1,
                    checksum: 1,
                    count: 1,
                },
            )
            .set_bucket_state(
                "b",
                BucketState {
                    last_op_id: 2,
                    checksum: 2,
                    count: 1,
                },
            );
        assert_eq!(
            changes.rows().collect::<Vec<_>>(),
            [("tickets", "t1"), ("tickets", "t2")]
        );
        db.apply_server_changes(changes, Some(1)).expect("checkpoint");
        assert_eq!(
            db.pending_len().expect("pending"),
            0,
            "{backend}: confirmed with the changes"
        );
        assert!(db.pending_ids("tickets").expect("pending ids").is_empty(), "{backend}");
        assert_eq!(db.scan("tickets").expect("scan").len(), 2, "{backend}");

        // Bucket b goes, and with it the row only it held.
        let mut changes = ServerChanges::new();
        changes
            .delete_bucket_entry("a", "tickets", "t1")
            .delete_bucket("b")
            .delete_row("tickets", "t2");
        assert!(!changes.is_empty());
        db.apply_server_changes(changes, None).expect("checkpoint");
        assert_eq!(db.get("tickets", "t2").expect("get"), None, "{backend}");
        assert_eq!(db.bucket_state("b").expect("state"), None, "{backend}");
        assert!(db.bucket_entries("a", None, 10).expect("entries").is_empty());
        assert_eq!(db.get("tickets", "t1").expect("get"), Some(title("mine")), "{backend}");
    });
}

/// A write checkpoint beyond the last queued seq (a store restored from an
/// older copy, the server having answered the device's later writes):
/// the checkpoint applies, the next writes take seqs after the server's,
/// and a reopened store keeps counting from there.
#[test]
fn a_write_checkpoint_beyond_the_queue_moves_the_next_seq_past_it() {
    for backend in BACKENDS {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = LocalDb::open(open(backend, dir.path())).expect("open");
        db.write(|tx| tx.insert("tickets", "t1", title("mine"))).expect("write");
        let mut changes = ServerChanges::new();
        changes.put_row("tickets", "t9", title("from the server"));
        db.apply_server_changes(changes, Some(7))
            .expect("checkpoint beyond the queue");
        assert_eq!(
            db.get("tickets", "t9").expect("get"),
            Some(title("from the server")),
            "{backend}"
        );
        let (_, receipt) = db
            .write_with_receipt(|tx| tx.insert("tickets", "t2", title("next")))
            .expect("write");
        assert_eq!(receipt.map(|r| r.first_seq), Some(8), "{backend}");
        // The pending entries are still uploaded (the server answers seq 1
        // from its stored outcome).
        let seqs: Vec<u64> = db.next_batch(10).expect("batch").iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [1, 8], "{backend}");
        drop(db);
        let db = LocalDb::open(open(backend, dir.path())).expect("reopen");
        let (_, receipt) = db
            .write_with_receipt(|tx| tx.insert("tickets", "t3", title("after reopen")))
            .expect("write");
        assert_eq!(receipt.map(|r| r.first_seq), Some(9), "{backend}");
        // A seq nothing can follow is refused and changes nothing.
        let mut changes = ServerChanges::new();
        changes.put_row("tickets", "t10", title("never"));
        assert!(db.apply_server_changes(changes, Some(u64::MAX)).is_err(), "{backend}");
        assert_eq!(db.get("tickets", "t10").expect("get"), None, "{backend}");
    }
}
