//! The storage contract of a Ferry client, and the in-memory backend.
//!
//! A [`Store`] holds, and changes atomically through [`WriteBatch`]es:
//! - the *synced* layer: rows exactly as of the last server checkpoint, with
//!   index entries for every declared index (local-only tables live here
//!   too: they have no server copy);
//! - the *overlay*: for rows touched by pending local writes, the row as
//!   those writes leave it (or a deletion marker);
//! - the upload queue of pending [`CrudEntry`]s, ordered by `seq`;
//! - per-bucket entries (which rows each bucket holds, with the op id and
//!   checksum that put them there) and bucket state for the sync protocol;
//! - key-value metadata.
//!
//! The *visible* state (what apps read) is the overlay laid over the synced
//! layer. The provided methods `get_visible`, `scan_visible`,
//! `scan_visible_index` and `scan_visible_index_limited` compute it the
//! same way for every backend. They
//! read the overlay and the synced layer in separate calls, so callers
//! that need a consistent view serialize them with writes (as
//! `ferry-queue`'s `LocalDb` does).
//!
//! Invariants every backend keeps (the conformance suite in [`testkit`]
//! checks them): a batch is applied entirely or not at all; a batch that
//! fails validation changes nothing; once `apply` returns, the batch
//! survives a process crash; queue entries come back in `seq` order.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Bound;

use ferry_core::{codec, CoreError, CrudEntry, ErrorKind, RowData, Schema, Table, Value};
use thiserror::Error;

mod memory;
mod staging;
#[cfg(feature = "testkit")]
pub mod testkit;

pub use ferry_core::StagedSummary;
pub use memory::MemoryStore;
pub use staging::{staged_summary, staged_summary_by_pages, switch_effect, StagedKind, StagedOp, SwitchEffect};

/// A row's entry in one bucket: the bucket's latest op for that row (a
/// PUT: rows a bucket no longer holds have no entry). Keyed by
/// `(bucket, table, row_id)`, so a client finds at once whether any other
/// bucket still holds a row, and lists the rows of one bucket.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct BucketEntry {
    /// The table (row type) of the row.
    pub table: String,
    /// The row id.
    pub row_id: String,
    /// The server op id that put the row in its current state.
    pub op_id: u64,
    /// That op's checksum.
    pub checksum: u32,
}

/// What a client knows of one bucket.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct BucketState {
    /// The last op id applied from this bucket.
    pub last_op_id: u64,
    /// Wrapping sum of the checksums of the ops applied.
    pub checksum: u32,
    /// Number of ops applied.
    pub count: u64,
}

/// An overlay entry: what pending local writes made of a row.
#[derive(Clone, Debug, PartialEq)]
pub enum OverlayEntry {
    /// The row as the pending writes leave it.
    Row(RowData),
    /// The pending writes delete the row.
    Deleted,
}

/// One write in a [`WriteBatch`].
#[derive(Clone, Debug, PartialEq)]
pub enum BatchOp {
    /// Create or replace a synced row (index entries follow).
    PutSynced {
        /// The table.
        table: String,
        /// The row id.
        id: String,
        /// The row's values.
        data: RowData,
    },
    /// Remove a synced row; removing a missing row is not an error.
    DeleteSynced {
        /// The table.
        table: String,
        /// The row id.
        id: String,
    },
    /// Set a row's overlay entry.
    PutOverlay {
        /// The table.
        table: String,
        /// The row id.
        id: String,
        /// The row as pending writes leave it.
        entry: OverlayEntry,
    },
    /// Remove a row's overlay entry (its synced row shows again).
    DeleteOverlay {
        /// The table.
        table: String,
        /// The row id.
        id: String,
    },
    /// Append to the upload queue. `seq` must be greater than every seq in
    /// the queue and than earlier appends in the batch.
    AppendQueue(CrudEntry),
    /// Remove every queue entry with `seq <= through_seq`.
    CompleteQueue {
        /// The last seq to remove.
        through_seq: u64,
    },
    /// Set a row's entry in a bucket (replacing the previous one).
    PutBucketEntry {
        /// The bucket name.
        bucket: String,
        /// The entry.
        entry: BucketEntry,
    },
    /// Remove a row's entry from a bucket; a missing one is not an error.
    DeleteBucketEntry {
        /// The bucket name.
        bucket: String,
        /// The table.
        table: String,
        /// The row id.
        row_id: String,
    },
    /// Set a bucket's state.
    PutBucketState {
        /// The bucket name.
        bucket: String,
        /// Its state.
        state: BucketState,
    },
    /// Remove a bucket: its state and every entry.
    DeleteBucket {
        /// The bucket name.
        bucket: String,
    },
    /// Set a metadata value.
    PutMeta {
        /// The key.
        key: String,
        /// The value.
        value: Vec<u8>,
    },
    /// Remove a metadata value.
    DeleteMeta {
        /// The key.
        key: String,
    },
    /// Stage an op of a checkpoint being downloaded, replacing a staged op
    /// of the same bucket and op id. Reads never see staged ops.
    PutStaged {
        /// The op's bucket.
        bucket: String,
        /// The op.
        op: StagedOp,
    },
    /// Drop the staged ops of `bucket` with op ids at or below
    /// `through_op_id`.
    DeleteStaged {
        /// The bucket.
        bucket: String,
        /// The last op id dropped (`u64::MAX`: every one).
        through_op_id: u64,
    },
    /// Apply the staged ops of `bucket` with op ids in
    /// `[from_op_id, through_op_id]` to the synced layer, in op id order,
    /// as [`switch_effect`] says: a PUT puts its bucket entry and its row
    /// (when the schema declares the table); a REMOVE drops its bucket
    /// entry and then the row, when no bucket (as the bucket states stand
    /// at that point of the batch) holds it any more. The staged ops stay
    /// (drop them with [`BatchOp::DeleteStaged`]); a backend may then read
    /// a switched-in PUT's row back from the synced layer (SQLite does
    /// after moving a first sync's rows in with a table rename), so read
    /// them back before the synced rows change. Put the batch's bucket
    /// states before it, so the REMOVE check sees the buckets as they will
    /// be.
    SwitchInStaged {
        /// The bucket.
        bucket: String,
        /// The first op id applied.
        from_op_id: u64,
        /// The last op id applied.
        through_op_id: u64,
    },
}

impl BatchOp {
    /// Whether this write reads or writes what a switch-in does (synced
    /// rows, bucket entries or states, the staging area), so a switch-in
    /// earlier in its batch must be applied before it. A backend that
    /// applies a batch's closing switch-ins another way (sled in chunks,
    /// SQLite by a rename) does so only when none follows them.
    pub fn touches_switched_state(&self) -> bool {
        match self {
            BatchOp::PutSynced { .. }
            | BatchOp::DeleteSynced { .. }
            | BatchOp::PutBucketEntry { .. }
            | BatchOp::DeleteBucketEntry { .. }
            | BatchOp::PutBucketState { .. }
            | BatchOp::DeleteBucket { .. }
            | BatchOp::PutStaged { .. }
            | BatchOp::DeleteStaged { .. } => true,
            BatchOp::PutOverlay { .. }
            | BatchOp::DeleteOverlay { .. }
            | BatchOp::AppendQueue(_)
            | BatchOp::CompleteQueue { .. }
            | BatchOp::PutMeta { .. }
            | BatchOp::DeleteMeta { .. }
            | BatchOp::SwitchInStaged { .. } => false,
        }
    }
}

/// A set of writes applied atomically by [`Store::apply`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WriteBatch {
    /// The writes, applied in order.
    pub ops: Vec<BatchOp>,
}

impl WriteBatch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty batch with room for `n` writes.
    pub fn with_capacity(n: usize) -> Self {
        WriteBatch {
            ops: Vec::with_capacity(n),
        }
    }

    /// Add a write.
    pub fn push(&mut self, op: BatchOp) -> &mut Self {
        self.ops.push(op);
        self
    }

    /// Number of writes.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// Whether the batch has no writes.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Create or replace a synced row.
    pub fn put_synced(&mut self, table: impl Into<String>, id: impl Into<String>, data: RowData) -> &mut Self {
        self.push(BatchOp::PutSynced {
            table: table.into(),
            id: id.into(),
            data,
        })
    }

    /// Remove a synced row.
    pub fn delete_synced(&mut self, table: impl Into<String>, id: impl Into<String>) -> &mut Self {
        self.push(BatchOp::DeleteSynced {
            table: table.into(),
            id: id.into(),
        })
    }

    /// Set a row's overlay entry.
    pub fn put_overlay(&mut self, table: impl Into<String>, id: impl Into<String>, entry: OverlayEntry) -> &mut Self {
        self.push(BatchOp::PutOverlay {
            table: table.into(),
            id: id.into(),
            entry,
        })
    }

    /// Remove a row's overlay entry.
    pub fn delete_overlay(&mut self, table: impl Into<String>, id: impl Into<String>) -> &mut Self {
        self.push(BatchOp::DeleteOverlay {
            table: table.into(),
            id: id.into(),
        })
    }

    /// Append an upload queue entry.
    pub fn append_queue(&mut self, entry: CrudEntry) -> &mut Self {
        self.push(BatchOp::AppendQueue(entry))
    }

    /// Remove queue entries through `through_seq`.
    pub fn complete_queue(&mut self, through_seq: u64) -> &mut Self {
        self.push(BatchOp::CompleteQueue { through_seq })
    }

    /// Set a metadata value.
    pub fn put_meta(&mut self, key: impl Into<String>, value: Vec<u8>) -> &mut Self {
        self.push(BatchOp::PutMeta { key: key.into(), value })
    }
}

/// Storage errors.
#[derive(Debug, Error)]
pub enum StoreError {
    /// The table is not in the store's schema.
    #[error("unknown table {0:?}")]
    UnknownTable(String),
    /// The index is not declared on the table.
    #[error("unknown index {index:?} on table {table:?}")]
    UnknownIndex {
        /// The table.
        table: String,
        /// The index name given.
        index: String,
    },
    /// A range bound names more values than the index has columns.
    #[error("range bound has {given} values but index {index:?} has {columns} columns")]
    BadRange {
        /// The index.
        index: String,
        /// Values in the bound.
        given: usize,
        /// Columns in the index.
        columns: usize,
    },
    /// A queue append out of order.
    #[error("queue seq {seq} is not after the last queued seq {last}")]
    QueueOrder {
        /// The seq given.
        seq: u64,
        /// The last seq in the queue (or earlier in the batch).
        last: u64,
    },
    /// Stored data could not be decoded.
    #[error("corrupt store data: {0}")]
    Corrupt(String),
    /// A value the backend cannot store: a name with a NUL byte, a seq or
    /// op id beyond `i64::MAX`.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// The backend failed; `retryable` says whether the same call may work
    /// later (a busy database, an interrupted write).
    #[error("{backend} error: {message}")]
    Backend {
        /// The backend name (sqlite, sled).
        backend: &'static str,
        /// The backend's message.
        message: String,
        /// Whether a retry can help.
        retryable: bool,
    },
}

impl StoreError {
    /// Whether a retry can help.
    pub fn kind(&self) -> ErrorKind {
        match self {
            StoreError::Backend { retryable: true, .. } => ErrorKind::Transient,
            _ => ErrorKind::Permanent,
        }
    }
}

impl From<CoreError> for StoreError {
    fn from(e: CoreError) -> Self {
        StoreError::Corrupt(e.to_string())
    }
}

/// Result of store calls.
pub type StoreResult<T> = Result<T, StoreError>;

/// A list of rows as `(id, data)`.
pub type Rows = Vec<(String, RowData)>;

/// A client's local database. See the crate docs for the contract.
///
/// Scans return rows ordered by id; index scans order by the indexed values
/// (within a typed column, [`Value`]'s order) then by id. Index range bounds
/// are prefixes of the index's columns.
pub trait Store: Send + Sync + fmt::Debug {
    /// The schema the store was opened with.
    fn schema(&self) -> &Schema;

    /// Apply a batch atomically and durably (a process crash after return
    /// does not lose it). A batch that fails validation changes nothing.
    fn apply(&self, batch: WriteBatch) -> StoreResult<()>;

    /// A synced row.
    fn get_synced(&self, table: &str, id: &str) -> StoreResult<Option<RowData>>;

    /// Every synced row of a table, ordered by id.
    fn scan_synced(&self, table: &str) -> StoreResult<Rows>;

    /// Synced rows whose values of a declared index fall in a range.
    fn scan_synced_index(
        &self,
        table: &str,
        index: &str,
        lower: Bound<Vec<Value>>,
        upper: Bound<Vec<Value>>,
    ) -> StoreResult<Rows>;

    /// Up to `limit` synced rows of an index range, read from the range's
    /// start in index order, or from its end in reverse index order when
    /// `reverse`: the first `limit` rows of [`Store::scan_synced_index`]
    /// (reversed when `reverse`). Errors as `scan_synced_index`, whatever
    /// the limit. The provided version reads the whole range; backends
    /// read only the rows they return.
    fn scan_synced_index_limited(
        &self,
        table: &str,
        index: &str,
        lower: Bound<Vec<Value>>,
        upper: Bound<Vec<Value>>,
        reverse: bool,
        limit: usize,
    ) -> StoreResult<Rows> {
        let mut rows = self.scan_synced_index(table, index, lower, upper)?;
        if reverse {
            rows.reverse();
        }
        rows.truncate(limit);
        Ok(rows)
    }

    /// A row's overlay entry.
    fn get_overlay(&self, table: &str, id: &str) -> StoreResult<Option<OverlayEntry>>;

    /// Every overlay entry of a table, ordered by id.
    fn scan_overlay(&self, table: &str) -> StoreResult<Vec<(String, OverlayEntry)>>;

    /// Up to `limit` queue entries with `seq >= from_seq`, in seq order.
    fn queue_from(&self, from_seq: u64, limit: usize) -> StoreResult<Vec<CrudEntry>>;

    /// Number of queue entries.
    fn queue_len(&self) -> StoreResult<u64>;

    /// A bucket's state.
    fn bucket_state(&self, bucket: &str) -> StoreResult<Option<BucketState>>;

    /// Every bucket with a state, ordered by name.
    fn buckets(&self) -> StoreResult<Vec<(String, BucketState)>>;

    /// A row's entry in a bucket.
    fn bucket_entry(&self, bucket: &str, table: &str, row_id: &str) -> StoreResult<Option<BucketEntry>>;

    /// Up to `limit` entries of a bucket ordered by `(table, row_id)`,
    /// starting after `after` (exclusive) when given.
    fn bucket_entries(&self, bucket: &str, after: Option<(&str, &str)>, limit: usize) -> StoreResult<Vec<BucketEntry>>;

    /// A metadata value.
    fn get_meta(&self, key: &str) -> StoreResult<Option<Vec<u8>>>;

    /// The ops `bucket` has staged with op ids above `after_op_id`, in op
    /// id order, at most `limit`.
    fn staged_ops(&self, bucket: &str, after_op_id: u64, limit: usize) -> StoreResult<Vec<StagedOp>>;

    /// The buckets with staged ops, in order.
    fn staged_buckets(&self) -> StoreResult<Vec<String>>;

    /// The ops `bucket` has staged with op ids above `after_op_id`, summed
    /// up (what resuming a download needs of them). The default reads
    /// them back in pages ([`staging::staged_summary_by_pages`]).
    fn staged_summary(&self, bucket: &str, after_op_id: u64) -> StoreResult<StagedSummary> {
        staging::staged_summary_by_pages(self, bucket, after_op_id)
    }

    /// The visible row: its overlay entry if it has one, else its synced row.
    fn get_visible(&self, table: &str, id: &str) -> StoreResult<Option<RowData>> {
        match self.get_overlay(table, id)? {
            Some(OverlayEntry::Row(r)) => Ok(Some(r)),
            Some(OverlayEntry::Deleted) => Ok(None),
            None => self.get_synced(table, id),
        }
    }

    /// Every visible row of a table, ordered by id.
    fn scan_visible(&self, table: &str) -> StoreResult<Rows> {
        let synced = self.scan_synced(table)?;
        let overlay: BTreeMap<String, OverlayEntry> = self.scan_overlay(table)?.into_iter().collect();
        if overlay.is_empty() {
            return Ok(synced);
        }
        let mut merged: BTreeMap<String, RowData> =
            synced.into_iter().filter(|(id, _)| !overlay.contains_key(id)).collect();
        for (id, entry) in overlay {
            if let OverlayEntry::Row(r) = entry {
                merged.insert(id, r);
            }
        }
        Ok(merged.into_iter().collect())
    }

    /// Visible rows whose values of a declared index fall in a range,
    /// ordered as [`Store::scan_synced_index`] orders them.
    fn scan_visible_index(
        &self,
        table: &str,
        index: &str,
        lower: Bound<Vec<Value>>,
        upper: Bound<Vec<Value>>,
    ) -> StoreResult<Rows> {
        let overlay = self.scan_overlay(table)?;
        let range = resolve_index_range(self.schema(), table, index, &lower, &upper)?;
        let def = range.index;
        let synced = self.scan_synced_index(table, index, lower, upper)?;
        if overlay.is_empty() {
            return Ok(synced);
        }
        let overlaid: std::collections::BTreeSet<&str> = overlay.iter().map(|(id, _)| id.as_str()).collect();
        let mut keyed: Vec<(Vec<u8>, String, RowData)> = synced
            .into_iter()
            .filter(|(id, _)| !overlaid.contains(id.as_str()))
            .map(|(id, data)| (index_key(def, &id, &data), id, data))
            .collect();
        for (id, entry) in overlay {
            if let OverlayEntry::Row(data) = entry {
                let key = index_key(def, &id, &data);
                if range.contains(&key) {
                    keyed.push((key, id, data));
                }
            }
        }
        keyed.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(keyed.into_iter().map(|(_, id, data)| (id, data)).collect())
    }

    /// Up to `limit` visible rows of an index range, from its start (or
    /// from its end, in reverse order, when `reverse`): the first `limit`
    /// rows of [`Store::scan_visible_index`] (reversed when `reverse`).
    /// Reads the overlay and `limit` plus as many synced rows as the
    /// overlay has entries, never the whole range: overlay rows in range
    /// take their place in order, and synced rows with an overlay entry
    /// (deleted, changed, moved out of the range) are dropped.
    fn scan_visible_index_limited(
        &self,
        table: &str,
        index: &str,
        lower: Bound<Vec<Value>>,
        upper: Bound<Vec<Value>>,
        reverse: bool,
        limit: usize,
    ) -> StoreResult<Rows> {
        let range = resolve_index_range(self.schema(), table, index, &lower, &upper)?;
        if limit == 0 || range.is_empty() {
            return Ok(Vec::new());
        }
        let overlay = self.scan_overlay(table)?;
        let def = range.index;
        // Every synced row among the first `limit` visible ones has at most
        // `limit - 1` visible and `overlay.len()` overlaid rows before it.
        let synced =
            self.scan_synced_index_limited(table, index, lower, upper, reverse, limit.saturating_add(overlay.len()))?;
        if overlay.is_empty() {
            return Ok(synced);
        }
        let overlaid: std::collections::BTreeSet<&str> = overlay.iter().map(|(id, _)| id.as_str()).collect();
        let mut keyed: Vec<(Vec<u8>, String, RowData)> = synced
            .into_iter()
            .filter(|(id, _)| !overlaid.contains(id.as_str()))
            .map(|(id, data)| (index_key(def, &id, &data), id, data))
            .collect();
        for (id, entry) in overlay {
            if let OverlayEntry::Row(data) = entry {
                let key = index_key(def, &id, &data);
                if range.contains(&key) {
                    keyed.push((key, id, data));
                }
            }
        }
        Ok(first_by_key(keyed, reverse, limit))
    }
}

/// The first `limit` of rows keyed by their index keys, in key order (from
/// the greatest key when `reverse`), without their keys: the merge of
/// overlay and synced rows every limited scan of the visible state ends
/// with.
pub fn first_by_key(mut keyed: Vec<(Vec<u8>, String, RowData)>, reverse: bool, limit: usize) -> Rows {
    if reverse {
        keyed.sort_by(|a, b| b.0.cmp(&a.0));
    } else {
        keyed.sort_by(|a, b| a.0.cmp(&b.0));
    }
    keyed.truncate(limit);
    keyed.into_iter().map(|(_, id, data)| (id, data)).collect()
}

/// The table of a schema, or [`StoreError::UnknownTable`].
pub fn table_def<'a>(schema: &'a Schema, table: &str) -> StoreResult<&'a Table> {
    schema
        .table(table)
        .map_err(|_| StoreError::UnknownTable(table.to_owned()))
}

/// The index of a table, or an error naming what is missing.
pub fn index_def<'a>(schema: &'a Schema, table: &str, index: &str) -> StoreResult<&'a ferry_core::Index> {
    table_def(schema, table)?
        .index_def(index)
        .ok_or_else(|| StoreError::UnknownIndex {
            table: table.to_owned(),
            index: index.to_owned(),
        })
}

/// Check that range bounds fit an index: each bound has at most as many
/// values as the index has columns.
pub fn check_range(index: &ferry_core::Index, lower: &Bound<Vec<Value>>, upper: &Bound<Vec<Value>>) -> StoreResult<()> {
    for b in [lower, upper] {
        if let Bound::Included(v) | Bound::Excluded(v) = b {
            if v.len() > index.columns.len() {
                return Err(StoreError::BadRange {
                    index: index.name.clone(),
                    given: v.len(),
                    columns: index.columns.len(),
                });
            }
        }
    }
    Ok(())
}

/// A resolved index range: the index and the half-open byte range
/// `[lo, hi)` of encoded keys (either end open when `None`).
#[derive(Debug)]
pub struct IndexRange<'a> {
    /// The index.
    pub index: &'a ferry_core::Index,
    /// Smallest key in range.
    pub lo: Option<Vec<u8>>,
    /// First key past the range.
    pub hi: Option<Vec<u8>>,
}

impl IndexRange<'_> {
    /// Whether no key can fall in the range.
    pub fn is_empty(&self) -> bool {
        matches!((&self.lo, &self.hi), (Some(l), Some(h)) if l >= h)
    }

    /// Whether an encoded key falls in the range.
    pub fn contains(&self, key: &[u8]) -> bool {
        self.lo.as_deref().is_none_or(|l| key >= l) && self.hi.as_deref().is_none_or(|h| key < h)
    }
}

/// Check an index scan's arguments (the table and index exist, the bounds
/// fit the index) and turn the value bounds into a key range. Every
/// backend's `scan_synced_index` starts here.
pub fn resolve_index_range<'a>(
    schema: &'a Schema,
    table: &str,
    index: &str,
    lower: &Bound<Vec<Value>>,
    upper: &Bound<Vec<Value>>,
) -> StoreResult<IndexRange<'a>> {
    let index = index_def(schema, table, index)?;
    check_range(index, lower, upper)?;
    let (lo, hi) = codec::index_key_range(lower, upper);
    Ok(IndexRange { index, lo, hi })
}

/// The encoded index key of a row for an index (missing columns read as
/// NULL). Backends store these so bytewise order is index order.
pub fn index_key(index: &ferry_core::Index, id: &str, data: &RowData) -> Vec<u8> {
    const NULL: Value = Value::Null;
    let values = index.columns.iter().map(|c| data.get(c).unwrap_or(&NULL));
    codec::encode_index_key_of(values, id)
}

/// Check a batch against a schema before applying it, so that a bad batch
/// changes nothing: every table named exists, and queue appends are in
/// ascending seq order after `last_queued_seq`.
pub fn validate_batch(schema: &Schema, batch: &WriteBatch, last_queued_seq: Option<u64>) -> StoreResult<()> {
    validate_ops(schema, batch, last_queued_seq, true)
}

/// [`validate_batch`] but for the [`BatchOp::PutStaged`] ops, which the
/// caller checks with a [`StagedCheck`] as it writes them, inside the
/// batch's transaction (so a bad one still changes nothing).
pub fn validate_batch_but_staged(schema: &Schema, batch: &WriteBatch, last_queued_seq: Option<u64>) -> StoreResult<()> {
    validate_ops(schema, batch, last_queued_seq, false)
}

fn validate_ops(schema: &Schema, batch: &WriteBatch, last_queued_seq: Option<u64>, staged: bool) -> StoreResult<()> {
    let mut last = last_queued_seq;
    let mut checked = StagedCheck::default();
    for op in &batch.ops {
        match op {
            BatchOp::PutSynced { table, .. }
            | BatchOp::DeleteSynced { table, .. }
            | BatchOp::PutOverlay { table, .. }
            | BatchOp::DeleteOverlay { table, .. } => {
                table_def(schema, table)?;
            }
            BatchOp::AppendQueue(e) => {
                if let Some(l) = last {
                    if e.seq <= l {
                        return Err(StoreError::QueueOrder { seq: e.seq, last: l });
                    }
                }
                last = Some(e.seq);
            }
            BatchOp::CompleteQueue { .. } => {}
            BatchOp::PutBucketEntry { .. }
            | BatchOp::DeleteBucketEntry { .. }
            | BatchOp::PutBucketState { .. }
            | BatchOp::DeleteBucket { .. }
            | BatchOp::PutMeta { .. }
            | BatchOp::DeleteMeta { .. }
            | BatchOp::DeleteStaged { .. } => {}
            BatchOp::PutStaged { bucket, op } if staged => validate_staged(schema, bucket, op, &mut checked)?,
            BatchOp::PutStaged { .. } => {}
            BatchOp::SwitchInStaged {
                bucket,
                from_op_id,
                through_op_id,
            } => {
                if from_op_id > through_op_id {
                    return Err(StoreError::InvalidInput(format!(
                        "switch-in of bucket {bucket:?} from op {from_op_id} through op {through_op_id} is an empty range"
                    )));
                }
            }
        }
    }
    Ok(())
}

/// Checks staged ops ([`BatchOp::PutStaged`]) one by one, remembering
/// the columns of the last row found declared, and its table: a
/// download's rows mostly have the same columns as the row before, which
/// then need no lookup in the table's declaration. A backend may check a
/// batch's staged ops with it as it writes them (see
/// [`validate_batch_but_staged`]), touching each row once.
#[derive(Debug, Default)]
pub struct StagedCheck<'b> {
    table: &'b str,
    columns: Vec<&'b str>,
}

impl<'b> StagedCheck<'b> {
    fn same(&self, table: &str, data: &RowData) -> bool {
        self.table == table && data.len() == self.columns.len() && data.keys().zip(&self.columns).all(|(k, c)| k == c)
    }

    /// A staged op must say what it does: a PUT or REMOVE names its row,
    /// a PUT of a declared table carries the row (only declared columns),
    /// and nothing else carries one.
    pub fn check(&mut self, schema: &Schema, bucket: &str, op: &'b StagedOp) -> StoreResult<()> {
        validate_staged(schema, bucket, op, self)
    }
}

fn validate_staged<'b>(
    schema: &Schema,
    bucket: &str,
    op: &'b StagedOp,
    checked: &mut StagedCheck<'b>,
) -> StoreResult<()> {
    let bad = |reason: &str| {
        Err(StoreError::InvalidInput(format!(
            "staged op {} of bucket {bucket:?}: {reason}",
            op.op_id
        )))
    };
    match op.kind {
        StagedKind::Put | StagedKind::Remove if op.table.is_empty() || op.row_id.is_empty() => {
            bad("a put or remove needs a table and a row id")
        }
        StagedKind::Put => match (schema.table(&op.table), &op.data) {
            (Ok(_), Some(data)) if checked.same(&op.table, data) => Ok(()),
            (Ok(def), Some(data)) => match data.keys().find(|c| def.column_def(c).is_none()) {
                Some(c) => bad(&format!("column {c:?} is not declared by table {:?}", op.table)),
                None => {
                    checked.table = &op.table;
                    checked.columns = data.keys().map(String::as_str).collect();
                    Ok(())
                }
            },
            (Ok(_), None) => bad(&format!("a put of table {:?} needs its row", op.table)),
            (Err(_), Some(_)) => bad(&format!("table {:?} is not declared: its rows are not kept", op.table)),
            (Err(_), None) => Ok(()),
        },
        _ if op.data.is_some() => bad("only a put carries a row"),
        _ => Ok(()),
    }
}
