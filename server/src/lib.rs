//! The `keel` server: configuration, storage core, raft, gRPC services, HTTP endpoints.
//!
//! # Layout
//! - [`config`]: etcd's command-line flags and `ETCD_*` environment variables, validated.
//!
//! The storage core, raft, the gRPC services and the HTTP endpoints join in the following steps
//! (see ARCHITECTURE.md).

pub mod config;
