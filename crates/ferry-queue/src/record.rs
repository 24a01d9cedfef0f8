//! The app's own serde structs as rows.
//!
//! A [`Record`] is a struct with an `id` field that serializes to a JSON
//! object. Fields map to columns by name; numbers, strings and `null` map
//! to the column's type; booleans are stored as integers 0 and 1; nested
//! objects and arrays are stored as JSON text in text columns. Reading
//! back goes the other way.

use ferry_core::{ColumnType, RowData, Schema, Value};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::{QueueError, QueueResult};

/// A struct stored as a row of one table.
pub trait Record: Serialize + DeserializeOwned {
    /// The table its rows live in.
    const TABLE: &'static str;
}

fn record_error(table: &str, message: impl Into<String>) -> QueueError {
    QueueError::Record {
        table: table.to_owned(),
        message: message.into(),
    }
}

/// Convert a record to its id and row data, typed by the schema.
pub fn record_to_row<T: Record>(schema: &Schema, record: &T) -> QueueResult<(String, RowData)> {
    let table = schema.table(T::TABLE)?;
    let json = serde_json::to_value(record).map_err(|e| record_error(T::TABLE, e.to_string()))?;
    let serde_json::Value::Object(mut fields) = json else {
        return Err(record_error(T::TABLE, "a record must serialize to an object"));
    };
    let id = match fields.remove("id") {
        Some(serde_json::Value::String(id)) => id,
        Some(other) => return Err(record_error(T::TABLE, format!("id must be a string, got {other}"))),
        None => return Err(record_error(T::TABLE, "a record needs an id field")),
    };
    let mut data = RowData::new();
    for (name, v) in fields {
        // Unknown columns pass through untyped: the schema check names them.
        let ty = table.column_def(&name).map(|c| c.ty);
        let value = match (v, ty) {
            (serde_json::Value::Null, _) => Value::Null,
            (serde_json::Value::Bool(b), _) => Value::Integer(b.into()),
            (serde_json::Value::Number(n), Some(ColumnType::Real)) => Value::Real(n.as_f64().unwrap_or(f64::NAN)),
            (serde_json::Value::Number(n), _) => match n.as_i64() {
                Some(i) => Value::Integer(i),
                None => Value::Real(n.as_f64().unwrap_or(f64::NAN)),
            },
            (serde_json::Value::String(s), _) => Value::Text(s),
            (serde_json::Value::Array(items), Some(ColumnType::Blob)) => {
                let bytes: Option<Vec<u8>> = items
                    .iter()
                    .map(|i| i.as_u64().and_then(|b| u8::try_from(b).ok()))
                    .collect();
                Value::Blob(bytes.ok_or_else(|| record_error(T::TABLE, format!("column {name} expects bytes")))?)
            }
            (nested, _) => Value::Text(nested.to_string()),
        };
        data.insert(name, value);
    }
    Ok((id, data))
}

/// Convert a row back to a record.
pub fn record_from_row<T: Record>(id: &str, data: RowData) -> QueueResult<T> {
    let mut fields = serde_json::Map::new();
    fields.insert("id".into(), serde_json::Value::String(id.to_owned()));
    for (name, v) in data {
        let json = match v {
            Value::Null => serde_json::Value::Null,
            Value::Integer(i) => i.into(),
            Value::Real(r) => serde_json::Number::from_f64(r).map_or(serde_json::Value::Null, Into::into),
            Value::Text(s) => s.into(),
            Value::Blob(b) => b.into_iter().map(serde_json::Value::from).collect(),
        };
        fields.insert(name, json);
    }
    serde_json::from_value(serde_json::Value::Object(fields)).map_err(|e| record_error(T::TABLE, e.to_string()))
}
