//! A client process killed (SIGKILL) at seeded random moments of a large
//! initial sync, restarted on the same store each time, converges to the
//! server's rows with nothing duplicated or missing, keeps what it had
//! staged across every kill (its resume position never goes back), and a
//! store it holds while killed never shows a partly applied checkpoint.
//!
//! `FERRY_CRASH_ROWS` sets the row count (default 20,000 in CI; the issue's
//! check is `FERRY_CRASH_ROWS=200000 cargo test -p ferry-client --test
//! crash_resume`, about 9 minutes in debug on this machine),
//! `FERRY_CRASH_KILLS` the number of kills (default 10) and
//! `FERRY_CRASH_SEED` the seed of the kill moments.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_client::{ClientOptions, Database, StaticToken};
use ferry_core::{CrudOp, RandomSource, RowData, SeededRandom, SystemClock, Value};
use ferry_http::HttpTransport;
use ferry_queue::LocalDbOptions;
use ferry_server::{mint_token, ServerConfig, SyncRules};
use ferry_sqlite::SqliteStore;
use ferry_store::Store;
use ferry_transport::Transport;

const SECRET: &str = "crash-secret";
const CHILD_DIR: &str = "FERRY_CRASH_CHILD_DIR";
const CHILD_URL: &str = "FERRY_CRASH_CHILD_URL";

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn ticket(i: u64) -> RowData {
    let mut d = RowData::new();
    d.insert("title".into(), Value::Text(format!("Ticket {i}")));
    d.insert(
        "description".into(),
        Value::Text(format!("Reported by user {} on floor {}.", i % 1013, i % 31)),
    );
    d.insert("status".into(), Value::Text(["open", "done"][(i % 2) as usize].into()));
    d.insert("deleted_at".into(), Value::Null);
    d.insert("created_at".into(), Value::Text("2026-11-30T10:00:00.000Z".into()));
    d.insert("updated_at".into(), Value::Text("2026-11-30T10:00:00.000Z".into()));
    d.insert("version".into(), Value::Integer(i as i64));
    d
}

fn open_store(dir: &Path) -> SqliteStore {
    let rules = SyncRules::ticket_tracker().expect("rules");
    SqliteStore::open(dir.join("client.db"), rules.client_schema()).expect("open store")
}

/// The child: sync from the server until every row is applied, then exit.
async fn child(dir: &Path, url: &str, n: u64) {
    let store = open_store(dir);
    let options = ClientOptions {
        local: LocalDbOptions {
            clock: Arc::new(SystemClock),
            ..LocalDbOptions::default()
        },
        ..ClientOptions::default()
    };
    let db = Database::open(Arc::new(store), options).expect("open database");
    let token = mint_token(SECRET, "crash-user", 3600, &serde_json::Map::new());
    let transport: Arc<dyn Transport> = Arc::new(HttpTransport::new(url).expect("transport"));
    db.connect(transport, Arc::new(StaticToken(token)));
    let done = db
        .wait_for_status(600_000, |s| {
            s.has_synced && !s.downloading && s.last_applied_op_id.is_some()
        })
        .await;
    assert!(done, "the child did not finish: {:?}", db.status());
    db.disconnect().await;
    let rows = db.local().store().scan_synced("tickets").expect("scan").len() as u64;
    assert_eq!(rows, n, "the child holds every row");
}

/// How far the store at `dir` got: (rows applied, ops staged beyond them).
fn progress(dir: &Path) -> (u64, u64) {
    let store = open_store(dir);
    let applied = store.scan_synced("tickets").expect("scan").len() as u64;
    let mut staged = 0;
    for bucket in store.staged_buckets().expect("staged buckets") {
        let after = store.bucket_state(&bucket).expect("state").map_or(0, |s| s.last_op_id);
        staged += ferry_store::staged_summary(&store, &bucket, after)
            .expect("summary")
            .count;
    }
    (applied, staged)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_killed_during_initial_sync_resumes_without_losing_or_duplicating() {
    let n = env_u64("FERRY_CRASH_ROWS", 20_000);
    if let (Ok(dir), Ok(url)) = (std::env::var(CHILD_DIR), std::env::var(CHILD_URL)) {
        child(Path::new(&dir), &url, n).await;
        return;
    }
    let kills = env_u64("FERRY_CRASH_KILLS", 10);
    let seed = env_u64("FERRY_CRASH_SEED", 0xc4a5);
    let tmp = tempfile::tempdir().expect("tempdir");
    let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = ferry_server::run(
        ServerConfig {
            data_dir: tmp.path().join("server"),
            listen_addr: "127.0.0.1:0".parse().expect("addr"),
            jwt_secret: Some(SECRET.into()),
            ..ServerConfig::default()
        },
        async move {
            let _ = stop_rx.await;
        },
    )
    .await
    .expect("server");
    let mut next = 1;
    while next <= n {
        let end = (next + 20_000 - 1).min(n);
        let ops = (next..=end)
            .map(|i| CrudOp::Put {
                table: "tickets".into(),
                id: format!("t{i:08}"),
                data: ticket(i),
            })
            .collect();
        server.service.import(ops).await.expect("import");
        next = end + 1;
    }
    let url = format!("http://{}", server.addr);
    let dir = tmp.path().join("client");
    std::fs::create_dir_all(&dir).expect("client dir");
    let exe = std::env::current_exe().expect("test binary");
    let spawn = || {
        Command::new(&exe)
            .args([
                "--exact",
                "a_client_killed_during_initial_sync_resumes_without_losing_or_duplicating",
                "--nocapture",
            ])
            .env(CHILD_DIR, &dir)
            .env(CHILD_URL, &url)
            .env("FERRY_CRASH_ROWS", n.to_string())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn the child")
    };

    // Each run is killed 0.2 to 1.7 s after it starts (a whole sync takes
    // longer, so every kill falls in the middle of one).
    let mut rng = SeededRandom::new(seed);
    let mut last = (0u64, 0u64);
    let mut kills_done = 0;
    for round in 0..kills {
        let mut c = spawn();
        let wait_ms = 200 + rng.next_u64() % 1_500;
        let started = Instant::now();
        let mut finished = false;
        while started.elapsed() < Duration::from_millis(wait_ms) {
            if c.try_wait().expect("wait").is_some() {
                finished = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if finished {
            let status = c.wait().expect("wait");
            assert!(status.success(), "round {round}: the child failed: {status}");
            break;
        }
        c.kill().expect("SIGKILL the child");
        c.wait().expect("reap");
        kills_done += 1;
        let now = progress(&dir);
        // Whatever was applied stays applied, and what was staged stays
        // staged until applied: the resume position never goes back.
        assert!(
            now.0 + now.1 >= last.0 + last.1 || now.0 > last.0,
            "round {round}: progress went back from {last:?} to {now:?}"
        );
        // A checkpoint applies whole: no rows, or all of them.
        assert!(now.0 == 0 || now.0 == n, "round {round}: {} of {n} rows applied", now.0);
        last = now;
    }
    // The last run, uninterrupted.
    let status = spawn().wait().expect("wait");
    assert!(status.success(), "the last run failed: {status}");
    let store = open_store(&dir);
    let rows = store.scan_synced("tickets").expect("scan");
    assert_eq!(rows.len() as u64, n, "every row, once ({kills_done} kills)");
    for (id, data) in rows.iter().step_by(997) {
        let i: u64 = id.trim_start_matches('t').parse().expect("id");
        assert_eq!(data, &ticket(i), "row {id} as the server holds it");
    }
    assert!(
        store.staged_buckets().expect("staged").is_empty(),
        "nothing left staged"
    );
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), server.wait()).await;
}
