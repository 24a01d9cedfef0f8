//! The protocol's wire decoders: stream lines (with the line splitter) and
//! the upload request and response bodies.

use std::fmt::Debug;

use ferry_protocol::{
    decode_line, encode_line, LineSplitter, ProtocolError, StreamLine, StreamRequest, UploadRequest, UploadResponse,
    DEFAULT_MAX_LINE_BYTES,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::assert_same;

/// Decode `line` as a `T`; when it decodes, its encoding is one line that
/// decodes to the same value. A line over the limit is `LineTooLong`.
fn line_round_trip<T>(what: &str, line: &[u8], limit: usize)
where
    T: DeserializeOwned + Serialize + PartialEq + Debug,
{
    let body_len = line.strip_suffix(b"\n").unwrap_or(line).len();
    let decoded = decode_line::<T>(line, limit);
    if body_len > limit {
        assert!(
            matches!(decoded, Err(ProtocolError::LineTooLong { len, limit: l }) if len == body_len && l == limit),
            "{what}: a line of {body_len} bytes over the limit {limit} gave {decoded:?}"
        );
        return;
    }
    let Ok(value) = decoded else { return };
    let encoded = encode_line(&value);
    assert_eq!(
        encoded.last(),
        Some(&b'\n'),
        "{what}: an encoded line ends with a newline"
    );
    assert!(
        !encoded[..encoded.len() - 1].contains(&b'\n'),
        "{what}: an encoded line holds no other newline: {:?}",
        String::from_utf8_lossy(&encoded)
    );
    match decode_line::<T>(&encoded, DEFAULT_MAX_LINE_BYTES) {
        Ok(back) => assert_same(what, &value, &back),
        Err(e) => panic!(
            "{what}: {value:?} encodes to {:?}, which does not decode: {e}",
            String::from_utf8_lossy(&encoded)
        ),
    }
}

/// What a correct splitter returns for `data`: the complete non-empty
/// lines, and the bytes of the unfinished last line.
fn reference_split(data: &[u8]) -> (Vec<&[u8]>, &[u8]) {
    let mut parts: Vec<&[u8]> = data.split(|b| *b == b'\n').collect();
    let partial = parts.pop().unwrap_or(&[]);
    parts.retain(|l| !l.is_empty());
    (parts, partial)
}

/// Feed `data` to a splitter with line limit `limit`, `chunk` bytes at a
/// time; check the lines against [`reference_split`].
fn splitter_matches_reference(data: &[u8], chunk: usize, limit: usize) -> Vec<Vec<u8>> {
    let (expected, partial) = reference_split(data);
    // The first segment over the limit (a complete line or the partial
    // one) must stop the splitter; every line before it comes out.
    let too_long = data.split(|b| *b == b'\n').position(|seg| seg.len() > limit);
    let mut splitter = LineSplitter::new(limit);
    let mut got: Vec<Vec<u8>> = Vec::new();
    for piece in data.chunks(chunk.max(1)) {
        match splitter.push(piece) {
            Ok(lines) => got.extend(lines),
            Err(ProtocolError::LineTooLong { len, limit: l }) => {
                assert!(
                    too_long.is_some(),
                    "splitter refused a line of {len} bytes but none is over the limit {limit}"
                );
                assert!(
                    l == limit && len > limit,
                    "splitter reported {len} bytes over limit {l}, limit is {limit}"
                );
                assert!(
                    got.len() <= expected.len() && got.iter().zip(&expected).all(|(g, e)| g == e),
                    "splitter lines before its error are not the first lines of the stream"
                );
                return got;
            }
            Err(e) => panic!("splitter failed with {e:?}, which only LineTooLong may be"),
        }
    }
    assert!(
        too_long.is_none(),
        "splitter accepted a segment over the limit {limit} (segment {too_long:?})"
    );
    assert!(
        got.len() == expected.len() && got.iter().zip(&expected).all(|(g, e)| g == e),
        "splitter lines differ from the stream's lines: got {got:?}, expected {expected:?}"
    );
    assert_eq!(
        splitter.pending_bytes(),
        partial.len(),
        "splitter keeps the unfinished line"
    );
    got
}

/// The download stream: `data` as one stream line (`decode_line::<StreamLine>`)
/// and as a stream fed to the `LineSplitter` in chunks, with the default
/// limit and with a small one; every line the splitter hands out is
/// decoded too. Decoded lines round-trip through `encode_line`.
pub fn stream_line(data: &[u8]) {
    line_round_trip::<StreamLine>("stream line", data, DEFAULT_MAX_LINE_BYTES);
    // Chunk size and a small limit derived from the data, so the seeds
    // stay plain lines the encoder wrote.
    let first = data.first().copied().unwrap_or(0);
    let last = data.last().copied().unwrap_or(0);
    let chunk = 1 + usize::from(first % 13) + data.len() % 7;
    let small_limit = usize::from(last) % 64;
    line_round_trip::<StreamLine>("stream line (small limit)", data, small_limit);
    for line in splitter_matches_reference(data, chunk, DEFAULT_MAX_LINE_BYTES) {
        line_round_trip::<StreamLine>("split stream line", &line, DEFAULT_MAX_LINE_BYTES);
    }
    splitter_matches_reference(data, chunk, small_limit);
    splitter_matches_reference(data, data.len().max(1), small_limit);
}

/// The upload endpoint's bodies: `UploadRequest` (and the stream's
/// `StreamRequest`, the other body a server decodes) and the client's
/// `UploadResponse`, each round-tripping when it decodes.
pub fn upload(data: &[u8]) {
    line_round_trip::<UploadRequest>("upload request", data, DEFAULT_MAX_LINE_BYTES);
    line_round_trip::<UploadResponse>("upload response", data, DEFAULT_MAX_LINE_BYTES);
    line_round_trip::<StreamRequest>("stream request", data, DEFAULT_MAX_LINE_BYTES);
}
