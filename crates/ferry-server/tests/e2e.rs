//! End-to-end tests: the real `ferry-server` binary on a loopback port, real
//! clients (`ferry_client::Database` on SQLite) over HTTP.
//!
//! Every test starts its own server (temp data dir, test secret, port 0;
//! the address is read from the line the binary prints) and kills it when
//! its guard drops. Waits are on conditions with deadlines, never bare
//! sleeps.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use ferry_client::{ClientError, ClientOptions, Credentials, Database, StaticToken, SyncStatus};
use ferry_core::{row_data, CrudEntry, CrudOp, RowData, Schema, SystemClock, Value};
use ferry_http::HttpTransport;
use ferry_protocol::{
    decode_line, Checkpoint, OpKind, OplogEntry, Outcome, StreamLine, StreamRequest, UploadRequest, UploadResponse,
    UploadTransaction, DEFAULT_MAX_LINE_BYTES,
};
use ferry_queue::LocalDbOptions;
use ferry_sqlite::SqliteStore;
use ferry_store::{BatchOp, Store, WriteBatch};
use ferry_transport::{FaultConfig, FaultyTransport, LineStream, Transport, TransportError};
use parking_lot::Mutex;
use tokio::sync::watch;

const SECRET: &str = "e2e-test-secret";
const GLOBAL: &str = "global[]";

/// Generous upper bound for any single wait; tests normally finish far
/// sooner.
const WAIT_MS: u64 = 20_000;

// ---------------------------------------------------------------------------
// The server process
// ---------------------------------------------------------------------------

/// The running binary; killed (and reaped) on drop.
struct ServerGuard {
    child: Child,
    base_url: String,
    log_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl ServerGuard {
    /// Start `ferry-server serve` on a free loopback port with a fresh data
    /// dir, the test secret and, if given, a TOML config.
    async fn start(config_toml: Option<&str>) -> ServerGuard {
        let dir = tempfile::tempdir().expect("server tempdir");
        let data_dir = dir.path().join("data");
        let log_path = dir.path().join("server.log");
        let log = std::fs::File::create(&log_path).expect("server log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferry-server"));
        cmd.arg("serve")
            .args(["--listen", "127.0.0.1:0", "--jwt-secret", SECRET, "--data-dir"])
            .arg(&data_dir)
            .env_remove("FERRY_CONFIG")
            .env_remove("FERRY_RULES")
            .env_remove("FERRY_DATA_DIR")
            .env_remove("FERRY_LISTEN")
            .env_remove("FERRY_JWT_SECRET")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log));
        if let Some(toml) = config_toml {
            let path = dir.path().join("server.toml");
            std::fs::write(&path, toml).expect("write server config");
            cmd.arg("--config").arg(path);
        }
        let mut child = cmd.spawn().expect("spawn ferry-server");
        let stdout = child.stdout.take().expect("server stdout");
        // The binary prints `ferry-server listening on http://ADDR` once
        // bound; read it on a thread so the wait is bounded.
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(url) = line.strip_prefix("ferry-server listening on ") {
                    let _ = tx.send(url.trim().to_owned());
                }
            }
        });
        let mut guard = ServerGuard {
            child,
            base_url: String::new(),
            log_path,
            _dir: dir,
        };
        let addr = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(20)))
            .await
            .expect("address reader task");
        match addr {
            Ok(url) => guard.base_url = url,
            Err(e) => panic!("ferry-server did not report its address ({e}); log:\n{}", guard.log()),
        }
        guard.wait_healthy().await;
        guard
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// GET /health until it answers 200, with a bounded retry loop.
    async fn wait_healthy(&mut self) {
        let url = format!("{}/health", self.base_url);
        let client = http_client();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("ferry-server exited early with {status}; log:\n{}", self.log());
            }
            let ok = match client.get(&url).send().await {
                Ok(r) if r.status().is_success() => r.text().await.is_ok_and(|b| b.contains("ok")),
                _ => false,
            };
            if ok {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "ferry-server never became healthy at {url}; log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn transport(&self) -> HttpTransport {
        HttpTransport::new(self.base_url.clone()).expect("http transport")
    }
}

impl Drop for ServerGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A reqwest client for raw requests.
fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("reqwest client")
}

fn token(user: &str) -> String {
    ferry_server::mint_token(SECRET, user, 3600, &serde_json::Map::new())
}

fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after epoch")
        .as_secs()
}

// ---------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------

/// The ticket tracker's client schema: the example rules' tables the
/// client syncs (derived from the rules, not re-listed), plus the client's
/// index.
fn client_schema() -> Schema {
    let rules = ferry_server::SyncRules::ticket_tracker().expect("rules");
    let server = rules.schema();
    let table = |name: &str| server.table(name).expect("the rules declare the table").clone();
    Schema::new([
        table("tickets").index("by_status", &["status"]),
        table("app_user"),
        table("assignments"),
        table("comments"),
        table("attachments"),
    ])
    .expect("client schema")
}

fn client_db_path(dir: &Path) -> PathBuf {
    dir.join("client.db")
}

/// A client on SQLite in `dir`, with short retry delays.
fn open_client(dir: &Path, seed: u64) -> Database {
    let store = SqliteStore::open(client_db_path(dir), client_schema()).expect("client store");
    let options = ClientOptions {
        local: LocalDbOptions {
            clock: Arc::new(SystemClock),
            client_id_seed: Some(seed),
            ..LocalDbOptions::default()
        },
        retry_initial_delay_ms: 10,
        retry_max_delay_ms: 100,
        jitter_seed: seed,
        upload_poll_interval_ms: 50,
        ..ClientOptions::default()
    };
    Database::open(Arc::new(store), options).expect("open client")
}

/// Rows without their NULL columns (the server stores every column).
fn normalize(data: &RowData) -> RowData {
    data.iter()
        .filter(|(_, v)| !v.is_null())
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn client_tickets(db: &Database) -> BTreeMap<String, RowData> {
    db.local()
        .scan("tickets")
        .expect("scan tickets")
        .into_iter()
        .map(|(id, d)| (id, normalize(&d)))
        .collect()
}

fn ticket(title: &str, status: &str) -> RowData {
    row_data([("title", Value::from(title)), ("status", Value::from(status))])
}

/// Wait until `pred` holds, polling every 10 ms, up to `timeout_ms`.
async fn wait_until(timeout_ms: u64, mut pred: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_millis(timeout_ms);
    loop {
        if pred() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ---------------------------------------------------------------------------
// What the server holds, read over the wire
// ---------------------------------------------------------------------------

/// The server's state for a user, as a fresh stream delivers it.
#[derive(Debug)]
struct Snapshot {
    checkpoint: Checkpoint,
    /// Live tickets (NULL columns dropped).
    tickets: BTreeMap<String, RowData>,
}

/// Open a fresh stream (a new client id, no buckets held) and read it to
/// its first `checkpoint_complete`, replaying the ops of every bucket.
async fn server_snapshot(server: &ServerGuard, user: &str) -> Snapshot {
    let transport = server.transport();
    let request = StreamRequest {
        client_id: format!("snapshot-{}", now_nanos()),
        buckets: Vec::new(),
    };
    let body = serde_json::to_vec(&request).expect("encode stream request");
    let mut stream = tokio::time::timeout(
        Duration::from_millis(WAIT_MS),
        transport.open_stream(&token(user), body),
    )
    .await
    .expect("snapshot stream opens in time")
    .expect("snapshot stream opens");
    let mut checkpoint: Option<Checkpoint> = None;
    // (bucket, table, id) -> row
    let mut rows: BTreeMap<(String, String, String), RowData> = BTreeMap::new();
    loop {
        let line = tokio::time::timeout(Duration::from_millis(WAIT_MS), stream.next_line())
            .await
            .expect("snapshot line in time")
            .expect("snapshot line")
            .expect("snapshot stream ended early");
        match decode_line::<StreamLine>(&line, DEFAULT_MAX_LINE_BYTES).expect("snapshot line decodes") {
            StreamLine::Checkpoint(cp) => checkpoint = Some(cp),
            StreamLine::Data(batch) => {
                for op in batch.ops {
                    let key = |op: &OplogEntry| {
                        (
                            batch.bucket.clone(),
                            op.object_type.clone().unwrap_or_default(),
                            op.object_id.clone().unwrap_or_default(),
                        )
                    };
                    match op.op {
                        OpKind::Put => {
                            let data = op.data.clone().expect("put has data");
                            rows.insert(key(&op), data);
                        }
                        OpKind::Remove => {
                            rows.remove(&key(&op));
                        }
                        OpKind::Clear => rows.retain(|(b, _, _), _| b != &batch.bucket),
                        OpKind::Move => {}
                    }
                }
            }
            StreamLine::CheckpointComplete { last_op_id } => {
                let checkpoint = checkpoint.expect("checkpoint before checkpoint_complete");
                assert_eq!(checkpoint.last_op_id, last_op_id, "checkpoint_complete matches");
                let tickets = rows
                    .into_iter()
                    .filter(|((_, table, _), _)| table == "tickets")
                    .map(|((_, _, id), data)| (id, normalize(&data)))
                    .collect();
                return Snapshot { checkpoint, tickets };
            }
            StreamLine::CheckpointDiff(_) | StreamLine::Keepalive { .. } => {}
            StreamLine::Error(e) => panic!("snapshot stream error: {e:?}"),
        }
    }
}

fn now_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after epoch")
        .as_nanos()
}

/// Wait until `db` has no pending writes and applied a checkpoint at or
/// past `last_op_id`.
async fn wait_caught_up(db: &Database, last_op_id: u64) -> bool {
    wait_until(WAIT_MS, || {
        let s = db.status();
        db.local().pending_len().expect("pending_len") == 0
            && s.has_synced
            && s.last_applied_op_id.unwrap_or(0) >= last_op_id
    })
    .await
}

// ---------------------------------------------------------------------------
// A recording transport
// ---------------------------------------------------------------------------

/// What a [`RecordingTransport`] saw in one stream session.
#[derive(Debug, Default, Clone)]
struct Session {
    /// The request that opened it.
    request: Option<StreamRequest>,
    /// The client's status when it opened the stream.
    status_at_open: Option<SyncStatus>,
    /// `(bucket, op_id)` of every op delivered to the client.
    ops: Vec<(String, u64)>,
    /// Checkpoints delivered.
    checkpoints: Vec<Checkpoint>,
    /// Whether the stream was broken on purpose.
    broken: bool,
}

#[derive(Debug, Default)]
struct Recorder {
    sessions: Vec<Session>,
}

/// Wraps a transport: decodes every stream line the client receives and
/// records its ops per session; optionally breaks the stream after a given
/// number of data lines in the first sessions (the line that would have
/// come next is lost with the connection).
#[derive(Clone)]
struct RecordingTransport {
    inner: Arc<dyn Transport>,
    recorder: Arc<Mutex<Recorder>>,
    /// For session `i < break_after.len()`: break before data line
    /// `break_after[i] + 1`.
    break_after: Arc<Vec<usize>>,
    status: Arc<Mutex<Option<watch::Receiver<SyncStatus>>>>,
}

impl std::fmt::Debug for RecordingTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordingTransport").finish_non_exhaustive()
    }
}

impl RecordingTransport {
    fn new(inner: Arc<dyn Transport>, break_after: Vec<usize>) -> Self {
        RecordingTransport {
            inner,
            recorder: Arc::new(Mutex::new(Recorder::default())),
            break_after: Arc::new(break_after),
            status: Arc::new(Mutex::new(None)),
        }
    }

    /// Record the client's status at each stream open.
    fn watch(&self, db: &Database) {
        *self.status.lock() = Some(db.watch_status());
    }

    fn sessions(&self) -> Vec<Session> {
        self.recorder.lock().sessions.clone()
    }
}

struct RecordingLines {
    inner: Box<dyn LineStream>,
    recorder: Arc<Mutex<Recorder>>,
    session: usize,
    data_lines: usize,
    break_after: Option<usize>,
}

#[async_trait]
impl LineStream for RecordingLines {
    async fn next_line(&mut self) -> Result<Option<Vec<u8>>, TransportError> {
        let Some(line) = self.inner.next_line().await? else {
            return Ok(None);
        };
        let decoded = decode_line::<StreamLine>(&line, DEFAULT_MAX_LINE_BYTES);
        let mut rec = self.recorder.lock();
        let session = &mut rec.sessions[self.session];
        match decoded {
            Ok(StreamLine::Data(batch)) => {
                if self.break_after == Some(self.data_lines) {
                    session.broken = true;
                    return Err(TransportError::Connection("injected mid-stream break".into()));
                }
                self.data_lines += 1;
                session
                    .ops
                    .extend(batch.ops.iter().map(|op| (batch.bucket.clone(), op.op_id)));
            }
            Ok(StreamLine::Checkpoint(cp)) => session.checkpoints.push(cp),
            _ => {}
        }
        Ok(Some(line))
    }
}

#[async_trait]
impl Transport for RecordingTransport {
    async fn open_stream(&self, token: &str, request: Vec<u8>) -> Result<Box<dyn LineStream>, TransportError> {
        let decoded: StreamRequest = serde_json::from_slice(&request).expect("client sends a valid stream request");
        let status = self.status.lock().as_ref().map(|rx| rx.borrow().clone());
        let inner = self.inner.open_stream(token, request).await?;
        let mut rec = self.recorder.lock();
        let session = rec.sessions.len();
        rec.sessions.push(Session {
            request: Some(decoded),
            status_at_open: status,
            ..Session::default()
        });
        Ok(Box::new(RecordingLines {
            inner,
            recorder: self.recorder.clone(),
            session,
            data_lines: 0,
            break_after: self.break_after.get(session).copied(),
        }))
    }

    async fn upload(&self, token: &str, request: Vec<u8>) -> Result<Vec<u8>, TransportError> {
        self.inner.upload(token, request).await
    }
}

fn after_op_id(request: &StreamRequest, bucket: &str) -> u64 {
    request
        .buckets
        .iter()
        .find(|b| b.name == bucket)
        .map_or(0, |b| b.after_op_id)
}

fn put_entry(seq: u64, tx_id: u64, table: &str, id: &str, data: RowData) -> CrudEntry {
    CrudEntry {
        seq,
        tx_id,
        op: CrudOp::Put {
            table: table.into(),
            id: id.into(),
            data,
        },
        previous: None,
        metadata: None,
        hlc: None,
    }
}

// ---------------------------------------------------------------------------
// 1. Offline writes upload on reconnect; clients converge
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_writes_upload_on_reconnect_and_clients_converge() {
    let server = ServerGuard::start(None).await;
    let dirs = (tempfile::tempdir().expect("dir a"), tempfile::tempdir().expect("dir b"));
    let a = open_client(dirs.0.path(), 1);
    let b = open_client(dirs.1.path(), 2);
    let http: Arc<dyn Transport> = Arc::new(server.transport());
    a.connect(http.clone(), Arc::new(StaticToken(token("alice"))));
    b.connect(http.clone(), Arc::new(StaticToken(token("bob"))));

    // A shared starting point: three tickets written by A, seen by both.
    a.write(|tx| {
        for i in 1..=3 {
            tx.insert("tickets", &format!("t{i}"), ticket(&format!("ticket {i}"), "pending"))?;
        }
        Ok::<_, ferry_queue::QueueError>(())
    })
    .expect("seed tickets");
    assert!(a.wait_until_settled(WAIT_MS).await, "A settles: {:?}", a.status());
    let start = server_snapshot(&server, "alice").await;
    assert_eq!(start.tickets.len(), 3);
    assert!(wait_caught_up(&b, start.checkpoint.last_op_id).await, "B sees the seed");
    assert_eq!(client_tickets(&b), start.tickets);

    // A goes offline and writes: an insert, an update, a delete.
    a.disconnect().await;
    assert!(!a.status().connected);
    let first_offline_seq = a.local().last_seq() + 1;
    let mut outcomes = a.subscribe_outcomes();
    a.write(|tx| tx.insert("tickets", "a-new", ticket("written offline by A", "pending")))
        .expect("offline insert");
    a.write(|tx| {
        tx.update("tickets", "t1", row_data([("status", Value::from("done"))]))
            .map(drop)
    })
    .expect("offline update");
    a.write(|tx| tx.delete("tickets", "t2").map(drop))
        .expect("offline delete");
    let last_offline_seq = a.local().last_seq();
    assert_eq!(last_offline_seq - first_offline_seq + 1, 3, "three queued ops");
    assert_eq!(a.local().pending_len().expect("pending"), 3);
    // Visible locally at once.
    let local_a = client_tickets(&a);
    assert!(local_a.contains_key("a-new") && !local_a.contains_key("t2"));
    assert_eq!(local_a["t1"].get("status"), Some(&Value::from("done")));

    // B writes meanwhile, online.
    b.write(|tx| {
        tx.insert("tickets", "b-new", ticket("written by B", "in_progress"))?;
        tx.update("tickets", "t3", row_data([("title", Value::from("renamed by B"))]))
            .map(drop)
    })
    .expect("B writes");
    assert!(b.wait_until_settled(WAIT_MS).await, "B settles: {:?}", b.status());
    // The server has B's writes but none of A's offline ones.
    let mid = server_snapshot(&server, "bob").await;
    assert!(mid.tickets.contains_key("b-new") && mid.tickets.contains_key("t2"));
    assert!(!mid.tickets.contains_key("a-new"));

    // A comes back.
    a.connect(http.clone(), Arc::new(StaticToken(token("alice"))));
    assert!(
        a.wait_until_settled(WAIT_MS).await,
        "A settles after reconnect: {:?}",
        a.status()
    );
    let end = server_snapshot(&server, "alice").await;
    assert!(wait_caught_up(&a, end.checkpoint.last_op_id).await, "A catches up");
    assert!(wait_caught_up(&b, end.checkpoint.last_op_id).await, "B catches up");

    let mut expected = start.tickets.clone();
    expected.insert("a-new".into(), normalize(&ticket("written offline by A", "pending")));
    expected
        .get_mut("t1")
        .expect("t1")
        .insert("status".into(), Value::from("done"));
    expected.remove("t2");
    expected.insert("b-new".into(), normalize(&ticket("written by B", "in_progress")));
    expected
        .get_mut("t3")
        .expect("t3")
        .insert("title".into(), Value::from("renamed by B"));
    assert_eq!(end.tickets, expected, "server holds both clients' writes");
    assert_eq!(client_tickets(&a), end.tickets, "A equals the server");
    assert_eq!(client_tickets(&b), end.tickets, "B equals the server");

    // Every offline write of A got an outcome: applied.
    let mut seen: BTreeMap<u64, Outcome> = BTreeMap::new();
    let got_all = tokio::time::timeout(Duration::from_millis(WAIT_MS), async {
        while (first_offline_seq..=last_offline_seq).any(|s| !seen.contains_key(&s)) {
            let o = outcomes.recv().await.expect("outcome channel open");
            seen.insert(o.outcome.seq, o.outcome.outcome);
        }
    })
    .await;
    assert!(got_all.is_ok(), "outcomes for every offline write; got {seen:?}");
    for seq in first_offline_seq..=last_offline_seq {
        assert_eq!(seen[&seq], Outcome::Applied, "seq {seq}");
    }
    assert!(a.rejections().expect("rejections").is_empty());

    a.disconnect().await;
    b.disconnect().await;
}

// ---------------------------------------------------------------------------
// 2. A broken stream resumes without downloading again what it had
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_stream_resumes_without_duplicates() {
    // Small data lines, so that 5,000 ops make 50 lines to break between.
    let server = ServerGuard::start(Some("max_ops_per_line = 100\n")).await;
    let http = server.transport();

    // Seed 5,000 tickets in 5 transactions, straight over the wire.
    const TICKETS: u64 = 5_000;
    const PER_TX: u64 = 1_000;
    let transactions = (0..TICKETS / PER_TX)
        .map(|t| UploadTransaction {
            tx_id: t + 1,
            ops: (0..PER_TX)
                .map(|i| {
                    let n = t * PER_TX + i;
                    put_entry(
                        n + 1,
                        t + 1,
                        "tickets",
                        &format!("bulk-{n:05}"),
                        row_data([
                            ("title", Value::from(format!("bulk ticket {n}"))),
                            ("status", Value::from("pending")),
                            ("version", Value::from(i64::try_from(n).expect("small"))),
                        ]),
                    )
                })
                .collect(),
        })
        .collect();
    let upload = UploadRequest {
        client_id: "seeder".into(),
        transactions,
    };
    let answer = http
        .upload(&token("seeder"), serde_json::to_vec(&upload).expect("encode upload"))
        .await
        .expect("seed upload");
    let answer: UploadResponse = serde_json::from_slice(&answer).expect("upload response");
    assert_eq!(answer.outcomes.len() as u64, TICKETS);
    assert!(answer.outcomes.iter().all(|o| o.outcome == Outcome::Applied));
    let server_state = server_snapshot(&server, "reader").await;
    assert_eq!(server_state.tickets.len() as u64, TICKETS);

    // A fresh client whose stream breaks partway: deterministically in its
    // first two sessions (after 10, then 15 data lines), and at random (a
    // seeded `FaultyTransport`) on top.
    let dir = tempfile::tempdir().expect("client dir");
    let db = open_client(dir.path(), 7);
    let faulty = FaultyTransport::new(
        http.clone(),
        FaultConfig {
            disconnect_per_mille: 20,
            ..FaultConfig::default()
        },
        0xfe44,
    );
    let recording = RecordingTransport::new(Arc::new(faulty), vec![10, 15]);
    db.connect(Arc::new(recording.clone()), Arc::new(StaticToken(token("reader"))));
    assert!(
        wait_caught_up(&db, server_state.checkpoint.last_op_id).await,
        "client converges: {:?}",
        db.status()
    );
    assert_eq!(client_tickets(&db), server_state.tickets, "client equals the server");

    let sessions = recording.sessions();
    for (i, s) in sessions.iter().enumerate() {
        let from = s.request.as_ref().map_or(0, |r| after_op_id(r, GLOBAL));
        eprintln!(
            "session {i}: global after_op_id {from}, {} ops delivered, injected break: {}",
            s.ops.len(),
            s.broken
        );
    }
    assert!(sessions.len() >= 3, "two breaks at least, then a whole session");
    let resumed = sessions
        .iter()
        .filter(|s| s.request.as_ref().is_some_and(|r| after_op_id(r, GLOBAL) > 0))
        .count();
    assert!(resumed >= 2, "at least two sessions resumed mid-bucket, got {resumed}");
    // What was delivered before each break is where the next session
    // starts, and nothing at or before that position comes again.
    let mut held: BTreeMap<String, u64> = BTreeMap::new();
    let mut all: Vec<(String, u64)> = Vec::new();
    for (i, s) in sessions.iter().enumerate() {
        let request = s.request.as_ref().expect("request recorded");
        for (bucket, pos) in &held {
            assert_eq!(
                after_op_id(request, bucket),
                *pos,
                "session {i} resumes {bucket} after the last op it received"
            );
        }
        for (bucket, op_id) in &s.ops {
            let pos = after_op_id(request, bucket);
            assert!(
                *op_id > pos,
                "session {i}: op {op_id} of {bucket} is at or before {pos}"
            );
            let h = held.entry(bucket.clone()).or_default();
            *h = (*h).max(*op_id);
        }
        all.extend(s.ops.iter().cloned());
    }
    let distinct: BTreeSet<&(String, u64)> = all.iter().collect();
    assert_eq!(distinct.len(), all.len(), "no op was delivered twice");
    let expected_ops: u64 = server_state.checkpoint.buckets.iter().map(|b| b.count).sum();
    assert_eq!(
        all.len() as u64,
        expected_ops,
        "ops delivered across sessions equal the ops the server has for the buckets"
    );
    assert!(expected_ops >= TICKETS);
    db.disconnect().await;
}

// ---------------------------------------------------------------------------
// 3. A corrupted local bucket is detected by checksum and healed
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_local_bucket_is_detected_and_healed() {
    let server = ServerGuard::start(None).await;
    let http: Arc<dyn Transport> = Arc::new(server.transport());
    let dir = tempfile::tempdir().expect("client dir");
    {
        let db = open_client(dir.path(), 3);
        db.connect(http.clone(), Arc::new(StaticToken(token("carol"))));
        db.write(|tx| {
            for i in 0..20 {
                tx.insert(
                    "tickets",
                    &format!("c{i:02}"),
                    ticket(&format!("ticket {i}"), "pending"),
                )?;
            }
            Ok::<_, ferry_queue::QueueError>(())
        })
        .expect("write tickets");
        assert!(db.wait_until_settled(WAIT_MS).await, "settles: {:?}", db.status());
        db.disconnect().await;
    }
    let server_state = server_snapshot(&server, "carol").await;
    assert_eq!(server_state.tickets.len(), 20);

    // Corrupt the stopped client's store: a wrong checksum for the global
    // bucket, and a synced row deleted together with its bucket entry.
    {
        let store = SqliteStore::open(client_db_path(dir.path()), client_schema()).expect("reopen store");
        let state = store
            .bucket_state(GLOBAL)
            .expect("bucket state")
            .expect("global bucket synced");
        assert!(store.get_synced("tickets", "c05").expect("get").is_some());
        let mut batch = WriteBatch::new();
        batch.push(BatchOp::PutBucketState {
            bucket: GLOBAL.into(),
            state: ferry_store::BucketState {
                checksum: state.checksum.wrapping_add(12_345),
                ..state
            },
        });
        batch.delete_synced("tickets", "c05");
        batch.push(BatchOp::DeleteBucketEntry {
            bucket: GLOBAL.into(),
            table: "tickets".into(),
            row_id: "c05".into(),
        });
        store.apply(batch).expect("corrupt the store");
    }

    let db = open_client(dir.path(), 3);
    assert!(!client_tickets(&db).contains_key("c05"), "the row is gone locally");
    let recording = RecordingTransport::new(http.clone(), Vec::new());
    recording.watch(&db);
    db.connect(Arc::new(recording.clone()), Arc::new(StaticToken(token("carol"))));
    let healed = wait_until(WAIT_MS, || {
        db.status().has_synced && client_tickets(&db) == server_state.tickets
    })
    .await;
    assert!(healed, "client heals: {:?}", db.status());

    let sessions = recording.sessions();
    assert!(
        sessions.len() >= 2,
        "a second stream downloads the bucket again: {sessions:?}"
    );
    let first = sessions[0].request.as_ref().expect("request");
    assert!(after_op_id(first, GLOBAL) > 0, "first resumes from the stored position");
    let second = sessions[1].request.as_ref().expect("request");
    assert_eq!(
        after_op_id(second, GLOBAL),
        0,
        "the bad bucket is downloaded from scratch"
    );
    let error = sessions[1]
        .status_at_open
        .as_ref()
        .and_then(|s| s.last_download_error.clone())
        .unwrap_or_default();
    assert!(
        error.contains("checksum mismatch") && error.contains(GLOBAL),
        "status names the mismatch: {error:?}"
    );
    assert!(db.status().last_download_error.is_none(), "cleared once healed");
    // The stored state is right again.
    let cp_bucket = server_state
        .checkpoint
        .buckets
        .iter()
        .find(|b| b.bucket == GLOBAL)
        .expect("global in checkpoint");
    let state = db
        .local()
        .store()
        .bucket_state(GLOBAL)
        .expect("bucket state")
        .expect("global state");
    assert_eq!(state.checksum, cp_bucket.checksum);
    db.disconnect().await;
}

// ---------------------------------------------------------------------------
// 4. A bad or expired token is refused; the client asks for a new one
// ---------------------------------------------------------------------------

/// First hands out an expired token; once asked with `refresh = true`, a
/// good one from then on.
#[derive(Debug)]
struct RefreshingCredentials {
    expired: String,
    good: String,
    current: Mutex<String>,
    calls: AtomicUsize,
    refresh_flags: Mutex<Vec<bool>>,
}

#[async_trait]
impl Credentials for RefreshingCredentials {
    async fn token(&self, refresh: bool) -> Result<String, ClientError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.refresh_flags.lock().push(refresh);
        let mut current = self.current.lock();
        if refresh {
            *current = self.good.clone();
        }
        Ok(current.clone())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_token_is_refused_and_client_refreshes() {
    let server = ServerGuard::start(None).await;
    let expired = ferry_server::mint_token_at(SECRET, "dave", now_s() - 3_600, 60, &serde_json::Map::new());

    // Raw requests: 401 with a JSON error body naming the problem.
    let client = http_client();
    let stream_url = format!("{}/sync/stream", server.base_url);
    let body = r#"{"client_id":"raw","buckets":[]}"#;
    let wrong_secret = ferry_server::mint_token("another-secret", "dave", 3600, &serde_json::Map::new());
    for (tok, needle) in [
        ("garbage", "malformed token"),
        (expired.as_str(), "token expired"),
        (wrong_secret.as_str(), "bad token signature"),
    ] {
        let r = client
            .post(&stream_url)
            .header("authorization", format!("Bearer {tok}"))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("stream request");
        assert_eq!(r.status().as_u16(), 401, "token {needle}");
        let text = r.text().await.expect("error body");
        let json: serde_json::Value = serde_json::from_str(&text).expect("json error body");
        assert_eq!(json["code"], "unauthorized", "{text}");
        let message = json["message"].as_str().expect("message");
        assert!(message.contains(needle), "{message:?} names {needle:?}");
    }
    let r = client
        .post(&stream_url)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("stream request without token");
    assert_eq!(r.status().as_u16(), 401);
    assert!(r.text().await.expect("body").contains("missing authorization header"));

    // A client whose first token is expired.
    let creds = Arc::new(RefreshingCredentials {
        expired: expired.clone(),
        good: token("dave"),
        current: Mutex::new(expired.clone()),
        calls: AtomicUsize::new(0),
        refresh_flags: Mutex::new(Vec::new()),
    });
    assert_ne!(creds.expired, creds.good);
    let dir = tempfile::tempdir().expect("client dir");
    let db = open_client(dir.path(), 4);
    db.write(|tx| tx.insert("tickets", "d1", ticket("written before connecting", "pending")))
        .expect("write");
    db.connect(Arc::new(server.transport()), creds.clone());
    assert!(
        db.wait_until_settled(WAIT_MS).await,
        "client syncs after refreshing: {:?}",
        db.status()
    );
    let state = server_snapshot(&server, "dave").await;
    assert!(state.tickets.contains_key("d1"), "the write reached the server");
    assert!(wait_caught_up(&db, state.checkpoint.last_op_id).await);
    assert_eq!(client_tickets(&db), state.tickets);

    let flags = creds.refresh_flags.lock().clone();
    assert!(creds.calls.load(Ordering::SeqCst) >= 2, "{flags:?}");
    assert!(!flags[0], "first asked without refresh: {flags:?}");
    assert!(flags.contains(&true), "asked again with refresh = true: {flags:?}");
    db.disconnect().await;
}

// ---------------------------------------------------------------------------
// 5. Malformed input gets a clear error and writes nothing
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_input_is_refused_and_writes_nothing() {
    let server = ServerGuard::start(None).await;
    let client = http_client();
    let upload_url = format!("{}/sync/upload", server.base_url);
    let tok = token("erin");
    let post = |body: String| {
        client
            .post(&upload_url)
            .header("authorization", format!("Bearer {tok}"))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };

    // One valid write, so the op log is not empty.
    let good = UploadRequest {
        client_id: "raw-client".into(),
        transactions: vec![UploadTransaction {
            tx_id: 1,
            ops: vec![put_entry(1, 1, "tickets", "ok-1", ticket("fine", "pending"))],
        }],
    };
    let r = post(serde_json::to_string(&good).expect("encode"))
        .await
        .expect("good upload");
    assert_eq!(r.status().as_u16(), 200);
    let before = server_snapshot(&server, "erin").await;
    assert!(before.checkpoint.last_op_id > 0);
    assert_eq!(before.tickets.len(), 1);

    // Not JSON at all, and JSON of the wrong shape: 400 with a message.
    for body in ["{not json", r#"{"client_id": 5}"#] {
        let r = post(body.to_owned()).await.expect("bad upload");
        assert_eq!(r.status().as_u16(), 400, "{body}");
        let text = r.text().await.expect("error body");
        let json: serde_json::Value = serde_json::from_str(&text).expect("json error body");
        assert_eq!(json["code"], "bad_request", "{text}");
        let message = json["message"].as_str().expect("message");
        assert!(message.contains("malformed upload request"), "{message:?}");
    }

    // Well-formed uploads of bad ops: 200, each op rejected with a reason
    // naming the bad value.
    let bad = UploadRequest {
        client_id: "raw-client".into(),
        transactions: vec![
            UploadTransaction {
                tx_id: 2,
                ops: vec![put_entry(
                    2,
                    2,
                    "no_such_table",
                    "x1",
                    row_data([("a", Value::from(1))]),
                )],
            },
            UploadTransaction {
                tx_id: 3,
                ops: vec![put_entry(
                    3,
                    3,
                    "tickets",
                    "x2",
                    row_data([("title", Value::from("t")), ("bogus_column", Value::from("v"))]),
                )],
            },
            UploadTransaction {
                tx_id: 4,
                ops: vec![put_entry(
                    4,
                    4,
                    "tickets",
                    "x3",
                    row_data([("version", Value::from("not-a-number"))]),
                )],
            },
        ],
    };
    let r = post(serde_json::to_string(&bad).expect("encode"))
        .await
        .expect("bad ops upload");
    assert_eq!(r.status().as_u16(), 200);
    let response: UploadResponse = serde_json::from_str(&r.text().await.expect("body")).expect("upload response");
    let reasons: BTreeMap<u64, String> = response
        .outcomes
        .iter()
        .map(|o| match &o.outcome {
            Outcome::Rejected { reason } => (o.seq, reason.clone()),
            other => panic!("seq {} not rejected: {other:?}", o.seq),
        })
        .collect();
    assert_eq!(
        reasons.keys().copied().collect::<Vec<_>>(),
        vec![2, 3, 4],
        "{reasons:?}"
    );
    assert!(reasons[&2].contains("no_such_table"), "{:?}", reasons[&2]);
    assert!(reasons[&3].contains("bogus_column"), "{:?}", reasons[&3]);
    assert!(
        reasons[&4].contains("version") && reasons[&4].contains("not-a-number"),
        "{:?}",
        reasons[&4]
    );

    // Nothing was written: the op log did not grow, no row appeared.
    let after = server_snapshot(&server, "erin").await;
    assert_eq!(
        after.checkpoint.last_op_id, before.checkpoint.last_op_id,
        "op log unchanged"
    );
    assert_eq!(
        after.checkpoint.buckets, before.checkpoint.buckets,
        "bucket checksums unchanged"
    );
    assert_eq!(after.tickets, before.tickets);

    // A fresh client syncs and sees only the good row.
    let dir = tempfile::tempdir().expect("client dir");
    let db = open_client(dir.path(), 5);
    db.connect(Arc::new(server.transport()), Arc::new(StaticToken(token("frank"))));
    assert!(
        wait_caught_up(&db, after.checkpoint.last_op_id).await,
        "{:?}",
        db.status()
    );
    let seen = client_tickets(&db);
    assert_eq!(seen.keys().cloned().collect::<Vec<_>>(), vec!["ok-1".to_owned()]);
    db.disconnect().await;
}
