//! A Ferry [`Store`] on [sled](https://docs.rs/sled/0.34.7) 0.34, an
//! embedded, pure-Rust key-value store.
//!
//! # Layout
//!
//! Everything lives in **one** sled tree (the database's default tree),
//! split into keyspaces by a leading byte: synced rows, index entries,
//! overlay entries, the upload queue, bucket entries, bucket states, metadata
//! and the index definitions the store was last opened with (the full
//! layout is in the `keys` module). Rows and queue entries are encoded with
//! [`ferry_core::codec`]; index entry keys with [`ferry_store::index_key`],
//! whose bytewise order is index order, so index range scans are sled range
//! scans.
//!
//! # Invariants
//!
//! - **Atomicity.** Each [`Store::apply`] becomes a single
//!   [`sled::Tree::apply_batch`]: after a crash either all of a batch's
//!   writes (rows, their index entries, queue, buckets, metadata) are there
//!   or none are. A batch is validated (tables exist, queue seqs ascend,
//!   bucket and bucket entry table names have no NUL byte) before anything
//!   is written, so a batch
//!   that fails validation changes nothing.
//! - **Index consistency.** Writers are serialized by a mutex held while the
//!   old rows are read and the batch is applied, so the index entries
//!   removed for a replaced row are those of the row actually stored (or of
//!   an earlier op of the same batch).
//! - **Read isolation.** Each read call sees the store either before or
//!   after any batch, never halfway: readers share a lock that `apply`
//!   takes exclusively only for the instant of `apply_batch`. Two separate
//!   read calls may see different states.
//! - **Schema changes.** On open, index entries are rebuilt for indexes
//!   that are new or whose columns changed, and dropped for indexes no
//!   longer declared, in one atomic batch. Rows of tables dropped from the
//!   schema stay on disk (unreachable) and come back if the table does.
//! - **Names.** Table and index names never contain NUL (the schema forbids
//!   it), so they end unambiguously at a NUL separator; row ids come last in
//!   their keys and need no separator. Bucket entries are keyed by
//!   `bucket 00 table 00 row_id`, so a bucket name or bucket entry table
//!   name containing NUL is rejected with [`StoreError::InvalidInput`] (in
//!   a batch, or as an argument of a bucket read); row ids may contain
//!   anything. Deleting a bucket removes the keys under `bucket 00` only,
//!   never those of a bucket whose name extends it.
//! - **Format.** The format version is stored under the store-info
//!   keyspace. Version 2 replaced version 1's per-bucket op log with
//!   bucket entries; no version 1 store was shipped, so there is no
//!   migration and a version 1 database is refused on open with a
//!   non-retryable [`StoreError::Backend`] error.
//!
//! # Durability
//!
//! sled buffers writes in the process and writes them out in the background
//! (every 500 ms by default). With [`SledOptions::flush_on_apply`] set (the
//! default), `apply` calls [`sled::Tree::flush`] before returning, so a batch
//! survives a process crash (SIGKILL) once `apply` returns, as the [`Store`]
//! contract requires. Turning it off makes `apply` much faster but breaks
//! that guarantee: a crash can lose the batches applied in the last flush
//! interval (always whole batches, never part of one). Call
//! [`SledStore::flush`] at points that must be durable. A clean drop
//! flushes too. If the flush after a batch fails, `apply` returns a
//! [`StoreError::Backend`] error although the batch is already applied
//! (reads see it); only its durability is unconfirmed.
//!
//! A sled database can be open in only one process at a time. sled releases
//! its file lock a little after a store is dropped, so opening waits up to
//! a few seconds for the lock; a database still held after that (by another
//! process) fails with a retryable [`StoreError::Backend`].

use std::collections::VecDeque;
use std::fmt;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ferry_core::{codec, CrudEntry, RowData, Schema, Value};
use ferry_store::{
    resolve_index_range, table_def, validate_batch, BatchOp, BucketEntry, BucketState, IndexRange, OverlayEntry, Rows,
    StagedOp, Store, StoreError, StoreResult, WriteBatch,
};
use parking_lot::{Mutex, RwLock};

mod keys;
mod pending;
mod staging;
mod switch;

pub use switch::MAX_SWITCH_CHUNK_OPS;
mod values;

use keys::{prefix_end, suffix};
use pending::Pending;

/// The on-disk format this crate writes.
const FORMAT_VERSION: u8 = 2;

/// How a [`SledStore`] is opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SledOptions {
    /// Upper bound of sled's page cache, in bytes. Default 64 MiB.
    pub cache_capacity_bytes: u64,
    /// Flush to disk before [`Store::apply`] returns (default `true`).
    ///
    /// Setting it to `false` trades the store contract's durability
    /// guarantee for speed: a process crash may lose recently applied
    /// batches (whole ones; atomicity holds). See the crate docs.
    pub flush_on_apply: bool,
}

impl Default for SledOptions {
    fn default() -> Self {
        SledOptions {
            cache_capacity_bytes: 64 * 1024 * 1024,
            flush_on_apply: true,
        }
    }
}

/// A [`Store`] kept in a sled database. See the crate docs for the layout
/// and guarantees.
pub struct SledStore {
    db: sled::Db,
    schema: Schema,
    options: SledOptions,
    /// Where the database lives (`None` for a temporary one).
    path: Option<PathBuf>,
    /// Serializes writers across reading old values and applying a batch.
    writer: Mutex<()>,
    /// Read calls hold it shared; `apply` holds it exclusively only while
    /// sled applies the batch, so no read call sees half a batch.
    snapshot: RwLock<()>,
    /// Number of queue entries, counted at open and kept by `apply`.
    queue_len: AtomicU64,
}

impl fmt::Debug for SledStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SledStore")
            .field("path", &self.path)
            .field("options", &self.options)
            .field("tables", &self.schema.tables().map(|t| &t.name).collect::<Vec<_>>())
            .field("queue_len", &self.queue_len.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// Map a sled error: I/O errors may go away on retry (a locked database, a
/// full disk being cleaned up); corruption, misuse and bugs do not.
pub(crate) fn sled_err(e: sled::Error) -> StoreError {
    let retryable = matches!(e, sled::Error::Io(_));
    StoreError::Backend {
        backend: "sled",
        message: e.to_string(),
        retryable,
    }
}

impl SledStore {
    /// Open (or create) the store at `path` with default options.
    pub fn open(path: impl AsRef<Path>, schema: Schema) -> StoreResult<Self> {
        Self::open_with(path, schema, SledOptions::default())
    }

    /// Open (or create) the store at `path`. Index entries are brought in
    /// line with the schema's declared indexes (see the crate docs).
    pub fn open_with(path: impl AsRef<Path>, schema: Schema, options: SledOptions) -> StoreResult<Self> {
        let path = path.as_ref().to_path_buf();
        let config = sled::Config::new().path(&path);
        Self::open_config(config, schema, options, Some(path))
    }

    /// A store in a temporary sled database (sled's `temporary` mode; on
    /// Linux it lives in `/dev/shm`), removed when the store is dropped.
    /// Its data cannot outlive the process, so `apply` does not flush.
    pub fn temporary(schema: Schema) -> StoreResult<Self> {
        let options = SledOptions {
            flush_on_apply: false,
            ..SledOptions::default()
        };
        Self::open_config(sled::Config::new().temporary(true), schema, options, None)
    }

    fn open_config(
        config: sled::Config,
        schema: Schema,
        options: SledOptions,
        path: Option<PathBuf>,
    ) -> StoreResult<Self> {
        let db = open_db(config.cache_capacity(options.cache_capacity_bytes))?;
        let mut pending = Pending::new(&db);
        check_format(&db, &mut pending)?;
        sync_indexes(&schema, &mut pending)?;
        if !pending.is_empty() {
            db.apply_batch(pending.into_batch()).map_err(sled_err)?;
            if options.flush_on_apply {
                db.flush().map_err(sled_err)?;
            }
        }
        let mut queue_len = 0u64;
        for item in db.scan_prefix([keys::QUEUE]).keys() {
            item.map_err(sled_err)?;
            queue_len += 1;
        }
        let store = SledStore {
            db,
            schema,
            options,
            path,
            writer: Mutex::new(()),
            snapshot: RwLock::new(()),
            queue_len: AtomicU64::new(queue_len),
        };
        store.recover_switch()?;
        if options.flush_on_apply {
            store.db.flush().map_err(sled_err)?;
        }
        Ok(store)
    }

    /// The options the store was opened with.
    pub fn options(&self) -> SledOptions {
        self.options
    }

    /// Where the database lives, or `None` for a temporary one.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Write everything applied so far to disk. Needed only with
    /// [`SledOptions::flush_on_apply`] off.
    pub fn flush(&self) -> StoreResult<()> {
        self.db.flush().map_err(sled_err)?;
        Ok(())
    }

    fn tree(&self) -> &sled::Tree {
        &self.db
    }

    fn last_queued_seq(&self) -> StoreResult<Option<u64>> {
        match self.tree().scan_prefix([keys::QUEUE]).next_back() {
            Some(item) => {
                let (k, _) = item.map_err(sled_err)?;
                Ok(Some(keys::queue_seq(&k)?))
            }
            None => Ok(None),
        }
    }

    /// Turn a batch into key writes. Runs under the writer lock.
    /// Apply pending writes as one sled batch and keep the queue length
    /// (the caller holds the snapshot lock for writing).
    pub(crate) fn commit_pending(&self, p: Pending<'_>) -> StoreResult<()> {
        if p.is_empty() {
            return Ok(());
        }
        let queue_delta = p.count_delta(keys::QUEUE)?;
        self.tree().apply_batch(p.into_batch()).map_err(sled_err)?;
        let len = self.queue_len.load(Ordering::Relaxed);
        let len = if queue_delta >= 0 {
            len.saturating_add(queue_delta.unsigned_abs())
        } else {
            len.saturating_sub(queue_delta.unsigned_abs())
        };
        self.queue_len.store(len, Ordering::Relaxed);
        Ok(())
    }

    fn stage(&self, batch: WriteBatch, p: &mut Pending<'_>) -> StoreResult<()> {
        for op in batch.ops {
            match op {
                BatchOp::PutSynced { table, id, data } => {
                    let def = table_def(&self.schema, &table)?;
                    let key = keys::row_key(keys::SYNCED, &table, &id);
                    unindex(p, def, &key, &id)?;
                    for index in &def.indexes {
                        p.put(keys::index_entry_key(&table, index, &id, &data), id.as_bytes().to_vec());
                    }
                    p.put(key, codec::encode_row(&data));
                }
                BatchOp::DeleteSynced { table, id } => {
                    let def = table_def(&self.schema, &table)?;
                    let key = keys::row_key(keys::SYNCED, &table, &id);
                    unindex(p, def, &key, &id)?;
                    p.remove(key);
                }
                BatchOp::PutOverlay { table, id, entry } => {
                    p.put(
                        keys::row_key(keys::OVERLAY, &table, &id),
                        values::encode_overlay(&entry),
                    );
                }
                BatchOp::DeleteOverlay { table, id } => {
                    p.remove(keys::row_key(keys::OVERLAY, &table, &id));
                }
                BatchOp::AppendQueue(entry) => {
                    p.put(keys::queue_key(entry.seq), codec::encode_entry(&entry));
                }
                BatchOp::CompleteQueue { through_seq } => {
                    let end = through_seq.checked_add(1).map(keys::queue_key);
                    let end = end.or_else(|| prefix_end(&[keys::QUEUE]));
                    for k in p.keys_in(&[keys::QUEUE], end.as_deref())? {
                        p.remove(k);
                    }
                }
                BatchOp::PutBucketEntry { bucket, entry } => {
                    p.put(
                        keys::bucket_entry_key(&bucket, &entry.table, &entry.row_id),
                        values::encode_bucket_entry(&entry),
                    );
                }
                BatchOp::DeleteBucketEntry { bucket, table, row_id } => {
                    p.remove(keys::bucket_entry_key(&bucket, &table, &row_id));
                }
                BatchOp::PutBucketState { bucket, state } => {
                    p.put(keys::bucket_state_key(&bucket), values::encode_bucket_state(&state));
                }
                BatchOp::DeleteBucket { bucket } => {
                    p.remove(keys::bucket_state_key(&bucket));
                    p.remove_prefix(&keys::bucket_prefix(&bucket))?;
                }
                BatchOp::PutMeta { key, value } => {
                    p.put(keys::meta_key(&key), value);
                }
                BatchOp::DeleteMeta { key } => {
                    p.remove(keys::meta_key(&key));
                }
                BatchOp::PutStaged { bucket, op } => {
                    p.put(staging::key(&bucket, op.op_id), staging::encode(&op));
                }
                BatchOp::DeleteStaged { bucket, through_op_id } => staging::delete(p, &bucket, through_op_id)?,
                BatchOp::SwitchInStaged {
                    bucket,
                    from_op_id,
                    through_op_id,
                } => staging::switch_in(p, &self.schema, &bucket, from_op_id, through_op_id)?,
            }
        }
        Ok(())
    }

    /// Rows (decoded) of every key with this prefix, keyed by the rest of
    /// the key.
    fn scan_rows<T>(&self, prefix: &[u8], decode: impl Fn(&[u8]) -> StoreResult<T>) -> StoreResult<Vec<(String, T)>> {
        let _snap = self.snapshot.read();
        let mut out = Vec::new();
        for item in self.tree().scan_prefix(prefix) {
            let (k, v) = item.map_err(sled_err)?;
            out.push((suffix(&k, prefix.len())?, decode(&v)?));
        }
        Ok(out)
    }
}

/// How long [`open_db`] waits for a lock that a just-closed store of this
/// process may still hold.
const LOCK_WAIT: Duration = Duration::from_secs(3);

/// Open the database, waiting a little for its file lock.
///
/// sled 0.34 releases a database's file lock only when the last internal
/// reference to its file goes, and background work (the flusher thread,
/// I/O buffers written out on sled's thread pool, epoch-deferred frees) can
/// keep one alive briefly after the `Db` is dropped. Reopening right after
/// closing (an app restart within a process, tests) would then fail
/// spuriously, so a lock failure is retried for up to [`LOCK_WAIT`]; a
/// database held by another process still fails, just later.
fn open_db(config: sled::Config) -> StoreResult<sled::Db> {
    let started = Instant::now();
    let mut pause = Duration::from_millis(1);
    loop {
        match config.open() {
            Ok(db) => return Ok(db),
            Err(sled::Error::Io(e)) if is_lock_error(&e) && started.elapsed() < LOCK_WAIT => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(50));
            }
            Err(e) => return Err(sled_err(e)),
        }
    }
}

/// sled reports a held lock as an `Other` I/O error with this message.
fn is_lock_error(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::WouldBlock || e.to_string().contains("could not acquire lock")
}

/// Remove the index entries of the row stored (or staged) at `key`.
fn unindex(p: &mut Pending<'_>, def: &ferry_core::Table, key: &[u8], id: &str) -> StoreResult<()> {
    if def.indexes.is_empty() {
        return Ok(());
    }
    if let Some(old) = p.get(key)? {
        let old = codec::decode_row(&old)?;
        for index in &def.indexes {
            p.remove(keys::index_entry_key(&def.name, index, id, &old));
        }
    }
    Ok(())
}

/// Check (or, for a new database, write) the format version.
fn check_format(tree: &sled::Tree, p: &mut Pending<'_>) -> StoreResult<()> {
    let key = keys::format_key();
    match tree.get(&key).map_err(sled_err)? {
        Some(v) if v.as_ref() == [FORMAT_VERSION] => Ok(()),
        Some(v) => Err(StoreError::Backend {
            backend: "sled",
            message: format!(
                "the database has format {:?}; this version of ferry-sled reads format {FORMAT_VERSION} \
                 only and does not migrate other formats",
                v.as_ref()
            ),
            retryable: false,
        }),
        None if tree.is_empty() => {
            p.put(key, vec![FORMAT_VERSION]);
            Ok(())
        }
        None => Err(StoreError::Backend {
            backend: "sled",
            message: "the database is not empty but is not a ferry store (no format marker)".into(),
            retryable: false,
        }),
    }
}

/// Bring index entries in line with the schema's declared indexes: drop the
/// entries of indexes no longer declared or whose columns changed, build
/// those of new or changed ones, and record the definitions.
fn sync_indexes(schema: &Schema, p: &mut Pending<'_>) -> StoreResult<()> {
    let mut stored = std::collections::BTreeMap::new();
    for k in p.keys_in(&[keys::INDEX_DEF], prefix_end(&[keys::INDEX_DEF]).as_deref())? {
        let (table, index) = keys::parse_index_def_key(&k)?;
        let columns = p.get(&k)?.ok_or_else(|| keys::corrupt("index definition vanished"))?;
        stored.insert((table, index), values::decode_index_def(&columns)?);
    }
    let mut declared = std::collections::BTreeMap::new();
    for table in schema.tables() {
        for index in &table.indexes {
            declared.insert((table.name.clone(), index.name.clone()), (table, index));
        }
    }
    for ((table, index), columns) in &stored {
        let same = declared
            .get(&(table.clone(), index.clone()))
            .is_some_and(|(_, def)| def.columns == *columns);
        if !same {
            p.remove_prefix(&keys::index_prefix(table, index))?;
            p.remove(keys::index_def_key(table, index));
        }
    }
    for ((table_name, index_name), (table, index)) in &declared {
        if stored.get(&(table_name.clone(), index_name.clone())) == Some(&index.columns) {
            continue;
        }
        let prefix = keys::table_prefix(keys::SYNCED, table_name);
        for item in p.scan_tree_prefix(&prefix) {
            let (k, v) = item.map_err(sled_err)?;
            let id = suffix(&k, prefix.len())?;
            let data = codec::decode_row(&v)?;
            p.put(keys::index_entry_key(&table.name, index, &id, &data), id.into_bytes());
        }
        p.put(
            keys::index_def_key(table_name, index_name),
            values::encode_index_def(&index.columns),
        );
    }
    Ok(())
}

impl SledStore {
    /// Up to `limit` synced rows of an index range, from its start (or
    /// its end, walking back, when `reverse`): only the index entries
    /// returned, and their rows, are read.
    fn index_scan(
        &self,
        table: &str,
        index: &str,
        lower: &Bound<Vec<Value>>,
        upper: &Bound<Vec<Value>>,
        reverse: bool,
        limit: usize,
    ) -> StoreResult<Rows> {
        let IndexRange { lo, hi, .. } = match resolve_index_range(&self.schema, table, index, lower, upper)? {
            range if range.is_empty() => return Ok(Vec::new()),
            range => range,
        };
        if limit == 0 {
            return Ok(Vec::new());
        }
        let prefix = keys::index_prefix(table, index);
        let with_prefix = |k: &[u8]| {
            let mut key = prefix.clone();
            key.extend_from_slice(k);
            key
        };
        let start = with_prefix(lo.as_deref().unwrap_or_default());
        let end = match &hi {
            Some(h) => Some(with_prefix(h)),
            None => prefix_end(&prefix),
        };
        let upper = end.as_deref().map_or(Bound::Unbounded, Bound::Excluded);
        let _snap = self.snapshot.read();
        // Every index entry has its row (both are written in one batch);
        // a missing one is skipped as the memory store does.
        let row_of = |id: &sled::IVec| -> StoreResult<Option<(String, RowData)>> {
            let id = keys::utf8(id)?;
            match self
                .tree()
                .get(keys::row_key(keys::SYNCED, table, &id))
                .map_err(sled_err)?
            {
                Some(row) => Ok(Some((id, codec::decode_row(&row)?))),
                None => Ok(None),
            }
        };
        let mut out = Vec::new();
        if !reverse {
            for item in self.tree().range::<&[u8], _>((Bound::Included(&start[..]), upper)) {
                if out.len() >= limit {
                    break;
                }
                let (_, id) = item.map_err(sled_err)?;
                out.extend(row_of(&id)?);
            }
            return Ok(out);
        }
        // Not `range(..).rev()`: sled 0.34's reverse iteration panics
        // ("fucked up tree traversal") when it steps back over a node whose
        // first key ends in a long run of 0xFF bytes, which the
        // order-preserving encodings of numbers produce. The range is read
        // forwards, keeping its last entries; again before the first kept
        // one in the (corrupt) case where rows were missing.
        let mut hi: Bound<Vec<u8>> = upper.map(<[u8]>::to_vec);
        loop {
            let want = limit - out.len();
            let mut last: VecDeque<(sled::IVec, sled::IVec)> = VecDeque::new();
            for item in self
                .tree()
                .range::<&[u8], _>((Bound::Included(&start[..]), hi.as_ref().map(Vec::as_slice)))
            {
                if last.len() == want {
                    last.pop_front();
                }
                last.push_back(item.map_err(sled_err)?);
            }
            let full = last.len() == want;
            let first = last.front().map(|(k, _)| k.to_vec());
            for (_, id) in last.iter().rev() {
                out.extend(row_of(id)?);
            }
            match first {
                Some(first) if full && out.len() < limit => hi = Bound::Excluded(first),
                _ => return Ok(out),
            }
        }
    }
}

impl Store for SledStore {
    fn schema(&self) -> &Schema {
        &self.schema
    }

    fn apply(&self, batch: WriteBatch) -> StoreResult<()> {
        let _writer = self.writer.lock();
        validate_batch(&self.schema, &batch, self.last_queued_seq()?)?;
        for op in &batch.ops {
            match op {
                BatchOp::PutBucketEntry { bucket, entry } => {
                    keys::check_bucket(bucket)?;
                    keys::check_name("bucket entry table name", &entry.table)?;
                }
                BatchOp::DeleteBucketEntry { bucket, table, .. } => {
                    keys::check_bucket(bucket)?;
                    keys::check_name("bucket entry table name", table)?;
                }
                BatchOp::PutBucketState { bucket, .. }
                | BatchOp::DeleteBucket { bucket }
                | BatchOp::DeleteStaged { bucket, .. }
                | BatchOp::SwitchInStaged { bucket, .. } => keys::check_bucket(bucket)?,
                BatchOp::PutStaged { bucket, op } => {
                    keys::check_bucket(bucket)?;
                    keys::check_name("staged op table name", &op.table)?;
                }
                _ => {}
            }
        }
        if switch::chunked(self, &batch)? {
            self.apply_chunked(batch)?;
        } else {
            let mut p = Pending::new(self.tree());
            self.stage(batch, &mut p)?;
            if p.is_empty() {
                return Ok(());
            }
            let _snap = self.snapshot.write();
            self.commit_pending(p)?;
        }
        if self.options.flush_on_apply {
            self.db.flush().map_err(sled_err)?;
        }
        Ok(())
    }

    fn get_synced(&self, table: &str, id: &str) -> StoreResult<Option<RowData>> {
        table_def(&self.schema, table)?;
        let v = self
            .tree()
            .get(keys::row_key(keys::SYNCED, table, id))
            .map_err(sled_err)?;
        v.map(|v| codec::decode_row(&v).map_err(StoreError::from)).transpose()
    }

    fn scan_synced(&self, table: &str) -> StoreResult<Rows> {
        table_def(&self.schema, table)?;
        self.scan_rows(&keys::table_prefix(keys::SYNCED, table), |v| {
            codec::decode_row(v).map_err(StoreError::from)
        })
    }

    fn scan_synced_index(
        &self,
        table: &str,
        index: &str,
        lower: Bound<Vec<Value>>,
        upper: Bound<Vec<Value>>,
    ) -> StoreResult<Rows> {
        self.index_scan(table, index, &lower, &upper, false, usize::MAX)
    }

    fn scan_synced_index_limited(
        &self,
        table: &str,
        index: &str,
        lower: Bound<Vec<Value>>,
        upper: Bound<Vec<Value>>,
        reverse: bool,
        limit: usize,
    ) -> StoreResult<Rows> {
        self.index_scan(table, index, &lower, &upper, reverse, limit)
    }

    fn get_overlay(&self, table: &str, id: &str) -> StoreResult<Option<OverlayEntry>> {
        table_def(&self.schema, table)?;
        let v = self
            .tree()
            .get(keys::row_key(keys::OVERLAY, table, id))
            .map_err(sled_err)?;
        v.map(|v| values::decode_overlay(&v)).transpose()
    }

    fn scan_overlay(&self, table: &str) -> StoreResult<Vec<(String, OverlayEntry)>> {
        table_def(&self.schema, table)?;
        self.scan_rows(&keys::table_prefix(keys::OVERLAY, table), values::decode_overlay)
    }

    fn queue_from(&self, from_seq: u64, limit: usize) -> StoreResult<Vec<CrudEntry>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let start = keys::queue_key(from_seq);
        let end = prefix_end(&[keys::QUEUE]);
        let upper = end.as_deref().map_or(Bound::Unbounded, Bound::Excluded);
        let _snap = self.snapshot.read();
        let mut out = Vec::new();
        for item in self.tree().range::<&[u8], _>((Bound::Included(&start[..]), upper)) {
            let (_, v) = item.map_err(sled_err)?;
            out.push(codec::decode_entry(&v)?);
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    fn queue_len(&self) -> StoreResult<u64> {
        Ok(self.queue_len.load(Ordering::Relaxed))
    }

    fn bucket_state(&self, bucket: &str) -> StoreResult<Option<BucketState>> {
        keys::check_bucket(bucket)?;
        let v = self.tree().get(keys::bucket_state_key(bucket)).map_err(sled_err)?;
        v.map(|v| values::decode_bucket_state(&v)).transpose()
    }

    fn buckets(&self) -> StoreResult<Vec<(String, BucketState)>> {
        self.scan_rows(&[keys::BUCKET_STATE], values::decode_bucket_state)
    }

    fn bucket_entry(&self, bucket: &str, table: &str, row_id: &str) -> StoreResult<Option<BucketEntry>> {
        keys::check_bucket(bucket)?;
        keys::check_name("bucket entry table name", table)?;
        let v = self
            .tree()
            .get(keys::bucket_entry_key(bucket, table, row_id))
            .map_err(sled_err)?;
        v.map(|v| values::decode_bucket_entry(table.to_owned(), row_id.to_owned(), &v))
            .transpose()
    }

    fn bucket_entries(&self, bucket: &str, after: Option<(&str, &str)>, limit: usize) -> StoreResult<Vec<BucketEntry>> {
        keys::check_bucket(bucket)?;
        if let Some((table, _)) = after {
            keys::check_name("bucket entry table name", table)?;
        }
        if limit == 0 {
            return Ok(Vec::new());
        }
        let prefix = keys::bucket_prefix(bucket);
        let start = match after {
            Some((table, row_id)) => Bound::Excluded(keys::bucket_entry_key(bucket, table, row_id)),
            None => Bound::Included(prefix.clone()),
        };
        let end = prefix_end(&prefix);
        let upper = end.map_or(Bound::Unbounded, Bound::Excluded);
        let _snap = self.snapshot.read();
        let mut out = Vec::new();
        for item in self.tree().range((start, upper)) {
            let (k, v) = item.map_err(sled_err)?;
            let (table, row_id) = keys::parse_bucket_entry_key(&k, prefix.len())?;
            out.push(values::decode_bucket_entry(table, row_id, &v)?);
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    fn get_meta(&self, key: &str) -> StoreResult<Option<Vec<u8>>> {
        let v = self.tree().get(keys::meta_key(key)).map_err(sled_err)?;
        Ok(v.map(|v| v.to_vec()))
    }

    fn staged_ops(&self, bucket: &str, after_op_id: u64, limit: usize) -> StoreResult<Vec<StagedOp>> {
        keys::check_bucket(bucket)?;
        let _snap = self.snapshot.read();
        staging::read(self.tree(), bucket, after_op_id, limit)
    }

    fn staged_buckets(&self) -> StoreResult<Vec<String>> {
        let _snap = self.snapshot.read();
        staging::buckets(self.tree())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_core::{row_data, ColumnType, Table};

    fn schema(indexes: &[(&str, &[&str])]) -> Schema {
        let mut t = Table::new("tickets")
            .column("status", ColumnType::Text)
            .column("rank", ColumnType::Integer);
        for (name, cols) in indexes {
            t = t.index(*name, cols);
        }
        Schema::new([t]).expect("schema")
    }

    fn count_prefix(store: &SledStore, prefix: &[u8]) -> usize {
        store.tree().scan_prefix(prefix).count()
    }

    #[test]
    fn batch_rewrites_index_entries_of_rows_put_twice() {
        let store = SledStore::temporary(schema(&[("by_status", &["status"])])).expect("open");
        let mut b = WriteBatch::new();
        b.put_synced("tickets", "a", row_data([("status", Value::from("open"))]));
        b.put_synced("tickets", "a", row_data([("status", Value::from("done"))]));
        store.apply(b).expect("apply");
        let prefix = keys::index_prefix("tickets", "by_status");
        assert_eq!(count_prefix(&store, &prefix), 1);
        let mut b = WriteBatch::new();
        b.delete_synced("tickets", "a");
        store.apply(b).expect("apply");
        assert_eq!(count_prefix(&store, &prefix), 0);
    }

    #[test]
    fn reopening_drops_and_rebuilds_index_entries() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db");
        {
            let store = SledStore::open(&path, schema(&[("by_status", &["status"])])).expect("open");
            let mut b = WriteBatch::new();
            for i in 0..5 {
                b.put_synced("tickets", format!("r{i}"), row_data([("status", Value::from("open"))]));
            }
            store.apply(b).expect("apply");
        }
        {
            let store = SledStore::open(&path, schema(&[("by_rank", &["rank"])])).expect("reopen");
            assert_eq!(count_prefix(&store, &keys::index_prefix("tickets", "by_status")), 0);
            assert_eq!(count_prefix(&store, &keys::index_prefix("tickets", "by_rank")), 5);
            assert_eq!(count_prefix(&store, &[keys::INDEX_DEF]), 1);
        }
        let store = SledStore::open(&path, schema(&[])).expect("reopen");
        assert_eq!(count_prefix(&store, &[keys::INDEX]), 0);
        assert_eq!(count_prefix(&store, &[keys::INDEX_DEF]), 0);
    }

    #[test]
    fn bucket_names_with_nul_are_rejected_without_writing() {
        let store = SledStore::temporary(schema(&[])).expect("open");
        let mut b = WriteBatch::new();
        b.put_meta("k", vec![1]);
        b.push(BatchOp::PutBucketState {
            bucket: "a\0b".into(),
            state: BucketState::default(),
        });
        let err = store.apply(b).expect_err("nul bucket");
        assert!(matches!(err, StoreError::InvalidInput(_)), "{err}");
        assert!(err.to_string().contains("NUL"), "{err}");
        assert_eq!(store.get_meta("k").expect("meta"), None);

        let entry = |table: &str, row_id: &str| BucketEntry {
            table: table.into(),
            row_id: row_id.into(),
            op_id: 1,
            checksum: 2,
        };
        for op in [
            BatchOp::PutBucketEntry {
                bucket: "b\0".into(),
                entry: entry("t", "r"),
            },
            BatchOp::PutBucketEntry {
                bucket: "b".into(),
                entry: entry("t\0u", "r"),
            },
            BatchOp::DeleteBucketEntry {
                bucket: "b".into(),
                table: "\0".into(),
                row_id: "r".into(),
            },
            BatchOp::DeleteBucket { bucket: "\0".into() },
        ] {
            let mut b = WriteBatch::new();
            b.put_meta("k", vec![1]).push(op.clone());
            let err = store.apply(b).expect_err("nul name");
            assert!(matches!(err, StoreError::InvalidInput(_)), "{op:?}: {err}");
            assert_eq!(store.get_meta("k").expect("meta"), None);
        }
        assert!(matches!(
            store.bucket_entry("b", "t\0", "r"),
            Err(StoreError::InvalidInput(_))
        ));
        assert!(matches!(
            store.bucket_entries("b\0", None, 1),
            Err(StoreError::InvalidInput(_))
        ));

        // NUL in a row id is fine: it comes last in the key.
        let mut b = WriteBatch::new();
        b.push(BatchOp::PutBucketEntry {
            bucket: "b".into(),
            entry: entry("t", "r\0x"),
        });
        b.push(BatchOp::PutBucketEntry {
            bucket: "b".into(),
            entry: entry("t", "r"),
        });
        store.apply(b).expect("apply");
        assert_eq!(
            store.bucket_entry("b", "t", "r\0x").expect("entry"),
            Some(entry("t", "r\0x"))
        );
        assert_eq!(
            store.bucket_entries("b", Some(("t", "r")), 10).expect("entries"),
            vec![entry("t", "r\0x")]
        );
    }

    #[test]
    fn deleting_a_bucket_spares_buckets_extending_its_name() {
        let store = SledStore::temporary(schema(&[])).expect("open");
        let entry = |row_id: &str| BucketEntry {
            table: "tickets".into(),
            row_id: row_id.into(),
            op_id: 1,
            checksum: 2,
        };
        let mut b = WriteBatch::new();
        for bucket in ["user/ann", "user/ann/x", "user/an", "user/ann\u{1}"] {
            b.push(BatchOp::PutBucketEntry {
                bucket: bucket.into(),
                entry: entry(bucket),
            });
        }
        store.apply(b).expect("apply");
        // Staged entries of the same batch go too; the others stay.
        let mut b = WriteBatch::new();
        b.push(BatchOp::PutBucketEntry {
            bucket: "user/ann".into(),
            entry: entry("staged"),
        });
        b.push(BatchOp::DeleteBucket {
            bucket: "user/ann".into(),
        });
        store.apply(b).expect("apply");
        assert_eq!(count_prefix(&store, &keys::bucket_prefix("user/ann")), 0);
        for bucket in ["user/ann/x", "user/an", "user/ann\u{1}"] {
            assert_eq!(
                store.bucket_entries(bucket, None, 10).expect("entries"),
                vec![entry(bucket)],
                "{bucket}"
            );
        }
    }

    #[test]
    fn format_1_databases_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db");
        drop(SledStore::open(&path, schema(&[])).expect("open"));
        {
            let db = open_db(sled::Config::new().path(&path)).expect("sled");
            db.insert(keys::format_key(), vec![1]).expect("insert");
            db.flush().expect("flush");
        }
        let err = SledStore::open(&path, schema(&[])).expect_err("format 1");
        assert!(matches!(err, StoreError::Backend { retryable: false, .. }), "{err}");
        assert!(err.to_string().contains("format [1]"), "{err}");
    }

    #[test]
    fn foreign_databases_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db");
        {
            let db = sled::open(&path).expect("sled");
            db.insert(b"x", b"y".to_vec()).expect("insert");
            db.flush().expect("flush");
        }
        let err = SledStore::open(&path, schema(&[])).expect_err("not a ferry store");
        assert!(err.to_string().contains("not a ferry store"), "{err}");
    }
}
