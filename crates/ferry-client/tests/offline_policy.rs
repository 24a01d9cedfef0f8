//! Offline restrictions: an installed `OfflinePolicy` refuses chosen
//! changes while no download stream is connected, writing nothing of the
//! refused transaction, and allows everything once connected.

mod common;

use std::sync::Arc;

use ferry_client::{ChangeKind, ClientError, Database, OfflinePolicy};
use ferry_core::{row_data, ErrorKind, Value};
use ferry_queue::QueueError;
use ferry_store::MemoryStore;
use ferry_transport::FaultConfig;

fn offline_db() -> Database {
    let store = MemoryStore::new(common::client_schema());
    Database::open(Arc::new(store), Default::default()).expect("open")
}

fn ticket(title: &str) -> ferry_core::RowData {
    row_data([("title", Value::from(title)), ("status", Value::from("pending"))])
}

fn policy() -> OfflinePolicy {
    OfflinePolicy::new()
        .deny_delete("tickets")
        .deny_update_of("tickets", ["title", "deleted_at"])
}

#[test]
fn refused_changes_write_nothing_and_name_the_change() {
    let db = offline_db();
    db.write(|tx| tx.insert("tickets", "t1", ticket("A"))).expect("seed");
    let queued = db.local().pending_len().expect("pending");
    db.set_offline_policy(Some(policy()));
    assert!(db.is_offline(), "never connected means offline");

    // A transaction mixing allowed and refused ops is refused whole.
    let err = db
        .write(|tx| {
            tx.insert("comments", "c1", row_data([("body", Value::from("hi"))]))?;
            tx.update("tickets", "t1", row_data([("title", Value::from("C"))]))?;
            Ok::<_, ClientError>(())
        })
        .expect_err("title change refused");
    assert_eq!(
        err.to_string(),
        "offline: changing tickets.title is not allowed while offline"
    );
    assert_eq!(err.kind(), ErrorKind::Permanent);
    assert!(matches!(err, ClientError::Queue(QueueError::Refused { .. })), "{err:?}");
    assert_eq!(db.local().get("comments", "c1").expect("get"), None);
    assert_eq!(
        db.local()
            .get("tickets", "t1")
            .expect("get")
            .and_then(|r| r.get("title").cloned()),
        Some(Value::from("A"))
    );
    assert_eq!(db.local().pending_len().expect("pending"), queued);

    let err = db.write(|tx| tx.delete("tickets", "t1")).expect_err("delete refused");
    assert_eq!(
        err.to_string(),
        "offline: deleting tickets/t1 is not allowed while offline"
    );
    // A soft delete is an update of deleted_at.
    let err = db
        .write(|tx| tx.update("tickets", "t1", row_data([("deleted_at", Value::from("now"))])))
        .expect_err("soft delete refused");
    assert_eq!(
        err.to_string(),
        "offline: changing tickets.deleted_at is not allowed while offline"
    );
    // A whole-row put that changes the title is an update of the title.
    let err = db
        .write(|tx| tx.put("tickets", "t1", ticket("C")))
        .expect_err("put refused");
    assert_eq!(
        err.to_string(),
        "offline: changing tickets.title is not allowed while offline"
    );
    assert_eq!(db.local().pending_len().expect("pending"), queued);
}

#[test]
fn conflict_free_changes_stay_available_offline() {
    let db = offline_db();
    db.write(|tx| tx.insert("tickets", "t1", ticket("A"))).expect("seed");
    db.set_offline_policy(Some(policy()));
    db.write(|tx| {
        // New rows, even edited or deleted again in the same transaction.
        tx.insert("tickets", "t2", ticket("new"))?;
        tx.update("tickets", "t2", row_data([("title", Value::from("newer"))]))?;
        tx.insert("tickets", "t3", ticket("gone"))?;
        tx.delete("tickets", "t3")?;
        tx.insert("comments", "c1", row_data([("ticket_id", Value::from("t1"))]))?;
        tx.insert(
            "assignments",
            "a1",
            row_data([("ticket_id", Value::from("t1")), ("user_id", Value::from("bob"))]),
        )?;
        // Columns the policy does not name.
        tx.update("tickets", "t1", row_data([("status", Value::from("in_progress"))]))?;
        // A put that leaves the title as it was.
        tx.put(
            "tickets",
            "t1",
            row_data([
                ("title", Value::from("A")),
                ("status", Value::from("in_progress")),
                ("description", Value::from("x")),
            ]),
        )?;
        Ok::<_, QueueError>(())
    })
    .expect("allowed offline");
    assert!(db.local().get("tickets", "t2").expect("get").is_some());
    assert!(db.local().get("comments", "c1").expect("get").is_some());

    // Removing the policy allows everything again.
    db.set_offline_policy(None);
    db.write(|tx| tx.delete("tickets", "t1")).expect("no policy");
}

#[test]
fn closure_rules_and_insert_rules() {
    let db = offline_db();
    db.write(|tx| tx.insert("tickets", "t1", ticket("A"))).expect("seed");
    db.set_offline_policy(Some(OfflinePolicy::new().deny_insert("attachments").deny_if(
        |change| {
            (change.kind == ChangeKind::Update && change.table == "tickets" && change.columns.contains(&"status"))
                .then(|| format!("moving ticket {} needs a connection", change.id))
        },
    )));
    let err = db
        .write(|tx| tx.insert("attachments", "f1", row_data([("url", Value::from("u"))])))
        .expect_err("insert refused");
    assert_eq!(
        err.to_string(),
        "offline: creating rows in attachments is not allowed while offline"
    );
    let err = db
        .write(|tx| tx.update("tickets", "t1", row_data([("status", Value::from("done"))])))
        .expect_err("closure refused");
    assert_eq!(err.to_string(), "offline: moving ticket t1 needs a connection");
    db.write(|tx| tx.update("tickets", "t1", row_data([("title", Value::from("B"))])))
        .expect("title allowed by this policy");
    assert!(db.offline_policy().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_policy_applies_only_while_no_stream_is_connected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let svc = common::service(&dir.path().join("server"));
    std::fs::create_dir_all(dir.path().join("bob")).expect("dir");
    let bob = common::client(&dir.path().join("bob"), 7, Arc::new(ferry_core::SystemClock));
    bob.set_offline_policy(Some(policy()));
    bob.write(|tx| tx.insert("tickets", "t1", ticket("A")))
        .expect("insert offline");
    let _net = common::connect(&bob, svc.clone(), FaultConfig::default(), 7, "bob");
    assert!(bob.wait_for_status(10_000, |s| s.connected).await, "connects");
    assert!(!bob.is_offline());
    bob.write(|tx| tx.update("tickets", "t1", row_data([("title", Value::from("B"))])))
        .expect("online: allowed");
    assert!(common::wait_caught_up(&bob, &svc, 10_000).await);

    bob.disconnect().await;
    assert!(bob.is_offline());
    let err = bob
        .write(|tx| tx.update("tickets", "t1", row_data([("title", Value::from("C"))])))
        .expect_err("offline: refused");
    assert_eq!(
        err.to_string(),
        "offline: changing tickets.title is not allowed while offline"
    );
    assert_eq!(
        bob.local()
            .get("tickets", "t1")
            .expect("get")
            .and_then(|r| r.get("title").cloned()),
        Some(Value::from("B"))
    );
}
