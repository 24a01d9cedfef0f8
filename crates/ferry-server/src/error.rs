//! The server's errors.

use ferry_core::{CoreError, ErrorKind};
use ferry_protocol::{ErrorCode, ServerError};
use ferry_source::SourceError;
use thiserror::Error;

/// Everything that can go wrong in the sync service.
#[derive(Debug, Error)]
pub enum ServiceError {
    /// The bearer token is missing, malformed, badly signed or expired.
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    /// The request is malformed or refers to something that does not exist.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// A limit was exceeded.
    #[error("too large: {0}")]
    TooLarge(String),
    /// The sync rules or server config are invalid.
    #[error("invalid config: {0}")]
    Config(String),
    /// The source database failed.
    #[error("database error: {0}")]
    Database(String),
    /// The source database refused one write (a value its column type
    /// cannot hold, a constraint of the app's table): the op is rejected
    /// with this reason.
    #[error("the database refused the write: {0}")]
    Refused(String),
    /// A data model check failed.
    #[error(transparent)]
    Core(#[from] CoreError),
    /// Reading or writing a file or socket failed.
    #[error("i/o error on {path}: {message}")]
    Io {
        /// The path or address involved.
        path: String,
        /// What failed.
        message: String,
    },
    /// The server is shutting down.
    #[error("server is shutting down")]
    ShuttingDown,
    /// Too many streams or a saturated resource.
    #[error("busy: {0}")]
    Busy(String),
}

impl ServiceError {
    /// Whether retrying can help.
    pub fn kind(&self) -> ErrorKind {
        match self {
            ServiceError::Database(_)
            | ServiceError::Io { .. }
            | ServiceError::ShuttingDown
            | ServiceError::Busy(_) => ErrorKind::Transient,
            ServiceError::Unauthorized(_)
            | ServiceError::BadRequest(_)
            | ServiceError::TooLarge(_)
            | ServiceError::Config(_)
            | ServiceError::Refused(_)
            | ServiceError::Core(_) => ErrorKind::Permanent,
        }
    }

    /// The protocol error sent to the client.
    pub fn to_server_error(&self) -> ServerError {
        let code = match self {
            ServiceError::Unauthorized(_) => ErrorCode::Unauthorized,
            ServiceError::BadRequest(_)
            | ServiceError::Core(_)
            | ServiceError::Config(_)
            | ServiceError::Refused(_) => ErrorCode::BadRequest,
            ServiceError::TooLarge(_) => ErrorCode::TooLarge,
            ServiceError::ShuttingDown => ErrorCode::ShuttingDown,
            ServiceError::Busy(_) => ErrorCode::Busy,
            ServiceError::Database(_) | ServiceError::Io { .. } => ErrorCode::Internal,
        };
        let message = match self {
            ServiceError::Unauthorized(m) | ServiceError::BadRequest(m) | ServiceError::TooLarge(m) => m.clone(),
            other => other.to_string(),
        };
        ServerError { code, message }
    }
}

impl From<SourceError> for ServiceError {
    /// A write transaction's work failing with a `ServiceError` gets it
    /// back unchanged; a schema the database refuses is a config error;
    /// everything else the database reports is a database error.
    fn from(e: SourceError) -> Self {
        match e.into_aborted::<ServiceError>() {
            Ok(e) => e,
            Err(SourceError::Schema(m)) => ServiceError::Config(m),
            Err(SourceError::Io { path, message }) => ServiceError::Io { path, message },
            Err(SourceError::Database(m)) => ServiceError::Database(m),
            Err(SourceError::Refused(m)) => ServiceError::Refused(m),
            Err(other) => ServiceError::Database(other.to_string()),
        }
    }
}

impl From<ServiceError> for ServerError {
    fn from(e: ServiceError) -> Self {
        e.to_server_error()
    }
}

/// Results of the sync service.
pub type Result<T, E = ServiceError> = std::result::Result<T, E>;
