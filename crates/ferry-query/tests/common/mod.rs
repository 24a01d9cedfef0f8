//! Helpers shared by the integration tests.
#![allow(dead_code)]

use ferry_query::{Diff, QueryResult, ResultRow};

/// Apply a diff strictly: every index must be in range and every removed
/// or updated row must be the one at its old index.
pub fn apply_strict(prev: &QueryResult, diff: &Diff) -> Result<QueryResult, String> {
    let mut rows: Vec<Option<ResultRow>> = prev.rows.iter().cloned().map(Some).collect();
    for r in &diff.removed {
        match rows.get_mut(r.index) {
            Some(slot @ Some(_)) if slot.as_ref() == Some(&r.row) => *slot = None,
            other => {
                return Err(format!(
                    "removed index {} holds {:?}, diff says {:?}",
                    r.index, other, r.row
                ))
            }
        }
    }
    for u in &diff.updated {
        match rows.get_mut(u.old_index) {
            Some(slot @ Some(_)) if slot.as_ref() == Some(&u.old) => *slot = None,
            other => {
                return Err(format!(
                    "updated old index {} holds {:?}, diff says {:?}",
                    u.old_index, other, u.old
                ))
            }
        }
        if u.old.key != u.new.key {
            return Err(format!("update changes identity: {:?} -> {:?}", u.old.key, u.new.key));
        }
    }
    let mut rows: Vec<ResultRow> = rows.into_iter().flatten().collect();
    let mut new: Vec<(usize, &ResultRow)> = diff.added.iter().map(|a| (a.index, &a.row)).collect();
    new.extend(diff.updated.iter().map(|u| (u.new_index, &u.new)));
    new.sort_by_key(|(i, _)| *i);
    for w in new.windows(2) {
        if w[0].0 == w[1].0 {
            return Err(format!("two rows inserted at index {}", w[0].0));
        }
    }
    for (i, row) in new {
        if i > rows.len() {
            return Err(format!("insert index {i} beyond length {}", rows.len()));
        }
        rows.insert(i, row.clone());
    }
    Ok(QueryResult { rows })
}
