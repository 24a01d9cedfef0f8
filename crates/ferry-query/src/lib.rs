//! Ferry's live query engine: a typed query builder, a graph of incremental
//! operators per live query, and sans-IO subscriptions.
//!
//! ```
//! use ferry_core::{row_data, Value};
//! use ferry_query::{col, ChangeSet, Order, Query, QueryEngine};
//!
//! #[derive(serde::Deserialize, Debug, PartialEq)]
//! struct Ticket {
//!     id: String,
//!     title: String,
//! }
//!
//! let mut db = QueryEngine::new();
//! db.create_collection("tickets")?;
//! db.apply(
//!     ChangeSet::new()
//!         .upsert("tickets", "t1", row_data([("title", "a".into()), ("status", "pending".into()), ("updated_at", 1.into())]), false)
//!         .upsert("tickets", "t2", row_data([("title", "b".into()), ("status", "done".into()), ("updated_at", 2.into())]), false),
//! )?;
//!
//! let q = Query::from("tickets")
//!     .filter(col("status").eq("pending"))
//!     .select_cols(["id", "title"])
//!     .order_by(col("updated_at"), Order::Desc)
//!     .limit(50);
//! let (sub, mut result) = db.subscribe(&q)?;
//! assert_eq!(result.rows_as::<Ticket>()?, vec![Ticket { id: "t1".into(), title: "a".into() }]);
//!
//! // One transaction, one diff per affected live query.
//! let diffs = db.apply(ChangeSet::new().upsert(
//!     "tickets",
//!     "t2",
//!     row_data([("title", "b".into()), ("status", "pending".into()), ("updated_at", 3.into())]),
//!     true, // pending local write
//! ))?;
//! assert_eq!(diffs.len(), 1);
//! assert_eq!(diffs[0].subscription, sub);
//! assert_eq!(diffs[0].added[0].index, 0);
//! result.apply_diff(&diffs[0]);
//! assert_eq!(result, db.query(&q)?);
//! assert!(result.rows[0].pending);
//! assert_eq!(result.rows[0].get("title"), &Value::from("b"));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Invariants
//!
//! - Pure: no I/O, no clock reads, no threads, no global state. Callbacks
//!   run inside [`QueryEngine::apply`] on the caller's thread.
//! - Work per change is proportional to the change, not to the collection:
//!   each live query compiles to operators with their own indexes (hash
//!   indexes per join side, running aggregates with ordered multisets for
//!   min/max, multiplicities for distinct, an ordered rank index for order
//!   by/limit/offset); a transaction flows through them as weighted changes
//!   (+1 insert, -1 delete, an update is -old +new) and yields at most one
//!   [`Diff`] per live query, holding only rows that entered, left or
//!   changed within the result window.
//! - [`QueryEngine::query`] is a separate, from-scratch evaluator (nested
//!   loops, full sort) and the reference the live results are tested
//!   against.
//! - Results are deterministic: ties in `order_by` are broken by row
//!   identity (see [`Query`]).
//! - Apply is all-or-nothing: a change set naming an unknown collection or
//!   exceeding an [`EngineLimits`] bound changes nothing.

mod engine;
mod error;
mod explain;
mod expr;
mod ops;
mod plan;
mod query;
mod reference;
mod result;
mod rows;
mod source;

pub use engine::{DiffCallback, EngineLimits, QueryEngine};
pub use error::QueryError;
pub use explain::{Access, Explain, IndexScan, Operator, SourcePlan, WINDOW_MARGIN_ROWS};
pub use expr::{
    avg, coalesce, col, concat, count, count_of, length, lit, lower, max, min, not, sum, upper, AggFn, ArithOp, CmpOp,
    Expr, Func,
};
pub use query::{JoinKind, Order, Query};
pub use result::{Added, Diff, QueryResult, Removed, ResultRow, SubscriptionId, Updated};
pub use source::{Change, ChangeSet, RowRef};
