//! The `keel` server: configuration, storage core, raft, gRPC services, HTTP endpoints.
//!
//! # Layout
//! - [`config`]: etcd's command-line flags and `ETCD_*` environment variables, validated.
//! - [`server`]: starting a member: the data dir, listeners, an orderly stop, and an exit when
//!   the storage core stops on its own.
//! - [`raft`]: the storage core: the raft node, the WAL and the MVCC write path on one pinned
//!   glommio thread, reached through a `Send + Clone` handle (`raft::Core`). The path of a write
//!   runs `api` → `raft` (`node`: propose, persist; `apply`: apply, reply).
//! - [`api`]: the gRPC services clients use (KV, Watch, Lease), one file each, and the mapping of
//!   errors to etcd's statuses.
//! - [`http`]: `/health`, `/version`, `/metrics`.
//! - [`logging`]: etcd's `--logger` (plain or zap JSON lines) and `--log-outputs`.
//! - [`net`]: the network threads' runtime and the client listeners (gRPC and HTTP/1).
//! - [`notify`]: systemd's readiness protocol (`READY=1` once clients are served).
//! - [`membership`]: member and cluster IDs, as etcd derives them.
//! - [`compactor`]: auto compaction (`--auto-compaction-*`) as etcd's.
//! - [`metrics`]: Prometheus metrics under etcd's names.
//! - [`gateway`]: `keel gateway start`, etcd's L4 TCP gateway in front of a cluster.
//! - [`faults`]: fault injection for tests (environment variables, inert unless set).

pub mod alarm;
pub mod api;
pub mod auth;
pub mod compactor;
pub mod config;
pub mod corrupt;
pub mod discovery;
pub mod faults;
pub mod gateway;
pub mod grpc_proxy;
pub mod http;
pub mod logging;
pub mod membership;
pub mod metrics;
pub mod net;
pub mod notify;
pub mod raft;
pub mod server;
pub mod tls;
