//! The connection's lifecycle: connect, disconnect and close, pausing
//! uploads or downloads on their own, and waiting until the client has
//! caught up with the server.
//!
//! Stopping is graceful: the loops end at their next waiting point, and a
//! server answer being stored (an upload's outcomes, a checkpoint) is
//! never cut in half: those run to the end on a blocking thread, and the
//! outcomes are stored with the completion in one store batch.

use std::sync::Arc;
use std::time::Duration;

use ferry_transport::Transport;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::{sync, ClientError, Credentials, Database, SyncStatus};

/// What the app asked of the loops.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Control {
    /// The upload loop sends nothing while set.
    pub(crate) uploads_paused: bool,
    /// The download stream is closed while set.
    pub(crate) downloads_paused: bool,
    /// Bumped to ask the download loop for a fresh stream.
    pub(crate) resync: u64,
}

/// The running loops of one `connect`.
pub(crate) struct Connection {
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Connection {
    fn abort(&self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Database {
    /// Start syncing over `transport` with tokens from `credentials`.
    /// Replaces an earlier connection (whose loops are stopped at once;
    /// await [`Database::disconnect`] first for a graceful stop).
    pub fn connect(&self, transport: Arc<dyn Transport>, credentials: Arc<dyn Credentials>) {
        if let Some(old) = self.tasks.lock().take() {
            old.abort();
        }
        let (stop, stopped) = watch::channel(false);
        let download = tokio::spawn(sync::download_loop(
            self.inner.clone(),
            transport.clone(),
            credentials.clone(),
            stopped.clone(),
        ));
        let upload = tokio::spawn(sync::upload_loop(self.inner.clone(), transport, credentials, stopped));
        *self.tasks.lock() = Some(Connection {
            stop,
            tasks: vec![download, upload],
        });
    }

    pub(crate) fn stop_tasks(&self) {
        if let Some(c) = self.tasks.lock().take() {
            c.abort();
        }
    }

    /// Stop syncing. Local reads and writes go on; writes queue up. An
    /// upload in flight is let finish and its answer stored (at most
    /// `ClientOptions::stop_timeout_ms`, after which the loops are
    /// aborted: the answer is then asked for again on the next connect).
    pub async fn disconnect(&self) {
        let conn = self.tasks.lock().take();
        if let Some(conn) = conn {
            conn.stop.send_replace(true);
            let timeout = Duration::from_millis(self.inner.options.stop_timeout_ms);
            let abort: Vec<_> = conn.tasks.iter().map(JoinHandle::abort_handle).collect();
            let all = async {
                for t in conn.tasks {
                    let _ = t.await;
                }
            };
            if tokio::time::timeout(timeout, all).await.is_err() {
                tracing::warn!("sync loops did not stop in time: aborting them");
                for a in abort {
                    a.abort();
                }
            }
        }
        self.inner.update_status(|s| {
            s.connected = false;
            s.connecting = false;
            s.downloading = false;
            s.uploading = false;
        });
    }

    /// Stop syncing gracefully (see [`Database::disconnect`]) and let go of
    /// this handle. The store is released when the last handle (clones,
    /// live queries) is gone. Dropping the last handle without `close`
    /// stops syncing at once, but waits (at most
    /// `ClientOptions::stop_timeout_ms`) for an answer or checkpoint being
    /// stored, so the app may open the same store again right after.
    pub async fn close(self) -> Result<(), ClientError> {
        self.disconnect().await;
        // Dropping `self` lets go of the store once no other handle holds
        // it (the change observer holds the database only weakly).
        Ok(())
    }

    /// Pause (or resume) uploads; the download stream keeps running.
    /// Writes keep queuing while paused.
    pub fn pause_uploads(&self, paused: bool) {
        self.inner.control.send_modify(|c| c.uploads_paused = paused);
        self.inner.update_status(|s| s.uploads_paused = paused);
        self.inner.upload_wake.notify_one();
    }

    /// Pause (or resume) the download stream; uploads keep running. While
    /// paused the client counts as offline (see [`crate::OfflinePolicy`]).
    pub fn pause_downloads(&self, paused: bool) {
        self.inner.control.send_modify(|c| c.downloads_paused = paused);
        self.inner.update_status(|s| s.downloads_paused = paused);
    }

    /// Wait until a checkpoint at or past `op_id` is applied (an op id the
    /// app learnt from the server, e.g. [`SyncStatus::server_op_id`]), or
    /// `timeout_ms` passes; returns whether it was.
    pub async fn wait_for_server_op(&self, op_id: u64, timeout_ms: u64) -> bool {
        self.wait_for_status(timeout_ms, |s| s.last_applied_op_id.is_some_and(|a| a >= op_id))
            .await
    }

    /// Catch up with the server now: wait until every local write is
    /// answered, then open a fresh stream and wait until its first
    /// checkpoint (the server's state now, with those writes) is applied.
    /// Needs a connection; returns whether it happened within `timeout_ms`.
    pub async fn sync_now(&self, timeout_ms: u64) -> bool {
        let deadline = tokio::time::Instant::now() + Duration::from_millis(timeout_ms);
        let mut status = self.watch_status();
        while self.inner.local.upload_queue_len() > 0 {
            self.inner.upload_wake.notify_one();
            if tokio::time::timeout_at(deadline, status.changed()).await.is_err() {
                return false;
            }
        }
        let opened = self.status().streams_opened;
        self.inner.control.send_modify(|c| c.resync = c.resync.wrapping_add(1));
        let caught_up = move |s: &SyncStatus| {
            s.streams_opened > opened
                && s.server_op_id
                    .is_some_and(|target| s.last_applied_op_id.is_some_and(|a| a >= target))
        };
        let left_ms = deadline
            .saturating_duration_since(tokio::time::Instant::now())
            .as_millis() as u64;
        self.wait_for_status(left_ms, caught_up).await
    }
}
