//! The ticket tracker as a local-first web app, one process per device
//! (the `tracker` binary): a [`Database`] on its own SQLite file, synced
//! with `ferry-server` over HTTP, and a web UI served on loopback by this
//! process alone. The page talks only to its own process: JSON endpoints
//! for reads and writes ([`api`]) and one Server-Sent Events stream fed
//! by the client's live queries (one per table), the sync status, and
//! every upload outcome as it arrives. Killing `ferry-server` leaves the
//! page fully usable: writes queue up and sync when the server is back.
//!
//! The schema is the server's: [`client_schema`] derives it from the
//! rules file the server runs (`--rules`, one of [`crate::TrackerRules`]'s
//! files) or the embedded ticket tracker rules (`SyncRules::ticket_tracker`),
//! adding only what the client keeps for itself ([`crate::client_schema`],
//! the examples' too). Rules that give tickets a `description_doc` column
//! (`examples/tracker-crdt.toml`) switch description edits to the CRDT
//! document.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use ferry_client::query::ResultRow;
use ferry_client::{ClientOptions, Credentials, Database, Diff, LiveQuery, OfflinePolicy, Query, StaticToken};
use ferry_core::{Schema, SystemClock, Value};
use ferry_http::HttpTransport;
use ferry_protocol::Outcome;
use ferry_queue::LocalDbOptions;
use ferry_server::{mint_token, SyncRules, DEV_JWT_SECRET};
use ferry_sqlite::SqliteStore;
use ferry_transport::Transport;
use parking_lot::Mutex;
use serde_json::{json, Map, Value as Json};
use tokio::sync::{broadcast, Notify};

use crate::{ExampleError, Result};

pub mod api;

/// The tables the page shows, each followed by one live query.
pub const TABLES: &[&str] = &[
    "tickets",
    "assignments",
    "comments",
    "attachments",
    "app_user",
    "ferry_conflicts",
    "activity",
];

/// How many upload outcomes the tracker keeps for the page.
pub const OUTCOMES_KEPT: usize = 200;

/// What a tracker process needs to start.
#[derive(Clone, Debug)]
pub struct TrackerConfig {
    /// The sync server (`http://127.0.0.1:8080`).
    pub server_url: String,
    /// This device's user.
    pub user: String,
    /// Where the web UI listens (loopback).
    pub listen: SocketAddr,
    /// Where the client's SQLite file lives.
    pub data_dir: PathBuf,
    /// A bearer token; `None`: a development token minted with
    /// [`DEV_JWT_SECRET`].
    pub token: Option<String>,
    /// The sync rules file the server runs (`None`: the embedded ticket
    /// tracker rules); the client schema is derived from it.
    pub rules: Option<PathBuf>,
    /// Start with the offline switch on (no sync until it is turned off).
    pub start_offline: bool,
    /// Install the offline restrictions of the blog's "restricted"
    /// strategy (no renames and no deletes of tickets while offline).
    pub restricted: bool,
}

/// The client schema: [`crate::client_schema`] of the server's ticket
/// tracker rules (the file `rules`, following its `extends`, or the
/// embedded ones).
pub fn client_schema(rules: Option<&std::path::Path>) -> Result<Schema> {
    let rules = match rules {
        Some(path) => SyncRules::from_file(path)?,
        None => SyncRules::ticket_tracker()?,
    };
    crate::client_schema(&rules)
}

/// The offline restrictions of `--restricted`: renaming and deleting
/// tickets need the server.
pub fn restricted_policy() -> OfflinePolicy {
    OfflinePolicy::new()
        .deny_delete("tickets")
        .deny_update_of("tickets", ["title"])
}

/// Serve the web UI on `listener` until `shutdown` resolves, then stop
/// syncing gracefully (open event streams are dropped, not drained).
pub async fn serve(
    tracker: Arc<Tracker>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let app = api::router(tracker.clone());
    tokio::select! {
        served = std::future::IntoFuture::into_future(axum::serve(listener, app)) => served?,
        () = shutdown => {}
    }
    tracker.db.disconnect().await;
    Ok(())
}

/// One message for the page's event stream.
#[derive(Clone, Debug)]
pub struct Event {
    /// The SSE event name (`rows`, `status`, `outcome`, `snapshot`).
    pub name: &'static str,
    /// Its JSON data.
    pub data: Json,
}

/// One upload outcome as the page shows it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct OutcomeView {
    /// The op's seq.
    pub seq: u64,
    /// Its local transaction.
    pub tx_id: u64,
    /// `applied`, `merged`, `rejected` or `needs_review`.
    pub kind: &'static str,
    /// The server's reason (merged, rejected).
    pub reason: Option<String>,
    /// The conflict to review (needs review).
    pub conflict_id: Option<String>,
    /// What the write did, in words.
    pub label: String,
    /// When the tracker received it (ms since the epoch).
    pub at_ms: u64,
}

/// A running tracker: the client database and what the web UI needs.
pub struct Tracker {
    /// The client database.
    pub db: Database,
    /// This device's user.
    pub user: String,
    server_url: String,
    transport: Arc<dyn Transport>,
    credentials: Arc<dyn Credentials>,
    /// The offline switch: the user disconnected the sync.
    offline: AtomicBool,
    events: broadcast::Sender<Event>,
    /// Something changed that the status shows.
    status_wake: Arc<Notify>,
    /// What each queued seq did, for the outcome log.
    labels: Mutex<BTreeMap<u64, String>>,
    outcomes: Mutex<VecDeque<OutcomeView>>,
    live: Mutex<Vec<(String, LiveQuery)>>,
    restricted: bool,
    /// The rules give tickets a `description_doc` column: descriptions
    /// are edited as automerge text documents the server merges.
    pub crdt_description: bool,
}

impl std::fmt::Debug for Tracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracker")
            .field("user", &self.user)
            .field("db", &self.db)
            .finish_non_exhaustive()
    }
}

/// The column holding a ticket's description as an automerge text
/// document, when the rules declare it (the CRDT strategy).
pub const DESCRIPTION_DOC: &str = "description_doc";

/// Whether descriptions are edited as automerge documents under this
/// client schema: its tickets have [`DESCRIPTION_DOC`] (the CRDT rules,
/// `examples/tracker-crdt.toml`, add it; the other rules do not).
pub fn crdt_description(schema: &Schema) -> bool {
    schema
        .table("tickets")
        .is_ok_and(|t| t.column_def(DESCRIPTION_DOC).is_some())
}

/// A row as the page gets it: its columns (blobs left out), `id` and
/// whether local writes to it are still pending. A ticket's description
/// document, when it has one, gives its `description` (the merged text).
pub fn row_json(row: &ResultRow) -> Json {
    let mut m = Map::new();
    for (k, v) in &row.data {
        if !matches!(v, Value::Blob(_)) {
            m.insert(k.clone(), serde_json::to_value(v).unwrap_or(Json::Null));
        }
    }
    if let Some(Value::Blob(doc)) = row.data.get(DESCRIPTION_DOC) {
        if let Ok(text) = ferry_conflict::crdt::read_text(doc) {
            m.insert("description".into(), Json::from(text));
        }
    }
    m.insert("id".into(), Json::from(row.id().unwrap_or_default()));
    m.insert("pending".into(), Json::from(row.pending));
    Json::Object(m)
}

fn diff_json(table: &str, diff: &Diff) -> Json {
    let upserts: Vec<Json> = diff
        .added
        .iter()
        .map(|a| row_json(&a.row))
        .chain(diff.updated.iter().map(|u| row_json(&u.new)))
        .collect();
    let removed: Vec<Json> = diff
        .removed
        .iter()
        .map(|r| Json::from(r.row.id().unwrap_or_default()))
        .collect();
    json!({ "table": table, "upserts": upserts, "removed": removed })
}

fn now_ms() -> u64 {
    use ferry_core::Clock;
    SystemClock.now_ms()
}

impl Tracker {
    /// Open the client database under `config.data_dir`, start the live
    /// queries, the status and outcome feeds, make sure this user has an
    /// `app_user` row and connect to the server.
    pub async fn open(config: &TrackerConfig) -> Result<Arc<Self>> {
        std::fs::create_dir_all(&config.data_dir)?;
        let path = config.data_dir.join(format!("{}.db", config.user));
        let schema = client_schema(config.rules.as_deref())?;
        let crdt_description = crdt_description(&schema);
        let store = SqliteStore::open(&path, schema).map_err(ferry_client::ClientError::from)?;
        let options = ClientOptions {
            local: LocalDbOptions {
                clock: Arc::new(SystemClock),
                ..LocalDbOptions::default()
            },
            // A demo wants a restarted server found again quickly.
            retry_initial_delay_ms: 100,
            retry_max_delay_ms: 1_000,
            upload_poll_interval_ms: 250,
            ..ClientOptions::default()
        };
        let db = Database::open(Arc::new(store), options)?;
        if config.restricted {
            db.set_offline_policy(Some(restricted_policy()));
        }
        let transport: Arc<dyn Transport> = Arc::new(
            HttpTransport::new(config.server_url.clone())
                .map_err(|e| ExampleError::Unexpected(format!("server url {:?}: {e}", config.server_url)))?,
        );
        let token = config
            .token
            .clone()
            .unwrap_or_else(|| mint_token(DEV_JWT_SECRET, &config.user, 30 * 86_400, &Map::new()));
        let (events, _) = broadcast::channel(1_024);
        let tracker = Arc::new(Tracker {
            db,
            user: config.user.clone(),
            server_url: config.server_url.clone(),
            transport,
            credentials: Arc::new(StaticToken(token)),
            offline: AtomicBool::new(config.start_offline),
            events,
            status_wake: Arc::new(Notify::new()),
            labels: Mutex::new(BTreeMap::new()),
            outcomes: Mutex::new(VecDeque::new()),
            live: Mutex::new(Vec::new()),
            restricted: config.restricted,
            crdt_description,
        });
        tracker.start_live_queries()?;
        tracker.spawn_feeds();
        tracker.ensure_user_row()?;
        if !config.start_offline {
            tracker
                .db
                .connect(tracker.transport.clone(), tracker.credentials.clone());
        }
        Ok(tracker)
    }

    fn start_live_queries(&self) -> Result<()> {
        let mut live = self.live.lock();
        for table in TABLES {
            let events = self.events.clone();
            let wake = self.status_wake.clone();
            let name = (*table).to_owned();
            let (handle, _) = self.db.live_query(&Query::from(*table), move |diff| {
                // Runs on the committing thread: only send, never read.
                let _ = events.send(Event {
                    name: "rows",
                    data: diff_json(&name, diff),
                });
                wake.notify_one();
            })?;
            live.push(((*table).to_owned(), handle));
        }
        Ok(())
    }

    /// The status feed (on every status change and every local change)
    /// and the outcome feed.
    fn spawn_feeds(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        let mut status_rx = self.db.watch_status();
        let wake = self.status_wake.clone();
        tokio::spawn(async move {
            loop {
                let Some(t) = weak.upgrade() else { return };
                let _ = t.events.send(Event {
                    name: "status",
                    data: t.status_json(),
                });
                drop(t);
                tokio::select! {
                    changed = status_rx.changed() => if changed.is_err() { return },
                    () = wake.notified() => {}
                }
                // Coalesce bursts (a checkpoint of many rows) into one message.
                tokio::time::sleep(std::time::Duration::from_millis(30)).await;
            }
        });
        let weak = Arc::downgrade(self);
        let mut outcomes = self.db.subscribe_outcomes();
        tokio::spawn(async move {
            // The last seq shown: after a lag (a burst over the channel's
            // capacity), the outcomes missed are read back from the store.
            let mut shown_through = 0;
            loop {
                let missed = match outcomes.recv().await {
                    Ok(o) => vec![o],
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        let Some(t) = weak.upgrade() else { return };
                        t.db.outcomes_since(shown_through, OUTCOMES_KEPT * 10)
                            .unwrap_or_default()
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                let Some(t) = weak.upgrade() else { return };
                for o in missed {
                    if o.outcome.seq <= shown_through {
                        continue;
                    }
                    shown_through = o.outcome.seq;
                    t.show_outcome(&o);
                }
            }
        });
    }

    /// Keep an outcome for the page (the newest `OUTCOMES_KEPT`) and send
    /// it to the pages listening.
    fn show_outcome(&self, o: &ferry_client::UploadOutcome) {
        let (kind, reason, conflict_id) = match &o.outcome.outcome {
            Outcome::Applied => ("applied", None, None),
            Outcome::Merged { reason, .. } => ("merged", Some(reason.clone()), None),
            Outcome::Rejected { reason } => ("rejected", Some(reason.clone()), None),
            Outcome::NeedsReview { conflict_id } => ("needs_review", None, Some(conflict_id.clone())),
        };
        let label = self
            .labels
            .lock()
            .get(&o.outcome.seq)
            .cloned()
            .unwrap_or_else(|| "an earlier write".to_owned());
        let view = OutcomeView {
            seq: o.outcome.seq,
            tx_id: o.tx_id,
            kind,
            reason,
            conflict_id,
            label,
            at_ms: now_ms(),
        };
        {
            let mut kept = self.outcomes.lock();
            kept.push_front(view.clone());
            kept.truncate(OUTCOMES_KEPT);
        }
        let _ = self.events.send(Event {
            name: "outcome",
            data: serde_json::to_value(&view).unwrap_or(Json::Null),
        });
        self.status_wake.notify_one();
    }

    fn ensure_user_row(&self) -> Result<()> {
        if self.db.local().get("app_user", &self.user)?.is_none() {
            let user = self.user.clone();
            self.write(&format!("user {user} joined"), |tx| {
                tx.insert(
                    "app_user",
                    &user,
                    ferry_core::row_data([("name", Value::from(user.as_str()))]),
                )?;
                Ok::<_, ferry_queue::QueueError>(())
            })?;
        }
        Ok(())
    }

    /// Write locally, remembering `label` for the outcomes of the ops it
    /// queued.
    pub fn write<R, E, F>(&self, label: &str, f: F) -> std::result::Result<R, E>
    where
        F: FnOnce(&mut ferry_client::WriteTx<'_>) -> std::result::Result<R, E>,
        E: From<ferry_queue::QueueError>,
    {
        let (r, receipt) = self.db.write_with_receipt(f)?;
        if let Some(receipt) = receipt {
            let mut labels = self.labels.lock();
            for seq in receipt.first_seq..=receipt.last_seq {
                labels.insert(seq, label.to_owned());
            }
            // Keep the map bounded: outcomes older than what the page
            // keeps are not shown anyway.
            while labels.len() > 10_000 {
                labels.pop_first();
            }
        }
        self.status_wake.notify_one();
        Ok(r)
    }

    /// Remember `label` for the seqs queued since `before` (a write made
    /// through a `Database` call of its own, such as `resolve_conflict`).
    pub fn label_range(&self, before: u64, label: &str) {
        let after = self.db.local().last_seq();
        let mut labels = self.labels.lock();
        for seq in before + 1..=after {
            labels.insert(seq, label.to_owned());
        }
        drop(labels);
        self.status_wake.notify_one();
    }

    /// The sync status as the page shows it.
    pub fn status_json(&self) -> Json {
        let s = self.db.status();
        let local = self.db.local();
        json!({
            "user": self.user,
            "client_id": self.db.client_id(),
            "server_url": self.server_url,
            "connected": s.connected,
            "connecting": s.connecting,
            "offline_switch": self.offline.load(Ordering::SeqCst),
            "offline_policy": self.restricted,
            "crdt_description": self.crdt_description,
            "restricted_while_offline": if self.restricted && !s.connected {
                json!({ "tickets": { "delete": "deleting tickets needs the server", "title": "renaming tickets needs the server" } })
            } else { Json::Null },
            "upload_queue": s.pending_ops,
            "pending_transactions": s.pending_transactions,
            "oldest_pending_age_ms": s.oldest_pending_age_ms,
            "download_progress": s.download_progress,
            "unconfirmed": local.pending_len().unwrap_or(0),
            "last_synced_at_ms": s.last_synced_at_ms,
            "has_synced": s.has_synced,
            "last_download_error": s.last_download_error,
            "last_upload_error": s.last_upload_error,
        })
    }

    /// The offline switch: disconnect (as losing the network would) or
    /// connect again.
    pub async fn set_offline(&self, offline: bool) {
        self.offline.store(offline, Ordering::SeqCst);
        if offline {
            self.db.disconnect().await;
        } else {
            self.db.connect(self.transport.clone(), self.credentials.clone());
        }
        self.status_wake.notify_one();
    }

    /// The upload outcomes kept, newest first.
    pub fn outcomes(&self) -> Vec<OutcomeView> {
        self.outcomes.lock().iter().cloned().collect()
    }

    /// Subscribe to the page's events.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Everything the page shows, for a page that (re)connects: every
    /// table's rows from its live query, the status and the outcomes.
    pub fn snapshot(&self) -> Result<Json> {
        let mut tables = Map::new();
        for (name, live) in self.live.lock().iter() {
            let rows: Vec<Json> = live.current()?.rows.iter().map(row_json).collect();
            tables.insert(name.clone(), Json::Array(rows));
        }
        Ok(json!({
            "tables": tables,
            "status": self.status_json(),
            "outcomes": self.outcomes(),
        }))
    }
}
