//! The tracker's HTTP endpoints, in-process: a real sync server
//! (`ferry_server::run` on a loopback port) and two trackers (alice and
//! bob) over HTTP. Writes sync between them; bad input answers 4xx with a
//! message and writes nothing; the event stream starts with a snapshot.

use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use serde_json::{json, Value};

mod common;

use common::{start_server, start_tracker};

async fn call(client: &reqwest::Client, method: &str, url: &str, body: Option<&str>) -> Result<(u16, Value)> {
    let method = reqwest::Method::from_bytes(method.as_bytes())?;
    let mut req = client.request(method, url);
    if let Some(b) = body {
        req = req.header("content-type", "application/json").body(b.to_owned());
    }
    let resp = req.send().await?;
    let status = resp.status().as_u16();
    let text = resp.text().await?;
    let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Ok((status, value))
}

async fn eventually(what: &str, mut check: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        if check()? {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tracker_endpoints_sync_and_refuse_bad_input() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let server = start_server(dir.path()).await?;
    let alice = start_tracker(server.addr, "alice", dir.path()).await?;
    let bob = start_tracker(server.addr, "bob", dir.path()).await?;
    let http = reqwest::Client::new();

    // Create on alice; bob sees it.
    let (status, created) = call(
        &http,
        "POST",
        &format!("{}/api/tickets", alice.url),
        Some(r#"{"title":"Printer on fire"}"#),
    )
    .await?;
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_str().context("an id")?.to_owned();
    eventually("bob to see alice's ticket", || {
        Ok(bob.tracker.db.local().get("tickets", &id)?.is_some())
    })
    .await?;
    let (_, list) = call(&http, "GET", &format!("{}/api/tickets", bob.url), None).await?;
    assert_eq!(list[0]["title"], "Printer on fire");

    // Edits, children and the status filter.
    let (status, _) = call(
        &http,
        "PATCH",
        &format!("{}/api/tickets/{id}", bob.url),
        Some(r#"{"status":"in_progress","description":"Smoke"}"#),
    )
    .await?;
    assert_eq!(status, 200);
    for (path, body) in [
        ("comments", json!({"body": "on it"})),
        ("attachments", json!({"url": "https://example.com/photo.jpg"})),
        ("assignments", json!({"user_id": "bob"})),
    ] {
        let (status, answer) = call(
            &http,
            "POST",
            &format!("{}/api/tickets/{id}/{path}", bob.url),
            Some(&body.to_string()),
        )
        .await?;
        assert_eq!(status, 201, "{path}: {answer}");
    }
    let (_, in_progress) = call(
        &http,
        "GET",
        &format!("{}/api/tickets?status=in_progress", bob.url),
        None,
    )
    .await?;
    assert_eq!(in_progress.as_array().map(Vec::len), Some(1));
    let (_, done) = call(&http, "GET", &format!("{}/api/tickets?status=done", bob.url), None).await?;
    assert_eq!(done.as_array().map(Vec::len), Some(0));
    eventually("alice to see bob's changes", || {
        let local = alice.tracker.db.local();
        Ok(["comments", "attachments", "assignments"]
            .iter()
            .all(|t| local.scan(t).is_ok_and(|rows| rows.len() == 1))
            && local
                .get("tickets", &id)?
                .is_some_and(|t| t.get("status") == Some(&"in_progress".into())))
    })
    .await?;
    let (_, detail) = call(&http, "GET", &format!("{}/api/tickets/{id}", alice.url), None).await?;
    assert_eq!(detail["ticket"]["status"], "in_progress");
    assert_eq!(detail["comments"][0]["body"], "on it");
    assert_eq!(detail["attachments"][0]["url"], "https://example.com/photo.jpg");
    assert_eq!(detail["assignments"][0]["user_id"], "bob");
    let (_, users) = call(&http, "GET", &format!("{}/api/users", alice.url), None).await?;
    assert_eq!(users.as_array().map(Vec::len), Some(2), "{users}");

    // Bad input: 4xx with a message, nothing written.
    let long = "x".repeat(201);
    let bad: Vec<(&str, String, Option<String>, u16)> = vec![
        ("POST", "/api/tickets".into(), Some(r#"{"title":"   "}"#.into()), 400),
        (
            "POST",
            "/api/tickets".into(),
            Some(json!({ "title": long }).to_string()),
            400,
        ),
        ("POST", "/api/tickets".into(), Some("{not json".into()), 400),
        (
            "POST",
            "/api/tickets".into(),
            Some(r#"{"title":"x","colour":"red"}"#.into()),
            400,
        ),
        (
            "POST",
            "/api/tickets".into(),
            Some(r#"{"title":"x","status":"lost"}"#.into()),
            400,
        ),
        (
            "POST",
            "/api/tickets".into(),
            Some(json!({ "title": "x".repeat(70_000) }).to_string()),
            413,
        ),
        (
            "PATCH",
            "/api/tickets/nope".into(),
            Some(r#"{"title":"x"}"#.into()),
            404,
        ),
        (
            "PATCH",
            format!("/api/tickets/{id}"),
            Some(r#"{"title":""}"#.into()),
            400,
        ),
        ("PATCH", format!("/api/tickets/{id}"), Some("{}".into()), 400),
        ("DELETE", "/api/tickets/nope".into(), None, 404),
        (
            "POST",
            "/api/tickets/nope/comments".into(),
            Some(r#"{"body":"hi"}"#.into()),
            404,
        ),
        (
            "POST",
            format!("/api/tickets/{id}/attachments"),
            Some(r#"{"url":"javascript:alert(1)"}"#.into()),
            400,
        ),
        (
            "POST",
            format!("/api/tickets/{id}/assignments"),
            Some(r#"{"user_id":"mallory"}"#.into()),
            400,
        ),
        ("DELETE", "/api/comments/nope".into(), None, 404),
        (
            "POST",
            "/api/conflicts/nope/resolve".into(),
            Some(r#"{"choice":"local"}"#.into()),
            404,
        ),
        (
            "POST",
            "/api/conflicts/nope/resolve".into(),
            Some(r#"{"choice":"both"}"#.into()),
            400,
        ),
        ("GET", "/api/tickets?status=lost".into(), None, 400),
        ("GET", "/api/nothing".into(), None, 404),
    ];
    let seq_before = alice.tracker.db.local().last_seq();
    let tickets_before = alice.tracker.db.local().scan("tickets")?;
    for (method, path, body, want) in bad {
        let (status, answer) = call(&http, method, &format!("{}{path}", alice.url), body.as_deref()).await?;
        assert_eq!(status, want, "{method} {path}: {answer}");
        if want != 413 {
            let message = answer["error"].as_str().unwrap_or_default();
            assert!(!message.is_empty(), "{method} {path}: no message in {answer}");
        }
    }
    assert_eq!(
        alice.tracker.db.local().last_seq(),
        seq_before,
        "a refused request queued a write"
    );
    assert_eq!(alice.tracker.db.local().scan("tickets")?, tickets_before);

    // The event stream starts with a snapshot of every table.
    let mut resp = http.get(format!("{}/api/events", alice.url)).send().await?;
    let mut text = String::new();
    while !text.contains("\n\n") {
        let Some(chunk) = tokio::time::timeout(Duration::from_secs(5), resp.chunk()).await?? else {
            break;
        };
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(text.starts_with("event: snapshot\n"), "{text}");
    assert!(text.contains("Printer on fire"), "{text}");

    // The status shows the upload side and the download progress.
    let (_, status) = call(&http, "GET", &format!("{}/api/status", alice.url), None).await?;
    assert_eq!(status["upload_queue"], 0, "{status}");
    assert_eq!(status["pending_transactions"], 0, "{status}");
    assert!(status.get("download_progress").is_some(), "{status}");

    // The offline switch.
    let (_, status) = call(
        &http,
        "POST",
        &format!("{}/api/sync", bob.url),
        Some(r#"{"offline":true}"#),
    )
    .await?;
    assert_eq!(status["offline_switch"], true);
    assert_eq!(status["connected"], false);
    let (_, status) = call(
        &http,
        "POST",
        &format!("{}/api/sync", bob.url),
        Some(r#"{"offline":false}"#),
    )
    .await?;
    assert_eq!(status["offline_switch"], false);
    eventually("bob to reconnect", || Ok(bob.tracker.db.status().connected)).await?;

    // Delete syncs.
    let (status, _) = call(&http, "DELETE", &format!("{}/api/tickets/{id}", bob.url), None).await?;
    assert_eq!(status, 200);
    eventually("alice to see the delete", || {
        Ok(alice.tracker.db.local().get("tickets", &id)?.is_none())
    })
    .await?;
    server.shutdown().await?;
    Ok(())
}
