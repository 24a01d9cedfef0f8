//! What a validated server checkpoint does to the local database, as a
//! typed set of changes ([`ServerChanges`]), and the reads a client needs
//! to work those changes out (the buckets it holds and their entries).
//!
//! The client plans a checkpoint through these reads and hands the
//! changes to [`LocalDb::apply_server_changes`], which turns them into one
//! store batch with the queue's confirmation and the rebase of pending
//! writes: the client never builds or applies a store batch itself.

use std::collections::BTreeSet;

use ferry_core::RowData;
use ferry_store::{BatchOp, BucketEntry, BucketState, WriteBatch};

use crate::staging::resetting_meta;
use crate::{LocalDb, QueueResult, StagedSwitch};

/// The changes a validated checkpoint makes, in the order they apply:
/// synced rows put and deleted, bucket entries put and removed, bucket
/// states set, buckets emptied, staged ranges switched in, and the
/// buckets still downloading from scratch. Nothing here touches pending
/// writes or the upload queue: [`LocalDb::apply_server_changes`] adds
/// their confirmation and rebase to the same store batch.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ServerChanges {
    /// The synced-layer, bucket and metadata writes, in order (only the
    /// ops the methods below push).
    batch: WriteBatch,
    /// The staged ranges the batch switches in, in its order.
    switches: Vec<StagedSwitch>,
}

impl ServerChanges {
    /// No changes.
    pub fn new() -> Self {
        Self::default()
    }

    /// No changes, with room for `n` before growing.
    pub fn with_capacity(n: usize) -> Self {
        ServerChanges {
            batch: WriteBatch::with_capacity(n),
            switches: Vec::new(),
        }
    }

    /// Create or replace a synced row.
    pub fn put_row(&mut self, table: impl Into<String>, id: impl Into<String>, data: RowData) -> &mut Self {
        self.batch.put_synced(table, id, data);
        self
    }

    /// Remove a synced row (no bucket holds it any more); removing a
    /// missing row is not an error.
    pub fn delete_row(&mut self, table: impl Into<String>, id: impl Into<String>) -> &mut Self {
        self.batch.delete_synced(table, id);
        self
    }

    /// Set a row's entry in a bucket.
    pub fn put_bucket_entry(&mut self, bucket: impl Into<String>, entry: BucketEntry) -> &mut Self {
        self.batch.push(BatchOp::PutBucketEntry {
            bucket: bucket.into(),
            entry,
        });
        self
    }

    /// Remove a row's entry from a bucket.
    pub fn delete_bucket_entry(
        &mut self,
        bucket: impl Into<String>,
        table: impl Into<String>,
        row_id: impl Into<String>,
    ) -> &mut Self {
        self.batch.push(BatchOp::DeleteBucketEntry {
            bucket: bucket.into(),
            table: table.into(),
            row_id: row_id.into(),
        });
        self
    }

    /// Set a bucket's state.
    pub fn set_bucket_state(&mut self, bucket: impl Into<String>, state: BucketState) -> &mut Self {
        self.batch.push(BatchOp::PutBucketState {
            bucket: bucket.into(),
            state,
        });
        self
    }

    /// Empty a bucket: its state and every entry go (a reset or a
    /// removed bucket). Its rows stay unless deleted too.
    pub fn delete_bucket(&mut self, bucket: impl Into<String>) -> &mut Self {
        self.batch.push(BatchOp::DeleteBucket { bucket: bucket.into() });
        self
    }

    /// Switch a bucket's staged op range in: the store applies its ops
    /// to the synced layer at this point of the batch. Set the bucket
    /// states first, so its REMOVEs see the buckets as they will be.
    pub fn switch_in(&mut self, switch: StagedSwitch) -> &mut Self {
        self.batch.push(BatchOp::SwitchInStaged {
            bucket: switch.bucket.clone(),
            from_op_id: switch.from_op_id,
            through_op_id: switch.through_op_id,
        });
        self.switches.push(switch);
        self
    }

    /// Keep `resetting`, the buckets still downloading from scratch, with
    /// the staging area (see [`crate::StagingArea::resetting`]).
    pub fn keep_resetting(&mut self, resetting: &BTreeSet<String>) -> &mut Self {
        self.batch.push(resetting_meta(resetting));
        self
    }

    /// Number of changes.
    pub fn len(&self) -> usize {
        self.batch.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.batch.is_empty()
    }

    /// The staged ranges switched in, in order.
    pub fn switches(&self) -> &[StagedSwitch] {
        &self.switches
    }

    /// The synced rows put or deleted, as `(table, id)`, in order (rows
    /// switched in from the staging area are not listed).
    pub fn rows(&self) -> impl Iterator<Item = (&str, &str)> + '_ {
        self.batch.ops.iter().filter_map(|op| match op {
            BatchOp::PutSynced { table, id, .. } | BatchOp::DeleteSynced { table, id } => {
                Some((table.as_str(), id.as_str()))
            }
            _ => None,
        })
    }

    /// The store batch and the switches: [`LocalDb`] adds the queue's part
    /// and applies it.
    pub(crate) fn into_parts(self) -> (WriteBatch, Vec<StagedSwitch>) {
        (self.batch, self.switches)
    }
}

/// The reads a client plans a checkpoint with.
impl LocalDb {
    /// Every bucket the client holds, with its state, ordered by name.
    pub fn buckets(&self) -> QueueResult<Vec<(String, BucketState)>> {
        Ok(self.store.buckets()?)
    }

    /// A bucket's state (`None`: the client does not hold it).
    pub fn bucket_state(&self, bucket: &str) -> QueueResult<Option<BucketState>> {
        Ok(self.store.bucket_state(bucket)?)
    }

    /// The bucket's entry for a row (`None`: the bucket does not hold it).
    pub fn bucket_entry(&self, bucket: &str, table: &str, row_id: &str) -> QueueResult<Option<BucketEntry>> {
        Ok(self.store.bucket_entry(bucket, table, row_id)?)
    }

    /// Up to `limit` of a bucket's entries after `after` (`(table, row
    /// id)`; `None`: from the first), ordered by table and row id.
    pub fn bucket_entries(
        &self,
        bucket: &str,
        after: Option<(&str, &str)>,
        limit: usize,
    ) -> QueueResult<Vec<BucketEntry>> {
        Ok(self.store.bucket_entries(bucket, after, limit)?)
    }
}
