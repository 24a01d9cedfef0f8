//! Fan-out benchmark: one server, S open streams, W writes.
//!
//! ```text
//! cargo run --release -p ferry-server --example fanout_bench [-- --streams 100,1000,5000 --writes 20]
//! ```
//!
//! For each S it starts a server in this process (`ferry_server::run`,
//! embedded SQLite in a temporary directory) and re-executes itself as a
//! child process holding S stream readers (`--readers S --url U --secret
//! X`), so the readers' CPU is not the server's. Every reader is its own
//! user with its own client id and streams the ticket tracker's buckets
//! over HTTP (`POST /sync/stream`); tickets are in the `global` bucket, so
//! every write reaches every stream.
//!
//! The parent then makes W writes one at a time (one ticket PUT uploaded
//! over `POST /sync/upload`). Before each it tells the child (a line on
//! its stdin) and waits until the child reports (a line on its stdout)
//! that every stream read the `checkpoint_complete` line covering it, or
//! 10 s passed (the streams still without it count as `missing`).
//! Propagation of write k to stream s: the system time at which stream s
//! read that `checkpoint_complete` line minus the system time just before
//! the parent sent the upload (both processes on one machine).
//!
//! One JSON line per S on stdout:
//! `{"engine":"ferry","streams":S,"writes":W,"propagation_p50_ms":..,
//! "propagation_p99_ms":..,"server_cpu_ms_per_write":..,"rss_mb":..,"missing":..}`
//! where server CPU is this process's utime + stime (`/proc/self/stat`,
//! 100 ticks per second) over the write phase divided by W (it includes
//! the small cost of the parent's own upload requests), and `rss_mb` is
//! this process's `VmRSS` at the end of the write phase (the S values run
//! one after the other in this process, smallest first).
//! `server_write_syscalls_per_write` (write-type system calls of this
//! process over the write phase, `syscw` of `/proc/self/io`, per write)
//! shows whether each stream takes one socket write per write.

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use ferry_core::{row_data, CrudEntry, CrudOp, Value};
use ferry_http::HttpServerOptions;
use ferry_protocol::{
    decode_line, StreamLine, StreamRequest, UploadRequest, UploadResponse, UploadTransaction, DEFAULT_MAX_LINE_BYTES,
};
use ferry_server::{mint_token, ServerConfig, ServiceOptions};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, Semaphore};

/// How long one write may take to reach every stream.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Streams being opened at once by the child.
const OPEN_CONCURRENCY: usize = 64;
/// Clock ticks per second of `/proc/self/stat` (`getconf CLK_TCK`, 100
/// on Linux).
const CLK_TCK: f64 = 100.0;
/// Row ids of the benchmark's tickets: this prefix and the write's index.
const TICKET_PREFIX: &str = "bench-";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    if let Some(readers) = flag(&args, "--readers") {
        let url = flag(&args, "--url").ok_or_else(|| anyhow!("--readers needs --url"))?;
        let secret = flag(&args, "--secret").ok_or_else(|| anyhow!("--readers needs --secret"))?;
        let n: usize = readers.parse().context("--readers")?;
        return rt.block_on(readers_main(n, url, secret));
    }
    let streams: Vec<usize> = flag(&args, "--streams")
        .unwrap_or_else(|| "100,1000,5000".to_owned())
        .split(',')
        .map(|s| s.trim().parse::<usize>().with_context(|| format!("--streams {s:?}")))
        .collect::<Result<_>>()?;
    let writes: usize = flag(&args, "--writes")
        .unwrap_or_else(|| "20".to_owned())
        .parse()
        .context("--writes")?;
    if writes == 0 {
        bail!("--writes must be at least 1");
    }
    rt.block_on(async {
        for s in streams {
            let line = run_one(s, writes).await.with_context(|| format!("{s} streams"))?;
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

/// This process's user + system CPU time in milliseconds.
fn cpu_ms() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    // Fields after the command name (which may hold spaces), from field 3.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow!("no ')' in /proc/self/stat"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| -> Result<f64> {
        Ok(fields
            .get(i)
            .ok_or_else(|| anyhow!("/proc/self/stat too short"))?
            .parse::<f64>()?)
    };
    // utime is field 14, stime field 15 (1-based; index 0 here is field 3).
    Ok((tick(11)? + tick(12)?) * 1000.0 / CLK_TCK)
}

/// Write-type system calls this process made so far (`syscw` of
/// `/proc/self/io`: one per `write`/`writev`/`sendmsg`).
fn write_syscalls() -> Result<u64> {
    let io = std::fs::read_to_string("/proc/self/io")?;
    Ok(io
        .lines()
        .find_map(|l| l.strip_prefix("syscw:"))
        .ok_or_else(|| anyhow!("no syscw in /proc/self/io"))?
        .trim()
        .parse::<u64>()?)
}

/// This process's resident set in MiB.
fn rss_mb() -> Result<f64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .ok_or_else(|| anyhow!("no VmRSS in /proc/self/status"))?
        .parse::<f64>()?;
    Ok(kb / 1024.0)
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

/// One ticket PUT as the write's upload.
fn ticket_upload(k: usize) -> UploadRequest {
    let seq = k as u64 + 1;
    let id = format!("{TICKET_PREFIX}{k}");
    let data = row_data([
        ("title", Value::from(format!("ticket {k}"))),
        ("description", Value::from("written by fanout_bench")),
        ("status", Value::from("open")),
        ("version", Value::from(1i64)),
    ]);
    UploadRequest {
        client_id: "fanout-writer".to_owned(),
        transactions: vec![UploadTransaction {
            tx_id: seq,
            ops: vec![CrudEntry {
                seq,
                tx_id: seq,
                op: CrudOp::Put {
                    table: "tickets".to_owned(),
                    id,
                    data,
                },
                previous: None,
                metadata: None,
                hlc: None,
            }],
        }],
    }
}

/// What the child reports for one write.
#[derive(serde::Deserialize)]
struct WriteReport {
    write: usize,
    /// When each stream that got it read the covering `checkpoint_complete` (µs).
    times_us: Vec<u64>,
}

async fn run_one(streams: usize, writes: usize) -> Result<String> {
    let dir = tempfile::tempdir()?;
    let secret = format!("fanout-bench-{}", now_us());
    let config = ServerConfig {
        data_dir: dir.path().to_path_buf(),
        listen_addr: ([127, 0, 0, 1], 0).into(),
        jwt_secret: Some(secret.clone()),
        http: HttpServerOptions {
            max_connections: streams + 256,
            max_streams_per_user: 0,
            max_uploads_per_user_per_s: 0,
            ..HttpServerOptions::default()
        },
        service: ServiceOptions {
            max_concurrent_streams: streams + 256,
            ..ServiceOptions::default()
        },
        ..ServerConfig::default()
    };
    let server = ferry_server::run(config, std::future::pending()).await?;
    let url = format!("http://{}", server.addr);

    let mut child = tokio::process::Command::new(std::env::current_exe()?)
        .args(["--readers", &streams.to_string(), "--url", &url, "--secret", &secret])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .context("starting the readers' process")?;
    let mut to_child = child.stdin.take().ok_or_else(|| anyhow!("no child stdin"))?;
    let mut from_child = BufReader::new(child.stdout.take().ok_or_else(|| anyhow!("no child stdout"))?).lines();

    // Every stream open and through its first checkpoint.
    let ready = tokio::time::timeout(Duration::from_secs(600), from_child.next_line())
        .await
        .context("the readers were not ready within 600 s")??
        .ok_or_else(|| anyhow!("the readers' process ended before it was ready"))?;
    let ready: serde_json::Value = serde_json::from_str(&ready)?;
    if ready["ready"].as_u64() != Some(streams as u64) {
        bail!("readers not ready: {ready}");
    }

    let http = reqwest::Client::new();
    let token = mint_token(&secret, "fanout-writer", 3600, &serde_json::Map::new());
    let mut latencies_ms: Vec<f64> = Vec::with_capacity(streams * writes);
    let mut missing = 0usize;
    let cpu_before = cpu_ms()?;
    let syscw_before = write_syscalls()?;
    for k in 0..writes {
        to_child.write_all(format!("w {k}\n").as_bytes()).await?;
        to_child.flush().await?;
        let sent_us = now_us();
        let response = http
            .post(format!("{url}/sync/upload"))
            .bearer_auth(&token)
            .header("content-type", "application/json")
            .body(serde_json::to_vec(&ticket_upload(k))?)
            .send()
            .await?;
        if !response.status().is_success() {
            let status = response.status();
            bail!("upload {k}: {status}: {}", response.text().await.unwrap_or_default());
        }
        let answer: UploadResponse = serde_json::from_slice(&response.bytes().await?)?;
        if answer.write_checkpoint != k as u64 + 1 {
            bail!("upload {k}: write checkpoint {}", answer.write_checkpoint);
        }
        let line = tokio::time::timeout(WRITE_TIMEOUT + Duration::from_secs(20), from_child.next_line())
            .await
            .with_context(|| format!("no report on write {k}"))??
            .ok_or_else(|| anyhow!("the readers' process ended"))?;
        let report: WriteReport = serde_json::from_str(&line)?;
        if report.write != k {
            bail!("report for write {} while waiting for {k}", report.write);
        }
        missing += streams.saturating_sub(report.times_us.len());
        latencies_ms.extend(
            report
                .times_us
                .iter()
                .map(|t| t.saturating_sub(sent_us) as f64 / 1000.0),
        );
    }
    let cpu_after = cpu_ms()?;
    let syscw_after = write_syscalls()?;
    let rss = rss_mb()?;
    drop(to_child);
    let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
    let _ = child.kill().await;
    tokio::time::timeout(Duration::from_secs(30), server.shutdown())
        .await
        .context("server shutdown")??;

    latencies_ms.sort_by(f64::total_cmp);
    Ok(ordered_json(&[
        ("engine", serde_json::json!("ferry")),
        ("streams", serde_json::json!(streams)),
        ("writes", serde_json::json!(writes)),
        (
            "propagation_p50_ms",
            serde_json::json!(round2(percentile(&latencies_ms, 0.50))),
        ),
        (
            "propagation_p99_ms",
            serde_json::json!(round2(percentile(&latencies_ms, 0.99))),
        ),
        (
            "server_cpu_ms_per_write",
            serde_json::json!(round2((cpu_after - cpu_before) / writes as f64)),
        ),
        ("rss_mb", serde_json::json!(round2(rss))),
        ("missing", serde_json::json!(missing)),
        (
            "server_write_syscalls_per_write",
            serde_json::json!(round2((syscw_after - syscw_before) as f64 / writes as f64)),
        ),
    ]))
}

/// A stream reader's news for the child's main loop.
#[derive(Debug)]
enum Event {
    /// The stream got its first `checkpoint_complete`.
    Ready,
    /// The stream read the `checkpoint_complete` covering write `k` at `at_us`.
    Covered { k: usize, at_us: u64 },
    /// The stream failed or ended.
    Failed(String),
}

/// The child: open `n` streams, say `{"ready":n}`, then for every `w k`
/// on stdin report when each stream got write k.
async fn readers_main(n: usize, url: String, secret: String) -> Result<()> {
    let (tx, mut rx) = mpsc::unbounded_channel::<Event>();
    let http = reqwest::Client::builder().pool_max_idle_per_host(0).build()?;
    let gate = Arc::new(Semaphore::new(OPEN_CONCURRENCY));
    for i in 0..n {
        let (tx, http, gate) = (tx.clone(), http.clone(), gate.clone());
        let (url, secret) = (url.clone(), secret.clone());
        tokio::spawn(async move {
            if let Err(e) = read_stream(i, &http, &url, &secret, &gate, &tx).await {
                let _ = tx.send(Event::Failed(format!("stream {i}: {e:#}")));
            }
        });
    }
    drop(tx);

    let mut ready = 0usize;
    let started = Instant::now();
    while ready < n {
        match tokio::time::timeout(Duration::from_secs(600), rx.recv()).await {
            Ok(Some(Event::Ready)) => ready += 1,
            Ok(Some(Event::Failed(e))) => {
                println!("{}", serde_json::json!({ "ready": ready, "error": e }));
                return Ok(());
            }
            Ok(Some(Event::Covered { .. })) => {}
            Ok(None) | Err(_) => {
                println!("{}", serde_json::json!({ "ready": ready, "error": "timed out" }));
                return Ok(());
            }
        }
    }
    eprintln!(
        "fanout_bench: {n} streams open in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    println!("{}", serde_json::json!({ "ready": n }));

    // The parent's requests (tokio's stdin is not enabled here: a thread
    // reads it).
    let (lines_tx, mut lines) = mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut covered: HashMap<usize, Vec<u64>> = HashMap::new();
    let mut failures = 0usize;
    while let Some(line) = lines.recv().await {
        let Some(k) = line.strip_prefix("w ").and_then(|k| k.trim().parse::<usize>().ok()) else {
            continue;
        };
        let deadline = tokio::time::Instant::now() + WRITE_TIMEOUT;
        while covered.get(&k).map_or(0, Vec::len) < n {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(Event::Covered { k, at_us })) => covered.entry(k).or_default().push(at_us),
                Ok(Some(Event::Failed(e))) => {
                    failures += 1;
                    if failures <= 10 {
                        eprintln!("fanout_bench: {e}");
                    }
                }
                Ok(Some(Event::Ready)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        let times = covered.remove(&k).unwrap_or_default();
        println!("{}", serde_json::json!({ "write": k, "times_us": times }));
    }
    Ok(())
}

/// Open stream `i` (user `reader-i`, client id `reader-i`) and report
/// what it reads until it ends.
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
