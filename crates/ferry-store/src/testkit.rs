//! The conformance suite every [`Store`] backend runs (feature `testkit`).
//!
//! A backend implements [`Backend`] (how to make a fresh location and open
//! a store there) and calls [`conformance_tests!`](crate::conformance_tests)
//! in an integration test; that expands to one `#[test]` per behaviour, each
//! calling the public function of the same name here. A few apply the
//! same batches to the backend and to [`MemoryStore`] and compare
//! everything readable ([`dump`]). The last one is a model test: random
//! sequences of batches, reads and reopens checked against a plain
//! in-memory model, with a printed, replayable seed.

use std::collections::BTreeMap;
use std::ops::Bound;

use ferry_core::{row_data, ColumnType, CrudEntry, CrudOp, RowData, Schema, Table, Value};
use proptest::prelude::*;

use crate::{BatchOp, BucketEntry, BucketState, MemoryStore, OverlayEntry, Store, StoreError, StoreResult, WriteBatch};

#[path = "testkit_staging.rs"]
mod staging;
pub use staging::{
    bad_staged_ops_are_refused, deleting_staged_ops_keeps_every_other_op, failed_switch_in_changes_nothing,
    large_switch_in_matches_memory_store, staged_ops_are_discarded_and_survive_reopen,
    staged_ops_are_invisible_to_reads, staged_summaries_match_the_ops, switch_in_applies_the_staged_range,
    switch_in_keeps_newer_values_of_a_row_another_bucket_holds,
};

/// How the suite makes and reopens stores of one backend.
pub trait Backend {
    /// A place a store lives (a temporary directory, a shared handle). The
    /// store's data lives as long as the location.
    type Location;
    /// The store type.
    type Store: Store + 'static;
    /// A new, empty location.
    fn fresh(&self) -> Self::Location;
    /// Open (or reopen) the store at a location with a schema. The previous
    /// store opened there has been dropped.
    fn open(&self, location: &Self::Location, schema: Schema) -> StoreResult<Self::Store>;
}

/// Expand to one `#[test]` per conformance behaviour for a backend value.
#[macro_export]
macro_rules! conformance_tests {
    ($backend:expr) => {
        $crate::conformance_tests!(@each $backend;
            synced_rows_put_get_delete,
            scans_are_ordered_by_id,
            index_scans_follow_value_order,
            index_entries_follow_updates_and_deletes,
            limited_index_scans_match_full_scans,
            overlay_shapes_the_visible_state,
            queue_keeps_order_and_completes,
            queue_refuses_out_of_order_appends,
            failed_batch_changes_nothing,
            bucket_entries_and_state,
            metadata_round_trips,
            everything_survives_reopen,
            reopen_with_new_index_rebuilds_it,
            unknown_names_are_errors,
            large_batch_applies_atomically,
            matches_memory_store_on_mixed_batches,
            reads_with_limits_match_memory_store,
            index_ranges_match_memory_store,
            staged_ops_are_invisible_to_reads,
            switch_in_applies_the_staged_range,
            switch_in_keeps_newer_values_of_a_row_another_bucket_holds,
            failed_switch_in_changes_nothing,
            bad_staged_ops_are_refused,
            staged_ops_are_discarded_and_survive_reopen,
            deleting_staged_ops_keeps_every_other_op,
            staged_summaries_match_the_ops,
            large_switch_in_matches_memory_store,
            model_test
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

/// The schema the suite uses: tickets with indexes on text, integer and
/// real columns and a two-column index, and a plain notes table.
pub fn test_schema() -> Schema {
    Schema::new([tickets_table(), Table::new("notes").column("body", ColumnType::Text)])
        .expect("the suite's schema is valid")
}

fn tickets_table() -> Table {
    Table::new("tickets")
        .column("title", ColumnType::Text)
        .column("status", ColumnType::Text)
        .column("version", ColumnType::Integer)
        .column("score", ColumnType::Real)
        .index("by_status", &["status"])
        .index("by_version", &["version"])
        .index("by_score", &["score"])
        .index("by_status_version", &["status", "version"])
}

fn open<B: Backend>(b: &B, loc: &B::Location) -> B::Store {
    b.open(loc, test_schema()).expect("open store")
}

/// A row of the suite's tickets table: every column set, derived from
/// `status` and `version`.
pub fn ticket(status: &str, version: i64) -> RowData {
    row_data([
        ("title", Value::from(format!("{status}-{version}"))),
        ("status", Value::from(status)),
        ("version", Value::from(version)),
        ("score", Value::from(version as f64 / 2.0)),
    ])
}

/// A queue entry putting [`ticket`]`("pending", seq)` as row `id`, with
/// metadata and an HLC timestamp.
pub fn put_entry(seq: u64, tx_id: u64, id: &str) -> CrudEntry {
    CrudEntry {
        seq,
        tx_id,
        op: CrudOp::Put {
            table: "tickets".into(),
            id: id.into(),
            data: ticket("pending", seq as i64),
        },
        previous: None,
        metadata: Some(format!("m{seq}")),
        hlc: Some(ferry_core::HlcTimestamp {
            wall_ms: 1_700_000_000_000 + seq,
            counter: (seq % 3) as u32,
            node: "client-a".into(),
        }),
    }
}

fn apply(store: &dyn Store, batch: &WriteBatch) {
    store.apply(batch.clone()).expect("apply batch");
}

fn ids(rows: &[(String, RowData)]) -> Vec<&str> {
    rows.iter().map(|(id, _)| id.as_str()).collect()
}

/// Put, replace, get and delete synced rows.
pub fn synced_rows_put_get_delete<B: Backend>(b: &B) {
    let loc = b.fresh();
    let s = open(b, &loc);
    assert_eq!(s.get_synced("tickets", "a").expect("get"), None);
    apply(&s, WriteBatch::new().put_synced("tickets", "a", ticket("pending", 1)));
    assert_eq!(s.get_synced("tickets", "a").expect("get"), Some(ticket("pending", 1)));
    apply(&s, WriteBatch::new().put_synced("tickets", "a", ticket("done", 2)));
    assert_eq!(s.get_synced("tickets", "a").expect("get"), Some(ticket("done", 2)));
    // Same id in another table is another row.
    assert_eq!(s.get_synced("notes", "a").expect("get"), None);
    apply(
        &s,
        WriteBatch::new()
            .delete_synced("tickets", "a")
            .delete_synced("tickets", "missing"),
    );
    assert_eq!(s.get_synced("tickets", "a").expect("get"), None);
    // Every value type round-trips, including empty and odd ones.
    let odd = row_data([
        ("title", Value::Text(String::new())),
        ("status", Value::Null),
        ("version", Value::Integer(i64::MIN)),
        ("score", Value::Real(-0.0)),
    ]);
    apply(&s, WriteBatch::new().put_synced("tickets", "ünïcode id", odd.clone()));
    assert_eq!(s.get_synced("tickets", "ünïcode id").expect("get"), Some(odd));
}

/// Table scans return rows ordered by id, per table.
pub fn scans_are_ordered_by_id<B: Backend>(b: &B) {
    let loc = b.fresh();
    let s = open(b, &loc);
    let mut batch = WriteBatch::new();
    for id in ["m", "a", "z", "b", "aa", "A"] {
        batch.put_synced("tickets", id, ticket("x", 1));
    }
    batch.put_synced("notes", "n1", row_data([("body", Value::from("hi"))]));
    apply(&s, &batch);
    let rows = s.scan_synced("tickets").expect("scan");
    assert_eq!(ids(&rows), ["A", "a", "aa", "b", "m", "z"]);
    assert_eq!(ids(&s.scan_synced("notes").expect("scan")), ["n1"]);
}

fn load_index_fixture(s: &dyn Store) {
    let mut batch = WriteBatch::new();
    let statuses = ["done", "pending", "in_progress"];
    for i in 0..30i64 {
        let status = statuses[(i % 3) as usize];
        batch.put_synced("tickets", format!("t{i:02}"), ticket(status, (i * 7) % 11 - 5));
    }
    // NULLs sort first in every index.
    batch.put_synced("tickets", "null1", row_data([("title", Value::from("n"))]));
    apply(s, &batch);
}

type Range = (Bound<Vec<Value>>, Bound<Vec<Value>>);

fn in_range(values: &[Value], range: &Range) -> bool {
    let prefix_cmp = |p: &Vec<Value>| values[..p.len()].cmp(p);
    let lower_ok = match &range.0 {
        Bound::Unbounded => true,
        Bound::Included(p) => prefix_cmp(p).is_ge(),
        Bound::Excluded(p) => prefix_cmp(p).is_gt(),
    };
    let upper_ok = match &range.1 {
        Bound::Unbounded => true,
        Bound::Included(p) => prefix_cmp(p).is_le(),
        Bound::Excluded(p) => prefix_cmp(p).is_lt(),
    };
    lower_ok && upper_ok
}

/// What an index scan must return, computed by brute force over `rows`.
fn expected_index_scan(
    schema: &Schema,
    rows: &[(String, RowData)],
    index: &str,
    range: &Range,
) -> Vec<(String, RowData)> {
    let def = crate::index_def(schema, "tickets", index).expect("index exists");
    let mut out: Vec<(Vec<Value>, String, RowData)> = rows
        .iter()
        .map(|(id, data)| {
            let vals: Vec<Value> = def
                .columns
                .iter()
                .map(|c| data.get(c).cloned().unwrap_or(Value::Null))
                .collect();
            (vals, id.clone(), data.clone())
        })
        .filter(|(vals, _, _)| in_range(vals, range))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.cmp(&b.1)));
    out.into_iter().map(|(_, id, d)| (id, d)).collect()
}

fn index_cases() -> Vec<(&'static str, Range)> {
    use Bound::*;
    let t = |s: &str| vec![Value::from(s)];
    let i = |v: i64| vec![Value::Integer(v)];
    let r = |v: f64| vec![Value::Real(v)];
    vec![
        ("by_status", (Unbounded, Unbounded)),
        ("by_status", (Included(t("pending")), Included(t("pending")))),
        ("by_status", (Excluded(t("done")), Unbounded)),
        ("by_status", (Unbounded, Excluded(t("in_progress")))),
        ("by_status", (Included(t("zzz")), Unbounded)),
        ("by_status", (Included(vec![Value::Null]), Included(vec![Value::Null]))),
        ("by_version", (Included(i(-2)), Included(i(3)))),
        ("by_version", (Excluded(i(-2)), Excluded(i(3)))),
        ("by_version", (Included(i(3)), Included(i(-2)))),
        ("by_version", (Excluded(i(0)), Excluded(i(0)))),
        ("by_version", (Excluded(vec![Value::Null]), Unbounded)),
        ("by_score", (Included(r(-1.0)), Excluded(r(2.5)))),
        ("by_score", (Unbounded, Included(r(0.0)))),
        ("by_status_version", (Included(t("pending")), Included(t("pending")))),
        (
            "by_status_version",
            (
                Included(vec![Value::from("pending"), Value::Integer(0)]),
                Included(vec![Value::from("pending"), Value::Integer(4)]),
            ),
        ),
        (
            "by_status_version",
            (
                Excluded(vec![Value::from("done"), Value::Integer(2)]),
                Excluded(vec![Value::from("pending")]),
            ),
        ),
    ]
}

fn check_index_cases(s: &dyn Store) {
    let rows = s.scan_synced("tickets").expect("scan");
    for (index, range) in index_cases() {
        let expected = expected_index_scan(s.schema(), &rows, index, &range);
        let got = s
            .scan_synced_index("tickets", index, range.0.clone(), range.1.clone())
            .expect("index scan");
        assert_eq!(ids(&got), ids(&expected), "index {index} range {range:?}");
        assert_eq!(got, expected, "index {index} range {range:?}");
    }
}

/// Index range scans return exactly the rows in range, in value order then
/// id order, NULLs first; reversed or empty ranges return nothing.
pub fn index_scans_follow_value_order<B: Backend>(b: &B) {
    let loc = b.fresh();
    let s = open(b, &loc);
    load_index_fixture(&s);
    check_index_cases(&s);
}

/// Updating a row moves its index entries; deleting it removes them.
pub fn index_entries_follow_updates_and_deletes<B: Backend>(b: &B) {
    let loc = b.fresh();
    let s = open(b, &loc);
    load_index_fixture(&s);
    let mut batch = WriteBatch::new();
    for i in (0..30).step_by(4) {
        batch.put_synced("tickets", format!("t{i:02}"), ticket("pending", 100 + i));
    }
    for i in (1..30).step_by(5) {
        batch.delete_synced("tickets", format!("t{i:02}"));
    }
    // The same row twice in one batch: the last write wins, one index entry.
    batch.put_synced("tickets", "t02", ticket("done", 50));
    batch.put_synced("tickets", "t02", ticket("in_progress", 51));
    apply(&s, &batch);
    check_index_cases(&s);
    let hits = s
        .scan_synced_index(
            "tickets",
            "by_version",
            Bound::Included(vec![50.into()]),
            Bound::Included(vec![51.into()]),
        )
        .expect("scan");
    assert_eq!(ids(&hits), ["t02"]);
}

/// Check every limited index scan (synced and visible, both directions,
/// limits from 0 to past the end) against the full scan cut to the limit.
fn check_limited_index_cases(s: &dyn Store, phase: &str) {
    for (index, range) in index_cases() {
        let full_synced = s
            .scan_synced_index("tickets", index, range.0.clone(), range.1.clone())
            .expect("index scan");
        let full_visible = s
            .scan_visible_index("tickets", index, range.0.clone(), range.1.clone())
            .expect("visible index scan");
        let most = full_synced.len().max(full_visible.len());
        let mut limits = vec![0, 1, 2, 3, 5, most.saturating_sub(1), most, most + 1, usize::MAX];
        limits.sort_unstable();
        limits.dedup();
        for reverse in [false, true] {
            for &limit in &limits {
                let cut = |rows: &[(String, RowData)]| {
                    let mut rows = rows.to_vec();
                    if reverse {
                        rows.reverse();
                    }
                    rows.truncate(limit);
                    rows
                };
                let what = format!("{phase}: index {index} range {range:?} reverse {reverse} limit {limit}");
                let got = s
                    .scan_synced_index_limited("tickets", index, range.0.clone(), range.1.clone(), reverse, limit)
                    .expect("limited index scan");
                assert_eq!(ids(&got), ids(&cut(&full_synced)), "synced, {what}");
                assert_eq!(got, cut(&full_synced), "synced, {what}");
                let got = s
                    .scan_visible_index_limited("tickets", index, range.0.clone(), range.1.clone(), reverse, limit)
                    .expect("limited visible index scan");
                assert_eq!(ids(&got), ids(&cut(&full_visible)), "visible, {what}");
                assert_eq!(got, cut(&full_visible), "visible, {what}");
            }
        }
    }
}

/// A limited index scan, from either end of the range, returns the first
/// `limit` rows of the full scan (in reverse order from the end), on the
/// synced layer and on the visible state: overlay rows inserted into the
/// range or updated within it take their place, rows the overlay moved
/// out of the range or deleted are hidden. Errors do not depend on the
/// limit.
pub fn limited_index_scans_match_full_scans<B: Backend>(b: &B) {
    let loc = b.fresh();
    let s = open(b, &loc);
    check_limited_index_cases(&s, "empty");
    load_index_fixture(&s);
    check_limited_index_cases(&s, "synced only");

    let mut batch = WriteBatch::new();
    // Updated within their range, moved into and out of ranges.
    batch
        .put_overlay("tickets", "t00", OverlayEntry::Row(ticket("done", 4)))
        .put_overlay("tickets", "t01", OverlayEntry::Row(ticket("done", -5)))
        .put_overlay("tickets", "t02", OverlayEntry::Row(ticket("pending", 2)))
        .put_overlay("tickets", "t04", OverlayEntry::Row(ticket("zzz", 100)))
        .put_overlay("tickets", "t05", OverlayEntry::Row(ticket("in_progress", -100)))
        .put_overlay("tickets", "null1", OverlayEntry::Row(ticket("pending", 0)));
    // Deleted, including rows at either end of the ranges and one the
    // synced layer does not have.
    for id in ["t03", "t07", "t10", "t29", "t28", "nope"] {
        batch.put_overlay("tickets", id, OverlayEntry::Deleted);
    }
    // New rows, at the ends of the ranges and between synced rows.
    batch
        .put_overlay("tickets", "new1", OverlayEntry::Row(ticket("pending", -5)))
        .put_overlay("tickets", "new2", OverlayEntry::Row(ticket("pending", 5)))
        .put_overlay("tickets", "new3", OverlayEntry::Row(ticket("done", 0)))
        .put_overlay(
            "tickets",
            "new4",
            OverlayEntry::Row(row_data([("title", Value::from("n"))])),
        )
        .put_overlay("tickets", "a", OverlayEntry::Row(ticket("aaa", -1000)));
    apply(&s, &batch);
    check_limited_index_cases(&s, "with overlay");

    // Every synced row overlaid: the synced layer shows nothing visible.
    let mut batch = WriteBatch::new();
    for (id, _) in s.scan_synced("tickets").expect("scan") {
        batch.put_overlay("tickets", id, OverlayEntry::Deleted);
    }
    apply(&s, &batch);
    check_limited_index_cases(&s, "everything overlaid");

    for reverse in [false, true] {
        for limit in [0, 5] {
            let err = s
                .scan_visible_index_limited("tickets", "nope", Bound::Unbounded, Bound::Unbounded, reverse, limit)
                .expect_err("unknown index");
            assert!(matches!(err, StoreError::UnknownIndex { .. }), "{err}");
            let err = s
                .scan_synced_index_limited("nope", "by_status", Bound::Unbounded, Bound::Unbounded, reverse, limit)
                .expect_err("unknown table");
            assert!(matches!(err, StoreError::UnknownTable(_)), "{err}");
            let err = s
                .scan_synced_index_limited(
                    "tickets",
                    "by_status",
                    Bound::Included(vec![Value::from("a"), Value::from("b")]),
                    Bound::Unbounded,
                    reverse,
                    limit,
                )
                .expect_err("bound too long");
            assert!(matches!(err, StoreError::BadRange { .. }), "{err}");
        }
    }
}

/// Overlay entries shadow synced rows in every visible read; a deletion
/// marker hides the synced row; removing the overlay shows it again.
pub fn overlay_shapes_the_visible_state<B: Backend>(b: &B) {
    let loc = b.fresh();
    let s = open(b, &loc);
    let mut batch = WriteBatch::new();
    for (id, v) in [("a", 1), ("b", 2), ("c", 3)] {
        batch.put_synced("tickets", id, ticket("pending", v));
    }
    apply(&s, &batch);
    let mut batch = WriteBatch::new();
    batch
        .put_overlay("tickets", "a", OverlayEntry::Row(ticket("done", 10)))
        .put_overlay("tickets", "b", OverlayEntry::Deleted)
        .put_overlay("tickets", "new", OverlayEntry::Row(ticket("pending", 0)));
    apply(&s, &batch);

    assert_eq!(s.get_synced("tickets", "a").expect("get"), Some(ticket("pending", 1)));
    assert_eq!(s.get_visible("tickets", "a").expect("get"), Some(ticket("done", 10)));
    assert_eq!(s.get_visible("tickets", "b").expect("get"), None);
    assert_eq!(s.get_overlay("tickets", "b").expect("get"), Some(OverlayEntry::Deleted));
    assert_eq!(s.get_visible("tickets", "c").expect("get"), Some(ticket("pending", 3)));
    assert_eq!(
        s.get_visible("tickets", "new").expect("get"),
        Some(ticket("pending", 0))
    );
    assert_eq!(ids(&s.scan_visible("tickets").expect("scan")), ["a", "c", "new"]);
    let overlay = s.scan_overlay("tickets").expect("scan");
    assert_eq!(
        overlay.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>(),
        ["a", "b", "new"]
    );

    let pending = s
        .scan_visible_index(
            "tickets",
            "by_status",
            Bound::Included(vec!["pending".into()]),
            Bound::Included(vec!["pending".into()]),
        )
        .expect("scan");
    assert_eq!(ids(&pending), ["c", "new"]);
    let by_version = s
        .scan_visible_index("tickets", "by_version", Bound::Unbounded, Bound::Unbounded)
        .expect("scan");
    assert_eq!(ids(&by_version), ["new", "c", "a"]);

    apply(
        &s,
        WriteBatch::new()
            .delete_overlay("tickets", "a")
            .delete_overlay("tickets", "b"),
    );
    assert_eq!(s.get_visible("tickets", "a").expect("get"), Some(ticket("pending", 1)));
    assert_eq!(ids(&s.scan_visible("tickets").expect("scan")), ["a", "b", "c", "new"]);
}

/// Queue entries come back in seq order from any position, limits hold,
/// and completing removes exactly the entries through a seq.
pub fn queue_keeps_order_and_completes<B: Backend>(b: &B) {
    let loc = b.fresh();
    let s = open(b, &loc);
    assert_eq!(s.queue_len().expect("len"), 0);
    assert!(s.queue_from(0, 10).expect("read").is_empty());
    let mut batch = WriteBatch::new();
    for seq in 1..=5 {
        batch.append_queue(put_entry(seq, 1, &format!("r{seq}")));
    }
    apply(&s, &batch);
    let mut batch = WriteBatch::new();
    batch.append_queue(CrudEntry {
        seq: 7,
        tx_id: 2,
        op: CrudOp::Delete {
            table: "tickets".into(),
            id: "r1".into(),
        },
        previous: Some(ticket("pending", 1)),
        metadata: None,
        hlc: None,
    });
    batch.append_queue(CrudEntry {
        seq: 300,
        tx_id: 2,
        op: CrudOp::Patch {
            table: "tickets".into(),
            id: "r2".into(),
            data: row_data([("status", Value::from("done"))]),
        },
        previous: None,
        metadata: None,
        hlc: None,
    });
    apply(&s, &batch);
    assert_eq!(s.queue_len().expect("len"), 7);
    let all = s.queue_from(0, 100).expect("read");
    assert_eq!(all.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2, 3, 4, 5, 7, 300]);
    assert_eq!(all[0], put_entry(1, 1, "r1"));
    assert_eq!(all[5].previous, Some(ticket("pending", 1)));
    let page = s.queue_from(4, 2).expect("read");
    assert_eq!(page.iter().map(|e| e.seq).collect::<Vec<_>>(), [4, 5]);
    let page = s.queue_from(6, 1).expect("read");
    assert_eq!(page.iter().map(|e| e.seq).collect::<Vec<_>>(), [7]);
    apply(&s, WriteBatch::new().complete_queue(5));
    assert_eq!(s.queue_len().expect("len"), 2);
    assert_eq!(
        s.queue_from(0, 100)
            .expect("read")
            .iter()
            .map(|e| e.seq)
            .collect::<Vec<_>>(),
        [7, 300]
    );
    apply(&s, WriteBatch::new().complete_queue(4));
    assert_eq!(s.queue_len().expect("len"), 2);
    apply(&s, WriteBatch::new().complete_queue(u64::MAX >> 1));
    assert_eq!(s.queue_len().expect("len"), 0);
}

/// An append whose seq is not after the queue's last seq is refused.
pub fn queue_refuses_out_of_order_appends<B: Backend>(b: &B) {
    let loc = b.fresh();
    let s = open(b, &loc);
    apply(&s, WriteBatch::new().append_queue(put_entry(10, 1, "a")));
    for seqs in [vec![10], vec![9], vec![11, 11], vec![12, 11]] {
        let mut batch = WriteBatch::new();
        for seq in &seqs {
            batch.append_queue(put_entry(*seq, 2, "b"));
        }
        let err = s.apply(batch).expect_err("out of order append refused");
        assert!(matches!(err, StoreError::QueueOrder { .. }), "{seqs:?}: {err}");
    }
    assert_eq!(s.queue_len().expect("len"), 1);
}

/// Snapshot of everything a store holds, for "nothing changed" checks.
fn snapshot(s: &dyn Store) -> String {
    let mut out = String::new();
    for t in ["tickets", "notes"] {
        out += &format!("{t} synced {:?}\n", s.scan_synced(t).expect("scan"));
        out += &format!("{t} overlay {:?}\n", s.scan_overlay(t).expect("scan"));
    }
    out += &format!("queue {:?}\n", s.queue_from(0, usize::MAX).expect("queue"));
    for (name, state) in s.buckets().expect("buckets") {
        out += &format!("bucket {name} {state:?} {:?}\n", all_entries(s, &name));
    }
    for k in ["k1", "k2"] {
        out += &format!("meta {k} {:?}\n", s.get_meta(k).expect("meta"));
    }
    let idx = s
        .scan_synced_index("tickets", "by_status_version", Bound::Unbounded, Bound::Unbounded)
        .expect("index");
    out += &format!("index {:?}\n", ids(&idx));
    out
}

fn every_kind_of_write(seq: u64) -> WriteBatch {
    let mut batch = WriteBatch::new();
    batch
        .put_synced("tickets", "x", ticket("done", 9))
        .delete_synced("tickets", "a")
        .put_overlay("tickets", "y", OverlayEntry::Deleted)
        .append_queue(put_entry(seq, 9, "x"))
        .complete_queue(1)
        .put_meta("k1", b"changed".to_vec());
    batch.push(BatchOp::PutBucketEntry {
        bucket: "global".into(),
        entry: BucketEntry {
            table: "tickets".into(),
            row_id: "x".into(),
            op_id: 99,
            checksum: 5,
        },
    });
    batch.push(BatchOp::PutBucketState {
        bucket: "global".into(),
        state: BucketState {
            last_op_id: 99,
            checksum: 5,
            count: 1,
        },
    });
    batch.push(BatchOp::DeleteBucket {
        bucket: "user/1".into(),
    });
    batch
}

/// A batch that fails validation (unknown table, out-of-order seq) changes
/// nothing, whatever valid writes came before the bad one.
pub fn failed_batch_changes_nothing<B: Backend>(b: &B) {
    let loc = b.fresh();
    let s = open(b, &loc);
    let mut setup = WriteBatch::new();
    setup
        .put_synced("tickets", "a", ticket("pending", 1))
        .append_queue(put_entry(1, 1, "a"))
        .append_queue(put_entry(2, 1, "b"))
        .put_meta("k1", b"v1".to_vec());
    setup.push(BatchOp::PutBucketState {
        bucket: "user/1".into(),
        state: BucketState::default(),
    });
    apply(&s, &setup);
    let before = snapshot(&s);

    let mut unknown_table = every_kind_of_write(3);
    unknown_table.put_synced("no_such_table", "z", RowData::new());
    let mut unknown_overlay = every_kind_of_write(3);
    unknown_overlay.put_overlay("nope", "z", OverlayEntry::Deleted);
    let mut bad_seq = every_kind_of_write(3);
    bad_seq.append_queue(put_entry(2, 9, "late"));
    for bad in [unknown_table, unknown_overlay, bad_seq] {
        assert!(s.apply(bad).is_err());
        assert_eq!(snapshot(&s), before);
    }
    // The same writes without the bad one go through.
    apply(&s, &every_kind_of_write(3));
    assert_ne!(snapshot(&s), before);
}

fn entry(table: &str, row_id: &str, op_id: u64) -> BucketEntry {
    BucketEntry {
        table: table.into(),
        row_id: row_id.into(),
        op_id,
        checksum: (op_id as u32).wrapping_mul(2_654_435_761),
    }
}

fn all_entries(s: &dyn Store, bucket: &str) -> Vec<BucketEntry> {
    s.bucket_entries(bucket, None, usize::MAX).expect("entries")
}

/// Bucket entries are keyed by `(bucket, table, row id)`: point lookups,
/// ordered pages after a position, replacement, removal of one entry and of
/// a whole bucket (and nothing of a bucket whose name extends it).
pub fn bucket_entries_and_state<B: Backend>(b: &B) {
    let loc = b.fresh();
    let s = open(b, &loc);
    let mut batch = WriteBatch::new();
    let layout = [
        (
            "global",
            vec![
                entry("tickets", "b", 1),
                entry("tickets", "a", 3),
                entry("notes", "z", 8),
            ],
        ),
        ("user/ann", vec![entry("tickets", "c", 2), entry("tickets", "c2", 9)]),
        ("user/ann/x", vec![entry("tickets", "c", 4)]),
    ];
    for (bucket, entries) in &layout {
        let mut state = BucketState::default();
        for e in entries {
            state.last_op_id = state.last_op_id.max(e.op_id);
            state.checksum = state.checksum.wrapping_add(e.checksum);
            state.count += 1;
            batch.push(BatchOp::PutBucketEntry {
                bucket: (*bucket).into(),
                entry: e.clone(),
            });
        }
        batch.push(BatchOp::PutBucketState {
            bucket: (*bucket).into(),
            state,
        });
    }
    apply(&s, &batch);
    let names: Vec<String> = s.buckets().expect("buckets").into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["global", "user/ann", "user/ann/x"]);
    // Ordered by (table, row id), not by op id.
    assert_eq!(
        all_entries(&s, "global"),
        vec![
            entry("notes", "z", 8),
            entry("tickets", "a", 3),
            entry("tickets", "b", 1)
        ]
    );
    assert_eq!(
        s.bucket_entries("global", Some(("notes", "z")), 1).expect("page"),
        vec![entry("tickets", "a", 3)]
    );
    assert_eq!(
        s.bucket_entries("global", Some(("tickets", "a")), 10).expect("page"),
        vec![entry("tickets", "b", 1)]
    );
    assert_eq!(
        s.bucket_entry("user/ann", "tickets", "c").expect("entry"),
        Some(entry("tickets", "c", 2))
    );
    assert_eq!(s.bucket_entry("user/ann", "tickets", "a").expect("entry"), None);
    assert_eq!(s.bucket_entry("global", "notes", "a").expect("entry"), None);
    let global_sum = [1u64, 3, 8]
        .iter()
        .fold(0u32, |acc, id| acc.wrapping_add(entry("t", "r", *id).checksum));
    assert_eq!(
        s.bucket_state("global").expect("state"),
        Some(BucketState {
            last_op_id: 8,
            checksum: global_sum,
            count: 3
        })
    );
    assert_eq!(s.bucket_state("nope").expect("state"), None);
    assert!(all_entries(&s, "nope").is_empty());

    let mut batch = WriteBatch::new();
    batch.push(BatchOp::DeleteBucketEntry {
        bucket: "global".into(),
        table: "tickets".into(),
        row_id: "a".into(),
    });
    batch.push(BatchOp::DeleteBucketEntry {
        bucket: "global".into(),
        table: "tickets".into(),
        row_id: "never".into(),
    });
    batch.push(BatchOp::PutBucketEntry {
        bucket: "global".into(),
        entry: entry("tickets", "b", 11),
    });
    batch.push(BatchOp::DeleteBucket {
        bucket: "user/ann".into(),
    });
    apply(&s, &batch);
    assert_eq!(
        all_entries(&s, "global"),
        vec![entry("notes", "z", 8), entry("tickets", "b", 11)]
    );
    assert_eq!(s.bucket_state("user/ann").expect("state"), None);
    assert!(all_entries(&s, "user/ann").is_empty());
    // A bucket whose name extends a deleted one's is untouched.
    assert_eq!(all_entries(&s, "user/ann/x"), vec![entry("tickets", "c", 4)]);
}

/// Metadata values are set, replaced and removed.
pub fn metadata_round_trips<B: Backend>(b: &B) {
    let loc = b.fresh();
    let s = open(b, &loc);
    assert_eq!(s.get_meta("k1").expect("meta"), None);
    apply(
        &s,
        WriteBatch::new().put_meta("k1", vec![]).put_meta("k2", vec![0, 255, 1]),
    );
    assert_eq!(s.get_meta("k1").expect("meta"), Some(vec![]));
    assert_eq!(s.get_meta("k2").expect("meta"), Some(vec![0, 255, 1]));
    apply(&s, WriteBatch::new().put_meta("k2", b"new".to_vec()));
    assert_eq!(s.get_meta("k2").expect("meta"), Some(b"new".to_vec()));
    let mut batch = WriteBatch::new();
    batch.push(BatchOp::DeleteMeta { key: "k2".into() });
    apply(&s, &batch);
    assert_eq!(s.get_meta("k2").expect("meta"), None);
}

/// Closing and reopening keeps every kind of data.
pub fn everything_survives_reopen<B: Backend>(b: &B) {
    let loc = b.fresh();
    let before = {
        let s = open(b, &loc);
        load_index_fixture(&s);
        apply(
            &s,
            WriteBatch::new()
                .append_queue(put_entry(1, 1, "a"))
                .put_meta("k2", b"v".to_vec()),
        );
        apply(&s, &every_kind_of_write(2));
        snapshot(&s)
    };
    let s = open(b, &loc);
    assert_eq!(snapshot(&s), before);
    check_index_cases(&s);
}

/// Reopening with an index the store has not seen builds its entries, and
/// a dropped index is gone.
pub fn reopen_with_new_index_rebuilds_it<B: Backend>(b: &B) {
    let loc = b.fresh();
    {
        let s = b
            .open(
                &loc,
                Schema::new([Table::new("tickets")
                    .column("title", ColumnType::Text)
                    .column("version", ColumnType::Integer)
                    .index("by_title", &["title"])])
                .expect("schema"),
            )
            .expect("open");
        let mut batch = WriteBatch::new();
        for i in 0..20i64 {
            batch.put_synced(
                "tickets",
                format!("t{i:02}"),
                row_data([
                    ("title", Value::from(format!("x{}", 20 - i))),
                    ("version", Value::from(i % 4)),
                ]),
            );
        }
        apply(&s, &batch);
    }
    let schema = Schema::new([Table::new("tickets")
        .column("title", ColumnType::Text)
        .column("version", ColumnType::Integer)
        .index("by_version", &["version"])])
    .expect("schema");
    let s = b.open(&loc, schema).expect("reopen");
    let hits = s
        .scan_synced_index(
            "tickets",
            "by_version",
            Bound::Included(vec![Value::from(2)]),
            Bound::Included(vec![Value::from(2)]),
        )
        .expect("scan");
    assert_eq!(ids(&hits), ["t02", "t06", "t10", "t14", "t18"]);
    assert!(matches!(
        s.scan_synced_index("tickets", "by_title", Bound::Unbounded, Bound::Unbounded),
        Err(StoreError::UnknownIndex { .. })
    ));
    // And updates after the rebuild keep the new index right.
    apply(
        &s,
        WriteBatch::new().put_synced("tickets", "t02", row_data([("version", Value::from(3))])),
    );
    let hits = s
        .scan_synced_index(
            "tickets",
            "by_version",
            Bound::Included(vec![Value::from(2)]),
            Bound::Included(vec![Value::from(2)]),
        )
        .expect("scan");
    assert_eq!(ids(&hits), ["t06", "t10", "t14", "t18"]);
}

/// Reads naming an unknown table or index, or a bound longer than the
/// index, are errors naming the bad value.
pub fn unknown_names_are_errors<B: Backend>(b: &B) {
    let loc = b.fresh();
    let s = open(b, &loc);
    let err = s.get_synced("nope", "a").expect_err("unknown table");
    assert_eq!(err.to_string(), "unknown table \"nope\"");
    assert!(s.scan_synced("nope").is_err());
    assert!(s.get_overlay("nope", "a").is_err());
    assert!(s.scan_visible("nope").is_err());
    let err = s
        .scan_synced_index("tickets", "by_nothing", Bound::Unbounded, Bound::Unbounded)
        .expect_err("unknown index");
    assert_eq!(err.to_string(), "unknown index \"by_nothing\" on table \"tickets\"");
    let err = s
        .scan_synced_index(
            "tickets",
            "by_status",
            Bound::Included(vec!["a".into(), 1.into()]),
            Bound::Unbounded,
        )
        .expect_err("bound too long");
    assert_eq!(
        err.to_string(),
        "range bound has 2 values but index \"by_status\" has 1 columns"
    );
}

/// A batch of many thousands of rows applies in one piece.
pub fn large_batch_applies_atomically<B: Backend>(b: &B) {
    let loc = b.fresh();
    let s = open(b, &loc);
    let n = 20_000i64;
    let mut batch = WriteBatch::with_capacity(n as usize + 1);
    for i in 0..n {
        batch.put_synced(
            "tickets",
            format!("{i:08}"),
            ticket(if i % 3 == 0 { "pending" } else { "done" }, i),
        );
    }
    let mut bad = batch.clone();
    bad.put_synced("nope", "x", RowData::new());
    assert!(s.apply(bad).is_err());
    assert!(s.scan_synced("tickets").expect("scan").is_empty());
    apply(&s, &batch);
    assert_eq!(s.scan_synced("tickets").expect("scan").len(), n as usize);
    let pending = s
        .scan_synced_index(
            "tickets",
            "by_status",
            Bound::Included(vec!["pending".into()]),
            Bound::Included(vec!["pending".into()]),
        )
        .expect("scan");
    assert_eq!(pending.len(), (n as usize).div_ceil(3));
}

// ----- comparisons against MemoryStore -----

/// Everything readable from a store, as comparable text: for every table
/// of its schema the synced, overlay and visible rows and, for every index,
/// the synced and visible index scans; the queue and its length; every
/// bucket with a state, with its entries; the metadata keys the suite uses.
pub fn dump(s: &dyn Store) -> String {
    let mut out = String::new();
    let tables: Vec<Table> = s.schema().tables().cloned().collect();
    for t in &tables {
        let name = t.name.as_str();
        out += &format!("{name} synced {:?}\n", s.scan_synced(name).expect("scan synced"));
        out += &format!("{name} overlay {:?}\n", s.scan_overlay(name).expect("scan overlay"));
        out += &format!("{name} visible {:?}\n", s.scan_visible(name).expect("scan visible"));
        for index in &t.indexes {
            let rows = s
                .scan_synced_index(name, &index.name, Bound::Unbounded, Bound::Unbounded)
                .expect("synced index scan");
            out += &format!("{name} index {} {rows:?}\n", index.name);
            let rows = s
                .scan_visible_index(name, &index.name, Bound::Unbounded, Bound::Unbounded)
                .expect("visible index scan");
            out += &format!("{name} index {} visible {rows:?}\n", index.name);
        }
    }
    out += &format!("queue {:?}\n", s.queue_from(0, usize::MAX).expect("queue"));
    out += &format!("queue len {}\n", s.queue_len().expect("queue len"));
    for (name, state) in s.buckets().expect("buckets") {
        out += &format!("bucket {name} {state:?} {:?}\n", all_entries(s, &name));
    }
    for k in ["", "k", "k\0x", "k1", "k2"] {
        out += &format!("meta {k:?} {:?}\n", s.get_meta(k).expect("meta"));
    }
    out
}

/// Apply a batch to both stores: both accept it, or both refuse it with the
/// same error; afterwards both hold the same.
fn apply_both(s: &dyn Store, mem: &MemoryStore, batch: &WriteBatch) {
    let got = s.apply(batch.clone()).map_err(|e| e.to_string());
    let want = mem.apply(batch.clone()).map_err(|e| e.to_string());
    assert_eq!(got, want, "backend vs memory on batch {batch:?}");
    assert_eq!(dump(s), dump(mem), "backend vs memory after batch {batch:?}");
}

/// A queue entry for the comparisons.
fn queue_entry(seq: u64) -> CrudEntry {
    put_entry(seq, seq / 2, &format!("q{seq}"))
}

/// Mixed batches (rows, overlays, queue, buckets, metadata, refused ones)
/// leave the backend holding exactly what [`MemoryStore`] holds after each
/// batch, and accept or refuse the same batches with the same errors:
/// large and extreme values, NUL bytes and non-ASCII text in ids, values,
/// bucket names and metadata keys, bucket entries without a state, and
/// buckets whose names extend a deleted one's.
pub fn matches_memory_store_on_mixed_batches<B: Backend>(b: &B) {
    mixed_batches_with_extreme_values(b);
    mixed_batches_with_odd_names(b);
}

/// The comparison on many rows, extreme counters and op ids, refused
/// batches, then on ranges of the two-column index, synced and visible.
fn mixed_batches_with_extreme_values<B: Backend>(b: &B) {
    let loc = b.fresh();
    let s = open(b, &loc);
    let mem = MemoryStore::new(test_schema());

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
    b1.append_queue(queue_entry(1))
        .append_queue(queue_entry(2))
        .append_queue(queue_entry(5));
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
    b2.append_queue(queue_entry(9));

    // Refused: out of order.
    let mut b3 = WriteBatch::new();
    b3.put_synced("tickets", "never", ticket("a", 1))
        .append_queue(queue_entry(9));
    // Refused: unknown table after valid writes.
    let mut b4 = WriteBatch::new();
    b4.delete_synced("tickets", "t003")
        .put_overlay("ghost", "x", OverlayEntry::Deleted);

    let mut b5 = WriteBatch::new();
    b5.delete_overlay("tickets", "t001").complete_queue(u64::MAX);
    b5.push(BatchOp::DeleteBucket { bucket: "b".into() });

    for batch in [&b1, &b2, &b3, &b4, &b5] {
        apply_both(&s, &mem, batch);
    }
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
        let got = s
            .scan_synced_index("tickets", "by_status_version", lo.clone(), hi.clone())
            .expect("backend scan");
        let want = mem
            .scan_synced_index("tickets", "by_status_version", lo.clone(), hi.clone())
            .expect("memory scan");
        assert_eq!(got, want, "{lo:?} {hi:?}");
        let got = s
            .scan_visible_index("tickets", "by_status_version", lo.clone(), hi.clone())
            .expect("backend scan");
        let want = mem
            .scan_visible_index("tickets", "by_status_version", lo.clone(), hi.clone())
            .expect("memory scan");
        assert_eq!(got, want, "visible {lo:?} {hi:?}");
    }
}

/// The comparison on a row put, deleted and put again in one batch, NUL
/// bytes and non-ASCII text in ids, bucket names and metadata keys, empty
/// names, an entry replaced within its batch, and a bucket with entries but
/// no state (which [`dump`] does not show, so its reads are compared).
fn mixed_batches_with_odd_names<B: Backend>(b: &B) {
    let loc = b.fresh();
    let s = open(b, &loc);
    let mem = MemoryStore::new(test_schema());

    let mut batch = WriteBatch::new();
    for i in 0..10 {
        batch.put_synced("tickets", format!("t{i}"), ticket(["a", "b"][i % 2], i as i64));
    }
    batch.put_synced("tickets", "t3", ticket("c", 30));
    batch.delete_synced("tickets", "t3");
    batch.put_synced("tickets", "t3", ticket("d", 31));
    batch.put_synced("notes", "n\0with nul", row_data([("body", Value::from("x"))]));
    batch
        .append_queue(queue_entry(1))
        .append_queue(queue_entry(2))
        .append_queue(queue_entry(3));
    batch.complete_queue(2);
    batch.append_queue(queue_entry(4));
    batch.put_meta("", vec![]).put_meta("k\0x", vec![7]);
    apply_both(&s, &mem, &batch);

    let mut batch = WriteBatch::new();
    batch.put_overlay("tickets", "t1", OverlayEntry::Deleted);
    batch.put_overlay("tickets", "zz", OverlayEntry::Row(RowData::new()));
    batch.delete_synced("tickets", "t0");
    batch.push(BatchOp::PutBucketEntry {
        bucket: "b é/1".into(),
        entry: BucketEntry {
            table: String::new(),
            row_id: String::new(),
            // The largest op id every backend stores.
            op_id: i64::MAX as u64,
            checksum: 1,
        },
    });
    batch.push(BatchOp::PutBucketState {
        bucket: "b é/1".into(),
        state: BucketState {
            last_op_id: u64::MAX,
            checksum: 1,
            count: 1,
        },
    });
    for (table, row_id, op_id) in [("tickets", "t2", 0), ("notes", "n\0with nul", 3), ("tickets", "t1", 5)] {
        batch.push(BatchOp::PutBucketEntry {
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
    batch.push(BatchOp::PutBucketEntry {
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
        batch.push(BatchOp::PutBucketEntry {
            bucket: bucket.into(),
            entry: BucketEntry {
                table: "tickets".into(),
                row_id: "t2".into(),
                op_id: 1,
                checksum: 1,
            },
        });
    }
    batch.push(BatchOp::PutBucketState {
        bucket: "b/x".into(),
        state: BucketState::default(),
    });
    batch.complete_queue(u64::MAX);
    apply_both(&s, &mem, &batch);
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
                s.bucket_entries(bucket, after, limit).expect("backend entries"),
                mem.bucket_entries(bucket, after, limit).expect("memory entries"),
                "{bucket} {after:?} {limit}"
            );
        }
    }
    for (table, row_id) in [("tickets", "t1"), ("notes", "n\0with nul"), ("notes", "n"), ("", "")] {
        for bucket in ["b", "b é/1"] {
            assert_eq!(
                s.bucket_entry(bucket, table, row_id).expect("backend entry"),
                mem.bucket_entry(bucket, table, row_id).expect("memory entry"),
                "{bucket} {table:?} {row_id:?}"
            );
        }
    }
    assert_eq!(all_entries(&s, "b").len(), 3);
    assert!(s
        .bucket_entries("b é/1", Some(("tickets", "t2")), 10)
        .expect("entries")
        .is_empty());

    // A failing batch (unknown table at the end) changes nothing.
    let mut batch = WriteBatch::new();
    batch
        .put_synced("tickets", "t5", ticket("zzz", 0))
        .put_synced("ghost", "x", RowData::new());
    apply_both(&s, &mem, &batch);

    let mut batch = WriteBatch::new();
    batch.push(BatchOp::DeleteBucket {
        bucket: "b é/1".into()
    });
    batch.push(BatchOp::DeleteBucket { bucket: "b".into() });
    batch.push(BatchOp::DeleteMeta { key: "".into() });
    apply_both(&s, &mem, &batch);
    assert!(all_entries(&s, "b").is_empty());
    assert_eq!(all_entries(&s, "b/x").len(), 1);
}

/// Reads with positions and limits (queue pages from any seq, including
/// past `i64::MAX`; bucket entry pages after any position, including ids
/// with NUL bytes and non-ASCII text; point lookups) return what
/// [`MemoryStore`] returns.
pub fn reads_with_limits_match_memory_store<B: Backend>(b: &B) {
    let loc = b.fresh();
    let s = open(b, &loc);
    let mem = MemoryStore::new(test_schema());
    let mut batch = WriteBatch::new();
    for seq in [3u64, 4, 10, 11, 12] {
        batch.append_queue(queue_entry(seq));
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
        batch.push(BatchOp::PutBucketEntry {
            bucket: "x".into(),
            entry: BucketEntry {
                table: table.into(),
                row_id: row_id.into(),
                op_id,
                checksum: 1,
            },
        });
    }
    batch.push(BatchOp::PutBucketState {
        bucket: "x".into(),
        state: BucketState::default(),
    });
    apply_both(&s, &mem, &batch);
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
            s.queue_from(from, limit).expect("backend queue"),
            mem.queue_from(from, limit).expect("memory queue"),
            "{from} {limit}"
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
            s.bucket_entries("x", after, limit).expect("backend entries"),
            mem.bucket_entries("x", after, limit).expect("memory entries"),
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
            s.bucket_entry("x", table, row_id).expect("backend entry"),
            mem.bucket_entry("x", table, row_id).expect("memory entry"),
            "{table:?} {row_id:?}"
        );
    }
    assert_eq!(s.bucket_entry("y", "tickets", "r").expect("entry"), None);
}

/// Every combination of unbounded, included and excluded bounds over
/// prefixes of the two-column index (empty, NULL, one and two values, text
/// with NUL bytes and the empty string) returns what [`MemoryStore`]
/// returns.
pub fn index_ranges_match_memory_store<B: Backend>(b: &B) {
    let loc = b.fresh();
    let s = open(b, &loc);
    let mem = MemoryStore::new(test_schema());
    let mut batch = WriteBatch::new();
    for i in 0..40i64 {
        batch.put_synced(
            "tickets",
            format!("r{i:02}"),
            ticket(["x", "y", "x\0y", ""][(i % 4) as usize], i % 7 - 3),
        );
    }
    batch.put_synced("tickets", "nulls", RowData::new());
    apply_both(&s, &mem, &batch);
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
                    let got = s
                        .scan_synced_index("tickets", "by_status_version", lo.clone(), hi.clone())
                        .expect("backend scan");
                    let want = mem
                        .scan_synced_index("tickets", "by_status_version", lo.clone(), hi.clone())
                        .expect("memory scan");
                    assert_eq!(got, want, "{lo:?} {hi:?}");
                }
            }
        }
    }
}

// ----- model test -----

/// What the model test does at one step.
#[derive(Clone, Debug)]
pub enum Step {
    /// Apply a batch (which may be invalid and must then change nothing).
    Apply(Vec<BatchOp>),
    /// Close and reopen the store.
    Reopen,
    /// Read and compare everything.
    Check,
}

/// The plain in-memory model of a store.
#[derive(Clone, Debug, Default)]
struct Model {
    synced: BTreeMap<(String, String), RowData>,
    overlay: BTreeMap<(String, String), OverlayEntry>,
    queue: BTreeMap<u64, CrudEntry>,
    /// (bucket, table, row id) -> entry
    entries: BTreeMap<(String, String, String), BucketEntry>,
    buckets: BTreeMap<String, BucketState>,
    meta: BTreeMap<String, Vec<u8>>,
}

impl Model {
    /// Apply a batch to a copy, or say it must be refused.
    fn apply(&self, batch: &[BatchOp]) -> Option<Model> {
        let mut m = self.clone();
        let mut last = m.queue.keys().next_back().copied();
        for op in batch {
            match op.clone() {
                BatchOp::PutSynced { table, id, data } => {
                    if table == "ghost" {
                        return None;
                    }
                    m.synced.insert((table, id), data);
                }
                BatchOp::DeleteSynced { table, id } => {
                    m.synced.remove(&(table, id));
                }
                BatchOp::PutOverlay { table, id, entry } => {
                    m.overlay.insert((table, id), entry);
                }
                BatchOp::DeleteOverlay { table, id } => {
                    m.overlay.remove(&(table, id));
                }
                BatchOp::AppendQueue(e) => {
                    if last.is_some_and(|l| e.seq <= l) {
                        return None;
                    }
                    last = Some(e.seq);
                    m.queue.insert(e.seq, e);
                }
                BatchOp::CompleteQueue { through_seq } => {
                    m.queue.retain(|seq, _| *seq > through_seq);
                }
                BatchOp::PutBucketEntry { bucket, entry } => {
                    m.entries
                        .insert((bucket, entry.table.clone(), entry.row_id.clone()), entry);
                }
                BatchOp::DeleteBucketEntry { bucket, table, row_id } => {
                    m.entries.remove(&(bucket, table, row_id));
                }
                BatchOp::PutBucketState { bucket, state } => {
                    m.buckets.insert(bucket, state);
                }
                BatchOp::DeleteBucket { bucket } => {
                    m.buckets.remove(&bucket);
                    m.entries.retain(|(b, _, _), _| *b != bucket);
                }
                BatchOp::PutMeta { key, value } => {
                    m.meta.insert(key, value);
                }
                BatchOp::DeleteMeta { key } => {
                    m.meta.remove(&key);
                }
                BatchOp::PutStaged { .. } | BatchOp::DeleteStaged { .. } | BatchOp::SwitchInStaged { .. } => {
                    panic!("the model test does not generate staging ops (the staging tests cover them)")
                }
            }
        }
        Some(m)
    }

    fn check(&self, s: &dyn Store) -> Result<(), TestCaseError> {
        let rows: Vec<(String, RowData)> = self
            .synced
            .iter()
            .filter(|((t, _), _)| t == "tickets")
            .map(|((_, id), d)| (id.clone(), d.clone()))
            .collect();
        prop_assert_eq!(&s.scan_synced("tickets").map_err(fail)?, &rows);
        for (id, data) in rows.iter().take(3) {
            prop_assert_eq!(s.get_synced("tickets", id).map_err(fail)?, Some(data.clone()));
        }
        let overlay: Vec<(String, OverlayEntry)> = self
            .overlay
            .iter()
            .filter(|((t, _), _)| t == "tickets")
            .map(|((_, id), e)| (id.clone(), e.clone()))
            .collect();
        prop_assert_eq!(&s.scan_overlay("tickets").map_err(fail)?, &overlay);
        for (index, range) in index_cases() {
            let expected = expected_index_scan(s.schema(), &rows, index, &range);
            let got = s
                .scan_synced_index("tickets", index, range.0.clone(), range.1.clone())
                .map_err(fail)?;
            prop_assert_eq!(got, expected, "index {} {:?}", index, range);
        }
        let queue: Vec<CrudEntry> = self.queue.values().cloned().collect();
        prop_assert_eq!(&s.queue_from(0, usize::MAX).map_err(fail)?, &queue);
        prop_assert_eq!(s.queue_len().map_err(fail)?, queue.len() as u64);
        let buckets: Vec<(String, BucketState)> = self.buckets.iter().map(|(k, v)| (k.clone(), *v)).collect();
        prop_assert_eq!(&s.buckets().map_err(fail)?, &buckets);
        for bucket in ["b1", "b2"] {
            let entries: Vec<BucketEntry> = self
                .entries
                .iter()
                .filter(|((b, _, _), _)| b == bucket)
                .map(|(_, e)| e.clone())
                .collect();
            prop_assert_eq!(&s.bucket_entries(bucket, None, usize::MAX).map_err(fail)?, &entries);
            for e in entries.iter().take(2) {
                prop_assert_eq!(
                    s.bucket_entry(bucket, &e.table, &e.row_id).map_err(fail)?,
                    Some(e.clone())
                );
            }
        }
        for key in ["m1", "m2"] {
            prop_assert_eq!(s.get_meta(key).map_err(fail)?, self.meta.get(key).cloned());
        }
        Ok(())
    }
}

fn fail(e: StoreError) -> TestCaseError {
    TestCaseError::fail(e.to_string())
}

fn batch_op_strategy() -> impl Strategy<Value = BatchOp> {
    let id = prop::sample::select(vec!["a", "b", "c", "d", "e", "f"]).prop_map(str::to_owned);
    let status = prop::sample::select(vec!["done", "pending", "in_progress"]);
    let row = (status, -3i64..3, proptest::option::of(-2.0f64..2.0)).prop_map(|(s, v, score)| {
        let mut d = row_data([("status", Value::from(s)), ("version", Value::from(v))]);
        if let Some(score) = score {
            d.insert("score".into(), Value::Real(score));
        }
        d
    });
    let table = prop::sample::select(vec!["tickets", "tickets", "tickets", "notes", "ghost"]).prop_map(str::to_owned);
    let bucket = prop::sample::select(vec!["b1", "b2"]).prop_map(str::to_owned);
    let key = prop::sample::select(vec!["m1", "m2"]).prop_map(str::to_owned);
    prop_oneof![
        4 => (table.clone(), id.clone(), row.clone()).prop_map(|(table, id, data)| {
            let data = if table == "notes" { row_data([("body", Value::from("n"))]) } else { data };
            BatchOp::PutSynced { table, id, data }
        }),
        2 => id.clone().prop_map(|id| BatchOp::DeleteSynced { table: "tickets".into(), id }),
        2 => (id.clone(), proptest::option::of(row)).prop_map(|(id, r)| BatchOp::PutOverlay {
            table: "tickets".into(),
            id,
            entry: r.map_or(OverlayEntry::Deleted, OverlayEntry::Row),
        }),
        1 => id.clone().prop_map(|id| BatchOp::DeleteOverlay { table: "tickets".into(), id }),
        3 => (0u64..40, id.clone()).prop_map(|(seq, id)| BatchOp::AppendQueue(put_entry(seq, seq / 3, &id))),
        1 => (0u64..40).prop_map(|through_seq| BatchOp::CompleteQueue { through_seq }),
        2 => (bucket.clone(), prop::sample::select(vec!["tickets", "notes"]), id.clone(), 1u64..20, any::<u32>())
            .prop_map(|(bucket, table, row_id, op_id, checksum)| BatchOp::PutBucketEntry {
                bucket,
                entry: BucketEntry { table: table.into(), row_id, op_id, checksum },
            }),
        1 => (bucket.clone(), id).prop_map(|(bucket, row_id)| BatchOp::DeleteBucketEntry {
            bucket,
            table: "tickets".into(),
            row_id,
        }),
        1 => (bucket.clone(), 0u64..20, any::<u32>()).prop_map(|(bucket, last_op_id, checksum)| BatchOp::PutBucketState {
            bucket,
            state: BucketState { last_op_id, checksum, count: last_op_id },
        }),
        1 => bucket.prop_map(|bucket| BatchOp::DeleteBucket { bucket }),
        1 => (key.clone(), proptest::collection::vec(any::<u8>(), 0..4)).prop_map(|(key, value)| BatchOp::PutMeta { key, value }),
        1 => key.prop_map(|key| BatchOp::DeleteMeta { key }),
    ]
}

/// Random steps for the model test.
pub fn steps_strategy() -> impl Strategy<Value = Vec<Step>> {
    let step = prop_oneof![
        6 => proptest::collection::vec(batch_op_strategy(), 1..6).prop_map(Step::Apply),
        1 => Just(Step::Reopen),
        2 => Just(Step::Check),
    ];
    proptest::collection::vec(step, 1..25)
}

/// Random sequences of batches, reads and close/reopen, checked against a
/// plain in-memory model after every step. A failure prints its seed.
pub fn model_test<B: Backend>(b: &B) {
    ferry_core::testkit::check("model_test", 48, steps_strategy(), |steps| {
        let loc = b.fresh();
        let mut store = Some(open(b, &loc));
        let mut model = Model::default();
        for step in steps {
            let s = store.as_ref().ok_or_else(|| TestCaseError::fail("store missing"))?;
            match step {
                Step::Apply(ops) => {
                    let result = s.apply(WriteBatch { ops: ops.clone() });
                    match model.apply(&ops) {
                        Some(next) => {
                            prop_assert!(result.is_ok(), "valid batch refused: {:?}", result);
                            model = next;
                        }
                        None => prop_assert!(result.is_err(), "invalid batch accepted"),
                    }
                    model.check(s)?;
                }
                Step::Reopen => {
                    // Close before reopening, as an app restart would.
                    drop(store.take());
                    store = Some(b.open(&loc, test_schema()).map_err(fail)?);
                }
                Step::Check => model.check(s)?,
            }
        }
        Ok(())
    });
}

/// The in-memory backend, so the suite also runs against [`MemoryStore`].
#[derive(Debug, Clone, Copy, Default)]
pub struct MemoryBackend;

impl Backend for MemoryBackend {
    type Location = crate::MemoryStore;
    type Store = crate::MemoryStore;

    fn fresh(&self) -> Self::Location {
        crate::MemoryStore::new(Schema::default())
    }

    fn open(&self, location: &Self::Location, schema: Schema) -> StoreResult<Self::Store> {
        Ok(location.reopen(schema))
    }
}
