//! Op checksums: FNV-1a (32 bit) over a canonical encoding of what the op
//! does to a row. A bucket's checksum is the wrapping sum of its entries'
//! checksums, so it can be maintained incrementally and compared without
//! caring about order.

use ferry_core::{codec, RowData};

use crate::messages::OpKind;

const FNV_OFFSET: u32 = 0x811c_9dc5;
const FNV_PRIME: u32 = 0x0100_0193;

fn fnv1a(mut h: u32, bytes: &[u8]) -> u32 {
    for b in bytes {
        h ^= u32::from(*b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    h
}

/// The checksum of a PUT or REMOVE of a row. The op id is part of it, so
/// the same change made twice counts twice.
pub fn op_checksum(op_id: u64, op: OpKind, table: &str, row_id: &str, data: Option<&RowData>) -> u32 {
    let encoded = data.map(codec::encode_row);
    op_checksum_encoded(op_id, op, table, row_id, encoded.as_deref())
}

/// [`op_checksum`] of a row already encoded (`encoded` is
/// `codec::encode_row` of it), for callers that encode rows ahead (a bulk
/// import, off its writer).
pub fn op_checksum_encoded(op_id: u64, op: OpKind, table: &str, row_id: &str, encoded: Option<&[u8]>) -> u32 {
    let mut h = fnv1a(FNV_OFFSET, &op_id.to_be_bytes());
    let tag: u8 = match op {
        OpKind::Put => 1,
        OpKind::Remove => 2,
        OpKind::Move => 3,
        OpKind::Clear => 4,
    };
    h = fnv1a(h, &[tag]);
    h = fnv1a(h, table.as_bytes());
    h = fnv1a(h, &[0]);
    h = fnv1a(h, row_id.as_bytes());
    h = fnv1a(h, &[0]);
    if let Some(e) = encoded {
        h = fnv1a(h, e);
    }
    h
}

/// Wrapping sum of checksums.
pub fn sum<I: IntoIterator<Item = u32>>(checksums: I) -> u32 {
    checksums.into_iter().fold(0u32, u32::wrapping_add)
}

#[cfg(test)]
mod encoded_tests {
    use ferry_core::{codec, RowData, Value};

    use super::{op_checksum, op_checksum_encoded};
    use crate::messages::OpKind;

    #[test]
    fn a_row_encoded_ahead_sums_as_the_row() {
        let row: RowData = [("title".to_owned(), Value::Text("x".into()))].into_iter().collect();
        let encoded = codec::encode_row(&row);
        assert_eq!(
            op_checksum_encoded(7, OpKind::Put, "t", "a", Some(&encoded)),
            op_checksum(7, OpKind::Put, "t", "a", Some(&row))
        );
        assert_eq!(
            op_checksum_encoded(8, OpKind::Remove, "t", "a", None),
            op_checksum(8, OpKind::Remove, "t", "a", None)
        );
    }
}
