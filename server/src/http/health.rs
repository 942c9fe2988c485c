//! `/health`, as etcd 3.4's: healthy only if the storage core runs, a leader is known, no alarm
//! is active, and a request through raft (etcd's QGET; here an alarm list, which changes
//! nothing) is applied within one second. It is written to the leader's WAL and applied here,
//! so a member whose disk hangs, or that cannot commit, says so even when no client writes,
//! and load balancers and supervisors act on it. Healthy: `200 {"health":"true"}`; otherwise `503 {"health":"false"}` and a
//! newline, byte for byte as etcd.

use std::time::Duration;

use axum::http::StatusCode;

use crate::raft::Core;

/// How long the health check's request may take (etcd: 1 s).
const READ_TIMEOUT: Duration = Duration::from_secs(1);

/// The alarm names a `/health?exclude=NAME&exclude=…` query asks to ignore (etcd 3.4.23).
fn excluded(query: Option<&str>) -> Vec<String> {
    query
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.strip_prefix("exclude="))
        .filter(|v| !v.is_empty())
        .map(str::to_string)
        .collect()
}

/// Why the member is unhealthy, if it is; alarms named in `exclude` do not count.
pub async fn check(core: &Core, exclude: &[String]) -> Result<(), String> {
    if !core.alive() {
        return Err("the storage core has stopped".into());
    }
    for alarm in core.alarms().get(0) {
        let name = crate::alarm::name(alarm.alarm);
        if !exclude.contains(&name) {
            return Err(format!("due to memberID:{} alarm:{name} ", alarm.member_id));
        }
    }
    if core.leader() == 0 {
        return Err("no leader".into());
    }
    let probe = crate::raft::Request::Alarm(keel_proto::etcdserverpb::AlarmRequest::default());
    match tokio::time::timeout(READ_TIMEOUT, core.write(probe)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("QGET failed: {e}")),
        Err(_) => Err("QGET timed out".into()),
    }
}

/// The `/health` handler.
pub async fn health(core: Core, uri: axum::http::Uri) -> (StatusCode, &'static str) {
    match check(&core, &excluded(uri.query())).await {
        Ok(()) => {
            core.metrics().health_success.inc();
            (StatusCode::OK, r#"{"health":"true"}"#)
        }
        Err(why) => {
            core.metrics().health_failures.inc();
            tracing::warn!("/health error; {why} (status code 503)");
            (StatusCode::SERVICE_UNAVAILABLE, "{\"health\":\"false\"}\n")
        }
    }
}
