//! Shared fixtures of the tracker's HTTP tests: a real sync server on a
//! loopback port and trackers (one per user) over HTTP.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Result;
use ferry_examples::tracker::{serve, Tracker, TrackerConfig};
use ferry_server::{BoundServer, ServerConfig};

/// A tracker serving on a loopback port.
pub struct Device {
    pub tracker: Arc<Tracker>,
    pub url: String,
}

/// A sync server with its data in `dir/server`, on a loopback port.
pub async fn start_server(dir: &std::path::Path) -> Result<BoundServer> {
    Ok(ferry_server::run(
        ServerConfig {
            data_dir: dir.join("server"),
            listen_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            ..ServerConfig::default()
        },
        std::future::pending(),
    )
    .await?)
}

/// `user`'s tracker, with its data in `dir/<user>`, syncing with `server`.
pub async fn start_tracker(server: SocketAddr, user: &str, dir: &std::path::Path) -> Result<Device> {
    let config = TrackerConfig {
        server_url: format!("http://{server}"),
        user: user.to_owned(),
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        data_dir: dir.join(user),
        token: None,
        rules: None,
        start_offline: false,
        restricted: false,
    };
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    let url = format!("http://{}", listener.local_addr()?);
    let tracker = Tracker::open(&config).await?;
    tokio::spawn(serve(tracker.clone(), listener, std::future::pending()));
    Ok(Device { tracker, url })
}
