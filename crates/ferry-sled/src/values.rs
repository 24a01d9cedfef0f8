//! Value encodings that `ferry_core::codec` does not provide: overlay
//! entries, bucket ops, bucket states and index definitions.

use ferry_core::codec;
use ferry_store::{BucketOp, BucketState, OpType, OverlayEntry, StoreResult};

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

/// `code, checksum (u32 BE), table length (u32 BE), table, row id`. The op
/// id lives in the key.
pub(crate) fn encode_bucket_op(op: &BucketOp) -> StoreResult<Vec<u8>> {
    let table_len = u32::try_from(op.table.len()).map_err(|_| corrupt("table name too long"))?;
    let mut out = Vec::with_capacity(9 + op.table.len() + op.row_id.len());
    out.push(op.op.code());
    out.extend_from_slice(&op.checksum.to_be_bytes());
    out.extend_from_slice(&table_len.to_be_bytes());
    out.extend_from_slice(op.table.as_bytes());
    out.extend_from_slice(op.row_id.as_bytes());
    Ok(out)
}

pub(crate) fn decode_bucket_op(op_id: u64, buf: &[u8]) -> StoreResult<BucketOp> {
    let bad = || corrupt("bad bucket op entry");
    let (&code, rest) = buf.split_first().ok_or_else(bad)?;
    let (checksum, rest) = split_u32(rest).ok_or_else(bad)?;
    let (table_len, rest) = split_u32(rest).ok_or_else(bad)?;
    let table_len = usize::try_from(table_len).map_err(|_| bad())?;
    if table_len > rest.len() {
        return Err(bad());
    }
    let (table, row_id) = rest.split_at(table_len);
    Ok(BucketOp {
        op_id,
        op: OpType::from_code(code)?,
        table: utf8(table)?,
        row_id: utf8(row_id)?,
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

        let op = BucketOp {
            op_id: 9,
            op: OpType::Remove,
            table: "tickets".into(),
            row_id: "r\u{e9}".into(),
            checksum: 0xDEAD_BEEF,
        };
        let enc = encode_bucket_op(&op).expect("encode");
        assert_eq!(decode_bucket_op(9, &enc).expect("decode"), op);
        assert!(decode_bucket_op(9, &enc[..6]).is_err());

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
