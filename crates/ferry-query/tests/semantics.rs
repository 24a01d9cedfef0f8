//! Table tests: NULL semantics, ordering ties, limit/offset edges, joins
//! with missing partners, empty groups, errors.

mod common;

use ferry_core::{row_data, ErrorKind, RowData, Value};
use ferry_query::{
    avg, coalesce, col, concat, count, length, lit, lower, max, min, not, sum, upper, ChangeSet, Expr, JoinKind, Order,
    Query, QueryEngine, QueryError,
};

fn v<T: Into<Value>>(x: T) -> Value {
    x.into()
}

const NULL: Value = Value::Null;

fn engine_with(rows: &[(&str, RowData)]) -> QueryEngine {
    let mut db = QueryEngine::new();
    db.create_collection("t").expect("create");
    let mut cs = ChangeSet::new();
    for (id, d) in rows {
        cs = cs.upsert("t", *id, d.clone(), false);
    }
    db.apply(cs).expect("apply");
    db
}

/// Evaluate an expression over one row (id "r") through a one-shot query,
/// and check a live query agrees.
fn eval(e: Expr, row: RowData) -> Value {
    let mut db = engine_with(&[("r", row)]);
    let q = Query::from("t").select([("v", e)]);
    let once = db.query(&q).expect("query");
    let (_, live) = db.subscribe(&q).expect("subscribe");
    assert_eq!(once, live);
    once.rows[0].get("v").clone()
}

fn keeps(e: Expr, row: RowData) -> bool {
    let db = engine_with(&[("r", row)]);
    !db.query(&Query::from("t").filter(e)).expect("query").is_empty()
}

#[test]
fn expression_table() {
    let row = || row_data([("n", NULL), ("i", v(3)), ("r", v(1.5)), ("s", v("Héllo")), ("z", v(0))]);
    let cases: Vec<(&str, Expr, Value)> = vec![
        ("null = null", col("n").eq(col("n")), NULL),
        ("null <> 1", col("n").ne(1), NULL),
        ("3 > null", col("i").gt(col("n")), NULL),
        ("3 = 3.0", col("i").eq(3.0), v(1)),
        ("3 < 'a' (numbers before text)", col("i").lt("a"), v(1)),
        ("3 >= 1.5", col("i").gte(col("r")), v(1)),
        ("3 <= 1.5", col("i").lte(col("r")), v(0)),
        ("null and false", col("n").eq(1).and(col("i").eq(0)), v(0)),
        ("null and true", col("n").eq(1).and(col("i").eq(3)), NULL),
        ("null or true", col("n").eq(1).or(col("i").eq(3)), v(1)),
        ("null or false", col("n").eq(1).or(col("i").eq(0)), NULL),
        ("not null", not(col("n").eq(1)), NULL),
        ("not false", not(col("i").eq(0)), v(1)),
        ("3 in (1, 3)", col("i").is_in([1, 3]), v(1)),
        ("3 in (1, null)", col("i").is_in([lit(1), lit(NULL)]), NULL),
        ("3 in (1, 2)", col("i").is_in([1, 2]), v(0)),
        ("null in (1)", col("n").is_in([1]), NULL),
        ("like ascii case", col("s").like("h%O"), v(1)),
        ("like non-ascii case is exact", col("s").like("HÉLLO"), v(0)),
        ("ilike unicode", col("s").ilike("HÉLLO"), v(1)),
        ("like underscore", col("s").like("H_llo"), v(1)),
        ("like no match", col("s").like("H_lo"), v(0)),
        ("like null", col("n").like("%"), NULL),
        ("like number", col("i").like("3"), v(1)),
        ("is null", col("n").is_null(), v(1)),
        ("missing column is null", col("nope").is_null(), v(1)),
        ("is not null", col("i").is_not_null(), v(1)),
        ("upper", upper(col("s")), v("HéLLO")),
        ("lower", lower(col("s")), v("héllo")),
        ("length chars", length(col("s")), v(5)),
        ("length null", length(col("n")), NULL),
        (
            "concat skips null",
            concat([col("s"), col("n"), lit("!"), col("i")]),
            v("Héllo!3"),
        ),
        ("coalesce", coalesce([col("n"), col("i")]), v(3)),
        ("coalesce all null", coalesce([col("n")]), NULL),
        ("add int", col("i").add(2), v(5)),
        ("add real", col("i").add(col("r")), v(4.5)),
        ("add null", col("i").add(col("n")), NULL),
        ("subtract", col("i").subtract(5), v(-2)),
        ("multiply", col("r").multiply(2), v(3.0)),
        ("int divide truncates", col("i").divide(2), v(1)),
        ("real divide", col("i").divide(2.0), v(1.5)),
        ("divide by zero", col("i").divide(col("z")), NULL),
        ("divide by real zero", col("i").divide(0.0), NULL),
        (
            "overflow becomes real",
            lit(i64::MAX).add(1),
            v(9.223_372_036_854_776e18),
        ),
        ("id column", col("id"), v("r")),
    ];
    for (name, e, want) in cases {
        let got = eval(e, row());
        assert!(
            got == want && got.type_name() == want.type_name(),
            "{name}: got {got:?}, want {want:?}"
        );
    }
}

#[test]
fn where_keeps_only_true() {
    let row = || row_data([("n", NULL), ("i", v(3)), ("s", v("x"))]);
    assert!(keeps(col("i").eq(3), row()));
    assert!(!keeps(col("n").eq(3), row()), "unknown is dropped");
    assert!(!keeps(not(col("n").eq(3)), row()), "not unknown is unknown");
    assert!(keeps(col("n").eq(3).or(col("i").eq(3)), row()));
    assert!(!keeps(col("s"), row()), "text is not true");
    assert!(keeps(col("i"), row()), "non-zero number is true");
}

fn ids(r: &ferry_query::QueryResult) -> Vec<String> {
    r.rows.iter().map(|r| r.id().unwrap_or("?").to_owned()).collect()
}

#[test]
fn ties_break_by_id_and_nulls_sort_first_ascending() {
    let db = engine_with(&[
        ("c", row_data([("k", v(1))])),
        ("a", row_data([("k", v(1))])),
        ("b", row_data([("k", NULL)])),
        ("d", row_data([("k", v(0.5))])),
        ("e", row_data([("k", v("t"))])),
    ]);
    let asc = db.query(&Query::from("t").order_by(col("k"), Order::Asc)).expect("q");
    assert_eq!(ids(&asc), ["b", "d", "a", "c", "e"]);
    let desc = db.query(&Query::from("t").order_by(col("k"), Order::Desc)).expect("q");
    assert_eq!(ids(&desc), ["e", "a", "c", "d", "b"], "ties stay ascending by id");
    let none = db.query(&Query::from("t")).expect("q");
    assert_eq!(ids(&none), ["a", "b", "c", "d", "e"], "no order_by: by id");
}

#[test]
fn limit_and_offset_edges() {
    let rows: Vec<(String, RowData)> = (0..5).map(|i| (format!("r{i}"), row_data([("k", v(i))]))).collect();
    let refs: Vec<(&str, RowData)> = rows.iter().map(|(i, d)| (i.as_str(), d.clone())).collect();
    let mut db = engine_with(&refs);
    let cases: Vec<(Option<usize>, usize, Vec<&str>)> = vec![
        (Some(0), 0, vec![]),
        (Some(2), 0, vec!["r0", "r1"]),
        (Some(2), 4, vec!["r4"]),
        (Some(2), 5, vec![]),
        (Some(10), 7, vec![]),
        (None, 3, vec!["r3", "r4"]),
        (Some(100), 0, vec!["r0", "r1", "r2", "r3", "r4"]),
    ];
    for (limit, offset, want) in cases {
        let mut q = Query::from("t").order_by(col("k"), Order::Asc).offset(offset);
        if let Some(l) = limit {
            q = q.limit(l);
        }
        assert_eq!(ids(&db.query(&q).expect("q")), want, "limit {limit:?} offset {offset}");
        let (_, live) = db.subscribe(&q).expect("sub");
        assert_eq!(ids(&live), want, "live limit {limit:?} offset {offset}");
    }
    // A row inserted before the window shifts it by one: one added, one removed.
    let q = Query::from("t").order_by(col("k"), Order::Asc).offset(1).limit(2);
    let (sub, before) = db.subscribe(&q).expect("sub");
    let diffs = db
        .apply(ChangeSet::new().upsert("t", "new", row_data([("k", v(-1))]), false))
        .expect("apply");
    let d = diffs.iter().find(|d| d.subscription == sub).expect("diff");
    assert_eq!(d.added.len(), 1);
    assert_eq!(d.added[0].index, 0);
    assert_eq!(d.added[0].row.id(), Some("r0"));
    assert_eq!(d.removed.len(), 1);
    assert_eq!(d.removed[0].index, 1);
    assert_eq!(d.removed[0].row.id(), Some("r2"));
    let after = common::apply_strict(&before, d).expect("apply diff");
    assert_eq!(ids(&after), ["r0", "r1"]);
    assert!(ids(&db.query(&Query::from("t").find_one()).expect("q")) == ["new"]);
}

#[test]
fn joins_with_missing_partners() {
    let mut db = QueryEngine::new();
    db.create_collection("t").expect("c");
    db.create_collection("a").expect("c");
    db.apply(
        ChangeSet::new()
            .upsert("t", "t1", row_data([("title", v("one"))]), false)
            .upsert("t", "t2", row_data([("title", v("two"))]), false)
            .upsert("a", "a1", row_data([("ticket", v("t1")), ("who", v("ann"))]), false)
            .upsert("a", "a2", row_data([("ticket", v("t9")), ("who", v("bob"))]), false)
            .upsert("a", "a3", row_data([("ticket", NULL), ("who", v("cy"))]), false),
    )
    .expect("apply");
    let pairs = |kind: JoinKind| -> Vec<(Value, Value)> {
        let q = Query::from("t")
            .join(kind, "a", "a", [("t.id", "a.ticket")])
            .select([("t", col("t.id")), ("a", col("a.id"))]);
        let r = db.query(&q).expect("q");
        r.rows
            .iter()
            .map(|r| (r.get("t").clone(), r.get("a").clone()))
            .collect()
    };
    assert_eq!(pairs(JoinKind::Inner), vec![(v("t1"), v("a1"))]);
    assert_eq!(pairs(JoinKind::Left), vec![(v("t1"), v("a1")), (v("t2"), NULL)]);
    assert_eq!(
        pairs(JoinKind::Right),
        vec![(NULL, v("a2")), (NULL, v("a3")), (v("t1"), v("a1"))],
        "unmatched right rows (NULL key included) sort first: their t id is NULL"
    );
    assert_eq!(
        pairs(JoinKind::Full),
        vec![(NULL, v("a2")), (NULL, v("a3")), (v("t1"), v("a1")), (v("t2"), NULL)]
    );

    // Live: a partner appearing replaces the NULL-padded row.
    let q = Query::from("t")
        .left_join("a", "a", "t.id", "a.ticket")
        .select([("who", col("a.who"))]);
    let (sub, before) = db.subscribe(&q).expect("sub");
    let diffs = db
        .apply(ChangeSet::new().upsert("a", "a4", row_data([("ticket", v("t2")), ("who", v("dee"))]), false))
        .expect("apply");
    let d = diffs.iter().find(|d| d.subscription == sub).expect("diff");
    assert_eq!(d.removed.len(), 1, "{d:#?}");
    assert_eq!(d.added.len(), 1);
    assert_eq!(d.added[0].row.get("who"), &v("dee"));
    assert_eq!(
        common::apply_strict(&before, d).expect("apply"),
        db.query(&q).expect("q")
    );
}

#[test]
fn empty_groups_disappear_and_global_aggregates_stay() {
    let mut db = engine_with(&[
        ("r1", row_data([("g", v("x")), ("n", v(2))])),
        ("r2", row_data([("g", v("y")), ("n", v(5))])),
    ]);
    let grouped = Query::from("t")
        .group_by([col("g")])
        .select([("g", col("g")), ("n", count()), ("s", sum(col("n")))]);
    let global = Query::from("t").select([
        ("n", count()),
        ("s", sum(col("n"))),
        ("a", avg(col("n"))),
        ("lo", min(col("n"))),
        ("hi", max(col("n"))),
    ]);
    let (gs, _) = db.subscribe(&grouped).expect("sub");
    let (gl, _) = db.subscribe(&global).expect("sub");
    let diffs = db.apply(ChangeSet::new().delete("t", "r1")).expect("apply");
    let d = diffs.iter().find(|d| d.subscription == gs).expect("diff");
    assert_eq!(d.removed.len(), 1);
    assert_eq!(d.removed[0].row.get("g"), &v("x"));
    db.apply(ChangeSet::new().delete("t", "r2")).expect("apply");
    assert!(db.current(gs).expect("cur").is_empty());
    let g = db.current(gl).expect("cur");
    assert_eq!(g.len(), 1, "a global aggregate over nothing is one row");
    let row = &g.rows[0];
    assert_eq!(row.get("n"), &v(0));
    for c in ["s", "a", "lo", "hi"] {
        assert_eq!(row.get(c), &NULL, "{c}");
    }
    assert_eq!(db.query(&global).expect("q"), g);
    // min/max after deleting the extreme are exact.
    db.apply(
        ChangeSet::new()
            .upsert("t", "a", row_data([("n", v(1))]), false)
            .upsert("t", "b", row_data([("n", v(9))]), false)
            .upsert("t", "c", row_data([("n", v(4))]), false),
    )
    .expect("apply");
    db.apply(ChangeSet::new().delete("t", "b").delete("t", "a"))
        .expect("apply");
    let g = db.current(gl).expect("cur");
    assert_eq!(g.rows[0].get("lo"), &v(4));
    assert_eq!(g.rows[0].get("hi"), &v(4));
}

#[test]
fn pending_flag_change_is_an_update() {
    let mut db = engine_with(&[("r1", row_data([("k", v(1))]))]);
    let q = Query::from("t").select_cols(["k"]);
    let (sub, _) = db.subscribe(&q).expect("sub");
    let diffs = db
        .apply(ChangeSet::new().upsert("t", "r1", row_data([("k", v(1))]), true))
        .expect("apply");
    let d = diffs.iter().find(|d| d.subscription == sub).expect("diff");
    assert_eq!(d.updated.len(), 1);
    assert!(!d.updated[0].old.pending);
    assert!(d.updated[0].new.pending);
    // Same row again: nothing to report.
    let diffs = db
        .apply(ChangeSet::new().upsert("t", "r1", row_data([("k", v(1))]), true))
        .expect("apply");
    assert!(diffs.is_empty());
}

#[test]
fn one_diff_per_transaction() {
    let mut db = engine_with(&[]);
    let q = Query::from("t").order_by(col("k"), Order::Desc).limit(3);
    let (sub, _) = db.subscribe(&q).expect("sub");
    let mut cs = ChangeSet::new();
    for i in 0..100 {
        cs = cs.upsert("t", format!("r{i}"), row_data([("k", v(i))]), false);
    }
    let diffs = db.apply(cs).expect("apply");
    assert_eq!(diffs.len(), 1);
    assert_eq!(diffs[0].subscription, sub);
    assert_eq!(diffs[0].added.len(), 3);
    db.unsubscribe(sub).expect("unsub");
    assert!(db.apply(ChangeSet::new().delete("t", "r99")).expect("apply").is_empty());
    assert!(matches!(
        db.unsubscribe(sub),
        Err(QueryError::UnknownSubscription { .. })
    ));
}

#[test]
fn rows_deserialize_into_app_structs() {
    #[derive(serde::Deserialize, Debug, PartialEq)]
    struct Ticket {
        id: String,
        title: String,
        version: i64,
    }
    let db = engine_with(&[(
        "t1",
        row_data([("title", v("hi")), ("version", v(2)), ("extra", v(1.5))]),
    )]);
    let r = db.query(&Query::from("t")).expect("q");
    assert_eq!(
        r.rows_as::<Ticket>().expect("deserialize"),
        vec![Ticket {
            id: "t1".into(),
            title: "hi".into(),
            version: 2
        }]
    );
    let err = db
        .query(&Query::from("t").select_cols(["title"]))
        .expect("q")
        .rows_as::<Ticket>()
        .expect_err("missing id");
    assert!(matches!(err, QueryError::Deserialize { .. }));
}

#[test]
fn errors_are_permanent_and_name_the_bad_value() {
    let mut db = QueryEngine::new();
    db.create_collection_with_columns("t", ["title"]).expect("c");
    let cases: Vec<(Query, &str)> = vec![
        (Query::from("nope"), "unknown collection \"nope\""),
        (Query::from("t").filter(col("titel").eq(1)), "unknown column \"titel\""),
        (
            Query::from("t").select([("x", col("zz.title"))]),
            "unknown column \"zz.title\"",
        ),
        (
            Query::from("t").group_by([col("title")]).select([("x", col("id"))]),
            "column \"id\" must appear in group_by or inside an aggregate",
        ),
        (Query::from("t").filter(count().gt(1)), "aggregate not allowed in where"),
        (
            Query::from("t").join(JoinKind::Inner, "t", "t", [("t.id", "t.title")]),
            "duplicate alias \"t\"",
        ),
        (
            Query::from("t")
                .select_cols(["title"])
                .order_by(col("nope"), Order::Asc)
                .distinct(),
            "unknown column \"nope\"",
        ),
    ];
    for (q, msg) in cases {
        let err = db.subscribe(&q).expect_err(msg);
        assert_eq!(err.to_string(), msg);
        assert_eq!(err.kind(), ErrorKind::Permanent);
        assert_eq!(db.query(&q).expect_err(msg), err);
    }
    let err = db
        .apply(
            ChangeSet::new()
                .upsert("t", "x", RowData::new(), false)
                .delete("missing", "x"),
        )
        .expect_err("unknown collection");
    assert_eq!(err.to_string(), "unknown collection \"missing\"");
    assert_eq!(db.len("t").expect("len"), 0, "nothing applied");
    assert!(db.create_collection("t").is_err());
}

#[test]
fn collection_bytes_sums_ids_and_encoded_rows() {
    let a = row_data([("n", Value::Integer(1)), ("s", Value::from("x"))]);
    let b = row_data([("s", Value::from("longer text"))]);
    let mut db = engine_with(&[("a", a.clone()), ("bb", b.clone())]);
    let size = |d: &RowData| ferry_core::codec::encode_row(d).len();
    assert_eq!(db.collection_bytes("t").expect("bytes"), 1 + size(&a) + 2 + size(&b));
    // A replaced row counts once, with its new data; a deleted one not at all.
    db.apply(ChangeSet::new().upsert("t", "a", b.clone(), true).delete("t", "bb"))
        .expect("apply");
    assert_eq!(db.collection_bytes("t").expect("bytes"), 1 + size(&b));
    assert!(db.collection_bytes("missing").is_err());
}
