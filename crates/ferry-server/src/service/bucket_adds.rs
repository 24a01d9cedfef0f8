//! Ops appended in bulk, summed up per bucket, then added to each
//! bucket's stored state once (the import's and the rebucketing's
//! batches; a single write updates its bucket's state itself).

use std::collections::BTreeMap;

use crate::db::{BucketState, SourceTx};
use crate::error::Result;

/// Per bucket: the checksum sum, count and last op id of the ops added.
#[derive(Default)]
pub(super) struct BucketAdds<'a>(BTreeMap<&'a str, BucketState>);

impl<'a> BucketAdds<'a> {
    /// Count one more op of `bucket` (op ids ascending).
    pub(super) fn add(&mut self, bucket: &'a str, op_id: u64, checksum: u32) {
        let s = self.0.entry(bucket).or_default();
        s.checksum = s.checksum.wrapping_add(checksum);
        s.count = s.count.saturating_add(1);
        s.last_op_id = op_id;
    }

    /// Add the sums to each bucket's stored state.
    pub(super) fn apply(self, stx: &mut dyn SourceTx) -> Result<()> {
        for (bucket, add) in self.0 {
            let state = stx.bucket_state(bucket)?.unwrap_or_default();
            stx.set_bucket_state(
                bucket,
                &BucketState {
                    checksum: state.checksum.wrapping_add(add.checksum),
                    count: state.count.saturating_add(add.count),
                    last_op_id: add.last_op_id,
                },
            )?;
        }
        Ok(())
    }
}
