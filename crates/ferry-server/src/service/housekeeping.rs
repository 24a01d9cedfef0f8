//! Housekeeping a long-running server needs: bucket compaction on a
//! schedule, one server at a time among those sharing the database
//! ([`SourceDb::try_lead`]). Compaction keeps each bucket's checksum and
//! state; it runs bucket by bucket, one write transaction each, holding
//! one bucket's log in memory at a time. (Upload outcomes need no timer:
//! each upload prunes its client's outcomes below its first seq, see
//! `write.rs`, so at most one request's worth per client is kept.)

use std::time::Duration;

use ferry_transport::blocking;

use super::SyncService;
use crate::db::{Lease, SourceDb};

/// The default interval between compactions (`compact_interval_s`).
pub const DEFAULT_COMPACT_INTERVAL_S: u64 = 3_600;

impl SyncService {
    /// Ask to be the one server doing `job` ([`SourceDb::try_lead`], off
    /// the async threads): the lease, or `None` while another server
    /// holds it or when the database cannot be asked (logged).
    pub(crate) async fn lead(&self, job: &'static str) -> Option<Box<dyn Lease>> {
        let db = self.inner.db.clone();
        match blocking::run(move || SourceDb::try_lead(db.as_ref(), job)).await {
            Ok(Ok(lease)) => lease,
            Ok(Err(e)) => {
                tracing::warn!("{job}: cannot ask for the lead: {e}");
                None
            }
            Err(e) => {
                tracing::warn!("{job}: {e}");
                None
            }
        }
    }

    /// Every `interval_s` seconds until the service shuts down: when no
    /// other server is compacting, compact every bucket. `0`: never.
    /// Errors are logged; the next round tries again.
    pub async fn run_compaction(&self, interval_s: u64) {
        if interval_s == 0 {
            return;
        }
        let mut shutdown = self.inner.shutdown.subscribe();
        loop {
            tokio::select! {
                _ = shutdown.changed() => {}
                () = tokio::time::sleep(Duration::from_secs(interval_s)) => {}
            }
            if *shutdown.borrow() {
                return;
            }
            let Some(lease) = self.lead("compact").await else {
                tracing::debug!("compaction: another server compacts");
                continue;
            };
            match self.compact_all().await {
                Ok(n) => tracing::info!(buckets = n, "compaction: done"),
                Err(e) => tracing::warn!("compaction: {e}"),
            }
            drop(lease);
        }
    }
}
