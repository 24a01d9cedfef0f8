//! Write processing throughput per conflict strategy: batches of 100
//! single-row updates to existing rows through `SyncService::upload`
//! (in process, SQLite source database), and the CRDT path's cost against
//! applying the same automerge changes directly with automerge.

use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use ferry_conflict::crdt;
use ferry_core::{CrudEntry, CrudOp, HlcTimestamp, Value};
use ferry_protocol::{UploadRequest, UploadTransaction};
use ferry_server::{
    Audited, AuthUser, ConflictStrategy, Crdt, DomainRules, LastWriteWins, Manual, RowLastWriteWins, SqliteSourceDb,
    SyncRules, SyncService, TICKET_TRACKER_RULES,
};

const BATCH: usize = 100;
const DOCS: &str = r#"
[[tables]]
name = "docs"
columns = [{ name = "body", type = "blob" }]
[[buckets]]
name = "docs"
data = [{ table = "docs" }]
[[permissions]]
table = "docs"
insert = "true"
update = "true"
"#;

struct Bench {
    _dir: tempfile::TempDir,
    svc: SyncService,
    user: AuthUser,
    seq: u64,
}

fn service(table: &str, strategy: Arc<dyn ConflictStrategy>) -> Bench {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = SqliteSourceDb::open_dir(dir.path()).expect("db");
    let rules = SyncRules::from_toml(&format!("{TICKET_TRACKER_RULES}\n{DOCS}")).expect("rules");
    let svc = SyncService::builder(Arc::new(db), rules, "bench-secret")
        .strategy(table, strategy)
        .build()
        .expect("build");
    let token = ferry_server::mint_token("bench-secret", "u1", 3600, &serde_json::Map::new());
    let user = svc.authenticate(&token).expect("auth");
    Bench {
        _dir: dir,
        svc,
        user,
        seq: 0,
    }
}

fn entry(seq: u64, op: CrudOp, base: Option<(&str, Value)>) -> CrudEntry {
    CrudEntry {
        seq,
        tx_id: seq,
        op,
        previous: base.map(|(k, v)| [(k.to_owned(), v)].into_iter().collect()),
        metadata: None,
        hlc: Some(HlcTimestamp {
            wall_ms: 1_000_000 + seq,
            counter: 0,
            node: "c1".into(),
        }),
    }
}

impl Bench {
    fn upload(&mut self, rt: &tokio::runtime::Runtime, ops: Vec<(CrudOp, Option<(&str, Value)>)>) {
        let ops = ops
            .into_iter()
            .map(|(op, base)| {
                self.seq += 1;
                entry(self.seq, op, base)
            })
            .collect();
        let req = UploadRequest {
            client_id: "c1".into(),
            transactions: vec![UploadTransaction { tx_id: self.seq, ops }],
        };
        rt.block_on(self.svc.upload(&self.user, req)).expect("upload");
    }
}

fn ticket_patch(i: usize, title: String) -> CrudOp {
    CrudOp::Patch {
        table: "tickets".into(),
        id: format!("t{i}"),
        data: [("title".to_owned(), Value::Text(title))].into_iter().collect(),
    }
}

fn strategies(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let mut g = c.benchmark_group("upload_100_updates");
    g.throughput(Throughput::Elements(BATCH as u64))
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    let table_strategies: Vec<(&str, Arc<dyn ConflictStrategy>)> = vec![
        ("lww", Arc::new(LastWriteWins)),
        ("row_lww", Arc::new(RowLastWriteWins)),
        ("domain", Arc::new(DomainRules::ticket_status())),
        ("manual", Arc::new(Manual)),
        ("audited_lww", Arc::new(Audited::new(LastWriteWins))),
    ];
    for (name, s) in table_strategies {
        let mut b = service("tickets", s);
        let creates = (0..BATCH)
            .map(|i| {
                let data = [
                    ("title".to_owned(), Value::from("v0")),
                    ("status".to_owned(), "pending".into()),
                ];
                let op = CrudOp::Put {
                    table: "tickets".into(),
                    id: format!("t{i}"),
                    data: data.into_iter().collect(),
                };
                (op, None)
            })
            .collect();
        b.upload(&rt, creates);
        let mut round = 0u64;
        g.bench_function(name, |bench| {
            bench.iter(|| {
                // Each op's base is the stored title, so manual applies.
                let prev = format!("v{round}");
                round += 1;
                let next = format!("v{round}");
                let ops = (0..BATCH)
                    .map(|i| {
                        (
                            ticket_patch(i, next.clone()),
                            Some(("title", Value::from(prev.as_str()))),
                        )
                    })
                    .collect();
                b.upload(&rt, ops);
            })
        });
    }
    // CRDT: every op is a client's document with one new edit.
    let mut b = service("docs", Arc::new(Crdt::new(["body"])));
    let base = crdt::new_text_doc("the quick brown fox jumps over the lazy dog");
    let creates = (0..BATCH)
        .map(|i| {
            let op = CrudOp::Put {
                table: "docs".into(),
                id: format!("d{i}"),
                data: [("body".to_owned(), Value::Blob(base.clone()))].into_iter().collect(),
            };
            (op, None)
        })
        .collect();
    b.upload(&rt, creates);
    let mut docs: Vec<Vec<u8>> = vec![base.clone(); BATCH];
    g.bench_function("crdt", |bench| {
        bench.iter_batched(
            || {
                for d in docs.iter_mut() {
                    *d = crdt::edit_text(d, "c1", |t| {
                        t.insert(0, "x");
                    })
                    .expect("edit");
                }
                docs.clone()
            },
            |edited| {
                let ops = edited
                    .into_iter()
                    .enumerate()
                    .map(|(i, doc)| {
                        let op = CrudOp::Patch {
                            table: "docs".into(),
                            id: format!("d{i}"),
                            data: [("body".to_owned(), Value::Blob(doc))].into_iter().collect(),
                        };
                        (op, None)
                    })
                    .collect();
                b.upload(&rt, ops);
            },
            BatchSize::LargeInput,
        )
    });
    // The same work done directly: load the stored document, merge the
    // client's, save (what the CRDT strategy does per op, minus the
    // database, validation and op log).
    let mut stored: Vec<Vec<u8>> = vec![base.clone(); BATCH];
    let mut client: Vec<Vec<u8>> = vec![base; BATCH];
    g.bench_function("crdt_direct_automerge", |bench| {
        bench.iter_batched(
            || {
                for d in client.iter_mut() {
                    *d = crdt::edit_text(d, "c1", |t| {
                        t.insert(0, "x");
                    })
                    .expect("edit");
                }
                client.clone()
            },
            |edited| {
                for (s, inc) in stored.iter_mut().zip(&edited) {
                    let mut doc = automerge::AutoCommit::load(s).expect("load");
                    doc.load_incremental(inc).expect("merge");
                    *s = doc.save();
                }
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

criterion_group!(benches, strategies);
criterion_main!(benches);
