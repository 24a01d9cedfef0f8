//! The server used as a library: a server started with `ferry_server::run`
//! stopped with `BoundServer::shutdown`, and clients opened on the schema
//! derived from the sync rules (`SyncRules::client_schema`).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use ferry_client::{ClientOptions, Database, StaticToken};
use ferry_core::{row_data, Schema, Value};
use ferry_protocol::{decode_line, ErrorCode, StreamLine, StreamRequest, DEFAULT_MAX_LINE_BYTES};
use ferry_queue::{LocalDbOptions, QueueError};
use ferry_server::{mint_token, ServerConfig, SqliteSourceDb, SyncRules, SyncService};
use ferry_sqlite::SqliteStore;
use ferry_transport::{MemoryTransport, SyncHandler, Transport};

const SECRET: &str = "library-api-secret";

fn token(user: &str) -> String {
    mint_token(SECRET, user, 3600, &serde_json::Map::new())
}

/// An open download stream over HTTP, read line by line.
struct HttpStream {
    response: reqwest::Response,
    buf: Vec<u8>,
}

impl HttpStream {
    async fn open(addr: std::net::SocketAddr, client_id: &str) -> HttpStream {
        let request = StreamRequest {
            client_id: client_id.into(),
            buckets: Vec::new(),
        };
        let response = reqwest::Client::new()
            .post(format!("http://{addr}/sync/stream"))
            .bearer_auth(token("u1"))
            .header("content-type", "application/json")
            .body(serde_json::to_vec(&request).expect("request encodes"))
            .send()
            .await
            .expect("stream request sent");
        assert!(response.status().is_success(), "{}", response.status());
        HttpStream {
            response,
            buf: Vec::new(),
        }
    }

    /// The next line, or `None` when the server ended the stream.
    async fn next(&mut self) -> Option<StreamLine> {
        loop {
            if let Some(end) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=end).collect();
                return Some(decode_line(&line, DEFAULT_MAX_LINE_BYTES).expect("a valid line"));
            }
            let chunk = tokio::time::timeout(Duration::from_secs(10), self.response.chunk())
                .await
                .expect("the stream moves within 10 s")
                .expect("the stream reads");
            match chunk {
                Some(bytes) => self.buf.extend_from_slice(&bytes),
                None => {
                    assert!(self.buf.is_empty(), "a partial line at the end");
                    return None;
                }
            }
        }
    }

    /// Read until the first checkpoint is complete.
    async fn until_complete(&mut self) {
        while let Some(line) = self.next().await {
            if matches!(line, StreamLine::CheckpointComplete { .. }) {
                return;
            }
        }
        panic!("the stream ended before its first checkpoint");
    }

    /// Every line until the server ends the stream.
    async fn rest(&mut self) -> Vec<StreamLine> {
        let mut out = Vec::new();
        while let Some(line) = self.next().await {
            out.push(line);
        }
        out
    }
}

#[tokio::test]
async fn bound_server_shuts_down_from_the_library_with_streams_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = ServerConfig {
        data_dir: dir.path().to_path_buf(),
        listen_addr: ([127, 0, 0, 1], 0).into(),
        jwt_secret: Some(SECRET.into()),
        ..ServerConfig::default()
    };
    // The shutdown future never resolves: only the library call stops it.
    let server = ferry_server::run(config, std::future::pending())
        .await
        .expect("server starts");
    let addr = server.addr;
    let mut streams = Vec::new();
    for i in 0..2 {
        let mut s = HttpStream::open(addr, &format!("client-{i}")).await;
        s.until_complete().await;
        streams.push(s);
    }

    let stopping = tokio::spawn(server.shutdown());
    for (i, s) in streams.iter_mut().enumerate() {
        let rest = s.rest().await;
        let last = rest.last();
        assert!(
            matches!(last, Some(StreamLine::Error(e)) if e.code == ErrorCode::ShuttingDown),
            "stream {i} ends with shutting_down: {rest:?}"
        );
    }
    tokio::time::timeout(Duration::from_secs(10), stopping)
        .await
        .expect("shutdown returns within 10 s")
        .expect("shutdown task")
        .expect("the server stopped cleanly");
    // Once `shutdown` returned, the listener is gone.
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "the port still accepts connections"
    );
}

#[tokio::test]
async fn dropping_a_bound_server_does_not_stop_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = ServerConfig {
        data_dir: dir.path().to_path_buf(),
        listen_addr: ([127, 0, 0, 1], 0).into(),
        jwt_secret: Some(SECRET.into()),
        ..ServerConfig::default()
    };
    let server = ferry_server::run(config, std::future::pending())
        .await
        .expect("server starts");
    let addr = server.addr;
    drop(server);
    let mut s = HttpStream::open(addr, "still-served").await;
    s.until_complete().await;
}

#[test]
fn client_schema_holds_the_synced_tables_with_their_columns() {
    let rules = SyncRules::ticket_tracker().expect("rules");
    let schema = rules.client_schema();
    let names: BTreeSet<&str> = schema.tables().map(|t| t.name.as_str()).collect();
    let expected: BTreeSet<&str> = [
        "app_user",
        "tickets",
        "assignments",
        "comments",
        "attachments",
        "ferry_conflicts",
        "activity",
    ]
    .into();
    assert_eq!(names, expected);
    for t in schema.tables() {
        let server = rules.schema().table(&t.name).expect("a server table");
        assert_eq!(t.columns, server.columns, "table {}", t.name);
    }
}

#[test]
fn client_schema_leaves_out_tables_no_bucket_holds() {
    let rules = SyncRules::from_toml(
        r#"
[[tables]]
name = "notes"
columns = [{ name = "body", type = "text" }]

[[tables]]
name = "server_audit"
columns = [{ name = "what", type = "text" }]

[[tables]]
name = "events"
insert_only = true
columns = [{ name = "kind", type = "text" }]

[[buckets]]
name = "global"
data = [{ table = "notes" }]
"#,
    )
    .expect("rules");
    let schema = rules.client_schema();
    let names: BTreeSet<&str> = schema.tables().map(|t| t.name.as_str()).collect();
    // Clients upload `events` without keeping them; nobody syncs
    // `server_audit`.
    assert_eq!(names, BTreeSet::from(["notes", "events"]));
    assert!(schema.table("events").expect("events").insert_only);
}

fn client(dir: &std::path::Path, schema: Schema, seed: u64) -> Database {
    let store = SqliteStore::open(dir.join(format!("client-{seed}.db")), schema).expect("client store");
    let options = ClientOptions {
        local: LocalDbOptions {
            client_id_seed: Some(seed),
            ..LocalDbOptions::default()
        },
        retry_initial_delay_ms: 5,
        retry_max_delay_ms: 50,
        jitter_seed: seed,
        upload_poll_interval_ms: 20,
        ..ClientOptions::default()
    };
    Database::open(Arc::new(store), options).expect("open client")
}

async fn settled(db: &Database) -> bool {
    db.wait_until_settled(10_000).await
}

#[tokio::test]
async fn clients_opened_on_the_client_schema_sync_with_the_ticket_tracker_rules() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = SqliteSourceDb::open_dir(&dir.path().join("server")).expect("source db");
    let rules = SyncRules::ticket_tracker().expect("rules");
    let schema = rules.client_schema();
    let svc = SyncService::builder(Arc::new(db), rules, SECRET)
        .build()
        .expect("service");
    let handler: Arc<dyn SyncHandler> = Arc::new(svc);
    let connect = |db: &Database, user: &str| {
        let transport: Arc<dyn Transport> = Arc::new(MemoryTransport::new(handler.clone()));
        db.connect(transport, Arc::new(StaticToken(token(user))));
    };

    // The schema as derived, and with what only a client adds.
    let writer = client(dir.path(), schema.clone(), 1);
    let with_index = Schema::new(schema.tables().cloned().map(|t| {
        if t.name == "tickets" {
            t.index("by_status", &["status"]).track_previous_values()
        } else {
            t
        }
    }))
    .expect("extended schema");
    let reader = client(dir.path(), with_index, 2);
    connect(&writer, "ann");
    connect(&reader, "bob");

    writer
        .write(|tx| {
            tx.insert(
                "tickets",
                "t1",
                row_data([("title", Value::from("derived")), ("status", Value::from("pending"))]),
            )?;
            tx.insert(
                "comments",
                "c1",
                row_data([
                    ("ticket_id", Value::from("t1")),
                    ("user_id", Value::from("ann")),
                    ("body", Value::from("hi")),
                ]),
            )?;
            Ok::<_, QueueError>(())
        })
        .expect("write");
    assert!(settled(&writer).await, "the writer uploads and confirms");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while reader.local().get("comments", "c1").expect("read").is_none() {
        assert!(tokio::time::Instant::now() < deadline, "the reader receives the rows");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let ticket = reader
        .local()
        .get("tickets", "t1")
        .expect("read")
        .expect("ticket synced");
    assert_eq!(ticket.get("title"), Some(&Value::from("derived")));
    assert_eq!(ticket.get("status"), Some(&Value::from("pending")));
    // The reader's own index is there, on the derived table.
    assert!(reader
        .local()
        .schema()
        .table("tickets")
        .expect("tickets")
        .index_def("by_status")
        .is_some());
}
