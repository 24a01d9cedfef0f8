//! The HTTP transport end to end on loopback: a fake `SyncHandler` behind
//! `router`, reached through `HttpTransport`.

// Test helpers outside `#[test]` functions panic on setup failures too.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use ferry_core::CrudEntry;
use ferry_http::{router, serve, HttpClientOptions, HttpServerOptions, HttpTransport};
use ferry_protocol::{
    decode_line, BucketChecksum, Checkpoint, DataBatch, ErrorCode, OpKind, OpOutcome, OplogEntry, Outcome, ServerError,
    StreamLine, StreamRequest, UploadRequest, UploadResponse, UploadTransaction, DEFAULT_MAX_LINE_BYTES,
};
use ferry_transport::{ServerLines, SyncHandler, Transport, TransportError};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::JoinHandle;

const WAIT: Duration = Duration::from_secs(3);
const KEEPALIVE: Duration = Duration::from_millis(20);

/// Accepts the token "good". Streams a checkpoint, a data line,
/// checkpoint_complete, then keepalives until the client goes away. The
/// client id picks variants: "finite" ends after checkpoint_complete,
/// "big" sends one oversized data line, "silent" sends nothing, "draining"
/// is refused with
/// shutting_down.
#[derive(Default)]
struct FakeHandler {
    streams: Mutex<Vec<StreamRequest>>,
    uploads: Mutex<Vec<(String, UploadRequest)>>,
    /// Notified when a stream's sender observed the client going away.
    closed: Arc<Notify>,
}

impl FakeHandler {
    fn calls(&self) -> usize {
        self.streams.lock().unwrap().len() + self.uploads.lock().unwrap().len()
    }
}

fn checkpoint() -> StreamLine {
    StreamLine::Checkpoint(Checkpoint {
        hlc: None,
        last_op_id: 7,
        write_checkpoint: None,
        buckets: vec![BucketChecksum {
            bucket: "b1".to_string(),
            checksum: 42,
            count: 1,
        }],
    })
}

fn data(object_type: &str) -> StreamLine {
    StreamLine::Data(DataBatch {
        bucket: "b1".to_string(),
        ops: vec![OplogEntry {
            op_id: 7,
            op: OpKind::Put,
            object_type: Some(object_type.to_string()),
            object_id: Some("r1".to_string()),
            data: None,
            checksum: 42,
        }],
    })
}

fn unauthorized(token: &str) -> ServerError {
    ServerError {
        code: ErrorCode::Unauthorized,
        message: format!("unknown token {token:?}"),
    }
}

#[async_trait]
impl SyncHandler for FakeHandler {
    async fn stream(&self, token: &str, request: StreamRequest) -> Result<ServerLines, ServerError> {
        if token != "good" {
            return Err(unauthorized(token));
        }
        if request.client_id == "draining" {
            return Err(ServerError {
                code: ErrorCode::ShuttingDown,
                message: "server is shutting down".to_string(),
            });
        }
        let client_id = request.client_id.clone();
        self.streams.lock().unwrap().push(request);
        let (tx, rx) = mpsc::channel(16);
        let closed = self.closed.clone();
        tokio::spawn(async move {
            if client_id == "silent" {
                tx.closed().await;
                return;
            }
            if client_id == "big" {
                let _ = tx.send(data(&"x".repeat(10_000))).await;
                return;
            }
            for line in [
                checkpoint(),
                data("todos"),
                StreamLine::CheckpointComplete { last_op_id: 7 },
            ] {
                if tx.send(line).await.is_err() {
                    return;
                }
            }
            if client_id == "finite" {
                return;
            }
            loop {
                tokio::select! {
                    _ = tx.closed() => break,
                    _ = tokio::time::sleep(KEEPALIVE) => {
                        if tx.send(StreamLine::Keepalive { token_expires_in_s: 60 }).await.is_err() {
                            break;
                        }
                    }
                }
            }
            closed.notify_one();
        });
        Ok(rx)
    }

    async fn upload(&self, token: &str, request: UploadRequest) -> Result<UploadResponse, ServerError> {
        if token != "good" {
            return Err(unauthorized(token));
        }
        let outcomes = request
            .transactions
            .iter()
            .flat_map(|tx| tx.ops.iter())
            .map(|op| OpOutcome {
                seq: op.seq,
                outcome: Outcome::Applied,
            })
            .collect::<Vec<_>>();
        let write_checkpoint = outcomes.iter().map(|o| o.seq).max().unwrap_or(0);
        self.uploads.lock().unwrap().push((token.to_string(), request));
        Ok(UploadResponse {
            hlc: None,
            outcomes,
            write_checkpoint,
        })
    }
}

struct TestServer {
    addr: SocketAddr,
    handler: Arc<FakeHandler>,
    shutdown: Option<oneshot::Sender<()>>,
    served: JoinHandle<std::io::Result<()>>,
}

impl TestServer {
    async fn start(options: HttpServerOptions) -> TestServer {
        let handler = Arc::new(FakeHandler::default());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (shutdown, signal) = oneshot::channel::<()>();
        let app = router(handler.clone(), options);
        let served = tokio::spawn(serve(listener, app, async move {
            let _ = signal.await;
        }));
        TestServer {
            addr,
            handler,
            shutdown: Some(shutdown),
            served,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn transport(&self) -> HttpTransport {
        HttpTransport::with_options(self.url(), test_options()).unwrap()
    }
}

fn test_options() -> HttpClientOptions {
    HttpClientOptions {
        connect_timeout_ms: 1_000,
        request_timeout_ms: 2_000,
        max_line_bytes: DEFAULT_MAX_LINE_BYTES,
        idle_timeout_ms: 2_000,
        tls_ca_pem: None,
    }
}

fn stream_request(client_id: &str) -> Vec<u8> {
    serde_json::to_vec(&StreamRequest {
        client_id: client_id.to_string(),
        buckets: vec![],
    })
    .unwrap()
}

async fn next(lines: &mut Box<dyn ferry_transport::LineStream>) -> Result<Option<StreamLine>, TransportError> {
    let line = tokio::time::timeout(WAIT, lines.next_line())
        .await
        .expect("line in time")?;
    Ok(line.map(|bytes| {
        assert!(!bytes.ends_with(b"\n"), "lines are handed out without their newline");
        decode_line(&bytes, DEFAULT_MAX_LINE_BYTES).unwrap()
    }))
}

#[tokio::test]
async fn stream_lines_arrive_in_order() {
    let server = TestServer::start(HttpServerOptions::default()).await;
    let transport = server.transport();
    let mut lines = transport.open_stream("good", stream_request("c1")).await.unwrap();
    assert_eq!(next(&mut lines).await.unwrap(), Some(checkpoint()));
    assert_eq!(next(&mut lines).await.unwrap(), Some(data("todos")));
    assert_eq!(
        next(&mut lines).await.unwrap(),
        Some(StreamLine::CheckpointComplete { last_op_id: 7 })
    );
    assert_eq!(
        next(&mut lines).await.unwrap(),
        Some(StreamLine::Keepalive { token_expires_in_s: 60 })
    );
    assert_eq!(server.handler.streams.lock().unwrap()[0].client_id, "c1");
}

#[tokio::test]
async fn a_stream_the_server_ends_ends_cleanly() {
    let server = TestServer::start(HttpServerOptions::default()).await;
    let mut lines = server
        .transport()
        .open_stream("good", stream_request("finite"))
        .await
        .unwrap();
    for _ in 0..3 {
        assert!(next(&mut lines).await.unwrap().is_some());
    }
    assert_eq!(next(&mut lines).await.unwrap(), None);
    assert_eq!(next(&mut lines).await.unwrap(), None, "ended stays ended");
}

#[tokio::test]
async fn upload_round_trips() {
    let server = TestServer::start(HttpServerOptions::default()).await;
    let request = UploadRequest {
        client_id: "c1".to_string(),
        transactions: vec![UploadTransaction {
            tx_id: 1,
            // Built from JSON so optional fields added later default.
            ops: vec![serde_json::from_str::<CrudEntry>(
                r#"{"seq":5,"tx_id":1,"op":"PUT","table":"todos","id":"r1","data":{"title":"milk"}}"#,
            )
            .unwrap()],
        }],
    };
    let answer = server
        .transport()
        .upload("good", serde_json::to_vec(&request).unwrap())
        .await
        .unwrap();
    let answer: UploadResponse = decode_line(&answer, DEFAULT_MAX_LINE_BYTES).unwrap();
    assert_eq!(
        answer,
        UploadResponse {
            hlc: None,
            outcomes: vec![OpOutcome {
                seq: 5,
                outcome: Outcome::Applied
            }],
            write_checkpoint: 5,
        }
    );
    let uploads = server.handler.uploads.lock().unwrap();
    assert_eq!(uploads.len(), 1);
    assert_eq!(uploads[0], ("good".to_string(), request));
}

#[tokio::test]
async fn bad_token_is_unauthorized() {
    let server = TestServer::start(HttpServerOptions::default()).await;
    let transport = server.transport();
    let err = transport.open_stream("bad", stream_request("c1")).await.err().unwrap();
    assert_eq!(err, TransportError::Unauthorized("unknown token \"bad\"".to_string()));
    let upload = serde_json::to_vec(&UploadRequest {
        client_id: "c1".to_string(),
        transactions: vec![],
    })
    .unwrap();
    let err = transport.upload("bad", upload).await.unwrap_err();
    assert_eq!(err, TransportError::Unauthorized("unknown token \"bad\"".to_string()));
    assert_eq!(server.handler.calls(), 0);
}

#[tokio::test]
async fn server_errors_map_to_server() {
    let server = TestServer::start(HttpServerOptions::default()).await;
    let err = server
        .transport()
        .open_stream("good", stream_request("draining"))
        .await
        .err()
        .unwrap();
    assert_eq!(err, TransportError::Server("server is shutting down".to_string()));
}

#[tokio::test]
async fn malformed_body_is_refused_and_the_handler_sees_nothing() {
    let server = TestServer::start(HttpServerOptions::default()).await;
    let transport = server.transport();
    let err = transport
        .open_stream("good", b"{not json".to_vec())
        .await
        .err()
        .unwrap();
    match err {
        TransportError::Refused(message) => assert!(message.starts_with("malformed stream request"), "{message}"),
        other => panic!("expected refused, got {other:?}"),
    }
    let err = transport
        .upload("good", br#"{"client_id": 3}"#.to_vec())
        .await
        .unwrap_err();
    match err {
        TransportError::Refused(message) => assert!(message.starts_with("malformed upload request"), "{message}"),
        other => panic!("expected refused, got {other:?}"),
    }
    assert_eq!(server.handler.calls(), 0);
}

#[tokio::test]
async fn oversized_body_is_refused_with_413() {
    let server = TestServer::start(HttpServerOptions {
        max_body_bytes: 1024,
        ..HttpServerOptions::default()
    })
    .await;
    let mut body = br#"{"client_id":""#.to_vec();
    body.extend(std::iter::repeat_n(b'a', 4096));
    body.extend_from_slice(br#"","buckets":[]}"#);
    let err = server
        .transport()
        .open_stream("good", body.clone())
        .await
        .err()
        .unwrap();
    assert_eq!(
        err,
        TransportError::Refused("stream request body exceeds max_body_bytes (1024 bytes)".to_string())
    );
    let response = reqwest::Client::new()
        .post(format!("{}/sync/stream", server.url()))
        .bearer_auth("good")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    assert_eq!(server.handler.calls(), 0);
}

#[tokio::test]
async fn missing_or_malformed_authorization_is_401() {
    let server = TestServer::start(HttpServerOptions::default()).await;
    let client = reqwest::Client::new();
    let url = format!("{}/sync/stream", server.url());
    let cases: [(Option<&str>, &str); 3] = [
        (None, "missing authorization header"),
        (
            Some("Basic abc"),
            "authorization header must use the bearer scheme, got \"Basic\"",
        ),
        (Some("Bearer "), "authorization header has an empty bearer token"),
    ];
    for (header, message) in cases {
        let mut request = client.post(&url).body(stream_request("c1"));
        if let Some(header) = header {
            request = request.header("authorization", header);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 401);
        let error: ServerError = serde_json::from_str(&response.text().await.unwrap()).unwrap();
        assert_eq!(
            error,
            ServerError {
                code: ErrorCode::Unauthorized,
                message: message.to_string()
            }
        );
    }
    assert_eq!(server.handler.calls(), 0);
}

#[tokio::test]
async fn health_answers_ok() {
    let server = TestServer::start(HttpServerOptions::default()).await;
    let response = reqwest::get(format!("{}/health", server.url())).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), r#"{"status":"ok"}"#);
}

#[tokio::test]
async fn dropping_the_stream_closes_the_servers_sender() {
    let server = TestServer::start(HttpServerOptions::default()).await;
    let mut lines = server
        .transport()
        .open_stream("good", stream_request("c1"))
        .await
        .unwrap();
    assert_eq!(next(&mut lines).await.unwrap(), Some(checkpoint()));
    let closed = server.handler.closed.notified();
    drop(lines);
    tokio::time::timeout(WAIT, closed)
        .await
        .expect("the handler's sender observes the client going away");
}

#[tokio::test]
async fn an_overlong_line_is_an_error() {
    let server = TestServer::start(HttpServerOptions::default()).await;
    let options = HttpClientOptions {
        max_line_bytes: 1024,
        ..test_options()
    };
    let transport = HttpTransport::with_options(server.url(), options).unwrap();
    let mut lines = transport.open_stream("good", stream_request("big")).await.unwrap();
    let err = next(&mut lines).await.unwrap_err();
    assert!(
        matches!(&err, TransportError::Server(m) if m.contains("exceeds the limit of 1024 bytes")),
        "{err:?}"
    );
    assert_eq!(next(&mut lines).await.unwrap_err(), err, "a failed stream stays failed");
}

#[tokio::test]
async fn a_silent_stream_times_out() {
    let server = TestServer::start(HttpServerOptions::default()).await;
    let options = HttpClientOptions {
        idle_timeout_ms: 100,
        ..test_options()
    };
    let transport = HttpTransport::with_options(server.url(), options).unwrap();
    let mut lines = transport.open_stream("good", stream_request("silent")).await.unwrap();
    let err = next(&mut lines).await.unwrap_err();
    assert_eq!(
        err,
        TransportError::Connection("stream received no bytes for idle_timeout_ms (100 ms)".to_string())
    );
}

#[tokio::test]
async fn connection_failures_are_connection_errors() {
    // Bind then drop a listener: nothing listens on that port any more.
    let addr = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let transport = HttpTransport::with_options(format!("http://{addr}"), test_options()).unwrap();
    let err = transport.open_stream("good", stream_request("c1")).await.err().unwrap();
    assert!(matches!(err, TransportError::Connection(_)), "{err:?}");
    let err = transport.upload("good", b"{}".to_vec()).await.unwrap_err();
    assert!(matches!(err, TransportError::Connection(_)), "{err:?}");
}

#[tokio::test]
async fn wrong_base_urls_are_refused() {
    assert!(matches!(
        HttpTransport::new("not a url"),
        Err(TransportError::Refused(_))
    ));
    assert!(matches!(
        HttpTransport::new("ftp://example.invalid"),
        Err(TransportError::Refused(_))
    ));
    // https is served (rustls); see ferry-server's tests/tls.rs.
    assert!(HttpTransport::new("https://example.invalid").is_ok());
    let transport = HttpTransport::new("http://127.0.0.1:9/prefix/").unwrap();
    assert_eq!(transport.base_url(), "http://127.0.0.1:9/prefix/");
    assert!(format!("{transport:?}").contains("HttpTransport"));
}

#[tokio::test]
async fn graceful_shutdown_ends_serve() {
    let mut server = TestServer::start(HttpServerOptions::default()).await;
    let transport = server.transport();
    // A finished stream and an upload leave an idle pooled connection.
    let mut lines = transport.open_stream("good", stream_request("finite")).await.unwrap();
    while next(&mut lines).await.unwrap().is_some() {}
    transport
        .upload(
            "good",
            serde_json::to_vec(&UploadRequest {
                client_id: "c1".to_string(),
                transactions: vec![],
            })
            .unwrap(),
        )
        .await
        .unwrap();
    server.shutdown.take().unwrap().send(()).unwrap();
    tokio::time::timeout(WAIT, &mut server.served)
        .await
        .expect("serve ends after the shutdown signal")
        .unwrap()
        .unwrap();
    assert!(matches!(
        transport.upload("good", b"{}".to_vec()).await,
        Err(TransportError::Connection(_))
    ));
}
