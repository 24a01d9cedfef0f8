//! A hard delete against a write through `SyncService`: both arrival
//! orders store the same row and give a syncing reader the same row
//! (docs/adr/0004-delete-against-write.md: a delete writes "nothing" to
//! every column at its clock).
//!
//! Clocks differ in `wall_ms` (the server may restamp a clock's node with
//! the uploading client's id).

mod common;

use common::*;
use ferry_core::{CrudOp, RowData, Value};
use ferry_protocol::Outcome;
use ferry_server::SyncService;
use ferry_transport::SyncHandler;

async fn up(svc: &SyncService, user: &str, client: &str, entries: Vec<ferry_core::CrudEntry>) -> Vec<Outcome> {
    let resp = SyncHandler::upload(svc, &token(user), upload_req(client, entries))
        .await
        .expect("upload accepted");
    resp.outcomes.into_iter().map(|o| o.outcome).collect()
}

/// One op of a case: the client uploading it, its op, its clock.
struct Timed {
    client: &'static str,
    op: CrudOp,
    wall_ms: u64,
}

/// What one arrival order leaves: the stored row (`None`: deleted) and the
/// reader's copy (`None`: absent), after the reader synced the created row
/// and then again after both ops.
struct Played {
    stored: Option<RowData>,
    read: Option<RowData>,
    outcomes: Vec<Outcome>,
}

async fn play(ops: [&Timed; 2]) -> Played {
    let e = env();
    let create = put(
        "tickets",
        "t1",
        &[
            ("title", "A".into()),
            ("status", "pending".into()),
            ("version", 1.into()),
        ],
    );
    let out = up(&e.svc, "u0", "c0", vec![entry(1, create, 1000, "c0")]).await;
    assert_eq!(out, vec![Outcome::Applied]);
    let mut reader = TestClient::new("reader");
    reader.sync(&e.svc, &token("u9")).await;
    assert!(reader.rows().contains_key(&key()), "the reader has the created row");
    let mut outcomes = Vec::new();
    for (seq, t) in ops.iter().enumerate() {
        let seq = seq as u64 + 1;
        let out = up(
            &e.svc,
            "u1",
            t.client,
            vec![entry(seq, t.op.clone(), t.wall_ms, t.client)],
        )
        .await;
        outcomes.extend(out);
    }
    reader.sync(&e.svc, &token("u9")).await;
    let table = e.svc.rules().schema().table("tickets").expect("tickets table").clone();
    let stored = e
        .svc
        .db()
        .get_row(&table, "t1")
        .expect("row readable")
        .and_then(|r| r.data);
    Played {
        stored,
        read: reader.rows().get(&key()).cloned(),
        outcomes,
    }
}

fn key() -> (String, String) {
    ("tickets".to_owned(), "t1".to_owned())
}

/// Every ticket column NULL but `pairs`.
fn ticket_row(pairs: &[(&str, Value)]) -> RowData {
    let mut row: RowData = [
        "title",
        "description",
        "status",
        "deleted_at",
        "created_at",
        "updated_at",
        "version",
    ]
    .iter()
    .map(|c| ((*c).to_owned(), Value::Null))
    .collect();
    row.extend(pairs.iter().map(|(k, v)| ((*k).to_owned(), v.clone())));
    row
}

async fn both_orders(name: &str, delete_op: Timed, write: Timed, expected: Option<RowData>) {
    let delete_first = play([&delete_op, &write]).await;
    let write_first = play([&write, &delete_op]).await;
    assert_eq!(
        delete_first.stored, write_first.stored,
        "{name}: stored rows differ by arrival order ({:?} vs {:?})",
        delete_first.outcomes, write_first.outcomes
    );
    assert_eq!(delete_first.stored, expected, "{name}: stored row");
    assert_eq!(delete_first.read, write_first.read, "{name}: the reader's rows differ");
    assert_eq!(delete_first.read, expected, "{name}: the reader's row");
    for r in [&delete_first, &write_first] {
        assert!(
            !r.outcomes.iter().any(|o| matches!(o, Outcome::Rejected { .. })),
            "{name}: {:?}",
            r.outcomes
        );
    }
}

fn del(wall_ms: u64) -> Timed {
    Timed {
        client: "c2",
        op: delete("tickets", "t1"),
        wall_ms,
    }
}

#[tokio::test]
async fn newer_patch_against_delete_brings_the_row_back_in_both_orders() {
    // The integrator's case: a PATCH newer than the delete. Either order
    // keeps the row with the patched column and the others cleared.
    both_orders(
        "older delete vs newer patch",
        del(1500),
        Timed {
            client: "c1",
            op: patch("tickets", "t1", &[("title", "B".into())]),
            wall_ms: 2000,
        },
        Some(ticket_row(&[("title", "B".into())])),
    )
    .await;
}

#[tokio::test]
async fn older_patch_against_delete_stays_deleted_in_both_orders() {
    both_orders(
        "newer delete vs older patch",
        del(2000),
        Timed {
            client: "c1",
            op: patch("tickets", "t1", &[("title", "B".into())]),
            wall_ms: 1500,
        },
        None,
    )
    .await;
}

#[tokio::test]
async fn put_against_delete_is_decided_by_the_clocks_in_both_orders() {
    let newer_put = || Timed {
        client: "c1",
        op: put("tickets", "t1", &[("title", "C".into()), ("status", "done".into())]),
        wall_ms: 2000,
    };
    both_orders(
        "older delete vs newer put",
        del(1500),
        newer_put(),
        Some(ticket_row(&[("title", "C".into()), ("status", "done".into())])),
    )
    .await;
    both_orders("newer delete vs older put", del(2500), newer_put(), None).await;
}

#[tokio::test]
async fn delete_against_delete_is_deleted_in_both_orders() {
    both_orders(
        "delete vs delete",
        del(1500),
        Timed {
            client: "c1",
            op: delete("tickets", "t1"),
            wall_ms: 2000,
        },
        None,
    )
    .await;
}
