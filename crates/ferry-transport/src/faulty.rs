//! A transport wrapper that injects seeded faults: lost data lines,
//! duplicated, delayed and (where the protocol allows) reordered stream lines,
//! disconnects mid-stream, failed uploads, lost upload answers, uploads
//! delivered twice, and an offline switch.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use ferry_core::{RandomSource, SeededRandom};
use ferry_protocol::{decode_line, StreamLine, DEFAULT_MAX_LINE_BYTES};
use parking_lot::Mutex;

use crate::{LineStream, Transport, TransportError};

/// Fault probabilities, each in per-mille (0 = never, 1000 = always).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FaultConfig {
    /// A data line is lost while the stream goes on (as a faulty proxy
    /// might do): the client must notice by checksum and download the
    /// bucket again. Other lines are never lost without the stream
    /// breaking, as on any ordered byte stream.
    pub drop_data_line_per_mille: u32,
    /// A stream line is delivered twice.
    pub duplicate_line_per_mille: u32,
    /// A stream line is delayed by up to `max_delay_ms`.
    pub delay_line_per_mille: u32,
    /// A data line swaps places with the next line when that is a data
    /// line of another bucket (an order the protocol allows).
    pub reorder_line_per_mille: u32,
    /// The stream breaks before a line.
    pub disconnect_per_mille: u32,
    /// An upload fails before reaching the server.
    pub fail_upload_per_mille: u32,
    /// An upload reaches the server but its answer is lost.
    pub lose_upload_answer_per_mille: u32,
    /// An upload is delivered twice (the second answer is returned).
    pub duplicate_upload_per_mille: u32,
    /// Upper bound of injected delays.
    pub max_delay_ms: u64,
}

impl FaultConfig {
    /// A moderately hostile network, for property tests.
    pub fn hostile() -> Self {
        FaultConfig {
            drop_data_line_per_mille: 10,
            duplicate_line_per_mille: 30,
            delay_line_per_mille: 20,
            reorder_line_per_mille: 30,
            disconnect_per_mille: 15,
            fail_upload_per_mille: 100,
            lose_upload_answer_per_mille: 100,
            duplicate_upload_per_mille: 100,
            max_delay_ms: 3,
        }
    }
}

struct Shared {
    config: FaultConfig,
    rng: Mutex<SeededRandom>,
    offline: AtomicBool,
}

impl Shared {
    fn roll(&self, per_mille: u32) -> bool {
        per_mille > 0 && self.rng.lock().below(1000) < u64::from(per_mille)
    }

    fn delay(&self) -> Duration {
        let ms = self.rng.lock().below(self.config.max_delay_ms + 1);
        Duration::from_millis(ms)
    }

    fn check_online(&self) -> Result<(), TransportError> {
        if self.offline.load(Ordering::SeqCst) {
            Err(TransportError::Connection("offline".into()))
        } else {
            Ok(())
        }
    }
}

/// Wraps a transport and injects faults drawn from a seed.
#[derive(Clone)]
pub struct FaultyTransport<T> {
    inner: T,
    shared: Arc<Shared>,
}

impl<T> fmt::Debug for FaultyTransport<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultyTransport")
            .field("config", &self.shared.config)
            .field("offline", &self.is_offline())
            .finish_non_exhaustive()
    }
}

impl<T> FaultyTransport<T> {
    /// Wrap `inner` with faults from `config`, drawn from `seed`.
    pub fn new(inner: T, config: FaultConfig, seed: u64) -> Self {
        FaultyTransport {
            inner,
            shared: Arc::new(Shared {
                config,
                rng: Mutex::new(SeededRandom::new(seed)),
                offline: AtomicBool::new(false),
            }),
        }
    }

    /// Cut the network (every call fails, open streams break at their next
    /// line) or bring it back.
    pub fn set_offline(&self, offline: bool) {
        self.shared.offline.store(offline, Ordering::SeqCst);
    }

    /// Whether the network is cut.
    pub fn is_offline(&self) -> bool {
        self.shared.offline.load(Ordering::SeqCst)
    }
}

fn data_bucket(line: &[u8]) -> Option<String> {
    match decode_line::<StreamLine>(line, DEFAULT_MAX_LINE_BYTES) {
        Ok(StreamLine::Data(d)) => Some(d.bucket),
        _ => None,
    }
}

struct FaultyLines {
    inner: Box<dyn LineStream>,
    shared: Arc<Shared>,
    queued: std::collections::VecDeque<Vec<u8>>,
    broken: bool,
}

impl FaultyLines {
    async fn pull(&mut self) -> Result<Option<Vec<u8>>, TransportError> {
        match self.queued.pop_front() {
            Some(l) => Ok(Some(l)),
            None => self.inner.next_line().await,
        }
    }
}

#[async_trait]
impl LineStream for FaultyLines {
    async fn next_line(&mut self) -> Result<Option<Vec<u8>>, TransportError> {
        loop {
            if self.broken {
                return Err(TransportError::Connection("stream broken".into()));
            }
            if self.shared.offline.load(Ordering::SeqCst) || self.shared.roll(self.shared.config.disconnect_per_mille) {
                self.broken = true;
                continue;
            }
            let Some(line) = self.pull().await? else {
                return Ok(None);
            };
            let cfg = &self.shared.config;
            if self.shared.roll(cfg.drop_data_line_per_mille) && data_bucket(&line).is_some() {
                continue;
            }
            if self.shared.roll(cfg.delay_line_per_mille) {
                tokio::time::sleep(self.shared.delay()).await;
            }
            if self.shared.roll(cfg.duplicate_line_per_mille) {
                self.queued.push_front(line.clone());
            }
            if self.shared.roll(cfg.reorder_line_per_mille) {
                if let Some(bucket) = data_bucket(&line) {
                    if let Some(next) = self.pull().await? {
                        if data_bucket(&next).is_some_and(|b| b != bucket) {
                            self.queued.push_front(line);
                            return Ok(Some(next));
                        }
                        self.queued.push_front(next);
                    }
                }
            }
            return Ok(Some(line));
        }
    }
}

#[async_trait]
impl<T: Transport> Transport for FaultyTransport<T> {
    async fn open_stream(&self, token: &str, request: Vec<u8>) -> Result<Box<dyn LineStream>, TransportError> {
        self.shared.check_online()?;
        let inner = self.inner.open_stream(token, request).await?;
        Ok(Box::new(FaultyLines {
            inner,
            shared: self.shared.clone(),
            queued: std::collections::VecDeque::new(),
            broken: false,
        }))
    }

    async fn upload(&self, token: &str, request: Vec<u8>) -> Result<Vec<u8>, TransportError> {
        self.shared.check_online()?;
        let cfg = &self.shared.config;
        if self.shared.roll(cfg.fail_upload_per_mille) {
            return Err(TransportError::Connection("upload failed before sending".into()));
        }
        if self.shared.roll(cfg.duplicate_upload_per_mille) {
            // The first delivery's answer is lost on the way back.
            let _ = self.inner.upload(token, request.clone()).await;
        }
        let answer = self.inner.upload(token, request).await?;
        if self.shared.roll(cfg.lose_upload_answer_per_mille) {
            return Err(TransportError::Connection("upload answer lost".into()));
        }
        self.shared.check_online()?;
        Ok(answer)
    }
}
