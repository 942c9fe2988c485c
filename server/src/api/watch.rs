//! The etcd v3 Watch service.
//!
//! # Design
//! The storage core publishes the changes of every applied revision, after they are committed and
//! readable, to each **hub** through a bounded feed (`crate::raft::Feed`). A hub is one task on
//! the network runtime that owns the watchers of the streams given to it (an actor: streams send
//! it their create/cancel/progress requests, so no lock orders events). Like etcd's
//! `watchableStore`, watchers are either
//! - **synced**: caught up with the hub's revision; each published revision is matched against
//!   them and delivered at once, or
//! - **unsynced**: behind (created with a past start revision, moved aside because their stream
//!   is full, or because the hub's feed overflowed); the hub catches them up from the MVCC
//!   history whenever their stream has room, then they rejoin the synced set. One history scan
//!   per step serves every unsynced watcher (etcd's `syncWatchers` shares one too), and each
//!   scan is bounded by the revisions it examines, not only by the events it finds.
//!
//! Each stream has an **outbox**: a queue the hub fills and the stream's gRPC sender drains.
//! Events are only queued while the outbox holds less than [`OUTBOX_BYTES`]; beyond that the
//! watcher goes unsynced, so a client that stops reading costs bounded memory, the storage core
//! never waits, and the client gets every event, once and in order, from history when it reads
//! again. Control responses (created, canceled) are always queued, ahead of any event of their
//! watcher.
//!
//! # Limits
//! A stream holds at most `--max-watchers-per-stream` watchers (100,000 by default) and the
//! member at most `--max-watchers` (1,000,000) (etcd has no limit); a create beyond them is answered as etcd answers a
//! refused create (created and canceled, watch ID -1) with the reason. A client that sends
//! requests faster than it reads responses is held back once its outbox is twice the limit.

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use keel_engine::Error;
use keel_engine::mvcc::{Change, RangeOptions};
use keel_proto::etcdserverpb as pb;
use keel_proto::mvccpb;
use pb::watch_request::RequestUnion;
use prost::Message as _;
use tokio::sync::{Notify, mpsc};
use tonic::{Request, Response, Status, Streaming};

use super::convert;
use crate::raft::{Core, Feed, FeedItem, Published};
use crate::server::Shutdown;

/// Bytes of responses a stream may have queued before its watchers go unsynced.
pub const OUTBOX_BYTES: usize = 4 << 20;
/// Most events read from history per catch-up step (a revision is never split).
pub const CATCH_UP_EVENTS: usize = 1000;
/// Most bytes of values read from history per catch-up step (a revision is never split).
pub const CATCH_UP_BYTES: usize = 1 << 20;
/// How often unsynced watchers are retried.
const CATCH_UP_INTERVAL: Duration = Duration::from_millis(20);
/// Watcher limits (`--max-watchers-per-stream`, `--max-watchers`).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub per_stream: usize,
    pub total: usize,
}

/// Requests of one stream its hub may have queued (see `Outbox::pending`).
const MAX_PENDING_REQUESTS: usize = 1024;

/// A stream's queue of responses.
#[derive(Debug, Default)]
struct Outbox {
    /// Responses with their encoded sizes.
    queue: Mutex<VecDeque<(pb::WatchResponse, usize)>>,
    /// Encoded size of what is queued.
    bytes: AtomicUsize,
    notify: Notify,
    closed: AtomicBool,
    /// Wakes whoever waits for the stream to close (the request reader, once the client has
    /// no more requests).
    gone: Notify,
    /// The status the stream ends with, if it ends in error.
    error: Mutex<Option<Status>>,
    /// The stream's requests sent to its hub and not yet handled: its reader waits while there
    /// are [`MAX_PENDING_REQUESTS`], so a client sending requests faster than the hub takes
    /// them cannot grow the hub's queue without bound.
    pending: AtomicUsize,
    /// Responses taken by the sender so far: the queue's front is response number `sent`.
    sent: AtomicU64,
    /// One past the number of the last response queued by [`Outbox::push`] (progress, created,
    /// canceled): events may join a watcher's queued response only if it comes after that one,
    /// or a client would read the later revision's header before an older progress header.
    barrier: AtomicU64,
}

impl Outbox {
    /// Ends the stream with `status` once what is queued is sent.
    fn fail(&self, status: Status) {
        *self
            .error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(status);
        self.close();
    }

    fn take_error(&self) -> Option<Status> {
        self.error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, VecDeque<(pb::WatchResponse, usize)>> {
        self.queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether events may be queued.
    fn has_room(&self) -> bool {
        self.bytes.load(Ordering::Acquire) < OUTBOX_BYTES
    }

    fn push(&self, r: pb::WatchResponse) {
        let size = r.encoded_len();
        self.bytes.fetch_add(size, Ordering::AcqRel);
        let mut queue = self.queue();
        queue.push_back((r, size));
        let after = self.sent.load(Ordering::Acquire) + queue.len() as u64;
        self.barrier.store(after, Ordering::Release);
        drop(queue);
        self.notify.notify_one();
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.notify.notify_one();
        self.gone.notify_waiters();
    }

    /// Waits until the stream is closed.
    async fn closed(&self) {
        loop {
            // Created before the check: `notify_waiters` reaches it even before it is polled.
            let gone = self.gone.notified();
            if self.closed.load(Ordering::Acquire) {
                return;
            }
            gone.await;
        }
    }

    /// Queues the events of one revision for watcher `id`. While the watcher's previous events
    /// response is still queued (the client reads slower than events come), they join it
    /// instead, within `max` bytes: as etcd's unsynced watchers catch up, a client that lags
    /// gets fewer, larger responses rather than one per revision. `last` is the number of the
    /// watcher's last queued response.
    fn push_events(&self, r: pb::WatchResponse, last: &mut Option<u64>, max: usize) {
        let size = r.encoded_len();
        let mut queue = self.queue();
        let sent = self.sent.load(Ordering::Acquire);
        let barrier = self.barrier.load(Ordering::Acquire);
        if let Some(at) = last
            .filter(|&n| n >= barrier)
            .and_then(|n| n.checked_sub(sent))
            && let Some((queued, queued_size)) = queue.get_mut(at as usize)
            && queued.watch_id == r.watch_id
            && *queued_size + size < max
        {
            let grown = join_events(queued, *queued_size, r);
            self.bytes.fetch_add(grown - *queued_size, Ordering::AcqRel);
            *queued_size = grown;
            return;
        }
        *last = Some(sent + queue.len() as u64);
        self.bytes.fetch_add(size, Ordering::AcqRel);
        queue.push_back((r, size));
        drop(queue);
        self.notify.notify_one();
    }

    /// The next response, or `None` once closed and drained.
    async fn next(&self) -> Option<pb::WatchResponse> {
        loop {
            let notified = self.notify.notified();
            let next = {
                let mut queue = self.queue();
                let next = queue.pop_front();
                if next.is_some() {
                    self.sent.fetch_add(1, Ordering::AcqRel);
                }
                next
            };
            if let Some((r, size)) = next {
                self.bytes.fetch_sub(size, Ordering::AcqRel);
                return Some(r);
            }
            if self.closed.load(Ordering::Acquire) {
                return None;
            }
            notified.await;
        }
    }
}

/// Adds the events of `r` (one watcher's, a later revision) to `queued`, that watcher's
/// response still waiting to be sent, whose encoded size is `size`; its header becomes `r`'s.
/// The new encoded size, computed from the parts: a response that keeps growing while its
/// client lags is not measured again whole each time. Shared with the gRPC proxy's queues.
pub(crate) fn join_events(
    queued: &mut pb::WatchResponse,
    size: usize,
    r: pb::WatchResponse,
) -> usize {
    let header_len = |h: &Option<pb::ResponseHeader>| {
        h.as_ref()
            .map_or(0, |h| prost::encoding::message::encoded_len(1, h))
    };
    let added: usize = r
        .events
        .iter()
        .map(|e| prost::encoding::message::encoded_len(11, e))
        .sum::<usize>()
        + header_len(&r.header);
    let grown = size + added - header_len(&queued.header);
    queued.header = r.header;
    queued.events.extend(r.events);
    debug_assert_eq!(grown, queued.encoded_len());
    grown
}

/// The gRPC sender's hold on an outbox: when tonic drops the response stream (the client went
/// away), the outbox is closed, so the request reader stops waiting and the hub forgets the
/// stream.
struct SenderSide(Arc<Outbox>);

impl Drop for SenderSide {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// What streams ask the hub.
enum HubMsg {
    Open(u64, Arc<Outbox>),
    Create(u64, pb::WatchCreateRequest),
    /// A create refused before it reached the hub (permission): answered with the reason.
    Refuse(u64, String),
    Cancel(u64, i64),
    Progress(u64),
    Close(u64),
}

struct Watcher {
    key: Vec<u8>,
    /// The engine's range convention: `None` one key, `Some([])` every key from `key`.
    end: Option<Vec<u8>>,
    no_put: bool,
    no_delete: bool,
    prev_kv: bool,
    fragment: bool,
    progress_notify: bool,
    /// The first revision not yet delivered.
    next_rev: i64,
    synced: bool,
    last_sent: Instant,
    /// The number of its last events response queued in the stream's outbox (see
    /// [`Outbox::push_events`]).
    queued: Option<u64>,
}

impl Watcher {
    fn matches(&self, key: &[u8]) -> bool {
        match &self.end {
            None => key == self.key.as_slice(),
            Some(e) if e.is_empty() => key >= self.key.as_slice(),
            Some(e) => key >= self.key.as_slice() && key < e.as_slice(),
        }
    }

    fn wants(&self, c: &Change) -> bool {
        let filtered = if c.delete {
            self.no_delete
        } else {
            self.no_put
        };
        self.matches(&c.kv.key) && !filtered
    }
}

struct StreamState {
    outbox: Arc<Outbox>,
    watchers: HashMap<i64, Watcher>,
    next_id: i64,
    /// A progress request waits for every watcher of the stream to be synced (as etcd).
    progress_pending: bool,
}

/// The hub: the watchers of some streams.
struct Hub {
    core: Core,
    streams: HashMap<u64, StreamState>,
    /// The last revision published to the hub.
    current: i64,
    max_response_bytes: usize,
    progress_interval: Duration,
    /// Watchers of every hub (the member-wide limit).
    total: Arc<AtomicUsize>,
    limits: Limits,
    /// Watchers, slow watchers and streams last added to the gauges by this shard.
    reported: (i64, i64, i64),
    /// Watchers of this hub; while there are none, the core sends it no revision (the feed's
    /// `watched` flag, see `crate::raft::events`).
    watchers: usize,
    feed: Arc<Feed>,
    /// Some watcher may be unsynced: set whenever one is made or moved aside unsynced, cleared
    /// by a catch-up tick that finds none. While clear, the ticks (every 20 ms) look at each
    /// stream, not at each watcher: idle watchers cost no per-watcher work between writes.
    maybe_unsynced: bool,
}

/// Handle of the Watch service; hub tasks (shards) behind it, each owning the watchers of
/// some streams.
#[derive(Debug, Clone)]
pub struct WatchService {
    hubs: Vec<mpsc::UnboundedSender<HubMsg>>,
    gate: crate::auth::gate::Gate,
    next_stream: Arc<AtomicU64>,
    shutdown: Shutdown,
    core: Core,
    /// How often a stream that requires a leader checks for one (an election timeout).
    leader_check: Duration,
}

/// A stream opened with `hasleader` ends with `etcdserver: no leader` after this many checks
/// find no leader (etcd's `maxNoLeaderCnt`).
const NO_LEADER_CHECKS: u32 = 3;

impl std::fmt::Debug for HubMsg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HubMsg")
    }
}

impl WatchService {
    /// etcd's `monitorLeader` for a stream that asked for a leader (`hasleader`): ready once
    /// this member has had no leader at three checks in a row, an election timeout apart.
    pub fn leader_lost(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let core = self.core.clone();
        let every = self.leader_check;
        async move {
            let mut misses = 0;
            loop {
                tokio::time::sleep(every).await;
                if core.leader() == 0 {
                    misses += 1;
                    if misses >= NO_LEADER_CHECKS {
                        return;
                    }
                } else {
                    misses = 0;
                }
            }
        }
    }

    /// Starts one hub per feed on the current runtime; each consumes everything the storage
    /// core publishes and serves the streams given to it (round robin), so the fan-out of a
    /// revision to many watchers runs on several network threads. Responses are split in
    /// fragments (for watchers that allow it) above `max_response_bytes`; `progress_interval`
    /// paces progress notifications. Streams end when `shutdown` fires.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        core: Core,
        gate: crate::auth::gate::Gate,
        feeds: Vec<Arc<Feed>>,
        max_response_bytes: usize,
        progress_interval: Duration,
        limits: Limits,
        leader_check: Duration,
        shutdown: Shutdown,
    ) -> WatchService {
        let mut hubs = Vec::new();
        let total = Arc::new(AtomicUsize::new(0));
        for feed in feeds {
            let (tx, rx) = mpsc::unbounded_channel();
            let hub = Hub {
                current: core.store().current_revision(),
                core: core.clone(),
                streams: HashMap::new(),
                max_response_bytes,
                progress_interval,
                total: total.clone(),
                limits,
                reported: (0, 0, 0),
                watchers: 0,
                feed: feed.clone(),
                maybe_unsynced: false,
            };
            tokio::spawn(hub.run(rx, feed, shutdown.clone()));
            hubs.push(tx);
        }
        WatchService {
            hubs,
            gate,
            next_stream: Arc::new(AtomicU64::new(0)),
            shutdown,
            core,
            leader_check,
        }
    }
}

fn event(c: &Change) -> mvccpb::Event {
    mvccpb::Event {
        r#type: if c.delete {
            mvccpb::event::EventType::Delete as i32
        } else {
            mvccpb::event::EventType::Put as i32
        },
        kv: Some(convert::kv(c.kv.clone())),
        prev_kv: None,
    }
}

impl Hub {
    async fn run(
        mut self,
        mut requests: mpsc::UnboundedReceiver<HubMsg>,
        feed: Arc<Feed>,
        shutdown: Shutdown,
    ) {
        let mut tick = tokio::time::interval(CATCH_UP_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_progress = Instant::now();
        loop {
            tokio::select! {
                msg = requests.recv() => match msg {
                    Some(m) => {
                        self.handle(m);
                        if self.streams.is_empty() {
                            // The tick below sleeps while there is no stream: the gauges are
                            // brought down here instead.
                            self.gauges();
                        }
                    }
                    None => break,
                },
                item = feed.next() => match item {
                    FeedItem::Revision(p) => self.publish(&p),
                    FeedItem::Lagged(revision) => self.lagged(revision),
                    // The storage core stopped: end every stream.
                    FeedItem::Closed => break,
                },
                _ = shutdown.wait() => break,
                // Only while streams exist: an idle member's network threads stay asleep.
                _ = tick.tick(), if !self.streams.is_empty() => {
                    self.catch_up();
                    self.gauges();
                    if last_progress.elapsed() >= self.progress_interval {
                        last_progress = Instant::now();
                        self.progress_notify();
                    }
                }
            }
        }
        for s in self.streams.values() {
            s.outbox.close();
        }
        let count: usize = self.streams.values().map(|s| s.watchers.len()).sum();
        self.total.fetch_sub(count, Ordering::AcqRel);
        self.streams.clear();
        self.watchers = 0;
        self.feed.set_watched(false);
        self.gauges();
    }

    fn header(&self) -> Option<pb::ResponseHeader> {
        self.core.header().with(self.current)
    }

    /// Adds this shard's changes since its last report to the member's gauges.
    fn gauges(&mut self) {
        let (mut all, mut slow) = (0, 0);
        for s in self.streams.values() {
            all += s.watchers.len() as i64;
            if self.maybe_unsynced {
                slow += s.watchers.values().filter(|w| !w.synced).count() as i64;
            }
        }
        debug_assert_eq!(all as usize, self.watchers, "the hub's watcher count");
        let now = (all, slow, self.streams.len() as i64);
        let m = self.core.metrics();
        m.watchers.inc_by(now.0 - self.reported.0);
        m.slow_watchers.inc_by(now.1 - self.reported.1);
        m.watch_streams.inc_by(now.2 - self.reported.2);
        self.reported = now;
    }

    fn handle(&mut self, msg: HubMsg) {
        if self.watchers == 0 {
            // The core sends nothing while no one watches: the store has the revision.
            self.current = self.current.max(self.core.store().current_revision());
        }
        self.handle_msg(msg);
        if self.watchers == 0 && self.feed.watched() {
            // The last watcher went, or a create was refused.
            self.feed.set_watched(false);
        }
    }

    fn handle_msg(&mut self, msg: HubMsg) {
        if let HubMsg::Create(id, _)
        | HubMsg::Refuse(id, _)
        | HubMsg::Cancel(id, _)
        | HubMsg::Progress(id) = &msg
            && let Some(s) = self.streams.get(id)
        {
            s.outbox.pending.fetch_sub(1, Ordering::AcqRel);
        }
        match msg {
            HubMsg::Open(id, outbox) => {
                self.streams.insert(
                    id,
                    StreamState {
                        outbox,
                        watchers: HashMap::new(),
                        next_id: 0,
                        progress_pending: false,
                    },
                );
            }
            HubMsg::Close(id) => {
                if let Some(s) = self.streams.remove(&id) {
                    self.total.fetch_sub(s.watchers.len(), Ordering::AcqRel);
                    self.watchers -= s.watchers.len();
                    s.outbox.close();
                }
            }
            HubMsg::Create(id, req) => self.create(id, req),
            HubMsg::Refuse(id, reason) => {
                let header = self.core.header().with(self.current);
                if let Some(s) = self.streams.get_mut(&id) {
                    s.outbox.push(pb::WatchResponse {
                        header,
                        watch_id: -1,
                        created: true,
                        canceled: true,
                        cancel_reason: reason,
                        ..Default::default()
                    });
                }
            }
            HubMsg::Cancel(id, watch_id) => {
                let header = self.header();
                if let Some(s) = self.streams.get_mut(&id)
                    && s.watchers.remove(&watch_id).is_some()
                {
                    self.total.fetch_sub(1, Ordering::AcqRel);
                    self.watchers -= 1;
                    s.outbox.push(pb::WatchResponse {
                        header,
                        watch_id,
                        canceled: true,
                        ..Default::default()
                    });
                }
                // Unknown IDs (or a second cancel) get no answer, as in etcd.
            }
            HubMsg::Progress(id) => {
                if let Some(s) = self.streams.get_mut(&id) {
                    s.progress_pending = true;
                }
                self.flush_progress();
            }
        }
    }

    fn create(&mut self, stream: u64, req: pb::WatchCreateRequest) {
        if !self.feed.watched() {
            // From now the core sends revisions to this hub; those it skipped are in the store,
            // whose revision (read after the flag is set) the hub moves up to.
            self.feed.set_watched(true);
            self.current = self.current.max(self.core.store().current_revision());
        }
        let current = self.current;
        let store = self.core.store();
        let store_rev = store.current_revision();
        // The store's revision, as etcd's: the hub may not have seen the newest one yet.
        let header = self.core.header().with(current.max(store_rev));
        let compacted_header = self.core.header().with(0);
        let compacted = store.compact_revision();
        let total = self.total.clone();
        let limits = self.limits;
        let maybe_unsynced = &mut self.maybe_unsynced;
        let Some(s) = self.streams.get_mut(&stream) else {
            return;
        };
        let refuse = |s: &StreamState, reason: String| {
            // etcd answers a refused create with ID -1 (no watcher was made).
            s.outbox.push(pb::WatchResponse {
                header,
                watch_id: -1,
                created: true,
                canceled: true,
                cancel_reason: reason,
                ..Default::default()
            });
        };
        if s.watchers.len() >= limits.per_stream {
            refuse(
                s,
                format!(
                    "etcdserver: too many watchers on one stream (the limit is {})",
                    limits.per_stream
                ),
            );
            return;
        }
        if total.load(Ordering::Acquire) >= limits.total {
            refuse(
                s,
                format!(
                    "etcdserver: too many watchers (the member's limit is {})",
                    limits.total
                ),
            );
            return;
        }
        let id = if req.watch_id != 0 {
            req.watch_id
        } else {
            while s.watchers.contains_key(&s.next_id) {
                s.next_id += 1;
            }
            s.next_id
        };
        if s.watchers.contains_key(&id) {
            refuse(
                s,
                "mvcc: duplicate watch ID provided on the WatchStream".into(),
            );
            return;
        }
        if req.watch_id == 0 {
            s.next_id += 1;
        }
        let end = match req.range_end.as_slice() {
            [] => None,
            [0] => Some(Vec::new()),
            e => Some(e.to_vec()),
        };
        // As etcd: an empty key is "\0", the smallest key.
        let key = if req.key.is_empty() { vec![0] } else { req.key };
        if end.as_ref().is_some_and(|e| !e.is_empty() && key >= *e) {
            refuse(s, "mvcc: watcher range is empty".into());
            return;
        }
        let filters = |f: pb::watch_create_request::FilterType| req.filters.contains(&(f as i32));
        // From now: after the store's revision, which may be ahead of the hub's (a write
        // acknowledged before the watch was made must not be delivered).
        let start = if req.start_revision > 0 {
            req.start_revision
        } else {
            current.max(store_rev) + 1
        };
        let w = Watcher {
            key,
            end,
            no_put: filters(pb::watch_create_request::FilterType::Noput),
            no_delete: filters(pb::watch_create_request::FilterType::Nodelete),
            prev_kv: req.prev_kv,
            fragment: req.fragment,
            progress_notify: req.progress_notify,
            next_rev: start,
            synced: start > current,
            last_sent: Instant::now(),
            queued: None,
        };
        s.outbox.push(pb::WatchResponse {
            header,
            watch_id: id,
            created: true,
            ..Default::default()
        });
        if start < compacted {
            // History below the compaction is gone: etcd cancels with the compacted revision
            // (and a header at revision 0).
            s.outbox.push(pb::WatchResponse {
                header: compacted_header,
                watch_id: id,
                canceled: true,
                compact_revision: compacted,
                ..Default::default()
            });
            return;
        }
        // Caught up at the next tick, if behind.
        *maybe_unsynced |= !w.synced;
        s.watchers.insert(id, w);
        total.fetch_add(1, Ordering::AcqRel);
        self.watchers += 1;
    }

    /// The feed dropped revisions up to `revision` (it was full, or the store was replaced):
    /// every synced watcher catches up from history.
    fn lagged(&mut self, revision: i64) {
        tracing::warn!(
            revision,
            "watch hub lagged behind the store: catching up from history"
        );
        for s in self.streams.values_mut() {
            for w in s.watchers.values_mut() {
                if w.synced && w.next_rev <= revision {
                    w.synced = false;
                    self.maybe_unsynced = true;
                }
            }
        }
        self.current = self.current.max(revision);
    }

    fn publish(&mut self, p: &Published) {
        if p.revision <= self.current {
            // Replayed before the hub started: already in the store it read.
            return;
        }
        self.current = p.revision;
        if self.streams.values().all(|s| s.watchers.is_empty()) {
            // Nobody watches here: no events to build.
            return;
        }
        // The events are built once (keys and values are shared `Bytes`); each watcher gets
        // the ones it wants.
        let all: Vec<mvccpb::Event> = p.changes.iter().map(event).collect();
        // With previous values: read once, when the first watcher asking for them matches.
        let mut all_prev: Option<Vec<mvccpb::Event>> = None;
        let header = self.core.header().with(p.revision);
        let max = self.max_response_bytes;
        let now = Instant::now();
        for s in self.streams.values_mut() {
            let room = s.outbox.has_room();
            for (&id, w) in s.watchers.iter_mut() {
                if !w.synced || w.next_rev > p.revision {
                    continue;
                }
                if !room {
                    // The stream is behind: this watcher will catch up from history.
                    w.synced = false;
                    self.maybe_unsynced = true;
                    continue;
                }
                w.next_rev = p.revision + 1;
                if !p.changes.iter().any(|c| w.wants(c)) {
                    continue;
                }
                let source = if w.prev_kv {
                    all_prev.get_or_insert_with(|| with_prev(&self.core, all.clone()))
                } else {
                    &all
                };
                let events: Vec<mvccpb::Event> = source
                    .iter()
                    .zip(&p.changes)
                    .filter(|(_, c)| w.wants(c))
                    .map(|(e, _)| e.clone())
                    .collect();
                w.last_sent = now;
                if w.fragment {
                    for r in fragments(header, id, events, w.fragment, max) {
                        s.outbox.push(r);
                    }
                } else {
                    let r = pb::WatchResponse {
                        header,
                        watch_id: id,
                        events,
                        ..Default::default()
                    };
                    s.outbox.push_events(r, &mut w.queued, max);
                }
            }
        }
    }

    /// Answers the progress requests of streams whose watchers are all synced: an empty response
    /// at the hub's revision, watch ID -1.
    fn flush_progress(&mut self) {
        let header = self.header();
        for s in self.streams.values_mut() {
            if s.progress_pending && s.watchers.values().all(|w| w.synced) {
                s.progress_pending = false;
                s.outbox.push(pb::WatchResponse {
                    header,
                    watch_id: -1,
                    ..Default::default()
                });
            }
        }
    }

    /// One catch-up step: one bounded history scan, from the oldest revision any unsynced
    /// watcher (whose stream has room) needs, shared by all of them.
    fn catch_up(&mut self) {
        if !self.maybe_unsynced {
            self.flush_progress();
            return;
        }
        let current = self.current;
        let store = self.core.store();
        let compacted = store.compact_revision();
        let mut work = Vec::new();
        let mut cancelled = Vec::new();
        let mut from = i64::MAX;
        let mut unsynced = false;
        for (&sid, s) in &self.streams {
            for (&id, w) in &s.watchers {
                if w.synced {
                    continue;
                }
                unsynced = true;
                if !s.outbox.has_room() {
                    break;
                }
                if w.next_rev < compacted {
                    cancelled.push((sid, id));
                } else {
                    from = from.min(w.next_rev);
                    work.push((sid, id));
                }
            }
        }
        // Every watcher was looked at: none unsynced means none until one is moved aside again.
        self.maybe_unsynced = unsynced;
        for (sid, id) in cancelled {
            self.cancel_compacted(sid, id, compacted);
        }
        if work.is_empty() {
            self.flush_progress();
            return;
        }
        let result = {
            let view = store.read();
            view.changes(
                from,
                current,
                &[0],
                Some(&[]),
                CATCH_UP_EVENTS,
                CATCH_UP_BYTES,
            )
        };
        let (changes, next) = match result {
            Ok(r) => r,
            Err(Error::Compacted) => {
                // Compacted meanwhile: the next step cancels whoever needs the gap.
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "reading watch history");
                return;
            }
        };
        // Every revision before `next` was examined (all of them up to `current` if the scan
        // did not stop early).
        let reached = next.min(current + 1);
        for (sid, id) in work {
            let Some(s) = self.streams.get(&sid) else {
                continue;
            };
            if !s.outbox.has_room() {
                // Filled by the other watchers of its stream in this step.
                continue;
            }
            let w = &s.watchers[&id];
            if w.next_rev >= reached {
                continue;
            }
            let events: Vec<mvccpb::Event> = changes
                .iter()
                .filter(|c| c.kv.mod_revision >= w.next_rev && w.wants(c))
                .map(event)
                .collect();
            let responses = if events.is_empty() {
                Vec::new()
            } else {
                self.responses(id, w, events, current)
            };
            let s = self.streams.get_mut(&sid).expect("listed");
            let w = s.watchers.get_mut(&id).expect("listed");
            w.next_rev = reached;
            w.synced = reached > current;
            if !responses.is_empty() {
                w.last_sent = Instant::now();
                // Later events must not join a response queued before these.
                w.queued = None;
            }
            for r in responses {
                s.outbox.push(r);
            }
        }
        self.flush_progress();
    }

    /// History below the compaction is gone: cancelled with the compacted revision, as etcd.
    fn cancel_compacted(&mut self, sid: u64, id: i64, compact_revision: i64) {
        let header = self.core.header().with(0);
        let Some(s) = self.streams.get_mut(&sid) else {
            return;
        };
        if s.watchers.remove(&id).is_some() {
            self.total.fetch_sub(1, Ordering::AcqRel);
            self.watchers -= 1;
            s.outbox.push(pb::WatchResponse {
                header,
                watch_id: id,
                canceled: true,
                compact_revision,
                ..Default::default()
            });
        }
    }

    /// The responses carrying `events` (from history) for watcher `id`, previous values added
    /// if it asked for them.
    fn responses(
        &self,
        id: i64,
        w: &Watcher,
        events: Vec<mvccpb::Event>,
        revision: i64,
    ) -> Vec<pb::WatchResponse> {
        let events = if w.prev_kv {
            with_prev(&self.core, events)
        } else {
            events
        };
        fragments(
            self.core.header().with(revision),
            id,
            events,
            w.fragment,
            self.max_response_bytes,
        )
    }

    /// An empty response to every synced watcher that asked for progress notifications and got
    /// nothing for a whole interval.
    fn progress_notify(&mut self) {
        let header = self.header();
        let interval = self.progress_interval;
        for s in self.streams.values_mut() {
            for (&id, w) in s.watchers.iter_mut() {
                let future = w.next_rev > self.current + 1;
                if w.progress_notify && w.synced && !future && w.last_sent.elapsed() >= interval {
                    w.last_sent = Instant::now();
                    s.outbox.push(pb::WatchResponse {
                        header,
                        watch_id: id,
                        ..Default::default()
                    });
                }
            }
        }
    }
}

/// `events` with their previous values: the key's value at the revision before, except for a
/// put that created the key (as etcd), and left out if compacted away.
fn with_prev(core: &Core, mut events: Vec<mvccpb::Event>) -> Vec<mvccpb::Event> {
    let store = core.store();
    let view = store.read();
    for e in &mut events {
        let Some(kv) = &e.kv else { continue };
        let put = e.r#type == mvccpb::event::EventType::Put as i32;
        if put && kv.create_revision == kv.mod_revision {
            continue;
        }
        let opts = RangeOptions {
            rev: kv.mod_revision - 1,
            ..Default::default()
        };
        if let Ok(r) = view.range(&kv.key, None, opts) {
            e.prev_kv = r.kvs.into_iter().next().map(convert::kv);
        }
    }
    events
}

/// The responses carrying `events` for watcher `id`: one, or, if the watcher allows it and the
/// response reaches `max` bytes, fragments as etcd's `sendFragments` cuts them (events are added
/// to a fragment while its encoded size stays below `max`; each has at least one event).
fn fragments(
    header: Option<pb::ResponseHeader>,
    id: i64,
    events: Vec<mvccpb::Event>,
    fragment: bool,
    max: usize,
) -> Vec<pb::WatchResponse> {
    let whole = pb::WatchResponse {
        header,
        watch_id: id,
        events,
        ..Default::default()
    };
    if !fragment || whole.events.len() < 2 || whole.encoded_len() < max {
        return vec![whole];
    }
    let base = pb::WatchResponse {
        header,
        watch_id: id,
        fragment: true,
        ..Default::default()
    }
    .encoded_len();
    let mut parts = Vec::new();
    let mut part: Vec<mvccpb::Event> = Vec::new();
    let mut size = base;
    for e in whole.events {
        let n = prost::encoding::message::encoded_len(11, &e);
        if !part.is_empty() && size + n >= max {
            parts.push(std::mem::take(&mut part));
            size = base;
        }
        size += n;
        part.push(e);
    }
    parts.push(part);
    let last = parts.len() - 1;
    parts
        .into_iter()
        .enumerate()
        .map(|(i, events)| pb::WatchResponse {
            header,
            watch_id: id,
            events,
            fragment: i < last,
            ..Default::default()
        })
        .collect()
}

/// Whether the stream's user may watch what `c` asks: read permission on the range (an empty
/// key is `"\0"`, as etcd makes it; a `"\0"` range end is every key from the key on). The
/// refusal is etcd's cancel reason: the full gRPC status text clients match on.
fn watch_permitted(
    core: &Core,
    identity: Option<&crate::auth::AuthInfo>,
    c: &pb::WatchCreateRequest,
) -> Result<(), String> {
    let state = core.auth();
    if !state.enabled {
        return Ok(());
    }
    let key: &[u8] = if c.key.is_empty() { b"\0" } else { &c.key };
    state
        .permitted(identity, key, &c.range_end, false)
        .map_err(|e| {
            let s = convert::auth_status(e);
            format!("rpc error: code = {:?} desc = {}", s.code(), s.message())
        })
}

/// The responses of one watch stream.
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::watch_server::Watch for WatchService {
    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<Streaming<pb::WatchRequest>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        // The stream's credentials, looked up again for each create and checked against the
        // auth state then (etcd's `isWatchPermitted`). A bad token does not fail the stream:
        // the create is refused with the reason, which etcd's clients answer by authenticating
        // again.
        let credentials = crate::auth::gate::Gate::credentials(&request);
        let require_leader = request
            .metadata()
            .get(crate::api::REQUIRE_LEADER_KEY)
            .is_some_and(|v| v.as_bytes() == b"true");
        self.open(credentials, require_leader, request.into_inner())
            .map(Response::new)
    }
}

impl WatchService {
    /// Opens a watch stream that serves `requests` for a caller with `credentials`: the gRPC
    /// Watch call, and the Lock and Election services' own watches (`api::v3client`).
    pub fn open<S>(
        &self,
        credentials: crate::auth::gate::Credentials,
        require_leader: bool,
        mut requests: S,
    ) -> Result<WatchStream, Status>
    where
        S: Stream<Item = Result<pb::WatchRequest, Status>> + Send + Unpin + 'static,
    {
        if self.shutdown.fired() {
            return Err(Status::unavailable("etcdserver: server stopped"));
        }
        let gate = self.gate.clone();
        let id = self.next_stream.fetch_add(1, Ordering::Relaxed);
        let outbox = Arc::new(Outbox::default());
        let hub = self.hubs[(id % self.hubs.len() as u64) as usize].clone();
        hub.send(HubMsg::Open(id, outbox.clone()))
            .map_err(|_| Status::unavailable("etcdserver: server stopped"))?;
        if require_leader {
            // etcd's `monitorLeader`: a stream that asked for a leader ends once the member has
            // had none for three election timeouts, so the client moves to another member.
            let lost = self.leader_lost();
            let watched = outbox.clone();
            tokio::spawn(async move {
                tokio::select! {
                    () = lost => watched.fail(convert::status(&Error::NoLeader)),
                    () = watched.closed() => {}
                }
            });
        }
        let reader_outbox = outbox.clone();
        let auth_core = self.core.clone();
        tokio::spawn(async move {
            loop {
                let req = match requests.next().await {
                    Some(Ok(req)) => req,
                    // The client sends no more requests, but its watchers go on until it goes
                    // away, as etcd's (its recvLoop ends without ending the stream): a JSON
                    // gateway client's whole body is its requests.
                    None => {
                        reader_outbox.closed().await;
                        break;
                    }
                    // A request that cannot be decoded ends the stream with that status, as
                    // etcd's recvLoop error does (over the size limit: grpc-go's).
                    Some(Err(status)) => {
                        reader_outbox.fail(super::convert::grpc_go_status(status));
                        break;
                    }
                };
                // A client that sends but does not read waits here once its outbox is well over
                // the limit: its requests cannot grow the server's memory without bound.
                while reader_outbox.bytes.load(Ordering::Acquire) >= 2 * OUTBOX_BYTES
                    && !reader_outbox.closed.load(Ordering::Acquire)
                {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                let msg = match req.request_union {
                    Some(RequestUnion::CreateRequest(c)) => {
                        let permitted = match gate.check_credentials(&credentials).await {
                            Ok(checked) => watch_permitted(&auth_core, checked.info.as_ref(), &c),
                            Err(s) => Err(format!(
                                "rpc error: code = {:?} desc = {}",
                                s.code(),
                                s.message()
                            )),
                        };
                        match permitted {
                            Ok(()) => HubMsg::Create(id, c),
                            Err(reason) => HubMsg::Refuse(id, reason),
                        }
                    }
                    Some(RequestUnion::CancelRequest(c)) => HubMsg::Cancel(id, c.watch_id),
                    Some(RequestUnion::ProgressRequest(_)) => HubMsg::Progress(id),
                    None => continue,
                };
                while reader_outbox.pending.load(Ordering::Acquire) >= MAX_PENDING_REQUESTS
                    && !reader_outbox.closed.load(Ordering::Acquire)
                {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                reader_outbox.pending.fetch_add(1, Ordering::AcqRel);
                if hub.send(msg).is_err() {
                    break;
                }
            }
            let _ = hub.send(HubMsg::Close(id));
        });
        let stream = futures::stream::unfold(Some(SenderSide(outbox)), |side| async move {
            let side = side?;
            match side.0.next().await {
                Some(r) => Some((Ok(r), Some(side))),
                // Closed: in error, that status ends the stream.
                None => side.0.take_error().map(|status| (Err(status), None)),
            }
        });
        Ok(Box::pin(stream))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(id: i64, revs: &[i64]) -> pb::WatchResponse {
        pb::WatchResponse {
            header: Some(pb::ResponseHeader {
                revision: *revs.last().unwrap(),
                ..Default::default()
            }),
            watch_id: id,
            events: revs
                .iter()
                .map(|&r| mvccpb::Event {
                    kv: Some(mvccpb::KeyValue {
                        key: b"k".to_vec().into(),
                        mod_revision: r,
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    fn revs(r: &pb::WatchResponse) -> Vec<i64> {
        r.events
            .iter()
            .map(|e| e.kv.as_ref().unwrap().mod_revision)
            .collect()
    }

    #[tokio::test]
    async fn a_lagging_watchers_events_join_its_queued_response_in_order() {
        let o = Outbox::default();
        let (mut a, mut b) = (None, None);
        o.push_events(events(1, &[2]), &mut a, 1 << 20);
        o.push_events(events(2, &[2]), &mut b, 1 << 20);
        o.push_events(events(1, &[3]), &mut a, 1 << 20);
        o.push_events(events(1, &[4]), &mut a, 1 << 20);
        let first = o.next().await.unwrap();
        assert_eq!((first.watch_id, revs(&first)), (1, vec![2, 3, 4]));
        assert_eq!(first.header.unwrap().revision, 4);
        // Sent: the next events start a response of their own, after watcher 2's.
        o.push_events(events(1, &[5]), &mut a, 1 << 20);
        let second = o.next().await.unwrap();
        assert_eq!((second.watch_id, revs(&second)), (2, vec![2]));
        let third = o.next().await.unwrap();
        assert_eq!((third.watch_id, revs(&third)), (1, vec![5]));
        assert_eq!(o.bytes.load(Ordering::Acquire), 0);
    }

    /// Events never join a response queued before a progress (or any other) response: the
    /// client would read the newer revision's header first, then the older progress header,
    /// and clientv3 resumes from a progress header's revision.
    #[tokio::test]
    async fn events_do_not_jump_over_a_queued_progress_response() {
        let o = Outbox::default();
        let mut a = None;
        o.push_events(events(1, &[5]), &mut a, 1 << 20);
        o.push(pb::WatchResponse {
            header: Some(pb::ResponseHeader {
                revision: 5,
                ..Default::default()
            }),
            watch_id: -1,
            ..Default::default()
        });
        o.push_events(events(1, &[6]), &mut a, 1 << 20);
        o.push_events(events(1, &[7]), &mut a, 1 << 20);
        let mut headers = Vec::new();
        let mut got = Vec::new();
        while !o.queue().is_empty() {
            let r = o.next().await.unwrap();
            headers.push(r.header.unwrap().revision);
            got.push(revs(&r));
        }
        assert_eq!(headers, [5, 5, 7]);
        assert_eq!(got, [vec![5], vec![], vec![6, 7]]);
    }

    #[tokio::test]
    async fn responses_do_not_grow_past_the_limit() {
        let o = Outbox::default();
        let mut a = None;
        let one = events(1, &[2]).encoded_len();
        for r in 2..6 {
            o.push_events(events(1, &[r]), &mut a, 2 * one + 1);
        }
        let mut got = Vec::new();
        while !o.queue().is_empty() {
            got.push(revs(&o.next().await.unwrap()));
        }
        assert_eq!(got, [vec![2, 3], vec![4, 5]]);
    }
}
