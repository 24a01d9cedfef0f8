//! A batch under construction: the writes so far, read through over the
//! tree, so that later ops of a batch see earlier ones (a batch may put the
//! same row twice, or complete queue entries it appended).

use std::collections::BTreeMap;
use std::ops::Bound;

use ferry_store::StoreResult;

use crate::sled_err;

/// Pending writes over a tree. Only the writer holding the store's write
/// lock builds one, so the tree under it does not change meanwhile.
pub(crate) struct Pending<'a> {
    tree: &'a sled::Tree,
    /// key -> new value, or `None` for a removal.
    writes: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
}

impl<'a> Pending<'a> {
    pub(crate) fn new(tree: &'a sled::Tree) -> Self {
        Pending {
            tree,
            writes: BTreeMap::new(),
        }
    }

    /// The value of a key as the writes so far leave it.
    pub(crate) fn get(&self, key: &[u8]) -> StoreResult<Option<Vec<u8>>> {
        match self.writes.get(key) {
            Some(v) => Ok(v.clone()),
            None => Ok(self.tree.get(key).map_err(sled_err)?.map(|v| v.to_vec())),
        }
    }

    pub(crate) fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.writes.insert(key, Some(value));
    }

    pub(crate) fn remove(&mut self, key: Vec<u8>) {
        self.writes.insert(key, None);
    }

    /// Every key in `[lo, hi)` (`hi = None`: no upper end) as the writes so
    /// far leave the tree, in order.
    pub(crate) fn keys_in(&self, lo: &[u8], hi: Option<&[u8]>) -> StoreResult<Vec<Vec<u8>>> {
        let upper = hi.map_or(Bound::Unbounded, Bound::Excluded);
        if let Bound::Excluded(h) = upper {
            if lo >= h {
                return Ok(Vec::new());
            }
        }
        let mut keys: BTreeMap<Vec<u8>, ()> = BTreeMap::new();
        for item in self.tree.range::<&[u8], _>((Bound::Included(lo), upper)) {
            let (k, _) = item.map_err(sled_err)?;
            keys.insert(k.to_vec(), ());
        }
        for (k, v) in self.writes.range::<[u8], _>((Bound::Included(lo), upper)) {
            if v.is_some() {
                keys.insert(k.clone(), ());
            } else {
                keys.remove(k);
            }
        }
        Ok(keys.into_keys().collect())
    }

    /// Remove every key with this prefix.
    pub(crate) fn remove_prefix(&mut self, prefix: &[u8]) -> StoreResult<()> {
        let end = crate::keys::prefix_end(prefix);
        for k in self.keys_in(prefix, end.as_deref())? {
            self.remove(k);
        }
        Ok(())
    }

    /// How many keys with this leading byte the writes add (negative: remove)
    /// compared with the tree.
    pub(crate) fn count_delta(&self, space: u8) -> StoreResult<i64> {
        let mut delta = 0i64;
        let start = [space];
        let end = crate::keys::prefix_end(&start);
        let upper = end.as_deref().map_or(Bound::Unbounded, Bound::Excluded);
        for (k, v) in self.writes.range::<[u8], _>((Bound::Included(&start[..]), upper)) {
            let before = self.tree.contains_key(k).map_err(sled_err)?;
            match (before, v.is_some()) {
                (false, true) => delta += 1,
                (true, false) => delta -= 1,
                _ => {}
            }
        }
        Ok(delta)
    }

    /// The tree's own entries under a prefix, ignoring the pending writes.
    pub(crate) fn scan_tree_prefix(&self, prefix: &[u8]) -> sled::Iter {
        self.tree.scan_prefix(prefix)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }

    /// The writes as one sled batch.
    pub(crate) fn into_batch(self) -> sled::Batch {
        let mut batch = sled::Batch::default();
        for (k, v) in self.writes {
            match v {
                Some(v) => batch.insert(k, v),
                None => batch.remove(k),
            }
        }
        batch
    }
}
