//! A bucket's staged ops summed up: what the client's download state and
//! its store's staging area both need to know of them (validating a
//! checkpoint, resuming a download) without the ops themselves.

/// The staged ops of one bucket, summed up in op id order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StagedSummary {
    /// The last staged op id (0: none).
    pub last_op_id: u64,
    /// Ops staged.
    pub count: u64,
    /// The op id of the last CLEAR staged, if any.
    pub clear_op_id: Option<u64>,
    /// Wrapping sum of the checksums from the last CLEAR (included) on, or
    /// of every op without one.
    pub checksum: u32,
    /// Ops from the last CLEAR (included) on, or every op without one.
    pub count_since_clear: u64,
}

impl StagedSummary {
    /// Count one more op (a CLEAR when `clear`), staged after every op
    /// counted so far.
    pub fn add(&mut self, op_id: u64, clear: bool, checksum: u32) {
        if clear {
            self.clear_op_id = Some(op_id);
            self.checksum = 0;
            self.count_since_clear = 0;
        }
        self.checksum = self.checksum.wrapping_add(checksum);
        self.count_since_clear += 1;
        self.count += 1;
        self.last_op_id = self.last_op_id.max(op_id);
    }
}
