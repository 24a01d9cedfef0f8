//! Write transactions of several servers on one database run at once
//! where they touch different rows and clients, and still serialize
//! where they meet: each locks the rows and clients it reads and writes,
//! and holds the op-id counter only from its first op id to its commit.
//! Two handles on the same schemas stand for two servers.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use ferry_core::Value;
use ferry_postgres::scratch::ScratchSchemas;
use ferry_postgres::PgSourceDb;
use ferry_source::testkit::{append, test_schema, ticket};
use ferry_source::{OpRange, SourceDb};

fn open(s: &ScratchSchemas) -> Arc<dyn SourceDb> {
    let db = PgSourceDb::connect(&s.options().create_tables(true)).expect("connect");
    db.migrate(&test_schema()).expect("migrate");
    Arc::new(db)
}

fn version(db: &dyn SourceDb, id: &str) -> i64 {
    let t = test_schema().table("tickets").expect("tickets").clone();
    match db.get_row(&t, id).expect("get row").and_then(|r| r.data) {
        Some(d) => match d.get("version") {
            Some(Value::Integer(n)) => *n,
            _ => 0,
        },
        None => 0,
    }
}

/// Writers on two servers, each its own client, increment one shared row
/// (read, then write, with prefetch and deferred writes as uploads do) and
/// a row of their own: no increment is lost, every op id is handed out
/// once, and a reader never sees an op id appear below one it has seen.
#[test]
fn writers_of_two_servers_meet_on_a_row_and_lose_nothing() {
    let s = ScratchSchemas::for_test();
    let servers = [open(&s), open(&s)];
    let t = test_schema().table("tickets").expect("tickets").clone();
    const THREADS: usize = 4;
    const TRANSACTIONS: usize = 15;
    let running = AtomicUsize::new(THREADS);
    std::thread::scope(|scope| {
        for w in 0..THREADS {
            let (db, t, running) = (servers[w % 2].clone(), &t, &running);
            scope.spawn(move || {
                let client = format!("client-{w}");
                let own = format!("own-{w}");
                for i in 0..TRANSACTIONS {
                    db.write(&mut |tx| {
                        tx.defer_op_writes(i % 2 == 0);
                        let seq = tx.client(&client)?.map_or(0, |p| p.last_seq);
                        tx.prefetch_rows(t, &["shared", own.as_str()])?;
                        let mut rows = Vec::new();
                        for id in ["shared", own.as_str()] {
                            let n = match tx.read_row(t, id)?.and_then(|r| r.data) {
                                Some(d) => match d.get("version") {
                                    Some(Value::Integer(n)) => *n,
                                    _ => 0,
                                },
                                None => 0,
                            };
                            let row = ticket(&format!("writer {w} op {i}"), n + 1);
                            tx.write_row(t, id, &row, &BTreeMap::new())?;
                            tx.set_row_buckets("tickets", id, &BTreeSet::from(["all[]".to_owned()]))?;
                            rows.push((id, row));
                        }
                        for (id, row) in &rows {
                            append(tx, "all[]", id, Some(row))?;
                        }
                        tx.set_client(&client, "u", seq + 1)?;
                        Ok(())
                    })
                    .expect("write");
                }
                running.fetch_sub(1, Ordering::SeqCst);
            });
        }
        // A reader on the first server, as a stream reads.
        let db = servers[0].clone();
        let mut seen: BTreeSet<u64> = BTreeSet::new();
        let mut high = 0;
        loop {
            let finished = running.load(Ordering::SeqCst) == 0;
            let cp = db.checkpoint("reader", &["all[]".to_owned()]).expect("checkpoint");
            assert!(cp.last_op_id >= high, "the last op id went back");
            let ops = db
                .read_ops(&OpRange::between("all[]", 0, cp.last_op_id))
                .expect("read ops");
            for e in &ops {
                assert!(
                    e.op_id > high || seen.contains(&e.op_id),
                    "op {} appeared after the reader had seen op {high}",
                    e.op_id
                );
            }
            seen.extend(ops.iter().map(|e| e.op_id));
            assert_eq!(ops.len() as u64, cp.buckets[0].count, "the count is readable");
            high = high.max(cp.last_op_id);
            if finished {
                break;
            }
        }
        assert_eq!(seen.len(), THREADS * TRANSACTIONS * 2, "every op id once");
    });
    let total = (THREADS * TRANSACTIONS) as i64;
    assert_eq!(version(servers[1].as_ref(), "shared"), total, "no increment lost");
    for w in 0..THREADS {
        assert_eq!(version(servers[0].as_ref(), &format!("own-{w}")), TRANSACTIONS as i64);
        let p = servers[1].client_progress(&format!("client-{w}")).expect("progress");
        assert_eq!(p.map(|p| p.last_seq), Some(TRANSACTIONS as u64));
    }
}

/// Two servers writing for one client at once (a retried upload landing
/// on another server): its progress is read and moved by one at a time,
/// so each seq is taken once.
#[test]
fn one_client_on_two_servers_moves_one_seq_at_a_time() {
    let s = ScratchSchemas::for_test();
    let servers = [open(&s), open(&s)];
    const THREADS: usize = 4;
    const TRANSACTIONS: usize = 20;
    let taken = parking_lot::Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for w in 0..THREADS {
            let (db, taken) = (servers[w % 2].clone(), &taken);
            scope.spawn(move || {
                for _ in 0..TRANSACTIONS {
                    let mut seq = 0;
                    db.write(&mut |tx| {
                        seq = tx.client("one")?.map_or(0, |p| p.last_seq) + 1;
                        tx.set_client("one", "u", seq)?;
                        Ok(())
                    })
                    .expect("write");
                    taken.lock().push(seq);
                }
            });
        }
    });
    let mut taken = taken.into_inner();
    taken.sort_unstable();
    let want: Vec<u64> = (1..=(THREADS * TRANSACTIONS) as u64).collect();
    assert_eq!(taken, want, "each seq taken once");
}
