//! Value encodings that `ferry_core::codec` does not provide: overlay
//! entries, bucket entries, bucket states and index definitions.

use ferry_core::codec;
use ferry_store::{BucketEntry, BucketState, OverlayEntry, StoreResult};

use crate::keys::{corrupt, utf8};

/// Overlay tag: the pending writes delete the row.
const OVERLAY_DELETED: u8 = 0;
/// Overlay tag: the row follows, as `codec::encode_row` writes it.
const OVERLAY_ROW: u8 = 1;

/// `[0]` for a deletion marker, `[1] row` for a row.
pub(crate) fn encode_overlay(entry: &OverlayEntry) -> Vec<u8> {
    match entry {
        OverlayEntry::Deleted => vec![OVERLAY_DELETED],
        OverlayEntry::Row(data) => {
            let row = codec::encode_row(data);
            let mut out = Vec::with_capacity(row.len() + 1);
            out.push(OVERLAY_ROW);
            out.extend_from_slice(&row);
            out
        }
    }
}

pub(crate) fn decode_overlay(buf: &[u8]) -> StoreResult<OverlayEntry> {
    match buf {
        [OVERLAY_DELETED] => Ok(OverlayEntry::Deleted),
        [OVERLAY_ROW, row @ ..] => Ok(OverlayEntry::Row(codec::decode_row(row)?)),
        _ => Err(corrupt("bad overlay entry")),
    }
}

/// `op_id (u64 BE), checksum (u32 BE)`. The table and row id live in the
/// key.
pub(crate) fn encode_bucket_entry(e: &BucketEntry) -> Vec<u8> {
    let mut out = Vec::with_capacity(12);
    out.extend_from_slice(&e.op_id.to_be_bytes());
    out.extend_from_slice(&e.checksum.to_be_bytes());
    out
}

pub(crate) fn decode_bucket_entry(table: String, row_id: String, buf: &[u8]) -> StoreResult<BucketEntry> {
    let bad = || corrupt("bad bucket entry");
    if buf.len() != 12 {
        return Err(bad());
    }
    let (op_id, checksum) = buf.split_at(8);
    let (checksum, _) = split_u32(checksum).ok_or_else(bad)?;
    Ok(BucketEntry {
        table,
        row_id,
        op_id: crate::keys::be_u64(op_id).ok_or_else(bad)?,
        checksum,
    })
}

/// `last_op_id (u64 BE), checksum (u32 BE), count (u64 BE)`.
pub(crate) fn encode_bucket_state(s: &BucketState) -> Vec<u8> {
    let mut out = Vec::with_capacity(20);
    out.extend_from_slice(&s.last_op_id.to_be_bytes());
    out.extend_from_slice(&s.checksum.to_be_bytes());
    out.extend_from_slice(&s.count.to_be_bytes());
    out
}

pub(crate) fn decode_bucket_state(buf: &[u8]) -> StoreResult<BucketState> {
    let bad = || corrupt("bad bucket state");
    if buf.len() != 20 {
        return Err(bad());
    }
    let (last, rest) = buf.split_at(8);
    let (checksum, count) = split_u32(rest).ok_or_else(bad)?;
    Ok(BucketState {
        last_op_id: crate::keys::be_u64(last).ok_or_else(bad)?,
        checksum,
        count: crate::keys::be_u64(count).ok_or_else(bad)?,
    })
}

/// Index columns joined by `00` (column names never contain NUL).
pub(crate) fn encode_index_def(columns: &[String]) -> Vec<u8> {
    columns.join("\0").into_bytes()
}

pub(crate) fn decode_index_def(buf: &[u8]) -> StoreResult<Vec<String>> {
    Ok(utf8(buf)?.split('\0').map(str::to_owned).collect())
}

fn split_u32(b: &[u8]) -> Option<(u32, &[u8])> {
    if b.len() < 4 {
        return None;
    }
    let (head, rest) = b.split_at(4);
    let a: [u8; 4] = head.try_into().ok()?;
    Some((u32::from_be_bytes(a), rest))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_core::{row_data, Value};

    #[test]
    fn round_trips() {
        for entry in [
            OverlayEntry::Deleted,
            OverlayEntry::Row(row_data([("a", Value::from(1))])),
        ] {
            assert_eq!(decode_overlay(&encode_overlay(&entry)).expect("decode"), entry);
        }
        // An empty row is still distinguishable from a deletion marker.
        let empty = OverlayEntry::Row(Default::default());
        assert_eq!(decode_overlay(&encode_overlay(&empty)).expect("decode"), empty);

        let entry = BucketEntry {
            table: "tickets".into(),
            row_id: "r\u{e9}".into(),
            op_id: u64::MAX,
            checksum: 0xDEAD_BEEF,
        };
        let enc = encode_bucket_entry(&entry);
        assert_eq!(
            decode_bucket_entry("tickets".into(), "r\u{e9}".into(), &enc).expect("decode"),
            entry
        );
        assert!(decode_bucket_entry(String::new(), String::new(), &enc[..6]).is_err());
        assert!(decode_bucket_entry(String::new(), String::new(), &[0; 13]).is_err());

        let st = BucketState {
            last_op_id: u64::MAX,
            checksum: 3,
            count: 4,
        };
        assert_eq!(decode_bucket_state(&encode_bucket_state(&st)).expect("decode"), st);
        assert!(decode_bucket_state(&[1, 2]).is_err());

        let cols = vec!["a".to_owned(), "b_2".to_owned()];
        assert_eq!(decode_index_def(&encode_index_def(&cols)).expect("decode"), cols);
    }
}
