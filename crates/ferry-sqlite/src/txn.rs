//! Transactions begun and ended with cached statements.
//!
//! rusqlite's `Transaction` runs `BEGIN …` and `COMMIT` through
//! `execute_batch`, which parses the text again every time: for a local
//! write (one queue row) that was about a tenth of the store's
//! instructions (callgrind, `live_store_bench`). [`Txn`] prepares them once
//! per connection (its statement cache) and, like rusqlite's, rolls back
//! when dropped without a commit, or when the commit failed.

use std::ops::Deref;

use ferry_store::StoreResult;
use rusqlite::Connection;

use crate::sql_err;

/// An open transaction on a connection.
pub(crate) struct Txn<'c> {
    conn: &'c Connection,
}

impl<'c> Txn<'c> {
    /// `BEGIN IMMEDIATE`: a write transaction, taking the write lock now.
    pub(crate) fn immediate(conn: &'c Connection) -> StoreResult<Self> {
        run(conn, "BEGIN IMMEDIATE")?;
        Ok(Txn { conn })
    }

    /// `BEGIN`: reads see one snapshot until the end.
    pub(crate) fn deferred(conn: &'c Connection) -> StoreResult<Self> {
        run(conn, "BEGIN")?;
        Ok(Txn { conn })
    }

    /// `COMMIT`; when it fails the transaction is rolled back (on drop).
    pub(crate) fn commit(self) -> StoreResult<()> {
        run(self.conn, "COMMIT")
    }
}

impl Deref for Txn<'_> {
    type Target = Connection;

    fn deref(&self) -> &Connection {
        self.conn
    }
}

impl Drop for Txn<'_> {
    fn drop(&mut self) {
        if !self.conn.is_autocommit() {
            // Nothing to report to: the caller already has the error that
            // ended the transaction early, and a connection whose rollback
            // failed reports it on its next statement.
            let _ = run(self.conn, "ROLLBACK");
        }
    }
}

fn run(conn: &Connection, sql: &str) -> StoreResult<()> {
    conn.prepare_cached(sql)
        .and_then(|mut s| s.execute([]))
        .map(|_| ())
        .map_err(sql_err)
}
