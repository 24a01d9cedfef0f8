//! Incremental operators over weighted changes (+1 insert, -1 delete; an
//! update is -old +new), and the per-query graph that chains them.
//!
//! Every operator keeps just enough state to turn an input change into its
//! output change without looking at unrelated rows:
//! - join: a hash index per side keyed by the join key;
//! - group by: per-group running count/sum and an ordered multiset for
//!   min/max, so deletions are exact;
//! - distinct: a multiplicity per distinct row;
//! - order by + offset/limit: an ordered index (sorted chunks with rank
//!   lookup) over (sort key, identity); only the window's diff is emitted.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use ferry_core::Value;

use crate::expr::{is_true, to_numeric, AggFn, ColName, Env, Wide};
use crate::plan::{JoinSpec, Plan, Shape};
use crate::result::{Added, Removed, ResultRow, Updated};
use crate::rows::{wide_key, wide_pending, Cols, OutRow};

fn same_opt(a: &Option<OutRow>, b: &Option<OutRow>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => a.same(b),
        (None, None) => true,
        _ => false,
    }
}
use crate::source::SrcRow;

/// Weighted changes of joined rows.
pub(crate) type WideDelta = Vec<(Wide, i32)>;
/// Weighted changes of output rows.
pub(crate) type OutDelta = Vec<(OutRow, i32)>;
/// Weighted changes of one source collection.
pub(crate) type SrcDelta = Vec<(Arc<SrcRow>, i32)>;

// ---------------------------------------------------------------------------
// Ordered index with ranks.

/// Most entries one chunk of an [`OrderedIndex`] holds before it splits.
const CHUNK_MAX_ENTRIES: usize = 256;

/// A sorted map with rank lookup: sorted chunks of at most
/// [`CHUNK_MAX_ENTRIES`]. Insert, remove and rank cost
/// O(log n + CHUNK_MAX_ENTRIES + n / CHUNK_MAX_ENTRIES).
#[derive(Debug)]
pub(crate) struct OrderedIndex<K, V> {
    chunks: Vec<Vec<(K, V)>>,
    len: usize,
}

impl<K: Ord, V> OrderedIndex<K, V> {
    pub(crate) fn new() -> Self {
        OrderedIndex {
            chunks: Vec::new(),
            len: 0,
        }
    }

    /// Build from entries sorted by key.
    pub(crate) fn from_sorted(entries: Vec<(K, V)>) -> Self {
        let len = entries.len();
        let mut chunks = Vec::with_capacity(len / (CHUNK_MAX_ENTRIES / 2) + 1);
        let mut cur = Vec::with_capacity(CHUNK_MAX_ENTRIES);
        for e in entries {
            cur.push(e);
            if cur.len() == CHUNK_MAX_ENTRIES / 2 {
                chunks.push(std::mem::replace(&mut cur, Vec::with_capacity(CHUNK_MAX_ENTRIES)));
            }
        }
        if !cur.is_empty() {
            chunks.push(cur);
        }
        OrderedIndex { chunks, len }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The chunk that holds `k` or where it would go. Chunks are never empty.
    fn chunk_for(&self, k: &K) -> usize {
        let i = self.chunks.partition_point(|c| c.last().is_some_and(|(ck, _)| ck < k));
        i.min(self.chunks.len().saturating_sub(1))
    }

    fn prefix(&self, ci: usize) -> usize {
        self.chunks[..ci].iter().map(Vec::len).sum()
    }

    /// Insert (or replace) and return the rank.
    pub(crate) fn insert(&mut self, k: K, v: V) -> usize {
        if self.chunks.is_empty() {
            self.chunks.push(vec![(k, v)]);
            self.len = 1;
            return 0;
        }
        let ci = self.chunk_for(&k);
        let chunk = &mut self.chunks[ci];
        let pos = match chunk.binary_search_by(|(x, _)| x.cmp(&k)) {
            Ok(p) => {
                chunk[p] = (k, v);
                return self.prefix(ci) + p;
            }
            Err(p) => p,
        };
        chunk.insert(pos, (k, v));
        self.len += 1;
        if chunk.len() > CHUNK_MAX_ENTRIES {
            let tail = chunk.split_off(chunk.len() / 2);
            self.chunks.insert(ci + 1, tail);
        }
        self.prefix(ci) + pos
    }

    /// Remove and return the rank and value.
    pub(crate) fn remove(&mut self, k: &K) -> Option<(usize, V)> {
        if self.chunks.is_empty() {
            return None;
        }
        let ci = self.chunk_for(k);
        let p = self.chunks[ci].binary_search_by(|(x, _)| x.cmp(k)).ok()?;
        let (_, v) = self.chunks[ci].remove(p);
        self.len -= 1;
        let rank = self.prefix(ci) + p;
        if self.chunks[ci].is_empty() {
            self.chunks.remove(ci);
        }
        Some((rank, v))
    }

    pub(crate) fn rank_of(&self, k: &K) -> Option<usize> {
        if self.chunks.is_empty() {
            return None;
        }
        let ci = self.chunk_for(k);
        let p = self.chunks[ci].binary_search_by(|(x, _)| x.cmp(k)).ok()?;
        Some(self.prefix(ci) + p)
    }

    pub(crate) fn get(&self, mut rank: usize) -> Option<&(K, V)> {
        for c in &self.chunks {
            if rank < c.len() {
                return c.get(rank);
            }
            rank -= c.len();
        }
        None
    }

    /// Entries with rank in `start..end`.
    pub(crate) fn range(&self, start: usize, end: usize) -> impl Iterator<Item = &(K, V)> {
        let mut skip = start;
        let mut first = self.chunks.len();
        for (i, c) in self.chunks.iter().enumerate() {
            if skip < c.len() {
                first = i;
                break;
            }
            skip -= c.len();
        }
        self.chunks[first.min(self.chunks.len())..]
            .iter()
            .flatten()
            .skip(skip)
            .take(end.saturating_sub(start))
    }
}

// ---------------------------------------------------------------------------
// Join.

fn left_key(spec: &JoinSpec, w: &Wide) -> Option<Vec<Value>> {
    let mut k = Vec::with_capacity(spec.left_cols.len());
    for (i, c) in &spec.left_cols {
        let v = match w.get(*i) {
            Some(Some(r)) => c.read(r),
            _ => Value::Null,
        };
        if v.is_null() {
            return None;
        }
        k.push(v);
    }
    Some(k)
}

fn right_key(cols: &[ColName], r: &SrcRow) -> Option<Vec<Value>> {
    let mut k = Vec::with_capacity(cols.len());
    for c in cols {
        let v = c.read(r);
        if v.is_null() {
            return None;
        }
        k.push(v);
    }
    Some(k)
}

fn joined(l: &Wide, r: Option<&Arc<SrcRow>>) -> Wide {
    let mut w = Vec::with_capacity(l.len() + 1);
    w.extend(l.iter().cloned());
    w.push(r.cloned());
    w
}

fn padded(width: usize, r: &Arc<SrcRow>) -> Wide {
    let mut w: Wide = vec![None; width];
    w.push(Some(r.clone()));
    w
}

/// Equi-join of the rows joined so far (left) with one collection (right),
/// inner or outer on either side. NULL keys never match.
#[derive(Debug)]
pub(crate) struct JoinOp {
    /// Join key → left identity → left row.
    left: HashMap<Vec<Value>, HashMap<Vec<Value>, Wide>>,
    /// Join key → right id → right row.
    right: HashMap<Vec<Value>, HashMap<Arc<str>, Arc<SrcRow>>>,
    /// Sources on the left.
    width: usize,
}

impl JoinOp {
    fn new(width: usize) -> Self {
        JoinOp {
            left: HashMap::new(),
            right: HashMap::new(),
            width,
        }
    }

    /// Left changes are joined with the right side as it was before this
    /// batch's right changes; right changes then see the updated left side.
    fn process(&mut self, spec: &JoinSpec, left_delta: WideDelta, right_delta: &[(Arc<SrcRow>, i32)]) -> WideDelta {
        let mut out = Vec::new();
        for (w, d) in left_delta {
            let Some(k) = left_key(spec, &w) else {
                if spec.left_outer {
                    out.push((joined(&w, None), d));
                }
                continue;
            };
            let rights: Vec<Arc<SrcRow>> = self
                .right
                .get(&k)
                .map(|m| m.values().cloned().collect())
                .unwrap_or_default();
            let id = wide_key(&w);
            if d > 0 {
                if !rights.is_empty() {
                    let no_lefts = self.left.get(&k).is_none_or(HashMap::is_empty);
                    if no_lefts && spec.right_outer {
                        out.extend(rights.iter().map(|r| (padded(self.width, r), -1)));
                    }
                    out.extend(rights.iter().map(|r| (joined(&w, Some(r)), 1)));
                } else if spec.left_outer {
                    out.push((joined(&w, None), 1));
                }
                self.left.entry(k).or_default().insert(id, w);
            } else {
                let mut now_empty = false;
                if let Some(m) = self.left.get_mut(&k) {
                    m.remove(&id);
                    now_empty = m.is_empty();
                    if now_empty {
                        self.left.remove(&k);
                    }
                }
                if !rights.is_empty() {
                    out.extend(rights.iter().map(|r| (joined(&w, Some(r)), -1)));
                    if now_empty && spec.right_outer {
                        out.extend(rights.iter().map(|r| (padded(self.width, r), 1)));
                    }
                } else if spec.left_outer {
                    out.push((joined(&w, None), -1));
                }
            }
        }
        for (r, d) in right_delta {
            let d = *d;
            let Some(k) = right_key(&spec.right_cols, r) else {
                if spec.right_outer {
                    out.push((padded(self.width, r), d));
                }
                continue;
            };
            let lefts: Vec<Wide> = self
                .left
                .get(&k)
                .map(|m| m.values().cloned().collect())
                .unwrap_or_default();
            if d > 0 {
                if !lefts.is_empty() {
                    let no_rights = self.right.get(&k).is_none_or(HashMap::is_empty);
                    if no_rights && spec.left_outer {
                        out.extend(lefts.iter().map(|l| (joined(l, None), -1)));
                    }
                    out.extend(lefts.iter().map(|l| (joined(l, Some(r)), 1)));
                } else if spec.right_outer {
                    out.push((padded(self.width, r), 1));
                }
                self.right.entry(k).or_default().insert(r.id.clone(), r.clone());
            } else {
                let mut now_empty = false;
                if let Some(m) = self.right.get_mut(&k) {
                    m.remove(&r.id);
                    now_empty = m.is_empty();
                    if now_empty {
                        self.right.remove(&k);
                    }
                }
                if !lefts.is_empty() {
                    out.extend(lefts.iter().map(|l| (joined(l, Some(r)), -1)));
                    if now_empty && spec.left_outer {
                        out.extend(lefts.iter().map(|l| (joined(l, None), 1)));
                    }
                } else if spec.right_outer {
                    out.push((padded(self.width, r), -1));
                }
            }
        }
        out
    }
}

// ---------------------------------------------------------------------------
// Group by.

#[derive(Debug)]
enum AggState {
    /// Non-NULL count (count(*) reads the group's row count instead).
    Count(i64),
    /// Running sums of non-NULL values (sum and avg).
    Sum { n: i64, n_real: i64, int: i128, real: f64 },
    /// Multiset of non-NULL values (min and max).
    Ordered(BTreeMap<Value, i64>),
}

impl AggState {
    fn new(f: AggFn) -> Self {
        match f {
            AggFn::Count => AggState::Count(0),
            AggFn::Sum | AggFn::Avg => AggState::Sum {
                n: 0,
                n_real: 0,
                int: 0,
                real: 0.0,
            },
            AggFn::Min | AggFn::Max => AggState::Ordered(BTreeMap::new()),
        }
    }

    fn update(&mut self, v: Value, d: i32) {
        if v.is_null() {
            return;
        }
        let d64 = i64::from(d);
        match self {
            AggState::Count(c) => *c += d64,
            AggState::Sum { n, n_real, int, real } => match to_numeric(&v) {
                Value::Integer(i) => {
                    *int += i128::from(i) * i128::from(d);
                    *n += d64;
                }
                Value::Real(r) => {
                    if d > 0 {
                        *real += r;
                    } else {
                        *real -= r;
                    }
                    *n_real += d64;
                    *n += d64;
                }
                _ => {}
            },
            AggState::Ordered(m) => {
                let c = m.entry(v.clone()).or_insert(0);
                *c += d64;
                if *c <= 0 {
                    m.remove(&v);
                }
            }
        }
    }

    fn finish(&self, f: AggFn, rows: i64, has_arg: bool) -> Value {
        match (f, self) {
            (AggFn::Count, AggState::Count(c)) => Value::Integer(if has_arg { *c } else { rows }),
            (AggFn::Sum | AggFn::Avg, AggState::Sum { n, n_real, int, real }) => {
                if *n <= 0 {
                    return Value::Null;
                }
                // With no reals left the real sum is exactly zero.
                let real = if *n_real == 0 { 0.0 } else { *real };
                let total = *int as f64 + real;
                if f == AggFn::Avg {
                    Value::Real(total / *n as f64)
                } else if *n_real == 0 {
                    i64::try_from(*int).map_or(Value::Real(total), Value::Integer)
                } else {
                    Value::Real(total)
                }
            }
            (AggFn::Min, AggState::Ordered(m)) => m.keys().next().cloned().unwrap_or(Value::Null),
            (AggFn::Max, AggState::Ordered(m)) => m.keys().next_back().cloned().unwrap_or(Value::Null),
            _ => Value::Null,
        }
    }
}

#[derive(Debug)]
struct Group {
    rows: i64,
    pending: i64,
    states: Vec<AggState>,
    out: Option<OutRow>,
    touched: bool,
}

/// Incremental GROUP BY with aggregates and HAVING.
#[derive(Debug, Default)]
pub(crate) struct AggOp {
    groups: HashMap<Vec<Value>, Group>,
    started: bool,
}

impl AggOp {
    fn process(&mut self, plan: &Plan, input: WideDelta) -> OutDelta {
        let Shape::Grouped {
            group,
            aggs,
            out,
            having,
            global,
        } = &plan.shape
        else {
            return Vec::new();
        };
        let new_group = || Group {
            rows: 0,
            pending: 0,
            states: aggs.iter().map(|(f, _)| AggState::new(*f)).collect(),
            out: None,
            touched: false,
        };
        let mut touched: Vec<Vec<Value>> = Vec::new();
        if *global && !self.started {
            let g = self.groups.entry(Vec::new()).or_insert_with(new_group);
            g.touched = true;
            touched.push(Vec::new());
        }
        self.started = true;
        for (w, d) in input {
            let env = Env {
                wide: &w,
                ..Env::default()
            };
            let key: Vec<Value> = group.iter().map(|g| g.eval(&env)).collect();
            let g = match self.groups.get_mut(&key) {
                Some(g) => g,
                None => self.groups.entry(key.clone()).or_insert_with(new_group),
            };
            if !g.touched {
                g.touched = true;
                touched.push(key);
            }
            g.rows += i64::from(d);
            if wide_pending(&w) {
                g.pending += i64::from(d);
            }
            for ((_, arg), st) in aggs.iter().zip(g.states.iter_mut()) {
                let v = arg.as_ref().map_or(Value::Null, |a| a.eval(&env));
                st.update(v, d);
            }
        }
        let mut delta = Vec::new();
        for key in touched {
            let Some(g) = self.groups.get_mut(&key) else {
                continue;
            };
            g.touched = false;
            let new_out = if g.rows > 0 || *global {
                let agg_vals: Vec<Value> = aggs
                    .iter()
                    .zip(&g.states)
                    .map(|((f, arg), st)| st.finish(*f, g.rows, arg.is_some()))
                    .collect();
                let env = Env {
                    group: &key,
                    aggs: &agg_vals,
                    ..Env::default()
                };
                if having.as_ref().is_none_or(|h| is_true(&h.eval(&env))) {
                    let cols = Cols::Vals(out.iter().map(|e| e.eval(&env)).collect());
                    let sort = if plan.distinct {
                        Vec::new()
                    } else {
                        plan.sort_key_of_cols(&cols)
                    };
                    Some(OutRow {
                        key: key.clone(),
                        cols,
                        sort,
                        pending: g.pending > 0,
                    })
                } else {
                    None
                }
            } else {
                None
            };
            if !same_opt(&new_out, &g.out) {
                if let Some(o) = g.out.take() {
                    delta.push((o, -1));
                }
                if let Some(n) = &new_out {
                    delta.push((n.clone(), 1));
                }
                g.out = new_out;
            }
            if g.rows <= 0 && !*global {
                self.groups.remove(&key);
            }
        }
        delta
    }
}

// ---------------------------------------------------------------------------
// Distinct.

#[derive(Debug)]
struct Distinct {
    count: i64,
    pending: i64,
    cols: Cols,
    out: Option<OutRow>,
    touched: bool,
}

/// DISTINCT with multiplicities.
#[derive(Debug, Default)]
pub(crate) struct DistinctOp {
    rows: HashMap<Vec<Value>, Distinct>,
}

impl DistinctOp {
    fn process(&mut self, plan: &Plan, input: OutDelta) -> OutDelta {
        let mut touched = Vec::new();
        for (r, d) in input {
            let key = plan.distinct_key(&r.cols);
            let e = self.rows.entry(key.clone()).or_insert_with(|| Distinct {
                count: 0,
                pending: 0,
                cols: r.cols.clone(),
                out: None,
                touched: false,
            });
            if !e.touched {
                e.touched = true;
                touched.push(key);
            }
            e.count += i64::from(d);
            if r.pending {
                e.pending += i64::from(d);
            }
        }
        let mut delta = Vec::new();
        for key in touched {
            let Some(e) = self.rows.get_mut(&key) else {
                continue;
            };
            e.touched = false;
            let new_out = (e.count > 0).then(|| OutRow {
                key: key.clone(),
                cols: e.cols.clone(),
                sort: plan.sort_key_of_cols(&e.cols),
                pending: e.pending > 0,
            });
            if !same_opt(&new_out, &e.out) {
                if let Some(o) = e.out.take() {
                    delta.push((o, -1));
                }
                if let Some(n) = &new_out {
                    delta.push((n.clone(), 1));
                }
                e.out = new_out;
            }
            if e.count <= 0 {
                self.rows.remove(&key);
            }
        }
        delta
    }
}

// ---------------------------------------------------------------------------
// Order by, offset, limit.

/// Most changes [`FinalOp::process`] consolidates by scanning instead of
/// through a map keyed by identity.
const SCAN_CONSOLIDATE_MAX_CHANGES: usize = 8;

/// The ordered result with its offset/limit window.
#[derive(Debug)]
pub(crate) struct FinalOp {
    index: OrderedIndex<OutRow, ()>,
    offset: usize,
    limit: Option<usize>,
}

/// Rank of the `j`-th untouched entry, given the sorted ranks of touched
/// entries in the same state.
fn select_untouched(j: usize, touched: &[usize]) -> usize {
    let mut r = j;
    for &t in touched {
        if t <= r {
            r += 1;
        } else {
            break;
        }
    }
    r
}

/// Window diff of one batch.
#[derive(Debug, Default)]
pub(crate) struct WindowDiff {
    pub added: Vec<Added>,
    pub removed: Vec<Removed>,
    pub updated: Vec<Updated>,
}

impl FinalOp {
    fn new(plan: &Plan) -> Self {
        FinalOp {
            index: OrderedIndex::new(),
            offset: plan.offset,
            limit: plan.limit,
        }
    }

    fn window(&self, n: usize) -> (usize, usize) {
        let s = self.offset.min(n);
        let e = match self.limit {
            Some(l) => self.offset.saturating_add(l).min(n),
            None => n,
        };
        (s, e)
    }

    fn init(&mut self, mut rows: OutDelta) {
        // Consolidate: a self-join or an outer join can retract rows it
        // emitted earlier in the same batch.
        rows.sort_by(|a, b| a.0.cmp(&b.0));
        let mut entries: Vec<(OutRow, ())> = Vec::with_capacity(rows.len());
        let mut cur: Option<(OutRow, i64)> = None;
        for (r, d) in rows {
            match &mut cur {
                Some((c, w)) if *c == r => {
                    *w += i64::from(d);
                    if d > 0 {
                        *c = r;
                    }
                }
                _ => {
                    if let Some((c, w)) = cur.take() {
                        if w > 0 {
                            entries.push((c, ()));
                        }
                    }
                    cur = Some((r, i64::from(d)));
                }
            }
        }
        if let Some((c, w)) = cur {
            if w > 0 {
                entries.push((c, ()));
            }
        }
        self.index = OrderedIndex::from_sorted(entries);
    }

    fn current(&self, plan: &Plan) -> Vec<ResultRow> {
        let (s, e) = self.window(self.index.len());
        self.index.range(s, e).map(|(r, _)| plan.to_result(r)).collect()
    }

    /// Insert a batch's new rows (`None`: a row that only left) and
    /// return their ranks once all are in. A few rows are moved in, each
    /// rank then moved past the later ones inserted at or before it; many
    /// are copied in and ranked after (linear in the rows, not quadratic).
    fn insert_new(&mut self, news: Vec<Option<OutRow>>) -> Vec<Option<usize>> {
        let mut ranks: Vec<Option<usize>> = vec![None; news.len()];
        if news.len() <= SCAN_CONSOLIDATE_MAX_CHANGES {
            for (i, n) in news.into_iter().enumerate() {
                let Some(n) = n else { continue };
                let before = self.index.len();
                let r = self.index.insert(n, ());
                // (A replaced entry moved nothing.)
                if self.index.len() > before {
                    for earlier in ranks[..i].iter_mut().flatten() {
                        if *earlier >= r {
                            *earlier += 1;
                        }
                    }
                }
                ranks[i] = Some(r);
            }
        } else {
            for n in news.iter().flatten() {
                self.index.insert(n.clone(), ());
            }
            for (rank, n) in ranks.iter_mut().zip(&news) {
                *rank = n.as_ref().and_then(|n| self.index.rank_of(n));
            }
        }
        ranks
    }

    fn process(&mut self, plan: &Plan, changes: OutDelta) -> WindowDiff {
        // Consolidate per identity into (old, new). The few changes of a
        // typical commit are matched by a scan (no key copied or hashed).
        let mut per_key: Vec<OutDelta> = Vec::new();
        let mut pos: HashMap<Vec<Value>, usize> = HashMap::new();
        let scan = changes.len() <= SCAN_CONSOLIDATE_MAX_CHANGES;
        for (r, d) in changes {
            let found = if scan {
                per_key
                    .iter()
                    .position(|list| list.first().is_some_and(|(x, _)| x.key == r.key))
            } else {
                pos.get(&r.key).copied()
            };
            let i = match found {
                Some(i) => i,
                None => {
                    if !scan {
                        pos.insert(r.key.clone(), per_key.len());
                    }
                    per_key.push(Vec::new());
                    per_key.len() - 1
                }
            };
            let Some(list) = per_key.get_mut(i) else {
                continue; // `i` always indexes `per_key`
            };
            match list.iter_mut().find(|(x, _)| x.same(&r)) {
                Some(e) => e.1 += d,
                None => list.push((r, d)),
            }
        }
        let mut pairs: Vec<(Option<OutRow>, Option<OutRow>)> = Vec::new();
        for list in per_key {
            let mut old = None;
            let mut new = None;
            for (r, w) in list {
                if w < 0 {
                    old = Some(r);
                } else if w > 0 {
                    new = Some(r);
                }
            }
            if old.is_some() || new.is_some() {
                pairs.push((old, new));
            }
        }
        let mut diff = WindowDiff::default();
        if pairs.is_empty() {
            return diff;
        }

        let n_old = self.index.len();
        let (olds, news): (Vec<Option<OutRow>>, Vec<Option<OutRow>>) = pairs.into_iter().unzip();
        // Old ranks, all taken in the old state.
        let old_ranks: Vec<Option<usize>> = olds
            .iter()
            .map(|o| o.as_ref().and_then(|o| self.index.rank_of(o)))
            .collect();
        for o in olds.iter().flatten() {
            self.index.remove(o);
        }
        let new_ranks = self.insert_new(news);
        let n_new = self.index.len();

        let (s_o, e_o) = self.window(n_old);
        let (s_n, e_n) = self.window(n_new);
        let in_old = |r: usize| r >= s_o && r < e_o;
        let in_new = |r: usize| r >= s_n && r < e_n;
        // A new row is read back from the index, which holds it now.
        let new_row = |r: usize| self.index.get(r).map(|(row, _)| plan.to_result(row));

        for ((o, ro), rn) in olds.iter().zip(&old_ranks).zip(&new_ranks) {
            let was = ro.filter(|r| in_old(*r));
            let is = rn.filter(|r| in_new(*r));
            match (was, is, o) {
                (Some(ro), Some(rn), Some(o)) => {
                    if let Some(new) = new_row(rn) {
                        diff.updated.push(Updated {
                            old_index: ro - s_o,
                            new_index: rn - s_n,
                            old: plan.to_result(o),
                            new,
                        });
                    }
                }
                (Some(ro), _, Some(o)) => diff.removed.push(Removed {
                    index: ro - s_o,
                    row: plan.to_result(o),
                }),
                (_, Some(rn), _) => {
                    if let Some(row) = new_row(rn) {
                        diff.added.push(Added { index: rn - s_n, row });
                    }
                }
                _ => {}
            }
        }

        // Untouched rows shifted across the window's edges.
        let mut t_old: Vec<usize> = old_ranks.iter().flatten().copied().collect();
        let mut t_new: Vec<usize> = new_ranks.iter().flatten().copied().collect();
        t_old.sort_unstable();
        t_new.sort_unstable();
        let below = |t: &[usize], x: usize| t.partition_point(|r| *r < x);
        let (a_o, b_o) = (s_o - below(&t_old, s_o), e_o - below(&t_old, e_o));
        let (a_n, b_n) = (s_n - below(&t_new, s_n), e_n - below(&t_new, e_n));
        let left_window = (a_o..b_o.min(a_n)).chain(a_o.max(b_n)..b_o);
        for j in left_window {
            let r_old = select_untouched(j, &t_old);
            let r_new = select_untouched(j, &t_new);
            if let Some((row, _)) = self.index.get(r_new) {
                diff.removed.push(Removed {
                    index: r_old - s_o,
                    row: plan.to_result(row),
                });
            }
        }
        let entered = (a_n..b_n.min(a_o)).chain(a_n.max(b_o)..b_n);
        for j in entered {
            let r_new = select_untouched(j, &t_new);
            if let Some((row, _)) = self.index.get(r_new) {
                diff.added.push(Added {
                    index: r_new - s_n,
                    row: plan.to_result(row),
                });
            }
        }
        diff
    }
}

// ---------------------------------------------------------------------------
// The graph of one live query.

/// The operators of one live query.
#[derive(Debug)]
pub(crate) struct Graph {
    plan: Plan,
    joins: Vec<JoinOp>,
    agg: Option<AggOp>,
    distinct: Option<DistinctOp>,
    fin: FinalOp,
}

impl Graph {
    /// Build the operators and load them with the current rows.
    pub(crate) fn build(plan: Plan, rows_of: &dyn Fn(&str) -> Vec<Arc<SrcRow>>) -> Graph {
        let joins = (0..plan.joins.len()).map(|i| JoinOp::new(i + 1)).collect();
        let agg = matches!(plan.shape, Shape::Grouped { .. }).then(AggOp::default);
        let distinct = plan.distinct.then(DistinctOp::default);
        let fin = FinalOp::new(&plan);
        let mut g = Graph {
            plan,
            joins,
            agg,
            distinct,
            fin,
        };
        let mut deltas: HashMap<String, SrcDelta> = HashMap::new();
        for s in &g.plan.sources {
            deltas
                .entry(s.collection.clone())
                .or_insert_with(|| rows_of(&s.collection).into_iter().map(|r| (r, 1)).collect());
        }
        let out = g.stream(&deltas);
        g.fin.init(out);
        g
    }

    /// Whether a change to `collection` can affect this query.
    pub(crate) fn reads(&self, collection: &str) -> bool {
        self.plan.sources.iter().any(|s| s.collection == collection)
    }

    /// The current result.
    pub(crate) fn current(&self) -> Vec<ResultRow> {
        self.fin.current(&self.plan)
    }

    /// Push one transaction's source changes through the graph.
    pub(crate) fn process(&mut self, deltas: &HashMap<String, SrcDelta>) -> WindowDiff {
        let out = self.stream(deltas);
        if out.is_empty() {
            return WindowDiff::default();
        }
        self.fin.process(&self.plan, out)
    }

    fn stream(&mut self, deltas: &HashMap<String, SrcDelta>) -> OutDelta {
        let plan = &self.plan;
        let from = deltas
            .get(&plan.sources[0].collection)
            .map_or(&[][..], |v| v.as_slice());
        let mut wide: WideDelta = match (&plan.filter, plan.joins.is_empty()) {
            // No joins: filter before building joined rows.
            (Some(f), true) => from
                .iter()
                .filter(|(r, _)| {
                    let one = [Some(r.clone())];
                    is_true(&f.eval_cow(&Env {
                        wide: &one,
                        ..Env::default()
                    }))
                })
                .map(|(r, w)| (vec![Some(r.clone())], *w))
                .collect(),
            _ => from.iter().map(|(r, w)| (vec![Some(r.clone())], *w)).collect(),
        };
        for (i, (op, spec)) in self.joins.iter_mut().zip(&plan.joins).enumerate() {
            let right = deltas
                .get(&plan.sources[i + 1].collection)
                .map_or(&[][..], |v| v.as_slice());
            wide = op.process(spec, wide, right);
        }
        if let (Some(f), false) = (&plan.filter, plan.joins.is_empty()) {
            wide.retain(|(w, _)| {
                is_true(&f.eval(&Env {
                    wide: w,
                    ..Env::default()
                }))
            });
        }
        let out = match (&plan.shape, &mut self.agg) {
            (Shape::Grouped { .. }, Some(agg)) => agg.process(plan, wide),
            (Shape::Plain { select }, _) => wide
                .iter()
                .map(|(w, d)| (plan.project(w, select.as_deref()), *d))
                .collect(),
            (Shape::Grouped { .. }, None) => Vec::new(),
        };
        match &mut self.distinct {
            Some(d) => d.process(plan, out),
            None => out,
        }
    }
}
