//! The staging area in SQLite: `ferry_staged`, keyed by `(bucket, op_id)`,
//! rows encoded as in `ferry_rows`, each in `ferry_staged_rows` (`side`)
//! or in the op itself (see `staged_rows.rs`), so a switch-in of rows of
//! tables without indexes is one `INSERT … SELECT` inside the batch's
//! transaction (or, for a first sync, a table rename), and anything else
//! goes op by op in pages.

use ferry_core::{codec, Schema};
use ferry_store::{switch_effect, StagedKind, StagedOp, StagedSummary, StoreError, StoreResult, SwitchEffect};
use rusqlite::{params, Connection, OptionalExtension};

use crate::staged_rows;
use crate::{
    clamp_bound, from_ordered_key, multi_insert_sql, ordered_key, sql_err, Writer, INSERT_CHUNK_ROWS,
    SQL_GET_BUCKET_ENTRY, W_DELETE_BUCKET_ENTRY, W_PUT_BUCKET_ENTRY,
};

pub(crate) const CREATE_STAGED: &str = "
CREATE TABLE IF NOT EXISTS ferry_staged (
    bucket TEXT NOT NULL,
    op_id INTEGER NOT NULL,
    kind INTEGER NOT NULL,
    tbl TEXT NOT NULL,
    row_id TEXT NOT NULL,
    data BLOB,
    checksum INTEGER NOT NULL,
    side INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (bucket, op_id)
) WITHOUT ROWID;
";

/// A staged op's row (`s` is `ferry_staged`): its own, its `(tbl, id)`'s
/// in `ferry_staged_rows` (current generation) or, renamed in since, in
/// `ferry_rows` (see `staged_rows.rs`).
macro_rules! staged_data {
    () => {
        "CASE WHEN s.side = 0 THEN s.data \
         WHEN s.side = coalesce((SELECT value FROM ferry_staged_state WHERE name = 'generation'), 1) \
         THEN (SELECT r.data FROM ferry_staged_rows r WHERE r.tbl = s.tbl AND r.id = s.row_id) \
         ELSE (SELECT f.data FROM ferry_rows f WHERE f.tbl = s.tbl AND f.id = s.row_id) END"
    };
}

const SQL_PUT_STAGED: &str =
    "INSERT OR REPLACE INTO ferry_staged (bucket, op_id, kind, tbl, row_id, data, checksum, side) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)";
const SQL_STAGED_OPS: &str = concat!(
    "SELECT s.op_id, s.kind, s.tbl, s.row_id, ",
    staged_data!(),
    ", s.checksum FROM ferry_staged s WHERE s.bucket = ?1 AND s.op_id > ?2 ORDER BY s.op_id LIMIT ?3"
);
const SQL_STAGED_RANGE: &str = concat!(
    "SELECT s.op_id, s.kind, s.tbl, s.row_id, ",
    staged_data!(),
    ", s.checksum FROM ferry_staged s \
     WHERE s.bucket = ?1 AND s.op_id > ?2 AND s.op_id <= ?3 ORDER BY s.op_id LIMIT ?4"
);
const SQL_LAST_STAGED: &str = "SELECT max(op_id) FROM ferry_staged WHERE bucket = ?1";
/// A bucket's staged ops after `?2`: the last op id, how many, and the
/// last CLEAR's op id (kind `?3`).
const SQL_SUMMARY: &str = "SELECT max(op_id), count(*), max(CASE WHEN kind = ?3 THEN op_id END), \
     coalesce(sum(checksum), 0) FROM ferry_staged WHERE bucket = ?1 AND op_id > ?2";
/// The checksum sum and count of a bucket's staged ops from `?2` on.
const SQL_SUMMARY_SINCE: &str = "SELECT coalesce(sum(checksum), 0), count(*) FROM ferry_staged \
     WHERE bucket = ?1 AND op_id >= ?2";
/// The buckets with staged ops, one index probe each (a skip scan).
const SQL_STAGED_BUCKETS: &str = "WITH RECURSIVE b(name) AS ( \
     SELECT min(bucket) FROM ferry_staged \
     UNION ALL SELECT (SELECT min(bucket) FROM ferry_staged WHERE bucket > b.name) FROM b WHERE b.name IS NOT NULL) \
     SELECT name FROM b WHERE name IS NOT NULL";
const SQL_HAS_REMOVE: &str = "SELECT 1 FROM ferry_staged \
     WHERE bucket = ?1 AND op_id >= ?2 AND op_id <= ?3 AND kind = 1 LIMIT 1";
const SQL_HAS_TABLE: &str = "SELECT 1 FROM ferry_staged \
     WHERE bucket = ?1 AND op_id >= ?2 AND op_id <= ?3 AND kind = 0 AND tbl = ?4 LIMIT 1";
const SQL_SWITCH_ROWS: &str = concat!(
    "INSERT OR REPLACE INTO ferry_rows (tbl, id, data) SELECT s.tbl, s.row_id, ",
    staged_data!(),
    " FROM ferry_staged s WHERE s.bucket = ?1 AND s.op_id >= ?2 AND s.op_id <= ?3 AND s.kind = 0 \
     AND (s.data IS NOT NULL OR s.side) ORDER BY s.op_id"
);
const SQL_SWITCH_ENTRIES: &str = "INSERT OR REPLACE INTO ferry_bucket_entries (bucket, tbl, row_id, op_id, checksum) \
     SELECT bucket, tbl, row_id, op_id, checksum FROM ferry_staged \
     WHERE bucket = ?1 AND op_id >= ?2 AND op_id <= ?3 AND kind = 0 ORDER BY op_id";
/// The op id `SET_STATEMENT_OPS` ops into a range (its last one, if
/// shorter).
const SQL_CHUNK_END: &str = "SELECT op_id FROM ferry_staged \
     WHERE bucket = ?1 AND op_id >= ?2 AND op_id <= ?3 ORDER BY op_id LIMIT 1 OFFSET ?4";
const SQL_DELETE_STAGED_CHUNK: &str = "DELETE FROM ferry_staged WHERE bucket = ?1 AND op_id IN \
     (SELECT op_id FROM ferry_staged WHERE bucket = ?1 AND op_id <= ?2 ORDER BY op_id LIMIT ?3)";

/// Whether anything is staged besides `bucket`'s ops through `?2`: three
/// seeks of the primary key.
const SQL_STAGED_BEYOND: &str = "SELECT EXISTS (SELECT 1 FROM ferry_staged WHERE bucket < ?1) \
     OR EXISTS (SELECT 1 FROM ferry_staged WHERE bucket > ?1) \
     OR EXISTS (SELECT 1 FROM ferry_staged WHERE bucket = ?1 AND op_id > ?2)";
/// Empty the staging area (no `WHERE`: SQLite's truncate optimization).
const SQL_EMPTY_STAGED: &str = "DELETE FROM ferry_staged";

/// Ops one set-based statement moves or deletes: SQLite keeps a statement
/// journal of the pages a statement changes (in memory, `temp_store =
/// MEMORY`), so statements stay this small however large the checkpoint.
const SET_STATEMENT_OPS: i64 = 8_192;
const SQL_BUCKET_NAMES: &str = "SELECT name FROM ferry_buckets";
/// Whether a bucket other than ?1 holds row ?2/?3 with a later op than ?4.
const SQL_NEWER_ENTRY: &str = "SELECT 1 FROM ferry_bucket_entries \
     WHERE bucket IN (SELECT name FROM ferry_buckets) AND bucket <> ?1 AND tbl = ?2 AND row_id = ?3 AND op_id > ?4 \
     LIMIT 1";

/// Staged ops switched in at once on the op-by-op path.
const SWITCH_PAGE_OPS: usize = 2_048;

/// One staged op to insert: (bucket, op, op id as stored, encoded row).
pub(crate) type StagedRow<'b> = (&'b str, &'b StagedOp, i64, Option<Vec<u8>>);

/// Whether staging `staged` may replace a staged op: some op id is not
/// above every op id its bucket had staged before it (ops normally come in
/// op id order, and a bucket's last staged op id is one seek).
fn replaces_ops(conn: &Connection, staged: &[StagedRow<'_>]) -> StoreResult<bool> {
    let mut last: std::collections::HashMap<&str, i64> = std::collections::HashMap::new();
    for (bucket, _, op_id, _) in staged {
        let before = match last.get(bucket) {
            Some(&l) => l,
            None => conn
                .prepare_cached(SQL_LAST_STAGED)
                .and_then(|mut s| s.query_row(params![bucket], |r| r.get::<_, Option<i64>>(0)))
                .map_err(sql_err)?
                .unwrap_or(-1),
        };
        if *op_id <= before {
            return Ok(true);
        }
        last.insert(bucket, *op_id);
    }
    Ok(false)
}

/// An op's row as `ferry_staged` keeps it: none when it is on the side.
fn inline(data: &Option<Vec<u8>>, side: bool) -> Option<&[u8]> {
    if side {
        None
    } else {
        data.as_deref()
    }
}

impl<'c, 'b> Writer<'c, 'b> {
    pub(crate) fn put_staged(&mut self, schema: &Schema, bucket: &'b str, op: &'b StagedOp) -> StoreResult<()> {
        self.staged_check.check(schema, bucket, op)?;
        let op_id = ordered_key("staged op id", op.op_id)?;
        self.staged
            .push((bucket, op, op_id, op.data.as_ref().map(codec::encode_row)));
        if self.staged.len() >= INSERT_CHUNK_ROWS * 16 {
            self.flush_staged()?;
        }
        Ok(())
    }

    pub(crate) fn flush_staged(&mut self) -> StoreResult<()> {
        if self.staged.is_empty() {
            return Ok(());
        }
        let staged = std::mem::take(&mut self.staged);
        if replaces_ops(self.conn, &staged)? {
            // A replaced op's row may stay on the side, unused.
            staged_rows::set_inexact(self.conn)?;
        }
        // The rows first, on the side where they can go.
        let rows: Vec<(&str, &str, &[u8])> = staged
            .iter()
            .filter_map(|(_, op, _, data)| data.as_deref().map(|d| (op.table.as_str(), op.row_id.as_str(), d)))
            .collect();
        let mut placed = staged_rows::place(self.conn, &rows)?.into_iter();
        let generation = staged_rows::generation(self.conn)?;
        // Each op's `side`: the generation when its row is on the side.
        let sides: Vec<i64> = staged
            .iter()
            .map(|(_, _, _, data)| {
                if data.is_some() && placed.next().is_some_and(|p| p.side) {
                    generation
                } else {
                    0
                }
            })
            .collect();
        let mut chunks = staged.chunks_exact(INSERT_CHUNK_ROWS);
        let mut side_chunks = sides.chunks_exact(INSERT_CHUNK_ROWS);
        if chunks.len() > 0 {
            let sql = multi_insert_sql(
                "INSERT OR REPLACE INTO ferry_staged (bucket, op_id, kind, tbl, row_id, data, checksum, side)",
                8,
            );
            let mut stmt = self.conn.prepare_cached(&sql).map_err(sql_err)?;
            for (chunk, sides) in chunks.by_ref().zip(side_chunks.by_ref()) {
                let kinds: Vec<u8> = chunk.iter().map(|(_, op, _, _)| op.kind.code()).collect();
                let inline: Vec<Option<&[u8]>> = chunk
                    .iter()
                    .zip(sides)
                    .map(|(r, &side)| inline(&r.3, side != 0))
                    .collect();
                let params = chunk.iter().zip(&kinds).zip(&inline).zip(sides).flat_map(
                    |((((b, op, op_id, _), kind), data), side)| {
                        [
                            b as &dyn rusqlite::ToSql,
                            op_id as &dyn rusqlite::ToSql,
                            kind as &dyn rusqlite::ToSql,
                            &op.table as &dyn rusqlite::ToSql,
                            &op.row_id as &dyn rusqlite::ToSql,
                            data as &dyn rusqlite::ToSql,
                            &op.checksum as &dyn rusqlite::ToSql,
                            side as &dyn rusqlite::ToSql,
                        ]
                    },
                );
                stmt.execute(rusqlite::params_from_iter(params)).map_err(sql_err)?;
            }
        }
        let mut stmt = self.conn.prepare_cached(SQL_PUT_STAGED).map_err(sql_err)?;
        for ((bucket, op, op_id, data), &side) in chunks.remainder().iter().zip(side_chunks.remainder()) {
            stmt.execute(params![
                bucket,
                op_id,
                op.kind.code(),
                op.table,
                op.row_id,
                inline(data, side != 0),
                op.checksum,
                side
            ])
            .map_err(sql_err)?;
        }
        self.staged = staged;
        self.staged.clear();
        Ok(())
    }

    /// Drop staged ops: when they are all the staging area holds (the end
    /// of an initial sync), by emptying the tables at once (SQLite frees
    /// their pages without visiting the rows); otherwise in statements of
    /// [`SET_STATEMENT_OPS`], leaving their rows in `ferry_staged_rows`
    /// (which is then inexact, see `staged_rows.rs`).
    pub(crate) fn delete_staged(&mut self, bucket: &str, through_op_id: u64) -> StoreResult<()> {
        let others = self
            .conn
            .prepare_cached(SQL_STAGED_BEYOND)
            .and_then(|mut s| s.query_row(params![bucket, clamp_bound(through_op_id)], |r| r.get::<_, bool>(0)))
            .map_err(sql_err)?;
        if !others {
            return empty_staging_area(self.conn);
        }
        let mut stmt = self.conn.prepare_cached(SQL_DELETE_STAGED_CHUNK).map_err(sql_err)?;
        let mut any = false;
        loop {
            let n = stmt
                .execute(params![bucket, clamp_bound(through_op_id), SET_STATEMENT_OPS])
                .map_err(sql_err)?;
            any |= n > 0;
            if (n as i64) < SET_STATEMENT_OPS {
                break;
            }
        }
        if any {
            staged_rows::set_inexact(self.conn)?;
        }
        Ok(())
    }

    /// `BatchOp::SwitchInStaged`: set-based when the range has no REMOVE
    /// and no row of a table with indexes, op by op otherwise.
    pub(crate) fn switch_in_staged(
        &mut self,
        schema: &Schema,
        bucket: &str,
        from: u64,
        through: u64,
    ) -> StoreResult<()> {
        self.flush()?;
        let (from, through) = (clamp_bound(from), clamp_bound(through));
        let conn = self.conn;
        if !has_remove_or_indexed(conn, schema, bucket, from, through)? {
            return self.switch_in_set_based(bucket, from, through, true);
        }
        // A PUT followed by a REMOVE of its row in this range may be older
        // than the values another bucket holds (the row left this bucket
        // and stayed in that one): only then are the other buckets asked.
        let removes = returns_rows(conn, SQL_HAS_REMOVE, &[&bucket, &from, &through])?;
        let buckets: Vec<String> = {
            let mut stmt = conn.prepare_cached(SQL_BUCKET_NAMES).map_err(sql_err)?;
            let names = stmt.query_map([], |r| r.get(0)).map_err(sql_err)?;
            names.collect::<Result<_, _>>().map_err(sql_err)?
        };
        let mut after = from.saturating_sub(1);
        loop {
            let page = read_range(conn, bucket, after, through, SWITCH_PAGE_OPS)?;
            let Some(last) = page.last() else { return Ok(()) };
            after = ordered_key("staged op id", last.op_id)?;
            let full = page.len() == SWITCH_PAGE_OPS;
            for op in page {
                match switch_effect(op) {
                    SwitchEffect::Put { table, id, data, entry } => {
                        let op_id = ordered_key("bucket entry op id", entry.op_id)?;
                        if let Some(data) = data {
                            let newer =
                                removes && returns_rows(conn, SQL_NEWER_ENTRY, &[&bucket, &table, &id, &op_id])?;
                            if !newer {
                                self.put_synced(schema, &table, &id, &data)?;
                            }
                        }
                        self.stmt(W_PUT_BUCKET_ENTRY)?
                            .execute(params![bucket, entry.table, entry.row_id, op_id, entry.checksum])
                            .map_err(sql_err)?;
                    }
                    SwitchEffect::Remove { table, id } => {
                        self.stmt(W_DELETE_BUCKET_ENTRY)?
                            .execute(params![bucket, table, id])
                            .map_err(sql_err)?;
                        let mut held = false;
                        for b in &buckets {
                            held = returns_rows(conn, SQL_GET_BUCKET_ENTRY, &[b, &table, &id])?;
                            if held {
                                break;
                            }
                        }
                        if !held && schema.table(&table).is_ok() {
                            self.delete_synced(schema, &table, &id)?;
                        }
                    }
                    SwitchEffect::Nothing => {}
                }
            }
            if !full {
                return Ok(());
            }
        }
    }

    /// A range of no REMOVE and no row of a table with indexes, in
    /// statements of [`SET_STATEMENT_OPS`] ops, in op id order: the rows
    /// (with `rows`) and the bucket entries.
    pub(crate) fn switch_in_set_based(&mut self, bucket: &str, from: i64, through: i64, rows: bool) -> StoreResult<()> {
        let conn = self.conn;
        let statements: &[&str] = if rows {
            &[SQL_SWITCH_ROWS, SQL_SWITCH_ENTRIES]
        } else {
            &[SQL_SWITCH_ENTRIES]
        };
        let mut start = from;
        loop {
            let end: Option<i64> = conn
                .prepare_cached(SQL_CHUNK_END)
                .and_then(|mut s| {
                    s.query_row(params![bucket, start, through, SET_STATEMENT_OPS - 1], |r| r.get(0))
                        .optional()
                })
                .map_err(sql_err)?;
            let end = end.unwrap_or(through);
            for sql in statements {
                conn.prepare_cached(sql)
                    .and_then(|mut s| s.execute(params![bucket, start, end]))
                    .map_err(sql_err)?;
            }
            if end >= through {
                return Ok(());
            }
            start = end + 1;
        }
    }
}

/// Whether `bucket`'s staged ops in `[from, through]` hold a REMOVE or a
/// row of a table with declared indexes (the op-by-op switch-in's cases).
pub(crate) fn has_remove_or_indexed(
    conn: &Connection,
    schema: &Schema,
    bucket: &str,
    from: i64,
    through: i64,
) -> StoreResult<bool> {
    if returns_rows(conn, SQL_HAS_REMOVE, &[&bucket, &from, &through])? {
        return Ok(true);
    }
    for table in schema.tables().filter(|t| !t.indexes.is_empty()) {
        if returns_rows(conn, SQL_HAS_TABLE, &[&bucket, &from, &through, &table.name])? {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Whether `sql` returns a row.
fn returns_rows(conn: &Connection, sql: &str, p: &[&dyn rusqlite::ToSql]) -> StoreResult<bool> {
    let mut stmt = conn.prepare_cached(sql).map_err(sql_err)?;
    stmt.exists(p).map_err(sql_err)
}

/// Empty the staging area: its ops and `ferry_staged_rows`.
pub(crate) fn empty_staging_area(conn: &Connection) -> StoreResult<()> {
    conn.execute(SQL_EMPTY_STAGED, []).map_err(sql_err)?;
    staged_rows::empty(conn)
}

fn staged_op(r: &rusqlite::Row<'_>) -> StoreResult<StagedOp> {
    let op_id: i64 = r.get(0).map_err(sql_err)?;
    let code: u8 = r.get(1).map_err(sql_err)?;
    let kind = StagedKind::from_code(code).ok_or_else(|| StoreError::Corrupt(format!("staged op kind {code}")))?;
    let data: Option<Vec<u8>> = r.get(4).map_err(sql_err)?;
    Ok(StagedOp {
        op_id: from_ordered_key("staged op id", op_id)?,
        kind,
        table: r.get(2).map_err(sql_err)?,
        row_id: r.get(3).map_err(sql_err)?,
        data: data.map(|d| codec::decode_row(&d)).transpose()?,
        checksum: r.get(5).map_err(sql_err)?,
    })
}

fn limit_param(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

/// Staged ops of `bucket` in `(after, through]`, at most `limit`.
fn read_range(conn: &Connection, bucket: &str, after: i64, through: i64, limit: usize) -> StoreResult<Vec<StagedOp>> {
    crate::collect(
        conn,
        SQL_STAGED_RANGE,
        params![bucket, after, through, limit_param(limit)],
        staged_op,
    )
}

/// `Store::staged_ops`.
pub(crate) fn staged_ops(
    conn: &Connection,
    bucket: &str,
    after_op_id: u64,
    limit: usize,
) -> StoreResult<Vec<StagedOp>> {
    crate::collect(
        conn,
        SQL_STAGED_OPS,
        params![bucket, clamp_bound(after_op_id), limit_param(limit)],
        staged_op,
    )
}

/// `Store::staged_summary`, in two aggregate queries over the primary
/// key range (no op is decoded). Checksums sum exactly in SQLite's 64-bit
/// integers up to 2^32 ops, far beyond any staging area.
pub(crate) fn staged_summary(conn: &Connection, bucket: &str, after_op_id: u64) -> StoreResult<StagedSummary> {
    let after = clamp_bound(after_op_id);
    let (last, count, clear, sum_all): (Option<i64>, i64, Option<i64>, i64) = conn
        .prepare_cached(SQL_SUMMARY)
        .and_then(|mut s| {
            s.query_row(params![bucket, after, StagedKind::Clear.code()], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })
        })
        .map_err(sql_err)?;
    let Some(last) = last else {
        return Ok(StagedSummary::default());
    };
    // Without a CLEAR the sums since it are the whole range's: one scan.
    let (sum, count_since): (i64, i64) = match clear {
        None => (sum_all, count),
        Some(since) => conn
            .prepare_cached(SQL_SUMMARY_SINCE)
            .and_then(|mut s| s.query_row(params![bucket, since], |r| Ok((r.get(0)?, r.get(1)?))))
            .map_err(sql_err)?,
    };
    let count = u64::try_from(count).map_err(|_| StoreError::Corrupt(format!("staged op count {count}")))?;
    Ok(StagedSummary {
        last_op_id: from_ordered_key("staged op id", last)?,
        count,
        clear_op_id: clear.map(|c| from_ordered_key("staged op id", c)).transpose()?,
        // Wrapping, as the sum of the ops' u32 checksums one by one.
        checksum: u32::try_from(sum.rem_euclid(1 << 32))
            .map_err(|_| StoreError::Corrupt(format!("staged checksum sum {sum}")))?,
        count_since_clear: u64::try_from(count_since)
            .map_err(|_| StoreError::Corrupt(format!("staged op count {count_since}")))?,
    })
}

/// `Store::staged_buckets`.
pub(crate) fn staged_buckets(conn: &Connection) -> StoreResult<Vec<String>> {
    crate::collect(conn, SQL_STAGED_BUCKETS, [], |r| r.get(0).map_err(sql_err))
}
