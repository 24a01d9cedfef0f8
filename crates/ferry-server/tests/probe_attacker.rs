//! Findings of an outside attacker's probe of the sync server's write
//! permissions: each test failed before its fix.

mod common;

use common::*;
use ferry_core::Value;
use ferry_protocol::Outcome;
use ferry_server::ServiceOptions;

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
    match &own.outcomes[0].outcome {
        Outcome::Rejected { reason } => assert!(reason.contains("over the limit of 300 bytes"), "{reason}"),
        other => panic!("bob's oversized merge not refused: {other:?}"),
    }
}
