//! Quickstart: a client that works offline, then syncs with a running
//! `ferry-server` (start one with `cargo xtask demo` or
//! `cargo run -p ferry-server`).
//!
//! ```sh
//! cargo run -p ferry-client --example sync_quickstart -- [SERVER_URL] [USER] [DATA_DIR]
//! ```
//!
//! Defaults: `http://127.0.0.1:8080`, user `ann`, data in
//! `data/quickstart-<user>`. The token is minted with the server's dev
//! secret (or taken from `FERRY_TOKEN`). Run it twice with different users
//! and each sees the other's tickets.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use ferry_client::query::{col, Order};
use ferry_client::{ClientOptions, Database, Query, StaticToken};
use ferry_core::{row_data, Schema, SystemClock, Value};
use ferry_http::HttpTransport;
use ferry_queue::{LocalDbOptions, QueueError};
use ferry_sqlite::SqliteStore;

/// The client schema: the tables the server's default sync rules (the
/// ticket tracker's, which `ferry-server` embeds) sync, derived from the
/// rules rather than copied, plus this client's index on ticket status.
/// A server started with other rules (`--rules`) needs their schema.
fn schema() -> anyhow::Result<Schema> {
    let derived = ferry_server::SyncRules::ticket_tracker()?.client_schema();
    Ok(Schema::new(derived.tables().cloned().map(|t| {
        if t.name == "tickets" {
            t.index("by_status", &["status"])
        } else {
            t
        }
    }))?)
}

fn now_iso(clock_ms: u64) -> String {
    format!("{clock_ms}")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let server = args.next().unwrap_or_else(|| "http://127.0.0.1:8080".into());
    let user = args.next().unwrap_or_else(|| "ann".into());
    let dir = args.next().unwrap_or_else(|| format!("data/quickstart-{user}"));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {dir}"))?;

    let store = SqliteStore::open(std::path::Path::new(&dir).join("client.db"), schema()?)?;
    let options = ClientOptions {
        local: LocalDbOptions {
            clock: Arc::new(SystemClock),
            ..LocalDbOptions::default()
        },
        ..ClientOptions::default()
    };
    let db = Database::open(Arc::new(store), options)?;
    println!("client {} ({user}) on {dir}", db.client_id());

    // 1. Offline: write first, no server needed.
    let id = format!("{user}-{}", db.local().scan("tickets")?.len() + 1);
    let stamp = now_iso(ferry_core::Clock::now_ms(&SystemClock));
    db.write(|tx| {
        tx.insert(
            "tickets",
            &id,
            row_data([
                ("title", Value::from(format!("Printer on fire, reported by {user}"))),
                ("status", Value::from("pending")),
                ("created_at", Value::from(stamp.as_str())),
                ("updated_at", Value::from(stamp.as_str())),
                ("version", Value::from(1)),
            ]),
        )?;
        tx.insert(
            "comments",
            &format!("{id}-c1"),
            row_data([
                ("ticket_id", Value::from(id.as_str())),
                ("user_id", Value::from(user.as_str())),
                ("body", Value::from("on it")),
            ]),
        )?;
        Ok::<_, QueueError>(())
    })?;
    println!(
        "wrote ticket {id} offline; upload queue holds {}",
        db.local().upload_queue_len()
    );

    // 2. A live query over the visible state (synced + pending writes).
    let query = Query::from("tickets")
        .filter(col("status").eq("pending"))
        .select_cols(["id", "title", "updated_at"])
        .order_by(col("updated_at"), Order::Desc)
        .limit(10);
    let (tx, mut diffs) = tokio::sync::mpsc::unbounded_channel();
    let (live, initial) = db.live_query(&query, move |d| {
        let _ = tx.send(d.clone());
    })?;
    println!("live query: {} pending tickets before syncing", initial.rows.len());

    // 3. Connect and sync.
    let token = match std::env::var("FERRY_TOKEN") {
        Ok(t) => t,
        Err(_) => ferry_server::mint_token(ferry_server::DEV_JWT_SECRET, &user, 3600, &serde_json::Map::new()),
    };
    let transport = HttpTransport::new(server.clone())?;
    let before = db.status();
    println!(
        "upload queue before connecting: {} ops in {} transactions, the oldest waiting {} ms",
        before.pending_ops,
        before.pending_transactions,
        before.oldest_pending_age_ms.unwrap_or(0)
    );
    // Download progress of the initial sync, as an app would show it.
    let mut statuses = db.watch_status();
    let progress = tokio::spawn(async move {
        let mut shown = None;
        while statuses.changed().await.is_ok() {
            let status = statuses.borrow_and_update().clone();
            if let Some(p) = status.download_progress {
                if shown != Some((p.ops_received, p.ops_expected)) {
                    println!("  downloading: {} of {} ops", p.ops_received, p.ops_expected);
                    shown = Some((p.ops_received, p.ops_expected));
                }
            }
            if status.has_synced {
                break;
            }
        }
    });
    db.connect(Arc::new(transport), Arc::new(StaticToken(token)));
    println!("connecting to {server} ...");
    let settled = db.wait_until_settled(15_000).await;
    progress.abort();
    if !settled {
        let status = db.status();
        anyhow::bail!(
            "could not sync with {server} (is `cargo xtask demo` running?): {}",
            status
                .last_download_error
                .or(status.last_upload_error)
                .unwrap_or_else(|| "no answer".into())
        );
    }
    let status = db.status();
    println!(
        "synced: checkpoint op {}, upload queue {}, rejections {}",
        status.last_applied_op_id.unwrap_or(0),
        db.local().upload_queue_len(),
        db.rejections()?.len()
    );

    // 4. What the client now sees: its own and everyone else's tickets.
    println!("\npending tickets (live query, newest first):");
    for row in live.current()?.rows {
        let title = row.get("title").as_text().unwrap_or_default().to_owned();
        println!(
            "  {:<12} {} {}",
            row.id().unwrap_or("?"),
            title,
            if row.pending { "(pending)" } else { "" }
        );
    }
    // Watch for changes from other clients for a few seconds.
    let watch_s: u64 = std::env::var("FERRY_WATCH_S")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    println!("\nwatching for changes for {watch_s} s (run this example again as another user) ...");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(watch_s);
    while let Ok(Some(diff)) = tokio::time::timeout_at(deadline, diffs.recv()).await {
        for added in &diff.added {
            println!(
                "  + {} {}",
                added.row.id().unwrap_or("?"),
                added.row.get("title").as_text().unwrap_or_default()
            );
        }
        for removed in &diff.removed {
            println!("  - {}", removed.row.id().unwrap_or("?"));
        }
    }
    db.disconnect().await;
    println!("done");
    Ok(())
}
