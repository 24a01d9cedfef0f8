//! The body of a download stream: the handler's lines, coalesced into
//! chunks, one chunk in the connection at a time; and the watch that
//! closes a connection whose stream ended while its client does not read.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use ferry_transport::ServerLineStream;
use futures_util::task::AtomicWaker;

use crate::server::{ConnHandle, StreamSlot};

/// Lines already waiting in the handler's channel are written together, up
/// to this many bytes per chunk, so a fast producer costs fewer writes.
const MAX_CHUNK_BYTES: usize = 256 * 1024;

/// The least room a chunk of several lines is given when the first
/// line's buffer is full (a checkpoint's diff, data and end lines fit).
const CHUNK_START_BYTES: usize = 4 * 1024;

/// How often the watch checks whether handlers ended their streams.
const STREAM_END_CHECK_MS: u64 = 250;

/// The body of a download stream: each line encoded, lines already queued
/// coalesced into one chunk of at most [`MAX_CHUNK_BYTES`] (a longer line
/// is its own chunk, without a copy). Dropping the body (the client went
/// away) drops the receiver, which the handler's sender observes, and the
/// user's stream slot.
///
/// One chunk at a time: the next line is taken from the handler only once
/// the connection wrote the previous chunk to the socket (hyper drops it),
/// so a client that stops reading leaves at most one chunk here and the
/// handler's lines in its channel, which the handler bounds. When the
/// handler ended the stream, the connection is closed unless the rest
/// reaches the client within `end_timeout` (the body's own end, or the
/// [`StreamEnds`] watch while hyper does not poll the body).
pub(crate) struct LineBody {
    rx: Arc<parking_lot::Mutex<ServerLineStream>>,
    _slot: Option<StreamSlot>,
    conn: Option<ConnHandle>,
    end_timeout: Duration,
    /// A line taken that did not fit the last chunk.
    carry: Option<Vec<u8>>,
    /// The chunk the connection has not written yet.
    in_flight: Arc<InFlight>,
    ended: bool,
}

/// Whether a chunk is held by the connection, and who to wake when it is
/// dropped.
#[derive(Default)]
struct InFlight {
    held: AtomicBool,
    waker: AtomicWaker,
}

impl LineBody {
    pub(crate) fn new(
        rx: ServerLineStream,
        slot: Option<StreamSlot>,
        conn: Option<ConnHandle>,
        end_timeout: Duration,
        ends: &Arc<StreamEnds>,
    ) -> Self {
        let rx = Arc::new(parking_lot::Mutex::new(rx));
        if let Some(conn) = &conn {
            // hyper polls the body only when the socket takes more: a
            // stalled client's stream is watched from outside.
            ends.watch(Arc::downgrade(&rx), conn.clone(), end_timeout);
        }
        LineBody {
            rx,
            _slot: slot,
            conn,
            end_timeout,
            carry: None,
            in_flight: Arc::default(),
            ended: false,
        }
    }
}

impl futures_util::Stream for LineBody {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.ended {
            return Poll::Ready(None);
        }
        // The previous chunk must be written (hyper dropped it) first. The
        // waker is registered before the second look, so a drop between
        // the two is not missed.
        if this.in_flight.held.load(Ordering::Acquire) {
            this.in_flight.waker.register(cx.waker());
            if this.in_flight.held.load(Ordering::Acquire) {
                return Poll::Pending;
            }
        }
        let mut rx = this.rx.lock();
        let mut chunk = match this.carry.take() {
            Some(line) => line,
            None => match rx.poll_recv(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(line)) => line.into_bytes(),
                Poll::Ready(None) => {
                    drop(rx);
                    this.ended = true;
                    if let Some(conn) = &this.conn {
                        conn.close_within(this.end_timeout);
                    }
                    return Poll::Ready(None);
                }
            },
        };
        while chunk.len() < MAX_CHUNK_BYTES {
            match rx.try_recv() {
                Ok(line) => {
                    let line = line.into_bytes();
                    if chunk.len() + line.len() > MAX_CHUNK_BYTES {
                        this.carry = Some(line);
                        break;
                    }
                    if chunk.capacity() - chunk.len() < line.len() {
                        // Room for the lines likely to follow too: one
                        // allocation instead of one per line.
                        let want = (chunk.len() + line.len()).max(CHUNK_START_BYTES);
                        chunk.reserve(want.min(MAX_CHUNK_BYTES) - chunk.len());
                    }
                    chunk.extend_from_slice(&line);
                }
                Err(_) => break,
            }
        }
        drop(rx);
        this.in_flight.held.store(true, Ordering::Release);
        let chunk = Bytes::from_owner(Chunk {
            bytes: chunk,
            in_flight: this.in_flight.clone(),
        });
        Poll::Ready(Some(Ok(chunk)))
    }
}

/// A chunk of the stream body; the body takes the next line once hyper
/// dropped it (written to the socket, or the connection closed).
struct Chunk {
    bytes: Vec<u8>,
    in_flight: Arc<InFlight>,
}

impl AsRef<[u8]> for Chunk {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        self.in_flight.held.store(false, Ordering::Release);
        self.in_flight.waker.wake();
    }
}

/// The streams of one server whose end a connection must see even while
/// hyper does not poll their body (a client that stopped reading): one
/// task looks at all of them every [`STREAM_END_CHECK_MS`] (not a timer
/// per stream), and closes the connection of a stream its handler ended
/// unless the rest reaches the client within the stream's end timeout.
/// The task runs while some stream is watched.
#[derive(Default)]
pub(crate) struct StreamEnds {
    watched: parking_lot::Mutex<Watched>,
}

impl std::fmt::Debug for StreamEnds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamEnds")
            .field("streams", &self.watched.lock().streams.len())
            .finish()
    }
}

#[derive(Default)]
struct Watched {
    streams: Vec<WatchedStream>,
    /// Whether the checking task runs.
    checking: bool,
}

struct WatchedStream {
    /// Gone with the body.
    rx: Weak<parking_lot::Mutex<ServerLineStream>>,
    conn: ConnHandle,
    end_timeout: Duration,
}

impl StreamEnds {
    fn watch(
        self: &Arc<Self>,
        rx: Weak<parking_lot::Mutex<ServerLineStream>>,
        conn: ConnHandle,
        end_timeout: Duration,
    ) {
        let mut watched = self.watched.lock();
        watched.streams.push(WatchedStream { rx, conn, end_timeout });
        if !watched.checking {
            watched.checking = true;
            tokio::spawn(self.clone().check());
        }
    }

    /// Until no stream is watched: forget the bodies that are gone, and
    /// close the connections of the streams their handlers ended.
    async fn check(self: Arc<Self>) {
        loop {
            tokio::time::sleep(Duration::from_millis(STREAM_END_CHECK_MS)).await;
            let mut watched = self.watched.lock();
            watched.streams.retain(|s| {
                let Some(rx) = s.rx.upgrade() else { return false };
                // Held by the body only while it takes lines: then the
                // body sees the end itself.
                let ended = rx.try_lock().is_some_and(|rx| rx.is_closed());
                if ended {
                    s.conn.close_within(s.end_timeout);
                }
                !ended
            });
            if watched.streams.is_empty() {
                watched.checking = false;
                return;
            }
        }
    }
}
