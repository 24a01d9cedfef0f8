//! The source of truth, behind [`SourceDb`]: blocking calls (run them on
//! `spawn_blocking`), no SQLite types in the signatures, so a PostgreSQL
//! implementation can sit behind the same trait.
//!
//! The write path runs inside [`SourceDb::write`]: everything done through
//! the [`SourceTx`] commits together or not at all.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use ferry_core::{HlcTimestamp, RowData, Schema, Table};
use ferry_protocol::{BucketChecksum, DataLineWriter, OpKind, OplogEntry, Outcome};

use crate::error::Result;

/// A row as the source database holds it: its values (every schema
/// column, `None` for a tombstone), the last-write-wins clock of each
/// column, and the delete's clock for a tombstone. The same type the
/// conflict strategies see.
pub type StoredRow = ferry_conflict::CurrentRow;

/// An op's stored outcome with the fingerprint of the op it answered.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredOutcome {
    /// The outcome as recorded.
    pub outcome: Outcome,
    /// FNV-1a 64 of the op's content as received (see
    /// `SyncService::upload`); `None` for an outcome recorded before
    /// fingerprints were kept.
    pub fingerprint: Option<u64>,
}

/// A client's upload progress.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientProgress {
    /// The user the client belongs to (the first to upload with it).
    pub user_id: String,
    /// The highest seq processed (the write checkpoint).
    pub last_seq: u64,
}

/// An op log entry to append.
#[derive(Clone, Copy, Debug)]
pub struct NewOp<'a> {
    /// The bucket instance.
    pub bucket: &'a str,
    /// PUT or REMOVE.
    pub op: OpKind,
    /// The row's table.
    pub table: &'a str,
    /// The row id.
    pub row_id: &'a str,
    /// The row (PUT).
    pub data: Option<&'a RowData>,
}

/// A consistent checkpoint for one client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckpointState {
    /// The global max op id.
    pub last_op_id: u64,
    /// The requested buckets' state (absent buckets: checksum 0, count 0).
    pub buckets: Vec<BucketChecksum>,
    /// The client's last processed seq, if it ever uploaded.
    pub write_checkpoint: Option<u64>,
}

/// What a write transaction can do.
pub trait SourceTx {
    /// The client's progress, if it uploaded before.
    fn client(&mut self, client_id: &str) -> Result<Option<ClientProgress>>;
    /// Record the client's progress.
    fn set_client(&mut self, client_id: &str, user_id: &str, last_seq: u64) -> Result<()>;
    /// The stored outcome of an op, with the fingerprint of the op it
    /// answered.
    fn outcome(&mut self, client_id: &str, seq: u64) -> Result<Option<StoredOutcome>>;
    /// Store an op's outcome and the fingerprint of the op's content, so a
    /// replay of `(client_id, seq)` can be told from a different write.
    fn record_outcome(&mut self, client_id: &str, seq: u64, fingerprint: u64, outcome: &Outcome) -> Result<()>;
    /// Read a row or its tombstone.
    fn read_row(&mut self, table: &Table, id: &str) -> Result<Option<StoredRow>>;
    /// Write a whole row (every column) and its clocks; clears a tombstone.
    ///
    /// Invariant: the clock high-water mark ([`SourceDb::max_clock`]) is
    /// raised to the greatest of `clocks` in this same transaction.
    fn write_row(
        &mut self,
        table: &Table,
        id: &str,
        data: &RowData,
        clocks: &BTreeMap<String, HlcTimestamp>,
    ) -> Result<()>;
    /// Delete a row, leaving a tombstone with the delete's clock.
    ///
    /// Invariant: the clock high-water mark ([`SourceDb::max_clock`]) is
    /// raised to `hlc` in this same transaction.
    fn delete_row(&mut self, table: &Table, id: &str, hlc: &HlcTimestamp) -> Result<()>;
    /// The bucket instances the row is in.
    fn row_buckets(&mut self, table: &str, id: &str) -> Result<BTreeSet<String>>;
    /// Replace the row's bucket membership.
    fn set_row_buckets(&mut self, table: &str, id: &str, buckets: &BTreeSet<String>) -> Result<()>;
    /// Append an op log entry: allocates the next global op id, computes
    /// its checksum with `ferry_protocol::op_checksum` and updates the
    /// bucket's state. Returns the op id.
    fn append_op(&mut self, op: NewOp<'_>) -> Result<u64>;
    /// A bucket's whole log, ascending.
    fn bucket_ops(&mut self, bucket: &str) -> Result<Vec<OplogEntry>>;
    /// Replace a bucket's log (compaction); the bucket's checksum is kept,
    /// its count becomes the number of entries.
    fn replace_bucket_ops(&mut self, bucket: &str, entries: &[OplogEntry]) -> Result<()>;
}

/// The source of truth.
pub trait SourceDb: Send + Sync + fmt::Debug {
    /// Create or extend the tables of the schema.
    fn migrate(&self, schema: &Schema) -> Result<()>;
    /// Run `work` in one transaction: commit when it returns `Ok`, roll
    /// back when it returns `Err`.
    fn write(&self, work: &mut dyn FnMut(&mut dyn SourceTx) -> Result<()>) -> Result<()>;
    /// The checkpoint for a client over these buckets, read in one read
    /// transaction.
    fn checkpoint(&self, client_id: &str, buckets: &[String]) -> Result<CheckpointState>;
    /// Entries of a bucket with `after_op_id < op_id <= up_to_op_id`,
    /// ascending, at most `max_ops`, and no more than fit in one encoded
    /// `data` line of `max_bytes` bytes, newline included (at least one
    /// entry when there is one). The stream measures the encoding again,
    /// so a database may return more; the rest is read again next line.
    fn read_ops(
        &self,
        bucket: &str,
        after_op_id: u64,
        up_to_op_id: u64,
        max_ops: usize,
        max_bytes: usize,
    ) -> Result<Vec<OplogEntry>>;
    /// The same entries as [`SourceDb::read_ops`], appended to an encoded
    /// `data` line instead of returned typed, up to the line's size limit
    /// (the writer refuses entries past it). Returns the last op id added
    /// (`None` when there was none). The default encodes `read_ops`'s
    /// entries; a database that keeps rows as JSON text copies them as
    /// they are.
    fn read_ops_into(
        &self,
        bucket: &str,
        after_op_id: u64,
        up_to_op_id: u64,
        max_ops: usize,
        max_bytes: usize,
        line: &mut DataLineWriter,
    ) -> Result<Option<u64>> {
        let ops = self.read_ops(bucket, after_op_id, up_to_op_id, max_ops, max_bytes)?;
        line.lower_max_line_bytes(max_bytes);
        for e in &ops {
            if !line.push_entry(e) {
                break;
            }
        }
        Ok(line.last_op_id())
    }
    /// Every bucket with entries.
    fn bucket_names(&self) -> Result<Vec<String>>;
    /// The number of op log entries (all buckets).
    fn oplog_len(&self) -> Result<u64>;
    /// Read a row (for inspection and tests).
    fn get_row(&self, table: &Table, id: &str) -> Result<Option<StoredRow>>;
    /// The user a client id belongs to (the first user that uploaded with
    /// it), `None` for a client id never used for an upload.
    fn client_owner(&self, client_id: &str) -> Result<Option<String>>;
    /// The clock high-water mark: at least every clock ever stored with a
    /// row or tombstone ([`SourceTx::write_row`], [`SourceTx::delete_row`]
    /// keep it in their transaction), `None` when none was stored. The
    /// service observes it at start, so its hybrid logical clock never
    /// falls behind a stored clock, also across restarts.
    fn max_clock(&self) -> Result<Option<HlcTimestamp>>;
}
