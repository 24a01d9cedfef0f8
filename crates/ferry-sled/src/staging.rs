//! The staging area in sled: keyspace `09`, `09 bucket 00 op_id (u64 BE)`
//! → `kind, checksum (u32 BE), table len (u32 BE), table, row id len
//! (u32 BE), row id, then the row as `codec::encode_row` writes it (PUTs
//! of declared tables only)`.
//!
//! A switch-in runs inside the batch's [`Pending`] writes like every other
//! op, so on sled a checkpoint still switches in as one `apply_batch`
//! (sled 0.34 has no transaction that spills to disk); staging itself
//! goes in bounded batches as the ops arrive.

use std::ops::Bound;

use ferry_core::{codec, Schema};
use ferry_store::{switch_effect, table_def, StagedKind, StagedOp, StoreResult, SwitchEffect};

use crate::keys::{self, be_u64, corrupt, prefix_end, utf8};
use crate::pending::Pending;
use crate::{sled_err, unindex, values};

/// `09 bucket 00`: the prefix of one bucket's staged ops.
pub(crate) fn prefix(bucket: &str) -> Vec<u8> {
    keys::table_prefix(keys::STAGED, bucket)
}

/// `09 bucket 00 op_id`.
pub(crate) fn key(bucket: &str, op_id: u64) -> Vec<u8> {
    let mut k = prefix(bucket);
    k.extend_from_slice(&op_id.to_be_bytes());
    k
}

fn put_len(out: &mut Vec<u8>, bytes: &[u8]) {
    // Table names and row ids are bounded far below 4 GiB by the schema
    // and row limits.
    let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(bytes);
}

pub(crate) fn encode(op: &StagedOp) -> Vec<u8> {
    let row = op.data.as_ref().map(codec::encode_row);
    let mut out = Vec::with_capacity(13 + op.table.len() + op.row_id.len() + row.as_ref().map_or(0, Vec::len));
    out.push(op.kind.code());
    out.extend_from_slice(&op.checksum.to_be_bytes());
    put_len(&mut out, op.table.as_bytes());
    put_len(&mut out, op.row_id.as_bytes());
    if let Some(row) = row {
        out.extend_from_slice(&row);
    }
    out
}

fn take<'a>(buf: &mut &'a [u8], n: usize) -> StoreResult<&'a [u8]> {
    if buf.len() < n {
        return Err(corrupt("bad staged op"));
    }
    let (head, rest) = buf.split_at(n);
    *buf = rest;
    Ok(head)
}

fn take_len(buf: &mut &[u8]) -> StoreResult<usize> {
    let b = take(buf, 4)?;
    let arr: [u8; 4] = b.try_into().map_err(|_| corrupt("bad staged op"))?;
    usize::try_from(u32::from_be_bytes(arr)).map_err(|_| corrupt("bad staged op"))
}

pub(crate) fn decode(key: &[u8], prefix_len: usize, value: &[u8]) -> StoreResult<StagedOp> {
    let op_id = key
        .get(prefix_len..)
        .and_then(be_u64)
        .ok_or_else(|| corrupt("bad staged op key"))?;
    let mut buf = value;
    let code = take(&mut buf, 1)?[0];
    let kind = StagedKind::from_code(code).ok_or_else(|| corrupt("bad staged op kind"))?;
    let c = take(&mut buf, 4)?;
    let checksum = u32::from_be_bytes(c.try_into().map_err(|_| corrupt("bad staged op"))?);
    let n = take_len(&mut buf)?;
    let table = utf8(take(&mut buf, n)?)?;
    let n = take_len(&mut buf)?;
    let row_id = utf8(take(&mut buf, n)?)?;
    let data = if buf.is_empty() {
        None
    } else {
        Some(codec::decode_row(buf)?)
    };
    Ok(StagedOp {
        op_id,
        kind,
        table,
        row_id,
        data,
        checksum,
    })
}

/// Drop the staged ops of `bucket` through `through_op_id`.
pub(crate) fn delete(p: &mut Pending<'_>, bucket: &str, through_op_id: u64) -> StoreResult<()> {
    let lo = prefix(bucket);
    let hi = match through_op_id.checked_add(1) {
        Some(next) => Some(key(bucket, next)),
        None => prefix_end(&lo),
    };
    for k in p.keys_in(&lo, hi.as_deref())? {
        p.remove(k);
    }
    Ok(())
}

/// `BatchOp::SwitchInStaged` into the pending writes.
pub(crate) fn switch_in(
    p: &mut Pending<'_>,
    schema: &Schema,
    bucket: &str,
    from: u64,
    through: u64,
) -> StoreResult<()> {
    let pre = prefix(bucket);
    let lo = key(bucket, from);
    let hi = match through.checked_add(1) {
        Some(next) => Some(key(bucket, next)),
        None => prefix_end(&pre),
    };
    let states = p.keys_in(&[keys::BUCKET_STATE], prefix_end(&[keys::BUCKET_STATE]).as_deref())?;
    let buckets: Vec<String> = states
        .iter()
        .map(|k| utf8(k.get(1..).unwrap_or_default()))
        .collect::<StoreResult<_>>()?;
    for k in p.keys_in(&lo, hi.as_deref())? {
        let Some(v) = p.get(&k)? else { continue };
        match switch_effect(decode(&k, pre.len(), &v)?) {
            SwitchEffect::Put { table, id, data, entry } => {
                // Another bucket holding the row with a later op holds
                // newer values: this bucket's PUT is followed by a REMOVE
                // (the row left this bucket and stayed in that one).
                let mut newer = false;
                for b in buckets.iter().filter(|b| b.as_str() != bucket) {
                    if let Some(v) = p.get(&keys::bucket_entry_key(b, &table, &id))? {
                        let held = v.get(..8).and_then(be_u64).ok_or_else(|| corrupt("bad bucket entry"))?;
                        if held > entry.op_id {
                            newer = true;
                            break;
                        }
                    }
                }
                if let Some(data) = data.filter(|_| !newer) {
                    let def = table_def(schema, &table)?;
                    let row_key = keys::row_key(keys::SYNCED, &table, &id);
                    unindex(p, def, &row_key, &id)?;
                    for index in &def.indexes {
                        p.put(keys::index_entry_key(&table, index, &id, &data), id.as_bytes().to_vec());
                    }
                    p.put(row_key, codec::encode_row(&data));
                }
                keys::check_name("bucket entry table name", &entry.table)?;
                p.put(
                    keys::bucket_entry_key(bucket, &entry.table, &entry.row_id),
                    values::encode_bucket_entry(&entry),
                );
            }
            SwitchEffect::Remove { table, id } => {
                keys::check_name("bucket entry table name", &table)?;
                p.remove(keys::bucket_entry_key(bucket, &table, &id));
                let mut held = false;
                for b in &buckets {
                    if p.get(&keys::bucket_entry_key(b, &table, &id))?.is_some() {
                        held = true;
                        break;
                    }
                }
                if !held {
                    if let Ok(def) = schema.table(&table) {
                        let row_key = keys::row_key(keys::SYNCED, &table, &id);
                        unindex(p, def, &row_key, &id)?;
                        p.remove(row_key);
                    }
                }
            }
            SwitchEffect::Nothing => {}
        }
    }
    Ok(())
}

/// The staged entries of `bucket` after `after_op_id`, in op id order,
/// with the length of the bucket's key prefix (`None`: none can follow).
fn after(tree: &sled::Tree, bucket: &str, after_op_id: u64) -> Option<(usize, sled::Iter)> {
    let first = after_op_id.checked_add(1)?;
    let pre = prefix(bucket);
    let upper = prefix_end(&pre).map_or(Bound::Unbounded, Bound::Excluded);
    Some((pre.len(), tree.range((Bound::Included(key(bucket, first)), upper))))
}

/// `Store::staged_ops`.
pub(crate) fn read(tree: &sled::Tree, bucket: &str, after_op_id: u64, limit: usize) -> StoreResult<Vec<StagedOp>> {
    let Some((pre_len, entries)) = after(tree, bucket, after_op_id) else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for item in entries.take(limit) {
        let (k, v) = item.map_err(sled_err)?;
        out.push(decode(&k, pre_len, &v)?);
    }
    Ok(out)
}

/// The op ids `bucket` has staged after `after_op_id`, at most `limit`,
/// read from the keys alone (no op decoded).
pub(crate) fn op_ids(tree: &sled::Tree, bucket: &str, after_op_id: u64, limit: usize) -> StoreResult<Vec<u64>> {
    let Some((pre_len, entries)) = after(tree, bucket, after_op_id) else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for k in entries.keys().take(limit) {
        let k = k.map_err(sled_err)?;
        out.push(
            k.get(pre_len..)
                .and_then(be_u64)
                .ok_or_else(|| corrupt("bad staged op key"))?,
        );
    }
    Ok(out)
}

/// `Store::staged_buckets`: one seek per bucket.
pub(crate) fn buckets(tree: &sled::Tree) -> StoreResult<Vec<String>> {
    let mut out = Vec::new();
    let mut from = vec![keys::STAGED];
    let end = prefix_end(&[keys::STAGED]);
    let upper = end.map_or(Bound::Unbounded, Bound::Excluded);
    while let Some(item) = tree.range((Bound::Included(from.clone()), upper.clone())).next() {
        let (k, _) = item.map_err(sled_err)?;
        let rest = k.get(1..).unwrap_or_default();
        let at = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| corrupt("bad staged op key"))?;
        let name = utf8(&rest[..at])?;
        from = prefix_end(&prefix(&name)).ok_or_else(|| corrupt("bad staged op key"))?;
        out.push(name);
    }
    Ok(out)
}
