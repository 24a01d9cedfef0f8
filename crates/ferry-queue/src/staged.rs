//! Checkpoints whose rows are staged in the store: what a switch-in does
//! to rows of pending writes (to rebase them in the same batch) and to
//! everything else (to tell observers, page by page, after the commit).
//! Neither holds more than a page of staged ops in memory, plus one row
//! per row with pending writes.

use std::collections::{BTreeMap, BTreeSet};

use ferry_core::RowData;
use ferry_store::{switch_effect, BatchOp, StagedOp, SwitchEffect, WriteBatch};

use crate::{ChangeSource, ChangedRows, LocalDb, QueueResult, RowChange};

/// One bucket's staged op range a checkpoint switches in
/// ([`crate::ServerChanges::switch_in`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StagedSwitch {
    /// The bucket.
    pub bucket: String,
    /// The first op id switched in.
    pub from_op_id: u64,
    /// The last op id switched in.
    pub through_op_id: u64,
}

/// Staged ops read at once.
const PAGE_OPS: usize = 4_096;

impl LocalDb {
    /// Read `switch`'s staged ops page by page.
    fn for_each_staged(
        &self,
        switch: &StagedSwitch,
        mut f: impl FnMut(Vec<StagedOp>) -> QueueResult<()>,
    ) -> QueueResult<()> {
        let mut after = switch.from_op_id.saturating_sub(1);
        loop {
            let mut page = self.store.staged_ops(&switch.bucket, after, PAGE_OPS)?;
            let full = page.len() == PAGE_OPS;
            page.retain(|op| op.op_id <= switch.through_op_id);
            let Some(last) = page.last() else { return Ok(()) };
            after = last.op_id;
            let reached_end = last.op_id >= switch.through_op_id;
            f(page)?;
            if !full || reached_end {
                return Ok(());
            }
        }
    }

    /// The synced row each row of `queued`, and each row `batch` deletes
    /// before its switch-ins (`switches`), has after the batch, for the
    /// rows a switch-in touches: the store applies the same effects
    /// (`ferry_store::switch_effect`), so replaying them on those rows
    /// alone gives what it will hold. These rows are reported with the
    /// batch; [`LocalDb::notify_switched`] leaves them out.
    pub(crate) fn staged_rows_after(
        &self,
        batch: &WriteBatch,
        switches: &[StagedSwitch],
        queued: &ChangedRows,
    ) -> QueueResult<BTreeMap<(String, String), Option<RowData>>> {
        let mut out = BTreeMap::new();
        if switches.is_empty() {
            return Ok(out);
        }
        // Rows the batch deletes before its switch-ins.
        let deleted: BTreeSet<(String, String)> = batch
            .ops
            .iter()
            .filter_map(|op| match op {
                BatchOp::DeleteSynced { table, id } => Some((table.clone(), id.clone())),
                _ => None,
            })
            .collect();
        if queued.is_empty() && deleted.is_empty() {
            // No row to follow (an initial sync): the staged ops need not
            // be read at all.
            return Ok(out);
        }
        // The buckets after the batch, and which it empties.
        let mut buckets: BTreeSet<String> = self.store.buckets()?.into_iter().map(|(n, _)| n).collect();
        let mut emptied = BTreeSet::new();
        for op in &batch.ops {
            match op {
                BatchOp::PutBucketState { bucket, .. } => {
                    buckets.insert(bucket.clone());
                }
                BatchOp::DeleteBucket { bucket } => {
                    buckets.remove(bucket);
                    emptied.insert(bucket.clone());
                }
                _ => {}
            }
        }
        // (row) -> (buckets holding it, its row), filled on first touch.
        let mut rows: BTreeMap<(String, String), (BTreeSet<String>, Option<RowData>)> = BTreeMap::new();
        for switch in switches {
            self.for_each_staged(switch, |page| {
                for op in page {
                    let key = (op.table.clone(), op.row_id.clone());
                    if !queued.contains(&key) && !deleted.contains(&key) {
                        continue;
                    }
                    if !rows.contains_key(&key) {
                        let mut held = BTreeSet::new();
                        for b in buckets.iter().filter(|b| !emptied.contains(*b)) {
                            if self.store.bucket_entry(b, &key.0, &key.1)?.is_some() {
                                held.insert(b.clone());
                            }
                        }
                        let data = match self.store.schema().table(&key.0) {
                            Ok(_) if !deleted.contains(&key) => self.store.get_synced(&key.0, &key.1)?,
                            _ => None,
                        };
                        rows.insert(key.clone(), (held, data));
                    }
                    let Some((held, data)) = rows.get_mut(&key) else {
                        continue;
                    };
                    match switch_effect(op) {
                        SwitchEffect::Put { data: Some(row), .. } => {
                            held.insert(switch.bucket.clone());
                            *data = Some(row);
                        }
                        SwitchEffect::Put { data: None, .. } => {
                            held.insert(switch.bucket.clone());
                        }
                        SwitchEffect::Remove { .. } => {
                            held.remove(&switch.bucket);
                            if held.is_empty() {
                                *data = None;
                            }
                        }
                        SwitchEffect::Nothing => {}
                    }
                }
                Ok(())
            })?;
        }
        for (key, (_, data)) in rows {
            if self.store.schema().table(&key.0).is_ok() {
                out.insert(key, data);
            }
        }
        Ok(out)
    }

    /// After the commit of a batch with `switches`: tell observers of every
    /// row they changed, a page at a time, in the order the store applied
    /// them; rows in `reported` (those with pending writes, and those the
    /// batch deleted first, see [`LocalDb::staged_rows_after`]) were
    /// reported with the batch.
    pub(crate) fn notify_switched(
        &self,
        switches: &[StagedSwitch],
        reported: &BTreeMap<(String, String), Option<RowData>>,
        queued: &ChangedRows,
    ) -> QueueResult<()> {
        if switches.is_empty() || self.observer.read().is_none() {
            return Ok(());
        }
        if self.interest.read().as_ref().is_some_and(|wants| !wants()) {
            return Ok(());
        }
        for switch in switches {
            self.for_each_staged(switch, |page| {
                let mut changes: BTreeMap<(String, String), RowChange> = BTreeMap::new();
                for op in page {
                    let key = (op.table.clone(), op.row_id.clone());
                    if queued.contains(&key)
                        || reported.contains_key(&key)
                        || self.store.schema().table(&key.0).is_err()
                    {
                        continue;
                    }
                    let row = match switch_effect(op) {
                        SwitchEffect::Put { data, .. } => data,
                        // Another bucket may still hold it: the store says.
                        SwitchEffect::Remove { table, id } => self.store.get_synced(&table, &id)?,
                        SwitchEffect::Nothing => continue,
                    };
                    changes.insert(
                        key.clone(),
                        RowChange {
                            table: key.0,
                            id: key.1,
                            row,
                            pending: false,
                        },
                    );
                }
                let changes: Vec<RowChange> = changes.into_values().collect();
                self.notify(ChangeSource::Server, &changes);
                Ok(())
            })?;
        }
        Ok(())
    }
}
