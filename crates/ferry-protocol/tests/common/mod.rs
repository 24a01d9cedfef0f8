//! Shared fixtures: op log entry builders, a reference client that applies
//! one bucket's entries, and a server-side bucket that is appended to and
//! compacted.

#![allow(dead_code)]

use std::collections::BTreeMap;

use ferry_core::{RowData, Value};
use ferry_protocol::{checksum, compact, op_checksum, OpKind, OplogEntry};

pub const TABLES: [&str; 2] = ["lists", "todos"];
pub const ROWS: [&str; 3] = ["r0", "r1", "r2"];

pub fn data(v: i64) -> RowData {
    let mut d = RowData::new();
    d.insert("v".to_owned(), Value::Integer(v));
    if v % 2 == 0 {
        d.insert("label".to_owned(), Value::Text(format!("label {v}")));
    }
    d
}

pub fn put(op_id: u64, table: &str, id: &str, v: i64) -> OplogEntry {
    let d = data(v);
    OplogEntry {
        op_id,
        op: OpKind::Put,
        object_type: Some(table.to_owned()),
        object_id: Some(id.to_owned()),
        checksum: op_checksum(op_id, OpKind::Put, table, id, Some(&d)),
        data: Some(d),
    }
}

pub fn remove(op_id: u64, table: &str, id: &str) -> OplogEntry {
    OplogEntry {
        op_id,
        op: OpKind::Remove,
        object_type: Some(table.to_owned()),
        object_id: Some(id.to_owned()),
        data: None,
        checksum: op_checksum(op_id, OpKind::Remove, table, id, None),
    }
}

pub fn mv(op_id: u64, checksum: u32) -> OplogEntry {
    OplogEntry {
        op_id,
        op: OpKind::Move,
        object_type: None,
        object_id: None,
        data: None,
        checksum,
    }
}

pub fn clear(op_id: u64, checksum: u32) -> OplogEntry {
    OplogEntry {
        op_id,
        op: OpKind::Clear,
        object_type: None,
        object_id: None,
        data: None,
        checksum,
    }
}

pub type Rows = BTreeMap<(String, String), RowData>;

/// What a client holds of one bucket: its rows, its running checksum and
/// its position. Applies entries exactly as `download.rs` specifies.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClientModel {
    pub rows: Rows,
    pub checksum: u32,
    pub pos: u64,
}

impl ClientModel {
    /// Apply one entry; entries at or before the position are skipped.
    pub fn apply(&mut self, e: &OplogEntry) {
        if e.op_id <= self.pos {
            return;
        }
        match e.op {
            OpKind::Put => {
                let key = key_of(e);
                self.rows.insert(key, e.data.clone().expect("put has data"));
                self.checksum = self.checksum.wrapping_add(e.checksum);
            }
            OpKind::Remove => {
                self.rows.remove(&key_of(e));
                self.checksum = self.checksum.wrapping_add(e.checksum);
            }
            OpKind::Move => self.checksum = self.checksum.wrapping_add(e.checksum),
            OpKind::Clear => {
                self.rows.clear();
                self.checksum = e.checksum;
            }
        }
        self.pos = e.op_id;
    }

    /// Apply every entry with an op id up to `through`, then stand at
    /// `through`.
    pub fn apply_through(&mut self, log: &[OplogEntry], through: u64) {
        for e in log.iter().filter(|e| e.op_id <= through) {
            self.apply(e);
        }
        self.pos = self.pos.max(through);
    }

    pub fn apply_all(&mut self, log: &[OplogEntry]) {
        for e in log {
            self.apply(e);
        }
    }
}

fn key_of(e: &OplogEntry) -> (String, String) {
    (
        e.object_type.clone().expect("object_type"),
        e.object_id.clone().expect("object_id"),
    )
}

/// The rows a log leaves, applied from scratch.
pub fn rows_of(log: &[OplogEntry]) -> Rows {
    let mut c = ClientModel::default();
    c.apply_all(log);
    c.rows
}

/// One server-side bucket: the uncompacted history and the current
/// (possibly compacted) log.
#[derive(Clone, Debug, Default)]
pub struct ServerBucket {
    pub full: Vec<OplogEntry>,
    pub current: Vec<OplogEntry>,
}

impl ServerBucket {
    pub fn append(&mut self, e: OplogEntry) {
        if let Some(last) = self.full.last() {
            assert!(e.op_id > last.op_id, "op ids ascend");
        }
        self.full.push(e.clone());
        self.current.push(e);
    }

    pub fn compact(&mut self) {
        self.current = compact(&self.current);
    }

    pub fn checksum(&self) -> u32 {
        checksum::sum(self.current.iter().map(|e| e.checksum))
    }

    pub fn count(&self) -> u64 {
        self.current.len() as u64
    }

    pub fn rows(&self) -> Rows {
        rows_of(&self.full)
    }

    pub fn after(&self, op_id: u64) -> Vec<OplogEntry> {
        self.current.iter().filter(|e| e.op_id > op_id).cloned().collect()
    }
}
