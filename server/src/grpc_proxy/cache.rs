//! The proxy's cache of serializable ranges, as etcd's (`grpcproxy/cache`): responses keyed by
//! their encoded request, at most [`MAX_ENTRIES`] (least recently used evicted first).
//!
//! - A request at a past revision reads history, which never changes: it stays until evicted,
//!   or is refused once a compaction through the proxy has passed its revision.
//! - A request at the current revision (revision 0) is dropped when a write could have changed
//!   its answer: a write through the proxy to an intersecting range (at once), or an event of
//!   the proxy's watch on the whole keyspace (writes made anywhere else). A response older than
//!   what that watch has already applied is not cached, since an event it missed may concern
//!   it; while the watch is down, nothing at revision 0 is cached at all.
//! - Only requests without credentials are cached (a cached answer was read with someone
//!   else's permissions), and nothing at all while the cluster refuses reads without
//!   credentials (auth is on: a probe read each second says so) or right after an auth call
//!   through the proxy.

use std::collections::HashMap;
use std::sync::Mutex;

use keel_proto::etcdserverpb as pb;
use prost::Message as _;

/// etcd's `DefaultMaxEntries`.
pub const MAX_ENTRIES: usize = 2048;

#[derive(Debug)]
struct Entry {
    response: pb::RangeResponse,
    used: u64,
    /// The range it reads, for revision-0 requests (empty `end`: one key).
    range: Option<(Vec<u8>, Vec<u8>)>,
}

#[derive(Debug, Default)]
struct Inner {
    entries: HashMap<Vec<u8>, Entry>,
    clock: u64,
    compacted: i64,
    /// The revision the keyspace watch has applied; `None` while it is not running.
    watched: Option<i64>,
    hits: u64,
    misses: u64,
    /// Cleared while reads without credentials are refused (auth is on), or an auth call just
    /// went through: a cached answer could then reach a client the cluster would refuse.
    disabled: bool,
}

/// Whether `[a, a_end)` and `[b, b_end)` intersect (etcd's range convention: an empty end is
/// one key, `\0` is every key from the start).
fn intersects(a: &[u8], a_end: &[u8], b: &[u8], b_end: &[u8]) -> bool {
    let contains = |start: &[u8], end: &[u8], key: &[u8]| match end {
        [] => key == start,
        [0] => key >= start,
        _ => key >= start && key < end,
    };
    match (a_end, b_end) {
        ([], _) => contains(b, b_end, a),
        (_, []) => contains(a, a_end, b),
        _ => {
            // Two intervals: each starts before the other ends.
            let before = |start: &[u8], end: &[u8]| end == [0] || start < end;
            before(a, b_end) && before(b, a_end)
        }
    }
}

/// The cache. Shared by the KV service and the keyspace watch.
#[derive(Debug, Default)]
pub struct Cache {
    inner: Mutex<Inner>,
}

/// A cached answer: the response, or etcd's compacted error.
pub enum Cached {
    Hit(pb::RangeResponse),
    Compacted,
    Miss,
}

impl Cache {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn key(r: &pb::RangeRequest) -> Vec<u8> {
        let mut r = r.clone();
        r.serializable = true;
        r.encode_to_vec()
    }

    /// The cached answer to `r` (a serializable range).
    pub fn get(&self, r: &pb::RangeRequest) -> Cached {
        let key = Self::key(r);
        let mut inner = self.lock();
        if inner.disabled {
            inner.misses += 1;
            return Cached::Miss;
        }
        if r.revision > 0 && r.revision < inner.compacted {
            inner.entries.remove(&key);
            inner.hits += 1;
            return Cached::Compacted;
        }
        inner.clock += 1;
        let now = inner.clock;
        match inner.entries.get_mut(&key) {
            Some(e) => {
                e.used = now;
                let response = e.response.clone();
                inner.hits += 1;
                Cached::Hit(response)
            }
            None => {
                inner.misses += 1;
                Cached::Miss
            }
        }
    }

    /// Keeps `response` as the answer to `r`, if it may be.
    pub fn add(&self, r: &pb::RangeRequest, response: &pb::RangeResponse) {
        let key = Self::key(r);
        let revision = response.header.as_ref().map_or(0, |h| h.revision);
        let mut inner = self.lock();
        if inner.disabled || (r.revision != 0 && r.revision <= inner.compacted) {
            return;
        }
        let range = if r.revision == 0 {
            match inner.watched {
                Some(w) if revision >= w => Some((r.key.clone(), r.range_end.clone())),
                // Older than what the watch applied, or no watch: it could be stale already.
                _ => return,
            }
        } else {
            None
        };
        if inner.entries.len() >= MAX_ENTRIES && !inner.entries.contains_key(&key) {
            let oldest = inner
                .entries
                .iter()
                .min_by_key(|(_, e)| e.used)
                .map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                inner.entries.remove(&k);
            }
        }
        inner.clock += 1;
        let used = inner.clock;
        inner.entries.insert(
            key,
            Entry {
                response: response.clone(),
                used,
                range,
            },
        );
    }

    /// A write to `[key, end)`: the revision-0 answers that read it go.
    pub fn invalidate(&self, key: &[u8], end: &[u8]) {
        self.lock().entries.retain(|_, e| match &e.range {
            Some((k, en)) => !intersects(k, en, key, end),
            None => true,
        });
    }

    /// The keyspace watch got events on `keys` up to `revision`: under one lock, what is
    /// cached for them goes and answers older than `revision` are no longer taken (in two
    /// steps, an answer read before the events could be stored between them, and stay).
    pub fn watched_events<'k>(&self, keys: impl Iterator<Item = &'k [u8]>, revision: i64) {
        let mut inner = self.lock();
        inner.watched = Some(inner.watched.map_or(revision, |w| w.max(revision)));
        for key in keys {
            inner.entries.retain(|_, e| match &e.range {
                Some((k, en)) => !intersects(k, en, key, &[]),
                None => true,
            });
        }
    }

    /// The keyspace watch applied events up to `revision` (each already passed to
    /// [`Cache::invalidate`]).
    pub fn watched(&self, revision: i64) {
        let mut inner = self.lock();
        inner.watched = Some(inner.watched.map_or(revision, |w| w.max(revision)));
    }

    /// The keyspace watch stopped: nothing at revision 0 can be trusted or cached until it runs
    /// again.
    pub fn unwatched(&self) {
        let mut inner = self.lock();
        inner.watched = None;
        inner.entries.retain(|_, e| e.range.is_none());
    }

    /// Empties the cache and keeps it empty until [`Cache::enable`]: the cluster refuses reads
    /// without credentials, or its auth changed.
    pub fn disable(&self) {
        let mut inner = self.lock();
        inner.disabled = true;
        inner.entries.clear();
    }

    /// Reads without credentials are answered again: the cache may serve them.
    pub fn enable(&self) {
        self.lock().disabled = false;
    }

    /// A compaction through the proxy.
    pub fn compact(&self, revision: i64) {
        let mut inner = self.lock();
        inner.compacted = inner.compacted.max(revision);
    }

    /// Entries, hits and misses (for the metrics).
    pub fn stats(&self) -> (usize, u64, u64) {
        let inner = self.lock();
        (inner.entries.len(), inner.hits, inner.misses)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(key: &str, end: &str, revision: i64) -> pb::RangeRequest {
        pb::RangeRequest {
            key: key.into(),
            range_end: end.into(),
            revision,
            serializable: true,
            ..Default::default()
        }
    }

    fn resp(revision: i64) -> pb::RangeResponse {
        pb::RangeResponse {
            header: Some(pb::ResponseHeader {
                revision,
                ..Default::default()
            }),
            count: revision,
            ..Default::default()
        }
    }

    #[test]
    fn intervals() {
        assert!(intersects(b"a", b"", b"a", b""));
        assert!(!intersects(b"a", b"", b"b", b""));
        assert!(intersects(b"a", b"c", b"b", b""));
        assert!(!intersects(b"a", b"c", b"c", b""));
        assert!(intersects(b"a", b"\0", b"zzz", b""));
        assert!(intersects(b"a", b"c", b"b", b"d"));
        assert!(!intersects(b"a", b"b", b"b", b"d"));
        assert!(intersects(b"x", b"\0", b"a", b"\0"));
    }

    #[test]
    fn current_answers_need_the_watch_and_go_with_writes() {
        let c = Cache::default();
        c.add(&req("a", "", 0), &resp(5));
        assert!(
            matches!(c.get(&req("a", "", 0)), Cached::Miss),
            "no watch yet"
        );
        c.watched(5);
        c.add(&req("a", "", 0), &resp(4));
        assert!(
            matches!(c.get(&req("a", "", 0)), Cached::Miss),
            "older than the watch"
        );
        c.add(&req("a", "", 0), &resp(5));
        c.add(&req("b", "d", 0), &resp(5));
        assert!(matches!(c.get(&req("a", "", 0)), Cached::Hit(r) if r.count == 5));
        c.invalidate(b"c", b"");
        assert!(matches!(c.get(&req("b", "d", 0)), Cached::Miss));
        assert!(matches!(c.get(&req("a", "", 0)), Cached::Hit(_)));
        c.unwatched();
        assert!(matches!(c.get(&req("a", "", 0)), Cached::Miss));
    }

    #[test]
    fn events_drop_their_keys_and_older_answers_at_once() {
        let c = Cache::default();
        c.watched(5);
        c.add(&req("a", "", 0), &resp(5));
        c.add(&req("b", "", 0), &resp(5));
        // A put of "a" at 7: its entry goes, and an answer read at 6 (before the put was
        // seen) is not taken afterwards.
        c.watched_events([b"a".as_slice()].into_iter(), 7);
        assert!(matches!(c.get(&req("a", "", 0)), Cached::Miss));
        assert!(matches!(c.get(&req("b", "", 0)), Cached::Hit(_)));
        c.add(&req("a", "", 0), &resp(6));
        assert!(matches!(c.get(&req("a", "", 0)), Cached::Miss));
        c.add(&req("a", "", 0), &resp(7));
        assert!(matches!(c.get(&req("a", "", 0)), Cached::Hit(_)));
    }

    #[test]
    fn a_disabled_cache_keeps_nothing() {
        let c = Cache::default();
        c.watched(1);
        c.add(&req("a", "", 0), &resp(5));
        c.add(&req("a", "", 3), &resp(5));
        c.disable();
        assert!(matches!(c.get(&req("a", "", 0)), Cached::Miss));
        assert!(matches!(c.get(&req("a", "", 3)), Cached::Miss));
        c.add(&req("a", "", 3), &resp(5));
        assert_eq!(c.stats().0, 0);
        c.enable();
        c.add(&req("a", "", 3), &resp(5));
        assert!(matches!(c.get(&req("a", "", 3)), Cached::Hit(_)));
    }

    #[test]
    fn history_stays_until_compacted() {
        let c = Cache::default();
        c.add(&req("a", "", 3), &resp(9));
        c.invalidate(b"a", b"");
        assert!(matches!(c.get(&req("a", "", 3)), Cached::Hit(_)));
        c.compact(4);
        assert!(matches!(c.get(&req("a", "", 3)), Cached::Compacted));
    }

    #[test]
    fn the_least_recently_used_goes_first() {
        let c = Cache::default();
        for i in 0..MAX_ENTRIES as i64 {
            c.add(&req("k", "", i + 1), &resp(1));
        }
        assert!(matches!(c.get(&req("k", "", 1)), Cached::Hit(_)));
        c.add(&req("k", "", 999_999), &resp(1));
        assert!(matches!(c.get(&req("k", "", 1)), Cached::Hit(_)));
        assert!(matches!(c.get(&req("k", "", 2)), Cached::Miss));
        assert_eq!(c.stats().0, MAX_ENTRIES);
    }
}
