//! Write permissions through the real `SyncService` (and over HTTP): each
//! allowed and refused case per operation, bucket escape, server-managed
//! columns, conditions on old and new values and on claims, the secure
//! default, and the server's own tables. Every refused case checks the
//! outcome's reason and that nothing was written: the row is unchanged,
//! the op log did not grow, and the allowed op uploaded in the same client
//! transaction was rolled back with it.

mod common;

use std::collections::BTreeMap;

use common::*;
use ferry_core::{CrudOp, RowData, Value};
use ferry_protocol::{Outcome, UploadResponse};
use ferry_server::{mint_token, SyncService, WriteOp};
use ferry_transport::SyncHandler;

const RULES: &str = r#"
[[tables]]
name = "notes"
columns = [
  { name = "owner", type = "text" },
  { name = "body", type = "text" },
  { name = "status", type = "text" },
  { name = "created_by", type = "text" },
]

[[tables]]
name = "docs"
columns = [
  { name = "title", type = "text" },
  { name = "stage", type = "text" },
]

[[tables]]
name = "inbox"
columns = [
  { name = "recipient", type = "text" },
  { name = "body", type = "text" },
]

[[tables]]
name = "locked"
columns = [{ name = "x", type = "text" }]

[[tables]]
name = "links"
columns = [
  { name = "url", type = "text" },
  { name = "label", type = "text" },
]

[[tables]]
name = "ferry_conflicts"
columns = [
  { name = "table_name", type = "text" },
  { name = "row_id", type = "text" },
  { name = "field", type = "text" },
  { name = "local_value", type = "text" },
  { name = "server_value", type = "text" },
  { name = "base_value", type = "text" },
  { name = "user_id", type = "text" },
  { name = "client_id", type = "text" },
  { name = "created_at", type = "text" },
  { name = "status", type = "text" },
  { name = "resolution", type = "text" },
]

[[tables]]
name = "activity"
columns = [
  { name = "table_name", type = "text" },
  { name = "row_id", type = "text" },
  { name = "user_id", type = "text" },
  { name = "op", type = "text" },
]

[[buckets]]
name = "global"
data = [
  { table = "docs" },
  { table = "locked" },
  { table = "links" },
  { table = "ferry_conflicts" },
  { table = "activity" },
]

[[buckets]]
name = "my_notes"
parameters = ["sub"]
data = [{ table = "notes", where = { owner = "sub" } }]

[[buckets]]
name = "my_inbox"
parameters = ["sub"]
data = [{ table = "inbox", where = { recipient = "sub" } }]

# Notes: a user writes their own; an admin may delete any; a note's
# status is open or done; created_by is the server's; a note never
# leaves its owner's bucket.
[[permissions]]
table = "notes"
insert = "new.owner == auth.sub"
update = "old.owner == auth.sub and (new.status in ['open', 'done'] or new.status is null)"
delete = "old.owner == auth.sub or auth.role == 'admin'"
server_columns = ["created_by"]
new_in_my_buckets = true

# Docs: anyone creates them; a final doc is changed by editors only, and
# only editors make a doc final. Nobody deletes one.
[[permissions]]
table = "docs"
insert = "new.stage is null or new.stage != 'final'"
update = "auth.role == 'editor' or (not (old.stage == 'final') and not (new.stage == 'final'))"

# Links: anyone adds and edits them, to web addresses only (a client
# writing straight to the sync API cannot plant a javascript: url).
[[permissions]]
table = "links"
insert = "new.url starts with 'https://'"
update = "new.url starts with 'https://'"

# Inbox: anyone may write, but only into their own inbox.
[[permissions]]
table = "inbox"
insert = "true"
update = "true"
new_in_my_buckets = true
"#;

/// What a case expects.
enum Expect {
    Applied,
    /// Rejected: the reason starts `permission denied: <op> on
    /// <table>/<id>: ` and contains this.
    Denied(WriteOp, &'static str),
}

struct Case {
    name: &'static str,
    /// Rows the server imports first (its own path, unchecked).
    setup: Vec<CrudOp>,
    user: &'static str,
    /// Extra claims of the uploader's token.
    claims: &'static [(&'static str, &'static str)],
    op: CrudOp,
    expect: Expect,
}

fn row<'a>(pairs: &[(&'a str, &str)]) -> Vec<(&'a str, Value)> {
    pairs.iter().map(|(k, v)| (*k, Value::from(*v))).collect()
}

fn p(table: &str, id: &str, pairs: &[(&str, &str)]) -> CrudOp {
    put(table, id, &row(pairs))
}

fn pa(table: &str, id: &str, pairs: &[(&str, &str)]) -> CrudOp {
    patch(table, id, &row(pairs))
}

fn alice_note() -> CrudOp {
    p(
        "notes",
        "n1",
        &[
            ("owner", "alice"),
            ("body", "hers"),
            ("status", "open"),
            ("created_by", "server"),
        ],
    )
}

fn conflict_of(user: &str) -> CrudOp {
    p(
        "ferry_conflicts",
        "k1",
        &[
            ("table_name", "docs"),
            ("row_id", "d1"),
            ("field", "title"),
            ("local_value", "\"L\""),
            ("server_value", "\"S\""),
            ("user_id", user),
            ("status", "open"),
        ],
    )
}

fn cases() -> Vec<Case> {
    use Expect::*;
    use WriteOp::*;
    let c = |name, setup: Vec<CrudOp>, user, claims, op, expect| Case {
        name,
        setup,
        user,
        claims,
        op,
        expect,
    };
    vec![
        // --- insert ---
        c(
            "insert own note",
            vec![],
            "alice",
            &[],
            p("notes", "n9", &[("owner", "alice"), ("body", "b")]),
            Applied,
        ),
        c(
            "insert a note as someone else",
            vec![],
            "alice",
            &[],
            p("notes", "n9", &[("owner", "bob"), ("body", "b")]),
            Denied(Insert, "rule `new.owner == auth.sub` is not met"),
        ),
        c(
            "insert a note with no owner",
            vec![],
            "alice",
            &[],
            p("notes", "n9", &[("body", "b")]),
            Denied(Insert, "rule `new.owner == auth.sub` is not met"),
        ),
        c(
            "insert by patch of a deleted-or-missing row counts as insert",
            vec![],
            "alice",
            &[],
            pa("docs", "d9", &[("title", "t"), ("stage", "final")]),
            Denied(Insert, "rule `new.stage is null or new.stage != 'final'` is not met"),
        ),
        c(
            "insert a draft doc",
            vec![],
            "bob",
            &[],
            p("docs", "d9", &[("title", "t"), ("stage", "draft")]),
            Applied,
        ),
        // --- update: conditions on old and new values ---
        c(
            "update own note",
            vec![alice_note()],
            "alice",
            &[],
            pa("notes", "n1", &[("body", "new")]),
            Applied,
        ),
        c(
            "update another user's note",
            vec![alice_note()],
            "bob",
            &[],
            pa("notes", "n1", &[("body", "bob's now")]),
            Denied(Update, "old.owner == auth.sub"),
        ),
        c(
            "take over another user's note",
            vec![alice_note()],
            "bob",
            &[],
            pa("notes", "n1", &[("owner", "bob")]),
            Denied(Update, "old.owner == auth.sub"),
        ),
        c(
            "replace another user's note by put",
            vec![p("notes", "n1", &[("owner", "alice"), ("body", "hers")])],
            "bob",
            &[],
            p("notes", "n1", &[("owner", "bob"), ("body", "mine")]),
            Denied(Update, "old.owner == auth.sub"),
        ),
        c(
            "update own note to a status the rule refuses",
            vec![alice_note()],
            "alice",
            &[],
            pa("notes", "n1", &[("status", "archived")]),
            Denied(Update, "new.status in ['open', 'done']"),
        ),
        c(
            "update a final doc without the editor role",
            vec![p("docs", "d1", &[("title", "t"), ("stage", "final")])],
            "bob",
            &[],
            pa("docs", "d1", &[("title", "changed")]),
            Denied(Update, "auth.role == 'editor'"),
        ),
        c(
            "make a doc final without the editor role",
            vec![p("docs", "d1", &[("title", "t"), ("stage", "draft")])],
            "bob",
            &[("role", "author")],
            pa("docs", "d1", &[("stage", "final")]),
            Denied(Update, "auth.role == 'editor'"),
        ),
        c(
            "update a draft doc",
            vec![p("docs", "d1", &[("title", "t"), ("stage", "draft")])],
            "bob",
            &[],
            pa("docs", "d1", &[("title", "changed")]),
            Applied,
        ),
        c(
            "an editor changes a final doc",
            vec![p("docs", "d1", &[("title", "t"), ("stage", "final")])],
            "bob",
            &[("role", "editor")],
            pa("docs", "d1", &[("title", "changed")]),
            Applied,
        ),
        // --- delete: owner, claims ---
        c(
            "delete own note",
            vec![alice_note()],
            "alice",
            &[],
            delete("notes", "n1"),
            Applied,
        ),
        c(
            "delete another user's note",
            vec![alice_note()],
            "bob",
            &[],
            delete("notes", "n1"),
            Denied(
                Delete,
                "rule `old.owner == auth.sub or auth.role == 'admin'` is not met",
            ),
        ),
        c(
            "delete another user's note with a non-admin role",
            vec![alice_note()],
            "bob",
            &[("role", "editor")],
            delete("notes", "n1"),
            Denied(Delete, "auth.role == 'admin'"),
        ),
        c(
            "an admin deletes another user's note",
            vec![alice_note()],
            "bob",
            &[("role", "admin")],
            delete("notes", "n1"),
            Applied,
        ),
        c(
            "delete a note that does not exist",
            vec![],
            "bob",
            &[],
            delete("notes", "n404"),
            Denied(Delete, "old.owner == auth.sub"),
        ),
        c(
            "delete where the table has no delete rule",
            vec![p("docs", "d1", &[("title", "t")])],
            "bob",
            &[("role", "editor")],
            delete("docs", "d1"),
            Denied(Delete, "table \"docs\" has no delete rule"),
        ),
        // --- server-managed columns ---
        c(
            "insert with a forged server column",
            vec![],
            "alice",
            &[],
            p("notes", "n9", &[("owner", "alice"), ("created_by", "alice")]),
            Denied(Insert, "column \"created_by\" is written by the server only"),
        ),
        c(
            "patch of a server column",
            vec![alice_note()],
            "alice",
            &[],
            pa("notes", "n1", &[("created_by", "alice")]),
            Denied(Update, "column \"created_by\" is written by the server only"),
        ),
        c(
            "a put that would clear a server column",
            vec![alice_note()],
            "alice",
            &[],
            p(
                "notes",
                "n1",
                &[("owner", "alice"), ("body", "again"), ("status", "open")],
            ),
            Denied(Update, "column \"created_by\" is written by the server only"),
        ),
        // --- bucket escape ---
        c(
            "move own note into another user's bucket",
            vec![alice_note()],
            "alice",
            &[],
            pa("notes", "n1", &[("owner", "bob")]),
            Denied(
                Update,
                "bucket \"my_notes[\\\"bob\\\"]\", which this user does not read",
            ),
        ),
        c(
            "insert into another user's inbox",
            vec![],
            "alice",
            &[],
            p("inbox", "m1", &[("recipient", "bob"), ("body", "hi")]),
            Denied(Insert, "which this user does not read (new_in_my_buckets)"),
        ),
        c(
            "insert into one's own inbox",
            vec![],
            "alice",
            &[],
            p("inbox", "m1", &[("recipient", "alice")]),
            Applied,
        ),
        c(
            "move an inbox row out of one's buckets",
            vec![p("inbox", "m1", &[("recipient", "alice")])],
            "alice",
            &[],
            pa("inbox", "m1", &[("recipient", "bob")]),
            Denied(Update, "my_inbox[\\\"bob\\\"]"),
        ),
        // --- the secure default ---
        c(
            "insert into a table without rules",
            vec![],
            "alice",
            &[("role", "admin")],
            p("locked", "l1", &[("x", "1")]),
            Denied(Insert, "table \"locked\" has no write permissions (no insert rule)"),
        ),
        c(
            "update of a table without rules",
            vec![p("locked", "l1", &[("x", "1")])],
            "alice",
            &[],
            pa("locked", "l1", &[("x", "2")]),
            Denied(Update, "no write permissions"),
        ),
        c(
            "delete in a table without rules",
            vec![p("locked", "l1", &[("x", "1")])],
            "alice",
            &[],
            delete("locked", "l1"),
            Denied(Delete, "no write permissions"),
        ),
        // --- the server's tables ---
        c(
            "resolve one's own conflict",
            vec![conflict_of("alice")],
            "alice",
            &[],
            pa(
                "ferry_conflicts",
                "k1",
                &[("status", "resolved"), ("resolution", "\"L\"")],
            ),
            Applied,
        ),
        c(
            "resolve another user's conflict",
            vec![conflict_of("alice")],
            "bob",
            &[("role", "admin")],
            pa(
                "ferry_conflicts",
                "k1",
                &[("status", "resolved"), ("resolution", "\"S\"")],
            ),
            Denied(Update, "the conflict belongs to another user"),
        ),
        c(
            "change another column of one's own conflict",
            vec![conflict_of("alice")],
            "alice",
            &[],
            pa(
                "ferry_conflicts",
                "k1",
                &[("status", "resolved"), ("server_value", "\"X\"")],
            ),
            Denied(Update, "column \"server_value\" would change"),
        ),
        c(
            "hand one's conflict to another user",
            vec![conflict_of("alice")],
            "alice",
            &[],
            pa("ferry_conflicts", "k1", &[("user_id", "bob")]),
            Denied(Update, "column \"user_id\" would change"),
        ),
        c(
            "create a conflict record",
            vec![],
            "alice",
            &[],
            conflict_of("alice"),
            Denied(Insert, "conflict records are written by the server"),
        ),
        c(
            "delete one's own conflict record",
            vec![conflict_of("alice")],
            "alice",
            &[],
            delete("ferry_conflicts", "k1"),
            Denied(Delete, "conflict records are written by the server"),
        ),
        // --- a prefix ---
        c(
            "add a web link",
            vec![],
            "alice",
            &[],
            p("links", "l1", &[("url", "https://example.test/a")]),
            Applied,
        ),
        c(
            "add a javascript: link",
            vec![],
            "alice",
            &[],
            p("links", "l1", &[("url", "javascript:alert(1)")]),
            Denied(Insert, "rule `new.url starts with 'https://'` is not met"),
        ),
        c(
            "add a link whose scheme is upper case (prefixes are case sensitive)",
            vec![],
            "alice",
            &[],
            p("links", "l1", &[("url", "HTTPS://example.test")]),
            Denied(Insert, "is not met"),
        ),
        c(
            "add a link without a url",
            vec![],
            "alice",
            &[],
            p("links", "l1", &[("label", "x")]),
            Denied(Insert, "is not met"),
        ),
        c(
            "relabel a web link (the stored url is judged with the patch)",
            vec![p("links", "l1", &[("url", "https://example.test/a")])],
            "alice",
            &[],
            pa("links", "l1", &[("label", "home")]),
            Applied,
        ),
        c(
            "turn a web link into a data: url",
            vec![p("links", "l1", &[("url", "https://example.test/a")])],
            "alice",
            &[],
            pa("links", "l1", &[("url", "data:text/html,<script>alert(1)</script>")]),
            Denied(Update, "is not met"),
        ),
        c(
            "forge an activity row",
            vec![],
            "alice",
            &[("role", "admin")],
            p("activity", "a1", &[("table_name", "notes"), ("user_id", "alice")]),
            Denied(Insert, "table \"activity\" is written by the server only"),
        ),
        c(
            "edit an activity row",
            vec![p("activity", "a1", &[("table_name", "notes"), ("user_id", "alice")])],
            "alice",
            &[],
            pa("activity", "a1", &[("op", "nothing happened")]),
            Denied(Update, "written by the server only"),
        ),
    ]
}

fn token_with(user: &str, claims: &[(&str, &str)]) -> String {
    let extra: serde_json::Map<String, serde_json::Value> = claims
        .iter()
        .map(|(k, v)| ((*k).to_owned(), serde_json::Value::from(*v)))
        .collect();
    mint_token(SECRET, user, 3600, &extra)
}

fn stored(svc: &SyncService, table: &str, id: &str) -> Option<ferry_server::StoredRow> {
    let t = svc.rules().schema().table(table).expect("table");
    svc.db().get_row(t, id).expect("read row")
}

fn now_ms() -> u64 {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after the epoch");
    u64::try_from(since.as_millis()).expect("milliseconds fit")
}

fn op_table_id(op: &CrudOp) -> (String, String) {
    (op.table().to_owned(), op.id().to_owned())
}

#[tokio::test]
async fn each_operation_is_allowed_or_refused_by_its_rule() {
    let mut failures = Vec::new();
    for case in cases() {
        let e = env_with_rules(RULES, ferry_server::ServiceOptions::default());
        if !case.setup.is_empty() {
            e.svc.import(case.setup.clone()).await.expect("setup import");
        }
        let (table, id) = op_table_id(&case.op);
        let before_row = stored(&e.svc, &table, &id);
        let before_log = e.svc.db().oplog_len().expect("oplog");
        // One client transaction: an allowed insert, then the case's op,
        // with clocks newer than the import's.
        let now = now_ms() + 1000;
        let probe = p("docs", "probe", &[("title", "probe")]);
        let request = upload_txs(
            "c1",
            vec![(
                1,
                vec![entry(1, probe, now, "c1"), entry(2, case.op.clone(), now, "c1")],
            )],
        );
        let answer: UploadResponse = SyncHandler::upload(&e.svc, &token_with(case.user, case.claims), request)
            .await
            .unwrap_or_else(|err| panic!("{}: upload refused: {err:?}", case.name));
        let outcomes: Vec<Outcome> = answer.outcomes.iter().map(|o| o.outcome.clone()).collect();
        match &case.expect {
            Expect::Applied => {
                if outcomes != [Outcome::Applied, Outcome::Applied] {
                    failures.push(format!("{}: expected applied, got {outcomes:?}", case.name));
                }
                if stored(&e.svc, "docs", "probe").is_none() {
                    failures.push(format!("{}: the probe was not written", case.name));
                }
            }
            Expect::Denied(op, why) => {
                let prefix = format!("permission denied: {op} on {table}/{id}: ");
                match &outcomes[..] {
                    [Outcome::Rejected { reason: first }, Outcome::Rejected { reason }] => {
                        if !reason.starts_with(&prefix) || !reason.contains(why) {
                            failures.push(format!("{}: reason {reason:?}, expected {prefix}...{why}", case.name));
                        }
                        if !first.contains("transaction 1 rolled back: seq 2 was rejected: permission denied") {
                            failures.push(format!("{}: the probe's reason {first:?}", case.name));
                        }
                    }
                    other => failures.push(format!("{}: expected rejected, got {other:?}", case.name)),
                }
                // Nothing was written: the row, the op log, the probe.
                if stored(&e.svc, &table, &id) != before_row {
                    failures.push(format!("{}: the row changed", case.name));
                }
                if e.svc.db().oplog_len().expect("oplog") != before_log {
                    failures.push(format!("{}: the op log grew", case.name));
                }
                if stored(&e.svc, "docs", "probe").is_some() {
                    failures.push(format!("{}: the probe was written", case.name));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[tokio::test]
async fn a_refused_write_is_answered_the_same_on_replay_and_writes_nothing() {
    let e = env_with_rules(RULES, ferry_server::ServiceOptions::default());
    e.svc.import(vec![alice_note()]).await.expect("setup");
    let before = stored(&e.svc, "notes", "n1");
    let request = || {
        upload_req(
            "cb",
            vec![entry(1, pa("notes", "n1", &[("body", "bob's")]), 9000, "cb")],
        )
    };
    let first = SyncHandler::upload(&e.svc, &token("bob"), request())
        .await
        .expect("upload");
    let again = SyncHandler::upload(&e.svc, &token("bob"), request())
        .await
        .expect("replay");
    assert_eq!(first.outcomes, again.outcomes);
    assert!(
        matches!(&first.outcomes[0].outcome, Outcome::Rejected { reason } if reason.starts_with("permission denied: update on notes/n1"))
    );
    assert_eq!(stored(&e.svc, "notes", "n1"), before);
    // The write checkpoint moved past the refused op, as for any rejection.
    assert_eq!(first.write_checkpoint, 1);
}

#[tokio::test]
async fn imports_and_strategy_side_writes_are_not_checked() {
    // The server's own path writes a table no client may write.
    let e = env_with_rules(RULES, ferry_server::ServiceOptions::default());
    let n = e
        .svc
        .import(vec![
            p("locked", "l1", &[("x", "1")]),
            p("activity", "a1", &[("op", "x")]),
        ])
        .await
        .expect("import");
    assert_eq!(n, 2);
    assert!(stored(&e.svc, "locked", "l1").is_some());

    // An audited table: the strategy's activity rows are written for a
    // client's allowed op, though clients may never write `activity`.
    let rules = format!(
        "{RULES}\n[[strategies]]\ntable = \"docs\"\nkind = \"lww\"\naudit = true\n"
    )
    .replace(
        "{ name = \"op\", type = \"text\" },",
        "{ name = \"op\", type = \"text\" },\n  { name = \"client_id\", type = \"text\" },\n  { name = \"old_value\", type = \"text\" },\n  { name = \"new_value\", type = \"text\" },\n  { name = \"outcome\", type = \"text\" },\n  { name = \"created_at\", type = \"text\" },",
    );
    let e = env_with_rules(&rules, ferry_server::ServiceOptions::default());
    let r = SyncHandler::upload(
        &e.svc,
        &token("bob"),
        upload_req("cb", vec![entry(1, p("docs", "d1", &[("title", "t")]), 1000, "cb")]),
    )
    .await
    .expect("upload");
    assert_eq!(r.outcomes[0].outcome, Outcome::Applied);
    let mut reader = TestClient::new("reader");
    reader.sync(&e.svc, &token("carol")).await;
    let activity: BTreeMap<(String, String), RowData> = reader
        .rows()
        .into_iter()
        .filter(|((t, _), _)| t == "activity")
        .collect();
    assert_eq!(activity.len(), 1, "{activity:?}");
}

#[test]
fn the_rules_declare_which_tables_are_writable() {
    let rules = ferry_server::SyncRules::from_toml(RULES).expect("rules");
    let writable: Vec<(String, Vec<WriteOp>)> = rules.writable_tables();
    let names: Vec<(&str, Vec<&str>)> = writable
        .iter()
        .map(|(t, ops)| (t.as_str(), ops.iter().map(|o| o.name()).collect()))
        .collect();
    assert_eq!(
        names,
        [
            ("docs", vec!["insert", "update"]),
            ("ferry_conflicts", vec!["update"]),
            ("inbox", vec!["insert", "update"]),
            ("links", vec!["insert", "update"]),
            ("notes", vec!["insert", "update", "delete"]),
        ]
    );
    let tracker = ferry_server::SyncRules::ticket_tracker().expect("ticket tracker");
    let tables: Vec<String> = tracker.writable_tables().into_iter().map(|(t, _)| t).collect();
    assert_eq!(
        tables,
        [
            "app_user",
            "assignments",
            "attachments",
            "comments",
            "ferry_conflicts",
            "tickets"
        ]
    );
}

// ---------------------------------------------------------------------------
// Rules that do not load
// ---------------------------------------------------------------------------

fn with_permissions(entry: &str) -> String {
    let base = RULES.split("[[permissions]]").next().expect("tables and buckets");
    format!("{base}\n[[permissions]]\n{entry}\n")
}

#[test]
fn bad_permissions_are_refused_at_load_naming_table_operation_and_token() {
    let cases: &[(&str, &[&str])] = &[
        // bad syntax
        (
            "table = \"notes\"\nupdate = \"old.owner = auth.sub\"",
            &[
                "permissions of table \"notes\", update rule",
                "unexpected `=` at byte 10",
                "expected `==` or `!=`",
            ],
        ),
        (
            "table = \"notes\"\ndelete = \"old.owner == auth.sub and\"",
            &["table \"notes\", delete rule", "unexpected end of condition at byte 25"],
        ),
        (
            "table = \"notes\"\ninsert = \"(new.owner == auth.sub\"",
            &["table \"notes\", insert rule", "expected `)`"],
        ),
        (
            "table = \"notes\"\ninsert = \"new.owner == 'x\"",
            &[
                "table \"notes\", insert rule",
                "unterminated string starting at byte 13",
            ],
        ),
        (
            "table = \"notes\"\ninsert = \"new.owner == auth.sub && true\"",
            &["insert rule", "unexpected character '&' at byte 22"],
        ),
        (
            "table = \"notes\"\nupdate = \"owner == auth.sub\"",
            &["update rule", "unknown name \"owner\" at byte 0"],
        ),
        // unknown column
        (
            "table = \"notes\"\nupdate = \"old.author == auth.sub\"",
            &[
                "table \"notes\", update rule",
                "unknown column \"author\" in old.author at byte 4",
            ],
        ),
        // a row the operation does not have
        (
            "table = \"notes\"\ninsert = \"old.owner == auth.sub\"",
            &["insert rule", "insert rules have no old row"],
        ),
        (
            "table = \"notes\"\ndelete = \"new.owner == auth.sub\"",
            &["delete rule", "delete rules have no new row"],
        ),
        // unknown operation (a misspelt field)
        ("table = \"notes\"\nupsert = \"true\"", &["unknown field `upsert`"]),
        // unknown table, server column, duplicates, server tables
        (
            "table = \"nope\"\ninsert = \"true\"",
            &["permissions name unknown table \"nope\""],
        ),
        (
            "table = \"notes\"\nserver_columns = [\"made_by\"]",
            &["permissions of table \"notes\": unknown server column \"made_by\""],
        ),
        (
            "table = \"docs\"\ninsert = \"true\"\n[[permissions]]\ntable = \"docs\"",
            &["table \"docs\" has more than one [[permissions]] entry"],
        ),
        (
            "table = \"activity\"\ninsert = \"true\"",
            &["table \"activity\" is written by the server only"],
        ),
        (
            "table = \"ferry_conflicts\"\nupdate = \"true\"",
            &["table \"ferry_conflicts\" is written by the server only"],
        ),
    ];
    for (entry, wants) in cases {
        let text = with_permissions(entry);
        let err = ferry_server::SyncRules::from_toml(&text).expect_err(entry).to_string();
        for want in *wants {
            assert!(err.contains(want), "{entry}:\n{err}\nlacks {want:?}");
        }
    }
}

#[test]
fn condition_limits_hold_at_the_limit_and_refuse_past_it() {
    use ferry_server::{MAX_CONDITION_BYTES, MAX_CONDITION_DEPTH_LEVELS};
    let load = |cond: &str| {
        ferry_server::SyncRules::from_toml(&with_permissions(&format!("table = \"docs\"\nupdate = '''{cond}'''")))
    };
    // Length, in bytes: a text literal padded to the limit.
    let head = "old.title == '";
    let pad = |n: usize| format!("{head}{}'", "x".repeat(n - head.len() - 1));
    assert_eq!(pad(MAX_CONDITION_BYTES).len(), MAX_CONDITION_BYTES);
    assert!(load(&pad(MAX_CONDITION_BYTES)).is_ok());
    let err = load(&pad(MAX_CONDITION_BYTES + 1)).expect_err("too long").to_string();
    assert!(
        err.contains(&format!(
            "condition is {} bytes, over the limit of {MAX_CONDITION_BYTES} bytes",
            MAX_CONDITION_BYTES + 1
        )),
        "{err}"
    );
    assert!(err.contains("table \"docs\", update rule"), "{err}");
    // Depth, in levels of parentheses and `not`.
    let nested = |levels: usize| format!("{}old.title is null{}", "(".repeat(levels), ")".repeat(levels));
    assert!(load(&nested(MAX_CONDITION_DEPTH_LEVELS)).is_ok());
    let err = load(&nested(MAX_CONDITION_DEPTH_LEVELS + 1))
        .expect_err("too deep")
        .to_string();
    assert!(
        err.contains(&format!("nests deeper than {MAX_CONDITION_DEPTH_LEVELS} levels")),
        "{err}"
    );
    let nots = |levels: usize| format!("{}old.title is null", "not ".repeat(levels));
    assert!(load(&nots(MAX_CONDITION_DEPTH_LEVELS)).is_ok());
    assert!(load(&nots(MAX_CONDITION_DEPTH_LEVELS + 1)).is_err());
}

// ---------------------------------------------------------------------------
// Over HTTP, with the ticket tracker rules
// ---------------------------------------------------------------------------

#[tokio::test]
async fn over_http_a_user_cannot_change_delete_or_take_over_another_users_rows() {
    use ferry_protocol::UploadRequest;
    use ferry_server::ServerConfig;

    let dir = tempfile::tempdir().expect("tempdir");
    let config = ServerConfig {
        data_dir: dir.path().to_path_buf(),
        listen_addr: ([127, 0, 0, 1], 0).into(),
        jwt_secret: Some(SECRET.into()),
        ..ServerConfig::default()
    };
    let server = ferry_server::run(config, std::future::pending())
        .await
        .expect("server starts");
    let url = format!("http://{}/sync/upload", server.addr);
    let http = reqwest::Client::new();
    let send = |user: &'static str, request: UploadRequest| {
        let http = http.clone();
        let url = url.clone();
        async move {
            let resp = http
                .post(&url)
                .bearer_auth(token(user))
                .header("content-type", "application/json")
                .body(serde_json::to_vec(&request).expect("encode request"))
                .send()
                .await
                .expect("upload sent");
            assert!(resp.status().is_success(), "status {}", resp.status());
            let body = resp.bytes().await.expect("upload answer");
            serde_json::from_slice::<UploadResponse>(&body).expect("upload answer decodes")
        }
    };

    // Bob writes his profile and a comment.
    let bobs = upload_req(
        "bob-device",
        vec![
            entry(1, p("app_user", "bob", &[("name", "Bob")]), 1000, "bob-device"),
            entry(
                2,
                p(
                    "comments",
                    "cm1",
                    &[("ticket_id", "t1"), ("user_id", "bob"), ("body", "bob's comment")],
                ),
                1000,
                "bob-device",
            ),
        ],
    );
    let r = send("bob", bobs).await;
    assert!(r.outcomes.iter().all(|o| o.outcome == Outcome::Applied), "{r:?}");
    let svc = server.service.clone();
    let snapshot = || {
        (
            stored(&svc, "app_user", "bob"),
            stored(&svc, "comments", "cm1"),
            svc.db().oplog_len().expect("oplog"),
        )
    };
    let before = snapshot();

    // Alice tries, one transaction each, with newer clocks than Bob's.
    let attempts: Vec<(WriteOp, CrudOp)> = vec![
        (WriteOp::Update, pa("comments", "cm1", &[("body", "alice was here")])),
        (WriteOp::Delete, delete("comments", "cm1")),
        (WriteOp::Update, pa("comments", "cm1", &[("user_id", "alice")])),
        (
            WriteOp::Update,
            p(
                "comments",
                "cm1",
                &[("ticket_id", "t1"), ("user_id", "alice"), ("body", "mine")],
            ),
        ),
        (WriteOp::Update, pa("app_user", "bob", &[("name", "Alice")])),
        (
            WriteOp::Insert,
            p(
                "comments",
                "cm2",
                &[("ticket_id", "t1"), ("user_id", "bob"), ("body", "forged")],
            ),
        ),
    ];
    for (i, (op, attempt)) in attempts.into_iter().enumerate() {
        let seq = i as u64 + 1;
        let (table, id) = op_table_id(&attempt);
        let r = send(
            "alice",
            upload_txs(
                "alice-device",
                vec![(seq, vec![entry(seq, attempt, 9000, "alice-device")])],
            ),
        )
        .await;
        match &r.outcomes[0].outcome {
            Outcome::Rejected { reason } => assert!(
                reason.starts_with(&format!("permission denied: {op} on {table}/{id}: ")),
                "{reason}"
            ),
            other => panic!("attempt {seq} on {table}/{id}: expected permission denied, got {other:?}"),
        }
    }
    assert_eq!(snapshot(), before, "nothing of alice's attempts was written");
    assert!(stored(&svc, "comments", "cm2").is_none());
    server.shutdown().await.expect("shutdown");
}
