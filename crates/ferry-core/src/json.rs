//! A row as JSON text, written without `serde`'s machinery for the
//! common values: the same bytes `serde_json::to_string` writes for a
//! [`RowData`] (the op log's text, and the size the row limits measure),
//! at a fraction of the work. Names and texts that need no escape are
//! copied as they are, integers written digit by digit; anything else (a
//! text to escape, a real, a blob) goes through `serde_json` itself.

use crate::value::{RowData, Value};

/// Whether `s` goes into a JSON string as it is: `serde_json` escapes
/// only `"`, `\` and the control characters below U+0020. Eight bytes
/// at a time (a row's texts are mostly plain and tens of bytes long).
pub(crate) fn plain(s: &str) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    // Whether a byte of `w` is below `n` (n <= 128), and whether one is
    // zero: the usual word tricks, exact as booleans.
    let below = |w: u64, n: u64| w.wrapping_sub(ONES * n) & !w & HIGHS != 0;
    let mut words = s.as_bytes().chunks_exact(8);
    for c in words.by_ref() {
        let w = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        if below(w, 0x20) || below(w ^ (ONES * u64::from(b'"')), 1) || below(w ^ (ONES * u64::from(b'\\')), 1) {
            return false;
        }
    }
    !words.remainder().iter().any(|&b| b < 0x20 || b == b'"' || b == b'\\')
}

/// `s` as a JSON string (quotes included), as `serde_json` writes it.
fn push_str(out: &mut Vec<u8>, s: &str) -> serde_json::Result<()> {
    if plain(s) {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
        Ok(())
    } else {
        serde_json::to_writer(out, s)
    }
}

/// Append `s` as a JSON string (quotes included), as `serde_json` writes
/// it.
pub fn push_json_str(out: &mut Vec<u8>, s: &str) {
    // Writing to a Vec does not fail; the fallback keeps this total.
    if push_str(out, s).is_err() {
        out.extend_from_slice(b"\"\"");
    }
}

/// Append `v` in decimal, as `serde_json` (and `Display`) writes it.
pub fn push_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
}

/// Append `v` in decimal with leading zeros to `width` digits.
fn push_u64_padded(out: &mut Vec<u8>, v: u64, width: usize) {
    let mut buf = itoa::Buffer::new();
    let digits = buf.format(v).as_bytes();
    out.extend(std::iter::repeat_n(b'0', width.saturating_sub(digits.len())));
    out.extend_from_slice(digits);
}

/// Append a clock as the JSON string `serde_json` writes for it (its
/// `Display` form, quoted).
pub fn push_hlc(out: &mut Vec<u8>, hlc: &crate::HlcTimestamp) {
    if !plain(&hlc.node) {
        push_json_str(out, &hlc.to_string());
        return;
    }
    out.push(b'"');
    push_u64_padded(out, hlc.wall_ms, 15);
    out.push(b'-');
    push_u64_padded(out, u64::from(hlc.counter), 5);
    out.push(b'-');
    out.extend_from_slice(hlc.node.as_bytes());
    out.push(b'"');
}

/// `i` in decimal, as `serde_json` (and `Display`) writes it.
fn push_i64(out: &mut Vec<u8>, i: i64) {
    if i < 0 {
        out.push(b'-');
    }
    out.extend_from_slice(itoa::Buffer::new().format(i.unsigned_abs()).as_bytes());
}

/// Append `data` as `serde_json::to_writer` writes it.
pub fn write_row_json(out: &mut Vec<u8>, data: &RowData) -> serde_json::Result<()> {
    out.push(b'{');
    for (i, (name, value)) in data.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        push_str(out, name)?;
        out.push(b':');
        match value {
            Value::Null => out.extend_from_slice(b"null"),
            Value::Integer(i) => push_i64(out, *i),
            Value::Text(s) => push_str(out, s)?,
            Value::Real(_) | Value::Blob(_) => serde_json::to_writer(&mut *out, value)?,
        }
    }
    out.push(b'}');
    Ok(())
}

/// `data` as `serde_json::to_string` writes it, in room sized for it.
pub fn row_json(data: &RowData) -> serde_json::Result<String> {
    // Room for it unless texts need escapes (then it grows).
    let room = data.iter().fold(2, |n: usize, (name, value)| {
        let v = match value {
            Value::Text(s) => s.len() + 2,
            Value::Blob(b) => b.len() * 4 + 2,
            _ => 24,
        };
        n.saturating_add(name.len() + 4).saturating_add(v)
    });
    let mut out = Vec::with_capacity(room);
    write_row_json(&mut out, data)?;
    // Only UTF-8 was written: the names and texts (valid `str`s) and
    // ASCII around them.
    String::from_utf8(out).map_err(<serde_json::Error as serde::ser::Error>::custom)
}

/// Bytes counted as they are written (for lengths `serde_json` works
/// out).
struct Count(usize);

impl std::io::Write for Count {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The length of what `serde_json` writes for `value`.
fn serde_len<T: serde::Serialize + ?Sized>(value: &T) -> usize {
    let mut n = Count(0);
    match serde_json::to_writer(&mut n, value) {
        Ok(()) => n.0,
        // Not for any value of a row (its names are text).
        Err(_) => usize::MAX,
    }
}

/// The length of a JSON string of `s` (quotes included).
fn str_len(s: &str) -> usize {
    if plain(s) {
        s.len() + 2
    } else {
        serde_len(s)
    }
}

/// The number of decimal digits of `v`.
fn digits(mut v: u64) -> usize {
    let mut n = 1;
    while v >= 10 {
        v /= 10;
        n += 1;
    }
    n
}

/// The length of `data`'s JSON text ([`write_row_json`]'s, which is
/// `serde_json`'s), without writing it.
pub fn row_json_len(data: &RowData) -> usize {
    let mut n: usize = 2 + data.len().saturating_sub(1);
    for (name, value) in data {
        let v = match value {
            Value::Null => 4,
            Value::Integer(i) => digits(i.unsigned_abs()) + usize::from(*i < 0),
            Value::Text(s) => str_len(s),
            Value::Real(_) | Value::Blob(_) => serde_len(value),
        };
        n = n.saturating_add(str_len(name) + 1).saturating_add(v);
    }
    n
}

#[cfg(test)]
mod tests {
    use super::{row_json, row_json_len};
    use crate::value::{RowData, Value};

    fn rows() -> Vec<RowData> {
        let texts = [
            "",
            "plain text",
            "quote \" and backslash \\",
            "tab\tnew line\ncontrol \u{1} \u{1f} del \u{7f}",
            "é ünïcode 雪 🚀",
            "</script>",
        ];
        let mut values: Vec<Value> = vec![
            Value::Null,
            Value::Integer(0),
            Value::Integer(9),
            Value::Integer(10),
            Value::Integer(-1),
            Value::Integer(i64::MIN),
            Value::Integer(i64::MAX),
            Value::Real(0.5),
            Value::Real(-0.0),
            Value::Real(1e300),
            Value::Real(f64::NAN),
            Value::Real(f64::INFINITY),
            Value::Blob(vec![]),
            Value::Blob(vec![0, 1, 255]),
        ];
        values.extend(texts.iter().map(|t| Value::Text((*t).to_owned())));
        let mut out = vec![RowData::new()];
        for (i, v) in values.iter().enumerate() {
            let name = texts[i % texts.len()];
            out.push([(name.to_owned(), v.clone())].into_iter().collect());
        }
        out.push(
            values
                .iter()
                .enumerate()
                .map(|(i, v)| (format!("{}{i}", texts[i % texts.len()]), v.clone()))
                .collect(),
        );
        out
    }

    /// Every byte that needs an escape, at every place of an 8-byte
    /// word and in the tail, is found; the bytes around them are not.
    #[test]
    fn plain_finds_what_needs_an_escape() {
        for len in 0..20 {
            for at in 0..len {
                for b in (0u8..0x20).chain([b'"', b'\\']) {
                    let mut bytes = vec![b'a'; len];
                    bytes[at] = b;
                    let s = String::from_utf8(bytes).expect("ascii");
                    assert!(!super::plain(&s), "{s:?}");
                }
                for b in [0x20u8, b'!', b'#', b'[', b']', 0x7f] {
                    let mut bytes = vec![b'a'; len];
                    bytes[at] = b;
                    let s = String::from_utf8(bytes).expect("ascii");
                    assert!(super::plain(&s), "{s:?}");
                }
            }
        }
        assert!(super::plain("é ünïcode 雪 🚀 ÿ\u{80}\u{9f}"));
    }

    /// Numbers and clocks as `Display` (and `serde_json`) write them, at
    /// every digit count and at the padding's edges.
    #[test]
    fn numbers_and_clocks_are_written_as_display_writes_them() {
        let mut values = vec![0u64, u64::MAX];
        let mut p = 1u64;
        while let Some(next) = p.checked_mul(10) {
            values.extend([p - 1, p, p + 1]);
            p = next;
        }
        for v in values {
            let mut out = Vec::new();
            super::push_u64(&mut out, v);
            assert_eq!(out, v.to_string().into_bytes());
            let counter = u32::try_from(v % 1_000_000).expect("small");
            let hlc = crate::HlcTimestamp {
                wall_ms: v,
                counter,
                node: "server-1".into(),
            };
            let mut out = Vec::new();
            super::push_hlc(&mut out, &hlc);
            assert_eq!(out, format!("\"{hlc}\"").into_bytes());
        }
    }

    #[test]
    fn row_json_is_what_serde_json_writes() {
        for row in rows() {
            let expected = serde_json::to_string(&row).expect("encode");
            assert_eq!(row_json(&row).expect("encode"), expected);
            assert_eq!(row_json_len(&row), expected.len(), "{expected}");
        }
        for i in [0, 1, 7, 9, 10, 11, 99, 100, 12345, -5, -10, -99, -100, i64::MIN + 1] {
            let row: RowData = [("n".to_owned(), Value::Integer(i))].into_iter().collect();
            let expected = serde_json::to_string(&row).expect("encode");
            assert_eq!(row_json(&row).expect("encode"), expected);
            assert_eq!(row_json_len(&row), expected.len(), "{expected}");
        }
    }
}
