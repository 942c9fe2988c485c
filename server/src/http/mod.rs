//! The HTTP endpoints etcd serves on its client URLs, beside gRPC: `/health`, `/version`,
//! `/metrics`, and the JSON gateway of the v3 API under `/v3/` ([`grpc_gateway`]). None of them
//! waits for the storage core's apply or an fdatasync, except the one request through raft
//! `/health` makes on purpose (as etcd's QGET), bounded to one second.

pub mod access;
pub mod grpc_gateway;
pub mod health;

use axum::routing::get;

use crate::metrics::ETCD_VERSION;
use crate::raft::Core;

/// etcd answers `/version` with the server and cluster versions; Keel reports the etcd API level
/// it implements.
fn version_json() -> String {
    format!(r#"{{"etcdserver":"{ETCD_VERSION}","etcdcluster":"3.4.0"}}"#)
}

/// The router of the HTTP endpoints.
pub fn router(core: Core) -> axum::Router {
    axum::Router::new()
        .route(
            "/health",
            get({
                let core = core.clone();
                move |uri: axum::http::Uri| health::health(core.clone(), uri)
            }),
        )
        .route(
            "/version",
            get(|| async {
                (
                    [(axum::http::header::CONTENT_TYPE, "application/json")],
                    version_json(),
                )
            }),
        )
        .route(
            "/metrics",
            get(move || async move {
                let leases = core.lessor().len();
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    core.metrics().render(
                        &core.store(),
                        leases,
                        Some((core.ids().1, core.is_learner())),
                    ),
                )
            }),
        )
}
