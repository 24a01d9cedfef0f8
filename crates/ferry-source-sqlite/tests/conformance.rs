//! The `SourceDb` conformance suite on SQLite.

use std::sync::Arc;

use ferry_source::testkit::SourceBackend;
use ferry_source::{Result, SourceDb};
use ferry_source_sqlite::SqliteSourceDb;

struct Sqlite;

impl SourceBackend for Sqlite {
    type Location = tempfile::TempDir;

    fn fresh(&self) -> tempfile::TempDir {
        tempfile::tempdir().expect("temp dir")
    }

    fn open(&self, location: &tempfile::TempDir) -> Result<Arc<dyn SourceDb>> {
        Ok(Arc::new(SqliteSourceDb::open_dir(location.path())?))
    }
}

ferry_source::source_conformance_tests!(Sqlite);
