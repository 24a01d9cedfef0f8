//! The in-memory store: ordered maps behind one lock.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::Arc;

use ferry_core::{CrudEntry, RowData, Schema, Value};
use parking_lot::RwLock;

use crate::{
    index_key, resolve_index_range, switch_effect, validate_batch, BatchOp, BucketEntry, BucketState, OverlayEntry,
    Rows, StagedKind, StagedOp, Store, StoreResult, SwitchEffect, WriteBatch,
};

type TableRows = BTreeMap<String, RowData>;

#[derive(Debug, Default, Clone)]
struct State {
    synced: BTreeMap<String, TableRows>,
    /// table -> index -> encoded key -> row id
    indexes: BTreeMap<String, BTreeMap<String, BTreeMap<Vec<u8>, String>>>,
    overlay: BTreeMap<String, BTreeMap<String, OverlayEntry>>,
    queue: BTreeMap<u64, CrudEntry>,
    /// bucket -> (table, row id) -> entry
    bucket_entries: BTreeMap<String, BTreeMap<(String, String), BucketEntry>>,
    buckets: BTreeMap<String, BucketState>,
    meta: BTreeMap<String, Vec<u8>>,
    /// bucket -> op id -> staged op
    staged: BTreeMap<String, BTreeMap<u64, StagedOp>>,
}

/// A store that keeps everything in memory. Cloning gives another handle
/// to the same data, which is how tests "reopen" it.
#[derive(Debug, Clone)]
pub struct MemoryStore {
    schema: Arc<Schema>,
    state: Arc<RwLock<State>>,
}

impl MemoryStore {
    /// An empty store for a schema.
    pub fn new(schema: Schema) -> Self {
        MemoryStore {
            schema: Arc::new(schema),
            state: Arc::new(RwLock::new(State::default())),
        }
    }

    /// Another handle on the same data, seen through a (possibly changed)
    /// schema, as reopening a persistent store would give.
    pub fn reopen(&self, schema: Schema) -> Self {
        let store = MemoryStore {
            schema: Arc::new(schema),
            state: self.state.clone(),
        };
        store.rebuild_indexes();
        store
    }

    fn rebuild_indexes(&self) {
        let mut st = self.state.write();
        let mut indexes = BTreeMap::new();
        for table in self.schema.tables() {
            let mut per_table = BTreeMap::new();
            for index in &table.indexes {
                let mut entries = BTreeMap::new();
                if let Some(rows) = st.synced.get(&table.name) {
                    for (id, data) in rows {
                        entries.insert(index_key(index, id, data), id.clone());
                    }
                }
                per_table.insert(index.name.clone(), entries);
            }
            indexes.insert(table.name.clone(), per_table);
        }
        st.indexes = indexes;
    }

    fn unindex(&self, st: &mut State, table: &str, id: &str) {
        let Some(old) = st.synced.get(table).and_then(|t| t.get(id)).cloned() else {
            return;
        };
        let Ok(def) = self.schema.table(table) else { return };
        for index in &def.indexes {
            if let Some(entries) = st.indexes.get_mut(table).and_then(|t| t.get_mut(&index.name)) {
                entries.remove(&index_key(index, id, &old));
            }
        }
    }

    /// One op of a validated batch: it cannot fail.
    fn apply_op(&self, st: &mut State, op: BatchOp) {
        match op {
            BatchOp::PutSynced { table, id, data } => {
                self.unindex(st, &table, &id);
                if let Ok(def) = self.schema.table(&table) {
                    for index in &def.indexes {
                        st.indexes
                            .entry(table.clone())
                            .or_default()
                            .entry(index.name.clone())
                            .or_default()
                            .insert(index_key(index, &id, &data), id.clone());
                    }
                }
                st.synced.entry(table).or_default().insert(id, data);
            }
            BatchOp::DeleteSynced { table, id } => {
                self.unindex(st, &table, &id);
                if let Some(t) = st.synced.get_mut(&table) {
                    t.remove(&id);
                }
            }
            BatchOp::PutOverlay { table, id, entry } => {
                st.overlay.entry(table).or_default().insert(id, entry);
            }
            BatchOp::DeleteOverlay { table, id } => {
                if let Some(t) = st.overlay.get_mut(&table) {
                    t.remove(&id);
                }
            }
            BatchOp::AppendQueue(e) => {
                st.queue.insert(e.seq, e);
            }
            BatchOp::CompleteQueue { through_seq } => {
                st.queue = st.queue.split_off(&through_seq.saturating_add(1));
                if through_seq == u64::MAX {
                    st.queue.clear();
                }
            }
            BatchOp::PutBucketEntry { bucket, entry } => {
                let key = (entry.table.clone(), entry.row_id.clone());
                st.bucket_entries.entry(bucket).or_default().insert(key, entry);
            }
            BatchOp::DeleteBucketEntry { bucket, table, row_id } => {
                if let Some(entries) = st.bucket_entries.get_mut(&bucket) {
                    entries.remove(&(table, row_id));
                }
            }
            BatchOp::PutBucketState { bucket, state } => {
                st.buckets.insert(bucket, state);
            }
            BatchOp::DeleteBucket { bucket } => {
                st.buckets.remove(&bucket);
                st.bucket_entries.remove(&bucket);
            }
            BatchOp::PutMeta { key, value } => {
                st.meta.insert(key, value);
            }
            BatchOp::DeleteMeta { key } => {
                st.meta.remove(&key);
            }
            BatchOp::PutStaged { bucket, op } => {
                st.staged.entry(bucket).or_default().insert(op.op_id, op);
            }
            BatchOp::DeleteStaged { bucket, through_op_id } => {
                if let Some(ops) = st.staged.get_mut(&bucket) {
                    *ops = ops.split_off(&through_op_id.saturating_add(1));
                    if through_op_id == u64::MAX || ops.is_empty() {
                        st.staged.remove(&bucket);
                    }
                }
            }
            BatchOp::SwitchInStaged {
                bucket,
                from_op_id,
                through_op_id,
            } => {
                let ops: Vec<StagedOp> = st
                    .staged
                    .get(&bucket)
                    .map(|ops| {
                        ops.range(from_op_id..=through_op_id)
                            .map(|(_, op)| op.clone())
                            .collect()
                    })
                    .unwrap_or_default();
                // A PUT followed by a REMOVE of its row in this range may be
                // older than the values another bucket holds (the row left
                // this bucket and stayed in that one).
                let removes = ops.iter().any(|op| op.kind == StagedKind::Remove);
                for op in ops {
                    match switch_effect(op) {
                        SwitchEffect::Put { table, id, data, entry } => {
                            let key = (table, id);
                            let newer = removes
                                && st.bucket_entries.iter().any(|(b, entries)| {
                                    *b != bucket
                                        && st.buckets.contains_key(b)
                                        && entries.get(&key).is_some_and(|e| e.op_id > entry.op_id)
                                });
                            let (table, id) = key;
                            if let Some(data) = data.filter(|_| !newer) {
                                self.apply_op(st, BatchOp::PutSynced { table, id, data });
                            }
                            self.apply_op(
                                st,
                                BatchOp::PutBucketEntry {
                                    bucket: bucket.clone(),
                                    entry,
                                },
                            );
                        }
                        SwitchEffect::Remove { table, id } => {
                            let key = (table, id);
                            if let Some(entries) = st.bucket_entries.get_mut(&bucket) {
                                entries.remove(&key);
                            }
                            let held = st
                                .buckets
                                .keys()
                                .any(|b| st.bucket_entries.get(b).is_some_and(|e| e.contains_key(&key)));
                            if !held && self.schema.table(&key.0).is_ok() {
                                let (table, id) = key;
                                self.apply_op(st, BatchOp::DeleteSynced { table, id });
                            }
                        }
                        SwitchEffect::Nothing => {}
                    }
                }
            }
        }
    }
}

impl Store for MemoryStore {
    fn schema(&self) -> &Schema {
        &self.schema
    }

    fn apply(&self, batch: WriteBatch) -> StoreResult<()> {
        let mut st = self.state.write();
        let last = st.queue.keys().next_back().copied();
        validate_batch(&self.schema, &batch, last)?;
        for op in batch.ops {
            self.apply_op(&mut st, op);
        }
        Ok(())
    }

    fn get_synced(&self, table: &str, id: &str) -> StoreResult<Option<RowData>> {
        crate::table_def(&self.schema, table)?;
        Ok(self.state.read().synced.get(table).and_then(|t| t.get(id)).cloned())
    }

    fn scan_synced(&self, table: &str) -> StoreResult<Rows> {
        crate::table_def(&self.schema, table)?;
        Ok(self
            .state
            .read()
            .synced
            .get(table)
            .map(|t| t.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default())
    }

    fn scan_synced_index(
        &self,
        table: &str,
        index: &str,
        lower: Bound<Vec<Value>>,
        upper: Bound<Vec<Value>>,
    ) -> StoreResult<Rows> {
        let range = resolve_index_range(&self.schema, table, index, &lower, &upper)?;
        if range.is_empty() {
            return Ok(Vec::new());
        }
        let st = self.state.read();
        let Some(entries) = st.indexes.get(table).and_then(|t| t.get(index)) else {
            return Ok(Vec::new());
        };
        let lo = range.lo.map_or(Bound::Unbounded, Bound::Included);
        let hi = range.hi.map_or(Bound::Unbounded, Bound::Excluded);
        let rows = st.synced.get(table);
        Ok(entries
            .range((lo, hi))
            .filter_map(|(_, id)| rows.and_then(|r| r.get(id)).map(|d| (id.clone(), d.clone())))
            .collect())
    }

    fn scan_synced_index_limited(
        &self,
        table: &str,
        index: &str,
        lower: Bound<Vec<Value>>,
        upper: Bound<Vec<Value>>,
        reverse: bool,
        limit: usize,
    ) -> StoreResult<Rows> {
        let range = resolve_index_range(&self.schema, table, index, &lower, &upper)?;
        if range.is_empty() || limit == 0 {
            return Ok(Vec::new());
        }
        let st = self.state.read();
        let Some(entries) = st.indexes.get(table).and_then(|t| t.get(index)) else {
            return Ok(Vec::new());
        };
        let lo = range.lo.map_or(Bound::Unbounded, Bound::Included);
        let hi = range.hi.map_or(Bound::Unbounded, Bound::Excluded);
        let rows = st.synced.get(table);
        let row = |(_, id): (&Vec<u8>, &String)| rows.and_then(|r| r.get(id)).map(|d| (id.clone(), d.clone()));
        let in_range = entries.range((lo, hi));
        Ok(if reverse {
            in_range.rev().filter_map(row).take(limit).collect()
        } else {
            in_range.filter_map(row).take(limit).collect()
        })
    }

    fn get_overlay(&self, table: &str, id: &str) -> StoreResult<Option<OverlayEntry>> {
        crate::table_def(&self.schema, table)?;
        Ok(self.state.read().overlay.get(table).and_then(|t| t.get(id)).cloned())
    }

    fn scan_overlay(&self, table: &str) -> StoreResult<Vec<(String, OverlayEntry)>> {
        crate::table_def(&self.schema, table)?;
        Ok(self
            .state
            .read()
            .overlay
            .get(table)
            .map(|t| t.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default())
    }

    fn queue_from(&self, from_seq: u64, limit: usize) -> StoreResult<Vec<CrudEntry>> {
        Ok(self
            .state
            .read()
            .queue
            .range(from_seq..)
            .take(limit)
            .map(|(_, e)| e.clone())
            .collect())
    }

    fn queue_len(&self) -> StoreResult<u64> {
        Ok(self.state.read().queue.len() as u64)
    }

    fn bucket_state(&self, bucket: &str) -> StoreResult<Option<BucketState>> {
        Ok(self.state.read().buckets.get(bucket).copied())
    }

    fn buckets(&self) -> StoreResult<Vec<(String, BucketState)>> {
        Ok(self.state.read().buckets.iter().map(|(k, v)| (k.clone(), *v)).collect())
    }

    fn bucket_entry(&self, bucket: &str, table: &str, row_id: &str) -> StoreResult<Option<BucketEntry>> {
        Ok(self
            .state
            .read()
            .bucket_entries
            .get(bucket)
            .and_then(|e| e.get(&(table.to_owned(), row_id.to_owned())))
            .cloned())
    }

    fn bucket_entries(&self, bucket: &str, after: Option<(&str, &str)>, limit: usize) -> StoreResult<Vec<BucketEntry>> {
        let st = self.state.read();
        let Some(entries) = st.bucket_entries.get(bucket) else {
            return Ok(Vec::new());
        };
        let lower = match after {
            Some((t, r)) => Bound::Excluded((t.to_owned(), r.to_owned())),
            None => Bound::Unbounded,
        };
        Ok(entries
            .range((lower, Bound::Unbounded))
            .take(limit)
            .map(|(_, e)| e.clone())
            .collect())
    }

    fn get_meta(&self, key: &str) -> StoreResult<Option<Vec<u8>>> {
        Ok(self.state.read().meta.get(key).cloned())
    }

    fn staged_ops(&self, bucket: &str, after_op_id: u64, limit: usize) -> StoreResult<Vec<StagedOp>> {
        let st = self.state.read();
        Ok(st
            .staged
            .get(bucket)
            .map(|ops| {
                ops.range(after_op_id.saturating_add(1)..)
                    .take(limit)
                    .map(|(_, op)| op.clone())
                    .collect()
            })
            .unwrap_or_default())
    }

    fn staged_buckets(&self) -> StoreResult<Vec<String>> {
        Ok(self.state.read().staged.keys().cloned().collect())
    }
}
