//! `Query::explain`: which index, primary key or full scan serves a query,
//! over which range, and what each operator keeps.

use std::ops::Bound;

use ferry_core::{Index, Value};
use ferry_query::{col, count, Access, Operator, Order, Query};

fn indexes(collection: &str) -> Vec<Index> {
    match collection {
        "tickets" => vec![
            Index {
                name: "by_status".into(),
                columns: vec!["status".into()],
            },
            Index {
                name: "by_status_updated".into(),
                columns: vec!["status".into(), "updated_at".into()],
            },
            Index {
                name: "by_updated".into(),
                columns: vec!["updated_at".into()],
            },
        ],
        _ => Vec::new(),
    }
}

#[test]
fn a_filter_on_an_indexed_column_scans_its_range() {
    let q = Query::from("tickets").filter(col("status").eq("pending"));
    let plan = q.explain(&indexes);
    let scan = plan.access().index().expect("an index serves it");
    assert_eq!(scan.index, "by_status");
    assert_eq!(scan.equal, [Value::from("pending")]);
    assert!(scan.serves_order, "all columns fixed, no order: id order");
    assert_eq!(
        scan.bounds(),
        (
            Bound::Included(vec![Value::from("pending")]),
            Bound::Included(vec![Value::from("pending")])
        )
    );
    let text = plan.to_string();
    assert!(
        text.contains("tickets as tickets: index by_status (status), range status = \"pending\""),
        "{text}"
    );
    assert!(text.contains("filter: keeps nothing"), "{text}");
}

#[test]
fn order_and_limit_on_an_index_read_it_in_order() {
    let q = Query::from("tickets")
        .filter(col("status").eq("pending"))
        .select_cols(["id", "title", "updated_at"])
        .order_by(col("updated_at"), Order::Desc)
        .limit(50);
    let plan = q.explain(&indexes);
    let scan = plan.access().index().expect("an index serves it");
    assert_eq!(scan.index, "by_status_updated");
    assert!(scan.serves_order && scan.reverse, "{scan:?}");
    assert!(
        plan.to_string().contains("read backwards in the query's order"),
        "{plan}"
    );
    assert_eq!(
        plan.operators.last(),
        Some(&Operator::Window {
            order: vec!["updated_at desc".into()],
            offset: 0,
            limit: Some(50)
        })
    );

    // Order on an index with no filter: the whole index, in order.
    let q = Query::from("tickets").order_by(col("updated_at"), Order::Asc).limit(10);
    let scan = q.explain(&indexes).access().index().cloned().expect("index");
    assert_eq!(scan.index, "by_updated");
    assert!(scan.serves_order && !scan.reverse);
    assert_eq!(scan.bounds(), (Bound::Unbounded, Bound::Unbounded));
}

#[test]
fn a_range_on_an_indexed_column_bounds_the_scan() {
    let q = Query::from("tickets").filter(col("updated_at").gt(5).and(col("updated_at").lte(9)));
    let scan = q.explain(&indexes).access().index().cloned().expect("index");
    assert_eq!(scan.index, "by_updated");
    assert_eq!(scan.lower, Bound::Excluded(Value::from(5)));
    assert_eq!(scan.upper, Bound::Included(Value::from(9)));
}

#[test]
fn queries_no_index_serves_are_full_scans() {
    for q in [
        Query::from("tickets").filter(col("title").eq("x")),
        Query::from("tickets").order_by(col("title"), Order::Asc).limit(5),
        Query::from("tickets").filter(col("status").ne("done")),
        Query::from("comments").filter(col("ticket_id").eq("t1")),
    ] {
        let plan = q.explain(&indexes);
        assert_eq!(plan.access(), &Access::FullScan, "{q:?}");
        assert!(plan.to_string().contains(": full scan"), "{plan}");
    }
}

#[test]
fn ids_and_id_order_use_the_primary_key() {
    let q = Query::from("tickets").filter(col("id").eq("t1").and(col("status").eq("x")));
    assert_eq!(
        q.explain(&indexes).access(),
        &Access::PrimaryKey {
            ids: Some(vec![Value::from("t1")])
        }
    );
    let q = Query::from("tickets").limit(3);
    assert_eq!(q.explain(&indexes).access(), &Access::PrimaryKey { ids: None });
}

#[test]
fn joins_and_groups_say_what_they_keep() {
    let q = Query::from_as("tickets", "t")
        .left_join("comments", "c", "t.id", "c.ticket_id")
        .filter(col("t.status").eq("open"))
        .group_by([col("t.status")])
        .select([("status", col("t.status")), ("n", count())]);
    let plan = q.explain(&indexes);
    assert_eq!(plan.sources.len(), 2);
    assert_eq!(
        plan.sources[0].access.index().map(|s| s.index.as_str()),
        Some("by_status")
    );
    assert!(!plan.sources[0].access.index().is_some_and(|s| s.serves_order));
    assert_eq!(plan.sources[1].access, Access::FullScan);
    let text = plan.to_string();
    assert!(
        text.contains("Left join c on t.id = c.ticket_id: keeps both sides' rows, hashed by the join key"),
        "{text}"
    );
    assert!(
        text.contains("group by 1 key(s): keeps one running aggregate per group"),
        "{text}"
    );
}
