//! Expressions: the public [`Expr`] tree, its builder functions, and the
//! compiled form evaluated by both the incremental operators and the
//! reference evaluator.
//!
//! Semantics follow SQLite: booleans are integers 1 and 0, NULL is
//! "unknown", comparisons with NULL are unknown, `AND`/`OR`/`NOT` follow the
//! SQL truth tables, integer division truncates and dividing by zero gives
//! NULL. A `where`/`having` keeps a row only when its condition is true
//! (a non-zero number).

use std::borrow::Cow;
use std::sync::Arc;

use ferry_core::Value;

use crate::source::SrcRow;

/// A comparison operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CmpOp {
    /// `=`
    Eq,
    /// `<>`
    Ne,
    /// `>`
    Gt,
    /// `>=`
    Gte,
    /// `<`
    Lt,
    /// `<=`
    Lte,
}

/// An arithmetic operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArithOp {
    /// `+`
    Add,
    /// `-`
    Subtract,
    /// `*`
    Multiply,
    /// `/` (integer division for two integers; by zero gives NULL)
    Divide,
}

/// A scalar function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Func {
    /// ASCII upper case.
    Upper,
    /// ASCII lower case.
    Lower,
    /// Characters in text, bytes in a blob.
    Length,
    /// Text concatenation; NULL arguments count as empty (SQLite `concat()`).
    Concat,
    /// The first non-NULL argument.
    Coalesce,
}

/// An aggregate function.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AggFn {
    /// `count(*)` without an argument, `count(x)` (non-NULL values) with one.
    Count,
    /// Sum of non-NULL values; NULL when there are none.
    Sum,
    /// Average of non-NULL values as a real; NULL when there are none.
    Avg,
    /// Smallest non-NULL value.
    Min,
    /// Largest non-NULL value.
    Max,
}

/// An expression over the columns of a query's sources or output.
///
/// Build with [`col`], [`lit`], the methods on `Expr` and the free
/// functions of this module.
#[derive(Clone, Debug, PartialEq)]
pub enum Expr {
    /// A column: `"name"` (of the `from` source, or an output alias in
    /// `order_by`/`having`) or `"alias.name"`. `id` is the row id.
    Col(String),
    /// A constant.
    Lit(Value),
    /// A comparison; unknown when either side is NULL.
    Cmp(CmpOp, Box<Expr>, Box<Expr>),
    /// Logical AND.
    And(Box<Expr>, Box<Expr>),
    /// Logical OR.
    Or(Box<Expr>, Box<Expr>),
    /// Logical NOT.
    Not(Box<Expr>),
    /// `x IN (a, b, ...)`.
    In(Box<Expr>, Vec<Expr>),
    /// `x LIKE pattern` (`case_insensitive` false: ASCII case folding like
    /// SQLite; true: ILIKE, full Unicode lower-casing).
    Like {
        /// The text tested.
        expr: Box<Expr>,
        /// The pattern with `%` and `_`.
        pattern: Box<Expr>,
        /// ILIKE.
        case_insensitive: bool,
    },
    /// `x IS NULL`.
    IsNull(Box<Expr>),
    /// A scalar function call.
    Func(Func, Vec<Expr>),
    /// Arithmetic.
    Arith(ArithOp, Box<Expr>, Box<Expr>),
    /// An aggregate (only in `select`/`having` of a grouped query).
    Agg(AggFn, Option<Box<Expr>>),
}

/// A column reference.
pub fn col(name: impl Into<String>) -> Expr {
    Expr::Col(name.into())
}

/// A constant.
pub fn lit(v: impl Into<Value>) -> Expr {
    Expr::Lit(v.into())
}

impl From<Value> for Expr {
    fn from(v: Value) -> Self {
        Expr::Lit(v)
    }
}
impl From<&str> for Expr {
    fn from(v: &str) -> Self {
        Expr::Lit(v.into())
    }
}
impl From<String> for Expr {
    fn from(v: String) -> Self {
        Expr::Lit(v.into())
    }
}
impl From<i64> for Expr {
    fn from(v: i64) -> Self {
        Expr::Lit(v.into())
    }
}
impl From<i32> for Expr {
    fn from(v: i32) -> Self {
        Expr::Lit(v.into())
    }
}
impl From<f64> for Expr {
    fn from(v: f64) -> Self {
        Expr::Lit(v.into())
    }
}
impl From<bool> for Expr {
    fn from(v: bool) -> Self {
        Expr::Lit(v.into())
    }
}

fn cmp(op: CmpOp, a: Expr, b: impl Into<Expr>) -> Expr {
    Expr::Cmp(op, Box::new(a), Box::new(b.into()))
}

fn arith(op: ArithOp, a: Expr, b: impl Into<Expr>) -> Expr {
    Expr::Arith(op, Box::new(a), Box::new(b.into()))
}

#[allow(clippy::should_implement_trait)]
impl Expr {
    /// `self = other`
    pub fn eq(self, other: impl Into<Expr>) -> Expr {
        cmp(CmpOp::Eq, self, other)
    }
    /// `self <> other`
    pub fn ne(self, other: impl Into<Expr>) -> Expr {
        cmp(CmpOp::Ne, self, other)
    }
    /// `self > other`
    pub fn gt(self, other: impl Into<Expr>) -> Expr {
        cmp(CmpOp::Gt, self, other)
    }
    /// `self >= other`
    pub fn gte(self, other: impl Into<Expr>) -> Expr {
        cmp(CmpOp::Gte, self, other)
    }
    /// `self < other`
    pub fn lt(self, other: impl Into<Expr>) -> Expr {
        cmp(CmpOp::Lt, self, other)
    }
    /// `self <= other`
    pub fn lte(self, other: impl Into<Expr>) -> Expr {
        cmp(CmpOp::Lte, self, other)
    }
    /// `self AND other`
    pub fn and(self, other: impl Into<Expr>) -> Expr {
        Expr::And(Box::new(self), Box::new(other.into()))
    }
    /// `self OR other`
    pub fn or(self, other: impl Into<Expr>) -> Expr {
        Expr::Or(Box::new(self), Box::new(other.into()))
    }
    /// `NOT self`
    pub fn not(self) -> Expr {
        Expr::Not(Box::new(self))
    }
    /// `self IN (items...)`
    pub fn is_in<I: IntoIterator<Item = E>, E: Into<Expr>>(self, items: I) -> Expr {
        Expr::In(Box::new(self), items.into_iter().map(Into::into).collect())
    }
    /// `self LIKE pattern` (ASCII case-insensitive, `%` and `_`).
    pub fn like(self, pattern: impl Into<Expr>) -> Expr {
        Expr::Like {
            expr: Box::new(self),
            pattern: Box::new(pattern.into()),
            case_insensitive: false,
        }
    }
    /// `self ILIKE pattern` (case-insensitive for all of Unicode).
    pub fn ilike(self, pattern: impl Into<Expr>) -> Expr {
        Expr::Like {
            expr: Box::new(self),
            pattern: Box::new(pattern.into()),
            case_insensitive: true,
        }
    }
    /// `self IS NULL`
    pub fn is_null(self) -> Expr {
        Expr::IsNull(Box::new(self))
    }
    /// `self IS NOT NULL`
    pub fn is_not_null(self) -> Expr {
        Expr::Not(Box::new(Expr::IsNull(Box::new(self))))
    }
    /// `self + other`
    pub fn add(self, other: impl Into<Expr>) -> Expr {
        arith(ArithOp::Add, self, other)
    }
    /// `self - other`
    pub fn subtract(self, other: impl Into<Expr>) -> Expr {
        arith(ArithOp::Subtract, self, other)
    }
    /// `self * other`
    pub fn multiply(self, other: impl Into<Expr>) -> Expr {
        arith(ArithOp::Multiply, self, other)
    }
    /// `self / other`
    pub fn divide(self, other: impl Into<Expr>) -> Expr {
        arith(ArithOp::Divide, self, other)
    }
}

/// `NOT e`
pub fn not(e: Expr) -> Expr {
    e.not()
}
/// `upper(e)`
pub fn upper(e: Expr) -> Expr {
    Expr::Func(Func::Upper, vec![e])
}
/// `lower(e)`
pub fn lower(e: Expr) -> Expr {
    Expr::Func(Func::Lower, vec![e])
}
/// `length(e)`
pub fn length(e: Expr) -> Expr {
    Expr::Func(Func::Length, vec![e])
}
/// `concat(a, b, ...)`; NULL arguments count as empty text.
pub fn concat<I: IntoIterator<Item = Expr>>(args: I) -> Expr {
    Expr::Func(Func::Concat, args.into_iter().collect())
}
/// `coalesce(a, b, ...)`
pub fn coalesce<I: IntoIterator<Item = Expr>>(args: I) -> Expr {
    Expr::Func(Func::Coalesce, args.into_iter().collect())
}
/// `count(*)`
pub fn count() -> Expr {
    Expr::Agg(AggFn::Count, None)
}
/// `count(e)`: rows where `e` is not NULL.
pub fn count_of(e: Expr) -> Expr {
    Expr::Agg(AggFn::Count, Some(Box::new(e)))
}
/// `sum(e)`
pub fn sum(e: Expr) -> Expr {
    Expr::Agg(AggFn::Sum, Some(Box::new(e)))
}
/// `avg(e)`
pub fn avg(e: Expr) -> Expr {
    Expr::Agg(AggFn::Avg, Some(Box::new(e)))
}
/// `min(e)`
pub fn min(e: Expr) -> Expr {
    Expr::Agg(AggFn::Min, Some(Box::new(e)))
}
/// `max(e)`
pub fn max(e: Expr) -> Expr {
    Expr::Agg(AggFn::Max, Some(Box::new(e)))
}

impl Expr {
    pub(crate) fn has_agg(&self) -> bool {
        match self {
            Expr::Agg(..) => true,
            Expr::Col(_) | Expr::Lit(_) => false,
            Expr::Cmp(_, a, b) | Expr::And(a, b) | Expr::Or(a, b) | Expr::Arith(_, a, b) => a.has_agg() || b.has_agg(),
            Expr::Not(a) | Expr::IsNull(a) => a.has_agg(),
            Expr::In(a, items) => a.has_agg() || items.iter().any(Expr::has_agg),
            Expr::Like { expr, pattern, .. } => expr.has_agg() || pattern.has_agg(),
            Expr::Func(_, args) => args.iter().any(Expr::has_agg),
        }
    }
}

// ---------------------------------------------------------------------------
// Compiled form.

/// A column of a source row.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum ColName {
    /// The row id.
    Id,
    /// A named column.
    Name(String),
}

impl ColName {
    pub(crate) fn read(&self, row: &SrcRow) -> Value {
        match self {
            ColName::Id => Value::Text(row.id.to_string()),
            ColName::Name(n) => row.get(n).map_or(Value::Null, |v| canon(v.clone())),
        }
    }
}

/// Canonical form for comparisons: `-0.0` becomes `0.0`. (`Value`'s order
/// puts `-0.0` below `0.0` while both equal `Integer(0)`, which is not
/// transitive; every value an expression sees is canonical so sorting,
/// grouping and joining stay consistent.)
pub(crate) fn canon(v: Value) -> Value {
    match v {
        Value::Real(r) => Value::Real(if r == 0.0 { 0.0 } else { r }),
        v => v,
    }
}

/// An expression with every column resolved to a slot.
#[derive(Clone, Debug)]
pub(crate) enum CExpr {
    Lit(Value),
    /// Column of source `i` of the joined row (NULL when that side is missing).
    Src(usize, ColName),
    /// Output column `i`.
    Out(usize),
    /// Group key `i`.
    Group(usize),
    /// Aggregate result `i`.
    Agg(usize),
    Cmp(CmpOp, Box<CExpr>, Box<CExpr>),
    And(Box<CExpr>, Box<CExpr>),
    Or(Box<CExpr>, Box<CExpr>),
    Not(Box<CExpr>),
    In(Box<CExpr>, Vec<CExpr>),
    Like(Box<CExpr>, Box<CExpr>, bool),
    IsNull(Box<CExpr>),
    Func(Func, Vec<CExpr>),
    Arith(ArithOp, Box<CExpr>, Box<CExpr>),
}

/// One joined row: one slot per source, `None` for the missing side of an
/// outer join.
pub(crate) type Wide = Vec<Option<Arc<SrcRow>>>;

/// What an expression can read.
#[derive(Clone, Copy, Default)]
pub(crate) struct Env<'a> {
    pub wide: &'a [Option<Arc<SrcRow>>],
    pub out: &'a [Value],
    pub group: &'a [Value],
    pub aggs: &'a [Value],
}

fn truth(b: bool) -> Value {
    Value::Integer(i64::from(b))
}

/// SQL truth of a value: `Some(true)` for a non-zero number, `None` for
/// NULL, `Some(false)` otherwise (text and blobs count as false).
pub(crate) fn truth_of(v: &Value) -> Option<bool> {
    match v {
        Value::Null => None,
        Value::Integer(i) => Some(*i != 0),
        Value::Real(r) => Some(*r != 0.0),
        Value::Text(_) | Value::Blob(_) => Some(false),
    }
}

/// Whether a condition keeps a row (only true does).
pub(crate) fn is_true(v: &Value) -> bool {
    truth_of(v) == Some(true)
}

/// Text rendering used by LIKE, string functions and concat.
pub(crate) fn to_text(v: &Value) -> Option<String> {
    match v {
        Value::Null => None,
        Value::Integer(i) => Some(i.to_string()),
        Value::Real(r) => {
            if r.is_finite() && r.fract() == 0.0 && r.abs() < 1e15 {
                Some(format!("{r:.1}"))
            } else {
                Some(format!("{r}"))
            }
        }
        Value::Text(s) => Some(s.clone()),
        Value::Blob(b) => Some(String::from_utf8_lossy(b).into_owned()),
    }
}

/// Numeric value for arithmetic and sums: text that parses as a number is
/// that number, other text and blobs are 0 (as in SQLite).
pub(crate) fn to_numeric(v: &Value) -> Value {
    match v {
        Value::Null => Value::Null,
        Value::Integer(_) => v.clone(),
        Value::Real(_) => canon(v.clone()),
        Value::Text(s) => {
            let t = s.trim();
            if let Ok(i) = t.parse::<i64>() {
                Value::Integer(i)
            } else if let Ok(r) = t.parse::<f64>() {
                canon(Value::Real(r))
            } else {
                Value::Integer(0)
            }
        }
        Value::Blob(_) => Value::Integer(0),
    }
}

fn real(r: f64) -> Value {
    if r.is_nan() {
        Value::Null
    } else {
        canon(Value::Real(r))
    }
}

pub(crate) fn arith_values(op: ArithOp, a: &Value, b: &Value) -> Value {
    let (a, b) = (to_numeric(a), to_numeric(b));
    match (&a, &b) {
        (Value::Null, _) | (_, Value::Null) => Value::Null,
        (Value::Integer(x), Value::Integer(y)) => {
            let (x, y) = (*x, *y);
            let r = match op {
                ArithOp::Add => x.checked_add(y),
                ArithOp::Subtract => x.checked_sub(y),
                ArithOp::Multiply => x.checked_mul(y),
                ArithOp::Divide => {
                    if y == 0 {
                        return Value::Null;
                    }
                    x.checked_div(y)
                }
            };
            match r {
                Some(i) => Value::Integer(i),
                // Overflow falls back to real arithmetic, as in SQLite.
                None => arith_real(op, x as f64, y as f64),
            }
        }
        _ => {
            let x = a.as_f64().unwrap_or(0.0);
            let y = b.as_f64().unwrap_or(0.0);
            arith_real(op, x, y)
        }
    }
}

fn arith_real(op: ArithOp, x: f64, y: f64) -> Value {
    match op {
        ArithOp::Add => real(x + y),
        ArithOp::Subtract => real(x - y),
        ArithOp::Multiply => real(x * y),
        ArithOp::Divide => {
            if y == 0.0 {
                Value::Null
            } else {
                real(x / y)
            }
        }
    }
}

/// LIKE matching with `%` (any run) and `_` (one character).
pub(crate) fn like_match(text: &str, pattern: &str, unicode_fold: bool) -> bool {
    let fold = |s: &str| -> Vec<char> {
        if unicode_fold {
            s.to_lowercase().chars().collect()
        } else {
            s.chars().map(|c| c.to_ascii_lowercase()).collect()
        }
    };
    let t = fold(text);
    let p = fold(pattern);
    // Iterative wildcard match with backtracking to the last `%`.
    let (mut ti, mut pi) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '_' || (p[pi] != '%' && p[pi] == t[ti])) {
            ti += 1;
            pi += 1;
        } else if pi < p.len() && p[pi] == '%' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '%' {
        pi += 1;
    }
    pi == p.len()
}

fn canon_ref(v: &Value) -> Cow<'_, Value> {
    match v {
        Value::Real(r) if *r == 0.0 && r.is_sign_negative() => Cow::Owned(Value::Real(0.0)),
        v => Cow::Borrowed(v),
    }
}

impl CExpr {
    /// Evaluate without cloning columns and constants.
    pub(crate) fn eval_cow<'a>(&'a self, env: &Env<'a>) -> Cow<'a, Value> {
        static NULL: Value = Value::Null;
        match self {
            CExpr::Lit(v) => Cow::Borrowed(v),
            CExpr::Src(i, ColName::Name(n)) => match env.wide.get(*i) {
                Some(Some(row)) => row.get(n).map_or(Cow::Borrowed(&NULL), canon_ref),
                _ => Cow::Borrowed(&NULL),
            },
            CExpr::Out(i) => env.out.get(*i).map_or(Cow::Borrowed(&NULL), Cow::Borrowed),
            CExpr::Group(i) => env.group.get(*i).map_or(Cow::Borrowed(&NULL), Cow::Borrowed),
            CExpr::Agg(i) => env.aggs.get(*i).map_or(Cow::Borrowed(&NULL), Cow::Borrowed),
            e => Cow::Owned(e.eval(env)),
        }
    }

    pub(crate) fn eval(&self, env: &Env<'_>) -> Value {
        match self {
            CExpr::Lit(v) => v.clone(),
            CExpr::Src(i, c) => match env.wide.get(*i) {
                Some(Some(row)) => c.read(row),
                _ => Value::Null,
            },
            CExpr::Out(i) => env.out.get(*i).cloned().unwrap_or(Value::Null),
            CExpr::Group(i) => env.group.get(*i).cloned().unwrap_or(Value::Null),
            CExpr::Agg(i) => env.aggs.get(*i).cloned().unwrap_or(Value::Null),
            CExpr::Cmp(op, a, b) => {
                let (a, b) = (a.eval_cow(env), b.eval_cow(env));
                if a.is_null() || b.is_null() {
                    return Value::Null;
                }
                let o = a.cmp(&b);
                truth(match op {
                    CmpOp::Eq => o.is_eq(),
                    CmpOp::Ne => o.is_ne(),
                    CmpOp::Gt => o.is_gt(),
                    CmpOp::Gte => o.is_ge(),
                    CmpOp::Lt => o.is_lt(),
                    CmpOp::Lte => o.is_le(),
                })
            }
            CExpr::And(a, b) => {
                let x = truth_of(&a.eval(env));
                if x == Some(false) {
                    return truth(false);
                }
                match (x, truth_of(&b.eval(env))) {
                    (_, Some(false)) => truth(false),
                    (Some(true), Some(true)) => truth(true),
                    _ => Value::Null,
                }
            }
            CExpr::Or(a, b) => {
                let x = truth_of(&a.eval(env));
                if x == Some(true) {
                    return truth(true);
                }
                match (x, truth_of(&b.eval(env))) {
                    (_, Some(true)) => truth(true),
                    (Some(false), Some(false)) => truth(false),
                    _ => Value::Null,
                }
            }
            CExpr::Not(a) => match truth_of(&a.eval(env)) {
                None => Value::Null,
                Some(b) => truth(!b),
            },
            CExpr::In(a, items) => {
                let x = a.eval_cow(env);
                if x.is_null() {
                    return Value::Null;
                }
                let mut saw_null = false;
                for it in items {
                    let v = it.eval_cow(env);
                    if v.is_null() {
                        saw_null = true;
                    } else if *v == *x {
                        return truth(true);
                    }
                }
                if saw_null {
                    Value::Null
                } else {
                    truth(false)
                }
            }
            CExpr::Like(a, p, ci) => match (to_text(&a.eval(env)), to_text(&p.eval(env))) {
                (Some(t), Some(p)) => truth(like_match(&t, &p, *ci)),
                _ => Value::Null,
            },
            CExpr::IsNull(a) => truth(a.eval_cow(env).is_null()),
            CExpr::Func(f, args) => eval_func(*f, args, env),
            CExpr::Arith(op, a, b) => arith_values(*op, &a.eval(env), &b.eval(env)),
        }
    }
}

fn eval_func(f: Func, args: &[CExpr], env: &Env<'_>) -> Value {
    let first = || args.first().map_or(Value::Null, |a| a.eval(env));
    match f {
        Func::Upper => to_text(&first()).map_or(Value::Null, |s| Value::Text(s.to_ascii_uppercase())),
        Func::Lower => to_text(&first()).map_or(Value::Null, |s| Value::Text(s.to_ascii_lowercase())),
        Func::Length => match first() {
            Value::Null => Value::Null,
            Value::Blob(b) => Value::Integer(b.len() as i64),
            v => to_text(&v).map_or(Value::Null, |s| Value::Integer(s.chars().count() as i64)),
        },
        Func::Concat => {
            let mut s = String::new();
            for a in args {
                if let Some(t) = to_text(&a.eval(env)) {
                    s.push_str(&t);
                }
            }
            Value::Text(s)
        }
        Func::Coalesce => {
            for a in args {
                let v = a.eval(env);
                if !v.is_null() {
                    return v;
                }
            }
            Value::Null
        }
    }
}
