//! The peer transport's sending side: raft messages from the storage core to the other members.
//!
//! # Design (etcd's `rafthttp`, on gRPC)
//! - One task per peer (on the network runtime) owns one long-lived **stream** (`Peer.Raft`),
//!   ordered, carrying appends, heartbeats, votes and read-index messages. The messages of one
//!   `Ready` for that peer travel together as one `RaftBatch`.
//! - Between the core and each peer task: a bounded queue of [`PEER_QUEUE`] batches. The core
//!   never waits: if the queue is full (the peer is slow or gone), the batch is dropped and raft
//!   is told the peer is unreachable (`report_unreachable`), so it probes instead of streaming;
//!   raft retransmits what was lost.
//! - A broken stream is reported the same way and re-opened with backoff (20 ms doubling to
//!   200 ms, near etcd's 100 ms dial rate). A longer pause drops votes and appends for longer
//!   than an election timeout while members start one after another.
//! - **Snapshots** go on a call of their own (`Peer.Snapshot`), streamed from a pinned backend
//!   version on a blocking thread, so a large snapshot never delays heartbeats; its outcome is
//!   reported to raft (`report_snapshot`).
//! - Every call carries the cluster ID and the sender's and receiver's member IDs, which the
//!   receiver checks (`peer.rs`).
//! - A probe per peer every second measures the round-trip time.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use keel_engine::btree::ReadTxn;
use keel_proto::keelpeer as pp;
use pp::peer_client::PeerClient;
use protobuf::Message as _;
use raft::eraftpb::Message;
use tokio::sync::mpsc;
use tonic::transport::Channel;

use crate::tls::dial::Dialer;

use super::Command;
use crate::metrics::{self, Metrics};

/// Batches queued per peer at most (etcd's stream buffer holds 4096 messages).
pub const PEER_QUEUE: usize = 4096;
/// The largest peer message, sent or accepted (a batch is split below it).
pub const MAX_PEER_MESSAGE: usize = 64 << 20;
/// Bytes per `RaftBatch` before the rest goes in the next one.
const BATCH_BYTES: usize = 16 << 20;
const BACKOFF_MIN: Duration = Duration::from_millis(20);
const BACKOFF_MAX: Duration = Duration::from_millis(200);
/// A stream to a peer that lasted this long was up: its loss is logged as a warning, and the
/// reconnection backoff starts over.
const STREAM_UP: Duration = Duration::from_secs(5);
const PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// Metadata keys of every peer call.
pub const CLUSTER_HEADER: &str = "x-keel-cluster-id";
pub const FROM_HEADER: &str = "x-keel-from";
pub const TO_HEADER: &str = "x-keel-to";

/// Where the storage core sends raft messages. The real one is [`Transport`]; the deterministic
/// cluster harness has an in-memory one.
pub trait Network: Send + Sync {
    /// Sends `messages` (all to `to`), in order, without waiting.
    fn send(&self, to: u64, messages: Vec<Message>);
    /// Sends a `MsgSnapshot` with the backend version `data` (pinned at the snapshot's index).
    fn send_snapshot(&self, message: Message, data: ReadTxn);
    /// The peers: every member but this one, with their peer URLs.
    fn set_peers(&self, peers: Vec<(u64, Vec<String>)>);
    /// Since when each peer has answered without interruption (etcd's `ActiveSince`).
    fn active_since(&self) -> ActiveSince {
        ActiveSince::default()
    }
}

/// Since when each peer has answered its probes without interruption; absent: not now.
pub type ActiveSince = Arc<Mutex<HashMap<u64, Instant>>>;

/// A peer's sending side.
struct PeerLink {
    urls: Vec<String>,
    queue: mpsc::Sender<Vec<Message>>,
    /// Ends the peer's tasks when dropped.
    _stop: tokio::sync::oneshot::Sender<()>,
}

struct Inner {
    runtime: tokio::runtime::Handle,
    cluster_id: u64,
    member_id: u64,
    peers: Mutex<HashMap<u64, PeerLink>>,
    /// Reports back to the storage core (unreachable peers, snapshot outcomes).
    core: mpsc::Sender<Command>,
    metrics: Arc<Metrics>,
    active: ActiveSince,
    dialer: Dialer,
}

/// The gRPC peer transport. Cheap to clone.
#[derive(Clone)]
pub struct Transport {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("member_id", &self.inner.member_id)
            .finish_non_exhaustive()
    }
}

/// A raft report for the storage core.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Report {
    /// A peer could not be reached (raft probes it instead of streaming).
    Unreachable(u64),
    /// A snapshot sent to a peer finished (`true`) or failed.
    Snapshot(u64, bool),
    /// A peer refused this member as removed from the cluster.
    Removed(u64),
}

impl Transport {
    /// A transport of member `member_id` in cluster `cluster_id`, running its tasks on
    /// `runtime` and reporting to the core through `core`.
    pub(crate) fn new(
        runtime: tokio::runtime::Handle,
        cluster_id: u64,
        member_id: u64,
        core: mpsc::Sender<Command>,
        metrics: Arc<Metrics>,
        dialer: Dialer,
    ) -> Transport {
        Transport {
            inner: Arc::new(Inner {
                runtime,
                cluster_id,
                member_id,
                peers: Mutex::new(HashMap::new()),
                core,
                metrics,
                active: ActiveSince::default(),
                dialer,
            }),
        }
    }

    fn peers(&self) -> std::sync::MutexGuard<'_, HashMap<u64, PeerLink>> {
        self.inner
            .peers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn report(&self, r: Report) {
        let _ = self.inner.core.try_send(Command::Report(r));
    }

    /// Reports a snapshot's outcome, waiting for room in the core's queue: raft keeps a peer
    /// in its snapshot state, sending it nothing, until told (a dropped failure would leave
    /// that follower behind for the rest of the term).
    async fn report_snapshot(&self, to: u64, done: bool) {
        let _ = self
            .inner
            .core
            .send(Command::Report(Report::Snapshot(to, done)))
            .await;
    }
}

/// The `Raft` call (`PeerClient::raft`, but sending batches [`encode`] wrote already).
async fn raft_call<S>(
    channel: Channel,
    request: tonic::Request<S>,
) -> Result<tonic::Response<pp::StreamEnd>, tonic::Status>
where
    S: futures::Stream<Item = Bytes> + Send + 'static,
{
    let mut grpc = tonic::client::Grpc::new(channel)
        .max_decoding_message_size(MAX_PEER_MESSAGE)
        .max_encoding_message_size(MAX_PEER_MESSAGE);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unknown(format!("Service was not ready: {e}")))?;
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/keelpeer.Peer/Raft");
    let codec = keel_proto::codec::EncodedCodec::<pp::StreamEnd>::default();
    let mut request = request;
    request
        .extensions_mut()
        .insert(tonic::GrpcMethod::new("keelpeer.Peer", "Raft"));
    grpc.client_streaming(request, path, codec).await
}

fn client(channel: Channel) -> PeerClient<Channel> {
    PeerClient::new(channel)
        .max_decoding_message_size(MAX_PEER_MESSAGE)
        .max_encoding_message_size(MAX_PEER_MESSAGE)
}

/// Adds the headers every peer call carries.
fn headers<T>(inner: &Inner, to: u64, request: tonic::Request<T>) -> tonic::Request<T> {
    peer_request(inner.cluster_id, inner.member_id, to, request)
}

/// `request` with the headers of a peer call from `from` to `to` in cluster `cluster_id`.
pub fn peer_request<T>(
    cluster_id: u64,
    from: u64,
    to: u64,
    mut request: tonic::Request<T>,
) -> tonic::Request<T> {
    let md = request.metadata_mut();
    let hex = |v: u64| {
        format!("{v:x}")
            .parse()
            .expect("hex digits are valid metadata")
    };
    md.insert(CLUSTER_HEADER, hex(cluster_id));
    md.insert(FROM_HEADER, hex(from));
    md.insert(TO_HEADER, hex(to));
    request
}

/// Clients of the other members' peer services, for requests a follower forwards to the leader
/// (keep-alives, TimeToLive). Channels connect lazily and are kept per member.
pub struct PeerClients {
    dialer: Dialer,
    clients: Mutex<HashMap<u64, (String, PeerClient<Channel>)>>,
}

impl std::fmt::Debug for PeerClients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PeerClients")
    }
}

impl PeerClients {
    /// Clients that dial with `dialer`.
    pub fn new(dialer: Dialer) -> PeerClients {
        PeerClients {
            dialer,
            clients: Mutex::new(HashMap::new()),
        }
    }

    /// A client of member `id` at `url` (called on the network runtime).
    pub fn get(&self, id: u64, url: &str) -> Option<PeerClient<Channel>> {
        let mut clients = self
            .clients
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((u, c)) = clients.get(&id)
            && u == url
        {
            return Some(c.clone());
        }
        let c = client(self.dialer.channel(url)?);
        clients.insert(id, (url.to_string(), c.clone()));
        Some(c)
    }
}

/// Encodes messages into batches of at most about [`BATCH_BYTES`], each in `RaftBatch`'s wire
/// form: for every message, field 1's tag, the message's length as a varint, and the message as
/// rust-protobuf encodes it. One buffer per batch, the messages written straight into it (no
/// buffer per message, no `RaftBatch` value to encode again). A message that fails to encode is
/// left out, and logged; so is one too large for any batch to stay within
/// [`MAX_PEER_MESSAGE`] (the core splits appends far below that, so this is a defect's guard),
/// counted in the second value so that the caller reports the peer unreachable and raft
/// probes it again instead of waiting for an answer that will not come.
fn encode(messages: Vec<Message>) -> (Vec<Bytes>, usize) {
    /// `RaftBatch.messages`: field 1, length-delimited.
    const MESSAGES_TAG: u8 = 1 << 3 | 2;
    /// A batch holds up to `BATCH_BYTES` and then one more message, with its tag and length.
    const MAX_MESSAGE: usize = MAX_PEER_MESSAGE - BATCH_BYTES - 16;
    let mut out = Vec::new();
    let mut buf: Vec<u8> = Vec::new();
    let mut too_large = 0;
    for m in messages {
        let size = m.compute_size();
        if size as usize > MAX_MESSAGE {
            tracing::error!(
                to = format!("{:x}", m.to),
                kind = ?m.get_msg_type(),
                bytes = size,
                limit = MAX_MESSAGE,
                "a raft message exceeds the peer message limit: not sent"
            );
            too_large += 1;
            continue;
        }
        let start = buf.len();
        buf.reserve(1 + 5 + size as usize);
        buf.push(MESSAGES_TAG);
        let written = {
            let mut os = protobuf::CodedOutputStream::vec(&mut buf);
            os.write_raw_varint32(size)
                .and_then(|()| m.write_to_with_cached_sizes(&mut os))
                .and_then(|()| os.flush())
        };
        if let Err(e) = written {
            buf.truncate(start);
            tracing::error!(error = %e, "encoding a raft message");
            continue;
        }
        if buf.len() >= BATCH_BYTES {
            out.push(Bytes::from(std::mem::take(&mut buf)));
        }
    }
    if !buf.is_empty() {
        out.push(Bytes::from(buf));
    }
    (out, too_large)
}

impl Transport {
    /// The stream of messages to peer `to`: reconnects with backoff, reports failures.
    async fn stream_to(self, to: u64, urls: Vec<String>, mut queue: mpsc::Receiver<Vec<Message>>) {
        let inner = &self.inner;
        let label = metrics::to(to);
        let mut backoff = BACKOFF_MIN;
        let mut attempt = 0usize;
        let mut pending: Vec<Bytes> = Vec::new();
        let mut healthy = true;
        let mut removed = false;
        loop {
            let url = &urls[attempt % urls.len()];
            attempt += 1;
            let Some(channel) = inner.dialer.channel(url) else {
                tracing::error!(peer = format!("{to:x}"), %url, "invalid peer URL");
                return;
            };
            let (tx, rx) = mpsc::channel::<Bytes>(16);
            let stream =
                futures::stream::unfold(
                    rx,
                    |mut rx| async move { rx.recv().await.map(|b| (b, rx)) },
                );
            let request = headers(inner, to, tonic::Request::new(stream));
            let mut call = Box::pin(raft_call(channel, request));
            let started = Instant::now();
            let outcome: Result<(), String> = loop {
                if let Some(batch) = pending.first() {
                    let size = batch.len();
                    tokio::select! {
                        r = &mut call => break Err(match r {
                            Ok(_) => "the peer ended the stream".into(),
                            Err(s) => {
                                removed = s.code() == tonic::Code::PermissionDenied
                                    && s.message() == super::peer::REMOVED;
                                s.message().to_string()
                            }
                        }),
                        permit = tx.reserve() => match permit {
                            Ok(p) => {
                                p.send(pending.remove(0));
                                inner.metrics.peer_sent_bytes.get_or_create(&label).inc_by(size as u64);
                            }
                            Err(_) => break Err("stream closed".into()),
                        },
                    }
                } else {
                    tokio::select! {
                        r = &mut call => break Err(match r {
                            Ok(_) => "the peer ended the stream".into(),
                            Err(s) => {
                                removed = s.code() == tonic::Code::PermissionDenied
                                    && s.message() == super::peer::REMOVED;
                                s.message().to_string()
                            }
                        }),
                        next = queue.recv() => match next {
                            Some(messages) => {
                                let (batches, too_large) = encode(messages);
                                pending.extend(batches);
                                if too_large > 0 {
                                    self.report(Report::Unreachable(to));
                                }
                            }
                            // The peer was removed: stop.
                            None => return,
                        },
                    }
                }
            };
            if let Err(why) = outcome {
                inner.metrics.peer_sent_failures.get_or_create(&label).inc();
                // A stream that lasted was up: its loss is news (the flag alone stays false
                // once a peer was down, so a later loss would go unseen at the default level).
                let was_up = started.elapsed() > STREAM_UP;
                if healthy || was_up {
                    tracing::warn!(peer = format!("{to:x}"), %url, error = %why, "lost the stream to a peer");
                } else {
                    tracing::debug!(peer = format!("{to:x}"), %url, error = %why, "peer still unreachable");
                }
                healthy = false;
                if std::mem::take(&mut removed) {
                    self.report(Report::Removed(to));
                }
                self.report(Report::Unreachable(to));
                // What was queued until now is stale by the time the peer is back (raft resends
                // appends). What comes during the backoff goes on the next stream: a vote or its
                // answer, which raft does not resend, is not lost to the wait (a leadership
                // transfer to a member whose stream was reconnecting failed that way).
                pending.clear();
                while queue.try_recv().is_ok() {}
                if was_up {
                    backoff = BACKOFF_MIN;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            } else {
                healthy = true;
            }
        }
    }

    /// Measures the round-trip time to peer `to` every second.
    async fn probe(self, to: u64, urls: Vec<String>) {
        let Some(channel) = urls.first().and_then(|u| self.inner.dialer.channel(u)) else {
            return;
        };
        let mut peer = client(channel);
        let label = metrics::to(to);
        let mut tick = tokio::time::interval(PROBE_INTERVAL);
        loop {
            tick.tick().await;
            let request = headers(&self.inner, to, tonic::Request::new(pp::ProbeRequest {}));
            let started = Instant::now();
            let r = tokio::time::timeout(Duration::from_secs(5), peer.probe(request)).await;
            let mut active = self
                .inner
                .active
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Ok(Ok(_)) = r {
                Metrics::observe(
                    &self.inner.metrics.peer_round_trip.get_or_create(&label),
                    started.elapsed(),
                );
                active.entry(to).or_insert(started);
            } else {
                active.remove(&to);
            }
        }
    }

    /// Sends a snapshot to peer `to` and reports the outcome to raft.
    async fn snapshot_to(self, to: u64, urls: Vec<String>, message: Message, data: ReadTxn) {
        let started = Instant::now();
        let label = metrics::to(to);
        let result = self.try_snapshot(to, &urls, message, data).await;
        let m = &self.inner.metrics;
        match &result {
            Ok(()) => {
                Metrics::observe(&m.snapshot_send.get_or_create(&label), started.elapsed());
                m.snapshot_send_success.get_or_create(&label).inc();
                tracing::info!(peer = format!("{to:x}"), took = ?started.elapsed(), "sent a snapshot");
            }
            Err(e) => {
                m.snapshot_send_failures.get_or_create(&label).inc();
                tracing::warn!(peer = format!("{to:x}"), error = %e, "sending a snapshot failed");
            }
        }
        self.report_snapshot(to, result.is_ok()).await;
    }

    async fn try_snapshot(
        &self,
        to: u64,
        urls: &[String],
        message: Message,
        data: ReadTxn,
    ) -> Result<(), String> {
        let channel = urls
            .first()
            .and_then(|u| self.inner.dialer.channel(u))
            .ok_or("no peer URL")?;
        let header = message.write_to_bytes().map_err(|e| e.to_string())?;
        let (tx, rx) = mpsc::channel::<pp::SnapshotChunk>(4);
        let first = pp::SnapshotChunk {
            message: Bytes::from(header),
            ..Default::default()
        };
        tx.send(first).await.map_err(|_| "stream closed")?;
        // The backend is read on a blocking thread: its pages fault in from disk.
        let reader = tokio::task::spawn_blocking(move || {
            let crc = super::snapshot::encode(&data, |chunk| {
                tx.blocking_send(pp::SnapshotChunk {
                    data: chunk,
                    ..Default::default()
                })
                .is_ok()
            });
            match crc {
                Ok(Some(crc32)) => tx
                    .blocking_send(pp::SnapshotChunk {
                        done: true,
                        crc32,
                        ..Default::default()
                    })
                    .map_err(|_| "stream closed".to_string()),
                Ok(None) => Err("stream closed".to_string()),
                Err(e) => Err(e.to_string()),
            }
        });
        let stream =
            futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) });
        let mut peer = client(channel);
        let request = headers(&self.inner, to, tonic::Request::new(stream));
        let sent = peer.snapshot(request).await;
        let read = reader.await.map_err(|e| e.to_string())?;
        sent.map_err(|s| s.message().to_string())?;
        read
    }
}

impl Network for Transport {
    fn send(&self, to: u64, messages: Vec<Message>) {
        let full = {
            let peers = self.peers();
            let Some(link) = peers.get(&to) else {
                return;
            };
            match link.queue.try_send(messages) {
                Ok(()) => false,
                Err(mpsc::error::TrySendError::Full(_)) => true,
                Err(mpsc::error::TrySendError::Closed(_)) => true,
            }
        };
        if full {
            self.inner
                .metrics
                .peer_sent_failures
                .get_or_create(&metrics::to(to))
                .inc();
            self.report(Report::Unreachable(to));
        }
    }

    fn send_snapshot(&self, message: Message, data: ReadTxn) {
        let to = message.to;
        let urls = self.peers().get(&to).map(|l| l.urls.clone());
        match urls {
            Some(urls) => {
                let t = self.clone();
                self.inner
                    .runtime
                    .spawn(t.snapshot_to(to, urls, message, data));
            }
            None => {
                let t = self.clone();
                self.inner
                    .runtime
                    .spawn(async move { t.report_snapshot(to, false).await });
            }
        }
    }

    fn active_since(&self) -> ActiveSince {
        self.inner.active.clone()
    }

    fn set_peers(&self, peers: Vec<(u64, Vec<String>)>) {
        let mut links = self.peers();
        links.retain(|id, _| peers.iter().any(|(p, _)| p == id));
        self.inner
            .active
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .retain(|id, _| peers.iter().any(|(p, _)| p == id));
        for (id, urls) in peers {
            if id == self.inner.member_id || urls.is_empty() {
                continue;
            }
            if links.get(&id).is_some_and(|l| l.urls == urls) {
                continue;
            }
            let (queue, rx) = mpsc::channel(PEER_QUEUE);
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let t = self.clone();
            let u = urls.clone();
            let probe = self.clone();
            let pu = urls.clone();
            self.inner.runtime.spawn(async move {
                tokio::select! {
                    _ = t.stream_to(id, u, rx) => {}
                    _ = probe.probe(id, pu) => {}
                    _ = stopped => {}
                }
            });
            links.insert(
                id,
                PeerLink {
                    urls,
                    queue,
                    _stop: stop,
                },
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;
    use raft::eraftpb::{Entry, MessageType};

    fn append(to: u64, index: u64, data: Vec<u8>) -> Message {
        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgAppend);
        m.from = 1;
        m.to = to;
        m.term = 3;
        m.index = index;
        m.commit = index;
        m.entries.push(Entry {
            index: index + 1,
            term: 3,
            data: data.into(),
            ..Default::default()
        });
        m
    }

    /// A batch decodes as a `RaftBatch` (what the receiver's generated server does), and each
    /// of its messages as the raft message sent, in order.
    #[test]
    fn a_batch_is_a_raft_batch_of_the_messages_in_order() {
        let mut heartbeat = Message::default();
        heartbeat.set_msg_type(MessageType::MsgHeartbeat);
        heartbeat.to = 2;
        let sent = vec![
            append(2, 7, b"put foo".to_vec()),
            heartbeat,
            Message::default(),
            append(2, 8, vec![0xab; 300]),
        ];
        let (batches, _) = encode(sent.clone());
        assert_eq!(batches.len(), 1);
        let batch = pp::RaftBatch::decode(batches[0].clone()).unwrap();
        let got: Vec<Message> = batch
            .messages
            .iter()
            .map(|b| Message::parse_from_bytes(b).unwrap())
            .collect();
        assert_eq!(got, sent);
        assert!(encode(Vec::new()).0.is_empty());
    }

    /// Messages beyond `BATCH_BYTES` go in the next batch; none is split or lost.
    #[test]
    fn batches_are_cut_after_batch_bytes() {
        let big = 3 << 20;
        let sent: Vec<Message> = (0..13).map(|i| append(3, i, vec![i as u8; big])).collect();
        let (batches, _) = encode(sent.clone());
        let mut got = Vec::new();
        let mut counts = Vec::new();
        for b in &batches {
            let batch = pp::RaftBatch::decode(b.clone()).unwrap();
            counts.push(batch.messages.len());
            got.extend(
                batch
                    .messages
                    .iter()
                    .map(|b| Message::parse_from_bytes(b).unwrap()),
            );
        }
        // 16 MiB is passed by the sixth message of 3 MiB.
        assert_eq!(counts, [6, 6, 1]);
        assert_eq!(got, sent);
    }
}
