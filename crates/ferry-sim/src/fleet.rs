//! The fleet: client devices with real stores and the real `Database`,
//! each behind a fault-injecting in-memory transport to the simulated
//! server, and the workload that drives them.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use ferry_client::{ClientOptions, Database, StaticToken, UploadOutcome};
use ferry_core::{row_data, ColumnType, CrudOp, RandomSource, Schema, SeededRandom, Table, Value};
use ferry_queue::LocalDbOptions;
use ferry_sqlite::SqliteStore;
use ferry_store::{MemoryStore, Store};
use ferry_transport::{FaultConfig, FaultyTransport, MemoryTransport, Transport};

use crate::clock::SimClock;
use crate::server::SimServer;
use crate::SimError;

/// Tickets the workload touches.
pub const TICKETS: usize = 5;
/// The tickets' CRDT column (an automerge text document).
pub const DOC_COLUMN: &str = "notes_doc";
/// Ops in the workload's oversized transaction (over the server's
/// `max_upload_ops`, see `server::MAX_UPLOAD_OPS`).
pub const BIG_TX_OPS: usize = 40;
const STATUSES: [&str; 3] = ["pending", "in_progress", "done"];
/// Users of the fleet (two devices each).
pub const USERS: u64 = 2;

/// The name of user `u`.
pub fn user_name(u: usize) -> String {
    format!("user{u}")
}

/// How a device keeps its data.
#[derive(Clone, Debug)]
pub enum StoreKind {
    /// In memory (kept across a simulated process restart: the store
    /// stands for a durable one).
    Memory(Arc<MemoryStore>),
    /// A SQLite file, reopened after a crash.
    Sqlite(PathBuf),
}

/// One write the app made, as queued.
#[derive(Clone, Debug)]
pub struct OwnWrite {
    /// The op's seq.
    pub seq: u64,
    /// The op.
    pub op: CrudOp,
}

/// What a device's screen showed: every ticket title its live query
/// reported, to catch a value that disappears and comes back.
#[derive(Debug, Default)]
pub struct ScreenWatch {
    current: BTreeMap<String, Value>,
    gone: BTreeMap<String, std::collections::BTreeSet<String>>,
    /// Titles of this device's own writes, with the seq that wrote them.
    pub own: BTreeMap<String, u64>,
    /// Flickers seen: (ticket id, title, what the screen showed for it).
    pub flickers: Vec<(String, String, String)>,
    shown: BTreeMap<String, Vec<String>>,
}

/// Titles kept per ticket for a flicker's report.
const SHOWN_TITLES_KEPT: usize = 12;

impl ScreenWatch {
    fn show(&mut self, id: &str, title: Option<&Value>) {
        let title = title.filter(|v| !v.is_null());
        let before = match title {
            Some(t) => self.current.insert(id.to_owned(), t.clone()),
            None => self.current.remove(id),
        };
        if before.as_ref() == title {
            return;
        }
        let shown = self.shown.entry(id.to_owned()).or_default();
        if shown.len() == SHOWN_TITLES_KEPT {
            shown.remove(0);
        }
        shown.push(match title {
            Some(Value::Text(t)) => format!("{t} (seq {:?})", self.own.get(t)),
            other => format!("{other:?}"),
        });
        if let Some(Value::Text(b)) = &before {
            // Replaced by a newer write of this device is not a loss: if
            // that write loses on the server, the old value is back by
            // the rules.
            let seq_of = |v: Option<&Value>| match v {
                Some(Value::Text(t)) => self.own.get(t).copied(),
                _ => None,
            };
            let superseded = matches!((seq_of(before.as_ref()), seq_of(title)), (Some(b), Some(n)) if n > b);
            if !superseded {
                self.gone.entry(id.to_owned()).or_default().insert(b.clone());
            }
        }
        if let Some(Value::Text(t)) = title {
            if self.own.contains_key(t) && self.gone.get(id).is_some_and(|g| g.contains(t)) {
                let shown = self.shown.get(id).map(|v| v.join(" -> ")).unwrap_or_default();
                self.flickers.push((id.to_owned(), t.clone(), shown));
            }
        }
    }
}

/// A device.
pub struct Device {
    /// Index in the fleet.
    pub index: usize,
    /// The user signed in.
    pub user: String,
    /// Its storage.
    pub store: StoreKind,
    /// Its clock skew.
    pub clock: SimClock,
    /// The database, `None` while crashed.
    pub db: Option<Database>,
    /// Its network.
    pub net: FaultyTransport<MemoryTransport>,
    /// The client id (stable across restarts).
    pub client_id: String,
    /// Every op it queued, by seq.
    pub writes: BTreeMap<u64, OwnWrite>,
    /// Outcomes read back from its store so far.
    pub outcomes: BTreeMap<u64, UploadOutcome>,
    /// The highest checkpoint it applied (across restarts).
    pub max_applied_op_id: u64,
    /// What its screen (a live query of every ticket) showed.
    pub screen: Arc<parking_lot::Mutex<ScreenWatch>>,
    /// Its CRDT edits: (ticket id, marker in the text, seq).
    pub doc_markers: Vec<(String, String, u64)>,
    live: Option<ferry_client::LiveQuery>,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("index", &self.index)
            .field("client_id", &self.client_id)
            .finish_non_exhaustive()
    }
}

/// The client schema: what the rules sync, plus a column the server does
/// not know (writes of it are rejected there).
pub fn client_schema(server: &SimServer) -> Result<Schema, SimError> {
    let schema = server.rules().client_schema();
    let tables: Vec<Table> = schema
        .tables()
        .map(|t| {
            if t.name == "tickets" {
                // Uploads carry the base the manual strategy compares with.
                t.clone().column("local_note", ColumnType::Text).track_previous_values()
            } else {
                t.clone()
            }
        })
        .collect();
    Schema::new(tables).map_err(|e| SimError::Setup(e.to_string()))
}

impl Device {
    /// A device, opened and connected.
    pub fn new(
        index: usize,
        user: String,
        store: StoreKind,
        clock: SimClock,
        server: &Arc<SimServer>,
        seed: u64,
    ) -> Result<Self, SimError> {
        let handler: Arc<dyn ferry_transport::SyncHandler> = server.clone();
        let net = FaultyTransport::new(MemoryTransport::new(handler), FaultConfig::hostile(), seed);
        let mut device = Device {
            index,
            user,
            store,
            clock,
            db: None,
            net,
            client_id: String::new(),
            writes: BTreeMap::new(),
            outcomes: BTreeMap::new(),
            max_applied_op_id: 0,
            screen: Arc::default(),
            doc_markers: Vec::new(),
            live: None,
        };
        device.start(server, seed)?;
        Ok(device)
    }

    /// Open the database on the store and connect (first start, or after
    /// a crash).
    pub fn start(&mut self, server: &Arc<SimServer>, seed: u64) -> Result<(), SimError> {
        let store: Arc<dyn Store> = match &self.store {
            StoreKind::Memory(m) => m.clone(),
            StoreKind::Sqlite(path) => {
                Arc::new(SqliteStore::open(path, client_schema(server)?).map_err(|e| SimError::Setup(e.to_string()))?)
            }
        };
        let options = ClientOptions {
            local: LocalDbOptions {
                clock: Arc::new(self.clock.clone()),
                client_id_seed: Some(seed),
                ..LocalDbOptions::default()
            },
            upload_batch_entries: 25,
            retry_initial_delay_ms: 20,
            retry_max_delay_ms: 2_000,
            jitter_seed: seed,
            upload_poll_interval_ms: 200,
            ..ClientOptions::default()
        };
        let db = Database::open(store, options).map_err(|e| SimError::Setup(e.to_string()))?;
        self.client_id = db.client_id().to_owned();
        // The screen: every ticket, updated synchronously with each commit.
        let screen = self.screen.clone();
        let (live, first) = db
            .live_query(&ferry_client::Query::from("tickets"), move |diff| {
                let mut s = screen.lock();
                for r in &diff.removed {
                    if let Some(id) = r.row.id() {
                        s.show(id, None);
                    }
                }
                for a in &diff.added {
                    if let Some(id) = a.row.id() {
                        s.show(id, a.row.data.get("title"));
                    }
                }
                for u in &diff.updated {
                    if let Some(id) = u.new.id() {
                        s.show(id, u.new.data.get("title"));
                    }
                }
            })
            .map_err(|e| SimError::Setup(e.to_string()))?;
        {
            let mut s = self.screen.lock();
            let ids: Vec<String> = s.current.keys().cloned().collect();
            let now: BTreeMap<String, Value> = first
                .rows
                .iter()
                .filter_map(|r| Some((r.id()?.to_owned(), r.data.get("title").cloned()?)))
                .collect();
            for id in ids {
                if !now.contains_key(&id) {
                    s.show(&id, None);
                }
            }
            for (id, title) in &now {
                s.show(id, Some(title));
            }
        }
        self.live = Some(live);
        let transport: Arc<dyn Transport> = Arc::new(self.net.clone());
        db.connect(transport, Arc::new(StaticToken(server.token(&self.user))));
        self.db = Some(db);
        Ok(())
    }

    /// Resolve the first open conflict of this device's user, keeping the
    /// server's value or its own by the seed. Returns whether it did.
    pub fn resolve_conflict(&mut self, rng: &mut SeededRandom) -> Result<bool, SimError> {
        let Some(db) = &self.db else { return Ok(false) };
        let open = db.open_conflicts().map_err(|e| SimError::Setup(e.to_string()))?;
        let Some(c) = open.into_iter().find(|c| c.user_id == self.user) else {
            return Ok(false);
        };
        let choice = if rng.next_u64().is_multiple_of(2) {
            ferry_client::Resolution::Server
        } else {
            ferry_client::Resolution::Local
        };
        let before = db.local().last_seq();
        // The app may be refused (the row is gone since): nothing written.
        if db.resolve_conflict(&c.id, choice).is_err() {
            return Ok(false);
        }
        let after = db.local().last_seq();
        if after > before {
            let entries = db
                .local()
                .store()
                .queue_from(before + 1, (after - before) as usize)
                .map_err(|e| SimError::Setup(e.to_string()))?;
            for e in entries {
                self.writes.insert(e.seq, OwnWrite { seq: e.seq, op: e.op });
            }
        }
        Ok(after > before)
    }

    /// The process dies: the database and its tasks are gone, the store
    /// stays.
    pub fn crash(&mut self) {
        self.live = None;
        self.db = None;
    }

    /// Queue one write; returns whether it was queued (a patch or delete of
    /// a row the device does not see queues nothing).
    pub fn write(&mut self, ticket: usize, kind: u64, rng: &mut SeededRandom) -> Result<bool, SimError> {
        let Some(db) = &self.db else { return Ok(false) };
        let id = format!("t{ticket}");
        // Titles are unique, so one that left the screen and came back is
        // a flicker, never a new write of the same text.
        let title = Value::from(format!("title {:016x} by {}", rng.next_u64(), self.index));
        let status = Value::from(STATUSES[(rng.next_u64() % 3) as usize]);
        // The screen hears of the write while it commits: name the title
        // as this device's (with the seq it gets) first.
        if kind == 0 {
            if let Value::Text(t) = &title {
                self.screen.lock().own.insert(t.clone(), db.local().last_seq() + 1);
            }
        }
        let result = db.write_with_receipt(|tx| -> Result<(), ferry_queue::QueueError> {
            match kind {
                0 => tx.put("tickets", &id, row_data([("title", title), ("status", status)])),
                1 => {
                    if tx.get("tickets", &id)?.is_some() {
                        tx.update("tickets", &id, row_data([("status", status)]))?;
                    }
                    Ok(())
                }
                2 => tx.delete("tickets", &id).map(drop),
                3 => {
                    // A column the server does not know: rejected there.
                    if tx.get("tickets", &id)?.is_some() {
                        tx.update("tickets", &id, row_data([("local_note", Value::from("x"))]))?;
                    }
                    Ok(())
                }
                4 => {
                    // An edit of the ticket's CRDT document, marked so the
                    // checker can find it in the merged text.
                    let Some(row) = tx.get("tickets", &id)? else {
                        return Ok(());
                    };
                    let doc = match row.get(DOC_COLUMN) {
                        Some(Value::Blob(b)) => b.clone(),
                        _ => ferry_conflict::crdt::new_text_doc(""),
                    };
                    let marker = format!("[{}-{}]", self.index, rng.next_u64() % 1_000_000_007);
                    let edited = ferry_conflict::crdt::edit_text(&doc, &self.client_id, |e| {
                        e.push(&marker);
                    })
                    .map_err(|e| ferry_queue::QueueError::Refused { reason: e.to_string() })?;
                    tx.update("tickets", &id, row_data([(DOC_COLUMN, Value::Blob(edited))]))?;
                    self.doc_markers.push((id.clone(), marker, 0));
                    Ok(())
                }
                6 => {
                    // The ticket's assignment, to either user: a row in
                    // `global` and in its user's `my_assignments`, so a
                    // reassignment takes it out of the other user's bucket
                    // while `global` keeps it.
                    let user = user_name((rng.next_u64() % USERS) as usize);
                    tx.put(
                        "assignments",
                        &format!("a{ticket}"),
                        row_data([("ticket_id", Value::from(id.as_str())), ("user_id", Value::from(user))]),
                    )
                }
                _ => {
                    // More ops in one transaction than the server takes in
                    // one upload: refused whole, it must become `rejected`
                    // and not block the queue.
                    let n = rng.next_u64();
                    for k in 0..BIG_TX_OPS {
                        tx.put(
                            "tickets",
                            &format!("big-{n:x}-{k}"),
                            row_data([("title", Value::from("big"))]),
                        )?;
                    }
                    Ok(())
                }
            }
        });
        let (_, receipt) = result.map_err(|e| SimError::Setup(format!("local write failed: {e}")))?;
        let Some(r) = receipt else { return Ok(false) };
        if let Some(last) = self.doc_markers.last_mut().filter(|m| m.2 == 0) {
            last.2 = r.first_seq;
        }
        let entries = db
            .local()
            .store()
            .queue_from(r.first_seq, (r.last_seq - r.first_seq + 1) as usize)
            .map_err(|e| SimError::Setup(e.to_string()))?;
        for e in entries {
            if let CrudOp::Put { data, .. } = &e.op {
                if let Some(Value::Text(t)) = data.get("title") {
                    self.screen.lock().own.insert(t.clone(), e.seq);
                }
            }
            self.writes.insert(e.seq, OwnWrite { seq: e.seq, op: e.op });
        }
        Ok(true)
    }
}
