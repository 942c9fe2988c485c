//! The in-memory index of every key's history: etcd's `treeIndex` (`mvcc/index.go`).
//!
//! Ranges follow etcd's conventions for `end`: `None` is the single key `key`; `Some(&[])` is
//! every key `>= key`; otherwise `[key, end)` (empty if `end <= key`). The index is rebuilt from
//! the backend's `key` bucket on open.

use std::collections::{BTreeMap, HashSet};
use std::ops::Bound;

use super::key_index::{Found, KeyIndex, KeyMark};
use super::revision::Revision;

/// One change of the backend's `key` bucket, for [`TreeIndex::restore`].
#[derive(Debug)]
pub struct Restored {
    /// The key's first 8 bytes, big-endian and zero-padded: ordered as the keys are, up to ties.
    order: u64,
    key: Vec<u8>,
    rev: Revision,
    created: Revision,
    version: i64,
    lease: i64,
    tombstone: bool,
}

impl Restored {
    /// A put of `key` at `rev` (created at `created`, its `version`-th since), attached to
    /// `lease` (0: none).
    pub fn put(
        key: Vec<u8>,
        rev: Revision,
        created: Revision,
        version: i64,
        lease: i64,
    ) -> Restored {
        Restored {
            order: order(&key),
            key,
            rev,
            created,
            version,
            lease,
            tombstone: false,
        }
    }

    /// A delete of `key` at `rev`.
    pub fn tombstone(key: Vec<u8>, rev: Revision) -> Restored {
        Restored {
            order: order(&key),
            key,
            rev,
            created: Revision::default(),
            version: 0,
            lease: 0,
            tombstone: true,
        }
    }
}

#[allow(
    clippy::big_endian_bytes,
    reason = "big-endian integers order as the bytes do: that is the point"
)]
fn order(key: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = key.len().min(8);
    b[..n].copy_from_slice(&key[..n]);
    u64::from_be_bytes(b)
}

/// Live keys attached to a lease, with the lease.
pub type Leased = Vec<(Vec<u8>, i64)>;

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

    /// Builds the index from every change of the `key` bucket, given in revision order (as the
    /// bucket holds them), and lists the live keys whose latest put is attached to a lease (what
    /// the lessor needs, found here without reading any value back). The changes are sorted by
    /// key and the map is built in one pass: a lookup per change in a map of millions of keys,
    /// each comparison a cache miss, made a restart at 10M keys take over a minute
    /// (bench/RESULTS.md, 2026-11-27). `Err` carries the revision of a key's second change at
    /// one revision (a corrupt bucket).
    pub fn restore(mut changes: Vec<Restored>) -> Result<(TreeIndex, Leased), Revision> {
        // The key's first 8 bytes inline decide most comparisons without reading the key.
        changes.sort_unstable_by(|a, b| {
            a.order
                .cmp(&b.order)
                .then_with(|| a.key.cmp(&b.key))
                .then(a.rev.cmp(&b.rev))
        });
        // Each key, its history, and the lease of its latest change.
        let mut keys: Vec<(Vec<u8>, KeyIndex, i64)> = Vec::with_capacity(changes.len());
        let mut last_order = None;
        for c in changes {
            // Keys of another order differ without being read.
            let same = last_order == Some(c.order);
            last_order = Some(c.order);
            match keys.last_mut() {
                Some((key, ki, lease)) if same && *key == c.key => {
                    if c.rev <= ki.modified {
                        return Err(c.rev);
                    }
                    if c.tombstone {
                        ki.tombstone(c.rev);
                    } else {
                        ki.put(c.rev);
                    }
                    *lease = c.lease;
                }
                _ => {
                    let ki = if c.tombstone {
                        KeyIndex::restore_tombstone(c.rev)
                    } else {
                        KeyIndex::restore(c.created, c.rev, c.version)
                    };
                    keys.push((c.key, ki, c.lease));
                }
            }
        }
        let leased = keys
            .iter()
            .filter(|(_, _, lease)| *lease != 0)
            .map(|(key, _, lease)| (key.clone(), *lease))
            .collect();
        // Sorted and unique: `from_iter` finds one run and builds the tree bottom-up.
        let index = TreeIndex {
            keys: keys.into_iter().map(|(k, ki, _)| (k, ki)).collect(),
        };
        Ok((index, leased))
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

    /// The bulk restore builds what a lookup per change builds (the way it was done before),
    /// with keys that share their first 8 bytes, tombstones and second generations.
    #[test]
    fn bulk_restore_matches_a_change_by_change_restore() {
        let keys: [&[u8]; 7] = [
            b"abcdefgh",
            b"abcdefgh\0",
            b"abcdefghX",
            b"ab",
            b"ab\0",
            b"",
            b"zz",
        ];
        // Revision order, as the bucket holds it: puts, some deletes, puts again.
        let mut history = Vec::new();
        let mut main = 2;
        for round in 0..3 {
            for (i, k) in keys.iter().enumerate() {
                let rev = Revision::new(main, 0);
                main += 1;
                let delete = round == 1 && i % 2 == 0;
                // "zz" stays attached to lease 7; "" was attached to 9 only by its first put.
                let lease = match (*k, round) {
                    (b"zz", _) => 7,
                    (b"", 0) => 9,
                    _ => 0,
                };
                history.push((k.to_vec(), rev, delete, lease));
            }
        }
        let mut expected: BTreeMap<Vec<u8>, KeyIndex> = BTreeMap::new();
        let mut changes = Vec::new();
        for (key, rev, delete, lease) in &history {
            if *delete {
                match expected.get_mut(key) {
                    Some(ki) => {
                        ki.tombstone(*rev);
                    }
                    None => {
                        expected.insert(key.clone(), KeyIndex::restore_tombstone(*rev));
                    }
                }
                changes.push(Restored::tombstone(key.clone(), *rev));
            } else {
                match expected.get_mut(key) {
                    Some(ki) => ki.put(*rev),
                    None => {
                        expected.insert(key.clone(), KeyIndex::restore(*rev, *rev, 1));
                    }
                }
                changes.push(Restored::put(key.clone(), *rev, *rev, 1, *lease));
            }
        }
        let (restored, leased) = TreeIndex::restore(changes).unwrap();
        assert_eq!(restored.keys, expected);
        assert_eq!(restored.len(), keys.len());
        assert_eq!(leased, vec![(b"zz".to_vec(), 7)]);
    }

    #[test]
    fn bulk_restore_refuses_two_changes_at_one_revision() {
        let rev = Revision::new(5, 0);
        let changes = vec![
            Restored::put(
                b"k".to_vec(),
                Revision::new(4, 0),
                Revision::new(4, 0),
                1,
                0,
            ),
            Restored::put(b"k".to_vec(), rev, Revision::new(4, 0), 2, 0),
            Restored::tombstone(b"k".to_vec(), rev),
        ];
        assert_eq!(TreeIndex::restore(changes).unwrap_err(), rev);
    }
}
