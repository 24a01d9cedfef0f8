//! The audit log wrapper.

use ferry_core::{RowData, Value};

use crate::manual::op_name;
use crate::strategy::{json_text, ConflictInput, ConflictStrategy, Decision, SideWrite};

/// The table activity rows are written to.
pub const ACTIVITY_TABLE: &str = "activity";

/// Wraps a strategy and records every op it decides as a row of
/// `activity`, written in the same transaction as the change.
///
/// Record (id `"{client_id}:{seq}:{hlc}"`, unique per op): `table_name,
/// row_id, user_id, client_id, op` (`PUT`/`PATCH`/`DELETE`); `old_value`
/// (JSON of the stored row before, `null` when absent or deleted);
/// `new_value` (JSON of the row after the decision, `null` when absent or
/// deleted); `outcome` (`applied`, `merged`, `rejected`, `needs_review`);
/// `created_at` (ms since the epoch, as text). The inner decision is
/// otherwise unchanged; a rejected op is recorded too.
#[derive(Clone, Debug, Default)]
pub struct Audited<S> {
    inner: S,
}

impl<S> Audited<S> {
    /// Audit `inner`.
    pub fn new(inner: S) -> Self {
        Audited { inner }
    }

    /// The wrapped strategy.
    pub fn inner(&self) -> &S {
        &self.inner
    }
}

impl<S: ConflictStrategy> ConflictStrategy for Audited<S> {
    fn resolve(&self, input: &ConflictInput<'_>) -> Decision {
        let mut d = self.inner.resolve(input);
        let before = input.live();
        let after = d.row_after(before);
        let json = |r: Option<&RowData>| Value::Text(r.map_or_else(|| "null".to_owned(), json_text));
        let text = |s: &str| Value::Text(s.to_owned());
        let data: RowData = [
            ("table_name", text(&input.table.name)),
            ("row_id", text(input.id)),
            ("user_id", text(input.user_id)),
            ("client_id", text(input.client_id)),
            ("op", text(op_name(input.op))),
            ("old_value", json(before)),
            ("new_value", json(after)),
            ("outcome", text(d.outcome_kind().as_str())),
            ("created_at", Value::Text(input.now_ms.to_string())),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        d.side_writes.push(SideWrite {
            table: ACTIVITY_TABLE.to_owned(),
            id: activity_id(input.client_id, input.seq, input.hlc),
            data,
        });
        d
    }
}

/// An activity row's id: the client ([`crate::side_id::client_key`]), its
/// write's seq and the write's time (its node is the client, already
/// named). At most 107 bytes.
fn activity_id(client_id: &str, seq: u64, hlc: &ferry_core::HlcTimestamp) -> String {
    let client = crate::side_id::client_key(client_id);
    format!("{client}:{seq}:{:015}-{:05}", hlc.wall_ms, hlc.counter)
}

#[cfg(test)]
mod id_tests {
    use super::*;

    #[test]
    fn activity_ids_stay_short_and_distinct() {
        let hlc = ferry_core::HlcTimestamp {
            wall_ms: 1_000,
            counter: 2,
            node: "n".repeat(256),
        };
        let a = activity_id(&"a".repeat(256), 1, &hlc);
        let b = activity_id(&format!("{}b", "a".repeat(255)), 1, &hlc);
        assert!(a.len() <= 107 && b.len() <= 107, "{a} {b}");
        assert_ne!(a, b);
        assert_eq!(activity_id("c1", 7, &hlc), "c1:7:000000000001000-00002");
    }
}
