//! The etcd v3 Lease gRPC service, as etcd's `v3rpc/lease.go` and `v3_server.go`: grants and
//! revocations go through raft; keep-alives renew on the leader (a follower forwards them over
//! the peer transport); TimeToLive asks the leader too; Leases reads the applied lease table.

use std::pin::Pin;

use futures::{Stream, StreamExt};
use keel_engine::Error;
use keel_engine::lease::MAX_LEASE_TTL;
use keel_proto::etcdserverpb as pb;
use rand::Rng;
use tonic::{Request, Response, Status, Streaming};

use super::convert::status;
use crate::raft::{Applied, Core, Request as Write};
use crate::server::Shutdown;

/// The Lease service.
#[derive(Debug, Clone)]
pub struct LeaseService {
    core: Core,
    gate: crate::auth::gate::Gate,
    shutdown: Shutdown,
    /// `--quota-backend-bytes`.
    quota_bytes: u64,
}

/// etcd's quota cost of a lease (`leaseOverhead`).
const LEASE_OVERHEAD: u64 = 64;

impl LeaseService {
    /// The service; its keep-alive streams end when `shutdown` fires.
    pub fn new(
        core: Core,
        gate: crate::auth::gate::Gate,
        shutdown: Shutdown,
        quota_bytes: u64,
    ) -> Self {
        LeaseService {
            core,
            gate,
            shutdown,
            quota_bytes,
        }
    }

    fn revision(&self) -> i64 {
        self.core.store().current_revision()
    }
}

fn unexpected(other: Applied) -> Status {
    Status::internal(format!("unexpected result {other:?}"))
}

/// A keep-alive: the lease's TTL after renewal, or 0 if it does not exist (etcd answers a
/// keep-alive of an unknown or expired lease with TTL 0, not an error).
/// On a follower the keep-alive is forwarded to the leader, which alone renews leases.
async fn renew(core: &Core, id: i64) -> Result<pb::LeaseKeepAliveResponse, Status> {
    let ttl = core.lease_renew(id).await.map_err(|e| status(&e))?;
    Ok(pb::LeaseKeepAliveResponse {
        header: core.header().with(core.store().current_revision()),
        id,
        ttl,
    })
}

#[tonic::async_trait]
impl pb::lease_server::Lease for LeaseService {
    async fn lease_grant(
        &self,
        request: Request<pb::LeaseGrantRequest>,
    ) -> Result<Response<pb::LeaseGrantResponse>, Status> {
        super::kv::quota(&self.core, self.quota_bytes, LEASE_OVERHEAD).await?;
        // No permission to check (etcd 3.4), but a bad token is refused.
        self.gate.check(&request).await?;
        let mut r = request.into_inner();
        if r.ttl > MAX_LEASE_TTL {
            return Err(status(&Error::LeaseTtlTooLarge));
        }
        if r.id == 0 {
            // etcd generates a positive 63-bit ID from a member-unique counter; a random one not
            // in use serves the same purpose.
            let mut rng = rand::rng();
            let lessor = self.core.lessor();
            r.id = loop {
                let id = rng.random_range(1..i64::MAX);
                if lessor.get(id).is_none() {
                    break id;
                }
            };
        }
        self.core
            .lessor()
            .check_grant(r.id, r.ttl)
            .map_err(|e| status(&e))?;
        match self.core.write(Write::LeaseGrant(r)).await {
            Ok(Applied::LeaseGrant { id, ttl, revision }) => {
                Ok(Response::new(pb::LeaseGrantResponse {
                    // The revision when it was applied, as etcd's applier answers.
                    header: self.core.header().with(revision),
                    id,
                    ttl,
                    error: String::new(),
                }))
            }
            Ok(other) => Err(unexpected(other)),
            Err(e) => Err(status(&e)),
        }
    }

    async fn lease_revoke(
        &self,
        request: Request<pb::LeaseRevokeRequest>,
    ) -> Result<Response<pb::LeaseRevokeResponse>, Status> {
        let checked = self.gate.check(&request).await?;
        let r = request.into_inner();
        if self.core.lessor().get(r.id).is_none() {
            // Maybe granted through another member and not applied here yet: etcd always
            // proposes the revoke. Catch up to the cluster's commit index before saying so
            // (the permission check below needs the lease's keys).
            self.core.linearizable().await.map_err(|e| status(&e))?;
            if self.core.lessor().get(r.id).is_none() {
                return Err(status(&Error::LeaseNotFound));
            }
        }
        // etcd: write permission on every key attached to the lease.
        if checked.state.enabled {
            let keys = self.core.lessor().keys_of(r.id).unwrap_or_default();
            for k in keys {
                checked.write(&k, b"")?;
            }
        }
        match self
            .core
            .write_stamped(Write::LeaseRevoke(r), Some(checked.stamp()))
            .await
        {
            Ok(Applied::LeaseRevoke { revision }) => Ok(Response::new(pb::LeaseRevokeResponse {
                // The revision of its deletes, not the store's when the reply leaves.
                header: self.core.header().with(revision),
            })),
            Ok(other) => Err(unexpected(other)),
            Err(e) => Err(status(&e)),
        }
    }

    type LeaseKeepAliveStream =
        Pin<Box<dyn Stream<Item = Result<pb::LeaseKeepAliveResponse, Status>> + Send + 'static>>;

    async fn lease_keep_alive(
        &self,
        request: Request<Streaming<pb::LeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::LeaseKeepAliveStream>, Status> {
        let core = self.core.clone();
        let stop = self.shutdown.clone();
        let stream = request
            .into_inner()
            .take_until(async move { stop.wait().await })
            .then(move |req| {
                let core = core.clone();
                async move {
                    match req {
                        Ok(r) => renew(&core, r.id).await,
                        Err(s) => Err(s),
                    }
                }
            });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn lease_time_to_live(
        &self,
        request: Request<pb::LeaseTimeToLiveRequest>,
    ) -> Result<Response<pb::LeaseTimeToLiveResponse>, Status> {
        // The attached keys only to a caller who may read every one of them (etcd's fix of
        // CVE-2023-32082, in 3.4.26): their names are data too.
        let checked = if request.get_ref().keys {
            Some(self.gate.check(&request).await?)
        } else {
            None
        };
        let r = request.into_inner();
        // From the leader, which alone knows the remaining TTL (etcd answers an unknown lease
        // with TTL -1).
        let (ttl, granted_ttl, keys) = self
            .core
            .lease_time_to_live(r.id, r.keys)
            .await
            .map_err(|e| status(&e))?;
        if let Some(checked) = &checked
            && checked.state.enabled
        {
            for k in &keys {
                checked.read(k, b"")?;
            }
        }
        Ok(Response::new(pb::LeaseTimeToLiveResponse {
            header: self.core.header().with(self.revision()),
            id: r.id,
            ttl,
            granted_ttl,
            keys,
        }))
    }

    async fn lease_leases(
        &self,
        _request: Request<pb::LeaseLeasesRequest>,
    ) -> Result<Response<pb::LeaseLeasesResponse>, Status> {
        // The IDs are copied under the lessor's lock (which the storage core's applies take),
        // the answer built without it.
        let ids = self.core.lessor().ids_by_expiry();
        let leases = ids.into_iter().map(|id| pb::LeaseStatus { id }).collect();
        Ok(Response::new(pb::LeaseLeasesResponse {
            header: self.core.header().with(self.revision()),
            leases,
        }))
    }
}
