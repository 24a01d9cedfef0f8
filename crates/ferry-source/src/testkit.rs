//! The conformance suite every [`SourceDb`] backend runs (feature
//! `testkit`), like `ferry_store::conformance_tests!` for client stores.
//!
//! A backend implements [`SourceBackend`] (how to make a fresh location
//! and open a database there) and calls
//! [`source_conformance_tests!`](crate::source_conformance_tests) in an
//! integration test; that expands to one `#[test]` per behaviour of the
//! trait's contract, each calling the public function of the same name
//! here. The concurrency behaviours run several writer threads against
//! one database.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use ferry_core::{ColumnType, HlcTimestamp, RowData, Schema, Table, Value};
use ferry_protocol::{op_checksum, DataLineWriter, OpKind, OplogEntry, Outcome};

use crate::{
    BucketState, ClientProgress, NewOp, OpRange, Result, RowClocks, RowWrite, SourceDb, SourceError, SourceTx,
    StoredRow,
};

/// How the suite makes and reopens databases of one backend.
pub trait SourceBackend: Sync {
    /// Where a database lives (a temporary directory, a schema name). The
    /// data lives as long as the location.
    type Location: Send + Sync;
    /// A new, empty location.
    fn fresh(&self) -> Self::Location;
    /// Open (or reopen) the database at a location. The suite migrates it
    /// to [`test_schema`] itself.
    fn open(&self, location: &Self::Location) -> Result<Arc<dyn SourceDb>>;
}

/// Expand to one `#[test]` per `SourceDb` conformance behaviour for a
/// backend value.
#[macro_export]
macro_rules! source_conformance_tests {
    ($backend:expr) => {
        $crate::source_conformance_tests!(@each $backend;
            write_commits_whole,
            failed_work_changes_nothing,
            rollback_to_savepoint_undoes_one_op,
            meta_and_row_ids,
            set_clocks_keeps_the_row,
            many_rows_read_and_clocked_as_one_by_one,
            outcomes_are_pruned_below_a_seq,
            changes_since_reads_changed_buckets_and_clients,
            client_progress_and_outcomes,
            client_outcomes_are_listed_in_pages,
            rows_clocks_and_tombstones,
            max_clock_is_raised_and_kept,
            bucket_membership,
            prefetched_reads_follow_the_transactions_writes,
            deferred_op_writes_apply_in_order,
            ferry_s_own_writes_leave_nothing_to_capture,
            bulk_writes_match_one_by_one,
            append_op_allocates_increasing_ids_and_bucket_state,
            checkpoint_reads_client_and_buckets,
            checkpoint_is_consistent_under_writes,
            read_ops_ranges_and_limits,
            read_ops_line_limit,
            read_ops_into_matches_read_ops,
            replace_bucket_ops_keeps_checksum,
            migrate_adds_tables_and_columns,
            everything_survives_reopen,
            commits_are_notified,
            concurrent_writers_lose_no_update,
            op_ids_appear_in_commit_order
        );
    };
    (@each $backend:expr; $($name:ident),*) => {
        $(
            #[test]
            fn $name() {
                $crate::testkit::$name(&$backend);
            }
        )*
    };
}

/// The suite's schema: tickets (text, integer, real, blob columns) and
/// notes.
pub fn test_schema() -> Schema {
    Schema::new([tickets_table(), notes_table()]).expect("the suite's schema is valid")
}

fn tickets_table() -> Table {
    Table::new("tickets")
        .column("title", ColumnType::Text)
        .column("version", ColumnType::Integer)
        .column("score", ColumnType::Real)
        .column("attachment", ColumnType::Blob)
}

fn notes_table() -> Table {
    Table::new("notes").column("body", ColumnType::Text)
}

/// A full ticket row.
pub fn ticket(title: &str, version: i64) -> RowData {
    [
        ("title".to_owned(), Value::Text(title.to_owned())),
        ("version".to_owned(), Value::Integer(version)),
        ("score".to_owned(), Value::Real(0.5)),
        ("attachment".to_owned(), Value::Blob(vec![0, 1, 255])),
    ]
    .into_iter()
    .collect()
}

/// A clock at `wall_ms`.
pub fn clock(wall_ms: u64, node: &str) -> HlcTimestamp {
    HlcTimestamp {
        wall_ms,
        counter: 0,
        node: node.to_owned(),
    }
}

fn clocks_of(row: &RowData, hlc: &HlcTimestamp) -> BTreeMap<String, HlcTimestamp> {
    row.keys().map(|k| (k.clone(), hlc.clone())).collect()
}

/// Open a database at `location`, migrated to [`test_schema`].
pub fn open<B: SourceBackend>(b: &B, location: &B::Location) -> Arc<dyn SourceDb> {
    let db = b.open(location).expect("open the database");
    db.migrate(&test_schema()).expect("migrate to the suite's schema");
    db
}

fn table(name: &str) -> Table {
    test_schema().table(name).expect("a table of the suite").clone()
}

/// Append a PUT (`data` given) or REMOVE of `tickets/<id>` to `bucket`
/// as the service does: a new op id, the entry with its checksum, the
/// bucket's state advanced. Returns the op id and the entry's checksum.
pub fn append(tx: &mut dyn SourceTx, bucket: &str, id: &str, data: Option<&RowData>) -> Result<(u64, u32)> {
    let op = if data.is_some() { OpKind::Put } else { OpKind::Remove };
    let op_id = tx.next_op_id()?;
    let checksum = op_checksum(op_id, op, "tickets", id, data);
    tx.append_op(NewOp {
        op_id,
        bucket,
        op,
        table: "tickets",
        row_id: id,
        data,
        data_json: None,
        checksum,
    })?;
    let state = tx.bucket_state(bucket)?.unwrap_or_default();
    tx.set_bucket_state(
        bucket,
        &BucketState {
            checksum: state.checksum.wrapping_add(checksum),
            count: state.count + 1,
            last_op_id: op_id,
        },
    )?;
    Ok((op_id, checksum))
}

/// The error the suite's failing work returns.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("the work failed")]
pub struct WorkFailed;

fn write<T: Default>(db: &dyn SourceDb, mut work: impl FnMut(&mut dyn SourceTx) -> Result<T>) -> T {
    let mut out = T::default();
    db.write(&mut |tx| {
        out = work(tx)?;
        Ok(())
    })
    .expect("write transaction");
    out
}

/// The [`OpRange`] of `bucket` from `after_op_id` (exclusive) to
/// `up_to_op_id`, at most `max_ops` entries in `max_line_bytes`.
pub fn range(bucket: &str, after_op_id: u64, up_to_op_id: u64, max_ops: usize, max_line_bytes: usize) -> OpRange<'_> {
    OpRange {
        bucket,
        after_op_id,
        up_to_op_id,
        max_ops,
        max_line_bytes,
    }
}

fn all_ops(db: &dyn SourceDb, bucket: &str) -> Vec<OplogEntry> {
    db.read_ops(&range(bucket, 0, u64::MAX, usize::MAX, usize::MAX))
        .expect("read ops")
}

fn checkpoint_of(db: &dyn SourceDb, bucket: &str) -> (u64, u32, u64) {
    let cp = db.checkpoint("c", &[bucket.to_owned()]).expect("checkpoint");
    (cp.last_op_id, cp.buckets[0].checksum, cp.buckets[0].count)
}

/// A transaction's row, client, outcome, membership and op are all
/// visible once `write` returns.
pub fn write_commits_whole<B: SourceBackend>(b: &B) {
    let loc = b.fresh();
    let db = open(b, &loc);
    let t = table("tickets");
    let row = ticket("a", 1);
    let hlc = clock(10, "c1");
    let (op_id, sum) = write(db.as_ref(), |tx| {
        tx.write_row(&t, "t1", &row, &clocks_of(&row, &hlc))?;
        tx.set_row_buckets("tickets", "t1", &BTreeSet::from(["b[]".to_owned()]))?;
        tx.set_client("c1", "u1", 3)?;
        tx.record_outcome("c1", 3, 77, &Outcome::Applied)?;
        append(tx, "b[]", "t1", Some(&row))
    });
    assert_eq!(op_id, 1, "the first op id is 1");
    let stored = db.get_row(&t, "t1").expect("get row").expect("row stored");
    assert_eq!(stored.data.as_ref(), Some(&row));
    assert_eq!(db.client_owner("c1").expect("owner").as_deref(), Some("u1"));
    let cp = db.checkpoint("c1", &["b[]".to_owned()]).expect("checkpoint");
    assert_eq!(cp.last_op_id, 1);
    assert_eq!(cp.write_checkpoint, Some(3));
    assert_eq!((cp.buckets[0].checksum, cp.buckets[0].count), (sum, 1));
    write(db.as_ref(), |tx| {
        assert_eq!(tx.row_buckets("tickets", "t1")?, BTreeSet::from(["b[]".to_owned()]));
        let o = tx.outcome("c1", 3)?.expect("outcome stored");
        assert_eq!((o.outcome, o.fingerprint), (Outcome::Applied, Some(77)));
        Ok(())
    });
}

/// A work closure that fails after writing leaves nothing behind: rows,
/// tombstones, clients, outcomes, membership, ops, bucket state and the
/// clock mark are as before, and the next op id is not used up.
pub fn failed_work_changes_nothing<B: SourceBackend>(b: &B) {
    let loc = b.fresh();
    let db = open(b, &loc);
    let t = table("tickets");
    let before = ticket("before", 1);
    write(db.as_ref(), |tx| {
        tx.write_row(&t, "keep", &before, &clocks_of(&before, &clock(5, "c")))?;
        append(tx, "b[]", "keep", Some(&before))
    });
    let cp_before = checkpoint_of(db.as_ref(), "b[]");
    let mark_before = db.max_clock().expect("max clock");
    let result = db.write(&mut |tx| {
        let row = ticket("after", 2);
        tx.write_row(&t, "keep", &row, &clocks_of(&row, &clock(900, "c")))?;
        tx.write_row(&t, "new", &row, &clocks_of(&row, &clock(900, "c")))?;
        tx.delete_row(&t, "keep", &clock(901, "c"))?;
        tx.set_row_buckets("tickets", "new", &BTreeSet::from(["b[]".to_owned()]))?;
        tx.set_client("c1", "u1", 9)?;
        tx.record_outcome("c1", 9, 1, &Outcome::Applied)?;
        append(tx, "b[]", "new", Some(&row))?;
        append(tx, "other[]", "new", Some(&row))?;
        Err(SourceError::aborted(WorkFailed))
    });
    let err = result.expect_err("the work failed");
    assert!(
        matches!(err.into_aborted::<WorkFailed>(), Ok(WorkFailed)),
        "the work's own error comes back"
    );
    let kept = db.get_row(&t, "keep").expect("get row").expect("row kept");
    assert_eq!(kept.data.as_ref(), Some(&before));
    assert_eq!(kept.deleted, None);
    assert_eq!(db.get_row(&t, "new").expect("get row"), None);
    assert_eq!(db.client_owner("c1").expect("owner"), None);
    assert_eq!(checkpoint_of(db.as_ref(), "b[]"), cp_before);
    assert_eq!(checkpoint_of(db.as_ref(), "other[]"), (1, 0, 0));
    assert_eq!(db.bucket_names().expect("bucket names"), vec!["b[]".to_owned()]);
    assert_eq!(db.oplog_len().expect("oplog len"), 1);
    assert_eq!(db.max_clock().expect("max clock"), mark_before);
    write(db.as_ref(), |tx| {
        assert_eq!(tx.client("c1")?, None);
        assert_eq!(tx.outcome("c1", 9)?, None);
        assert!(tx.row_buckets("tickets", "new")?.is_empty());
        Ok(())
    });
    // The next op id is still above the last committed (a database may
    // leave a gap where the rolled-back ids were).
    let (next, _) = write(db.as_ref(), |tx| append(tx, "b[]", "keep", None));
    assert!(next > 1, "op id {next} after a rollback");
    assert_eq!(checkpoint_of(db.as_ref(), "b[]").2, 2);
}

/// Writes after a savepoint are undone by a rollback to it, the writes
/// before it commit, and the transaction goes on (as the service does for
/// one op the database refused).
pub fn rollback_to_savepoint_undoes_one_op<B: SourceBackend>(b: &B) {
    let loc = b.fresh();
    let db = open(b, &loc);
    let t = table("tickets");
    let first = ticket("first", 1);
    let second = ticket("second", 2);
    let hlc = clock(10, "c");
    write(db.as_ref(), |tx| {
        tx.write_row(&t, "a", &first, &clocks_of(&first, &hlc))?;
        append(tx, "b[]", "a", Some(&first))?;
        tx.savepoint()?;
        tx.write_row(&t, "b", &second, &clocks_of(&second, &hlc))?;
        tx.delete_row(&t, "a", &clock(11, "c"))?;
        append(tx, "b[]", "b", Some(&second))?;
        tx.rollback_to_savepoint()?;
        assert_eq!(
            tx.read_row(&t, "b")?,
            None,
            "the rolled-back row is gone in the transaction"
        );
        tx.savepoint()?;
        tx.set_client("c1", "u1", 2)?;
        tx.release_savepoint()?;
        Ok(())
    });
    let a = db.get_row(&t, "a").expect("get row").expect("row before the savepoint");
    assert_eq!((a.data.as_ref(), a.deleted.as_ref()), (Some(&first), None));
    assert_eq!(db.get_row(&t, "b").expect("get row"), None);
    assert_eq!(
        checkpoint_of(db.as_ref(), "b[]").2,
        1,
        "only the op before the savepoint"
    );
    assert_eq!(db.client_owner("c1").expect("owner").as_deref(), Some("u1"));
    // The mark covers the committed clock (a database may keep a higher
    // one it saw in the rolled-back writes: the mark is a bound).
    assert!(db.max_clock().expect("max clock") >= Some(hlc));
}

/// Clocks recorded for a row written by someone else replace the row's
/// clocks, leave its values alone and raise the clock mark.
pub fn set_clocks_keeps_the_row<B: SourceBackend>(b: &B) {
    let loc = b.fresh();
    let db = open(b, &loc);
    let t = table("tickets");
    let row = ticket("kept", 3);
    write(db.as_ref(), |tx| {
        tx.write_row(&t, "t1", &row, &clocks_of(&row, &clock(5, "c")))
    });
    let later = clocks_of(&row, &clock(70, "server"));
    write(db.as_ref(), |tx| tx.set_clocks("tickets", "t1", &later));
    let stored = db.get_row(&t, "t1").expect("get row").expect("row");
    assert_eq!(stored.data.as_ref(), Some(&row), "the values are left alone");
    assert_eq!(stored.clocks, later);
    assert_eq!(stored.deleted, None);
    assert_eq!(db.max_clock().expect("max clock"), Some(clock(70, "server")));
}

/// Many rows read together answer what each read alone does (rows with
/// and without buckets, a tombstone, ids the database never saw, an id
/// twice), and clocks set together are those set one by one.
pub fn many_rows_read_and_clocked_as_one_by_one<B: SourceBackend>(b: &B) {
    let loc = b.fresh();
    let db = open(b, &loc);
    let t = table("tickets");
    write(db.as_ref(), |tx| {
        for (i, id) in ["a", "b", "c", "d"].iter().enumerate() {
            let row = ticket(id, i as i64);
            tx.write_row(&t, id, &row, &clocks_of(&row, &clock(10 + i as u64, "c")))?;
        }
        tx.set_row_buckets(
            "tickets",
            "a",
            &["b1".to_owned(), "b2".to_owned()].into_iter().collect(),
        )?;
        tx.set_row_buckets("tickets", "gone", &["b1".to_owned()].into_iter().collect())?;
        tx.delete_row(&t, "c", &clock(40, "c"))
    });
    let ids = ["a", "b", "c", "d", "gone", "never", "a"];
    let (together, alone) = write(db.as_ref(), |tx| {
        let together = tx.read_rows_with_buckets(&t, &ids)?;
        let mut alone = Vec::new();
        for id in ids {
            alone.push((tx.read_row(&t, id)?, tx.row_buckets("tickets", id)?));
        }
        Ok((together, alone))
    });
    assert_eq!(together.len(), ids.len());
    assert_eq!(together, alone);
    assert!(
        together[2].0.as_ref().is_some_and(|r| r.deleted.is_some()),
        "c's tombstone"
    );
    assert!(together[5].0.is_none() && together[5].1.is_empty(), "an id never seen");

    let later = |i: u64| clocks_of(&ticket("x", 0), &clock(100 + i, "server"));
    let (one, two) = (later(1), later(2));
    write(db.as_ref(), |tx| {
        tx.set_many_clocks("tickets", &[("b", &one), ("c", &two), ("d", &one)])
    });
    let b_row = db.get_row(&t, "b").expect("get").expect("row");
    assert_eq!(b_row.clocks, one);
    assert_eq!(b_row.data, Some(ticket("b", 1)), "the values are left alone");
    let c_row = db.get_row(&t, "c").expect("get");
    assert!(
        c_row.as_ref().is_none_or(|r| r.deleted.is_none()),
        "the tombstone is cleared"
    );
    assert_eq!(db.get_row(&t, "d").expect("get").expect("row").clocks, one);
    assert_eq!(db.max_clock().expect("max clock"), Some(clock(102, "server")));
}

/// Settings are kept (and replaced); row ids come in batches after a
/// cursor, tombstones left out.
pub fn meta_and_row_ids<B: SourceBackend>(b: &B) {
    let loc = b.fresh();
    let db = open(b, &loc);
    let t = table("tickets");
    assert_eq!(db.meta("ferry.test").expect("meta"), None);
    write(db.as_ref(), |tx| {
        tx.set_meta("ferry.test", "one")?;
        tx.set_meta("ferry.test", "two")?;
        for id in ["t1", "t2", "t3", "t4", "t5"] {
            let row = ticket(id, 1);
            tx.write_row(&t, id, &row, &clocks_of(&row, &clock(1, "c")))?;
        }
        tx.delete_row(&t, "t3", &clock(2, "c"))
    });
    assert_eq!(db.meta("ferry.test").expect("meta").as_deref(), Some("two"));
    let first = db.row_ids(&t, None, 2).expect("row ids");
    assert_eq!(first, vec!["t1".to_owned(), "t2".to_owned()]);
    let rest = db.row_ids(&t, Some("t2"), 10).expect("row ids");
    assert_eq!(
        rest,
        vec!["t4".to_owned(), "t5".to_owned()],
        "the tombstone is not a row"
    );
    assert!(db.row_ids(&t, Some("t5"), 10).expect("row ids").is_empty());
}

/// Pruning deletes one client's outcomes below a seq and nothing else.
pub fn outcomes_are_pruned_below_a_seq<B: SourceBackend>(b: &B) {
    let loc = b.fresh();
    let db = open(b, &loc);
    write(db.as_ref(), |tx| {
        for seq in 1..=5 {
            tx.record_outcome("c1", seq, seq, &Outcome::Applied)?;
            tx.record_outcome("c2", seq, seq, &Outcome::Applied)?;
        }
        Ok(())
    });
    let pruned = write(db.as_ref(), |tx| tx.prune_outcomes("c1", 4));
    assert_eq!(pruned, 3);
    let left: Vec<u64> = db
        .client_outcomes("c1", 0, 100)
        .expect("outcomes")
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(left, vec![4, 5]);
    assert_eq!(
        db.client_outcomes("c2", 0, 100).expect("outcomes").len(),
        5,
        "other clients keep theirs"
    );
}

/// The change feed's read: the buckets with an entry above an op id, and
/// the progress of the clients asked for.
pub fn changes_since_reads_changed_buckets_and_clients<B: SourceBackend>(b: &B) {
    let loc = b.fresh();
    let db = open(b, &loc);
    let row = ticket("a", 1);
    let (first, _) = write(db.as_ref(), |tx| {
        tx.set_client("c1", "u1", 4)?;
        append(tx, "a[]", "t1", Some(&row))
    });
    let (second, sum_b) = write(db.as_ref(), |tx| append(tx, "b[]", "t2", Some(&row)));
    let all = db
        .changes_since(0, &["c1".to_owned(), "nobody".to_owned()])
        .expect("changes");
    assert_eq!(all.last_op_id, second);
    let names: Vec<&str> = {
        let mut n: Vec<&str> = all.buckets.iter().map(|(b, _)| b.as_str()).collect();
        n.sort_unstable();
        n
    };
    assert_eq!(names, vec!["a[]", "b[]"]);
    assert_eq!(
        all.clients,
        vec![("c1".to_owned(), 4)],
        "a client that never uploaded is left out"
    );
    let later = db.changes_since(first, &[]).expect("changes");
    assert_eq!(later.last_op_id, second);
    assert_eq!(
        later.buckets,
        vec![(
            "b[]".to_owned(),
            BucketState {
                checksum: sum_b,
                count: 1,
                last_op_id: second
            }
        )]
    );
    assert!(later.clients.is_empty());
    let none = db.changes_since(second, &[]).expect("changes");
    assert_eq!((none.last_op_id, none.buckets.len()), (second, 0));
}

/// Client progress: set, read, advanced (the owner stays); outcomes with
/// their fingerprints, replaced by a second record.
pub fn client_progress_and_outcomes<B: SourceBackend>(b: &B) {
    let loc = b.fresh();
    let db = open(b, &loc);
    write(db.as_ref(), |tx| {
        assert_eq!(tx.client("c1")?, None);
        tx.set_client("c1", "u1", 1)?;
        assert_eq!(
            tx.client("c1")?,
            Some(ClientProgress {
                user_id: "u1".into(),
                last_seq: 1
            })
        );
        tx.record_outcome("c1", 1, u64::MAX, &Outcome::Applied)?;
        tx.record_outcome(
            "c1",
            2,
            0,
            &Outcome::Merged {
                row: Some(ticket("m", 2)),
                reason: "kept the newer title".into(),
            },
        )?;
        Ok(())
    });
    write(db.as_ref(), |tx| {
        tx.set_client("c1", "u1", 2)?;
        tx.set_client("c2", "u2", 7)?;
        Ok(())
    });
    assert_eq!(db.client_owner("c1").expect("owner").as_deref(), Some("u1"));
    assert_eq!(db.client_owner("c2").expect("owner").as_deref(), Some("u2"));
    assert_eq!(db.client_owner("nobody").expect("owner"), None);
    assert_eq!(db.checkpoint("c1", &[]).expect("checkpoint").write_checkpoint, Some(2));
    assert_eq!(db.checkpoint("nobody", &[]).expect("checkpoint").write_checkpoint, None);
    write(db.as_ref(), |tx| {
        assert_eq!(tx.client("c1")?.map(|p| p.last_seq), Some(2));
        let o = tx.outcome("c1", 1)?.expect("outcome 1");
        assert_eq!((o.outcome, o.fingerprint), (Outcome::Applied, Some(u64::MAX)));
        let o = tx.outcome("c1", 2)?.expect("outcome 2");
        assert_eq!(o.fingerprint, Some(0));
        assert!(matches!(o.outcome, Outcome::Merged { row: Some(_), .. }));
        assert_eq!(tx.outcome("c2", 1)?, None, "outcomes are per client");
        tx.record_outcome(
            "c1",
            2,
            5,
            &Outcome::Rejected {
                reason: "replaced".into(),
            },
        )?;
        Ok(())
    });
    write(db.as_ref(), |tx| {
        let o = tx.outcome("c1", 2)?.expect("outcome 2");
        assert_eq!(o.fingerprint, Some(5));
        assert_eq!(
            o.outcome,
            Outcome::Rejected {
                reason: "replaced".into()
            }
        );
        Ok(())
    });
}

/// A client's stored outcomes listed by seq: only that client's, after
/// the seq given, at most the limit, a replaced outcome as replaced.
pub fn client_outcomes_are_listed_in_pages<B: SourceBackend>(b: &B) {
    let loc = b.fresh();
    let db = open(b, &loc);
    assert!(db.client_outcomes("c1", 0, 10).expect("outcomes").is_empty());
    write(db.as_ref(), |tx| {
        tx.set_client("c1", "u1", 5)?;
        tx.set_client("c2", "u2", 1)?;
        for seq in [5u64, 1, 3, 2, 4] {
            tx.record_outcome("c1", seq, seq * 10, &Outcome::Applied)?;
        }
        tx.record_outcome("c1", 3, 33, &Outcome::Rejected { reason: "no".into() })?;
        tx.record_outcome("c2", 1, 1, &Outcome::Applied)?;
        Ok(())
    });
    let seqs = |v: &[(u64, crate::StoredOutcome)]| v.iter().map(|(s, _)| *s).collect::<Vec<_>>();
    let all = db.client_outcomes("c1", 0, 100).expect("outcomes");
    assert_eq!(seqs(&all), vec![1, 2, 3, 4, 5]);
    assert_eq!(all[0].1.fingerprint, Some(10));
    assert_eq!(
        all[2].1,
        crate::StoredOutcome {
            outcome: Outcome::Rejected { reason: "no".into() },
            fingerprint: Some(33),
        }
    );
    assert_eq!(seqs(&db.client_outcomes("c1", 0, 2).expect("page 1")), vec![1, 2]);
    assert_eq!(seqs(&db.client_outcomes("c1", 2, 2).expect("page 2")), vec![3, 4]);
    assert_eq!(seqs(&db.client_outcomes("c1", 4, 2).expect("page 3")), vec![5]);
    assert!(db.client_outcomes("c1", 5, 2).expect("past the end").is_empty());
    assert!(db
        .client_outcomes("c1", u64::MAX, 2)
        .expect("far past the end")
        .is_empty());
    assert!(db.client_outcomes("c1", 0, 0).expect("limit 0").is_empty());
    assert_eq!(seqs(&db.client_outcomes("c2", 0, 10).expect("c2")), vec![1]);
    assert!(db.client_outcomes("nobody", 0, 10).expect("nobody").is_empty());
}

/// Rows: written whole with their clocks, read back inside and outside a
/// transaction; a delete leaves a tombstone with its clock and no clocks;
/// a write over a tombstone clears it; rows of other tables and ids are
/// apart.
pub fn rows_clocks_and_tombstones<B: SourceBackend>(b: &B) {
    let loc = b.fresh();
    let db = open(b, &loc);
    let (tickets, notes) = (table("tickets"), table("notes"));
    let row = ticket("first", 1);
    let mut clocks = clocks_of(&row, &clock(10, "a"));
    clocks.insert("title".into(), clock(12, "b"));
    let mut nulls = ticket("x", 0);
    for v in nulls.values_mut() {
        *v = Value::Null;
    }
    write(db.as_ref(), |tx| {
        assert_eq!(tx.read_row(&tickets, "t1")?, None);
        tx.write_row(&tickets, "t1", &row, &clocks)?;
        tx.write_row(&tickets, "t2", &nulls, &BTreeMap::new())?;
        let note: RowData = [("body".to_owned(), Value::Text("n".into()))].into_iter().collect();
        tx.write_row(&notes, "t1", &note, &BTreeMap::new())?;
        assert_eq!(
            tx.read_row(&tickets, "t1")?,
            Some(StoredRow {
                data: Some(row.clone()),
                clocks: clocks.clone(),
                deleted: None
            }),
            "a row written in a transaction reads back in it"
        );
        Ok(())
    });
    let stored = db.get_row(&tickets, "t1").expect("get row").expect("stored");
    assert_eq!(stored.data.as_ref(), Some(&row));
    assert_eq!(stored.clocks, clocks);
    let t2 = db.get_row(&tickets, "t2").expect("get row").expect("stored");
    assert_eq!(t2.data, Some(nulls.clone()), "NULL columns read back as NULL");
    write(db.as_ref(), |tx| tx.delete_row(&tickets, "t1", &clock(20, "a")));
    let gone = db.get_row(&tickets, "t1").expect("get row").expect("tombstone");
    assert_eq!(gone.data, None);
    assert_eq!(gone.deleted, Some(clock(20, "a")));
    assert!(gone.clocks.is_empty(), "a tombstone has no column clocks");
    let note = db.get_row(&notes, "t1").expect("get row").expect("note");
    assert!(note.data.is_some(), "a delete in one table leaves the other");
    write(db.as_ref(), |tx| tx.delete_row(&tickets, "never", &clock(21, "a")));
    let never = db.get_row(&tickets, "never").expect("get row").expect("tombstone");
    assert_eq!((never.data, never.deleted), (None, Some(clock(21, "a"))));
    let again = ticket("again", 2);
    write(db.as_ref(), |tx| {
        tx.write_row(&tickets, "t1", &again, &clocks_of(&again, &clock(30, "c")))
    });
    let back = db.get_row(&tickets, "t1").expect("get row").expect("stored");
    assert_eq!(back.data, Some(again));
    assert_eq!(back.deleted, None, "a write clears the tombstone");
    assert_eq!(back.clocks.get("title"), Some(&clock(30, "c")));
}

/// The clock high-water mark is the greatest clock written with a row or
/// tombstone, and never goes down.
pub fn max_clock_is_raised_and_kept<B: SourceBackend>(b: &B) {
    let loc = b.fresh();
    let db = open(b, &loc);
    let t = table("tickets");
    assert_eq!(db.max_clock().expect("max clock"), None);
    let row = ticket("a", 1);
    let mut clocks = clocks_of(&row, &clock(10, "a"));
    clocks.insert("version".into(), clock(40, "z"));
    write(db.as_ref(), |tx| tx.write_row(&t, "t1", &row, &clocks));
    assert_eq!(db.max_clock().expect("max clock"), Some(clock(40, "z")));
    write(db.as_ref(), |tx| {
        tx.write_row(&t, "t2", &row, &clocks_of(&row, &clock(20, "a")))
    });
    assert_eq!(
        db.max_clock().expect("max clock"),
        Some(clock(40, "z")),
        "an older clock does not lower it"
    );
    write(db.as_ref(), |tx| tx.delete_row(&t, "t2", &clock(50, "d")));
    assert_eq!(db.max_clock().expect("max clock"), Some(clock(50, "d")));
}

/// Bucket membership: replaced whole, per row, read back in order.
pub fn bucket_membership<B: SourceBackend>(b: &B) {
    let loc = b.fresh();
    let db = open(b, &loc);
    let set = |names: &[&str]| names.iter().map(|s| (*s).to_owned()).collect::<BTreeSet<String>>();
    write(db.as_ref(), |tx| {
        tx.set_row_buckets("tickets", "t1", &set(&["b[\"u1\"]", "a[]"]))?;
        tx.set_row_buckets("tickets", "t2", &set(&["a[]"]))?;
        tx.set_row_buckets("notes", "t1", &set(&["n[]"]))?;
        Ok(())
    });
    write(db.as_ref(), |tx| {
        assert_eq!(tx.row_buckets("tickets", "t1")?, set(&["a[]", "b[\"u1\"]"]));
        tx.set_row_buckets("tickets", "t1", &set(&["c[]"]))?;
        assert_eq!(
            tx.row_buckets("tickets", "t1")?,
            set(&["c[]"]),
            "replaced in the transaction"
        );
        tx.set_row_buckets("tickets", "t2", &BTreeSet::new())?;
        Ok(())
    });
    write(db.as_ref(), |tx| {
        assert_eq!(tx.row_buckets("tickets", "t1")?, set(&["c[]"]));
        assert!(tx.row_buckets("tickets", "t2")?.is_empty());
        assert_eq!(tx.row_buckets("notes", "t1")?, set(&["n[]"]), "per table");
        assert!(tx.row_buckets("tickets", "none")?.is_empty());
        Ok(())
    });
}

/// Rows read ahead (`prefetch_rows`) read as they would without it: as
/// committed before, then with the transaction's own writes, deletes and
/// membership changes, and without what a savepoint rollback undid.
pub fn prefetched_reads_follow_the_transactions_writes<B: SourceBackend>(b: &B) {
    let loc = b.fresh();
    let db = open(b, &loc);
    let t = table("tickets");
    let set = |names: &[&str]| names.iter().map(|s| (*s).to_owned()).collect::<BTreeSet<String>>();
    let (first, second, third) = (ticket("first", 1), ticket("second", 2), ticket("third", 3));
    let hlc = clock(10, "c");
    write(db.as_ref(), |tx| {
        tx.write_row(&t, "a", &first, &clocks_of(&first, &hlc))?;
        tx.set_row_buckets("tickets", "a", &set(&["x[]"]))?;
        Ok(())
    });
    write(db.as_ref(), |tx| {
        tx.prefetch_rows(&t, &["a", "b", "a", "never"])?;
        let a = tx.read_row(&t, "a")?.expect("row a");
        assert_eq!((a.data.as_ref(), a.deleted.as_ref()), (Some(&first), None));
        assert_eq!(a.clocks, clocks_of(&first, &hlc));
        assert_eq!(tx.read_row(&t, "b")?, None);
        assert_eq!(tx.read_row(&t, "never")?, None);
        assert_eq!(tx.row_buckets("tickets", "a")?, set(&["x[]"]));
        assert!(tx.row_buckets("tickets", "b")?.is_empty());

        tx.write_row(&t, "b", &second, &clocks_of(&second, &hlc))?;
        tx.set_row_buckets("tickets", "b", &set(&["y[]"]))?;
        assert_eq!(tx.read_row(&t, "b")?.and_then(|r| r.data), Some(second.clone()));
        assert_eq!(tx.row_buckets("tickets", "b")?, set(&["y[]"]));
        tx.delete_row(&t, "a", &clock(11, "c"))?;
        let a = tx.read_row(&t, "a")?.expect("tombstone of a");
        assert_eq!((a.data, a.deleted), (None, Some(clock(11, "c"))));

        tx.savepoint()?;
        tx.set_row_buckets("tickets", "b", &set(&["z[]"]))?;
        tx.write_row(&t, "b", &third, &clocks_of(&third, &hlc))?;
        tx.rollback_to_savepoint()?;
        assert_eq!(
            tx.read_row(&t, "b")?.and_then(|r| r.data),
            Some(second.clone()),
            "the rolled-back write is not read"
        );
        assert_eq!(tx.row_buckets("tickets", "b")?, set(&["y[]"]));
        Ok(())
    });
    assert_eq!(db.get_row(&t, "b").expect("get").and_then(|r| r.data), Some(second));
    assert_eq!(db.get_row(&t, "a").expect("get").and_then(|r| r.data), None);
}

/// With `defer_op_writes` on, ops still apply in order: each reads what
/// the ones before it wrote, and the commit keeps them all. An op that
/// only deferred writes is undone alone by its savepoint's rollback.
pub fn deferred_op_writes_apply_in_order<B: SourceBackend>(b: &B) {
    let loc = b.fresh();
    let db = open(b, &loc);
    let t = table("tickets");
    let set = |names: &[&str]| names.iter().map(|s| (*s).to_owned()).collect::<BTreeSet<String>>();
    let hlc = clock(10, "c");
    write(db.as_ref(), |tx| {
        tx.defer_op_writes(true);
        for i in 0..5_i64 {
            let id = format!("t{i}");
            let row = ticket(&format!("ticket {i}"), i);
            tx.savepoint()?;
            if i > 0 {
                let before = tx.read_row(&t, &format!("t{}", i - 1))?.and_then(|r| r.data);
                assert_eq!(before, Some(ticket(&format!("ticket {}", i - 1), i - 1)));
            }
            tx.write_row(&t, &id, &row, &clocks_of(&row, &hlc))?;
            tx.set_row_buckets("tickets", &id, &set(&["d[]"]))?;
            append(tx, "d[]", &id, Some(&row))?;
            tx.release_savepoint()?;
        }
        for seq in 1..=5 {
            tx.record_outcome("c1", seq, seq, &Outcome::Applied)?;
        }
        // Memberships replaced twice, and emptied, before anything is sent.
        tx.set_row_buckets("tickets", "t1", &set(&["e[]", "f[]"]))?;
        tx.set_row_buckets("tickets", "t1", &set(&["e[]"]))?;
        tx.set_row_buckets("tickets", "t2", &BTreeSet::new())?;
        tx.savepoint()?;
        // A read first sends what the ops before wrote; this op wrote
        // nothing yet, so it can still be undone alone.
        assert!(tx.read_row(&t, "t4")?.is_some());
        tx.set_row_buckets("tickets", "t0", &set(&["gone[]"]))?;
        append(tx, "d[]", "t0", Some(&ticket("undone", 0)))?;
        tx.record_outcome("c1", 6, 6, &Outcome::Applied)?;
        tx.rollback_to_savepoint()?;
        tx.set_client("c1", "u1", 5)?;
        Ok(())
    });
    write(db.as_ref(), |tx| {
        assert!(tx.outcome("c1", 5)?.is_some(), "the ops' outcomes are kept");
        assert_eq!(tx.outcome("c1", 6)?, None, "the undone op's outcome is not");
        Ok(())
    });
    for i in 0..5_i64 {
        let row = db.get_row(&t, &format!("t{i}")).expect("get").and_then(|r| r.data);
        assert_eq!(row, Some(ticket(&format!("ticket {i}"), i)));
    }
    assert_eq!(
        checkpoint_of(db.as_ref(), "d[]").2,
        5,
        "every op's log entry, none of the undone op's"
    );
    assert_eq!(all_ops(db.as_ref(), "d[]").len(), 5);
    write(db.as_ref(), |tx| {
        assert_eq!(
            tx.row_buckets("tickets", "t0")?,
            set(&["d[]"]),
            "the undone op changed nothing"
        );
        assert_eq!(
            tx.row_buckets("tickets", "t1")?,
            set(&["e[]"]),
            "the last membership set"
        );
        assert!(tx.row_buckets("tickets", "t2")?.is_empty());
        assert_eq!(tx.row_buckets("tickets", "t3")?, set(&["d[]"]));
        Ok(())
    });
    assert_eq!(db.client_owner("c1").expect("owner").as_deref(), Some("u1"));
}

/// Ferry's own writes are not captured changes
/// ([`SourceTx::take_captured`] finds none), and leave no row Ferry keeps
/// bookkeeping for that the table does not hold: a walk with
/// [`SourceTx::vanished_rows`] over rows written, deleted (a tombstone,
/// membership cleared) and written again lists none, and ends.
pub fn ferry_s_own_writes_leave_nothing_to_capture<B: SourceBackend>(b: &B) {
    let loc = b.fresh();
    let db = open(b, &loc);
    let t = table("tickets");
    let bucket: BTreeSet<String> = ["a[]".to_owned()].into_iter().collect();
    let row = ticket("t", 1);
    write(db.as_ref(), |tx| {
        for id in ["t1", "t2", "t3", "t4"] {
            tx.write_row(&t, id, &row, &clocks_of(&row, &clock(10, "a")))?;
            tx.set_row_buckets("tickets", id, &bucket)?;
        }
        Ok(())
    });
    write(db.as_ref(), |tx| {
        for id in ["t2", "t3"] {
            tx.delete_row(&t, id, &clock(20, "a"))?;
            tx.set_row_buckets("tickets", id, &BTreeSet::new())?;
        }
        tx.write_row(&t, "t3", &row, &clocks_of(&row, &clock(30, "a")))?;
        tx.set_row_buckets("tickets", "t3", &bucket)?;
        Ok(())
    });
    write(db.as_ref(), |tx| {
        assert_eq!(tx.take_captured(100)?, Vec::new(), "Ferry's writes are not captured");
        let mut after: Option<String> = None;
        for _ in 0..10 {
            let step = tx.vanished_rows(&t, after.as_deref(), 1)?;
            assert_eq!(step.ids, Vec::<String>::new(), "no row vanished");
            after = step.next_after;
            if after.is_none() {
                return Ok(());
            }
        }
        panic!("a walk over four rows one at a time did not end");
    });
}

/// The bulk writes (`write_rows`, `append_ops`, `set_rows_buckets`,
/// `add_rows_buckets`, rows and clocks handed over encoded or not)
/// leave what the one-row methods called in order leave (a repeated id:
/// the later entry wins; a tombstone is cleared; memberships replaced),
/// and `known_rows` finds the ids with a row, a tombstone or membership.
pub fn bulk_writes_match_one_by_one<B: SourceBackend>(b: &B) {
    let t = table("tickets");
    let set = |names: &[&str]| names.iter().map(|s| (*s).to_owned()).collect::<BTreeSet<String>>();
    let rows: Vec<(String, RowData, BTreeMap<String, HlcTimestamp>)> = (0..150)
        .map(|i| {
            let row = ticket(&format!("title {i}"), i);
            let clocks = clocks_of(&row, &clock(1_000 + i as u64, "s"));
            // Ids 0..=9 come twice (the second write wins).
            (format!("t{}", i % 140), row, clocks)
        })
        .collect();
    let members: Vec<(String, BTreeSet<String>)> = (0..150)
        .map(|i| {
            let buckets = match i % 3 {
                0 => set(&["a[]"]),
                1 => set(&["a[]", "b[\"u1\"]"]),
                _ => BTreeSet::new(),
            };
            (format!("t{}", i % 140), buckets)
        })
        .collect();
    let setup = |tx: &mut dyn SourceTx| -> Result<()> {
        // A tombstone and an old membership the writes replace.
        tx.delete_row(&t, "t3", &clock(10, "s"))?;
        tx.set_row_buckets("tickets", "t4", &set(&["old[]"]))?;
        tx.set_row_buckets("tickets", "t20", &set(&["old[]"]))?;
        tx.set_row_buckets("tickets", "t145", &set(&["old[]"]))?;
        Ok(())
    };
    let mut dbs = Vec::new();
    for bulk in [false, true] {
        let loc = b.fresh();
        let db = open(b, &loc);
        write(db.as_ref(), |tx| {
            setup(tx)?;
            if bulk {
                let ids: Vec<&str> = ["t3", "t4", "t145", "t146", "t0"].to_vec();
                assert_eq!(
                    tx.known_rows(&t, &ids)?,
                    set(&["t3", "t4", "t145"]),
                    "a tombstone and memberships are known, the rest not"
                );
                // Rows and clocks handed over encoded, as the service's
                // bulk import hands them; every other row's clocks as
                // one shared clock, for the database to encode.
                let clocks_json: Vec<String> = rows
                    .iter()
                    .map(|(_, _, c)| ferry_core::clock::clocks_json(c).expect("encode clocks"))
                    .collect();
                let shared: Vec<HlcTimestamp> = rows
                    .iter()
                    .map(|(_, _, c)| c.values().next().cloned().expect("a clock"))
                    .collect();
                let data_json: Vec<String> = rows
                    .iter()
                    .map(|(_, d, _)| serde_json::to_string(d).expect("encode row"))
                    .collect();
                let writes: Vec<RowWrite<'_>> = rows
                    .iter()
                    .zip(clocks_json.iter().zip(&shared))
                    .enumerate()
                    .map(|(i, ((id, data, clocks), (json, hlc)))| {
                        if i % 2 == 0 {
                            RowWrite {
                                id,
                                data,
                                clocks: RowClocks::Columns(clocks),
                                clocks_json: Some(json),
                            }
                        } else {
                            RowWrite {
                                id,
                                data,
                                clocks: RowClocks::Shared(hlc),
                                clocks_json: None,
                            }
                        }
                    })
                    .collect();
                let stored = tx.write_rows(&t, &writes)?;
                assert_eq!(stored.len(), rows.len(), "one answer per row");
                let mut ops = Vec::new();
                for (id, data, _) in &rows {
                    let op_id = tx.next_op_id()?;
                    ops.push((op_id, id, data));
                }
                let new_ops: Vec<NewOp<'_>> = ops
                    .iter()
                    .zip(&data_json)
                    .map(|((op_id, id, data), json)| NewOp {
                        op_id: *op_id,
                        bucket: "a[]",
                        op: OpKind::Put,
                        table: "tickets",
                        row_id: id,
                        data: Some(data),
                        data_json: Some(json),
                        checksum: op_checksum(*op_id, OpKind::Put, "tickets", id, Some(data)),
                    })
                    .collect();
                tx.append_ops(&new_ops)?;
                let m: Vec<(&str, &BTreeSet<String>)> = members.iter().map(|(id, bs)| (id.as_str(), bs)).collect();
                // Rows with a membership get it replaced, the others
                // (no membership to clear) added.
                let (replaced, added): (Vec<_>, Vec<_>) = m.into_iter().partition(|(id, _)| ["t4", "t20"].contains(id));
                tx.set_rows_buckets("tickets", &replaced)?;
                tx.add_rows_buckets("tickets", &added)?;
                assert_eq!(
                    tx.known_rows(&t, &["t0", "t139", "t140", "t3"])?,
                    set(&["t0", "t139", "t3"]),
                    "written rows are known in the transaction"
                );
            } else {
                for (id, data, clocks) in &rows {
                    tx.write_row(&t, id, data, clocks)?;
                }
                for (id, data, _) in &rows {
                    let op_id = tx.next_op_id()?;
                    tx.append_op(NewOp {
                        op_id,
                        bucket: "a[]",
                        op: OpKind::Put,
                        table: "tickets",
                        row_id: id,
                        data: Some(data),
                        data_json: None,
                        checksum: op_checksum(op_id, OpKind::Put, "tickets", id, Some(data)),
                    })?;
                }
                for (id, bs) in &members {
                    tx.set_row_buckets("tickets", id, bs)?;
                }
            }
            Ok(())
        });
        dbs.push((loc, db));
    }
    let (one, bulk) = (&dbs[0].1, &dbs[1].1);
    assert_eq!(
        all_ops(bulk.as_ref(), "a[]"),
        all_ops(one.as_ref(), "a[]"),
        "same op log"
    );
    assert_eq!(all_ops(bulk.as_ref(), "a[]").len(), rows.len());
    assert_eq!(
        bulk.max_clock().expect("max clock"),
        one.max_clock().expect("max clock")
    );
    for i in 0..150 {
        let id = format!("t{i}");
        assert_eq!(
            bulk.get_row(&t, &id).expect("read"),
            one.get_row(&t, &id).expect("read"),
            "row {id}"
        );
        let buckets = |db: &Arc<dyn SourceDb>| write(db.as_ref(), |tx| tx.row_buckets("tickets", &id));
        assert_eq!(buckets(bulk), buckets(one), "membership of {id}");
    }
    let t0 = bulk.get_row(&t, "t0").expect("read").expect("t0 is there");
    assert_eq!(t0.data, Some(ticket("title 140", 140)), "the later write of an id wins");
    let t3 = bulk.get_row(&t, "t3").expect("read").expect("t3 is there");
    assert_eq!(t3.deleted, None, "the tombstone is cleared");
    let m = |id: &str| write(bulk.as_ref(), |tx| tx.row_buckets("tickets", id));
    assert_eq!(m("t0"), BTreeSet::new(), "the later membership of an id wins");
    assert_eq!(m("t4"), set(&["a[]"]), "memberships are replaced");
    assert_eq!(m("t20"), BTreeSet::new(), "memberships are emptied");
    assert_eq!(m("t145"), set(&["old[]"]), "other rows keep theirs");
}

/// `next_op_id` allocates increasing op ids across and within
/// transactions; `append_op` stores the entry as given with its checksum;
/// the bucket state set is what checkpoints read (absent buckets 0/0).
pub fn append_op_allocates_increasing_ids_and_bucket_state<B: SourceBackend>(b: &B) {
    let loc = b.fresh();
    let db = open(b, &loc);
    let r1 = ticket("one", 1);
    let ids = write(db.as_ref(), |tx| {
        Ok(vec![
            append(tx, "a[]", "t1", Some(&r1))?,
            append(tx, "b[]", "t1", Some(&r1))?,
            append(tx, "a[]", "t2", None)?,
        ])
    });
    let more = write(db.as_ref(), |tx| Ok(vec![append(tx, "a[]", "t1", None)?]));
    let all: Vec<(u64, u32)> = ids.iter().chain(&more).copied().collect();
    assert_eq!(all.iter().map(|(id, _)| *id).collect::<Vec<_>>(), vec![1, 2, 3, 4]);
    let a = all_ops(db.as_ref(), "a[]");
    assert_eq!(a.iter().map(|e| e.op_id).collect::<Vec<_>>(), vec![1, 3, 4]);
    assert_eq!(
        a[0],
        OplogEntry {
            op_id: 1,
            op: OpKind::Put,
            object_type: Some("tickets".into()),
            object_id: Some("t1".into()),
            data: Some(r1.clone()),
            checksum: all[0].1,
        }
    );
    assert_eq!(
        (a[1].op, a[1].data.as_ref(), a[1].checksum),
        (OpKind::Remove, None, all[2].1)
    );
    let sum_a = all[0].1.wrapping_add(all[2].1).wrapping_add(all[3].1);
    let cp = db
        .checkpoint("c", &["a[]".to_owned(), "b[]".to_owned(), "none[]".to_owned()])
        .expect("checkpoint");
    assert_eq!(cp.last_op_id, 4);
    let state: Vec<(&str, u32, u64)> = cp
        .buckets
        .iter()
        .map(|b| (b.bucket.as_str(), b.checksum, b.count))
        .collect();
    assert_eq!(state, vec![("a[]", sum_a, 3), ("b[]", all[1].1, 1), ("none[]", 0, 0)]);
    assert_eq!(
        db.bucket_names().expect("bucket names"),
        vec!["a[]".to_owned(), "b[]".to_owned()]
    );
    assert_eq!(db.oplog_len().expect("oplog len"), 4);
    write(db.as_ref(), |tx| {
        let log = tx.bucket_ops("a[]")?;
        assert_eq!(log, a, "bucket_ops reads the whole log");
        Ok(())
    });
}

/// A checkpoint holds the global last op id, the requested buckets in
/// the order asked (absent ones as 0/0) and the client's write
/// checkpoint.
pub fn checkpoint_reads_client_and_buckets<B: SourceBackend>(b: &B) {
    let loc = b.fresh();
    let db = open(b, &loc);
    let empty = db.checkpoint("c1", &["x[]".to_owned()]).expect("checkpoint");
    assert_eq!(empty.last_op_id, 0);
    assert_eq!(empty.write_checkpoint, None);
    assert_eq!((empty.buckets[0].checksum, empty.buckets[0].count), (0, 0));
    let r = ticket("a", 1);
    write(db.as_ref(), |tx| {
        append(tx, "z[]", "t1", Some(&r))?;
        append(tx, "other[]", "t1", Some(&r))?;
        tx.set_client("c1", "u1", 4)
    });
    let cp = db
        .checkpoint("c1", &["z[]".to_owned(), "a[]".to_owned()])
        .expect("checkpoint");
    assert_eq!(cp.last_op_id, 2, "the global last op id, also of buckets not asked for");
    assert_eq!(cp.write_checkpoint, Some(4));
    let names: Vec<&str> = cp.buckets.iter().map(|b| b.bucket.as_str()).collect();
    assert_eq!(names, vec!["z[]", "a[]"], "in the order asked");
    assert_eq!(cp.buckets[0].count, 1);
    assert_eq!(cp.buckets[1].count, 0);
}

/// Writers each append one op to two buckets and advance a client in one
/// transaction while a reader takes checkpoints: every checkpoint shows
/// both buckets at the same count, that count's write checkpoint, and a
/// last op id covering exactly those ops.
pub fn checkpoint_is_consistent_under_writes<B: SourceBackend>(b: &B) {
    let loc = b.fresh();
    let db = open(b, &loc);
    const TRANSACTIONS: u64 = 60;
    let done = AtomicBool::new(false);
    let buckets = ["a[]".to_owned(), "b[]".to_owned()];
    std::thread::scope(|s| {
        s.spawn(|| {
            let r = ticket("x", 1);
            for i in 1..=TRANSACTIONS {
                write(db.as_ref(), |tx| {
                    append(tx, "a[]", "t", Some(&r))?;
                    append(tx, "b[]", "t", Some(&r))?;
                    tx.set_client("c", "u", i)
                });
            }
            done.store(true, Ordering::SeqCst);
        });
        let mut checked = 0;
        loop {
            let finished = done.load(Ordering::SeqCst);
            let cp = db.checkpoint("c", &buckets).expect("checkpoint");
            let (a, b) = (cp.buckets[0].count, cp.buckets[1].count);
            assert_eq!(a, b, "both buckets of one transaction or neither: {cp:?}");
            assert_eq!(
                cp.write_checkpoint.unwrap_or(0),
                a,
                "client progress of the same state: {cp:?}"
            );
            assert_eq!(cp.last_op_id, 2 * a, "the last op id of the same state: {cp:?}");
            checked += 1;
            if finished {
                break;
            }
        }
        assert!(checked > 0);
    });
    assert_eq!(checkpoint_of(db.as_ref(), "a[]").2, TRANSACTIONS);
}

fn fill(db: &dyn SourceDb, n: usize) -> Vec<u64> {
    write(db, |tx| {
        let mut ids = Vec::new();
        for i in 0..n {
            let r = ticket(&format!("row {i}"), i as i64);
            ids.push(append(tx, "a[]", &format!("t{i}"), Some(&r))?.0);
            append(tx, "other[]", &format!("t{i}"), Some(&r))?;
        }
        Ok(ids)
    })
}

/// `read_ops`: entries of one bucket with `after < op_id <= up_to`,
/// ascending, at most `max_ops`.
pub fn read_ops_ranges_and_limits<B: SourceBackend>(b: &B) {
    let loc = b.fresh();
    let db = open(b, &loc);
    let ids = fill(db.as_ref(), 10);
    let read = |after, up_to, max_ops| -> Vec<u64> {
        db.read_ops(&range("a[]", after, up_to, max_ops, usize::MAX))
            .expect("read ops")
            .iter()
            .map(|e| e.op_id)
            .collect()
    };
    assert_eq!(read(0, u64::MAX, usize::MAX), ids);
    assert_eq!(
        read(ids[2], ids[5], usize::MAX),
        ids[3..=5].to_vec(),
        "after excluded, up_to included"
    );
    assert_eq!(
        read(ids[2], ids[5] + 1, usize::MAX),
        ids[3..=5].to_vec(),
        "other buckets' ids in range"
    );
    assert_eq!(read(0, u64::MAX, 3), ids[..3].to_vec());
    assert_eq!(read(ids[8], u64::MAX, 5), ids[9..].to_vec());
    assert!(read(ids[9], u64::MAX, 5).is_empty());
    assert!(read(ids[5], ids[5], 5).is_empty(), "an empty range");
    assert!(db
        .read_ops(&range("none[]", 0, u64::MAX, 10, usize::MAX))
        .expect("read ops")
        .is_empty());
}

/// `read_ops` with `max_bytes`: the entries returned, encoded as one
/// `data` line, fit in `max_bytes` (newline included), except a single
/// entry larger than the limit, which comes alone.
pub fn read_ops_line_limit<B: SourceBackend>(b: &B) {
    let loc = b.fresh();
    let db = open(b, &loc);
    let big = |i: usize| ticket(&"x".repeat(1000 + i), i as i64);
    let ids = write(db.as_ref(), |tx| {
        (0..8)
            .map(|i| Ok(append(tx, "a[]", &format!("t{i}"), Some(&big(i)))?.0))
            .collect()
    });
    let ids: Vec<u64> = ids;
    let max_bytes = 3500;
    let mut after = 0;
    let mut seen = Vec::new();
    while seen.len() < ids.len() {
        let ops = db
            .read_ops(&range("a[]", after, u64::MAX, usize::MAX, max_bytes))
            .expect("read ops");
        assert!(!ops.is_empty(), "at least one entry while there are some");
        let mut line = DataLineWriter::new("a[]", 0).with_max_line_bytes(max_bytes);
        let fit = ops.iter().take_while(|e| line.push_entry(e)).count();
        assert!(fit >= 1);
        // A database may return more than fit (the stream measures again);
        // what it returns starts with what fits, in order.
        assert!(
            line.finished_len_bytes() <= max_bytes,
            "{} bytes",
            line.finished_len_bytes()
        );
        seen.extend(ops[..fit].iter().map(|e| e.op_id));
        after = ops[fit - 1].op_id;
    }
    assert_eq!(seen, ids);
    let alone = db
        .read_ops(&range("a[]", 0, u64::MAX, usize::MAX, 10))
        .expect("read ops");
    assert!(!alone.is_empty(), "one entry over the limit still comes");
    assert_eq!(alone[0].op_id, ids[0]);
}

/// `read_ops_into` appends the entries `read_ops` returns, byte for byte
/// as the typed encoding, within the line's limit, and returns the last
/// op id added.
pub fn read_ops_into_matches_read_ops<B: SourceBackend>(b: &B) {
    let loc = b.fresh();
    let db = open(b, &loc);
    let ids = fill(db.as_ref(), 12);
    for (after, up_to, max_ops, max_bytes) in [
        (0, u64::MAX, usize::MAX, usize::MAX),
        (ids[1], ids[7], usize::MAX, usize::MAX),
        (0, u64::MAX, 4, usize::MAX),
        (0, u64::MAX, usize::MAX, 400),
        (ids[11], u64::MAX, 3, usize::MAX),
    ] {
        let mut line = DataLineWriter::new("a[]", 0);
        let last = db
            .read_ops_into(&range("a[]", after, up_to, max_ops, max_bytes), &mut line)
            .expect("read ops into");
        let mut typed = DataLineWriter::new("a[]", 0).with_max_line_bytes(max_bytes);
        let ops = db
            .read_ops(&range("a[]", after, up_to, max_ops, max_bytes))
            .expect("read ops");
        for e in &ops {
            if !typed.push_entry(e) {
                break;
            }
        }
        assert_eq!(
            last,
            typed.last_op_id(),
            "range ({after}, {up_to}], {max_ops} ops, {max_bytes} bytes"
        );
        assert_eq!(line.last_op_id(), last);
        assert_eq!(
            String::from_utf8_lossy(&line.finish()),
            String::from_utf8_lossy(&typed.finish()),
            "the same line as the typed entries"
        );
    }
}

/// `replace_bucket_ops` (compaction) replaces one bucket's log and leaves
/// other buckets and the bucket's state alone (the service then sets the
/// count, keeping the checksum); later ops still get higher ids.
pub fn replace_bucket_ops_keeps_checksum<B: SourceBackend>(b: &B) {
    let loc = b.fresh();
    let db = open(b, &loc);
    let r = ticket("a", 1);
    write(db.as_ref(), |tx| {
        append(tx, "a[]", "t1", Some(&r))?;
        append(tx, "a[]", "t2", Some(&r))?;
        append(tx, "other[]", "t1", Some(&r))?;
        append(tx, "a[]", "t1", Some(&r))?;
        append(tx, "a[]", "t2", None)?;
        Ok(())
    });
    let (last, sum, count) = checkpoint_of(db.as_ref(), "a[]");
    assert_eq!(count, 4);
    let other = all_ops(db.as_ref(), "other[]");
    let entries = write(db.as_ref(), |tx| tx.bucket_ops("a[]"));
    let compacted = ferry_protocol::compact(&entries);
    assert!(compacted.len() < entries.len());
    write(db.as_ref(), |tx| tx.replace_bucket_ops("a[]", &compacted));
    assert_eq!(all_ops(db.as_ref(), "a[]"), compacted);
    assert_eq!(
        checkpoint_of(db.as_ref(), "a[]"),
        (last, sum, count),
        "the state is the caller's"
    );
    write(db.as_ref(), |tx| {
        let state = tx.bucket_state("a[]")?.expect("bucket state");
        assert_eq!((state.checksum, state.count, state.last_op_id), (sum, count, last));
        tx.set_bucket_state(
            "a[]",
            &BucketState {
                count: compacted.len() as u64,
                ..state
            },
        )
    });
    assert_eq!(checkpoint_of(db.as_ref(), "a[]"), (last, sum, compacted.len() as u64));
    assert_eq!(all_ops(db.as_ref(), "other[]"), other);
    let (next, _) = write(db.as_ref(), |tx| append(tx, "a[]", "t3", Some(&r)));
    assert!(next > last, "op id {next} after compaction is above {last}");
}

/// `migrate` creates the schema's tables and adds new columns to existing
/// ones, keeping their rows (the new column reads NULL).
pub fn migrate_adds_tables_and_columns<B: SourceBackend>(b: &B) {
    let loc = b.fresh();
    let db = open(b, &loc);
    let notes = table("notes");
    let note: RowData = [("body".to_owned(), Value::Text("kept".into()))].into_iter().collect();
    write(db.as_ref(), |tx| tx.write_row(&notes, "n1", &note, &BTreeMap::new()));
    let wider = Table::new("notes")
        .column("body", ColumnType::Text)
        .column("pinned", ColumnType::Integer);
    let extra = Table::new("labels").column("name", ColumnType::Text);
    let schema = Schema::new([tickets_table(), wider.clone(), extra.clone()]).expect("schema");
    db.migrate(&schema).expect("migrate again");
    db.migrate(&schema).expect("migrate is idempotent");
    let row = db.get_row(&wider, "n1").expect("get row").expect("row kept");
    let mut expected = note.clone();
    expected.insert("pinned".into(), Value::Null);
    assert_eq!(row.data, Some(expected));
    let label: RowData = [("name".to_owned(), Value::Text("l".into()))].into_iter().collect();
    write(db.as_ref(), |tx| tx.write_row(&extra, "l1", &label, &BTreeMap::new()));
    assert_eq!(
        db.get_row(&extra, "l1").expect("get row").and_then(|r| r.data),
        Some(label)
    );
}

/// Everything committed is there after the database is dropped and
/// opened again at the same location.
pub fn everything_survives_reopen<B: SourceBackend>(b: &B) {
    let loc = b.fresh();
    let t = table("tickets");
    let r = ticket("durable", 1);
    let (cp, ops) = {
        let db = open(b, &loc);
        write(db.as_ref(), |tx| {
            tx.write_row(&t, "t1", &r, &clocks_of(&r, &clock(70, "a")))?;
            tx.delete_row(&t, "t2", &clock(80, "a"))?;
            tx.set_row_buckets("tickets", "t1", &BTreeSet::from(["a[]".to_owned()]))?;
            tx.set_client("c1", "u1", 5)?;
            tx.record_outcome("c1", 5, 9, &Outcome::Applied)?;
            append(tx, "a[]", "t1", Some(&r))?;
            append(tx, "a[]", "t2", None)
        });
        (
            db.checkpoint("c1", &["a[]".to_owned()]).expect("checkpoint"),
            all_ops(db.as_ref(), "a[]"),
        )
    };
    let db = open(b, &loc);
    assert_eq!(db.checkpoint("c1", &["a[]".to_owned()]).expect("checkpoint"), cp);
    assert_eq!(all_ops(db.as_ref(), "a[]"), ops);
    assert_eq!(db.get_row(&t, "t1").expect("get row").and_then(|s| s.data), Some(r));
    assert_eq!(
        db.get_row(&t, "t2").expect("get row").and_then(|s| s.deleted),
        Some(clock(80, "a"))
    );
    assert_eq!(db.max_clock().expect("max clock"), Some(clock(80, "a")));
    assert_eq!(db.client_owner("c1").expect("owner").as_deref(), Some("u1"));
    write(db.as_ref(), |tx| {
        assert_eq!(tx.outcome("c1", 5)?.map(|o| o.fingerprint), Some(Some(9)));
        assert_eq!(tx.row_buckets("tickets", "t1")?, BTreeSet::from(["a[]".to_owned()]));
        Ok(())
    });
    let (next, _) = write(db.as_ref(), |tx| append(tx, "a[]", "t3", None));
    assert!(next > 2, "op id {next} continues after a reopen");
}

/// A committed write transaction notifies every subscriber, also one
/// waiting on another thread; a rolled-back one notifies nothing.
pub fn commits_are_notified<B: SourceBackend>(b: &B) {
    let loc = b.fresh();
    let db = open(b, &loc);
    let mut early = db.commits();
    early.borrow_and_update();
    let failed = db.write(&mut |tx| {
        tx.set_client("c", "u", 1)?;
        Err(SourceError::aborted(WorkFailed))
    });
    assert!(failed.is_err());
    assert!(
        !early.has_changed().expect("open channel"),
        "a rollback notifies nothing"
    );
    write(db.as_ref(), |tx| tx.set_client("c", "u", 1));
    assert!(early.has_changed().expect("open channel"), "a commit notifies");
    early.borrow_and_update();
    let mut late = db.commits();
    late.borrow_and_update();
    std::thread::scope(|s| {
        s.spawn(|| write(db.as_ref(), |tx| tx.set_client("c", "u", 2)));
    });
    assert!(early.has_changed().expect("open channel"));
    assert!(
        late.has_changed().expect("open channel"),
        "a commit on another thread notifies"
    );
}

/// Several threads run read-modify-write transactions at once (read the
/// client's last seq, write it + 1, append an op, bump a counter row):
/// no update is lost and every op id is unique.
pub fn concurrent_writers_lose_no_update<B: SourceBackend>(b: &B) {
    let loc = b.fresh();
    let db = open(b, &loc);
    let t = table("tickets");
    const THREADS: usize = 4;
    const TRANSACTIONS: usize = 25;
    std::thread::scope(|s| {
        for w in 0..THREADS {
            let (db, t) = (&db, &t);
            s.spawn(move || {
                for i in 0..TRANSACTIONS {
                    write(db.as_ref(), |tx| {
                        let seq = tx.client("shared")?.map_or(0, |p| p.last_seq);
                        tx.set_client("shared", "u", seq + 1)?;
                        let n = match tx.read_row(t, "counter")?.and_then(|r| r.data) {
                            Some(d) => match d.get("version") {
                                Some(Value::Integer(n)) => *n,
                                _ => 0,
                            },
                            None => 0,
                        };
                        let row = ticket(&format!("writer {w} op {i}"), n + 1);
                        tx.write_row(t, "counter", &row, &BTreeMap::new())?;
                        append(tx, &format!("w{w}[]"), "counter", Some(&row))?;
                        Ok(())
                    });
                }
            });
        }
    });
    let total = (THREADS * TRANSACTIONS) as u64;
    assert_eq!(
        db.checkpoint("shared", &[]).expect("checkpoint").write_checkpoint,
        Some(total)
    );
    let counter = db.get_row(&t, "counter").expect("get row").and_then(|r| r.data);
    assert_eq!(
        counter.and_then(|d| d.get("version").cloned()),
        Some(Value::Integer(total as i64))
    );
    let mut ids = BTreeSet::new();
    for w in 0..THREADS {
        for e in all_ops(db.as_ref(), &format!("w{w}[]")) {
            assert!(ids.insert(e.op_id), "op id {} allocated twice", e.op_id);
        }
    }
    assert_eq!(ids.len() as u64, total);
    assert_eq!(db.oplog_len().expect("oplog len"), total);
    assert!(db.checkpoint("shared", &[]).expect("checkpoint").last_op_id >= total);
}

/// The commit-order invariant: while several writers append, a reader
/// that has seen op N (through a checkpoint and `read_ops` up to it)
/// never later sees an op below N appear, so a stream that resumes after
/// N never skips one.
pub fn op_ids_appear_in_commit_order<B: SourceBackend>(b: &B) {
    let loc = b.fresh();
    let db = open(b, &loc);
    const THREADS: usize = 3;
    const TRANSACTIONS: usize = 30;
    let running = std::sync::atomic::AtomicUsize::new(THREADS);
    std::thread::scope(|s| {
        for w in 0..THREADS {
            let (db, running) = (&db, &running);
            s.spawn(move || {
                let r = ticket("x", w as i64);
                for i in 0..TRANSACTIONS {
                    write(db.as_ref(), |tx| {
                        for k in 0..1 + i % 3 {
                            append(tx, "a[]", &format!("w{w}-{i}-{k}"), Some(&r))?;
                        }
                        Ok(())
                    });
                }
                running.fetch_sub(1, Ordering::SeqCst);
            });
        }
        let mut seen: BTreeSet<u64> = BTreeSet::new();
        let mut high = 0;
        loop {
            let finished = running.load(Ordering::SeqCst) == 0;
            let cp = db.checkpoint("c", &["a[]".to_owned()]).expect("checkpoint");
            assert!(
                cp.last_op_id >= high,
                "the last op id went back from {high} to {}",
                cp.last_op_id
            );
            let ops = db
                .read_ops(&range("a[]", 0, cp.last_op_id, usize::MAX, usize::MAX))
                .expect("read ops");
            for e in &ops {
                if e.op_id <= high {
                    assert!(
                        seen.contains(&e.op_id),
                        "op {} appeared after the reader had seen op {high}",
                        e.op_id
                    );
                }
            }
            seen.extend(ops.iter().map(|e| e.op_id));
            assert_eq!(
                ops.len() as u64,
                cp.buckets[0].count,
                "the checkpoint's count of ops is readable"
            );
            high = high.max(cp.last_op_id);
            if finished {
                break;
            }
        }
        assert_eq!(
            seen.len(),
            (0..TRANSACTIONS).map(|i| 1 + i % 3).sum::<usize>() * THREADS
        );
    });
}
