//! The storage core: one thread, one pinned glommio executor, owning the raft node, the WAL and
//! the MVCC write path. Network threads reach it through [`Core`], a `Send + Clone` handle, so
//! neither side knows the other's runtime.
//!
//! # Layout
//! - [`node`]: the raft node and its `Ready` loop: proposals, ReadIndex, ticks, persistence
//!   (asynchronous: the loop keeps ticking while the WAL syncs), timeouts, lease upkeep.
//! - [`apply`](self::apply): applying committed entries to the MVCC store, the lessor and the
//!   membership, one backend transaction per batch.
//! - [`proposal`]: the wire format of a raft entry's request, checked before it is proposed.
//! - [`storage`]: raft-rs's `Storage` over the WAL, with the membership and snapshot metadata
//!   of the backend.
//! - [`checkpoint`]: backend syncs on a thread of their own.
//! - [`tick`]: the raft clock, a thread that wakes the loop every heartbeat.
//! - [`events`]: the bounded feeds of applied revisions to the watch hubs.
//! - [`transport`] (sending) and [`peer`] (receiving): raft messages between members over gRPC
//!   streams on the peer URLs, with the cluster and member checks.
//! - [`snapshot`]: the backend sent whole to a lagging follower, and installed.
//!
//! # The loop
//! Commands arrive on a bounded channel and are drained up to [`DRAIN`] at a time. One drain
//! becomes one batch of raft proposals (and one ReadIndex for all its linearizable reads). Each
//! raft `Ready` is handled at once: messages that may leave before persistence go out, committed
//! entries are applied in one backend transaction and answered, and the new entries and hard
//! state are handed to the WAL, whose group commit makes them durable with one write and one
//! fdatasync. The loop does not wait for that: it goes on ticking and taking commands, and when
//! the fdatasync completes it tells raft (`on_persist_ready`), which may then commit more.

pub mod apply;
pub mod checkpoint;
pub mod events;
pub mod log;
pub mod node;
pub mod peer;
pub mod proposal;
pub mod snapshot;
pub mod storage;
pub mod tick;
pub mod transport;

#[cfg(test)]
mod preempt_tests;
#[cfg(test)]
mod sim;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard};
use std::time::Duration;

use arc_swap::ArcSwap;
use keel_engine::lease::Lessor;
use keel_engine::mvcc::Store;
use keel_engine::mvcc::apply as a;
use keel_engine::{Error, Result};
use keel_proto::etcdserverpb as pb;
use tokio::sync::{mpsc, oneshot};

pub use self::events::{Feed, FeedItem, Published};
pub use self::node::CoreConfig;
pub use self::proposal::{Proposal, Request};
use self::transport::Report;
use crate::api::convert::Header;
use crate::membership::Members;
use crate::metrics::Metrics;

/// Most commands taken per wake-up.
pub const DRAIN: usize = 256;
/// Commands queued for the core at most; senders wait for room beyond.
pub const COMMAND_QUEUE: usize = 4096;
/// Bytes of proposals admitted (queued or in raft, not yet answered) at most; beyond it writes
/// are refused with `etcdserver: too many requests` rather than held in memory.
pub const MAX_QUEUED_BYTES: usize = 64 << 20;
/// How long a request forwarded to the leader (keep-alive, TimeToLive) may take.
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);
/// Committed entries not yet applied beyond which writes are refused with `etcdserver: too many
/// requests` (etcd's `maxGapBetweenApplyAndCommitIndex`).
pub const MAX_APPLY_GAP: u64 = 5000;

/// The result of an applied write.
#[derive(Debug, Clone)]
pub enum Applied {
    Put(a::PutResponse),
    DeleteRange(a::DeleteRangeResponse),
    Txn(a::TxnResponse),
    /// A compaction; the store's revision when it was applied.
    Compaction(i64),
    /// A lease granted: its ID and TTL, and the store's revision when it was applied.
    LeaseGrant {
        id: i64,
        ttl: i64,
        revision: i64,
    },
    /// A lease revoked (its keys deleted in one revision): the revision it was applied at.
    LeaseRevoke {
        revision: i64,
    },
    LeaseCheckpoint,
    /// A member's attributes recorded.
    MemberAttributes,
    /// A membership change applied: the member concerned, and every member after it.
    Members {
        member: crate::membership::Member,
        members: Vec<crate::membership::Member>,
    },
    /// An alarm request applied: the alarms it concerned (etcd's `AlarmResponse.alarms`).
    Alarms(Vec<pb::AlarmMember>),
    /// An auth change applied.
    Auth(crate::auth::AuthApplied),
}

pub(crate) type Reply<T> = oneshot::Sender<Result<T>>;

/// What network threads ask of the core.
pub(crate) enum Command {
    /// Propose encoded proposal `data` (with ID `id`) and answer once it is applied.
    Propose {
        id: u64,
        data: Vec<u8>,
        reply: Reply<Applied>,
    },
    /// Answer once a read started now would see every write acknowledged before.
    ReadIndex(Reply<()>),
    /// Propose a membership change (its `id` matches the reply) and answer once applied.
    ConfChange {
        change: raft::eraftpb::ConfChange,
        reply: Reply<Applied>,
    },
    /// The leader's view of its followers' logs (`None` on a follower).
    Progress(oneshot::Sender<Option<Progress>>),
    /// Hand leadership to member `to` (etcd's `MoveLeader`); refused unless this member leads.
    TransferLeader { to: u64, reply: Reply<()> },
    /// Raft messages from a peer.
    Step(Vec<raft::eraftpb::Message>),
    /// What the transport learned about a peer.
    Report(Report),
    /// A snapshot received from the leader (its `MsgSnapshot` and the backend file written):
    /// answered once installed, or refused.
    SnapshotReceived {
        message: raft::eraftpb::Message,
        path: PathBuf,
        reply: Reply<()>,
    },
    /// Stop: hand leadership over if this member leads, checkpoint, close the WAL, answer.
    Stop(oneshot::Sender<()>),
}

/// A leader's view of replication: its own last index and each member's matched index.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    pub leader_matched: u64,
    pub matched: std::collections::HashMap<u64, u64>,
}

/// State the core shares with the network threads.
pub struct Shared {
    /// The MVCC store (replaced as a whole when a snapshot is installed).
    store: ArcSwap<Store>,
    /// The lease table (applied state; keep-alives renew it directly on the leader). The core
    /// locks it per request it applies, never across a batch or an fdatasync.
    lessor: Mutex<Lessor>,
    term: AtomicU64,
    leader: AtomicU64,
    is_leader: AtomicBool,
    /// This member leads and has applied its first entry of the term: its lease table is
    /// current and promoted (etcd's primary lessor). Keep-alives and TimeToLive wait for it.
    lease_primary: AtomicBool,
    /// Set while an apply batch that revoked a lease is not yet committed and readable; then
    /// cleared, and `revokes_published` wakes the keep-alives waiting for a revocation (and
    /// when this member stops being the primary lessor).
    revokes_in_batch: AtomicBool,
    revokes_published: tokio::sync::Notify,
    /// Committed entries not yet applied (see [`MAX_APPLY_GAP`]).
    apply_gap: AtomicU64,
    /// The members, as of the applied index.
    members: RwLock<Members>,
    /// The active alarms, as of the applied index.
    alarms: RwLock<crate::alarm::Alarms>,
    /// Users, roles and whether auth is on, as of the applied index.
    auth: ArcSwap<crate::auth::AuthState>,
    /// The simple tokens assigned by applied Authenticate entries.
    tokens: crate::auth::token::SimpleTokens,
    /// Since when each peer has answered without interruption.
    active: transport::ActiveSince,
    /// The core stopped because this member was removed from the cluster.
    removed: AtomicBool,
    /// Raft's commit index and this member's applied index.
    committed: AtomicU64,
    applied: AtomicU64,
    /// Clients of the other members, for requests forwarded to the leader.
    peer_clients: transport::PeerClients,
    /// False once the storage core has stopped: nothing is served as if it ran.
    alive: AtomicBool,
    /// Bytes of proposals admitted and not yet answered (see [`MAX_QUEUED_BYTES`]).
    queued_bytes: AtomicUsize,
    /// Proposal IDs: a random per-process prefix and a counter.
    next_id: AtomicU64,
    metrics: Arc<Metrics>,
    cluster_id: u64,
    member_id: u64,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("member_id", &self.member_id)
            .finish_non_exhaustive()
    }
}

/// Locks the lessor; a panic elsewhere while holding it leaves consistent data (every update is
/// a single insert or remove), so poisoning is ignored.
fn lock(l: &Mutex<Lessor>) -> MutexGuard<'_, Lessor> {
    l.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The handle network threads use. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Core {
    tx: mpsc::Sender<Command>,
    shared: Arc<Shared>,
    max_request_bytes: usize,
}

/// An admitted proposal's share of [`MAX_QUEUED_BYTES`], given back when dropped.
struct Admitted<'a> {
    shared: &'a Shared,
    bytes: usize,
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        self.shared
            .queued_bytes
            .fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

impl Core {
    /// The MVCC store, for reads.
    pub fn store(&self) -> Arc<Store> {
        self.shared.store.load_full()
    }

    /// The member's metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.shared.metrics
    }

    /// The lease table.
    pub fn lessor(&self) -> MutexGuard<'_, Lessor> {
        lock(&self.shared.lessor)
    }

    /// Cluster and member IDs.
    pub fn ids(&self) -> (u64, u64) {
        (self.shared.cluster_id, self.shared.member_id)
    }

    /// The response header fields of this member now.
    pub fn header(&self) -> Header {
        Header {
            cluster_id: self.shared.cluster_id,
            member_id: self.shared.member_id,
            raft_term: self.raft_term(),
        }
    }

    /// The current raft term.
    pub fn raft_term(&self) -> u64 {
        self.shared.term.load(Ordering::Relaxed)
    }

    /// The leader's member ID (0: none known).
    pub fn leader(&self) -> u64 {
        self.shared.leader.load(Ordering::Relaxed)
    }

    /// Whether the storage core runs.
    pub fn alive(&self) -> bool {
        self.shared.alive.load(Ordering::Acquire)
    }

    /// Whether this member is the leader now.
    pub fn is_leader(&self) -> bool {
        self.shared.is_leader.load(Ordering::Acquire)
    }

    /// Renews lease `id` here, the primary lessor: its TTL, or 0 if it does not exist. An
    /// expired lease is not renewed: as etcd's lessor, the answer waits until its revocation is
    /// committed and readable (then 0: the client sees its keys gone); `Timeout` at `deadline`.
    /// `None`: this member stopped being the primary meanwhile (the caller asks the new
    /// leader). Waiters are woken when a batch with revocations is published, not by polling.
    pub async fn renew_on_primary(
        &self,
        id: i64,
        deadline: std::time::Instant,
    ) -> Result<Option<i64>> {
        loop {
            // Created before looking, so a publication in between is not missed.
            let published = self.shared.revokes_published.notified();
            let expired = {
                let mut lessor = self.lessor();
                match lessor.renew(id, std::time::Instant::now()) {
                    Ok(ttl) => return Ok(Some(ttl)),
                    Err(_) => lessor.get(id).is_some(),
                }
            };
            // Gone, and not by a batch still being committed: its keys are gone too.
            if !expired && !self.shared.revokes_in_batch.load(Ordering::Acquire) {
                return Ok(Some(0));
            }
            if !self.alive() {
                return Err(Error::Stopped);
            }
            if !self.is_leader() || !self.shared.lease_primary.load(Ordering::Acquire) {
                return Ok(None);
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(Error::Timeout);
            }
            let _ = tokio::time::timeout(left.min(Duration::from_millis(500)), published).await;
        }
    }

    /// Waits until this member, leading, is the primary lessor (a new leader becomes it once
    /// its first entry of the term is applied; until then its lease expiries are those it held
    /// as a follower, which keep-alives never renewed, and etcd answers `ErrNotPrimary`, which
    /// its servers retry). `Ok(false)`: this member does not lead (any more).
    pub async fn wait_lease_primary(&self) -> Result<bool> {
        let deadline = std::time::Instant::now() + FORWARD_TIMEOUT;
        loop {
            // A core stopped by a fatal error renews and reports nothing from what it left.
            if !self.alive() {
                return Err(Error::Stopped);
            }
            if !self.is_leader() {
                return Ok(false);
            }
            if self.shared.lease_primary.load(Ordering::Acquire) {
                return Ok(true);
            }
            if std::time::Instant::now() >= deadline {
                return Err(Error::Timeout);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The active alarms, as of the applied index.
    pub fn alarms(&self) -> crate::alarm::Alarms {
        self.shared
            .alarms
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The auth state, as of the applied index.
    pub fn auth(&self) -> Arc<crate::auth::AuthState> {
        self.shared.auth.load_full()
    }

    /// The member's simple tokens.
    pub fn tokens(&self) -> &crate::auth::token::SimpleTokens {
        &self.shared.tokens
    }

    /// This member's applied index.
    pub fn applied_index(&self) -> u64 {
        self.shared.applied.load(Ordering::Acquire)
    }

    /// Raft's commit index and this member's applied index.
    pub fn indexes(&self) -> (u64, u64) {
        (
            self.shared.committed.load(Ordering::Relaxed),
            self.shared.applied.load(Ordering::Relaxed),
        )
    }

    /// Asks the core to hand leadership to `to` (the caller waits for the change).
    pub async fn transfer_leader(&self, to: u64) -> Result<()> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::TransferLeader { to, reply })
            .await
            .map_err(|_| Error::Stopped)?;
        rx.await.map_err(|_| Error::Stopped)?
    }

    /// The members, as of the applied index.
    pub fn members(&self) -> RwLockReadGuard<'_, Members> {
        self.shared
            .members
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A client of the leader's peer service, or `NoLeader`.
    fn leader_client(
        &self,
    ) -> Result<(
        u64,
        keel_proto::keelpeer::peer_client::PeerClient<tonic::transport::Channel>,
    )> {
        let leader = self.leader();
        if leader == 0 {
            return Err(Error::NoLeader);
        }
        let url = self
            .members()
            .peer_urls(leader)
            .and_then(|u| u.first().cloned())
            .ok_or(Error::NoLeader)?;
        let client = self
            .shared
            .peer_clients
            .get(leader, &url)
            .ok_or(Error::NoLeader)?;
        Ok((leader, client))
    }

    /// Whether the core stopped because this member was removed from the cluster.
    pub fn removed(&self) -> bool {
        self.shared.removed.load(Ordering::Acquire)
    }

    /// Since when peer `id` has been reachable without interruption (`None`: not now).
    pub fn active_since(&self, id: u64) -> Option<std::time::Instant> {
        self.shared
            .active
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&id)
            .copied()
    }

    /// Clients of every other member's peer service, with their IDs.
    pub fn peers(
        &self,
    ) -> Vec<(
        u64,
        keel_proto::keelpeer::peer_client::PeerClient<tonic::transport::Channel>,
    )> {
        let me = self.shared.member_id;
        let urls: Vec<(u64, String)> = self
            .members()
            .members
            .values()
            .filter(|m| m.id != me)
            .filter_map(|m| Some((m.id, m.peer_urls.first()?.clone())))
            .collect();
        urls.into_iter()
            .filter_map(|(id, url)| Some((id, self.shared.peer_clients.get(id, &url)?)))
            .collect()
    }

    /// Renews lease `id` (a keep-alive): on the leader, here; on a follower, forwarded to the
    /// leader, which alone renews and expires leases. The TTL, or 0 if the lease is gone.
    pub async fn lease_renew(&self, id: i64) -> Result<i64> {
        let deadline = std::time::Instant::now() + FORWARD_TIMEOUT;
        if self.wait_lease_primary().await?
            && let Some(ttl) = self.renew_on_primary(id, deadline).await?
        {
            return Ok(ttl);
        }
        let (leader, mut client) = self.leader_client()?;
        let (cluster_id, member_id) = self.ids();
        let request = transport::peer_request(
            cluster_id,
            member_id,
            leader,
            tonic::Request::new(keel_proto::keelpeer::LeaseRenewRequest { id }),
        );
        match tokio::time::timeout(FORWARD_TIMEOUT, client.lease_renew(request)).await {
            Ok(Ok(r)) => Ok(r.into_inner().ttl),
            Ok(Err(_)) => Err(Error::NoLeader),
            Err(_) => Err(Error::Timeout),
        }
    }

    /// TimeToLive of lease `id` from the leader (which alone knows the remaining TTL): the TTL
    /// (-1 if unknown), the granted TTL, and the keys if asked.
    pub async fn lease_time_to_live(
        &self,
        id: i64,
        keys: bool,
    ) -> Result<(i64, i64, Vec<Vec<u8>>)> {
        if self.wait_lease_primary().await? {
            let lessor = self.lessor();
            return Ok(match lessor.get(id) {
                None => (-1, 0, Vec::new()),
                Some(l) => (
                    l.remaining(std::time::Instant::now()).as_secs() as i64,
                    l.ttl,
                    if keys {
                        l.keys.iter().cloned().collect()
                    } else {
                        Vec::new()
                    },
                ),
            });
        }
        let (leader, mut client) = self.leader_client()?;
        let (cluster_id, member_id) = self.ids();
        let request = transport::peer_request(
            cluster_id,
            member_id,
            leader,
            tonic::Request::new(keel_proto::keelpeer::LeaseTimeToLiveRequest { id, keys }),
        );
        match tokio::time::timeout(FORWARD_TIMEOUT, client.lease_time_to_live(request)).await {
            Ok(Ok(r)) => {
                let r = r.into_inner();
                Ok((
                    r.ttl,
                    r.granted_ttl,
                    r.keys.into_iter().map(|k| k.to_vec()).collect(),
                ))
            }
            Ok(Err(_)) => Err(Error::NoLeader),
            Err(_) => Err(Error::Timeout),
        }
    }

    /// Proposes a membership change and waits until it is applied: the member concerned and the
    /// members after it.
    pub async fn conf_change(&self, mut change: raft::eraftpb::ConfChange) -> Result<Applied> {
        if !self.alive() {
            return Err(Error::Stopped);
        }
        change.id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::ConfChange { change, reply })
            .await
            .map_err(|_| Error::Stopped)?;
        rx.await.map_err(|_| Error::Stopped)?
    }

    /// The leader's replication progress (`None` unless this member leads).
    pub async fn progress(&self) -> Result<Option<Progress>> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Progress(reply))
            .await
            .map_err(|_| Error::Stopped)?;
        rx.await.map_err(|_| Error::Stopped)
    }

    /// A client of the leader's peer service (forwarded requests), with its member ID.
    pub fn leader_peer(
        &self,
    ) -> Result<(
        u64,
        keel_proto::keelpeer::peer_client::PeerClient<tonic::transport::Channel>,
    )> {
        self.leader_client()
    }

    /// Whether this member is a learner.
    pub fn is_learner(&self) -> bool {
        let me = self.shared.member_id;
        self.members()
            .members
            .get(&me)
            .is_some_and(|m| m.is_learner)
    }

    /// Hands raft messages from a peer to the core (waiting for room in its queue).
    pub async fn step(&self, messages: Vec<raft::eraftpb::Message>) -> Result<()> {
        self.tx
            .send(Command::Step(messages))
            .await
            .map_err(|_| Error::Stopped)
    }

    /// Hands a received snapshot to the core; resolves once it is installed (or refused).
    pub async fn snapshot_received(
        &self,
        message: raft::eraftpb::Message,
        path: PathBuf,
    ) -> Result<()> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::SnapshotReceived {
                message,
                path,
                reply,
            })
            .await
            .map_err(|_| Error::Stopped)?;
        rx.await.map_err(|_| Error::Stopped)?
    }

    /// Proposes a write and waits until it is applied. The bytes that will be proposed are
    /// encoded and checked here (size, txn nesting), on the calling thread.
    pub async fn write(&self, request: Request) -> Result<Applied> {
        self.write_stamped(request, None).await
    }

    /// Proposes a client's `request`, checked against the auth state of `stamp`.
    pub async fn write_stamped(
        &self,
        request: Request,
        stamp: Option<proposal::AuthStamp>,
    ) -> Result<Applied> {
        if !self.alive() {
            return Err(Error::Stopped);
        }
        if self.shared.apply_gap.load(Ordering::Relaxed) > MAX_APPLY_GAP {
            return Err(Error::TooManyRequests);
        }
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let data = Proposal {
            id,
            request: Some(request),
            member: self.shared.member_id,
            auth: stamp,
        }
        .encode_checked(self.max_request_bytes)?;
        let bytes = data.len();
        let before = self.shared.queued_bytes.fetch_add(bytes, Ordering::AcqRel);
        let _admitted = Admitted {
            shared: &self.shared,
            bytes,
        };
        if before + bytes > MAX_QUEUED_BYTES {
            return Err(Error::TooManyRequests);
        }
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Propose { id, data, reply })
            .await
            .map_err(|_| Error::Stopped)?;
        rx.await.map_err(|_| Error::Stopped)?
    }

    /// Waits until a read started now would see every write acknowledged before (raft ReadIndex).
    pub async fn linearizable(&self) -> Result<()> {
        if !self.alive() {
            return Err(Error::Stopped);
        }
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::ReadIndex(reply))
            .await
            .map_err(|_| Error::Stopped)?;
        rx.await.map_err(|_| Error::Stopped)?
    }

    /// Asks the core to stop (checkpoint, close the WAL) and waits until it has, at most
    /// `within`.
    pub async fn stop(&self, within: Duration) {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Command::Stop(reply)).await.is_ok() {
            let _ = tokio::time::timeout(within, rx).await;
        }
    }
}

/// A running storage core: its handle, and a receiver that resolves when its thread ends, with
/// the error that stopped it if any.
pub struct Started {
    pub core: Core,
    pub done: oneshot::Receiver<Result<()>>,
    pub thread: std::thread::JoinHandle<()>,
}

/// Starts the storage core thread and waits until it has recovered and is ready. Its peer
/// transport runs on `runtime`.
pub fn start(config: CoreConfig, runtime: tokio::runtime::Handle) -> Result<Started> {
    let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
    let reports = tx.clone();
    let metrics = config.metrics.clone();
    let dialer = config.dialer.clone();
    let network = move |cluster_id, member_id| -> Arc<dyn transport::Network> {
        Arc::new(transport::Transport::new(
            runtime, cluster_id, member_id, reports, metrics, dialer,
        ))
    };
    let (init_tx, init_rx) = std::sync::mpsc::channel::<Result<(Arc<Shared>, u64)>>();
    let (done_tx, done) = oneshot::channel();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cpu = config.cpu.unwrap_or(cpus - 1).min(cpus - 1);
    let max_request_bytes = config.max_request_bytes;
    let spin = config.spin;
    let ticks = tick::Ticks::start(config.heartbeat)
        .map_err(|e| Error::io("starting thread", "keel-tick", e))?;
    let thread = std::thread::Builder::new()
        .name("keel-storage".into())
        // Applying a txn nested 128 deep recurses through the engine's apply.
        .stack_size(16 << 20)
        .spawn(move || {
            let result = (|| {
                let ex = glommio::LocalExecutorBuilder::new(glommio::Placement::Fixed(cpu))
                    .io_memory(1 << 20)
                    .spin_before_park(spin)
                    .name("keel-storage")
                    .make()
                    .map_err(|e| {
                        Error::InvalidArgument(format!("starting the storage core: {e}"))
                    })?;
                ex.run(async move {
                    let node = match node::Node::open(config, network).await {
                        Ok(node) => node,
                        Err(e) => {
                            let _ = init_tx.send(Err(e.clone()));
                            return Err(e);
                        }
                    };
                    let shared = node.shared().clone();
                    // The commit index the WAL recovered: applied before clients are served.
                    let committed = node.raw.raft.raft_log.committed;
                    let _ = init_tx.send(Ok((shared.clone(), committed)));
                    let result = node.run(rx, ticks).await;
                    shared.alive.store(false, Ordering::Release);
                    result
                })
            })();
            if let Err(e) = &result {
                tracing::error!(error = %e, "the storage core stopped");
            }
            let _ = done_tx.send(result);
        })
        .map_err(|e| Error::io("starting thread", "keel-storage", e))?;
    let (shared, committed) = match init_rx.recv() {
        Ok(r) => r?,
        Err(_) => return Err(Error::Stopped),
    };
    // As etcd serves clients only once it is ready: a restarted member first applies what its
    // WAL holds as committed (entries after the backend's last checkpoint), so that no read,
    // serializable ones included, sees the store from before writes it acknowledged.
    let mut done = done;
    let applied = shared.applied.load(Ordering::Acquire);
    if applied < committed {
        tracing::info!(
            applied,
            committed,
            "applying the WAL's committed entries before serving clients"
        );
    }
    while shared.applied.load(Ordering::Acquire) < committed {
        match done.try_recv() {
            Ok(result) => return Err(result.err().unwrap_or(Error::Stopped)),
            Err(oneshot::error::TryRecvError::Closed) => return Err(Error::Stopped),
            Err(oneshot::error::TryRecvError::Empty) => {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
    Ok(Started {
        core: Core {
            tx,
            shared,
            max_request_bytes,
        },
        done,
        thread,
    })
}
