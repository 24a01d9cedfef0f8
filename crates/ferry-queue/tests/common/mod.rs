//! Shared fixtures: the ticket schema and every backend, opened by name.

#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;

use ferry_core::{ColumnType, Schema, Table};
use ferry_sled::SledStore;
use ferry_sqlite::SqliteStore;
use ferry_store::{MemoryStore, Store};
use serde::{Deserialize, Serialize};

pub const BACKENDS: [&str; 3] = ["memory", "sqlite", "sled"];

pub fn schema() -> Schema {
    Schema::new([
        Table::new("tickets")
            .column("title", ColumnType::Text)
            .column("description", ColumnType::Text)
            .column("status", ColumnType::Text)
            .column("version", ColumnType::Integer)
            .column("score", ColumnType::Real)
            .index("by_status", &["status"]),
        Table::new("comments")
            .column("ticket_id", ColumnType::Text)
            .column("body", ColumnType::Text)
            .track_previous_values(),
        Table::new("drafts").column("body", ColumnType::Text).local_only(),
        Table::new("events").column("kind", ColumnType::Text).insert_only(),
    ])
    .expect("valid schema")
}

/// A store of the named backend at `dir`. Memory stores are kept per
/// directory in a registry so "reopening" finds the same data.
pub fn open(backend: &str, dir: &Path) -> Arc<dyn Store> {
    open_with_schema(backend, dir, schema())
}

/// [`open`] with another schema (a later app version's).
pub fn open_with_schema(backend: &str, dir: &Path, schema_now: Schema) -> Arc<dyn Store> {
    match backend {
        "memory" => {
            use std::collections::HashMap;
            use std::sync::Mutex;
            static REGISTRY: Mutex<Option<HashMap<std::path::PathBuf, MemoryStore>>> = Mutex::new(None);
            let mut reg = REGISTRY.lock().unwrap_or_else(|p| p.into_inner());
            let map = reg.get_or_insert_with(HashMap::new);
            let store = map
                .entry(dir.to_path_buf())
                .or_insert_with(|| MemoryStore::new(schema()))
                .reopen(schema_now);
            Arc::new(store)
        }
        "sqlite" => Arc::new(SqliteStore::open(dir.join("ferry.db"), schema_now).expect("open sqlite")),
        "sled" => Arc::new(SledStore::open(dir.join("ferry.sled"), schema_now).expect("open sled")),
        other => panic!("unknown backend {other}"),
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Ticket {
    pub id: String,
    pub title: String,
    pub description: Option<String>,
    pub status: String,
    pub version: i64,
    pub score: f64,
}

impl ferry_queue::Record for Ticket {
    const TABLE: &'static str = "tickets";
}

pub fn ticket(id: &str, title: &str) -> Ticket {
    Ticket {
        id: id.into(),
        title: title.into(),
        description: None,
        status: "pending".into(),
        version: 1,
        score: 0.5,
    }
}
