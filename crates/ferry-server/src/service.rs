//! The sync service: uploads (write processing), checkpoints, streams and
//! compaction over a [`SourceDb`] and [`SyncRules`].

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
use crate::permissions::{self, WriteOp, WriteRequest, Writer};
use crate::rules::SyncRules;
use crate::stream_out::{LineBytes, Stop, StreamSender};

/// Tunables of the service. Every limit has its unit in its name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ServiceOptions {
    /// Seconds between keepalive lines on an idle stream.
    pub keepalive_interval_s: u64,
    /// Most op log entries in one `data` line.
    pub max_ops_per_line: usize,
    /// Most bytes of one encoded `data` line, newline included (as a
    /// transport writes it): a line is cut before an entry that would pass
    /// it, and holds at least one entry. Must stay at or below the
    /// clients' line limit, `ferry_protocol::DEFAULT_MAX_LINE_BYTES`
    /// (clients refuse longer lines, so a bucket holding one would never
    /// sync); [`SyncServiceBuilder::build`] refuses more.
    pub max_line_bytes: usize,
    /// Most streams open at once; more are refused (retryable).
    pub max_concurrent_streams: usize,
    /// Lines buffered per stream before the server waits for the client.
    pub stream_buffer_lines: usize,
    /// Most bytes of lines one stream holds that its client has not read:
    /// lines read and waiting for the transport, plus one line (at most
    /// `max_line_bytes`) for the transport to write. A client that stops
    /// reading stops its stream's reads there. At least twice
    /// `max_line_bytes`; [`SyncServiceBuilder::build`] refuses less.
    pub max_stream_buffer_bytes: usize,
    /// How far ahead of server time a client HLC may be; later ones are
    /// clamped to server time + this. A clock up to this far ahead wins
    /// last-write-wins conflicts in that window
    /// (`docs/adr/0006-client-clocks.md`).
    pub max_clock_skew_ms: u64,
    /// Most ops in one upload request.
    pub max_upload_ops: usize,
    /// Most bucket instances one user gets.
    pub max_buckets_per_user: usize,
    /// Longest client id accepted.
    pub max_client_id_bytes: usize,
    /// Largest step of a client's seqs: an upload whose new seqs reach
    /// more than this above the client's last seq (above 0 for a new
    /// client) is refused whole.
    pub max_seq_gap: u64,
    /// Largest JSON encoding of a row as stored and sent (serde_json of
    /// its values; a control character takes 6 bytes). A write whose row,
    /// or a side write whose merged row, is larger is rejected. The
    /// default, 4 MiB, keeps a `data` line of one row far below the
    /// clients' 16 MiB line limit (`ferry_protocol::DEFAULT_MAX_LINE_BYTES`);
    /// the builder refuses more than half of it.
    pub max_row_encoded_bytes: usize,
    /// Largest upload answer (JSON). A larger one leaves out the rows of
    /// its `merged` outcomes, largest first, then shortens its reasons;
    /// every op keeps its outcome. The builder refuses more than the
    /// clients' 16 MiB limit.
    pub max_answer_bytes: usize,
    /// Row, id and transaction limits.
    pub limits: Limits,
}

impl Default for ServiceOptions {
    fn default() -> Self {
        ServiceOptions {
            keepalive_interval_s: 20,
            max_ops_per_line: 10_000,
            max_line_bytes: 8 * 1024 * 1024,
            max_concurrent_streams: 10_000,
            stream_buffer_lines: 8,
            max_stream_buffer_bytes: 16 * 1024 * 1024,
            max_clock_skew_ms: 5_000,
            max_upload_ops: 100_000,
            max_buckets_per_user: 1000,
            max_client_id_bytes: 256,
            max_seq_gap: 1_000_000,
            max_row_encoded_bytes: 4 * 1024 * 1024,
            max_answer_bytes: 8 * 1024 * 1024,
            limits: Limits::default(),
        }
    }
}

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
    /// Uploads of one client id run one at a time; each client id has
    /// its own lock, so one client's long upload never waits another's.
    upload_locks: parking_lot::Mutex<HashMap<String, Arc<parking_lot::Mutex<()>>>>,
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

/// Builds a [`SyncService`].
#[derive(Debug)]
pub struct SyncServiceBuilder {
    db: Arc<dyn SourceDb>,
    rules: SyncRules,
    jwt_secret: String,
    auth: Option<Authenticator>,
    options: ServiceOptions,
    clock: Arc<dyn Clock>,
    strategies: BTreeMap<String, Arc<dyn ConflictStrategy>>,
    default_strategy: Arc<dyn ConflictStrategy>,
}

impl SyncServiceBuilder {
    /// Set the options.
    pub fn options(mut self, options: ServiceOptions) -> Self {
        self.options = options;
        self
    }

    /// Verify tokens with `auth` (JWKS, static keys, claim checks)
    /// instead of the HS256 secret given to [`SyncService::builder`].
    pub fn authenticator(mut self, auth: Authenticator) -> Self {
        self.auth = Some(auth);
        self
    }

    /// Set the clock (default: system time).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Use `strategy` for writes to `table`.
    pub fn strategy(mut self, table: &str, strategy: Arc<dyn ConflictStrategy>) -> Self {
        self.strategies.insert(table.to_owned(), strategy);
        self
    }

    /// Use `strategy` for tables without their own (default: [`LastWriteWins`]).
    pub fn default_strategy(mut self, strategy: Arc<dyn ConflictStrategy>) -> Self {
        self.default_strategy = strategy;
        self
    }

    /// Create the schema's tables and build the service. Strategies of
    /// the sync rules' `[[strategies]]` apply to tables given none here.
    /// Options a client could not follow are refused before anything is
    /// created (`ServiceError::Config`): a `max_line_bytes` above
    /// `ferry_protocol::DEFAULT_MAX_LINE_BYTES`.
    pub fn build(mut self) -> Result<SyncService> {
        let max_line_bytes = self.options.max_line_bytes;
        if max_line_bytes > ferry_protocol::DEFAULT_MAX_LINE_BYTES {
            return Err(ServiceError::Config(format!(
                "max_line_bytes of {max_line_bytes} bytes exceeds the clients' line limit of {} bytes",
                ferry_protocol::DEFAULT_MAX_LINE_BYTES
            )));
        }
        let buffer = self.options.max_stream_buffer_bytes;
        if buffer < max_line_bytes.saturating_mul(2) {
            return Err(ServiceError::Config(format!(
                "max_stream_buffer_bytes of {buffer} bytes is below twice max_line_bytes ({max_line_bytes} bytes): \
                 a stream holds a line being written and one read ahead"
            )));
        }
        let max_answer_bytes = self.options.max_answer_bytes;
        if max_answer_bytes > ferry_protocol::DEFAULT_MAX_LINE_BYTES {
            return Err(ServiceError::Config(format!(
                "max_answer_bytes of {max_answer_bytes} bytes exceeds the clients' answer limit of {} bytes",
                ferry_protocol::DEFAULT_MAX_LINE_BYTES
            )));
        }
        // Half a line: the rest is room for the entry's bucket, table, id
        // and numbers, so one row always fits in one `data` line.
        let max_row = self.options.max_row_encoded_bytes;
        if max_row > ferry_protocol::DEFAULT_MAX_LINE_BYTES / 2 {
            return Err(ServiceError::Config(format!(
                "max_row_encoded_bytes of {max_row} bytes exceeds half the clients' line limit ({} bytes)",
                ferry_protocol::DEFAULT_MAX_LINE_BYTES / 2
            )));
        }
        self.db.migrate(self.rules.schema())?;
        self.rules.log_write_permissions();
        for st in self.rules.strategies() {
            if !self.strategies.contains_key(&st.table) {
                let s = st.build().map_err(|e| ServiceError::Config(e.to_string()))?;
                self.strategies.insert(st.table.clone(), s);
            }
        }
        // The server's clock starts past every clock it ever stored, also
        // when its wall clock is now behind them (the skew bound is
        // widened just enough to take the stored mark in).
        let mark = self.db.max_clock()?;
        let ahead_ms = mark
            .as_ref()
            .map_or(0, |m| m.wall_ms.saturating_sub(self.clock.now_ms()));
        let hlc = HybridClock::new(
            self.clock.clone(),
            "server",
            self.options.max_clock_skew_ms.max(ahead_ms),
        );
        if let Some(m) = &mark {
            hlc.observe(m)?;
        }
        let streams = Arc::new(Semaphore::new(self.options.max_concurrent_streams));
        Ok(SyncService {
            inner: Arc::new(Inner {
                db: self.db,
                rules: self.rules,
                auth: self.auth.unwrap_or_else(|| Authenticator::new(&self.jwt_secret)),
                clock: self.clock,
                hlc,
                options: self.options,
                strategies: self.strategies,
                default_strategy: self.default_strategy,
                shutdown: watch::channel(false).0,
                streams,
                upload_locks: parking_lot::Mutex::new(HashMap::new()),
            }),
        })
    }
}

fn blocking_error(e: blocking::BlockingError) -> ServiceError {
    ServiceError::Database(e.to_string())
}

impl SyncService {
    /// Start building a service over `db` with `rules`, verifying tokens
    /// signed with `jwt_secret`.
    pub fn builder(db: Arc<dyn SourceDb>, rules: SyncRules, jwt_secret: &str) -> SyncServiceBuilder {
        SyncServiceBuilder {
            db,
            rules,
            jwt_secret: jwt_secret.to_owned(),
            auth: None,
            options: ServiceOptions::default(),
            clock: Arc::new(SystemClock),
            strategies: BTreeMap::new(),
            default_strategy: Arc::new(LastWriteWins),
        }
    }

    /// The source database.
    pub fn db(&self) -> &Arc<dyn SourceDb> {
        &self.inner.db
    }

    /// The sync rules.
    pub fn rules(&self) -> &SyncRules {
        &self.inner.rules
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

    /// Ask every stream to end (with a `shutting_down` error line).
    pub fn shutdown(&self) {
        self.inner.shutdown.send_replace(true);
    }

    /// Process an upload for an authenticated user. Each client
    /// transaction commits in one database transaction, together with its
    /// outcomes and the client's write checkpoint, or not at all: when one
    /// of its ops is rejected, every op of it is rejected
    /// (`docs/adr/0005-transactions-all-or-nothing.md`).
    ///
    /// Refused whole, before anything is written: a client id of another
    /// user (`unauthorized`); seqs that do not strictly increase, a new
    /// seq more than `max_seq_gap` above the client's last seq, a seq at
    /// or below it that was never recorded or was recorded for a different
    /// write (compared by a fingerprint of the op's content), all
    /// `bad_request`.
    pub async fn upload(&self, user: &AuthUser, request: UploadRequest) -> Result<UploadResponse> {
        let o = &self.inner.options;
        check_client_id(&request.client_id, o.max_client_id_bytes)?;
        let total: usize = request.transactions.iter().map(|t| t.ops.len()).sum();
        if total > o.max_upload_ops {
            return Err(ServiceError::TooLarge(format!(
                "upload of {total} ops exceeds the limit of {} ops",
                o.max_upload_ops
            )));
        }
        if let Some(t) = request
            .transactions
            .iter()
            .find(|t| t.ops.len() > o.limits.max_ops_per_transaction)
        {
            return Err(ServiceError::TooLarge(format!(
                "transaction {} has {} ops, over the limit of {} ops",
                t.tx_id,
                t.ops.len(),
                o.limits.max_ops_per_transaction
            )));
        }
        let inner = self.inner.clone();
        let user = user.clone();
        let result = blocking::run(move || inner.process_upload(&user, &request))
            .await
            .map_err(blocking_error)?;
        result
    }

    /// Import rows as the server itself (bulk loading, migrations): every
    /// op goes through the upload path (validation, conflict strategy, row
    /// write, bucket placement, op log and bucket state) in ONE database
    /// transaction, with server clocks and no client (no outcomes, no write
    /// checkpoint). Any rejected op rolls the whole import back. Returns the
    /// number of ops applied.
    pub async fn import(&self, ops: Vec<CrudOp>) -> Result<usize> {
        let limit = self.inner.options.max_upload_ops;
        if ops.len() > limit {
            return Err(ServiceError::TooLarge(format!(
                "import of {} ops exceeds the limit of {limit} ops",
                ops.len()
            )));
        }
        let inner = self.inner.clone();
        let n = ops.len();
        let result = blocking::run(move || inner.process_import(ops))
            .await
            .map_err(blocking_error)?;
        result.map(|()| n)
    }

    /// Open a stream for an authenticated user, typed.
    pub fn open_stream(&self, user: AuthUser, request: StreamRequest) -> Result<ServerLines> {
        self.open_stream_as(user, request)
    }

    /// Open a stream for an authenticated user, with `data` lines encoded
    /// straight from the stored rows (what transports use: no typed rows
    /// are built).
    pub fn open_stream_lines(&self, user: AuthUser, request: StreamRequest) -> Result<ServerLineStream> {
        self.open_stream_as(user, request)
    }

    fn open_stream_as<L: StreamOut>(&self, user: AuthUser, request: StreamRequest) -> Result<mpsc::Receiver<L>> {
        let inner = &self.inner;
        if *inner.shutdown.borrow() {
            return Err(ServiceError::ShuttingDown);
        }
        check_client_id(&request.client_id, inner.options.max_client_id_bytes)?;
        // A point read; a client id of another user is refused before
        // anything of the stream is read.
        inner.check_client_owner(&request.client_id, &user.user_id)?;
        let permit = inner.streams.clone().try_acquire_owned().map_err(|_| {
            ServiceError::Busy(format!(
                "too many concurrent streams (limit {})",
                inner.options.max_concurrent_streams
            ))
        })?;
        let buckets = inner
            .rules
            .user_buckets(&user.claims, inner.options.max_buckets_per_user)?;
        let requested: BTreeMap<&str, u64> = request
            .buckets
            .iter()
            .map(|b| (b.name.as_str(), b.after_op_id))
            .collect();
        let positions: BTreeMap<String, u64> = buckets
            .iter()
            .map(|b| (b.clone(), requested.get(b.as_str()).copied().unwrap_or(0)))
            .collect();
        let (tx, rx) = mpsc::channel(inner.options.stream_buffer_lines.max(1));
        let inner = inner.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let client_id = request.client_id;
            if let Err(e) = run_stream(&inner, &user, &client_id, buckets, positions, &tx).await {
                tracing::warn!(client_id, error = %e, "stream failed");
                // A client that does not read never gets it.
                let _ = tx.try_send(StreamLine::Error(e.to_server_error()).into());
            }
        });
        Ok(rx)
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

/// The client's last seq (0 for a client that never uploaded), refusing a
/// client id of another user.
fn client_progress(stx: &mut dyn SourceTx, client_id: &str, user_id: &str) -> Result<u64> {
    match stx.client(client_id)? {
        Some(p) if p.user_id != user_id => Err(client_of_another_user(client_id)),
        Some(p) => Ok(p.last_seq),
        None => Ok(0),
    }
}

/// Append one op log entry: a new op id, its checksum
/// (`ferry_protocol::op_checksum`), and the bucket's state advanced (the
/// checksum is the wrapping sum of its entries'). Returns the op id.
fn append_op(
    stx: &mut dyn SourceTx,
    bucket: &str,
    op: OpKind,
    table: &str,
    row_id: &str,
    data: Option<&RowData>,
) -> Result<u64> {
    let op_id = stx.next_op_id()?;
    let checksum = ferry_protocol::op_checksum(op_id, op, table, row_id, data);
    stx.append_op(NewOp {
        op_id,
        bucket,
        op,
        table,
        row_id,
        data,
        checksum,
    })?;
    let state = stx.bucket_state(bucket)?.unwrap_or_default();
    stx.set_bucket_state(
        bucket,
        &BucketState {
            checksum: state.checksum.wrapping_add(checksum),
            count: state.count.saturating_add(1),
            last_op_id: op_id,
        },
    )?;
    Ok(op_id)
}

fn client_of_another_user(client_id: &str) -> ServiceError {
    ServiceError::Unauthorized(format!("client id {client_id:?} belongs to another user"))
}

fn progress_moved(client_id: &str) -> ServiceError {
    ServiceError::Busy(format!(
        "the progress of client {client_id:?} changed during the upload; retry"
    ))
}

/// A checked side write merged over the row it writes, ready to write.
struct MergedSideWrite<'a> {
    table: &'a Table,
    id: &'a str,
    /// The row before this side write (`None`: new).
    old: Option<RowData>,
    /// The row after it.
    row: RowData,
    clocks: BTreeMap<String, HlcTimestamp>,
}

/// A side write's columns over `base` (a new row has the others NULL);
/// each written column's clock is the later of the stored one and `hlc`.
fn merge_side_write(
    table: &Table,
    w: &SideWrite,
    base: Option<(RowData, BTreeMap<String, HlcTimestamp>)>,
    hlc: &HlcTimestamp,
) -> (RowData, BTreeMap<String, HlcTimestamp>) {
    let (mut row, mut clocks) = base.unwrap_or_else(|| {
        (
            table.columns.iter().map(|c| (c.name.clone(), Value::Null)).collect(),
            BTreeMap::new(),
        )
    });
    for (k, v) in &w.data {
        row.insert(k.clone(), v.clone());
        let later = match clocks.get(k) {
            Some(c) if c > hlc => c.clone(),
            _ => hlc.clone(),
        };
        clocks.insert(k.clone(), later);
    }
    (row, clocks)
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

/// The fingerprint of an op's content as received: FNV-1a 64 over the
/// serde_json encoding of the whole `CrudEntry` (seq, tx id, op, previous,
/// metadata, hlc; maps are ordered, so the encoding is canonical).
fn op_fingerprint(entry: &CrudEntry) -> Result<u64> {
    let mut h = Fnv64::new();
    serde_json::to_writer(&mut h, entry)
        .map_err(|e| ServiceError::BadRequest(format!("seq {} cannot be encoded: {e}", entry.seq)))?;
    Ok(h.0)
}

/// Refuse seqs that do not strictly increase across the whole request
/// (a repeat, or a step back, within or between transactions).
fn check_seq_order(request: &UploadRequest) -> Result<()> {
    let mut prev: Option<(u64, u64)> = None;
    for t in &request.transactions {
        for e in &t.ops {
            if let Some((p, p_tx)) = prev {
                if e.seq <= p {
                    let place = if p_tx == t.tx_id {
                        format!("inside transaction {}", t.tx_id)
                    } else {
                        format!("in transaction {} after transaction {p_tx}", t.tx_id)
                    };
                    return Err(ServiceError::BadRequest(format!(
                        "seq {} of client {:?} does not follow seq {p} {place}: seqs must strictly increase",
                        e.seq, request.client_id
                    )));
                }
            }
            prev = Some((e.seq, t.tx_id));
        }
    }
    Ok(())
}

/// Most bytes of one reason when an answer over `max_answer_bytes` still
/// does not fit after its rows were dropped.
const MAX_SHORTENED_REASON_BYTES: usize = 200;

/// Make an upload answer fit in `max_bytes` of JSON: drop the rows of
/// `merged` outcomes, largest first, until it fits; if it still does not,
/// shorten every reason to [`MAX_SHORTENED_REASON_BYTES`]. Every op keeps
/// its outcome.
fn fit_answer(response: &mut UploadResponse, max_bytes: usize) {
    let mut total = encoded_bytes(response);
    if total <= max_bytes {
        return;
    }
    let mut rows: Vec<(usize, usize)> = response
        .outcomes
        .iter()
        .enumerate()
        .filter_map(|(i, o)| match &o.outcome {
            // `"row":<json>,` in the answer.
            Outcome::Merged { row: Some(r), .. } => Some((i, encoded_bytes(r).saturating_add(7))),
            _ => None,
        })
        .collect();
    rows.sort_by_key(|&(i, size)| (std::cmp::Reverse(size), i));
    for (i, size) in rows {
        if total <= max_bytes {
            break;
        }
        if let Some(OpOutcome {
            outcome: Outcome::Merged { row, .. },
            ..
        }) = response.outcomes.get_mut(i)
        {
            *row = None;
            total = total.saturating_sub(size);
        }
    }
    if encoded_bytes(response) <= max_bytes {
        return;
    }
    for o in &mut response.outcomes {
        match &mut o.outcome {
            Outcome::Merged { reason, .. } | Outcome::Rejected { reason } => {
                shorten(reason, MAX_SHORTENED_REASON_BYTES);
            }
            Outcome::Applied | Outcome::NeedsReview { .. } => {}
        }
    }
}

/// Cut `s` to at most `max_bytes` (on a char boundary), marking the cut.
fn shorten(s: &mut String, max_bytes: usize) {
    const MARK: &str = "...";
    if s.len() <= max_bytes {
        return;
    }
    let mut end = max_bytes.saturating_sub(MARK.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
    s.push_str(MARK);
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

    /// A stored outcome answered again: a `merged` row the user can no
    /// longer read is left out.
    fn replayed_outcome(&self, viewer: &Viewer, entry: &CrudEntry, outcome: Outcome) -> Outcome {
        match outcome {
            Outcome::Merged { row: Some(row), reason }
                if !self.readable(viewer, entry.op.table(), entry.op.id(), &row) =>
            {
                Outcome::Merged { row: None, reason }
            }
            o => o,
        }
    }

    /// Process an upload (see [`SyncService::upload`]). Order: owner,
    /// seq order, fingerprints, replays and seq gaps are all checked before
    /// anything is written; then each client transaction commits in one
    /// database transaction, or is rolled back and recorded as rejected
    /// in another.
    fn process_upload(&self, user: &AuthUser, request: &UploadRequest) -> Result<UploadResponse> {
        let client_id = request.client_id.as_str();
        let user_id = user.user_id.as_str();
        let serial = self.client_lock(client_id);
        let _serial = serial.lock();
        self.check_client_owner(client_id, user_id)?;
        check_seq_order(request)?;
        let fingerprints: Vec<Vec<u64>> = request
            .transactions
            .iter()
            .map(|t| t.ops.iter().map(op_fingerprint).collect())
            .collect::<Result<_>>()?;
        let viewer = self.viewer(user);
        let writer = Writer {
            user_id,
            claims: &user.claims,
            buckets: &viewer,
        };

        // Replays: each must be the same write as the one recorded.
        let mut last_seq = 0;
        let mut replayed: BTreeMap<u64, Outcome> = BTreeMap::new();
        crate::db::write(self.db.as_ref(), |stx| {
            replayed.clear();
            last_seq = client_progress(stx, client_id, user_id)?;
            for (t, fps) in request.transactions.iter().zip(&fingerprints) {
                for (entry, fp) in t.ops.iter().zip(fps) {
                    if entry.seq > last_seq {
                        continue;
                    }
                    let Some(stored) = stx.outcome(client_id, entry.seq)? else {
                        return Err(ServiceError::BadRequest(format!(
                            "seq {} of client {client_id:?} has no recorded write: it is at or below the \
                             client's last seq {last_seq} but was never uploaded",
                            entry.seq
                        )));
                    };
                    // Outcomes recorded before fingerprints were kept
                    // (`None`) are answered as they are.
                    if stored.fingerprint.is_some_and(|f| f != *fp) {
                        return Err(ServiceError::BadRequest(format!(
                            "seq {} of client {client_id:?} was already used for a different write",
                            entry.seq
                        )));
                    }
                    replayed.insert(entry.seq, self.replayed_outcome(&viewer, entry, stored.outcome));
                }
            }
            Ok(())
        })?;
        let max_seq = request
            .transactions
            .iter()
            .flat_map(|t| t.ops.last())
            .map(|e| e.seq)
            .max();
        if let Some(max_seq) = max_seq.filter(|&s| s > last_seq) {
            let gap = max_seq - last_seq;
            if gap > self.options.max_seq_gap {
                return Err(ServiceError::BadRequest(format!(
                    "seq {max_seq} of client {client_id:?} is {gap} above its last seq {last_seq}, over the \
                     limit of {} (max_seq_gap)",
                    self.options.max_seq_gap
                )));
            }
        }

        let mut outcomes = Vec::with_capacity(fingerprints.iter().map(Vec::len).sum());
        for (t, fps) in request.transactions.iter().zip(&fingerprints) {
            let fresh: Vec<(&CrudEntry, u64)> = t
                .ops
                .iter()
                .zip(fps.iter().copied())
                .filter(|(e, _)| e.seq > last_seq)
                .collect();
            let mut fresh_outcomes = if fresh.is_empty() {
                Vec::new()
            } else {
                let o = self.apply_transaction(client_id, &writer, t.tx_id, &fresh, last_seq)?;
                last_seq = fresh.last().map_or(last_seq, |(e, _)| e.seq);
                o
            }
            .into_iter();
            for e in &t.ops {
                let outcome = match replayed.remove(&e.seq) {
                    Some(o) => o,
                    None => fresh_outcomes.next().ok_or_else(|| {
                        ServiceError::Database(format!("no outcome for seq {} of client {client_id:?}", e.seq))
                    })?,
                };
                outcomes.push(OpOutcome { seq: e.seq, outcome });
            }
        }
        let mut response = UploadResponse {
            outcomes,
            write_checkpoint: last_seq,
            // After every clock of this upload was observed.
            hlc: Some(self.hlc.now()),
        };
        fit_answer(&mut response, self.options.max_answer_bytes);
        Ok(response)
    }

    /// Apply the new ops of one client transaction in one database
    /// transaction, with their outcomes and the client's last seq. When an
    /// op is rejected (and its table does not ask for per-op outcomes) the
    /// transaction is rolled back and every op of it is recorded as
    /// rejected, in a new transaction, so a replay gets the same answers.
    fn apply_transaction(
        &self,
        client_id: &str,
        writer: &Writer<'_>,
        tx_id: u64,
        fresh: &[(&CrudEntry, u64)],
        last_seq: u64,
    ) -> Result<Vec<Outcome>> {
        let Some(new_last) = fresh.last().map(|(e, _)| e.seq) else {
            return Ok(Vec::new());
        };
        let user_id = writer.user_id;
        let mut outcomes = Vec::with_capacity(fresh.len());
        let mut failed: Option<(u64, String)> = None;
        let result = crate::db::write(self.db.as_ref(), |stx| {
            outcomes.clear();
            failed = None;
            if client_progress(stx, client_id, user_id)? != last_seq {
                return Err(progress_moved(client_id));
            }
            for &(entry, fp) in fresh {
                let outcome = self.apply_op(stx, client_id, user_id, Some(writer), entry)?;
                if let Outcome::Rejected { reason } = &outcome {
                    if !self.rules.per_op_outcomes(entry.op.table()) {
                        failed = Some((entry.seq, reason.clone()));
                        // Rolls the database transaction back.
                        return Err(ServiceError::BadRequest(format!("transaction {tx_id} rolled back")));
                    }
                }
                stx.record_outcome(client_id, entry.seq, fp, &outcome)?;
                outcomes.push(outcome);
            }
            Ok(stx.set_client(client_id, user_id, new_last)?)
        });
        let (failed_seq, reason) = match (result, failed) {
            (Ok(()), _) => return Ok(outcomes),
            (Err(_), Some(f)) => f,
            (Err(e), None) => return Err(e),
        };
        let outcomes: Vec<Outcome> = fresh
            .iter()
            .map(|(e, _)| Outcome::Rejected {
                reason: if e.seq == failed_seq {
                    reason.clone()
                } else {
                    format!("transaction {tx_id} rolled back: seq {failed_seq} was rejected: {reason}")
                },
            })
            .collect();
        crate::db::write(self.db.as_ref(), |stx| {
            if client_progress(stx, client_id, user_id)? != last_seq {
                return Err(progress_moved(client_id));
            }
            for ((e, fp), o) in fresh.iter().zip(&outcomes) {
                stx.record_outcome(client_id, e.seq, *fp, o)?;
            }
            Ok(stx.set_client(client_id, user_id, new_last)?)
        })?;
        Ok(outcomes)
    }

    fn process_import(&self, ops: Vec<CrudOp>) -> Result<()> {
        let entries: Vec<CrudEntry> = ops
            .into_iter()
            .map(|op| CrudEntry {
                seq: 0,
                tx_id: 0,
                op,
                previous: None,
                metadata: None,
                hlc: None,
            })
            .collect();
        crate::db::write(self.db.as_ref(), |stx| {
            for entry in &entries {
                if let Outcome::Rejected { reason } = self.apply_op(stx, "", "", None, entry)? {
                    return Err(ServiceError::BadRequest(format!(
                        "import of {}/{} rejected: {reason}",
                        entry.op.table(),
                        entry.op.id()
                    )));
                }
            }
            Ok(())
        })
    }

    /// The op's clock: the client's HLC with the uploading client's id as
    /// its node (a client never stamps another node's id, and the node's
    /// length is the client id's), its wall time clamped to server time +
    /// max skew; a server timestamp when the client sent none. The
    /// server's HLC observes it (`docs/adr/0006-client-clocks.md`).
    fn op_clock(&self, client_id: &str, entry: &CrudEntry) -> HlcTimestamp {
        match &entry.hlc {
            Some(h) => {
                let max_wall = self.clock.now_ms().saturating_add(self.options.max_clock_skew_ms);
                if h.wall_ms > max_wall {
                    // Too far ahead: the server's own clock instead, which
                    // orders after everything it has seen, so two writes of
                    // one client clamped together keep their order (cutting
                    // both to the bound would tie them, and the later one
                    // would lose).
                    let mut t = self.hlc.now();
                    t.node = client_id.to_owned();
                    return t;
                }
                let h = HlcTimestamp {
                    wall_ms: h.wall_ms,
                    counter: h.counter,
                    node: client_id.to_owned(),
                };
                // Within the skew bound, so this succeeds.
                let _ = self.hlc.observe(&h);
                h
            }
            None => self.hlc.now(),
        }
    }

    /// Refuse a row whose JSON (as stored in the op log and sent in `data`
    /// lines) is over `max_row_encoded_bytes`.
    fn check_encoded_size(&self, table: &str, id: &str, row: &RowData) -> std::result::Result<(), String> {
        let max = self.options.max_row_encoded_bytes;
        let size = encoded_bytes(row);
        if size > max {
            return Err(format!(
                "row {table}/{id} would encode to {size} bytes of JSON, over the limit of {max} bytes \
                 (max_row_encoded_bytes)"
            ));
        }
        Ok(())
    }

    /// Apply one op. `writer` is the uploading user (`None` for the
    /// server's own imports): the write must pass the table's write
    /// permissions, checked before the conflict strategy runs; a `merged`
    /// row they cannot read is left out of the outcome, and so is a
    /// strategy's reason about a stored row they cannot read.
    fn apply_op(
        &self,
        stx: &mut dyn SourceTx,
        client_id: &str,
        user_id: &str,
        writer: Option<&Writer<'_>>,
        entry: &CrudEntry,
    ) -> Result<Outcome> {
        let viewer: Option<&Viewer> = writer.map(|w| w.buckets);
        let rejected = |reason: String| Ok(Outcome::Rejected { reason });
        let table = match self.rules.schema().table(entry.op.table()) {
            Ok(t) => t,
            Err(e) => return rejected(e.to_string()),
        };
        if table.local_only {
            return rejected(format!("table {:?} is local-only", table.name));
        }
        let limits = &self.options.limits;
        let id = entry.op.id();
        let op = match &entry.op {
            CrudOp::Put { data, .. } => {
                let mut full: RowData = table.columns.iter().map(|c| (c.name.clone(), Value::Null)).collect();
                match table.check_row(id, data.clone(), limits) {
                    Ok(d) => full.extend(d),
                    Err(e) => return rejected(e.to_string()),
                }
                CrudOp::Put {
                    table: table.name.clone(),
                    id: id.to_owned(),
                    data: full,
                }
            }
            CrudOp::Patch { data, .. } => {
                if let Err(e) = table.check_id(id, limits) {
                    return rejected(e.to_string());
                }
                match table.check_data(data.clone()) {
                    Ok(d) => CrudOp::Patch {
                        table: table.name.clone(),
                        id: id.to_owned(),
                        data: d,
                    },
                    Err(e) => return rejected(e.to_string()),
                }
            }
            CrudOp::Delete { .. } => {
                if let Err(e) = table.check_id(id, limits) {
                    return rejected(e.to_string());
                }
                entry.op.clone()
            }
        };
        let current = stx.read_row(table, id)?;
        if let Some(w) = writer {
            let old = current.as_ref().and_then(|c| c.data.as_ref());
            if let Err(reason) = self.check_permission(table, &entry.op, &op, old, w) {
                return rejected(reason);
            }
        }
        let hlc = self.op_clock(client_id, entry);
        let strategy = self.strategies.get(&table.name).unwrap_or(&self.default_strategy);
        let decision = strategy.resolve(&ConflictInput {
            table,
            id,
            op: &op,
            hlc: &hlc,
            base: entry.previous.as_ref(),
            client_id,
            user_id,
            seq: entry.seq,
            now_ms: self.clock.now_ms(),
            current: current.as_ref(),
        });
        let old_data = current.as_ref().and_then(|c| c.data.as_ref());
        // The user cannot read the stored row: a strategy's reason may
        // quote its values, so it is replaced.
        let hidden = viewer.is_some_and(|v| old_data.is_some_and(|d| !self.readable(v, &table.name, id, d)));
        let redacted = |outcome: Outcome| -> Outcome {
            let Some(v) = viewer else {
                return outcome;
            };
            match outcome {
                Outcome::Merged { row, reason } => {
                    let row = row.filter(|r| self.readable(v, &table.name, id, r));
                    let reason = if hidden && row.is_none() {
                        format!(
                            "the write to {}/{id} was merged with a stored row this user cannot read \
                             (details withheld)",
                            table.name
                        )
                    } else {
                        reason
                    };
                    Outcome::Merged { row, reason }
                }
                Outcome::Rejected { .. } if hidden => Outcome::Rejected {
                    reason: format!(
                        "the write to {}/{id} was refused because of a stored row this user cannot read \
                         (details withheld)",
                        table.name
                    ),
                },
                o => o,
            }
        };
        if let Err(reason) = match &decision.resolution {
            Resolution::Write { row, .. } => self.check_encoded_size(&table.name, id, row),
            _ => Ok(()),
        } {
            return Ok(redacted(Outcome::Rejected { reason }));
        }
        // Side writes are validated and merged over their stored rows
        // before anything is written: an invalid or oversized one rejects
        // the op.
        let main_result = match &decision.resolution {
            Resolution::Write { row, clocks, .. } => Some(Some((row, clocks))),
            Resolution::Delete { .. } => Some(None),
            Resolution::Keep { .. } | Resolution::Reject { .. } => None,
        };
        let mut side: Vec<MergedSideWrite<'_>> = Vec::with_capacity(decision.side_writes.len());
        for w in &decision.side_writes {
            let side_table = match self.check_side_write(w) {
                Ok((t, _)) => t,
                Err(reason) => return Ok(redacted(Outcome::Rejected { reason })),
            };
            // The row as it will be when this side write applies: an
            // earlier side write of this op, the op's own result, or the
            // stored row.
            let earlier = side
                .iter()
                .rev()
                .find(|s| s.table.name == side_table.name && s.id == w.id)
                .map(|s| Some((s.row.clone(), s.clocks.clone())));
            let base = match earlier {
                Some(b) => b,
                None if side_table.name == table.name && w.id == id && main_result.is_some() => {
                    main_result.flatten().map(|(r, c)| (r.clone(), c.clone()))
                }
                None => match stx.read_row(side_table, &w.id)? {
                    Some(StoredRow {
                        data: Some(d), clocks, ..
                    }) => Some((d, clocks)),
                    _ => None,
                },
            };
            let (row, clocks) = merge_side_write(side_table, w, base.clone(), &hlc);
            if let Err(reason) = self.check_encoded_size(&w.table, &w.id, &row) {
                return Ok(redacted(Outcome::Rejected {
                    reason: format!("side write {}/{}: {reason}", w.table, w.id),
                }));
            }
            side.push(MergedSideWrite {
                table: side_table,
                id: &w.id,
                old: base.map(|(d, _)| d),
                row,
                clocks,
            });
        }
        let reason = decision.outcome_reason();
        let outcome = match &decision.resolution {
            Resolution::Reject { reason } => Outcome::Rejected { reason: reason.clone() },
            Resolution::Keep { row, reason: why } => Outcome::Merged {
                row: row.clone(),
                reason: reason.unwrap_or_else(|| why.clone()),
            },
            Resolution::Write { row, clocks, .. } => {
                let size_bytes = row_size_bytes(id, row);
                if size_bytes > limits.max_row_bytes {
                    return rejected(format!(
                        "row {}/{id} would be {size_bytes} bytes, over the limit of {} bytes",
                        table.name, limits.max_row_bytes
                    ));
                }
                stx.write_row(table, id, row, clocks)?;
                if old_data != Some(row) {
                    self.emit_row(stx, &table.name, id, Some(row))?;
                }
                match reason {
                    Some(reason) => Outcome::Merged {
                        reason,
                        row: Some(row.clone()),
                    },
                    None => Outcome::Applied,
                }
            }
            Resolution::Delete { hlc } => {
                stx.delete_row(table, id, hlc)?;
                if old_data.is_some() {
                    self.emit_row(stx, &table.name, id, None)?;
                }
                match reason {
                    Some(reason) => Outcome::Merged { row: None, reason },
                    None => Outcome::Applied,
                }
            }
        };
        for s in side {
            stx.write_row(s.table, s.id, &s.row, &s.clocks)?;
            if s.old.as_ref() != Some(&s.row) {
                self.emit_row(stx, &s.table.name, s.id, Some(&s.row))?;
            }
        }
        Ok(redacted(match (decision.conflict_id, outcome) {
            (_, outcome @ Outcome::Rejected { .. }) | (None, outcome) => outcome,
            (Some(conflict_id), _) => Outcome::NeedsReview { conflict_id },
        }))
    }

    /// Check a client write against the table's write permissions: `sent`
    /// is the op as uploaded, `op` the validated one (a PUT with every
    /// column), `old` the stored values. A PUT or PATCH of a row without
    /// stored values is an insert (its new row: the op's columns, the
    /// others NULL), of one with stored values an update (the stored row
    /// with the op's columns); a DELETE is a delete. `Err` is the reason.
    fn check_permission(
        &self,
        table: &Table,
        sent: &CrudOp,
        op: &CrudOp,
        old: Option<&RowData>,
        writer: &Writer<'_>,
    ) -> std::result::Result<(), String> {
        let kind = match (op, old) {
            (CrudOp::Delete { .. }, _) => WriteOp::Delete,
            (_, None) => WriteOp::Insert,
            (_, Some(_)) => WriteOp::Update,
        };
        let new: Option<RowData> = match op {
            CrudOp::Put { data, .. } => Some(data.clone()),
            CrudOp::Patch { data, .. } => {
                let mut row = old
                    .cloned()
                    .unwrap_or_else(|| table.columns.iter().map(|c| (c.name.clone(), Value::Null)).collect());
                row.extend(data.iter().map(|(k, v)| (k.clone(), v.clone())));
                Some(row)
            }
            CrudOp::Delete { .. } => None,
        };
        let sent = match sent {
            CrudOp::Put { data, .. } | CrudOp::Patch { data, .. } => Some(data),
            CrudOp::Delete { .. } => None,
        };
        let new_buckets = new
            .as_ref()
            .map(|r| self.rules.row_buckets(&table.name, op.id(), r))
            .unwrap_or_default();
        permissions::check(
            self.rules.permissions(&table.name),
            &WriteRequest {
                table: &table.name,
                id: op.id(),
                op: kind,
                old,
                new: new.as_ref(),
                sent,
                new_buckets: &new_buckets,
            },
            writer,
        )
    }

    /// Check a strategy's side write against the schema: its table, id,
    /// column names and types, and size.
    fn check_side_write<'w>(&self, w: &'w SideWrite) -> std::result::Result<(&Table, &'w SideWrite), String> {
        let limits = &self.options.limits;
        let bad = |e: &dyn std::fmt::Display| format!("side write {}/{}: {e}", w.table, w.id);
        let table = self.rules.schema().table(&w.table).map_err(|e| bad(&e))?;
        table.check_id(&w.id, limits).map_err(|e| bad(&e))?;
        table.check_data(w.data.clone()).map_err(|e| bad(&e))?;
        let size_bytes = row_size_bytes(&w.id, &w.data);
        if size_bytes > limits.max_row_bytes {
            return Err(bad(&format!(
                "{size_bytes} bytes, over the limit of {} bytes",
                limits.max_row_bytes
            )));
        }
        Ok((table, w))
    }

    /// Append the row's change to the op log: PUT in every bucket it is in
    /// now, REMOVE from every bucket it left.
    fn emit_row(&self, stx: &mut dyn SourceTx, table: &str, id: &str, row: Option<&RowData>) -> Result<()> {
        let new: BTreeSet<String> = row.map(|r| self.rules.row_buckets(table, id, r)).unwrap_or_default();
        let old = stx.row_buckets(table, id)?;
        for b in &new {
            append_op(stx, b, OpKind::Put, table, id, row)?;
        }
        for b in old.difference(&new) {
            append_op(stx, b, OpKind::Remove, table, id, None)?;
        }
        if old != new {
            stx.set_row_buckets(table, id, &new)?;
        }
        Ok(())
    }
}

/// Runs one stream until the client leaves, the token expires or the
/// server shuts down, whether or not the client reads (every send waits
/// within [`ServiceOptions::max_stream_buffer_bytes`] and ends at either).
async fn run_stream<L: StreamOut>(
    inner: &Arc<Inner>,
    user: &AuthUser,
    client_id: &str,
    buckets: Vec<String>,
    mut positions: BTreeMap<String, u64>,
    tx: &mpsc::Sender<L>,
) -> Result<()> {
    // The database's commit notifications (of every server sharing it,
    // where the database can tell); keepalives look again anyway.
    let mut commits = inner.db.commits();
    let period = Duration::from_secs(inner.options.keepalive_interval_s.max(1));
    let mut keepalive = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let expires_in_ms = (user.exp_s.saturating_mul(1000)).saturating_sub(inner.clock.now_ms());
    // The transport's share of the budget: the line it is writing.
    let channel_budget = inner
        .options
        .max_stream_buffer_bytes
        .saturating_sub(inner.options.max_line_bytes);
    let mut out = StreamSender::new(
        tx,
        channel_budget,
        inner.shutdown.subscribe(),
        Duration::from_millis(expires_in_ms),
        user.exp_s,
    );
    let mut sent: Option<CheckpointState> = None;
    loop {
        commits.borrow_and_update();
        let db = inner.db.clone();
        let (cid, names) = (client_id.to_owned(), buckets.clone());
        let cp = blocking::run(move || db.checkpoint(&cid, &names))
            .await
            .map_err(blocking_error)??;
        if sent.as_ref() != Some(&cp) {
            let changed: Vec<String> = match &sent {
                None => {
                    let line = StreamLine::Checkpoint(Checkpoint {
                        hlc: Some(inner.hlc.now()),
                        last_op_id: cp.last_op_id,
                        write_checkpoint: cp.write_checkpoint,
                        buckets: cp.buckets.clone(),
                    });
                    if let Err(stop) = out.send(line.into()).await {
                        out.end(stop);
                        return Ok(());
                    }
                    cp.buckets.iter().map(|b| b.bucket.clone()).collect()
                }
                Some(prev) => {
                    let updated: Vec<_> = cp
                        .buckets
                        .iter()
                        .filter(|b| !prev.buckets.contains(b))
                        .cloned()
                        .collect();
                    let line = StreamLine::CheckpointDiff(CheckpointDiff {
                        hlc: Some(inner.hlc.now()),
                        last_op_id: cp.last_op_id,
                        write_checkpoint: cp.write_checkpoint,
                        updated_buckets: updated.clone(),
                        removed_buckets: Vec::new(),
                    });
                    if let Err(stop) = out.send(line.into()).await {
                        out.end(stop);
                        return Ok(());
                    }
                    updated.into_iter().map(|b| b.bucket).collect()
                }
            };
            let work: Vec<(String, u64)> = changed
                .into_iter()
                .filter_map(|b| {
                    let pos = positions.get(&b).copied().unwrap_or(0);
                    (pos < cp.last_op_id).then_some((b, pos))
                })
                .collect();
            if let Err(stop) = send_data(inner, work, cp.last_op_id, &mut out).await? {
                out.end(stop);
                return Ok(());
            }
            for p in positions.values_mut() {
                *p = (*p).max(cp.last_op_id);
            }
            let complete = StreamLine::CheckpointComplete {
                last_op_id: cp.last_op_id,
            };
            if let Err(stop) = out.send(complete.into()).await {
                out.end(stop);
                return Ok(());
            }
            sent = Some(cp);
        }
        // Wait for a commit or the next keepalive, then look again: a
        // notification may have been lost (another server's commit, a
        // dropped connection), so every keepalive is followed by a fresh
        // checkpoint.
        tokio::select! {
            biased;
            () = tx.closed() => return Ok(()),
            r = commits.changed() => {
                if r.is_err() {
                    return Ok(());
                }
            }
            stop = out.stopped() => {
                out.end(stop);
                return Ok(());
            }
            _ = keepalive.tick() => {
                let token_expires_in_s = user.exp_s.saturating_sub(inner.clock.now_ms() / 1000);
                if let Err(stop) = out.send(StreamLine::Keepalive { token_expires_in_s }.into()).await {
                    out.end(stop);
                    return Ok(());
                }
            }
        }
    }
}

/// A stream's line type: typed lines ([`StreamLine`], for
/// [`SyncService::open_stream`]) or lines for transports ([`ServerLine`]).
/// Both come from one path: `data` lines are encoded straight from the
/// stored rows ([`read_data_line`]); the typed stream decodes them.
trait StreamOut: From<StreamLine> + LineBytes + Send + 'static {
    /// The line for an encoded `data` line (newline included).
    fn from_data_line(line: Vec<u8>) -> Result<Self>;
}

impl StreamOut for StreamLine {
    fn from_data_line(line: Vec<u8>) -> Result<Self> {
        ferry_protocol::decode_line(&line, usize::MAX)
            .map_err(|e| ServiceError::Database(format!("a data line read from the op log does not decode: {e}")))
    }
}

impl StreamOut for ServerLine {
    fn from_data_line(line: Vec<u8>) -> Result<Self> {
        Ok(ServerLine::Encoded(line))
    }
}

/// Most bytes reserved up front for an encoded `data` line (the size of
/// the stream's previous line, plus some).
const MAX_ENCODED_LINE_RESERVE_BYTES: usize = 16 * 1024 * 1024;

/// The next `data` line of `range`: the encoded line (within
/// `range.max_line_bytes`, newline included, at least one entry), its
/// entry count and its last op id; `None` when there is no entry.
/// `size_hint_bytes` carries the size of the stream's last line to the
/// next (lines of a stream tend to be alike).
fn read_data_line(
    db: &dyn SourceDb,
    range: &OpRange<'_>,
    size_hint_bytes: &mut usize,
) -> Result<Option<(Vec<u8>, usize, u64)>> {
    let reserve = size_hint_bytes.saturating_add(*size_hint_bytes / 8);
    let reserve = reserve.min(MAX_ENCODED_LINE_RESERVE_BYTES).min(range.max_line_bytes);
    // The writer itself refuses entries past `max_line_bytes` of encoded
    // line, whatever the database pushes, so the last op id is the
    // writer's (the database's may name an entry it refused).
    let mut line = DataLineWriter::new(range.bucket, reserve).with_max_line_bytes(range.max_line_bytes);
    db.read_ops_into(range, &mut line)?;
    let Some(last) = line.last_op_id() else {
        return Ok(None);
    };
    let n = line.ops();
    let bytes = line.finish();
    *size_hint_bytes = bytes.len();
    Ok(Some((bytes, n, last)))
}

/// Sends the entries of each `(bucket, after_op_id)` up to `last_op_id`
/// in bounded lines, each read on a blocking thread once a whole line
/// fits the stream's byte budget (so reading runs ahead of the client by
/// at most that). `Ok(Err(stop))` when the stream must end.
async fn send_data<L: StreamOut>(
    inner: &Arc<Inner>,
    work: Vec<(String, u64)>,
    last_op_id: u64,
    out: &mut StreamSender<'_, L>,
) -> Result<std::result::Result<(), Stop>> {
    let (max_ops, max_bytes) = (
        inner.options.max_ops_per_line.max(1),
        inner.options.max_line_bytes.max(1),
    );
    let mut size_hint_bytes = 0;
    for (bucket, mut pos) in work {
        loop {
            if let Err(stop) = out.room_for(max_bytes).await {
                return Ok(Err(stop));
            }
            let db = inner.db.clone();
            let name = bucket.clone();
            let read = blocking::run(move || {
                let mut hint = size_hint_bytes;
                let range = OpRange::between(&name, pos, last_op_id).limited(max_ops, max_bytes);
                let line = read_data_line(db.as_ref(), &range, &mut hint)?;
                let line = match line {
                    Some((bytes, n, last)) => Some((L::from_data_line(bytes)?, n, last)),
                    None => None,
                };
                Ok::<_, ServiceError>((line, hint))
            })
            .await
            .map_err(blocking_error)??;
            let (Some((line, n, last)), hint) = read else {
                break;
            };
            size_hint_bytes = hint;
            pos = last;
            let full = n >= max_ops;
            if let Err(stop) = out.send(line).await {
                return Ok(Err(stop));
            }
            if !full && pos >= last_op_id {
                break;
            }
        }
    }
    Ok(Ok(()))
}

#[async_trait]
impl SyncHandler for SyncService {
    async fn stream(&self, token: &str, request: StreamRequest) -> Result<ServerLines, ServerError> {
        let user = self.authenticate_async(token).await?;
        Ok(self.open_stream(user, request)?)
    }

    async fn stream_lines(&self, token: &str, request: StreamRequest) -> Result<ServerLineStream, ServerError> {
        let user = self.authenticate_async(token).await?;
        Ok(self.open_stream_lines(user, request)?)
    }

    async fn upload(&self, token: &str, request: UploadRequest) -> Result<UploadResponse, ServerError> {
        let user = self.authenticate_async(token).await?;
        Ok(SyncService::upload(self, &user, request).await?)
    }
}
