//! The checker: reads what the fleet did (each device's writes, stored
//! outcomes and reads; what the server answered) and states which promise
//! was broken, if any.
//!
//! During the run, at every step, per device:
//! - monotonic reads: the applied checkpoint never goes back;
//! - read-your-writes / no flicker: a device's latest write to a column
//!   stays visible until a checkpoint that includes its effect is applied
//!   (or an outcome says it was not applied as written).
//!
//! At quiescence:
//! - convergence: every device's tickets equal the server's, and every
//!   device holds the same synced tables;
//! - one durable outcome per write: seqs 1..=last each have exactly one;
//! - exactly-once effect: a replayed op is answered as the first time;
//! - no lost write: every op answered `applied` is in the server's state
//!   or superseded by a later clock (last write wins, clamped as the
//!   server clamps).

use std::collections::BTreeMap;

use ferry_core::{CrudOp, HlcTimestamp, RowData, Value};
use ferry_protocol::Outcome;
use ferry_server::StoredRow;

use crate::fleet::{Device, DOC_COLUMN};
use crate::server::SimServer;

/// A broken promise.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// Which check.
    pub check: &'static str,
    /// What was seen.
    pub message: String,
    /// The row it concerns (`table/id`), to cut the history down to it.
    pub row: Option<String>,
}

fn violation(check: &'static str, row: Option<String>, message: String) -> Violation {
    Violation { check, message, row }
}

/// Rows without NULL columns and without columns the server does not know.
pub fn normalize(row: &RowData) -> RowData {
    row.iter()
        .filter(|(k, v)| !v.is_null() && k.as_str() != "local_note")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// The value a write leaves in a column: `None` when it deletes the row.
/// A PUT replaces the whole row (absent columns are NULL); a PATCH only
/// its own columns.
fn written(op: &CrudOp, column: &str) -> Option<Option<Value>> {
    match op {
        CrudOp::Put { data, .. } => Some(Some(data.get(column).cloned().unwrap_or(Value::Null))),
        CrudOp::Patch { data, .. } => data.get(column).map(|v| Some(v.clone())),
        CrudOp::Delete { .. } => Some(None),
    }
}

/// Monotonic reads and read-your-writes on one device, now.
pub fn sample(device: &mut Device, server: &SimServer, columns: &[String]) -> Vec<Violation> {
    let mut out = Vec::new();
    for (id, title, shown) in std::mem::take(&mut device.screen.lock().flickers) {
        out.push(violation(
            "no flicker",
            Some(format!("tickets/{id}")),
            format!(
                "device {} showed its own {title:?} on {id}, lost it, and showed it again (screen: {shown})",
                device.index
            ),
        ));
    }
    let Some(db) = &device.db else { return out };
    let after = device.outcomes.keys().next_back().copied().unwrap_or(0);
    match db.outcomes_since(after, usize::MAX) {
        Ok(list) => {
            for o in list {
                device.outcomes.insert(o.outcome.seq, o);
            }
        }
        Err(e) => out.push(violation("outcomes", None, format!("device {}: {e}", device.index))),
    }
    if let Some(applied) = db.status().last_applied_op_id {
        if applied < device.max_applied_op_id {
            out.push(violation(
                "monotonic reads",
                None,
                format!(
                    "device {} went back from checkpoint {} to {applied}",
                    device.index, device.max_applied_op_id
                ),
            ));
        }
        device.max_applied_op_id = device.max_applied_op_id.max(applied);
    }
    // The latest own write of every (row, column).
    let mut latest: BTreeMap<(String, String), (u64, Option<Value>)> = BTreeMap::new();
    for w in device.writes.values() {
        if w.op.table() != "tickets" {
            continue;
        }
        for c in columns {
            if let Some(v) = written(&w.op, c) {
                latest.insert((w.op.id().to_owned(), c.clone()), (w.seq, v));
            }
        }
    }
    let log = server.log.lock();
    for ((id, column), (seq, value)) in latest {
        if device
            .outcomes
            .get(&seq)
            .is_some_and(|o| o.outcome.outcome != Outcome::Applied)
        {
            continue;
        }
        if let Some(p) = log.first.get(&(device.client_id.clone(), seq)) {
            if p.outcome != Outcome::Applied || device.max_applied_op_id >= p.op_high_water {
                continue; // not applied as written, or confirmed since
            }
        }
        let visible = match db.local().get("tickets", &id) {
            Ok(v) => v,
            Err(e) => {
                out.push(violation("read", None, e.to_string()));
                continue;
            }
        };
        let ok = match (&value, &visible) {
            (None, None) => true,
            (None, Some(_)) => false,
            // A patch replayed on a row a checkpoint deleted does nothing.
            (Some(_), None) => matches!(device.writes.get(&seq).map(|w| &w.op), Some(CrudOp::Patch { .. })),
            (Some(v), Some(row)) => row.get(&column).unwrap_or(&Value::Null) == v,
        };
        if !ok {
            out.push(violation(
                "read your writes",
                Some(format!("tickets/{id}")),
                format!(
                    "device {} wrote {column} = {value:?} (seq {seq}), still pending, but reads {:?}",
                    device.index,
                    visible.as_ref().map(|r| r.get(&column))
                ),
            ));
        }
    }
    out
}

/// The clock the server stored for an op, or (`exact = false`) a lower
/// bound of it: a clock past the skew bound is replaced by the server's
/// own, which is at least its wall time.
fn stored_clock(h: &HlcTimestamp, client_id: &str, server_now_ms: u64, max_skew_ms: u64) -> (HlcTimestamp, bool) {
    if h.wall_ms > server_now_ms.saturating_add(max_skew_ms) {
        let bound = HlcTimestamp {
            wall_ms: server_now_ms,
            counter: 0,
            node: String::new(),
        };
        return (bound, false);
    }
    let exact = HlcTimestamp {
        wall_ms: h.wall_ms,
        counter: h.counter,
        node: client_id.to_owned(),
    };
    (exact, true)
}

/// The promises at quiescence.
/// `value_based`: columns whose strategy decides by values, not clocks
/// (manual resolution applies a write whose base matches the stored value
/// whatever its clock), which the no-lost-write check leaves out.
pub fn at_quiescence(
    devices: &mut [Device],
    server: &SimServer,
    tickets: &[String],
    value_based: &[&str],
) -> Vec<Violation> {
    let mut out = Vec::new();
    let Some(svc) = server.service() else {
        return vec![violation("setup", None, "server down at quiescence".into())];
    };
    let rules = server.rules();
    let Ok(table) = rules.schema().table("tickets") else {
        return vec![violation("setup", None, "no tickets table".into())];
    };
    let mut server_rows: BTreeMap<String, Option<StoredRow>> = BTreeMap::new();
    for id in tickets {
        match svc.db().get_row(table, id) {
            Ok(r) => {
                server_rows.insert(id.clone(), r);
            }
            Err(e) => out.push(violation("read", None, e.to_string())),
        }
    }
    let live = |id: &str| -> Option<RowData> {
        server_rows
            .get(id)
            .and_then(|r| r.as_ref())
            .and_then(|r| r.data.as_ref())
            .map(normalize)
    };
    // Convergence.
    let mut synced_tables: Vec<BTreeMap<String, Vec<(String, RowData)>>> = Vec::new();
    for d in devices.iter() {
        let Some(db) = &d.db else {
            out.push(violation(
                "setup",
                None,
                format!("device {} down at quiescence", d.index),
            ));
            continue;
        };
        for id in tickets {
            let mine = db.local().get("tickets", id).ok().flatten().map(|r| normalize(&r));
            if mine != live(id) {
                out.push(violation(
                    "convergence",
                    Some(format!("tickets/{id}")),
                    format!("device {} holds {mine:?}, the server {:?}", d.index, live(id)),
                ));
            }
        }
        let mut tables = BTreeMap::new();
        for t in db.local().schema().tables() {
            let rows = db
                .local()
                .scan(&t.name)
                .unwrap_or_default()
                .into_iter()
                .map(|(id, r)| (id, normalize(&r)))
                .collect();
            tables.insert(t.name.clone(), rows);
        }
        synced_tables.push(tables);
    }
    for (i, t) in synced_tables.iter().enumerate().skip(1) {
        if t != &synced_tables[0] {
            out.push(violation(
                "convergence",
                None,
                format!("device {i}'s tables differ from device 0's"),
            ));
        }
    }
    // One durable outcome per write.
    for d in devices.iter() {
        let Some(db) = &d.db else { continue };
        let last = db.local().last_seq();
        match db.outcomes_since(0, usize::MAX) {
            Ok(list) => {
                let seqs: Vec<u64> = list.iter().map(|o| o.outcome.seq).collect();
                if seqs != (1..=last).collect::<Vec<_>>() {
                    out.push(violation(
                        "one outcome per write",
                        None,
                        format!("device {} has outcomes for seqs {seqs:?}, wrote 1..={last}", d.index),
                    ));
                }
            }
            Err(e) => out.push(violation("outcomes", None, e.to_string())),
        }
    }
    let log = server.log.lock();
    for (client, seq, first, later) in &log.mismatched {
        out.push(violation(
            "exactly once",
            None,
            format!("client {client} seq {seq} answered {first:?}, then {later:?}"),
        ));
    }
    // No lost write.
    let skew = server.options().max_clock_skew_ms;
    for ((client, seq), p) in &log.first {
        if p.outcome != Outcome::Applied || p.entry.op.table() != "tickets" {
            continue;
        }
        let id = p.entry.op.id();
        let Some(h) = &p.entry.hlc else { continue };
        let (op_clock, exact) = stored_clock(h, client, p.server_now_ms, skew);
        let stored = server_rows.get(id).cloned().flatten();
        let row = Some(format!("tickets/{id}"));
        let lost = |what: String| {
            violation(
                "no lost write",
                row.clone(),
                format!("client {client} seq {seq}: {what}"),
            )
        };
        match (&p.entry.op, &stored) {
            (_, None) => out.push(lost("applied, but the server has no trace of the row".into())),
            (op, Some(s)) => match (&s.data, &s.deleted) {
                (None, Some(d)) => {
                    if *d < op_clock {
                        out.push(lost(format!(
                            "the row is deleted at {d}, before the write at {op_clock}"
                        )));
                    }
                }
                (None, None) => out.push(lost("the row is gone".into())),
                (Some(data), _) => {
                    let columns: Vec<String> = match op {
                        CrudOp::Put { .. } | CrudOp::Delete { .. } => {
                            table.columns.iter().map(|c| c.name.clone()).collect()
                        }
                        CrudOp::Patch { data, .. } => data.keys().cloned().collect(),
                    };
                    // The CRDT column merges instead of taking the last
                    // write: `doc_edits_kept` checks it.
                    for c in columns
                        .into_iter()
                        .filter(|c| c != DOC_COLUMN && !value_based.contains(&c.as_str()))
                    {
                        let clock = s.clocks.get(&c);
                        match clock {
                            Some(cc) if *cc > op_clock || (!exact && *cc >= op_clock) => {}
                            Some(cc) if *cc == op_clock => {
                                if let Some(Some(v)) = written(op, &c) {
                                    if data.get(&c).unwrap_or(&Value::Null) != &v {
                                        out.push(lost(format!("{c} has the write's clock but not its value")));
                                    }
                                }
                            }
                            other => out.push(lost(format!(
                                "{c} holds clock {other:?}, older than the applied write at {op_clock}"
                            ))),
                        }
                    }
                }
            },
        }
    }
    out
}

/// Under a CRDT strategy, every edit of the document column the server
/// took (applied or merged) is in the final text, unless the ticket was
/// deleted at some point (a delete clears the column).
pub fn doc_edits_kept(devices: &[Device], server: &SimServer) -> Vec<Violation> {
    let mut out = Vec::new();
    let Some(svc) = server.service() else { return out };
    let Ok(table) = server.rules().schema().table("tickets") else {
        return out;
    };
    let log = server.log.lock();
    let deleted: std::collections::BTreeSet<&str> = log
        .first
        .values()
        // A delete that lost to newer columns still clears the older ones.
        .filter(|p| {
            matches!(p.entry.op, CrudOp::Delete { .. })
                && matches!(p.outcome, Outcome::Applied | Outcome::Merged { .. })
        })
        .map(|p| p.entry.op.id())
        .collect();
    for d in devices {
        for (id, marker, seq) in &d.doc_markers {
            let Some(p) = log.first.get(&(d.client_id.clone(), *seq)) else {
                continue;
            };
            if !matches!(p.outcome, Outcome::Applied | Outcome::Merged { .. }) || deleted.contains(id.as_str()) {
                continue;
            }
            let text = svc
                .db()
                .get_row(table, id)
                .ok()
                .flatten()
                .and_then(|r| r.data)
                .and_then(|data| match data.get(DOC_COLUMN) {
                    Some(Value::Blob(b)) => ferry_conflict::crdt::read_text(b).ok(),
                    _ => None,
                })
                .unwrap_or_default();
            if !text.contains(marker.as_str()) {
                out.push(violation(
                    "crdt edit kept",
                    Some(format!("tickets/{id}")),
                    format!(
                        "device {} edit {marker} (seq {seq}) is not in the merged text {text:?}",
                        d.index
                    ),
                ));
            }
        }
    }
    out
}
