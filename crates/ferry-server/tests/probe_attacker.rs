//! Findings of an outside attacker's probe of the sync server's write
//! permissions: each test failed before its fix.

mod common;

use common::*;
use ferry_core::Value;
use ferry_postgres::scratch::ScratchSchemas;
use ferry_postgres::PgSourceDb;
use ferry_protocol::Outcome;
use ferry_server::{ServiceOptions, SyncRules, SyncService};

/// Tasks land in the bucket of their assignee; anyone may create,
/// reassign and edit tasks, but only so that the task ends up in buckets
/// they read (`new_in_my_buckets`).
const TASK_RULES: &str = r#"
[[tables]]
name = "tasks"
columns = [{ name = "assignee", type = "text" }, { name = "title", type = "text" }]

[[buckets]]
name = "my_tasks"
parameters = ["sub"]
data = [{ table = "tasks", where = { assignee = "sub" } }]

[[permissions]]
table = "tasks"
insert = "true"
update = "true"
new_in_my_buckets = true
"#;

/// The wall clock of the writes below (far in the past: every op keeps
/// its own clock).
const T0_MS: u64 = 1_700_000_000_000;

fn text(s: &str) -> Value {
    Value::from(s)
}

/// Incompressible text, longer than a PostgreSQL index row may be.
fn too_long_for_an_index() -> String {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..20_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(b'a' + (x % 26) as u8)
        })
        .collect()
}

/// The ids of the rows a new device of `user` syncs, in order.
async fn synced_ids(svc: &SyncService, user: &str, client: &str) -> Vec<String> {
    let mut device = TestClient::new(client);
    device.sync(svc, &token(user)).await;
    let mut ids: Vec<String> = device.rows().into_keys().map(|(_, id)| id).collect();
    ids.sort();
    ids
}

/// Op `i` of `answer` was rejected with a reason that says `says`.
fn assert_rejected(answer: &ferry_protocol::UploadResponse, i: usize, says: &str) {
    match &answer.outcomes[i].outcome {
        Outcome::Rejected { reason } => assert!(reason.contains(says), "{reason}"),
        other => panic!("op {i}: {other:?}"),
    }
}

/// A service on PostgreSQL, in `s`'s scratch schemas, over `rules`.
fn pg_service(s: &ScratchSchemas, rules: &str, options: ServiceOptions) -> SyncService {
    let db = PgSourceDb::connect(&s.options()).expect("connect");
    SyncService::builder(
        std::sync::Arc::new(db),
        SyncRules::from_toml(rules).expect("rules"),
        SECRET,
    )
    .options(options)
    .build()
    .expect("service")
}

/// carl creates task t1 (at T0), bob takes it (PATCH of its assignee
/// at T0 + 20 s): the assignee's clock is newer than the title's.
async fn bobs_task(e: &Env) {
    let created = try_upload(
        &e.svc,
        "carl",
        upload_req(
            "carl-dev",
            vec![entry(
                1,
                put("tasks", "t1", &[("assignee", text("carl")), ("title", text("orig"))]),
                T0_MS,
                "carl-dev",
            )],
        ),
    )
    .await
    .expect("carl's upload");
    assert_eq!(created.outcomes[0].outcome, Outcome::Applied);
    let taken = try_upload(
        &e.svc,
        "bob",
        upload_req(
            "bob-dev",
            vec![entry(
                1,
                patch("tasks", "t1", &[("assignee", text("bob"))]),
                T0_MS + 20_000,
                "bob-dev",
            )],
        ),
    )
    .await
    .expect("bob's upload");
    assert_eq!(taken.outcomes[0].outcome, Outcome::Applied);
}

/// With `new_in_my_buckets`, mallory may not edit bob's task: a PATCH of
/// its title alone is refused. Naming herself as assignee, with a clock
/// between the title's and the assignee's, passed the check (the row "as
/// sent" was in her bucket) while last-write-wins kept bob as assignee
/// and took her title: the task stayed in bob's bucket with her edit. The
/// row a write leaves must be in buckets the writer reads, after the
/// conflict strategy too.
#[tokio::test]
async fn new_in_my_buckets_holds_for_the_row_last_write_wins_leaves() {
    let e = env_with_rules(TASK_RULES, ServiceOptions::default());
    bobs_task(&e).await;
    let answer = try_upload(
        &e.svc,
        "mal",
        upload_req(
            "mal-dev",
            vec![entry(
                1,
                patch("tasks", "t1", &[("assignee", text("mal")), ("title", text("pwned"))]),
                T0_MS + 10_000,
                "mal-dev",
            )],
        ),
    )
    .await
    .expect("mallory's upload");
    match &answer.outcomes[0].outcome {
        Outcome::Rejected { reason } => {
            assert!(reason.contains("permission denied"), "{reason}");
            assert!(!reason.contains("bob"), "names the hidden row's assignee: {reason}");
        }
        other => panic!("mallory's edit of bob's task was not refused: {other:?}"),
    }
    let mut bob = TestClient::new("bob-dev");
    bob.sync(&e.svc, &token("bob")).await;
    let row = bob
        .rows()
        .remove(&("tasks".to_owned(), "t1".to_owned()))
        .expect("bob's task");
    assert_eq!(row.get("title"), Some(&text("orig")), "{row:?}");
    assert_eq!(row.get("assignee"), Some(&text("bob")), "{row:?}");
}

/// A write refused by `new_in_my_buckets` named the bucket the row would
/// be in. For a PATCH of a row the writer cannot read, that bucket comes
/// from the stored row: the reason told mallory who bob's task belongs to
/// (`my_tasks["bob"]`). The reason names no bucket of a stored row the
/// writer cannot read; it still names the bucket of the writer's own
/// values.
#[tokio::test]
async fn a_refusal_by_new_in_my_buckets_does_not_show_the_hidden_rows_bucket() {
    let e = env_with_rules(TASK_RULES, ServiceOptions::default());
    bobs_task(&e).await;
    let answer = try_upload(
        &e.svc,
        "mal",
        upload_req(
            "mal-dev",
            vec![entry(
                1,
                patch("tasks", "t1", &[("title", text("pwned"))]),
                T0_MS + 30_000,
                "mal-dev",
            )],
        ),
    )
    .await
    .expect("mallory's upload");
    match &answer.outcomes[0].outcome {
        Outcome::Rejected { reason } => {
            assert!(reason.contains("new_in_my_buckets"), "{reason}");
            assert!(!reason.contains("bob"), "names the hidden row's assignee: {reason}");
        }
        other => panic!("mallory's edit of bob's task not refused: {other:?}"),
    }
    // An insert placing the row in another user's bucket by the writer's
    // own values: the reason names that bucket.
    let own = try_upload(
        &e.svc,
        "mal",
        upload_req(
            "mal-dev",
            vec![entry(
                2,
                put("tasks", "t2", &[("assignee", text("zed")), ("title", text("x"))]),
                T0_MS + 30_000,
                "mal-dev",
            )],
        ),
    )
    .await
    .expect("mallory's second upload");
    match &own.outcomes[0].outcome {
        Outcome::Rejected { reason } => {
            assert!(reason.contains(r#"my_tasks[\"zed\"]"#), "{reason}");
        }
        other => panic!("insert into zed's bucket not refused: {other:?}"),
    }
}

/// Pages are private to their owner, but anyone may edit any page (an
/// app whose rule is its own business).
const PAGE_RULES: &str = r#"
[[tables]]
name = "pages"
columns = [{ name = "owner", type = "text" }, { name = "body", type = "text" }, { name = "note", type = "text" }]

[[buckets]]
name = "my_pages"
parameters = ["sub"]
data = [{ table = "pages", where = { owner = "sub" } }]

[[permissions]]
table = "pages"
insert = "new.owner == auth.sub"
update = "true"
"#;

/// A PATCH whose merged row is over `max_row_bytes` is rejected naming
/// the merged row's size. For a stored row the writer cannot read, that
/// told them its size to the byte (the other refusals and merges of such
/// a row withhold their details): the reason is withheld too.
#[tokio::test]
async fn an_oversized_merge_of_a_hidden_row_does_not_tell_its_size() {
    let mut options = ServiceOptions::default();
    options.limits.max_row_bytes = 300;
    let e = env_with_rules(PAGE_RULES, options);
    let secret = "s".repeat(123);
    let stored = try_upload(
        &e.svc,
        "bob",
        upload_req(
            "bob-dev",
            vec![entry(
                1,
                put("pages", "p1", &[("owner", text("bob")), ("body", text(&secret))]),
                T0_MS,
                "bob-dev",
            )],
        ),
    )
    .await
    .expect("bob's upload");
    assert_eq!(stored.outcomes[0].outcome, Outcome::Applied);
    let answer = try_upload(
        &e.svc,
        "mal",
        upload_req(
            "mal-dev",
            vec![entry(
                1,
                patch("pages", "p1", &[("note", text(&"n".repeat(200)))]),
                T0_MS + 1_000,
                "mal-dev",
            )],
        ),
    )
    .await
    .expect("mallory's upload");
    match &answer.outcomes[0].outcome {
        Outcome::Rejected { reason } => {
            assert!(!reason.contains("bytes"), "tells the hidden row's size: {reason}");
            assert!(reason.contains("pages/p1"), "{reason}");
        }
        other => panic!("oversized merge not refused: {other:?}"),
    }
    // Bob's own oversized edit is still told the size.
    let own = try_upload(
        &e.svc,
        "bob",
        upload_req(
            "bob-dev",
            vec![entry(
                2,
                patch("pages", "p1", &[("note", text(&"n".repeat(200)))]),
                T0_MS + 2_000,
                "bob-dev",
            )],
        ),
    )
    .await
    .expect("bob's second upload");
    assert_rejected(&own, 0, "over the limit of 300 bytes");
}

/// A PostgreSQL `numeric` column synced as text keeps a value in its own
/// form: `1e20000` (7 bytes as sent) is stored and read back as 20,001
/// digits. The size limits were checked on the row as sent only, so a
/// row far over `max_row_encoded_bytes` (and `max_row_bytes`) was
/// written and sent to every device of its bucket (enough such columns
/// make a `data` line no client reads). The row as the database keeps it
/// is held to the limits too: over them, the write is rejected and
/// nothing of it is written.
#[tokio::test]
async fn a_row_the_database_grows_past_the_size_limits_is_rejected_and_not_written() {
    let s = ScratchSchemas::for_test();
    s.execute(&format!(
        "CREATE TABLE \"{}\".ledger (id text PRIMARY KEY, owner text, amount numeric)",
        s.app
    ))
    .expect("app table");
    let rules = r#"
[[tables]]
name = "ledger"
columns = [{ name = "owner", type = "text" }, { name = "amount", type = "text" }]

[[buckets]]
name = "all"
data = [{ table = "ledger" }]

[[permissions]]
table = "ledger"
insert = "new.owner == auth.sub"
"#;
    let options = ServiceOptions {
        max_row_encoded_bytes: 10_000,
        ..ServiceOptions::default()
    };
    let svc = pg_service(&s, rules, options);
    let answer = try_upload(
        &svc,
        "ann",
        upload_req(
            "ann-dev",
            vec![
                entry(
                    1,
                    put("ledger", "small", &[("owner", text("ann")), ("amount", text("1e3"))]),
                    T0_MS,
                    "ann-dev",
                ),
                entry(
                    2,
                    put("ledger", "huge", &[("owner", text("ann")), ("amount", text("1e20000"))]),
                    T0_MS,
                    "ann-dev",
                ),
            ],
        ),
    )
    .await
    .expect("upload answered");
    match &answer.outcomes[1].outcome {
        Outcome::Rejected { reason } => {
            assert!(reason.contains("ledger/huge"), "{reason}");
            assert!(reason.contains("max_row_encoded_bytes"), "{reason}");
        }
        other => panic!("a row stored over the limit was taken: {other:?}"),
    }
    let count = s
        .query(&format!("SELECT count(*)::text FROM \"{}\".ledger", s.app))
        .expect("count");
    assert_eq!(count[0][0].as_deref(), Some("0"), "the transaction wrote nothing");
    let mut device = TestClient::new("ann-dev-2");
    device.sync(&svc, &token("ann")).await;
    assert!(device.rows().is_empty(), "{:?}", device.rows());

    // Alone in its transaction, the small row is taken in its stored form.
    let answer = try_upload(
        &svc,
        "ann",
        upload_req(
            "ann-dev",
            vec![entry(
                3,
                put("ledger", "small", &[("owner", text("ann")), ("amount", text("1e3"))]),
                T0_MS,
                "ann-dev",
            )],
        ),
    )
    .await
    .expect("upload answered");
    assert!(
        matches!(answer.outcomes[0].outcome, Outcome::Applied | Outcome::Merged { .. }),
        "{:?}",
        answer.outcomes[0]
    );
}

/// A write PostgreSQL refuses is rejected with the database's reason.
/// For a CHECK or NOT NULL violation, PostgreSQL's detail is the whole
/// failing row: every column of the app's table, those the rules do not
/// sync (an API key the backend keeps) and, for a PATCH of a row the
/// writer cannot read, its stored values. The reason names the
/// constraint, without the row.
#[tokio::test]
async fn a_constraint_the_database_enforces_does_not_show_the_failing_row() {
    let s = ScratchSchemas::for_test();
    s.execute(&format!(
        "CREATE TABLE \"{}\".accounts (id text PRIMARY KEY, owner text NOT NULL, plan text, \
         credits integer CONSTRAINT credits_not_negative CHECK (credits >= 0), \
         api_key text DEFAULT 'sk-backend-only')",
        s.app
    ))
    .expect("app table");
    // Accounts are private to their owner; anyone may top up any
    // account (an app's rule).
    let rules = r#"
[[tables]]
name = "accounts"
columns = [{ name = "owner", type = "text" }, { name = "plan", type = "text" }, { name = "credits", type = "integer" }]

[[buckets]]
name = "mine"
parameters = ["sub"]
data = [{ table = "accounts", where = { owner = "sub" } }]

[[permissions]]
table = "accounts"
insert = "new.owner == auth.sub"
update = "true"
"#;
    let svc = pg_service(&s, rules, ServiceOptions::default());
    let stored = try_upload(
        &svc,
        "bob",
        upload_req(
            "bob-dev",
            vec![entry(
                1,
                put(
                    "accounts",
                    "a1",
                    &[
                        ("owner", text("bob")),
                        ("plan", text("gold-plan-of-bob")),
                        ("credits", Value::Integer(5)),
                    ],
                ),
                T0_MS,
                "bob-dev",
            )],
        ),
    )
    .await
    .expect("bob's upload");
    assert_eq!(stored.outcomes[0].outcome, Outcome::Applied);
    let answer = try_upload(
        &svc,
        "mal",
        upload_req(
            "mal-dev",
            vec![entry(
                1,
                patch("accounts", "a1", &[("credits", Value::Integer(-1))]),
                T0_MS + 1_000,
                "mal-dev",
            )],
        ),
    )
    .await
    .expect("mallory's upload");
    match &answer.outcomes[0].outcome {
        Outcome::Rejected { reason } => {
            assert!(!reason.contains("gold-plan-of-bob"), "shows bob's row: {reason}");
            assert!(
                !reason.contains("sk-backend-only"),
                "shows a column not synced: {reason}"
            );
            assert!(
                reason.contains("credits_not_negative") || reason.contains("details withheld"),
                "{reason}"
            );
        }
        other => panic!("a negative balance was taken: {other:?}"),
    }
    // The owner's own violation: the constraint is named, the column the
    // rules do not sync is not shown.
    let own = try_upload(
        &svc,
        "bob",
        upload_req(
            "bob-dev",
            vec![entry(
                2,
                patch("accounts", "a1", &[("credits", Value::Integer(-2))]),
                T0_MS + 2_000,
                "bob-dev",
            )],
        ),
    )
    .await
    .expect("bob's second upload");
    match &own.outcomes[0].outcome {
        Outcome::Rejected { reason } => {
            assert!(reason.contains("credits_not_negative"), "{reason}");
            assert!(
                !reason.contains("sk-backend-only"),
                "shows a column not synced: {reason}"
            );
        }
        other => panic!("a negative balance was taken: {other:?}"),
    }
}

/// An app's trigger that refuses a row with `RAISE EXCEPTION` (SQLSTATE
/// P0001, the way PostgreSQL apps validate) failed the whole upload with
/// a 500 (`internal`), on every retry: the device's queue stopped there
/// for good and the write never got an outcome. It is a refusal: the
/// write is rejected with the trigger's message, and the upload goes on.
#[tokio::test]
async fn a_trigger_that_raises_rejects_the_write_instead_of_failing_the_upload() {
    let s = ScratchSchemas::for_test();
    let a = &s.app;
    s.execute(&format!(
        "CREATE TABLE \"{a}\".items (id text PRIMARY KEY, owner text, name text);
         CREATE FUNCTION \"{a}\".check_item() RETURNS trigger LANGUAGE plpgsql AS $f$
         BEGIN
           IF NEW.name = 'bad' THEN RAISE EXCEPTION 'item name % is not allowed', NEW.name; END IF;
           ASSERT NEW.name <> 'worse', 'item name worse fails an assertion';
           RETURN NEW;
         END $f$;
         CREATE TRIGGER check_item BEFORE INSERT OR UPDATE ON \"{a}\".items
           FOR EACH ROW EXECUTE FUNCTION \"{a}\".check_item();"
    ))
    .expect("app table");
    let rules = r#"
[[tables]]
name = "items"
columns = [{ name = "owner", type = "text" }, { name = "name", type = "text" }]

[[buckets]]
name = "all"
data = [{ table = "items" }]

[[permissions]]
table = "items"
insert = "new.owner == auth.sub"
"#;
    let svc = pg_service(&s, rules, ServiceOptions::default());
    let item = |seq: u64, id: &str, name: &str| {
        (
            seq,
            vec![entry(
                seq,
                put("items", id, &[("owner", text("ann")), ("name", text(name))]),
                T0_MS + seq,
                "ann-dev",
            )],
        )
    };
    let answer = try_upload(
        &svc,
        "ann",
        upload_txs(
            "ann-dev",
            vec![item(1, "i1", "bad"), item(2, "i2", "worse"), item(3, "i3", "fine")],
        ),
    )
    .await
    .expect("the upload is answered");
    assert_rejected(&answer, 0, "item name bad is not allowed");
    assert_rejected(&answer, 1, "item name worse fails an assertion");
    assert_eq!(answer.outcomes[2].outcome, Outcome::Applied);
    assert_eq!(synced_ids(&svc, "ann", "ann-dev-2").await, ["i3"]);
}

/// A long value in a column PostgreSQL indexes (an index of the app's
/// table, or a bucket parameter: the bucket's name is in Ferry's own
/// indexes) passes the index's row size limit (SQLSTATE 54000). That
/// failed the whole upload with a 500 on every retry: the device's queue
/// stopped there for good. It is the write's own value: the write is
/// rejected, naming the limit, and the upload goes on.
#[tokio::test]
async fn a_value_too_long_for_an_index_rejects_the_write_instead_of_failing_the_upload() {
    let s = ScratchSchemas::for_test();
    let a = &s.app;
    s.execute(&format!(
        "CREATE TABLE \"{a}\".posts (id text PRIMARY KEY, owner text, team text, title text);
         CREATE INDEX posts_title ON \"{a}\".posts(title);"
    ))
    .expect("app table");
    let rules = r#"
[[tables]]
name = "posts"
columns = [{ name = "owner", type = "text" }, { name = "team", type = "text" }, { name = "title", type = "text" }]

[[buckets]]
name = "mine"
parameters = ["sub"]
data = [{ table = "posts", where = { owner = "sub" } }]

[[buckets]]
name = "team"
parameters = ["team"]
data = [{ table = "posts", where = { team = "team" } }]

[[permissions]]
table = "posts"
insert = "new.owner == auth.sub"
"#;
    let svc = pg_service(&s, rules, ServiceOptions::default());
    let long = too_long_for_an_index();
    let post = |seq: u64, id: &str, data: &[(&str, Value)]| {
        let mut row = vec![("owner", text("ann"))];
        row.extend(data.iter().cloned());
        (seq, vec![entry(seq, put("posts", id, &row), T0_MS + seq, "ann-dev")])
    };
    let answer = try_upload(
        &svc,
        "ann",
        upload_txs(
            "ann-dev",
            vec![
                post(1, "p1", &[("title", text(&long))]),
                post(2, "p2", &[("team", text(&long))]),
                post(3, "p3", &[("title", text("fine"))]),
            ],
        ),
    )
    .await
    .expect("the upload is answered");
    for i in 0..2 {
        assert_rejected(&answer, i, "sqlstate 54000");
    }
    assert_eq!(answer.outcomes[2].outcome, Outcome::Applied);
    assert_eq!(synced_ids(&svc, "ann", "ann-dev-2").await, ["p3"]);
}

/// A row the app writes in SQL whose bucket parameter is too long for
/// Ferry's indexes (the bucket's name holds it) failed the capture's
/// whole batch on every attempt: no change made in the database after it
/// reached any device, for good. That row is left out (logged, as a row
/// over the size limit is) and the others are captured.
#[tokio::test]
async fn a_captured_row_the_database_refuses_is_left_out_and_the_capture_goes_on() {
    let s = ScratchSchemas::for_test();
    let a = &s.app;
    s.execute(&format!(
        "CREATE TABLE \"{a}\".posts (id text PRIMARY KEY, owner text, team text)"
    ))
    .expect("app table");
    let rules = r#"
[[tables]]
name = "posts"
columns = [{ name = "owner", type = "text" }, { name = "team", type = "text" }]

[[buckets]]
name = "mine"
parameters = ["sub"]
data = [{ table = "posts", where = { owner = "sub" } }]

[[buckets]]
name = "team"
parameters = ["team"]
data = [{ table = "posts", where = { team = "team" } }]
"#;
    let svc = pg_service(&s, rules, ServiceOptions::default());
    s.execute(&format!(
        "INSERT INTO \"{a}\".posts VALUES ('before', 'ann', 'red');
         INSERT INTO \"{a}\".posts VALUES ('long', 'ann', '{}');
         INSERT INTO \"{a}\".posts VALUES ('after', 'ann', 'red');",
        too_long_for_an_index()
    ))
    .expect("backend writes");
    svc.apply_captured(10).await.expect("the capture goes on");
    s.execute(&format!("INSERT INTO \"{a}\".posts VALUES ('later', 'ann', NULL)"))
        .expect("a later backend write");
    svc.apply_captured(10).await.expect("the capture goes on");
    assert_eq!(synced_ids(&svc, "ann", "ann-dev").await, ["after", "before", "later"]);
}

/// The bucket membership pass (at start, for rows already in the
/// database or after the rules changed) failed its whole batch on a row
/// whose bucket parameter is too long for Ferry's indexes, and started
/// over, for good: no row after it was placed in its buckets. That row is
/// left out (logged) and the pass completes.
#[tokio::test]
async fn the_membership_pass_leaves_out_a_row_the_database_refuses_and_completes() {
    let s = ScratchSchemas::for_test();
    let a = &s.app;
    s.execute(&format!(
        "CREATE TABLE \"{a}\".posts (id text PRIMARY KEY, owner text, team text);
         INSERT INTO \"{a}\".posts VALUES ('a', 'ann', 'red'), ('b', 'ann', '{}'), ('c', 'ann', 'red');",
        too_long_for_an_index()
    ))
    .expect("rows before ferry");
    let rules = r#"
[[tables]]
name = "posts"
columns = [{ name = "owner", type = "text" }, { name = "team", type = "text" }]

[[buckets]]
name = "mine"
parameters = ["sub"]
data = [{ table = "posts", where = { owner = "sub" } }]

[[buckets]]
name = "team"
parameters = ["team"]
data = [{ table = "posts", where = { team = "team" } }]
"#;
    let svc = pg_service(&s, rules, ServiceOptions::default());
    assert!(svc.rebucket_due().await.expect("due"));
    svc.rebucket_all().await.expect("the pass completes");
    assert!(!svc.rebucket_due().await.expect("due"), "the pass is recorded as done");
    assert_eq!(synced_ids(&svc, "ann", "ann-dev").await, ["a", "c"]);
}

/// The membership pass retried a failed pass at once, without a pause:
/// a database error that lasts (a privilege missing, a row it refuses)
/// made it start over in a hot loop, hundreds of passes a second, each
/// reading the tables from the start and logging a warning. A failed
/// pass is retried after a pause.
#[tokio::test]
async fn a_failing_membership_pass_is_retried_after_a_pause_not_in_a_hot_loop() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = std::sync::Arc::new(common::probe::ProbeDb::open(dir.path()));
    let svc = SyncService::builder(db.clone(), SyncRules::from_toml(TASK_RULES).expect("rules"), SECRET)
        .build()
        .expect("service");
    assert!(svc.rebucket_due().await.expect("due"), "a new database's pass is due");
    db.failing_writes.store(true, std::sync::atomic::Ordering::Relaxed);
    let before = db.writes.load(std::sync::atomic::Ordering::Relaxed);
    let job = {
        let svc = svc.clone();
        tokio::spawn(async move { svc.run_rebucket().await })
    };
    tokio::time::sleep(std::time::Duration::from_millis(1_500)).await;
    let tries = db.writes.load(std::sync::atomic::Ordering::Relaxed) - before;
    svc.shutdown();
    job.abort();
    assert!(tries >= 1, "the pass ran");
    assert!(tries <= 3, "{tries} passes in 1.5 s");
}

/// Anyone reads every task; a user may change one only so that it ends up
/// assigned to them or still open (no `new_in_my_buckets`).
const OPEN_OR_MINE_RULES: &str = r#"
[[tables]]
name = "tasks"
columns = [{ name = "assignee", type = "text" }, { name = "status", type = "text" }]

[[buckets]]
name = "all"
data = [{ table = "tasks" }]

[[permissions]]
table = "tasks"
insert = "new.status == 'open'"
update = "new.assignee == auth.sub or new.status == 'open'"
"#;

/// The update rule was judged on the row as sent only. Mallory sets
/// herself as assignee and the status to closed, with a clock between
/// the status's and the assignee's: the row as sent (mal, closed) met the
/// rule, and last-write-wins kept carl as assignee and took her status,
/// so carl's task was closed by someone the rule forbids to close it.
/// The row a write leaves must meet the rule too.
#[tokio::test]
async fn an_update_rule_holds_for_the_row_last_write_wins_leaves() {
    let e = env_with_rules(OPEN_OR_MINE_RULES, ServiceOptions::default());
    let upload = |user: &'static str, seq: u64, op, at_ms| {
        let client = format!("{user}-dev");
        let svc = &e.svc;
        async move {
            try_upload(svc, user, upload_req(&client, vec![entry(seq, op, at_ms, &client)]))
                .await
                .expect("upload")
        }
    };
    // carl creates an open task (status clock T0), then assigns it to
    // himself (assignee clock T0 + 20 s).
    let created = upload(
        "carl",
        1,
        put("tasks", "t1", &[("assignee", text("dave")), ("status", text("open"))]),
        T0_MS,
    )
    .await;
    assert_eq!(created.outcomes[0].outcome, Outcome::Applied);
    let taken = upload(
        "carl",
        2,
        patch("tasks", "t1", &[("assignee", text("carl"))]),
        T0_MS + 20_000,
    )
    .await;
    assert_eq!(taken.outcomes[0].outcome, Outcome::Applied);

    let answer = upload(
        "mal",
        1,
        patch("tasks", "t1", &[("assignee", text("mal")), ("status", text("closed"))]),
        T0_MS + 10_000,
    )
    .await;
    assert_rejected(&answer, 0, "permission denied: update on tasks/t1: as merged, rule");
    let t = e.svc.rules().schema().table("tasks").expect("table");
    let row = e
        .svc
        .db()
        .get_row(t, "t1")
        .expect("read")
        .expect("row")
        .data
        .expect("values");
    assert_eq!(row.get("status"), Some(&text("open")), "{row:?}");
    assert_eq!(row.get("assignee"), Some(&text("carl")), "{row:?}");

    // The same write with a clock newer than both columns leaves the row
    // as sent, assigned to her: allowed.
    let newer = upload(
        "mal",
        2,
        patch("tasks", "t1", &[("assignee", text("mal")), ("status", text("closed"))]),
        T0_MS + 30_000,
    )
    .await;
    assert_eq!(newer.outcomes[0].outcome, Outcome::Applied);
}
