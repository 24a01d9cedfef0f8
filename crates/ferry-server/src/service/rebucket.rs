//! Bucket membership of rows that are already there: pointed at a
//! database that holds rows Ferry never wrote (an existing PostgreSQL
//! database), or started with bucket definitions that changed, the service
//! computes every row's buckets again in the background, in batches of at
//! most [`MAX_REBUCKET_BATCH`] rows per write transaction, while serving.
//!
//! A row whose buckets differ from the stored membership gets PUT ops in
//! the buckets it joins and REMOVE ops in those it leaves; a row Ferry
//! never wrote (no column clocks) gets clocks at the server's time and
//! PUTs. A batch's ops are appended together and each bucket's state is
//! advanced once per batch, with the op ids and checksums one op at a
//! time would give. Clients converge through their normal streams, without
//! reinstalling. The pass runs when the rules' fingerprint (bucket
//! definitions and synced tables) differs from the one stored after the
//! last complete pass, one server at a time ([`crate::db::SourceDb::try_lead`]); a
//! pass cut short (a crash) runs again from the start: it is idempotent.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::time::Duration;

use ferry_core::{HlcTimestamp, RowData, Table};
use ferry_protocol::OpKind;
use ferry_transport::blocking;

use super::bucket_adds::BucketAdds;
use super::{blocking_error, Fnv64, Inner, SyncService};
use crate::db::{NewOp, SourceTx};
use crate::error::{Result, ServiceError};

/// Most rows looked at in one write transaction.
pub const MAX_REBUCKET_BATCH: usize = 500;
/// The meta key of the fingerprint of the rules the last complete pass
/// used.
pub const META_RULES_FINGERPRINT: &str = "ferry.rules_fingerprint";
/// How often a server that is not the leader asks again while a pass is
/// due, and how long a failed pass waits before it starts over.
const REBUCKET_LEAD_RETRY_MS: u64 = 2_000;

impl Inner {
    /// The fingerprint of what decides membership: the bucket definitions
    /// and the synced tables with their columns.
    pub(crate) fn rules_fingerprint(&self) -> String {
        let mut h = Fnv64::new();
        // Serializing plain data into a hasher cannot fail.
        let _ = serde_json::to_writer(&mut h, self.rules.buckets());
        for t in self.rules.schema().tables() {
            let _ = write!(h, "|{}", t.name);
            for c in &t.columns {
                let _ = write!(h, ",{}:{}", c.name, c.ty.name());
            }
        }
        format!("{:016x}", h.0)
    }

    /// Look at one batch of `table`'s rows after `after`; returns the last
    /// id looked at (`None`: the table is done) and the rows changed. The
    /// batch's ops are appended together ([`SourceTx::append_ops`]), in
    /// the order (and with the ids and checksums) one op at a time would
    /// give them, and each bucket's state is advanced once.
    ///
    /// A batch the database refuses (a row whose bucket name is too long
    /// for Ferry's indexes) is looked at again row by row, and a refused
    /// row is left out of its buckets (logged), so the pass goes on.
    fn rebucket_batch(&self, table: &Table, after: Option<&str>, limit: usize) -> Result<(Option<String>, usize)> {
        let ids = self.db.row_ids(table, after, limit)?;
        let changed = match self.rebucket_rows(table, &ids) {
            Err(ServiceError::Refused(_)) => {
                let mut changed = 0;
                for id in &ids {
                    match self.rebucket_rows(table, std::slice::from_ref(id)) {
                        Ok(n) => changed += n,
                        Err(ServiceError::Refused(reason)) => tracing::warn!(
                            table = %table.name,
                            id = id.as_str(),
                            "a row is left out of its buckets: the database refused it: {reason}"
                        ),
                        Err(e) => return Err(e),
                    }
                }
                changed
            }
            changed => changed?,
        };
        let next = if ids.len() < limit { None } else { ids.last().cloned() };
        Ok((next, changed))
    }

    /// Place the rows of `ids` in one write transaction; returns the rows
    /// changed.
    fn rebucket_rows(&self, table: &Table, ids: &[String]) -> Result<usize> {
        let mut changed = 0;
        crate::db::write(self.db.as_ref(), |stx| {
            let moves = self.rebucket_moves(stx, table, ids)?;
            changed = moves.len();
            let mut ops: Vec<NewOp<'_>> = Vec::new();
            let mut added = BucketAdds::default();
            for m in &moves {
                let puts = m.joined.iter().map(|b| (b, OpKind::Put, Some(&m.data)));
                let removes = m.left.iter().map(|b| (b, OpKind::Remove, None));
                for (bucket, op, data) in puts.chain(removes) {
                    let op_id = stx.next_op_id()?;
                    let checksum = ferry_protocol::op_checksum(op_id, op, &table.name, &m.id, data);
                    ops.push(NewOp {
                        op_id,
                        bucket,
                        op,
                        table: &table.name,
                        row_id: &m.id,
                        data,
                        data_json: None,
                        checksum,
                    });
                    added.add(bucket, op_id, checksum);
                }
            }
            stx.append_ops(&ops)?;
            let members: Vec<(&str, &BTreeSet<String>)> = moves.iter().map(|m| (m.id.as_str(), &m.new)).collect();
            stx.set_rows_buckets(&table.name, &members)?;
            added.apply(stx)?;
            Ok(())
        })?;
        Ok(changed)
    }

    /// The rows of `ids` whose membership changes (or that get their
    /// first clocks, recorded here), in order, with the buckets they join
    /// and leave.
    fn rebucket_moves(&self, stx: &mut dyn SourceTx, table: &Table, ids: &[String]) -> Result<Vec<Move>> {
        let mut moves = Vec::new();
        let id_refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        let states = stx.read_rows_with_buckets(table, &id_refs)?;
        // The first clocks of rows the database wrote without Ferry, set
        // together after.
        let mut first_clocks: Vec<(&str, BTreeMap<String, HlcTimestamp>)> = Vec::new();
        for (id, (current, old)) in ids.iter().zip(states) {
            let Some(current) = current else {
                continue;
            };
            let Some(data) = current.data else {
                continue;
            };
            let new = self.rules.row_buckets(&table.name, id, &data);
            let unsynced = current.clocks.is_empty() && !table.columns.is_empty();
            // Nothing to do: the same buckets, and clocks already (or
            // no bucket wants the row).
            let needs_clocks = unsynced && !new.is_empty();
            if new == old && !needs_clocks {
                continue;
            }
            if let Err(reason) = self.check_encoded_size(&table.name, id, &data) {
                tracing::warn!(table = %table.name, id, "a row is left out of its buckets: {reason}");
                continue;
            }
            let joined: Vec<String> = if unsynced {
                // The row is the database's own: only its clocks are
                // Ferry's to record.
                let hlc: HlcTimestamp = self.hlc.now();
                let clocks: BTreeMap<String, HlcTimestamp> =
                    table.columns.iter().map(|c| (c.name.clone(), hlc.clone())).collect();
                first_clocks.push((id, clocks));
                new.iter().cloned().collect()
            } else {
                new.difference(&old).cloned().collect()
            };
            let left: Vec<String> = old.difference(&new).cloned().collect();
            moves.push(Move {
                id: id.clone(),
                data,
                joined,
                left,
                new,
            });
        }
        let first_clocks: Vec<(&str, &BTreeMap<String, HlcTimestamp>)> =
            first_clocks.iter().map(|(id, clocks)| (*id, clocks)).collect();
        stx.set_many_clocks(&table.name, &first_clocks)?;
        Ok(moves)
    }
}

/// One row's change of membership in a rebucket batch.
struct Move {
    id: String,
    /// The row's values (its PUTs carry them).
    data: RowData,
    /// Buckets it gets a PUT in.
    joined: Vec<String>,
    /// Buckets it gets a REMOVE in.
    left: Vec<String>,
    /// Its membership after.
    new: BTreeSet<String>,
}

impl SyncService {
    /// One whole pass over every synced table (see the module), then the
    /// rules' fingerprint stored. Returns the rows whose membership
    /// changed.
    pub async fn rebucket_all(&self) -> Result<usize> {
        let mut changed = 0;
        let tables: Vec<Table> = self
            .inner
            .rules
            .schema()
            .tables()
            .filter(|t| !t.local_only)
            .cloned()
            .collect();
        for table in tables {
            let mut after: Option<String> = None;
            loop {
                let inner = self.inner.clone();
                let t = table.clone();
                let cursor = after.clone();
                let (next, n) = blocking::run(move || inner.rebucket_batch(&t, cursor.as_deref(), MAX_REBUCKET_BATCH))
                    .await
                    .map_err(blocking_error)??;
                changed += n;
                match next {
                    Some(id) => after = Some(id),
                    None => break,
                }
                if *self.inner.shutdown.borrow() {
                    return Ok(changed);
                }
            }
        }
        let inner = self.inner.clone();
        blocking::run(move || {
            let fp = inner.rules_fingerprint();
            crate::db::write(inner.db.as_ref(), |stx| Ok(stx.set_meta(META_RULES_FINGERPRINT, &fp)?))
        })
        .await
        .map_err(blocking_error)??;
        Ok(changed)
    }

    /// Whether the stored fingerprint differs from the rules' (a pass is
    /// due).
    pub async fn rebucket_due(&self) -> Result<bool> {
        let inner = self.inner.clone();
        blocking::run(
            move || Ok(inner.db.meta(META_RULES_FINGERPRINT)?.as_deref() != Some(&*inner.rules_fingerprint())),
        )
        .await
        .map_err(blocking_error)?
    }

    /// At start: while a pass is due, become its leader and run it (one
    /// server at a time); errors are logged and retried after
    /// [`REBUCKET_LEAD_RETRY_MS`] (a lasting one would otherwise start the
    /// pass over in a hot loop).
    pub async fn run_rebucket(&self) {
        let mut shutdown = self.inner.shutdown.subscribe();
        loop {
            if *shutdown.borrow() {
                return;
            }
            let wait = match self.rebucket_due().await {
                Ok(false) => return,
                Ok(true) => match self.lead("rebucket").await {
                    Some(lease) => {
                        // Another server may have finished a pass meanwhile.
                        let failed = match self.rebucket_due().await {
                            Ok(true) => {
                                tracing::info!("bucket membership: computing it again for every row");
                                match self.rebucket_all().await {
                                    Ok(n) => {
                                        tracing::info!(rows = n, "bucket membership: done");
                                        false
                                    }
                                    Err(e) => {
                                        tracing::warn!("bucket membership: {e}");
                                        true
                                    }
                                }
                            }
                            Ok(false) => false,
                            Err(e) => {
                                tracing::warn!("bucket membership: {e}");
                                true
                            }
                        };
                        drop(lease);
                        failed
                    }
                    // Another server leads.
                    None => true,
                },
                Err(e) => {
                    tracing::warn!("bucket membership: {e}");
                    true
                }
            };
            if wait {
                tokio::select! {
                    _ = shutdown.changed() => {}
                    () = tokio::time::sleep(Duration::from_millis(REBUCKET_LEAD_RETRY_MS)) => {}
                }
            }
        }
    }
}
