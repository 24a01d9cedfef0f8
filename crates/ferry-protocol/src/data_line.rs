//! Assembling an encoded `data` line without typed rows: a server that
//! keeps each op's row as JSON text writes it into the line as it is.
//!
//! The bytes are exactly what [`crate::encode_line`] produces for the
//! equivalent [`StreamLine::Data`](crate::StreamLine::Data) when each row's
//! JSON is what `serde_json` writes for its [`RowData`](ferry_core::RowData)
//! (the tests check this), so clients cannot tell the two apart.

use crate::messages::{OpKind, OplogEntry};

/// Builds one encoded `data` line of one bucket.
#[derive(Debug)]
pub struct DataLineWriter {
    buf: Vec<u8>,
    ops: usize,
}

fn op_name(op: OpKind) -> &'static str {
    match op {
        OpKind::Put => "PUT",
        OpKind::Remove => "REMOVE",
        OpKind::Move => "MOVE",
        OpKind::Clear => "CLEAR",
    }
}

fn push_json_str(buf: &mut Vec<u8>, s: &str) {
    // Writing a &str to a Vec does not fail; the fallback keeps this total.
    if serde_json::to_writer(&mut *buf, s).is_err() {
        buf.extend_from_slice(b"\"\"");
    }
}

impl DataLineWriter {
    /// Start a line for `bucket` with room for about `capacity_bytes`.
    pub fn new(bucket: &str, capacity_bytes: usize) -> Self {
        let mut buf = Vec::with_capacity(capacity_bytes.max(64));
        buf.extend_from_slice(b"{\"data\":{\"bucket\":");
        push_json_str(&mut buf, bucket);
        buf.extend_from_slice(b",\"ops\":[");
        DataLineWriter { buf, ops: 0 }
    }

    /// Add an entry. `data_json` must be the JSON object of the row (as
    /// `serde_json` writes a `RowData`); it is copied unchecked.
    pub fn push_raw(
        &mut self,
        op_id: u64,
        op: OpKind,
        object_type: Option<&str>,
        object_id: Option<&str>,
        data_json: Option<&[u8]>,
        checksum: u32,
    ) {
        use std::io::Write;
        if self.ops > 0 {
            self.buf.push(b',');
        }
        self.ops += 1;
        // Writes to a Vec do not fail.
        let _ = write!(self.buf, "{{\"op_id\":{op_id},\"op\":\"{}\"", op_name(op));
        if let Some(t) = object_type {
            self.buf.extend_from_slice(b",\"object_type\":");
            push_json_str(&mut self.buf, t);
        }
        if let Some(id) = object_id {
            self.buf.extend_from_slice(b",\"object_id\":");
            push_json_str(&mut self.buf, id);
        }
        if let Some(d) = data_json {
            self.buf.extend_from_slice(b",\"data\":");
            self.buf.extend_from_slice(d);
        }
        let _ = write!(self.buf, ",\"checksum\":{checksum}}}");
    }

    /// Add a typed entry (its row encoded with `serde_json`).
    pub fn push_entry(&mut self, e: &OplogEntry) {
        let data = e
            .data
            .as_ref()
            .map(|d| serde_json::to_vec(d).unwrap_or_else(|_| b"{}".to_vec()));
        self.push_raw(
            e.op_id,
            e.op,
            e.object_type.as_deref(),
            e.object_id.as_deref(),
            data.as_deref(),
            e.checksum,
        );
    }

    /// Entries added so far.
    pub fn ops(&self) -> usize {
        self.ops
    }

    /// Bytes so far.
    pub fn len_bytes(&self) -> usize {
        self.buf.len()
    }

    /// The finished line, newline included.
    pub fn finish(mut self) -> Vec<u8> {
        self.buf.extend_from_slice(b"]}}\n");
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use ferry_core::{row_data, Value};

    use super::*;
    use crate::messages::{DataBatch, StreamLine};

    #[test]
    fn same_bytes_as_encode_line() {
        let ops = vec![
            OplogEntry {
                op_id: 7,
                op: OpKind::Put,
                object_type: Some("tickets".into()),
                object_id: Some("t\"1\\\n\u{1}é".into()),
                data: Some(row_data([
                    ("title", Value::from("a \"quoted\" title\n")),
                    ("n", Value::Integer(-3)),
                    ("r", Value::Real(1.5e-7)),
                    ("b", Value::Blob(vec![0, 255])),
                    ("z", Value::Null),
                ])),
                checksum: u32::MAX,
            },
            OplogEntry {
                op_id: u64::MAX,
                op: OpKind::Remove,
                object_type: Some("tickets".into()),
                object_id: Some("t2".into()),
                data: None,
                checksum: 0,
            },
            OplogEntry {
                op_id: 9,
                op: OpKind::Clear,
                object_type: None,
                object_id: None,
                data: None,
                checksum: 12,
            },
        ];
        let mut w = DataLineWriter::new("b\"kt", 0);
        for e in &ops {
            w.push_entry(e);
        }
        assert_eq!(w.ops(), 3);
        let expected = crate::encode_line(&StreamLine::Data(DataBatch {
            bucket: "b\"kt".into(),
            ops,
        }));
        assert_eq!(String::from_utf8_lossy(&w.finish()), String::from_utf8_lossy(&expected));
    }

    #[test]
    fn empty_line() {
        let w = DataLineWriter::new("g", 0);
        let expected = crate::encode_line(&StreamLine::Data(DataBatch {
            bucket: "g".into(),
            ops: Vec::new(),
        }));
        assert_eq!(w.finish(), expected);
    }
}
