//! Upload outcomes, durably: every op's outcome is stored with the
//! completion of its upload (see [`ferry_queue::Answer`]), so an app that
//! was not listening when it arrived (disconnected, restarted, a slow
//! subscriber) can still learn every write's fate.

use ferry_protocol::Outcome;

use crate::{ClientError, Database, UploadOutcome};

/// The form an outcome is stored in: the row of a `merged` outcome is left
/// out (it reaches the visible state with the next checkpoint, and rows
/// can be large).
pub(crate) fn encode_stored(outcome: &UploadOutcome) -> Result<Vec<u8>, ClientError> {
    let mut stored = outcome.clone();
    if let Outcome::Merged { row, .. } = &mut stored.outcome.outcome {
        *row = None;
    }
    serde_json::to_vec(&stored)
        .map_err(|e| ClientError::Task(format!("encoding outcome of seq {}: {e}", outcome.outcome.seq)))
}

impl Database {
    /// Outcomes of the writes with seqs after `after_seq`, in seq order, at
    /// most `limit`: what [`Database::subscribe_outcomes`] delivered (or
    /// would have, had the app been listening), read back from the store.
    /// The newest `LocalDbOptions::max_outcomes_kept` are kept; a `merged`
    /// outcome comes without its row here. Pass the last seq the app has
    /// handled to resume after a restart.
    pub fn outcomes_since(&self, after_seq: u64, limit: usize) -> Result<Vec<UploadOutcome>, ClientError> {
        self.inner
            .local
            .outcome_records_since(after_seq, limit)?
            .into_iter()
            .map(|(seq, bytes)| {
                serde_json::from_slice(&bytes).map_err(|e| {
                    ClientError::Store(ferry_store::StoreError::Corrupt(format!(
                        "stored outcome of seq {seq}: {e}"
                    )))
                })
            })
            .collect()
    }
}
