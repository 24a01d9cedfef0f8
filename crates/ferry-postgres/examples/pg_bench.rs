//! PostgreSQL benchmark: upload throughput against a plain-INSERT floor,
//! and propagation between server instances on one database.
//!
//! ```text
//! cargo run --release -p ferry-postgres --example pg_bench [-- --instances 1,3 --streams 1000 --writes 20]
//! ```
//!
//! Uses the machine's PostgreSQL (`FERRY_TEST_DATABASE_URL`, default
//! `postgres://postgres@127.0.0.1:5432/test`) in fresh scratch schemas per
//! configuration, dropped at the end. For N instances it starts N servers
//! (`ferry_server::run`, in this process, each its own service, pool and
//! clock node) on the same schemas, the ticket tracker rules with
//! `create_tables`, then:
//!
//! 1. propagation: S stream readers (in this process, each its own user
//!    and client id, over HTTP `POST /sync/stream`) on the instances other
//!    than instance 0 (with one instance: on instance 0 itself); W writes,
//!    one at a time, each one ticket PUT uploaded through instance 0; each
//!    write waits until every stream read the `checkpoint_complete` line
//!    covering it, or 10 s (the rest count as `missing`). Propagation =
//!    the time a stream read that line minus the time the upload was sent.
//!    The streams are closed afterwards.
//! 2. upload throughput: C client ids at once, each uploading U batches
//!    of B ticket PUTs (one transaction per upload) over HTTP, client c
//!    through instance c mod N; ops/s over the wall time of all of them.
//! 3. `floor_ops_per_s`: the same rows inserted into a plain copy of the
//!    tickets table (`CREATE TABLE .. (LIKE tickets INCLUDING ALL)`, no
//!    triggers) by C tokio-postgres connections at once, B rows per
//!    multi-row INSERT.
//!
//! Both sides use plain TCP (the servers' URL gets `sslmode=disable`
//! unless `FERRY_TEST_DATABASE_URL` names an `sslmode`).
//!
//! One JSON line per N on stdout:
//! `{"engine":"ferry-postgres","instances":N,"upload_ops_per_s":..,"propagation_p50_ms":..,
//! "propagation_p99_ms":..,"floor_ops_per_s":..,"streams":S,..}`.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use ferry_core::{row_data, CrudEntry, CrudOp, RowData, Value};
use ferry_http::HttpServerOptions;
use ferry_postgres::scratch::{test_database_url, ScratchSchemas};
use ferry_protocol::{
    decode_line, StreamLine, StreamRequest, UploadRequest, UploadResponse, UploadTransaction, DEFAULT_MAX_LINE_BYTES,
};
use ferry_server::{mint_token, BoundServer, PostgresConfig, ServerConfig, ServiceOptions};
use tokio::sync::{mpsc, Semaphore};

/// How long one write may take to reach every stream.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Streams being opened at once.
const OPEN_CONCURRENCY: usize = 32;
/// Pooled PostgreSQL connections per instance.
const POOL_PER_INSTANCE: usize = 10;
/// Row ids of the propagation writes: this prefix and the write's index.
const TICKET_PREFIX: &str = "prop-";

#[derive(Clone, Copy, Debug)]
struct Params {
    streams: usize,
    writes: usize,
    clients: usize,
    uploads_per_client: usize,
    batch: usize,
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let number = |name: &str, default: usize| -> Result<usize> {
        match flag(&args, name) {
            Some(v) => v.parse().with_context(|| format!("{name} {v:?}")),
            None => Ok(default),
        }
    };
    let params = Params {
        streams: number("--streams", 1000)?,
        writes: number("--writes", 20)?.max(1),
        clients: number("--clients", 8)?.max(1),
        uploads_per_client: number("--uploads", 25)?.max(1),
        batch: number("--batch", 100)?.max(1),
    };
    let instances: Vec<usize> = flag(&args, "--instances")
        .unwrap_or_else(|| "1,3".to_owned())
        .split(',')
        .map(|s| s.trim().parse::<usize>().with_context(|| format!("--instances {s:?}")))
        .collect::<Result<_>>()?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async {
        for n in instances {
            if n == 0 {
                bail!("--instances: at least 1");
            }
            let line = run_config(n, params).await.with_context(|| format!("{n} instances"))?;
            println!("{line}");
        }
        Ok(())
    })
}

/// The value after `name` in the arguments.
fn flag(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// A JSON object with its keys in the given order.
fn ordered_json(pairs: &[(&str, serde_json::Value)]) -> String {
    let fields: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{}:{v}", serde_json::Value::from(*k)))
        .collect();
    format!("{{{}}}", fields.join(","))
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// The values of a benchmark ticket.
fn ticket(title: &str) -> RowData {
    row_data([
        ("title", Value::from(title)),
        ("description", Value::from("written by pg_bench")),
        ("status", Value::from("open")),
        ("version", Value::from(1i64)),
    ])
}

/// One upload of one transaction putting `rows` (id, title) into
/// `tickets`, with seqs from `first_seq`.
fn upload(client_id: &str, tx_id: u64, first_seq: u64, rows: &[(String, String)]) -> UploadRequest {
    let ops = rows
        .iter()
        .enumerate()
        .map(|(i, (id, title))| CrudEntry {
            seq: first_seq + i as u64,
            tx_id,
            op: CrudOp::Put {
                table: "tickets".to_owned(),
                id: id.clone(),
                data: ticket(title),
            },
            previous: None,
            metadata: None,
            hlc: None,
        })
        .collect();
    UploadRequest {
        client_id: client_id.to_owned(),
        transactions: vec![UploadTransaction { tx_id, ops }],
    }
}

/// Send an upload and check every op was applied.
async fn send_upload(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    request: &UploadRequest,
) -> Result<UploadResponse> {
    let response = http
        .post(format!("{url}/sync/upload"))
        .bearer_auth(token)
        .header("content-type", "application/json")
        .body(serde_json::to_vec(request)?)
        .send()
        .await?;
    let status = response.status();
    let body = response.bytes().await?;
    if !status.is_success() {
        bail!("upload: {status}: {}", String::from_utf8_lossy(&body));
    }
    let answer: UploadResponse = serde_json::from_slice(&body)?;
    let sent: usize = request.transactions.iter().map(|t| t.ops.len()).sum();
    if answer.outcomes.len() != sent {
        bail!("upload: {} outcomes for {sent} ops", answer.outcomes.len());
    }
    if let Some(bad) = answer
        .outcomes
        .iter()
        .find(|o| !matches!(o.outcome, ferry_protocol::Outcome::Applied))
    {
        bail!("upload: an op was not applied: {bad:?}");
    }
    Ok(answer)
}

async fn run_config(n: usize, p: Params) -> Result<String> {
    let url = test_database_url();
    let scratch = tokio::task::spawn_blocking(move || ScratchSchemas::create(&url))
        .await?
        .map_err(|e| anyhow!("PostgreSQL is needed (FERRY_TEST_DATABASE_URL): {e}"))?;
    let secret = format!("pg-bench-{}", now_us());
    let result = bench(n, p, &scratch, &secret).await;
    // Drop the schemas off the runtime's threads (it runs SQL on a
    // thread of its own and waits for it).
    tokio::task::spawn_blocking(move || drop(scratch)).await?;
    result
}

/// The servers' URL: plain TCP unless the URL names an `sslmode`, as the
/// floor's connections (`NoTls`) are; Ferry's default (`prefer`) would
/// use TLS where the server offers it, and the two would not compare.
fn same_transport_as_floor(url: &str) -> String {
    if url.contains("sslmode=") {
        url.to_owned()
    } else if !url.starts_with("postgres") {
        format!("{url} sslmode=disable")
    } else if url.contains('?') {
        format!("{url}&sslmode=disable")
    } else {
        format!("{url}?sslmode=disable")
    }
}

async fn bench(n: usize, p: Params, scratch: &ScratchSchemas, secret: &str) -> Result<String> {
    let mut servers: Vec<BoundServer> = Vec::new();
    for _ in 0..n {
        let config = ServerConfig {
            database_url: Some(same_transport_as_floor(&scratch.url)),
            postgres: PostgresConfig {
                ferry_schema: scratch.ferry.clone(),
                app_schema: scratch.app.clone(),
                create_tables: true,
                max_connections: POOL_PER_INSTANCE,
            },
            listen_addr: ([127, 0, 0, 1], 0).into(),
            jwt_secret: Some(secret.to_owned()),
            http: HttpServerOptions {
                max_connections: p.streams + 256,
                max_streams_per_user: 0,
                max_uploads_per_user_per_s: 0,
                ..HttpServerOptions::default()
            },
            service: ServiceOptions {
                max_concurrent_streams: p.streams + 256,
                ..ServiceOptions::default()
            },
            ..ServerConfig::default()
        };
        // One after the other: the first creates the tables.
        servers.push(ferry_server::run(config, std::future::pending()).await?);
    }
    let urls: Vec<String> = servers.iter().map(|s| format!("http://{}", s.addr)).collect();
    let http = reqwest::Client::builder().pool_max_idle_per_host(64).build()?;

    // 1. Propagation from instance 0 to streams on the others.
    let stream_urls: Vec<String> = if n == 1 {
        vec![urls[0].clone()]
    } else {
        urls[1..].to_vec()
    };
    let (latencies_ms, missing) = propagation(p, &urls[0], &stream_urls, secret, &http).await?;

    // 2. Upload throughput.
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..p.clients {
        let (http, url) = (http.clone(), urls[c % n].clone());
        let token = mint_token(secret, &format!("loader-{c}"), 3600, &serde_json::Map::new());
        tasks.push(tokio::spawn(async move {
            let client_id = format!("loader-{c}");
            for u in 0..p.uploads_per_client {
                let rows = load_rows(c, u, p.batch);
                let first_seq = (u * p.batch) as u64 + 1;
                send_upload(&http, &url, &token, &upload(&client_id, u as u64 + 1, first_seq, &rows)).await?;
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let upload_s = started.elapsed().as_secs_f64();
    let total_ops = p.clients * p.uploads_per_client * p.batch;

    // 3. The floor: the same rows by plain multi-row INSERTs.
    let floor_s = floor(scratch, p).await?;

    for s in servers {
        tokio::time::timeout(Duration::from_secs(30), s.shutdown())
            .await
            .context("server shutdown")??;
    }

    let mut latencies_ms = latencies_ms;
    latencies_ms.sort_by(f64::total_cmp);
    Ok(ordered_json(&[
        ("engine", serde_json::json!("ferry-postgres")),
        ("instances", serde_json::json!(n)),
        (
            "upload_ops_per_s",
            serde_json::json!(round2(total_ops as f64 / upload_s)),
        ),
        (
            "propagation_p50_ms",
            serde_json::json!(round2(percentile(&latencies_ms, 0.50))),
        ),
        (
            "propagation_p99_ms",
            serde_json::json!(round2(percentile(&latencies_ms, 0.99))),
        ),
        ("floor_ops_per_s", serde_json::json!(round2(total_ops as f64 / floor_s))),
        ("streams", serde_json::json!(p.streams)),
        (
            "streams_on",
            serde_json::json!(if n == 1 {
                "the writing instance"
            } else {
                "the other instances"
            }),
        ),
        ("writes", serde_json::json!(p.writes)),
        ("missing", serde_json::json!(missing)),
        ("upload_clients", serde_json::json!(p.clients)),
        ("ops_per_upload", serde_json::json!(p.batch)),
        ("total_ops", serde_json::json!(total_ops)),
    ]))
}

/// Rows (id, title) of client `c`'s upload `u`.
fn load_rows(c: usize, u: usize, batch: usize) -> Vec<(String, String)> {
    (0..batch)
        .map(|i| {
            let j = u * batch + i;
            (format!("load-{c}-{j}"), format!("ticket {c}-{j}"))
        })
        .collect()
}

/// Seconds the floor's inserts took.
async fn floor(scratch: &ScratchSchemas, p: Params) -> Result<f64> {
    let table = format!("\"{}\".floor_tickets", scratch.app);
    let (setup, driver) = tokio_postgres::connect(&scratch.url, tokio_postgres::NoTls).await?;
    let driver = tokio::spawn(driver);
    setup
        .batch_execute(&format!(
            "CREATE TABLE {table} (LIKE \"{}\".tickets INCLUDING ALL)",
            scratch.app
        ))
        .await?;
    drop(setup);
    let _ = driver.await;

    let mut clients = Vec::new();
    for _ in 0..p.clients {
        let (client, driver) = tokio_postgres::connect(&scratch.url, tokio_postgres::NoTls).await?;
        tokio::spawn(driver);
        clients.push(client);
    }
    let quote = |s: &str| format!("'{}'", s.replace('\'', "''"));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (c, client) in clients.into_iter().enumerate() {
        let table = table.clone();
        tasks.push(tokio::spawn(async move {
            for u in 0..p.uploads_per_client {
                let values: Vec<String> = load_rows(c, u, p.batch)
                    .iter()
                    .map(|(id, title)| {
                        format!(
                            "({}, {}, {}, {}, 1)",
                            quote(id),
                            quote(title),
                            quote("written by pg_bench"),
                            quote("open")
                        )
                    })
                    .collect();
                client
                    .batch_execute(&format!(
                        "INSERT INTO {table} (id, title, description, status, version) VALUES {}",
                        values.join(", ")
                    ))
                    .await?;
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(started.elapsed().as_secs_f64())
}

/// A stream reader's news.
#[derive(Debug)]
enum Event {
    /// The stream got its first `checkpoint_complete`.
    Ready,
    /// The stream read the `checkpoint_complete` covering write `k` at `at_us`.
    Covered { k: usize, at_us: u64 },
    /// The stream failed or ended.
    Failed(String),
}

/// Open the streams, make the writes, close the streams: the latencies
/// (ms) and how many (write, stream) pairs did not arrive within 10 s.
async fn propagation(
    p: Params,
    write_url: &str,
    stream_urls: &[String],
    secret: &str,
    http: &reqwest::Client,
) -> Result<(Vec<f64>, usize)> {
    let (tx, mut rx) = mpsc::unbounded_channel::<Event>();
    let stream_http = reqwest::Client::builder().pool_max_idle_per_host(0).build()?;
    let gate = Arc::new(Semaphore::new(OPEN_CONCURRENCY));
    let mut readers = Vec::new();
    for i in 0..p.streams {
        let (tx, http, gate) = (tx.clone(), stream_http.clone(), gate.clone());
        let (url, secret) = (stream_urls[i % stream_urls.len()].clone(), secret.to_owned());
        readers.push(tokio::spawn(async move {
            if let Err(e) = read_stream(i, &http, &url, &secret, &gate, &tx).await {
                let _ = tx.send(Event::Failed(format!("stream {i}: {e:#}")));
            }
        }));
    }
    drop(tx);
    let started = Instant::now();
    let mut ready = 0usize;
    while ready < p.streams {
        match tokio::time::timeout(Duration::from_secs(600), rx.recv()).await {
            Ok(Some(Event::Ready)) => ready += 1,
            Ok(Some(Event::Failed(e))) => bail!("{ready} streams ready, then {e}"),
            Ok(Some(Event::Covered { .. })) => {}
            Ok(None) | Err(_) => bail!("only {ready} of {} streams ready within 600 s", p.streams),
        }
    }
    eprintln!(
        "pg_bench: {} streams open in {:.1} s",
        p.streams,
        started.elapsed().as_secs_f64()
    );

    let token = mint_token(secret, "prop-writer", 3600, &serde_json::Map::new());
    let mut latencies = Vec::with_capacity(p.streams * p.writes);
    let mut missing = 0usize;
    let mut failures = 0usize;
    for k in 0..p.writes {
        let rows = vec![(format!("{TICKET_PREFIX}{k}"), format!("ticket {k}"))];
        let request = upload("prop-writer", k as u64 + 1, k as u64 + 1, &rows);
        let sent_us = now_us();
        send_upload(http, write_url, &token, &request).await?;
        let deadline = tokio::time::Instant::now() + WRITE_TIMEOUT;
        let mut got = 0usize;
        while got < p.streams {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(Event::Covered { k: seen, at_us })) if seen == k => {
                    got += 1;
                    latencies.push(at_us.saturating_sub(sent_us) as f64 / 1000.0);
                }
                Ok(Some(Event::Failed(e))) => {
                    failures += 1;
                    if failures <= 10 {
                        eprintln!("pg_bench: {e}");
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        missing += p.streams - got;
    }
    for r in &readers {
        r.abort();
    }
    for r in readers {
        let _ = r.await;
    }
    Ok((latencies, missing))
}

/// Open stream `i` (user and client id `reader-i`) and report what it
/// reads until it ends.
async fn read_stream(
    i: usize,
    http: &reqwest::Client,
    url: &str,
    secret: &str,
    gate: &Semaphore,
    tx: &mpsc::UnboundedSender<Event>,
) -> Result<()> {
    let who = format!("reader-{i}");
    let token = mint_token(secret, &who, 3600, &serde_json::Map::new());
    let request = StreamRequest {
        client_id: who,
        buckets: Vec::new(),
    };
    let permit = gate.acquire().await?;
    let mut response = http
        .post(format!("{url}/sync/stream"))
        .bearer_auth(token)
        .header("content-type", "application/json")
        .body(serde_json::to_vec(&request)?)
        .send()
        .await?;
    if !response.status().is_success() {
        bail!("{}", response.status());
    }
    let mut permit = Some(permit);
    let mut buf: Vec<u8> = Vec::new();
    // Writes whose data this stream read and whose checkpoint it has not
    // completed yet.
    let mut pending: Vec<usize> = Vec::new();
    loop {
        while let Some(end) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=end).collect();
            match decode_line::<StreamLine>(&line, DEFAULT_MAX_LINE_BYTES)? {
                StreamLine::Data(batch) => pending.extend(batch.ops.iter().filter_map(|op| {
                    op.object_id
                        .as_deref()
                        .and_then(|id| id.strip_prefix(TICKET_PREFIX))
                        .and_then(|k| k.parse::<usize>().ok())
                })),
                StreamLine::CheckpointComplete { .. } => {
                    let at_us = now_us();
                    if permit.take().is_some() {
                        tx.send(Event::Ready)?;
                    }
                    for k in pending.drain(..) {
                        tx.send(Event::Covered { k, at_us })?;
                    }
                }
                StreamLine::Error(e) => bail!("error line: {e:?}"),
                _ => {}
            }
        }
        match response.chunk().await? {
            Some(bytes) => buf.extend_from_slice(&bytes),
            None => bail!("the server ended the stream"),
        }
    }
}
