//! The server's answer to an upload, recorded in one store batch:
//! rejected entries roll back, every op's outcome is stored durably, and
//! the answered entries leave the upload queue. A crash or a disconnect
//! can land before or after that batch, never inside it, so an app that
//! missed the live outcome can still read every write's fate.

use std::collections::BTreeSet;

use ferry_store::{BatchOp, WriteBatch};

use crate::{
    encode_rejections, encode_seqs, ChangeSource, ChangedRows, LocalDb, QueueError, QueueResult, Rejection, RowChange,
    META_COMPLETED_THROUGH, META_REJECTED_SEQS, META_REJECTIONS, META_UNSEEN_SEQS, PAGE_ENTRIES,
};

/// Metadata key prefix of the stored outcomes: the key of seq `s` is this
/// prefix followed by `s` as 20 decimal digits.
pub const META_OUTCOME_PREFIX: &str = "ferry.outcome.";

fn outcome_key(seq: u64) -> String {
    format!("{META_OUTCOME_PREFIX}{seq:020}")
}

/// What the server answered for an upload.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Answer {
    /// Every entry through this seq was answered: it leaves the upload
    /// queue (at or below the current mark: nothing more is completed).
    pub through_seq: u64,
    /// Entries the server refused, with its reasons.
    pub rejected: Vec<(u64, String)>,
    /// Each answered op's outcome, as opaque bytes the caller can decode
    /// (see [`LocalDb::outcome_record`]), by seq.
    pub outcomes: Vec<(u64, Vec<u8>)>,
    /// When the answer arrived (ms since the epoch, client clock).
    pub at_ms: u64,
    /// The server refused the request whole and never saw these entries:
    /// no write checkpoint will cover them, so they are confirmed as soon
    /// as every earlier entry is (else they would linger as pending).
    pub refused_whole: bool,
}

/// Which queue entries one local transaction produced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriteReceipt {
    /// The local transaction id (outcomes carry it).
    pub tx_id: u64,
    /// The seq of its first queued op.
    pub first_seq: u64,
    /// The seq of its last queued op.
    pub last_seq: u64,
}

impl LocalDb {
    /// Record an upload's answer in one store batch: the rejected entries
    /// stop shaping the visible state (their rows are rebased without
    /// them) and go to the rejections log; every outcome is stored (the
    /// oldest beyond `max_outcomes_kept` dropped); the entries through
    /// `through_seq` leave the upload queue, and those a checkpoint
    /// already covered are confirmed.
    pub fn answer(&self, answer: &Answer) -> QueueResult<()> {
        let mut counters = self.lock_writes()?;
        if answer.through_seq >= counters.next_seq {
            return Err(QueueError::InvalidSeq {
                seq: answer.through_seq,
                reason: "beyond the last queued entry",
            });
        }
        let completing = answer.through_seq > counters.completed_through;
        if !completing && answer.rejected.is_empty() && answer.outcomes.is_empty() {
            return Ok(());
        }
        let entries = self.store.queue_from(0, usize::MAX)?;
        let mut batch = WriteBatch::new();
        let mut marks = self.marks()?;

        // Rejections: roll back and log.
        let mut rolled_back: ChangedRows = BTreeSet::new();
        if !answer.rejected.is_empty() {
            let mut log = self.rejections()?;
            for (seq, reason) in &answer.rejected {
                let Some(e) = entries.iter().find(|e| e.seq == *seq) else {
                    continue; // already confirmed: nothing left to roll back
                };
                if answer.refused_whole && marks.unseen.insert(*seq) {
                    batch.put_meta(META_UNSEEN_SEQS, encode_seqs(&marks.unseen));
                }
                if marks.rejected.insert(*seq) {
                    rolled_back.insert((e.op.table().to_owned(), e.op.id().to_owned()));
                    log.push(Rejection {
                        entry: e.clone(),
                        reason: reason.clone(),
                        at_ms: answer.at_ms,
                    });
                }
            }
            let excess = log.len().saturating_sub(self.limits.max_rejections_logged);
            log.drain(..excess);
            batch.put_meta(META_REJECTED_SEQS, encode_seqs(&marks.rejected));
            batch.put_meta(META_REJECTIONS, encode_rejections(&log)?);
        }

        // Outcomes, durably, in a window of the newest seqs.
        for (seq, bytes) in &answer.outcomes {
            batch.put_meta(outcome_key(*seq), bytes.clone());
            if let Some(old) = seq.checked_sub(self.max_outcomes_kept) {
                batch.push(BatchOp::DeleteMeta { key: outcome_key(old) });
            }
        }

        // Completion.
        let through = answer.through_seq.max(counters.completed_through);
        let mut removed = 0u64;
        if completing {
            let mut from = counters.completed_through + 1;
            'count: loop {
                let page = self.store.queue_from(from, PAGE_ENTRIES)?;
                let full = page.len() == PAGE_ENTRIES;
                for e in &page {
                    if e.seq > through {
                        break 'count;
                    }
                    removed += 1;
                    from = e.seq + 1;
                }
                if !full {
                    break;
                }
            }
            batch.put_meta(META_COMPLETED_THROUGH, through.to_be_bytes().to_vec());
        }
        // A checkpoint may already have covered these entries (its write
        // checkpoint arrived before this answer): confirm them now, in the
        // same batch, or nothing would ever drop them.
        let wc = counters.server_write_checkpoint.min(through);
        let (changed, confirmed) = self.confirm_into(
            &mut batch,
            wc,
            &entries,
            &mut marks,
            rolled_back.clone(),
            std::collections::BTreeMap::new(),
        )?;
        if confirmed > 0 {
            self.persist_counters(&mut batch, &counters, confirmed);
        }
        let changes = self.visible_changes(&batch, &changed)?;
        self.apply_batch(batch)?;
        counters.completed_through = through;
        counters.upload_len -= removed;
        counters.stored_len -= confirmed;
        let (rolled, others): (Vec<RowChange>, Vec<RowChange>) = if rolled_back.is_empty() {
            (Vec::new(), changes)
        } else {
            changes
                .into_iter()
                .partition(|c| rolled_back.contains(&(c.table.clone(), c.id.clone())))
        };
        let turn = counters.hand_over(self);
        self.notify(ChangeSource::Rollback, &rolled);
        self.notify(ChangeSource::Server, &others);
        drop(turn);
        Ok(())
    }

    /// The stored outcome of the op with this seq (the bytes given to
    /// [`LocalDb::answer`]), while it is among the newest
    /// `max_outcomes_kept`.
    pub fn outcome_record(&self, seq: u64) -> QueueResult<Option<Vec<u8>>> {
        Ok(self.store.get_meta(&outcome_key(seq))?)
    }

    /// Stored outcomes of seqs after `after_seq`, in seq order, at most
    /// `limit` (answered seqs only: those through
    /// [`LocalDb::completed_through`]).
    pub fn outcome_records_since(&self, after_seq: u64, limit: usize) -> QueueResult<Vec<(u64, Vec<u8>)>> {
        let through = self.completed_through();
        let oldest_kept = through.saturating_sub(self.max_outcomes_kept).saturating_add(1);
        let mut out = Vec::new();
        let mut seq = after_seq.saturating_add(1).max(oldest_kept);
        while seq <= through && out.len() < limit {
            if let Some(bytes) = self.store.get_meta(&outcome_key(seq))? {
                out.push((seq, bytes));
            }
            seq += 1;
        }
        Ok(out)
    }
}
