//! Source rows and change sets.

use std::sync::Arc;

use ferry_core::RowData;

/// A row as stored in a source collection.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct SrcRow {
    pub id: Arc<str>,
    pub data: RowData,
    pub pending: bool,
}

/// One change to one collection.
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    /// Insert the row, or replace the row with this id.
    Upsert {
        /// The collection.
        collection: String,
        /// The row id.
        id: String,
        /// All column values (absent columns read as NULL).
        data: RowData,
        /// Whether the row has local writes not yet acknowledged.
        pending: bool,
    },
    /// Delete the row with this id (a missing row is ignored).
    Delete {
        /// The collection.
        collection: String,
        /// The row id.
        id: String,
    },
}

/// A transaction: changes applied together by [`crate::QueryEngine::apply`],
/// producing at most one diff per affected subscription.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ChangeSet {
    /// The changes, applied in order.
    pub changes: Vec<Change>,
}

impl ChangeSet {
    /// An empty change set.
    pub fn new() -> ChangeSet {
        ChangeSet::default()
    }

    /// Add an upsert.
    pub fn upsert(
        mut self,
        collection: impl Into<String>,
        id: impl Into<String>,
        data: RowData,
        pending: bool,
    ) -> ChangeSet {
        self.changes.push(Change::Upsert {
            collection: collection.into(),
            id: id.into(),
            data,
            pending,
        });
        self
    }

    /// Add a delete.
    pub fn delete(mut self, collection: impl Into<String>, id: impl Into<String>) -> ChangeSet {
        self.changes.push(Change::Delete {
            collection: collection.into(),
            id: id.into(),
        });
        self
    }

    /// Whether there is nothing to apply.
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }
}
