//! Manual conflict resolution, client side.
//!
//! A server using the manual strategy records a conflict it will not decide
//! as a row of the synced table `ferry_conflicts` (id
//! `"{client_id}:{seq}:{column}"`; values as JSON text) and answers the op
//! with outcome `needs_review { conflict_id }`. The row reaches every
//! client like any other data. [`Database::open_conflicts`] lists the open
//! ones; [`Database::resolve_conflict`] writes the chosen value to the
//! target row and marks the conflict resolved in one local transaction, so
//! both travel to the server together and every client sees it closed.
//!
//! The app's schema must declare the table: add [`conflicts_table`].

use ferry_core::{row_data, ColumnType, RowData, Table, Value};
use ferry_queue::QueueError;

use crate::{ClientError, Database};

/// The synced table holding conflicts for manual resolution.
pub const CONFLICTS_TABLE: &str = "ferry_conflicts";

/// Status of a conflict waiting for a person.
pub const STATUS_OPEN: &str = "open";
/// Status of a resolved conflict.
pub const STATUS_RESOLVED: &str = "resolved";

/// The `ferry_conflicts` table, to add to the client schema.
pub fn conflicts_table() -> Table {
    Table::new(CONFLICTS_TABLE)
        .column("table_name", ColumnType::Text)
        .column("row_id", ColumnType::Text)
        .column("field", ColumnType::Text)
        .column("local_value", ColumnType::Text)
        .column("server_value", ColumnType::Text)
        .column("base_value", ColumnType::Text)
        .column("user_id", ColumnType::Text)
        .column("client_id", ColumnType::Text)
        .column("created_at", ColumnType::Text)
        .column("status", ColumnType::Text)
        .column("resolution", ColumnType::Text)
        .index("by_status", &["status"])
}

/// A conflict recorded by the server for a person to resolve.
#[derive(Clone, Debug, PartialEq)]
pub struct Conflict {
    /// The conflict row's id.
    pub id: String,
    /// The table of the conflicting row.
    pub table: String,
    /// The conflicting row's id.
    pub row_id: String,
    /// The conflicting column.
    pub field: String,
    /// The value the op wanted to write.
    pub local: Value,
    /// The value on the server when the op arrived.
    pub server: Value,
    /// The value the op's author last saw (its previous value).
    pub base: Value,
    /// The user whose op conflicted.
    pub user_id: String,
    /// The client whose op conflicted.
    pub client_id: String,
    /// When the server recorded it (ms since the epoch; 0 if unreadable).
    pub created_at: u64,
    /// `open` or `resolved`.
    pub status: String,
    /// The chosen value, once resolved.
    pub resolution: Option<Value>,
}

/// How to resolve a conflict.
#[derive(Clone, Debug, PartialEq)]
pub enum Resolution {
    /// Keep the value the conflicting op wanted.
    Local,
    /// Keep the server's value.
    Server,
    /// Write this value instead (e.g. a merge of both).
    Custom(Value),
}

fn text(row: &RowData, col: &str) -> String {
    row.get(col).and_then(Value::as_text).unwrap_or_default().to_owned()
}

/// A value stored as JSON text; unreadable JSON is kept as text.
fn json_value(row: &RowData, col: &str) -> Value {
    match row.get(col) {
        None | Some(Value::Null) => Value::Null,
        Some(Value::Text(s)) => serde_json::from_str(s).unwrap_or_else(|_| Value::Text(s.clone())),
        Some(other) => other.clone(),
    }
}

impl Conflict {
    /// Read a `ferry_conflicts` row.
    pub fn from_row(id: &str, row: &RowData) -> Self {
        Conflict {
            id: id.to_owned(),
            table: text(row, "table_name"),
            row_id: text(row, "row_id"),
            field: text(row, "field"),
            local: json_value(row, "local_value"),
            server: json_value(row, "server_value"),
            base: json_value(row, "base_value"),
            user_id: text(row, "user_id"),
            client_id: text(row, "client_id"),
            created_at: text(row, "created_at").parse().unwrap_or(0),
            status: text(row, "status"),
            resolution: match row.get("resolution") {
                None | Some(Value::Null) => None,
                Some(_) => Some(json_value(row, "resolution")),
            },
        }
    }

    /// Whether it still waits for a person.
    pub fn is_open(&self) -> bool {
        self.status == STATUS_OPEN
    }
}

fn to_json(value: &Value) -> Result<String, QueueError> {
    serde_json::to_string(value).map_err(|e| QueueError::Record {
        table: CONFLICTS_TABLE.to_owned(),
        message: format!("encoding the resolution {value}: {e}"),
    })
}

impl Database {
    /// Every conflict in the visible state, open or resolved, oldest first.
    pub fn conflicts(&self) -> Result<Vec<Conflict>, ClientError> {
        let mut out: Vec<Conflict> = self
            .local()
            .scan(CONFLICTS_TABLE)?
            .iter()
            .map(|(id, row)| Conflict::from_row(id, row))
            .collect();
        out.sort_by(|a, b| a.created_at.cmp(&b.created_at).then_with(|| a.id.cmp(&b.id)));
        Ok(out)
    }

    /// The open conflicts in the visible state, oldest first.
    pub fn open_conflicts(&self) -> Result<Vec<Conflict>, ClientError> {
        Ok(self.conflicts()?.into_iter().filter(Conflict::is_open).collect())
    }

    /// One conflict, open or resolved.
    pub fn conflict(&self, id: &str) -> Result<Option<Conflict>, ClientError> {
        Ok(self
            .local()
            .get(CONFLICTS_TABLE, id)?
            .map(|row| Conflict::from_row(id, &row)))
    }

    /// Resolve an open conflict: in one transaction, write the chosen value
    /// to the conflicting row's column and mark the conflict `resolved`
    /// with the value as its `resolution`. Returns the value written.
    ///
    /// Errors: the conflict does not exist or is already resolved, the
    /// conflicting row is gone, or the value does not fit the column.
    pub fn resolve_conflict(&self, id: &str, resolution: Resolution) -> Result<Value, ClientError> {
        self.write(|tx| {
            let row = tx.get(CONFLICTS_TABLE, id)?.ok_or_else(|| QueueError::Refused {
                reason: format!("conflict {id:?} does not exist"),
            })?;
            let conflict = Conflict::from_row(id, &row);
            if !conflict.is_open() {
                return Err(QueueError::Refused {
                    reason: format!("conflict {id:?} is already {}", conflict.status),
                }
                .into());
            }
            let value = match resolution {
                Resolution::Local => conflict.local.clone(),
                Resolution::Server => conflict.server.clone(),
                Resolution::Custom(v) => v,
            };
            if tx.get(&conflict.table, &conflict.row_id)?.is_none() {
                return Err(QueueError::Refused {
                    reason: format!(
                        "conflict {id:?}: row {}/{} no longer exists",
                        conflict.table, conflict.row_id
                    ),
                }
                .into());
            }
            tx.update(
                &conflict.table,
                &conflict.row_id,
                row_data([(conflict.field.clone(), value.clone())]),
            )?;
            tx.update(
                CONFLICTS_TABLE,
                id,
                row_data([
                    ("status", Value::from(STATUS_RESOLVED)),
                    ("resolution", Value::from(to_json(&value)?)),
                ]),
            )?;
            Ok::<_, ClientError>(value)
        })
    }
}
