//! The conflict seam: a [`ConflictStrategy`] decides, inside the write
//! transaction, what an incoming op does to the stored row. Column-level
//! [`LastWriteWins`] is the default; `ferry-conflict` strategies plug in
//! per table through `SyncServiceBuilder::strategy`.

use std::collections::BTreeMap;
use std::fmt;

use ferry_core::{CrudOp, HlcTimestamp, RowData, Table};

use crate::db::StoredRow;

/// What a strategy sees.
#[derive(Debug)]
pub struct ConflictInput<'a> {
    /// The table.
    pub table: &'a Table,
    /// The row id.
    pub id: &'a str,
    /// The validated op (a PUT carries every column, absent ones NULL).
    pub op: &'a CrudOp,
    /// The op's clock (client HLC, clamped to server time + max skew).
    pub hlc: &'a HlcTimestamp,
    /// The stored row or tombstone, if any.
    pub current: Option<&'a StoredRow>,
}

/// What a strategy decides.
#[derive(Clone, Debug, PartialEq)]
pub enum Resolution {
    /// Store this row (every column) with these column clocks. `lost`
    /// names the op's columns that were not applied (outcome `merged`).
    Write {
        /// The row to store.
        row: RowData,
        /// Its column clocks.
        clocks: BTreeMap<String, HlcTimestamp>,
        /// Columns of the op that lost.
        lost: Vec<String>,
    },
    /// Delete the row, leaving a tombstone with this clock.
    Delete {
        /// The tombstone's clock.
        hlc: HlcTimestamp,
    },
    /// Apply nothing; the row stays as `row` (outcome `merged`).
    Keep {
        /// The row as stored (`None`: absent or deleted).
        row: Option<RowData>,
        /// Why.
        reason: String,
    },
    /// Refuse the op (outcome `rejected`).
    Reject {
        /// Why, naming the bad value.
        reason: String,
    },
}

/// Decides the effect of an op on the stored row.
pub trait ConflictStrategy: Send + Sync + fmt::Debug {
    /// Resolve one op.
    fn resolve(&self, input: &ConflictInput<'_>) -> Resolution;
}

/// Column-level last-write-wins by hybrid logical clock (client id as the
/// final tie-break, it is the HLC's node).
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
    fn resolve(&self, input: &ConflictInput<'_>) -> Resolution {
        let hlc = input.hlc;
        let live = input.current.and_then(|c| c.data.as_ref().map(|d| (d, &c.clocks)));
        let deleted = input.current.and_then(|c| c.deleted.as_ref());
        match input.op {
            CrudOp::Put { data, .. } | CrudOp::Patch { data, .. } => {
                let is_put = matches!(input.op, CrudOp::Put { .. });
                match (live, deleted) {
                    (Some((row, clocks)), _) => {
                        let mut row = row.clone();
                        let mut clocks = clocks.clone();
                        let mut lost = Vec::new();
                        for (col, v) in data {
                            let wins = clocks.get(col).is_none_or(|c| hlc > c);
                            if wins {
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
                        reason: format!("row {}/{} was deleted by a newer write", input.table.name, input.id),
                    },
                    (None, Some(_)) => Resolution::Keep {
                        row: None,
                        reason: format!(
                            "row {}/{} is deleted; the patch does nothing",
                            input.table.name, input.id
                        ),
                    },
                    (None, None) if is_put => fresh(data, hlc),
                    (None, None) => Resolution::Reject {
                        reason: format!("row {}/{} does not exist", input.table.name, input.id),
                    },
                }
            }
            CrudOp::Delete { .. } => match (live, deleted) {
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
            },
        }
    }
}

fn fresh(data: &RowData, hlc: &HlcTimestamp) -> Resolution {
    Resolution::Write {
        row: data.clone(),
        clocks: data.keys().map(|k| (k.clone(), hlc.clone())).collect(),
        lost: Vec::new(),
    }
}
