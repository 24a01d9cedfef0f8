//! The tracker's HTTP endpoints seen from a browser on another site: the
//! tracker listens on loopback with no login, so what keeps a web page
//! the user visits from writing to it, or reading it, is the browser's
//! same-origin policy, which holds only if the tracker refuses requests
//! a page of another site can send without asking (a "simple" POST of
//! `text/plain`) and requests for another host name (DNS rebinding).

use std::sync::Arc;

use anyhow::{Context as _, Result};
use ferry_examples::tracker::Tracker;
use serde_json::Value;

mod common;

use common::{start_server, start_tracker};

/// Alice's tracker, with the server it syncs with.
struct Device {
    tracker: Arc<Tracker>,
    url: String,
    _server: ferry_server::BoundServer,
    _dir: tempfile::TempDir,
}

async fn start() -> Result<Device> {
    let dir = tempfile::tempdir()?;
    let server = start_server(dir.path()).await?;
    let alice = start_tracker(server.addr, "alice", dir.path()).await?;
    Ok(Device {
        tracker: alice.tracker,
        url: alice.url,
        _server: server,
        _dir: dir,
    })
}

async fn send(
    http: &reqwest::Client,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> Result<(u16, Value)> {
    let mut req = http.request(reqwest::Method::from_bytes(method.as_bytes())?, url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    if let Some(b) = body {
        req = req.body(b.to_owned());
    }
    let resp = req.send().await?;
    let status = resp.status().as_u16();
    let text = resp.text().await?;
    Ok((status, serde_json::from_str(&text).unwrap_or(Value::String(text))))
}

fn tickets(d: &Device) -> Result<usize> {
    Ok(d.tracker.db.local().scan("tickets")?.len())
}

/// A page of another site can POST `text/plain` (or a form's types) to
/// any address without a CORS preflight; a JSON body under such a type
/// is refused with 415, and nothing is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_is_not_declared_json_is_refused_and_writes_nothing() -> Result<()> {
    let d = start().await?;
    let http = reqwest::Client::new();
    let json = [("content-type", "application/json")];
    let (status, created) = send(
        &http,
        "POST",
        &format!("{}/api/tickets", d.url),
        &json,
        Some(r#"{"title":"mine"}"#),
    )
    .await?;
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_str().context("an id")?.to_owned();
    let before = tickets(&d)?;
    let last_seq = d.tracker.db.local().last_seq();

    for content_type in [
        Some("text/plain"),
        Some("text/plain;charset=UTF-8"),
        Some("application/x-www-form-urlencoded"),
        Some("multipart/form-data; boundary=x"),
        Some("application/jsonp"),
        None,
    ] {
        let headers: Vec<(&str, &str)> = content_type.map(|c| ("content-type", c)).into_iter().collect();
        for (method, path, body) in [
            ("POST", "/api/tickets".to_owned(), r#"{"title":"from another site"}"#),
            (
                "POST",
                format!("/api/tickets/{id}/comments"),
                r#"{"body":"from another site"}"#,
            ),
            (
                "POST",
                format!("/api/tickets/{id}/attachments"),
                r#"{"url":"https://evil.example/"}"#,
            ),
            ("POST", "/api/sync".to_owned(), r#"{"offline":true}"#),
            ("PATCH", format!("/api/tickets/{id}"), r#"{"title":"changed"}"#),
        ] {
            let (status, answer) = send(&http, method, &format!("{}{path}", d.url), &headers, Some(body)).await?;
            assert_eq!(status, 415, "{method} {path} as {content_type:?}: {answer}");
            let message = answer["error"].as_str().context("an error message")?;
            assert!(message.contains("application/json"), "{message}");
        }
    }
    assert_eq!(tickets(&d)?, before);
    assert_eq!(d.tracker.db.local().last_seq(), last_seq, "nothing was queued");
    let (_, ticket) = send(&http, "GET", &format!("{}/api/tickets/{id}", d.url), &[], None).await?;
    assert_eq!(ticket["ticket"]["title"], "mine", "{ticket}");
    assert_eq!(ticket["attachments"].as_array().map(Vec::len), Some(0));
    assert_eq!(ticket["comments"].as_array().map(Vec::len), Some(0));
    let (_, status) = send(&http, "GET", &format!("{}/api/status", d.url), &[], None).await?;
    assert_eq!(status["offline_switch"], false, "{status}");

    // A JSON type with parameters is JSON.
    let (status, answer) = send(
        &http,
        "POST",
        &format!("{}/api/tickets", d.url),
        &[("content-type", "Application/JSON; charset=utf-8")],
        Some(r#"{"title":"also mine"}"#),
    )
    .await?;
    assert_eq!(status, 201, "{answer}");
    Ok(())
}

/// DNS rebinding: a site whose name now resolves to 127.0.0.1 is
/// same-origin with the tracker in the browser, so the browser lets it
/// read the answers and send JSON; the request still names that site as
/// its host. Any host but a loopback one is refused, reads included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_for_another_host_name_is_refused_reads_included() -> Result<()> {
    let d = start().await?;
    let http = reqwest::Client::new();
    let port = d.url.rsplit(':').next().context("a port")?.to_owned();
    let json = ("content-type", "application/json");
    let before = tickets(&d)?;
    let last_seq = d.tracker.db.local().last_seq();
    for host in [
        format!("evil.example:{port}"),
        "evil.example".to_owned(),
        format!("127.0.0.1.evil.example:{port}"),
    ] {
        for (method, path, body) in [
            ("GET", "/api/tickets", None),
            ("GET", "/api/status", None),
            ("GET", "/api/events", None),
            ("POST", "/api/tickets", Some(r#"{"title":"rebound"}"#)),
        ] {
            let (status, answer) = send(
                &http,
                method,
                &format!("{}{path}", d.url),
                &[("host", &host), json],
                body,
            )
            .await?;
            assert_eq!(status, 403, "{method} {path} for {host}: {answer}");
            let message = answer["error"].as_str().context("an error message")?;
            assert!(message.contains(&host), "{message}");
        }
    }
    assert_eq!(tickets(&d)?, before);
    assert_eq!(d.tracker.db.local().last_seq(), last_seq, "nothing was queued");
    for host in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        format!("LOCALHOST:{port}"),
        format!("[::1]:{port}"),
    ] {
        let (status, answer) = send(&http, "GET", &format!("{}/api/status", d.url), &[("host", &host)], None).await?;
        assert_eq!(status, 200, "{host}: {answer}");
    }
    Ok(())
}

/// Every answer tells the browser not to sniff its type and not to show
/// it in another site's frame (its buttons under a decoy page), and the
/// page's policy runs only the tracker's own script.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_forbids_sniffing_and_framing() -> Result<()> {
    let d = start().await?;
    let http = reqwest::Client::new();
    for (path, content_type) in [
        ("/", "text/html"),
        ("/app.js", "text/javascript"),
        ("/app.css", "text/css"),
        ("/api/tickets", "application/json"),
        ("/api/nope", "application/json"),
        ("/../../etc/passwd", "application/json"),
    ] {
        let resp = http.get(format!("{}{path}", d.url)).send().await?;
        let h = resp.headers().clone();
        let got = |name: &str| h.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
        assert!(got("content-type").starts_with(content_type), "{path}: {h:?}");
        assert_eq!(got("x-content-type-options"), "nosniff", "{path}: {h:?}");
        assert_eq!(got("x-frame-options"), "DENY", "{path}: {h:?}");
        let csp = got("content-security-policy");
        assert!(
            csp.contains("frame-ancestors 'none'") && csp.contains("default-src 'self'"),
            "{path}: {csp}"
        );
        let body = resp.text().await?;
        assert!(!body.contains("root:"), "{path} served a file outside the page: {body}");
    }
    Ok(())
}
