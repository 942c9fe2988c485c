//! The proxy's Watch service (etcd's `watchProxy`): watchers of the same key range, from any
//! number of clients, share one upstream watch (a *broadcast*).
//!
//! - Each create is first checked with a serializable count-only range carrying the caller's
//!   credentials (etcd's `checkPermissionForWatch`); its answer also gives the current revision,
//!   where a watcher without a start revision begins.
//! - A watcher joins a broadcast of its range that has delivered everything before the
//!   watcher's start revision (the broadcast's next revision is not past the watcher's), and
//!   is told `created` at once; else it gets a broadcast of its own, whose upstream watch starts
//!   at its start revision. A broadcast that catches up with another of the same range hands
//!   its watchers over and stops (etcd's coalescing).
//! - Every upstream watch asks for previous values and progress notifications; each watcher
//!   keeps only events from its own start revision, applies its filters, and drops previous
//!   values it did not ask for.
//! - An upstream watch that breaks is opened again from the broadcast's next revision: its
//!   watchers see no gap. One the cluster cancels (a compacted start revision) cancels its
//!   watchers, with the compact revision.
//! - A client that does not read its responses (1,024 queued) has its stream ended, as etcd's
//!   proxy ends it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt as _;
use keel_proto::etcdserverpb as pb;
use keel_proto::mvccpb;
use pb::watch_request::RequestUnion;
use prost::Message as _;
use tokio::sync::mpsc;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status, Streaming};

use super::upstream::Upstream;

/// Responses queued for one client stream before it is ended.
const STREAM_QUEUE: usize = 1024;
/// etcd's `clientv3.InvalidWatchID`.
const INVALID_WATCH_ID: i64 = -1;

type Range = (Vec<u8>, Vec<u8>);

/// What the proxy's watchers cost and save (etcd's `etcd_grpc_proxy_*` metrics).
#[derive(Debug, Default)]
pub struct WatchStats {
    /// Events delivered to more than one watcher from one upstream response.
    pub events_coalescing: AtomicU64,
    /// Upstream watches open.
    pub upstream: AtomicI64,
}

/// One client stream's side: where its responses go.
#[derive(Default)]
struct Client {
    /// Responses and their encoded sizes.
    queue: Mutex<std::collections::VecDeque<(pb::WatchResponse, usize)>>,
    /// Responses taken by the sender so far: the queue's front is response number `sent`.
    sent: AtomicU64,
    /// Encoded bytes queued.
    bytes: std::sync::atomic::AtomicUsize,
    /// Wakes the sender: a response is queued, or the client failed.
    notify: tokio::sync::Notify,
    /// Set once the client fell too far behind: its stream ends at once (etcd's proxy cancels
    /// it), without waiting for the client to read what is queued.
    failed: AtomicBool,
}

/// The most one merged events response may grow to.
const MAX_MERGED: usize = 1 << 20;
/// The most a client may have queued, in encoded bytes, before its stream is ended (with
/// [`STREAM_QUEUE`] responses, the bound on what a client that does not read costs).
const CLIENT_BYTES: usize = 4 << 20;

impl Client {
    fn queue(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::VecDeque<(pb::WatchResponse, usize)>> {
        self.queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn post(&self, r: pb::WatchResponse) {
        let mut last = None;
        self.enqueue(r, &mut last, false);
    }

    /// Queues `r`. With `merge`, `r` (events only) joins the watcher's last queued events
    /// response (number `last`) if the sender has not taken it yet, as the members do for a
    /// client that lags: fewer, larger responses.
    fn enqueue(&self, r: pb::WatchResponse, last: &mut Option<u64>, merge: bool) {
        if self.failed.load(Ordering::Acquire) {
            return;
        }
        let mut queue = self.queue();
        let sent = self.sent.load(Ordering::Acquire);
        let len = r.encoded_len();
        if merge
            && let Some(at) = last.and_then(|n| n.checked_sub(sent))
            && let Some((queued, size)) = queue.get_mut(at as usize)
            && queued.watch_id == r.watch_id
            && *size + len < MAX_MERGED
        {
            let grown = crate::api::watch::join_events(queued, *size, r);
            let total = self.bytes.fetch_add(grown - *size, Ordering::AcqRel) + grown - *size;
            *size = grown;
            if total > CLIENT_BYTES {
                self.fail(queue);
            }
            return;
        }
        // A response larger than the budget alone still goes to a client that has read
        // everything else (a large delete's events), or it would fail again at each resume.
        if queue.len() >= STREAM_QUEUE
            || (!queue.is_empty() && self.bytes.load(Ordering::Acquire) + len > CLIENT_BYTES)
        {
            self.fail(queue);
            return;
        }
        *last = Some(sent + queue.len() as u64);
        self.bytes.fetch_add(len, Ordering::AcqRel);
        queue.push_back((r, len));
        drop(queue);
        self.notify.notify_one();
    }

    /// The client is too far behind: its stream ends, and what it had queued is dropped.
    fn fail(
        &self,
        mut queue: std::sync::MutexGuard<
            '_,
            std::collections::VecDeque<(pb::WatchResponse, usize)>,
        >,
    ) {
        self.failed.store(true, Ordering::Release);
        queue.clear();
        drop(queue);
        self.notify.notify_one();
    }

    /// The next response; an error once the client has failed.
    async fn next(&self) -> Result<pb::WatchResponse, Status> {
        loop {
            let notified = self.notify.notified();
            if self.failed.load(Ordering::Acquire) {
                return Err(Status::cancelled("context canceled"));
            }
            {
                let mut queue = self.queue();
                if let Some((r, size)) = queue.pop_front() {
                    self.sent.fetch_add(1, Ordering::AcqRel);
                    self.bytes.fetch_sub(size, Ordering::AcqRel);
                    return Ok(r);
                }
            }
            notified.await;
        }
    }
}

/// One watcher of one client stream.
struct Watcher {
    id: i64,
    range: Range,
    client: Arc<Client>,
    no_put: bool,
    no_delete: bool,
    progress: bool,
    prev_kv: bool,
    /// Canceled, or its client went away: it sends nothing more.
    removed: AtomicBool,
    state: Mutex<WatcherState>,
}

struct WatcherState {
    /// The first revision it has not seen.
    next: i64,
    created_sent: bool,
    last_header: Option<pb::ResponseHeader>,
    /// The number of its last events response queued for its client (see `Client::enqueue`).
    queued: Option<u64>,
}

impl Watcher {
    fn lock(&self) -> std::sync::MutexGuard<'_, WatcherState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Passes on what of upstream response `r` concerns this watcher (etcd's `watcher.send`).
    fn send(&self, r: &pb::WatchResponse) {
        let mut st = self.lock();
        if self.removed.load(Ordering::Acquire) {
            return;
        }
        let progress = r.events.is_empty() && !r.created && !r.canceled && r.compact_revision == 0;
        if progress && !self.progress {
            return;
        }
        let put = mvccpb::event::EventType::Put as i32;
        let mut events = Vec::new();
        let mut last = 0;
        for ev in &r.events {
            let rev = ev.kv.as_ref().map_or(0, |kv| kv.mod_revision);
            if rev < st.next {
                continue;
            }
            last = rev;
            if (self.no_put && ev.r#type == put) || (self.no_delete && ev.r#type != put) {
                continue;
            }
            let mut ev = ev.clone();
            if !self.prev_kv {
                ev.prev_kv = None;
            }
            events.push(ev);
        }
        if last >= st.next {
            st.next = last + 1;
        }
        let created = r.created && !st.created_sent;
        if !progress && !created && events.is_empty() && r.compact_revision == 0 && !r.canceled {
            return;
        }
        if created {
            st.created_sent = true;
        }
        st.last_header = r.header;
        let merge = !events.is_empty() && !created && !r.canceled && r.compact_revision == 0;
        let response = pb::WatchResponse {
            header: r.header,
            watch_id: self.id,
            created,
            canceled: r.canceled,
            compact_revision: r.compact_revision,
            cancel_reason: r.cancel_reason.clone(),
            events,
            ..Default::default()
        };
        let mut last = st.queued;
        self.client.enqueue(response, &mut last, merge);
        st.queued = if merge { last } else { None };
    }
}

/// One upstream watch and the watchers it serves.
struct Broadcast {
    range: Range,
    /// The credentials its upstream watch carries (its first watcher's).
    md: MetadataMap,
    state: Mutex<BroadcastState>,
    stop: tokio::sync::Notify,
    stopped: AtomicBool,
}

struct BroadcastState {
    /// The first revision it has not delivered.
    next: i64,
    responses: u64,
    receivers: Vec<Arc<Watcher>>,
    /// The latest header it got (for the `created` of watchers that join later).
    header: Option<pb::ResponseHeader>,
}

impl Broadcast {
    fn lock(&self) -> std::sync::MutexGuard<'_, BroadcastState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn halt(&self) {
        self.stopped.store(true, Ordering::Release);
        self.stop.notify_one();
    }
}

/// The service.
#[derive(Clone)]
pub struct WatchProxy {
    upstream: Upstream,
    ranges: Arc<Mutex<HashMap<Range, Vec<Arc<Broadcast>>>>>,
    stats: Arc<WatchStats>,
}

impl std::fmt::Debug for WatchProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatchProxy").finish_non_exhaustive()
    }
}

/// The metadata an upstream call carries for a client: its credentials, and `hasleader` (etcd's
/// proxy watches `WithRequireLeader`): a member cut off from its leader ends the watch, and the
/// proxy watches again through another.
fn credentials(md: &MetadataMap) -> MetadataMap {
    let mut out = MetadataMap::new();
    out.insert(
        crate::api::REQUIRE_LEADER_KEY,
        tonic::metadata::MetadataValue::from_static("true"),
    );
    for key in ["token", "authorization"] {
        if let Some(v) = md.get(key) {
            out.insert(key, v.clone());
        }
    }
    out
}

impl WatchProxy {
    pub fn new(upstream: Upstream, stats: Arc<WatchStats>) -> WatchProxy {
        WatchProxy {
            upstream,
            ranges: Arc::default(),
            stats,
        }
    }

    /// Watchers served by another watcher's upstream watch (etcd's
    /// `etcd_grpc_proxy_watchers_coalescing_total`): watchers less broadcasts.
    pub fn coalescing(&self) -> i64 {
        let ranges = self.ranges();
        let mut n = 0i64;
        for b in ranges.values().flatten() {
            let receivers = b.lock().receivers.len() as i64;
            if receivers > 0 {
                n += receivers - 1;
            }
        }
        n
    }

    fn ranges(&self) -> std::sync::MutexGuard<'_, HashMap<Range, Vec<Arc<Broadcast>>>> {
        self.ranges
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The permission check of a create, and the header of the cluster's answer.
    async fn check(
        &self,
        md: &MetadataMap,
        key: &[u8],
        end: &[u8],
    ) -> Result<pb::ResponseHeader, Status> {
        let (key, end) = if key.is_empty() {
            (vec![0], vec![0])
        } else {
            (key.to_vec(), end.to_vec())
        };
        let mut last = Status::unavailable("grpc-proxy: no endpoint");
        for channel in self.upstream.order() {
            let mut c = pb::kv_client::KvClient::new(channel.clone());
            let mut r = Request::new(pb::RangeRequest {
                key: key.clone(),
                range_end: end.clone(),
                serializable: true,
                count_only: true,
                limit: 1,
                ..Default::default()
            });
            *r.metadata_mut() = credentials(md);
            match c.range(r).await {
                Ok(resp) => return Ok(resp.into_inner().header.unwrap_or_default()),
                Err(s) if s.code() == tonic::Code::Unavailable => last = s,
                Err(s) => return Err(s),
            }
        }
        Err(last)
    }

    /// Adds watcher `w`, starting at `w`'s next revision, to a broadcast of its range.
    fn add(&self, w: Arc<Watcher>, header: pb::ResponseHeader, md: &MetadataMap) {
        let next = w.lock().next;
        let mut ranges = self.ranges();
        // Removed meanwhile (its client went away while a cancel moved it): not added back, or
        // its broadcast would never empty. `remove` marks it before taking this lock.
        if w.removed.load(Ordering::Acquire) {
            return;
        }
        let list = ranges.entry(w.range.clone()).or_default();
        for b in list.iter() {
            let mut st = b.lock();
            if b.stopped.load(Ordering::Acquire) || st.next > next {
                continue;
            }
            if st.responses > 0 {
                // Already streaming: created at once, with the cluster's current header, unless
                // it was created before (moved here after a cancel): a second `created` is
                // taken by clientv3 as the answer to another create (or panics it).
                let mut ws = w.lock();
                if !ws.created_sent {
                    ws.created_sent = true;
                    drop(ws);
                    w.client.post(pb::WatchResponse {
                        header: Some(pb::ResponseHeader {
                            revision: header.revision.max(next - 1),
                            ..header
                        }),
                        watch_id: w.id,
                        created: true,
                        ..Default::default()
                    });
                }
            }
            st.receivers.push(w);
            return;
        }
        let b = Arc::new(Broadcast {
            range: w.range.clone(),
            md: credentials(md),
            state: Mutex::new(BroadcastState {
                next,
                responses: 0,
                receivers: vec![w],
                header: None,
            }),
            stop: tokio::sync::Notify::new(),
            stopped: AtomicBool::new(false),
        });
        list.push(b.clone());
        drop(ranges);
        tokio::spawn(self.clone().run(b));
    }

    /// Removes `w` (its client canceled it or went away); a broadcast left without watchers
    /// stops.
    fn remove(&self, w: &Arc<Watcher>) {
        w.removed.store(true, Ordering::Release);
        let mut ranges = self.ranges();
        let Some(list) = ranges.get_mut(&w.range) else {
            return;
        };
        for b in list.iter() {
            let mut st = b.lock();
            let before = st.receivers.len();
            st.receivers.retain(|r| !Arc::ptr_eq(r, w));
            if st.receivers.len() < before {
                if st.receivers.is_empty() {
                    b.stopped.store(true, Ordering::Release);
                    b.halt();
                }
                break;
            }
        }
        list.retain(|b| !b.stopped.load(Ordering::Acquire));
        if list.is_empty() {
            ranges.remove(&w.range);
        }
    }

    /// After broadcast `b` got a response: if another broadcast of its range has delivered up
    /// to where `b` is, `b`'s watchers move there and `b` stops.
    fn coalesce(&self, b: &Arc<Broadcast>) {
        let mut ranges = self.ranges();
        let Some(list) = ranges.get_mut(&b.range) else {
            return;
        };
        let next = b.lock().next;
        let target = list.iter().find(|o| {
            !Arc::ptr_eq(o, b) && {
                let st = o.lock();
                !o.stopped.load(Ordering::Acquire) && st.responses > 0 && st.next <= next
            }
        });
        if let Some(target) = target.cloned() {
            let moved = {
                let mut st = b.lock();
                if b.stopped.load(Ordering::Acquire) {
                    return;
                }
                b.stopped.store(true, Ordering::Release);
                std::mem::take(&mut st.receivers)
            };
            target.lock().receivers.extend(moved);
            b.halt();
            list.retain(|o| !Arc::ptr_eq(o, b));
        }
    }

    /// The upstream watch of broadcast `b`, opened again from where it is when it breaks.
    async fn run(self, b: Arc<Broadcast>) {
        self.stats.upstream.fetch_add(1, Ordering::Relaxed);
        let mut backoff = Duration::from_millis(50);
        while !b.stopped.load(Ordering::Acquire) {
            let next = b.lock().next;
            let (tx, rx) = mpsc::channel::<pb::WatchRequest>(1);
            let create = pb::WatchRequest {
                request_union: Some(RequestUnion::CreateRequest(pb::WatchCreateRequest {
                    key: b.range.0.clone(),
                    range_end: b.range.1.clone(),
                    start_revision: next,
                    progress_notify: true,
                    prev_kv: true,
                    ..Default::default()
                })),
            };
            let _ = tx.send(create).await;
            let mut request = Request::new(tokio_stream_of(rx));
            *request.metadata_mut() = b.md.clone();
            let mut client = pb::watch_client::WatchClient::new(self.upstream.channel())
                .max_decoding_message_size(usize::MAX);
            let opened = tokio::select! {
                r = client.watch(request) => r,
                () = b.stop.notified() => break,
            };
            let mut responses = match opened {
                Ok(r) => r.into_inner(),
                Err(e) => {
                    tracing::debug!(error = %e, "grpc-proxy: opening an upstream watch failed");
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = b.stop.notified() => break,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue;
                }
            };
            loop {
                let item = tokio::select! {
                    r = responses.next() => r,
                    () = b.stop.notified() => None,
                };
                let Some(Ok(r)) = item else { break };
                backoff = Duration::from_millis(50);
                if r.canceled {
                    self.canceled(&b, &r);
                    break;
                }
                self.deliver(&b, &r);
                if !b.stopped.load(Ordering::Acquire) {
                    self.coalesce(&b);
                }
                if b.stopped.load(Ordering::Acquire) {
                    break;
                }
            }
            drop(tx);
            if !b.stopped.load(Ordering::Acquire) {
                tokio::time::sleep(backoff).await;
            }
        }
        // Whatever watchers remain (a cancel from the cluster) are forgotten.
        let mut ranges = self.ranges();
        if let Some(list) = ranges.get_mut(&b.range) {
            list.retain(|o| !Arc::ptr_eq(o, &b));
            if list.is_empty() {
                ranges.remove(&b.range);
            }
        }
        self.stats.upstream.fetch_sub(1, Ordering::Relaxed);
    }

    /// The cluster canceled `b`'s watch (its start revision was compacted): its watchers whose
    /// own start revision is still there move to another broadcast, the others are canceled
    /// with the compact revision.
    fn canceled(&self, b: &Arc<Broadcast>, r: &pb::WatchResponse) {
        let receivers = {
            let mut st = b.lock();
            b.stopped.store(true, Ordering::Release);
            std::mem::take(&mut st.receivers)
        };
        b.halt();
        {
            let mut ranges = self.ranges();
            if let Some(list) = ranges.get_mut(&b.range) {
                list.retain(|o| !Arc::ptr_eq(o, b));
                if list.is_empty() {
                    ranges.remove(&b.range);
                }
            }
        }
        let header = r.header.unwrap_or_default();
        for w in receivers {
            let next = w.lock().next;
            if r.compact_revision > 0 && next > r.compact_revision {
                self.add(w, header, &b.md);
            } else {
                w.send(r);
            }
        }
    }

    /// Passes response `r` to `b`'s watchers.
    fn deliver(&self, b: &Broadcast, r: &pb::WatchResponse) {
        let receivers = {
            let mut st = b.lock();
            if st.responses > 0 && r.events.is_empty() && !r.created && !r.canceled {
                // A progress notification: everything up to its revision is delivered.
                st.next = st.next.max(r.header.map_or(0, |h| h.revision) + 1);
            }
            if let Some(last) = r.events.last().and_then(|e| e.kv.as_ref()) {
                st.next = st.next.max(last.mod_revision + 1);
            }
            st.responses += 1;
            st.header = r.header;
            st.receivers.clone()
        };
        if receivers.len() > 1 {
            self.stats
                .events_coalescing
                .fetch_add((receivers.len() - 1) as u64, Ordering::Relaxed);
        }
        for w in &receivers {
            w.send(r);
        }
    }
}

/// A stream of the requests sent on `rx`.
fn tokio_stream_of(
    rx: mpsc::Receiver<pb::WatchRequest>,
) -> impl futures::Stream<Item = pb::WatchRequest> + Send + 'static {
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) })
}

/// The watchers of one client stream, removed from their broadcasts when it ends.
struct StreamGuard {
    proxy: WatchProxy,
    /// `None` once the stream has ended: a create still in flight then adds nothing.
    watchers: Watchers,
}

type Watchers = Arc<Mutex<Option<HashMap<i64, Arc<Watcher>>>>>;

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let all: Vec<Arc<Watcher>> = self
            .watchers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
            .map(|m| m.into_values().collect())
            .unwrap_or_default();
        for w in all {
            self.proxy.remove(&w);
        }
    }
}

/// Whether `[key, end)` is a range a watch may have (etcd's `watchRange.valid`).
fn valid(key: &[u8], end: &[u8]) -> bool {
    end.is_empty() || end > key || end == [0]
}

type ResponseStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::WatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::watch_server::Watch for WatchProxy {
    type WatchStream = ResponseStream;

    async fn watch(
        &self,
        request: Request<Streaming<pb::WatchRequest>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let md = request.metadata().clone();
        let mut requests = request.into_inner();
        let client = Arc::new(Client::default());
        let watchers: Watchers = Arc::new(Mutex::new(Some(HashMap::new())));
        let guard = StreamGuard {
            proxy: self.clone(),
            watchers: watchers.clone(),
        };
        let proxy = self.clone();
        let reader_client = client.clone();
        tokio::spawn(async move {
            let mut next_id = 0;
            while let Some(Ok(req)) = requests.next().await {
                match req.request_union {
                    Some(RequestUnion::CreateRequest(cr)) => {
                        let header = match proxy.check(&md, &cr.key, &cr.range_end).await {
                            Ok(h) => h,
                            Err(e) => {
                                reader_client.post(pb::WatchResponse {
                                    header: Some(pb::ResponseHeader::default()),
                                    watch_id: INVALID_WATCH_ID,
                                    created: true,
                                    canceled: true,
                                    cancel_reason: e.message().to_string(),
                                    ..Default::default()
                                });
                                continue;
                            }
                        };
                        if !valid(&cr.key, &cr.range_end) {
                            reader_client.post(pb::WatchResponse {
                                watch_id: INVALID_WATCH_ID,
                                created: true,
                                canceled: true,
                                ..Default::default()
                            });
                            continue;
                        }
                        let no_put = cr
                            .filters
                            .contains(&(pb::watch_create_request::FilterType::Noput as i32));
                        let no_delete = cr
                            .filters
                            .contains(&(pb::watch_create_request::FilterType::Nodelete as i32));
                        let next = if cr.start_revision > 0 {
                            cr.start_revision
                        } else {
                            header.revision + 1
                        };
                        let w = Arc::new(Watcher {
                            id: next_id,
                            range: (cr.key, cr.range_end),
                            client: reader_client.clone(),
                            no_put,
                            no_delete,
                            progress: cr.progress_notify,
                            prev_kv: cr.prev_kv,
                            removed: AtomicBool::new(false),
                            state: Mutex::new(WatcherState {
                                next,
                                created_sent: false,
                                last_header: None,
                                queued: None,
                            }),
                        });
                        next_id += 1;
                        let mut map = watchers
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner);
                        // The client went away during the check: nothing to add.
                        let Some(map) = map.as_mut() else { break };
                        map.insert(w.id, w.clone());
                        proxy.add(w, header, &md);
                    }
                    Some(RequestUnion::CancelRequest(c)) => {
                        let w = watchers
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .as_mut()
                            .and_then(|m| m.remove(&c.watch_id));
                        if let Some(w) = w {
                            proxy.remove(&w);
                            let header = w.lock().last_header.unwrap_or_default();
                            reader_client.post(pb::WatchResponse {
                                header: Some(header),
                                watch_id: c.watch_id,
                                canceled: true,
                                ..Default::default()
                            });
                        }
                    }
                    // etcd's proxy does not answer progress requests.
                    Some(RequestUnion::ProgressRequest(_)) | None => {}
                }
            }
            // The client sends no more; its watchers go on until it goes away.
        });
        let stream = futures::stream::unfold(Some((guard, client)), |state| async move {
            let (guard, client) = state?;
            match client.next().await {
                Ok(r) => Some((Ok(r), Some((guard, client)))),
                // Too far behind: the stream ends now (and its watchers with it).
                Err(e) => Some((Err(e), None)),
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }
}
