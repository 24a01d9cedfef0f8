//! The staging area's part of the conformance suite: staged ops are
//! invisible to reads, switch in atomically, are discarded on request (as
//! after a checksum failure) and survive a reopen.

use ferry_core::{row_data, RowData, Value};

use super::{dump, open, ticket, Backend};
use crate::{
    staged_summary, BatchOp, BucketEntry, BucketState, MemoryStore, StagedKind, StagedOp, StagedSummary, Store,
    WriteBatch,
};

fn put(op_id: u64, table: &str, id: &str, data: Option<RowData>) -> StagedOp {
    StagedOp {
        op_id,
        kind: StagedKind::Put,
        table: table.into(),
        row_id: id.into(),
        data,
        checksum: op_id as u32 * 7,
    }
}

fn remove(op_id: u64, table: &str, id: &str) -> StagedOp {
    StagedOp {
        op_id,
        kind: StagedKind::Remove,
        table: table.into(),
        row_id: id.into(),
        data: None,
        checksum: op_id as u32 * 7,
    }
}

fn bare(op_id: u64, kind: StagedKind) -> StagedOp {
    StagedOp {
        op_id,
        kind,
        table: String::new(),
        row_id: String::new(),
        data: None,
        checksum: op_id as u32 * 7,
    }
}

fn note(body: &str) -> RowData {
    row_data([("body", Value::from(body))])
}

fn stage(bucket: &str, ops: &[StagedOp]) -> WriteBatch {
    let mut b = WriteBatch::new();
    for op in ops {
        b.push(BatchOp::PutStaged {
            bucket: bucket.into(),
            op: op.clone(),
        });
    }
    b
}

fn switch(bucket: &str, from_op_id: u64, through_op_id: u64) -> BatchOp {
    BatchOp::SwitchInStaged {
        bucket: bucket.into(),
        from_op_id,
        through_op_id,
    }
}

fn state(bucket: &str, last_op_id: u64) -> BatchOp {
    BatchOp::PutBucketState {
        bucket: bucket.into(),
        state: BucketState {
            last_op_id,
            checksum: 0,
            count: 0,
        },
    }
}

/// What the store shows apps, and its bucket bookkeeping (not the staging
/// area).
fn visible(s: &dyn Store) -> String {
    dump(s)
}

/// The same batches on the backend and on a [`MemoryStore`] leave the same
/// readable state, staged ops included.
fn both<B: Backend>(b: &B, loc: &B::Location, batches: &[WriteBatch]) -> (B::Store, MemoryStore) {
    let s = open(b, loc);
    let m = MemoryStore::new(super::test_schema());
    for batch in batches {
        s.apply(batch.clone()).expect("apply on the backend");
        m.apply(batch.clone()).expect("apply on the memory store");
    }
    assert_eq!(visible(&s), visible(&m), "backend and memory store differ");
    for bucket in m.staged_buckets().expect("staged buckets") {
        assert_eq!(
            s.staged_ops(&bucket, 0, usize::MAX).expect("staged"),
            m.staged_ops(&bucket, 0, usize::MAX).expect("staged"),
            "staged ops of {bucket} differ"
        );
    }
    assert_eq!(
        s.staged_buckets().expect("buckets"),
        m.staged_buckets().expect("buckets")
    );
    (s, m)
}

/// Staged ops change nothing apps can read; they come back in op id order,
/// a second staging of an op id replaces the first, and pages work.
pub fn staged_ops_are_invisible_to_reads<B: Backend>(b: &B) {
    let loc = b.fresh();
    let s = open(b, &loc);
    s.apply(WriteBatch::new().put_synced("tickets", "a", ticket("open", 1)).clone())
        .expect("setup");
    let before = visible(&s);
    let ops = [
        put(3, "tickets", "b", Some(ticket("open", 3))),
        put(1, "tickets", "a", Some(ticket("done", 9))),
        put(2, "notes", "n", Some(note("hello"))),
        remove(4, "tickets", "a"),
        put(5, "not_in_schema", "x", None),
        bare(6, StagedKind::Move),
    ];
    s.apply(stage("b1", &ops)).expect("stage");
    s.apply(stage("b0", &[put(1, "notes", "m", Some(note("zero")))]))
        .expect("stage");
    assert_eq!(visible(&s), before, "staged ops must not be visible");
    assert_eq!(s.get_visible("tickets", "b").expect("get"), None);
    let mut sorted = ops.to_vec();
    sorted.sort_by_key(|o| o.op_id);
    assert_eq!(s.staged_ops("b1", 0, usize::MAX).expect("staged"), sorted);
    assert_eq!(s.staged_ops("b1", 2, 2).expect("page"), sorted[2..4].to_vec());
    assert_eq!(s.staged_ops("b1", 6, 10).expect("past the end"), Vec::new());
    assert_eq!(s.staged_ops("b1", 0, 0).expect("limit 0"), Vec::new());
    assert_eq!(s.staged_ops("nobody", 0, 10).expect("no bucket"), Vec::new());
    assert_eq!(
        s.staged_buckets().expect("buckets"),
        vec!["b0".to_string(), "b1".to_string()]
    );
    // Staging op 3 again (a line sent twice) replaces it.
    let again = put(3, "tickets", "b", Some(ticket("open", 33)));
    s.apply(stage("b1", std::slice::from_ref(&again))).expect("restage");
    assert_eq!(s.staged_ops("b1", 2, 1).expect("staged"), vec![again]);
    let summary = staged_summary(&s, "b1", 0).expect("summary");
    assert_eq!(summary.count, 6);
    assert_eq!(summary.last_op_id, 6);
    assert_eq!(summary.clear_op_id, None);
    assert_eq!(visible(&s), before);
}

/// A switch-in applies a bucket's staged range to the synced layer (PUTs
/// put row and entry, a REMOVE takes the row away only when no bucket
/// holds it, MOVE and CLEAR do nothing, ops outside the range stay out)
/// together with the rest of its batch, exactly as the memory store does.
pub fn switch_in_applies_the_staged_range<B: Backend>(b: &B) {
    let loc = b.fresh();
    let mut setup = WriteBatch::new();
    setup
        .put_synced("tickets", "kept", ticket("open", 1))
        .put_synced("tickets", "gone", ticket("open", 2))
        .put_synced("tickets", "shared", ticket("open", 3));
    for (bucket, id) in [("b1", "kept"), ("b1", "gone"), ("b1", "shared"), ("b2", "shared")] {
        setup.push(BatchOp::PutBucketEntry {
            bucket: bucket.into(),
            entry: BucketEntry {
                table: "tickets".into(),
                row_id: id.into(),
                op_id: 1,
                checksum: 1,
            },
        });
    }
    setup.push(state("b1", 1)).push(state("b2", 1));
    let staged = stage(
        "b1",
        &[
            put(5, "tickets", "before-range", Some(ticket("open", 5))),
            put(10, "tickets", "new", Some(ticket("open", 10))),
            put(11, "tickets", "kept", Some(ticket("done", 11))),
            put(12, "notes", "n1", Some(note("one"))),
            put(13, "tickets", "new", Some(ticket("review", 13))),
            remove(14, "tickets", "gone"),
            remove(15, "tickets", "shared"),
            put(16, "elsewhere", "x", None),
            bare(17, StagedKind::Move),
            put(18, "notes", "n2", Some(note("two"))),
            remove(19, "notes", "n2"),
            put(30, "tickets", "after-range", Some(ticket("open", 30))),
        ],
    );
    let mut go = WriteBatch::new();
    go.push(state("b1", 20))
        .push(switch("b1", 10, 20))
        .put_meta("k1", b"switched".to_vec());
    let (s, _) = both(b, &loc, &[setup, staged.clone(), go]);
    let get = |id: &str| s.get_visible("tickets", id).expect("get");
    assert_eq!(get("new"), Some(ticket("review", 13)), "the last PUT of a row wins");
    assert_eq!(get("kept"), Some(ticket("done", 11)));
    assert_eq!(get("gone"), None, "a row no bucket holds leaves");
    assert_eq!(
        get("shared"),
        Some(ticket("open", 3)),
        "a row another bucket holds stays"
    );
    assert_eq!(get("before-range"), None);
    assert_eq!(get("after-range"), None);
    assert_eq!(s.get_visible("notes", "n1").expect("get"), Some(note("one")));
    assert_eq!(s.get_visible("notes", "n2").expect("get"), None);
    assert_eq!(
        s.bucket_entry("b1", "elsewhere", "x").expect("entry").map(|e| e.op_id),
        Some(16),
        "rows of tables the schema does not declare are tracked"
    );
    assert!(s.bucket_entry("b1", "tickets", "shared").expect("entry").is_none());
    assert!(s.bucket_entry("b2", "tickets", "shared").expect("entry").is_some());
    assert_eq!(s.get_meta("k1").expect("meta"), Some(b"switched".to_vec()));
    let by_status = s
        .scan_synced_index(
            "tickets",
            "by_status",
            std::ops::Bound::Included(vec![Value::from("review")]),
            std::ops::Bound::Included(vec![Value::from("review")]),
        )
        .expect("index");
    assert_eq!(
        by_status,
        vec![("new".to_string(), ticket("review", 13))],
        "indexes follow"
    );
    // The staged ops stay until deleted.
    assert_eq!(s.staged_ops("b1", 0, usize::MAX).expect("staged").len(), 12);
}

/// A row in two buckets that leaves one of them: that bucket's PUT of the
/// row is followed by a REMOVE, and the other bucket holds newer values
/// (a later op). Switching both buckets in, in either order, or only the
/// one that lost the row while the other's entry is already held, keeps
/// the newer values.
pub fn switch_in_keeps_newer_values_of_a_row_another_bucket_holds<B: Backend>(b: &B) {
    for table in ["tickets", "notes"] {
        let row = |n: i64| match table {
            "tickets" => ticket("open", n),
            _ => note(&format!("v{n}")),
        };
        // Both buckets in one checkpoint, in both orders.
        for order in [["all", "mine"], ["mine", "all"]] {
            let loc = b.fresh();
            let staged_all = stage(
                "all",
                &[put(1, table, "r", Some(row(1))), put(3, table, "r", Some(row(3)))],
            );
            let staged_mine = stage("mine", &[put(2, table, "r", Some(row(2))), remove(4, table, "r")]);
            let mut go = WriteBatch::new();
            go.push(state("all", 3)).push(state("mine", 4));
            for bucket in order {
                go.push(switch(bucket, 1, 4));
            }
            let (s, _) = both(b, &loc, &[staged_all, staged_mine, go]);
            assert_eq!(
                s.get_visible(table, "r").expect("get"),
                Some(row(3)),
                "{table}, buckets switched in as {order:?}: the newest values stay"
            );
            assert!(s.bucket_entry("mine", table, "r").expect("entry").is_none());
        }
        // The newer values were applied before; the bucket that lost the
        // row downloads from scratch.
        let loc = b.fresh();
        let mut setup = WriteBatch::new();
        setup.put_synced(table, "r", row(3)).push(BatchOp::PutBucketEntry {
            bucket: "all".into(),
            entry: BucketEntry {
                table: table.into(),
                row_id: "r".into(),
                op_id: 3,
                checksum: 21,
            },
        });
        setup.push(state("all", 3));
        let staged_mine = stage("mine", &[put(2, table, "r", Some(row(2))), remove(4, table, "r")]);
        let mut go = WriteBatch::new();
        go.push(state("mine", 4)).push(switch("mine", 1, 4));
        let (s, _) = both(b, &loc, &[setup, staged_mine, go]);
        assert_eq!(
            s.get_visible(table, "r").expect("get"),
            Some(row(3)),
            "{table}: a bucket downloaded again keeps another bucket's newer values"
        );
    }
}

/// A switch-in in a batch that fails changes nothing, and the staged ops
/// are still there to switch in later; an empty range is refused.
pub fn failed_switch_in_changes_nothing<B: Backend>(b: &B) {
    let loc = b.fresh();
    let s = open(b, &loc);
    s.apply(stage("b1", &[put(1, "tickets", "a", Some(ticket("open", 1)))]))
        .expect("stage");
    let before = visible(&s);
    let mut bad = WriteBatch::new();
    bad.push(state("b1", 1)).push(switch("b1", 1, 1));
    bad.put_synced("no_such_table", "z", RowData::new());
    assert!(s.apply(bad).is_err());
    let mut empty = WriteBatch::new();
    empty.push(switch("b1", 5, 4));
    assert!(s.apply(empty).is_err(), "an empty range is refused");
    assert_eq!(visible(&s), before);
    let mut good = WriteBatch::new();
    good.push(state("b1", 1)).push(switch("b1", 1, 1));
    s.apply(good).expect("switch in");
    assert_eq!(s.get_visible("tickets", "a").expect("get"), Some(ticket("open", 1)));
}

/// Bad staged ops are refused with an error and change nothing.
pub fn bad_staged_ops_are_refused<B: Backend>(b: &B) {
    let loc = b.fresh();
    let s = open(b, &loc);
    let bad = [
        put(1, "", "a", None),
        put(1, "tickets", "", Some(ticket("open", 1))),
        put(1, "tickets", "a", None),
        put(1, "tickets", "a", Some(row_data([("no_such_column", Value::from(1))]))),
        put(1, "not_in_schema", "a", Some(note("x"))),
        remove(1, "tickets", ""),
        StagedOp {
            data: Some(note("x")),
            ..bare(1, StagedKind::Clear)
        },
    ];
    for op in bad {
        let mut batch = stage("b1", &[put(9, "notes", "fine", Some(note("ok")))]);
        batch.push(BatchOp::PutStaged {
            bucket: "b1".into(),
            op: op.clone(),
        });
        assert!(s.apply(batch).is_err(), "{op:?} must be refused");
        assert_eq!(s.staged_buckets().expect("buckets"), Vec::<String>::new(), "{op:?}");
    }
}

/// Deleting staged ops (through an op id, or all of a bucket, as after a
/// checksum failure) leaves the others, and survives a reopen like the
/// staged ops themselves.
pub fn staged_ops_are_discarded_and_survive_reopen<B: Backend>(b: &B) {
    let loc = b.fresh();
    let ops: Vec<StagedOp> = (1..=20)
        .map(|i| {
            if i == 8 {
                bare(i, StagedKind::Clear)
            } else {
                put(i, "notes", &format!("n{i:02}"), Some(note(&format!("body {i}"))))
            }
        })
        .collect();
    let summary = {
        let s = open(b, &loc);
        s.apply(stage("b1", &ops)).expect("stage");
        s.apply(stage("b2", &ops[..3])).expect("stage");
        s.apply(stage("b3", &ops[..3])).expect("stage");
        let mut discard = WriteBatch::new();
        discard.push(BatchOp::DeleteStaged {
            bucket: "b1".into(),
            through_op_id: 5,
        });
        discard.push(BatchOp::DeleteStaged {
            bucket: "b2".into(),
            through_op_id: u64::MAX,
        });
        s.apply(discard).expect("discard");
        staged_summary(&s, "b1", 0).expect("summary")
    };
    let s = open(b, &loc);
    assert_eq!(
        s.staged_buckets().expect("buckets"),
        vec!["b1".to_string(), "b3".to_string()]
    );
    assert_eq!(s.staged_ops("b1", 0, usize::MAX).expect("staged"), ops[5..].to_vec());
    assert_eq!(staged_summary(&s, "b1", 0).expect("summary"), summary);
    let checksum_from_clear = ops[7..].iter().fold(0u32, |a, o| a.wrapping_add(o.checksum));
    assert_eq!(
        summary,
        StagedSummary {
            last_op_id: 20,
            count: 15,
            clear_op_id: Some(8),
            checksum: checksum_from_clear,
            count_since_clear: 13,
        }
    );
    assert_eq!(visible(&s), visible(&MemoryStore::new(super::test_schema())));
}

/// Deleting staged ops empties the staging area exactly when nothing else
/// is staged: ops of buckets ordered before and after the one deleted,
/// and its own ops past the op id, all stay.
pub fn deleting_staged_ops_keeps_every_other_op<B: Backend>(b: &B) {
    let loc = b.fresh();
    let s = open(b, &loc);
    let ops: Vec<StagedOp> = (1..=6)
        .map(|i| put(i, "notes", &format!("n{i}"), Some(note(&format!("body {i}")))))
        .collect();
    for bucket in ["a", "m", "z"] {
        s.apply(stage(bucket, &ops)).expect("stage");
    }
    let delete = |bucket: &str, through_op_id: u64| {
        let mut batch = WriteBatch::new();
        batch.push(BatchOp::DeleteStaged {
            bucket: bucket.into(),
            through_op_id,
        });
        s.apply(batch).expect("delete staged");
    };
    let left = |bucket: &str| s.staged_ops(bucket, 0, usize::MAX).expect("staged");
    // The middle bucket, whole: the others before and after it stay.
    delete("m", u64::MAX);
    assert_eq!(left("m"), Vec::<StagedOp>::new());
    assert_eq!(left("a"), ops);
    assert_eq!(left("z"), ops);
    // The first bucket, whole: the last stays; then the last one's ops
    // through 4: its ops 5 and 6 stay.
    delete("a", 6);
    assert_eq!(left("a"), Vec::<StagedOp>::new());
    assert_eq!(left("z"), ops);
    delete("z", 4);
    assert_eq!(left("z"), ops[4..].to_vec());
    // A bucket with nothing staged: nothing changes.
    delete("q", u64::MAX);
    assert_eq!(left("z"), ops[4..].to_vec());
    // The rest: the staging area is empty, and takes new ops again.
    delete("z", 6);
    assert_eq!(s.staged_buckets().expect("buckets"), Vec::<String>::new());
    s.apply(stage("z", &ops[..2])).expect("stage again");
    drop(s);
    let s = open(b, &loc);
    assert_eq!(s.staged_buckets().expect("buckets"), vec!["z".to_string()]);
    assert_eq!(s.staged_ops("z", 0, usize::MAX).expect("staged"), ops[..2].to_vec());
    assert_eq!(visible(&s), visible(&MemoryStore::new(super::test_schema())));
}

/// A store's own summary of a bucket's staged ops equals the one read op
/// by op: counts, the last CLEAR, and checksums summed with wrapping.
pub fn staged_summaries_match_the_ops<B: Backend>(b: &B) {
    let loc = b.fresh();
    let s = open(b, &loc);
    // Op ids with gaps, checksums near u32::MAX (sums wrap), CLEARs.
    let ops: Vec<StagedOp> = (1..=40u64)
        .map(|i| {
            let mut op = match i {
                9 | 30 => bare(i * 3, StagedKind::Clear),
                17 => bare(i * 3, StagedKind::Move),
                21 => remove(i * 3, "notes", "n03"),
                _ => put(i * 3, "notes", &format!("n{:02}", i % 7), Some(note(&format!("v{i}")))),
            };
            op.checksum = u32::MAX - (i as u32) * 1_000;
            op
        })
        .collect();
    s.apply(stage("b1", &ops)).expect("stage");
    s.apply(stage("b2", &ops[..8])).expect("stage");
    for bucket in ["b1", "b2", "b3"] {
        for after in [0, 1, 26, 27, 28, 89, 90, 91, 119, 120, 121, u64::MAX] {
            let expected = crate::staged_summary_by_pages(&s, bucket, after).expect("by pages");
            assert_eq!(
                s.staged_summary(bucket, after).expect("summary"),
                expected,
                "{bucket} after {after}"
            );
        }
    }
    let whole = s.staged_summary("b1", 0).expect("summary");
    assert_eq!((whole.count, whole.last_op_id, whole.clear_op_id), (40, 120, Some(90)));
    assert_eq!(whole.count_since_clear, 11);
    let wrapped = ops[29..].iter().fold(0u32, |a, o| a.wrapping_add(o.checksum));
    assert_eq!(whole.checksum, wrapped);
}

/// Many staged rows of a table without indexes and of one with indexes
/// switch in as the memory store switches them in.
pub fn large_switch_in_matches_memory_store<B: Backend>(b: &B) {
    let loc = b.fresh();
    let n = 5_000u64;
    // More notes than one SQLite set-based statement moves.
    let n_notes = 20_000u64;
    let notes: Vec<StagedOp> = (1..=n_notes)
        .map(|i| put(i, "notes", &format!("n{:05}", i % 12_000), Some(note(&format!("v{i}")))))
        .collect();
    let tickets: Vec<StagedOp> = (1..=n)
        .map(|i| {
            if i % 10 == 0 {
                remove(i, "tickets", &format!("t{:05}", i - 1))
            } else {
                put(
                    i,
                    "tickets",
                    &format!("t{i:05}"),
                    Some(ticket(["open", "done"][(i % 2) as usize], i as i64)),
                )
            }
        })
        .collect();
    let mut go = WriteBatch::new();
    go.push(state("notes", n_notes))
        .push(state("tickets", n))
        .push(switch("notes", 1, n_notes))
        .push(switch("tickets", 1, n));
    let (s, _) = both(b, &loc, &[stage("notes", &notes), stage("tickets", &tickets), go]);
    assert_eq!(s.scan_synced("notes").expect("scan").len(), 12_000);
    let body = s.get_synced("notes", "n00005").expect("get").expect("note");
    assert_eq!(body, note("v12005"), "the last PUT of a row wins across statements");
    assert_eq!(s.scan_synced("tickets").expect("scan").len() as u64, n - 2 * (n / 10));
}
