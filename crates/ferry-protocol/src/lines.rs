//! The line codec of the download stream: one JSON object per line.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::ProtocolError;
use crate::messages::StreamLine;
use ferry_core::json::push_json_str;

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

/// Encode a stream line, newline included: exactly the bytes of
/// [`encode_line`], written without serde's machinery for the lines every
/// stream sends on every commit (a diff, the checkpoint's end, a
/// keepalive); other lines go through [`encode_line`].
pub fn encode_stream_line(line: &StreamLine) -> Vec<u8> {
    use ferry_core::json::{push_hlc, push_u64};
    match line {
        StreamLine::CheckpointDiff(d) => {
            let mut out = Vec::with_capacity(160 + 64 * d.updated_buckets.len());
            out.extend_from_slice(b"{\"checkpoint_diff\":{\"last_op_id\":");
            push_u64(&mut out, d.last_op_id);
            if let Some(w) = d.write_checkpoint {
                out.extend_from_slice(b",\"write_checkpoint\":");
                push_u64(&mut out, w);
            }
            out.extend_from_slice(b",\"updated_buckets\":[");
            for (i, b) in d.updated_buckets.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(b"{\"bucket\":");
                push_json_str(&mut out, &b.bucket);
                out.extend_from_slice(b",\"checksum\":");
                push_u64(&mut out, u64::from(b.checksum));
                out.extend_from_slice(b",\"count\":");
                push_u64(&mut out, b.count);
                out.push(b'}');
            }
            out.extend_from_slice(b"],\"removed_buckets\":[");
            for (i, b) in d.removed_buckets.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                push_json_str(&mut out, b);
            }
            out.push(b']');
            if let Some(hlc) = &d.hlc {
                out.extend_from_slice(b",\"hlc\":");
                push_hlc(&mut out, hlc);
            }
            out.extend_from_slice(b"}}\n");
            out
        }
        StreamLine::CheckpointComplete { last_op_id } => {
            one_number_line(b"{\"checkpoint_complete\":{\"last_op_id\":", *last_op_id)
        }
        StreamLine::Keepalive { token_expires_in_s } => {
            one_number_line(b"{\"keepalive\":{\"token_expires_in_s\":", *token_expires_in_s)
        }
        other => encode_line(other),
    }
}

/// A line of one object holding one number: `head` (up to the number),
/// the number, and the two closing braces with the newline.
fn one_number_line(head: &[u8], value: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(head.len() + 24);
    out.extend_from_slice(head);
    ferry_core::json::push_u64(&mut out, value);
    out.extend_from_slice(b"}}\n");
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

/// The position of the first newline, a word at a time.
fn find_newline(bytes: &[u8]) -> Option<usize> {
    const LANES: usize = 8;
    const ONES: u64 = u64::from_ne_bytes([0x01; LANES]);
    const HIGHS: u64 = u64::from_ne_bytes([0x80; LANES]);
    const NEWLINES: u64 = u64::from_ne_bytes([b'\n'; LANES]);
    let mut chunks = bytes.chunks_exact(LANES);
    let mut offset = 0;
    for chunk in chunks.by_ref() {
        let mut word = [0u8; LANES];
        word.copy_from_slice(chunk);
        let x = u64::from_ne_bytes(word) ^ NEWLINES;
        // Non-zero when some byte of `x` is zero (a newline in `chunk`).
        if x.wrapping_sub(ONES) & !x & HIGHS != 0 {
            return chunk.iter().position(|b| *b == b'\n').map(|p| offset + p);
        }
        offset += LANES;
    }
    chunks.remainder().iter().position(|b| *b == b'\n').map(|p| offset + p)
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
        while let Some(pos) = find_newline(rest) {
            let (head, tail) = rest.split_at(pos);
            self.buf.extend_from_slice(head);
            self.check()?;
            // The next line is likely about as long: reserve that much at
            // once instead of growing a large line step by step.
            let next_capacity = self.buf.len().min(self.max_line_bytes);
            let line = std::mem::replace(&mut self.buf, Vec::with_capacity(next_capacity));
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

#[cfg(test)]
mod tests {
    use super::{encode_line, encode_stream_line, find_newline};
    use crate::messages::{BucketChecksum, CheckpointDiff, StreamLine};
    use ferry_core::HlcTimestamp;

    /// The hand-written lines are byte for byte what serde writes,
    /// including names that need escapes and every optional field.
    #[test]
    fn hand_written_stream_lines_equal_serdes() {
        let odd = "q\"uo\\te\u{1}\n\u{e9}\u{1f600}/";
        let mut lines = vec![
            StreamLine::CheckpointComplete { last_op_id: 0 },
            StreamLine::CheckpointComplete { last_op_id: u64::MAX },
            StreamLine::Keepalive { token_expires_in_s: 17 },
        ];
        for write_checkpoint in [None, Some(0), Some(u64::MAX)] {
            for hlc in [
                None,
                Some(HlcTimestamp {
                    wall_ms: 1_733_000_000_123,
                    counter: 7,
                    node: "server-1".into(),
                }),
                Some(HlcTimestamp {
                    wall_ms: 0,
                    counter: u32::MAX,
                    node: odd.into(),
                }),
                Some(HlcTimestamp {
                    wall_ms: u64::MAX,
                    counter: 0,
                    node: String::new(),
                }),
            ] {
                for n in [0usize, 1, 3] {
                    lines.push(StreamLine::CheckpointDiff(CheckpointDiff {
                        last_op_id: 42,
                        write_checkpoint,
                        updated_buckets: (0..n)
                            .map(|i| BucketChecksum {
                                bucket: if i == 1 { odd.into() } else { format!("b{i}") },
                                checksum: u32::MAX - i as u32,
                                count: i as u64,
                            })
                            .collect(),
                        removed_buckets: (0..n)
                            .map(|i| if i == 2 { odd.into() } else { format!("r{i}") })
                            .collect(),
                        hlc: hlc.clone(),
                    }));
                }
            }
        }
        for line in &lines {
            assert_eq!(
                String::from_utf8_lossy(&encode_stream_line(line)),
                String::from_utf8_lossy(&encode_line(line)),
                "{line:?}"
            );
        }
    }

    #[test]
    fn find_newline_matches_a_plain_search() {
        let mut bytes: Vec<u8> = (0u8..=255).cycle().take(700).filter(|b| *b != b'\n').collect();
        for len in 0..40 {
            assert_eq!(find_newline(&bytes[..len]), None);
        }
        for at in [0, 1, 7, 8, 9, 15, 16, 17, 63, 64, 650] {
            let mut with = bytes.clone();
            with[at] = b'\n';
            assert_eq!(find_newline(&with), Some(at), "newline at {at}");
            with[at + 3] = b'\n';
            assert_eq!(find_newline(&with), Some(at), "two newlines from {at}");
        }
        bytes.clear();
        assert_eq!(find_newline(&bytes), None);
    }
}
