//! The overlay's ids and index keys in memory, so a limited index scan of
//! the visible state reads only what its result needs: the overlay rows
//! among its first `limit` keys (point reads) and the synced rows before
//! them that no overlay entry shadows, never the whole overlay.
//!
//! A table is loaded on its first limited scan (one read of its overlay)
//! and then kept in step by [`OverlayIndex::apply`], through which
//! [`crate::LocalDb`] applies every batch it writes: the batch's overlay
//! ops are worked out before the store applies it and taken in only when
//! it committed. Scans and batches take the same lock, so a scan never
//! sees the store and this index disagree. Memory: per overlaid row its
//! id and one key per index of its table (no row data), bounded by the
//! pending writes, which `Limits::max_queue_entries` bounds.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;

use ferry_core::{RowData, Schema, Table, Value};
use ferry_store::{
    first_by_key, index_key, resolve_index_range, table_def, BatchOp, OverlayEntry, Rows, Store, StoreError,
    StoreResult, WriteBatch,
};
use parking_lot::Mutex;

/// The overlaid rows of one table.
#[derive(Default)]
struct TableOverlay {
    /// Every id with an overlay entry, with its row's key in each index of
    /// the table (in the table's index order; none for a delete).
    ids: HashMap<String, Vec<Vec<u8>>>,
    /// Per index of the table: key to id, for overlaid rows (not deletes).
    keys: Vec<BTreeMap<Vec<u8>, String>>,
}

impl TableOverlay {
    fn new(def: &Table) -> Self {
        TableOverlay {
            ids: HashMap::new(),
            keys: vec![BTreeMap::new(); def.indexes.len()],
        }
    }

    fn remove(&mut self, id: &str) {
        if let Some(old) = self.ids.remove(id) {
            for (keys, key) in self.keys.iter_mut().zip(old) {
                keys.remove(&key);
            }
        }
    }

    fn put(&mut self, id: &str, keys: Vec<Vec<u8>>) {
        self.remove(id);
        for (index, key) in self.keys.iter_mut().zip(&keys) {
            index.insert(key.clone(), id.to_owned());
        }
        self.ids.insert(id.to_owned(), keys);
    }
}

/// One overlay op of a batch, worked out before the batch is applied.
enum Change {
    /// An entry: the row's keys (none for a delete).
    Put {
        table: String,
        id: String,
        keys: Vec<Vec<u8>>,
    },
    Remove {
        table: String,
        id: String,
    },
}

/// A row's key in each index of its table.
fn keys_of(def: &Table, id: &str, data: &RowData) -> Vec<Vec<u8>> {
    def.indexes.iter().map(|index| index_key(index, id, data)).collect()
}

/// The overlay index of a local database's loaded tables.
#[derive(Default)]
pub(crate) struct OverlayIndex {
    tables: Mutex<HashMap<String, TableOverlay>>,
}

impl OverlayIndex {
    /// Apply `batch` to `store`, keeping the loaded tables in step: all
    /// of it or, when the store refuses it, nothing.
    pub(crate) fn apply(&self, store: &dyn Store, batch: WriteBatch) -> StoreResult<()> {
        let mut tables = self.tables.lock();
        let mut changes = Vec::new();
        for op in &batch.ops {
            match op {
                BatchOp::PutOverlay { table, id, entry } if tables.contains_key(table) => {
                    let keys = match entry {
                        OverlayEntry::Row(data) => keys_of(table_def(store.schema(), table)?, id, data),
                        OverlayEntry::Deleted => Vec::new(),
                    };
                    changes.push(Change::Put {
                        table: table.clone(),
                        id: id.clone(),
                        keys,
                    });
                }
                BatchOp::DeleteOverlay { table, id } if tables.contains_key(table) => changes.push(Change::Remove {
                    table: table.clone(),
                    id: id.clone(),
                }),
                _ => {}
            }
        }
        if let Err(e) = store.apply(batch) {
            // A failed batch applied nothing (the store's promise); should
            // a store break it (one that applies a large batch in steps),
            // the tables the batch names are read again on their next
            // scan rather than trusted.
            for change in &changes {
                let (Change::Put { table, .. } | Change::Remove { table, .. }) = change;
                tables.remove(table);
            }
            return Err(e);
        }
        for change in changes {
            match change {
                Change::Put { table, id, keys } => {
                    if let Some(t) = tables.get_mut(&table) {
                        t.put(&id, keys);
                    }
                }
                Change::Remove { table, id } => {
                    if let Some(t) = tables.get_mut(&table) {
                        t.remove(&id);
                    }
                }
            }
        }
        Ok(())
    }

    /// The first `limit` visible rows of an index range in scan order (as
    /// `Store::scan_visible_index_limited` returns them), reading the
    /// overlay rows among them by id and the synced rows up to them: at
    /// most `limit` overlay rows, and `limit` plus the overlaid synced
    /// rows of the range before the last one read (in doubling steps).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn scan_limited(
        &self,
        store: &dyn Store,
        table: &str,
        index: &str,
        lower: Bound<Vec<Value>>,
        upper: Bound<Vec<Value>>,
        reverse: bool,
        limit: usize,
    ) -> StoreResult<Rows> {
        let schema = store.schema();
        let range = resolve_index_range(schema, table, index, &lower, &upper)?;
        if limit == 0 || range.is_empty() {
            return Ok(Vec::new());
        }
        let def = table_def(schema, table)?;
        let position = def
            .indexes
            .iter()
            .position(|i| i.name == index)
            .ok_or_else(|| StoreError::UnknownIndex {
                table: table.to_owned(),
                index: index.to_owned(),
            })?;
        let mut tables = self.tables.lock();
        let t = Self::loaded(&mut tables, store, schema, table)?;
        // The overlay rows among the range's first `limit` keys.
        let lo = range.lo.map_or(Bound::Unbounded, Bound::Included);
        let hi = range.hi.map_or(Bound::Unbounded, Bound::Excluded);
        let in_range = t.keys[position].range((lo, hi));
        let picked: Vec<(&Vec<u8>, &String)> = if reverse {
            in_range.rev().take(limit).collect()
        } else {
            in_range.take(limit).collect()
        };
        // (`limit` may be `usize::MAX`: sized by what was picked.)
        let mut keyed: Vec<(Vec<u8>, String, RowData)> = Vec::with_capacity(picked.len());
        for (key, id) in picked {
            match store.get_overlay(table, id)? {
                Some(OverlayEntry::Row(data)) => keyed.push((key.clone(), id.clone(), data)),
                other => {
                    return Err(StoreError::Corrupt(format!(
                        "overlay of {table}/{id}: the store holds {} where the overlay index holds a row",
                        if other.is_some() { "a delete" } else { "nothing" }
                    )))
                }
            }
        }
        // The synced rows no overlay entry shadows, the first `limit`.
        let mut n = limit;
        loop {
            let rows = store.scan_synced_index_limited(table, index, lower.clone(), upper.clone(), reverse, n)?;
            let complete = rows.len() < n;
            let kept: Vec<(String, RowData)> = rows.into_iter().filter(|(id, _)| !t.ids.contains_key(id)).collect();
            if complete || kept.len() >= limit {
                keyed.extend(
                    kept.into_iter()
                        .take(limit)
                        .map(|(id, data)| (index_key(range.index, &id, &data), id, data)),
                );
                break;
            }
            n = n.saturating_mul(2);
        }
        Ok(first_by_key(keyed, reverse, limit))
    }

    /// Which of `ids` have an overlay entry (pending local writes shape
    /// them, deleted ones included).
    pub(crate) fn pending_among<'a>(
        &self,
        store: &dyn Store,
        table: &str,
        ids: impl IntoIterator<Item = &'a str>,
    ) -> StoreResult<Vec<bool>> {
        let mut tables = self.tables.lock();
        let t = Self::loaded(&mut tables, store, store.schema(), table)?;
        Ok(ids.into_iter().map(|id| t.ids.contains_key(id)).collect())
    }

    /// A table's overlay, read from the store the first time.
    fn loaded<'t>(
        tables: &'t mut HashMap<String, TableOverlay>,
        store: &dyn Store,
        schema: &Schema,
        table: &str,
    ) -> StoreResult<&'t mut TableOverlay> {
        if !tables.contains_key(table) {
            let def = table_def(schema, table)?;
            let mut t = TableOverlay::new(def);
            for (id, entry) in store.scan_overlay(table)? {
                let keys = match &entry {
                    OverlayEntry::Row(data) => keys_of(def, &id, data),
                    OverlayEntry::Deleted => Vec::new(),
                };
                t.put(&id, keys);
            }
            tables.insert(table.to_owned(), t);
        }
        // Inserted just above when missing.
        tables
            .get_mut(table)
            .ok_or_else(|| StoreError::Corrupt(format!("overlay index of {table} not loaded")))
    }
}
