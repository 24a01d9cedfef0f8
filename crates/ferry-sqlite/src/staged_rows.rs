//! Staged rows kept in the synced rows' own layout, so the switch-in of a
//! first sync moves them with a table rename instead of copying them.
//!
//! A staged PUT's row goes to `ferry_staged_rows` (defined exactly as
//! `ferry_rows`) when that table holds no row of the same `(tbl, id)` or
//! holds the very same bytes; the op in `ferry_staged` then has no data of
//! its own and `side` = the side table's generation (1 until a rename).
//! Otherwise (another op of the row staged other bytes) the row stays
//! inline in the op (`side = 0`), as before. So an op of the current
//! generation finds its row in `ferry_staged_rows`, and an op of an
//! earlier generation (staged before a rename, not deleted yet) in
//! `ferry_rows`, where the rename put it: there it reads the synced row,
//! which is its own until a later write changes the synced row.
//!
//! Rows of `ferry_staged_rows` are only ever dropped all at once: when the
//! staging area is emptied, and by the rename. Dropping some staged ops
//! leaves their rows behind, unused; together with inline rows this makes
//! the table *inexact* (a flag in `ferry_staged_state`): it may hold rows
//! that are not exactly the rows the staged ops put, so it must not be
//! renamed. Emptying the staging area makes it exact again.
//!
//! The rename ([`Writer::switch_in_by_rename`]) applies when a batch ends
//! with switch-ins that together cover every staged op, none a REMOVE or a
//! row of a table with declared indexes, the side table is exact and
//! `ferry_rows` is empty (a first sync): then putting every staged row in
//! op order leaves `ferry_rows` equal to `ferry_staged_rows` (every `(tbl,
//! id)` has one row there), so the bucket entries are put as the
//! set-based switch-in puts them, the table is renamed, an empty one takes
//! its place and the generation goes up. The staged ops stay, as after any
//! switch-in, until the client deletes them (it reads them back first to
//! tell its observers which rows arrived).

use rusqlite::{params, Connection, OptionalExtension};

use crate::{multi_insert_sql, sql_err, Writer, INSERT_CHUNK_ROWS};
use ferry_core::Schema;
use ferry_store::StoreResult;

/// `ferry_staged_rows` (defined as `ferry_rows`) and the staging area's
/// flags.
pub(crate) const CREATE_STAGED_ROWS: &str = concat!(
    crate::rows_table_sql!("ferry_staged_rows"),
    "CREATE TABLE IF NOT EXISTS ferry_staged_state (
    name TEXT PRIMARY KEY NOT NULL,
    value INTEGER NOT NULL
) WITHOUT ROWID;
"
);

const SQL_PUT_SIDE: &str = "INSERT OR IGNORE INTO ferry_staged_rows (tbl, id, data) VALUES (?1, ?2, ?3)";
const SQL_SIDE_SAME: &str = "SELECT data = ?3 FROM ferry_staged_rows WHERE tbl = ?1 AND id = ?2";
const SQL_GENERATION: &str = "SELECT coalesce((SELECT value FROM ferry_staged_state WHERE name = 'generation'), 1)";
const SQL_SET_GENERATION: &str = "INSERT OR REPLACE INTO ferry_staged_state (name, value) VALUES ('generation', ?1)";
const SQL_SET_INEXACT: &str = "INSERT OR REPLACE INTO ferry_staged_state (name, value) VALUES ('inexact', 1)";
const SQL_IS_INEXACT: &str = "SELECT EXISTS (SELECT 1 FROM ferry_staged_state WHERE name = 'inexact' AND value <> 0)";
const SQL_EMPTY_SIDE: &str = "DELETE FROM ferry_staged_rows";
const SQL_EMPTY_STATE: &str = "DELETE FROM ferry_staged_state";
const SQL_ROWS_EMPTY: &str = "SELECT NOT EXISTS (SELECT 1 FROM ferry_rows)";
/// Whether `bucket` has staged ops outside `[?2, ?3]`.
const SQL_STAGED_OUTSIDE: &str = "SELECT EXISTS (SELECT 1 FROM ferry_staged WHERE bucket = ?1 AND op_id < ?2) \
     OR EXISTS (SELECT 1 FROM ferry_staged WHERE bucket = ?1 AND op_id > ?3)";

/// Where a staged op's row goes: `side` when it is (or already was) in
/// `ferry_staged_rows`.
pub(crate) struct Placed {
    pub(crate) side: bool,
}

/// Put the rows of `rows` (`(table, id, encoded row)`, in op order) into
/// `ferry_staged_rows` where they can go, and say for each whether it did
/// (see the module). Marks the side table inexact when one cannot.
pub(crate) fn place(conn: &Connection, rows: &[(&str, &str, &[u8])]) -> StoreResult<Vec<Placed>> {
    let mut placed: Vec<Placed> = Vec::with_capacity(rows.len());
    let mut chunks = rows.chunks_exact(INSERT_CHUNK_ROWS);
    if chunks.len() > 0 {
        let sql = multi_insert_sql("INSERT OR IGNORE INTO ferry_staged_rows (tbl, id, data)", 3);
        let mut stmt = conn.prepare_cached(&sql).map_err(sql_err)?;
        for chunk in chunks.by_ref() {
            let params = chunk.iter().flat_map(|(t, i, d)| {
                [
                    t as &dyn rusqlite::ToSql,
                    i as &dyn rusqlite::ToSql,
                    d as &dyn rusqlite::ToSql,
                ]
            });
            let inserted = stmt.execute(rusqlite::params_from_iter(params)).map_err(sql_err)?;
            if inserted == chunk.len() {
                placed.extend(chunk.iter().map(|_| Placed { side: true }));
            } else {
                // Some row was there already: each is on the side if the
                // row there is its own.
                for row in chunk {
                    placed.push(Placed {
                        side: same_as_side(conn, row)?,
                    });
                }
            }
        }
    }
    for row in chunks.remainder() {
        let inserted = conn
            .prepare_cached(SQL_PUT_SIDE)
            .and_then(|mut s| s.execute(params![row.0, row.1, row.2]))
            .map_err(sql_err)?;
        let side = inserted == 1 || same_as_side(conn, row)?;
        placed.push(Placed { side });
    }
    if placed.iter().any(|p| !p.side) {
        set_inexact(conn)?;
    }
    Ok(placed)
}

/// Whether `ferry_staged_rows` holds exactly this row.
fn same_as_side(conn: &Connection, (table, id, data): &(&str, &str, &[u8])) -> StoreResult<bool> {
    let same: Option<bool> = conn
        .prepare_cached(SQL_SIDE_SAME)
        .and_then(|mut s| s.query_row(params![table, id, data], |r| r.get(0)).optional())
        .map_err(sql_err)?;
    Ok(same == Some(true))
}

/// The side table's generation: what `side` a staged op whose row is in
/// `ferry_staged_rows` has.
pub(crate) fn generation(conn: &Connection) -> StoreResult<i64> {
    conn.prepare_cached(SQL_GENERATION)
        .and_then(|mut s| s.query_row([], |r| r.get(0)))
        .map_err(sql_err)
}

/// Mark `ferry_staged_rows` as possibly holding rows no staged op puts.
pub(crate) fn set_inexact(conn: &Connection) -> StoreResult<()> {
    conn.prepare_cached(SQL_SET_INEXACT)
        .and_then(|mut s| s.execute([]))
        .map_err(sql_err)?;
    Ok(())
}

/// An older store's staged ops all keep their rows inline: the side
/// table is inexact while any is staged.
pub(crate) fn inline_ops_staged(conn: &Connection) -> StoreResult<()> {
    if exists(conn, "SELECT EXISTS (SELECT 1 FROM ferry_staged)", &[])? {
        set_inexact(conn)?;
    }
    Ok(())
}

/// Empty `ferry_staged_rows` (with the staging area): exact again, at
/// generation 1.
pub(crate) fn empty(conn: &Connection) -> StoreResult<()> {
    conn.execute(SQL_EMPTY_SIDE, []).map_err(sql_err)?;
    conn.execute(SQL_EMPTY_STATE, []).map_err(sql_err)?;
    Ok(())
}

fn exists(conn: &Connection, sql: &str, p: &[&dyn rusqlite::ToSql]) -> StoreResult<bool> {
    let mut stmt = conn.prepare_cached(sql).map_err(sql_err)?;
    stmt.query_row(p, |r| r.get(0)).map_err(sql_err)
}

/// One switch-in of a batch's closing run: `(bucket, from, through)`,
/// op ids as stored.
pub(crate) type SwitchRange<'b> = (&'b str, i64, i64);

impl Writer<'_, '_> {
    /// Switch in `ranges` (a batch's closing run of switch-ins) by
    /// renaming `ferry_staged_rows` if the module's conditions hold;
    /// `false` (and nothing done) if not.
    pub(crate) fn switch_in_by_rename(&mut self, schema: &Schema, ranges: &[SwitchRange<'_>]) -> StoreResult<bool> {
        let conn = self.conn;
        if exists(conn, SQL_IS_INEXACT, &[])? || !exists(conn, SQL_ROWS_EMPTY, &[])? {
            return Ok(false);
        }
        for &(bucket, from, through) in ranges {
            if crate::staging::has_remove_or_indexed(conn, schema, bucket, from, through)? {
                return Ok(false);
            }
        }
        // Every staged op is in a range.
        for bucket in crate::staging::staged_buckets(conn)? {
            let mut covered = false;
            for &(b, from, through) in ranges.iter().filter(|r| r.0 == bucket) {
                if !exists(conn, SQL_STAGED_OUTSIDE, &[&b, &from, &through])? {
                    covered = true;
                    break;
                }
            }
            if !covered {
                return Ok(false);
            }
        }
        for &(bucket, from, through) in ranges {
            self.switch_in_set_based(bucket, from, through, false)?;
        }
        conn.execute_batch(
            "DROP TABLE ferry_rows;
             ALTER TABLE ferry_staged_rows RENAME TO ferry_rows;",
        )
        .map_err(sql_err)?;
        conn.execute_batch(CREATE_STAGED_ROWS).map_err(sql_err)?;
        let next = generation(conn)?.saturating_add(1);
        conn.prepare_cached(SQL_SET_GENERATION)
            .and_then(|mut s| s.execute([next]))
            .map_err(sql_err)?;
        // The ops left staged have no row in the new side table.
        set_inexact(conn)?;
        Ok(true)
    }
}
