//! Turning a validated checkpoint into the typed changes
//! ([`ServerChanges`]) that `LocalDb::apply_server_changes` commits as one
//! store batch. The buckets and entries held are read through the
//! `LocalDb`, never from the store.

use std::collections::{BTreeMap, BTreeSet};

use ferry_protocol::{AppliedBucket, CheckpointApply, OpKind};
use ferry_queue::{LocalDb, QueueResult, ServerChanges, StagedSwitch};
use ferry_store::{BucketEntry, BucketState};

/// Rows touched by a checkpoint, by table.
pub type TouchedRows = BTreeSet<(String, String)>;

/// Convert a protocol bucket state to the store's.
pub fn to_store_state(s: AppliedBucket) -> BucketState {
    BucketState {
        last_op_id: s.last_op_id,
        checksum: s.checksum,
        count: s.count,
    }
}

/// Convert a store bucket state to the protocol's.
pub fn from_store_state(s: BucketState) -> AppliedBucket {
    AppliedBucket {
        last_op_id: s.last_op_id,
        checksum: s.checksum,
        count: s.count,
    }
}

/// A server may have columns this app version does not declare (added
/// after it shipped): the client keeps only its own, so its writes stay
/// valid.
pub(crate) fn keep_declared_columns(def: &ferry_core::Table, data: &mut ferry_core::RowData) {
    if data.keys().any(|c| def.column_def(c).is_none()) {
        data.retain(|c, _| def.column_def(c).is_some());
    }
}

/// The buckets the client holds once a checkpoint applied: those it held
/// and those the checkpoint changes, less those it removes.
fn buckets_after<'a>(
    local: &LocalDb,
    changed: impl Iterator<Item = &'a String>,
    removed: &[String],
) -> QueueResult<BTreeSet<String>> {
    let mut after: BTreeSet<String> = local.buckets()?.into_iter().map(|(n, _)| n).collect();
    after.extend(changed.cloned());
    for name in removed {
        after.remove(name);
    }
    Ok(after)
}

/// Page size when listing a bucket's entries.
const ENTRY_PAGE: usize = 10_000;

fn all_entries(local: &LocalDb, bucket: &str) -> QueueResult<Vec<BucketEntry>> {
    let mut out: Vec<BucketEntry> = Vec::new();
    loop {
        let after = out.last().map(|e| (e.table.as_str(), e.row_id.as_str()));
        let page = local.bucket_entries(bucket, after, ENTRY_PAGE)?;
        let full = page.len() == ENTRY_PAGE;
        out.extend(page);
        if !full {
            return Ok(out);
        }
    }
}

/// The changes that apply `apply` to the synced layer: rows put by
/// PUTs, rows removed when no bucket holds them any more, bucket entries
/// and states. Rows of tables the client schema does not declare are
/// tracked in bucket entries but not stored; columns it does not declare
/// are left out of the rows stored. Also returns the rows put or deleted.
///
/// Clones every row; [`plan_checkpoint_owned`] moves them instead.
pub fn plan_checkpoint(local: &LocalDb, apply: &CheckpointApply) -> QueueResult<(ServerChanges, TouchedRows)> {
    let changes = plan_checkpoint_owned(local, apply.clone())?;
    let touched = changes
        .rows()
        .map(|(table, id)| (table.to_owned(), id.to_owned()))
        .collect();
    Ok((changes, touched))
}

/// [`plan_checkpoint`] consuming `apply`: rows move into the changes. The
/// rows touched are [`ServerChanges::rows`].
pub fn plan_checkpoint_owned(local: &LocalDb, apply: CheckpointApply) -> QueueResult<ServerChanges> {
    let schema = local.schema();
    let known = |table: &str| schema.table(table).is_ok();
    let n_ops: usize = apply.buckets.iter().map(|b| b.ops.len()).sum();
    let mut changes = ServerChanges::with_capacity(2 * n_ops + 2 * apply.buckets.len() + 8);
    // Rows can only leave the synced layer through a REMOVE, a reset or a
    // removed bucket; without any, bucket membership need not be tracked.
    let may_remove = !apply.removed_buckets.is_empty()
        || apply
            .buckets
            .iter()
            .any(|b| b.reset || b.ops.iter().any(|op| op.op == OpKind::Remove));
    // (bucket, table, id) -> whether the bucket holds the row after these changes
    let mut membership: BTreeMap<(String, String, String), bool> = BTreeMap::new();
    let mut candidates: TouchedRows = BTreeSet::new();
    let mut emptied: BTreeSet<String> = BTreeSet::new();
    let buckets_after = buckets_after(local, apply.buckets.iter().map(|b| &b.bucket), &apply.removed_buckets)?;

    for b in apply.buckets {
        if b.reset {
            for e in all_entries(local, &b.bucket)? {
                membership.insert((b.bucket.clone(), e.table.clone(), e.row_id.clone()), false);
                candidates.insert((e.table, e.row_id));
            }
            changes.delete_bucket(b.bucket.clone());
            emptied.insert(b.bucket.clone());
        }
        // A row's PUT followed by its REMOVE in this bucket: the row left
        // the bucket, and a bucket it stayed in holds newer values (a
        // later op), so the PUT's values are not written.
        let last_remove: BTreeMap<(&str, &str), u64> = b
            .ops
            .iter()
            .filter(|op| op.op == OpKind::Remove)
            .filter_map(|op| Some(((op.object_type.as_deref()?, op.object_id.as_deref()?), op.op_id)))
            .collect();
        let removed_later: BTreeSet<u64> = b
            .ops
            .iter()
            .filter(|op| op.op == OpKind::Put)
            .filter(|op| {
                let key = (
                    op.object_type.as_deref().unwrap_or(""),
                    op.object_id.as_deref().unwrap_or(""),
                );
                last_remove.get(&key).is_some_and(|&removed| removed > op.op_id)
            })
            .map(|op| op.op_id)
            .collect();
        for op in b.ops {
            let (Some(table), Some(id)) = (op.object_type, op.object_id) else {
                continue; // MOVE and CLEAR carry no row
            };
            match op.op {
                OpKind::Put => {
                    if may_remove {
                        membership.insert((b.bucket.clone(), table.clone(), id.clone()), true);
                    }
                    let entry = BucketEntry {
                        table: table.clone(),
                        row_id: id.clone(),
                        op_id: op.op_id,
                        checksum: op.checksum,
                    };
                    let data = op.data.filter(|_| !removed_later.contains(&op.op_id));
                    if let (Ok(def), Some(mut data)) = (schema.table(&table), data) {
                        keep_declared_columns(def, &mut data);
                        changes.put_row(table, id, data);
                    }
                    changes.put_bucket_entry(b.bucket.clone(), entry);
                }
                OpKind::Remove => {
                    changes.delete_bucket_entry(b.bucket.clone(), table.clone(), id.clone());
                    membership.insert((b.bucket.clone(), table.clone(), id.clone()), false);
                    candidates.insert((table, id));
                }
                OpKind::Move | OpKind::Clear => {}
            }
        }
        changes.set_bucket_state(b.bucket, to_store_state(b.state));
    }
    for name in &apply.removed_buckets {
        for e in all_entries(local, name)? {
            membership.insert((name.clone(), e.table.clone(), e.row_id.clone()), false);
            candidates.insert((e.table, e.row_id));
        }
        changes.delete_bucket(name.clone());
        emptied.insert(name.clone());
    }

    // A candidate row leaves the synced layer when no bucket holds it.
    for (table, id) in candidates {
        let mut held = false;
        for bucket in &buckets_after {
            held = match membership.get(&(bucket.clone(), table.clone(), id.clone())) {
                Some(present) => *present,
                None if emptied.contains(bucket.as_str()) => false,
                None => local.bucket_entry(bucket, &table, &id)?.is_some(),
            };
            if held {
                break;
            }
        }
        if !held && known(&table) {
            changes.delete_row(table, id);
        }
    }
    Ok(changes)
}

/// The changes that apply a checkpoint whose ops are staged in the store
/// (`Download::staging_out`), with the ranges it switches in, in the
/// order it switches them: buckets reset or removed are emptied and their
/// rows that no bucket holds any more leave first, then every bucket state
/// is written, then each bucket's staged range switches in (the store puts
/// and removes the rows, so none is held here).
pub fn plan_staged_checkpoint(local: &LocalDb, apply: &CheckpointApply) -> QueueResult<ServerChanges> {
    let schema = local.schema();
    let mut changes = ServerChanges::new();
    let mut candidates: TouchedRows = BTreeSet::new();
    let mut emptied: BTreeSet<&str> = BTreeSet::new();
    let buckets_after = buckets_after(local, apply.buckets.iter().map(|b| &b.bucket), &apply.removed_buckets)?;
    let emptying = apply
        .buckets
        .iter()
        .filter(|b| b.reset)
        .map(|b| &b.bucket)
        .chain(&apply.removed_buckets);
    for name in emptying {
        for e in all_entries(local, name)? {
            candidates.insert((e.table, e.row_id));
        }
        changes.delete_bucket(name.clone());
        emptied.insert(name);
    }
    for (table, id) in candidates {
        let mut held = false;
        for bucket in buckets_after.iter().filter(|b| !emptied.contains(b.as_str())) {
            if local.bucket_entry(bucket, &table, &id)?.is_some() {
                held = true;
                break;
            }
        }
        if !held && schema.table(&table).is_ok() {
            changes.delete_row(table, id);
        }
    }
    for b in &apply.buckets {
        changes.set_bucket_state(b.bucket.clone(), to_store_state(b.state));
    }
    for b in &apply.buckets {
        if let Some(range) = b.staged {
            changes.switch_in(StagedSwitch {
                bucket: b.bucket.clone(),
                from_op_id: range.from_op_id,
                through_op_id: range.through_op_id,
            });
        }
    }
    Ok(changes)
}
