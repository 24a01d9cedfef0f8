//! The line codec of the download stream: one JSON object per line.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::ProtocolError;

/// Longest stream line accepted by default (a data line carries many rows).
pub const DEFAULT_MAX_LINE_BYTES: usize = 16 * 1024 * 1024;

/// Encode a message as one line, newline included.
pub fn encode_line<T: Serialize>(msg: &T) -> Vec<u8> {
    // Serializing the protocol's types cannot fail: every map key is a
    // string and serde_json writes non-finite floats as null. The fallback
    // only keeps this total.
    let mut out = serde_json::to_vec(msg).unwrap_or_else(|_| b"{}".to_vec());
    out.push(b'\n');
    out
}

/// Decode one line (without or with its trailing newline).
pub fn decode_line<T: DeserializeOwned>(line: &[u8], max_line_bytes: usize) -> Result<T, ProtocolError> {
    // The limit counts the line without its newline, as `LineSplitter` does.
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    if line.len() > max_line_bytes {
        return Err(ProtocolError::LineTooLong {
            len: line.len(),
            limit: max_line_bytes,
        });
    }
    serde_json::from_slice(line).map_err(|e| ProtocolError::Malformed(e.to_string()))
}

/// Splits a byte stream into lines, keeping a partial line between chunks
/// and refusing lines over the limit.
#[derive(Debug)]
pub struct LineSplitter {
    buf: Vec<u8>,
    max_line_bytes: usize,
}

impl LineSplitter {
    /// A splitter with a line limit.
    pub fn new(max_line_bytes: usize) -> Self {
        LineSplitter {
            buf: Vec::new(),
            max_line_bytes,
        }
    }

    /// Add bytes; return every complete line (without newlines).
    pub fn push(&mut self, chunk: &[u8]) -> Result<Vec<Vec<u8>>, ProtocolError> {
        let mut lines = Vec::new();
        let mut rest = chunk;
        while let Some(pos) = rest.iter().position(|b| *b == b'\n') {
            let (head, tail) = rest.split_at(pos);
            self.buf.extend_from_slice(head);
            self.check()?;
            let line = std::mem::take(&mut self.buf);
            if !line.is_empty() {
                lines.push(line);
            }
            rest = &tail[1..];
        }
        self.buf.extend_from_slice(rest);
        self.check()?;
        Ok(lines)
    }

    /// Bytes of an unfinished line.
    pub fn pending_bytes(&self) -> usize {
        self.buf.len()
    }

    fn check(&self) -> Result<(), ProtocolError> {
        if self.buf.len() > self.max_line_bytes {
            return Err(ProtocolError::LineTooLong {
                len: self.buf.len(),
                limit: self.max_line_bytes,
            });
        }
        Ok(())
    }
}
