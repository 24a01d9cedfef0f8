//! An instance starting on a database that is in use: it must not wait
//! behind (or deadlock with) the writes other instances and the app are
//! making, and what it finds missing it still puts back.

use std::sync::mpsc;
use std::time::Duration;

use ferry_core::{ColumnType, Schema, Table};
use ferry_postgres::scratch::ScratchSchemas;
use ferry_postgres::{PgOptions, PgSourceDb};
use ferry_source::{CaptureKind, CapturedChange, SourceDb, SourceTx};

/// How long a start may take while another transaction holds its locks;
/// a start that waits for that transaction never ends before it does.
const START_DEADLINE_MS: u64 = 20_000;

fn schema() -> Schema {
    Schema::new([Table::new("items").column("name", ColumnType::Text)]).expect("schema")
}

fn start(options: &PgOptions) -> Result<PgSourceDb, ferry_source::SourceError> {
    let db = PgSourceDb::connect(options)?;
    db.migrate(&schema())?;
    Ok(db)
}

fn take(db: &PgSourceDb) -> Vec<CapturedChange> {
    let mut out = Vec::new();
    db.write(&mut |tx: &mut dyn SourceTx| {
        out = tx.take_captured(100)?;
        Ok(())
    })
    .expect("take captured");
    out
}

/// An app transaction left open on its own connection: it has written a
/// row of `items` (so it holds locks on the table and on Ferry's change
/// table, through the capture trigger) and commits when told.
fn open_app_transaction(s: &ScratchSchemas, sql: String) -> (mpsc::Sender<()>, std::thread::JoinHandle<()>) {
    let url = s.url.clone();
    let (written_tx, written_rx) = mpsc::channel();
    let (commit_tx, commit_rx) = mpsc::channel::<()>();
    let handle = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .expect("app connection");
            let driver = tokio::spawn(connection);
            client.batch_execute(&format!("BEGIN; {sql}")).await.expect("app write");
            written_tx.send(()).expect("tell written");
            let _ = tokio::task::spawn_blocking(move || commit_rx.recv()).await;
            client.batch_execute("COMMIT").await.expect("app commit");
            drop(client);
            let _ = driver.await;
        });
    });
    written_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the app transaction wrote");
    (commit_tx, handle)
}

#[test]
fn an_instance_starts_while_an_app_transaction_holds_its_tables() {
    let s = ScratchSchemas::for_test();
    s.execute(&format!(
        "CREATE TABLE \"{}\".items (id bigint PRIMARY KEY, name text)",
        s.app
    ))
    .expect("app table");
    let first = start(&s.options()).expect("first start");
    let (commit, app) = open_app_transaction(&s, format!("INSERT INTO \"{}\".items VALUES (1, 'one');", s.app));

    // A second instance starts (setup and migration) while the app's
    // transaction is open: nothing to change, so nothing to wait for.
    let (done_tx, done_rx) = mpsc::channel();
    let options = s.options();
    let starter = std::thread::spawn(move || {
        let _ = done_tx.send(start(&options).map(drop));
    });
    let started = done_rx.recv_timeout(Duration::from_millis(START_DEADLINE_MS));
    commit.send(()).expect("tell commit");
    app.join().expect("app thread");
    starter.join().expect("starter thread");
    match started {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!("the second instance did not start: {e}"),
        Err(_) => panic!("the second instance waited {START_DEADLINE_MS} ms behind an open app transaction"),
    }

    // The app's write is captured, once.
    let changes = take(&first);
    assert_eq!(changes.len(), 1, "{changes:?}");
    assert_eq!((changes[0].table.as_str(), changes[0].id.as_str()), ("items", "1"));
    assert_eq!(changes[0].kind, CaptureKind::Row);
}

/// The app's `items` table, and a first start on it.
fn started_once(s: &ScratchSchemas) {
    s.execute(&format!(
        "CREATE TABLE \"{}\".items (id bigint PRIMARY KEY, name text)",
        s.app
    ))
    .expect("app table");
    drop(start(&s.options()).expect("first start"));
}

/// Whether Ferry's schema has the index `name`.
fn has_index(s: &ScratchSchemas, name: &str) -> bool {
    let n = s
        .query(&format!(
            "SELECT count(*) FROM pg_indexes WHERE schemaname = '{}' AND indexname = '{name}'",
            s.ferry
        ))
        .expect("index query");
    n == vec![vec![Some("1".to_owned())]]
}

#[test]
fn a_start_puts_back_a_dropped_trigger_and_a_changed_setup() {
    let s = ScratchSchemas::for_test();
    let (a, f) = (&s.app, &s.ferry);
    started_once(&s);

    // Somebody dropped the truncate trigger and the change table's index
    // for truncates, and the setup on record is another Ferry's.
    s.execute(&format!(
        "DROP TRIGGER \"ferry_truncate_{f}\" ON \"{a}\".items;
         DROP INDEX \"{f}\".changes_truncated;
         UPDATE \"{f}\".meta SET value = 'another' WHERE key = 'setup_fingerprint';"
    ))
    .expect("damage");
    let db = start(&s.options()).expect("second start");
    assert!(has_index(&s, "changes_truncated"), "the index is made again");

    s.execute(&format!(
        "INSERT INTO \"{a}\".items VALUES (1, 'one'); TRUNCATE \"{a}\".items;"
    ))
    .expect("app writes");
    let kinds: Vec<bool> = take(&db)
        .iter()
        .map(|c| matches!(c.kind, CaptureKind::Truncate { .. }))
        .collect();
    assert_eq!(
        kinds,
        vec![false, true],
        "the insert and the truncate are both captured"
    );
}

#[test]
fn a_start_puts_back_an_index_dropped_by_hand_under_the_same_setup() {
    let s = ScratchSchemas::for_test();
    let f = &s.ferry;
    started_once(&s);

    // The setup on record is this Ferry's, but the op log's bucket index
    // (every stream's read) was dropped by hand.
    s.execute(&format!("DROP INDEX \"{f}\".oplog_bucket;")).expect("damage");
    drop(start(&s.options()).expect("second start"));
    assert!(has_index(&s, "oplog_bucket"), "the index is made again");
}
