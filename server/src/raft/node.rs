//! The raft node of the storage core and its loop (see the parent module for the overview).
//!
//! # Persistence is asynchronous
//! A `Ready`'s entries and hard state are appended to the WAL (which places them in its
//! in-memory log at once, so raft reads them back) and the loop moves on; the append's future
//! joins [`Node::persisting`]. When it resolves, the messages raft held until persistence (a
//! follower's acknowledgements, votes) are sent and raft is told (`on_persist_ready`). Committed
//! entries raft hands out are always persisted already. So ticks, heartbeats and reads never
//! wait for an fdatasync: a slow disk does not cause elections.
//!
//! # Checkpoints and the WAL
//! The backend is not synced per batch: the WAL is the durability point. Every
//! [`CHECKPOINT_ENTRIES`] entries or [`CHECKPOINT_INTERVAL`], the backend is synced on the
//! `keel-sync` thread. Once the backend is durable at index `d`, the raft log may be compacted
//! up to `d` minus the catch-up entries that slow followers may still need: a snapshot marker is
//! appended to the WAL (every `--snapshot-count` entries) and the segments before it are released
//! in a background task. On restart raft starts at the backend's applied index, so replay skips
//! what is applied.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::Poll;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use futures::channel::oneshot as foneshot;
use keel_engine::btree::BackendOptions;
use keel_engine::lease::Lessor;
use keel_engine::mvcc::kvstore::META_BUCKET;
use keel_engine::mvcc::{Compaction, Store};
use keel_engine::wal::{Metadata, RecordRef, SnapshotMarker, SyncObserver, Wal, WalOptions};
use keel_engine::{Error, Result};
use keel_proto::etcdserverpb as pb;
use protobuf::Message as _;
use raft::eraftpb::{
    ConfChange, ConfChangeType, ConfState, Entry, EntryType, Message, MessageType, Snapshot,
};
use raft::{RawNode, SnapshotStatus, StateRole};
use tokio::sync::mpsc;

use super::checkpoint::Checkpointer;
use super::events::Feed;
use super::proposal::{MemberAttributes, Proposal, Request};
use super::storage::{RaftStorage, SnapshotMeta};
use super::transport::{Network, Report};
use super::{Applied, Command, DRAIN, Reply, Shared, lock};
use crate::membership::{MEMBERS_BUCKET, MEMBERS_REMOVED_BUCKET, Member, Members};
use crate::metrics::Metrics;

/// How often the leader looks for expired leases (etcd: 500 ms).
const LEASE_CHECK_INTERVAL: Duration = Duration::from_millis(500);
/// Expired leases revoked per check at most: 1000 a second, etcd's `leaseRevokeRate`.
const LEASE_REVOKES_PER_CHECK: usize = 500;
/// Leases per checkpoint proposal (etcd's `maxLeaseCheckpointBatchSize`).
const LEASE_CHECKPOINT_BATCH: usize = 1000;
/// Remaining TTLs checkpointed per check at most: 1000 a second, etcd's `leaseCheckpointRate`;
/// a checkpoint interval's worth is spread over the checks that follow it.
const LEASE_CHECKPOINTS_PER_CHECK: usize = 500;

/// Entries between backend checkpoints at most.
pub const CHECKPOINT_ENTRIES: u64 = 10_000;
/// Longest time between backend checkpoints.
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(100);
/// The backend's key for the membership at its applied index (raft's `ConfState`, protobuf).
pub const CONF_STATE_KEY: &[u8] = b"confState";
/// Largest record the WAL takes: the largest `--max-request-bytes` plus room for the entry's
/// own fields.
pub const WAL_MAX_RECORD: usize = 16 << 20;
/// The largest `--max-request-bytes` accepted (a request must fit one WAL record).
pub const MAX_REQUEST_BYTES_LIMIT: usize = WAL_MAX_RECORD - (64 << 10);

/// What the storage core needs to start.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    pub data_dir: PathBuf,
    /// IDs for a new data dir (an existing one keeps those in its WAL).
    pub cluster_id: u64,
    pub member_id: u64,
    /// The initial members of a new cluster (their IDs are the initial voters); empty for a
    /// member joining a running cluster.
    pub initial_members: Vec<Member>,
    /// A joining member: the cluster's members as a running member listed them (until the
    /// leader's log or a snapshot gives this member its own view).
    pub known_members: Vec<Member>,
    /// This member's name and client URLs, published to the cluster through raft.
    pub name: String,
    pub client_urls: Vec<String>,
    pub heartbeat: Duration,
    pub election_ticks: usize,
    /// CPU to pin the core to (`None`: the last one).
    pub cpu: Option<usize>,
    /// How long the core polls for work before it sleeps (`--storage-core-spin`).
    pub spin: Duration,
    /// Largest request accepted, as encoded in a raft entry (etcd's `--max-request-bytes`).
    pub max_request_bytes: usize,
    /// Entries applied between raft log compactions (etcd's `--snapshot-count`).
    pub snapshot_count: u64,
    /// Entries kept in the log behind a compaction for slow followers (etcd's
    /// `--experimental-snapshot-catchup-entries`).
    pub snapshot_catchup_entries: u64,
    pub metrics: Arc<Metrics>,
    /// How often the leader records the leases' remaining TTLs.
    pub lease_checkpoint_interval: Duration,
    /// Where the changes of each applied revision go (every watch hub).
    pub feeds: Vec<Arc<Feed>>,
    /// Faults to inject (tests).
    pub faults: crate::faults::Faults,
    /// Size of each WAL segment file (64 MiB normally; tests use smaller ones).
    pub wal_segment_size: u64,
    /// How the member reaches its peers (TLS for `https` peer URLs).
    pub dialer: crate::tls::dial::Dialer,
    /// How long a simple token lives after its last use (`--auth-token-ttl`).
    pub auth_token_ttl: Duration,
    /// `--force-new-cluster`: a restarting member commits its whole WAL and removes every other
    /// member, becoming a one-member cluster with its data, IDs and history.
    pub force_new_cluster: bool,
    /// Tests only: a fixed election timeout in ticks instead of raft's randomized one, so that
    /// a seeded run replays exactly.
    pub fixed_election_tick: Option<usize>,
    /// `--wal-dir`: the WAL's own directory (`None`: `<data-dir>/member/wal`).
    pub wal_dir: Option<PathBuf>,
    /// `--pre-vote`: raft's PreVote phase (Keel's default: on).
    pub pre_vote: bool,
}

impl CoreConfig {
    /// etcd's election timeout.
    pub fn election_timeout(&self) -> Duration {
        self.heartbeat * self.election_ticks.max(2) as u32
    }

    /// etcd's `ReqTimeout`: 5 s plus two election timeouts.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(5) + 2 * self.election_timeout()
    }
}

/// A proposal awaiting its entry's apply.
pub(super) struct Pending {
    pub reply: Reply<Applied>,
    pub proposed: Instant,
}

/// Linearizable reads: a ReadIndex request in flight serves every read queued with it.
struct ReadBatch {
    waiters: Vec<Reply<()>>,
    started: Instant,
    /// When the request was last given to raft: raft drops it silently if the leader has not
    /// yet committed an entry of its term (or no leader is known), so it is given again (etcd
    /// retries every 500 ms, and when the leader's first entry commits).
    issued: Instant,
}

/// How long a ReadIndex waits for its read state before it is asked again (etcd's
/// `readIndexRetryTime`).
const READ_INDEX_RETRY: Duration = Duration::from_millis(500);

/// An append to the WAL in flight.
struct InFlight {
    number: u64,
    durable: Pin<Box<dyn Future<Output = Result<()>>>>,
    /// Messages raft may only send once this `Ready` is persisted.
    messages: Vec<Message>,
}

/// A compaction in progress; physical compactions' waiters are answered when it finishes.
pub(super) struct CompactionJob {
    pub job: Compaction,
    pub waiters: Vec<(Reply<Applied>, Applied)>,
}

/// The storage core's state.
pub(crate) struct Node {
    pub(super) raw: RawNode<RaftStorage>,
    pub(super) wal: Wal,
    pub(super) shared: Arc<Shared>,
    /// The current store (also in `shared`).
    pub(super) store: Arc<Store>,
    /// Applied index, term and membership: what a snapshot would carry.
    pub(super) applied_meta: Rc<RefCell<SnapshotMeta>>,
    pub(super) cfg: CoreConfig,
    /// Proposals of this member awaiting apply, by ID.
    pub(super) pending: HashMap<u64, Pending>,
    reads: HashMap<Vec<u8>, ReadBatch>,
    next_read: u64,
    /// Reads whose index is known, waiting for the apply to reach it.
    ready_reads: Vec<(u64, Vec<Reply<()>>)>,
    persisting: VecDeque<InFlight>,
    /// The backend's applied index.
    pub(super) applied: u64,
    checkpointer: Checkpointer,
    checkpoint_rx: Option<foneshot::Receiver<Result<(u64, u64)>>>,
    /// Applied index known durable in the backend.
    checkpointed: u64,
    checkpointed_at: Instant,
    /// Index of the WAL's snapshot marker: raft's log starts after it.
    marker: u64,
    releasing: Option<glommio::task::JoinHandle<Result<usize>>>,
    pub(super) compaction: Option<CompactionJob>,
    /// Set when an apply met a leader's first (empty) entry of its term: reads raft dropped
    /// before it committed are asked again.
    pub(super) term_started: bool,
    /// Expired leases whose revocation was proposed, and when.
    pub(super) revoking: HashMap<i64, Instant>,
    lease_checked_at: Instant,
    lease_checkpointed_at: Instant,
    /// Leases whose remaining TTL is due to be checkpointed, a bounded number per check.
    checkpoint_due: Vec<i64>,
    /// This member expires and checkpoints leases: it leads, and has applied its first entry
    /// of the term (etcd's primary lessor, promoted then). Until that entry is applied, its
    /// lease table may miss revocations and checkpoints committed under the old leader, and
    /// its expiries are a follower's (never renewed by keep-alives, which went to the leader).
    pub(super) lease_primary: bool,
    /// Proposals made while no leader is known, with when they were made: proposed once one
    /// is, or answered etcd's deadline error after the request timeout (etcd's raft node holds
    /// a proposal until there is a leader). Bounded by the proposal bytes `Core::write` admits.
    leaderless: VecDeque<(Instant, ProposalBatch)>,
    leader: u64,
    leader_changed_at: Instant,
    /// IDs of proposals the core makes itself (lease upkeep).
    next_internal: u64,
    /// Where raft messages go.
    pub(super) network: Arc<dyn Network>,
    /// Snapshots received and not yet installed, by index: the file and the waiting call.
    received: HashMap<u64, (PathBuf, Reply<()>)>,
    /// Whether this member's attributes are in the applied membership; when they were last
    /// proposed.
    pub(super) published: bool,
    publish_at: Instant,
    /// A stop in progress: leadership is being handed over until this deadline.
    stopping: Option<Instant>,
    /// etcd's minimum lease TTL (for rebuilding the lessor after a snapshot).
    min_ttl: i64,
    snap_dir: PathBuf,
    /// This member was removed from the cluster: it stops (handing leadership over first).
    pub(super) removed: bool,
    /// When this member saw its removal (it stops a moment later).
    removed_at: Option<Instant>,
    /// Campaign at once once the configuration says this member is the only voter.
    campaign_alone: bool,
    /// The membership the applied log built (`shared.members` is what is listed and served).
    pub(super) members: Members,
}

/// The message `RawNode::propose` steps, with an entry per proposal instead of one.
fn propose_message(from: u64, data: Vec<Vec<u8>>) -> Message {
    let entries: Vec<Entry> = data
        .into_iter()
        .map(|d| Entry {
            data: d.into(),
            ..Entry::default()
        })
        .collect();
    let mut m = Message::default();
    m.set_msg_type(MessageType::MsgPropose);
    m.from = from;
    m.set_entries(entries.into());
    m
}

/// The context of a ReadIndex request: unique in the cluster, as raft-rs keys the leader's
/// pending reads by context alone (a collision drops a read, or lets one read's quorum of
/// heartbeat answers acknowledge another): the member's ID, then its count of reads, which
/// starts from the process's own prefix.
fn read_context(member_id: u64, n: u64) -> Vec<u8> {
    let mut ctx = Vec::with_capacity(16);
    ctx.extend_from_slice(&member_id.to_le_bytes());
    ctx.extend_from_slice(&n.to_le_bytes());
    ctx
}

/// Proposals drained together: ID, encoded proposal, and who waits for it (none for the
/// core's own).
pub(super) type ProposalBatch = Vec<(u64, Vec<u8>, Option<Reply<Applied>>)>;

/// Data proposed to raft in one step at most (unless one proposal is larger): raft-rs's
/// `max_size_per_msg`, so a follower's forwarded batch is no larger than an append.
const PROPOSAL_BATCH_BYTES: usize = 1 << 20;

/// Pushes `m` onto `out`, a `MsgAppend` carrying more than `max_bytes` of entries as several
/// consecutive appends of at most `max_bytes` each (or one entry, if larger).
///
/// raft-rs's `batch_append` merges every append made to a follower before the next `Ready`
/// into one message without a size bound: after a lagging follower's probe succeeds, the
/// leader reads up to `max_inflight_msgs` × `max_size_per_msg` of entries into one message,
/// past the peer transport's message limit. The pieces are what raft would have sent without
/// merging: each one's `index` and `log_term` name the entry before its first, and each
/// carries the commit index (a follower commits no further than the last entry it appended).
fn split_append(mut m: Message, max_bytes: usize, out: &mut Vec<Message>) {
    let size = |e: &raft::eraftpb::Entry| e.data.len() + e.context.len();
    if m.get_msg_type() != MessageType::MsgAppend
        || m.entries.iter().map(size).sum::<usize>() <= max_bytes
    {
        out.push(m);
        return;
    }
    let entries: Vec<raft::eraftpb::Entry> = m.take_entries().into();
    let (mut index, mut log_term) = (m.index, m.log_term);
    let mut rest = entries.into_iter().peekable();
    while rest.peek().is_some() {
        let mut piece = Vec::new();
        let mut bytes = 0;
        while let Some(e) = rest.next_if(|e| piece.is_empty() || bytes + size(e) <= max_bytes) {
            bytes += size(&e);
            piece.push(e);
        }
        let last = piece.last().expect("at least one entry per piece");
        let (next_index, next_term) = (last.index, last.term);
        let mut part = m.clone();
        part.index = index;
        part.log_term = log_term;
        part.set_entries(piece.into());
        out.push(part);
        (index, log_term) = (next_index, next_term);
    }
}

/// raft-rs's configuration of member `member_id`, whose backend has applied `applied`, from
/// the member's election settings.
fn raft_config(
    member_id: u64,
    applied: u64,
    election_ticks: usize,
    pre_vote: bool,
    fixed_election_tick: Option<usize>,
) -> raft::Config {
    raft::Config {
        id: member_id,
        election_tick: election_ticks.max(2),
        heartbeat_tick: 1,
        applied,
        max_size_per_msg: PROPOSAL_BATCH_BYTES as u64,
        max_inflight_msgs: 256,
        // Proposals stepped before the next `Ready` (a drain of client writes, the
        // proposals a follower forwards in one batch) travel in one MsgApp per follower,
        // not one each; a commit index raised meanwhile rides in it too. So a follower
        // answers one MsgAppResp per batch, and the leader steps one.
        batch_append: true,
        check_quorum: true,
        pre_vote,
        min_election_tick: fixed_election_tick.unwrap_or(0),
        max_election_tick: fixed_election_tick.map_or(0, |t| t + 1),
        ..raft::Config::default()
    }
}

fn raft_err(e: raft::Error) -> Error {
    Error::InvalidArgument(format!("raft: {e}"))
}

/// Creates `path` (and parents) with mode 0700, as etcd does.
pub fn private_dir(path: &std::path::Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(|e| Error::io("creating", path, e))
}

/// etcd's `--force-new-cluster`, on a restarting member: every entry of the WAL is committed
/// (as etcd forces), and one `RemoveNode` per other member is appended after them and committed
/// too. Applying them on start leaves this member the only voter, with its data, cluster and
/// member IDs and history; it then elects itself. The members to remove are those of the
/// backend (as of the applied index) and of raft's configuration, and any added by committed
/// entries not applied yet.
async fn force_new_cluster(
    wal: &Wal,
    store: &Store,
    conf_state: &ConfState,
    applied: u64,
    member_id: u64,
) -> Result<()> {
    let mut others: std::collections::BTreeSet<u64> =
        load_members(store)?.members.keys().copied().collect();
    others.extend(conf_state.voters.iter().chain(&conf_state.learners));
    let last = wal.last_index();
    let storage = wal.storage();
    if last > applied {
        let entries = raft::Storage::entries(
            &storage,
            applied + 1,
            last + 1,
            None,
            raft::GetEntriesContext::empty(false),
        )
        .map_err(raft_err)?;
        for e in entries {
            if e.get_entry_type() == EntryType::EntryConfChange
                && let Ok(cc) = ConfChange::parse_from_bytes(&e.data)
                && matches!(
                    cc.get_change_type(),
                    ConfChangeType::AddNode | ConfChangeType::AddLearnerNode
                )
            {
                others.insert(cc.node_id);
            }
        }
    }
    others.remove(&member_id);
    let mut hs = wal.hard_state();
    let term = hs
        .term
        .max(raft::Storage::term(&storage, last).unwrap_or(0));
    let mut entries = Vec::new();
    for (i, id) in others.iter().enumerate() {
        let mut cc = ConfChange::default();
        cc.set_change_type(ConfChangeType::RemoveNode);
        cc.node_id = *id;
        let mut e = raft::eraftpb::Entry::default();
        e.set_entry_type(EntryType::EntryConfChange);
        e.term = term;
        e.index = last + 1 + i as u64;
        e.data = cc
            .write_to_bytes()
            .map_err(|e| Error::InvalidArgument(e.to_string()))?
            .into();
        entries.push(e);
    }
    hs.term = term;
    hs.commit = last + entries.len() as u64;
    tracing::warn!(
        committed = hs.commit,
        removed = ?others.iter().map(|id| format!("{id:x}")).collect::<Vec<_>>(),
        "forcing a new one-member cluster (--force-new-cluster): every WAL entry committed, the \
         other members removed"
    );
    wal.save(&entries, Some(&hs)).await
}

/// Writes a new member's first WAL records: an empty snapshot marker (index 0), then etcd's
/// bootstrap entries of a new cluster (`raft.Bootstrap`): one `ConfChangeAddNode` per initial
/// member at indexes 1..n, term 1, committed, in ID order, the member's JSON as context. With
/// no initial members (a member joining a running cluster), the marker alone. `keelctl
/// snapshot restore` writes the same, so that a restored member starts as the cluster it names.
pub async fn write_bootstrap(wal: &Wal, initial: &[Member]) -> Result<()> {
    let marker = SnapshotMarker::default();
    wal.append(&[RecordRef::Snapshot(&marker)]).await?;
    let mut initial = initial.to_vec();
    initial.sort_by_key(|m| m.id);
    if initial.is_empty() {
        return Ok(());
    }
    let mut entries = Vec::new();
    for (i, m) in initial.iter().enumerate() {
        let mut cc = ConfChange::default();
        cc.set_change_type(ConfChangeType::AddNode);
        cc.node_id = m.id;
        cc.context = m.to_json().into();
        let data = cc
            .write_to_bytes()
            .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        let mut e = raft::eraftpb::Entry::default();
        e.set_entry_type(EntryType::EntryConfChange);
        e.term = 1;
        e.index = i as u64 + 1;
        e.data = data.into();
        entries.push(e);
    }
    let hs = raft::eraftpb::HardState {
        term: 1,
        vote: 0,
        commit: initial.len() as u64,
        ..Default::default()
    };
    wal.save(&entries, Some(&hs)).await
}

impl Node {
    pub(super) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Opens the data dir: recovers the backend and the WAL, checks that they agree, and
    /// bootstraps a new member.
    pub(super) async fn open(
        cfg: CoreConfig,
        network: impl FnOnce(u64, u64) -> Arc<dyn Network>,
    ) -> Result<Node> {
        let member = cfg.data_dir.join("member");
        let wal_dir = cfg.wal_dir.clone().unwrap_or_else(|| member.join("wal"));
        let snap_dir = member.join("snap");
        private_dir(&wal_dir)?;
        private_dir(&snap_dir)?;
        remove_partial_snapshots(&snap_dir)?;
        let wal_options = WalOptions {
            metadata: Metadata {
                cluster_id: cfg.cluster_id,
                member_id: cfg.member_id,
            },
            max_record_size: WAL_MAX_RECORD.min((cfg.wal_segment_size as usize - (8 << 10)) / 2),
            segment_size: cfg.wal_segment_size,
            sync_fault: cfg.faults.wal_sync_fault(),
            on_sync: Some({
                let metrics = cfg.metrics.clone();
                SyncObserver(Arc::new(move |d| {
                    Metrics::observe(&metrics.wal_fsync, d);
                    if d >= Duration::from_secs(1) {
                        tracing::warn!(took = ?d, expected_duration = "1s", "slow fdatasync");
                    }
                }))
            }),
            ..WalOptions::default()
        };
        let (wal, recovery) = Wal::open(&wal_dir, wal_options).await?;
        let db = snap_dir.join("db");
        // A snapshot install interrupted after the WAL recorded it: finish it.
        let installed = snap_dir.join(format!("{:016x}.snap.db", recovery.snapshot.index));
        if recovery.snapshot.index > 0 && installed.exists() {
            let behind = match Store::open(&db, BackendOptions::default()) {
                Ok(s) => s.consistent_index()?.0 < recovery.snapshot.index,
                Err(_) => true,
            };
            if behind {
                tracing::info!(
                    index = recovery.snapshot.index,
                    "finishing an interrupted snapshot install"
                );
                std::fs::rename(&installed, &db)
                    .map_err(|e| Error::io("renaming", &installed, e))?;
                sync_dir(&snap_dir)?;
            } else {
                let _ = std::fs::remove_file(&installed);
            }
        }
        let store = Arc::new(Store::open(&db, BackendOptions::default())?);
        let (mut applied, mut applied_term) = store.consistent_index()?;
        let fresh = recovery.last_index == 0
            && recovery.snapshot.index == 0
            && recovery.hard_state.term == 0;
        let conf_state = if fresh {
            if applied != 0 {
                return Err(Error::InvalidArgument(format!(
                    "the backend {} has applied raft index {applied} but the WAL in {} is empty: \
                     the WAL was lost; restore the member from a snapshot or remove its data dir \
                     and add it again",
                    snap_dir.join("db").display(),
                    wal_dir.display()
                )));
            }
            // A new member: etcd's bootstrap entries (see [`write_bootstrap`]). Every initial
            // member writes the same ones, and applying them builds the membership, in raft and
            // in the backend, exactly as a member added later is built; a member joining later
            // replays them from the leader's log (or gets a snapshot that holds their effect).
            write_bootstrap(&wal, &cfg.initial_members).await?;
            ConfState::default()
        } else {
            if applied < recovery.snapshot.index {
                return Err(Error::InvalidArgument(format!(
                    "the backend {} has applied raft index {applied}, behind the WAL's snapshot at \
                     index {} (the database file was deleted or rolled back): refusing to serve a \
                     partial dataset; restore the member from a snapshot",
                    snap_dir.join("db").display(),
                    recovery.snapshot.index
                )));
            }
            if applied > wal.last_index() {
                return Err(Error::InvalidArgument(format!(
                    "the backend {} has applied raft index {applied} but the WAL in {} ends at \
                     index {} (the WAL was truncated or rolled back): refusing to start",
                    snap_dir.join("db").display(),
                    wal_dir.display(),
                    wal.last_index()
                )));
            }
            match store.get_raw(META_BUCKET, CONF_STATE_KEY)? {
                Some(bytes) => ConfState::parse_from_bytes(&bytes)
                    .map_err(|e| Error::CorruptRecord(format!("meta bucket confState: {e}")))?,
                // Written before the membership was kept in the backend.
                None => recovery.snapshot.conf_state.clone(),
            }
        };
        if !fresh
            && recovery.metadata.member_id != 0
            && recovery.metadata.member_id != cfg.member_id
        {
            tracing::info!(
                member_id = format!("{:x}", recovery.metadata.member_id),
                "restarting with the IDs of the data dir (the --initial-* flags are ignored)"
            );
        }
        let (cluster_id, member_id) = if fresh || recovery.metadata.member_id == 0 {
            (cfg.cluster_id, cfg.member_id)
        } else {
            (recovery.metadata.cluster_id, recovery.metadata.member_id)
        };
        if cfg.force_new_cluster && !fresh {
            force_new_cluster(&wal, &store, &conf_state, applied, member_id).await?;
        }
        // Applied entries were committed; make the WAL's commit index say so, so that raft
        // accepts the backend's applied index.
        let mut hs = wal.hard_state();
        if applied > hs.commit {
            hs.commit = applied;
            wal.save(&[], Some(&hs)).await?;
        }
        if applied == 0 {
            applied_term = 0;
        } else if applied_term == 0 {
            applied_term = raft::Storage::term(&wal.storage(), applied).unwrap_or(0);
        }
        applied = applied.max(recovery.snapshot.index);
        let applied_meta = Rc::new(RefCell::new(SnapshotMeta {
            index: applied,
            term: applied_term,
            conf_state: conf_state.clone(),
        }));
        let election = cfg.election_timeout();
        let min_ttl = (election.as_millis() * 3 / 2).div_ceil(1000) as i64;
        let lessor = Lessor::recover(&store, min_ttl, Instant::now())?;
        let raft_config = raft_config(
            member_id,
            applied,
            cfg.election_ticks,
            cfg.pre_vote,
            cfg.fixed_election_tick,
        );
        raft_config.validate().map_err(raft_err)?;
        let storage = RaftStorage::new(wal.storage(), applied_meta.clone());
        let mut raw =
            RawNode::new(&raft_config, storage, &super::log::logger()).map_err(raft_err)?;
        if raw.raft.prs().conf().voters().ids().len() == 1
            && raw.raft.prs().conf().voters().contains(member_id)
        {
            // The only voter: no need to wait for an election timeout.
            raw.campaign().map_err(raft_err)?;
        }
        let id_prefix = (std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
            ^ u64::from(std::process::id()))
            << 24;
        let members = load_members(&store)?;
        if members.removed.contains(&member_id) {
            return Err(Error::InvalidArgument(format!(
                "member {member_id:x} was removed from the cluster: remove its data dir {} (and \
                 add it again with etcdctl member add to rejoin)",
                cfg.data_dir.display()
            )));
        }
        let network = network(cluster_id, member_id);
        // Until the bootstrap entries (or the leader's log) build the membership, the members
        // listed and talked to are the ones the flags or the running cluster named (etcd's
        // joining member does the same with the remote cluster's members).
        let mut seen = members.clone();
        if seen.members.is_empty() {
            for m in cfg.initial_members.iter().chain(&cfg.known_members) {
                seen.members.insert(m.id, m.clone());
            }
        }
        network.set_peers(peers_of(&seen, member_id));
        let shared = Arc::new(Shared {
            store: ArcSwap::new(store.clone()),
            lessor: std::sync::Mutex::new(lessor),
            term: AtomicU64::new(wal.hard_state().term),
            leader: AtomicU64::new(0),
            is_leader: AtomicBool::new(false),
            lease_primary: AtomicBool::new(false),
            revokes_in_batch: AtomicBool::new(false),
            revokes_published: tokio::sync::Notify::new(),
            apply_gap: AtomicU64::new(0),
            members: std::sync::RwLock::new(seen),
            alarms: std::sync::RwLock::new(crate::alarm::Alarms::load(&store.read())?),
            auth: ArcSwap::from_pointee(crate::auth::AuthState::load(&store.read())?),
            tokens: crate::auth::token::SimpleTokens::new(cfg.auth_token_ttl),
            active: network.active_since(),
            removed: AtomicBool::new(false),
            committed: AtomicU64::new(0),
            applied: AtomicU64::new(applied),
            peer_clients: super::transport::PeerClients::new(cfg.dialer.clone()),
            alive: AtomicBool::new(true),
            queued_bytes: AtomicUsize::new(0),
            next_id: AtomicU64::new(id_prefix),
            metrics: cfg.metrics.clone(),
            cluster_id,
            member_id,
        });
        let checkpointer = Checkpointer::start(cfg.metrics.clone())?;
        let marker = recovery.snapshot.index;
        Ok(Node {
            raw,
            wal,
            shared,
            store,
            applied_meta,
            pending: HashMap::new(),
            reads: HashMap::new(),
            next_read: id_prefix,
            ready_reads: Vec::new(),
            persisting: VecDeque::new(),
            applied,
            checkpointer,
            checkpoint_rx: None,
            checkpointed: applied,
            checkpointed_at: Instant::now(),
            marker,
            releasing: None,
            compaction: None,
            term_started: false,
            revoking: HashMap::new(),
            lease_checked_at: Instant::now(),
            lease_checkpointed_at: Instant::now(),
            checkpoint_due: Vec::new(),
            lease_primary: false,
            leaderless: VecDeque::new(),
            leader: 0,
            leader_changed_at: Instant::now(),
            next_internal: id_prefix ^ (1 << 63),
            network,
            received: HashMap::new(),
            removed_at: None,
            published: false,
            publish_at: Instant::now(),
            stopping: None,
            min_ttl,
            snap_dir,
            removed: false,
            campaign_alone: true,
            members,
            cfg,
        })
    }

    /// The loop, ticked by `ticks`: until every handle is dropped or a stop is asked; an error
    /// is fatal.
    pub(super) async fn run(
        mut self,
        mut rx: mpsc::Receiver<Command>,
        ticks: super::tick::Ticks,
    ) -> Result<()> {
        let mut buf = Vec::with_capacity(DRAIN);
        let mut stop = None;
        self.pump().await?;
        loop {
            enum Event {
                Commands,
                Tick,
                Persisted(Result<()>),
                Checkpointed(Result<(u64, u64)>),
                Released(Result<usize>),
                Work,
                Closed,
            }
            let busy = self.compaction.is_some();
            let event = std::future::poll_fn(|cx| {
                if let Some(front) = self.persisting.front_mut()
                    && let Poll::Ready(r) = front.durable.as_mut().poll(cx)
                {
                    return Poll::Ready(Event::Persisted(r));
                }
                if let Some(rx) = self.checkpoint_rx.as_mut()
                    && let Poll::Ready(r) = Pin::new(rx).poll(cx)
                {
                    self.checkpoint_rx = None;
                    return Poll::Ready(Event::Checkpointed(r.unwrap_or(Err(Error::Stopped))));
                }
                if let Some(h) = self.releasing.as_mut()
                    && let Poll::Ready(r) = Pin::new(h).poll(cx)
                {
                    self.releasing = None;
                    return Poll::Ready(Event::Released(r.unwrap_or(Ok(0))));
                }
                if ticks.poll_tick(cx).is_ready() {
                    return Poll::Ready(Event::Tick);
                }
                match rx.poll_recv_many(cx, &mut buf, DRAIN) {
                    Poll::Ready(0) => return Poll::Ready(Event::Closed),
                    Poll::Ready(_) => return Poll::Ready(Event::Commands),
                    Poll::Pending => {}
                }
                if busy {
                    return Poll::Ready(Event::Work);
                }
                Poll::Pending
            })
            .await;
            match event {
                Event::Closed => break,
                Event::Tick => {
                    if !self.alone_with_unpersisted_entries() {
                        self.raw.tick();
                    }
                    self.expire(Instant::now());
                    self.retry_reads(false);
                }
                Event::Persisted(result) => {
                    result?;
                    let done = self.persisting.pop_front().expect("polled the front");
                    self.send(done.messages);
                    self.raw.on_persist_ready(done.number);
                }
                Event::Checkpointed(result) => self.checkpointed(result?).await?,
                Event::Released(result) => {
                    result?;
                }
                Event::Work => self.compaction_step()?,
                Event::Commands => {
                    let mut readers = Vec::new();
                    // Consecutive proposals go to raft together (see `propose_all`), up to
                    // about `max_size_per_msg` of data each time.
                    let mut proposals = Vec::new();
                    let mut bytes = 0;
                    for command in buf.drain(..) {
                        if let Command::Propose { id, data, reply } = command {
                            if bytes + data.len() > PROPOSAL_BATCH_BYTES && !proposals.is_empty() {
                                self.propose_all(std::mem::take(&mut proposals));
                                bytes = 0;
                            }
                            bytes += data.len();
                            proposals.push((id, data, Some(reply)));
                            continue;
                        }
                        self.propose_all(std::mem::take(&mut proposals));
                        bytes = 0;
                        if let Some(reply) = self.command(command, &mut readers) {
                            stop = Some(reply);
                            self.start_stopping();
                        }
                    }
                    self.propose_all(proposals);
                    if !readers.is_empty() {
                        self.read_index(readers);
                    }
                }
            }
            if stop.is_some() && self.stopped() {
                // What the last commands made (the vote for the member this leader handed
                // leadership to) is written and, by `shutdown`, sent.
                self.pump().await?;
                break;
            }
            self.propose_leaderless();
            self.lease_upkeep();
            self.publish();
            self.pump().await?;
            self.maybe_checkpoint();
            if self.removed {
                if self.stopping.is_none() {
                    self.start_stopping();
                    self.removed_at = Some(Instant::now());
                }
                // As etcd's `stopWithDelay` (ten ticks): the member goes on for a moment, so
                // that its heartbeats carry the commit of its own removal to the others (the
                // survivor of a 2-voter cluster would otherwise wait for its vote forever).
                let lingered = self
                    .removed_at
                    .is_some_and(|at| at.elapsed() >= 10 * self.cfg.heartbeat);
                if lingered && self.stopped() {
                    self.shutdown().await?;
                    // The process ends, with success as etcd's does: nothing to restart.
                    self.shared.removed.store(true, Ordering::Release);
                    return Ok(());
                }
            }
        }
        self.shutdown().await?;
        if let Some(reply) = stop {
            let _ = reply.send(());
        }
        Ok(())
    }

    /// Handles one command; linearizable reads are collected in `readers` (one ReadIndex for
    /// all of a drain). Returns the reply of a stop request.
    pub(super) fn command(
        &mut self,
        command: Command,
        readers: &mut Vec<Reply<()>>,
    ) -> Option<tokio::sync::oneshot::Sender<()>> {
        match command {
            Command::Propose { id, data, reply } => self.propose(id, data, Some(reply)),
            Command::ReadIndex(reply) => readers.push(reply),
            Command::ConfChange { change, reply } => self.propose_conf_change(change, reply),
            Command::Progress(reply) => {
                let progress = (self.raw.raft.state == StateRole::Leader).then(|| {
                    let me = self.shared.member_id;
                    let mut p = super::Progress::default();
                    for (id, pr) in self.raw.raft.prs().iter() {
                        if *id == me {
                            p.leader_matched = pr.matched;
                        }
                        p.matched.insert(*id, pr.matched);
                    }
                    p
                });
                let _ = reply.send(progress);
            }
            Command::TransferLeader { to, reply } => {
                if self.raw.raft.state == StateRole::Leader {
                    if to != self.shared.member_id {
                        tracing::info!(
                            to = format!("{to:x}"),
                            "transferring leadership (move-leader)"
                        );
                        self.raw.transfer_leader(to);
                    }
                    let _ = reply.send(Ok(()));
                } else {
                    let _ = reply.send(Err(Error::NotLeader));
                }
            }
            Command::Step(messages) => {
                for m in messages {
                    if let Err(e) = self.raw.step(m) {
                        tracing::debug!(error = %e, "raft refused a message");
                    }
                }
            }
            Command::Report(Report::Unreachable(id)) => self.raw.report_unreachable(id),
            Command::Report(Report::Removed(by)) => {
                if !self.removed {
                    tracing::error!(
                        peer = format!("{by:x}"),
                        "the member has been permanently removed from the cluster; the data-dir \
                         used by this member must be removed"
                    );
                    self.removed = true;
                }
            }
            Command::Report(Report::Snapshot(id, ok)) => {
                let status = if ok {
                    SnapshotStatus::Finish
                } else {
                    SnapshotStatus::Failure
                };
                self.raw.report_snapshot(id, status);
            }
            Command::SnapshotReceived {
                message,
                path,
                reply,
            } => self.snapshot_received(message, path, reply),
            Command::Stop(reply) => return Some(reply),
        }
        None
    }

    /// Handles every `Ready`, then waits for every WAL append in flight (and handles what
    /// their persistence lets raft do), until raft has nothing more: the harness's step.
    #[cfg(test)]
    pub(super) async fn settle(&mut self) -> Result<()> {
        loop {
            self.pump().await?;
            let Some(p) = self.persisting.pop_front() else {
                return Ok(());
            };
            p.durable.await?;
            self.send(p.messages);
            self.raw.on_persist_ready(p.number);
        }
    }

    /// A checkpoint now (the harness's), waiting for it: backend synced, raft log compacted if
    /// due.
    #[cfg(test)]
    pub(super) async fn checkpoint_now(&mut self) -> Result<()> {
        if let Some(rx) = self.checkpoint_rx.take() {
            let done = rx.await.unwrap_or(Err(Error::Stopped))?;
            self.checkpointed(done).await?;
        }
        if self.applied > self.checkpointed {
            let rx = self.checkpointer.sync(self.store.clone());
            let done = rx.await.unwrap_or(Err(Error::Stopped))?;
            self.checkpointed(done).await?;
        }
        if let Some(h) = self.releasing.take() {
            h.await.unwrap_or(Ok(0))?;
        }
        Ok(())
    }

    /// Handles every `Ready` raft has.
    pub(super) async fn pump(&mut self) -> Result<()> {
        while self.raw.has_ready() {
            let mut rd = self.raw.ready();
            if let Some(ss) = rd.ss() {
                self.on_soft_state(ss.leader_id, ss.raft_state);
            }
            // A leader's appends leave before its own fdatasync, so the fsyncs overlap.
            self.send(rd.take_messages());
            if !rd.snapshot().is_empty() {
                // Persist everything before it first: the snapshot replaces the log.
                while let Some(p) = self.persisting.pop_front() {
                    p.durable.await?;
                    self.send(p.messages);
                    self.raw.on_persist_ready(p.number);
                }
                let snapshot = rd.snapshot().clone();
                let hs = rd.hs().cloned();
                self.install_snapshot(&snapshot, hs.as_ref()).await?;
                if let Some(hs) = &hs {
                    self.shared.term.store(hs.term, Ordering::Relaxed);
                }
                // The rest of this `Ready` is made durable at once too: raft may not count the
                // snapshot as applied before it is persisted. With the entries goes the commit
                // index the snapshot's record capped.
                let entries = rd.take_entries();
                let index = snapshot.get_metadata().index;
                let hs = hs.filter(|h| h.commit > index);
                if !entries.is_empty() || hs.is_some() {
                    self.wal.save(&entries, hs.as_ref()).await?;
                }
                self.take_read_states(&mut rd);
                let messages = rd.take_persisted_messages();
                let number = rd.number();
                self.raw.advance_append_async(rd);
                self.send(messages);
                self.raw.on_persist_ready(number);
                continue;
            }
            let committed = rd.take_committed_entries();
            self.apply(committed)?;
            self.take_read_states(&mut rd);
            let hs = rd.hs().cloned();
            if let Some(hs) = &hs {
                self.shared.term.store(hs.term, Ordering::Relaxed);
            }
            let entries = rd.take_entries();
            let messages = rd.take_persisted_messages();
            let number = rd.number();
            let durable: Option<Pin<Box<dyn Future<Output = Result<()>>>>> = if !rd.must_sync() {
                // Only the commit index changed (etcd's `MustSync` is false): recorded, made
                // durable with the next sync; no fdatasync of its own.
                if let Some(hs) = &hs {
                    self.wal.save_lazily(hs)?;
                }
                (!self.persisting.is_empty()).then(|| {
                    // Its messages must still follow the writes before it.
                    Box::pin(std::future::ready(Ok(()))) as Pin<Box<dyn Future<Output = _>>>
                })
            } else {
                Some(Box::pin(self.wal.save(&entries, hs.as_ref())))
            };
            self.raw.advance_append_async(rd);
            if std::mem::take(&mut self.term_started) {
                // After `advance`: raft takes no step between `ready` and `advance`.
                self.retry_reads(true);
            }
            match durable {
                Some(durable) => self.persisting.push_back(InFlight {
                    number,
                    durable,
                    messages,
                }),
                None => {
                    self.send(messages);
                    self.raw.on_persist_ready(number);
                }
            }
            self.serve_reads();
        }
        self.raw
            .advance_apply_to(self.applied.max(self.raw.raft.raft_log.applied));
        if self.campaign_alone {
            let me = self.shared.member_id;
            let voters = self.raw.raft.prs().conf().voters().ids();
            if voters.len() == 1 && voters.contains(me) {
                // The only voter (the bootstrap entries just said so, and they are applied):
                // no need to wait for an election timeout.
                if self.raw.raft.state != StateRole::Leader && self.persisting.is_empty() {
                    self.campaign_alone = false;
                    self.raw.campaign().map_err(raft_err)?;
                    return Box::pin(self.pump()).await;
                }
                // Leading already, or (entries still being written) at a later pump.
                self.campaign_alone = self.raw.raft.state != StateRole::Leader;
            } else if voters.len() > 1 {
                self.campaign_alone = false;
            }
        }
        let committed = self.raw.raft.raft_log.committed;
        self.shared.committed.store(committed, Ordering::Relaxed);
        self.shared.applied.store(self.applied, Ordering::Release);
        self.shared
            .apply_gap
            .store(committed.saturating_sub(self.applied), Ordering::Relaxed);
        let m = &self.shared.metrics;
        m.proposals_committed
            .set(i64::try_from(self.raw.raft.raft_log.committed).unwrap_or(i64::MAX));
        m.proposals_applied
            .set(i64::try_from(self.applied).unwrap_or(i64::MAX));
        m.proposals_pending.set(self.pending.len() as i64);
        m.wal_write_bytes
            .set(i64::try_from(self.wal.stats().bytes_written).unwrap_or(i64::MAX));
        Ok(())
    }

    /// Sends messages to their peers: one batch per peer, in order; a snapshot with the backend
    /// pinned at its index.
    pub(super) fn send(&mut self, messages: Vec<Message>) {
        if messages.is_empty() {
            return;
        }
        let mut by_peer: Vec<(u64, Vec<Message>)> = Vec::new();
        for m in messages {
            if m.get_msg_type() == MessageType::MsgSnapshot {
                self.send_snapshot(m);
                continue;
            }
            let batch = match by_peer.iter().position(|(to, _)| *to == m.to) {
                Some(i) => &mut by_peer[i].1,
                None => {
                    by_peer.push((m.to, Vec::new()));
                    &mut by_peer.last_mut().expect("pushed").1
                }
            };
            split_append(m, PROPOSAL_BATCH_BYTES, batch);
        }
        for (to, batch) in by_peer {
            self.network.send(to, batch);
        }
    }

    /// Pins the backend for a `MsgSnapshot`: its applied index must be the snapshot's (raft took
    /// the metadata from [`SnapshotMeta`], kept equal to the backend's).
    fn send_snapshot(&mut self, m: Message) {
        let index = m.get_snapshot().get_metadata().index;
        let txn = self.store.backend().begin_read();
        let at = txn
            .get(META_BUCKET, b"consistent_index")
            .ok()
            .flatten()
            .and_then(|v| <[u8; 8]>::try_from(v).ok())
            .map(u64_be);
        if at != Some(index) {
            tracing::warn!(
                ?at,
                index,
                "the backend moved past a snapshot's index: not sent"
            );
            self.raw.report_snapshot(m.to, SnapshotStatus::Failure);
            return;
        }
        tracing::info!(peer = format!("{:x}", m.to), index, "sending a snapshot");
        self.network.send_snapshot(m, txn);
    }

    /// A snapshot received from the leader: raft is given its message; if raft takes it, the
    /// install happens in the `Ready` that carries it and `reply` is answered then.
    fn snapshot_received(&mut self, message: Message, path: PathBuf, reply: Reply<()>) {
        let index = message.get_snapshot().get_metadata().index;
        if let Err(e) = self.raw.step(message) {
            let _ = std::fs::remove_file(&path);
            let _ = reply.send(Err(Error::InvalidArgument(format!(
                "raft refused the snapshot: {e}"
            ))));
            return;
        }
        let wanted = self
            .raw
            .raft
            .raft_log
            .unstable_snapshot()
            .as_ref()
            .is_some_and(|s| s.get_metadata().index == index);
        if wanted {
            if let Some((old, waiting)) = self.received.insert(index, (path, reply)) {
                let _ = std::fs::remove_file(&old);
                let _ = waiting.send(Err(Error::InvalidArgument("a newer copy arrived".into())));
            }
        } else {
            let _ = std::fs::remove_file(&path);
            let _ = reply.send(Err(Error::InvalidArgument(format!(
                "snapshot at index {index} not needed (applied index {})",
                self.applied
            ))));
        }
    }

    /// Installs the snapshot raft restored: the received backend replaces this member's, the
    /// WAL records it, and everything derived from the backend is rebuilt. Crash-safe: the file
    /// is renamed `<index>.snap.db` before the WAL records the snapshot, and `open` finishes an
    /// install the WAL recorded but the rename to `db` did not.
    async fn install_snapshot(
        &mut self,
        snapshot: &Snapshot,
        hs: Option<&raft::eraftpb::HardState>,
    ) -> Result<()> {
        let meta = snapshot.get_metadata();
        let index = meta.index;
        let Some((received, reply)) = self.received.remove(&index) else {
            return Err(Error::InvalidArgument(format!(
                "raft restored a snapshot at index {index} that was not received"
            )));
        };
        // A checkpoint of the old backend in flight finishes first: once its file is replaced,
        // the old backend refuses syncs (poisoned), which the loop would take as fatal.
        if let Some(rx) = self.checkpoint_rx.take() {
            let done = rx.await.unwrap_or(Err(Error::Stopped))?;
            self.checkpointed(done).await?;
        }
        let staged = self.snap_dir.join(format!("{index:016x}.snap.db"));
        std::fs::rename(&received, &staged).map_err(|e| Error::io("renaming", &received, e))?;
        sync_dir(&self.snap_dir)?;
        let marker = SnapshotMarker {
            index,
            term: meta.term,
            conf_state: meta.get_conf_state().clone(),
        };
        // The hard state goes with the marker, its commit index capped at the snapshot's: the
        // Ready's entries after the snapshot are written next, and a commit index beyond the
        // log's last entry would stop the member at its restart (raft-rs refuses it).
        let capped = hs.map(|hs| {
            let mut hs = hs.clone();
            hs.commit = hs.commit.min(index);
            hs
        });
        let mut records = vec![RecordRef::Snapshot(&marker)];
        if let Some(hs) = &capped {
            records.push(RecordRef::HardState(hs));
        }
        self.wal.append(&records).await?;
        let db = self.snap_dir.join("db");
        // Under the old backend's writer mutex: a defragmentation of it finishing now would
        // otherwise rename its copy of the old data over the snapshot.
        self.store.backend().replace_file(&staged)?;
        sync_dir(&self.snap_dir)?;
        let store = Arc::new(Store::open(&db, BackendOptions::default())?);
        let (at, _) = store.consistent_index()?;
        if at != index {
            return Err(Error::CorruptRecord(format!(
                "the installed snapshot is at index {at}, raft's at {index}"
            )));
        }
        self.shared.store.store(store.clone());
        self.store = store;
        *lock(&self.shared.lessor) = Lessor::recover(&self.store, self.min_ttl, Instant::now())?;
        let members = load_members(&self.store)?;
        self.set_members(members);
        *self
            .shared
            .alarms
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            crate::alarm::Alarms::load(&self.store.read())?;
        self.shared
            .auth
            .store(Arc::new(crate::auth::AuthState::load(&self.store.read())?));
        // The user changes the snapshot covers (deletions, password changes, auth turned off
        // and on) were never applied here: no simple token made before may outlive them.
        self.shared.tokens.drop_all();
        self.applied = index;
        self.checkpointed = index;
        self.marker = index;
        self.compaction = None;
        *self.applied_meta.borrow_mut() = SnapshotMeta {
            index,
            term: meta.term,
            conf_state: meta.get_conf_state().clone(),
        };
        let revision = self.store.current_revision();
        for feed in &self.cfg.feeds {
            feed.reset(revision);
        }
        tracing::info!(index, revision, "installed a snapshot from the leader");
        let _ = reply.send(Ok(()));
        // Older snapshots raft took before this one will not be installed: their senders are
        // answered (each pins a read view of its backend until then), their files removed.
        let older: Vec<u64> = self
            .received
            .keys()
            .copied()
            .filter(|&i| i <= index)
            .collect();
        for i in older {
            let (path, waiting) = self.received.remove(&i).expect("listed");
            let _ = std::fs::remove_file(&path);
            let _ = waiting.send(Err(Error::InvalidArgument(format!(
                "a newer snapshot (index {index}) was installed"
            ))));
        }
        Ok(())
    }

    /// Makes `members` the applied membership: listed by the API, checked by the peer service,
    /// talked to by the transport.
    pub(super) fn set_members(&mut self, members: Members) {
        self.network
            .set_peers(peers_of(&members, self.shared.member_id));
        *self
            .shared
            .members
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = members.clone();
        self.members = members;
    }

    /// Proposes this member's name and client URLs until they are in the applied membership
    /// (etcd's `publish`: "published local member to cluster through raft").
    fn publish(&mut self) {
        if self.published || self.leader == raft::INVALID_ID {
            return;
        }
        let now = Instant::now();
        if now < self.publish_at {
            return;
        }
        self.publish_at = now + self.cfg.request_timeout();
        let me = self.shared.member_id;
        self.propose_internal(Request::MemberAttributes(MemberAttributes {
            id: me,
            name: self.cfg.name.clone(),
            client_urls: self.cfg.client_urls.clone(),
        }));
    }

    /// Starts a stop: a leader with other voters hands leadership to the most up-to-date one
    /// (etcd's `TransferLeadership`), so clients need not wait an election timeout.
    fn start_stopping(&mut self) {
        let me = self.shared.member_id;
        self.stopping = Some(Instant::now() + self.cfg.election_timeout());
        if self.raw.raft.state != StateRole::Leader {
            return;
        }
        let voters = self.raw.raft.prs().conf().voters().ids();
        let best = self
            .raw
            .raft
            .prs()
            .iter()
            .filter(|(id, _)| **id != me && voters.contains(**id))
            .max_by_key(|(_, p)| p.matched)
            .map(|(id, _)| *id);
        if let Some(target) = best {
            tracing::info!(
                to = format!("{target:x}"),
                "stopping: transferring leadership"
            );
            self.raw.transfer_leader(target);
        }
    }

    /// Whether a stop may finish: not leading any more (or never was), or out of time.
    fn stopped(&self) -> bool {
        match self.stopping {
            None => false,
            Some(deadline) => {
                self.raw.raft.state != StateRole::Leader
                    || Instant::now() >= deadline
                    || self.raw.raft.prs().conf().voters().ids().len() == 1
            }
        }
    }

    fn on_soft_state(&mut self, leader: u64, role: StateRole) {
        tracing::info!(state = ?role, leader = format!("{leader:x}"), "raft state changed");
        let m = &self.shared.metrics;
        m.has_leader.set(i64::from(leader != raft::INVALID_ID));
        m.is_leader.set(i64::from(role == StateRole::Leader));
        self.shared
            .is_leader
            .store(role == StateRole::Leader, Ordering::Release);
        if leader != self.leader {
            // etcd's raft lines (its zap logger prints them as the message).
            let (id, term) = (self.shared.member_id, self.raw.raft.term);
            if leader != raft::INVALID_ID {
                m.leader_changes.inc();
                tracing::info!("raft.node: {id:x} elected leader {leader:x} at term {term}");
            } else {
                let old = self.leader;
                tracing::info!("raft.node: {id:x} lost leader {old:x} at term {term}");
            }
            self.leader_changed_at = Instant::now();
            // Reads waiting on the old leader's ReadIndex will not be answered (etcd fails them
            // with ErrLeaderChanged).
            for (_, batch) in self.reads.drain() {
                for w in batch.waiters {
                    let _ = w.send(Err(Error::LeaderChanged));
                }
            }
        }
        if role != StateRole::Leader {
            // etcd's `Demote`: only a primary lessor expires leases.
            self.lease_primary = false;
            self.shared.lease_primary.store(false, Ordering::Release);
            // Keep-alives waiting for a revocation go to the new leader.
            self.shared.revokes_published.notify_waiters();
        }
        self.leader = leader;
        self.shared.leader.store(leader, Ordering::Relaxed);
    }

    pub(super) fn propose(&mut self, id: u64, data: Vec<u8>, reply: Option<Reply<Applied>>) {
        self.propose_all(vec![(id, data, reply)]);
    }

    /// Proposes `batch` as one `MsgPropose`: a follower forwards it to the leader in one message,
    /// and the leader appends it in one step. Each proposal with a reply is answered once
    /// applied; if raft refuses the message, every one gets the error.
    pub(super) fn propose_all(&mut self, batch: ProposalBatch) {
        self.propose_batch(batch, Instant::now());
    }

    /// [`Node::propose_all`] of a batch made at `made`: held while no leader is known.
    fn propose_batch(&mut self, batch: ProposalBatch, made: Instant) {
        if batch.is_empty() {
            return;
        }
        if self.raw.raft.leader_id == raft::INVALID_ID {
            self.leaderless.push_back((made, batch));
            return;
        }
        let mut replies = Vec::with_capacity(batch.len());
        let outcome = {
            let mut data = Vec::with_capacity(batch.len());
            for (id, d, reply) in batch {
                data.push(d);
                replies.push((id, reply));
            }
            self.raw.step(propose_message(self.raw.raft.id, data))
        };
        match outcome {
            Ok(()) => {
                let proposed = made;
                for (id, reply) in replies {
                    if let Some(reply) = reply {
                        self.pending.insert(id, Pending { reply, proposed });
                    }
                }
            }
            Err(e) => {
                for (_, reply) in replies {
                    self.shared.metrics.proposals_failed.inc();
                    if let Some(reply) = reply {
                        let _ = reply.send(Err(match &e {
                            raft::Error::ProposalDropped => Error::NoLeader,
                            other => Error::InvalidArgument(format!("raft: {other}")),
                        }));
                    }
                }
            }
        }
    }

    /// Proposes what was held while no leader was known, once one is.
    pub(super) fn propose_leaderless(&mut self) {
        if self.leaderless.is_empty() || self.raw.raft.leader_id == raft::INVALID_ID {
            return;
        }
        for (made, batch) in std::mem::take(&mut self.leaderless) {
            self.propose_batch(batch, made);
        }
    }

    /// Proposes a membership change; answered once applied (with the members after it).
    fn propose_conf_change(&mut self, change: ConfChange, reply: Reply<Applied>) {
        if self.raw.raft.leader_id == raft::INVALID_ID {
            let _ = reply.send(Err(Error::NoLeader));
            return;
        }
        let id = change.id;
        match self.raw.propose_conf_change(Vec::new(), change) {
            Ok(()) => {
                self.pending.insert(
                    id,
                    Pending {
                        reply,
                        proposed: Instant::now(),
                    },
                );
            }
            Err(e) => {
                let _ = reply.send(Err(match e {
                    raft::Error::ProposalDropped => Error::NoLeader,
                    other => raft_err(other),
                }));
            }
        }
    }

    /// A proposal of the core's own (lease upkeep).
    pub(super) fn propose_internal(&mut self, request: Request) {
        self.next_internal += 1;
        let data = Proposal {
            id: self.next_internal,
            request: Some(request),
            member: self.shared.member_id,
            auth: None,
        };
        use prost::Message as _;
        self.propose(self.next_internal, data.encode_to_vec(), None);
    }

    fn read_index(&mut self, waiters: Vec<Reply<()>>) {
        self.next_read += 1;
        let ctx = read_context(self.shared.member_id, self.next_read);
        // With no leader known, raft would drop it: it waits, as in etcd's read loop, to be
        // answered `leader changed` once a leader is elected (`on_soft_state`), or etcd's
        // timeout.
        if self.raw.raft.leader_id != raft::INVALID_ID {
            self.raw.read_index(ctx.clone());
        }
        let now = Instant::now();
        self.reads.insert(
            ctx,
            ReadBatch {
                waiters,
                started: now,
                issued: now,
            },
        );
    }

    /// Whether this member, the only voter and not leading, still has entries being written:
    /// its election would win at once, and raft-rs requires a new leader's whole log persisted
    /// (it asserts so), so its clock waits for the writes (a stalled disk after the other
    /// voter's removal would otherwise stop the process).
    fn alone_with_unpersisted_entries(&self) -> bool {
        if self.persisting.is_empty() || self.raw.raft.state == StateRole::Leader {
            return false;
        }
        let voters = self.raw.raft.prs().conf().voters().ids();
        voters.len() == 1 && voters.contains(self.shared.member_id)
    }

    /// The ReadIndex answers of a `Ready`: their reads wait for the apply to reach the index.
    fn take_read_states(&mut self, rd: &mut raft::Ready) {
        for rs in rd.take_read_states() {
            if let Some(batch) = self.reads.remove(&rs.request_ctx) {
                self.ready_reads.push((rs.index, batch.waiters));
            }
        }
    }

    /// Gives raft again the ReadIndex requests it has not answered: those older than
    /// [`READ_INDEX_RETRY`], or all of them (`all`) once a new leader's first entry is applied.
    pub(super) fn retry_reads(&mut self, all: bool) {
        if self.raw.raft.leader_id == raft::INVALID_ID {
            return;
        }
        let now = Instant::now();
        let mut again = Vec::new();
        for (ctx, batch) in &mut self.reads {
            if all || now.duration_since(batch.issued) >= READ_INDEX_RETRY {
                batch.issued = now;
                again.push(ctx.clone());
            }
        }
        for ctx in again {
            self.raw.read_index(ctx);
        }
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

    /// Answers proposals and reads not done within the request timeout (etcd's errors).
    fn expire(&mut self, now: Instant) {
        let timeout = self.cfg.request_timeout();
        let election = self.cfg.election_timeout();
        let changed = self.leader_changed_at;
        let error_for = |started: Instant| {
            // Started around a leader change (up to two election timeouts before it).
            if started < changed && started + 2 * election > changed {
                Error::TimeoutDueToLeaderFail
            } else {
                Error::Timeout
            }
        };
        let expired: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| now.duration_since(p.proposed) >= timeout)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            let p = self.pending.remove(&id).expect("listed");
            // A proposal not applied within the request timeout failed (etcd counts it).
            self.shared.metrics.proposals_failed.inc();
            let _ = p.reply.send(Err(error_for(p.proposed)));
        }
        while let Some((made, _)) = self.leaderless.front()
            && now.duration_since(*made) >= timeout
        {
            let (_, batch) = self.leaderless.pop_front().expect("looked at the front");
            for (_, _, reply) in batch {
                self.shared.metrics.proposals_failed.inc();
                if let Some(reply) = reply {
                    let _ = reply.send(Err(Error::NoLeaderDeadline));
                }
            }
        }
        let expired: Vec<Vec<u8>> = self
            .reads
            .iter()
            .filter(|(_, r)| now.duration_since(r.started) >= timeout)
            .map(|(ctx, _)| ctx.clone())
            .collect();
        for ctx in expired {
            let batch = self.reads.remove(&ctx).expect("listed");
            for w in batch.waiters {
                let _ = w.send(Err(error_for(batch.started)));
            }
        }
    }

    /// Makes this leader the primary lessor once it applies its first entry of the term
    /// (etcd's `Promote`, called at the same point): every lease gets its whole (remaining) TTL
    /// plus an election timeout, so none expires because of the failover.
    pub(super) fn promote_lessor(&mut self) {
        if self.lease_primary || self.raw.raft.state != StateRole::Leader {
            return;
        }
        let now = Instant::now();
        lock(&self.shared.lessor).promote(now, self.cfg.election_timeout());
        self.lease_primary = true;
        self.shared.lease_primary.store(true, Ordering::Release);
        self.lease_checked_at = now;
        self.lease_checkpointed_at = now;
        self.checkpoint_due.clear();
    }

    /// Expiry and checkpoints of leases, on the primary lessor: expired leases are revoked
    /// through raft, soonest expired first (etcd checks every 500 ms and revokes at most 1000 a
    /// second), and so are the stale stored TTLs of renewed leases cleared; every checkpoint
    /// interval the remaining TTLs are recorded, 1000 a second. Each check's work on the storage
    /// core is bounded, whatever the number of leases.
    fn lease_upkeep(&mut self) {
        if self.raw.raft.state != StateRole::Leader || !self.lease_primary {
            return;
        }
        let now = Instant::now();
        if now.duration_since(self.lease_checked_at) < LEASE_CHECK_INTERVAL {
            return;
        }
        self.lease_checked_at = now;
        // A revocation not applied within the request timeout (a lost proposal) is proposed
        // again.
        let retry = self.cfg.request_timeout();
        let interval = self.cfg.lease_checkpoint_interval;
        let (expired, stale, checkpoints) = {
            let lessor = lock(&self.shared.lessor);
            self.revoking
                .retain(|&id, at| lessor.is_expired(id, now) && now.duration_since(*at) < retry);
            let expired: Vec<i64> = lessor
                .expired(now)
                .filter(|id| !self.revoking.contains_key(id))
                .take(LEASE_REVOKES_PER_CHECK)
                .collect();
            let stale = lessor.stale_checkpoints(LEASE_CHECKPOINT_BATCH);
            if !interval.is_zero()
                && self.checkpoint_due.is_empty()
                && now.duration_since(self.lease_checkpointed_at) >= interval
            {
                self.lease_checkpointed_at = now;
                self.checkpoint_due = lessor.ids_by_expiry();
                // Taken from the end: soonest expiry first.
                self.checkpoint_due.reverse();
            }
            let take = self.checkpoint_due.len().min(LEASE_CHECKPOINTS_PER_CHECK);
            let due = self
                .checkpoint_due
                .split_off(self.checkpoint_due.len() - take);
            // etcd's filters: leases no longer than the interval are not checkpointed (they
            // are gone before the next one), nor a remaining TTL not below the TTL (just
            // renewed, or extended by a promotion: a restart gives the whole TTL anyway).
            let checkpoints: Vec<pb::LeaseCheckpoint> = due
                .into_iter()
                .rev()
                .filter_map(|id| {
                    let l = lessor.get(id)?;
                    let remaining_ttl = l.remaining(now).as_secs_f64().ceil() as i64;
                    (Duration::from_secs(l.ttl as u64) > interval
                        && remaining_ttl > 0
                        && remaining_ttl < l.ttl)
                        .then_some(pb::LeaseCheckpoint { id, remaining_ttl })
                })
                .collect();
            (expired, stale, checkpoints)
        };
        for id in expired {
            self.revoking.insert(id, now);
            self.propose_internal(Request::LeaseRevoke(pb::LeaseRevokeRequest { id }));
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
        self.propose_checkpoints(checkpoints);
    }

    fn propose_checkpoints(&mut self, checkpoints: Vec<pb::LeaseCheckpoint>) {
        for batch in checkpoints.chunks(LEASE_CHECKPOINT_BATCH) {
            let request = pb::LeaseCheckpointRequest {
                checkpoints: batch.to_vec(),
            };
            self.propose_internal(Request::LeaseCheckpoint(request));
        }
    }

    /// One bounded step of the compaction in progress; answers its waiters when it finishes.
    fn compaction_step(&mut self) -> Result<()> {
        let Some(job) = self.compaction.as_mut() else {
            return Ok(());
        };
        if self.store.compact_step(&mut job.job)? {
            let job = self.compaction.take().expect("checked");
            tracing::info!(
                revision = job.job.revision(),
                "finished scheduled compaction"
            );
            for (reply, applied) in job.waiters {
                let _ = reply.send(Ok(applied));
            }
        }
        Ok(())
    }

    /// Starts a backend checkpoint when one is due and none runs.
    fn maybe_checkpoint(&mut self) {
        if self.checkpoint_rx.is_some() {
            return;
        }
        let behind = self.applied - self.checkpointed;
        if behind >= CHECKPOINT_ENTRIES.min(self.cfg.snapshot_count.max(1))
            || (behind > 0 && self.checkpointed_at.elapsed() >= CHECKPOINT_INTERVAL)
        {
            self.checkpointed_at = Instant::now();
            self.checkpoint_rx = Some(self.checkpointer.sync(self.store.clone()));
        }
    }

    /// A checkpoint finished: the backend is durable at `index`. Compacts the raft log when
    /// `--snapshot-count` entries have been applied since the last compaction.
    async fn checkpointed(&mut self, (index, _term): (u64, u64)) -> Result<()> {
        self.checkpointed = self.checkpointed.max(index);
        let target = index.saturating_sub(self.cfg.snapshot_catchup_entries);
        if target <= self.marker || index - self.marker < self.cfg.snapshot_count.max(1) {
            return Ok(());
        }
        let term = raft::Storage::term(&self.wal.storage(), target).map_err(raft_err)?;
        let marker = SnapshotMarker {
            index: target,
            term,
            conf_state: self.applied_meta.borrow().conf_state.clone(),
        };
        // Appended, not awaited: the release below runs in a task that awaits it first.
        let durable = self.wal.append(&[RecordRef::Snapshot(&marker)]);
        self.marker = target;
        if self.releasing.is_none() {
            let wal = self.wal.clone();
            self.releasing = Some(
                glommio::spawn_local(async move {
                    durable.await?;
                    // Re-zeroing released segments for reuse runs here, off the loop.
                    wal.release(target + 1).await
                })
                .detach(),
            );
        } else {
            // The marker's durability is still awaited by the next release; a failure poisons
            // the WAL and every later append reports it.
            glommio::spawn_local(async move {
                let _ = durable.await;
            })
            .detach();
        }
        Ok(())
    }

    /// An orderly stop: the backend made durable, the WAL closed, every feed closed.
    pub(super) async fn shutdown(&mut self) -> Result<()> {
        while let Some(p) = self.persisting.pop_front() {
            p.durable.await?;
            // Best effort: a stopping leader's last votes and acknowledgements (its vote for
            // the member it handed leadership to) still leave while the transport runs.
            self.send(p.messages);
        }
        if let Some(rx) = self.checkpoint_rx.take() {
            rx.await.unwrap_or(Err(Error::Stopped))?;
        }
        self.store.sync()?;
        if let Some(h) = self.releasing.take() {
            h.await.unwrap_or(Ok(0))?;
        }
        for feed in &self.cfg.feeds {
            feed.close();
        }
        self.wal.close().await
    }
}

#[allow(clippy::big_endian_bytes, reason = "etcd's meta values are big-endian")]
fn u64_be(v: [u8; 8]) -> u64 {
    u64::from_be_bytes(v)
}

/// fsyncs a directory (a rename in it is durable after this).
fn sync_dir(dir: &std::path::Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io("fsync of directory", dir, e))
}

/// Removes snapshot files a crash left half-received.
fn remove_partial_snapshots(snap_dir: &std::path::Path) -> Result<()> {
    let entries = std::fs::read_dir(snap_dir).map_err(|e| Error::io("listing", snap_dir, e))?;
    for e in entries.flatten() {
        let name = e.file_name();
        if name.to_string_lossy().ends_with(".recv") {
            let _ = std::fs::remove_file(e.path());
        }
    }
    Ok(())
}

/// The membership recorded in the backend.
pub(super) fn load_members(store: &Store) -> Result<Members> {
    let view = store.read();
    let mut members = Members::default();
    for (k, v) in view.raw_range(MEMBERS_BUCKET)? {
        let m = Member::from_json(&v).map_err(|e| {
            Error::CorruptRecord(format!(
                "members bucket entry {}: {e}",
                String::from_utf8_lossy(&k)
            ))
        })?;
        members.members.insert(m.id, m);
    }
    for (k, _) in view.raw_range(MEMBERS_REMOVED_BUCKET)? {
        if let Ok(id) = u64::from_str_radix(&String::from_utf8_lossy(&k), 16) {
            members.removed.insert(id);
        }
    }
    Ok(members)
}

/// Every member but `me`, with its peer URLs.
pub(super) fn peers_of(members: &Members, me: u64) -> Vec<(u64, Vec<String>)> {
    members
        .members
        .values()
        .filter(|m| m.id != me)
        .map(|m| (m.id, m.peer_urls.clone()))
        .collect()
}

impl Drop for Node {
    fn drop(&mut self) {
        // Whatever ended the loop, hubs stop waiting for revisions.
        for feed in &self.cfg.feeds {
            feed.close();
        }
    }
}

#[cfg(test)]
mod tests {
    use raft::eraftpb::MessageType;
    use raft::storage::MemStorage;

    /// Member `id` of a 3-voter group, with the members' raft configuration.
    fn member(id: u64) -> raft::RawNode<MemStorage> {
        let storage = MemStorage::new_with_conf_state((vec![1, 2, 3], vec![]));
        let config = super::raft_config(id, 0, 10, true, None);
        raft::RawNode::new(&config, storage, &raft::default_logger()).unwrap()
    }

    /// Member 1, made leader.
    fn leader() -> raft::RawNode<MemStorage> {
        let mut raw = member(1);
        raw.raft.become_candidate();
        raw.raft.become_leader();
        raw
    }

    /// Member 1, leader, whose followers both acknowledged its first entry (their progress
    /// replicates), with nothing left to send; and its last index.
    fn replicating_leader() -> (raft::RawNode<MemStorage>, u64) {
        let mut raw = leader();
        let last = raw.raft.raft_log.last_index();
        for from in [2, 3] {
            let mut ack = raft::eraftpb::Message::default();
            ack.set_msg_type(MessageType::MsgAppendResponse);
            ack.from = from;
            ack.to = 1;
            ack.term = raw.raft.term;
            ack.index = last;
            raw.step(ack).unwrap();
        }
        raw.raft.msgs.clear();
        (raw, last)
    }

    /// A follower forwards the proposals of one step to the leader in one message, and the
    /// leader appends them at once.
    #[test]
    fn a_batch_of_proposals_is_forwarded_and_appended_in_one_message() {
        let data: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; 8]).collect();
        let mut follower = member(2);
        follower.raft.become_follower(1, 1);
        follower
            .step(super::propose_message(2, data.clone()))
            .unwrap();
        let forwarded: Vec<_> = std::mem::take(&mut follower.raft.msgs);
        assert_eq!(forwarded.len(), 1, "{forwarded:?}");
        assert_eq!(forwarded[0].to, 1);
        assert_eq!(forwarded[0].get_msg_type(), MessageType::MsgPropose);
        let got: Vec<&[u8]> = forwarded[0].entries.iter().map(|e| &e.data[..]).collect();
        assert_eq!(got, data.iter().map(Vec::as_slice).collect::<Vec<_>>());

        let mut leader = leader();
        let last = leader.raft.raft_log.last_index();
        let mut m = forwarded.into_iter().next().unwrap();
        m.term = leader.raft.term;
        leader.step(m).unwrap();
        assert_eq!(leader.raft.raft_log.last_index(), last + 5);
    }

    /// Proposals stepped before the next `Ready` leave in one MsgApp per follower (raft-rs's
    /// `batch_append`, in the members' configuration): not one MsgApp, and later one
    /// MsgAppResp, per proposal.
    #[test]
    fn proposals_stepped_together_leave_in_one_append_per_follower() {
        let (mut raw, last) = replicating_leader();
        for i in 0..10u8 {
            raw.propose(Vec::new(), vec![i; 16]).unwrap();
        }
        for to in [2, 3] {
            let appends: Vec<_> = raw
                .raft
                .msgs
                .iter()
                .filter(|m| m.to == to && m.get_msg_type() == MessageType::MsgAppend)
                .collect();
            assert_eq!(appends.len(), 1, "one append to {to}: {appends:?}");
            let indexes: Vec<u64> = appends[0].entries.iter().map(|e| e.index).collect();
            assert_eq!(indexes, (last + 1..=last + 10).collect::<Vec<_>>());
        }
    }

    /// Appends merged past the limit (raft-rs's `batch_append` has no bound) leave as
    /// consecutive pieces of at most `PROPOSAL_BATCH_BYTES`, which a follower appends in order.
    #[test]
    fn a_merged_append_larger_than_a_message_leaves_in_pieces() {
        let (mut raw, last) = replicating_leader();
        let entry_bytes = 200 << 10;
        for i in 0..12u8 {
            raw.propose(Vec::new(), vec![i; entry_bytes]).unwrap();
        }
        let merged: Vec<_> = std::mem::take(&mut raw.raft.msgs)
            .into_iter()
            .filter(|m| m.to == 2 && m.get_msg_type() == MessageType::MsgAppend)
            .collect();
        assert_eq!(merged.len(), 1, "raft-rs merged the appends");
        assert_eq!(merged[0].entries.len(), 12);
        let original = merged[0].clone();

        let mut pieces = Vec::new();
        super::split_append(
            merged.into_iter().next().unwrap(),
            super::PROPOSAL_BATCH_BYTES,
            &mut pieces,
        );
        assert!(pieces.len() >= 3, "{} pieces", pieces.len());
        let (mut index, mut log_term) = (original.index, original.log_term);
        let mut entries = Vec::new();
        for p in &pieces {
            assert_eq!(p.get_msg_type(), MessageType::MsgAppend);
            assert_eq!(
                (p.to, p.term, p.commit),
                (original.to, original.term, original.commit)
            );
            assert_eq!(
                (p.index, p.log_term),
                (index, log_term),
                "pieces are consecutive"
            );
            let bytes: usize = p.entries.iter().map(|e| e.data.len()).sum();
            assert!(bytes <= super::PROPOSAL_BATCH_BYTES, "{bytes} bytes");
            let e = p.entries.last().unwrap();
            (index, log_term) = (e.index, e.term);
            entries.extend(p.entries.iter().cloned());
        }
        assert_eq!(entries, original.entries.to_vec());

        // A follower holding the leader's first entry appends every piece.
        let mut follower = member(2);
        follower.raft.become_follower(raw.raft.term, 1);
        let mut first = raft::eraftpb::Message::default();
        first.set_msg_type(MessageType::MsgAppend);
        first.from = 1;
        first.to = 2;
        first.term = raw.raft.term;
        first.set_entries(
            raw.raft
                .raft_log
                .entries(1, None, raft::GetEntriesContext::empty(false))
                .unwrap()[..last as usize]
                .to_vec()
                .into(),
        );
        follower.step(first).unwrap();
        for p in pieces {
            follower.step(p).unwrap();
        }
        assert_eq!(follower.raft.raft_log.last_index(), last + 12);
        assert!(
            follower
                .raft
                .msgs
                .iter()
                .all(|m| m.get_msg_type() == MessageType::MsgAppendResponse && !m.reject)
        );

        // Small appends pass as they are.
        let mut out = Vec::new();
        let mut small = original.clone();
        small.set_entries(vec![original.entries[0].clone()].into());
        super::split_append(small.clone(), super::PROPOSAL_BATCH_BYTES, &mut out);
        assert_eq!(out, vec![small]);
    }

    /// Two members' reads never share a context, whatever their counts.
    #[test]
    fn read_contexts_are_unique_across_members() {
        assert_ne!(super::read_context(1, 7), super::read_context(2, 7));
        assert_ne!(super::read_context(1, 7), super::read_context(1, 8));
        assert_eq!(super::read_context(0x0102, 3).len(), 16);
    }
}
