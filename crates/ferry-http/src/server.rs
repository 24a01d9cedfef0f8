//! The server side: an axum [`Router`] carrying bytes to a [`SyncHandler`].

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::sync::Arc;

use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::header::{AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::Router;
use bytes::Bytes;
use ferry_protocol::{encode_line, ErrorCode, ServerError, StreamRequest, UploadRequest};
use ferry_transport::{ServerLineStream, SyncHandler};
use serde::de::DeserializeOwned;

/// The default limit on a request body: 32 MiB.
pub const DEFAULT_MAX_BODY_BYTES: usize = 32 * 1024 * 1024;

/// Lines already waiting in the handler's channel are written together, up
/// to this many bytes per chunk, so a fast producer costs fewer writes.
const MAX_CHUNK_BYTES: usize = 256 * 1024;

/// The content type of the download stream.
pub const NDJSON_CONTENT_TYPE: &str = "application/x-ndjson";

/// Server limits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpServerOptions {
    /// Longest request body accepted; longer ones get 413.
    pub max_body_bytes: usize,
}

impl Default for HttpServerOptions {
    fn default() -> Self {
        HttpServerOptions {
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
        }
    }
}

#[derive(Clone)]
struct AppState {
    handler: Arc<dyn SyncHandler>,
    options: HttpServerOptions,
}

impl fmt::Debug for AppState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AppState")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// The routes of a sync server over `handler`:
///
/// - `POST /sync/stream`: JSON [`StreamRequest`] in, NDJSON lines out;
/// - `POST /sync/upload`: JSON [`UploadRequest`] in, JSON
///   [`ferry_protocol::UploadResponse`] out;
/// - `GET /health`: `{"status":"ok"}`.
///
/// See the crate documentation for the status codes.
pub fn router(handler: Arc<dyn SyncHandler>, options: HttpServerOptions) -> Router {
    let limit = options.max_body_bytes;
    Router::new()
        .route("/sync/stream", post(stream_route))
        .route("/sync/upload", post(upload_route))
        .route("/health", get(health_route))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(AppState { handler, options })
}

/// Serve `router` on `listener` until `shutdown` completes, then stop
/// accepting connections and return once every open request has finished.
///
/// Download streams are long-lived: the [`SyncHandler`] must end them on
/// shutdown (for example with a `shutting_down` error line and dropping its
/// sender), or this waits for their clients to go away.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    // Stream lines are small and latency matters (keepalives, fan-out of
    // one change): do not let Nagle's algorithm hold them back.
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!("could not set tcp_nodelay on an accepted connection: {e}");
        }
    });
    axum::serve(listener, router).with_graceful_shutdown(shutdown).await
}

fn status_for(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
        ErrorCode::BadRequest => StatusCode::BAD_REQUEST,
        ErrorCode::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        ErrorCode::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
    }
}

fn error_response(e: ServerError) -> Response {
    let status = status_for(e.code);
    let mut body = encode_line(&e);
    body.pop(); // the newline
    (
        status,
        [(CONTENT_TYPE, HeaderValue::from_static("application/json"))],
        body,
    )
        .into_response()
}

fn server_error(code: ErrorCode, message: String) -> ServerError {
    ServerError { code, message }
}

/// The bearer token of the `Authorization` header.
fn bearer_token(headers: &HeaderMap) -> Result<String, ServerError> {
    let unauthorized = |message: String| server_error(ErrorCode::Unauthorized, message);
    let mut values = headers.get_all(AUTHORIZATION).iter();
    let value = values
        .next()
        .ok_or_else(|| unauthorized("missing authorization header".to_string()))?;
    if values.next().is_some() {
        return Err(unauthorized("more than one authorization header".to_string()));
    }
    let value = value
        .to_str()
        .map_err(|_| unauthorized("authorization header is not visible ascii".to_string()))?;
    let (scheme, token) = value.trim().split_once(' ').unwrap_or((value.trim(), ""));
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(unauthorized(format!(
            "authorization header must use the bearer scheme, got {scheme:?}"
        )));
    }
    let token = token.trim();
    if token.is_empty() {
        return Err(unauthorized(
            "authorization header has an empty bearer token".to_string(),
        ));
    }
    Ok(token.to_string())
}

/// The JSON document of a request body.
fn json_body<T: DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
    what: &str,
    max_body_bytes: usize,
) -> Result<T, ServerError> {
    let body = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            server_error(
                ErrorCode::TooLarge,
                format!("{what} body exceeds max_body_bytes ({max_body_bytes} bytes)"),
            )
        } else {
            server_error(
                ErrorCode::BadRequest,
                format!("could not read {what} body: {}", rejection.body_text().to_lowercase()),
            )
        }
    })?;
    serde_json::from_slice(&body).map_err(|e| server_error(ErrorCode::BadRequest, format!("malformed {what}: {e}")))
}

async fn stream_route(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let opened = async {
        let token = bearer_token(&headers)?;
        let request: StreamRequest = json_body(body, "stream request", state.options.max_body_bytes)?;
        state.handler.stream_lines(&token, request).await
    };
    match opened.await {
        Ok(rx) => (
            [
                (CONTENT_TYPE, HeaderValue::from_static(NDJSON_CONTENT_TYPE)),
                (CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            ],
            axum::body::Body::from_stream(line_chunks(rx)),
        )
            .into_response(),
        Err(e) => {
            tracing::debug!(code = ?e.code, message = %e.message, "stream request refused");
            error_response(e)
        }
    }
}

/// The body of a download stream: each line encoded, lines already queued
/// coalesced into one chunk. Dropping the stream (the client went away)
/// drops the receiver, which the handler's sender observes.
///
/// Lines the handler encoded already go out as they are: a line at least
/// [`MAX_CHUNK_BYTES`] long is its own chunk, without a copy.
fn line_chunks(rx: ServerLineStream) -> impl futures_util::Stream<Item = Result<Bytes, Infallible>> + Send + 'static {
    futures_util::stream::unfold(rx, |mut rx| async move {
        let mut chunk = rx.recv().await?.into_bytes();
        while chunk.len() < MAX_CHUNK_BYTES {
            match rx.try_recv() {
                Ok(line) => chunk.extend_from_slice(&line.into_bytes()),
                Err(_) => break,
            }
        }
        Some((Ok(Bytes::from(chunk)), rx))
    })
}

async fn upload_route(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let answered = async {
        let token = bearer_token(&headers)?;
        let request: UploadRequest = json_body(body, "upload request", state.options.max_body_bytes)?;
        state.handler.upload(&token, request).await
    };
    match answered.await {
        Ok(response) => {
            let mut body = encode_line(&response);
            body.pop(); // the newline
            ([(CONTENT_TYPE, HeaderValue::from_static("application/json"))], body).into_response()
        }
        Err(e) => {
            tracing::debug!(code = ?e.code, message = %e.message, "upload refused");
            error_response(e)
        }
    }
}

async fn health_route() -> Response {
    (
        [(CONTENT_TYPE, HeaderValue::from_static("application/json"))],
        r#"{"status":"ok"}"#,
    )
        .into_response()
}
