//! The sync service: uploads (write processing), checkpoints, streams and
//! compaction over a [`SourceDb`] and [`SyncRules`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use ferry_core::{
    row_size_bytes, Clock, CrudEntry, CrudOp, HlcTimestamp, HybridClock, Limits, RowData, SystemClock, Table, Value,
};
use ferry_protocol::{
    Checkpoint, CheckpointDiff, DataBatch, DataLineWriter, ErrorCode, OpKind, OpOutcome, Outcome, ServerError,
    StreamLine, StreamRequest, UploadRequest, UploadResponse,
};
use ferry_transport::{ServerLine, ServerLineStream, ServerLines, SyncHandler};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch, Semaphore};

use crate::auth::{AuthUser, Authenticator};
use crate::conflict::{ConflictInput, ConflictStrategy, LastWriteWins, Resolution, SideWrite};
use crate::db::{CheckpointState, NewOp, SourceDb, SourceTx, StoredRow};
use crate::error::{Result, ServiceError};
use crate::rules::SyncRules;

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
    /// How far ahead of server time a client HLC may be; later ones are
    /// clamped to server time + this.
    pub max_clock_skew_ms: u64,
    /// Most ops in one upload request.
    pub max_upload_ops: usize,
    /// Most bucket instances one user gets.
    pub max_buckets_per_user: usize,
    /// Longest client id accepted.
    pub max_client_id_bytes: usize,
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
            max_clock_skew_ms: 60_000,
            max_upload_ops: 100_000,
            max_buckets_per_user: 1000,
            max_client_id_bytes: 256,
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
    commits: watch::Sender<u64>,
    shutdown: watch::Sender<bool>,
    streams: Arc<Semaphore>,
}

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
        self.db.migrate(self.rules.schema())?;
        for st in self.rules.strategies() {
            if !self.strategies.contains_key(&st.table) {
                let s = st.build().map_err(|e| ServiceError::Config(e.to_string()))?;
                self.strategies.insert(st.table.clone(), s);
            }
        }
        let hlc = HybridClock::new(self.clock.clone(), "server", self.options.max_clock_skew_ms);
        let streams = Arc::new(Semaphore::new(self.options.max_concurrent_streams));
        Ok(SyncService {
            inner: Arc::new(Inner {
                db: self.db,
                rules: self.rules,
                auth: Authenticator::new(&self.jwt_secret),
                clock: self.clock,
                hlc,
                options: self.options,
                strategies: self.strategies,
                default_strategy: self.default_strategy,
                commits: watch::channel(0).0,
                shutdown: watch::channel(false).0,
                streams,
            }),
        })
    }
}

fn join_error(e: tokio::task::JoinError) -> ServiceError {
    ServiceError::Database(format!("worker task failed: {e}"))
}

impl SyncService {
    /// Start building a service over `db` with `rules`, verifying tokens
    /// signed with `jwt_secret`.
    pub fn builder(db: Arc<dyn SourceDb>, rules: SyncRules, jwt_secret: &str) -> SyncServiceBuilder {
        SyncServiceBuilder {
            db,
            rules,
            jwt_secret: jwt_secret.to_owned(),
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

    /// Verify a bearer token.
    pub fn authenticate(&self, token: &str) -> Result<AuthUser> {
        self.inner.auth.verify(token, self.inner.clock.as_ref())
    }

    /// Ask every stream to end (with a `shutting_down` error line).
    pub fn shutdown(&self) {
        self.inner.shutdown.send_replace(true);
    }

    /// Process an upload for an authenticated user. Each client
    /// transaction commits in one database transaction, together with its
    /// outcomes and the client's write checkpoint.
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
        let user_id = user.user_id.clone();
        let result = tokio::task::spawn_blocking(move || inner.process_upload(&user_id, &request))
            .await
            .map_err(join_error)?;
        // Wake streams even after a partial failure: earlier transactions
        // may have committed.
        self.inner.commits.send_modify(|n| *n = n.wrapping_add(1));
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
        let result = tokio::task::spawn_blocking(move || inner.process_import(ops))
            .await
            .map_err(join_error)?;
        self.inner.commits.send_modify(|c| *c = c.wrapping_add(1));
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
                let _ = tx.send(StreamLine::Error(e.to_server_error()).into()).await;
            }
        });
        Ok(rx)
    }

    /// The checkpoint a client of `user` would get now.
    pub async fn checkpoint(&self, user: &AuthUser, client_id: &str) -> Result<Checkpoint> {
        let buckets = self
            .inner
            .rules
            .user_buckets(&user.claims, self.inner.options.max_buckets_per_user)?;
        let db = self.inner.db.clone();
        let client_id = client_id.to_owned();
        let cp = tokio::task::spawn_blocking(move || db.checkpoint(&client_id, &buckets))
            .await
            .map_err(join_error)??;
        Ok(Checkpoint {
            hlc: None,
            last_op_id: cp.last_op_id,
            write_checkpoint: cp.write_checkpoint,
            buckets: cp.buckets,
        })
    }

    /// Compact one bucket's log in one transaction (its checksum is kept).
    pub async fn compact(&self, bucket: &str) -> Result<CompactStats> {
        let db = self.inner.db.clone();
        let bucket = bucket.to_owned();
        let stats = tokio::task::spawn_blocking(move || compact_bucket(db.as_ref(), &bucket))
            .await
            .map_err(join_error)??;
        self.inner.commits.send_modify(|n| *n = n.wrapping_add(1));
        Ok(stats)
    }

    /// Compact every bucket. Returns the number of buckets compacted.
    pub async fn compact_all(&self) -> Result<usize> {
        let db = self.inner.db.clone();
        let names = tokio::task::spawn_blocking(move || db.bucket_names())
            .await
            .map_err(join_error)??;
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
    db.write(&mut |tx| {
        let entries = tx.bucket_ops(bucket)?;
        let compacted = ferry_protocol::compact(&entries);
        stats = CompactStats {
            entries_before: entries.len(),
            entries_after: compacted.len(),
        };
        if compacted != entries {
            tx.replace_bucket_ops(bucket, &compacted)?;
        }
        Ok(())
    })?;
    Ok(stats)
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

impl Inner {
    fn process_upload(&self, user_id: &str, request: &UploadRequest) -> Result<UploadResponse> {
        let client_id = request.client_id.as_str();
        let mut outcomes = Vec::new();
        let mut write_checkpoint = 0;
        for t in &request.transactions {
            let mut tx_outcomes = Vec::with_capacity(t.ops.len());
            let mut tx_checkpoint = write_checkpoint;
            self.db.write(&mut |stx| {
                tx_outcomes.clear();
                let progress = stx.client(client_id)?;
                if let Some(p) = &progress {
                    if p.user_id != user_id {
                        return Err(ServiceError::Unauthorized(format!(
                            "client id {client_id:?} belongs to another user"
                        )));
                    }
                }
                let mut last_seq = progress.map(|p| p.last_seq);
                for entry in &t.ops {
                    if last_seq.is_some_and(|l| entry.seq <= l) {
                        // Already processed: the stored outcome, nothing applied.
                        let outcome = stx.outcome(client_id, entry.seq)?.unwrap_or(Outcome::Applied);
                        tx_outcomes.push(OpOutcome {
                            seq: entry.seq,
                            outcome,
                        });
                        continue;
                    }
                    let outcome = self.apply_op(stx, client_id, user_id, entry)?;
                    stx.record_outcome(client_id, entry.seq, &outcome)?;
                    last_seq = Some(entry.seq);
                    tx_outcomes.push(OpOutcome {
                        seq: entry.seq,
                        outcome,
                    });
                }
                if let Some(l) = last_seq {
                    stx.set_client(client_id, user_id, l)?;
                    tx_checkpoint = l;
                }
                Ok(())
            })?;
            write_checkpoint = tx_checkpoint;
            outcomes.append(&mut tx_outcomes);
        }
        if request.transactions.is_empty() {
            let db = &self.db;
            db.write(&mut |stx| {
                write_checkpoint = stx.client(client_id)?.map_or(0, |p| p.last_seq);
                Ok(())
            })?;
        }
        Ok(UploadResponse {
            hlc: None,
            outcomes,
            write_checkpoint,
        })
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
        self.db.write(&mut |stx| {
            for entry in &entries {
                if let Outcome::Rejected { reason } = self.apply_op(stx, "", "", entry)? {
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

    /// The op's clock: the client's HLC clamped to server time + max skew,
    /// or a server timestamp when the client sent none.
    fn op_clock(&self, entry: &CrudEntry) -> HlcTimestamp {
        match &entry.hlc {
            Some(h) => {
                let max_wall = self.clock.now_ms().saturating_add(self.options.max_clock_skew_ms);
                let mut h = h.clone();
                if h.wall_ms > max_wall {
                    h.wall_ms = max_wall;
                }
                // Within the skew bound by construction, so this succeeds.
                let _ = self.hlc.observe(&h);
                h
            }
            None => self.hlc.now(),
        }
    }

    fn apply_op(&self, stx: &mut dyn SourceTx, client_id: &str, user_id: &str, entry: &CrudEntry) -> Result<Outcome> {
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
        let hlc = self.op_clock(entry);
        let current = stx.read_row(table, id)?;
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
        // Side writes are validated before anything is written: an invalid
        // one rejects the op.
        let mut side = Vec::with_capacity(decision.side_writes.len());
        for w in &decision.side_writes {
            match self.check_side_write(w) {
                Ok(checked) => side.push(checked),
                Err(reason) => return rejected(reason),
            }
        }
        let old_data = current.as_ref().and_then(|c| c.data.as_ref());
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
        for (side_table, w) in side {
            self.apply_side_write(stx, side_table, w, &hlc)?;
        }
        Ok(match (decision.conflict_id, &outcome) {
            (_, Outcome::Rejected { .. }) | (None, _) => outcome,
            (Some(conflict_id), _) => Outcome::NeedsReview { conflict_id },
        })
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

    /// Apply a checked side write: its columns over the stored row (a new
    /// row has the others NULL), column clocks the later of the stored one
    /// and the op's, then bucket placement and the op log as for any write.
    fn apply_side_write(&self, stx: &mut dyn SourceTx, table: &Table, w: &SideWrite, hlc: &HlcTimestamp) -> Result<()> {
        let current = stx.read_row(table, &w.id)?;
        let (old, mut clocks) = match current {
            Some(StoredRow {
                data: Some(d), clocks, ..
            }) => (Some(d), clocks),
            _ => (None, BTreeMap::new()),
        };
        let mut row = old
            .clone()
            .unwrap_or_else(|| table.columns.iter().map(|c| (c.name.clone(), Value::Null)).collect());
        for (k, v) in &w.data {
            row.insert(k.clone(), v.clone());
            let later = match clocks.get(k) {
                Some(c) if c > hlc => c.clone(),
                _ => hlc.clone(),
            };
            clocks.insert(k.clone(), later);
        }
        stx.write_row(table, &w.id, &row, &clocks)?;
        if old.as_ref() != Some(&row) {
            self.emit_row(stx, &table.name, &w.id, Some(&row))?;
        }
        Ok(())
    }

    /// Append the row's change to the op log: PUT in every bucket it is in
    /// now, REMOVE from every bucket it left.
    fn emit_row(&self, stx: &mut dyn SourceTx, table: &str, id: &str, row: Option<&RowData>) -> Result<()> {
        let new: BTreeSet<String> = row.map(|r| self.rules.row_buckets(table, id, r)).unwrap_or_default();
        let old = stx.row_buckets(table, id)?;
        for b in &new {
            stx.append_op(NewOp {
                bucket: b,
                op: OpKind::Put,
                table,
                row_id: id,
                data: row,
            })?;
        }
        for b in old.difference(&new) {
            stx.append_op(NewOp {
                bucket: b,
                op: OpKind::Remove,
                table,
                row_id: id,
                data: None,
            })?;
        }
        if old != new {
            stx.set_row_buckets(table, id, &new)?;
        }
        Ok(())
    }
}

/// Runs one stream until the client leaves, the token expires or the
/// server shuts down.
async fn run_stream<L: StreamOut>(
    inner: &Arc<Inner>,
    user: &AuthUser,
    client_id: &str,
    buckets: Vec<String>,
    mut positions: BTreeMap<String, u64>,
    tx: &mpsc::Sender<L>,
) -> Result<()> {
    let mut commits = inner.commits.subscribe();
    let mut shutdown = inner.shutdown.subscribe();
    let period = Duration::from_secs(inner.options.keepalive_interval_s.max(1));
    let mut keepalive = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let expires_in_ms = (user.exp_s.saturating_mul(1000)).saturating_sub(inner.clock.now_ms());
    let expiry = tokio::time::sleep(Duration::from_millis(expires_in_ms));
    tokio::pin!(expiry);
    let mut sent: Option<CheckpointState> = None;
    loop {
        commits.borrow_and_update();
        let db = inner.db.clone();
        let (cid, names) = (client_id.to_owned(), buckets.clone());
        let cp = tokio::task::spawn_blocking(move || db.checkpoint(&cid, &names))
            .await
            .map_err(join_error)??;
        if sent.as_ref() != Some(&cp) {
            let changed: Vec<String> = match &sent {
                None => {
                    let line = StreamLine::Checkpoint(Checkpoint {
                        hlc: None,
                        last_op_id: cp.last_op_id,
                        write_checkpoint: cp.write_checkpoint,
                        buckets: cp.buckets.clone(),
                    });
                    if tx.send(line.into()).await.is_err() {
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
                        hlc: None,
                        last_op_id: cp.last_op_id,
                        write_checkpoint: cp.write_checkpoint,
                        updated_buckets: updated.clone(),
                        removed_buckets: Vec::new(),
                    });
                    if tx.send(line.into()).await.is_err() {
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
            if !send_data(inner, work, cp.last_op_id, tx, &shutdown).await? {
                return Ok(());
            }
            for p in positions.values_mut() {
                *p = (*p).max(cp.last_op_id);
            }
            if tx
                .send(
                    StreamLine::CheckpointComplete {
                        last_op_id: cp.last_op_id,
                    }
                    .into(),
                )
                .await
                .is_err()
            {
                return Ok(());
            }
            sent = Some(cp);
        }
        // Wait for a commit, sending keepalives meanwhile.
        loop {
            tokio::select! {
                () = tx.closed() => return Ok(()),
                r = commits.changed() => {
                    if r.is_err() {
                        return Ok(());
                    }
                    break;
                }
                _ = shutdown.changed() => {
                    let _ = tx.send(StreamLine::Error(ServerError {
                        code: ErrorCode::ShuttingDown,
                        message: "server is shutting down".into(),
                    }).into()).await;
                    return Ok(());
                }
                () = &mut expiry => {
                    let _ = tx.send(StreamLine::Error(ServerError {
                        code: ErrorCode::Unauthorized,
                        message: format!("token expired at {}", user.exp_s),
                    }).into()).await;
                    return Ok(());
                }
                _ = keepalive.tick() => {
                    let token_expires_in_s = user.exp_s.saturating_sub(inner.clock.now_ms() / 1000);
                    if tx.send(StreamLine::Keepalive { token_expires_in_s }.into()).await.is_err() {
                        return Ok(());
                    }
                }
            }
        }
    }
}

/// A stream's line type: typed lines ([`StreamLine`], for
/// [`SyncService::open_stream`]) or lines for transports ([`ServerLine`],
/// whose `data` lines are encoded straight from the stored rows).
trait StreamOut: From<StreamLine> + Send + 'static {
    /// The next `data` line of `bucket` after `after_op_id` through
    /// `up_to_op_id`: the line, its entry count and its last op id; `None`
    /// when there is no entry. `size_hint_bytes` carries the size of the
    /// stream's last line to the next (lines of a stream tend to be alike).
    fn read_data(
        db: &dyn SourceDb,
        bucket: &str,
        after_op_id: u64,
        up_to_op_id: u64,
        max_ops: usize,
        max_bytes: usize,
        size_hint_bytes: &mut usize,
    ) -> Result<Option<(Self, usize, u64)>>;
}

impl StreamOut for StreamLine {
    fn read_data(
        db: &dyn SourceDb,
        bucket: &str,
        after_op_id: u64,
        up_to_op_id: u64,
        max_ops: usize,
        max_bytes: usize,
        _size_hint_bytes: &mut usize,
    ) -> Result<Option<(Self, usize, u64)>> {
        let mut ops = db.read_ops(bucket, after_op_id, up_to_op_id, max_ops, max_bytes)?;
        // Measure the encoding (what a transport writes for this line): keep
        // the entries that fit in `max_bytes`, at least one. The rest come
        // in the next line.
        let mut measure = DataLineWriter::new(bucket, 0).with_max_line_bytes(max_bytes);
        let fit = ops.iter().take_while(|e| measure.push_entry(e)).count();
        ops.truncate(fit);
        let Some(last) = ops.last().map(|o| o.op_id) else {
            return Ok(None);
        };
        let n = ops.len();
        let line = StreamLine::Data(DataBatch {
            bucket: bucket.to_owned(),
            ops,
        });
        Ok(Some((line, n, last)))
    }
}

/// Most bytes reserved up front for an encoded `data` line (the size of
/// the stream's previous line, plus some).
const MAX_ENCODED_LINE_RESERVE_BYTES: usize = 16 * 1024 * 1024;

impl StreamOut for ServerLine {
    fn read_data(
        db: &dyn SourceDb,
        bucket: &str,
        after_op_id: u64,
        up_to_op_id: u64,
        max_ops: usize,
        max_bytes: usize,
        size_hint_bytes: &mut usize,
    ) -> Result<Option<(Self, usize, u64)>> {
        let reserve = size_hint_bytes.saturating_add(*size_hint_bytes / 8);
        let reserve = reserve.min(MAX_ENCODED_LINE_RESERVE_BYTES).min(max_bytes);
        // The writer itself refuses entries past `max_bytes` of encoded
        // line, whatever the database pushes, so the last op id is the
        // writer's (the database's may name an entry it refused).
        let mut line = DataLineWriter::new(bucket, reserve).with_max_line_bytes(max_bytes);
        db.read_ops_into(bucket, after_op_id, up_to_op_id, max_ops, max_bytes, &mut line)?;
        let Some(last) = line.last_op_id() else {
            return Ok(None);
        };
        let n = line.ops();
        let bytes = line.finish();
        *size_hint_bytes = bytes.len();
        Ok(Some((ServerLine::Encoded(bytes), n, last)))
    }
}

/// Sends the entries of each `(bucket, after_op_id)` up to `last_op_id`
/// from a blocking thread, in bounded lines. Returns false when the client
/// left (or the server is shutting down).
async fn send_data<L: StreamOut>(
    inner: &Arc<Inner>,
    work: Vec<(String, u64)>,
    last_op_id: u64,
    tx: &mpsc::Sender<L>,
    shutdown: &watch::Receiver<bool>,
) -> Result<bool> {
    if work.is_empty() {
        return Ok(true);
    }
    let db = inner.db.clone();
    let (max_ops, max_bytes) = (
        inner.options.max_ops_per_line.max(1),
        inner.options.max_line_bytes.max(1),
    );
    let tx = tx.clone();
    let shutdown = shutdown.clone();
    tokio::task::spawn_blocking(move || {
        let mut size_hint_bytes = 0;
        for (bucket, mut pos) in work {
            loop {
                if *shutdown.borrow() {
                    return Ok(false);
                }
                let Some((line, n, last)) = L::read_data(
                    db.as_ref(),
                    &bucket,
                    pos,
                    last_op_id,
                    max_ops,
                    max_bytes,
                    &mut size_hint_bytes,
                )?
                else {
                    break;
                };
                pos = last;
                let full = n >= max_ops;
                if tx.blocking_send(line).is_err() {
                    return Ok(false);
                }
                if !full && pos >= last_op_id {
                    break;
                }
            }
        }
        Ok(true)
    })
    .await
    .map_err(join_error)?
}

#[async_trait]
impl SyncHandler for SyncService {
    async fn stream(&self, token: &str, request: StreamRequest) -> Result<ServerLines, ServerError> {
        let user = self.authenticate(token)?;
        Ok(self.open_stream(user, request)?)
    }

    async fn stream_lines(&self, token: &str, request: StreamRequest) -> Result<ServerLineStream, ServerError> {
        let user = self.authenticate(token)?;
        Ok(self.open_stream_lines(user, request)?)
    }

    async fn upload(&self, token: &str, request: UploadRequest) -> Result<UploadResponse, ServerError> {
        let user = self.authenticate(token)?;
        Ok(SyncService::upload(self, &user, request).await?)
    }
}
