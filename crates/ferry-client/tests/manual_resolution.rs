//! Manual conflict resolution, client side: conflicts arrive as synced
//! `ferry_conflicts` rows; resolving one writes the chosen value and closes
//! the conflict in one local transaction.

use std::sync::Arc;

use ferry_client::{conflicts_table, ClientError, Database, Resolution, CONFLICTS_TABLE};
use ferry_core::{row_data, ColumnType, CrudOp, Schema, Table, Value};
use ferry_queue::ServerChanges;
use ferry_store::MemoryStore;

fn db() -> Database {
    let schema = Schema::new([
        Table::new("tickets")
            .column("title", ColumnType::Text)
            .column("status", ColumnType::Text),
        conflicts_table(),
    ])
    .expect("schema");
    Database::open(Arc::new(MemoryStore::new(schema)), Default::default()).expect("open")
}

/// Server data: the ticket as the server has it and one open conflict.
fn seed(db: &Database) {
    let mut changes = ServerChanges::new();
    changes.put_row(
        "tickets",
        "t1",
        row_data([("title", Value::from("B")), ("status", Value::from("pending"))]),
    );
    changes.put_row(
        CONFLICTS_TABLE,
        "bob-client:3:title",
        row_data([
            ("table_name", Value::from("tickets")),
            ("row_id", Value::from("t1")),
            ("field", Value::from("title")),
            ("local_value", Value::from("\"C\"")),
            ("server_value", Value::from("\"B\"")),
            ("base_value", Value::from("\"A\"")),
            ("user_id", Value::from("bob")),
            ("client_id", Value::from("bob-client")),
            ("created_at", Value::from("1700000000000")),
            ("status", Value::from("open")),
        ]),
    );
    changes.put_row(
        CONFLICTS_TABLE,
        "bob-client:1:status",
        row_data([
            ("table_name", Value::from("tickets")),
            ("row_id", Value::from("t1")),
            ("field", Value::from("status")),
            ("local_value", Value::from("\"in_progress\"")),
            ("server_value", Value::from("\"done\"")),
            ("base_value", Value::from("\"pending\"")),
            ("created_at", Value::from("1600000000000")),
            ("status", Value::from("resolved")),
            ("resolution", Value::from("\"done\"")),
        ]),
    );
    db.local().apply_server_changes(changes, None).expect("seed");
}

#[test]
fn open_conflicts_are_read_from_the_synced_table() {
    let db = db();
    seed(&db);
    let open = db.open_conflicts().expect("open conflicts");
    assert_eq!(open.len(), 1, "{open:?}");
    let c = &open[0];
    assert_eq!(c.id, "bob-client:3:title");
    assert_eq!(
        (c.table.as_str(), c.row_id.as_str(), c.field.as_str()),
        ("tickets", "t1", "title")
    );
    assert_eq!(
        (c.local.clone(), c.server.clone(), c.base.clone()),
        ("C".into(), "B".into(), "A".into())
    );
    assert_eq!(c.user_id, "bob");
    assert_eq!(c.created_at, 1_700_000_000_000);
    assert!(c.is_open());
    let all = db.conflicts().expect("all");
    assert_eq!(all.len(), 2);
    assert_eq!(all[0].resolution, Some(Value::from("done")));
}

#[test]
fn resolving_writes_the_value_and_closes_the_conflict_in_one_transaction() {
    for (resolution, expected) in [
        (Resolution::Local, Value::from("C")),
        (Resolution::Server, Value::from("B")),
        (Resolution::Custom(Value::from("B and C")), Value::from("B and C")),
    ] {
        let db = db();
        seed(&db);
        let written = db
            .resolve_conflict("bob-client:3:title", resolution.clone())
            .expect("resolve");
        assert_eq!(written, expected, "{resolution:?}");
        let title = db
            .local()
            .get("tickets", "t1")
            .expect("get")
            .and_then(|r| r.get("title").cloned());
        assert_eq!(title, Some(expected.clone()));
        assert!(db.open_conflicts().expect("open").is_empty());
        let c = db.conflict("bob-client:3:title").expect("get").expect("exists");
        assert_eq!(c.status, "resolved");
        assert_eq!(c.resolution, Some(expected.clone()));

        // The queue holds one transaction: the row (unless it already
        // had the value) and the conflict row.
        let tx = db.local().next_transaction().expect("queue").expect("a transaction");
        let ops: Vec<(String, String)> = tx
            .entries
            .iter()
            .map(|e| (e.op.table().to_owned(), e.op.id().to_owned()))
            .collect();
        let mut want = Vec::new();
        if resolution != Resolution::Server {
            want.push(("tickets".to_owned(), "t1".to_owned()));
        }
        want.push((CONFLICTS_TABLE.to_owned(), "bob-client:3:title".to_owned()));
        assert_eq!(ops, want, "{resolution:?}");
        let patch = tx.entries.last().map(|e| e.op.clone());
        let CrudOp::Patch { data, .. } = patch.expect("patch") else {
            panic!("the conflict row is patched");
        };
        assert_eq!(data.get("status"), Some(&Value::from("resolved")));
        assert_eq!(
            data.get("resolution"),
            Some(&Value::from(serde_json::to_string(&expected).expect("json")))
        );
        assert_eq!(
            db.local().next_batch(100).expect("batch").len(),
            ops.len(),
            "nothing else queued"
        );
    }
}

#[test]
fn resolving_twice_or_an_unknown_conflict_is_an_error_that_writes_nothing() {
    let db = db();
    seed(&db);
    let err = db
        .resolve_conflict("bob-client:1:status", Resolution::Local)
        .expect_err("already resolved");
    assert_eq!(err.to_string(), "conflict \"bob-client:1:status\" is already resolved");
    let err = db.resolve_conflict("nope", Resolution::Server).expect_err("unknown");
    assert_eq!(err.to_string(), "conflict \"nope\" does not exist");
    // A value that does not fit the column.
    let err = db
        .resolve_conflict("bob-client:3:title", Resolution::Custom(Value::from(3)))
        .expect_err("wrong type");
    assert!(matches!(err, ClientError::Queue(_)), "{err:?}");
    assert!(err.to_string().contains("tickets.title"), "{err}");
    assert_eq!(db.local().pending_len().expect("pending"), 0);
    assert_eq!(db.open_conflicts().expect("open").len(), 1);
}

#[test]
fn a_schema_without_the_conflicts_table_gets_a_clear_error() {
    let schema = Schema::new([Table::new("tickets").column("title", ColumnType::Text)]).expect("schema");
    let db = Database::open(Arc::new(MemoryStore::new(schema)), Default::default()).expect("open");
    let err = db.open_conflicts().expect_err("no table");
    assert!(err.to_string().contains("ferry_conflicts"), "{err}");
}
