//! What the benchmark examples share: an embedded `ferry-server` on a
//! loopback port with the ticket-tracker rules (or `FERRY_BENCH_RULES`),
//! and clients on SQLite whose schema is the rules' schema.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ferry_client::{ClientOptions, Database};
use ferry_core::SystemClock;
use ferry_queue::LocalDbOptions;
use ferry_server::{BoundServer, ServerConfig, SyncRules};
use ferry_sqlite::SqliteStore;

/// The JWT secret of the benchmark server.
pub const SECRET: &str = "bench-secret";

/// A running benchmark server.
pub struct BenchServer {
    /// The server (address and service).
    pub server: BoundServer,
    /// Its sync rules.
    // Not every example reads it (each compiles this module on its own).
    #[allow(dead_code)]
    pub rules: SyncRules,
    /// `http://<addr>`.
    pub base_url: String,
    stop: tokio::sync::oneshot::Sender<()>,
}

impl BenchServer {
    /// Start a server keeping its data in `data_dir`.
    pub async fn start(data_dir: PathBuf) -> anyhow::Result<Self> {
        let rules_path = std::env::var("FERRY_BENCH_RULES").ok().map(PathBuf::from);
        let rules = match &rules_path {
            Some(p) => SyncRules::from_file(p)?,
            None => SyncRules::ticket_tracker()?,
        };
        let config = ServerConfig {
            data_dir,
            rules_path,
            listen_addr: "127.0.0.1:0".parse()?,
            jwt_secret: Some(SECRET.into()),
            ..ServerConfig::default()
        };
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = ferry_server::run(config, async move {
            let _ = stop_rx.await;
        })
        .await?;
        let base_url = format!("http://{}", server.addr);
        Ok(BenchServer {
            server,
            rules,
            base_url,
            stop,
        })
    }

    /// Shut the server down (waiting at most 10 s).
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = tokio::time::timeout(Duration::from_secs(10), self.server.wait()).await;
    }
}

/// A client on SQLite in `dir` (created if missing) with the rules' schema;
/// `FERRY_BENCH_STAGING_MB` sets its staging budget (default: the
/// client's).
pub fn open_client(dir: &Path, rules: &SyncRules) -> anyhow::Result<Database> {
    std::fs::create_dir_all(dir)?;
    let store = SqliteStore::open(dir.join("client.db"), rules.schema().clone())?;
    let defaults = ClientOptions::default();
    let staging_memory_bytes = match std::env::var("FERRY_BENCH_STAGING_MB") {
        Ok(mb) => mb.parse::<usize>()? * 1024 * 1024,
        Err(_) => defaults.staging_memory_bytes,
    };
    let options = ClientOptions {
        local: LocalDbOptions {
            clock: Arc::new(SystemClock),
            ..LocalDbOptions::default()
        },
        staging_memory_bytes,
        ..defaults
    };
    Ok(Database::open(Arc::new(store), options)?)
}
