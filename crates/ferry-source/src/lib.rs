//! The server's source of truth, behind [`SourceDb`]: the seam between
//! Ferry's sync service (`ferry-server`) and the database that holds the
//! synced rows and Ferry's own bookkeeping (column clocks, tombstones,
//! bucket membership, the op log, bucket state, client progress and
//! upload outcomes). `ferry-source-sqlite` implements it on SQLite; the
//! conformance suite every implementation runs is [`testkit`] (feature
//! `testkit`), like `ferry-store`'s for client stores.
//!
//! A `SourceDb` stores; it decides nothing. The service computes every op's
//! checksum and each bucket's state and decides which table names are
//! Ferry's own; a database only keeps what it is given, allocates op ids
//! and makes its transactions atomic.
//!
//! Blocking calls (run them off the async threads). No database types in
//! the signatures, and [`SourceError`] holds no driver error, so the
//! service and any backend depend on this crate alone.
//!
//! Invariants every implementation keeps (and the suite checks):
//! - a write transaction ([`SourceDb::write`]) commits everything its work
//!   did, or, when the work returns an error (or the commit fails),
//!   nothing; the work's own error comes back unchanged;
//! - a write transaction is serializable with respect to the rows, bucket
//!   state and client progress it reads: two transactions that read and
//!   then write the same client or row never both commit on a stale read
//!   (no lost update), whatever runs concurrently;
//! - op ids ([`SourceTx::next_op_id`]) are unique and increase, and become
//!   visible in commit order: a reader that has seen op N (in a checkpoint
//!   or a read of the log) never later sees an op below N appear, so a
//!   stream that resumes after N never skips one;
//! - a checkpoint ([`SourceDb::checkpoint`]) is read in one consistent
//!   snapshot: the last op id, bucket states and write checkpoint of one
//!   committed state;
//! - the clock high-water mark ([`SourceDb::max_clock`]) is at least every
//!   clock stored with a row or tombstone, raised in the same transaction.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use ferry_core::{ErrorKind, HlcTimestamp, RowData, Schema, Table};
use ferry_protocol::{BucketChecksum, DataLineWriter, OpKind, OplogEntry, Outcome};
use thiserror::Error;

#[cfg(feature = "testkit")]
pub mod testkit;

/// What can go wrong in a source database.
#[derive(Debug, Error)]
pub enum SourceError {
    /// The database could not be reached, or was too busy to answer in
    /// time (a lock, a full pool, a lost connection).
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// A statement or transaction failed.
    #[error("database error: {0}")]
    Database(String),
    /// Stored data could not be read back.
    #[error("corrupt {what} in the source database: {message}")]
    Corrupt {
        /// What was being read (`"clocks"`, `"op log"`, ...).
        what: String,
        /// Why it could not be read.
        message: String,
    },
    /// The schema cannot be stored in this database (a table name the
    /// database reserves for itself, a type it lacks).
    #[error("schema refused by the source database: {0}")]
    Schema(String),
    /// The database refused a value or a write: a value its column type
    /// cannot hold, a constraint of the app's table (not null, unique,
    /// foreign key, check). Retrying the same write cannot help; the
    /// service rejects the op with this reason (after
    /// [`SourceTx::rollback_to_savepoint`]).
    #[error("the database refused the write: {0}")]
    Refused(String),
    /// A file or directory of the database could not be used.
    #[error("i/o error on {path}: {message}")]
    Io {
        /// The path involved.
        path: String,
        /// What failed.
        message: String,
    },
    /// The work of a write transaction returned this error; the
    /// transaction was rolled back. The caller gets its own error back
    /// (see [`SourceError::into_aborted`]).
    #[error("transaction rolled back: {0}")]
    Aborted(Box<dyn std::error::Error + Send + Sync>),
}

impl SourceError {
    /// Whether retrying can help.
    pub fn kind(&self) -> ErrorKind {
        match self {
            SourceError::Unavailable(_) | SourceError::Database(_) | SourceError::Io { .. } => ErrorKind::Transient,
            SourceError::Corrupt { .. }
            | SourceError::Schema(_)
            | SourceError::Refused(_)
            | SourceError::Aborted(_) => ErrorKind::Permanent,
        }
    }

    /// Wrap the error a transaction's work failed with.
    pub fn aborted(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        SourceError::Aborted(Box::new(e))
    }

    /// The work's own error of an [`SourceError::Aborted`] of type `E`;
    /// any other error back as it is.
    pub fn into_aborted<E: std::error::Error + 'static>(self) -> Result<E, SourceError> {
        match self {
            SourceError::Aborted(b) => match b.downcast::<E>() {
                Ok(e) => Ok(*e),
                Err(b) => Err(SourceError::Aborted(b)),
            },
            other => Err(other),
        }
    }

    /// Stored data that could not be read back.
    pub fn corrupt(what: &str, message: impl fmt::Display) -> Self {
        SourceError::Corrupt {
            what: what.to_owned(),
            message: message.to_string(),
        }
    }
}

/// Results of a source database.
pub type Result<T, E = SourceError> = std::result::Result<T, E>;

/// A row as the source database holds it: its values (every schema
/// column, `None` for a tombstone), the last-write-wins clock of each
/// column, and the delete's clock for a tombstone. The same type the
/// conflict strategies see.
pub type StoredRow = ferry_conflict::CurrentRow;

/// An op's stored outcome with the fingerprint of the op it answered.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredOutcome {
    /// The outcome as recorded.
    pub outcome: Outcome,
    /// FNV-1a 64 of the op's content as received (see
    /// `SyncService::upload`); `None` for an outcome recorded before
    /// fingerprints were kept.
    pub fingerprint: Option<u64>,
}

/// A client's upload progress.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientProgress {
    /// The user the client belongs to (the first to upload with it).
    pub user_id: String,
    /// The highest seq processed (the write checkpoint).
    pub last_seq: u64,
}

/// An op log entry to store, with the id [`SourceTx::next_op_id`] gave it
/// and the checksum the service computed
/// (`ferry_protocol::op_checksum`).
#[derive(Clone, Copy, Debug)]
pub struct NewOp<'a> {
    /// The op id.
    pub op_id: u64,
    /// The bucket instance.
    pub bucket: &'a str,
    /// PUT or REMOVE.
    pub op: OpKind,
    /// The row's table.
    pub table: &'a str,
    /// The row id.
    pub row_id: &'a str,
    /// The row (PUT).
    pub data: Option<&'a RowData>,
    /// `data` as `serde_json::to_string` writes it, when the caller has
    /// it already (a bulk import encodes rows off the writer): a database
    /// that keeps rows as JSON text stores this instead of encoding
    /// `data` again. `None`: the database encodes `data` itself.
    pub data_json: Option<&'a str>,
    /// The entry's checksum.
    pub checksum: u32,
}

/// One row of a bulk write ([`SourceTx::write_rows`]): what
/// [`SourceTx::write_row`] takes for one row.
#[derive(Clone, Copy, Debug)]
pub struct RowWrite<'a> {
    /// The row id.
    pub id: &'a str,
    /// Every column's value.
    pub data: &'a RowData,
    /// The columns' clocks.
    pub clocks: RowClocks<'a>,
    /// `clocks` as [`ferry_core::clock::clocks_json`] writes them (or as
    /// the object `serde_json::to_string` writes: both are text
    /// [`ferry_core::clock::parse_clocks_json`] reads), when the caller
    /// has them already: a database that keeps clocks as JSON text stores
    /// this instead of encoding `clocks` again. `None`: the database
    /// encodes `clocks` itself.
    pub clocks_json: Option<&'a str>,
}

/// The column clocks of a [`RowWrite`]: a map, or one clock for every
/// column of the row's data (a fresh write of a whole row: one op wrote
/// them all), which spares the caller a map of the same clock per column.
#[derive(Clone, Copy, Debug)]
pub enum RowClocks<'a> {
    /// Each column's clock.
    Columns(&'a BTreeMap<String, HlcTimestamp>),
    /// This clock for every column of the row's data (no clocks when the
    /// data has no column).
    Shared(&'a HlcTimestamp),
}

impl<'a> RowClocks<'a> {
    /// The clocks as a map of `data`'s columns (made only for
    /// [`RowClocks::Shared`]).
    pub fn to_map(self, data: &RowData) -> Cow<'a, BTreeMap<String, HlcTimestamp>> {
        match self {
            RowClocks::Columns(map) => Cow::Borrowed(map),
            RowClocks::Shared(hlc) => Cow::Owned(data.keys().map(|k| (k.clone(), hlc.clone())).collect()),
        }
    }

    /// The greatest clock (`None`: no clocks), for `data`'s columns.
    pub fn max(self, data: &RowData) -> Option<&'a HlcTimestamp> {
        match self {
            RowClocks::Columns(map) => map.values().max(),
            RowClocks::Shared(hlc) => (!data.is_empty()).then_some(hlc),
        }
    }
}

/// A bucket's state as the service keeps it: the wrapping sum of its
/// entries' checksums, its number of entries, and its newest op id.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BucketState {
    /// Wrapping sum of the checksums of every entry ever appended
    /// (unchanged by compaction).
    pub checksum: u32,
    /// Entries in the bucket's log.
    pub count: u64,
    /// The newest op id appended to the bucket.
    pub last_op_id: u64,
}

/// A range of one bucket's op log to read: the entries with
/// `after_op_id < op_id <= up_to_op_id`, ascending, at most `max_ops`,
/// and no more than fit in one encoded `data` line of `max_line_bytes`
/// bytes, newline included (at least one entry when there is one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpRange<'a> {
    /// The bucket instance.
    pub bucket: &'a str,
    /// Entries after this op id (exclusive).
    pub after_op_id: u64,
    /// Entries up to this op id (inclusive).
    pub up_to_op_id: u64,
    /// Most entries.
    pub max_ops: usize,
    /// Most bytes of the entries' encoded `data` line, newline included.
    pub max_line_bytes: usize,
}

impl<'a> OpRange<'a> {
    /// Every entry of `bucket`, without limits.
    pub fn all(bucket: &'a str) -> Self {
        OpRange {
            bucket,
            after_op_id: 0,
            up_to_op_id: u64::MAX,
            max_ops: usize::MAX,
            max_line_bytes: usize::MAX,
        }
    }

    /// The entries of `bucket` with `after_op_id < op_id <= up_to_op_id`,
    /// without limits.
    pub fn between(bucket: &'a str, after_op_id: u64, up_to_op_id: u64) -> Self {
        OpRange {
            after_op_id,
            up_to_op_id,
            ..OpRange::all(bucket)
        }
    }

    /// The same range limited to `max_ops` entries of at most
    /// `max_line_bytes` of encoded line.
    pub fn limited(self, max_ops: usize, max_line_bytes: usize) -> Self {
        OpRange {
            max_ops,
            max_line_bytes,
            ..self
        }
    }

    /// The same range starting after `after_op_id`.
    pub fn after(self, after_op_id: u64) -> Self {
        OpRange { after_op_id, ..self }
    }
}

/// A consistent checkpoint for one client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckpointState {
    /// The global max op id.
    pub last_op_id: u64,
    /// The requested buckets' state (absent buckets: checksum 0, count 0).
    pub buckets: Vec<BucketChecksum>,
    /// The client's last processed seq, if it ever uploaded.
    pub write_checkpoint: Option<u64>,
}

/// What changed after an op id ([`SourceDb::changes_since`]), read in
/// one consistent snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChangesSince {
    /// The global max op id.
    pub last_op_id: u64,
    /// Every bucket whose newest entry is above the op id asked for, with
    /// its state, by name.
    pub buckets: Vec<(String, BucketState)>,
    /// The last seq of each client asked for that ever uploaded.
    pub clients: Vec<(String, u64)>,
}

/// What a write transaction can do. Reads see the transaction's own
/// writes.
pub trait SourceTx {
    /// The client's progress, if it uploaded before.
    fn client(&mut self, client_id: &str) -> Result<Option<ClientProgress>>;
    /// Record the client's progress (the owner is kept once set).
    fn set_client(&mut self, client_id: &str, user_id: &str, last_seq: u64) -> Result<()>;
    /// The stored outcome of an op, with the fingerprint of the op it
    /// answered.
    fn outcome(&mut self, client_id: &str, seq: u64) -> Result<Option<StoredOutcome>>;
    /// Store (or replace) an op's outcome and the fingerprint of the op's
    /// content, so a replay of `(client_id, seq)` can be told from a
    /// different write.
    fn record_outcome(&mut self, client_id: &str, seq: u64, fingerprint: u64, outcome: &Outcome) -> Result<()>;
    /// Delete the client's stored outcomes with `seq < below_seq` (the
    /// client has them: it only uploads from `below_seq` once every write
    /// before was answered). Returns how many were deleted.
    fn prune_outcomes(&mut self, client_id: &str, below_seq: u64) -> Result<u64>;
    /// Read a row or its tombstone.
    fn read_row(&mut self, table: &Table, id: &str) -> Result<Option<StoredRow>>;
    /// Write a whole row (every column) and its clocks; clears a tombstone.
    /// Returns the row as the database now holds it when it keeps values
    /// in a form of its own (PostgreSQL: a numeric's scale, jsonb's
    /// spacing, a timestamp's zone), so the ops carry what a later read
    /// returns; `None` when it keeps them as given.
    ///
    /// Invariant: the clock high-water mark ([`SourceDb::max_clock`]) is
    /// raised to the greatest of `clocks` in this same transaction.
    fn write_row(
        &mut self,
        table: &Table,
        id: &str,
        data: &RowData,
        clocks: &BTreeMap<String, HlcTimestamp>,
    ) -> Result<Option<RowData>>;
    /// Record the clocks of a row the database holds but Ferry did not
    /// write (a change made directly in the database, a row older than
    /// Ferry): replaces its clocks and clears its tombstone; its values are
    /// left as they are (nothing is written to the row itself).
    ///
    /// Invariant: the clock high-water mark is raised to the greatest of
    /// `clocks` in this same transaction.
    fn set_clocks(&mut self, table: &str, id: &str, clocks: &BTreeMap<String, HlcTimestamp>) -> Result<()>;
    /// Delete a row, leaving a tombstone with the delete's clock (and no
    /// column clocks).
    ///
    /// Invariant: the clock high-water mark ([`SourceDb::max_clock`]) is
    /// raised to `hlc` in this same transaction.
    fn delete_row(&mut self, table: &Table, id: &str, hlc: &HlcTimestamp) -> Result<()>;
    /// The bucket instances the row is in.
    fn row_buckets(&mut self, table: &str, id: &str) -> Result<BTreeSet<String>>;
    /// Replace the row's bucket membership.
    fn set_row_buckets(&mut self, table: &str, id: &str, buckets: &BTreeSet<String>) -> Result<()>;
    /// Write many rows of one table, each as [`SourceTx::write_row`]
    /// writes it, in order (a later row of the same id wins). Returns, row
    /// by row, what `write_row` returns. The default calls `write_row` for
    /// each; a database may write them with fewer statements.
    fn write_rows(&mut self, table: &Table, rows: &[RowWrite<'_>]) -> Result<Vec<Option<RowData>>> {
        rows.iter()
            .map(|r| self.write_row(table, r.id, r.data, &r.clocks.to_map(r.data)))
            .collect()
    }
    /// The ids among `ids` that the database holds anything of that a
    /// write must look at first: a row ([`SourceTx::read_row`] finds its
    /// values or its tombstone) or bucket membership
    /// ([`SourceTx::row_buckets`] is not empty). An id not returned reads
    /// as no row in no bucket. The default asks `read_row` and
    /// `row_buckets` for each id.
    fn known_rows(&mut self, table: &Table, ids: &[&str]) -> Result<BTreeSet<String>> {
        let mut known = BTreeSet::new();
        for &id in ids {
            if self.read_row(table, id)?.is_some() || !self.row_buckets(&table.name, id)?.is_empty() {
                known.insert(id.to_owned());
            }
        }
        Ok(known)
    }
    /// For each of `ids`, in order, what [`SourceTx::read_row`] and
    /// [`SourceTx::row_buckets`] answer (a pass over rows that are already
    /// there). The default reads them ahead ([`SourceTx::prefetch_rows`])
    /// and then asks for each; a database may answer them all with a few
    /// statements.
    fn read_rows_with_buckets(
        &mut self,
        table: &Table,
        ids: &[&str],
    ) -> Result<Vec<(Option<StoredRow>, BTreeSet<String>)>> {
        self.prefetch_rows(table, ids)?;
        ids.iter()
            .map(|id| Ok((self.read_row(table, id)?, self.row_buckets(&table.name, id)?)))
            .collect()
    }
    /// Set the column clocks of many rows of one table, each as
    /// [`SourceTx::set_clocks`] does, in order. The default calls it for
    /// each.
    fn set_many_clocks(&mut self, table: &str, rows: &[(&str, &BTreeMap<String, HlcTimestamp>)]) -> Result<()> {
        for (id, clocks) in rows {
            self.set_clocks(table, id, clocks)?;
        }
        Ok(())
    }
    /// Replace the bucket membership of many rows of one table, each as
    /// [`SourceTx::set_row_buckets`] does, in order. The default calls it
    /// for each.
    fn set_rows_buckets(&mut self, table: &str, rows: &[(&str, &BTreeSet<String>)]) -> Result<()> {
        for (id, buckets) in rows {
            self.set_row_buckets(table, id, buckets)?;
        }
        Ok(())
    }
    /// Record the bucket membership of rows that have none, as
    /// [`SourceTx::set_rows_buckets`] does: for rows [`SourceTx::known_rows`]
    /// did not return in this transaction and that nothing gave
    /// membership since (a bulk import's new rows), so a database need
    /// not clear what is not there. The default calls `set_rows_buckets`.
    fn add_rows_buckets(&mut self, table: &str, rows: &[(&str, &BTreeSet<String>)]) -> Result<()> {
        self.set_rows_buckets(table, rows)
    }
    /// Allocate the next global op id: above every op id ever committed
    /// and every id allocated before in this transaction. Ids become
    /// visible in commit order (see the crate's invariants).
    fn next_op_id(&mut self) -> Result<u64>;
    /// Store an op log entry as given (id and checksum included).
    fn append_op(&mut self, op: NewOp<'_>) -> Result<()>;
    /// Store many op log entries as given, each as
    /// [`SourceTx::append_op`] stores it, in order. The default calls
    /// `append_op` for each; a database may store them with fewer
    /// statements.
    fn append_ops(&mut self, ops: &[NewOp<'_>]) -> Result<()> {
        for op in ops {
            self.append_op(*op)?;
        }
        Ok(())
    }
    /// A bucket's state (`None`: the bucket never had an entry).
    fn bucket_state(&mut self, bucket: &str) -> Result<Option<BucketState>>;
    /// Store a bucket's state.
    fn set_bucket_state(&mut self, bucket: &str, state: &BucketState) -> Result<()>;
    /// A bucket's whole log, ascending.
    fn bucket_ops(&mut self, bucket: &str) -> Result<Vec<OplogEntry>>;
    /// Replace a bucket's log with `entries` (compaction); the bucket's
    /// state is the caller's to update.
    fn replace_bucket_ops(&mut self, bucket: &str, entries: &[OplogEntry]) -> Result<()>;
    /// Set one of Ferry's own settings (`ferry.rules_fingerprint`, ...).
    fn set_meta(&mut self, key: &str, value: &str) -> Result<()>;
    /// Take up to `limit` captured changes, oldest first: rows the app's
    /// backend (or anyone but Ferry) changed in the database, and tables
    /// it truncated. They are gone once this transaction commits and back
    /// if it rolls back. A truncate ([`CaptureKind::Truncate`]) is the
    /// last change of the answer: the changes captured after it are left
    /// for a later call, so it is handled before them. A database without
    /// capture has none (the default).
    fn take_captured(&mut self, limit: usize) -> Result<Vec<CapturedChange>> {
        let _ = limit;
        Ok(Vec::new())
    }
    /// Put back a change taken in this transaction
    /// ([`SourceTx::take_captured`]), as given (a truncate with the
    /// progress of its handling), at its place in the capture order: the
    /// next call takes it first again. For a truncate whose rows take
    /// more than one transaction. A database without capture never hands
    /// out a change, so has none to put back (the default does nothing).
    fn put_back_captured(&mut self, change: &CapturedChange) -> Result<()> {
        let _ = change;
        Ok(())
    }
    /// One step of a walk over the ids of `table` that Ferry keeps
    /// bookkeeping for (column clocks or bucket membership; tombstones
    /// not included): the next at most `limit` of them after `after_id`
    /// (exclusive; `None`: from the first), in the database's order of
    /// ids. Returns those whose row the table does not hold now (rows that
    /// went without Ferry: a truncate), and where the walk goes on
    /// ([`VanishedRows::next_after`], `None` once it looked at the last
    /// id). A database whose rows only Ferry writes has no such row: the
    /// default answers none and ends the walk.
    fn vanished_rows(&mut self, table: &Table, after_id: Option<&str>, limit: usize) -> Result<VanishedRows> {
        let _ = (table, after_id, limit);
        Ok(VanishedRows::default())
    }
    /// Mark the transaction's state before one op's writes (one savepoint
    /// at a time: a new one replaces the last).
    fn savepoint(&mut self) -> Result<()>;
    /// Undo every write since [`SourceTx::savepoint`], keeping the
    /// transaction usable (after a [`SourceError::Refused`] write, too).
    fn rollback_to_savepoint(&mut self) -> Result<()>;
    /// Keep the writes since [`SourceTx::savepoint`] and forget it.
    fn release_savepoint(&mut self) -> Result<()>;
    /// Read ahead what [`SourceTx::read_row`] and
    /// [`SourceTx::row_buckets`] are about to be asked for these rows (an
    /// upload's rows), so a database across a network answers them in one
    /// round trip instead of one per row. Reads still see the
    /// transaction's own writes and what a rollback undid, as without it.
    /// The default does nothing (an embedded database reads a row as fast
    /// either way).
    fn prefetch_rows(&mut self, table: &Table, ids: &[&str]) -> Result<()> {
        let _ = (table, ids);
        Ok(())
    }
    /// When `on`, an op's writes may reach the database after
    /// [`SourceTx::release_savepoint`] returned (with the next read or the
    /// commit), so a transaction of many ops takes few round trips. A
    /// write the database refuses then fails the whole transaction (an
    /// error of kind refused), not its op, and
    /// [`SourceTx::rollback_to_savepoint`] may fail once an op's writes
    /// were sent: the caller runs the transaction again with it off to
    /// find the op. Off until called. Returns whether it is on: a
    /// database that writes at once (the default) never defers.
    fn defer_op_writes(&mut self, on: bool) -> bool {
        let _ = on;
        false
    }
}

/// Commit notifications of a source database: the value changes (a
/// counter, wrapping) after every committed write transaction, so a
/// stream waiting on [`tokio::sync::watch::Receiver::changed`] wakes and
/// reads what is new. Notifications may be merged (a wait may cover
/// several commits) and, for a database several servers share, may come
/// late or be lost with a connection: streams also look for new ops on
/// every keepalive.
pub type CommitReceiver = tokio::sync::watch::Receiver<u64>;

/// A change made in the database by someone other than Ferry (see
/// [`SourceTx::take_captured`]): a row's id only (the row is read again
/// when the change is turned into ops), or a truncate of a table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CapturedChange {
    /// The capture order.
    pub seq: u64,
    /// The synced table.
    pub table: String,
    /// The row id (the primary key as text); empty for a truncate.
    pub id: String,
    /// What changed.
    pub kind: CaptureKind,
    /// For a row change, the synced columns it changed (by name in the
    /// rules): only their clocks move. `None`: any column may have
    /// changed (an insert, a delete, a new key, a database that does not
    /// tell), so every column's clock moves.
    pub columns: Option<Vec<String>>,
}

/// What a [`CapturedChange`] is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CaptureKind {
    /// The row was inserted, updated or deleted.
    Row,
    /// The table was truncated: every row Ferry knew of before it and the
    /// table does not hold now is gone ([`SourceTx::vanished_rows`]).
    Truncate {
        /// Where the walk over the table's known ids stopped in an
        /// earlier transaction (the change was put back with
        /// [`SourceTx::put_back_captured`]); `None`: not started.
        after_id: Option<String>,
    },
}

/// One step of [`SourceTx::vanished_rows`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VanishedRows {
    /// The ids looked at whose row the table does not hold, ascending.
    pub ids: Vec<String>,
    /// The last id looked at, to go on after; `None` when the walk is
    /// done.
    pub next_after: Option<String>,
}

/// A job one server at a time does among those sharing a database
/// ([`SourceDb::try_lead`]); held until dropped.
pub trait Lease: Send + fmt::Debug {
    /// Whether the lease still holds (a lost database connection ends it).
    fn is_held(&self) -> bool;
}

/// The lease of a database only one process uses.
#[derive(Debug)]
pub struct SoleLease;

impl Lease for SoleLease {
    fn is_held(&self) -> bool {
        true
    }
}

/// A receiver that never fires (a database without capture).
fn never_changes() -> CommitReceiver {
    static NEVER: std::sync::OnceLock<tokio::sync::watch::Sender<u64>> = std::sync::OnceLock::new();
    NEVER.get_or_init(|| tokio::sync::watch::channel(0).0).subscribe()
}

/// The source of truth. See the crate's invariants.
pub trait SourceDb: Send + Sync + fmt::Debug {
    /// Subscribe to commit notifications: every write transaction that
    /// commits through this database (SQLite: in-process), and, where the
    /// database can tell (PostgreSQL: LISTEN/NOTIFY), those of other
    /// servers sharing it. A rolled-back transaction notifies nothing.
    fn commits(&self) -> CommitReceiver;
    /// Notifications of captured changes ([`SourceTx::take_captured`]):
    /// the value changes when there may be new ones. Like commit
    /// notifications they may merge or be lost; the capture job also
    /// looks on a timer. The default never fires (no capture).
    fn captures(&self) -> CommitReceiver {
        never_changes()
    }
    /// Try to become the one server doing `job` (`"capture"`,
    /// `"compact"`) among all servers sharing this database: `Some` lease
    /// while no other holds it. The default, for a database one process
    /// owns, always grants it.
    fn try_lead(&self, job: &str) -> Result<Option<Box<dyn Lease>>> {
        let _ = job;
        Ok(Some(Box::new(SoleLease)))
    }
    /// Create or extend the tables of the schema (new tables, new columns;
    /// existing rows keep their values, new columns read NULL). Which
    /// names are Ferry's own is the sync rules' business; a database
    /// refuses only names it reserves itself ([`SourceError::Schema`]).
    fn migrate(&self, schema: &Schema) -> Result<()>;
    /// Run `work` in one transaction: commit when it returns `Ok`, roll
    /// back when it returns `Err` (that error is returned as it is). The
    /// transaction is serializable with respect to what it reads. A
    /// database may run `work` again after a serialization failure, so
    /// `work` must start from scratch each time (only the last run's
    /// writes commit).
    fn write(&self, work: &mut dyn FnMut(&mut dyn SourceTx) -> Result<()>) -> Result<()>;
    /// The checkpoint for a client over these buckets (in the order
    /// given), read in one consistent snapshot.
    fn checkpoint(&self, client_id: &str, buckets: &[String]) -> Result<CheckpointState>;
    /// What changed after `after_op_id`, in one consistent snapshot: the
    /// last op id, the buckets with an entry above it (their state), and
    /// the progress of `clients`. The shared change feed of a server reads
    /// this once per commit for all its streams.
    fn changes_since(&self, after_op_id: u64, clients: &[String]) -> Result<ChangesSince>;
    /// The entries of `range` ([`OpRange`]). The stream measures the
    /// encoding again, so a database may return more than fit in the
    /// line; the rest is read again next line.
    fn read_ops(&self, range: &OpRange<'_>) -> Result<Vec<OplogEntry>>;
    /// The same entries as [`SourceDb::read_ops`], appended to an encoded
    /// `data` line instead of returned typed, up to the line's size limit
    /// (the writer refuses entries past it). Returns the last op id added
    /// (`None` when there was none). The default encodes `read_ops`'s
    /// entries; a database that keeps rows as JSON text copies them as
    /// they are.
    fn read_ops_into(&self, range: &OpRange<'_>, line: &mut DataLineWriter) -> Result<Option<u64>> {
        let ops = self.read_ops(range)?;
        line.lower_max_line_bytes(range.max_line_bytes);
        for e in &ops {
            if !line.push_entry(e) {
                break;
            }
        }
        Ok(line.last_op_id())
    }
    /// Every bucket with entries, by name.
    fn bucket_names(&self) -> Result<Vec<String>>;
    /// The number of op log entries (all buckets).
    fn oplog_len(&self) -> Result<u64>;
    /// Read a row (for inspection and tests).
    fn get_row(&self, table: &Table, id: &str) -> Result<Option<StoredRow>>;
    /// The user a client id belongs to (the first user that uploaded with
    /// it), `None` for a client id never used for an upload.
    fn client_owner(&self, client_id: &str) -> Result<Option<String>>;
    /// A client's progress as last committed (`None`: a client id never
    /// used for an upload), read outside any write transaction: a hint
    /// that may be stale by the time it is used (a write transaction
    /// reads it again with [`SourceTx::client`] before relying on it).
    /// The default reads it in a write transaction; a database may read
    /// it without taking what serializes its writers.
    fn client_progress(&self, client_id: &str) -> Result<Option<ClientProgress>> {
        let mut progress = None;
        self.write(&mut |tx| {
            progress = tx.client(client_id)?;
            Ok(())
        })?;
        Ok(progress)
    }
    /// A client's stored outcomes with `seq > after_seq`, ascending by
    /// seq, at most `limit` of them (for diagnostics: an operator pages
    /// through them with the last seq seen). Empty for a client id with
    /// no stored outcome.
    fn client_outcomes(&self, client_id: &str, after_seq: u64, limit: usize) -> Result<Vec<(u64, StoredOutcome)>>;
    /// One of Ferry's own settings ([`SourceTx::set_meta`]).
    fn meta(&self, key: &str) -> Result<Option<String>>;
    /// The ids of the table's rows (tombstones not included) after
    /// `after_id` (exclusive; `None`: from the first), at most `limit`, in
    /// the database's order of its key, so a scan in batches visits every
    /// row that exists throughout it once. For background passes over
    /// existing data (bucket membership).
    fn row_ids(&self, table: &Table, after_id: Option<&str>, limit: usize) -> Result<Vec<String>>;
    /// The clock high-water mark: at least every clock ever stored with a
    /// row or tombstone ([`SourceTx::write_row`], [`SourceTx::delete_row`]
    /// keep it in their transaction), `None` when none was stored. The
    /// service observes it at start, so its hybrid logical clock never
    /// falls behind a stored clock, also across restarts.
    fn max_clock(&self) -> Result<Option<HlcTimestamp>>;
}
