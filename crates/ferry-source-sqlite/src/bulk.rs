//! The bulk writes of [`SqliteTx`](crate::SqliteTx): many rows, op log
//! entries and memberships with few statements (multi-row `INSERT`s of at
//! most [`MAX_ROWS_PER_INSERT`] rows, ids looked up through one
//! `json_each` array of at most [`MAX_IDS_PER_LOOKUP`]), each with the
//! effect of the one-row methods called in order; and the encoding of
//! column clocks every write shares.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use ferry_core::{HlcTimestamp, Table, Value};
use ferry_source::{NewOp, RowClocks, RowWrite};
use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{Connection, Statement, ToSql};

use crate::{corrupt, q, raise, Result};

/// Most rows in one multi-row `INSERT`. Each bound text is a copy SQLite
/// allocates; with fewer rows a statement's copies fit more often in the
/// connection's lookaside memory instead of the general allocator
/// (callgrind, `import_bench`: the writer's instructions 2.63 G with 64
/// rows, 2.52 G with 32, 2.49 G with 16, 2.65 G with 8).
pub(crate) const MAX_ROWS_PER_INSERT: usize = 16;
/// Most parameters bound to one statement (SQLite's default limit is
/// 32,766).
const MAX_PARAMS_PER_STATEMENT: usize = 8_192;
/// Most ids in one lookup or delete (one JSON array parameter).
pub(crate) const MAX_IDS_PER_LOOKUP: usize = 1_000;

/// A value bound without a copy.
struct Borrowed<'a>(&'a Value);

impl ToSql for Borrowed<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(match self.0 {
            Value::Null => ValueRef::Null,
            Value::Integer(i) => ValueRef::Integer(*i),
            Value::Real(r) => ValueRef::Real(*r),
            Value::Text(s) => ValueRef::Text(s.as_bytes()),
            Value::Blob(b) => ValueRef::Blob(b),
        }))
    }
}

/// One row of a multi-row `INSERT`: its `VALUES` tuple (`?` for each of
/// its `width` parameters, constants written in), between `head` and
/// `tail`.
struct InsertShape<'a> {
    head: &'a str,
    row: &'a str,
    width: usize,
    tail: &'a str,
}

/// `(?, ?, ..)`: a tuple of `width` parameters.
fn params_tuple(width: usize) -> String {
    format!("({})", vec!["?"; width].join(", "))
}

/// `text` as an SQL string literal (a constant written into a statement
/// instead of bound to each row of it).
fn text_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// `INSERT ... VALUES (..), (..) ...` of `rows` rows of `shape`.
fn insert_sql(shape: &InsertShape<'_>, rows: usize) -> String {
    format!(
        "{} VALUES {} {}",
        shape.head,
        vec![shape.row; rows].join(", "),
        shape.tail
    )
}

/// Insert `items` with multi-row statements of `shape`; `bind` binds one
/// item's `width` parameters from the given (1-based) index. Each
/// statement is looked up in the cache once per call, not once per
/// chunk.
fn insert_many<T>(
    conn: &Connection,
    shape: &InsertShape<'_>,
    items: &[T],
    mut bind: impl FnMut(&mut Statement<'_>, usize, &T) -> Result<()>,
) -> Result<()> {
    let width = shape.width;
    let per = (MAX_PARAMS_PER_STATEMENT / width.max(1)).clamp(1, MAX_ROWS_PER_INSERT);
    let mut chunks = items.chunks_exact(per);
    if chunks.len() > 0 {
        let mut stmt = conn.prepare_cached(&insert_sql(shape, per))?;
        for chunk in chunks.by_ref() {
            for (i, item) in chunk.iter().enumerate() {
                bind(&mut stmt, 1 + i * width, item)?;
            }
            stmt.raw_execute()?;
        }
    }
    // A partial chunk goes row by row: one cached statement per size.
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let mut stmt = conn.prepare_cached(&insert_sql(shape, 1))?;
        for item in rest {
            bind(&mut stmt, 1, item)?;
            stmt.raw_execute()?;
        }
    }
    Ok(())
}

/// Clocks as stored: [`ferry_core::clock::clocks_json`]'s text (one
/// clock and the columns when they share it, else the JSON object
/// `serde_json` writes for them).
pub(crate) fn encode_clocks(clocks: &BTreeMap<String, HlcTimestamp>) -> Result<String> {
    ferry_core::clock::clocks_json(clocks).map_err(|e| corrupt("clocks", e))
}

/// Stored clocks read back: either form of [`encode_clocks`] (rows
/// written before the shared-clock form keep their objects).
pub(crate) fn decode_clocks(text: &str) -> Result<BTreeMap<String, HlcTimestamp>> {
    ferry_core::clock::parse_clocks_json(text).map_err(|e| corrupt("clocks", e))
}

/// The ids as one JSON array (for `json_each`).
pub(crate) fn id_array(ids: &[&str]) -> Result<String> {
    serde_json::to_string(ids).map_err(|e| corrupt("row ids", e))
}

/// [`ferry_source::SourceTx::write_rows`]: the rows (an upsert each, in
/// order), their clocks, their tombstones cleared; raises `max_clock`.
pub(crate) fn write_rows(
    conn: &Connection,
    table: &Table,
    rows: &[RowWrite<'_>],
    max_clock: &mut Option<HlcTimestamp>,
) -> Result<()> {
    let names: Vec<String> = table.columns.iter().map(|c| q(&c.name)).collect();
    let mut cols = vec!["id".to_owned()];
    cols.extend(names.iter().cloned());
    let update = if names.is_empty() {
        "NOTHING".to_owned()
    } else {
        let sets: Vec<String> = names.iter().map(|n| format!("{n} = excluded.{n}")).collect();
        format!("UPDATE SET {}", sets.join(", "))
    };
    let head = format!("INSERT INTO {}({})", q(&table.name), cols.join(", "));
    let tail = format!("ON CONFLICT(id) DO {update}");
    // The columns by name, with their parameter: a row's values (a map
    // by name) are matched to them in one walk.
    let mut by_name: Vec<(&str, usize)> = table
        .columns
        .iter()
        .enumerate()
        .map(|(i, c)| (c.name.as_str(), i))
        .collect();
    by_name.sort_unstable();
    let null = Value::Null;
    let shape = InsertShape {
        head: &head,
        row: &params_tuple(cols.len()),
        width: cols.len(),
        tail: &tail,
    };
    insert_many(conn, &shape, rows, |stmt, at, r| {
        stmt.raw_bind_parameter(at, r.id)?;
        let mut values = r.data.iter().peekable();
        for &(name, i) in &by_name {
            let mut value = &null;
            while let Some((k, v)) = values.peek() {
                match k.as_str().cmp(name) {
                    // Not a column of the table.
                    std::cmp::Ordering::Less => {
                        values.next();
                    }
                    std::cmp::Ordering::Equal => {
                        value = v;
                        values.next();
                        break;
                    }
                    std::cmp::Ordering::Greater => break,
                }
            }
            stmt.raw_bind_parameter(at + 1 + i, Borrowed(value))?;
        }
        Ok(())
    })?;
    let clocks: Vec<(&str, Cow<'_, str>)> = rows
        .iter()
        .map(|r| {
            let encoded = match (r.clocks_json, r.clocks) {
                (Some(json), _) => Cow::Borrowed(json),
                (None, RowClocks::Columns(clocks)) => Cow::Owned(encode_clocks(clocks)?),
                (None, RowClocks::Shared(hlc)) => Cow::Owned(
                    ferry_core::clock::shared_clocks_json(hlc, r.data.keys().map(String::as_str))
                        .map_err(|e| corrupt("clocks", e))?,
                ),
            };
            raise_to_row(max_clock, r, &encoded);
            Ok((r.id, encoded))
        })
        .collect::<Result<_>>()?;
    // The table's name written into the statement, not bound per row.
    let shape = InsertShape {
        head: "INSERT OR REPLACE INTO ferry_clocks(tbl, id, clocks)",
        row: &format!("({}, ?, ?)", text_literal(&table.name)),
        width: 2,
        tail: "",
    };
    insert_many(conn, &shape, &clocks, |stmt, at, (id, c)| {
        stmt.raw_bind_parameter(at, *id)?;
        stmt.raw_bind_parameter(at + 1, c.as_ref())?;
        Ok(())
    })?;
    // A table without tombstones (an import of new rows) has none to
    // clear: one probe instead of a lookup of every id.
    if !any_tombstone(conn, &table.name)? {
        return Ok(());
    }
    let ids: Vec<&str> = rows.iter().map(|r| r.id).collect();
    for chunk in ids.chunks(MAX_IDS_PER_LOOKUP) {
        conn.prepare_cached("DELETE FROM ferry_tombstones WHERE tbl = ?1 AND id IN (SELECT value FROM json_each(?2))")?
            .execute([table.name.as_str(), id_array(chunk)?.as_str()])?;
    }
    Ok(())
}

/// `*max` raised to the greatest of a row's clocks, `encoded` (as
/// stored): one comparison when they share one clock.
fn raise_to_row(max: &mut Option<HlcTimestamp>, row: &RowWrite<'_>, encoded: &str) {
    match row.clocks {
        RowClocks::Shared(_) => {
            if let Some(c) = row.clocks.max(row.data) {
                raise(max, c);
            }
        }
        RowClocks::Columns(clocks) if encoded.starts_with('[') => {
            if let Some(c) = clocks.values().next() {
                raise(max, c);
            }
        }
        RowClocks::Columns(clocks) => {
            for c in clocks.values() {
                raise(max, c);
            }
        }
    }
}

/// Whether any row of `table` has a tombstone.
fn any_tombstone(conn: &Connection, table: &str) -> Result<bool> {
    Ok(conn
        .prepare_cached("SELECT EXISTS (SELECT 1 FROM ferry_tombstones WHERE tbl = ?1)")?
        .query_row([table], |r| r.get(0))?)
}

/// [`ferry_source::SourceTx::known_rows`]: ids with a row, a tombstone or
/// bucket membership (the tombstones only looked up in a table that has
/// some). The id list is read once and each id probes the tables' keys.
pub(crate) fn known_rows(conn: &Connection, table: &Table, ids: &[&str]) -> Result<BTreeSet<String>> {
    if let Some(known) = known_in_range(conn, table, ids)? {
        return Ok(known);
    }
    let tombstones = if any_tombstone(conn, &table.name)? {
        " OR EXISTS (SELECT 1 FROM ferry_tombstones t WHERE t.tbl = ?2 AND t.id = ids.value)"
    } else {
        ""
    };
    let sql = format!(
        "SELECT ids.value FROM json_each(?1) AS ids
         WHERE EXISTS (SELECT 1 FROM {} r WHERE r.id = ids.value)
         OR EXISTS (SELECT 1 FROM ferry_row_buckets b WHERE b.tbl = ?2 AND b.id = ids.value){tombstones}",
        q(&table.name)
    );
    let mut stmt = conn.prepare_cached(&sql)?;
    let mut known = BTreeSet::new();
    for chunk in ids.chunks(MAX_IDS_PER_LOOKUP) {
        let array = id_array(chunk)?;
        let mut rows = stmt.query([array.as_str(), table.name.as_str()])?;
        while let Some(r) = rows.next()? {
            if let ValueRef::Text(id) = r.get_ref(0)? {
                let id = String::from_utf8_lossy(id);
                if !known.contains(id.as_ref()) {
                    known.insert(id.into_owned());
                }
            }
        }
    }
    Ok(known)
}

/// [`known_rows`] by reading the keys between the least and the greatest
/// of `ids` (one range of each table's key instead of a probe per id): a
/// bulk load of new rows finds nothing there. `None` when that range
/// holds more than about half as many keys as `ids` (ids spread over a
/// filled table: the probes cost less), or when the table's key does not
/// order as Rust's `str` does (a key that is not text compared bytewise,
/// in a table made before Ferry).
fn known_in_range(conn: &Connection, table: &Table, ids: &[&str]) -> Result<Option<BTreeSet<String>>> {
    let (Some(lo), Some(hi)) = (ids.iter().min(), ids.iter().max()) else {
        return Ok(Some(BTreeSet::new()));
    };
    if !binary_text_key(conn, &table.name)? {
        return Ok(None);
    }
    let limit = ids.len() / 2 + 1;
    let row_sql = format!("SELECT id FROM {} WHERE id >= ?1 AND id <= ?2 LIMIT ?3", q(&table.name));
    let mut sqls = vec![
        row_sql.as_str(),
        "SELECT id FROM ferry_row_buckets WHERE tbl = ?4 AND id >= ?1 AND id <= ?2 LIMIT ?3",
    ];
    if any_tombstone(conn, &table.name)? {
        sqls.push("SELECT id FROM ferry_tombstones WHERE tbl = ?4 AND id >= ?1 AND id <= ?2 LIMIT ?3");
    }
    // Keys in the range (most of them, for a bulk load: none).
    let mut found: Vec<String> = Vec::new();
    for sql in sqls {
        let mut stmt = conn.prepare_cached(sql)?;
        let limit_sql = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut rows = if stmt.parameter_count() == 4 {
            stmt.query(rusqlite::params![lo, hi, limit_sql, table.name])?
        } else {
            stmt.query(rusqlite::params![lo, hi, limit_sql])?
        };
        let mut read = 0;
        while let Some(r) = rows.next()? {
            read += 1;
            if read >= limit {
                return Ok(None);
            }
            if let ValueRef::Text(id) = r.get_ref(0)? {
                found.push(String::from_utf8_lossy(id).into_owned());
            }
        }
    }
    if found.is_empty() {
        return Ok(Some(BTreeSet::new()));
    }
    let asked: HashSet<&str> = ids.iter().copied().collect();
    Ok(Some(
        found.into_iter().filter(|id| asked.contains(id.as_str())).collect(),
    ))
}

/// Whether `table`'s primary key is its `id` column alone, with text
/// affinity and the `BINARY` collation (as the tables Ferry creates):
/// its keys between two texts are those Rust's `str` order puts there,
/// and equal to a text only when bytewise equal.
fn binary_text_key(conn: &Connection, table: &str) -> Result<bool> {
    let mut stmt = conn.prepare_cached(
        "SELECT x.name, x.coll, (SELECT upper(c.type) FROM pragma_table_info(?1) c WHERE c.name = x.name) \
         FROM pragma_index_list(?1) l, pragma_index_xinfo(l.name) x \
         WHERE l.origin = 'pk' AND x.key = 1",
    )?;
    let mut rows = stmt.query([table])?;
    let mut keys = 0;
    let mut ok = true;
    while let Some(r) = rows.next()? {
        keys += 1;
        let name: Option<String> = r.get(0)?;
        let coll: Option<String> = r.get(1)?;
        let ty: Option<String> = r.get(2)?;
        // SQLite's affinity rules: INT first, then CHAR, CLOB or TEXT.
        let text = ty.is_some_and(|t| !t.contains("INT") && ["CHAR", "CLOB", "TEXT"].iter().any(|k| t.contains(k)));
        ok &= name.as_deref() == Some("id") && coll.is_some_and(|c| c.eq_ignore_ascii_case("BINARY")) && text;
    }
    Ok(ok && keys == 1)
}

/// [`ferry_source::SourceTx::set_rows_buckets`] (`clear`: each row's
/// membership replaced) and [`ferry_source::SourceTx::add_rows_buckets`]
/// (rows without membership: nothing to clear). The last entry of an id
/// wins, as in order.
pub(crate) fn set_rows_buckets(
    conn: &Connection,
    table: &str,
    rows: &[(&str, &BTreeSet<String>)],
    clear: bool,
) -> Result<()> {
    // Ids in ascending order (a bulk load's, mostly) have no repeats:
    // no map of each id's last entry to build.
    let last: Option<HashMap<&str, usize>> = (!strictly_ascending(rows.iter().map(|(id, _)| *id)))
        .then(|| rows.iter().enumerate().map(|(i, (id, _))| (*id, i)).collect());
    let is_last = |i: usize, id: &str| last.as_ref().is_none_or(|l| l.get(id) == Some(&i));
    if clear {
        let ids: Vec<&str> = rows
            .iter()
            .enumerate()
            .filter(|(i, (id, _))| is_last(*i, id))
            .map(|(_, (id, _))| *id)
            .collect();
        for chunk in ids.chunks(MAX_IDS_PER_LOOKUP) {
            conn.prepare_cached(
                "DELETE FROM ferry_row_buckets WHERE tbl = ?1 AND id IN (SELECT value FROM json_each(?2))",
            )?
            .execute([table, id_array(chunk)?.as_str()])?;
        }
    }
    let pairs: Vec<(&str, &str)> = rows
        .iter()
        .enumerate()
        .filter(|(i, (id, _))| is_last(*i, id))
        .flat_map(|(_, (id, buckets))| buckets.iter().map(move |b| (*id, b.as_str())))
        .collect();
    let shape = InsertShape {
        head: "INSERT INTO ferry_row_buckets(tbl, id, bucket)",
        row: &format!("({}, ?, ?)", text_literal(table)),
        width: 2,
        tail: "",
    };
    insert_many(conn, &shape, &pairs, |stmt, at, (id, b)| {
        stmt.raw_bind_parameter(at, *id)?;
        stmt.raw_bind_parameter(at + 1, *b)?;
        Ok(())
    })
}

/// Whether `ids` are in strictly ascending order (so none repeats).
fn strictly_ascending<'a>(ids: impl IntoIterator<Item = &'a str>) -> bool {
    let mut ids = ids.into_iter();
    let Some(mut prev) = ids.next() else {
        return true;
    };
    for id in ids {
        if id <= prev {
            return false;
        }
        prev = id;
    }
    true
}

/// An op's row as its JSON text: the text the caller gave, else `data`
/// encoded.
pub(crate) fn op_json<'a>(op: &NewOp<'a>) -> Result<Option<Cow<'a, str>>> {
    if let Some(json) = op.data_json {
        return Ok(Some(Cow::Borrowed(json)));
    }
    op.data
        .map(|d| serde_json::to_string(d).map(Cow::Owned).map_err(|e| corrupt("row", e)))
        .transpose()
}

/// [`ferry_source::SourceTx::append_ops`]: the entries as given, rows as
/// their JSON text. When every entry has the same kind and table (an
/// import's PUTs of one table), those are written into the statement
/// instead of bound to each row.
pub(crate) fn append_ops(conn: &Connection, ops: &[NewOp<'_>]) -> Result<()> {
    let data: Vec<Option<Cow<'_, str>>> = ops.iter().map(op_json).collect::<Result<_>>()?;
    let items: Vec<(&NewOp<'_>, &Option<Cow<'_, str>>)> = ops.iter().zip(&data).collect();
    let head = "INSERT INTO ferry_oplog(op_id, bucket, op, tbl, row_id, data, checksum)";
    let shared = ops
        .first()
        .filter(|first| ops.iter().all(|o| o.op == first.op && o.table == first.table));
    if let Some(first) = shared {
        let shape = InsertShape {
            head,
            row: &format!(
                "(?, ?, {}, {}, ?, ?, ?)",
                text_literal(first.op.as_str()),
                text_literal(first.table)
            ),
            width: 5,
            tail: "",
        };
        return insert_many(conn, &shape, &items, |stmt, at, (op, data)| {
            stmt.raw_bind_parameter(at, op.op_id as i64)?;
            stmt.raw_bind_parameter(at + 1, op.bucket)?;
            stmt.raw_bind_parameter(at + 2, op.row_id)?;
            stmt.raw_bind_parameter(at + 3, data.as_deref())?;
            stmt.raw_bind_parameter(at + 4, i64::from(op.checksum))?;
            Ok(())
        });
    }
    let shape = InsertShape {
        head,
        row: &params_tuple(7),
        width: 7,
        tail: "",
    };
    insert_many(conn, &shape, &items, |stmt, at, (op, data)| {
        stmt.raw_bind_parameter(at, op.op_id as i64)?;
        stmt.raw_bind_parameter(at + 1, op.bucket)?;
        stmt.raw_bind_parameter(at + 2, op.op.as_str())?;
        stmt.raw_bind_parameter(at + 3, op.table)?;
        stmt.raw_bind_parameter(at + 4, op.row_id)?;
        stmt.raw_bind_parameter(at + 5, data.as_deref())?;
        stmt.raw_bind_parameter(at + 6, i64::from(op.checksum))?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use ferry_core::HlcTimestamp;

    use super::{binary_text_key, decode_clocks, encode_clocks, known_rows};

    /// `known_rows` answers the same by a range of the key and by a probe
    /// per id, and keeps to probes for a key that does not order as
    /// `str` (a table made before Ferry with another collation or type).
    #[test]
    fn known_rows_by_range_and_by_probe() {
        let set = |ids: &[&str]| {
            ids.iter()
                .map(|s| (*s).to_owned())
                .collect::<std::collections::BTreeSet<_>>()
        };
        for (ddl, range) in [
            (
                "CREATE TABLE t(id TEXT PRIMARY KEY NOT NULL, v TEXT) WITHOUT ROWID",
                true,
            ),
            ("CREATE TABLE t(id varchar(40) PRIMARY KEY, v TEXT)", true),
            ("CREATE TABLE t(id TEXT COLLATE NOCASE PRIMARY KEY, v TEXT)", false),
            ("CREATE TABLE t(id NUMERIC PRIMARY KEY, v TEXT)", false),
            ("CREATE TABLE t(id TEXT, v TEXT, PRIMARY KEY(id, v))", false),
            ("CREATE TABLE t(id TEXT, v TEXT)", false),
        ] {
            let conn = rusqlite::Connection::open_in_memory().expect("open");
            conn.execute_batch(crate::SETUP_SQL).expect("setup");
            conn.execute_batch(ddl).expect("create");
            assert_eq!(binary_text_key(&conn, "t").expect("key"), range, "{ddl}");
            conn.execute_batch(
                "INSERT INTO t(id, v) VALUES ('b', 'x'), ('B2', 'y'), ('10', 'z');
                 INSERT INTO ferry_row_buckets(tbl, id, bucket) VALUES ('t', 'c', 'g'), ('u', 'd', 'g');
                 INSERT INTO ferry_tombstones(tbl, id, hlc) VALUES ('t', 'e', 'x');",
            )
            .expect("rows");
            let table = ferry_core::Table::new("t").column("v", ferry_core::ColumnType::Text);
            let cases: [(&[&str], &[&str]); 5] = [
                (&["a", "b", "c", "d", "e", "f"], &["b", "c", "e"]),
                (&["B", "b2", "9", "11"], &[]),
                (&["10", "B2"], &["10", "B2"]),
                (&["x", "y", "z"], &[]),
                (&[], &[]),
            ];
            for (ids, known) in cases {
                let mut expected = set(known);
                if ddl.contains("NOCASE") && ids.contains(&"b2") {
                    // Under NOCASE, 'B' is 'b' and 'b2' is 'B2'.
                    expected.extend(set(&["B", "b2"]));
                }
                assert_eq!(
                    known_rows(&conn, &table, ids).expect("known"),
                    expected,
                    "{ddl} {ids:?}"
                );
            }
        }
    }

    fn hlc(wall_ms: u64, node: &str) -> HlcTimestamp {
        HlcTimestamp {
            wall_ms,
            counter: 3,
            node: node.to_owned(),
        }
    }

    #[test]
    fn clocks_read_back_in_both_forms() {
        let maps: Vec<BTreeMap<String, HlcTimestamp>> = vec![
            BTreeMap::new(),
            [("title".to_owned(), hlc(1, "server"))].into_iter().collect(),
            [
                ("a".to_owned(), hlc(1, "server")),
                ("b".to_owned(), hlc(1, "server")),
                ("c".to_owned(), hlc(2, "client \"x\"")),
                ("d\"e".to_owned(), hlc(1, "server")),
                ("é".to_owned(), hlc(2, "client \"x\"")),
            ]
            .into_iter()
            .collect(),
        ];
        for m in maps {
            assert_eq!(decode_clocks(&encode_clocks(&m).expect("encode")).expect("decode"), m);
            // As databases written before the shared-clock form hold them.
            let object = serde_json::to_string(&m).expect("encode");
            assert_eq!(decode_clocks(&object).expect("decode"), m);
        }
        assert!(decode_clocks("[\"not a clock\",\"a\"]").is_err());
    }
}
