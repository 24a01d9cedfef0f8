//! The blog's story under each strategy, through the shared ticket-tracker
//! module: what the examples print is checked here on both clients.

use ferry_core::Value;
use ferry_examples::scenarios::{self, TICKET};
use ferry_examples::{Client, Demo, Outcome};

fn title(c: &Client) -> Value {
    c.ticket_value(TICKET, "title").expect("read title")
}

fn count(c: &Client, table: &str) -> usize {
    c.rows(table).expect("scan").len()
}

fn outcomes(c: &Client) -> Vec<Outcome> {
    c.outcomes().into_iter().map(|o| o.outcome.outcome).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_write_wins_keeps_the_later_edit_on_both_clients() {
    let demo = scenarios::last_write_wins().await.expect("scenario");
    for c in [&demo.alice, &demo.bob] {
        assert_eq!(title(c), Value::from("C"), "{}", c.name);
    }
    assert_eq!(outcomes(&demo.bob), vec![Outcome::Applied]);
    demo.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restricted_refuses_the_offline_rename_and_syncs_the_safe_writes() {
    let (demo, refusals) = scenarios::restricted().await.expect("scenario");
    assert_eq!(
        refusals.0,
        vec![
            "offline: changing tickets.title is not allowed while offline".to_owned(),
            format!("offline: deleting tickets/{TICKET} is not allowed while offline"),
        ]
    );
    for c in [&demo.alice, &demo.bob] {
        // The rename made once online again is the last word.
        assert_eq!(title(c), Value::from("C"), "{}", c.name);
        assert_eq!(
            c.ticket_value("t-2", "title").expect("t-2"),
            Value::from("Order toner"),
            "{}",
            c.name
        );
        for table in ["comments", "assignments", "attachments"] {
            assert_eq!(count(c, table), 1, "{} {table}", c.name);
        }
    }
    // Nothing bob sent was refused or merged.
    assert!(
        outcomes(&demo.bob).iter().all(|o| *o == Outcome::Applied),
        "{:?}",
        demo.bob.outcomes()
    );
    demo.shutdown().await;
}

async fn assert_disjoint_kept(demo: &Demo) {
    for c in [&demo.alice, &demo.bob] {
        assert_eq!(title(c), Value::from("B"), "{}", c.name);
        assert_eq!(
            c.ticket_value(TICKET, "description").expect("description"),
            Value::from("paper jam in tray 2"),
            "{}",
            c.name
        );
        assert_eq!(c.ticket_value("t-2", "title").expect("t-2"), Value::from("Order toner"));
        assert!(c.db.open_conflicts().expect("conflicts").is_empty(), "{}", c.name);
    }
    for c in [&demo.alice, &demo.bob] {
        assert!(
            outcomes(c).iter().all(|o| *o == Outcome::Applied),
            "{}: {:?}",
            c.name,
            c.outcomes()
        );
    }
    demo.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disjoint_changes_never_conflict_under_last_write_wins() {
    let demo = scenarios::disjoint_changes(|b| b).await.expect("scenario");
    assert_disjoint_kept(&demo).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn domain_rule_keeps_done_on_both_clients() {
    let demo = scenarios::domain_resolution().await.expect("scenario");
    for c in [&demo.alice, &demo.bob] {
        assert_eq!(
            c.ticket_value(TICKET, "status").expect("status"),
            Value::from("done"),
            "{}",
            c.name
        );
    }
    match outcomes(&demo.bob).as_slice() {
        [Outcome::Merged { reason, .. }] => assert!(reason.contains("done"), "{reason}"),
        other => panic!("bob's status change should be merged: {other:?}"),
    }
    demo.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crdt_keeps_both_edits_on_both_clients() {
    let demo = scenarios::crdt_text().await.expect("scenario");
    let alice = scenarios::description_text(&demo.alice).expect("alice's text");
    let bob = scenarios::description_text(&demo.bob).expect("bob's text");
    assert_eq!(alice, bob);
    assert_eq!(alice, "URGENT: Printer is broken. Toner replaced.");
    demo.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_log_rows_are_visible_on_both_clients() {
    let demo = scenarios::audit_log().await.expect("scenario");
    for c in [&demo.alice, &demo.bob] {
        assert_eq!(title(c), Value::from("C"), "{}", c.name);
        let mut history: Vec<String> = c
            .rows("activity")
            .expect("activity")
            .iter()
            .map(|(_, row)| scenarios::describe_activity(row))
            .collect();
        history.sort();
        assert_eq!(
            history,
            vec![
                "alice PATCH tickets/t-1: title \"A\" -> \"B\" (applied)".to_owned(),
                "alice PUT tickets/t-1: title - -> \"A\" (applied)".to_owned(),
                "bob PATCH tickets/t-1: title \"B\" -> \"C\" (applied)".to_owned(),
            ],
            "{}",
            c.name
        );
    }
    demo.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disjoint_changes_never_conflict_under_manual_resolution() {
    let demo = scenarios::disjoint_changes(scenarios::manual_strategy)
        .await
        .expect("scenario");
    assert_disjoint_kept(&demo).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_resolution_records_and_closes_the_conflict_everywhere() {
    let demo = scenarios::manual_resolution().await.expect("scenario");
    // Bob's title change was held for review.
    let bob_outcomes = outcomes(&demo.bob);
    let conflict_id = match bob_outcomes.first() {
        Some(Outcome::NeedsReview { conflict_id }) => conflict_id.clone(),
        other => panic!("bob's title change should need review: {other:?}"),
    };
    for c in [&demo.alice, &demo.bob] {
        // Resolved with bob's value, visible as resolved everywhere.
        assert_eq!(title(c), Value::from("C"), "{}", c.name);
        assert!(c.db.open_conflicts().expect("open").is_empty(), "{}", c.name);
        let conflict = c.db.conflict(&conflict_id).expect("read").expect("conflict row");
        assert_eq!(conflict.status, "resolved", "{}", c.name);
        assert_eq!(conflict.resolution, Some(Value::from("C")));
        assert_eq!(
            (conflict.local, conflict.server, conflict.base),
            ("C".into(), "B".into(), "A".into())
        );
    }
    demo.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_resolution_conflict_is_open_on_both_clients_before_resolving() {
    let demo = scenarios::manual_conflict().await.expect("scenario");
    for c in [&demo.alice, &demo.bob] {
        assert_eq!(title(c), Value::from("B"), "{}: the server kept its value", c.name);
        let open = c.db.open_conflicts().expect("open");
        assert_eq!(open.len(), 1, "{}: {open:?}", c.name);
        assert_eq!((open[0].field.as_str(), open[0].user_id.as_str()), ("title", "bob"));
    }
    demo.shutdown().await;
}
