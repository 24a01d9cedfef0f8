//! Bytes that make automerge 0.12 panic (found by fuzzing the CRDT
//! column) are refused as an invalid document, never a panic: a client
//! must not take a server worker down with a column value.

use ferry_conflict::crdt::{load, merge, merge_into, new_text_doc, read_text};
use ferry_conflict::ConflictError;

/// The fuzz input: a 2-byte length of the stored document (here 0), then
/// the incoming bytes.
const FUZZ_INPUT: &[u8] = include_bytes!("../../../fuzz/corpus/crdt/regression-automerge-panic");
const PANICKING: &[u8] = FUZZ_INPUT.split_at(2).1;

#[test]
fn automerge_panics_are_invalid_documents() {
    assert!(matches!(load(PANICKING), Err(ConflictError::InvalidDocument(_))));
    assert!(matches!(read_text(PANICKING), Err(ConflictError::InvalidDocument(_))));
    let good = new_text_doc("hello");
    assert!(merge_into(None, PANICKING).is_err());
    assert!(merge_into(Some(&good), PANICKING).is_err());
    // Changes appended to a good document: refused or ignored, never a panic.
    let _ = merge(&good, PANICKING);
    // The stored document is untouched and still reads.
    assert_eq!(read_text(&good).expect("good document"), "hello");
}
