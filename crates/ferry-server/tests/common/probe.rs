//! SQLite with probes for stream tests: commit notifications that can be
//! silenced (a shared database that loses them), counts of the reads
//! streams and the change feed make, a write transaction held before
//! it starts (a long job caught between two of its transactions), writes
//! that fail (counted), and a change feed whose first read waits.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Mutex;

use ferry_core::{HlcTimestamp, Schema, Table};
use ferry_protocol::{DataLineWriter, OplogEntry};
use ferry_server::{
    ChangesSince, CheckpointState, CommitReceiver, OpRange, SourceDb, SourceError, SourceTx, SqliteSourceDb,
    StoredOutcome, StoredRow,
};

/// The probed database.
#[derive(Debug)]
pub struct ProbeDb {
    inner: SqliteSourceDb,
    /// `Some`: commit notifications never come (the sender is kept so the
    /// receiver never closes).
    silent: Option<(tokio::sync::watch::Sender<u64>, CommitReceiver)>,
    /// `checkpoint` calls.
    pub checkpoints: AtomicUsize,
    /// `read_ops_into` calls (the streams' own op reads).
    pub op_reads: AtomicUsize,
    /// `changes_since` calls (the change feed's reads).
    pub feed_reads: AtomicUsize,
    /// The write transaction to hold ([`ProbeDb::hold_write`]).
    hold: Mutex<Option<WriteHold>>,
    /// `write` calls.
    pub writes: AtomicUsize,
    /// While true, every write transaction fails (a database error).
    pub failing_writes: AtomicBool,
    /// While true, the first `changes_since` (the change feed's start)
    /// waits (at most 5 s) until it is false again.
    pub hold_first_feed_read: AtomicBool,
}

/// One write transaction held before it starts (the writer free).
#[derive(Debug)]
struct WriteHold {
    /// Write transactions still let through before the held one.
    let_through: usize,
    /// Told when the held write waits.
    held: mpsc::Sender<()>,
    /// The held write goes on when this sends (or closes).
    release: mpsc::Receiver<()>,
}

impl ProbeDb {
    /// SQLite in `dir`, notifying commits as usual.
    pub fn open(dir: &std::path::Path) -> Self {
        ProbeDb {
            inner: SqliteSourceDb::open_dir(dir).expect("open db"),
            silent: None,
            checkpoints: AtomicUsize::new(0),
            op_reads: AtomicUsize::new(0),
            feed_reads: AtomicUsize::new(0),
            hold: Mutex::new(None),
            writes: AtomicUsize::new(0),
            failing_writes: AtomicBool::new(false),
            hold_first_feed_read: AtomicBool::new(false),
        }
    }

    /// Hold the write transaction that comes after `let_through` more:
    /// before it starts, it tells the first receiver and waits until the
    /// sender sends (or is dropped).
    pub fn hold_write(&self, let_through: usize) -> (mpsc::Receiver<()>, mpsc::Sender<()>) {
        let (held_tx, held_rx) = mpsc::channel();
        let (release_tx, release_rx) = mpsc::channel();
        *self.hold.lock().expect("hold lock") = Some(WriteHold {
            let_through,
            held: held_tx,
            release: release_rx,
        });
        (held_rx, release_tx)
    }

    /// SQLite in `dir` whose commit notifications never come.
    pub fn silent(dir: &std::path::Path) -> Self {
        ProbeDb {
            silent: Some(tokio::sync::watch::channel(0)),
            ..Self::open(dir)
        }
    }
}

type R<T> = Result<T, SourceError>;

impl SourceDb for ProbeDb {
    fn commits(&self) -> CommitReceiver {
        match &self.silent {
            Some((_, never)) => never.clone(),
            None => self.inner.commits(),
        }
    }
    fn migrate(&self, schema: &Schema) -> R<()> {
        self.inner.migrate(schema)
    }
    fn write(&self, work: &mut dyn FnMut(&mut dyn SourceTx) -> R<()>) -> R<()> {
        self.writes.fetch_add(1, Ordering::Relaxed);
        if self.failing_writes.load(Ordering::Relaxed) {
            return Err(SourceError::Database("probe: the database fails every write".into()));
        }
        let held = {
            let mut hold = self.hold.lock().expect("hold lock");
            match hold.as_mut() {
                Some(h) if h.let_through > 0 => {
                    h.let_through -= 1;
                    None
                }
                Some(_) => hold.take(),
                None => None,
            }
        };
        if let Some(h) = held {
            let _ = h.held.send(());
            let _ = h.release.recv();
        }
        self.inner.write(work)
    }
    fn checkpoint(&self, client_id: &str, buckets: &[String]) -> R<CheckpointState> {
        self.checkpoints.fetch_add(1, Ordering::Relaxed);
        self.inner.checkpoint(client_id, buckets)
    }
    fn changes_since(&self, after_op_id: u64, clients: &[String]) -> R<ChangesSince> {
        if self.feed_reads.fetch_add(1, Ordering::SeqCst) == 0 {
            let start = std::time::Instant::now();
            while self.hold_first_feed_read.load(Ordering::SeqCst) && start.elapsed().as_secs() < 5 {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }
        self.inner.changes_since(after_op_id, clients)
    }
    fn read_ops(&self, range: &OpRange<'_>) -> R<Vec<OplogEntry>> {
        self.inner.read_ops(range)
    }
    fn read_ops_into(&self, range: &OpRange<'_>, line: &mut DataLineWriter) -> R<Option<u64>> {
        self.op_reads.fetch_add(1, Ordering::Relaxed);
        self.inner.read_ops_into(range, line)
    }
    fn bucket_names(&self) -> R<Vec<String>> {
        self.inner.bucket_names()
    }
    fn oplog_len(&self) -> R<u64> {
        self.inner.oplog_len()
    }
    fn get_row(&self, table: &Table, id: &str) -> R<Option<StoredRow>> {
        self.inner.get_row(table, id)
    }
    fn client_owner(&self, client_id: &str) -> R<Option<String>> {
        self.inner.client_owner(client_id)
    }
    fn client_outcomes(&self, client_id: &str, after_seq: u64, limit: usize) -> R<Vec<(u64, StoredOutcome)>> {
        self.inner.client_outcomes(client_id, after_seq, limit)
    }
    fn meta(&self, key: &str) -> R<Option<String>> {
        self.inner.meta(key)
    }
    fn row_ids(&self, table: &Table, after_id: Option<&str>, limit: usize) -> R<Vec<String>> {
        self.inner.row_ids(table, after_id, limit)
    }
    fn max_clock(&self) -> R<Option<HlcTimestamp>> {
        self.inner.max_clock()
    }
}
