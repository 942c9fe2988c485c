//! The etcd v3 Maintenance gRPC service, as etcd 3.4's `v3rpc/maintenance.go`:
//!
//! - `Status`: version, backend sizes, leader, raft indexes and term, alarms and "etcdserver:
//!   no leader" in `errors`, whether this member is a learner;
//! - `Hash` (every bucket but the raft position), `HashKV` (etcd's, equal on every member and
//!   to etcd's for the same history), both computed on a blocking thread;
//! - `Alarm`: every action goes through raft, as in etcd, so all members hold the same alarms;
//! - `MoveLeader`: only the leader accepts it, and only toward a voter;
//! - `Defragment`: the backend rewritten compactly beside the writer; writes wait only for the
//!   last catch-up round and the switch (see `keel_engine::btree::defrag`).
//!
//! - `Snapshot`: the backend in etcd's bbolt format with etcd's sha256 trailer (`snapshot.rs`).
//!
//! `Downgrade` is etcd 3.5's and unknown to 3.4: `Unimplemented`, as etcd 3.4 answers (on a client URL
//! the dispatch answers before the request is decoded, as grpc-go; this handler answers the JSON
//! gateway's calls).

use std::time::{Duration, Instant};

use keel_engine::Error;
use keel_proto::etcdserverpb as pb;
use tonic::{Request, Response, Status};

use super::convert::status;
use crate::metrics::ETCD_VERSION;
use crate::raft::{Applied, Core, Request as Write};

/// The Maintenance service.
#[derive(Debug, Clone)]
pub struct MaintenanceService {
    core: Core,
    gate: crate::auth::gate::Gate,
    /// How long `MoveLeader` waits for the transferee to lead (etcd: the request timeout).
    transfer_timeout: Duration,
    /// How often it looks (etcd: one heartbeat).
    heartbeat: Duration,
}

impl MaintenanceService {
    pub fn new(
        core: Core,
        gate: crate::auth::gate::Gate,
        transfer_timeout: Duration,
        heartbeat: Duration,
    ) -> Self {
        MaintenanceService {
            core,
            gate,
            transfer_timeout,
            heartbeat,
        }
    }

    fn header(&self, revision: i64) -> Option<pb::ResponseHeader> {
        self.core.header().with(revision)
    }
}

/// Raises alarm `kind` for this member unless it is active already (etcd's `quotaAlarmer`).
pub async fn raise(core: &Core, kind: pb::AlarmType) {
    let me = core.ids().1;
    if core
        .alarms()
        .get(kind as i32)
        .iter()
        .any(|m| m.member_id == me)
    {
        return;
    }
    let request = pb::AlarmRequest {
        action: pb::alarm_request::AlarmAction::Activate as i32,
        member_id: me,
        alarm: kind as i32,
    };
    if let Err(e) = core.write(Write::Alarm(request)).await {
        tracing::warn!(error = %e, alarm = kind.as_str_name(), "could not raise an alarm");
    }
}

/// Runs `f` on a blocking thread; a panic or a stopped runtime is an internal error.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> keel_engine::Result<T> + Send + 'static,
) -> Result<T, Status> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(|e| status(&e)),
        Err(e) => Err(Status::internal(format!("maintenance task failed: {e}"))),
    }
}

#[tonic::async_trait]
impl pb::maintenance_server::Maintenance for MaintenanceService {
    async fn alarm(
        &self,
        request: Request<pb::AlarmRequest>,
    ) -> Result<Response<pb::AlarmResponse>, Status> {
        // No permission is needed (etcd's auth applier has none for alarms), but a token sent
        // must be valid: etcd reads it when proposing. etcd's Alarm returns its errors as they
        // are, not as gRPC statuses, so grpc-go sends them as `Unknown` with their text (the
        // auth package's says "auth: ").
        if let Err(s) = self.gate.check(&request).await {
            return Err(Status::unknown(s.message().replacen(
                "etcdserver: ",
                "auth: ",
                1,
            )));
        }
        let r = request.into_inner();
        if pb::alarm_request::AlarmAction::try_from(r.action).is_err() {
            return Err(Status::invalid_argument(format!(
                "unknown alarm action {}",
                r.action
            )));
        }
        if pb::AlarmType::try_from(r.alarm).is_err() {
            return Err(Status::invalid_argument(format!(
                "unknown alarm type {}",
                r.alarm
            )));
        }
        let alarms = match self.core.write(Write::Alarm(r)).await {
            Ok(Applied::Alarms(a)) => a,
            Ok(other) => return Err(Status::internal(format!("unexpected result {other:?}"))),
            Err(e) => return Err(Status::unknown(e.to_string())),
        };
        // etcd's apply builds the response without a header, and nothing fills one in.
        Ok(Response::new(pb::AlarmResponse {
            header: None,
            alarms,
        }))
    }

    async fn status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let store = self.core.store();
        let backend = store.backend();
        let (committed, applied) = self.core.indexes();
        let leader = self.core.leader();
        let mut errors = Vec::new();
        if leader == 0 {
            errors.push(Error::NoLeader.to_string());
        }
        errors.extend(self.core.alarms().describe());
        Ok(Response::new(pb::StatusResponse {
            header: self.header(store.current_revision()),
            version: ETCD_VERSION.to_string(),
            db_size: i64::try_from(backend.file_size()).unwrap_or(i64::MAX),
            db_size_in_use: i64::try_from(backend.size_in_use()).unwrap_or(i64::MAX),
            leader,
            raft_index: committed,
            raft_term: self.core.raft_term(),
            raft_applied_index: applied,
            errors,
            is_learner: self.core.is_learner(),
            ..Default::default()
        }))
    }

    async fn defragment(
        &self,
        request: Request<pb::DefragmentRequest>,
    ) -> Result<Response<pb::DefragmentResponse>, Status> {
        self.gate.check(&request).await?.admin_raw()?;
        let store = self.core.store();
        tracing::info!("starting defragment");
        let started = Instant::now();
        let report = blocking(move || store.backend().defrag())
            .await
            .inspect_err(|e| {
                tracing::warn!(error = %e.message(), "failed to defragment");
            })?;
        tracing::info!(
            size_before = report.size_before,
            size_after = report.size_after,
            rounds = report.rounds,
            leaves_while_writes_waited = report.locked_leaves,
            took = ?started.elapsed(),
            "finished defragment"
        );
        // etcd answers an empty DefragmentResponse, without a header.
        Ok(Response::new(pb::DefragmentResponse { header: None }))
    }

    async fn hash(
        &self,
        request: Request<pb::HashRequest>,
    ) -> Result<Response<pb::HashResponse>, Status> {
        self.gate.check(&request).await?.admin_raw()?;
        let store = self.core.store();
        let (hash, revision) = blocking(move || {
            let revision = store.current_revision();
            Ok((store.hash()?, revision))
        })
        .await?;
        Ok(Response::new(pb::HashResponse {
            header: self.header(revision),
            hash,
        }))
    }

    async fn hash_kv(
        &self,
        request: Request<pb::HashKvRequest>,
    ) -> Result<Response<pb::HashKvResponse>, Status> {
        self.gate.check(&request).await?.admin_raw()?;
        let rev = request.into_inner().revision;
        let store = self.core.store();
        let h = blocking(move || store.hash_kv(rev)).await?;
        Ok(Response::new(pb::HashKvResponse {
            header: self.header(h.revision),
            hash: h.hash,
            compact_revision: h.compact_revision,
            ..Default::default()
        }))
    }

    type SnapshotStream = super::snapshot::SnapshotStream;

    async fn snapshot(
        &self,
        request: Request<pb::SnapshotRequest>,
    ) -> Result<Response<Self::SnapshotStream>, Status> {
        self.gate.check(&request).await?.admin_raw()?;
        Ok(Response::new(super::snapshot::stream(&self.core)?))
    }

    async fn move_leader(
        &self,
        request: Request<pb::MoveLeaderRequest>,
    ) -> Result<Response<pb::MoveLeaderResponse>, Status> {
        let to = request.into_inner().target_id;
        let me = self.core.ids().1;
        if self.core.leader() != me {
            return Err(status(&Error::NotLeader));
        }
        let voter = self
            .core
            .members()
            .members
            .get(&to)
            .is_some_and(|m| !m.is_learner);
        if !voter {
            return Err(status(&Error::BadLeaderTransferee));
        }
        self.core
            .transfer_leader(to)
            .await
            .map_err(|e| status(&e))?;
        let deadline = Instant::now() + self.transfer_timeout;
        while self.core.leader() != to {
            if Instant::now() >= deadline {
                return Err(status(&Error::LeaderTransferTimeout));
            }
            tokio::time::sleep(self.heartbeat).await;
        }
        // etcd answers an empty MoveLeaderResponse, without a header.
        Ok(Response::new(pb::MoveLeaderResponse { header: None }))
    }

    async fn downgrade(
        &self,
        _request: Request<pb::DowngradeRequest>,
    ) -> Result<Response<pb::DowngradeResponse>, Status> {
        Err(Status::unimplemented(
            "unknown method Downgrade for service etcdserverpb.Maintenance",
        ))
    }
}
