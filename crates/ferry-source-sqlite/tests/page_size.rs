//! Database files this creates have larger pages (fewer B-tree pages and
//! WAL frames per row written); a file created before, with SQLite's
//! default 4 KiB pages, keeps them and reads and writes as before.

use std::collections::BTreeMap;

use ferry_core::HlcTimestamp;
use ferry_protocol::OpKind;
use ferry_source::testkit::{clock, test_schema, ticket};
use ferry_source::{NewOp, OpRange, RowClocks, RowWrite, SourceDb};
use ferry_source_sqlite::SqliteSourceDb;

fn page_size(path: &std::path::Path) -> i64 {
    let conn = rusqlite::Connection::open(path).expect("open");
    conn.query_row("PRAGMA page_size", [], |r| r.get(0)).expect("page size")
}

/// Write `n` rows the bulk way and one the one-row way, with their op log
/// entries, and check every one reads back.
fn write_and_read(path: &std::path::Path, n: usize) {
    let schema = test_schema();
    let table = schema.table("tickets").expect("table").clone();
    let rows: Vec<(String, ferry_core::RowData)> = (0..n)
        .map(|i| (format!("t{i:05}"), ticket(&format!("title {i}"), 1)))
        .collect();
    let hlc = clock(7, "server");
    {
        let db = SqliteSourceDb::open(path).expect("open");
        db.migrate(&schema).expect("migrate");
        let before = db.oplog_len().expect("len");
        db.write(&mut |tx| {
            let writes: Vec<RowWrite<'_>> = rows
                .iter()
                .map(|(id, data)| RowWrite {
                    id,
                    data,
                    clocks: RowClocks::Shared(&hlc),
                    clocks_json: None,
                })
                .collect();
            tx.write_rows(&table, &writes)?;
            let mut ops = Vec::new();
            for (id, data) in &rows {
                ops.push(NewOp {
                    op_id: tx.next_op_id()?,
                    bucket: "global[]",
                    op: OpKind::Put,
                    table: "tickets",
                    row_id: id,
                    data: Some(data),
                    data_json: None,
                    checksum: 1,
                });
            }
            tx.append_ops(&ops)?;
            let one: BTreeMap<String, HlcTimestamp> = rows[0].1.keys().map(|k| (k.clone(), hlc.clone())).collect();
            tx.write_row(&table, "single", &rows[0].1, &one)?;
            Ok(())
        })
        .expect("write");
        assert_eq!(db.oplog_len().expect("len"), before + n as u64);
    }
    let db = SqliteSourceDb::open(path).expect("reopen");
    for (id, data) in rows.iter().chain([&("single".to_owned(), rows[0].1.clone())]) {
        let stored = db.get_row(&table, id).expect("read").expect("a row");
        assert_eq!(stored.data.as_ref(), Some(data), "{id}");
        assert!(stored.clocks.values().all(|c| *c == hlc), "{id}");
    }
    let entries = db.read_ops(&OpRange::all("global[]")).expect("read ops");
    assert!(entries.len() >= n, "{} entries", entries.len());
}

#[test]
fn new_files_have_larger_pages_and_old_files_keep_theirs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let new = dir.path().join("new.db");
    write_and_read(&new, 3_000);
    assert_eq!(page_size(&new), 8192);

    // As an older version created it: SQLite's default pages, WAL.
    let old = dir.path().join("old.db");
    {
        let conn = rusqlite::Connection::open(&old).expect("open");
        conn.pragma_update(None, "journal_mode", "WAL").expect("wal");
        conn.execute_batch("CREATE TABLE made_before(x)").expect("create");
    }
    assert_eq!(page_size(&old), 4096);
    write_and_read(&old, 3_000);
    // Written again (a second import over the same file): still readable.
    write_and_read(&old, 10);
    assert_eq!(page_size(&old), 4096, "an existing file keeps its page size");
}
