//! Quickstart: open a local SQLite database, write offline, read back, and
//! look at the upload queue that will carry the writes to the server.
//!
//! `cargo run -p ferry --example quickstart [-- DATA_DIR]`

use std::sync::Arc;

use anyhow::Context;
use ferry::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Ticket {
    id: String,
    title: String,
    status: String,
    created_at: String,
}

impl Record for Ticket {
    const TABLE: &'static str = "tickets";
}

fn main() -> anyhow::Result<()> {
    let dir = std::env::args().nth(1).unwrap_or_else(|| "data/quickstart".into());
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {dir}"))?;
    let schema = Schema::new([
        Table::new("tickets")
            .column("title", ColumnType::Text)
            .column("status", ColumnType::Text)
            .column("created_at", ColumnType::Text)
            .index("by_status", &["status"]),
        Table::new("comments")
            .column("ticket_id", ColumnType::Text)
            .column("body", ColumnType::Text),
    ])?;
    let path = std::path::Path::new(&dir).join("client.db");
    let store = SqliteStore::open(&path, schema)?;
    let db = LocalDb::open(Arc::new(store))?;
    println!("opened {}", path.display());

    let run = db.scan("tickets")?.len() + 1;
    let id = format!("ticket-{run}");
    db.write(|tx| {
        tx.insert_record(&Ticket {
            id: id.clone(),
            title: format!("Printer on fire (run {run})"),
            status: "pending".into(),
            created_at: "2026-11-26T10:00:00Z".into(),
        })?;
        tx.insert(
            "comments",
            &format!("comment-{run}"),
            row_data([("ticket_id", id.as_str().into()), ("body", "on it".into())]),
        )
    })?;
    db.write(|tx| tx.update("tickets", &id, row_data([("status", "in_progress".into())])))?;

    println!("\ntickets (visible state: synced rows with pending local writes on top):");
    for t in db.scan_records::<Ticket>()? {
        println!("  {:<10} {:<12} {}", t.id, t.status, t.title);
    }
    println!(
        "\nupload queue ({} entries waiting for the server):",
        db.upload_queue_len()
    );
    for e in db.next_batch(20)? {
        let data = match &e.op {
            CrudOp::Put { data, .. } | CrudOp::Patch { data, .. } => serde_json::to_string(data)?,
            CrudOp::Delete { .. } => String::new(),
        };
        println!(
            "  seq {:>3} tx {:>3} {:<6} {}/{} {}",
            e.seq,
            e.tx_id,
            e.op.kind_name(),
            e.op.table(),
            e.op.id(),
            data
        );
    }
    println!("\nrun again: the queue keeps growing until a sync server takes it (next issue).");
    Ok(())
}
