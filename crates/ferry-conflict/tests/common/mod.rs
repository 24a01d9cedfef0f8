//! A pure in-memory "server" for strategy tests: one table's rows, the side
//! rows written by strategies, and the decision path of ferry-server
//! (resolve, apply the resolution, apply the side writes).

#![allow(dead_code)]

use std::collections::BTreeMap;

use ferry_conflict::{ConflictInput, ConflictStrategy, CurrentRow, Decision, OutcomeKind, Resolution};
use ferry_core::{ColumnType, CrudOp, HlcTimestamp, RowData, Table, Value};

pub fn tickets() -> Table {
    Table::new("tickets")
        .column("title", ColumnType::Text)
        .column("description", ColumnType::Text)
        .column("status", ColumnType::Text)
        .column("body", ColumnType::Blob)
}

pub fn hlc(wall_ms: u64, node: &str) -> HlcTimestamp {
    HlcTimestamp {
        wall_ms,
        counter: 0,
        node: node.into(),
    }
}

pub fn data(pairs: &[(&str, Value)]) -> RowData {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect()
}

pub fn patch(id: &str, pairs: &[(&str, Value)]) -> CrudOp {
    CrudOp::Patch {
        table: "tickets".into(),
        id: id.into(),
        data: data(pairs),
    }
}

pub fn put(table: &Table, id: &str, pairs: &[(&str, Value)]) -> CrudOp {
    let mut full: RowData = table.columns.iter().map(|c| (c.name.clone(), Value::Null)).collect();
    full.extend(data(pairs));
    CrudOp::Put {
        table: table.name.clone(),
        id: id.into(),
        data: full,
    }
}

pub fn delete(id: &str) -> CrudOp {
    CrudOp::Delete {
        table: "tickets".into(),
        id: id.into(),
    }
}

/// One op as a client sends it.
#[derive(Clone, Debug)]
pub struct Op {
    pub op: CrudOp,
    pub hlc: HlcTimestamp,
    pub base: Option<RowData>,
    pub client: String,
    pub seq: u64,
}

pub fn op(op: CrudOp, wall_ms: u64, client: &str, seq: u64, base: &[(&str, Value)]) -> Op {
    Op {
        op,
        hlc: hlc(wall_ms, client),
        base: (!base.is_empty()).then(|| data(base)),
        client: client.into(),
        seq,
    }
}

#[derive(Debug)]
pub struct Sim {
    pub table: Table,
    pub rows: BTreeMap<String, CurrentRow>,
    /// Side rows by (table, id).
    pub side: BTreeMap<(String, String), RowData>,
    pub now_ms: u64,
}

impl Sim {
    pub fn new() -> Self {
        Sim {
            table: tickets(),
            rows: BTreeMap::new(),
            side: BTreeMap::new(),
            now_ms: 10_000,
        }
    }

    pub fn apply(&mut self, strategy: &dyn ConflictStrategy, o: &Op) -> Decision {
        let id = o.op.id().to_owned();
        let current = self.rows.get(&id).cloned();
        let d = strategy.resolve(&ConflictInput {
            table: &self.table,
            id: &id,
            op: &o.op,
            hlc: &o.hlc,
            base: o.base.as_ref(),
            client_id: &o.client,
            user_id: &format!("user-{}", o.client),
            seq: o.seq,
            now_ms: self.now_ms,
            current: current.as_ref(),
        });
        if let Some(next) = CurrentRow::apply(current.as_ref(), &d.resolution) {
            self.rows.insert(id, next);
        }
        for w in &d.side_writes {
            self.side
                .entry((w.table.clone(), w.id.clone()))
                .or_default()
                .extend(w.data.clone());
        }
        d
    }

    pub fn row(&self, id: &str) -> Option<&RowData> {
        self.rows.get(id).and_then(|r| r.data.as_ref())
    }

    pub fn value(&self, id: &str, col: &str) -> Value {
        self.row(id).and_then(|r| r.get(col).cloned()).unwrap_or(Value::Null)
    }

    pub fn side_rows(&self, table: &str) -> Vec<(&String, &RowData)> {
        self.side
            .iter()
            .filter(|((t, _), _)| t == table)
            .map(|((_, id), r)| (id, r))
            .collect()
    }
}

pub fn kind(d: &Decision) -> OutcomeKind {
    d.outcome_kind()
}

pub fn is_write(d: &Decision) -> bool {
    matches!(d.resolution, Resolution::Write { .. })
}
