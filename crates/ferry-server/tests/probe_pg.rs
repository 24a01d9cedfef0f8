//! Ferry in front of PostgreSQL while the app's backend writes the same
//! tables in plain SQL at the same time: changes that race with device
//! writes, keys and owners changed in SQL, transactions that commit out
//! of order. Each test works in its own scratch schemas of the test
//! database (`FERRY_TEST_DATABASE_URL`) and drops them afterwards.

mod common;

use std::mem::ManuallyDrop;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use common::{delete, entry, patch, put, token, upload_req, TestClient, SECRET};
use ferry_core::Value;
use ferry_postgres::scratch::ScratchSchemas;
use ferry_postgres::PgSourceDb;
use ferry_protocol::Outcome;
use ferry_server::{SyncRules, SyncService};
use ferry_transport::SyncHandler;

const RULES: &str = r#"
[[tables]]
name = "items"
columns = [
  { name = "owner", type = "text" },
  { name = "title", type = "text" },
  { name = "status", type = "text" },
]

[[buckets]]
name = "mine"
parameters = ["sub"]
data = [{ table = "items", where = { owner = "sub" } }]

[[permissions]]
table = "items"
insert = "new.owner == auth.sub"
update = "old.owner == auth.sub"
delete = "old.owner == auth.sub"
"#;

fn setup() -> (ScratchSchemas, SyncService) {
    let s = ScratchSchemas::for_test();
    s.execute(&format!(
        "CREATE TABLE \"{}\".items (id text PRIMARY KEY, owner text, title text, status text);",
        s.app
    ))
    .expect("table");
    let db = PgSourceDb::connect(&s.options()).expect("connect");
    let svc = SyncService::builder(Arc::new(db), SyncRules::from_toml(RULES).expect("rules"), SECRET)
        .build()
        .expect("service");
    (s, svc)
}

/// Run `sql` on a connection of its own in another thread (an app
/// transaction that may hold locks a while).
fn in_background(s: &ScratchSchemas, sql: String) -> JoinHandle<Result<(), String>> {
    // The same schemas, not dropped by this copy.
    let app = ManuallyDrop::new(ScratchSchemas {
        url: s.url.clone(),
        app: s.app.clone(),
        ferry: s.ferry.clone(),
    });
    std::thread::spawn(move || app.execute(&sql))
}

fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64
}

async fn upload(svc: &SyncService, user: &str, client: &str, seq0: u64, ops: Vec<ferry_core::CrudOp>) -> Vec<Outcome> {
    let entries = ops
        .into_iter()
        .enumerate()
        .map(|(i, op)| entry(seq0 + i as u64, op, wall_ms(), client))
        .collect();
    let answer = SyncHandler::upload(svc, &token(user), upload_req(client, entries))
        .await
        .expect("upload answered");
    answer.outcomes.into_iter().map(|o| o.outcome).collect()
}

fn item(owner: &str, title: &str, status: &str) -> Vec<(&'static str, Value)> {
    vec![
        ("owner", Value::from(owner)),
        ("title", Value::from(title)),
        ("status", Value::from(status)),
    ]
}

fn db_row(s: &ScratchSchemas, id: &str) -> Vec<Option<String>> {
    let rows = s
        .query(&format!(
            "SELECT owner, title, status FROM \"{}\".items WHERE id = '{id}'",
            s.app
        ))
        .expect("select");
    rows.into_iter().next().unwrap_or_default()
}

/// A SQL transaction updating one column of a row a device updates
/// another column of at the same moment: both changes are kept. (Ferry
/// read the row before the app's transaction committed and wrote every
/// column back, the app's title with it.)
#[tokio::test]
async fn sql_update_concurrent_with_device_update_is_not_lost() {
    let (s, svc) = setup();
    assert_eq!(
        upload(&svc, "ann", "c1", 1, vec![put("items", "x", &item("ann", "a", "open"))]).await,
        vec![Outcome::Applied]
    );
    svc.apply_captured(10).await.expect("capture");
    // The app's transaction changes the title and holds the row a while.
    let sql = in_background(
        &s,
        format!(
            "BEGIN; UPDATE \"{}\".items SET title = 'from sql' WHERE id = 'x'; SELECT pg_sleep(1.5); COMMIT;",
            s.app
        ),
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        upload(
            &svc,
            "ann",
            "c1",
            2,
            vec![patch("items", "x", &[("status", Value::from("done"))])]
        )
        .await,
        vec![Outcome::Applied]
    );
    sql.join().expect("thread").expect("sql");
    svc.apply_captured(10).await.expect("capture");
    assert_eq!(
        db_row(&s, "x"),
        vec![Some("ann".into()), Some("from sql".into()), Some("done".into())],
        "the app's committed title is kept next to the device's status"
    );
    let mut other = TestClient::new("c2");
    other.sync(&svc, &token("ann")).await;
    let row = other
        .rows()
        .get(&("items".to_owned(), "x".to_owned()))
        .cloned()
        .expect("row");
    assert_eq!(row.get("title"), Some(&Value::from("from sql")));
    assert_eq!(row.get("status"), Some(&Value::from("done")));
}

/// The primary key changed in SQL: the old id leaves every device, the
/// new one arrives.
#[tokio::test]
async fn sql_primary_key_change() {
    let (s, svc) = setup();
    upload(&svc, "ann", "c1", 1, vec![put("items", "x", &item("ann", "a", "open"))]).await;
    svc.apply_captured(10).await.expect("capture");
    let mut dev = TestClient::new("c2");
    dev.sync(&svc, &token("ann")).await;
    assert!(dev.rows().contains_key(&("items".to_owned(), "x".to_owned())));
    s.execute(&format!("UPDATE \"{}\".items SET id = 'y' WHERE id = 'x'", s.app))
        .expect("sql");
    svc.apply_captured(10).await.expect("capture");
    dev.sync(&svc, &token("ann")).await;
    let keys: Vec<_> = dev.rows().keys().map(|k| k.1.clone()).collect();
    assert_eq!(keys, vec!["y".to_owned()]);
}

/// Ownership moved in SQL: the row leaves the old owner's devices.
#[tokio::test]
async fn sql_bucket_move_and_delete_reinsert() {
    let (s, svc) = setup();
    upload(&svc, "ann", "c1", 1, vec![put("items", "x", &item("ann", "a", "open"))]).await;
    let mut ann = TestClient::new("c2");
    let mut bob = TestClient::new("c3");
    ann.sync(&svc, &token("ann")).await;
    bob.sync(&svc, &token("bob")).await;
    s.execute(&format!("UPDATE \"{}\".items SET owner = 'bob' WHERE id = 'x'", s.app))
        .expect("sql");
    svc.apply_captured(10).await.expect("capture");
    ann.sync(&svc, &token("ann")).await;
    bob.sync(&svc, &token("bob")).await;
    assert!(ann.rows().is_empty(), "{:?}", ann.rows());
    assert_eq!(bob.rows().len(), 1);
    // Delete and insert again in one transaction, other values.
    s.execute(&format!(
        "BEGIN; DELETE FROM \"{a}\".items WHERE id = 'x'; INSERT INTO \"{a}\".items VALUES ('x', 'ann', 'again', 'new'); COMMIT;",
        a = s.app
    ))
    .expect("sql");
    svc.apply_captured(10).await.expect("capture");
    ann.sync(&svc, &token("ann")).await;
    bob.sync(&svc, &token("bob")).await;
    assert!(bob.rows().is_empty());
    assert_eq!(
        ann.rows()
            .get(&("items".to_owned(), "x".to_owned()))
            .and_then(|r| r.get("title").cloned()),
        Some(Value::from("again"))
    );
    // Device deletes then SQL re-inserts the same id.
    upload(&svc, "ann", "c1", 2, vec![delete("items", "x")]).await;
    s.execute(&format!(
        "INSERT INTO \"{}\".items VALUES ('x', 'ann', 'third', 'n')",
        s.app
    ))
    .expect("sql");
    svc.apply_captured(10).await.expect("capture");
    ann.sync(&svc, &token("ann")).await;
    assert_eq!(
        ann.rows()
            .get(&("items".to_owned(), "x".to_owned()))
            .and_then(|r| r.get("title").cloned()),
        Some(Value::from("third"))
    );
}

/// A long transaction's change committed after later ones were taken.
#[tokio::test]
async fn long_sql_transaction_is_not_skipped() {
    let (s, svc) = setup();
    let sql = in_background(
        &s,
        format!(
            "BEGIN; INSERT INTO \"{}\".items VALUES ('early', 'ann', 't', 's'); SELECT pg_sleep(1.5); COMMIT;",
            s.app
        ),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.execute(&format!(
        "INSERT INTO \"{}\".items VALUES ('late', 'ann', 't', 's')",
        s.app
    ))
    .expect("sql");
    svc.apply_captured(10).await.expect("capture");
    let mut ann = TestClient::new("c2");
    ann.sync(&svc, &token("ann")).await;
    assert_eq!(ann.rows().len(), 1);
    sql.join().expect("thread").expect("sql");
    svc.apply_captured(10).await.expect("capture");
    ann.sync(&svc, &token("ann")).await;
    assert_eq!(ann.rows().len(), 2);
}

/// A `numeric` column synced as `real` that SQL sets beyond `float8`'s
/// range cannot be read as a Ferry value: that row is left out (with a
/// warning), and the changes captured with and after it still reach
/// devices. (The refusal failed every capture batch, so nothing changed
/// in SQL reached any device again.)
#[tokio::test]
async fn a_row_capture_cannot_read_does_not_stop_capture() {
    let s = ScratchSchemas::for_test();
    let a = &s.app;
    s.execute(&format!(
        "CREATE TABLE \"{a}\".readings (id bigint PRIMARY KEY, owner text, value numeric);"
    ))
    .expect("table");
    let rules = r#"
[[tables]]
name = "readings"
columns = [{ name = "owner", type = "text" }, { name = "value", type = "real" }]

[[buckets]]
name = "mine"
parameters = ["sub"]
data = [{ table = "readings", where = { owner = "sub" } }]
"#;
    let db = PgSourceDb::connect(&s.options()).expect("connect");
    let svc = SyncService::builder(Arc::new(db), SyncRules::from_toml(rules).expect("rules"), SECRET)
        .build()
        .expect("service");
    s.execute(&format!(
        "INSERT INTO \"{a}\".readings VALUES (1, 'ann', 1.5), (2, 'ann', 1e400), (3, 'ann', 2.5);"
    ))
    .expect("sql");
    assert_eq!(svc.apply_captured(10).await.expect("capture"), 3);
    let mut dev = TestClient::new("c1");
    dev.sync(&svc, &token("ann")).await;
    let ids: Vec<String> = dev.rows().keys().map(|k| k.1.clone()).collect();
    assert_eq!(ids, vec!["1".to_owned(), "3".to_owned()]);
    // Later changes, the row back in range among them, keep coming.
    s.execute(&format!(
        "INSERT INTO \"{a}\".readings VALUES (4, 'ann', 4); UPDATE \"{a}\".readings SET value = 2 WHERE id = 2;"
    ))
    .expect("sql");
    svc.apply_captured(10).await.expect("capture");
    dev.sync(&svc, &token("ann")).await;
    let ids: Vec<String> = dev.rows().keys().map(|k| k.1.clone()).collect();
    assert_eq!(
        ids,
        vec!["1".to_owned(), "2".to_owned(), "3".to_owned(), "4".to_owned()]
    );
}

/// One SQL transaction inserting thousands of rows for two users, then
/// one moving all of them to one user: each device ends with exactly its
/// rows.
#[tokio::test]
async fn large_sql_transaction_moves_rows_between_users() {
    let (s, svc) = setup();
    let n = 5_000;
    s.execute(&format!(
        "INSERT INTO \"{}\".items SELECT 'r' || g, CASE WHEN g % 2 = 0 THEN 'ann' ELSE 'bob' END, 't', 's' FROM generate_series(1, {n}) g",
        s.app
    ))
    .expect("sql");
    assert_eq!(svc.apply_captured(1000).await.expect("capture"), n);
    let mut ann = TestClient::new("c2");
    ann.sync(&svc, &token("ann")).await;
    assert_eq!(ann.rows().len(), n / 2);
    s.execute(&format!("UPDATE \"{}\".items SET owner = 'bob'", s.app))
        .expect("sql");
    // bob's rows already had him as owner: their updates changed no
    // synced column and were not captured.
    assert_eq!(svc.apply_captured(1000).await.expect("capture"), n / 2);
    ann.sync(&svc, &token("ann")).await;
    assert_eq!(ann.rows().len(), 0);
    let mut bob = TestClient::new("c3");
    bob.sync(&svc, &token("bob")).await;
    assert_eq!(bob.rows().len(), n);
}

/// An app trigger that refuses a row with `RAISE EXCEPTION` (validation
/// in the database) rejects that device write with the trigger's
/// message, as a constraint does; the device's later writes go through.
/// (It was a server error: the device retried the write forever and its
/// queue behind it never reached the server.)
#[tokio::test]
async fn app_trigger_raise_exception_rejects_the_write() {
    let (s, svc) = setup();
    s.execute(&format!(
        "CREATE FUNCTION \"{a}\".check_title() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
           IF NEW.title = '' THEN RAISE EXCEPTION 'an item needs a title'; END IF; RETURN NEW; END $$;
         CREATE TRIGGER check_title BEFORE INSERT OR UPDATE ON \"{a}\".items FOR EACH ROW EXECUTE FUNCTION \"{a}\".check_title();",
        a = s.app
    ))
    .expect("sql");
    let entries = vec![entry(1, put("items", "x", &item("ann", "", "open")), wall_ms(), "c1")];
    let answer = SyncHandler::upload(&svc, &token("ann"), upload_req("c1", entries)).await;
    let outcomes: Vec<Outcome> = answer
        .expect("upload answered")
        .outcomes
        .into_iter()
        .map(|o| o.outcome)
        .collect();
    match &outcomes[..] {
        [Outcome::Rejected { reason }] => assert!(reason.contains("an item needs a title"), "{reason}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        upload(
            &svc,
            "ann",
            "c1",
            2,
            vec![put("items", "y", &item("ann", "fine", "open"))]
        )
        .await,
        vec![Outcome::Applied]
    );
}

/// Values `jsonb` cannot hold, in a column the rules do not name (a
/// `json` column's `"\u0000"` and `1e1000000`), do not fail the app's own
/// inserts, updates and deletes in SQL, and those rows still reach
/// devices. (The capture trigger read the key from the whole row turned
/// into `jsonb`, so the app's write failed: "unsupported Unicode escape
/// sequence", "value overflows numeric format".)
#[tokio::test]
async fn values_jsonb_cannot_hold_do_not_fail_the_apps_writes() {
    let (s, svc) = setup();
    let a = &s.app;
    s.execute(&format!("ALTER TABLE \"{a}\".items ADD COLUMN extra json"))
        .expect("column");
    s.execute(&format!(
        "INSERT INTO \"{a}\".items VALUES ('n', 'ann', 'nul', 'open', '\"\\u0000\"'), \
         ('h', 'ann', 'huge', 'open', '1e1000000'), ('gone', 'ann', 'x', 'open', '\"\\u0000\"')"
    ))
    .expect("the app's insert");
    s.execute(&format!(
        "UPDATE \"{a}\".items SET status = 'done' WHERE id IN ('n', 'h')"
    ))
    .expect("the app's update");
    s.execute(&format!("DELETE FROM \"{a}\".items WHERE id = 'gone'"))
        .expect("the app's delete");
    svc.apply_captured(100).await.expect("capture");
    let mut dev = TestClient::new("c1");
    dev.sync(&svc, &token("ann")).await;
    let status = |id: &str| {
        dev.rows()
            .get(&("items".to_owned(), id.to_owned()))
            .and_then(|r| r.get("status").cloned())
    };
    assert_eq!(status("n"), Some(Value::from("done")));
    assert_eq!(status("h"), Some(Value::from("done")));
    assert_eq!(status("gone"), None);
    // A device's write to such a row goes through too.
    let outcomes = upload(
        &svc,
        "ann",
        "c2",
        1,
        vec![patch("items", "n", &[("title", Value::from("edited"))])],
    )
    .await;
    assert_eq!(outcomes, vec![Outcome::Applied]);
    assert_eq!(db_row(&s, "n")[1].as_deref(), Some("edited"));
}
