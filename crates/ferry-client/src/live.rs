//! Live queries over the visible state (synced rows with pending local
//! writes on top), kept up to date by the change observer of the local
//! database: local writes, applied checkpoints and rolled-back rejections
//! all flow in as row changes, one engine transaction per commit.

use std::collections::BTreeSet;
use std::sync::{Arc, Weak};

use ferry_query::{ChangeSet, Diff, Explain, Query, QueryEngine, QueryResult, SubscriptionId};
use parking_lot::Mutex;

use crate::{ClientError, Inner, RowChange};

/// The query engine of one database and the collections it has loaded.
#[derive(Default)]
pub(crate) struct LiveState {
    engine: QueryEngine,
    loaded: BTreeSet<String>,
}

/// Rows handed to the engine per change set while loading a collection.
const LOAD_CHUNK_ROWS: usize = 10_000;

impl LiveState {
    fn ensure_loaded(&mut self, inner: &Inner, query: &Query) -> Result<(), ClientError> {
        for table in query.collections() {
            if self.loaded.contains(table) {
                continue;
            }
            // Unknown tables are an error naming the table.
            inner
                .local
                .schema()
                .table(table)
                .map_err(ferry_queue::QueueError::from)?;
            self.engine.create_collection(table)?;
            let store = inner.local.store();
            let pending: BTreeSet<String> = store.scan_overlay(table)?.into_iter().map(|(id, _)| id).collect();
            let rows = store.scan_visible(table)?;
            for chunk in rows.chunks(LOAD_CHUNK_ROWS) {
                let mut cs = ChangeSet::new();
                for (id, data) in chunk {
                    cs = cs.upsert(table, id.clone(), data.clone(), pending.contains(id));
                }
                self.engine.apply(cs)?;
            }
            self.loaded.insert(table.to_owned());
        }
        Ok(())
    }

    /// Feed changed rows of loaded collections to the engine (subscribers'
    /// callbacks run inside). The changes carry their new visible rows:
    /// nothing is read from the store.
    pub(crate) fn on_change(&mut self, rows: &[RowChange]) -> Result<Vec<Diff>, ClientError> {
        let mut cs = ChangeSet::new();
        let mut any = false;
        for change in rows {
            if !self.loaded.contains(&change.table) {
                continue;
            }
            any = true;
            cs = match &change.row {
                Some(data) => cs.upsert(&change.table, change.id.clone(), data.clone(), change.pending),
                None => cs.delete(&change.table, change.id.clone()),
            };
        }
        if !any {
            return Ok(Vec::new());
        }
        Ok(self.engine.apply(cs)?)
    }
}

/// A live query: its subscriber callback gets a [`Diff`] after every commit
/// that changes its result. Dropping it ends the subscription.
pub struct LiveQuery {
    id: SubscriptionId,
    inner: Weak<Inner>,
}

impl std::fmt::Debug for LiveQuery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveQuery").field("id", &self.id).finish()
    }
}

impl LiveQuery {
    /// The current result.
    pub fn current(&self) -> Result<QueryResult, ClientError> {
        let inner = self
            .inner
            .upgrade()
            .ok_or_else(|| ClientError::Task("the database is closed".into()))?;
        let live = inner.live.lock();
        Ok(live.engine.current(self.id)?)
    }
}

impl Drop for LiveQuery {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.upgrade() {
            let _ = inner.live.lock().engine.unsubscribe(self.id);
        }
    }
}

impl crate::Database {
    /// Run `query` once over the visible state.
    pub fn query(&self, query: &Query) -> Result<QueryResult, ClientError> {
        let mut live = self.inner.live.lock();
        live.ensure_loaded(&self.inner, query)?;
        Ok(live.engine.query(query)?)
    }

    /// Describe how `query` runs: for each collection, which of the
    /// client schema's declared indexes (or the primary key, or a full
    /// scan) finds its rows and over which range, and the state each
    /// operator keeps. An error names an unknown table.
    pub fn explain(&self, query: &Query) -> Result<Explain, ClientError> {
        let schema = self.inner.local.schema();
        for table in query.collections() {
            schema.table(table).map_err(ferry_queue::QueueError::from)?;
        }
        let indexes = |table: &str| schema.table(table).map(|t| t.indexes.clone()).unwrap_or_default();
        Ok(query.explain(&indexes))
    }

    /// Start a live query: returns its handle and initial result; `on_diff`
    /// then gets one diff per commit that changes the result (local
    /// writes, applied checkpoints, rollbacks). Keep `on_diff` quick: it
    /// runs on the committing thread while live queries are locked, so it
    /// must not call back into this database (send the diff on a channel).
    pub fn live_query<F>(&self, query: &Query, on_diff: F) -> Result<(LiveQuery, QueryResult), ClientError>
    where
        F: FnMut(&Diff) + Send + 'static,
    {
        let mut live = self.inner.live.lock();
        live.ensure_loaded(&self.inner, query)?;
        let (id, result) = live.engine.subscribe_with(query, Box::new(on_diff))?;
        Ok((
            LiveQuery {
                id,
                inner: Arc::downgrade(&self.inner),
            },
            result,
        ))
    }
}

/// The live state behind a lock, as `Inner` holds it.
pub(crate) type SharedLive = Mutex<LiveState>;
