//! Propagation benchmark: one write on client A until it is visible on
//! client B, both connected over HTTP to one server.
//!
//! `cargo run --release -p ferry-client --example propagation_bench`
//!
//! Environment: `K` writes (default 200), one at a time; `FERRY_BENCH_RULES`
//! a sync rules file instead of the embedded ticket tracker rules.
//!
//! Prints one JSON line: `{"engine":"ferry","K":..,"median_ms":..,"p99_ms":..}`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ferry_client::{Database, StaticToken};
use ferry_core::{RowData, Value};
use ferry_http::HttpTransport;
use ferry_server::mint_token;
use ferry_transport::Transport;

mod bench_common;

use bench_common::{open_client, BenchServer, SECRET};

const VISIBLE_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT_MS: u64 = 30_000;

fn ticket(i: u64) -> RowData {
    let mut d = RowData::new();
    d.insert("title".into(), Value::Text(format!("Ticket {i}: printer on fire")));
    d.insert("description".into(), Value::Text("The toner smells odd.".into()));
    d.insert("status".into(), Value::Text("open".into()));
    d.insert("deleted_at".into(), Value::Null);
    d.insert("created_at".into(), Value::Text("2026-11-26T10:00:00.000Z".into()));
    d.insert("updated_at".into(), Value::Text("2026-11-26T10:00:00.000Z".into()));
    d.insert("version".into(), Value::Integer(1));
    d
}

/// Wait until `db` holds the ticket `id`, woken by its change feed.
async fn wait_visible(
    db: &Database,
    changes: &mut tokio::sync::broadcast::Receiver<ferry_client::Change>,
    id: &str,
) -> anyhow::Result<()> {
    let key = ("tickets".to_owned(), id.to_owned());
    let deadline = tokio::time::Instant::now() + VISIBLE_TIMEOUT;
    loop {
        if db.local().get("tickets", id)?.is_some() {
            return Ok(());
        }
        match tokio::time::timeout_at(deadline, changes.recv()).await {
            Err(_) => bail!("ticket {id} not visible on client B within {VISIBLE_TIMEOUT:?}"),
            Ok(Ok(change)) if !change.rows.contains(&key) => {}
            // The change names the row, or some changes were missed: look.
            Ok(_) => {}
        }
    }
}

fn percentile_ms(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)].as_secs_f64() * 1000.0
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let k: u64 = std::env::var("K").ok().map(|s| s.parse()).transpose()?.unwrap_or(200);
    if k == 0 {
        bail!("K must be at least 1");
    }
    let tmp = tempfile::tempdir()?;
    let bench = BenchServer::start(tmp.path().join("server")).await?;
    let (rules, base_url) = (&bench.rules, bench.base_url.clone());

    let a = open_client(&tmp.path().join("a"), rules)?;
    let b = open_client(&tmp.path().join("b"), rules)?;
    for (db, user) in [(&a, "user-a"), (&b, "user-b")] {
        let transport: Arc<dyn Transport> = Arc::new(HttpTransport::new(base_url.clone())?);
        let token = mint_token(SECRET, user, 3600, &serde_json::Map::new());
        db.connect(transport, Arc::new(StaticToken(token)));
        let synced = db
            .wait_for_status(CONNECT_TIMEOUT_MS, |s| s.connected && s.has_synced)
            .await;
        if !synced {
            bail!("{user} did not connect: {:?}", db.status());
        }
    }

    let mut changes = b.subscribe_changes();
    let mut latencies = Vec::with_capacity(k as usize);
    for i in 0..k {
        let id = format!("prop-{i:06}");
        let t = Instant::now();
        a.write(|tx| tx.insert("tickets", &id, ticket(i)))?;
        wait_visible(&b, &mut changes, &id)
            .await
            .with_context(|| format!("write {i}"))?;
        latencies.push(t.elapsed());
    }
    latencies.sort();
    println!(
        "{}",
        serde_json::json!({
            "engine": "ferry",
            "K": k,
            "median_ms": (percentile_ms(&latencies, 0.5) * 1000.0).round() / 1000.0,
            "p99_ms": (percentile_ms(&latencies, 0.99) * 1000.0).round() / 1000.0,
        })
    );
    a.disconnect().await;
    b.disconnect().await;
    bench.stop().await;
    Ok(())
}
