//! The ticket tracker as a local-first web app, one process per device:
//! its own client database, synced with `ferry-server`, and a web UI on
//! loopback.
//!
//! ```sh
//! cargo run -p ferry-examples --bin tracker -- --server http://127.0.0.1:8080 --user alice --port 3001
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use ferry_examples::tracker::{serve, Tracker, TrackerConfig};

/// The ticket tracker for one device: a local database synced with
/// ferry-server, and a web UI on http://127.0.0.1:PORT.
#[derive(Parser, Debug)]
#[command(name = "tracker")]
struct Cli {
    /// The sync server.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    server: String,
    /// This device's user (a development token is minted for them).
    #[arg(long)]
    user: String,
    /// The web UI's port on 127.0.0.1 (0: any free port).
    #[arg(long, default_value_t = 3001)]
    port: u16,
    /// Where the device's SQLite file lives (default: data/tracker-USER).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// A bearer token instead of the development one.
    #[arg(long, env = "FERRY_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The sync rules file the server runs (default: the embedded ticket
    /// tracker rules): the client schema is derived from it.
    #[arg(long)]
    rules: Option<PathBuf>,
    /// Start with the offline switch on: nothing syncs until the page
    /// turns it off.
    #[arg(long)]
    offline: bool,
    /// Offline restrictions: renaming and deleting tickets need the server.
    #[arg(long)]
    restricted: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = TrackerConfig {
        server_url: cli.server.clone(),
        user: cli.user.clone(),
        listen: SocketAddr::from(([127, 0, 0, 1], cli.port)),
        data_dir: cli
            .data_dir
            .unwrap_or_else(|| PathBuf::from("data").join(format!("tracker-{}", cli.user))),
        token: cli.token,
        rules: cli.rules,
        start_offline: cli.offline,
        restricted: cli.restricted,
    };
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listening on {}", config.listen))?;
    let addr = listener.local_addr()?;
    let tracker = Tracker::open(&config).await?;
    // One line the demo and the tests wait for.
    println!(
        "tracker for {} on http://{addr} (syncing with {}, data in {})",
        config.user,
        config.server_url,
        config.data_dir.display()
    );
    serve(tracker, listener, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await?;
    Ok(())
}
