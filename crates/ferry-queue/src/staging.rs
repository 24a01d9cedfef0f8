//! The staging area of a download (ADR 0014), as the client sees it: ops
//! of a checkpoint being downloaded are written there as they arrive
//! ([`StagingArea::apply`] of a [`StagingBatch`]), read back on open
//! ([`StagingArea::staged_buckets`], [`StagingArea::staged_summary`],
//! [`StagingArea::resetting`]) and switched in by a checkpoint
//! ([`crate::ServerChanges::switch_in`]). Staged ops are invisible to
//! every read of the visible state.

use std::collections::BTreeSet;
use std::sync::Arc;

use ferry_core::Schema;
use ferry_store::{BatchOp, StagedOp, StagedSummary, Store, StoreError, WriteBatch};

use crate::{LocalDb, QueueResult};

/// Metadata key of the buckets being downloaded again from scratch (JSON
/// array of names), kept with the staging area so a restart resumes them
/// from 0.
pub const META_RESETTING: &str = "ferry.staging.resetting";

/// The metadata op keeping `resetting`.
pub(crate) fn resetting_meta(resetting: &BTreeSet<String>) -> BatchOp {
    BatchOp::PutMeta {
        key: META_RESETTING.into(),
        value: serde_json::to_vec(resetting).unwrap_or_default(),
    }
}

/// Writes to the staging area, applied together by
/// [`StagingArea::apply`], in order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StagingBatch {
    batch: WriteBatch,
}

impl StagingBatch {
    /// No writes.
    pub fn new() -> Self {
        Self::default()
    }

    /// Stage an op of `bucket` (replacing a staged op with its op id).
    pub fn stage(&mut self, bucket: impl Into<String>, op: StagedOp) -> &mut Self {
        self.batch.push(BatchOp::PutStaged {
            bucket: bucket.into(),
            op,
        });
        self
    }

    /// Drop `bucket`'s staged ops through `through_op_id` (`u64::MAX`:
    /// every one).
    pub fn delete_through(&mut self, bucket: impl Into<String>, through_op_id: u64) -> &mut Self {
        self.batch.push(BatchOp::DeleteStaged {
            bucket: bucket.into(),
            through_op_id,
        });
        self
    }

    /// Keep `resetting`, the buckets being downloaded from scratch.
    pub fn keep_resetting(&mut self, resetting: &BTreeSet<String>) -> &mut Self {
        self.batch.push(resetting_meta(resetting));
        self
    }

    /// Append `other`'s writes after these.
    pub fn append(&mut self, other: StagingBatch) -> &mut Self {
        self.batch.ops.extend(other.batch.ops);
        self
    }

    /// Number of writes.
    pub fn len(&self) -> usize {
        self.batch.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.batch.is_empty()
    }
}

/// A handle on a [`LocalDb`]'s staging area, for a writer on a thread of
/// its own (it holds the store, not the database: staging writes are not
/// serialized with local writes, which never touch the staging area).
#[derive(Clone, Debug)]
pub struct StagingArea {
    store: Arc<dyn Store>,
}

impl StagingArea {
    /// The schema of the database.
    pub fn schema(&self) -> &Schema {
        self.store.schema()
    }

    /// Apply `batch` as one store batch (nothing of it when it fails).
    pub fn apply(&self, batch: StagingBatch) -> QueueResult<()> {
        if batch.is_empty() {
            return Ok(());
        }
        Ok(self.store.apply(batch.batch)?)
    }

    /// The buckets with staged ops.
    pub fn staged_buckets(&self) -> QueueResult<Vec<String>> {
        Ok(self.store.staged_buckets()?)
    }

    /// A summary of `bucket`'s staged ops after `after_op_id`.
    pub fn staged_summary(&self, bucket: &str, after_op_id: u64) -> QueueResult<StagedSummary> {
        Ok(self.store.staged_summary(bucket, after_op_id)?)
    }

    /// The buckets being downloaded again from scratch, as last kept
    /// ([`StagingBatch::keep_resetting`], [`crate::ServerChanges::keep_resetting`]).
    pub fn resetting(&self) -> QueueResult<BTreeSet<String>> {
        match self.store.get_meta(META_RESETTING)? {
            Some(bytes) => Ok(serde_json::from_slice(&bytes)
                .map_err(|e| StoreError::Corrupt(format!("metadata {META_RESETTING}: {e}")))?),
            None => Ok(BTreeSet::new()),
        }
    }
}

impl LocalDb {
    /// The staging area of this database's downloads.
    pub fn staging_area(&self) -> StagingArea {
        StagingArea {
            store: self.store.clone(),
        }
    }
}
