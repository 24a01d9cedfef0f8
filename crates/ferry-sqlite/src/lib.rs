//! Ferry's [`Store`] on SQLite (rusqlite, bundled SQLite).
//!
//! # Data model
//!
//! One SQLite database file holds every layer of the store:
//!
//! | table                  | key                    | contents                                        |
//! |------------------------|------------------------|-------------------------------------------------|
//! | `ferry_rows`           | `(tbl, id)`            | synced rows, `data` = [`codec::encode_row`]     |
//! | `ferry_index`          | `(tbl, idx, key)`      | [`ferry_store::index_key`] of every synced row, for every declared index; `id` names the row |
//! | `ferry_overlay`        | `(tbl, id)`            | overlay entries; `data` NULL = [`OverlayEntry::Deleted`] |
//! | `ferry_queue`          | `seq`                  | upload queue, `entry` = [`codec::encode_entry`]; `overlay`: overlay entries a local write left here (see `overlay_tail.rs`), NULL once in `ferry_overlay` |
//! | `ferry_bucket_entries` | `(bucket, tbl, row_id)`| bucket entries ([`BucketEntry`]): `op_id`, `checksum` |
//! | `ferry_buckets`        | `name`                 | bucket state                                    |
//! | `ferry_meta`           | `key`                  | metadata                                        |
//! | `ferry_index_defs`     | `(tbl, idx)`           | the index definitions the entries were built for |
//! | `ferry_staged`         | `(bucket, op_id)`      | the staging area's ops; a PUT's row inline, or in `ferry_staged_rows` (`side`) |
//! | `ferry_staged_rows`    | `(tbl, id)`            | staged rows, laid out as `ferry_rows` (see `staged_rows.rs`) |
//! | `ferry_staged_state`   | `name`                 | whether `ferry_staged_rows` may hold rows no staged op puts; its generation |
//!
//! The storage format version lives in `PRAGMA user_version` and is
//! [`FORMAT_VERSION`] (4). Version 2 replaced version 1's per-bucket op log
//! (`ferry_bucket_ops`) with `ferry_bucket_entries`; version 3 keeps staged
//! rows apart (`ferry_staged_rows`), and a version 2 database is migrated
//! when opened (its staged ops keep their rows inline); version 4 adds
//! `ferry_queue.overlay` (NULL in the rows of older versions, which are
//! migrated when opened). No version 1
//! database was ever shipped, so there is no migration from it: opening a
//! version 1 (or any other unknown version) database fails with a
//! non-retryable [`StoreError::Backend`] error naming both versions,
//! leaving the data in the file untouched.
//!
//! # Invariants
//!
//! - Every [`Store::apply`] runs in one `BEGIN IMMEDIATE` transaction: a
//!   batch is applied entirely or not at all, and a batch that fails
//!   validation (or any statement) changes nothing.
//! - For every declared index of the schema the store was opened with,
//!   `ferry_index` holds exactly one entry per synced row of the table.
//!   Index keys compare bytewise in index order, so an index range scan is
//!   one B-tree range of `ferry_index`. When a store is reopened with a
//!   schema whose indexes differ from those recorded in `ferry_index_defs`,
//!   the entries of new or changed indexes are rebuilt and those of removed
//!   indexes dropped, in one transaction, before `open` returns.
//! - Queue seqs and bucket entry op ids are stored as SQLite integers and
//!   must be at most `i64::MAX` (2^63 - 1); realistically they are far
//!   below that. Larger values are rejected with
//!   [`StoreError::InvalidInput`] (never a panic, never silently
//!   misordered), and the batch changes nothing. Bounds passed to reads
//!   (`queue_from`, `CompleteQueue`) may be any `u64`. Bucket state
//!   counters are stored through their `i64` bit pattern and so round-trip
//!   every `u64`.
//! - Text columns use SQLite's BINARY collation (memcmp), which orders ids,
//!   bucket names and keys exactly as Rust's `str` ordering does; so
//!   `bucket_entries` pages (`(tbl, row_id) > (?, ?)`, ordered by
//!   `tbl, row_id`) come in the order of `(String, String)`.
//!
//! # Durability
//!
//! The database runs in WAL mode. With [`Synchronous::Normal`] (the
//! default) a committed batch survives a crash of the process, which is
//! the [`Store`] contract; with [`Synchronous::Full`] it also survives an
//! operating system crash or power loss, at the cost of an fsync per
//! batch.
//!
//! # Concurrency
//!
//! A [`SqliteStore`] owns one connection behind a mutex: calls on one store
//! are serialized. Other processes may open the same file; while they hold
//! a write lock, calls wait up to [`SqliteOptions::busy_timeout_ms`] and
//! then fail with a retryable error.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferry_core::{codec, CrudEntry, Index, RowData, Schema, Value};
use ferry_store::{
    index_key, resolve_index_range, table_def, validate_batch_but_staged, BatchOp, BucketEntry, BucketState,
    IndexRange, OverlayEntry, Rows, StagedCheck, StagedOp, StagedSummary, Store, StoreError, StoreResult, WriteBatch,
};
use parking_lot::Mutex;
use rusqlite::{params, CachedStatement, Connection, ErrorCode, OptionalExtension, TransactionBehavior};

mod checkpoint;
mod overlay_tail;
mod staged_rows;
mod staging;
mod txn;

/// The storage format version kept in `PRAGMA user_version`.
pub const FORMAT_VERSION: i64 = 4;

const BACKEND: &str = "sqlite";

/// Enough for every distinct statement this backend prepares, so hot-path
/// statements are never evicted.
const STATEMENT_CACHE_CAPACITY: usize = 96;

/// How SQLite syncs commits to disk (`PRAGMA synchronous`). The database
/// always runs in WAL mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Synchronous {
    /// `synchronous=NORMAL`: commits are durable against a crash of the
    /// process (the [`Store`] contract) but the last commits may be lost
    /// if the operating system crashes or power fails. The database is
    /// never corrupted either way. Much faster for small batches.
    #[default]
    Normal,
    /// `synchronous=FULL`: every commit is synced to stable storage before
    /// `apply` returns, so it also survives power loss.
    Full,
}

impl Synchronous {
    fn pragma_value(self) -> &'static str {
        match self {
            Synchronous::Normal => "NORMAL",
            Synchronous::Full => "FULL",
        }
    }
}

/// Options for [`SqliteStore::open_with`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SqliteOptions {
    /// Commit durability; see [`Synchronous`]. Default: `Normal`.
    pub synchronous: Synchronous,
    /// SQLite page cache size in KiB (`PRAGMA cache_size = -N`).
    /// Default: 8192 (8 MiB).
    pub cache_size_kib: u32,
    /// How long a call waits for a lock held by another connection before
    /// failing with a retryable error. Default: 5000 ms.
    pub busy_timeout_ms: u64,
}

/// The WAL size a store keeps to ([`SqliteStore::open_with_wal_limit`]):
/// a download being staged restarts the WAL past it, and once a
/// checkpoint copied the WAL the file is cut back to it (`PRAGMA
/// journal_size_limit`; a large batch, such as a first sync's switch-in,
/// grows the WAL to about its size, which would otherwise stay on disk).
pub const DEFAULT_WAL_SIZE_LIMIT_BYTES: u64 = 64 * 1024 * 1024;

impl Default for SqliteOptions {
    fn default() -> Self {
        SqliteOptions {
            synchronous: Synchronous::Normal,
            cache_size_kib: 8 * 1024,
            busy_timeout_ms: 5_000,
        }
    }
}

/// A [`Store`] in an SQLite database. See the crate docs for the layout,
/// invariants and durability.
pub struct SqliteStore {
    schema: Schema,
    path: Option<PathBuf>,
    conn: Mutex<Connection>,
    /// Overlay entries kept in queue rows (`overlay_tail.rs`); locked
    /// after `conn`, and only with it.
    tail: Mutex<overlay_tail::OverlayTail>,
    /// Checkpoints large commits off the writer's path (file databases).
    checkpointer: Option<checkpoint::Checkpointer>,
    /// The store's WAL size limit in pages of this database.
    wal_limit_pages: u64,
    /// The database's page size in bytes.
    page_size: u64,
    /// `SqliteOptions::busy_timeout_ms`.
    busy_timeout_ms: u64,
}

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .field(
                "tables",
                &self.schema.tables().map(|t| t.name.as_str()).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

// ----- errors and integer conversions -----

/// Map a rusqlite error to a [`StoreError`]: lock contention is retryable,
/// values of unexpected types are corruption, the rest permanent.
fn sql_err(e: rusqlite::Error) -> StoreError {
    match &e {
        rusqlite::Error::InvalidColumnType(..)
        | rusqlite::Error::FromSqlConversionFailure(..)
        | rusqlite::Error::IntegralValueOutOfRange(..) => StoreError::Corrupt(e.to_string()),
        _ => {
            let retryable = matches!(
                e.sqlite_error_code(),
                Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked | ErrorCode::OperationInterrupted)
            );
            StoreError::Backend {
                backend: BACKEND,
                message: e.to_string(),
                retryable,
            }
        }
    }
}

fn invalid(message: String) -> StoreError {
    StoreError::Backend {
        backend: BACKEND,
        message,
        retryable: false,
    }
}

/// A seq or op id to store: it must fit an SQLite integer so that integer
/// order is `u64` order.
fn ordered_key(what: &str, v: u64) -> StoreResult<i64> {
    i64::try_from(v)
        .map_err(|_| StoreError::InvalidInput(format!("{what} {v} is above the supported maximum {}", i64::MAX)))
}

/// A bound on stored seqs / op ids: values above `i64::MAX` are never
/// stored, so clamping keeps the comparison's meaning.
fn clamp_bound(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A stored seq / op id back as `u64` (a negative value is corruption).
fn from_ordered_key(what: &str, v: i64) -> StoreResult<u64> {
    u64::try_from(v).map_err(|_| StoreError::Corrupt(format!("negative {what} {v}")))
}

/// A `u64` that is only stored and read back, never ordered.
fn bits_to_i64(v: u64) -> i64 {
    v as i64
}

fn bits_to_u64(v: i64) -> u64 {
    v as u64
}

fn limit_i64(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

fn index_columns(index: &Index) -> String {
    // Column names are ASCII letters, digits and underscores (the schema
    // checks them), so a comma cannot be part of one.
    index.columns.join(",")
}

// ----- schema of the database -----

/// A table of synced rows named `$name`: `ferry_rows`, and
/// `ferry_staged_rows`, which a first sync's switch-in renames to
/// `ferry_rows` (so the two must be defined alike).
macro_rules! rows_table_sql {
    ($name:literal) => {
        concat!(
            "CREATE TABLE IF NOT EXISTS ",
            $name,
            " (
    tbl TEXT NOT NULL,
    id TEXT NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (tbl, id)
) WITHOUT ROWID;
"
        )
    };
}
pub(crate) use rows_table_sql;

const CREATE_TABLES: &str = concat!(
    rows_table_sql!("ferry_rows"),
    "
CREATE TABLE IF NOT EXISTS ferry_index (
    tbl TEXT NOT NULL,
    idx TEXT NOT NULL,
    key BLOB NOT NULL,
    id TEXT NOT NULL,
    PRIMARY KEY (tbl, idx, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS ferry_overlay (
    tbl TEXT NOT NULL,
    id TEXT NOT NULL,
    data BLOB,
    PRIMARY KEY (tbl, id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS ferry_queue (
    seq INTEGER PRIMARY KEY,
    entry BLOB NOT NULL,
    overlay BLOB
);
CREATE TABLE IF NOT EXISTS ferry_bucket_entries (
    bucket TEXT NOT NULL,
    tbl TEXT NOT NULL,
    row_id TEXT NOT NULL,
    op_id INTEGER NOT NULL,
    checksum INTEGER NOT NULL,
    PRIMARY KEY (bucket, tbl, row_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS ferry_buckets (
    name TEXT PRIMARY KEY NOT NULL,
    last_op_id INTEGER NOT NULL,
    checksum INTEGER NOT NULL,
    count INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS ferry_meta (
    key TEXT PRIMARY KEY NOT NULL,
    value BLOB NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS ferry_index_defs (
    tbl TEXT NOT NULL,
    idx TEXT NOT NULL,
    columns TEXT NOT NULL,
    PRIMARY KEY (tbl, idx)
) WITHOUT ROWID;
"
);

const SQL_GET_ROW: &str = "SELECT data FROM ferry_rows WHERE tbl = ?1 AND id = ?2";
const SQL_PUT_ROW: &str = "INSERT OR REPLACE INTO ferry_rows (tbl, id, data) VALUES (?1, ?2, ?3)";
const SQL_DELETE_ROW: &str = "DELETE FROM ferry_rows WHERE tbl = ?1 AND id = ?2";
const SQL_PUT_INDEX: &str = "INSERT OR REPLACE INTO ferry_index (tbl, idx, key, id) VALUES (?1, ?2, ?3, ?4)";
const SQL_DELETE_INDEX: &str = "DELETE FROM ferry_index WHERE tbl = ?1 AND idx = ?2 AND key = ?3";
const SQL_PUT_OVERLAY: &str = "INSERT OR REPLACE INTO ferry_overlay (tbl, id, data) VALUES (?1, ?2, ?3)";
const SQL_DELETE_OVERLAY: &str = "DELETE FROM ferry_overlay WHERE tbl = ?1 AND id = ?2";
const SQL_APPEND_QUEUE: &str = "INSERT INTO ferry_queue (seq, entry) VALUES (?1, ?2)";
const SQL_COMPLETE_QUEUE: &str = "DELETE FROM ferry_queue WHERE seq <= ?1";
const SQL_LAST_SEQ: &str = "SELECT max(seq) FROM ferry_queue";
const SQL_PUT_BUCKET_ENTRY: &str = "INSERT OR REPLACE INTO ferry_bucket_entries \
                                    (bucket, tbl, row_id, op_id, checksum) VALUES (?1, ?2, ?3, ?4, ?5)";
const SQL_DELETE_BUCKET_ENTRY: &str = "DELETE FROM ferry_bucket_entries WHERE bucket = ?1 AND tbl = ?2 AND row_id = ?3";
const SQL_PUT_BUCKET: &str = "INSERT OR REPLACE INTO ferry_buckets (name, last_op_id, checksum, count) \
                              VALUES (?1, ?2, ?3, ?4)";
const SQL_DELETE_BUCKET: &str = "DELETE FROM ferry_buckets WHERE name = ?1";
const SQL_DELETE_BUCKET_ENTRIES: &str = "DELETE FROM ferry_bucket_entries WHERE bucket = ?1";
const SQL_GET_BUCKET_ENTRY: &str = "SELECT tbl, row_id, op_id, checksum FROM ferry_bucket_entries \
     WHERE bucket = ?1 AND tbl = ?2 AND row_id = ?3";
const SQL_BUCKET_ENTRIES: &str = "SELECT tbl, row_id, op_id, checksum FROM ferry_bucket_entries \
     WHERE bucket = ?1 ORDER BY tbl, row_id LIMIT ?2";
const SQL_BUCKET_ENTRIES_AFTER: &str = "SELECT tbl, row_id, op_id, checksum FROM ferry_bucket_entries \
     WHERE bucket = ?1 AND (tbl, row_id) > (?2, ?3) ORDER BY tbl, row_id LIMIT ?4";
const SQL_PUT_META: &str = "INSERT OR REPLACE INTO ferry_meta (key, value) VALUES (?1, ?2)";
const SQL_DELETE_META: &str = "DELETE FROM ferry_meta WHERE key = ?1";

/// The index scan drives from `ferry_index` (CROSS JOIN fixes the loop
/// order) and looks each row up by primary key.
const SQL_SCAN_INDEX_TO: &str = "SELECT r.id, r.data FROM ferry_index AS i CROSS JOIN ferry_rows AS r \
     ON r.tbl = i.tbl AND r.id = i.id \
     WHERE i.tbl = ?1 AND i.idx = ?2 AND i.key >= ?3 AND i.key < ?4 ORDER BY i.key";
const SQL_SCAN_INDEX_FROM: &str = "SELECT r.id, r.data FROM ferry_index AS i CROSS JOIN ferry_rows AS r \
     ON r.tbl = i.tbl AND r.id = i.id \
     WHERE i.tbl = ?1 AND i.idx = ?2 AND i.key >= ?3 ORDER BY i.key";
// Limited index scans, from either end of the range: the index table's
// primary key `(tbl, idx, key)` is walked in order, so only `LIMIT`
// entries (and their rows) are read.
const SQL_SCAN_INDEX_TO_LIMIT: &str = "SELECT r.id, r.data FROM ferry_index AS i CROSS JOIN ferry_rows AS r \
     ON r.tbl = i.tbl AND r.id = i.id \
     WHERE i.tbl = ?1 AND i.idx = ?2 AND i.key >= ?3 AND i.key < ?4 ORDER BY i.key LIMIT ?5";
const SQL_SCAN_INDEX_FROM_LIMIT: &str = "SELECT r.id, r.data FROM ferry_index AS i CROSS JOIN ferry_rows AS r \
     ON r.tbl = i.tbl AND r.id = i.id \
     WHERE i.tbl = ?1 AND i.idx = ?2 AND i.key >= ?3 ORDER BY i.key LIMIT ?4";
const SQL_SCAN_INDEX_TO_LIMIT_DESC: &str = "SELECT r.id, r.data FROM ferry_index AS i CROSS JOIN ferry_rows AS r \
     ON r.tbl = i.tbl AND r.id = i.id \
     WHERE i.tbl = ?1 AND i.idx = ?2 AND i.key >= ?3 AND i.key < ?4 ORDER BY i.key DESC LIMIT ?5";
const SQL_SCAN_INDEX_FROM_LIMIT_DESC: &str = "SELECT r.id, r.data FROM ferry_index AS i CROSS JOIN ferry_rows AS r \
     ON r.tbl = i.tbl AND r.id = i.id \
     WHERE i.tbl = ?1 AND i.idx = ?2 AND i.key >= ?3 ORDER BY i.key DESC LIMIT ?4";

// ----- opening -----

impl SqliteStore {
    /// Open (creating if needed) the store in the database file at `path`
    /// with default [`SqliteOptions`].
    pub fn open(path: impl AsRef<Path>, schema: Schema) -> StoreResult<Self> {
        Self::open_with(path, schema, SqliteOptions::default())
    }

    /// Open (creating if needed) the store in the database file at `path`.
    /// Index entries are rebuilt if the schema's indexes changed since the
    /// last open.
    pub fn open_with(path: impl AsRef<Path>, schema: Schema, options: SqliteOptions) -> StoreResult<Self> {
        Self::open_with_wal_limit(path, schema, options, DEFAULT_WAL_SIZE_LIMIT_BYTES)
    }

    /// [`SqliteStore::open_with`], keeping the WAL to `wal_size_limit_bytes`
    /// instead of [`DEFAULT_WAL_SIZE_LIMIT_BYTES`].
    pub fn open_with_wal_limit(
        path: impl AsRef<Path>,
        schema: Schema,
        options: SqliteOptions,
        wal_size_limit_bytes: u64,
    ) -> StoreResult<Self> {
        let path = path.as_ref();
        let conn = Connection::open(path).map_err(sql_err)?;
        Self::init(conn, Some(path.to_owned()), schema, options, wal_size_limit_bytes)
    }

    /// A store in a private in-memory database, gone when dropped. Useful
    /// for tests; nothing is durable.
    pub fn open_in_memory(schema: Schema) -> StoreResult<Self> {
        let conn = Connection::open_in_memory().map_err(sql_err)?;
        Self::init(
            conn,
            None,
            schema,
            SqliteOptions::default(),
            DEFAULT_WAL_SIZE_LIMIT_BYTES,
        )
    }

    /// The database file, or `None` for an in-memory store.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    fn init(
        mut conn: Connection,
        path: Option<PathBuf>,
        schema: Schema,
        options: SqliteOptions,
        wal_size_limit_bytes: u64,
    ) -> StoreResult<Self> {
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE_CAPACITY);
        conn.busy_timeout(Duration::from_millis(options.busy_timeout_ms))
            .map_err(sql_err)?;
        // Returns the resulting mode: "wal", or "memory" for an in-memory
        // database, which has no journal file to put in WAL mode.
        let mode: String = conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
            .map_err(sql_err)?;
        if path.is_some() && !mode.eq_ignore_ascii_case("wal") {
            return Err(invalid(format!("could not enable WAL mode (journal_mode is {mode})")));
        }
        conn.pragma_update(None, "synchronous", options.synchronous.pragma_value())
            .map_err(sql_err)?;
        conn.pragma_update(None, "foreign_keys", "OFF").map_err(sql_err)?;
        conn.pragma_update(None, "temp_store", "MEMORY").map_err(sql_err)?;
        conn.pragma_update(None, "cache_size", -i64::from(options.cache_size_kib))
            .map_err(sql_err)?;
        conn.pragma_update(
            None,
            "journal_size_limit",
            i64::try_from(wal_size_limit_bytes).unwrap_or(i64::MAX),
        )
        .map_err(sql_err)?;

        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql_err)?;
        let version: i64 = tx
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(sql_err)?;
        match version {
            0 => {
                tx.execute_batch(CREATE_TABLES).map_err(sql_err)?;
                tx.execute_batch(staging::CREATE_STAGED).map_err(sql_err)?;
                tx.execute_batch(staged_rows::CREATE_STAGED_ROWS).map_err(sql_err)?;
                tx.pragma_update(None, "user_version", FORMAT_VERSION)
                    .map_err(sql_err)?;
            }
            // Version 2 stores (some made before the staging area) get the
            // staging area as version 3 keeps it: ops may keep their rows
            // in `ferry_staged_rows` (`side`). Old staged ops keep theirs
            // inline.
            2 => {
                tx.execute_batch(staging::CREATE_STAGED).map_err(sql_err)?;
                add_column(&tx, "ferry_staged", "side", "INTEGER NOT NULL DEFAULT 0")?;
                tx.execute_batch(staged_rows::CREATE_STAGED_ROWS).map_err(sql_err)?;
                staged_rows::inline_ops_staged(&tx)?;
                add_column(&tx, "ferry_queue", "overlay", "BLOB")?;
                tx.pragma_update(None, "user_version", FORMAT_VERSION)
                    .map_err(sql_err)?;
            }
            // Version 3 stores get the queue rows' overlay column (NULL:
            // their overlay entries are all in `ferry_overlay`).
            3 => {
                tx.execute_batch(staging::CREATE_STAGED).map_err(sql_err)?;
                tx.execute_batch(staged_rows::CREATE_STAGED_ROWS).map_err(sql_err)?;
                add_column(&tx, "ferry_queue", "overlay", "BLOB")?;
                tx.pragma_update(None, "user_version", FORMAT_VERSION)
                    .map_err(sql_err)?;
            }
            FORMAT_VERSION => {
                tx.execute_batch(staging::CREATE_STAGED).map_err(sql_err)?;
                tx.execute_batch(staged_rows::CREATE_STAGED_ROWS).map_err(sql_err)?;
            }
            1 => {
                return Err(invalid(format!(
                    "database format version 1 (bucket op log) is not supported: this build reads version \
                     {FORMAT_VERSION} only and does not migrate; delete the database and sync again"
                )))
            }
            v => {
                return Err(invalid(format!(
                    "database format version {v} is not supported (this build reads version {FORMAT_VERSION})"
                )))
            }
        }
        sync_indexes(&tx, &schema)?;
        let tail = overlay_tail::OverlayTail::load(&tx)?;
        tx.commit().map_err(sql_err)?;

        let page_size: u64 = conn
            .pragma_query_value(None, "page_size", |r| r.get(0))
            .map_err(sql_err)?;
        let wal_limit_pages = wal_size_limit_bytes / page_size.max(1);
        let checkpointer = path.clone().map(checkpoint::Checkpointer::new);
        Ok(SqliteStore {
            schema,
            path,
            conn: Mutex::new(conn),
            tail: Mutex::new(tail),
            checkpointer,
            wal_limit_pages,
            page_size,
            busy_timeout_ms: options.busy_timeout_ms,
        })
    }

    /// Start the WAL over (see `apply`), and say whether it did. The
    /// helper's pass under way is waited for first, and again whenever a
    /// try finds a pass copying (SQLite answers at once, with -1 frames,
    /// when another connection holds the checkpoint lock: it waits for
    /// nobody), until `busy_timeout_ms` passed. A try that ran but could
    /// not start the WAL over (a reader in another process holds it,
    /// after `RESTART_WAIT_MS`) ends there.
    fn restart_wal(&self, conn: &Connection, checkpointer: &checkpoint::Checkpointer) -> StoreResult<bool> {
        let deadline = Instant::now() + Duration::from_millis(self.busy_timeout_ms);
        conn.busy_timeout(Duration::from_millis(RESTART_WAIT_MS.min(self.busy_timeout_ms)))
            .map_err(sql_err)?;
        let done = loop {
            checkpointer.wait_for_pass(deadline.saturating_duration_since(Instant::now()));
            // (busy, WAL frames or -1 when it could not run, frames copied)
            let answer = conn.query_row("PRAGMA wal_checkpoint(RESTART)", [], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))
            });
            match answer {
                Ok((0, _)) => break true,
                Ok((_, -1)) if Instant::now() < deadline => {
                    // Another process's checkpoint, if not the helper's.
                    std::thread::sleep(Duration::from_millis(RESTART_RETRY_MS));
                }
                _ => break false,
            }
        };
        conn.busy_timeout(Duration::from_millis(self.busy_timeout_ms))
            .map_err(sql_err)?;
        Ok(done)
    }
}

/// Give `table` its `column` (of SQL type and constraints `definition`),
/// unless it has it: a store migrated by an interrupted run may have it.
fn add_column(conn: &Connection, table: &str, column: &str, definition: &str) -> StoreResult<()> {
    let has: bool = conn
        .query_row(
            "SELECT EXISTS (SELECT 1 FROM pragma_table_info(?1) WHERE name = ?2)",
            [table, column],
            |r| r.get(0),
        )
        .map_err(sql_err)?;
    if !has {
        conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {definition}"))
            .map_err(sql_err)?;
    }
    Ok(())
}

/// Bring `ferry_index` in line with the schema's declared indexes: drop the
/// entries of indexes no longer declared (or declared differently) and
/// build those of new or changed ones.
fn sync_indexes(conn: &Connection, schema: &Schema) -> StoreResult<()> {
    let mut stored: BTreeMap<(String, String), String> = BTreeMap::new();
    {
        let mut stmt = conn
            .prepare("SELECT tbl, idx, columns FROM ferry_index_defs")
            .map_err(sql_err)?;
        let mut rows = stmt.query([]).map_err(sql_err)?;
        while let Some(r) = rows.next().map_err(sql_err)? {
            stored.insert(
                (r.get(0).map_err(sql_err)?, r.get(1).map_err(sql_err)?),
                r.get(2).map_err(sql_err)?,
            );
        }
    }
    let mut wanted: BTreeMap<(String, String), String> = BTreeMap::new();
    for table in schema.tables() {
        for index in &table.indexes {
            wanted.insert((table.name.clone(), index.name.clone()), index_columns(index));
        }
    }

    for (key, columns) in &stored {
        if wanted.get(key) != Some(columns) {
            conn.execute(
                "DELETE FROM ferry_index WHERE tbl = ?1 AND idx = ?2",
                params![key.0, key.1],
            )
            .map_err(sql_err)?;
            conn.execute(
                "DELETE FROM ferry_index_defs WHERE tbl = ?1 AND idx = ?2",
                params![key.0, key.1],
            )
            .map_err(sql_err)?;
        }
    }

    // The indexes to build, grouped by table so each table is read once.
    let mut to_build: BTreeMap<&str, Vec<&Index>> = BTreeMap::new();
    for table in schema.tables() {
        for index in &table.indexes {
            let key = (table.name.clone(), index.name.clone());
            if stored.get(&key) != wanted.get(&key) {
                to_build.entry(table.name.as_str()).or_default().push(index);
            }
        }
    }
    for (table, indexes) in to_build {
        let mut put_def = conn
            .prepare("INSERT OR REPLACE INTO ferry_index_defs (tbl, idx, columns) VALUES (?1, ?2, ?3)")
            .map_err(sql_err)?;
        for index in &indexes {
            put_def
                .execute(params![table, index.name, index_columns(index)])
                .map_err(sql_err)?;
        }
        let mut put = conn.prepare_cached(SQL_PUT_INDEX).map_err(sql_err)?;
        let mut scan = conn
            .prepare("SELECT id, data FROM ferry_rows WHERE tbl = ?1")
            .map_err(sql_err)?;
        let mut rows = scan.query([table]).map_err(sql_err)?;
        while let Some(r) = rows.next().map_err(sql_err)? {
            let id = str_col(r, 0)?;
            let data = row_col(r, 1)?;
            for index in &indexes {
                put.execute(params![table, index.name, index_key(index, id, &data), id])
                    .map_err(sql_err)?;
            }
        }
    }
    Ok(())
}

// ----- writing -----

/// The statements of one `apply`, prepared on first use and kept for the
/// whole batch so the per-op cost is binding and stepping only.
/// Rows per multi-row INSERT: runs of synced rows (of tables without
/// indexes) and of bucket entries, the bulk of a large download, go in
/// statements of this many rows, which halves the per-statement work.
const INSERT_CHUNK_ROWS: usize = 64;

/// Batches with at least this many ops are freed on a helper thread after
/// their commit: freeing a million rows takes a noticeable fraction of a
/// second that the caller need not wait for.
const BACKGROUND_DROP_MIN_OPS: usize = 100_000;

/// Batches of a download being staged (one after another on the staging
/// writer, each of thousands of rows) are freed on a helper thread from
/// this many ops on: about a third of the writer's time went to freeing
/// rows it had written.
const BACKGROUND_DROP_MIN_STAGED_OPS: usize = 1_024;

/// Most batches being freed on helper threads at once; past it the caller
/// frees its batch itself, so a writer faster than the helpers never
/// holds more than this many written batches in memory.
const MAX_BACKGROUND_DROPS: usize = 1;

static BACKGROUND_DROPS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn drop_in_background(batch: WriteBatch) {
    use std::sync::atomic::Ordering;
    if batch.len() < BACKGROUND_DROP_MIN_STAGED_OPS {
        return;
    }
    let staged = batch.ops.iter().any(|op| matches!(op, BatchOp::PutStaged { .. }));
    if !staged && batch.len() < BACKGROUND_DROP_MIN_OPS {
        return;
    }
    if BACKGROUND_DROPS.fetch_add(1, Ordering::SeqCst) >= MAX_BACKGROUND_DROPS {
        BACKGROUND_DROPS.fetch_sub(1, Ordering::SeqCst);
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("ferry-sqlite-free".into())
        .spawn(move || {
            drop(batch);
            BACKGROUND_DROPS.fetch_sub(1, Ordering::SeqCst);
        });
    // When no thread could be started the batch was dropped with the
    // error, as it would have been anyway.
    if spawned.is_err() {
        BACKGROUND_DROPS.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Batches with at least this many ops are checkpointed into the database
/// file by a helper thread after their commit (see [`Store::apply`] here).
const BACKGROUND_CHECKPOINT_MIN_OPS: usize = 100_000;

/// Longest wait of a writer restarting the WAL for another process's
/// reader (or a pass of the checkpoint helper that began after it waited
/// for the one under way: `Checkpointer::wait_for_pass`) to finish with it.
const RESTART_WAIT_MS: u64 = 200;

/// Pause before a writer tries a restart again that found the checkpoint
/// lock taken.
const RESTART_RETRY_MS: u64 = 2;

/// SQLite's default automatic checkpoint threshold, in WAL pages.
const WAL_AUTOCHECKPOINT_PAGES: i64 = 1000;

fn multi_insert_sql(head: &str, params_per_row: usize) -> String {
    let row = format!("({})", vec!["?"; params_per_row].join(", "));
    format!("{head} VALUES {}", vec![row; INSERT_CHUNK_ROWS].join(", "))
}

struct Writer<'c, 'b> {
    conn: &'c Connection,
    stmts: [Option<CachedStatement<'c>>; W_COUNT],
    /// Synced rows to insert, in batch order: (table, id, encoded row).
    rows: Vec<(&'b str, &'b str, Vec<u8>)>,
    /// Bucket entries to insert, in batch order.
    entries: Vec<(&'b str, &'b BucketEntry, i64)>,
    /// Staged ops to insert, in batch order.
    staged: Vec<staging::StagedRow<'b>>,
    /// Checks each staged op as it is written (`validate_batch_but_staged`).
    staged_check: StagedCheck<'b>,
    /// The switch-ins that end the batch (none when an op that touches
    /// what they do follows the first of them): they may go together, by
    /// a rename.
    switch_tail: Vec<staged_rows::SwitchRange<'b>>,
    /// Whether the first of `switch_tail` was reached, and if so whether
    /// the rename applied them all.
    tail: TailState,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum TailState {
    NotReached,
    Renamed,
    OneByOne,
}

const W_GET_ROW: usize = 0;
const W_PUT_ROW: usize = 1;
const W_DELETE_ROW: usize = 2;
const W_PUT_INDEX: usize = 3;
const W_DELETE_INDEX: usize = 4;
const W_PUT_OVERLAY: usize = 5;
const W_DELETE_OVERLAY: usize = 6;
const W_APPEND_QUEUE: usize = 7;
const W_COMPLETE_QUEUE: usize = 8;
const W_PUT_BUCKET_ENTRY: usize = 9;
const W_DELETE_BUCKET_ENTRY: usize = 10;
const W_PUT_BUCKET: usize = 11;
const W_DELETE_BUCKET: usize = 12;
const W_DELETE_BUCKET_ENTRIES: usize = 13;
const W_PUT_META: usize = 14;
const W_DELETE_META: usize = 15;
const W_COUNT: usize = 16;

// The writer's statements, the ~12 read statements, the open-time ones,
// the transactions' (`txn.rs`) and the overlay tail's all fit the
// statement cache.
const _: () = assert!(W_COUNT + 24 + 16 <= STATEMENT_CACHE_CAPACITY);

const WRITER_SQL: [&str; W_COUNT] = [
    SQL_GET_ROW,
    SQL_PUT_ROW,
    SQL_DELETE_ROW,
    SQL_PUT_INDEX,
    SQL_DELETE_INDEX,
    SQL_PUT_OVERLAY,
    SQL_DELETE_OVERLAY,
    SQL_APPEND_QUEUE,
    SQL_COMPLETE_QUEUE,
    SQL_PUT_BUCKET_ENTRY,
    SQL_DELETE_BUCKET_ENTRY,
    SQL_PUT_BUCKET,
    SQL_DELETE_BUCKET,
    SQL_DELETE_BUCKET_ENTRIES,
    SQL_PUT_META,
    SQL_DELETE_META,
];

impl<'c, 'b> Writer<'c, 'b> {
    fn new(conn: &'c Connection) -> Self {
        Writer {
            conn,
            stmts: Default::default(),
            rows: Vec::new(),
            entries: Vec::new(),
            staged: Vec::new(),
            staged_check: StagedCheck::default(),
            switch_tail: Vec::new(),
            tail: TailState::NotReached,
        }
    }

    /// Note the batch's closing run of switch-ins (see `switch_tail`).
    fn set_switch_tail(&mut self, ops: &'b [BatchOp]) {
        let first = ops.iter().position(|op| matches!(op, BatchOp::SwitchInStaged { .. }));
        let Some(first) = first else { return };
        // Only writes apart from what switch-ins touch may follow (the
        // client's checkpoint ends with its metadata and the pending
        // writes' rebase).
        if ops[first..].iter().any(BatchOp::touches_switched_state) {
            return;
        }
        let tail = ops[first..]
            .iter()
            .filter_map(|op| match op {
                BatchOp::SwitchInStaged {
                    bucket,
                    from_op_id,
                    through_op_id,
                } => Some((bucket.as_str(), clamp_bound(*from_op_id), clamp_bound(*through_op_id))),
                _ => None,
            })
            .collect();
        self.switch_tail = tail;
    }

    /// `BatchOp::SwitchInStaged`: the closing run at once by a rename when
    /// it can go so, else this range.
    fn switch_in(&mut self, schema: &Schema, bucket: &str, from: u64, through: u64) -> StoreResult<()> {
        match self.tail {
            TailState::Renamed => return Ok(()),
            TailState::NotReached if !self.switch_tail.is_empty() => {
                self.flush()?;
                let tail = std::mem::take(&mut self.switch_tail);
                let renamed = self.switch_in_by_rename(schema, &tail)?;
                self.tail = if renamed {
                    TailState::Renamed
                } else {
                    TailState::OneByOne
                };
                if renamed {
                    return Ok(());
                }
            }
            _ => {}
        }
        self.switch_in_staged(schema, bucket, from, through)
    }

    /// Write the buffered rows and bucket entries. Buffered writes of the
    /// two tables do not interact, and every other op flushes first, so
    /// the batch's order is kept.
    fn flush(&mut self) -> StoreResult<()> {
        self.flush_rows()?;
        self.flush_entries()?;
        self.flush_staged()
    }

    fn flush_rows(&mut self) -> StoreResult<()> {
        if self.rows.is_empty() {
            return Ok(());
        }
        let rows = std::mem::take(&mut self.rows);
        let mut chunks = rows.chunks_exact(INSERT_CHUNK_ROWS);
        if chunks.len() > 0 {
            let sql = multi_insert_sql("INSERT OR REPLACE INTO ferry_rows (tbl, id, data)", 3);
            let mut stmt = self.conn.prepare_cached(&sql).map_err(sql_err)?;
            for chunk in chunks.by_ref() {
                let params = chunk.iter().flat_map(|(t, i, d)| {
                    [
                        t as &dyn rusqlite::ToSql,
                        i as &dyn rusqlite::ToSql,
                        d as &dyn rusqlite::ToSql,
                    ]
                });
                stmt.execute(rusqlite::params_from_iter(params)).map_err(sql_err)?;
            }
        }
        for (table, id, bytes) in chunks.remainder() {
            self.stmt(W_PUT_ROW)?
                .execute(params![table, id, bytes])
                .map_err(sql_err)?;
        }
        self.rows = rows;
        self.rows.clear();
        Ok(())
    }

    fn flush_entries(&mut self) -> StoreResult<()> {
        if self.entries.is_empty() {
            return Ok(());
        }
        let entries = std::mem::take(&mut self.entries);
        let mut chunks = entries.chunks_exact(INSERT_CHUNK_ROWS);
        if chunks.len() > 0 {
            let sql = multi_insert_sql(
                "INSERT OR REPLACE INTO ferry_bucket_entries (bucket, tbl, row_id, op_id, checksum)",
                5,
            );
            let mut stmt = self.conn.prepare_cached(&sql).map_err(sql_err)?;
            for chunk in chunks.by_ref() {
                let params = chunk.iter().flat_map(|(b, e, op_id)| {
                    [
                        b as &dyn rusqlite::ToSql,
                        &e.table as &dyn rusqlite::ToSql,
                        &e.row_id as &dyn rusqlite::ToSql,
                        op_id as &dyn rusqlite::ToSql,
                        &e.checksum as &dyn rusqlite::ToSql,
                    ]
                });
                stmt.execute(rusqlite::params_from_iter(params)).map_err(sql_err)?;
            }
        }
        for (bucket, entry, op_id) in chunks.remainder() {
            self.stmt(W_PUT_BUCKET_ENTRY)?
                .execute(params![bucket, entry.table, entry.row_id, op_id, entry.checksum])
                .map_err(sql_err)?;
        }
        self.entries = entries;
        self.entries.clear();
        Ok(())
    }

    fn stmt(&mut self, which: usize) -> StoreResult<&mut CachedStatement<'c>> {
        let slot = &mut self.stmts[which];
        if slot.is_none() {
            *slot = Some(self.conn.prepare_cached(WRITER_SQL[which]).map_err(sql_err)?);
        }
        // Filled just above; the error arm is unreachable.
        slot.as_mut()
            .ok_or_else(|| invalid(format!("statement {which} was not prepared")))
    }

    /// The synced row currently stored, if any.
    fn old_row(&mut self, table: &str, id: &str) -> StoreResult<Option<RowData>> {
        let stmt = self.stmt(W_GET_ROW)?;
        let mut rows = stmt.query(params![table, id]).map_err(sql_err)?;
        match rows.next().map_err(sql_err)? {
            Some(r) => Ok(Some(row_col(r, 0)?)),
            None => Ok(None),
        }
    }

    fn put_index(&mut self, table: &str, index: &str, key: &[u8], id: &str) -> StoreResult<()> {
        self.stmt(W_PUT_INDEX)?
            .execute(params![table, index, key, id])
            .map_err(sql_err)?;
        Ok(())
    }

    fn delete_index(&mut self, table: &str, index: &str, key: &[u8]) -> StoreResult<()> {
        self.stmt(W_DELETE_INDEX)?
            .execute(params![table, index, key])
            .map_err(sql_err)?;
        Ok(())
    }

    fn put_synced(&mut self, schema: &Schema, table: &str, id: &str, data: &RowData) -> StoreResult<()> {
        let indexes = &table_def(schema, table)?.indexes;
        if !indexes.is_empty() {
            let old = self.old_row(table, id)?;
            for index in indexes {
                let new_key = index_key(index, id, data);
                if let Some(old) = &old {
                    let old_key = index_key(index, id, old);
                    if old_key == new_key {
                        continue;
                    }
                    self.delete_index(table, &index.name, &old_key)?;
                }
                self.put_index(table, &index.name, &new_key, id)?;
            }
        }
        let bytes = codec::encode_row(data);
        self.stmt(W_PUT_ROW)?
            .execute(params![table, id, bytes])
            .map_err(sql_err)?;
        Ok(())
    }

    fn delete_synced(&mut self, schema: &Schema, table: &str, id: &str) -> StoreResult<()> {
        let indexes = &table_def(schema, table)?.indexes;
        if !indexes.is_empty() {
            if let Some(old) = self.old_row(table, id)? {
                for index in indexes {
                    self.delete_index(table, &index.name, &index_key(index, id, &old))?;
                }
            }
        }
        self.stmt(W_DELETE_ROW)?.execute(params![table, id]).map_err(sql_err)?;
        Ok(())
    }

    fn op(&mut self, schema: &Schema, op: &'b BatchOp) -> StoreResult<()> {
        match op {
            BatchOp::PutSynced { table, id, data } if table_def(schema, table)?.indexes.is_empty() => {
                self.rows.push((table, id, codec::encode_row(data)));
                if self.rows.len() >= INSERT_CHUNK_ROWS * 16 {
                    self.flush_rows()?;
                }
                return Ok(());
            }
            BatchOp::PutBucketEntry { bucket, entry } => {
                let op_id = ordered_key("bucket entry op id", entry.op_id)?;
                self.entries.push((bucket, entry, op_id));
                if self.entries.len() >= INSERT_CHUNK_ROWS * 16 {
                    self.flush_entries()?;
                }
                return Ok(());
            }
            BatchOp::PutStaged { bucket, op } => return self.put_staged(schema, bucket, op),
            _ => self.flush()?,
        }
        match op {
            BatchOp::PutSynced { table, id, data } => self.put_synced(schema, table, id, data)?,
            BatchOp::DeleteSynced { table, id } => self.delete_synced(schema, table, id)?,
            BatchOp::PutOverlay { table, id, entry } => {
                let bytes = match entry {
                    OverlayEntry::Row(data) => Some(codec::encode_row(data)),
                    OverlayEntry::Deleted => None,
                };
                self.stmt(W_PUT_OVERLAY)?
                    .execute(params![table, id, bytes])
                    .map_err(sql_err)?;
            }
            BatchOp::DeleteOverlay { table, id } => {
                self.stmt(W_DELETE_OVERLAY)?
                    .execute(params![table, id])
                    .map_err(sql_err)?;
            }
            BatchOp::AppendQueue(entry) => {
                let seq = ordered_key("queue seq", entry.seq)?;
                self.stmt(W_APPEND_QUEUE)?
                    .execute(params![seq, codec::encode_entry(entry)])
                    .map_err(sql_err)?;
            }
            BatchOp::CompleteQueue { through_seq } => {
                self.stmt(W_COMPLETE_QUEUE)?
                    .execute([clamp_bound(*through_seq)])
                    .map_err(sql_err)?;
            }
            BatchOp::PutBucketEntry { bucket, entry } => {
                let op_id = ordered_key("bucket entry op id", entry.op_id)?;
                self.stmt(W_PUT_BUCKET_ENTRY)?
                    .execute(params![bucket, entry.table, entry.row_id, op_id, entry.checksum])
                    .map_err(sql_err)?;
            }
            BatchOp::DeleteBucketEntry { bucket, table, row_id } => {
                self.stmt(W_DELETE_BUCKET_ENTRY)?
                    .execute(params![bucket, table, row_id])
                    .map_err(sql_err)?;
            }
            BatchOp::PutBucketState { bucket, state } => {
                self.stmt(W_PUT_BUCKET)?
                    .execute(params![
                        bucket,
                        bits_to_i64(state.last_op_id),
                        state.checksum,
                        bits_to_i64(state.count)
                    ])
                    .map_err(sql_err)?;
            }
            BatchOp::DeleteBucket { bucket } => {
                self.stmt(W_DELETE_BUCKET)?.execute([bucket]).map_err(sql_err)?;
                self.stmt(W_DELETE_BUCKET_ENTRIES)?.execute([bucket]).map_err(sql_err)?;
            }
            BatchOp::PutMeta { key, value } => {
                self.stmt(W_PUT_META)?.execute(params![key, value]).map_err(sql_err)?;
            }
            BatchOp::DeleteMeta { key } => {
                self.stmt(W_DELETE_META)?.execute([key]).map_err(sql_err)?;
            }
            BatchOp::PutStaged { bucket, op } => self.put_staged(schema, bucket, op)?,
            BatchOp::DeleteStaged { bucket, through_op_id } => self.delete_staged(bucket, *through_op_id)?,
            BatchOp::SwitchInStaged {
                bucket,
                from_op_id,
                through_op_id,
            } => self.switch_in(schema, bucket, *from_op_id, *through_op_id)?,
        }
        Ok(())
    }
}

// ----- reading helpers -----

fn text_col(r: &rusqlite::Row<'_>, i: usize) -> StoreResult<String> {
    r.get(i).map_err(sql_err)
}

/// A text column, borrowed from the result row.
fn str_col<'r>(r: &'r rusqlite::Row<'_>, i: usize) -> StoreResult<&'r str> {
    r.get_ref(i).map_err(sql_err)?.as_str().map_err(|e| sql_err(e.into()))
}

/// A blob column, borrowed from the result row.
fn blob_col<'r>(r: &'r rusqlite::Row<'_>, i: usize) -> StoreResult<&'r [u8]> {
    r.get_ref(i).map_err(sql_err)?.as_blob().map_err(|e| sql_err(e.into()))
}

fn row_col(r: &rusqlite::Row<'_>, i: usize) -> StoreResult<RowData> {
    Ok(codec::decode_row(blob_col(r, i)?)?)
}

fn overlay_col(r: &rusqlite::Row<'_>, i: usize) -> StoreResult<OverlayEntry> {
    match r
        .get_ref(i)
        .map_err(sql_err)?
        .as_blob_or_null()
        .map_err(|e| sql_err(e.into()))?
    {
        Some(bytes) => Ok(OverlayEntry::Row(codec::decode_row(bytes)?)),
        None => Ok(OverlayEntry::Deleted),
    }
}

/// Run a cached query and map every result row.
fn collect<T, P: rusqlite::Params>(
    conn: &Connection,
    sql: &str,
    params: P,
    mut map: impl FnMut(&rusqlite::Row<'_>) -> StoreResult<T>,
) -> StoreResult<Vec<T>> {
    let mut stmt = conn.prepare_cached(sql).map_err(sql_err)?;
    let mut rows = stmt.query(params).map_err(sql_err)?;
    let mut out = Vec::new();
    while let Some(r) = rows.next().map_err(sql_err)? {
        out.push(map(r)?);
    }
    Ok(out)
}

/// A bucket entry from `tbl, row_id, op_id, checksum` columns.
fn bucket_entry(r: &rusqlite::Row<'_>) -> StoreResult<BucketEntry> {
    let op_id: i64 = r.get(2).map_err(sql_err)?;
    Ok(BucketEntry {
        table: text_col(r, 0)?,
        row_id: text_col(r, 1)?,
        op_id: from_ordered_key("bucket entry op id", op_id)?,
        checksum: r.get(3).map_err(sql_err)?,
    })
}

fn bucket_state(r: &rusqlite::Row<'_>, first: usize) -> StoreResult<BucketState> {
    Ok(BucketState {
        last_op_id: bits_to_u64(r.get(first).map_err(sql_err)?),
        checksum: r.get(first + 1).map_err(sql_err)?,
        count: bits_to_u64(r.get(first + 2).map_err(sql_err)?),
    })
}

impl SqliteStore {
    /// Run `read` over the connection and the overlay's tail, in one read
    /// transaction with the tail as of it.
    fn read_overlay<T>(
        &self,
        read: impl FnOnce(&Connection, &overlay_tail::OverlayTail) -> StoreResult<T>,
    ) -> StoreResult<T> {
        let conn = self.conn.lock();
        let mut tail = self.tail.lock();
        let tx = txn::Txn::deferred(&conn)?;
        tail.refresh(&tx)?;
        let value = read(&tx, &tail)?;
        tx.commit()?;
        Ok(value)
    }
}

impl Store for SqliteStore {
    fn schema(&self) -> &Schema {
        &self.schema
    }

    fn apply(&self, batch: WriteBatch) -> StoreResult<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let conn = self.conn.lock();
        let mut tail = self.tail.lock();
        // Dropping the transaction without commit rolls it back, so every
        // early return below leaves the database unchanged.
        let tx = txn::Txn::immediate(&conn)?;
        tail.refresh(&tx)?;
        // A local write leaves its overlay entries in its queue rows;
        // every other batch moves them to `ferry_overlay` first.
        // (The batch's ops bound the entries and queue rows it adds.)
        let local = overlay_tail::local_write_overlays(&batch)
            .filter(|_| tail.size() + batch.len() <= overlay_tail::MAX_TAIL_ENTRIES);
        let added = {
            let last: Option<i64> = match tail.queue_end() {
                Some(known) if local.is_some() => known,
                _ => tx
                    .prepare_cached(SQL_LAST_SEQ)
                    .and_then(|mut s| s.query_row([], |r| r.get(0)))
                    .map_err(sql_err)?,
            };
            let last = last.map(|s| from_ordered_key("queue seq", s)).transpose()?;
            validate_batch_but_staged(&self.schema, &batch, last)?;
            if local.is_some() {
                Some(overlay_tail::write_local(&tx, &batch)?)
            } else {
                tail.materialize(&tx)?;
                let mut writer = Writer::new(&tx);
                writer.set_switch_tail(&batch.ops);
                for op in &batch.ops {
                    writer.op(&self.schema, op)?;
                }
                writer.flush()?;
                None
            }
        };
        // A large batch commits without the automatic WAL checkpoint, which
        // would copy every page it wrote into the database file before
        // `apply` returns; a helper connection checkpoints instead. So do
        // a switch-in of staged ops (it writes as much as the ops it
        // moves) and the batches of a download being staged (one after
        // another, each would wait for the last one's pages to be copied).
        let deferred = self.checkpointer.is_some()
            && (batch.len() >= BACKGROUND_CHECKPOINT_MIN_OPS
                || batch
                    .ops
                    .iter()
                    .any(|op| matches!(op, BatchOp::SwitchInStaged { .. } | BatchOp::PutStaged { .. })));
        if deferred {
            tx.pragma_update(None, "wal_autocheckpoint", 0).map_err(sql_err)?;
        }
        let committed = tx.commit();
        match (&committed, added) {
            (Ok(()), Some(write)) => tail.extend(write),
            (Ok(()), None) => tail.clear(),
            (Err(_), _) => tail.forget_queue_end(),
        }
        drop(tail);
        if deferred {
            let restored = conn
                .pragma_update(None, "wal_autocheckpoint", WAL_AUTOCHECKPOINT_PAGES)
                .map_err(sql_err);
            committed?;
            restored?;
            if let Some(checkpointer) = &self.checkpointer {
                // Past its limit the WAL starts over here: the helper's
                // checkpoints never let it while writes keep coming (see
                // `checkpoint.rs`). Best effort, like any checkpoint: a
                // reader in another process may hold the WAL, so the wait
                // is short, and after a failure the next try waits until
                // the WAL grew by another quarter of the limit.
                if let Some(pages) = checkpointer.restart_due(self.wal_limit_pages, self.page_size) {
                    let done = self.restart_wal(&conn, checkpointer)?;
                    checkpointer.restart_tried(done, pages, self.wal_limit_pages);
                }
                checkpointer.request();
            }
        } else {
            committed?;
        }
        // Freed with the connection free for other callers.
        drop(conn);
        drop_in_background(batch);
        Ok(())
    }

    fn get_synced(&self, table: &str, id: &str) -> StoreResult<Option<RowData>> {
        table_def(&self.schema, table)?;
        let conn = self.conn.lock();
        let mut stmt = conn.prepare_cached(SQL_GET_ROW).map_err(sql_err)?;
        let mut rows = stmt.query(params![table, id]).map_err(sql_err)?;
        match rows.next().map_err(sql_err)? {
            Some(r) => Ok(Some(row_col(r, 0)?)),
            None => Ok(None),
        }
    }

    fn scan_synced(&self, table: &str) -> StoreResult<Rows> {
        table_def(&self.schema, table)?;
        let conn = self.conn.lock();
        collect(
            &conn,
            "SELECT id, data FROM ferry_rows WHERE tbl = ?1 ORDER BY id",
            [table],
            |r| Ok((text_col(r, 0)?, row_col(r, 1)?)),
        )
    }

    fn scan_synced_index(
        &self,
        table: &str,
        index: &str,
        lower: Bound<Vec<Value>>,
        upper: Bound<Vec<Value>>,
    ) -> StoreResult<Rows> {
        let IndexRange { lo, hi, .. } = resolve_index_range(&self.schema, table, index, &lower, &upper)?;
        // The empty blob sorts before every key.
        let lo = lo.unwrap_or_default();
        let map = |r: &rusqlite::Row<'_>| Ok((text_col(r, 0)?, row_col(r, 1)?));
        let conn = self.conn.lock();
        match hi {
            Some(hi) if lo >= hi => Ok(Vec::new()),
            Some(hi) => collect(&conn, SQL_SCAN_INDEX_TO, params![table, index, lo, hi], map),
            None => collect(&conn, SQL_SCAN_INDEX_FROM, params![table, index, lo], map),
        }
    }

    fn scan_synced_index_limited(
        &self,
        table: &str,
        index: &str,
        lower: Bound<Vec<Value>>,
        upper: Bound<Vec<Value>>,
        reverse: bool,
        limit: usize,
    ) -> StoreResult<Rows> {
        let IndexRange { lo, hi, .. } = resolve_index_range(&self.schema, table, index, &lower, &upper)?;
        if limit == 0 {
            return Ok(Vec::new());
        }
        // The empty blob sorts before every key.
        let lo = lo.unwrap_or_default();
        let n = limit_i64(limit);
        let map = |r: &rusqlite::Row<'_>| Ok((text_col(r, 0)?, row_col(r, 1)?));
        let conn = self.conn.lock();
        match hi {
            Some(hi) if lo >= hi => Ok(Vec::new()),
            Some(hi) => {
                let sql = if reverse {
                    SQL_SCAN_INDEX_TO_LIMIT_DESC
                } else {
                    SQL_SCAN_INDEX_TO_LIMIT
                };
                collect(&conn, sql, params![table, index, lo, hi, n], map)
            }
            None => {
                let sql = if reverse {
                    SQL_SCAN_INDEX_FROM_LIMIT_DESC
                } else {
                    SQL_SCAN_INDEX_FROM_LIMIT
                };
                collect(&conn, sql, params![table, index, lo, n], map)
            }
        }
    }

    fn get_overlay(&self, table: &str, id: &str) -> StoreResult<Option<OverlayEntry>> {
        table_def(&self.schema, table)?;
        // One row needs no read transaction around the tail's check and
        // the table's read: should another connection commit in between,
        // the row is as of before its commit (found in the tail) or after
        // it (read from the table), either a state the row had.
        let conn = self.conn.lock();
        let mut tail = self.tail.lock();
        tail.refresh(&conn)?;
        if let Some(entry) = tail.get(table, id) {
            return overlay_tail::entry_of(entry).map(Some);
        }
        let mut stmt = conn
            .prepare_cached("SELECT data FROM ferry_overlay WHERE tbl = ?1 AND id = ?2")
            .map_err(sql_err)?;
        let mut rows = stmt.query(params![table, id]).map_err(sql_err)?;
        match rows.next().map_err(sql_err)? {
            Some(r) => Ok(Some(overlay_col(r, 0)?)),
            None => Ok(None),
        }
    }

    fn scan_overlay(&self, table: &str) -> StoreResult<Vec<(String, OverlayEntry)>> {
        table_def(&self.schema, table)?;
        self.read_overlay(|conn, tail| {
            let stored = collect(
                conn,
                "SELECT id, data FROM ferry_overlay WHERE tbl = ?1 ORDER BY id",
                [table],
                |r| Ok((text_col(r, 0)?, overlay_col(r, 1)?)),
            )?;
            let mut newer = tail.of_table(table).peekable();
            if newer.peek().is_none() {
                return Ok(stored);
            }
            let mut merged: BTreeMap<String, OverlayEntry> = stored.into_iter().collect();
            for (id, entry) in newer {
                merged.insert(id.to_owned(), overlay_tail::entry_of(entry)?);
            }
            Ok(merged.into_iter().collect())
        })
    }

    fn queue_from(&self, from_seq: u64, limit: usize) -> StoreResult<Vec<CrudEntry>> {
        // Seqs above i64::MAX are never stored.
        let Ok(from) = i64::try_from(from_seq) else {
            return Ok(Vec::new());
        };
        if limit == 0 {
            return Ok(Vec::new());
        }
        let conn = self.conn.lock();
        collect(
            &conn,
            "SELECT entry FROM ferry_queue WHERE seq >= ?1 ORDER BY seq LIMIT ?2",
            [from, limit_i64(limit)],
            |r| Ok(codec::decode_entry(blob_col(r, 0)?)?),
        )
    }

    fn queue_len(&self) -> StoreResult<u64> {
        let conn = self.conn.lock();
        let n: i64 = conn
            .prepare_cached("SELECT count(*) FROM ferry_queue")
            .and_then(|mut s| s.query_row([], |r| r.get(0)))
            .map_err(sql_err)?;
        from_ordered_key("queue length", n)
    }

    fn bucket_state(&self, bucket: &str) -> StoreResult<Option<BucketState>> {
        let conn = self.conn.lock();
        let mut stmt = conn
            .prepare_cached("SELECT last_op_id, checksum, count FROM ferry_buckets WHERE name = ?1")
            .map_err(sql_err)?;
        let mut rows = stmt.query([bucket]).map_err(sql_err)?;
        match rows.next().map_err(sql_err)? {
            Some(r) => Ok(Some(bucket_state(r, 0)?)),
            None => Ok(None),
        }
    }

    fn buckets(&self) -> StoreResult<Vec<(String, BucketState)>> {
        let conn = self.conn.lock();
        collect(
            &conn,
            "SELECT name, last_op_id, checksum, count FROM ferry_buckets ORDER BY name",
            [],
            |r| Ok((text_col(r, 0)?, bucket_state(r, 1)?)),
        )
    }

    fn bucket_entry(&self, bucket: &str, table: &str, row_id: &str) -> StoreResult<Option<BucketEntry>> {
        let conn = self.conn.lock();
        let mut stmt = conn.prepare_cached(SQL_GET_BUCKET_ENTRY).map_err(sql_err)?;
        let mut rows = stmt.query(params![bucket, table, row_id]).map_err(sql_err)?;
        match rows.next().map_err(sql_err)? {
            Some(r) => Ok(Some(bucket_entry(r)?)),
            None => Ok(None),
        }
    }

    fn bucket_entries(&self, bucket: &str, after: Option<(&str, &str)>, limit: usize) -> StoreResult<Vec<BucketEntry>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let limit = limit_i64(limit);
        let conn = self.conn.lock();
        match after {
            Some((table, row_id)) => collect(
                &conn,
                SQL_BUCKET_ENTRIES_AFTER,
                params![bucket, table, row_id, limit],
                bucket_entry,
            ),
            None => collect(&conn, SQL_BUCKET_ENTRIES, params![bucket, limit], bucket_entry),
        }
    }

    fn get_meta(&self, key: &str) -> StoreResult<Option<Vec<u8>>> {
        let conn = self.conn.lock();
        conn.prepare_cached("SELECT value FROM ferry_meta WHERE key = ?1")
            .and_then(|mut s| s.query_row([key], |r| r.get(0)).optional())
            .map_err(sql_err)
    }

    fn staged_ops(&self, bucket: &str, after_op_id: u64, limit: usize) -> StoreResult<Vec<StagedOp>> {
        staging::staged_ops(&self.conn.lock(), bucket, after_op_id, limit)
    }

    fn staged_buckets(&self) -> StoreResult<Vec<String>> {
        staging::staged_buckets(&self.conn.lock())
    }

    fn staged_summary(&self, bucket: &str, after_op_id: u64) -> StoreResult<StagedSummary> {
        staging::staged_summary(&self.conn.lock(), bucket, after_op_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integer_conversions() {
        assert_eq!(ordered_key("seq", 5).ok(), Some(5));
        assert!(ordered_key("seq", u64::MAX).is_err());
        assert_eq!(clamp_bound(u64::MAX), i64::MAX);
        assert_eq!(bits_to_u64(bits_to_i64(u64::MAX)), u64::MAX);
        assert!(from_ordered_key("seq", -1).is_err());
    }

    fn schema() -> Schema {
        Schema::new([ferry_core::Table::new("t").column("v", ferry_core::ColumnType::Integer)])
            .unwrap_or_else(|e| panic!("schema: {e}"))
    }

    fn row(v: i64) -> RowData {
        ferry_core::row_data([("v", Value::Integer(v))])
    }

    /// Runs longer than a multi-row INSERT, with repeated keys, keep the
    /// batch's order (the last write of a key wins), also across other ops;
    /// a batch large enough for the background checkpoint restores the
    /// automatic checkpoint and survives reopening.
    #[test]
    fn chunked_inserts_keep_batch_order() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let path = dir.path().join("s.db");
        let store = SqliteStore::open(&path, schema()).unwrap_or_else(|e| panic!("open: {e}"));
        let n = BACKGROUND_CHECKPOINT_MIN_OPS as i64 / 2 + 7;
        let mut batch = WriteBatch::new();
        for i in 0..n {
            let id = format!("r{}", i % (n - 100));
            batch.put_synced("t", id.clone(), row(i));
            batch.push(BatchOp::PutBucketEntry {
                bucket: "b".into(),
                entry: BucketEntry {
                    table: "t".into(),
                    row_id: id,
                    op_id: i as u64 + 1,
                    checksum: i as u32,
                },
            });
            if i == 1000 {
                batch.delete_synced("t", "r3");
                batch.push(BatchOp::DeleteBucketEntry {
                    bucket: "b".into(),
                    table: "t".into(),
                    row_id: "r3".into(),
                });
            }
        }
        assert!(batch.len() >= BACKGROUND_CHECKPOINT_MIN_OPS);
        store.apply(batch).unwrap_or_else(|e| panic!("apply: {e}"));
        let pages: i64 = store
            .conn
            .lock()
            .pragma_query_value(None, "wal_autocheckpoint", |r| r.get(0))
            .unwrap_or_else(|e| panic!("pragma: {e}"));
        assert_eq!(pages, WAL_AUTOCHECKPOINT_PAGES);
        drop(store);
        let store = SqliteStore::open(&path, schema()).unwrap_or_else(|e| panic!("reopen: {e}"));
        let get = |id: &str| store.get_synced("t", id).unwrap_or_else(|e| panic!("get: {e}"));
        // r0..r99 were written twice: the later value wins.
        assert_eq!(get("r0"), Some(row(n - 100)));
        assert_eq!(get("r99"), Some(row(n - 1)));
        assert_eq!(get("r100"), Some(row(100)));
        // r3 was deleted after its first write and written again later.
        assert_eq!(get("r3"), Some(row(n - 100 + 3)));
        assert_eq!(store.scan_synced("t").map(|r| r.len()).ok(), Some((n - 100) as usize));
        let entry = store
            .bucket_entry("b", "t", "r5")
            .unwrap_or_else(|e| panic!("entry: {e}"))
            .map(|e| e.op_id);
        assert_eq!(entry, Some((n - 100 + 5) as u64 + 1));
        let entries = store.bucket_entries("b", None, usize::MAX).map(|e| e.len()).ok();
        assert_eq!(entries, Some((n - 100) as usize));
    }
}
