//! The write path of uploads, and the per-op steps imports share
//! (`import`): checking an op, the conflict strategy, writing the row
//! and its ops. Each client transaction runs in
//! one write transaction of the source database (replay and seq checks,
//! write permissions, the conflict strategy, side writes, rows, bucket
//! placement, op log entries with their checksums and bucket state,
//! outcomes and the client's progress), or is rolled back whole
//! (`docs/adr/0005-transactions-all-or-nothing.md`).

use super::*;

impl SyncService {
    /// Process an upload for an authenticated user. Each client
    /// transaction commits in one database transaction, together with its
    /// outcomes and the client's write checkpoint, or not at all: when one
    /// of its ops is rejected, every op of it is rejected
    /// (`docs/adr/0005-transactions-all-or-nothing.md`).
    ///
    /// Refused whole, before anything is written: a client id of another
    /// user (`unauthorized`); seqs that do not strictly increase, a new
    /// seq more than `max_seq_gap` above the client's last seq, a seq at
    /// or below it that was never recorded or was recorded for a different
    /// write (compared by a fingerprint of the op's content), all
    /// `bad_request`.
    pub async fn upload(&self, user: &AuthUser, request: UploadRequest) -> Result<UploadResponse> {
        let started = std::time::Instant::now();
        let result = self.upload_unmetered(user, request).await;
        let seconds = started.elapsed().as_secs_f64();
        match &result {
            Ok(answer) => self
                .inner
                .metrics
                .upload_answered(answer.outcomes.iter().map(|o| &o.outcome), seconds),
            Err(_) => self.inner.metrics.upload_refused(seconds),
        }
        result
    }

    async fn upload_unmetered(&self, user: &AuthUser, request: UploadRequest) -> Result<UploadResponse> {
        let o = &self.inner.options;
        check_client_id(&request.client_id, o.max_client_id_bytes)?;
        // Several transactions over the limit are refused whole: the
        // client sends them again one by one. A single transaction over a
        // limit is answered (each op rejected, recorded like any
        // rejection), not refused: its seqs would never be recorded, and
        // enough of them would put the client's next seqs past
        // `max_seq_gap` for good.
        let total: usize = request.transactions.iter().map(|t| t.ops.len()).sum();
        if total > o.max_upload_ops && request.transactions.len() > 1 {
            return Err(ServiceError::TooLarge(format!(
                "upload of {total} ops exceeds the limit of {} ops",
                o.max_upload_ops
            )));
        }
        let inner = self.inner.clone();
        let user = user.clone();
        // Until a change feed read after it, the feed looks at this
        // client's progress.
        let _seen_by_feed = super::feed::UploadGuard::new(&self.inner, &request.client_id);
        let result = blocking::run(move || inner.process_upload(&user, &request))
            .await
            .map_err(blocking_error)?;
        result
    }
}

/// The client's last seq (0 for a client that never uploaded), refusing a
/// client id of another user.
fn client_progress(stx: &mut dyn SourceTx, client_id: &str, user_id: &str) -> Result<u64> {
    match stx.client(client_id)? {
        Some(p) if p.user_id != user_id => Err(client_of_another_user(client_id)),
        Some(p) => Ok(p.last_seq),
        None => Ok(0),
    }
}

/// Append one op log entry: a new op id, its checksum
/// (`ferry_protocol::op_checksum`), and the bucket's state advanced (the
/// checksum is the wrapping sum of its entries'). Returns the op id.
pub(super) fn append_op(
    stx: &mut dyn SourceTx,
    bucket: &str,
    op: OpKind,
    table: &str,
    row_id: &str,
    data: Option<&RowData>,
) -> Result<u64> {
    let encoded = data.map(ferry_core::codec::encode_row);
    append_encoded_op(stx, bucket, op, (table, row_id), data, encoded.as_deref(), None)
}

/// [`append_op`] of a row encoded ahead: `encoded` is
/// `ferry_core::codec::encode_row` of `data` (the checksum's input), and
/// `json`, when given, its JSON.
fn append_encoded_op(
    stx: &mut dyn SourceTx,
    bucket: &str,
    op: OpKind,
    (table, row_id): (&str, &str),
    data: Option<&RowData>,
    encoded: Option<&[u8]>,
    json: Option<&str>,
) -> Result<u64> {
    let op_id = stx.next_op_id()?;
    let checksum = ferry_protocol::op_checksum_encoded(op_id, op, table, row_id, encoded);
    stx.append_op(NewOp {
        op_id,
        bucket,
        op,
        table,
        row_id,
        data,
        data_json: json,
        checksum,
    })?;
    let state = stx.bucket_state(bucket)?.unwrap_or_default();
    stx.set_bucket_state(
        bucket,
        &BucketState {
            checksum: state.checksum.wrapping_add(checksum),
            count: state.count.saturating_add(1),
            last_op_id: op_id,
        },
    )?;
    Ok(op_id)
}

fn progress_moved(client_id: &str) -> ServiceError {
    ServiceError::Busy(format!(
        "the progress of client {client_id:?} changed during the upload; retry"
    ))
}

/// A strategy's decision on one op, with what it was made over.
pub(super) struct Resolved<'a> {
    /// The op's table.
    pub(super) table: &'a Table,
    /// The row id.
    pub(super) id: &'a str,
    /// The stored row the decision saw.
    pub(super) current: Option<&'a StoredRow>,
    /// The op's clock.
    pub(super) hlc: &'a HlcTimestamp,
    /// The decision.
    pub(super) decision: crate::conflict::Decision,
}

/// A checked side write merged over the row it writes, ready to write.
struct MergedSideWrite<'a> {
    table: &'a Table,
    id: &'a str,
    /// The row before this side write (`None`: new).
    old: Option<RowData>,
    /// The row after it.
    row: RowData,
    clocks: BTreeMap<String, HlcTimestamp>,
}

/// A side write's columns over `base` (a new row has the others NULL);
/// each written column's clock is the later of the stored one and `hlc`.
fn merge_side_write(
    table: &Table,
    w: &SideWrite,
    base: Option<(RowData, BTreeMap<String, HlcTimestamp>)>,
    hlc: &HlcTimestamp,
) -> (RowData, BTreeMap<String, HlcTimestamp>) {
    let (mut row, mut clocks) = base.unwrap_or_else(|| {
        (
            table.columns.iter().map(|c| (c.name.clone(), Value::Null)).collect(),
            BTreeMap::new(),
        )
    });
    for (k, v) in &w.data {
        row.insert(k.clone(), v.clone());
        let later = match clocks.get(k) {
            Some(c) if c > hlc => c.clone(),
            _ => hlc.clone(),
        };
        clocks.insert(k.clone(), later);
    }
    (row, clocks)
}

/// The fingerprint of an op's content as received: FNV-1a 64 over the
/// serde_json encoding of the whole `CrudEntry` (seq, tx id, op, previous,
/// metadata, hlc; maps are ordered, so the encoding is canonical).
fn op_fingerprint(entry: &CrudEntry) -> Result<u64> {
    let mut h = Fnv64::new();
    serde_json::to_writer(&mut h, entry)
        .map_err(|e| ServiceError::BadRequest(format!("seq {} cannot be encoded: {e}", entry.seq)))?;
    Ok(h.0)
}

/// Refuse seqs that do not strictly increase across the whole request
/// (a repeat, or a step back, within or between transactions).
fn check_seq_order(request: &UploadRequest) -> Result<()> {
    let mut prev: Option<(u64, u64)> = None;
    for t in &request.transactions {
        for e in &t.ops {
            if let Some((p, p_tx)) = prev {
                if e.seq <= p {
                    let place = if p_tx == t.tx_id {
                        format!("inside transaction {}", t.tx_id)
                    } else {
                        format!("in transaction {} after transaction {p_tx}", t.tx_id)
                    };
                    return Err(ServiceError::BadRequest(format!(
                        "seq {} of client {:?} does not follow seq {p} {place}: seqs must strictly increase",
                        e.seq, request.client_id
                    )));
                }
            }
            prev = Some((e.seq, t.tx_id));
        }
    }
    Ok(())
}

/// Most bytes of one reason when an answer over `max_answer_bytes` still
/// does not fit after its rows were dropped.
const MAX_SHORTENED_REASON_BYTES: usize = 200;

/// Make an upload answer fit in `max_bytes` of JSON: drop the rows of
/// `merged` outcomes, largest first, until it fits; if it still does not,
/// shorten every reason to [`MAX_SHORTENED_REASON_BYTES`]. Every op keeps
/// its outcome.
fn fit_answer(response: &mut UploadResponse, max_bytes: usize) {
    let mut total = encoded_bytes(response);
    if total <= max_bytes {
        return;
    }
    let mut rows: Vec<(usize, usize)> = response
        .outcomes
        .iter()
        .enumerate()
        .filter_map(|(i, o)| match &o.outcome {
            // `"row":<json>,` in the answer.
            Outcome::Merged { row: Some(r), .. } => Some((i, encoded_bytes(r).saturating_add(7))),
            _ => None,
        })
        .collect();
    rows.sort_by_key(|&(i, size)| (std::cmp::Reverse(size), i));
    for (i, size) in rows {
        if total <= max_bytes {
            break;
        }
        if let Some(OpOutcome {
            outcome: Outcome::Merged { row, .. },
            ..
        }) = response.outcomes.get_mut(i)
        {
            *row = None;
            total = total.saturating_sub(size);
        }
    }
    if encoded_bytes(response) <= max_bytes {
        return;
    }
    for o in &mut response.outcomes {
        match &mut o.outcome {
            Outcome::Merged { reason, .. } | Outcome::Rejected { reason } => {
                shorten(reason, MAX_SHORTENED_REASON_BYTES);
            }
            Outcome::Applied | Outcome::NeedsReview { .. } => {}
        }
    }
}

/// Cut `s` to at most `max_bytes` (on a char boundary), marking the cut.
fn shorten(s: &mut String, max_bytes: usize) {
    const MARK: &str = "...";
    if s.len() <= max_bytes {
        return;
    }
    let mut end = max_bytes.saturating_sub(MARK.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
    s.push_str(MARK);
}

impl Inner {
    /// A stored outcome answered again: a `merged` row the user can no
    /// longer read is left out.
    fn replayed_outcome(&self, viewer: &Viewer, entry: &CrudEntry, outcome: Outcome) -> Outcome {
        match outcome {
            Outcome::Merged { row: Some(row), reason }
                if !self.readable(viewer, entry.op.table(), entry.op.id(), &row) =>
            {
                Outcome::Merged { row: None, reason }
            }
            o => o,
        }
    }

    /// Process an upload (see [`SyncService::upload`]). Order: owner,
    /// seq order, fingerprints, replays and seq gaps are all checked before
    /// anything is written; then each client transaction commits in one
    /// database transaction, or is rolled back and recorded as rejected
    /// in another.
    fn process_upload(&self, user: &AuthUser, request: &UploadRequest) -> Result<UploadResponse> {
        let client_id = request.client_id.as_str();
        let user_id = user.user_id.as_str();
        let serial = self.client_lock(client_id);
        let _serial = serial.lock();
        // The client's progress as committed: which ops are replays. It
        // may be stale; the write transactions read it again.
        let progress = self.db.client_progress(client_id)?;
        if progress.as_ref().is_some_and(|p| p.user_id != user_id) {
            return Err(client_of_another_user(client_id));
        }
        check_seq_order(request)?;
        let fingerprints: Vec<Vec<u64>> = request
            .transactions
            .iter()
            .map(|t| t.ops.iter().map(op_fingerprint).collect())
            .collect::<Result<_>>()?;
        let viewer = self.viewer(user);
        let writer = Writer {
            user_id,
            claims: &user.claims,
            buckets: &viewer,
        };

        // Replays: each must be the same write as the one recorded. With
        // none (every seq above the progress read, the usual upload), no
        // transaction is needed to tell: the one applying the ops finds
        // the progress moved if it did since, and the upload is retried.
        let mut last_seq = progress.map_or(0, |p| p.last_seq);
        let mut replayed: BTreeMap<u64, Outcome> = BTreeMap::new();
        let replays = request
            .transactions
            .iter()
            .flat_map(|t| t.ops.first())
            .any(|e| e.seq <= last_seq);
        if replays {
            crate::db::write(self.db.as_ref(), |stx| {
                replayed.clear();
                last_seq = client_progress(stx, client_id, user_id)?;
                for (t, fps) in request.transactions.iter().zip(&fingerprints) {
                    for (entry, fp) in t.ops.iter().zip(fps) {
                        if entry.seq > last_seq {
                            continue;
                        }
                        let Some(stored) = stx.outcome(client_id, entry.seq)? else {
                            return Err(ServiceError::BadRequest(format!(
                                "seq {} of client {client_id:?} has no recorded write: it is at or below the \
                             client's last seq {last_seq} but was never uploaded",
                                entry.seq
                            )));
                        };
                        // Outcomes recorded before fingerprints were kept
                        // (`None`) are answered as they are.
                        if stored.fingerprint.is_some_and(|f| f != *fp) {
                            return Err(ServiceError::BadRequest(format!(
                                "seq {} of client {client_id:?} was already used for a different write",
                                entry.seq
                            )));
                        }
                        replayed.insert(entry.seq, self.replayed_outcome(&viewer, entry, stored.outcome));
                    }
                }
                Ok(())
            })?;
        }
        let max_seq = request
            .transactions
            .iter()
            .flat_map(|t| t.ops.last())
            .map(|e| e.seq)
            .max();
        if let Some(max_seq) = max_seq.filter(|&s| s > last_seq) {
            let gap = max_seq - last_seq;
            if gap > self.options.max_seq_gap {
                return Err(ServiceError::BadRequest(format!(
                    "seq {max_seq} of client {client_id:?} is {gap} above its last seq {last_seq}, over the \
                     limit of {} (max_seq_gap)",
                    self.options.max_seq_gap
                )));
            }
        }

        // A client uploads from its oldest unanswered write: it has the
        // outcomes of everything before and never asks for them again, so
        // the first transaction that applies prunes them.
        let mut prune_below = request
            .transactions
            .iter()
            .flat_map(|t| t.ops.first())
            .map(|e| e.seq)
            .min();
        let mut outcomes = Vec::with_capacity(fingerprints.iter().map(Vec::len).sum());
        for (t, fps) in request.transactions.iter().zip(&fingerprints) {
            let fresh: Vec<(&CrudEntry, u64)> = t
                .ops
                .iter()
                .zip(fps.iter().copied())
                .filter(|(e, _)| e.seq > last_seq)
                .collect();
            let mut fresh_outcomes = if fresh.is_empty() {
                Vec::new()
            } else {
                let o = match self.oversized(t) {
                    Some(reason) => {
                        let refused = vec![Outcome::Rejected { reason }; fresh.len()];
                        self.record_rejected(client_id, user_id, &fresh, last_seq, &refused)?;
                        refused
                    }
                    None => {
                        self.apply_transaction(client_id, &writer, t.tx_id, &fresh, last_seq, prune_below.take())?
                    }
                };
                last_seq = fresh.last().map_or(last_seq, |(e, _)| e.seq);
                o
            }
            .into_iter();
            for e in &t.ops {
                let outcome = match replayed.remove(&e.seq) {
                    Some(o) => o,
                    None => fresh_outcomes.next().ok_or_else(|| {
                        ServiceError::Database(format!("no outcome for seq {} of client {client_id:?}", e.seq))
                    })?,
                };
                outcomes.push(OpOutcome { seq: e.seq, outcome });
            }
        }
        let mut response = UploadResponse {
            outcomes,
            write_checkpoint: last_seq,
            // After every clock of this upload was observed.
            hlc: Some(self.hlc.now()),
        };
        fit_answer(&mut response, self.options.max_answer_bytes);
        Ok(response)
    }

    /// Apply the new ops of one client transaction in one database
    /// transaction, with their outcomes and the client's last seq. When an
    /// op is rejected (and its table does not ask for per-op outcomes) the
    /// transaction is rolled back and every op of it is recorded as
    /// rejected, in a new transaction, so a replay gets the same answers.
    fn apply_transaction(
        &self,
        client_id: &str,
        writer: &Writer<'_>,
        tx_id: u64,
        fresh: &[(&CrudEntry, u64)],
        last_seq: u64,
        prune_below: Option<u64>,
    ) -> Result<Vec<Outcome>> {
        let Some(new_last) = fresh.last().map(|(e, _)| e.seq) else {
            return Ok(Vec::new());
        };
        let user_id = writer.user_id;
        // The rows the ops name, by table, read ahead in one go.
        let mut named: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        for (entry, _) in fresh {
            named.entry(entry.op.table()).or_default().insert(entry.op.id());
        }
        let mut outcomes = Vec::with_capacity(fresh.len());
        let mut failed: Option<(u64, String)> = None;
        // First with the ops' writes sent together (few round trips to a
        // database across a network); a write the database refuses then
        // fails that whole attempt, and a second one, op by op, finds the
        // op and rejects it alone.
        let mut together = true;
        let mut sent_together = false;
        let result = loop {
            let attempt = crate::db::write(self.db.as_ref(), |stx| {
                outcomes.clear();
                failed = None;
                sent_together = stx.defer_op_writes(together);
                // Sent together, the ops' op log entries are appended after
                // every other write of theirs (see `Emitted`).
                let mut emitted: Vec<Emitted> = Vec::new();
                if client_progress(stx, client_id, user_id)? != last_seq {
                    return Err(progress_moved(client_id));
                }
                if let Some(below) = prune_below {
                    stx.prune_outcomes(client_id, below)?;
                }
                for (table, ids) in &named {
                    if let Ok(t) = self.rules.schema().table(table) {
                        let ids: Vec<&str> = ids.iter().copied().collect();
                        stx.prefetch_rows(t, &ids)?;
                    }
                }
                for &(entry, fp) in fresh {
                    // A write the database refuses (a type, a constraint
                    // of the app's table) rejects this op alone. A
                    // database may send the op's writes only at the
                    // release, so a refusal may come from it too.
                    stx.savepoint()?;
                    let later = sent_together.then_some(&mut emitted);
                    let applied = self
                        .apply_op(stx, later, client_id, user_id, Some(writer), entry)
                        .and_then(|outcome| {
                            stx.release_savepoint()?;
                            Ok(outcome)
                        });
                    let outcome = match applied {
                        Ok(outcome) => outcome,
                        // Sent together, the refused write may be another
                        // op's: the attempt op by op tells.
                        Err(ServiceError::Refused(reason)) if sent_together => {
                            return Err(ServiceError::Refused(reason))
                        }
                        Err(ServiceError::Refused(reason)) => {
                            stx.rollback_to_savepoint()?;
                            Outcome::Rejected {
                                reason: format!(
                                    "the database refused the write to {}/{}: {reason}",
                                    entry.op.table(),
                                    entry.op.id()
                                ),
                            }
                        }
                        Err(e) => return Err(e),
                    };
                    if let Outcome::Rejected { reason } = &outcome {
                        if !self.rules.per_op_outcomes(entry.op.table()) {
                            failed = Some((entry.seq, reason.clone()));
                            // Rolls the database transaction back.
                            return Err(ServiceError::BadRequest(format!("transaction {tx_id} rolled back")));
                        }
                    }
                    stx.record_outcome(client_id, entry.seq, fp, &outcome)?;
                    outcomes.push(outcome);
                }
                for e in &emitted {
                    append_encoded_op(
                        stx,
                        &e.bucket,
                        e.op,
                        (&e.table, &e.id),
                        e.row.as_ref(),
                        e.encoded.as_deref(),
                        e.json.as_deref(),
                    )?;
                }
                Ok(stx.set_client(client_id, user_id, new_last)?)
            });
            match attempt {
                Err(ServiceError::Refused(_)) if sent_together => together = false,
                attempt => break attempt,
            }
        };
        let (failed_seq, reason) = match (result, failed) {
            (Ok(()), _) => return Ok(outcomes),
            (Err(_), Some(f)) => f,
            (Err(e), None) => return Err(e),
        };
        let outcomes: Vec<Outcome> = fresh
            .iter()
            .map(|(e, _)| Outcome::Rejected {
                reason: if e.seq == failed_seq {
                    reason.clone()
                } else {
                    format!("transaction {tx_id} rolled back: seq {failed_seq} was rejected: {reason}")
                },
            })
            .collect();
        self.record_rejected(client_id, user_id, fresh, last_seq, &outcomes)?;
        Ok(outcomes)
    }

    /// Why a client transaction is too large to apply (`None`: it is
    /// not): more ops than a transaction may hold, or, alone in its
    /// upload, more than an upload may hold.
    fn oversized(&self, t: &ferry_protocol::UploadTransaction) -> Option<String> {
        let o = &self.options;
        let limit = o.limits.max_ops_per_transaction.min(o.max_upload_ops);
        (t.ops.len() > limit).then(|| {
            format!(
                "transaction {} has {} ops, over the limit of {limit} ops",
                t.tx_id,
                t.ops.len()
            )
        })
    }

    /// Record `outcomes` (rejections) for the new ops of one client
    /// transaction, and the client's last seq moved to its last op, in one
    /// database transaction: a replay gets the same answers.
    fn record_rejected(
        &self,
        client_id: &str,
        user_id: &str,
        fresh: &[(&CrudEntry, u64)],
        last_seq: u64,
        outcomes: &[Outcome],
    ) -> Result<()> {
        let Some(new_last) = fresh.last().map(|(e, _)| e.seq) else {
            return Ok(());
        };
        crate::db::write(self.db.as_ref(), |stx| {
            if client_progress(stx, client_id, user_id)? != last_seq {
                return Err(progress_moved(client_id));
            }
            for ((e, fp), o) in fresh.iter().zip(outcomes) {
                stx.record_outcome(client_id, e.seq, *fp, o)?;
            }
            Ok(stx.set_client(client_id, user_id, new_last)?)
        })
    }

    /// The op's clock: the client's HLC with the uploading client's id as
    /// its node (a client never stamps another node's id, and the node's
    /// length is the client id's), its wall time clamped to server time +
    /// max skew; a server timestamp when the client sent none. The
    /// server's HLC observes it (`docs/adr/0006-client-clocks.md`).
    pub(super) fn op_clock(&self, client_id: &str, entry: &CrudEntry) -> HlcTimestamp {
        match &entry.hlc {
            Some(h) => {
                let max_wall = self.clock.now_ms().saturating_add(self.options.max_clock_skew_ms);
                if h.wall_ms > max_wall {
                    // Too far ahead: the server's own clock instead, which
                    // orders after everything it has seen, so two writes of
                    // one client clamped together keep their order (cutting
                    // both to the bound would tie them, and the later one
                    // would lose).
                    let mut t = self.hlc.now();
                    t.node = client_id.to_owned();
                    return t;
                }
                let h = HlcTimestamp {
                    wall_ms: h.wall_ms,
                    counter: h.counter,
                    node: client_id.to_owned(),
                };
                // Within the skew bound, so this succeeds.
                let _ = self.hlc.observe(&h);
                h
            }
            None => self.hlc.now(),
        }
    }

    /// Refuse a row whose JSON (as stored in the op log and sent in `data`
    /// lines) is over `max_row_encoded_bytes`.
    pub(super) fn check_encoded_size(&self, table: &str, id: &str, row: &RowData) -> std::result::Result<(), String> {
        let max = self.options.max_row_encoded_bytes;
        // What `encoded_bytes` counts, without serde's machinery.
        let size = ferry_core::json::row_json_len(row);
        if size > max {
            return Err(format!(
                "row {table}/{id} would encode to {size} bytes of JSON, over the limit of {max} bytes \
                 (max_row_encoded_bytes)"
            ));
        }
        Ok(())
    }

    /// Hold the row as the database keeps it (when its form differs from
    /// the row written: a `numeric` column read back in full) to the row
    /// limits, like the row as sent: over them, the database's write is
    /// refused (`Refused`: the op's writes are rolled back and it is
    /// rejected with the reason).
    fn check_stored_size(&self, table: &Table, id: &str, stored: &RowData) -> Result<()> {
        let max_bytes = self.options.limits.max_row_bytes;
        let size_bytes = row_size_bytes(id, stored);
        if size_bytes > max_bytes {
            return Err(ServiceError::Refused(format!(
                "as stored, row {}/{id} would be {size_bytes} bytes, over the limit of {max_bytes} bytes",
                table.name
            )));
        }
        self.check_encoded_size(&table.name, id, stored)
            .map_err(|reason| ServiceError::Refused(format!("as stored, {reason}")))
    }

    /// Apply one op. `writer` is the uploading user (`None` for the
    /// server's own imports): the write must pass the table's write
    /// permissions, checked before the conflict strategy runs; a `merged`
    /// row they cannot read is left out of the outcome, and so is a
    /// strategy's reason about a stored row they cannot read.
    fn apply_op(
        &self,
        stx: &mut dyn SourceTx,
        later: Option<&mut Vec<Emitted>>,
        client_id: &str,
        user_id: &str,
        writer: Option<&Writer<'_>>,
        entry: &CrudEntry,
    ) -> Result<Outcome> {
        match self.check_op(entry.op.clone()) {
            Ok((table, op)) => self.apply_checked(stx, later, client_id, user_id, writer, entry, (table, &op)),
            Err(reason) => Ok(Outcome::Rejected { reason }),
        }
    }

    /// Check an op against the schema and the row limits, without the
    /// database: its table (synced), id and values. Returns the table and
    /// the validated op (a PUT carries every column, absent ones NULL);
    /// `Err` is the reason it is rejected.
    pub(super) fn check_op(&self, sent: CrudOp) -> std::result::Result<(&Table, CrudOp), String> {
        self.check_op_named(sent).map_err(|r| r.reason)
    }

    /// [`Inner::check_op`], a refusal naming the op's table and id (taken
    /// from the op, so a caller need not copy them before).
    pub(super) fn check_op_named(&self, sent: CrudOp) -> std::result::Result<(&Table, CrudOp), Refusal> {
        let table = match self.rules.schema().table(sent.table()) {
            Ok(t) if !t.local_only => t,
            Ok(t) => return Err(Refusal::of(format!("table {:?} is local-only", t.name), sent)),
            Err(e) => return Err(Refusal::of(e.to_string(), sent)),
        };
        let limits = &self.options.limits;
        let refusal = |reason: String, id: String| Refusal {
            reason,
            table: table.name.clone(),
            id,
        };
        // The op's own table name is the schema table's (found by it).
        let op = match sent {
            CrudOp::Put { table: name, id, data } => {
                let mut full = match table.check_row(&id, data, limits) {
                    Ok(full) => full,
                    Err(e) => return Err(refusal(e.to_string(), id)),
                };
                for c in &table.columns {
                    if !full.contains_key(&c.name) {
                        full.insert(c.name.clone(), Value::Null);
                    }
                }
                CrudOp::Put {
                    table: name,
                    id,
                    data: full,
                }
            }
            CrudOp::Patch { table: name, id, data } => {
                if let Err(e) = table.check_id(&id, limits) {
                    return Err(refusal(e.to_string(), id));
                }
                let data = match table.check_data(data) {
                    Ok(data) => data,
                    Err(e) => return Err(refusal(e.to_string(), id)),
                };
                CrudOp::Patch { table: name, data, id }
            }
            delete @ CrudOp::Delete { .. } => match table.check_id(delete.id(), limits) {
                Ok(()) => delete,
                Err(e) => return Err(Refusal::of(e.to_string(), delete)),
            },
        };
        Ok((table, op))
    }

    /// The conflict strategy of `table`.
    pub(super) fn strategy(&self, table: &Table) -> &dyn ConflictStrategy {
        self.strategies
            .get(&table.name)
            .unwrap_or(&self.default_strategy)
            .as_ref()
    }

    /// The conflict strategy's decision on a checked op over the stored
    /// row `current`, at clock `hlc`.
    pub(super) fn resolve_op(
        &self,
        (table, op): (&Table, &CrudOp),
        entry: &CrudEntry,
        hlc: &HlcTimestamp,
        (client_id, user_id): (&str, &str),
        current: Option<&StoredRow>,
    ) -> crate::conflict::Decision {
        self.strategy(table).resolve(&ConflictInput {
            table,
            id: op.id(),
            op,
            hlc,
            base: entry.previous.as_ref(),
            client_id,
            user_id,
            seq: entry.seq,
            now_ms: self.clock.now_ms(),
            current,
        })
    }

    /// [`Inner::apply_op`] of an op [`Inner::check_op`] accepted.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn apply_checked(
        &self,
        stx: &mut dyn SourceTx,
        later: Option<&mut Vec<Emitted>>,
        client_id: &str,
        user_id: &str,
        writer: Option<&Writer<'_>>,
        entry: &CrudEntry,
        (table, op): (&Table, &CrudOp),
    ) -> Result<Outcome> {
        let id = entry.op.id();
        let current = stx.read_row(table, id)?;
        let old = current.as_ref().and_then(|c| c.data.as_ref());
        let judged = match writer {
            Some(w) => match self.check_permission(table, &entry.op, op, old, w) {
                Ok(new) => new,
                Err(reason) => return Ok(Outcome::Rejected { reason }),
            },
            None => None,
        };
        let hlc = self.op_clock(client_id, entry);
        let decision = self.resolve_op((table, op), entry, &hlc, (client_id, user_id), current.as_ref());
        if let (Some(w), Resolution::Write { row, .. }) = (writer, &decision.resolution) {
            // The strategy may keep stored values over sent ones, so the
            // row it writes can differ from the row judged above.
            if judged.as_ref() != Some(row) {
                if let Err(reason) = self.check_written(table, &entry.op, op, old, row, w) {
                    return Ok(Outcome::Rejected { reason });
                }
            }
        }
        self.apply_decision(
            stx,
            later,
            writer.map(|w| w.buckets),
            Resolved {
                table,
                id,
                current: current.as_ref(),
                hlc: &hlc,
                decision,
            },
        )
    }

    /// Carry out a strategy's decision: check the row's size, merge and
    /// check the side writes, write the row (or delete it) and the side
    /// writes, and append their ops. `viewer` is the uploading user's
    /// buckets (`None` for imports): what they cannot read is redacted
    /// from the outcome.
    pub(super) fn apply_decision(
        &self,
        stx: &mut dyn SourceTx,
        mut later: Option<&mut Vec<Emitted>>,
        viewer: Option<&Viewer>,
        resolved: Resolved<'_>,
    ) -> Result<Outcome> {
        let Resolved {
            table,
            id,
            current,
            hlc,
            decision,
        } = resolved;
        let limits = &self.options.limits;
        let old_data = current.and_then(|c| c.data.as_ref());
        // The user cannot read the stored row: a strategy's reason may
        // quote its values, so it is replaced.
        let hidden = viewer.is_some_and(|v| old_data.is_some_and(|d| !self.readable(v, &table.name, id, d)));
        let redacted = |outcome: Outcome| -> Outcome {
            let Some(v) = viewer else {
                return outcome;
            };
            match outcome {
                Outcome::Merged { row, reason } => {
                    let row = row.filter(|r| self.readable(v, &table.name, id, r));
                    let reason = if hidden && row.is_none() {
                        format!(
                            "the write to {}/{id} was merged with a stored row this user cannot read \
                             (details withheld)",
                            table.name
                        )
                    } else {
                        reason
                    };
                    Outcome::Merged { row, reason }
                }
                Outcome::Rejected { .. } if hidden => Outcome::Rejected {
                    reason: format!(
                        "the write to {}/{id} was refused because of a stored row this user cannot read \
                         (details withheld)",
                        table.name
                    ),
                },
                o => o,
            }
        };
        if let Err(reason) = match &decision.resolution {
            Resolution::Write { row, .. } => self.check_encoded_size(&table.name, id, row),
            _ => Ok(()),
        } {
            return Ok(redacted(Outcome::Rejected { reason }));
        }
        // Side writes are validated and merged over their stored rows
        // before anything is written: an invalid or oversized one rejects
        // the op.
        let main_result = match &decision.resolution {
            Resolution::Write { row, clocks, .. } => Some(Some((row, clocks))),
            Resolution::Delete { .. } => Some(None),
            Resolution::Keep { .. } | Resolution::Reject { .. } => None,
        };
        let mut side: Vec<MergedSideWrite<'_>> = Vec::with_capacity(decision.side_writes.len());
        for w in &decision.side_writes {
            let side_table = match self.check_side_write(w) {
                Ok((t, _)) => t,
                Err(reason) => return Ok(redacted(Outcome::Rejected { reason })),
            };
            // The row as it will be when this side write applies: an
            // earlier side write of this op, the op's own result, or the
            // stored row.
            let earlier = side
                .iter()
                .rev()
                .find(|s| s.table.name == side_table.name && s.id == w.id)
                .map(|s| Some((s.row.clone(), s.clocks.clone())));
            let base = match earlier {
                Some(b) => b,
                None if side_table.name == table.name && w.id == id && main_result.is_some() => {
                    main_result.flatten().map(|(r, c)| (r.clone(), c.clone()))
                }
                None => match stx.read_row(side_table, &w.id)? {
                    Some(StoredRow {
                        data: Some(d), clocks, ..
                    }) => Some((d, clocks)),
                    _ => None,
                },
            };
            let (row, clocks) = merge_side_write(side_table, w, base.clone(), hlc);
            if let Err(reason) = self.check_encoded_size(&w.table, &w.id, &row) {
                return Ok(redacted(Outcome::Rejected {
                    reason: format!("side write {}/{}: {reason}", w.table, w.id),
                }));
            }
            side.push(MergedSideWrite {
                table: side_table,
                id: &w.id,
                old: base.map(|(d, _)| d),
                row,
                clocks,
            });
        }
        // Side writes made while the stored row is hidden from the writer
        // may copy it (the audit log's old value, a conflict's server
        // value): one the writer could read refuses the op, its reason
        // withheld.
        if let Some(v) = viewer.filter(|_| hidden) {
            if let Some(s) = side.iter().find(|s| self.readable(v, &s.table.name, s.id, &s.row)) {
                return Ok(redacted(Outcome::Rejected {
                    reason: format!("side write {}/{} would show the stored row", s.table.name, s.id),
                }));
            }
        }
        let reason = decision.outcome_reason();
        let outcome = match &decision.resolution {
            Resolution::Reject { reason } => Outcome::Rejected { reason: reason.clone() },
            Resolution::Keep { row, reason: why } => Outcome::Merged {
                row: row.clone(),
                reason: reason.unwrap_or_else(|| why.clone()),
            },
            Resolution::Write { row, clocks, .. } => {
                let size_bytes = row_size_bytes(id, row);
                if size_bytes > limits.max_row_bytes {
                    // Its size is the stored row's too: withheld when
                    // the user cannot read that row.
                    return Ok(redacted(Outcome::Rejected {
                        reason: format!(
                            "row {}/{id} would be {size_bytes} bytes, over the limit of {} bytes",
                            table.name, limits.max_row_bytes
                        ),
                    }));
                }
                // The row as the database keeps it, when it differs in form.
                let stored = stx.write_row(table, id, row, clocks)?;
                if let Some(stored) = &stored {
                    self.check_stored_size(table, id, stored)?;
                }
                let row = stored.as_ref().unwrap_or(row);
                if old_data != Some(row) {
                    self.emit_row_into(stx, later.as_deref_mut(), &table.name, id, Some(row))?;
                }
                match reason {
                    Some(reason) => Outcome::Merged {
                        reason,
                        row: Some(row.clone()),
                    },
                    None => Outcome::Applied,
                }
            }
            Resolution::Delete { hlc } => {
                stx.delete_row(table, id, hlc)?;
                if old_data.is_some() {
                    self.emit_row_into(stx, later.as_deref_mut(), &table.name, id, None)?;
                }
                match reason {
                    Some(reason) => Outcome::Merged { row: None, reason },
                    None => Outcome::Applied,
                }
            }
        };
        for s in side {
            let stored = stx.write_row(s.table, s.id, &s.row, &s.clocks)?;
            let row = stored.as_ref().unwrap_or(&s.row);
            if s.old.as_ref() != Some(row) {
                self.emit_row_into(stx, later.as_deref_mut(), &s.table.name, s.id, Some(row))?;
            }
        }
        Ok(redacted(match (decision.conflict_id, outcome) {
            (_, outcome @ Outcome::Rejected { .. }) | (None, outcome) => outcome,
            (Some(conflict_id), _) => Outcome::NeedsReview { conflict_id },
        }))
    }

    /// Check a client write against the table's write permissions: `sent`
    /// is the op as uploaded, `op` the validated one (a PUT with every
    /// column), `old` the stored values. A PUT or PATCH of a row without
    /// stored values is an insert (its new row: the op's columns, the
    /// others NULL), of one with stored values an update (the stored row
    /// with the op's columns); a DELETE is a delete. `Ok` is the new row
    /// the rules judged (`None` for a delete), `Err` the reason.
    fn check_permission(
        &self,
        table: &Table,
        sent: &CrudOp,
        op: &CrudOp,
        old: Option<&RowData>,
        writer: &Writer<'_>,
    ) -> std::result::Result<Option<RowData>, String> {
        let new: Option<RowData> = match op {
            CrudOp::Put { data, .. } => Some(data.clone()),
            CrudOp::Patch { data, .. } => {
                let mut row = old
                    .cloned()
                    .unwrap_or_else(|| table.columns.iter().map(|c| (c.name.clone(), Value::Null)).collect());
                row.extend(data.iter().map(|(k, v)| (k.clone(), v.clone())));
                Some(row)
            }
            CrudOp::Delete { .. } => None,
        };
        let new_buckets = new
            .as_ref()
            .map(|r| self.rules.row_buckets(&table.name, op.id(), r))
            .unwrap_or_default();
        permissions::check(
            self.rules.permissions(&table.name),
            &self.write_request(table, sent, op, old, new.as_ref(), &new_buckets, writer),
            writer,
        )?;
        Ok(new)
    }

    /// After the conflict strategy: a client write's resulting `row`, when
    /// it is not the row [`Self::check_permission`] judged, must meet the
    /// rules too (see [`permissions::check_written`]).
    fn check_written(
        &self,
        table: &Table,
        sent: &CrudOp,
        op: &CrudOp,
        old: Option<&RowData>,
        row: &RowData,
        writer: &Writer<'_>,
    ) -> std::result::Result<(), String> {
        let perms = self.rules.permissions(&table.name);
        // The buckets matter only under `new_in_my_buckets`.
        let buckets = if perms.is_some_and(TablePermissions::new_in_my_buckets) {
            self.rules.row_buckets(&table.name, op.id(), row)
        } else {
            BTreeSet::new()
        };
        permissions::check_written(
            perms,
            &self.write_request(table, sent, op, old, Some(row), &buckets, writer),
            writer,
        )
    }

    /// A client write as the permissions see it: a PUT or PATCH of a row
    /// without stored values is an insert, of one with stored values an
    /// update; a DELETE is a delete.
    #[allow(clippy::too_many_arguments)]
    fn write_request<'a>(
        &self,
        table: &'a Table,
        sent: &'a CrudOp,
        op: &'a CrudOp,
        old: Option<&'a RowData>,
        new: Option<&'a RowData>,
        new_buckets: &'a BTreeSet<String>,
        writer: &Writer<'_>,
    ) -> WriteRequest<'a> {
        let kind = match (op, old) {
            (CrudOp::Delete { .. }, _) => WriteOp::Delete,
            (_, None) => WriteOp::Insert,
            (_, Some(_)) => WriteOp::Update,
        };
        let sent = match sent {
            CrudOp::Put { data, .. } | CrudOp::Patch { data, .. } => Some(data),
            CrudOp::Delete { .. } => None,
        };
        WriteRequest {
            table: &table.name,
            id: op.id(),
            op: kind,
            old,
            new,
            sent,
            new_buckets,
            old_hidden: old.is_some_and(|d| !self.readable(writer.buckets, &table.name, op.id(), d)),
        }
    }

    /// Check a strategy's side write against the schema: its table, id,
    /// column names and types, and size.
    fn check_side_write<'w>(&self, w: &'w SideWrite) -> std::result::Result<(&Table, &'w SideWrite), String> {
        let limits = &self.options.limits;
        let bad = |e: &dyn std::fmt::Display| format!("side write {}/{}: {e}", w.table, w.id);
        let table = self.rules.schema().table(&w.table).map_err(|e| bad(&e))?;
        table.check_id(&w.id, limits).map_err(|e| bad(&e))?;
        table.check_data(w.data.clone()).map_err(|e| bad(&e))?;
        let size_bytes = row_size_bytes(&w.id, &w.data);
        if size_bytes > limits.max_row_bytes {
            return Err(bad(&format!(
                "{size_bytes} bytes, over the limit of {} bytes",
                limits.max_row_bytes
            )));
        }
        Ok((table, w))
    }

    /// Append the row's change to the op log: PUT in every bucket it is in
    /// now, REMOVE from every bucket it left.
    pub(super) fn emit_row(&self, stx: &mut dyn SourceTx, table: &str, id: &str, row: Option<&RowData>) -> Result<()> {
        self.emit_row_into(stx, None, table, id, row)
    }

    /// [`Inner::emit_row`], its op log entries added to `later` when
    /// given (appended by the caller after the transaction's other
    /// writes) instead of appended now.
    fn emit_row_into(
        &self,
        stx: &mut dyn SourceTx,
        mut later: Option<&mut Vec<Emitted>>,
        table: &str,
        id: &str,
        row: Option<&RowData>,
    ) -> Result<()> {
        let new: BTreeSet<String> = row.map(|r| self.rules.row_buckets(table, id, r)).unwrap_or_default();
        let old = stx.row_buckets(table, id)?;
        let mut emit =
            |stx: &mut dyn SourceTx, bucket: &str, op: OpKind, row: Option<&RowData>| match later.as_deref_mut() {
                Some(later) => {
                    later.push(Emitted {
                        bucket: bucket.to_owned(),
                        op,
                        table: table.to_owned(),
                        id: id.to_owned(),
                        row: row.cloned(),
                        encoded: row.map(ferry_core::codec::encode_row),
                        json: row.and_then(|r| ferry_core::json::row_json(r).ok()),
                    });
                    Ok(())
                }
                None => append_op(stx, bucket, op, table, id, row).map(|_| ()),
            };
        for b in &new {
            emit(stx, b, OpKind::Put, row)?;
        }
        for b in old.difference(&new) {
            emit(stx, b, OpKind::Remove, None)?;
        }
        if old != new {
            stx.set_row_buckets(table, id, &new)?;
        }
        Ok(())
    }
}

/// An op log entry an upload's op emitted, appended after the other
/// writes of every op of its transaction (in the order emitted, so with
/// the ids and checksums it would have had appended at once): the
/// transaction then needs the op-id counter only for its last steps (a
/// database that orders op ids by a lock on it holds the lock that much
/// shorter; `docs/adr/0016-postgres-concurrent-uploads.md`).
/// The row is encoded when emitted (its checksum's input and its JSON),
/// so the transaction does not encode it while holding the counter.
pub(super) struct Emitted {
    bucket: String,
    op: OpKind,
    table: String,
    id: String,
    row: Option<RowData>,
    encoded: Option<Vec<u8>>,
    json: Option<String>,
}

/// An op [`Inner::check_op_named`] refused: why, and the table and id the
/// op names.
#[derive(Debug)]
pub(super) struct Refusal {
    pub(super) reason: String,
    pub(super) table: String,
    pub(super) id: String,
}

impl Refusal {
    /// `reason`, naming `op`'s table and id.
    pub(super) fn of(reason: String, op: CrudOp) -> Refusal {
        let (table, id) = match op {
            CrudOp::Put { table, id, .. } | CrudOp::Patch { table, id, .. } | CrudOp::Delete { table, id, .. } => {
                (table, id)
            }
        };
        Refusal { reason, table, id }
    }
}
