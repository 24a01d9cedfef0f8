//! Imports: rows the server itself loads (bulk loading, migrations),
//! through the write path's steps (validation, conflict strategy, row
//! write, bucket placement, op log and bucket state) with server clocks and
//! no client.
//!
//! Every op is checked against the schema and the row limits before
//! anything is written; then the import commits in batches of at most
//! [`MAX_IMPORT_BATCH_OPS`] ops, one write transaction each, so it holds
//! the writer one batch at a time (uploads and other writers take turns,
//! streams see the rows batch by batch).
//!
//! Inside a batch, the rows the database knows nothing of (no row, no
//! tombstone, no bucket membership: [`SourceTx::known_rows`], asked once
//! per batch) whose strategy decision is a plain write go the bulk way:
//! written together ([`SourceTx::write_rows`]), their op log entries
//! appended together ([`SourceTx::append_ops`]), each bucket's state
//! updated once per flush. Every other op (a stored row, a delete, side
//! writes, an id seen before in the batch) goes the per-op way after the
//! rows before it were flushed, so op ids, checksums, bucket states and
//! rows are those the per-op path gives the same ops.
//!
//! What a batch needs no database for (each op's clock, the strategy's
//! decision over no stored row, and for a plain write its size check,
//! buckets, JSON and checksum encoding: `import/prepare.rs`) is worked out
//! for the next batch on a helper thread while the writer writes the
//! current one. Clocks stay in op order: the writer uses a worked-out op
//! only while every op of its batch before it was worked out too (the
//! first op it works out itself, a row it finds stored, a delete, ends
//! that for the batch), and the next batch's are used only when the
//! current batch used nothing but worked-out ops (else the writer works
//! the next batch out itself, after).

mod check;
mod prepare;

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap, HashSet};

use ferry_core::clock::SharedClocksJson;
use ferry_core::{codec, CrudEntry, CrudOp, RowData, Table};
use ferry_protocol::{OpKind, Outcome};
use ferry_transport::blocking;

use self::prepare::{FreshClocks, FreshRow};
use super::bucket_adds::BucketAdds;
use super::write::{Refusal, Resolved};
use super::{blocking_error, Inner, SyncService};
use crate::conflict::{Decision, Resolution};
use crate::db::{NewOp, RowWrite, SourceTx};
use crate::error::{Result, ServiceError};

/// Most ops of an import written in one database transaction.
pub const MAX_IMPORT_BATCH_OPS: usize = 2_000;

/// How a batch is written: the bulk way (the service's), or every op
/// through the upload path's per-op steps (the reference the bulk way is
/// tested against).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ImportPath {
    Bulk,
    #[cfg_attr(not(test), allow(dead_code))]
    PerOp,
}

impl SyncService {
    /// Import rows as the server itself (bulk loading, migrations): at most
    /// `max_upload_ops` ops, each through the write path (validation,
    /// conflict strategy, row write, bucket placement, op log and bucket
    /// state) with server clocks and no client (no outcomes, no write
    /// checkpoint). Returns the number of ops applied.
    ///
    /// Every op is checked first against the schema and the row limits
    /// (table, id, column names and types, row size): one that fails
    /// refuses the whole import (`bad_request` naming it) before anything
    /// is written. The ops then commit in order, in batches of at most
    /// [`MAX_IMPORT_BATCH_OPS`] ops, one database transaction each. An op
    /// refused on what the database holds (its conflict strategy rejects
    /// it, the merged row is over a limit, the database refuses the write)
    /// rolls back its batch and stops the import: the batches before it
    /// stay committed, and the error says how many ops they hold. Importing
    /// the same rows again is harmless (a row with the same values gets
    /// no new op), so a stopped import can be run again whole.
    pub async fn import(&self, ops: Vec<CrudOp>) -> Result<usize> {
        let limit = self.inner.options.max_upload_ops;
        if ops.len() > limit {
            return Err(ServiceError::TooLarge(format!(
                "import of {} ops exceeds the limit of {limit} ops",
                ops.len()
            )));
        }
        let inner = self.inner.clone();
        let n = ops.len();
        let (result, spent) = blocking::run(move || inner.import_ops(ops, ImportPath::Bulk))
            .await
            .map_err(blocking_error)?;
        // The ops' many small allocations are freed while the caller goes
        // on (making the next ops, for a loader).
        blocking::release(spent);
        result.map(|()| n)
    }
}

/// Rows of one table waiting to be written the bulk way.
#[derive(Default)]
struct Pending<'a> {
    table: Option<&'a Table>,
    rows: Vec<PendingRow<'a>>,
}

struct PendingRow<'a> {
    op: &'a CrudOp,
    fresh: Cow<'a, FreshRow>,
}

impl PendingRow<'_> {
    fn data(&self) -> &RowData {
        prepare::fresh_data(&self.fresh.row, self.op)
    }
}

/// Where the clocks of a written batch came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BatchClocks {
    /// Every op was worked out ahead: the next batch's worked-out ops,
    /// whose clocks were drawn after these, may be used.
    Ahead,
    /// The writer drew clocks (`fell_back`: some op went the per-op way,
    /// a row was stored already or a delete).
    Writer { fell_back: bool },
}

/// Whether an id comes twice in `ids` (ids in ascending order, as a bulk
/// load's mostly are, need no set to tell).
fn has_repeats(ids: &[&str]) -> bool {
    if ids.windows(2).all(|w| w[0] < w[1]) {
        return false;
    }
    let mut seen = HashSet::with_capacity(ids.len());
    !ids.iter().all(|id| seen.insert(*id))
}

/// The error of an op the import refused.
fn refused(entry: &CrudEntry, reason: &str) -> ServiceError {
    ServiceError::BadRequest(format!(
        "import of {}/{} rejected: {reason}",
        entry.op.table(),
        entry.op.id()
    ))
}

/// `e` with what the import committed before it.
fn after_committed(e: ServiceError, committed_ops: usize) -> ServiceError {
    if committed_ops == 0 {
        return e;
    }
    let note =
        |m: String| format!("{m} (the import stopped there; its first {committed_ops} ops were imported, none after)");
    match e {
        ServiceError::BadRequest(m) => ServiceError::BadRequest(note(m)),
        ServiceError::Refused(m) => ServiceError::Refused(note(m)),
        ServiceError::TooLarge(m) => ServiceError::TooLarge(note(m)),
        ServiceError::Database(m) => ServiceError::Database(note(m)),
        ServiceError::Busy(m) => ServiceError::Busy(note(m)),
        other => other,
    }
}

impl Inner {
    /// Process an import (see [`SyncService::import`]).
    #[cfg(test)]
    pub(super) fn process_import(&self, ops: Vec<CrudOp>, path: ImportPath) -> Result<()> {
        self.import_ops(ops, path).0
    }

    /// Process an import (see [`SyncService::import`]), handing the ops
    /// back (checked, as entries) for the caller to free.
    fn import_ops(&self, ops: Vec<CrudOp>, path: ImportPath) -> (Result<()>, Vec<CrudEntry>) {
        let mut entries: Vec<CrudEntry> = Vec::with_capacity(ops.len());
        let result = self.import_into(ops, path, &mut entries);
        (result, entries)
    }

    /// [`Inner::import_ops`], the checked ops kept in `entries`.
    fn import_into(&self, ops: Vec<CrudOp>, path: ImportPath, entries: &mut Vec<CrudEntry>) -> Result<()> {
        let tables = self.check_import(ops, entries)?;
        let batches: Vec<(&[CrudEntry], &[&Table])> = entries
            .chunks(MAX_IMPORT_BATCH_OPS)
            .zip(tables.chunks(MAX_IMPORT_BATCH_OPS))
            .collect();
        match path {
            ImportPath::Bulk => self.import_batches(&batches),
            ImportPath::PerOp => {
                let mut committed = 0;
                for (batch, tables) in batches {
                    crate::db::write(self.db.as_ref(), |stx| self.import_batch_per_op(stx, batch, tables))
                        .map_err(|e| after_committed(e, committed))?;
                    committed += batch.len();
                }
                Ok(())
            }
        }
    }

    /// The batches the bulk way, one write transaction each, the next
    /// batch worked out on a helper thread meanwhile (see the module).
    fn import_batches(&self, batches: &[(&[CrudEntry], &[&Table])]) -> Result<()> {
        std::thread::scope(|scope| {
            let mut committed = 0;
            // The first batch's ops worked out before anything is written.
            let mut ahead: Option<Vec<Option<FreshRow>>> =
                batches.first().map(|(batch, tables)| self.prepare_batch(batch, tables));
            // The last written batch's worked-out ops, for the next helper
            // to free.
            let mut spent: Option<Vec<Option<FreshRow>>> = None;
            for (k, (batch, tables)) in batches.iter().enumerate() {
                let current = ahead.take();
                let next = batches.get(k + 1);
                // The helper works the next batch out while this one is
                // written (only after a batch of worked-out ops: an
                // import of stored rows gains nothing from it).
                let helper = match (next, &current) {
                    (Some(&(next_batch, next_tables)), Some(_)) => {
                        // The batch before's worked-out ops are freed there
                        // too: many small allocations, off the writer.
                        let spent = spent.take();
                        std::thread::Builder::new()
                            .name("ferry-import-prepare".into())
                            .spawn_scoped(scope, move || {
                                drop(spent);
                                self.prepare_batch(next_batch, next_tables)
                            })
                            .ok()
                    }
                    _ => None,
                };
                let mut clocks = BatchClocks::Ahead;
                crate::db::write(self.db.as_ref(), |stx| {
                    clocks = self.import_batch(stx, batch, tables, current.as_deref())?;
                    Ok(())
                })
                .map_err(|e| after_committed(e, committed))?;
                committed += batch.len();
                // A helper that panicked worked nothing out.
                let worked_out = helper.and_then(|h| h.join().ok());
                ahead = match clocks {
                    BatchClocks::Ahead => worked_out,
                    // The writer drew clocks while the helper did: the
                    // next batch's would come before them. Worked out
                    // again, after, unless this batch went the per-op way.
                    BatchClocks::Writer { fell_back: false } => {
                        next.map(|(next_batch, next_tables)| self.prepare_batch(next_batch, next_tables))
                    }
                    BatchClocks::Writer { fell_back: true } => None,
                };
                spent = current;
            }
            Ok(())
        })
    }

    /// [`Inner::check_op`], and for a PUT the size of the row it writes
    /// over no stored row (every column, absent ones NULL).
    fn check_import_op(&self, sent: CrudOp) -> std::result::Result<(&Table, CrudOp), Refusal> {
        let (table, op) = self.check_op_named(sent)?;
        if let CrudOp::Put { id, data, .. } = &op {
            if let Err(reason) = self.check_row_size(table, id, data) {
                return Err(Refusal::of(reason, op));
            }
        }
        Ok((table, op))
    }

    /// Refuse a row over `max_row_encoded_bytes` of JSON or
    /// `max_row_bytes` (the limits a written row must keep).
    fn check_row_size(&self, table: &Table, id: &str, row: &RowData) -> std::result::Result<(), String> {
        self.check_encoded_size(&table.name, id, row)?;
        let max = self.options.limits.max_row_bytes;
        let size_bytes = ferry_core::row_size_bytes(id, row);
        if size_bytes > max {
            return Err(format!(
                "row {}/{id} would be {size_bytes} bytes, over the limit of {max} bytes",
                table.name
            ));
        }
        Ok(())
    }

    /// One batch the per-op way: every op through the upload path's steps.
    fn import_batch_per_op(&self, stx: &mut dyn SourceTx, entries: &[CrudEntry], tables: &[&Table]) -> Result<()> {
        for (entry, table) in entries.iter().zip(tables) {
            if let Outcome::Rejected { reason } =
                self.apply_checked(stx, None, "", "", None, entry, (table, &entry.op))?
            {
                return Err(refused(entry, &reason));
            }
        }
        Ok(())
    }

    /// One batch the bulk way (see the module), with its ops worked out
    /// ahead (`ahead`, one per op) if they were. Returns where its clocks
    /// came from.
    fn import_batch<'a>(
        &self,
        stx: &mut dyn SourceTx,
        entries: &'a [CrudEntry],
        tables: &'a [&'a Table],
        ahead: Option<&'a [Option<FreshRow>]>,
    ) -> Result<BatchClocks> {
        // What the database holds of the batch's rows, as the batch
        // starts; once an op went the per-op way (its side writes may
        // write any row), each op asks for its own row.
        let mut known: HashMap<&str, BTreeSet<String>> = HashMap::new();
        // Whether an id comes twice in the batch (in one table): only
        // then are the rows written the bulk way remembered, to send the
        // second one the per-op way.
        let mut repeats = false;
        let mut distinct: Vec<&Table> = Vec::new();
        for t in tables {
            if !distinct.iter().any(|k| k.name == t.name) {
                distinct.push(t);
            }
        }
        for t in distinct {
            let ids: Vec<&str> = entries
                .iter()
                .zip(tables)
                .filter(|(_, k)| k.name == t.name)
                .map(|(e, _)| e.op.id())
                .collect();
            repeats = repeats || has_repeats(&ids);
            known.insert(t.name.as_str(), stx.known_rows(t, &ids)?);
        }
        let mut exact = true;
        // Worked-out ops are used while every op before was one.
        let mut ahead = ahead.filter(|a| a.len() == entries.len());
        let mut fell_back = false;
        // Rows written (or waiting to be) the bulk way in this batch.
        let mut touched: HashSet<(&str, &str)> = HashSet::new();
        let mut pending = Pending::default();
        for (i, (entry, &table)) in entries.iter().zip(tables).enumerate() {
            let op = &entry.op;
            let id = op.id();
            let key = (table.name.as_str(), id);
            let fresh = !matches!(op, CrudOp::Delete { .. })
                && (!repeats || !touched.contains(&key))
                && if exact {
                    !known.get(key.0).is_some_and(|k| k.contains(id))
                } else {
                    stx.known_rows(table, &[id])?.is_empty()
                };
            if !fresh {
                self.flush(stx, &mut pending)?;
                exact = false;
                (ahead, fell_back) = (None, true);
                if let Outcome::Rejected { reason } = self.apply_checked(stx, None, "", "", None, entry, (table, op))? {
                    return Err(refused(entry, &reason));
                }
                continue;
            }
            if let Some(Some(worked_out)) = ahead.map(|a| &a[i]) {
                worked_out.size.clone().map_err(|reason| refused(entry, &reason))?;
                self.push_pending(stx, &mut pending, table, op, Cow::Borrowed(worked_out))?;
                if repeats {
                    touched.insert(key);
                }
                continue;
            }
            ahead = None;
            let hlc = self.op_clock("", entry);
            let Decision {
                resolution,
                reason,
                conflict_id,
                side_writes,
            } = self.resolve_op((table, op), entry, &hlc, ("", ""), None);
            let resolution = match resolution {
                Resolution::Write { row, clocks, .. } if side_writes.is_empty() => {
                    let worked_out = self.fresh_row(
                        table,
                        op,
                        Some(row),
                        FreshClocks::Columns(clocks),
                        &mut SharedClocksJson::default(),
                    );
                    worked_out.size.clone().map_err(|reason| refused(entry, &reason))?;
                    self.push_pending(stx, &mut pending, table, op, Cow::Owned(worked_out))?;
                    if repeats {
                        touched.insert(key);
                    }
                    continue;
                }
                Resolution::Keep { .. } if side_writes.is_empty() => continue,
                Resolution::Reject { reason } => return Err(refused(entry, &reason)),
                other => other,
            };
            // A delete or side writes: the per-op way, after the rows
            // before it.
            self.flush(stx, &mut pending)?;
            exact = false;
            fell_back = true;
            let outcome = self.apply_decision(
                stx,
                None,
                None,
                Resolved {
                    table,
                    id,
                    current: None,
                    hlc: &hlc,
                    decision: Decision {
                        resolution,
                        reason,
                        conflict_id,
                        side_writes,
                    },
                },
            )?;
            if let Outcome::Rejected { reason } = outcome {
                return Err(refused(entry, &reason));
            }
        }
        self.flush(stx, &mut pending)?;
        Ok(match ahead {
            Some(_) => BatchClocks::Ahead,
            None => BatchClocks::Writer { fell_back },
        })
    }

    /// Queue a new row for the bulk way (the rows of another table
    /// flushed first).
    fn push_pending<'a>(
        &self,
        stx: &mut dyn SourceTx,
        pending: &mut Pending<'a>,
        table: &'a Table,
        op: &'a CrudOp,
        fresh: Cow<'a, FreshRow>,
    ) -> Result<()> {
        if pending.table.is_some_and(|t| t.name != table.name) {
            self.flush(stx, pending)?;
        }
        pending.table = Some(table);
        pending.rows.push(PendingRow { op, fresh });
        Ok(())
    }

    /// Write the pending rows, append their PUTs in the buckets they are
    /// in (op ids in row order, each row's buckets in order, as
    /// `emit_row` appends them), record their membership, and advance
    /// each bucket's state once.
    fn flush(&self, stx: &mut dyn SourceTx, pending: &mut Pending<'_>) -> Result<()> {
        let Some(table) = pending.table.take() else {
            return Ok(());
        };
        let rows = std::mem::take(&mut pending.rows);
        if rows.is_empty() {
            return Ok(());
        }
        let writes: Vec<RowWrite<'_>> = rows
            .iter()
            .map(|r| RowWrite {
                id: r.op.id(),
                data: r.data(),
                clocks: r.fresh.clocks.as_row_clocks(),
                clocks_json: r.fresh.clocks_json.as_deref(),
            })
            .collect();
        let stored = stx.write_rows(table, &writes)?;
        if stored.len() != rows.len() {
            return Err(ServiceError::Database(format!(
                "the database answered {} rows for a bulk write of {}",
                stored.len(),
                rows.len()
            )));
        }
        // The rows as the database keeps them: a row it changed is
        // worked out again.
        let written: Vec<(&str, &RowData, Cow<'_, FreshRow>)> = rows
            .iter()
            .zip(stored)
            .map(|(r, s)| match s {
                None => (r.op.id(), r.data(), Cow::Borrowed(r.fresh.as_ref())),
                Some(row) => (
                    r.op.id(),
                    r.data(),
                    Cow::Owned(FreshRow {
                        buckets: self.rules.row_buckets(&table.name, r.op.id(), &row),
                        data_json: None,
                        clocks_json: None,
                        encoded: codec::encode_row(&row),
                        size: Ok(()),
                        row: Some(row),
                        clocks: r.fresh.clocks.clone(),
                    }),
                ),
            })
            .collect();
        let mut ops: Vec<NewOp<'_>> = Vec::with_capacity(written.len());
        // Each bucket's entries in this flush: checksum sum, count, last.
        let mut added = BucketAdds::default();
        for (id, sent, fresh) in &written {
            let row = fresh.row.as_ref().unwrap_or(sent);
            for b in &fresh.buckets {
                let op_id = stx.next_op_id()?;
                let checksum =
                    ferry_protocol::op_checksum_encoded(op_id, OpKind::Put, &table.name, id, Some(&fresh.encoded));
                ops.push(NewOp {
                    op_id,
                    bucket: b,
                    op: OpKind::Put,
                    table: &table.name,
                    row_id: id,
                    data: Some(row),
                    data_json: fresh.data_json.as_deref(),
                    checksum,
                });
                added.add(b, op_id, checksum);
            }
        }
        stx.append_ops(&ops)?;
        let members: Vec<(&str, &BTreeSet<String>)> = written
            .iter()
            .filter(|(_, _, fresh)| !fresh.buckets.is_empty())
            .map(|(id, _, fresh)| (*id, &fresh.buckets))
            .collect();
        // Rows the bulk way are new: no membership to replace.
        stx.add_rows_buckets(&table.name, &members)?;
        added.apply(stx)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use ferry_core::{CrudOp, RowData, Value};

    use super::{ImportPath, MAX_IMPORT_BATCH_OPS};
    use crate::db::{OpRange, SourceDb};
    use crate::sqlite::SqliteSourceDb;
    use crate::{SyncRules, SyncService};

    fn service(dir: &std::path::Path) -> SyncService {
        let db = SqliteSourceDb::open_dir(dir).expect("open db");
        SyncService::builder(Arc::new(db), SyncRules::ticket_tracker().expect("rules"), "secret")
            .build()
            .expect("build")
    }

    fn ticket(i: usize, status: &str) -> CrudOp {
        let data: RowData = [
            ("title".to_owned(), Value::Text(format!("ticket {i}"))),
            ("status".to_owned(), Value::Text(status.to_owned())),
            ("version".to_owned(), Value::Integer(1)),
        ]
        .into_iter()
        .collect();
        CrudOp::Put {
            table: "tickets".into(),
            id: format!("t{i}"),
            data,
        }
    }

    fn assignment(i: usize) -> CrudOp {
        let data: RowData = [
            ("ticket_id".to_owned(), Value::Text(format!("t{i}"))),
            ("user_id".to_owned(), Value::Text(format!("u{}", i % 7))),
        ]
        .into_iter()
        .collect();
        CrudOp::Put {
            table: "assignments".into(),
            id: format!("a{i}"),
            data,
        }
    }

    /// Imports whose ops take every way through a batch: new rows (more
    /// than a batch of them, in two tables, rows in one and in two
    /// buckets), an id twice in a batch, a PATCH, deletes of
    /// a row and of an unknown one, a row written again after its delete,
    /// and a second import over stored rows (same values: no op; new
    /// values: PUTs; a membership that changes: a REMOVE).
    fn imports() -> Vec<Vec<CrudOp>> {
        let mut first: Vec<CrudOp> = (0..MAX_IMPORT_BATCH_OPS + 300).map(|i| ticket(i, "open")).collect();
        first.extend((0..50).map(assignment));
        first.push(ticket(5, "done"));
        first.push(CrudOp::Patch {
            table: "tickets".into(),
            id: "t9".into(),
            data: [("title".to_owned(), Value::Text("only a title".into()))]
                .into_iter()
                .collect(),
        });
        first.push(CrudOp::Delete {
            table: "tickets".into(),
            id: "t7".into(),
        });
        first.push(CrudOp::Delete {
            table: "tickets".into(),
            id: "never".into(),
        });
        first.push(ticket(7, "reopened"));
        first.extend((0..40).map(|i| ticket(i, "open")));
        let mut second: Vec<CrudOp> = (10..30).map(|i| ticket(i, "open")).collect();
        second.extend((30..40).map(|i| ticket(i, "done")));
        second.push(CrudOp::Patch {
            table: "assignments".into(),
            id: "a3".into(),
            data: [("user_id".to_owned(), Value::Text("u9".into()))].into_iter().collect(),
        });
        second.extend((MAX_IMPORT_BATCH_OPS..MAX_IMPORT_BATCH_OPS + 10).map(|i| ticket(i + 1_000, "new")));
        vec![first, second]
    }

    /// Everything a client can see of the op log: every bucket's entries
    /// and state, and the last op id.
    fn op_log(db: &dyn SourceDb) -> Vec<String> {
        let mut out = Vec::new();
        for b in db.bucket_names().expect("bucket names") {
            for e in db.read_ops(&OpRange::all(&b)).expect("read ops") {
                out.push(format!("{b} {e:?}"));
            }
        }
        let changes = db.changes_since(0, &[]).expect("changes");
        out.push(format!("{changes:?}"));
        out
    }

    #[test]
    fn bulk_import_writes_what_the_per_op_path_writes() {
        let (d1, d2) = (
            tempfile::tempdir().expect("tempdir"),
            tempfile::tempdir().expect("tempdir"),
        );
        let (per_op, bulk) = (service(d1.path()), service(d2.path()));
        for ops in imports() {
            per_op
                .inner
                .process_import(ops.clone(), ImportPath::PerOp)
                .expect("per-op import");
            bulk.inner.process_import(ops, ImportPath::Bulk).expect("bulk import");
        }
        let (a, b) = (op_log(per_op.db().as_ref()), op_log(bulk.db().as_ref()));
        assert!(a.len() > MAX_IMPORT_BATCH_OPS + 300, "{} entries", a.len());
        assert!(a.iter().any(|l| l.contains("Remove")), "a membership changed");
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x, y);
        }
        let schema = SyncRules::ticket_tracker().expect("rules").schema().clone();
        for (t, ids) in [
            ("tickets", vec!["t0", "t5", "t7", "t9", "t35", "never", "t3000"]),
            ("assignments", vec!["a3"]),
        ] {
            let table = schema.table(t).expect("table");
            for id in ids {
                let (x, y) = (
                    per_op.db().get_row(table, id).expect("read"),
                    bulk.db().get_row(table, id).expect("read"),
                );
                assert_eq!(x.as_ref().map(|r| &r.data), y.as_ref().map(|r| &r.data), "{t}/{id}");
                assert_eq!(
                    x.as_ref().map(|r| r.deleted.is_some()),
                    y.as_ref().map(|r| r.deleted.is_some()),
                    "{t}/{id}"
                );
                assert_eq!(
                    x.map(|r| r.clocks.keys().cloned().collect::<Vec<_>>()),
                    y.map(|r| r.clocks.keys().cloned().collect::<Vec<_>>()),
                    "{t}/{id}"
                );
            }
        }
    }

    #[test]
    fn both_paths_refuse_a_patch_of_a_missing_row_alike() {
        let (d1, d2) = (
            tempfile::tempdir().expect("tempdir"),
            tempfile::tempdir().expect("tempdir"),
        );
        let (per_op, bulk) = (service(d1.path()), service(d2.path()));
        let ops = vec![
            ticket(1, "open"),
            CrudOp::Patch {
                table: "tickets".into(),
                id: "missing".into(),
                data: [("title".to_owned(), Value::Text("x".into()))].into_iter().collect(),
            },
        ];
        let a = per_op.inner.process_import(ops.clone(), ImportPath::PerOp);
        let b = bulk.inner.process_import(ops, ImportPath::Bulk);
        let (a, b) = (a.expect_err("refused"), b.expect_err("refused"));
        assert_eq!(a.to_string(), b.to_string());
        assert!(a.to_string().contains("tickets/missing"), "{a}");
        assert_eq!(bulk.db().oplog_len().expect("len"), 0, "the batch is rolled back");
    }

    /// A large import is checked on two threads: the refusal is still
    /// its first bad op's, in either half, and nothing is imported.
    #[test]
    fn a_large_import_is_refused_at_its_first_bad_op() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bulk = service(dir.path());
        let n = 4 * MAX_IMPORT_BATCH_OPS + 10;
        let bad = || CrudOp::Put {
            table: "no_such_table".into(),
            id: "x".into(),
            data: RowData::new(),
        };
        let mut ops: Vec<CrudOp> = (0..n).map(|i| ticket(i, "open")).collect();
        ops[n - 5] = bad();
        let e = bulk
            .inner
            .process_import(ops.clone(), ImportPath::Bulk)
            .expect_err("refused");
        assert!(e.to_string().contains(&format!("(op {} of {n})", n - 5)), "{e}");
        ops[3] = bad();
        let e = bulk.inner.process_import(ops, ImportPath::Bulk).expect_err("refused");
        assert!(e.to_string().contains(&format!("(op 3 of {n})")), "{e}");
        assert_eq!(bulk.db().oplog_len().expect("len"), 0, "nothing imported");
    }

    /// Clocks follow the ops' order across batches worked out ahead, a
    /// batch that went the per-op way (a stored row first), the batch
    /// after it, and deletes: each new row's clock is later than every
    /// clock of the ops before it.
    #[test]
    fn clocks_follow_the_ops_across_batches() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bulk = service(dir.path());
        let b = MAX_IMPORT_BATCH_OPS;
        // Batch 0: new rows; batch 1: new rows worked out ahead, a delete
        // in their middle; batch 2: a stored row first (the per-op way),
        // then new rows; batches 3 and 4: new rows again.
        let mut ops: Vec<CrudOp> = (0..b + 100).map(|i| ticket(i, "open")).collect();
        ops.push(CrudOp::Delete {
            table: "tickets".into(),
            id: "t1".into(),
        });
        ops.extend((b + 100..2 * b - 1).map(|i| ticket(i, "open")));
        ops.push(ticket(3, "done"));
        ops.extend((2 * b - 1..4 * b + 48).map(|i| ticket(i, "open")));
        assert_eq!(ops.len(), 4 * b + 50);
        bulk.inner
            .process_import(ops.clone(), ImportPath::Bulk)
            .expect("import");
        let schema = SyncRules::ticket_tracker().expect("rules").schema().clone();
        let table = schema.table("tickets").expect("table");
        let mut last = None;
        for op in &ops {
            let id = op.id();
            let row = bulk.db().get_row(table, id).expect("read").expect("stored");
            let clock = match op {
                CrudOp::Delete { .. } => row.deleted.clone().expect("a tombstone"),
                _ if id == "t3" || id == "t1" => continue,
                _ => {
                    let mut clocks: Vec<_> = row.clocks.values().cloned().collect();
                    clocks.dedup();
                    assert_eq!(clocks.len(), 1, "{id}: one clock for every column");
                    clocks.remove(0)
                }
            };
            if let Some(prev) = &last {
                assert!(clock > *prev, "{id} at {clock} is not after {prev}");
            }
            last = Some(clock);
        }
    }
}
