//! PostgreSQL's errors as [`SourceError`]s: never leaves the crate.

use ferry_source::SourceError;

/// Errors inside this crate: the driver's, or the seam's.
#[derive(Debug)]
pub(crate) enum Error {
    Pg(tokio_postgres::Error),
    Source(SourceError),
}

impl From<tokio_postgres::Error> for Error {
    fn from(e: tokio_postgres::Error) -> Self {
        Error::Pg(e)
    }
}

impl From<SourceError> for Error {
    fn from(e: SourceError) -> Self {
        Error::Source(e)
    }
}

impl From<Error> for SourceError {
    fn from(e: Error) -> Self {
        match e {
            Error::Source(e) => e,
            Error::Pg(e) => classify(&e),
        }
    }
}

pub(crate) type Result<T, E = Error> = std::result::Result<T, E>;

/// Run `f`, its errors as [`SourceError`]s.
pub(crate) fn lift<T>(f: impl FnOnce() -> Result<T>) -> ferry_source::Result<T> {
    f().map_err(SourceError::from)
}

/// A database error's message with its SQLSTATE and detail. The detail
/// of an integrity constraint violation (class 23) is left out: it shows
/// rows (a CHECK or NOT NULL violation's whole failing row, with the
/// columns the rules do not sync and the stored values a PATCH kept; an
/// exclusion constraint's conflicting row), and a refusal's reason goes
/// to the device that wrote. The message names the constraint.
fn describe(db: &tokio_postgres::error::DbError) -> String {
    let code = db.code().code();
    let mut s = format!("{} (sqlstate {code})", db.message());
    if let Some(detail) = db.detail().filter(|_| !code.starts_with("23")) {
        s.push_str(": ");
        s.push_str(detail);
    }
    s
}

/// Data exceptions (22), integrity constraints (23) and program limits
/// (54: a value too long for an index row, of the app's table or of
/// Ferry's own, which names buckets by their parameter values; a retry
/// never fits it) refuse one write, as do the app's own checks: a trigger's `RAISE EXCEPTION` without an
/// error code (P0001, `raise_exception`) or failed `ASSERT` (P0004,
/// `assert_failure`), and a row-level security policy of the app's table
/// (42501 with PostgreSQL's "row-level security" message; another 42501,
/// a privilege Ferry's role lacks, is a database error the write waits
/// out, not a refusal that would lose it); serialization failures and deadlocks
/// (40), resources (53), operator intervention (57) and connection errors
/// (08) can pass; the rest is a database error. An error without a
/// SQLSTATE is a lost connection or a protocol problem.
pub(crate) fn classify(e: &tokio_postgres::Error) -> SourceError {
    if let Some(db) = e.as_db_error() {
        let code = db.code().code();
        let msg = describe(db);
        if code == "42501" && db.message().contains("row-level security") {
            return SourceError::Refused(msg);
        }
        if matches!(code, "P0001" | "P0004") {
            return SourceError::Refused(msg);
        }
        return match code.get(..2) {
            Some("22" | "23" | "54") => SourceError::Refused(msg),
            Some("40" | "53" | "57" | "08") => SourceError::Unavailable(msg),
            _ => SourceError::Database(msg),
        };
    }
    let io = std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>());
    // The driver's own message leaves the causes out.
    let why = ferry_core::error_chain(e);
    if e.is_closed() {
        SourceError::Unavailable(format!("postgresql connection lost: {why}"))
    } else if io {
        // Connecting, the TLS handshake (a certificate refused), or a
        // connection that broke mid-call.
        SourceError::Unavailable(format!("postgresql connection failed: {why}"))
    } else {
        SourceError::Database(why)
    }
}

/// Stored data that could not be read back.
pub(crate) fn corrupt(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Source(SourceError::corrupt(what, e))
}
