//! The stream transports take (`stream_lines`, data lines assembled from
//! stored row JSON) carries exactly the bytes of the typed stream
//! (`stream`) encoded line by line.

mod common;

use std::time::Duration;

use common::*;
use ferry_core::Value;
use ferry_protocol::{decode_line, encode_line, StreamLine, StreamRequest};
use ferry_server::ServiceOptions;
use ferry_transport::SyncHandler;

fn request() -> StreamRequest {
    StreamRequest {
        client_id: "c-read".into(),
        buckets: Vec::new(),
    }
}

fn without_hlc(line: StreamLine) -> StreamLine {
    match line {
        StreamLine::Checkpoint(c) => StreamLine::Checkpoint(ferry_protocol::Checkpoint { hlc: None, ..c }),
        StreamLine::CheckpointDiff(d) => StreamLine::CheckpointDiff(ferry_protocol::CheckpointDiff { hlc: None, ..d }),
        l => l,
    }
}

#[tokio::test]
async fn encoded_stream_matches_the_typed_stream() {
    // Small lines, so the stream has several data lines.
    let e = env_with(ServiceOptions {
        max_ops_per_line: 3,
        ..ServiceOptions::default()
    });
    let mut entries = Vec::new();
    for i in 1..=10u64 {
        entries.push(entry(
            i,
            put(
                "tickets",
                &format!("t\"{i}\\\n\u{e9}"),
                &[
                    ("title", format!("title {i} \"quoted\"\n\u{1F600}").into()),
                    ("version", Value::Integer(-(i as i64))),
                    ("status", Value::Null),
                    ("description", Value::Text(format!("tab\there {i}\u{7}"))),
                ],
            ),
            1000 + i,
            "c1",
        ));
    }
    entries.push(entry(11, delete("tickets", "t\"2\\\n\u{e9}"), 2000, "c1"));
    let answer = SyncHandler::upload(&e.svc, &token("u1"), upload_req("c1", entries))
        .await
        .expect("upload");
    for o in &answer.outcomes {
        assert!(matches!(o.outcome, ferry_protocol::Outcome::Applied), "{o:?}");
    }

    let mut typed = SyncHandler::stream(&e.svc, &token("u1"), request())
        .await
        .expect("typed stream");
    let mut encoded = SyncHandler::stream_lines(&e.svc, &token("u1"), request())
        .await
        .expect("encoded stream");
    // The typed stream's lines through the first checkpoint's end.
    let mut typed_lines = Vec::new();
    loop {
        let t = tokio::time::timeout(Duration::from_secs(5), typed.recv())
            .await
            .expect("typed line in time")
            .expect("typed line");
        let done = matches!(t, StreamLine::CheckpointComplete { .. });
        typed_lines.push(t);
        if done {
            break;
        }
    }
    // The encoded stream's: one whole line per message (transports hand
    // each message on as a line).
    let mut encoded_lines: Vec<Vec<u8>> = Vec::new();
    while !encoded_lines
        .last()
        .is_some_and(|l| l.starts_with(b"{\"checkpoint_complete\""))
    {
        let b = tokio::time::timeout(Duration::from_secs(5), encoded.recv())
            .await
            .expect("encoded line in time")
            .expect("encoded line");
        let bytes = b.into_bytes();
        assert!(
            bytes.ends_with(b"\n") && bytes.iter().filter(|c| **c == b'\n').count() == 1,
            "one line per message: {}",
            String::from_utf8_lossy(&bytes)
        );
        encoded_lines.push(bytes);
    }
    assert_eq!(encoded_lines.len(), typed_lines.len());
    let mut data_lines = 0;
    for (t, b) in typed_lines.into_iter().zip(encoded_lines) {
        if matches!(t, StreamLine::Data(_)) {
            data_lines += 1;
            // Data lines are the stored rows' bytes, exactly.
            assert_eq!(String::from_utf8_lossy(&b), String::from_utf8_lossy(&encode_line(&t)));
            continue;
        }
        // Checkpoint lines carry the server's HLC, which moves on between
        // the two streams: they are compared without it.
        let decoded: StreamLine = decode_line(&b, usize::MAX).expect("encoded line decodes");
        assert_eq!(
            String::from_utf8_lossy(&encode_line(&without_hlc(decoded))),
            String::from_utf8_lossy(&encode_line(&without_hlc(t)))
        );
    }
    assert!(data_lines >= 4, "only {data_lines} encoded data lines");
}
