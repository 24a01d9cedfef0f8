//! Bounds on everything that grows. Every limit has its unit in its name.

use serde::{Deserialize, Serialize};

/// Limits enforced on local writes and the upload queue.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Largest row accepted, counting id, column names and values.
    pub max_row_bytes: usize,
    /// Longest row id accepted.
    pub max_id_bytes: usize,
    /// Most operations one local write transaction may hold.
    pub max_ops_per_transaction: usize,
    /// Most entries the upload queue may hold; writes beyond it are refused
    /// with a transient error until uploads drain the queue.
    pub max_queue_entries: u64,
    /// Most queue entries returned by one batch read.
    pub max_batch_entries: usize,
    /// Most entries kept in the rejections log (oldest dropped first).
    pub max_rejections_logged: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_row_bytes: 1024 * 1024,
            max_id_bytes: 256,
            max_ops_per_transaction: 100_000,
            max_queue_entries: 10_000_000,
            max_batch_entries: 10_000,
            max_rejections_logged: 1_000,
        }
    }
}
