//! The in-memory index of every key's history: etcd's `treeIndex` (`mvcc/index.go`).
//!
//! Ranges follow etcd's conventions for `end`: `None` is the single key `key`; `Some(&[])` is
//! every key `>= key`; otherwise `[key, end)` (empty if `end <= key`). The index is rebuilt from
//! the backend's `key` bucket on open.

use std::collections::{BTreeMap, HashSet};
use std::ops::Bound;

use super::key_index::{Found, KeyIndex, KeyMark};
use super::revision::Revision;

/// Keys and their histories.
#[derive(Debug, Default)]
pub struct TreeIndex {
    keys: BTreeMap<Vec<u8>, KeyIndex>,
}

/// A key live at the requested revision, and what `get` found for it.
pub type Live<'a> = (&'a [u8], Found);

impl TreeIndex {
    /// Number of keys with any history left.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// True if no key has history.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Histories of the keys in the range, in key order.
    fn range_iter<'a>(
        &'a self,
        key: &[u8],
        end: Option<&[u8]>,
    ) -> Box<dyn Iterator<Item = (&'a Vec<u8>, &'a KeyIndex)> + 'a> {
        match end {
            None => Box::new(self.keys.get_key_value(key).into_iter()),
            Some([]) => Box::new(
                self.keys
                    .range::<[u8], _>((Bound::Included(key), Bound::Unbounded)),
            ),
            Some(end) if end <= key => Box::new(std::iter::empty()),
            Some(end) => Box::new(
                self.keys
                    .range::<[u8], _>((Bound::Included(key), Bound::Excluded(end))),
            ),
        }
    }

    /// The key as of revision `at`.
    pub fn get(&self, key: &[u8], at: i64) -> Option<Found> {
        self.keys.get(key)?.get(at)
    }

    /// Keys live at `at` in the range, in key order: at most `limit` of them (0 = no limit), and
    /// the total number live (etcd counts before the limit).
    pub fn revisions(
        &self,
        key: &[u8],
        end: Option<&[u8]>,
        at: i64,
        limit: usize,
    ) -> (Vec<Live<'_>>, usize) {
        let mut out = Vec::new();
        let mut total = 0;
        for (k, ki) in self.range_iter(key, end) {
            if let Some(found) = ki.get(at) {
                total += 1;
                if limit == 0 || out.len() < limit {
                    out.push((k.as_slice(), found));
                }
            }
        }
        (out, total)
    }

    /// Number of keys live at `at` in the range.
    pub fn count(&self, key: &[u8], end: Option<&[u8]>, at: i64) -> usize {
        self.range_iter(key, end)
            .filter(|(_, ki)| ki.get(at).is_some())
            .count()
    }

    /// Every change at or after `rev` to keys in the range, in revision order (for watchers).
    pub fn range_since(&self, key: &[u8], end: Option<&[u8]>, rev: i64) -> Vec<Revision> {
        let mut out: Vec<Revision> = self
            .range_iter(key, end)
            .flat_map(|(_, ki)| ki.since(rev))
            .collect();
        out.sort_unstable();
        out
    }

    /// One key's history (for a write transaction's undo log).
    pub fn key_index(&self, key: &[u8]) -> Option<&KeyIndex> {
        self.keys.get(key)
    }

    /// Where a key's history stands now (`None`: it has none), for [`TreeIndex::rollback_key`].
    pub fn mark(&self, key: &[u8]) -> Option<KeyMark> {
        self.keys.get(key).map(KeyIndex::mark)
    }

    /// Puts back a key's history as it was at `mark` (`None`: the key had none).
    pub fn rollback_key(&mut self, key: &[u8], mark: Option<KeyMark>) {
        match mark {
            Some(mark) => {
                if let Some(ki) = self.keys.get_mut(key) {
                    ki.rollback(&mark);
                }
            }
            None => {
                self.keys.remove(key);
            }
        }
    }

    /// Records a put.
    pub fn put(&mut self, key: &[u8], rev: Revision) {
        match self.keys.get_mut(key) {
            Some(ki) => ki.put(rev),
            None => {
                let mut ki = KeyIndex::default();
                ki.put(rev);
                self.keys.insert(key.to_vec(), ki);
            }
        }
    }

    /// Records a delete; false if the key was not live.
    pub fn tombstone(&mut self, key: &[u8], rev: Revision) -> bool {
        self.keys.get_mut(key).is_some_and(|ki| ki.tombstone(rev))
    }

    /// Restore from disk: the oldest surviving revision of a key, or a later one. `false` if
    /// the revision is not newer than the key's last one (the bucket is corrupt).
    pub fn restore_put(
        &mut self,
        key: &[u8],
        created: Revision,
        modified: Revision,
        version: i64,
    ) -> bool {
        match self.keys.get_mut(key) {
            Some(ki) if modified <= ki.modified => false,
            Some(ki) => {
                ki.put(modified);
                true
            }
            None => {
                self.keys
                    .insert(key.to_vec(), KeyIndex::restore(created, modified, version));
                true
            }
        }
    }

    /// Restore from disk: a tombstone. `false` if it is not newer than the key's last revision.
    pub fn restore_tombstone(&mut self, key: &[u8], rev: Revision) -> bool {
        match self.keys.get_mut(key) {
            Some(ki) if rev <= ki.modified => false,
            Some(ki) => {
                ki.tombstone(rev);
                true
            }
            None => {
                self.keys
                    .insert(key.to_vec(), KeyIndex::restore_tombstone(rev));
                true
            }
        }
    }

    /// Compacts every key at `at`; returns the revisions at or below `at` that stay.
    pub fn compact(&mut self, at: i64) -> HashSet<Revision> {
        let mut available = HashSet::new();
        let mut from = Vec::new();
        while let Some(next) = self.compact_some(at, &from, usize::MAX, &mut available) {
            from = next;
        }
        available
    }

    /// Compacts at `at` at most `max` keys from `from` on, adding the revisions at or below `at`
    /// that stay to `available`. Returns the key to continue from, `None` when past the last.
    /// (Bounded steps keep the index lock short: readers wait at most one step.)
    pub fn compact_some(
        &mut self,
        at: i64,
        from: &[u8],
        max: usize,
        available: &mut HashSet<Revision>,
    ) -> Option<Vec<u8>> {
        let mut emptied = Vec::new();
        let mut next = None;
        for (n, (key, ki)) in self
            .keys
            .range_mut::<[u8], _>((Bound::Included(from), Bound::Unbounded))
            .enumerate()
        {
            if n == max {
                next = Some(key.clone());
                break;
            }
            ki.compact(at, available);
            if ki.is_empty() {
                emptied.push(key.clone());
            }
        }
        for key in emptied {
            self.keys.remove(&key);
        }
        next
    }

    /// The revisions a compaction at `at` would keep (tombstones at `at` excepted), for hashing.
    pub fn keep(&self, at: i64) -> HashSet<Revision> {
        let mut available = HashSet::new();
        for ki in self.keys.values() {
            ki.keep(at, &mut available);
        }
        available
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_end_conventions() {
        let mut t = TreeIndex::default();
        for (i, k) in [b"a".as_slice(), b"b", b"c", b"d"].into_iter().enumerate() {
            t.put(k, Revision::new(i as i64 + 2, 0));
        }
        let keys = |end: Option<&[u8]>, limit| {
            let (v, total) = t.revisions(b"b", end, 10, limit);
            (v.iter().map(|(k, _)| k.to_vec()).collect::<Vec<_>>(), total)
        };
        assert_eq!(keys(None, 0), (vec![b"b".to_vec()], 1));
        assert_eq!(keys(Some(b""), 0).1, 3);
        assert_eq!(keys(Some(b"d"), 0).1, 2);
        assert_eq!(keys(Some(b"a"), 0).1, 0, "end before key");
        assert_eq!(
            keys(Some(b""), 1),
            (vec![b"b".to_vec()], 3),
            "total counts past the limit"
        );
        // At revision 3 only a and b exist.
        assert_eq!(t.count(b"a", Some(b""), 3), 2);
    }
}
