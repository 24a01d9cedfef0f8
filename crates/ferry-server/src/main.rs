//! The `ferry-server` binary. With no arguments it serves the ticket
//! tracker rules on 127.0.0.1:8080 with data in `./data/server` and the
//! development secret.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use ferry_server::{mint_token, ServerConfig};
use tracing_subscriber::EnvFilter;

#[derive(Parser, Debug)]
#[command(name = "ferry-server", version, about = "Ferry sync server")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve (the default).
    Serve(ServeArgs),
    /// Print a bearer token for the configured secret.
    DevToken(TokenArgs),
}

#[derive(Args, Debug, Default, Clone)]
struct Common {
    /// A TOML config file.
    #[arg(long, env = "FERRY_CONFIG")]
    config: Option<PathBuf>,
    /// The HS256 token secret (default: the development secret).
    #[arg(long, env = "FERRY_JWT_SECRET", hide_env_values = true)]
    jwt_secret: Option<String>,
}

#[derive(Args, Debug, Default)]
struct ServeArgs {
    #[command(flatten)]
    common: Common,
    /// Where the source database lives (default ./data/server).
    #[arg(long, env = "FERRY_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Address to listen on (default 127.0.0.1:8080).
    #[arg(long, env = "FERRY_LISTEN")]
    listen: Option<SocketAddr>,
    /// A sync rules file (default: the embedded ticket tracker rules).
    #[arg(long, env = "FERRY_RULES")]
    rules: Option<PathBuf>,
    /// An identity provider's JWKS URL (RS256/384/512, ES256/384, EdDSA keys).
    #[arg(long, env = "FERRY_JWKS_URL")]
    jwks_url: Option<String>,
    /// The `aud` tokens must carry.
    #[arg(long, env = "FERRY_JWT_AUDIENCE")]
    jwt_audience: Option<String>,
    /// The `iss` tokens must carry.
    #[arg(long, env = "FERRY_JWT_ISSUER")]
    jwt_issuer: Option<String>,
    /// Allow the development secret on a non-loopback address (never in production).
    #[arg(long)]
    allow_dev_secret: bool,
    /// A PEM certificate chain: serve HTTPS (with --tls-key).
    #[arg(long, env = "FERRY_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, env = "FERRY_TLS_KEY")]
    tls_key: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct TokenArgs {
    #[command(flatten)]
    common: Common,
    /// The user id (`sub`).
    #[arg(long)]
    user: String,
    /// Seconds the token stays valid.
    #[arg(long, default_value_t = 86_400)]
    ttl_s: u64,
    /// Extra claims, `key=value` (repeatable).
    #[arg(long = "claim", value_parser = parse_claim)]
    claims: Vec<(String, String)>,
}

fn parse_claim(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("claim {s:?} is not key=value"))
}

fn load_config(common: &Common) -> anyhow::Result<ServerConfig> {
    let mut config = match &common.config {
        Some(p) => ServerConfig::from_file(p)?,
        None => ServerConfig::default(),
    };
    if let Some(s) = &common.jwt_secret {
        config.jwt_secret = Some(s.clone());
    }
    Ok(config)
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::warn!("cannot listen for ctrl-c: {e}");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!("cannot listen for sigterm: {e}");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Serve(ServeArgs::default())) {
        Command::DevToken(args) => {
            let config = load_config(&args.common)?;
            let extra = args
                .claims
                .into_iter()
                .map(|(k, v)| (k, serde_json::Value::String(v)))
                .collect();
            println!("{}", mint_token(&config.secret().0, &args.user, args.ttl_s, &extra));
            Ok(())
        }
        Command::Serve(args) => {
            tracing_subscriber::fmt()
                .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
                .init();
            let mut config = load_config(&args.common)?;
            if let Some(d) = args.data_dir {
                config.data_dir = d;
            }
            if let Some(l) = args.listen {
                config.listen_addr = l;
            }
            if let Some(r) = args.rules {
                config.rules_path = Some(r);
            }
            if let Some(u) = args.jwks_url {
                config.auth.jwks_url = Some(u);
            }
            if let Some(a) = args.jwt_audience {
                config.auth.audience = Some(a);
            }
            if let Some(i) = args.jwt_issuer {
                config.auth.issuer = Some(i);
            }
            if args.allow_dev_secret {
                config.auth.allow_dev_secret = true;
            }
            if let Some(c) = args.tls_cert {
                config.tls_cert = Some(c);
            }
            if let Some(k) = args.tls_key {
                config.tls_key = Some(k);
            }
            let server = ferry_server::run(config, shutdown_signal())
                .await
                .context("starting ferry-server")?;
            let scheme = if server.tls { "https" } else { "http" };
            println!("ferry-server listening on {scheme}://{}", server.addr);
            server.wait().await.context("serving")?;
            Ok(())
        }
    }
}
