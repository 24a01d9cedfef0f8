//! How protocol bytes move between a client and a sync server.
//!
//! - [`Transport`] is the client's side: open a download stream, upload a
//!   batch. It moves bytes only: the request and answer documents and the
//!   stream's lines are produced and parsed by `ferry-protocol`.
//! - [`SyncHandler`] is the server's side, in typed messages: any server
//!   (the real one, a test double) implements it, and every transport
//!   (in-memory here, HTTP in `ferry-http`) carries bytes to and from it.
//! - [`MemoryTransport`] connects a client to a handler in-process,
//!   encoding and decoding every message as the wire would.
//! - [`FaultyTransport`] wraps any transport and injects seeded faults.
//! - [`Backoff`] is the reconnect policy: exponential with jitter.
//!
//! Invariants: transports never interpret the protocol beyond framing;
//! faults are drawn from a seed, so a failing run replays.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use ferry_core::ErrorKind;
use ferry_protocol::{
    encode_stream_line, ErrorCode, ServerError, StreamLine, StreamRequest, UploadRequest, UploadResponse,
};
use thiserror::Error;

mod backoff;
pub mod blocking;
mod faulty;
mod memory;

pub use backoff::Backoff;
pub use faulty::{FaultConfig, FaultyTransport};
pub use memory::MemoryTransport;

/// Transport failures.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum TransportError {
    /// The server refused the credentials: fetch new ones before retrying.
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    /// The server refused the request as malformed or too large; retrying
    /// the same bytes will fail again.
    #[error("request refused: {0}")]
    Refused(String),
    /// The connection failed or dropped.
    #[error("connection failed: {0}")]
    Connection(String),
    /// The server failed; retrying may help.
    #[error("server failed: {0}")]
    Server(String),
}

impl TransportError {
    /// Whether retrying (after backoff, with fresh credentials for
    /// `Unauthorized`) can help.
    pub fn kind(&self) -> ErrorKind {
        match self {
            TransportError::Refused(_) => ErrorKind::Permanent,
            _ => ErrorKind::Transient,
        }
    }

    /// The transport error for a server error answer.
    pub fn from_server(e: &ServerError) -> Self {
        match e.code {
            ErrorCode::Unauthorized => TransportError::Unauthorized(e.message.clone()),
            ErrorCode::BadRequest | ErrorCode::TooLarge => TransportError::Refused(e.message.clone()),
            ErrorCode::Internal | ErrorCode::ShuttingDown | ErrorCode::Busy | ErrorCode::RateLimited => {
                TransportError::Server(e.message.clone())
            }
        }
    }
}

/// The lines of one open download stream.
#[async_trait]
pub trait LineStream: Send {
    /// The next line (without its newline), or `None` when the server ended
    /// the stream.
    async fn next_line(&mut self) -> Result<Option<Vec<u8>>, TransportError>;
}

/// The client's side of a connection to a sync server.
#[async_trait]
pub trait Transport: Send + Sync + fmt::Debug {
    /// Open the download stream with a JSON [`StreamRequest`] document.
    async fn open_stream(&self, token: &str, request: Vec<u8>) -> Result<Box<dyn LineStream>, TransportError>;

    /// Send a JSON [`UploadRequest`] document; get the JSON
    /// [`UploadResponse`] document back.
    async fn upload(&self, token: &str, request: Vec<u8>) -> Result<Vec<u8>, TransportError>;
}

#[async_trait]
impl<T: Transport + ?Sized> Transport for Arc<T> {
    async fn open_stream(&self, token: &str, request: Vec<u8>) -> Result<Box<dyn LineStream>, TransportError> {
        (**self).open_stream(token, request).await
    }

    async fn upload(&self, token: &str, request: Vec<u8>) -> Result<Vec<u8>, TransportError> {
        (**self).upload(token, request).await
    }
}

/// Lines a server pushes to one client; dropping the receiver tells the
/// server the client went away.
pub type ServerLines = tokio::sync::mpsc::Receiver<StreamLine>;

/// One download stream line as a server hands it to a transport: typed,
/// or already encoded by the server (typically `data` lines, which a
/// server can assemble from stored JSON without building typed rows).
#[derive(Clone, Debug, PartialEq)]
pub enum ServerLine {
    /// A typed line: the transport encodes it with
    /// `ferry_protocol::encode_line`.
    Line(StreamLine),
    /// Exactly the bytes `ferry_protocol::encode_line` would produce for
    /// one [`StreamLine`]: one JSON object and its trailing newline. The
    /// transport passes them on unchanged.
    Encoded(Vec<u8>),
}

impl ServerLine {
    /// The line's bytes, newline included.
    pub fn into_bytes(self) -> Vec<u8> {
        match self {
            ServerLine::Line(line) => encode_stream_line(&line),
            ServerLine::Encoded(bytes) => bytes,
        }
    }
}

impl From<StreamLine> for ServerLine {
    fn from(line: StreamLine) -> Self {
        ServerLine::Line(line)
    }
}

/// The lines of one stream as transports take them (see
/// [`SyncHandler::stream_lines`]); dropping the receiver tells the server
/// the client went away.
pub type ServerLineStream = tokio::sync::mpsc::Receiver<ServerLine>;

/// Lines forwarded from a typed stream to a [`ServerLineStream`] at once.
const FORWARD_BUFFER_LINES: usize = 8;

/// Forward a typed stream's lines as [`ServerLine::Line`]s. The forwarder
/// ends (dropping `typed`, which the server observes) as soon as the
/// returned receiver is dropped, even while the server sends nothing.
pub fn forward_typed(mut typed: ServerLines) -> ServerLineStream {
    let (tx, rx) = tokio::sync::mpsc::channel(FORWARD_BUFFER_LINES);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                biased;
                () = tx.closed() => return,
                line = typed.recv() => {
                    let Some(line) = line else { return };
                    if tx.send(ServerLine::Line(line)).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    rx
}

/// The server's side, in typed messages.
#[async_trait]
pub trait SyncHandler: Send + Sync {
    /// Open a download stream for the bearer `token`. Lines flow until the
    /// server ends the stream (dropping its sender, possibly after an
    /// `error` line) or the client drops the receiver.
    async fn stream(&self, token: &str, request: StreamRequest) -> Result<ServerLines, ServerError>;

    /// The same stream as [`SyncHandler::stream`], with lines the server
    /// may have encoded already: what transports call. The lines decode
    /// to exactly what `stream` would send. The default forwards `stream`'s
    /// typed lines ([`forward_typed`]); a server that can produce encoded
    /// lines more cheaply overrides it.
    async fn stream_lines(&self, token: &str, request: StreamRequest) -> Result<ServerLineStream, ServerError> {
        Ok(forward_typed(self.stream(token, request).await?))
    }

    /// Process an upload for the bearer `token`.
    async fn upload(&self, token: &str, request: UploadRequest) -> Result<UploadResponse, ServerError>;
}
