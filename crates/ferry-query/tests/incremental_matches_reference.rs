//! Property: after every transaction, every live query equals the
//! from-scratch evaluation, and applying the emitted diffs (with their
//! positions) to the previous result reproduces the new one.

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use common::apply_strict;
use ferry_core::testkit::check;
use ferry_core::{row_data, RowData, Value};
use ferry_query::{
    avg, coalesce, col, concat, count, count_of, length, lit, lower, max, min, not, sum, upper, ChangeSet, Diff,
    JoinKind, Order, Query, QueryEngine, QueryResult, SubscriptionId,
};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

#[derive(Clone, Debug)]
enum Op {
    Upsert {
        coll: usize,
        id: u8,
        a: Option<i64>,
        b: Option<&'static str>,
        c: Option<Value>,
        pending: bool,
    },
    Delete {
        coll: usize,
        id: u8,
    },
    /// Re-upsert the row unchanged except for its pending flag.
    TogglePending {
        coll: usize,
        id: u8,
    },
}

const COLLS: [&str; 2] = ["t", "u"];

fn value_c() -> impl Strategy<Value = Option<Value>> {
    prop_oneof![
        1 => Just(None),
        2 => (0i64..4).prop_map(|i| Some(Value::Integer(i))),
        2 => (-8i32..8).prop_map(|k| Some(Value::Real(f64::from(k) * 0.25))),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let upsert = (
        0usize..2,
        0u8..10,
        proptest::option::weighted(0.8, -1i64..4),
        proptest::option::weighted(0.8, prop::sample::select(vec!["x", "X1", "y", "xy", ""])),
        value_c(),
        any::<bool>(),
    )
        .prop_map(|(coll, id, a, b, c, pending)| Op::Upsert {
            coll,
            id,
            a,
            b,
            c,
            pending,
        });
    let delete = (0usize..2, 0u8..10).prop_map(|(coll, id)| Op::Delete { coll, id });
    let toggle = (0usize..2, 0u8..10).prop_map(|(coll, id)| Op::TogglePending { coll, id });
    prop_oneof![6 => upsert, 2 => delete, 1 => toggle]
}

fn txns() -> impl Strategy<Value = Vec<Vec<Op>>> {
    prop::collection::vec(prop::collection::vec(op(), 1..8), 1..14)
}

/// The rows as the app sees them, to turn ops into change sets.
type Model = std::collections::HashMap<(usize, u8), (RowData, bool)>;

fn change_set(model: &mut Model, ops: &[Op]) -> ChangeSet {
    let mut cs = ChangeSet::new();
    for o in ops {
        match o {
            Op::Upsert {
                coll,
                id,
                a,
                b,
                c,
                pending,
            } => {
                let mut d: RowData = row_data([("a", Value::from(*a)), ("c", c.clone().unwrap_or(Value::Null))]);
                if let Some(b) = b {
                    d.insert("b".into(), (*b).into());
                }
                model.insert((*coll, *id), (d.clone(), *pending));
                cs = cs.upsert(COLLS[*coll], format!("{}{id}", COLLS[*coll]), d, *pending);
            }
            Op::Delete { coll, id } => {
                model.remove(&(*coll, *id));
                cs = cs.delete(COLLS[*coll], format!("{}{id}", COLLS[*coll]));
            }
            Op::TogglePending { coll, id } => {
                if let Some((d, p)) = model.get_mut(&(*coll, *id)) {
                    *p = !*p;
                    cs = cs.upsert(COLLS[*coll], format!("{}{id}", COLLS[*coll]), d.clone(), *p);
                }
            }
        }
    }
    cs
}

/// Every query shape the engine supports.
fn queries() -> Vec<(&'static str, Query)> {
    let t = || Query::from("t");
    let j = |kind: JoinKind, two: bool| {
        let on: Vec<(&str, &str)> = if two {
            vec![("t.a", "u.a"), ("u.b", "t.b")]
        } else {
            vec![("t.a", "u.a")]
        };
        Query::from("t").join(kind, "u", "u", on)
    };
    let mut qs = vec![
        ("all", t()),
        ("filter_or_like", t().filter(col("a").gt(1).or(col("b").like("x%")))),
        ("filter_not_eq", t().filter(not(col("a").eq(2)))),
        (
            "filter_in_null",
            t().filter(col("a").is_in([lit(1), lit(2), lit(Value::Null)])),
        ),
        (
            "filter_not_in_null",
            t().filter(col("a").is_in([lit(1), lit(Value::Null)]).not()),
        ),
        ("filter_ilike", t().filter(col("b").ilike("x_"))),
        ("filter_is_null", t().filter(col("c").is_null().and(col("a").gte(0)))),
        (
            "filter_pending_only_cols",
            t().filter(col("a").lte(1)).select_cols(["id"]),
        ),
        (
            "project_computed",
            t().select([
                ("id", col("id")),
                ("ub", upper(col("b"))),
                ("lb", lower(col("b"))),
                ("sum", col("a").add(col("c"))),
                ("cb", coalesce([col("b"), lit("none")])),
                ("len", length(col("b"))),
                ("cat", concat([col("b"), lit("-"), col("a")])),
                ("div", col("a").divide(col("c"))),
                ("idiv", col("a").divide(2)),
                ("lin", col("a").multiply(2).subtract(1)),
                ("ne", col("a").ne(col("c"))),
            ]),
        ),
        (
            "order_multi_limit_offset",
            t().select_cols(["id", "a", "c"])
                .order_by(col("a"), Order::Desc)
                .order_by(col("c"), Order::Asc)
                .limit(3)
                .offset(2),
        ),
        (
            "order_by_unselected",
            t().select_cols(["id"])
                .order_by(col("b"), Order::Asc)
                .order_by(col("a"), Order::Desc)
                .limit(4),
        ),
        ("order_offset_only", t().order_by(col("c"), Order::Desc).offset(3)),
        ("order_limit0", t().order_by(col("a"), Order::Asc).limit(0)),
        (
            "order_offset_beyond",
            t().order_by(col("a"), Order::Asc).offset(50).limit(5),
        ),
        (
            "order_computed",
            t().order_by(col("a").multiply(col("c")), Order::Desc).limit(5),
        ),
        (
            "order_alias",
            t().select([("k", col("a").add(1))])
                .order_by(col("k"), Order::Desc)
                .limit(4),
        ),
        ("no_order_limit", t().limit(2).offset(1)),
        (
            "find_one",
            t().filter(col("b").is_not_null())
                .order_by(col("c"), Order::Desc)
                .find_one(),
        ),
        (
            "group_all_aggs",
            t().group_by([col("b")]).select([
                ("b", col("b")),
                ("n", count()),
                ("nc", count_of(col("c"))),
                ("s", sum(col("c"))),
                ("sa", sum(col("a"))),
                ("av", avg(col("c"))),
                ("mn", min(col("c"))),
                ("mx", max(col("c"))),
                ("mxb", max(col("b"))),
            ]),
        ),
        (
            "group_having_order",
            t().group_by([col("a")])
                .select([("a", col("a")), ("n", count()), ("s", sum(col("c")))])
                .having(count().gt(1))
                .order_by(col("n"), Order::Desc)
                .limit(2),
        ),
        (
            "group_two_keys",
            t().group_by([col("a"), col("b")]).select([
                ("a", col("a")),
                ("b", col("b")),
                ("mn", min(col("c"))),
                ("k", col("a").add(max(col("c")))),
            ]),
        ),
        (
            "global_agg",
            t().select([
                ("n", count()),
                ("s", sum(col("a"))),
                ("av", avg(col("a"))),
                ("mx", max(col("b"))),
            ]),
        ),
        (
            "global_agg_filtered",
            t().filter(col("a").gt(2))
                .select([("n", count()), ("s", sum(col("c")))]),
        ),
        ("global_having", t().select([("n", count())]).having(count().gt(3))),
        ("distinct_b", t().select_cols(["b"]).distinct()),
        (
            "distinct_order_limit",
            t().select_cols(["a", "b"])
                .distinct()
                .order_by(col("a"), Order::Desc)
                .limit(3)
                .offset(1),
        ),
        ("distinct_star", t().distinct()),
        (
            "group_distinct",
            t().group_by([col("b")])
                .select([("n", count())])
                .distinct()
                .order_by(col("n"), Order::Asc),
        ),
    ];
    for (kind, name) in [
        (JoinKind::Inner, "inner"),
        (JoinKind::Left, "left"),
        (JoinKind::Right, "right"),
        (JoinKind::Full, "full"),
    ] {
        qs.push((
            Box::leak(format!("join_{name}_1").into_boxed_str()),
            j(kind, false).select([
                ("tid", col("t.id")),
                ("uid", col("u.id")),
                ("tc", col("t.c")),
                ("uc", col("u.c")),
            ]),
        ));
        qs.push((Box::leak(format!("join_{name}_2_star").into_boxed_str()), j(kind, true)));
        qs.push((
            Box::leak(format!("join_{name}_filter_order").into_boxed_str()),
            j(kind, false)
                .filter(col("u.c").is_null().or(col("t.c").lt(col("u.c"))))
                .select([
                    ("tid", col("t.id")),
                    ("uid", col("u.id")),
                    ("x", coalesce([col("u.b"), col("t.b")])),
                ])
                .order_by(col("x"), Order::Desc)
                .limit(4)
                .offset(1),
        ));
        qs.push((
            Box::leak(format!("join_{name}_group").into_boxed_str()),
            j(kind, false).group_by([col("u.b")]).select([
                ("ub", col("u.b")),
                ("n", count()),
                ("s", sum(col("t.c"))),
                ("m", max(col("u.a"))),
            ]),
        ));
    }
    qs.push((
        "self_join_chain",
        Query::from_as("t", "t1")
            .join(JoinKind::Left, "t", "t2", [("t1.b", "t2.b")])
            .join(JoinKind::Full, "u", "u", [("u.a", "t2.a")])
            .select([("a", col("t1.id")), ("b", col("t2.id")), ("c", col("u.id"))])
            .order_by(col("u.c"), Order::Asc)
            .limit(6),
    ));
    qs
}

fn run(txns: Vec<Vec<Op>>) -> Result<(), TestCaseError> {
    let mut db = QueryEngine::new();
    let mut model = Model::new();
    for c in COLLS {
        db.create_collection(c)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
    }
    let qs = queries();
    let mut txns = txns.into_iter();
    // A first transaction before subscribing, so builds start from data.
    if let Some(first) = txns.next() {
        db.apply(change_set(&mut model, &first))
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
    }
    let mut subs: Vec<(SubscriptionId, &str, Query, QueryResult)> = Vec::new();
    for (name, q) in &qs {
        let (id, initial) = db.subscribe(q).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let expected = db.query(q).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(&initial, &expected, "initial result of {}", name);
        subs.push((id, name, q.clone(), initial));
    }
    // One more through the callback form.
    let seen: Arc<Mutex<Vec<Diff>>> = Arc::default();
    let sink = seen.clone();
    let cb_query = qs[9].1.clone();
    let (cb_id, mut cb_result) = db
        .subscribe_with(
            &cb_query,
            Box::new(move |d: &Diff| {
                if let Ok(mut v) = sink.lock() {
                    v.push(d.clone());
                }
            }),
        )
        .map_err(|e| TestCaseError::fail(e.to_string()))?;

    for (step, txn) in txns.enumerate() {
        let diffs = db
            .apply(change_set(&mut model, &txn))
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let ids: BTreeSet<SubscriptionId> = diffs.iter().map(|d| d.subscription).collect();
        prop_assert_eq!(ids.len(), diffs.len(), "one diff per subscription per transaction");
        prop_assert!(!ids.contains(&cb_id), "callback subscription diffs are not returned");
        for (id, name, q, result) in &mut subs {
            let expected = db.query(q).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let live = db.current(*id).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(&live, &expected, "live result of {} at step {}", name, step);
            if let Some(d) = diffs.iter().find(|d| d.subscription == *id) {
                prop_assert!(!d.is_empty(), "empty diff for {}", name);
                let next = apply_strict(result, d)
                    .map_err(|e| TestCaseError::fail(format!("{name} step {step}: {e}\ndiff: {d:#?}")))?;
                *result = next;
            }
            prop_assert_eq!(&*result, &expected, "diff-applied result of {} at step {}", name, step);
        }
        let got: Vec<Diff> = seen.lock().map(|mut v| std::mem::take(&mut *v)).unwrap_or_default();
        prop_assert!(
            got.len() <= 1,
            "callback called {} times for one transaction",
            got.len()
        );
        for d in &got {
            cb_result = apply_strict(&cb_result, d).map_err(TestCaseError::fail)?;
        }
        let expected = db.query(&cb_query).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(&cb_result, &expected, "callback result at step {}", step);
    }
    for (id, ..) in &subs {
        db.unsubscribe(*id).map_err(|e| TestCaseError::fail(e.to_string()))?;
    }
    db.unsubscribe(cb_id).map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(db.subscription_count(), 0);
    Ok(())
}

#[test]
fn live_queries_match_reference() {
    check("live_queries_match_reference", 96, txns(), run);
}
