//! Rows of Ferry's own tables that a transaction sending its ops' writes
//! together ([`SourceTx::defer_op_writes`](ferry_source::SourceTx::defer_op_writes))
//! gathers and writes with one multi-row statement per table at the next
//! flight, instead of one statement per row: op log entries, outcomes,
//! bucket states, rows' bucket memberships and rows' clocks (clearing
//! their tombstones). Nothing else in a write transaction reads or writes
//! these tables between flights (reads of them go through a flight, and
//! bucket states are cached), so writing them at the flight keeps every
//! read as it would be.

use std::collections::BTreeMap;

use ferry_source::BucketState;

use crate::tx::{Param, PLANNED_EACH_TIME};

/// Most rows in one multi-row statement (its arrays stay bounded).
pub(crate) const MAX_ROWS_PER_STATEMENT: usize = 1_000;

/// One op log entry: op id, bucket, op, table, row id (none for a
/// CLEAR), data (JSON), checksum.
pub(crate) type OplogRow = (i64, String, String, Option<String>, Option<String>, Option<String>, i64);

/// One outcome: client id, seq, outcome (JSON), fingerprint.
pub(crate) type OutcomeRow = (String, i64, String, i64);

/// What is gathered since the last flight.
#[derive(Clone, Debug, Default)]
pub(crate) struct Batched {
    pub(crate) oplog: Vec<OplogRow>,
    pub(crate) outcomes: Vec<OutcomeRow>,
    /// The last state set of each bucket.
    pub(crate) buckets: BTreeMap<String, BucketState>,
    /// Memberships set, in order: table, row id, buckets, and whether
    /// they only add to the row's stored ones (known from the read
    /// ahead: nothing to delete). A later one of the same row replaces an
    /// earlier one.
    pub(crate) memberships: Vec<(String, String, Vec<String>, bool)>,
    /// Rows' clocks set, in order: table, row id, clocks (JSON), and
    /// whether the row may have a tombstone to clear (`false`: the read
    /// ahead found none).
    pub(crate) clocks: Vec<(String, String, String, bool)>,
}

/// Where an op's gathered rows start, to drop them when it rolls back.
#[derive(Clone, Debug)]
pub(crate) struct Mark {
    oplog: usize,
    outcomes: usize,
    buckets: BTreeMap<String, BucketState>,
    memberships: usize,
    clocks: usize,
}

impl Batched {
    pub(crate) fn is_empty(&self) -> bool {
        self.oplog.is_empty()
            && self.outcomes.is_empty()
            && self.buckets.is_empty()
            && self.memberships.is_empty()
            && self.clocks.is_empty()
    }

    pub(crate) fn mark(&self) -> Mark {
        Mark {
            oplog: self.oplog.len(),
            outcomes: self.outcomes.len(),
            buckets: self.buckets.clone(),
            memberships: self.memberships.len(),
            clocks: self.clocks.len(),
        }
    }

    /// Whether anything was gathered since `mark`.
    pub(crate) fn grew_since(&self, mark: &Mark) -> bool {
        self.oplog.len() > mark.oplog
            || self.outcomes.len() > mark.outcomes
            || self.memberships.len() > mark.memberships
            || self.clocks.len() > mark.clocks
            || self.buckets != mark.buckets
    }

    /// Drop what was gathered since `mark`.
    pub(crate) fn back_to(&mut self, mark: Mark) {
        self.oplog.truncate(mark.oplog);
        self.outcomes.truncate(mark.outcomes);
        self.buckets = mark.buckets;
        self.memberships.truncate(mark.memberships);
        self.clocks.truncate(mark.clocks);
    }

    /// The statements writing everything gathered, which is then empty.
    /// `f` is Ferry's quoted schema.
    pub(crate) fn take_statements(&mut self, f: &str) -> Vec<(String, Vec<Param>)> {
        let mut out = oplog_inserts(f, &std::mem::take(&mut self.oplog));
        // One row per key in a statement (an upsert may not touch a row
        // twice): the last one set wins, as statement by statement.
        let mut outcomes: BTreeMap<(String, i64), (String, i64)> = BTreeMap::new();
        for (client, seq, outcome, fingerprint) in std::mem::take(&mut self.outcomes) {
            outcomes.insert((client, seq), (outcome, fingerprint));
        }
        let outcomes: Vec<_> = outcomes.into_iter().collect();
        for chunk in outcomes.chunks(MAX_ROWS_PER_STATEMENT) {
            let mut cols: (Vec<String>, Vec<i64>, Vec<String>, Vec<i64>) = Default::default();
            for ((client, seq), (outcome, fingerprint)) in chunk.iter().cloned() {
                cols.0.push(client);
                cols.1.push(seq);
                cols.2.push(outcome);
                cols.3.push(fingerprint);
            }
            out.push((
                format!(
                    "INSERT INTO {f}.outcomes(client_id, seq, outcome, fingerprint) \
                     SELECT * FROM unnest($1::text[], $2::int8[], $3::text[], $4::int8[]) \
                     ON CONFLICT (client_id, seq) DO UPDATE SET outcome = EXCLUDED.outcome, \
                     fingerprint = EXCLUDED.fingerprint"
                ),
                vec![
                    Box::new(cols.0) as Param,
                    Box::new(cols.1),
                    Box::new(cols.2),
                    Box::new(cols.3),
                ],
            ));
        }
        // The last membership set of each row, by table.
        let mut memberships: BTreeMap<String, BTreeMap<String, (Vec<String>, bool)>> = BTreeMap::new();
        for (table, id, buckets, adds_only) in std::mem::take(&mut self.memberships) {
            memberships.entry(table).or_default().insert(id, (buckets, adds_only));
        }
        for (table, rows) in memberships {
            let (adds, sets): (Vec<_>, Vec<_>) = rows.into_iter().partition(|(_, (_, adds_only))| *adds_only);
            // Only added to: a plain insert (a new row's, mostly).
            for chunk in adds.chunks(MAX_ROWS_PER_STATEMENT) {
                let (ids, buckets): (Vec<String>, Vec<String>) = chunk
                    .iter()
                    .flat_map(|(id, (buckets, _))| buckets.iter().map(move |b| (id.clone(), b.clone())))
                    .unzip();
                if ids.is_empty() {
                    continue;
                }
                out.push((
                    format!(
                        "INSERT INTO {f}.row_buckets(tbl, id, bucket) \
                         SELECT $1, id, bucket FROM unnest($2::text[], $3::text[]) AS w(id, bucket) \
                         ON CONFLICT DO NOTHING"
                    ),
                    vec![Box::new(table.clone()) as Param, Box::new(ids), Box::new(buckets)],
                ));
            }
            let rows: Vec<(String, Vec<String>)> = sets.into_iter().map(|(id, (buckets, _))| (id, buckets)).collect();
            for chunk in rows.chunks(MAX_ROWS_PER_STATEMENT) {
                let ids: Vec<String> = chunk.iter().map(|(id, _)| id.clone()).collect();
                let (want_ids, want_buckets): (Vec<String>, Vec<String>) = chunk
                    .iter()
                    .flat_map(|(id, buckets)| buckets.iter().map(move |b| (id.clone(), b.clone())))
                    .unzip();
                out.push((
                    format!(
                        "{PLANNED_EACH_TIME}WITH w AS (SELECT * FROM unnest($3::text[], $4::text[]) AS w(id, bucket)), \
                         g AS (SELECT x.ctid FROM unnest($2::text[]) AS r(id) \
                               JOIN LATERAL (SELECT ctid, bucket FROM {f}.row_buckets \
                                             WHERE tbl = $1 AND id = r.id OFFSET 0) AS x ON true \
                               WHERE NOT EXISTS (SELECT 1 FROM w WHERE w.id = r.id AND w.bucket = x.bucket)), \
                         d AS (DELETE FROM {f}.row_buckets WHERE ctid = ANY(ARRAY(SELECT ctid FROM g))) \
                         INSERT INTO {f}.row_buckets(tbl, id, bucket) SELECT $1, id, bucket FROM w \
                         ON CONFLICT DO NOTHING"
                    ),
                    vec![
                        Box::new(table.clone()) as Param,
                        Box::new(ids),
                        Box::new(want_ids),
                        Box::new(want_buckets),
                    ],
                ));
            }
        }
        // The last clocks set of each row.
        let mut clocks: BTreeMap<(String, String), (String, bool)> = BTreeMap::new();
        for (table, id, c, tombstone) in std::mem::take(&mut self.clocks) {
            clocks.insert((table, id), (c, tombstone));
        }
        let clocks: Vec<_> = clocks.into_iter().collect();
        for chunk in clocks.chunks(MAX_ROWS_PER_STATEMENT) {
            let mut cols: (Vec<String>, Vec<String>, Vec<String>) = Default::default();
            // The rows that may have a tombstone.
            let mut tombstones: (Vec<String>, Vec<String>) = Default::default();
            for ((table, id), (c, tombstone)) in chunk.iter().cloned() {
                if tombstone {
                    tombstones.0.push(table.clone());
                    tombstones.1.push(id.clone());
                }
                cols.0.push(table);
                cols.1.push(id);
                cols.2.push(c);
            }
            out.push((
                format!(
                    "INSERT INTO {f}.clocks(tbl, id, clocks) \
                     SELECT * FROM unnest($1::text[], $2::text[], $3::text[]) \
                     ON CONFLICT (tbl, id) DO UPDATE SET clocks = EXCLUDED.clocks"
                ),
                vec![Box::new(cols.0) as Param, Box::new(cols.1), Box::new(cols.2)],
            ));
            if tombstones.0.is_empty() {
                continue;
            }
            // Tombstones are few: a probe per row finds them.
            out.push((
                format!(
                    "{PLANNED_EACH_TIME}DELETE FROM {f}.tombstones WHERE ctid = ANY(ARRAY( \
                     SELECT x.ctid FROM unnest($1::text[], $2::text[]) AS u(tbl, id) \
                     JOIN LATERAL (SELECT ctid FROM {f}.tombstones WHERE tbl = u.tbl AND id = u.id OFFSET 0) AS x \
                     ON true))"
                ),
                vec![Box::new(tombstones.0) as Param, Box::new(tombstones.1)],
            ));
        }
        let buckets: Vec<(String, BucketState)> = std::mem::take(&mut self.buckets).into_iter().collect();
        for chunk in buckets.chunks(MAX_ROWS_PER_STATEMENT) {
            let mut cols: (Vec<String>, Vec<i64>, Vec<i64>, Vec<i64>) = Default::default();
            for (bucket, state) in chunk.iter().cloned() {
                cols.0.push(bucket);
                cols.1.push(i64::from(state.checksum));
                cols.2.push(state.count as i64);
                cols.3.push(state.last_op_id as i64);
            }
            out.push((
                format!(
                    "INSERT INTO {f}.buckets(bucket, checksum, count, last_op_id) \
                     SELECT * FROM unnest($1::text[], $2::int8[], $3::int8[], $4::int8[]) \
                     ON CONFLICT (bucket) DO UPDATE SET checksum = EXCLUDED.checksum, \
                     count = EXCLUDED.count, last_op_id = EXCLUDED.last_op_id"
                ),
                vec![
                    Box::new(cols.0) as Param,
                    Box::new(cols.1),
                    Box::new(cols.2),
                    Box::new(cols.3),
                ],
            ));
        }
        out
    }
}

/// Multi-row `INSERT`s of op log entries, at most
/// [`MAX_ROWS_PER_STATEMENT`] rows each. `f` is Ferry's quoted schema.
pub(crate) fn oplog_inserts(f: &str, rows: &[OplogRow]) -> Vec<(String, Vec<Param>)> {
    rows.chunks(MAX_ROWS_PER_STATEMENT)
        .map(|chunk| {
            let ids: Vec<i64> = chunk.iter().map(|r| r.0).collect();
            let buckets: Vec<String> = chunk.iter().map(|r| r.1.clone()).collect();
            let ops: Vec<String> = chunk.iter().map(|r| r.2.clone()).collect();
            let tables: Vec<Option<String>> = chunk.iter().map(|r| r.3.clone()).collect();
            let row_ids: Vec<Option<String>> = chunk.iter().map(|r| r.4.clone()).collect();
            let datas: Vec<Option<String>> = chunk.iter().map(|r| r.5.clone()).collect();
            let checksums: Vec<i64> = chunk.iter().map(|r| r.6).collect();
            (
                format!(
                    "INSERT INTO {f}.oplog(op_id, bucket, op, tbl, row_id, data, checksum) \
                     SELECT * FROM unnest($1::int8[], $2::text[], $3::text[], $4::text[], $5::text[], \
                     $6::text[], $7::int8[])"
                ),
                vec![
                    Box::new(ids) as Param,
                    Box::new(buckets),
                    Box::new(ops),
                    Box::new(tables),
                    Box::new(row_ids),
                    Box::new(datas),
                    Box::new(checksums),
                ],
            )
        })
        .collect()
}
