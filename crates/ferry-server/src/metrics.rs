//! The service's Prometheus metrics (`GET /metrics`,
//! `docs/adr/0013-metrics-and-admin-api.md`): one registry per
//! [`SyncService`](crate::SyncService), so several services in one
//! process (tests, embedders) never share counters.
//!
//! | metric | type | what |
//! |---|---|---|
//! | `ferry_open_streams` | gauge | download streams open now |
//! | `ferry_uploads_total{result}` | counter | upload requests answered (`ok`) or refused whole (`error`) |
//! | `ferry_ops_total{outcome}` | counter | op outcomes answered: `applied`, `merged`, `rejected`, `needs_review` (replays included) |
//! | `ferry_upload_duration_seconds` | histogram | time from a checked token to the answer (or refusal) of an upload |
//! | `ferry_stream_checkpoint_lag_ops_max`, `_sum` | gauges, at scrape | over the open streams that sent a checkpoint: newest op id minus the stream's last completed checkpoint |
//! | `ferry_streams_checkpointed` | gauge, at scrape | the streams those two cover |
//! | `ferry_last_op_id` | gauge, at scrape | the newest op id |
//! | `ferry_oplog_entries` | gauge, at scrape | `SourceDb::oplog_len` |
//! | `ferry_compaction_runs_total` | counter | bucket compactions run |
//! | `ferry_compaction_removed_entries_total` | counter | op log entries compaction folded away |
//! | `ferry_errors_total{kind,class}` | counter | errors the service answered, by kind (the protocol error code: `auth`, `bad_request`, `too_large`, `internal`, `shutting_down`, `busy`, `rate_limited`) and class (`transient`, `permanent`) |

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use ferry_core::ErrorKind;
use ferry_protocol::{ErrorCode, Outcome};
use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

use crate::error::{Result, ServiceError};

/// The content type of the text exposition format, version 0.0.4.
pub const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A stream's checkpoint before it completed one.
const NO_CHECKPOINT: u64 = u64::MAX;

/// Upload latency buckets, seconds.
const UPLOAD_BUCKETS_S: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// The service's metrics.
pub struct Metrics {
    registry: Registry,
    open_streams: IntGauge,
    uploads: IntCounterVec,
    ops: IntCounterVec,
    upload_seconds: Histogram,
    lag_max: IntGauge,
    lag_sum: IntGauge,
    streams_checkpointed: IntGauge,
    last_op_id: IntGauge,
    oplog_entries: IntGauge,
    stream_buffered_bytes: IntGauge,
    compaction_runs: IntCounter,
    compaction_removed: IntCounter,
    errors: IntCounterVec,
    /// Each open stream's last completed checkpoint ([`NO_CHECKPOINT`]:
    /// none yet).
    streams: parking_lot::Mutex<HashMap<u64, Arc<AtomicU64>>>,
    next_stream: AtomicU64,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("open_streams", &self.open_streams.get())
            .finish_non_exhaustive()
    }
}

fn metric_error(e: prometheus::Error) -> ServiceError {
    ServiceError::Config(format!("metrics: {e}"))
}

fn register<T: prometheus::core::Collector + Clone + 'static>(registry: &Registry, metric: T) -> Result<T> {
    registry.register(Box::new(metric.clone())).map_err(metric_error)?;
    Ok(metric)
}

fn gauge(registry: &Registry, name: &str, help: &str) -> Result<IntGauge> {
    register(registry, IntGauge::new(name, help).map_err(metric_error)?)
}

fn counter(registry: &Registry, name: &str, help: &str) -> Result<IntCounter> {
    register(registry, IntCounter::new(name, help).map_err(metric_error)?)
}

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> Result<IntCounterVec> {
    register(
        registry,
        IntCounterVec::new(Opts::new(name, help), labels).map_err(metric_error)?,
    )
}

/// The `outcome` label of an op outcome.
pub fn outcome_label(o: &Outcome) -> &'static str {
    match o {
        Outcome::Applied => "applied",
        Outcome::Merged { .. } => "merged",
        Outcome::Rejected { .. } => "rejected",
        Outcome::NeedsReview { .. } => "needs_review",
    }
}

/// The `kind` label of an error: its protocol error code, `auth` for
/// `unauthorized`.
pub fn error_kind_label(e: &ServiceError) -> &'static str {
    match e.to_server_error().code {
        ErrorCode::Unauthorized => "auth",
        ErrorCode::BadRequest => "bad_request",
        ErrorCode::TooLarge => "too_large",
        ErrorCode::Internal => "internal",
        ErrorCode::ShuttingDown => "shutting_down",
        ErrorCode::Busy => "busy",
        ErrorCode::RateLimited => "rate_limited",
    }
}

impl Metrics {
    /// A fresh registry with every metric at zero.
    pub fn new() -> Result<Self> {
        let registry = Registry::new();
        let upload_seconds = register(
            &registry,
            Histogram::with_opts(
                HistogramOpts::new(
                    "ferry_upload_duration_seconds",
                    "time from a checked token to the answer or refusal of an upload",
                )
                .buckets(UPLOAD_BUCKETS_S.to_vec()),
            )
            .map_err(metric_error)?,
        )?;
        let m = Metrics {
            open_streams: gauge(&registry, "ferry_open_streams", "download streams open now")?,
            uploads: counter_vec(
                &registry,
                "ferry_uploads_total",
                "upload requests answered (ok) or refused whole (error)",
                &["result"],
            )?,
            ops: counter_vec(
                &registry,
                "ferry_ops_total",
                "op outcomes answered, replays included",
                &["outcome"],
            )?,
            upload_seconds,
            lag_max: gauge(
                &registry,
                "ferry_stream_checkpoint_lag_ops_max",
                "largest newest op id minus a stream's last completed checkpoint, over the open streams that sent one",
            )?,
            lag_sum: gauge(
                &registry,
                "ferry_stream_checkpoint_lag_ops_sum",
                "sum of newest op id minus each stream's last completed checkpoint, over the open streams that sent one",
            )?,
            streams_checkpointed: gauge(
                &registry,
                "ferry_streams_checkpointed",
                "open streams that sent a completed checkpoint",
            )?,
            last_op_id: gauge(&registry, "ferry_last_op_id", "the newest op id")?,
            oplog_entries: gauge(&registry, "ferry_oplog_entries", "op log entries, all buckets")?,
            stream_buffered_bytes: gauge(
                &registry,
                "ferry_stream_buffered_bytes",
                "bytes of lines the open streams hold that their clients have not read",
            )?,
            compaction_runs: counter(&registry, "ferry_compaction_runs_total", "bucket compactions run")?,
            compaction_removed: counter(
                &registry,
                "ferry_compaction_removed_entries_total",
                "op log entries compaction folded away",
            )?,
            errors: counter_vec(
                &registry,
                "ferry_errors_total",
                "errors the service answered, by kind and class (transient or permanent)",
                &["kind", "class"],
            )?,
            registry,
            streams: parking_lot::Mutex::new(HashMap::new()),
            next_stream: AtomicU64::new(0),
        };
        // Every label value shows from the start, at zero.
        for r in ["ok", "error"] {
            m.uploads.with_label_values(&[r]);
        }
        for o in ["applied", "merged", "rejected", "needs_review"] {
            m.ops.with_label_values(&[o]);
        }
        Ok(m)
    }

    /// Count an answered upload: its outcomes and latency.
    pub(crate) fn upload_answered<'a>(&self, outcomes: impl Iterator<Item = &'a Outcome>, seconds: f64) {
        self.uploads.with_label_values(&["ok"]).inc();
        for o in outcomes {
            self.ops.with_label_values(&[outcome_label(o)]).inc();
        }
        self.upload_seconds.observe(seconds);
    }

    /// Count an upload refused whole (the error itself is counted by
    /// [`Metrics::error`]).
    pub(crate) fn upload_refused(&self, seconds: f64) {
        self.uploads.with_label_values(&["error"]).inc();
        self.upload_seconds.observe(seconds);
    }

    /// Count an error the service answered.
    pub fn error(&self, e: &ServiceError) {
        let class = match e.kind() {
            ErrorKind::Transient => "transient",
            _ => "permanent",
        };
        self.errors.with_label_values(&[error_kind_label(e), class]).inc();
    }

    /// Count a bucket compaction.
    pub(crate) fn compacted(&self, removed: usize) {
        self.compaction_runs.inc();
        self.compaction_removed.inc_by(removed as u64);
    }

    /// Register an open stream; it counts until the guard is dropped.
    pub(crate) fn stream_opened(self: &Arc<Self>) -> StreamGuard {
        let id = self.next_stream.fetch_add(1, Ordering::Relaxed);
        let checkpoint = Arc::new(AtomicU64::new(NO_CHECKPOINT));
        self.streams.lock().insert(id, checkpoint.clone());
        self.open_streams.inc();
        StreamGuard {
            metrics: self.clone(),
            id,
            checkpoint,
        }
    }

    /// The text exposition of every metric, with the gauges read at
    /// scrape time set from `last_op_id`, `oplog_entries` and
    /// `stream_buffered_bytes`.
    pub fn render(&self, last_op_id: u64, oplog_entries: u64, stream_buffered_bytes: usize) -> Result<String> {
        let (mut max, mut sum, mut n) = (0u64, 0u64, 0i64);
        for cp in self.streams.lock().values() {
            let cp = cp.load(Ordering::Relaxed);
            if cp == NO_CHECKPOINT {
                continue;
            }
            let lag = last_op_id.saturating_sub(cp);
            max = max.max(lag);
            sum = sum.saturating_add(lag);
            n += 1;
        }
        let clamp = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.lag_max.set(clamp(max));
        self.lag_sum.set(clamp(sum));
        self.streams_checkpointed.set(n);
        self.last_op_id.set(clamp(last_op_id));
        self.oplog_entries.set(clamp(oplog_entries));
        self.stream_buffered_bytes
            .set(i64::try_from(stream_buffered_bytes).unwrap_or(i64::MAX));
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .map_err(metric_error)
    }
}

/// An open stream's registration: the gauge goes down when it is dropped.
#[derive(Debug)]
pub(crate) struct StreamGuard {
    metrics: Arc<Metrics>,
    id: u64,
    checkpoint: Arc<AtomicU64>,
}

impl StreamGuard {
    /// The stream completed a checkpoint at `last_op_id`.
    pub(crate) fn checkpoint_sent(&self, last_op_id: u64) {
        self.checkpoint
            .store(last_op_id.min(NO_CHECKPOINT - 1), Ordering::Relaxed);
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.metrics.streams.lock().remove(&self.id);
        self.metrics.open_streams.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(text: &str, name: &str) -> i64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
            .unwrap_or(-1)
    }

    #[test]
    fn checkpoint_lag_covers_open_streams_that_sent_one() {
        let m = Arc::new(Metrics::new().expect("metrics"));
        let a = m.stream_opened();
        let b = m.stream_opened();
        let _fresh = m.stream_opened();
        a.checkpoint_sent(5);
        b.checkpoint_sent(8);
        let text = m.render(10, 7, 0).expect("render");
        assert_eq!(sample(&text, "ferry_open_streams "), 3);
        assert_eq!(sample(&text, "ferry_streams_checkpointed "), 2);
        assert_eq!(sample(&text, "ferry_stream_checkpoint_lag_ops_max "), 5);
        assert_eq!(sample(&text, "ferry_stream_checkpoint_lag_ops_sum "), 7);
        assert_eq!(sample(&text, "ferry_last_op_id "), 10);
        assert_eq!(sample(&text, "ferry_oplog_entries "), 7);
        drop(a);
        let text = m.render(10, 7, 0).expect("render");
        assert_eq!(sample(&text, "ferry_open_streams "), 2);
        assert_eq!(sample(&text, "ferry_stream_checkpoint_lag_ops_max "), 2);
        assert_eq!(sample(&text, "ferry_stream_checkpoint_lag_ops_sum "), 2);
        // A stream that completed a checkpoint at op 0 (an empty log).
        let empty = m.stream_opened();
        empty.checkpoint_sent(0);
        let text = m.render(0, 0, 0).expect("render");
        assert_eq!(sample(&text, "ferry_streams_checkpointed "), 2);
        assert_eq!(sample(&text, "ferry_stream_checkpoint_lag_ops_max "), 0);
    }
}
