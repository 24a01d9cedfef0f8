//! Shared fixtures: the ticket schema, an embedded sync service on SQLite in
//! a temporary directory, and clients connected to it in-process.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::Arc;

use ferry_client::{ClientOptions, Database, StaticToken};
use ferry_core::{Clock, ColumnType, RowData, Schema, Value};
use ferry_queue::LocalDbOptions;
use ferry_server::{mint_token, ConflictStrategy, SqliteSourceDb, SyncRules, SyncService};
use ferry_sqlite::SqliteStore;
use ferry_transport::{FaultConfig, FaultyTransport, MemoryTransport, SyncHandler, Transport};

pub const SECRET: &str = "test-secret";

/// The client schema of the ticket tracker: the example rules' tables the
/// client syncs (derived from the rules, not re-listed), plus what only the
/// client has.
pub fn client_schema() -> Schema {
    schema_with_ticket_index(true)
}

/// [`client_schema`], with or without its index on tickets.
pub fn schema_with_ticket_index(indexed: bool) -> Schema {
    let rules = SyncRules::ticket_tracker().expect("rules");
    let server = rules.schema();
    let table = |name: &str| server.table(name).expect("the rules declare the table").clone();
    let tickets = table("tickets")
        // Not in the server's schema: writes of it are rejected there.
        .column("local_note", ColumnType::Text);
    let tickets = if indexed {
        tickets.index("by_status", &["status"])
    } else {
        tickets
    };
    Schema::new([
        tickets
            // Uploads carry the base values strategies such as manual
            // resolution and domain rules compare against.
            .track_previous_values(),
        table("app_user"),
        table("assignments"),
        table("comments"),
        table("attachments"),
    ])
    .expect("client schema")
}

/// An embedded sync service over SQLite in `dir` (last write wins).
pub fn service(dir: &std::path::Path) -> Arc<SyncService> {
    service_with(dir, None)
}

/// An embedded sync service over SQLite in `dir`, with a conflict
/// strategy for the tickets table.
pub fn service_with(dir: &std::path::Path, tickets: Option<Arc<dyn ConflictStrategy>>) -> Arc<SyncService> {
    let db = SqliteSourceDb::open_dir(dir).expect("open source db");
    let rules = SyncRules::ticket_tracker().expect("rules");
    let mut builder = SyncService::builder(Arc::new(db), rules, SECRET);
    if let Some(strategy) = tickets {
        builder = builder.strategy("tickets", strategy);
    }
    Arc::new(builder.build().expect("service"))
}

pub fn token(user: &str) -> String {
    mint_token(SECRET, user, 3600, &serde_json::Map::new())
}

/// A client on SQLite in `dir`.
pub fn client(dir: &std::path::Path, seed: u64, clock: Arc<dyn Clock>) -> Database {
    client_with_schema(dir, seed, clock, client_schema())
}

/// A client on SQLite in `dir`, with `schema`.
pub fn client_with_schema(dir: &std::path::Path, seed: u64, clock: Arc<dyn Clock>, schema: Schema) -> Database {
    let store = SqliteStore::open(dir.join("client.db"), schema).expect("client store");
    Database::open(Arc::new(store), client_options(seed, clock)).expect("open client")
}

/// Whether `f` holds within `timeout_ms`, looking every 10 ms.
pub async fn wait_until(timeout_ms: u64, mut f: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_millis(timeout_ms);
    while tokio::time::Instant::now() < deadline {
        if f() {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    f()
}

/// The fixtures' client options: quick retries, a seeded client id.
pub fn client_options(seed: u64, clock: Arc<dyn Clock>) -> ClientOptions {
    ClientOptions {
        local: LocalDbOptions {
            clock,
            client_id_seed: Some(seed),
            ..LocalDbOptions::default()
        },
        retry_initial_delay_ms: 5,
        retry_max_delay_ms: 50,
        jitter_seed: seed,
        upload_poll_interval_ms: 20,
        ..ClientOptions::default()
    }
}

/// Connect a client through a fault-injecting in-memory transport.
pub fn connect(
    db: &Database,
    handler: Arc<dyn SyncHandler>,
    faults: FaultConfig,
    seed: u64,
    user: &str,
) -> FaultyTransport<MemoryTransport> {
    let transport = FaultyTransport::new(MemoryTransport::new(handler), faults, seed);
    let dyn_transport: Arc<dyn Transport> = Arc::new(transport.clone());
    db.connect(dyn_transport, Arc::new(StaticToken(token(user))));
    transport
}

/// Rows without their NULL columns (the server stores every column).
pub fn normalize(data: &RowData) -> RowData {
    data.iter()
        .filter(|(_, v)| !v.is_null())
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// A client's visible tickets.
pub fn client_tickets(db: &Database) -> BTreeMap<String, RowData> {
    db.local()
        .scan("tickets")
        .expect("scan")
        .into_iter()
        .map(|(id, d)| (id, normalize(&d)))
        .collect()
}

/// The server's live tickets among `ids`.
pub fn server_tickets(svc: &SyncService, ids: &[String]) -> BTreeMap<String, RowData> {
    let table = svc.rules().schema().table("tickets").expect("tickets table").clone();
    let mut out = BTreeMap::new();
    for id in ids {
        if let Some(row) = svc.db().get_row(&table, id).expect("read server row") {
            if let Some(data) = row.data {
                out.insert(id.clone(), normalize(&data));
            }
        }
    }
    out
}

/// Wait until `db` applied a checkpoint at or past the server's last op id
/// and holds no pending writes.
pub async fn wait_caught_up(db: &Database, svc: &SyncService, timeout_ms: u64) -> bool {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_millis(timeout_ms);
    loop {
        let last = svc.db().checkpoint(db.client_id(), &[]).expect("checkpoint").last_op_id;
        let status = db.status();
        let pending = db.local().pending_len().expect("pending");
        if pending == 0 && status.has_synced && status.last_applied_op_id.unwrap_or(0) >= last {
            return true;
        }
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

pub fn text(s: &str) -> Value {
    Value::from(s)
}
