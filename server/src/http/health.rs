//! `/health`, as etcd 3.4's: healthy only if the storage core runs, a leader is known, no alarm
//! is active, and a linearizable read (etcd's QGET) completes within one second. So a member
//! that cannot serve writes or linearizable reads says so, and load balancers and supervisors
//! act on it. Healthy: `200 {"health":"true"}`; otherwise `503 {"health":"false"}` and a
//! newline, byte for byte as etcd.

use std::time::Duration;

use axum::http::StatusCode;

use crate::raft::Core;

/// How long the health check's linearizable read may take (etcd: 1 s).
const READ_TIMEOUT: Duration = Duration::from_secs(1);

/// Why the member is unhealthy, if it is.
pub async fn check(core: &Core) -> Result<(), &'static str> {
    if !core.alive() {
        return Err("the storage core has stopped");
    }
    if core.leader() == 0 {
        return Err("no leader");
    }
    match tokio::time::timeout(READ_TIMEOUT, core.linearizable()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err("linearizable read failed"),
        Err(_) => Err("linearizable read timed out"),
    }
}

/// The `/health` handler.
pub async fn health(core: Core) -> (StatusCode, &'static str) {
    match check(&core).await {
        Ok(()) => (StatusCode::OK, r#"{"health":"true"}"#),
        Err(why) => {
            tracing::warn!("/health error; {why} (status code 503)");
            (StatusCode::SERVICE_UNAVAILABLE, "{\"health\":\"false\"}\n")
        }
    }
}
