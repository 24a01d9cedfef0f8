//! Source rows and change sets.

use std::sync::Arc;

use ferry_core::{RowData, Value};

/// The sorted column names shared by rows of one collection that have the
/// same columns. Lookups search these (cache-hot) names instead of each
/// row's own map.
#[derive(Debug, PartialEq, Eq, Hash)]
pub(crate) struct Shape {
    names: Vec<String>,
}

impl Shape {
    fn slot(&self, column: &str) -> Option<usize> {
        self.names.binary_search_by(|n| n.as_str().cmp(column)).ok()
    }

    fn matches(&self, data: &RowData) -> bool {
        self.names.len() == data.len() && self.names.iter().zip(data.keys()).all(|(a, b)| a == b)
    }
}

/// Interns shapes for one collection.
#[derive(Debug, Default)]
pub(crate) struct Shapes {
    last: Option<Arc<Shape>>,
    all: std::collections::HashMap<Vec<String>, Arc<Shape>>,
}

/// Most distinct column sets one collection interns; beyond it rows get a
/// shape of their own (still correct, only less sharing).
const MAX_SHAPES_PER_COLLECTION: usize = 1024;

impl Shapes {
    /// A row stored as its shape plus values.
    pub(crate) fn row(&mut self, id: Arc<str>, data: RowData, pending: bool, hint: Option<&Arc<Shape>>) -> SrcRow {
        SrcRow {
            id,
            shape: self.shape_of(&data, hint),
            vals: data.into_values().collect(),
            pending,
        }
    }

    /// [`Shapes::row`] of a borrowed row: only its values are copied.
    pub(crate) fn row_of(&mut self, id: Arc<str>, data: &RowData, pending: bool, hint: Option<&Arc<Shape>>) -> SrcRow {
        SrcRow {
            id,
            shape: self.shape_of(data, hint),
            vals: data.values().cloned().collect(),
            pending,
        }
    }

    /// The interned shape of a row's columns.
    fn shape_of(&mut self, data: &RowData, hint: Option<&Arc<Shape>>) -> Arc<Shape> {
        let shape = match (hint, &self.last) {
            (Some(h), _) if h.matches(data) => h.clone(),
            (_, Some(l)) if l.matches(data) => l.clone(),
            _ => {
                let names: Vec<String> = data.keys().cloned().collect();
                match self.all.get(&names) {
                    Some(s) => s.clone(),
                    None => {
                        let s = Arc::new(Shape { names: names.clone() });
                        if self.all.len() < MAX_SHAPES_PER_COLLECTION {
                            self.all.insert(names, s.clone());
                        }
                        s
                    }
                }
            }
        };
        self.last = Some(shape.clone());
        shape
    }
}

/// A row as stored in a source collection.
#[derive(Clone, Debug)]
pub(crate) struct SrcRow {
    pub id: Arc<str>,
    pub shape: Arc<Shape>,
    pub vals: Vec<Value>,
    pub pending: bool,
}

impl SrcRow {
    /// A column's value, if present.
    pub(crate) fn get(&self, column: &str) -> Option<&Value> {
        self.shape.slot(column).and_then(|i| self.vals.get(i))
    }

    /// Columns and values in column order.
    pub(crate) fn columns(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.shape.names.iter().map(String::as_str).zip(&self.vals)
    }

    /// The row's data, copied out.
    pub(crate) fn data(&self) -> ferry_core::RowData {
        self.columns().map(|(k, v)| (k.to_owned(), v.clone())).collect()
    }
}

/// One change to one row of a collection, borrowed: what
/// [`crate::QueryEngine::apply_rows`] takes (the engine copies the values
/// it keeps, never the map).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RowRef<'a> {
    /// Insert the row, or replace the row with this id.
    Upsert {
        /// The row id.
        id: &'a str,
        /// All column values (absent columns read as NULL).
        data: &'a RowData,
        /// Whether the row has local writes not yet acknowledged.
        pending: bool,
    },
    /// Delete the row with this id (a missing row is ignored).
    Delete {
        /// The row id.
        id: &'a str,
    },
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
