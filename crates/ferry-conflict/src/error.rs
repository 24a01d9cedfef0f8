//! Errors of the conflict crate.

use ferry_core::ErrorKind;
use thiserror::Error;

/// Errors from the CRDT helpers and strategy configuration.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum ConflictError {
    /// Bytes that are not an automerge document (or changes).
    #[error("invalid automerge document: {0}")]
    InvalidDocument(String),
    /// The document has no text object under the fixed key.
    #[error("automerge document has no text under key {key:?}")]
    NoText {
        /// The key looked up.
        key: &'static str,
    },
    /// A text edit failed (position out of range, ...).
    #[error("text edit failed: {0}")]
    Edit(String),
    /// A strategy configuration is invalid.
    #[error("invalid strategy config for table {table:?}: {reason}")]
    Config {
        /// The table configured.
        table: String,
        /// Why it is refused.
        reason: String,
    },
}

impl ConflictError {
    /// Whether a retry can help: never, the input has to change.
    pub fn kind(&self) -> ErrorKind {
        ErrorKind::Permanent
    }
}

/// Results of this crate.
pub type Result<T, E = ConflictError> = std::result::Result<T, E>;
