//! Keel's storage engine: everything that touches the disk, and nothing that touches the network.
//!
//! # Layout
//! - [`wal`]: the write-ahead log (segments, record framing, group commit, recovery) and the
//!   raft-rs `Storage` over it. Runs on a glommio executor: the storage core.
//! - [`btree`]: the backend: an mmap'd copy-on-write B+tree file with named buckets, lock-free
//!   readers, deferred durability and defragmentation.
//! - [`error`]: the engine's error type (I/O, corruption and bad input kept apart).
//!
//! The B+tree backend, the MVCC store and leases join this crate in later steps.

pub mod btree;
pub mod error;
pub mod wal;

pub use error::{Error, Result};
