//! Local writes and the durable upload queue, over any [`Store`].
//!
//! [`LocalDb::write`] runs a closure over a [`WriteTx`]: every insert,
//! update and delete it makes, across tables, changes the visible state and
//! appends to the upload queue in **one** store batch, so a write the app
//! saw succeed is never half-applied and never lost.
//!
//! How the layers move:
//! - a write puts the row as it now looks into the store's overlay and
//!   appends a [`CrudEntry`] to the queue (local-only tables write their
//!   rows straight to the store's base layer and queue nothing;
//!   insert-only tables queue and keep nothing);
//! - [`LocalDb::complete`] records that the server answered for entries
//!   through a seq: they leave the upload queue (no longer read, counted or
//!   sent) but stay stored, because until a checkpoint confirms them they
//!   are still replayed on top of new synced data;
//! - [`LocalDb::confirm_through`] drops entries a server checkpoint covers
//!   and rebases the rows they touched: the overlay becomes the synced row
//!   with the remaining pending entries replayed, or goes away.
//!
//! Server data comes in as typed [`ServerChanges`] (a validated
//! checkpoint's rows, bucket bookkeeping and staged switch-ins):
//! [`LocalDb::apply_server_changes`] turns them into the store batch
//! itself, with the confirmation and rebase. Downloads are staged through
//! [`LocalDb::staging_area`]. A client needs no other way to the store.
//!
//! Invariants: seqs are strictly increasing and never reused, even after
//! the queue empties or the process restarts; entries of one transaction
//! are contiguous; one `write` is one store batch; one checkpoint is one
//! store batch.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use ferry_core::{
    Clock, CoreError, CrudEntry, CrudOp, ErrorKind, HlcTimestamp, HybridClock, Limits, RandomSource, RowData, Schema,
    SeededRandom, SystemClock, Table, Value,
};
use ferry_store::{BatchOp, OverlayEntry, Store, StoreError, WriteBatch};
use parking_lot::{Mutex, RwLock};
use thiserror::Error;

mod answer;
mod os_random;
mod overlay_index;
#[cfg(feature = "planted-bugs")]
pub mod planted;
mod record;
mod server_changes;
mod staged;
mod staging;

pub use answer::{Answer, WriteReceipt, META_OUTCOME_PREFIX};
pub use record::{record_from_row, record_to_row, Record};
pub use server_changes::ServerChanges;
pub use staged::StagedSwitch;
pub use staging::{StagingArea, StagingBatch, META_RESETTING};

/// Metadata key holding the next client sequence number.
pub const META_NEXT_SEQ: &str = "ferry.queue.next_seq";
/// Metadata key holding the next local transaction id.
pub const META_NEXT_TX: &str = "ferry.queue.next_tx_id";
/// Metadata key holding the seqs the server rejected (not yet confirmed).
pub const META_REJECTED_SEQS: &str = "ferry.queue.rejected_seqs";
/// Metadata key holding the seqs of transactions the server refused whole
/// (it never saw them, so no write checkpoint will cover them): they are
/// confirmed as soon as every earlier entry is.
pub const META_UNSEEN_SEQS: &str = "ferry.queue.unseen_seqs";
/// Metadata key holding the rejections log.
pub const META_REJECTIONS: &str = "ferry.queue.rejections";
/// Metadata key holding this database's client id.
pub const META_CLIENT_ID: &str = "ferry.client_id";
/// Metadata key holding the hybrid logical clock's high-water mark (the
/// latest timestamp stamped on a write or seen from the server), so a
/// restarted client never stamps a write older than one it made or saw.
pub const META_HLC: &str = "ferry.hlc";
/// Metadata key holding the last seq the server answered for.
pub const META_COMPLETED_THROUGH: &str = "ferry.queue.completed_through";

/// Errors of local writes and the upload queue.
#[derive(Debug, Error)]
pub enum QueueError {
    /// A schema check failed: unknown table or column, wrong type, bad id,
    /// oversized row.
    #[error(transparent)]
    Schema(#[from] CoreError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// `insert` of a row that already exists.
    #[error("row {table}/{id} already exists")]
    RowExists {
        /// The table.
        table: String,
        /// The row id.
        id: String,
    },
    /// `update` of a row that does not exist.
    #[error("row {table}/{id} does not exist")]
    RowMissing {
        /// The table.
        table: String,
        /// The row id.
        id: String,
    },
    /// An update or delete on an insert-only table, which keeps no rows.
    #[error("table {table:?} is insert-only: {op} is not allowed")]
    InsertOnly {
        /// The table.
        table: String,
        /// The refused operation.
        op: &'static str,
    },
    /// The transaction holds more ops than the limit.
    #[error("transaction has {count} operations, over the limit of {limit}")]
    TooManyOps {
        /// Ops in the transaction.
        count: usize,
        /// The limit.
        limit: usize,
    },
    /// The upload queue is full; uploads must drain it first.
    #[error("upload queue holds {len} entries, the limit is {limit}")]
    QueueFull {
        /// Entries in the queue.
        len: u64,
        /// The limit.
        limit: u64,
    },
    /// `complete` or `confirm_through` named a seq that does not fit.
    #[error("invalid seq {seq}: {reason}")]
    InvalidSeq {
        /// The seq given.
        seq: u64,
        /// Why it is refused.
        reason: &'static str,
    },
    /// A pre-commit check (see [`LocalDb::write_checked`]) refused the
    /// transaction; nothing was written.
    #[error("{reason}")]
    Refused {
        /// Why, naming the refused change.
        reason: String,
    },
    /// A write from inside a write of the same database (its closure, or a
    /// change observer or live query callback it runs), which would wait
    /// for itself forever.
    #[error("a write to this database from inside one of its writes or change callbacks (it would deadlock): write after it returns, or send the change on a channel")]
    Reentrant,
    /// The operating system's random source failed (client id generation).
    #[error("no random bytes from the operating system: {0}")]
    Random(String),
    /// A record could not be converted to or from a row.
    #[error("record for table {table:?}: {message}")]
    Record {
        /// The table.
        table: String,
        /// What went wrong.
        message: String,
    },
}

impl QueueError {
    /// Whether a retry can help.
    pub fn kind(&self) -> ErrorKind {
        match self {
            QueueError::Store(e) => e.kind(),
            QueueError::QueueFull { .. } => ErrorKind::Transient,
            _ => ErrorKind::Permanent,
        }
    }
}

/// Result of queue calls.
pub type QueueResult<T> = Result<T, QueueError>;

/// A local write the server refused, kept for the app to show.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Rejection {
    /// The refused entry.
    pub entry: CrudEntry,
    /// The server's reason.
    pub reason: String,
    /// When the answer arrived (ms since the epoch, from the client clock).
    pub at_ms: u64,
}

fn encode_seqs(seqs: &BTreeSet<u64>) -> Vec<u8> {
    seqs.iter().flat_map(|s| s.to_be_bytes()).collect()
}

fn encode_rejections(log: &[Rejection]) -> QueueResult<Vec<u8>> {
    serde_json::to_vec(log).map_err(|e| StoreError::Corrupt(format!("encoding the rejections log: {e}")).into())
}

/// The queued ops of one local transaction.
#[derive(Clone, Debug, PartialEq)]
pub struct QueuedTransaction {
    /// The local transaction id.
    pub tx_id: u64,
    /// Its entries, in seq order.
    pub entries: Vec<CrudEntry>,
}

#[derive(Debug)]
struct Counters {
    next_seq: u64,
    next_tx_id: u64,
    /// Last seq the server answered for (0: none).
    completed_through: u64,
    /// Entries with seq > completed_through.
    upload_len: u64,
    /// Entries stored (waiting for upload, or answered and not yet
    /// confirmed), kept here so writes never count the queue.
    stored_len: u64,
    /// The highest write checkpoint of an applied server checkpoint.
    server_write_checkpoint: u64,
}

/// The counters as of the last commit, read without the write lock: a
/// reader never waits for a write, and a change observer or live query
/// callback (which run in a commit's report turn, while the next write
/// may hold the lock) reads them without waiting.
#[derive(Debug, Default)]
struct CounterView {
    last_seq: AtomicU64,
    completed_through: AtomicU64,
    upload_len: AtomicU64,
    stored_len: AtomicU64,
}

impl CounterView {
    fn publish(&self, c: &Counters) {
        self.last_seq.store(c.next_seq.saturating_sub(1), Ordering::Release);
        self.completed_through.store(c.completed_through, Ordering::Release);
        self.upload_len.store(c.upload_len, Ordering::Release);
        self.stored_len.store(c.stored_len, Ordering::Release);
    }
}

std::thread_local! {
    /// The databases whose write lock this thread holds.
    static WRITING: ferry_core::inside::Marks = ferry_core::inside::Marks::default();
}

/// A database's write lock (its counters), held by this thread: a second
/// write on the same thread is refused instead of waiting for itself.
struct WriteLock<'a> {
    _writing: ferry_core::inside::Inside,
    counters: parking_lot::MutexGuard<'a, Counters>,
    /// Published again when the lock is let go.
    view: &'a CounterView,
}

impl std::ops::Deref for WriteLock<'_> {
    type Target = Counters;
    fn deref(&self) -> &Counters {
        &self.counters
    }
}

impl std::ops::DerefMut for WriteLock<'_> {
    fn deref_mut(&mut self) -> &mut Counters {
        &mut self.counters
    }
}

impl Drop for WriteLock<'_> {
    fn drop(&mut self) {
        self.view.publish(&self.counters);
    }
}

impl<'a> WriteLock<'a> {
    /// Let go of the write lock, keeping the turn to tell the observer of
    /// this commit: the turn is taken before the lock is let go, so turns
    /// follow commit order, and the next write commits to the store while
    /// this one's changes are told (live queries run outside the lock).
    fn hand_over(self, db: &'a LocalDb) -> ReportTurn<'a> {
        let turn = db.report_turn.lock();
        // The thread stays inside a write of `db` until the turn ends: a
        // write from the observer is refused, not a wait for its own turn.
        let writing = ferry_core::inside::Inside::enter(&WRITING, db);
        let through_seq = self.counters.next_seq.saturating_sub(1);
        drop(self);
        ReportTurn {
            _writing: writing,
            _turn: turn,
            db,
            through_seq,
        }
    }
}

/// A commit's turn to tell the observer of its changes, after the write
/// lock was let go ([`WriteLock::hand_over`]). When it ends, the queue
/// entries of the commits told so far may be uploaded: an entry is never
/// uploaded (and so never answered and rolled back) before live queries
/// and change subscribers saw it written.
struct ReportTurn<'a> {
    _writing: ferry_core::inside::Inside,
    _turn: parking_lot::MutexGuard<'a, ()>,
    db: &'a LocalDb,
    /// The last seq queued when this commit let go of the write lock.
    through_seq: u64,
}

impl Drop for ReportTurn<'_> {
    fn drop(&mut self) {
        self.db.reported_seq.fetch_max(self.through_seq, Ordering::AcqRel);
    }
}

/// A local database: reads of the visible state and transactional writes
/// that feed the upload queue.
pub struct LocalDb {
    store: Arc<dyn Store>,
    limits: Limits,
    max_outcomes_kept: u64,
    client_id: String,
    hlc: HybridClock<Arc<dyn Clock>>,
    counters: Mutex<Counters>,
    /// The counters as of the last commit (see [`CounterView`]).
    view: CounterView,
    /// Held while a commit's changes are told to the observer: taken
    /// under the write lock, which is then let go (see [`ReportTurn`]).
    report_turn: Mutex<()>,
    /// The last queued seq whose commit the observer was told of: the
    /// upload reads no entry past it (see [`LocalDb::next_batch`]).
    reported_seq: AtomicU64,
    observer: RwLock<Option<Observer>>,
    /// Whether the observer wants the rows a staged checkpoint switched in
    /// (see [`LocalDb::set_observer_interest`]).
    interest: RwLock<Option<Interest>>,
    /// The overlay's ids and index keys (loaded tables), kept in step by
    /// every batch this type applies.
    overlay: overlay_index::OverlayIndex,
}

impl std::fmt::Debug for LocalDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalDb")
            .field("client_id", &self.client_id)
            .field("store", &self.store)
            .field("counters", &self.view)
            .finish_non_exhaustive()
    }
}

/// Rows as `(table, id)`.
pub type ChangedRows = BTreeSet<(String, String)>;

/// Where a change of the visible state came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ChangeSource {
    /// A local write.
    LocalWrite,
    /// Server data (a checkpoint) or a confirmation of pending writes.
    Server,
    /// Rejected writes rolled back.
    Rollback,
}

/// One changed row of the visible state, as the commit left it: observers
/// take it as is, without reading the store back.
#[derive(Clone, Debug, PartialEq)]
pub struct RowChange {
    /// The table.
    pub table: String,
    /// The row id.
    pub id: String,
    /// The visible row now; `None` when it is gone (deleted, or deleted
    /// by pending writes).
    pub row: Option<RowData>,
    /// Whether pending local writes shape the row (it has an overlay
    /// entry).
    pub pending: bool,
}

/// A callback told of every committed change of the visible state, with
/// each changed row's new visible value (ordered by table and id, one
/// change per row).
pub type Observer = Arc<dyn Fn(ChangeSource, &[RowChange]) + Send + Sync>;

/// Asked before the rows of a staged checkpoint are read back for the
/// observer: `false` when nobody would look at them.
pub type Interest = Arc<dyn Fn() -> bool + Send + Sync>;

/// How one batch leaves a row: its synced row and overlay entry, each
/// `None` when the batch does not touch it (`Some(None)`: removed).
#[derive(Default)]
struct RowAfter<'a> {
    synced: Option<Option<&'a RowData>>,
    overlay: Option<Option<&'a OverlayEntry>>,
}

fn read_u64_meta(store: &dyn Store, key: &str) -> QueueResult<Option<u64>> {
    match store.get_meta(key)? {
        None => Ok(None),
        Some(bytes) => {
            let arr: [u8; 8] = bytes
                .as_slice()
                .try_into()
                .map_err(|_| StoreError::Corrupt(format!("metadata {key} has {} bytes, expected 8", bytes.len())))?;
            Ok(Some(u64::from_be_bytes(arr)))
        }
    }
}

/// Read queue entries in pages from `from_seq`.
const PAGE_ENTRIES: usize = 1024;

/// How a [`LocalDb`] is opened.
#[derive(Clone, Debug)]
pub struct LocalDbOptions {
    /// Bounds on writes and the queue.
    pub limits: Limits,
    /// Wall time for the hybrid logical clock that stamps every write.
    pub clock: Arc<dyn Clock>,
    /// Seed for the client id generated on first open (ignored once the
    /// store holds one), for deterministic tests. `None` (the default):
    /// a random UUID v4 from the operating system.
    pub client_id_seed: Option<u64>,
    /// Most upload outcomes kept in the store for
    /// [`LocalDb::outcome_record`] (the oldest are dropped).
    pub max_outcomes_kept: u64,
    /// Accepted skew of remote timestamps, for [`LocalDb::observe`].
    pub max_clock_skew_ms: u64,
}

impl Default for LocalDbOptions {
    fn default() -> Self {
        LocalDbOptions {
            limits: Limits::default(),
            clock: Arc::new(SystemClock),
            client_id_seed: None,
            max_outcomes_kept: 10_000,
            max_clock_skew_ms: 5 * 60 * 1000,
        }
    }
}

impl LocalDb {
    /// Open over a store with default options.
    pub fn open(store: Arc<dyn Store>) -> QueueResult<Self> {
        Self::open_with(store, LocalDbOptions::default())
    }

    /// Open over a store.
    pub fn open_with(store: Arc<dyn Store>, options: LocalDbOptions) -> QueueResult<Self> {
        let LocalDbOptions {
            limits,
            clock,
            client_id_seed,
            max_outcomes_kept,
            max_clock_skew_ms,
        } = options;
        let client_id = match store.get_meta(META_CLIENT_ID)? {
            Some(bytes) => String::from_utf8(bytes)
                .map_err(|_| StoreError::Corrupt(format!("metadata {META_CLIENT_ID} is not utf-8")))?,
            None => {
                // Two devices must never share an id: without a seed (tests
                // and simulations pass one) it is a UUID v4 from the
                // operating system's random source.
                let id = match client_id_seed {
                    Some(seed) => SeededRandom::new(seed).uuid(),
                    None => os_random::uuid_v4()?,
                };
                let mut batch = WriteBatch::new();
                batch.put_meta(META_CLIENT_ID, id.clone().into_bytes());
                store.apply(batch)?;
                id
            }
        };
        let hlc = HybridClock::new(clock, client_id.clone(), max_clock_skew_ms);
        if let Some(bytes) = store.get_meta(META_HLC)? {
            let stored: HlcTimestamp = std::str::from_utf8(&bytes)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| StoreError::Corrupt(format!("metadata {META_HLC} is not a clock")))?;
            hlc.advance_to(&stored);
        }
        // A local write stores only its queue entries and rows: the next
        // seq and tx id and the clock it reached are those of the newest
        // entry, and the metadata keeps them only from the moment entries
        // leave the queue (see `persist_counters`).
        let last_queued = last_queued_entry(store.as_ref())?;
        if let Some(stamp) = last_queued.as_ref().and_then(|e| e.hlc.as_ref()) {
            hlc.advance_to(stamp);
        }
        let next_seq = read_u64_meta(store.as_ref(), META_NEXT_SEQ)?
            .unwrap_or(1)
            .max(last_queued.as_ref().map_or(1, |e| e.seq + 1));
        let next_tx_id = read_u64_meta(store.as_ref(), META_NEXT_TX)?
            .unwrap_or(1)
            .max(last_queued.as_ref().map_or(1, |e| e.tx_id + 1));
        let completed_through = read_u64_meta(store.as_ref(), META_COMPLETED_THROUGH)?.unwrap_or(0);
        let stored_len = store.queue_len()?;
        let mut upload_len = 0;
        let mut from = completed_through.saturating_add(1);
        loop {
            let page = store.queue_from(from, PAGE_ENTRIES)?;
            upload_len += page.len() as u64;
            match page.last() {
                Some(e) if page.len() == PAGE_ENTRIES => from = e.seq + 1,
                _ => break,
            }
        }
        let counters = Counters {
            next_seq,
            next_tx_id,
            completed_through,
            upload_len,
            stored_len,
            server_write_checkpoint: 0,
        };
        let view = CounterView::default();
        view.publish(&counters);
        Ok(LocalDb {
            store,
            limits,
            max_outcomes_kept,
            client_id,
            hlc,
            observer: RwLock::new(None),
            interest: RwLock::new(None),
            overlay: overlay_index::OverlayIndex::default(),
            reported_seq: AtomicU64::new(counters.next_seq.saturating_sub(1)),
            counters: Mutex::new(counters),
            view,
            report_turn: Mutex::new(()),
        })
    }

    /// The store underneath, for tests, benchmarks and tools that look
    /// at it directly. `ferry-client` never uses it: it reaches the store
    /// only through this type's own reads, [`LocalDb::staging_area`] and
    /// [`LocalDb::apply_server_changes`] (`cargo xtask tidy` checks).
    /// Overlay entries written through it directly are not seen by this
    /// type's index scans (its overlay index is kept by its own writes).
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The schema.
    pub fn schema(&self) -> &Schema {
        self.store.schema()
    }

    /// This database's client id: generated on first open, then stored.
    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    /// Take in a timestamp seen from elsewhere (the server), so later local
    /// writes order after it.
    pub fn observe(&self, remote: &HlcTimestamp) -> QueueResult<()> {
        Ok(self.hlc.observe(remote)?)
    }

    /// Take in a timestamp the server sent (a checkpoint's or an upload
    /// answer's clock): later local writes order after it, however far
    /// this device's clock lags. The server is trusted here, unlike
    /// [`LocalDb::observe`], which bounds the skew.
    pub fn observe_server(&self, server: &HlcTimestamp) {
        self.hlc.advance_to(server);
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// A visible row.
    pub fn get(&self, table: &str, id: &str) -> QueueResult<Option<RowData>> {
        self.schema().table(table)?;
        Ok(self.store.get_visible(table, id)?)
    }

    /// Every visible row of a table, ordered by id.
    pub fn scan(&self, table: &str) -> QueueResult<Vec<(String, RowData)>> {
        self.schema().table(table)?;
        Ok(self.store.scan_visible(table)?)
    }

    /// The first `limit` visible rows of an index range, ordered by index
    /// key then id, from the range's end in reverse order when `reverse`
    /// (what `Store::scan_visible_index_limited` returns). Reads the
    /// overlay rows among the range's first `limit` keys by id, and the
    /// synced rows up to them that no pending write shadows: never the
    /// whole overlay, which this type keeps indexed in memory (ids and
    /// keys, bounded by the pending writes).
    pub fn scan_index_limited(
        &self,
        table: &str,
        index: &str,
        lower: Bound<Vec<Value>>,
        upper: Bound<Vec<Value>>,
        reverse: bool,
        limit: usize,
    ) -> QueueResult<Vec<(String, RowData)>> {
        Ok(self
            .overlay
            .scan_limited(self.store.as_ref(), table, index, lower, upper, reverse, limit)?)
    }

    /// The ids of a table's rows that pending local writes shape (those
    /// with an overlay entry, deleted ones included).
    pub fn pending_ids(&self, table: &str) -> QueueResult<BTreeSet<String>> {
        Ok(self.store.scan_overlay(table)?.into_iter().map(|(id, _)| id).collect())
    }

    /// For each of `ids`, whether pending local writes shape it (an
    /// overlay entry, deleted ones included): no store read once the
    /// table's overlay is indexed.
    pub fn pending_among<'a>(&self, table: &str, ids: impl IntoIterator<Item = &'a str>) -> QueueResult<Vec<bool>> {
        Ok(self.overlay.pending_among(self.store.as_ref(), table, ids)?)
    }

    /// Whether this thread is inside a write of this database (its
    /// closure, or the change observer it calls).
    pub fn writing_on_this_thread(&self) -> bool {
        ferry_core::inside::is_inside(&WRITING, self)
    }

    /// Take the write lock; [`QueueError::Reentrant`] when this thread
    /// holds it already (a write from inside a write or its callbacks).
    fn lock_writes(&self) -> QueueResult<WriteLock<'_>> {
        if self.writing_on_this_thread() {
            return Err(QueueError::Reentrant);
        }
        let counters = self.counters.lock();
        Ok(WriteLock {
            _writing: ferry_core::inside::Inside::enter(&WRITING, self),
            counters,
            view: &self.view,
        })
    }

    /// Apply a batch to the store, the overlay index in step (every batch
    /// this type writes goes through here).
    fn apply_batch(&self, batch: WriteBatch) -> Result<(), StoreError> {
        self.overlay.apply(self.store.as_ref(), batch)
    }

    /// A visible row as a record.
    pub fn get_record<T: Record>(&self, id: &str) -> QueueResult<Option<T>> {
        self.get(T::TABLE, id)?
            .map(|data| record_from_row(id, data))
            .transpose()
    }

    /// Every visible row of a record's table, as records.
    pub fn scan_records<T: Record>(&self) -> QueueResult<Vec<T>> {
        self.scan(T::TABLE)?
            .into_iter()
            .map(|(id, data)| record_from_row(&id, data))
            .collect()
    }

    /// Run `f` over a write transaction and commit what it did as one store
    /// batch. If `f` returns an error, nothing is written.
    pub fn write<R, E, F>(&self, f: F) -> Result<R, E>
    where
        F: FnOnce(&mut WriteTx<'_>) -> Result<R, E>,
        E: From<QueueError>,
    {
        self.write_with_receipt(f).map(|(value, _)| value)
    }

    /// [`write`](Self::write), also returning which queue entries the
    /// transaction produced (`None` when it queued nothing), to match
    /// with upload outcomes.
    pub fn write_with_receipt<R, E, F>(&self, f: F) -> Result<(R, Option<WriteReceipt>), E>
    where
        F: FnOnce(&mut WriteTx<'_>) -> Result<R, E>,
        E: From<QueueError>,
    {
        let mut counters = self.lock_writes()?;
        let mut tx = WriteTx {
            db: self,
            rows: BTreeMap::new(),
            local_rows: BTreeMap::new(),
            ops: Vec::new(),
            metadata: None,
        };
        let value = f(&mut tx)?;
        let n_ops = tx.ops.len();
        if n_ops > self.limits.max_ops_per_transaction {
            return Err(QueueError::TooManyOps {
                count: n_ops,
                limit: self.limits.max_ops_per_transaction,
            }
            .into());
        }
        let queued_len = counters.stored_len;
        if n_ops > 0 && queued_len + n_ops as u64 > self.limits.max_queue_entries {
            return Err(QueueError::QueueFull {
                len: queued_len,
                limit: self.limits.max_queue_entries,
            }
            .into());
        }
        let tx_id = counters.next_tx_id;
        let mut seq = counters.next_seq;
        let mut batch = WriteBatch::with_capacity(n_ops + tx.rows.len() + tx.local_rows.len() + 2);
        let changes = local_write_changes(&tx.rows, &tx.local_rows);
        for ((table, id), row) in tx.local_rows {
            match row {
                Some(data) => batch.put_synced(table, id, data),
                None => batch.delete_synced(table, id),
            };
        }
        for ((table, id), row) in tx.rows {
            let entry = match row {
                Some(data) => OverlayEntry::Row(data),
                None => OverlayEntry::Deleted,
            };
            batch.put_overlay(table, id, entry);
        }
        for op in tx.ops {
            batch.append_queue(CrudEntry {
                seq,
                tx_id,
                op: op.op,
                previous: op.previous,
                metadata: op.metadata,
                hlc: Some(self.hlc.now()),
            });
            seq += 1;
        }
        if batch.is_empty() {
            return Ok((value, None));
        }
        self.apply_batch(batch).map_err(QueueError::from)?;
        let receipt = (n_ops > 0).then(|| WriteReceipt {
            tx_id,
            first_seq: counters.next_seq,
            last_seq: seq - 1,
        });
        if n_ops > 0 {
            counters.next_seq = seq;
            counters.next_tx_id = tx_id + 1;
            counters.upload_len += n_ops as u64;
            counters.stored_len += n_ops as u64;
        }
        let turn = counters.hand_over(self);
        self.notify(ChangeSource::LocalWrite, &changes);
        drop(turn);
        Ok((value, receipt))
    }

    /// [`write`](Self::write) with a pre-commit check: after `f` returned
    /// `Ok`, `check` sees the transaction (its queued ops through
    /// [`WriteTx::ops`], rows before and after) and may refuse it, in which
    /// case nothing is written and its error is returned.
    pub fn write_checked<R, E, F, C>(&self, f: F, check: C) -> Result<(R, Option<WriteReceipt>), E>
    where
        F: FnOnce(&mut WriteTx<'_>) -> Result<R, E>,
        C: FnOnce(&WriteTx<'_>) -> Result<(), QueueError>,
        E: From<QueueError>,
    {
        self.write_with_receipt(|tx| {
            let value = f(tx)?;
            check(tx)?;
            Ok(value)
        })
    }

    /// Number of entries waiting for upload (not yet completed), as of the
    /// last commit (never waits for a write: callable from a change
    /// observer or live query callback).
    pub fn upload_queue_len(&self) -> u64 {
        self.view.upload_len.load(Ordering::Acquire)
    }

    /// Number of entries stored: waiting for upload, or uploaded and not
    /// yet confirmed by a checkpoint (as of the last commit).
    pub fn pending_len(&self) -> QueueResult<u64> {
        Ok(self.view.stored_len.load(Ordering::Acquire))
    }

    /// The first entry waiting for upload and the last entry queued
    /// (`None` when nothing waits): two reads of the queue's ends.
    pub fn upload_queue_ends(&self) -> QueueResult<Option<(CrudEntry, CrudEntry)>> {
        if self.upload_queue_len() == 0 {
            return Ok(None);
        }
        let first = self.store.queue_from(self.completed_through().saturating_add(1), 1)?;
        let last = self.store.queue_from(self.last_seq(), 1)?;
        Ok(first.into_iter().next().zip(last.into_iter().next()))
    }

    /// The last seq handed out (0 before the first queued write), as of
    /// the last commit.
    pub fn last_seq(&self) -> u64 {
        self.view.last_seq.load(Ordering::Acquire)
    }

    /// The last seq the server answered for (0 when none), as of the last
    /// commit.
    pub fn completed_through(&self) -> u64 {
        self.view.completed_through.load(Ordering::Acquire)
    }

    /// Up to `max_entries` entries waiting for upload, in order (capped by
    /// the `max_batch_entries` limit).
    pub fn next_batch(&self, max_entries: usize) -> QueueResult<Vec<CrudEntry>> {
        let from = self.completed_through().saturating_add(1);
        let through = self.reported_seq.load(Ordering::Acquire);
        if from > through {
            return Ok(Vec::new());
        }
        let limit = max_entries
            .min(self.limits.max_batch_entries)
            .min(usize::try_from(through - from + 1).unwrap_or(usize::MAX));
        let mut entries = self.store.queue_from(from, limit)?;
        entries.retain(|e| e.seq <= through);
        Ok(entries)
    }

    /// The first whole transaction waiting for upload.
    pub fn next_transaction(&self) -> QueueResult<Option<QueuedTransaction>> {
        let mut from = self.completed_through().saturating_add(1);
        let through = self.reported_seq.load(Ordering::Acquire);
        let mut entries: Vec<CrudEntry> = Vec::new();
        loop {
            let page = self.store.queue_from(from, PAGE_ENTRIES)?;
            let mut full = page.len() == PAGE_ENTRIES;
            for e in page {
                // A transaction's entries are committed (and told) together.
                if e.seq > through {
                    full = false;
                    break;
                }
                if entries.first().is_some_and(|first| first.tx_id != e.tx_id) {
                    return Ok(Some(QueuedTransaction {
                        tx_id: entries[0].tx_id,
                        entries,
                    }));
                }
                from = e.seq + 1;
                entries.push(e);
            }
            if !full {
                break;
            }
        }
        Ok(entries
            .first()
            .map(|e| e.tx_id)
            .map(|tx_id| QueuedTransaction { tx_id, entries }))
    }

    /// Record that the server answered for every entry through `through_seq`:
    /// they leave the upload queue. They stay stored (and keep shaping the
    /// visible state) until [`LocalDb::confirm_through`] covers them.
    /// [`LocalDb::answer`] does this together with rejections and outcomes.
    pub fn complete(&self, through_seq: u64) -> QueueResult<()> {
        self.answer(&Answer {
            through_seq,
            ..Answer::default()
        })
    }

    /// Drop every entry through `through_seq` (a checkpoint's write
    /// checkpoint covers them: the synced layer now includes their effect)
    /// and rebase the rows they touched on the synced layer, in one batch.
    /// Only completed entries are dropped: one whose upload answer never
    /// arrived stays until a re-upload brings its outcome back. A seq
    /// beyond the last queued entry is refused ([`QueueError::InvalidSeq`];
    /// a server checkpoint's, through [`LocalDb::apply_server_changes`],
    /// moves the next seq past it instead).
    pub fn confirm_through(&self, through_seq: u64) -> QueueResult<()> {
        if through_seq > self.last_seq() {
            return Err(QueueError::InvalidSeq {
                seq: through_seq,
                reason: "beyond the last queued entry",
            });
        }
        self.apply_server_changes(ServerChanges::new(), Some(through_seq))
    }

    /// Apply a validated checkpoint's `changes` (synced rows, bucket
    /// bookkeeping, staged ranges switched in) in one store batch together
    /// with: dropping the completed queue entries the write checkpoint
    /// covers, and rebasing every row that has pending entries left
    /// (synced row after this batch, pending entries replayed) or had
    /// confirmed ones. Rows of pending writes that a switch-in touches are
    /// rebased on what it leaves, and observers hear of every row it
    /// changed, in pages read back from the staging area after the commit.
    /// Serialized with local writes. A write checkpoint beyond the last
    /// queued seq (a store restored from an older copy) moves the next seq
    /// past it, stored in the same batch; `u64::MAX` is refused.
    pub fn apply_server_changes(&self, changes: ServerChanges, write_checkpoint: Option<u64>) -> QueueResult<()> {
        let (batch, switches) = changes.into_parts();
        self.apply_checkpoint(batch, &switches, write_checkpoint)
    }

    fn apply_checkpoint(
        &self,
        mut batch: WriteBatch,
        switches: &[StagedSwitch],
        write_checkpoint: Option<u64>,
    ) -> QueueResult<()> {
        let mut counters = self.lock_writes()?;
        let last_seq = counters.next_seq.saturating_sub(1);
        // The server answered seqs of this client id that this store never
        // queued: a copy restored from an older backup (the same id, an
        // older queue) after the device went on writing. Its next writes
        // take seqs after the server's, never one the server recorded for
        // another write (which it would reject), and the checkpoint
        // applies (refusing it locked the copy out of every download).
        let adopted_seq = match write_checkpoint {
            Some(wc) if wc > last_seq => {
                let next = wc.checked_add(1).ok_or(QueueError::InvalidSeq {
                    seq: wc,
                    reason: "no seq follows it",
                })?;
                tracing::warn!(
                    client_id = %self.client_id,
                    server_seq = wc,
                    local_seq = last_seq,
                    "the server answered seqs this store never queued (restored from an older copy?): later writes start after them"
                );
                counters.next_seq = next;
                Some(next)
            }
            _ => None,
        };
        if let Some(wc) = write_checkpoint {
            counters.server_write_checkpoint = counters.server_write_checkpoint.max(wc);
        }
        // Entries whose outcome has not reached the app yet stay pending;
        // `answer` confirms them when it arrives.
        let wc = counters.server_write_checkpoint.min(counters.completed_through);
        #[cfg(feature = "planted-bugs")]
        let wc = if planted::confirm_early() {
            // The bug: the write after the write checkpoint is confirmed
            // too, one checkpoint before any checkpoint covers it.
            counters.server_write_checkpoint.saturating_add(1).min(last_seq)
        } else {
            wc
        };
        let entries = self.store.queue_from(0, usize::MAX)?;
        // Rows of pending writes: only switch-ins need them apart.
        let queued: ChangedRows = if switches.is_empty() {
            ChangedRows::new()
        } else {
            entries
                .iter()
                .map(|e| (e.op.table().to_owned(), e.op.id().to_owned()))
                .collect()
        };
        let staged_after = self.staged_rows_after(&batch, switches, &queued)?;
        let mut marks = self.marks()?;
        let (changed, confirmed) = self.confirm_into(
            &mut batch,
            wc,
            &entries,
            &mut marks,
            BTreeSet::new(),
            staged_after.clone(),
        )?;
        if let Some(next) = adopted_seq {
            batch.put_meta(META_NEXT_SEQ, next.to_be_bytes().to_vec());
        }
        if batch.is_empty() {
            return Ok(());
        }
        // The server's clock was observed before this batch: keep it.
        self.persist_counters(&mut batch, &counters, confirmed);
        let changes = self.visible_changes_staged(&batch, &changed, &staged_after)?;
        self.apply_batch(batch)?;
        counters.stored_len -= confirmed;
        let turn = counters.hand_over(self);
        self.notify(ChangeSource::Server, &changes);
        self.notify_switched(switches, &staged_after, &queued)?;
        drop(turn);
        drop_in_background(changed);
        drop_in_background(changes);
        Ok(())
    }

    /// Keep the clock's high-water mark with `batch`, and, when the batch
    /// drops queue entries (`confirmed` > 0), the next seq and tx id: a
    /// local write keeps them only in its queue entries, so they must be
    /// in the metadata before the entries go.
    fn persist_counters(&self, batch: &mut WriteBatch, counters: &Counters, confirmed: u64) {
        batch.put_meta(META_HLC, self.hlc.high_water().to_string().into_bytes());
        if confirmed > 0 {
            batch.put_meta(META_NEXT_SEQ, counters.next_seq.to_be_bytes().to_vec());
            batch.put_meta(META_NEXT_TX, counters.next_tx_id.to_be_bytes().to_vec());
        }
    }

    /// Add to `batch` (which may hold synced-layer changes): dropping
    /// queue entries through `wc` and rebasing every row that has pending
    /// entries left and a synced change in the batch, had confirmed
    /// entries, or is in `touched` already (rows of newly rejected
    /// entries). `entries` is the whole stored queue, `rejected` the
    /// rejected seqs (pruned here of confirmed ones; written to the batch
    /// when that changes them). Returns the rows whose visible value may
    /// change and the number of entries dropped.
    fn confirm_into(
        &self,
        batch: &mut WriteBatch,
        wc: u64,
        entries: &[CrudEntry],
        marks: &mut Marks,
        mut touched: ChangedRows,
        staged_after: BTreeMap<(String, String), Option<RowData>>,
    ) -> QueueResult<(ChangedRows, u64)> {
        // Entries the server never saw follow the confirmed ones at once.
        let from = wc;
        let mut wc = wc;
        for e in entries.iter().skip_while(|e| e.seq <= from) {
            if !marks.unseen.contains(&e.seq) {
                break;
            }
            wc = e.seq;
        }
        let rejected = &mut marks.rejected;
        let confirmed = entries.iter().take_while(|e| e.seq <= wc).count() as u64;
        // Every row the batch changes in the synced layer is reported
        // (collected in a vector first: a large download's rows come
        // sorted, and building the set from them at once is much cheaper
        // than inserting one by one).
        let mut changed_synced: Vec<(String, String)> = Vec::new();
        // The synced rows after the batch, kept only for rows with queue
        // entries: those are the only ones a rebase reads. Without pending
        // writes nothing is copied.
        let queued: BTreeSet<(&str, &str)> = entries.iter().map(|e| (e.op.table(), e.op.id())).collect();
        let mut synced_after: BTreeMap<(String, String), Option<RowData>> = BTreeMap::new();
        for op in &batch.ops {
            let (table, id, row) = match op {
                BatchOp::PutSynced { table, id, data } => (table, id, Some(data)),
                BatchOp::DeleteSynced { table, id } => (table, id, None),
                _ => continue,
            };
            if queued.contains(&(table.as_str(), id.as_str())) {
                synced_after.insert((table.clone(), id.clone()), row.cloned());
            }
            changed_synced.push((table.clone(), id.clone()));
        }
        drop(queued);
        // Rows of pending writes that staged ops switched in by this batch
        // change (see `staged.rs`).
        for (key, row) in staged_after {
            changed_synced.push(key.clone());
            synced_after.insert(key, row);
        }
        let changed_synced: ChangedRows = changed_synced.into_iter().collect();
        for e in entries {
            let key = (e.op.table().to_owned(), e.op.id().to_owned());
            if e.seq <= wc || synced_after.contains_key(&key) {
                touched.insert(key);
            }
        }
        let remaining: Vec<&CrudEntry> = entries
            .iter()
            .filter(|e| e.seq > wc && !rejected.contains(&e.seq))
            .collect();
        if entries.first().is_some_and(|e| e.seq <= wc) {
            batch.complete_queue(wc);
            let before = rejected.len();
            rejected.retain(|seq| *seq > wc);
            if rejected.len() != before {
                batch.put_meta(META_REJECTED_SEQS, encode_seqs(rejected));
            }
            let before = marks.unseen.len();
            marks.unseen.retain(|seq| *seq > wc);
            if marks.unseen.len() != before {
                batch.put_meta(META_UNSEEN_SEQS, encode_seqs(&marks.unseen));
            }
        }
        // Rows of a table an earlier app version wrote to and this schema
        // no longer declares: the store keeps no layer of it to rebase or
        // read (its entries still upload and are confirmed).
        touched.retain(|(table, _)| self.schema().table(table).is_ok());
        self.rebase_into(batch, &touched, &remaining, &synced_after)?;
        if touched.is_empty() {
            return Ok((changed_synced, confirmed));
        }
        touched.extend(changed_synced);
        Ok((touched, confirmed))
    }

    /// The server rejected these entries: they stop shaping the visible
    /// state at once (their rows are rebased without them) and each is
    /// recorded in the rejections log with its reason. Entries stay stored
    /// until a checkpoint covers them, like every completed entry.
    pub fn reject(&self, rejections: &[(u64, String)], at_ms: u64) -> QueueResult<()> {
        if rejections.is_empty() {
            return Ok(());
        }
        self.answer(&Answer {
            through_seq: self.completed_through(),
            rejected: rejections.to_vec(),
            at_ms,
            ..Answer::default()
        })
    }

    /// Call `observer` after every committed change of the visible state,
    /// with the rows whose visible value may have changed. Calls are made
    /// on the committing thread, once per commit, in commit order, after
    /// the write lock was let go: the next write commits meanwhile, and
    /// its call waits for this one to end. The upload reads no write
    /// before its own call is done (so the server cannot answer it, and
    /// a rejection cannot roll it back, before the observer saw it). A
    /// slow observer delays the calls after it and the writes' returns,
    /// not their commits. The observer must not write through this
    /// database: such a write is refused with [`QueueError::Reentrant`].
    pub fn set_observer(&self, observer: Option<Observer>) {
        *self.observer.write() = observer;
    }

    /// Ask `interest` before reading a staged checkpoint's rows back for
    /// the observer (a pass over every row it brought): when it answers
    /// `false`, the observer hears only of the rows the batch itself
    /// changed. `None` (the default): always read them.
    pub fn set_observer_interest(&self, interest: Option<Interest>) {
        *self.interest.write() = interest;
    }

    fn notify(&self, source: ChangeSource, rows: &[RowChange]) {
        if rows.is_empty() {
            return;
        }
        if let Some(o) = self.observer.read().as_ref() {
            o(source, rows);
        }
    }

    /// The rejections log, oldest first (bounded by
    /// `Limits::max_rejections_logged`).
    pub fn rejections(&self) -> QueueResult<Vec<Rejection>> {
        match self.store.get_meta(META_REJECTIONS)? {
            None => Ok(Vec::new()),
            Some(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| StoreError::Corrupt(format!("metadata {META_REJECTIONS}: {e}")).into()),
        }
    }

    /// Empty the rejections log (after the app showed it).
    pub fn clear_rejections(&self) -> QueueResult<()> {
        let _counters = self.lock_writes()?;
        let mut batch = WriteBatch::new();
        batch.push(BatchOp::DeleteMeta {
            key: META_REJECTIONS.into(),
        });
        Ok(self.apply_batch(batch)?)
    }

    fn seq_set(&self, key: &str) -> QueueResult<BTreeSet<u64>> {
        match self.store.get_meta(key)? {
            None => Ok(BTreeSet::new()),
            Some(bytes) => bytes
                .chunks(8)
                .map(|c| {
                    <[u8; 8]>::try_from(c)
                        .map(u64::from_be_bytes)
                        .map_err(|_| StoreError::Corrupt(format!("metadata {key} is truncated")).into())
                })
                .collect(),
        }
    }

    fn marks(&self) -> QueueResult<Marks> {
        Ok(Marks {
            rejected: self.seq_set(META_REJECTED_SEQS)?,
            unseen: self.seq_set(META_UNSEEN_SEQS)?,
        })
    }

    /// The new visible value of every row in `rows`, as `batch` (about to
    /// be applied) leaves it. Rows the batch changes are computed from the
    /// batch alone: an overlay entry it writes is the visible row (pending);
    /// an overlay it removes, or a synced change to a row whose overlay it
    /// leaves alone, shows the synced row (rows with queue entries always
    /// get their overlay rewritten when their synced row changes, so a
    /// row whose overlay the batch leaves alone has none). Rows of `rows`
    /// the batch does not touch are read from the store.
    fn visible_changes(&self, batch: &WriteBatch, rows: &ChangedRows) -> QueueResult<Vec<RowChange>> {
        self.visible_changes_staged(batch, rows, &BTreeMap::new())
    }

    /// A row's synced value after a batch that does not list it.
    fn synced_after(
        &self,
        table: &str,
        id: &str,
        staged_after: &BTreeMap<(String, String), Option<RowData>>,
    ) -> QueueResult<Option<RowData>> {
        match staged_after.get(&(table.to_owned(), id.to_owned())) {
            Some(row) => Ok(row.clone()),
            None => Ok(self.store.get_synced(table, id)?),
        }
    }

    /// [`LocalDb::visible_changes`] where `staged_after` holds the synced
    /// rows the batch's switch-ins leave (rows the batch does not list).
    fn visible_changes_staged(
        &self,
        batch: &WriteBatch,
        rows: &ChangedRows,
        staged_after: &BTreeMap<(String, String), Option<RowData>>,
    ) -> QueueResult<Vec<RowChange>> {
        let mut after: BTreeMap<(&str, &str), RowAfter<'_>> = BTreeMap::new();
        for op in &batch.ops {
            match op {
                BatchOp::PutSynced { table, id, data } => {
                    after.entry((table, id)).or_default().synced = Some(Some(data));
                }
                BatchOp::DeleteSynced { table, id } => {
                    after.entry((table, id)).or_default().synced = Some(None);
                }
                BatchOp::PutOverlay { table, id, entry } => {
                    after.entry((table, id)).or_default().overlay = Some(Some(entry));
                }
                BatchOp::DeleteOverlay { table, id } => {
                    after.entry((table, id)).or_default().overlay = Some(None);
                }
                _ => {}
            }
        }
        // Switch-ins come after every synced-layer op of the batch: what
        // they leave is the row's final synced value.
        for ((table, id), row) in staged_after {
            after.entry((table, id)).or_default().synced = Some(row.as_ref());
        }
        let mut out = Vec::with_capacity(rows.len());
        for (table, id) in rows {
            let (row, pending) = match after.get(&(table.as_str(), id.as_str())) {
                Some(RowAfter {
                    overlay: Some(Some(OverlayEntry::Row(data))),
                    ..
                }) => (Some(data.clone()), true),
                Some(RowAfter {
                    overlay: Some(Some(OverlayEntry::Deleted)),
                    ..
                }) => (None, true),
                Some(RowAfter {
                    synced: Some(synced), ..
                }) => (synced.cloned(), false),
                Some(RowAfter { synced: None, .. }) => (self.synced_after(table, id, staged_after)?, false),
                None => match self.store.get_overlay(table, id)? {
                    Some(OverlayEntry::Row(data)) => (Some(data), true),
                    Some(OverlayEntry::Deleted) => (None, true),
                    None => (self.synced_after(table, id, staged_after)?, false),
                },
            };
            out.push(RowChange {
                table: table.clone(),
                id: id.clone(),
                row,
                pending,
            });
        }
        Ok(out)
    }

    /// Recompute the overlay of `rows` as their synced row with `remaining`
    /// entries replayed in order; rows no remaining entry touches lose
    /// their overlay. Insert-only and local-only tables have none.
    fn rebase_into(
        &self,
        batch: &mut WriteBatch,
        rows: &BTreeSet<(String, String)>,
        remaining: &[&CrudEntry],
        synced_after: &BTreeMap<(String, String), Option<RowData>>,
    ) -> QueueResult<()> {
        for (table, id) in rows {
            let def = self.schema().table(table)?;
            if def.insert_only || def.local_only {
                continue;
            }
            let mut replay = remaining
                .iter()
                .filter(|e| e.op.table() == table && e.op.id() == id)
                .peekable();
            if replay.peek().is_none() {
                batch.delete_overlay(table.clone(), id.clone());
                continue;
            }
            let mut row = match synced_after.get(&(table.clone(), id.clone())) {
                Some(row) => row.clone(),
                None => self.store.get_synced(table, id)?,
            };
            for e in replay {
                row = e.op.apply_to(row);
            }
            let entry = row.map_or(OverlayEntry::Deleted, OverlayEntry::Row);
            batch.put_overlay(table.clone(), id.clone(), entry);
        }
        Ok(())
    }
}

/// The visible rows a local write leaves, ordered by table and id: its
/// rows of synced tables are its overlay entries (pending), and those of
/// local-only tables (which have no overlay) their synced rows. What
/// `LocalDb::visible_changes` would compute from the write's batch,
/// without building the batch's row map and the set of changed keys.
fn local_write_changes(
    rows: &BTreeMap<(String, String), Option<RowData>>,
    local_rows: &BTreeMap<(String, String), Option<RowData>>,
) -> Vec<RowChange> {
    let change = |((table, id), row): (&(String, String), &Option<RowData>), pending| RowChange {
        table: table.clone(),
        id: id.clone(),
        row: row.clone(),
        pending,
    };
    let mut changes: Vec<RowChange> = Vec::with_capacity(rows.len() + local_rows.len());
    changes.extend(rows.iter().map(|r| change(r, true)));
    changes.extend(local_rows.iter().map(|r| change(r, false)));
    // Each map is in key order; a table is local-only or not, so no key
    // is in both.
    if !rows.is_empty() && !local_rows.is_empty() {
        changes.sort_by(|a, b| (&a.table, &a.id).cmp(&(&b.table, &b.id)));
    }
    changes
}

/// Seqs with a standing of their own until a checkpoint confirms them.
#[derive(Debug, Default)]
struct Marks {
    /// Rejected by the server: they no longer shape the visible state.
    rejected: BTreeSet<u64>,
    /// Refused whole, never seen by the server (a subset of `rejected`).
    unseen: BTreeSet<u64>,
}

/// Sets of changed rows at least this large are freed on a helper thread:
/// after a large download, freeing them would delay the caller noticeably.
const BACKGROUND_DROP_MIN_ROWS: usize = 100_000;

fn drop_in_background<T: Collection + Send + 'static>(rows: T) {
    if rows.count() < BACKGROUND_DROP_MIN_ROWS {
        return;
    }
    // When no thread can be started the set is dropped here instead.
    let _ = std::thread::Builder::new()
        .name("ferry-queue-free".into())
        .spawn(move || drop(rows));
}

/// What [`drop_in_background`] frees.
trait Collection {
    fn count(&self) -> usize;
}

impl<T> Collection for BTreeSet<T> {
    fn count(&self) -> usize {
        self.len()
    }
}

impl<T> Collection for Vec<T> {
    fn count(&self) -> usize {
        self.len()
    }
}

/// The newest stored queue entry.
fn last_queued_entry(store: &dyn Store) -> QueueResult<Option<CrudEntry>> {
    // The queue is ordered; page through to its end.
    let mut from = 0;
    let mut last = None;
    loop {
        let mut page = store.queue_from(from, PAGE_ENTRIES)?;
        let full = page.len() == PAGE_ENTRIES;
        if let Some(e) = page.pop() {
            from = e.seq + 1;
            last = Some(e);
        }
        if !full {
            return Ok(last);
        }
    }
}

struct PendingOp {
    op: CrudOp,
    previous: Option<RowData>,
    metadata: Option<String>,
}

/// A write transaction: reads see its own writes; nothing reaches the
/// store until the closure given to [`LocalDb::write`] returns `Ok`.
pub struct WriteTx<'a> {
    db: &'a LocalDb,
    /// Rows of synced tables this transaction changed: the row as it now
    /// looks, `None` when deleted.
    rows: BTreeMap<(String, String), Option<RowData>>,
    /// Rows of local-only tables this transaction changed.
    local_rows: BTreeMap<(String, String), Option<RowData>>,
    ops: Vec<PendingOp>,
    metadata: Option<String>,
}

impl std::fmt::Debug for WriteTx<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteTx")
            .field("rows", &self.rows.len())
            .field("ops", &self.ops.len())
            .finish()
    }
}

impl<'a> WriteTx<'a> {
    /// The table's definition, borrowed from the database (not from the
    /// transaction, so staging can go on while it is held).
    fn table(&self, table: &str) -> QueueResult<&'a Table> {
        let db: &'a LocalDb = self.db;
        Ok(db.schema().table(table)?)
    }

    /// The row as this transaction sees it.
    pub fn get(&self, table: &str, id: &str) -> QueueResult<Option<RowData>> {
        let def = self.db.schema().table(table)?;
        let key = (table.to_owned(), id.to_owned());
        let staged = if def.local_only {
            self.local_rows.get(&key)
        } else {
            self.rows.get(&key)
        };
        match staged {
            Some(row) => Ok(row.clone()),
            None if def.insert_only => Ok(None),
            None => Ok(self.db.store.get_visible(table, id)?),
        }
    }

    /// The row as it was before this transaction (the committed visible
    /// state), ignoring this transaction's own writes.
    pub fn get_committed(&self, table: &str, id: &str) -> QueueResult<Option<RowData>> {
        self.db.get(table, id)
    }

    /// The ops this transaction queued so far, in order (writes to
    /// local-only tables queue none).
    pub fn ops(&self) -> impl Iterator<Item = &CrudOp> + '_ {
        self.ops.iter().map(|p| &p.op)
    }

    /// Attach metadata to the ops that follow in this transaction.
    pub fn set_metadata(&mut self, metadata: Option<String>) {
        self.metadata = metadata;
    }

    fn stage(&mut self, def: &Table, id: &str, row: Option<RowData>, op: CrudOp, previous: Option<RowData>) {
        let key = (def.name.clone(), id.to_owned());
        if def.local_only {
            self.local_rows.insert(key, row);
            return;
        }
        if !def.insert_only {
            self.rows.insert(key, row);
        }
        let previous = if def.track_previous_values { previous } else { None };
        self.ops.push(PendingOp {
            op,
            previous,
            metadata: self.metadata.clone(),
        });
    }

    /// Create a row; an error if it already exists.
    pub fn insert(&mut self, table: &str, id: &str, data: RowData) -> QueueResult<()> {
        if self.get(table, id)?.is_some() {
            return Err(QueueError::RowExists {
                table: table.to_owned(),
                id: id.to_owned(),
            });
        }
        self.put(table, id, data)
    }

    /// Create or replace a whole row.
    pub fn put(&mut self, table: &str, id: &str, data: RowData) -> QueueResult<()> {
        let def = self.table(table)?;
        let data = def.check_row(id, data, &self.db.limits)?;
        // Reading the row costs a lookup: only for tables that record it.
        let previous = if def.track_previous_values {
            self.get(table, id)?
        } else {
            None
        };
        let op = CrudOp::Put {
            table: table.to_owned(),
            id: id.to_owned(),
            data: data.clone(),
        };
        self.stage(def, id, Some(data), op, previous);
        Ok(())
    }

    /// Change some columns of an existing row. Only columns whose value
    /// changes are queued; returns `false` (and queues nothing) when none
    /// does. An error if the row does not exist.
    pub fn update(&mut self, table: &str, id: &str, changes: RowData) -> QueueResult<bool> {
        let def = self.table(table)?;
        if def.insert_only {
            return Err(QueueError::InsertOnly {
                table: table.to_owned(),
                op: "update",
            });
        }
        let changes = def.check_data(changes)?;
        let Some(current) = self.get(table, id)? else {
            return Err(QueueError::RowMissing {
                table: table.to_owned(),
                id: id.to_owned(),
            });
        };
        let mut changed = RowData::new();
        let mut previous = RowData::new();
        for (col, value) in changes {
            let old = current.get(&col).cloned().unwrap_or(Value::Null);
            if !same_value(&old, &value) {
                previous.insert(col.clone(), old);
                changed.insert(col, value);
            }
        }
        if changed.is_empty() {
            return Ok(false);
        }
        let mut next = current;
        // Columns an earlier app version wrote that this schema no longer
        // declares go, as a download leaves them out: else no row written
        // before could ever be updated.
        next.retain(|col, _| def.column_def(col).is_some());
        next.extend(changed.clone());
        let next = def.check_row(id, next, &self.db.limits)?;
        let op = CrudOp::Patch {
            table: table.to_owned(),
            id: id.to_owned(),
            data: changed,
        };
        self.stage(def, id, Some(next), op, Some(previous));
        Ok(true)
    }

    /// Delete a row; returns `false` (and queues nothing) when it does not
    /// exist.
    pub fn delete(&mut self, table: &str, id: &str) -> QueueResult<bool> {
        let def = self.table(table)?;
        if def.insert_only {
            return Err(QueueError::InsertOnly {
                table: table.to_owned(),
                op: "delete",
            });
        }
        let Some(previous) = self.get(table, id)? else {
            return Ok(false);
        };
        let op = CrudOp::Delete {
            table: table.to_owned(),
            id: id.to_owned(),
        };
        self.stage(def, id, None, op, Some(previous));
        Ok(true)
    }

    /// Insert a record; an error if its row exists.
    pub fn insert_record<T: Record>(&mut self, record: &T) -> QueueResult<()> {
        let (id, data) = record_to_row(self.db.schema(), record)?;
        self.insert(T::TABLE, &id, data)
    }

    /// Create or replace a record's row.
    pub fn put_record<T: Record>(&mut self, record: &T) -> QueueResult<()> {
        let (id, data) = record_to_row(self.db.schema(), record)?;
        self.put(T::TABLE, &id, data)
    }

    /// Update a record's row to the record's values, queueing only the
    /// columns that changed. An error if the row does not exist.
    pub fn update_record<T: Record>(&mut self, record: &T) -> QueueResult<bool> {
        let (id, data) = record_to_row(self.db.schema(), record)?;
        self.update(T::TABLE, &id, data)
    }

    /// A record as this transaction sees it.
    pub fn get_record<T: Record>(&self, id: &str) -> QueueResult<Option<T>> {
        self.get(T::TABLE, id)?
            .map(|data| record_from_row(id, data))
            .transpose()
    }
}

/// Value equality for change detection: exact, so that 1 and 1.0 differ
/// in type only where the schema allows both (it does not) and NaN equals
/// NaN (no spurious patches).
fn same_value(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Real(x), Value::Real(y)) => x.to_bits() == y.to_bits(),
        _ => a == b && a.type_name() == b.type_name(),
    }
}
