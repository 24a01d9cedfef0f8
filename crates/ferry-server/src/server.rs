//! Running the service over HTTP.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use ferry_http::HttpServerOptions;
use ferry_transport::SyncHandler;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::config::ServerConfig;
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

/// Open the source database, load the rules, bind and serve until
/// `shutdown` resolves or [`BoundServer::shutdown`] is called; streams then
/// end with a `shutting_down` line.
pub async fn run(config: ServerConfig, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<BoundServer> {
    let rules = match &config.rules_path {
        Some(p) => SyncRules::from_file(p)?,
        None => SyncRules::ticket_tracker()?,
    };
    let (secret, is_dev) = config.secret();
    if is_dev {
        tracing::warn!("no jwt secret configured: using the development secret; set FERRY_JWT_SECRET in production");
    }
    let data_dir = config.data_dir.clone();
    let db = tokio::task::spawn_blocking(move || SqliteSourceDb::open_dir(&data_dir))
        .await
        .map_err(|e| ServiceError::Database(e.to_string()))??;
    let service = SyncService::builder(Arc::new(db), rules, &secret)
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
    let handler: Arc<dyn SyncHandler> = Arc::new(service.clone());
    let router = ferry_http::router(
        handler,
        HttpServerOptions {
            max_body_bytes: config.max_body_bytes,
        },
    );
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
    let task = tokio::spawn(ferry_http::serve(listener, router, shutdown));
    tracing::info!(%addr, data_dir = %config.data_dir.display(), "ferry-server listening");
    Ok(BoundServer {
        addr,
        service,
        task,
        stop,
    })
}
