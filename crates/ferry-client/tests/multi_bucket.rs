//! A row in several buckets whose membership changes: the ticket
//! tracker's assignments are in `global` and in the assignee's
//! `my_assignments`. When an assignment moves from bob to alice, bob's
//! `my_assignments` gets a REMOVE after its older PUT, while `global` gets
//! the newer PUT. A device that receives both buckets' ops in one
//! checkpoint (a fresh device, or one back from offline) must end with the
//! newest values, whatever order it applies the buckets in.

mod common;

use std::sync::Arc;

use common::{client, service, text, token};
use ferry_client::{Database, Query, StaticToken};
use ferry_core::{row_data, SystemClock, Value};
use ferry_server::SyncService;
use ferry_transport::{MemoryTransport, SyncHandler, Transport};

fn connect(db: &Database, svc: &Arc<SyncService>, user: &str) {
    let handler: Arc<dyn SyncHandler> = svc.clone();
    let transport: Arc<dyn Transport> = Arc::new(MemoryTransport::new(handler));
    db.connect(transport, Arc::new(StaticToken(token(user))));
}

fn assignee(db: &Database, id: &str) -> Option<Value> {
    db.local()
        .get("assignments", id)
        .expect("read")
        .and_then(|row| row.get("user_id").cloned())
}

/// Alice assigns a1 to bob, then to herself; returns the writer.
async fn reassign(svc: &Arc<SyncService>, dir: &std::path::Path) -> Database {
    let alice = client(dir, 1, Arc::new(SystemClock));
    connect(&alice, svc, "alice");
    alice
        .write(|tx| {
            tx.insert(
                "assignments",
                "a1",
                row_data([("ticket_id", text("t1")), ("user_id", text("bob"))]),
            )
        })
        .expect("assign to bob");
    assert!(alice.sync_now(10_000).await, "alice synced the first assignment");
    alice
        .write(|tx| tx.update("assignments", "a1", row_data([("user_id", text("alice"))])))
        .expect("reassign to alice");
    assert!(alice.sync_now(10_000).await, "alice synced the reassignment");
    alice
}

#[tokio::test]
async fn a_fresh_device_gets_the_newest_values_of_a_row_that_left_one_of_its_buckets() {
    let dir = tempfile::tempdir().expect("tempdir");
    let svc = service(&dir.path().join("server"));
    let alice_dir = dir.path().join("alice");
    std::fs::create_dir_all(&alice_dir).expect("dir");
    let alice = reassign(&svc, &alice_dir).await;
    // The writer's own device (once in about a hundred runs it lost its
    // write: see `staged_download.rs`).
    assert_eq!(assignee(&alice, "a1"), Some(text("alice")));

    let bob_dir = dir.path().join("bob");
    std::fs::create_dir_all(&bob_dir).expect("dir");
    let bob = client(&bob_dir, 2, Arc::new(SystemClock));
    connect(&bob, &svc, "bob");
    assert!(bob.sync_now(10_000).await, "bob's first sync");
    assert_eq!(
        assignee(&bob, "a1"),
        Some(text("alice")),
        "bob's fresh device shows the assignment as the server holds it"
    );
}

#[tokio::test]
async fn a_device_back_from_offline_gets_the_newest_values_of_a_row_that_left_one_of_its_buckets() {
    let dir = tempfile::tempdir().expect("tempdir");
    let svc = service(&dir.path().join("server"));
    let bob_dir = dir.path().join("bob");
    std::fs::create_dir_all(&bob_dir).expect("dir");
    let bob = client(&bob_dir, 2, Arc::new(SystemClock));
    connect(&bob, &svc, "bob");
    assert!(bob.sync_now(10_000).await, "bob's first sync");
    let (live, _) = bob.live_query(&Query::from("assignments"), |_| {}).expect("live query");
    bob.disconnect().await;

    let alice_dir = dir.path().join("alice");
    std::fs::create_dir_all(&alice_dir).expect("dir");
    let _alice = reassign(&svc, &alice_dir).await;

    connect(&bob, &svc, "bob");
    assert!(bob.sync_now(10_000).await, "bob back online");
    assert_eq!(
        assignee(&bob, "a1"),
        Some(text("alice")),
        "bob's device shows the assignment as the server holds it"
    );
    let shown: Vec<(Option<String>, Value)> = live
        .current()
        .expect("live result")
        .rows
        .iter()
        .map(|r| (r.id().map(str::to_owned), r.get("user_id").clone()))
        .collect();
    assert_eq!(
        shown,
        vec![(Some("a1".to_owned()), text("alice"))],
        "the live query shows it too"
    );
}
