//! Protocol errors.

use ferry_core::ErrorKind;
use thiserror::Error;

use crate::messages::ServerError;

/// Errors of the sync protocol.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum ProtocolError {
    /// A line or document is not valid JSON of the expected shape.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// A line is longer than the limit.
    #[error("line of {len} bytes exceeds the limit of {limit} bytes")]
    LineTooLong {
        /// The line's length.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// A message arrived where the protocol does not allow it.
    #[error("unexpected message: {0}")]
    Unexpected(&'static str),
    /// Data for a bucket the current checkpoint does not name.
    #[error("data for unknown bucket {0:?}")]
    UnknownBucket(String),
    /// An op log entry is malformed.
    #[error("bad op {op_id}: {reason}")]
    BadOp {
        /// The op id.
        op_id: u64,
        /// What is wrong.
        reason: &'static str,
    },
    /// `checkpoint_complete` for another checkpoint than the current one.
    #[error("checkpoint_complete for op {got}, expected {expected}")]
    CheckpointMismatch {
        /// The current checkpoint's last op id.
        expected: u64,
        /// The one completed.
        got: u64,
    },
    /// Too many ops staged.
    #[error("more than {limit} ops staged for one checkpoint")]
    TooManyStaged {
        /// The limit.
        limit: usize,
    },
    /// Too many buckets in one checkpoint.
    #[error("checkpoint names {count} buckets, over the limit of {limit}")]
    TooManyBuckets {
        /// Buckets named.
        count: usize,
        /// The limit.
        limit: usize,
    },
    /// The server reported an error.
    #[error("server error ({:?}): {}", .0.code, .0.message)]
    Server(ServerError),
}

impl ProtocolError {
    /// Whether reconnecting (after backoff) can help.
    pub fn kind(&self) -> ErrorKind {
        match self {
            ProtocolError::Server(e) if e.code.is_retryable() => ErrorKind::Transient,
            // A malformed or out-of-order stream is the server's or the
            // network's fault: a fresh stream may be fine.
            ProtocolError::Malformed(_)
            | ProtocolError::Unexpected(_)
            | ProtocolError::UnknownBucket(_)
            | ProtocolError::CheckpointMismatch { .. } => ErrorKind::Transient,
            _ => ErrorKind::Permanent,
        }
    }
}
