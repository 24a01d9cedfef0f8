//! The typed query builder.

use crate::expr::{col, Expr};

/// How a join keeps rows without a partner.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JoinKind {
    /// Only matched pairs.
    Inner,
    /// Every left row; a missing right side reads as NULL.
    Left,
    /// Every right row; a missing left side reads as NULL.
    Right,
    /// Every row of both sides.
    Full,
}

/// Sort direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Order {
    /// Smallest first (NULL first, as in SQLite).
    Asc,
    /// Largest first (NULL last).
    Desc,
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) struct JoinClause {
    pub kind: JoinKind,
    pub collection: String,
    pub alias: String,
    /// Pairs of column references, one naming an earlier source, the other
    /// the joined one; rows match when every pair is equal (NULL never
    /// matches).
    pub on: Vec<(String, String)>,
}

/// A query, built with chained calls:
///
/// ```
/// use ferry_query::{col, Order, Query};
/// let q = Query::from("tickets")
///     .filter(col("status").eq("pending"))
///     .select_cols(["id", "title"])
///     .order_by(col("updated_at"), Order::Desc)
///     .limit(50);
/// # let _ = q;
/// ```
///
/// Evaluation order is SQL's: from and joins, `filter` (WHERE), `group_by`
/// with aggregates and `having` (or plain `select`), `distinct`, `order_by`,
/// `offset`, `limit`.
///
/// Ties in `order_by` (and the order when there is none) are broken by the
/// row's identity: for plain and joined queries the tuple of source row ids
/// in source order (a missing outer-join side is NULL and sorts first), for
/// grouped queries the group key values, for `distinct` the row's values.
#[derive(Clone, Debug, PartialEq)]
pub struct Query {
    pub(crate) collection: String,
    pub(crate) alias: String,
    pub(crate) joins: Vec<JoinClause>,
    pub(crate) filter: Option<Expr>,
    pub(crate) select: Option<Vec<(String, Expr)>>,
    pub(crate) group_by: Vec<Expr>,
    pub(crate) having: Option<Expr>,
    pub(crate) order_by: Vec<(Expr, Order)>,
    pub(crate) limit: Option<usize>,
    pub(crate) offset: usize,
    pub(crate) distinct: bool,
}

impl Query {
    /// Rows of a collection; its alias is the collection name.
    pub fn from(collection: impl Into<String>) -> Query {
        let c = collection.into();
        Query::from_as(c.clone(), c)
    }

    /// Every collection the query reads, `from` first, then joins in order
    /// (a collection joined twice appears twice).
    pub fn collections(&self) -> Vec<&str> {
        std::iter::once(self.collection.as_str())
            .chain(self.joins.iter().map(|j| j.collection.as_str()))
            .collect()
    }

    /// Rows of a collection under an alias (for `alias.column` references).
    pub fn from_as(collection: impl Into<String>, alias: impl Into<String>) -> Query {
        Query {
            collection: collection.into(),
            alias: alias.into(),
            joins: Vec::new(),
            filter: None,
            select: None,
            group_by: Vec::new(),
            having: None,
            order_by: Vec::new(),
            limit: None,
            offset: 0,
            distinct: false,
        }
    }

    /// Join another collection (under `alias`) on equality of column pairs
    /// `(earlier source column, joined column)`, either order.
    pub fn join<A: Into<String>, B: Into<String>>(
        mut self,
        kind: JoinKind,
        collection: impl Into<String>,
        alias: impl Into<String>,
        on: impl IntoIterator<Item = (A, B)>,
    ) -> Query {
        self.joins.push(JoinClause {
            kind,
            collection: collection.into(),
            alias: alias.into(),
            on: on.into_iter().map(|(a, b)| (a.into(), b.into())).collect(),
        });
        self
    }

    /// `INNER JOIN collection AS alias ON left = right`.
    pub fn inner_join(self, collection: &str, alias: &str, left: &str, right: &str) -> Query {
        self.join(JoinKind::Inner, collection, alias, [(left, right)])
    }

    /// `LEFT JOIN collection AS alias ON left = right`.
    pub fn left_join(self, collection: &str, alias: &str, left: &str, right: &str) -> Query {
        self.join(JoinKind::Left, collection, alias, [(left, right)])
    }

    /// `RIGHT JOIN collection AS alias ON left = right`.
    pub fn right_join(self, collection: &str, alias: &str, left: &str, right: &str) -> Query {
        self.join(JoinKind::Right, collection, alias, [(left, right)])
    }

    /// `FULL JOIN collection AS alias ON left = right`.
    pub fn full_join(self, collection: &str, alias: &str, left: &str, right: &str) -> Query {
        self.join(JoinKind::Full, collection, alias, [(left, right)])
    }

    /// WHERE: keep rows for which `cond` is true. Several calls are ANDed.
    pub fn filter(mut self, cond: Expr) -> Query {
        self.filter = Some(match self.filter.take() {
            Some(prev) => prev.and(cond),
            None => cond,
        });
        self
    }

    /// Same as [`Query::filter`].
    pub fn where_(self, cond: Expr) -> Query {
        self.filter(cond)
    }

    /// Output columns: `(name, expression)` pairs (renamed or computed).
    pub fn select<N: Into<String>, I: IntoIterator<Item = (N, Expr)>>(mut self, items: I) -> Query {
        self.select = Some(items.into_iter().map(|(n, e)| (n.into(), e)).collect());
        self
    }

    /// Output columns by name, each named as written.
    pub fn select_cols<N: AsRef<str>, I: IntoIterator<Item = N>>(self, names: I) -> Query {
        let items: Vec<(String, Expr)> = names
            .into_iter()
            .map(|n| (n.as_ref().to_owned(), col(n.as_ref())))
            .collect();
        self.select(items)
    }

    /// GROUP BY these expressions.
    pub fn group_by<I: IntoIterator<Item = Expr>>(mut self, exprs: I) -> Query {
        self.group_by.extend(exprs);
        self
    }

    /// HAVING: keep groups for which `cond` is true. Several calls are ANDed.
    pub fn having(mut self, cond: Expr) -> Query {
        self.having = Some(match self.having.take() {
            Some(prev) => prev.and(cond),
            None => cond,
        });
        self
    }

    /// Add a sort key. Names refer to output columns first, then (for
    /// queries without grouping or distinct) to source columns.
    pub fn order_by(mut self, e: Expr, order: Order) -> Query {
        self.order_by.push((e, order));
        self
    }

    /// At most `n` rows.
    pub fn limit(mut self, n: usize) -> Query {
        self.limit = Some(n);
        self
    }

    /// Skip the first `n` rows.
    pub fn offset(mut self, n: usize) -> Query {
        self.offset = n;
        self
    }

    /// Drop duplicate output rows.
    pub fn distinct(mut self) -> Query {
        self.distinct = true;
        self
    }

    /// At most one row (`limit(1)`); read it with [`crate::QueryResult::first`].
    pub fn find_one(self) -> Query {
        self.limit(1)
    }
}
