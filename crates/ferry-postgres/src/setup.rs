//! Ferry's own schema in PostgreSQL, and the capture triggers on the
//! app's synced tables.

use std::time::Duration;

use crate::bridge::wait;
use crate::error::{Error, Result};
use crate::layout::{quote_ident, quote_literal, ColLayout, TableLayout};
use crate::tx::query;
use crate::Names;

/// How many times a setup transaction that lost a deadlock or a lock wait
/// to live traffic is run in all.
pub(crate) const MAX_SETUP_ATTEMPTS: u32 = 5;
/// The wait before the next attempt, times the number of attempts made.
pub(crate) const SETUP_RETRY_DELAY_MS: u64 = 100;
/// The key in `meta` holding the fingerprint of the schema statements last
/// run: an instance restarting on a database set up by the same Ferry runs
/// no DDL (which would take table locks live writes wait behind).
const SETUP_KEY: &str = "setup_fingerprint";

/// Create or bring up to date Ferry's schema, under the setup lock, unless
/// the same statements already ran and everything they make is still
/// there. Retried when it loses a deadlock to other instances' writes.
///
/// Returns whether it made Ferry's schema (it was not there).
pub(crate) fn install(client: &deadpool_postgres::Client, names: &Names) -> Result<bool> {
    let sql = schema_sql(&names.ferry, &names.capture_channel);
    let fingerprint = format!("{:016x}", fnv1a(sql.as_bytes()));
    let f = &names.ferry;
    retrying(client, || {
        wait(client.batch_execute(&format!("BEGIN; {}", lock_sql(&names.ferry_raw))))?;
        let mut made = false;
        let meta = format!("{f}.meta");
        let done: Option<String> = match query(client, "SELECT to_regclass($1)::text", &[&meta])?.first() {
            Some(r) if r.try_get::<_, Option<String>>(0)?.is_some() => query(
                client,
                &format!("SELECT value FROM {f}.meta WHERE key = $1"),
                &[&SETUP_KEY],
            )?
            .first()
            .map(|r| r.try_get(0))
            .transpose()?,
            _ => None,
        };
        // The same statements ran, but an object they make may have been
        // dropped by hand since (an index: every lookup of a table would
        // then scan it): then they run again.
        if done.as_deref() != Some(fingerprint.as_str()) || !objects_present(client, &names.ferry_raw)? {
            // Only when missing: `CREATE SCHEMA IF NOT EXISTS` needs the
            // CREATE privilege on the database even for a schema that is
            // there (made for a role that has rights in it alone).
            let schema_exists: bool = query(client, "SELECT to_regnamespace($1) IS NOT NULL", &[f])?
                .first()
                .map(|r| r.try_get(0))
                .transpose()?
                .unwrap_or(false);
            if !schema_exists {
                wait(client.batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {f};")))?;
                made = true;
            }
            wait(client.batch_execute(&sql))?;
            query(
                client,
                &format!(
                    "INSERT INTO {f}.meta(key, value) VALUES ($1, $2) \
                     ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value"
                ),
                &[&SETUP_KEY, &fingerprint],
            )?;
        }
        wait(client.batch_execute("COMMIT"))?;
        Ok(made)
    })
}

/// Drop Ferry's schema if nothing was ever synced through it: no op, no
/// client, no captured change, no outcome (under the setup lock, so an
/// instance starting meanwhile waits, then makes it again). For a start
/// refused for its rules, which made the schema a moment before: a bad
/// setup leaves nothing behind. `CASCADE` drops only Ferry's own
/// objects: no app table has a trigger calling a function of a schema
/// just made (the refused start's were rolled back). Returns whether it
/// dropped it.
pub(crate) fn drop_if_unused(client: &deadpool_postgres::Client, names: &Names) -> Result<bool> {
    let f = &names.ferry;
    retrying(client, || {
        wait(client.batch_execute(&format!("BEGIN; {}", lock_sql(&names.ferry_raw))))?;
        let unused: bool = query(
            client,
            &format!(
                "SELECT NOT EXISTS (SELECT 1 FROM {f}.oplog) AND NOT EXISTS (SELECT 1 FROM {f}.clients) \
                 AND NOT EXISTS (SELECT 1 FROM {f}.changes) AND NOT EXISTS (SELECT 1 FROM {f}.outcomes)"
            ),
            &[],
        )?
        .first()
        .map(|r| r.try_get(0))
        .transpose()?
        .unwrap_or(false);
        if unused {
            wait(client.batch_execute(&format!("DROP SCHEMA {f} CASCADE")))?;
        }
        wait(client.batch_execute("COMMIT"))?;
        Ok(unused)
    })
}

/// The tables and indexes [`schema_sql`] makes, by name in Ferry's schema.
const SCHEMA_RELATIONS: [&str; 13] = [
    "oplog",
    "oplog_bucket",
    "buckets",
    "buckets_last_op",
    "row_buckets",
    "clocks",
    "tombstones",
    "clients",
    "outcomes",
    "meta",
    "counter",
    "changes",
    "changes_truncated",
];

/// Whether every table and index [`schema_sql`] makes, and its capture
/// function, are in Ferry's schema (one catalog query).
fn objects_present(client: &deadpool_postgres::Client, ferry_schema_raw: &str) -> Result<bool> {
    let names: Vec<&str> = SCHEMA_RELATIONS.to_vec();
    let rows = query(
        client,
        "SELECT (SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = $1 AND c.relname = ANY($2)), \
         EXISTS (SELECT 1 FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace \
         WHERE n.nspname = $1 AND p.proname = 'capture')",
        &[&ferry_schema_raw, &names],
    )?;
    let Some(r) = rows.first() else {
        return Ok(false);
    };
    let relations: i64 = r.try_get(0)?;
    let capture: bool = r.try_get(1)?;
    Ok(relations == SCHEMA_RELATIONS.len() as i64 && capture)
}

/// The statement taking the setup lock for the rest of the transaction:
/// the schema's setup and the triggers' migration run one at a time.
pub(crate) fn lock_sql(ferry_schema_raw: &str) -> String {
    format!(
        "SELECT pg_advisory_xact_lock(hashtext({}));",
        quote_literal(&format!("ferry setup {ferry_schema_raw}"))
    )
}

/// Run the transaction `attempt` opens and commits, again (after a rollback
/// and a wait) while it fails on a deadlock, a serialization failure or a
/// lock it could not get, at most [`MAX_SETUP_ATTEMPTS`] times.
pub(crate) fn retrying<T>(client: &deadpool_postgres::Client, mut attempt: impl FnMut() -> Result<T>) -> Result<T> {
    let mut made = 0;
    loop {
        made += 1;
        match attempt() {
            Ok(v) => return Ok(v),
            Err(e) => {
                // The connection is inside the failed transaction; a
                // rollback that fails leaves the first error to report.
                if wait(client.batch_execute("ROLLBACK")).is_err() || made >= MAX_SETUP_ATTEMPTS || !lost_to_others(&e)
                {
                    return Err(e);
                }
                tracing::info!(
                    attempt = made,
                    "ferry setup lost a lock to other writes; trying again: {e:?}"
                );
                std::thread::sleep(Duration::from_millis(SETUP_RETRY_DELAY_MS * u64::from(made)));
            }
        }
    }
}

/// A deadlock, a serialization failure or a lock not available: the same
/// transaction can pass when run again.
fn lost_to_others(e: &Error) -> bool {
    use tokio_postgres::error::SqlState;
    match e {
        Error::Pg(pg) => pg.code().is_some_and(|c| {
            *c == SqlState::T_R_DEADLOCK_DETECTED
                || *c == SqlState::T_R_SERIALIZATION_FAILURE
                || *c == SqlState::LOCK_NOT_AVAILABLE
        }),
        Error::Source(_) => false,
    }
}

/// 64-bit FNV-1a: a fingerprint of the setup statements that stays the same
/// across builds (unlike the standard library's hasher, which may change).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The statements that create Ferry's tables and capture function in its
/// schema, made first (idempotent; run under an advisory lock so
/// instances starting together do not race; skipped when they already
/// ran, see [`install`]).
pub(crate) fn schema_sql(f: &str, capture_channel: &str) -> String {
    let capture = capture_function_sql(f, capture_channel, "capture", None);
    format!(
        "
CREATE TABLE IF NOT EXISTS {f}.oplog(
  op_id bigint PRIMARY KEY,
  bucket text NOT NULL,
  op text NOT NULL,
  tbl text,
  row_id text,
  data text,
  checksum bigint NOT NULL
);
CREATE INDEX IF NOT EXISTS oplog_bucket ON {f}.oplog(bucket, op_id);
CREATE TABLE IF NOT EXISTS {f}.buckets(
  bucket text PRIMARY KEY,
  checksum bigint NOT NULL,
  count bigint NOT NULL,
  last_op_id bigint NOT NULL
);
CREATE INDEX IF NOT EXISTS buckets_last_op ON {f}.buckets(last_op_id);
CREATE TABLE IF NOT EXISTS {f}.row_buckets(
  tbl text NOT NULL, id text NOT NULL, bucket text NOT NULL,
  PRIMARY KEY(tbl, id, bucket)
);
CREATE TABLE IF NOT EXISTS {f}.clocks(
  tbl text NOT NULL, id text NOT NULL, clocks text NOT NULL,
  PRIMARY KEY(tbl, id)
);
CREATE TABLE IF NOT EXISTS {f}.tombstones(
  tbl text NOT NULL, id text NOT NULL, hlc text NOT NULL,
  PRIMARY KEY(tbl, id)
);
CREATE TABLE IF NOT EXISTS {f}.clients(
  client_id text PRIMARY KEY, user_id text NOT NULL, last_seq bigint NOT NULL
);
CREATE TABLE IF NOT EXISTS {f}.outcomes(
  client_id text NOT NULL, seq bigint NOT NULL, outcome text NOT NULL, fingerprint bigint,
  PRIMARY KEY(client_id, seq)
);
CREATE TABLE IF NOT EXISTS {f}.meta(
  key text PRIMARY KEY, value text NOT NULL
);
CREATE TABLE IF NOT EXISTS {f}.counter(
  id int PRIMARY KEY CHECK (id = 1),
  last_op_id bigint NOT NULL
);
INSERT INTO {f}.counter(id, last_op_id) VALUES (1, 0) ON CONFLICT (id) DO NOTHING;
CREATE TABLE IF NOT EXISTS {f}.changes(
  seq bigserial PRIMARY KEY,
  tbl text NOT NULL,
  id text NOT NULL
);
-- Added after the first release: a database an earlier Ferry made gets
-- them here (existing changes are row changes).
ALTER TABLE {f}.changes ADD COLUMN IF NOT EXISTS truncated boolean NOT NULL DEFAULT false;
ALTER TABLE {f}.changes ADD COLUMN IF NOT EXISTS truncate_after text;
CREATE INDEX IF NOT EXISTS changes_truncated ON {f}.changes(seq) WHERE truncated;
-- The synced columns an UPDATE changed (NULL: every column; a row
-- function of an earlier Ferry records none).
ALTER TABLE {f}.changes ADD COLUMN IF NOT EXISTS columns text[];
{capture}"
    )
}

/// The capture function `{f}.{name}()`, which its triggers call with the
/// table's name in the rules and its key column (`TG_ARGV`). With `pk`
/// (the key column, quoted), the function of one table: it reads the
/// key column alone (`to_jsonb(NEW.pk) #>> '{}'`, the same text as the
/// column's field of `to_jsonb(NEW)`). Without, the function of any
/// table (`capture`: the truncate triggers', and the row triggers' of an
/// earlier Ferry), which turns the whole row into `jsonb` to read the key
/// by name: that fails on values `jsonb` cannot hold (a `json` column's
/// `"\u0000"` or `1e1000000`, in columns the rules need not even name),
/// and a row trigger failing fails the app's own write.
///
/// With `cols` (the table's synced columns; the function of one table),
/// an UPDATE that keeps the key records which of them it changed, and one
/// that changes none of them (it touched only columns the rules do not
/// name, or set values as they were) records nothing: the capture leader
/// then moves only those columns' clocks, so a device's earlier offline
/// edit of another column still wins over it when it arrives.
fn capture_function_sql(f: &str, capture_channel: &str, name: &str, pk: Option<(&str, &[ColLayout])>) -> String {
    let ch = quote_literal(capture_channel);
    let (old_key, new_key) = match pk {
        Some((pk, _)) => (
            format!("to_jsonb(OLD.{pk}) #>> '{{}}'"),
            format!("to_jsonb(NEW.{pk}) #>> '{{}}'"),
        ),
        None => (
            "to_jsonb(OLD) ->> TG_ARGV[1]".to_owned(),
            "to_jsonb(NEW) ->> TG_ARGV[1]".to_owned(),
        ),
    };
    let (declare, same_key_update) = match pk {
        Some((_, cols)) => {
            let tests: String = cols
                .iter()
                .map(|c| {
                    format!(
                        "
    IF {} THEN changed := changed || {}::text; END IF;",
                        c.changed_test(),
                        quote_literal(&c.name)
                    )
                })
                .collect();
            (
                "DECLARE
  changed text[] := ARRAY[]::text[];
",
                format!(
                    "
  IF TG_OP = 'UPDATE' AND ({new_key}) IS NOT DISTINCT FROM ({old_key}) THEN{tests}
    IF cardinality(changed) = 0 THEN
      RETURN NULL;
    END IF;
    INSERT INTO {f}.changes(tbl, id, columns) VALUES (TG_ARGV[0], {new_key}, changed);
    PERFORM pg_notify({ch}, '');
    RETURN NULL;
  END IF;"
                ),
            )
        }
        None => ("", String::new()),
    };
    format!(
        "
CREATE OR REPLACE FUNCTION {f}.{name}() RETURNS trigger LANGUAGE plpgsql AS $ferry$
{declare}BEGIN
  -- Ferry's statement writing a table names it in ferry.writing (and for
  -- a delete, the row's id in ferry.writing_id), and its rows fire this
  -- at depth 1: skipped. A row it changes in turn is captured like any
  -- other change: an app trigger's fires this deeper, a foreign key
  -- action's (ON DELETE CASCADE, SET NULL) at depth 1 but in another
  -- table, or in the same table under a delete of another id. ('on': an
  -- earlier Ferry, which skipped every row.)
  IF pg_trigger_depth() = 1 AND (current_setting('ferry.writing', true) = 'on'
      OR (current_setting('ferry.writing', true) = TG_ARGV[0]
          AND CASE WHEN coalesce(current_setting('ferry.writing_id', true), '') = ''
                   THEN TG_OP <> 'DELETE'
                   ELSE TG_OP = 'DELETE' AND current_setting('ferry.writing_id', true) = {old_key}
              END)) THEN
    RETURN NULL;
  END IF;{same_key_update}
  IF TG_OP = 'TRUNCATE' THEN
    -- Statement level: the rows are not known here; the capture leader
    -- deletes those Ferry knew of and the table no longer holds.
    INSERT INTO {f}.changes(tbl, id, truncated) VALUES (TG_ARGV[0], '', true);
  END IF;
  IF TG_OP = 'DELETE' OR TG_OP = 'UPDATE' THEN
    INSERT INTO {f}.changes(tbl, id) VALUES (TG_ARGV[0], {old_key});
  END IF;
  IF TG_OP = 'INSERT'
     OR (TG_OP = 'UPDATE' AND ({new_key}) IS DISTINCT FROM ({old_key})) THEN
    INSERT INTO {f}.changes(tbl, id) VALUES (TG_ARGV[0], {new_key});
  END IF;
  PERFORM pg_notify({ch}, '');
  RETURN NULL;
END
$ferry$;
"
    )
}

/// The name of one table's row capture function in Ferry's schema (see
/// [`capture_function_sql`]): `capture_row_`, a hash of the table's name
/// in the rules (which may be up to 63 bytes, as the function's) and a
/// hash of its synced columns and the function's version. Rules naming
/// other columns, or a function of an earlier Ferry (which recorded no
/// changed columns), make the name differ, so [`triggers_current`] sees
/// the triggers as out of date and they are made again.
pub(crate) fn row_capture_function(t: &TableLayout) -> String {
    let mut cols = b"columns-v2".to_vec();
    for c in &t.cols {
        cols.push(0);
        cols.extend_from_slice(c.name.as_bytes());
        cols.push(0);
        cols.extend_from_slice(c.typname.as_bytes());
    }
    format!("capture_row_{:016x}_{:016x}", fnv1a(t.name.as_bytes()), fnv1a(&cols))
}

/// Whether the table already has both capture triggers this Ferry makes,
/// calling Ferry's capture functions (the table's own for rows,
/// `capture` for `TRUNCATE`) with these arguments: then no `CREATE
/// TRIGGER` (a lock that conflicts with every write to the app's table) is
/// needed. (A row trigger of an earlier Ferry, calling `capture`, is made
/// again.)
pub(crate) fn triggers_current(
    client: &deadpool_postgres::Client,
    ferry_schema_raw: &str,
    t: &TableLayout,
    pk_raw: &str,
) -> Result<bool> {
    // tgtype bits: 1 row, 4 insert, 8 delete, 16 update, 32 truncate.
    let mut args = Vec::with_capacity(t.name.len() + pk_raw.len() + 2);
    for a in [t.name.as_bytes(), pk_raw.as_bytes()] {
        args.extend_from_slice(a);
        args.push(0);
    }
    let rows = query(
        client,
        "SELECT count(*) FROM pg_trigger tg JOIN pg_proc p ON p.oid = tg.tgfoid \
         JOIN pg_namespace n ON n.oid = p.pronamespace \
         WHERE tg.tgrelid = $1::text::regclass AND n.nspname = $2 AND tg.tgargs = $3 \
         AND ((tg.tgname = $4 AND tg.tgtype = 29 AND p.proname = $6) \
           OR (tg.tgname = $5 AND tg.tgtype = 32 AND p.proname = 'capture'))",
        &[
            &t.qualified,
            &ferry_schema_raw,
            &args,
            &trigger_name("ferry_capture", ferry_schema_raw),
            &trigger_name("ferry_truncate", ferry_schema_raw),
            &row_capture_function(t),
        ],
    )?;
    let n: i64 = match rows.first() {
        Some(r) => r.try_get(0)?,
        None => 0,
    };
    Ok(n == 2)
}

/// A trigger's name: the prefix and Ferry's schema, cut to PostgreSQL's
/// 63 bytes.
fn trigger_name(prefix: &str, ferry_schema_raw: &str) -> String {
    let mut n = format!("{prefix}_{ferry_schema_raw}");
    let mut end = n.len().min(63);
    while !n.is_char_boundary(end) {
        end -= 1;
    }
    n.truncate(end);
    n
}

/// The partitions (at any level) of a partitioned synced table that lack
/// the truncate capture trigger, as `regclass` text: `TRUNCATE` of one
/// partition fires no trigger of its parent. Empty for another table.
pub(crate) fn partitions_without_truncate_trigger(
    client: &deadpool_postgres::Client,
    ferry_schema_raw: &str,
    t: &TableLayout,
) -> Result<Vec<String>> {
    let rows = query(
        client,
        "SELECT p.relid::regclass::text FROM pg_partition_tree($1::text::regclass) AS p \
         WHERE p.relid <> $1::text::regclass \
         AND NOT EXISTS (SELECT 1 FROM pg_trigger tg WHERE tg.tgrelid = p.relid AND tg.tgname = $2)",
        &[&t.qualified, &trigger_name("ferry_truncate", ferry_schema_raw)],
    )?;
    rows.iter().map(|r| Ok(r.try_get(0)?)).collect()
}

/// The truncate capture trigger of one partition of a synced table: a
/// truncate of the partition is one truncate change of the table (the
/// capture leader then deletes the rows Ferry knew of that the table no
/// longer holds).
pub(crate) fn partition_truncate_sql(
    f: &str,
    ferry_schema_raw: &str,
    t: &TableLayout,
    pk_raw: &str,
    partition: &str,
) -> String {
    format!(
        "CREATE OR REPLACE TRIGGER {} AFTER TRUNCATE ON {partition} \
         FOR EACH STATEMENT EXECUTE FUNCTION {f}.capture({}, {});",
        quote_ident(&trigger_name("ferry_truncate", ferry_schema_raw)),
        quote_literal(&t.name),
        quote_literal(pk_raw),
    )
}

/// The capture triggers of one synced table: one per row for inserts,
/// updates and deletes, one per statement for `TRUNCATE` (which fires no
/// row trigger). Named after Ferry's schema, so two Ferry schemas over
/// one database do not replace each other's.
pub(crate) fn trigger_sql(
    f: &str,
    ferry_schema_raw: &str,
    capture_channel: &str,
    t: &TableLayout,
    pk_raw: &str,
) -> String {
    let name = |prefix: &str| quote_ident(&trigger_name(prefix, ferry_schema_raw));
    let args = format!("{}, {}", quote_literal(&t.name), quote_literal(pk_raw));
    let row_fn = row_capture_function(t);
    format!(
        "{function} \
         CREATE OR REPLACE TRIGGER {} AFTER INSERT OR UPDATE OR DELETE ON {table} \
         FOR EACH ROW EXECUTE FUNCTION {f}.{row_fn}({args}); \
         CREATE OR REPLACE TRIGGER {} AFTER TRUNCATE ON {table} \
         FOR EACH STATEMENT EXECUTE FUNCTION {f}.capture({args});",
        name("ferry_capture"),
        name("ferry_truncate"),
        function = capture_function_sql(f, capture_channel, &row_fn, Some((&quote_ident(pk_raw), &t.cols))),
        table = t.qualified,
    )
}
