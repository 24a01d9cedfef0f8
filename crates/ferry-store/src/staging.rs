//! The staging area: ops of a checkpoint being downloaded, kept in the
//! store as they arrive and switched into the synced layer at once when
//! the checkpoint validated.
//!
//! Staged ops are keyed by `(bucket, op id)`: staging an op again (a line
//! sent twice after a reconnect) replaces it. Reads of the synced, overlay
//! and visible state never see them. [`BatchOp::SwitchInStaged`] applies a
//! bucket's staged ops of an op id range to the synced layer inside the
//! batch's transaction, reading them from the store itself, so a
//! checkpoint of any size switches in without the client holding its rows
//! in memory.
//!
//! [`BatchOp::SwitchInStaged`]: crate::BatchOp::SwitchInStaged

use ferry_core::{RowData, StagedSummary, Value};

use crate::{BucketEntry, Store, StoreResult};

/// What a staged op does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StagedKind {
    /// Puts a row into the bucket.
    Put,
    /// Takes a row out of the bucket.
    Remove,
    /// Compacted away: nothing to apply, it only counts in checksums.
    Move,
    /// The bucket starts over here (compaction of a leading run).
    Clear,
}

impl StagedKind {
    /// The one-byte code backends store.
    pub fn code(self) -> u8 {
        match self {
            StagedKind::Put => 0,
            StagedKind::Remove => 1,
            StagedKind::Move => 2,
            StagedKind::Clear => 3,
        }
    }

    /// The kind of a stored code.
    pub fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            0 => StagedKind::Put,
            1 => StagedKind::Remove,
            2 => StagedKind::Move,
            3 => StagedKind::Clear,
            _ => return None,
        })
    }
}

/// Heap bytes of an op beyond its strings and row (the struct, two string
/// allocations' rounding, the row map's root).
const PER_OP_BYTES: usize = 160;
/// Heap bytes of one column beyond its name and value bytes (the key's
/// `String`, the `Value`, the map node's share, allocator rounding).
const PER_COLUMN_BYTES: usize = 112;

/// One op of a bucket in the staging area.
#[derive(Clone, Debug, PartialEq)]
pub struct StagedOp {
    /// The op's id (unique within its bucket).
    pub op_id: u64,
    /// What it does.
    pub kind: StagedKind,
    /// The row's table (empty for MOVE and CLEAR).
    pub table: String,
    /// The row's id (empty for MOVE and CLEAR).
    pub row_id: String,
    /// The row a PUT writes, with only the columns the client schema
    /// declares; `None` for other kinds and for PUTs of tables the schema
    /// does not declare (they are tracked in bucket entries only).
    pub data: Option<RowData>,
    /// The op's checksum.
    pub checksum: u32,
}

impl StagedOp {
    /// About how many bytes the op takes on the heap, for budgets: its
    /// strings and, per column, the key's and the value's allocations plus
    /// the map's share of a node (a ticket row of 7 columns and about 200
    /// bytes of text counts about 1.2 KB).
    pub fn approx_bytes(&self) -> usize {
        let data = self.data.as_ref().map_or(0, |d| {
            d.iter()
                .map(|(k, v)| {
                    let value = match v {
                        Value::Text(t) => t.len(),
                        Value::Blob(b) => b.len(),
                        _ => 0,
                    };
                    PER_COLUMN_BYTES + k.len() + value
                })
                .sum::<usize>()
        });
        PER_OP_BYTES + self.table.len() + self.row_id.len() + data
    }
}

/// What switching one staged op in does to the synced layer.
#[derive(Debug, PartialEq)]
pub enum SwitchEffect {
    /// Put the bucket entry, and the row when the schema declares its table.
    Put {
        /// The row's table.
        table: String,
        /// The row's id.
        id: String,
        /// The row, `None` for a table the schema does not declare.
        data: Option<RowData>,
        /// The bucket entry.
        entry: BucketEntry,
    },
    /// Drop the bucket entry; the row leaves the synced layer when no
    /// bucket holds it any more.
    Remove {
        /// The row's table.
        table: String,
        /// The row's id.
        id: String,
    },
    /// Nothing (MOVE, CLEAR).
    Nothing,
}

/// The effect of switching `op` in: the same every backend applies.
pub fn switch_effect(op: StagedOp) -> SwitchEffect {
    match op.kind {
        StagedKind::Put => SwitchEffect::Put {
            entry: BucketEntry {
                table: op.table.clone(),
                row_id: op.row_id.clone(),
                op_id: op.op_id,
                checksum: op.checksum,
            },
            table: op.table,
            id: op.row_id,
            data: op.data,
        },
        StagedKind::Remove => SwitchEffect::Remove {
            table: op.table,
            id: op.row_id,
        },
        StagedKind::Move | StagedKind::Clear => SwitchEffect::Nothing,
    }
}

/// Ops read at once when summing a bucket's staging area up.
const SUMMARY_PAGE_OPS: usize = 4_096;

/// Sum up the ops `bucket` has staged after `after_op_id` (the store's
/// [`Store::staged_summary`], which a backend may compute without reading
/// the ops back).
pub fn staged_summary(store: &dyn Store, bucket: &str, after_op_id: u64) -> StoreResult<StagedSummary> {
    store.staged_summary(bucket, after_op_id)
}

/// [`Store::staged_summary`] by reading the staged ops back in pages
/// (memory stays bounded whatever their number): the default, and the
/// reference a backend's own computation must match.
pub fn staged_summary_by_pages<S: Store + ?Sized>(
    store: &S,
    bucket: &str,
    after_op_id: u64,
) -> StoreResult<StagedSummary> {
    let mut summary = StagedSummary::default();
    let mut after = after_op_id;
    loop {
        let page = store.staged_ops(bucket, after, SUMMARY_PAGE_OPS)?;
        for op in &page {
            summary.add(op.op_id, op.kind == StagedKind::Clear, op.checksum);
        }
        match page.last() {
            Some(last) if page.len() == SUMMARY_PAGE_OPS => after = last.op_id,
            _ => return Ok(summary),
        }
    }
}
