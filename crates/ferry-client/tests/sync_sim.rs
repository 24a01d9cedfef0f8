//! Property test: several clients sync with the real sync service (SQLite
//! source of truth) through the in-memory transport with faults: lost data
//! lines, delayed, duplicated and reordered lines, broken streams, failed,
//! lost and repeated uploads, and offline periods, under each conflict
//! strategy for the tickets table (column and row last-write-wins, domain
//! rules, manual resolution, audit log). The fleet is what an integrator
//! meets: two devices per user opened at once with default options (the
//! library picks their ids), device clocks seconds slow or fast, one app
//! version whose schema lacks a server column, apps that disconnect and
//! reconnect in a loop, and blind writes to rows of another user's private
//! bucket. Whatever happens, at the end every client's tickets equal the
//! server's, every write a client made has exactly one durable outcome
//! (applied, merged, rejected with a reason, or needs review), and no
//! client holds a private row of another user: not in its store, its
//! outcomes or its rejections log.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use common::*;
use ferry_client::{ClientOptions, Database, StaticToken};
use ferry_core::{row_data, Clock, Schema, SystemClock, Table, Value};
use ferry_queue::{LocalDbOptions, QueueError};
use ferry_server::{SqliteSourceDb, SyncRules, SyncService};
use ferry_sqlite::SqliteStore;
use ferry_transport::{FaultConfig, SyncHandler, Transport};
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Action {
    /// Client writes a whole ticket (upsert).
    Put {
        client: usize,
        ticket: usize,
        title: u8,
        status: u8,
    },
    /// Client changes one column of a ticket it sees.
    Patch { client: usize, ticket: usize, status: u8 },
    /// Client deletes a ticket it sees.
    Delete { client: usize, ticket: usize },
    /// A write the server must reject (a column it does not know).
    Bad { client: usize },
    /// The client's network goes down or comes back.
    Toggle { client: usize },
    /// Let time pass.
    Pause { ms: u8 },
    /// The app disconnects and connects again.
    Reconnect { client: usize },
    /// Client writes a private note of its own user.
    Note { client: usize, note: usize },
    /// Client writes blindly (an upsert of an id it cannot see) to a note
    /// of another user.
    BlindNote { client: usize, note: usize },
}

/// Two devices per user: clients `2u` and `2u + 1` are user `u`'s.
const CLIENTS: usize = 4;
const NOTES: usize = 3;
/// Device clock offsets from real time, ms: one slow, one fast.
const CLOCK_OFFSETS_MS: [i64; CLIENTS] = [0, -4_000, 3_000, 0];
/// The client whose app version does not know the `description` column.
const OLD_SCHEMA_CLIENT: usize = 3;
const TICKETS: usize = 4;
const STATUSES: [&str; 3] = ["pending", "in_progress", "done"];

fn action() -> impl Strategy<Value = Action> {
    let c = 0..CLIENTS;
    let t = 0..TICKETS;
    prop_oneof![
        4 => (c.clone(), t.clone(), any::<u8>(), 0u8..3).prop_map(|(client, ticket, title, status)| Action::Put { client, ticket, title, status }),
        4 => (c.clone(), t.clone(), 0u8..3).prop_map(|(client, ticket, status)| Action::Patch { client, ticket, status }),
        1 => (c.clone(), t).prop_map(|(client, ticket)| Action::Delete { client, ticket }),
        1 => c.clone().prop_map(|client| Action::Bad { client }),
        2 => c.clone().prop_map(|client| Action::Toggle { client }),
        2 => (0u8..20).prop_map(|ms| Action::Pause { ms }),
        1 => c.clone().prop_map(|client| Action::Reconnect { client }),
        1 => (c.clone(), 0..NOTES).prop_map(|(client, note)| Action::Note { client, note }),
        1 => (c, 0..NOTES).prop_map(|(client, note)| Action::BlindNote { client, note }),
    ]
}

fn scenario() -> impl Strategy<Value = (u64, Vec<Action>)> {
    (any::<u64>(), proptest::collection::vec(action(), 5..40))
}

/// The strategy a case runs under, drawn from its seed.
fn strategy(seed: u64) -> (&'static str, Arc<dyn ferry_server::ConflictStrategy>) {
    use ferry_conflict::{Audited, DomainRules, LastWriteWins, Manual, PerColumn, RowLastWriteWins};
    match seed % 5 {
        0 => ("lww", Arc::new(LastWriteWins)),
        1 => ("row_lww", Arc::new(RowLastWriteWins)),
        2 => ("domain", Arc::new(DomainRules::ticket_status())),
        3 => (
            "manual",
            Arc::new(PerColumn::new(LastWriteWins).column("status", Manual)),
        ),
        _ => ("audited", Arc::new(Audited::new(LastWriteWins))),
    }
}

fn user(client: usize) -> String {
    format!("user{}", client / 2)
}

/// A device clock `offset_ms` off real time.
#[derive(Debug)]
struct OffsetClock {
    offset_ms: i64,
}

impl Clock for OffsetClock {
    fn now_ms(&self) -> u64 {
        SystemClock.now_ms().saturating_add_signed(self.offset_ms)
    }
}

/// The ticket-tracker rules plus a private table: each user's notes go to
/// a bucket of that user only, and only their owner writes them (so a
/// blind write to another user's note is answered `rejected`).
fn rules() -> SyncRules {
    let text = format!(
        "{}\n{}",
        include_str!("../../ferry-server/examples/ticket-tracker.toml"),
        r#"
[[tables]]
name = "notes"
columns = [{ name = "owner", type = "text" }, { name = "body", type = "text" }]

[[buckets]]
name = "my_notes"
parameters = ["sub"]
data = [{ table = "notes", where = { owner = "sub" } }]

[[permissions]]
table = "notes"
insert = "new.owner == auth.sub"
update = "old.owner == auth.sub and new.owner == auth.sub"
delete = "old.owner == auth.sub"
"#
    );
    SyncRules::from_toml(&text).expect("rules")
}

fn schema_of(client: usize, rules: &SyncRules) -> Schema {
    let mut schema = client_schema();
    let notes = rules.schema().table("notes").expect("notes").clone();
    let mut tables: Vec<Table> = schema.tables().cloned().collect();
    tables.push(notes);
    if client == OLD_SCHEMA_CLIENT {
        for t in tables.iter_mut().filter(|t| t.name == "tickets") {
            t.columns.retain(|c| c.name != "description");
        }
    }
    schema = Schema::new(tables).expect("client schema");
    schema
}

/// The server's source database.
#[derive(Clone, Copy, Debug)]
enum Source {
    Sqlite,
    Postgres,
}

async fn run(seed: u64, actions: Vec<Action>, source: Source) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().expect("tempdir");
    let (strategy_name, tickets_strategy) = strategy(seed);
    let rules = rules();
    // Scratch schemas live (and are dropped) with the run.
    let mut _scratch = None;
    let db: Arc<dyn ferry_server::SourceDb> = match source {
        Source::Sqlite => Arc::new(SqliteSourceDb::open_dir(&dir.path().join("server")).expect("source db")),
        Source::Postgres => {
            let s = ferry_postgres::scratch::ScratchSchemas::for_test();
            let db = ferry_postgres::PgSourceDb::connect(&s.options().create_tables(true)).expect("source db");
            _scratch = Some(s);
            Arc::new(db)
        }
    };
    let svc = Arc::new(
        SyncService::builder(db, rules.clone(), SECRET)
            .strategy("tickets", tickets_strategy)
            .build()
            .expect("service"),
    );
    let handler: Arc<dyn SyncHandler> = svc.clone();
    let mut clients = Vec::new();
    let mut nets = Vec::new();
    let mut outcomes = Vec::new();
    // Every device opened at once, with the library's own client ids.
    for (i, offset_ms) in CLOCK_OFFSETS_MS.into_iter().enumerate() {
        let cdir = dir.path().join(format!("client{i}"));
        std::fs::create_dir_all(&cdir).expect("client dir");
        let store = SqliteStore::open(cdir.join("client.db"), schema_of(i, &rules)).expect("client store");
        let options = ClientOptions {
            local: LocalDbOptions {
                clock: Arc::new(OffsetClock { offset_ms }),
                ..LocalDbOptions::default()
            },
            retry_initial_delay_ms: 5,
            retry_max_delay_ms: 50,
            jitter_seed: seed.wrapping_add(i as u64),
            upload_poll_interval_ms: 20,
            ..ClientOptions::default()
        };
        let db = Database::open(Arc::new(store), options).expect("open client");
        outcomes.push(db.subscribe_outcomes());
        nets.push(connect(
            &db,
            handler.clone(),
            FaultConfig::hostile(),
            seed ^ (i as u64 + 1),
            &user(i),
        ));
        clients.push(db);
    }
    let mut written: Vec<BTreeSet<u64>> = vec![BTreeSet::new(); CLIENTS];
    let mut ids: BTreeSet<String> = BTreeSet::new();
    for a in actions {
        let r: Result<(), QueueError> = match &a {
            Action::Put {
                client,
                ticket,
                title,
                status,
            } => {
                let id = format!("t{ticket}");
                ids.insert(id.clone());
                clients[*client].write(|tx| {
                    tx.put(
                        "tickets",
                        &id,
                        row_data([
                            ("title", Value::from(format!("title {title}"))),
                            ("status", Value::from(STATUSES[*status as usize])),
                            ("version", Value::from(i64::from(*title))),
                        ]),
                    )
                })
            }
            Action::Patch { client, ticket, status } => {
                let id = format!("t{ticket}");
                clients[*client].write(|tx| {
                    if tx.get("tickets", &id)?.is_some() {
                        tx.update(
                            "tickets",
                            &id,
                            row_data([("status", Value::from(STATUSES[*status as usize]))]),
                        )?;
                    }
                    Ok(())
                })
            }
            Action::Delete { client, ticket } => {
                let id = format!("t{ticket}");
                clients[*client].write(|tx| tx.delete("tickets", &id).map(drop))
            }
            Action::Bad { client } => {
                // The client knows a column the server does not: the server
                // rejects the write, the client rolls it back.
                ids.insert("bad".into());
                clients[*client].write(|tx| tx.put("tickets", "bad", row_data([("local_note", Value::from("x"))])))
            }
            Action::Toggle { client } => {
                nets[*client].set_offline(!nets[*client].is_offline());
                Ok(())
            }
            Action::Pause { ms } => {
                tokio::time::sleep(std::time::Duration::from_millis(u64::from(*ms))).await;
                Ok(())
            }
            Action::Reconnect { client } => {
                let db = &clients[*client];
                db.disconnect().await;
                let transport: Arc<dyn Transport> = Arc::new(nets[*client].clone());
                db.connect(transport, Arc::new(StaticToken(token(&user(*client)))));
                Ok(())
            }
            Action::Note { client, note } => {
                let owner = user(*client);
                clients[*client].write(|tx| {
                    tx.put(
                        "notes",
                        &format!("{owner}-n{note}"),
                        row_data([("owner", Value::from(owner.clone())), ("body", Value::from("secret"))]),
                    )
                })
            }
            Action::BlindNote { client, note } => {
                let victim = user((*client + 2) % CLIENTS);
                clients[*client].write(|tx| {
                    tx.put(
                        "notes",
                        &format!("{victim}-n{note}"),
                        row_data([("owner", Value::from(victim.clone())), ("body", Value::from("blind"))]),
                    )
                })
            }
        };
        r.map_err(|e| TestCaseError::fail(format!("local write failed: {e}")))?;
    }
    // Every seq the clients queued.
    for (i, db) in clients.iter().enumerate() {
        written[i] = (1..=db.local().last_seq()).collect();
    }
    // Back online; the hostile network keeps going, and the engine must
    // still settle.
    for net in &nets {
        net.set_offline(false);
    }
    for (i, db) in clients.iter().enumerate() {
        prop_assert!(
            wait_caught_up(db, &svc, 20_000).await,
            "client {i} did not catch up: status {:?}, pending {:?}",
            db.status(),
            db.local().pending_len()
        );
    }
    // A final round so every client has seen the others' last writes.
    for (i, db) in clients.iter().enumerate() {
        prop_assert!(
            wait_caught_up(db, &svc, 20_000).await,
            "client {i} did not catch up (2)"
        );
    }
    let ids: Vec<String> = ids.into_iter().collect();
    let server = server_tickets(&svc, &ids);
    for (i, db) in clients.iter().enumerate() {
        prop_assert_eq!(
            &client_tickets(db),
            &server,
            "client {} differs from the server under {}",
            i,
            strategy_name
        );
    }
    // Every queued write has exactly one durable outcome, and what the
    // broadcast delivered agrees with the store.
    for (i, rx) in outcomes.iter_mut().enumerate() {
        let stored = clients[i].outcomes_since(0, usize::MAX).expect("stored outcomes");
        let seqs: Vec<u64> = stored.iter().map(|o| o.outcome.seq).collect();
        let expected: Vec<u64> = written[i].iter().copied().collect();
        prop_assert_eq!(&seqs, &expected, "client {} stored outcomes", i);
        let by_seq: BTreeMap<u64, &ferry_client::UploadOutcome> = stored.iter().map(|o| (o.outcome.seq, o)).collect();
        while let Ok(o) = rx.try_recv() {
            let s = by_seq.get(&o.outcome.seq).copied();
            prop_assert!(
                s.is_some(),
                "client {i} heard an outcome for unknown seq {}",
                o.outcome.seq
            );
            prop_assert_eq!(s.map(|s| s.tx_id), Some(o.tx_id));
        }
        // No private row of another user anywhere on the device.
        let me = user(i);
        for (id, row) in clients[i].local().scan("notes").expect("notes") {
            prop_assert_eq!(
                row.get("owner").and_then(|v| v.as_text()),
                Some(me.as_str()),
                "client {} holds note {} of another user",
                i,
                id
            );
        }
        for o in &stored {
            if let ferry_protocol::Outcome::Merged { row: Some(row), .. } = &o.outcome.outcome {
                prop_assert!(
                    row.get("body") != Some(&Value::from("secret"))
                        || row.get("owner").and_then(|v| v.as_text()) == Some(me.as_str()),
                    "client {i} outcome leaks {row:?}"
                );
            }
        }
        for r in clients[i].rejections().expect("rejections") {
            if let ferry_core::CrudOp::Put { data, .. } = &r.entry.op {
                prop_assert!(
                    data.get("body") != Some(&Value::from("secret"))
                        || data.get("owner").and_then(|v| v.as_text()) == Some(me.as_str())
                );
            }
        }
    }
    for db in &clients {
        db.disconnect().await;
    }
    Ok(())
}

#[test]
fn clients_converge_under_faults() {
    ferry_core::testkit::check("clients_converge_under_faults", 12, scenario(), |(seed, actions)| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(run(seed, actions, Source::Sqlite))
    });
}

/// The same simulation with PostgreSQL as the source of truth (the
/// machine's, in throwaway schemas).
#[test]
fn clients_converge_under_faults_on_postgres() {
    ferry_core::testkit::check(
        "clients_converge_under_faults_on_postgres",
        6,
        scenario(),
        |(seed, actions)| {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(run(seed, actions, Source::Postgres))
        },
    );
}
