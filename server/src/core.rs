//! The storage core: one thread, one pinned glommio executor, owning the raft node, the WAL and
//! the MVCC write path. Network threads talk to it through [`Core`], a `Send + Clone` handle, so
//! neither side knows the other's runtime.
//!
//! # The loop
//! Commands arrive on a bounded channel and are drained up to [`DRAIN`] at a time. One drain
//! becomes one batch of raft proposals; each raft `Ready` is persisted with one WAL append (one
//! write + one fdatasync, and group commit batches further); its committed entries are applied in
//! one backend transaction (each request keeps its own revision); then the replies go out. Linear-
//! izable reads queued in one drain share one raft ReadIndex. Ticks come from a timer at the
//! heartbeat interval.
//!
//! # Checkpoints
//! The backend is not synced per batch (the WAL is the durability point). Every
//! [`CHECKPOINT_ENTRIES`] entries or [`CHECKPOINT_INTERVAL`], the backend is synced, a snapshot
//! marker at the applied index is appended to the WAL, and the WAL segments before it are
//! released. On restart the backend's applied index says which WAL entries are already applied.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::Either;
use keel_engine::btree::BackendOptions;
use keel_engine::lease::Lessor;
use keel_engine::mvcc::Store;
use keel_engine::mvcc::apply as a;
use keel_engine::wal::{
    Metadata, RecordRef, SnapshotMarker, SyncObserver, Wal, WalOptions, WalStorage,
};
use keel_engine::{Error, Result};
use keel_proto::etcdserverpb as pb;
use prost::Message as _;
use raft::eraftpb::{ConfState, Entry, EntryType};
use raft::{RawNode, StateRole};
use tokio::sync::{mpsc, oneshot};

use crate::convert::{self, Header};
use crate::metrics::Metrics;
use crate::watch::Published;

/// How long the storage core polls for work (and I/O completions) before sleeping: a command or
/// an fdatasync completion arriving within it avoids the eventfd wake-up. 200 µs covers one
/// fdatasync on this hardware; measured: one-client put p50 0.25 ms with 50 µs, 0.21–0.23 ms
/// with 200 µs (`bench/RESULTS.md`). The price is up to 200 µs of CPU after each burst of work
/// on an otherwise idle member.
pub const SPIN_BEFORE_PARK: Duration = Duration::from_micros(200);

/// How often the leader looks for expired leases (etcd: 500 ms).
const LEASE_CHECK_INTERVAL: Duration = Duration::from_millis(500);
/// A proposed revocation not applied after this is proposed again.
const LEASE_REVOKE_RETRY: Duration = Duration::from_secs(3);
/// Leases per checkpoint proposal (etcd's `maxLeaseCheckpointBatchSize`).
const LEASE_CHECKPOINT_BATCH: usize = 1000;

/// Most commands taken per wake-up.
pub const DRAIN: usize = 256;
/// Entries between backend checkpoints.
pub const CHECKPOINT_ENTRIES: u64 = 10_000;
/// Longest time between backend checkpoints.
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(100);

/// What the storage core needs to start.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    pub data_dir: PathBuf,
    pub cluster_id: u64,
    pub member_id: u64,
    pub heartbeat: Duration,
    pub election_ticks: usize,
    /// CPU to pin the core to (`None`: the last one).
    pub cpu: Option<usize>,
    /// Largest request accepted, as encoded in a raft entry (etcd's `--max-request-bytes`).
    pub max_request_bytes: usize,
    /// Applied entries between backend checkpoints at most (etcd's `--snapshot-count`, capped at
    /// [`CHECKPOINT_ENTRIES`]).
    pub snapshot_count: u64,
    pub metrics: Arc<Metrics>,
    /// How often the leader records the leases' remaining TTLs.
    pub lease_checkpoint_interval: Duration,
    /// Where the changes of each applied revision go (every watch hub).
    pub watch_events: Vec<mpsc::UnboundedSender<Arc<Published>>>,
}

/// A write, as carried in a raft entry: etcd's own request messages.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Proposal {
    /// Matches the reply to the request (random per-process prefix + counter).
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(oneof = "Request", tags = "2, 3, 4, 5, 6, 7, 8")]
    pub request: Option<Request>,
}

/// The request of a proposal.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Request {
    #[prost(message, tag = "2")]
    Put(pb::PutRequest),
    #[prost(message, tag = "3")]
    DeleteRange(pb::DeleteRangeRequest),
    #[prost(message, tag = "4")]
    Txn(pb::TxnRequest),
    #[prost(message, tag = "5")]
    Compaction(pb::CompactionRequest),
    /// A grant; the ID is chosen (non-zero) before the proposal.
    #[prost(message, tag = "6")]
    LeaseGrant(pb::LeaseGrantRequest),
    #[prost(message, tag = "7")]
    LeaseRevoke(pb::LeaseRevokeRequest),
    #[prost(message, tag = "8")]
    LeaseCheckpoint(pb::LeaseCheckpointRequest),
}

/// The result of an applied write.
#[derive(Debug, Clone)]
pub enum Applied {
    Put(a::PutResponse),
    DeleteRange(a::DeleteRangeResponse),
    Txn(a::TxnResponse),
    /// A compaction; the store's revision when it was applied.
    Compaction(i64),
    /// A lease granted: its ID and TTL.
    LeaseGrant {
        id: i64,
        ttl: i64,
    },
    /// A lease revoked (its keys deleted in one revision).
    LeaseRevoke,
    LeaseCheckpoint,
}

type Reply<T> = oneshot::Sender<Result<T>>;

enum Command {
    Propose(Request, Reply<Applied>),
    ReadIndex(Reply<()>),
}

/// The handle network threads use. Cheap to clone.
#[derive(Clone)]
pub struct Core {
    tx: mpsc::Sender<Command>,
    store: Arc<Store>,
    term: Arc<AtomicU64>,
    /// Cluster and member ids.
    pub ids: (u64, u64),
    max_request_bytes: usize,
    metrics: Arc<Metrics>,
    lessor: Arc<Mutex<Lessor>>,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("ids", &self.ids)
            .finish_non_exhaustive()
    }
}

/// Locks the lessor; a panic elsewhere while holding it leaves consistent data (every update is
/// a single insert or remove), so poisoning is ignored.
fn lock(l: &Mutex<Lessor>) -> std::sync::MutexGuard<'_, Lessor> {
    l.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn stopped() -> Error {
    Error::InvalidArgument("the storage core has stopped".into())
}

impl Core {
    /// Starts the storage core thread and waits until it has recovered and is ready. The returned
    /// join handle ends when the core stops (with the error that stopped it, if any).
    pub fn start(config: CoreConfig) -> Result<(Core, std::thread::JoinHandle<Result<()>>)> {
        let (tx, rx) = mpsc::channel(4096);
        let (init_tx, init_rx) = std::sync::mpsc::channel();
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let cpu = config.cpu.unwrap_or(cpus - 1).min(cpus - 1);
        let ids = (config.cluster_id, config.member_id);
        let max_request_bytes = config.max_request_bytes;
        let metrics = config.metrics.clone();
        let thread = std::thread::Builder::new()
            .name("keel-storage".into())
            .spawn(move || -> Result<()> {
                let ex = glommio::LocalExecutorBuilder::new(glommio::Placement::Fixed(cpu))
                    .io_memory(1 << 20)
                    .spin_before_park(SPIN_BEFORE_PARK)
                    .name("keel-storage")
                    .make()
                    .map_err(|e| {
                        Error::InvalidArgument(format!("starting the storage core: {e}"))
                    })?;
                ex.run(async move {
                    match Storage::open(config).await {
                        Ok(storage) => {
                            let _ = init_tx.send(Ok((
                                storage.store.clone(),
                                storage.term.clone(),
                                storage.lessor.clone(),
                            )));
                            storage.run(rx).await
                        }
                        Err(e) => {
                            let _ = init_tx.send(Err(e.clone()));
                            Err(e)
                        }
                    }
                })
            })
            .map_err(|e| Error::io("starting thread", "keel-storage", e))?;
        let (store, term, lessor) = init_rx.recv().map_err(|_| stopped())??;
        Ok((
            Core {
                tx,
                store,
                term,
                ids,
                max_request_bytes,
                metrics,
                lessor,
            },
            thread,
        ))
    }

    /// The MVCC store, for reads.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// The member's metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The lease table (applied state; keep-alives renew it directly on the leader).
    pub fn lessor(&self) -> std::sync::MutexGuard<'_, Lessor> {
        lock(&self.lessor)
    }

    /// The response header fields of this member now.
    pub fn header(&self) -> Header {
        Header {
            cluster_id: self.ids.0,
            member_id: self.ids.1,
            raft_term: self.raft_term(),
        }
    }

    /// The current raft term.
    pub fn raft_term(&self) -> u64 {
        self.term.load(Ordering::Relaxed)
    }

    /// Proposes a write and waits until it is applied.
    pub async fn write(&self, request: Request) -> Result<Applied> {
        // The size of the raft entry it becomes (the longest id).
        let proposal = Proposal {
            id: u64::MAX,
            request: Some(request),
        };
        let size = proposal.encoded_len();
        if self.max_request_bytes > 0 && size > self.max_request_bytes {
            return Err(Error::RequestTooLarge);
        }
        let request = proposal.request.expect("set above");
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Propose(request, reply))
            .await
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }

    /// Waits until a read started now would see every write acknowledged before (raft ReadIndex).
    pub async fn linearizable(&self) -> Result<()> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::ReadIndex(reply))
            .await
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }
}

/// Stable 64-bit ids from names (FNV-1a): etcd derives member and cluster ids from the member's
/// peer URLs and the cluster token; any stable, non-zero id serves.
pub fn stable_id(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in part.bytes().chain(std::iter::once(0)) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h.max(1)
}

/// The state of the storage core thread.
struct Storage {
    node: RawNode<WalStorage>,
    wal: Wal,
    store: Arc<Store>,
    term: Arc<AtomicU64>,
    heartbeat: Duration,
    /// Replies awaited by proposal id.
    pending: HashMap<u64, Reply<Applied>>,
    /// Random per process, so entries replayed from an earlier run never match a new waiter.
    id_prefix: u64,
    next_id: u64,
    /// ReadIndex requests in flight by context, and read states waiting for `applied`.
    reads: HashMap<Vec<u8>, Vec<Reply<()>>>,
    next_read: u64,
    ready_reads: Vec<(u64, Vec<Reply<()>>)>,
    applied: u64,
    checkpointed: u64,
    checkpointed_at: Instant,
    checkpoint_entries: u64,
    metrics: Arc<Metrics>,
    leader: u64,
    lessor: Arc<Mutex<Lessor>>,
    /// Expired leases whose revocation was proposed, and when.
    revoking: HashMap<i64, Instant>,
    lease_checked_at: Instant,
    lease_checkpoint_interval: Duration,
    lease_checkpointed_at: Instant,
    watch_events: Vec<mpsc::UnboundedSender<Arc<Published>>>,
}

fn raft_err(e: raft::Error) -> Error {
    Error::InvalidArgument(format!("raft: {e}"))
}

impl Storage {
    async fn open(config: CoreConfig) -> Result<Storage> {
        let member = config.data_dir.join("member");
        let wal_dir = member.join("wal");
        let snap_dir = member.join("snap");
        std::fs::create_dir_all(&snap_dir).map_err(|e| Error::io("creating", &snap_dir, e))?;
        let store = Arc::new(Store::open(snap_dir.join("db"), BackendOptions::default())?);
        let wal_options = WalOptions {
            metadata: Metadata {
                cluster_id: config.cluster_id,
                member_id: config.member_id,
            },
            on_sync: Some({
                let metrics = config.metrics.clone();
                SyncObserver(Arc::new(move |d| Metrics::observe(&metrics.wal_fsync, d)))
            }),
            ..WalOptions::default()
        };
        let (wal, recovery) = Wal::open(&wal_dir, wal_options).await?;
        // etcd's minimum TTL: 1.5 election timeouts, in whole seconds (rounded up).
        let election = config.heartbeat * config.election_ticks.max(2) as u32;
        let min_ttl = (election.as_millis() * 3 / 2).div_ceil(1000) as i64;
        let lessor = Arc::new(Mutex::new(Lessor::recover(
            &store,
            min_ttl,
            Instant::now(),
        )?));
        let (applied, _) = store.consistent_index()?;
        if recovery.last_index == 0 && recovery.snapshot.index == 0 && recovery.hard_state.term == 0
        {
            // A new member: the initial membership, as a snapshot marker at index 0.
            let conf_state = ConfState {
                voters: vec![config.member_id],
                ..Default::default()
            };
            let marker = SnapshotMarker {
                index: 0,
                term: 0,
                conf_state,
            };
            wal.append(&[RecordRef::Snapshot(&marker)]).await?;
        }
        // Applied entries were committed; make the WAL's commit index say so, so that raft
        // accepts the backend's applied index.
        let mut hs = wal.hard_state();
        if applied > hs.commit && applied <= wal.last_index() {
            hs.commit = applied;
            wal.save(&[], Some(&hs)).await?;
        }
        let applied = applied.min(hs.commit).max(wal.first_index() - 1);
        let raft_config = raft::Config {
            id: config.member_id,
            election_tick: config.election_ticks.max(2),
            heartbeat_tick: 1,
            applied,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            check_quorum: true,
            pre_vote: true,
            ..raft::Config::default()
        };
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let mut node = RawNode::new(&raft_config, wal.storage(), &logger).map_err(raft_err)?;
        let voters = node.raft.prs().conf().voters().ids().len();
        if voters == 1 {
            // The only voter: no need to wait for an election timeout.
            node.campaign().map_err(raft_err)?;
        }
        let id_prefix = (std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
            ^ u64::from(std::process::id()))
            << 24;
        Ok(Storage {
            node,
            wal,
            store,
            term: Arc::new(AtomicU64::new(0)),
            heartbeat: config.heartbeat,
            pending: HashMap::new(),
            id_prefix,
            next_id: 0,
            reads: HashMap::new(),
            next_read: 0,
            ready_reads: Vec::new(),
            applied,
            checkpointed: applied,
            checkpointed_at: Instant::now(),
            checkpoint_entries: config.snapshot_count.clamp(1, CHECKPOINT_ENTRIES),
            metrics: config.metrics,
            leader: 0,
            lessor,
            revoking: HashMap::new(),
            lease_checked_at: Instant::now(),
            lease_checkpoint_interval: config.lease_checkpoint_interval,
            lease_checkpointed_at: Instant::now(),
            watch_events: config.watch_events,
        })
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Command>) -> Result<()> {
        let mut buf = Vec::with_capacity(DRAIN);
        let mut last_tick = Instant::now();
        self.process_ready().await?;
        loop {
            let wait = self.heartbeat.saturating_sub(last_tick.elapsed());
            let received = {
                let recv = std::pin::pin!(rx.recv_many(&mut buf, DRAIN));
                let tick = std::pin::pin!(glommio::timer::sleep(wait));
                match futures::future::select(recv, tick).await {
                    Either::Left((n, _)) => Some(n),
                    Either::Right(_) => None,
                }
            };
            if received == Some(0) {
                // Every handle is gone: shut down.
                break;
            }
            if last_tick.elapsed() >= self.heartbeat {
                self.node.tick();
                last_tick = Instant::now();
            }
            let mut readers = Vec::new();
            for command in buf.drain(..) {
                match command {
                    Command::Propose(request, reply) => self.propose(request, Some(reply)),
                    Command::ReadIndex(reply) => readers.push(reply),
                }
            }
            self.lease_maintenance();
            if !readers.is_empty() {
                self.next_read += 1;
                let ctx = self.next_read.to_le_bytes().to_vec();
                self.node.read_index(ctx.clone());
                self.reads.insert(ctx, readers);
            }
            self.process_ready().await?;
            self.maybe_checkpoint().await?;
        }
        self.checkpoint().await?;
        self.wal.close().await
    }

    /// Expiry and checkpoints of leases, on the leader: expired leases are revoked through raft
    /// (etcd checks every 500 ms), and so are the stale stored TTLs of renewed leases cleared;
    /// every checkpoint interval the remaining TTLs are recorded.
    fn lease_maintenance(&mut self) {
        if self.node.raft.state != StateRole::Leader {
            return;
        }
        let now = Instant::now();
        if now.duration_since(self.lease_checked_at) >= LEASE_CHECK_INTERVAL {
            self.lease_checked_at = now;
            let (expired, stale) = {
                let lessor = lock(&self.lessor);
                (lessor.expired(now), lessor.stale_checkpoints())
            };
            // A revocation not applied within the retry time (a lost proposal) is proposed again.
            self.revoking.retain(|id, at| {
                expired.contains(id) && now.duration_since(*at) < LEASE_REVOKE_RETRY
            });
            for id in expired {
                if let std::collections::hash_map::Entry::Vacant(e) = self.revoking.entry(id) {
                    e.insert(now);
                    self.propose(Request::LeaseRevoke(pb::LeaseRevokeRequest { id }), None);
                }
            }
            // Renewed since their last checkpoint: a checkpoint of 0 clears the stored TTL, as
            // etcd does on the first renewal after a checkpoint.
            self.propose_checkpoints(
                stale
                    .into_iter()
                    .map(|id| pb::LeaseCheckpoint {
                        id,
                        remaining_ttl: 0,
                    })
                    .collect(),
            );
        }
        if !self.lease_checkpoint_interval.is_zero()
            && now.duration_since(self.lease_checkpointed_at) >= self.lease_checkpoint_interval
        {
            self.lease_checkpointed_at = now;
            let checkpoints: Vec<pb::LeaseCheckpoint> = lock(&self.lessor)
                .leases()
                .iter()
                .map(|l| pb::LeaseCheckpoint {
                    id: l.id,
                    remaining_ttl: l.remaining(now).as_secs_f64().ceil() as i64,
                })
                .filter(|c| c.remaining_ttl > 0)
                .collect();
            self.propose_checkpoints(checkpoints);
        }
    }

    fn propose_checkpoints(&mut self, checkpoints: Vec<pb::LeaseCheckpoint>) {
        for batch in checkpoints.chunks(LEASE_CHECKPOINT_BATCH) {
            let request = pb::LeaseCheckpointRequest {
                checkpoints: batch.to_vec(),
            };
            self.propose(Request::LeaseCheckpoint(request), None);
        }
    }

    fn propose(&mut self, request: Request, reply: Option<Reply<Applied>>) {
        if self.node.raft.state != StateRole::Leader {
            self.metrics.proposals_failed.inc();
            if let Some(reply) = reply {
                let _ = reply.send(Err(Error::NoLeader));
            }
            return;
        }
        self.next_id += 1;
        let id = self.id_prefix | (self.next_id & ((1 << 24) - 1));
        let data = Proposal {
            id,
            request: Some(request),
        }
        .encode_to_vec();
        match self.node.propose(Vec::new(), data) {
            Ok(()) => {
                if let Some(reply) = reply {
                    self.pending.insert(id, reply);
                }
            }
            Err(e) => {
                self.metrics.proposals_failed.inc();
                if let Some(reply) = reply {
                    let _ = reply.send(Err(raft_err(e)));
                }
            }
        }
    }

    async fn process_ready(&mut self) -> Result<()> {
        while self.node.has_ready() {
            let mut rd = self.node.ready();
            if let Some(ss) = rd.ss() {
                tracing::info!(state = ?ss.raft_state, leader = ss.leader_id, "raft state changed");
                let m = &self.metrics;
                m.has_leader
                    .set(i64::from(ss.leader_id != raft::INVALID_ID));
                m.is_leader
                    .set(i64::from(ss.raft_state == StateRole::Leader));
                if ss.leader_id != raft::INVALID_ID && ss.leader_id != self.leader {
                    m.leader_changes.inc();
                }
                if ss.raft_state == StateRole::Leader {
                    // A new leader gives every lease its whole (remaining) TTL, as etcd.
                    lock(&self.lessor).promote(Instant::now());
                }
                self.leader = ss.leader_id;
            }
            let committed = rd.take_committed_entries();
            self.apply(committed).await?;
            let hs = rd.hs().cloned();
            if !rd.entries().is_empty() || hs.is_some() {
                self.wal.save(rd.entries(), hs.as_ref()).await?;
            }
            if let Some(hs) = &hs {
                self.term.store(hs.term, Ordering::Relaxed);
            }
            for rs in rd.take_read_states() {
                if let Some(waiters) = self.reads.remove(&rs.request_ctx) {
                    self.ready_reads.push((rs.index, waiters));
                }
            }
            // A single member sends nothing; peers come with replication.
            let mut light = self.node.advance(rd);
            self.apply(light.take_committed_entries()).await?;
            self.node.advance_apply();
            self.serve_reads();
            let m = &self.metrics;
            m.proposals_committed
                .set(i64::try_from(self.node.raft.raft_log.committed).unwrap_or(i64::MAX));
            m.proposals_applied
                .set(i64::try_from(self.applied).unwrap_or(i64::MAX));
            m.proposals_pending.set(self.pending.len() as i64);
            m.wal_write_bytes
                .set(i64::try_from(self.wal.stats().bytes_written).unwrap_or(i64::MAX));
        }
        Ok(())
    }

    fn serve_reads(&mut self) {
        let applied = self.applied;
        self.ready_reads.retain_mut(|(index, waiters)| {
            if *index > applied {
                return true;
            }
            for w in waiters.drain(..) {
                let _ = w.send(Ok(()));
            }
            false
        });
    }

    /// Applies committed entries: one backend transaction for the batch, one revision per
    /// request; replies after the commit.
    async fn apply(&mut self, entries: Vec<Entry>) -> Result<()> {
        let Some(last) = entries.last() else {
            return Ok(());
        };
        let (last_index, last_term) = (last.index, last.term);
        let mut replies: Vec<(Reply<Applied>, Result<Applied>)> = Vec::new();
        let lessor_lock = self.lessor.clone();
        let mut lessor = lock(&lessor_lock);
        let mut published = Vec::new();
        let mut w = Some(self.store.write()?);
        for e in entries {
            if e.get_entry_type() != EntryType::EntryNormal || e.data.is_empty() {
                // The leader's empty entry; membership changes come with replication.
                continue;
            }
            let proposal = Proposal::decode(e.data.as_ref()).map_err(|err| {
                Error::InvalidArgument(format!("undecodable entry {}: {err}", e.index))
            })?;
            let txn = w.as_mut().expect("open");
            let result = match proposal.request {
                Some(Request::Put(r)) => {
                    a::put(txn, &convert::put_request(r), &*lessor).map(Applied::Put)
                }
                Some(Request::DeleteRange(r)) => {
                    a::delete_range(txn, &convert::delete_request(r)).map(Applied::DeleteRange)
                }
                Some(Request::Txn(t)) => match convert::txn_request(t) {
                    Ok(t) => a::txn_in(txn, &t, &*lessor).map(Applied::Txn),
                    Err(status) => Err(Error::InvalidArgument(status.message().to_string())),
                },
                Some(Request::Compaction(c)) => {
                    // Compaction runs its own backend transactions: commit the batch so far. The
                    // lessor is released meanwhile: keep-alives must not wait for a long
                    // compaction (their leases would expire behind the lock).
                    w.take().expect("open").end(Some((e.index - 1, e.term)))?;
                    drop(lessor);
                    let result = self
                        .store
                        .compact(c.revision)
                        .map(|()| Applied::Compaction(self.store.current_revision()));
                    lessor = lock(&lessor_lock);
                    w = Some(self.store.write()?);
                    result
                }
                Some(Request::LeaseGrant(g)) => lessor
                    .grant(txn, g.id, g.ttl, Instant::now())
                    .map(|ttl| Applied::LeaseGrant { id: g.id, ttl }),
                Some(Request::LeaseRevoke(r)) => {
                    self.revoking.remove(&r.id);
                    lessor.revoke(txn, r.id).map(|()| Applied::LeaseRevoke)
                }
                Some(Request::LeaseCheckpoint(c)) => c
                    .checkpoints
                    .iter()
                    .try_for_each(|cp| lessor.checkpoint(txn, cp.id, cp.remaining_ttl))
                    .map(|()| Applied::LeaseCheckpoint),
                None => Err(Error::InvalidArgument("empty proposal".into())),
            };
            if let Some(txn) = w.as_mut() {
                let changes = txn.finish_revision();
                lessor.apply_changes(&changes);
                if let Some(first) = changes.first() {
                    published.push(Published {
                        revision: first.kv.mod_revision,
                        changes,
                    });
                }
            }
            if let Some(reply) = self.pending.remove(&proposal.id) {
                replies.push((reply, result));
            }
        }
        w.take().expect("open").end(Some((last_index, last_term)))?;
        drop(lessor);
        self.applied = last_index;
        // Committed and readable: watchers may see these revisions now.
        if !self.watch_events.is_empty() {
            for p in published {
                let p = Arc::new(p);
                for hub in &self.watch_events {
                    let _ = hub.send(p.clone());
                }
            }
        }
        for (reply, result) in replies {
            let _ = reply.send(result);
        }
        Ok(())
    }

    async fn maybe_checkpoint(&mut self) -> Result<()> {
        let behind = self.applied - self.checkpointed;
        if behind >= self.checkpoint_entries
            || (behind > 0 && self.checkpointed_at.elapsed() >= CHECKPOINT_INTERVAL)
        {
            self.checkpoint().await?;
        }
        Ok(())
    }

    /// Syncs the backend, then lets the WAL drop what the backend now holds.
    async fn checkpoint(&mut self) -> Result<()> {
        self.checkpointed_at = Instant::now();
        if self.applied == self.checkpointed {
            return Ok(());
        }
        let started = Instant::now();
        self.store.sync()?;
        Metrics::observe(&self.metrics.backend_commit, started.elapsed());
        let index = self.applied;
        let term = raft::Storage::term(&self.wal.storage(), index).map_err(raft_err)?;
        let conf_state = self.node.raft.prs().conf().to_conf_state();
        let marker = SnapshotMarker {
            index,
            term,
            conf_state,
        };
        self.wal.append(&[RecordRef::Snapshot(&marker)]).await?;
        self.wal.release(index + 1).await?;
        self.checkpointed = index;
        Ok(())
    }
}
