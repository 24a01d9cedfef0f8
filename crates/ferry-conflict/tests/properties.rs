//! Property tests (seeded through `ferry_core::testkit::check`; a failure
//! prints its seed, `FERRY_SEED=<seed>` replays it).

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::*;
use ferry_conflict::{crdt, Audited, ConflictStrategy, Crdt, DomainRules, LastWriteWins, Manual, RowLastWriteWins};
use ferry_core::testkit::check;
use ferry_core::Value;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

const COLS: [&str; 3] = ["title", "description", "status"];

/// Concurrent patches: (column mask, value index, wall ms, client index),
/// plus an arrival order (a permutation seed).
/// Raw patches: (column mask, value index, wall ms, client index).
type RawPatches = Vec<(u8, u8, u64, u8)>;

fn patches() -> impl Strategy<Value = (RawPatches, Vec<usize>)> {
    prop::collection::vec((1u8..8, 0u8..4, 1_001u64..1_020, 0u8..4), 1..8).prop_flat_map(|ops| {
        let n = ops.len();
        (Just(ops), Just((0..n).collect::<Vec<_>>()).prop_shuffle())
    })
}

fn to_ops(raw: &[(u8, u8, u64, u8)]) -> Vec<Op> {
    let statuses = ["pending", "in_progress", "done", "blocked"];
    raw.iter()
        .enumerate()
        .map(|(i, &(mask, v, wall, client))| {
            let pairs: Vec<(&str, Value)> = COLS
                .iter()
                .enumerate()
                .filter(|(ci, _)| mask & (1 << ci) != 0)
                .map(|(_, c)| {
                    let value = if *c == "status" {
                        statuses[v as usize].to_owned()
                    } else {
                        format!("{c}-{i}-{v}")
                    };
                    (*c, Value::from(value))
                })
                .collect();
            let base: Vec<(&str, Value)> = pairs
                .iter()
                .map(|(c, _)| (*c, if *c == "status" { "pending".into() } else { Value::Null }))
                .collect();
            // Seq unique per op, so conflict ids are unique; the counter
            // keeps clocks unique, as a client's HLC never repeats.
            let mut o = op(patch("t1", &pairs), wall, &format!("c{client}"), i as u64 + 1, &base);
            o.hlc.counter = i as u32;
            o
        })
        .collect()
}

fn run(s: &dyn ConflictStrategy, ops: &[Op], order: &[usize]) -> Sim {
    let mut sim = Sim::new();
    let create = op(
        put(&sim.table.clone(), "t1", &[("status", "pending".into())]),
        1000,
        "c0",
        0,
        &[],
    );
    sim.apply(s, &create);
    for &i in order {
        sim.apply(s, &ops[i]);
    }
    sim
}

fn expected_lww(ops: &[Op]) -> BTreeMap<&'static str, Value> {
    let mut best: BTreeMap<&str, (&ferry_core::HlcTimestamp, Value)> = BTreeMap::new();
    for o in ops {
        if let ferry_core::CrudOp::Patch { data, .. } = &o.op {
            for c in COLS {
                if let Some(v) = data.get(c) {
                    if best.get(c).is_none_or(|(h, _)| o.hlc > **h) {
                        best.insert(c, (&o.hlc, v.clone()));
                    }
                }
            }
        }
    }
    COLS.iter()
        .map(|c| {
            let v = best.get(c).map(|(_, v)| v.clone());
            (
                *c,
                v.unwrap_or(if *c == "status" { "pending".into() } else { Value::Null }),
            )
        })
        .collect()
}

#[test]
fn lww_result_is_the_max_clock_value_per_column_in_any_order() {
    check("lww_max_clock_per_column", 200, patches(), |(raw, order)| {
        let ops = to_ops(&raw);
        for s in [&LastWriteWins as &dyn ConflictStrategy, &Audited::new(LastWriteWins)] {
            let sim = run(s, &ops, &order);
            for (c, v) in expected_lww(&ops) {
                prop_assert_eq!(sim.value("t1", c), v, "column {}", c);
            }
        }
        Ok(())
    });
}

#[test]
fn audit_writes_one_activity_row_per_op() {
    check("audit_one_row_per_op", 100, patches(), |(raw, order)| {
        let ops = to_ops(&raw);
        let sim = run(&Audited::new(Manual), &ops, &order);
        prop_assert_eq!(sim.side_rows("activity").len(), ops.len() + 1);
        Ok(())
    });
}

#[test]
fn row_lww_keeps_the_max_clock_put_in_any_order() {
    let strategy = prop::collection::vec((0u8..4, 1_001u64..1_020, 0u8..4), 1..8).prop_flat_map(|ops| {
        let n = ops.len();
        (Just(ops), Just((0..n).collect::<Vec<_>>()).prop_shuffle())
    });
    check("row_lww_max_clock_put", 200, strategy, |(raw, order)| {
        let table = tickets();
        let ops: Vec<Op> = raw
            .iter()
            .enumerate()
            .map(|(i, &(v, wall, client))| {
                let title = format!("t-{i}-{v}");
                let mut o = op(
                    put(&table, "t1", &[("title", title.into())]),
                    wall,
                    &format!("c{client}"),
                    i as u64,
                    &[],
                );
                o.hlc.counter = i as u32;
                o
            })
            .collect();
        let winner = ops.iter().max_by(|a, b| a.hlc.cmp(&b.hlc)).map(|o| o.op.clone());
        let mut sim = Sim::new();
        for &i in &order {
            sim.apply(&RowLastWriteWins, &ops[i]);
        }
        let Some(ferry_core::CrudOp::Put { data, .. }) = winner else {
            return Err(TestCaseError::fail("no put"));
        };
        prop_assert_eq!(sim.row("t1"), Some(&data));
        Ok(())
    });
}

#[test]
fn domain_done_sticks_in_any_order() {
    // Every op is made from base status 'pending' (stale once the ticket
    // is done). In any arrival order: once the stored status is 'done' it
    // stays 'done'; if it never became 'done', no rule fired and the
    // result is last write wins; and when the last write (max clock) is
    // 'done', the result is 'done'.
    check("domain_done_sticks", 200, patches(), |(raw, order)| {
        let ops = to_ops(&raw);
        let s = DomainRules::ticket_status();
        let mut sim = Sim::new();
        let create = op(
            put(&sim.table.clone(), "t1", &[("status", "pending".into())]),
            1000,
            "c0",
            0,
            &[],
        );
        sim.apply(&s, &create);
        let done = Value::from("done");
        let mut was_done = false;
        for &i in &order {
            sim.apply(&s, &ops[i]);
            let now = sim.value("t1", "status");
            prop_assert!(!was_done || now == done, "done reopened to {}", now);
            was_done |= now == done;
        }
        let lww = expected_lww(&ops)["status"].clone();
        let fin = sim.value("t1", "status");
        if was_done || lww == done {
            prop_assert_eq!(fin, done);
        } else {
            prop_assert_eq!(fin, lww);
        }
        Ok(())
    });
}

#[test]
fn manual_loses_no_value_in_any_order() {
    // Every op starts from the same base (NULL text, status 'pending'):
    // per column, the stored value plus the open conflicts' local values
    // are exactly the distinct values the ops wrote, whatever the order.
    check("manual_loses_nothing", 200, patches(), |(raw, order)| {
        let ops = to_ops(&raw);
        let sim = run(&Manual, &ops, &order);
        for c in COLS {
            let written: BTreeSet<String> = ops
                .iter()
                .filter_map(|o| match &o.op {
                    ferry_core::CrudOp::Patch { data, .. } => data.get(c).map(ferry_conflict::json_text),
                    _ => None,
                })
                .collect();
            let initial = if c == "status" {
                Value::from("pending")
            } else {
                Value::Null
            };
            let mut kept: BTreeSet<String> = sim
                .side_rows("ferry_conflicts")
                .iter()
                .filter(|(_, r)| r.get("field") == Some(&Value::from(c)))
                .filter_map(|(_, r)| r.get("local_value").and_then(|v| v.as_text()).map(str::to_owned))
                .collect();
            // A value equal to the initial one written while the column
            // still held it changed nothing, so the initial value is
            // counted on both sides.
            let mut written = written;
            kept.insert(ferry_conflict::json_text(&sim.value("t1", c)));
            kept.insert(ferry_conflict::json_text(&initial));
            written.insert(ferry_conflict::json_text(&initial));
            prop_assert_eq!(kept, written, "column {}", c);
        }
        Ok(())
    });
}

/// Random text edits by several actors from one base document.
fn edits() -> impl Strategy<Value = (Vec<(u8, usize, String)>, Vec<usize>)> {
    prop::collection::vec((0u8..3, 0usize..12, "[a-z]{1,4}"), 1..7).prop_flat_map(|e| {
        let n = e.len();
        (Just(e), Just((0..n).collect::<Vec<_>>()).prop_shuffle())
    })
}

fn edited_docs(base: &[u8], raw: &[(u8, usize, String)]) -> Result<Vec<Vec<u8>>, TestCaseError> {
    // Each actor edits its own latest copy (one actor per replica).
    let mut latest: BTreeMap<u8, Vec<u8>> = BTreeMap::new();
    let mut out = Vec::new();
    for (actor, pos, text) in raw {
        let from = latest.get(actor).cloned().unwrap_or_else(|| base.to_vec());
        let doc = crdt::edit_text(&from, &format!("actor-{actor}"), |t| {
            let len = t.text().chars().count();
            t.insert((*pos).min(len), &format!("<{text}>"));
        })
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
        latest.insert(*actor, doc.clone());
        out.push(doc);
    }
    Ok(out)
}

#[test]
fn automerge_merges_in_any_order_agree() {
    check("crdt_merge_order", 100, edits(), |(raw, order)| {
        let base = crdt::new_text_doc("shared base");
        let docs = edited_docs(&base, &raw)?;
        let fold = |idx: &mut dyn Iterator<Item = usize>| -> Result<String, TestCaseError> {
            let mut acc = base.clone();
            for i in idx {
                acc = crdt::merge(&acc, &docs[i]).map_err(|e| TestCaseError::fail(e.to_string()))?;
            }
            crdt::read_text(&acc).map_err(|e| TestCaseError::fail(e.to_string()))
        };
        let forward = fold(&mut (0..docs.len()))?;
        let shuffled = fold(&mut order.iter().copied())?;
        prop_assert_eq!(&forward, &shuffled);
        // Nothing lost: the merged text holds the base's and every
        // insertion's characters (insertions may nest, so compare sorted).
        let mut expect: Vec<char> = "shared base".chars().collect();
        for (_, _, text) in &raw {
            expect.extend(format!("<{text}>").chars());
        }
        let mut got: Vec<char> = forward.chars().collect();
        expect.sort_unstable();
        got.sort_unstable();
        prop_assert_eq!(got, expect);
        Ok(())
    });
}

#[test]
fn crdt_strategy_converges_in_any_arrival_order() {
    check("crdt_strategy_order", 60, edits(), |(raw, order)| {
        let base = crdt::new_text_doc("shared base");
        let docs = edited_docs(&base, &raw)?;
        let s = Crdt::new(["body"]);
        let text_after = |idx: &[usize]| -> Result<String, TestCaseError> {
            let mut sim = Sim::new();
            let create = op(
                put(&sim.table.clone(), "t1", &[("body", Value::Blob(base.clone()))]),
                1000,
                "c0",
                0,
                &[],
            );
            sim.apply(&s, &create);
            for (n, &i) in idx.iter().enumerate() {
                let o = op(
                    patch("t1", &[("body", Value::Blob(docs[i].clone()))]),
                    1001 + n as u64,
                    "c1",
                    n as u64 + 1,
                    &[],
                );
                sim.apply(&s, &o);
            }
            match sim.value("t1", "body") {
                Value::Blob(b) => crdt::read_text(&b).map_err(|e| TestCaseError::fail(e.to_string())),
                other => Err(TestCaseError::fail(format!("body is {other}"))),
            }
        };
        let forward: Vec<usize> = (0..docs.len()).collect();
        prop_assert_eq!(text_after(&forward)?, text_after(&order)?);
        Ok(())
    });
}

/// Raw ops on one row: (kind: 0 PUT, 1 PATCH, 2 DELETE; column mask; value
/// index), with a distinct clock each (a permutation of wall times) and two
/// arrival orders.
type RawRowOps = Vec<(u8, u8, u8)>;

fn row_ops(kinds: u8) -> impl Strategy<Value = (RawRowOps, Vec<u64>, Vec<usize>, Vec<usize>)> {
    prop::collection::vec((0u8..kinds, 1u8..8, 0u8..4), 1..8).prop_flat_map(|ops| {
        let n = ops.len();
        let walls: Vec<u64> = (0..n as u64).map(|i| 1_001 + i).collect();
        (
            Just(ops),
            Just(walls).prop_shuffle(),
            Just((0..n).collect::<Vec<_>>()).prop_shuffle(),
            Just((0..n).collect::<Vec<_>>()).prop_shuffle(),
        )
    })
}

/// Kind 2 is a delete; kind 0 a PUT of the masked columns (the others
/// NULL); kind 1 a PATCH of the masked columns. Values are distinct per op.
fn to_row_ops(raw: &[(u8, u8, u8)], walls: &[u64]) -> Vec<Op> {
    let table = tickets();
    raw.iter()
        .zip(walls)
        .enumerate()
        .map(|(i, (&(kind, mask, v), &wall))| {
            let pairs: Vec<(&str, Value)> = COLS
                .iter()
                .enumerate()
                .filter(|(ci, _)| mask & (1 << ci) != 0)
                .map(|(_, c)| (*c, Value::from(format!("{c}-{i}-{v}"))))
                .collect();
            let o = match kind {
                0 => put(&table, "t1", &pairs),
                1 => patch("t1", &pairs),
                _ => delete("t1"),
            };
            op(o, wall, &format!("c{}", i % 3), i as u64 + 1, &[])
        })
        .collect()
}

/// The row a delete-is-a-write-of-nothing model gives: sorted by clock
/// (the create first), the row is deleted iff the last op is a delete;
/// else each column holds its last write, NULL when that was a delete (a
/// PUT writes every column, a PATCH its own).
fn expected_row(create: &Op, ops: &[Op]) -> Option<ferry_core::RowData> {
    let mut all: Vec<&Op> = std::iter::once(create).chain(ops).collect();
    all.sort_by(|a, b| a.hlc.cmp(&b.hlc));
    if matches!(all.last().map(|o| &o.op), Some(ferry_core::CrudOp::Delete { .. })) {
        return None;
    }
    let table = tickets();
    let mut row: ferry_core::RowData = table.columns.iter().map(|c| (c.name.clone(), Value::Null)).collect();
    for o in all {
        match &o.op {
            ferry_core::CrudOp::Put { data, .. } | ferry_core::CrudOp::Patch { data, .. } => row.extend(data.clone()),
            ferry_core::CrudOp::Delete { .. } => row.values_mut().for_each(|v| *v = Value::Null),
        }
    }
    Some(row)
}

fn run_row(s: &dyn ConflictStrategy, create: &Op, ops: &[Op], order: &[usize]) -> Sim {
    let mut sim = Sim::new();
    sim.apply(s, create);
    for &i in order {
        sim.apply(s, &ops[i]);
    }
    sim
}

#[test]
fn delete_against_writes_gives_the_same_row_in_any_order() {
    // Puts, patches and deletes of one created row with distinct clocks:
    // both arrival orders store the same row, the one the clocks say (a
    // delete writes "nothing" to every column at its clock). The
    // strategies that hand deletes, tombstones and these clock-only
    // columns (no base, no blobs) to last write wins agree.
    check("delete_order_column_lww", 300, row_ops(3), |(raw, walls, a, b)| {
        let ops = to_row_ops(&raw, &walls);
        let create = op(
            put(&tickets(), "t1", &[("status", "pending".into())]),
            1000,
            "c9",
            0,
            &[],
        );
        let expected = expected_row(&create, &ops);
        let strategies: Vec<(&str, Box<dyn ConflictStrategy>)> = vec![
            ("lww", Box::new(LastWriteWins)),
            ("audited", Box::new(Audited::new(LastWriteWins))),
            (
                "per_column",
                Box::new(ferry_conflict::PerColumn::new(LastWriteWins).column("status", LastWriteWins)),
            ),
            ("domain", Box::new(DomainRules::new())),
            ("manual", Box::new(Manual)),
            ("crdt", Box::new(Crdt::new(["body"]))),
        ];
        for (name, s) in strategies {
            let first = run_row(s.as_ref(), &create, &ops, &a);
            let second = run_row(s.as_ref(), &create, &ops, &b);
            prop_assert_eq!(
                first.row("t1"),
                second.row("t1"),
                "{}: orders {:?} and {:?}",
                name,
                a,
                b
            );
            prop_assert_eq!(first.row("t1"), expected.as_ref(), "{}", name);
        }
        Ok(())
    });
}

#[test]
fn row_lww_delete_against_puts_gives_the_same_row_in_any_order() {
    // Row-level LWW orders whole rows, so patches of different columns are
    // order-dependent by design; puts and deletes are not: the row is the
    // last op's by clock in either order, and the stored clocks agree.
    check("delete_order_row_lww", 300, row_ops(3), |(raw, walls, a, b)| {
        let raw: Vec<(u8, u8, u8)> = raw
            .into_iter()
            .map(|(k, m, v)| (if k == 1 { 0 } else { k }, m, v))
            .collect();
        let ops = to_row_ops(&raw, &walls);
        let create = op(
            put(&tickets(), "t1", &[("status", "pending".into())]),
            1000,
            "c9",
            0,
            &[],
        );
        let first = run_row(&RowLastWriteWins, &create, &ops, &a);
        let second = run_row(&RowLastWriteWins, &create, &ops, &b);
        prop_assert_eq!(
            first.rows.get("t1"),
            second.rows.get("t1"),
            "orders {:?} and {:?}",
            a,
            b
        );
        let expected = expected_row(&create, &ops);
        prop_assert_eq!(first.row("t1"), expected.as_ref());
        Ok(())
    });
}

#[test]
fn column_lww_stores_the_same_clocks_in_any_order() {
    // Not only the visible row: the stored column clocks (and a
    // tombstone's clock) agree too, so later writes converge as well.
    check("delete_order_clocks", 300, row_ops(3), |(raw, walls, a, b)| {
        let ops = to_row_ops(&raw, &walls);
        let create = op(
            put(&tickets(), "t1", &[("status", "pending".into())]),
            1000,
            "c9",
            0,
            &[],
        );
        let first = run_row(&LastWriteWins, &create, &ops, &a);
        let second = run_row(&LastWriteWins, &create, &ops, &b);
        prop_assert_eq!(
            first.rows.get("t1"),
            second.rows.get("t1"),
            "orders {:?} and {:?}",
            a,
            b
        );
        Ok(())
    });
}
