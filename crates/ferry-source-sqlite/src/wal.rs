//! WAL checkpoints off the writer's commit path.
//!
//! SQLite's automatic checkpoint runs inside the `COMMIT` that takes the
//! WAL past 1,000 pages: the writer copies pages into the database file
//! and syncs it while every other writer waits. Here the writer
//! connection has no automatic checkpoint; its WAL hook records how many
//! pages the WAL holds after each commit ([`take_wal_pages`]), and then:
//!
//! - from [`WalLimits::background_checkpoint_pages`] pages, a background
//!   thread with its own connection ([`Checkpointer`]) is woken to run a
//!   `PASSIVE` checkpoint (it copies what readers no longer need, never
//!   waits for the writer, and the writer never waits for it);
//! - over [`WalLimits::max_wal_pages`] pages, the writer runs a `PASSIVE`
//!   checkpoint itself before it returns ([`writer_checkpoints`]): while
//!   it holds the writer, nothing is appended, so the checkpoint catches
//!   up and the next write transaction starts the WAL again from its
//!   beginning. Writes that follow each other closely never leave the
//!   background checkpointer a moment to catch up, so this is what bounds
//!   the WAL: at most `max_wal_pages` plus one transaction's pages (while
//!   no reader holds a snapshot older than the WAL's start: a `PASSIVE`
//!   checkpoint never waits for one, so the WAL grows until it ends).
//!
//! Dropping the [`Checkpointer`] stops its thread and closes its
//! connection; the last connection closed checkpoints the rest and
//! removes the WAL, as SQLite always does.

use std::cell::Cell;
use std::ffi::c_int;
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;

use parking_lot::{Condvar, Mutex};
use rusqlite::hooks::Wal;
use rusqlite::Connection;

use crate::Result;

/// Pages in the WAL from which the background checkpointer is woken
/// after a commit (SQLite's own automatic checkpoint threshold).
pub const DEFAULT_BACKGROUND_CHECKPOINT_PAGES: u64 = 1_000;
/// Pages in the WAL over which the writer checkpoints itself after a
/// commit (128 MiB of the 8 KiB pages of files this creates, 64 MiB in a
/// file made with SQLite's default 4 KiB pages).
pub const DEFAULT_MAX_WAL_PAGES: u64 = 16_384;

/// When the WAL is checkpointed (see the module).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WalLimits {
    /// Pages in the WAL after a commit from which the background
    /// checkpointer is woken.
    pub background_checkpoint_pages: u64,
    /// Pages in the WAL after a commit over which the writer checkpoints
    /// itself before its write returns.
    pub max_wal_pages: u64,
}

impl Default for WalLimits {
    fn default() -> Self {
        WalLimits {
            background_checkpoint_pages: DEFAULT_BACKGROUND_CHECKPOINT_PAGES,
            max_wal_pages: DEFAULT_MAX_WAL_PAGES,
        }
    }
}

thread_local! {
    /// Pages in the WAL after this thread's last commit on a writer
    /// connection (set by [`record_wal_pages`], inside the commit).
    static WAL_PAGES: Cell<Option<u64>> = const { Cell::new(None) };
}

/// The writer connection's WAL hook: SQLite calls it on the committing
/// thread, inside the commit, with the pages the WAL now holds. It
/// replaces the automatic checkpoint (which is itself a WAL hook).
fn record_wal_pages(_wal: &Wal, pages: c_int) -> rusqlite::Result<()> {
    WAL_PAGES.with(|p| p.set(Some(u64::try_from(pages).unwrap_or(0))));
    Ok(())
}

/// Make `conn` a writer: no automatic checkpoint, its WAL size recorded
/// after each commit.
pub(crate) fn hook_writer(conn: &Connection) {
    conn.wal_hook(Some(record_wal_pages));
}

/// The pages in the WAL after this thread's last commit since the last
/// call (`None`: no commit wrote to the WAL).
pub(crate) fn take_wal_pages() -> Option<u64> {
    WAL_PAGES.with(Cell::take)
}

/// Whether a writer whose commit left `wal_pages` pages in the WAL
/// checkpoints itself: over `max_wal_pages`, not at it.
pub(crate) fn writer_checkpoints(wal_pages: u64, max_wal_pages: u64) -> bool {
    wal_pages > max_wal_pages
}

/// A `PASSIVE` checkpoint on `conn`: copies the WAL pages no reader
/// still needs into the database file, without waiting for anyone.
/// Returns the pages in the WAL and those checkpointed.
pub(crate) fn checkpoint_passive(conn: &Connection) -> Result<(i64, i64)> {
    Ok(conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| Ok((r.get(1)?, r.get(2)?)))?)
}

#[derive(Default)]
struct State {
    /// A commit asked for a checkpoint since the last one started.
    due: bool,
    stop: bool,
    /// Checkpoints run (for tests).
    runs: u64,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    wake: Condvar,
}

/// The background checkpointer: one thread, its own connection.
pub(crate) struct Checkpointer {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Checkpointer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpointer").finish_non_exhaustive()
    }
}

impl Checkpointer {
    /// Start the thread, on a connection of its own to `path`.
    pub(crate) fn start(path: &Path) -> Result<Checkpointer> {
        let conn = crate::open_conn(path)?;
        let shared = Arc::new(Shared::default());
        let theirs = shared.clone();
        let thread = std::thread::Builder::new()
            .name("ferry-wal-checkpoint".into())
            .spawn(move || run(&conn, &theirs))
            .map_err(|e| {
                crate::Error::Source(ferry_source::SourceError::Database(format!(
                    "cannot start the wal checkpoint thread: {e}"
                )))
            })?;
        Ok(Checkpointer {
            shared,
            thread: Some(thread),
        })
    }

    /// Ask for a checkpoint (coalesced with any already asked for).
    pub(crate) fn wake(&self) {
        self.shared.state.lock().due = true;
        self.shared.wake.notify_one();
    }

    /// Checkpoints the thread has run.
    pub(crate) fn runs(&self) -> u64 {
        self.shared.state.lock().runs
    }
}

/// The thread: a checkpoint each time one is due, until stopped. A
/// failed checkpoint is left to the next (or to the writer's bound).
fn run(conn: &Connection, shared: &Shared) {
    loop {
        {
            let mut s = shared.state.lock();
            while !s.due && !s.stop {
                shared.wake.wait(&mut s);
            }
            if s.stop {
                return;
            }
            s.due = false;
        }
        let _ = checkpoint_passive(conn);
        shared.state.lock().runs += 1;
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.shared.state.lock().stop = true;
        self.shared.wake.notify_one();
        if let Some(t) = self.thread.take() {
            // A panic on the thread has nothing left to clean up.
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::writer_checkpoints;

    #[test]
    fn the_writer_checkpoints_over_the_limit_not_at_it() {
        assert!(!writer_checkpoints(0, 10));
        assert!(!writer_checkpoints(10, 10));
        assert!(writer_checkpoints(11, 10));
    }
}
