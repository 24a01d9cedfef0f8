//! Overlay entries carried by queue rows (the overlay's tail), so that a
//! local write commits one B-tree page.
//!
//! A local write is a batch of overlay entries and queue entries only. In
//! WAL mode every page a transaction dirties is one WAL frame written at
//! commit, and a row of `ferry_overlay` (keyed by table and id, anywhere
//! in its B-tree) and a row of `ferry_queue` (appended at its right edge)
//! are two pages: about a third more time per write than one page
//! (measured with `live_store_bench`). So such a batch writes only its
//! queue rows, and its overlay entries go in the `overlay` column of its
//! last queue row (`encode`); the others get an empty list. The rows
//! whose `overlay` is not NULL are always a suffix of the queue (the
//! tail): every other batch first copies the tail into `ferry_overlay`
//! and sets their `overlay` to NULL (`materialize`), in its own
//! transaction, and so does a local write that would make the tail hold
//! more than [`MAX_TAIL_ENTRIES`] entries or queue rows.
//!
//! The store keeps the tail's entries in memory ([`OverlayTail`]) and its
//! overlay reads look there first. It reads the tail back from the queue
//! when it opens and whenever another connection changed the database
//! (`PRAGMA data_version`), so another store on the same file sees the
//! same visible state.

use std::collections::BTreeMap;

use ferry_core::codec;
use ferry_store::{BatchOp, OverlayEntry, StoreError, StoreResult, WriteBatch};
use rusqlite::{params, Connection};

use crate::{invalid, ordered_key, sql_err};

/// Most overlay entries, and most queue rows, the tail holds; a local
/// write that would pass either copies it into `ferry_overlay` first (one
/// larger transaction every so many writes), which bounds its memory (by
/// the entries) and the reading back (by the rows, which may all carry
/// entries of one row).
pub(crate) const MAX_TAIL_ENTRIES: usize = 512;

pub(crate) const SQL_APPEND_QUEUE_WITH_OVERLAY: &str =
    "INSERT INTO ferry_queue (seq, entry, overlay) VALUES (?1, ?2, ?3)";
const SQL_TAIL: &str = "SELECT seq, overlay FROM ferry_queue ORDER BY seq DESC";
const SQL_PUT_OVERLAY_BYTES: &str = "INSERT OR REPLACE INTO ferry_overlay (tbl, id, data) VALUES (?1, ?2, ?3)";
const SQL_END_TAIL: &str = "UPDATE ferry_queue SET overlay = NULL WHERE seq >= ?1";
const SQL_DATA_VERSION: &str = "PRAGMA data_version";

/// An overlay entry as stored: the encoded row, `None` for a deletion.
pub(crate) type StoredEntry = Option<Vec<u8>>;

/// A row's overlay entry in the tail: table, id, entry.
pub(crate) type TailEntry = (String, String, StoredEntry);

/// The tail's entries, newest per row, and where it starts.
#[derive(Debug, Default)]
pub(crate) struct OverlayTail {
    /// `(table, id)` to the row's newest entry in the tail.
    entries: BTreeMap<(String, String), StoredEntry>,
    /// Seq of the tail's first queue row; `None` when the tail is empty.
    first_seq: Option<i64>,
    /// Queue rows in the tail.
    queue_rows: usize,
    /// `PRAGMA data_version` when the tail was last known to match the
    /// database.
    data_version: i64,
    /// The queue's last seq (`None` inside: an empty queue) as of the
    /// same version, when known: after a local write it is the write's
    /// last seq, and a local write needs no `SELECT max(seq)` to check
    /// its seqs. `None`: unknown (read it).
    queue_end: Option<Option<i64>>,
}

/// What a local write wrote ([`write_local`]), for the tail once its
/// transaction committed.
#[derive(Debug)]
pub(crate) struct LocalWrite {
    first_seq: i64,
    last_seq: i64,
    queue_rows: usize,
    entries: Vec<TailEntry>,
}

impl OverlayTail {
    /// The tail as stored in the database (see the module docs).
    pub(crate) fn load(conn: &Connection) -> StoreResult<Self> {
        let mut rows_back: Vec<(i64, Vec<u8>)> = Vec::new();
        {
            let mut stmt = conn.prepare_cached(SQL_TAIL).map_err(sql_err)?;
            let mut rows = stmt.query([]).map_err(sql_err)?;
            while let Some(r) = rows.next().map_err(sql_err)? {
                let bytes = r
                    .get_ref(1)
                    .map_err(sql_err)?
                    .as_blob_or_null()
                    .map_err(|e| sql_err(e.into()))?;
                let Some(bytes) = bytes else { break };
                rows_back.push((r.get(0).map_err(sql_err)?, bytes.to_vec()));
            }
        }
        let mut tail = OverlayTail {
            data_version: data_version(conn)?,
            ..OverlayTail::default()
        };
        tail.queue_rows = rows_back.len();
        for (seq, bytes) in rows_back.into_iter().rev() {
            tail.first_seq.get_or_insert(seq);
            for (table, id, entry) in decode(&bytes)? {
                tail.entries.insert((table, id), entry);
            }
        }
        Ok(tail)
    }

    /// Read the tail again if another connection changed the database
    /// since it was last read or written here.
    pub(crate) fn refresh(&mut self, conn: &Connection) -> StoreResult<()> {
        if data_version(conn)? != self.data_version {
            *self = OverlayTail::load(conn)?;
        }
        Ok(())
    }

    /// The queue's last seq if known (see `queue_end`).
    pub(crate) fn queue_end(&self) -> Option<Option<i64>> {
        self.queue_end
    }

    /// The larger of the tail's entries and queue rows (see
    /// [`MAX_TAIL_ENTRIES`]).
    pub(crate) fn size(&self) -> usize {
        self.entries.len().max(self.queue_rows)
    }

    /// The row's newest tail entry, if the tail has one.
    pub(crate) fn get(&self, table: &str, id: &str) -> Option<&StoredEntry> {
        // The map is keyed by owned pairs; a row lookup allocates its key.
        self.entries.get(&(table.to_owned(), id.to_owned()))
    }

    /// The tail's entries of `table`, ordered by id.
    pub(crate) fn of_table<'a>(&'a self, table: &'a str) -> impl Iterator<Item = (&'a str, &'a StoredEntry)> + 'a {
        let from = (table.to_owned(), String::new());
        self.entries
            .range(from..)
            .take_while(move |((t, _), _)| t == table)
            .map(|((_, id), entry)| (id.as_str(), entry))
    }

    /// Take in what a committed local write added.
    pub(crate) fn extend(&mut self, write: LocalWrite) {
        self.first_seq.get_or_insert(write.first_seq);
        self.queue_rows += write.queue_rows;
        self.queue_end = Some(Some(write.last_seq));
        for (table, id, entry) in write.entries {
            self.entries.insert((table, id), entry);
        }
    }

    /// Copy the tail into `ferry_overlay` and end it (in the caller's
    /// transaction; [`OverlayTail::clear`] once it committed).
    pub(crate) fn materialize(&self, conn: &Connection) -> StoreResult<()> {
        let Some(first_seq) = self.first_seq else {
            return Ok(());
        };
        let mut put = conn.prepare_cached(SQL_PUT_OVERLAY_BYTES).map_err(sql_err)?;
        for ((table, id), entry) in &self.entries {
            put.execute(params![table, id, entry]).map_err(sql_err)?;
        }
        conn.prepare_cached(SQL_END_TAIL)
            .and_then(|mut s| s.execute([first_seq]))
            .map_err(sql_err)?;
        Ok(())
    }

    /// Another batch committed: the tail was copied into
    /// `ferry_overlay`, and the queue's end is not known any more.
    pub(crate) fn clear(&mut self) {
        self.entries.clear();
        self.first_seq = None;
        self.queue_rows = 0;
        self.queue_end = None;
    }

    /// A commit failed: what it would have changed is not known.
    pub(crate) fn forget_queue_end(&mut self) {
        self.queue_end = None;
    }
}

/// The number of overlay entries of a local write (overlay entries and at
/// least one queue entry, nothing else), `None` for any other batch.
pub(crate) fn local_write_overlays(batch: &WriteBatch) -> Option<usize> {
    let mut overlays = 0;
    let mut queued = false;
    for op in &batch.ops {
        match op {
            BatchOp::PutOverlay { .. } => overlays += 1,
            BatchOp::AppendQueue(_) => queued = true,
            _ => return None,
        }
    }
    queued.then_some(overlays)
}

/// Write a local write's queue entries, its overlay entries in the last
/// one's row (`overlay_tail.rs`). Returns the first seq and the entries,
/// for the tail once the transaction commits.
pub(crate) fn write_local(conn: &Connection, batch: &WriteBatch) -> StoreResult<LocalWrite> {
    let entries: Vec<TailEntry> = batch
        .ops
        .iter()
        .filter_map(|op| match op {
            BatchOp::PutOverlay { table, id, entry } => {
                let stored = match entry {
                    OverlayEntry::Row(data) => Some(codec::encode_row(data)),
                    OverlayEntry::Deleted => None,
                };
                Some((table.clone(), id.clone(), stored))
            }
            _ => None,
        })
        .collect();
    let overlay = encode(&entries);
    let last = batch.ops.iter().rposition(|op| matches!(op, BatchOp::AppendQueue(_)));
    let mut stmt = conn.prepare_cached(SQL_APPEND_QUEUE_WITH_OVERLAY).map_err(sql_err)?;
    let mut first_seq = None;
    let mut last_seq = 0;
    let mut queue_rows = 0;
    for (i, op) in batch.ops.iter().enumerate() {
        if let BatchOp::AppendQueue(entry) = op {
            let seq = ordered_key("queue seq", entry.seq)?;
            first_seq.get_or_insert(seq);
            last_seq = seq;
            queue_rows += 1;
            // An empty list (not NULL) keeps the tail a suffix of the queue.
            let carried: &[u8] = if Some(i) == last { &overlay } else { &[] };
            stmt.execute(params![seq, codec::encode_entry(entry), carried])
                .map_err(sql_err)?;
        }
    }
    // `local_write_overlays` saw a queue entry.
    let first_seq = first_seq.ok_or_else(|| invalid("a local write without a queue entry".into()))?;
    Ok(LocalWrite {
        first_seq,
        last_seq,
        queue_rows,
        entries,
    })
}

fn data_version(conn: &Connection) -> StoreResult<i64> {
    conn.prepare_cached(SQL_DATA_VERSION)
        .and_then(|mut s| s.query_row([], |r| r.get(0)))
        .map_err(sql_err)
}

/// A stored entry as the store's reads return it.
pub(crate) fn entry_of(stored: &StoredEntry) -> StoreResult<OverlayEntry> {
    match stored {
        Some(bytes) => Ok(OverlayEntry::Row(codec::decode_row(bytes)?)),
        None => Ok(OverlayEntry::Deleted),
    }
}

/// Tail entries as a queue row's `overlay` column: per entry the table's
/// and the id's length (u32, little endian) and bytes, then 0 for a
/// deletion or 1, the row's length and its encoded bytes.
pub(crate) fn encode(entries: &[TailEntry]) -> Vec<u8> {
    let size: usize = entries
        .iter()
        .map(|(t, i, e)| 13 + t.len() + i.len() + e.as_ref().map_or(0, Vec::len))
        .sum();
    let mut out = Vec::with_capacity(size);
    for (table, id, entry) in entries {
        put_bytes(&mut out, table.as_bytes());
        put_bytes(&mut out, id.as_bytes());
        match entry {
            None => out.push(0),
            Some(row) => {
                out.push(1);
                put_bytes(&mut out, row);
            }
        }
    }
    out
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    // Tables, ids and rows are far below 4 GiB (the schema's limits).
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

/// The entries [`encode`] wrote, in order.
pub(crate) fn decode(mut bytes: &[u8]) -> StoreResult<Vec<TailEntry>> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let table = text(take_bytes(&mut bytes)?)?;
        let id = text(take_bytes(&mut bytes)?)?;
        let entry = match take(&mut bytes, 1)? {
            [0] => None,
            [1] => Some(take_bytes(&mut bytes)?.to_vec()),
            _ => return Err(corrupt("an entry's kind")),
        };
        out.push((table, id, entry));
    }
    Ok(out)
}

fn take<'a>(bytes: &mut &'a [u8], n: usize) -> StoreResult<&'a [u8]> {
    if bytes.len() < n {
        return Err(corrupt("its length"));
    }
    let (head, rest) = bytes.split_at(n);
    *bytes = rest;
    Ok(head)
}

fn take_bytes<'a>(bytes: &mut &'a [u8]) -> StoreResult<&'a [u8]> {
    let len: [u8; 4] = take(bytes, 4)?.try_into().map_err(|_| corrupt("a length"))?;
    let len = usize::try_from(u32::from_le_bytes(len)).map_err(|_| corrupt("a length"))?;
    take(bytes, len)
}

fn text(bytes: &[u8]) -> StoreResult<String> {
    String::from_utf8(bytes.to_vec()).map_err(|_| corrupt("a name"))
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt(format!("a queue row's overlay entries: bad {what}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip() {
        let entries = vec![
            ("t".to_owned(), "a".to_owned(), Some(vec![1, 2, 3])),
            ("t".to_owned(), "b".to_owned(), None),
            ("u".to_owned(), String::new(), Some(Vec::new())),
        ];
        let bytes = encode(&entries);
        assert_eq!(decode(&bytes).ok(), Some(entries));
        assert_eq!(decode(&[]).ok(), Some(Vec::new()));
        assert!(decode(&bytes[..bytes.len() - 1]).is_err());
        assert!(decode(&[0, 0, 0, 0, 0, 0, 0, 0, 7]).is_err());
    }
}
