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
//! records the WAL's length, and the writer looks at the WAL file's; once
//! either passes its limit the writer restarts it itself
//! ([`Checkpointer::restart_due`], `SqliteStore::apply`), which costs it
//! only what the helper has not copied yet (all of it when the helper is
//! starved of CPU: the writer then waits, and the WAL stays bounded). A
//! restart cannot run while the helper's pass holds the checkpoint lock
//! (SQLite then answers at once, waiting for nobody), so the writer first
//! waits for the pass under way ([`Checkpointer::wait_for_pass`]): on a
//! slow disk the pass's sync took longer than the restart's own short
//! wait, every restart failed, and the WAL grew to several times its
//! limit during a download.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use rusqlite::Connection;

/// How often a writer waiting for the helper's pass looks again.
const PASS_POLL_MS: u64 = 2;

/// The background checkpointer of one database file.
#[derive(Debug)]
pub(crate) struct Checkpointer {
    path: PathBuf,
    /// The database's WAL file (`<path>-wal`).
    wal_path: PathBuf,
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
    /// A pass is copying pages now.
    in_pass: AtomicBool,
    /// Passes ended since the helper was made.
    passes: AtomicU64,
}

impl Checkpointer {
    pub(crate) fn new(path: PathBuf) -> Self {
        let mut wal = path.clone().into_os_string();
        wal.push("-wal");
        Checkpointer {
            path,
            wal_path: PathBuf::from(wal),
            state: Arc::new(State::default()),
        }
    }

    /// The WAL's length in pages (of `page_size` bytes) if the writer
    /// should restart it now: past `limit_pages` (and past where a failed
    /// restart left the next try), as the helper's last pass found it or
    /// as the WAL file's length shows. The file counts because a helper
    /// starved of CPU reports late: the WAL would grow by what the writer
    /// commits meanwhile. (The file's length is the WAL's since it last
    /// started over: the first commit after that cuts the file back to
    /// the store's WAL size limit.)
    pub(crate) fn restart_due(&self, limit_pages: u64, page_size: u64) -> Option<u64> {
        let reported = self.state.wal_pages.load(Ordering::SeqCst);
        let file = std::fs::metadata(&self.wal_path).map_or(0, |m| m.len() / page_size.max(1));
        let pages = reported.max(file);
        (pages > limit_pages && pages > self.state.retry_over_pages.load(Ordering::SeqCst)).then_some(pages)
    }

    /// Wait until the pass copying pages now (if any) ended, at most
    /// `max`: a restart must wait for it anyway, and the wait for a pass
    /// is bounded by the pages it copies (a reader in another process, the
    /// other thing a restart waits for, may hold the WAL for any time, so
    /// the restart's own wait stays short). On a slow disk the pass's sync
    /// can outlast the restart's short wait every time, and the WAL grew
    /// a quarter of its limit per failed try while writes kept coming.
    pub(crate) fn wait_for_pass(&self, max: std::time::Duration) {
        if !self.state.in_pass.load(Ordering::SeqCst) {
            return;
        }
        let started = std::time::Instant::now();
        let pass = self.state.passes.load(Ordering::SeqCst);
        while self.state.in_pass.load(Ordering::SeqCst)
            && self.state.passes.load(Ordering::SeqCst) == pass
            && started.elapsed() < max
        {
            std::thread::sleep(std::time::Duration::from_millis(PASS_POLL_MS));
        }
    }

    /// The writer tried a restart of a WAL of `pages` pages: done, the WAL
    /// starts over; failed (a reader holds it, or the helper's pass did
    /// not end within the wait), try again once it grew by a quarter of
    /// `limit_pages` more.
    pub(crate) fn restart_tried(&self, done: bool, pages: u64, limit_pages: u64) {
        let (reported, retry) = (&self.state.wal_pages, &self.state.retry_over_pages);
        if done {
            reported.store(0, Ordering::SeqCst);
            retry.store(0, Ordering::SeqCst);
        } else {
            retry.store(pages.saturating_add((limit_pages / 4).max(1)), Ordering::SeqCst);
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
                state.in_pass.store(true, Ordering::SeqCst);
                let pass = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get::<_, i64>(1));
                state.in_pass.store(false, Ordering::SeqCst);
                state.passes.fetch_add(1, Ordering::SeqCst);
                if let Ok(pages) = pass {
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
