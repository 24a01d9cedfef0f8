//! Per-column composition.

use std::collections::BTreeMap;
use std::sync::Arc;

use ferry_core::{RowData, Value};

use crate::lww::LastWriteWins;
use crate::strategy::{ConflictInput, ConflictStrategy, Decision, OutcomeKind, Resolution};

/// A default strategy plus strategies for named columns.
///
/// Rule: for a PUT or PATCH of a live row, the op's columns are split into
/// one PATCH per named column (decided by that column's strategy) and one
/// PATCH of the remaining columns (decided by the default). Each strategy
/// decides only its own columns: the value and clock it gives them are
/// taken, anything else it wrote is ignored; a column it kept or lost is
/// left as stored. Any part's rejection rejects the whole op. Side writes
/// of every part are kept, the first conflict id is the op's. Every other
/// op (create, delete, tombstone, missing row) goes to the default whole.
#[derive(Clone, Debug)]
pub struct PerColumn {
    default: Arc<dyn ConflictStrategy>,
    columns: BTreeMap<String, Arc<dyn ConflictStrategy>>,
}

impl Default for PerColumn {
    fn default() -> Self {
        PerColumn::new(LastWriteWins)
    }
}

impl PerColumn {
    /// Columns without their own strategy use `default`.
    pub fn new(default: impl ConflictStrategy + 'static) -> Self {
        PerColumn {
            default: Arc::new(default),
            columns: BTreeMap::new(),
        }
    }

    /// Like [`PerColumn::new`] with a shared strategy.
    pub fn with_default(default: Arc<dyn ConflictStrategy>) -> Self {
        PerColumn {
            default,
            columns: BTreeMap::new(),
        }
    }

    /// Decide `column` with `strategy`.
    pub fn column(self, column: impl Into<String>, strategy: impl ConflictStrategy + 'static) -> Self {
        self.column_arc(column, Arc::new(strategy))
    }

    /// Decide `column` with a shared strategy.
    pub fn column_arc(mut self, column: impl Into<String>, strategy: Arc<dyn ConflictStrategy>) -> Self {
        self.columns.insert(column.into(), strategy);
        self
    }
}

impl ConflictStrategy for PerColumn {
    fn resolve(&self, input: &ConflictInput<'_>) -> Decision {
        let (Some(current), Some(live), Some(data)) = (input.current, input.live(), input.op_data()) else {
            return self.default.resolve(input);
        };
        if !data.keys().any(|c| self.columns.contains_key(c)) {
            return self.default.resolve(input);
        }
        let mut groups: Vec<(RowData, &Arc<dyn ConflictStrategy>)> = Vec::new();
        let mut rest = RowData::new();
        for (c, v) in data {
            match self.columns.get(c) {
                Some(s) => groups.push(([(c.clone(), v.clone())].into_iter().collect(), s)),
                None => {
                    rest.insert(c.clone(), v.clone());
                }
            }
        }
        if !rest.is_empty() {
            groups.push((rest, &self.default));
        }
        combine(input, current.clocks.clone(), live.clone(), groups)
    }
}

/// Decide each group of columns with its strategy and combine the parts
/// (the rule of [`PerColumn`]).
pub(crate) fn combine(
    input: &ConflictInput<'_>,
    mut clocks: BTreeMap<String, ferry_core::HlcTimestamp>,
    mut row: RowData,
    groups: Vec<(RowData, &Arc<dyn ConflictStrategy>)>,
) -> Decision {
    let mut lost = Vec::new();
    let mut reasons: Vec<String> = Vec::new();
    let mut conflict_id = None;
    let mut side_writes = Vec::new();
    let mut applied_any = false;
    for (cols, strategy) in groups {
        let op = input.patch_of(cols);
        let d = strategy.resolve(&input.with_op(&op));
        if d.outcome_kind() == OutcomeKind::Merged {
            reasons.extend(d.outcome_reason());
        }
        side_writes.extend(d.side_writes);
        if conflict_id.is_none() {
            conflict_id = d.conflict_id;
        }
        let cols = match &op {
            ferry_core::CrudOp::Patch { data, .. } => data,
            _ => continue,
        };
        match d.resolution {
            Resolution::Reject { reason } => {
                return Decision {
                    resolution: Resolution::Reject { reason },
                    reason: None,
                    conflict_id: None,
                    side_writes,
                };
            }
            Resolution::Write {
                row: r,
                clocks: c,
                lost: l,
            } => {
                for col in cols.keys() {
                    if l.contains(col) {
                        lost.push(col.clone());
                        continue;
                    }
                    applied_any = true;
                    row.insert(col.clone(), r.get(col).cloned().unwrap_or(Value::Null));
                    if let Some(clock) = c.get(col) {
                        clocks.insert(col.clone(), clock.clone());
                    }
                }
            }
            Resolution::Keep { .. } | Resolution::Delete { .. } => lost.extend(cols.keys().cloned()),
        }
    }
    let reason = (!reasons.is_empty()).then(|| reasons.join("; "));
    let resolution = if applied_any {
        Resolution::Write { row, clocks, lost }
    } else {
        Resolution::Keep {
            reason: reason.clone().unwrap_or_else(|| {
                format!(
                    "row {}/{} kept as stored: no column of the op applied",
                    input.table.name, input.id
                )
            }),
            row: Some(row),
        }
    };
    Decision {
        resolution,
        reason,
        conflict_id,
        side_writes,
    }
}
