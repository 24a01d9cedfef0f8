//! The `ferry-server` binary. With no arguments it serves the ticket
//! tracker rules on 127.0.0.1:8080 with data in `./data/server` and the
//! development secret.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use ferry_server::inspect::Inspect;
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
    Serve(Box<ServeArgs>),
    /// Print a bearer token for the configured secret.
    DevToken(TokenArgs),
    /// Print a running server's diagnostics (its admin api, with the admin token).
    Inspect(InspectArgs),
}

#[derive(Args, Debug)]
struct InspectArgs {
    /// The server's base url.
    #[arg(long, env = "FERRY_SERVER_URL", default_value = "http://127.0.0.1:8080")]
    server: String,
    /// The server's admin token.
    #[arg(long, env = "FERRY_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: String,
    /// Print the server's json answer instead of text.
    #[arg(long)]
    json: bool,
    #[command(subcommand)]
    what: InspectCommand,
}

#[derive(Subcommand, Debug)]
enum InspectCommand {
    /// Every bucket with its op count and checksum.
    Buckets {
        /// Buckets after this name (the next page).
        #[arg(long)]
        after: Option<String>,
        /// Most buckets (at most 1000).
        #[arg(long)]
        limit: Option<usize>,
    },
    /// The buckets the sync rules give a user, with op counts and checksums.
    User {
        /// The user id (the token's `sub`).
        user_id: String,
        /// Another claim the rules read, `key=value` (repeatable).
        #[arg(long = "claim", value_parser = parse_claim)]
        claims: Vec<(String, String)>,
        /// Most buckets (at most 1000).
        #[arg(long)]
        limit: Option<usize>,
    },
    /// A client's owner, last seq and stored outcomes.
    Client {
        /// The client id.
        client_id: String,
        /// Outcomes after this seq (the next page).
        #[arg(long)]
        after_seq: Option<u64>,
        /// Most outcomes (at most 1000).
        #[arg(long)]
        limit: Option<usize>,
    },
    /// The metrics, as /metrics serves them.
    Metrics,
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
    /// A PostgreSQL URL (postgres://user@host/db): serve the app's tables in
    /// that database instead of the embedded SQLite file. TLS as with psql:
    /// ?sslmode=disable|prefer (default)|require|verify-ca|verify-full and
    /// &sslrootcert=/path/to/ca.pem.
    #[arg(long = "database", env = "FERRY_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// With --database: the schema Ferry keeps its own tables in (default ferry).
    #[arg(long, env = "FERRY_DATABASE_SCHEMA")]
    database_schema: Option<String>,
    /// With --database: the schema of the app's tables (default public).
    #[arg(long, env = "FERRY_APP_SCHEMA")]
    app_schema: Option<String>,
    /// With --database: create the rules' missing tables and columns (never by default).
    #[arg(long)]
    create_tables: bool,
    /// Seconds between bucket compactions, one server at a time (default 3600; 0: never).
    #[arg(long, env = "FERRY_COMPACT_INTERVAL_S")]
    compact_interval_s: Option<u64>,
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
    /// The admin api's bearer token (at least 16 bytes; none: the admin api answers 404).
    #[arg(long, env = "FERRY_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// Serve /metrics without the admin token.
    #[arg(long)]
    metrics_public: bool,
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
    match cli.command.unwrap_or(Command::Serve(Box::default())) {
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
        Command::Inspect(args) => {
            let what = match args.what {
                InspectCommand::Buckets { after, limit } => Inspect::Buckets { after, limit },
                InspectCommand::User { user_id, claims, limit } => Inspect::User { user_id, claims, limit },
                InspectCommand::Client {
                    client_id,
                    after_seq,
                    limit,
                } => Inspect::Client {
                    client_id,
                    after_seq,
                    limit,
                },
                InspectCommand::Metrics => Inspect::Metrics,
            };
            let body = ferry_server::inspect::fetch(&args.server, &args.admin_token, &what)
                .await
                .context("inspecting the server")?;
            if args.json {
                println!("{body}");
            } else {
                print!("{}", ferry_server::inspect::render(&what, &body)?);
            }
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
            if let Some(u) = args.database_url {
                config.database_url = Some(u);
            }
            if let Some(s) = args.database_schema {
                config.postgres.ferry_schema = s;
            }
            if let Some(s) = args.app_schema {
                config.postgres.app_schema = s;
            }
            if args.create_tables {
                config.postgres.create_tables = true;
            }
            if let Some(i) = args.compact_interval_s {
                config.compact_interval_s = i;
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
            if let Some(t) = args.admin_token {
                config.admin.token = Some(t);
            }
            if args.metrics_public {
                config.admin.metrics_public = true;
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
