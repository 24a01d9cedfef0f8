//! Manual resolution: conflicting columns are recorded for a person.

use ferry_core::{CrudOp, RowData, Value};

use crate::lww::{later_clock, LastWriteWins};
use crate::strategy::{json_text, ConflictInput, ConflictStrategy, Decision, Resolution, SideWrite};

/// The table conflict records are written to.
pub const CONFLICTS_TABLE: &str = "ferry_conflicts";

/// The deterministic id of the conflict record for `column` of the op
/// `(client_id, seq)`: `"{client}:{seq}:{column}"`, where `client` is the
/// client id, or its digest when longer than 64 bytes
/// ([`crate::side_id::client_key`]).
pub fn conflict_id(client_id: &str, seq: u64, column: &str) -> String {
    let client = crate::side_id::client_key(client_id);
    format!("{client}:{seq}:{column}")
}

/// Manual resolution.
///
/// Rule, for a PUT or PATCH of a live row, per column of the op (value
/// `local`, stored value `server`, the client's base value `base`):
/// - `local == server`: no conflict, the value stays; the column clock
///   becomes the later of the stored one and the op's (the op did write
///   the column, so an older write or delete arriving later loses to it,
///   as under last write wins);
/// - `base` known and `base == server` (nobody changed it since the client
///   read it): applied, whatever the clocks (the column clock becomes the
///   later of the stored one and the op's);
/// - `base` known and `base != server`: a conflict — the column is not
///   applied and a record is written to `ferry_conflicts` (one per column);
/// - `base` unknown (the client sent no previous value): column-level last
///   write wins.
///
/// Non-conflicting columns of the op still apply. With any conflict the
/// outcome is `needs_review { conflict_id }`, naming the first conflicting
/// column's record. Every other op (create, delete, tombstone, missing
/// row) follows [`LastWriteWins`], so a hard DELETE clears the columns
/// older than it and leaves a tombstone iff no column is newer
/// ([`crate::lww::lww_delete`]).
///
/// Record format (table `ferry_conflicts`, id [`conflict_id`]):
/// `table_name, row_id, field` (TEXT); `local_value, server_value,
/// base_value` (TEXT, the JSON of the value); `user_id, client_id`;
/// `created_at` (ms since the epoch, as text); `status` `'open'`;
/// `resolution` NULL. A client resolves by writing the chosen value to the
/// row (with a fresh base, so it applies) and setting the record's
/// `status` to `'resolved'` (and `resolution` to the JSON of the chosen
/// value) in the same transaction; writes to `ferry_conflicts` are last
/// write wins.
#[derive(Clone, Copy, Debug, Default)]
pub struct Manual;

impl ConflictStrategy for Manual {
    fn resolve(&self, input: &ConflictInput<'_>) -> Decision {
        let (Some(current), Some(live), Some(data)) = (input.current, input.live(), input.op_data()) else {
            return LastWriteWins.resolve(input);
        };
        let hlc = input.hlc;
        let mut row = live.clone();
        let mut clocks = current.clocks.clone();
        let mut lost = Vec::new();
        let mut conflicts = Vec::new();
        let mut side_writes = Vec::new();
        for (col, local) in data {
            let server = live.get(col).unwrap_or(&Value::Null);
            if local == server {
                clocks.insert(col.clone(), later_clock(&clocks, col, hlc));
                continue;
            }
            match input.base_of(col) {
                Some(base) if base == server => {
                    row.insert(col.clone(), local.clone());
                    clocks.insert(col.clone(), later_clock(&clocks, col, hlc));
                }
                Some(base) => {
                    let id = conflict_id(input.client_id, input.seq, col);
                    side_writes.push(conflict_record(input, &id, col, local, server, base));
                    conflicts.push(id);
                    lost.push(col.clone());
                }
                None => {
                    if clocks.get(col).is_none_or(|c| hlc > c) {
                        row.insert(col.clone(), local.clone());
                        clocks.insert(col.clone(), hlc.clone());
                    } else {
                        lost.push(col.clone());
                    }
                }
            }
        }
        if conflicts.is_empty() {
            return Resolution::Write { row, clocks, lost }.into();
        }
        let reason = format!(
            "conflicting changes to {}/{} columns {} recorded for review",
            input.table.name,
            input.id,
            lost.join(", ")
        );
        let resolution = if &row == live {
            Resolution::Keep {
                row: Some(row),
                reason: reason.clone(),
            }
        } else {
            Resolution::Write { row, clocks, lost }
        };
        Decision {
            resolution,
            reason: Some(reason),
            conflict_id: conflicts.into_iter().next(),
            side_writes,
        }
    }
}

fn conflict_record(
    input: &ConflictInput<'_>,
    id: &str,
    col: &str,
    local: &Value,
    server: &Value,
    base: &Value,
) -> SideWrite {
    let text = |s: &str| Value::Text(s.to_owned());
    let data: RowData = [
        ("table_name", text(&input.table.name)),
        ("row_id", text(input.id)),
        ("field", text(col)),
        ("local_value", Value::Text(json_text(local))),
        ("server_value", Value::Text(json_text(server))),
        ("base_value", Value::Text(json_text(base))),
        ("user_id", text(input.user_id)),
        ("client_id", text(input.client_id)),
        ("created_at", Value::Text(input.now_ms.to_string())),
        ("status", text("open")),
        ("resolution", Value::Null),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    SideWrite {
        table: CONFLICTS_TABLE.to_owned(),
        id: id.to_owned(),
        data,
    }
}

/// The op kind names used in records (`PUT`, `PATCH`, `DELETE`).
pub(crate) fn op_name(op: &CrudOp) -> &'static str {
    op.kind_name()
}
