//! Local CRUD operations as they sit in the upload queue.

use serde::{Deserialize, Serialize};

use crate::clock::HlcTimestamp;
use crate::value::RowData;

/// One local change to one row.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "UPPERCASE")]
pub enum CrudOp {
    /// Create or replace the whole row.
    Put {
        /// The table.
        table: String,
        /// The row id.
        id: String,
        /// Every column value of the row.
        data: RowData,
    },
    /// Change some columns of an existing row: `data` holds only the
    /// columns that changed.
    Patch {
        /// The table.
        table: String,
        /// The row id.
        id: String,
        /// The changed columns and their new values.
        data: RowData,
    },
    /// Delete the row.
    Delete {
        /// The table.
        table: String,
        /// The row id.
        id: String,
    },
}

impl CrudOp {
    /// The table the op changes.
    pub fn table(&self) -> &str {
        match self {
            CrudOp::Put { table, .. } | CrudOp::Patch { table, .. } | CrudOp::Delete { table, .. } => table,
        }
    }

    /// The id of the row the op changes.
    pub fn id(&self) -> &str {
        match self {
            CrudOp::Put { id, .. } | CrudOp::Patch { id, .. } | CrudOp::Delete { id, .. } => id,
        }
    }

    /// The op's name: PUT, PATCH or DELETE.
    pub fn kind_name(&self) -> &'static str {
        match self {
            CrudOp::Put { .. } => "PUT",
            CrudOp::Patch { .. } => "PATCH",
            CrudOp::Delete { .. } => "DELETE",
        }
    }

    /// Apply the op to the row it targets, giving the row after it
    /// (`None` when the row does not exist afterwards). A patch of a missing
    /// row leaves it missing, as a SQL UPDATE would.
    pub fn apply_to(&self, current: Option<RowData>) -> Option<RowData> {
        match self {
            CrudOp::Put { data, .. } => Some(data.clone()),
            CrudOp::Patch { data, .. } => current.map(|mut row| {
                for (k, v) in data {
                    row.insert(k.clone(), v.clone());
                }
                row
            }),
            CrudOp::Delete { .. } => None,
        }
    }
}

/// One entry of the upload queue: an op with its place in the client's
/// history.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CrudEntry {
    /// Client sequence number: unique, strictly increasing, never reused,
    /// not even after the queue empties. The server deduplicates on
    /// `(client_id, seq)`.
    pub seq: u64,
    /// The local transaction the op belongs to; ops of one transaction are
    /// contiguous in the queue.
    pub tx_id: u64,
    /// The change.
    #[serde(flatten)]
    pub op: CrudOp,
    /// Previous values of the changed columns, for tables that track them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<RowData>,
    /// Free-form metadata the app attached to the write.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<String>,
    /// When the write was made, on the client's hybrid logical clock
    /// (orders concurrent writes for last-write-wins).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hlc: Option<HlcTimestamp>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::value::{row_data, Value};

    #[test]
    fn apply_semantics() {
        let base = row_data([("a", Value::from(1)), ("b", Value::from("x"))]);
        let patch = CrudOp::Patch {
            table: "t".into(),
            id: "1".into(),
            data: row_data([("b", Value::from("y"))]),
        };
        assert_eq!(
            patch.apply_to(Some(base.clone())),
            Some(row_data([("a", Value::from(1)), ("b", Value::from("y"))]))
        );
        assert_eq!(patch.apply_to(None), None);
        let del = CrudOp::Delete {
            table: "t".into(),
            id: "1".into(),
        };
        assert_eq!(del.apply_to(Some(base)), None);
    }

    #[test]
    fn entry_json_shape() {
        let e = CrudEntry {
            seq: 7,
            tx_id: 3,
            op: CrudOp::Delete {
                table: "t".into(),
                id: "r".into(),
            },
            previous: None,
            metadata: None,
            hlc: None,
        };
        let s = serde_json::to_string(&e).expect("serialize");
        assert_eq!(s, r#"{"seq":7,"tx_id":3,"op":"DELETE","table":"t","id":"r"}"#);
        let back: CrudEntry = serde_json::from_str(&s).expect("deserialize");
        assert_eq!(back, e);
    }
}
