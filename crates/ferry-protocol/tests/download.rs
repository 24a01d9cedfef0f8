//! The client download state machine, through its public API.

mod common;

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use common::{clear, mv, put, remove, Rows, ServerBucket, ROWS, TABLES};
use ferry_core::testkit::check;
use ferry_protocol::download::checksum_of;
use ferry_protocol::{
    AppliedBucket, BucketChecksum, BucketRequest, Checkpoint, CheckpointApply, CheckpointDiff, DataBatch, Download,
    DownloadLimits, ErrorCode, OpKind, OplogEntry, ProtocolError, ServerError, StagedSummary, Step, StreamLine,
};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

// ---- line builders ----

fn bc(bucket: &str, ops: &[OplogEntry]) -> BucketChecksum {
    BucketChecksum {
        bucket: bucket.to_owned(),
        checksum: checksum_of(ops),
        count: ops.len() as u64,
    }
}

fn checkpoint(last_op_id: u64, write_checkpoint: Option<u64>, buckets: Vec<BucketChecksum>) -> StreamLine {
    StreamLine::Checkpoint(Checkpoint {
        hlc: None,
        last_op_id,
        write_checkpoint,
        buckets,
    })
}

fn data(bucket: &str, ops: &[OplogEntry]) -> StreamLine {
    StreamLine::Data(DataBatch {
        bucket: bucket.to_owned(),
        ops: ops.to_vec(),
    })
}

fn complete(last_op_id: u64) -> StreamLine {
    StreamLine::CheckpointComplete { last_op_id }
}

fn state(ops: &[OplogEntry]) -> AppliedBucket {
    AppliedBucket {
        last_op_id: ops.iter().map(|o| o.op_id).max().unwrap_or(0),
        checksum: checksum_of(ops),
        count: ops.len() as u64,
    }
}

fn req(name: &str, after_op_id: u64) -> BucketRequest {
    BucketRequest {
        name: name.to_owned(),
        after_op_id,
    }
}

fn feed(d: &mut Download, lines: Vec<StreamLine>) -> Step {
    let mut last = Step::Continue;
    for line in lines {
        last = d.handle(line).expect("line accepted");
    }
    last
}

fn expect_apply(step: Step) -> CheckpointApply {
    match step {
        Step::Apply(a) => a,
        other => panic!("expected Apply, got {other:?}"),
    }
}

fn bucket<'a>(apply: &'a CheckpointApply, name: &str) -> &'a ferry_protocol::BucketApply {
    apply
        .buckets
        .iter()
        .find(|b| b.bucket == name)
        .unwrap_or_else(|| panic!("bucket {name} in the apply"))
}

/// Two buckets: a = ops 1, 3, 4; b = ops 2, 5.
fn two_buckets() -> (Vec<OplogEntry>, Vec<OplogEntry>) {
    let a = vec![
        put(1, "todos", "t1", 1),
        put(3, "todos", "t2", 2),
        remove(4, "todos", "t1"),
    ];
    let b = vec![put(2, "lists", "l1", 1), put(5, "lists", "l2", 3)];
    (a, b)
}

/// A client that applied checkpoint 5 of [`two_buckets`].
fn synced() -> (Download, Vec<OplogEntry>, Vec<OplogEntry>) {
    let (a, b) = two_buckets();
    let mut d = Download::default();
    let apply = expect_apply(feed(
        &mut d,
        vec![
            checkpoint(5, Some(1), vec![bc("a", &a), bc("b", &b)]),
            data("a", &a),
            data("b", &b),
            complete(5),
        ],
    ));
    d.applied(&apply);
    (d, a, b)
}

// ---- table tests ----

#[test]
fn progress_counts_received_of_expected_ops_per_bucket() {
    let (a, b) = two_buckets();
    let mut d = Download::default();
    assert_eq!(d.progress(), None, "no checkpoint yet");
    feed(&mut d, vec![checkpoint(5, None, vec![bc("a", &a), bc("b", &b)])]);
    let p = d.progress().expect("a checkpoint");
    assert_eq!((p.last_op_id, p.ops_received, p.ops_expected), (5, 0, 5));
    feed(&mut d, vec![data("a", &a[..2]), data("b", &b)]);
    let p = d.progress().expect("a checkpoint");
    assert_eq!((p.ops_received, p.ops_expected), (4, 5));
    let per: Vec<(&str, u64, u64)> = p
        .buckets
        .iter()
        .map(|b| (b.bucket.as_str(), b.ops_received, b.ops_expected))
        .collect();
    assert_eq!(per, vec![("a", 2, 3), ("b", 2, 2)]);
    assert!(!p.is_complete());
    let apply = expect_apply(feed(&mut d, vec![data("a", &a[2..]), complete(5)]));
    assert!(d.progress().is_some_and(|p| p.is_complete() && p.ops_received == 5));
    d.applied(&apply);
    // Applied: the next checkpoint expects only what is new.
    let more = vec![put(6, "todos", "t3", 4)];
    let all: Vec<OplogEntry> = a.iter().chain(&more).cloned().collect();
    feed(&mut d, vec![checkpoint(6, None, vec![bc("a", &all), bc("b", &b)])]);
    let p = d.progress().expect("a checkpoint");
    assert_eq!((p.ops_received, p.ops_expected), (0, 1));
}

#[test]
fn fresh_client_gets_a_checkpoint_in_several_lines() {
    let (a, b) = two_buckets();
    let mut d = Download::default();
    assert_eq!(d.request("c1").buckets, vec![]);
    let lines = vec![
        checkpoint(5, Some(7), vec![bc("a", &a), bc("b", &b)]),
        data("a", &a[..1]),
        data("b", &b[..1]),
        data("a", &a[1..]),
        data("b", &b[1..]),
    ];
    for line in lines {
        assert_eq!(d.handle(line).expect("accepted"), Step::Continue);
    }
    assert_eq!(d.staged_ops(), 5);
    assert_eq!(d.target().map(|t| t.last_op_id), Some(5));
    let apply = expect_apply(d.handle(complete(5)).expect("accepted"));
    assert_eq!(apply.last_op_id, 5);
    assert_eq!(apply.write_checkpoint, Some(7));
    assert_eq!(apply.removed_buckets, Vec::<String>::new());
    assert_eq!(apply.buckets.len(), 2);
    let ba = bucket(&apply, "a");
    assert!(!ba.reset);
    assert_eq!(ba.ops, a);
    assert_eq!(ba.state, state(&a));
    let bb = bucket(&apply, "b");
    assert!(!bb.reset);
    assert_eq!(bb.ops, b);
    assert_eq!(bb.state, state(&b));
    // Nothing is applied until the client confirms.
    assert!(d.applied_buckets().is_empty());
    d.applied(&apply);
    assert_eq!(d.staged_ops(), 0);
    assert_eq!(d.applied_buckets().get("a"), Some(&state(&a)));
    assert_eq!(d.applied_buckets().get("b"), Some(&state(&b)));
}

#[test]
fn request_resumes_after_the_applied_op_ids() {
    let (d, _, _) = synced();
    let r = d.request("client-1");
    assert_eq!(r.client_id, "client-1");
    assert_eq!(r.buckets, vec![req("a", 4), req("b", 5)]);
    // A restarted client resumes from what its store holds.
    let restarted = Download::new(d.applied_buckets().clone(), DownloadLimits::default());
    assert_eq!(restarted.request("client-1"), r);
}

#[test]
fn empty_new_bucket_is_applied_with_its_state() {
    let mut d = Download::default();
    let apply = expect_apply(feed(&mut d, vec![checkpoint(3, None, vec![bc("e", &[])]), complete(3)]));
    assert_eq!(apply.buckets.len(), 1);
    assert_eq!(apply.buckets[0].ops, vec![]);
    assert_eq!(apply.buckets[0].state, AppliedBucket::default());
    d.applied(&apply);
    assert_eq!(d.request("c").buckets, vec![req("e", 0)]);
    // The same checkpoint again changes nothing.
    let apply = expect_apply(feed(&mut d, vec![checkpoint(3, None, vec![bc("e", &[])]), complete(3)]));
    assert!(apply.buckets.is_empty());
}

#[test]
fn wrong_checksum_resyncs_only_the_bad_bucket() {
    let (mut d, a, b) = synced();
    let a6 = put(6, "todos", "t3", 1);
    let b7 = put(7, "lists", "l1", 2);
    let a_all: Vec<_> = a.iter().cloned().chain([a6.clone()]).collect();
    let b_all: Vec<_> = b.iter().cloned().chain([b7.clone()]).collect();
    let mut bad = bc("a", &a_all);
    bad.checksum = bad.checksum.wrapping_add(1);
    let step = feed(
        &mut d,
        vec![
            checkpoint(7, None, vec![bad, bc("b", &b_all)]),
            data("a", std::slice::from_ref(&a6)),
            data("b", std::slice::from_ref(&b7)),
            complete(7),
        ],
    );
    assert_eq!(
        step,
        Step::Resync {
            buckets: vec!["a".to_owned()]
        }
    );
    // The bad bucket's staged data is gone, the good one's kept.
    assert_eq!(d.staged_ops(), 1);
    // Nothing was applied.
    assert_eq!(d.applied_buckets().get("a"), Some(&state(&a)));
    assert_eq!(d.request("c").buckets, vec![req("a", 0), req("b", 7)]);

    // Redownload: the server sends a from scratch, b after 7 (nothing).
    let apply = expect_apply(feed(
        &mut d,
        vec![
            checkpoint(7, None, vec![bc("a", &a_all), bc("b", &b_all)]),
            data("a", &a_all[..2]),
            data("a", &a_all[2..]),
            complete(7),
        ],
    ));
    let ba = bucket(&apply, "a");
    assert!(ba.reset);
    assert_eq!(ba.ops, a_all);
    assert_eq!(ba.state, state(&a_all));
    let bb = bucket(&apply, "b");
    assert!(!bb.reset);
    assert_eq!(bb.ops, vec![b7]);
    assert_eq!(bb.state, state(&b_all));
    d.applied(&apply);
    assert_eq!(d.request("c").buckets, vec![req("a", 6), req("b", 7)]);
    // The reset is over: the next checkpoint is incremental again.
    let a8 = put(8, "todos", "t4", 1);
    let a_more: Vec<_> = a_all.iter().cloned().chain([a8.clone()]).collect();
    let apply = expect_apply(feed(
        &mut d,
        vec![
            checkpoint(8, None, vec![bc("a", &a_more), bc("b", &b_all)]),
            data("a", std::slice::from_ref(&a8)),
            complete(8),
        ],
    ));
    assert_eq!(apply.buckets.len(), 1);
    assert!(!apply.buckets[0].reset);
    assert_eq!(apply.buckets[0].ops, vec![a8]);
}

#[test]
fn corrupted_op_checksum_resyncs_the_bucket() {
    let (a, b) = two_buckets();
    let mut d = Download::default();
    let mut corrupt = a.clone();
    corrupt[1].checksum ^= 0x10;
    let step = feed(
        &mut d,
        vec![
            checkpoint(5, None, vec![bc("a", &a), bc("b", &b)]),
            data("a", &corrupt),
            data("b", &b),
            complete(5),
        ],
    );
    assert_eq!(
        step,
        Step::Resync {
            buckets: vec!["a".to_owned()]
        }
    );
    // The bucket was never applied: the request leaves it to the server
    // to send from scratch, or names it at 0.
    let r = d.request("c");
    assert!(
        r.buckets.iter().all(|br| br.name != "a" || br.after_op_id == 0),
        "{r:?}"
    );
    assert!(r.buckets.contains(&req("b", 5)));
    let apply = expect_apply(feed(
        &mut d,
        vec![
            checkpoint(5, None, vec![bc("a", &a), bc("b", &b)]),
            data("a", &a),
            complete(5),
        ],
    ));
    assert_eq!(bucket(&apply, "a").ops, a);
    assert!(bucket(&apply, "a").reset);
    assert_eq!(bucket(&apply, "b").ops, b);
}

#[test]
fn duplicate_lines_and_replayed_ops_are_ignored() {
    let (a, b) = two_buckets();
    let mut d = Download::default();
    let apply = expect_apply(feed(
        &mut d,
        vec![
            checkpoint(5, None, vec![bc("a", &a), bc("b", &b)]),
            data("a", &a[..2]),
            data("a", &a[..2]),
            data("b", &b),
            data("a", &a),
            data("b", &b[..1]),
            data("a", &a),
            complete(5),
        ],
    ));
    assert_eq!(bucket(&apply, "a").ops, a);
    assert_eq!(bucket(&apply, "b").ops, b);
    d.applied(&apply);

    // A new stream that replays everything plus one new op.
    let a6 = put(6, "todos", "t1", 9);
    let a_all: Vec<_> = a.iter().cloned().chain([a6.clone()]).collect();
    let apply = expect_apply(feed(
        &mut d,
        vec![
            checkpoint(6, None, vec![bc("a", &a_all), bc("b", &b)]),
            data("b", &b),
            data("a", &a_all),
            complete(6),
        ],
    ));
    assert_eq!(apply.buckets.len(), 1);
    assert_eq!(bucket(&apply, "a").ops, vec![a6]);
    assert_eq!(bucket(&apply, "a").state, state(&a_all));
}

#[test]
fn disconnect_mid_checkpoint_resumes_after_the_staged_ops() {
    let (a, b) = two_buckets();
    let mut d = Download::default();
    let lines = vec![checkpoint(5, None, vec![bc("a", &a), bc("b", &b)]), data("a", &a[..2])];
    assert_eq!(feed(&mut d, lines), Step::Continue);
    assert_eq!(d.staged_ops(), 2);
    // The stream drops; the same Download builds the next request.
    assert_eq!(d.request("c").buckets, vec![req("a", 3)]);
    let apply = expect_apply(feed(
        &mut d,
        vec![
            checkpoint(5, None, vec![bc("a", &a), bc("b", &b)]),
            data("a", &a[2..]),
            data("b", &b),
            complete(5),
        ],
    ));
    assert_eq!(bucket(&apply, "a").ops, a);
    assert_eq!(bucket(&apply, "b").ops, b);

    // Mid-checkpoint on a synced client: staged positions win over applied.
    let (mut d, a, b) = synced();
    let new_a = vec![put(6, "todos", "x", 1), put(8, "todos", "y", 1)];
    let a_all: Vec<_> = a.iter().chain(&new_a).cloned().collect();
    let b9 = put(9, "lists", "l3", 1);
    let b_all: Vec<_> = b.iter().cloned().chain([b9.clone()]).collect();
    let cp = checkpoint(9, None, vec![bc("a", &a_all), bc("b", &b_all)]);
    feed(&mut d, vec![cp.clone(), data("a", &new_a[..1])]);
    assert_eq!(d.request("c").buckets, vec![req("a", 6), req("b", 5)]);
    // The server moved on meanwhile: a newer checkpoint on the new stream.
    let a10 = put(10, "todos", "z", 1);
    let a_more: Vec<_> = a_all.iter().cloned().chain([a10.clone()]).collect();
    let apply = expect_apply(feed(
        &mut d,
        vec![
            checkpoint(10, None, vec![bc("a", &a_more), bc("b", &b_all)]),
            data("a", &[new_a[1].clone(), a10.clone()]),
            data("b", std::slice::from_ref(&b9)),
            complete(10),
        ],
    ));
    assert_eq!(bucket(&apply, "a").ops, vec![new_a[0].clone(), new_a[1].clone(), a10]);
    assert_eq!(bucket(&apply, "a").state, state(&a_more));
    assert_eq!(bucket(&apply, "b").ops, vec![b9]);
}

#[test]
fn checkpoint_diff_updates_and_removes_buckets() {
    let (mut d, a, b) = synced();
    let a6 = put(6, "todos", "t9", 1);
    let a_all: Vec<_> = a.iter().cloned().chain([a6.clone()]).collect();
    let c = vec![put(7, "notes", "n1", 1)];
    let step = feed(
        &mut d,
        vec![
            StreamLine::CheckpointDiff(CheckpointDiff {
                hlc: None,
                last_op_id: 7,
                write_checkpoint: Some(12),
                updated_buckets: vec![bc("a", &a_all), bc("c", &c)],
                removed_buckets: vec!["b".to_owned()],
            }),
            data("a", std::slice::from_ref(&a6)),
            data("c", &c),
        ],
    );
    assert_eq!(step, Step::Continue);
    let target = d.target().expect("a target").clone();
    assert_eq!(target.last_op_id, 7);
    assert_eq!(target.write_checkpoint, Some(12));
    let names: Vec<_> = target.buckets.iter().map(|b| b.bucket.as_str()).collect();
    assert_eq!(names, vec!["a", "c"]);
    // Data for the removed bucket is now unknown.
    assert_eq!(
        d.handle(data("b", &b)),
        Err(ProtocolError::UnknownBucket("b".to_owned()))
    );
    let apply = expect_apply(d.handle(complete(7)).expect("accepted"));
    assert_eq!(apply.write_checkpoint, Some(12));
    assert_eq!(apply.removed_buckets, vec!["b".to_owned()]);
    assert_eq!(bucket(&apply, "a").ops, vec![a6]);
    assert_eq!(bucket(&apply, "c").ops, c);
    d.applied(&apply);
    let names: Vec<_> = d.applied_buckets().keys().cloned().collect();
    assert_eq!(names, vec!["a", "c"]);
    assert_eq!(d.request("c").buckets, vec![req("a", 6), req("c", 7)]);

    // A diff without a write checkpoint keeps the previous one.
    let step = feed(
        &mut d,
        vec![
            StreamLine::CheckpointDiff(CheckpointDiff {
                hlc: None,
                last_op_id: 8,
                write_checkpoint: None,
                updated_buckets: vec![],
                removed_buckets: vec![],
            }),
            complete(8),
        ],
    );
    let apply = expect_apply(step);
    assert_eq!(apply.write_checkpoint, Some(12));
    assert!(apply.buckets.is_empty());
    assert!(apply.removed_buckets.is_empty());
}

#[test]
fn removed_bucket_drops_its_staged_data() {
    let (a, b) = two_buckets();
    let mut d = Download::default();
    feed(
        &mut d,
        vec![
            checkpoint(5, None, vec![bc("a", &a), bc("b", &b)]),
            data("a", &a),
            data("b", &b),
        ],
    );
    assert_eq!(d.staged_ops(), 5);
    feed(
        &mut d,
        vec![StreamLine::CheckpointDiff(CheckpointDiff {
            hlc: None,
            last_op_id: 5,
            write_checkpoint: None,
            updated_buckets: vec![],
            removed_buckets: vec!["a".to_owned()],
        })],
    );
    assert_eq!(d.staged_ops(), 2);
    let apply = expect_apply(d.handle(complete(5)).expect("accepted"));
    assert_eq!(apply.buckets.len(), 1);
    assert_eq!(apply.buckets[0].bucket, "b");
    // It was never applied, so it is not "removed" either.
    assert!(apply.removed_buckets.is_empty());
}

#[test]
fn protocol_violations_are_errors_of_the_right_variant() {
    let (a, b) = two_buckets();
    let mut d = Download::default();
    assert!(matches!(d.handle(data("a", &a)), Err(ProtocolError::Unexpected(_))));
    assert!(matches!(d.handle(complete(5)), Err(ProtocolError::Unexpected(_))));
    let diff = StreamLine::CheckpointDiff(CheckpointDiff {
        hlc: None,
        last_op_id: 5,
        write_checkpoint: None,
        updated_buckets: vec![],
        removed_buckets: vec![],
    });
    assert!(matches!(d.handle(diff), Err(ProtocolError::Unexpected(_))));
    assert_eq!(d.staged_ops(), 0);

    d.handle(checkpoint(5, None, vec![bc("a", &a), bc("b", &b)]))
        .expect("accepted");
    assert_eq!(
        d.handle(data("zzz", &a)),
        Err(ProtocolError::UnknownBucket("zzz".to_owned()))
    );
    assert_eq!(
        d.handle(complete(4)),
        Err(ProtocolError::CheckpointMismatch { expected: 5, got: 4 })
    );

    let mut no_data = put(1, "todos", "t1", 1);
    no_data.data = None;
    assert!(matches!(
        d.handle(data("a", &[no_data])),
        Err(ProtocolError::BadOp { op_id: 1, .. })
    ));
    let mut no_id = remove(2, "todos", "t1");
    no_id.object_id = None;
    assert!(matches!(
        d.handle(data("a", &[no_id])),
        Err(ProtocolError::BadOp { op_id: 2, .. })
    ));
    let mut no_type = put(3, "todos", "t1", 1);
    no_type.object_type = None;
    assert!(matches!(
        d.handle(data("a", &[no_type])),
        Err(ProtocolError::BadOp { op_id: 3, .. })
    ));
    // A rejected line stages nothing.
    assert_eq!(d.staged_ops(), 0);

    assert!(matches!(
        d.handle(checkpoint(4, None, vec![])),
        Err(ProtocolError::Unexpected(_))
    ));
    let err = ServerError {
        code: ErrorCode::ShuttingDown,
        message: "bye".to_owned(),
    };
    assert_eq!(
        d.handle(StreamLine::Error(err.clone())),
        Err(ProtocolError::Server(err))
    );

    // Data beyond the checkpoint is refused at completion.
    d.handle(data("a", &[put(9, "todos", "t1", 1)])).expect("staged");
    assert!(matches!(d.handle(complete(5)), Err(ProtocolError::Unexpected(_))));
}

#[test]
fn too_many_buckets_is_refused() {
    let mut d = Download::new(
        [],
        DownloadLimits {
            max_buckets: 2,
            ..DownloadLimits::default()
        },
    );
    let buckets = vec![bc("a", &[]), bc("b", &[]), bc("c", &[])];
    assert_eq!(
        d.handle(checkpoint(1, None, buckets)),
        Err(ProtocolError::TooManyBuckets { count: 3, limit: 2 })
    );
    assert!(d.target().is_none());
}

#[test]
fn clear_in_staged_data_resets_the_bucket() {
    let (mut d, a, _b) = synced();
    // The server compacted a: ops 1..=4 are one CLEAR, then new ops.
    let cl = clear(4, checksum_of(&a));
    let a6 = put(6, "todos", "t5", 1);
    let a7 = mv(7, 1234);
    let a8 = put(8, "todos", "t6", 1);
    // The client is at 4: the CLEAR is not sent again.
    let after = vec![a6.clone(), a7.clone(), a8.clone()];
    let compacted: Vec<_> = std::iter::once(cl).chain(after.iter().cloned()).collect();
    let apply = expect_apply(feed(
        &mut d,
        vec![
            checkpoint(8, None, vec![bc("a", &compacted), bc("b", &two_buckets().1)]),
            data("a", &after),
            complete(8),
        ],
    ));
    assert!(!bucket(&apply, "a").reset);
    assert_eq!(bucket(&apply, "a").ops, after);
    d.applied(&apply);

    // A later CLEAR past the client's position is sent: reset, and only the
    // ops after it are applied.
    let cl2 = clear(9, checksum_of(&compacted).wrapping_add(77));
    let a10 = put(10, "todos", "t7", 1);
    let relog = vec![cl2.clone(), a10.clone()];
    let apply = expect_apply(feed(
        &mut d,
        vec![
            checkpoint(10, None, vec![bc("a", &relog), bc("b", &two_buckets().1)]),
            data("a", &relog),
            complete(10),
        ],
    ));
    let ba = bucket(&apply, "a");
    assert!(ba.reset);
    assert_eq!(ba.ops, vec![a10]);
    assert_eq!(ba.state.checksum, checksum_of(&relog));
    assert_eq!(ba.state.last_op_id, 10);
    assert!(ba.ops.iter().all(|o| o.op != OpKind::Clear));
}

#[test]
fn clear_in_the_middle_of_staged_data_drops_what_came_before() {
    let mut d = Download::default();
    let p1 = put(1, "todos", "t1", 1);
    let p2 = put(2, "todos", "t2", 1);
    let first = vec![p1.clone(), p2.clone()];
    // Staged 1 and 2, then the stream drops.
    feed(
        &mut d,
        vec![checkpoint(2, None, vec![bc("a", &first)]), data("a", &first)],
    );
    assert_eq!(d.request("c").buckets, vec![req("a", 2)]);
    // Meanwhile the server appends and compacts: 1..=3 become CLEAR(3).
    let r3 = remove(3, "todos", "t1");
    let p4 = put(4, "todos", "t2", 2);
    let compacted = ferry_protocol::compact(&[p1, p2, r3, p4.clone()]);
    assert_eq!(compacted[0].op, OpKind::Clear);
    assert_eq!(compacted[0].op_id, 3);
    let apply = expect_apply(feed(
        &mut d,
        vec![
            checkpoint(4, None, vec![bc("a", &compacted)]),
            data("a", &compacted),
            complete(4),
        ],
    ));
    let ba = bucket(&apply, "a");
    assert!(ba.reset);
    assert_eq!(ba.ops, vec![p4]);
    assert_eq!(ba.state.checksum, checksum_of(&compacted));
    assert_eq!(ba.state.last_op_id, 4);
}

#[test]
fn keepalive_with_little_time_left_asks_for_a_token() {
    let mut d = Download::default();
    for (left, expiring) in [(0, true), (5, true), (29, true), (30, false), (3600, false)] {
        let step = d
            .handle(StreamLine::Keepalive {
                token_expires_in_s: left,
            })
            .expect("accepted");
        if expiring {
            assert_eq!(step, Step::TokenExpiring { in_s: left });
        } else {
            assert_eq!(step, Step::Continue);
        }
    }
}

#[test]
fn staged_ops_limit_gives_too_many_staged() {
    let (a, b) = two_buckets();
    let mut d = Download::new(
        [],
        DownloadLimits {
            max_staged_ops: 3,
            ..DownloadLimits::default()
        },
    );
    feed(
        &mut d,
        vec![checkpoint(5, None, vec![bc("a", &a), bc("b", &b)]), data("a", &a[..2])],
    );
    // Replays do not count toward the limit.
    d.handle(data("a", &a[..2])).expect("replay is free");
    d.handle(data("b", &b[..1])).expect("three staged");
    assert_eq!(d.staged_ops(), 3);
    assert_eq!(
        d.handle(data("b", &b[1..])),
        Err(ProtocolError::TooManyStaged { limit: 3 })
    );
    assert_eq!(d.staged_ops(), 3);
}

// ---- property: a faulty stream still converges ----

const BUCKETS: [&str; 3] = ["a", "b", "c"];

#[derive(Clone, Copy, Debug)]
enum Corrupt {
    None,
    /// The checkpoint announces a wrong checksum for this bucket.
    Checkpoint(usize),
    /// One op of this bucket arrives with a wrong checksum.
    Data(usize),
}

#[derive(Clone, Debug)]
enum Act {
    Append {
        bucket: usize,
        table: usize,
        row: usize,
        v: Option<i64>,
    },
    Compact {
        bucket: usize,
    },
    /// Open a stream from the client's request.
    Connect {
        corrupt: Corrupt,
        chunk: usize,
    },
    /// The server sends the next checkpoint on the open stream as a diff.
    Push {
        corrupt: Corrupt,
        chunk: usize,
    },
    /// Deliver up to `n` lines; `dup` duplicates each one, `replay` resends
    /// an earlier data line of this stream.
    Deliver {
        n: usize,
        dup: bool,
        replay: Option<usize>,
    },
    Disconnect,
    /// The client restarts: staged data is lost, the store's state stays.
    Restart,
}

fn corrupt() -> impl Strategy<Value = Corrupt> {
    prop_oneof![
        8 => Just(Corrupt::None),
        1 => (0..BUCKETS.len()).prop_map(Corrupt::Checkpoint),
        1 => (0..BUCKETS.len()).prop_map(Corrupt::Data),
    ]
}

fn act() -> impl Strategy<Value = Act> {
    prop_oneof![
        6 => (0..BUCKETS.len(), 0..TABLES.len(), 0..ROWS.len(), prop::option::weighted(0.7, 0i64..5))
            .prop_map(|(bucket, table, row, v)| Act::Append { bucket, table, row, v }),
        2 => (0..BUCKETS.len()).prop_map(|bucket| Act::Compact { bucket }),
        2 => (corrupt(), 1usize..4).prop_map(|(corrupt, chunk)| Act::Connect { corrupt, chunk }),
        2 => (corrupt(), 1usize..4).prop_map(|(corrupt, chunk)| Act::Push { corrupt, chunk }),
        6 => (1usize..6, prop::bool::weighted(0.2), prop::option::weighted(0.2, 0usize..100))
            .prop_map(|(n, dup, replay)| Act::Deliver { n, dup, replay }),
        1 => Just(Act::Disconnect),
        1 => Just(Act::Restart),
    ]
}

/// A line in flight, with what the harness knows about it.
#[derive(Clone, Debug)]
struct Sent {
    line: StreamLine,
    /// For checkpoint lines: buckets announced with a wrong checksum, and
    /// the true checksums.
    bad: BTreeSet<String>,
    truth: BTreeMap<String, u32>,
    /// For complete lines: every bucket's rows at the checkpoint.
    rows: BTreeMap<String, Rows>,
    /// For data lines: the bucket carries a corrupted op.
    tainted: Option<String>,
}

impl Sent {
    fn plain(line: StreamLine) -> Self {
        Sent {
            line,
            bad: BTreeSet::new(),
            truth: BTreeMap::new(),
            rows: BTreeMap::new(),
            tainted: None,
        }
    }
}

#[derive(Default)]
struct Server {
    buckets: BTreeMap<String, ServerBucket>,
    next: u64,
}

impl Server {
    fn new() -> Self {
        Server {
            buckets: BUCKETS
                .iter()
                .map(|b| (b.to_string(), ServerBucket::default()))
                .collect(),
            next: 0,
        }
    }

    fn checksums(&self) -> BTreeMap<String, BucketChecksum> {
        self.buckets
            .iter()
            .map(|(name, b)| {
                (
                    name.clone(),
                    BucketChecksum {
                        bucket: name.clone(),
                        checksum: b.checksum(),
                        count: b.count(),
                    },
                )
            })
            .collect()
    }

    fn rows(&self) -> BTreeMap<String, Rows> {
        self.buckets.iter().map(|(n, b)| (n.clone(), b.rows())).collect()
    }
}

/// An open stream: the server's cursor per bucket and what it announced.
struct Conn {
    cursors: BTreeMap<String, u64>,
    announced: BTreeMap<String, BucketChecksum>,
    queue: VecDeque<Sent>,
    history: Vec<Sent>,
}

#[derive(Default)]
struct Client {
    download: Download,
    rows: BTreeMap<String, Rows>,
    /// Buckets whose announced checksum in the current target is wrong.
    bad: BTreeSet<String>,
    truth: BTreeMap<String, u32>,
    /// Buckets with a corrupted op staged.
    tainted: BTreeSet<String>,
    /// With `Download::staging_out`: the client's staging area (bucket ->
    /// op id -> op) and the resetting buckets it keeps.
    store: Option<BTreeMap<String, BTreeMap<u64, OplogEntry>>>,
}

impl Client {
    fn new(staging_out: bool) -> Self {
        let mut c = Client::default();
        if staging_out {
            c.store = Some(BTreeMap::new());
            c.download = Download::staging_out([], [], [], DownloadLimits::default());
        }
        c
    }

    /// A restart: the download state is rebuilt from what the store keeps.
    fn restart(&mut self) {
        let applied = self.download.applied_buckets().clone();
        let Some(store) = &self.store else {
            self.download = Download::new(applied, DownloadLimits::default());
            self.tainted.clear();
            return;
        };
        let resetting = self.download.resetting().clone();
        let counts: Vec<(String, StagedSummary)> = store
            .iter()
            .map(|(bucket, ops)| {
                let base = if resetting.contains(bucket) {
                    0
                } else {
                    applied.get(bucket).map_or(0, |a| a.last_op_id)
                };
                let mut count = StagedSummary::default();
                for op in ops.range(base + 1..).map(|(_, op)| op) {
                    count.add(op.op_id, op.op == OpKind::Clear, op.checksum);
                }
                (bucket.clone(), count)
            })
            .collect();
        self.download = Download::staging_out(applied, resetting, counts, DownloadLimits::default());
    }
}

fn non_empty(rows: &BTreeMap<String, Rows>) -> BTreeMap<String, Rows> {
    rows.iter()
        .filter(|(_, r)| !r.is_empty())
        .map(|(n, r)| (n.clone(), r.clone()))
        .collect()
}

/// The server's lines for one checkpoint: the checkpoint (full or diff),
/// the data after each cursor in chunks, and the completion.
fn emit(server: &Server, conn: &mut Conn, full: bool, corrupt: Corrupt, chunk: usize) {
    let now = server.checksums();
    let mut announce: Vec<BucketChecksum> = if full {
        now.values().cloned().collect()
    } else {
        now.values()
            .filter(|b| conn.announced.get(&b.bucket) != Some(*b))
            .cloned()
            .collect()
    };
    let mut bad = BTreeSet::new();
    if let Corrupt::Checkpoint(i) = corrupt {
        if let Some(b) = announce.iter_mut().find(|b| b.bucket == BUCKETS[i]) {
            b.checksum = b.checksum.wrapping_sub(1);
            bad.insert(b.bucket.clone());
        }
    }
    for b in &announce {
        conn.announced.insert(b.bucket.clone(), b.clone());
    }
    let line = if full {
        checkpoint(server.next, None, announce)
    } else {
        StreamLine::CheckpointDiff(CheckpointDiff {
            hlc: None,
            last_op_id: server.next,
            write_checkpoint: None,
            updated_buckets: announce,
            removed_buckets: vec![],
        })
    };
    conn.queue.push_back(Sent {
        line,
        bad,
        truth: now.iter().map(|(n, b)| (n.clone(), b.checksum)).collect(),
        rows: BTreeMap::new(),
        tainted: None,
    });
    for (name, b) in &server.buckets {
        let cursor = conn.cursors.get(name).copied().unwrap_or(0);
        let mut ops = b.after(cursor);
        if let Some(last) = ops.last() {
            conn.cursors.insert(name.clone(), last.op_id);
        }
        let mut tainted = None;
        if let Corrupt::Data(i) = corrupt {
            if BUCKETS[i] == name && !ops.is_empty() {
                ops[0].checksum = ops[0].checksum.wrapping_add(1);
                tainted = Some(name.clone());
            }
        }
        for (k, part) in ops.chunks(chunk).enumerate() {
            let mut sent = Sent::plain(data(name, part));
            if k == 0 {
                sent.tainted = tainted.clone();
            }
            conn.queue.push_back(sent);
        }
    }
    let mut done = Sent::plain(complete(server.next));
    done.rows = server.rows();
    conn.queue.push_back(done);
}

/// Deliver one line. Returns false when the client drops the stream.
fn deliver(client: &mut Client, sent: &Sent, first: bool) -> Result<bool, TestCaseError> {
    let staged_before = client.download.staged_ops();
    match &sent.line {
        StreamLine::Checkpoint(_) => {
            client.bad = sent.bad.clone();
            client.truth = sent.truth.clone();
        }
        StreamLine::CheckpointDiff(d) => {
            for b in &d.updated_buckets {
                client.bad.remove(&b.bucket);
            }
            client.bad.extend(sent.bad.iter().cloned());
            client.truth = sent.truth.clone();
        }
        _ => {}
    }
    let step = client
        .download
        .handle(sent.line.clone())
        .map_err(|e| TestCaseError::fail(format!("line refused: {e}: {:?}", sent.line)))?;
    let discards = client.download.take_discards();
    if let Some(store) = &mut client.store {
        for name in discards {
            store.remove(&name);
        }
    }
    if let StreamLine::Data(batch) = &sent.line {
        if first {
            // Resume never sends again what the client already holds.
            prop_assert_eq!(
                client.download.staged_ops(),
                staged_before + batch.ops.len(),
                "a first delivery is all fresh"
            );
            if let Some(b) = &sent.tainted {
                client.tainted.insert(b.clone());
            }
        } else {
            prop_assert_eq!(client.download.staged_ops(), staged_before, "a replay stages nothing");
        }
    }
    match step {
        Step::Continue | Step::TokenExpiring { .. } => Ok(true),
        Step::Stage { bucket, ops } => {
            let Some(store) = &mut client.store else {
                return Err(TestCaseError::fail("ops handed out to stage without staging_out"));
            };
            let staged = store.entry(bucket).or_default();
            for op in ops {
                staged.insert(op.op_id, op);
            }
            Ok(true)
        }
        Step::Resync { buckets } => {
            let named: BTreeSet<String> = buckets.iter().cloned().collect();
            prop_assert!(
                client.bad.is_subset(&named),
                "bad {:?} not all in {:?}",
                client.bad,
                named
            );
            let allowed: BTreeSet<String> = client.bad.union(&client.tainted).cloned().collect();
            prop_assert!(named.is_subset(&allowed), "resync {:?} beyond {:?}", named, allowed);
            for b in &named {
                client.tainted.remove(b);
            }
            Ok(false)
        }
        Step::Apply(apply) => {
            prop_assert!(
                client.bad.is_empty(),
                "applied despite wrong checksums of {:?}",
                client.bad
            );
            for b in &apply.buckets {
                prop_assert_eq!(Some(&b.state.checksum), client.truth.get(&b.bucket));
                let rows = client.rows.entry(b.bucket.clone()).or_default();
                if b.reset {
                    rows.clear();
                }
                let mut ops = b.ops.clone();
                if let (Some(store), Some(range)) = (&mut client.store, b.staged) {
                    prop_assert!(b.ops.is_empty(), "ops handed out while staging out");
                    let staged = store.entry(b.bucket.clone()).or_default();
                    ops = staged
                        .range(range.from_op_id..=range.through_op_id)
                        .map(|(_, op)| op.clone())
                        .filter(|op| op.op != OpKind::Clear)
                        .collect();
                    // Switched in: the client drops them.
                    *staged = staged.split_off(&(range.through_op_id + 1));
                }
                for op in &ops {
                    let key = (
                        op.object_type.clone().unwrap_or_default(),
                        op.object_id.clone().unwrap_or_default(),
                    );
                    match op.op {
                        OpKind::Put => {
                            rows.insert(key, op.data.clone().unwrap_or_default());
                        }
                        OpKind::Remove => {
                            rows.remove(&key);
                        }
                        OpKind::Move => {}
                        OpKind::Clear => prop_assert!(false, "a CLEAR handed out to apply"),
                    }
                }
                client.tainted.remove(&b.bucket);
            }
            for name in &apply.removed_buckets {
                client.rows.remove(name);
            }
            client.download.applied(&apply);
            prop_assert_eq!(
                non_empty(&client.rows),
                non_empty(&sent.rows),
                "rows at checkpoint {}",
                apply.last_op_id
            );
            Ok(true)
        }
    }
}

fn connect(client: &Client, server: &Server, corrupt: Corrupt, chunk: usize) -> Conn {
    let req = client.download.request("client");
    let mut conn = Conn {
        cursors: req.buckets.iter().map(|b| (b.name.clone(), b.after_op_id)).collect(),
        announced: BTreeMap::new(),
        queue: VecDeque::new(),
        history: Vec::new(),
    };
    emit(server, &mut conn, true, corrupt, chunk);
    conn
}

fn run_sync(acts: Vec<Act>, staging_out: bool) -> Result<(), TestCaseError> {
    let mut server = Server::new();
    let mut client = Client::new(staging_out);
    let mut conn: Option<Conn> = None;
    for act in acts {
        match act {
            Act::Append { bucket, table, row, v } => {
                server.next += 1;
                let b = server.buckets.get_mut(BUCKETS[bucket]).expect("bucket");
                b.append(match v {
                    Some(v) => put(server.next, TABLES[table], ROWS[row], v),
                    None => remove(server.next, TABLES[table], ROWS[row]),
                });
            }
            Act::Compact { bucket } => server.buckets.get_mut(BUCKETS[bucket]).expect("bucket").compact(),
            Act::Connect { corrupt, chunk } => conn = Some(connect(&client, &server, corrupt, chunk)),
            Act::Push { corrupt, chunk } => {
                if let Some(c) = conn.as_mut() {
                    emit(&server, c, false, corrupt, chunk);
                }
            }
            Act::Deliver { n, dup, replay } => {
                let Some(c) = conn.as_mut() else { continue };
                let mut open = true;
                for _ in 0..n {
                    let Some(sent) = c.queue.pop_front() else { break };
                    open = deliver(&mut client, &sent, true)?;
                    if open && dup {
                        open = deliver(&mut client, &sent, false)?;
                    }
                    if matches!(sent.line, StreamLine::Data(_)) {
                        c.history.push(sent);
                    }
                    if open {
                        if let Some(i) = replay {
                            if !c.history.is_empty() {
                                let old = c.history[i % c.history.len()].clone();
                                open = deliver(&mut client, &old, false)?;
                            }
                        }
                    }
                    if !open {
                        break;
                    }
                }
                if !open {
                    conn = None;
                }
            }
            Act::Disconnect => conn = None,
            Act::Restart => {
                conn = None;
                client.restart();
            }
        }
    }
    // Faults stop: a few clean streams converge the client.
    let mut converged = false;
    for _ in 0..4 {
        let mut c = connect(&client, &server, Corrupt::None, 2);
        let mut last = None;
        while let Some(sent) = c.queue.pop_front() {
            if !deliver(&mut client, &sent, true)? {
                break;
            }
            last = Some(sent);
        }
        if last.is_some_and(|s| matches!(s.line, StreamLine::CheckpointComplete { .. })) {
            converged = true;
            break;
        }
    }
    prop_assert!(converged, "no clean checkpoint applied");
    prop_assert_eq!(non_empty(&client.rows), non_empty(&server.rows()));
    for (name, b) in &server.buckets {
        let held = client.download.applied_buckets().get(name).copied().unwrap_or_default();
        prop_assert_eq!(held.checksum, b.checksum(), "checksum of {}", name);
    }
    prop_assert_eq!(client.download.staged_ops(), 0);
    Ok(())
}

#[test]
fn faulty_streams_converge_to_the_server() {
    check(
        "faulty_streams_converge_to_the_server",
        256,
        prop::collection::vec(act(), 0..60),
        |acts| run_sync(acts, false),
    );
}

/// The same with the staged ops kept in a (model) store: handed out as
/// they arrive, switched in by range, discarded when the `Download` says,
/// and kept across restarts, which resume from them.
#[test]
fn faulty_streams_converge_to_the_server_staging_out() {
    check(
        "faulty_streams_converge_to_the_server_staging_out",
        256,
        prop::collection::vec(act(), 0..60),
        |acts| run_sync(acts, true),
    );
}
