//! The client's download state machine, sans-IO.
//!
//! Feed it the stream's lines with [`Download::handle`]; it collects a
//! checkpoint's data and, at `checkpoint_complete`, validates every bucket
//! checksum. When all validate it hands back a [`CheckpointApply`] for the
//! client to apply to its synced layer in one transaction, then to confirm
//! with [`Download::applied`]. When one does not, it hands back the buckets
//! to download again from scratch ([`Step::Resync`]).
//!
//! Ops received but not yet applied stay staged across reconnects of the
//! same `Download`, and [`Download::request`] resumes after them, so nothing
//! already received is sent again. Duplicate or replayed data lines are
//! ignored (an op id at or before the bucket's position is skipped).

use std::collections::BTreeMap;

use crate::checksum;
use crate::error::ProtocolError;
use crate::messages::{BucketChecksum, BucketRequest, Checkpoint, OpKind, OplogEntry, StreamLine, StreamRequest};

/// What the client holds of one bucket after its last applied checkpoint.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AppliedBucket {
    /// Last op id applied.
    pub last_op_id: u64,
    /// Wrapping sum of the checksums applied (a CLEAR restarts it).
    pub checksum: u32,
    /// Ops applied.
    pub count: u64,
}

/// How far the download of the current checkpoint got, from the op
/// counts the checkpoint carries: per bucket, the ops received since the
/// last applied checkpoint of that bucket and the ops expected (the
/// checkpoint's count less what the client applied, or what it received
/// when more came, as after a compaction).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DownloadProgress {
    /// The checkpoint being downloaded.
    pub last_op_id: u64,
    /// Ops received, over every bucket.
    pub ops_received: u64,
    /// Ops expected, over every bucket.
    pub ops_expected: u64,
    /// Each bucket of the checkpoint.
    pub buckets: Vec<BucketProgress>,
}

/// One bucket's part of a [`DownloadProgress`].
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BucketProgress {
    /// The bucket.
    pub bucket: String,
    /// Ops received for the checkpoint.
    pub ops_received: u64,
    /// Ops expected for the checkpoint.
    pub ops_expected: u64,
}

impl DownloadProgress {
    /// Whether every expected op arrived.
    pub fn is_complete(&self) -> bool {
        self.ops_received >= self.ops_expected
    }
}

/// Limits of the download state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DownloadLimits {
    /// Most ops staged (received, not yet applied) at once.
    pub max_staged_ops: usize,
    /// Most buckets one checkpoint may name.
    pub max_buckets: usize,
}

impl Default for DownloadLimits {
    fn default() -> Self {
        DownloadLimits {
            max_staged_ops: 20_000_000,
            max_buckets: 10_000,
        }
    }
}

/// How one bucket changes when a checkpoint applies.
#[derive(Clone, Debug, PartialEq)]
pub struct BucketApply {
    /// The bucket.
    pub bucket: String,
    /// The bucket starts over (a CLEAR arrived, or it is being downloaded
    /// again after a checksum mismatch): rows it held that `ops` do not put
    /// again leave it.
    pub reset: bool,
    /// Entries to apply, in op id order (after the last CLEAR, if any).
    pub ops: Vec<OplogEntry>,
    /// The bucket's state once applied.
    pub state: AppliedBucket,
}

/// A validated checkpoint, ready to apply atomically. Its ops are handed
/// over by value: the [`Download`] keeps only their positions until
/// [`Download::applied`] (or [`Download::apply_failed`]).
#[derive(Clone, Debug, PartialEq)]
pub struct CheckpointApply {
    /// The checkpoint's last op id.
    pub last_op_id: u64,
    /// The client's writes through this seq are included.
    pub write_checkpoint: Option<u64>,
    /// Buckets with changes (or a new state).
    pub buckets: Vec<BucketApply>,
    /// Buckets the client no longer gets: their rows leave.
    pub removed_buckets: Vec<String>,
    /// The server's clock at the checkpoint (see [`Checkpoint::hlc`]).
    pub hlc: Option<ferry_core::HlcTimestamp>,
}

impl CheckpointApply {
    /// The same checkpoint without its ops: enough for
    /// [`Download::applied`] once the ops were moved into a store batch.
    pub fn receipt(&self) -> CheckpointApply {
        CheckpointApply {
            last_op_id: self.last_op_id,
            write_checkpoint: self.write_checkpoint,
            buckets: self
                .buckets
                .iter()
                .map(|b| BucketApply {
                    bucket: b.bucket.clone(),
                    reset: b.reset,
                    ops: Vec::new(),
                    state: b.state,
                })
                .collect(),
            removed_buckets: self.removed_buckets.clone(),
            hlc: self.hlc.clone(),
        }
    }
}

/// What the client should do after a line.
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    /// Nothing yet.
    Continue,
    /// Apply this checkpoint, then call [`Download::applied`].
    Apply(CheckpointApply),
    /// These buckets failed their checksums: their staged data was dropped
    /// and they will be downloaded from scratch; reconnect with
    /// [`Download::request`].
    Resync {
        /// The failed buckets.
        buckets: Vec<String>,
    },
    /// The token expires soon; fetch new credentials.
    TokenExpiring {
        /// Seconds left.
        in_s: u64,
    },
}

/// Token lifetimes below this ask the client for new credentials.
pub const TOKEN_REFRESH_BEFORE_S: u64 = 30;

/// The download state of one client.
#[derive(Clone, Debug, Default)]
pub struct Download {
    applied: BTreeMap<String, AppliedBucket>,
    /// Buckets to download from scratch (checksum mismatch).
    resetting: std::collections::BTreeSet<String>,
    staged: BTreeMap<String, Vec<OplogEntry>>,
    /// Ops handed out in a [`CheckpointApply`] and not yet confirmed, by
    /// bucket: (last op id, number of staged ops it took). They still count
    /// as staged.
    handed_out: BTreeMap<String, (u64, usize)>,
    staged_ops: usize,
    target: Option<Checkpoint>,
    limits: DownloadLimits,
}

impl Download {
    /// Start from what the store holds.
    pub fn new(applied: impl IntoIterator<Item = (String, AppliedBucket)>, limits: DownloadLimits) -> Self {
        Download {
            applied: applied.into_iter().collect(),
            limits,
            ..Download::default()
        }
    }

    /// The applied state of every bucket.
    pub fn applied_buckets(&self) -> &BTreeMap<String, AppliedBucket> {
        &self.applied
    }

    /// Ops received and not yet applied.
    pub fn staged_ops(&self) -> usize {
        self.staged_ops
    }

    /// The download of the current checkpoint so far (`None` before the
    /// first checkpoint line). Received ops count until they are applied.
    pub fn progress(&self) -> Option<DownloadProgress> {
        let target = self.target.as_ref()?;
        let mut progress = DownloadProgress {
            last_op_id: target.last_op_id,
            ..DownloadProgress::default()
        };
        for b in &target.buckets {
            let base = if self.resetting.contains(&b.bucket) {
                0
            } else {
                self.applied.get(&b.bucket).map_or(0, |a| a.count)
            };
            let staged = self.staged.get(&b.bucket).map_or(0, Vec::len);
            let handed_out = self.handed_out.get(&b.bucket).map_or(0, |(_, n)| *n);
            let received = u64::try_from(staged + handed_out).unwrap_or(u64::MAX);
            let expected = b.count.saturating_sub(base).max(received);
            progress.ops_received = progress.ops_received.saturating_add(received);
            progress.ops_expected = progress.ops_expected.saturating_add(expected);
            progress.buckets.push(BucketProgress {
                bucket: b.bucket.clone(),
                ops_received: received,
                ops_expected: expected,
            });
        }
        Some(progress)
    }

    /// The checkpoint being downloaded, if any.
    pub fn target(&self) -> Option<&Checkpoint> {
        self.target.as_ref()
    }

    fn position(&self, bucket: &str) -> u64 {
        if let Some(last) = self.staged.get(bucket).and_then(|ops| ops.last()) {
            return last.op_id;
        }
        if let Some((last, _)) = self.handed_out.get(bucket) {
            return *last;
        }
        if self.resetting.contains(bucket) {
            return 0;
        }
        self.applied.get(bucket).map_or(0, |b| b.last_op_id)
    }

    /// The request that opens (or resumes) the stream.
    pub fn request(&self, client_id: &str) -> StreamRequest {
        let names: std::collections::BTreeSet<&String> = self
            .applied
            .keys()
            .chain(self.staged.keys())
            .chain(self.handed_out.keys())
            .collect();
        StreamRequest {
            client_id: client_id.to_owned(),
            buckets: names
                .into_iter()
                .map(|name| BucketRequest {
                    name: name.clone(),
                    after_op_id: self.position(name),
                })
                .collect(),
        }
    }

    /// Take one line of the stream.
    pub fn handle(&mut self, line: StreamLine) -> Result<Step, ProtocolError> {
        match line {
            StreamLine::Checkpoint(cp) => {
                self.set_target(cp)?;
                Ok(Step::Continue)
            }
            StreamLine::CheckpointDiff(diff) => {
                let Some(base) = self.target.clone() else {
                    return Err(ProtocolError::Unexpected("checkpoint_diff before any checkpoint"));
                };
                let mut buckets: BTreeMap<String, BucketChecksum> =
                    base.buckets.into_iter().map(|b| (b.bucket.clone(), b)).collect();
                for name in &diff.removed_buckets {
                    buckets.remove(name);
                }
                for b in diff.updated_buckets {
                    buckets.insert(b.bucket.clone(), b);
                }
                self.set_target(Checkpoint {
                    hlc: diff.hlc.or(base.hlc),
                    last_op_id: diff.last_op_id,
                    write_checkpoint: diff.write_checkpoint.or(base.write_checkpoint),
                    buckets: buckets.into_values().collect(),
                })?;
                Ok(Step::Continue)
            }
            StreamLine::Data(batch) => {
                let Some(target) = &self.target else {
                    return Err(ProtocolError::Unexpected("data before any checkpoint"));
                };
                if !target.buckets.iter().any(|b| b.bucket == batch.bucket) {
                    return Err(ProtocolError::UnknownBucket(batch.bucket));
                }
                let mut position = self.position(&batch.bucket);
                let mut fresh = Vec::new();
                for op in batch.ops {
                    if op.op_id <= position {
                        continue; // already have it: a duplicate or replayed line
                    }
                    if matches!(op.op, OpKind::Put | OpKind::Remove)
                        && (op.object_type.is_none() || op.object_id.is_none())
                    {
                        return Err(ProtocolError::BadOp {
                            op_id: op.op_id,
                            reason: "put and remove need object_type and object_id",
                        });
                    }
                    if op.op == OpKind::Put && op.data.is_none() {
                        return Err(ProtocolError::BadOp {
                            op_id: op.op_id,
                            reason: "put needs data",
                        });
                    }
                    position = op.op_id;
                    fresh.push(op);
                }
                if self.staged_ops + fresh.len() > self.limits.max_staged_ops {
                    return Err(ProtocolError::TooManyStaged {
                        limit: self.limits.max_staged_ops,
                    });
                }
                self.staged_ops += fresh.len();
                self.staged.entry(batch.bucket).or_default().extend(fresh);
                Ok(Step::Continue)
            }
            StreamLine::CheckpointComplete { last_op_id } => self.complete(last_op_id),
            StreamLine::Keepalive { token_expires_in_s } => Ok(if token_expires_in_s < TOKEN_REFRESH_BEFORE_S {
                Step::TokenExpiring {
                    in_s: token_expires_in_s,
                }
            } else {
                Step::Continue
            }),
            StreamLine::Error(e) => Err(ProtocolError::Server(e)),
        }
    }

    fn set_target(&mut self, cp: Checkpoint) -> Result<(), ProtocolError> {
        if cp.buckets.len() > self.limits.max_buckets {
            return Err(ProtocolError::TooManyBuckets {
                count: cp.buckets.len(),
                limit: self.limits.max_buckets,
            });
        }
        if let Some(old) = &self.target {
            if cp.last_op_id < old.last_op_id {
                return Err(ProtocolError::Unexpected("checkpoint went backwards"));
            }
        }
        // Staged data of buckets no longer in the checkpoint is useless.
        let keep: std::collections::BTreeSet<&str> = cp.buckets.iter().map(|b| b.bucket.as_str()).collect();
        let mut dropped = 0;
        self.staged.retain(|name, ops| {
            let k = keep.contains(name.as_str());
            if !k {
                dropped += ops.len();
            }
            k
        });
        self.handed_out.retain(|name, (_, n)| {
            let k = keep.contains(name.as_str());
            if !k {
                dropped += *n;
            }
            k
        });
        self.staged_ops -= dropped;
        self.target = Some(cp);
        Ok(())
    }

    fn complete(&mut self, last_op_id: u64) -> Result<Step, ProtocolError> {
        let Some(target) = self.target.clone() else {
            return Err(ProtocolError::Unexpected("checkpoint_complete before any checkpoint"));
        };
        if last_op_id != target.last_op_id {
            return Err(ProtocolError::CheckpointMismatch {
                expected: target.last_op_id,
                got: last_op_id,
            });
        }
        // A previous apply was neither confirmed nor failed: its ops are
        // gone, so those buckets start over from their applied state (their
        // checksums tell whether anything is missing).
        let pending: Vec<String> = self.handed_out.keys().cloned().collect();
        for name in &pending {
            self.drop_staged(name);
        }
        // Validate every bucket first, without touching the staged ops.
        struct Plan {
            reset: bool,
            first: usize,
            state: AppliedBucket,
        }
        let mut failed = Vec::new();
        let mut plans: Vec<(usize, Plan)> = Vec::new();
        for (i, b) in target.buckets.iter().enumerate() {
            let staged = self.staged.get(&b.bucket).map(Vec::as_slice).unwrap_or_default();
            if staged.iter().any(|op| op.op_id > target.last_op_id) {
                return Err(ProtocolError::Unexpected("data beyond the checkpoint"));
            }
            let reset_by_resync = self.resetting.contains(&b.bucket);
            let base = if reset_by_resync {
                AppliedBucket::default()
            } else {
                self.applied.get(&b.bucket).copied().unwrap_or_default()
            };
            let last_clear = staged.iter().rposition(|op| op.op == OpKind::Clear);
            let (mut state, first) = match last_clear {
                Some(i) => (
                    AppliedBucket {
                        last_op_id: base.last_op_id,
                        checksum: 0,
                        count: 0,
                    },
                    i,
                ),
                None => (base, 0),
            };
            for op in &staged[first..] {
                state.checksum = state.checksum.wrapping_add(op.checksum);
                state.count += 1;
                state.last_op_id = state.last_op_id.max(op.op_id);
            }
            if state.checksum != b.checksum {
                failed.push(b.bucket.clone());
                continue;
            }
            let changed = first < staged.len() || reset_by_resync || !self.applied.contains_key(&b.bucket);
            if changed {
                plans.push((
                    i,
                    Plan {
                        reset: reset_by_resync || last_clear.is_some(),
                        first,
                        state,
                    },
                ));
            }
        }
        if !failed.is_empty() {
            for name in &failed {
                self.drop_staged(name);
                self.resetting.insert(name.clone());
            }
            return Ok(Step::Resync { buckets: failed });
        }
        // Every bucket validated: hand the ops over by value.
        let mut buckets = Vec::with_capacity(plans.len());
        for (i, plan) in plans {
            let name = &target.buckets[i].bucket;
            let staged = self.staged.get_mut(name).map(std::mem::take).unwrap_or_default();
            if let Some(last) = staged.last() {
                self.handed_out.insert(name.clone(), (last.op_id, staged.len()));
            }
            let ops = staged
                .into_iter()
                .skip(plan.first)
                .filter(|op| op.op != OpKind::Clear)
                .collect();
            buckets.push(BucketApply {
                bucket: name.clone(),
                reset: plan.reset,
                ops,
                state: plan.state,
            });
        }
        let removed_buckets = self
            .applied
            .keys()
            .filter(|name| !target.buckets.iter().any(|b| &b.bucket == *name))
            .cloned()
            .collect();
        Ok(Step::Apply(CheckpointApply {
            last_op_id: target.last_op_id,
            write_checkpoint: target.write_checkpoint,
            buckets,
            removed_buckets,
            hlc: target.hlc.clone(),
        }))
    }

    /// Forget a bucket's staged and handed-out ops.
    fn drop_staged(&mut self, name: &str) {
        if let Some(ops) = self.staged.remove(name) {
            self.staged_ops -= ops.len();
        }
        if let Some((_, n)) = self.handed_out.remove(name) {
            self.staged_ops -= n;
        }
    }

    /// Applying the last [`CheckpointApply`] failed: its ops are gone, so
    /// its buckets resume from their applied state (the server sends those
    /// ops again).
    pub fn apply_failed(&mut self) {
        let pending: Vec<String> = self.handed_out.keys().cloned().collect();
        for name in &pending {
            self.drop_staged(name);
        }
    }

    /// The client applied `apply` to its store: move it from staged to
    /// applied.
    pub fn applied(&mut self, apply: &CheckpointApply) {
        for b in &apply.buckets {
            self.drop_staged(&b.bucket);
            self.resetting.remove(&b.bucket);
            self.applied.insert(b.bucket.clone(), b.state);
        }
        for name in &apply.removed_buckets {
            self.applied.remove(name);
            self.drop_staged(name);
        }
    }
}

/// The sum of the checksums of ops, as a bucket would hold it.
pub fn checksum_of(ops: &[OplogEntry]) -> u32 {
    checksum::sum(ops.iter().map(|o| o.checksum))
}
