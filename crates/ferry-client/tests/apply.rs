//! Applying validated checkpoints through `LocalDb`: which rows appear,
//! change and leave, across buckets, resets and removed buckets.

use std::sync::Arc;

use ferry_client::apply::plan_checkpoint;
use ferry_core::{row_data, ColumnType, Schema, Table, Value};
use ferry_protocol::{op_checksum, AppliedBucket, BucketApply, CheckpointApply, OpKind, OplogEntry};
use ferry_queue::LocalDb;
use ferry_store::MemoryStore;

fn store() -> LocalDb {
    let schema = Schema::new([Table::new("tickets").column("title", ColumnType::Text)]).expect("schema");
    LocalDb::open(Arc::new(MemoryStore::new(schema))).expect("open")
}

fn put(op_id: u64, id: &str, title: &str) -> OplogEntry {
    let data = row_data([("title", Value::from(title))]);
    OplogEntry {
        op_id,
        op: OpKind::Put,
        object_type: Some("tickets".into()),
        object_id: Some(id.into()),
        checksum: op_checksum(op_id, OpKind::Put, "tickets", id, Some(&data)),
        data: Some(data),
    }
}

fn remove(op_id: u64, id: &str) -> OplogEntry {
    OplogEntry {
        op_id,
        op: OpKind::Remove,
        object_type: Some("tickets".into()),
        object_id: Some(id.into()),
        data: None,
        checksum: op_checksum(op_id, OpKind::Remove, "tickets", id, None),
    }
}

fn bucket(name: &str, reset: bool, ops: Vec<OplogEntry>) -> BucketApply {
    let last = ops.last().map_or(0, |o| o.op_id);
    BucketApply {
        bucket: name.into(),
        reset,
        staged: None,
        state: AppliedBucket {
            last_op_id: last,
            checksum: ops.iter().fold(0u32, |a, o| a.wrapping_add(o.checksum)),
            count: ops.len() as u64,
        },
        ops,
    }
}

fn apply(s: &LocalDb, buckets: Vec<BucketApply>, removed: Vec<&str>) {
    let last_op_id = buckets.iter().map(|b| b.state.last_op_id).max().unwrap_or(0);
    let cp = CheckpointApply {
        last_op_id,
        write_checkpoint: None,
        buckets,
        removed_buckets: removed.into_iter().map(str::to_owned).collect(),
        hlc: None,
    };
    let (changes, touched) = plan_checkpoint(s, &cp).expect("plan");
    assert_eq!(
        touched,
        changes.rows().map(|(t, id)| (t.to_owned(), id.to_owned())).collect(),
        "the rows touched are the rows put or deleted"
    );
    s.apply_server_changes(changes, None).expect("apply");
}

fn ids(s: &LocalDb) -> Vec<String> {
    s.store()
        .scan_synced("tickets")
        .expect("scan")
        .into_iter()
        .map(|(id, _)| id)
        .collect()
}

#[test]
fn puts_and_removes_across_buckets() {
    let s = store();
    apply(
        &s,
        vec![
            bucket("global", false, vec![put(1, "a", "A"), put(2, "b", "B")]),
            bucket("mine", false, vec![put(3, "b", "B"), put(4, "c", "C")]),
        ],
        vec![],
    );
    assert_eq!(ids(&s), ["a", "b", "c"]);
    // b leaves global but mine still holds it; a leaves its only bucket.
    apply(
        &s,
        vec![bucket("global", false, vec![remove(5, "b"), remove(6, "a")])],
        vec![],
    );
    assert_eq!(ids(&s), ["b", "c"]);
    // Removing the bucket "mine" drops what only it held.
    apply(&s, vec![], vec!["mine"]);
    assert!(ids(&s).is_empty());
    assert_eq!(s.bucket_state("mine").expect("state"), None);
}

#[test]
fn a_reset_bucket_keeps_only_what_it_puts_again() {
    let s = store();
    apply(
        &s,
        vec![bucket(
            "global",
            false,
            vec![put(1, "a", "A"), put(2, "b", "B"), put(3, "c", "C")],
        )],
        vec![],
    );
    apply(
        &s,
        vec![bucket("global", true, vec![put(7, "b", "B2"), put(8, "d", "D")])],
        vec![],
    );
    assert_eq!(ids(&s), ["b", "d"]);
    assert_eq!(
        s.store().get_synced("tickets", "b").expect("get"),
        Some(row_data([("title", Value::from("B2"))]))
    );
    let entries = s.bucket_entries("global", None, 10).expect("entries");
    assert_eq!(
        entries.iter().map(|e| e.row_id.as_str()).collect::<Vec<_>>(),
        ["b", "d"]
    );
}

#[test]
fn a_remove_then_put_in_one_checkpoint_keeps_the_row() {
    let s = store();
    apply(&s, vec![bucket("global", false, vec![put(1, "a", "A")])], vec![]);
    apply(
        &s,
        vec![bucket("global", false, vec![remove(2, "a"), put(3, "a", "A3")])],
        vec![],
    );
    assert_eq!(
        s.store().get_synced("tickets", "a").expect("get"),
        Some(row_data([("title", Value::from("A3"))]))
    );
}

#[test]
fn rows_of_unknown_tables_are_tracked_but_not_stored() {
    let s = store();
    let mut op = put(1, "x", "X");
    op.object_type = Some("not_in_client_schema".into());
    apply(&s, vec![bucket("global", false, vec![op])], vec![]);
    assert!(ids(&s).is_empty());
    assert_eq!(s.bucket_entries("global", None, 10).expect("entries").len(), 1);
}

/// A row in two buckets leaves one of them: that bucket's older PUT, then
/// its REMOVE, come in the same checkpoint as the other bucket's newer PUT.
/// The newer values stay whatever order the buckets come in, and when the
/// other bucket's newer PUT was applied in an earlier checkpoint.
#[test]
fn a_row_that_leaves_one_bucket_keeps_the_newer_values_of_the_other() {
    let title = |s: &LocalDb| {
        s.store()
            .get_synced("tickets", "r")
            .expect("get")
            .and_then(|row| row.get("title").cloned())
    };
    for all_first in [true, false] {
        let s = store();
        let all = bucket("all", false, vec![put(1, "r", "v1"), put(3, "r", "v3")]);
        let mine = bucket("mine", false, vec![put(2, "r", "v2"), remove(4, "r")]);
        let buckets = if all_first { vec![all, mine] } else { vec![mine, all] };
        apply(&s, buckets, vec![]);
        assert_eq!(title(&s), Some(Value::from("v3")), "all first: {all_first}");
    }
    let s = store();
    apply(
        &s,
        vec![bucket("all", false, vec![put(1, "r", "v1"), put(3, "r", "v3")])],
        vec![],
    );
    apply(
        &s,
        vec![bucket("mine", true, vec![put(2, "r", "v2"), remove(4, "r")])],
        vec![],
    );
    assert_eq!(title(&s), Some(Value::from("v3")), "a bucket downloaded again");
}
