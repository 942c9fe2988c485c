//! `keel-bench`: etcd's `benchmark` command line (global flags, `put`, `range`, `txn-put`,
//! `txn-mixed`, `mvcc put`) speaking plain etcd v3 gRPC, so one tool measures Keel and etcd alike;
//! plus `compare`, which runs the etcd docs' workload table on both, side by side.
//!
//! - [`client`]: connections, TLS, authentication, error classification.
//! - [`run`]: the concurrent runner (clients, connections, rate, progress, compaction).
//! - [`workloads`]: the requests of each subcommand. [`mvcc`]: the engine without network.
//! - [`noop`]: a no-op KV server on keel's network stack (the floor of any server on it).
//! - [`watchlease`]: `watch-latency` and `lease-keepalive`.
//! - [`report`]: latency histograms and etcd's report layout, or JSON.
//! - [`compare`]: the side-by-side comparison against etcd; [`storesize`]: the same as the store
//!   grows (load, reads, restart). [`ports`]: free loopback ports.

pub mod client;
pub mod compare;
pub mod mvcc;
pub mod noop;
pub mod ports;
pub mod report;
pub mod run;
pub mod storesize;
pub mod watchlease;
pub mod workloads;
