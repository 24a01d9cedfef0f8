//! What a query's plan is: how each source's rows are found (a declared
//! index, the primary key, or a full scan), the scan range, and the state
//! each operator keeps. See [`Query::explain`].

use std::fmt;
use std::ops::Bound;

use ferry_core::{Index, Value};

use crate::expr::{CmpOp, Expr};
use crate::query::{JoinKind, Order, Query};

/// How the rows of one source are found.
#[derive(Clone, Debug, PartialEq)]
pub enum Access {
    /// Every row is read and the filter tested on each.
    FullScan,
    /// Rows found by id: the filter names the ids (`ids`), or the rows are
    /// read in id order, which is the query's order (`ids` is `None`).
    PrimaryKey {
        /// The ids the filter fixes (`id = v`, `id IN (...)`).
        ids: Option<Vec<Value>>,
    },
    /// A range of a declared index.
    Index(IndexScan),
}

impl Access {
    /// The index scan, when a declared index serves the source.
    pub fn index(&self) -> Option<&IndexScan> {
        match self {
            Access::Index(scan) => Some(scan),
            _ => None,
        }
    }
}

/// A scan of a declared index.
#[derive(Clone, Debug, PartialEq)]
pub struct IndexScan {
    /// The index name.
    pub index: String,
    /// Its columns, most significant first.
    pub columns: Vec<String>,
    /// Values of the leading columns the filter fixes by equality, in
    /// column order.
    pub equal: Vec<Value>,
    /// Lower bound on the column after the fixed ones.
    pub lower: Bound<Value>,
    /// Upper bound on the column after the fixed ones.
    pub upper: Bound<Value>,
    /// Whether the scan yields rows in the query's order, so a limit can
    /// stop it after the window (ties at the window's edge read whole).
    pub serves_order: bool,
    /// Whether the scan runs from the end of the range (descending order).
    pub reverse: bool,
    /// Whether the scan's range is exactly the filter: every top-level AND
    /// term of the filter fixes a column or bounds the range, so every row
    /// in range passes the filter.
    pub covers_filter: bool,
}

impl IndexScan {
    /// The scan's bounds as index-prefix values (the form
    /// `Store::scan_visible_index` takes): the fixed values, followed by
    /// the range bound on the next column when there is one.
    pub fn bounds(&self) -> (Bound<Vec<Value>>, Bound<Vec<Value>>) {
        let side = |b: &Bound<Value>| -> Bound<Vec<Value>> {
            let with = |v: &Value| {
                let mut key = self.equal.clone();
                key.push(v.clone());
                key
            };
            match b {
                Bound::Included(v) => Bound::Included(with(v)),
                Bound::Excluded(v) => Bound::Excluded(with(v)),
                Bound::Unbounded if self.equal.is_empty() => Bound::Unbounded,
                Bound::Unbounded => Bound::Included(self.equal.clone()),
            }
        };
        (side(&self.lower), side(&self.upper))
    }
}

/// One source of the query (the `from` collection, then each join).
#[derive(Clone, Debug, PartialEq)]
pub struct SourcePlan {
    /// The collection.
    pub collection: String,
    /// Its alias in the query.
    pub alias: String,
    /// How its rows are found.
    pub access: Access,
}

/// Most rows a store-backed window keeps beyond `offset + limit` (never
/// more than `offset + limit` itself), so that rows leaving it rarely
/// force a new scan.
pub const WINDOW_MARGIN_ROWS: usize = 16;

/// One operator of a live query, with the state it keeps.
#[derive(Clone, Debug, PartialEq)]
pub enum Operator {
    /// The rows of a source, as the engine holds them.
    Source {
        /// The source's alias.
        alias: String,
    },
    /// The rows of a source read from the store through an index range,
    /// only up to the window's edge: a live query served by an index
    /// whose range is its filter and whose order is its order, with a
    /// limit (see [`Explain::index_window`]).
    IndexWindow {
        /// The source's alias.
        alias: String,
        /// Rows read per scan: `offset + limit` plus a margin of as many
        /// (at most [`WINDOW_MARGIN_ROWS`]), or the whole range when
        /// smaller, plus ties at the edge.
        rows: usize,
    },
    /// WHERE: keeps nothing.
    Filter,
    /// An equi-join with one more source.
    Join {
        /// The joined source's alias.
        alias: String,
        /// Inner or outer.
        kind: JoinKind,
        /// Key column pairs.
        on: Vec<(String, String)>,
    },
    /// GROUP BY with aggregates.
    Group {
        /// Number of group keys (0: one global group).
        keys: usize,
    },
    /// DISTINCT.
    Distinct,
    /// ORDER BY, OFFSET and LIMIT over the rows that reach it.
    Window {
        /// Sort keys.
        order: Vec<String>,
        /// Rows skipped.
        offset: usize,
        /// Most rows shown.
        limit: Option<usize>,
    },
}

impl Operator {
    /// What the operator keeps between transactions.
    pub fn state(&self) -> &'static str {
        match self {
            Operator::Source { .. } => "every row of the collection, in the engine (shared by the queries on it)",
            Operator::IndexWindow { .. } => {
                "the rows of the index range up to the window's edge (with a margin and whole ties), \
                 refilled from the store when rows leave"
            }
            Operator::Filter => "nothing",
            Operator::Join { .. } => "both sides' rows, hashed by the join key",
            Operator::Group { .. } => {
                "one running aggregate per group (min and max keep an ordered multiset of their values)"
            }
            Operator::Distinct => "a count per distinct output row",
            Operator::Window { .. } => "every row that reaches it, in an ordered rank index",
        }
    }
}

/// A query's plan, from [`Query::explain`]. Its `Display` is one line per
/// source and operator.
#[derive(Clone, Debug, PartialEq)]
pub struct Explain {
    /// The sources, `from` first.
    pub sources: Vec<SourcePlan>,
    /// The operators, in the order rows flow through them.
    pub operators: Vec<Operator>,
}

impl Explain {
    /// The index scan a live query reads its rows through when it runs as
    /// a store-backed window: a single source without grouping or
    /// distinct, an index whose range is exactly the filter and whose
    /// order is the query's, and a limit. `None`: the query keeps whole
    /// collections in memory.
    pub fn index_window(&self) -> Option<&IndexScan> {
        match self.operators.first() {
            Some(Operator::IndexWindow { .. }) => self.access().index(),
            _ => None,
        }
    }

    /// How the `from` collection's rows are found.
    pub fn access(&self) -> &Access {
        match self.sources.first() {
            Some(s) => &s.access,
            None => &Access::FullScan,
        }
    }
}

fn write_bound(f: &mut fmt::Formatter<'_>, col: &str, b: &Bound<Value>, lower: bool) -> fmt::Result {
    let (incl, excl) = if lower { (">=", ">") } else { ("<=", "<") };
    match b {
        Bound::Included(v) => write!(f, " {col} {incl} {}", show(v)),
        Bound::Excluded(v) => write!(f, " {col} {excl} {}", show(v)),
        Bound::Unbounded => Ok(()),
    }
}

fn show(v: &Value) -> String {
    match v {
        Value::Text(s) => format!("{s:?}"),
        other => other.to_string(),
    }
}

impl fmt::Display for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Access::FullScan => write!(f, "full scan"),
            Access::PrimaryKey { ids: Some(ids) } => {
                let ids: Vec<String> = ids.iter().map(show).collect();
                write!(f, "primary key lookup, id in ({})", ids.join(", "))
            }
            Access::PrimaryKey { ids: None } => write!(f, "primary key scan in id order"),
            Access::Index(scan) => {
                write!(f, "index {} ({})", scan.index, scan.columns.join(", "))?;
                let fixed: Vec<String> = scan
                    .columns
                    .iter()
                    .zip(&scan.equal)
                    .map(|(c, v)| format!("{c} = {}", show(v)))
                    .collect();
                let next = scan.columns.get(scan.equal.len()).map_or("", String::as_str);
                let ranged = !matches!((&scan.lower, &scan.upper), (Bound::Unbounded, Bound::Unbounded));
                if fixed.is_empty() && !ranged {
                    write!(f, ", whole index")?;
                } else {
                    write!(f, ", range")?;
                    if !fixed.is_empty() {
                        write!(f, " {}", fixed.join(" and "))?;
                    }
                    write_bound(f, next, &scan.lower, true)?;
                    write_bound(f, next, &scan.upper, false)?;
                }
                if scan.serves_order {
                    let dir = if scan.reverse { "backwards" } else { "forwards" };
                    write!(f, ", read {dir} in the query's order")?;
                }
                Ok(())
            }
        }
    }
}

impl fmt::Display for Operator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Operator::Source { alias } => write!(f, "source {alias}")?,
            Operator::IndexWindow { alias, rows } => write!(f, "index window on {alias}, {rows} rows")?,
            Operator::Filter => write!(f, "filter")?,
            Operator::Join { alias, kind, on } => {
                let on: Vec<String> = on.iter().map(|(a, b)| format!("{a} = {b}")).collect();
                write!(f, "{kind:?} join {alias} on {}", on.join(" and "))?
            }
            Operator::Group { keys } => write!(f, "group by {keys} key(s)")?,
            Operator::Distinct => write!(f, "distinct")?,
            Operator::Window { order, offset, limit } => {
                write!(f, "window")?;
                if !order.is_empty() {
                    write!(f, " order by {}", order.join(", "))?;
                }
                if *offset > 0 {
                    write!(f, " offset {offset}")?;
                }
                if let Some(l) = limit {
                    write!(f, " limit {l}")?;
                }
            }
        }
        write!(f, ": keeps {}", self.state())
    }
}

impl fmt::Display for Explain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for s in &self.sources {
            writeln!(f, "{} as {}: {}", s.collection, s.alias, s.access)?;
        }
        for (i, op) in self.operators.iter().enumerate() {
            if i + 1 < self.operators.len() {
                writeln!(f, "{op}")?;
            } else {
                write!(f, "{op}")?;
            }
        }
        Ok(())
    }
}

/// The top-level AND terms of a filter.
fn conjuncts<'a>(e: &'a Expr, out: &mut Vec<&'a Expr>) {
    match e {
        Expr::And(a, b) => {
            conjuncts(a, out);
            conjuncts(b, out);
        }
        other => out.push(other),
    }
}

/// The column a reference names in the source `alias` (the `from` source
/// also takes unqualified names).
fn column_of<'a>(name: &'a str, alias: &str, is_from: bool) -> Option<&'a str> {
    match name.split_once('.') {
        Some((a, c)) if a == alias => Some(c),
        Some(_) => None,
        None if is_from => Some(name),
        None => None,
    }
}

fn flip(op: CmpOp) -> CmpOp {
    match op {
        CmpOp::Gt => CmpOp::Lt,
        CmpOp::Gte => CmpOp::Lte,
        CmpOp::Lt => CmpOp::Gt,
        CmpOp::Lte => CmpOp::Gte,
        other => other,
    }
}

/// `column op value` terms of the filter on one source (NULL literals
/// never match, so they fix nothing).
fn comparisons<'a>(filter: Option<&'a Expr>, alias: &str, is_from: bool) -> Vec<(&'a str, CmpOp, &'a Value)> {
    let mut terms = Vec::new();
    if let Some(f) = filter {
        conjuncts(f, &mut terms);
    }
    terms
        .into_iter()
        .filter_map(|t| match t {
            Expr::Cmp(op, a, b) => match (a.as_ref(), b.as_ref()) {
                (Expr::Col(c), Expr::Lit(v)) => Some((c.as_str(), *op, v)),
                (Expr::Lit(v), Expr::Col(c)) => Some((c.as_str(), flip(*op), v)),
                _ => None,
            },
            _ => None,
        })
        .filter(|(_, _, v)| !v.is_null())
        .filter_map(|(c, op, v)| column_of(c, alias, is_from).map(|c| (c, op, v)))
        .collect()
}

/// The ids a filter fixes: `id = v` or `id IN (literals)`.
fn fixed_ids(filter: Option<&Expr>, alias: &str, is_from: bool) -> Option<Vec<Value>> {
    let mut terms = Vec::new();
    if let Some(f) = filter {
        conjuncts(f, &mut terms);
    }
    for t in terms {
        if let Expr::In(x, items) = t {
            if let Expr::Col(c) = x.as_ref() {
                if column_of(c, alias, is_from) == Some("id") {
                    let values: Option<Vec<Value>> = items
                        .iter()
                        .map(|i| match i {
                            Expr::Lit(v) => Some(v.clone()),
                            _ => None,
                        })
                        .collect();
                    if values.is_some() {
                        return values;
                    }
                }
            }
        }
    }
    comparisons(filter, alias, is_from)
        .into_iter()
        .find(|(c, op, _)| *c == "id" && *op == CmpOp::Eq)
        .map(|(_, _, v)| vec![v.clone()])
}

/// The source column an `order_by` term sorts by, when it is a plain
/// column of the `from` source (an output name counts only when it
/// selects that same column).
fn order_column<'a>(q: &'a Query, e: &'a Expr) -> Option<&'a str> {
    let Expr::Col(name) = e else { return None };
    if let Some(select) = &q.select {
        if let Some((_, expr)) = select.iter().find(|(n, _)| n == name) {
            return match expr {
                Expr::Col(c) => column_of(c, &q.alias, true),
                _ => None,
            };
        }
    }
    column_of(name, &q.alias, true)
}

fn plan_index(q: &Query, index: &Index, terms: &[(&str, CmpOp, &Value)], is_from: bool) -> IndexScan {
    let mut all_terms = Vec::new();
    if let Some(f) = &q.filter {
        conjuncts(f, &mut all_terms);
    }
    let mut equal = Vec::new();
    for c in &index.columns {
        match terms.iter().find(|(t, op, _)| t == c && *op == CmpOp::Eq) {
            Some((_, _, v)) => equal.push((*v).clone()),
            None => break,
        }
    }
    let (mut lower, mut upper) = (Bound::Unbounded, Bound::Unbounded);
    let mut bounds_used = 0;
    if let Some(next) = index.columns.get(equal.len()) {
        for (c, op, v) in terms {
            if c != next {
                continue;
            }
            let v = (*v).clone();
            match op {
                CmpOp::Gt if matches!(lower, Bound::Unbounded) => lower = Bound::Excluded(v),
                CmpOp::Gte if matches!(lower, Bound::Unbounded) => lower = Bound::Included(v),
                CmpOp::Lt if matches!(upper, Bound::Unbounded) => upper = Bound::Excluded(v),
                CmpOp::Lte if matches!(upper, Bound::Unbounded) => upper = Bound::Included(v),
                _ => continue,
            }
            bounds_used += 1;
        }
    }
    // The order is served when, past the fixed columns, the sort keys are
    // exactly the index's remaining columns in one direction (ties then
    // come by id, as the query breaks them), or when every index column is
    // fixed and the query has no order (it is then by id).
    let plain = q.joins.is_empty() && q.group_by.is_empty() && !q.distinct && is_from;
    let fixed = equal.len();
    let keys: Option<Vec<(&str, Order)>> = q
        .order_by
        .iter()
        .map(|(e, o)| order_column(q, e).map(|c| (c, *o)))
        .collect();
    let (serves_order, reverse) = match keys {
        _ if !plain || q.select.as_ref().is_some_and(|s| s.iter().any(|(_, e)| e.has_agg())) => (false, false),
        Some(keys) if keys.is_empty() => (fixed == index.columns.len(), false),
        Some(keys) => {
            // Sort keys on fixed columns are constant: skip them.
            let rest: Vec<&(&str, Order)> = keys
                .iter()
                .filter(|(c, _)| !index.columns[..fixed].iter().any(|f| f == c))
                .collect();
            let cols_match = rest.len() == index.columns.len() - fixed
                && rest.iter().zip(&index.columns[fixed..]).all(|((c, _), ic)| c == ic);
            let one_dir = rest.windows(2).all(|w| w[0].1 == w[1].1);
            let reverse = rest.first().is_some_and(|(_, o)| *o == Order::Desc);
            (cols_match && one_dir && !rest.is_empty(), reverse)
        }
        None => (false, false),
    };
    IndexScan {
        index: index.name.clone(),
        columns: index.columns.clone(),
        lower,
        upper,
        serves_order,
        reverse: serves_order && reverse,
        // Only when the terms are exactly one per fixed column and bound:
        // then every term is one the scan applies.
        covers_filter: is_from && all_terms.len() == fixed + bounds_used && terms.len() == all_terms.len(),
        equal,
    }
}

fn plan_source(q: &Query, alias: &str, is_from: bool, indexes: &[Index]) -> Access {
    let filter = q.filter.as_ref();
    if let Some(ids) = fixed_ids(filter, alias, is_from) {
        return Access::PrimaryKey { ids: Some(ids) };
    }
    let terms = comparisons(filter, alias, is_from);
    let best = indexes
        .iter()
        .map(|i| plan_index(q, i, &terms, is_from))
        .filter(|s| {
            !s.equal.is_empty()
                || !matches!((&s.lower, &s.upper), (Bound::Unbounded, Bound::Unbounded))
                || s.serves_order
        })
        .max_by_key(|s| {
            let ranged = !matches!((&s.lower, &s.upper), (Bound::Unbounded, Bound::Unbounded));
            // Fewer columns win ties: a shorter index is cheaper to read.
            (s.equal.len(), ranged, s.serves_order, usize::MAX - s.columns.len())
        });
    if let Some(scan) = best {
        return Access::Index(scan);
    }
    let plain = q.joins.is_empty() && q.group_by.is_empty() && !q.distinct && is_from;
    let by_id = q.order_by.is_empty()
        || (q.order_by.len() == 1
            && q.order_by
                .iter()
                .all(|(e, o)| order_column(q, e) == Some("id") && *o == Order::Asc));
    if plain && by_id && q.limit.is_some() {
        return Access::PrimaryKey { ids: None };
    }
    Access::FullScan
}

fn expr_text(e: &Expr) -> String {
    match e {
        Expr::Col(c) => c.clone(),
        Expr::Lit(v) => show(v),
        other => format!("{other:?}"),
    }
}

impl Query {
    /// Describe the plan: for each source, whether one of its declared
    /// `indexes` (given per collection), the primary key, or a full scan
    /// finds its rows and over which range; then the operators and the
    /// state each keeps. Only top-level AND terms comparing a column with
    /// a literal narrow a scan.
    pub fn explain(&self, indexes: &dyn Fn(&str) -> Vec<Index>) -> Explain {
        let mut sources = vec![SourcePlan {
            collection: self.collection.clone(),
            alias: self.alias.clone(),
            access: plan_source(self, &self.alias, true, &indexes(&self.collection)),
        }];
        for j in &self.joins {
            sources.push(SourcePlan {
                collection: j.collection.clone(),
                alias: j.alias.clone(),
                access: plan_source(self, &j.alias, false, &indexes(&j.collection)),
            });
        }
        let first = sources.first().and_then(|s| s.access.index());
        let window = match (first, self.limit) {
            (Some(scan), Some(limit))
                if scan.serves_order
                    && scan.covers_filter
                    && self.joins.is_empty()
                    && self.group_by.is_empty()
                    && self.having.is_none()
                    && !self.distinct
                    && !self.select.as_ref().is_some_and(|s| s.iter().any(|(_, e)| e.has_agg())) =>
            {
                let need = self.offset.saturating_add(limit);
                Some(need.saturating_add(need.min(WINDOW_MARGIN_ROWS)))
            }
            _ => None,
        };
        let mut operators = vec![match window {
            Some(rows) => Operator::IndexWindow {
                alias: self.alias.clone(),
                rows,
            },
            None => Operator::Source {
                alias: self.alias.clone(),
            },
        }];
        for j in &self.joins {
            operators.push(Operator::Source { alias: j.alias.clone() });
            operators.push(Operator::Join {
                alias: j.alias.clone(),
                kind: j.kind,
                on: j.on.clone(),
            });
        }
        if self.filter.is_some() {
            operators.push(Operator::Filter);
        }
        let select_has_agg = self.select.as_ref().is_some_and(|s| s.iter().any(|(_, e)| e.has_agg()));
        if !self.group_by.is_empty() || select_has_agg || self.having.as_ref().is_some_and(Expr::has_agg) {
            operators.push(Operator::Group {
                keys: self.group_by.len(),
            });
        }
        if self.distinct {
            operators.push(Operator::Distinct);
        }
        operators.push(Operator::Window {
            order: self
                .order_by
                .iter()
                .map(|(e, o)| match o {
                    Order::Asc => expr_text(e),
                    Order::Desc => format!("{} desc", expr_text(e)),
                })
                .collect(),
            offset: self.offset,
            limit: self.limit,
        });
        Explain { sources, operators }
    }
}
