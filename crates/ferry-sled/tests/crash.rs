//! Durability: once `apply` returns, the batch survives SIGKILL.
//!
//! The test re-runs this test binary as a child that applies batches and
//! reports each one after `apply` returns; the parent kills it with SIGKILL
//! mid-stream, reopens the store and checks every reported batch is there.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

use ferry_core::{row_data, ColumnType, CrudEntry, CrudOp, Schema, Table, Value};
use ferry_sled::SledStore;
use ferry_store::{Store, WriteBatch};

const CHILD_ENV: &str = "FERRY_SLED_CRASH_CHILD_PATH";

fn schema() -> Schema {
    Schema::new([Table::new("tickets")
        .column("n", ColumnType::Integer)
        .index("by_n", &["n"])])
    .expect("schema")
}

fn batch(seq: u64) -> WriteBatch {
    let mut b = WriteBatch::new();
    b.put_synced(
        "tickets",
        format!("r{seq:05}"),
        row_data([("n", Value::from(seq as i64))]),
    )
    .append_queue(CrudEntry {
        seq,
        tx_id: seq,
        op: CrudOp::Delete {
            table: "tickets".into(),
            id: format!("r{seq:05}"),
        },
        previous: None,
        metadata: None,
        hlc: None,
    })
    .put_meta("last", seq.to_be_bytes().to_vec());
    b
}

/// The child's work; a no-op when run as a normal test.
#[test]
fn crash_child_writer() {
    let Ok(path) = std::env::var(CHILD_ENV) else {
        return;
    };
    let store = SledStore::open(path, schema()).expect("open");
    let mut out = std::io::stdout().lock();
    for seq in 1.. {
        store.apply(batch(seq)).expect("apply");
        writeln!(out, "applied {seq}").expect("report");
        out.flush().expect("flush stdout");
    }
}

#[test]
fn applied_batches_survive_sigkill() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ferry.sled");
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args(["crash_child_writer", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, &path)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().expect("child stdout");
    let mut last_reported = 0u64;
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("read child output");
        if let Some(n) = line.strip_prefix("applied ") {
            last_reported = n.parse().expect("seq");
            if last_reported >= 40 {
                break;
            }
        }
    }
    // Child::kill sends SIGKILL on Unix: no destructors, no sled shutdown.
    child.kill().expect("kill child");
    child.wait().expect("reap child");
    assert!(last_reported >= 40, "child stopped early at {last_reported}");

    let store = SledStore::open(&path, schema()).expect("reopen after crash");
    let queue_len = store.queue_len().expect("len");
    assert!(queue_len >= last_reported, "{queue_len} < {last_reported}");
    // Whatever made it is whole batches: rows, index entries, queue and
    // meta agree.
    let last = store.get_meta("last").expect("meta").expect("last batch");
    let last = u64::from_be_bytes(last.try_into().expect("8 bytes"));
    assert_eq!(last, queue_len);
    assert_eq!(store.scan_synced("tickets").expect("scan").len() as u64, last);
    let indexed = store
        .scan_synced_index(
            "tickets",
            "by_n",
            std::ops::Bound::Unbounded,
            std::ops::Bound::Unbounded,
        )
        .expect("index scan");
    assert_eq!(indexed.len() as u64, last);
}
