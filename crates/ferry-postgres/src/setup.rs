//! Ferry's own schema in PostgreSQL, and the capture triggers on the
//! app's synced tables.

use crate::layout::{quote_ident, quote_literal, TableLayout};

/// The statements that create Ferry's schema (idempotent; run under an
/// advisory lock so instances starting together do not race).
pub(crate) fn schema_sql(f: &str, capture_channel: &str) -> String {
    let ch = quote_literal(capture_channel);
    format!(
        "
CREATE SCHEMA IF NOT EXISTS {f};
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
CREATE OR REPLACE FUNCTION {f}.capture() RETURNS trigger LANGUAGE plpgsql AS $ferry$
BEGIN
  IF current_setting('ferry.writing', true) = 'on' THEN
    RETURN NULL;
  END IF;
  IF TG_OP = 'TRUNCATE' THEN
    -- Statement level: the rows are not known here; the capture leader
    -- deletes those Ferry knew of and the table no longer holds.
    INSERT INTO {f}.changes(tbl, id, truncated) VALUES (TG_ARGV[0], '', true);
  END IF;
  IF TG_OP = 'DELETE' OR TG_OP = 'UPDATE' THEN
    INSERT INTO {f}.changes(tbl, id) VALUES (TG_ARGV[0], to_jsonb(OLD) ->> TG_ARGV[1]);
  END IF;
  IF TG_OP = 'INSERT'
     OR (TG_OP = 'UPDATE' AND (to_jsonb(NEW) ->> TG_ARGV[1]) IS DISTINCT FROM (to_jsonb(OLD) ->> TG_ARGV[1])) THEN
    INSERT INTO {f}.changes(tbl, id) VALUES (TG_ARGV[0], to_jsonb(NEW) ->> TG_ARGV[1]);
  END IF;
  PERFORM pg_notify({ch}, '');
  RETURN NULL;
END
$ferry$;
"
    )
}

/// The capture triggers of one synced table: one per row for inserts,
/// updates and deletes, one per statement for `TRUNCATE` (which fires no
/// row trigger). Named after Ferry's schema, so two Ferry schemas over
/// one database do not replace each other's.
pub(crate) fn trigger_sql(f: &str, ferry_schema_raw: &str, t: &TableLayout, pk_raw: &str) -> String {
    let name = |prefix: &str| -> String {
        let n: String = format!("{prefix}_{ferry_schema_raw}").chars().take(63).collect();
        quote_ident(&n)
    };
    let args = format!("{}, {}", quote_literal(&t.name), quote_literal(pk_raw));
    format!(
        "CREATE OR REPLACE TRIGGER {} AFTER INSERT OR UPDATE OR DELETE ON {table} \
         FOR EACH ROW EXECUTE FUNCTION {f}.capture({args}); \
         CREATE OR REPLACE TRIGGER {} AFTER TRUNCATE ON {table} \
         FOR EACH STATEMENT EXECUTE FUNCTION {f}.capture({args});",
        name("ferry_capture"),
        name("ferry_truncate"),
        table = t.qualified,
    )
}
