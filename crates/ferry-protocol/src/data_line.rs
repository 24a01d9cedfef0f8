//! Assembling an encoded `data` line without typed rows: a server that
//! keeps each op's row as JSON text writes it into the line as it is.
//!
//! The bytes are exactly what [`crate::encode_line`] produces for the
//! equivalent [`StreamLine::Data`](crate::StreamLine::Data) when each row's
//! JSON is what `serde_json` writes for its [`RowData`](ferry_core::RowData)
//! (the tests check this), so clients cannot tell the two apart.
//!
//! A writer may be given a size limit ([`DataLineWriter::with_max_line_bytes`]):
//! it then refuses an entry that would make the finished line (newline
//! included) longer than the limit, unless the line has no entry yet (a
//! line carries at least one entry), and every entry after a refused one,
//! so the entries it holds are always a prefix of those offered.

use crate::messages::{OpKind, OplogEntry};

/// The bytes [`DataLineWriter::finish`] appends: `]}}` and the newline.
const CLOSING_BYTES: usize = 4;

/// Builds one encoded `data` line of one bucket.
#[derive(Debug)]
pub struct DataLineWriter {
    buf: Vec<u8>,
    ops: usize,
    max_line_bytes: usize,
    last_op_id: Option<u64>,
    full: bool,
}

use ferry_core::json::push_json_str;

impl DataLineWriter {
    /// Start a line for `bucket` with room for about `capacity_bytes`, with
    /// no size limit.
    pub fn new(bucket: &str, capacity_bytes: usize) -> Self {
        let mut buf = Vec::with_capacity(capacity_bytes.max(64));
        buf.extend_from_slice(b"{\"data\":{\"bucket\":");
        push_json_str(&mut buf, bucket);
        buf.extend_from_slice(b",\"ops\":[");
        DataLineWriter {
            buf,
            ops: 0,
            max_line_bytes: usize::MAX,
            last_op_id: None,
            full: false,
        }
    }

    /// Limit the finished line (newline included) to `max_line_bytes`: an
    /// entry that would pass it is refused, unless it is the first.
    pub fn with_max_line_bytes(mut self, max_line_bytes: usize) -> Self {
        self.max_line_bytes = max_line_bytes;
        self
    }

    /// Lower the size limit to `max_line_bytes` (a higher value changes
    /// nothing).
    pub fn lower_max_line_bytes(&mut self, max_line_bytes: usize) {
        self.max_line_bytes = self.max_line_bytes.min(max_line_bytes);
    }

    /// The line's size limit in bytes, newline included.
    pub fn max_line_bytes(&self) -> usize {
        self.max_line_bytes
    }

    /// Add an entry. `data_json` must be the JSON object of the row (as
    /// `serde_json` writes a `RowData`); it is copied unchecked. Returns
    /// false, adding nothing, when the entry would take the finished line
    /// past the size limit (the line holds an entry already) or an earlier
    /// entry was refused.
    pub fn push_raw(
        &mut self,
        op_id: u64,
        op: OpKind,
        object_type: Option<&str>,
        object_id: Option<&str>,
        data_json: Option<&[u8]>,
        checksum: u32,
    ) -> bool {
        use std::io::Write;
        if self.full {
            return false;
        }
        let before = self.buf.len();
        if self.ops > 0 {
            self.buf.push(b',');
        }
        // Writes to a Vec do not fail.
        let _ = write!(self.buf, "{{\"op_id\":{op_id},\"op\":\"{}\"", op.as_str());
        if let Some(t) = object_type {
            self.buf.extend_from_slice(b",\"object_type\":");
            push_json_str(&mut self.buf, t);
        }
        if let Some(id) = object_id {
            self.buf.extend_from_slice(b",\"object_id\":");
            push_json_str(&mut self.buf, id);
        }
        if let Some(d) = data_json {
            if self.ops > 0 && (self.buf.len() + d.len()).saturating_add(CLOSING_BYTES) > self.max_line_bytes {
                // Known not to fit before copying the row.
                return self.refuse(before);
            }
            self.buf.extend_from_slice(b",\"data\":");
            self.buf.extend_from_slice(d);
        }
        let _ = write!(self.buf, ",\"checksum\":{checksum}}}");
        if self.ops > 0 && self.finished_len_bytes() > self.max_line_bytes {
            return self.refuse(before);
        }
        self.ops += 1;
        self.last_op_id = Some(op_id);
        true
    }

    fn refuse(&mut self, before: usize) -> bool {
        self.buf.truncate(before);
        self.full = true;
        false
    }

    /// Add a typed entry (its row encoded with `serde_json`); false as for
    /// [`DataLineWriter::push_raw`].
    pub fn push_entry(&mut self, e: &OplogEntry) -> bool {
        if self.full {
            return false;
        }
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
        )
    }

    /// Entries added so far.
    pub fn ops(&self) -> usize {
        self.ops
    }

    /// The op id of the last entry added.
    pub fn last_op_id(&self) -> Option<u64> {
        self.last_op_id
    }

    /// Whether an entry was refused for the size limit (the line is done).
    pub fn is_full(&self) -> bool {
        self.full
    }

    /// Bytes so far.
    pub fn len_bytes(&self) -> usize {
        self.buf.len()
    }

    /// The bytes [`DataLineWriter::finish`] would return now, newline
    /// included.
    pub fn finished_len_bytes(&self) -> usize {
        self.buf.len() + CLOSING_BYTES
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

    fn entry(op_id: u64, title: &str) -> OplogEntry {
        OplogEntry {
            op_id,
            op: OpKind::Put,
            object_type: Some("tickets".into()),
            object_id: Some(format!("t{op_id}")),
            data: Some(row_data([("title", Value::from(title))])),
            checksum: 7,
        }
    }

    fn encoded(bucket: &str, ops: &[OplogEntry]) -> Vec<u8> {
        crate::encode_line(&StreamLine::Data(DataBatch {
            bucket: bucket.into(),
            ops: ops.to_vec(),
        }))
    }

    #[test]
    fn size_limit_counts_the_encoded_line_and_cuts_before_passing_it() {
        // Control characters take six bytes each once escaped.
        let ops = [entry(1, "\u{1}\u{2}\u{3}"), entry(2, "\u{4}\u{5}"), entry(3, "x")];
        let two = encoded("b", &ops[..2]).len();
        // At the limit: both fit, exactly.
        let mut w = DataLineWriter::new("b", 0).with_max_line_bytes(two);
        assert!(w.push_entry(&ops[0]));
        assert!(w.push_entry(&ops[1]));
        assert!(!w.push_entry(&ops[2]));
        assert_eq!(w.last_op_id(), Some(2));
        assert_eq!(w.finished_len_bytes(), two);
        assert_eq!(w.finish(), encoded("b", &ops[..2]));
        // One byte under: the second is refused, and so is every later one
        // (even one that would fit), so the line is a prefix.
        let mut w = DataLineWriter::new("b", 0).with_max_line_bytes(two - 1);
        assert!(w.push_entry(&ops[0]));
        assert!(!w.push_entry(&ops[1]));
        assert!(w.is_full());
        assert!(!w.push_entry(&entry(3, "")));
        assert_eq!(w.ops(), 1);
        assert_eq!(w.last_op_id(), Some(1));
        assert_eq!(w.finish(), encoded("b", &ops[..1]));
    }

    #[test]
    fn first_entry_is_taken_even_past_the_limit() {
        let e = entry(5, &"\u{0}".repeat(100));
        let mut w = DataLineWriter::new("b", 0).with_max_line_bytes(10);
        assert!(w.push_entry(&e));
        assert_eq!(w.last_op_id(), Some(5));
        assert_eq!(w.finish(), encoded("b", &[e]));
    }
}
