//! Row shapes that flow between operators, shared by the incremental graph
//! and the reference evaluator.

use std::cmp::Ordering;
use std::sync::Arc;

use ferry_core::{RowData, Value};

use crate::expr::{Env, Wide};
use crate::plan::Plan;
use crate::result::ResultRow;

/// One sort key component; `desc` is the same for every key at the same
/// position of one index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SortVal {
    pub v: Value,
    pub desc: bool,
}

impl Ord for SortVal {
    fn cmp(&self, other: &Self) -> Ordering {
        let o = self.v.cmp(&other.v);
        if self.desc {
            o.reverse()
        } else {
            o
        }
    }
}

impl PartialOrd for SortVal {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Output columns of a row.
#[derive(Clone, Debug)]
pub(crate) enum Cols {
    /// Values aligned with `Plan::out_names`.
    Vals(Vec<Value>),
    /// Every column of the joined row (no `select`).
    Star(Wide),
}

/// A row after projection or aggregation. Ordered (and equal) by its
/// position in the result: sort key, then identity.
#[derive(Clone, Debug)]
pub(crate) struct OutRow {
    pub key: Vec<Value>,
    pub cols: Cols,
    pub sort: Vec<SortVal>,
    pub pending: bool,
}

/// Equality that also tells `Integer(0)` from `Real(0.0)`.
pub(crate) fn strict_eq(a: &Value, b: &Value) -> bool {
    a.type_name() == b.type_name() && a == b
}

fn strict_all(a: &[Value], b: &[Value]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| strict_eq(x, y))
}

/// Strict equality of source rows (see [`strict_eq`]).
pub(crate) fn same_src(a: &crate::source::SrcRow, b: &crate::source::SrcRow) -> bool {
    a.id == b.id
        && a.pending == b.pending
        && (Arc::ptr_eq(&a.shape, &b.shape) || a.shape == b.shape)
        && strict_all(&a.vals, &b.vals)
}

impl OutRow {
    /// Strict equality of everything (see [`strict_eq`]).
    pub(crate) fn same(&self, other: &OutRow) -> bool {
        self.pending == other.pending
            && strict_all(&self.key, &other.key)
            && self.sort.len() == other.sort.len()
            && self.sort.iter().zip(&other.sort).all(|(a, b)| strict_eq(&a.v, &b.v))
            && match (&self.cols, &other.cols) {
                (Cols::Vals(a), Cols::Vals(b)) => strict_all(a, b),
                (Cols::Star(a), Cols::Star(b)) => {
                    a.len() == b.len()
                        && a.iter().zip(b).all(|(x, y)| match (x, y) {
                            (Some(x), Some(y)) => Arc::ptr_eq(x, y) || same_src(x, y),
                            (None, None) => true,
                            _ => false,
                        })
                }
                _ => false,
            }
    }
}

impl Ord for OutRow {
    fn cmp(&self, other: &Self) -> Ordering {
        self.sort.cmp(&other.sort).then_with(|| self.key.cmp(&other.key))
    }
}

impl PartialOrd for OutRow {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for OutRow {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for OutRow {}

/// Identity of a joined row: its source ids, NULL for a missing side.
pub(crate) fn wide_key(w: &[Option<Arc<crate::source::SrcRow>>]) -> Vec<Value> {
    w.iter()
        .map(|s| match s {
            Some(r) => Value::Text(r.id.to_string()),
            None => Value::Null,
        })
        .collect()
}

/// Whether any source row of a joined row has pending writes.
pub(crate) fn wide_pending(w: &[Option<Arc<crate::source::SrcRow>>]) -> bool {
    w.iter().any(|s| s.as_ref().is_some_and(|r| r.pending))
}

impl Plan {
    /// Sort key of an output row, evaluated with `env`.
    pub(crate) fn sort_key(&self, env: &Env<'_>) -> Vec<SortVal> {
        self.order
            .iter()
            .map(|(e, desc)| SortVal {
                v: e.eval(env),
                desc: *desc,
            })
            .collect()
    }

    /// Sort key computed from the output columns only (grouped/distinct).
    pub(crate) fn sort_key_of_cols(&self, cols: &Cols) -> Vec<SortVal> {
        match cols {
            Cols::Vals(v) => self.sort_key(&Env {
                out: v,
                ..Env::default()
            }),
            Cols::Star(w) => self.sort_key(&Env {
                wide: w,
                ..Env::default()
            }),
        }
    }

    /// Project a joined row that passed the filter (plain queries).
    pub(crate) fn project(&self, w: &Wide, select: Option<&[crate::expr::CExpr]>) -> OutRow {
        let cols = match select {
            Some(exprs) => {
                let env = Env {
                    wide: w,
                    ..Env::default()
                };
                Cols::Vals(exprs.iter().map(|e| e.eval(&env)).collect())
            }
            None => Cols::Star(w.clone()),
        };
        let sort = if self.distinct || self.order.is_empty() {
            Vec::new()
        } else {
            let out: &[Value] = match &cols {
                Cols::Vals(v) => v,
                Cols::Star(_) => &[],
            };
            self.sort_key(&Env {
                wide: w,
                out,
                ..Env::default()
            })
        };
        OutRow {
            key: wide_key(w),
            cols,
            sort,
            pending: wide_pending(w),
        }
    }

    /// The output columns as named values.
    pub(crate) fn row_data(&self, cols: &Cols) -> RowData {
        match cols {
            Cols::Vals(vals) => match &self.out_names {
                Some(names) => names.iter().cloned().zip(vals.iter().cloned()).collect(),
                None => RowData::new(),
            },
            Cols::Star(w) => {
                let mut d = RowData::new();
                if self.sources.len() == 1 {
                    if let Some(Some(r)) = w.first() {
                        d.extend(r.columns().map(|(k, v)| (k.to_owned(), v.clone())));
                        d.insert("id".to_owned(), Value::Text(r.id.to_string()));
                    }
                    return d;
                }
                for (s, r) in self.sources.iter().zip(w.iter()) {
                    match r {
                        Some(r) => {
                            for (k, v) in r.columns() {
                                d.insert(format!("{}.{k}", s.alias), v.clone());
                            }
                            d.insert(format!("{}.id", s.alias), Value::Text(r.id.to_string()));
                        }
                        None => {
                            d.insert(format!("{}.id", s.alias), Value::Null);
                        }
                    }
                }
                d
            }
        }
    }

    /// Identity of a row in a distinct result: its values.
    pub(crate) fn distinct_key(&self, cols: &Cols) -> Vec<Value> {
        match cols {
            Cols::Vals(v) => v.clone(),
            Cols::Star(_) => self
                .row_data(cols)
                .into_iter()
                .flat_map(|(k, v)| [Value::Text(k), crate::expr::canon(v)])
                .collect(),
        }
    }

    /// The public form of a row.
    pub(crate) fn to_result(&self, r: &OutRow) -> ResultRow {
        ResultRow {
            key: r.key.clone(),
            data: self.row_data(&r.cols),
            pending: r.pending,
        }
    }
}
