//! The seam: what a strategy sees ([`ConflictInput`]), what it decides
//! ([`Decision`]: a [`Resolution`] for the row plus [`SideWrite`]s), and the
//! [`ConflictStrategy`] trait.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use ferry_core::{CrudOp, HlcTimestamp, RowData, Table, Value};

/// The stored state of the row an op targets: its values and the
/// last-write-wins clock of each column, or a tombstone.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CurrentRow {
    /// The values (every schema column), `None` for a tombstone.
    pub data: Option<RowData>,
    /// The last-write-wins clock of each column.
    pub clocks: BTreeMap<String, HlcTimestamp>,
    /// The delete's clock when the row is a tombstone.
    pub deleted: Option<HlcTimestamp>,
}

impl CurrentRow {
    /// The greatest clock of the row: of any column, or of its delete.
    pub fn max_clock(&self) -> Option<&HlcTimestamp> {
        self.clocks.values().chain(self.deleted.iter()).max()
    }

    /// The row after `resolution` is applied to `current` (what the server
    /// stores; used by simulations and tests). A tombstone has no column
    /// clocks.
    pub fn apply(current: Option<&CurrentRow>, resolution: &Resolution) -> Option<CurrentRow> {
        match resolution {
            Resolution::Write { row, clocks, .. } => Some(CurrentRow {
                data: Some(row.clone()),
                clocks: clocks.clone(),
                deleted: None,
            }),
            Resolution::Delete { hlc } => Some(CurrentRow {
                data: None,
                clocks: BTreeMap::new(),
                deleted: Some(hlc.clone()),
            }),
            Resolution::Keep { .. } | Resolution::Reject { .. } => current.cloned(),
        }
    }
}

/// What a strategy sees: the op, where it comes from, and the stored row.
/// Time arrives here (`hlc`, `now_ms`); strategies never read a clock.
#[derive(Clone, Copy, Debug)]
pub struct ConflictInput<'a> {
    /// The table.
    pub table: &'a Table,
    /// The row id.
    pub id: &'a str,
    /// The validated op (a PUT carries every column, absent ones NULL).
    pub op: &'a CrudOp,
    /// The op's clock (client HLC, clamped by the server to its time plus
    /// the accepted skew; node = client id, the final tie-break).
    pub hlc: &'a HlcTimestamp,
    /// The client's previous values of the changed columns (its base: what
    /// it saw when it made the change), when the table tracks them.
    pub base: Option<&'a RowData>,
    /// The uploading client (empty for server imports).
    pub client_id: &'a str,
    /// The authenticated user (empty for server imports).
    pub user_id: &'a str,
    /// The op's client sequence number (0 for server imports).
    pub seq: u64,
    /// Server wall time, milliseconds since the Unix epoch.
    pub now_ms: u64,
    /// The stored row or tombstone, if any.
    pub current: Option<&'a CurrentRow>,
}

impl<'a> ConflictInput<'a> {
    /// The same input with another op (used to hand a part of an op to an
    /// inner strategy).
    pub fn with_op<'b>(&self, op: &'b CrudOp) -> ConflictInput<'b>
    where
        'a: 'b,
    {
        ConflictInput { op, ..*self }
    }

    /// The stored values when the row is live.
    pub fn live(&self) -> Option<&'a RowData> {
        self.current.and_then(|c| c.data.as_ref())
    }

    /// The op's column values (PUT or PATCH).
    pub fn op_data(&self) -> Option<&'a RowData> {
        match self.op {
            CrudOp::Put { data, .. } | CrudOp::Patch { data, .. } => Some(data),
            CrudOp::Delete { .. } => None,
        }
    }

    /// The client's base value of `column`, when it sent one.
    pub fn base_of(&self, column: &str) -> Option<&'a Value> {
        self.base.and_then(|b| b.get(column))
    }

    /// The stored value of `column` of a live row (NULL when absent).
    pub fn server_value(&self, column: &str) -> Option<&'a Value> {
        self.live().map(|r| r.get(column).unwrap_or(&Value::Null))
    }

    /// A PATCH of this row carrying `data` (for handing a subset of the
    /// op's columns to a strategy).
    pub fn patch_of(&self, data: RowData) -> CrudOp {
        CrudOp::Patch {
            table: self.table.name.clone(),
            id: self.id.to_owned(),
            data,
        }
    }
}

/// What happens to the row.
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

/// A row the server writes in the same transaction as the op (a conflict
/// record, an activity row). Applied like a server write: validated
/// against the schema, merged over the stored row (absent columns of a new
/// row are NULL), stamped with the op's clock, placed in buckets and
/// appended to the op log.
#[derive(Clone, Debug, PartialEq)]
pub struct SideWrite {
    /// The table.
    pub table: String,
    /// The row id.
    pub id: String,
    /// The columns to write.
    pub data: RowData,
}

/// The outcome class of a decision (what the client is told).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutcomeKind {
    /// Applied as sent.
    Applied,
    /// Applied in part or changed by the strategy.
    Merged,
    /// Refused.
    Rejected,
    /// Held for a person to resolve.
    NeedsReview,
}

impl OutcomeKind {
    /// The protocol's name: `applied`, `merged`, `rejected`, `needs_review`.
    pub fn as_str(self) -> &'static str {
        match self {
            OutcomeKind::Applied => "applied",
            OutcomeKind::Merged => "merged",
            OutcomeKind::Rejected => "rejected",
            OutcomeKind::NeedsReview => "needs_review",
        }
    }
}

/// What a strategy decides for one op.
///
/// Outcome: `rejected` for [`Resolution::Reject`]; else `needs_review`
/// when `conflict_id` is set (the resolution still applies: manual
/// resolution writes the op's non-conflicting columns); else `merged` for
/// [`Resolution::Keep`], or when `reason` is set, or when a write lost
/// columns; else `applied`.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    /// What happens to the row.
    pub resolution: Resolution,
    /// Why the op was changed (makes the outcome `merged`).
    pub reason: Option<String>,
    /// The conflict record to review (outcome `needs_review`).
    pub conflict_id: Option<String>,
    /// Rows to write in the same transaction.
    pub side_writes: Vec<SideWrite>,
}

impl From<Resolution> for Decision {
    fn from(resolution: Resolution) -> Self {
        Decision {
            resolution,
            reason: None,
            conflict_id: None,
            side_writes: Vec::new(),
        }
    }
}

impl Decision {
    /// Set the reason.
    pub fn with_reason(mut self, reason: impl Into<String>) -> Self {
        self.reason = Some(reason.into());
        self
    }

    /// The outcome class.
    pub fn outcome_kind(&self) -> OutcomeKind {
        match &self.resolution {
            Resolution::Reject { .. } => OutcomeKind::Rejected,
            _ if self.conflict_id.is_some() => OutcomeKind::NeedsReview,
            Resolution::Keep { .. } => OutcomeKind::Merged,
            Resolution::Write { lost, .. } if !lost.is_empty() => OutcomeKind::Merged,
            _ if self.reason.is_some() => OutcomeKind::Merged,
            _ => OutcomeKind::Applied,
        }
    }

    /// The reason given with a `merged` or `rejected` outcome (`None` for
    /// the others).
    pub fn outcome_reason(&self) -> Option<String> {
        match (self.outcome_kind(), &self.resolution) {
            (OutcomeKind::Rejected, Resolution::Reject { reason }) => Some(reason.clone()),
            (OutcomeKind::Merged, Resolution::Keep { reason, .. }) => {
                Some(self.reason.clone().unwrap_or_else(|| reason.clone()))
            }
            (OutcomeKind::Merged, Resolution::Write { lost, .. }) => Some(
                self.reason
                    .clone()
                    .unwrap_or_else(|| format!("newer writes kept for columns {}", lost.join(", "))),
            ),
            (OutcomeKind::Merged, _) => self.reason.clone(),
            _ => None,
        }
    }

    /// The row after the decision (`None`: absent or deleted), given the
    /// stored row before it.
    pub fn row_after<'r>(&'r self, before: Option<&'r RowData>) -> Option<&'r RowData> {
        match &self.resolution {
            Resolution::Write { row, .. } => Some(row),
            Resolution::Delete { .. } => None,
            Resolution::Keep { row, .. } => row.as_ref(),
            Resolution::Reject { .. } => before,
        }
    }
}

/// Decides the effect of an op on the stored row. Runs inside the server's
/// write transaction; must be deterministic in its input (no clock, no
/// I/O, no randomness).
pub trait ConflictStrategy: Send + Sync + fmt::Debug {
    /// Decide one op.
    fn resolve(&self, input: &ConflictInput<'_>) -> Decision;

    /// Whether every PUT of a row that is not stored (no row, no
    /// tombstone) is decided as [`LastWriteWins`](crate::LastWriteWins)
    /// decides it: written as sent, every column at the op's clock,
    /// nothing lost, no side writes, whatever the rest of the input. A
    /// caller may then skip [`ConflictStrategy::resolve`] for such a PUT
    /// (a bulk import of new rows does). `false` unless a strategy says
    /// so.
    fn writes_new_puts_as_sent(&self) -> bool {
        false
    }
}

impl<S: ConflictStrategy + ?Sized> ConflictStrategy for Arc<S> {
    fn resolve(&self, input: &ConflictInput<'_>) -> Decision {
        (**self).resolve(input)
    }

    fn writes_new_puts_as_sent(&self) -> bool {
        (**self).writes_new_puts_as_sent()
    }
}

impl<S: ConflictStrategy + ?Sized> ConflictStrategy for Box<S> {
    fn resolve(&self, input: &ConflictInput<'_>) -> Decision {
        (**self).resolve(input)
    }

    fn writes_new_puts_as_sent(&self) -> bool {
        (**self).writes_new_puts_as_sent()
    }
}

/// Render a value as JSON text (the format of conflict and activity
/// records).
pub fn json_text<T: serde::Serialize + ?Sized>(v: &T) -> String {
    // Rows and values serialize infallibly (string keys; NaN becomes null).
    serde_json::to_string(v).unwrap_or_else(|_| "null".to_owned())
}
