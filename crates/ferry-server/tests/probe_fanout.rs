//! Adversarial probes of the shared change feed (fan-out): streams that
//! follow one bucket of many, commits over the feed's carrying limits
//! (entries per bucket, buckets per event) mixed with small ones, rows
//! moving between buckets, deletes, streams that stop reading long enough
//! to fall behind, and write checkpoints of a streaming client's own
//! uploads. Every stream must end equal to what a fresh stream reads from
//! the database, with checksums that hold, and see each of its own
//! acknowledged writes' seqs as a write checkpoint within about a second.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::notes::{put_note, token_with, RULES};
use common::{entry, put, upload_req, TestClient, SECRET};
use ferry_core::{CrudEntry, CrudOp, RandomSource, RowData, SeededRandom, Value};
use ferry_protocol::StreamLine;
use ferry_server::{
    ServiceOptions, SourceDb, SqliteSourceDb, SyncRules, SyncService, FEED_CHANNEL_EVENTS,
    FEED_MAX_BUCKETS_WITH_ENTRIES, FEED_MAX_ENTRIES_PER_BUCKET,
};
use ferry_transport::SyncHandler;
use tokio::sync::watch;

fn service_on(db: Arc<dyn SourceDb>) -> SyncService {
    SyncService::builder(db, SyncRules::from_toml(RULES).expect("rules"), SECRET)
        // Keepalives (and the database reads after them) out of the way:
        // what a stream gets here it gets through the feed.
        .options(ServiceOptions {
            keepalive_interval_s: 60,
            max_ops_per_line: 300,
            ..ServiceOptions::default()
        })
        .build()
        .expect("service")
}

/// What a reader task has applied so far.
#[derive(Clone, Debug, Default)]
struct Seen {
    last_op_id: u64,
    write_checkpoint: Option<u64>,
    rows: BTreeMap<(String, String), RowData>,
    failed: Option<String>,
}

/// A stream read by a task into a [`TestClient`]; while `paused` is set
/// it reads nothing (the server's buffers fill, the feed runs ahead).
struct Reader {
    seen: watch::Receiver<Seen>,
    paused: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

async fn reader(svc: &SyncService, user: &str, client_id: &str, teams: &[String]) -> Reader {
    let mut c = TestClient::new(client_id);
    let mut rx = svc
        .stream(&token_with(user, teams), c.dl.request(client_id))
        .await
        .expect("stream opens");
    let (tx, seen) = watch::channel(Seen::default());
    let paused = Arc::new(AtomicBool::new(false));
    let p = paused.clone();
    let task = tokio::spawn(async move {
        loop {
            while p.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let Some(line) = rx.recv().await else {
                tx.send_modify(|s| s.failed = Some("stream ended".into()));
                return;
            };
            if std::env::var("PROBE_DEBUG").is_ok() {
                eprintln!("{:?} line: {line:?}", std::time::SystemTime::now());
            }
            if let StreamLine::Error(e) = &line {
                let msg = format!("stream error line: {e:?}");
                tx.send_modify(|s| s.failed = Some(msg));
                return;
            }
            let complete = match &line {
                StreamLine::CheckpointComplete { last_op_id } => Some(*last_op_id),
                _ => None,
            };
            let applied = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| c.feed(line)));
            match applied {
                Ok(true) => {
                    let snapshot = Seen {
                        last_op_id: complete.unwrap_or_default(),
                        write_checkpoint: c.write_checkpoint,
                        rows: c.rows(),
                        failed: None,
                    };
                    tx.send_replace(snapshot);
                }
                Ok(false) => {}
                Err(e) => {
                    let msg = e
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| e.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                        .unwrap_or_else(|| "panic".into());
                    tx.send_modify(|s| s.failed = Some(msg));
                    return;
                }
            }
        }
    });
    Reader { seen, paused, task }
}

/// Wait until `r` applied a checkpoint for which `done` holds.
async fn wait_until(r: &mut Reader, within: Duration, what: &str, done: impl Fn(&Seen) -> bool) -> Seen {
    let deadline = Instant::now() + within;
    loop {
        {
            let s = r.seen.borrow_and_update().clone();
            if let Some(f) = &s.failed {
                panic!("{what}: {f}");
            }
            if done(&s) {
                return s;
            }
            if Instant::now() >= deadline {
                panic!(
                    "{what}: not there within {within:?}; at op {} with write checkpoint {:?} and {} rows",
                    s.last_op_id,
                    s.write_checkpoint,
                    s.rows.len()
                );
            }
        }
        let _ = tokio::time::timeout(Duration::from_millis(50), r.seen.changed()).await;
    }
}

/// Wait until `r` applied a checkpoint at or past `op_id` (and, when
/// given, with a write checkpoint at or past `wc`).
async fn wait_for(r: &mut Reader, op_id: u64, wc: Option<u64>, within: Duration, what: &str) -> Seen {
    wait_until(r, within, what, |s| {
        s.last_op_id >= op_id && wc.is_none_or(|w| s.write_checkpoint.is_some_and(|x| x >= w))
    })
    .await
}

/// The rows a fresh stream of `user` reads (from the database).
async fn fresh_rows(svc: &SyncService, user: &str, teams: &[String]) -> BTreeMap<(String, String), RowData> {
    let mut c = TestClient::new(&format!("fresh-{user}"));
    c.sync(svc, &token_with(user, teams)).await;
    c.rows()
}

async fn upload(svc: &SyncService, user: &str, client: &str, seq: u64, op: CrudOp) -> ferry_protocol::UploadResponse {
    SyncHandler::upload(
        svc,
        &token_with(user, &[]),
        upload_req(client, vec![entry(seq, op, 1_000 + seq, client)]),
    )
    .await
    .expect("upload answered")
}

async fn upload_tx(svc: &SyncService, user: &str, client: &str, first_seq: u64, ops: Vec<CrudOp>) -> u64 {
    let n = ops.len() as u64;
    let entries: Vec<CrudEntry> = ops
        .into_iter()
        .enumerate()
        .map(|(i, op)| {
            let seq = first_seq + i as u64;
            CrudEntry {
                tx_id: first_seq,
                ..entry(seq, op, 1_000 + seq, client)
            }
        })
        .collect();
    let answer = SyncHandler::upload(svc, &token_with(user, &[]), upload_req(client, entries))
        .await
        .expect("upload answered");
    assert_eq!(answer.outcomes.len() as u64, n);
    first_seq + n
}

fn seed_from_env(default: u64) -> u64 {
    std::env::var("PROBE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// Random commits of every size (one row; a transaction of more entries
/// of one bucket than an event carries; an import touching more followed
/// buckets than an event carries entries of), rows moving between owners
/// and teams, deletes, while some streams stop reading for hundreds of
/// commits: every stream ends with exactly the rows a fresh stream reads
/// from the database (checksums checked on every checkpoint).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_commits_of_every_size_reach_every_stream_exactly() {
    let seed = seed_from_env(1);
    eprintln!("probe seed {seed} (PROBE_SEED={seed} to replay)");
    random_fanout(seed).await;
}

/// A PUT of one of 40 notes, to a random owner and team.
fn random_note(rng: &mut SeededRandom, owners: &[&str], teams: &[&str], body: &str) -> CrudOp {
    let owner = owners[(rng.next_u64() % owners.len() as u64) as usize];
    let team = teams[(rng.next_u64() % teams.len() as u64) as usize];
    let id = format!("n{}", rng.next_u64() % 40);
    put_note(&id, owner, team, body)
}

async fn random_fanout(seed: u64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let svc = service_on(Arc::new(SqliteSourceDb::open_dir(dir.path()).expect("db")));
    let mut rng = SeededRandom::new(seed);
    let wide_teams: Vec<String> = (0..FEED_MAX_BUCKETS_WITH_ENTRIES + 20)
        .map(|i| format!("w{i}"))
        .collect();
    // (user, teams): a user of one owner bucket only, users of owner and
    // team buckets, a user of more team buckets than an event carries.
    let users: Vec<(String, Vec<String>)> = vec![
        ("u0".into(), vec![]),
        ("u1".into(), vec!["t0".into()]),
        ("u2".into(), vec!["t0".into(), "t1".into()]),
        ("u3".into(), vec!["t2".into()]),
        ("u4".into(), wide_teams.clone()),
    ];
    let mut readers = Vec::new();
    for (i, (u, teams)) in users.iter().enumerate() {
        readers.push(reader(&svc, u, &format!("reader-{seed}-{i}"), teams).await);
        // A second stream of the same user and client id.
        if i == 1 {
            readers.push(reader(&svc, u, &format!("reader-{seed}-{i}"), teams).await);
        }
    }
    let owners = ["u0", "u1", "u2", "u3", "u4", "nobody"];
    let teams = ["t0", "t1", "t2", "t3"];
    let mut seq = 1u64;
    let writer = format!("writer-{seed}");
    let mut step = 0;
    while step < 25 {
        step += 1;
        match rng.next_u64() % 10 {
            // A transaction of more entries of one bucket than an event
            // carries, then small commits right after.
            0 => {
                let owner = owners[(rng.next_u64() % 5) as usize];
                let n = FEED_MAX_ENTRIES_PER_BUCKET + 1 + (rng.next_u64() % 50) as usize;
                let ops = (0..n)
                    .map(|k| put_note(&format!("big{}-{k}", step % 3), owner, "t0", &format!("s{step}")))
                    .collect();
                seq = upload_tx(&svc, "writer", &writer, seq, ops).await;
            }
            // An import touching more followed buckets than an event
            // carries the entries of.
            1 => {
                let ops = wide_teams
                    .iter()
                    .map(|t| put_note(&format!("wide-{t}"), "nobody", t, &format!("s{step}")))
                    .collect();
                svc.import(ops).await.expect("import");
            }
            // A reader stops reading for a while (more events than the
            // feed keeps for it pass).
            2 => {
                let r = (rng.next_u64() % readers.len() as u64) as usize;
                readers[r].paused.store(true, Ordering::Relaxed);
                for k in 0..(FEED_CHANNEL_EVENTS as u64 + 30) {
                    let op = random_note(&mut rng, &owners, &teams, &format!("p{k}"));
                    upload(&svc, "writer", &writer, seq, op).await;
                    seq += 1;
                }
                readers[r].paused.store(false, Ordering::Relaxed);
            }
            // Deletes.
            3 => {
                for _ in 0..5 {
                    let id = format!("n{}", rng.next_u64() % 40);
                    upload(&svc, "writer", &writer, seq, common::delete("notes", &id)).await;
                    seq += 1;
                }
            }
            // Small commits: rows moving between owners and teams.
            _ => {
                for _ in 0..(1 + rng.next_u64() % 20) {
                    let op = random_note(&mut rng, &owners, &teams, &format!("v{seq}"));
                    upload(&svc, "writer", &writer, seq, op).await;
                    seq += 1;
                }
            }
        }
    }
    let mut i = 0;
    for (u, teams) in &users {
        let expected = fresh_rows(&svc, u, teams).await;
        let copies = if i == 1 { 2 } else { 1 };
        for _ in 0..copies {
            let what = format!("seed {seed}: reader {i} ({u})");
            // A stream none of whose buckets changed hears nothing: it is
            // done when it holds what the database holds.
            let seen = wait_until(&mut readers[i], Duration::from_secs(5), &what, |s| s.rows == expected).await;
            assert_eq!(seen.rows, expected, "{what}: rows");
            i += 1;
        }
    }
    for r in readers {
        r.task.abort();
    }
}

/// A streaming client's own uploads through this server, each seen as a
/// write checkpoint on its stream within about a second: applied writes
/// that add op log entries, and ones that add none (a delete of a row
/// that is not there, a write of a row no stream follows).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_own_upload_shows_as_a_write_checkpoint_within_a_second() {
    let dir = tempfile::tempdir().expect("tempdir");
    let svc = service_on(Arc::new(SqliteSourceDb::open_dir(dir.path()).expect("db")));
    let mut r = reader(&svc, "me", "me-client", &[]).await;
    wait_for(&mut r, 0, None, Duration::from_secs(5), "first checkpoint").await;
    for seq in 1..=12u64 {
        let op = match seq % 3 {
            0 => put_note(&format!("m{seq}"), "me", "t0", "mine"),
            1 => common::delete("notes", &format!("absent-{seq}")),
            _ => put_note(&format!("o{seq}"), "someone-else", "t9", "not mine"),
        };
        let answer = upload(&svc, "me", "me-client", seq, op).await;
        assert!(
            matches!(answer.outcomes[0].outcome, ferry_protocol::Outcome::Applied),
            "{answer:?}"
        );
        let what = format!("write checkpoint of seq {seq}");
        wait_for(&mut r, 0, Some(seq), Duration::from_millis(1_500), &what).await;
    }
    r.task.abort();
}

/// The first stream of a server, whose client's upload (one that adds no
/// op log entry) commits after the stream read its first checkpoint and
/// before the change feed's first read: the write checkpoint still
/// reaches the stream within about a second (not at its next keepalive).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_between_the_first_checkpoint_and_the_feeds_start_still_shows() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = Arc::new(common::probe::ProbeDb::open(dir.path()));
    db.hold_first_feed_read.store(true, Ordering::SeqCst);
    let svc = service_on(db.clone());
    let mut r = reader(&svc, "me", "me-client", &[]).await;
    wait_for(&mut r, 0, None, Duration::from_secs(5), "first checkpoint").await;
    // Applied, and no op log entry: the row is not there.
    let answer = upload(&svc, "me", "me-client", 1, common::delete("notes", "absent")).await;
    assert!(
        matches!(answer.outcomes[0].outcome, ferry_protocol::Outcome::Applied),
        "{answer:?}"
    );
    db.hold_first_feed_read.store(false, Ordering::SeqCst);
    wait_for(
        &mut r,
        0,
        Some(1),
        Duration::from_millis(2_500),
        "write checkpoint of seq 1",
    )
    .await;
    r.task.abort();
}

/// Two servers on one PostgreSQL database: a client streams on one and
/// uploads through the other, while a third client writes through the
/// first all along (its reads after commits look only at its own
/// uploaders): every upload's write checkpoint, with or without an op log
/// entry, reaches the stream within about a second and a half, with the
/// rows the upload wrote.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_through_another_server_show_as_write_checkpoints_on_a_shared_database() {
    use ferry_postgres::scratch::ScratchSchemas;
    use ferry_postgres::PgSourceDb;
    let s = ScratchSchemas::for_test();
    s.execute(&format!(
        "CREATE TABLE \"{}\".notes (id text PRIMARY KEY, owner text, team text, body text);",
        s.app
    ))
    .expect("table");
    let server = |node: &str| {
        let db = PgSourceDb::connect(&s.options()).expect("connect");
        SyncService::builder(Arc::new(db), SyncRules::from_toml(RULES).expect("rules"), SECRET)
            .options(ServiceOptions {
                keepalive_interval_s: 60,
                ..ServiceOptions::default()
            })
            .node_id(node)
            .build()
            .expect("service")
    };
    let (a, b) = (server("server-a"), server("server-b"));
    let mut r = reader(&a, "me", "me-client", &[]).await;
    wait_for(&mut r, 0, None, Duration::from_secs(5), "first checkpoint").await;
    let stop = Arc::new(AtomicBool::new(false));
    let busy = {
        let (a, stop) = (a.clone(), stop.clone());
        tokio::spawn(async move {
            let mut seq = 1;
            while !stop.load(Ordering::Relaxed) {
                upload(
                    &a,
                    "other",
                    "other-client",
                    seq,
                    put_note("busy", "other", "t5", &format!("{seq}")),
                )
                .await;
                seq += 1;
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
        })
    };
    for seq in 1..=6u64 {
        let (op, row) = match seq % 2 {
            0 => (
                put_note(&format!("m{seq}"), "me", "t0", "mine"),
                Some(format!("m{seq}")),
            ),
            _ => (common::delete("notes", &format!("absent-{seq}")), None),
        };
        let answer = upload(&b, "me", "me-client", seq, op).await;
        assert!(
            matches!(answer.outcomes[0].outcome, ferry_protocol::Outcome::Applied),
            "{answer:?}"
        );
        let what = format!("write checkpoint of seq {seq} (uploaded through the other server)");
        let seen = wait_for(&mut r, 0, Some(seq), Duration::from_millis(1_500), &what).await;
        if let Some(id) = row {
            assert!(
                seen.rows.contains_key(&("notes".to_owned(), id.clone())),
                "{what}: row {id} missing"
            );
        }
    }
    stop.store(true, Ordering::Relaxed);
    busy.await.expect("busy writer");
    r.task.abort();
}

fn ticket(id: &str, title: &str) -> CrudOp {
    put("tickets", id, &[("title", Value::from(title))])
}

/// A stream over HTTP whose client stops reading while hundreds of small
/// commits and one commit of more entries than the feed carries go by
/// (the socket, the body's chunk, the stream's channel and the feed's
/// channel all fill), then reads again: it ends with exactly the rows a
/// fresh stream reads, checksums holding throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_stream_that_stops_reading_then_resumes_gets_everything() {
    let server = common::HttpServer::start(
        SECRET,
        ferry_http::HttpServerOptions::default(),
        ServiceOptions {
            stream_buffer_lines: 2,
            max_line_bytes: 64 * 1024,
            max_stream_buffer_bytes: 128 * 1024,
            max_ops_per_line: 50,
            ..ServiceOptions::default()
        },
    )
    .await;
    let svc = server.server.service.clone();
    let token = common::token("slow");
    let http = reqwest::Client::new();
    let mut c = TestClient::new("slow-client");
    let mut resp = http
        .post(format!("http://{}/sync/stream", server.addr()))
        .bearer_auth(&token)
        .header("content-type", "application/json")
        .body(serde_json::to_vec(&c.dl.request("slow-client")).expect("request"))
        .send()
        .await
        .expect("stream");
    assert_eq!(resp.status(), 200);
    let mut buf: Vec<u8> = Vec::new();
    // Read lines until the first checkpoint is applied.
    async fn pump(resp: &mut reqwest::Response, buf: &mut Vec<u8>, c: &mut TestClient) -> bool {
        let chunk = tokio::time::timeout(Duration::from_secs(10), resp.chunk())
            .await
            .expect("bytes within 10 s")
            .expect("read")
            .expect("stream open");
        buf.extend_from_slice(&chunk);
        let mut applied = false;
        while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=nl).collect();
            let line = ferry_protocol::decode_line(&line, usize::MAX).expect("line decodes");
            applied |= c.feed(line);
        }
        applied
    }
    while !pump(&mut resp, &mut buf, &mut c).await {}
    // Not reading now.
    let mut seq = 1;
    for i in 0..(FEED_CHANNEL_EVENTS + 60) {
        let big = "x".repeat(if i % 50 == 0 { 20_000 } else { 10 });
        upload(&svc, "w", "w-client", seq, ticket(&format!("t{}", i % 70), &big)).await;
        seq += 1;
        if i == 100 {
            let ops = (0..FEED_MAX_ENTRIES_PER_BUCKET + 200)
                .map(|k| ticket(&format!("bulk{k}"), "bulk"))
                .collect();
            seq = upload_tx(&svc, "w", "w-client", seq, ops).await;
        }
    }
    let mut fresh = TestClient::new("fresh-client");
    fresh.sync(&svc, &common::token("fresh")).await;
    let expected = fresh.rows();
    let deadline = Instant::now() + Duration::from_secs(8);
    while c.rows() != expected {
        assert!(Instant::now() < deadline, "the resumed stream never caught up");
        pump(&mut resp, &mut buf, &mut c).await;
    }
    server.server.shutdown().await.expect("shutdown");
}

/// Streams whose clients never read, while commits keep coming, then
/// disconnect: their slots come free (a user limited to one stream opens
/// one again) and the server's open-stream count goes back to zero.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_never_read_then_dropped_free_their_slots() {
    let server = common::HttpServer::start(
        SECRET,
        ferry_http::HttpServerOptions {
            max_streams_per_user: 1,
            ..ferry_http::HttpServerOptions::default()
        },
        ServiceOptions::default(),
    )
    .await;
    let addr = server.addr();
    let svc = server.server.service.clone();
    let mut stalled = Vec::new();
    for i in 0..8 {
        let user = format!("u{i}");
        stalled.push(common::stalled_stream(addr, &common::token(&user), &format!("{user}-c")).await);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        common::stream_status(addr, &common::token("u0"), "u0-c").await,
        429,
        "u0's slot is taken"
    );
    // Commits of rows large enough to fill the unread sockets.
    for seq in 1..=60u64 {
        let title = "y".repeat(60_000);
        upload(&svc, "w", "w-client", seq, ticket(&format!("big{seq}"), &title)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(stalled);
    let deadline = Instant::now() + Duration::from_secs(5);
    for i in 0..8 {
        loop {
            let user = format!("u{i}");
            let s = common::stream_status(addr, &common::token(&user), &format!("{user}-c")).await;
            if s == 200 {
                break;
            }
            assert_eq!(s, 429);
            assert!(Instant::now() < deadline, "u{i}'s dropped stream still holds its slot");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    server.server.shutdown().await.expect("shutdown");
}

fn open_streams(svc: &SyncService) -> i64 {
    let text = svc.metrics().render(0, 0, 0).expect("metrics");
    text.lines()
        .find_map(|l| l.strip_prefix("ferry_open_streams "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as i64)
        .expect("ferry_open_streams in the metrics")
}

/// Streams opened one after another during a burst of commits of every
/// size (their first checkpoint read races with the feed's events), some
/// dropped at once: each kept one ends with exactly the rows a fresh
/// stream reads, and once all are dropped no stream stays open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_opened_during_a_burst_of_commits_converge_and_are_freed() {
    let seed = seed_from_env(7);
    eprintln!("probe seed {seed} (PROBE_SEED={seed} to replay)");
    let dir = tempfile::tempdir().expect("tempdir");
    let svc = service_on(Arc::new(SqliteSourceDb::open_dir(dir.path()).expect("db")));
    let stop = Arc::new(AtomicBool::new(false));
    let burst = {
        let (svc, stop) = (svc.clone(), stop.clone());
        tokio::spawn(async move {
            let mut rng = SeededRandom::new(seed);
            let mut seq = 1;
            let mut round = 0u64;
            while !stop.load(Ordering::Relaxed) {
                round += 1;
                let owner = ["u0", "u1", "u2"][(rng.next_u64() % 3) as usize];
                let team = ["t0", "t1"][(rng.next_u64() % 2) as usize];
                if round.is_multiple_of(25) {
                    let ops = (0..FEED_MAX_ENTRIES_PER_BUCKET + 10)
                        .map(|k| put_note(&format!("b{k}"), owner, team, &format!("r{round}")))
                        .collect();
                    seq = upload_tx(&svc, "w", "w-client", seq, ops).await;
                } else if round.is_multiple_of(7) {
                    let id = format!("n{}", rng.next_u64() % 30);
                    upload(&svc, "w", "w-client", seq, common::delete("notes", &id)).await;
                    seq += 1;
                } else {
                    let id = format!("n{}", rng.next_u64() % 30);
                    upload(
                        &svc,
                        "w",
                        "w-client",
                        seq,
                        put_note(&id, owner, team, &format!("r{round}")),
                    )
                    .await;
                    seq += 1;
                }
            }
        })
    };
    let users: [(&str, Vec<String>); 3] = [
        ("u0", vec![]),
        ("u1", vec!["t0".into()]),
        ("u2", vec!["t1".into(), "t0".into()]),
    ];
    let mut kept = Vec::new();
    for i in 0..24usize {
        let (u, teams) = &users[i % 3];
        let r = reader(&svc, u, &format!("c{i}"), teams).await;
        if i % 2 == 0 {
            kept.push((i % 3, r));
        } else {
            r.task.abort();
        }
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    stop.store(true, Ordering::Relaxed);
    burst.await.expect("burst");
    for (u, mut r) in kept {
        let (user, teams) = &users[u];
        let expected = fresh_rows(&svc, user, teams).await;
        let what = format!("seed {seed}: a stream of {user} opened during the burst");
        wait_until(&mut r, Duration::from_secs(5), &what, |s| s.rows == expected).await;
        r.task.abort();
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    while open_streams(&svc) != 0 {
        assert!(
            Instant::now() < deadline,
            "{} streams still open after every client left",
            open_streams(&svc)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
