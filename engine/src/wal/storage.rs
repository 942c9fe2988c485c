//! raft-rs's [`raft::Storage`] over the WAL: the raft node reads its stable log from here.
//!
//! Reads come from the in-memory tail cache when they can, otherwise from the entry's segment
//! (a positioned read whose frame checksum is verified again). Nothing here panics on a request
//! outside the log; raft-rs gets its own error codes (`Compacted`, `Unavailable`).
//!
//! [`raft::Storage::snapshot`] returns the latest snapshot marker's metadata (index, term,
//! membership) with empty data: the snapshot's content is the MVCC backend, which the server
//! attaches when it sends a snapshot to a follower.

use std::cell::RefCell;
use std::rc::Rc;

use raft::eraftpb::{Entry, Snapshot};
use raft::{GetEntriesContext, RaftState, StorageError};

use super::Shared;
use crate::error::Error;

/// The raft-rs storage view of a [`super::Wal`]. Cheap to clone; shares the WAL's state.
#[derive(Clone)]
pub struct WalStorage {
    shared: Rc<RefCell<Shared>>,
}

impl WalStorage {
    pub(super) fn new(shared: Rc<RefCell<Shared>>) -> Self {
        WalStorage { shared }
    }
}

fn other(e: Error) -> raft::Error {
    raft::Error::Store(StorageError::Other(Box::new(e)))
}

impl raft::Storage for WalStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let s = self.shared.borrow();
        Ok(RaftState::new(
            s.log.hard_state.clone(),
            s.log.snapshot.conf_state.clone(),
        ))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let s = self.shared.borrow();
        if low < s.log.first_index() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > s.log.last_index() + 1 || low > high {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let max = max_size.into().unwrap_or(u64::MAX);
        // Stop reading once past the limit; raft's own accounting then trims exactly.
        let mut entries = s.read_entries(low, high, max).map_err(other)?;
        raft::util::limit_size(&mut entries, Some(max));
        Ok(entries)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        let s = self.shared.borrow();
        if idx < s.log.snapshot.index {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        s.log
            .term(idx)
            .ok_or(raft::Error::Store(StorageError::Unavailable))
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.shared.borrow().log.first_index())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.shared.borrow().log.last_index())
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        let s = self.shared.borrow();
        let marker = &s.log.snapshot;
        if marker.index < request_index {
            return Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        let mut snap = Snapshot::default();
        let meta = snap.mut_metadata();
        meta.index = marker.index;
        meta.term = marker.term;
        meta.set_conf_state(marker.conf_state.clone());
        Ok(snap)
    }
}
