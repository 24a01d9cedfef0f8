//! Large switch-ins in bounded chunks (ADR 0014).
//!
//! sled 0.34 holds a batch in memory several times over, so a checkpoint
//! of a million staged rows cannot switch in as one `apply_batch`. When a
//! batch's switch-ins come after every other synced-layer and bucket op
//! (as the client builds them) and move more than
//! [`MAX_SWITCH_CHUNK_OPS`] ops, the store applies it as:
//!
//! 1. every other op of the batch, and a journal entry naming the ranges
//!    left to switch in, in one `apply_batch`;
//! 2. the ranges, [`MAX_SWITCH_CHUNK_OPS`] staged ops at a time, each
//!    chunk in one `apply_batch` with the journal advanced past it;
//! 3. the journal's removal.
//!
//! Readers wait on the store's snapshot lock meanwhile, so in the process
//! the batch is seen whole or not at all. A crash in between leaves the
//! journal, and opening the store finishes the switch-in from it before
//! anything reads: the staged ops are still there (only a later batch
//! drops them), and each chunk's effects land with the journal's advance.

use ferry_store::{BatchOp, StoreResult, WriteBatch};

use crate::keys::{self, corrupt, utf8};
use crate::pending::Pending;
use crate::{sled_err, staging, SledStore};

/// Most staged ops switched in per `apply_batch`.
pub const MAX_SWITCH_CHUNK_OPS: usize = 20_000;

/// A range left to switch in: (bucket, first op id, last op id).
type Range = (String, u64, u64);

/// `00 "switching"`: the journal of a switch-in under way.
fn journal_key() -> Vec<u8> {
    let mut k = vec![keys::INFO];
    k.extend_from_slice(b"switching");
    k
}

fn encode(ranges: &[Range]) -> Vec<u8> {
    let mut out = Vec::new();
    for (bucket, from, through) in ranges {
        // Bucket names are checked free of NUL and far below 4 GiB.
        let len = u32::try_from(bucket.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(bucket.as_bytes());
        out.extend_from_slice(&from.to_be_bytes());
        out.extend_from_slice(&through.to_be_bytes());
    }
    out
}

fn decode(mut buf: &[u8]) -> StoreResult<Vec<Range>> {
    let bad = || corrupt("bad switch-in journal");
    let mut out = Vec::new();
    while !buf.is_empty() {
        let len_bytes: [u8; 4] = buf.get(..4).and_then(|b| b.try_into().ok()).ok_or_else(bad)?;
        let len = usize::try_from(u32::from_be_bytes(len_bytes)).map_err(|_| bad())?;
        let bucket = utf8(buf.get(4..4 + len).ok_or_else(bad)?)?;
        let rest = buf.get(4 + len..).ok_or_else(bad)?;
        let from = keys::be_u64(rest.get(..8).ok_or_else(bad)?).ok_or_else(bad)?;
        let through = keys::be_u64(rest.get(8..16).ok_or_else(bad)?).ok_or_else(bad)?;
        out.push((bucket, from, through));
        buf = rest.get(16..).ok_or_else(bad)?;
    }
    Ok(out)
}

/// Whether `batch` goes in chunks: its switch-ins come after every op
/// that touches synced rows or bucket entries, and move more than a chunk.
pub(crate) fn chunked(store: &SledStore, batch: &WriteBatch) -> StoreResult<bool> {
    let Some(first) = batch
        .ops
        .iter()
        .position(|op| matches!(op, BatchOp::SwitchInStaged { .. }))
    else {
        return Ok(false);
    };
    if batch.ops[first..].iter().any(BatchOp::touches_switched_state) {
        return Ok(false);
    }
    let mut ops = 0usize;
    for op in &batch.ops[first..] {
        if let BatchOp::SwitchInStaged {
            bucket,
            from_op_id,
            through_op_id,
        } = op
        {
            let after = from_op_id.saturating_sub(1);
            let ids = staging::op_ids(store.tree(), bucket, after, MAX_SWITCH_CHUNK_OPS + 1)?;
            ops += ids.iter().filter(|id| **id <= *through_op_id).count();
            if ops > MAX_SWITCH_CHUNK_OPS {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

/// A batch's switch-ins apart from its other ops.
fn split(batch: WriteBatch) -> (WriteBatch, Vec<Range>) {
    let mut ranges = Vec::new();
    let mut rest = WriteBatch::new();
    for op in batch.ops {
        match op {
            BatchOp::SwitchInStaged {
                bucket,
                from_op_id,
                through_op_id,
            } => ranges.push((bucket, from_op_id, through_op_id)),
            other => {
                rest.push(other);
            }
        }
    }
    (rest, ranges)
}

impl SledStore {
    /// Apply a batch [`chunked`] said goes in chunks (the writer lock is
    /// held by the caller).
    pub(crate) fn apply_chunked(&self, batch: WriteBatch) -> StoreResult<()> {
        let _snap = self.snapshot.write();
        let (rest, ranges) = split(batch);
        let mut p = Pending::new(self.tree());
        self.stage(rest, &mut p)?;
        p.put(journal_key(), encode(&ranges));
        self.commit_pending(p)?;
        self.finish_switch(ranges)
    }

    /// Switch in `ranges` chunk by chunk, advancing the journal with each,
    /// then drop the journal.
    fn finish_switch(&self, mut ranges: Vec<Range>) -> StoreResult<()> {
        while let Some((bucket, from, through)) = ranges.first().cloned() {
            let ids = staging::op_ids(self.tree(), &bucket, from.saturating_sub(1), MAX_SWITCH_CHUNK_OPS)?;
            let end = ids.iter().copied().rfind(|id| *id <= through);
            let mut p = Pending::new(self.tree());
            match end {
                Some(end) if end < through && ids.len() == MAX_SWITCH_CHUNK_OPS => {
                    staging::switch_in(&mut p, &self.schema, &bucket, from, end)?;
                    ranges[0].1 = end + 1;
                }
                _ => {
                    staging::switch_in(&mut p, &self.schema, &bucket, from, through)?;
                    ranges.remove(0);
                }
            }
            if ranges.is_empty() {
                p.remove(journal_key());
            } else {
                p.put(journal_key(), encode(&ranges));
            }
            self.commit_pending(p)?;
        }
        let mut p = Pending::new(self.tree());
        p.remove(journal_key());
        self.commit_pending(p)
    }

    /// On open: finish a switch-in a crash interrupted.
    pub(crate) fn recover_switch(&self) -> StoreResult<()> {
        let Some(journal) = self.tree().get(journal_key()).map_err(sled_err)? else {
            return Ok(());
        };
        let ranges = decode(&journal)?;
        let _writer = self.writer.lock();
        let _snap = self.snapshot.write();
        self.finish_switch(ranges)
    }
}

#[cfg(test)]
mod tests {
    use ferry_core::{row_data, ColumnType, Schema, Table, Value};
    use ferry_store::{BucketState, MemoryStore, StagedKind, StagedOp, Store};

    use super::*;

    fn schema() -> Schema {
        Schema::new([Table::new("notes")
            .column("body", ColumnType::Text)
            .column("n", ColumnType::Integer)
            .index("by_n", &["n"])])
        .expect("schema")
    }

    fn staged(n: u64) -> WriteBatch {
        let mut b = WriteBatch::new();
        for i in 1..=n {
            let op = if i % 1_000 == 0 {
                StagedOp {
                    op_id: i,
                    kind: StagedKind::Remove,
                    table: "notes".into(),
                    row_id: format!("r{:06}", i - 1),
                    data: None,
                    checksum: 1,
                }
            } else {
                StagedOp {
                    op_id: i,
                    kind: StagedKind::Put,
                    table: "notes".into(),
                    row_id: format!("r{:06}", i % 30_000),
                    data: Some(row_data([
                        ("body", Value::from(format!("v{i}"))),
                        ("n", Value::from(i as i64)),
                    ])),
                    checksum: 1,
                }
            };
            b.push(BatchOp::PutStaged { bucket: "b".into(), op });
        }
        b
    }

    fn switch(n: u64) -> WriteBatch {
        let mut b = WriteBatch::new();
        b.push(BatchOp::PutBucketState {
            bucket: "b".into(),
            state: BucketState {
                last_op_id: n,
                checksum: 0,
                count: n,
            },
        });
        b.push(BatchOp::SwitchInStaged {
            bucket: "b".into(),
            from_op_id: 1,
            through_op_id: n,
        });
        b.put_meta("done", b"yes".to_vec());
        b
    }

    fn same(s: &dyn Store, m: &dyn Store) {
        assert_eq!(
            s.scan_synced("notes").expect("scan"),
            m.scan_synced("notes").expect("scan")
        );
        let all = |st: &dyn Store| {
            st.scan_synced_index("notes", "by_n", std::ops::Bound::Unbounded, std::ops::Bound::Unbounded)
                .expect("index")
        };
        assert_eq!(all(s), all(m));
        assert_eq!(
            s.bucket_entries("b", None, usize::MAX).expect("entries"),
            m.bucket_entries("b", None, usize::MAX).expect("entries")
        );
        assert_eq!(s.get_meta("done").expect("meta"), m.get_meta("done").expect("meta"));
    }

    /// More than two chunks switch in as the memory store switches them
    /// in, and no journal is left.
    #[test]
    fn a_large_switch_in_goes_in_chunks_and_matches_the_memory_store() {
        let n = (2 * MAX_SWITCH_CHUNK_OPS + 5_000) as u64;
        let s = SledStore::temporary(schema()).expect("open");
        let m = MemoryStore::new(schema());
        for b in [staged(n), switch(n)] {
            assert!(!chunked(&s, &staged(1)).expect("chunked?"));
            s.apply(b.clone()).expect("sled");
            m.apply(b).expect("memory");
        }
        same(&s, &m);
        assert!(s.tree().get(journal_key()).expect("get").is_none());
    }

    /// A crash after the first step (the other ops and the journal written,
    /// no chunk yet) is finished when the store opens again.
    #[test]
    fn an_interrupted_switch_in_is_finished_on_open() {
        let n = (MAX_SWITCH_CHUNK_OPS + 7_000) as u64;
        let dir = tempfile::tempdir().expect("tempdir");
        let m = MemoryStore::new(schema());
        m.apply(staged(n)).expect("memory");
        m.apply(switch(n)).expect("memory");
        {
            let s = SledStore::open(dir.path(), schema()).expect("open");
            s.apply(staged(n)).expect("stage");
            let batch = switch(n);
            assert!(chunked(&s, &batch).expect("chunked?"));
            // Step 1 only, as apply_chunked does it.
            let (rest, ranges) = split(batch);
            let mut p = Pending::new(s.tree());
            s.stage(rest, &mut p).expect("stage rest");
            p.put(journal_key(), encode(&ranges));
            s.commit_pending(p).expect("commit");
            s.flush().expect("flush");
        }
        let s = SledStore::open(dir.path(), schema()).expect("reopen");
        same(&s, &m);
        assert!(s.tree().get(journal_key()).expect("get").is_none());
    }
}
