//! The key layout: one sled tree, one leading byte per keyspace.
//!
//! | keyspace       | key                                                  | value                    |
//! |----------------|------------------------------------------------------|--------------------------|
//! | store info     | `00` name                                            | e.g. the format version  |
//! | synced rows    | `01` table `00` id                                   | `codec::encode_row`      |
//! | index entries  | `02` table `00` index `00` `ferry_store::index_key`  | the row id               |
//! | overlay        | `03` table `00` id                                   | tag byte, then the row   |
//! | upload queue   | `04` seq (big-endian u64)                            | `codec::encode_entry`    |
//! | bucket entries | `05` bucket `00` table `00` row id                   | op id (u64 BE), checksum (u32 BE) |
//! | bucket state   | `06` bucket                                          | see [`crate::values`]    |
//! | metadata       | `07` key                                             | the value                |
//! | index defs     | `08` table `00` index                                | columns, `00`-separated  |
//! | staged ops     | `09` bucket `00` op id (big-endian u64)              | see [`crate::staging`]   |
//!
//! Table, index and column names never contain NUL (the schema allows only
//! ASCII letters, digits and `_`), so `table 00` ends a table name
//! unambiguously and a prefix scan over `space table 00` sees exactly that
//! table. Row ids come last in their keys, so they need no terminator; sled
//! orders keys bytewise, which for UTF-8 is the order of `String`, so prefix
//! scans return rows ordered by id.
//!
//! In the bucket entry keyspace the bucket name and the entry's table name
//! (which the store does not check against the schema) are each followed
//! by more key bytes, so they must not contain NUL: the store rejects such
//! names with [`StoreError::InvalidInput`] (see [`check_name`]). The row id
//! comes last and may contain anything, as in the row keyspaces. Because
//! neither name contains NUL, `05 bucket 00` is the prefix of exactly one
//! bucket's entries (not those of a bucket whose name extends it), and the
//! bytewise order of the keys under it is the order of `(table, row_id)`.

use ferry_store::{StoreError, StoreResult};

/// Store-level facts such as the format version.
pub(crate) const INFO: u8 = 0x00;
/// Synced rows.
pub(crate) const SYNCED: u8 = 0x01;
/// Index entries of synced rows.
pub(crate) const INDEX: u8 = 0x02;
/// Overlay entries.
pub(crate) const OVERLAY: u8 = 0x03;
/// The upload queue.
pub(crate) const QUEUE: u8 = 0x04;
/// Bucket entries.
pub(crate) const BUCKET_ENTRY: u8 = 0x05;
/// Bucket states.
pub(crate) const BUCKET_STATE: u8 = 0x06;
/// Metadata.
pub(crate) const META: u8 = 0x07;
/// Declared index definitions, as of the last open.
pub(crate) const INDEX_DEF: u8 = 0x08;
/// Staged ops of checkpoints being downloaded (see `crate::staging`).
pub(crate) const STAGED: u8 = 0x09;

const SEP: u8 = 0x00;

/// The key of the on-disk format version.
pub(crate) fn format_key() -> Vec<u8> {
    let mut k = vec![INFO];
    k.extend_from_slice(b"format");
    k
}

/// `space table 00`: the prefix of every row key of a table.
pub(crate) fn table_prefix(space: u8, table: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(table.len() + 2);
    k.push(space);
    k.extend_from_slice(table.as_bytes());
    k.push(SEP);
    k
}

/// `space table 00 id`: a synced row or overlay entry.
pub(crate) fn row_key(space: u8, table: &str, id: &str) -> Vec<u8> {
    let mut k = table_prefix(space, table);
    k.extend_from_slice(id.as_bytes());
    k
}

/// `02 table 00 index 00`: the prefix of every entry of one index.
pub(crate) fn index_prefix(table: &str, index: &str) -> Vec<u8> {
    let mut k = table_prefix(INDEX, table);
    k.extend_from_slice(index.as_bytes());
    k.push(SEP);
    k
}

/// The key of one index entry.
pub(crate) fn index_entry_key(table: &str, index: &ferry_core::Index, id: &str, data: &ferry_core::RowData) -> Vec<u8> {
    let mut k = index_prefix(table, &index.name);
    k.extend_from_slice(&ferry_store::index_key(index, id, data));
    k
}

/// `04 seq`.
pub(crate) fn queue_key(seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(9);
    k.push(QUEUE);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// The seq of a queue key.
pub(crate) fn queue_seq(key: &[u8]) -> StoreResult<u64> {
    match key {
        [QUEUE, rest @ ..] => be_u64(rest).ok_or_else(|| corrupt("bad queue key")),
        _ => Err(corrupt("bad queue key")),
    }
}

/// Reject a bucket or table name that would make bucket entry keys
/// ambiguous (`what` names it in the error).
pub(crate) fn check_name(what: &str, name: &str) -> StoreResult<()> {
    if name.as_bytes().contains(&SEP) {
        return Err(StoreError::InvalidInput(format!(
            "{what} {name:?} contains a NUL byte, which the sled store cannot key"
        )));
    }
    Ok(())
}

/// Reject bucket names that would make bucket entry keys ambiguous.
pub(crate) fn check_bucket(bucket: &str) -> StoreResult<()> {
    check_name("bucket name", bucket)
}

/// `05 bucket 00`: the prefix of every entry of one bucket. The bucket
/// name must have passed [`check_bucket`].
pub(crate) fn bucket_prefix(bucket: &str) -> Vec<u8> {
    table_prefix(BUCKET_ENTRY, bucket)
}

/// `05 bucket 00 table 00 row_id`. The bucket and table names must have
/// passed [`check_name`].
pub(crate) fn bucket_entry_key(bucket: &str, table: &str, row_id: &str) -> Vec<u8> {
    let mut k = bucket_prefix(bucket);
    k.extend_from_slice(table.as_bytes());
    k.push(SEP);
    k.extend_from_slice(row_id.as_bytes());
    k
}

/// The `(table, row_id)` of a bucket entry key whose bucket prefix is
/// `prefix_len` bytes long.
pub(crate) fn parse_bucket_entry_key(key: &[u8], prefix_len: usize) -> StoreResult<(String, String)> {
    let bad = || corrupt("bad bucket entry key");
    let rest = key.get(prefix_len..).ok_or_else(bad)?;
    let at = rest.iter().position(|&b| b == SEP).ok_or_else(bad)?;
    let (table, row_id) = rest.split_at(at);
    Ok((utf8(table)?, utf8(row_id.get(1..).unwrap_or_default())?))
}

/// `06 bucket`.
pub(crate) fn bucket_state_key(bucket: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(bucket.len() + 1);
    k.push(BUCKET_STATE);
    k.extend_from_slice(bucket.as_bytes());
    k
}

/// `07 key`.
pub(crate) fn meta_key(key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(key.len() + 1);
    k.push(META);
    k.extend_from_slice(key.as_bytes());
    k
}

/// `08 table 00 index`.
pub(crate) fn index_def_key(table: &str, index: &str) -> Vec<u8> {
    let mut k = table_prefix(INDEX_DEF, table);
    k.extend_from_slice(index.as_bytes());
    k
}

/// The `(table, index)` of an index definition key.
pub(crate) fn parse_index_def_key(key: &[u8]) -> StoreResult<(String, String)> {
    let rest = match key {
        [INDEX_DEF, rest @ ..] => rest,
        _ => return Err(corrupt("bad index definition key")),
    };
    let at = rest
        .iter()
        .position(|&b| b == SEP)
        .ok_or_else(|| corrupt("bad index definition key"))?;
    let (table, index) = rest.split_at(at);
    let index = index.get(1..).unwrap_or_default();
    Ok((utf8(table)?, utf8(index)?))
}

/// The UTF-8 text of a key after `prefix` (a row id, bucket or table name).
pub(crate) fn suffix(key: &[u8], prefix_len: usize) -> StoreResult<String> {
    utf8(
        key.get(prefix_len..)
            .ok_or_else(|| corrupt("key shorter than its prefix"))?,
    )
}

/// The smallest key greater than every key starting with `prefix`, or
/// `None` when there is none (the prefix is all `FF`).
pub(crate) fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

pub(crate) fn utf8(b: &[u8]) -> StoreResult<String> {
    String::from_utf8(b.to_vec()).map_err(|_| corrupt("key is not valid UTF-8"))
}

pub(crate) fn be_u64(b: &[u8]) -> Option<u64> {
    let a: [u8; 8] = b.try_into().ok()?;
    Some(u64::from_be_bytes(a))
}

pub(crate) fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt(what.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end(&[1, 2]), Some(vec![1, 3]));
        assert_eq!(prefix_end(&[1, 0xFF]), Some(vec![2]));
        assert_eq!(prefix_end(&[0xFF, 0xFF]), None);
    }

    #[test]
    fn tables_do_not_share_prefixes() {
        // "t" must not see rows of "t2".
        let p = table_prefix(SYNCED, "t");
        assert!(!row_key(SYNCED, "t2", "a").starts_with(&p));
        assert!(row_key(SYNCED, "t", "2a").starts_with(&p));
    }

    #[test]
    fn bucket_prefixes_are_exact_and_keys_order_by_table_then_row() {
        // "user/ann" must not see entries of "user/ann/x".
        let p = bucket_prefix("user/ann");
        assert!(!bucket_entry_key("user/ann/x", "t", "r").starts_with(&p));
        assert!(bucket_entry_key("user/ann", "t", "r").starts_with(&p));
        // (table, row id) order, including a table that extends another
        // and row ids with NUL or non-ASCII characters.
        let mut pairs = vec![
            ("t", "b"),
            ("t2", ""),
            ("t", "a\0"),
            ("", "z"),
            ("t", "\u{e9}"),
            ("t", "a"),
            ("tt", "a"),
        ];
        let mut by_key = pairs.clone();
        by_key.sort_by_key(|(t, r)| bucket_entry_key("b", t, r));
        pairs.sort();
        assert_eq!(by_key, pairs);
    }

    #[test]
    fn key_parts_round_trip() {
        assert_eq!(queue_seq(&queue_key(258)).expect("seq"), 258);
        let key = bucket_entry_key("b\u{e9}", "tickets", "r\0x");
        assert_eq!(
            parse_bucket_entry_key(&key, bucket_prefix("b\u{e9}").len()).expect("parse"),
            ("tickets".to_owned(), "r\0x".to_owned())
        );
        let key = bucket_entry_key("b", "", "");
        assert_eq!(
            parse_bucket_entry_key(&key, bucket_prefix("b").len()).expect("parse"),
            (String::new(), String::new())
        );
        assert!(parse_bucket_entry_key(&bucket_prefix("b"), bucket_prefix("b").len()).is_err());
        assert_eq!(
            parse_index_def_key(&index_def_key("tickets", "by_status")).expect("parse"),
            ("tickets".to_owned(), "by_status".to_owned())
        );
        assert!(matches!(check_bucket("a\0b"), Err(StoreError::InvalidInput(_))));
        assert!(matches!(check_name("table", "t\0"), Err(StoreError::InvalidInput(_))));
        assert!(check_bucket("any text, even \u{1F600}").is_ok());
    }
}
