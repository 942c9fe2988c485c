//! The engine's error type.
//!
//! Three kinds of failure are kept apart, because callers must react to them differently:
//! - **I/O** (`Io`): the operating system refused an operation (disk full, permission, EIO). The
//!   operation, the path and the OS error are all in the message.
//! - **Corruption** (`Corruption`): bytes read back from disk are not what Keel wrote. The file and
//!   the byte offset are named; nothing is skipped silently and recovery refuses to continue.
//! - **Bad input** (`RecordTooLarge`, `IndexGap`, `InvalidArgument`): the caller asked for
//!   something the engine refuses; nothing was written.
//!
//! `Error` is `Clone` (the I/O source is shared behind an `Arc`) so that one failed group commit can
//! hand the same error to every append waiting on it.

use std::path::PathBuf;
use std::sync::Arc;

/// Result alias for engine operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Every error the engine returns.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// An operating-system call failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What Keel was doing, e.g. "writing", "fdatasync".
        op: &'static str,
        /// The file or directory concerned.
        path: PathBuf,
        /// The error the OS returned.
        #[source]
        source: Arc<std::io::Error>,
    },
    /// Data read from disk failed validation somewhere recovery cannot safely truncate.
    #[error("corruption in {} at offset {offset}: {reason}", path.display())]
    Corruption {
        /// The damaged file.
        path: PathBuf,
        /// Byte offset of the first damaged structure in that file.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// A record would exceed the configured maximum size.
    #[error("record of {size} bytes exceeds the configured maximum of {max} bytes")]
    RecordTooLarge {
        /// Encoded size of the refused record.
        size: usize,
        /// Configured maximum.
        max: usize,
    },
    /// Appended entries do not continue the log.
    #[error("entry index {got} leaves a gap in the log: the next index can be at most {expected}")]
    IndexGap {
        /// Highest index the append could have started at (last index + 1).
        expected: u64,
        /// Index the caller supplied.
        got: u64,
    },
    /// An argument is out of range or inconsistent.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// An earlier write or fdatasync failed, so the WAL refuses further appends until it is
    /// reopened (which recovers to the last durable record).
    #[error("the WAL refuses writes after an earlier failure (reopen to recover): {0}")]
    Poisoned(String),
    /// The WAL was closed.
    #[error("the WAL is closed")]
    Closed,
    /// A page of the backend file failed validation.
    #[error("corrupt backend page {page}: {reason}")]
    CorruptPage {
        /// The page number.
        page: u64,
        /// What is wrong with it.
        reason: String,
    },
    /// A record read back from the backend does not decode or breaks an invariant (a value of
    /// the `key` or `lease` bucket, say): the data is damaged, not the request.
    #[error("corrupt record: {0}")]
    CorruptRecord(String),
    /// A key exceeds what the backend can store.
    #[error("key of {size} bytes exceeds the maximum of {max} bytes")]
    KeyTooLarge {
        /// The key's size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// A value exceeds the configured maximum.
    #[error("value of {size} bytes exceeds the maximum of {max} bytes")]
    ValueTooLarge {
        /// The value's size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The named bucket does not exist.
    #[error("bucket {0:?} does not exist")]
    BucketNotFound(String),
    /// The database file is locked by another process (or another open handle).
    #[error("{} is locked by another process", .0.display())]
    Locked(PathBuf),
    /// A read or compaction below the compacted revision (etcd's `mvcc.ErrCompacted`).
    #[error("mvcc: required revision has been compacted")]
    Compacted,
    /// A read or compaction above the current revision (etcd's `mvcc.ErrFutureRev`).
    #[error("mvcc: required revision is a future revision")]
    FutureRev,
    /// A request that needs an existing key found none (etcd's `ErrKeyNotFound`).
    #[error("etcdserver: key not found")]
    KeyNotFound,
    /// A request without a key (etcd's `ErrEmptyKey`).
    #[error("etcdserver: key is not provided")]
    EmptyKey,
    /// `ignore_value` with a value (etcd's `ErrValueProvided`).
    #[error("etcdserver: value is provided")]
    ValueProvided,
    /// `ignore_lease` with a lease (etcd's `ErrLeaseProvided`).
    #[error("etcdserver: lease is provided")]
    LeaseProvided,
    /// A txn writes one key twice, or writes a key it deletes (etcd's `ErrDuplicateKey`).
    #[error("etcdserver: duplicate key given in txn request")]
    DuplicateKey,
    /// A txn with more operations than allowed (etcd's `ErrTooManyOps`).
    #[error("etcdserver: too many operations in txn request")]
    TooManyOps,
    /// A request over `--max-request-bytes` (etcd's `ErrRequestTooLarge`).
    #[error("etcdserver: request is too large")]
    RequestTooLarge,
    /// The backend would exceed its quota (etcd's `ErrNoSpace`).
    #[error("etcdserver: mvcc: database space exceeded")]
    NoSpace,
    /// A response would exceed the largest message the server sends (etcd's gRPC send limit).
    #[error(
        "etcdserver: range response exceeds the {limit}-byte message limit (use a limit and page, or RangeStream)"
    )]
    ResponseTooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// No raft leader to take the request (etcd's `ErrNoLeader`).
    #[error("etcdserver: no leader")]
    NoLeader,
    /// The member is stopping, or its storage core has stopped (etcd's `ErrStopped`).
    #[error("etcdserver: server stopped")]
    Stopped,
    /// A proposal or read was not done in time (etcd's `ErrTimeout`).
    #[error("etcdserver: request timed out")]
    Timeout,
    /// The same, right after a leader change (etcd's `ErrTimeoutDueToLeaderFail`).
    #[error("etcdserver: request timed out, possibly due to previous leader failure")]
    TimeoutDueToLeaderFail,
    /// The same, while the leader was cut off from its peers (etcd's
    /// `ErrTimeoutDueToConnectionLost`).
    #[error("etcdserver: request timed out, possibly due to connection lost")]
    TimeoutDueToConnectionLost,
    /// The leader changed while a linearizable read waited (etcd's `ErrLeaderChanged`).
    #[error("etcdserver: leader changed")]
    LeaderChanged,
    /// Too much is queued already (etcd's `ErrTooManyRequests`).
    #[error("etcdserver: too many requests")]
    TooManyRequests,
    /// No member has that ID (etcd's `ErrMemberNotFound`).
    #[error("etcdserver: member not found")]
    MemberNotFound,
    /// A member with that ID exists already (etcd's `ErrIDExists`).
    #[error("etcdserver: member ID already exist")]
    MemberExists,
    /// That ID was removed and cannot come back (etcd's `ErrIDRemoved`).
    #[error("etcdserver: member ID removed")]
    MemberRemoved,
    /// Another member has one of these peer URLs (etcd's `ErrPeerURLexists`).
    #[error("etcdserver: Peer URLs already exists")]
    PeerUrlExists,
    /// Peer URLs that do not parse (etcd's `ErrMemberBadURLs`).
    #[error("etcdserver: given member URLs are invalid")]
    MemberBadUrls,
    /// The change would leave too few started voters for a quorum (etcd's
    /// `ErrNotEnoughStartedMembers`).
    #[error("etcdserver: re-configuration failed due to not enough started members")]
    NotEnoughStartedMembers,
    /// Promoting a voter (etcd's `ErrMemberNotLearner`).
    #[error("etcdserver: can only promote a learner member")]
    MemberNotLearner,
    /// Promoting a learner behind the leader (etcd's `ErrLearnerNotReady`).
    #[error("etcdserver: can only promote a learner member which is in sync with leader")]
    LearnerNotReady,
    /// A second learner (etcd's `ErrTooManyLearners`).
    #[error("etcdserver: too many learner members in cluster")]
    TooManyLearners,
    /// A request a learner does not serve (etcd's `ErrGRPCNotSupportedForLearner`).
    #[error("etcdserver: rpc not supported for learner")]
    NotSupportedForLearner,
    /// A request that only the leader serves reached another member (etcd's `ErrNotLeader`).
    #[error("etcdserver: not leader")]
    NotLeader,
    /// A reconfiguration while this member has not reached every voter for a while (etcd's
    /// `ErrUnhealthy`).
    #[error("etcdserver: unhealthy cluster")]
    Unhealthy,
    /// A leader transfer to a member that is not a voter (etcd's `ErrBadLeaderTransferee`).
    #[error("etcdserver: bad leader transferee")]
    BadLeaderTransferee,
    /// A write made while no leader was known, and none was known within the request timeout:
    /// etcd's raft node holds a proposal until there is a leader, and etcd answers with its
    /// context's error (gRPC's Unknown, this message).
    #[error("context deadline exceeded")]
    NoLeaderDeadline,
    /// The leader transfer did not finish in time (etcd's `ErrTimeoutLeaderTransfer`).
    #[error("etcdserver: request timed out, leader transfer took too long")]
    LeaderTransferTimeout,
    /// A CORRUPT alarm is active: the cluster refuses writes (etcd's `ErrCorrupt`).
    #[error("etcdserver: corrupt cluster")]
    Corrupt,
    /// An authentication or authorization error (etcd's `auth` package).
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// A put names a lease that does not exist (etcd's `ErrLeaseNotFound`).
    #[error("etcdserver: requested lease not found")]
    LeaseNotFound,
    /// A grant of an ID in use (etcd's `ErrLeaseExist`).
    #[error("etcdserver: lease already exists")]
    LeaseExists,
    /// A grant above etcd's `MaxLeaseTTL` (`ErrLeaseTTLTooLarge`).
    #[error("etcdserver: too large lease TTL")]
    LeaseTtlTooLarge,
}

impl Error {
    /// Whether this error means the member's own state can no longer be trusted (an I/O
    /// failure, a poisoned WAL or backend, corruption): a server stops rather than continue on
    /// it. The others concern one request.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            Error::Io { .. }
                | Error::Corruption { .. }
                | Error::CorruptPage { .. }
                | Error::CorruptRecord(_)
                | Error::Poisoned(_)
                | Error::Closed
        )
    }

    /// Wraps an I/O error with the operation and path it concerns.
    pub fn io(
        op: &'static str,
        path: impl Into<PathBuf>,
        source: impl Into<std::io::Error>,
    ) -> Self {
        Error::Io {
            op,
            path: path.into(),
            source: Arc::new(source.into()),
        }
    }

    /// A corruption error at `offset` of `path`.
    pub fn corruption(path: impl Into<PathBuf>, offset: u64, reason: impl Into<String>) -> Self {
        Error::Corruption {
            path: path.into(),
            offset,
            reason: reason.into(),
        }
    }
}

/// etcd's authentication errors (`auth/store.go`), with the messages etcd's clients match on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("etcdserver: root user does not exist")]
    RootUserNotExist,
    #[error("etcdserver: root user does not have root role")]
    RootRoleNotExist,
    #[error("etcdserver: user name already exists")]
    UserAlreadyExist,
    #[error("etcdserver: user name is empty")]
    UserEmpty,
    #[error("etcdserver: user name not found")]
    UserNotFound,
    #[error("etcdserver: role name already exists")]
    RoleAlreadyExist,
    #[error("etcdserver: role name not found")]
    RoleNotFound,
    #[error("etcdserver: role name is empty")]
    RoleEmpty,
    #[error("etcdserver: authentication failed, invalid user ID or password")]
    AuthFailed,
    #[error("etcdserver: permission denied")]
    PermissionDenied,
    #[error("etcdserver: role is not granted to the user")]
    RoleNotGranted,
    #[error("etcdserver: permission is not granted to the role")]
    PermissionNotGranted,
    #[error("etcdserver: authentication is not enabled")]
    AuthNotEnabled,
    #[error("etcdserver: invalid auth token")]
    InvalidAuthToken,
    #[error("etcdserver: invalid auth management")]
    InvalidAuthMgmt,
    #[error("etcdserver: revision of auth store is old")]
    AuthOldRevision,
    /// Not in etcd's gRPC error map: clients see gRPC's Unknown with this text.
    #[error("auth: authentication failed, password was given for no password user")]
    NoPasswordUser,
    /// Keel's own: Authenticate calls from one client address beyond the rate limit.
    #[error("etcdserver: too many authentication attempts, retry later")]
    TooManyAttempts,
}
