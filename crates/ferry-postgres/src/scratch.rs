//! Scratch schemas for tests: a pair of fresh schemas (the app's tables,
//! Ferry's own) in a test database, dropped with everything in them when
//! the value is dropped, so tests run in parallel and leave nothing
//! behind.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::layout::quote_ident;
use crate::PgOptions;

/// The database tests use: `FERRY_TEST_DATABASE_URL`, or the machine's
/// PostgreSQL at `postgres://postgres@127.0.0.1:5432/test`.
pub fn test_database_url() -> String {
    std::env::var("FERRY_TEST_DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// Two fresh schemas, dropped on drop.
#[derive(Debug)]
pub struct ScratchSchemas {
    /// The database URL.
    pub url: String,
    /// The app's schema.
    pub app: String,
    /// Ferry's schema.
    pub ferry: String,
}

static NEXT: AtomicU64 = AtomicU64::new(0);

/// Run SQL on a fresh connection, off any runtime the caller may be in.
fn run_sql(url: &str, sql: &str) -> Result<(), String> {
    query_sql(url, sql).map(|_| ())
}

/// Rows of text values (simple query protocol) of the SQL's statements.
type TextRows = Vec<Vec<Option<String>>>;

fn query_sql(url: &str, sql: &str) -> Result<TextRows, String> {
    let (url, sql) = (url.to_owned(), sql.to_owned());
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        rt.block_on(async {
            let connect = crate::tls::parse(&url).map_err(|e| e.to_string())?;
            let (client, driver) = connect
                .connector
                .open_driven(&connect.config)
                .await
                .map_err(|e| format!("cannot connect to postgresql at {url}: {e}"))?;
            let out = client
                .simple_query(&sql)
                .await
                .map(|messages| {
                    messages
                        .iter()
                        .filter_map(|m| match m {
                            tokio_postgres::SimpleQueryMessage::Row(r) => {
                                Some((0..r.len()).map(|i| r.get(i).map(str::to_owned)).collect())
                            }
                            _ => None,
                        })
                        .collect()
                })
                .map_err(|e| match e.as_db_error() {
                    Some(db) => format!("{sql}: {}", db.message()),
                    None => format!("{sql}: {e}"),
                });
            drop(client);
            let _ = driver.await;
            out
        })
    })
    .join()
    .map_err(|_| "the sql thread panicked".to_owned())?
}

impl ScratchSchemas {
    /// Make the schemas in the database at `url`. The error says where
    /// PostgreSQL was expected and why it did not answer.
    pub fn create(url: &str) -> Result<Self, String> {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let base = format!("t{}_{stamp:x}_{n}", std::process::id());
        let app = format!("{base}_app");
        let ferry = format!("{base}_ferry");
        run_sql(url, &format!("CREATE SCHEMA {};", quote_ident(&app)))?;
        Ok(ScratchSchemas {
            url: url.to_owned(),
            app,
            ferry,
        })
    }

    /// Make them in [`test_database_url`]'s database, or panic with a
    /// message saying PostgreSQL is needed and where it was looked for.
    pub fn for_test() -> Self {
        let url = test_database_url();
        match Self::create(&url) {
            Ok(s) => s,
            Err(e) => panic!("this test needs PostgreSQL at {url} (set FERRY_TEST_DATABASE_URL to use another): {e}"),
        }
    }

    /// Options for a source database on these schemas.
    pub fn options(&self) -> PgOptions {
        PgOptions::new(&self.url)
            .app_schema(&self.app)
            .ferry_schema(&self.ferry)
            .max_connections(8)
    }

    /// Run SQL in the database (for the app's side of a test).
    pub fn execute(&self, sql: &str) -> Result<(), String> {
        run_sql(&self.url, sql)
    }

    /// Run SQL and return the rows of its statements as text (`None`:
    /// NULL).
    pub fn query(&self, sql: &str) -> Result<Vec<Vec<Option<String>>>, String> {
        query_sql(&self.url, sql)
    }
}

impl Drop for ScratchSchemas {
    fn drop(&mut self) {
        let sql = format!(
            "DROP SCHEMA IF EXISTS {} CASCADE; DROP SCHEMA IF EXISTS {} CASCADE;",
            quote_ident(&self.app),
            quote_ident(&self.ferry)
        );
        if let Err(e) = run_sql(&self.url, &sql) {
            eprintln!("scratch schemas {} and {} not dropped: {e}", self.app, self.ferry);
        }
    }
}
