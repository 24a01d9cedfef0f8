//! The seed inputs of every fuzz target, made by the real encoders.
//!
//! `seeds_pass_their_targets` runs on every `cargo test`. To (re)write the
//! seed files under `fuzz/corpus/<target>/seed-*`:
//!
//! ```text
//! cargo test -p ferry-fuzz --test seeds -- --ignored write_seed_corpus
//! ```

use std::path::PathBuf;

use ferry_conflict::crdt::{edit_text, new_text_doc};
use ferry_core::codec::{encode_entry, encode_row};
use ferry_core::{row_data, CrudEntry, CrudOp, HlcTimestamp, RowData, Value};
use ferry_protocol::{
    encode_line, BucketChecksum, BucketRequest, Checkpoint, CheckpointDiff, DataBatch, ErrorCode, OpKind, OpOutcome,
    OplogEntry, Outcome, ServerError, StreamLine, StreamRequest, UploadRequest, UploadResponse, UploadTransaction,
};
use ferry_server::TICKET_TRACKER_RULES;

fn hlc(wall_ms: u64, counter: u32, node: &str) -> HlcTimestamp {
    HlcTimestamp {
        wall_ms,
        counter,
        node: node.to_owned(),
    }
}

/// A row with every kind of value.
fn every_value() -> RowData {
    row_data([
        ("n", Value::Null),
        ("i", Value::Integer(-42)),
        ("big", Value::Integer(i64::MAX)),
        ("r", Value::Real(2.5)),
        ("neg_zero", Value::Real(-0.0)),
        ("tiny", Value::Real(5e-324)),
        ("misparsed", Value::Real(5e-146)),
        ("t", Value::from("héllo\n\"x\"")),
        ("b", Value::Blob(vec![0, 1, 255])),
    ])
}

fn entries() -> Vec<CrudEntry> {
    vec![
        CrudEntry {
            seq: 1,
            tx_id: 1,
            op: CrudOp::Put {
                table: "tickets".into(),
                id: "t1".into(),
                data: every_value(),
            },
            previous: None,
            metadata: None,
            hlc: Some(hlc(1_700_000_000_000, 0, "client-a")),
        },
        CrudEntry {
            seq: 300,
            tx_id: 2,
            op: CrudOp::Patch {
                table: "tickets".into(),
                id: "t1".into(),
                data: row_data([("status", Value::from("done"))]),
            },
            previous: Some(row_data([("status", Value::from("pending"))])),
            metadata: Some("{\"who\":\"ann\"}".into()),
            hlc: Some(hlc(1_700_000_000_001, 7, "client-a")),
        },
        CrudEntry {
            seq: 301,
            tx_id: 3,
            op: CrudOp::Delete {
                table: "comments".into(),
                id: "c9".into(),
            },
            previous: None,
            metadata: None,
            hlc: None,
        },
    ]
}

fn stream_lines() -> Vec<(&'static str, StreamLine)> {
    let buckets = vec![
        BucketChecksum {
            bucket: "global[]".into(),
            checksum: 0xdead_beef,
            count: 3,
        },
        BucketChecksum {
            bucket: "my_assignments[\"u1\"]".into(),
            checksum: 1,
            count: 1,
        },
    ];
    let op = |op_id, op, data: Option<RowData>| OplogEntry {
        op_id,
        op,
        object_type: (op == OpKind::Put || op == OpKind::Remove).then(|| "tickets".to_owned()),
        object_id: (op == OpKind::Put || op == OpKind::Remove).then(|| format!("t{op_id}")),
        data,
        checksum: u32::try_from(op_id).unwrap_or(0).wrapping_mul(2_654_435_761),
    };
    vec![
        (
            "checkpoint",
            StreamLine::Checkpoint(Checkpoint {
                last_op_id: 9,
                write_checkpoint: Some(4),
                buckets: buckets.clone(),
                hlc: Some(hlc(1_700_000_000_000, 2, "server")),
            }),
        ),
        (
            "checkpoint-diff",
            StreamLine::CheckpointDiff(CheckpointDiff {
                last_op_id: 12,
                write_checkpoint: None,
                updated_buckets: buckets[..1].to_vec(),
                removed_buckets: vec!["old[]".into()],
                hlc: None,
            }),
        ),
        (
            "data",
            StreamLine::Data(DataBatch {
                bucket: "global[]".into(),
                ops: vec![
                    op(1, OpKind::Clear, None),
                    op(2, OpKind::Move, None),
                    op(3, OpKind::Put, Some(every_value())),
                    op(4, OpKind::Remove, None),
                ],
            }),
        ),
        ("checkpoint-complete", StreamLine::CheckpointComplete { last_op_id: 12 }),
        (
            "keepalive",
            StreamLine::Keepalive {
                token_expires_in_s: 3600,
            },
        ),
        (
            "error",
            StreamLine::Error(ServerError {
                code: ErrorCode::ShuttingDown,
                message: "the server is shutting down".into(),
            }),
        ),
    ]
}

const RULES_WITH_STRATEGIES: &str = r#"
[[tables]]
name = "notes"
per_op_outcomes = true
columns = [{ name = "body", type = "blob" }, { name = "title", type = "text" }, { name = "owner", type = "text" }]
indexes = [{ name = "by_owner", columns = ["owner"] }]

[[tables]]
name = "tickets"
track_previous_values = true
columns = [{ name = "status", type = "text" }, { name = "rank", type = "real" }]

[[buckets]]
name = "mine"
parameters = ["sub"]
data = [{ table = "notes", where = { owner = "sub" } }]

[[buckets]]
name = "all"
data = [{ table = "tickets" }]

[[strategies]]
table = "notes"
kind = "crdt"
columns = ["body"]
fallback = { kind = "row_lww" }

[[strategies]]
table = "tickets"
kind = "domain"
audit = true
rules = [
  { kind = "deny_transition", column = "status", from_server = ["done"], unless_base = ["done"] },
  { kind = "immutable", column = "rank" },
]
"#;

/// Every seed: (target, name, bytes).
fn seeds() -> Vec<(&'static str, String, Vec<u8>)> {
    let mut out = Vec::new();
    let lines = stream_lines();
    let mut whole_stream = Vec::new();
    for (name, line) in &lines {
        let bytes = encode_line(line);
        whole_stream.extend_from_slice(&bytes);
        out.push(("stream_line", (*name).to_owned(), bytes));
    }
    // A stream of every line, with an empty line and an unfinished one.
    whole_stream.extend_from_slice(b"\n{\"keepalive\":{\"token_expires_in_s\"");
    out.push(("stream_line", "stream".to_owned(), whole_stream));

    let request = UploadRequest {
        client_id: "client-a".into(),
        transactions: vec![
            UploadTransaction {
                tx_id: 1,
                ops: entries()[..1].to_vec(),
            },
            UploadTransaction {
                tx_id: 2,
                ops: entries()[1..].to_vec(),
            },
        ],
    };
    out.push(("upload", "request".to_owned(), encode_line(&request)));
    let response = UploadResponse {
        outcomes: vec![
            OpOutcome {
                seq: 1,
                outcome: Outcome::Applied,
            },
            OpOutcome {
                seq: 2,
                outcome: Outcome::Merged {
                    row: Some(every_value()),
                    reason: "merged concurrent edits".into(),
                },
            },
            OpOutcome {
                seq: 3,
                outcome: Outcome::Rejected {
                    reason: "column tickets.nope is unknown".into(),
                },
            },
            OpOutcome {
                seq: 4,
                outcome: Outcome::NeedsReview {
                    conflict_id: "client-a:4:title".into(),
                },
            },
        ],
        write_checkpoint: 4,
        hlc: Some(hlc(1_700_000_000_005, 1, "server")),
    };
    out.push(("upload", "response".to_owned(), encode_line(&response)));
    let stream_request = StreamRequest {
        client_id: "client-a".into(),
        buckets: vec![BucketRequest {
            name: "global[]".into(),
            after_op_id: 9,
        }],
    };
    out.push(("upload", "stream-request".to_owned(), encode_line(&stream_request)));

    out.push(("row_codec", "empty".to_owned(), encode_row(&RowData::new())));
    out.push(("row_codec", "every-value".to_owned(), encode_row(&every_value())));
    for (i, e) in entries().iter().enumerate() {
        out.push(("entry_codec", format!("entry-{i}"), encode_entry(e)));
    }

    // index_key reads: column type, tuple length - 1, the values of two
    // tuples (a tag byte, 0 mod 5 meaning NULL, then the value), two ids.
    let int = |i: i64| [&[1u8][..], &i.to_le_bytes()].concat();
    let real = |r: f64| [&[1u8][..], &r.to_le_bytes()].concat();
    let text = |s: &[u8]| [&[1u8, u8::try_from(s.len()).unwrap_or(0)][..], s].concat();
    let id = |s: &[u8]| [&[u8::try_from(s.len()).unwrap_or(0)][..], s].concat();
    let key = |ty: u8, values: &[Vec<u8>], ids: [&[u8]; 2]| {
        let mut k = vec![ty, u8::try_from(values.len() / 2 - 1).unwrap_or(0)];
        for v in values {
            k.extend_from_slice(v);
        }
        k.extend(id(ids[0]));
        k.extend(id(ids[1]));
        k
    };
    out.push((
        "index_key",
        "integers".to_owned(),
        key(0, &[int(-1), int(i64::MAX)], [b"a", b"b"]),
    ));
    out.push((
        "index_key",
        "reals".to_owned(),
        key(1, &[real(-0.0), real(f64::NAN), real(0.0), real(-1.5)], [b"x", b""]),
    ));
    out.push((
        "index_key",
        "text-with-nul".to_owned(),
        key(2, &[text(b"a\0"), vec![0], text(b"a"), text(b"")], [b"\0", b"\xff"]),
    ));
    out.push((
        "index_key",
        "blobs".to_owned(),
        key(3, &[text(&[0, 1]), text(&[0])], [b"i", b"i"]),
    ));

    out.push((
        "sync_rules",
        "ticket-tracker".to_owned(),
        TICKET_TRACKER_RULES.as_bytes().to_vec(),
    ));
    out.push((
        "sync_rules",
        "strategies".to_owned(),
        RULES_WITH_STRATEGIES.as_bytes().to_vec(),
    ));
    // Columns added to a declared table, as the tracker's CRDT rules do.
    out.push((
        "sync_rules",
        "add-columns".to_owned(),
        format!(
            "{TICKET_TRACKER_RULES}\n[[add_columns]]\ntable = \"tickets\"\ncolumns = [{{ name = \"description_doc\", type = \"blob\" }}]\n\n[[strategies]]\ntable = \"tickets\"\nkind = \"crdt\"\ncolumns = [\"description_doc\"]\n"
        )
        .into_bytes(),
    ));

    let doc = new_text_doc("hello");
    let alice = edit_text(&doc, "alice", |e| {
        e.push(" world");
    })
    .expect("alice edits");
    let bob = edit_text(&doc, "bob", |e| {
        e.splice(0, 1, "J");
    })
    .expect("bob edits");
    out.push(("crdt", "doc-and-edit".to_owned(), ferry_fuzz::crdt_input(&doc, &alice)));
    out.push((
        "crdt",
        "concurrent-edits".to_owned(),
        ferry_fuzz::crdt_input(&alice, &bob),
    ));
    out.push(("crdt", "new-doc".to_owned(), ferry_fuzz::crdt_input(&[], &doc)));
    out.push(("crdt", "same-doc".to_owned(), ferry_fuzz::crdt_input(&bob, &bob)));
    out
}

#[test]
fn seeds_pass_their_targets() {
    for (target, name, bytes) in seeds() {
        let f = ferry_fuzz::target(target).expect("seed of a known target");
        f(&bytes);
        let _ = name;
    }
}

#[test]
fn seeds_decode() {
    use ferry_protocol::decode_line;
    for (target, name, bytes) in seeds() {
        let ok = match target {
            "stream_line" if name == "stream" => true,
            "stream_line" => decode_line::<StreamLine>(&bytes, usize::MAX).is_ok(),
            "upload" => {
                decode_line::<UploadRequest>(&bytes, usize::MAX).is_ok()
                    || decode_line::<UploadResponse>(&bytes, usize::MAX).is_ok()
                    || decode_line::<StreamRequest>(&bytes, usize::MAX).is_ok()
            }
            "row_codec" => ferry_core::codec::decode_row(&bytes).is_ok(),
            "entry_codec" => ferry_core::codec::decode_entry(&bytes).is_ok(),
            "sync_rules" => ferry_server::SyncRules::from_toml(std::str::from_utf8(&bytes).expect("utf-8")).is_ok(),
            "crdt" => {
                let b = &bytes[2 + usize::from(u16::from_le_bytes([bytes[0], bytes[1]]))..];
                ferry_conflict::crdt::read_text(b).is_ok()
            }
            _ => true,
        };
        assert!(ok, "seed {target}/{name} does not decode");
    }
}

#[test]
#[ignore = "writes fuzz/corpus/*/seed-*; run by hand after changing an encoder"]
fn write_seed_corpus() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus");
    for (target, name, bytes) in seeds() {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir).expect("create corpus dir");
        std::fs::write(dir.join(format!("seed-{name}")), bytes).expect("write seed");
    }
}
