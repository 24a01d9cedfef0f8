//! Ferry: an offline-first sync engine.
//!
//! Apps keep their data in a local database, read and write it instantly,
//! online or not, and Ferry carries the changes to and from a server that
//! holds the source of truth. This facade re-exports the crates an app
//! needs, behind Cargo features:
//!
//! | feature | brings |
//! |---|---|
//! | `sqlite` (default) | `SqliteStore`, the SQLite backend |
//! | `query` (default) | `ferry::query`, the live query engine |
//! | `sled` | `SledStore`, the sled backend |
//! | `client` | `ferry::client::Database` with background sync, `ferry::protocol`, `ferry::transport` |
//! | `http` | `ferry::http`: the HTTP transport and server routes |
//! | `server` | `ferry::server`: the sync service library |
//! | `testkit` | the Store conformance suite and seeded property helpers |
//!
//! The core model ([`core`]), the storage contract ([`store`]) and local
//! writes with the upload queue ([`queue`]) are always there.
//!
//! ```
//! use std::sync::Arc;
//! use ferry::prelude::*;
//!
//! let schema = Schema::new([Table::new("tickets")
//!     .column("title", ColumnType::Text)
//!     .column("status", ColumnType::Text)])?;
//! let db = LocalDb::open(Arc::new(MemoryStore::new(schema)))?;
//! db.write(|tx| tx.insert("tickets", "t1", row_data([("title", "Printer on fire".into())])))?;
//! assert_eq!(db.upload_queue_len(), 1);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub use ferry_core as core;
pub use ferry_queue as queue;
pub use ferry_store as store;

#[cfg(feature = "client")]
pub use ferry_client as client;
#[cfg(feature = "http")]
pub use ferry_http as http;
#[cfg(any(feature = "client", feature = "server"))]
pub use ferry_protocol as protocol;
#[cfg(feature = "query")]
pub use ferry_query as query;
#[cfg(feature = "server")]
pub use ferry_server as server;
#[cfg(feature = "sled")]
pub use ferry_sled::{self as sled, SledStore};
#[cfg(feature = "sqlite")]
pub use ferry_sqlite::{self as sqlite, SqliteStore};
#[cfg(any(feature = "client", feature = "server", feature = "http"))]
pub use ferry_transport as transport;

/// The names most apps use.
pub mod prelude {
    pub use ferry_core::{
        row_data, Clock, ColumnType, CrudEntry, CrudOp, ErrorKind, Limits, Row, RowData, Schema, SystemClock, Table,
        Value,
    };
    pub use ferry_queue::{LocalDb, QueueError, Record, WriteTx};
    pub use ferry_store::{MemoryStore, Store};

    #[cfg(feature = "sled")]
    pub use ferry_sled::SledStore;
    #[cfg(feature = "sqlite")]
    pub use ferry_sqlite::SqliteStore;
}
