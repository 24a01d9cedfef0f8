//! PostgreSQL as the source of truth, on the app's own tables: typed
//! columns both ways, values the database refuses, writes made directly in
//! SQL reaching clients, and bad setups refused with a message. Each test
//! works in its own scratch schemas of the test database
//! (`FERRY_TEST_DATABASE_URL`, default the machine's PostgreSQL) and drops
//! them afterwards; a test fails, never skips, when PostgreSQL is down.

mod common;

use std::sync::Arc;

use common::{delete, entry, put, token, upload_req, upload_txs, TestClient, SECRET};
use ferry_core::Value;
use ferry_postgres::scratch::ScratchSchemas;
use ferry_postgres::{PgOptions, PgSourceDb};
use ferry_protocol::Outcome;
use ferry_server::{ServiceError, SyncRules, SyncService};
use ferry_transport::SyncHandler;

const RULES: &str = r#"
[[tables]]
name = "projects"
per_op_outcomes = true
columns = [
  { name = "owner", type = "text" },
  { name = "name", type = "text" },
  { name = "budget", type = "text" },
  { name = "rating", type = "real" },
  { name = "active", type = "integer" },
  { name = "due", type = "text" },
  { name = "updated", type = "text" },
  { name = "meta", type = "text" },
  { name = "logo", type = "blob" },
  { name = "seats", type = "integer" },
]

[[tables]]
name = "tasks"
columns = [
  { name = "owner", type = "text" },
  { name = "title", type = "text" },
]

[[buckets]]
name = "mine"
parameters = ["sub"]
data = [
  { table = "projects", where = { owner = "sub" } },
  { table = "tasks", where = { owner = "sub" } },
]

[[permissions]]
table = "projects"
insert = "new.owner == auth.sub"
update = "old.owner == auth.sub"
delete = "old.owner == auth.sub"

[[permissions]]
table = "tasks"
insert = "new.owner == auth.sub"
update = "old.owner == auth.sub"
delete = "old.owner == auth.sub"
"#;

/// The app's tables as a team would have them: a uuid key, types Ferry
/// maps, constraints, and a column the rules leave alone.
fn app_tables(s: &ScratchSchemas) {
    let a = &s.app;
    s.execute(&format!(
        "CREATE TABLE \"{a}\".projects (
           id uuid PRIMARY KEY,
           owner text NOT NULL,
           name varchar(40) NOT NULL,
           budget numeric(12,2),
           rating double precision,
           active boolean,
           due date,
           updated timestamptz,
           meta jsonb,
           logo bytea,
           seats integer CHECK (seats >= 0),
           internal_note text DEFAULT 'kept by the backend'
         );
         CREATE TABLE \"{a}\".tasks (id bigint PRIMARY KEY, owner text, title text);"
    ))
    .expect("app tables");
}

fn service(s: &ScratchSchemas) -> SyncService {
    service_with(s.options(), RULES)
}

/// A service on PostgreSQL with `options` and the rules in `rules`.
fn service_with(options: PgOptions, rules: &str) -> SyncService {
    let db = PgSourceDb::connect(&options).expect("connect");
    SyncService::builder(Arc::new(db), SyncRules::from_toml(rules).expect("rules"), SECRET)
        .build()
        .expect("service")
}

/// The wall clock in milliseconds (for the clocks of ops uploaded).
fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64
}

const P1: &str = "123e4567-e89b-12d3-a456-426614174000";
const P2: &str = "223e4567-e89b-12d3-a456-426614174000";

fn project(owner: &str, name: &str, seats: i64) -> Vec<(&'static str, Value)> {
    vec![
        ("owner", Value::from(owner)),
        ("name", Value::from(name)),
        ("budget", Value::from("1250.5")),
        ("rating", Value::Real(4.25)),
        ("active", Value::Integer(1)),
        ("due", Value::from("2026-12-24")),
        ("updated", Value::from("2026-11-30T10:00:00+00:00")),
        ("meta", Value::from("{\"tags\":[\"a\"]}")),
        ("logo", Value::Blob(vec![0, 159, 255])),
        ("seats", Value::Integer(seats)),
    ]
}

async fn upload(svc: &SyncService, user: &str, client: &str, ops: Vec<ferry_core::CrudOp>) -> Vec<Outcome> {
    let entries = ops
        .into_iter()
        .enumerate()
        .map(|(i, op)| entry(i as u64 + 1, op, 1_000 + i as u64, client))
        .collect();
    let answer = SyncHandler::upload(svc, &token(user), upload_req(client, entries))
        .await
        .expect("upload answered");
    answer.outcomes.into_iter().map(|o| o.outcome).collect()
}

#[tokio::test]
async fn app_tables_keep_their_types_and_sync_both_ways() {
    let s = ScratchSchemas::for_test();
    app_tables(&s);
    let svc = service(&s);
    let outcomes = upload(
        &svc,
        "ann",
        "c-ann",
        vec![put("projects", P1, &project("ann", "Roof", 3))],
    )
    .await;
    assert_eq!(outcomes, vec![Outcome::Applied]);

    // In PostgreSQL, typed, and the column the rules do not name keeps
    // its default.
    let rows = s
        .query(&format!(
            "SELECT name, budget::text, rating::text, active::text, due::text, meta::text, \
             encode(logo, 'hex'), seats::text, internal_note FROM \"{}\".projects WHERE id = '{P1}'",
            s.app
        ))
        .expect("select");
    let got: Vec<Option<&str>> = rows[0].iter().map(|v| v.as_deref()).collect();
    assert_eq!(
        got,
        vec![
            Some("Roof"),
            Some("1250.50"),
            Some("4.25"),
            Some("true"),
            Some("2026-12-24"),
            Some("{\"tags\": [\"a\"]}"),
            Some("009fff"),
            Some("3"),
            Some("kept by the backend"),
        ]
    );

    // A second device of the same user gets the row as PostgreSQL keeps
    // it (the numeric's scale, jsonb's spacing), so it equals the source.
    let mut other = TestClient::new("c-ann-2");
    other.sync(&svc, &token("ann")).await;
    let row = other
        .rows()
        .get(&("projects".to_owned(), P1.to_owned()))
        .cloned()
        .expect("the project reached the other device");
    assert_eq!(row.get("budget"), Some(&Value::from("1250.50")));
    assert_eq!(row.get("meta"), Some(&Value::from("{\"tags\": [\"a\"]}")));
    assert_eq!(row.get("active"), Some(&Value::Integer(1)));
    assert_eq!(row.get("logo"), Some(&Value::Blob(vec![0, 159, 255])));
    assert_eq!(row.get("updated"), Some(&Value::from("2026-11-30T10:00:00+00:00")));
    let table = svc.rules().schema().table("projects").expect("table").clone();
    let stored = svc.db().get_row(&table, P1).expect("get row").expect("row");
    assert_eq!(stored.data.as_ref(), Some(&row), "the device equals the source");

    // Another user sees nothing of it.
    let mut bob = TestClient::new("c-bob");
    bob.sync(&svc, &token("bob")).await;
    assert!(bob.rows().is_empty());
}

/// One upload whose ops write one table's rows (written together), a row
/// twice, another table's row between them (written on its own), a delete
/// and a row written again after its delete: PostgreSQL ends with every
/// row as the last op wrote it, and a device syncs the same.
#[tokio::test]
async fn an_upload_mixing_tables_rewrites_and_deletes_leaves_each_row_as_its_last_op_wrote_it() {
    let s = ScratchSchemas::for_test();
    app_tables(&s);
    let svc = service(&s);
    let task = |title: &str| vec![("owner", Value::from("ann")), ("title", Value::from(title))];
    let outcomes = upload(
        &svc,
        "ann",
        "c-ann",
        vec![
            put("tasks", "1", &task("first")),
            put("tasks", "5", &task("fifth")),
            put("tasks", "6", &task("sixth")),
            put("tasks", "2", &task("second")),
            put("tasks", "1", &task("first, again")),
            put("projects", P1, &project("ann", "Between", 2)),
            put("tasks", "4", &task("fourth")),
            delete("tasks", "2"),
            put("tasks", "2", &task("second, back")),
            put("tasks", "3", &task("third")),
            delete("tasks", "4"),
            // Given away: it leaves ann's bucket for bob's.
            put(
                "tasks",
                "6",
                &[("owner", Value::from("bob")), ("title", Value::from("sixth"))],
            ),
        ],
    )
    .await;
    assert!(outcomes.iter().all(|o| *o == Outcome::Applied), "{outcomes:?}");
    let (a, f) = (&s.app, &s.ferry);
    let tasks = s
        .query(&format!("SELECT id::text, title FROM \"{a}\".tasks ORDER BY id"))
        .expect("tasks");
    let want = |pairs: &[(&str, &str)]| -> Vec<Vec<Option<String>>> {
        pairs
            .iter()
            .map(|(id, t)| vec![Some((*id).to_owned()), Some((*t).to_owned())])
            .collect()
    };
    assert_eq!(
        tasks,
        want(&[
            ("1", "first, again"),
            ("2", "second, back"),
            ("3", "third"),
            ("5", "fifth"),
            ("6", "sixth")
        ])
    );
    let tombstones = s
        .query(&format!(
            "SELECT id FROM \"{f}\".tombstones WHERE tbl = 'tasks' ORDER BY id"
        ))
        .expect("tombstones");
    assert_eq!(
        tombstones,
        vec![vec![Some("4".to_owned())]],
        "only the row deleted last"
    );
    let clocks = s
        .query(&format!(
            "SELECT id FROM \"{f}\".clocks WHERE tbl = 'tasks' ORDER BY id"
        ))
        .expect("clocks");
    assert_eq!(clocks.len(), 5, "a clock for each row there is: {clocks:?}");
    let memberships = s
        .query(&format!(
            "SELECT id, bucket FROM \"{f}\".row_buckets WHERE tbl = 'tasks' ORDER BY id, bucket"
        ))
        .expect("memberships");
    let ids: Vec<&str> = memberships.iter().filter_map(|r| r[0].as_deref()).collect();
    assert_eq!(ids, vec!["1", "2", "3", "5", "6"], "one bucket each: {memberships:?}");
    let sixth = memberships[4][1].as_deref().unwrap_or_default();
    assert!(sixth.contains("bob"), "task 6 is in bob's bucket only: {memberships:?}");

    let mut other = TestClient::new("c-ann-2");
    other.sync(&svc, &token("ann")).await;
    let titles: Vec<(String, Value)> = other
        .rows()
        .into_iter()
        .filter(|((t, _), _)| t == "tasks")
        .map(|((_, id), row)| (id, row.get("title").cloned().unwrap_or(Value::Null)))
        .collect();
    assert_eq!(
        titles,
        vec![
            ("1".to_owned(), Value::from("first, again")),
            ("2".to_owned(), Value::from("second, back")),
            ("3".to_owned(), Value::from("third")),
            ("5".to_owned(), Value::from("fifth")),
        ]
    );
    assert_eq!(other.rows().len(), 5, "ann's four tasks and the project");
}

#[tokio::test]
async fn a_value_the_database_refuses_rejects_that_op_alone_and_writes_nothing_of_it() {
    let s = ScratchSchemas::for_test();
    app_tables(&s);
    let svc = service(&s);
    let outcomes = upload(
        &svc,
        "ann",
        "c-ann",
        vec![
            put("projects", P1, &project("ann", "Fine", 1)),
            // The CHECK constraint refuses it.
            put("projects", P2, &project("ann", "Negative seats", -1)),
            // Not a uuid: no row of this table can have the id.
            put("projects", "not-a-uuid", &project("ann", "Bad id", 1)),
        ],
    )
    .await;
    assert_eq!(outcomes[0], Outcome::Applied);
    for (o, needle) in outcomes[1..].iter().zip(["seats", "not-a-uuid"]) {
        match o {
            Outcome::Rejected { reason } => {
                assert!(reason.contains("database refused"), "{reason}");
                assert!(reason.contains(needle), "{reason} names {needle}");
            }
            other => panic!("expected a rejection, got {other:?}"),
        }
    }
    let count = s
        .query(&format!("SELECT count(*)::text FROM \"{}\".projects", s.app))
        .expect("count");
    assert_eq!(count[0][0].as_deref(), Some("1"), "only the accepted row is written");
    let mut other = TestClient::new("c-ann-2");
    other.sync(&svc, &token("ann")).await;
    assert_eq!(other.rows().len(), 1, "no op for a refused write");
}

#[tokio::test]
async fn writes_made_in_sql_reach_the_devices_that_should_have_them() {
    let s = ScratchSchemas::for_test();
    app_tables(&s);
    let svc = service(&s);
    let a = &s.app;
    // Ferry's own writes are not captured.
    upload(
        &svc,
        "ann",
        "c-ann",
        vec![put(
            "tasks",
            "1",
            &[("owner", Value::from("ann")), ("title", Value::from("from the app"))],
        )],
    )
    .await;
    let captured = s
        .query(&format!("SELECT count(*)::text FROM \"{}\".changes", s.ferry))
        .expect("changes");
    assert_eq!(captured[0][0].as_deref(), Some("0"), "an upload is not captured again");

    // The backend writes in plain SQL.
    s.execute(&format!(
        "INSERT INTO \"{a}\".tasks VALUES (2, 'ann', 'from the backend'), (3, 'bob', 'for bob');
         UPDATE \"{a}\".tasks SET title = 'renamed in sql' WHERE id = 1;"
    ))
    .expect("backend writes");
    assert_eq!(
        svc.apply_captured(10).await.expect("capture"),
        3,
        "two inserts and an update"
    );
    let mut ann = TestClient::new("c-ann-2");
    ann.sync(&svc, &token("ann")).await;
    let titles: Vec<(String, Option<Value>)> = ann
        .rows()
        .into_iter()
        .map(|((_, id), row)| (id, row.get("title").cloned()))
        .collect();
    assert_eq!(
        titles,
        vec![
            ("1".to_owned(), Some(Value::from("renamed in sql"))),
            ("2".to_owned(), Some(Value::from("from the backend"))),
        ]
    );

    // A row moved to another owner leaves ann's bucket and reaches bob's;
    // a deleted row leaves everywhere.
    s.execute(&format!(
        "UPDATE \"{a}\".tasks SET owner = 'bob' WHERE id = 2; DELETE FROM \"{a}\".tasks WHERE id = 1;"
    ))
    .expect("backend moves and deletes");
    svc.apply_captured(10).await.expect("capture");
    ann.sync(&svc, &token("ann")).await;
    assert!(ann.rows().is_empty(), "{:?}", ann.rows());
    let mut bob = TestClient::new("c-bob");
    bob.sync(&svc, &token("bob")).await;
    let ids: Vec<String> = bob.rows().into_keys().map(|(_, id)| id).collect();
    assert_eq!(ids, vec!["2".to_owned(), "3".to_owned()]);

    // A later device write wins over the backend's earlier one, and the
    // backend's later write wins over the device's.
    s.execute(&format!("UPDATE \"{a}\".tasks SET title = 'backend' WHERE id = 3"))
        .expect("update");
    svc.apply_captured(10).await.expect("capture");
    let now_ms = wall_ms();
    let answer = SyncHandler::upload(
        &svc,
        &token("bob"),
        upload_req(
            "c-bob",
            vec![entry(
                1,
                common::patch("tasks", "3", &[("title", Value::from("device"))]),
                now_ms + 1_000,
                "c-bob",
            )],
        ),
    )
    .await
    .expect("upload");
    assert_eq!(answer.outcomes[0].outcome, Outcome::Applied);
    let title = s
        .query(&format!("SELECT title FROM \"{a}\".tasks WHERE id = 3"))
        .expect("select");
    assert_eq!(title[0][0].as_deref(), Some("device"));
    bob.sync(&svc, &token("bob")).await;
    assert_eq!(
        bob.rows()
            .get(&("tasks".to_owned(), "3".to_owned()))
            .and_then(|r| r.get("title").cloned()),
        Some(Value::from("device"))
    );
    let _ = delete("tasks", "3");
}

#[tokio::test]
async fn bad_setups_are_refused_with_a_message_naming_what_is_wrong() {
    let s = ScratchSchemas::for_test();
    let a = &s.app;
    s.execute(&format!(
        "CREATE TABLE \"{a}\".no_key (id text, owner text);
         CREATE TABLE \"{a}\".two_keys (a text, b text, owner text, PRIMARY KEY (a, b));
         CREATE TABLE \"{a}\".odd_type (id text PRIMARY KEY, owner inet);
         CREATE TABLE \"{a}\".wrong_type (id text PRIMARY KEY, owner integer);
         CREATE TABLE \"{a}\".no_owner (id text PRIMARY KEY, name text);
         CREATE VIEW \"{a}\".a_view AS SELECT id, name AS owner FROM \"{a}\".no_owner;"
    ))
    .expect("tables");
    let rules_for = |table: &str| {
        format!(
            "[[tables]]\nname = \"{table}\"\ncolumns = [{{ name = \"owner\", type = \"text\" }}]\n\
             [[buckets]]\nname = \"all\"\ndata = [{{ table = \"{table}\" }}]\n"
        )
    };
    let cases = [
        ("missing", vec!["missing", "does not exist", "--create-tables"]),
        ("no_key", vec!["no_key", "no primary key"]),
        ("two_keys", vec!["two_keys", "2 columns"]),
        ("odd_type", vec!["odd_type", "owner", "inet"]),
        ("wrong_type", vec!["wrong_type", "owner", "integer"]),
        ("no_owner", vec!["no_owner", "no column owner"]),
        ("a_view", vec!["a_view", "is a view, not a table"]),
    ];
    for (table, needles) in cases {
        let db = PgSourceDb::connect(&s.options()).expect("connect");
        let rules = SyncRules::from_toml(&rules_for(table)).expect("rules");
        let err = SyncService::builder(Arc::new(db), rules, SECRET)
            .build()
            .expect_err(table);
        assert!(matches!(err, ServiceError::Config(_)), "{table}: {err}");
        let msg = err.to_string();
        for n in needles {
            assert!(msg.contains(n), "{table}: {msg:?} names {n:?}");
        }
    }
    // Nothing was created in the app's schema, no trigger added to its
    // tables, and Ferry's own schema, which each refused start made when
    // it connected, is gone again.
    let tables = s
        .query(&format!(
            "SELECT count(*)::text FROM pg_tables WHERE schemaname = '{a}' AND tablename = 'missing'"
        ))
        .expect("pg_tables");
    assert_eq!(tables[0][0].as_deref(), Some("0"));
    let triggers = s
        .query(&format!(
            "SELECT count(*)::text FROM pg_trigger tg JOIN pg_class c ON c.oid = tg.tgrelid \
             JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = '{a}' AND NOT tg.tgisinternal"
        ))
        .expect("pg_trigger");
    assert_eq!(triggers[0][0].as_deref(), Some("0"));
    let ferry = s
        .query(&format!(
            "SELECT count(*)::text FROM pg_namespace WHERE nspname = '{}'",
            s.ferry
        ))
        .expect("pg_namespace");
    assert_eq!(ferry[0][0].as_deref(), Some("0"), "ferry's schema is left behind");

    // A database that does not answer: the message says where and why.
    let err = PgSourceDb::connect(&PgOptions::new("postgres://postgres@127.0.0.1:1/test")).expect_err("no server");
    let msg = err.to_string();
    assert!(msg.contains("127.0.0.1:1"), "{msg}");
    // ... and why: the driver's own message ("error connecting to server")
    // leaves out the reason, which its causes carry.
    assert!(msg.to_lowercase().contains("refused"), "{msg}");
    let err = PgSourceDb::connect(&PgOptions::new("postgres://postgres@127.0.0.1:5432/test").ferry_schema("Bad-Name"))
        .expect_err("bad schema name");
    assert!(err.to_string().contains("Bad-Name"), "{err}");
}

#[tokio::test]
async fn create_tables_makes_the_rules_tables_when_asked() {
    let s = ScratchSchemas::for_test();
    let db = PgSourceDb::connect(&s.options().create_tables(true)).expect("connect");
    let svc = SyncService::builder(Arc::new(db), SyncRules::ticket_tracker().expect("rules"), SECRET)
        .build()
        .expect("service");
    let handler: &dyn SyncHandler = &svc;
    let answer = handler
        .upload(
            &token("ann"),
            upload_req(
                "c1",
                vec![entry(
                    1,
                    put("tickets", "t1", &[("title", Value::from("made"))]),
                    1_000,
                    "c1",
                )],
            ),
        )
        .await
        .expect("upload");
    assert_eq!(answer.outcomes[0].outcome, Outcome::Applied);
    let rows = s
        .query(&format!("SELECT title FROM \"{}\".tickets", s.app))
        .expect("select");
    assert_eq!(rows[0][0].as_deref(), Some("made"));
}

#[tokio::test]
async fn rows_already_in_the_database_reach_devices_after_the_first_pass() {
    let s = ScratchSchemas::for_test();
    app_tables(&s);
    // Rows the backend had before Ferry was ever started (no trigger yet).
    s.execute(&format!(
        "INSERT INTO \"{0}\".tasks SELECT g, CASE WHEN g % 2 = 0 THEN 'ann' ELSE 'bob' END, 'task ' || g \
         FROM generate_series(1, 1200) AS g",
        s.app
    ))
    .expect("existing rows");
    let svc = service(&s);
    assert!(svc.rebucket_due().await.expect("due"));
    let n = svc.rebucket_all().await.expect("pass");
    assert_eq!(n, 1200, "every existing row joined its bucket");
    assert!(!svc.rebucket_due().await.expect("due"));
    let mut ann = TestClient::new("c-ann");
    ann.sync(&svc, &token("ann")).await;
    assert_eq!(ann.rows().len(), 600);
    let table = svc.rules().schema().table("tasks").expect("table").clone();
    let stored = svc.db().get_row(&table, "2").expect("get").expect("row");
    assert_eq!(
        ann.rows().get(&("tasks".to_owned(), "2".to_owned())),
        stored.data.as_ref()
    );
    assert_eq!(
        svc.rebucket_all().await.expect("pass"),
        0,
        "a second pass changes nothing"
    );
}

/// A count of Ferry's bookkeeping rows of `table` (clocks, bucket
/// membership) and of captured changes waiting.
fn bookkeeping(s: &ScratchSchemas, table: &str) -> (String, String, String) {
    let f = &s.ferry;
    let rows = s
        .query(&format!(
            "SELECT (SELECT count(*) FROM \"{f}\".clocks WHERE tbl = '{table}')::text, \
             (SELECT count(DISTINCT id) FROM \"{f}\".row_buckets WHERE tbl = '{table}')::text, \
             (SELECT count(*) FROM \"{f}\".changes)::text"
        ))
        .expect("bookkeeping");
    let v = |i: usize| rows[0][i].clone().unwrap_or_default();
    (v(0), v(1), v(2))
}

fn ids_of(client: &TestClient, table: &str) -> Vec<String> {
    client
        .rows()
        .into_keys()
        .filter(|(t, _)| t == table)
        .map(|(_, id)| id)
        .collect()
}

#[tokio::test]
async fn truncate_in_sql_removes_the_rows_from_devices_and_keeps_the_rows_written_after_it() {
    let s = ScratchSchemas::for_test();
    app_tables(&s);
    let svc = service(&s);
    let a = &s.app;
    let task = |title: &str| vec![("owner", Value::from("ann")), ("title", Value::from(title))];
    upload(&svc, "ann", "c-ann", vec![put("tasks", "1", &task("from a device"))]).await;
    upload(
        &svc,
        "ann",
        "c-ann-p",
        vec![put("projects", P1, &project("ann", "Roof", 3))],
    )
    .await;
    s.execute(&format!(
        "INSERT INTO \"{a}\".tasks VALUES (2, 'ann', 'from the backend'), (3, 'bob', 'for bob')"
    ))
    .expect("backend inserts");
    svc.apply_captured(10).await.expect("capture");
    let mut ann = TestClient::new("c-ann-2");
    ann.sync(&svc, &token("ann")).await;
    assert_eq!(ids_of(&ann, "tasks"), vec!["1", "2"]);
    let mut bob = TestClient::new("c-bob");
    bob.sync(&svc, &token("bob")).await;
    assert_eq!(ids_of(&bob, "tasks"), vec!["3"]);

    // A change captured before the truncate and not taken yet; the
    // truncate with a row inserted again in its own transaction; a row
    // inserted in a later transaction; a row a device writes after it.
    s.execute(&format!("UPDATE \"{a}\".tasks SET title = 'renamed' WHERE id = 3"))
        .expect("update");
    s.execute(&format!(
        "BEGIN; TRUNCATE \"{a}\".tasks; INSERT INTO \"{a}\".tasks VALUES (2, 'ann', 'again, same transaction'); COMMIT;"
    ))
    .expect("truncate");
    s.execute(&format!(
        "INSERT INTO \"{a}\".tasks VALUES (4, 'ann', 'later transaction')"
    ))
    .expect("later insert");
    upload(&svc, "ann", "c-ann-5", vec![put("tasks", "5", &task("device, after"))]).await;
    let waiting = s
        .query(&format!(
            "SELECT count(*)::text FROM \"{}\".changes WHERE truncated",
            s.ferry
        ))
        .expect("changes");
    assert_eq!(waiting[0][0].as_deref(), Some("1"), "one truncate captured");
    assert_eq!(
        svc.apply_captured(10).await.expect("capture"),
        4,
        "the update, the truncate, two inserts"
    );

    ann.sync(&svc, &token("ann")).await;
    let titles: Vec<(String, Option<Value>)> = ann
        .rows()
        .into_iter()
        .filter(|((t, _), _)| t == "tasks")
        .map(|((_, id), row)| (id, row.get("title").cloned()))
        .collect();
    assert_eq!(
        titles,
        vec![
            ("2".to_owned(), Some(Value::from("again, same transaction"))),
            ("4".to_owned(), Some(Value::from("later transaction"))),
            ("5".to_owned(), Some(Value::from("device, after"))),
        ]
    );
    assert_eq!(ids_of(&ann, "projects"), vec![P1], "another table is untouched");
    bob.sync(&svc, &token("bob")).await;
    assert!(bob.rows().is_empty(), "{:?}", bob.rows());
    // A device that starts afresh gets the same.
    let mut fresh = TestClient::new("c-ann-3");
    fresh.sync(&svc, &token("ann")).await;
    assert_eq!(fresh.rows(), ann.rows());

    // Ferry's bookkeeping lists only the rows there are; the truncated
    // rows are tombstones.
    assert_eq!(
        bookkeeping(&s, "tasks"),
        ("3".to_owned(), "3".to_owned(), "0".to_owned())
    );
    let table = svc.rules().schema().table("tasks").expect("table").clone();
    for id in ["1", "3"] {
        let gone = svc.db().get_row(&table, id).expect("get").expect("tombstone");
        assert!(gone.data.is_none() && gone.deleted.is_some(), "{id}: {gone:?}");
    }
    let project = s
        .query(&format!("SELECT count(*)::text FROM \"{a}\".projects"))
        .expect("projects");
    assert_eq!(project[0][0].as_deref(), Some("1"));
}

#[tokio::test]
async fn truncate_of_a_table_larger_than_one_transaction_is_handled_in_several() {
    const ROWS: usize = 1_200;
    const { assert!(ROWS > 2 * ferry_server::MAX_TRUNCATE_ROWS_PER_TX) };
    let s = ScratchSchemas::for_test();
    app_tables(&s);
    let a = &s.app;
    // Rows the backend had before Ferry started, and some it writes after.
    s.execute(&format!(
        "INSERT INTO \"{a}\".tasks SELECT g, CASE WHEN g % 2 = 0 THEN 'ann' ELSE 'bob' END, 'task ' || g \
         FROM generate_series(1, {ROWS}) AS g"
    ))
    .expect("existing rows");
    let svc = service(&s);
    assert_eq!(svc.rebucket_all().await.expect("pass"), ROWS);
    s.execute(&format!(
        "INSERT INTO \"{a}\".tasks SELECT g, 'ann', 'captured ' || g FROM generate_series(5001, 5010) AS g"
    ))
    .expect("captured rows");
    svc.apply_captured(10).await.expect("capture");
    upload(
        &svc,
        "ann",
        "c-ann-p",
        vec![put("projects", P1, &project("ann", "Roof", 3))],
    )
    .await;
    let mut ann = TestClient::new("c-ann");
    ann.sync(&svc, &token("ann")).await;
    assert_eq!(ids_of(&ann, "tasks").len(), ROWS / 2 + 10);

    s.execute(&format!("TRUNCATE \"{a}\".tasks")).expect("truncate");
    // Inserted again after the truncate, in a later transaction: an id
    // Ferry knew of before it.
    s.execute(&format!("INSERT INTO \"{a}\".tasks VALUES (8, 'ann', 'back')"))
        .expect("insert after");
    // One transaction deletes part of the rows, not all.
    assert_eq!(svc.apply_captured(1).await.expect("one step"), 0);
    ann.sync(&svc, &token("ann")).await;
    let left = ids_of(&ann, "tasks").len();
    assert!(
        left > 1 && left < ROWS / 2 + 10,
        "{left} rows left after one transaction"
    );
    // Its progress is in the database, so another server (a new capture
    // leader) goes on where it stopped: the rest, then the insert after it.
    let progress = s
        .query(&format!(
            "SELECT truncate_after FROM \"{}\".changes WHERE truncated",
            s.ferry
        ))
        .expect("progress");
    assert!(matches!(progress.as_slice(), [row] if row[0].is_some()), "{progress:?}");
    let svc = service(&s);
    assert_eq!(
        svc.apply_captured(100).await.expect("the rest"),
        2,
        "the truncate and the insert"
    );
    ann.sync(&svc, &token("ann")).await;
    assert_eq!(ids_of(&ann, "tasks"), vec!["8"]);
    assert_eq!(ids_of(&ann, "projects"), vec![P1], "another table is untouched");
    let mut bob = TestClient::new("c-bob");
    bob.sync(&svc, &token("bob")).await;
    assert!(bob.rows().is_empty());
    assert_eq!(
        bookkeeping(&s, "tasks"),
        ("1".to_owned(), "1".to_owned(), "0".to_owned())
    );
}

#[tokio::test]
async fn truncate_of_an_unsynced_table_changes_nothing() {
    let s = ScratchSchemas::for_test();
    app_tables(&s);
    let a = &s.app;
    s.execute(&format!(
        "CREATE TABLE \"{a}\".audit (id bigint PRIMARY KEY, note text);
         INSERT INTO \"{a}\".audit VALUES (1, 'kept by the backend'), (2, 'also');"
    ))
    .expect("an unsynced table");
    let svc = service(&s);
    upload(
        &svc,
        "ann",
        "c-ann",
        vec![put(
            "tasks",
            "1",
            &[("owner", Value::from("ann")), ("title", Value::from("t"))],
        )],
    )
    .await;
    let ops = svc.db().oplog_len().expect("op log");
    s.execute(&format!("TRUNCATE \"{a}\".audit")).expect("truncate");
    assert_eq!(bookkeeping(&s, "tasks").2, "0", "nothing captured");
    assert_eq!(svc.apply_captured(10).await.expect("capture"), 0);
    assert_eq!(svc.db().oplog_len().expect("op log"), ops);
    // A synced table Ferry knows no row of: captured, nothing to delete.
    s.execute(&format!("TRUNCATE \"{a}\".projects")).expect("truncate");
    assert_eq!(svc.apply_captured(10).await.expect("capture"), 1);
    assert_eq!(svc.db().oplog_len().expect("op log"), ops);
    let mut ann = TestClient::new("c-ann-2");
    ann.sync(&svc, &token("ann")).await;
    assert_eq!(ids_of(&ann, "tasks"), vec!["1"]);
}

/// An upload's writes go to PostgreSQL together, yet each op still gets
/// the row as PostgreSQL keeps it: a `BEFORE` trigger of the app that
/// changes the row reaches the devices, and ops after a refused one in
/// the same upload apply (the refused one alone is rejected).
#[tokio::test]
async fn rows_an_app_trigger_changes_reach_devices_and_a_refusal_stays_the_ops_own() {
    let s = ScratchSchemas::for_test();
    app_tables(&s);
    let a = &s.app;
    s.execute(&format!(
        "CREATE FUNCTION \"{a}\".shout() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN NEW.title := upper(NEW.title); RETURN NEW; END $$;
         CREATE TRIGGER shout BEFORE INSERT OR UPDATE ON \"{a}\".tasks
           FOR EACH ROW EXECUTE FUNCTION \"{a}\".shout();"
    ))
    .expect("app trigger");
    let svc = service(&s);
    let task = |title: &str| vec![("owner", Value::from("ann")), ("title", Value::from(title))];
    // Nothing refused: the ops' writes go together.
    let ops = (1..=10)
        .map(|i| put("tasks", &i.to_string(), &task(&format!("task {i}"))))
        .collect();
    let outcomes = upload(&svc, "ann", "c-ann", ops).await;
    assert_eq!(outcomes, vec![Outcome::Applied; 10]);
    // A refusal in the middle of the next upload.
    let mut ops: Vec<ferry_core::CrudOp> = (11..=20)
        .map(|i| put("tasks", &i.to_string(), &task(&format!("task {i}"))))
        .collect();
    // Refused by the CHECK constraint.
    ops.insert(5, put("projects", P2, &project("ann", "Negative seats", -1)));
    ops.push(put("projects", P1, &project("ann", "Fine", 2)));
    let outcomes = upload(&svc, "ann", "c-ann-b", ops).await;
    assert_eq!(outcomes.len(), 12);
    for (i, o) in outcomes.iter().enumerate() {
        if i == 5 {
            assert!(
                matches!(o, Outcome::Rejected { reason } if reason.contains("seats")),
                "op {i}: {o:?}"
            );
        } else {
            assert_eq!(o, &Outcome::Applied, "op {i}");
        }
    }
    let mut other = TestClient::new("c-ann-2");
    other.sync(&svc, &token("ann")).await;
    for i in 1..=20 {
        let row = other
            .rows()
            .get(&("tasks".to_owned(), i.to_string()))
            .cloned()
            .unwrap_or_else(|| panic!("task {i} reached the other device"));
        assert_eq!(row.get("title"), Some(&Value::from(format!("TASK {i}"))), "task {i}");
    }
    assert!(other.rows().contains_key(&("projects".to_owned(), P1.to_owned())));
    assert!(!other.rows().contains_key(&("projects".to_owned(), P2.to_owned())));
    let count = s
        .query(&format!(
            "SELECT count(*)::text FROM \"{a}\".tasks WHERE title LIKE 'TASK %'"
        ))
        .expect("count");
    assert_eq!(count[0][0].as_deref(), Some("20"));
}

/// Rules for one table `name` (columns `t`, `o`) in one bucket, writable
/// by anyone.
fn one_table_rules(name: &str, columns: &str) -> String {
    format!(
        "[[tables]]\nname = \"{name}\"\ncolumns = [{columns}]\n\
         [[buckets]]\nname = \"all\"\ndata = [{{ table = \"{name}\" }}]\n\
         [[permissions]]\ntable = \"{name}\"\ninsert = \"true\"\nupdate = \"true\"\ndelete = \"true\"\n"
    )
}

#[tokio::test]
async fn tables_named_like_the_words_of_ferry_s_own_statements_sync_like_any_other() {
    // `i` and `k` name the ids in Ferry's lookups, `excluded` the row an
    // ON CONFLICT update takes: a table of that name took their place
    // (every row read as another's, truncated rows kept, uploads failed).
    for name in ["i", "k", "excluded"] {
        let s = ScratchSchemas::for_test();
        let a = &s.app;
        s.execute(&format!(
            "CREATE TABLE \"{a}\".\"{name}\" (id text PRIMARY KEY, t text, o text);
             INSERT INTO \"{a}\".\"{name}\" VALUES ('a', 'ta', 'oa'), ('b', 'tb', 'ob');"
        ))
        .expect("app table");
        let rules = one_table_rules(
            name,
            "{ name = \"t\", type = \"text\" }, { name = \"o\", type = \"text\" }",
        );
        let svc = service_with(s.options(), &rules);
        svc.rebucket_all().await.expect("pass");
        // After the pass's clocks of the existing rows.
        let now_ms = wall_ms();
        let ops = [
            common::patch(name, "b", &[("t", Value::from("patched"))]),
            put(name, "c", &[("t", Value::from("tc")), ("o", Value::from("oc"))]),
        ];
        let entries = ops
            .into_iter()
            .enumerate()
            .map(|(i, op)| entry(i as u64 + 1, op, now_ms + 1_000 + i as u64, "c-ann"))
            .collect();
        let answer = SyncHandler::upload(&svc, &token("ann"), upload_req("c-ann", entries))
            .await
            .expect("upload answered");
        let outcomes: Vec<Outcome> = answer.outcomes.into_iter().map(|o| o.outcome).collect();
        assert_eq!(outcomes, vec![Outcome::Applied, Outcome::Applied], "{name}");
        let mut ann = TestClient::new("c-ann-2");
        ann.sync(&svc, &token("ann")).await;
        let rows: Vec<(String, Option<Value>, Option<Value>)> = ann
            .rows()
            .into_iter()
            .map(|((_, id), row)| (id, row.get("t").cloned(), row.get("o").cloned()))
            .collect();
        let row = |id: &str, t: &str, o: &str| (id.to_owned(), Some(Value::from(t)), Some(Value::from(o)));
        assert_eq!(
            rows,
            vec![row("a", "ta", "oa"), row("b", "patched", "ob"), row("c", "tc", "oc")],
            "{name}"
        );
        let stored = s
            .query(&format!("SELECT id, t, o FROM \"{a}\".\"{name}\" ORDER BY id"))
            .expect("select");
        assert_eq!(stored.len(), 3, "{name}: {stored:?}");
        assert_eq!(stored[1][1].as_deref(), Some("patched"), "{name}: {stored:?}");

        // A truncate and a reload: only the reloaded row stays.
        s.execute(&format!(
            "TRUNCATE \"{a}\".\"{name}\"; INSERT INTO \"{a}\".\"{name}\" VALUES ('z', 'tz', 'oz');"
        ))
        .expect("truncate");
        svc.apply_captured(10).await.expect("capture");
        ann.sync(&svc, &token("ann")).await;
        let ids: Vec<String> = ann.rows().into_keys().map(|(_, id)| id).collect();
        assert_eq!(ids, vec!["z".to_owned()], "{name}");
    }
}

#[tokio::test]
async fn generated_columns_are_refused_at_start_and_an_identity_key_takes_the_devices_ids() {
    let s = ScratchSchemas::for_test();
    let a = &s.app;
    s.execute(&format!(
        "CREATE TABLE \"{a}\".lines (id text PRIMARY KEY, n bigint, twice bigint GENERATED ALWAYS AS (n * 2) STORED);
         CREATE TABLE \"{a}\".orders (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, t text);"
    ))
    .expect("app tables");
    // Ferry writes every column the rules name: a generated one would
    // fail every write to its table (a 500 the device retries forever).
    let db = PgSourceDb::connect(&s.options()).expect("connect");
    let rules = one_table_rules(
        "lines",
        "{ name = \"n\", type = \"integer\" }, { name = \"twice\", type = \"integer\" }",
    );
    let Err(err) = SyncService::builder(Arc::new(db), SyncRules::from_toml(&rules).expect("rules"), SECRET).build()
    else {
        panic!("a generated column in the rules was taken");
    };
    assert!(matches!(err, ServiceError::Config(_)), "{err}");
    let msg = err.to_string();
    for needle in ["lines", "twice", "generated"] {
        assert!(msg.contains(needle), "{msg:?} names {needle:?}");
    }

    // An identity key takes the ids devices give, and rows the backend
    // made can be changed by devices.
    let rules = one_table_rules("orders", "{ name = \"t\", type = \"text\" }");
    let svc = service_with(s.options(), &rules);
    s.execute(&format!("INSERT INTO \"{a}\".orders(t) VALUES ('from the backend')"))
        .expect("backend insert");
    svc.apply_captured(10).await.expect("capture");
    let now_ms = wall_ms();
    let entries = vec![
        entry(
            1,
            common::patch("orders", "1", &[("t", Value::from("patched"))]),
            now_ms + 1_000,
            "c-ann",
        ),
        entry(
            2,
            put("orders", "1000", &[("t", Value::from("from a device"))]),
            now_ms + 1_001,
            "c-ann",
        ),
    ];
    let answer = SyncHandler::upload(&svc, &token("ann"), upload_req("c-ann", entries))
        .await
        .expect("upload answered");
    let outcomes: Vec<Outcome> = answer.outcomes.into_iter().map(|o| o.outcome).collect();
    assert_eq!(outcomes, vec![Outcome::Applied, Outcome::Applied]);
    let rows = s
        .query(&format!("SELECT id::text, t FROM \"{a}\".orders ORDER BY id"))
        .expect("select");
    assert_eq!(
        rows,
        vec![
            vec![Some("1".to_owned()), Some("patched".to_owned())],
            vec![Some("1000".to_owned()), Some("from a device".to_owned())],
        ]
    );
}

#[tokio::test]
async fn a_char_key_row_changed_in_sql_stays_one_row_on_devices() {
    let s = ScratchSchemas::for_test();
    let a = &s.app;
    s.execute(&format!("CREATE TABLE \"{a}\".codes (id char(5) PRIMARY KEY, t text)"))
        .expect("app table");
    let rules = one_table_rules("codes", "{ name = \"t\", type = \"text\" }");
    let svc = service_with(s.options(), &rules);
    let outcomes = upload(
        &svc,
        "ann",
        "c-ann",
        vec![put("codes", "ab", &[("t", Value::from("from a device"))])],
    )
    .await;
    assert_eq!(outcomes, vec![Outcome::Applied]);
    // The same row to PostgreSQL (char(n) ignores trailing spaces):
    // refused, not a second row id for it.
    let outcomes = upload(
        &svc,
        "ann",
        "c-ann-3",
        vec![put("codes", "ab ", &[("t", Value::from("padded"))])],
    )
    .await;
    match &outcomes[0] {
        Outcome::Rejected { reason } => assert!(reason.contains("\"ab \""), "{reason}"),
        other => panic!("expected a rejection, got {other:?}"),
    }
    // The backend changes the row and adds one: the trigger sees the keys
    // padded ("ab   "), devices keep the ids they know.
    s.execute(&format!(
        "UPDATE \"{a}\".codes SET t = 'from the backend'; INSERT INTO \"{a}\".codes VALUES ('cd', 'new')"
    ))
    .expect("backend writes");
    svc.apply_captured(10).await.expect("capture");
    let mut ann = TestClient::new("c-ann-2");
    ann.sync(&svc, &token("ann")).await;
    let rows: Vec<(String, Option<Value>)> = ann
        .rows()
        .into_iter()
        .map(|((_, id), row)| (id, row.get("t").cloned()))
        .collect();
    assert_eq!(
        rows,
        vec![
            ("ab".to_owned(), Some(Value::from("from the backend"))),
            ("cd".to_owned(), Some(Value::from("new"))),
        ]
    );
    // A delete in SQL removes it.
    s.execute(&format!("DELETE FROM \"{a}\".codes WHERE id = 'ab'"))
        .expect("delete");
    svc.apply_captured(10).await.expect("capture");
    ann.sync(&svc, &token("ann")).await;
    let ids: Vec<String> = ann.rows().into_keys().map(|(_, id)| id).collect();
    assert_eq!(ids, vec!["cd".to_owned()]);
}

#[tokio::test]
async fn rows_an_app_trigger_changes_on_a_device_write_reach_devices() {
    let s = ScratchSchemas::for_test();
    let a = &s.app;
    s.execute(&format!(
        "CREATE TABLE \"{a}\".lists (id text PRIMARY KEY, summary text);
         CREATE TABLE \"{a}\".items (id text PRIMARY KEY, list text);
         CREATE FUNCTION \"{a}\".summarize() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
           UPDATE \"{a}\".lists SET summary = (SELECT count(*) FROM \"{a}\".items WHERE list = NEW.list) || ' items'
             WHERE id = NEW.list;
           RETURN NULL; END $$;
         CREATE TRIGGER summarize AFTER INSERT ON \"{a}\".items
           FOR EACH ROW EXECUTE FUNCTION \"{a}\".summarize();"
    ))
    .expect("app tables");
    let rules = "[[tables]]\nname = \"lists\"\ncolumns = [{ name = \"summary\", type = \"text\" }]\n\
        [[tables]]\nname = \"items\"\ncolumns = [{ name = \"list\", type = \"text\" }]\n\
        [[buckets]]\nname = \"all\"\ndata = [{ table = \"lists\" }, { table = \"items\" }]\n"
        .to_owned()
        + &["lists", "items"]
            .map(|t| {
                format!("[[permissions]]\ntable = \"{t}\"\ninsert = \"true\"\nupdate = \"true\"\ndelete = \"true\"\n")
            })
            .concat();
    let svc = service_with(s.options(), &rules);
    let now_ms = wall_ms();
    let list = |v: &str| vec![("list", Value::from(v))];
    let entries = vec![
        entry(
            1,
            put("lists", "l1", &[("summary", Value::from("new"))]),
            now_ms,
            "c-ann",
        ),
        entry(2, put("items", "i1", &list("l1")), now_ms + 1, "c-ann"),
    ];
    let answer = SyncHandler::upload(&svc, &token("ann"), upload_req("c-ann", entries))
        .await
        .expect("upload answered");
    assert!(
        answer.outcomes.iter().all(|o| o.outcome == Outcome::Applied),
        "{answer:?}"
    );
    svc.apply_captured(10).await.expect("capture");
    let mut bob = TestClient::new("c-bob");
    bob.sync(&svc, &token("bob")).await;
    // The app's trigger summarized the list as the item came (a change
    // made in Ferry's transaction, but not by Ferry).
    assert_eq!(
        bob.rows()
            .get(&("lists".to_owned(), "l1".to_owned()))
            .and_then(|r| r.get("summary").cloned()),
        Some(Value::from("1 items")),
        "{:?}",
        bob.rows()
    );
}

/// A device deletes a row other rows reference through foreign keys with
/// actions: PostgreSQL deletes the referencing rows (`ON DELETE CASCADE`,
/// two levels deep, and down a tree of rows of the same table) and clears
/// a reference (`ON DELETE SET NULL`) in the device's write. Those rows change in the database, not by Ferry's
/// statements: they reach devices as any change made in the database.
#[tokio::test]
async fn rows_a_foreign_key_action_changes_on_a_device_delete_reach_devices() {
    let s = ScratchSchemas::for_test();
    let a = &s.app;
    s.execute(&format!(
        "CREATE TABLE \"{a}\".lists (id text PRIMARY KEY, title text);
         CREATE TABLE \"{a}\".items (id text PRIMARY KEY, list text REFERENCES \"{a}\".lists(id) ON DELETE CASCADE);
         CREATE TABLE \"{a}\".marks (id text PRIMARY KEY, item text REFERENCES \"{a}\".items(id) ON DELETE CASCADE);
         CREATE TABLE \"{a}\".notes (id text PRIMARY KEY, list text REFERENCES \"{a}\".lists(id) ON DELETE SET NULL);
         CREATE TABLE \"{a}\".folders (id text PRIMARY KEY, parent text REFERENCES \"{a}\".folders(id) ON DELETE CASCADE);"
    ))
    .expect("app tables");
    let table = |name: &str, column: &str| {
        format!(
            "[[tables]]\nname = \"{name}\"\ncolumns = [{{ name = \"{column}\", type = \"text\" }}]\n\
             [[permissions]]\ntable = \"{name}\"\ninsert = \"true\"\nupdate = \"true\"\ndelete = \"true\"\n"
        )
    };
    let rules = [
        table("lists", "title"),
        table("items", "list"),
        table("marks", "item"),
        table("notes", "list"),
        table("folders", "parent"),
        "[[buckets]]\nname = \"all\"\ndata = [{ table = \"lists\" }, { table = \"items\" }, { table = \"marks\" }, \
         { table = \"notes\" }, { table = \"folders\" }]\n"
            .to_owned(),
    ]
    .concat();
    let svc = service_with(s.options(), &rules);
    let now_ms = wall_ms();
    fn col<'a>(name: &'a str, v: &str) -> Vec<(&'a str, Value)> {
        vec![(name, Value::from(v))]
    }
    let entries = vec![
        entry(1, put("lists", "l1", &col("title", "groceries")), now_ms, "c-ann"),
        entry(2, put("lists", "l2", &col("title", "chores")), now_ms + 1, "c-ann"),
        entry(3, put("items", "i1", &col("list", "l1")), now_ms + 2, "c-ann"),
        entry(4, put("items", "i2", &col("list", "l2")), now_ms + 3, "c-ann"),
        entry(5, put("marks", "m1", &col("item", "i1")), now_ms + 4, "c-ann"),
        entry(6, put("notes", "n1", &col("list", "l1")), now_ms + 5, "c-ann"),
        entry(7, put("folders", "f1", &[]), now_ms + 6, "c-ann"),
        entry(8, put("folders", "f2", &col("parent", "f1")), now_ms + 7, "c-ann"),
        entry(9, put("folders", "f3", &col("parent", "f2")), now_ms + 8, "c-ann"),
        entry(10, put("folders", "f4", &[]), now_ms + 9, "c-ann"),
    ];
    let answer = SyncHandler::upload(&svc, &token("ann"), upload_req("c-ann", entries))
        .await
        .expect("upload answered");
    assert!(
        answer.outcomes.iter().all(|o| o.outcome == Outcome::Applied),
        "{answer:?}"
    );
    svc.apply_captured(10).await.expect("capture");
    let mut bob = TestClient::new("c-bob");
    bob.sync(&svc, &token("bob")).await;
    assert_eq!(bob.rows().len(), 10, "{:?}", bob.rows());

    let answer = SyncHandler::upload(
        &svc,
        &token("ann"),
        upload_txs(
            "c-ann",
            vec![
                (11, vec![entry(11, delete("lists", "l1"), now_ms + 10, "c-ann")]),
                (12, vec![entry(12, delete("folders", "f1"), now_ms + 11, "c-ann")]),
            ],
        ),
    )
    .await
    .expect("delete answered");
    assert!(
        answer.outcomes.iter().all(|o| o.outcome == Outcome::Applied),
        "{answer:?}"
    );
    // Captured: the rows the actions changed, not the rows Ferry deleted.
    let captured = s
        .query(&format!(
            "SELECT tbl || '/' || id FROM \"{}\".changes ORDER BY tbl, id",
            s.ferry
        ))
        .expect("changes");
    let captured: Vec<&str> = captured.iter().filter_map(|r| r[0].as_deref()).collect();
    assert_eq!(
        captured,
        ["folders/f2", "folders/f3", "items/i1", "marks/m1", "notes/n1"]
    );
    svc.apply_captured(10).await.expect("capture");
    bob.sync(&svc, &token("bob")).await;
    let mut ids: Vec<(String, String)> = bob.rows().into_keys().collect();
    ids.sort();
    let key = |t: &str, id: &str| (t.to_owned(), id.to_owned());
    assert_eq!(
        ids,
        vec![
            key("folders", "f4"),
            key("items", "i2"),
            key("lists", "l2"),
            key("notes", "n1")
        ],
        "the list's items and their marks, the folder's subfolders, are gone on devices too"
    );
    assert_eq!(
        bob.rows().get(&key("notes", "n1")).and_then(|r| r.get("list").cloned()),
        Some(Value::Null),
        "the note's reference is cleared on devices too"
    );
}

/// A partitioned synced table: rows inserted into it reach devices
/// (row triggers reach its partitions), and a `TRUNCATE` of one partition
/// (which fires no trigger of the parent) removes that partition's rows
/// from devices and keeps the others.
#[tokio::test]
async fn truncate_of_one_partition_removes_its_rows_from_devices() {
    let s = ScratchSchemas::for_test();
    let a = &s.app;
    s.execute(&format!(
        "CREATE TABLE \"{a}\".events (id text PRIMARY KEY, name text) PARTITION BY RANGE (id);
         CREATE TABLE \"{a}\".events_early PARTITION OF \"{a}\".events FOR VALUES FROM ('a') TO ('m');
         CREATE TABLE \"{a}\".events_late PARTITION OF \"{a}\".events FOR VALUES FROM ('m') TO ('zzzz');"
    ))
    .expect("partitioned table");
    let rules = "[[tables]]\nname = \"events\"\ncolumns = [{ name = \"name\", type = \"text\" }]\n\
        [[buckets]]\nname = \"all\"\ndata = [{ table = \"events\" }]\n";
    let svc = service_with(s.options(), rules);
    s.execute(&format!(
        "INSERT INTO \"{a}\".events VALUES ('b1', 'early'), ('c1', 'early'), ('n1', 'late')"
    ))
    .expect("backend inserts");
    svc.apply_captured(10).await.expect("capture");
    let mut bob = TestClient::new("c-bob");
    bob.sync(&svc, &token("bob")).await;
    let ids = |c: &TestClient| {
        let mut ids: Vec<String> = c.rows().into_keys().map(|(_, id)| id).collect();
        ids.sort();
        ids
    };
    assert_eq!(ids(&bob), ["b1", "c1", "n1"]);

    s.execute(&format!("TRUNCATE \"{a}\".events_early"))
        .expect("truncate a partition");
    svc.apply_captured(10).await.expect("capture");
    bob.sync(&svc, &token("bob")).await;
    assert_eq!(ids(&bob), ["n1"], "the truncated partition's rows are gone on devices");
}

/// The app's tables in a schema whose name needs quoting (mixed case, a
/// space): Ferry starts on it, and rows sync both ways. A schema name no
/// PostgreSQL schema can have is refused, naming it.
#[tokio::test]
async fn an_app_schema_with_a_name_that_needs_quoting_syncs() {
    let s = ScratchSchemas::for_test();
    let schema = format!("My App {}", s.app);
    s.execute(&format!(
        "CREATE SCHEMA \"{schema}\"; CREATE TABLE \"{schema}\".\"Notes\" (id text PRIMARY KEY, body text);"
    ))
    .expect("app schema");
    struct DropSchema<'a>(&'a ScratchSchemas, String);
    impl Drop for DropSchema<'_> {
        fn drop(&mut self) {
            let _ = self.0.execute(&format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", self.1));
        }
    }
    let _cleanup = DropSchema(&s, schema.clone());
    let rules = "[[tables]]\nname = \"Notes\"\ncolumns = [{ name = \"body\", type = \"text\" }]\n\
        [[buckets]]\nname = \"all\"\ndata = [{ table = \"Notes\" }]\n\
        [[permissions]]\ntable = \"Notes\"\ninsert = \"true\"\nupdate = \"true\"\ndelete = \"true\"\n";
    let svc = service_with(s.options().app_schema(&schema), rules);
    let now_ms = wall_ms();
    let answer = SyncHandler::upload(
        &svc,
        &token("ann"),
        upload_req(
            "c-ann",
            vec![entry(
                1,
                put("Notes", "n1", &[("body", Value::from("from a device"))]),
                now_ms,
                "c-ann",
            )],
        ),
    )
    .await
    .expect("upload");
    assert_eq!(answer.outcomes[0].outcome, Outcome::Applied, "{answer:?}");
    s.execute(&format!(
        "INSERT INTO \"{schema}\".\"Notes\" VALUES ('n2', 'from the backend')"
    ))
    .expect("backend insert");
    svc.apply_captured(10).await.expect("capture");
    let mut bob = TestClient::new("c-bob");
    bob.sync(&svc, &token("bob")).await;
    let mut ids: Vec<String> = bob.rows().into_keys().map(|(_, id)| id).collect();
    ids.sort();
    assert_eq!(ids, ["n1", "n2"]);

    for bad in ["", "nul\0byte", &"x".repeat(64)] {
        let Err(e) = PgSourceDb::connect(&s.options().app_schema(bad)) else {
            panic!("app schema {bad:?} taken");
        };
        assert!(e.to_string().contains("not a usable schema name"), "{e}");
    }
}

/// The name of project P1 on a fresh device of ann's.
async fn synced_project(svc: &SyncService, client: &str) -> ferry_core::RowData {
    let mut device = TestClient::new(client);
    device.sync(svc, &token("ann")).await;
    device
        .rows()
        .remove(&("projects".to_owned(), P1.to_owned()))
        .expect("ann's project on her device")
}

/// A device edits one column offline; meanwhile the backend changes
/// another column in SQL, touches only a column the rules leave alone, or
/// sets a column to the value it holds. When the device's edit arrives
/// (its clock older than the backend's writes), it wins its column, as
/// column-level last-write-wins promises between devices: the backend's
/// write moved only the clocks of the columns it changed. It used to give
/// every column the server's clock, so the device's edit was dropped
/// ("newer writes kept") although nobody else had changed that column.
#[tokio::test]
async fn an_offline_edit_of_one_column_survives_a_later_sql_write_of_another() {
    let s = ScratchSchemas::for_test();
    app_tables(&s);
    let svc = service(&s);
    let a = &s.app;
    let t0 = wall_ms();
    let created = SyncHandler::upload(
        &svc,
        &token("ann"),
        upload_req(
            "c-ann",
            vec![entry(1, put("projects", P1, &project("ann", "orig", 3)), t0, "c-ann")],
        ),
    )
    .await
    .expect("create");
    assert_eq!(created.outcomes[0].outcome, Outcome::Applied);
    let changes = || {
        s.query(&format!("SELECT count(*)::text FROM \"{}\".changes", s.ferry))
            .expect("changes")[0][0]
            .clone()
    };

    // Touching a column the rules do not name, or writing a value as it
    // was, captures nothing.
    s.execute(&format!(
        "UPDATE \"{a}\".projects SET internal_note = 'audited'; UPDATE \"{a}\".projects SET name = name, seats = 3;"
    ))
    .expect("no-op updates");
    assert_eq!(changes().as_deref(), Some("0"), "nothing synced changed");

    // The backend changes seats (after the device's offline edit below).
    std::thread::sleep(std::time::Duration::from_millis(20));
    s.execute(&format!("UPDATE \"{a}\".projects SET seats = 9"))
        .expect("backend write");
    assert_eq!(svc.apply_captured(10).await.expect("capture"), 1);

    // The device's edit of the name, made offline at t0 + 10 ms, before
    // the backend's write, arrives now.
    let edited = SyncHandler::upload(
        &svc,
        &token("ann"),
        upload_req(
            "c-ann",
            vec![entry(
                2,
                common::patch("projects", P1, &[("name", Value::from("renamed offline"))]),
                t0 + 10,
                "c-ann",
            )],
        ),
    )
    .await
    .expect("offline edit");
    assert_eq!(
        edited.outcomes[0].outcome,
        Outcome::Applied,
        "the name was not changed by anyone else"
    );
    let row = synced_project(&svc, "c-ann-2").await;
    assert_eq!(row.get("name"), Some(&Value::from("renamed offline")), "{row:?}");
    assert_eq!(row.get("seats"), Some(&Value::Integer(9)), "{row:?}");
    let stored = s
        .query(&format!(
            "SELECT name, seats::text, internal_note FROM \"{a}\".projects WHERE id = '{P1}'"
        ))
        .expect("select");
    assert_eq!(
        stored[0],
        vec![
            Some("renamed offline".to_owned()),
            Some("9".to_owned()),
            Some("audited".to_owned())
        ]
    );

    // The backend's write of the name itself, after the device's, wins
    // over a device edit older than it.
    s.execute(&format!("UPDATE \"{a}\".projects SET name = 'backend name'"))
        .expect("backend rename");
    assert_eq!(svc.apply_captured(10).await.expect("capture"), 1);
    let stale = SyncHandler::upload(
        &svc,
        &token("ann"),
        upload_req(
            "c-ann",
            vec![entry(
                3,
                common::patch("projects", P1, &[("name", Value::from("stale"))]),
                t0 + 20,
                "c-ann",
            )],
        ),
    )
    .await
    .expect("stale edit");
    assert!(
        matches!(&stale.outcomes[0].outcome, Outcome::Merged { .. }),
        "{:?}",
        stale.outcomes[0].outcome
    );
    let row = synced_project(&svc, "c-ann-3").await;
    assert_eq!(row.get("name"), Some(&Value::from("backend name")), "{row:?}");
}
