//! The embedded default source database: [`SqliteSourceDb`] from
//! `ferry-source-sqlite`.

pub use ferry_source_sqlite::SqliteSourceDb;
