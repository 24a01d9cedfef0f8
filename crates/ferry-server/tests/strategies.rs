//! Conflict strategies through `SyncHandler`: the blog scenario (value A;
//! an online user changes it to B; an offline user whose base is still A
//! changes it to C and reconnects) under each strategy, with both users'
//! clients synced afterwards.

mod common;

use std::sync::Arc;

use common::*;
use ferry_conflict::crdt;
use ferry_core::{CrudEntry, RowData, Value};
use ferry_protocol::{Outcome, UploadRequest, UploadTransaction};
use ferry_server::{
    Audited, ConflictStrategy, Crdt, DomainRules, LastWriteWins, Manual, RowLastWriteWins, ServiceOptions,
    SqliteSourceDb, SyncRules, SyncService, TICKET_TRACKER_RULES,
};
use ferry_transport::SyncHandler;

const DOCS: &str = r#"
[[tables]]
name = "docs"
columns = [{ name = "title", type = "text" }, { name = "body", type = "blob" }]

[[buckets]]
name = "docs"
data = [{ table = "docs" }]

[[permissions]]
table = "docs"
insert = "true"
update = "true"
"#;

struct Env {
    _dir: tempfile::TempDir,
    svc: SyncService,
}

fn env_rules(rules: &str, table: &str, strategy: Option<Arc<dyn ConflictStrategy>>) -> Env {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = SqliteSourceDb::open_dir(dir.path()).expect("open db");
    let rules = SyncRules::from_toml(rules).expect("rules");
    let mut b = SyncService::builder(Arc::new(db), rules, SECRET).options(ServiceOptions::default());
    if let Some(s) = strategy {
        b = b.strategy(table, s);
    }
    Env {
        _dir: dir,
        svc: b.build().expect("build"),
    }
}

fn env_with_strategy(table: &str, strategy: Arc<dyn ConflictStrategy>) -> Env {
    env_rules(&format!("{TICKET_TRACKER_RULES}\n{DOCS}"), table, Some(strategy))
}

fn based(mut e: CrudEntry, base: &[(&str, Value)]) -> CrudEntry {
    e.previous = Some(base.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect());
    e
}

async fn up(svc: &SyncService, user: &str, client: &str, entries: Vec<CrudEntry>) -> Vec<Outcome> {
    let resp = SyncHandler::upload(svc, &token(user), upload_req(client, entries))
        .await
        .expect("upload accepted");
    resp.outcomes.into_iter().map(|o| o.outcome).collect()
}

/// The ticket t1 {title A, status pending}, created by u0.
async fn seed(svc: &SyncService) {
    let create = put(
        "tickets",
        "t1",
        &[
            ("title", "A".into()),
            ("status", "pending".into()),
            ("version", 0.into()),
        ],
    );
    let out = up(svc, "u0", "c0", vec![entry(1, create, 1000, "c0")]).await;
    assert_eq!(out, [Outcome::Applied]);
}

/// u1 (online, client c1) sets `column` to `b` at 2000 from base `a`;
/// u2 (offline, client c2) sets it to `c` at `offline_ms` from base `a`.
/// Returns the offline op's outcome.
async fn scenario(svc: &SyncService, column: &str, [a, b, c]: [&str; 3], offline_ms: u64) -> Outcome {
    seed(svc).await;
    if a != "A" && a != "pending" {
        up(
            svc,
            "u0",
            "c0",
            vec![entry(2, patch("tickets", "t1", &[(column, a.into())]), 1100, "c0")],
        )
        .await;
    }
    let online = based(
        entry(1, patch("tickets", "t1", &[(column, b.into())]), 2000, "c1"),
        &[(column, a.into())],
    );
    assert_eq!(up(svc, "u1", "c1", vec![online]).await, [Outcome::Applied]);
    let offline = based(
        entry(1, patch("tickets", "t1", &[(column, c.into())]), offline_ms, "c2"),
        &[(column, a.into())],
    );
    let mut out = up(svc, "u2", "c2", vec![offline]).await;
    out.remove(0)
}

/// Sync fresh clients of u1 and u2; both see the same rows. Returns them.
async fn synced(svc: &SyncService) -> std::collections::BTreeMap<(String, String), RowData> {
    let mut c1 = TestClient::new("c1");
    let mut c2 = TestClient::new("c2");
    c1.sync(svc, &token("u1")).await;
    c2.sync(svc, &token("u2")).await;
    let rows = c1.rows();
    assert_eq!(rows, c2.rows(), "both users converge");
    rows
}

fn value(rows: &std::collections::BTreeMap<(String, String), RowData>, table: &str, id: &str, col: &str) -> Value {
    rows.get(&(table.to_owned(), id.to_owned()))
        .and_then(|r| r.get(col).cloned())
        .unwrap_or(Value::Null)
}

fn merged_reason(o: &Outcome) -> &str {
    match o {
        Outcome::Merged { reason, .. } => reason,
        other => panic!("expected merged, got {other:?}"),
    }
}

#[tokio::test]
async fn lww_column_later_clock_wins() {
    for (offline_ms, expect, applied) in [(1500, "B", false), (3000, "C", true)] {
        let e = env_with_strategy("tickets", Arc::new(LastWriteWins));
        let out = scenario(&e.svc, "title", ["A", "B", "C"], offline_ms).await;
        assert_eq!(out == Outcome::Applied, applied, "{out:?}");
        if !applied {
            assert_eq!(merged_reason(&out), "newer writes kept for columns title");
        }
        let rows = synced(&e.svc).await;
        assert_eq!(value(&rows, "tickets", "t1", "title"), Value::from(expect));
    }
}

#[tokio::test]
async fn row_lww_whole_row_ordered_by_clock() {
    let e = env_with_strategy("tickets", Arc::new(RowLastWriteWins));
    let out = scenario(&e.svc, "title", ["A", "B", "C"], 1500).await;
    assert!(
        merged_reason(&out).starts_with("row tickets/t1 has a newer write at"),
        "{out:?}"
    );
    // Even a different column loses to the newer row write.
    let other = entry(2, patch("tickets", "t1", &[("description", "d".into())]), 1600, "c2");
    let out = up(&e.svc, "u2", "c2", vec![other]).await;
    assert!(matches!(out[0], Outcome::Merged { .. }), "{out:?}");
    let newer = entry(3, patch("tickets", "t1", &[("description", "d".into())]), 2500, "c2");
    assert_eq!(up(&e.svc, "u2", "c2", vec![newer]).await, [Outcome::Applied]);
    let rows = synced(&e.svc).await;
    assert_eq!(value(&rows, "tickets", "t1", "title"), Value::from("B"));
    assert_eq!(value(&rows, "tickets", "t1", "description"), Value::from("d"));
}

#[tokio::test]
async fn domain_rule_done_is_not_reopened() {
    let e = env_with_strategy("tickets", Arc::new(DomainRules::ticket_status()));
    let out = scenario(&e.svc, "status", ["pending", "done", "in_progress"], 3000).await;
    match &out {
        Outcome::Merged { row, reason } => {
            assert_eq!(
                reason,
                "tickets.status stays 'done': the change to 'in_progress' was made from base 'pending'"
            );
            assert_eq!(row.as_ref().and_then(|r| r.get("status")), Some(&Value::from("done")));
        }
        other => panic!("expected merged, got {other:?}"),
    }
    let rows = synced(&e.svc).await;
    assert_eq!(value(&rows, "tickets", "t1", "status"), Value::from("done"));
    // A user who saw `done` may reopen it.
    let reopen = based(
        entry(
            2,
            patch("tickets", "t1", &[("status", "in_progress".into())]),
            3500,
            "c2",
        ),
        &[("status", "done".into())],
    );
    assert_eq!(up(&e.svc, "u2", "c2", vec![reopen]).await, [Outcome::Applied]);
}

#[tokio::test]
async fn domain_rules_from_the_sync_rules_toml() {
    let rules = format!(
        "{TICKET_TRACKER_RULES}\n{}",
        r#"
[[strategies]]
table = "tickets"
kind = "domain"
rules = [{ kind = "deny_transition", column = "status", from_server = ["done"], unless_base = ["done"] }]
"#
    );
    let e = env_rules(&rules, "tickets", None);
    let out = scenario(&e.svc, "status", ["pending", "done", "pending"], 3000).await;
    assert!(
        merged_reason(&out).starts_with("tickets.status stays 'done'"),
        "{out:?}"
    );
    let bad =
        format!("{TICKET_TRACKER_RULES}\n[[strategies]]\ntable = \"tickets\"\nkind = \"crdt\"\ncolumns = [\"nope\"]\n");
    let err = SyncRules::from_toml(&bad).expect_err("unknown column");
    assert!(err.to_string().contains("unknown column \"nope\""), "{err}");
}

#[tokio::test]
async fn manual_needs_review_and_resolution_round_trip() {
    let e = env_with_strategy("tickets", Arc::new(Manual));
    let out = scenario(&e.svc, "title", ["A", "B", "C"], 3000).await;
    assert_eq!(
        out,
        Outcome::NeedsReview {
            conflict_id: "c2:1:title".into()
        }
    );
    let rows = synced(&e.svc).await;
    assert_eq!(value(&rows, "tickets", "t1", "title"), Value::from("B"));
    let conflict = |rows: &std::collections::BTreeMap<(String, String), RowData>, col: &str| {
        value(rows, "ferry_conflicts", "c2:1:title", col)
    };
    assert_eq!(conflict(&rows, "status"), Value::from("open"));
    assert_eq!(conflict(&rows, "local_value"), Value::from("\"C\""));
    assert_eq!(conflict(&rows, "server_value"), Value::from("\"B\""));
    assert_eq!(conflict(&rows, "base_value"), Value::from("\"A\""));
    assert_eq!(conflict(&rows, "user_id"), Value::from("u2"));
    assert_eq!(conflict(&rows, "field"), Value::from("title"));
    assert_eq!(conflict(&rows, "resolution"), Value::Null);
    // u2, whose conflict it is, resolves in favour of C: one transaction
    // writes the value with a fresh base and closes the record.
    let resolve = UploadRequest {
        client_id: "c2".into(),
        transactions: vec![UploadTransaction {
            tx_id: 2,
            ops: vec![
                based(
                    entry(2, patch("tickets", "t1", &[("title", "C".into())]), 4000, "c2"),
                    &[("title", "B".into())],
                ),
                entry(
                    3,
                    patch(
                        "ferry_conflicts",
                        "c2:1:title",
                        &[("status", "resolved".into()), ("resolution", "\"C\"".into())],
                    ),
                    4000,
                    "c2",
                ),
            ],
        }],
    };
    let resp = SyncHandler::upload(&e.svc, &token("u2"), resolve)
        .await
        .expect("upload");
    let outcomes: Vec<Outcome> = resp.outcomes.into_iter().map(|o| o.outcome).collect();
    assert_eq!(outcomes, [Outcome::Applied, Outcome::Applied]);
    let rows = synced(&e.svc).await;
    assert_eq!(value(&rows, "tickets", "t1", "title"), Value::from("C"));
    assert_eq!(conflict(&rows, "status"), Value::from("resolved"));
    assert_eq!(conflict(&rows, "resolution"), Value::from("\"C\""));
}

#[tokio::test]
async fn manual_without_a_conflicts_table_rejects_with_reason() {
    let rules = r#"
[[tables]]
name = "tickets"
columns = [{ name = "title", type = "text" }]
[[buckets]]
name = "global"
data = [{ table = "tickets" }]
[[permissions]]
table = "tickets"
insert = "true"
update = "true"
"#;
    let e = env_rules(rules, "tickets", Some(Arc::new(Manual)));
    up(
        &e.svc,
        "u0",
        "c0",
        vec![entry(1, put("tickets", "t1", &[("title", "A".into())]), 1000, "c0")],
    )
    .await;
    up(
        &e.svc,
        "u1",
        "c1",
        vec![entry(1, patch("tickets", "t1", &[("title", "B".into())]), 2000, "c1")],
    )
    .await;
    let stale = based(
        entry(1, patch("tickets", "t1", &[("title", "C".into())]), 3000, "c2"),
        &[("title", "A".into())],
    );
    let out = up(&e.svc, "u2", "c2", vec![stale]).await;
    assert_eq!(
        out,
        [Outcome::Rejected {
            reason: "side write ferry_conflicts/c2:1:title: unknown table \"ferry_conflicts\"".into()
        }]
    );
}

#[tokio::test]
async fn crdt_both_edits_present() {
    let e = env_with_strategy("docs", Arc::new(Crdt::new(["body"])));
    let a = crdt::new_text_doc("hello");
    let create = put(
        "docs",
        "d1",
        &[("title", "doc".into()), ("body", Value::Blob(a.clone()))],
    );
    assert_eq!(
        up(&e.svc, "u0", "c0", vec![entry(1, create, 1000, "c0")]).await,
        [Outcome::Applied]
    );
    let b = crdt::edit_text(&a, "c1", |t| {
        t.insert(0, "online: ");
    })
    .expect("edit");
    let c = crdt::edit_text(&a, "c2", |t| {
        t.push(" (offline)");
    })
    .expect("edit");
    let body = |bytes: Vec<u8>| patch("docs", "d1", &[("body", Value::Blob(bytes))]);
    assert_eq!(
        up(&e.svc, "u1", "c1", vec![entry(1, body(b), 2000, "c1")]).await,
        [Outcome::Applied]
    );
    let out = up(&e.svc, "u2", "c2", vec![entry(1, body(c), 1500, "c2")]).await;
    assert_eq!(merged_reason(&out[0]), "merged concurrent edits into docs.body");
    let rows = synced(&e.svc).await;
    let Value::Blob(stored) = value(&rows, "docs", "d1", "body") else {
        panic!("body is a blob");
    };
    assert_eq!(crdt::read_text(&stored).expect("text"), "online: hello (offline)");
}

#[tokio::test]
async fn audit_writes_activity_rows_in_the_same_transaction() {
    let e = env_with_strategy("tickets", Arc::new(Audited::new(LastWriteWins)));
    let out = scenario(&e.svc, "title", ["A", "B", "C"], 1500).await;
    assert!(matches!(out, Outcome::Merged { .. }));
    let rows = synced(&e.svc).await;
    let activity: Vec<&RowData> = rows
        .iter()
        .filter(|((t, _), _)| t == "activity")
        .map(|(_, r)| r)
        .collect();
    assert_eq!(activity.len(), 3);
    let mut outcomes: Vec<(String, String)> = activity
        .iter()
        .map(|r| {
            let s = |c: &str| r.get(c).and_then(|v| v.as_text()).unwrap_or_default().to_owned();
            (s("client_id"), s("outcome"))
        })
        .collect();
    outcomes.sort();
    assert_eq!(
        outcomes,
        [
            ("c0".to_owned(), "applied".to_owned()),
            ("c1".to_owned(), "applied".to_owned()),
            ("c2".to_owned(), "merged".to_owned())
        ]
    );
    let c2 = activity
        .iter()
        .find(|r| r.get("client_id") == Some(&Value::from("c2")))
        .expect("c2's activity");
    assert_eq!(c2.get("user_id"), Some(&Value::from("u2")));
    assert_eq!(c2.get("op"), Some(&Value::from("PATCH")));
    let new_value = c2.get("new_value").and_then(|v| v.as_text()).unwrap_or_default();
    assert!(new_value.contains("\"title\":\"B\""), "{new_value}");
}

/// A client id as long as the server accepts (256 bytes) still gets its
/// audited writes applied, each with its own activity row naming it, and
/// its conflicts recorded for review.
#[tokio::test]
async fn audited_writes_of_a_client_id_at_the_length_limit_apply() {
    let e = env_with_strategy("tickets", Arc::new(Audited::new(Manual)));
    let long_a = "a".repeat(256);
    let long_b = format!("{}b", "a".repeat(255));
    for (n, client) in [&long_a, &long_b].into_iter().enumerate() {
        let row = put("tickets", &format!("t{n}"), &[("title", "A".into())]);
        assert_eq!(
            up(&e.svc, "u1", client, vec![entry(1, row, 1000, client)]).await,
            [Outcome::Applied],
            "client id of {} bytes",
            client.len()
        );
    }
    let rows = synced(&e.svc).await;
    let mut clients: Vec<&str> = rows
        .iter()
        .filter(|((t, _), _)| t == "activity")
        .filter_map(|(_, r)| r.get("client_id").and_then(|v| v.as_text()))
        .collect();
    clients.sort_unstable();
    assert_eq!(clients, [long_a.as_str(), long_b.as_str()]);

    // long_b edits t0's title offline from "A" after u0 changed it.
    let online = based(
        entry(1, patch("tickets", "t0", &[("title", "B".into())]), 2000, "c1"),
        &[("title", "A".into())],
    );
    assert_eq!(up(&e.svc, "u1", "c1", vec![online]).await, [Outcome::Applied]);
    let offline = based(
        entry(2, patch("tickets", "t0", &[("title", "C".into())]), 3000, &long_b),
        &[("title", "A".into())],
    );
    let out = up(&e.svc, "u1", &long_b, vec![offline]).await;
    let [Outcome::NeedsReview { conflict_id }] = out.as_slice() else {
        panic!("a conflict for review: {out:?}");
    };
    let rows = synced(&e.svc).await;
    assert_eq!(
        value(&rows, "ferry_conflicts", conflict_id, "local_value"),
        Value::from("\"C\"")
    );
}

#[tokio::test]
async fn disjoint_changes_never_conflict_through_the_server() {
    let strategies: Vec<Arc<dyn ConflictStrategy>> = vec![
        Arc::new(LastWriteWins),
        Arc::new(DomainRules::ticket_status()),
        Arc::new(Manual),
        Arc::new(Audited::new(Manual)),
    ];
    for s in strategies {
        let e = env_with_strategy("tickets", s.clone());
        seed(&e.svc).await;
        let t2 = put("tickets", "t2", &[("title", "A".into())]);
        up(&e.svc, "u0", "c0", vec![entry(2, t2, 1000, "c0")]).await;
        let on = based(
            entry(1, patch("tickets", "t1", &[("title", "B".into())]), 2000, "c1"),
            &[("title", "A".into())],
        );
        let off_row = based(
            entry(1, patch("tickets", "t2", &[("title", "C".into())]), 1500, "c2"),
            &[("title", "A".into())],
        );
        let off_col = based(
            entry(2, patch("tickets", "t1", &[("description", "D".into())]), 1500, "c2"),
            &[("description", Value::Null)],
        );
        assert_eq!(up(&e.svc, "u1", "c1", vec![on]).await, [Outcome::Applied], "{s:?}");
        assert_eq!(
            up(&e.svc, "u2", "c2", vec![off_row, off_col]).await,
            [Outcome::Applied, Outcome::Applied],
            "{s:?}"
        );
        let rows = synced(&e.svc).await;
        assert_eq!(value(&rows, "tickets", "t1", "title"), Value::from("B"));
        assert_eq!(value(&rows, "tickets", "t1", "description"), Value::from("D"));
        assert_eq!(value(&rows, "tickets", "t2", "title"), Value::from("C"));
        assert!(!rows.keys().any(|(t, _)| t == "ferry_conflicts"), "{s:?}");
    }
}
