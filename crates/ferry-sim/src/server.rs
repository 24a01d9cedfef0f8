//! The sync service as the fleet sees it: the real `SyncService` on a
//! SQLite source, behind a handler that can crash and restart it (the
//! source file survives) and that records every upload it answered.

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use ferry_core::{Clock, CrudEntry};
use ferry_protocol::{ErrorCode, Outcome, ServerError, StreamRequest, UploadRequest, UploadResponse};
use ferry_server::{ConflictStrategy, ServiceOptions, SqliteSourceDb, SyncRules, SyncService};
use ferry_transport::{ServerLineStream, ServerLines, SyncHandler};
use parking_lot::Mutex;

use crate::clock::SimClock;
use crate::SimError;

/// The JWT secret of the simulated server.
pub const SECRET: &str = "ferry-sim-secret";

/// Most ops the simulated server takes in one upload (small, so the
/// workload can send a transaction it refuses whole).
pub const MAX_UPLOAD_OPS: usize = 30;

/// The ticket tracker's rules with a CRDT document column on tickets
/// (added to the tracker's own tables with `[[add_columns]]`, as the
/// tracker's CRDT rules add theirs).
pub fn rules() -> Result<SyncRules, SimError> {
    let text = format!(
        "{}\n[[add_columns]]\ntable = \"tickets\"\ncolumns = [{{ name = \"notes_doc\", type = \"blob\" }}]\n",
        ferry_server::TICKET_TRACKER_RULES
    );
    SyncRules::from_toml(&text).map_err(|e| SimError::Setup(e.to_string()))
}

/// One op the server answered, as first processed.
#[derive(Clone, Debug)]
pub struct Processed {
    /// The entry as uploaded.
    pub entry: CrudEntry,
    /// The outcome.
    pub outcome: Outcome,
    /// The server's wall clock when it processed it (for its clamp).
    pub server_now_ms: u64,
    /// The server's last op id right after: a checkpoint at or past it
    /// includes the op's effect.
    pub op_high_water: u64,
}

/// What the server answered, per `(client_id, seq)`.
#[derive(Debug, Default)]
pub struct UploadLog {
    /// First processing of each op.
    pub first: std::collections::BTreeMap<(String, u64), Processed>,
    /// Ops answered differently on a later upload of the same seq
    /// (exactly-once effect is broken): `(client_id, seq, first, later)`.
    pub mismatched: Vec<(String, u64, Outcome, Outcome)>,
    /// Uploads answered, and requests refused whole.
    pub answered: u64,
    /// Requests refused whole, with the reason.
    pub refused: Vec<String>,
}

/// A crashable, recording sync server.
pub struct SimServer {
    dir: PathBuf,
    rules: SyncRules,
    strategy: Option<(String, Arc<dyn ConflictStrategy>)>,
    options: ServiceOptions,
    clock: SimClock,
    service: Mutex<Option<Arc<SyncService>>>,
    /// What it answered.
    pub log: Mutex<UploadLog>,
}

impl std::fmt::Debug for SimServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimServer")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

fn down() -> ServerError {
    ServerError {
        code: ErrorCode::Internal,
        message: "server down".into(),
    }
}

fn outcome_kind(o: &Outcome) -> Outcome {
    // Replays may drop a merged row to fit the answer: compare the rest.
    match o {
        Outcome::Merged { reason, .. } => Outcome::Merged {
            row: None,
            reason: reason.clone(),
        },
        other => other.clone(),
    }
}

impl SimServer {
    /// A server over a SQLite source in `dir`, started.
    pub fn start(
        dir: PathBuf,
        rules: SyncRules,
        strategy: Option<(String, Arc<dyn ConflictStrategy>)>,
        clock: SimClock,
    ) -> Result<Self, SimError> {
        let server = SimServer {
            dir,
            rules,
            strategy,
            options: ServiceOptions {
                max_upload_ops: MAX_UPLOAD_OPS,
                ..ServiceOptions::default()
            },
            clock,
            service: Mutex::new(None),
            log: Mutex::new(UploadLog::default()),
        };
        server.restart()?;
        Ok(server)
    }

    /// The service's options (the clock skew bound, for the checker).
    pub fn options(&self) -> &ServiceOptions {
        &self.options
    }

    /// The rules.
    pub fn rules(&self) -> &SyncRules {
        &self.rules
    }

    /// The running service, if up.
    pub fn service(&self) -> Option<Arc<SyncService>> {
        self.service.lock().clone()
    }

    /// Crash: streams end, nothing in memory survives.
    pub fn crash(&self) {
        if let Some(s) = self.service.lock().take() {
            s.shutdown();
        }
    }

    /// Start again on the same source file.
    pub fn restart(&self) -> Result<(), SimError> {
        self.crash();
        let db = SqliteSourceDb::open_dir(&self.dir).map_err(|e| SimError::Setup(e.to_string()))?;
        let mut builder = SyncService::builder(Arc::new(db), self.rules.clone(), SECRET)
            .options(self.options.clone())
            .clock(Arc::new(self.clock.clone()));
        if let Some((table, s)) = &self.strategy {
            builder = builder.strategy(table, s.clone());
        }
        let service = builder.build().map_err(|e| SimError::Setup(e.to_string()))?;
        *self.service.lock() = Some(Arc::new(service));
        Ok(())
    }

    /// A token for `user`, valid for a day of simulated time.
    pub fn token(&self, user: &str) -> String {
        ferry_server::mint_token_at(
            SECRET,
            user,
            self.clock.now_ms() / 1000,
            24 * 3600,
            &serde_json::Map::new(),
        )
    }

    fn record(&self, request: &UploadRequest, result: &Result<UploadResponse, ServerError>, now_ms: u64) {
        let mut log = self.log.lock();
        let response = match result {
            Ok(r) => r,
            Err(e) => {
                log.refused.push(e.message.clone());
                return;
            }
        };
        log.answered += 1;
        let high_water = self
            .service()
            .and_then(|s| s.db().checkpoint("", &[]).ok())
            .map_or(0, |c| c.last_op_id);
        let entries = request.transactions.iter().flat_map(|t| &t.ops);
        for (entry, o) in entries.zip(&response.outcomes) {
            let key = (request.client_id.clone(), o.seq);
            match log.first.get(&key) {
                Some(first) => {
                    if outcome_kind(&first.outcome) != outcome_kind(&o.outcome) {
                        let first = first.outcome.clone();
                        log.mismatched
                            .push((request.client_id.clone(), o.seq, first, o.outcome.clone()));
                    }
                }
                None => {
                    log.first.insert(
                        key,
                        Processed {
                            entry: entry.clone(),
                            outcome: o.outcome.clone(),
                            server_now_ms: now_ms,
                            op_high_water: high_water,
                        },
                    );
                }
            }
        }
    }
}

#[async_trait]
impl SyncHandler for SimServer {
    async fn stream(&self, token: &str, request: StreamRequest) -> Result<ServerLines, ServerError> {
        let s = self.service().ok_or_else(down)?;
        s.stream(token, request).await
    }

    async fn stream_lines(&self, token: &str, request: StreamRequest) -> Result<ServerLineStream, ServerError> {
        let s = self.service().ok_or_else(down)?;
        s.stream_lines(token, request).await
    }

    async fn upload(&self, token: &str, request: UploadRequest) -> Result<UploadResponse, ServerError> {
        let s = self.service().ok_or_else(down)?;
        let now_ms = self.clock.now_ms();
        let result = SyncHandler::upload(s.as_ref(), token, request.clone()).await;
        self.record(&request, &result, now_ms);
        result
    }
}
