//! The background loops: download (stream → checkpoints → store) and
//! upload (queue → server → outcomes).

use std::sync::Arc;
use std::time::Duration;

use ferry_core::CrudEntry;
use ferry_protocol::{
    decode_line, Outcome, ProtocolError, Step, StreamLine, UploadRequest, UploadResponse, UploadTransaction,
};
use ferry_transport::{Backoff, LineStream, Transport, TransportError};

use crate::apply::plan_checkpoint_owned;
use crate::{ClientError, Credentials, Inner, UploadOutcome};

/// How one stream session ended.
enum Ended {
    /// Reconnect at once (checksum failure, token refresh).
    Reconnect { refresh: bool },
    /// Reconnect after backoff.
    Failed { refresh: bool },
}

async fn sleep_ms(ms: u64) {
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

pub(crate) async fn download_loop(inner: Arc<Inner>, transport: Arc<dyn Transport>, creds: Arc<dyn Credentials>) {
    let o = &inner.options;
    let mut backoff = Backoff::new(o.retry_initial_delay_ms, o.retry_max_delay_ms, o.jitter_seed);
    let mut refresh = false;
    loop {
        inner.update_status(|s| s.connecting = true);
        let ended = match stream_session(&inner, transport.as_ref(), creds.as_ref(), refresh, &mut backoff).await {
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
            Ended::Reconnect { refresh: r } => refresh = r,
            Ended::Failed { refresh: r } => {
                refresh = r;
                sleep_ms(backoff.next_delay_ms()).await;
            }
        }
    }
}

fn is_unauthorized(e: &ClientError) -> bool {
    match e {
        ClientError::Transport(TransportError::Unauthorized(_)) => true,
        ClientError::Protocol(ProtocolError::Server(s)) => s.code == ferry_protocol::ErrorCode::Unauthorized,
        _ => false,
    }
}

async fn stream_session(
    inner: &Arc<Inner>,
    transport: &dyn Transport,
    creds: &dyn Credentials,
    refresh: bool,
    backoff: &mut Backoff,
) -> Result<Ended, ClientError> {
    let token = creds.token(refresh).await?;
    let request = inner.download.lock().request(inner.local.client_id());
    let body = serde_json::to_vec(&request).map_err(|e| ClientError::Task(e.to_string()))?;
    let stream = transport.open_stream(&token, body).await?;
    inner.update_status(|s| {
        s.connected = true;
        s.connecting = false;
    });
    let mut lines = ParsedLines::start(stream, inner.options.max_line_bytes);
    loop {
        let Some(line) = lines.next().await? else {
            return Ok(Ended::Failed { refresh: false });
        };
        let is_checkpoint = matches!(line, StreamLine::Checkpoint(_) | StreamLine::CheckpointDiff(_));
        let step = inner.download.lock().handle(line)?;
        if is_checkpoint {
            inner.update_status(|s| s.downloading = true);
        }
        match step {
            Step::Continue => {}
            Step::Apply(apply) => {
                let task_inner = inner.clone();
                // Applying touches the store: off the async threads. The
                // observer reports the changed rows. The rows move from the
                // download state into the batch; the download keeps their
                // positions until told the outcome.
                let last_op_id = tokio::task::spawn_blocking(move || -> Result<u64, ClientError> {
                    let receipt = apply.receipt();
                    let applied = plan_checkpoint_owned(task_inner.local.store().as_ref(), apply)
                        .map_err(ClientError::from)
                        .and_then(|batch| {
                            Ok(task_inner.local.apply_server_changes(batch, receipt.write_checkpoint)?)
                        });
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
                backoff.reset();
                let now = inner.clock.now_ms();
                inner.update_status(|s| {
                    s.downloading = false;
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

/// A received line, decoded or being decoded.
enum Parse {
    /// Decoded on the reader task (a short line).
    Ready(Result<StreamLine, ProtocolError>),
    /// Being decoded on a blocking thread (a long line).
    Pending(tokio::task::JoinHandle<Result<StreamLine, ProtocolError>>),
}

/// Lines whose decoding may run ahead of the one being handled.
const MAX_PARSES_AHEAD: usize = 4;

/// Lines shorter than this are decoded on the reader task: a thread hop
/// would cost more than it saves (and add latency to small changes).
const MAX_INLINE_DECODE_BYTES: usize = 64 * 1024;

/// The lines of a stream, decoded off the handling task: a reader task
/// receives each line and starts decoding a long one on a blocking thread
/// at once, so receiving, decoding (large `data` lines take milliseconds)
/// and handling overlap. Lines come out in stream order. Dropping this
/// stops the reader, which drops the stream.
struct ParsedLines {
    parses: tokio::sync::mpsc::Receiver<Result<Parse, TransportError>>,
    reader: tokio::task::JoinHandle<()>,
}

impl ParsedLines {
    fn start(mut stream: Box<dyn LineStream>, max_line_bytes: usize) -> Self {
        let (tx, parses) = tokio::sync::mpsc::channel(MAX_PARSES_AHEAD);
        let reader = tokio::spawn(async move {
            loop {
                let next = match stream.next_line().await {
                    Ok(Some(line)) if line.len() < MAX_INLINE_DECODE_BYTES => {
                        Ok(Parse::Ready(decode_line::<StreamLine>(&line, max_line_bytes)))
                    }
                    Ok(Some(line)) => Ok(Parse::Pending(tokio::task::spawn_blocking(move || {
                        decode_line::<StreamLine>(&line, max_line_bytes)
                    }))),
                    Ok(None) => return,
                    Err(e) => Err(e),
                };
                let failed = next.is_err();
                if tx.send(next).await.is_err() || failed {
                    return;
                }
            }
        });
        ParsedLines { parses, reader }
    }

    /// The next line, `None` when the server ended the stream.
    async fn next(&mut self) -> Result<Option<StreamLine>, ClientError> {
        let Some(parse) = self.parses.recv().await else {
            return Ok(None);
        };
        let line = match parse? {
            Parse::Ready(line) => line?,
            Parse::Pending(task) => task.await.map_err(|e| ClientError::Task(e.to_string()))??,
        };
        Ok(Some(line))
    }
}

impl Drop for ParsedLines {
    fn drop(&mut self) {
        self.reader.abort();
    }
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
/// transaction goes alone).
fn next_upload(inner: &Inner) -> Result<Vec<UploadTransaction>, ClientError> {
    let limit = inner.options.upload_batch_entries.max(1);
    let entries = inner.local.next_batch(limit + 1)?;
    if entries.len() <= limit {
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

pub(crate) async fn upload_loop(inner: Arc<Inner>, transport: Arc<dyn Transport>, creds: Arc<dyn Credentials>) {
    let o = &inner.options;
    let mut backoff = Backoff::new(
        o.retry_initial_delay_ms,
        o.retry_max_delay_ms,
        o.jitter_seed ^ 0x9e37_79b9,
    );
    let poll = Duration::from_millis(o.upload_poll_interval_ms.max(1));
    let mut refresh = false;
    loop {
        match upload_once(&inner, transport.as_ref(), creds.as_ref(), refresh).await {
            Ok(true) => {
                backoff.reset();
                refresh = false;
                continue; // more may be waiting
            }
            Ok(false) => {
                refresh = false;
                let _ = tokio::time::timeout(poll, inner.upload_wake.notified()).await;
            }
            Err(e) => {
                refresh = is_unauthorized(&e);
                tracing::debug!(error = %e, "upload failed");
                inner.update_status(|s| {
                    s.uploading = false;
                    s.last_upload_error = Some(e.to_string());
                });
                sleep_ms(backoff.next_delay_ms()).await;
            }
        }
    }
}

/// Send one upload batch. `Ok(false)` when the queue is empty.
async fn upload_once(
    inner: &Arc<Inner>,
    transport: &dyn Transport,
    creds: &dyn Credentials,
    refresh: bool,
) -> Result<bool, ClientError> {
    let transactions = next_upload(inner)?;
    let Some(last_seq) = transactions.last().and_then(|t| t.ops.last()).map(|e| e.seq) else {
        return Ok(false);
    };
    inner.update_status(|s| s.uploading = true);
    let token = creds.token(refresh).await?;
    let request = UploadRequest {
        client_id: inner.local.client_id().to_owned(),
        transactions,
    };
    let body = serde_json::to_vec(&request).map_err(|e| ClientError::Task(e.to_string()))?;
    let answer = transport.upload(&token, body).await?;
    let response: UploadResponse = decode_line(&answer, inner.options.max_line_bytes)?;
    // Which transaction each seq belongs to, for the outcomes.
    let tx_by_seq: std::collections::HashMap<u64, u64> = request
        .transactions
        .iter()
        .flat_map(|t| t.ops.iter().map(move |e| (e.seq, t.tx_id)))
        .collect();
    let rejected: Vec<(u64, String)> = response
        .outcomes
        .iter()
        .filter_map(|o| match &o.outcome {
            Outcome::Rejected { reason } => Some((o.seq, reason.clone())),
            _ => None,
        })
        .collect();
    let now = inner.clock.now_ms();
    let task_inner = inner.clone();
    tokio::task::spawn_blocking(move || -> Result<(), ClientError> {
        task_inner.local.reject(&rejected, now)?;
        task_inner.local.complete(last_seq)?;
        Ok(())
    })
    .await
    .map_err(|e| ClientError::Task(e.to_string()))??;
    for outcome in response.outcomes {
        let _ = inner.outcomes.send(UploadOutcome {
            tx_id: tx_by_seq.get(&outcome.seq).copied().unwrap_or(0),
            outcome,
        });
    }
    inner.update_status(|s| {
        s.uploading = false;
        s.last_upload_error = None;
    });
    Ok(true)
}
