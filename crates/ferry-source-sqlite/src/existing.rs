//! Many rows at once for a pass over rows that are already there (the
//! service's bucket membership pass, `rebucket.rs`): their values,
//! clocks, tombstones and memberships in two statements per chunk of ids
//! instead of four per row, and their clocks written in one pass.

use std::collections::{BTreeMap, BTreeSet};

use ferry_core::{HlcTimestamp, RowData, Table};
use ferry_source::StoredRow;
use rusqlite::Connection;

use crate::bulk::{decode_clocks, encode_clocks, id_array, MAX_IDS_PER_LOOKUP};
use crate::{corrupt, from_sql, q, raise, Result};

/// [`ferry_source::SourceTx::read_rows_with_buckets`]: for each of `ids`,
/// in order, what `read_row` and `row_buckets` answer.
pub(crate) fn read_rows_with_buckets(
    conn: &Connection,
    table: &Table,
    ids: &[&str],
) -> Result<Vec<(Option<StoredRow>, BTreeSet<String>)>> {
    let cols: String = table.columns.iter().map(|c| format!(", t.{}", q(&c.name))).collect();
    let rows_sql = format!(
        "SELECT j.key, t.id IS NOT NULL, c.clocks, ts.hlc{cols} FROM json_each(?1) j \
         LEFT JOIN {} t ON t.id = j.value \
         LEFT JOIN ferry_clocks c ON c.tbl = ?2 AND c.id = j.value \
         LEFT JOIN ferry_tombstones ts ON ts.tbl = ?2 AND ts.id = j.value",
        q(&table.name)
    );
    // CROSS JOIN keeps the ids the outer loop: a plain join let SQLite
    // scan every membership of the table for each chunk instead.
    const BUCKETS_SQL: &str = "SELECT j.key, b.bucket FROM json_each(?1) j \
         CROSS JOIN ferry_row_buckets b ON b.tbl = ?2 AND b.id = j.value";
    let mut out: Vec<(Option<StoredRow>, BTreeSet<String>)> = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(MAX_IDS_PER_LOOKUP) {
        let base = out.len();
        out.extend(chunk.iter().map(|_| (None, BTreeSet::new())));
        let array = id_array(chunk)?;
        let at = |key: i64| -> Result<usize> {
            usize::try_from(key)
                .ok()
                .filter(|&k| k < chunk.len())
                .map(|k| base + k)
                .ok_or_else(|| corrupt("row id lookup", format!("position {key}")))
        };
        let mut stmt = conn.prepare_cached(&rows_sql)?;
        let mut rows = stmt.query(rusqlite::params![array, table.name])?;
        while let Some(r) = rows.next()? {
            let i = at(r.get(0)?)?;
            let present: bool = r.get(1)?;
            let data = if present {
                let mut d = RowData::new();
                for (k, c) in table.columns.iter().enumerate() {
                    d.insert(c.name.clone(), from_sql(r.get_ref(4 + k)?));
                }
                Some(d)
            } else {
                None
            };
            let clocks: BTreeMap<String, HlcTimestamp> = match r.get::<_, Option<String>>(2)? {
                Some(s) => decode_clocks(&s)?,
                None => BTreeMap::new(),
            };
            let deleted = match r.get::<_, Option<String>>(3)? {
                Some(s) => Some(s.parse::<HlcTimestamp>().map_err(|e| corrupt("tombstone", e))?),
                None => None,
            };
            if data.is_some() || deleted.is_some() {
                out[i].0 = Some(StoredRow { data, clocks, deleted });
            }
        }
        let mut stmt = conn.prepare_cached(BUCKETS_SQL)?;
        let mut rows = stmt.query(rusqlite::params![array, table.name])?;
        while let Some(r) = rows.next()? {
            let i = at(r.get(0)?)?;
            out[i].1.insert(r.get(1)?);
        }
    }
    Ok(out)
}

/// [`ferry_source::SourceTx::set_many_clocks`]: each row's clocks
/// replaced and its tombstone cleared, in order; raises `max_clock`.
pub(crate) fn set_many_clocks(
    conn: &Connection,
    table: &str,
    rows: &[(&str, &BTreeMap<String, HlcTimestamp>)],
    max_clock: &mut Option<HlcTimestamp>,
) -> Result<()> {
    let mut put = conn.prepare_cached("INSERT OR REPLACE INTO ferry_clocks(tbl, id, clocks) VALUES (?1, ?2, ?3)")?;
    for (id, clocks) in rows {
        for c in clocks.values() {
            raise(max_clock, c);
        }
        put.execute(rusqlite::params![table, id, encode_clocks(clocks)?])?;
    }
    let ids: Vec<&str> = rows.iter().map(|(id, _)| *id).collect();
    let mut clear =
        conn.prepare_cached("DELETE FROM ferry_tombstones WHERE tbl = ?1 AND id IN (SELECT value FROM json_each(?2))")?;
    for chunk in ids.chunks(MAX_IDS_PER_LOOKUP) {
        clear.execute(rusqlite::params![table, id_array(chunk)?])?;
    }
    Ok(())
}
