//! Wire messages. The download stream is one JSON object per line; every
//! other message is one JSON document. `docs/protocol.md` specifies them.

use ferry_core::{CrudEntry, HlcTimestamp, RowData};
use serde::{Deserialize, Serialize};

/// Where a client stands in one bucket when it opens a stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketRequest {
    /// The bucket name.
    pub name: String,
    /// The last op id the client holds for it (0: none).
    pub after_op_id: u64,
}

/// Opens a download stream (sent with a bearer token).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamRequest {
    /// The client's id (stable per device database).
    pub client_id: String,
    /// Resume positions of the buckets the client holds.
    #[serde(default)]
    pub buckets: Vec<BucketRequest>,
}

/// A bucket's checksum and op count at a checkpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketChecksum {
    /// The bucket name.
    pub bucket: String,
    /// Wrapping sum of the checksums of its ops through the checkpoint.
    pub checksum: u32,
    /// Number of ops in the bucket through the checkpoint.
    pub count: u64,
}

/// A consistent point of the server's op log for one client.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Every op with id up to this belongs to the checkpoint.
    pub last_op_id: u64,
    /// The highest seq of this client whose effect is included, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_checkpoint: Option<u64>,
    /// Every bucket the client gets, with its checksum.
    pub buckets: Vec<BucketChecksum>,
    /// The server's hybrid logical clock when it built this message: at
    /// least every clock of the data it covers. A client moves its own
    /// clock past it, so an edit made after seeing a value orders after
    /// that value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hlc: Option<HlcTimestamp>,
}

/// A checkpoint expressed as a change of the previous one on the stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointDiff {
    /// The new checkpoint's last op id.
    pub last_op_id: u64,
    /// The new write checkpoint, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_checkpoint: Option<u64>,
    /// Buckets added or changed.
    #[serde(default)]
    pub updated_buckets: Vec<BucketChecksum>,
    /// Buckets the client no longer gets.
    #[serde(default)]
    pub removed_buckets: Vec<String>,
    /// The server's hybrid logical clock when it built this message: at
    /// least every clock of the data it covers. A client moves its own
    /// clock past it, so an edit made after seeing a value orders after
    /// that value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hlc: Option<HlcTimestamp>,
}

/// What an op log entry does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum OpKind {
    /// The row is created or replaced with `data`.
    Put,
    /// The row leaves the bucket.
    Remove,
    /// A compacted entry: keeps its checksum, no effect on rows.
    Move,
    /// A compacted leading run: the bucket starts over from here; the
    /// checksum is the sum of the entries it replaced.
    Clear,
}

impl OpKind {
    /// The name on the wire and in stored logs (`PUT`, `REMOVE`, `MOVE`,
    /// `CLEAR`).
    pub fn as_str(self) -> &'static str {
        match self {
            OpKind::Put => "PUT",
            OpKind::Remove => "REMOVE",
            OpKind::Move => "MOVE",
            OpKind::Clear => "CLEAR",
        }
    }

    /// The kind named `s` ([`OpKind::as_str`]), `None` for another name.
    pub fn from_name(s: &str) -> Option<Self> {
        match s {
            "PUT" => Some(OpKind::Put),
            "REMOVE" => Some(OpKind::Remove),
            "MOVE" => Some(OpKind::Move),
            "CLEAR" => Some(OpKind::Clear),
            _ => None,
        }
    }
}

/// One entry of a bucket's op log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OplogEntry {
    /// Global, monotonic op id.
    pub op_id: u64,
    /// What it does.
    pub op: OpKind,
    /// The table of the row (PUT and REMOVE).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object_type: Option<String>,
    /// The row id (PUT and REMOVE).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object_id: Option<String>,
    /// The row's values (PUT).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<RowData>,
    /// The entry's checksum.
    pub checksum: u32,
}

/// A batch of op log entries of one bucket, in op id order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DataBatch {
    /// The bucket.
    pub bucket: String,
    /// Its entries after the client's position, ascending.
    pub ops: Vec<OplogEntry>,
}

/// Error codes the server sends on the stream or in answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The token is missing, malformed, badly signed or expired.
    Unauthorized,
    /// The request is malformed.
    BadRequest,
    /// A limit was exceeded.
    TooLarge,
    /// The server failed; retrying may help.
    Internal,
    /// The server is shutting down; reconnect elsewhere or later.
    ShuttingDown,
    /// The server is at a capacity limit (streams, connections) or a
    /// resource it needs is unavailable; retry later (HTTP: 503 with
    /// `Retry-After`).
    Busy,
    /// This user sent more than a per-user limit allows (streams open at
    /// once, uploads per second); retry later (HTTP: 429 with
    /// `Retry-After`).
    RateLimited,
}

impl ErrorCode {
    /// Whether the client should retry (after backoff) with the same
    /// credentials.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorCode::Internal | ErrorCode::ShuttingDown | ErrorCode::Busy | ErrorCode::RateLimited
        )
    }
}

/// An error reported by the server.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerError {
    /// What kind of error.
    pub code: ErrorCode,
    /// A lowercase message naming the bad value.
    pub message: String,
}

/// One line of the download stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamLine {
    /// A new checkpoint to download toward.
    Checkpoint(Checkpoint),
    /// A new checkpoint as a change of the previous one.
    CheckpointDiff(CheckpointDiff),
    /// Op log entries of one bucket.
    Data(DataBatch),
    /// Every entry of the current checkpoint has been sent.
    CheckpointComplete {
        /// The checkpoint's last op id.
        last_op_id: u64,
    },
    /// The stream is alive; the token expires in this many seconds.
    Keepalive {
        /// Seconds until the bearer token expires.
        token_expires_in_s: u64,
    },
    /// The server ends the stream with an error.
    Error(ServerError),
}

/// One local transaction in an upload.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UploadTransaction {
    /// The local transaction id.
    pub tx_id: u64,
    /// Its ops, in seq order.
    pub ops: Vec<CrudEntry>,
}

/// A batch of client transactions, sent with a bearer token.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UploadRequest {
    /// The client's id.
    pub client_id: String,
    /// Transactions in order.
    pub transactions: Vec<UploadTransaction>,
}

/// What the server did with one uploaded op.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// Applied as sent.
    Applied,
    /// Applied after a conflict strategy changed it; `row` is the result
    /// (absent when the row ended deleted).
    Merged {
        /// The row as stored.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        row: Option<RowData>,
        /// Why it was changed.
        reason: String,
    },
    /// Not applied.
    Rejected {
        /// Why, naming the bad value.
        reason: String,
    },
    /// Recorded as a conflict for a person to resolve.
    NeedsReview {
        /// The conflict row's id.
        conflict_id: String,
    },
}

/// The outcome of one op, by its seq.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OpOutcome {
    /// The op's client seq.
    pub seq: u64,
    /// What happened.
    #[serde(flatten)]
    pub outcome: Outcome,
}

/// The answer to an upload.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UploadResponse {
    /// One outcome per uploaded op, in order (ops already processed before
    /// get their original outcome again).
    pub outcomes: Vec<OpOutcome>,
    /// The highest seq of this client the server has processed.
    pub write_checkpoint: u64,
    /// The server's hybrid logical clock when it built this message: at
    /// least every clock of the data it covers. A client moves its own
    /// clock past it, so an edit made after seeing a value orders after
    /// that value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hlc: Option<HlcTimestamp>,
}
