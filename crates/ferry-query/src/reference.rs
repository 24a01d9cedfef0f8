//! The reference evaluator: a from-scratch, obviously-correct recomputation
//! of a query (nested-loop joins, full grouping, full sort). It shares only
//! expression evaluation and row shaping with the incremental operators, and
//! is what [`crate::QueryEngine::query`] runs and what the property tests
//! compare live results against.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use ferry_core::Value;

use crate::expr::{is_true, to_numeric, AggFn, CExpr, Env, Wide};
use crate::plan::{Plan, Shape};
use crate::result::ResultRow;
use crate::rows::{wide_pending, Cols, OutRow};
use crate::source::SrcRow;

fn key_of(w: &Wide, cols: &[(usize, crate::expr::ColName)]) -> Option<Vec<Value>> {
    let mut k = Vec::with_capacity(cols.len());
    for (i, c) in cols {
        let v = match w.get(*i) {
            Some(Some(r)) => c.read(r),
            _ => Value::Null,
        };
        if v.is_null() {
            return None;
        }
        k.push(v);
    }
    Some(k)
}

/// Aggregate over the values of one group, from scratch.
fn aggregate(f: AggFn, arg: Option<&CExpr>, rows: &[Wide]) -> Value {
    let values: Vec<Value> = match arg {
        None => return Value::Integer(rows.len() as i64),
        Some(e) => rows
            .iter()
            .map(|w| {
                e.eval(&Env {
                    wide: w,
                    ..Env::default()
                })
            })
            .filter(|v| !v.is_null())
            .collect(),
    };
    match f {
        AggFn::Count => Value::Integer(values.len() as i64),
        AggFn::Min => values.iter().min().cloned().unwrap_or(Value::Null),
        AggFn::Max => values.iter().max().cloned().unwrap_or(Value::Null),
        AggFn::Sum | AggFn::Avg => {
            let mut int: i128 = 0;
            let mut real = 0.0f64;
            let mut n_real = 0usize;
            for v in &values {
                match to_numeric(v) {
                    Value::Integer(i) => int += i128::from(i),
                    Value::Real(r) => {
                        real += r;
                        n_real += 1;
                    }
                    _ => {}
                }
            }
            if values.is_empty() {
                return Value::Null;
            }
            let total = int as f64 + real;
            if f == AggFn::Avg {
                return Value::Real(total / values.len() as f64);
            }
            if n_real == 0 {
                match i64::try_from(int) {
                    Ok(i) => Value::Integer(i),
                    Err(_) => Value::Real(total),
                }
            } else {
                Value::Real(total)
            }
        }
    }
}

/// Evaluate `plan` over the current rows of every collection.
pub(crate) fn evaluate(plan: &Plan, rows_of: &dyn Fn(&str) -> Vec<Arc<SrcRow>>) -> Vec<ResultRow> {
    // FROM and JOINs, nested loops.
    let mut wides: Vec<Wide> = rows_of(&plan.sources[0].collection)
        .into_iter()
        .map(|r| vec![Some(r)])
        .collect();
    for (ji, j) in plan.joins.iter().enumerate() {
        let right = rows_of(&plan.sources[ji + 1].collection);
        let width = ji + 1;
        let mut matched_right = vec![false; right.len()];
        let mut next = Vec::new();
        for l in &wides {
            let mut matched = false;
            if let Some(lk) = key_of(l, &j.left_cols) {
                for (ri, r) in right.iter().enumerate() {
                    let rk: Option<Vec<Value>> = j
                        .right_cols
                        .iter()
                        .map(|c| Some(c.read(r)).filter(|v| !v.is_null()))
                        .collect();
                    if rk.as_ref() == Some(&lk) {
                        let mut w = l.clone();
                        w.push(Some(r.clone()));
                        next.push(w);
                        matched = true;
                        matched_right[ri] = true;
                    }
                }
            }
            if !matched && j.left_outer {
                let mut w = l.clone();
                w.push(None);
                next.push(w);
            }
        }
        if j.right_outer {
            for (ri, r) in right.iter().enumerate() {
                if !matched_right[ri] {
                    let mut w: Wide = vec![None; width];
                    w.push(Some(r.clone()));
                    next.push(w);
                }
            }
        }
        wides = next;
    }

    // WHERE.
    if let Some(f) = &plan.filter {
        wides.retain(|w| {
            is_true(&f.eval(&Env {
                wide: w,
                ..Env::default()
            }))
        });
    }

    // SELECT or GROUP BY / HAVING.
    let mut rows: Vec<OutRow> = match &plan.shape {
        Shape::Plain { select } => wides.iter().map(|w| plan.project(w, select.as_deref())).collect(),
        Shape::Grouped {
            group,
            aggs,
            out,
            having,
            global,
        } => {
            let mut groups: BTreeMap<Vec<Value>, Vec<Wide>> = BTreeMap::new();
            if *global {
                groups.insert(Vec::new(), Vec::new());
            }
            for w in wides {
                let env = Env {
                    wide: &w,
                    ..Env::default()
                };
                let key: Vec<Value> = group.iter().map(|g| g.eval(&env)).collect();
                groups.entry(key).or_default().push(w);
            }
            let mut rows = Vec::new();
            for (key, members) in groups {
                let agg_vals: Vec<Value> = aggs
                    .iter()
                    .map(|(f, arg)| aggregate(*f, arg.as_ref(), &members))
                    .collect();
                let env = Env {
                    group: &key,
                    aggs: &agg_vals,
                    ..Env::default()
                };
                if let Some(h) = having {
                    if !is_true(&h.eval(&env)) {
                        continue;
                    }
                }
                let vals: Vec<Value> = out.iter().map(|e| e.eval(&env)).collect();
                let cols = Cols::Vals(vals);
                let sort = if plan.distinct {
                    Vec::new()
                } else {
                    plan.sort_key_of_cols(&cols)
                };
                rows.push(OutRow {
                    pending: members.iter().any(|w| wide_pending(w)),
                    key,
                    cols,
                    sort,
                });
            }
            rows
        }
    };

    // DISTINCT.
    if plan.distinct {
        let mut seen: BTreeMap<Vec<Value>, OutRow> = BTreeMap::new();
        for r in rows {
            let key = plan.distinct_key(&r.cols);
            match seen.get_mut(&key) {
                Some(existing) => existing.pending |= r.pending,
                None => {
                    let sort = plan.sort_key_of_cols(&r.cols);
                    seen.insert(
                        key.clone(),
                        OutRow {
                            key,
                            cols: r.cols,
                            sort,
                            pending: r.pending,
                        },
                    );
                }
            }
        }
        rows = seen.into_values().collect();
    }

    // ORDER BY (ties by identity), OFFSET, LIMIT.
    rows.sort_by(|a, b| a.sort.cmp(&b.sort).then_with(|| a.key.cmp(&b.key)));
    let keys: BTreeSet<&Vec<Value>> = rows.iter().map(|r| &r.key).collect();
    debug_assert_eq!(keys.len(), rows.len(), "row identities are unique");
    rows.iter()
        .skip(plan.offset)
        .take(plan.limit.unwrap_or(usize::MAX))
        .map(|r| plan.to_result(r))
        .collect()
}
