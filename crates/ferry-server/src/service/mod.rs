//! The sync service: uploads (write processing), checkpoints, streams and
//! compaction over a [`SourceDb`] and [`SyncRules`]. By job:
//! - `builder`: [`ServiceOptions`] and [`SyncServiceBuilder`] (checked
//!   options, migration, strategies, the clock's start);
//! - `write`: uploads, each client transaction in one write transaction
//!   (replays, seq checks, permissions, conflict strategies, side writes,
//!   op log and bucket state);
//! - `import`: the server's own bulk loading, in bounded batches, rows
//!   Ferry knows nothing of written in bulk;
//! - `stream`: download streams (checkpoints, diffs, `data` lines within
//!   the stream's byte budget, keepalives), woken by the database's commit
//!   notifications;
//! - `capture`: changes made directly in the database turned into ops
//!   (one server at a time);
//! - `feed`: the shared change feed (one read per commit for every
//!   stream of this server);
//! - `housekeeping`: compaction on a schedule (one server at a time);
//! - `rebucket`: bucket membership of existing rows computed again when
//!   the rules changed or the rows predate Ferry (in the background);
//! - here: the service itself, checkpoints, compaction and the
//!   [`SyncHandler`] glue.

mod bucket_adds;
mod builder;
mod capture;
mod feed;
mod housekeeping;
mod import;
mod rebucket;
mod stream;
pub use stream::STREAM_CATCH_UP_MS;
mod write;

pub use builder::{ServiceOptions, SyncServiceBuilder};
pub use capture::{CAPTURE_LEAD_RETRY_MS, CAPTURE_POLL_MS, MAX_CAPTURE_BATCH, MAX_TRUNCATE_ROWS_PER_TX};
pub use feed::{
    FEED_CHANNEL_EVENTS, FEED_MAX_BUCKETS_WITH_ENTRIES, FEED_MAX_CARRIED_BYTES, FEED_MAX_ENTRIES_PER_BUCKET,
    FEED_POLL_MS,
};
pub use housekeeping::DEFAULT_COMPACT_INTERVAL_S;
pub use import::MAX_IMPORT_BATCH_OPS;
pub use rebucket::{MAX_REBUCKET_BATCH, META_RULES_FINGERPRINT};

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use ferry_core::{
    row_size_bytes, Clock, CrudEntry, CrudOp, HlcTimestamp, HybridClock, Limits, RowData, SystemClock, Table, Value,
};
use ferry_protocol::{
    Checkpoint, CheckpointDiff, DataLineWriter, OpKind, OpOutcome, Outcome, ServerError, StreamLine, StreamRequest,
    UploadRequest, UploadResponse,
};
use ferry_transport::{blocking, ServerLine, ServerLineStream, ServerLines, SyncHandler};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch, Semaphore};

use crate::auth::{AuthUser, Authenticator};
use crate::conflict::{ConflictInput, ConflictStrategy, LastWriteWins, Resolution, SideWrite};
use crate::db::{BucketState, CheckpointState, NewOp, OpRange, SourceDb, SourceTx, StoredRow};
use crate::error::{Result, ServiceError};
use crate::metrics::Metrics;
use crate::permissions::{self, TablePermissions, WriteOp, WriteRequest, Writer};
use crate::rules::SyncRules;
use crate::stream_out::{LineBytes, Stop, StreamSender};

/// Compaction result for one bucket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CompactStats {
    /// Entries before.
    pub entries_before: usize,
    /// Entries after.
    pub entries_after: usize,
}

struct Inner {
    db: Arc<dyn SourceDb>,
    rules: SyncRules,
    auth: Authenticator,
    clock: Arc<dyn Clock>,
    hlc: HybridClock<Arc<dyn Clock>>,
    options: ServiceOptions,
    strategies: BTreeMap<String, Arc<dyn ConflictStrategy>>,
    default_strategy: Arc<dyn ConflictStrategy>,
    shutdown: watch::Sender<bool>,
    streams: Arc<Semaphore>,
    /// The bytes each user's streams hold unread, within
    /// `ServiceOptions::max_stream_buffer_bytes_per_user`.
    stream_buffers: crate::stream_out::UserBuffers,
    /// Uploads of one client id run one at a time; each client id has
    /// its own lock, so one client's long upload never waits another's.
    upload_locks: parking_lot::Mutex<HashMap<String, Arc<parking_lot::Mutex<()>>>>,
    metrics: Arc<Metrics>,
    /// The shared change feed of this server's streams.
    feed: feed::Feed,
}

/// Client locks kept before the unused ones are dropped.
const MAX_IDLE_UPLOAD_LOCKS: usize = 10_000;

/// The sync service. Cheap to clone; implements [`SyncHandler`].
#[derive(Clone)]
pub struct SyncService {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for SyncService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncService")
            .field("db", &self.inner.db)
            .field("options", &self.inner.options)
            .finish_non_exhaustive()
    }
}

fn blocking_error(e: blocking::BlockingError) -> ServiceError {
    ServiceError::Database(e.to_string())
}

impl SyncService {
    /// The source database.
    pub fn db(&self) -> &Arc<dyn SourceDb> {
        &self.inner.db
    }

    /// The sync rules.
    pub fn rules(&self) -> &SyncRules {
        &self.inner.rules
    }

    /// The options it was built with.
    pub fn options(&self) -> &ServiceOptions {
        &self.inner.options
    }

    /// Verify a bearer token with the keys at hand (no JWKS fetch; an
    /// HS256 secret and static keys are always at hand).
    pub fn authenticate(&self, token: &str) -> Result<AuthUser> {
        self.inner.auth.verify(token, self.inner.clock.as_ref())
    }

    /// Verify a bearer token, first fetching the JWKS when the token
    /// names an unknown key id (rate-bounded) or the keys are old.
    pub async fn authenticate_async(&self, token: &str) -> Result<AuthUser> {
        self.inner.auth.verify_async(token, self.inner.clock.as_ref()).await
    }

    /// The service's metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// The metrics in the Prometheus text exposition format, with the op
    /// log size and the newest op id read now (`GET /metrics`).
    pub async fn render_metrics(&self) -> Result<String> {
        let db = self.inner.db.clone();
        let (last_op_id, oplog) = blocking::run(move || {
            let last = db.checkpoint("", &[])?.last_op_id;
            Ok::<_, ServiceError>((last, db.oplog_len()?))
        })
        .await
        .map_err(blocking_error)??;
        self.inner
            .metrics
            .render(last_op_id, oplog, self.inner.stream_buffers.total_bytes())
    }

    /// Bytes of lines the open streams hold that their clients have not
    /// read (each user's within
    /// [`ServiceOptions::max_stream_buffer_bytes_per_user`]; also the
    /// `ferry_stream_buffered_bytes` metric).
    pub fn stream_buffered_bytes(&self) -> usize {
        self.inner.stream_buffers.total_bytes()
    }

    /// Ask every stream to end (with a `shutting_down` error line).
    pub fn shutdown(&self) {
        self.inner.shutdown.send_replace(true);
    }

    /// The checkpoint a client of `user` would get now (`unauthorized`
    /// for a client id of another user).
    pub async fn checkpoint(&self, user: &AuthUser, client_id: &str) -> Result<Checkpoint> {
        let buckets = self
            .inner
            .rules
            .user_buckets(&user.claims, self.inner.options.max_buckets_per_user)?;
        let inner = self.inner.clone();
        let (client_id, user_id) = (client_id.to_owned(), user.user_id.clone());
        let cp = blocking::run(move || {
            inner.check_client_owner(&client_id, &user_id)?;
            Ok::<_, ServiceError>(inner.db.checkpoint(&client_id, &buckets)?)
        })
        .await
        .map_err(blocking_error)??;
        Ok(Checkpoint {
            // Taken after the checkpoint was read: at least every clock
            // of the data it covers.
            hlc: Some(self.inner.hlc.now()),
            last_op_id: cp.last_op_id,
            write_checkpoint: cp.write_checkpoint,
            buckets: cp.buckets,
        })
    }

    /// Compact one bucket's log in one transaction (its checksum is kept).
    pub async fn compact(&self, bucket: &str) -> Result<CompactStats> {
        let db = self.inner.db.clone();
        let bucket = bucket.to_owned();
        let stats = blocking::run(move || compact_bucket(db.as_ref(), &bucket))
            .await
            .map_err(blocking_error)??;
        self.inner
            .metrics
            .compacted(stats.entries_before.saturating_sub(stats.entries_after));
        Ok(stats)
    }

    /// Compact every bucket. Returns the number of buckets compacted.
    pub async fn compact_all(&self) -> Result<usize> {
        let db = self.inner.db.clone();
        let names = blocking::run(move || db.bucket_names())
            .await
            .map_err(blocking_error)??;
        for name in &names {
            self.compact(name).await?;
        }
        Ok(names.len())
    }
}

fn compact_bucket(db: &dyn SourceDb, bucket: &str) -> Result<CompactStats> {
    let mut stats = CompactStats {
        entries_before: 0,
        entries_after: 0,
    };
    crate::db::write(db, |tx| {
        let entries = tx.bucket_ops(bucket)?;
        let compacted = ferry_protocol::compact(&entries);
        stats = CompactStats {
            entries_before: entries.len(),
            entries_after: compacted.len(),
        };
        if compacted != entries {
            tx.replace_bucket_ops(bucket, &compacted)?;
            // The checksum is kept: compaction sums what it folds.
            let state = tx.bucket_state(bucket)?.unwrap_or_default();
            let count = compacted.len() as u64;
            tx.set_bucket_state(bucket, &BucketState { count, ..state })?;
        }
        Ok(())
    })?;
    Ok(stats)
}

fn client_of_another_user(client_id: &str) -> ServiceError {
    ServiceError::Unauthorized(format!("client id {client_id:?} belongs to another user"))
}

fn check_client_id(client_id: &str, max: usize) -> Result<()> {
    if client_id.is_empty() {
        return Err(ServiceError::BadRequest("empty client id".into()));
    }
    if client_id.len() > max {
        return Err(ServiceError::BadRequest(format!(
            "client id of {} bytes exceeds the limit of {max} bytes",
            client_id.len()
        )));
    }
    // Like a row id: PostgreSQL cannot store one, so no backend takes it.
    if client_id.contains('\0') {
        return Err(ServiceError::BadRequest(format!(
            "client id {client_id:?} contains a NUL byte"
        )));
    }
    Ok(())
}

/// FNV-1a 64 over bytes written to it (op fingerprints).
struct Fnv64(u64);

impl Fnv64 {
    fn new() -> Self {
        Fnv64(0xcbf2_9ce4_8422_2325)
    }
}

impl std::io::Write for Fnv64 {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        for b in buf {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Counts the bytes written to it (encoded sizes without buffering).
struct ByteCount(usize);

impl std::io::Write for ByteCount {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 = self.0.saturating_add(buf.len());
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The length of `value`'s JSON encoding, as stored and sent
/// (`usize::MAX` if it cannot be encoded, so it counts as too large).
pub(crate) fn encoded_bytes<T: Serialize + ?Sized>(value: &T) -> usize {
    let mut n = ByteCount(0);
    match serde_json::to_writer(&mut n, value) {
        Ok(()) => n.0,
        Err(_) => usize::MAX,
    }
}

/// The user's bucket instances, for hiding rows they cannot read (none
/// when their claims expand past the limit: nothing is shown).
type Viewer = BTreeSet<String>;

impl Inner {
    /// The lock serializing uploads of `client_id`, so the
    /// replay checks made before writing still hold while writing.
    fn client_lock(&self, client_id: &str) -> Arc<parking_lot::Mutex<()>> {
        let mut locks = self.upload_locks.lock();
        if locks.len() >= MAX_IDLE_UPLOAD_LOCKS {
            // Only the map holds an idle client's lock.
            locks.retain(|_, l| Arc::strong_count(l) > 1);
        }
        locks.entry(client_id.to_owned()).or_default().clone()
    }

    /// Refuse a client id first used by another user.
    fn check_client_owner(&self, client_id: &str, user_id: &str) -> Result<()> {
        match self.db.client_owner(client_id)? {
            Some(owner) if owner != user_id => Err(client_of_another_user(client_id)),
            _ => Ok(()),
        }
    }

    fn viewer(&self, user: &AuthUser) -> Viewer {
        self.rules
            .user_buckets(&user.claims, self.options.max_buckets_per_user)
            .map(|b| b.into_iter().collect())
            .unwrap_or_default()
    }

    /// Whether a user with `viewer`'s buckets can read this row.
    fn readable(&self, viewer: &Viewer, table: &str, id: &str, row: &RowData) -> bool {
        self.rules
            .row_buckets(table, id, row)
            .iter()
            .any(|b| viewer.contains(b))
    }
}

impl SyncService {
    /// Count an error the service answers, and pass it on.
    pub(crate) fn counted<T>(&self, r: Result<T>) -> Result<T> {
        if let Err(e) = &r {
            self.inner.metrics.error(e);
        }
        r
    }
}

#[async_trait]
impl SyncHandler for SyncService {
    async fn stream(&self, token: &str, request: StreamRequest) -> Result<ServerLines, ServerError> {
        let user = self.counted(self.authenticate_async(token).await)?;
        Ok(self.counted(self.open_stream(user, request))?)
    }

    async fn stream_lines(&self, token: &str, request: StreamRequest) -> Result<ServerLineStream, ServerError> {
        let user = self.counted(self.authenticate_async(token).await)?;
        Ok(self.counted(self.open_stream_lines(user, request))?)
    }

    async fn upload(&self, token: &str, request: UploadRequest) -> Result<UploadResponse, ServerError> {
        let user = self.counted(self.authenticate_async(token).await)?;
        Ok(self.counted(SyncService::upload(self, &user, request).await)?)
    }
}
