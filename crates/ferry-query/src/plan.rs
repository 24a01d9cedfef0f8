//! Compiling a [`Query`] into a [`Plan`]: every name resolved to a slot.

use std::collections::BTreeSet;

use crate::error::QueryError;
use crate::expr::{AggFn, CExpr, ColName, Expr};
use crate::query::{JoinKind, Order, Query};

#[derive(Clone, Debug)]
pub(crate) struct SourceSpec {
    pub collection: String,
    pub alias: String,
}

#[derive(Clone, Debug)]
pub(crate) struct JoinSpec {
    pub left_outer: bool,
    pub right_outer: bool,
    /// Key columns on the left (joined-so-far) row.
    pub left_cols: Vec<(usize, ColName)>,
    /// Key columns of the joined collection.
    pub right_cols: Vec<ColName>,
}

#[derive(Clone, Debug)]
pub(crate) enum Shape {
    /// No grouping; `None` selects every column.
    Plain { select: Option<Vec<CExpr>> },
    /// Grouping with aggregates.
    Grouped {
        group: Vec<CExpr>,
        aggs: Vec<(AggFn, Option<CExpr>)>,
        out: Vec<CExpr>,
        having: Option<CExpr>,
        /// No `group_by`: exactly one group, present even when empty.
        global: bool,
    },
}

#[derive(Clone, Debug)]
pub(crate) struct Plan {
    pub sources: Vec<SourceSpec>,
    pub joins: Vec<JoinSpec>,
    pub filter: Option<CExpr>,
    pub shape: Shape,
    /// Output column names; `None` for "every column" (see `Cols::Star`).
    pub out_names: Option<Vec<String>>,
    pub distinct: bool,
    /// Sort keys: expression and descending flag.
    pub order: Vec<(CExpr, bool)>,
    pub offset: usize,
    pub limit: Option<usize>,
}

/// What a collection declares: `None` if it does not exist, `Some(None)`
/// when it is schemaless, `Some(Some(columns))` otherwise.
pub(crate) type Catalog<'a> = &'a dyn Fn(&str) -> Option<Option<&'a BTreeSet<String>>>;

enum Ctx<'a> {
    /// Source columns only.
    Wide { context: &'static str },
    /// Output aliases first, then source columns.
    WideOrOut(&'a [String]),
    /// Output aliases only.
    OutOnly(&'a [String]),
    /// Group keys and aggregates.
    Grouped {
        group: &'a [Expr],
        agg_exprs: &'a mut Vec<(AggFn, Option<Expr>)>,
        aggs: &'a mut Vec<(AggFn, Option<CExpr>)>,
    },
}

struct Compiler<'a> {
    sources: &'a [SourceSpec],
    columns: Vec<Option<&'a BTreeSet<String>>>,
}

impl Compiler<'_> {
    /// Resolve a source column among the first `visible` sources.
    fn src(&self, name: &str, visible: usize) -> Result<CExpr, QueryError> {
        let unknown = || QueryError::UnknownColumn {
            column: name.to_owned(),
        };
        let (idx, col) = match name.split_once('.') {
            Some((alias, c)) => match self.sources[..visible].iter().position(|s| s.alias == alias) {
                Some(i) => (i, c),
                None => return Err(unknown()),
            },
            None => (0, name),
        };
        if col == "id" {
            return Ok(CExpr::Src(idx, ColName::Id));
        }
        if let Some(Some(declared)) = self.columns.get(idx) {
            if !declared.contains(col) {
                return Err(unknown());
            }
        }
        Ok(CExpr::Src(idx, ColName::Name(col.to_owned())))
    }

    fn compile(&self, e: &Expr, ctx: &mut Ctx<'_>) -> Result<CExpr, QueryError> {
        if let Ctx::Grouped { group, .. } = ctx {
            if let Some(i) = group.iter().position(|g| g == e) {
                return Ok(CExpr::Group(i));
            }
        }
        let b = |x: CExpr| Box::new(x);
        Ok(match e {
            Expr::Col(name) => match ctx {
                Ctx::Wide { .. } => self.src(name, self.sources.len())?,
                Ctx::WideOrOut(names) => match names.iter().position(|n| n == name) {
                    Some(i) => CExpr::Out(i),
                    None => self.src(name, self.sources.len())?,
                },
                Ctx::OutOnly(names) => match names.iter().position(|n| n == name) {
                    Some(i) => CExpr::Out(i),
                    None => return Err(QueryError::UnknownColumn { column: name.clone() }),
                },
                Ctx::Grouped { .. } => {
                    // Validate the name first so a typo reads as unknown.
                    self.src(name, self.sources.len())?;
                    return Err(QueryError::NotGrouped { column: name.clone() });
                }
            },
            Expr::Lit(v) => CExpr::Lit(crate::expr::canon(v.clone())),
            Expr::Cmp(op, x, y) => CExpr::Cmp(*op, b(self.compile(x, ctx)?), b(self.compile(y, ctx)?)),
            Expr::And(x, y) => CExpr::And(b(self.compile(x, ctx)?), b(self.compile(y, ctx)?)),
            Expr::Or(x, y) => CExpr::Or(b(self.compile(x, ctx)?), b(self.compile(y, ctx)?)),
            Expr::Not(x) => CExpr::Not(b(self.compile(x, ctx)?)),
            Expr::In(x, items) => {
                let x = self.compile(x, ctx)?;
                let items = items
                    .iter()
                    .map(|i| self.compile(i, ctx))
                    .collect::<Result<Vec<_>, _>>()?;
                CExpr::In(b(x), items)
            }
            Expr::Like {
                expr,
                pattern,
                case_insensitive,
            } => CExpr::Like(
                b(self.compile(expr, ctx)?),
                b(self.compile(pattern, ctx)?),
                *case_insensitive,
            ),
            Expr::IsNull(x) => CExpr::IsNull(b(self.compile(x, ctx)?)),
            Expr::Func(f, args) => CExpr::Func(
                *f,
                args.iter()
                    .map(|a| self.compile(a, ctx))
                    .collect::<Result<Vec<_>, _>>()?,
            ),
            Expr::Arith(op, x, y) => CExpr::Arith(*op, b(self.compile(x, ctx)?), b(self.compile(y, ctx)?)),
            Expr::Agg(f, arg) => match ctx {
                Ctx::Grouped { agg_exprs, aggs, .. } => {
                    let key = (*f, arg.as_deref().cloned());
                    if let Some(i) = agg_exprs.iter().position(|k| *k == key) {
                        return Ok(CExpr::Agg(i));
                    }
                    let carg = match arg {
                        Some(a) => Some(self.compile(
                            a,
                            &mut Ctx::Wide {
                                context: "an aggregate argument",
                            },
                        )?),
                        None => None,
                    };
                    agg_exprs.push(key);
                    aggs.push((*f, carg));
                    CExpr::Agg(aggs.len() - 1)
                }
                Ctx::Wide { context } => return Err(QueryError::AggregateNotAllowed { context }),
                Ctx::WideOrOut(_) | Ctx::OutOnly(_) => {
                    return Err(QueryError::AggregateNotAllowed {
                        context: "order_by (select it under a name and order by that name)",
                    })
                }
            },
        })
    }
}

fn group_name(e: &Expr, i: usize) -> String {
    match e {
        Expr::Col(n) => n.clone(),
        _ => format!("group{i}"),
    }
}

/// Compile a query against the catalog.
pub(crate) fn compile(q: &Query, catalog: Catalog<'_>) -> Result<Plan, QueryError> {
    let mut sources = vec![SourceSpec {
        collection: q.collection.clone(),
        alias: q.alias.clone(),
    }];
    for j in &q.joins {
        if sources.iter().any(|s| s.alias == j.alias) {
            return Err(QueryError::DuplicateAlias { alias: j.alias.clone() });
        }
        sources.push(SourceSpec {
            collection: j.collection.clone(),
            alias: j.alias.clone(),
        });
    }
    let mut columns = Vec::with_capacity(sources.len());
    for s in &sources {
        match catalog(&s.collection) {
            None => {
                return Err(QueryError::UnknownCollection {
                    collection: s.collection.clone(),
                })
            }
            Some(cols) => columns.push(cols),
        }
    }
    let c = Compiler {
        sources: &sources,
        columns,
    };

    let mut joins = Vec::with_capacity(q.joins.len());
    for (ji, j) in q.joins.iter().enumerate() {
        let right = ji + 1;
        if j.on.is_empty() {
            return Err(QueryError::InvalidQuery {
                reason: format!("join {:?} has no columns to match", j.alias),
            });
        }
        let mut left_cols = Vec::new();
        let mut right_cols = Vec::new();
        for (a, bcol) in &j.on {
            let ra = c.src(a, right + 1)?;
            let rb = c.src(bcol, right + 1)?;
            match (ra, rb) {
                (CExpr::Src(ia, ca), CExpr::Src(ib, cb)) if ib == right && ia < right => {
                    left_cols.push((ia, ca));
                    right_cols.push(cb);
                }
                (CExpr::Src(ia, ca), CExpr::Src(ib, cb)) if ia == right && ib < right => {
                    left_cols.push((ib, cb));
                    right_cols.push(ca);
                }
                _ => {
                    return Err(QueryError::InvalidQuery {
                        reason: format!(
                            "join condition {a:?} = {bcol:?} must compare an earlier source with {:?}",
                            j.alias
                        ),
                    })
                }
            }
        }
        joins.push(JoinSpec {
            left_outer: matches!(j.kind, JoinKind::Left | JoinKind::Full),
            right_outer: matches!(j.kind, JoinKind::Right | JoinKind::Full),
            left_cols,
            right_cols,
        });
    }

    let filter = match &q.filter {
        Some(f) => Some(c.compile(f, &mut Ctx::Wide { context: "where" })?),
        None => None,
    };

    let select_has_agg = q.select.as_ref().is_some_and(|s| s.iter().any(|(_, e)| e.has_agg()));
    let having_has_agg = q.having.as_ref().is_some_and(Expr::has_agg);
    let grouped = !q.group_by.is_empty() || select_has_agg || having_has_agg;
    if q.having.is_some() && !grouped {
        return Err(QueryError::InvalidQuery {
            reason: "having needs group_by or an aggregate".to_owned(),
        });
    }

    let (shape, out_names) = if grouped {
        let group = q
            .group_by
            .iter()
            .map(|g| {
                if g.has_agg() {
                    Err(QueryError::AggregateNotAllowed { context: "group_by" })
                } else {
                    c.compile(g, &mut Ctx::Wide { context: "group_by" })
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut agg_exprs = Vec::new();
        let mut aggs = Vec::new();
        let (names, out) = match &q.select {
            Some(items) => {
                let mut names = Vec::new();
                let mut out = Vec::new();
                for (n, e) in items {
                    names.push(n.clone());
                    out.push(c.compile(
                        e,
                        &mut Ctx::Grouped {
                            group: &q.group_by,
                            agg_exprs: &mut agg_exprs,
                            aggs: &mut aggs,
                        },
                    )?);
                }
                (names, out)
            }
            None => (
                q.group_by.iter().enumerate().map(|(i, g)| group_name(g, i)).collect(),
                (0..q.group_by.len()).map(CExpr::Group).collect(),
            ),
        };
        let having = match &q.having {
            Some(h) => Some(c.compile(
                h,
                &mut Ctx::Grouped {
                    group: &q.group_by,
                    agg_exprs: &mut agg_exprs,
                    aggs: &mut aggs,
                },
            )?),
            None => None,
        };
        (
            Shape::Grouped {
                group,
                aggs,
                out,
                having,
                global: q.group_by.is_empty(),
            },
            Some(names),
        )
    } else {
        match &q.select {
            Some(items) => {
                let names: Vec<String> = items.iter().map(|(n, _)| n.clone()).collect();
                let out = items
                    .iter()
                    .map(|(_, e)| c.compile(e, &mut Ctx::Wide { context: "select" }))
                    .collect::<Result<Vec<_>, _>>()?;
                (Shape::Plain { select: Some(out) }, Some(names))
            }
            None => (Shape::Plain { select: None }, None),
        }
    };
    if let Some(names) = &out_names {
        let mut seen = BTreeSet::new();
        for n in names {
            if !seen.insert(n) {
                return Err(QueryError::InvalidQuery {
                    reason: format!("output column {n:?} selected twice"),
                });
            }
        }
    }

    let mut order = Vec::with_capacity(q.order_by.len());
    for (e, o) in &q.order_by {
        let ce = match (&out_names, grouped || q.distinct) {
            (Some(names), true) => c.compile(e, &mut Ctx::OutOnly(names))?,
            (Some(names), false) => c.compile(e, &mut Ctx::WideOrOut(names))?,
            (None, _) => c.compile(e, &mut Ctx::Wide { context: "order_by" })?,
        };
        order.push((ce, *o == Order::Desc));
    }

    Ok(Plan {
        sources,
        joins,
        filter,
        shape,
        out_names,
        distinct: q.distinct,
        order,
        offset: q.offset,
        limit: q.limit,
    })
}
