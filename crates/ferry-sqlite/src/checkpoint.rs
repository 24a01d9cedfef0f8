//! Checkpointing the WAL off the writer's path.
//!
//! A commit normally ends with SQLite's automatic checkpoint, which copies
//! the pages it wrote into the database file (and syncs it) before
//! `apply` returns. Large batches, and the many batches of a download being
//! staged, commit without it; a helper thread then checkpoints (`PASSIVE`:
//! it never blocks the store's connection) from a connection of its own.
//! At most one such thread runs per store: commits made while it works
//! mark the WAL dirty, and it goes round again until nothing is left.
//!
//! A `PASSIVE` checkpoint copies pages but never makes the writer start
//! the WAL over while writes keep following each other (a large download
//! being staged), so the WAL would grow with the download. Each pass
//! records the WAL's length; once it passes its limit the writer restarts
//! it itself ([`Checkpointer::restart_due`], `SqliteStore::apply`), which
//! costs it only what the helper has not copied yet.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use rusqlite::Connection;

/// The background checkpointer of one database file.
#[derive(Debug)]
pub(crate) struct Checkpointer {
    path: PathBuf,
    state: Arc<State>,
}

#[derive(Debug, Default)]
struct State {
    /// A helper thread is running.
    running: AtomicBool,
    /// Commits since the running thread's last pass began.
    dirty: AtomicBool,
    /// The WAL's length in pages as the last pass found it.
    wal_pages: AtomicU64,
    /// WAL length in pages below which no restart is tried (0: the limit
    /// alone decides), raised after a failed one.
    retry_over_pages: AtomicU64,
}

impl Checkpointer {
    pub(crate) fn new(path: PathBuf) -> Self {
        Checkpointer {
            path,
            state: Arc::new(State::default()),
        }
    }

    /// Whether the writer should restart the WAL: the helper's last pass
    /// found it past `limit_pages` (and past where a failed restart left
    /// the next try).
    pub(crate) fn restart_due(&self, limit_pages: u64) -> bool {
        let pages = self.state.wal_pages.load(Ordering::SeqCst);
        pages > limit_pages && pages > self.state.retry_over_pages.load(Ordering::SeqCst)
    }

    /// The writer tried a restart: done, the WAL starts over; failed (a
    /// reader holds it), try again once it grew by `limit_pages` more.
    pub(crate) fn restart_tried(&self, done: bool, limit_pages: u64) {
        let (pages, retry) = (&self.state.wal_pages, &self.state.retry_over_pages);
        if done {
            pages.store(0, Ordering::SeqCst);
            retry.store(0, Ordering::SeqCst);
        } else {
            retry.store(
                pages.load(Ordering::SeqCst).saturating_add(limit_pages),
                Ordering::SeqCst,
            );
        }
    }

    /// Ask for a checkpoint of what has been committed so far (a pass
    /// that starts after this call covers it). Best effort: what a pass
    /// cannot copy (a reader holds an old snapshot) the next automatic
    /// checkpoint takes.
    pub(crate) fn request(&self) {
        self.state.dirty.store(true, Ordering::SeqCst);
        if self.state.running.swap(true, Ordering::SeqCst) {
            // The running thread sees `dirty` before it stops.
            return;
        }
        let (path, state) = (self.path.clone(), self.state.clone());
        let spawned = std::thread::Builder::new()
            .name("ferry-sqlite-checkpoint".into())
            .spawn(move || run(&path, &state));
        if spawned.is_err() {
            // No thread: the next automatic checkpoint does the work.
            self.state.running.store(false, Ordering::SeqCst);
        }
    }
}

fn run(path: &PathBuf, state: &State) {
    // It never creates a database (the store may be gone by then).
    let flags = rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags).ok();
    loop {
        while state.dirty.swap(false, Ordering::SeqCst) {
            if let Some(conn) = &conn {
                // A failure has nothing to report to: the next pass or
                // automatic checkpoint covers what this one could not do.
                if let Ok(pages) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get::<_, i64>(1)) {
                    state
                        .wal_pages
                        .store(u64::try_from(pages).unwrap_or(0), Ordering::SeqCst);
                }
            }
        }
        state.running.store(false, Ordering::SeqCst);
        // A request between the last swap and the store above found the
        // thread still running and left it to this one.
        if !state.dirty.load(Ordering::SeqCst) || state.running.swap(true, Ordering::SeqCst) {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idle(c: &Checkpointer) -> bool {
        for _ in 0..1_000 {
            if !c.state.running.load(Ordering::SeqCst) {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        false
    }

    #[test]
    fn requests_copy_the_wal_into_the_database_file_with_one_thread_at_a_time() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db.sqlite");
        let conn = Connection::open(&path).expect("open");
        conn.pragma_update(None, "journal_mode", "WAL").expect("wal");
        conn.pragma_update(None, "wal_autocheckpoint", 0)
            .expect("no autocheckpoint");
        conn.execute_batch("CREATE TABLE t (v BLOB)").expect("create");
        let main_len = || std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        let checkpointer = Checkpointer::new(path.clone());
        for round in 0..3 {
            for _ in 0..500 {
                conn.execute("INSERT INTO t (v) VALUES (zeroblob(1024))", [])
                    .expect("insert");
            }
            let before = main_len();
            // Requests from several threads at once: one helper serves them.
            std::thread::scope(|s| {
                for _ in 0..4 {
                    s.spawn(|| checkpointer.request());
                }
            });
            assert!(idle(&checkpointer), "round {round}: the checkpointer never stopped");
            assert!(!checkpointer.state.dirty.load(Ordering::SeqCst), "round {round}");
            assert!(
                main_len() >= before + 400 * 1024,
                "round {round}: the database file grew from {before} to {} bytes only",
                main_len()
            );
        }
    }

    #[test]
    fn a_missing_file_is_not_created() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("gone.sqlite");
        let checkpointer = Checkpointer::new(path.clone());
        checkpointer.request();
        assert!(idle(&checkpointer));
        assert!(!path.exists());
    }
}
