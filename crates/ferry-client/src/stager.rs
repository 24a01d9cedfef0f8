//! Writing a checkpoint's ops to the store's staging area as they arrive,
//! on a thread of its own, so receiving, decoding and writing overlap.
//!
//! The download loop hands each `data` line's new ops to the [`Stager`];
//! its writer thread gathers whatever is waiting into one store batch (at
//! most [`MAX_STAGE_BATCH_OPS`] ops) and applies it. One thread for the
//! whole download, rather than a pool thread per batch, keeps the store's
//! allocations in one allocator arena. What is handed over and not yet
//! written is bounded by `ClientOptions::staging_memory_bytes`: past it,
//! handing over waits for the writer. Messages are written in the order they were sent, so a
//! discard, a deletion or a flush orders after every op sent before it.

use std::collections::BTreeSet;
use std::sync::Arc;

use ferry_core::Schema;
use ferry_protocol::{Download, DownloadLimits, OpKind, OplogEntry};
use ferry_queue::{LocalDb, StagingArea, StagingBatch};
use ferry_store::{StagedKind, StagedOp};
use ferry_transport::blocking;
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use crate::apply::{from_store_state, keep_declared_columns};
use crate::ClientError;

/// Most staged ops the writer puts in one store batch. A written batch is
/// freed on a helper thread while the writer goes on (`ferry-sqlite`), so
/// a smaller batch holds less memory there; a larger one saves nothing
/// measurable (a million rows: 16,384 cost about 8 MB more at the peak).
pub const MAX_STAGE_BATCH_OPS: usize = 4_096;

/// Budget granularity: permits count KiB.
const KIB: usize = 1024;

enum Msg {
    Ops {
        bucket: String,
        ops: Vec<StagedOp>,
        _permit: OwnedSemaphorePermit,
    },
    Writes(StagingBatch),
    Flush(oneshot::Sender<Result<(), String>>),
}

/// Where handed-over ops go.
enum Sink {
    /// The writer thread of this download loop.
    Thread {
        tx: Option<mpsc::UnboundedSender<Msg>>,
        /// Closed when the thread ends.
        done: Option<oneshot::Receiver<()>>,
    },
    /// Written on the calling thread at once (a deterministic simulation
    /// runs blocking work inline, and a second thread would be a race; or
    /// the system refused a thread).
    Inline(Mutex<Writer>),
}

/// The staging writer of one download loop.
pub(crate) struct Stager {
    sink: Sink,
    budget: Arc<Semaphore>,
    budget_kib: usize,
    schema: Schema,
}

impl Stager {
    /// Start the writer over `staging`, with at most `memory_bytes` of ops
    /// handed over and not yet written.
    pub(crate) fn start(staging: StagingArea, memory_bytes: usize) -> Self {
        let budget_kib = (memory_bytes / KIB).clamp(1, Semaphore::MAX_PERMITS);
        let budget = Arc::new(Semaphore::new(budget_kib));
        let schema = staging.schema().clone();
        let sink = if blocking::is_inline() {
            Sink::Inline(Mutex::new(Writer::new(staging)))
        } else {
            spawn_writer(staging)
        };
        Stager {
            sink,
            budget,
            budget_kib,
            schema,
        }
    }

    fn send(&self, msg: Msg) -> Result<(), ClientError> {
        match &self.sink {
            Sink::Thread { tx, .. } => tx
                .as_ref()
                .and_then(|tx| tx.send(msg).ok())
                .ok_or_else(|| ClientError::Task("the staging writer stopped".into())),
            Sink::Inline(writer) => {
                let mut w = writer.lock();
                w.take(msg);
                // Nothing waits for an idle moment here: write now, which
                // also returns the budget at once.
                w.write();
                Ok(())
            }
        }
    }

    /// Hand over a bucket's new ops (waiting while the budget is spent).
    pub(crate) async fn stage(&self, bucket: String, ops: Vec<OplogEntry>) -> Result<(), ClientError> {
        let ops: Vec<StagedOp> = ops.into_iter().map(|op| to_staged(&self.schema, op)).collect();
        let bytes: usize = ops.iter().map(StagedOp::approx_bytes).sum();
        let kib = (bytes / KIB).clamp(1, self.budget_kib);
        let n = u32::try_from(kib).unwrap_or(u32::MAX);
        let permit = self
            .budget
            .clone()
            .acquire_many_owned(n)
            .await
            .map_err(|_| ClientError::Task("the staging budget closed".into()))?;
        self.send(Msg::Ops {
            bucket,
            ops,
            _permit: permit,
        })
    }

    /// Drop every staged op of `bucket`.
    pub(crate) fn discard(&self, bucket: String) -> Result<(), ClientError> {
        let mut writes = StagingBatch::new();
        writes.delete_through(bucket, u64::MAX);
        self.send(Msg::Writes(writes))
    }

    /// Drop `bucket`'s staged ops through `through_op_id` (switched in).
    pub(crate) fn delete_through(&self, bucket: String, through_op_id: u64) -> Result<(), ClientError> {
        let mut writes = StagingBatch::new();
        writes.delete_through(bucket, through_op_id);
        self.send(Msg::Writes(writes))
    }

    /// Keep the buckets being downloaded from scratch.
    pub(crate) fn keep_resetting(&self, resetting: &BTreeSet<String>) -> Result<(), ClientError> {
        let mut writes = StagingBatch::new();
        writes.keep_resetting(resetting);
        self.send(Msg::Writes(writes))
    }

    /// Wait until everything handed over is written.
    pub(crate) async fn flush(&self) -> Result<(), ClientError> {
        let (reply, done) = oneshot::channel();
        self.send(Msg::Flush(reply))?;
        match done.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(ClientError::Task(format!("staging failed: {e}"))),
            Err(_) => Err(ClientError::Task("the staging writer stopped".into())),
        }
    }

    /// Write what is left and stop the writer.
    pub(crate) async fn close(mut self) {
        if let Sink::Thread { tx, done } = &mut self.sink {
            *tx = None;
            if let Some(done) = done.take() {
                let _ = done.await;
            }
        }
    }
}

impl Drop for Stager {
    fn drop(&mut self) {
        // Dropping the sender lets the writer finish what it has; nothing
        // to wait for here.
        if let Sink::Thread { tx, .. } = &mut self.sink {
            *tx = None;
        }
    }
}

/// Start the writer thread (one per download loop, so the rows it frees
/// and the store's allocations stay in one allocator arena), or write
/// inline if the system refuses a thread.
fn spawn_writer(staging: StagingArea) -> Sink {
    let (tx, rx) = mpsc::unbounded_channel();
    let (ended, done) = oneshot::channel::<()>();
    let writer = Writer::new(staging.clone());
    let spawned = std::thread::Builder::new().name("ferry-stage".into()).spawn(move || {
        write_thread(writer, rx);
        drop(ended);
    });
    match spawned {
        Ok(_) => Sink::Thread {
            tx: Some(tx),
            done: Some(done),
        },
        Err(e) => {
            tracing::warn!(error = %e, "starting the staging writer thread failed: writing inline");
            Sink::Inline(Mutex::new(Writer::new(staging)))
        }
    }
}

/// A protocol op as the store stages it: only the columns the schema
/// declares, and no row for tables it does not declare.
fn to_staged(schema: &Schema, op: OplogEntry) -> StagedOp {
    let kind = match op.op {
        OpKind::Put => StagedKind::Put,
        OpKind::Remove => StagedKind::Remove,
        OpKind::Move => StagedKind::Move,
        OpKind::Clear => StagedKind::Clear,
    };
    let table = op.object_type.unwrap_or_default();
    let data = match (kind, schema.table(&table), op.data) {
        (StagedKind::Put, Ok(def), Some(mut data)) => {
            keep_declared_columns(def, &mut data);
            Some(data)
        }
        _ => None,
    };
    StagedOp {
        op_id: op.op_id,
        kind,
        table: if matches!(kind, StagedKind::Put | StagedKind::Remove) {
            table
        } else {
            String::new()
        },
        row_id: op.object_id.unwrap_or_default(),
        data,
        checksum: op.checksum,
    }
}

/// The writer's state: the batch being gathered, the budget it holds and
/// the first failure (after which everything is dropped: the download
/// starts over from what the store holds).
struct Writer {
    staging: StagingArea,
    batch: StagingBatch,
    permits: Vec<OwnedSemaphorePermit>,
    failed: Option<String>,
}

impl Writer {
    fn new(staging: StagingArea) -> Self {
        Writer {
            staging,
            batch: StagingBatch::new(),
            permits: Vec::new(),
            failed: None,
        }
    }

    /// Take one message (writing when it asks or the batch is full).
    fn take(&mut self, msg: Msg) {
        match msg {
            Msg::Ops { bucket, ops, _permit } => {
                for op in ops {
                    self.batch.stage(bucket.clone(), op);
                }
                self.permits.push(_permit);
            }
            Msg::Writes(writes) => {
                self.batch.append(writes);
            }
            Msg::Flush(reply) => {
                self.write();
                let _ = reply.send(self.failed.clone().map_or(Ok(()), Err));
            }
        }
        if self.batch.len() >= MAX_STAGE_BATCH_OPS {
            self.write();
        }
    }

    /// Apply the gathered batch, on this thread.
    fn write(&mut self) {
        let b = std::mem::take(&mut self.batch);
        if !b.is_empty() && self.failed.is_none() {
            if let Err(e) = self.staging.apply(b) {
                tracing::warn!(error = %e, "staging download data failed");
                self.failed = Some(e.to_string());
            }
        }
        self.permits.clear();
    }
}

/// The writer thread's loop: gather what is waiting, write when idle.
fn write_thread(mut w: Writer, mut rx: mpsc::UnboundedReceiver<Msg>) {
    loop {
        let msg = if w.batch.is_empty() {
            rx.blocking_recv()
        } else {
            match rx.try_recv() {
                Ok(msg) => Some(msg),
                Err(mpsc::error::TryRecvError::Empty) => {
                    w.write();
                    continue;
                }
                Err(mpsc::error::TryRecvError::Disconnected) => None,
            }
        };
        let Some(msg) = msg else {
            w.write();
            return;
        };
        w.take(msg);
    }
}

/// The download state a database's staging area resumes: applied
/// buckets, the buckets being downloaded from scratch and what each bucket
/// staged beyond them. Staged ops a crash left behind at or below a
/// bucket's applied op id (switched in already) are dropped first.
pub(crate) fn restore_download(local: &LocalDb, limits: DownloadLimits) -> Result<Download, ClientError> {
    let applied: Vec<(String, ferry_protocol::AppliedBucket)> = local
        .buckets()?
        .into_iter()
        .map(|(name, state)| (name, from_store_state(state)))
        .collect();
    let staging = local.staging_area();
    let resetting = staging.resetting()?;
    let mut cleanup = StagingBatch::new();
    let mut counts = Vec::new();
    for bucket in staging.staged_buckets()? {
        let base = if resetting.contains(&bucket) {
            0
        } else {
            applied
                .iter()
                .find(|(name, _)| *name == bucket)
                .map_or(0, |(_, a)| a.last_op_id)
        };
        if base > 0 {
            cleanup.delete_through(bucket.clone(), base);
        }
        let summary = staging.staged_summary(&bucket, base)?;
        counts.push((bucket, summary));
    }
    staging.apply(cleanup)?;
    Ok(Download::staging_out(applied, resetting, counts, limits))
}
