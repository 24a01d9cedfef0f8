//! The lines of a download stream, decoded off the handling task.
//!
//! A reader task receives each line. A short one it decodes at once; a
//! long one (a `data` line of thousands of ops takes milliseconds) goes to
//! the stream's decoder thread, so receiving, decoding and handling
//! overlap. Lines come out in stream order.
//!
//! One thread decodes every long line of a stream, rather than whichever
//! pool thread is free: the allocator keeps an arena per thread, and rows
//! decoded on ever-changing threads left every arena as large as the data
//! in flight (the client's peak memory grew with the number of threads,
//! not with the data).

use ferry_protocol::{decode_line, ProtocolError, StreamLine};
use ferry_transport::{blocking, LineStream, TransportError};
use tokio::sync::{mpsc, oneshot};

use crate::ClientError;

/// Lines whose decoding may run ahead of the one being handled.
const MAX_PARSES_AHEAD: usize = 1;

/// Lines shorter than this are decoded on the reader task: a thread hop
/// would cost more than it saves (and add latency to small changes).
const MAX_INLINE_DECODE_BYTES: usize = 64 * 1024;

type Decoded = Result<StreamLine, ProtocolError>;

/// A long line for the decoder thread, and where its result goes.
struct Job {
    line: Vec<u8>,
    reply: oneshot::Sender<Decoded>,
}

/// A received line, decoded or being decoded.
enum Parse {
    /// Decoded on the reader task (a short line).
    Ready(Decoded),
    /// Being decoded on the decoder thread (a long line).
    Pending(oneshot::Receiver<Decoded>),
}

/// The decoded lines of one stream. Dropping this stops the reader, which
/// drops the stream and ends the decoder thread.
pub(crate) struct ParsedLines {
    parses: mpsc::Receiver<Result<Parse, TransportError>>,
    reader: tokio::task::JoinHandle<()>,
}

impl ParsedLines {
    pub(crate) fn start(mut stream: Box<dyn LineStream>, max_line_bytes: usize) -> Self {
        let (tx, parses) = mpsc::channel(MAX_PARSES_AHEAD);
        // A deterministic simulation decodes everything inline: no thread.
        let decoder = if blocking::is_inline() {
            None
        } else {
            spawn_decoder(max_line_bytes)
        };
        let reader = tokio::spawn(async move {
            loop {
                let next = match stream.next_line().await {
                    Ok(Some(line)) => match &decoder {
                        Some(jobs) if line.len() >= MAX_INLINE_DECODE_BYTES => {
                            let (reply, result) = oneshot::channel();
                            match jobs.send(Job { line, reply }) {
                                Ok(()) => Ok(Parse::Pending(result)),
                                // The thread is gone: decode here.
                                Err(std::sync::mpsc::SendError(job)) => {
                                    Ok(Parse::Ready(decode_line::<StreamLine>(&job.line, max_line_bytes)))
                                }
                            }
                        }
                        _ => Ok(Parse::Ready(decode_line::<StreamLine>(&line, max_line_bytes))),
                    },
                    Ok(None) => return,
                    Err(e) => Err(e),
                };
                let failed = next.is_err();
                if tx.send(next).await.is_err() || failed {
                    return;
                }
            }
        });
        ParsedLines { parses, reader }
    }

    /// The next line, `None` when the server ended the stream.
    pub(crate) async fn next(&mut self) -> Result<Option<StreamLine>, ClientError> {
        let Some(parse) = self.parses.recv().await else {
            return Ok(None);
        };
        let line = match parse? {
            Parse::Ready(line) => line?,
            Parse::Pending(result) => result
                .await
                .map_err(|_| ClientError::Task("the line decoder stopped".into()))??,
        };
        Ok(Some(line))
    }
}

impl Drop for ParsedLines {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// Start a decoder thread (`None` if the system refused one: lines are
/// then decoded on the reader task); it ends when the returned sender is
/// dropped. Jobs wait in an unbounded channel, but the reader sends one
/// only per line it can hand on: at most [`MAX_PARSES_AHEAD`] plus one
/// are queued.
fn spawn_decoder(max_line_bytes: usize) -> Option<std::sync::mpsc::Sender<Job>> {
    let (jobs, rx) = std::sync::mpsc::channel::<Job>();
    let spawned = std::thread::Builder::new().name("ferry-decode".into()).spawn(move || {
        while let Ok(Job { line, reply }) = rx.recv() {
            let decoded = decode_line::<StreamLine>(&line, max_line_bytes);
            drop(line);
            // The reader may be gone (stream dropped): nothing to do.
            let _ = reply.send(decoded);
        }
    });
    match spawned {
        Ok(_) => Some(jobs),
        Err(e) => {
            tracing::warn!(error = %e, "starting the line decoder thread failed: decoding on the reader");
            None
        }
    }
}
