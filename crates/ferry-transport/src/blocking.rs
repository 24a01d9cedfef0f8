//! Running blocking work (storage, decoding large lines) from async code.
//!
//! Normally the work goes to tokio's blocking pool, so it never stalls a
//! runtime thread. A deterministic simulation runs the whole fleet on one
//! current-thread runtime with paused time; there a second thread would be
//! a race, so the simulator asks for blocking work to run inline on its
//! thread ([`set_inline_on_this_thread`]). The switch is per thread: it
//! affects only runtimes driven by the thread that set it.

use std::cell::Cell;

use thiserror::Error;

thread_local! {
    static INLINE: Cell<bool> = const { Cell::new(false) };
}

/// Blocking work could not run to completion (its task panicked or was
/// cancelled).
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("blocking task failed: {0}")]
pub struct BlockingError(pub String);

/// Run blocking work on this thread, inline, from now on (`true`), or on
/// tokio's blocking pool again (`false`, the default). For deterministic
/// simulations on a current-thread runtime.
pub fn set_inline_on_this_thread(inline: bool) {
    INLINE.with(|c| c.set(inline));
}

/// Whether blocking work runs inline on this thread.
pub fn is_inline() -> bool {
    INLINE.with(Cell::get)
}

/// Run `f` off the async threads (or inline, see
/// [`set_inline_on_this_thread`]) and return its result. Once started, `f`
/// runs to its end even if the caller is dropped.
pub async fn run<R, F>(f: F) -> Result<R, BlockingError>
where
    F: FnOnce() -> R + Send + 'static,
    R: Send + 'static,
{
    if is_inline() {
        return Ok(f());
    }
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| BlockingError(e.to_string()))
}

/// Drop `value` off the async threads and off the caller's path, without
/// waiting for it (freeing many small allocations takes a while): on
/// tokio's blocking pool, or here when blocking work runs inline (see
/// [`set_inline_on_this_thread`]) or no runtime is running.
pub fn release<T: Send + 'static>(value: T) {
    if is_inline() {
        return drop(value);
    }
    match tokio::runtime::Handle::try_current() {
        // The task's handle is not needed: it only drops.
        Ok(runtime) => drop(runtime.spawn_blocking(move || drop(value))),
        Err(_) => drop(value),
    }
}
