//! Crash safety: a writer in a child process is killed with SIGKILL at
//! random moments, many times, on SQLite and on sled. After each kill the
//! store is reopened and checked: every write whose call returned is
//! present with its queue entries, nothing is half-applied, and the queue
//! order is intact. Then the next child carries on from there.
//!
//! The child is this same test binary, re-run with `FERRY_CRASH_DIR` set so
//! that `crash_child_writer` writes instead of returning at once.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use ferry_core::{row_data, RandomSource, SeededRandom, Value};
use ferry_queue::{LocalDb, QueueError};

const ENV_DIR: &str = "FERRY_CRASH_DIR";
const ENV_BACKEND: &str = "FERRY_CRASH_BACKEND";
const ENV_SEED: &str = "FERRY_CRASH_SEED";

/// The child's loop: numbered transactions, each inserting `n` rows and
/// setting the `counter` row to its number, printing `ack k n` after each
/// write returns. Runs until killed (or a safety cap).
#[test]
fn crash_child_writer() {
    let (Ok(dir), Ok(backend)) = (std::env::var(ENV_DIR), std::env::var(ENV_BACKEND)) else {
        return; // not a child: nothing to do
    };
    let seed: u64 = std::env::var(ENV_SEED).ok().and_then(|s| s.parse().ok()).unwrap_or(0);
    let mut rng = SeededRandom::new(seed);
    let db = LocalDb::open(common::open(&backend, std::path::Path::new(&dir))).expect("child opens store");
    let start = db
        .get("tickets", "counter")
        .expect("read counter")
        .and_then(|r| r.get("version").and_then(Value::as_integer))
        .unwrap_or(0);
    let mut out = std::io::stdout().lock();
    for k in (start + 1)..(start + 100_000) {
        let n = 1 + rng.below(8) as i64;
        db.write(|tx| {
            tx.set_metadata(Some(format!("k={k};n={n}")));
            for i in 0..n {
                tx.insert(
                    "tickets",
                    &format!("r{k}-{i}"),
                    row_data([
                        ("title", Value::from(format!("tx {k} row {i}"))),
                        ("version", Value::from(k)),
                    ]),
                )?;
            }
            if k == 1 {
                tx.insert("tickets", "counter", row_data([("version", Value::from(k))]))?;
            } else {
                tx.update("tickets", "counter", row_data([("version", Value::from(k))]))?;
            }
            Ok::<_, QueueError>(())
        })
        .expect("child write");
        writeln!(out, "ack {k} {n}").expect("stdout");
        out.flush().expect("flush");
        if rng.below(16) == 0 {
            // Also crash around queue bookkeeping writes.
            if let Some(tx) = db.next_transaction().expect("next") {
                if let Some(last) = tx.entries.last() {
                    db.complete(last.seq).expect("complete");
                }
            }
        }
    }
}

/// What the parent saw acknowledged: k -> n rows.
fn run_child(backend: &str, dir: &std::path::Path, seed: u64, kill_after_ms: u64) -> BTreeMap<i64, i64> {
    let exe = std::env::current_exe().expect("test binary path");
    let mut child = Command::new(exe)
        .args(["--exact", "crash_child_writer", "--nocapture", "--test-threads=1"])
        .env(ENV_DIR, dir)
        .env(ENV_BACKEND, backend)
        .env(ENV_SEED, seed.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().expect("child stdout");
    let reader = std::thread::spawn(move || {
        let mut acked = BTreeMap::new();
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let mut parts = line.split_whitespace();
            if parts.next() == Some("ack") {
                let k: i64 = parts.next().and_then(|s| s.parse().ok()).expect("ack k");
                let n: i64 = parts.next().and_then(|s| s.parse().ok()).expect("ack n");
                acked.insert(k, n);
            }
        }
        acked
    });
    std::thread::sleep(Duration::from_millis(kill_after_ms));
    child.kill().expect("SIGKILL child"); // std sends SIGKILL on unix
    child.wait().expect("reap child");
    reader.join().expect("reader thread")
}

/// Reopen and check the store against everything ever acknowledged.
fn verify(backend: &str, dir: &std::path::Path, acked: &BTreeMap<i64, i64>, context: &str) {
    let db = LocalDb::open(common::open(backend, dir)).expect("reopen after crash");
    let rows: BTreeMap<String, _> = db.scan("tickets").expect("scan").into_iter().collect();
    // Transactions present in the rows, each with all its rows or none.
    let mut present: BTreeMap<i64, i64> = BTreeMap::new();
    for (id, data) in &rows {
        if id == "counter" {
            continue;
        }
        let k = data.get("version").and_then(Value::as_integer).expect("row version");
        *present.entry(k).or_default() += 1;
    }
    let counter = rows
        .get("counter")
        .and_then(|r| r.get("version").and_then(Value::as_integer))
        .unwrap_or(0);
    let max_present = present.keys().next_back().copied().unwrap_or(0);
    assert_eq!(
        counter, max_present,
        "{context}: counter row disagrees with the rows present"
    );
    let expected_ks: BTreeSet<i64> = (1..=max_present).collect();
    assert_eq!(
        present.keys().copied().collect::<BTreeSet<_>>(),
        expected_ks,
        "{context}: a gap in committed transactions"
    );
    for (k, n) in acked {
        assert_eq!(
            present.get(k),
            Some(n),
            "{context}: acknowledged transaction {k} lost or half-applied"
        );
    }
    // The queue: every entry of every present transaction, in order,
    // contiguous per transaction.
    let entries = db.store().queue_from(0, usize::MAX).expect("queue");
    let mut per_tx: BTreeMap<u64, Vec<&ferry_core::CrudEntry>> = BTreeMap::new();
    for w in entries.windows(2) {
        assert!(w[0].seq < w[1].seq, "{context}: queue out of order");
        assert!(
            w[0].tx_id <= w[1].tx_id,
            "{context}: transactions interleaved in the queue"
        );
    }
    for e in &entries {
        per_tx.entry(e.tx_id).or_default().push(e);
    }
    assert_eq!(
        per_tx.len() as i64,
        max_present,
        "{context}: queue transactions vs committed transactions"
    );
    for (tx_id, es) in per_tx {
        let meta = es[0].metadata.clone().expect("metadata");
        let (k, n) = meta
            .strip_prefix("k=")
            .and_then(|s| s.split_once(";n="))
            .map(|(k, n)| (k.parse::<i64>().expect("k"), n.parse::<i64>().expect("n")))
            .expect("k and n in metadata");
        assert_eq!(tx_id as i64, k, "{context}: tx id");
        assert_eq!(
            es.len() as i64,
            n + 1,
            "{context}: transaction {k} has {} queue entries",
            es.len()
        );
        assert_eq!(
            present.get(&k),
            Some(&n),
            "{context}: queue has transaction {k} but rows do not"
        );
    }
    assert!(
        db.completed_through() <= entries.last().map_or(0, |e| e.seq),
        "{context}: completed marker past the queue"
    );
}

fn crash_many_times(backend: &str, rounds: u32) {
    let seed = ferry_core::testkit::seed_from_env();
    let mut rng = SeededRandom::new(seed);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut acked_all: BTreeMap<i64, i64> = BTreeMap::new();
    let mut total_acked = 0usize;
    for round in 0..rounds {
        let kill_after_ms = 30 + rng.below(400);
        let acked = run_child(backend, dir.path(), rng.next_u64(), kill_after_ms);
        total_acked += acked.len();
        acked_all.extend(acked);
        let context = format!(
            "{backend} round {round} (seed {seed}; replay with FERRY_SEED={seed} cargo test -p ferry-queue --test crash)"
        );
        verify(backend, dir.path(), &acked_all, &context);
    }
    assert!(
        total_acked > 0,
        "{backend}: the child never committed a write (seed {seed})"
    );
    eprintln!("{backend}: {rounds} kills, {total_acked} acknowledged transactions, all present (seed {seed})");
}

#[test]
fn sqlite_survives_sigkill_at_random_moments() {
    crash_many_times("sqlite", 25);
}

#[test]
fn sled_survives_sigkill_at_random_moments() {
    crash_many_times("sled", 25);
}
