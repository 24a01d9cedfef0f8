//! The in-memory transport: a client talks to a [`SyncHandler`] in the
//! same process, through the same bytes the wire would carry.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use ferry_protocol::{decode_line, encode_line, StreamRequest, UploadRequest, DEFAULT_MAX_LINE_BYTES};

use crate::{LineStream, ServerLineStream, SyncHandler, Transport, TransportError};

/// Connects a client to a handler in-process.
#[derive(Clone)]
pub struct MemoryTransport {
    handler: Arc<dyn SyncHandler>,
    max_message_bytes: usize,
}

impl fmt::Debug for MemoryTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryTransport").finish_non_exhaustive()
    }
}

impl MemoryTransport {
    /// A transport to `handler`.
    pub fn new(handler: Arc<dyn SyncHandler>) -> Self {
        MemoryTransport {
            handler,
            max_message_bytes: DEFAULT_MAX_LINE_BYTES,
        }
    }
}

struct MemoryLines {
    rx: ServerLineStream,
}

#[async_trait]
impl LineStream for MemoryLines {
    async fn next_line(&mut self) -> Result<Option<Vec<u8>>, TransportError> {
        Ok(self.rx.recv().await.map(|line| {
            let mut bytes = line.into_bytes();
            bytes.pop(); // the newline: lines are handed out without it
            bytes
        }))
    }
}

#[async_trait]
impl Transport for MemoryTransport {
    async fn open_stream(&self, token: &str, request: Vec<u8>) -> Result<Box<dyn LineStream>, TransportError> {
        let request: StreamRequest =
            decode_line(&request, self.max_message_bytes).map_err(|e| TransportError::Refused(e.to_string()))?;
        let rx = self
            .handler
            .stream_lines(token, request)
            .await
            .map_err(|e| TransportError::from_server(&e))?;
        Ok(Box::new(MemoryLines { rx }))
    }

    async fn upload(&self, token: &str, request: Vec<u8>) -> Result<Vec<u8>, TransportError> {
        let request: UploadRequest =
            decode_line(&request, self.max_message_bytes).map_err(|e| TransportError::Refused(e.to_string()))?;
        let response = self
            .handler
            .upload(token, request)
            .await
            .map_err(|e| TransportError::from_server(&e))?;
        let mut bytes = encode_line(&response);
        bytes.pop();
        Ok(bytes)
    }
}
