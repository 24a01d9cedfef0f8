//! One store per database file: a second store on a file in use, in this
//! process or another, is refused with a retryable error naming the file
//! and changes nothing; the file opens again once the first store is
//! dropped or its process is gone (however it ended).

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use ferry_core::{ErrorKind, Schema};
use ferry_sqlite::{SqliteOptions, SqliteStore};
use ferry_store::testkit::{put_entry, test_schema, ticket};
use ferry_store::{Store, StoreError, WriteBatch};

/// Options waiting `wait_ms` for a store in use.
fn waiting(wait_ms: u64) -> SqliteOptions {
    SqliteOptions {
        busy_timeout_ms: wait_ms,
        ..SqliteOptions::default()
    }
}

fn refused(err: StoreError, path: &std::path::Path) {
    assert_eq!(err.kind(), ErrorKind::Transient, "{err}");
    let message = err.to_string();
    assert!(message.contains(&path.display().to_string()), "{message}");
    assert!(message.contains("already open"), "{message}");
}

#[test]
fn a_second_store_on_a_file_in_use_is_refused_and_the_first_keeps_working() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("client.db");
    let first = SqliteStore::open(&path, test_schema()).expect("open");
    first
        .apply(
            WriteBatch::new()
                .put_synced("tickets", "a", ticket("open", 1))
                .append_queue(put_entry(1, 1, "a"))
                .clone(),
        )
        .expect("apply");
    let started = Instant::now();
    let err = SqliteStore::open_with(&path, test_schema(), waiting(100)).expect_err("second store");
    assert!(
        started.elapsed() >= Duration::from_millis(100),
        "it waited its busy timeout first"
    );
    refused(err, &path);
    // A schema the second store would have migrated to changes nothing.
    let other = Schema::new(Vec::new()).expect("empty schema");
    refused(
        SqliteStore::open_with(&path, other, waiting(0)).expect_err("second store"),
        &path,
    );
    // The first store goes on as before.
    first
        .apply(WriteBatch::new().append_queue(put_entry(2, 2, "b")).clone())
        .expect("apply after the refused open");
    assert_eq!(first.queue_from(1, 10).expect("queue").len(), 2);
    assert!(first.get_synced("tickets", "a").expect("get").is_some());
    drop(first);
    // Once it is dropped, the file opens, with everything in it.
    let again = SqliteStore::open_with(&path, test_schema(), waiting(0)).expect("reopen");
    assert_eq!(again.queue_from(1, 10).expect("queue").len(), 2);
    assert!(again.get_synced("tickets", "a").expect("get").is_some());
}

#[test]
fn a_second_open_waits_for_the_first_store_to_close() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("client.db");
    let first = SqliteStore::open(&path, test_schema()).expect("open");
    let closer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        drop(first);
    });
    let second = SqliteStore::open_with(&path, test_schema(), waiting(10_000)).expect("opens once the first closed");
    closer.join().expect("closer");
    drop(second);
}

/// Environment variable that turns this test binary into a child process
/// holding a store open at the path it names until it is killed.
const CHILD_ENV: &str = "FERRY_OPEN_LOCK_CHILD";

/// The child's side: open the store, say so, wait to be killed.
#[test]
fn child_holds_a_store_open() {
    let Ok(path) = std::env::var(CHILD_ENV) else {
        return;
    };
    let _store = SqliteStore::open(&path, test_schema()).expect("child open");
    std::fs::write(format!("{path}.ready"), b"").expect("ready file");
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// A child process holding the store at `path`, once it holds it.
fn child_holding(path: &std::path::Path) -> Child {
    let exe = std::env::current_exe().expect("test binary");
    let mut child = Command::new(exe)
        .args(["--exact", "child_holds_a_store_open", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, path)
        .spawn()
        .expect("child");
    let ready = std::path::PathBuf::from(format!("{}.ready", path.display()));
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ready.exists() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the child ended before it opened the store: {status}");
        }
        assert!(Instant::now() < deadline, "the child did not open the store");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

#[test]
fn a_store_open_in_another_process_is_refused_until_that_process_is_killed() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("client.db");
    let mut child = child_holding(&path);
    let err = SqliteStore::open_with(&path, test_schema(), waiting(50)).expect_err("held by the child");
    refused(err, &path);
    // SIGKILL: the operating system lets the lock go with the process.
    child.kill().expect("kill");
    child.wait().expect("wait");
    SqliteStore::open_with(&path, test_schema(), waiting(0)).expect("open after the child was killed");
}
