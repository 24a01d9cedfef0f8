//! Query results and subscription diffs.

use ferry_core::{RowData, Value};
use serde::de::DeserializeOwned;

use crate::error::QueryError;

/// One result row.
#[derive(Clone, Debug, PartialEq)]
pub struct ResultRow {
    /// The row's identity: the source row ids (joined queries: one per
    /// source, NULL for a missing outer side), the group key values (grouped
    /// queries) or the row's values (distinct queries).
    pub key: Vec<Value>,
    /// The output columns.
    pub data: RowData,
    /// Whether any row it was computed from has pending local writes.
    pub pending: bool,
}

impl ResultRow {
    /// The source row id, for a query over one collection.
    pub fn id(&self) -> Option<&str> {
        match self.key.as_slice() {
            [Value::Text(id)] => Some(id),
            _ => None,
        }
    }

    /// A column value (NULL when absent).
    pub fn get(&self, column: &str) -> &Value {
        static NULL: Value = Value::Null;
        self.data.get(column).unwrap_or(&NULL)
    }

    /// Deserialize the row's columns into an app type (via serde_json).
    pub fn to_struct<T: DeserializeOwned>(&self) -> Result<T, QueryError> {
        let json = serde_json::to_value(&self.data).map_err(|e| QueryError::Deserialize { message: e.to_string() })?;
        serde_json::from_value(json).map_err(|e| QueryError::Deserialize { message: e.to_string() })
    }
}

/// A query result: rows in result order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct QueryResult {
    /// The rows.
    pub rows: Vec<ResultRow>,
}

impl QueryResult {
    /// The first row (the answer of a `find_one` query).
    pub fn first(&self) -> Option<&ResultRow> {
        self.rows.first()
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Every row deserialized into an app type.
    pub fn rows_as<T: DeserializeOwned>(&self) -> Result<Vec<T>, QueryError> {
        self.rows.iter().map(ResultRow::to_struct).collect()
    }

    /// Bring this result up to date with a diff of the same subscription:
    /// remove every `removed` and `updated` row at its old index (indices
    /// refer to the previous result), then insert every `added` and
    /// `updated` row at its new index in ascending order (indices refer to
    /// the new result).
    pub fn apply_diff(&mut self, diff: &Diff) {
        let mut old: Vec<usize> = diff.removed.iter().map(|r| r.index).collect();
        old.extend(diff.updated.iter().map(|u| u.old_index));
        old.sort_unstable();
        for i in old.into_iter().rev() {
            if i < self.rows.len() {
                self.rows.remove(i);
            }
        }
        let mut new: Vec<(usize, &ResultRow)> = diff.added.iter().map(|a| (a.index, &a.row)).collect();
        new.extend(diff.updated.iter().map(|u| (u.new_index, &u.new)));
        new.sort_by_key(|(i, _)| *i);
        for (i, row) in new {
            let i = i.min(self.rows.len());
            self.rows.insert(i, row.clone());
        }
    }
}

/// A row that entered the result.
#[derive(Clone, Debug, PartialEq)]
pub struct Added {
    /// Its index in the new result.
    pub index: usize,
    /// The row.
    pub row: ResultRow,
}

/// A row that left the result.
#[derive(Clone, Debug, PartialEq)]
pub struct Removed {
    /// Its index in the previous result.
    pub index: usize,
    /// The row as it was.
    pub row: ResultRow,
}

/// A row (same identity) whose values, pending flag or position changed.
#[derive(Clone, Debug, PartialEq)]
pub struct Updated {
    /// Index in the previous result.
    pub old_index: usize,
    /// Index in the new result.
    pub new_index: usize,
    /// The row as it was.
    pub old: ResultRow,
    /// The row as it is.
    pub new: ResultRow,
}

/// Names a live query of one [`crate::QueryEngine`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SubscriptionId(pub u64);

impl std::fmt::Display for SubscriptionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// What one transaction changed in one live query's result.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Diff {
    /// The subscription.
    pub subscription: SubscriptionId,
    /// Rows that entered the result.
    pub added: Vec<Added>,
    /// Rows that left the result.
    pub removed: Vec<Removed>,
    /// Rows that changed.
    pub updated: Vec<Updated>,
}

impl Diff {
    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.updated.is_empty()
    }
}
