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
//!
//! Staged ops live in the `Download` itself ([`Download::new`]) or, with
//! [`Download::staging_out`], in the client's store: each `data` line's
//! new ops are handed out ([`Step::Stage`]) for the client to write to
//! its staging area, the `Download` keeps only their counts and checksum
//! sums ([`StagedSummary`]), and a validated checkpoint names the op id
//! range of each bucket to switch in ([`BucketApply::staged`]). Buckets
//! whose staged ops must go (a checksum failure, a bucket the checkpoint
//! no longer names) are listed by [`Download::take_discards`].

use std::collections::BTreeMap;

use ferry_core::StagedSummary;

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

/// The op ids of a bucket's staging area a checkpoint switches in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StagedRange {
    /// The first op id (the last CLEAR, or the first op after what the
    /// client applied).
    pub from_op_id: u64,
    /// The last op id.
    pub through_op_id: u64,
    /// The staged ops the checkpoint validated: those after this op id
    /// (the bucket's applied op id, or 0 when it downloads from scratch)...
    pub after_op_id: u64,
    /// ...summed up. The staging area must hold exactly these (the client
    /// checks before it switches them in: ops counted and never written,
    /// or written and not counted, would apply a state without its rows).
    pub summary: StagedSummary,
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
    /// Entries to apply, in op id order (after the last CLEAR, if any);
    /// empty when the ops are staged in the store.
    pub ops: Vec<OplogEntry>,
    /// With [`Download::staging_out`]: the staged ops to switch in (none
    /// when nothing new arrived).
    pub staged: Option<StagedRange>,
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
                    staged: b.staged,
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
    /// With [`Download::staging_out`]: write these new ops of `bucket` to
    /// the staging area (before any later step's writes).
    Stage {
        /// The bucket.
        bucket: String,
        /// Its new ops, in op id order.
        ops: Vec<OplogEntry>,
    },
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
    /// Staged ops kept here (without `staging_out`).
    staged: BTreeMap<String, Vec<OplogEntry>>,
    /// Every bucket's staged ops, summed up.
    counts: BTreeMap<String, StagedSummary>,
    /// Ops handed out in a [`CheckpointApply`] and not yet confirmed, by
    /// bucket: (last op id, number of staged ops it took). They still count
    /// as staged.
    handed_out: BTreeMap<String, (u64, usize)>,
    staged_ops: usize,
    target: Option<Checkpoint>,
    limits: DownloadLimits,
    /// Staged ops live in the client's store.
    external: bool,
    /// Buckets whose staged ops in the store must be dropped.
    discards: Vec<String>,
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

    /// Start from what the store holds, staging ops in the store: the
    /// buckets being downloaded again from scratch and what each bucket
    /// has staged beyond its applied state (or from 0 when resetting).
    pub fn staging_out(
        applied: impl IntoIterator<Item = (String, AppliedBucket)>,
        resetting: impl IntoIterator<Item = String>,
        staged: impl IntoIterator<Item = (String, StagedSummary)>,
        limits: DownloadLimits,
    ) -> Self {
        let counts: BTreeMap<String, StagedSummary> = staged.into_iter().filter(|(_, c)| c.count > 0).collect();
        let staged_ops = counts
            .values()
            .map(|c| usize::try_from(c.count).unwrap_or(usize::MAX))
            .fold(0usize, usize::saturating_add);
        Download {
            applied: applied.into_iter().collect(),
            resetting: resetting.into_iter().collect(),
            counts,
            staged_ops,
            limits,
            external: true,
            ..Download::default()
        }
    }

    /// Whether staged ops live in the client's store.
    pub fn stages_out(&self) -> bool {
        self.external
    }

    /// The buckets being downloaded again from scratch (after a checksum
    /// failure), which a client staging out keeps with its staged ops.
    pub fn resetting(&self) -> &std::collections::BTreeSet<String> {
        &self.resetting
    }

    /// Buckets whose staged ops in the store must be dropped, in the order
    /// the `Download` dropped them; the client drops them before it writes
    /// any op a later step hands out.
    pub fn take_discards(&mut self) -> Vec<String> {
        std::mem::take(&mut self.discards)
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
            let staged = self.counts.get(&b.bucket).map_or(0, |c| c.count);
            let handed_out = self.handed_out.get(&b.bucket).map_or(0, |(_, n)| *n);
            let received = staged.saturating_add(u64::try_from(handed_out).unwrap_or(u64::MAX));
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
        if let Some(c) = self.counts.get(bucket).filter(|c| c.count > 0) {
            return c.last_op_id;
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
            .chain(self.counts.keys())
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
                let count = self.counts.entry(batch.bucket.clone()).or_default();
                for op in &fresh {
                    count.add(op.op_id, op.op == OpKind::Clear, op.checksum);
                }
                if self.external {
                    if fresh.is_empty() {
                        return Ok(Step::Continue);
                    }
                    return Ok(Step::Stage {
                        bucket: batch.bucket,
                        ops: fresh,
                    });
                }
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
        let gone: Vec<String> = self
            .counts
            .keys()
            .chain(self.handed_out.keys())
            .filter(|name| !keep.contains(name.as_str()))
            .cloned()
            .collect();
        for name in &gone {
            self.drop_staged(name, true);
        }
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
            self.drop_staged(name, true);
        }
        // Validate every bucket first, from the counts alone.
        struct Plan {
            reset: bool,
            count: StagedSummary,
            from_op_id: u64,
            after_op_id: u64,
            state: AppliedBucket,
        }
        let mut failed = Vec::new();
        let mut plans: Vec<(usize, Plan)> = Vec::new();
        for (i, b) in target.buckets.iter().enumerate() {
            let count = self.counts.get(&b.bucket).copied().unwrap_or_default();
            if count.last_op_id > target.last_op_id {
                return Err(ProtocolError::Unexpected("data beyond the checkpoint"));
            }
            let reset_by_resync = self.resetting.contains(&b.bucket);
            let base = if reset_by_resync {
                AppliedBucket::default()
            } else {
                self.applied.get(&b.bucket).copied().unwrap_or_default()
            };
            let state = if count.clear_op_id.is_some() {
                AppliedBucket {
                    last_op_id: base.last_op_id.max(count.last_op_id),
                    checksum: count.checksum,
                    count: count.count_since_clear,
                }
            } else {
                AppliedBucket {
                    last_op_id: base.last_op_id.max(count.last_op_id),
                    checksum: base.checksum.wrapping_add(count.checksum),
                    count: base.count + count.count,
                }
            };
            if state.checksum != b.checksum {
                failed.push(b.bucket.clone());
                continue;
            }
            let changed = count.count > 0 || reset_by_resync || !self.applied.contains_key(&b.bucket);
            if changed {
                plans.push((
                    i,
                    Plan {
                        reset: reset_by_resync || count.clear_op_id.is_some(),
                        count,
                        from_op_id: count.clear_op_id.unwrap_or(base.last_op_id.saturating_add(1)),
                        after_op_id: base.last_op_id,
                        state,
                    },
                ));
            }
        }
        if !failed.is_empty() {
            for name in &failed {
                self.drop_staged(name, true);
                self.resetting.insert(name.clone());
            }
            return Ok(Step::Resync { buckets: failed });
        }
        // Every bucket validated: hand the ops (or their range) over.
        let mut buckets = Vec::with_capacity(plans.len());
        for (i, plan) in plans {
            let name = &target.buckets[i].bucket;
            self.counts.remove(name);
            if plan.count.count > 0 {
                let n = usize::try_from(plan.count.count).unwrap_or(usize::MAX);
                self.handed_out.insert(name.clone(), (plan.count.last_op_id, n));
            }
            let staged = (self.external && plan.count.count > 0).then_some(StagedRange {
                from_op_id: plan.from_op_id,
                through_op_id: plan.count.last_op_id,
                after_op_id: plan.after_op_id,
                summary: plan.count,
            });
            let ops = self
                .staged
                .remove(name)
                .unwrap_or_default()
                .into_iter()
                .filter(|op| op.op_id >= plan.from_op_id && op.op != OpKind::Clear)
                .collect();
            buckets.push(BucketApply {
                bucket: name.clone(),
                reset: plan.reset,
                ops,
                staged,
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

    /// Forget a bucket's staged and handed-out ops; `discard`: the store's
    /// copy must go too.
    fn drop_staged(&mut self, name: &str, discard: bool) {
        let mut had = self.staged.remove(name).is_some();
        if let Some(c) = self.counts.remove(name) {
            had = true;
            self.staged_ops = self
                .staged_ops
                .saturating_sub(usize::try_from(c.count).unwrap_or(usize::MAX));
        }
        if let Some((_, n)) = self.handed_out.remove(name) {
            had = true;
            self.staged_ops = self.staged_ops.saturating_sub(n);
        }
        if had && discard && self.external {
            self.discards.push(name.to_owned());
        }
    }

    /// Applying the last [`CheckpointApply`] failed: its ops are gone, so
    /// its buckets resume from their applied state (the server sends those
    /// ops again).
    pub fn apply_failed(&mut self) {
        let pending: Vec<String> = self.handed_out.keys().cloned().collect();
        for name in &pending {
            self.drop_staged(name, true);
        }
    }

    /// The client applied `apply` to its store: move it from staged to
    /// applied. (A client staging out drops the switched-in ops from its
    /// store itself, by their range.)
    pub fn applied(&mut self, apply: &CheckpointApply) {
        for b in &apply.buckets {
            self.drop_staged(&b.bucket, false);
            self.resetting.remove(&b.bucket);
            self.applied.insert(b.bucket.clone(), b.state);
        }
        for name in &apply.removed_buckets {
            self.applied.remove(name);
            self.drop_staged(name, true);
        }
    }
}

/// The sum of the checksums of ops, as a bucket would hold it.
pub fn checksum_of(ops: &[OplogEntry]) -> u32 {
    checksum::sum(ops.iter().map(|o| o.checksum))
}
