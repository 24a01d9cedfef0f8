//! Server configuration: a TOML file, overridden by flags and `FERRY_*`
//! environment variables in the binary.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Result, ServiceError};
use crate::service::ServiceOptions;

/// The secret used when none is configured. Only for development: the
/// server logs a warning when it uses it.
pub const DEV_JWT_SECRET: &str = "ferry-dev-secret-do-not-use-in-production";

/// Everything the server needs to start.
///
/// In TOML every field is optional; the [`ServiceOptions`] fields
/// (`keepalive_interval_s`, `max_ops_per_line`, ..., `[limits]`) sit at the
/// top level next to these.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ServerConfig {
    /// Where the source database lives.
    pub data_dir: PathBuf,
    /// The address to listen on (port 0: any free port).
    pub listen_addr: SocketAddr,
    /// The HS256 secret for bearer tokens; `None`: [`DEV_JWT_SECRET`].
    pub jwt_secret: Option<String>,
    /// A sync rules file; `None`: the embedded ticket tracker rules.
    pub rules_path: Option<PathBuf>,
    /// Longest HTTP request body accepted.
    pub max_body_bytes: usize,
    /// Service tunables and limits.
    #[serde(flatten)]
    pub service: ServiceOptions,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            data_dir: PathBuf::from("./data/server"),
            listen_addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            jwt_secret: None,
            rules_path: None,
            max_body_bytes: ferry_http::DEFAULT_MAX_BODY_BYTES,
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
}
