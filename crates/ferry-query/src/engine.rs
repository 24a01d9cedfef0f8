//! The engine: source collections, one-shot queries and live subscriptions.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::sync::Arc;

use crate::error::QueryError;
use crate::ops::{Graph, SrcDelta};
use crate::plan::compile;
use crate::query::Query;
use crate::reference;
use crate::result::{Diff, QueryResult, SubscriptionId};
use crate::rows::same_src;
use crate::source::{Change, ChangeSet, RowRef, SrcRow};

/// Bounds on what grows inside an engine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineLimits {
    /// Most collections.
    pub max_collections: usize,
    /// Most rows in one collection.
    pub max_rows_per_collection: usize,
    /// Most changes in one [`ChangeSet`].
    pub max_changes_per_apply: usize,
    /// Most live subscriptions at once.
    pub max_subscriptions: usize,
}

impl Default for EngineLimits {
    fn default() -> Self {
        EngineLimits {
            max_collections: 10_000,
            max_rows_per_collection: 50_000_000,
            max_changes_per_apply: 1_000_000,
            max_subscriptions: 100_000,
        }
    }
}

/// Rows of one collection: a slab (iterated in roughly insertion order,
/// which keeps full scans cache friendly) plus an id index.
#[derive(Debug, Default)]
struct Collection {
    slots: Vec<Option<Arc<SrcRow>>>,
    free: Vec<usize>,
    by_id: HashMap<Arc<str>, usize>,
    shapes: crate::source::Shapes,
    /// Declared columns; `None` accepts any column name in queries.
    columns: Option<BTreeSet<String>>,
}

impl Collection {
    fn len(&self) -> usize {
        self.by_id.len()
    }

    fn contains(&self, id: &str) -> bool {
        self.by_id.contains_key(id)
    }

    fn insert(&mut self, row: Arc<SrcRow>) -> Option<Arc<SrcRow>> {
        if let Some(&slot) = self.by_id.get(&row.id) {
            return self.slots.get_mut(slot).and_then(|s| s.replace(row));
        }
        let slot = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push(None);
                self.slots.len() - 1
            }
        };
        self.by_id.insert(row.id.clone(), slot);
        if let Some(s) = self.slots.get_mut(slot) {
            *s = Some(row);
        }
        None
    }

    /// Insert or replace a row: its weighted changes (none when the
    /// row is the same as the one it replaces).
    fn upsert(&mut self, row: Arc<SrcRow>) -> Option<impl Iterator<Item = (Arc<SrcRow>, i32)>> {
        let old = self.insert(row.clone());
        if old.as_ref().is_some_and(|o| same_src(o, &row)) {
            return None;
        }
        Some(old.map(|o| (o, -1)).into_iter().chain(std::iter::once((row, 1))))
    }

    fn get(&self, id: &str) -> Option<&Arc<SrcRow>> {
        self.by_id
            .get(id)
            .and_then(|&i| self.slots.get(i))
            .and_then(Option::as_ref)
    }

    fn remove(&mut self, id: &str) -> Option<Arc<SrcRow>> {
        let slot = self.by_id.remove(id)?;
        self.free.push(slot);
        self.slots.get_mut(slot).and_then(Option::take)
    }

    fn rows(&self) -> impl Iterator<Item = &Arc<SrcRow>> {
        self.slots.iter().flatten()
    }
}

/// Called with every non-empty diff of a subscription.
pub type DiffCallback = Box<dyn FnMut(&Diff) + Send>;

struct Subscription {
    graph: Graph,
    callback: Option<DiffCallback>,
}

/// The live query engine: in-memory source collections keyed by row id,
/// fed with [`ChangeSet`]s, and the live queries over them.
///
/// Sans-IO: [`QueryEngine::apply`] returns the diffs of subscriptions that
/// have no callback and calls the callbacks of the others before returning.
pub struct QueryEngine {
    collections: HashMap<String, Collection>,
    subs: BTreeMap<SubscriptionId, Subscription>,
    next_sub: u64,
    limits: EngineLimits,
}

impl fmt::Debug for QueryEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QueryEngine")
            .field("collections", &self.collections.len())
            .field("subscriptions", &self.subs.len())
            .field("limits", &self.limits)
            .finish()
    }
}

impl Default for QueryEngine {
    fn default() -> Self {
        QueryEngine::new()
    }
}

impl QueryEngine {
    /// An engine with default limits.
    pub fn new() -> QueryEngine {
        QueryEngine::with_limits(EngineLimits::default())
    }

    /// An engine with the given limits.
    pub fn with_limits(limits: EngineLimits) -> QueryEngine {
        QueryEngine {
            collections: HashMap::new(),
            subs: BTreeMap::new(),
            next_sub: 1,
            limits,
        }
    }

    fn add_collection(&mut self, name: &str, columns: Option<BTreeSet<String>>) -> Result<(), QueryError> {
        if self.collections.contains_key(name) {
            return Err(QueryError::CollectionExists {
                collection: name.to_owned(),
            });
        }
        if self.collections.len() >= self.limits.max_collections {
            return Err(QueryError::LimitExceeded {
                limit_name: "max_collections",
                limit: self.limits.max_collections,
                actual: self.collections.len() + 1,
            });
        }
        self.collections.insert(
            name.to_owned(),
            Collection {
                columns,
                ..Collection::default()
            },
        );
        Ok(())
    }

    /// Create an empty collection that accepts any columns.
    pub fn create_collection(&mut self, name: &str) -> Result<(), QueryError> {
        self.add_collection(name, None)
    }

    /// Create an empty collection with declared columns: queries naming any
    /// other column (besides `id`) fail with [`QueryError::UnknownColumn`].
    pub fn create_collection_with_columns<I: IntoIterator<Item = S>, S: Into<String>>(
        &mut self,
        name: &str,
        columns: I,
    ) -> Result<(), QueryError> {
        self.add_collection(name, Some(columns.into_iter().map(Into::into).collect()))
    }

    /// A collection by name; unknown is an error naming it.
    fn collection(&self, name: &str) -> Result<&Collection, QueryError> {
        self.collections.get(name).ok_or_else(|| QueryError::UnknownCollection {
            collection: name.to_owned(),
        })
    }

    /// Number of rows in a collection.
    pub fn len(&self, collection: &str) -> Result<usize, QueryError> {
        Ok(self.collection(collection)?.len())
    }

    /// Bytes of the rows a collection holds: for each row, its id plus its
    /// data in the storage encoding (`ferry_core::codec::encode_row`).
    /// Operators share these rows by reference, so this is the state a
    /// live query over the collection keeps, measured without allocator
    /// overhead.
    pub fn collection_bytes(&self, collection: &str) -> Result<usize, QueryError> {
        Ok(self
            .collection(collection)?
            .rows()
            .map(|row| row.id.len() + ferry_core::codec::encode_row(&row.data()).len())
            .sum())
    }

    /// A row of a collection, as the engine holds it (`None` when it holds
    /// no row with that id).
    pub fn row(&self, collection: &str, id: &str) -> Result<Option<ferry_core::RowData>, QueryError> {
        Ok(self.collection(collection)?.get(id).map(|row| row.data()))
    }

    /// Number of live subscriptions.
    pub fn subscription_count(&self) -> usize {
        self.subs.len()
    }

    fn rows_of(&self) -> impl Fn(&str) -> Vec<Arc<SrcRow>> + '_ {
        |name: &str| {
            self.collections
                .get(name)
                .map(|c| c.rows().cloned().collect())
                .unwrap_or_default()
        }
    }

    fn plan(&self, q: &Query) -> Result<crate::plan::Plan, QueryError> {
        let catalog = |name: &str| self.collections.get(name).map(|c| c.columns.as_ref());
        compile(q, &catalog)
    }

    /// Evaluate a query once, from scratch (the reference evaluator).
    pub fn query(&self, q: &Query) -> Result<QueryResult, QueryError> {
        let plan = self.plan(q)?;
        let rows = reference::evaluate(&plan, &self.rows_of());
        Ok(QueryResult { rows })
    }

    /// Start a live query: returns its id and its first result. Diffs come
    /// back from [`QueryEngine::apply`].
    pub fn subscribe(&mut self, q: &Query) -> Result<(SubscriptionId, QueryResult), QueryError> {
        self.add_subscription(q, None)
    }

    /// Start a live query whose diffs go to `callback` (called inside
    /// [`QueryEngine::apply`], once per transaction that changes the result).
    pub fn subscribe_with(
        &mut self,
        q: &Query,
        callback: DiffCallback,
    ) -> Result<(SubscriptionId, QueryResult), QueryError> {
        self.add_subscription(q, Some(callback))
    }

    fn add_subscription(
        &mut self,
        q: &Query,
        callback: Option<DiffCallback>,
    ) -> Result<(SubscriptionId, QueryResult), QueryError> {
        if self.subs.len() >= self.limits.max_subscriptions {
            return Err(QueryError::LimitExceeded {
                limit_name: "max_subscriptions",
                limit: self.limits.max_subscriptions,
                actual: self.subs.len() + 1,
            });
        }
        let plan = self.plan(q)?;
        let graph = Graph::build(plan, &self.rows_of());
        let result = QueryResult { rows: graph.current() };
        let id = SubscriptionId(self.next_sub);
        self.next_sub += 1;
        self.subs.insert(id, Subscription { graph, callback });
        Ok((id, result))
    }

    /// Stop a live query and drop its operators.
    pub fn unsubscribe(&mut self, id: SubscriptionId) -> Result<(), QueryError> {
        self.subs
            .remove(&id)
            .map(|_| ())
            .ok_or(QueryError::UnknownSubscription { id: id.0 })
    }

    /// The current result of a live query.
    pub fn current(&self, id: SubscriptionId) -> Result<QueryResult, QueryError> {
        self.subs
            .get(&id)
            .map(|s| QueryResult {
                rows: s.graph.current(),
            })
            .ok_or(QueryError::UnknownSubscription { id: id.0 })
    }

    /// Check a transaction against the limits before anything changes:
    /// `changes` gives each change's collection and, for an upsert, its id.
    fn validate<'c>(
        &self,
        len: usize,
        changes: impl Iterator<Item = (&'c str, Option<&'c str>)>,
    ) -> Result<(), QueryError> {
        if len > self.limits.max_changes_per_apply {
            return Err(QueryError::LimitExceeded {
                limit_name: "max_changes_per_apply",
                limit: self.limits.max_changes_per_apply,
                actual: len,
            });
        }
        let mut new_ids: HashMap<&str, HashSet<&str>> = HashMap::new();
        for (name, upsert) in changes {
            let Some(coll) = self.collections.get(name) else {
                return Err(QueryError::UnknownCollection {
                    collection: name.to_owned(),
                });
            };
            // A collection that stays within its limit even if every
            // change added a row needs no count of the new ids.
            if coll.len().saturating_add(len) <= self.limits.max_rows_per_collection {
                continue;
            }
            if let Some(id) = upsert {
                if !coll.contains(id) {
                    let ids = new_ids.entry(name).or_default();
                    ids.insert(id);
                    if coll.len() + ids.len() > self.limits.max_rows_per_collection {
                        return Err(QueryError::LimitExceeded {
                            limit_name: "max_rows_per_collection",
                            limit: self.limits.max_rows_per_collection,
                            actual: coll.len() + ids.len(),
                        });
                    }
                }
            }
        }
        Ok(())
    }

    /// Apply a transaction. Either every change is applied or (on error)
    /// none. Returns one diff per affected subscription without a callback;
    /// subscriptions with a callback get theirs through it.
    pub fn apply(&mut self, cs: ChangeSet) -> Result<Vec<Diff>, QueryError> {
        self.validate(
            cs.changes.len(),
            cs.changes.iter().map(|c| match c {
                Change::Upsert { collection, id, .. } => (collection.as_str(), Some(id.as_str())),
                Change::Delete { collection, .. } => (collection.as_str(), None),
            }),
        )?;
        let mut deltas: HashMap<String, SrcDelta> = HashMap::new();
        for c in cs.changes {
            match c {
                Change::Upsert {
                    collection,
                    id,
                    data,
                    pending,
                } => {
                    let Some(coll) = self.collections.get_mut(&collection) else {
                        continue; // validated above
                    };
                    let hint = coll.get(&id).map(|r| r.shape.clone());
                    let row = Arc::new(coll.shapes.row(Arc::from(id), data, pending, hint.as_ref()));
                    if let Some(change) = coll.upsert(row) {
                        deltas.entry(collection).or_default().extend(change);
                    }
                }
                Change::Delete { collection, id } => {
                    let Some(coll) = self.collections.get_mut(&collection) else {
                        continue; // validated above
                    };
                    if let Some(o) = coll.remove(&id) {
                        deltas.entry(collection).or_default().push((o, -1));
                    }
                }
            }
        }
        Ok(self.process(&deltas))
    }

    /// [`QueryEngine::apply`] of changes to one collection's rows, borrowed:
    /// the engine copies the values it keeps (as an upsert of an owned
    /// row would move them), not the rows' maps. Same result, same
    /// all-or-nothing.
    pub fn apply_rows(&mut self, collection: &str, rows: &[RowRef<'_>]) -> Result<Vec<Diff>, QueryError> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        self.validate(
            rows.len(),
            rows.iter().map(|r| match r {
                RowRef::Upsert { id, .. } => (collection, Some(*id)),
                RowRef::Delete { .. } => (collection, None),
            }),
        )?;
        let Some(coll) = self.collections.get_mut(collection) else {
            // Validated above: a change names it.
            return Err(QueryError::UnknownCollection {
                collection: collection.to_owned(),
            });
        };
        let mut delta = SrcDelta::new();
        for r in rows {
            match *r {
                RowRef::Upsert { id, data, pending } => {
                    let hint = coll.get(id).map(|r| r.shape.clone());
                    let row = Arc::new(coll.shapes.row_of(Arc::from(id), data, pending, hint.as_ref()));
                    if let Some(change) = coll.upsert(row) {
                        delta.extend(change);
                    }
                }
                RowRef::Delete { id } => {
                    if let Some(o) = coll.remove(id) {
                        delta.push((o, -1));
                    }
                }
            }
        }
        if delta.is_empty() {
            return Ok(Vec::new());
        }
        let deltas = HashMap::from([(collection.to_owned(), delta)]);
        Ok(self.process(&deltas))
    }

    /// Push a transaction's source changes through every subscription
    /// that reads them: callbacks are called, the other diffs returned.
    fn process(&mut self, deltas: &HashMap<String, SrcDelta>) -> Vec<Diff> {
        let mut out = Vec::new();
        if deltas.is_empty() {
            return out;
        }
        for (id, sub) in &mut self.subs {
            if !deltas.keys().any(|c| sub.graph.reads(c)) {
                continue;
            }
            let w = sub.graph.process(deltas);
            let diff = Diff {
                subscription: *id,
                added: w.added,
                removed: w.removed,
                updated: w.updated,
            };
            if diff.is_empty() {
                continue;
            }
            match &mut sub.callback {
                Some(cb) => cb(&diff),
                None => out.push(diff),
            }
        }
        out
    }
}
