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
//!
//! A `TRUNCATE` of a synced table is captured as one change of the table
//! ([`CaptureKind::Truncate`]), which ends its batch: the changes captured
//! after it wait until it is handled. Handling it walks the ids Ferry
//! knows of in that table (clocks, bucket membership:
//! [`SourceTx::vanished_rows`]), at most [`MAX_TRUNCATE_ROWS_PER_TX`] per
//! write transaction, the change put back with its progress between them
//! ([`SourceTx::put_back_captured`]), and deletes each row the table does
//! not hold now as a captured DELETE would. Rows the table holds again
//! (inserted after the truncate, in its transaction or a later one) are
//! left to their own captured changes, so they survive.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use ferry_core::{HlcTimestamp, Table};
use ferry_transport::blocking;

use super::{blocking_error, Inner, SyncService};
use crate::db::{CaptureKind, CapturedChange, SourceTx};
use crate::error::{Result, ServiceError};

/// Most captured changes taken in one write transaction.
pub const MAX_CAPTURE_BATCH: usize = 500;
/// Most rows a truncate's handling looks at, and so deletes, in one write
/// transaction ([`SourceTx::vanished_rows`]); a larger table takes
/// several, one after the other.
pub const MAX_TRUNCATE_ROWS_PER_TX: usize = 500;
/// How often the capture job looks without a notification.
pub const CAPTURE_POLL_MS: u64 = 1_000;
/// How often a server that is not the capture leader tries to become it.
pub const CAPTURE_LEAD_RETRY_MS: u64 = 2_000;

/// What one capture transaction did.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct CaptureStep {
    /// Changes taken and done (a truncate counts once, when its last rows
    /// are handled).
    pub(crate) done: usize,
    /// Whether more may be waiting right away: a full batch, or a
    /// truncate (unfinished, or finished with the changes after it left
    /// for the next batch).
    pub(crate) more: bool,
}

impl Inner {
    /// Take one batch of captured changes and write their ops. A row the
    /// database refuses to read (a value out of range for its Ferry type,
    /// a `numeric` too large for `real`) fails the batch; the batch is
    /// then taken again with each row in a savepoint, and such rows left
    /// out with a warning, so one row cannot stop every later change.
    pub(crate) fn apply_captured(&self, limit: usize) -> Result<CaptureStep> {
        match self.apply_captured_batch(limit, false) {
            Err(ServiceError::Refused(reason)) => {
                tracing::info!("capture: a row was refused ({reason}); taking the batch again row by row");
                self.apply_captured_batch(limit, true)
            }
            r => r,
        }
    }

    /// [`Inner::apply_captured`]'s one write transaction; `one_by_one`:
    /// each row in a savepoint, a refused one left out.
    fn apply_captured_batch(&self, limit: usize, one_by_one: bool) -> Result<CaptureStep> {
        let mut step = CaptureStep::default();
        crate::db::write(self.db.as_ref(), |stx| {
            step = CaptureStep::default();
            let changes = stx.take_captured(limit)?;
            step.more = changes.len() >= limit;
            // Each row once, with the columns its changes named (`None`:
            // every column, when any change did not say).
            let mut rows: BTreeMap<(String, String), Option<BTreeSet<String>>> = BTreeMap::new();
            let mut truncate = None;
            for c in changes {
                match c.kind {
                    CaptureKind::Row => {
                        let named = rows.entry((c.table, c.id)).or_insert_with(|| Some(BTreeSet::new()));
                        match (named.as_mut(), c.columns) {
                            (Some(set), Some(columns)) => set.extend(columns),
                            _ => *named = None,
                        }
                        step.done += 1;
                    }
                    // The last change taken (the database leaves the
                    // later ones for the next batch).
                    CaptureKind::Truncate { .. } => truncate = Some(c),
                }
            }
            if !one_by_one {
                // The rows and their memberships in one flight per table,
                // not a read per row (a refused read fails the flight; row
                // by row reads each alone).
                let mut by_table: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
                for (table, id) in rows.keys() {
                    by_table.entry(table).or_default().push(id);
                }
                for (table, ids) in by_table {
                    if let Ok(t) = self.rules.schema().table(table) {
                        stx.prefetch_rows(t, &ids)?;
                    }
                }
            }
            for ((table, id), columns) in &rows {
                let columns = columns.as_ref();
                if one_by_one {
                    self.unless_refused(stx, table, id, |stx| self.apply_captured_row(stx, table, id, columns))?;
                } else {
                    self.apply_captured_row(stx, table, id, columns)?;
                }
            }
            if let Some(c) = truncate {
                step.more = true;
                if self.apply_truncate(stx, c, one_by_one)? {
                    step.done += 1;
                }
            }
            Ok(())
        })?;
        Ok(step)
    }

    /// Run `work` for one row in a savepoint; a refusal rolls it back and
    /// leaves the row out with a warning (it stays on devices as it was).
    fn unless_refused(
        &self,
        stx: &mut dyn SourceTx,
        table: &str,
        id: &str,
        work: impl FnOnce(&mut dyn SourceTx) -> Result<()>,
    ) -> Result<()> {
        stx.savepoint()?;
        match work(stx) {
            Ok(()) => Ok(stx.release_savepoint()?),
            Err(ServiceError::Refused(reason)) => {
                stx.rollback_to_savepoint()?;
                tracing::warn!(table, id, "a row changed in the database is not synced: {reason}");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Turn a row's captured changes into ops: the row as the table holds
    /// it now, with the server's clock for the `columns` the changes named
    /// (`None`: every column). The other columns keep their clocks, so a
    /// device's offline edit of one of them made before this change still
    /// wins when it arrives, as under column-level last-write-wins between
    /// devices. A row Ferry holds no clocks for takes the clock in every
    /// column.
    fn apply_captured_row(
        &self,
        stx: &mut dyn SourceTx,
        table: &str,
        id: &str,
        columns: Option<&BTreeSet<String>>,
    ) -> Result<()> {
        let Ok(t) = self.rules.schema().table(table) else {
            return Ok(());
        };
        let current = stx.read_row(t, id)?;
        let hlc: HlcTimestamp = self.hlc.now();
        let (data, known) = match current {
            Some(c) => (c.data, c.clocks),
            None => (None, BTreeMap::new()),
        };
        match data {
            Some(row) => {
                if let Err(reason) = self.check_encoded_size(table, id, &row) {
                    tracing::warn!(table, id, "a row changed in the database is not synced: {reason}");
                    return Ok(());
                }
                let clocks: BTreeMap<String, HlcTimestamp> = t
                    .columns
                    .iter()
                    .map(|c| {
                        let moved = columns.is_none_or(|named| named.contains(&c.name));
                        let clock = match known.get(&c.name) {
                            Some(kept) if !moved => kept.clone(),
                            _ => hlc.clone(),
                        };
                        (c.name.clone(), clock)
                    })
                    .collect();
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

    /// One transaction's share of a truncate of a table: the next
    /// [`MAX_TRUNCATE_ROWS_PER_TX`] ids Ferry knows of in that table, of
    /// which those the table does not hold now are deleted as a captured
    /// DELETE deletes a row (a tombstone, REMOVE from their buckets). A
    /// row the table holds now was written after the truncate: by the
    /// app (its own captured change puts it, after this one) or by Ferry
    /// (already right), so it is left alone, not written again. Returns
    /// whether the truncate is done; if not, it is put back with its
    /// progress for the next transaction.
    fn apply_truncate(&self, stx: &mut dyn SourceTx, change: CapturedChange, one_by_one: bool) -> Result<bool> {
        let Ok(t) = self.rules.schema().table(&change.table) else {
            // No longer synced: nothing of it is on any device.
            return Ok(true);
        };
        let after_id = match &change.kind {
            CaptureKind::Truncate { after_id } => after_id.clone(),
            CaptureKind::Row => None,
        };
        let step = stx.vanished_rows(t, after_id.as_deref(), MAX_TRUNCATE_ROWS_PER_TX)?;
        for id in &step.ids {
            if one_by_one {
                self.unless_refused(stx, &t.name, id, |stx| self.apply_vanished_row(stx, t, id))?;
            } else {
                self.apply_vanished_row(stx, t, id)?;
            }
        }
        match step.next_after {
            Some(next) => {
                stx.put_back_captured(&CapturedChange {
                    kind: CaptureKind::Truncate { after_id: Some(next) },
                    ..change
                })?;
                Ok(false)
            }
            None => Ok(true),
        }
    }

    /// Delete a row Ferry knew of that the table no longer holds: a
    /// tombstone in place of its clocks (also for a row in no bucket, so
    /// Ferry's bookkeeping no longer lists it), REMOVE from its buckets.
    fn apply_vanished_row(&self, stx: &mut dyn SourceTx, t: &Table, id: &str) -> Result<()> {
        if stx.read_row(t, id)?.is_some_and(|r| r.data.is_some()) {
            // Back since the walk looked: its own captured change puts it.
            return Ok(());
        }
        let hlc: HlcTimestamp = self.hlc.now();
        stx.delete_row(t, id, &hlc)?;
        self.emit_row(stx, &t.name, id, None)
    }
}

impl SyncService {
    /// Take and apply captured changes until none are left (at most
    /// `max_batches` write transactions). Returns the number of changes
    /// done (a truncate counts once, when all its rows are handled). The
    /// capture job ([`SyncService::run_capture`]) does the same; tests
    /// and tools may call it directly.
    pub async fn apply_captured(&self, max_batches: usize) -> Result<usize> {
        let mut total = 0;
        for _ in 0..max_batches {
            let step = self.capture_step().await?;
            total += step.done;
            if !step.more {
                break;
            }
        }
        Ok(total)
    }

    /// One capture transaction, off the async threads.
    async fn capture_step(&self) -> Result<CaptureStep> {
        let inner = self.inner.clone();
        blocking::run(move || inner.apply_captured(MAX_CAPTURE_BATCH))
            .await
            .map_err(blocking_error)?
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
                match self.capture_step().await {
                    Ok(step) if step.more => continue,
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
