//! The shared change feed of one server: after every commit (and on a
//! timer, for notifications a shared database may lose) one task reads
//! what changed once ([`SourceDb::changes_since`]: the buckets with new
//! entries, their state, the progress of the clients streaming here) and
//! the new entries of the buckets some stream here follows, and hands that
//! to every stream as one shared [`FeedEvent`]. A stream computes its next
//! checkpoint from the event and the checkpoint it sent, and encodes its
//! `data` lines from the event's entries: no database read per stream per
//! write. A stream reads the database itself only to start, after each
//! keepalive, when it fell behind the feed (a gap or a lagged channel), or
//! for a bucket whose new entries were too many to carry
//! ([`FEED_MAX_ENTRIES_PER_BUCKET`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_protocol::{DataLineWriter, OplogEntry};
use ferry_transport::blocking;
use tokio::sync::broadcast;

use super::{blocking_error, Inner};
use crate::db::{BucketState, OpRange};
use crate::error::Result;

/// Events a stream may fall behind by before it reads the database
/// itself instead.
pub const FEED_CHANNEL_EVENTS: usize = 256;
/// Most new entries of one bucket an event carries; past it, streams read
/// that bucket's entries themselves.
pub const FEED_MAX_ENTRIES_PER_BUCKET: usize = 1_000;
/// Most buckets whose entries an event carries (a commit touching more
/// leaves the rest to the streams).
pub const FEED_MAX_BUCKETS_WITH_ENTRIES: usize = 256;
/// Most bytes of `data` lines an event carries, over all its buckets
/// (the entries' encoded size): past it, streams read those buckets'
/// entries themselves. It bounds what a stream that stopped taking events
/// keeps alive: the channel's last [`FEED_CHANNEL_EVENTS`] events, each
/// holding its entries and their lines.
pub const FEED_MAX_CARRIED_BYTES: usize = 64 * 1024;
/// How often the feed looks without a notification.
pub const FEED_POLL_MS: u64 = 1_000;
/// How often, at most, a read after a commit looks at the progress of
/// every client streaming here, not only the clients whose uploads ran
/// here since the last read (a read on the poll timer always does): how
/// late an upload through another instance on a shared database can
/// show in a stream's write checkpoint, if its commit notification
/// came between two such reads.
pub const FEED_PROGRESS_FULL_MS: u64 = 250;

/// What changed between two op ids, for every stream of this server.
#[derive(Debug)]
pub(crate) struct FeedEvent {
    /// The op id the feed had read up to before.
    pub from_op_id: u64,
    /// The global max op id now.
    pub last_op_id: u64,
    /// Buckets with entries in `(from_op_id, last_op_id]`: their state as
    /// of `last_op_id`, and those entries when carried. Ordered maps:
    /// every stream looks its buckets up in every event, and a few string
    /// comparisons cost less than hashing each name.
    pub buckets: BTreeMap<String, FeedBucket>,
    /// Clients streaming here whose progress moved, with their last seq.
    pub clients: BTreeMap<String, u64>,
}

/// One bucket's change.
#[derive(Debug)]
pub(crate) struct FeedBucket {
    pub state: BucketState,
    /// The entries in `(from_op_id, last_op_id]`, ascending; `None`: too
    /// many or too large to carry (read them from the database).
    pub entries: Option<Vec<OplogEntry>>,
    /// `entries` as `data` lines within the server's line limits, encoded
    /// once for every stream that sends all of them (none when the event
    /// does not carry them).
    lines: Vec<Vec<u8>>,
}

impl FeedBucket {
    /// All the carried entries as `data` lines.
    pub(crate) fn encoded_lines(&self) -> &[Vec<u8>] {
        &self.lines
    }
}

/// `entries` of `bucket` as `data` lines (newline included) of at most
/// `max_ops` entries and `max_line_bytes` each (at least one entry per
/// line).
pub(crate) fn encode_entries<'a>(
    bucket: &str,
    entries: impl Iterator<Item = &'a OplogEntry>,
    max_ops: usize,
    max_line_bytes: usize,
) -> Vec<Vec<u8>> {
    let (max_ops, max_bytes) = (max_ops.max(1), max_line_bytes.max(1));
    let mut lines = Vec::new();
    let mut line: Option<DataLineWriter> = None;
    for e in entries {
        let current = line.get_or_insert_with(|| DataLineWriter::new(bucket, 0).with_max_line_bytes(max_bytes));
        if current.ops() < max_ops && current.push_entry(e) {
            continue;
        }
        // Full: a new line, which takes at least this entry.
        if let Some(full) = line.take() {
            lines.push(full.finish());
        }
        let mut next = DataLineWriter::new(bucket, 0).with_max_line_bytes(max_bytes);
        next.push_entry(e);
        line = Some(next);
    }
    if let Some(last) = line {
        lines.push(last.finish());
    }
    lines
}

/// The feed's shared state.
#[derive(Debug)]
pub(crate) struct Feed {
    events: broadcast::Sender<Arc<FeedEvent>>,
    /// Streaming client ids here, with how many streams each has open.
    clients: parking_lot::Mutex<HashMap<String, usize>>,
    /// Buckets some stream here follows, with how many.
    buckets: parking_lot::Mutex<HashMap<String, usize>>,
    /// Clients whose uploads run here or ran since a read started after
    /// them: the progress a read after a commit looks at.
    uploads: parking_lot::Mutex<HashMap<String, UploadMark>>,
    /// Reads started so far.
    reads_started: AtomicU64,
    started: AtomicBool,
}

/// A client's uploads here, for the feed's reads.
#[derive(Debug)]
struct UploadMark {
    /// Uploads of the client running now.
    running: usize,
    /// `reads_started` when the last one ended: reads numbered from it on
    /// started after it and see its commits.
    ended_before_read: u64,
}

impl Feed {
    pub(crate) fn new() -> Self {
        Feed {
            events: broadcast::channel(FEED_CHANNEL_EVENTS).0,
            clients: parking_lot::Mutex::new(HashMap::new()),
            buckets: parking_lot::Mutex::new(HashMap::new()),
            uploads: parking_lot::Mutex::new(HashMap::new()),
            reads_started: AtomicU64::new(0),
            started: AtomicBool::new(false),
        }
    }
}

/// An upload of one client, known to the feed while it runs and until a
/// read started after it: a commit it makes moves the client's progress,
/// which the reads after it look at. Held across the upload.
pub(crate) struct UploadGuard {
    inner: Arc<Inner>,
    client_id: String,
}

impl UploadGuard {
    pub(crate) fn new(inner: &Arc<Inner>, client_id: &str) -> Self {
        inner
            .feed
            .uploads
            .lock()
            .entry(client_id.to_owned())
            .or_insert(UploadMark {
                running: 0,
                ended_before_read: 0,
            })
            .running += 1;
        UploadGuard {
            inner: inner.clone(),
            client_id: client_id.to_owned(),
        }
    }
}

impl Drop for UploadGuard {
    fn drop(&mut self) {
        let feed = &self.inner.feed;
        let mut uploads = feed.uploads.lock();
        let Some(mark) = uploads.get_mut(&self.client_id) else {
            return;
        };
        mark.running = mark.running.saturating_sub(1);
        mark.ended_before_read = feed.reads_started.load(Ordering::SeqCst);
        // Without a feed (no stream here yet) no read clears it; a feed
        // that starts later begins with a full read.
        if mark.running == 0 && !feed.started.load(Ordering::SeqCst) {
            uploads.remove(&self.client_id);
        }
    }
}

/// A stream's registration: its events, and its client and buckets known
/// to the feed until dropped.
pub(crate) struct Subscription {
    inner: Arc<Inner>,
    client_id: String,
    buckets: Vec<String>,
    pub events: broadcast::Receiver<Arc<FeedEvent>>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let feed = &self.inner.feed;
        {
            let mut clients = feed.clients.lock();
            if let Some(n) = clients.get_mut(&self.client_id) {
                *n -= 1;
                if *n == 0 {
                    clients.remove(&self.client_id);
                }
            }
        }
        let mut buckets = feed.buckets.lock();
        for b in &self.buckets {
            if let Some(n) = buckets.get_mut(b) {
                *n -= 1;
                if *n == 0 {
                    buckets.remove(b);
                }
            }
        }
    }
}

/// Subscribe a stream (before it reads its first checkpoint, so no event
/// after that read is missed), starting the feed's task on first use.
pub(crate) fn subscribe(inner: &Arc<Inner>, client_id: &str, buckets: &[String]) -> Subscription {
    let feed = &inner.feed;
    let events = feed.events.subscribe();
    *feed.clients.lock().entry(client_id.to_owned()).or_insert(0) += 1;
    {
        let mut map = feed.buckets.lock();
        for b in buckets {
            *map.entry(b.clone()).or_insert(0) += 1;
        }
    }
    if !feed.started.swap(true, Ordering::SeqCst) {
        let inner = inner.clone();
        tokio::spawn(async move { run_feed(inner).await });
    }
    Subscription {
        inner: inner.clone(),
        client_id: client_id.to_owned(),
        buckets: buckets.to_vec(),
        events,
    }
}

/// The feed's task: until the service shuts down.
async fn run_feed(inner: Arc<Inner>) {
    let mut shutdown = inner.shutdown.subscribe();
    let mut commits = inner.db.commits();
    let mut watermark: Option<u64> = None;
    let mut progress: HashMap<String, u64> = HashMap::new();
    // Whether the next read looks at every streaming client's progress.
    let mut full = true;
    let mut last_full = Instant::now();
    loop {
        commits.borrow_and_update();
        if full {
            last_full = Instant::now();
        }
        match read_once(&inner, watermark, &mut progress, full).await {
            Ok(Some(event)) => {
                // The first event (the start) carries no entries, only
                // the progress it read: a stream whose checkpoint is
                // older sees a gap and reads the database, so a commit
                // just before the start is not missed.
                watermark = Some(event.last_op_id);
                // No stream listening is no error.
                let _ = inner.feed.events.send(Arc::new(event));
            }
            Ok(None) => {}
            Err(e) => tracing::warn!("change feed: {e}"),
        }
        if watermark.is_none() {
            // The start failed: try again after a poll interval.
            tokio::time::sleep(Duration::from_millis(FEED_POLL_MS)).await;
        }
        tokio::select! {
            _ = shutdown.changed() => return,
            r = commits.changed() => {
                if r.is_err() {
                    return;
                }
                full = last_full.elapsed() >= Duration::from_millis(FEED_PROGRESS_FULL_MS);
            }
            () = tokio::time::sleep(Duration::from_millis(FEED_POLL_MS)) => full = true,
        }
        if *shutdown.borrow() {
            return;
        }
    }
}

/// Read what changed since `watermark` (at the start, only where the log
/// is): the progress of every client streaming here when `full`, else of
/// those whose uploads ran here since the last read. `None`: nothing new
/// for any stream.
async fn read_once(
    inner: &Arc<Inner>,
    watermark: Option<u64>,
    progress: &mut HashMap<String, u64>,
    full: bool,
) -> Result<Option<FeedEvent>> {
    let feed = &inner.feed;
    let read_no = feed.reads_started.fetch_add(1, Ordering::SeqCst);
    let clients: Vec<String> = {
        let streaming = feed.clients.lock();
        if full {
            streaming.keys().cloned().collect()
        } else {
            let uploads = feed.uploads.lock();
            uploads.keys().filter(|c| streaming.contains_key(*c)).cloned().collect()
        }
    };
    let db = inner.db.clone();
    let after = watermark.unwrap_or(u64::MAX);
    let reader = inner.clone();
    let read_result = blocking::run(move || -> Result<_> {
        let changes = db.changes_since(after, &clients)?;
        let mut entries: HashMap<String, (Vec<OplogEntry>, Vec<Vec<u8>>)> = HashMap::new();
        if after != u64::MAX {
            let followed: Vec<(&String, u64)> = {
                let followed = reader.feed.buckets.lock();
                changes
                    .buckets
                    .iter()
                    .filter(|(b, _)| followed.contains_key(b))
                    .map(|(b, state)| (b, state.last_op_id))
                    .take(FEED_MAX_BUCKETS_WITH_ENTRIES)
                    .collect()
            };
            let mut budget_bytes = FEED_MAX_CARRIED_BYTES;
            for (bucket, newest_op_id) in followed {
                let range = OpRange::between(bucket, after, changes.last_op_id)
                    .limited(FEED_MAX_ENTRIES_PER_BUCKET + 1, budget_bytes);
                let ops = db.read_ops(&range)?;
                // Carried only whole: up to the bucket's newest entry (a
                // read the byte budget cut short, or an entry past it,
                // leaves the bucket to the streams).
                let whole =
                    ops.len() <= FEED_MAX_ENTRIES_PER_BUCKET && ops.last().map(|e| e.op_id) == Some(newest_op_id);
                if !whole {
                    continue;
                }
                // Encoded here, once, for every stream that sends them all.
                let lines = encode_entries(
                    bucket,
                    ops.iter(),
                    reader.options.max_ops_per_line,
                    reader.options.max_line_bytes,
                );
                let bytes: usize = lines.iter().map(Vec::len).sum();
                if bytes > budget_bytes {
                    continue;
                }
                budget_bytes -= bytes;
                entries.insert(bucket.clone(), (ops, lines));
            }
        }
        Ok((changes, entries))
    })
    .await
    .map_err(blocking_error)?;
    let (changes, mut entries) = read_result?;
    // The uploads that ended before this read started are seen now.
    feed.uploads
        .lock()
        .retain(|_, m| m.running > 0 || m.ended_before_read > read_no);
    // The progress of the clients read (after a full read, those that left
    // are forgotten); the ones that moved since the last read go out.
    let mut moved = BTreeMap::new();
    if full {
        let mut now = HashMap::with_capacity(changes.clients.len());
        for (client, seq) in changes.clients {
            if progress.get(&client) != Some(&seq) {
                moved.insert(client.clone(), seq);
            }
            now.insert(client, seq);
        }
        *progress = now;
    } else {
        for (client, seq) in changes.clients {
            if progress.get(&client) != Some(&seq) {
                moved.insert(client.clone(), seq);
                progress.insert(client, seq);
            }
        }
    }
    let Some(from) = watermark else {
        // The start: where the log is, no entry to hand out, but the
        // progress read (every streaming client's, now known as sent):
        // a stream that read its checkpoint before this read would
        // otherwise miss an upload that moved its client's progress
        // without an op log entry in between (no gap shows it), until
        // its next keepalive.
        return Ok(Some(FeedEvent {
            from_op_id: changes.last_op_id,
            last_op_id: changes.last_op_id,
            buckets: BTreeMap::new(),
            clients: moved,
        }));
    };
    if changes.last_op_id <= from && moved.is_empty() {
        return Ok(None);
    }
    let buckets = changes
        .buckets
        .into_iter()
        .map(|(name, state)| {
            let (entries, lines) = match entries.remove(&name) {
                Some((entries, lines)) => (Some(entries), lines),
                None => (None, Vec::new()),
            };
            (name, FeedBucket { state, entries, lines })
        })
        .collect();
    Ok(Some(FeedEvent {
        from_op_id: from,
        last_op_id: changes.last_op_id.max(from),
        buckets,
        clients: moved,
    }))
}
