//! The sending side of one download stream: every line waits for room in
//! the stream's byte budget, and every wait ends at shutdown, at the
//! token's expiry or when the client left, whether or not the client reads.
//! A user's streams also share one budget ([`UserBuffers`]).

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ferry_protocol::{ErrorCode, ServerError, StreamLine};
use ferry_transport::ServerLine;
use tokio::sync::{mpsc, watch};
use tokio::time::Sleep;

/// Why a stream stops sending.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Stop {
    /// The client went away (the receiver was dropped).
    Left,
    /// The server is shutting down.
    ShuttingDown,
    /// The token expired.
    Expired,
}

/// A line as it goes into a stream's channel, with its size as a
/// transport writes it (newline included).
pub(crate) trait LineBytes: Sized {
    /// The line to send and its encoded size. A transport's line is
    /// encoded here, once: the size is its length, and the transport
    /// passes the bytes on.
    fn sized(self) -> (Self, usize);
}

impl LineBytes for StreamLine {
    fn sized(self) -> (Self, usize) {
        let size = crate::service::encoded_bytes(&self).saturating_add(1);
        (self, size)
    }
}

impl LineBytes for ServerLine {
    fn sized(self) -> (Self, usize) {
        let bytes = self.into_bytes();
        let size = bytes.len();
        (ServerLine::Encoded(bytes), size)
    }
}

/// The bytes of lines each user's streams hold in their channels, shared
/// by that user's streams within `max_bytes` (a user who opens many
/// streams and reads none pins at most that, plus one line per stream).
///
/// A stream learns which of its lines the transport took when it sends
/// its next line (it measures its channel then, see [`StreamSender`]), so
/// lines already read stay counted until then: at most until its next
/// keepalive. Meanwhile they only make the user's other streams send
/// one line at a time, never stop them.
#[derive(Debug)]
pub(crate) struct UserBuffers {
    /// Users with an open stream, and what their streams hold.
    users: parking_lot::Mutex<HashMap<String, Arc<AtomicUsize>>>,
    /// What every stream holds.
    total_bytes: AtomicUsize,
    max_bytes: usize,
}

impl UserBuffers {
    pub(crate) fn new(max_bytes: usize) -> Self {
        UserBuffers {
            users: parking_lot::Mutex::new(HashMap::new()),
            total_bytes: AtomicUsize::new(0),
            max_bytes,
        }
    }

    /// A stream of `user` joins the user's budget (until it is dropped).
    pub(crate) fn join(&self, user: &str) -> UserShare<'_> {
        let used = self.users.lock().entry(user.to_owned()).or_default().clone();
        UserShare {
            buffers: self,
            user: user.to_owned(),
            used,
            mine_bytes: 0,
        }
    }

    /// Bytes every stream holds in its channel now.
    pub(crate) fn total_bytes(&self) -> usize {
        self.total_bytes.load(Ordering::Relaxed)
    }
}

/// One stream's part of its user's budget: what it holds is counted in
/// the user's total until it is dropped.
#[derive(Debug)]
pub(crate) struct UserShare<'a> {
    buffers: &'a UserBuffers,
    user: String,
    /// What the user's streams hold (shared with them).
    used: Arc<AtomicUsize>,
    /// What this stream holds (its part of `used`).
    mine_bytes: usize,
}

impl UserShare<'_> {
    /// Whether `bytes` more fit in the user's budget now.
    fn fits(&self, bytes: usize) -> bool {
        self.used.load(Ordering::Relaxed).saturating_add(bytes) <= self.buffers.max_bytes
    }

    fn add(&mut self, bytes: usize) {
        self.mine_bytes = self.mine_bytes.saturating_add(bytes);
        self.used.fetch_add(bytes, Ordering::Relaxed);
        self.buffers.total_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    fn remove(&mut self, bytes: usize) {
        // Never more than this stream added: the shared counts stay exact.
        let bytes = bytes.min(self.mine_bytes);
        self.mine_bytes -= bytes;
        self.used.fetch_sub(bytes, Ordering::Relaxed);
        self.buffers.total_bytes.fetch_sub(bytes, Ordering::Relaxed);
    }
}

impl Drop for UserShare<'_> {
    fn drop(&mut self) {
        self.remove(self.mine_bytes);
        // The user's entry goes with their last stream (joins take the
        // same lock, so none joins in between).
        let mut users = self.buffers.users.lock();
        if Arc::strong_count(&self.used) == 2 {
            users.remove(&self.user);
        }
    }
}

/// Sends a stream's lines into its channel within `channel_budget_bytes`
/// of lines the transport has not taken yet.
///
/// The channel's lines are measured without the receiver's help: the
/// channel holds the newest `max_capacity - capacity` lines sent (it is
/// first in, first out), whose sizes are kept here.
pub(crate) struct StreamSender<'a, L> {
    tx: &'a mpsc::Sender<L>,
    /// Sizes of the lines sent, newest last; trimmed to the lines still
    /// in the channel.
    sizes: VecDeque<usize>,
    /// The sum of `sizes`.
    sizes_sum_bytes: usize,
    channel_budget_bytes: usize,
    /// The user's budget, which `sizes_sum_bytes` is part of.
    share: UserShare<'a>,
    shutdown: watch::Receiver<bool>,
    expiry: Pin<Box<Sleep>>,
    exp_s: u64,
}

impl<'a, L: LineBytes + From<StreamLine> + Send> StreamSender<'a, L> {
    pub(crate) fn new(
        tx: &'a mpsc::Sender<L>,
        channel_budget_bytes: usize,
        share: UserShare<'a>,
        shutdown: watch::Receiver<bool>,
        expires_in: Duration,
        exp_s: u64,
    ) -> Self {
        StreamSender {
            tx,
            sizes: VecDeque::new(),
            sizes_sum_bytes: 0,
            channel_budget_bytes,
            share,
            shutdown,
            expiry: Box::pin(tokio::time::sleep(expires_in)),
            exp_s,
        }
    }

    /// Whether `bytes` more fit in the stream's budget and its user's now
    /// (or the channel is empty: a line larger than the budget goes
    /// alone, and a stream whose client reads is never held up by other
    /// streams of its user for longer than its own channel takes to
    /// empty).
    fn fits(&mut self, bytes: usize) -> bool {
        // The channel's lines now: the sizes of the others were taken.
        let lines = self.tx.max_capacity().saturating_sub(self.tx.capacity());
        while self.sizes.len() > lines {
            if let Some(size) = self.sizes.pop_front() {
                self.sizes_sum_bytes = self.sizes_sum_bytes.saturating_sub(size);
                self.share.remove(size);
            }
        }
        lines == 0
            || (self.sizes_sum_bytes.saturating_add(bytes) <= self.channel_budget_bytes && self.share.fits(bytes))
    }

    /// Resolves when the stream must stop whatever it is doing: shutdown
    /// or token expiry.
    pub(crate) async fn stopped(&mut self) -> Stop {
        tokio::select! {
            biased;
            _ = self.shutdown.wait_for(|s| *s) => Stop::ShuttingDown,
            () = &mut self.expiry => Stop::Expired,
        }
    }

    /// Wait until `bytes` more fit in the budget (or the channel is
    /// empty: a line larger than the budget goes alone).
    pub(crate) async fn room_for(&mut self, bytes: usize) -> Result<(), Stop> {
        loop {
            if *self.shutdown.borrow() {
                return Err(Stop::ShuttingDown);
            }
            if self.fits(bytes) {
                return Ok(());
            }
            // Wait for the transport to take one line: one slot more free
            // than now. The permits are given back at once. The transport
            // may have taken every line since `fits` looked: then there
            // is nothing to wait for (and asking for more permits than the
            // channel has would fail as if the client had left).
            let free = self.tx.capacity();
            if free >= self.tx.max_capacity() {
                continue;
            }
            let tx = self.tx;
            tokio::select! {
                biased;
                stop = self.stopped() => return Err(stop),
                taken = tx.reserve_many(free + 1) => {
                    if taken.is_err() {
                        return Err(Stop::Left);
                    }
                }
            }
        }
    }

    /// Send one line once it fits the budget.
    pub(crate) async fn send(&mut self, line: L) -> Result<(), Stop> {
        let (mut line, size) = line.sized();
        // The common case, without a wait: the line fits the budget and
        // the channel has a slot. The stops a wait would watch are looked
        // at here (a stream busy with commits must still end on time).
        if *self.shutdown.borrow() {
            return Err(Stop::ShuttingDown);
        }
        if self.expiry.is_elapsed() {
            return Err(Stop::Expired);
        }
        if self.fits(size) {
            match self.tx.try_send(line) {
                Ok(()) => {
                    self.sent(size);
                    return Ok(());
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return Err(Stop::Left),
                Err(mpsc::error::TrySendError::Full(back)) => line = back,
            }
        }
        self.room_for(size).await?;
        let tx = self.tx;
        tokio::select! {
            biased;
            stop = self.stopped() => return Err(stop),
            sent = tx.send(line) => sent.map_err(|_| Stop::Left)?,
        }
        self.sent(size);
        Ok(())
    }

    /// Count a line of `size` bytes sent.
    fn sent(&mut self, size: usize) {
        self.sizes.push_back(size);
        self.sizes_sum_bytes = self.sizes_sum_bytes.saturating_add(size);
        self.share.add(size);
    }

    /// End the stream for `stop`: a `shutting_down` or `unauthorized`
    /// (token expired) line if the channel has room for it now, and
    /// nothing more. A client that does not read never gets it, and the
    /// transport closes its connection.
    pub(crate) fn end(&self, stop: Stop) {
        let error = match stop {
            Stop::Left => return,
            Stop::ShuttingDown => ServerError {
                code: ErrorCode::ShuttingDown,
                message: "server is shutting down".into(),
            },
            Stop::Expired => ServerError {
                code: ErrorCode::Unauthorized,
                message: format!("token expired at {}", self.exp_s),
            },
        };
        let _ = self.tx.try_send(StreamLine::Error(error).into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lines sent within a budget of about one line, while the transport
    /// takes them as fast as it can on another thread, all arrive: the
    /// transport emptying the channel while a send waits for room is not
    /// the client leaving.
    #[test]
    fn a_transport_that_empties_the_channel_mid_wait_gets_every_line() {
        const LINES: usize = 100_000;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let (tx, mut rx) = mpsc::channel::<StreamLine>(4);
            let (_shutdown_tx, shutdown) = watch::channel(false);
            let reader = tokio::spawn(async move {
                let mut n = 0usize;
                while rx.recv().await.is_some() {
                    n += 1;
                }
                n
            });
            let line = || StreamLine::Keepalive { token_expires_in_s: 60 };
            let budget = line().sized().1 + 1;
            let users = UserBuffers::new(budget);
            let mut out = StreamSender::new(&tx, budget, users.join("u"), shutdown, Duration::from_secs(600), 0);
            for i in 0..LINES {
                if let Err(stop) = out.send(line()).await {
                    panic!("line {i} of {LINES} was not sent: {stop:?}");
                }
            }
            drop(out);
            drop(tx);
            assert_eq!(reader.await.expect("reader"), LINES);
        });
    }
}
