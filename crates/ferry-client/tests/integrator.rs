//! What an outside integrator found, client side, each through the public
//! API with the real sync service and SQLite client stores:
//! unique client ids without the app's help, outcomes that survive a
//! disconnect and a restart, a causally later edit from a device with a
//! slow clock, a client schema that is a subset of the server's, the
//! lifecycle calls an app needs, and an upload queue no refused request
//! can wedge.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use common::{client_schema, service, text, token, wait_until, SECRET};
use ferry_client::{ClientOptions, Database, StaticToken, UploadOutcome};
use ferry_core::{row_data, Clock, ManualClock, SystemClock};
use ferry_protocol::Outcome;
use ferry_queue::LocalDbOptions;
use ferry_server::{ServiceOptions, SqliteSourceDb, SyncRules, SyncService};
use ferry_sqlite::SqliteStore;
use ferry_transport::{MemoryTransport, SyncHandler, Transport};

/// A client with the app's defaults (no seed: the id is the library's).
fn default_client(path: &std::path::Path) -> Database {
    let store = SqliteStore::open(path, client_schema()).expect("client store");
    Database::open(Arc::new(store), ClientOptions::default()).expect("open client")
}

fn client_with_clock(path: &std::path::Path, clock: Arc<dyn Clock>) -> Database {
    let store = SqliteStore::open(path, client_schema()).expect("client store");
    let options = ClientOptions {
        local: LocalDbOptions {
            clock,
            ..LocalDbOptions::default()
        },
        retry_initial_delay_ms: 5,
        retry_max_delay_ms: 50,
        upload_poll_interval_ms: 20,
        ..ClientOptions::default()
    };
    Database::open(Arc::new(store), options).expect("open client")
}

fn connect(db: &Database, svc: &Arc<SyncService>, user: &str) {
    let handler: Arc<dyn SyncHandler> = svc.clone();
    let transport: Arc<dyn Transport> = Arc::new(MemoryTransport::new(handler));
    db.connect(transport, Arc::new(StaticToken(token(user))));
}

fn insert_ticket(db: &Database, id: &str, title: &str) -> ferry_client::WriteReceipt {
    let ((), receipt) = db
        .write_with_receipt(|tx| {
            tx.insert(
                "tickets",
                id,
                row_data([("title", text(title)), ("status", text("pending"))]),
            )
        })
        .expect("write");
    receipt.expect("a queued write has a receipt")
}

/// A service that refuses uploads of more than five ops as a whole.
fn service_taking_five_ops(dir: &std::path::Path) -> Arc<SyncService> {
    let db = SqliteSourceDb::open_dir(dir).expect("source db");
    Arc::new(
        SyncService::builder(Arc::new(db), SyncRules::ticket_tracker().expect("rules"), SECRET)
            .options(ServiceOptions {
                max_upload_ops: 5,
                ..ServiceOptions::default()
            })
            .build()
            .expect("service"),
    )
}

fn server_title(svc: &SyncService, id: &str) -> Option<String> {
    let table = svc.rules().schema().table("tickets").expect("tickets").clone();
    let row = svc.db().get_row(&table, id).expect("read")?;
    row.data?.get("title").and_then(|v| v.as_text().map(str::to_owned))
}

/// Item 1: databases opened back to back with default options get distinct
/// ids, and two devices' first writes both reach the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_opened_together_never_share_an_id_and_both_writes_land() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut ids = BTreeSet::new();
    for i in 0..50 {
        let a = default_client(&dir.path().join(format!("a{i}.db")));
        let b = default_client(&dir.path().join(format!("b{i}.db")));
        assert!(ids.insert(a.client_id().to_owned()), "repeated id {}", a.client_id());
        assert!(ids.insert(b.client_id().to_owned()), "repeated id {}", b.client_id());
    }
    let svc = service(&dir.path().join("server"));
    let a = default_client(&dir.path().join("dev-a.db"));
    let b = default_client(&dir.path().join("dev-b.db"));
    insert_ticket(&a, "from-a", "A");
    insert_ticket(&b, "from-b", "B");
    connect(&a, &svc, "ann");
    connect(&b, &svc, "ann");
    assert!(a.wait_until_settled(10_000).await && b.wait_until_settled(10_000).await);
    assert_eq!(server_title(&svc, "from-a").as_deref(), Some("A"));
    assert_eq!(server_title(&svc, "from-b").as_deref(), Some("B"));
    // Reopening keeps the id.
    let id = a.client_id().to_owned();
    a.close().await.expect("close");
    let a = default_client(&dir.path().join("dev-a.db"));
    assert_eq!(a.client_id(), id);
}

/// Item 2: an app that disconnects and reconnects in a loop, and restarts,
/// still learns every write's fate: each seq has exactly one stored
/// outcome, and every applied write is on the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outcomes_survive_disconnects_and_restarts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let svc = service(&dir.path().join("server"));
    let path = dir.path().join("app.db");
    let db = client_with_clock(&path, Arc::new(SystemClock));
    let mut heard: BTreeMap<u64, UploadOutcome> = BTreeMap::new();
    let mut receipts = Vec::new();
    for round in 0..30 {
        let mut outcomes = db.subscribe_outcomes();
        connect(&db, &svc, "ann");
        receipts.push(insert_ticket(&db, &format!("t{round}"), &format!("round {round}")));
        tokio::time::sleep(Duration::from_millis(round % 7)).await;
        db.disconnect().await;
        while let Ok(o) = outcomes.try_recv() {
            heard.insert(o.outcome.seq, o);
        }
    }
    connect(&db, &svc, "ann");
    assert!(db.wait_until_settled(10_000).await, "settles");
    db.close().await.expect("close");
    // A restart: only the store is left.
    let db = client_with_clock(&path, Arc::new(SystemClock));
    let stored = db.outcomes_since(0, 1_000).expect("outcomes");
    let seqs: Vec<u64> = stored.iter().map(|o| o.outcome.seq).collect();
    let expected: Vec<u64> = receipts.iter().map(|r| r.first_seq).collect();
    assert_eq!(seqs, expected, "one stored outcome per write, in seq order");
    for (o, r) in stored.iter().zip(&receipts) {
        assert_eq!(o.tx_id, r.tx_id, "the outcome names the write's transaction");
        assert_eq!(o.outcome.outcome, Outcome::Applied);
        // What the broadcast delivered agrees with the store.
        if let Some(live) = heard.get(&o.outcome.seq) {
            assert_eq!(live, o);
        }
    }
    for round in 0..30 {
        assert_eq!(
            server_title(&svc, &format!("t{round}")),
            Some(format!("round {round}")),
            "applied write of round {round} is on the server"
        );
    }
    // Resuming after a seq returns only later ones.
    let later = db.outcomes_since(expected[9], 5).expect("outcomes");
    assert_eq!(
        later.iter().map(|o| o.outcome.seq).collect::<Vec<_>>(),
        expected[10..15].to_vec()
    );
}

/// Item 4: a device whose clock is seconds slow edits a value it has just
/// received; its edit is causally later and wins under last-write-wins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edit_after_seeing_a_value_wins_even_with_a_slow_clock() {
    let dir = tempfile::tempdir().expect("tempdir");
    let svc = service(&dir.path().join("server"));
    let now = SystemClock.now_ms();
    let fast = client_with_clock(&dir.path().join("fast.db"), Arc::new(SystemClock));
    let slow_clock = Arc::new(ManualClock::new(now - 5_000));
    let slow = client_with_clock(&dir.path().join("slow.db"), slow_clock);
    connect(&fast, &svc, "ann");
    connect(&slow, &svc, "bob");
    insert_ticket(&fast, "t1", "from the fast device");
    assert!(fast.wait_until_settled(10_000).await);
    assert!(
        wait_until(10_000, || slow
            .local()
            .get("tickets", "t1")
            .expect("get")
            .is_some_and(|r| r.get("title") == Some(&text("from the fast device"))))
        .await,
        "the slow device receives the ticket"
    );
    let mut outcomes = slow.subscribe_outcomes();
    slow.write(|tx| tx.update("tickets", "t1", row_data([("title", text("edited after seeing it"))])))
        .expect("edit");
    let o = tokio::time::timeout(Duration::from_secs(10), outcomes.recv())
        .await
        .expect("an outcome")
        .expect("outcome");
    assert_eq!(o.outcome.outcome, Outcome::Applied, "{o:?}");
    assert!(slow.wait_until_settled(10_000).await);
    assert_eq!(server_title(&svc, "t1").as_deref(), Some("edited after seeing it"));
}

/// Item 5: an app version that declares fewer columns than the server's
/// table syncs and updates rows; the server keeps the columns it does not
/// know.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_schema_with_fewer_columns_keeps_working() {
    let dir = tempfile::tempdir().expect("tempdir");
    let svc = service(&dir.path().join("server"));
    let full = client_with_clock(&dir.path().join("full.db"), Arc::new(SystemClock));
    connect(&full, &svc, "ann");
    full.write(|tx| {
        tx.insert(
            "tickets",
            "t1",
            row_data([
                ("title", text("T")),
                ("status", text("pending")),
                ("description", text("kept")),
            ]),
        )
    })
    .expect("write");
    assert!(full.wait_until_settled(10_000).await);

    let rules = SyncRules::ticket_tracker().expect("rules");
    let server_tickets = rules.schema().table("tickets").expect("tickets");
    let mut old_tickets = ferry_core::Table::new("tickets");
    for c in server_tickets.columns.iter().filter(|c| c.name != "description") {
        old_tickets = old_tickets.column(c.name.clone(), c.ty);
    }
    let schema = ferry_core::Schema::new([old_tickets]).expect("schema");
    let store = SqliteStore::open(dir.path().join("old.db"), schema).expect("store");
    let old = Database::open(Arc::new(store), ClientOptions::default()).expect("open");
    connect(&old, &svc, "bob");
    assert!(
        wait_until(10_000, || old.local().get("tickets", "t1").expect("get").is_some()).await,
        "the old app receives the ticket"
    );
    let row = old.local().get("tickets", "t1").expect("get").expect("row");
    assert!(
        !row.contains_key("description"),
        "only declared columns are kept: {row:?}"
    );
    let mut outcomes = old.subscribe_outcomes();
    old.write(|tx| tx.update("tickets", "t1", row_data([("status", text("done"))])))
        .expect("an update of a synced row works");
    let o = tokio::time::timeout(Duration::from_secs(10), outcomes.recv())
        .await
        .expect("an outcome")
        .expect("outcome");
    assert_eq!(o.outcome.outcome, Outcome::Applied);
    assert!(old.wait_until_settled(10_000).await);
    let table = svc.rules().schema().table("tickets").expect("tickets").clone();
    let stored = svc
        .db()
        .get_row(&table, "t1")
        .expect("read")
        .and_then(|r| r.data)
        .expect("row");
    assert_eq!(stored.get("status"), Some(&text("done")));
    assert_eq!(stored.get("description"), Some(&text("kept")));
}

/// Item 12: pausing uploads keeps the download stream running, pausing
/// downloads keeps uploads running, and `sync_now` catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_and_downloads_pause_independently_and_sync_now_catches_up() {
    let dir = tempfile::tempdir().expect("tempdir");
    let svc = service(&dir.path().join("server"));
    let a = client_with_clock(&dir.path().join("a.db"), Arc::new(SystemClock));
    let b = client_with_clock(&dir.path().join("b.db"), Arc::new(SystemClock));
    connect(&a, &svc, "ann");
    connect(&b, &svc, "bob");

    a.pause_uploads(true);
    insert_ticket(&a, "held", "held back");
    insert_ticket(&b, "from-b", "B");
    assert!(
        wait_until(10_000, || a.local().get("tickets", "from-b").expect("get").is_some()).await,
        "downloads keep running while uploads are paused"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(server_title(&svc, "held"), None, "nothing uploaded while paused");
    assert_eq!(a.local().upload_queue_len(), 1);
    assert!(a.status().uploads_paused);
    a.pause_uploads(false);
    assert!(a.sync_now(10_000).await, "sync_now catches up");
    assert_eq!(server_title(&svc, "held").as_deref(), Some("held back"));
    let server_op = a.status().server_op_id.expect("the server's op id is known");
    assert!(a.wait_for_server_op(server_op, 1_000).await);
    assert_eq!(
        a.local().pending_len().expect("pending"),
        0,
        "confirmed by the fresh checkpoint"
    );

    a.pause_downloads(true);
    assert!(a.wait_for_status(5_000, |s| !s.connected).await, "the stream closes");
    insert_ticket(&a, "while-deaf", "W");
    insert_ticket(&b, "unseen", "U");
    assert!(
        wait_until(10_000, || server_title(&svc, "while-deaf").is_some()).await,
        "uploads keep running while downloads are paused"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(a.local().get("tickets", "unseen").expect("get").is_none());
    a.pause_downloads(false);
    assert!(a.sync_now(10_000).await);
    assert!(a.local().get("tickets", "unseen").expect("get").is_some());
}

/// Issue 9, item 5: a transaction the server refuses whole does not wedge
/// the queue: it becomes a `rejected` outcome with the server's reason, is
/// rolled back, and later writes go through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_transaction_is_rejected_and_the_queue_moves_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let svc = service_taking_five_ops(&dir.path().join("server"));
    let client = client_with_clock(&dir.path().join("c.db"), Arc::new(SystemClock));
    let small_before = insert_ticket(&client, "before", "before");
    let ((), big) = client
        .write_with_receipt(|tx| {
            for i in 0..8 {
                tx.insert(
                    "tickets",
                    &format!("big{i}"),
                    row_data([("title", text("part of a big one"))]),
                )?;
            }
            Ok::<_, ferry_queue::QueueError>(())
        })
        .expect("write");
    let big = big.expect("receipt");
    let small_after = insert_ticket(&client, "after", "after");
    connect(&client, &svc, "ann");
    assert!(client.wait_until_settled(10_000).await, "the queue drains");
    assert_eq!(server_title(&svc, "before").as_deref(), Some("before"));
    assert_eq!(server_title(&svc, "after").as_deref(), Some("after"));
    assert_eq!(server_title(&svc, "big0"), None);
    assert!(
        client.local().get("tickets", "big0").expect("get").is_none(),
        "rolled back"
    );
    let outcomes = client.outcomes_since(0, 100).expect("outcomes");
    assert_eq!(
        outcomes.len() as u64,
        small_after.last_seq,
        "every write has an outcome"
    );
    for o in &outcomes {
        let in_big = (big.first_seq..=big.last_seq).contains(&o.outcome.seq);
        match &o.outcome.outcome {
            Outcome::Rejected { reason } => {
                assert!(in_big, "only the big transaction is rejected: {o:?}");
                assert!(reason.contains("limit"), "the server's reason is kept: {reason}");
            }
            other => {
                assert!(!in_big, "{other:?}");
                assert_eq!(other, &Outcome::Applied);
            }
        }
    }
    assert_eq!(small_before.first_seq, 1);
    assert_eq!(client.rejections().expect("log").len(), 8);
}

/// Item 4, across a restart: a device whose clock lags restarts and edits
/// what it saw before it reconnects; the edit still orders after the value
/// it replaces (the clock's high-water mark is stored).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_device_with_a_lagging_clock_still_wins_with_a_later_edit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let svc = service(&dir.path().join("server"));
    let fast = client_with_clock(&dir.path().join("fast.db"), Arc::new(SystemClock));
    connect(&fast, &svc, "ann");
    insert_ticket(&fast, "t1", "from the fast device");
    assert!(fast.wait_until_settled(10_000).await);
    let slow_clock: Arc<dyn Clock> = Arc::new(ManualClock::new(SystemClock.now_ms() - 5_000));
    let path = dir.path().join("slow.db");
    let slow = client_with_clock(&path, slow_clock.clone());
    connect(&slow, &svc, "bob");
    assert!(
        wait_until(10_000, || slow.local().get("tickets", "t1").expect("get").is_some()).await,
        "the slow device receives the ticket"
    );
    slow.close().await.expect("close");
    let slow = client_with_clock(&path, slow_clock);
    slow.write(|tx| tx.update("tickets", "t1", row_data([("title", text("edited after a restart"))])))
        .expect("edit");
    let mut outcomes = slow.subscribe_outcomes();
    connect(&slow, &svc, "bob");
    let o = tokio::time::timeout(Duration::from_secs(10), outcomes.recv())
        .await
        .expect("an outcome")
        .expect("outcome");
    assert_eq!(o.outcome.outcome, Outcome::Applied, "{o:?}");
    assert_eq!(server_title(&svc, "t1").as_deref(), Some("edited after a restart"));
}

/// A transaction refused whole as the last write does not linger as
/// pending: the server never saw it, so no checkpoint would confirm it
/// (found by the fleet simulation).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_last_transaction_does_not_linger_as_pending() {
    let dir = tempfile::tempdir().expect("tempdir");
    let svc = service_taking_five_ops(&dir.path().join("server"));
    let client = client_with_clock(&dir.path().join("c.db"), Arc::new(SystemClock));
    insert_ticket(&client, "before", "before");
    client
        .write(|tx| {
            for i in 0..8 {
                tx.insert("tickets", &format!("big{i}"), row_data([("title", text("too big"))]))?;
            }
            Ok::<_, ferry_queue::QueueError>(())
        })
        .expect("write");
    connect(&client, &svc, "ann");
    assert!(
        client.wait_until_settled(10_000).await,
        "settles: {:?}",
        client.status()
    );
    assert_eq!(client.local().pending_len().expect("pending"), 0);
    assert!(client.local().get("tickets", "big0").expect("get").is_none());
    assert_eq!(server_title(&svc, "before").as_deref(), Some("before"));
}
