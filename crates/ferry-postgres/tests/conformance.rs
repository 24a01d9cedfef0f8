//! The `SourceDb` conformance suite on PostgreSQL: each test in its own
//! pair of scratch schemas of the test database
//! (`FERRY_TEST_DATABASE_URL`, default the machine's PostgreSQL), dropped
//! afterwards.

use std::sync::Arc;

use ferry_postgres::scratch::ScratchSchemas;
use ferry_postgres::PgSourceDb;
use ferry_source::testkit::SourceBackend;
use ferry_source::{Result, SourceDb};

struct Postgres;

impl SourceBackend for Postgres {
    type Location = ScratchSchemas;

    fn fresh(&self) -> ScratchSchemas {
        ScratchSchemas::for_test()
    }

    fn open(&self, location: &ScratchSchemas) -> Result<Arc<dyn SourceDb>> {
        Ok(Arc::new(PgSourceDb::connect(&location.options().create_tables(true))?))
    }
}

ferry_source::source_conformance_tests!(Postgres);
