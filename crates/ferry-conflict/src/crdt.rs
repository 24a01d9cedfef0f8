//! CRDT columns: a column holding an automerge document (its `save()`
//! bytes, as a blob), merged on the server; plus pure helpers for clients
//! to create, read, edit and merge text documents.
//!
//! A text document keeps its text in a text object under the root key
//! [`TEXT_KEY`]. Every helper is deterministic: changes are committed with
//! time 0 and the actor given (no clock, no randomness), so the same edit
//! of the same document gives the same bytes.

use std::collections::BTreeMap;
use std::sync::Arc;

use automerge::transaction::{CommitOptions, Transactable};
use automerge::{ActorId, AutoCommit, ObjId, ObjType, ReadDoc, ROOT};
use ferry_core::{HlcTimestamp, RowData, Value};

use crate::error::{ConflictError, Result};
use crate::lww::{later_clock, LastWriteWins};
use crate::per_column::PerColumn;
use crate::strategy::{ConflictInput, ConflictStrategy, Decision, Resolution};

/// The root key of a text document's text.
pub const TEXT_KEY: &str = "text";

fn invalid(e: impl std::fmt::Display) -> ConflictError {
    ConflictError::InvalidDocument(e.to_string())
}

fn commit(doc: &mut AutoCommit) {
    doc.commit_with(CommitOptions::default().with_time(0));
}

/// A 16-byte actor derived from `seed` (FNV-1a, twice).
fn actor_for(seed: &[u8]) -> ActorId {
    let mut out = [0u8; 16];
    for (half, chunk) in out.chunks_mut(8).enumerate() {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ (half as u64);
        for b in seed {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        chunk.copy_from_slice(&h.to_le_bytes());
    }
    ActorId::from(out)
}

/// A new text document holding `text`. Deterministic: the actor is derived
/// from the text, so two replicas creating the same document get the same
/// change (and two different initial texts are concurrent puts of the
/// root key, of which automerge keeps one everywhere).
pub fn new_text_doc(text: &str) -> Vec<u8> {
    let mut seed = b"ferry-text-init:".to_vec();
    seed.extend_from_slice(text.as_bytes());
    let mut doc = AutoCommit::new().with_actor(actor_for(&seed));
    // A fresh document accepts these ops; an error would leave it empty,
    // which read_text reports.
    if let Ok(obj) = doc.put_object(ROOT, TEXT_KEY, ObjType::Text) {
        let _ = doc.splice_text(&obj, 0, 0, text);
    }
    commit(&mut doc);
    doc.save()
}

fn text_obj(doc: &AutoCommit) -> Result<ObjId> {
    match doc.get(ROOT, TEXT_KEY).map_err(invalid)? {
        Some((automerge::Value::Object(ObjType::Text), id)) => Ok(id),
        _ => Err(ConflictError::NoText { key: TEXT_KEY }),
    }
}

/// Load a document (a `save()`, or a save followed by incremental
/// chunks).
pub fn load(bytes: &[u8]) -> Result<AutoCommit> {
    guarded(|| AutoCommit::load(bytes).map_err(invalid))
}

/// Run automerge on bytes from outside. Some malformed documents make
/// automerge 0.12 panic instead of returning an error (found by fuzzing:
/// `fuzz/corpus/crdt/regression-automerge-panic`); a client must not be
/// able to take a server worker down with a column value, so a panic here
/// is the same refusal as any other invalid document.
fn guarded<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .unwrap_or_else(|_| Err(invalid("automerge failed on malformed bytes")))
}

/// The text of a text document.
pub fn read_text(bytes: &[u8]) -> Result<String> {
    guarded(|| {
        let doc = load(bytes)?;
        let obj = text_obj(&doc)?;
        doc.text(&obj).map_err(invalid)
    })
}

/// Edits of a text document, inside [`edit_text`]. Positions count
/// Unicode code points (automerge's default text encoding).
/// The first failing edit stops the others and fails `edit_text`.
#[derive(Debug)]
pub struct TextEdit<'a> {
    doc: &'a mut AutoCommit,
    obj: ObjId,
    error: Option<ConflictError>,
}

impl TextEdit<'_> {
    /// Delete `delete` characters at `pos` and insert `text` there.
    pub fn splice(&mut self, pos: usize, delete: usize, text: &str) -> &mut Self {
        let len = self.doc.length(&self.obj);
        if self.error.is_none() && pos.saturating_add(delete) > len {
            self.error = Some(ConflictError::Edit(format!(
                "splice at {pos} deleting {delete} chars is outside the text of {len} chars"
            )));
        }
        if self.error.is_none() {
            let del = isize::try_from(delete).unwrap_or(isize::MAX);
            if let Err(e) = self.doc.splice_text(&self.obj, pos, del, text) {
                self.error = Some(ConflictError::Edit(format!(
                    "splice at {pos} deleting {delete} chars: {e}"
                )));
            }
        }
        self
    }

    /// Insert `text` at `pos`.
    pub fn insert(&mut self, pos: usize, text: &str) -> &mut Self {
        self.splice(pos, 0, text)
    }

    /// Append `text` at the end.
    pub fn push(&mut self, text: &str) -> &mut Self {
        let len = self.doc.length(&self.obj);
        self.splice(len, 0, text)
    }

    /// Delete `len` characters at `pos`.
    pub fn delete(&mut self, pos: usize, len: usize) -> &mut Self {
        self.splice(pos, len, "")
    }

    /// Replace the whole text with `text`, as a minimal diff (concurrent
    /// edits of unchanged parts survive).
    pub fn replace(&mut self, text: &str) -> &mut Self {
        if self.error.is_none() {
            if let Err(e) = self.doc.update_text(&self.obj, text) {
                self.error = Some(ConflictError::Edit(format!("replace: {e}")));
            }
        }
        self
    }

    /// The text as edited so far.
    pub fn text(&self) -> String {
        self.doc.text(&self.obj).unwrap_or_default()
    }
}

/// Edit the text of a document as actor `actor_seed` (use one actor per
/// replica, e.g. the client id, and edit the replica's latest document:
/// two different edits by one actor from the same document clash when
/// merged). Returns the document saved.
pub fn edit_text(bytes: &[u8], actor_seed: &str, f: impl FnOnce(&mut TextEdit<'_>)) -> Result<Vec<u8>> {
    guarded(|| edit_text_unguarded(bytes, actor_seed, f))
}

fn edit_text_unguarded(bytes: &[u8], actor_seed: &str, f: impl FnOnce(&mut TextEdit<'_>)) -> Result<Vec<u8>> {
    let mut doc = load(bytes)?.with_actor(actor_for(actor_seed.as_bytes()));
    let obj = text_obj(&doc)?;
    let mut edit = TextEdit {
        doc: &mut doc,
        obj,
        error: None,
    };
    f(&mut edit);
    if let Some(e) = edit.error {
        return Err(e);
    }
    commit(&mut doc);
    Ok(doc.save())
}

/// Merge two documents (or a document and changes): every change of both,
/// saved compactly. Commutative in content: `merge(a, b)` and
/// `merge(b, a)` hold the same changes and read the same.
pub fn merge(a: &[u8], b: &[u8]) -> Result<Vec<u8>> {
    guarded(|| {
        let mut doc = load(a)?;
        doc.load_incremental(b).map_err(invalid)?;
        Ok(doc.save())
    })
}

/// The result of merging an incoming document into a stored one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Merged {
    /// The merged document, saved compactly.
    pub bytes: Vec<u8>,
    /// Whether the merge holds changes the incoming document lacked (the
    /// client's copy was behind).
    pub changed: bool,
}

/// Merge `incoming` into `stored` (`None`: no document yet). `incoming`
/// is a whole document (`save()`), or changes (`save_incremental()`)
/// holding at least one change the stored document lacks; bytes that load
/// as neither are refused.
pub fn merge_into(stored: Option<&[u8]>, incoming: &[u8]) -> Result<Merged> {
    guarded(|| merge_into_unguarded(stored, incoming))
}

fn merge_into_unguarded(stored: Option<&[u8]>, incoming: &[u8]) -> Result<Merged> {
    let mut doc = match stored {
        Some(s) => load(s)?,
        None => AutoCommit::new(),
    };
    let changed = match AutoCommit::load(incoming) {
        Ok(mut inc) => {
            doc.merge(&mut inc).map_err(invalid)?;
            let (mut a, mut b) = (doc.get_heads(), inc.get_heads());
            a.sort();
            b.sort();
            a != b
        }
        Err(whole) => {
            let applied = doc.load_incremental(incoming).map_err(invalid)?;
            if applied == 0 {
                return Err(invalid(format!(
                    "{} bytes load as neither a document ({whole}) nor new changes",
                    incoming.len()
                )));
            }
            true
        }
    };
    Ok(Merged {
        bytes: doc.save(),
        changed,
    })
}

/// The strategy for CRDT columns alone (every column it is handed is one);
/// see [`Crdt`] for the rule.
#[derive(Clone, Copy, Debug, Default)]
pub struct CrdtColumns;

impl ConflictStrategy for CrdtColumns {
    fn resolve(&self, input: &ConflictInput<'_>) -> Decision {
        let (Some(current), Some(live), Some(data)) = (input.current, input.live(), input.op_data()) else {
            return LastWriteWins.resolve(input);
        };
        let table = &input.table.name;
        let mut row = live.clone();
        let mut clocks: BTreeMap<String, HlcTimestamp> = current.clocks.clone();
        let mut merged_cols = Vec::new();
        for (col, v) in data {
            let incoming = match v {
                Value::Null => continue,
                Value::Blob(b) => b,
                other => {
                    return Resolution::Reject {
                        reason: format!(
                            "column {table}.{col} holds an automerge document; got {} value {other}",
                            other.type_name()
                        ),
                    }
                    .into()
                }
            };
            let stored = match live.get(col) {
                Some(Value::Blob(b)) => Some(b.as_slice()),
                _ => None,
            };
            let m = match merge_into(stored, incoming) {
                Ok(m) => m,
                Err(e) => {
                    return Resolution::Reject {
                        reason: format!("column {table}.{col}: {e}"),
                    }
                    .into()
                }
            };
            if m.changed {
                merged_cols.push(col.clone());
            }
            row.insert(col.clone(), Value::Blob(m.bytes));
            clocks.insert(col.clone(), later_clock(&clocks, col, input.hlc));
        }
        let d: Decision = Resolution::Write {
            row,
            clocks,
            lost: Vec::new(),
        }
        .into();
        if merged_cols.is_empty() {
            d
        } else {
            d.with_reason(format!(
                "merged concurrent edits into {table}.{}",
                merged_cols.join(", ")
            ))
        }
    }
}

/// CRDT columns: each named column holds an automerge document (blob of
/// its `save()` bytes).
///
/// Rule, for a PUT or PATCH of a live row, per named column: a NULL
/// incoming value leaves the stored document (a document is never cleared
/// by a write); a blob is loaded into the stored document
/// (`load_incremental`: a whole document or changes) and the merged
/// document is stored, saved compactly; any other value, or bytes that are
/// not automerge, reject the op. The outcome is `merged` when the result
/// holds changes the client lacked, else `applied`. Merging is
/// commutative, associative and idempotent, so concurrent edits arriving
/// in any order converge. Other columns go to the inner strategy (default
/// [`LastWriteWins`]); creates, deletes and tombstones too (a create
/// stores the client's document as sent; a hard DELETE follows
/// [`crate::lww::lww_delete`], clearing the columns older than it).
#[derive(Clone, Debug)]
pub struct Crdt {
    columns: Vec<String>,
    inner: PerColumn,
}

impl Crdt {
    /// CRDT `columns`, other columns last write wins.
    pub fn new<C: Into<String>>(columns: impl IntoIterator<Item = C>) -> Self {
        Crdt::with_fallback(columns, Arc::new(LastWriteWins))
    }

    /// CRDT `columns`, other columns decided by `inner`.
    pub fn with_fallback<C: Into<String>>(
        columns: impl IntoIterator<Item = C>,
        inner: Arc<dyn ConflictStrategy>,
    ) -> Self {
        let columns: Vec<String> = columns.into_iter().map(Into::into).collect();
        let inner = columns
            .iter()
            .fold(PerColumn::with_default(inner), |p, c| p.column(c.clone(), CrdtColumns));
        Crdt { columns, inner }
    }

    /// The CRDT columns.
    pub fn columns(&self) -> &[String] {
        &self.columns
    }
}

impl ConflictStrategy for Crdt {
    fn resolve(&self, input: &ConflictInput<'_>) -> Decision {
        self.inner.resolve(input)
    }
}

/// A row's CRDT column as text (`None` when it is not a text document).
pub fn column_text(row: &RowData, column: &str) -> Option<String> {
    match row.get(column) {
        Some(Value::Blob(b)) => read_text(b).ok(),
        _ => None,
    }
}
