//! The Ferry client: a [`Database`] over any [`Store`] that reads and writes
//! locally, online or not, and syncs in the background once connected.
//!
//! - Writes go through [`Database::write`] (the visible state and the
//!   upload queue change in one storage transaction) and wake the upload
//!   loop.
//! - [`Database::connect`] starts two tokio tasks on a [`Transport`]:
//!   the download loop feeds stream lines to the protocol's
//!   [`Download`](ferry_protocol::Download) state machine and applies each
//!   validated checkpoint to the synced layer in one batch, rebasing
//!   pending writes (planned as typed [`ferry_queue::ServerChanges`] that
//!   [`LocalDb::apply_server_changes`] commits); the upload loop sends
//!   whole queued transactions in order, retries with backoff, completes
//!   entries only after the server answered, rolls rejected writes back
//!   and reports every outcome.
//! - [`Credentials`] is the app's callback for bearer tokens; it is asked
//!   again (with `refresh = true`) when the server refuses a token or the
//!   stream says it expires soon.
//!
//! Invariants: a checkpoint is applied only after every bucket checksum
//! validated, atomically with the queue confirmation and the rebase; an
//! upload batch holds whole transactions in queue order; no write the app
//! saw succeed is dropped without an outcome; this crate reaches the store
//! only through [`LocalDb`] (its reads, its staging area and
//! `apply_server_changes`), never through `LocalDb::store()`.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use ferry_core::{Clock, ErrorKind, SystemClock};
use ferry_protocol::{Download, DownloadLimits, OpOutcome, ProtocolError};
use ferry_queue::{LocalDb, LocalDbOptions, QueueError};
use ferry_store::{Store, StoreError};
use ferry_transport::TransportError;
use parking_lot::Mutex;
use thiserror::Error;
use tokio::sync::{broadcast, watch, Notify};

pub mod apply;
mod conflicts;
mod control;
mod lines;
mod live;
mod offline;
mod outcomes;
mod stager;
mod sync;

pub use ferry_queue::META_RESETTING;
pub use stager::MAX_STAGE_BATCH_OPS;

pub use conflicts::{conflicts_table, Conflict, Resolution, CONFLICTS_TABLE, STATUS_OPEN, STATUS_RESOLVED};
pub use ferry_query::{self as query, Diff, Explain, Query, QueryResult};
pub use live::LiveQuery;
pub use offline::{ChangeKind, OfflinePolicy, ProposedChange};

pub use ferry_queue::{ChangeSource, ChangedRows, Rejection, RowChange, WriteReceipt, WriteTx};

/// Client errors.
#[derive(Debug, Error)]
pub enum ClientError {
    /// A local write or read failed.
    #[error(transparent)]
    Queue(#[from] QueueError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The transport failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The protocol was violated or the server reported an error.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// A query is invalid (unknown collection or column, a limit).
    #[error(transparent)]
    Query(#[from] ferry_query::QueryError),
    /// The app's credentials callback failed.
    #[error("credentials unavailable: {0}")]
    Credentials(String),
    /// A background task failed to run.
    #[error("background task failed: {0}")]
    Task(String),
    /// A query or live query call from inside a live query callback of
    /// the same database, which would wait for itself.
    #[error("{0} from inside a live query callback of this database (it would deadlock): keep the diff, or send it on a channel and call after the callback returns")]
    Reentrant(String),
    /// The staging area does not hold the ops a validated checkpoint
    /// counted for a bucket: the checkpoint is not applied, and the
    /// bucket's ops are downloaded again.
    #[error("staged ops of bucket {bucket:?} differ from the checkpoint ({found} staged, {expected} validated): downloading them again")]
    StagingMismatch {
        /// The bucket.
        bucket: String,
        /// Ops the checkpoint validated.
        expected: u64,
        /// Ops the staging area holds.
        found: u64,
    },
}

impl ClientError {
    /// Whether retrying can help.
    pub fn kind(&self) -> ErrorKind {
        match self {
            ClientError::Queue(e) => e.kind(),
            ClientError::Store(e) => e.kind(),
            ClientError::Transport(e) => e.kind(),
            ClientError::Protocol(e) => e.kind(),
            ClientError::Query(e) => e.kind(),
            ClientError::Credentials(_) | ClientError::Task(_) | ClientError::StagingMismatch { .. } => {
                ErrorKind::Transient
            }
            ClientError::Reentrant(_) => ErrorKind::Permanent,
        }
    }
}

/// The app's source of bearer tokens.
#[async_trait]
pub trait Credentials: Send + Sync {
    /// A token for the sync server. `refresh` is true when the last one was
    /// refused or is about to expire: fetch a new one.
    async fn token(&self, refresh: bool) -> Result<String, ClientError>;
}

/// A fixed token, for tests and examples.
#[derive(Clone, Debug)]
pub struct StaticToken(pub String);

#[async_trait]
impl Credentials for StaticToken {
    async fn token(&self, _refresh: bool) -> Result<String, ClientError> {
        Ok(self.0.clone())
    }
}

/// What the sync engine is doing, observable through
/// [`Database::watch_status`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncStatus {
    /// A download stream is open.
    pub connected: bool,
    /// A connection attempt is under way.
    pub connecting: bool,
    /// A checkpoint is being downloaded.
    pub downloading: bool,
    /// An upload is in flight.
    pub uploading: bool,
    /// When the last checkpoint was applied (client clock, ms).
    pub last_synced_at_ms: Option<u64>,
    /// Whether any checkpoint was ever applied in this session.
    pub has_synced: bool,
    /// The last op id of the last applied checkpoint.
    pub last_applied_op_id: Option<u64>,
    /// The last download error, cleared by the next applied checkpoint.
    pub last_download_error: Option<String>,
    /// The last upload error, cleared by the next answered upload.
    pub last_upload_error: Option<String>,
    /// The server's newest op id as of the last checkpoint it announced
    /// (the client has caught up when `last_applied_op_id` reaches it).
    pub server_op_id: Option<u64>,
    /// Download streams opened since the database was opened.
    pub streams_opened: u64,
    /// Uploads are paused by the app ([`Database::pause_uploads`]).
    pub uploads_paused: bool,
    /// The download stream is paused by the app
    /// ([`Database::pause_downloads`]).
    pub downloads_paused: bool,
    /// The download of the checkpoint under way: ops received of ops
    /// expected, per bucket and in total, from the counts the checkpoint
    /// carries (`None` once it is applied, and before any checkpoint).
    pub download_progress: Option<ferry_protocol::DownloadProgress>,
    /// Local ops waiting for the server's answer (the upload queue).
    /// The upload fields are read from the queue by [`Database::status`];
    /// [`Database::watch_status`] leaves them at zero.
    pub pending_ops: u64,
    /// Local transactions waiting for the server's answer.
    pub pending_transactions: u64,
    /// How long the oldest waiting op has waited (client clock, ms).
    pub oldest_pending_age_ms: Option<u64>,
}

/// What the server did with an uploaded write.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct UploadOutcome {
    /// The local transaction.
    pub tx_id: u64,
    /// The outcome of one op.
    pub outcome: OpOutcome,
}

/// What changed in the visible state, for live queries and UIs: the rows
/// whose visible value may have changed, in commit order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    /// A local write, server data, or a rollback of rejected writes.
    pub source: ChangeSource,
    /// The rows, as `(table, id)`.
    pub rows: Arc<ChangedRows>,
}

/// Client settings.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Options of the local database.
    pub local: LocalDbOptions,
    /// Most queue entries in one upload (whole transactions are never
    /// split, so a larger transaction goes alone).
    pub upload_batch_entries: usize,
    /// First retry delay.
    pub retry_initial_delay_ms: u64,
    /// Largest retry delay.
    pub retry_max_delay_ms: u64,
    /// Seed of the retry jitter.
    pub jitter_seed: u64,
    /// Bounds of the download state.
    pub download_limits: DownloadLimits,
    /// Longest stream line accepted.
    pub max_line_bytes: usize,
    /// How often the upload loop looks at the queue when nothing woke it.
    pub upload_poll_interval_ms: u64,
    /// How long [`Database::disconnect`] waits for the loops to stop
    /// gracefully (an upload in flight to be answered) before aborting.
    pub stop_timeout_ms: u64,
    /// Most bytes of downloaded ops held in memory on their way to the
    /// store's staging area (received, not yet written): past it the
    /// download waits for the disk. Memory for a first sync stays about
    /// this, however many rows it brings. Default 16 MB: the store's
    /// writer is the slower end of the pipeline, so a larger budget only
    /// fills up (64 MB gave the same throughput and about 50 MB more
    /// resident memory); it absorbs the network's jitter, not its speed.
    pub staging_memory_bytes: usize,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            local: LocalDbOptions::default(),
            upload_batch_entries: 1_000,
            retry_initial_delay_ms: 50,
            retry_max_delay_ms: 10_000,
            jitter_seed: 0x5eed,
            download_limits: DownloadLimits::default(),
            max_line_bytes: ferry_protocol::DEFAULT_MAX_LINE_BYTES,
            upload_poll_interval_ms: 1_000,
            stop_timeout_ms: 5_000,
            staging_memory_bytes: 16 * 1024 * 1024,
        }
    }
}

pub(crate) struct Inner {
    pub(crate) local: LocalDb,
    pub(crate) download: Mutex<Download>,
    pub(crate) status: watch::Sender<SyncStatus>,
    pub(crate) outcomes: broadcast::Sender<UploadOutcome>,
    pub(crate) changes: broadcast::Sender<Change>,
    pub(crate) upload_wake: Notify,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) options: ClientOptions,
    pub(crate) live: live::SharedLive,
    pub(crate) offline_policy: parking_lot::RwLock<Option<Arc<offline::OfflinePolicy>>>,
    /// Which loops the app paused, and requests for a fresh stream.
    pub(crate) control: watch::Sender<control::Control>,
    /// Live queries dropped inside a write of this database (in their
    /// callbacks), ended after the callbacks.
    pub(crate) live_dropped: Mutex<Vec<live::LiveId>>,
    /// Held while a checkpoint applies (on its blocking thread); a stream
    /// session waits for it before it reads the download state.
    pub(crate) applying: Arc<tokio::sync::Mutex<()>>,
    /// Held while an upload answer is stored and its outcomes broadcast (on
    /// a blocking thread, which an aborted connection leaves running): a
    /// later connection that sent the same writes again, before that answer
    /// was stored, broadcasts only the outcomes it newly stored.
    pub(crate) answering: Mutex<()>,
    /// Store writes still running on blocking threads (see
    /// [`StoreWork`]); the last handle's drop waits for them.
    pub(crate) store_work: Arc<StoreWork>,
}

impl Inner {
    pub(crate) fn update_status(&self, f: impl FnOnce(&mut SyncStatus)) {
        self.status.send_modify(f);
    }

    /// Every committed change of the visible state: live queries first
    /// (their callbacks run here), then the change broadcast.
    fn on_change(&self, source: ChangeSource, rows: &[RowChange]) {
        self.end_dropped_live_queries();
        {
            let _calling = ferry_core::inside::Inside::enter(&live::CALLING_BACK, self);
            if let Err(e) = self.live.lock().on_change(&self.local, rows) {
                tracing::error!(error = %e, "live queries could not take a change");
            }
        }
        self.end_dropped_live_queries();
        // Copying the rows costs per row: only when someone listens.
        if self.changes.receiver_count() > 0 {
            let _ = self.changes.send(Change {
                source,
                rows: Arc::new(rows.iter().map(|c| (c.table.clone(), c.id.clone())).collect()),
            });
        }
    }
}

impl Inner {
    /// End the live queries dropped inside a write (see `LiveQuery`'s drop).
    fn end_dropped_live_queries(&self) {
        let dropped = std::mem::take(&mut *self.live_dropped.lock());
        if !dropped.is_empty() {
            let mut live = self.live.lock();
            for id in dropped {
                live.remove(id);
            }
        }
    }
}

/// Capacity of the outcome and change channels; slow subscribers miss the
/// oldest messages (and are told so by the channel).
const CHANNEL_CAPACITY: usize = 4_096;

/// A client database.
#[derive(Clone)]
pub struct Database {
    inner: Arc<Inner>,
    tasks: Arc<Mutex<Option<control::Connection>>>,
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Database")
            .field("client_id", &self.inner.local.client_id())
            .field("status", &*self.inner.status.borrow())
            .finish_non_exhaustive()
    }
}

impl Database {
    /// Open over a store (its schema is the client schema).
    pub fn open(store: Arc<dyn Store>, options: ClientOptions) -> Result<Self, ClientError> {
        let clock = options.local.clock.clone();
        // Download data is staged in the store as it arrives: resume from
        // what an earlier run staged.
        let local = LocalDb::open_with(store, options.local.clone())?;
        let download = stager::restore_download(&local, options.download_limits.clone())?;
        let (status, _) = watch::channel(SyncStatus::default());
        let (outcomes, _) = broadcast::channel(CHANNEL_CAPACITY);
        let (changes, _) = broadcast::channel::<Change>(CHANNEL_CAPACITY);
        let inner = Arc::new(Inner {
            local,
            download: Mutex::new(download),
            status,
            outcomes,
            changes,
            upload_wake: Notify::new(),
            clock,
            options,
            live: Mutex::new(live::LiveState::default()),
            offline_policy: parking_lot::RwLock::new(None),
            control: watch::channel(control::Control::default()).0,
            live_dropped: Mutex::new(Vec::new()),
            applying: Arc::new(tokio::sync::Mutex::new(())),
            answering: Mutex::new(()),
            store_work: Arc::default(),
        });
        // The observer holds the database weakly: the local database it is
        // set on lives inside `Inner`.
        let weak = Arc::downgrade(&inner);
        inner
            .local
            .set_observer(Some(Arc::new(move |source, rows: &[RowChange]| {
                if let Some(inner) = weak.upgrade() {
                    inner.on_change(source, rows);
                }
            })));
        // A first sync's rows are read back for live queries and change
        // subscribers only when there are some.
        let weak = Arc::downgrade(&inner);
        inner.local.set_observer_interest(Some(Arc::new(move || {
            weak.upgrade()
                .is_some_and(|inner| inner.changes.receiver_count() > 0 || inner.live.lock().wants_changes())
        })));
        Ok(Database {
            inner,
            tasks: Arc::new(Mutex::new(None)),
        })
    }

    /// Open over a store with default options and the system clock.
    pub fn open_default(store: Arc<dyn Store>) -> Result<Self, ClientError> {
        Self::open(
            store,
            ClientOptions {
                local: LocalDbOptions {
                    clock: Arc::new(SystemClock),
                    ..LocalDbOptions::default()
                },
                ..ClientOptions::default()
            },
        )
    }

    /// The local database: reads of the visible state, the queue.
    pub fn local(&self) -> &LocalDb {
        &self.inner.local
    }

    /// This client's id.
    pub fn client_id(&self) -> &str {
        self.inner.local.client_id()
    }

    /// Write locally (see [`LocalDb::write`]) and wake the upload loop.
    /// While offline, an installed [`OfflinePolicy`] may refuse the whole
    /// transaction ([`QueueError::Refused`]; nothing is written).
    pub fn write<R, E, F>(&self, f: F) -> Result<R, E>
    where
        F: FnOnce(&mut WriteTx<'_>) -> Result<R, E>,
        E: From<QueueError>,
    {
        self.write_with_receipt(f).map(|(value, _)| value)
    }

    /// [`write`](Self::write), also returning which queue entries the
    /// transaction produced (`None` when it queued nothing): its
    /// [`WriteReceipt::tx_id`] is the `tx_id` of its outcomes, and its seq
    /// range finds them in [`Database::outcomes_since`].
    pub fn write_with_receipt<R, E, F>(&self, f: F) -> Result<(R, Option<WriteReceipt>), E>
    where
        F: FnOnce(&mut WriteTx<'_>) -> Result<R, E>,
        E: From<QueueError>,
    {
        let r = match self.offline_policy_in_force() {
            Some(policy) => self.inner.local.write_checked(f, |tx| policy.check(tx))?,
            None => self.inner.local.write_with_receipt(f)?,
        };
        self.inner.upload_wake.notify_one();
        Ok(r)
    }

    /// The current sync status, with the upload side read from the queue
    /// (ops and transactions waiting for the server's answer, and how
    /// long the oldest has waited; two reads of the queue's ends).
    pub fn status(&self) -> SyncStatus {
        let mut status = self.inner.status.borrow().clone();
        let local = &self.inner.local;
        status.pending_ops = local.upload_queue_len();
        if status.pending_ops > 0 {
            if let Ok(Some((first, last))) = local.upload_queue_ends() {
                // Transaction ids are consecutive over the transactions that
                // queued something, and the waiting ones are the newest.
                status.pending_transactions = last.tx_id.saturating_sub(first.tx_id) + 1;
                status.oldest_pending_age_ms = first
                    .hlc
                    .map(|hlc| self.inner.clock.now_ms().saturating_sub(hlc.wall_ms));
            }
        }
        status
    }

    /// A receiver that sees every status change.
    pub fn watch_status(&self) -> watch::Receiver<SyncStatus> {
        self.inner.status.subscribe()
    }

    /// Every upload outcome from now on.
    pub fn subscribe_outcomes(&self) -> broadcast::Receiver<UploadOutcome> {
        self.inner.outcomes.subscribe()
    }

    /// Every change of the visible state from now on.
    pub fn subscribe_changes(&self) -> broadcast::Receiver<Change> {
        self.inner.changes.subscribe()
    }

    /// Writes the server refused, with reasons (see
    /// [`LocalDb::rejections`]).
    pub fn rejections(&self) -> Result<Vec<Rejection>, ClientError> {
        Ok(self.inner.local.rejections()?)
    }

    /// Wait until the status satisfies `pred` or `timeout_ms` passes;
    /// returns whether it did.
    pub async fn wait_for_status(&self, timeout_ms: u64, pred: impl Fn(&SyncStatus) -> bool) -> bool {
        let mut rx = self.watch_status();
        tokio::time::timeout(Duration::from_millis(timeout_ms), async {
            loop {
                if pred(&rx.borrow_and_update()) {
                    return true;
                }
                if rx.changed().await.is_err() {
                    return false;
                }
            }
        })
        .await
        .unwrap_or(false)
    }

    /// Wait until every local write is uploaded and confirmed by an applied
    /// checkpoint, or `timeout_ms` passes; returns whether it happened.
    pub async fn wait_until_settled(&self, timeout_ms: u64) -> bool {
        let deadline = tokio::time::Instant::now() + Duration::from_millis(timeout_ms);
        let mut rx = self.watch_status();
        loop {
            let pending = self.inner.local.pending_len().unwrap_or(1);
            if pending == 0 && rx.borrow_and_update().has_synced {
                return true;
            }
            // The pending count can drop without a status change after it
            // (a checkpoint confirming refused writes): look again at
            // least every `SETTLE_RECHECK_MS`.
            let recheck = tokio::time::Instant::now() + Duration::from_millis(SETTLE_RECHECK_MS);
            let _ = tokio::time::timeout_at(recheck.min(deadline), rx.changed()).await;
            if tokio::time::Instant::now() >= deadline {
                return self.inner.local.pending_len().unwrap_or(1) == 0 && rx.borrow().has_synced;
            }
        }
    }
}

/// Longest [`Database::wait_until_settled`] waits before it looks at the
/// pending count again without a status change.
const SETTLE_RECHECK_MS: u64 = 50;

impl Drop for Database {
    fn drop(&mut self) {
        // The last handle going away stops the background tasks.
        if Arc::strong_count(&self.tasks) == 1 {
            self.stop_tasks();
            // An answer or a checkpoint being stored runs on to its end on
            // a blocking thread, with the counters and rows it read before:
            // wait for it (at most `stop_timeout_ms`), so that a database
            // the app opens on the same store right after never races a
            // commit of this one (it would drop queue entries the new one
            // counted, or write back what it read). Not from inside a
            // callback of one of those commits: it would wait for itself.
            if !self.inner.local.writing_on_this_thread() {
                let timeout = Duration::from_millis(self.inner.options.stop_timeout_ms);
                if !self.inner.store_work.wait_idle(timeout) {
                    tracing::warn!("a store write of the dropped database is still running");
                }
            }
        }
    }
}

/// Store writes running on blocking threads (upload answers, checkpoints),
/// which stopping a connection leaves running to their end.
#[derive(Debug, Default)]
pub(crate) struct StoreWork {
    running: Mutex<usize>,
    idle: parking_lot::Condvar,
}

impl StoreWork {
    /// Count a store write until the returned guard is dropped.
    pub(crate) fn begin(self: &Arc<Self>) -> StoreJob {
        *self.running.lock() += 1;
        StoreJob(self.clone())
    }

    /// Wait until no counted store write runs; `false` after `timeout`.
    fn wait_idle(&self, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        let mut running = self.running.lock();
        while *running > 0 {
            if self.idle.wait_until(&mut running, deadline).timed_out() {
                return *running == 0;
            }
        }
        true
    }
}

/// One counted store write (see [`StoreWork::begin`]).
pub(crate) struct StoreJob(Arc<StoreWork>);

impl Drop for StoreJob {
    fn drop(&mut self) {
        let mut running = self.0.running.lock();
        *running = running.saturating_sub(1);
        if *running == 0 {
            self.0.idle.notify_all();
        }
    }
}
