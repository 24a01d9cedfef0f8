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
use ferry_protocol::{ErrorCode, ServerError, StreamLine, StreamRequest, UploadRequest, UploadResponse};
use thiserror::Error;

mod backoff;
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
            ErrorCode::Internal | ErrorCode::ShuttingDown => TransportError::Server(e.message.clone()),
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

/// The server's side, in typed messages.
#[async_trait]
pub trait SyncHandler: Send + Sync {
    /// Open a download stream for the bearer `token`. Lines flow until the
    /// server ends the stream (dropping its sender, possibly after an
    /// `error` line) or the client drops the receiver.
    async fn stream(&self, token: &str, request: StreamRequest) -> Result<ServerLines, ServerError>;

    /// Process an upload for the bearer `token`.
    async fn upload(&self, token: &str, request: UploadRequest) -> Result<UploadResponse, ServerError>;
}
