//! Values and rows.
//!
//! A [`Value`] is one of SQLite's storage classes. Values have a total order
//! that matches SQLite's: `Null < numbers < Text < Blob`, numbers compared
//! numerically across `Integer` and `Real`, text and blobs bytewise. Reals
//! order with `f64::total_cmp`, so NaN has a place and sorting never panics.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// One column value.
///
/// In JSON: `null`, a number (an integer that fits `i64` is an `Integer`,
/// any other number a `Real`), a string, or a blob as an array of byte
/// values.
#[derive(Clone, Debug, Serialize, Default)]
#[serde(untagged)]
pub enum Value {
    /// SQL NULL.
    #[default]
    Null,
    /// A 64-bit signed integer.
    Integer(i64),
    /// A 64-bit float.
    Real(f64),
    /// UTF-8 text.
    Text(String),
    /// Raw bytes. In JSON a blob is an array of byte values.
    Blob(Vec<u8>),
}

// Deserialized by hand: the derived untagged form buffers every value
// before trying each variant in turn, which dominates decoding large
// downloads. This accepts exactly what the untagged form did.
impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ValueVisitor)
    }
}

struct ValueVisitor;

impl<'de> serde::de::Visitor<'de> for ValueVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("null, a number, a string or an array of bytes")
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E: serde::de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_some<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        Value::deserialize(deserializer)
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Integer(v))
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Value, E> {
        Ok(match i64::try_from(v) {
            Ok(i) => Value::Integer(i),
            Err(_) => Value::Real(v as f64),
        })
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Value, E> {
        Ok(Value::Real(v))
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Value, E> {
        Ok(Value::Text(v.to_owned()))
    }

    fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Value, E> {
        Ok(Value::Text(v))
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut bytes = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
        while let Some(b) = seq.next_element::<u8>()? {
            bytes.push(b);
        }
        Ok(Value::Blob(bytes))
    }
}

/// The named values of one row, without its id. Ordered by column name so
/// that encodings and comparisons are deterministic.
pub type RowData = BTreeMap<String, Value>;

/// A row: its text id (usually a UUID) and its named values.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Row {
    /// The row id, unique within its table.
    pub id: String,
    /// The column values. A column that is absent reads as NULL.
    pub data: RowData,
}

impl Value {
    /// The storage class name, as used in error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Integer(_) => "integer",
            Value::Real(_) => "real",
            Value::Text(_) => "text",
            Value::Blob(_) => "blob",
        }
    }

    /// Whether this is NULL.
    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }

    /// The text, if this is text.
    pub fn as_text(&self) -> Option<&str> {
        match self {
            Value::Text(s) => Some(s),
            _ => None,
        }
    }

    /// The integer, if this is an integer.
    pub fn as_integer(&self) -> Option<i64> {
        match self {
            Value::Integer(i) => Some(*i),
            _ => None,
        }
    }

    /// The number as a float, if this is an integer or a real.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Integer(i) => Some(*i as f64),
            Value::Real(r) => Some(*r),
            _ => None,
        }
    }

    /// Approximate size in bytes, used for row size limits.
    pub fn size_bytes(&self) -> usize {
        match self {
            Value::Null => 1,
            Value::Integer(_) | Value::Real(_) => 8,
            Value::Text(s) => s.len(),
            Value::Blob(b) => b.len(),
        }
    }

    fn class_rank(&self) -> u8 {
        match self {
            Value::Null => 0,
            Value::Integer(_) | Value::Real(_) => 1,
            Value::Text(_) => 2,
            Value::Blob(_) => 3,
        }
    }
}

/// -0.0 as 0.0: they are equal (both equal `Integer(0)`), so they must
/// order alike or the order would not be transitive.
fn canonical_zero(r: f64) -> f64 {
    if r == 0.0 {
        0.0
    } else {
        r
    }
}

/// Compare an integer with a float exactly (no precision loss for large i64).
fn cmp_int_real(i: i64, r: f64) -> Ordering {
    if r.is_nan() {
        // total_cmp puts positive NaN above everything and negative NaN below.
        return if r.is_sign_negative() {
            Ordering::Greater
        } else {
            Ordering::Less
        };
    }
    // i64 range as f64: [-2^63, 2^63).
    if r >= 9_223_372_036_854_775_808.0 {
        return Ordering::Less;
    }
    if r < -9_223_372_036_854_775_808.0 {
        return Ordering::Greater;
    }
    let t = r.trunc();
    // In range, so the cast is exact for the truncated value.
    let ti = t as i64;
    match i.cmp(&ti) {
        Ordering::Equal => {
            let frac = r - t;
            if frac > 0.0 {
                Ordering::Less
            } else if frac < 0.0 {
                Ordering::Greater
            } else {
                Ordering::Equal
            }
        }
        o => o,
    }
}

impl Ord for Value {
    fn cmp(&self, other: &Self) -> Ordering {
        match (self, other) {
            (Value::Null, Value::Null) => Ordering::Equal,
            (Value::Integer(a), Value::Integer(b)) => a.cmp(b),
            (Value::Real(a), Value::Real(b)) => canonical_zero(*a).total_cmp(&canonical_zero(*b)),
            (Value::Integer(a), Value::Real(b)) => cmp_int_real(*a, *b),
            (Value::Real(a), Value::Integer(b)) => cmp_int_real(*b, *a).reverse(),
            (Value::Text(a), Value::Text(b)) => a.as_bytes().cmp(b.as_bytes()),
            (Value::Blob(a), Value::Blob(b)) => a.cmp(b),
            (a, b) => a.class_rank().cmp(&b.class_rank()),
        }
    }
}

impl PartialOrd for Value {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Value {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Value {}

impl std::hash::Hash for Value {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // Equal values must hash equally: Integer(1) == Real(1.0).
        match self {
            Value::Null => 0u8.hash(state),
            Value::Integer(i) => {
                1u8.hash(state);
                (*i as f64).to_bits().hash(state);
            }
            Value::Real(r) => {
                1u8.hash(state);
                let r = if *r == 0.0 { 0.0 } else { *r };
                r.to_bits().hash(state);
            }
            Value::Text(s) => {
                2u8.hash(state);
                s.hash(state);
            }
            Value::Blob(b) => {
                3u8.hash(state);
                b.hash(state);
            }
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Null => f.write_str("NULL"),
            Value::Integer(i) => write!(f, "{i}"),
            Value::Real(r) => write!(f, "{r}"),
            Value::Text(s) => write!(f, "'{}'", s.replace('\'', "''")),
            Value::Blob(b) => {
                f.write_str("X'")?;
                for byte in b {
                    write!(f, "{byte:02X}")?;
                }
                f.write_str("'")
            }
        }
    }
}

impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Value::Integer(v)
    }
}
impl From<i32> for Value {
    fn from(v: i32) -> Self {
        Value::Integer(v.into())
    }
}
impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Value::Real(v)
    }
}
impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Value::Integer(v.into())
    }
}
impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::Text(v.to_owned())
    }
}
impl From<String> for Value {
    fn from(v: String) -> Self {
        Value::Text(v)
    }
}
impl From<Vec<u8>> for Value {
    fn from(v: Vec<u8>) -> Self {
        Value::Blob(v)
    }
}
impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Self {
        v.map_or(Value::Null, Into::into)
    }
}

/// Build [`RowData`] from `(column, value)` pairs:
/// `row_data([("title", "a".into()), ("version", 1.into())])`.
pub fn row_data<K: Into<String>, I: IntoIterator<Item = (K, Value)>>(pairs: I) -> RowData {
    pairs.into_iter().map(|(k, v)| (k.into(), v)).collect()
}

/// Approximate encoded size of a row, used for the row size limit.
pub fn row_size_bytes(id: &str, data: &RowData) -> usize {
    id.len() + data.iter().map(|(k, v)| k.len() + v.size_bytes()).sum::<usize>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_matches_sqlite_storage_classes() {
        let ordered = [
            Value::Null,
            Value::Integer(i64::MIN),
            Value::Real(-1.5),
            Value::Integer(-1),
            Value::Real(0.5),
            Value::Integer(1),
            Value::Real(1.5),
            Value::Text(String::new()),
            Value::Text("a".into()),
            Value::Text("b".into()),
            Value::Blob(vec![]),
            Value::Blob(vec![0]),
        ];
        for w in ordered.windows(2) {
            assert!(w[0] < w[1], "{:?} < {:?}", w[0], w[1]);
        }
        assert_eq!(Value::Integer(2), Value::Real(2.0));
        // -0.0, 0 and 0.0 are all equal, so the order stays transitive.
        assert_eq!(Value::Real(-0.0), Value::Real(0.0));
        assert_eq!(Value::Real(-0.0), Value::Integer(0));
        assert!(Value::Real(-0.0) < Value::Real(f64::MIN_POSITIVE));
    }

    #[test]
    fn json_round_trip() {
        let data = row_data([
            ("a", Value::Null),
            ("b", 3.into()),
            ("c", 2.5.into()),
            ("d", "x".into()),
        ]);
        let s = serde_json::to_string(&data).expect("serialize");
        let back: RowData = serde_json::from_str(&s).expect("deserialize");
        assert_eq!(back, data);
        assert!(matches!(back["b"], Value::Integer(3)));
        assert!(matches!(back["c"], Value::Real(_)));
    }

    #[test]
    fn json_keeps_every_real_exactly() {
        // serde_json without float_roundtrip parsed "5e-146" as
        // 5.0000000000000005e-146 and lost an ulp on each of these
        // (found by fuzz/corpus/upload/regression-float-roundtrip).
        assert!(matches!(serde_json::from_str::<Value>("5e-146"), Ok(Value::Real(r)) if r == 5e-146));
        for r in [
            5e-146,
            1.0715660391465826e-75,
            -1.81996730402717e-179,
            -1.603964615428183e143,
            5e-324,
        ] {
            let json = serde_json::to_string(&Value::Real(r)).expect("serialize");
            let back = serde_json::from_str::<Value>(&json).expect("deserialize");
            assert!(
                matches!(back, Value::Real(b) if b.to_bits() == r.to_bits()),
                "{r:e} came back as {back:?}"
            );
        }
    }

    #[test]
    fn json_decoding_per_type() {
        let de = |s: &str| serde_json::from_str::<Value>(s);
        assert!(matches!(de("null"), Ok(Value::Null)));
        assert!(matches!(de("-7"), Ok(Value::Integer(-7))));
        assert!(matches!(de("9223372036854775807"), Ok(Value::Integer(i64::MAX))));
        assert!(matches!(de("18446744073709551615"), Ok(Value::Real(r)) if r == u64::MAX as f64));
        assert!(matches!(de("1.5"), Ok(Value::Real(r)) if r == 1.5));
        assert!(matches!(de("\"a\\n\""), Ok(Value::Text(t)) if t == "a\n"));
        assert!(matches!(de("[0,255]"), Ok(Value::Blob(b)) if b == vec![0, 255]));
        assert!(matches!(de("[]"), Ok(Value::Blob(b)) if b.is_empty()));
        for bad in ["true", "{}", "[256]", "[-1]", "[\"a\"]"] {
            assert!(de(bad).is_err(), "{bad} decoded");
        }
    }
}
