//! Ferry's HTTP transport: the wire between a client's [`Transport`] and a
//! server's [`SyncHandler`].
//!
//! - [`router`] turns any [`SyncHandler`] into an axum [`axum::Router`]
//!   ([`router_with_verifier`]: with a [`TokenVerifier`] that checks the
//!   token before the body is read and names the user for the per-user
//!   limits); [`serve_with_options`] runs it with graceful shutdown,
//!   header, body and idle timeouts and a connection cap
//!   ([`HttpServerOptions`]).
//! - [`serve_tls_with_options`] does the same over TLS (rustls), with a
//!   config from PEM files ([`server_config_from_pem_files`]).
//! - [`HttpTransport`] is the client: it implements [`Transport`] over
//!   reqwest (HTTP/1.1, `http://` or `https://` with rustls, the webpki
//!   roots and optionally a private CA, [`HttpClientOptions::tls_ca_pem`]).
//!
//! # Routes
//!
//! | route | request | answer |
//! |---|---|---|
//! | `POST /sync/stream` | JSON `StreamRequest`, `Authorization: Bearer <token>` | `200`, `application/x-ndjson`, chunked: one JSON `StreamLine` per line, as the handler produces them |
//! | `POST /sync/upload` | JSON `UploadRequest`, `Authorization: Bearer <token>` | `200`, JSON `UploadResponse` |
//! | `GET /health` | | `200`, `{"status":"ok"}` |
//!
//! # Errors
//!
//! Every error answer has a JSON `ServerError` body (`{"code", "message"}`,
//! the message lowercase and naming the bad value). The status follows the
//! code, and the client maps the status back to a [`TransportError`]
//! (using the body's message when it parses as a `ServerError`):
//!
//! | `ErrorCode` | status | client error |
//! |---|---|---|
//! | `unauthorized` (also: `Authorization` missing, not `Bearer`, empty token) | 401 | [`TransportError::Unauthorized`] |
//! | `bad_request` (also: malformed JSON body; the handler is not called) | 400 | [`TransportError::Refused`] |
//! | `too_large` (also: body over [`HttpServerOptions::max_body_bytes`]) | 413 | [`TransportError::Refused`] |
//! | `internal` | 500 | [`TransportError::Server`] |
//! | `shutting_down` | 503 | [`TransportError::Server`] |
//! | `busy` (also: over `max_connections`), with `Retry-After` | 503 | [`TransportError::Server`] |
//! | `rate_limited` (`max_streams_per_user`, `max_uploads_per_user_per_s`), with `Retry-After` | 429 | [`TransportError::Server`] |
//! | `bad_request`: the body did not arrive within `body_timeout_ms` | 408 | [`TransportError::Server`] |
//!
//! The token is checked before the body is read: a refused token (and a
//! declared body over the limit, a per-user limit) is answered with
//! `Connection: close` and the body is never read.
//!
//! `Refused` means a sync server read the request and will refuse it
//! again (the client then rejects the writes it sent): a 400 with a Ferry
//! `ServerError` body, or a 413 from anything (a proxy's body limit too).
//! Every other status (a wrong base url's 404 or 405, a proxy's 403 or a
//! 400 without Ferry's body) becomes `Server`: retried with backoff, so a
//! misconfigured address never rolls back an app's writes. Failures to connect, resets, and a stream silent for
//! [`HttpClientOptions::idle_timeout_ms`] become
//! [`TransportError::Connection`]; a stream line over
//! [`HttpClientOptions::max_line_bytes`] becomes [`TransportError::Server`].
//!
//! # Invariants
//!
//! - The transport moves bytes only: it never interprets a line beyond
//!   framing (splitting on newlines, enforcing the line limit). The server
//!   side takes the stream from [`SyncHandler::stream_lines`], encodes
//!   typed lines with `ferry_protocol::encode_line`, passes lines the
//!   handler encoded already through unchanged, and decodes request bodies
//!   as the documents the handler takes; the
//!   client hands lines out without their newline, exactly as
//!   [`ferry_transport::MemoryTransport`] does.
//! - When a client drops its [`ferry_transport::LineStream`], the HTTP
//!   connection closes, the server drops the response body and with it the
//!   handler's receiver: the handler's sender observes the closure.
//! - Bad input (bad token header, malformed body, oversized body or line)
//!   is an error answer or an error value, never a panic.

mod client;
mod server;
mod stream_body;
mod tls;

pub use client::{HttpClientOptions, HttpTransport};
pub use server::{
    router, router_with_verifier, serve, serve_with_options, HttpServerOptions, TokenVerifier, DEFAULT_MAX_BODY_BYTES,
    NDJSON_CONTENT_TYPE,
};
pub use tls::{load_certificates, load_private_key, serve_tls_with_options, server_config_from_pem_files, TlsError};

#[doc(no_inline)]
pub use ferry_transport::{SyncHandler, Transport, TransportError};
