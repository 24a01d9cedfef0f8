//! Property test: several clients sync with the real sync service (SQLite
//! source of truth) through the in-memory transport with faults: lost data
//! lines, delayed, duplicated and reordered lines, broken streams, failed,
//! lost and repeated uploads, and offline periods, under each conflict
//! strategy for the tickets table (column and row last-write-wins, domain
//! rules, manual resolution, audit log). Whatever happens, at the end every
//! client's tickets equal the server's, and every write a client made got
//! an outcome (applied, merged, rejected with a reason, or needs review).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use common::*;
use ferry_core::{row_data, SystemClock, Value};
use ferry_queue::QueueError;
use ferry_transport::{FaultConfig, SyncHandler};
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
}

const CLIENTS: usize = 3;
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
        2 => c.prop_map(|client| Action::Toggle { client }),
        2 => (0u8..20).prop_map(|ms| Action::Pause { ms }),
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

async fn run(seed: u64, actions: Vec<Action>) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().expect("tempdir");
    let (strategy_name, tickets_strategy) = strategy(seed);
    let svc = service_with(&dir.path().join("server"), Some(tickets_strategy));
    let handler: Arc<dyn SyncHandler> = svc.clone();
    let mut clients = Vec::new();
    let mut nets = Vec::new();
    let mut outcomes = Vec::new();
    for i in 0..CLIENTS {
        let cdir = dir.path().join(format!("client{i}"));
        std::fs::create_dir_all(&cdir).expect("client dir");
        let db = client(&cdir, seed.wrapping_add(i as u64), Arc::new(SystemClock));
        outcomes.push(db.subscribe_outcomes());
        nets.push(connect(
            &db,
            handler.clone(),
            FaultConfig::hostile(),
            seed ^ (i as u64 + 1),
            &format!("user{i}"),
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
    // Every queued write got an outcome.
    for (i, rx) in outcomes.iter_mut().enumerate() {
        let mut seen: BTreeMap<u64, ferry_protocol::Outcome> = BTreeMap::new();
        while let Ok(o) = rx.try_recv() {
            seen.insert(o.outcome.seq, o.outcome.outcome);
        }
        for seq in &written[i] {
            prop_assert!(seen.contains_key(seq), "client {i} seq {seq} got no outcome");
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
        rt.block_on(run(seed, actions))
    });
}
