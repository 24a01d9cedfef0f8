//! Blocking calls over an async driver. `SourceDb` is a blocking trait
//! (the service calls it off its async threads, see
//! `docs/adr/0012-postgres-driver.md`); tokio-postgres is async. The
//! bridge owns a small runtime that drives the connections (their socket
//! I/O runs there), and a caller waits for a client call on its own
//! thread: a tokio-postgres client call only sends a request over a
//! channel to its connection task and waits for the answer, so it needs
//! no runtime of its own and waiting never nests one runtime in another
//! (a deterministic simulation's current-thread runtime included).

use std::future::Future;

use ferry_source::SourceError;

/// The runtime the connections live on.
#[derive(Debug)]
pub(crate) struct Bridge {
    /// `Some` until dropped: dropped with `shutdown_background`, which is
    /// allowed from any thread (a plain drop panics on an async thread).
    rt: Option<tokio::runtime::Runtime>,
}

/// Threads of the bridge's runtime: connection I/O only.
const BRIDGE_THREADS: usize = 2;

impl Bridge {
    pub(crate) fn new() -> Result<Self, SourceError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(BRIDGE_THREADS)
            .thread_name("ferry-postgres")
            .enable_all()
            .build()
            .map_err(|e| SourceError::Unavailable(format!("cannot start the postgresql runtime: {e}")))?;
        Ok(Bridge { rt: Some(rt) })
    }

    fn handle(&self) -> Result<&tokio::runtime::Handle, SourceError> {
        self.rt
            .as_ref()
            .map(tokio::runtime::Runtime::handle)
            .ok_or_else(|| SourceError::Unavailable("the postgresql runtime stopped".to_owned()))
    }

    /// Spawn a task on the bridge's runtime.
    pub(crate) fn spawn(&self, fut: impl Future<Output = ()> + Send + 'static) -> Result<(), SourceError> {
        self.handle()?.spawn(fut);
        Ok(())
    }

    /// Run `fut` on the bridge's runtime (it needs one: connecting, the
    /// pool's timeouts) and wait for its output on this thread.
    pub(crate) fn run<T: Send + 'static>(
        &self,
        fut: impl Future<Output = T> + Send + 'static,
    ) -> Result<T, SourceError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.handle()?.spawn(async move {
            // The waiter may be gone (it never is: it blocks on `rx`).
            let _ = tx.send(fut.await);
        });
        rx.recv()
            .map_err(|_| SourceError::Unavailable("the postgresql runtime stopped".to_owned()))
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// Wait on this thread for a future that needs no runtime: a call on a
/// tokio-postgres client (see the module's comment).
pub(crate) fn wait<F: Future>(fut: F) -> F::Output {
    futures_executor::block_on(fut)
}
