//! Changes made directly in the source database (the app's backend, psql,
//! a migration) turned into ops, so they reach every device that should
//! have the row.
//!
//! The database captures the ids of changed rows
//! ([`SourceTx::take_captured`]; PostgreSQL: triggers). One server at a
//! time ([`SourceDb::try_lead`]) takes them in batches of at most
//! [`MAX_CAPTURE_BATCH`] and, in the same write transaction, reads each
//! row as it is now and records it as a server write at the server's clock
//! (`SourceTx::set_clocks`: the row itself is not written again, so the
//! app's own triggers do not fire twice): every column's clock is the
//! server's HLC, so the change wins over every write before it; a row that is gone gets a tombstone. The ops go to
//! the buckets the row is in now (REMOVE from those it left), as for an
//! upload. A row changed several times before it is taken is read once.
//! A row too large for a line is left out, with a warning.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use ferry_core::HlcTimestamp;
use ferry_transport::blocking;

use super::{blocking_error, Inner, SyncService};
use crate::db::SourceTx;
use crate::error::Result;

/// Most captured changes taken in one write transaction.
pub const MAX_CAPTURE_BATCH: usize = 500;
/// How often the capture job looks without a notification.
pub const CAPTURE_POLL_MS: u64 = 1_000;
/// How often a server that is not the capture leader tries to become it.
pub const CAPTURE_LEAD_RETRY_MS: u64 = 2_000;

impl Inner {
    /// Take one batch of captured changes and write their ops. Returns the
    /// number of changes taken.
    pub(crate) fn apply_captured(&self, limit: usize) -> Result<usize> {
        let mut taken = 0;
        crate::db::write(self.db.as_ref(), |stx| {
            let changes = stx.take_captured(limit)?;
            taken = changes.len();
            let rows: BTreeSet<(String, String)> = changes.into_iter().map(|c| (c.table, c.id)).collect();
            for (table, id) in &rows {
                self.apply_captured_row(stx, table, id)?;
            }
            Ok(())
        })?;
        Ok(taken)
    }

    fn apply_captured_row(&self, stx: &mut dyn SourceTx, table: &str, id: &str) -> Result<()> {
        let Ok(t) = self.rules.schema().table(table) else {
            return Ok(());
        };
        let current = stx.read_row(t, id)?;
        let hlc: HlcTimestamp = self.hlc.now();
        match current.and_then(|c| c.data) {
            Some(row) => {
                if let Err(reason) = self.check_encoded_size(table, id, &row) {
                    tracing::warn!(table, id, "a row changed in the database is not synced: {reason}");
                    return Ok(());
                }
                let clocks: BTreeMap<String, HlcTimestamp> =
                    t.columns.iter().map(|c| (c.name.clone(), hlc.clone())).collect();
                // The row is the database's own: only its clocks are
                // Ferry's to record.
                stx.set_clocks(table, id, &clocks)?;
                self.emit_row(stx, table, id, Some(&row))?;
            }
            None => {
                if stx.row_buckets(table, id)?.is_empty() {
                    // Never synced (inserted and deleted before it was
                    // taken): nothing to remove anywhere.
                    return Ok(());
                }
                stx.delete_row(t, id, &hlc)?;
                self.emit_row(stx, table, id, None)?;
            }
        }
        Ok(())
    }
}

impl SyncService {
    /// Take and apply captured changes until none are left (at most
    /// `max_batches` batches). Returns the number of changes taken. The
    /// capture job ([`SyncService::run_capture`]) calls it; tests and
    /// tools may call it directly.
    pub async fn apply_captured(&self, max_batches: usize) -> Result<usize> {
        let mut total = 0;
        for _ in 0..max_batches {
            let inner = self.inner.clone();
            let n = blocking::run(move || inner.apply_captured(MAX_CAPTURE_BATCH))
                .await
                .map_err(blocking_error)??;
            total += n;
            if n < MAX_CAPTURE_BATCH {
                break;
            }
        }
        Ok(total)
    }

    /// The capture job: until the service shuts down, become the capture
    /// leader when no other server is, and while leading apply captured
    /// changes as they are notified (and every [`CAPTURE_POLL_MS`]).
    /// Errors are logged and retried after a poll interval.
    pub async fn run_capture(&self) {
        let mut shutdown = self.inner.shutdown.subscribe();
        let mut captures = self.inner.db.captures();
        loop {
            if *shutdown.borrow() {
                return;
            }
            let Some(lease) = self.lead("capture").await else {
                tokio::select! {
                    _ = shutdown.changed() => {}
                    () = tokio::time::sleep(Duration::from_millis(CAPTURE_LEAD_RETRY_MS)) => {}
                }
                continue;
            };
            tracing::info!("capture: this server applies changes made in the database");
            while lease.is_held() && !*shutdown.borrow() {
                captures.borrow_and_update();
                match self.apply_captured(1).await {
                    Ok(n) if n >= MAX_CAPTURE_BATCH => continue,
                    Ok(_) => {}
                    Err(e) => tracing::warn!("capture: {e}"),
                }
                tokio::select! {
                    _ = shutdown.changed() => {}
                    r = captures.changed() => {
                        if r.is_err() {
                            tokio::time::sleep(Duration::from_millis(CAPTURE_POLL_MS)).await;
                        }
                    }
                    () = tokio::time::sleep(Duration::from_millis(CAPTURE_POLL_MS)) => {}
                }
            }
            drop(lease);
        }
    }
}
