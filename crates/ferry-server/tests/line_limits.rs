//! `ServiceOptions::max_line_bytes` bounds the encoded `data` line (as a
//! transport writes it, newline included), not the stored row bytes: rows
//! whose JSON is far larger than the row (control characters escape to six
//! bytes each) still reach a fresh client, in lines it accepts.

mod common;

use std::time::Duration;

use common::*;
use ferry_core::Value;
use ferry_protocol::{decode_line, encode_line, Outcome, StreamLine, DEFAULT_MAX_LINE_BYTES};
use ferry_server::{ServiceError, ServiceOptions, SqliteSourceDb, SyncRules, SyncService};
use ferry_transport::{ServerLine, SyncHandler};

/// About 1 MB of control characters: within the 1 MiB row limit, about
/// 6 MB once encoded as JSON.
fn control_text(seed: u8) -> String {
    let c = char::from(1 + seed % 30);
    std::iter::repeat_n(c, 1_000_000).collect()
}

/// Upload `n` tickets of `control_text`, one transaction each.
async fn upload_big_rows(svc: &SyncService, n: u64) {
    for i in 0..n {
        let op = put(
            "tickets",
            &format!("t{i}"),
            &[("description", Value::from(control_text(i as u8)))],
        );
        let resp = SyncHandler::upload(
            svc,
            &token("u1"),
            upload_req("writer", vec![entry(i + 1, op, 1000 + i, "writer")]),
        )
        .await
        .expect("upload accepted");
        assert_eq!(resp.outcomes[0].outcome, Outcome::Applied, "row t{i}");
    }
}

/// Read a stream until the client applied a checkpoint: every line, as
/// bytes (`to_bytes`), is checked against `max_line_bytes` and decoded with
/// the client's limit. Returns the longest line's length.
async fn download<L>(
    rx: &mut tokio::sync::mpsc::Receiver<L>,
    to_bytes: impl Fn(L) -> Vec<u8>,
    client: &mut TestClient,
    max_line_bytes: usize,
) -> usize {
    let mut longest = 0;
    loop {
        let line = tokio::time::timeout(Duration::from_secs(60), rx.recv())
            .await
            .expect("a line within 60 s")
            .expect("stream open until the checkpoint");
        let bytes = to_bytes(line);
        longest = longest.max(bytes.len());
        assert!(
            bytes.len() <= max_line_bytes,
            "a line of {} bytes passes max_line_bytes = {max_line_bytes}",
            bytes.len()
        );
        let line: StreamLine = decode_line(&bytes, DEFAULT_MAX_LINE_BYTES).expect("the client accepts every line");
        if client.feed(line) {
            return longest;
        }
    }
}

fn check_rows(client: &TestClient, n: u64) {
    let rows = client.rows();
    assert_eq!(rows.len() as u64, n);
    for i in 0..n {
        let row = &rows[&("tickets".to_owned(), format!("t{i}"))];
        assert_eq!(row["description"], Value::from(control_text(i as u8)), "row t{i}");
    }
}

async fn fresh_client_syncs(max_line_bytes: usize) {
    let options = ServiceOptions {
        max_line_bytes,
        // Rows whose JSON is about 6 MB are accepted (a data line of one
        // such row still fits the line limits tested here).
        max_row_encoded_bytes: 7 * 1024 * 1024,
        max_stream_buffer_bytes: 2 * max_line_bytes,
        ..ServiceOptions::default()
    };
    let e = env_with(options);
    let n = 4;
    upload_big_rows(&e.svc, n).await;

    // What transports send: lines encoded from the stored rows.
    let mut client = TestClient::new("fresh-encoded");
    let user = e.svc.authenticate(&token("u2")).expect("token");
    let mut rx = e
        .svc
        .open_stream_lines(user, client.dl.request(&client.id))
        .expect("stream opens");
    let longest = download(&mut rx, ServerLine::into_bytes, &mut client, max_line_bytes).await;
    assert!(longest <= DEFAULT_MAX_LINE_BYTES);
    check_rows(&client, n);

    // The typed stream, measured by its encoding.
    let mut client = TestClient::new("fresh-typed");
    let mut rx = SyncHandler::stream(&e.svc, &token("u3"), client.dl.request(&client.id))
        .await
        .expect("stream opens");
    download(&mut rx, |l| encode_line(&l), &mut client, max_line_bytes).await;
    check_rows(&client, n);
}

#[tokio::test]
async fn rows_of_control_characters_sync_in_lines_within_the_default_limit() {
    fresh_client_syncs(ServiceOptions::default().max_line_bytes).await;
}

#[tokio::test]
async fn rows_of_control_characters_sync_in_lines_within_a_limit_near_the_clients() {
    // Two such rows fit in 15 MiB of stored JSON, a third does not: the
    // line is cut before it, never sent past the client's 16 MiB.
    fresh_client_syncs(15 * 1024 * 1024).await;
}

#[tokio::test]
async fn small_rows_share_lines_up_to_the_limit() {
    // Many small entries per line: each line is full up to the limit (the
    // next entry would have passed it) and never past it.
    let max_line_bytes = 64 * 1024;
    let options = ServiceOptions {
        max_line_bytes,
        ..ServiceOptions::default()
    };
    let e = env_with(options);
    let entries: Vec<_> = (0..60u64)
        .map(|i| {
            let text: String = std::iter::repeat_n('\u{7}', 2000 + i as usize * 37).collect();
            entry(
                i + 1,
                put("tickets", &format!("s{i:02}"), &[("description", text.into())]),
                1000 + i,
                "writer",
            )
        })
        .collect();
    SyncHandler::upload(&e.svc, &token("u1"), upload_req("writer", entries))
        .await
        .expect("upload accepted");
    let mut client = TestClient::new("fresh");
    let lines = client.sync(&e.svc, &token("u2")).await;
    let data: Vec<&StreamLine> = lines.iter().filter(|l| matches!(l, StreamLine::Data(_))).collect();
    assert!(data.len() > 1, "the entries take several lines");
    for (i, line) in data.iter().enumerate() {
        let len = encode_line(*line).len();
        assert!(len <= max_line_bytes, "line {i} of {len} bytes");
        if let (StreamLine::Data(d), Some(StreamLine::Data(next))) = (line, data.get(i + 1)) {
            if d.bucket == next.bucket {
                // Cut only because the next entry did not fit.
                let mut with_next = d.clone();
                with_next.ops.push(next.ops[0].clone());
                let longer = encode_line(&StreamLine::Data(with_next)).len();
                assert!(
                    longer > max_line_bytes,
                    "line {i} was cut early: {len} + next = {longer} bytes"
                );
            }
        }
    }
    assert_eq!(client.rows().len(), 60);
}

fn build_with(max_line_bytes: usize) -> (tempfile::TempDir, Result<SyncService, ServiceError>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = SqliteSourceDb::open_dir(dir.path()).expect("open db");
    let rules = SyncRules::ticket_tracker().expect("rules");
    let built = SyncService::builder(std::sync::Arc::new(db), rules, SECRET)
        .options(ServiceOptions {
            max_line_bytes,
            max_stream_buffer_bytes: 2 * max_line_bytes,
            ..ServiceOptions::default()
        })
        .build();
    (dir, built)
}

#[test]
fn build_refuses_a_line_limit_above_the_clients() {
    let (_dir, at_limit) = build_with(DEFAULT_MAX_LINE_BYTES);
    assert!(at_limit.is_ok(), "the client's own limit is allowed");
    let (_dir, over) = build_with(DEFAULT_MAX_LINE_BYTES + 1);
    match over {
        Err(ServiceError::Config(message)) => {
            assert!(message.contains(&(DEFAULT_MAX_LINE_BYTES + 1).to_string()), "{message}");
        }
        other => panic!("expected a config error, got {other:?}"),
    }
}
