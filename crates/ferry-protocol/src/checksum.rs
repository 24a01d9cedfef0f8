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
    if let Some(d) = data {
        h = fnv1a(h, &codec::encode_row(d));
    }
    h
}

/// Wrapping sum of checksums.
pub fn sum<I: IntoIterator<Item = u32>>(checksums: I) -> u32 {
    checksums.into_iter().fold(0u32, u32::wrapping_add)
}
