//! Keel's storage engine: everything that touches the disk, and nothing that touches the network.
//!
//! # Layout
//! - [`wal`]: the write-ahead log (segments, record framing, group commit, recovery) and the
//!   raft-rs `Storage` over it. Runs on a glommio executor: the storage core.
//! - [`btree`]: the backend: an mmap'd copy-on-write B+tree file with named buckets, lock-free
//!   readers, deferred durability and defragmentation.
//! - [`mvcc`]: etcd's multi-version store on the backend: revisions, key index, range/put/
//!   delete/txn/compact with etcd's semantics, Hash and HashKV.
//! - [`error`]: the engine's error type (I/O, corruption and bad input kept apart).
//!
//! - [`lease`]: etcd's lessor: grants, attached keys, revocation, expiry, checkpoints.

pub mod btree;
pub mod error;
pub mod lease;
pub mod mvcc;
pub mod wal;

pub use error::{Error, Result};
