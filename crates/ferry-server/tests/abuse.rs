//! One bad client cannot take the server down: half-sent headers and
//! one-byte-per-second bodies are cut off, idle sockets neither starve
//! `/health` nor uploads, a refused token is answered before its body is
//! read, and the stream and upload limits answer 503 / 429 with
//! `Retry-After`. Every loop here is bounded in count and time and
//! connects to 127.0.0.1 only.

mod common;

use common::HttpServer;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{entry, put, upload_req};
use ferry_http::HttpServerOptions;
use ferry_server::{mint_token, ServerConfig, ServiceOptions};
use serde_json::{json, Value as Json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SECRET: &str = "abuse-secret";

fn token(user: &str) -> String {
    mint_token(SECRET, user, 3600, &serde_json::Map::new())
}

/// A raw answer.
#[derive(Debug)]
struct Raw {
    status: u16,
    head: String,
    body: String,
}

impl Raw {
    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
        })
    }

    fn message(&self) -> String {
        serde_json::from_str::<Json>(&self.body)
            .ok()
            .and_then(|v| v.get("message").and_then(Json::as_str).map(str::to_owned))
            .unwrap_or_default()
    }
}

/// Read one answer (headers, and a body of its `content-length`, or up to
/// EOF), within `limit`.
async fn read_answer(tcp: &mut TcpStream, limit: Duration) -> Option<Raw> {
    let deadline = Instant::now() + limit;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
            let len = head.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse::<usize>().ok())?
            });
            let have = buf.len() - end - 4;
            if len.is_some_and(|n| have >= n) {
                let body = String::from_utf8_lossy(&buf[end + 4..]).into_owned();
                return Some(Raw { status, head, body });
            }
        }
        let left = deadline.checked_duration_since(Instant::now())?;
        match tokio::time::timeout(left, tcp.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
                let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
                let body = String::from_utf8_lossy(&buf[end + 4..]).into_owned();
                return Some(Raw { status, head, body });
            }
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => return None,
        }
    }
}

/// Whether the server closed `tcp` within `limit` (EOF or reset; any
/// bytes it sent first are skipped).
async fn closed_within(tcp: &mut TcpStream, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    let mut chunk = [0u8; 4096];
    loop {
        let Some(left) = deadline.checked_duration_since(Instant::now()) else {
            return false;
        };
        match tokio::time::timeout(left, tcp.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

/// One request on a fresh connection (`Connection: close`).
async fn request(addr: SocketAddr, method: &str, path: &str, token: Option<&str>, body: &str) -> Raw {
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    let auth = token
        .map(|t| format!("authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nhost: test\r\n{auth}content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    tcp.write_all(req.as_bytes()).await.expect("write");
    read_answer(&mut tcp, Duration::from_secs(10))
        .await
        .expect("an answer within 10 s")
}

async fn health(addr: SocketAddr) -> Raw {
    request(addr, "GET", "/health", None, "").await
}

fn upload_body(client_id: &str, id: &str) -> String {
    let req = upload_req(
        client_id,
        vec![entry(
            1,
            put("tickets", id, &[("title", "t".into()), ("status", "pending".into())]),
            1_000,
            client_id,
        )],
    );
    serde_json::to_string(&req).expect("json")
}

async fn upload(addr: SocketAddr, user: &str, client_id: &str, id: &str) -> Raw {
    request(
        addr,
        "POST",
        "/sync/upload",
        Some(&token(user)),
        &upload_body(client_id, id),
    )
    .await
}

/// Open a stream and read its answer head; the connection stays open
/// (the stream) until the returned socket is dropped.
async fn open_stream(addr: SocketAddr, user: &str, client_id: &str) -> (Raw, TcpStream) {
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    let body = json!({"client_id": client_id, "buckets": []}).to_string();
    let req = format!(
        "POST /sync/stream HTTP/1.1\r\nhost: test\r\nauthorization: Bearer {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        token(user),
        body.len()
    );
    tcp.write_all(req.as_bytes()).await.expect("write");
    // A 200 stream is chunked: read its head (and whatever came with it).
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let left = deadline
            .checked_duration_since(Instant::now())
            .expect("stream head in time");
        match tokio::time::timeout(left, tcp.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => break,
        }
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let mut raw = Raw {
        status,
        head: head.to_owned(),
        body: rest.to_owned(),
    };
    if status != 200 {
        // An error answer has a content-length body: read the rest.
        let want = raw
            .header("content-length")
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(0);
        while raw.body.len() < want {
            match tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => raw.body.push_str(&String::from_utf8_lossy(&chunk[..n])),
                _ => break,
            }
        }
    }
    (raw, tcp)
}

fn quick_http() -> HttpServerOptions {
    HttpServerOptions {
        header_timeout_ms: 1_000,
        body_timeout_ms: 1_500,
        ..HttpServerOptions::default()
    }
}

/// `/health` and an upload of another client both answer, quickly.
async fn others_are_served(addr: SocketAddr, n: u32) {
    let started = Instant::now();
    let h = health(addr).await;
    assert_eq!(h.status, 200, "{h:?}");
    let u = upload(addr, "bystander", &format!("bystander-{n}"), &format!("b{n}")).await;
    assert_eq!(u.status, 200, "{u:?}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "health and an upload took {:?}",
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------
// Slowloris
// ---------------------------------------------------------------------------

#[tokio::test]
async fn half_sent_headers_are_cut_off_while_others_are_served() {
    let s = HttpServer::start(SECRET, quick_http(), ServiceOptions::default()).await;
    let addr = s.addr();
    // 20 connections each sending half a header, then nothing.
    let mut slow = Vec::new();
    for _ in 0..20 {
        let mut tcp = TcpStream::connect(addr).await.expect("connect");
        tcp.write_all(b"POST /sync/upload HTTP/1.1\r\nhost: test\r\nx-slow: ")
            .await
            .expect("write");
        slow.push(tcp);
    }
    let started = Instant::now();
    others_are_served(addr, 1).await;
    for tcp in &mut slow {
        let limit = Duration::from_millis(1_000 + 3_000).saturating_sub(started.elapsed());
        assert!(closed_within(tcp, limit).await, "a half-sent header was not cut off");
    }
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "cut before the header timeout"
    );
    others_are_served(addr, 2).await;
}

#[tokio::test]
async fn a_header_sent_in_pieces_within_the_timeout_is_served() {
    let s = HttpServer::start(SECRET, quick_http(), ServiceOptions::default()).await;
    let mut tcp = TcpStream::connect(s.addr()).await.expect("connect");
    tcp.write_all(b"GET /health HTTP/1.1\r\nhost: te").await.expect("write");
    tokio::time::sleep(Duration::from_millis(300)).await;
    tcp.write_all(b"st\r\nconnection: close\r\n\r\n").await.expect("write");
    let a = read_answer(&mut tcp, Duration::from_secs(5)).await.expect("answer");
    assert_eq!(a.status, 200, "{a:?}");
}

#[tokio::test]
async fn a_one_byte_per_second_body_is_cut_off_with_408() {
    let s = HttpServer::start(SECRET, quick_http(), ServiceOptions::default()).await;
    let addr = s.addr();
    let body = upload_body("slow-client", "s1");
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "POST /sync/upload HTTP/1.1\r\nhost: test\r\nauthorization: Bearer {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        token("slowpoke"),
        body.len()
    );
    tcp.write_all(head.as_bytes()).await.expect("write head");
    let started = Instant::now();
    // One byte a second, at most 4 (the timeout is 1.5 s).
    let (mut rd, mut wr) = tcp.into_split();
    let sender = tokio::spawn(async move {
        for b in body.as_bytes().iter().take(4) {
            if wr.write_all(&[*b]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        wr
    });
    others_are_served(addr, 3).await;
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(6), rd.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the slow body was not cut off");
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(
        text.contains("upload request body did not arrive within body_timeout_ms (1500 ms)"),
        "{text}"
    );
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1_400) && took < Duration::from_secs(5),
        "cut after {took:?}"
    );
    let _ = sender.await;
    others_are_served(addr, 4).await;
}

#[tokio::test]
async fn a_slow_body_within_the_timeout_is_read() {
    let s = HttpServer::start(SECRET, quick_http(), ServiceOptions::default()).await;
    let body = upload_body("slow-ok", "s2");
    let mut tcp = TcpStream::connect(s.addr()).await.expect("connect");
    let head = format!(
        "POST /sync/upload HTTP/1.1\r\nhost: test\r\nauthorization: Bearer {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        token("patient"),
        body.len()
    );
    tcp.write_all(head.as_bytes()).await.expect("write head");
    let (first, rest) = body.split_at(body.len() / 2);
    tcp.write_all(first.as_bytes()).await.expect("write");
    tokio::time::sleep(Duration::from_millis(500)).await;
    tcp.write_all(rest.as_bytes()).await.expect("write");
    let a = read_answer(&mut tcp, Duration::from_secs(5)).await.expect("answer");
    assert_eq!(a.status, 200, "{a:?}");
}

// ---------------------------------------------------------------------------
// Idle sockets and the connection cap
// ---------------------------------------------------------------------------

#[tokio::test]
async fn five_hundred_idle_sockets_do_not_stop_health_or_uploads() {
    let s = HttpServer::start(SECRET, quick_http(), ServiceOptions::default()).await;
    let addr = s.addr();
    let mut idle = Vec::new();
    for _ in 0..500 {
        idle.push(TcpStream::connect(addr).await.expect("connect"));
    }
    others_are_served(addr, 5).await;
    // The header timeout closes them all.
    let started = Instant::now();
    for tcp in idle.iter_mut().step_by(50) {
        let limit = Duration::from_secs(6).saturating_sub(started.elapsed());
        assert!(closed_within(tcp, limit).await, "an idle socket stayed open");
    }
    others_are_served(addr, 6).await;
}

#[tokio::test]
async fn connections_over_the_cap_get_503_and_the_cap_frees_up() {
    let http = HttpServerOptions {
        max_connections: 8,
        ..quick_http()
    };
    let s = HttpServer::start(SECRET, http, ServiceOptions::default()).await;
    let addr = s.addr();
    // At the limit: 7 idle sockets leave one connection for /health.
    let mut idle = Vec::new();
    for _ in 0..7 {
        idle.push(TcpStream::connect(addr).await.expect("connect"));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(health(addr).await.status, 200);
    // Over it: the 9th connection is answered 503 at once.
    idle.push(TcpStream::connect(addr).await.expect("connect"));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut over = TcpStream::connect(addr).await.expect("connect");
    let a = read_answer(&mut over, Duration::from_secs(5)).await.expect("an answer");
    assert_eq!(a.status, 503, "{a:?}");
    assert_eq!(a.header("retry-after").as_deref(), Some("1"));
    assert_eq!(a.message(), "too many connections (max_connections 8)");
    // The idle ones go (closed by the client here); the cap frees up.
    drop(idle);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut tcp = TcpStream::connect(addr).await.expect("connect");
        tcp.write_all(b"GET /health HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n")
            .await
            .expect("write");
        let a = read_answer(&mut tcp, Duration::from_secs(5)).await;
        if a.as_ref().is_some_and(|a| a.status == 200) {
            break;
        }
        assert!(Instant::now() < deadline, "the cap did not free up: {a:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------------------
// Token before body
// ---------------------------------------------------------------------------

#[tokio::test]
async fn a_garbage_token_with_a_large_body_is_refused_before_the_body_is_read() {
    let s = HttpServer::start(SECRET, quick_http(), ServiceOptions::default()).await;
    let addr = s.addr();
    let declared: usize = 30 * 1024 * 1024; // under max_body_bytes (32 MiB)
    for route in ["/sync/upload", "/sync/stream"] {
        let mut tcp = TcpStream::connect(addr).await.expect("connect");
        let head = format!(
            "POST {route} HTTP/1.1\r\nhost: test\r\nauthorization: Bearer garbage.token.here\r\ncontent-type: application/json\r\ncontent-length: {declared}\r\n\r\n"
        );
        tcp.write_all(head.as_bytes()).await.expect("write head");
        // 64 KiB of the body, then wait for the answer.
        let sent = 64 * 1024;
        tcp.write_all(&vec![b' '; sent]).await.expect("write some body");
        let started = Instant::now();
        let a = read_answer(&mut tcp, Duration::from_secs(5))
            .await
            .expect("answered before the body was sent");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{route}: answer took {:?}",
            started.elapsed()
        );
        assert_eq!(a.status, 401, "{route}: {a:?}");
        assert!(a.message().starts_with("malformed token"), "{route}: {}", a.message());
        assert_eq!(a.header("connection").as_deref(), Some("close"), "{route}");
        assert!(sent < declared, "the answer came with {sent} of {declared} bytes sent");
        // The server closes the connection instead of reading the rest.
        assert!(
            closed_within(&mut tcp, Duration::from_secs(3)).await,
            "{route}: connection kept"
        );
    }
    others_are_served(addr, 7).await;
}

#[tokio::test]
async fn a_declared_body_over_the_limit_is_refused_unread() {
    let s = HttpServer::start(SECRET, quick_http(), ServiceOptions::default()).await;
    let mut tcp = TcpStream::connect(s.addr()).await.expect("connect");
    let declared = 33 * 1024 * 1024; // over the default 32 MiB
    let head = format!(
        "POST /sync/upload HTTP/1.1\r\nhost: test\r\nauthorization: Bearer {}\r\ncontent-type: application/json\r\ncontent-length: {declared}\r\n\r\n",
        token("big")
    );
    tcp.write_all(head.as_bytes()).await.expect("write");
    let a = read_answer(&mut tcp, Duration::from_secs(5)).await.expect("answer");
    assert_eq!(a.status, 413, "{a:?}");
    assert_eq!(
        a.message(),
        "upload request body exceeds max_body_bytes (33554432 bytes)"
    );
}

// ---------------------------------------------------------------------------
// Stream and upload limits
// ---------------------------------------------------------------------------

#[tokio::test]
async fn too_many_streams_get_503_with_retry_after() {
    let service = ServiceOptions {
        max_concurrent_streams: 2,
        ..ServiceOptions::default()
    };
    let s = HttpServer::start(SECRET, quick_http(), service).await;
    let addr = s.addr();
    // At the limit: two streams open.
    let (a1, _s1) = open_stream(addr, "u1", "c1").await;
    let (a2, _s2) = open_stream(addr, "u2", "c2").await;
    assert_eq!((a1.status, a2.status), (200, 200), "{a1:?} {a2:?}");
    // Over it.
    let (a3, _s3) = open_stream(addr, "u3", "c3").await;
    assert_eq!(a3.status, 503, "{a3:?}");
    assert_eq!(a3.header("retry-after").as_deref(), Some("1"));
    assert!(a3.message().contains("too many concurrent streams (limit 2)"), "{a3:?}");
    assert!(a3.body.contains("\"code\":\"busy\""), "{a3:?}");
    // Uploads and /health are not streams.
    others_are_served(addr, 8).await;
}

#[tokio::test]
async fn streams_per_user_are_capped_with_429() {
    let http = HttpServerOptions {
        max_streams_per_user: 2,
        ..quick_http()
    };
    let s = HttpServer::start(SECRET, http, ServiceOptions::default()).await;
    let addr = s.addr();
    let (a1, s1) = open_stream(addr, "u1", "c1").await;
    let (a2, _s2) = open_stream(addr, "u1", "c2").await;
    assert_eq!((a1.status, a2.status), (200, 200));
    let (a3, _) = open_stream(addr, "u1", "c3").await;
    assert_eq!(a3.status, 429, "{a3:?}");
    assert_eq!(a3.header("retry-after").as_deref(), Some("1"));
    assert_eq!(
        a3.message(),
        "user \"u1\" already has 2 streams open (max_streams_per_user)"
    );
    // Another user is not affected.
    let (b1, _b1) = open_stream(addr, "u2", "c4").await;
    assert_eq!(b1.status, 200);
    // One of u1's streams ends: u1 may open one again.
    drop(s1);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (a, _s) = open_stream(addr, "u1", "c5").await;
        if a.status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "the slot was not freed: {a:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn uploads_per_user_per_second_are_capped_with_429() {
    let http = HttpServerOptions {
        max_uploads_per_user_per_s: 3,
        ..quick_http()
    };
    let s = HttpServer::start(SECRET, http, ServiceOptions::default()).await;
    let addr = s.addr();
    // At the limit: 3 uploads in a burst.
    for i in 0..3 {
        let a = upload(addr, "u1", &format!("c1-{i}"), &format!("t{i}")).await;
        assert_eq!(a.status, 200, "upload {i}: {a:?}");
    }
    let a = upload(addr, "u1", "c1-3", "t3").await;
    assert_eq!(a.status, 429, "{a:?}");
    assert_eq!(a.header("retry-after").as_deref(), Some("1"));
    assert_eq!(
        a.message(),
        "user \"u1\" sent more than 3 uploads in a second (max_uploads_per_user_per_s)"
    );
    assert!(a.body.contains("\"code\":\"rate_limited\""), "{a:?}");
    // Another user is not affected.
    assert_eq!(upload(addr, "u2", "c2", "x").await.status, 200);
    // A second later u1 may upload again.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    assert_eq!(upload(addr, "u1", "c1-4", "t4").await.status, 200);
}

#[test]
fn an_idle_timeout_at_the_keepalive_interval_is_refused() {
    let mut config = ServerConfig::default();
    config.service.keepalive_interval_s = 20;
    config.http.idle_timeout_ms = 20_000;
    let err = config.check().expect_err("idle timeout == keepalive");
    assert!(
        err.to_string()
            .contains("http.idle_timeout_ms of 20000 ms must exceed keepalive_interval_s (20000 ms)"),
        "{err}"
    );
    config.http.idle_timeout_ms = 20_001;
    config.check().expect("idle timeout above the keepalive interval");
}
