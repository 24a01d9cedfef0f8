//! Column clocks on disk: a row whose columns share one clock is stored
//! in the short form (one clock, then the columns), and databases written
//! before that form (every row's clocks as a JSON object) still read,
//! their clock high-water mark included.

use std::collections::BTreeMap;

use ferry_core::HlcTimestamp;
use ferry_source::testkit::{clock, test_schema, ticket};
use ferry_source::{RowClocks, RowWrite, SourceDb};
use ferry_source_sqlite::SqliteSourceDb;

fn stored_clocks(path: &std::path::Path, id: &str) -> String {
    let conn = rusqlite::Connection::open(path).expect("open");
    conn.query_row(
        "SELECT clocks FROM ferry_clocks WHERE tbl = 'tickets' AND id = ?1",
        [id],
        |r| r.get(0),
    )
    .expect("stored clocks")
}

#[test]
fn shared_clocks_are_short_and_object_clocks_still_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("source.db");
    let schema = test_schema();
    let table = schema.table("tickets").expect("table").clone();
    let row = ticket("a", 1);
    let shared: BTreeMap<String, HlcTimestamp> = row.keys().map(|k| (k.clone(), clock(5, "server"))).collect();
    let mut mixed = shared.clone();
    mixed.insert("title".to_owned(), clock(9, "client"));
    {
        let db = SqliteSourceDb::open(&path).expect("open");
        db.migrate(&schema).expect("migrate");
        db.write(&mut |tx| {
            tx.write_row(&table, "one", &row, &shared)?;
            tx.write_rows(
                &table,
                &[
                    RowWrite {
                        id: "bulk",
                        data: &row,
                        clocks: RowClocks::Columns(&shared),
                        clocks_json: None,
                    },
                    RowWrite {
                        id: "bulk-shared",
                        data: &row,
                        clocks: RowClocks::Shared(&clock(5, "server")),
                        clocks_json: None,
                    },
                ],
            )?;
            tx.write_row(&table, "mixed", &row, &mixed)?;
            Ok(())
        })
        .expect("write");
    }
    for id in ["one", "bulk", "bulk-shared"] {
        let text = stored_clocks(&path, id);
        assert!(text.starts_with('[') && text.len() < 100, "{id}: {text}");
    }
    // One shared clock is stored as the map of it is.
    assert_eq!(stored_clocks(&path, "bulk-shared"), stored_clocks(&path, "bulk"));
    assert!(stored_clocks(&path, "mixed").starts_with('{'));

    // As an older version left it: objects, and no high-water mark yet
    // (it is computed from the stored clocks when the file is opened).
    {
        let conn = rusqlite::Connection::open(&path).expect("open");
        let object = serde_json::to_string(&shared).expect("encode");
        conn.execute(
            "UPDATE ferry_clocks SET clocks = ?1 WHERE tbl = 'tickets' AND id = 'one'",
            [object.as_str()],
        )
        .expect("old clocks");
        conn.execute("DELETE FROM ferry_meta", []).expect("no mark");
    }
    let db = SqliteSourceDb::open(&path).expect("reopen");
    for (id, clocks) in [("one", &shared), ("bulk", &shared), ("mixed", &mixed)] {
        let stored = db.get_row(&table, id).expect("read").expect("a row");
        assert_eq!(&stored.clocks, clocks, "{id}");
    }
    assert_eq!(db.max_clock().expect("max clock"), Some(clock(9, "client")));
}
