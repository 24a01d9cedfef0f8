//! Last write wins, by hybrid logical clock, at column level
//! ([`LastWriteWins`]) and row level ([`RowLastWriteWins`]).
//!
//! Clocks order by `(wall_ms, counter, node)`; the node is the client id,
//! so two clients never tie. The server clamps a client clock to its own
//! time plus the accepted skew *before* the strategy runs, so a client
//! with a clock far in the future cannot win every later write. Server
//! wins: an op whose clock equals the stored clock loses (comparisons are
//! strict), and a clamped clock compares as clamped.

use std::collections::BTreeMap;

use ferry_core::{CrudOp, HlcTimestamp, RowData};

use crate::strategy::{ConflictInput, ConflictStrategy, Decision, Resolution};

/// Column-level last-write-wins.
///
/// - PUT/PATCH on a live row: each column of the op is applied iff the
///   op's clock is greater than the column's stored clock.
/// - DELETE on a live row: applied iff its clock is greater than every
///   column clock (an edit made after the delete keeps the row).
/// - PUT on a tombstone: recreates the row iff its clock is greater than
///   the delete's; otherwise nothing happens. PATCH on a tombstone does
///   nothing (a patch of a missing row, as a SQL UPDATE).
/// - PATCH of a row that never existed is rejected; DELETE of one leaves
///   a tombstone, so an older PUT arriving later cannot recreate it.
#[derive(Clone, Copy, Debug, Default)]
pub struct LastWriteWins;

impl ConflictStrategy for LastWriteWins {
    fn resolve(&self, input: &ConflictInput<'_>) -> Decision {
        lww(input, false).into()
    }
}

/// Row-level last-write-wins: the op wins iff its clock is greater than
/// every column clock of the stored row; then all its columns apply (a PUT
/// replaces the row), else none does (outcome `merged`, the stored row).
/// Deletes, tombstones and missing rows follow [`LastWriteWins`].
#[derive(Clone, Copy, Debug, Default)]
pub struct RowLastWriteWins;

impl ConflictStrategy for RowLastWriteWins {
    fn resolve(&self, input: &ConflictInput<'_>) -> Decision {
        lww(input, true).into()
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
                (None, Some(d)) if is_put && hlc > d => fresh(data, hlc),
                (None, Some(_)) if is_put => Resolution::Keep {
                    row: None,
                    reason: format!("row {name}/{id} was deleted by a newer write"),
                },
                (None, Some(_)) => Resolution::Keep {
                    row: None,
                    reason: format!("row {name}/{id} is deleted; the patch does nothing"),
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

/// The last-write-wins rule for a DELETE, shared by every strategy: on a
/// live row the delete applies iff its clock is greater than every column
/// clock (else the row is kept, outcome `merged`); on a tombstone the
/// later clock stays; on a missing row it leaves a tombstone.
pub fn lww_delete(input: &ConflictInput<'_>) -> Resolution {
    let hlc = input.hlc;
    let live = input.current.and_then(|c| c.data.as_ref().map(|d| (d, &c.clocks)));
    let deleted = input.current.and_then(|c| c.deleted.as_ref());
    match (live, deleted) {
        (Some((row, clocks)), _) => {
            let newer: Vec<&str> = clocks
                .iter()
                .filter(|(_, c)| *c >= hlc)
                .map(|(k, _)| k.as_str())
                .collect();
            if newer.is_empty() {
                Resolution::Delete { hlc: hlc.clone() }
            } else {
                Resolution::Keep {
                    row: Some(row.clone()),
                    reason: format!("columns {} have writes newer than the delete", newer.join(", ")),
                }
            }
        }
        (None, Some(d)) => Resolution::Delete {
            hlc: if d > hlc { d.clone() } else { hlc.clone() },
        },
        (None, None) => Resolution::Delete { hlc: hlc.clone() },
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
