//! The conformance suite against a store that implements only the
//! required methods, so the trait's provided reads (the visible state,
//! `scan_synced_index_limited` as the full scan cut to its limit) are the
//! ones checked.

use std::ops::Bound;

use ferry_core::{CrudEntry, RowData, Schema, Value};
use ferry_store::testkit::Backend;
use ferry_store::{BucketEntry, BucketState, MemoryStore, OverlayEntry, Rows, Store, StoreResult, WriteBatch};

/// A [`MemoryStore`] seen only through the required methods.
#[derive(Debug)]
struct Plain(MemoryStore);

impl Store for Plain {
    fn schema(&self) -> &Schema {
        self.0.schema()
    }
    fn apply(&self, batch: WriteBatch) -> StoreResult<()> {
        self.0.apply(batch)
    }
    fn get_synced(&self, table: &str, id: &str) -> StoreResult<Option<RowData>> {
        self.0.get_synced(table, id)
    }
    fn scan_synced(&self, table: &str) -> StoreResult<Rows> {
        self.0.scan_synced(table)
    }
    fn scan_synced_index(
        &self,
        table: &str,
        index: &str,
        lower: Bound<Vec<Value>>,
        upper: Bound<Vec<Value>>,
    ) -> StoreResult<Rows> {
        self.0.scan_synced_index(table, index, lower, upper)
    }
    fn get_overlay(&self, table: &str, id: &str) -> StoreResult<Option<OverlayEntry>> {
        self.0.get_overlay(table, id)
    }
    fn scan_overlay(&self, table: &str) -> StoreResult<Vec<(String, OverlayEntry)>> {
        self.0.scan_overlay(table)
    }
    fn queue_from(&self, from_seq: u64, limit: usize) -> StoreResult<Vec<CrudEntry>> {
        self.0.queue_from(from_seq, limit)
    }
    fn queue_len(&self) -> StoreResult<u64> {
        self.0.queue_len()
    }
    fn bucket_state(&self, bucket: &str) -> StoreResult<Option<BucketState>> {
        self.0.bucket_state(bucket)
    }
    fn buckets(&self) -> StoreResult<Vec<(String, BucketState)>> {
        self.0.buckets()
    }
    fn bucket_entry(&self, bucket: &str, table: &str, row_id: &str) -> StoreResult<Option<BucketEntry>> {
        self.0.bucket_entry(bucket, table, row_id)
    }
    fn bucket_entries(&self, bucket: &str, after: Option<(&str, &str)>, limit: usize) -> StoreResult<Vec<BucketEntry>> {
        self.0.bucket_entries(bucket, after, limit)
    }
    fn get_meta(&self, key: &str) -> StoreResult<Option<Vec<u8>>> {
        self.0.get_meta(key)
    }

    fn staged_ops(&self, bucket: &str, after_op_id: u64, limit: usize) -> StoreResult<Vec<ferry_store::StagedOp>> {
        self.0.staged_ops(bucket, after_op_id, limit)
    }

    fn staged_buckets(&self) -> StoreResult<Vec<String>> {
        self.0.staged_buckets()
    }
}

struct PlainBackend;

impl Backend for PlainBackend {
    type Location = MemoryStore;
    type Store = Plain;

    fn fresh(&self) -> Self::Location {
        MemoryStore::new(Schema::default())
    }

    fn open(&self, location: &Self::Location, schema: Schema) -> StoreResult<Self::Store> {
        Ok(Plain(location.reopen(schema)))
    }
}

ferry_store::conformance_tests!(PlainBackend);
