//! Shared fixtures for Ferry's benchmarks: the ticket row shape of the
//! reference demo and stores of every backend.

use std::path::Path;
use std::sync::Arc;

use ferry_core::{row_data, RowData, Schema, Value};
use ferry_server::SyncRules;
use ferry_sled::SledStore;
use ferry_sqlite::SqliteStore;
use ferry_store::{MemoryStore, Store};

/// Backends the benchmarks compare.
pub const BACKENDS: [&str; 3] = ["memory", "sqlite", "sled"];

/// One ticket as a typed struct, about 200 bytes of data.
#[derive(Debug, Clone)]
pub struct TicketRow {
    pub id: String,
    pub title: String,
    pub description: String,
    pub status: &'static str,
    pub deleted_at: Option<String>,
    pub created_at: String,
    pub updated_at: String,
    pub version: i64,
}

/// `n` deterministic tickets.
pub fn tickets(n: usize) -> Vec<TicketRow> {
    const STATUSES: [&str; 3] = ["pending", "in_progress", "done"];
    (0..n)
        .map(|i| TicketRow {
            id: format!("{:08x}-0000-4000-8000-{:012x}", i, i.wrapping_mul(2_654_435_761)),
            title: format!("Ticket number {i} about the printer"),
            description: format!("Steps to reproduce {i}: open the tray, observe smoke, call facilities"),
            status: STATUSES[i % 3],
            deleted_at: None,
            created_at: "2026-11-26T10:00:00.000Z".into(),
            updated_at: format!("2026-11-26T10:{:02}:{:02}.000Z", (i / 60) % 60, i % 60),
            version: (i % 7) as i64,
        })
        .collect()
}

impl TicketRow {
    /// The row's data as Ferry stores it.
    pub fn data(&self) -> RowData {
        row_data([
            ("title", Value::from(self.title.as_str())),
            ("description", Value::from(self.description.as_str())),
            ("status", Value::from(self.status)),
            ("deleted_at", Value::from(self.deleted_at.clone())),
            ("created_at", Value::from(self.created_at.as_str())),
            ("updated_at", Value::from(self.updated_at.as_str())),
            ("version", Value::from(self.version)),
        ])
    }
}

/// The tickets table of the ticket tracker, derived from its sync rules
/// (`SyncRules::client_schema`, not a copy); `indexed` adds an index on
/// status.
pub fn schema(indexed: bool) -> Schema {
    // The embedded rules are fixed and valid; a failure is a bug.
    let rules = SyncRules::ticket_tracker().unwrap_or_else(|e| panic!("ticket tracker rules: {e}"));
    let derived = rules.client_schema();
    let mut t = derived
        .table("tickets")
        .unwrap_or_else(|e| panic!("ticket tracker tickets table: {e}"))
        .clone();
    if indexed {
        t = t.index("by_status", &["status"]);
    }
    Schema::new([t]).unwrap_or_else(|e| panic!("bench schema: {e}"))
}

/// A fresh store of the named backend under `dir`.
pub fn open(backend: &str, dir: &Path, schema: Schema) -> Arc<dyn Store> {
    let opened: Result<Arc<dyn Store>, ferry_store::StoreError> = match backend {
        "memory" => Ok(Arc::new(MemoryStore::new(schema))),
        "sqlite" => SqliteStore::open(dir.join("bench.db"), schema).map(|s| Arc::new(s) as Arc<dyn Store>),
        "sled" => SledStore::open(dir.join("bench.sled"), schema).map(|s| Arc::new(s) as Arc<dyn Store>),
        other => panic!("unknown backend {other}"),
    };
    opened.unwrap_or_else(|e| panic!("open {backend}: {e}"))
}

/// The plain rusqlite bulk insert the bulk apply is measured against: the
/// same rows into an 8-column table, one transaction, one prepared
/// statement, the same journal settings as `SqliteStore` (WAL, NORMAL).
pub fn plain_sqlite_insert(path: &Path, rows: &[TicketRow]) -> rusqlite::Result<()> {
    let mut conn = rusqlite::Connection::open(path)?;
    conn.execute_batch(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;
         CREATE TABLE IF NOT EXISTS tickets(id TEXT PRIMARY KEY, title TEXT, description TEXT, status TEXT,
           deleted_at TEXT, created_at TEXT, updated_at TEXT, version INTEGER);",
    )?;
    let tx = conn.transaction()?;
    {
        let mut stmt = tx.prepare("INSERT INTO tickets VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)")?;
        for r in rows {
            stmt.execute(rusqlite::params![
                r.id,
                r.title,
                r.description,
                r.status,
                r.deleted_at,
                r.created_at,
                r.updated_at,
                r.version
            ])?;
        }
    }
    tx.commit()
}
