//! The client side: [`HttpTransport`], a [`Transport`] over reqwest.

use std::collections::VecDeque;
use std::fmt;
use std::pin::Pin;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use ferry_protocol::{LineSplitter, ServerError, DEFAULT_MAX_LINE_BYTES};
use ferry_transport::{LineStream, Transport, TransportError};
use futures_util::{Stream, StreamExt};
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use reqwest::{Response, StatusCode, Url};

use crate::server::NDJSON_CONTENT_TYPE;

/// Longest error body read to report a failed request.
const MAX_ERROR_BODY_BYTES: usize = 64 * 1024;

/// Client timeouts and limits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpClientOptions {
    /// How long establishing a TCP connection may take.
    pub connect_timeout_ms: u64,
    /// How long a whole upload (request and answer) may take. Download
    /// streams have no overall timeout; see `idle_timeout_ms`.
    pub request_timeout_ms: u64,
    /// Longest stream line (and upload answer) accepted.
    pub max_line_bytes: usize,
    /// A download stream that receives no bytes for this long (including
    /// while waiting for the response headers) is treated as broken. The
    /// server sends keepalives, so this should be a few keepalive
    /// intervals.
    pub idle_timeout_ms: u64,
    /// PEM certificates (one or more) trusted for `https://` next to the
    /// built-in webpki roots: a private CA, a test's own CA.
    pub tls_ca_pem: Option<Vec<u8>>,
}

impl Default for HttpClientOptions {
    fn default() -> Self {
        HttpClientOptions {
            connect_timeout_ms: 10_000,
            request_timeout_ms: 30_000,
            max_line_bytes: DEFAULT_MAX_LINE_BYTES,
            idle_timeout_ms: 60_000,
            tls_ca_pem: None,
        }
    }
}

/// A [`Transport`] to a sync server over HTTP/1.1, plain (`http://`) or
/// over TLS (`https://`: rustls, trusting the webpki roots and
/// [`HttpClientOptions::tls_ca_pem`]).
#[derive(Clone)]
pub struct HttpTransport {
    client: reqwest::Client,
    stream_url: Url,
    upload_url: Url,
    base_url: String,
    options: HttpClientOptions,
}

impl fmt::Debug for HttpTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpTransport")
            .field("base_url", &self.base_url)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl HttpTransport {
    /// A transport to the server at `base_url` (e.g. `http://127.0.0.1:8080`
    /// or `http://host/prefix`), with default options.
    pub fn new(base_url: impl Into<String>) -> Result<Self, TransportError> {
        Self::with_options(base_url, HttpClientOptions::default())
    }

    /// A transport to the server at `base_url` with `options`.
    pub fn with_options(base_url: impl Into<String>, options: HttpClientOptions) -> Result<Self, TransportError> {
        let base_url = base_url.into();
        let parsed = Url::parse(&base_url)
            .map_err(|e| TransportError::Refused(format!("invalid base url {base_url:?}: {e}")))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(TransportError::Refused(format!(
                "base url {base_url:?} must use the http or https scheme, got {:?}",
                parsed.scheme()
            )));
        }
        if parsed.cannot_be_a_base() || parsed.host().is_none() {
            return Err(TransportError::Refused(format!("base url {base_url:?} has no host")));
        }
        let join = |route: &str| {
            let url = format!("{}/{route}", parsed.as_str().trim_end_matches('/'));
            Url::parse(&url).map_err(|e| TransportError::Refused(format!("invalid url {url:?}: {e}")))
        };
        let stream_url = join("sync/stream")?;
        let upload_url = join("sync/upload")?;
        let mut builder = reqwest::Client::builder().use_rustls_tls();
        if let Some(pem) = &options.tls_ca_pem {
            let certs = reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| TransportError::Refused(format!("tls_ca_pem is not a pem certificate bundle: {e}")))?;
            if certs.is_empty() {
                return Err(TransportError::Refused(
                    "tls_ca_pem holds no pem certificate".to_string(),
                ));
            }
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        let client = builder
            .connect_timeout(Duration::from_millis(options.connect_timeout_ms))
            .tcp_nodelay(true)
            // The server closes a kept-alive connection that sends no
            // request within its header timeout (10 s by default): drop
            // pooled ones first rather than reuse one it is closing.
            .pool_idle_timeout(Duration::from_secs(POOL_IDLE_TIMEOUT_S))
            .build()
            .map_err(|e| TransportError::Connection(format!("could not build the http client: {e}")))?;
        Ok(HttpTransport {
            client,
            stream_url,
            upload_url,
            base_url,
            options,
        })
    }

    /// The base url this transport talks to.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// The options in effect.
    pub fn options(&self) -> &HttpClientOptions {
        &self.options
    }
}

/// The transport error of a failed request (no answer).
fn request_error(what: &str, e: &reqwest::Error) -> TransportError {
    if e.is_builder() {
        // A token or body that cannot go on the wire: sending it again
        // fails again.
        TransportError::Refused(format!("{what} could not be built: {}", ferry_core::error_chain(e)))
    } else if let Some(tls) = tls_error(e) {
        // Transient: the server's certificate may be fixed, and a client
        // must never drop its writes over it.
        TransportError::Connection(format!(
            "{what} failed: tls: {tls} (is the server's certificate issued by a trusted ca? \
             a private ca goes in HttpClientOptions::tls_ca_pem)"
        ))
    } else if e.is_timeout() {
        TransportError::Connection(format!("{what} timed out: {}", ferry_core::error_chain(e)))
    } else {
        TransportError::Connection(format!("{what} failed: {}", ferry_core::error_chain(e)))
    }
}

/// The rustls error somewhere in `e`'s sources (through `io::Error`s).
fn tls_error(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = current {
        if let Some(tls) = err.downcast_ref::<rustls::Error>() {
            return Some(tls.to_string().to_lowercase());
        }
        if let Some(inner) = err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return Some(inner.to_string().to_lowercase());
        }
        current = err.source();
    }
    // Boxed twice on the way (a boxed error is an error too), the type
    // does not show: rustls' certificate errors still say so.
    let mut last = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        last = s.to_string();
        source = s.source();
    }
    let last = last.to_lowercase();
    (last.contains("peer certificate") || last.contains("tls handshake")).then_some(last)
}

/// Read at most `limit` bytes of a body; `None` if it is longer.
async fn read_body_limited(response: Response, limit: usize) -> Result<Option<Vec<u8>>, reqwest::Error> {
    let mut body = Vec::new();
    let mut chunks = response.bytes_stream();
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk?;
        if body.len() + chunk.len() > limit {
            return Ok(None);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Some(body))
}

/// Seconds an idle pooled connection is kept: below the server's default
/// `header_timeout_ms`.
const POOL_IDLE_TIMEOUT_S: u64 = 5;

/// The transport error for a non-success answer.
async fn status_error(what: &str, response: Response) -> TransportError {
    let status = response.status();
    let (message, from_ferry) = match read_body_limited(response, MAX_ERROR_BODY_BYTES).await {
        Ok(Some(body)) => match serde_json::from_slice::<ServerError>(&body) {
            Ok(e) => (e.message, true),
            Err(_) if body.is_empty() => (format!("{what} answered http status {status}"), false),
            Err(_) => (
                format!(
                    "{what} answered http status {status}: {}",
                    String::from_utf8_lossy(&body).trim()
                ),
                false,
            ),
        },
        Ok(None) => (
            format!("{what} answered http status {status} (error body over {MAX_ERROR_BODY_BYTES} bytes)"),
            false,
        ),
        Err(e) => (
            format!("{what} answered http status {status} (error body unreadable: {e})"),
            false,
        ),
    };
    error_for_status(status, message, from_ferry)
}

/// `from_ferry`: the body is a Ferry server's error (`ServerError`).
fn error_for_status(status: StatusCode, message: String, from_ferry: bool) -> TransportError {
    match status {
        StatusCode::UNAUTHORIZED => TransportError::Unauthorized(message),
        // Busy (503), rate limited (429), a body that came too slowly
        // (408): the same request later can succeed.
        s if s.is_server_error() => TransportError::Server(message),
        StatusCode::TOO_MANY_REQUESTS | StatusCode::REQUEST_TIMEOUT => TransportError::Server(message),
        // A Ferry server's 400, and a 413 from it or from a proxy in front
        // of it (a body over its limit): sending the same request again
        // fails again, so the client rejects what it sent.
        StatusCode::BAD_REQUEST if from_ferry => TransportError::Refused(message),
        StatusCode::PAYLOAD_TOO_LARGE => TransportError::Refused(message),
        // Any other answer (404 or 405 of a wrong base url, a proxy's 403
        // or 400, 1xx/3xx) did not come from a sync server that read the
        // request: the app's writes must not be rejected for it. Retried
        // with backoff (and shown in the status) until the address or the
        // proxy is fixed.
        _ => TransportError::Server(message),
    }
}

type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, reqwest::Error>> + Send>>;

/// The lines of one download stream over HTTP.
struct HttpLines {
    body: ByteStream,
    splitter: LineSplitter,
    ready: VecDeque<Vec<u8>>,
    idle_timeout: Duration,
    idle_timeout_ms: u64,
    /// Set once the stream ended or failed: what every later call returns.
    finished: Option<Result<(), TransportError>>,
}

impl HttpLines {
    fn fail(&mut self, e: TransportError) -> Result<Option<Vec<u8>>, TransportError> {
        self.finished = Some(Err(e.clone()));
        Err(e)
    }
}

#[async_trait]
impl LineStream for HttpLines {
    async fn next_line(&mut self) -> Result<Option<Vec<u8>>, TransportError> {
        loop {
            if let Some(line) = self.ready.pop_front() {
                return Ok(Some(line));
            }
            if let Some(finished) = &self.finished {
                return finished.clone().map(|()| None);
            }
            match tokio::time::timeout(self.idle_timeout, self.body.next()).await {
                Err(_) => {
                    let ms = self.idle_timeout_ms;
                    return self.fail(TransportError::Connection(format!(
                        "stream received no bytes for idle_timeout_ms ({ms} ms)"
                    )));
                }
                Ok(None) => {
                    let pending = self.splitter.pending_bytes();
                    if pending > 0 {
                        return self.fail(TransportError::Connection(format!(
                            "stream ended inside a line ({pending} bytes without a newline)"
                        )));
                    }
                    self.finished = Some(Ok(()));
                }
                Ok(Some(Err(e))) => return self.fail(request_error("stream", &e)),
                Ok(Some(Ok(chunk))) => match self.splitter.push(&chunk) {
                    Ok(lines) => self.ready.extend(lines),
                    Err(e) => {
                        // The server sent more than this client accepts;
                        // the connection is dropped with the stream.
                        return self.fail(TransportError::Server(format!("stream line refused: {e}")));
                    }
                },
            }
        }
    }
}

#[async_trait]
impl Transport for HttpTransport {
    async fn open_stream(&self, token: &str, request: Vec<u8>) -> Result<Box<dyn LineStream>, TransportError> {
        let idle_timeout = Duration::from_millis(self.options.idle_timeout_ms);
        let sent = self
            .client
            .post(self.stream_url.clone())
            .header(AUTHORIZATION, format!("Bearer {token}"))
            .header(CONTENT_TYPE, "application/json")
            .header(ACCEPT, NDJSON_CONTENT_TYPE)
            .body(request)
            .send();
        let response = match tokio::time::timeout(idle_timeout, sent).await {
            Err(_) => {
                return Err(TransportError::Connection(format!(
                    "stream got no answer within idle_timeout_ms ({} ms)",
                    self.options.idle_timeout_ms
                )))
            }
            Ok(Err(e)) => return Err(request_error("stream request", &e)),
            Ok(Ok(response)) => response,
        };
        if !response.status().is_success() {
            return Err(status_error("stream request", response).await);
        }
        Ok(Box::new(HttpLines {
            body: Box::pin(response.bytes_stream()),
            splitter: LineSplitter::new(self.options.max_line_bytes),
            ready: VecDeque::new(),
            idle_timeout,
            idle_timeout_ms: self.options.idle_timeout_ms,
            finished: None,
        }))
    }

    async fn upload(&self, token: &str, request: Vec<u8>) -> Result<Vec<u8>, TransportError> {
        let response = self
            .client
            .post(self.upload_url.clone())
            .timeout(Duration::from_millis(self.options.request_timeout_ms))
            .header(AUTHORIZATION, format!("Bearer {token}"))
            .header(CONTENT_TYPE, "application/json")
            .header(ACCEPT, "application/json")
            .body(request)
            .send()
            .await
            .map_err(|e| request_error("upload request", &e))?;
        if !response.status().is_success() {
            return Err(status_error("upload request", response).await);
        }
        let limit = self.options.max_line_bytes;
        match read_body_limited(response, limit).await {
            Ok(Some(body)) => Ok(body),
            Ok(None) => Err(TransportError::Server(format!(
                "upload answer exceeds max_line_bytes ({limit} bytes)"
            ))),
            Err(e) => Err(request_error("upload answer", &e)),
        }
    }
}
