//! Bulk-apply throughput against a plain rusqlite insert of the same rows.
//! Ignored by default; run with
//! `cargo test --release -p ferry-sqlite --test bulk -- --ignored --nocapture`
//! (`FERRY_BULK_ROWS` sets the row count, default 1,000,000).

use std::time::Instant;

use ferry_core::{ColumnType, RowData, Schema, Table, Value};
use ferry_sqlite::SqliteStore;
use ferry_store::{Store, WriteBatch};

const COLUMNS: [&str; 8] = ["c0", "c1", "c2", "c3", "c4", "c5", "c6", "c7"];

fn row(i: i64) -> RowData {
    COLUMNS
        .iter()
        .enumerate()
        .map(|(c, name)| {
            let v = match c % 3 {
                0 => Value::Integer(i * 31 + c as i64),
                1 => Value::Text(format!("value {i} of {c}")),
                _ => Value::Real(i as f64 / 7.0),
            };
            ((*name).to_owned(), v)
        })
        .collect()
}

#[test]
#[ignore = "benchmark; run in release"]
fn bulk_apply_is_within_2x_of_plain_insert() {
    let n: i64 = std::env::var("FERRY_BULK_ROWS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    let dir = tempfile::tempdir().expect("tempdir");
    let rows: Vec<(String, RowData)> = (0..n).map(|i| (format!("row-{i:010}"), row(i))).collect();

    // Plain rusqlite: one 8-column table, one transaction, a cached insert.
    let plain_secs = {
        let mut conn = rusqlite::Connection::open(dir.path().join("plain.db")).expect("open");
        conn.pragma_update(None, "journal_mode", "WAL").expect("wal");
        conn.pragma_update(None, "synchronous", "NORMAL").expect("sync");
        conn.execute_batch(
            "CREATE TABLE plain (id TEXT PRIMARY KEY, c0 INTEGER, c1 TEXT, c2 REAL, c3 INTEGER, c4 TEXT, c5 REAL, c6 INTEGER, c7 TEXT)",
        )
        .expect("create");
        let start = Instant::now();
        let tx = conn.transaction().expect("tx");
        {
            let mut stmt = tx
                .prepare_cached("INSERT INTO plain VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)")
                .expect("prepare");
            for (id, data) in &rows {
                use rusqlite::types::{ToSqlOutput, ValueRef};
                let v = |c: &str| {
                    ToSqlOutput::Borrowed(match &data[c] {
                        Value::Integer(i) => ValueRef::Integer(*i),
                        Value::Real(r) => ValueRef::Real(*r),
                        Value::Text(t) => ValueRef::Text(t.as_bytes()),
                        Value::Blob(b) => ValueRef::Blob(b),
                        Value::Null => ValueRef::Null,
                    })
                };
                stmt.execute(rusqlite::params![
                    id,
                    v("c0"),
                    v("c1"),
                    v("c2"),
                    v("c3"),
                    v("c4"),
                    v("c5"),
                    v("c6"),
                    v("c7")
                ])
                .expect("insert");
            }
        }
        tx.commit().expect("commit");
        start.elapsed().as_secs_f64()
    };

    let mut table = Table::new("bulk");
    for (c, name) in COLUMNS.iter().enumerate() {
        let ty = [ColumnType::Integer, ColumnType::Text, ColumnType::Real][c % 3];
        table = table.column(*name, ty);
    }
    let store = SqliteStore::open(dir.path().join("ferry.db"), Schema::new([table]).expect("schema")).expect("open");
    let mut batch = WriteBatch::with_capacity(rows.len());
    for (id, data) in rows {
        batch.put_synced("bulk", id, data);
    }
    let start = Instant::now();
    store.apply(batch).expect("apply");
    let ferry_secs = start.elapsed().as_secs_f64();

    let rate = |s: f64| n as f64 / s;
    println!(
        "{n} rows: plain {plain_secs:.2}s ({:.0} rows/s), ferry apply {ferry_secs:.2}s ({:.0} rows/s), ratio {:.2}",
        rate(plain_secs),
        rate(ferry_secs),
        ferry_secs / plain_secs
    );
    assert_eq!(store.scan_synced("bulk").expect("scan").len(), n as usize);
    assert!(
        ferry_secs <= 2.0 * plain_secs,
        "ferry {ferry_secs:.2}s vs plain {plain_secs:.2}s"
    );
}
