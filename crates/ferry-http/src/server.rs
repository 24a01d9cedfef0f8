//! The server side: an axum [`Router`] carrying bytes to a [`SyncHandler`].

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use axum::body::Body;
use axum::extract::State;
use axum::http::header::{AUTHORIZATION, CACHE_CONTROL, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER};
use axum::http::{HeaderMap, HeaderValue, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Extension;
use axum::Router;
use bytes::Bytes;
use ferry_protocol::{encode_line, ErrorCode, ServerError, StreamRequest, UploadRequest};
use ferry_transport::SyncHandler;
use futures_util::StreamExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::stream_body::{LineBody, StreamEnds};

/// The default limit on a request body: 32 MiB.
pub const DEFAULT_MAX_BODY_BYTES: usize = 32 * 1024 * 1024;

/// Per-user upload buckets kept before idle (full) ones are dropped.
const MAX_TRACKED_UPLOADERS: usize = 10_000;

/// The content type of the download stream.
pub const NDJSON_CONTENT_TYPE: &str = "application/x-ndjson";

/// Server limits. Every limit has its unit in its name; in the server
/// config file they sit in the `[http]` section (the body limit is the
/// top-level `max_body_bytes` there).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpServerOptions {
    /// Longest request body accepted; longer ones get 413 (a declared
    /// `Content-Length` over it before any byte of the body is read).
    #[serde(skip)]
    pub max_body_bytes: usize,
    /// Time a connection has to send a request's whole header, from the
    /// moment the server waits for it (a new connection, or a kept-alive
    /// one between requests); then it is closed. Cuts half-sent headers
    /// and idle sockets that never send a request.
    pub header_timeout_ms: u64,
    /// Time a request has to send its whole body once its token was
    /// accepted; then it gets 408 and the connection is closed. Cuts
    /// slow bodies (one byte per second).
    pub body_timeout_ms: u64,
    /// A connection that moves no byte either way for this long while no
    /// request is being handled is closed (a stream whose client stopped
    /// reading). Must exceed the service's stream keepalive interval.
    pub idle_timeout_ms: u64,
    /// Most connections open at once; a connection over it gets a 503
    /// (`busy`) and is closed at once.
    pub max_connections: usize,
    /// Most download streams one user has open at once; more get 429
    /// (`rate_limited`). 0: no limit.
    pub max_streams_per_user: usize,
    /// Most uploads one user starts per second (a token bucket with this
    /// burst); more get 429 (`rate_limited`) with the seconds until the
    /// next is allowed. 0: no limit.
    pub max_uploads_per_user_per_s: u32,
    /// `Retry-After` of 503 (`busy`) answers and of the per-user stream
    /// limit.
    pub retry_after_s: u64,
    /// Once shutdown was asked for, how long open connections get to
    /// finish (streams end with a `shutting_down` line and must reach
    /// their clients); the connections still open then are closed.
    pub shutdown_timeout_ms: u64,
    /// A stream the handler ended (token expiry, shutdown, an error line)
    /// must reach its client within this; a client that does not read
    /// it is disconnected, so it holds no server memory.
    pub stream_end_timeout_ms: u64,
}

impl Default for HttpServerOptions {
    fn default() -> Self {
        HttpServerOptions {
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            header_timeout_ms: 10_000,
            body_timeout_ms: 60_000,
            idle_timeout_ms: 120_000,
            max_connections: 10_240,
            max_streams_per_user: 32,
            max_uploads_per_user_per_s: 100,
            retry_after_s: 1,
            shutdown_timeout_ms: 5_000,
            stream_end_timeout_ms: 5_000,
        }
    }
}

/// Checks a bearer token before the request body is read, so a refused
/// token costs no body read, and names its user for the per-user limits.
#[async_trait]
pub trait TokenVerifier: Send + Sync {
    /// The user id the token belongs to, or the error to answer
    /// (`unauthorized`: 401; `busy`: 503, ...).
    async fn verify_token(&self, token: &str) -> Result<String, ServerError>;
}

/// Streams open and upload buckets, per user.
#[derive(Debug, Default)]
struct UserLimits {
    streams: parking_lot::Mutex<HashMap<String, usize>>,
    uploads: parking_lot::Mutex<HashMap<String, UploadBucket>>,
}

#[derive(Debug, Clone, Copy)]
struct UploadBucket {
    tokens: f64,
    at: Instant,
}

/// One stream of a user, counted until dropped (the response body ends
/// or the client goes away).
#[derive(Debug)]
pub(crate) struct StreamSlot {
    limits: Arc<UserLimits>,
    user: String,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut streams = self.limits.streams.lock();
        if let Some(n) = streams.get_mut(&self.user) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                streams.remove(&self.user);
            }
        }
    }
}

impl UserLimits {
    fn open_stream(self: &Arc<Self>, user: &str, max: usize) -> Result<Option<StreamSlot>, ServerError> {
        if max == 0 {
            return Ok(None);
        }
        let mut streams = self.streams.lock();
        let n = streams.entry(user.to_owned()).or_insert(0);
        if *n >= max {
            return Err(server_error(
                ErrorCode::RateLimited,
                format!("user {user:?} already has {max} streams open (max_streams_per_user)"),
            ));
        }
        *n += 1;
        Ok(Some(StreamSlot {
            limits: self.clone(),
            user: user.to_owned(),
        }))
    }

    /// Take one upload from the user's bucket, or the seconds until one
    /// is available.
    fn start_upload(&self, user: &str, per_s: u32) -> Result<(), (ServerError, u64)> {
        if per_s == 0 {
            return Ok(());
        }
        let rate = f64::from(per_s);
        let now = Instant::now();
        let mut uploads = self.uploads.lock();
        if uploads.len() > MAX_TRACKED_UPLOADERS {
            uploads.retain(|_, b| b.tokens + now.duration_since(b.at).as_secs_f64() * rate < rate);
        }
        let b = uploads
            .entry(user.to_owned())
            .or_insert(UploadBucket { tokens: rate, at: now });
        b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * rate).min(rate);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            return Ok(());
        }
        let wait_s = ((1.0 - b.tokens) / rate).ceil().max(1.0);
        Err((
            server_error(
                ErrorCode::RateLimited,
                format!("user {user:?} sent more than {per_s} uploads in a second (max_uploads_per_user_per_s)"),
            ),
            // At most `1 / rate` seconds (at most 1) rounded up.
            wait_s as u64,
        ))
    }
}

#[derive(Clone)]
struct AppState {
    handler: Arc<dyn SyncHandler>,
    verifier: Option<Arc<dyn TokenVerifier>>,
    options: HttpServerOptions,
    limits: Arc<UserLimits>,
    /// The download streams whose end their connections watch.
    stream_ends: Arc<StreamEnds>,
}

impl fmt::Debug for AppState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AppState")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl AppState {
    /// The user of a token: the verifier's answer, or (without a
    /// verifier) the token itself, which the handler then verifies.
    async fn user_of(&self, token: &str) -> Result<String, ServerError> {
        match &self.verifier {
            Some(v) => v.verify_token(token).await,
            None => Ok(token.to_owned()),
        }
    }
}

/// The routes of a sync server over `handler`:
///
/// - `POST /sync/stream`: JSON [`StreamRequest`] in, NDJSON lines out;
/// - `POST /sync/upload`: JSON [`UploadRequest`] in, JSON
///   [`ferry_protocol::UploadResponse`] out;
/// - `GET /health`: `{"status":"ok"}`.
///
/// The bearer token is checked (its header form; the per-user limits,
/// keyed by the token itself) before the body is read. See
/// [`router_with_verifier`] to verify it there too, and the crate
/// documentation for the status codes.
pub fn router(handler: Arc<dyn SyncHandler>, options: HttpServerOptions) -> Router {
    build_router(handler, None, options)
}

/// [`router`] with a [`TokenVerifier`]: a token it refuses is answered
/// before any byte of the body is read, and the per-user limits count by
/// the user it names.
pub fn router_with_verifier(
    handler: Arc<dyn SyncHandler>,
    verifier: Arc<dyn TokenVerifier>,
    options: HttpServerOptions,
) -> Router {
    build_router(handler, Some(verifier), options)
}

fn build_router(
    handler: Arc<dyn SyncHandler>,
    verifier: Option<Arc<dyn TokenVerifier>>,
    options: HttpServerOptions,
) -> Router {
    Router::new()
        .route("/sync/stream", post(stream_route))
        .route("/sync/upload", post(upload_route))
        .route("/health", get(health_route))
        .with_state(AppState {
            handler,
            verifier,
            options,
            limits: Arc::new(UserLimits::default()),
            stream_ends: Arc::default(),
        })
}

/// Serve `router` on `listener` with the default [`HttpServerOptions`];
/// see [`serve_with_options`].
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    serve_with_options(listener, router, HttpServerOptions::default(), shutdown).await
}

/// Serve `router` on `listener` (HTTP/1.1) until `shutdown` completes,
/// then stop accepting connections and return once every open request has
/// finished.
///
/// Connections are bounded by `options`: at most `max_connections` open
/// (more are answered 503 and closed), each must send a request's header
/// within `header_timeout_ms`, and one idle (no byte moved, no request
/// handled) for `idle_timeout_ms` is closed.
///
/// Download streams are long-lived: the [`SyncHandler`] must end them on
/// shutdown (for example with a `shutting_down` error line and dropping its
/// sender), or this waits for their clients to go away.
pub async fn serve_with_options(
    listener: TcpListener,
    router: Router,
    options: HttpServerOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    serve_connections(listener, router, options, None, shutdown).await
}

/// Accept connections until `shutdown`, each served (over TLS when
/// `tls` is given) with the limits of `options`; then give open
/// connections `shutdown_timeout_ms` to finish and close the rest.
pub(crate) async fn serve_connections(
    listener: TcpListener,
    router: Router,
    options: HttpServerOptions,
    tls: Option<Handshaker>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let connections = Arc::new(Semaphore::new(options.max_connections));
    let graceful = GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(options.header_timeout_ms.max(1)))
        .keep_alive(true);
    let idle = Duration::from_millis(options.idle_timeout_ms.max(1));
    let handshake_timeout = Duration::from_millis(options.header_timeout_ms.max(1));
    let refusal = refusal_bytes(options.retry_after_s, options.max_connections);
    let mut tasks = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        // Forget connections that ended.
        while tasks.try_join_next().is_some() {}
        let tcp = tokio::select! {
            biased;
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _peer)) => tcp,
                Err(e) => {
                    // Out of file descriptors, a connection reset while
                    // queued, ...: wait a little instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Stream lines are small and latency matters (keepalives, fan-out
        // of one change): do not let Nagle's algorithm hold them back.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!("could not set tcp_nodelay on an accepted connection: {e}");
        }
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            // Best effort and never blocking: the answer fits the socket's
            // empty send buffer.
            let _ = tcp.try_write(&refusal);
            tracing::debug!(
                max_connections = options.max_connections,
                "connection refused: at the cap"
            );
            continue;
        };
        let activity = Arc::new(Activity::new());
        let tower = TowerToHyperService::new(router.clone());
        let handling = activity.clone();
        let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
            let busy = handling.handling();
            req.extensions_mut().insert(ConnHandle(handling.clone()));
            let answer = hyper::service::Service::call(&tower, req);
            async move {
                let response = answer.await;
                drop(busy);
                response
            }
        });
        let http = http.clone();
        let tls = tls.clone();
        // Registered before the task starts, so a shutdown that comes
        // during a TLS handshake still waits for (or closes) it.
        let watcher = graceful.watcher();
        tasks.spawn(async move {
            let _permit = permit;
            let io: Box<dyn Io> = match tls {
                None => Box::new(tcp),
                Some(handshake) => match tokio::time::timeout(handshake_timeout, handshake(tcp)).await {
                    Ok(Ok(stream)) => Box::new(stream),
                    Ok(Err(e)) => {
                        tracing::debug!("tls handshake failed: {e}");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!("tls handshake not done within header_timeout_ms");
                        return;
                    }
                },
            };
            let io = TokioIo::new(ActivityIo {
                inner: io,
                activity: activity.clone(),
            });
            let conn = watcher.watch(http.serve_connection(io, service));
            tokio::pin!(conn);
            loop {
                let wait = idle
                    .saturating_sub(activity.idle_for())
                    .min(activity.until_close())
                    .max(Duration::from_millis(10));
                tokio::select! {
                    biased;
                    done = &mut conn => {
                        if let Err(e) = done {
                            tracing::debug!("connection ended: {e}");
                        }
                        break;
                    }
                    () = activity.closing.notified() => {}
                    () = tokio::time::sleep(wait) => {
                        if !activity.is_handling() && activity.idle_for() >= idle {
                            tracing::debug!(idle_timeout_ms = idle.as_millis() as u64, "closing an idle connection");
                            break;
                        }
                        if activity.until_close().is_zero() {
                            tracing::debug!("closing a connection whose ended stream its client did not read");
                            break;
                        }
                    }
                }
            }
        });
    }
    drop(listener);
    let grace = Duration::from_millis(options.shutdown_timeout_ms);
    if tokio::time::timeout(grace, graceful.shutdown()).await.is_err() {
        tracing::info!(
            open = tasks.len(),
            shutdown_timeout_ms = options.shutdown_timeout_ms,
            "closing the connections still open at the shutdown timeout"
        );
    }
    tasks.shutdown().await;
    Ok(())
}

/// The raw answer to a connection over the cap.
fn refusal_bytes(retry_after_s: u64, max_connections: usize) -> Vec<u8> {
    let body = encode_line(&server_error(
        ErrorCode::Busy,
        format!("too many connections (max_connections {max_connections})"),
    ));
    let mut out = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: {retry_after_s}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(&body);
    out
}

/// When a connection last moved a byte, and how many of its requests
/// are being handled.
#[derive(Debug)]
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
    handling: AtomicUsize,
    /// When the connection is closed whatever it is doing (ms since
    /// `start`; `u64::MAX`: never): a stream ended that its client does
    /// not read.
    close_at_ms: AtomicU64,
    /// Wakes the connection's task when `close_at_ms` was set.
    closing: tokio::sync::Notify,
}

/// The connection a request came on (a request extension).
#[derive(Clone, Debug)]
pub(crate) struct ConnHandle(Arc<Activity>);

impl ConnHandle {
    /// Close the connection `within` from now unless it was asked to
    /// close earlier (a new request on it takes the request back).
    pub(crate) fn close_within(&self, within: Duration) {
        self.0.close_within(within);
    }
}

/// A request being handled on a connection, until dropped.
struct Handling(Arc<Activity>);

impl Drop for Handling {
    fn drop(&mut self) {
        self.0.handling.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

impl Activity {
    fn new() -> Self {
        Activity {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
            handling: AtomicUsize::new(0),
            close_at_ms: AtomicU64::new(u64::MAX),
            closing: tokio::sync::Notify::new(),
        }
    }

    /// Close the connection `within` from now unless it was asked to
    /// close earlier (a new request on it takes the request back).
    fn close_within(&self, within: Duration) {
        let at = self
            .now_ms()
            .saturating_add(u64::try_from(within.as_millis()).unwrap_or(u64::MAX));
        self.close_at_ms.fetch_min(at, Ordering::Relaxed);
        self.closing.notify_one();
    }

    /// Time left before the connection must close (`Duration::MAX`: none).
    fn until_close(&self) -> Duration {
        match self.close_at_ms.load(Ordering::Relaxed) {
            u64::MAX => Duration::MAX,
            at => Duration::from_millis(at.saturating_sub(self.now_ms())),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn touch(&self) {
        self.last_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        Duration::from_millis(self.now_ms().saturating_sub(self.last_ms.load(Ordering::Relaxed)))
    }

    fn handling(self: &Arc<Self>) -> Handling {
        self.handling.fetch_add(1, Ordering::Relaxed);
        // A new request on a kept-alive connection: the stream before it
        // was read to its end.
        self.close_at_ms.store(u64::MAX, Ordering::Relaxed);
        self.touch();
        Handling(self.clone())
    }

    fn is_handling(&self) -> bool {
        self.handling.load(Ordering::Relaxed) > 0
    }
}

/// A connection's byte stream: TCP, or TLS over TCP.
pub(crate) trait Io: AsyncRead + AsyncWrite + Send + Unpin {}

/// Turns an accepted TCP connection into the stream HTTP is spoken on
/// (a TLS handshake).
pub(crate) type Handshaker =
    Arc<dyn Fn(TcpStream) -> Pin<Box<dyn Future<Output = io::Result<Box<dyn Io>>> + Send>> + Send + Sync>;

impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// A socket that records when it last moved a byte.
struct ActivityIo {
    inner: Box<dyn Io>,
    activity: Arc<Activity>,
}

impl AsyncRead for ActivityIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.activity.touch();
        }
        polled
    }
}

impl AsyncWrite for ActivityIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, data);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        polled
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

fn status_for(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
        ErrorCode::BadRequest => StatusCode::BAD_REQUEST,
        ErrorCode::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        ErrorCode::ShuttingDown | ErrorCode::Busy => StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
    }
}

/// An error answer; `busy` and `rate_limited` carry `Retry-After`.
fn error_response(e: ServerError, retry_after_s: u64) -> Response {
    error_response_as(status_for(e.code), e, retry_after_s)
}

fn error_response_as(status: StatusCode, e: ServerError, retry_after_s: u64) -> Response {
    let retry = matches!(e.code, ErrorCode::Busy | ErrorCode::RateLimited);
    let mut body = encode_line(&e);
    body.pop(); // the newline
    let mut response = (
        status,
        [(CONTENT_TYPE, HeaderValue::from_static("application/json"))],
        body,
    )
        .into_response();
    if retry {
        response
            .headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from(retry_after_s.max(1)));
    }
    response
}

/// An error answered before the request body was read (whole): the
/// connection is closed after it, so the unread body is never read.
fn refused_unread(mut response: Response) -> Response {
    response
        .headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("close"));
    response
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

/// Why a body could not be read.
enum BodyError {
    /// Answer this error; the body was not read whole.
    Refused(ServerError),
    /// The body did not arrive within `body_timeout_ms`.
    TimedOut(ServerError),
}

impl BodyError {
    fn into_response(self, retry_after_s: u64) -> Response {
        match self {
            BodyError::Refused(e) => refused_unread(error_response(e, retry_after_s)),
            BodyError::TimedOut(e) => refused_unread(error_response_as(StatusCode::REQUEST_TIMEOUT, e, retry_after_s)),
        }
    }
}

/// Read the whole body, within `max_body_bytes` (a larger declared
/// `Content-Length` is refused before reading) and `body_timeout_ms`.
async fn read_body(headers: &HeaderMap, body: Body, what: &str, o: &HttpServerOptions) -> Result<Bytes, BodyError> {
    let max = o.max_body_bytes;
    let too_large = || {
        BodyError::Refused(server_error(
            ErrorCode::TooLarge,
            format!("{what} body exceeds max_body_bytes ({max} bytes)"),
        ))
    };
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return Err(too_large());
    }
    let read = async {
        let mut stream = body.into_data_stream();
        let mut out = Vec::with_capacity(declared.map_or(0, |n| n as usize));
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| {
                BodyError::Refused(server_error(
                    ErrorCode::BadRequest,
                    format!("could not read {what} body: {}", e.to_string().to_lowercase()),
                ))
            })?;
            if out.len() + chunk.len() > max {
                return Err(too_large());
            }
            out.extend_from_slice(&chunk);
        }
        Ok(Bytes::from(out))
    };
    match tokio::time::timeout(Duration::from_millis(o.body_timeout_ms), read).await {
        Ok(read) => read,
        Err(_) => Err(BodyError::TimedOut(server_error(
            ErrorCode::BadRequest,
            format!(
                "{what} body did not arrive within body_timeout_ms ({} ms)",
                o.body_timeout_ms
            ),
        ))),
    }
}

/// The JSON document of a request body.
fn parse_json<T: DeserializeOwned>(body: &[u8], what: &str) -> Result<T, ServerError> {
    serde_json::from_slice(body).map_err(|e| server_error(ErrorCode::BadRequest, format!("malformed {what}: {e}")))
}

async fn stream_route(
    State(state): State<AppState>,
    conn: Option<Extension<ConnHandle>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let retry_after_s = state.options.retry_after_s;
    let refused = |e: ServerError| {
        tracing::debug!(code = ?e.code, message = %e.message, "stream request refused");
        refused_unread(error_response(e, retry_after_s))
    };
    // The token first: a refused one costs no body read.
    let token = match bearer_token(&headers) {
        Ok(t) => t,
        Err(e) => return refused(e),
    };
    let user = match state.user_of(&token).await {
        Ok(u) => u,
        Err(e) => return refused(e),
    };
    let slot = match state.limits.open_stream(&user, state.options.max_streams_per_user) {
        Ok(s) => s,
        Err(e) => return refused(e),
    };
    let body = match read_body(&headers, body, "stream request", &state.options).await {
        Ok(b) => b,
        Err(e) => return e.into_response(retry_after_s),
    };
    let opened = async {
        let request: StreamRequest = parse_json(&body, "stream request")?;
        state.handler.stream_lines(&token, request).await
    };
    match opened.await {
        Ok(rx) => (
            [
                (CONTENT_TYPE, HeaderValue::from_static(NDJSON_CONTENT_TYPE)),
                (CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            ],
            Body::from_stream(LineBody::new(
                rx,
                slot,
                conn.map(|Extension(c)| c),
                Duration::from_millis(state.options.stream_end_timeout_ms),
                &state.stream_ends,
            )),
        )
            .into_response(),
        Err(e) => {
            tracing::debug!(code = ?e.code, message = %e.message, "stream request refused");
            error_response(e, retry_after_s)
        }
    }
}

async fn upload_route(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    let retry_after_s = state.options.retry_after_s;
    let refused = |e: ServerError, retry_after_s: u64| {
        tracing::debug!(code = ?e.code, message = %e.message, "upload refused");
        refused_unread(error_response(e, retry_after_s))
    };
    // The token first: a refused one costs no body read.
    let token = match bearer_token(&headers) {
        Ok(t) => t,
        Err(e) => return refused(e, retry_after_s),
    };
    let user = match state.user_of(&token).await {
        Ok(u) => u,
        Err(e) => return refused(e, retry_after_s),
    };
    if let Err((e, wait_s)) = state
        .limits
        .start_upload(&user, state.options.max_uploads_per_user_per_s)
    {
        return refused(e, wait_s);
    }
    let body = match read_body(&headers, body, "upload request", &state.options).await {
        Ok(b) => b,
        Err(e) => return e.into_response(retry_after_s),
    };
    let answered = async {
        let request: UploadRequest = parse_json(&body, "upload request")?;
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
            error_response(e, retry_after_s)
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
