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
