//! The gRPC services clients use, one file each, plus the one place engine errors become etcd's
//! gRPC statuses ([`convert`]).
//!
//! - [`kv`]: the KV service (Range, Put, DeleteRange, Txn, Compact, RangeStream).
//! - [`watch`]: the Watch service, with its hubs of synced and unsynced watchers.
//! - [`lease`]: the Lease service.
//!
//! Requests are validated here, on the network threads, as etcd's `v3rpc` does; writes go to
//! the storage core (`crate::raft::Core`) already encoded and checked, reads are served here from
//! a read view of the store.

pub mod cluster;
pub mod convert;
pub mod kv;
pub mod lease;
pub mod watch;
