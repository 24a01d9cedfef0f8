//! The part of an import batch that needs no database: for each op, its
//! clock and the conflict strategy's decision over no stored row, and
//! for a plain write, everything the bulk way writes and logs of it (its
//! size checked, its buckets, its JSON, its clocks' JSON, its checksum
//! encoding). The import works the next batch out on a helper thread
//! while the writer writes the current one; the writer still decides
//! which rows are new (inside its transaction) and uses a worked-out op
//! only for those.

use std::collections::{BTreeMap, BTreeSet};

use ferry_core::clock::SharedClocksJson;
use ferry_core::{codec, CrudEntry, CrudOp, HlcTimestamp, RowData, Table};

use super::super::Inner;
use crate::conflict::{Decision, Resolution};
use crate::db::RowClocks;

/// A fresh row's column clocks: a new row's PUT has one clock for
/// every column it sends, kept once instead of as a map of copies.
#[derive(Clone, Debug)]
pub(super) enum FreshClocks {
    /// Each column's clock (a strategy's decision).
    Columns(BTreeMap<String, HlcTimestamp>),
    /// This clock for every column of the row.
    Shared(HlcTimestamp),
}

impl FreshClocks {
    /// As a bulk write takes them.
    pub(super) fn as_row_clocks(&self) -> RowClocks<'_> {
        match self {
            FreshClocks::Columns(map) => RowClocks::Columns(map),
            FreshClocks::Shared(hlc) => RowClocks::Shared(hlc),
        }
    }
}

/// A new row's write worked out: a plain write (no side writes).
#[derive(Clone, Debug)]
pub(super) struct FreshRow {
    /// The row to store: `None` when it is the op's own data (a PUT
    /// whose decision is its row as sent, dropped where it was made
    /// instead of kept as a copy).
    pub(super) row: Option<RowData>,
    /// Its column clocks.
    pub(super) clocks: FreshClocks,
    /// The row's size check (`Err`: why it is refused).
    pub(super) size: Result<(), String>,
    /// The buckets the row is in, as written.
    pub(super) buckets: BTreeSet<String>,
    /// The row as `serde_json` writes it (the op log's text), when it
    /// encodes.
    pub(super) data_json: Option<String>,
    /// The clocks as `serde_json` writes them, when they encode.
    pub(super) clocks_json: Option<String>,
    /// `codec::encode_row` of the row (the checksum's input).
    pub(super) encoded: Vec<u8>,
}

impl Inner {
    /// Each op of a batch worked out as a new row (`None`: a delete, or a
    /// decision that is not a plain write, which the writer works out in
    /// its transaction). Draws one clock per PUT or PATCH, in order.
    pub(super) fn prepare_batch(&self, entries: &[CrudEntry], tables: &[&Table]) -> Vec<Option<FreshRow>> {
        let mut shared_json = SharedClocksJson::default();
        entries
            .iter()
            .zip(tables)
            .map(|(entry, table)| {
                if matches!(entry.op, CrudOp::Delete { .. }) {
                    return None;
                }
                let hlc = self.op_clock("", entry);
                // The strategy's decision known without it: no copy of
                // the row made and compared.
                if matches!(entry.op, CrudOp::Put { .. }) && self.strategy(table).writes_new_puts_as_sent() {
                    // Every column the PUT sends at its clock.
                    return Some(self.fresh_row(table, &entry.op, None, FreshClocks::Shared(hlc), &mut shared_json));
                }
                let decision = self.resolve_op((table, &entry.op), entry, &hlc, ("", ""), None);
                match decision {
                    Decision {
                        resolution: Resolution::Write { row, clocks, .. },
                        side_writes,
                        ..
                    } if side_writes.is_empty() => Some(self.fresh_row(
                        table,
                        &entry.op,
                        Some(row),
                        FreshClocks::Columns(clocks),
                        &mut shared_json,
                    )),
                    _ => None,
                }
            })
            .collect()
    }

    /// A plain write of `op`'s row as `row` (`None`: a PUT's row as sent)
    /// with `clocks` (shared ones: for every column of the row, their
    /// text written with `shared_json`), worked out.
    pub(super) fn fresh_row(
        &self,
        table: &Table,
        op: &CrudOp,
        row: Option<RowData>,
        clocks: FreshClocks,
        shared_json: &mut SharedClocksJson,
    ) -> FreshRow {
        let id = op.id();
        // A PUT's row as sent was checked with the op.
        let (row, size) = match (op, row) {
            (CrudOp::Put { .. }, None) => (None, Ok(())),
            (CrudOp::Put { data, .. }, Some(row)) if *data == row => (None, Ok(())),
            (_, Some(row)) => {
                let size = self.check_row_size(table, id, &row);
                (Some(row), size)
            }
            // Not a PUT: the op's own data, checked.
            (_, None) => (None, self.check_row_size(table, id, fresh_data(&None, op))),
        };
        let data = fresh_data(&row, op);
        let encoded = codec::encode_row(data);
        FreshRow {
            buckets: self.rules.row_buckets(&table.name, id, data),
            data_json: ferry_core::json::row_json(data).ok(),
            clocks_json: match &clocks {
                FreshClocks::Columns(map) => ferry_core::clock::clocks_json(map).ok(),
                FreshClocks::Shared(hlc) => shared_json.encode(hlc, data.keys().map(String::as_str)).ok(),
            },
            encoded,
            size,
            row,
            clocks,
        }
    }
}

/// No columns (what [`fresh_data`] answers for a delete, which has no
/// fresh row).
static NO_DATA: RowData = RowData::new();

/// The row a fresh write of `op` stores: `row` (a [`FreshRow`]'s), else
/// the op's own data.
pub(super) fn fresh_data<'a>(row: &'a Option<RowData>, op: &'a CrudOp) -> &'a RowData {
    match (row, op) {
        (Some(row), _) => row,
        (None, CrudOp::Put { data, .. } | CrudOp::Patch { data, .. }) => data,
        (None, CrudOp::Delete { .. }) => &NO_DATA,
    }
}
