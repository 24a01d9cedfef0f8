//! The blog scenario under every strategy, data-driven: value A; an online
//! user changes it to B; an offline user, whose base is still A, changes it
//! to C and reconnects.

mod common;

use std::sync::Arc;

use common::*;
use ferry_conflict::{
    crdt, Audited, ConflictStrategy, Crdt, Decision, DomainRules, LastWriteWins, Manual, OutcomeKind, PerColumn,
    Resolution, RowLastWriteWins, Rule, StrategyConfig, TableStrategy,
};
use ferry_core::Value;

fn seeded(sim: &mut Sim, s: &dyn ConflictStrategy) {
    let create = op(
        put(&sim.table, "t1", &[("title", "A".into()), ("status", "pending".into())]),
        1000,
        "c0",
        1,
        &[],
    );
    assert_eq!(kind(&sim.apply(s, &create)), OutcomeKind::Applied);
}

struct Case {
    name: &'static str,
    strategy: Arc<dyn ConflictStrategy>,
    column: &'static str,
    /// A, B, C.
    values: [&'static str; 3],
    /// The offline op's clock (the online one is at 2000).
    offline_wall_ms: u64,
    /// The offline op's base value of the column.
    offline_base: &'static str,
    expect_outcome: OutcomeKind,
    expect_final: &'static str,
}

fn cases() -> Vec<Case> {
    let lww: Arc<dyn ConflictStrategy> = Arc::new(LastWriteWins);
    let row: Arc<dyn ConflictStrategy> = Arc::new(RowLastWriteWins);
    let domain: Arc<dyn ConflictStrategy> = Arc::new(DomainRules::ticket_status());
    let manual: Arc<dyn ConflictStrategy> = Arc::new(Manual);
    let title = ["A", "B", "C"];
    let status = ["pending", "done", "in_progress"];
    let c = |name, strategy: &Arc<dyn ConflictStrategy>, column, values, wall, base, outcome, fin| Case {
        name,
        strategy: strategy.clone(),
        column,
        values,
        offline_wall_ms: wall,
        offline_base: base,
        expect_outcome: outcome,
        expect_final: fin,
    };
    vec![
        c(
            "lww: older offline edit loses",
            &lww,
            "title",
            title,
            1500,
            "A",
            OutcomeKind::Merged,
            "B",
        ),
        c(
            "lww: newer offline edit wins",
            &lww,
            "title",
            title,
            3000,
            "A",
            OutcomeKind::Applied,
            "C",
        ),
        c(
            "lww: equal clock, server wins",
            &lww,
            "title",
            title,
            2000,
            "A",
            OutcomeKind::Applied,
            "C",
        ),
        c(
            "row lww: older offline edit loses",
            &row,
            "title",
            title,
            1500,
            "A",
            OutcomeKind::Merged,
            "B",
        ),
        c(
            "row lww: newer offline edit wins",
            &row,
            "title",
            title,
            3000,
            "A",
            OutcomeKind::Applied,
            "C",
        ),
        c(
            "domain: done not reopened by stale edit",
            &domain,
            "status",
            status,
            3000,
            "pending",
            OutcomeKind::Merged,
            "done",
        ),
        c(
            "domain: older stale edit also kept out",
            &domain,
            "status",
            status,
            1500,
            "pending",
            OutcomeKind::Merged,
            "done",
        ),
        c(
            "domain: reopen from a done base applies",
            &domain,
            "status",
            status,
            3000,
            "done",
            OutcomeKind::Applied,
            "in_progress",
        ),
        c(
            "domain: other statuses are lww",
            &domain,
            "title",
            title,
            3000,
            "A",
            OutcomeKind::Applied,
            "C",
        ),
        c(
            "manual: stale base needs review",
            &manual,
            "title",
            title,
            3000,
            "A",
            OutcomeKind::NeedsReview,
            "B",
        ),
        c(
            "manual: older stale base needs review",
            &manual,
            "title",
            title,
            1500,
            "A",
            OutcomeKind::NeedsReview,
            "B",
        ),
        c(
            "manual: fresh base applies even when older",
            &manual,
            "title",
            title,
            1500,
            "B",
            OutcomeKind::Applied,
            "C",
        ),
    ]
}

#[test]
fn blog_scenario_under_each_strategy() {
    for case in cases() {
        let mut sim = Sim::new();
        let s = case.strategy.as_ref();
        seeded(&mut sim, s);
        let [a, b, c] = case.values;
        let set_a = op(patch("t1", &[(case.column, a.into())]), 1100, "c0", 2, &[]);
        sim.apply(s, &set_a);
        let online = op(
            patch("t1", &[(case.column, b.into())]),
            2000,
            "c1",
            1,
            &[(case.column, a.into())],
        );
        let d = sim.apply(s, &online);
        assert_eq!(kind(&d), OutcomeKind::Applied, "{}: online edit", case.name);
        // "equal clock": the offline client's node sorts after c1, so the
        // tie on wall time is broken by the client id.
        let offline = op(
            patch("t1", &[(case.column, c.into())]),
            case.offline_wall_ms,
            "c2",
            1,
            &[(case.column, case.offline_base.into())],
        );
        let d = sim.apply(s, &offline);
        assert_eq!(kind(&d), case.expect_outcome, "{}: {d:?}", case.name);
        assert_eq!(
            sim.value("t1", case.column),
            Value::from(case.expect_final),
            "{}",
            case.name
        );
    }
}

#[test]
fn equal_clocks_keep_the_stored_value() {
    let mut sim = Sim::new();
    seeded(&mut sim, &LastWriteWins);
    let same = op(patch("t1", &[("title", "X".into())]), 1000, "c0", 2, &[]);
    let d = sim.apply(&LastWriteWins, &same);
    assert_eq!(kind(&d), OutcomeKind::Merged);
    assert_eq!(sim.value("t1", "title"), Value::from("A"));
}

#[test]
fn domain_rule_reason_names_the_values_and_keeps_other_columns() {
    let mut sim = Sim::new();
    let s = DomainRules::ticket_status();
    seeded(&mut sim, &s);
    sim.apply(
        &s,
        &op(
            patch("t1", &[("status", "done".into())]),
            2000,
            "c1",
            1,
            &[("status", "pending".into())],
        ),
    );
    let d = sim.apply(
        &s,
        &op(
            patch(
                "t1",
                &[
                    ("status", "in_progress".into()),
                    ("description", "offline notes".into()),
                ],
            ),
            3000,
            "c2",
            1,
            &[("status", "pending".into()), ("description", Value::Null)],
        ),
    );
    assert_eq!(kind(&d), OutcomeKind::Merged);
    let reason = d.outcome_reason().unwrap_or_default();
    assert!(reason.contains("tickets.status stays 'done'"), "{reason}");
    assert!(
        reason.contains("'in_progress'") && reason.contains("'pending'"),
        "{reason}"
    );
    assert_eq!(sim.value("t1", "status"), Value::from("done"));
    assert_eq!(sim.value("t1", "description"), Value::from("offline notes"));
}

#[test]
fn domain_closure_rules_run_first_and_fall_back() {
    let s = DomainRules::new()
        .rule(|input| {
            let title = input.op_data()?.get("title")?;
            (title.as_text() == Some("forbidden")).then(|| {
                Decision::from(Resolution::Reject {
                    reason: format!("title {title} is not allowed"),
                })
            })
        })
        .fallback(RowLastWriteWins);
    let mut sim = Sim::new();
    seeded(&mut sim, &s);
    let d = sim.apply(
        &s,
        &op(patch("t1", &[("title", "forbidden".into())]), 3000, "c1", 1, &[]),
    );
    assert_eq!(d.outcome_reason().as_deref(), Some("title 'forbidden' is not allowed"));
    let d = sim.apply(&s, &op(patch("t1", &[("title", "fine".into())]), 500, "c1", 2, &[]));
    assert_eq!(kind(&d), OutcomeKind::Merged, "row lww fallback: older op loses");
}

#[test]
fn declarative_rules_load_from_toml() {
    let text = r#"
        [[strategies]]
        table = "tickets"
        kind = "domain"
        audit = true
        rules = [
          { kind = "deny_transition", column = "status", from_server = ["done"], unless_base = ["done"] },
          { kind = "immutable", column = "title" },
        ]
    "#;
    #[derive(serde::Deserialize)]
    struct File {
        strategies: Vec<TableStrategy>,
    }
    let file: File = toml::from_str(text).expect("parse");
    let t = &file.strategies[0];
    assert!(t.audit);
    match &t.strategy {
        StrategyConfig::Domain { rules, .. } => {
            assert_eq!(rules[0], Rule::done_is_not_reopened());
            assert_eq!(rules[1], Rule::Immutable { column: "title".into() });
        }
        other => panic!("not domain: {other:?}"),
    }
    t.check_columns(&["title", "status"]).expect("columns exist");
    assert!(t.check_columns(&["status"]).is_err());
    let s = t.build().expect("build");
    let mut sim = Sim::new();
    seeded(&mut sim, &s);
    let d = sim.apply(&s, &op(patch("t1", &[("title", "renamed".into())]), 3000, "c1", 1, &[]));
    assert_eq!(kind(&d), OutcomeKind::Merged);
    assert_eq!(sim.value("t1", "title"), Value::from("A"));
    assert_eq!(sim.side_rows("activity").len(), 2);
    let bad: Result<File, _> = toml::from_str("[[strategies]]\ntable = \"t\"\nkind = \"crdt\"\ncolumns = []\n");
    let err = bad.expect("parses").strategies[0].build().expect_err("no columns");
    assert_eq!(
        err.to_string(),
        "invalid strategy config for table \"t\": crdt strategy names no columns"
    );
}

#[test]
fn manual_records_an_open_conflict_and_resolves_with_a_fresh_base() {
    let mut sim = Sim::new();
    let s = Manual;
    seeded(&mut sim, &s);
    sim.apply(
        &s,
        &op(
            patch("t1", &[("title", "B".into())]),
            2000,
            "c1",
            1,
            &[("title", "A".into())],
        ),
    );
    let d = sim.apply(
        &s,
        &op(
            patch("t1", &[("title", "C".into()), ("description", "d".into())]),
            3000,
            "c2",
            7,
            &[("title", "A".into()), ("description", Value::Null)],
        ),
    );
    assert_eq!(d.conflict_id.as_deref(), Some("c2:7:title"));
    assert_eq!(kind(&d), OutcomeKind::NeedsReview);
    assert_eq!(sim.value("t1", "title"), Value::from("B"), "conflicting column held");
    assert_eq!(sim.value("t1", "description"), Value::from("d"), "other columns apply");
    let rows = sim.side_rows("ferry_conflicts");
    assert_eq!(rows.len(), 1);
    let (id, rec) = rows[0];
    assert_eq!(id, "c2:7:title");
    let expect = [
        ("table_name", "tickets"),
        ("row_id", "t1"),
        ("field", "title"),
        ("local_value", "\"C\""),
        ("server_value", "\"B\""),
        ("base_value", "\"A\""),
        ("user_id", "user-c2"),
        ("client_id", "c2"),
        ("created_at", "10000"),
        ("status", "open"),
    ];
    for (k, v) in expect {
        assert_eq!(rec.get(k), Some(&Value::from(v)), "{k}");
    }
    assert_eq!(rec.get("resolution"), Some(&Value::Null));
    // The resolver picks C, writing it with its fresh base B: applies.
    let d = sim.apply(
        &s,
        &op(
            patch("t1", &[("title", "C".into())]),
            4000,
            "c1",
            2,
            &[("title", "B".into())],
        ),
    );
    assert_eq!(kind(&d), OutcomeKind::Applied);
    assert_eq!(sim.value("t1", "title"), Value::from("C"));
}

#[test]
fn crdt_merges_both_edits() {
    let mut sim = Sim::new();
    let s = Crdt::new(["body"]);
    let a = crdt::new_text_doc("hello world");
    sim.apply(
        &s,
        &op(
            put(&sim.table.clone(), "t1", &[("body", Value::Blob(a.clone()))]),
            1000,
            "c0",
            1,
            &[],
        ),
    );
    let b = crdt::edit_text(&a, "c1", |t| {
        t.insert(0, "[online] ");
    })
    .expect("edit");
    let c = crdt::edit_text(&a, "c2", |t| {
        t.push(" [offline]");
    })
    .expect("edit");
    let d = sim.apply(&s, &op(patch("t1", &[("body", Value::Blob(b))]), 2000, "c1", 1, &[]));
    assert_eq!(kind(&d), OutcomeKind::Applied, "client had everything: {d:?}");
    let d = sim.apply(&s, &op(patch("t1", &[("body", Value::Blob(c))]), 1500, "c2", 1, &[]));
    assert_eq!(kind(&d), OutcomeKind::Merged, "client lacked the online edit");
    let Value::Blob(stored) = sim.value("t1", "body") else {
        panic!("body is a blob")
    };
    assert_eq!(
        crdt::read_text(&stored).expect("text"),
        "[online] hello world [offline]"
    );
    let d = sim.apply(&s, &op(patch("t1", &[("body", "text".into())]), 3000, "c2", 2, &[]));
    assert_eq!(
        d.outcome_reason().as_deref(),
        Some("column tickets.body holds an automerge document; got text value 'text'")
    );
    let d = sim.apply(
        &s,
        &op(patch("t1", &[("body", Value::Blob(vec![1, 2, 3]))]), 3000, "c2", 3, &[]),
    );
    assert!(
        d.outcome_reason()
            .unwrap_or_default()
            .starts_with("column tickets.body: invalid automerge document"),
        "{d:?}"
    );
}

#[test]
fn crdt_helpers_are_deterministic_and_merge_commutes() {
    assert_eq!(crdt::new_text_doc("x"), crdt::new_text_doc("x"));
    let base = crdt::new_text_doc("abc");
    let a = crdt::edit_text(&base, "a", |t| {
        t.splice(1, 1, "B");
    })
    .expect("edit");
    let b = crdt::edit_text(&base, "b", |t| {
        t.replace("abcd");
    })
    .expect("edit");
    let ab = crdt::read_text(&crdt::merge(&a, &b).expect("merge")).expect("text");
    let ba = crdt::read_text(&crdt::merge(&b, &a).expect("merge")).expect("text");
    assert_eq!(ab, ba);
    assert_eq!(ab, "aBcd");
    let err = crdt::edit_text(&base, "a", |t| {
        t.delete(10, 1);
    })
    .expect_err("out of range");
    assert_eq!(
        err.to_string(),
        "text edit failed: splice at 10 deleting 1 chars is outside the text of 3 chars"
    );
    assert!(crdt::read_text(b"nope").is_err());
}

#[test]
fn audit_writes_an_activity_row_per_op_with_its_outcome() {
    let mut sim = Sim::new();
    let s = Audited::new(LastWriteWins);
    seeded(&mut sim, &s);
    sim.apply(&s, &op(patch("t1", &[("title", "B".into())]), 2000, "c1", 1, &[]));
    sim.apply(&s, &op(patch("t1", &[("title", "C".into())]), 1500, "c2", 1, &[]));
    sim.apply(&s, &op(patch("t9", &[("title", "x".into())]), 1500, "c2", 2, &[]));
    let rows = sim.side_rows("activity");
    assert_eq!(rows.len(), 4);
    let outcomes: Vec<String> = rows
        .iter()
        .map(|(_, r)| r["outcome"].as_text().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(outcomes, ["applied", "applied", "merged", "rejected"]);
    let (id, r) = rows[1];
    assert_eq!(id.as_str(), "c1:1:000000000002000-00000");
    assert_eq!(r["op"], Value::from("PATCH"));
    assert!(r["old_value"].as_text().unwrap_or_default().contains("\"title\":\"A\""));
    assert!(r["new_value"].as_text().unwrap_or_default().contains("\"title\":\"B\""));
    assert_eq!(r["user_id"], Value::from("user-c1"));
    assert_eq!(r["created_at"], Value::from("10000"));
}

fn all_strategies() -> Vec<(&'static str, Arc<dyn ConflictStrategy>)> {
    vec![
        ("lww", Arc::new(LastWriteWins)),
        ("row_lww", Arc::new(RowLastWriteWins)),
        (
            "per_column",
            Arc::new(PerColumn::new(LastWriteWins).column("status", Manual)),
        ),
        ("domain", Arc::new(DomainRules::ticket_status())),
        ("manual", Arc::new(Manual)),
        ("crdt", Arc::new(Crdt::new(["body"]))),
        ("audited", Arc::new(Audited::new(Manual))),
    ]
}

#[test]
fn disjoint_changes_never_conflict() {
    for (name, s) in all_strategies() {
        // Different rows.
        let mut sim = Sim::new();
        seeded(&mut sim, s.as_ref());
        let t2 = op(
            put(&sim.table.clone(), "t2", &[("title", "A".into())]),
            1000,
            "c0",
            9,
            &[],
        );
        sim.apply(s.as_ref(), &t2);
        let d1 = sim.apply(
            s.as_ref(),
            &op(
                patch("t1", &[("title", "B".into())]),
                2000,
                "c1",
                1,
                &[("title", "A".into())],
            ),
        );
        let d2 = sim.apply(
            s.as_ref(),
            &op(
                patch("t2", &[("title", "C".into())]),
                1500,
                "c2",
                1,
                &[("title", "A".into())],
            ),
        );
        assert_eq!(
            (kind(&d1), kind(&d2)),
            (OutcomeKind::Applied, OutcomeKind::Applied),
            "{name}"
        );
        assert_eq!(sim.value("t1", "title"), Value::from("B"), "{name}");
        assert_eq!(sim.value("t2", "title"), Value::from("C"), "{name}");
        // Different columns of one row: a row-level strategy orders whole
        // rows by design, so only the column-level ones are checked here.
        if name == "row_lww" {
            continue;
        }
        let d3 = sim.apply(
            s.as_ref(),
            &op(
                patch("t1", &[("description", "D".into())]),
                1200,
                "c2",
                2,
                &[("description", Value::Null)],
            ),
        );
        assert_eq!(kind(&d3), OutcomeKind::Applied, "{name}: {d3:?}");
        assert_eq!(sim.value("t1", "title"), Value::from("B"), "{name}");
        assert_eq!(sim.value("t1", "description"), Value::from("D"), "{name}");
        assert!(sim.side_rows("ferry_conflicts").is_empty(), "{name}");
    }
}

#[test]
fn hard_delete_against_concurrent_update_is_lww_under_every_strategy() {
    for (name, s) in all_strategies() {
        let mut sim = Sim::new();
        seeded(&mut sim, s.as_ref());
        sim.apply(
            s.as_ref(),
            &op(
                patch("t1", &[("title", "B".into())]),
                2000,
                "c1",
                1,
                &[("title", "A".into())],
            ),
        );
        // An older delete loses to the newer update: the row stays with
        // the newer column; the delete still clears the columns older than
        // it (ADR 0004: a delete writes "nothing" to every column).
        let d = sim.apply(s.as_ref(), &op(delete("t1"), 1500, "c2", 1, &[]));
        assert_eq!(kind(&d), OutcomeKind::Merged, "{name}");
        assert_eq!(sim.value("t1", "title"), Value::from("B"), "{name}");
        assert_eq!(sim.value("t1", "status"), Value::Null, "{name}");
        // A newer delete wins; an older update after it does nothing.
        let d = sim.apply(s.as_ref(), &op(delete("t1"), 2500, "c2", 2, &[]));
        assert_eq!(kind(&d), OutcomeKind::Applied, "{name}");
        sim.apply(
            s.as_ref(),
            &op(patch("t1", &[("title", "late".into())]), 2200, "c3", 1, &[]),
        );
        assert!(sim.row("t1").is_none(), "{name}");
        let stale_put = op(
            put(&sim.table.clone(), "t1", &[("title", "again".into())]),
            2400,
            "c3",
            2,
            &[],
        );
        sim.apply(s.as_ref(), &stale_put);
        assert!(sim.row("t1").is_none(), "{name}: an older put does not resurrect");
    }
}

/// Seed a ticket, then apply `ops` in the given order; the stored row.
fn after(s: &dyn ConflictStrategy, ops: &[&Op]) -> (Sim, Vec<OutcomeKind>) {
    let mut sim = Sim::new();
    seeded(&mut sim, s);
    let kinds = ops.iter().map(|o| kind(&sim.apply(s, o))).collect();
    (sim, kinds)
}

#[test]
fn delete_against_write_gives_the_same_row_in_both_orders_under_every_strategy() {
    // The ticket is created at 1000 (title A, status pending). A delete is
    // a write of "nothing" to every column at its clock (ADR 0004), so
    // each pair stores the same row whichever arrives first.
    let table = tickets();
    let null_row = |pairs: &[(&str, Value)]| {
        let mut r = data(&[
            ("title", Value::Null),
            ("description", Value::Null),
            ("status", Value::Null),
            ("body", Value::Null),
        ]);
        r.extend(data(pairs));
        r
    };
    let cases: Vec<(&str, Op, Op, Option<ferry_core::RowData>)> = vec![
        (
            "newer delete vs older patch",
            op(delete("t1"), 2000, "c2", 1, &[]),
            op(patch("t1", &[("title", "B".into())]), 1500, "c1", 1, &[]),
            None,
        ),
        (
            "older delete vs newer patch",
            op(delete("t1"), 1500, "c2", 1, &[]),
            op(patch("t1", &[("title", "B".into())]), 2000, "c1", 1, &[]),
            Some(null_row(&[("title", "B".into())])),
        ),
        (
            "newer delete vs older put",
            op(delete("t1"), 2000, "c2", 1, &[]),
            op(put(&table, "t1", &[("title", "C".into())]), 1500, "c1", 1, &[]),
            None,
        ),
        (
            "older delete vs newer put",
            op(delete("t1"), 1500, "c2", 1, &[]),
            op(put(&table, "t1", &[("title", "C".into())]), 2000, "c1", 1, &[]),
            Some(null_row(&[("title", "C".into())])),
        ),
        (
            "delete vs delete",
            op(delete("t1"), 1500, "c2", 1, &[]),
            op(delete("t1"), 2000, "c1", 1, &[]),
            None,
        ),
    ];
    for (name, s) in all_strategies() {
        for (case, del, write, expected) in &cases {
            let (first, k1) = after(s.as_ref(), &[del, write]);
            let (second, k2) = after(s.as_ref(), &[write, del]);
            assert_eq!(
                first.row("t1"),
                expected.as_ref(),
                "{name}, {case}, delete first: {k1:?}"
            );
            assert_eq!(
                second.row("t1"),
                expected.as_ref(),
                "{name}, {case}, write first: {k2:?}"
            );
            // The stored state (column clocks, tombstone clock) agrees
            // too, so later writes converge the same way. (A CRDT column
            // ignores a NULL write, clock included, by design: its clock
            // may differ while its value, NULL, does not.)
            if name != "crdt" {
                assert_eq!(first.rows.get("t1"), second.rows.get("t1"), "{name}, {case}");
            }
            // Nothing in either order is refused.
            assert!(!k1.contains(&OutcomeKind::Rejected), "{name}, {case}: {k1:?}");
            assert!(!k2.contains(&OutcomeKind::Rejected), "{name}, {case}: {k2:?}");
        }
    }
}

#[test]
fn delete_keeping_newer_columns_is_merged_and_names_them() {
    for (name, s) in [
        ("lww", Arc::new(LastWriteWins) as Arc<dyn ConflictStrategy>),
        ("row_lww", Arc::new(RowLastWriteWins)),
        (
            "per_column",
            Arc::new(PerColumn::new(LastWriteWins).column("status", Manual)),
        ),
    ] {
        let mut sim = Sim::new();
        seeded(&mut sim, s.as_ref());
        sim.apply(
            s.as_ref(),
            &op(patch("t1", &[("title", "B".into())]), 2000, "c1", 1, &[]),
        );
        let d = sim.apply(s.as_ref(), &op(delete("t1"), 1500, "c2", 1, &[]));
        assert_eq!(kind(&d), OutcomeKind::Merged, "{name}: {d:?}");
        let reason = d.outcome_reason().unwrap_or_default();
        assert!(reason.contains("title"), "{name}: {reason}");
        assert!(!reason.contains("status"), "{name}: {reason}");
        assert_eq!(sim.value("t1", "title"), Value::from("B"), "{name}");
        assert_eq!(sim.value("t1", "status"), Value::Null, "{name}");
        // A write older than the cleared column's delete loses to it; a
        // newer one wins.
        sim.apply(
            s.as_ref(),
            &op(patch("t1", &[("status", "old".into())]), 1400, "c3", 1, &[]),
        );
        assert_eq!(sim.value("t1", "status"), Value::Null, "{name}");
        if name != "row_lww" {
            sim.apply(
                s.as_ref(),
                &op(patch("t1", &[("status", "new".into())]), 1600, "c3", 2, &[]),
            );
            assert_eq!(sim.value("t1", "status"), Value::from("new"), "{name}");
        }
    }
}

#[test]
fn row_lww_write_on_a_live_row_still_needs_the_newest_clock() {
    let mut sim = Sim::new();
    seeded(&mut sim, &RowLastWriteWins);
    sim.apply(
        &RowLastWriteWins,
        &op(patch("t1", &[("title", "B".into())]), 2000, "c1", 1, &[]),
    );
    let d = sim.apply(
        &RowLastWriteWins,
        &op(patch("t1", &[("status", "done".into())]), 1500, "c2", 1, &[]),
    );
    assert_eq!(kind(&d), OutcomeKind::Merged);
    assert_eq!(sim.value("t1", "status"), Value::from("pending"));
}

#[test]
fn patch_of_a_row_that_never_existed_is_still_rejected() {
    for (name, s) in all_strategies() {
        let mut sim = Sim::new();
        let d = sim.apply(
            s.as_ref(),
            &op(patch("t9", &[("title", "B".into())]), 2000, "c1", 1, &[]),
        );
        assert_eq!(kind(&d), OutcomeKind::Rejected, "{name}");
        assert!(sim.row("t9").is_none(), "{name}");
    }
}

/// A strategy that says it writes new PUTs as sent decides every PUT over
/// no stored row so, whatever its clock, client, base and time; the
/// others keep the default (no claim).
#[test]
fn strategies_that_write_new_puts_as_sent_do() {
    let claims: Vec<(Arc<dyn ConflictStrategy>, bool)> = vec![
        (Arc::new(LastWriteWins), true),
        (Arc::new(RowLastWriteWins), true),
        (Arc::new(Box::new(LastWriteWins) as Box<dyn ConflictStrategy>), true),
        (Arc::new(DomainRules::ticket_status()), false),
        (Arc::new(Manual), false),
        (Arc::new(Audited::new(LastWriteWins)), false),
    ];
    for (strategy, says) in claims {
        assert_eq!(strategy.writes_new_puts_as_sent(), says, "{strategy:?}");
        if !says {
            continue;
        }
        for (wall_ms, client, base) in [(1_000, "c1", &[][..]), (99_000, "", &[("title", Value::from("x"))][..])] {
            let mut sim = Sim::new();
            let o = op(
                put(&sim.table, "t9", &[("title", "A".into()), ("status", "open".into())]),
                wall_ms,
                client,
                7,
                base,
            );
            let d = sim.apply(strategy.as_ref(), &o);
            assert!(d.side_writes.is_empty(), "{strategy:?}");
            let ferry_core::CrudOp::Put { data, .. } = &o.op else {
                unreachable!("a put")
            };
            match d.resolution {
                Resolution::Write { row, clocks, lost } => {
                    assert_eq!(&row, data, "{strategy:?}");
                    assert!(lost.is_empty(), "{strategy:?}");
                    let expected: std::collections::BTreeMap<String, ferry_core::HlcTimestamp> =
                        data.keys().map(|k| (k.clone(), o.hlc.clone())).collect();
                    assert_eq!(clocks, expected, "{strategy:?}");
                }
                other => panic!("{strategy:?}: {other:?}"),
            }
        }
    }
}
