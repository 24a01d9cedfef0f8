//! The app's rows a transaction sending its ops' writes together
//! ([`SourceTx::defer_op_writes`](ferry_source::SourceTx::defer_op_writes))
//! writes without reading them back: consecutive rows of one table are
//! gathered and written with one `INSERT .. SELECT FROM unnest(..) ON
//! CONFLICT DO UPDATE` (one array parameter per column), instead of one
//! statement per row.
//!
//! A group holds rows of one table, each id once (an upsert may not touch
//! a row twice), at most [`MAX_ROWS_PER_GROUP`]; the transaction closes it
//! into a statement before any other statement is queued, so the app's
//! tables are written in the order of the ops, as row by row. Rows go in
//! the order they came (`unnest` keeps the arrays' order), each through the
//! table's constraints and row triggers as one `INSERT` of it would.

use std::collections::HashSet;
use std::sync::Arc;

use ferry_core::{RowData, Value};

use crate::layout::{Kind, PkKind, PkParam, TableLayout, APP_ROW, OVERRIDING};
use crate::tx::Param;

/// Most rows in one group (one statement, its arrays bounded).
pub(crate) const MAX_ROWS_PER_GROUP: usize = 1_000;

/// One column's values, as the array bound for it.
#[derive(Clone)]
enum Column {
    Int(Vec<Option<i64>>),
    Float(Vec<Option<f64>>),
    Text(Vec<Option<String>>),
    Bytea(Vec<Option<Vec<u8>>>),
}

impl Column {
    fn of(kind: Kind) -> Column {
        match kind {
            Kind::Int | Kind::Bool => Column::Int(Vec::new()),
            Kind::Float => Column::Float(Vec::new()),
            Kind::Text => Column::Text(Vec::new()),
            Kind::Bytea => Column::Bytea(Vec::new()),
        }
    }

    /// Whether `v` goes into this column as it is (the values a row is
    /// written from without a conversion: see `ColLayout::keeps_exactly`).
    fn takes(&self, v: &Value) -> bool {
        matches!(
            (self, v),
            (_, Value::Null)
                | (Column::Int(_), Value::Integer(_))
                | (Column::Float(_), Value::Real(_))
                | (Column::Text(_), Value::Text(_))
                | (Column::Bytea(_), Value::Blob(_))
        )
    }

    /// Add `v`, which [`Column::takes`].
    fn push(&mut self, v: &Value) {
        match (self, v) {
            (Column::Int(c), Value::Integer(i)) => c.push(Some(*i)),
            (Column::Int(c), _) => c.push(None),
            (Column::Float(c), Value::Real(r)) => c.push(Some(*r)),
            (Column::Float(c), _) => c.push(None),
            (Column::Text(c), Value::Text(t)) => c.push(Some(t.clone())),
            (Column::Text(c), _) => c.push(None),
            (Column::Bytea(c), Value::Blob(b)) => c.push(Some(b.clone())),
            (Column::Bytea(c), _) => c.push(None),
        }
    }

    fn truncate(&mut self, n: usize) {
        match self {
            Column::Int(c) => c.truncate(n),
            Column::Float(c) => c.truncate(n),
            Column::Text(c) => c.truncate(n),
            Column::Bytea(c) => c.truncate(n),
        }
    }

    /// The values `from..to` as one array parameter.
    fn param(&self, from: usize, to: usize) -> Param {
        match self {
            Column::Int(c) => Box::new(c[from..to].to_vec()),
            Column::Float(c) => Box::new(c[from..to].to_vec()),
            Column::Text(c) => Box::new(c[from..to].to_vec()),
            Column::Bytea(c) => Box::new(c[from..to].to_vec()),
        }
    }

    fn array_type(&self) -> &'static str {
        match self {
            Column::Int(_) => "int8[]",
            Column::Float(_) => "float8[]",
            Column::Text(_) => "text[]",
            Column::Bytea(_) => "bytea[]",
        }
    }
}

/// Rows of one table waiting to be written with one statement.
pub(crate) struct RowGroup {
    layout: Arc<TableLayout>,
    /// The row ids, in order.
    ids: Vec<String>,
    /// The same ids, to refuse a second write of one.
    seen: HashSet<String>,
    /// The primary key's values.
    keys: Column,
    /// The rules' columns' values, in the layout's order.
    cols: Vec<Column>,
}

impl RowGroup {
    pub(crate) fn new(layout: Arc<TableLayout>) -> RowGroup {
        let keys = match layout.pk_kind {
            PkKind::Int => Column::Int(Vec::new()),
            PkKind::Text { .. } => Column::Text(Vec::new()),
        };
        let cols = layout.cols.iter().map(|c| Column::of(c.kind)).collect();
        RowGroup {
            layout,
            ids: Vec::new(),
            seen: HashSet::new(),
            keys,
            cols,
        }
    }

    pub(crate) fn table(&self) -> &str {
        &self.layout.name
    }

    pub(crate) fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether another row with this id may join the group (it is not in
    /// it, and the group is not full).
    pub(crate) fn has_room_for(&self, id: &str) -> bool {
        self.ids.len() < MAX_ROWS_PER_GROUP && !self.seen.contains(id)
    }

    /// Add a row; `false`, adding nothing, when a value is not one the
    /// column takes as it is (the row is then written on its own).
    pub(crate) fn push(&mut self, id: &str, pk: &PkParam, data: &RowData) -> bool {
        let value = |i: usize| data.get(&self.layout.cols[i].name).unwrap_or(&Value::Null);
        if !(0..self.cols.len()).all(|i| self.cols[i].takes(value(i))) {
            return false;
        }
        match (&mut self.keys, pk) {
            (Column::Int(k), PkParam::Int(n)) => k.push(Some(*n)),
            (Column::Text(k), PkParam::Text) => k.push(Some(id.to_owned())),
            _ => return false,
        }
        for i in 0..self.cols.len() {
            let v = data.get(&self.layout.cols[i].name).unwrap_or(&Value::Null);
            self.cols[i].push(v);
        }
        self.ids.push(id.to_owned());
        self.seen.insert(id.to_owned());
        true
    }

    /// Keep the first `n` rows.
    pub(crate) fn truncate(&mut self, n: usize) {
        for id in self.ids.drain(n.min(self.ids.len())..) {
            self.seen.remove(&id);
        }
        self.keys.truncate(n);
        for c in &mut self.cols {
            c.truncate(n);
        }
    }

    /// The statement writing rows `from..to`.
    pub(crate) fn statement(&self, from: usize, to: usize) -> (String, Vec<Param>) {
        let layout = &self.layout;
        let mut names = vec![layout.pk.clone()];
        let mut exprs = vec![match &layout.pk_kind {
            PkKind::Int => "u.k".to_owned(),
            PkKind::Text { typname } => format!("u.k::{typname}"),
        }];
        let mut arrays = vec![format!("$1::{}", self.keys.array_type())];
        let mut aliases = vec!["k".to_owned()];
        for (i, (c, values)) in layout.cols.iter().zip(&self.cols).enumerate() {
            names.push(c.quoted.clone());
            exprs.push(match c.kind {
                Kind::Bool => format!("(u.c{i} <> 0)"),
                Kind::Text => format!("u.c{i}::{}", c.typname),
                Kind::Int | Kind::Float | Kind::Bytea => format!("u.c{i}"),
            });
            arrays.push(format!("${}::{}", i + 2, values.array_type()));
            aliases.push(format!("c{i}"));
        }
        let update = if layout.cols.is_empty() {
            "NOTHING".to_owned()
        } else {
            let sets: Vec<String> = layout
                .cols
                .iter()
                .map(|c| format!("{0} = EXCLUDED.{0}", c.quoted))
                .collect();
            format!("UPDATE SET {}", sets.join(", "))
        };
        let sql = format!(
            "INSERT INTO {t} AS {APP_ROW}({names}) {OVERRIDING} SELECT {exprs} FROM unnest({arrays}) AS u({aliases}) \
             CROSS JOIN {marker} ON CONFLICT ({pk}) DO {update}",
            marker = layout.writing_marker(None),
            t = layout.qualified,
            names = names.join(", "),
            exprs = exprs.join(", "),
            arrays = arrays.join(", "),
            aliases = aliases.join(", "),
            pk = layout.pk,
        );
        let mut params = vec![self.keys.param(from, to)];
        params.extend(self.cols.iter().map(|c| c.param(from, to)));
        (sql, params)
    }
}
