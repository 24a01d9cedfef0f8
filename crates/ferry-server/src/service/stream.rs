//! Download streams: a checkpoint, then a diff and `data` lines for every
//! change, woken by the source database's commit notifications and
//! looking again after every keepalive; `data` lines are encoded from the
//! stored rows (one path; the typed stream decodes them) and sent within
//! the stream's byte budget.

use super::*;
use crate::metrics::StreamGuard;

impl SyncService {
    /// Open a stream for an authenticated user, typed.
    pub fn open_stream(&self, user: AuthUser, request: StreamRequest) -> Result<ServerLines> {
        self.open_stream_as(user, request)
    }

    /// Open a stream for an authenticated user, with `data` lines encoded
    /// straight from the stored rows (what transports use: no typed rows
    /// are built).
    pub fn open_stream_lines(&self, user: AuthUser, request: StreamRequest) -> Result<ServerLineStream> {
        self.open_stream_as(user, request)
    }

    fn open_stream_as<L: StreamOut>(&self, user: AuthUser, request: StreamRequest) -> Result<mpsc::Receiver<L>> {
        let inner = &self.inner;
        if *inner.shutdown.borrow() {
            return Err(ServiceError::ShuttingDown);
        }
        check_client_id(&request.client_id, inner.options.max_client_id_bytes)?;
        // A point read; a client id of another user is refused before
        // anything of the stream is read.
        inner.check_client_owner(&request.client_id, &user.user_id)?;
        let permit = inner.streams.clone().try_acquire_owned().map_err(|_| {
            ServiceError::Busy(format!(
                "too many concurrent streams (limit {})",
                inner.options.max_concurrent_streams
            ))
        })?;
        let buckets = inner
            .rules
            .user_buckets(&user.claims, inner.options.max_buckets_per_user)?;
        let requested: BTreeMap<&str, u64> = request
            .buckets
            .iter()
            .map(|b| (b.name.as_str(), b.after_op_id))
            .collect();
        let positions: BTreeMap<String, u64> = buckets
            .iter()
            .map(|b| (b.clone(), requested.get(b.as_str()).copied().unwrap_or(0)))
            .collect();
        let (tx, rx) = mpsc::channel(inner.options.stream_buffer_lines.max(1));
        let inner = inner.clone();
        let open = inner.metrics.stream_opened();
        tokio::spawn(async move {
            let _permit = permit;
            let client_id = request.client_id;
            if let Err(e) = run_stream(&inner, &user, &client_id, buckets, positions, &tx, &open).await {
                inner.metrics.error(&e);
                tracing::warn!(client_id = ?client_id, error = %e, "stream failed");
                // A client reading behind a full channel gets it too; one
                // that does not read never does.
                let line = StreamLine::Error(e.to_server_error()).into();
                let _ = tokio::time::timeout(Duration::from_millis(ERROR_LINE_WAIT_MS), tx.send(line)).await;
            }
        });
        Ok(rx)
    }
}

/// Longest wait for room in a failed stream's channel for the line that
/// says why it failed.
const ERROR_LINE_WAIT_MS: u64 = 5_000;

/// Longest a stream keeps its client behind the op id of commits that
/// touched nothing of it (then one diff with no bucket in it tells it).
pub const STREAM_CATCH_UP_MS: u64 = 500;

/// Runs one stream until the client leaves, the token expires or the
/// server shuts down, whether or not the client reads (every send waits
/// within [`ServiceOptions::max_stream_buffer_bytes`] and ends at either).
///
/// The first checkpoint is read from the database; after that the
/// server's change feed (`feed.rs`) hands every commit to the stream, and
/// the stream reads the database again only after a keepalive (a commit a
/// shared database did not notify), when it fell behind the feed, or for
/// entries the feed did not carry.
async fn run_stream<L: StreamOut>(
    inner: &Arc<Inner>,
    user: &AuthUser,
    client_id: &str,
    buckets: Vec<String>,
    mut positions: BTreeMap<String, u64>,
    tx: &mpsc::Sender<L>,
    open: &StreamGuard,
) -> Result<()> {
    // Subscribed before the first read: no commit after it is missed.
    let mut sub = super::feed::subscribe(inner, client_id, &buckets);
    let period = Duration::from_secs(inner.options.keepalive_interval_s.max(1));
    let mut keepalive = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let expires_in_ms = (user.exp_s.saturating_mul(1000)).saturating_sub(inner.clock.now_ms());
    // The transport's share of the budget: the line it is writing.
    let channel_budget = inner
        .options
        .max_stream_buffer_bytes
        .saturating_sub(inner.options.max_line_bytes);
    let mut out = StreamSender::new(
        tx,
        channel_budget,
        inner.stream_buffers.join(&user.user_id),
        inner.shutdown.subscribe(),
        Duration::from_millis(expires_in_ms),
        user.exp_s,
    );
    let mut sent: Option<CheckpointState> = None;
    // The feed's op id this stream has seen every commit up to: past the
    // last checkpoint sent when commits touched none of its buckets.
    let mut seen_op_id = 0u64;
    let mut read_db = true;
    // Whether the client's owner was found to be this user (the client id
    // may have had no owner when the stream opened).
    let mut owner_checked = false;
    // What ends the stream while it waits, made once (not on every pass
    // through the loop): the client leaving, shutdown, the token's expiry.
    let left = tx.closed();
    tokio::pin!(left);
    let mut shutdown = inner.shutdown.subscribe();
    let shutting_down = async move {
        // An error (the sender gone) is a shutdown too.
        let _ = shutdown.wait_for(|s| *s).await.is_ok();
    };
    tokio::pin!(shutting_down);
    let expired = tokio::time::sleep(Duration::from_millis(expires_in_ms));
    tokio::pin!(expired);
    // Commits that touched nothing of this stream move its op id without
    // a line; the client is told where it is within STREAM_CATCH_UP_MS
    // (one line however many such commits), so it catches up with the
    // server's op id without a line per commit.
    let catch_up = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(catch_up);
    let mut catch_up_armed = false;
    loop {
        if read_db {
            read_db = false;
            let db = inner.db.clone();
            let (cid, names) = (client_id.to_owned(), buckets.clone());
            let cp = blocking::run(move || db.checkpoint(&cid, &names))
                .await
                .map_err(blocking_error)??;
            check_progress_owner(inner, user, client_id, &cp, &mut owner_checked).await?;
            seen_op_id = seen_op_id.max(cp.last_op_id);
            if let Err(stop) = send_checkpoint(inner, &mut sent, cp, &mut positions, &mut out, open).await? {
                out.end(stop);
                return Ok(());
            }
        }
        tokio::select! {
            biased;
            () = &mut left => return Ok(()),
            event = sub.events.recv() => match event {
                Ok(event) => {
                    let Some(prev) = &mut sent else {
                        read_db = true;
                        continue;
                    };
                    if event.from_op_id > seen_op_id.max(prev.last_op_id) {
                        // A gap: commits this stream never saw.
                        read_db = true;
                        continue;
                    }
                    let Some(updated) = apply_event(prev, &event, client_id, &mut positions) else {
                        // Nothing of this stream's buckets or client.
                        seen_op_id = seen_op_id.max(event.last_op_id);
                        if !catch_up_armed {
                            catch_up_armed = true;
                            let at = tokio::time::Instant::now() + Duration::from_millis(STREAM_CATCH_UP_MS);
                            catch_up.as_mut().reset(at);
                        }
                        continue;
                    };
                    check_progress_owner(inner, user, client_id, prev, &mut owner_checked).await?;
                    let sent_now = send_diff(inner, prev, updated, &mut positions, &mut out, open, Some(&event));
                    if let Err(stop) = sent_now.await? {
                        out.end(stop);
                        return Ok(());
                    }
                    seen_op_id = seen_op_id.max(event.last_op_id);
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => read_db = true,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return Ok(()),
            },
            () = &mut shutting_down => {
                out.end(Stop::ShuttingDown);
                return Ok(());
            }
            () = &mut expired => {
                out.end(Stop::Expired);
                return Ok(());
            }
            () = &mut catch_up, if catch_up_armed => {
                catch_up_armed = false;
                let Some(prev) = &mut sent else { continue };
                if seen_op_id <= prev.last_op_id {
                    continue;
                }
                // Every commit up to `seen_op_id` was applied to `prev`:
                // none touched its buckets or its client since.
                prev.last_op_id = seen_op_id;
                let sent_now = send_diff(inner, prev, Vec::new(), &mut positions, &mut out, open, None);
                if let Err(stop) = sent_now.await? {
                    out.end(stop);
                    return Ok(());
                }
            }
            _ = keepalive.tick() => {
                let token_expires_in_s = user.exp_s.saturating_sub(inner.clock.now_ms() / 1000);
                if let Err(stop) = out.send(StreamLine::Keepalive { token_expires_in_s }.into()).await {
                    out.end(stop);
                    return Ok(());
                }
                // A commit the database did not notify (another server's,
                // a lost connection) shows in a fresh checkpoint.
                read_db = true;
            }
        }
    }
}

/// Before a stream first sends its client's progress (a write checkpoint):
/// the client must be this user's. A stream may open on a client id no
/// one owns yet; once another user's upload claims it, that user's
/// progress is not this stream's to see, and the stream ends
/// (unauthorized). One point read per stream.
async fn check_progress_owner(
    inner: &Arc<Inner>,
    user: &AuthUser,
    client_id: &str,
    cp: &CheckpointState,
    checked: &mut bool,
) -> Result<()> {
    if *checked || cp.write_checkpoint.is_none() {
        return Ok(());
    }
    let i = inner.clone();
    let (cid, uid) = (client_id.to_owned(), user.user_id.clone());
    blocking::run(move || i.check_client_owner(&cid, &uid))
        .await
        .map_err(blocking_error)??;
    *checked = true;
    Ok(())
}

/// Apply `event` to the checkpoint a stream sent (`sent`, after which it
/// has seen every commit): the event's bucket states where they moved,
/// the client's progress where it moved; the buckets whose state moved,
/// as the diff sends them. `None` when nothing of this
/// stream's changed (no bucket it follows, not its client): `sent` stays
/// and its buckets' positions move past the event, which holds no entry
/// of them.
fn apply_event(
    sent: &mut CheckpointState,
    event: &super::feed::FeedEvent,
    client_id: &str,
    positions: &mut BTreeMap<String, u64>,
) -> Option<Vec<ferry_protocol::BucketChecksum>> {
    let mut updated = Vec::new();
    if event.last_op_id > sent.last_op_id {
        for b in &mut sent.buckets {
            if let Some(changed) = event.buckets.get(&b.bucket) {
                if b.checksum != changed.state.checksum || b.count != changed.state.count {
                    b.checksum = changed.state.checksum;
                    b.count = changed.state.count;
                    updated.push(b.clone());
                }
            }
        }
    }
    let progress = event
        .clients
        .get(client_id)
        // Progress only moves forward.
        .map(|&seq| sent.write_checkpoint.map_or(seq, |w| w.max(seq)))
        .filter(|&w| sent.write_checkpoint != Some(w));
    if updated.is_empty() && progress.is_none() {
        for p in positions.values_mut() {
            *p = (*p).max(event.last_op_id);
        }
        return None;
    }
    sent.last_op_id = sent.last_op_id.max(event.last_op_id);
    if progress.is_some() {
        sent.write_checkpoint = progress;
    }
    Some(updated)
}

/// Send a diff for a stream's checkpoint `cp` (already moved), of the
/// buckets in `updated`, their `data` lines (from the event's entries
/// where it carries them and the stream is where they start, else read
/// from the database), and the checkpoint's end. `Ok(Err(stop))` when
/// the stream must end.
async fn send_diff<L: StreamOut>(
    inner: &Arc<Inner>,
    cp: &CheckpointState,
    updated: Vec<ferry_protocol::BucketChecksum>,
    positions: &mut BTreeMap<String, u64>,
    out: &mut StreamSender<'_, L>,
    open: &StreamGuard,
    event: Option<&super::feed::FeedEvent>,
) -> Result<std::result::Result<(), Stop>> {
    let buckets: Vec<String> = updated.iter().map(|b| b.bucket.clone()).collect();
    let line = StreamLine::CheckpointDiff(CheckpointDiff {
        hlc: Some(inner.hlc.now()),
        last_op_id: cp.last_op_id,
        write_checkpoint: cp.write_checkpoint,
        updated_buckets: updated,
        removed_buckets: Vec::new(),
    });
    if let Err(stop) = out.send(line.into()).await {
        return Ok(Err(stop));
    }
    send_changed(inner, cp, buckets, positions, out, open, event).await
}

/// Send `cp` if it differs from what was sent: the checkpoint (first) or
/// a diff, the `data` lines of the buckets that changed (read from the
/// database), and the checkpoint's end. `Ok(Err(stop))` when the stream
/// must end.
async fn send_checkpoint<L: StreamOut>(
    inner: &Arc<Inner>,
    sent: &mut Option<CheckpointState>,
    cp: CheckpointState,
    positions: &mut BTreeMap<String, u64>,
    out: &mut StreamSender<'_, L>,
    open: &StreamGuard,
) -> Result<std::result::Result<(), Stop>> {
    if sent.as_ref() == Some(&cp) {
        return Ok(Ok(()));
    }
    let done = match &*sent {
        None => {
            let line = StreamLine::Checkpoint(Checkpoint {
                hlc: Some(inner.hlc.now()),
                last_op_id: cp.last_op_id,
                write_checkpoint: cp.write_checkpoint,
                buckets: cp.buckets.clone(),
            });
            if let Err(stop) = out.send(line.into()).await {
                return Ok(Err(stop));
            }
            let all = cp.buckets.iter().map(|b| b.bucket.clone()).collect();
            send_changed(inner, &cp, all, positions, out, open, None).await?
        }
        Some(prev) => {
            let updated = cp
                .buckets
                .iter()
                .filter(|b| !prev.buckets.contains(b))
                .cloned()
                .collect();
            send_diff(inner, &cp, updated, positions, out, open, None).await?
        }
    };
    if done.is_ok() {
        *sent = Some(cp);
    }
    Ok(done)
}

/// After a checkpoint or diff line: the `data` lines of the `changed`
/// buckets up to `cp` (from the event's entries where it carries them
/// and the stream is where they start, else read from the database), and
/// the checkpoint's end.
async fn send_changed<L: StreamOut>(
    inner: &Arc<Inner>,
    cp: &CheckpointState,
    changed: Vec<String>,
    positions: &mut BTreeMap<String, u64>,
    out: &mut StreamSender<'_, L>,
    open: &StreamGuard,
    event: Option<&super::feed::FeedEvent>,
) -> Result<std::result::Result<(), Stop>> {
    let mut from_db: Vec<(String, u64)> = Vec::new();
    for b in changed {
        let pos = positions.get(&b).copied().unwrap_or(0);
        if pos >= cp.last_op_id {
            continue;
        }
        let carried = event.and_then(|e| e.buckets.get(&b).map(|fb| (e, fb)));
        // The event's entries cover `(from_op_id, last_op_id]`: enough
        // when the stream is at or past `from_op_id` in this bucket.
        match carried.filter(|(e, fb)| pos >= e.from_op_id && fb.entries.is_some()) {
            Some((e, fb)) if pos == e.from_op_id && cp.last_op_id >= e.last_op_id => {
                // Every entry carried: the lines every such stream sends,
                // encoded once.
                for line in fb.encoded_lines() {
                    if let Err(stop) = out.send(L::from_data_line(line.clone())?).await {
                        return Ok(Err(stop));
                    }
                }
            }
            Some((_, fb)) => {
                let entries = fb.entries.as_deref().unwrap_or_default();
                let fresh: Vec<&ferry_protocol::OplogEntry> = entries
                    .iter()
                    .filter(|e| e.op_id > pos && e.op_id <= cp.last_op_id)
                    .collect();
                if let Err(stop) = send_entries(inner, &b, &fresh, out).await? {
                    return Ok(Err(stop));
                }
            }
            None => from_db.push((b, pos)),
        }
    }
    if let Err(stop) = send_data(inner, from_db, cp.last_op_id, out).await? {
        return Ok(Err(stop));
    }
    for p in positions.values_mut() {
        *p = (*p).max(cp.last_op_id);
    }
    let complete = StreamLine::CheckpointComplete {
        last_op_id: cp.last_op_id,
    };
    if let Err(stop) = out.send(complete.into()).await {
        return Ok(Err(stop));
    }
    open.checkpoint_sent(cp.last_op_id);
    Ok(Ok(()))
}

/// Send `entries` of `bucket` (at most a feed event's share of one
/// bucket) in lines within the stream's line limits.
async fn send_entries<L: StreamOut>(
    inner: &Arc<Inner>,
    bucket: &str,
    entries: &[&ferry_protocol::OplogEntry],
    out: &mut StreamSender<'_, L>,
) -> Result<std::result::Result<(), Stop>> {
    let lines = super::feed::encode_entries(
        bucket,
        entries.iter().copied(),
        inner.options.max_ops_per_line,
        inner.options.max_line_bytes,
    );
    for line in lines {
        if let Err(stop) = out.send(L::from_data_line(line)?).await {
            return Ok(Err(stop));
        }
    }
    Ok(Ok(()))
}

/// A stream's line type: typed lines ([`StreamLine`], for
/// [`SyncService::open_stream`]) or lines for transports ([`ServerLine`]).
/// Both come from one path: `data` lines are encoded straight from the
/// stored rows ([`read_data_line`]); the typed stream decodes them.
trait StreamOut: From<StreamLine> + LineBytes + Send + 'static {
    /// The line for an encoded `data` line (newline included).
    fn from_data_line(line: Vec<u8>) -> Result<Self>;
}

impl StreamOut for StreamLine {
    fn from_data_line(line: Vec<u8>) -> Result<Self> {
        ferry_protocol::decode_line(&line, usize::MAX)
            .map_err(|e| ServiceError::Database(format!("a data line read from the op log does not decode: {e}")))
    }
}

impl StreamOut for ServerLine {
    fn from_data_line(line: Vec<u8>) -> Result<Self> {
        Ok(ServerLine::Encoded(line))
    }
}

/// Most bytes reserved up front for an encoded `data` line (the size of
/// the stream's previous line, plus some).
const MAX_ENCODED_LINE_RESERVE_BYTES: usize = 16 * 1024 * 1024;

/// The next `data` line of `range`: the encoded line (within
/// `range.max_line_bytes`, newline included, at least one entry), its
/// entry count and its last op id; `None` when there is no entry.
/// `size_hint_bytes` carries the size of the stream's last line to the
/// next (lines of a stream tend to be alike).
fn read_data_line(
    db: &dyn SourceDb,
    range: &OpRange<'_>,
    size_hint_bytes: &mut usize,
) -> Result<Option<(Vec<u8>, usize, u64)>> {
    let reserve = size_hint_bytes.saturating_add(*size_hint_bytes / 8);
    let reserve = reserve.min(MAX_ENCODED_LINE_RESERVE_BYTES).min(range.max_line_bytes);
    // The writer itself refuses entries past `max_line_bytes` of encoded
    // line, whatever the database pushes, so the last op id is the
    // writer's (the database's may name an entry it refused).
    let mut line = DataLineWriter::new(range.bucket, reserve).with_max_line_bytes(range.max_line_bytes);
    db.read_ops_into(range, &mut line)?;
    let Some(last) = line.last_op_id() else {
        return Ok(None);
    };
    let n = line.ops();
    let bytes = line.finish();
    *size_hint_bytes = bytes.len();
    Ok(Some((bytes, n, last)))
}

/// Sends the entries of each `(bucket, after_op_id)` up to `last_op_id`
/// in bounded lines, each read on a blocking thread once a whole line
/// fits the stream's byte budget (so reading runs ahead of the client by
/// at most that). `Ok(Err(stop))` when the stream must end.
async fn send_data<L: StreamOut>(
    inner: &Arc<Inner>,
    work: Vec<(String, u64)>,
    last_op_id: u64,
    out: &mut StreamSender<'_, L>,
) -> Result<std::result::Result<(), Stop>> {
    let (max_ops, max_bytes) = (
        inner.options.max_ops_per_line.max(1),
        inner.options.max_line_bytes.max(1),
    );
    let mut size_hint_bytes = 0;
    for (bucket, mut pos) in work {
        loop {
            if let Err(stop) = out.room_for(max_bytes).await {
                return Ok(Err(stop));
            }
            let db = inner.db.clone();
            let name = bucket.clone();
            let read = blocking::run(move || {
                let mut hint = size_hint_bytes;
                let range = OpRange::between(&name, pos, last_op_id).limited(max_ops, max_bytes);
                let line = read_data_line(db.as_ref(), &range, &mut hint)?;
                let line = match line {
                    Some((bytes, n, last)) => Some((L::from_data_line(bytes)?, n, last)),
                    None => None,
                };
                Ok::<_, ServiceError>((line, hint))
            })
            .await
            .map_err(blocking_error)??;
            let (Some((line, n, last)), hint) = read else {
                break;
            };
            size_hint_bytes = hint;
            pos = last;
            let full = n >= max_ops;
            if let Err(stop) = out.send(line).await {
                return Ok(Err(stop));
            }
            if !full && pos >= last_op_id {
                break;
            }
        }
    }
    Ok(Ok(()))
}
