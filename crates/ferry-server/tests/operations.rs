//! Operations from outside, over HTTP against a bound server: `/metrics`
//! moves with uploads and streams, the admin API answers only its own
//! token (never a user's JWT) with the right counts, checksums, progress
//! and outcomes, and its limits are bounded.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;
use ferry_protocol::{Outcome, UploadResponse};
use ferry_server::admin::{BucketsAnswer, ClientAnswer, UserBucketsAnswer, MAX_LIMIT};
use ferry_server::{AdminOptions, ServerConfig, ServiceOptions};

const ADMIN: &str = "admin-token-0123456789abcdef";

struct Server {
    _dir: tempfile::TempDir,
    server: ferry_server::BoundServer,
    http: reqwest::Client,
}

impl Server {
    async fn start(admin: AdminOptions) -> Server {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = ServerConfig {
            data_dir: dir.path().to_path_buf(),
            listen_addr: "127.0.0.1:0".parse().expect("addr"),
            jwt_secret: Some(SECRET.into()),
            admin,
            service: ServiceOptions::default(),
            ..ServerConfig::default()
        };
        let server = ferry_server::run(config, std::future::pending()).await.expect("start");
        Server {
            _dir: dir,
            server,
            http: reqwest::Client::new(),
        }
    }

    async fn with_admin() -> Server {
        Server::start(AdminOptions {
            token: Some(ADMIN.into()),
            metrics_public: false,
        })
        .await
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.server.addr)
    }

    /// GET `path` with `token` (if any): status and body.
    async fn get(&self, path: &str, token: Option<&str>) -> (u16, String) {
        let mut req = self.http.get(self.url(path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let r = req.send().await.expect("get");
        let status = r.status().as_u16();
        (status, r.text().await.expect("body"))
    }

    async fn admin<T: serde::de::DeserializeOwned>(&self, path: &str) -> T {
        let (status, body) = self.get(path, Some(ADMIN)).await;
        assert_eq!(status, 200, "{path}: {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
    }

    async fn metrics(&self) -> String {
        let (status, body) = self.get("/metrics", Some(ADMIN)).await;
        assert_eq!(status, 200, "{body}");
        body
    }

    async fn upload(&self, user: &str, request: &ferry_protocol::UploadRequest) -> (u16, String) {
        let r = self
            .http
            .post(self.url("/sync/upload"))
            .bearer_auth(token(user))
            .header("content-type", "application/json")
            .body(serde_json::to_vec(request).expect("encode"))
            .send()
            .await
            .expect("upload");
        let status = r.status().as_u16();
        (status, r.text().await.expect("body"))
    }

    async fn upload_ok(&self, user: &str, request: &ferry_protocol::UploadRequest) -> UploadResponse {
        let (status, body) = self.upload(user, request).await;
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).expect("answer")
    }
}

/// The value of the sample `name` whose labels include every `labels`
/// pair (`None`: no such sample).
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (head, value) = l.rsplit_once(' ')?;
        let (metric, rest) = match head.split_once('{') {
            Some((m, rest)) => (m, rest),
            None => (head, ""),
        };
        if metric != name {
            return None;
        }
        if !labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))) {
            return None;
        }
        value.parse().ok()
    })
}

fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    sample(text, name, labels).unwrap_or_else(|| panic!("no sample {name} {labels:?} in:\n{text}"))
}

fn ticket(seq: u64, id: &str) -> ferry_core::CrudEntry {
    entry(
        seq,
        put(
            "tickets",
            id,
            &[("title", "t".into()), ("status", "open".into()), ("version", 1.into())],
        ),
        1_000,
        "c",
    )
}

fn assignment(seq: u64, id: &str, user: &str) -> ferry_core::CrudEntry {
    entry(
        seq,
        put(
            "assignments",
            id,
            &[("ticket_id", "t1".into()), ("user_id", user.into())],
        ),
        1_000,
        "c",
    )
}

/// One transaction per entry (a rejected one rolls back only itself).
fn each(client_id: &str, entries: Vec<ferry_core::CrudEntry>) -> ferry_protocol::UploadRequest {
    upload_txs(client_id, entries.into_iter().map(|e| (e.seq, vec![e])).collect())
}

/// A write no client may make (`activity` is the server's own).
fn forbidden(seq: u64) -> ferry_core::CrudEntry {
    entry(
        seq,
        put("activity", &format!("a{seq}"), &[("op", "x".into())]),
        1_000,
        "c",
    )
}

#[tokio::test]
async fn metrics_count_uploads_and_ops_by_outcome() {
    let s = Server::with_admin().await;
    let before = s.metrics().await;
    assert_eq!(value(&before, "ferry_ops_total", &[("outcome", "applied")]), 0.0);
    assert_eq!(value(&before, "ferry_ops_total", &[("outcome", "rejected")]), 0.0);
    assert_eq!(value(&before, "ferry_uploads_total", &[("result", "ok")]), 0.0);
    assert_eq!(value(&before, "ferry_upload_duration_seconds_count", &[]), 0.0);
    assert_eq!(value(&before, "ferry_oplog_entries", &[]), 0.0);
    assert_eq!(value(&before, "ferry_compaction_runs_total", &[]), 0.0);

    let answer = s
        .upload_ok("u1", &each("c1", vec![ticket(1, "t1"), ticket(2, "t2"), forbidden(3)]))
        .await;
    assert!(
        matches!(answer.outcomes[2].outcome, Outcome::Rejected { .. }),
        "{answer:?}"
    );
    let after = s.metrics().await;
    assert_eq!(value(&after, "ferry_ops_total", &[("outcome", "applied")]), 2.0);
    assert_eq!(value(&after, "ferry_ops_total", &[("outcome", "rejected")]), 1.0);
    assert_eq!(value(&after, "ferry_ops_total", &[("outcome", "merged")]), 0.0);
    assert_eq!(value(&after, "ferry_uploads_total", &[("result", "ok")]), 1.0);
    assert_eq!(value(&after, "ferry_upload_duration_seconds_count", &[]), 1.0);
    assert!(value(&after, "ferry_upload_duration_seconds_sum", &[]) > 0.0);
    // Each ticket is one op in the global bucket.
    assert_eq!(value(&after, "ferry_oplog_entries", &[]), 2.0);
    assert!(value(&after, "ferry_last_op_id", &[]) >= 2.0);

    // A refused upload (a bad token) and a refused request (an empty
    // client id) are errors by kind.
    let r = s
        .http
        .post(s.url("/sync/upload"))
        .bearer_auth("not-a-token")
        .body("{}")
        .send()
        .await
        .expect("send");
    assert_eq!(r.status().as_u16(), 401);
    let (status, _) = s.upload("u1", &upload_req("", vec![ticket(9, "t9")])).await;
    assert_eq!(status, 400);
    let errors = s.metrics().await;
    assert_eq!(
        value(
            &errors,
            "ferry_errors_total",
            &[("kind", "auth"), ("class", "permanent")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &errors,
            "ferry_errors_total",
            &[("kind", "bad_request"), ("class", "permanent")]
        ),
        1.0
    );
    assert_eq!(value(&errors, "ferry_uploads_total", &[("result", "error")]), 1.0);

    // Compaction runs count.
    s.server.service.compact_all().await.expect("compact");
    let compacted = s.metrics().await;
    assert!(
        value(&compacted, "ferry_compaction_runs_total", &[]) >= 1.0,
        "{compacted}"
    );
}

#[tokio::test]
async fn open_streams_gauge_goes_up_and_down() {
    let s = Server::with_admin().await;
    assert_eq!(value(&s.metrics().await, "ferry_open_streams", &[]), 0.0);
    s.upload_ok("u1", &upload_req("c1", vec![ticket(1, "t1")])).await;
    let body = serde_json::json!({ "client_id": "c2", "buckets": [] }).to_string();
    let mut stream = s
        .http
        .post(s.url("/sync/stream"))
        .bearer_auth(token("u2"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("stream");
    assert_eq!(stream.status().as_u16(), 200);
    // Read until the first checkpoint completed.
    let mut seen = String::new();
    while !seen.contains("checkpoint_complete") {
        let chunk = tokio::time::timeout(Duration::from_secs(10), stream.chunk())
            .await
            .expect("a line within 10 s")
            .expect("chunk")
            .expect("stream open");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    let open = s.metrics().await;
    assert_eq!(value(&open, "ferry_open_streams", &[]), 1.0, "{open}");
    assert_eq!(value(&open, "ferry_streams_checkpointed", &[]), 1.0, "{open}");
    assert_eq!(value(&open, "ferry_stream_checkpoint_lag_ops_max", &[]), 0.0, "{open}");

    // The client goes away: the stream ends and leaves the gauges.
    drop(stream);
    let start = Instant::now();
    loop {
        let m = s.metrics().await;
        if value(&m, "ferry_open_streams", &[]) == 0.0 {
            assert_eq!(value(&m, "ferry_streams_checkpointed", &[]), 0.0);
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the stream never closed:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn admin_api_refuses_missing_wrong_and_user_tokens() {
    let s = Server::with_admin().await;
    s.upload_ok("u1", &upload_req("c1", vec![ticket(1, "t1")])).await;
    let paths = [
        "/admin/buckets",
        "/admin/users/u1/buckets",
        "/admin/clients/c1",
        "/metrics",
    ];
    for path in paths {
        for token in [
            None,
            Some("wrong-token"),
            Some(&token("u1")[..]),
            Some(&format!("{ADMIN}x")[..]),
        ] {
            let (status, body) = s.get(path, token).await;
            assert_eq!(status, 401, "{path} with {token:?}: {body}");
            assert!(
                !body.contains("global") && !body.contains("c1") && !body.contains("ferry_"),
                "{path} leaked data: {body}"
            );
            assert!(body.contains("admin token"), "{body}");
        }
    }
    // A user's own token for their own client and buckets: still no.
    let (status, _) = s.get("/admin/clients/c1", Some(&token("u1"))).await;
    assert_eq!(status, 401);
    // A token header that is not bearer.
    let r = s
        .http
        .get(s.url("/admin/buckets"))
        .header("authorization", format!("Basic {ADMIN}"))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status().as_u16(), 401);
    let (status, _) = s.get("/admin/buckets", Some(ADMIN)).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn admin_api_is_off_without_a_token_and_metrics_follow_the_setting() {
    let off = Server::start(AdminOptions::default()).await;
    for token in [None, Some(ADMIN), Some("")] {
        let (status, body) = off.get("/admin/buckets", token).await;
        assert_eq!(status, 404, "{body}");
        assert!(body.contains("no admin token is configured"), "{body}");
    }
    let (status, _) = off.get("/admin/clients/c1", Some(ADMIN)).await;
    assert_eq!(status, 404);
    // No admin token: /metrics is open (aggregates only).
    let (status, body) = off.get("/metrics", None).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("ferry_open_streams"), "{body}");

    let public = Server::start(AdminOptions {
        token: Some(ADMIN.into()),
        metrics_public: true,
    })
    .await;
    let (status, body) = public.get("/metrics", None).await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = public.get("/admin/buckets", None).await;
    assert_eq!(status, 401);

    // A token too short to be one stops the start.
    let dir = tempfile::tempdir().expect("tempdir");
    let config = ServerConfig {
        data_dir: dir.path().to_path_buf(),
        listen_addr: "127.0.0.1:0".parse().expect("addr"),
        admin: AdminOptions {
            token: Some("short".into()),
            metrics_public: false,
        },
        ..ServerConfig::default()
    };
    let err = ferry_server::run(config, std::future::pending())
        .await
        .expect_err("a short admin token is refused");
    assert!(err.to_string().contains("admin token of 5 bytes"), "{err}");
}

/// What a client downloads: per bucket, op count and wrapping checksum sum.
async fn downloaded(s: &Server, user: &str, client: &str) -> BTreeMap<String, (u64, u32)> {
    let mut c = TestClient::new(client);
    let lines = c.sync(&s.server.service, &token(user)).await;
    let mut out: BTreeMap<String, (u64, u32)> = BTreeMap::new();
    for (bucket, op) in data_ops(&lines) {
        let e = out.entry(bucket).or_default();
        e.0 += 1;
        e.1 = e.1.wrapping_add(op.checksum);
    }
    out
}

#[tokio::test]
async fn admin_api_answers_buckets_users_and_clients() {
    let s = Server::with_admin().await;
    s.upload_ok(
        "u1",
        &each(
            "c1",
            vec![
                ticket(1, "t1"),
                assignment(2, "a1", "u1"),
                forbidden(3),
                ticket(4, "t2"),
            ],
        ),
    )
    .await;
    s.upload_ok("u2", &each("c2", vec![assignment(1, "a2", "u2"), ticket(2, "t1")]))
        .await;
    let u1 = downloaded(&s, "u1", "c1-reader").await;
    let u2 = downloaded(&s, "u2", "c2-reader").await;
    let global = "global[]";
    let mine1 = "my_assignments[\"u1\"]";
    let mine2 = "my_assignments[\"u2\"]";
    // t1, a1, t2, a2 at least (t1 again if u2's write won).
    assert!(u1[global].0 >= 4, "{u1:?}");
    assert_eq!(u1[mine1].0, 1);

    // Every bucket.
    let all: BucketsAnswer = s.admin("/admin/buckets").await;
    let names: Vec<&str> = all.buckets.iter().map(|b| b.bucket.as_str()).collect();
    assert_eq!(names, vec![global, mine1, mine2]);
    assert_eq!(all.next_after, None);
    for b in &all.buckets {
        let expected = u1.get(&b.bucket).or_else(|| u2.get(&b.bucket)).expect("downloaded");
        assert_eq!((b.op_count, b.checksum), *expected, "{}", b.bucket);
    }
    // Paged.
    let page: BucketsAnswer = s.admin("/admin/buckets?limit=2").await;
    assert_eq!(page.buckets.len(), 2);
    assert_eq!(page.next_after.as_deref(), Some(mine1));
    let rest: BucketsAnswer = s
        .admin(&format!(
            "/admin/buckets?limit=2&after={}",
            "my_assignments%5B%22u1%22%5D"
        ))
        .await;
    assert_eq!(rest.buckets.len(), 1);
    assert_eq!(rest.buckets[0].bucket, mine2);
    assert_eq!(rest.next_after, None);

    // A user's buckets, with what that user downloads.
    let user: UserBucketsAnswer = s.admin("/admin/users/u1/buckets").await;
    assert_eq!(user.user_id, "u1");
    assert!(!user.truncated);
    let got: BTreeMap<String, (u64, u32)> = user
        .buckets
        .iter()
        .map(|b| (b.bucket.clone(), (b.op_count, b.checksum)))
        .collect();
    assert_eq!(got, u1);
    // A user who never wrote gets the global bucket and an empty own one.
    let nobody: UserBucketsAnswer = s.admin("/admin/users/nobody/buckets").await;
    let names: Vec<(&str, u64)> = nobody.buckets.iter().map(|b| (b.bucket.as_str(), b.op_count)).collect();
    assert_eq!(names, vec![(global, u1[global].0), ("my_assignments[\"nobody\"]", 0)]);
    let one: UserBucketsAnswer = s.admin("/admin/users/u1/buckets?limit=1").await;
    assert_eq!(one.buckets.len(), 1);
    assert!(one.truncated);

    // A client's progress and stored outcomes.
    let c1: ClientAnswer = s.admin("/admin/clients/c1").await;
    assert_eq!((c1.user_id.as_str(), c1.last_seq), ("u1", 4));
    let outcomes: Vec<(u64, &str)> = c1
        .outcomes
        .iter()
        .map(|o| {
            (
                o.seq,
                match &o.outcome {
                    Outcome::Applied => "applied",
                    Outcome::Rejected { .. } => "rejected",
                    _ => "other",
                },
            )
        })
        .collect();
    assert_eq!(
        outcomes,
        vec![(1, "applied"), (2, "applied"), (3, "rejected"), (4, "applied")]
    );
    assert!(c1.outcomes.iter().all(|o| o.fingerprint.is_some()));
    match &c1.outcomes[2].outcome {
        Outcome::Rejected { reason } => assert!(reason.contains("permission denied"), "{reason}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(c1.next_after_seq, None);
    let page: ClientAnswer = s.admin("/admin/clients/c1?limit=2").await;
    assert_eq!(page.outcomes.iter().map(|o| o.seq).collect::<Vec<_>>(), vec![1, 2]);
    assert_eq!(page.next_after_seq, Some(2));
    let page: ClientAnswer = s.admin("/admin/clients/c1?limit=2&after_seq=2").await;
    assert_eq!(page.outcomes.iter().map(|o| o.seq).collect::<Vec<_>>(), vec![3, 4]);
    let c2: ClientAnswer = s.admin("/admin/clients/c2").await;
    assert_eq!((c2.user_id.as_str(), c2.last_seq, c2.outcomes.len()), ("u2", 2, 2));
    // A client that never uploaded (a reader only) is not found.
    let (status, body) = s.get("/admin/clients/c1-reader", Some(ADMIN)).await;
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("never uploaded"), "{body}");
}

#[tokio::test]
async fn admin_limits_are_bounded() {
    let s = Server::with_admin().await;
    s.upload_ok("u1", &upload_req("c1", vec![ticket(1, "t1")])).await;
    for path in ["/admin/buckets", "/admin/users/u1/buckets", "/admin/clients/c1"] {
        let (status, body) = s.get(&format!("{path}?limit={}", MAX_LIMIT + 1), Some(ADMIN)).await;
        assert_eq!(status, 400, "{path}: {body}");
        assert!(
            body.contains(&format!("limit {} is outside 1..={MAX_LIMIT}", MAX_LIMIT + 1)),
            "{body}"
        );
        for bad in ["0", "-1", "abc", "99999999999999999999999"] {
            let (status, body) = s.get(&format!("{path}?limit={bad}"), Some(ADMIN)).await;
            assert_eq!(status, 400, "{path}?limit={bad}: {body}");
            assert!(body.contains("limit"), "{body}");
        }
        let (status, body) = s.get(&format!("{path}?limit={MAX_LIMIT}"), Some(ADMIN)).await;
        assert_eq!(status, 200, "{path}: {body}");
    }
    let (status, body) = s.get("/admin/clients/c1?after_seq=x", Some(ADMIN)).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("after_seq"), "{body}");
}
