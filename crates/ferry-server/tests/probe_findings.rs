//! Findings of an attacker's and integrator's probe of the sync server:
//! each test failed before its fix.

mod common;

use common::*;
use ferry_core::Value;
use ferry_protocol::ErrorCode;
use ferry_transport::SyncHandler;

/// A client id with a NUL byte was taken on SQLite (and kept as the ops'
/// clock node), while PostgreSQL refused it with a 400 that named neither
/// the client id nor the request ("the database refused the write: invalid
/// byte sequence ..."), for a stream as well as an upload. Like a row id,
/// it is refused on every backend, naming the client id, before anything
/// is read or written.
#[tokio::test]
async fn a_client_id_with_a_nul_byte_is_refused_naming_it_and_writes_nothing() {
    let e = env();
    let oplog = e.svc.db().oplog_len().expect("len");
    let bad = "dev\0ice";
    let err = try_upload(
        &e.svc,
        "u1",
        upload_req(
            bad,
            vec![entry(
                1,
                put("tickets", "t1", &[("title", Value::from("a"))]),
                1000,
                bad,
            )],
        ),
    )
    .await
    .expect_err("upload with a NUL byte in its client id");
    assert_eq!(err.code, ErrorCode::BadRequest, "{err:?}");
    assert!(err.message.contains(r#"client id "dev\0ice""#), "{}", err.message);
    assert!(err.message.contains("NUL byte"), "{}", err.message);
    assert_eq!(e.svc.db().oplog_len().expect("len"), oplog);
    assert_eq!(e.svc.db().client_owner(bad).expect("owner"), None);

    let request = TestClient::new(bad).dl.request(bad);
    let err = SyncHandler::stream(&e.svc, &token("u1"), request)
        .await
        .expect_err("stream with a NUL byte in its client id");
    assert_eq!(err.code, ErrorCode::BadRequest, "{err:?}");
    assert!(err.message.contains(r#"client id "dev\0ice""#), "{}", err.message);
}

/// A token whose `sub` holds a NUL byte was taken on SQLite and answered,
/// on PostgreSQL, with the database's unclear 400 on every request; a
/// `sub` of any length was taken. Both are refused as unauthorized,
/// naming the claim, before anything is read or written.
#[tokio::test]
async fn a_token_whose_user_id_has_a_nul_byte_or_is_too_long_is_refused() {
    let e = env();
    let oplog = e.svc.db().oplog_len().expect("len");
    let long = "u".repeat(ferry_server::MAX_USER_ID_BYTES + 1);
    for (user, says) in [("u\0ser", "NUL byte"), (long.as_str(), "over the limit")] {
        let request = TestClient::new("dev1").dl.request("dev1");
        let err = SyncHandler::stream(&e.svc, &token(user), request)
            .await
            .expect_err("stream with a bad sub");
        assert_eq!(err.code, ErrorCode::Unauthorized, "{err:?}");
        assert!(err.message.contains(says), "{}", err.message);
        let err = try_upload(
            &e.svc,
            user,
            upload_req(
                "dev1",
                vec![entry(
                    1,
                    put("tickets", "t1", &[("title", Value::from("a"))]),
                    1000,
                    "dev1",
                )],
            ),
        )
        .await
        .expect_err("upload with a bad sub");
        assert_eq!(err.code, ErrorCode::Unauthorized, "{err:?}");
        assert!(err.message.contains(says), "{}", err.message);
    }
    assert_eq!(e.svc.db().oplog_len().expect("len"), oplog);
    assert_eq!(e.svc.db().client_owner("dev1").expect("owner"), None);
    // At the limit, the user id is taken.
    let at_limit = "u".repeat(ferry_server::MAX_USER_ID_BYTES);
    let request = TestClient::new("dev2").dl.request("dev2");
    SyncHandler::stream(&e.svc, &token(&at_limit), request)
        .await
        .expect("a user id at the limit");
}

/// A stream may open on a client id no one owns yet. When another user's
/// upload then claims the id, that user's progress (the write checkpoint)
/// was sent to the first stream; now the stream ends, unauthorized,
/// before it would show it.
#[tokio::test]
async fn a_stream_on_a_client_id_another_user_claims_ends_before_showing_its_progress() {
    let e = env();
    let user = e.svc.authenticate(&token("u1")).expect("token");
    let request = TestClient::new("shared").dl.request("shared");
    let mut rx = e.svc.open_stream_lines(user, request).expect("stream");
    let mut lines = Vec::new();
    // The first checkpoint, without progress.
    let first = tokio::time::timeout(std::time::Duration::from_secs(10), rx.recv())
        .await
        .expect("first line in time")
        .expect("stream open");
    lines.push(String::from_utf8_lossy(&first.into_bytes()).into_owned());
    try_upload(
        &e.svc,
        "u2",
        upload_req(
            "shared",
            vec![entry(
                1,
                put("tickets", "t1", &[("title", Value::from("b's"))]),
                1000,
                "shared",
            )],
        ),
    )
    .await
    .expect("u2 claims the client id");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match tokio::time::timeout(left, rx.recv()).await {
            Ok(Some(line)) => lines.push(String::from_utf8_lossy(&line.into_bytes()).into_owned()),
            Ok(None) => break,
            Err(_) => panic!("the stream went on: {lines:?}"),
        }
    }
    assert!(
        lines.iter().all(|l| !l.contains("\"write_checkpoint\":1")),
        "u2's progress reached u1's stream: {lines:?}"
    );
    assert!(
        lines.last().is_some_and(|l| l.contains("belongs to another user")),
        "{lines:?}"
    );
}
