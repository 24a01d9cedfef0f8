//! Capture on PostgreSQL below the service: what the triggers record
//! (row changes, a truncate, nothing of Ferry's own writes), the order
//! captured changes are taken in around a truncate, a truncate put back
//! with its progress, the walk over the rows a truncate took away, and a
//! database an earlier Ferry made (its change table without the truncate
//! columns) kept working, and which columns an update records.

use std::collections::{BTreeMap, BTreeSet};

use ferry_core::{ColumnType, RowData, Schema, Table, Value};
use ferry_postgres::scratch::ScratchSchemas;
use ferry_postgres::PgSourceDb;
use ferry_source::{CaptureKind, CapturedChange, SourceDb, SourceTx, VanishedRows};

fn items() -> Table {
    Table::new("items").column("name", ColumnType::Text)
}

fn docs() -> Table {
    Table::new("docs").column("name", ColumnType::Text)
}

/// `items` with an integer key, `docs` with a uuid key, and an unsynced
/// table.
fn setup(s: &ScratchSchemas) -> PgSourceDb {
    let a = &s.app;
    s.execute(&format!(
        "CREATE TABLE IF NOT EXISTS \"{a}\".items (id bigint PRIMARY KEY, name text);
         CREATE TABLE IF NOT EXISTS \"{a}\".docs (id uuid PRIMARY KEY, name text);
         CREATE TABLE IF NOT EXISTS \"{a}\".audit (id bigint PRIMARY KEY, note text);"
    ))
    .expect("app tables");
    let db = PgSourceDb::connect(&s.options()).expect("connect");
    db.migrate(&Schema::new([items(), docs()]).expect("schema"))
        .expect("migrate");
    db
}

fn take(db: &PgSourceDb, limit: usize) -> Vec<CapturedChange> {
    let mut out = Vec::new();
    db.write(&mut |tx| {
        out = tx.take_captured(limit)?;
        Ok(())
    })
    .expect("take");
    out
}

fn kinds(changes: &[CapturedChange]) -> Vec<(String, String, CaptureKind)> {
    changes
        .iter()
        .map(|c| (c.table.clone(), c.id.clone(), c.kind.clone()))
        .collect()
}

fn truncate(after_id: Option<&str>) -> CaptureKind {
    CaptureKind::Truncate {
        after_id: after_id.map(str::to_owned),
    }
}

#[test]
fn a_truncate_ends_its_batch_and_is_taken_again_where_it_was_put_back() {
    let s = ScratchSchemas::for_test();
    let db = setup(&s);
    let a = &s.app;
    s.execute(&format!("INSERT INTO \"{a}\".items VALUES (1, 'one')"))
        .expect("insert");
    s.execute(&format!(
        "BEGIN; TRUNCATE \"{a}\".items; INSERT INTO \"{a}\".items VALUES (2, 'two'); COMMIT;"
    ))
    .expect("truncate");
    s.execute(&format!(
        "INSERT INTO \"{a}\".items VALUES (3, 'three'); TRUNCATE \"{a}\".audit;"
    ))
    .expect("later");
    let mut first = Vec::new();
    db.write(&mut |tx| {
        first = tx.take_captured(10)?;
        // Handled in part: put back with its progress.
        if let Some(c) = first.last() {
            tx.put_back_captured(&CapturedChange {
                kind: truncate(Some("41")),
                ..c.clone()
            })?;
        }
        Ok(())
    })
    .expect("take and put back");
    assert_eq!(
        kinds(&first),
        vec![
            ("items".to_owned(), "1".to_owned(), CaptureKind::Row),
            ("items".to_owned(), String::new(), truncate(None)),
        ],
        "the changes up to the truncate, not after it"
    );
    let seq = first[1].seq;
    let resumed = take(&db, 10);
    assert_eq!(resumed[0].seq, seq, "at its place");
    assert_eq!(
        kinds(&resumed),
        vec![("items".to_owned(), String::new(), truncate(Some("41")))],
        "with its progress, still ending the batch"
    );
    let rest = take(&db, 10);
    assert_eq!(
        kinds(&rest),
        vec![
            ("items".to_owned(), "2".to_owned(), CaptureKind::Row),
            ("items".to_owned(), "3".to_owned(), CaptureKind::Row),
        ],
        "nothing of the unsynced table"
    );
    assert!(take(&db, 10).is_empty());
}

#[test]
fn ferry_s_own_truncate_is_not_captured() {
    let s = ScratchSchemas::for_test();
    let _db = setup(&s);
    let a = &s.app;
    s.execute(&format!(
        "BEGIN; SELECT set_config('ferry.writing', 'on', true); TRUNCATE \"{a}\".items; COMMIT;"
    ))
    .expect("truncate as ferry");
    let n = s
        .query(&format!("SELECT count(*)::text FROM \"{}\".changes", s.ferry))
        .expect("changes");
    assert_eq!(n[0][0].as_deref(), Some("0"));
}

fn named(name: &str) -> RowData {
    [("name".to_owned(), Value::from(name))].into_iter().collect()
}

fn walk(db: &PgSourceDb, t: &Table, limit: usize) -> Vec<VanishedRows> {
    let mut steps = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let mut step = VanishedRows::default();
        db.write(&mut |tx| {
            step = tx.vanished_rows(t, after.as_deref(), limit)?;
            Ok(())
        })
        .expect("walk");
        after = step.next_after.clone();
        steps.push(step);
        if after.is_none() {
            return steps;
        }
        assert!(steps.len() < 100, "the walk ends");
    }
}

#[test]
fn the_walk_finds_the_rows_ferry_knew_of_that_the_table_no_longer_holds() {
    let s = ScratchSchemas::for_test();
    let db = setup(&s);
    let a = &s.app;
    let (items, docs) = (items(), docs());
    let bucket: BTreeSet<String> = ["all[]".to_owned()].into_iter().collect();
    const DOC: &str = "123e4567-e89b-12d3-a456-426614174000";
    db.write(&mut |tx: &mut dyn SourceTx| {
        for id in ["1", "2", "3", "4"] {
            tx.write_row(&items, id, &named(id), &BTreeMap::new())?;
            tx.set_row_buckets("items", id, &bucket)?;
        }
        // Membership only (a row the first pass over the table found).
        tx.set_row_buckets("items", "5", &bucket)?;
        // Ids no row of the table can have.
        tx.set_row_buckets("items", "x", &bucket)?;
        tx.set_row_buckets("docs", "NOT-A-UUID", &bucket)?;
        tx.write_row(&docs, DOC, &named("doc"), &BTreeMap::new())?;
        Ok(())
    })
    .expect("rows");
    s.execute(&format!("INSERT INTO \"{a}\".items VALUES (5, 'five')"))
        .expect("row 5");
    let held: Vec<String> = walk(&db, &items, 2).into_iter().flat_map(|s| s.ids).collect();
    assert_eq!(held, vec!["x".to_owned()], "every row is held, no row can have id x");
    let docs_walk = walk(&db, &docs, 10);
    assert_eq!(docs_walk.len(), 1);
    assert_eq!(docs_walk[0].ids, vec!["NOT-A-UUID".to_owned()]);

    s.execute(&format!(
        "TRUNCATE \"{a}\".items; INSERT INTO \"{a}\".items VALUES (3, 'back');"
    ))
    .expect("truncate");
    let steps = walk(&db, &items, 2);
    let ids: Vec<Vec<String>> = steps.iter().map(|s| s.ids.clone()).collect();
    let next: Vec<Option<String>> = steps.iter().map(|s| s.next_after.clone()).collect();
    let v = |ids: &[&str]| ids.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    assert_eq!(ids, vec![v(&["1", "2"]), v(&["4"]), v(&["5", "x"]), v(&[])]);
    assert_eq!(
        next,
        vec![Some("2".to_owned()), Some("4".to_owned()), Some("x".to_owned()), None]
    );
    // The other table is not part of it.
    assert_eq!(walk(&db, &docs, 10)[0].ids, vec!["NOT-A-UUID".to_owned()]);
}

#[test]
fn a_database_an_earlier_ferry_made_keeps_working() {
    let s = ScratchSchemas::for_test();
    let (a, f) = (&s.app, &s.ferry);
    // The change table as the first release made it, with a change
    // waiting.
    s.execute(&format!(
        "CREATE SCHEMA \"{f}\";
         CREATE TABLE \"{f}\".changes(seq bigserial PRIMARY KEY, tbl text NOT NULL, id text NOT NULL);
         INSERT INTO \"{f}\".changes(tbl, id) VALUES ('items', '7');"
    ))
    .expect("an old change table");
    let db = setup(&s);
    s.execute(&format!("TRUNCATE \"{a}\".items")).expect("truncate");
    assert_eq!(
        kinds(&take(&db, 10)),
        vec![
            ("items".to_owned(), "7".to_owned(), CaptureKind::Row),
            ("items".to_owned(), String::new(), truncate(None)),
        ]
    );
    // Connecting again changes nothing.
    drop(db);
    let _db = setup(&s);
}

/// What an update records: the synced columns it changed, nothing when
/// it changed none; an insert, a delete and a key change record no
/// columns (every column moves). A row trigger of an earlier Ferry (one
/// calling the generic `capture`, which records no columns) is made
/// again by the next start.
#[test]
fn an_update_records_the_synced_columns_it_changed_and_an_earlier_trigger_is_remade() {
    let s = ScratchSchemas::for_test();
    let a = &s.app;
    let f = &s.ferry;
    let db = setup(&s);
    // A table with two synced columns and one the rules leave alone.
    s.execute(&format!(
        "CREATE TABLE \"{a}\".notes (id bigint PRIMARY KEY, title text, body jsonb, hidden text);
         INSERT INTO \"{a}\".items VALUES (1, 'one');"
    ))
    .expect("notes");
    let notes = Table::new("notes")
        .column("title", ColumnType::Text)
        .column("body", ColumnType::Text);
    db.migrate(&Schema::new([items(), docs(), notes]).expect("schema"))
        .expect("migrate");
    take(&db, 100);
    s.execute(&format!(
        "INSERT INTO \"{a}\".notes VALUES (1, 't', '{{\"a\": 1}}', 'h');
         UPDATE \"{a}\".notes SET hidden = 'h2';
         UPDATE \"{a}\".notes SET title = 't', body = '{{\"a\":1}}';
         UPDATE \"{a}\".notes SET body = '{{\"a\": 2}}';
         UPDATE \"{a}\".notes SET title = 'u', hidden = 'h3';
         UPDATE \"{a}\".notes SET id = 2;
         DELETE FROM \"{a}\".notes;"
    ))
    .expect("app writes");
    let got: Vec<(String, Option<Vec<String>>)> = take(&db, 100).into_iter().map(|c| (c.id, c.columns)).collect();
    let cols = |names: &[&str]| Some(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>());
    assert_eq!(
        got,
        vec![
            ("1".to_owned(), None),
            ("1".to_owned(), cols(&["body"])),
            ("1".to_owned(), cols(&["title"])),
            ("1".to_owned(), None),
            ("2".to_owned(), None),
            ("2".to_owned(), None),
        ]
    );

    // An earlier Ferry's row trigger on items: updates record no columns.
    s.execute(&format!(
        "CREATE OR REPLACE TRIGGER \"ferry_capture_{f}\" AFTER INSERT OR UPDATE OR DELETE ON \"{a}\".items \
         FOR EACH ROW EXECUTE FUNCTION \"{f}\".capture('items', 'id');
         UPDATE \"{a}\".items SET name = 'uno';"
    ))
    .expect("old trigger");
    assert_eq!(
        take(&db, 100).into_iter().map(|c| c.columns).collect::<Vec<_>>(),
        vec![None]
    );
    let restarted = setup(&s);
    s.execute(&format!("UPDATE \"{a}\".items SET name = 'eins'"))
        .expect("update");
    assert_eq!(
        take(&restarted, 100).into_iter().map(|c| c.columns).collect::<Vec<_>>(),
        vec![cols(&["name"])]
    );
}
