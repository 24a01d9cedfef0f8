//! Live queries over the visible state (synced rows with pending local
//! writes on top), kept up to date by the change observer of the local
//! database: local writes, applied checkpoints and rolled-back rejections
//! all flow in as row changes, one engine transaction per commit.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::ops::Bound;
use std::sync::{Arc, Weak};

use ferry_core::{codec, Index, RowData, Value};
use ferry_query::{
    ChangeSet, Diff, DiffCallback, Explain, IndexScan, Query, QueryEngine, QueryResult, RowRef, SubscriptionId,
};
use ferry_queue::LocalDb;
use parking_lot::Mutex;

use crate::{ClientError, Inner, RowChange};

/// The query engine of one database and the collections it has loaded,
/// and the live queries served from the store through an index.
#[derive(Default)]
pub(crate) struct LiveState {
    engine: QueryEngine,
    loaded: BTreeSet<String>,
    windows: BTreeMap<u64, IndexWindow>,
    next_window: u64,
}

impl LiveState {
    /// Whether any live query takes row changes.
    pub(crate) fn wants_changes(&self) -> bool {
        !self.loaded.is_empty() || !self.windows.is_empty()
    }
}

/// Which live query a handle names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LiveId {
    /// A query of the shared engine (whole collections in memory).
    Engine(SubscriptionId),
    /// A store-backed index window.
    Window(u64),
}

/// A live query served from the store through an index range whose range
/// is its filter and whose order is its order: it keeps only the rows of
/// the range up to an edge (at least `offset + limit` plus a margin, whole
/// ties included), in an engine of its own, and reads only those from the
/// store (`LocalDb::scan_index_limited`, from the end of the range
/// the order starts at). A change to a row is kept when the row is in
/// range and before the edge; when rows leave and fewer than
/// `offset + limit` are kept, the rows after the edge are read (as many as
/// the window lacks, limited), and when the kept rows grow past twice the
/// target the window drops the rows past the target in memory (no read).
/// Every kept row is in range and before the edge, and every visible row
/// in range before the edge is kept.
struct IndexWindow {
    table: String,
    index: Index,
    lower: Bound<Vec<Value>>,
    upper: Bound<Vec<Value>>,
    /// Encoded key range of the scan.
    lo: Option<Vec<u8>>,
    hi: Option<Vec<u8>>,
    /// Descending order: the range is read from its end, and positions
    /// are the indexed values only (ties are kept whole, since the query
    /// breaks them by ascending id).
    reverse: bool,
    /// `offset + limit`: the rows the result needs.
    need_rows: usize,
    /// Rows read per (re)load.
    keep_rows: usize,
    /// The last kept row in scan order; `None` when the whole range is
    /// kept.
    edge: Option<Edge>,
    /// The kept rows' ids, each with the row's key in the index (so the
    /// window orders and trims its rows without reading them back).
    kept: HashMap<String, Vec<u8>>,
    engine: QueryEngine,
    sub: SubscriptionId,
}

/// Where an index window's kept rows end.
struct Edge {
    /// The last kept row's position (see `IndexWindow::position`).
    pos: Vec<u8>,
    /// Its indexed values: the bound the rows after it are read from.
    values: Vec<Value>,
}

/// Rows read from the store, with whether each is pending.
type WindowRows = Vec<(String, RowData, bool)>;

impl IndexWindow {
    fn new(table: &str, index: Index, scan: &IndexScan, query: &Query, rows: usize) -> Result<Self, ClientError> {
        let (lower, upper) = scan.bounds();
        let (lo, hi) = codec::index_key_range(&lower, &upper);
        let mut engine = QueryEngine::new();
        engine.create_collection(table)?;
        let explain = query.explain(&|_| vec![index.clone()]);
        let need_rows = match explain.operators.last() {
            Some(ferry_query::Operator::Window { offset, limit, .. }) => offset.saturating_add(limit.unwrap_or(0)),
            _ => rows,
        };
        Ok(IndexWindow {
            table: table.to_owned(),
            index,
            lower,
            upper,
            lo,
            hi,
            reverse: scan.reverse,
            need_rows,
            keep_rows: rows.max(1),
            edge: None,
            kept: HashMap::new(),
            engine,
            sub: SubscriptionId(0),
        })
    }

    /// A row's key in the window's index.
    fn key(&self, id: &str, data: &RowData) -> Vec<u8> {
        ferry_store::index_key(&self.index, id, data)
    }

    /// The row's index key when the row is in range and before the edge
    /// (one encoding for both), `None` otherwise.
    fn key_if_kept(&self, id: &str, data: &RowData) -> Option<Vec<u8>> {
        let key = self.key(id, data);
        let in_range = self.lo.as_deref().is_none_or(|l| key.as_slice() >= l)
            && self.hi.as_deref().is_none_or(|h| key.as_slice() < h);
        let kept = in_range
            && match &self.edge {
                None => true,
                Some(edge) => !self.is_after(self.position_in_key(&key, id), &edge.pos),
            };
        kept.then_some(key)
    }

    /// [`IndexWindow::position`] taken from the row's index key, which is
    /// the encoded indexed values followed by the id's bytes
    /// (`codec::encode_index_key`).
    fn position_in_key<'k>(&self, key: &'k [u8], id: &str) -> &'k [u8] {
        if self.reverse {
            &key[..key.len().saturating_sub(id.len())]
        } else {
            key
        }
    }

    fn values(&self, data: &RowData) -> Vec<Value> {
        self.index
            .columns
            .iter()
            .map(|c| data.get(c).cloned().unwrap_or(Value::Null))
            .collect()
    }

    fn position(&self, id: &str, data: &RowData) -> Vec<u8> {
        if self.reverse {
            codec::encode_key_prefix(&self.values(data))
        } else {
            ferry_store::index_key(&self.index, id, data)
        }
    }

    fn edge_of(&self, id: &str, data: &RowData) -> Edge {
        Edge {
            pos: self.position(id, data),
            values: self.values(data),
        }
    }

    /// Whether a position comes after another in scan order.
    fn is_after(&self, pos: &[u8], other: &[u8]) -> bool {
        if self.reverse {
            pos < other
        } else {
            pos > other
        }
    }

    /// Read, in scan order, the first `n` (at least one) visible rows of a
    /// range that come after the position `after` (all when `None`), then
    /// the rest of the last one's ties; and whether they are all the rows
    /// left there. Reads `n + 1` rows from the store, more only when rows
    /// at or before `after`, or ties, fill them.
    fn read(
        &self,
        local: &LocalDb,
        lower: Bound<Vec<Value>>,
        upper: Bound<Vec<Value>>,
        after: Option<&[u8]>,
        n: usize,
    ) -> Result<(Vec<(String, RowData)>, bool), ClientError> {
        let n = n.max(1);
        let mut limit = n.saturating_add(1);
        loop {
            let rows = local.scan_index_limited(
                &self.table,
                &self.index.name,
                lower.clone(),
                upper.clone(),
                self.reverse,
                limit,
            )?;
            let complete = rows.len() < limit || limit == usize::MAX;
            let rows: Vec<(Vec<u8>, String, RowData)> = rows
                .into_iter()
                .map(|(id, data)| (self.position(&id, &data), id, data))
                .filter(|(pos, _, _)| after.is_none_or(|a| self.is_after(pos, a)))
                .collect();
            // Enough to cut: a row past the ties of the n-th one.
            let cut = rows
                .get(n - 1)
                .is_some_and(|(nth, _, _)| rows.last().is_some_and(|(last, _, _)| last != nth));
            if complete || cut {
                let mut out = Vec::with_capacity(n);
                let mut complete = complete;
                let mut edge: Option<Vec<u8>> = None;
                for (i, (pos, id, data)) in rows.into_iter().enumerate() {
                    if i >= n && edge.as_ref() != Some(&pos) {
                        complete = false;
                        break;
                    }
                    if i + 1 == n {
                        edge = Some(pos);
                    }
                    out.push((id, data));
                }
                return Ok((out, complete));
            }
            limit = limit.saturating_mul(2);
        }
    }

    /// The rows read, with whether each is pending.
    fn with_pending(&self, local: &LocalDb, rows: Vec<(String, RowData)>) -> Result<WindowRows, ClientError> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let pending = local.pending_among(&self.table, rows.iter().map(|(id, _)| id.as_str()))?;
        Ok(rows
            .into_iter()
            .zip(pending)
            .map(|((id, data), p)| (id, data, p))
            .collect())
    }

    /// Read the window from the store: its first `keep_rows` rows in scan
    /// order, then the rest of the last one's ties (setting the edge).
    fn load(&mut self, local: &LocalDb) -> Result<WindowRows, ClientError> {
        let (rows, complete) = self.read(local, self.lower.clone(), self.upper.clone(), None, self.keep_rows)?;
        self.edge = match rows.last() {
            Some((id, data)) if !complete => Some(self.edge_of(id, data)),
            _ => None,
        };
        self.with_pending(local, rows)
    }

    /// Read the rows after the edge the window lacks (moving the edge),
    /// leaving out rows already kept.
    fn refill(&mut self, local: &LocalDb) -> Result<WindowRows, ClientError> {
        let Some(edge) = &self.edge else {
            return Ok(Vec::new());
        };
        // Rows after the edge have indexed values at or past its values
        // (strictly past them when ties are kept whole).
        let (lower, upper) = if self.reverse {
            (self.lower.clone(), Bound::Excluded(edge.values.clone()))
        } else {
            (Bound::Included(edge.values.clone()), self.upper.clone())
        };
        let n = self.keep_rows.saturating_sub(self.kept.len());
        let (mut rows, complete) = self.read(local, lower, upper, Some(&edge.pos), n)?;
        self.edge = match rows.last() {
            Some((id, data)) if !complete => Some(self.edge_of(id, data)),
            _ => None,
        };
        rows.retain(|(id, _)| !self.kept.contains_key(id));
        self.with_pending(local, rows)
    }

    fn start(&mut self, local: &LocalDb, query: &Query, callback: DiffCallback) -> Result<QueryResult, ClientError> {
        let rows = self.load(local)?;
        for (id, data, _) in &rows {
            self.kept.insert(id.clone(), self.key(id, data));
        }
        let refs: Vec<RowRef<'_>> = rows
            .iter()
            .map(|(id, data, pending)| RowRef::Upsert {
                id,
                data,
                pending: *pending,
            })
            .collect();
        self.engine.apply_rows(&self.table, &refs)?;
        let (sub, result) = self.engine.subscribe_with(query, callback)?;
        self.sub = sub;
        Ok(result)
    }

    /// Take a commit's changes: one engine transaction, one diff. The
    /// engine takes the commit's rows borrowed (it copies their values).
    fn on_change(&mut self, local: &LocalDb, rows: &[RowChange]) -> Result<(), ClientError> {
        // Rows read or dropped below, which the transaction borrows too.
        let read: WindowRows;
        let dropped: Vec<String>;
        let gone: Vec<String>;
        let mut refs: Vec<RowRef<'_>> = Vec::new();
        let mut any = false;
        for change in rows.iter().filter(|c| c.table == self.table) {
            any = true;
            let kept = change
                .row
                .as_ref()
                .and_then(|data| self.key_if_kept(&change.id, data).map(|key| (data, key)));
            match kept {
                Some((data, key)) => {
                    match self.kept.get_mut(change.id.as_str()) {
                        Some(k) => *k = key,
                        None => {
                            self.kept.insert(change.id.clone(), key);
                        }
                    }
                    refs.push(RowRef::Upsert {
                        id: &change.id,
                        data,
                        pending: change.pending,
                    });
                }
                None => {
                    if self.kept.remove(change.id.as_str()).is_some() {
                        refs.push(RowRef::Delete { id: &change.id });
                    }
                }
            }
        }
        if !any {
            return Ok(());
        }
        let short = self.edge.is_some() && self.kept.len() < self.need_rows;
        let grown = self.kept.len() > self.keep_rows.saturating_mul(2);
        if short {
            // The store already holds this commit: the rows read are the
            // rows after it, applied in the same transaction.
            read = self.refill(local)?;
            for (id, data, pending) in &read {
                self.kept.insert(id.clone(), self.key(id, data));
                refs.push(RowRef::Upsert {
                    id,
                    data,
                    pending: *pending,
                });
            }
        } else if grown {
            // The rows past the target go: the edge's row is read from
            // the engine, or from this commit when it changed it.
            let changed: HashMap<&str, &RowData> = rows
                .iter()
                .filter(|c| c.table == self.table)
                .filter_map(|c| c.row.as_ref().map(|data| (c.id.as_str(), data)))
                .collect();
            if let Some(ids) = self.trim(&changed)? {
                dropped = ids;
                refs.extend(dropped.iter().map(|id| RowRef::Delete { id }));
                self.engine.apply_rows(&self.table, &refs)?;
                return Ok(());
            }
            // A kept row the engine lacks (never, while the window keeps
            // its invariant): the window is read again. The store already
            // holds this commit: the rows read are the rows after it,
            // applied in the same transaction.
            read = self.load(local)?;
            let now: HashSet<&str> = read.iter().map(|(id, _, _)| id.as_str()).collect();
            gone = self
                .kept
                .keys()
                .filter(|id| !now.contains(id.as_str()))
                .cloned()
                .collect();
            refs.extend(gone.iter().map(|id| RowRef::Delete { id }));
            for (id, data, pending) in &read {
                if !self.kept.contains_key(id) {
                    refs.push(RowRef::Upsert {
                        id,
                        data,
                        pending: *pending,
                    });
                }
            }
            let kept = read
                .iter()
                .map(|(id, data, _)| (id.clone(), self.key(id, data)))
                .collect();
            self.kept = kept;
        }
        self.engine.apply_rows(&self.table, &refs)?;
        Ok(())
    }

    /// Keep the first `keep_rows` kept rows in scan order, and the rest of
    /// the last one's ties; drop the others and move the edge to the last
    /// one kept, whose data is `changed`'s (this commit's) or the
    /// engine's; `None` when neither has it. Returns the ids dropped.
    fn trim(&mut self, changed: &HashMap<&str, &RowData>) -> Result<Option<Vec<String>>, ClientError> {
        let mut rows: Vec<(&[u8], &String)> = self
            .kept
            .iter()
            .map(|(id, key)| (self.position_in_key(key, id), id))
            .collect();
        if self.reverse {
            rows.sort_unstable_by(|a, b| b.0.cmp(a.0));
        } else {
            rows.sort_unstable_by(|a, b| a.0.cmp(b.0));
        }
        let Some(last) = rows.get(self.keep_rows.saturating_sub(1)).map(|r| r.0) else {
            return Ok(Some(Vec::new()));
        };
        let cut = self.keep_rows + rows[self.keep_rows..].iter().take_while(|r| r.0 == last).count();
        if cut == rows.len() {
            return Ok(Some(Vec::new()));
        }
        // Ties share their position and indexed values: any of them is the
        // edge.
        let edge_id = rows[cut - 1].1;
        let edge = match changed.get(edge_id.as_str()) {
            Some(data) => self.edge_of(edge_id, data),
            None => match self.engine.row(&self.table, edge_id)? {
                Some(data) => self.edge_of(edge_id, &data),
                None => return Ok(None),
            },
        };
        let dropped: Vec<String> = rows[cut..].iter().map(|(_, id)| (*id).clone()).collect();
        for id in &dropped {
            self.kept.remove(id);
        }
        self.edge = Some(edge);
        Ok(Some(dropped))
    }

    /// Bytes of what the window keeps: its rows (ids and encoded data, in
    /// its engine), the set of their ids and its edge (not counting the
    /// ids' index keys, a few bytes each).
    fn state_bytes(&self) -> Result<usize, ClientError> {
        let rows = self.engine.collection_bytes(&self.table)?;
        let ids: usize = self.kept.keys().map(String::len).sum();
        let edge = self
            .edge
            .as_ref()
            .map_or(0, |e| e.pos.len() + codec::encode_key_prefix(&e.values).len());
        Ok(rows + ids + edge)
    }
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
            let pending = inner.local.pending_ids(table)?;
            let rows = inner.local.scan(table)?;
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

    /// Feed changed rows to the live queries (subscribers' callbacks run
    /// inside). The changes carry their new visible rows: nothing is read
    /// from the store, except by an index window refilling its rows.
    pub(crate) fn on_change(&mut self, local: &LocalDb, rows: &[RowChange]) -> Result<Vec<Diff>, ClientError> {
        for window in self.windows.values_mut() {
            if let Err(e) = window.on_change(local, rows) {
                tracing::error!(error = %e, table = %window.table, "an index window could not take a change");
            }
        }
        self.on_change_engine(rows)
    }

    fn on_change_engine(&mut self, rows: &[RowChange]) -> Result<Vec<Diff>, ClientError> {
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
    id: LiveId,
    inner: Weak<Inner>,
    /// The collections the query reads.
    collections: Vec<String>,
}

impl std::fmt::Debug for LiveQuery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveQuery").field("id", &self.id).finish()
    }
}

std::thread_local! {
    /// The databases whose live query callbacks run on this thread now
    /// (they run with its live queries locked).
    pub(crate) static CALLING_BACK: ferry_core::inside::Marks = ferry_core::inside::Marks::default();
}

impl Inner {
    /// The live queries, locked; [`ClientError::Reentrant`] (naming
    /// `what`) from inside one of their callbacks, which hold the lock.
    pub(crate) fn lock_live(&self, what: &str) -> Result<parking_lot::MutexGuard<'_, LiveState>, ClientError> {
        if ferry_core::inside::is_inside(&CALLING_BACK, self) {
            return Err(ClientError::Reentrant(what.to_owned()));
        }
        Ok(self.live.lock())
    }
}

impl LiveQuery {
    /// The current result.
    pub fn current(&self) -> Result<QueryResult, ClientError> {
        let inner = self
            .inner
            .upgrade()
            .ok_or_else(|| ClientError::Task("the database is closed".into()))?;
        let live = inner.lock_live("LiveQuery::current")?;
        match self.id {
            LiveId::Engine(id) => Ok(live.engine.current(id)?),
            LiveId::Window(n) => match live.windows.get(&n) {
                Some(w) => Ok(w.engine.current(w.sub)?),
                None => Err(ClientError::Task(format!("live query {n} is gone"))),
            },
        }
    }

    /// Bytes of the rows this live query keeps in memory: each row's id
    /// plus its data in the storage encoding (`ferry_core::codec::encode_row`),
    /// not counting allocator overhead. A query served by an index window
    /// keeps only the window's rows (plus their ids and its edge), so this
    /// does not grow with the table; any other query reads whole
    /// collections, shared with the other live queries over them, and
    /// reports their size.
    pub fn state_bytes(&self) -> Result<usize, ClientError> {
        let inner = self
            .inner
            .upgrade()
            .ok_or_else(|| ClientError::Task("the database is closed".into()))?;
        let live = inner.lock_live("LiveQuery::state_bytes")?;
        match self.id {
            LiveId::Engine(_) => {
                let mut total = 0;
                for table in &self.collections {
                    total += live.engine.collection_bytes(table)?;
                }
                Ok(total)
            }
            LiveId::Window(n) => match live.windows.get(&n) {
                Some(w) => w.state_bytes(),
                None => Err(ClientError::Task(format!("live query {n} is gone"))),
            },
        }
    }
}

impl LiveState {
    /// End a live query.
    pub(crate) fn remove(&mut self, id: LiveId) {
        match id {
            LiveId::Engine(id) => {
                let _ = self.engine.unsubscribe(id);
            }
            LiveId::Window(n) => {
                self.windows.remove(&n);
            }
        }
    }
}

impl Drop for LiveQuery {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.upgrade() {
            // Dropped inside a write of this database (a callback, which
            // runs with live queries locked): ended once the callbacks
            // are done, not waiting for a lock this thread holds.
            if inner.local.writing_on_this_thread() {
                inner.live_dropped.lock().push(self.id);
                return;
            }
            inner.live.lock().remove(self.id);
        }
    }
}

impl crate::Database {
    /// Run `query` once over the visible state.
    pub fn query(&self, query: &Query) -> Result<QueryResult, ClientError> {
        let mut live = self.inner.lock_live("Database::query")?;
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
    /// must not write to this database or start a live query (send the
    /// diff on a channel): a write from it is refused
    /// ([`ferry_queue::QueueError::Reentrant`]), and a live query dropped
    /// in it ends once the callbacks are done. It may read the status and
    /// the queue's counters (`status`, `LocalDb::pending_len`, `last_seq`,
    /// `completed_through`), which show the commit it is called for.
    pub fn live_query<F>(&self, query: &Query, on_diff: F) -> Result<(LiveQuery, QueryResult), ClientError>
    where
        F: FnMut(&Diff) + Send + 'static,
    {
        let explain = self.explain(query)?;
        let mut live = self.inner.lock_live("Database::live_query")?;
        let window_rows = match explain.operators.first() {
            Some(ferry_query::Operator::IndexWindow { rows, .. }) => Some(*rows),
            _ => None,
        };
        if let (Some(scan), Some(rows)) = (explain.index_window(), window_rows) {
            let table = query.collections().first().copied().unwrap_or_default().to_owned();
            let index = self
                .inner
                .local
                .schema()
                .table(&table)
                .map_err(ferry_queue::QueueError::from)?
                .index_def(&scan.index)
                .cloned()
                .ok_or_else(|| ClientError::Task(format!("table {table:?} has no index {:?}", scan.index)))?;
            let mut window = IndexWindow::new(&table, index, scan, query, rows)?;
            let result = window.start(&self.inner.local, query, Box::new(on_diff))?;
            let n = live.next_window;
            live.next_window += 1;
            live.windows.insert(n, window);
            return Ok((
                LiveQuery {
                    id: LiveId::Window(n),
                    inner: Arc::downgrade(&self.inner),
                    collections: vec![table],
                },
                result,
            ));
        }
        live.ensure_loaded(&self.inner, query)?;
        let (id, result) = live.engine.subscribe_with(query, Box::new(on_diff))?;
        Ok((
            LiveQuery {
                id: LiveId::Engine(id),
                inner: Arc::downgrade(&self.inner),
                collections: query.collections().into_iter().map(str::to_owned).collect(),
            },
            result,
        ))
    }
}

/// The live state behind a lock, as `Inner` holds it.
pub(crate) type SharedLive = Mutex<LiveState>;
