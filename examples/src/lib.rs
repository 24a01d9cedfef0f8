//! The ticket tracker shared by Ferry's example apps (one per conflict
//! strategy, in `examples/`): its server rules ([`TrackerRules`]: the
//! ticket tracker rules of ferry-server and the per-strategy files that
//! extend them), the client schema derived from them ([`client_schema`]),
//! an embedded sync server started in-process on a temporary directory with
//! the chosen strategy, two clients — `alice`, who stays online, and
//! `bob`, who goes offline — and helpers that print what each client sees
//! and what the server did with each upload.
//!
//! Every example plays the same story from the blog post on offline-first
//! conflicts: a value starts as A; bob goes offline; alice (online) sets B;
//! bob (offline) sets C; bob reconnects. What happens next depends on the
//! strategy; the scenario functions in [`scenarios`] return the [`Demo`]
//! so the tests can check both clients.
//!
//! Going offline is [`Database::disconnect`]: no download stream is
//! connected, so `status().connected` is false (the client's definition of
//! offline, which [`ferry_client::OfflinePolicy`] uses). Writes keep
//! working and queue up; [`Client::go_online`] connects again.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use ferry_client::{ClientError, ClientOptions, Database, Resolution, StaticToken, UploadOutcome};
pub use ferry_protocol::Outcome;

use ferry_core::{row_data, Clock, CoreError, RowData, Schema, SystemClock, Value};
use ferry_queue::{LocalDbOptions, QueueError, WriteTx};
use ferry_server::{
    mint_token, RulesFile, ServiceError, SourceError, SqliteSourceDb, SyncRules, SyncService, SyncServiceBuilder,
    TICKET_TRACKER_RULES,
};
use ferry_sqlite::SqliteStore;
use ferry_transport::{MemoryTransport, Transport};
use parking_lot::Mutex;
use thiserror::Error;
use tokio::task::JoinHandle;

pub mod scenarios;
pub mod tracker;

/// Errors of the example apps.
#[derive(Debug, Error)]
pub enum ExampleError {
    /// A client call failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// A local write failed.
    #[error(transparent)]
    Queue(#[from] QueueError),
    /// The embedded server failed.
    #[error(transparent)]
    Server(#[from] ServiceError),
    /// The embedded server's source database failed.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// A schema is invalid.
    #[error(transparent)]
    Schema(#[from] CoreError),
    /// The temporary directory could not be made.
    #[error("temporary directory: {0}")]
    Io(#[from] std::io::Error),
    /// A client did not catch up with the server in time.
    #[error("{client} did not catch up with the server within {timeout_ms} ms")]
    Timeout {
        /// The client's name.
        client: String,
        /// How long it was given.
        timeout_ms: u64,
    },
    /// The story did not go as the example expects.
    #[error("unexpected: {0}")]
    Unexpected(String),
}

/// Result of the example helpers.
pub type Result<T, E = ExampleError> = std::result::Result<T, E>;

/// The JWT secret of the embedded server.
pub const SECRET: &str = "ferry-examples-secret";

/// The ticket tracker's sync rules, one variant per rules file. There is
/// one source for the tracker's tables, buckets and permissions: the
/// ticket tracker rules of ferry-server
/// (`crates/ferry-server/examples/ticket-tracker.toml`, embedded as
/// [`TICKET_TRACKER_RULES`]). The other variants are files that extend it
/// (`extends = ...`), adding only their conflict strategies and, for the
/// CRDT one, the document column. The server (`ferry-server serve --rules
/// FILE`), the client schema ([`client_schema`]), the examples and the
/// tracker app all load them from here or from the files themselves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrackerRules {
    /// The ticket tracker rules themselves: no strategy in the file
    /// (column-level last write wins, unless the server is given one in
    /// code, as the domain, manual and audit-log examples are).
    Base,
    /// `examples/tracker-strategies.toml`: a domain rule on ticket status,
    /// manual resolution of descriptions, the activity log.
    Strategies,
    /// `examples/tracker-crdt.toml`: `tickets.description_doc`, an
    /// automerge text document the server merges (the CRDT strategy).
    Crdt,
}

impl TrackerRules {
    /// Every variant.
    pub const ALL: [TrackerRules; 3] = [TrackerRules::Base, TrackerRules::Strategies, TrackerRules::Crdt];

    /// The rules file, relative to the workspace root (what `ferry-server
    /// serve --rules` and `tracker --rules` are given).
    pub fn path(self) -> &'static str {
        match self {
            TrackerRules::Base => "crates/ferry-server/examples/ticket-tracker.toml",
            TrackerRules::Strategies => "examples/tracker-strategies.toml",
            TrackerRules::Crdt => "examples/tracker-crdt.toml",
        }
    }

    /// The file's text (embedded at build time).
    pub fn text(self) -> &'static str {
        match self {
            TrackerRules::Base => TICKET_TRACKER_RULES,
            TrackerRules::Strategies => include_str!("../tracker-strategies.toml"),
            TrackerRules::Crdt => include_str!("../tracker-crdt.toml"),
        }
    }

    /// The validated rules: the file on top of the base rules it extends
    /// (as [`SyncRules::from_file`] would load them from the workspace,
    /// without reading it).
    pub fn load(self) -> Result<SyncRules> {
        let file = RulesFile::from_toml(self.text())?;
        let Some(base) = &file.extends else {
            return Ok(SyncRules::new(file)?);
        };
        // The variants live in `examples/` and extend the base only.
        let expected = format!("../{}", TrackerRules::Base.path());
        if *base != expected {
            return Err(ExampleError::Unexpected(format!(
                "{} extends {base:?}, not the ticket tracker rules ({expected:?})",
                self.path()
            )));
        }
        Ok(SyncRules::new(
            file.extending(RulesFile::from_toml(TICKET_TRACKER_RULES)?),
        )?)
    }
}

/// Ticket statuses.
pub const PENDING: &str = "pending";
/// Ticket statuses.
pub const IN_PROGRESS: &str = "in_progress";
/// Ticket statuses.
pub const DONE: &str = "done";

/// The client schema of the ticket tracker under `rules` (one of
/// [`TrackerRules`], or a rules file the tracker is given): the tables the
/// rules sync, derived from them (`SyncRules::client_schema`, not a copy),
/// plus what only the client has: indexes on ticket status, on a ticket's
/// assignments and on conflict status, and the previous values of ticket
/// changes (the base manual resolution and domain rules compare against).
/// The examples and the tracker app both open their stores with it.
pub fn client_schema(rules: &SyncRules) -> Result<Schema> {
    let derived = rules.client_schema();
    Ok(Schema::new(derived.tables().cloned().map(|t| {
        match t.name.as_str() {
            "tickets" => t
                .index("by_status", &["status"])
                // Previous values travel with each op: the base of a conflict.
                .track_previous_values(),
            "assignments" => t.index("by_ticket", &["ticket_id", "created_at"]),
            // What `ferry_client::conflicts_table` declares.
            ferry_client::CONFLICTS_TABLE => t.index("by_status", &["status"]),
            _ => t,
        }
    }))?)
}

/// Milliseconds since the epoch, as text (the timestamp columns).
pub fn now_text() -> String {
    SystemClock.now_ms().to_string()
}

/// One user's client: a [`Database`] on SQLite in the demo's directory,
/// connected in-process to the embedded server.
pub struct Client {
    /// The user (`alice`, `bob`).
    pub name: String,
    /// The client database.
    pub db: Database,
    transport: Arc<dyn Transport>,
    outcomes: Arc<Mutex<Vec<UploadOutcome>>>,
    /// What each queued seq changed, for printing outcomes.
    labels: Mutex<BTreeMap<u64, String>>,
    collector: JoinHandle<()>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("name", &self.name)
            .field("db", &self.db)
            .finish_non_exhaustive()
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.collector.abort();
    }
}

/// How long helpers wait for a client to catch up.
pub const SYNC_TIMEOUT_MS: u64 = 15_000;

impl Client {
    fn open(name: &str, dir: &std::path::Path, service: &Arc<SyncService>, schema: Schema, seed: u64) -> Result<Self> {
        let path = dir.join(format!("{name}.db"));
        let store = SqliteStore::open(&path, schema).map_err(ClientError::from)?;
        let options = ClientOptions {
            local: LocalDbOptions {
                clock: Arc::new(SystemClock),
                client_id_seed: Some(seed),
                ..LocalDbOptions::default()
            },
            retry_initial_delay_ms: 5,
            retry_max_delay_ms: 100,
            upload_poll_interval_ms: 20,
            ..ClientOptions::default()
        };
        let db = Database::open(Arc::new(store), options)?;
        let outcomes = Arc::new(Mutex::new(Vec::new()));
        let mut rx = db.subscribe_outcomes();
        let sink = outcomes.clone();
        let collector = tokio::spawn(async move {
            while let Ok(o) = rx.recv().await {
                sink.lock().push(o);
            }
        });
        let handler: Arc<SyncService> = service.clone();
        let transport: Arc<dyn Transport> = Arc::new(MemoryTransport::new(handler));
        Ok(Client {
            name: name.to_owned(),
            db,
            transport,
            outcomes,
            labels: Mutex::new(BTreeMap::new()),
            collector,
        })
    }

    /// Connect (again) to the embedded server.
    pub fn go_online(&self) {
        let token = mint_token(SECRET, &self.name, 3600, &serde_json::Map::new());
        self.db.connect(self.transport.clone(), Arc::new(StaticToken(token)));
    }

    /// Disconnect: local reads and writes go on, writes queue up.
    pub async fn go_offline(&self) {
        self.db.disconnect().await;
    }

    /// Whether the client is offline (no download stream).
    pub fn is_offline(&self) -> bool {
        self.db.is_offline()
    }

    /// Write locally, remembering `label` for the ops it queued (printed
    /// next to their outcomes).
    pub fn write<R, F>(&self, label: &str, f: F) -> Result<R, QueueError>
    where
        F: FnOnce(&mut WriteTx<'_>) -> Result<R, QueueError>,
    {
        let before = self.db.local().last_seq();
        let r = self.db.write(f)?;
        self.label_since(before, label);
        Ok(r)
    }

    fn label_since(&self, before: u64, label: &str) {
        let after = self.db.local().last_seq();
        let mut labels = self.labels.lock();
        for seq in before + 1..=after {
            labels.insert(seq, label.to_owned());
        }
    }

    /// Resolve a conflict (see [`Database::resolve_conflict`]); returns the
    /// value written.
    pub fn resolve(&self, conflict_id: &str, resolution: Resolution) -> Result<Value> {
        let before = self.db.local().last_seq();
        let value = self.db.resolve_conflict(conflict_id, resolution)?;
        self.label_since(before, &format!("resolution of {conflict_id}"));
        Ok(value)
    }

    /// Set columns of a ticket (and its `updated_at`).
    pub fn update_ticket(&self, id: &str, changes: RowData) -> Result<(), QueueError> {
        let label = format!(
            "tickets/{id} {}",
            changes.keys().cloned().collect::<Vec<_>>().join(", ")
        );
        self.write(&label, |tx| {
            let mut changes = changes;
            changes.insert("updated_at".into(), Value::from(now_text()));
            tx.update("tickets", id, changes)?;
            Ok(())
        })
    }

    /// Create a ticket.
    pub fn create_ticket(&self, id: &str, title: &str, extra: RowData) -> Result<(), QueueError> {
        self.write(&format!("tickets/{id} created"), |tx| {
            let now = now_text();
            let mut row = row_data([
                ("title", Value::from(title)),
                ("description", Value::from("")),
                ("status", Value::from(PENDING)),
                ("created_at", Value::from(now.as_str())),
                ("updated_at", Value::from(now.as_str())),
                ("version", Value::from(0)),
            ]);
            row.extend(extra);
            tx.insert("tickets", id, row)
        })
    }

    /// Add a comment to a ticket.
    pub fn comment(&self, id: &str, ticket_id: &str, body: &str) -> Result<(), QueueError> {
        self.write(&format!("comments/{id} added"), |tx| {
            tx.insert(
                "comments",
                id,
                row_data([
                    ("ticket_id", Value::from(ticket_id)),
                    ("user_id", Value::from(self.name.as_str())),
                    ("body", Value::from(body)),
                    ("created_at", Value::from(now_text())),
                ]),
            )
        })
    }

    /// Assign a user to a ticket.
    pub fn assign(&self, id: &str, ticket_id: &str, user_id: &str) -> Result<(), QueueError> {
        self.write(&format!("assignments/{id} added"), |tx| {
            tx.insert(
                "assignments",
                id,
                row_data([
                    ("ticket_id", Value::from(ticket_id)),
                    ("user_id", Value::from(user_id)),
                    ("created_at", Value::from(now_text())),
                ]),
            )
        })
    }

    /// Attach a URL to a ticket.
    pub fn attach(&self, id: &str, ticket_id: &str, url: &str) -> Result<(), QueueError> {
        self.write(&format!("attachments/{id} added"), |tx| {
            tx.insert(
                "attachments",
                id,
                row_data([
                    ("ticket_id", Value::from(ticket_id)),
                    ("url", Value::from(url)),
                    ("created_at", Value::from(now_text())),
                ]),
            )
        })
    }

    /// A visible ticket.
    pub fn ticket(&self, id: &str) -> Result<Option<RowData>> {
        Ok(self.db.local().get("tickets", id)?)
    }

    /// One column of a visible ticket (`Null` when absent).
    pub fn ticket_value(&self, id: &str, column: &str) -> Result<Value> {
        Ok(self
            .ticket(id)?
            .and_then(|mut row| row.remove(column))
            .unwrap_or(Value::Null))
    }

    /// Every visible row of a table.
    pub fn rows(&self, table: &str) -> Result<Vec<(String, RowData)>> {
        Ok(self.db.local().scan(table)?)
    }

    /// Every upload outcome so far.
    pub fn outcomes(&self) -> Vec<UploadOutcome> {
        self.outcomes.lock().clone()
    }

    /// Outcomes, one line each, with what the op changed.
    pub fn describe_outcomes(&self) -> Vec<String> {
        let labels = self.labels.lock();
        self.outcomes()
            .iter()
            .map(|o| {
                let label = labels.get(&o.outcome.seq).map_or("?", String::as_str);
                format!(
                    "seq {} ({label}): {}",
                    o.outcome.seq,
                    describe_outcome(&o.outcome.outcome)
                )
            })
            .collect()
    }

    /// Wait until every local write is uploaded and the client applied a
    /// checkpoint at or past the server's latest op.
    pub async fn catch_up(&self, service: &SyncService) -> Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_millis(SYNC_TIMEOUT_MS);
        loop {
            let last = service.db().checkpoint(self.db.client_id(), &[])?.last_op_id;
            let status = self.db.status();
            let pending = self.db.local().pending_len()?;
            if pending == 0 && status.has_synced && status.last_applied_op_id.unwrap_or(0) >= last {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                return Err(ExampleError::Timeout {
                    client: self.name.clone(),
                    timeout_ms: SYNC_TIMEOUT_MS,
                });
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// What this client sees of its tickets, one line each.
    pub fn describe_tickets(&self) -> Result<Vec<String>> {
        let pending: std::collections::BTreeSet<String> = self
            .db
            .local()
            .store()
            .scan_overlay("tickets")
            .map_err(ClientError::from)?
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        Ok(self
            .rows("tickets")?
            .into_iter()
            .map(|(id, row)| {
                let mut line = format!(
                    "{id}: title={} status={}",
                    show(row.get("title")),
                    show(row.get("status"))
                );
                if let Some(Value::Blob(doc)) = row.get("description_doc") {
                    let _ = write!(line, " description_doc={} bytes", doc.len());
                }
                if pending.contains(&id) {
                    line.push_str(" (local change not yet confirmed)");
                }
                line
            })
            .collect())
    }

    /// Print what this client sees: tickets, then counts of the other
    /// tables and its open conflicts.
    pub fn print_view(&self) -> Result<()> {
        let status = if self.is_offline() { "offline" } else { "online" };
        println!("  {} ({status}) sees:", self.name);
        for line in self.describe_tickets()? {
            println!("    {line}");
        }
        let count = |t: &str| self.rows(t).map(|r| r.len());
        println!(
            "    comments: {}, assignments: {}, attachments: {}, activity rows: {}",
            count("comments")?,
            count("assignments")?,
            count("attachments")?,
            count("activity")?
        );
        for c in self.db.conflicts()? {
            match &c.resolution {
                None => println!(
                    "    {} conflict {}: {}/{}.{} local={} server={} base={}",
                    c.status, c.id, c.table, c.row_id, c.field, c.local, c.server, c.base
                ),
                Some(chosen) => println!(
                    "    {} conflict {}: {}/{}.{} resolved to {chosen}",
                    c.status, c.id, c.table, c.row_id, c.field
                ),
            }
        }
        Ok(())
    }

    /// Print the outcomes of this client's uploads.
    pub fn print_outcomes(&self) {
        println!("  {}'s uploads:", self.name);
        let lines = self.describe_outcomes();
        if lines.is_empty() {
            println!("    (none)");
        }
        for line in lines {
            println!("    {line}");
        }
    }
}

fn show(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => "null".into(),
        Some(Value::Text(s)) => format!("{s:?}"),
        Some(other) => other.to_string(),
    }
}

/// One outcome in words.
pub fn describe_outcome(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Applied => "applied".into(),
        Outcome::Merged { reason, .. } => format!("merged ({reason})"),
        Outcome::Rejected { reason } => format!("rejected ({reason})"),
        Outcome::NeedsReview { conflict_id } => format!("needs review (conflict {conflict_id})"),
    }
}

/// The embedded server and the two clients.
pub struct Demo {
    /// The embedded sync service.
    pub service: Arc<SyncService>,
    /// The online user.
    pub alice: Client,
    /// The user who goes offline.
    pub bob: Client,
    _dir: tempfile::TempDir,
}

impl std::fmt::Debug for Demo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Demo")
            .field("alice", &self.alice)
            .field("bob", &self.bob)
            .finish_non_exhaustive()
    }
}

impl Demo {
    /// Start a sync server on SQLite in a temporary directory with the
    /// ticket tracker's `rules`, configured further by `configure`
    /// (strategies per table, which override the rules file's), and
    /// connect alice and bob, whose schema is derived from the same rules.
    pub async fn start(
        rules: TrackerRules,
        configure: impl FnOnce(SyncServiceBuilder) -> SyncServiceBuilder,
    ) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let server_dir = dir.path().join("server");
        std::fs::create_dir_all(&server_dir)?;
        let source = SqliteSourceDb::open_dir(&server_dir)?;
        let rules = rules.load()?;
        let schema = client_schema(&rules)?;
        let service = Arc::new(configure(SyncService::builder(Arc::new(source), rules, SECRET)).build()?);
        let alice = Client::open("alice", dir.path(), &service, schema.clone(), 1)?;
        let bob = Client::open("bob", dir.path(), &service, schema, 2)?;
        alice.go_online();
        bob.go_online();
        let demo = Demo {
            service,
            alice,
            bob,
            _dir: dir,
        };
        demo.catch_up().await?;
        Ok(demo)
    }

    /// Wait until both clients caught up with the server.
    pub async fn catch_up(&self) -> Result<()> {
        self.alice.catch_up(&self.service).await?;
        self.bob.catch_up(&self.service).await?;
        // Alice may have missed what bob's catching up uploaded.
        self.alice.catch_up(&self.service).await
    }

    /// Print a step of the story.
    pub fn step(&self, text: &str) {
        println!("\n> {text}");
    }

    /// Print what both clients see.
    pub fn print_views(&self) -> Result<()> {
        self.alice.print_view()?;
        self.bob.print_view()
    }

    /// Print both clients' upload outcomes.
    pub fn print_outcomes(&self) {
        self.alice.print_outcomes();
        self.bob.print_outcomes();
    }

    /// Stop syncing.
    pub async fn shutdown(&self) {
        self.alice.go_offline().await;
        self.bob.go_offline().await;
    }
}

/// Let the clock move, so that writes made one after the other get
/// distinct, ordered timestamps.
pub async fn tick() {
    tokio::time::sleep(Duration::from_millis(5)).await;
}
