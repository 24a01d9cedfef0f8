//! A write transaction ([`SourceTx`]) on one pooled connection.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use ferry_core::{HlcTimestamp, RowData, Table};
use ferry_protocol::{OplogEntry, Outcome};
use ferry_source::{
    BucketState, CaptureKind, CapturedChange, ClientProgress, NewOp, Result as SourceResult, SourceTx, StoredOutcome,
    StoredRow, VanishedRows,
};
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

use crate::batched::{oplog_inserts, Batched, Mark, OplogRow};
use crate::bridge::wait;
use crate::error::{corrupt, lift, Result};
use crate::layout::{PkParam, TableLayout, APP_ROW, OVERRIDING};
use crate::rows::RowGroup;
use crate::{read_ops_on, Shared};

/// The start of a statement planned for the tables as they are each time
/// it runs (prepared anew, never cached): a lookup by many keys, whose
/// plan a prepared statement would keep from when Ferry's tables were
/// nearly empty (see the crate on lookups by many keys).
pub(crate) const PLANNED_EACH_TIME: &str = "/* ferry: planned each time */ ";

/// `sql` prepared on `client`: once per connection, unless it starts with
/// [`PLANNED_EACH_TIME`].
async fn prepare(
    client: &deadpool_postgres::Client,
    sql: &str,
) -> Result<tokio_postgres::Statement, tokio_postgres::Error> {
    if sql.starts_with(PLANNED_EACH_TIME) {
        client.prepare(sql).await
    } else {
        client.prepare_cached(sql).await
    }
}

/// A statement on `client`, prepared once per connection (unless it is
/// [`PLANNED_EACH_TIME`]).
pub(crate) fn query(client: &deadpool_postgres::Client, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>> {
    wait(async {
        let st = prepare(client, sql).await?;
        client.query(&st, params).await
    })
    .map_err(Into::into)
}

/// A parameter a deferred statement owns.
pub(crate) type Param = Box<dyn ToSql + Sync + Send>;

/// Run statements in order as one pipelined flight: every statement is
/// prepared (the cached ones cost nothing), then all are sent before any
/// answer is awaited. The rows of each, or the first error in order (a
/// statement after a failed one fails too: the transaction is aborted).
fn run_batch(client: &deadpool_postgres::Client, stmts: &[(&str, Vec<&(dyn ToSql + Sync)>)]) -> Result<Vec<Vec<Row>>> {
    wait(async {
        let prepared = futures_util::future::try_join_all(stmts.iter().map(|(sql, _)| prepare(client, sql))).await?;
        let answers = futures_util::future::join_all(
            prepared
                .iter()
                .zip(stmts)
                .map(|(st, (_, params))| client.query(st, params)),
        )
        .await;
        answers.into_iter().collect::<Result<Vec<_>, _>>()
    })
    .map_err(Into::into)
}

/// The savepoint statements (one savepoint at a time).
const SAVEPOINT: &str = "SAVEPOINT ferry_op";
const RELEASE: &str = "RELEASE SAVEPOINT ferry_op";

/// A write transaction. Writes whose answer the service does not need
/// (op log entries, bucket state, outcomes, progress, membership) are
/// deferred and sent in one pipelined flight with the next statement that
/// must answer, or when an op's savepoint is released (so a refused value
/// is still the op's own); bucket states are cached. An op then costs a
/// few round trips instead of one per statement, which matters because
/// Ferry's writes are serial (the op-counter row lock).
pub(crate) struct PgTx<'a> {
    pub(crate) db: &'a Shared,
    pub(crate) client: &'a deadpool_postgres::Client,
    /// Ferry's write locks held (see the crate's docs on writes).
    pub(crate) locks: Locks,
    /// The locks held when the current op's savepoint was made: a
    /// rollback to it lets go of those taken since.
    saved_locks: Option<Locks>,
    /// A statement lost a deadlock or a serialization failure to another
    /// transaction: the transaction can pass when run again.
    pub(crate) lost: bool,
    /// The greatest clock written (row clocks, tombstones).
    pub(crate) max_clock: Option<HlcTimestamp>,
    /// Statements not sent yet, in order.
    pub(crate) pending: Vec<(String, Vec<Param>)>,
    /// Bucket states read or written in this transaction.
    pub(crate) buckets: std::collections::HashMap<String, Option<BucketState>>,
    /// Rows read ahead ([`SourceTx::prefetch_rows`]), by table and id;
    /// an entry goes when the transaction writes the row.
    pub(crate) rows_ahead: HashMap<String, HashMap<String, Option<StoredRow>>>,
    /// Bucket memberships read ahead, by table and id; an entry goes when
    /// the transaction sets the row's membership.
    pub(crate) buckets_ahead: HashMap<String, HashMap<String, BTreeSet<String>>>,
    /// [`SourceTx::defer_op_writes`]: savepoints are not sent, and an op's
    /// writes wait for the next flight.
    pub(crate) defer_ops: bool,
    /// With `defer_ops`: where the current op's writes start, while none
    /// of them was sent.
    pub(crate) op_start: Option<OpStart>,
    /// With `defer_ops`: rows of Ferry's own tables written with one
    /// statement per table at the next flight.
    pub(crate) batched: Batched,
    /// With `defer_ops`: the app's rows written with one statement at the
    /// next flight, or before the next statement queued.
    pub(crate) rows: Option<RowGroup>,
}

/// Where an op's writes start: in `pending`, in the open row group, and in
/// `batched`.
#[derive(Clone, Debug)]
pub(crate) struct OpStart {
    pending: usize,
    group_rows: usize,
    batched: Mark,
}

impl PgTx<'_> {
    pub(crate) fn new<'a>(db: &'a Shared, client: &'a deadpool_postgres::Client) -> PgTx<'a> {
        PgTx {
            db,
            client,
            locks: Locks::default(),
            saved_locks: None,
            lost: false,
            max_clock: None,
            pending: Vec::new(),
            buckets: std::collections::HashMap::new(),
            rows_ahead: HashMap::new(),
            buckets_ahead: HashMap::new(),
            defer_ops: false,
            op_start: None,
            batched: Batched::default(),
            rows: None,
        }
    }

    /// Queue the open row group's statement (two when the current op's
    /// rows are in it with earlier ones: the op's alone can still be
    /// dropped).
    fn close_rows(&mut self) {
        let Some(group) = self.rows.take() else {
            return;
        };
        let split = self.op_start.as_ref().map_or(0, |s| s.group_rows.min(group.len()));
        if split > 0 {
            self.pending.push(group.statement(0, split));
            if let Some(s) = &mut self.op_start {
                // Nothing was queued since the op started (that would have
                // closed the group): its writes start here now.
                s.pending = self.pending.len();
                s.group_rows = 0;
            }
        }
        if split < group.len() {
            self.pending.push(group.statement(split, group.len()));
        }
    }

    /// Add the app's row to the open row group (closing it first when it
    /// is another table's, holds the id or is full); `false` when the row
    /// must be written on its own.
    fn group_row(&mut self, layout: &Arc<TableLayout>, id: &str, pk: &PkParam, data: &RowData) -> bool {
        if self
            .rows
            .as_ref()
            .is_some_and(|g| g.table() != layout.name || !g.has_room_for(id))
        {
            self.close_rows();
        }
        self.rows
            .get_or_insert_with(|| RowGroup::new(layout.clone()))
            .push(id, pk, data)
    }

    /// Where the current op's writes start.
    fn op_mark(&self) -> OpStart {
        OpStart {
            pending: self.pending.len(),
            group_rows: self.rows.as_ref().map_or(0, RowGroup::len),
            batched: self.batched.mark(),
        }
    }

    /// Turn the rows gathered for Ferry's own tables into statements after
    /// everything deferred.
    fn seal(&mut self) {
        if !self.batched.is_empty() {
            let statements = self.batched.take_statements(&self.db.names.ferry);
            self.pending.extend(statements);
        }
    }

    /// Forget what was read ahead of one row (the transaction writes it).
    fn forget_row(&mut self, table: &str, id: &str) {
        if let Some(rows) = self.rows_ahead.get_mut(table) {
            rows.remove(id);
        }
    }

    /// Forget everything read ahead (a rollback undid writes).
    fn forget_ahead(&mut self) {
        self.rows_ahead.clear();
        self.buckets_ahead.clear();
    }

    /// A key of Ferry's advisory locks: `kind` and `parts`, in Ferry's
    /// schema (two Ferry schemas on one database lock apart).
    fn lock_key(&self, kind: &str, parts: &[&str]) -> i64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for part in [self.db.names.ferry_raw.as_str(), kind].iter().chain(parts) {
            for b in part.bytes().chain([0]) {
                h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
            }
        }
        h as i64
    }

    /// Hold the writers' lock in `mode` (queued, sent with the next
    /// flight). From shared to exclusive it waits for every other writer
    /// to end (two such waits are a deadlock: one transaction loses and
    /// runs again).
    fn hold_writers(&mut self, mode: LockMode) {
        if self.locks.writers == Some(LockMode::Exclusive) || self.locks.writers == Some(mode) {
            return;
        }
        let sql = match mode {
            LockMode::Shared => "SELECT pg_advisory_xact_lock_shared($1)",
            LockMode::Exclusive => "SELECT pg_advisory_xact_lock($1)",
        };
        let key = self.lock_key("writers", &[]);
        self.queue_lock(sql, Box::new(key));
        self.locks.writers = Some(mode);
    }

    /// Lock these keys (rows, clients) for the rest of the transaction,
    /// with the writers' lock shared (queued, sent with the next flight,
    /// before what reads or writes them). Over [`MAX_KEY_LOCKS`] keys, the
    /// writers' lock is taken exclusive instead.
    fn lock_keys(&mut self, keys: Vec<i64>) {
        if self.locks.writers == Some(LockMode::Exclusive) {
            return;
        }
        let mut new: Vec<i64> = keys.into_iter().filter(|k| !self.locks.keys.contains(k)).collect();
        if new.is_empty() {
            return;
        }
        new.sort_unstable();
        new.dedup();
        if self.locks.keys.len() + new.len() > MAX_KEY_LOCKS {
            self.hold_writers(LockMode::Exclusive);
            return;
        }
        self.hold_writers(LockMode::Shared);
        self.locks.keys.extend(new.iter().copied());
        // In the keys' order: two transactions locking sets of keys with
        // one statement each never wait for each other in a cycle.
        self.queue_lock(
            "SELECT count(pg_advisory_xact_lock(k)) FROM unnest($1::int8[]) AS u(k)",
            Box::new(new),
        );
    }

    /// Queue a lock statement. Rows gathered for one statement stay
    /// gathered (its statement and those of Ferry's own tables follow
    /// what is queued): the lock goes before them, which is earlier than
    /// needed, never later.
    fn queue_lock(&mut self, sql: &str, param: Param) {
        self.pending.push((sql.to_owned(), vec![param]));
    }

    /// Lock a row of a synced table (its id in `table`).
    pub(crate) fn lock_row(&mut self, table: &str, id: &str) {
        let key = self.lock_key("row", &[table, id]);
        self.lock_keys(vec![key]);
    }

    /// Lock a client's progress and outcomes.
    fn lock_client(&mut self, client_id: &str) {
        let key = self.lock_key("client", &[client_id]);
        self.lock_keys(vec![key]);
    }

    /// Hold the op-id counter's row (a flight, with everything queued),
    /// until the transaction ends: op ids, the op log, bucket states and
    /// Ferry's settings are written by one transaction at a time, and op
    /// ids become visible in commit order.
    pub(crate) fn lock_counter(&mut self) -> Result<()> {
        if self.locks.counter.is_some() {
            return Ok(());
        }
        self.hold_writers(LockMode::Shared);
        let f = &self.db.names.ferry;
        let counter_sql = format!("SELECT last_op_id FROM {f}.counter WHERE id = 1 FOR UPDATE");
        // The states of the buckets this transaction placed rows in (its
        // ops are likely to advance them), read under the lock in the
        // same flight instead of one round trip each while holding it.
        let mut likely: Vec<String> = self
            .batched
            .memberships
            .iter()
            .flat_map(|(_, _, buckets, _)| buckets.iter())
            .filter(|b| !self.buckets.contains_key(*b))
            .cloned()
            .collect();
        likely.sort_unstable();
        likely.dedup();
        likely.truncate(MAX_BUCKETS_READ_WITH_COUNTER);
        let bucket_sql = bucket_state_sql(f);
        let params: Vec<[&(dyn ToSql + Sync); 1]> = likely.iter().map(|b| [b as &(dyn ToSql + Sync)]).collect();
        let mut queries: Vec<(&str, &[&(dyn ToSql + Sync)])> = vec![(counter_sql.as_str(), &[])];
        queries.extend(params.iter().map(|p| (bucket_sql.as_str(), &p[..])));
        let mut answers = self.send_all(&queries)?.into_iter();
        let rows = answers.next().unwrap_or_default();
        let last: i64 = rows
            .first()
            .ok_or_else(|| corrupt("op counter", "missing"))?
            .try_get(0)?;
        for (bucket, rows) in likely.into_iter().zip(answers) {
            let state = rows.first().map(bucket_state_of).transpose()?;
            self.buckets.insert(bucket, state);
        }
        let first = last as u64 + 1;
        self.locks.counter = Some(first);
        self.locks.next_op_id = first;
        Ok(())
    }

    /// Hold every lock: the writers' lock exclusive (no other write
    /// transaction runs), and the op-id counter.
    fn lock_all(&mut self) -> Result<()> {
        self.hold_writers(LockMode::Exclusive);
        self.lock_counter()
    }

    /// Queue a statement whose answer is not needed (after the open row
    /// group's).
    pub(crate) fn defer(&mut self, sql: String, params: Vec<Param>) {
        self.close_rows();
        self.pending.push((sql, params));
    }

    /// Run `sql` after everything deferred, in one flight; its rows.
    pub(crate) fn q(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>> {
        Ok(self.send(Some((sql, params)))?.unwrap_or_default())
    }

    /// Send everything deferred.
    pub(crate) fn flush(&mut self) -> Result<()> {
        if !self.pending.is_empty() || !self.batched.is_empty() || self.rows.is_some() {
            self.send(None)?;
        }
        Ok(())
    }

    /// Send everything deferred, then `last` if given, in one flight; the
    /// rows of `last`.
    fn send(&mut self, last: Option<(&str, &[&(dyn ToSql + Sync)])>) -> Result<Option<Vec<Row>>> {
        let mut answers = self.send_all(last.as_slice())?;
        Ok(last.and_then(|_| answers.pop()))
    }

    /// Send everything deferred, then each of `queries`, in one flight;
    /// the rows of each query.
    pub(crate) fn send_all(&mut self, queries: &[(&str, &[&(dyn ToSql + Sync)])]) -> Result<Vec<Vec<Row>>> {
        // The current op's writes, if any, go now: past rolling back by
        // dropping. An op that wrote nothing yet starts again after them.
        let op_unsent = self.op_start.as_ref().is_some_and(|s| {
            self.pending.len() == s.pending
                && self.rows.as_ref().map_or(0, RowGroup::len) == s.group_rows
                && !self.batched.grew_since(&s.batched)
        });
        self.close_rows();
        self.seal();
        let pending = std::mem::take(&mut self.pending);
        self.op_start = op_unsent.then(|| self.op_mark());
        let sent = pending.len();
        let mut stmts: Vec<(&str, Vec<&(dyn ToSql + Sync)>)> = pending
            .iter()
            .map(|(s, p)| {
                (
                    s.as_str(),
                    p.iter().map(|b| b.as_ref() as &(dyn ToSql + Sync)).collect(),
                )
            })
            .collect();
        for (sql, params) in queries {
            stmts.push((sql, params.to_vec()));
        }
        let mut answers = run_batch(self.client, &stmts).inspect_err(|e| {
            if lost_to_others(e) {
                self.lost = true;
            }
        })?;
        Ok(answers.split_off(sent))
    }
}

/// Most bucket states read with the op-id counter's lock.
const MAX_BUCKETS_READ_WITH_COUNTER: usize = 16;

/// The statement reading one bucket's state. `f` is Ferry's quoted schema.
fn bucket_state_sql(f: &str) -> String {
    format!("SELECT checksum, count, last_op_id FROM {f}.buckets WHERE bucket = $1")
}

/// A bucket's state from a row of [`bucket_state_sql`].
fn bucket_state_of(r: &Row) -> Result<BucketState> {
    Ok(BucketState {
        checksum: r.try_get::<_, i64>(0)? as u32,
        count: r.try_get::<_, i64>(1)? as u64,
        last_op_id: r.try_get::<_, i64>(2)? as u64,
    })
}

/// Most keys (rows, clients) one write transaction locks one by one;
/// past them it runs alone instead (the writers' lock exclusive), so the
/// server's lock table stays within bounds whatever a transaction holds.
pub(crate) const MAX_KEY_LOCKS: usize = 128;

/// How a write transaction holds the writers' lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LockMode {
    /// With other writers, each locking the keys it reads and writes.
    Shared,
    /// Alone.
    Exclusive,
}

/// Ferry's write locks a transaction holds (see the crate's docs on
/// writes).
#[derive(Clone, Debug, Default)]
pub(crate) struct Locks {
    /// The writers' lock.
    pub(crate) writers: Option<LockMode>,
    /// The keys locked (while the writers' lock is shared).
    keys: HashSet<i64>,
    /// The first op id handed out, once the counter's row is held.
    pub(crate) counter: Option<u64>,
    /// The next op id to hand out (with the counter held).
    pub(crate) next_op_id: u64,
}

/// A deadlock or a serialization failure: the transaction can pass when
/// run again.
pub(crate) fn lost_to_others(e: &crate::error::Error) -> bool {
    use tokio_postgres::error::SqlState;
    match e {
        crate::error::Error::Pg(pg) => pg
            .code()
            .is_some_and(|c| *c == SqlState::T_R_DEADLOCK_DETECTED || *c == SqlState::T_R_SERIALIZATION_FAILURE),
        crate::error::Error::Source(_) => false,
    }
}

fn raise(max: &mut Option<HlcTimestamp>, c: &HlcTimestamp) {
    if max.as_ref().is_none_or(|m| c > m) {
        *max = Some(c.clone());
    }
}

/// The statement reading a client's progress (`$1`: the client id).
pub(crate) fn client_progress_sql(ferry_schema: &str) -> String {
    format!("SELECT user_id, last_seq FROM {ferry_schema}.clients WHERE client_id = $1")
}

/// A client's progress from the rows of [`client_progress_sql`].
pub(crate) fn client_progress_of(rows: &[Row]) -> Result<Option<ClientProgress>> {
    rows.first()
        .map(|r| {
            Ok(ClientProgress {
                user_id: r.try_get(0)?,
                last_seq: r.try_get::<_, i64>(1)? as u64,
            })
        })
        .transpose()
}

/// What a write transaction's reads of the app's rows add: the row is
/// locked until the transaction ends, and read as the app's transaction
/// that held it committed it. Ferry writes back every column of a row it
/// read (the op's columns merged into the rest), so a column the app's
/// SQL changed between that read and the write would be overwritten with
/// the value read before; the lock makes the app's change come first and
/// be read, or wait for Ferry's. `NO KEY`: Ferry's upserts change no key,
/// so the app's inserts of rows referencing it are not held up.
pub(crate) const LOCK_READ: &str = " FOR NO KEY UPDATE";

/// Read a row with its clocks and tombstone in one statement; `lock`
/// (in a write transaction): with [`LOCK_READ`].
pub(crate) fn read_row_on(
    db: &Shared,
    table: &Table,
    id: &str,
    lock: bool,
    run: impl FnOnce(&str, &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>>,
) -> Result<Option<StoredRow>> {
    let layout = db.layout(&table.name)?;
    let f = &db.names.ferry;
    let pk = layout.pk_param(id);
    let int_param: Option<i64> = match pk {
        Some(PkParam::Int(n)) => Some(n),
        _ => None,
    };
    let row_part = if pk.is_some() {
        let list = layout.select_list();
        let sep = if list.is_empty() { "" } else { ", " };
        format!(
            "LEFT JOIN (SELECT true AS ferry_present{sep}{list} FROM {} WHERE {} = {}{}) AS r ON true",
            layout.qualified,
            layout.pk,
            layout.pk_expr(2, 3),
            if lock { LOCK_READ } else { "" }
        )
    } else {
        // No row of this table can have the id: only Ferry's own state.
        "LEFT JOIN (SELECT NULL::bool AS ferry_present) AS r ON true".to_owned()
    };
    let sql = format!(
        "SELECT c.clocks, tb.hlc, r.* FROM (SELECT 1) AS one {row_part} \
         LEFT JOIN {f}.clocks c ON c.tbl = $1 AND c.id = $2 \
         LEFT JOIN {f}.tombstones tb ON tb.tbl = $1 AND tb.id = $2"
    );
    let name = table.name.as_str();
    let mut params: Vec<&(dyn ToSql + Sync)> = vec![&name, &id];
    if let Some(n) = &int_param {
        params.push(n);
    }
    let rows = run(&sql, &params)?;
    match rows.first() {
        Some(r) => stored_row_at(r, &layout, 0),
        None => Ok(None),
    }
}

/// A row read with its clocks and tombstone: the clocks' column at
/// `base`, then the tombstone's, whether the app's row is there, and its
/// columns in the layout's order.
fn stored_row_at(r: &Row, layout: &TableLayout, base: usize) -> Result<Option<StoredRow>> {
    let clocks: Option<String> = r.try_get(base)?;
    let deleted: Option<String> = r.try_get(base + 1)?;
    let present: Option<bool> = r.try_get(base + 2)?;
    let data = if present == Some(true) {
        let mut d = RowData::new();
        for (i, c) in layout.cols.iter().enumerate() {
            d.insert(c.name.clone(), c.read(r, base + 3 + i)?);
        }
        Some(d)
    } else {
        None
    };
    let clocks: BTreeMap<String, HlcTimestamp> = match clocks {
        Some(s) => serde_json::from_str(&s).map_err(|e| corrupt("clocks", e))?,
        None => BTreeMap::new(),
    };
    let deleted = match deleted {
        Some(s) => Some(s.parse::<HlcTimestamp>().map_err(|e| corrupt("tombstone", e))?),
        None => None,
    };
    if data.is_none() && deleted.is_none() {
        return Ok(None);
    }
    Ok(Some(StoredRow { data, clocks, deleted }))
}

/// Most ids read ahead by one statement ([`SourceTx::prefetch_rows`]).
pub(crate) const MAX_PREFETCH_IDS_PER_QUERY: usize = 1_000;

/// [`SourceTx::prefetch_rows`]: the rows with their clocks and tombstones,
/// and their bucket memberships, of ids not read ahead yet, two
/// statements per [`MAX_PREFETCH_IDS_PER_QUERY`] ids in one flight (with
/// everything deferred before them). Ids no row of the table can have are
/// left to `read_row`.
fn prefetch_rows_on(tx: &mut PgTx<'_>, table: &Table, ids: &[&str]) -> Result<()> {
    let layout = tx.db.layout(&table.name)?;
    let known = tx.rows_ahead.get(&table.name);
    let mut wanted: Vec<&str> = ids
        .iter()
        .copied()
        .filter(|id| layout.pk_param(id).is_some() && known.is_none_or(|k| !k.contains_key(*id)))
        .collect();
    wanted.sort_unstable();
    wanted.dedup();
    if wanted.is_empty() {
        return Ok(());
    }
    let keys = wanted
        .iter()
        .map(|id| tx.lock_key("row", &[table.name.as_str(), id]))
        .collect();
    tx.lock_keys(keys);
    let f = &tx.db.names.ferry;
    let list = layout.select_list();
    let sep = if list.is_empty() { "" } else { ", " };
    // Ids pass `pk_param`: each casts to the key's type.
    let rows_sql = format!(
        "{PLANNED_EACH_TIME}SELECT i.id, c.clocks, tb.hlc, r.* FROM unnest($2::text[]) AS i(id) \
         LEFT JOIN LATERAL (SELECT true AS ferry_present{sep}{list} FROM {t} AS {APP_ROW} WHERE {pk} = {key} OFFSET 0{LOCK_READ}) AS r \
         ON true \
         LEFT JOIN LATERAL (SELECT clocks FROM {f}.clocks WHERE tbl = $1 AND id = i.id OFFSET 0) AS c ON true \
         LEFT JOIN LATERAL (SELECT hlc FROM {f}.tombstones WHERE tbl = $1 AND id = i.id OFFSET 0) AS tb ON true",
        t = layout.qualified,
        pk = layout.pk,
        key = layout.pk_from_text("i.id"),
    );
    // One index probe per id (see the crate on lookups by many keys).
    let buckets_sql = format!(
        "{PLANNED_EACH_TIME}SELECT i.id, rb.bucket FROM unnest($2::text[]) AS i(id) \
         JOIN LATERAL (SELECT bucket FROM {f}.row_buckets WHERE tbl = $1 AND id = i.id OFFSET 0) AS rb ON true"
    );
    let name = table.name.as_str();
    for chunk in wanted.chunks(MAX_PREFETCH_IDS_PER_QUERY) {
        let params: [&(dyn ToSql + Sync); 2] = [&name, &chunk];
        let mut answers = tx.send_all(&[(&rows_sql, &params), (&buckets_sql, &params)])?;
        let (Some(memberships), Some(rows)) = (answers.pop(), answers.pop()) else {
            return Err(corrupt("prefetched rows", "an answer is missing"));
        };
        let mut found: HashMap<String, Option<StoredRow>> = HashMap::with_capacity(chunk.len());
        for r in &rows {
            let id: String = r.try_get(0)?;
            let stored = stored_row_at(r, &layout, 1)?;
            found.insert(id, stored);
        }
        let mut buckets: HashMap<String, BTreeSet<String>> =
            chunk.iter().map(|id| ((*id).to_owned(), BTreeSet::new())).collect();
        for r in &memberships {
            let id: String = r.try_get(0)?;
            let bucket: String = r.try_get(1)?;
            buckets.entry(id).or_default().insert(bucket);
        }
        tx.rows_ahead.entry(table.name.clone()).or_default().extend(found);
        tx.buckets_ahead.entry(table.name.clone()).or_default().extend(buckets);
    }
    Ok(())
}

fn write_row_on(
    tx: &mut PgTx<'_>,
    layout: &Arc<TableLayout>,
    id: &str,
    data: &RowData,
    clocks: &BTreeMap<String, HlcTimestamp>,
    tombstone: bool,
) -> Result<Option<RowData>> {
    let f = &tx.db.names.ferry;
    let int_param: Option<i64> = match layout.pk_param(id) {
        Some(PkParam::Int(n)) => Some(n),
        Some(PkParam::Text) => None,
        None => return Err(layout.bad_id(id).into()),
    };
    let clocks_text = serde_json::to_string(clocks).map_err(|e| corrupt("clocks", e))?;
    let name = layout.name.as_str();
    for c in clocks.values() {
        raise(&mut tx.max_clock, c);
    }
    if tx.defer_ops
        && layout.keeps_rows
        && layout
            .cols
            .iter()
            .all(|c| c.keeps_exactly(data.get(&c.name).unwrap_or(&ferry_core::Value::Null)))
    {
        // PostgreSQL keeps the row as written: nothing to read back, so
        // the write waits for the next flight with the others, in one
        // statement with the table's rows around it (its clocks with
        // Ferry's tables). A row the group does not take is written now,
        // after everything queued.
        let pk = match int_param {
            Some(n) => PkParam::Int(n),
            None => PkParam::Text,
        };
        if tx.group_row(layout, id, &pk, data) {
            tx.batched
                .clocks
                .push((name.to_owned(), id.to_owned(), clocks_text, tombstone));
            return Ok(None);
        }
    }
    let mut boxed: Vec<Box<dyn ToSql + Sync + Send>> = Vec::with_capacity(layout.cols.len());
    for c in &layout.cols {
        boxed.push(c.param(name, data.get(&c.name).unwrap_or(&ferry_core::Value::Null))?);
    }
    let mut params: Vec<&(dyn ToSql + Sync)> = vec![&name, &id, &clocks_text];
    if let Some(n) = &int_param {
        params.push(n);
    }
    let mut cols = vec![layout.pk.clone()];
    let mut values = vec![layout.pk_expr(2, 4)];
    for (c, p) in layout.cols.iter().zip(&boxed) {
        params.push(p.as_ref());
        cols.push(c.quoted.clone());
        values.push(c.param_expr(params.len()));
    }
    let update = if layout.cols.is_empty() {
        "NOTHING".to_owned()
    } else {
        format!(
            "UPDATE SET {}",
            layout
                .cols
                .iter()
                .map(|c| format!("{0} = EXCLUDED.{0}", c.quoted))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    // The row comes back as PostgreSQL keeps it (numeric scale, jsonb
    // spacing, time zones): the ops carry what a later read returns.
    let list = layout.select_list();
    let returning = if list.is_empty() { "1".to_owned() } else { list };
    let sql = format!(
        "WITH a AS (INSERT INTO {t} AS {APP_ROW}({cols}) {OVERRIDING} SELECT {values} FROM {marker} ON CONFLICT ({pk}) DO {update} RETURNING {returning}), \
         c AS (INSERT INTO {f}.clocks(tbl, id, clocks) VALUES ($1, $2, $3) \
               ON CONFLICT (tbl, id) DO UPDATE SET clocks = EXCLUDED.clocks RETURNING 1), \
         d AS (DELETE FROM {f}.tombstones WHERE tbl = $1 AND id = $2 RETURNING 1) \
         SELECT (SELECT count(*) FROM c) + (SELECT count(*) FROM d), a.* FROM (SELECT 1) AS one LEFT JOIN a ON true",
        t = layout.qualified,
        cols = cols.join(", "),
        values = values.join(", "),
        pk = layout.pk,
        marker = layout.writing_marker(None),
    );
    let rows = tx.q(&sql, &params)?;
    let Some(r) = rows.first() else {
        return Ok(None);
    };
    if layout.cols.is_empty() {
        return Ok(None);
    }
    let mut stored = RowData::new();
    for (i, c) in layout.cols.iter().enumerate() {
        stored.insert(c.name.clone(), c.read(r, 1 + i)?);
    }
    Ok((&stored != data).then_some(stored))
}

fn delete_row_on(tx: &mut PgTx<'_>, layout: &TableLayout, id: &str, hlc: &HlcTimestamp) -> Result<()> {
    let f = &tx.db.names.ferry;
    let pk = layout.pk_param(id);
    let int_param: Option<i64> = match pk {
        Some(PkParam::Int(n)) => Some(n),
        _ => None,
    };
    let app = if pk.is_some() {
        format!(
            "a AS (DELETE FROM {} USING {} WHERE {} = {} RETURNING 1), ",
            layout.qualified,
            layout.writing_marker(Some(2)),
            layout.pk,
            layout.pk_expr(2, 4)
        )
    } else {
        "a AS (SELECT 1 WHERE false), ".to_owned()
    };
    let sql = format!(
        "WITH {app}c AS (DELETE FROM {f}.clocks WHERE tbl = $1 AND id = $2 RETURNING 1), \
         t AS (INSERT INTO {f}.tombstones(tbl, id, hlc) VALUES ($1, $2, $3) \
               ON CONFLICT (tbl, id) DO UPDATE SET hlc = EXCLUDED.hlc RETURNING 1) \
         SELECT (SELECT count(*) FROM a) + (SELECT count(*) FROM c) + (SELECT count(*) FROM t)"
    );
    let name = layout.name.as_str();
    let hlc_text = hlc.to_string();
    let mut params: Vec<&(dyn ToSql + Sync)> = vec![&name, &id, &hlc_text];
    if let Some(n) = &int_param {
        params.push(n);
    }
    tx.q(&sql, &params)?;
    raise(&mut tx.max_clock, hlc);
    Ok(())
}

impl SourceTx for PgTx<'_> {
    fn client(&mut self, client_id: &str) -> SourceResult<Option<ClientProgress>> {
        self.lock_client(client_id);
        lift(|| {
            let rows = self.q(&client_progress_sql(&self.db.names.ferry), &[&client_id])?;
            client_progress_of(&rows)
        })
    }

    fn set_client(&mut self, client_id: &str, user_id: &str, last_seq: u64) -> SourceResult<()> {
        self.lock_client(client_id);
        let sql = format!(
            "INSERT INTO {}.clients(client_id, user_id, last_seq) VALUES ($1, $2, $3) \
             ON CONFLICT (client_id) DO UPDATE SET last_seq = EXCLUDED.last_seq",
            self.db.names.ferry
        );
        self.defer(
            sql,
            vec![
                Box::new(client_id.to_owned()),
                Box::new(user_id.to_owned()),
                Box::new(last_seq as i64),
            ],
        );
        Ok(())
    }

    fn outcome(&mut self, client_id: &str, seq: u64) -> SourceResult<Option<StoredOutcome>> {
        self.lock_client(client_id);
        lift(|| {
            let sql = format!(
                "SELECT outcome, fingerprint FROM {}.outcomes WHERE client_id = $1 AND seq = $2",
                self.db.names.ferry
            );
            let rows = self.q(&sql, &[&client_id, &(seq as i64)])?;
            rows.first()
                .map(|r| {
                    let text: String = r.try_get(0)?;
                    let fingerprint: Option<i64> = r.try_get(1)?;
                    Ok(StoredOutcome {
                        outcome: serde_json::from_str(&text).map_err(|e| corrupt("outcome", e))?,
                        // Stored as the i64 with the same bits.
                        fingerprint: fingerprint.map(|f| f as u64),
                    })
                })
                .transpose()
        })
    }

    fn record_outcome(&mut self, client_id: &str, seq: u64, fingerprint: u64, outcome: &Outcome) -> SourceResult<()> {
        self.lock_client(client_id);
        lift(|| {
            let text = serde_json::to_string(outcome).map_err(|e| corrupt("outcome", e))?;
            if self.defer_ops {
                self.batched
                    .outcomes
                    .push((client_id.to_owned(), seq as i64, text, fingerprint as i64));
                return Ok(());
            }
            let sql = format!(
                "INSERT INTO {}.outcomes(client_id, seq, outcome, fingerprint) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (client_id, seq) DO UPDATE SET outcome = EXCLUDED.outcome, fingerprint = EXCLUDED.fingerprint",
                self.db.names.ferry
            );
            self.defer(
                sql,
                vec![
                    Box::new(client_id.to_owned()),
                    Box::new(seq as i64),
                    Box::new(text),
                    // Stored as the i64 with the same bits.
                    Box::new(fingerprint as i64),
                ],
            );
            Ok(())
        })
    }

    fn prune_outcomes(&mut self, client_id: &str, below_seq: u64) -> SourceResult<u64> {
        self.lock_client(client_id);
        lift(|| {
            let sql = format!(
                "WITH d AS (DELETE FROM {}.outcomes WHERE client_id = $1 AND seq < $2 RETURNING 1) \
                 SELECT count(*) FROM d",
                self.db.names.ferry
            );
            let rows = self.q(&sql, &[&client_id, &i64::try_from(below_seq).unwrap_or(i64::MAX)])?;
            Ok(rows.first().map_or(Ok(0), |r| r.try_get::<_, i64>(0))? as u64)
        })
    }

    fn read_row(&mut self, table: &Table, id: &str) -> SourceResult<Option<StoredRow>> {
        if let Some(ahead) = self.rows_ahead.get(&table.name).and_then(|rows| rows.get(id)) {
            return Ok(ahead.clone());
        }
        self.lock_row(&table.name, id);
        let db = self.db;
        lift(|| read_row_on(db, table, id, true, |sql, params| self.q(sql, params)))
    }

    fn write_row(
        &mut self,
        table: &Table,
        id: &str,
        data: &RowData,
        clocks: &BTreeMap<String, HlcTimestamp>,
    ) -> SourceResult<Option<RowData>> {
        // A row read ahead without a tombstone has none to clear.
        let tombstone = self
            .rows_ahead
            .get(&table.name)
            .and_then(|rows| rows.get(id))
            .is_none_or(|ahead| ahead.as_ref().is_some_and(|r| r.deleted.is_some()));
        self.forget_row(&table.name, id);
        self.lock_row(&table.name, id);
        lift(|| {
            let layout = self.db.layout(&table.name)?;
            write_row_on(self, &layout, id, data, clocks, tombstone)
        })
    }

    fn set_clocks(&mut self, table: &str, id: &str, clocks: &BTreeMap<String, HlcTimestamp>) -> SourceResult<()> {
        self.forget_row(table, id);
        self.lock_row(table, id);
        lift(|| {
            let text = serde_json::to_string(clocks).map_err(|e| corrupt("clocks", e))?;
            for c in clocks.values() {
                raise(&mut self.max_clock, c);
            }
            if self.defer_ops {
                self.batched.clocks.push((table.to_owned(), id.to_owned(), text, true));
                return Ok(());
            }
            let f = &self.db.names.ferry;
            let sql = format!(
                "WITH c AS (INSERT INTO {f}.clocks(tbl, id, clocks) VALUES ($1, $2, $3) \
                 ON CONFLICT (tbl, id) DO UPDATE SET clocks = EXCLUDED.clocks RETURNING 1) \
                 DELETE FROM {f}.tombstones WHERE tbl = $1 AND id = $2"
            );
            self.defer(
                sql,
                vec![Box::new(table.to_owned()), Box::new(id.to_owned()), Box::new(text)],
            );
            Ok(())
        })
    }

    fn delete_row(&mut self, table: &Table, id: &str, hlc: &HlcTimestamp) -> SourceResult<()> {
        self.forget_row(&table.name, id);
        self.lock_row(&table.name, id);
        lift(|| {
            let layout = self.db.layout(&table.name)?;
            delete_row_on(self, &layout, id, hlc)
        })
    }

    fn row_buckets(&mut self, table: &str, id: &str) -> SourceResult<BTreeSet<String>> {
        if let Some(ahead) = self.buckets_ahead.get(table).and_then(|rows| rows.get(id)) {
            return Ok(ahead.clone());
        }
        self.lock_row(table, id);
        lift(|| {
            let sql = format!(
                "SELECT bucket FROM {}.row_buckets WHERE tbl = $1 AND id = $2",
                self.db.names.ferry
            );
            let rows = self.q(&sql, &[&table, &id])?;
            rows.iter().map(|r| Ok(r.try_get::<_, String>(0)?)).collect()
        })
    }

    fn set_row_buckets(&mut self, table: &str, id: &str, buckets: &BTreeSet<String>) -> SourceResult<()> {
        self.lock_row(table, id);
        let before = self.buckets_ahead.get_mut(table).and_then(|rows| rows.remove(id));
        let list: Vec<String> = buckets.iter().cloned().collect();
        if self.defer_ops {
            // Read ahead: every bucket the row was in is known.
            let adds_only = before.is_some_and(|b| b.is_subset(buckets));
            self.batched
                .memberships
                .push((table.to_owned(), id.to_owned(), list, adds_only));
            return Ok(());
        }
        let f = &self.db.names.ferry;
        let sql = format!(
            "WITH d AS (DELETE FROM {f}.row_buckets WHERE tbl = $1 AND id = $2 AND NOT (bucket = ANY($3::text[]))) \
             INSERT INTO {f}.row_buckets(tbl, id, bucket) SELECT $1, $2, b FROM unnest($3::text[]) AS b \
             ON CONFLICT DO NOTHING"
        );
        self.defer(
            sql,
            vec![Box::new(table.to_owned()), Box::new(id.to_owned()), Box::new(list)],
        );
        Ok(())
    }

    fn next_op_id(&mut self) -> SourceResult<u64> {
        lift(|| self.lock_counter())?;
        let id = self.locks.next_op_id;
        self.locks.next_op_id += 1;
        Ok(id)
    }

    fn append_op(&mut self, op: NewOp<'_>) -> SourceResult<()> {
        lift(|| {
            self.lock_counter()?;
            let data = match (op.data_json, op.data) {
                (Some(json), _) => Some(json.to_owned()),
                (None, d) => d
                    .map(|d| serde_json::to_string(d).map_err(|e| corrupt("row", e)))
                    .transpose()?,
            };
            if self.defer_ops {
                self.batched.oplog.push((
                    op.op_id as i64,
                    op.bucket.to_owned(),
                    op.op.as_str().to_owned(),
                    Some(op.table.to_owned()),
                    Some(op.row_id.to_owned()),
                    data,
                    i64::from(op.checksum),
                ));
                return Ok(());
            }
            let sql = format!(
                "INSERT INTO {}.oplog(op_id, bucket, op, tbl, row_id, data, checksum) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
                self.db.names.ferry
            );
            self.defer(
                sql,
                vec![
                    Box::new(op.op_id as i64),
                    Box::new(op.bucket.to_owned()),
                    Box::new(op.op.as_str().to_owned()),
                    Box::new(op.table.to_owned()),
                    Box::new(op.row_id.to_owned()),
                    Box::new(data),
                    Box::new(i64::from(op.checksum)),
                ],
            );
            Ok(())
        })
    }

    fn bucket_state(&mut self, bucket: &str) -> SourceResult<Option<BucketState>> {
        if let Some(state) = self.buckets.get(bucket) {
            return Ok(*state);
        }
        lift(|| {
            self.lock_counter()?;
            // Read with the counter's lock, perhaps.
            if let Some(state) = self.buckets.get(bucket) {
                return Ok(*state);
            }
            let sql = bucket_state_sql(&self.db.names.ferry);
            let rows = self.q(&sql, &[&bucket])?;
            let state = rows.first().map(bucket_state_of).transpose()?;
            self.buckets.insert(bucket.to_owned(), state);
            Ok(state)
        })
    }

    fn set_bucket_state(&mut self, bucket: &str, state: &BucketState) -> SourceResult<()> {
        lift(|| self.lock_counter())?;
        self.buckets.insert(bucket.to_owned(), Some(*state));
        if self.defer_ops {
            self.batched.buckets.insert(bucket.to_owned(), *state);
            return Ok(());
        }
        let sql = format!(
            "INSERT INTO {}.buckets(bucket, checksum, count, last_op_id) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (bucket) DO UPDATE SET checksum = EXCLUDED.checksum, count = EXCLUDED.count, \
             last_op_id = EXCLUDED.last_op_id",
            self.db.names.ferry
        );
        self.defer(
            sql,
            vec![
                Box::new(bucket.to_owned()),
                Box::new(i64::from(state.checksum)),
                Box::new(state.count as i64),
                Box::new(state.last_op_id as i64),
            ],
        );
        Ok(())
    }

    fn bucket_ops(&mut self, bucket: &str) -> SourceResult<Vec<OplogEntry>> {
        lift(|| {
            self.lock_counter()?;
            self.flush()?;
            read_ops_on(self.db, self.client, &ferry_source::OpRange::all(bucket))
        })
    }

    fn replace_bucket_ops(&mut self, bucket: &str, entries: &[OplogEntry]) -> SourceResult<()> {
        lift(|| {
            self.lock_counter()?;
            let f = self.db.names.ferry.clone();
            self.q(&format!("DELETE FROM {f}.oplog WHERE bucket = $1"), &[&bucket])?;
            let rows = entries
                .iter()
                .map(|e| {
                    let data = e
                        .data
                        .as_ref()
                        .map(|d| serde_json::to_string(d).map_err(|err| corrupt("row", err)))
                        .transpose()?;
                    Ok((
                        e.op_id as i64,
                        bucket.to_owned(),
                        e.op.as_str().to_owned(),
                        e.object_type.clone(),
                        e.object_id.clone(),
                        data,
                        i64::from(e.checksum),
                    ))
                })
                .collect::<Result<Vec<OplogRow>>>()?;
            for (sql, params) in oplog_inserts(&f, &rows) {
                self.defer(sql, params);
            }
            self.flush()?;
            Ok(())
        })
    }

    fn set_meta(&mut self, key: &str, value: &str) -> SourceResult<()> {
        lift(|| self.lock_counter())?;
        let sql = format!(
            "INSERT INTO {}.meta(key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
            self.db.names.ferry
        );
        self.defer(sql, vec![Box::new(key.to_owned()), Box::new(value.to_owned())]);
        Ok(())
    }

    fn take_captured(&mut self, limit: usize) -> SourceResult<Vec<CapturedChange>> {
        lift(|| {
            // Captured changes need no lock of Ferry's: each is deleted
            // (row locked) by the transaction taking it, and the rows they
            // name are locked when read. (The capture leader runs often:
            // taking the writers' lock exclusive would stop every upload
            // each time.)
            self.hold_writers(LockMode::Shared);
            let f = &self.db.names.ferry;
            // Deleted with this transaction; a change committed later with
            // a lower seq is taken by a later call (it is not skipped:
            // changes are taken by seq, not by range). The oldest truncate
            // ends the batch (the partial index finds it).
            let sql = format!(
                "DELETE FROM {f}.changes WHERE seq IN (SELECT seq FROM {f}.changes \
                 WHERE seq <= COALESCE((SELECT min(seq) FROM {f}.changes WHERE truncated), {max}) \
                 ORDER BY seq LIMIT $1) \
                 RETURNING seq, tbl, id, truncated, truncate_after, columns",
                max = i64::MAX
            );
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            let rows = self.q(&sql, &[&limit])?;
            let mut out: Vec<CapturedChange> = rows
                .iter()
                .map(|r| {
                    let kind = if r.try_get::<_, bool>(3)? {
                        CaptureKind::Truncate {
                            after_id: r.try_get(4)?,
                        }
                    } else {
                        CaptureKind::Row
                    };
                    let table: String = r.try_get(1)?;
                    let id: String = r.try_get(2)?;
                    // The trigger's id is the key as JSON has it; a char(n)
                    // key is padded there, not as the row id (its text).
                    let id = match self.db.layout(&table) {
                        Ok(layout) => layout.id_of_key_text(id),
                        Err(_) => id,
                    };
                    Ok(CapturedChange {
                        seq: r.try_get::<_, i64>(0)? as u64,
                        table,
                        id,
                        kind,
                        columns: r.try_get(5)?,
                    })
                })
                .collect::<Result<_>>()?;
            out.sort_by_key(|c| c.seq);
            Ok(out)
        })
    }

    fn put_back_captured(&mut self, change: &CapturedChange) -> SourceResult<()> {
        // Its own seq, taken (deleted) by this transaction: no other one
        // writes it.
        self.hold_writers(LockMode::Shared);
        let (truncated, after_id) = match &change.kind {
            CaptureKind::Row => (false, None),
            CaptureKind::Truncate { after_id } => (true, after_id.clone()),
        };
        // Its own seq (taken in this transaction, so free): the next take
        // finds it at its place.
        let sql = format!(
            "INSERT INTO {}.changes(seq, tbl, id, truncated, truncate_after, columns) \
             VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (seq) DO UPDATE SET tbl = EXCLUDED.tbl, id = EXCLUDED.id, \
             truncated = EXCLUDED.truncated, truncate_after = EXCLUDED.truncate_after, \
             columns = EXCLUDED.columns",
            self.db.names.ferry
        );
        self.defer(
            sql,
            vec![
                Box::new(i64::try_from(change.seq).unwrap_or(i64::MAX)),
                Box::new(change.table.clone()),
                Box::new(change.id.clone()),
                Box::new(truncated),
                Box::new(after_id),
                Box::new(change.columns.clone()),
            ],
        );
        Ok(())
    }

    fn vanished_rows(&mut self, table: &Table, after_id: Option<&str>, limit: usize) -> SourceResult<VanishedRows> {
        lift(|| {
            // A range of ids: no key lock covers it.
            self.lock_all()?;
            let layout = self.db.layout(&table.name)?;
            let f = &self.db.names.ferry;
            // The next `limit` ids of either list, each read in its key's
            // order (an index scan that stops at the limit), then whether
            // the app's table holds each: a lookup in its key's index per
            // id (LATERAL with LIMIT: an EXISTS becomes a hashed subplan
            // that reads the whole table for every step). An id no row can
            // have casts to NULL and is not held.
            let after = if after_id.is_some() {
                "AND id > $2"
            } else {
                "AND $2::text IS NULL"
            };
            let sql = format!(
                "WITH k AS (SELECT id FROM ( \
                   (SELECT id FROM {f}.clocks WHERE tbl = $1 {after} ORDER BY id LIMIT $3) \
                   UNION \
                   (SELECT DISTINCT id FROM {f}.row_buckets WHERE tbl = $1 {after} ORDER BY id LIMIT $3) \
                 ) AS u ORDER BY id LIMIT $3) \
                 SELECT k.id, h.held IS NOT NULL FROM k \
                 LEFT JOIN LATERAL (SELECT true AS held FROM {t} AS {APP_ROW} WHERE {pk} = {cast} LIMIT 1) AS h ON true \
                 ORDER BY k.id",
                t = layout.qualified,
                pk = layout.pk,
                cast = layout.pk_from_text("k.id"),
            );
            let limit_param = i64::try_from(limit).unwrap_or(i64::MAX);
            let name = table.name.as_str();
            let rows = self.q(&sql, &[&name, &after_id, &limit_param])?;
            let mut out = VanishedRows::default();
            let mut last = None;
            for r in &rows {
                let id: String = r.try_get(0)?;
                if !r.try_get::<_, bool>(1)? {
                    out.ids.push(id.clone());
                }
                last = Some(id);
            }
            if limit > 0 && rows.len() >= limit {
                out.next_after = last;
            }
            Ok(out)
        })
    }

    fn savepoint(&mut self) -> SourceResult<()> {
        self.saved_locks = Some(self.locks.clone());
        if self.defer_ops {
            // No savepoint is sent: the op's statements are dropped while
            // unsent, and a refusal fails the transaction.
            self.op_start = Some(self.op_mark());
            return Ok(());
        }
        // Sent with the op's first statement.
        self.defer(SAVEPOINT.to_owned(), Vec::new());
        Ok(())
    }

    fn rollback_to_savepoint(&mut self) -> SourceResult<()> {
        // What the transaction read is stale.
        self.buckets.clear();
        self.forget_ahead();
        // Locks taken since the savepoint go with it (PostgreSQL lets go
        // of a subtransaction's locks; unsent ones were never taken).
        if let Some(saved) = self.saved_locks.take() {
            self.locks = saved;
        }
        if self.defer_ops {
            return match self.op_start.take() {
                Some(start) => {
                    // Nothing of the op reached the database.
                    self.pending.truncate(start.pending);
                    if start.group_rows == 0 {
                        self.rows = None;
                    } else if let Some(group) = &mut self.rows {
                        group.truncate(start.group_rows);
                    }
                    self.batched.back_to(start.batched);
                    Ok(())
                }
                None => Err(ferry_source::SourceError::Refused(
                    "an op whose writes were sent with others cannot be undone alone".to_owned(),
                )),
            };
        }
        // The op's unsent writes are dropped.
        let unsent_savepoint = self.pending.iter().any(|(s, _)| s == SAVEPOINT);
        self.pending.clear();
        if unsent_savepoint {
            // Nothing of the op reached the database.
            return Ok(());
        }
        lift(|| {
            wait(
                self.client
                    .batch_execute("ROLLBACK TO SAVEPOINT ferry_op; RELEASE SAVEPOINT ferry_op"),
            )?;
            Ok(())
        })
    }

    fn release_savepoint(&mut self) -> SourceResult<()> {
        self.saved_locks = None;
        if self.defer_ops {
            // The op's writes go with the next flight.
            self.op_start = None;
            return Ok(());
        }
        // The op's deferred writes go now: a refused one is still this
        // op's (the service rolls the savepoint back and rejects it).
        self.defer(RELEASE.to_owned(), Vec::new());
        lift(|| self.flush())
    }

    fn prefetch_rows(&mut self, table: &Table, ids: &[&str]) -> SourceResult<()> {
        lift(|| prefetch_rows_on(self, table, ids))
    }

    fn defer_op_writes(&mut self, on: bool) -> bool {
        // Rows gathered so far are written in order with the rest.
        self.close_rows();
        self.seal();
        self.defer_ops = on;
        self.op_start = None;
        on
    }
}
