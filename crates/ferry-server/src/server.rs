//! Running the service over HTTP.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use async_trait::async_trait;
use ferry_http::TokenVerifier;
use ferry_protocol::ServerError;
use ferry_transport::SyncHandler;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::auth::Authenticator;
use crate::config::ServerConfig;
use crate::db::SourceDb;
use crate::error::{Result, ServiceError};
use crate::rules::SyncRules;
use crate::service::SyncService;
use crate::sqlite::SqliteSourceDb;

/// A server bound to its address and serving. Dropping it leaves the
/// server running until the shutdown future given to [`run`] resolves.
#[derive(Debug)]
pub struct BoundServer {
    /// The bound address (the real port when the config asked for 0).
    pub addr: SocketAddr,
    /// The service behind the routes.
    pub service: SyncService,
    /// Whether the server speaks HTTPS (`tls_cert` and `tls_key` set).
    pub tls: bool,
    task: JoinHandle<std::io::Result<()>>,
    stop: oneshot::Sender<()>,
}

impl BoundServer {
    /// Stop the server from the library, as the shutdown future given to
    /// [`run`] does: open streams end with a `shutting_down` line, the
    /// listener stops accepting, and this returns once every connection
    /// closed and the server stopped.
    pub async fn shutdown(self) -> Result<()> {
        let BoundServer { addr, task, stop, .. } = self;
        // The serving task may have stopped already (its shutdown future
        // resolved); then there is nobody to tell.
        let _ = stop.send(());
        join(addr, task).await
    }

    /// Wait until the server stopped (after the shutdown future given to
    /// [`run`] resolved and every connection closed).
    pub async fn wait(self) -> Result<()> {
        // Keep the stop sender alive while waiting: dropping it is no
        // request to stop.
        let BoundServer { addr, task, stop, .. } = self;
        let result = join(addr, task).await;
        drop(stop);
        result
    }
}

async fn join(addr: SocketAddr, task: JoinHandle<std::io::Result<()>>) -> Result<()> {
    let io_err = |e: String| ServiceError::Io {
        path: addr.to_string(),
        message: e,
    };
    match task.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(io_err(e.to_string())),
        Err(e) => Err(io_err(e.to_string())),
    }
}

/// The HTTP layer checks tokens with the service before reading a body.
#[async_trait]
impl TokenVerifier for SyncService {
    async fn verify_token(&self, token: &str) -> std::result::Result<String, ServerError> {
        // A refused token is an `auth` error in the metrics.
        Ok(self.counted(self.authenticate_async(token).await)?.user_id)
    }
}

/// Open the source database, load the rules, bind and serve until
/// `shutdown` resolves or [`BoundServer::shutdown`] is called; streams then
/// end with a `shutting_down` line.
///
/// Refused before anything is opened ([`ServerConfig::check`]): the
/// development secret on a non-loopback address unless
/// `auth.allow_dev_secret`, an idle timeout at or below the keepalive
/// interval, key files that do not load; a TLS certificate or key that
/// cannot be read or does not load (the error names the file).
pub async fn run(config: ServerConfig, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<BoundServer> {
    config.check()?;
    // Before anything is opened: a bad certificate or key stops the start.
    let tls = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => {
            Some(ferry_http::server_config_from_pem_files(cert, key).map_err(|e| ServiceError::Config(e.to_string()))?)
        }
        _ => None,
    };
    let rules = match &config.rules_path {
        Some(p) => SyncRules::from_file(p)?,
        None => SyncRules::ticket_tracker()?,
    };
    let (secret, is_dev) = config.hs256_secret();
    if is_dev {
        tracing::warn!("no jwt secret configured: using the development secret; set FERRY_JWT_SECRET in production");
    }
    let auth = Authenticator::from_options(&config.auth, secret.as_deref())?;
    if config.auth.jwks_url.is_some() {
        // A provider that is down at start is no reason not to start:
        // the first token naming one of its keys fetches again.
        match auth.refresh_jwks().await {
            Ok(n) => tracing::info!(keys = n, "jwks loaded"),
            Err(e) => tracing::warn!("jwks not loaded at start: {e}"),
        }
    }
    let db = open_source_db(&config).await?;
    // Each process its own clock node: several servers may share the
    // database (PostgreSQL), and two of their writes must never tie.
    let service = SyncService::builder(db, rules, secret.as_deref().unwrap_or_default())
        .node_id(process_node_id())
        .authenticator(auth)
        .options(config.service.clone())
        .build()?;
    let listener = tokio::net::TcpListener::bind(config.listen_addr)
        .await
        .map_err(|e| ServiceError::Io {
            path: config.listen_addr.to_string(),
            message: e.to_string(),
        })?;
    let addr = listener.local_addr().map_err(|e| ServiceError::Io {
        path: config.listen_addr.to_string(),
        message: e.to_string(),
    })?;
    // Changes made directly in the database (no-op on SQLite, which
    // captures none); ends when the service shuts down.
    let capture = service.clone();
    tokio::spawn(async move { capture.run_capture().await });
    // Rows that predate Ferry or rules whose buckets changed: membership
    // computed again in the background while serving.
    let rebucket = service.clone();
    tokio::spawn(async move { rebucket.run_rebucket().await });
    let compaction = service.clone();
    let interval_s = config.compact_interval_s;
    tokio::spawn(async move { compaction.run_compaction(interval_s).await });
    let handler: Arc<dyn SyncHandler> = Arc::new(service.clone());
    let mut http = config.http.clone();
    http.max_body_bytes = config.max_body_bytes;
    let router = ferry_http::router_with_verifier(handler, Arc::new(service.clone()), http.clone())
        .merge(crate::admin::router(service.clone(), &config.admin));
    if config.admin.token.is_none() {
        tracing::info!("no admin token configured: the admin api answers 404");
    }
    let svc = service.clone();
    let (stop, stopped) = oneshot::channel::<()>();
    let shutdown = async move {
        // A dropped stop sender (the `BoundServer` dropped) is no request.
        let library = async {
            if stopped.await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            () = shutdown => {}
            () = library => {}
        }
        tracing::info!("shutting down");
        svc.shutdown();
    };
    let is_tls = tls.is_some();
    let task = match tls {
        Some(tls) => tokio::spawn(ferry_http::serve_tls_with_options(
            listener, router, http, tls, shutdown,
        )),
        None => tokio::spawn(ferry_http::serve_with_options(listener, router, http, shutdown)),
    };
    match &config.database_url {
        Some(_) => tracing::info!(%addr, tls = is_tls, source = "postgresql", "ferry-server listening"),
        None => tracing::info!(%addr, tls = is_tls, data_dir = %config.data_dir.display(), "ferry-server listening"),
    }
    Ok(BoundServer {
        addr,
        service,
        tls: is_tls,
        task,
        stop,
    })
}

/// The source database the config names: PostgreSQL at `database_url`,
/// or the embedded SQLite file under `data_dir`.
async fn open_source_db(config: &ServerConfig) -> Result<Arc<dyn SourceDb>> {
    let db: Arc<dyn SourceDb> = match &config.database_url {
        Some(url) if ferry_postgres::is_postgres_url(url) => {
            let options = config.postgres.options(url);
            let db = tokio::task::spawn_blocking(move || ferry_postgres::PgSourceDb::connect(&options))
                .await
                .map_err(|e| ServiceError::Database(e.to_string()))?
                .map_err(|e| ServiceError::Config(format!("source database: {e}")))?;
            Arc::new(db)
        }
        Some(url) => {
            return Err(ServiceError::Config(format!(
                "database url {:?} is not a postgres:// url (leave it out for the embedded SQLite database)",
                url.split('@').next_back().unwrap_or_default()
            )))
        }
        None => {
            let data_dir = config.data_dir.clone();
            let db = tokio::task::spawn_blocking(move || SqliteSourceDb::open_dir(&data_dir))
                .await
                .map_err(|e| ServiceError::Database(e.to_string()))??;
            Arc::new(db)
        }
    };
    Ok(db)
}

/// `server-<16 hex digits>` from the OS's random source (time and process
/// id if that fails).
fn process_node_id() -> String {
    let mut bytes = [0u8; 8];
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).is_err() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        bytes = ((nanos as u64) ^ (u64::from(std::process::id()) << 32)).to_le_bytes();
    }
    format!(
        "server-{}",
        bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
    )
}
