//! The change observer runs after the write lock is let go, in commit
//! order, on every backend: while it is told of one write, another write
//! commits (a slow live query does not hold writes up), the observer still
//! hears of the two in order, a write from inside it is refused instead
//! of waiting for itself, and the upload reads no entry before the
//! observer was told of it (so no write is uploaded, answered and rolled
//! back before live queries saw it written).

mod common;

use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use common::{open, BACKENDS};
use ferry_core::{row_data, RowData, Value};
use ferry_queue::{ChangeSource, LocalDb, QueueError, RowChange};
use parking_lot::Mutex;

fn title(t: &str) -> RowData {
    row_data([("title", Value::from(t)), ("status", Value::from("pending"))])
}

const WAIT: Duration = Duration::from_secs(10);

#[test]
fn a_write_commits_while_the_observer_is_told_of_the_one_before() {
    for backend in BACKENDS {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = Arc::new(LocalDb::open(open(backend, dir.path())).expect("open"));
        let heard: Arc<Mutex<Vec<String>>> = Arc::default();
        // The observer stops in its call for t1 until released.
        let (entered_tx, entered_rx) = mpsc::channel::<()>();
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let release_rx = Mutex::new(release_rx);
        let reentrant: Arc<Mutex<Option<bool>>> = Arc::default();
        {
            let heard = heard.clone();
            let reentrant = reentrant.clone();
            let weak = Arc::downgrade(&db);
            db.set_observer(Some(Arc::new(move |source, rows: &[RowChange]| {
                assert_eq!(source, ChangeSource::LocalWrite);
                heard.lock().extend(rows.iter().map(|r| r.id.clone()));
                if rows.iter().any(|r| r.id == "t1") {
                    if let Some(db) = weak.upgrade() {
                        let refused = db.write(|tx| tx.insert("tickets", "inner", title("x")));
                        *reentrant.lock() = Some(matches!(refused, Err(QueueError::Reentrant)));
                    }
                    entered_tx.send(()).expect("entered");
                    release_rx.lock().recv_timeout(WAIT).expect("released");
                }
            })));
        }
        let first = {
            let db = db.clone();
            std::thread::spawn(move || db.write(|tx| tx.insert("tickets", "t1", title("one"))))
        };
        entered_rx.recv_timeout(WAIT).expect("the observer was told of t1");
        assert_eq!(
            *reentrant.lock(),
            Some(true),
            "{backend}: a write from the observer is refused"
        );
        // t1 is committed but its observer call has not ended: the upload
        // does not see it yet.
        assert!(db.next_batch(100).expect("next batch").is_empty(), "{backend}");
        assert_eq!(db.next_transaction().expect("next transaction"), None, "{backend}");

        let second = {
            let db = db.clone();
            std::thread::spawn(move || db.write(|tx| tx.insert("tickets", "t2", title("two"))))
        };
        // t2 commits while the observer is still inside t1's call.
        let deadline = std::time::Instant::now() + WAIT;
        while db.get("tickets", "t2").expect("get").is_none() {
            assert!(
                std::time::Instant::now() < deadline,
                "{backend}: a write could not commit while the observer ran"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(db.next_batch(100).expect("next batch").is_empty(), "{backend}");
        assert_eq!(*heard.lock(), ["t1"], "{backend}: t2 is told after t1's call ends");

        release_tx.send(()).expect("release");
        first.join().expect("first").expect("first write");
        second.join().expect("second").expect("second write");
        assert_eq!(*heard.lock(), ["t1", "t2"], "{backend}: told in commit order");
        assert_eq!(db.get("tickets", "inner").expect("get"), None, "{backend}");
        let ids: Vec<String> = db
            .next_batch(100)
            .expect("next batch")
            .iter()
            .map(|e| e.op.id().to_owned())
            .collect();
        assert_eq!(ids, ["t1", "t2"], "{backend}: both are uploaded once told");
    }
}
