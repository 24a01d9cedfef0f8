//! Compaction never changes what a client converges to, from any position
//! it holds, however often it runs between appends.

mod common;

use common::{clear, mv, put, remove, ClientModel, ServerBucket, ROWS, TABLES};
use ferry_core::testkit::check;
use ferry_protocol::{checksum, compact, OpKind, OplogEntry};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

#[derive(Clone, Debug)]
enum Step {
    Put { table: usize, row: usize, v: i64, gap: u64 },
    Remove { table: usize, row: usize, gap: u64 },
    Compact,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        5 => (0..TABLES.len(), 0..ROWS.len(), 0i64..4, 1u64..4)
            .prop_map(|(table, row, v, gap)| Step::Put { table, row, v, gap }),
        3 => (0..TABLES.len(), 0..ROWS.len(), 1u64..4).prop_map(|(table, row, gap)| Step::Remove { table, row, gap }),
        2 => Just(Step::Compact),
    ]
}

fn sum(log: &[OplogEntry]) -> u32 {
    checksum::sum(log.iter().map(|e| e.checksum))
}

/// Structural invariants of a compacted log against the history it came
/// from.
fn check_shape(compacted: &[OplogEntry], full: &[OplogEntry]) -> Result<(), TestCaseError> {
    prop_assert!(compacted.windows(2).all(|w| w[0].op_id < w[1].op_id), "op ids ascend");
    for (i, e) in compacted.iter().enumerate() {
        let orig = full.iter().find(|o| o.op_id == e.op_id);
        prop_assert!(orig.is_some(), "op id {} not in the history", e.op_id);
        match e.op {
            OpKind::Clear => prop_assert_eq!(i, 0, "a CLEAR only leads"),
            OpKind::Move => prop_assert_eq!(e.checksum, orig.map(|o| o.checksum).unwrap_or_default()),
            OpKind::Put | OpKind::Remove => prop_assert_eq!(Some(e), orig),
        }
    }
    Ok(())
}

#[test]
fn compaction_never_changes_what_a_client_converges_to() {
    check(
        "compaction_never_changes_what_a_client_converges_to",
        256,
        (prop::collection::vec(step(), 0..40), any::<bool>()),
        |(steps, compact_at_end)| {
            let mut bucket = ServerBucket::default();
            let mut next = 0u64;
            // Every version of the current log a client may have synced
            // from, with the highest op id the server had given out then.
            let mut versions: Vec<(Vec<OplogEntry>, u64)> = vec![(Vec::new(), 0)];
            for s in &steps {
                match *s {
                    Step::Put { table, row, v, gap } => {
                        next += gap;
                        bucket.append(put(next, TABLES[table], ROWS[row], v));
                    }
                    Step::Remove { table, row, gap } => {
                        next += gap;
                        bucket.append(remove(next, TABLES[table], ROWS[row]));
                    }
                    Step::Compact => {
                        bucket.compact();
                        check_shape(&bucket.current, &bucket.full)?;
                        prop_assert_eq!(
                            compact(&bucket.current),
                            bucket.current.clone(),
                            "compaction is idempotent"
                        );
                    }
                }
                prop_assert_eq!(sum(&bucket.current), sum(&bucket.full), "checksum kept at every point");
                versions.push((bucket.current.clone(), next));
            }
            if compact_at_end {
                bucket.compact();
                check_shape(&bucket.current, &bucket.full)?;
            }
            let full = &bucket.full;
            let compacted = &bucket.current;
            prop_assert_eq!(sum(compacted), sum(full), "compacted total checksum");

            let mut reference = ClientModel::default();
            reference.apply_all(full);
            prop_assert_eq!(reference.checksum, sum(full));

            let positions: Vec<u64> = std::iter::once(0)
                .chain(full.iter().map(|e| e.op_id))
                .chain(std::iter::once(next + 1))
                .collect();
            // A client that applied the uncompacted log through p.
            for &p in &positions {
                let mut c = ClientModel::default();
                c.apply_through(full, p);
                c.apply_all(compacted);
                prop_assert_eq!(&c.rows, &reference.rows, "rows from position {}", p);
                prop_assert_eq!(c.checksum, reference.checksum, "checksum from position {}", p);
            }
            // A client that synced through p from the log as it was at any
            // earlier point (possibly compacted already).
            for (version, issued) in &versions {
                for &p in positions.iter().filter(|p| **p <= *issued) {
                    let mut c = ClientModel::default();
                    c.apply_through(version, p);
                    c.apply_all(compacted);
                    prop_assert_eq!(
                        &c.rows,
                        &reference.rows,
                        "rows from position {} of an earlier version",
                        p
                    );
                    prop_assert_eq!(
                        c.checksum,
                        reference.checksum,
                        "checksum from position {} of an earlier version",
                        p
                    );
                }
            }
            Ok(())
        },
    );
}

#[test]
fn superseded_put_becomes_move() {
    let p1 = put(1, "todos", "a", 1);
    let p2 = put(2, "todos", "b", 1);
    let p3 = put(3, "todos", "a", 2);
    let out = compact(&[p1.clone(), p2.clone(), p3.clone()]);
    // Op 1 became a MOVE and, as the leading run, a CLEAR with its checksum.
    assert_eq!(out, vec![clear(1, p1.checksum), p2, p3]);
}

#[test]
fn superseded_put_in_the_middle_stays_a_move() {
    let p1 = put(1, "todos", "a", 1);
    let p2 = put(2, "todos", "b", 1);
    let p3 = put(3, "todos", "b", 2);
    let p4 = put(4, "todos", "a", 3);
    let out = compact(&[p1.clone(), p2.clone(), p3.clone(), p4.clone()]);
    assert_eq!(out, vec![clear(2, p1.checksum.wrapping_add(p2.checksum)), p3, p4]);

    // Not leading: the MOVE keeps its op id and checksum.
    let q1 = put(10, "todos", "keep", 1);
    let q2 = put(11, "todos", "x", 1);
    let q3 = remove(12, "todos", "x");
    let out = compact(&[q1.clone(), q2.clone(), q3.clone()]);
    assert_eq!(out, vec![q1, mv(11, q2.checksum), q3]);
}

#[test]
fn superseded_remove_becomes_move() {
    let p1 = put(1, "todos", "keep", 1);
    let r2 = remove(2, "todos", "a");
    let p3 = put(3, "todos", "a", 1);
    let out = compact(&[p1.clone(), r2.clone(), p3.clone()]);
    assert_eq!(out, vec![p1, mv(2, r2.checksum), p3]);
}

#[test]
fn same_id_in_other_table_is_another_row() {
    let p1 = put(1, "lists", "a", 1);
    let p2 = put(2, "todos", "a", 1);
    let log = vec![p1, p2];
    assert_eq!(compact(&log), log);
}

#[test]
fn leading_run_collapses_into_one_clear() {
    let p1 = put(5, "todos", "a", 1);
    let r2 = remove(7, "todos", "a");
    let p3 = put(8, "todos", "b", 1);
    let r4 = remove(9, "todos", "b");
    let p5 = put(12, "todos", "c", 1);
    let out = compact(&[p1.clone(), r2.clone(), p3.clone(), r4.clone(), p5.clone()]);
    let total = checksum::sum([p1.checksum, r2.checksum, p3.checksum, r4.checksum]);
    assert_eq!(out, vec![clear(9, total), p5]);
}

#[test]
fn all_removes_become_one_clear() {
    let log = vec![
        remove(1, "todos", "a"),
        remove(2, "todos", "b"),
        remove(4, "lists", "a"),
    ];
    let out = compact(&log);
    assert_eq!(out, vec![clear(4, sum(&log))]);
    assert_eq!(sum(&out), sum(&log));
}

#[test]
fn single_remove_becomes_clear() {
    let r = remove(3, "todos", "a");
    assert_eq!(compact(std::slice::from_ref(&r)), vec![clear(3, r.checksum)]);
}

#[test]
fn empty_log_stays_empty() {
    assert_eq!(compact(&[]), Vec::<OplogEntry>::new());
}

#[test]
fn single_clear_stays_as_is() {
    let log = vec![clear(6, 0xdead_beef)];
    assert_eq!(compact(&log), log);
    let log = vec![clear(6, 0xdead_beef), put(7, "todos", "a", 1)];
    assert_eq!(compact(&log), log);
}

#[test]
fn clear_followed_by_no_effect_entries_merges() {
    let r = remove(8, "todos", "a");
    let log = vec![clear(6, 100), mv(7, 5), r.clone(), put(9, "todos", "b", 1)];
    let out = compact(&log);
    assert_eq!(out[0], clear(8, 105u32.wrapping_add(r.checksum)));
    assert_eq!(out[1..], log[3..]);
}

#[test]
fn live_puts_are_kept_untouched() {
    let log = vec![
        put(1, "todos", "a", 1),
        put(2, "todos", "b", 2),
        put(3, "lists", "a", 3),
    ];
    assert_eq!(compact(&log), log);
}
