//! Client schema: tables, typed columns, indexes and table options.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{truncate_for_message, CoreError};
use crate::limits::Limits;
use crate::value::{row_size_bytes, RowData, Value};

/// The declared type of a column. Every column is nullable, as in SQLite.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ColumnType {
    /// 64-bit integers (booleans are 0 and 1).
    Integer,
    /// 64-bit floats; integers given for a real column are stored as reals.
    Real,
    /// UTF-8 text.
    Text,
    /// Raw bytes.
    Blob,
}

impl ColumnType {
    /// The type name, as used in error messages.
    pub fn name(self) -> &'static str {
        match self {
            ColumnType::Integer => "integer",
            ColumnType::Real => "real",
            ColumnType::Text => "text",
            ColumnType::Blob => "blob",
        }
    }
}

/// One column of a table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Column {
    /// The column name.
    pub name: String,
    /// Its type.
    #[serde(rename = "type")]
    pub ty: ColumnType,
}

/// A declared index: an ordered list of columns. The store keeps index
/// entries for the synced layer so range scans do not read the whole table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Index {
    /// The index name, unique within its table.
    pub name: String,
    /// The indexed columns, most significant first.
    pub columns: Vec<String>,
}

/// A table of the client schema.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Table {
    /// The table name.
    pub name: String,
    /// Its columns, not counting the implicit text `id`.
    pub columns: Vec<Column>,
    /// Declared indexes.
    #[serde(default)]
    pub indexes: Vec<Index>,
    /// Rows live only on this device and are never uploaded.
    #[serde(default)]
    pub local_only: bool,
    /// Rows are uploaded but not kept locally (logs, events).
    #[serde(default)]
    pub insert_only: bool,
    /// Record the previous values of changed columns in upload queue entries.
    #[serde(default)]
    pub track_previous_values: bool,
}

impl Table {
    /// A table with the given columns and no options.
    pub fn new(name: impl Into<String>) -> Self {
        Table {
            name: name.into(),
            columns: Vec::new(),
            indexes: Vec::new(),
            local_only: false,
            insert_only: false,
            track_previous_values: false,
        }
    }

    /// Add a column.
    pub fn column(mut self, name: impl Into<String>, ty: ColumnType) -> Self {
        self.columns.push(Column { name: name.into(), ty });
        self
    }

    /// Add an index over the given columns.
    pub fn index(mut self, name: impl Into<String>, columns: &[&str]) -> Self {
        self.indexes.push(Index {
            name: name.into(),
            columns: columns.iter().map(|c| (*c).to_owned()).collect(),
        });
        self
    }

    /// Mark the table local-only.
    pub fn local_only(mut self) -> Self {
        self.local_only = true;
        self
    }

    /// Mark the table insert-only.
    pub fn insert_only(mut self) -> Self {
        self.insert_only = true;
        self
    }

    /// Record previous values in queue entries.
    pub fn track_previous_values(mut self) -> Self {
        self.track_previous_values = true;
        self
    }

    /// The column with this name.
    pub fn column_def(&self, name: &str) -> Option<&Column> {
        self.columns.iter().find(|c| c.name == name)
    }

    /// The index with this name.
    pub fn index_def(&self, name: &str) -> Option<&Index> {
        self.indexes.iter().find(|i| i.name == name)
    }

    /// Check a row id.
    pub fn check_id(&self, id: &str, limits: &Limits) -> Result<(), CoreError> {
        let reason = if id.is_empty() {
            Some("empty")
        } else if id.len() > limits.max_id_bytes {
            Some("longer than the id limit")
        } else if id.contains('\0') {
            Some("contains a NUL byte")
        } else {
            None
        };
        match reason {
            Some(reason) => Err(CoreError::InvalidId {
                table: self.name.clone(),
                id: truncate_for_message(id.to_owned()),
                reason,
            }),
            None => Ok(()),
        }
    }

    /// Check values against the column types, coercing integers given for
    /// real columns. `id` is not a column and must not appear in `data`.
    /// Returns the data as it will be stored.
    pub fn check_data(&self, mut data: RowData) -> Result<RowData, CoreError> {
        // Checked in place: a row is moved through, never rebuilt.
        for (name, value) in data.iter_mut() {
            let Some(col) = self.column_def(name) else {
                return Err(CoreError::UnknownColumn {
                    table: self.name.clone(),
                    column: name.clone(),
                });
            };
            match (col.ty, &*value) {
                (ColumnType::Real, Value::Real(r)) if !r.is_finite() => {
                    return Err(CoreError::NonFinite {
                        table: self.name.clone(),
                        column: name.clone(),
                        value: r.to_string(),
                    })
                }
                (_, Value::Null)
                | (ColumnType::Integer, Value::Integer(_))
                | (ColumnType::Real, Value::Real(_))
                | (ColumnType::Text, Value::Text(_))
                | (ColumnType::Blob, Value::Blob(_)) => {}
                (ColumnType::Real, Value::Integer(i)) => *value = Value::Real(*i as f64),
                (ty, v) => {
                    return Err(CoreError::WrongType {
                        table: self.name.clone(),
                        column: name.clone(),
                        expected: ty.name(),
                        actual: v.type_name(),
                        value: truncate_for_message(v.to_string()),
                    })
                }
            }
        }
        Ok(data)
    }

    /// Check a whole row: id, column types and size. Returns the stored data.
    pub fn check_row(&self, id: &str, data: RowData, limits: &Limits) -> Result<RowData, CoreError> {
        self.check_id(id, limits)?;
        let data = self.check_data(data)?;
        let size_bytes = row_size_bytes(id, &data);
        if size_bytes > limits.max_row_bytes {
            return Err(CoreError::RowTooLarge {
                table: self.name.clone(),
                id: truncate_for_message(id.to_owned()),
                size_bytes,
                limit_bytes: limits.max_row_bytes,
            });
        }
        Ok(data)
    }

    fn validate(&self) -> Result<(), CoreError> {
        let bad = |msg: String| Err(CoreError::InvalidSchema(msg));
        if !valid_name(&self.name) {
            return bad(format!("invalid table name {:?}", self.name));
        }
        if self.local_only && self.insert_only {
            return bad(format!(
                "table {:?} cannot be both local_only and insert_only",
                self.name
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        for c in &self.columns {
            if !valid_name(&c.name) || c.name == "id" {
                return bad(format!("invalid column name {:?} in table {:?}", c.name, self.name));
            }
            if !seen.insert(&c.name) {
                return bad(format!("duplicate column {:?} in table {:?}", c.name, self.name));
            }
        }
        let mut seen_idx = std::collections::BTreeSet::new();
        for i in &self.indexes {
            if !valid_name(&i.name) || !seen_idx.insert(&i.name) {
                return bad(format!(
                    "invalid or duplicate index name {:?} in table {:?}",
                    i.name, self.name
                ));
            }
            if i.columns.is_empty() {
                return bad(format!("index {:?} of table {:?} has no columns", i.name, self.name));
            }
            for c in &i.columns {
                if self.column_def(c).is_none() {
                    return bad(format!(
                        "index {:?} of table {:?} names unknown column {:?}",
                        i.name, self.name, c
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Names are ASCII letters, digits and underscores, not starting with a
/// digit, at most 64 bytes. Keeps them safe in SQL and in keys.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.as_bytes()[0].is_ascii_digit()
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// The client schema: a set of tables.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Schema {
    tables: BTreeMap<String, Table>,
}

impl Schema {
    /// Build a schema, checking names, duplicate tables and index columns.
    pub fn new(tables: impl IntoIterator<Item = Table>) -> Result<Self, CoreError> {
        let mut map = BTreeMap::new();
        for t in tables {
            t.validate()?;
            if map.contains_key(&t.name) {
                return Err(CoreError::InvalidSchema(format!("duplicate table {:?}", t.name)));
            }
            map.insert(t.name.clone(), t);
        }
        Ok(Schema { tables: map })
    }

    /// The table with this name, or an error naming it.
    pub fn table(&self, name: &str) -> Result<&Table, CoreError> {
        self.tables.get(name).ok_or_else(|| CoreError::UnknownTable {
            table: truncate_for_message(name.to_owned()),
        })
    }

    /// All tables, by name.
    pub fn tables(&self) -> impl Iterator<Item = &Table> {
        self.tables.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::value::row_data;

    fn tickets() -> Table {
        Table::new("tickets")
            .column("title", ColumnType::Text)
            .column("version", ColumnType::Integer)
            .column("score", ColumnType::Real)
    }

    #[test]
    fn checks_types_and_names() {
        let t = tickets();
        let cases: Vec<(RowData, Result<(), &str>)> = vec![
            (row_data([("title", "a".into())]), Ok(())),
            (row_data([("title", Value::Null)]), Ok(())),
            (row_data([("score", 1.into())]), Ok(())),
            (
                row_data([("title", 1.into())]),
                Err("column tickets.title is text, got integer value 1"),
            ),
            (
                row_data([("nope", 1.into())]),
                Err("unknown column \"nope\" in table \"tickets\""),
            ),
            (
                row_data([("version", 1.5.into())]),
                Err("column tickets.version is integer, got real value 1.5"),
            ),
            // JSON has no NaN or infinity: sent, they would become NULL.
            (
                row_data([("score", Value::Real(f64::NAN))]),
                Err("column tickets.score takes finite numbers only, got NaN"),
            ),
            (
                row_data([("score", Value::Real(f64::NEG_INFINITY))]),
                Err("column tickets.score takes finite numbers only, got -inf"),
            ),
        ];
        for (data, expected) in cases {
            let got = t.check_data(data.clone()).map(|_| ()).map_err(|e| e.to_string());
            assert_eq!(got, expected.map_err(str::to_owned), "for {data:?}");
        }
        let coerced = t.check_data(row_data([("score", 2.into())])).expect("valid");
        assert!(matches!(coerced["score"], Value::Real(r) if r == 2.0));
    }

    #[test]
    fn rejects_bad_schemas() {
        let cases = vec![
            vec![tickets(), tickets()],
            vec![Table::new("1x")],
            vec![Table::new("t").column("id", ColumnType::Text)],
            vec![Table::new("t").index("i", &["missing"])],
            vec![Table::new("t").local_only().insert_only()],
        ];
        for tables in cases {
            assert!(Schema::new(tables.clone()).is_err(), "{tables:?}");
        }
    }

    #[test]
    fn row_limits() {
        let limits = Limits {
            max_row_bytes: 16,
            ..Limits::default()
        };
        let t = tickets();
        assert!(t.check_row("", RowData::new(), &limits).is_err());
        let big = row_data([("title", "x".repeat(100).into())]);
        let err = t.check_row("r1", big, &limits).expect_err("too big");
        assert!(err.to_string().contains("over the limit of 16 bytes"), "{err}");
    }
}
