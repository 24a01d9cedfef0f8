//! An outside app developer's probe of the client's consistency contract,
//! round 4: a real `ferry-server` in-process over HTTP (`ferry_server::run`,
//! `HttpTransport`), SQLite client stores, sync rules with per-user buckets
//! and write permissions, and only the public client API. Each test plays
//! one awkward story (answers lost, restarts, a server restart, an expiring
//! token, permission rejections between pending writes, rows that change
//! owner while a device is offline, the queue limit, odd ids) and checks:
//! every acknowledged write reaches the server once or is rejected where
//! the app sees it, every write has exactly one outcome, live queries end
//! equal to a fresh query, and users see only their buckets.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use common::wait_until;
use ferry_client::query::{col, Order};
use ferry_client::{
    ClientError, ClientOptions, Credentials, Database, Diff, LiveQuery, Query, QueryResult, UploadOutcome, WriteReceipt,
};
use ferry_core::{row_data, Limits, RowData, Schema, SystemClock, Value};
use ferry_http::HttpTransport;
use ferry_protocol::Outcome;
use ferry_queue::QueueError;
use ferry_server::{mint_token, AuthOptions, BoundServer, ServerConfig, ServiceOptions, SyncRules};
use ferry_sqlite::SqliteStore;
use ferry_transport::{LineStream, Transport, TransportError};
use parking_lot::Mutex;

const SECRET: &str = "probe-round-four-secret";

/// Tickets are private to their owner (bucket `mine`); the board is shared.
/// A user writes only tickets they own (and may hand one to someone else)
/// and board posts as their author.
const RULES: &str = r#"
[[tables]]
name = "tickets"
columns = [
  { name = "title", type = "text" },
  { name = "status", type = "text" },
  { name = "owner", type = "text" },
  { name = "n", type = "integer" },
]

[[tables]]
name = "board"
columns = [
  { name = "title", type = "text" },
  { name = "author", type = "text" },
]

[[buckets]]
name = "mine"
parameters = ["sub"]
data = [{ table = "tickets", where = { owner = "sub" } }]

[[buckets]]
name = "global"
data = [{ table = "board" }]

[[tables]]
name = "team_posts"
columns = [
  { name = "title", type = "text" },
  { name = "team", type = "text" },
]

[[buckets]]
name = "team"
parameters = ["team"]
data = [{ table = "team_posts", where = { team = "team" } }]

[[permissions]]
table = "team_posts"
insert = "new.team == auth.team"
update = "old.team == auth.team and new.team == auth.team"
delete = "old.team == auth.team"

[[permissions]]
table = "tickets"
insert = "new.owner == auth.sub"
update = "old.owner == auth.sub"
delete = "old.owner == auth.sub"

[[permissions]]
table = "board"
insert = "new.author == auth.sub"
update = "old.author == auth.sub and new.author == auth.sub"
delete = "old.author == auth.sub"
"#;

fn rules() -> SyncRules {
    SyncRules::from_toml(RULES).expect("rules")
}

/// The rules' client schema, with an index on each table's title (live
/// queries ordered by title with a limit are served by index windows).
fn schema() -> Schema {
    let synced = rules().client_schema();
    let indexed = |name: &str| {
        synced
            .table(name)
            .expect("a synced table")
            .clone()
            .index("by_title", &["title"])
    };
    Schema::new([indexed("tickets"), indexed("board"), indexed("team_posts")]).expect("client schema")
}

/// The server on SQLite under `dir`, over HTTP on a free loopback port, with
/// no leeway on token expiry and a keepalive every second.
async fn start_server(dir: &Path) -> BoundServer {
    start_server_with(
        dir,
        ServiceOptions {
            keepalive_interval_s: 1,
            ..ServiceOptions::default()
        },
    )
    .await
}

/// [`start_server`] with these service options.
async fn start_server_with(dir: &Path, service: ServiceOptions) -> BoundServer {
    start_server_on(dir, service, RULES).await
}

/// [`start_server`] with these service options and rules.
async fn start_server_on(dir: &Path, service: ServiceOptions, rules: &str) -> BoundServer {
    let rules_path = dir.join("rules.toml");
    std::fs::create_dir_all(dir).expect("server dir");
    std::fs::write(&rules_path, rules).expect("rules file");
    ferry_server::run(
        ServerConfig {
            data_dir: dir.join("data"),
            listen_addr: "127.0.0.1:0".parse().expect("addr"),
            jwt_secret: Some(SECRET.into()),
            rules_path: Some(rules_path),
            compact_interval_s: 0,
            auth: AuthOptions {
                leeway_s: 0,
                ..AuthOptions::default()
            },
            service,
            ..ServerConfig::default()
        },
        std::future::pending::<()>(),
    )
    .await
    .expect("server")
}

fn http(server: &BoundServer) -> Arc<dyn Transport> {
    Arc::new(HttpTransport::new(format!("http://{}", server.addr)).expect("transport"))
}

/// The app's network: the HTTP transport of the server currently up (none:
/// the network is down), optionally losing upload answers after the server
/// handled the upload.
#[derive(Debug)]
struct Front {
    target: Mutex<Option<Arc<dyn Transport>>>,
    /// Answers still to lose (the server handled the upload; the app never
    /// hears back).
    lose_answers: AtomicU64,
    /// Uploads the server handled.
    handled: AtomicU64,
    /// Answers lost.
    lost: AtomicU64,
    /// Stream lines still let through (then every stream breaks).
    lines_left: Arc<AtomicU64>,
}

impl Default for Front {
    fn default() -> Self {
        Front {
            target: Mutex::default(),
            lose_answers: AtomicU64::new(0),
            handled: AtomicU64::new(0),
            lost: AtomicU64::new(0),
            lines_left: Arc::new(AtomicU64::new(u64::MAX)),
        }
    }
}

/// A stream that breaks once its front's line budget is spent.
struct Budgeted {
    inner: Box<dyn LineStream>,
    left: Arc<AtomicU64>,
}

#[async_trait]
impl LineStream for Budgeted {
    async fn next_line(&mut self) -> Result<Option<Vec<u8>>, TransportError> {
        if self
            .left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_err()
        {
            return Err(TransportError::Connection("the stream broke".into()));
        }
        self.inner.next_line().await
    }
}

impl Front {
    fn to(server: &BoundServer) -> Arc<Front> {
        let front = Arc::new(Front::default());
        front.switch(Some(server));
        front
    }

    fn switch(&self, server: Option<&BoundServer>) {
        *self.target.lock() = server.map(http);
    }

    fn current(&self) -> Result<Arc<dyn Transport>, TransportError> {
        self.target
            .lock()
            .clone()
            .ok_or_else(|| TransportError::Connection("the network is down".into()))
    }
}

#[async_trait]
impl Transport for Front {
    async fn open_stream(&self, token: &str, request: Vec<u8>) -> Result<Box<dyn LineStream>, TransportError> {
        let inner = self.current()?.open_stream(token, request).await?;
        Ok(Box::new(Budgeted {
            inner,
            left: self.lines_left.clone(),
        }))
    }

    async fn upload(&self, token: &str, request: Vec<u8>) -> Result<Vec<u8>, TransportError> {
        let answer = self.current()?.upload(token, request).await?;
        self.handled.fetch_add(1, Ordering::SeqCst);
        let lose = self
            .lose_answers
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if lose {
            self.lost.fetch_add(1, Ordering::SeqCst);
            return Err(TransportError::Connection(
                "the connection dropped before the answer".into(),
            ));
        }
        Ok(answer)
    }
}

/// Tokens minted on demand: `ttl_s` long, the first one garbage when
/// `bad_first`, counting how often a fresh one was asked for.
#[derive(Debug)]
struct Minted {
    user: String,
    ttl_s: u64,
    bad_first: AtomicBool,
    refreshes: AtomicU64,
    /// Claims besides `sub`, as of the next token.
    claims: Mutex<serde_json::Map<String, serde_json::Value>>,
}

impl Minted {
    fn new(user: &str, ttl_s: u64) -> Arc<Minted> {
        Arc::new(Minted {
            user: user.to_owned(),
            ttl_s,
            bad_first: AtomicBool::new(false),
            refreshes: AtomicU64::new(0),
            claims: Mutex::default(),
        })
    }
}

#[async_trait]
impl Credentials for Minted {
    async fn token(&self, refresh: bool) -> Result<String, ClientError> {
        if refresh {
            self.refreshes.fetch_add(1, Ordering::SeqCst);
        }
        if self.bad_first.swap(false, Ordering::SeqCst) {
            return Ok("not-a-token".into());
        }
        let claims = self.claims.lock().clone();
        Ok(mint_token(SECRET, &self.user, self.ttl_s, &claims))
    }
}

fn creds(user: &str) -> Arc<dyn Credentials> {
    Minted::new(user, 3600)
}

fn options(seed: u64, limits: Limits) -> ClientOptions {
    let mut options = common::client_options(seed, Arc::new(SystemClock));
    options.local.limits = limits;
    options
}

fn open_with(path: &Path, seed: u64, limits: Limits) -> Database {
    let store = SqliteStore::open(path, schema()).expect("client store");
    Database::open(Arc::new(store), options(seed, limits)).expect("open client")
}

fn open(path: &Path, seed: u64) -> Database {
    open_with(path, seed, Limits::default())
}

fn text(s: &str) -> Value {
    Value::from(s)
}

fn ticket(title: &str, owner: &str) -> RowData {
    row_data([("title", text(title)), ("status", text("open")), ("owner", text(owner))])
}

fn post(title: &str, author: &str) -> RowData {
    row_data([("title", text(title)), ("author", text(author))])
}

/// One local transaction; its receipt.
fn write(db: &Database, f: impl FnOnce(&mut ferry_client::WriteTx<'_>) -> Result<(), QueueError>) -> WriteReceipt {
    let ((), receipt) = db.write_with_receipt(f).expect("local write");
    receipt.expect("the write queued something")
}

/// Every local write answered and confirmed, and a checkpoint taken after
/// the call (so other users' writes made before it are in).
async fn settle(db: &Database) {
    assert!(db.sync_now(5_000).await, "sync_now: {:?}", db.status());
    assert!(db.wait_until_settled(5_000).await, "settles: {:?}", db.status());
}

/// A live query whose diffs the app applies to its first result, as a UI
/// would; compared with a fresh query of the store.
struct Mirror {
    query: Query,
    first: QueryResult,
    diffs: Arc<Mutex<Vec<Diff>>>,
    _live: LiveQuery,
}

impl Mirror {
    fn new(db: &Database, query: Query) -> Mirror {
        let diffs: Arc<Mutex<Vec<Diff>>> = Arc::default();
        let sink = diffs.clone();
        let (live, first) = db
            .live_query(&query, move |d| sink.lock().push(d.clone()))
            .expect("live query");
        Mirror {
            query,
            first,
            diffs,
            _live: live,
        }
    }

    fn shown(&self) -> QueryResult {
        let mut shown = self.first.clone();
        for d in self.diffs.lock().iter() {
            shown.apply_diff(d);
        }
        shown
    }

    fn check(&self, db: &Database, what: &str) {
        let fresh = db.query(&self.query).expect("fresh query");
        assert_eq!(self.shown(), fresh, "{what}: the live query differs from a fresh query");
    }
}

fn tickets_by_title() -> Query {
    Query::from("tickets").order_by(col("title"), Order::Asc)
}

fn board_by_title() -> Query {
    Query::from("board").order_by(col("title"), Order::Asc)
}

fn ids(db: &Database, table: &str) -> BTreeSet<String> {
    db.local()
        .scan(table)
        .expect("scan")
        .into_iter()
        .map(|(id, _)| id)
        .collect()
}

fn server_row(server: &BoundServer, table: &str, id: &str) -> Option<RowData> {
    let table = server.service.rules().schema().table(table).expect("table").clone();
    server.service.db().get_row(&table, id).expect("server read")?.data
}

/// The server's newest op id: with every row in one bucket, one op per
/// applied row write.
fn server_ops(server: &BoundServer) -> u64 {
    server
        .service
        .db()
        .checkpoint("probe-observer", &[])
        .expect("checkpoint")
        .last_op_id
}

/// Every seq through the last one has exactly one stored outcome.
fn stored_outcomes(db: &Database) -> BTreeMap<u64, UploadOutcome> {
    let all = db.outcomes_since(0, 100_000).expect("outcomes");
    let mut by_seq = BTreeMap::new();
    for o in all {
        assert!(
            by_seq.insert(o.outcome.seq, o.clone()).is_none(),
            "two outcomes for {o:?}"
        );
    }
    let seqs: Vec<u64> = by_seq.keys().copied().collect();
    let expected: Vec<u64> = (1..=db.local().last_seq()).collect();
    assert_eq!(seqs, expected, "one stored outcome per queued write");
    by_seq
}

fn is_rejected(o: &UploadOutcome) -> bool {
    matches!(o.outcome.outcome, Outcome::Rejected { .. })
}

/// Answers lost on the way back (the server applied the upload), then the
/// app killed and reopened: every write gets one outcome, the server holds
/// each write once, and an outcome subscriber hears each seq once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_answers_and_a_restart_leave_one_outcome_and_one_server_op_per_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start_server(&dir.path().join("server")).await;
    let path = dir.path().join("alice.db");
    let db = open(&path, 1);
    let front = Front::to(&server);
    front.lose_answers.store(u64::MAX, Ordering::SeqCst);
    for i in 0..3 {
        write(&db, |tx| {
            tx.insert("tickets", &format!("t{i}"), ticket(&format!("first {i}"), "alice"))
        });
    }
    db.connect(front.clone(), creds("alice"));
    assert!(
        wait_until(5_000, || front.lost.load(Ordering::SeqCst) >= 2).await,
        "the server handled the upload twice"
    );
    for i in 3..6 {
        write(&db, |tx| {
            tx.insert("tickets", &format!("t{i}"), ticket(&format!("later {i}"), "alice"))
        });
    }
    let lost = front.lost.load(Ordering::SeqCst);
    assert!(wait_until(5_000, || front.lost.load(Ordering::SeqCst) >= lost + 2).await);
    // Killed: no graceful stop.
    drop(db);

    let db = open(&path, 1);
    assert_eq!(db.local().upload_queue_len(), 6, "nothing answered yet");
    let mut heard = db.subscribe_outcomes();
    db.connect(Arc::new(http(&server)), creds("alice"));
    settle(&db).await;
    let outcomes = stored_outcomes(&db);
    assert!(
        outcomes.values().all(|o| o.outcome.outcome == Outcome::Applied),
        "{outcomes:?}"
    );
    let mut live: Vec<u64> = Vec::new();
    while let Ok(o) = heard.try_recv() {
        live.push(o.outcome.seq);
    }
    assert_eq!(live, (1..=6).collect::<Vec<_>>(), "each outcome broadcast once");
    assert_eq!(server_ops(&server), 6, "each write reached the server once");
    for i in 0..6 {
        assert!(server_row(&server, "tickets", &format!("t{i}")).is_some());
    }
    assert_eq!(ids(&db, "tickets").len(), 6);
}

/// The server goes down with writes in flight and comes back on another
/// port with the same data: writes made meanwhile sync, each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_restart_mid_session_loses_and_repeats_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server_dir = dir.path().join("server");
    let server = start_server(&server_dir).await;
    let db = open(&dir.path().join("alice.db"), 2);
    let mirror = Mirror::new(&db, tickets_by_title());
    let front = Front::to(&server);
    db.connect(front.clone(), creds("alice"));
    for i in 0..3 {
        write(&db, |tx| {
            tx.insert("tickets", &format!("t{i}"), ticket(&format!("before {i}"), "alice"))
        });
    }
    settle(&db).await;
    // Writes race the shutdown.
    write(&db, |tx| {
        tx.update("tickets", "t0", row_data([("n", Value::from(1))]))
            .map(|_| ())
    });
    front.switch(None);
    server.shutdown().await.expect("shutdown");
    write(&db, |tx| tx.insert("tickets", "t3", ticket("while down", "alice")));
    write(&db, |tx| tx.delete("tickets", "t1").map(|_| ()));
    write(&db, |tx| {
        tx.update("tickets", "t2", row_data([("title", text("edited while down"))]))
            .map(|_| ())
    });
    mirror.check(&db, "offline");

    let server = start_server(&server_dir).await;
    front.switch(Some(&server));
    settle(&db).await;
    let outcomes = stored_outcomes(&db);
    assert!(
        outcomes.values().all(|o| o.outcome.outcome == Outcome::Applied),
        "{outcomes:?}"
    );
    // 3 inserts, a patch, an insert, a delete, a patch.
    assert_eq!(server_ops(&server), 7);
    assert_eq!(
        server_row(&server, "tickets", "t0").and_then(|r| r.get("n").cloned()),
        Some(Value::from(1))
    );
    assert!(server_row(&server, "tickets", "t1").is_none());
    assert_eq!(
        server_row(&server, "tickets", "t2").and_then(|r| r.get("title").cloned()),
        Some(text("edited while down"))
    );
    mirror.check(&db, "after the restart");
    assert_eq!(
        ids(&db, "tickets"),
        ["t0", "t2", "t3"].map(String::from).into_iter().collect()
    );
}

/// Writes refused by permission rules between writes that are allowed,
/// some in the same transaction, some on rows later pending writes touch:
/// each refused transaction rolls back whole, live queries follow, every
/// write has one outcome, and the other user sees none of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permission_rejections_between_pending_writes_roll_back_whole_transactions() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start_server(&dir.path().join("server")).await;
    let alice = open(&dir.path().join("alice.db"), 3);
    let tickets = Mirror::new(&alice, tickets_by_title());
    let board = Mirror::new(&alice, board_by_title());
    let first_ticket = Mirror::new(&alice, tickets_by_title().limit(1));
    let first_posts = Mirror::new(&alice, board_by_title().limit(2));
    let ok1 = write(&alice, |tx| tx.insert("tickets", "a1", ticket("a1", "alice")));
    let bad1 = write(&alice, |tx| tx.insert("board", "b1", post("as bob", "bob")));
    let ok2 = write(&alice, |tx| {
        tx.update("tickets", "a1", row_data([("title", text("a1 edited"))]))
            .map(|_| ())
    });
    let bad2 = write(&alice, |tx| {
        tx.insert("tickets", "a2", ticket("a2", "alice"))?;
        tx.insert("board", "b2", post("as bob again", "bob"))
    });
    // A patch of a2, whose insert is rolled back with bad2.
    let bad3 = write(&alice, |tx| {
        tx.update("tickets", "a2", row_data([("n", Value::from(2))]))
            .map(|_| ())
    });
    let ok3 = write(&alice, |tx| tx.delete("tickets", "a1").map(|_| ()));
    // A ticket for bob: alice may not create it.
    let bad4 = write(&alice, |tx| tx.insert("tickets", "a3", ticket("for bob", "bob")));
    let ok4 = write(&alice, |tx| tx.insert("board", "b3", post("by alice", "alice")));
    tickets.check(&alice, "offline");
    board.check(&alice, "offline");
    first_ticket.check(&alice, "window, offline");
    first_posts.check(&alice, "window, offline");
    assert_eq!(
        ids(&alice, "tickets"),
        ["a2", "a3"].map(String::from).into_iter().collect()
    );

    alice.connect(Arc::new(http(&server)), creds("alice"));
    settle(&alice).await;
    tickets.check(&alice, "synced");
    board.check(&alice, "synced");
    first_ticket.check(&alice, "window, synced");
    first_posts.check(&alice, "window, synced");
    assert!(ids(&alice, "tickets").is_empty(), "{:?}", alice.local().scan("tickets"));
    assert_eq!(ids(&alice, "board"), ["b3".to_owned()].into_iter().collect());

    let outcomes = stored_outcomes(&alice);
    let rejected: BTreeSet<u64> = outcomes
        .values()
        .filter(|o| is_rejected(o))
        .map(|o| o.outcome.seq)
        .collect();
    let expected: BTreeSet<u64> = [bad1, bad2, bad3, bad4]
        .iter()
        .flat_map(|r| r.first_seq..=r.last_seq)
        .collect();
    assert_eq!(rejected, expected, "{outcomes:?}");
    for r in [ok1, ok2, ok3, ok4] {
        assert!(!is_rejected(&outcomes[&r.first_seq]), "{:?}", outcomes[&r.first_seq]);
    }
    let log = alice.rejections().expect("rejections");
    let logged: BTreeSet<u64> = log.iter().map(|r| r.entry.seq).collect();
    assert_eq!(logged, expected);
    assert!(server_row(&server, "tickets", "a1").is_none());
    assert!(server_row(&server, "tickets", "a2").is_none());
    assert!(server_row(&server, "tickets", "a3").is_none());
    assert!(server_row(&server, "board", "b1").is_none());
    assert!(server_row(&server, "board", "b2").is_none());

    let bob = open(&dir.path().join("bob.db"), 4);
    bob.connect(Arc::new(http(&server)), creds("bob"));
    settle(&bob).await;
    assert!(ids(&bob, "tickets").is_empty());
    assert_eq!(ids(&bob, "board"), ["b3".to_owned()].into_iter().collect());
}

/// A ticket handed to bob by alice's other device while this one is
/// offline with an edit of it: the edit is rejected (alice no longer owns
/// it), the ticket leaves this device, bob gets it without alice's offline
/// edit; handed back while this device is offline again, it returns with
/// bob's values.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ticket_that_changes_owner_while_a_device_is_offline_follows_its_buckets() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start_server(&dir.path().join("server")).await;
    let a = open(&dir.path().join("alice-a.db"), 5);
    let b = open(&dir.path().join("alice-b.db"), 6);
    let bob = open(&dir.path().join("bob.db"), 7);
    let a_tickets = Mirror::new(&a, tickets_by_title());
    let a_window = Mirror::new(&a, tickets_by_title().limit(1));
    let bob_tickets = Mirror::new(&bob, tickets_by_title());
    for db in [&a, &b] {
        db.connect(Arc::new(http(&server)), creds("alice"));
    }
    bob.connect(Arc::new(http(&server)), creds("bob"));
    write(&a, |tx| {
        tx.insert("tickets", "t1", ticket("v1", "alice"))?;
        tx.insert("tickets", "t2", ticket("keep", "alice"))
    });
    settle(&a).await;
    settle(&b).await;
    settle(&bob).await;
    assert_eq!(ids(&b, "tickets").len(), 2);
    assert!(ids(&bob, "tickets").is_empty(), "bob sees none of alice's tickets");

    a.disconnect().await;
    let edit = write(&a, |tx| {
        tx.update("tickets", "t1", row_data([("title", text("alice offline"))]))
            .map(|_| ())
    });
    write(&a, |tx| {
        tx.update("tickets", "t2", row_data([("n", Value::from(5))]))
            .map(|_| ())
    });
    write(&b, |tx| {
        tx.update("tickets", "t1", row_data([("owner", text("bob"))]))
            .map(|_| ())
    });
    settle(&b).await;
    assert_eq!(
        ids(&b, "tickets"),
        ["t2".to_owned()].into_iter().collect(),
        "handed away"
    );
    settle(&bob).await;
    assert_eq!(ids(&bob, "tickets"), ["t1".to_owned()].into_iter().collect());

    a.connect(Arc::new(http(&server)), creds("alice"));
    settle(&a).await;
    a_tickets.check(&a, "after the hand-over");
    a_window.check(&a, "window after the hand-over");
    assert_eq!(ids(&a, "tickets"), ["t2".to_owned()].into_iter().collect());
    let outcomes = stored_outcomes(&a);
    assert!(is_rejected(&outcomes[&edit.first_seq]), "{outcomes:?}");
    assert_eq!(
        a.local()
            .get("tickets", "t2")
            .expect("get")
            .and_then(|r| r.get("n").cloned()),
        Some(Value::from(5))
    );
    settle(&bob).await;
    let row = bob.local().get("tickets", "t1").expect("get").expect("bob has t1");
    assert_eq!(row.get("title"), Some(&text("v1")), "alice's rejected edit never shows");
    bob_tickets.check(&bob, "bob after the hand-over");

    // Handed back while this device is offline again.
    a.disconnect().await;
    write(&bob, |tx| {
        tx.update(
            "tickets",
            "t1",
            row_data([("title", text("bob's")), ("owner", text("alice"))]),
        )
        .map(|_| ())
    });
    settle(&bob).await;
    assert!(ids(&bob, "tickets").is_empty());
    bob_tickets.check(&bob, "bob after handing back");
    a.connect(Arc::new(http(&server)), creds("alice"));
    settle(&a).await;
    a_tickets.check(&a, "after handing back");
    a_window.check(&a, "window after handing back");
    let row = a.local().get("tickets", "t1").expect("get").expect("back on a");
    assert_eq!(row.get("title"), Some(&text("bob's")));
    assert_eq!(ids(&a, "tickets").len(), 2);
}

/// Tokens that live two seconds, the first one not a token at all: the
/// client asks for fresh ones and every write of a steady stream lands
/// once, none rejected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_refused_and_expiring_mid_session_lose_no_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start_server(&dir.path().join("server")).await;
    let db = open(&dir.path().join("alice.db"), 8);
    let minted = Minted::new("alice", 2);
    minted.bad_first.store(true, Ordering::SeqCst);
    db.connect(Arc::new(http(&server)), minted.clone());
    let mirror = Mirror::new(&db, tickets_by_title());
    let mut n = 0;
    let end = tokio::time::Instant::now() + Duration::from_millis(3_200);
    while tokio::time::Instant::now() < end {
        write(&db, |tx| {
            tx.insert("tickets", &format!("t{n:03}"), ticket(&format!("{n}"), "alice"))
        });
        n += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    settle(&db).await;
    let outcomes = stored_outcomes(&db);
    assert!(
        outcomes.values().all(|o| o.outcome.outcome == Outcome::Applied),
        "{outcomes:?}"
    );
    assert_eq!(server_ops(&server), n);
    assert!(
        minted.refreshes.load(Ordering::SeqCst) >= 2,
        "fresh tokens were asked for"
    );
    mirror.check(&db, "after the token changes");
    assert_eq!(ids(&db, "tickets").len() as u64, n);
}

/// The queue at its limit: the write past it is refused whole and shows
/// nowhere; answered and confirmed entries (rejected ones too) free their
/// room, and seqs stay contiguous.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_refuses_writes_cleanly_and_frees_its_room_after_sync() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start_server(&dir.path().join("server")).await;
    let limits = Limits {
        max_queue_entries: 8,
        ..Limits::default()
    };
    let path = dir.path().join("alice.db");
    let db = open_with(&path, 9, limits.clone());
    let mirror = Mirror::new(&db, tickets_by_title());
    write(&db, |tx| {
        for i in 0..5 {
            tx.insert("tickets", &format!("t{i}"), ticket(&format!("{i}"), "alice"))?;
        }
        Ok(())
    });
    write(&db, |tx| tx.insert("board", "b1", post("not mine to write", "bob")));
    write(&db, |tx| {
        tx.update("tickets", "t0", row_data([("n", Value::from(7))]))
            .map(|_| ())
    });
    write(&db, |tx| tx.delete("tickets", "t1").map(|_| ()));
    let diffs = mirror.diffs.lock().len();
    let full = db.write(|tx| tx.insert("tickets", "t9", ticket("one too many", "alice")));
    assert!(matches!(full, Err(QueueError::QueueFull { .. })), "{full:?}");
    assert!(db.local().get("tickets", "t9").expect("get").is_none());
    assert_eq!(
        mirror.diffs.lock().len(),
        diffs,
        "a refused write changes no live query"
    );
    assert_eq!(db.local().last_seq(), 8);
    // A restart at the limit keeps it.
    drop(mirror);
    drop(db);
    let db = open_with(&path, 9, limits);
    let mirror = Mirror::new(&db, tickets_by_title());
    let full = db.write(|tx| tx.insert("tickets", "t9", ticket("one too many", "alice")));
    assert!(matches!(full, Err(QueueError::QueueFull { .. })), "{full:?}");

    db.connect(Arc::new(http(&server)), creds("alice"));
    settle(&db).await;
    assert_eq!(db.local().pending_len().expect("pending"), 0);
    write(&db, |tx| {
        for i in 10..18 {
            tx.insert("tickets", &format!("t{i}"), ticket(&format!("{i}"), "alice"))?;
        }
        Ok(())
    });
    settle(&db).await;
    let outcomes = stored_outcomes(&db);
    assert_eq!(outcomes.len(), 16);
    assert_eq!(outcomes.values().filter(|o| is_rejected(o)).count(), 1);
    assert_eq!(db.rejections().expect("rejections").len(), 1);
    mirror.check(&db, "after the full queue synced");
    assert_eq!(ids(&db, "tickets").len(), 12);
}

/// The app restarts after a rejection arrived and before any checkpoint
/// confirmed it: the rollback, the log and the outcomes survive; a new
/// write may reuse the rejected row's id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_between_a_rejection_and_its_checkpoint_keeps_the_rollback() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start_server(&dir.path().join("server")).await;
    let path = dir.path().join("alice.db");
    let db = open(&path, 10);
    db.pause_downloads(true);
    write(&db, |tx| tx.insert("board", "b1", post("as bob", "bob")));
    write(&db, |tx| {
        tx.update("board", "b1", row_data([("title", text("still bob"))]))
            .map(|_| ())
    });
    write(&db, |tx| tx.insert("board", "b2", post("mine", "alice")));
    db.connect(Arc::new(http(&server)), creds("alice"));
    assert!(
        wait_until(5_000, || db.local().upload_queue_len() == 0).await,
        "uploads answered"
    );
    assert_eq!(db.local().pending_len().expect("pending"), 3, "no checkpoint yet");
    assert!(db.local().get("board", "b1").expect("get").is_none(), "rolled back");
    db.close().await.expect("close");

    let db = open(&path, 10);
    assert!(
        db.local().get("board", "b1").expect("get").is_none(),
        "still rolled back"
    );
    assert!(db.local().get("board", "b2").expect("get").is_some());
    assert_eq!(db.rejections().expect("rejections").len(), 2);
    let outcomes = stored_outcomes(&db);
    assert_eq!(outcomes.values().filter(|o| is_rejected(o)).count(), 2);
    let mirror = Mirror::new(&db, board_by_title());
    write(&db, |tx| tx.insert("board", "b1", post("now as alice", "alice")));
    mirror.check(&db, "reused id, offline");
    db.connect(Arc::new(http(&server)), creds("alice"));
    settle(&db).await;
    mirror.check(&db, "synced");
    let b1 = db.local().get("board", "b1").expect("get").expect("b1");
    assert_eq!(b1.get("author"), Some(&text("alice")));
    assert_eq!(db.rejections().expect("rejections").len(), 2);
    assert_eq!(
        server_row(&server, "board", "b1").and_then(|r| r.get("author").cloned()),
        Some(text("alice"))
    );
}

/// Rows deleted on the server while a device was offline with a PATCH of
/// one and a PUT of another: the patch does not bring its row back, the
/// later PUT does, on every device, and live queries follow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patch_and_put_of_rows_deleted_meanwhile() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start_server(&dir.path().join("server")).await;
    let a = open(&dir.path().join("alice-a.db"), 11);
    let b = open(&dir.path().join("alice-b.db"), 12);
    let bob = open(&dir.path().join("bob.db"), 13);
    let mirror = Mirror::new(&a, board_by_title());
    let window = Mirror::new(&a, board_by_title().limit(1));
    let bob_mirror = Mirror::new(&bob, board_by_title());
    for db in [&a, &b] {
        db.connect(Arc::new(http(&server)), creds("alice"));
    }
    bob.connect(Arc::new(http(&server)), creds("bob"));
    write(&a, |tx| {
        tx.insert("board", "p1", post("one", "alice"))?;
        tx.insert("board", "p2", post("two", "alice"))?;
        tx.insert("board", "p3", post("three", "alice"))
    });
    settle(&a).await;
    settle(&b).await;
    a.disconnect().await;
    // A delete offline, then an edit elsewhere after it: the edit wins and
    // the row comes back on the deleting device.
    let delete = write(&a, |tx| tx.delete("board", "p3").map(|_| ()));
    tokio::time::sleep(Duration::from_millis(5)).await;
    write(&b, |tx| {
        tx.update("board", "p3", row_data([("title", text("edited after the delete"))]))
            .map(|_| ())
    });
    write(&b, |tx| {
        tx.delete("board", "p1")?;
        tx.delete("board", "p2").map(|_| ())
    });
    settle(&b).await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    let patch = write(&a, |tx| {
        tx.update("board", "p1", row_data([("title", text("patched"))]))
            .map(|_| ())
    });
    write(&a, |tx| tx.put("board", "p2", post("put again", "alice")));
    mirror.check(&a, "offline");
    a.connect(Arc::new(http(&server)), creds("alice"));
    settle(&a).await;
    settle(&b).await;
    settle(&bob).await;
    mirror.check(&a, "synced");
    window.check(&a, "window synced");
    bob_mirror.check(&bob, "bob synced");
    let outcomes = stored_outcomes(&a);
    println!("patch of a deleted row: {:?}", outcomes[&patch.first_seq]);
    assert!(
        matches!(outcomes[&delete.first_seq].outcome.outcome, Outcome::Merged { .. }),
        "{outcomes:?}"
    );
    for db in [&a, &b, &bob] {
        assert_eq!(ids(db, "board"), ["p2", "p3"].map(String::from).into_iter().collect());
        let p2 = db.local().get("board", "p2").expect("get").expect("p2");
        assert_eq!(p2.get("title"), Some(&text("put again")));
        let p3 = db.local().get("board", "p3").expect("get").expect("p3");
        assert_eq!(p3.get("title"), Some(&text("edited after the delete")));
    }
    assert!(server_row(&server, "board", "p1").is_none());
}

/// Ids at the byte limit in multi-byte characters, look-alike ids that
/// differ in normalization, ids with path and SQL characters, and a user id
/// of two hundred bytes of unicode: each row syncs under exactly its id,
/// deletes reach every device, and the unicode user's tickets stay theirs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_ids_and_a_long_unicode_user_id_round_trip() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start_server(&dir.path().join("server")).await;
    let user = format!("ålïçé-{}", "ü".repeat(97));
    assert!(user.len() > 190, "{}", user.len());
    let a = open(&dir.path().join("a.db"), 14);
    let bob = open(&dir.path().join("bob.db"), 15);
    let mirror = Mirror::new(&bob, board_by_title());
    a.connect(Arc::new(http(&server)), creds(&user));
    bob.connect(Arc::new(http(&server)), creds("bob"));
    let odd: Vec<String> = vec![
        "é".repeat(128),
        "🦀".repeat(64),
        "\u{e9}".into(),
        "e\u{301}".into(),
        "a/b\\c".into(),
        " spaced ".into(),
        "line\nbreak".into(),
        "'; DROP TABLE board; --".into(),
        "..".into(),
        "%2e%2e".into(),
        "\u{202e}rtl".into(),
    ];
    assert_eq!(odd[0].len(), 256);
    assert_eq!(odd[1].len(), 256);
    let too_long = format!("{}x", "é".repeat(128));
    let refused = a.write(|tx| tx.insert("board", &too_long, post("x", &user)));
    assert!(refused.is_err(), "an id over the limit is refused locally");
    write(&a, |tx| {
        for (i, id) in odd.iter().enumerate() {
            tx.insert("board", id, post(&format!("{i} ✓"), &user))?;
        }
        tx.insert("tickets", &"🦀".repeat(64), ticket("the user's own", &user))
    });
    settle(&a).await;
    assert!(stored_outcomes(&a)
        .values()
        .all(|o| o.outcome.outcome == Outcome::Applied));
    settle(&bob).await;
    let expected: BTreeSet<String> = odd.iter().cloned().collect();
    assert_eq!(ids(&bob, "board"), expected);
    assert!(ids(&bob, "tickets").is_empty(), "bob gets none of the user's tickets");
    assert_eq!(ids(&a, "tickets").len(), 1);
    for (i, id) in odd.iter().enumerate() {
        let row = bob.local().get("board", id).expect("get").expect("row");
        assert_eq!(row.get("title"), Some(&text(&format!("{i} ✓"))), "{id:?}");
    }
    mirror.check(&bob, "bob with odd ids");
    write(&a, |tx| {
        for id in &odd {
            tx.delete("board", id)?;
        }
        Ok(())
    });
    settle(&a).await;
    settle(&bob).await;
    assert!(ids(&bob, "board").is_empty(), "{:?}", ids(&bob, "board"));
    assert!(ids(&a, "board").is_empty());
    mirror.check(&bob, "bob after the deletes");
}

fn team_post(title: &str, team: &str) -> RowData {
    row_data([("title", text(title)), ("team", text(team))])
}

/// rita (team red) posts r1 and r2 from `red`, bert (team blue) posts b1
/// from `blue`, each with a token of its team, and both settle.
async fn red_and_blue_post(server: &BoundServer, red: &Database, blue: &Database) {
    for (db, team, user) in [(red, "red", "rita"), (blue, "blue", "bert")] {
        let minted = Minted::new(user, 3600);
        minted.claims.lock().insert("team".into(), team.into());
        db.connect(Arc::new(http(server)), minted);
    }
    write(red, |tx| {
        tx.insert("team_posts", "r1", team_post("a red one", "red"))?;
        tx.insert("team_posts", "r2", team_post("b red two", "red"))
    });
    write(blue, |tx| {
        tx.insert("team_posts", "b1", team_post("c blue one", "blue"))
    });
    settle(red).await;
    settle(blue).await;
}

/// A user moved from team red to team blue mid-session (the claim changes
/// with the next token): red's rows leave the device, blue's arrive, and
/// an edit of a red row made before the move is rejected and rolled back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_that_changes_with_a_fresh_token_moves_the_device_between_buckets() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start_server(&dir.path().join("server")).await;
    let red = open(&dir.path().join("red.db"), 16);
    let blue = open(&dir.path().join("blue.db"), 17);
    let carol = open(&dir.path().join("carol.db"), 18);
    let mirror = Mirror::new(&carol, Query::from("team_posts").order_by(col("title"), Order::Asc));
    let window = Mirror::new(
        &carol,
        Query::from("team_posts").order_by(col("title"), Order::Asc).limit(1),
    );
    red_and_blue_post(&server, &red, &blue).await;

    let minted = Minted::new("carol", 2);
    minted.claims.lock().insert("team".into(), "red".into());
    carol.connect(Arc::new(http(&server)), minted.clone());
    settle(&carol).await;
    assert_eq!(
        ids(&carol, "team_posts"),
        ["r1", "r2"].map(String::from).into_iter().collect()
    );
    carol.pause_uploads(true);
    let edit = write(&carol, |tx| {
        tx.update("team_posts", "r1", row_data([("title", text("a carol's"))]))
            .map(|_| ())
    });
    // Moved to blue: the next token (within two seconds) says so.
    minted.claims.lock().insert("team".into(), "blue".into());
    assert!(
        wait_until(5_000, || ids(&carol, "team_posts").contains("b1")).await,
        "blue's rows arrive with the new token"
    );
    carol.pause_uploads(false);
    settle(&carol).await;
    mirror.check(&carol, "after the move");
    window.check(&carol, "window after the move");
    assert_eq!(
        ids(&carol, "team_posts"),
        ["b1".to_owned()].into_iter().collect(),
        "red's rows left"
    );
    let outcomes = stored_outcomes(&carol);
    assert!(is_rejected(&outcomes[&edit.first_seq]), "{outcomes:?}");
    assert_eq!(
        server_row(&server, "team_posts", "r1").and_then(|r| r.get("title").cloned()),
        Some(text("a red one"))
    );
}

/// A SQLite store whose commits of upload answers can be held (a slow
/// disk at the wrong moment).
#[derive(Debug)]
struct Gated {
    inner: SqliteStore,
    /// Answers wait while this is true.
    closed: std::sync::Mutex<bool>,
    opened: std::sync::Condvar,
    /// An answer is waiting.
    held: AtomicBool,
    /// Hold batches that drop confirmed queue entries instead of answers.
    confirms: AtomicBool,
}

impl Gated {
    fn open(path: &Path) -> Arc<Gated> {
        Arc::new(Gated {
            inner: SqliteStore::open(path, schema()).expect("client store"),
            closed: std::sync::Mutex::new(false),
            opened: std::sync::Condvar::new(),
            held: AtomicBool::new(false),
            confirms: AtomicBool::new(false),
        })
    }

    fn close_gate(&self) {
        *self.closed.lock().expect("gate") = true;
    }

    fn open_gate(&self) {
        *self.closed.lock().expect("gate") = false;
        self.opened.notify_all();
    }
}

impl ferry_store::Store for Gated {
    fn schema(&self) -> &Schema {
        self.inner.schema()
    }
    fn apply(&self, batch: ferry_store::WriteBatch) -> ferry_store::StoreResult<()> {
        let held = if self.confirms.load(Ordering::SeqCst) {
            batch
                .ops
                .iter()
                .any(|op| matches!(op, ferry_store::BatchOp::CompleteQueue { .. }))
        } else {
            batch.ops.iter().any(|op| {
                matches!(op, ferry_store::BatchOp::PutMeta { key, .. } if key == ferry_queue::META_COMPLETED_THROUGH)
            })
        };
        if held {
            let mut closed = self.closed.lock().expect("gate");
            while *closed {
                self.held.store(true, Ordering::SeqCst);
                closed = self.opened.wait(closed).expect("gate");
            }
        }
        self.inner.apply(batch)
    }
    fn get_synced(&self, table: &str, id: &str) -> ferry_store::StoreResult<Option<RowData>> {
        self.inner.get_synced(table, id)
    }
    fn scan_synced(&self, table: &str) -> ferry_store::StoreResult<ferry_store::Rows> {
        self.inner.scan_synced(table)
    }
    fn scan_synced_index(
        &self,
        table: &str,
        index: &str,
        lower: std::ops::Bound<Vec<Value>>,
        upper: std::ops::Bound<Vec<Value>>,
    ) -> ferry_store::StoreResult<ferry_store::Rows> {
        self.inner.scan_synced_index(table, index, lower, upper)
    }
    fn scan_synced_index_limited(
        &self,
        table: &str,
        index: &str,
        lower: std::ops::Bound<Vec<Value>>,
        upper: std::ops::Bound<Vec<Value>>,
        reverse: bool,
        limit: usize,
    ) -> ferry_store::StoreResult<ferry_store::Rows> {
        self.inner
            .scan_synced_index_limited(table, index, lower, upper, reverse, limit)
    }
    fn get_overlay(&self, table: &str, id: &str) -> ferry_store::StoreResult<Option<ferry_store::OverlayEntry>> {
        self.inner.get_overlay(table, id)
    }
    fn scan_overlay(&self, table: &str) -> ferry_store::StoreResult<Vec<(String, ferry_store::OverlayEntry)>> {
        self.inner.scan_overlay(table)
    }
    fn queue_from(&self, from_seq: u64, limit: usize) -> ferry_store::StoreResult<Vec<ferry_core::CrudEntry>> {
        self.inner.queue_from(from_seq, limit)
    }
    fn queue_len(&self) -> ferry_store::StoreResult<u64> {
        self.inner.queue_len()
    }
    fn bucket_state(&self, bucket: &str) -> ferry_store::StoreResult<Option<ferry_store::BucketState>> {
        self.inner.bucket_state(bucket)
    }
    fn buckets(&self) -> ferry_store::StoreResult<Vec<(String, ferry_store::BucketState)>> {
        self.inner.buckets()
    }
    fn bucket_entry(
        &self,
        bucket: &str,
        table: &str,
        row_id: &str,
    ) -> ferry_store::StoreResult<Option<ferry_store::BucketEntry>> {
        self.inner.bucket_entry(bucket, table, row_id)
    }
    fn bucket_entries(
        &self,
        bucket: &str,
        after: Option<(&str, &str)>,
        limit: usize,
    ) -> ferry_store::StoreResult<Vec<ferry_store::BucketEntry>> {
        self.inner.bucket_entries(bucket, after, limit)
    }
    fn get_meta(&self, key: &str) -> ferry_store::StoreResult<Option<Vec<u8>>> {
        self.inner.get_meta(key)
    }
    fn staged_ops(
        &self,
        bucket: &str,
        after_op_id: u64,
        limit: usize,
    ) -> ferry_store::StoreResult<Vec<ferry_store::StagedOp>> {
        self.inner.staged_ops(bucket, after_op_id, limit)
    }
    fn staged_buckets(&self) -> ferry_store::StoreResult<Vec<String>> {
        self.inner.staged_buckets()
    }
}

/// The app replaces its connection (`connect` again) while the answer to
/// an upload is being stored: the new connection sends the same writes
/// again and the server replays their outcomes. An outcome subscriber
/// must still hear each write's outcome once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_stored_while_a_new_connection_replays_the_upload_is_heard_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start_server(&dir.path().join("server")).await;
    let store = Gated::open(&dir.path().join("alice.db"));
    let db = Database::open(store.clone(), options(19, Limits::default())).expect("open");
    let mut heard = db.subscribe_outcomes();
    store.close_gate();
    db.connect(Front::to(&server), creds("alice"));
    let receipt = write(&db, |tx| tx.insert("board", "p1", post("once", "alice")));
    assert!(
        wait_until(5_000, || store.held.load(Ordering::SeqCst)).await,
        "the answer is being stored"
    );
    let front = Front::to(&server);
    db.connect(front.clone(), creds("alice"));
    assert!(
        wait_until(5_000, || front.handled.load(Ordering::SeqCst) >= 1).await,
        "the new connection uploaded again"
    );
    store.open_gate();
    settle(&db).await;
    let outcomes = stored_outcomes(&db);
    assert_eq!(outcomes.len(), 1);
    let mut seqs = Vec::new();
    while let Ok(o) = heard.try_recv() {
        assert_eq!(o.tx_id, receipt.tx_id);
        seqs.push(o.outcome.seq);
    }
    assert_eq!(seqs, vec![receipt.first_seq], "each outcome is delivered once");
}

/// A first sync of many rows broken off and the app restarted in the
/// middle, with pending writes on rows the download brings (one of them a
/// PUT over another user's post, which the server refuses): after the
/// resumed sync the device holds the server's rows, the refused PUT shows
/// the server's row, and live queries (an index window too) match.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_sync_cut_and_restarted_with_pending_writes_on_its_rows() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start_server_with(
        &dir.path().join("server"),
        ServiceOptions {
            keepalive_interval_s: 1,
            max_ops_per_line: 50,
            ..ServiceOptions::default()
        },
    )
    .await;
    let ops = (0..2_000)
        .map(|i| ferry_core::CrudOp::Put {
            table: "board".into(),
            id: format!("p{i:04}"),
            data: post(&format!("bob's {i:04}"), "bob"),
        })
        .collect();
    server.service.import(ops).await.expect("import");
    let path = dir.path().join("alice.db");
    let db = open(&path, 20);
    let refused = write(&db, |tx| tx.put("board", "p0005", post("alice over bob", "alice")));
    write(&db, |tx| tx.insert("board", "mine", post("alice's own", "alice")));
    write(&db, |tx| {
        tx.update("board", "mine", row_data([("title", text("alice's own, edited"))]))
            .map(|_| ())
    });
    let front = Front::to(&server);
    front.lines_left.store(15, Ordering::SeqCst);
    db.pause_uploads(true);
    db.connect(front.clone(), creds("alice"));
    assert!(
        wait_until(5_000, || front.lines_left.load(Ordering::SeqCst) == 0).await,
        "the stream ran"
    );
    let progress = db.status().download_progress;
    drop(db);

    let db = open(&path, 20);
    let all = Mirror::new(&db, board_by_title());
    let window = Mirror::new(&db, board_by_title().limit(3));
    let mut heard = db.subscribe_outcomes();
    db.connect(Arc::new(http(&server)), creds("alice"));
    settle(&db).await;
    all.check(&db, "after the resumed first sync");
    window.check(&db, "window after the resumed first sync");
    assert_eq!(ids(&db, "board").len(), 2_001, "progress when cut: {progress:?}");
    let p5 = db.local().get("board", "p0005").expect("get").expect("p0005");
    assert_eq!(p5.get("title"), Some(&text("bob's 0005")));
    assert_eq!(
        db.local()
            .get("board", "mine")
            .expect("get")
            .and_then(|r| r.get("title").cloned()),
        Some(text("alice's own, edited"))
    );
    let outcomes = stored_outcomes(&db);
    assert!(is_rejected(&outcomes[&refused.first_seq]), "{outcomes:?}");
    let mut seqs = Vec::new();
    while let Ok(o) = heard.try_recv() {
        seqs.push(o.outcome.seq);
    }
    assert_eq!(seqs, vec![1, 2, 3]);
    assert_eq!(
        server_row(&server, "board", "p0005").and_then(|r| r.get("title").cloned()),
        Some(text("bob's 0005"))
    );
}

/// An app that raises `upload_batch_entries` past the queue's
/// `max_batch_entries`: a batch read stops at the queue's bound, inside a
/// transaction. The transaction must still go whole: one refused op
/// rejects all of it, and the server keeps none of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_longer_than_the_queues_batch_read_still_uploads_whole() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start_server(&dir.path().join("server")).await;
    let limits = Limits {
        max_batch_entries: 10,
        ..Limits::default()
    };
    let store = SqliteStore::open(dir.path().join("alice.db"), schema()).expect("client store");
    let db = Database::open(
        Arc::new(store),
        ClientOptions {
            upload_batch_entries: 50,
            ..options(21, limits)
        },
    )
    .expect("open");
    let mirror = Mirror::new(&db, board_by_title());
    let before = write(&db, |tx| tx.insert("board", "before", post("before", "alice")));
    let big = write(&db, |tx| {
        for i in 0..15 {
            let author = if i == 12 { "bob" } else { "alice" };
            tx.insert("board", &format!("p{i:02}"), post(&format!("{i:02}"), author))?;
        }
        Ok(())
    });
    let after = write(&db, |tx| tx.insert("board", "after", post("after", "alice")));
    db.connect(Arc::new(http(&server)), creds("alice"));
    settle(&db).await;
    mirror.check(&db, "synced");
    for i in 0..15 {
        assert!(
            server_row(&server, "board", &format!("p{i:02}")).is_none(),
            "p{i:02} of a rejected transaction is on the server"
        );
    }
    let outcomes = stored_outcomes(&db);
    for seq in big.first_seq..=big.last_seq {
        assert!(is_rejected(&outcomes[&seq]), "seq {seq}: {:?}", outcomes[&seq]);
    }
    assert!(!is_rejected(&outcomes[&before.first_seq]));
    assert!(!is_rejected(&outcomes[&after.first_seq]));
    assert_eq!(
        ids(&db, "board"),
        ["after", "before"].map(String::from).into_iter().collect()
    );
}

/// The server restarts with rules that make the board private to each
/// author (the global bucket is gone) while bob's device is offline with a
/// new post: every device ends with only its own posts, bob's offline post
/// lands, and live queries match a fresh query.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_that_narrow_a_bucket_across_a_server_restart_take_rows_off_other_devices() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server_dir = dir.path().join("server");
    let service = || ServiceOptions {
        keepalive_interval_s: 1,
        ..ServiceOptions::default()
    };
    let server = start_server_on(&server_dir, service(), RULES).await;
    let alice = open(&dir.path().join("alice.db"), 22);
    let bob = open(&dir.path().join("bob.db"), 23);
    let alice_board = Mirror::new(&alice, board_by_title());
    let bob_board = Mirror::new(&bob, board_by_title());
    let bob_window = Mirror::new(&bob, board_by_title().limit(1));
    let alice_front = Front::to(&server);
    alice.connect(alice_front.clone(), creds("alice"));
    bob.connect(Arc::new(http(&server)), creds("bob"));
    write(&alice, |tx| tx.insert("board", "a1", post("a alice's", "alice")));
    write(&bob, |tx| tx.insert("board", "b1", post("b bob's", "bob")));
    settle(&alice).await;
    settle(&bob).await;
    settle(&alice).await;
    assert_eq!(ids(&alice, "board").len(), 2);
    assert_eq!(ids(&bob, "board").len(), 2);

    bob.disconnect().await;
    write(&bob, |tx| tx.insert("board", "b2", post("c bob offline", "bob")));
    alice_front.switch(None);
    server.shutdown().await.expect("shutdown");
    let private = RULES.replace(
        "[[buckets]]\nname = \"global\"\ndata = [{ table = \"board\" }]",
        "[[buckets]]\nname = \"authored\"\nparameters = [\"sub\"]\ndata = [{ table = \"board\", where = { author = \"sub\" } }]",
    );
    assert_ne!(private, RULES);
    let server = start_server_on(&server_dir, service(), &private).await;
    alice_front.switch(Some(&server));
    bob.connect(Arc::new(http(&server)), creds("bob"));
    let only = |db: &Database, want: &[&str]| ids(db, "board") == want.iter().map(|s| s.to_string()).collect();
    assert!(
        wait_until(5_000, || only(&alice, &["a1"]) && only(&bob, &["b1", "b2"])).await,
        "alice {:?}, bob {:?}",
        ids(&alice, "board"),
        ids(&bob, "board")
    );
    settle(&alice).await;
    settle(&bob).await;
    assert!(only(&alice, &["a1"]), "{:?}", ids(&alice, "board"));
    assert!(only(&bob, &["b1", "b2"]), "{:?}", ids(&bob, "board"));
    alice_board.check(&alice, "alice after the rules change");
    bob_board.check(&bob, "bob after the rules change");
    bob_window.check(&bob, "bob's window after the rules change");
    assert!(stored_outcomes(&bob)
        .values()
        .all(|o| o.outcome.outcome == Outcome::Applied));
}

/// Transactions the server refused whole (too large) used up seqs the
/// server never recorded, so its `last_seq` for the client stayed behind.
/// Once the seqs they used added up past the server's `max_seq_gap`, the
/// next transaction was refused whole too ("over the limit of
/// max_seq_gap"), and so was every later one: the device could never
/// upload again. The server now answers a transaction over its limits
/// (each op rejected and recorded), so its seqs count as used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seqs_of_transactions_refused_whole_do_not_lock_the_device_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start_server_with(
        &dir.path().join("server"),
        ServiceOptions {
            keepalive_interval_s: 1,
            max_upload_ops: 5,
            max_seq_gap: 8,
            ..ServiceOptions::default()
        },
    )
    .await;
    let db = open(&dir.path().join("alice.db"), 24);
    for round in 0..2 {
        write(&db, |tx| {
            for i in 0..6 {
                tx.insert("board", &format!("big{round}-{i}"), post("too big", "alice"))?;
            }
            Ok(())
        });
    }
    let small = write(&db, |tx| tx.insert("board", "small", post("a small one", "alice")));
    db.connect(Arc::new(http(&server)), creds("alice"));
    settle(&db).await;
    let outcomes = stored_outcomes(&db);
    assert_eq!(
        outcomes[&small.first_seq].outcome.outcome,
        Outcome::Applied,
        "{:?}",
        outcomes[&small.first_seq]
    );
}

/// Joined, grouped, distinct and offset live queries over two tables,
/// through transactions that touch both, rejections that roll both back,
/// other devices' edits, deletes and a hand-over: each ends equal to a
/// fresh query.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joined_grouped_and_offset_live_queries_follow_rollbacks_and_server_changes() {
    use ferry_client::query::{count, JoinKind};
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start_server(&dir.path().join("server")).await;
    let a = open(&dir.path().join("alice-a.db"), 25);
    let b = open(&dir.path().join("alice-b.db"), 26);
    let bob = open(&dir.path().join("bob.db"), 27);
    let queries = [
        Query::from_as("tickets", "t")
            .left_join("board", "p", "t.title", "p.title")
            .select([("ticket", col("t.id")), ("post", col("p.id")), ("by", col("p.author"))])
            .order_by(col("ticket"), Order::Asc)
            .order_by(col("post"), Order::Asc),
        Query::from_as("board", "p")
            .join(JoinKind::Inner, "tickets", "t", [("p.title", "t.title")])
            .group_by([col("p.author")])
            .select([("author", col("p.author")), ("n", count())])
            .order_by(col("author"), Order::Asc),
        Query::from("tickets")
            .select_cols(["status"])
            .distinct()
            .order_by(col("status"), Order::Asc),
        Query::from("board")
            .order_by(col("title"), Order::Desc)
            .offset(1)
            .limit(2),
        Query::from("tickets")
            .filter(col("n").gte(2).or(col("status").eq("done")))
            .order_by(col("n"), Order::Desc)
            .limit(2),
    ];
    let mirrors: Vec<Mirror> = queries.iter().map(|q| Mirror::new(&a, q.clone())).collect();
    let check = |what: &str| {
        for (i, m) in mirrors.iter().enumerate() {
            m.check(&a, &format!("{what}, query {i}"));
        }
    };
    let ticket_n = |title: &str, status: &str, n: i64| {
        row_data([
            ("title", text(title)),
            ("status", text(status)),
            ("owner", text("alice")),
            ("n", Value::from(n)),
        ])
    };
    write(&a, |tx| {
        tx.insert("tickets", "t1", ticket_n("x", "open", 1))?;
        tx.insert("tickets", "t2", ticket_n("y", "done", 2))?;
        tx.insert("board", "p1", post("x", "alice"))
    });
    write(&a, |tx| {
        tx.insert("tickets", "t3", ticket_n("y", "open", 3))?;
        tx.insert("board", "p2", post("y", "bob")) // refused: rolls back t3 too
    });
    write(&a, |tx| {
        tx.update("tickets", "t1", row_data([("n", Value::from(5))]))
            .map(|_| ())
    });
    write(&a, |tx| {
        tx.insert("tickets", "t4", ticket_n("z", "blocked", 0))?;
        tx.insert("tickets", "t5", ticket_n("x", "open", 2))?;
        tx.delete("board", "p1").map(|_| ())
    });
    write(&a, |tx| tx.insert("board", "p1", post("x", "alice")));
    check("offline");
    for db in [&a, &b] {
        db.connect(Arc::new(http(&server)), creds("alice"));
    }
    bob.connect(Arc::new(http(&server)), creds("bob"));
    settle(&a).await;
    check("synced");
    write(&bob, |tx| {
        tx.insert("board", "q1", post("x", "bob"))?;
        tx.insert("board", "q2", post("y", "bob"))
    });
    settle(&bob).await;
    settle(&b).await;
    write(&b, |tx| {
        tx.update("tickets", "t2", row_data([("title", text("x"))]))?;
        tx.update("tickets", "t5", row_data([("owner", text("bob"))]))?;
        tx.delete("tickets", "t4").map(|_| ())
    });
    settle(&b).await;
    write(&a, |tx| {
        tx.update(
            "tickets",
            "t1",
            row_data([("title", text("y")), ("status", text("done"))]),
        )
        .map(|_| ())
    });
    write(&a, |tx| {
        tx.update("board", "q1", row_data([("title", text("z"))])).map(|_| ())
    }); // bob's: refused
    settle(&a).await;
    check("after the other devices");
    let board: BTreeSet<String> = ids(&a, "board");
    assert_eq!(board, ["p1", "q1", "q2"].map(String::from).into_iter().collect());
    assert_eq!(ids(&a, "tickets"), ["t1", "t2"].map(String::from).into_iter().collect());
}

/// One device of the chaos test: its store, its network and what its app
/// saw.
struct Device {
    user: &'static str,
    path: std::path::PathBuf,
    seed: u64,
    front: Arc<Front>,
    db: Option<Database>,
    connected: bool,
    mirrors: Vec<Mirror>,
    heard: Option<tokio::sync::broadcast::Receiver<UploadOutcome>>,
}

fn chaos_queries() -> Vec<Query> {
    vec![
        tickets_by_title(),
        tickets_by_title().limit(2),
        board_by_title(),
        Query::from("board").order_by(col("title"), Order::Desc).limit(2),
    ]
}

impl Device {
    fn open(&mut self) {
        let db = open(&self.path, self.seed);
        self.mirrors = chaos_queries().into_iter().map(|q| Mirror::new(&db, q)).collect();
        self.heard = Some(db.subscribe_outcomes());
        if self.connected {
            db.connect(self.front.clone(), creds(self.user));
        }
        self.db = Some(db);
    }

    fn db(&self) -> &Database {
        self.db.as_ref().expect("open device")
    }

    /// The outcomes this session's subscriber heard, each once.
    fn drain_heard(&mut self) {
        let mut seen = BTreeSet::new();
        if let Some(rx) = self.heard.as_mut() {
            while let Ok(o) = rx.try_recv() {
                assert!(seen.insert(o.outcome.seq), "{}: outcome heard twice: {o:?}", self.user);
            }
        }
    }
}

fn normalized(row: Option<RowData>) -> Option<RowData> {
    row.map(|r| r.into_iter().filter(|(_, v)| !v.is_null()).collect())
}

/// Seeded interleavings of allowed and refused writes (inserts, PUTs,
/// PATCHes, deletes, hand-overs) on three devices of two users, with
/// disconnects, replaced connections, lost answers, app kills and server
/// restarts. At the end: one stored outcome per write on every device, no
/// outcome heard twice by one session, live queries equal to fresh
/// queries, and every device holding exactly the server's rows of its
/// buckets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_chaos_over_http_converges_with_one_outcome_per_write() {
    // FERRY_PROBE_SEEDS=first..last runs others (e.g. a long hunt).
    let seeds = std::env::var("FERRY_PROBE_SEEDS")
        .ok()
        .and_then(|s| {
            let (a, b) = s.split_once("..")?;
            Some(a.parse::<u64>().ok()?..b.parse::<u64>().ok()?)
        })
        .unwrap_or(1..4);
    for seed in seeds {
        chaos(seed, 45).await;
    }
}

async fn chaos(seed: u64, steps: usize) {
    use ferry_core::RandomSource;
    let mut rng = ferry_core::SeededRandom::new(seed);
    let dir = tempfile::tempdir().expect("tempdir");
    let server_dir = dir.path().join("server");
    let mut server = Some(start_server(&server_dir).await);
    let users = ["alice", "alice", "bob"];
    let mut devices: Vec<Device> = users
        .iter()
        .enumerate()
        .map(|(i, user)| Device {
            user,
            path: dir.path().join(format!("device{i}.db")),
            seed: seed * 100 + i as u64,
            front: Front::to(server.as_ref().expect("server")),
            db: None,
            connected: true,
            mirrors: Vec::new(),
            heard: None,
        })
        .collect();
    for d in &mut devices {
        d.open();
    }
    let mut history = Vec::new();
    for step in 0..steps {
        let which = rng.below(3) as usize;
        let action = rng.below(21);
        let d = &mut devices[which];
        let other = if d.user == "alice" { "bob" } else { "alice" };
        history.push(format!("{step}: device {which} action {action}"));
        match action {
            0..=9 => {
                let id = rng.below(5);
                let author = if rng.below(4) == 0 { other } else { d.user };
                let kind = rng.below(8);
                let n = rng.below(100) as i64;
                let user = d.user;
                let done = d.db().write_with_receipt(|tx| -> Result<(), QueueError> {
                    let t = format!("t{id}");
                    let p = format!("p{id}");
                    match kind {
                        0 => tx.put("tickets", &t, ticket(&format!("title {n}"), author)),
                        1 => tx
                            .update(
                                "tickets",
                                &t,
                                row_data([("n", Value::from(n)), ("title", text(&format!("t{n}")))]),
                            )
                            .map(|_| ()),
                        2 => tx.update("tickets", &t, row_data([("owner", text(other))])).map(|_| ()),
                        3 => tx.delete("tickets", &t).map(|_| ()),
                        4 => tx.put("board", &p, post(&format!("post {n}"), author)),
                        5 => tx
                            .update("board", &p, row_data([("title", text(&format!("p{n}")))]))
                            .map(|_| ()),
                        6 => tx.delete("board", &p).map(|_| ()),
                        _ => {
                            tx.put("tickets", &t, ticket(&format!("both {n}"), user))?;
                            tx.put("board", &p, post(&format!("both {n}"), author))
                        }
                    }
                });
                // A patch of a row this device does not hold is refused
                // locally (nothing written).
                assert!(
                    matches!(done, Ok(_) | Err(QueueError::RowMissing { .. })),
                    "local write: {done:?}"
                );
            }
            10 | 11 => {
                if d.connected {
                    d.db().disconnect().await;
                } else {
                    d.db().connect(d.front.clone(), creds(d.user));
                }
                d.connected = !d.connected;
            }
            12 => {
                d.db().connect(d.front.clone(), creds(d.user));
                d.connected = true;
            }
            13 | 14 => {
                d.front.lose_answers.store(1 + rng.below(2), Ordering::SeqCst);
            }
            15 | 16 => {
                d.drain_heard();
                d.mirrors.clear();
                d.heard = None;
                let db = d.db.take().expect("open");
                if rng.below(2) == 0 {
                    db.close().await.expect("close");
                } else {
                    // Killed, and reopened at once.
                    drop(db);
                }
                d.open();
            }
            17 => {
                if let Some(s) = server.take() {
                    for d in &devices {
                        d.front.switch(None);
                    }
                    s.shutdown().await.expect("shutdown");
                } else {
                    let s = start_server(&server_dir).await;
                    for d in &devices {
                        d.front.switch(Some(&s));
                    }
                    server = Some(s);
                }
            }
            18 => {
                let paused = d.db().status();
                if rng.below(2) == 0 {
                    d.db().pause_uploads(!paused.uploads_paused);
                } else {
                    d.db().pause_downloads(!paused.downloads_paused);
                }
            }
            _ => tokio::time::sleep(Duration::from_millis(rng.below(30))).await,
        }
    }
    if server.is_none() {
        let s = start_server(&server_dir).await;
        for d in &devices {
            d.front.switch(Some(&s));
        }
        server = Some(s);
    }
    let server = server.expect("server");
    for d in &mut devices {
        d.front.lose_answers.store(0, Ordering::SeqCst);
        d.db().pause_uploads(false);
        d.db().pause_downloads(false);
        if !d.connected {
            d.db().connect(d.front.clone(), creds(d.user));
            d.connected = true;
        }
    }
    for _ in 0..2 {
        for d in &devices {
            assert!(
                d.db().sync_now(5_000).await,
                "seed {seed}: sync_now: {:?}\n{history:#?}",
                d.db().status()
            );
            assert!(d.db().wait_until_settled(5_000).await, "seed {seed}: settle");
        }
    }
    for (i, d) in devices.iter_mut().enumerate() {
        d.drain_heard();
        stored_outcomes(d.db());
        for (q, m) in d.mirrors.iter().enumerate() {
            m.check(d.db(), &format!("seed {seed} device {i} query {q}"));
        }
        for id in 0..5 {
            let t = format!("t{id}");
            let on_server = normalized(server_row(&server, "tickets", &t));
            let mine = on_server.filter(|r| r.get("owner") == Some(&text(d.user)));
            let local = normalized(d.db().local().get("tickets", &t).expect("get"));
            assert_eq!(local, mine, "seed {seed} device {i} tickets/{t}\n{history:#?}");
            let p = format!("p{id}");
            let on_server = normalized(server_row(&server, "board", &p));
            let local = normalized(d.db().local().get("board", &p).expect("get"));
            assert_eq!(local, on_server, "seed {seed} device {i} board/{p}\n{history:#?}");
        }
    }
}

/// Moved from team red to blue and back to red (the claim changing with
/// fresh tokens): back in red, the device holds every red row again, the
/// ones unchanged since it left included, and none of blue's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_moved_out_of_a_bucket_and_back_gets_all_its_rows_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start_server(&dir.path().join("server")).await;
    let red = open(&dir.path().join("red.db"), 28);
    let blue = open(&dir.path().join("blue.db"), 29);
    let carol = open(&dir.path().join("carol.db"), 30);
    let mirror = Mirror::new(&carol, Query::from("team_posts").order_by(col("title"), Order::Asc));
    red_and_blue_post(&server, &red, &blue).await;
    let minted = Minted::new("carol", 1);
    minted.claims.lock().insert("team".into(), "red".into());
    carol.connect(Arc::new(http(&server)), minted.clone());
    settle(&carol).await;
    let set = |names: &[&str]| -> BTreeSet<String> { names.iter().map(|s| s.to_string()).collect() };
    assert_eq!(ids(&carol, "team_posts"), set(&["r1", "r2"]));
    minted.claims.lock().insert("team".into(), "blue".into());
    assert!(
        wait_until(5_000, || ids(&carol, "team_posts") == set(&["b1"])).await,
        "in blue: {:?}",
        ids(&carol, "team_posts")
    );
    write(&red, |tx| {
        tx.insert("team_posts", "r3", team_post("d red three", "red"))
    });
    settle(&red).await;
    minted.claims.lock().insert("team".into(), "red".into());
    assert!(
        wait_until(5_000, || ids(&carol, "team_posts") == set(&["r1", "r2", "r3"])).await,
        "back in red: {:?}",
        ids(&carol, "team_posts")
    );
    settle(&carol).await;
    assert_eq!(ids(&carol, "team_posts"), set(&["r1", "r2", "r3"]));
    mirror.check(&carol, "back in red");
}

/// `disconnect` gives up on an answer still being stored after
/// `stop_timeout_ms` and aborts; the next connection asks for it again.
/// The write still has one stored outcome and is heard once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disconnect_that_times_out_while_an_answer_is_stored_hears_it_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start_server(&dir.path().join("server")).await;
    let store = Gated::open(&dir.path().join("alice.db"));
    let db = Database::open(
        store.clone(),
        ClientOptions {
            stop_timeout_ms: 50,
            ..options(31, Limits::default())
        },
    )
    .expect("open");
    let mut heard = db.subscribe_outcomes();
    store.close_gate();
    db.connect(Front::to(&server), creds("alice"));
    let receipt = write(&db, |tx| tx.insert("board", "p1", post("once", "alice")));
    assert!(wait_until(5_000, || store.held.load(Ordering::SeqCst)).await);
    db.disconnect().await;
    let front = Front::to(&server);
    db.connect(front.clone(), creds("alice"));
    assert!(wait_until(5_000, || front.handled.load(Ordering::SeqCst) >= 1).await);
    store.open_gate();
    settle(&db).await;
    assert_eq!(stored_outcomes(&db).len(), 1);
    let mut seqs = Vec::new();
    while let Ok(o) = heard.try_recv() {
        seqs.push(o.outcome.seq);
    }
    assert_eq!(seqs, vec![receipt.first_seq], "each outcome is delivered once");
    assert_eq!(server_ops(&server), 1);
}

/// The app drops its database (the brief's restart: drop, reopen the same
/// file) while a checkpoint that confirms its answered write is being
/// stored, and reopens at once. The old database's store thread still
/// commits that checkpoint, dropping the entry the new database counted as
/// pending: the new database must still settle, with nothing pending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_dropped_while_a_checkpoint_is_stored_and_reopened_at_once_settles() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start_server(&dir.path().join("server")).await;
    let path = dir.path().join("alice.db");
    let store = Gated::open(&path);
    store.confirms.store(true, Ordering::SeqCst);
    let db = Database::open(store.clone(), options(32, Limits::default())).expect("open");
    store.close_gate();
    db.connect(Arc::new(http(&server)), creds("alice"));
    write(&db, |tx| tx.insert("board", "p1", post("one", "alice")));
    assert!(
        wait_until(5_000, || store.held.load(Ordering::SeqCst)).await,
        "the confirming checkpoint is being stored"
    );
    // The disk comes back a moment later, while the app restarts.
    let opener = {
        let store = store.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            store.open_gate();
        })
    };
    drop(db);
    let db = open(&path, 32);
    opener.join().expect("opener");
    drop(store);
    db.connect(Arc::new(http(&server)), creds("alice"));
    assert!(db.sync_now(5_000).await, "{:?}", db.status());
    assert!(
        db.wait_until_settled(3_000).await,
        "pending_len {:?} with a queue of {:?} entries",
        db.local().pending_len(),
        db.local().store().queue_len()
    );
    assert_eq!(stored_outcomes(&db).len(), 1);
}

/// An app killed (its database dropped) and reopened in-process sixty
/// times, right after its writes and never waiting for anything, some
/// writes refused: every write ends with one outcome, the server holds
/// each allowed one once, and the last session settles (before the drop
/// waited for store writes, about one run in ten kept a phantom pending
/// entry).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_killed_and_reopened_again_and_again_settles_with_every_write_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start_server(&dir.path().join("server")).await;
    let path = dir.path().join("alice.db");
    let mut n = 0u64;
    for round in 0..60u64 {
        let db = open(&path, 40);
        db.connect(Arc::new(http(&server)), creds("alice"));
        for _ in 0..(round % 4) {
            write(&db, |tx| {
                tx.insert("board", &format!("p{n:03}"), post(&format!("{n}"), "alice"))
            });
            n += 1;
        }
        if round % 3 == 1 {
            write(&db, |tx| {
                tx.insert("board", &format!("x{round}"), post("refused", "bob"))
            });
        }
        tokio::time::sleep(Duration::from_micros(round * 397 % 9_000)).await;
        drop(db);
    }
    let db = open(&path, 40);
    db.connect(Arc::new(http(&server)), creds("alice"));
    settle(&db).await;
    let outcomes = stored_outcomes(&db);
    assert_eq!(outcomes.values().filter(|o| is_rejected(o)).count(), 20);
    assert_eq!(server_ops(&server), n);
    assert_eq!(ids(&db, "board").len() as u64, n);
}

/// The app's store restored from an older backup (a phone restored, the
/// app's files copied back): same client id, an older queue, while the
/// server has answered later seqs of that id. The restored copy applies
/// checkpoints again (each carries a write checkpoint beyond its last
/// seq, which used to be refused as "invalid seq 4: beyond the last
/// queued entry", the stream reopened again and again), gets the rows the
/// device wrote after the backup from the server, and its next writes
/// take seqs after the server's instead of reusing one it recorded for
/// another write (each was rejected as "seq 2 ... was already used for a
/// different write").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_restored_from_an_older_backup_syncs_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start_server(&dir.path().join("server")).await;
    let path = dir.path().join("alice.db");
    let backup = dir.path().join("backup.db");
    let copy = |from: &Path, to: &Path| {
        for suffix in ["", "-wal", "-shm"] {
            let src = std::path::PathBuf::from(format!("{}{suffix}", from.display()));
            let dst = std::path::PathBuf::from(format!("{}{suffix}", to.display()));
            let _ = std::fs::remove_file(&dst);
            if src.exists() {
                std::fs::copy(&src, &dst).expect("copy");
            }
        }
    };
    let db = open(&path, 41);
    db.connect(Arc::new(http(&server)), creds("alice"));
    write(&db, |tx| tx.insert("board", "p1", post("one", "alice")));
    settle(&db).await;
    db.close().await.expect("close");
    copy(&path, &backup);
    let db = open(&path, 41);
    db.connect(Arc::new(http(&server)), creds("alice"));
    for i in 2..5 {
        write(&db, |tx| tx.insert("board", &format!("p{i}"), post("later", "alice")));
    }
    settle(&db).await;
    db.close().await.expect("close");
    copy(&backup, &path);

    let bob = open(&dir.path().join("bob.db"), 42);
    bob.connect(Arc::new(http(&server)), creds("bob"));
    write(&bob, |tx| tx.insert("board", "b1", post("from bob", "bob")));
    settle(&bob).await;
    let db = open(&path, 41);
    db.connect(Arc::new(http(&server)), creds("alice"));
    assert!(
        wait_until(5_000, || db.local().get("board", "b1").ok().flatten().is_some()).await,
        "the restored store gets other users' rows: {:?}",
        db.status()
    );
    let after = write(&db, |tx| tx.insert("board", "after-restore", post("new", "alice")));
    assert_eq!(after.first_seq, 5, "the seqs the server answered are not reused");
    settle(&db).await;
    // Seqs 2 to 4 were queued by the store before it was overwritten:
    // this copy holds outcomes for its own writes only.
    let outcomes: BTreeMap<u64, Outcome> = db
        .outcomes_since(0, 100)
        .expect("outcomes")
        .into_iter()
        .map(|o| (o.outcome.seq, o.outcome.outcome))
        .collect();
    assert_eq!(outcomes.keys().copied().collect::<Vec<_>>(), [1, 5], "{outcomes:?}");
    assert_eq!(outcomes[&5], Outcome::Applied, "{outcomes:?}");
    assert_eq!(
        server_row(&server, "board", "after-restore").and_then(|r| r.get("title").cloned()),
        Some(text("new"))
    );
    assert_eq!(ids(&db, "board").len(), 6);
    // Reopened, the copy keeps counting from there.
    db.close().await.expect("close");
    let db = open(&path, 41);
    let next = write(&db, |tx| tx.insert("board", "after-reopen", post("newer", "alice")));
    assert_eq!(next.first_seq, 6);
}

/// While a device is offline, other devices rewrite, delete, recreate and
/// hand over rows, and the server compacts every bucket: the device comes
/// back to exactly the server's rows, and its live queries match.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_offline_across_compaction_converges() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start_server(&dir.path().join("server")).await;
    let a = open(&dir.path().join("alice-a.db"), 43);
    let b = open(&dir.path().join("alice-b.db"), 44);
    let a_board = Mirror::new(&a, board_by_title());
    let a_tickets = Mirror::new(&a, tickets_by_title().limit(3));
    for db in [&a, &b] {
        db.connect(Arc::new(http(&server)), creds("alice"));
    }
    write(&a, |tx| {
        for i in 0..6 {
            tx.insert("board", &format!("p{i}"), post(&format!("v0 {i}"), "alice"))?;
            tx.insert("tickets", &format!("t{i}"), ticket(&format!("v0 {i}"), "alice"))?;
        }
        Ok(())
    });
    settle(&a).await;
    settle(&b).await;
    a.disconnect().await;
    for round in 1..4 {
        write(&b, |tx| {
            for i in 0..6 {
                tx.update(
                    "board",
                    &format!("p{i}"),
                    row_data([("title", text(&format!("v{round} {i}")))]),
                )?;
            }
            Ok(())
        });
        settle(&b).await;
    }
    write(&b, |tx| {
        tx.delete("board", "p1")?;
        tx.delete("tickets", "t1")?;
        tx.update("tickets", "t2", row_data([("owner", text("bob"))]))?;
        Ok::<_, QueueError>(())
    });
    settle(&b).await;
    write(&b, |tx| {
        tx.put("board", "p1", post("recreated", "alice"))?;
        tx.delete("board", "p2").map(|_| ())
    });
    settle(&b).await;
    server.service.compact_all().await.expect("compact");
    a.connect(Arc::new(http(&server)), creds("alice"));
    settle(&a).await;
    a_board.check(&a, "board after compaction");
    a_tickets.check(&a, "tickets window after compaction");
    for i in 0..6 {
        let p = format!("p{i}");
        assert_eq!(
            normalized(a.local().get("board", &p).expect("get")),
            normalized(server_row(&server, "board", &p)),
            "{p}"
        );
        let t = format!("t{i}");
        let on_server =
            normalized(server_row(&server, "tickets", &t)).filter(|r| r.get("owner") == Some(&text("alice")));
        assert_eq!(normalized(a.local().get("tickets", &t).expect("get")), on_server, "{t}");
    }
}

/// A wrong base url (a path the sync server does not serve: its 404), or
/// a proxy's 403, is not the sync server refusing the writes: they stay
/// pending, the error shows in the status, and once the app connects to
/// the right address they apply. Every 4xx but 401, 408 and 429 used to
/// reject and roll back every pending write the client sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_base_url_keeps_the_writes_pending_until_the_right_one_takes_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start_server(&dir.path().join("server")).await;
    let db = open(&dir.path().join("alice.db"), 31);
    let receipt = write(&db, |tx| tx.insert("board", "kept", post("kept", "alice")));
    let wrong: Arc<dyn Transport> =
        Arc::new(HttpTransport::new(format!("http://{}/not-the-sync-server/", server.addr)).expect("transport"));
    db.connect(wrong, creds("alice"));
    assert!(
        wait_until(10_000, || db.status().last_upload_error.is_some()).await,
        "no upload error shown: {:?}",
        db.status()
    );
    assert_eq!(db.local().upload_queue_len(), 1, "the write left the queue");
    let heard = db.outcomes_since(0, 100).expect("outcomes");
    assert!(heard.is_empty(), "{heard:?}");
    assert!(server_row(&server, "board", "kept").is_none());
    db.connect(http(&server), creds("alice"));
    settle(&db).await;
    let outcomes = stored_outcomes(&db);
    assert_eq!(outcomes[&receipt.first_seq].outcome.outcome, Outcome::Applied);
    assert!(server_row(&server, "board", "kept").is_some());
}
