//! Changed bucket rules on a server that already holds rows: the service
//! computes every row's membership again (`SyncService::rebucket_all`,
//! run in the background at start), and a device that keeps its local
//! state converges on the new membership without reinstalling.

mod common;

use std::sync::Arc;

use common::{entry, put, token, upload_req, TestClient, SECRET};
use ferry_core::Value;
use ferry_server::{SqliteSourceDb, SyncRules, SyncService};
use ferry_transport::SyncHandler;

const TABLES: &str = r#"
[[tables]]
name = "tasks"
columns = [{ name = "owner", type = "text" }, { name = "title", type = "text" }]

[[tables]]
name = "notes"
columns = [{ name = "body", type = "text" }]

[[permissions]]
table = "tasks"
insert = "true"

[[permissions]]
table = "notes"
insert = "true"
"#;

/// Tasks by owner only.
const MINE: &str = r#"
[[buckets]]
name = "mine"
parameters = ["sub"]
data = [{ table = "tasks", where = { owner = "sub" } }]

[[buckets]]
name = "all"
data = [{ table = "notes" }]
"#;

/// Every task to everyone, too.
const SHARED: &str = r#"
[[buckets]]
name = "mine"
parameters = ["sub"]
data = [{ table = "tasks", where = { owner = "sub" } }]

[[buckets]]
name = "all"
data = [{ table = "notes" }, { table = "tasks" }]
"#;

fn service(dir: &std::path::Path, buckets: &str) -> SyncService {
    let db = SqliteSourceDb::open_dir(dir).expect("open db");
    let rules = SyncRules::from_toml(&format!("{TABLES}{buckets}")).expect("rules");
    SyncService::builder(Arc::new(db), rules, SECRET)
        .build()
        .expect("service")
}

fn ids(c: &TestClient) -> Vec<String> {
    c.rows().into_keys().map(|(t, id)| format!("{t}/{id}")).collect()
}

#[tokio::test]
async fn changed_bucket_rules_move_existing_rows_and_devices_follow_without_reinstalling() {
    let dir = tempfile::tempdir().expect("tempdir");
    let svc = service(dir.path(), MINE);
    assert!(svc.rebucket_due().await.expect("due"), "a new database has no pass yet");
    svc.rebucket_all().await.expect("first pass");
    assert!(!svc.rebucket_due().await.expect("due"));
    let answer = SyncHandler::upload(
        &svc,
        &token("ann"),
        upload_req(
            "c-ann",
            vec![
                entry(
                    1,
                    put(
                        "tasks",
                        "a1",
                        &[("owner", Value::from("ann")), ("title", Value::from("x"))],
                    ),
                    1_000,
                    "c-ann",
                ),
                entry(2, put("notes", "n1", &[("body", Value::from("hello"))]), 1_001, "c-ann"),
            ],
        ),
    )
    .await
    .expect("upload");
    assert_eq!(answer.outcomes.len(), 2);
    let mut bob = TestClient::new("c-bob");
    bob.sync(&svc, &token("bob")).await;
    assert_eq!(ids(&bob), vec!["notes/n1"]);
    drop(svc);

    // The rules now share every task: ann's task joins the global bucket.
    let svc = service(dir.path(), SHARED);
    assert!(svc.rebucket_due().await.expect("due"), "the rules changed");
    assert_eq!(svc.rebucket_all().await.expect("pass"), 1, "one row changed membership");
    bob.sync(&svc, &token("bob")).await;
    assert_eq!(ids(&bob), vec!["notes/n1", "tasks/a1"]);
    // A second pass changes nothing.
    assert_eq!(svc.rebucket_all().await.expect("pass"), 0);
    drop(svc);

    // And back: the task leaves the global bucket (a REMOVE in a bucket
    // bob keeps), and bob's device drops it.
    let svc = service(dir.path(), MINE);
    assert_eq!(svc.rebucket_all().await.expect("pass"), 1);
    bob.sync(&svc, &token("bob")).await;
    assert_eq!(ids(&bob), vec!["notes/n1"]);
    let mut ann = TestClient::new("c-ann-2");
    ann.sync(&svc, &token("ann")).await;
    assert_eq!(ids(&ann), vec!["notes/n1", "tasks/a1"], "the owner keeps it");
}

#[tokio::test]
async fn a_pass_over_several_batches_moves_every_row_with_matching_checksums() {
    let dir = tempfile::tempdir().expect("tempdir");
    let svc = service(dir.path(), MINE);
    svc.rebucket_all().await.expect("first pass");
    let rows = 2 * ferry_server::MAX_REBUCKET_BATCH + 7;
    let owner = |i: usize| if i.is_multiple_of(2) { "ann" } else { "bob" };
    let tasks = (0..rows)
        .map(|i| {
            put(
                "tasks",
                &format!("t{i:05}"),
                &[("owner", Value::from(owner(i))), ("title", Value::from("x"))],
            )
        })
        .collect();
    svc.import(tasks).await.expect("import");
    drop(svc);

    // Every task joins the global bucket; bob, keeping his device, gets
    // them all (his client checks every bucket's checksum).
    let mut bob = TestClient::new("c-bob");
    let svc = service(dir.path(), SHARED);
    assert_eq!(svc.rebucket_all().await.expect("pass"), rows, "every row joins");
    bob.sync(&svc, &token("bob")).await;
    assert_eq!(bob.rows().len(), rows);
    drop(svc);

    // And back: they leave it again (a REMOVE each), bob keeps his own.
    let svc = service(dir.path(), MINE);
    assert_eq!(svc.rebucket_all().await.expect("pass"), rows, "every row leaves");
    bob.sync(&svc, &token("bob")).await;
    assert_eq!(bob.rows().len(), rows / 2, "bob's own tasks");
}
