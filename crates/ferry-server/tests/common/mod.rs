#![allow(dead_code)]

pub mod notes;
pub mod probe;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use ferry_core::{CrudEntry, CrudOp, HlcTimestamp, RowData, Value};
use ferry_protocol::{Download, DownloadLimits, OpKind, Step, StreamLine, UploadRequest, UploadTransaction};
use ferry_server::{mint_token, ServiceOptions, SqliteSourceDb, SyncRules, SyncService};
use ferry_transport::SyncHandler;

pub const SECRET: &str = "test-secret";

pub struct Env {
    pub dir: tempfile::TempDir,
    pub svc: SyncService,
}

pub fn env() -> Env {
    env_with(ServiceOptions::default())
}

pub fn env_with(options: ServiceOptions) -> Env {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = SqliteSourceDb::open_dir(dir.path()).expect("open db");
    let rules = SyncRules::ticket_tracker().expect("rules");
    let svc = SyncService::builder(Arc::new(db), rules, SECRET)
        .options(options)
        .build()
        .expect("build");
    Env { dir, svc }
}

pub fn token(user: &str) -> String {
    mint_token(SECRET, user, 3600, &serde_json::Map::new())
}

pub fn hlc(wall_ms: u64, node: &str) -> Option<HlcTimestamp> {
    Some(HlcTimestamp {
        wall_ms,
        counter: 0,
        node: node.into(),
    })
}

pub fn entry(seq: u64, op: CrudOp, wall_ms: u64, node: &str) -> CrudEntry {
    CrudEntry {
        seq,
        tx_id: seq,
        op,
        previous: None,
        metadata: None,
        hlc: hlc(wall_ms, node),
    }
}

pub fn put(table: &str, id: &str, data: &[(&str, Value)]) -> CrudOp {
    CrudOp::Put {
        table: table.into(),
        id: id.into(),
        data: data.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect(),
    }
}

pub fn patch(table: &str, id: &str, data: &[(&str, Value)]) -> CrudOp {
    CrudOp::Patch {
        table: table.into(),
        id: id.into(),
        data: data.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect(),
    }
}

pub fn delete(table: &str, id: &str) -> CrudOp {
    CrudOp::Delete {
        table: table.into(),
        id: id.into(),
    }
}

/// One transaction holding all entries.
pub fn upload_req(client_id: &str, entries: Vec<CrudEntry>) -> UploadRequest {
    UploadRequest {
        client_id: client_id.into(),
        transactions: vec![UploadTransaction { tx_id: 1, ops: entries }],
    }
}

/// A minimal client: the protocol's download state machine plus rows per
/// bucket.
pub struct TestClient {
    pub id: String,
    pub dl: Download,
    pub buckets: BTreeMap<String, BTreeMap<(String, String), RowData>>,
    pub write_checkpoint: Option<u64>,
}

impl TestClient {
    pub fn new(id: &str) -> Self {
        TestClient {
            id: id.into(),
            dl: Download::new([], DownloadLimits::default()),
            buckets: BTreeMap::new(),
            write_checkpoint: None,
        }
    }

    /// Feed one line; true when a checkpoint was applied.
    pub fn feed(&mut self, line: StreamLine) -> bool {
        match self.dl.handle(line).expect("valid line") {
            Step::Apply(apply) => {
                for b in &apply.buckets {
                    let rows = self.buckets.entry(b.bucket.clone()).or_default();
                    if b.reset {
                        rows.clear();
                    }
                    for op in &b.ops {
                        let key = (
                            op.object_type.clone().unwrap_or_default(),
                            op.object_id.clone().unwrap_or_default(),
                        );
                        match op.op {
                            OpKind::Put => {
                                rows.insert(key, op.data.clone().expect("put data"));
                            }
                            OpKind::Remove => {
                                rows.remove(&key);
                            }
                            _ => {}
                        }
                    }
                }
                for name in &apply.removed_buckets {
                    self.buckets.remove(name);
                }
                self.write_checkpoint = apply.write_checkpoint;
                self.dl.applied(&apply);
                true
            }
            Step::Resync { buckets } => panic!("checksum mismatch in {buckets:?}"),
            _ => false,
        }
    }

    /// Open a stream, read until one checkpoint is applied, close it.
    /// Returns the lines received.
    pub async fn sync(&mut self, handler: &dyn SyncHandler, token: &str) -> Vec<StreamLine> {
        let mut rx = handler
            .stream(token, self.dl.request(&self.id))
            .await
            .expect("stream opens");
        let mut lines = Vec::new();
        loop {
            let line = next(&mut rx).await;
            lines.push(line.clone());
            if self.feed(line) {
                return lines;
            }
        }
    }

    /// Every visible row.
    pub fn rows(&self) -> BTreeMap<(String, String), RowData> {
        self.buckets.values().flat_map(|m| m.clone()).collect()
    }
}

pub async fn next(rx: &mut tokio::sync::mpsc::Receiver<StreamLine>) -> StreamLine {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("line within 10 s")
        .expect("stream still open")
}

pub fn data_ops(lines: &[StreamLine]) -> Vec<(String, ferry_protocol::OplogEntry)> {
    lines
        .iter()
        .filter_map(|l| match l {
            StreamLine::Data(d) => Some(d.ops.iter().map(|o| (d.bucket.clone(), o.clone())).collect::<Vec<_>>()),
            _ => None,
        })
        .flatten()
        .collect()
}

/// A service over `rules` (TOML) with `options`, on SQLite in a temp dir.
pub fn env_with_rules(rules: &str, options: ServiceOptions) -> Env {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = SqliteSourceDb::open_dir(dir.path()).expect("open db");
    let rules = SyncRules::from_toml(rules).expect("rules");
    let svc = SyncService::builder(Arc::new(db), rules, SECRET)
        .options(options)
        .build()
        .expect("build");
    Env { dir, svc }
}

/// Upload `request` as `user`: the answer, or the server's error.
pub async fn try_upload(
    handler: &dyn SyncHandler,
    user: &str,
    request: UploadRequest,
) -> Result<ferry_protocol::UploadResponse, ferry_protocol::ServerError> {
    handler.upload(&token(user), request).await
}

/// One transaction per `(tx_id, entries)`.
pub fn upload_txs(client_id: &str, txs: Vec<(u64, Vec<CrudEntry>)>) -> UploadRequest {
    UploadRequest {
        client_id: client_id.into(),
        transactions: txs
            .into_iter()
            .map(|(tx_id, ops)| UploadTransaction { tx_id, ops })
            .collect(),
    }
}

/// `ferry_server::run` on a free loopback port over a temporary data dir,
/// verifying tokens signed with `secret`.
pub struct HttpServer {
    _dir: tempfile::TempDir,
    /// The running server.
    pub server: ferry_server::BoundServer,
}

impl HttpServer {
    pub async fn start(secret: &str, http: ferry_http::HttpServerOptions, service: ServiceOptions) -> HttpServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = ferry_server::ServerConfig {
            data_dir: dir.path().to_path_buf(),
            listen_addr: "127.0.0.1:0".parse().expect("addr"),
            jwt_secret: Some(secret.into()),
            http,
            service,
            ..ferry_server::ServerConfig::default()
        };
        let server = ferry_server::run(config, std::future::pending()).await.expect("start");
        HttpServer { _dir: dir, server }
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        self.server.addr
    }
}

/// Open a stream over raw TCP and read nothing of it.
pub async fn stalled_stream(addr: std::net::SocketAddr, token: &str, client_id: &str) -> tokio::net::TcpStream {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let body = serde_json::json!({"client_id": client_id, "buckets": []}).to_string();
    let req = format!(
        "POST /sync/stream HTTP/1.1\r\nhost: test\r\nauthorization: Bearer {token}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    tokio::io::AsyncWriteExt::write_all(&mut tcp, req.as_bytes())
        .await
        .expect("write");
    tcp
}

/// Status of a stream request on a fresh connection (the stream is
/// dropped after its head).
pub async fn stream_status(addr: std::net::SocketAddr, token: &str, client_id: &str) -> u16 {
    let mut tcp = stalled_stream(addr, token, client_id).await;
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        tokio::io::AsyncReadExt::read(&mut tcp, &mut buf),
    )
    .await
    .expect("an answer in time")
    .expect("read");
    let head = String::from_utf8_lossy(&buf[..n]).into_owned();
    head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
}
