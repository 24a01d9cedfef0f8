//! Server-side bucket compaction, as PowerSync does it.
//!
//! 1. A PUT or REMOVE superseded by a later op on the same row becomes a
//!    MOVE: it keeps its op id and checksum, loses its data, affects
//!    nothing.
//! 2. The leading run of entries that affect nothing for a fresh client
//!    (MOVE, REMOVE, CLEAR) collapses into one CLEAR with the op id of the
//!    run's last entry and the sum of their checksums.
//!
//! Neither step changes what a client converges to, from any position it
//! may hold (property tested in `tests/compaction.rs`): a client past the
//! run never sees the CLEAR, and the checksum of any suffix is unchanged.

use std::collections::HashSet;

use crate::checksum;
use crate::messages::{OpKind, OplogEntry};

/// Compact one bucket's entries (ascending op ids). Returns the new list.
pub fn compact(entries: &[OplogEntry]) -> Vec<OplogEntry> {
    // Step 1, from the newest: the first op seen per row is its latest.
    let mut seen: HashSet<(&str, &str)> = HashSet::new();
    let mut out: Vec<OplogEntry> = entries
        .iter()
        .rev()
        .map(|e| match (e.op, &e.object_type, &e.object_id) {
            (OpKind::Put | OpKind::Remove, Some(t), Some(id)) => {
                if seen.insert((t.as_str(), id.as_str())) {
                    e.clone()
                } else {
                    moved(e)
                }
            }
            _ => e.clone(),
        })
        .collect();
    out.reverse();
    // Step 2: collapse the leading run of no-effect entries.
    let run = out
        .iter()
        .take_while(|e| matches!(e.op, OpKind::Move | OpKind::Remove | OpKind::Clear))
        .count();
    if run >= 2 || (run == 1 && out[0].op != OpKind::Clear) {
        let clear = OplogEntry {
            op_id: out[run - 1].op_id,
            op: OpKind::Clear,
            object_type: None,
            object_id: None,
            data: None,
            checksum: checksum::sum(out[..run].iter().map(|e| e.checksum)),
        };
        out.splice(..run, [clear]);
    }
    out
}

fn moved(e: &OplogEntry) -> OplogEntry {
    OplogEntry {
        op_id: e.op_id,
        op: OpKind::Move,
        object_type: None,
        object_id: None,
        data: None,
        checksum: e.checksum,
    }
}
