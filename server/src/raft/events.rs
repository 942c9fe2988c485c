//! What the storage core publishes after each apply batch: the changes of every revision, to
//! each watch hub, through a [`Feed`].
//!
//! A feed is bounded in bytes and never blocks the core: when a hub lags so far behind that its
//! feed is full, the core drops revisions for it and records the newest one dropped; the hub
//! then learns that it *lagged*, moves its watchers aside (unsynced) and catches them up from
//! the store's history, as it does for a slow client. So a slow hub costs bounded memory, and no
//! event is lost.
//!
//! A hub without watchers is sent nothing: the core checks [`Feed::watched`] before each push,
//! so an unwatched member wakes no hub and frees the changes on its own thread. When a hub makes
//! its first watcher it sets the flag, then moves its revision up to the store's. Both sides use
//! sequentially consistent operations (the flag here, the store's revision in the MVCC store),
//! so for every revision the core skipped, the hub's read of the store's revision sees it: no
//! watcher made then waits for a skipped revision from the feed (it starts after it, or catches
//! up from history).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use keel_engine::mvcc::Change;
use tokio::sync::Notify;

/// Bytes of revisions a feed holds before the core drops revisions for its hub (which then
/// catches up from history).
pub const FEED_BYTES: usize = 16 << 20;

/// The changes of one applied revision.
#[derive(Debug, Clone)]
pub struct Published {
    pub revision: i64,
    pub changes: Vec<Change>,
}

impl Published {
    /// Approximate memory held, for the feed's bound.
    pub fn size(&self) -> usize {
        self.changes
            .iter()
            .map(|c| 64 + c.kv.key.len() + c.kv.value.len())
            .sum()
    }
}

/// What a hub takes from its feed.
#[derive(Debug, Clone)]
pub enum FeedItem {
    /// The next revision.
    Revision(Arc<Published>),
    /// Revisions up to this one were dropped (the feed was full, or the store was replaced by a
    /// snapshot): read them from history.
    Lagged(i64),
    /// The core stopped.
    Closed,
}

#[derive(Debug, Default)]
struct State {
    queue: VecDeque<(Arc<Published>, usize)>,
    bytes: usize,
    /// Newest revision dropped since the hub last took the lag.
    lagged: Option<i64>,
    closed: bool,
}

/// The bounded queue from the core to one hub.
#[derive(Debug, Default)]
pub struct Feed {
    state: Mutex<State>,
    notify: Notify,
    /// The hub has watchers (see the module docs).
    watched: AtomicBool,
}

impl Feed {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Core side: whether the hub wants revisions (it has watchers). Read after the store's
    /// revision is published.
    pub fn watched(&self) -> bool {
        self.watched.load(Ordering::SeqCst)
    }

    /// Hub side: it has watchers (or is about to make one), or has none left. After setting it,
    /// the hub reads the store's revision (see the module docs).
    pub fn set_watched(&self, watched: bool) {
        self.watched.store(watched, Ordering::SeqCst);
    }

    /// Core side: queues a revision, or drops it if the feed is full (or already lagging, so
    /// that the hub sees every queued revision before the lag). Never waits.
    pub fn push(&self, p: Arc<Published>) {
        let size = p.size();
        {
            let mut s = self.state();
            if s.lagged.is_some() || s.bytes + size > FEED_BYTES {
                s.lagged = Some(s.lagged.unwrap_or(0).max(p.revision));
            } else {
                s.bytes += size;
                s.queue.push_back((p, size));
            }
        }
        self.notify.notify_one();
    }

    /// Core side: everything up to `revision` must be read from the store (it was replaced).
    pub fn reset(&self, revision: i64) {
        {
            let mut s = self.state();
            s.queue.clear();
            s.bytes = 0;
            s.lagged = Some(s.lagged.unwrap_or(0).max(revision));
        }
        self.notify.notify_one();
    }

    /// Core side: no more revisions will come.
    pub fn close(&self) {
        self.state().closed = true;
        self.notify.notify_one();
    }

    /// Hub side: the next item, waiting for one.
    pub async fn next(&self) -> FeedItem {
        loop {
            let notified = self.notify.notified();
            {
                let mut s = self.state();
                if let Some((p, size)) = s.queue.pop_front() {
                    s.bytes -= size;
                    return FeedItem::Revision(p);
                }
                if let Some(rev) = s.lagged.take() {
                    return FeedItem::Lagged(rev);
                }
                if s.closed {
                    return FeedItem::Closed;
                }
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_engine::mvcc::KeyValue;

    fn revision(rev: i64, value_len: usize) -> Arc<Published> {
        Arc::new(Published {
            revision: rev,
            changes: vec![Change {
                kv: KeyValue {
                    key: b"k".to_vec(),
                    value: vec![0; value_len],
                    mod_revision: rev,
                    ..Default::default()
                },
                delete: false,
            }],
        })
    }

    #[tokio::test]
    async fn a_full_feed_drops_and_reports_the_lag_after_what_it_holds() {
        let feed = Feed::default();
        let big = FEED_BYTES / 2;
        feed.push(revision(1, big));
        feed.push(revision(2, big)); // does not fit: dropped
        feed.push(revision(3, 10)); // lagging already: dropped too, so order is kept
        assert!(matches!(feed.next().await, FeedItem::Revision(p) if p.revision == 1));
        assert!(matches!(feed.next().await, FeedItem::Lagged(3)));
        feed.push(revision(4, 10));
        assert!(matches!(feed.next().await, FeedItem::Revision(p) if p.revision == 4));
        feed.reset(9);
        feed.close();
        assert!(matches!(feed.next().await, FeedItem::Lagged(9)));
        assert!(matches!(feed.next().await, FeedItem::Closed));
    }
}
