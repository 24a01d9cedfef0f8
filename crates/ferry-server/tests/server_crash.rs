//! Crash test of the server process: the real `ferry-server` binary is
//! SIGKILLed at random moments while three clients write and stream over
//! HTTP, and restarted on the same data directory, 25 times. Afterwards
//! every write has exactly one durable outcome on its client, every write
//! answered `applied` is on the server, and every client's tickets equal
//! the server's.
//!
//! The kill moments come from a seed (`FERRY_SEED` replays one); the
//! interleaving with the processes is real, so a replay is close, not
//! exact.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use ferry_client::{ClientOptions, Database, StaticToken};
use ferry_core::{row_data, Clock, RandomSource, RowData, Schema, SeededRandom, SystemClock, Value};
use ferry_http::HttpTransport;
use ferry_protocol::Outcome;
use ferry_queue::LocalDbOptions;
use ferry_server::{SourceDb, SqliteSourceDb, SyncRules};
use ferry_sqlite::SqliteStore;

const SECRET: &str = "crash-test-secret";
const CLIENTS: usize = 3;
const KILLS: usize = 25;
const WAIT_MS: u64 = 30_000;

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("local addr").port()
}

/// Start the binary on `port` over `data_dir`; returns once it answers
/// /health.
async fn start(data_dir: &Path, port: u16, log: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("server log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferry-server"))
        .arg("serve")
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--jwt-secret",
            SECRET,
            "--data-dir",
        ])
        .arg(data_dir)
        .env_remove("FERRY_CONFIG")
        .env_remove("FERRY_RULES")
        .env_remove("FERRY_DATA_DIR")
        .env_remove("FERRY_LISTEN")
        .env_remove("FERRY_JWT_SECRET")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .spawn()
        .expect("spawn ferry-server");
    let url = format!("http://127.0.0.1:{port}/health");
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .expect("http client");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("ferry-server exited at start with {status}");
        }
        if http.get(&url).send().await.is_ok_and(|r| r.status().is_success()) {
            return child;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "ferry-server never became healthy"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn kill(mut child: Child) {
    // SIGKILL on Unix: no shutdown path runs.
    let _ = child.kill();
    let _ = child.wait();
}

fn client_schema() -> Schema {
    let rules = SyncRules::ticket_tracker().expect("rules");
    Schema::new([rules.schema().table("tickets").expect("tickets").clone()]).expect("schema")
}

fn open_client(path: &Path) -> Database {
    let store = SqliteStore::open(path, client_schema()).expect("client store");
    let options = ClientOptions {
        local: LocalDbOptions {
            clock: Arc::new(SystemClock),
            ..LocalDbOptions::default()
        },
        retry_initial_delay_ms: 10,
        retry_max_delay_ms: 200,
        upload_poll_interval_ms: 20,
        ..ClientOptions::default()
    };
    Database::open(Arc::new(store), options).expect("open client")
}

fn tickets(db: &Database) -> BTreeMap<String, RowData> {
    db.local()
        .scan("tickets")
        .expect("scan")
        .into_iter()
        .map(|(id, d)| (id, d.into_iter().filter(|(_, v)| !v.is_null()).collect()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_server_kills() {
    let seed = std::env::var("FERRY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| SystemClock.now_ms());
    eprintln!("server crash test seed {seed} (replay: FERRY_SEED={seed})");
    let mut rng = SeededRandom::new(seed);
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = dir.path().join("data");
    let log = dir.path().join("server.log");
    let port = free_port();
    let base_url = format!("http://127.0.0.1:{port}");

    let paths: Vec<PathBuf> = (0..CLIENTS).map(|i| dir.path().join(format!("client{i}.db"))).collect();
    let clients: Vec<Database> = paths.iter().map(|p| open_client(p)).collect();
    for (i, db) in clients.iter().enumerate() {
        let transport = Arc::new(HttpTransport::new(base_url.clone()).expect("transport"));
        let token = ferry_server::mint_token(SECRET, &format!("user{i}"), 3600, &serde_json::Map::new());
        db.connect(transport, Arc::new(StaticToken(token)));
    }
    // Writers: each client inserts tickets and edits its own, all along.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for (i, db) in clients.iter().enumerate() {
        let db = db.clone();
        let stop = stop.clone();
        writers.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let id = format!("c{i}-t{n}");
                db.write(|tx| {
                    tx.insert(
                        "tickets",
                        &id,
                        row_data([
                            ("title", Value::from(format!("ticket {n}"))),
                            ("version", Value::from(0)),
                        ]),
                    )?;
                    if n > 0 {
                        tx.update(
                            "tickets",
                            &format!("c{i}-t{}", n - 1),
                            row_data([("version", Value::from(1))]),
                        )?;
                    }
                    Ok::<_, ferry_queue::QueueError>(())
                })
                .expect("local write");
                n += 1;
                tokio::time::sleep(Duration::from_millis(7)).await;
            }
            n
        }));
    }
    for round in 0..KILLS {
        let child = start(&data_dir, port, &log).await;
        let alive_ms = 30 + rng.next_u64() % 300;
        tokio::time::sleep(Duration::from_millis(alive_ms)).await;
        kill(child);
        eprintln!("kill {round} after {alive_ms} ms");
        tokio::time::sleep(Duration::from_millis(rng.next_u64() % 50)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut written = 0;
    for w in writers {
        written += w.await.expect("writer");
    }
    assert!(written > 0, "the writers wrote");

    // A last run: everything settles.
    let child = start(&data_dir, port, &log).await;
    for (i, db) in clients.iter().enumerate() {
        assert!(db.sync_now(WAIT_MS).await, "client {i} catches up: {:?}", db.status());
    }
    for (i, db) in clients.iter().enumerate() {
        assert!(db.sync_now(WAIT_MS).await, "client {i} catches up (2)");
    }
    let views: Vec<BTreeMap<String, RowData>> = clients.iter().map(tickets).collect();
    for db in &clients {
        db.disconnect().await;
    }
    kill(child);

    // The server's data, read from its files.
    let source = SqliteSourceDb::open_dir(&data_dir).expect("open server data");
    let rules = SyncRules::ticket_tracker().expect("rules");
    let table = rules.schema().table("tickets").expect("tickets").clone();
    let server_row = |id: &str| -> Option<RowData> {
        source
            .get_row(&table, id)
            .expect("read server row")
            .and_then(|r| r.data)
            .map(|d| d.into_iter().filter(|(_, v)| !v.is_null()).collect())
    };
    for (i, db) in clients.iter().enumerate() {
        let last_seq = db.local().last_seq();
        let outcomes = db.outcomes_since(0, usize::MAX).expect("outcomes");
        let seqs: Vec<u64> = outcomes.iter().map(|o| o.outcome.seq).collect();
        assert_eq!(
            seqs,
            (1..=last_seq).collect::<Vec<_>>(),
            "client {i}: one outcome per write"
        );
        for o in &outcomes {
            assert_eq!(o.outcome.outcome, Outcome::Applied, "client {i}: {o:?}");
        }
        for (id, row) in &views[i] {
            assert_eq!(
                server_row(id).as_ref(),
                Some(row),
                "client {i} row {id} equals the server's"
            );
        }
        // Every insert this client made is on the server, edited once
        // except the last.
        let mine: Vec<&String> = views[i].keys().filter(|id| id.starts_with(&format!("c{i}-"))).collect();
        for id in &mine {
            assert!(server_row(id).is_some(), "acknowledged insert {id} is on the server");
        }
    }
    for (i, v) in views.iter().enumerate().skip(1) {
        assert_eq!(v, &views[0], "client {i} converged with client 0");
    }
    eprintln!("{written} transactions written across {KILLS} server kills");
}
