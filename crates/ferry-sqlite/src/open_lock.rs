//! One store per database file: an exclusive advisory lock on
//! `<file>-lock`, held while a [`crate::SqliteStore`] lives.
//!
//! Two stores on one file would each count queue seqs from what they read
//! at open, so the second one's writes would reuse seqs (and fail), and
//! neither would see the other's writes in its overlay index or live
//! queries. The lock is an advisory lock (`flock` on Unix) on a file of
//! its own: a lock on the database file itself could not be let go
//! without closing a descriptor of that file, which would drop SQLite's
//! own POSIX locks on it. The operating system lets the lock go when the
//! process ends, however it ends, so a crashed app's store opens at once.
//! The lock file is left in place (empty); it holds nothing.

use std::ffi::OsString;
use std::fs::{File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferry_store::{StoreError, StoreResult};

/// How long to sleep between tries while another store holds the lock.
const RETRY_DELAY_MS: u64 = 10;

/// A held open lock; dropping it lets go of the lock.
#[derive(Debug)]
pub(crate) struct OpenLock {
    _file: File,
}

/// The lock file of the database at `path`: `<path>-lock`, as SQLite
/// names its `-wal` and `-shm` files.
fn lock_path(path: &Path) -> PathBuf {
    let mut name = OsString::from(path.as_os_str());
    name.push("-lock");
    PathBuf::from(name)
}

/// Take the open lock of the database at `path`, waiting up to `wait` for
/// another store to let it go.
pub(crate) fn take(path: &Path, wait: Duration) -> StoreResult<OpenLock> {
    let lock_path = lock_path(path);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&lock_path)
        .map_err(|e| StoreError::Backend {
            backend: "sqlite",
            message: format!("cannot open the lock file {}: {e}", lock_path.display()),
            retryable: false,
        })?;
    let deadline = Instant::now() + wait;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(OpenLock { _file: file }),
            Err(TryLockError::WouldBlock) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(RETRY_DELAY_MS));
            }
            Err(TryLockError::WouldBlock) => {
                return Err(StoreError::Backend {
                    backend: "sqlite",
                    message: format!(
                        "the store {} is already open (by another store in this process or in another \
                         process; its lock file is {}): one store per file",
                        path.display(),
                        lock_path.display()
                    ),
                    retryable: true,
                })
            }
            Err(TryLockError::Error(e)) => {
                return Err(StoreError::Backend {
                    backend: "sqlite",
                    message: format!("cannot lock {}: {e}", lock_path.display()),
                    retryable: false,
                })
            }
        }
    }
}
