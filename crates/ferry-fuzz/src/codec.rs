//! `ferry_core::codec`: the row and queue entry encodings every backend
//! stores on disk, and the order-preserving index keys.

use std::cmp::Ordering;
use std::ops::Bound;

use ferry_core::codec::{decode_entry, decode_row, encode_entry, encode_index_key, encode_row, index_key_range};
use ferry_core::{CoreError, Value};

use crate::assert_same;

/// Stored row bytes: `decode_row` never panics, fails only with
/// `Corrupt`, and a decoded row encodes to bytes that decode to the same
/// row (and re-encode to the same bytes).
pub fn row_codec(data: &[u8]) {
    match decode_row(data) {
        Ok(row) => {
            let encoded = encode_row(&row);
            match decode_row(&encoded) {
                Ok(back) => {
                    assert_same("row", &row, &back);
                    assert_eq!(encode_row(&back), encoded, "a re-decoded row encodes to the same bytes");
                }
                Err(e) => panic!("row {row:?} encodes to bytes that do not decode: {e}"),
            }
        }
        Err(e) => assert!(
            matches!(e, CoreError::Corrupt(_)),
            "bad row bytes gave {e:?}, not Corrupt"
        ),
    }
}

/// Stored upload queue entries: as [`row_codec`], for `decode_entry`.
pub fn entry_codec(data: &[u8]) {
    match decode_entry(data) {
        Ok(entry) => {
            let encoded = encode_entry(&entry);
            match decode_entry(&encoded) {
                Ok(back) => assert_same("queue entry", &entry, &back),
                Err(e) => panic!("entry {entry:?} encodes to bytes that do not decode: {e}"),
            }
        }
        Err(e) => assert!(
            matches!(e, CoreError::Corrupt(_)),
            "bad entry bytes gave {e:?}, not Corrupt"
        ),
    }
}

/// Reads fuzz bytes as structured input; past the end every read is 0.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }

    fn word(&mut self) -> [u8; 8] {
        let mut w = [0u8; 8];
        for b in &mut w {
            *b = self.byte();
        }
        w
    }

    /// A short string; bytes map to chars (NUL and 2-byte chars included).
    fn text(&mut self) -> String {
        let len = self.byte() % 6;
        (0..len).map(|_| char::from(self.byte())).collect()
    }

    /// A NULL or a value of column type `ty` (0 integer, 1 real, 2 text,
    /// 3 blob): within one column, as the schema guarantees.
    fn value(&mut self, ty: u8) -> Value {
        let tag = self.byte();
        if tag.is_multiple_of(5) {
            return Value::Null;
        }
        match ty {
            0 => Value::Integer(i64::from_le_bytes(self.word())),
            1 => Value::Real(f64::from_le_bytes(self.word())),
            2 => Value::Text(self.text()),
            _ => {
                let len = self.byte() % 6;
                Value::Blob((0..len).map(|_| self.byte() % 4).collect())
            }
        }
    }
}

/// Whether `key` lies in the byte range `index_key_range` gives for
/// `(lower, upper)`.
fn in_range(key: &[u8], lower: &Bound<Vec<Value>>, upper: &Bound<Vec<Value>>) -> bool {
    let (lo, hi) = index_key_range(lower, upper);
    lo.is_none_or(|lo| key >= lo.as_slice()) && hi.is_none_or(|hi| key < hi.as_slice())
}

/// Index keys. Nothing decodes them (backends store the key next to the
/// row id and only compare keys), so the target checks the property the
/// stores rely on when they compare keys read back from disk: for two
/// tuples of one typed column (values from the bytes, NaN, -0.0, NUL
/// bytes and empty strings included) with row ids, bytewise order of the
/// encoded keys is `Value` order then id order, and a key lies in the
/// range `index_key_range` gives for a prefix exactly when its values
/// compare with that prefix as the bound says.
pub fn index_key(data: &[u8]) {
    let mut input = Input(data);
    let ty = input.byte() % 4;
    let n = 1 + usize::from(input.byte() % 3);
    let xs: Vec<Value> = (0..n).map(|_| input.value(ty)).collect();
    let ys: Vec<Value> = (0..n).map(|_| input.value(ty)).collect();
    let (id_x, id_y) = (input.text(), input.text());
    let kx = encode_index_key(&xs, &id_x);
    let ky = encode_index_key(&ys, &id_y);
    let expected = xs.cmp(&ys).then_with(|| id_x.cmp(&id_y));
    assert_eq!(
        kx.cmp(&ky),
        expected,
        "key order differs from value order: {xs:?}/{id_x:?} vs {ys:?}/{id_y:?}"
    );
    for k in 0..=n {
        let prefix = xs[..k].to_vec();
        for (values, key) in [(&xs, &kx), (&ys, &ky)] {
            let c = values[..k].cmp(&prefix);
            let cases = [
                (Bound::Included(prefix.clone()), Bound::Unbounded, c != Ordering::Less),
                (
                    Bound::Excluded(prefix.clone()),
                    Bound::Unbounded,
                    c == Ordering::Greater,
                ),
                (
                    Bound::Unbounded,
                    Bound::Included(prefix.clone()),
                    c != Ordering::Greater,
                ),
                (Bound::Unbounded, Bound::Excluded(prefix.clone()), c == Ordering::Less),
            ];
            for (lower, upper, inside) in cases {
                assert_eq!(
                    in_range(key, &lower, &upper),
                    inside,
                    "key of {values:?} against range {lower:?}..{upper:?}"
                );
            }
        }
    }
}
