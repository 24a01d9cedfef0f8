//! A checkpoint's ops are handed over by value: the download keeps their
//! positions until told whether the apply worked.

mod common;

use common::put;
use ferry_protocol::download::checksum_of;
use ferry_protocol::{
    BucketChecksum, BucketRequest, Checkpoint, CheckpointApply, DataBatch, Download, OplogEntry, Step, StreamLine,
};

fn lines(ops: &[OplogEntry]) -> Vec<StreamLine> {
    let last = ops.iter().map(|o| o.op_id).max().unwrap_or(0);
    vec![
        StreamLine::Checkpoint(Checkpoint {
            hlc: None,
            last_op_id: last,
            write_checkpoint: None,
            buckets: vec![BucketChecksum {
                bucket: "a".into(),
                checksum: checksum_of(ops),
                count: ops.len() as u64,
            }],
        }),
        StreamLine::Data(DataBatch {
            bucket: "a".into(),
            ops: ops.to_vec(),
        }),
        StreamLine::CheckpointComplete { last_op_id: last },
    ]
}

fn feed(d: &mut Download, lines: Vec<StreamLine>) -> CheckpointApply {
    let mut last = Step::Continue;
    for line in lines {
        last = d.handle(line).unwrap_or_else(|e| panic!("line refused: {e}"));
    }
    match last {
        Step::Apply(a) => a,
        other => panic!("expected an apply, got {other:?}"),
    }
}

fn req(after_op_id: u64) -> Vec<BucketRequest> {
    vec![BucketRequest {
        name: "a".into(),
        after_op_id,
    }]
}

#[test]
fn handed_out_ops_count_as_staged_until_confirmed() {
    let ops = vec![put(1, "t", "r1", 1), put(2, "t", "r2", 2)];
    let mut d = Download::default();
    let apply = feed(&mut d, lines(&ops));
    assert_eq!(apply.buckets[0].ops, ops);
    // Not applied yet: the stream would resume after the handed-out ops.
    assert_eq!(d.staged_ops(), 2);
    assert_eq!(d.request("c").buckets, req(2));
    let receipt = apply.receipt();
    assert!(receipt.buckets[0].ops.is_empty());
    assert_eq!(receipt.buckets[0].state, apply.buckets[0].state);
    d.applied(&receipt);
    assert_eq!(d.staged_ops(), 0);
    assert_eq!(d.request("c").buckets, req(2));
    assert_eq!(d.applied_buckets().get("a"), Some(&apply.buckets[0].state));
}

#[test]
fn failed_apply_downloads_the_ops_again() {
    let ops = vec![put(1, "t", "r1", 1), put(2, "t", "r2", 2)];
    let mut d = Download::default();
    let _lost = feed(&mut d, lines(&ops));
    d.apply_failed();
    assert_eq!(d.staged_ops(), 0);
    assert!(d.applied_buckets().is_empty());
    // The ops are gone: the stream starts over as for a fresh client.
    assert!(d.request("c").buckets.is_empty());
    let again = feed(&mut d, lines(&ops));
    assert_eq!(again.buckets[0].ops, ops);
    d.applied(&again.receipt());
    assert_eq!(d.request("c").buckets, req(2));
}

#[test]
fn unconfirmed_apply_is_not_applied_twice_silently() {
    // A caller that neither confirms nor reports failure: the next
    // checkpoint for the bucket cannot validate without the lost ops, so
    // the bucket is downloaded again instead of applied with a gap.
    let ops = vec![put(1, "t", "r1", 1), put(2, "t", "r2", 2)];
    let mut d = Download::default();
    let _lost = feed(&mut d, lines(&ops));
    let mut more = ops.clone();
    more.push(put(3, "t", "r3", 3));
    let mut step = Step::Continue;
    for line in lines(&more) {
        step = d.handle(line).unwrap_or_else(|e| panic!("line refused: {e}"));
    }
    match step {
        Step::Resync { buckets } => assert_eq!(buckets, vec!["a".to_owned()]),
        Step::Apply(a) => assert_eq!(a.buckets[0].ops, more, "applied with every op"),
        other => panic!("unexpected {other:?}"),
    }
}
