//! The line codec: every message round-trips, bad lines are errors, and
//! the splitter is indifferent to chunk boundaries.

mod common;

use common::{put, remove};
use ferry_core::testkit::check;
use ferry_core::{CrudEntry, CrudOp, HlcTimestamp, RowData, Value};
use ferry_protocol::{
    decode_line, encode_line, BucketChecksum, BucketRequest, Checkpoint, CheckpointDiff, DataBatch, ErrorCode,
    LineSplitter, OpKind, OpOutcome, OplogEntry, Outcome, ProtocolError, ServerError, StreamLine, StreamRequest,
    UploadRequest, UploadResponse, UploadTransaction, DEFAULT_MAX_LINE_BYTES,
};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::json;

fn round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(msg: &T) {
    let line = encode_line(msg);
    assert_eq!(line.last(), Some(&b'\n'), "ends with a newline");
    assert_eq!(
        line.iter().filter(|b| **b == b'\n').count(),
        1,
        "one line: {}",
        String::from_utf8_lossy(&line)
    );
    let back: T = decode_line(&line, DEFAULT_MAX_LINE_BYTES).expect("decodes with its newline");
    assert_eq!(&back, msg);
    let back: T = decode_line(&line[..line.len() - 1], DEFAULT_MAX_LINE_BYTES).expect("decodes without");
    assert_eq!(&back, msg);
}

fn json_of<T: Serialize>(msg: &T) -> serde_json::Value {
    let line = encode_line(msg);
    serde_json::from_slice(&line).expect("valid json")
}

fn row() -> RowData {
    let mut d = RowData::new();
    d.insert("title".to_owned(), Value::Text("multi\nline \"quoted\" ✓".to_owned()));
    d.insert("n".to_owned(), Value::Integer(-42));
    d.insert("x".to_owned(), Value::Real(1.5));
    d.insert("none".to_owned(), Value::Null);
    d.insert("bytes".to_owned(), Value::Blob(vec![0, 10, 255]));
    d
}

fn full_op(op_id: u64) -> OplogEntry {
    let mut e = put(op_id, "todos", "t1", 1);
    e.data = Some(row());
    e
}

fn stream_lines() -> Vec<StreamLine> {
    let bucket = BucketChecksum {
        bucket: "user/1".to_owned(),
        checksum: u32::MAX,
        count: 3,
    };
    vec![
        StreamLine::Checkpoint(Checkpoint {
            hlc: None,
            last_op_id: 9,
            write_checkpoint: Some(4),
            buckets: vec![bucket.clone()],
        }),
        StreamLine::Checkpoint(Checkpoint {
            hlc: None,
            last_op_id: 0,
            write_checkpoint: None,
            buckets: vec![],
        }),
        StreamLine::CheckpointDiff(CheckpointDiff {
            hlc: None,
            last_op_id: 10,
            write_checkpoint: Some(5),
            updated_buckets: vec![bucket],
            removed_buckets: vec!["old".to_owned()],
        }),
        StreamLine::Data(DataBatch {
            bucket: "user/1".to_owned(),
            ops: vec![
                full_op(1),
                remove(2, "todos", "t1"),
                OplogEntry {
                    op_id: 3,
                    op: OpKind::Move,
                    object_type: None,
                    object_id: None,
                    data: None,
                    checksum: 7,
                },
                OplogEntry {
                    op_id: u64::MAX,
                    op: OpKind::Clear,
                    object_type: None,
                    object_id: None,
                    data: None,
                    checksum: 0,
                },
            ],
        }),
        StreamLine::CheckpointComplete { last_op_id: 5 },
        StreamLine::Keepalive { token_expires_in_s: 60 },
        StreamLine::Error(ServerError {
            code: ErrorCode::ShuttingDown,
            message: "server is shutting down".to_owned(),
        }),
    ]
}

fn upload() -> UploadRequest {
    let hlc = HlcTimestamp {
        wall_ms: 1_700_000_000_000,
        counter: 2,
        node: "client-1".to_owned(),
    };
    UploadRequest {
        client_id: "client-1".to_owned(),
        transactions: vec![
            UploadTransaction {
                tx_id: 1,
                ops: vec![
                    CrudEntry {
                        seq: 1,
                        tx_id: 1,
                        op: CrudOp::Put {
                            table: "todos".to_owned(),
                            id: "t1".to_owned(),
                            data: row(),
                        },
                        previous: None,
                        metadata: Some("from test".to_owned()),
                        hlc: Some(hlc.clone()),
                    },
                    CrudEntry {
                        seq: 2,
                        tx_id: 1,
                        op: CrudOp::Patch {
                            table: "todos".to_owned(),
                            id: "t1".to_owned(),
                            data: row(),
                        },
                        previous: Some(row()),
                        metadata: None,
                        hlc: Some(hlc),
                    },
                ],
            },
            UploadTransaction {
                tx_id: 2,
                ops: vec![CrudEntry {
                    seq: 3,
                    tx_id: 2,
                    op: CrudOp::Delete {
                        table: "todos".to_owned(),
                        id: "t1".to_owned(),
                    },
                    previous: None,
                    metadata: None,
                    hlc: None,
                }],
            },
        ],
    }
}

fn upload_response() -> UploadResponse {
    UploadResponse {
        hlc: None,
        outcomes: vec![
            OpOutcome {
                seq: 1,
                outcome: Outcome::Applied,
            },
            OpOutcome {
                seq: 2,
                outcome: Outcome::Merged {
                    row: Some(row()),
                    reason: "field lww kept the server's title".to_owned(),
                },
            },
            OpOutcome {
                seq: 3,
                outcome: Outcome::Merged {
                    row: None,
                    reason: "deleted".to_owned(),
                },
            },
            OpOutcome {
                seq: 4,
                outcome: Outcome::Rejected {
                    reason: "unknown table \"nope\"".to_owned(),
                },
            },
            OpOutcome {
                seq: 5,
                outcome: Outcome::NeedsReview {
                    conflict_id: "c-1".to_owned(),
                },
            },
        ],
        write_checkpoint: 5,
    }
}

#[test]
fn every_message_round_trips() {
    for line in stream_lines() {
        round_trip(&line);
    }
    round_trip(&StreamRequest {
        client_id: "client-1".to_owned(),
        buckets: vec![BucketRequest {
            name: "user/1".to_owned(),
            after_op_id: 42,
        }],
    });
    round_trip(&upload());
    round_trip(&upload_response());
    for code in [
        ErrorCode::Unauthorized,
        ErrorCode::BadRequest,
        ErrorCode::TooLarge,
        ErrorCode::Internal,
        ErrorCode::ShuttingDown,
    ] {
        round_trip(&ServerError {
            code,
            message: "m".to_owned(),
        });
    }
}

#[test]
fn json_shapes() {
    assert_eq!(
        json_of(&StreamLine::CheckpointComplete { last_op_id: 5 }),
        json!({"checkpoint_complete": {"last_op_id": 5}})
    );
    assert_eq!(
        json_of(&StreamLine::Keepalive { token_expires_in_s: 60 }),
        json!({"keepalive": {"token_expires_in_s": 60}})
    );
    assert_eq!(
        json_of(&StreamLine::Checkpoint(Checkpoint {
            hlc: None,
            last_op_id: 9,
            write_checkpoint: None,
            buckets: vec![BucketChecksum {
                bucket: "b".to_owned(),
                checksum: 3,
                count: 1
            }],
        })),
        json!({"checkpoint": {"last_op_id": 9, "buckets": [{"bucket": "b", "checksum": 3, "count": 1}]}})
    );
    let e = put(1, "todos", "t1", 1);
    assert_eq!(
        json_of(&StreamLine::Data(DataBatch {
            bucket: "b".to_owned(),
            ops: vec![e.clone()],
        })),
        json!({"data": {"bucket": "b", "ops": [{
            "op_id": 1, "op": "PUT", "object_type": "todos", "object_id": "t1",
            "data": {"v": 1}, "checksum": e.checksum
        }]}})
    );
    assert_eq!(
        json_of(&StreamLine::Error(ServerError {
            code: ErrorCode::Unauthorized,
            message: "token expired".to_owned()
        })),
        json!({"error": {"code": "unauthorized", "message": "token expired"}})
    );
    let rejected = OpOutcome {
        seq: 3,
        outcome: Outcome::Rejected {
            reason: "title is too long".to_owned(),
        },
    };
    assert_eq!(
        json_of(&rejected),
        json!({"seq": 3, "outcome": "rejected", "reason": "title is too long"})
    );
    assert_eq!(
        json_of(&OpOutcome {
            seq: 1,
            outcome: Outcome::Applied
        }),
        json!({"seq": 1, "outcome": "applied"})
    );
    assert_eq!(
        json_of(&OpOutcome {
            seq: 2,
            outcome: Outcome::NeedsReview {
                conflict_id: "c".to_owned()
            }
        }),
        json!({"seq": 2, "outcome": "needs_review", "conflict_id": "c"})
    );
    assert_eq!(
        json_of(&StreamRequest {
            client_id: "c".to_owned(),
            buckets: vec![BucketRequest {
                name: "b".to_owned(),
                after_op_id: 0
            }]
        }),
        json!({"client_id": "c", "buckets": [{"name": "b", "after_op_id": 0}]})
    );
    // Buckets may be left out of a request.
    let r: StreamRequest = decode_line(br#"{"client_id":"c"}"#, 100).expect("decodes");
    assert!(r.buckets.is_empty());
    // Optional fields of a diff may be left out.
    let d: StreamLine = decode_line(br#"{"checkpoint_diff":{"last_op_id":3}}"#, 100).expect("decodes");
    assert_eq!(
        d,
        StreamLine::CheckpointDiff(CheckpointDiff {
            hlc: None,
            last_op_id: 3,
            write_checkpoint: None,
            updated_buckets: vec![],
            removed_buckets: vec![],
        })
    );
}

#[test]
fn malformed_lines_are_errors() {
    let bad: [&[u8]; 16] = [
        b"",
        b"\n",
        b"{",
        b"[]",
        b"null",
        b"42",
        b"{}",
        br#"{"unknown":{}}"#,
        br#"{"checkpoint_complete":{}}"#,
        br#"{"checkpoint_complete":{"last_op_id":-1}}"#,
        br#"{"checkpoint_complete":{"last_op_id":"5"}}"#,
        br#"{"data":{"bucket":"a","ops":[{"op_id":1,"op":"UPSERT","checksum":0}]}}"#,
        br#"{"data":{"bucket":"a","ops":[{"op_id":1,"op":"PUT","checksum":4294967296}]}}"#,
        br#"{"keepalive":{"token_expires_in_s":1}}{"keepalive":{"token_expires_in_s":1}}"#,
        b"\xff\xfe{}",
        br#"{"checkpoint_complete":{"last_op_id":5}}x"#,
    ];
    for line in bad {
        match decode_line::<StreamLine>(line, DEFAULT_MAX_LINE_BYTES) {
            Err(ProtocolError::Malformed(_)) => {}
            other => panic!("{:?}: expected Malformed, got {other:?}", String::from_utf8_lossy(line)),
        }
    }
    assert!(matches!(
        decode_line::<OpOutcome>(br#"{"seq":1,"outcome":"exploded"}"#, 100),
        Err(ProtocolError::Malformed(_))
    ));
    assert!(matches!(
        decode_line::<OpOutcome>(br#"{"seq":1,"outcome":"rejected"}"#, 100),
        Err(ProtocolError::Malformed(_))
    ));
    // Surrounding whitespace and a CRLF ending are fine.
    let ok: StreamLine = decode_line(b" {\"checkpoint_complete\":{\"last_op_id\":5}}\r\n", 100).expect("decodes");
    assert_eq!(ok, StreamLine::CheckpointComplete { last_op_id: 5 });
}

#[test]
fn oversized_lines_are_errors() {
    let msg = StreamLine::CheckpointComplete { last_op_id: 5 };
    let line = encode_line(&msg);
    let len = line.len() - 1;
    // At the limit, with or without the newline.
    assert_eq!(decode_line::<StreamLine>(&line, len), Ok(msg.clone()));
    assert_eq!(decode_line::<StreamLine>(&line[..len], len), Ok(msg));
    assert_eq!(
        decode_line::<StreamLine>(&line, len - 1),
        Err(ProtocolError::LineTooLong { len, limit: len - 1 })
    );
    // A huge line is refused before parsing.
    let huge = vec![b'x'; 1 << 20];
    assert!(matches!(
        decode_line::<StreamLine>(&huge, 1024),
        Err(ProtocolError::LineTooLong { limit: 1024, .. })
    ));

    // The splitter refuses a line over the limit, whole or in pieces.
    let mut s = LineSplitter::new(8);
    assert_eq!(s.push(b"12345678\n").expect("at the limit"), vec![b"12345678".to_vec()]);
    assert!(matches!(
        s.push(b"123456789\n"),
        Err(ProtocolError::LineTooLong { len: 9, limit: 8 })
    ));
    let mut s = LineSplitter::new(8);
    s.push(b"12345").expect("partial");
    assert_eq!(s.pending_bytes(), 5);
    assert!(matches!(s.push(b"6789"), Err(ProtocolError::LineTooLong { .. })));
}

#[test]
fn splitter_skips_empty_lines_and_keeps_partials() {
    let mut s = LineSplitter::new(100);
    assert_eq!(s.push(b"\n\nab").expect("ok"), Vec::<Vec<u8>>::new());
    assert_eq!(s.pending_bytes(), 2);
    assert_eq!(s.push(b"c\n\nd").expect("ok"), vec![b"abc".to_vec()]);
    assert_eq!(s.push(b"").expect("ok"), Vec::<Vec<u8>>::new());
    assert_eq!(s.push(b"\n").expect("ok"), vec![b"d".to_vec()]);
    assert_eq!(s.pending_bytes(), 0);
}

/// Split `bytes` at the given cut points (taken modulo its length).
fn chunks(bytes: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
    points.push(0);
    points.push(bytes.len());
    points.sort_unstable();
    points.windows(2).map(|w| bytes[w[0]..w[1]].to_vec()).collect()
}

#[test]
fn splitter_is_indifferent_to_chunk_boundaries() {
    const LIMIT: usize = 16;
    let line = prop::collection::vec(any::<u8>().prop_filter("no newline", |b| *b != b'\n'), 0..24);
    check(
        "splitter_is_indifferent_to_chunk_boundaries",
        512,
        (
            prop::collection::vec(line, 0..12),
            any::<bool>(),
            prop::collection::vec(any::<usize>(), 0..20),
        ),
        |(lines, trailing_newline, cuts)| {
            let mut bytes = lines.join(&b'\n');
            if trailing_newline {
                bytes.push(b'\n');
            }
            let complete: Vec<Vec<u8>> = if trailing_newline {
                lines.clone()
            } else {
                lines[..lines.len().saturating_sub(1)].to_vec()
            };
            let expected: Vec<Vec<u8>> = complete.iter().filter(|l| !l.is_empty()).cloned().collect();
            let too_long = lines.iter().any(|l| l.len() > LIMIT);

            let mut s = LineSplitter::new(LIMIT);
            let mut got = Vec::new();
            let mut failed = false;
            for chunk in chunks(&bytes, &cuts) {
                match s.push(&chunk) {
                    Ok(out) => got.extend(out),
                    Err(ProtocolError::LineTooLong { limit, .. }) => {
                        prop_assert_eq!(limit, LIMIT);
                        failed = true;
                        break;
                    }
                    Err(e) => return Err(TestCaseError::fail(format!("unexpected error {e}"))),
                }
            }
            prop_assert_eq!(failed, too_long);
            if failed {
                prop_assert!(expected.starts_with(&got), "lines before the error are in order");
            } else {
                prop_assert_eq!(got, expected);
                let partial = if trailing_newline {
                    0
                } else {
                    lines.last().map_or(0, Vec::len)
                };
                prop_assert_eq!(s.pending_bytes(), partial);
            }
            Ok(())
        },
    );
}

#[test]
fn encoded_stream_survives_any_chunking() {
    let msg = prop_oneof![
        any::<u64>().prop_map(|s| StreamLine::Keepalive { token_expires_in_s: s }),
        any::<u64>().prop_map(|id| StreamLine::CheckpointComplete { last_op_id: id }),
        (1u64..1000, "[a-z\\n\"\\\\é{}]{0,12}").prop_map(|(id, text)| {
            let mut e = put(id, "todos", "t", 1);
            e.data = Some(RowData::from([("t".to_owned(), Value::Text(text))]));
            StreamLine::Data(DataBatch {
                bucket: "b".to_owned(),
                ops: vec![e],
            })
        }),
    ];
    check(
        "encoded_stream_survives_any_chunking",
        256,
        (
            prop::collection::vec(msg, 0..10),
            prop::collection::vec(any::<usize>(), 0..30),
        ),
        |(msgs, cuts)| {
            let bytes: Vec<u8> = msgs.iter().flat_map(encode_line).collect();
            let mut s = LineSplitter::new(DEFAULT_MAX_LINE_BYTES);
            let mut got = Vec::new();
            for chunk in chunks(&bytes, &cuts) {
                for line in s.push(&chunk).map_err(|e| TestCaseError::fail(e.to_string()))? {
                    got.push(
                        decode_line::<StreamLine>(&line, DEFAULT_MAX_LINE_BYTES)
                            .map_err(|e| TestCaseError::fail(e.to_string()))?,
                    );
                }
            }
            prop_assert_eq!(got, msgs);
            prop_assert_eq!(s.pending_bytes(), 0);
            Ok(())
        },
    );
}

#[test]
fn decoding_arbitrary_bytes_never_panics() {
    check(
        "decoding_arbitrary_bytes_never_panics",
        512,
        prop::collection::vec(any::<u8>(), 0..200),
        |bytes| {
            let _ = decode_line::<StreamLine>(&bytes, 100);
            let _ = decode_line::<UploadRequest>(&bytes, 100);
            let _ = decode_line::<UploadResponse>(&bytes, 100);
            let mut s = LineSplitter::new(50);
            let _ = s.push(&bytes);
            Ok(())
        },
    );
}
