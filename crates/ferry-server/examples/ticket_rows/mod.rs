//! The benchmark ticket rows, shared by `import_bench` (this crate) and
//! `ferry-client`'s `initial_sync_bench` (which includes this file by
//! path), and the floor both compare with: a plain rusqlite bulk insert
//! of the same rows into a fresh file.

use std::path::Path;
use std::time::Instant;

use ferry_core::{CrudOp, RowData, Value};

/// Ticket `i`: its id and row (the ticket tracker rules' columns).
pub fn ticket(i: u64) -> (String, RowData) {
    let id = format!("ticket-{i:010}");
    let mut d = RowData::new();
    d.insert(
        "title".into(),
        Value::Text(format!("Ticket {i}: printer on fire in building {}", i % 97)),
    );
    d.insert(
        "description".into(),
        Value::Text(format!(
            "Reported by user {} on floor {}; the toner smells odd and paper jams.",
            i % 1013,
            i % 31
        )),
    );
    d.insert(
        "status".into(),
        Value::Text(["open", "in_progress", "done"][(i % 3) as usize].into()),
    );
    d.insert("deleted_at".into(), Value::Null);
    d.insert("created_at".into(), Value::Text("2026-11-26T10:00:00.000Z".into()));
    d.insert("updated_at".into(), Value::Text("2026-11-26T10:00:00.000Z".into()));
    d.insert("version".into(), Value::Integer(1));
    (id, d)
}

/// The ticket PUTs of ids `first..=last`.
pub fn tickets(first: u64, last: u64) -> Vec<CrudOp> {
    (first..=last)
        .map(|i| {
            let (id, data) = ticket(i);
            CrudOp::Put {
                table: "tickets".into(),
                id,
                data,
            }
        })
        .collect()
}

/// The floor: tickets `1..=n` inserted with plain rusqlite into a fresh
/// file `floor.db` under `dir` (WAL, `synchronous=NORMAL`, one
/// transaction), making the rows included. Its time in seconds.
pub fn floor_s(n: u64, dir: &Path) -> anyhow::Result<f64> {
    let path = dir.join("floor.db");
    let _ = std::fs::remove_file(&path);
    let t = Instant::now();
    let mut conn = rusqlite::Connection::open(&path)?;
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;
         CREATE TABLE tickets (id TEXT PRIMARY KEY, title TEXT, description TEXT, status TEXT,
             deleted_at TEXT, created_at TEXT, updated_at TEXT, version INTEGER) WITHOUT ROWID;",
    )?;
    let tx = conn.transaction()?;
    {
        let mut stmt = tx.prepare("INSERT INTO tickets VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)")?;
        for i in 1..=n {
            let (id, d) = ticket(i);
            let text = |c: &str| match d.get(c) {
                Some(Value::Text(t)) => Some(t.clone()),
                _ => None,
            };
            stmt.execute(rusqlite::params![
                id,
                text("title"),
                text("description"),
                text("status"),
                text("deleted_at"),
                text("created_at"),
                text("updated_at"),
                1i64
            ])?;
        }
    }
    tx.commit()?;
    let s = t.elapsed().as_secs_f64();
    drop(conn);
    let _ = std::fs::remove_file(&path);
    Ok(s)
}
