//! The logical raft log as the WAL knows it: snapshot marker, hard state, where every live entry
//! is on disk, and an in-memory cache of the recent tail.
//!
//! Entries are located, not held: `locs` has one small record per live entry (term, segment,
//! offset), so a long log costs memory per entry, not per byte. The tail cache keeps the newest
//! entries whole so that the raft node reads what it just appended (and what followers need next)
//! without touching the disk. An entry leaves the cache only once the write that carried it is
//! durable, because only then can it be read back from its segment.

use std::collections::VecDeque;

use raft::eraftpb::{Entry, HardState};

use super::record::{Metadata, SnapshotMarker};
use crate::error::{Error, Result};

/// Where an entry's record lies.
#[derive(Debug, Clone, Copy)]
pub(crate) struct EntryLoc {
    /// The entry's term (kept here so `term()` never reads the disk).
    pub term: u64,
    /// Sequence number of the segment holding the record.
    pub seq: u64,
    /// Offset of the record's payload in that segment.
    pub offset: u64,
    /// Payload length.
    pub len: u32,
    /// Group-commit batch that wrote it (0: recovered from disk, hence durable).
    pub batch: u64,
}

/// Approximate memory an entry occupies in the cache.
fn cached_size(e: &Entry) -> usize {
    e.data.len() + e.context.len() + 64
}

/// The logical log.
#[derive(Debug, Default)]
pub(crate) struct LogState {
    /// Latest snapshot marker; the log holds `snapshot.index + 1 ..= last_index()`.
    pub snapshot: SnapshotMarker,
    /// Latest raft hard state.
    pub hard_state: HardState,
    /// Latest metadata.
    pub metadata: Metadata,
    /// One location per live entry, for `snapshot.index + 1 ..`.
    locs: VecDeque<EntryLoc>,
    /// The newest `cache.len()` entries, ending at `last_index()`.
    cache: VecDeque<Entry>,
    cache_bytes: usize,
    /// Cache budget in bytes.
    pub cache_limit: usize,
    /// Highest batch id known durable.
    pub durable_batch: u64,
}

impl LogState {
    pub fn new(cache_limit: usize) -> Self {
        LogState {
            cache_limit,
            ..Default::default()
        }
    }

    pub fn first_index(&self) -> u64 {
        self.snapshot.index + 1
    }

    pub fn last_index(&self) -> u64 {
        self.snapshot.index + self.locs.len() as u64
    }

    /// Term of `index`, if the log (or the snapshot marker) still knows it.
    pub fn term(&self, index: u64) -> Option<u64> {
        if index == self.snapshot.index {
            return Some(self.snapshot.term);
        }
        self.loc(index).map(|l| l.term)
    }

    pub fn loc(&self, index: u64) -> Option<&EntryLoc> {
        let pos = index.checked_sub(self.first_index())?;
        self.locs.get(usize::try_from(pos).ok()?)
    }

    /// The cached copy of entry `index`, if it is in the tail cache.
    pub fn cached(&self, index: u64) -> Option<&Entry> {
        let cache_first = self.last_index() + 1 - self.cache.len() as u64;
        let pos = index.checked_sub(cache_first)?;
        self.cache.get(usize::try_from(pos).ok()?)
    }

    /// Checks that entries `indexes` (in order) may be appended: each continues the one before,
    /// the first overwrites at most the whole log and never reaches at or below the snapshot.
    pub fn check_append(&self, mut indexes: impl Iterator<Item = u64>) -> Result<()> {
        let Some(first) = indexes.next() else {
            return Ok(());
        };
        if first > self.last_index() + 1 {
            return Err(Error::IndexGap {
                expected: self.last_index() + 1,
                got: first,
            });
        }
        if first <= self.snapshot.index {
            return Err(Error::InvalidArgument(format!(
                "entry index {first} is at or below the snapshot index {}",
                self.snapshot.index
            )));
        }
        let mut prev = first;
        for index in indexes {
            if index != prev + 1 {
                return Err(Error::IndexGap {
                    expected: prev + 1,
                    got: index,
                });
            }
            prev = index;
        }
        Ok(())
    }

    /// Appends one entry at `entry.index`, discarding any suffix from that index on (raft's
    /// overwrite of a conflicting, uncommitted suffix). `check_append` must have accepted it.
    pub fn append(&mut self, entry: Option<Entry>, index: u64, loc: EntryLoc) {
        assert!(
            index > self.snapshot.index && index <= self.last_index() + 1,
            "checked append"
        );
        self.truncate_from(index);
        self.locs.push_back(loc);
        match entry {
            Some(e) => {
                self.cache_bytes += cached_size(&e);
                self.cache.push_back(e);
            }
            // Recovery does not cache; the cache must stay a contiguous tail.
            None => self.clear_cache(),
        }
        self.evict();
    }

    /// Drops every entry at or after `index`.
    fn truncate_from(&mut self, index: u64) {
        let keep = (index - self.first_index()) as usize;
        if keep >= self.locs.len() {
            return;
        }
        let drop = self.locs.len() - keep;
        self.locs.truncate(keep);
        for _ in 0..drop.min(self.cache.len()) {
            let e = self.cache.pop_back().expect("counted");
            self.cache_bytes -= cached_size(&e);
        }
    }

    fn clear_cache(&mut self) {
        self.cache.clear();
        self.cache_bytes = 0;
    }

    /// Puts `entries` (the newest ones, ending at `last_index()`) into the cache after recovery.
    pub fn fill_cache(&mut self, entries: Vec<Entry>) {
        self.clear_cache();
        for e in entries {
            self.cache_bytes += cached_size(&e);
            self.cache.push_back(e);
        }
        debug_assert!(
            self.cache
                .back()
                .is_none_or(|e| e.index == self.last_index())
        );
        self.evict();
    }

    /// Evicts the oldest cached entries beyond the budget, never one not yet durable.
    pub fn evict(&mut self) {
        while self.cache_bytes > self.cache_limit {
            let Some(front) = self.cache.front() else {
                break;
            };
            let loc = self.loc(front.index).expect("cached entries are live");
            if loc.batch > self.durable_batch {
                break;
            }
            let e = self.cache.pop_front().expect("non-empty");
            self.cache_bytes -= cached_size(&e);
        }
    }

    /// Drops every entry and restarts the log after `marker`, whatever it held.
    pub fn reset(&mut self, marker: SnapshotMarker) {
        self.locs.clear();
        self.clear_cache();
        self.snapshot = marker;
    }

    /// Applies a snapshot marker. Entries up to its index are dropped. Entries after it are kept
    /// only if the log agrees with the marker's term at its index (a local compaction); otherwise
    /// (a snapshot received from a leader over a diverging log) the whole log is dropped, as raft
    /// does when it restores a snapshot.
    pub fn apply_snapshot(&mut self, marker: SnapshotMarker) {
        if marker.index < self.snapshot.index {
            return;
        }
        if self.term(marker.index) == Some(marker.term) {
            let drop = (marker.index - self.snapshot.index) as usize;
            let cache_first = self.last_index() + 1 - self.cache.len() as u64;
            self.locs.drain(..drop);
            // Cached entries at or below the marker go too.
            let cache_drop = (marker.index + 1).saturating_sub(cache_first) as usize;
            for _ in 0..cache_drop.min(self.cache.len()) {
                let e = self.cache.pop_front().expect("counted");
                self.cache_bytes -= cached_size(&e);
            }
        } else {
            self.locs.clear();
            self.clear_cache();
        }
        self.snapshot = marker;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(term: u64) -> EntryLoc {
        EntryLoc {
            term,
            seq: 1,
            offset: 0,
            len: 0,
            batch: 0,
        }
    }

    fn entry(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            data: vec![0; 100].into(),
            ..Default::default()
        }
    }

    fn push(log: &mut LogState, index: u64, term: u64) {
        log.check_append([index].into_iter()).unwrap();
        log.append(Some(entry(index, term)), index, loc(term));
    }

    #[test]
    fn overwrite_discards_the_suffix() {
        let mut log = LogState::new(1 << 20);
        for i in 1..=10 {
            push(&mut log, i, 1);
        }
        push(&mut log, 6, 2);
        assert_eq!(log.last_index(), 6);
        assert_eq!(log.term(6), Some(2));
        assert_eq!(log.term(5), Some(1));
        assert_eq!(log.cached(6).unwrap().term, 2);
        assert!(log.cached(7).is_none());
    }

    #[test]
    fn gaps_and_compacted_indexes_are_refused() {
        let mut log = LogState::new(1 << 20);
        push(&mut log, 1, 1);
        assert!(matches!(
            log.check_append([3].into_iter()),
            Err(Error::IndexGap { .. })
        ));
        assert!(matches!(
            log.check_append([2, 4].into_iter()),
            Err(Error::IndexGap { .. })
        ));
        log.apply_snapshot(SnapshotMarker {
            index: 1,
            term: 1,
            ..Default::default()
        });
        assert!(matches!(
            log.check_append([1].into_iter()),
            Err(Error::InvalidArgument(_))
        ));
        log.check_append([2, 3].into_iter()).unwrap();
    }

    #[test]
    fn snapshot_marker_compacts_or_resets() {
        let mut log = LogState::new(1 << 20);
        for i in 1..=10 {
            push(&mut log, i, 1);
        }
        log.apply_snapshot(SnapshotMarker {
            index: 4,
            term: 1,
            ..Default::default()
        });
        assert_eq!((log.first_index(), log.last_index()), (5, 10));
        assert_eq!(log.term(4), Some(1));
        assert!(log.cached(4).is_none());
        assert_eq!(log.cached(5).unwrap().index, 5);
        // A marker whose term disagrees drops everything.
        log.apply_snapshot(SnapshotMarker {
            index: 7,
            term: 3,
            ..Default::default()
        });
        assert_eq!((log.first_index(), log.last_index()), (8, 7));
        // A marker past the end does too.
        log.apply_snapshot(SnapshotMarker {
            index: 20,
            term: 3,
            ..Default::default()
        });
        assert_eq!((log.first_index(), log.last_index()), (21, 20));
        assert_eq!(log.term(20), Some(3));
    }

    #[test]
    fn eviction_keeps_undurable_entries() {
        let mut log = LogState::new(0);
        log.check_append([1].into_iter()).unwrap();
        log.append(Some(entry(1, 1)), 1, EntryLoc { batch: 1, ..loc(1) });
        assert!(log.cached(1).is_some(), "batch 1 is not durable yet");
        log.durable_batch = 1;
        log.evict();
        assert!(log.cached(1).is_none());
    }
}
