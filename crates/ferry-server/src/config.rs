//! Server configuration: a TOML file, overridden by flags and `FERRY_*`
//! environment variables in the binary.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use ferry_http::HttpServerOptions;
use serde::{Deserialize, Serialize};

use crate::admin::AdminOptions;
use crate::auth::AuthOptions;
use crate::error::{Result, ServiceError};
use crate::service::ServiceOptions;

/// The secret used when no key is configured (no `jwt_secret`, no
/// `[auth]` keys). Only for development: the server logs a warning when
/// it uses it and refuses to listen on a non-loopback address with it
/// unless `auth.allow_dev_secret` is set.
pub const DEV_JWT_SECRET: &str = "ferry-dev-secret-do-not-use-in-production";

/// Everything the server needs to start.
///
/// In TOML every field is optional; the [`ServiceOptions`] fields
/// (`keepalive_interval_s`, `max_ops_per_line`, ..., `[limits]`) sit at the
/// top level next to these; `[auth]` holds the token keys and checks
/// ([`AuthOptions`]), `[http]` the connection timeouts and per-user limits
/// ([`HttpServerOptions`]; its body limit is the top-level
/// `max_body_bytes`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ServerConfig {
    /// Where the source database lives (the embedded SQLite default).
    pub data_dir: PathBuf,
    /// A PostgreSQL URL (`postgres://user@host/db`): the source of truth
    /// is that database's tables instead of the SQLite file under
    /// `data_dir` (see `[postgres]`).
    pub database_url: Option<String>,
    /// Where Ferry's tables live in PostgreSQL and whether it may create
    /// the app's.
    pub postgres: PostgresConfig,
    /// Seconds between bucket compactions (one server at a time); `0`:
    /// never.
    pub compact_interval_s: u64,
    /// The address to listen on (port 0: any free port).
    pub listen_addr: SocketAddr,
    /// The HS256 secret for bearer tokens without a `kid`; `None` and no
    /// `[auth]` keys: [`DEV_JWT_SECRET`].
    pub jwt_secret: Option<String>,
    /// A sync rules file; `None`: the embedded ticket tracker rules.
    pub rules_path: Option<PathBuf>,
    /// A PEM certificate chain (the server's certificate first): with
    /// `tls_key`, the server speaks HTTPS only (`docs/adr/0010-tls.md`).
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// Longest HTTP request body accepted.
    pub max_body_bytes: usize,
    /// Token keys (JWKS URL, static files) and claim checks.
    pub auth: AuthOptions,
    /// Connection timeouts, the connection cap and per-user limits.
    pub http: HttpServerOptions,
    /// The admin token and who may read `/metrics`
    /// (`docs/adr/0013-metrics-and-admin-api.md`).
    pub admin: AdminOptions,
    /// Service tunables and limits.
    #[serde(flatten)]
    pub service: ServiceOptions,
}

/// The `[postgres]` section: used with [`ServerConfig::database_url`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PostgresConfig {
    /// The schema Ferry keeps its own tables in (created if missing).
    pub ferry_schema: String,
    /// The schema of the app's tables the rules name.
    pub app_schema: String,
    /// Create missing tables and columns from the rules (a quick start;
    /// off by default).
    pub create_tables: bool,
    /// Most pooled connections per server.
    pub max_connections: usize,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        PostgresConfig {
            ferry_schema: "ferry".to_owned(),
            app_schema: "public".to_owned(),
            create_tables: false,
            max_connections: ferry_postgres::DEFAULT_MAX_CONNECTIONS,
        }
    }
}

impl PostgresConfig {
    /// The source database options for `url`.
    pub fn options(&self, url: &str) -> ferry_postgres::PgOptions {
        ferry_postgres::PgOptions::new(url)
            .ferry_schema(&self.ferry_schema)
            .app_schema(&self.app_schema)
            .create_tables(self.create_tables)
            .max_connections(self.max_connections)
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            data_dir: PathBuf::from("./data/server"),
            database_url: None,
            postgres: PostgresConfig::default(),
            compact_interval_s: crate::service::DEFAULT_COMPACT_INTERVAL_S,
            listen_addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            jwt_secret: None,
            rules_path: None,
            tls_cert: None,
            tls_key: None,
            max_body_bytes: ferry_http::DEFAULT_MAX_BODY_BYTES,
            auth: AuthOptions::default(),
            http: HttpServerOptions::default(),
            admin: AdminOptions::default(),
            service: ServiceOptions::default(),
        }
    }
}

impl ServerConfig {
    /// Parse a TOML config.
    pub fn from_toml(text: &str) -> Result<Self> {
        toml::from_str(text).map_err(|e| ServiceError::Config(format!("server config: {}", e.message())))
    }

    /// Load a TOML config file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ServiceError::Io {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        Self::from_toml(&text)
    }

    /// The secret to use, and whether it is the development default.
    pub fn secret(&self) -> (String, bool) {
        match &self.jwt_secret {
            Some(s) if !s.is_empty() => (s.clone(), false),
            _ => (DEV_JWT_SECRET.to_owned(), true),
        }
    }

    /// The HS256 secret verification uses, if any, and whether it is the
    /// development default: the configured `jwt_secret`; else, when no
    /// `[auth]` key is configured either, the development secret; else
    /// none (tokens are verified with the `[auth]` keys only).
    pub fn hs256_secret(&self) -> (Option<String>, bool) {
        match &self.jwt_secret {
            Some(s) if !s.is_empty() => (Some(s.clone()), false),
            _ if self.auth.has_keys() => (None, false),
            _ => (Some(DEV_JWT_SECRET.to_owned()), true),
        }
    }

    /// Refuse settings the server must not start with: the development
    /// secret on a non-loopback address (unless `auth.allow_dev_secret`),
    /// an idle timeout the stream keepalives could not keep open, a TLS
    /// certificate without its key or a key without its certificate.
    pub fn check(&self) -> Result<()> {
        let (_, dev) = self.hs256_secret();
        if dev && !self.listen_addr.ip().is_loopback() && !self.auth.allow_dev_secret {
            return Err(ServiceError::Config(format!(
                "refusing to listen on {} with the development jwt secret: set jwt_secret (FERRY_JWT_SECRET) or [auth] keys, \
                 or allow it explicitly (--allow-dev-secret)",
                self.listen_addr
            )));
        }
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), None) => {
                return Err(ServiceError::Config(format!(
                    "tls_cert {} is set without tls_key (--tls-key)",
                    cert.display()
                )))
            }
            (None, Some(key)) => {
                return Err(ServiceError::Config(format!(
                    "tls_key {} is set without tls_cert (--tls-cert)",
                    key.display()
                )))
            }
            _ => {}
        }
        self.admin.check()?;
        let keepalive_ms = self.service.keepalive_interval_s.saturating_mul(1000);
        if self.http.idle_timeout_ms <= keepalive_ms {
            return Err(ServiceError::Config(format!(
                "http.idle_timeout_ms of {} ms must exceed keepalive_interval_s ({} ms), or idle streams would be cut",
                self.http.idle_timeout_ms, keepalive_ms
            )));
        }
        Ok(())
    }
}
