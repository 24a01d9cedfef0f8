//! Automerge bytes arriving in a CRDT column (uploaded by a client, or
//! stored by the server and read back).

use std::collections::BTreeMap;

use ferry_conflict::crdt::{load, merge, merge_into, read_text};
use ferry_conflict::strategy::{ConflictInput, ConflictStrategy, CurrentRow, Resolution};
use ferry_conflict::Crdt;
use ferry_core::{ColumnType, CrudOp, HlcTimestamp, RowData, Table, Value};

/// Split fuzz bytes into two documents: a little-endian `u16` length, the
/// first document, then the second.
pub(crate) fn split(data: &[u8]) -> (&[u8], &[u8]) {
    let Some((len, rest)) = data.split_first_chunk::<2>() else {
        return (data, &[]);
    };
    let len = usize::from(u16::from_le_bytes(*len)).min(rest.len());
    rest.split_at(len)
}

/// The fuzz input holding documents `a` and `b` (the inverse of
/// [`split`], for writing seeds). `a` longer than 65535 bytes is cut.
pub fn crdt_input(a: &[u8], b: &[u8]) -> Vec<u8> {
    let len = u16::try_from(a.len()).unwrap_or(u16::MAX);
    let mut out = len.to_le_bytes().to_vec();
    out.extend_from_slice(&a[..usize::from(len)]);
    out.extend_from_slice(b);
    out
}

fn hlc(wall_ms: u64, node: &str) -> HlcTimestamp {
    HlcTimestamp {
        wall_ms,
        counter: 0,
        node: node.to_owned(),
    }
}

/// Two byte strings `a` (stored) and `b` (incoming), from the data (see
/// [`crdt_input`]): the helpers never panic; a document that loads reads
/// the same after a save; whatever `merge` and `merge_into` produce loads
/// again; merging two documents reads the same in either order; and the
/// `Crdt` strategy, for a PATCH of the column with `b` over a stored `a`,
/// stores exactly what `merge_into` gives or rejects the op when that
/// fails.
pub fn crdt(data: &[u8]) {
    let (a, b) = split(data);
    let text_a = read_text(a).ok();
    let _ = read_text(b);
    let doc_a = load(a);
    if let Ok(mut doc) = doc_a {
        let saved = doc.save();
        assert_eq!(
            read_text(&saved).ok(),
            text_a,
            "a loaded document reads the same after a save"
        );
    }
    let merged_ab = merge(a, b);
    if let Ok(m) = &merged_ab {
        assert!(load(m).is_ok(), "merge produced bytes that do not load");
        if load(b).is_ok() {
            match merge(b, a) {
                Ok(m2) => assert_eq!(
                    read_text(m).ok(),
                    read_text(&m2).ok(),
                    "merge(a, b) and merge(b, a) read differently"
                ),
                Err(e) => panic!("merge(a, b) succeeded, merge(b, a) of two documents failed: {e}"),
            }
        }
    }
    if let Ok(m) = merge_into(None, b) {
        assert!(
            load(&m.bytes).is_ok(),
            "merge_into(None, b) stored bytes that do not load"
        );
    }
    let into = merge_into(Some(a), b);
    if let Ok(m) = &into {
        assert!(load(&m.bytes).is_ok(), "merge_into stored bytes that do not load");
    }

    // The server's path: the Crdt strategy on a PATCH of the column.
    let table = Table::new("notes")
        .column("body", ColumnType::Blob)
        .column("title", ColumnType::Text);
    let stored: RowData = [
        ("body".to_owned(), Value::Blob(a.to_vec())),
        ("title".to_owned(), Value::Text("t".to_owned())),
    ]
    .into_iter()
    .collect();
    let current = CurrentRow {
        data: Some(stored),
        clocks: BTreeMap::from([
            ("body".to_owned(), hlc(1, "server")),
            ("title".to_owned(), hlc(1, "server")),
        ]),
        deleted: None,
    };
    let op = CrudOp::Patch {
        table: "notes".to_owned(),
        id: "n1".to_owned(),
        data: [("body".to_owned(), Value::Blob(b.to_vec()))].into_iter().collect(),
    };
    let op_hlc = hlc(2, "client");
    let input = ConflictInput {
        table: &table,
        id: "n1",
        op: &op,
        hlc: &op_hlc,
        base: None,
        client_id: "client",
        user_id: "user",
        seq: 1,
        now_ms: 3,
        current: Some(&current),
    };
    let decision = Crdt::new(["body"]).resolve(&input);
    match (&into, &decision.resolution) {
        (Ok(m), Resolution::Write { row, .. }) => {
            assert_eq!(
                row.get("body"),
                Some(&Value::Blob(m.bytes.clone())),
                "the strategy stores the merge"
            );
        }
        (Err(_), Resolution::Reject { .. }) => {}
        (into, resolution) => panic!("merge_into gave {into:?} but the strategy decided {resolution:?}"),
    }
}
