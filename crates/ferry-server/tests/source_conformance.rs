//! The `SourceDb` conformance suite on SQLite.

use std::sync::Arc;

use ferry_server::testkit::SourceBackend;
use ferry_server::{Result, SourceDb, SqliteSourceDb};

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

ferry_server::source_conformance_tests!(Sqlite);
