//! The upload path's promises, through the public API: nothing
//! acknowledged is lost, every write gets exactly one outcome, a write is
//! never answered with another write's outcome, a client transaction
//! applies whole or not at all, and nobody sees or changes what is not
//! theirs.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use common::*;
use ferry_core::{Clock, CrudEntry, HlcTimestamp, ManualClock, RowData, Value};
use ferry_protocol::{ErrorCode, Outcome, StreamLine, UploadResponse};
use ferry_server::{ServiceOptions, SqliteSourceDb, SyncRules, SyncService, TICKET_TRACKER_RULES};
use ferry_transport::SyncHandler;

fn ticket(id: &str, title: &str) -> ferry_core::CrudOp {
    put("tickets", id, &[("title", title.into()), ("status", "pending".into())])
}

fn outcomes(r: &UploadResponse) -> Vec<Outcome> {
    r.outcomes.iter().map(|o| o.outcome.clone()).collect()
}

/// What a fresh reader of `user` sees after one checkpoint.
async fn reader_rows(svc: &SyncService, user: &str) -> BTreeMap<(String, String), RowData> {
    let mut c = TestClient::new(&format!("reader-{user}-{}", next_reader()));
    c.sync(svc, &token(user)).await;
    c.rows()
}

fn next_reader() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::SeqCst)
}

fn key(table: &str, id: &str) -> (String, String) {
    (table.to_owned(), id.to_owned())
}

async fn write_checkpoint(svc: &SyncService, user: &str, client_id: &str) -> Option<u64> {
    let u = svc.authenticate(&token(user)).expect("token");
    svc.checkpoint(&u, client_id)
        .await
        .expect("checkpoint")
        .write_checkpoint
}

// ---------------------------------------------------------------------------
// 1. A different write is never answered with a stored outcome
// ---------------------------------------------------------------------------

#[tokio::test]
async fn a_different_write_with_a_used_seq_is_refused_and_changes_nothing() {
    let e = env();
    let first = try_upload(
        &e.svc,
        "u1",
        upload_req("c1", vec![entry(1, ticket("t1", "a"), 1000, "c1")]),
    )
    .await
    .expect("first upload");
    assert_eq!(outcomes(&first), [Outcome::Applied]);
    let oplog = e.svc.db().oplog_len().expect("len");

    // Seq 1 again, but another write, followed by a new op.
    let err = try_upload(
        &e.svc,
        "u1",
        upload_req(
            "c1",
            vec![
                entry(1, ticket("t1", "evil"), 1000, "c1"),
                entry(2, ticket("t2", "b"), 1000, "c1"),
            ],
        ),
    )
    .await
    .expect_err("seq reused for another write");
    assert_eq!(err.code, ErrorCode::BadRequest);
    assert!(
        err.message
            .contains("seq 1 of client \"c1\" was already used for a different write"),
        "{}",
        err.message
    );
    // Nothing was written: not the new op, not the client's progress.
    assert_eq!(e.svc.db().oplog_len().expect("len"), oplog);
    assert_eq!(write_checkpoint(&e.svc, "u1", "c1").await, Some(1));
    let rows = reader_rows(&e.svc, "u9").await;
    assert_eq!(rows[&key("tickets", "t1")]["title"], Value::from("a"));
    assert!(!rows.contains_key(&key("tickets", "t2")));

    // The same write again gets its own outcome.
    let again = try_upload(
        &e.svc,
        "u1",
        upload_req("c1", vec![entry(1, ticket("t1", "a"), 1000, "c1")]),
    )
    .await
    .expect("replay");
    assert_eq!(outcomes(&again), outcomes(&first));
    assert_eq!(again.write_checkpoint, 1);
}

#[tokio::test]
async fn a_used_seq_without_a_recorded_write_is_refused_not_applied() {
    let e = env();
    let r = try_upload(
        &e.svc,
        "u1",
        upload_req(
            "c1",
            vec![
                entry(1, ticket("t1", "a"), 1000, "c1"),
                entry(5, ticket("t5", "e"), 1000, "c1"),
            ],
        ),
    )
    .await
    .expect("seqs with a gap");
    assert_eq!(outcomes(&r), [Outcome::Applied, Outcome::Applied]);
    // Seq 3 is below the last seq (5) but was never uploaded: it cannot be
    // answered `applied`, since it was not.
    let err = try_upload(
        &e.svc,
        "u1",
        upload_req("c1", vec![entry(3, ticket("t3", "c"), 1000, "c1")]),
    )
    .await
    .expect_err("an unrecorded old seq");
    assert_eq!(err.code, ErrorCode::BadRequest);
    assert!(err.message.contains("seq 3 of client \"c1\""), "{}", err.message);
    assert!(!reader_rows(&e.svc, "u9").await.contains_key(&key("tickets", "t3")));
}

// ---------------------------------------------------------------------------
// 2. Seq validation
// ---------------------------------------------------------------------------

#[tokio::test]
async fn seqs_that_do_not_strictly_increase_are_refused_whole() {
    let e = env();
    let cases = [
        (
            "repeat inside a transaction",
            upload_txs(
                "c1",
                vec![(
                    1,
                    vec![
                        entry(1, ticket("t1", "a"), 1000, "c1"),
                        entry(1, ticket("t2", "b"), 1000, "c1"),
                    ],
                )],
            ),
        ),
        (
            "backwards inside a transaction",
            upload_txs(
                "c1",
                vec![(
                    1,
                    vec![
                        entry(2, ticket("t1", "a"), 1000, "c1"),
                        entry(1, ticket("t2", "b"), 1000, "c1"),
                    ],
                )],
            ),
        ),
        (
            "backwards across transactions",
            upload_txs(
                "c1",
                vec![
                    (1, vec![entry(3, ticket("t1", "a"), 1000, "c1")]),
                    (2, vec![entry(2, ticket("t2", "b"), 1000, "c1")]),
                ],
            ),
        ),
        (
            "repeat across transactions",
            upload_txs(
                "c1",
                vec![
                    (1, vec![entry(3, ticket("t1", "a"), 1000, "c1")]),
                    (2, vec![entry(3, ticket("t2", "b"), 1000, "c1")]),
                ],
            ),
        ),
    ];
    for (what, request) in cases {
        let err = try_upload(&e.svc, "u1", request).await.expect_err(what);
        assert_eq!(err.code, ErrorCode::BadRequest, "{what}");
        assert!(err.message.contains("strictly increase"), "{what}: {}", err.message);
    }
    // Nothing of any of them was written.
    assert_eq!(e.svc.db().oplog_len().expect("len"), 0);
    assert_eq!(write_checkpoint(&e.svc, "u1", "c1").await, None);
}

#[tokio::test]
async fn an_absurd_seq_is_refused_and_the_client_can_still_write() {
    let e = env();
    let err = try_upload(
        &e.svc,
        "u1",
        upload_req("c1", vec![entry(u64::MAX, ticket("t1", "far"), 1000, "c1")]),
    )
    .await
    .expect_err("seq u64::MAX");
    assert_eq!(err.code, ErrorCode::BadRequest);
    assert!(err.message.contains("max_seq_gap"), "{}", err.message);
    assert_eq!(write_checkpoint(&e.svc, "u1", "c1").await, None);
    // The client's next ordinary write applies and is visible.
    let r = try_upload(
        &e.svc,
        "u1",
        upload_req("c1", vec![entry(1, ticket("t1", "near"), 1000, "c1")]),
    )
    .await
    .expect("seq 1");
    assert_eq!(outcomes(&r), [Outcome::Applied]);
    let rows = reader_rows(&e.svc, "u2").await;
    assert_eq!(rows[&key("tickets", "t1")]["title"], Value::from("near"));
}

#[tokio::test]
async fn the_seq_gap_limit_holds_at_its_bound() {
    let e = env_with(ServiceOptions {
        max_seq_gap: 10,
        ..ServiceOptions::default()
    });
    // A new client counts from 0: seq 10 is at the limit, 21 is 11 past 10.
    let r = try_upload(
        &e.svc,
        "u1",
        upload_req("c1", vec![entry(10, ticket("t1", "a"), 1000, "c1")]),
    )
    .await
    .expect("at the limit");
    assert_eq!(outcomes(&r), [Outcome::Applied]);
    let err = try_upload(
        &e.svc,
        "u1",
        upload_req("c1", vec![entry(21, ticket("t2", "b"), 1000, "c1")]),
    )
    .await
    .expect_err("one past the limit");
    assert_eq!(err.code, ErrorCode::BadRequest);
    let err = try_upload(
        &e.svc,
        "u2",
        upload_req("c2", vec![entry(11, ticket("t3", "c"), 1000, "c2")]),
    )
    .await
    .expect_err("a new client one past the limit");
    assert_eq!(err.code, ErrorCode::BadRequest);
    // A request whose new ops follow replayed ones is fine.
    let r = try_upload(
        &e.svc,
        "u1",
        upload_txs(
            "c1",
            vec![
                (1, vec![entry(10, ticket("t1", "a"), 1000, "c1")]),
                (2, vec![entry(20, ticket("t2", "b"), 1000, "c1")]),
            ],
        ),
    )
    .await
    .expect("replay then new, at the limit");
    assert_eq!(outcomes(&r), [Outcome::Applied, Outcome::Applied]);
    assert_eq!(r.write_checkpoint, 20);
}

// ---------------------------------------------------------------------------
// 3. A client transaction is all-or-nothing
// ---------------------------------------------------------------------------

#[tokio::test]
async fn a_rejected_op_rolls_back_its_whole_transaction() {
    let e = env();
    let tx = vec![
        entry(10, ticket("t1", "a"), 1000, "c1"),
        entry(
            11,
            put(
                "assignments",
                "a1",
                &[("ticket_id", "t1".into()), ("user_id", "u1".into())],
            ),
            1000,
            "c1",
        ),
        entry(12, put("nope", "x", &[]), 1000, "c1"),
    ];
    let request = upload_txs("c1", vec![(7, tx.clone())]);
    let r = try_upload(&e.svc, "u1", request.clone()).await.expect("upload");
    let reasons: Vec<String> = r
        .outcomes
        .iter()
        .map(|o| match &o.outcome {
            Outcome::Rejected { reason } => reason.clone(),
            other => panic!("seq {} not rejected: {other:?}", o.seq),
        })
        .collect();
    assert_eq!(r.outcomes.iter().map(|o| o.seq).collect::<Vec<_>>(), [10, 11, 12]);
    assert!(reasons[2].contains("unknown table \"nope\""), "{}", reasons[2]);
    for reason in &reasons[..2] {
        assert!(reason.contains("transaction 7 rolled back"), "{reason}");
        assert!(reason.contains(&reasons[2]), "{reason}");
    }
    // The transaction's seqs are answered for: the write checkpoint moved.
    assert_eq!(r.write_checkpoint, 12);
    // Nothing of it is visible.
    let rows = reader_rows(&e.svc, "u1").await;
    assert!(rows.is_empty(), "{rows:?}");
    assert_eq!(e.svc.db().oplog_len().expect("len"), 0);
    // A replay gets the same answers and writes nothing.
    let again = try_upload(&e.svc, "u1", request).await.expect("replay");
    assert_eq!(again.outcomes, r.outcomes);
    assert_eq!(e.svc.db().oplog_len().expect("len"), 0);
    // The next transaction applies.
    let next = try_upload(
        &e.svc,
        "u1",
        upload_txs("c1", vec![(8, vec![entry(13, ticket("t1", "b"), 1000, "c1")])]),
    )
    .await
    .expect("next");
    assert_eq!(outcomes(&next), [Outcome::Applied]);
}

#[tokio::test]
async fn a_table_can_opt_into_per_op_outcomes() {
    let rules = TICKET_TRACKER_RULES.replacen(
        "name = \"comments\"\n",
        "name = \"comments\"\nper_op_outcomes = true\n",
        1,
    );
    assert_ne!(rules, TICKET_TRACKER_RULES);
    let e = env_with_rules(&rules, ServiceOptions::default());
    let r = try_upload(
        &e.svc,
        "u1",
        upload_txs(
            "c1",
            vec![(
                1,
                vec![
                    entry(1, ticket("t1", "a"), 1000, "c1"),
                    entry(2, put("comments", "k1", &[("colour", "red".into())]), 1000, "c1"),
                    entry(
                        3,
                        put("comments", "k2", &[("body", "fine".into()), ("user_id", "u1".into())]),
                        1000,
                        "c1",
                    ),
                ],
            )],
        ),
    )
    .await
    .expect("upload");
    let out = outcomes(&r);
    assert_eq!(out[0], Outcome::Applied);
    assert!(
        matches!(&out[1], Outcome::Rejected { reason } if reason.contains("unknown column \"colour\"")),
        "{out:?}"
    );
    assert_eq!(out[2], Outcome::Applied);
    let rows = reader_rows(&e.svc, "u2").await;
    assert!(rows.contains_key(&key("tickets", "t1")));
    assert!(rows.contains_key(&key("comments", "k2")));
    assert!(!rows.contains_key(&key("comments", "k1")));
    // A rejected op of a table without the option still rolls its
    // transaction back, including the opted-in table's ops.
    let r = try_upload(
        &e.svc,
        "u1",
        upload_txs(
            "c1",
            vec![(
                2,
                vec![
                    entry(4, put("comments", "k3", &[("body", "fine".into())]), 1000, "c1"),
                    entry(5, put("tickets", "t2", &[("colour", "red".into())]), 1000, "c1"),
                ],
            )],
        ),
    )
    .await
    .expect("upload");
    assert!(
        outcomes(&r).iter().all(|o| matches!(o, Outcome::Rejected { .. })),
        "{r:?}"
    );
    assert!(!reader_rows(&e.svc, "u2").await.contains_key(&key("comments", "k3")));
}

// ---------------------------------------------------------------------------
// 4. Client ids belong to a user
// ---------------------------------------------------------------------------

#[tokio::test]
async fn another_users_client_id_is_refused_before_anything_is_read() {
    let e = env();
    try_upload(
        &e.svc,
        "u1",
        upload_req("c1", vec![entry(5, ticket("t1", "a"), 1000, "c1")]),
    )
    .await
    .expect("u1's upload");
    // An empty upload would reveal c1's write checkpoint.
    let err = try_upload(&e.svc, "u2", upload_txs("c1", Vec::new()))
        .await
        .expect_err("empty upload with u1's client id");
    assert_eq!(err.code, ErrorCode::Unauthorized);
    // So would a stream's checkpoint, typed or encoded.
    let request = TestClient::new("c1").dl.request("c1");
    let err = SyncHandler::stream(&e.svc, &token("u2"), request.clone())
        .await
        .expect_err("stream with u1's client id");
    assert_eq!(err.code, ErrorCode::Unauthorized);
    let Err(err) = SyncHandler::stream_lines(&e.svc, &token("u2"), request).await else {
        panic!("encoded stream with u1's client id opened");
    };
    assert_eq!(err.code, ErrorCode::Unauthorized);
    let u2 = e.svc.authenticate(&token("u2")).expect("token");
    assert!(matches!(
        e.svc.checkpoint(&u2, "c1").await,
        Err(ferry_server::ServiceError::Unauthorized(_))
    ));
    // Writes are refused too, and change nothing.
    let oplog = e.svc.db().oplog_len().expect("len");
    let err = try_upload(
        &e.svc,
        "u2",
        upload_req("c1", vec![entry(6, ticket("t2", "b"), 1000, "c1")]),
    )
    .await
    .expect_err("write with u1's client id");
    assert_eq!(err.code, ErrorCode::Unauthorized);
    assert_eq!(e.svc.db().oplog_len().expect("len"), oplog);
    // The owner is still served.
    assert_eq!(write_checkpoint(&e.svc, "u1", "c1").await, Some(5));
    let mut c = TestClient::new("c1");
    c.sync(&e.svc, &token("u1")).await;
    assert_eq!(c.write_checkpoint, Some(5));
}

// ---------------------------------------------------------------------------
// 5. The server owns the clock's node id
// ---------------------------------------------------------------------------

fn stored_clocks(svc: &SyncService, table: &str, id: &str) -> Vec<HlcTimestamp> {
    let t = svc.rules().schema().table(table).expect("table").clone();
    let row = svc.db().get_row(&t, id).expect("read").expect("row");
    row.clocks.values().cloned().chain(row.deleted).collect()
}

#[tokio::test]
async fn clocks_carry_the_uploading_clients_id() {
    let e = env();
    // c2 stamps its write with c1's node id.
    let r = try_upload(
        &e.svc,
        "u2",
        upload_req("c2", vec![entry(1, ticket("t1", "a"), 1000, "c1")]),
    )
    .await
    .expect("upload");
    assert_eq!(outcomes(&r), [Outcome::Applied]);
    let clocks = stored_clocks(&e.svc, "tickets", "t1");
    assert!(!clocks.is_empty());
    assert!(clocks.iter().all(|c| c.node == "c2"), "{clocks:?}");
    // A 2 MB node id is not stored either.
    let huge = "n".repeat(2_000_000);
    let r = try_upload(
        &e.svc,
        "u3",
        upload_req(
            "c3",
            vec![entry(1, patch("tickets", "t1", &[("title", "b".into())]), 2000, &huge)],
        ),
    )
    .await
    .expect("upload");
    assert_eq!(outcomes(&r), [Outcome::Applied]);
    let clocks = stored_clocks(&e.svc, "tickets", "t1");
    let max_node = ServiceOptions::default().max_client_id_bytes;
    assert!(
        clocks.iter().all(|c| c.node.len() <= max_node),
        "a clock of the huge node was stored"
    );
    assert!(clocks.iter().any(|c| c.node == "c3"));
}

/// Two writes of one client whose clock is far past the skew bound, in one
/// upload, keep their order: the later one wins (cutting both clocks to
/// the bound tied them, and the later lost). Found by the fleet simulation.
#[tokio::test]
async fn clamped_writes_of_one_client_keep_their_order() {
    let e = env();
    let ahead_ms = ferry_core::SystemClock.now_ms() + 600_000;
    let r = try_upload(
        &e.svc,
        "u1",
        upload_req(
            "c1",
            vec![
                entry(1, ticket("t1", "first"), ahead_ms, "c1"),
                entry(
                    2,
                    patch("tickets", "t1", &[("title", "second".into())]),
                    ahead_ms + 5,
                    "c1",
                ),
            ],
        ),
    )
    .await
    .expect("upload");
    assert_eq!(outcomes(&r), [Outcome::Applied, Outcome::Applied]);
    let table = e.svc.rules().schema().table("tickets").expect("tickets").clone();
    let row = e
        .svc
        .db()
        .get_row(&table, "t1")
        .expect("read")
        .and_then(|r| r.data)
        .expect("row");
    assert_eq!(row.get("title"), Some(&Value::from("second")));
}

// ---------------------------------------------------------------------------
// 6. Outcomes do not leak rows the user cannot read
// ---------------------------------------------------------------------------

/// The ticket tracker's rules plus `notes`, each readable only by its
/// owner (the ticket tracker's own tables are all in the global bucket),
/// with a domain strategy whose reasons quote the stored value. Anyone
/// may write any note (a drop box), so that writes reach the strategy
/// and its outcomes about rows the writer cannot read.
fn notes_rules() -> String {
    format!(
        "{TICKET_TRACKER_RULES}
[[tables]]
name = \"notes\"
columns = [
  {{ name = \"owner\", type = \"text\" }},
  {{ name = \"body\", type = \"text\" }},
  {{ name = \"status\", type = \"text\" }},
]

[[buckets]]
name = \"my_notes\"
parameters = [\"sub\"]
data = [{{ table = \"notes\", where = {{ owner = \"sub\" }} }}]

[[permissions]]
table = \"notes\"
insert = \"true\"
update = \"true\"
delete = \"true\"

[[strategies]]
table = \"notes\"
kind = \"domain\"
rules = [{{ kind = \"immutable\", column = \"body\" }}]
"
    )
}

/// A PUT of note `n1`, open, with its owner and body.
fn note(owner: &str, body: &str) -> ferry_core::CrudOp {
    put(
        "notes",
        "n1",
        &[
            ("owner", owner.into()),
            ("body", body.into()),
            ("status", "open".into()),
        ],
    )
}

fn mentions(outcome: &Outcome, secret: &str) -> bool {
    serde_json::to_string(outcome).expect("encode").contains(secret)
}

#[tokio::test]
async fn outcomes_do_not_carry_rows_the_user_cannot_read() {
    let e = env_with_rules(&notes_rules(), ServiceOptions::default());
    const SECRET_BODY: &str = "alice-secret-body";
    let r = try_upload(
        &e.svc,
        "alice",
        upload_req("ca", vec![entry(1, note("alice", SECRET_BODY), 5000, "ca")]),
    )
    .await
    .expect("alice's note");
    assert_eq!(outcomes(&r), [Outcome::Applied]);

    // Bob writes blindly to the id with an older clock, deletes with an
    // older clock, and edits the immutable column with a newer one.
    let r = try_upload(
        &e.svc,
        "bob",
        upload_txs(
            "cb",
            vec![
                (1, vec![entry(1, note("bob", "bob's"), 1000, "cb")]),
                (2, vec![entry(2, delete("notes", "n1"), 1000, "cb")]),
                (
                    3,
                    vec![entry(3, patch("notes", "n1", &[("body", "hacked".into())]), 9000, "cb")],
                ),
            ],
        ),
    )
    .await
    .expect("bob's upload");
    assert_eq!(r.outcomes.len(), 3);
    for o in &r.outcomes {
        assert!(
            !mentions(&o.outcome, SECRET_BODY),
            "seq {} leaks: {:?}",
            o.seq,
            o.outcome
        );
        if let Outcome::Merged { row, .. } = &o.outcome {
            assert!(row.is_none(), "seq {} carries alice's row: {row:?}", o.seq);
        }
    }
    // A replay answers the same, still without the row.
    let again = try_upload(
        &e.svc,
        "bob",
        upload_txs("cb", vec![(1, vec![entry(1, note("bob", "bob's"), 1000, "cb")])]),
    )
    .await
    .expect("replay");
    assert!(!mentions(&again.outcomes[0].outcome, SECRET_BODY), "{again:?}");
    // Bob's stream never carries the note.
    let mut bob = TestClient::new("cb");
    let lines = bob.sync(&e.svc, &token("bob")).await;
    for line in &lines {
        let text = serde_json::to_string(line).expect("encode");
        assert!(!text.contains(SECRET_BODY), "bob's stream carries alice's note: {text}");
    }
    assert!(!bob.rows().contains_key(&key("notes", "n1")));

    // Alice, who can read it, still gets the row in her merged outcome.
    let r = try_upload(
        &e.svc,
        "alice",
        upload_req(
            "ca",
            vec![entry(2, patch("notes", "n1", &[("status", "old".into())]), 10, "ca")],
        ),
    )
    .await
    .expect("alice's stale edit");
    match &r.outcomes[0].outcome {
        Outcome::Merged { row: Some(row), .. } => assert_eq!(row["body"], Value::from(SECRET_BODY)),
        other => panic!("expected merged with the row: {other:?}"),
    }
}

/// A strategy's side writes (the audit log's `old_value`, a manual
/// conflict's `server_value`) copy the stored row into rows of their own
/// tables, placed by their own buckets: here each user reads the
/// `activity` and `ferry_conflicts` rows of their own writes. A write to a
/// row its writer cannot read that would put such a row where the writer
/// reads it is refused, with the reason withheld, and writes nothing.
#[tokio::test]
async fn side_writes_do_not_copy_rows_the_writer_cannot_read_to_where_the_writer_reads() {
    const SECRET_BODY: &str = "alice-secret-body";
    for strategy in ["kind = \"lww\"\naudit = true", "kind = \"manual\""] {
        let rules = notes_rules().replace(
            "kind = \"domain\"\nrules = [{ kind = \"immutable\", column = \"body\" }]",
            strategy,
        );
        assert_ne!(rules, notes_rules(), "the strategy was replaced");
        let global_side = "  { table = \"ferry_conflicts\" },\n  { table = \"activity\" },\n";
        assert!(rules.contains(global_side), "the side tables are global in the base");
        let rules = rules.replace(global_side, "")
            + "
[[buckets]]
name = \"my_side_rows\"
parameters = [\"sub\"]
data = [
  { table = \"ferry_conflicts\", where = { user_id = \"sub\" } },
  { table = \"activity\", where = { user_id = \"sub\" } },
]
";
        let e = env_with_rules(&rules, ServiceOptions::default());
        let r = try_upload(
            &e.svc,
            "alice",
            upload_req("ca", vec![entry(1, note("alice", SECRET_BODY), 5000, "ca")]),
        )
        .await
        .expect("alice's note");
        assert_eq!(outcomes(&r), [Outcome::Applied], "{strategy}");
        let oplog = e.svc.db().oplog_len().expect("len");

        // Bob edits the note he cannot read, from a base that is not the
        // stored value (a conflict for `manual`).
        let mut edit = entry(1, patch("notes", "n1", &[("body", "bob's".into())]), 9000, "cb");
        edit.previous = Some([("body".to_owned(), Value::from("a guess"))].into_iter().collect());
        let r = try_upload(&e.svc, "bob", upload_txs("cb", vec![(1, vec![edit])]))
            .await
            .expect("bob's upload");
        for o in &r.outcomes {
            assert!(
                matches!(&o.outcome, Outcome::Rejected { reason } if reason.contains("withheld")),
                "{strategy}: seq {}: {:?}",
                o.seq,
                o.outcome
            );
        }
        assert_eq!(
            e.svc.db().oplog_len().expect("len"),
            oplog,
            "{strategy}: nothing written"
        );
        let mut bob = TestClient::new("cb");
        let lines = bob.sync(&e.svc, &token("bob")).await;
        for line in &lines {
            let text = serde_json::to_string(line).expect("encode");
            assert!(
                !text.contains(SECRET_BODY),
                "{strategy}: bob's stream carries alice's note: {text}"
            );
        }

        // Alice's own edits of her note still write their side rows.
        let r = try_upload(
            &e.svc,
            "alice",
            upload_req(
                "ca",
                vec![entry(2, patch("notes", "n1", &[("status", "done".into())]), 9500, "ca")],
            ),
        )
        .await
        .expect("alice's edit");
        assert!(
            !matches!(r.outcomes[0].outcome, Outcome::Rejected { .. }),
            "{strategy}: {:?}",
            r.outcomes[0].outcome
        );
    }
}

// ---------------------------------------------------------------------------
// 7. The server's clock is sent to clients and survives restarts
// ---------------------------------------------------------------------------

fn service_at(dir: &std::path::Path, clock: Arc<dyn Clock>) -> SyncService {
    let db = SqliteSourceDb::open_dir(dir).expect("open db");
    SyncService::builder(Arc::new(db), SyncRules::ticket_tracker().expect("rules"), SECRET)
        .clock(clock)
        .build()
        .expect("build")
}

fn at_least(a: &HlcTimestamp, b: &HlcTimestamp) -> bool {
    (a.wall_ms, a.counter) >= (b.wall_ms, b.counter)
}

#[tokio::test]
async fn the_servers_clock_covers_stored_clocks_across_restarts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let now_ms = ferry_core::SystemClock.now_ms();
    let ahead = now_ms + ServiceOptions::default().max_clock_skew_ms;
    let stored = {
        let svc = service_at(dir.path(), Arc::new(ManualClock::new(now_ms)));
        // A client whose clock is ahead of the server's.
        let r = try_upload(
            &svc,
            "u1",
            upload_req("c1", vec![entry(1, ticket("t1", "a"), ahead, "c1")]),
        )
        .await
        .expect("upload");
        assert_eq!(outcomes(&r), [Outcome::Applied]);
        let clocks = stored_clocks(&svc, "tickets", "t1");
        let max = clocks.into_iter().max().expect("clocks");
        let answer_hlc = r.hlc.expect("the answer carries the server's clock");
        assert!(at_least(&answer_hlc, &max), "{answer_hlc} < {max}");
        max
    };
    // Restarted, with its wall clock now behind the stored clocks.
    let svc = service_at(dir.path(), Arc::new(ManualClock::new(now_ms - 30_000)));
    let u = svc.authenticate(&token("u2")).expect("token");
    let cp = svc.checkpoint(&u, "c2").await.expect("checkpoint");
    let hlc = cp.hlc.expect("the checkpoint carries the server's clock");
    assert!(at_least(&hlc, &stored), "{hlc} < {stored}");
    let mut c = TestClient::new("c2");
    let lines = c.sync(&svc, &token("u2")).await;
    let StreamLine::Checkpoint(first) = &lines[0] else {
        panic!("first line is a checkpoint: {:?}", lines[0]);
    };
    let hlc = first
        .hlc
        .clone()
        .expect("the stream's checkpoint carries the server's clock");
    assert!(at_least(&hlc, &stored), "{hlc} < {stored}");
}

// ---------------------------------------------------------------------------
// 8. No row or answer the client cannot take
// ---------------------------------------------------------------------------

/// A text of `len` bytes whose JSON string encoding, with `overhead`
/// bytes around it, is exactly `target` bytes: control characters (6
/// bytes each encoded) and letters.
fn text_encoding_to(target: usize, overhead: usize, controls: usize) -> String {
    let letters = target - overhead - 6 * controls;
    format!("{}{}", "\u{1}".repeat(controls), "a".repeat(letters))
}

fn encoded_len(row: &RowData) -> usize {
    serde_json::to_string(row).expect("encode").len()
}

#[tokio::test]
async fn rows_too_large_to_send_are_rejected_at_write_time() {
    const MAX: usize = 1000;
    let e = env_with(ServiceOptions {
        max_row_encoded_bytes: MAX,
        ..ServiceOptions::default()
    });
    // `app_user` has one column; the stored row is `{"name": <text>}`.
    // A user writes their own row (id = their user id): first at the
    // limit, then over it.
    let overhead = encoded_len(&[("name".to_owned(), Value::from(""))].into_iter().collect());
    let at = text_encoding_to(MAX, overhead, 100);
    let over = text_encoding_to(MAX + 1, overhead, 100);
    let row = |s: &str| -> RowData { [("name".to_owned(), Value::from(s))].into_iter().collect() };
    assert_eq!(encoded_len(&row(&at)), MAX);
    assert_eq!(encoded_len(&row(&over)), MAX + 1);
    let r = try_upload(
        &e.svc,
        "u1",
        upload_txs(
            "c1",
            vec![
                (
                    1,
                    vec![entry(
                        1,
                        put("app_user", "u1", &[("name", at.as_str().into())]),
                        1000,
                        "c1",
                    )],
                ),
                (
                    2,
                    vec![entry(
                        2,
                        put("app_user", "u1", &[("name", over.as_str().into())]),
                        2000,
                        "c1",
                    )],
                ),
            ],
        ),
    )
    .await
    .expect("upload");
    let out = outcomes(&r);
    assert_eq!(out[0], Outcome::Applied);
    match &out[1] {
        Outcome::Rejected { reason } => {
            assert!(reason.contains("app_user/u1"), "{reason}");
            assert!(reason.contains("1001 bytes"), "{reason}");
            assert!(reason.contains("1000 bytes"), "{reason}");
        }
        other => panic!("expected rejected: {other:?}"),
    }
    let rows = reader_rows(&e.svc, "u2").await;
    assert_eq!(rows[&key("app_user", "u1")]["name"], Value::from(at.as_str()));
}

#[tokio::test]
async fn a_side_write_too_large_to_send_rejects_its_op() {
    // Audited tickets: each op also writes an `activity` row holding the
    // ticket's JSON, which is larger than the ticket.
    let rules = format!("{TICKET_TRACKER_RULES}\n[[strategies]]\ntable = \"tickets\"\nkind = \"lww\"\naudit = true\n");
    let title = "\u{1}".repeat(150);
    let full: RowData = [
        "title",
        "description",
        "status",
        "deleted_at",
        "created_at",
        "updated_at",
        "version",
    ]
    .into_iter()
    .map(|c| {
        (
            c.to_owned(),
            if c == "title" {
                Value::from(title.as_str())
            } else {
                Value::Null
            },
        )
    })
    .collect();
    let max = encoded_len(&full) + 50;
    let e = env_with_rules(
        &rules,
        ServiceOptions {
            max_row_encoded_bytes: max,
            ..ServiceOptions::default()
        },
    );
    let r = try_upload(
        &e.svc,
        "u1",
        upload_req(
            "c1",
            vec![entry(
                1,
                put("tickets", "t1", &[("title", title.as_str().into())]),
                1000,
                "c1",
            )],
        ),
    )
    .await
    .expect("upload");
    match &outcomes(&r)[0] {
        Outcome::Rejected { reason } => assert!(reason.contains("side write activity/"), "{reason}"),
        other => panic!("expected rejected: {other:?}"),
    }
    assert!(reader_rows(&e.svc, "u2").await.is_empty());
}

/// `n` tickets with a large description written at a late clock by one
/// client, then `n` stale edits of their titles by another: the answer to
/// those has `n` merged outcomes carrying the stored rows.
async fn merged_answer(options: ServiceOptions, n: u64, description: &str) -> UploadResponse {
    let e = env_with(options);
    let creates: Vec<CrudEntry> = (1..=n)
        .map(|i| {
            entry(
                i,
                put(
                    "tickets",
                    &format!("t{i}"),
                    &[("title", "new".into()), ("description", description.into())],
                ),
                9000,
                "c1",
            )
        })
        .collect();
    let r = try_upload(&e.svc, "u1", upload_req("c1", creates))
        .await
        .expect("creates");
    assert!(
        outcomes(&r).iter().all(|o| *o == Outcome::Applied),
        "{:?}",
        r.outcomes.first()
    );
    let stale: Vec<(u64, Vec<CrudEntry>)> = (1..=n)
        .map(|i| {
            (
                i,
                vec![entry(
                    i,
                    patch("tickets", &format!("t{i}"), &[("title", "old".into())]),
                    1000,
                    "c2",
                )],
            )
        })
        .collect();
    try_upload(&e.svc, "u2", upload_txs("c2", stale))
        .await
        .expect("stale edits")
}

#[tokio::test]
async fn an_upload_answer_fits_its_bound_with_an_outcome_for_every_op() {
    // 640 KiB of control characters: about 3.75 MiB of JSON per row, under
    // the default row bound; 20 of them would make a 75 MiB answer.
    let description = "\u{1}".repeat(640 * 1024);
    let options = ServiceOptions::default();
    let max = options.max_answer_bytes;
    let answer = merged_answer(options, 20, &description).await;
    let size = serde_json::to_vec(&answer).expect("encode").len();
    assert!(size <= max, "answer of {size} bytes, over {max}");
    assert!(size <= ferry_protocol::DEFAULT_MAX_LINE_BYTES);
    assert_eq!(
        answer.outcomes.iter().map(|o| o.seq).collect::<Vec<_>>(),
        (1..=20).collect::<Vec<_>>()
    );
    for o in &answer.outcomes {
        assert!(
            matches!(o.outcome, Outcome::Merged { .. }),
            "seq {}: {:?}",
            o.seq,
            o.outcome
        );
    }
}

#[tokio::test]
async fn the_answer_bound_holds_at_its_limit() {
    let description = "\u{1}".repeat(1000);
    let full = merged_answer(ServiceOptions::default(), 2, &description).await;
    let size = serde_json::to_vec(&full).expect("encode").len();
    assert!(full
        .outcomes
        .iter()
        .all(|o| matches!(o.outcome, Outcome::Merged { row: Some(_), .. })));
    // An answer exactly at the bound is sent whole.
    let at = merged_answer(
        ServiceOptions {
            max_answer_bytes: size,
            ..ServiceOptions::default()
        },
        2,
        &description,
    )
    .await;
    assert_eq!(serde_json::to_vec(&at).expect("encode").len(), size);
    assert_eq!(at.outcomes, full.outcomes);
    // One byte less: a row is left out, every op keeps its outcome.
    let under = merged_answer(
        ServiceOptions {
            max_answer_bytes: size - 1,
            ..ServiceOptions::default()
        },
        2,
        &description,
    )
    .await;
    assert!(serde_json::to_vec(&under).expect("encode").len() < size);
    assert_eq!(under.outcomes.len(), 2);
    let kept = under
        .outcomes
        .iter()
        .filter(|o| matches!(o.outcome, Outcome::Merged { row: Some(_), .. }))
        .count();
    assert_eq!(kept, 1);
}

#[test]
fn size_bounds_above_what_clients_take_are_refused_at_build() {
    let build = |options: ServiceOptions| {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = SqliteSourceDb::open_dir(dir.path()).expect("open db");
        SyncService::builder(Arc::new(db), SyncRules::ticket_tracker().expect("rules"), SECRET)
            .options(options)
            .build()
    };
    let line = ferry_protocol::DEFAULT_MAX_LINE_BYTES;
    let answer = |max_answer_bytes| ServiceOptions {
        max_answer_bytes,
        ..ServiceOptions::default()
    };
    let row = |max_row_encoded_bytes| ServiceOptions {
        max_row_encoded_bytes,
        ..ServiceOptions::default()
    };
    assert!(build(answer(line)).is_ok());
    let err = build(answer(line + 1)).expect_err("answer bound over the clients' limit");
    assert!(err.to_string().contains("max_answer_bytes"), "{err}");
    assert!(build(row(line / 2)).is_ok());
    let err = build(row(line / 2 + 1)).expect_err("row bound over half a line");
    assert!(err.to_string().contains("max_row_encoded_bytes"), "{err}");
}
