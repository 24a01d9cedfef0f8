//! Live queries in the client: they read the visible state, mark rows with
//! pending local writes, and update on local writes, applied checkpoints
//! and rolled-back rejected writes, one diff per commit.

mod common;

use std::sync::{Arc, Mutex};

use common::*;
use ferry_client::query::{col, Order};
use ferry_client::{Diff, Query};
use ferry_core::{row_data, SystemClock, Value};
use ferry_queue::QueueError;
use ferry_transport::{FaultConfig, SyncHandler};

fn pending_by_update() -> Query {
    Query::from("tickets")
        .filter(col("status").eq("pending"))
        .select_cols(["id", "title", "updated_at"])
        .order_by(col("updated_at"), Order::Desc)
        .limit(2)
}

fn ticket(title: &str, status: &str, updated_at: &str) -> ferry_core::RowData {
    row_data([
        ("title", Value::from(title)),
        ("status", Value::from(status)),
        ("updated_at", Value::from(updated_at)),
    ])
}

fn ids(result: &ferry_client::QueryResult) -> Vec<String> {
    result
        .rows
        .iter()
        .map(|r| r.id().unwrap_or_default().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_queries_follow_writes_checkpoints_and_rollbacks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let svc = service(&dir.path().join("server"));
    let handler: Arc<dyn SyncHandler> = svc.clone();
    let a_dir = dir.path().join("a");
    let b_dir = dir.path().join("b");
    std::fs::create_dir_all(&a_dir).expect("dir");
    std::fs::create_dir_all(&b_dir).expect("dir");
    let a = client(&a_dir, 1, Arc::new(SystemClock));
    let b = client(&b_dir, 2, Arc::new(SystemClock));

    let diffs: Arc<Mutex<Vec<Diff>>> = Arc::default();
    let sink = diffs.clone();
    let (live, initial) = a
        .live_query(&pending_by_update(), move |d| {
            sink.lock().expect("diffs").push(d.clone())
        })
        .expect("live query");
    assert!(initial.rows.is_empty());

    // Offline local writes: one transaction, one diff; rows are pending.
    a.write(|tx| {
        tx.insert("tickets", "t1", ticket("one", "pending", "2026-01-01"))?;
        tx.insert("tickets", "t2", ticket("two", "pending", "2026-01-02"))?;
        tx.insert("tickets", "t3", ticket("three", "done", "2026-01-03"))?;
        Ok::<_, QueueError>(())
    })
    .expect("write");
    assert_eq!(diffs.lock().expect("diffs").len(), 1);
    let now = live.current().expect("current");
    assert_eq!(ids(&now), ["t2", "t1"]);
    assert!(now.rows.iter().all(|r| r.pending));

    // Sync: once the server confirms, the rows are no longer pending.
    connect(&a, handler.clone(), FaultConfig::default(), 1, "ann");
    assert!(wait_caught_up(&a, &svc, 10_000).await, "a syncs");
    let now = live.current().expect("current");
    assert_eq!(ids(&now), ["t2", "t1"]);
    assert!(now.rows.iter().all(|r| !r.pending), "{now:?}");

    // Another client's write arrives through a checkpoint.
    connect(&b, handler.clone(), FaultConfig::default(), 2, "bob");
    assert!(wait_caught_up(&b, &svc, 10_000).await, "b syncs");
    b.write(|tx| {
        tx.update(
            "tickets",
            "t3",
            row_data([
                ("status", Value::from("pending")),
                ("updated_at", Value::from("2026-02-01")),
            ]),
        )
    })
    .expect("b writes");
    assert!(wait_caught_up(&b, &svc, 10_000).await, "b uploads");
    assert!(wait_caught_up(&a, &svc, 10_000).await, "a catches up");
    assert_eq!(ids(&live.current().expect("current")), ["t3", "t2"]);

    // A write the server rejects shows at once, then rolls back.
    let before = diffs.lock().expect("diffs").len();
    a.write(|tx| {
        tx.insert(
            "tickets",
            "bad",
            row_data([
                ("status", Value::from("pending")),
                ("updated_at", Value::from("2027-01-01")),
                ("local_note", Value::from("the server has no such column")),
            ]),
        )
    })
    .expect("local write");
    // Shown at once: the write's own diff adds it on top (the result read
    // now may already be past the rejection, which races with this line).
    {
        let diffs = diffs.lock().expect("diffs");
        let shown = diffs[before..]
            .iter()
            .any(|d| d.added.iter().any(|a| a.index == 0 && a.row.id() == Some("bad")));
        assert!(shown, "{:?}", &diffs[before..]);
    }
    assert!(wait_caught_up(&a, &svc, 10_000).await, "a settles");
    assert_eq!(ids(&live.current().expect("current")), ["t3", "t2"]);
    assert!(diffs.lock().expect("diffs").len() >= before + 2, "added, then removed");
    assert_eq!(a.rejections().expect("rejections").len(), 1);

    // A one-shot query sees the same visible state.
    assert_eq!(ids(&a.query(&pending_by_update()).expect("query")), ["t3", "t2"]);
    drop(live);
    a.disconnect().await;
    b.disconnect().await;
}

/// A live query open before a client's first sync sees every row the sync
/// brings (on SQLite the first sync's rows are renamed in at once rather
/// than copied: the query must hear of them all the same).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_query_open_during_the_first_sync_sees_every_row() {
    let dir = tempfile::tempdir().expect("tempdir");
    let svc = service(&dir.path().join("server"));
    let handler: Arc<dyn SyncHandler> = svc.clone();
    let (a_dir, b_dir) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::create_dir_all(&a_dir).expect("dir");
    std::fs::create_dir_all(&b_dir).expect("dir");
    let a = client(&a_dir, 1, Arc::new(SystemClock));
    a.write(|tx| {
        for i in 0..300 {
            tx.insert(
                "tickets",
                &format!("t{i:03}"),
                ticket(
                    &format!("ticket {i}"),
                    "pending",
                    &format!("2026-01-01T00:{:02}:{:02}", i / 60, i % 60),
                ),
            )?;
        }
        Ok::<_, QueueError>(())
    })
    .expect("write");
    connect(&a, handler.clone(), FaultConfig::default(), 1, "ann");
    assert!(wait_caught_up(&a, &svc, 10_000).await, "a uploads");

    // Without indexes on tickets, so the first sync's rows are renamed in.
    let b = client_with_schema(&b_dir, 2, Arc::new(SystemClock), schema_with_ticket_index(false));
    let diffs: Arc<Mutex<Vec<Diff>>> = Arc::default();
    let sink = diffs.clone();
    let (live, initial) = b
        .live_query(&pending_by_update(), move |d| {
            sink.lock().expect("diffs").push(d.clone())
        })
        .expect("live query");
    assert!(initial.rows.is_empty());
    let everything = Query::from("tickets");
    let (all, _) = b.live_query(&everything, |_| {}).expect("live query");
    connect(&b, handler, FaultConfig::default(), 2, "bob");
    assert!(wait_caught_up(&b, &svc, 10_000).await, "b syncs");
    assert_eq!(ids(&live.current().expect("current")), ["t299", "t298"]);
    assert!(!diffs.lock().expect("diffs").is_empty());
    assert_eq!(all.current().expect("current").rows.len(), 300);
    drop((live, all));
    a.disconnect().await;
    b.disconnect().await;
}

/// Run `f` on a thread of its own: `None` when it has not returned within
/// five seconds (it deadlocked).
fn within_5s<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(std::time::Duration::from_secs(5)).ok()
}

/// Calling back into the database from a live query's callback, or from a
/// write's closure, is not allowed: a write there is refused with an error
/// saying why instead of deadlocking every later write, and a live query
/// dropped in its own callback ends without deadlocking.
/// A live query callback (which runs inside the write) reads the
/// database's status and queue counters without waiting for itself, and
/// sees the write it was called for.
#[test]
fn a_callback_reads_the_status_and_queue_of_the_write_it_sees() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = client(dir.path(), 1, Arc::new(SystemClock));
    // (status pending ops, pending_len, last_seq, completed_through)
    type Seen = Vec<(u64, u64, u64, u64)>;
    let inside: Arc<Mutex<Seen>> = Arc::default();
    let (reader, seen) = (db.clone(), inside.clone());
    let (_live, _) = db
        .live_query(&Query::from("tickets"), move |_| {
            let local = reader.local();
            let status = reader.status();
            seen.lock().expect("seen").push((
                status.pending_ops,
                local.pending_len().expect("pending"),
                local.last_seq(),
                local.completed_through(),
            ));
        })
        .expect("live query");
    for i in 1..=2 {
        let db2 = db.clone();
        within_5s(move || db2.write(|tx| tx.insert("tickets", &format!("t{i}"), ticket("a", "pending", "1"))))
            .expect("a write whose live query callback reads the status returns")
            .expect("write");
    }
    assert_eq!(*inside.lock().expect("seen"), [(1, 1, 1, 0), (2, 2, 2, 0)]);

    // A query, a live query or a live query's result from inside the
    // callback (which holds the live queries) is refused, not a deadlock.
    let answers: Arc<Mutex<Vec<String>>> = Arc::default();
    let (reader, seen) = (db.clone(), answers.clone());
    let (_live2, _) = db
        .live_query(&Query::from("tickets"), move |_| {
            let q = reader.query(&Query::from("tickets")).map(|r| r.rows.len());
            let l = reader.live_query(&Query::from("tickets"), |_| {}).map(|_| ());
            seen.lock().expect("seen").push(format!("{q:?} {l:?}"));
        })
        .expect("live query");
    let db2 = db.clone();
    within_5s(move || db2.write(|tx| tx.insert("tickets", "t3", ticket("a", "pending", "1"))))
        .expect("a write whose live query callback queries returns")
        .expect("write");
    let answers = answers.lock().expect("seen").clone();
    assert_eq!(answers.len(), 1, "{answers:?}");
    assert_eq!(answers[0].matches("Reentrant").count(), 2, "{answers:?}");
    assert_eq!(db.query(&Query::from("tickets")).expect("query after").rows.len(), 3);
}

#[test]
fn writes_from_callbacks_are_refused_and_a_query_may_drop_itself() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = client(dir.path(), 1, Arc::new(SystemClock));

    let inside: Arc<Mutex<Vec<String>>> = Arc::default();
    let (writer, seen) = (db.clone(), inside.clone());
    let (live, _) = db
        .live_query(&Query::from("tickets"), move |_| {
            let r = writer.write(|tx| tx.insert("comments", "c1", row_data([("body", Value::from("x"))])));
            seen.lock().expect("seen").push(format!("{r:?}"));
        })
        .expect("live query");
    let db2 = db.clone();
    let r = within_5s(move || db2.write(|tx| tx.insert("tickets", "t1", ticket("a", "pending", "1"))))
        .expect("a write whose live query callback writes returns");
    r.expect("the outer write commits");
    let inside = inside.lock().expect("seen").clone();
    assert_eq!(inside.len(), 1, "{inside:?}");
    assert!(inside[0].contains("Reentrant"), "{inside:?}");
    assert_eq!(db.local().get("comments", "c1").expect("get"), None);
    drop(live);

    // A write from inside a write's closure.
    let db2 = db.clone();
    let nested = within_5s(move || {
        let inner = db2.clone();
        db2.write(|_tx| inner.write(|tx| tx.insert("tickets", "t2", ticket("b", "pending", "2"))))
    })
    .expect("a nested write returns");
    assert!(matches!(nested, Err(QueueError::Reentrant)), "{nested:?}");
    assert_eq!(db.local().get("tickets", "t2").expect("get"), None);

    // A live query that drops itself on its first diff.
    let slot: Arc<Mutex<Option<ferry_client::LiveQuery>>> = Arc::default();
    let calls = Arc::new(Mutex::new(0));
    let (own, count) = (slot.clone(), calls.clone());
    let (live, _) = db
        .live_query(&Query::from("tickets"), move |_| {
            *count.lock().expect("count") += 1;
            drop(own.lock().expect("slot").take());
        })
        .expect("live query");
    *slot.lock().expect("slot") = Some(live);
    for i in 3..5 {
        let db2 = db.clone();
        within_5s(move || db2.write(|tx| tx.insert("tickets", &format!("t{i}"), ticket("c", "pending", "3"))))
            .expect("a write whose live query drops itself returns")
            .expect("write");
    }
    assert_eq!(
        *calls.lock().expect("count"),
        1,
        "the dropped query got no diff after it"
    );
}
