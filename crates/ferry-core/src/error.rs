//! Errors of the data model.

use thiserror::Error;

/// Whether retrying the failed call can help. Every error enum in Ferry
/// exposes one through a `kind()` method.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The same call may succeed later (I/O hiccup, lock contention, a full
    /// queue that is being drained, a network failure).
    Transient,
    /// The call will fail the same way until its input changes (bad input,
    /// schema violation, corrupt data).
    Permanent,
}

impl ErrorKind {
    /// Whether a retry can help.
    pub fn is_retryable(self) -> bool {
        self == ErrorKind::Transient
    }
}

/// Errors raised by the data model: schema checks, encoding, clocks.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum CoreError {
    /// The table is not in the schema.
    #[error("unknown table {table:?}")]
    UnknownTable {
        /// The table name given.
        table: String,
    },
    /// The column is not in the table.
    #[error("unknown column {column:?} in table {table:?}")]
    UnknownColumn {
        /// The table.
        table: String,
        /// The column name given.
        column: String,
    },
    /// The value does not have the column's type.
    #[error("column {table}.{column} is {expected}, got {actual} value {value}")]
    WrongType {
        /// The table.
        table: String,
        /// The column.
        column: String,
        /// The declared type.
        expected: &'static str,
        /// The type of the value given.
        actual: &'static str,
        /// The value given, rendered as SQL (truncated).
        value: String,
    },
    /// The row id is empty or too long.
    #[error("invalid row id {id:?} for table {table:?}: {reason}")]
    InvalidId {
        /// The table.
        table: String,
        /// The id given (truncated).
        id: String,
        /// Why it is refused.
        reason: &'static str,
    },
    /// The row is larger than the configured limit.
    #[error("row {table}/{id} is {size_bytes} bytes, over the limit of {limit_bytes} bytes")]
    RowTooLarge {
        /// The table.
        table: String,
        /// The row id.
        id: String,
        /// The row's size.
        size_bytes: usize,
        /// The limit.
        limit_bytes: usize,
    },
    /// The schema itself is invalid.
    #[error("invalid schema: {0}")]
    InvalidSchema(String),
    /// Stored bytes could not be decoded.
    #[error("corrupt encoding: {0}")]
    Corrupt(String),
    /// A remote clock is further ahead than the accepted skew.
    #[error("clock skew of {skew_ms} ms exceeds the limit of {max_skew_ms} ms")]
    ClockSkew {
        /// How far ahead the remote time is.
        skew_ms: u64,
        /// The accepted bound.
        max_skew_ms: u64,
    },
    /// A hybrid logical clock string could not be parsed.
    #[error("invalid hlc timestamp {0:?}")]
    InvalidHlc(String),
}

impl CoreError {
    /// Whether a retry can help. Data model errors never do: the input has
    /// to change.
    pub fn kind(&self) -> ErrorKind {
        ErrorKind::Permanent
    }
}

/// Shorten a rendered value for an error message.
pub(crate) fn truncate_for_message(s: String) -> String {
    const MAX_CHARS: usize = 64;
    if s.chars().count() <= MAX_CHARS {
        s
    } else {
        let mut t: String = s.chars().take(MAX_CHARS).collect();
        t.push('…');
        t
    }
}
