//! Errors raised by the query engine.

use ferry_core::ErrorKind;
use thiserror::Error;

/// What went wrong in a query, a change set or a subscription call.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum QueryError {
    /// The collection was never created.
    #[error("unknown collection {collection:?}")]
    UnknownCollection {
        /// The name given.
        collection: String,
    },
    /// A collection with this name already exists.
    #[error("collection {collection:?} already exists")]
    CollectionExists {
        /// The name given.
        collection: String,
    },
    /// A column (or `alias.column`) that the query cannot resolve.
    #[error("unknown column {column:?}")]
    UnknownColumn {
        /// The reference as written.
        column: String,
    },
    /// Two sources of one query share an alias.
    #[error("duplicate alias {alias:?}")]
    DuplicateAlias {
        /// The alias.
        alias: String,
    },
    /// A column used in a grouped query outside an aggregate that is not a
    /// `group_by` expression.
    #[error("column {column:?} must appear in group_by or inside an aggregate")]
    NotGrouped {
        /// The reference as written.
        column: String,
    },
    /// An aggregate used where none is allowed (where, join, group_by,
    /// inside another aggregate).
    #[error("aggregate not allowed in {context}")]
    AggregateNotAllowed {
        /// Where it was found.
        context: &'static str,
    },
    /// A query that is malformed in some other way.
    #[error("invalid query: {reason}")]
    InvalidQuery {
        /// What is wrong.
        reason: String,
    },
    /// The subscription id is not (or no longer) live.
    #[error("unknown subscription {id}")]
    UnknownSubscription {
        /// The id given.
        id: u64,
    },
    /// A configured limit would be exceeded.
    #[error("limit {limit_name} of {limit} exceeded: {actual}")]
    LimitExceeded {
        /// The limit's name (with its unit).
        limit_name: &'static str,
        /// The configured limit.
        limit: usize,
        /// The value that was asked for.
        actual: usize,
    },
    /// A result row could not be deserialized into the requested type.
    #[error("cannot deserialize result row: {message}")]
    Deserialize {
        /// The serde error.
        message: String,
    },
}

impl QueryError {
    /// Whether retrying can help: every query error is permanent, the same
    /// call fails the same way until its input changes.
    pub fn kind(&self) -> ErrorKind {
        ErrorKind::Permanent
    }
}
