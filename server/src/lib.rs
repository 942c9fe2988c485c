//! The `keel` server: configuration, storage core, raft, gRPC services, HTTP endpoints.
//!
//! # Layout
//! - [`config`]: etcd's command-line flags and `ETCD_*` environment variables, validated.
//! - [`core`]: the storage core: the raft node, the WAL and the MVCC write path on one pinned
//!   glommio thread, reached through a `Send + Clone` handle.
//! - [`kv`]: the KV gRPC service. [`convert`]: etcd's protobuf types to and from the engine's, and
//!   engine errors to etcd's gRPC statuses.
//! - [`watch`]: the Watch gRPC service: the hub of synced and unsynced watchers fed by the
//!   storage core.
//! - [`lease`]: the Lease gRPC service (the lease table itself is `keel_engine::lease`).
//! - [`compactor`]: auto compaction (`--auto-compaction-*`) as etcd's.
//! - [`metrics`]: Prometheus metrics under etcd's names.
//! - [`server`]: starting a member: listeners, HTTP endpoints, orderly stop.

pub mod compactor;
pub mod config;
pub mod convert;
pub mod core;
pub mod kv;
pub mod lease;
pub mod metrics;
pub mod server;
pub mod watch;
