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
    /// A real value that is NaN or infinite: JSON has no such number, so
    /// it would reach the server and every device as NULL.
    #[error("column {table}.{column} takes finite numbers only, got {value}")]
    NonFinite {
        /// The table.
        table: String,
        /// The column.
        column: String,
        /// The value given (`NaN`, `inf`, `-inf`).
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

/// Most causes of an error named by [`error_chain`].
pub const MAX_ERROR_CAUSES: usize = 8;

/// An error's message followed by its causes' (at most
/// [`MAX_ERROR_CAUSES`]), `": "` between them; a cause whose message the
/// text already ends with is left out (many errors repeat their source's).
/// Drivers' own messages often leave the cause out ("error performing TLS
/// handshake", "error sending request"), not why.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    for _ in 0..MAX_ERROR_CAUSES {
        let Some(c) = cause else { break };
        let m = c.to_string();
        if !s.ends_with(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cause = c.source();
    }
    s
}

#[cfg(test)]
mod chain_tests {
    use super::error_chain;

    #[derive(Debug)]
    struct Link(&'static str, Option<Box<Link>>);

    impl std::fmt::Display for Link {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Link {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|l| l as &(dyn std::error::Error + 'static))
        }
    }

    #[test]
    fn names_the_causes_once_and_at_most_the_limit() {
        let e = Link(
            "connect failed",
            Some(Box::new(Link("tls", Some(Box::new(Link("tls", None)))))),
        );
        assert_eq!(error_chain(&e), "connect failed: tls");
        let mut deep = Link("end", None);
        for _ in 0..20 {
            deep = Link("x", Some(Box::new(Link("y", Some(Box::new(deep))))));
        }
        let text = error_chain(&deep);
        assert_eq!(text.matches(": ").count(), super::MAX_ERROR_CAUSES, "{text}");
    }
}
