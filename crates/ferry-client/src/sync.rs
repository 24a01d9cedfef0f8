//! The background loops: download (stream → checkpoints → store) and
//! upload (queue → server → outcomes).

use std::sync::Arc;
use std::time::Duration;

use ferry_core::CrudEntry;
use ferry_protocol::{
    decode_line, OpOutcome, Outcome, ProtocolError, Step, StreamLine, UploadRequest, UploadResponse, UploadTransaction,
};
use ferry_queue::Answer;
use ferry_transport::{blocking, Backoff, Transport, TransportError};
use tokio::sync::watch;

use crate::apply::{plan_checkpoint_owned, plan_staged_checkpoint};
use crate::control::Control;
use crate::lines::ParsedLines;
use crate::outcomes::encode_stored;
use crate::stager::Stager;
use crate::{ClientError, Credentials, Inner, UploadOutcome};

/// How one stream session ended.
enum Ended {
    /// Reconnect at once (checksum failure, token refresh).
    Reconnect { refresh: bool },
    /// Reconnect after backoff.
    Failed { refresh: bool },
    /// The app stopped syncing.
    Stopped,
}

async fn sleep_ms(ms: u64) {
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

/// What ends a stream session early: the app stopping, pausing downloads
/// or asking for a fresh stream. Only waits on the network are cut short
/// (the token, the stream's opening, the next line). A session cut
/// anywhere else could leave ops counted as staged in the download state
/// that the staging writer never received (the next stream resumes after
/// them, and the checkpoint switches in nothing: a bucket's state advanced
/// without its rows), or an apply running on its blocking thread while the
/// next session reads the download state it is about to change.
struct Interrupt {
    stop: watch::Receiver<bool>,
    control: watch::Receiver<Control>,
    resync: u64,
}

impl Interrupt {
    /// Run `fut` unless the session is interrupted first (`Err` says how
    /// the session ends).
    async fn guard<T>(&mut self, fut: impl std::future::Future<Output = T>) -> Result<T, Ended> {
        let resync = self.resync;
        tokio::select! {
            biased;
            _ = self.stop.wait_for(|s| *s) => Err(Ended::Stopped),
            _ = self.control.wait_for(|c| c.downloads_paused || c.resync != resync) => {
                Err(Ended::Reconnect { refresh: false })
            }
            out = fut => Ok(out),
        }
    }
}

pub(crate) async fn download_loop(
    inner: Arc<Inner>,
    transport: Arc<dyn Transport>,
    creds: Arc<dyn Credentials>,
    mut stop: watch::Receiver<bool>,
) {
    let o = &inner.options;
    let mut backoff = Backoff::new(o.retry_initial_delay_ms, o.retry_max_delay_ms, o.jitter_seed);
    let mut control = inner.control.subscribe();
    let mut refresh = false;
    let mut stager = Stager::start(inner.local.staging_area(), o.staging_memory_bytes);
    loop {
        if !unpaused(&mut stop, &mut control, |c| c.downloads_paused).await {
            stager.close().await;
            return;
        }
        if stager_failed(&inner, &mut stager).await {
            refresh = false;
        }
        let resync = control.borrow().resync;
        inner.update_status(|s| s.connecting = true);
        // A stream ends when the app stops or pauses it or asks for a
        // fresh one, but only while it waits for the network: a checkpoint
        // being staged or applied is never cut in half (see `Interrupt`).
        let mut interrupt = Interrupt {
            stop: stop.clone(),
            control: control.clone(),
            resync,
        };
        let session = stream_session(
            &inner,
            transport.as_ref(),
            creds.as_ref(),
            refresh,
            &mut backoff,
            &stager,
            &mut interrupt,
        );
        let ended = match session.await {
            Ok(ended) => ended,
            Err(e) => {
                let unauthorized = is_unauthorized(&e);
                tracing::debug!(error = %e, "download stream failed");
                inner.update_status(|s| s.last_download_error = Some(e.to_string()));
                Ended::Failed { refresh: unauthorized }
            }
        };
        inner.update_status(|s| {
            s.connected = false;
            s.connecting = false;
            s.downloading = false;
        });
        match ended {
            Ended::Stopped => {
                stager.close().await;
                return;
            }
            Ended::Reconnect { refresh: r } => refresh = r,
            Ended::Failed { refresh: r } => {
                refresh = r;
                let stopped = tokio::select! {
                    biased;
                    () = sleep_ms(backoff.next_delay_ms()) => false,
                    _ = stop.wait_for(|s| *s) => true,
                };
                if stopped {
                    stager.close().await;
                    return;
                }
            }
        }
    }
}

/// Wait while the app keeps this loop paused; `false` once it stopped
/// syncing (before or meanwhile).
async fn unpaused(
    stop: &mut watch::Receiver<bool>,
    control: &mut watch::Receiver<Control>,
    paused: fn(&Control) -> bool,
) -> bool {
    if *stop.borrow() {
        return false;
    }
    if paused(&control.borrow_and_update()) {
        tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => return false,
            _ = control.wait_for(|c| !paused(c)) => {}
        }
    }
    !*stop.borrow()
}

fn is_unauthorized(e: &ClientError) -> bool {
    match e {
        ClientError::Transport(TransportError::Unauthorized(_)) => true,
        ClientError::Protocol(ProtocolError::Server(s)) => s.code == ferry_protocol::ErrorCode::Unauthorized,
        _ => false,
    }
}

/// After a staging write failed, what the download state says was staged
/// may not be in the store: start a new writer and take the state again
/// from the store (what it staged, it keeps). Returns whether it did.
async fn stager_failed(inner: &Arc<Inner>, stager: &mut Stager) -> bool {
    if stager.flush().await.is_ok() {
        return false;
    }
    let fresh = Stager::start(inner.local.staging_area(), inner.options.staging_memory_bytes);
    std::mem::replace(stager, fresh).close().await;
    let task_inner = inner.clone();
    let restored = blocking::run(move || {
        crate::stager::restore_download(&task_inner.local, task_inner.options.download_limits.clone())
    })
    .await;
    match restored {
        Ok(Ok(download)) => *inner.download.lock() = download,
        Ok(Err(e)) => tracing::warn!(error = %e, "reading the staging area back failed"),
        Err(e) => tracing::warn!(error = %e, "reading the staging area back failed"),
    }
    true
}

async fn stream_session(
    inner: &Arc<Inner>,
    transport: &dyn Transport,
    creds: &dyn Credentials,
    refresh: bool,
    backoff: &mut Backoff,
    stager: &Stager,
    interrupt: &mut Interrupt,
) -> Result<Ended, ClientError> {
    let token = match interrupt.guard(creds.token(refresh)).await {
        Ok(token) => token?,
        Err(ended) => return Ok(ended),
    };
    // An apply an earlier session left running (its connection aborted)
    // finishes before this one reads the download state.
    drop(inner.applying.lock().await);
    let request = inner.download.lock().request(inner.local.client_id());
    let body = serde_json::to_vec(&request).map_err(|e| ClientError::Task(e.to_string()))?;
    let stream = match interrupt.guard(transport.open_stream(&token, body)).await {
        Ok(stream) => stream?,
        Err(ended) => return Ok(ended),
    };
    inner.update_status(|s| {
        s.connected = true;
        s.connecting = false;
        s.streams_opened += 1;
        s.server_op_id = None;
    });
    let mut lines = ParsedLines::start(stream, inner.options.max_line_bytes);
    loop {
        let next = match interrupt.guard(lines.next()).await {
            Ok(next) => next?,
            Err(ended) => return Ok(ended),
        };
        let Some(line) = next else {
            return Ok(Ended::Failed { refresh: false });
        };
        let announced = match &line {
            StreamLine::Checkpoint(c) => Some(c.last_op_id),
            StreamLine::CheckpointDiff(d) => Some(d.last_op_id),
            _ => None,
        };
        let counts = matches!(
            line,
            StreamLine::Checkpoint(_) | StreamLine::CheckpointDiff(_) | StreamLine::Data(_)
        );
        let (step, progress, discards) = {
            let mut download = inner.download.lock();
            let step = download.handle(line)?;
            let progress = if counts { download.progress() } else { None };
            (step, progress, download.take_discards())
        };
        for bucket in discards {
            stager.discard(bucket)?;
        }
        if let Some(op_id) = announced {
            inner.update_status(|s| {
                s.downloading = true;
                s.server_op_id = Some(op_id);
            });
        }
        if counts {
            inner.update_status(|s| s.download_progress = progress);
        }
        match step {
            Step::Continue => {}
            Step::Stage { bucket, ops } => stager.stage(bucket, ops).await?,
            Step::Apply(apply) => {
                let staging_out = inner.download.lock().stages_out();
                if staging_out {
                    // Every staged op is in the store before it switches in.
                    stager.flush().await?;
                }
                let switched: Vec<(String, u64)> = apply
                    .buckets
                    .iter()
                    .filter_map(|b| b.staged.map(|r| (b.bucket.clone(), r.through_op_id)))
                    .collect();
                let task_inner = inner.clone();
                // Held until the apply ends, even if this session is
                // dropped meanwhile (an aborted connection).
                let applying = inner.applying.clone().lock_owned().await;
                let job = inner.store_work.begin();
                // Applying touches the store: off the async threads. The
                // observer reports the changed rows. The rows move from the
                // download state into the batch; the download keeps their
                // positions until told the outcome.
                let last_op_id = blocking::run(move || -> Result<u64, ClientError> {
                    let _applying = applying;
                    let _job = job;
                    // Local writes from now on order after every clock of
                    // this data (the server's clock covers them).
                    if let Some(hlc) = &apply.hlc {
                        task_inner.local.observe_server(hlc);
                    }
                    let receipt = apply.receipt();
                    let local = &task_inner.local;
                    if staging_out {
                        if let Err(e) = check_staged(local, &apply) {
                            task_inner.download.lock().apply_failed();
                            return Err(e);
                        }
                    }
                    let planned = if staging_out {
                        // The buckets still downloading from scratch are
                        // kept with the checkpoint that ends the others'.
                        let mut resetting = task_inner.download.lock().resetting().clone();
                        for b in &apply.buckets {
                            resetting.remove(&b.bucket);
                        }
                        plan_staged_checkpoint(local, &apply).map(|mut changes| {
                            changes.keep_resetting(&resetting);
                            changes
                        })
                    } else {
                        plan_checkpoint_owned(local, apply)
                    };
                    let applied = planned
                        .and_then(|changes| local.apply_server_changes(changes, receipt.write_checkpoint))
                        .map_err(ClientError::from);
                    let mut download = task_inner.download.lock();
                    match applied {
                        Ok(()) => {
                            download.applied(&receipt);
                            Ok(receipt.last_op_id)
                        }
                        Err(e) => {
                            download.apply_failed();
                            Err(e)
                        }
                    }
                })
                .await
                .map_err(|e| ClientError::Task(e.to_string()))??;
                // Switched in: the staged ops can go (a crash before this
                // leaves them below the applied op ids, where the next
                // open drops them).
                for (bucket, through) in switched {
                    stager.delete_through(bucket, through)?;
                }
                backoff.reset();
                let now = inner.clock.now_ms();
                inner.update_status(|s| {
                    s.downloading = false;
                    s.download_progress = None;
                    s.has_synced = true;
                    s.last_synced_at_ms = Some(now);
                    s.last_applied_op_id = Some(last_op_id);
                    s.last_download_error = None;
                });
                // Confirmed entries may unblock nothing, but completed
                // markers moved: let the upload loop look again.
                inner.upload_wake.notify_one();
            }
            Step::Resync { buckets } => {
                tracing::warn!(?buckets, "bucket checksum mismatch: downloading again");
                let resetting = {
                    let download = inner.download.lock();
                    download.stages_out().then(|| download.resetting().clone())
                };
                if let Some(resetting) = resetting {
                    stager.keep_resetting(&resetting)?;
                }
                inner.update_status(|s| {
                    s.last_download_error = Some(format!("checksum mismatch in buckets {buckets:?}"))
                });
                return Ok(Ended::Reconnect { refresh: false });
            }
            Step::TokenExpiring { in_s } => {
                tracing::debug!(in_s, "token expiring: reconnecting with a fresh one");
                return Ok(Ended::Reconnect { refresh: true });
            }
        }
    }
}

/// Before a checkpoint switches staged ops in: the staging area holds
/// exactly the ops the checkpoint validated (their count, last op id and
/// checksum sum), so a bucket's state never advances without its rows. A
/// mismatch fails the apply: its buckets' staged ops are discarded and
/// downloaded again.
fn check_staged(local: &ferry_queue::LocalDb, apply: &ferry_protocol::CheckpointApply) -> Result<(), ClientError> {
    let staging = local.staging_area();
    for b in &apply.buckets {
        let Some(range) = b.staged else { continue };
        let found = staging.staged_summary(&b.bucket, range.after_op_id)?;
        if found != range.summary {
            tracing::warn!(bucket = %b.bucket, expected = ?range.summary, ?found, "staged ops differ from the validated checkpoint");
            return Err(ClientError::StagingMismatch {
                bucket: b.bucket.clone(),
                expected: range.summary.count,
                found: found.count,
            });
        }
    }
    Ok(())
}

/// Group queue entries into whole transactions, in order.
fn group(entries: Vec<CrudEntry>) -> Vec<UploadTransaction> {
    let mut out: Vec<UploadTransaction> = Vec::new();
    for e in entries {
        match out.last_mut() {
            Some(t) if t.tx_id == e.tx_id => t.ops.push(e),
            _ => out.push(UploadTransaction {
                tx_id: e.tx_id,
                ops: vec![e],
            }),
        }
    }
    out
}

/// The next upload: whole transactions, up to the batch size (a larger
/// transaction goes alone), or only the first when `alone`.
fn next_upload(inner: &Inner, alone: bool) -> Result<Vec<UploadTransaction>, ClientError> {
    let limit = inner.options.upload_batch_entries.max(1);
    let asked = limit + 1;
    let entries = if alone {
        Vec::new()
    } else {
        inner.local.next_batch(asked)?
    };
    // The read stops at `asked` or at the queue's own bound
    // (`Limits::max_batch_entries`, which may be lower): only a read that
    // stopped short of both reached the queue's end, so only then is its
    // last transaction whole.
    let bound = asked.min(inner.local.limits().max_batch_entries);
    if !alone && entries.len() < bound {
        return Ok(group(entries));
    }
    let mut txs = group(entries);
    // The last group may be cut short by the limit: drop it, unless it is
    // the only one, in which case send that transaction whole.
    if txs.len() > 1 {
        txs.pop();
        return Ok(txs);
    }
    Ok(inner
        .local
        .next_transaction()?
        .map(|t| {
            vec![UploadTransaction {
                tx_id: t.tx_id,
                ops: t.entries,
            }]
        })
        .unwrap_or_default())
}

/// What one upload attempt did.
enum Sent {
    /// The queue was empty.
    Nothing,
    /// An answer was stored (or a refused transaction rolled back).
    Answered,
    /// The server refused a request of several transactions: send the
    /// first alone to find the one it refuses.
    RetryAlone,
}

pub(crate) async fn upload_loop(
    inner: Arc<Inner>,
    transport: Arc<dyn Transport>,
    creds: Arc<dyn Credentials>,
    mut stop: watch::Receiver<bool>,
) {
    let o = &inner.options;
    let mut backoff = Backoff::new(
        o.retry_initial_delay_ms,
        o.retry_max_delay_ms,
        o.jitter_seed ^ 0x9e37_79b9,
    );
    let poll = Duration::from_millis(o.upload_poll_interval_ms.max(1));
    let mut control = inner.control.subscribe();
    let mut refresh = false;
    let mut alone = false;
    loop {
        if !unpaused(&mut stop, &mut control, |c| c.uploads_paused).await {
            return;
        }
        // An upload in flight is not cut off by a stop: its answer is
        // stored first (disconnect bounds the wait).
        match upload_once(&inner, transport.as_ref(), creds.as_ref(), refresh, alone).await {
            Ok(Sent::Answered) => {
                backoff.reset();
                refresh = false;
                alone = false;
            }
            Ok(Sent::RetryAlone) => alone = true,
            Ok(Sent::Nothing) => {
                refresh = false;
                tokio::select! {
                    biased;
                    _ = tokio::time::timeout(poll, inner.upload_wake.notified()) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
            Err(e) => {
                refresh = is_unauthorized(&e);
                tracing::debug!(error = %e, "upload failed");
                inner.update_status(|s| {
                    s.uploading = false;
                    s.last_upload_error = Some(e.to_string());
                });
                tokio::select! {
                    biased;
                    () = sleep_ms(backoff.next_delay_ms()) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
        }
    }
}

/// Send one upload batch and store its answer.
async fn upload_once(
    inner: &Arc<Inner>,
    transport: &dyn Transport,
    creds: &dyn Credentials,
    refresh: bool,
    alone: bool,
) -> Result<Sent, ClientError> {
    let transactions = next_upload(inner, alone)?;
    let Some(last_seq) = transactions.last().and_then(|t| t.ops.last()).map(|e| e.seq) else {
        return Ok(Sent::Nothing);
    };
    inner.update_status(|s| s.uploading = true);
    let token = creds.token(refresh).await?;
    let request = UploadRequest {
        client_id: inner.local.client_id().to_owned(),
        transactions,
    };
    let body = serde_json::to_vec(&request).map_err(|e| ClientError::Task(e.to_string()))?;
    let mut refused_whole = false;
    let response = match transport.upload(&token, body).await {
        Ok(answer) => decode_line::<UploadResponse>(&answer, inner.options.max_line_bytes)?,
        // The server refuses the request itself (malformed, too large): the
        // same bytes would be refused forever and block every later write.
        Err(TransportError::Refused(reason)) => {
            if request.transactions.len() > 1 {
                return Ok(Sent::RetryAlone);
            }
            refused_whole = true;
            refused_answer(&request, &reason)
        }
        Err(e) => return Err(e.into()),
    };
    check_answer(&request, &response)?;
    if let Some(hlc) = &response.hlc {
        inner.local.observe_server(hlc);
    }
    // Which transaction each seq belongs to, for the outcomes.
    let tx_by_seq: std::collections::HashMap<u64, u64> = request
        .transactions
        .iter()
        .flat_map(|t| t.ops.iter().map(move |e| (e.seq, t.tx_id)))
        .collect();
    let outcomes: Vec<UploadOutcome> = response
        .outcomes
        .into_iter()
        .map(|outcome| UploadOutcome {
            tx_id: tx_by_seq.get(&outcome.seq).copied().unwrap_or(0),
            outcome,
        })
        .collect();
    let answer = Answer {
        through_seq: last_seq,
        rejected: outcomes
            .iter()
            .filter_map(|o| match &o.outcome.outcome {
                Outcome::Rejected { reason } => Some((o.outcome.seq, reason.clone())),
                _ => None,
            })
            .collect(),
        outcomes: outcomes
            .iter()
            .map(|o| Ok((o.outcome.seq, encode_stored(o)?)))
            .collect::<Result<_, ClientError>>()?,
        at_ms: inner.clock.now_ms(),
        refused_whole,
    };
    let task_inner = inner.clone();
    let job = inner.store_work.begin();
    // Stored and then broadcast on a blocking thread, which runs to the end
    // even if this task is aborted: an app listening gets every outcome
    // whose answer was stored, and the store has all of them. An aborted
    // connection's thread may still be storing the answer to the same
    // writes when a new connection's answer (the server's replay) arrives:
    // one at a time, and only outcomes of seqs not answered before are
    // broadcast, so each is heard once.
    blocking::run(move || -> Result<(), ClientError> {
        let _job = job;
        let _answering = task_inner.answering.lock();
        let answered_before = task_inner.local.completed_through();
        task_inner.local.answer(&answer)?;
        for outcome in outcomes.into_iter().filter(|o| o.outcome.seq > answered_before) {
            let _ = task_inner.outcomes.send(outcome);
        }
        Ok(())
    })
    .await
    .map_err(|e| ClientError::Task(e.to_string()))??;
    inner.update_status(|s| {
        s.uploading = false;
        s.last_upload_error = None;
    });
    Ok(Sent::Answered)
}

/// The answer for a transaction the server refused whole: every op
/// rejected with the server's reason (rolled back and logged).
fn refused_answer(request: &UploadRequest, reason: &str) -> UploadResponse {
    let outcomes = request
        .transactions
        .iter()
        .flat_map(|t| &t.ops)
        .map(|e| OpOutcome {
            seq: e.seq,
            outcome: Outcome::Rejected {
                reason: format!("the server refused the upload: {reason}"),
            },
        })
        .collect();
    UploadResponse {
        outcomes,
        write_checkpoint: 0,
        hlc: None,
    }
}

/// An answer must carry exactly one outcome for every op sent, or some
/// write would go without one: such an answer is not stored (the upload is
/// retried).
fn check_answer(request: &UploadRequest, response: &UploadResponse) -> Result<(), ClientError> {
    let sent: Vec<u64> = request
        .transactions
        .iter()
        .flat_map(|t| &t.ops)
        .map(|e| e.seq)
        .collect();
    let answered: Vec<u64> = response.outcomes.iter().map(|o| o.seq).collect();
    if sent != answered {
        return Err(ClientError::Protocol(ProtocolError::Unexpected(
            "upload answer does not carry one outcome per op sent, in order",
        )));
    }
    Ok(())
}
