//! The history of one key: etcd's `keyIndex` (`mvcc/key_index.go`), with the same semantics.
//!
//! A key's life is a list of *generations*. A generation runs from the revision that created the
//! key to the revision that deleted it (its tombstone, the last revision of the generation); the
//! last generation is the live one (empty if the key is currently deleted). `ver` counts the
//! revisions of a generation, tombstone included, and is never reduced by compaction, so the
//! version of a revision stays right after older revisions are compacted away.
//!
//! # Worked example (from etcd)
//! ```text
//! put(1) put(2) tombstone(3) put(4) tombstone(5)
//!   generations: {1, 2, 3(t)} {4, 5(t)} {}
//! compact(2): {2, 3(t)} {4, 5(t)} {}      revision 1 is gone; 2 is the latest <= 2, kept
//! compact(4): {4, 5(t)} {}                the first generation ended (tombstone 3) before 4
//! compact(5): {5(t)} {}                   a tombstone at exactly the compaction revision is kept
//!                                         (etcd >= 3.5.16), so watchers from 5 still see it
//! compact(6): {}                          nothing left: the key leaves the index
//! ```

use std::collections::HashSet;

use super::revision::Revision;

/// One incarnation of a key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Generation {
    /// Number of revisions in the generation (tombstone included), compaction notwithstanding.
    pub ver: i64,
    /// Revision that created the key in this generation.
    pub created: Revision,
    /// Revisions, oldest first; in a finished generation the last one is the tombstone.
    pub revs: Vec<Revision>,
}

impl Generation {
    fn is_empty(&self) -> bool {
        self.revs.is_empty()
    }

    /// Index of the newest revision with `main <= at`, if any.
    fn newest_at_or_below(&self, at: i64) -> Option<usize> {
        self.revs.iter().rposition(|r| r.main <= at)
    }
}

/// What `get` finds: the revision that holds the value, the creation revision and the version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Found {
    /// Revision of the value visible at the requested revision.
    pub modified: Revision,
    /// Revision that created this generation of the key.
    pub created: Revision,
    /// Version of the key at that revision.
    pub version: i64,
}

/// The history of one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyIndex {
    /// Latest revision of the key (put or tombstone).
    pub modified: Revision,
    /// Generations, oldest first; never empty.
    pub generations: Vec<Generation>,
}

impl Default for KeyIndex {
    fn default() -> Self {
        KeyIndex {
            modified: Revision::default(),
            generations: vec![Generation::default()],
        }
    }
}

/// Where a key's history stood before a write transaction appended to it: enough to cut the
/// appends off again (a transaction only appends: puts extend the last generation, a tombstone
/// ends it and opens a new one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyMark {
    modified: Revision,
    generations: usize,
    last_len: usize,
    last_ver: i64,
    last_created: Revision,
}

impl KeyIndex {
    /// The mark to roll back to (see [`KeyIndex::rollback`]), O(1) whatever the history.
    pub fn mark(&self) -> KeyMark {
        let last = self.generations.last().expect("never empty");
        KeyMark {
            modified: self.modified,
            generations: self.generations.len(),
            last_len: last.revs.len(),
            last_ver: last.ver,
            last_created: last.created,
        }
    }

    /// Cuts off everything appended since `mark` was taken.
    pub fn rollback(&mut self, mark: &KeyMark) {
        self.generations.truncate(mark.generations);
        let last = self.generations.last_mut().expect("never empty");
        last.revs.truncate(mark.last_len);
        last.ver = mark.last_ver;
        last.created = mark.last_created;
        self.modified = mark.modified;
    }

    /// Records a put at `rev` (which must be newer than every revision of the key).
    pub fn put(&mut self, rev: Revision) {
        assert!(
            rev > self.modified,
            "put {rev:?} is not newer than {:?}",
            self.modified
        );
        let g = self.generations.last_mut().expect("never empty");
        if g.is_empty() {
            g.created = rev;
        }
        g.revs.push(rev);
        g.ver += 1;
        self.modified = rev;
    }

    /// Records a delete at `rev`. Returns false (and changes nothing) if the key is not live.
    pub fn tombstone(&mut self, rev: Revision) -> bool {
        if self.generations.last().expect("never empty").is_empty() {
            return false;
        }
        self.put(rev);
        self.generations.push(Generation::default());
        true
    }

    /// Starts the index of a key from its oldest surviving revision, read back from disk.
    pub fn restore(created: Revision, modified: Revision, ver: i64) -> KeyIndex {
        KeyIndex {
            modified,
            generations: vec![Generation {
                ver,
                created,
                revs: vec![modified],
            }],
        }
    }

    /// Starts the index of a key whose oldest surviving revision is a tombstone (kept by a
    /// compaction at exactly that revision).
    pub fn restore_tombstone(rev: Revision) -> KeyIndex {
        let mut ki = KeyIndex::restore(Revision::default(), rev, 1);
        ki.generations.push(Generation::default());
        ki
    }

    /// True if the key has no revisions left.
    pub fn is_empty(&self) -> bool {
        self.generations.len() == 1 && self.generations[0].is_empty()
    }

    /// The generation holding revision `at`, unless the key is deleted (or not yet created) at it.
    fn find_generation(&self, at: i64) -> Option<&Generation> {
        let last = self.generations.len() - 1;
        for (i, g) in self.generations.iter().enumerate().rev() {
            if g.is_empty() {
                continue;
            }
            if i != last && g.revs.last().expect("non-empty").main <= at {
                // That generation ended (tombstone) at or before `at`.
                return None;
            }
            if g.revs[0].main <= at {
                return Some(g);
            }
        }
        None
    }

    /// The key as of revision `at`, if it is live then.
    pub fn get(&self, at: i64) -> Option<Found> {
        let g = self.find_generation(at)?;
        let n = g.newest_at_or_below(at)?;
        Some(Found {
            modified: g.revs[n],
            created: g.created,
            version: g.ver - (g.revs.len() - n - 1) as i64,
        })
    }

    /// Every revision from `rev` on (tombstones included), one per main revision (the highest
    /// sub), oldest first: what a watcher starting at `rev` must see.
    pub fn since(&self, rev: i64) -> Vec<Revision> {
        let mut start = 0;
        for (i, g) in self.generations.iter().enumerate().skip(1).rev() {
            if g.is_empty() {
                continue;
            }
            if g.created.main < rev {
                start = i;
                break;
            }
        }
        let mut out: Vec<Revision> = Vec::new();
        for g in &self.generations[start..] {
            for &r in &g.revs {
                if r.main < rev {
                    continue;
                }
                match out.last_mut() {
                    Some(last) if last.main == r.main => *last = r,
                    _ => out.push(r),
                }
            }
        }
        out
    }

    /// The generation and revision a compaction at `at` starts keeping from; adds that revision
    /// (the newest at or below `at` in that generation) to `available`.
    fn do_compact(&self, at: i64, available: &mut HashSet<Revision>) -> (usize, Option<usize>) {
        let mut gen_idx = 0;
        while gen_idx < self.generations.len() - 1 {
            let g = &self.generations[gen_idx];
            let tomb = g
                .revs
                .last()
                .expect("finished generations are non-empty")
                .main;
            // A tombstone at `at` itself is kept (etcd 3.5.16+), unless the key was put again
            // later in that same revision (a txn deleting then putting it): then the key's state
            // at `at` is in the next generation.
            let next_created = self.generations[gen_idx + 1].revs.first().map(|r| r.main);
            if tomb > at || (tomb == at && next_created != Some(at)) {
                break;
            }
            gen_idx += 1;
        }
        let g = &self.generations[gen_idx];
        let rev_idx = g.newest_at_or_below(at);
        if let Some(i) = rev_idx {
            available.insert(g.revs[i]);
        }
        (gen_idx, rev_idx)
    }

    /// Drops the history no read at or after `at` can need; records the revisions it keeps from
    /// at or below `at` in `available`.
    pub fn compact(&mut self, at: i64, available: &mut HashSet<Revision>) {
        if self.is_empty() {
            return;
        }
        let (gen_idx, rev_idx) = self.do_compact(at, available);
        let g = &mut self.generations[gen_idx];
        if let Some(i) = rev_idx {
            g.revs.drain(..i);
        }
        self.generations.drain(..gen_idx);
    }

    /// Like `compact` but read-only, for hashing: the revisions a compaction at `at` would keep,
    /// except a tombstone at exactly `at` (so hashes match etcd versions that dropped it).
    pub fn keep(&self, at: i64, available: &mut HashSet<Revision>) {
        if self.is_empty() {
            return;
        }
        let (gen_idx, rev_idx) = self.do_compact(at, available);
        let g = &self.generations[gen_idx];
        if let Some(i) = rev_idx
            && i == g.revs.len() - 1
            && gen_idx != self.generations.len() - 1
        {
            available.remove(&g.revs[i]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rollback_cuts_off_what_a_transaction_appended() {
        let mut ki = KeyIndex::default();
        ki.put(Revision::new(2, 0));
        ki.put(Revision::new(3, 0));
        let before = ki.clone();
        let mark = ki.mark();
        ki.put(Revision::new(4, 0));
        assert!(ki.tombstone(Revision::new(4, 1)));
        ki.put(Revision::new(4, 2));
        ki.rollback(&mark);
        assert_eq!(ki, before);
        // From a tombstoned key (an empty last generation) too.
        assert!(ki.tombstone(Revision::new(5, 0)));
        let before = ki.clone();
        let mark = ki.mark();
        ki.put(Revision::new(6, 0));
        ki.rollback(&mark);
        assert_eq!(ki, before);
    }

    fn r(main: i64) -> Revision {
        Revision::new(main, 0)
    }

    /// put 1, put 2, tombstone 3, put 4, tombstone 5 (etcd's example).
    fn example() -> KeyIndex {
        let mut ki = KeyIndex::default();
        ki.put(r(1));
        ki.put(r(2));
        assert!(ki.tombstone(r(3)));
        ki.put(r(4));
        assert!(ki.tombstone(r(5)));
        ki
    }

    fn revs(ki: &KeyIndex) -> Vec<Vec<i64>> {
        ki.generations
            .iter()
            .map(|g| g.revs.iter().map(|r| r.main).collect())
            .collect()
    }

    #[test]
    fn get_follows_generations() {
        let ki = example();
        assert_eq!(ki.get(0), None);
        assert_eq!(ki.get(1).unwrap().modified, r(1));
        let f = ki.get(2).unwrap();
        assert_eq!((f.modified, f.created, f.version), (r(2), r(1), 2));
        assert_eq!(ki.get(3), None, "deleted at 3");
        let f = ki.get(4).unwrap();
        assert_eq!((f.modified, f.created, f.version), (r(4), r(4), 1));
        assert_eq!(ki.get(5), None);
        assert_eq!(ki.get(100), None);
        let mut ki = KeyIndex::default();
        assert!(!ki.tombstone(r(1)), "nothing to delete");
    }

    #[test]
    fn compaction_matches_etcd_example() {
        let mut ki = example();
        let mut keep = HashSet::new();
        ki.compact(2, &mut keep);
        assert_eq!(revs(&ki), vec![vec![2, 3], vec![4, 5], vec![]]);
        assert_eq!(keep, HashSet::from([r(2)]));
        assert_eq!(ki.get(2).unwrap().version, 2, "version survives compaction");

        let mut keep = HashSet::new();
        ki.compact(4, &mut keep);
        assert_eq!(revs(&ki), vec![vec![4, 5], vec![]]);
        assert_eq!(keep, HashSet::from([r(4)]));

        let mut keep = HashSet::new();
        ki.compact(5, &mut keep);
        assert_eq!(
            revs(&ki),
            vec![vec![5], vec![]],
            "tombstone at the compaction revision kept"
        );
        assert_eq!(keep, HashSet::from([r(5)]));

        let mut keep = HashSet::new();
        ki.compact(6, &mut keep);
        assert!(ki.is_empty());
        assert!(keep.is_empty());
    }

    #[test]
    fn compaction_keeps_a_put_after_a_tombstone_in_the_same_revision() {
        // put 3; one txn at revision 4 deletes the key (4/0) and puts it again (4/2).
        let mut ki = KeyIndex::default();
        ki.put(r(3));
        assert!(ki.tombstone(Revision::new(4, 0)));
        ki.put(Revision::new(4, 2));
        let mut keep = HashSet::new();
        ki.keep(4, &mut keep);
        assert_eq!(keep, HashSet::from([Revision::new(4, 2)]));
        let mut keep = HashSet::new();
        ki.compact(4, &mut keep);
        assert_eq!(keep, HashSet::from([Revision::new(4, 2)]));
        assert_eq!(ki.get(4).unwrap().modified, Revision::new(4, 2));
        assert_eq!(ki.get(4).unwrap().version, 1);
    }

    #[test]
    fn keep_skips_a_tombstone_at_the_revision() {
        let ki = example();
        let mut keep = HashSet::new();
        ki.keep(5, &mut keep);
        assert!(keep.is_empty(), "{keep:?}");
        let mut keep = HashSet::new();
        ki.keep(4, &mut keep);
        assert_eq!(keep, HashSet::from([r(4)]));
    }

    #[test]
    fn since_lists_every_change_once_per_main_revision() {
        let mut ki = example();
        ki.put(Revision::new(6, 0));
        ki.put(Revision::new(7, 0));
        ki.put(Revision::new(7, 3));
        let mains: Vec<_> = ki.since(3).iter().map(|r| (r.main, r.sub)).collect();
        assert_eq!(mains, vec![(3, 0), (4, 0), (5, 0), (6, 0), (7, 3)]);
        assert_eq!(ki.since(7), vec![Revision::new(7, 3)]);
    }
}
