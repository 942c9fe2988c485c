//! The gRPC services clients use, one file each, plus the one place engine errors become etcd's
//! gRPC statuses ([`convert`]).
//!
//! - [`kv`]: the KV service (Range, Put, DeleteRange, Txn, Compact, RangeStream).
//! - [`watch`]: the Watch service, with its hubs of synced and unsynced watchers.
//! - [`lease`]: the Lease service.
//! - [`lock`], [`election`]: the Lock and Election services (etcd's concurrency API), built as
//!   etcd builds them on its own client: [`v3client`] calls the KV, Lease and Watch services
//!   in process, with the caller's credentials.
//! - [`cluster`], [`maintenance`], [`snapshot`], [`auth`]: the Cluster, Maintenance (and its
//!   snapshot stream) and Auth services.
//!
//! Requests are validated here, on the network threads, as etcd's `v3rpc` does; writes go to
//! the storage core (`crate::raft::Core`) already encoded and checked, reads are served here from
//! a read view of the store.

pub mod auth;
pub mod cluster;
pub mod convert;
pub mod dispatch;
pub mod election;
pub mod health;
pub mod kv;
pub mod lease;
pub mod lock;
pub mod maintenance;
pub mod snapshot;
pub mod v3client;
pub mod watch;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;

use crate::raft::Core;

/// The metadata key (and value) etcd's clients send to require a leader
/// (`clientv3.WithRequireLeader`; etcdctl's watch sets it).
pub const REQUIRE_LEADER_KEY: &str = "hasleader";

/// Whether a request asks for a leader. (A `HeaderName` looks up without parsing the name: this
/// runs on every call.)
pub fn requires_leader(headers: &axum::http::HeaderMap) -> bool {
    static KEY: axum::http::HeaderName = axum::http::HeaderName::from_static(REQUIRE_LEADER_KEY);
    headers.get(&KEY).is_some_and(|v| v.as_bytes() == b"true")
}

/// Whether a call's metadata asks for a leader.
pub fn requires_leader_metadata(metadata: &tonic::metadata::MetadataMap) -> bool {
    metadata
        .get(REQUIRE_LEADER_KEY)
        .is_some_and(|v| v.as_bytes() == b"true")
}

/// [`dispatch::refusal`] as an axum middleware, for the router the JSON gateway calls.
pub async fn require_leader(State(core): State<Core>, request: Request, next: Next) -> Response {
    match dispatch::refusal(&core, request.uri().path(), request.headers()) {
        Some(status) => status.into_http::<axum::body::Body>(),
        None => next.run(request).await,
    }
}
