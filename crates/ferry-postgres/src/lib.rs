//! [`SourceDb`] on PostgreSQL: the app's own tables are the source of
//! truth, Ferry keeps its bookkeeping (column clocks, tombstones, bucket
//! membership, the op log, bucket state, client progress, outcomes,
//! captured changes) in a schema of its own (`ferry` by default), and
//! never alters the app's tables except to add capture triggers.
//!
//! - **Tables as they are.** The sync rules name existing tables and
//!   columns; [`SourceDb::migrate`] checks them (a missing table or
//!   column, an unsupported type, a table without a single-column primary
//!   key is refused with a message naming it) and creates them only when
//!   asked to ([`PgOptions::create_tables`]). Types: see the table in
//!   `layout.rs` (text, varchar, uuid, integers, numeric, floats,
//!   boolean, dates and times as ISO text, json/jsonb as text, bytea).
//! - **Writes lock what they touch** (`docs/adr/0016-postgres-concurrent-uploads.md`).
//!   A write transaction, from any server, holds until it ends an
//!   advisory lock on each row (table and id) and client it reads or
//!   writes, taken before the statement that does (with a writers' lock
//!   held shared), and from its first op id, op log entry, bucket state
//!   or setting, Ferry's one op-counter row (`SELECT ... FOR UPDATE`):
//!   serializable with respect to what it reads, and op ids become
//!   visible in commit order (the counter commits with the ops). What no
//!   key covers (a range of ids), or more than
//!   `MAX_KEY_LOCKS` keys, takes the writers' lock exclusive: it runs
//!   alone. A transaction that loses a deadlock is run again. Reads
//!   (checkpoints, op ranges) never wait for any of it.
//! - **Capture.** A trigger on each synced table records the id of every
//!   row changed by anyone else (the app's backend, psql, a migration)
//!   in `ferry.changes`, and a statement trigger records a `TRUNCATE` of
//!   the table as one change (the service deletes the rows Ferry knew of
//!   that are gone: [`ferry_source::SourceTx::vanished_rows`]); Ferry's own
//!   writes set `ferry.writing` for their transaction and are not
//!   captured. The sync service turns captured
//!   changes into ops ([`ferry_source::SourceTx::take_captured`] in a write
//!   transaction), one service at a time ([`SourceDb::try_lead`]:
//!   a PostgreSQL advisory lock).
//! - **Lookups by many keys** join `unnest` of the keys to a `LATERAL`
//!   subquery the planner may not flatten (`OFFSET 0`): a probe per key,
//!   never a join that scans the table; a delete by many keys deletes the
//!   probed rows by `ctid` (a TID scan). They are planned each time they
//!   run (`tx::PLANNED_EACH_TIME`), for the table's size then. (`key =
//!   ANY($1)`, or a flattened join, over a table not analyzed yet was
//!   planned as a scan of every row of the table, and a prepared statement
//!   kept that plan while the table grew: each upload scanned every
//!   membership of its table, and uploads slowed as rows accumulated.)
//! - **Notifications.** A commit sends `NOTIFY` on a channel named after
//!   Ferry's schema; every server listening on the database wakes its
//!   streams ([`SourceDb::commits`]).
//! - **Blocking calls over an async driver** (tokio-postgres with a
//!   deadpool pool, `docs/adr/0012-postgres-driver.md`): see `bridge.rs`.

mod batched;
mod bridge;
mod error;
mod layout;
mod listen;
mod rows;
pub mod scratch;
mod setup;
mod tls;
mod tx;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use ferry_core::{HlcTimestamp, RowData, Schema, Table};
use ferry_protocol::{BucketChecksum, DataLineWriter, OpKind, OplogEntry};
use ferry_source::{
    BucketState, ChangesSince, CheckpointState, ClientProgress, CommitReceiver, Lease, OpRange, Result as SourceResult,
    SourceDb, SourceError, StoredOutcome, StoredRow,
};
use parking_lot::RwLock;

use crate::bridge::{wait, Bridge};
use crate::error::{corrupt, lift, Result};
use crate::layout::{quote_ident, PgColumn, TableLayout};
use crate::tx::{query, PgTx, PLANNED_EACH_TIME};

/// How to reach and lay out a PostgreSQL source database.
#[derive(Clone, Debug)]
pub struct PgOptions {
    /// `postgres://user[:password]@host[:port]/database[?options]`.
    pub url: String,
    /// The schema Ferry keeps its own tables in (created if missing):
    /// lowercase letters, digits and underscores (it names notification
    /// channels and triggers).
    pub ferry_schema: String,
    /// The schema of the app's tables the rules name: any name PostgreSQL
    /// takes (quoted in every statement).
    pub app_schema: String,
    /// Most pooled connections (write transactions and reads).
    pub max_connections: usize,
    /// How long to wait for a connection (connecting, or a free one from a
    /// full pool) before a call fails as unavailable.
    pub connect_timeout_ms: u64,
    /// Create the rules' tables and columns that are missing (a quick
    /// start; never the default on PostgreSQL).
    pub create_tables: bool,
}

/// Most runs of one write transaction that lost a deadlock to another.
const MAX_WRITE_ATTEMPTS: u32 = 5;

/// The default [`PgOptions::max_connections`].
pub const DEFAULT_MAX_CONNECTIONS: usize = 16;
/// The default [`PgOptions::connect_timeout_ms`].
pub const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 5_000;

impl PgOptions {
    /// Options for `url` with the defaults: schema `ferry` for Ferry's
    /// tables, `public` for the app's, tables not created.
    pub fn new(url: impl Into<String>) -> Self {
        PgOptions {
            url: url.into(),
            ferry_schema: "ferry".to_owned(),
            app_schema: "public".to_owned(),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            connect_timeout_ms: DEFAULT_CONNECT_TIMEOUT_MS,
            create_tables: false,
        }
    }

    /// Ferry's own schema.
    pub fn ferry_schema(mut self, name: impl Into<String>) -> Self {
        self.ferry_schema = name.into();
        self
    }

    /// The app's schema.
    pub fn app_schema(mut self, name: impl Into<String>) -> Self {
        self.app_schema = name.into();
        self
    }

    /// Create missing tables and columns from the rules.
    pub fn create_tables(mut self, yes: bool) -> Self {
        self.create_tables = yes;
        self
    }

    /// Most pooled connections.
    pub fn max_connections(mut self, n: usize) -> Self {
        self.max_connections = n;
        self
    }
}

/// Whether a database URL names PostgreSQL.
pub fn is_postgres_url(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

/// Schema and channel names, quoted once.
#[derive(Debug)]
pub(crate) struct Names {
    /// Ferry's schema, quoted.
    pub ferry: String,
    /// Ferry's schema as given.
    pub ferry_raw: String,
    /// The app's schema as given.
    pub app_raw: String,
    /// The app's schema, quoted.
    pub app: String,
    /// The commit notification channel.
    pub commit_channel: String,
    /// The capture notification channel.
    pub capture_channel: String,
}

/// What the database and its background tasks share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub names: Names,
    pool: deadpool_postgres::Pool,
    layouts: RwLock<BTreeMap<String, Arc<TableLayout>>>,
    commits: Arc<tokio::sync::watch::Sender<u64>>,
    captures: Arc<tokio::sync::watch::Sender<u64>>,
    create_tables: bool,
    /// This process made Ferry's schema when it connected: a start
    /// refused for its rules drops it again ([`setup::drop_if_unused`]).
    made_schema: std::sync::atomic::AtomicBool,
    /// Where the database is, for messages (`host:port/db as user`).
    pub place: String,
}

impl Shared {
    pub(crate) fn layout(&self, table: &str) -> Result<Arc<TableLayout>> {
        self.layouts.read().get(table).cloned().ok_or_else(|| {
            SourceError::Schema(format!(
                "table {table:?} is not one of the synced tables (migrate first)"
            ))
            .into()
        })
    }
}

/// PostgreSQL source database.
#[derive(Debug)]
pub struct PgSourceDb {
    shared: Arc<Shared>,
    /// Declared last: dropped after everything that holds connections.
    bridge: Bridge,
}

fn check_schema_name(what: &str, name: &str) -> SourceResult<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && !name.starts_with("pg_");
    if ok {
        Ok(())
    } else {
        Err(SourceError::Schema(format!(
            "{what} {name:?} is not a usable schema name (lowercase letters, digits and underscores, \
             at most 63, not starting with a digit or pg_)"
        )))
    }
}

/// The app's schema may have any name PostgreSQL takes (it is quoted in
/// every statement; mixed case, spaces): not empty, at most 63 bytes, no
/// NUL.
fn check_app_schema_name(name: &str) -> SourceResult<()> {
    if name.is_empty() || name.len() > 63 || name.contains('\0') {
        return Err(SourceError::Schema(format!(
            "app schema {name:?} is not a usable schema name (1 to 63 bytes, no NUL)"
        )));
    }
    Ok(())
}

fn parse_op(s: &str) -> Result<OpKind> {
    OpKind::from_name(s).ok_or_else(|| corrupt("op log", format!("unknown op {s:?}")))
}

/// The op log rows of `range`: op_id, op, tbl, row_id, data, checksum.
fn scan_ops(db: &Shared, client: &deadpool_postgres::Client, range: &OpRange<'_>) -> Result<Vec<tokio_postgres::Row>> {
    let sql = format!(
        "SELECT op_id, op, tbl, row_id, data, checksum FROM {}.oplog \
         WHERE bucket = $1 AND op_id > $2 AND op_id <= $3 ORDER BY op_id LIMIT $4",
        db.names.ferry
    );
    let after = i64::try_from(range.after_op_id).unwrap_or(i64::MAX);
    let up_to = i64::try_from(range.up_to_op_id).unwrap_or(i64::MAX);
    let limit = i64::try_from(range.max_ops).unwrap_or(i64::MAX);
    query(client, &sql, &[&range.bucket, &after, &up_to, &limit])
}

/// Add a [`scan_ops`] row to `line`, its stored JSON copied; false when
/// it did not fit.
fn push_row(line: &mut DataLineWriter, r: &tokio_postgres::Row) -> Result<bool> {
    let op: String = r.try_get(1)?;
    let table: Option<&str> = r.try_get(2)?;
    let row_id: Option<&str> = r.try_get(3)?;
    let data: Option<&str> = r.try_get(4)?;
    Ok(line.push_raw(
        r.try_get::<_, i64>(0)? as u64,
        parse_op(&op)?,
        table,
        row_id,
        data.map(str::as_bytes),
        r.try_get::<_, i64>(5)? as u32,
    ))
}

/// The typed entries of `range`, cut to its line limit.
pub(crate) fn read_ops_on(
    db: &Shared,
    client: &deadpool_postgres::Client,
    range: &OpRange<'_>,
) -> Result<Vec<OplogEntry>> {
    let rows = scan_ops(db, client, range)?;
    let mut measure = (range.max_line_bytes < usize::MAX)
        .then(|| DataLineWriter::new(range.bucket, 0).with_max_line_bytes(range.max_line_bytes));
    let mut out = Vec::with_capacity(rows.len());
    for r in &rows {
        if let Some(line) = &mut measure {
            if !push_row(line, r)? {
                break;
            }
        }
        let op: String = r.try_get(1)?;
        let data: Option<String> = r.try_get(4)?;
        out.push(OplogEntry {
            op_id: r.try_get::<_, i64>(0)? as u64,
            op: parse_op(&op)?,
            object_type: r.try_get(2)?,
            object_id: r.try_get(3)?,
            data: data
                .map(|d| serde_json::from_str::<RowData>(&d).map_err(|e| corrupt("row data", e)))
                .transpose()?,
            checksum: r.try_get::<_, i64>(5)? as u32,
        });
    }
    Ok(out)
}

impl PgSourceDb {
    /// Connect (checking that the database answers), and create Ferry's
    /// schema if missing. A URL that does not parse or a database that
    /// does not answer is an error naming the host and why.
    pub fn connect(options: &PgOptions) -> SourceResult<Self> {
        check_schema_name("ferry schema", &options.ferry_schema)?;
        check_app_schema_name(&options.app_schema)?;
        let tls::Connect {
            config: pg_config,
            connector,
        } = tls::parse(&options.url)?;
        let place = describe_place(&pg_config);
        let bridge = Bridge::new()?;
        let manager = deadpool_postgres::Manager::from_connect(
            pg_config.clone(),
            connector.clone(),
            deadpool_postgres::ManagerConfig {
                recycling_method: deadpool_postgres::RecyclingMethod::Fast,
            },
        );
        let timeout = Duration::from_millis(options.connect_timeout_ms.max(1));
        let pool = deadpool_postgres::Pool::builder(manager)
            .max_size(options.max_connections.max(1))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(timeout))
            .create_timeout(Some(timeout))
            .build()
            .map_err(|e| SourceError::Unavailable(format!("cannot make a connection pool for {place}: {e}")))?;
        let f = &options.ferry_schema;
        let names = Names {
            ferry: quote_ident(f),
            ferry_raw: f.clone(),
            app: quote_ident(&options.app_schema),
            app_raw: options.app_schema.clone(),
            commit_channel: format!("ferry_commits_{f}"),
            capture_channel: format!("ferry_captures_{f}"),
        };
        let shared = Arc::new(Shared {
            names,
            pool,
            layouts: RwLock::new(BTreeMap::new()),
            commits: Arc::new(tokio::sync::watch::channel(0).0),
            captures: Arc::new(tokio::sync::watch::channel(0).0),
            create_tables: options.create_tables,
            made_schema: std::sync::atomic::AtomicBool::new(false),
            place,
        });
        let db = PgSourceDb { shared, bridge };
        // The first connection tells whether the database is there.
        let client = db.client()?;
        let made = lift(|| setup::install(&client, &db.shared.names)).inspect_err(|_| {
            // The connection may be inside the failed transaction.
            drop(deadpool_postgres::Object::take(client));
        })?;
        db.shared.made_schema.store(made, std::sync::atomic::Ordering::Relaxed);
        listen::start(&db.bridge, pg_config, connector, &db.shared)?;
        Ok(db)
    }

    /// A pooled connection; the error names the database and why.
    fn client(&self) -> SourceResult<deadpool_postgres::Client> {
        let pool = self.shared.pool.clone();
        self.bridge.run(async move { pool.get().await })?.map_err(|e| {
            let why = match &e {
                deadpool_postgres::PoolError::Backend(pg) => match error::classify(pg) {
                    SourceError::Unavailable(m) | SourceError::Database(m) | SourceError::Refused(m) => m,
                    other => other.to_string(),
                },
                other => other.to_string(),
            };
            SourceError::Unavailable(format!("cannot connect to postgresql at {}: {why}", self.shared.place))
        })
    }

    /// Run `f` on a pooled connection outside any transaction.
    fn with_client<T>(&self, f: impl FnOnce(&deadpool_postgres::Client) -> Result<T>) -> SourceResult<T> {
        let client = self.client()?;
        lift(|| f(&client))
    }

    /// One run of a write transaction on `client` (see the crate's docs
    /// on writes): `lost` tells whether it failed because it lost to
    /// another transaction (it can pass when run again).
    fn write_once(
        &self,
        client: &deadpool_postgres::Client,
        work: &mut dyn FnMut(&mut dyn ferry_source::SourceTx) -> SourceResult<()>,
        lost: &mut bool,
    ) -> Result<()> {
        let f = &self.shared.names.ferry;
        // Each of Ferry's statements writing an app table names the table
        // in `ferry.writing`, so the capture trigger skips its rows
        // (`TableLayout::writing_marker`); cleared here (an earlier Ferry
        // set `on`, which skips every row).
        // Sent with the transaction's first flight, not a round trip of
        // their own.
        let mut tx = PgTx::new(&self.shared, client);
        tx.defer("BEGIN".to_owned(), Vec::new());
        tx.defer("SELECT set_config('ferry.writing', '', true)".to_owned(), Vec::new());
        let result = (|| {
            work(&mut tx)?;
            let max_clock = tx.max_clock.take();
            if let Some(first) = tx.locks.counter {
                let next = tx.locks.next_op_id;
                if next > first {
                    tx.defer(
                        format!("UPDATE {f}.counter SET last_op_id = $1 WHERE id = 1"),
                        vec![Box::new((next - 1) as i64)],
                    );
                }
            }
            if let Some(m) = max_clock {
                // Clocks print with fixed-width wall and counter: their
                // text orders as they do (byte order, "C").
                tx.defer(
                    format!(
                        "INSERT INTO {f}.meta(key, value) VALUES ('max_clock', $1) ON CONFLICT (key) DO UPDATE \
                         SET value = GREATEST({f}.meta.value COLLATE \"C\", EXCLUDED.value COLLATE \"C\")"
                    ),
                    vec![Box::new(m.to_string())],
                );
            }
            let channel = self.shared.names.commit_channel.clone();
            // Everything deferred, in one flight with the notification and
            // the commit (a statement failing before it is the error
            // returned, its transaction rolled back).
            tx.send_all(&[("SELECT pg_notify($1, '')", &[&channel]), ("COMMIT", &[])])?;
            Ok(())
        })();
        *lost = tx.lost;
        result
    }

    fn migrate_table(&self, client: &deadpool_postgres::Client, t: &Table) -> Result<TableLayout> {
        let names = &self.shared.names;
        let qualified = format!("{}.{}", names.app, quote_ident(&t.name));
        let mut columns = introspect_columns(client, &names.app_raw, &t.name)?;
        if self.shared.create_tables {
            if columns.is_empty() {
                let cols: Vec<String> = t
                    .columns
                    .iter()
                    .map(|c| format!(", {} {}", quote_ident(&c.name), layout::created_type(c.ty)))
                    .collect();
                wait(client.batch_execute(&format!(
                    "CREATE TABLE IF NOT EXISTS {qualified}(id text PRIMARY KEY NOT NULL{})",
                    cols.concat()
                )))?;
            }
            columns = introspect_columns(client, &names.app_raw, &t.name)?;
            for c in &t.columns {
                if !columns.iter().any(|p| p.name == c.name) {
                    wait(client.batch_execute(&format!(
                        "ALTER TABLE {qualified} ADD COLUMN IF NOT EXISTS {} {}",
                        quote_ident(&c.name),
                        layout::created_type(c.ty)
                    )))?;
                }
            }
            columns = introspect_columns(client, &names.app_raw, &t.name)?;
        }
        if columns.is_empty() {
            if let Some(kind) = relation_kind(client, &names.app_raw, &t.name)? {
                return Err(SourceError::Schema(format!(
                    "{}.{} in {} is a {kind}, not a table: ferry syncs tables (with a primary key) only",
                    names.app_raw, t.name, self.shared.place
                ))
                .into());
            }
            return Err(SourceError::Schema(format!(
                "table {}.{} does not exist in {} (create it, or start with --create-tables to have ferry \
                 create it from the rules)",
                names.app_raw, t.name, self.shared.place
            ))
            .into());
        }
        let pk = introspect_pk(client, &names.app_raw, &t.name)?;
        let rewrites = introspect_rewrites(client, &names.app_raw, &t.name)?;
        let layout = layout::layout(t, &names.app_raw, qualified, &columns, &pk, rewrites)?;
        let pk_raw = pk.first().cloned().unwrap_or_default();
        if !setup::triggers_current(client, &names.ferry_raw, &layout, &pk_raw)? {
            wait(client.batch_execute(&setup::trigger_sql(
                &names.ferry,
                &names.ferry_raw,
                &names.capture_channel,
                &layout,
                &pk_raw,
            )))?;
        }
        // Row triggers reach a partitioned table's partitions; a truncate
        // trigger does not (a partition attached later gets it at the
        // next start).
        for partition in setup::partitions_without_truncate_trigger(client, &names.ferry_raw, &layout)? {
            wait(client.batch_execute(&setup::partition_truncate_sql(
                &names.ferry,
                &names.ferry_raw,
                &layout,
                &pk_raw,
                &partition,
            )))?;
        }
        Ok(layout)
    }
}

fn describe_place(c: &tokio_postgres::Config) -> String {
    let host = c
        .get_hosts()
        .first()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(s) => s.clone(),
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .unwrap_or_else(|| "localhost".to_owned());
    let port = c.get_ports().first().copied().unwrap_or(5432);
    let db = c.get_dbname().unwrap_or("(default database)");
    let user = c.get_user().unwrap_or("(default user)");
    format!("{host}:{port}/{db} as {user}")
}

/// What a relation of the schema that is not a table is (a view, a
/// materialized view, ...), `None` when there is none by that name.
fn relation_kind(client: &deadpool_postgres::Client, schema: &str, name: &str) -> Result<Option<String>> {
    let rows = query(
        client,
        "SELECT CASE c.relkind WHEN 'v' THEN 'view' WHEN 'm' THEN 'materialized view' \
         WHEN 'f' THEN 'foreign table' WHEN 'S' THEN 'sequence' WHEN 'i' THEN 'index' \
         WHEN 'I' THEN 'index' WHEN 'c' THEN 'composite type' ELSE 'relation of kind ' || c.relkind::text END \
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind NOT IN ('r', 'p')",
        &[&schema, &name],
    )?;
    rows.first().map(|r| r.try_get(0)).transpose().map_err(Into::into)
}

fn introspect_columns(client: &deadpool_postgres::Client, schema: &str, table: &str) -> Result<Vec<PgColumn>> {
    let rows = query(
        client,
        "SELECT a.attname::text, t.typname::text, format_type(a.atttypid, a.atttypmod), a.attgenerated <> '' \
         FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid \
         JOIN pg_namespace n ON n.oid = c.relnamespace JOIN pg_type t ON t.oid = a.atttypid \
         WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p') \
         AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
        &[&schema, &table],
    )?;
    rows.iter()
        .map(|r| {
            Ok(PgColumn {
                name: r.try_get(0)?,
                typname: r.try_get(1)?,
                display: r.try_get(2)?,
                generated: r.try_get(3)?,
            })
        })
        .collect()
}

fn introspect_pk(client: &deadpool_postgres::Client, schema: &str, table: &str) -> Result<Vec<String>> {
    let rows = query(
        client,
        "SELECT a.attname::text FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid \
         JOIN pg_namespace n ON n.oid = c.relnamespace \
         JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = ANY(i.indkey) \
         WHERE n.nspname = $1 AND c.relname = $2 AND i.indisprimary ORDER BY a.attnum",
        &[&schema, &table],
    )?;
    rows.iter().map(|r| Ok(r.try_get::<_, String>(0)?)).collect()
}

/// Whether the app's table has a `BEFORE` row trigger on insert or update
/// (it may change the row Ferry writes) or a rewrite rule. Ferry's own
/// capture trigger runs after the row is written.
fn introspect_rewrites(client: &deadpool_postgres::Client, schema: &str, table: &str) -> Result<bool> {
    // tgtype bits: 1 row, 2 before, 4 insert, 16 update.
    let rows = query(
        client,
        "SELECT EXISTS (SELECT 1 FROM pg_trigger tg JOIN pg_class c ON c.oid = tg.tgrelid \
         JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = $1 AND c.relname = $2 AND NOT tg.tgisinternal \
         AND (tg.tgtype & 3) = 3 AND (tg.tgtype & 20) <> 0) \
         OR EXISTS (SELECT 1 FROM pg_rules WHERE schemaname = $1 AND tablename = $2)",
        &[&schema, &table],
    )?;
    let rewrites: Option<bool> = match rows.first() {
        Some(r) => r.try_get(0)?,
        None => None,
    };
    Ok(rewrites.unwrap_or(true))
}

/// A statement on a connection out of the pool.
fn query_raw(
    client: &deadpool_postgres::ClientWrapper,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<Vec<tokio_postgres::Row>> {
    Ok(wait(client.query(sql, params))?)
}

/// A lead held by a session advisory lock.
struct PgLease {
    client: deadpool_postgres::ClientWrapper,
}

impl std::fmt::Debug for PgLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgLease").field("held", &self.is_held()).finish()
    }
}

impl Lease for PgLease {
    fn is_held(&self) -> bool {
        !self.client.is_closed()
    }
}

/// End a transaction that failed: roll back, and drop the connection when
/// even that fails (it may be broken or still inside the transaction).
fn abandon(client: deadpool_postgres::Client) {
    if wait(client.batch_execute("ROLLBACK")).is_err() {
        drop(deadpool_postgres::Object::take(client));
    }
}

impl SourceDb for PgSourceDb {
    fn commits(&self) -> CommitReceiver {
        self.shared.commits.subscribe()
    }

    fn captures(&self) -> CommitReceiver {
        self.shared.captures.subscribe()
    }

    fn try_lead(&self, job: &str) -> SourceResult<Option<Box<dyn Lease>>> {
        // A session advisory lock on a connection of its own (out of the
        // pool): held while the connection lives, released by PostgreSQL
        // when it closes (the server died, the lease was dropped).
        let client = deadpool_postgres::Object::take(self.client()?);
        let key = format!("ferry lead {} {job}", self.shared.names.ferry_raw);
        let rows = lift(|| query_raw(&client, "SELECT pg_try_advisory_lock(hashtext($1))", &[&key]))?;
        let held = rows
            .first()
            .map(|r| r.try_get::<_, bool>(0))
            .transpose()
            .map_err(|e| SourceError::from(error::Error::from(e)))?
            .unwrap_or(false);
        Ok(held.then(|| Box::new(PgLease { client }) as Box<dyn Lease>))
    }

    fn migrate(&self, schema: &Schema) -> SourceResult<()> {
        let client = self.client()?;
        let result = lift(|| {
            setup::retrying(&client, || {
                // The same lock as the setup of Ferry's schema: another
                // instance starting at the same time may be replacing the
                // capture function the triggers name.
                let lock = setup::lock_sql(&self.shared.names.ferry_raw);
                wait(client.batch_execute(&format!("BEGIN; {lock}")))?;
                let mut layouts = BTreeMap::new();
                for t in schema.tables() {
                    if t.local_only {
                        continue;
                    }
                    layouts.insert(t.name.clone(), Arc::new(self.migrate_table(&client, t)?));
                }
                wait(client.batch_execute("COMMIT"))?;
                Ok(layouts)
            })
        });
        match result {
            Ok(layouts) => {
                *self.shared.layouts.write() = layouts;
                self.shared
                    .made_schema
                    .store(false, std::sync::atomic::Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                abandon(client);
                // Refused for its rules (a table or column missing, a
                // type Ferry cannot sync): the schema this start made
                // goes again, so a bad setup leaves nothing behind.
                if matches!(e, SourceError::Schema(_))
                    && self
                        .shared
                        .made_schema
                        .swap(false, std::sync::atomic::Ordering::Relaxed)
                {
                    let dropped = self
                        .client()
                        .and_then(|c| lift(|| setup::drop_if_unused(&c, &self.shared.names)));
                    if let Err(d) = dropped {
                        tracing::warn!("cannot drop ferry's schema after a refused start: {d}");
                    }
                }
                Err(e)
            }
        }
    }

    fn write(&self, work: &mut dyn FnMut(&mut dyn ferry_source::SourceTx) -> SourceResult<()>) -> SourceResult<()> {
        let client = self.client()?;
        let mut attempts = 0;
        loop {
            attempts += 1;
            let mut lost = false;
            let result = lift(|| self.write_once(&client, &mut *work, &mut lost));
            match result {
                Ok(()) => {
                    drop(client);
                    self.shared.commits.send_modify(|n| *n = n.wrapping_add(1));
                    return Ok(());
                }
                Err(e) if lost && attempts < MAX_WRITE_ATTEMPTS => {
                    // Lost a deadlock (or a serialization failure) to
                    // another writer: run again from scratch.
                    if wait(client.batch_execute("ROLLBACK")).is_err() {
                        drop(deadpool_postgres::Object::take(client));
                        return Err(e);
                    }
                    tracing::debug!(
                        attempt = attempts,
                        "ferry write transaction lost to another; again: {e}"
                    );
                }
                Err(e) => {
                    abandon(client);
                    return Err(e);
                }
            }
        }
    }

    fn checkpoint(&self, client_id: &str, buckets: &[String]) -> SourceResult<CheckpointState> {
        self.with_client(|client| {
            let f = &self.shared.names.ferry;
            // One statement: one snapshot. One index probe per bucket (see
            // the module on lookups by many keys).
            let sql = format!(
                "{PLANNED_EACH_TIME}SELECT (SELECT last_op_id FROM {f}.counter WHERE id = 1), \
                 (SELECT last_seq FROM {f}.clients WHERE client_id = $1), b.bucket, b.checksum, b.count \
                 FROM (SELECT 1) AS one LEFT JOIN (SELECT n.bucket, x.checksum, x.count \
                 FROM unnest($2::text[]) AS n(bucket) \
                 JOIN LATERAL (SELECT checksum, count FROM {f}.buckets WHERE bucket = n.bucket OFFSET 0) AS x \
                 ON true) AS b ON true"
            );
            let names: Vec<&str> = buckets.iter().map(String::as_str).collect();
            let rows = query(client, &sql, &[&client_id, &names])?;
            let mut last_op_id = 0u64;
            let mut write_checkpoint = None;
            let mut found: BTreeMap<String, (u32, u64)> = BTreeMap::new();
            for r in &rows {
                last_op_id = r.try_get::<_, Option<i64>>(0)?.unwrap_or(0) as u64;
                write_checkpoint = r.try_get::<_, Option<i64>>(1)?.map(|s| s as u64);
                if let Some(b) = r.try_get::<_, Option<String>>(2)? {
                    let sum = r.try_get::<_, Option<i64>>(3)?.unwrap_or(0) as u32;
                    let count = r.try_get::<_, Option<i64>>(4)?.unwrap_or(0) as u64;
                    found.insert(b, (sum, count));
                }
            }
            Ok(CheckpointState {
                last_op_id,
                buckets: buckets
                    .iter()
                    .map(|b| {
                        let (checksum, count) = found.get(b).copied().unwrap_or((0, 0));
                        BucketChecksum {
                            bucket: b.clone(),
                            checksum,
                            count,
                        }
                    })
                    .collect(),
                write_checkpoint,
            })
        })
    }

    fn changes_since(&self, after_op_id: u64, clients: &[String]) -> SourceResult<ChangesSince> {
        self.with_client(|client| {
            let f = &self.shared.names.ferry;
            // One statement: one snapshot. The first row carries the last
            // op id; bucket rows and client rows follow.
            let sql = format!(
                "{PLANNED_EACH_TIME}SELECT 0 AS kind, NULL::text AS name, \
                 (SELECT last_op_id FROM {f}.counter WHERE id = 1) AS a, \
                 NULL::int8 AS b, NULL::int8 AS c \
                 UNION ALL SELECT 1, bucket, checksum, count, last_op_id FROM {f}.buckets WHERE last_op_id > $1 \
                 UNION ALL SELECT 2, n.id, c.last_seq, NULL, NULL FROM unnest($2::text[]) AS n(id) \
                 JOIN LATERAL (SELECT last_seq FROM {f}.clients WHERE client_id = n.id OFFSET 0) AS c ON true"
            );
            let after = i64::try_from(after_op_id).unwrap_or(i64::MAX);
            let ids: Vec<&str> = clients.iter().map(String::as_str).collect();
            let rows = query(client, &sql, &[&after, &ids])?;
            let mut out = ChangesSince::default();
            for r in &rows {
                let kind: i32 = r.try_get(0)?;
                let name: Option<String> = r.try_get(1)?;
                let a: Option<i64> = r.try_get(2)?;
                match (kind, name) {
                    (0, _) => out.last_op_id = a.unwrap_or(0) as u64,
                    (1, Some(bucket)) => out.buckets.push((
                        bucket,
                        BucketState {
                            checksum: a.unwrap_or(0) as u32,
                            count: r.try_get::<_, Option<i64>>(3)?.unwrap_or(0) as u64,
                            last_op_id: r.try_get::<_, Option<i64>>(4)?.unwrap_or(0) as u64,
                        },
                    )),
                    (2, Some(id)) => out.clients.push((id, a.unwrap_or(0) as u64)),
                    _ => {}
                }
            }
            Ok(out)
        })
    }

    fn read_ops(&self, range: &OpRange<'_>) -> SourceResult<Vec<OplogEntry>> {
        self.with_client(|client| read_ops_on(&self.shared, client, range))
    }

    fn read_ops_into(&self, range: &OpRange<'_>, line: &mut DataLineWriter) -> SourceResult<Option<u64>> {
        self.with_client(|client| {
            line.lower_max_line_bytes(range.max_line_bytes);
            let mut last = None;
            for r in &scan_ops(&self.shared, client, range)? {
                if !push_row(line, r)? {
                    break;
                }
                last = line.last_op_id();
            }
            Ok(last)
        })
    }

    fn bucket_names(&self) -> SourceResult<Vec<String>> {
        self.with_client(|client| {
            let rows = query(
                client,
                &format!("SELECT bucket FROM {}.buckets ORDER BY bucket", self.shared.names.ferry),
                &[],
            )?;
            rows.iter().map(|r| Ok(r.try_get::<_, String>(0)?)).collect()
        })
    }

    fn oplog_len(&self) -> SourceResult<u64> {
        self.with_client(|client| {
            let rows = query(
                client,
                &format!("SELECT count(*) FROM {}.oplog", self.shared.names.ferry),
                &[],
            )?;
            Ok(rows.first().map_or(Ok(0), |r| r.try_get::<_, i64>(0))? as u64)
        })
    }

    fn get_row(&self, table: &Table, id: &str) -> SourceResult<Option<StoredRow>> {
        self.with_client(|client| {
            tx::read_row_on(&self.shared, table, id, false, |sql, params| query(client, sql, params))
        })
    }

    fn client_owner(&self, client_id: &str) -> SourceResult<Option<String>> {
        Ok(self.client_progress(client_id)?.map(|p| p.user_id))
    }

    fn client_progress(&self, client_id: &str) -> SourceResult<Option<ClientProgress>> {
        self.with_client(|client| {
            let rows = query(
                client,
                &tx::client_progress_sql(&self.shared.names.ferry),
                &[&client_id],
            )?;
            tx::client_progress_of(&rows)
        })
    }

    fn client_outcomes(
        &self,
        client_id: &str,
        after_seq: u64,
        limit: usize,
    ) -> SourceResult<Vec<(u64, StoredOutcome)>> {
        self.with_client(|client| {
            let rows = query(
                client,
                &format!(
                    "SELECT seq, outcome, fingerprint FROM {}.outcomes WHERE client_id = $1 AND seq > $2 \
                     ORDER BY seq LIMIT $3",
                    self.shared.names.ferry
                ),
                &[
                    &client_id,
                    &i64::try_from(after_seq).unwrap_or(i64::MAX),
                    &i64::try_from(limit).unwrap_or(i64::MAX),
                ],
            )?;
            rows.iter()
                .map(|r| {
                    let text: String = r.try_get(1)?;
                    let fingerprint: Option<i64> = r.try_get(2)?;
                    Ok((
                        r.try_get::<_, i64>(0)? as u64,
                        StoredOutcome {
                            outcome: serde_json::from_str(&text).map_err(|e| corrupt("outcome", e))?,
                            fingerprint: fingerprint.map(|f| f as u64),
                        },
                    ))
                })
                .collect()
        })
    }

    fn meta(&self, key: &str) -> SourceResult<Option<String>> {
        self.with_client(|client| {
            let rows = query(
                client,
                &format!("SELECT value FROM {}.meta WHERE key = $1", self.shared.names.ferry),
                &[&key],
            )?;
            rows.first().map(|r| Ok(r.try_get::<_, String>(0)?)).transpose()
        })
    }

    fn row_ids(&self, table: &Table, after_id: Option<&str>, limit: usize) -> SourceResult<Vec<String>> {
        self.with_client(|client| {
            let layout = self.shared.layout(&table.name)?;
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            // In the key's own order (an index scan), the cursor cast back
            // to the key's type.
            let (pk, t) = (&layout.pk, &layout.qualified);
            let rows = match (after_id, &layout.pk_kind) {
                (None, _) => query(
                    client,
                    &format!("SELECT {pk}::text AS ferry_row_id FROM {t} ORDER BY {pk} LIMIT $1"),
                    &[&limit],
                )?,
                (Some(id), layout::PkKind::Int) => {
                    let n: i64 = id.parse().map_err(|_| layout.bad_id(id))?;
                    query(
                        client,
                        &format!("SELECT {pk}::text AS ferry_row_id FROM {t} WHERE {pk} > $1::int8 ORDER BY {pk} LIMIT $2"),
                        &[&n, &limit],
                    )?
                }
                (Some(id), layout::PkKind::Text { typname }) => query(
                    client,
                    &format!("SELECT {pk}::text AS ferry_row_id FROM {t} WHERE {pk} > $1::text::{typname} ORDER BY {pk} LIMIT $2"),
                    &[&id, &limit],
                )?,
            };
            rows.iter().map(|r| Ok(r.try_get::<_, String>(0)?)).collect()
        })
    }

    fn max_clock(&self) -> SourceResult<Option<HlcTimestamp>> {
        self.with_client(|client| {
            let rows = query(
                client,
                &format!(
                    "SELECT value FROM {}.meta WHERE key = 'max_clock'",
                    self.shared.names.ferry
                ),
                &[],
            )?;
            rows.first()
                .map(|r| {
                    let s: String = r.try_get(0)?;
                    s.parse::<HlcTimestamp>()
                        .map_err(|e| corrupt("clock high-water mark", e))
                })
                .transpose()
        })
    }
}
