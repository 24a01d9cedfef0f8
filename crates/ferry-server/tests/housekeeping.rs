//! Housekeeping of a long-running server: compaction on a schedule keeps
//! the op log small and clients in sync; upload outcomes are pruned once
//! the client can no longer ask for them.

mod common;

use common::{entry, put, token, upload_req, TestClient};
use ferry_core::Value;
use ferry_server::ServerConfig;
use ferry_transport::SyncHandler;

const SECRET: &str = "housekeeping-secret";

#[tokio::test]
async fn compaction_runs_on_its_schedule_and_clients_still_sync() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = ServerConfig {
        data_dir: dir.path().to_path_buf(),
        listen_addr: "127.0.0.1:0".parse().expect("addr"),
        jwt_secret: Some(SECRET.into()),
        compact_interval_s: 1,
        ..ServerConfig::default()
    };
    let server = ferry_server::run(config, std::future::pending()).await.expect("start");
    let svc = server.service.clone();
    let token = ferry_server::mint_token(SECRET, "ann", 3600, &serde_json::Map::new());
    // Twenty versions of one ticket: twenty entries until compacted.
    for seq in 1..=20u64 {
        let answer = SyncHandler::upload(
            &svc,
            &token,
            upload_req(
                "c1",
                vec![entry(
                    seq,
                    put("tickets", "t1", &[("title", Value::from(format!("v{seq}")))]),
                    1_000 + seq,
                    "c1",
                )],
            ),
        )
        .await
        .expect("upload");
        assert_eq!(answer.outcomes.len(), 1);
    }
    let before = svc.db().oplog_len().expect("oplog len");
    assert!(before >= 20, "{before}");
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let now = svc.db().oplog_len().expect("oplog len");
        if now < before {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no compaction within 20 s ({now} entries)"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // A new device syncs (the checksums still match) and sees the last
    // version.
    let mut c = TestClient::new("c2");
    c.sync(&svc, &token).await;
    let title = c
        .rows()
        .get(&("tickets".to_owned(), "t1".to_owned()))
        .and_then(|r| r.get("title").cloned());
    assert_eq!(title, Some(Value::from("v20")));
    // Outcomes: only the last upload's is kept (the client has the others).
    let kept = svc.db().client_outcomes("c1", 0, 100).expect("outcomes");
    assert_eq!(kept.iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![20]);
    server.shutdown().await.expect("shutdown");
    let _ = token;
}

#[tokio::test]
async fn a_replay_of_the_last_upload_still_gets_its_stored_outcome() {
    let e = common::env();
    let svc = &e.svc;
    let up = |seq: u64| {
        upload_req(
            "c1",
            vec![entry(seq, put("tickets", &format!("t{seq}"), &[]), 1_000, "c1")],
        )
    };
    SyncHandler::upload(svc, &token("u1"), up(1)).await.expect("first");
    SyncHandler::upload(svc, &token("u1"), up(2)).await.expect("second");
    // The answer of seq 2 was lost: the client sends it again.
    let again = SyncHandler::upload(svc, &token("u1"), up(2)).await.expect("replay");
    assert_eq!(again.outcomes[0].seq, 2);
    assert_eq!(svc.db().client_outcomes("c1", 0, 10).expect("outcomes").len(), 1);
}
