//! Several `ferry-server` processes on one PostgreSQL: three real server
//! binaries share a database; devices over HTTP connect to random
//! instances and switch between them while the app's backend writes in
//! plain SQL; one instance is killed with SIGKILL mid-run and restarted.
//! At the end every device equals the database for its buckets, every
//! acknowledged write is there exactly once, and every write has one
//! outcome. The run's seed is printed (and `FERRY_TEST_SEED` replays its
//! schedule of switches and writes).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use ferry_client::{ClientOptions, Database, StaticToken};
use ferry_core::{row_data, SystemClock, Value};
use ferry_http::HttpTransport;
use ferry_postgres::scratch::ScratchSchemas;
use ferry_protocol::Outcome;
use ferry_queue::LocalDbOptions;
use ferry_sqlite::SqliteStore;

const SECRET: &str = "multi-instance-secret";
const INSTANCES: usize = 3;
const DEVICES: usize = 4;
const ROUNDS: usize = 18;
const WAIT_MS: u64 = 60_000;

/// A small deterministic generator (the schedule replays from the seed).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// One server process on a fixed port (so a restart comes back where
/// devices expect it); killed on drop.
struct Instance {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("local addr").port()
}

impl Instance {
    fn spawn(s: &ScratchSchemas, port: u16, dir: &Path, n: usize) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(format!("server-{n}.log")))
            .expect("server log");
        Command::new(env!("CARGO_BIN_EXE_ferry-server"))
            .arg("serve")
            .args(["--listen", &format!("127.0.0.1:{port}"), "--jwt-secret", SECRET])
            .args([
                "--database",
                &s.url,
                "--database-schema",
                &s.ferry,
                "--app-schema",
                &s.app,
            ])
            .arg("--create-tables")
            .arg("--data-dir")
            .arg(dir.join(format!("unused-{n}")))
            .env_remove("FERRY_CONFIG")
            .env_remove("FERRY_DATABASE_URL")
            .env_remove("FERRY_JWT_SECRET")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn ferry-server")
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    async fn wait_healthy(&mut self, n: usize) {
        let client = reqwest::Client::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!("instance {n} exited with {status}; log:\n{}", self.log(n));
            }
            if let Ok(r) = client.get(format!("{}/health", self.url())).send().await {
                if r.status().is_success() {
                    return;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "instance {n} never healthy; log:\n{}",
                self.log(n)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log(&self, n: usize) -> String {
        std::fs::read_to_string(self.dir.join(format!("server-{n}.log"))).unwrap_or_default()
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SIGKILL: no shutdown of any kind.
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `n` instances on one database, each on a free port, all healthy.
async fn start_instances(s: &ScratchSchemas, dir: &Path, n: usize) -> Vec<Instance> {
    let mut instances: Vec<Instance> = (0..n)
        .map(|k| {
            let port = free_port();
            Instance {
                child: Some(Instance::spawn(s, port, dir, k)),
                port,
                dir: dir.to_path_buf(),
            }
        })
        .collect();
    for (k, i) in instances.iter_mut().enumerate() {
        i.wait_healthy(k).await;
    }
    instances
}

fn token(user: &str) -> String {
    ferry_server::mint_token(SECRET, user, 3600, &serde_json::Map::new())
}

fn open_device(dir: &Path, n: usize) -> Database {
    let schema = ferry_server::SyncRules::ticket_tracker()
        .expect("rules")
        .client_schema();
    let store = SqliteStore::open(dir.join(format!("device-{n}.db")), schema).expect("device store");
    let options = ClientOptions {
        local: LocalDbOptions {
            clock: Arc::new(SystemClock),
            ..LocalDbOptions::default()
        },
        retry_initial_delay_ms: 20,
        retry_max_delay_ms: 300,
        jitter_seed: n as u64,
        upload_poll_interval_ms: 50,
        ..ClientOptions::default()
    };
    Database::open(Arc::new(store), options).expect("open device")
}

fn connect(db: &Database, url: &str, user: &str) {
    let transport = HttpTransport::new(url.to_owned()).expect("transport");
    db.connect(Arc::new(transport), Arc::new(StaticToken(token(user))));
}

/// The database's tickets: id → (title, version).
fn source_tickets(s: &ScratchSchemas) -> BTreeMap<String, (Option<String>, Option<String>)> {
    s.query(&format!("SELECT id, title, version::text FROM \"{}\".tickets", s.app))
        .expect("select tickets")
        .into_iter()
        .map(|r| (r[0].clone().unwrap_or_default(), (r[1].clone(), r[2].clone())))
        .collect()
}

fn device_tickets(db: &Database) -> BTreeMap<String, (Option<String>, Option<String>)> {
    db.local()
        .scan("tickets")
        .expect("scan tickets")
        .into_iter()
        .map(|(id, row)| {
            let text = |v: Option<&Value>| match v {
                Some(Value::Text(t)) => Some(t.clone()),
                Some(Value::Integer(i)) => Some(i.to_string()),
                _ => None,
            };
            (id, (text(row.get("title")), text(row.get("version"))))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_one_database_devices_switching_backend_writing_one_killed() {
    let seed: u64 = std::env::var("FERRY_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
                | 1
        });
    eprintln!("multi_instance seed {seed} (replay with FERRY_TEST_SEED={seed})");
    let mut rng = Rng(seed);
    let s = ScratchSchemas::for_test();
    let dir = tempfile::tempdir().expect("tempdir");

    let mut instances = start_instances(&s, dir.path(), INSTANCES).await;

    let devices: Vec<Database> = (0..DEVICES).map(|n| open_device(dir.path(), n)).collect();
    let users: Vec<String> = (0..DEVICES).map(|n| format!("user-{n}")).collect();
    let mut at: Vec<usize> = (0..DEVICES).map(|_| rng.below(INSTANCES)).collect();
    for (d, db) in devices.iter().enumerate() {
        connect(db, &instances[at[d]].url(), &users[d]);
    }

    // Every write a device made: (device, seq) → the ticket it wrote.
    let mut written: BTreeMap<(usize, u64), String> = BTreeMap::new();
    let mut backend_ids: BTreeSet<String> = BTreeSet::new();
    let killed = rng.below(INSTANCES);
    for round in 0..ROUNDS {
        for (d, db) in devices.iter().enumerate() {
            let id = format!("d{d}-r{round}");
            let version = round as i64;
            let (_, receipt) = db
                .write_with_receipt(|tx| {
                    tx.insert(
                        "tickets",
                        &id,
                        row_data([
                            ("title", Value::from(id.as_str())),
                            ("version", Value::Integer(version)),
                        ]),
                    )?;
                    // Everyone edits one shared ticket: last write wins.
                    tx.put(
                        "tickets",
                        "shared",
                        row_data([
                            ("title", Value::from(format!("by {d} in {round}"))),
                            ("version", Value::Integer(version)),
                        ]),
                    )
                })
                .expect("device write");
            let receipt = receipt.expect("the write was queued");
            // The insert, then the shared ticket's write.
            written.insert((d, receipt.first_seq), id.clone());
            written.insert((d, receipt.last_seq), "shared".to_owned());
            // Now and then a device moves to another instance.
            if rng.below(3) == 0 {
                db.disconnect().await;
                at[d] = rng.below(INSTANCES);
                connect(db, &instances[at[d]].url(), &users[d]);
            }
        }
        // The backend writes in plain SQL.
        let bid = format!("sql-{round}");
        s.execute(&format!(
            "INSERT INTO \"{}\".tickets(id, title, version) VALUES ('{bid}', 'from the backend', {round})",
            s.app
        ))
        .expect("backend insert");
        backend_ids.insert(bid);
        if round == ROUNDS / 3 {
            // At least one device is on it when it dies, mid-stream.
            devices[0].disconnect().await;
            at[0] = killed;
            connect(&devices[0], &instances[killed].url(), &users[0]);
            tokio::time::sleep(Duration::from_millis(100)).await;
            instances[killed].kill();
        }
        if round == 2 * ROUNDS / 3 {
            let port = instances[killed].port;
            instances[killed].child = Some(Instance::spawn(&s, port, dir.path(), killed));
            instances[killed].wait_healthy(killed).await;
        }
        tokio::time::sleep(Duration::from_millis(50 + rng.below(100) as u64)).await;
    }

    // Quiescence: every device settled with nothing pending.
    for (d, db) in devices.iter().enumerate() {
        assert!(
            db.wait_until_settled(WAIT_MS).await,
            "seed {seed}: device {d} did not settle: {:?}",
            db.status()
        );
    }
    // The capture leader may still be applying the backend's last writes;
    // devices converge on the database once it has.
    let deadline = tokio::time::Instant::now() + Duration::from_millis(WAIT_MS);
    let expected = loop {
        let source = source_tickets(&s);
        let all_equal = devices.iter().all(|db| device_tickets(db) == source);
        if all_equal {
            break source;
        }
        if tokio::time::Instant::now() > deadline {
            for (d, db) in devices.iter().enumerate() {
                let mine = device_tickets(db);
                let missing: Vec<_> = source.keys().filter(|k| !mine.contains_key(*k)).collect();
                let extra: Vec<_> = mine.keys().filter(|k| !source.contains_key(*k)).collect();
                let differ: Vec<_> = source
                    .iter()
                    .filter(|(k, v)| mine.get(*k).is_some_and(|m| m != *v))
                    .map(|(k, _)| k)
                    .collect();
                eprintln!("device {d}: missing {missing:?}, extra {extra:?}, different {differ:?}");
            }
            panic!("seed {seed}: devices did not converge on the database");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    // Every acknowledged write is there: each device's tickets, and the
    // backend's.
    for id in written.values().chain(backend_ids.iter()) {
        assert!(expected.contains_key(id), "seed {seed}: {id} lost");
    }
    // ... exactly once: one PUT of each device-written ticket in the op
    // log (a second apply through another instance would append another).
    let dup = s
        .query(&format!(
            "SELECT row_id, count(*)::text FROM \"{}\".oplog WHERE op = 'PUT' AND tbl = 'tickets' \
             AND row_id LIKE 'd%' GROUP BY row_id HAVING count(*) > 1",
            s.ferry
        ))
        .expect("op log");
    assert!(dup.is_empty(), "seed {seed}: applied more than once: {dup:?}");
    // Every write got exactly one outcome, on the device and on the server.
    for (d, db) in devices.iter().enumerate() {
        let outcomes = db.outcomes_since(0, 10_000).expect("outcomes");
        let seqs: Vec<u64> = outcomes.iter().map(|o| o.outcome.seq).collect();
        let unique: BTreeSet<u64> = seqs.iter().copied().collect();
        assert_eq!(seqs.len(), unique.len(), "seed {seed}: device {d} has an outcome twice");
        let mine: BTreeSet<u64> = written.keys().filter(|(w, _)| *w == d).map(|(_, s)| *s).collect();
        assert_eq!(unique, mine, "seed {seed}: device {d}: an outcome for every write");
        for o in &outcomes {
            let ticket = &written[&(d, o.outcome.seq)];
            match &o.outcome.outcome {
                Outcome::Applied => {}
                // A newer write of the shared ticket from another device
                // keeps its columns: merged, never refused.
                Outcome::Merged { .. } if ticket == "shared" => {}
                other => panic!("seed {seed}: device {d}: {ticket}: {other:?}"),
            }
        }
        // The server keeps outcomes the device may still ask for (those
        // of its last upload; older ones are pruned): each one a write of
        // this device.
        let stored: BTreeSet<u64> = s
            .query(&format!(
                "SELECT seq::text FROM \"{}\".outcomes WHERE client_id = '{}'",
                s.ferry,
                db.client_id()
            ))
            .expect("stored outcomes")
            .into_iter()
            .filter_map(|r| r[0].as_deref().and_then(|v| v.parse().ok()))
            .collect();
        assert!(
            !stored.is_empty() && stored.is_subset(&mine),
            "seed {seed}: device {d}: stored {stored:?}"
        );
        assert!(
            stored.contains(&mine.last().copied().unwrap_or(0)),
            "the last write's outcome is kept"
        );
    }
    for db in devices {
        db.close().await.expect("close");
    }
}

/// Wait until every device holds exactly the database's tickets.
async fn converge(
    devices: &[Database],
    s: &ScratchSchemas,
    what: &str,
) -> BTreeMap<String, (Option<String>, Option<String>)> {
    let deadline = tokio::time::Instant::now() + Duration::from_millis(WAIT_MS);
    loop {
        let source = source_tickets(s);
        if devices.iter().all(|db| device_tickets(db) == source) {
            return source;
        }
        if tokio::time::Instant::now() > deadline {
            for (d, db) in devices.iter().enumerate() {
                let mine = device_tickets(db);
                let missing = source.keys().filter(|k| !mine.contains_key(*k)).count();
                let extra: Vec<_> = mine.keys().filter(|k| !source.contains_key(*k)).take(10).collect();
                eprintln!("device {d}: {missing} missing, extra (first 10) {extra:?}");
            }
            panic!("{what}: devices did not converge on the database");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A `TRUNCATE` of a synced table made in plain SQL, with rows inserted
/// again in its transaction and after it, reaches devices over HTTP on
/// either of two instances through the capture job alone (more rows than
/// one capture transaction deletes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncate_in_sql_reaches_every_device() {
    const ROWS: usize = 700;
    const { assert!(ROWS > ferry_server::MAX_TRUNCATE_ROWS_PER_TX) };
    let s = ScratchSchemas::for_test();
    let dir = tempfile::tempdir().expect("tempdir");
    let instances = start_instances(&s, dir.path(), 2).await;
    let devices: Vec<Database> = (0..2).map(|n| open_device(dir.path(), n)).collect();
    for (d, db) in devices.iter().enumerate() {
        connect(db, &instances[d].url(), &format!("user-{d}"));
    }
    devices[0]
        .write(|tx| {
            tx.insert(
                "tickets",
                "from-a-device",
                row_data([("title", Value::from("device")), ("version", Value::Integer(1))]),
            )
        })
        .expect("device write");
    s.execute(&format!(
        "INSERT INTO \"{}\".tickets(id, title, version) SELECT 'sql-' || g, 'from the backend', g \
         FROM generate_series(1, {ROWS}) AS g",
        s.app
    ))
    .expect("backend rows");
    assert!(
        devices[0].wait_until_settled(WAIT_MS).await,
        "{:?}",
        devices[0].status()
    );
    let before = converge(&devices, &s, "before the truncate").await;
    assert_eq!(before.len(), ROWS + 1);

    let a = &s.app;
    s.execute(&format!(
        "BEGIN; TRUNCATE \"{a}\".tickets; \
         INSERT INTO \"{a}\".tickets(id, title, version) VALUES ('sql-1', 'again, same transaction', 1); COMMIT;"
    ))
    .expect("truncate");
    s.execute(&format!(
        "INSERT INTO \"{a}\".tickets(id, title, version) VALUES ('after', 'later transaction', 2)"
    ))
    .expect("insert after");
    let after = converge(&devices, &s, "after the truncate").await;
    let ids: Vec<&str> = after.keys().map(String::as_str).collect();
    assert_eq!(ids, vec!["after", "sql-1"]);
    assert_eq!(after["sql-1"].0.as_deref(), Some("again, same transaction"));
    for db in devices {
        db.close().await.expect("close");
    }
}
