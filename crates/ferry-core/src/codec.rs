//! Binary encodings shared by every storage backend.
//!
//! - Rows and queue entries: a compact, versioned binary form (varints,
//!   length-prefixed strings). Decoding never panics: bad bytes give
//!   [`CoreError::Corrupt`].
//! - Index keys: an order-preserving form, so that comparing encoded keys
//!   bytewise (as SQLite's BLOB comparison and sled's trees do) orders rows
//!   as [`Value`]'s `Ord` does within a typed column, then by row id.

use std::ops::Bound;

use crate::clock::HlcTimestamp;
use crate::error::CoreError;
use crate::op::{CrudEntry, CrudOp};
use crate::value::{RowData, Value};

const ENTRY_FORMAT_V1: u8 = 1;

fn corrupt(what: &str) -> CoreError {
    CoreError::Corrupt(what.to_owned())
}

// ----- writer -----

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

fn put_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::Null => out.push(0),
        Value::Integer(i) => {
            out.push(1);
            // zigzag
            put_varint(out, ((i << 1) ^ (i >> 63)) as u64);
        }
        Value::Real(r) => {
            out.push(2);
            out.extend_from_slice(&r.to_le_bytes());
        }
        Value::Text(s) => {
            out.push(3);
            put_bytes(out, s.as_bytes());
        }
        Value::Blob(b) => {
            out.push(4);
            put_bytes(out, b);
        }
    }
}

fn put_row(out: &mut Vec<u8>, data: &RowData) {
    put_varint(out, data.len() as u64);
    for (k, v) in data {
        put_bytes(out, k.as_bytes());
        put_value(out, v);
    }
}

/// Encode row data.
pub fn encode_row(data: &RowData) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + data.len() * 16);
    put_row(&mut out, data);
    out
}

/// Encode an upload queue entry.
pub fn encode_entry(e: &CrudEntry) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    out.push(ENTRY_FORMAT_V1);
    put_varint(&mut out, e.seq);
    put_varint(&mut out, e.tx_id);
    let (kind, table, id, data) = match &e.op {
        CrudOp::Put { table, id, data } => (0u8, table, id, Some(data)),
        CrudOp::Patch { table, id, data } => (1, table, id, Some(data)),
        CrudOp::Delete { table, id } => (2, table, id, None),
    };
    out.push(kind);
    put_bytes(&mut out, table.as_bytes());
    put_bytes(&mut out, id.as_bytes());
    if let Some(d) = data {
        put_row(&mut out, d);
    }
    match &e.previous {
        Some(p) => {
            out.push(1);
            put_row(&mut out, p);
        }
        None => out.push(0),
    }
    match &e.metadata {
        Some(m) => {
            out.push(1);
            put_bytes(&mut out, m.as_bytes());
        }
        None => out.push(0),
    }
    match &e.hlc {
        Some(h) => {
            out.push(1);
            put_varint(&mut out, h.wall_ms);
            put_varint(&mut out, u64::from(h.counter));
            put_bytes(&mut out, h.node.as_bytes());
        }
        None => out.push(0),
    }
    out
}

// ----- reader -----

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn byte(&mut self) -> Result<u8, CoreError> {
        let (&b, rest) = self.buf.split_first().ok_or_else(|| corrupt("unexpected end"))?;
        self.buf = rest;
        Ok(b)
    }

    fn varint(&mut self) -> Result<u64, CoreError> {
        let mut v: u64 = 0;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            // The tenth byte holds bit 63 only: more would be silently
            // shifted out, turning corrupt bytes into a wrong value.
            if shift == 63 && b > 1 {
                return Err(corrupt("varint overflows 64 bits"));
            }
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(corrupt("varint too long"))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], CoreError> {
        if n > self.buf.len() {
            return Err(corrupt("length past end"));
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }

    fn bytes(&mut self) -> Result<&'a [u8], CoreError> {
        let n = usize::try_from(self.varint()?).map_err(|_| corrupt("length overflow"))?;
        self.take(n)
    }

    fn string(&mut self) -> Result<String, CoreError> {
        let b = self.bytes()?;
        std::str::from_utf8(b)
            .map(str::to_owned)
            .map_err(|_| corrupt("invalid utf-8"))
    }

    fn value(&mut self) -> Result<Value, CoreError> {
        Ok(match self.byte()? {
            0 => Value::Null,
            1 => {
                let z = self.varint()?;
                Value::Integer(((z >> 1) as i64) ^ -((z & 1) as i64))
            }
            2 => {
                let b = self.take(8)?;
                let mut a = [0u8; 8];
                a.copy_from_slice(b);
                Value::Real(f64::from_le_bytes(a))
            }
            3 => Value::Text(self.string()?),
            4 => Value::Blob(self.bytes()?.to_vec()),
            t => return Err(CoreError::Corrupt(format!("unknown value tag {t}"))),
        })
    }

    fn row(&mut self) -> Result<RowData, CoreError> {
        let n = self.varint()?;
        let mut data = RowData::new();
        for _ in 0..n {
            let k = self.string()?;
            let v = self.value()?;
            data.insert(k, v);
        }
        Ok(data)
    }

    fn finish(&self) -> Result<(), CoreError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(corrupt("trailing bytes"))
        }
    }
}

/// Decode row data written by [`encode_row`].
pub fn decode_row(buf: &[u8]) -> Result<RowData, CoreError> {
    let mut r = Reader { buf };
    let data = r.row()?;
    r.finish()?;
    Ok(data)
}

/// Decode an upload queue entry written by [`encode_entry`].
pub fn decode_entry(buf: &[u8]) -> Result<CrudEntry, CoreError> {
    let mut r = Reader { buf };
    let version = r.byte()?;
    if version != ENTRY_FORMAT_V1 {
        return Err(CoreError::Corrupt(format!("unknown entry format {version}")));
    }
    let seq = r.varint()?;
    let tx_id = r.varint()?;
    let kind = r.byte()?;
    let table = r.string()?;
    let id = r.string()?;
    let op = match kind {
        0 => CrudOp::Put {
            table,
            id,
            data: r.row()?,
        },
        1 => CrudOp::Patch {
            table,
            id,
            data: r.row()?,
        },
        2 => CrudOp::Delete { table, id },
        k => return Err(CoreError::Corrupt(format!("unknown op kind {k}"))),
    };
    let previous = match r.byte()? {
        0 => None,
        _ => Some(r.row()?),
    };
    let metadata = match r.byte()? {
        0 => None,
        _ => Some(r.string()?),
    };
    let hlc = match r.byte()? {
        0 => None,
        _ => {
            let wall_ms = r.varint()?;
            let counter = u32::try_from(r.varint()?).map_err(|_| corrupt("hlc counter overflow"))?;
            Some(HlcTimestamp {
                wall_ms,
                counter,
                node: r.string()?,
            })
        }
    };
    r.finish()?;
    Ok(CrudEntry {
        seq,
        tx_id,
        op,
        previous,
        metadata,
        hlc,
    })
}

// ----- order-preserving index keys -----

/// Appended to an encoded prefix to get a key greater than every key that
/// starts with that prefix. Only the byte right after a complete prefix
/// matters, and that byte is always either a value tag (1..=5) or the first
/// byte of the row id, which is UTF-8 and so never 0xFF. (Bytes inside an
/// encoded value can be 0xFF; they never sit at that position.)
const KEY_SUCCESSOR: u8 = 0xFF;

fn put_escaped(out: &mut Vec<u8>, b: &[u8]) {
    for &byte in b {
        if byte == 0 {
            out.extend_from_slice(&[0x00, 0xFF]);
        } else {
            out.push(byte);
        }
    }
    out.extend_from_slice(&[0x00, 0x01]);
}

fn put_key_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::Null => out.push(1),
        Value::Integer(i) => {
            out.push(2);
            out.extend_from_slice(&((*i as u64) ^ (1 << 63)).to_be_bytes());
        }
        Value::Real(r) => {
            out.push(3);
            // -0.0 equals 0.0 (see `Value`'s order): one encoding for both.
            let bits = if *r == 0.0 { 0.0f64.to_bits() } else { r.to_bits() };
            // Flip so bytewise order equals f64::total_cmp order.
            let ordered = if bits >> 63 == 1 { !bits } else { bits | (1 << 63) };
            out.extend_from_slice(&ordered.to_be_bytes());
        }
        Value::Text(s) => {
            out.push(4);
            put_escaped(out, s.as_bytes());
        }
        Value::Blob(b) => {
            out.push(5);
            put_escaped(out, b);
        }
    }
}

/// Encode a tuple of index values (a prefix of an index's columns).
/// Within a typed column (integers and reals never mixed, which the schema
/// guarantees) bytewise order of encodings is [`Value`] order.
pub fn encode_key_prefix(values: &[Value]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * 10);
    for v in values {
        put_key_value(&mut out, v);
    }
    out
}

/// Encode a full index key: the indexed values then the row id, which makes
/// it unique and orders ties by id.
pub fn encode_index_key(values: &[Value], id: &str) -> Vec<u8> {
    encode_index_key_of(values.iter(), id)
}

/// [`encode_index_key`] of borrowed values (a row's columns, without
/// copying them into a slice first), in one allocation.
pub fn encode_index_key_of<'v>(values: impl ExactSizeIterator<Item = &'v Value>, id: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * 10 + id.len());
    for v in values {
        put_key_value(&mut out, v);
    }
    out.extend_from_slice(id.as_bytes());
    out
}

/// Turn bounds on index value prefixes into bounds on encoded keys:
/// `Included(p)` as a lower bound takes every key starting with `p`,
/// `Excluded(p)` skips them; likewise for upper bounds. The result is a
/// half-open byte range `[lower, upper)`, either end open when `None`.
pub fn index_key_range(lower: &Bound<Vec<Value>>, upper: &Bound<Vec<Value>>) -> (Option<Vec<u8>>, Option<Vec<u8>>) {
    let successor = |p: &[Value]| {
        let mut k = encode_key_prefix(p);
        k.push(KEY_SUCCESSOR);
        k
    };
    let lo = match lower {
        Bound::Unbounded => None,
        Bound::Included(p) => Some(encode_key_prefix(p)),
        Bound::Excluded(p) => Some(successor(p)),
    };
    let hi = match upper {
        Bound::Unbounded => None,
        Bound::Included(p) => Some(successor(p)),
        Bound::Excluded(p) => Some(encode_key_prefix(p)),
    };
    (lo, hi)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn value_strategy() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<i64>().prop_map(Value::Integer),
            any::<f64>().prop_map(Value::Real),
            "\\PC{0,8}".prop_map(Value::Text),
            proptest::collection::vec(any::<u8>(), 0..8).prop_map(Value::Blob),
        ]
    }

    /// Values of one declared column type, or NULL.
    fn typed_value(ty: u8) -> BoxedStrategy<Value> {
        let v = match ty {
            0 => any::<i64>().prop_map(Value::Integer).boxed(),
            1 => any::<f64>().prop_map(Value::Real).boxed(),
            2 => "[a\\x00b]{0,4}".prop_map(Value::Text).boxed(),
            _ => proptest::collection::vec(0u8..3, 0..4).prop_map(Value::Blob).boxed(),
        };
        prop_oneof![1 => Just(Value::Null), 4 => v].boxed()
    }

    proptest! {
        #[test]
        fn rows_round_trip(data in proptest::collection::btree_map("[a-z]{1,6}", value_strategy(), 0..6)) {
            let back = decode_row(&encode_row(&data)).expect("decode");
            // Compare bitwise for reals: NaN != NaN under Ord-derived Eq is fine
            // because total_cmp is used, but check the debug form too.
            prop_assert_eq!(format!("{back:?}"), format!("{data:?}"));
        }

        #[test]
        fn typed_key_order_matches_value_order(
            (ty, xs, ys) in (0u8..4).prop_flat_map(|ty| (
                Just(ty),
                proptest::collection::vec(typed_value(ty), 1..3),
                proptest::collection::vec(typed_value(ty), 1..3),
            )),
            id_a in "[a-c]{1,3}", id_b in "[a-c]{1,3}",
        ) {
            let _ = ty;
            let n = xs.len().min(ys.len());
            let (xs, ys) = (&xs[..n], &ys[..n]);
            let ka = encode_index_key(xs, &id_a);
            let kb = encode_index_key(ys, &id_b);
            let expected = xs.cmp(ys).then_with(|| id_a.cmp(&id_b));
            prop_assert_eq!(ka.cmp(&kb), expected, "{:?}/{} vs {:?}/{}", xs, id_a, ys, id_b);
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for bad in [&[][..], &[1], &[1, 0x80], &[9, 9, 9], &[1, 1, 1, 200, 0xff]] {
            assert!(decode_entry(bad).is_err());
            let _ = decode_row(bad);
        }
    }

    #[test]
    fn varints_over_64_bits_are_corrupt() {
        let mut max = Vec::new();
        put_varint(&mut max, u64::MAX);
        assert_eq!(max.len(), 10);
        assert_eq!(Reader { buf: &max }.varint().expect("u64::MAX"), u64::MAX);
        for last in [0x02, 0x7f] {
            let mut over = max.clone();
            over[9] = last;
            assert!(Reader { buf: &over }.varint().is_err(), "tenth byte {last:#x}");
        }
    }

    #[test]
    fn entries_round_trip() {
        let e = CrudEntry {
            seq: 300,
            tx_id: 2,
            op: CrudOp::Patch {
                table: "tickets".into(),
                id: "t1".into(),
                data: crate::value::row_data([("status", Value::from("done"))]),
            },
            previous: Some(crate::value::row_data([("status", Value::from("pending"))])),
            metadata: Some("{\"who\":\"ann\"}".into()),
            hlc: Some(HlcTimestamp {
                wall_ms: 1_700_000_000_000,
                counter: 3,
                node: "client-1".into(),
            }),
        };
        assert_eq!(decode_entry(&encode_entry(&e)).expect("decode"), e);
    }

    #[test]
    fn prefix_ranges() {
        let k = |v: i64, id: &str| encode_index_key(&[Value::Integer(v)], id);
        let (lo, hi) = index_key_range(
            &Bound::Excluded(vec![Value::Integer(1)]),
            &Bound::Included(vec![Value::Integer(3)]),
        );
        let (lo, hi) = (lo.expect("lower"), hi.expect("upper"));
        let inside = |key: Vec<u8>| key >= lo && key < hi;
        assert!(!inside(k(1, "zzz")));
        assert!(inside(k(2, "a")));
        assert!(inside(k(3, "zzz")));
        assert!(!inside(k(4, "a")));
    }
}
