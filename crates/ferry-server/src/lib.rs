//! Ferry's sync service: the source of truth behind a [`SourceDb`]
//! (SQLite by default), sync rules that place rows in buckets, write
//! processing with pluggable conflict strategies, checkpoints and the
//! download stream, compaction, JWT auth, and the `ferry-server` binary.
//!
//! Invariants:
//! - write processing, conflict resolution, op log append, bucket state,
//!   per-op outcomes and the client's write checkpoint commit in one
//!   database transaction per client transaction, which applies whole or
//!   not at all (`docs/adr/0005-transactions-all-or-nothing.md`);
//! - uploads are exactly-once in effect: an op with `(client_id, seq)` at
//!   or below the client's write checkpoint gets its stored outcome again
//!   and changes nothing, and only when its content matches the recorded
//!   one; otherwise the request is refused whole;
//! - a client id belongs to the first user that uploaded with it; nobody
//!   else streams, uploads or reads a checkpoint with it;
//! - the server's hybrid logical clock is at least every clock it stored,
//!   also across restarts;
//! - a client write is applied only when the table's write permissions
//!   allow it (`[[permissions]]`; none: refused), checked on the stored
//!   row and the row the op would leave, inside the write transaction and
//!   before any conflict strategy; imports and strategies' side writes
//!   are the server's own and not checked
//!   (`docs/adr/0007-write-permissions.md`);
//! - rows are assigned to buckets when written, from their new values,
//!   never by querying at connect time; op ids are global and monotonic;
//! - a bucket's checksum is the wrapping sum of its entries' checksums,
//!   maintained in the append's transaction and unchanged by compaction;
//! - a checkpoint (last op id, bucket checksums, write checkpoint) is read
//!   in one read transaction, so it is consistent;
//! - every stream, line, upload and bucket list is bounded by a limit of
//!   [`ServiceOptions`].

pub mod admin;
pub mod auth;
pub mod config;
pub mod conflict;
pub mod db;
pub mod error;
pub mod inspect;
pub mod metrics;
pub mod permissions;
pub mod rules;
pub mod server;
pub mod service;
pub mod sqlite;
mod stream_out;

pub use admin::AdminOptions;
pub use auth::{mint_token, mint_token_at, AuthOptions, AuthUser, Authenticator, StaticKey, MAX_USER_ID_BYTES};
pub use config::{PostgresConfig, ServerConfig, DEV_JWT_SECRET};
pub use conflict::{
    Audited, ConflictInput, ConflictStrategy, Crdt, CurrentRow, Decision, DomainRules, LastWriteWins, Manual,
    PerColumn, Resolution, RowLastWriteWins, Rule, SideWrite,
};
pub use db::{
    BucketState, CaptureKind, CapturedChange, ChangesSince, CheckpointState, ClientProgress, CommitReceiver, Lease,
    NewOp, OpRange, RowClocks, RowWrite, SourceDb, SourceError, SourceTx, StoredOutcome, StoredRow, VanishedRows,
};
pub use error::{Result, ServiceError};
pub use permissions::{PermissionDef, WriteOp, MAX_CONDITION_BYTES, MAX_CONDITION_DEPTH_LEVELS};
pub use rules::{AddColumns, RulesFile, SyncRules, MAX_EXTENDS_DEPTH, RESERVED_TABLE_PREFIX, TICKET_TRACKER_RULES};
pub use server::{run, BoundServer};
pub use service::{
    CompactStats, ServiceOptions, SyncService, SyncServiceBuilder, CAPTURE_LEAD_RETRY_MS, CAPTURE_POLL_MS,
    DEFAULT_COMPACT_INTERVAL_S, FEED_CHANNEL_EVENTS, FEED_MAX_BUCKETS_WITH_ENTRIES, FEED_MAX_CARRIED_BYTES,
    FEED_MAX_ENTRIES_PER_BUCKET, FEED_POLL_MS, MAX_CAPTURE_BATCH, MAX_IMPORT_BATCH_OPS, MAX_REBUCKET_BATCH,
    MAX_TRUNCATE_ROWS_PER_TX, META_RULES_FINGERPRINT, STREAM_CATCH_UP_MS,
};
pub use sqlite::SqliteSourceDb;
