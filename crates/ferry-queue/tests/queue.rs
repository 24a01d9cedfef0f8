//! Local writes and the upload queue, on every backend.

mod common;

use common::{open, open_with_schema, ticket, Ticket, BACKENDS};
use ferry_core::{row_data, ColumnType, CrudOp, ErrorKind, Limits, RowData, Schema, Table, Value};
use ferry_queue::{LocalDb, LocalDbOptions, QueueError, ServerChanges};
use ferry_store::WriteBatch;

fn each_backend(test: impl Fn(&str, &dyn Fn() -> LocalDb)) {
    for backend in BACKENDS {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().to_path_buf();
        let reopen = move || LocalDb::open(open(backend, &path)).expect("open local db");
        test(backend, &reopen);
    }
}

fn title(t: &str) -> RowData {
    row_data([("title", Value::from(t)), ("status", Value::from("pending"))])
}

#[test]
fn one_write_changes_visible_state_and_queue_together() {
    each_backend(|backend, reopen| {
        let db = reopen();
        db.write(|tx| {
            tx.insert("tickets", "t1", title("first"))?;
            tx.insert("tickets", "t2", title("second"))?;
            tx.insert(
                "comments",
                "c1",
                row_data([("ticket_id", Value::from("t1")), ("body", Value::from("hi"))]),
            )?;
            Ok::<_, QueueError>(())
        })
        .expect("write");
        db.write(|tx| {
            assert!(tx.update(
                "tickets",
                "t1",
                row_data([("status", Value::from("done")), ("title", Value::from("first"))])
            )?);
            assert!(tx.delete("tickets", "t2")?);
            assert!(!tx.delete("tickets", "never")?);
            Ok::<_, QueueError>(())
        })
        .expect("write");

        assert_eq!(
            db.get("tickets", "t1").expect("get"),
            Some(row_data([
                ("title", Value::from("first")),
                ("status", Value::from("done"))
            ])),
            "{backend}"
        );
        assert_eq!(db.get("tickets", "t2").expect("get"), None, "{backend}");
        let ids: Vec<String> = db
            .scan("tickets")
            .expect("scan")
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert_eq!(ids, ["t1"], "{backend}");

        let batch = db.next_batch(100).expect("batch");
        let shape: Vec<(u64, u64, &str, &str)> = batch
            .iter()
            .map(|e| (e.seq, e.tx_id, e.op.kind_name(), e.op.id()))
            .collect();
        assert_eq!(
            shape,
            [
                (1, 1, "PUT", "t1"),
                (2, 1, "PUT", "t2"),
                (3, 1, "PUT", "c1"),
                (4, 2, "PATCH", "t1"),
                (5, 2, "DELETE", "t2")
            ],
            "{backend}"
        );
        // The patch holds only the column that changed.
        assert_eq!(
            batch[3].op,
            CrudOp::Patch {
                table: "tickets".into(),
                id: "t1".into(),
                data: row_data([("status", Value::from("done"))])
            },
            "{backend}"
        );
        assert_eq!(db.upload_queue_len(), 5, "{backend}");
    });
}

type BadOp = dyn Fn(&mut ferry_queue::WriteTx<'_>) -> Result<(), QueueError>;

#[test]
fn a_failed_transaction_writes_nothing() {
    let long_id = "x".repeat(300);
    let big = "y".repeat(2 * 1024 * 1024);
    // Each case: a valid insert first, then a bad op; expected error text.
    let cases: Vec<(&str, Box<BadOp>, &str)> = vec![
        (
            "unknown table",
            Box::new(|tx| tx.insert("nope", "a", RowData::new())),
            "unknown table \"nope\"",
        ),
        (
            "unknown column",
            Box::new(|tx| tx.insert("tickets", "a", row_data([("colour", Value::from("red"))]))),
            "unknown column \"colour\" in table \"tickets\"",
        ),
        (
            "wrong type",
            Box::new(|tx| tx.insert("tickets", "a", row_data([("version", Value::from("three"))]))),
            "column tickets.version is integer, got text value 'three'",
        ),
        (
            "wrong type in update",
            Box::new(|tx| {
                tx.update("tickets", "t0", row_data([("score", Value::from("high"))]))
                    .map(drop)
            }),
            "column tickets.score is real, got text value 'high'",
        ),
        (
            "empty id",
            Box::new(|tx| tx.insert("tickets", "", RowData::new())),
            "invalid row id \"\" for table \"tickets\": empty",
        ),
        (
            "long id",
            Box::new(move |tx| tx.insert("tickets", &long_id, RowData::new())),
            "longer than the id limit",
        ),
        (
            "oversized row",
            Box::new(move |tx| tx.insert("tickets", "big", row_data([("description", Value::from(big.as_str()))]))),
            "bytes, over the limit of 1048576 bytes",
        ),
        (
            "duplicate insert",
            Box::new(|tx| tx.insert("tickets", "t0", RowData::new())),
            "row tickets/t0 already exists",
        ),
        (
            "update of a missing row",
            Box::new(|tx| tx.update("tickets", "ghost", title("x")).map(drop)),
            "row tickets/ghost does not exist",
        ),
        (
            "update of an insert-only table",
            Box::new(|tx| {
                tx.update("events", "e", row_data([("kind", Value::from("x"))]))
                    .map(drop)
            }),
            "table \"events\" is insert-only: update is not allowed",
        ),
    ];
    each_backend(|backend, reopen| {
        let db = reopen();
        db.write(|tx| tx.insert("tickets", "t0", title("zero"))).expect("setup");
        let before_rows = db.scan("tickets").expect("scan");
        let before_queue = db.next_batch(100).expect("queue");
        for (name, bad, expected) in &cases {
            let err = db
                .write(|tx| {
                    tx.insert("tickets", "fine", title("fine"))?;
                    tx.update("tickets", "t0", title("changed"))?;
                    bad(tx)
                })
                .expect_err(name);
            assert!(err.to_string().contains(expected), "{backend} {name}: {err}");
            assert_eq!(err.kind(), ErrorKind::Permanent, "{backend} {name}");
            assert_eq!(db.scan("tickets").expect("scan"), before_rows, "{backend} {name}");
            assert_eq!(db.next_batch(100).expect("queue"), before_queue, "{backend} {name}");
        }
        // An app error aborts the transaction the same way.
        #[derive(Debug)]
        struct AppError;
        impl From<QueueError> for AppError {
            fn from(_: QueueError) -> Self {
                AppError
            }
        }
        let r: Result<(), AppError> = db.write(|tx| {
            tx.insert("tickets", "fine", title("fine"))?;
            Err(AppError)
        });
        assert!(r.is_err());
        assert_eq!(db.scan("tickets").expect("scan"), before_rows, "{backend}");
        // Sequence numbers are not consumed by failed transactions.
        db.write(|tx| tx.insert("tickets", "t9", title("nine"))).expect("write");
        let seqs: Vec<u64> = db.next_batch(100).expect("queue").iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [1, 2], "{backend}");
    });
}

#[test]
fn table_options_shape_what_is_queued_and_kept() {
    each_backend(|backend, reopen| {
        let db = reopen();
        db.write(|tx| {
            tx.insert("drafts", "d1", row_data([("body", Value::from("local"))]))?;
            tx.insert("events", "e1", row_data([("kind", Value::from("opened"))]))?;
            tx.insert("comments", "c1", row_data([("body", Value::from("v1"))]))?;
            Ok::<_, QueueError>(())
        })
        .expect("write");
        db.write(|tx| {
            tx.update("drafts", "d1", row_data([("body", Value::from("local 2"))]))?;
            tx.update("comments", "c1", row_data([("body", Value::from("v2"))]))?;
            tx.delete("comments", "c1")?;
            Ok::<_, QueueError>(())
        })
        .expect("write");
        // local_only: kept, never queued. insert_only: queued, not kept.
        assert_eq!(
            db.get("drafts", "d1").expect("get"),
            Some(row_data([("body", Value::from("local 2"))])),
            "{backend}"
        );
        assert_eq!(db.get("events", "e1").expect("get"), None, "{backend}");
        let entries = db.next_batch(100).expect("queue");
        let shape: Vec<(&str, &str)> = entries.iter().map(|e| (e.op.kind_name(), e.op.table())).collect();
        assert_eq!(
            shape,
            [
                ("PUT", "events"),
                ("PUT", "comments"),
                ("PATCH", "comments"),
                ("DELETE", "comments")
            ],
            "{backend}"
        );
        // comments track previous values: none on create, old values of the
        // changed column on patch, the whole row on delete. tickets do not.
        assert_eq!(entries[1].previous, None, "{backend}");
        assert_eq!(
            entries[2].previous,
            Some(row_data([("body", Value::from("v1"))])),
            "{backend}"
        );
        assert_eq!(
            entries[3].previous,
            Some(row_data([("body", Value::from("v2"))])),
            "{backend}"
        );
        assert_eq!(entries[0].previous, None, "{backend}");
        let err = db
            .write(|tx| tx.delete("events", "e1"))
            .expect_err("insert-only delete");
        assert_eq!(
            err.to_string(),
            "table \"events\" is insert-only: delete is not allowed"
        );
    });
}

#[test]
fn updates_that_change_nothing_queue_nothing_and_metadata_is_kept() {
    each_backend(|backend, reopen| {
        let db = reopen();
        db.write(|tx| {
            tx.set_metadata(Some("{\"by\":\"ann\"}".into()));
            tx.insert(
                "tickets",
                "t1",
                row_data([("title", Value::from("a")), ("score", Value::from(1))]),
            )
        })
        .expect("write");
        let changed = db
            .write(|tx| {
                tx.update(
                    "tickets",
                    "t1",
                    row_data([("title", Value::from("a")), ("score", Value::from(1.0))]),
                )
            })
            .expect("write");
        assert!(!changed, "{backend}");
        let entries = db.next_batch(10).expect("queue");
        assert_eq!(entries.len(), 1, "{backend}");
        assert_eq!(entries[0].metadata.as_deref(), Some("{\"by\":\"ann\"}"), "{backend}");
        // Integers given for real columns are stored as reals.
        assert!(matches!(
            db.get("tickets", "t1").expect("get").expect("row")["score"],
            Value::Real(_)
        ));
    });
}

#[test]
fn records_round_trip_as_the_apps_own_structs() {
    each_backend(|backend, reopen| {
        let db = reopen();
        let mut t = ticket("t1", "Printer on fire");
        t.description = Some("third floor".into());
        db.write(|tx| tx.insert_record(&t)).expect("insert");
        assert_eq!(
            db.get_record::<Ticket>("t1").expect("get"),
            Some(t.clone()),
            "{backend}"
        );
        let mut t2 = t.clone();
        t2.status = "done".into();
        t2.version = 2;
        db.write(|tx| tx.update_record(&t2)).expect("update");
        assert_eq!(db.scan_records::<Ticket>().expect("scan"), vec![t2], "{backend}");
        let last = db.next_batch(10).expect("queue").pop().expect("entry");
        assert_eq!(
            last.op,
            CrudOp::Patch {
                table: "tickets".into(),
                id: "t1".into(),
                data: row_data([("status", Value::from("done")), ("version", Value::from(2))]),
            },
            "{backend}"
        );
    });
}

#[test]
fn queue_reads_transactions_and_batches_and_survives_restarts() {
    each_backend(|backend, reopen| {
        {
            let db = reopen();
            for tx_no in 0..4 {
                db.write(|tx| {
                    for i in 0..3 {
                        tx.insert("tickets", &format!("t{tx_no}-{i}"), title("x"))?;
                    }
                    Ok::<_, QueueError>(())
                })
                .expect("write");
            }
        }
        let db = reopen();
        assert_eq!(db.upload_queue_len(), 12, "{backend}");
        let first = db.next_transaction().expect("tx").expect("some");
        assert_eq!(first.tx_id, 1);
        assert_eq!(
            first.entries.iter().map(|e| e.seq).collect::<Vec<_>>(),
            [1, 2, 3],
            "{backend}"
        );
        assert_eq!(
            db.next_batch(5)
                .expect("batch")
                .iter()
                .map(|e| e.seq)
                .collect::<Vec<_>>(),
            [1, 2, 3, 4, 5]
        );
        db.complete(3).expect("complete");
        assert_eq!(db.upload_queue_len(), 9, "{backend}");
        assert_eq!(db.next_transaction().expect("tx").expect("some").tx_id, 2, "{backend}");
        // Completed entries still shape the visible state until confirmed.
        assert!(db.get("tickets", "t0-0").expect("get").is_some(), "{backend}");
        assert_eq!(db.pending_len().expect("len"), 12, "{backend}");
        assert!(
            matches!(db.complete(99), Err(QueueError::InvalidSeq { .. })),
            "{backend}"
        );
        drop(db);

        let db = reopen();
        assert_eq!(db.completed_through(), 3, "{backend}");
        assert_eq!(db.upload_queue_len(), 9, "{backend}");
        db.complete(12).expect("complete");
        assert_eq!(db.upload_queue_len(), 0, "{backend}");
        assert_eq!(db.next_transaction().expect("tx"), None, "{backend}");
        db.confirm_through(12).expect("confirm");
        assert_eq!(db.pending_len().expect("len"), 0, "{backend}");
        drop(db);

        // Seqs are never reused, even after the queue emptied and a restart.
        let db = reopen();
        db.write(|tx| tx.insert("tickets", "late", title("late")))
            .expect("write");
        let e = db.next_transaction().expect("tx").expect("some");
        assert_eq!((e.tx_id, e.entries[0].seq), (5, 13), "{backend}");
    });
}

/// A later app version whose schema drops a column and a table, opened
/// on the store of the earlier one: rows written with the dropped column
/// can still be updated, and writes to the dropped table still pending
/// are answered and confirmed instead of wedging the queue.
#[test]
fn a_later_app_version_without_a_column_or_a_table_keeps_working() {
    let later = Schema::new([Table::new("tickets")
        .column("title", ColumnType::Text)
        .column("status", ColumnType::Text)
        .column("version", ColumnType::Integer)
        .column("score", ColumnType::Real)
        .index("by_status", &["status"])])
    .expect("schema");
    for backend in BACKENDS {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let db = LocalDb::open(open(backend, dir.path())).expect("open");
            db.write(|tx| {
                tx.insert(
                    "tickets",
                    "t1",
                    row_data([("title", Value::from("a")), ("description", Value::from("old"))]),
                )?;
                tx.insert("comments", "c1", row_data([("body", Value::from("hi"))]))
            })
            .expect("write");
        }
        let db = LocalDb::open(open_with_schema(backend, dir.path(), later.clone())).expect("reopen");
        let updated = db.write(|tx| tx.update("tickets", "t1", row_data([("title", Value::from("b"))])));
        assert!(matches!(updated, Ok(true)), "{backend}: {updated:?}");
        assert_eq!(
            db.get("tickets", "t1").expect("get"),
            Some(row_data([("title", Value::from("b"))])),
            "{backend}"
        );
        let last = db.last_seq();
        db.complete(last).expect("complete");
        db.confirm_through(last).expect("confirm");
        assert_eq!(db.pending_len().expect("len"), 0, "{backend}");
    }
}

#[test]
fn confirming_rebases_remaining_writes_on_the_synced_layer() {
    each_backend(|backend, reopen| {
        let db = reopen();
        db.write(|tx| {
            tx.insert(
                "tickets",
                "t1",
                row_data([("title", Value::from("mine")), ("status", Value::from("pending"))]),
            )
        })
        .expect("write");
        db.write(|tx| tx.update("tickets", "t1", row_data([("status", Value::from("done"))])))
            .expect("write");
        db.write(|tx| tx.insert("tickets", "t2", title("two"))).expect("write");
        db.complete(1).expect("complete");
        // The server applied seq 1 and someone else changed the title.
        let mut server = WriteBatch::new();
        server.put_synced(
            "tickets",
            "t1",
            row_data([
                ("title", Value::from("theirs")),
                ("status", Value::from("pending")),
                ("version", Value::from(2)),
            ]),
        );
        db.store().apply(server).expect("apply synced");
        db.confirm_through(1).expect("confirm");
        // Pending PATCH (seq 2) replays on the new synced row.
        assert_eq!(
            db.get("tickets", "t1").expect("get"),
            Some(row_data([
                ("title", Value::from("theirs")),
                ("status", Value::from("done")),
                ("version", Value::from(2))
            ])),
            "{backend}"
        );
        assert_eq!(db.pending_len().expect("len"), 2, "{backend}");
        db.complete(3).expect("complete");
        db.confirm_through(3).expect("confirm");
        // No pending writes left: the synced layer shows through (t2 was
        // never synced, so it is gone until a checkpoint brings it).
        assert_eq!(
            db.get("tickets", "t1")
                .expect("get")
                .and_then(|r| r.get("status").cloned()),
            Some(Value::from("pending")),
            "{backend}"
        );
        assert_eq!(db.get("tickets", "t2").expect("get"), None, "{backend}");
        assert!(matches!(db.confirm_through(9), Err(QueueError::InvalidSeq { .. })));
    });
}

#[test]
fn limits_bound_transactions_and_the_queue() {
    for backend in BACKENDS {
        let dir = tempfile::tempdir().expect("tempdir");
        let limits = Limits {
            max_ops_per_transaction: 3,
            max_queue_entries: 5,
            ..Limits::default()
        };
        let options = LocalDbOptions {
            limits,
            ..LocalDbOptions::default()
        };
        let db = LocalDb::open_with(open(backend, dir.path()), options).expect("open");
        let err = db
            .write(|tx| {
                for i in 0..4 {
                    tx.insert("tickets", &format!("t{i}"), title("x"))?;
                }
                Ok::<_, QueueError>(())
            })
            .expect_err("too many ops");
        assert_eq!(err.to_string(), "transaction has 4 operations, over the limit of 3");
        for i in 0..5 {
            db.write(|tx| tx.insert("tickets", &format!("t{i}"), title("x")))
                .expect("write");
        }
        let err = db
            .write(|tx| tx.insert("tickets", "t5", title("x")))
            .expect_err("queue full");
        assert_eq!(err.kind(), ErrorKind::Transient, "{backend}");
        assert_eq!(err.to_string(), "upload queue holds 5 entries, the limit is 5");
        assert_eq!(db.scan("tickets").expect("scan").len(), 5, "{backend}");
        // Local-only writes never touch the queue, so they still go through.
        db.write(|tx| tx.insert("drafts", "d", row_data([("body", Value::from("x"))])))
            .expect("local write");
    }
}

#[test]
fn rejected_writes_roll_back_at_once_and_are_logged() {
    each_backend(|backend, reopen| {
        let db = reopen();
        let mut server = ServerChanges::new();
        server.put_row("tickets", "t1", title("synced"));
        db.apply_server_changes(server, None).expect("sync");
        db.write(|tx| tx.update("tickets", "t1", row_data([("title", Value::from("mine"))])))
            .expect("write");
        db.write(|tx| tx.update("tickets", "t1", row_data([("status", Value::from("done"))])))
            .expect("write");
        db.write(|tx| tx.insert("tickets", "t2", title("new"))).expect("write");
        db.complete(3).expect("complete");
        db.reject(&[(1, "title is locked".into()), (3, "no new tickets".into())], 42)
            .expect("reject");
        // seq 2 (status) still applies on the synced row; seq 1 and 3 are gone.
        assert_eq!(
            db.get("tickets", "t1").expect("get"),
            Some(row_data([
                ("title", Value::from("synced")),
                ("status", Value::from("done"))
            ])),
            "{backend}"
        );
        assert_eq!(db.get("tickets", "t2").expect("get"), None, "{backend}");
        let log = db.rejections().expect("log");
        let shape: Vec<(u64, &str, u64)> = log.iter().map(|r| (r.entry.seq, r.reason.as_str(), r.at_ms)).collect();
        assert_eq!(
            shape,
            [(1, "title is locked", 42), (3, "no new tickets", 42)],
            "{backend}"
        );
        // Survives a restart, and a later checkpoint confirming everything
        // leaves the synced state.
        drop(db);
        let db = reopen();
        assert_eq!(db.rejections().expect("log").len(), 2, "{backend}");
        let mut server = ServerChanges::new();
        server.put_row(
            "tickets",
            "t1",
            row_data([("title", Value::from("synced")), ("status", Value::from("done"))]),
        );
        db.apply_server_changes(server, Some(3)).expect("checkpoint");
        assert_eq!(db.pending_len().expect("len"), 0, "{backend}");
        assert_eq!(db.scan("tickets").expect("scan").len(), 1, "{backend}");
        db.clear_rejections().expect("clear");
        assert!(db.rejections().expect("log").is_empty(), "{backend}");
    });
}

#[test]
fn checkpoints_rebase_pending_writes_without_flicker() {
    each_backend(|backend, reopen| {
        let db = reopen();
        db.write(|tx| tx.insert("tickets", "t1", title("mine"))).expect("write");
        db.write(|tx| tx.update("tickets", "t1", row_data([("status", Value::from("done"))])))
            .expect("write");
        // A checkpoint that does not yet include our writes (write
        // checkpoint absent) but changes the row on the server: pending
        // writes replay on top, so the UI keeps showing them.
        let mut server = ServerChanges::new();
        server.put_row(
            "tickets",
            "t1",
            row_data([("title", Value::from("server")), ("version", Value::from(7))]),
        );
        db.apply_server_changes(server, None).expect("checkpoint");
        assert_eq!(
            db.get("tickets", "t1").expect("get"),
            Some(row_data([
                ("title", Value::from("mine")),
                ("status", Value::from("done")),
            ])),
            "{backend}: the PUT replays whole, then the PATCH"
        );
        // The next checkpoint covers both seqs, but only seq 1's upload was
        // answered: seq 2 stays pending (its outcome has not reached the
        // app) and still replays.
        db.complete(1).expect("complete");
        let mut server = ServerChanges::new();
        server.put_row(
            "tickets",
            "t1",
            row_data([("title", Value::from("mine")), ("status", Value::from("pending"))]),
        );
        db.apply_server_changes(server, Some(2)).expect("checkpoint");
        assert_eq!(db.pending_len().expect("len"), 1, "{backend}");
        assert_eq!(db.upload_queue_len(), 1, "{backend}");
        assert_eq!(
            db.get("tickets", "t1")
                .expect("get")
                .and_then(|r| r.get("status").cloned()),
            Some(Value::from("done")),
            "{backend}"
        );
    });
}

#[test]
fn a_pre_commit_check_can_refuse_the_whole_transaction() {
    each_backend(|backend, reopen| {
        let db = reopen();
        db.write(|tx| tx.insert("tickets", "t1", title("first"))).expect("seed");
        let queued = db.pending_len().expect("pending");
        // The check sees every queued op and the rows before the write.
        let err = db
            .write_checked(
                |tx| {
                    tx.insert("tickets", "t2", title("second"))?;
                    tx.update("tickets", "t1", row_data([("title", Value::from("renamed"))]))?;
                    Ok::<_, QueueError>(())
                },
                |tx| {
                    let ops: Vec<&CrudOp> = tx.ops().collect();
                    assert_eq!(ops.len(), 2, "{backend}");
                    assert_eq!(
                        tx.get_committed("tickets", "t1")?.and_then(|r| r.get("title").cloned()),
                        Some(Value::from("first"))
                    );
                    assert_eq!(tx.get_committed("tickets", "t2")?, None);
                    match ops.iter().find(|op| matches!(op, CrudOp::Patch { .. })) {
                        Some(op) => Err(QueueError::Refused {
                            reason: format!("no renames: {}/{}", op.table(), op.id()),
                        }),
                        None => Ok(()),
                    }
                },
            )
            .expect_err("refused");
        assert_eq!(err.to_string(), "no renames: tickets/t1", "{backend}");
        assert_eq!(err.kind(), ErrorKind::Permanent);
        // Nothing of the refused transaction was written.
        assert_eq!(db.get("tickets", "t2").expect("get"), None, "{backend}");
        assert_eq!(
            db.get("tickets", "t1")
                .expect("get")
                .and_then(|r| r.get("title").cloned()),
            Some(Value::from("first"))
        );
        assert_eq!(db.pending_len().expect("pending"), queued, "{backend}");
        // A transaction the check accepts commits as usual.
        db.write_checked(|tx| tx.insert("tickets", "t3", title("third")), |_tx| Ok(()))
            .expect("accepted");
        assert!(db.get("tickets", "t3").expect("get").is_some(), "{backend}");
    });
}

/// A local write keeps its clock only in its queue entries (no metadata
/// row per write): a restart with a clock far behind still stamps later
/// writes after every earlier one, with entries pending, answered, or all
/// confirmed and gone.
#[test]
fn a_restart_with_a_lagging_clock_never_stamps_a_write_before_an_earlier_one() {
    use ferry_core::ManualClock;
    use std::sync::Arc;
    each_backend(|backend, _| {
        let dir = tempfile::tempdir().expect("tempdir");
        let open_at = |now_ms: u64| {
            LocalDb::open_with(
                open(backend, dir.path()),
                LocalDbOptions {
                    clock: Arc::new(ManualClock::new(now_ms)),
                    ..LocalDbOptions::default()
                },
            )
            .expect("open")
        };
        let last_stamp = |db: &LocalDb| {
            db.next_batch(usize::MAX)
                .expect("batch")
                .last()
                .and_then(|e| e.hlc.clone())
                .expect("a stamped entry")
        };
        let db = open_at(1_000_000);
        for i in 0..3 {
            db.write(|tx| tx.insert("tickets", &format!("a{i}"), title("a")))
                .expect("write");
        }
        let before = last_stamp(&db);
        drop(db);

        // Pending entries only.
        let db = open_at(5);
        db.write(|tx| tx.insert("tickets", "b", title("b"))).expect("write");
        let after = last_stamp(&db);
        assert!(after > before, "{backend}: {after:?} after {before:?}");
        assert_eq!(db.last_seq(), 4, "{backend}");

        // Every entry answered and confirmed: the queue is empty.
        db.complete(4).expect("complete");
        db.confirm_through(4).expect("confirm");
        assert_eq!(db.pending_len().expect("len"), 0, "{backend}");
        drop(db);
        let db = open_at(5);
        db.write(|tx| tx.insert("tickets", "c", title("c"))).expect("write");
        let latest = last_stamp(&db);
        assert!(latest > after, "{backend}: {latest:?} after {after:?}");
        let e = db.next_transaction().expect("tx").expect("some");
        assert_eq!((e.tx_id, e.entries[0].seq), (5, 5), "{backend}");
    });
}

#[test]
fn index_scans_equal_the_stores_own_through_writes_checkpoints_and_reopens() {
    use std::ops::Bound;
    each_backend(|backend, reopen| {
        let status = |s: &str| row_data([("title", Value::from("x")), ("status", Value::from(s))]);
        // Synced rows, then pending writes over some of them and new ones.
        let mut changes = ServerChanges::new();
        for i in 0..20 {
            changes.put_row("tickets", format!("t{i:02}"), status(["a", "b", "c"][i % 3]));
        }
        let db = reopen();
        db.apply_server_changes(changes, None).expect("checkpoint");
        let check = |db: &LocalDb, when: &str| {
            for (lower, upper) in [
                (Bound::Unbounded, Bound::Unbounded),
                (
                    Bound::Included(vec![Value::from("b")]),
                    Bound::Included(vec![Value::from("b")]),
                ),
                (Bound::Excluded(vec![Value::from("a")]), Bound::Unbounded),
            ] {
                for reverse in [false, true] {
                    for limit in [0, 1, 2, 5, 40, usize::MAX] {
                        let ours = db
                            .scan_index_limited("tickets", "by_status", lower.clone(), upper.clone(), reverse, limit)
                            .expect("scan");
                        let stores = db
                            .store()
                            .scan_visible_index_limited(
                                "tickets",
                                "by_status",
                                lower.clone(),
                                upper.clone(),
                                reverse,
                                limit,
                            )
                            .expect("store scan");
                        assert_eq!(
                            ours, stores,
                            "{backend} {when}: {lower:?}..{upper:?} reverse {reverse} limit {limit}"
                        );
                    }
                }
            }
            let ids = ["t00", "t05", "n1", "nope"];
            let pending = db.pending_among("tickets", ids).expect("pending");
            let overlay: Vec<bool> = ids
                .iter()
                .map(|id| db.store().get_overlay("tickets", id).expect("overlay").is_some())
                .collect();
            assert_eq!(pending, overlay, "{backend} {when}");
        };
        check(&db, "synced only");
        db.write(|tx| {
            tx.update("tickets", "t00", status("b"))?;
            tx.update("tickets", "t04", status("a"))?;
            tx.delete("tickets", "t05")?;
            tx.insert("tickets", "n1", status("b"))?;
            tx.insert("tickets", "n2", status("c"))
        })
        .expect("write");
        check(&db, "pending writes");
        db.write(|tx| {
            tx.update("tickets", "n1", status("c"))?;
            tx.update("tickets", "t00", status("a"))
        })
        .expect("write again");
        check(&db, "pending rewritten");
        // The server confirms some writes and moves rows under the others.
        let mut changes = ServerChanges::new();
        changes.put_row("tickets", "t04", status("c"));
        changes.delete_row("tickets", "t06");
        db.apply_server_changes(changes, None).expect("checkpoint");
        check(&db, "after a checkpoint");
        // The upload's answer rejects the first write (rolled back at
        // once), then a checkpoint confirms the rest.
        let first = db.completed_through() + 1;
        db.answer(&ferry_queue::Answer {
            through_seq: db.last_seq(),
            rejected: vec![(first, "refused".to_owned())],
            ..ferry_queue::Answer::default()
        })
        .expect("answer");
        check(&db, "after a rejection");
        db.apply_server_changes(ServerChanges::new(), Some(db.completed_through()))
            .expect("confirm");
        check(&db, "after confirmation");
        drop(db);
        let db = reopen();
        check(&db, "reopened");
    });
}
