//! [`SourceDb`] on SQLite, the server's embedded default: one file, WAL,
//! one writer connection behind a mutex, a small pool of read connections
//! for streams, and a background thread that checkpoints the WAL (the
//! writer only does when the WAL is over [`WalLimits::max_wal_pages`]:
//! `wal.rs`).
//!
//! Invariants: every write transaction is one `BEGIN IMMEDIATE` SQLite
//! transaction on the one writer connection, so write transactions are
//! serial (serializable, and op ids become visible in commit order);
//! checkpoints read in one read transaction (a WAL snapshot); rows are
//! kept in their own SQLite tables, op log rows as their JSON text, copied
//! into `data` lines unparsed. Commit notifications are in-process (one
//! process owns the file). Calls block: the service runs them off its
//! async threads.

mod bulk;
mod existing;
mod wal;

pub use wal::{WalLimits, DEFAULT_BACKGROUND_CHECKPOINT_PAGES, DEFAULT_MAX_WAL_PAGES};

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use ferry_core::{HlcTimestamp, RowData, Schema, Table, Value};
use ferry_protocol::{BucketChecksum, DataLineWriter, OpKind, OplogEntry, Outcome};
use ferry_source::{
    BucketState, ChangesSince, CheckpointState, ClientProgress, NewOp, OpRange, Result as SourceResult, RowWrite,
    SourceDb, SourceError, SourceTx, StoredOutcome, StoredRow,
};
use parking_lot::Mutex;
use rusqlite::types::{Value as SqlValue, ValueRef};
use rusqlite::{params, params_from_iter, Connection, OptionalExtension, TransactionBehavior};

/// Errors inside this crate: rusqlite's, or the seam's. Never leaves the
/// crate: [`lift`] turns it into a [`SourceError`].
#[derive(Debug)]
enum Error {
    Sqlite(rusqlite::Error),
    Source(SourceError),
}

impl From<rusqlite::Error> for Error {
    fn from(e: rusqlite::Error) -> Self {
        Error::Sqlite(e)
    }
}

impl From<SourceError> for Error {
    fn from(e: SourceError) -> Self {
        Error::Source(e)
    }
}

impl From<Error> for SourceError {
    fn from(e: Error) -> Self {
        match e {
            Error::Source(e) => e,
            Error::Sqlite(e) => {
                let busy = matches!(
                    e.sqlite_error_code(),
                    Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
                );
                if busy {
                    SourceError::Unavailable(e.to_string())
                } else {
                    SourceError::Database(e.to_string())
                }
            }
        }
    }
}

type Result<T, E = Error> = std::result::Result<T, E>;

/// Run `f`, its errors as [`SourceError`]s.
fn lift<T>(f: impl FnOnce() -> Result<T>) -> SourceResult<T> {
    f().map_err(SourceError::from)
}

const SETUP_SQL: &str = "
CREATE TABLE IF NOT EXISTS ferry_oplog(
  op_id INTEGER PRIMARY KEY,
  bucket TEXT NOT NULL,
  op TEXT NOT NULL,
  tbl TEXT,
  row_id TEXT,
  data TEXT,
  checksum INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS ferry_oplog_bucket ON ferry_oplog(bucket, op_id);
CREATE TABLE IF NOT EXISTS ferry_buckets(
  bucket TEXT PRIMARY KEY,
  checksum INTEGER NOT NULL,
  count INTEGER NOT NULL,
  last_op_id INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS ferry_buckets_last_op ON ferry_buckets(last_op_id);
CREATE TABLE IF NOT EXISTS ferry_row_buckets(
  tbl TEXT NOT NULL, id TEXT NOT NULL, bucket TEXT NOT NULL,
  PRIMARY KEY(tbl, id, bucket)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS ferry_clocks(
  tbl TEXT NOT NULL, id TEXT NOT NULL, clocks TEXT NOT NULL,
  PRIMARY KEY(tbl, id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS ferry_tombstones(
  tbl TEXT NOT NULL, id TEXT NOT NULL, hlc TEXT NOT NULL,
  PRIMARY KEY(tbl, id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS ferry_clients(
  client_id TEXT PRIMARY KEY, user_id TEXT NOT NULL, last_seq INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS ferry_outcomes(
  client_id TEXT NOT NULL, seq INTEGER NOT NULL, outcome TEXT NOT NULL, fingerprint INTEGER,
  PRIMARY KEY(client_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS ferry_meta(
  key TEXT PRIMARY KEY NOT NULL, value TEXT NOT NULL
) WITHOUT ROWID;
";

/// The `ferry_meta` key of the clock high-water mark (an HLC string).
const META_MAX_CLOCK: &str = "max_clock";

/// The writer connection's page cache, in KiB: a write transaction of
/// an import batch (a few MiB of pages) stays in memory until its commit
/// instead of spilling pages into the WAL midway (SQLite's default is
/// 2 MiB).
const WRITER_CACHE_KIB: i64 = 16 * 1024;

/// The page size of a database file this creates (an existing file keeps
/// its own; SQLite's default is 4 KiB). Twice the default: a bulk load's
/// rows need fewer B-tree pages, splits and WAL frames (callgrind,
/// `import_bench`: the writer's instructions 5% fewer; 16 KiB: 11%
/// fewer, but every small commit then writes 16 KiB frames and the WAL
/// bound, in pages, four times the bytes).
const NEW_PAGE_SIZE: i64 = 8192;

/// Most idle read connections kept.
const MAX_IDLE_READERS: usize = 8;

/// SQLite source database.
#[derive(Debug)]
pub struct SqliteSourceDb {
    path: PathBuf,
    writer: Mutex<Connection>,
    readers: Mutex<Vec<Connection>>,
    /// Checkpoints the WAL after commits, off the writer's commit path
    /// (`wal.rs`).
    checkpointer: wal::Checkpointer,
    limits: WalLimits,
    /// Bumped after every committed write transaction (in-process
    /// notifications: one process owns the file).
    commits: tokio::sync::watch::Sender<u64>,
}

fn open_conn(path: &Path) -> Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    conn.pragma_update(None, "page_size", NEW_PAGE_SIZE)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(conn)
}

fn q(name: &str) -> String {
    // Names are validated by the schema (letters, digits, underscores).
    format!("\"{name}\"")
}

fn to_sql(v: &Value) -> SqlValue {
    match v {
        Value::Null => SqlValue::Null,
        Value::Integer(i) => SqlValue::Integer(*i),
        Value::Real(r) => SqlValue::Real(*r),
        Value::Text(s) => SqlValue::Text(s.clone()),
        Value::Blob(b) => SqlValue::Blob(b.clone()),
    }
}

fn from_sql(v: ValueRef<'_>) -> Value {
    match v {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(i) => Value::Integer(i),
        ValueRef::Real(r) => Value::Real(r),
        ValueRef::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
        ValueRef::Blob(b) => Value::Blob(b.to_vec()),
    }
}

fn parse_op(s: &str) -> Result<OpKind> {
    OpKind::from_name(s).ok_or_else(|| corrupt("op log", format!("unknown op {s:?}")))
}

fn corrupt(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Source(SourceError::corrupt(what, e))
}

impl SqliteSourceDb {
    /// Open (creating) `source.db` under `data_dir`.
    pub fn open_dir(data_dir: &Path) -> SourceResult<Self> {
        std::fs::create_dir_all(data_dir).map_err(|e| SourceError::Io {
            path: data_dir.display().to_string(),
            message: e.to_string(),
        })?;
        Self::open(&data_dir.join("source.db"))
    }

    /// Open (creating) the database file at `path`.
    pub fn open(path: &Path) -> SourceResult<Self> {
        Self::open_with_wal_limits(path, WalLimits::default())
    }

    /// [`SqliteSourceDb::open`] with the WAL checkpointed at `limits`
    /// (see [`WalLimits`]).
    pub fn open_with_wal_limits(path: &Path, limits: WalLimits) -> SourceResult<Self> {
        lift(|| {
            let mut conn = open_conn(path)?;
            wal::hook_writer(&conn);
            conn.pragma_update(None, "cache_size", -WRITER_CACHE_KIB)?;
            conn.execute_batch(SETUP_SQL)?;
            upgrade(&mut conn)?;
            wal::take_wal_pages();
            Ok(SqliteSourceDb {
                path: path.to_owned(),
                writer: Mutex::new(conn),
                readers: Mutex::new(Vec::new()),
                checkpointer: wal::Checkpointer::start(path)?,
                limits,
                commits: tokio::sync::watch::channel(0).0,
            })
        })
    }

    /// Checkpoints the background checkpointer has run (for tests).
    #[doc(hidden)]
    pub fn background_checkpoints(&self) -> u64 {
        self.checkpointer.runs()
    }

    /// After a commit on the writer `conn` (still held): checkpoint the
    /// WAL now if it is over the limit, else wake the background
    /// checkpointer once it is big enough.
    fn after_commit(&self, conn: &Connection) -> Result<()> {
        let Some(pages) = wal::take_wal_pages() else {
            return Ok(());
        };
        if wal::writer_checkpoints(pages, self.limits.max_wal_pages) {
            wal::checkpoint_passive(conn)?;
        } else if pages >= self.limits.background_checkpoint_pages {
            self.checkpointer.wake();
        }
        Ok(())
    }

    fn with_reader<T>(&self, f: impl FnOnce(&mut Connection) -> Result<T>) -> Result<T> {
        let pooled = self.readers.lock().pop();
        let mut conn = match pooled {
            Some(c) => c,
            None => open_conn(&self.path)?,
        };
        let out = f(&mut conn);
        if !conn.is_autocommit() {
            // A failed read left its transaction open: drop the connection.
            return out;
        }
        let mut pool = self.readers.lock();
        if pool.len() < MAX_IDLE_READERS {
            pool.push(conn);
        }
        out
    }
}

/// Bring a database made by an older version up to date, in one
/// transaction: outcomes get a fingerprint column (NULL for old ones), and
/// the clock high-water mark is computed from the stored clocks once.
fn upgrade(conn: &mut Connection) -> Result<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let has_fingerprint: bool = tx
        .prepare("SELECT COUNT(*) FROM pragma_table_info('ferry_outcomes') WHERE name = 'fingerprint'")?
        .query_row([], |r| r.get::<_, i64>(0))?
        > 0;
    if !has_fingerprint {
        tx.execute_batch("ALTER TABLE ferry_outcomes ADD COLUMN fingerprint INTEGER")?;
    }
    if read_max_clock(&tx)?.is_none() {
        let mut max: Option<HlcTimestamp> = None;
        {
            let mut stmt = tx.prepare("SELECT hlc FROM ferry_tombstones")?;
            let mut rows = stmt.query([])?;
            while let Some(r) = rows.next()? {
                let h: String = r.get(0)?;
                raise(
                    &mut max,
                    &h.parse::<HlcTimestamp>().map_err(|e| corrupt("tombstone", e))?,
                );
            }
            let mut stmt = tx.prepare("SELECT clocks FROM ferry_clocks")?;
            let mut rows = stmt.query([])?;
            while let Some(r) = rows.next()? {
                let text: String = r.get(0)?;
                let clocks = bulk::decode_clocks(&text)?;
                for c in clocks.values() {
                    raise(&mut max, c);
                }
            }
        }
        if let Some(m) = max {
            write_max_clock(&tx, &m)?;
        }
    }
    tx.commit()?;
    Ok(())
}

/// `*max = max(*max, c)`.
fn raise(max: &mut Option<HlcTimestamp>, c: &HlcTimestamp) {
    if max.as_ref().is_none_or(|m| c > m) {
        *max = Some(c.clone());
    }
}

fn read_max_clock(conn: &Connection) -> Result<Option<HlcTimestamp>> {
    let s: Option<String> = conn
        .prepare_cached("SELECT value FROM ferry_meta WHERE key = ?1")?
        .query_row([META_MAX_CLOCK], |r| r.get(0))
        .optional()?;
    s.map(|s| {
        s.parse::<HlcTimestamp>()
            .map_err(|e| corrupt("clock high-water mark", e))
    })
    .transpose()
}

fn write_max_clock(conn: &Connection, hlc: &HlcTimestamp) -> Result<()> {
    conn.prepare_cached("INSERT OR REPLACE INTO ferry_meta(key, value) VALUES (?1, ?2)")?
        .execute(params![META_MAX_CLOCK, hlc.to_string()])?;
    Ok(())
}

struct SqliteTx<'c> {
    tx: &'c rusqlite::Transaction<'c>,
    /// The next op id to hand out, once the first was read.
    next_op_id: Option<u64>,
    /// The greatest clock written in this transaction (row clocks and
    /// tombstones); raises the stored high-water mark before commit.
    max_clock: Option<HlcTimestamp>,
}

fn read_row_in(conn: &Connection, table: &Table, id: &str) -> Result<Option<StoredRow>> {
    let cols: Vec<String> = table.columns.iter().map(|c| q(&c.name)).collect();
    let select = if cols.is_empty() {
        "id".to_owned()
    } else {
        cols.join(", ")
    };
    let sql = format!("SELECT {select} FROM {} WHERE id = ?1", q(&table.name));
    let mut stmt = conn.prepare_cached(&sql)?;
    let data = stmt
        .query_row([id], |r| {
            let mut d = RowData::new();
            if !table.columns.is_empty() {
                for (i, c) in table.columns.iter().enumerate() {
                    d.insert(c.name.clone(), from_sql(r.get_ref(i)?));
                }
            }
            Ok(d)
        })
        .optional()?;
    let clocks: Option<String> = conn
        .prepare_cached("SELECT clocks FROM ferry_clocks WHERE tbl = ?1 AND id = ?2")?
        .query_row([&table.name, id], |r| r.get(0))
        .optional()?;
    let clocks: BTreeMap<String, HlcTimestamp> = match clocks {
        Some(s) => bulk::decode_clocks(&s)?,
        None => BTreeMap::new(),
    };
    let deleted: Option<String> = conn
        .prepare_cached("SELECT hlc FROM ferry_tombstones WHERE tbl = ?1 AND id = ?2")?
        .query_row([&table.name, id], |r| r.get(0))
        .optional()?;
    let deleted = match deleted {
        Some(s) => Some(s.parse::<HlcTimestamp>().map_err(|e| corrupt("tombstone", e))?),
        None => None,
    };
    if data.is_none() && deleted.is_none() {
        return Ok(None);
    }
    Ok(Some(StoredRow { data, clocks, deleted }))
}

impl SourceTx for SqliteTx<'_> {
    fn client(&mut self, client_id: &str) -> SourceResult<Option<ClientProgress>> {
        lift(|| {
            Ok(self
                .tx
                .prepare_cached("SELECT user_id, last_seq FROM ferry_clients WHERE client_id = ?1")?
                .query_row([client_id], |r| {
                    Ok(ClientProgress {
                        user_id: r.get(0)?,
                        last_seq: r.get::<_, i64>(1)? as u64,
                    })
                })
                .optional()?)
        })
    }

    fn set_client(&mut self, client_id: &str, user_id: &str, last_seq: u64) -> SourceResult<()> {
        lift(|| {
            self.tx
                .prepare_cached(
                    "INSERT INTO ferry_clients(client_id, user_id, last_seq) VALUES (?1, ?2, ?3)
                 ON CONFLICT(client_id) DO UPDATE SET last_seq = excluded.last_seq",
                )?
                .execute(params![client_id, user_id, last_seq as i64])?;
            Ok(())
        })
    }

    fn outcome(&mut self, client_id: &str, seq: u64) -> SourceResult<Option<StoredOutcome>> {
        lift(|| {
            let row: Option<(String, Option<i64>)> = self
                .tx
                .prepare_cached("SELECT outcome, fingerprint FROM ferry_outcomes WHERE client_id = ?1 AND seq = ?2")?
                .query_row(params![client_id, seq as i64], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            row.map(|(s, fingerprint)| {
                Ok(StoredOutcome {
                    outcome: serde_json::from_str(&s).map_err(|e| corrupt("outcome", e))?,
                    // Stored as the i64 with the same bits.
                    fingerprint: fingerprint.map(|f| f as u64),
                })
            })
            .transpose()
        })
    }

    fn record_outcome(&mut self, client_id: &str, seq: u64, fingerprint: u64, outcome: &Outcome) -> SourceResult<()> {
        lift(|| {
            let s = serde_json::to_string(outcome).map_err(|e| corrupt("outcome", e))?;
            self.tx
            .prepare_cached(
                "INSERT OR REPLACE INTO ferry_outcomes(client_id, seq, outcome, fingerprint) VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![client_id, seq as i64, s, fingerprint as i64])?;
            Ok(())
        })
    }

    fn prune_outcomes(&mut self, client_id: &str, below_seq: u64) -> SourceResult<u64> {
        lift(|| {
            let n = self
                .tx
                .prepare_cached("DELETE FROM ferry_outcomes WHERE client_id = ?1 AND seq < ?2")?
                .execute(params![client_id, i64::try_from(below_seq).unwrap_or(i64::MAX)])?;
            Ok(n as u64)
        })
    }

    fn read_row(&mut self, table: &Table, id: &str) -> SourceResult<Option<StoredRow>> {
        lift(|| read_row_in(self.tx, table, id))
    }

    fn write_row(
        &mut self,
        table: &Table,
        id: &str,
        data: &RowData,
        clocks: &BTreeMap<String, HlcTimestamp>,
    ) -> SourceResult<Option<RowData>> {
        lift(|| {
            let names: Vec<String> = table.columns.iter().map(|c| q(&c.name)).collect();
            let mut cols = vec!["id".to_owned()];
            cols.extend(names.iter().cloned());
            let marks: Vec<String> = (1..=cols.len()).map(|i| format!("?{i}")).collect();
            let update = if names.is_empty() {
                "NOTHING".to_owned()
            } else {
                format!(
                    "UPDATE SET {}",
                    names
                        .iter()
                        .map(|n| format!("{n} = excluded.{n}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            };
            let sql = format!(
                "INSERT INTO {}({}) VALUES ({}) ON CONFLICT(id) DO {update}",
                q(&table.name),
                cols.join(", "),
                marks.join(", ")
            );
            let mut values = vec![SqlValue::Text(id.to_owned())];
            values.extend(
                table
                    .columns
                    .iter()
                    .map(|c| to_sql(data.get(&c.name).unwrap_or(&Value::Null))),
            );
            self.tx.prepare_cached(&sql)?.execute(params_from_iter(values))?;
            for c in clocks.values() {
                raise(&mut self.max_clock, c);
            }
            let clocks = bulk::encode_clocks(clocks)?;
            self.tx
                .prepare_cached("INSERT OR REPLACE INTO ferry_clocks(tbl, id, clocks) VALUES (?1, ?2, ?3)")?
                .execute(params![table.name, id, clocks])?;
            self.tx
                .prepare_cached("DELETE FROM ferry_tombstones WHERE tbl = ?1 AND id = ?2")?
                .execute(params![table.name, id])?;
            // SQLite keeps values as given.
            Ok(None)
        })
    }

    fn set_clocks(&mut self, table: &str, id: &str, clocks: &BTreeMap<String, HlcTimestamp>) -> SourceResult<()> {
        lift(|| {
            for c in clocks.values() {
                raise(&mut self.max_clock, c);
            }
            let clocks = bulk::encode_clocks(clocks)?;
            self.tx
                .prepare_cached("INSERT OR REPLACE INTO ferry_clocks(tbl, id, clocks) VALUES (?1, ?2, ?3)")?
                .execute(params![table, id, clocks])?;
            self.tx
                .prepare_cached("DELETE FROM ferry_tombstones WHERE tbl = ?1 AND id = ?2")?
                .execute(params![table, id])?;
            Ok(())
        })
    }

    fn delete_row(&mut self, table: &Table, id: &str, hlc: &HlcTimestamp) -> SourceResult<()> {
        lift(|| {
            self.tx
                .prepare_cached(&format!("DELETE FROM {} WHERE id = ?1", q(&table.name)))?
                .execute([id])?;
            self.tx
                .prepare_cached("DELETE FROM ferry_clocks WHERE tbl = ?1 AND id = ?2")?
                .execute(params![table.name, id])?;
            self.tx
                .prepare_cached("INSERT OR REPLACE INTO ferry_tombstones(tbl, id, hlc) VALUES (?1, ?2, ?3)")?
                .execute(params![table.name, id, hlc.to_string()])?;
            raise(&mut self.max_clock, hlc);
            Ok(())
        })
    }

    fn row_buckets(&mut self, table: &str, id: &str) -> SourceResult<BTreeSet<String>> {
        lift(|| {
            let mut stmt = self
                .tx
                .prepare_cached("SELECT bucket FROM ferry_row_buckets WHERE tbl = ?1 AND id = ?2")?;
            let rows = stmt.query_map([table, id], |r| r.get::<_, String>(0))?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    fn set_row_buckets(&mut self, table: &str, id: &str, buckets: &BTreeSet<String>) -> SourceResult<()> {
        lift(|| {
            self.tx
                .prepare_cached("DELETE FROM ferry_row_buckets WHERE tbl = ?1 AND id = ?2")?
                .execute([table, id])?;
            let mut ins = self
                .tx
                .prepare_cached("INSERT INTO ferry_row_buckets(tbl, id, bucket) VALUES (?1, ?2, ?3)")?;
            for b in buckets {
                ins.execute([table, id, b.as_str()])?;
            }
            Ok(())
        })
    }

    fn write_rows(&mut self, table: &Table, rows: &[RowWrite<'_>]) -> SourceResult<Vec<Option<RowData>>> {
        lift(|| {
            bulk::write_rows(self.tx, table, rows, &mut self.max_clock)?;
            // SQLite keeps values as given.
            Ok(vec![None; rows.len()])
        })
    }

    fn read_rows_with_buckets(
        &mut self,
        table: &Table,
        ids: &[&str],
    ) -> SourceResult<Vec<(Option<StoredRow>, BTreeSet<String>)>> {
        lift(|| existing::read_rows_with_buckets(self.tx, table, ids))
    }

    fn set_many_clocks(&mut self, table: &str, rows: &[(&str, &BTreeMap<String, HlcTimestamp>)]) -> SourceResult<()> {
        lift(|| existing::set_many_clocks(self.tx, table, rows, &mut self.max_clock))
    }

    fn known_rows(&mut self, table: &Table, ids: &[&str]) -> SourceResult<BTreeSet<String>> {
        lift(|| bulk::known_rows(self.tx, table, ids))
    }

    fn set_rows_buckets(&mut self, table: &str, rows: &[(&str, &BTreeSet<String>)]) -> SourceResult<()> {
        lift(|| bulk::set_rows_buckets(self.tx, table, rows, true))
    }

    fn add_rows_buckets(&mut self, table: &str, rows: &[(&str, &BTreeSet<String>)]) -> SourceResult<()> {
        lift(|| bulk::set_rows_buckets(self.tx, table, rows, false))
    }

    fn append_ops(&mut self, ops: &[NewOp<'_>]) -> SourceResult<()> {
        lift(|| bulk::append_ops(self.tx, ops))
    }

    fn next_op_id(&mut self) -> SourceResult<u64> {
        lift(|| {
            let op_id = match self.next_op_id {
                Some(n) => n,
                None => {
                    // Ids of a rolled-back transaction are handed out
                    // again: nothing saw them.
                    let max: i64 = self
                        .tx
                        .prepare_cached("SELECT COALESCE(MAX(op_id), 0) FROM ferry_oplog")?
                        .query_row([], |r| r.get(0))?;
                    max as u64 + 1
                }
            };
            self.next_op_id = Some(op_id + 1);
            Ok(op_id)
        })
    }

    fn append_op(&mut self, op: NewOp<'_>) -> SourceResult<()> {
        lift(|| {
            let data = bulk::op_json(&op)?;
            self.tx
                .prepare_cached(
                    "INSERT INTO ferry_oplog(op_id, bucket, op, tbl, row_id, data, checksum)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                )?
                .execute(params![
                    op.op_id as i64,
                    op.bucket,
                    op.op.as_str(),
                    op.table,
                    op.row_id,
                    data.as_deref(),
                    i64::from(op.checksum)
                ])?;
            Ok(())
        })
    }

    fn bucket_state(&mut self, bucket: &str) -> SourceResult<Option<BucketState>> {
        lift(|| {
            Ok(self
                .tx
                .prepare_cached("SELECT checksum, count, last_op_id FROM ferry_buckets WHERE bucket = ?1")?
                .query_row([bucket], |r| {
                    Ok(BucketState {
                        checksum: r.get::<_, i64>(0)? as u32,
                        count: r.get::<_, i64>(1)? as u64,
                        last_op_id: r.get::<_, i64>(2)? as u64,
                    })
                })
                .optional()?)
        })
    }

    fn set_bucket_state(&mut self, bucket: &str, state: &BucketState) -> SourceResult<()> {
        lift(|| {
            self.tx
                .prepare_cached(
                    "INSERT OR REPLACE INTO ferry_buckets(bucket, checksum, count, last_op_id) VALUES (?1, ?2, ?3, ?4)",
                )?
                .execute(params![
                    bucket,
                    i64::from(state.checksum),
                    state.count as i64,
                    state.last_op_id as i64
                ])?;
            Ok(())
        })
    }

    fn bucket_ops(&mut self, bucket: &str) -> SourceResult<Vec<OplogEntry>> {
        lift(|| read_ops_in(self.tx, &OpRange::all(bucket)))
    }

    fn set_meta(&mut self, key: &str, value: &str) -> SourceResult<()> {
        lift(|| {
            self.tx
                .prepare_cached("INSERT OR REPLACE INTO ferry_meta(key, value) VALUES (?1, ?2)")?
                .execute(params![key, value])?;
            Ok(())
        })
    }

    fn savepoint(&mut self) -> SourceResult<()> {
        lift(|| {
            self.tx.prepare_cached("SAVEPOINT ferry_op")?.execute([])?;
            Ok(())
        })
    }

    fn rollback_to_savepoint(&mut self) -> SourceResult<()> {
        lift(|| {
            self.tx.prepare_cached("ROLLBACK TO SAVEPOINT ferry_op")?.execute([])?;
            self.tx.prepare_cached("RELEASE SAVEPOINT ferry_op")?.execute([])?;
            Ok(())
        })
    }

    fn release_savepoint(&mut self) -> SourceResult<()> {
        lift(|| {
            self.tx.prepare_cached("RELEASE SAVEPOINT ferry_op")?.execute([])?;
            Ok(())
        })
    }

    fn replace_bucket_ops(&mut self, bucket: &str, entries: &[OplogEntry]) -> SourceResult<()> {
        lift(|| {
            self.tx
                .prepare_cached("DELETE FROM ferry_oplog WHERE bucket = ?1")?
                .execute([bucket])?;
            let mut ins = self.tx.prepare_cached(
                "INSERT INTO ferry_oplog(op_id, bucket, op, tbl, row_id, data, checksum)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?;
            for e in entries {
                let data = e
                    .data
                    .as_ref()
                    .map(|d| serde_json::to_string(d).map_err(|err| corrupt("row", err)))
                    .transpose()?;
                ins.execute(params![
                    e.op_id as i64,
                    bucket,
                    e.op.as_str(),
                    e.object_type,
                    e.object_id,
                    data,
                    i64::from(e.checksum)
                ])?;
            }
            Ok(())
        })
    }
}

/// Visit the op log entries of `range` in op id order, at most
/// `max_ops`, until `visit` returns `false` (it did not take the entry:
/// the line is full). Columns: op_id, op, tbl, row_id, data, checksum.
fn scan_ops(
    conn: &Connection,
    range: &OpRange<'_>,
    mut visit: impl FnMut(&rusqlite::Row<'_>) -> Result<bool>,
) -> Result<()> {
    let mut stmt = conn.prepare_cached(
        "SELECT op_id, op, tbl, row_id, data, checksum FROM ferry_oplog
         WHERE bucket = ?1 AND op_id > ?2 AND op_id <= ?3 ORDER BY op_id LIMIT ?4",
    )?;
    let limit = i64::try_from(range.max_ops).unwrap_or(i64::MAX);
    let mut rows = stmt.query(params![
        range.bucket,
        i64::try_from(range.after_op_id).unwrap_or(i64::MAX),
        i64::try_from(range.up_to_op_id).unwrap_or(i64::MAX),
        limit
    ])?;
    while let Some(r) = rows.next()? {
        if !visit(r)? {
            break;
        }
    }
    Ok(())
}

/// Add the entry of `r` (a [`scan_ops`] row) to `line`, its stored row
/// JSON copied; false when it did not fit.
fn push_row(line: &mut DataLineWriter, r: &rusqlite::Row<'_>) -> Result<bool> {
    let data = match r.get_ref(4)? {
        ValueRef::Text(t) => Some(t),
        _ => None,
    };
    Ok(line.push_raw(
        r.get::<_, i64>(0)? as u64,
        op_of(r)?,
        opt_text(r.get_ref(2)?, "table")?,
        opt_text(r.get_ref(3)?, "row id")?,
        data,
        r.get::<_, i64>(5)? as u32,
    ))
}

fn op_of(r: &rusqlite::Row<'_>) -> Result<OpKind> {
    match opt_text(r.get_ref(1)?, "op")? {
        Some(t) => parse_op(t),
        None => Err(corrupt("op", "null")),
    }
}

fn read_ops_in(conn: &Connection, range: &OpRange<'_>) -> Result<Vec<OplogEntry>> {
    let mut out = Vec::new();
    // `max_line_bytes` bounds the encoded `data` line of the entries, as
    // for `read_ops_into_in`: measured (and dropped) when bounded.
    let max_bytes = range.max_line_bytes;
    let mut measure =
        (max_bytes < usize::MAX).then(|| DataLineWriter::new(range.bucket, 0).with_max_line_bytes(max_bytes));
    scan_ops(conn, range, |r| {
        if let Some(line) = &mut measure {
            if !push_row(line, r)? {
                return Ok(false);
            }
        }
        let data = match r.get_ref(4)? {
            ValueRef::Text(t) => Some(serde_json::from_slice::<RowData>(t).map_err(|e| corrupt("row data", e))?),
            _ => None,
        };
        out.push(OplogEntry {
            op_id: r.get::<_, i64>(0)? as u64,
            op: op_of(r)?,
            object_type: r.get(2)?,
            object_id: r.get(3)?,
            data,
            checksum: r.get::<_, i64>(5)? as u32,
        });
        Ok(true)
    })?;
    Ok(out)
}

fn opt_text<'a>(v: ValueRef<'a>, what: &str) -> Result<Option<&'a str>> {
    match v {
        ValueRef::Text(t) => Ok(Some(std::str::from_utf8(t).map_err(|e| corrupt(what, e))?)),
        ValueRef::Null => Ok(None),
        _ => Err(corrupt(what, "not text")),
    }
}

/// [`read_ops_in`] appending to an encoded line: the stored row JSON (what
/// `serde_json` wrote for the row) is copied, never parsed. The line is cut
/// before an entry that would take it past `max_line_bytes` encoded bytes
/// (newline included; at least one entry per line), or past the line's own
/// limit when that is lower.
fn read_ops_into_in(conn: &Connection, range: &OpRange<'_>, line: &mut DataLineWriter) -> Result<Option<u64>> {
    line.lower_max_line_bytes(range.max_line_bytes);
    let mut last = None;
    scan_ops(conn, range, |r| {
        if !push_row(line, r)? {
            return Ok(false);
        }
        last = line.last_op_id();
        Ok(true)
    })?;
    Ok(last)
}

impl SourceDb for SqliteSourceDb {
    fn commits(&self) -> ferry_source::CommitReceiver {
        self.commits.subscribe()
    }

    fn migrate(&self, schema: &Schema) -> SourceResult<()> {
        lift(|| {
            let conn = self.writer.lock();
            for t in schema.tables() {
                // Ferry's own names are the sync rules' business
                // (`SyncRules`); SQLite's own are refused here.
                if t.name.starts_with("sqlite_") {
                    return Err(SourceError::Schema(format!("table name {:?} is reserved by SQLite", t.name)).into());
                }
                let sql_type = |ty: ferry_core::ColumnType| match ty {
                    ferry_core::ColumnType::Integer => "INTEGER",
                    ferry_core::ColumnType::Real => "REAL",
                    ferry_core::ColumnType::Text => "TEXT",
                    ferry_core::ColumnType::Blob => "BLOB",
                };
                let cols: Vec<String> = t
                    .columns
                    .iter()
                    .map(|c| format!(", {} {}", q(&c.name), sql_type(c.ty)))
                    .collect();
                // Keyed by the id alone (WITHOUT ROWID): one B-tree per
                // table, not a rowid table plus an index of its ids, so a
                // row costs one insert. Tables made before stay as they
                // are.
                conn.execute_batch(&format!(
                    "CREATE TABLE IF NOT EXISTS {}(id TEXT PRIMARY KEY NOT NULL{}) WITHOUT ROWID",
                    q(&t.name),
                    cols.concat()
                ))?;
                let mut stmt = conn.prepare(&format!("PRAGMA table_info({})", q(&t.name)))?;
                let existing: BTreeSet<String> = stmt
                    .query_map([], |r| r.get::<_, String>(1))?
                    .collect::<Result<_, _>>()?;
                for c in &t.columns {
                    if !existing.contains(&c.name) {
                        conn.execute_batch(&format!(
                            "ALTER TABLE {} ADD COLUMN {} {}",
                            q(&t.name),
                            q(&c.name),
                            sql_type(c.ty)
                        ))?;
                    }
                }
            }
            Ok(())
        })
    }

    fn write(&self, work: &mut dyn FnMut(&mut dyn SourceTx) -> SourceResult<()>) -> SourceResult<()> {
        lift(|| {
            let mut conn = self.writer.lock();
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            {
                let mut stx = SqliteTx {
                    tx: &tx,
                    next_op_id: None,
                    max_clock: None,
                };
                work(&mut stx)?; // an error drops `tx`, which rolls back
                if let Some(m) = &stx.max_clock {
                    if read_max_clock(&tx)?.is_none_or(|stored| *m > stored) {
                        write_max_clock(&tx, m)?;
                    }
                }
            }
            wal::take_wal_pages();
            tx.commit()?;
            self.commits.send_modify(|n| *n = n.wrapping_add(1));
            // The write is committed whatever the checkpoint does.
            let _ = self.after_commit(&conn);
            Ok(())
        })
    }

    fn checkpoint(&self, client_id: &str, buckets: &[String]) -> SourceResult<CheckpointState> {
        lift(|| {
            self.with_reader(|conn| {
                let tx = conn.transaction_with_behavior(TransactionBehavior::Deferred)?;
                let last_op_id: i64 = tx
                    .prepare_cached("SELECT COALESCE(MAX(op_id), 0) FROM ferry_oplog")?
                    .query_row([], |r| r.get(0))?;
                let mut out = Vec::with_capacity(buckets.len());
                {
                    let mut stmt = tx.prepare_cached("SELECT checksum, count FROM ferry_buckets WHERE bucket = ?1")?;
                    for b in buckets {
                        let (checksum, count) = stmt
                            .query_row([b], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))
                            .optional()?
                            .unwrap_or((0, 0));
                        out.push(BucketChecksum {
                            bucket: b.clone(),
                            checksum: checksum as u32,
                            count: count as u64,
                        });
                    }
                }
                let write_checkpoint: Option<i64> = tx
                    .prepare_cached("SELECT last_seq FROM ferry_clients WHERE client_id = ?1")?
                    .query_row([client_id], |r| r.get(0))
                    .optional()?;
                tx.commit()?;
                Ok(CheckpointState {
                    last_op_id: last_op_id as u64,
                    buckets: out,
                    write_checkpoint: write_checkpoint.map(|s| s as u64),
                })
            })
        })
    }

    fn changes_since(&self, after_op_id: u64, clients: &[String]) -> SourceResult<ChangesSince> {
        lift(|| {
            self.with_reader(|conn| {
                let tx = conn.transaction_with_behavior(TransactionBehavior::Deferred)?;
                let last_op_id: i64 = tx
                    .prepare_cached("SELECT COALESCE(MAX(op_id), 0) FROM ferry_oplog")?
                    .query_row([], |r| r.get(0))?;
                let mut out = ChangesSince {
                    last_op_id: last_op_id as u64,
                    ..ChangesSince::default()
                };
                {
                    let mut stmt = tx.prepare_cached(
                        "SELECT bucket, checksum, count, last_op_id FROM ferry_buckets WHERE last_op_id > ?1",
                    )?;
                    let rows = stmt.query_map([i64::try_from(after_op_id).unwrap_or(i64::MAX)], |r| {
                        Ok((
                            r.get::<_, String>(0)?,
                            BucketState {
                                checksum: r.get::<_, i64>(1)? as u32,
                                count: r.get::<_, i64>(2)? as u64,
                                last_op_id: r.get::<_, i64>(3)? as u64,
                            },
                        ))
                    })?;
                    out.buckets = rows.collect::<Result<_, _>>()?;
                    let mut stmt = tx.prepare_cached("SELECT last_seq FROM ferry_clients WHERE client_id = ?1")?;
                    for c in clients {
                        if let Some(seq) = stmt.query_row([c], |r| r.get::<_, i64>(0)).optional()? {
                            out.clients.push((c.clone(), seq as u64));
                        }
                    }
                }
                tx.commit()?;
                Ok(out)
            })
        })
    }

    fn read_ops(&self, range: &OpRange<'_>) -> SourceResult<Vec<OplogEntry>> {
        lift(|| self.with_reader(|conn| read_ops_in(conn, range)))
    }

    fn read_ops_into(&self, range: &OpRange<'_>, line: &mut DataLineWriter) -> SourceResult<Option<u64>> {
        lift(|| self.with_reader(|conn| read_ops_into_in(conn, range, line)))
    }

    fn bucket_names(&self) -> SourceResult<Vec<String>> {
        lift(|| {
            self.with_reader(|conn| {
                let mut stmt = conn.prepare_cached("SELECT bucket FROM ferry_buckets ORDER BY bucket")?;
                let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
                Ok(rows.collect::<Result<_, _>>()?)
            })
        })
    }

    fn oplog_len(&self) -> SourceResult<u64> {
        lift(|| {
            self.with_reader(|conn| {
                let n: i64 = conn.query_row("SELECT COUNT(*) FROM ferry_oplog", [], |r| r.get(0))?;
                Ok(n as u64)
            })
        })
    }

    fn get_row(&self, table: &Table, id: &str) -> SourceResult<Option<StoredRow>> {
        lift(|| self.with_reader(|conn| read_row_in(conn, table, id)))
    }

    fn client_owner(&self, client_id: &str) -> SourceResult<Option<String>> {
        lift(|| {
            self.with_reader(|conn| {
                Ok(conn
                    .prepare_cached("SELECT user_id FROM ferry_clients WHERE client_id = ?1")?
                    .query_row([client_id], |r| r.get(0))
                    .optional()?)
            })
        })
    }

    fn client_outcomes(
        &self,
        client_id: &str,
        after_seq: u64,
        limit: usize,
    ) -> SourceResult<Vec<(u64, StoredOutcome)>> {
        lift(|| {
            self.with_reader(|conn| {
                let mut stmt = conn.prepare_cached(
                    "SELECT seq, outcome, fingerprint FROM ferry_outcomes
                     WHERE client_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
                )?;
                // Seqs are stored as i64; one above i64::MAX matches none.
                let after = i64::try_from(after_seq).unwrap_or(i64::MAX);
                let limit = i64::try_from(limit).unwrap_or(i64::MAX);
                let rows = stmt.query_map(params![client_id, after, limit], |r| {
                    Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?, r.get::<_, Option<i64>>(2)?))
                })?;
                let mut out = Vec::new();
                for row in rows {
                    let (seq, s, fingerprint) = row?;
                    out.push((
                        seq as u64,
                        StoredOutcome {
                            outcome: serde_json::from_str(&s).map_err(|e| corrupt("outcome", e))?,
                            fingerprint: fingerprint.map(|f| f as u64),
                        },
                    ));
                }
                Ok(out)
            })
        })
    }

    fn meta(&self, key: &str) -> SourceResult<Option<String>> {
        lift(|| {
            self.with_reader(|conn| {
                Ok(conn
                    .prepare_cached("SELECT value FROM ferry_meta WHERE key = ?1")?
                    .query_row([key], |r| r.get(0))
                    .optional()?)
            })
        })
    }

    fn row_ids(&self, table: &Table, after_id: Option<&str>, limit: usize) -> SourceResult<Vec<String>> {
        lift(|| {
            self.with_reader(|conn| {
                // Two statements, so each is one range of the primary key's
                // index (`?1 IS NULL OR id > ?1` would scan it from the
                // start every time: a whole pass quadratic in the rows).
                let limit = i64::try_from(limit).unwrap_or(i64::MAX);
                let t = q(&table.name);
                let rows: Vec<String> = match after_id {
                    None => {
                        let mut stmt = conn.prepare_cached(&format!("SELECT id FROM {t} ORDER BY id LIMIT ?1"))?;
                        let rows = stmt.query_map(params![limit], |r| r.get::<_, String>(0))?;
                        rows.collect::<Result<_, _>>()?
                    }
                    Some(after) => {
                        let mut stmt =
                            conn.prepare_cached(&format!("SELECT id FROM {t} WHERE id > ?1 ORDER BY id LIMIT ?2"))?;
                        let rows = stmt.query_map(params![after, limit], |r| r.get::<_, String>(0))?;
                        rows.collect::<Result<_, _>>()?
                    }
                };
                Ok(rows)
            })
        })
    }

    fn max_clock(&self) -> SourceResult<Option<HlcTimestamp>> {
        lift(|| self.with_reader(|conn| read_max_clock(conn)))
    }
}
