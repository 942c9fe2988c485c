//! raft-rs's `Storage` as the storage core gives it to the raft node: the WAL's log, with two
//! things taken from the backend instead of the WAL's snapshot marker.
//!
//! - **The membership** ([`raft::Storage::initial_state`]): raft restarts at the backend's
//!   applied index (the consistent index), so its configuration must be the one *at* that index,
//!   which the backend records with every conf change (`meta` bucket, `confState`). The WAL's
//!   marker may be older: the WAL keeps entries behind the backend so that slow followers catch
//!   up from the log rather than by snapshot.
//! - **Snapshots** ([`raft::Storage::snapshot`]): a snapshot is the backend itself, so its
//!   metadata is the backend's applied index, that entry's term and the membership then. The
//!   storage core updates it after every apply batch ([`SnapshotMeta`]), and attaches the backend
//!   at exactly that index when it sends the snapshot.

use std::cell::RefCell;
use std::rc::Rc;

use keel_engine::wal::WalStorage;
use raft::eraftpb::{ConfState, Entry, Snapshot};
use raft::{GetEntriesContext, RaftState, StorageError};

/// The applied state a snapshot would carry now.
#[derive(Debug, Clone, Default)]
pub struct SnapshotMeta {
    /// The backend's applied index and that entry's term.
    pub index: u64,
    pub term: u64,
    /// The membership at that index.
    pub conf_state: ConfState,
}

/// The raft node's storage (see the module docs).
#[derive(Clone)]
pub struct RaftStorage {
    wal: WalStorage,
    applied: Rc<RefCell<SnapshotMeta>>,
}

impl RaftStorage {
    /// The WAL's log with the applied state `applied` (shared with the storage core, which
    /// keeps it current).
    pub fn new(wal: WalStorage, applied: Rc<RefCell<SnapshotMeta>>) -> Self {
        RaftStorage { wal, applied }
    }
}

impl raft::Storage for RaftStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let wal = self.wal.initial_state()?;
        Ok(RaftState::new(
            wal.hard_state,
            self.applied.borrow().conf_state.clone(),
        ))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        self.wal.entries(low, high, max_size, context)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        let applied = self.applied.borrow();
        if idx == applied.index && idx > 0 {
            return Ok(applied.term);
        }
        drop(applied);
        self.wal.term(idx)
    }

    fn first_index(&self) -> raft::Result<u64> {
        self.wal.first_index()
    }

    fn last_index(&self) -> raft::Result<u64> {
        self.wal.last_index()
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        let applied = self.applied.borrow();
        if applied.index < request_index || applied.index == 0 {
            return Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        let mut snap = Snapshot::default();
        let meta = snap.mut_metadata();
        meta.index = applied.index;
        meta.term = applied.term;
        meta.set_conf_state(applied.conf_state.clone());
        Ok(snap)
    }
}
