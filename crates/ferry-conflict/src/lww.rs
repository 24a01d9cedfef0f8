//! Last write wins, by hybrid logical clock, at column level
//! ([`LastWriteWins`]) and row level ([`RowLastWriteWins`]), and the
//! delete rule every strategy shares ([`lww_delete`]).
//!
//! Clocks order by `(wall_ms, counter, node)`; the node is the client id,
//! so two clients never tie. The server clamps a client clock to its own
//! time plus the accepted skew *before* the strategy runs, so a client
//! with a clock far in the future cannot win every later write. Server
//! wins: an op whose clock equals the stored clock loses (comparisons are
//! strict), and a clamped clock compares as clamped.
//!
//! A delete is a write of "nothing" to every column at its clock
//! (`docs/adr/0004-delete-against-write.md`): the row is a tombstone iff
//! the latest op by clock is a delete, else it is live and each column
//! holds the latest write to it, NULL when that was a delete. The stored
//! result is the same in every arrival order.

use std::collections::{BTreeMap, BTreeSet};

use ferry_core::{CrudOp, HlcTimestamp, RowData, Value};

use crate::strategy::{ConflictInput, ConflictStrategy, Decision, Resolution};

/// Column-level last-write-wins.
///
/// - PUT/PATCH on a live row: each column of the op is applied iff the
///   op's clock is greater than the column's stored clock.
/// - DELETE: see [`lww_delete`] (clears every older column; the row
///   becomes a tombstone iff no column is newer than the delete).
/// - PUT/PATCH on a tombstone: iff the op's clock is greater than the
///   delete's, the row comes back with the op's columns (at the op's
///   clock) and every other column NULL (at the delete's clock); otherwise
///   nothing happens (outcome `merged`).
/// - PATCH of a row that never existed is rejected; DELETE of one leaves
///   a tombstone, so an older PUT arriving later cannot recreate it.
#[derive(Clone, Copy, Debug, Default)]
pub struct LastWriteWins;

impl ConflictStrategy for LastWriteWins {
    fn resolve(&self, input: &ConflictInput<'_>) -> Decision {
        lww(input, false).into()
    }

    /// A PUT over no stored row: [`fresh`].
    fn writes_new_puts_as_sent(&self) -> bool {
        true
    }
}

/// Row-level last-write-wins: on a live row the op wins iff its clock is
/// greater than every column clock of the stored row; then all its columns
/// apply (a PUT replaces the row), else none does (outcome `merged`, the
/// stored row). Deletes, tombstones (resurrection) and missing rows follow
/// [`LastWriteWins`].
#[derive(Clone, Copy, Debug, Default)]
pub struct RowLastWriteWins;

impl ConflictStrategy for RowLastWriteWins {
    fn resolve(&self, input: &ConflictInput<'_>) -> Decision {
        lww(input, true).into()
    }

    /// A PUT over no stored row: [`fresh`].
    fn writes_new_puts_as_sent(&self) -> bool {
        true
    }
}

fn lww(input: &ConflictInput<'_>, whole_row: bool) -> Resolution {
    let hlc = input.hlc;
    let live = input.current.and_then(|c| c.data.as_ref().map(|d| (d, &c.clocks)));
    let deleted = input.current.and_then(|c| c.deleted.as_ref());
    let name = &input.table.name;
    let id = input.id;
    match input.op {
        CrudOp::Put { data, .. } | CrudOp::Patch { data, .. } => {
            let is_put = matches!(input.op, CrudOp::Put { .. });
            match (live, deleted) {
                (Some((row, clocks)), _) if whole_row => {
                    if let Some(newer) = clocks.values().filter(|c| *c >= hlc).max() {
                        return Resolution::Keep {
                            row: Some(row.clone()),
                            reason: format!("row {name}/{id} has a newer write at {newer}"),
                        };
                    }
                    let mut row = row.clone();
                    let mut clocks = clocks.clone();
                    for (col, v) in data {
                        row.insert(col.clone(), v.clone());
                        clocks.insert(col.clone(), hlc.clone());
                    }
                    Resolution::Write {
                        row,
                        clocks,
                        lost: Vec::new(),
                    }
                }
                (Some((row, clocks)), _) => {
                    let mut row = row.clone();
                    let mut clocks = clocks.clone();
                    let mut lost = Vec::new();
                    for (col, v) in data {
                        if clocks.get(col).is_none_or(|c| hlc > c) {
                            row.insert(col.clone(), v.clone());
                            clocks.insert(col.clone(), hlc.clone());
                        } else {
                            lost.push(col.clone());
                        }
                    }
                    Resolution::Write { row, clocks, lost }
                }
                (None, Some(d)) if hlc > d => resurrect(input, data, d),
                (None, Some(d)) => Resolution::Keep {
                    row: None,
                    reason: format!("row {name}/{id} was deleted by a newer write at {d}"),
                },
                (None, None) if is_put => fresh(data, hlc),
                (None, None) => Resolution::Reject {
                    reason: format!("row {name}/{id} does not exist"),
                },
            }
        }
        CrudOp::Delete { .. } => lww_delete(input),
    }
}

/// The rule for a DELETE, shared by every strategy: a delete writes
/// "nothing" to every column at its clock.
///
/// - On a live row: every column whose clock is older than the delete's
///   (or that has none) becomes NULL with the delete's clock. When no
///   column is newer, the row becomes a tombstone with the delete's clock
///   ([`Resolution::Delete`]); otherwise it stays with its newer columns
///   and the others NULL ([`Resolution::Write`] whose `lost` names the
///   columns kept: outcome `merged`), or, when every column is newer, as
///   it is ([`Resolution::Keep`]).
/// - On a tombstone: the later of the two delete clocks stays.
/// - On a missing row: a tombstone with the delete's clock.
///
/// A later PUT or PATCH newer than the tombstone brings the row back with
/// the columns it writes and the others NULL at the delete's clock, so
/// both arrival orders of a delete and a write store the same row.
pub fn lww_delete(input: &ConflictInput<'_>) -> Resolution {
    let hlc = input.hlc;
    let live = input.current.and_then(|c| c.data.as_ref().map(|d| (d, &c.clocks)));
    let deleted = input.current.and_then(|c| c.deleted.as_ref());
    match (live, deleted) {
        (Some((row, clocks)), _) => {
            let columns: BTreeSet<&String> = input.table.columns.iter().map(|c| &c.name).chain(row.keys()).collect();
            let mut out = row.clone();
            let mut out_clocks = clocks.clone();
            let mut kept = Vec::new();
            for col in columns {
                if clocks.get(col).is_some_and(|c| c >= hlc) {
                    kept.push(col.clone());
                } else {
                    out.insert(col.clone(), Value::Null);
                    out_clocks.insert(col.clone(), hlc.clone());
                }
            }
            if kept.is_empty() {
                Resolution::Delete { hlc: hlc.clone() }
            } else if out_clocks == *clocks && out == *row {
                Resolution::Keep {
                    row: Some(row.clone()),
                    reason: format!(
                        "row {}/{} kept: columns {} have writes newer than the delete",
                        input.table.name,
                        input.id,
                        kept.join(", ")
                    ),
                }
            } else {
                Resolution::Write {
                    row: out,
                    clocks: out_clocks,
                    lost: kept,
                }
            }
        }
        (None, Some(d)) => Resolution::Delete {
            hlc: if d > hlc { d.clone() } else { hlc.clone() },
        },
        (None, None) => Resolution::Delete { hlc: hlc.clone() },
    }
}

/// A tombstoned row brought back by a write newer than its delete
/// (`deleted`): the op's columns at its clock, every other column NULL at
/// the delete's clock (the delete wrote "nothing" to them).
fn resurrect(input: &ConflictInput<'_>, data: &RowData, deleted: &HlcTimestamp) -> Resolution {
    let mut row: RowData = input
        .table
        .columns
        .iter()
        .map(|c| (c.name.clone(), Value::Null))
        .collect();
    let mut clocks: BTreeMap<String, HlcTimestamp> = row.keys().map(|k| (k.clone(), deleted.clone())).collect();
    for (col, v) in data {
        row.insert(col.clone(), v.clone());
        clocks.insert(col.clone(), input.hlc.clone());
    }
    Resolution::Write {
        row,
        clocks,
        lost: Vec::new(),
    }
}

fn fresh(data: &RowData, hlc: &HlcTimestamp) -> Resolution {
    Resolution::Write {
        row: data.clone(),
        clocks: data.keys().map(|k| (k.clone(), hlc.clone())).collect(),
        lost: Vec::new(),
    }
}

/// The later of a column's stored clock and the op's clock (strategies
/// that apply a column regardless of clocks keep clocks monotonic).
pub(crate) fn later_clock(clocks: &BTreeMap<String, HlcTimestamp>, col: &str, hlc: &HlcTimestamp) -> HlcTimestamp {
    match clocks.get(col) {
        Some(c) if c > hlc => c.clone(),
        _ => hlc.clone(),
    }
}
