//! The etcd v3 Cluster gRPC service: the members as of the applied index (`MemberList`); the
//! members' own names and client URLs arrive through raft as each member publishes them.

use keel_proto::etcdserverpb as pb;
use tonic::{Request, Response, Status};

use crate::membership::Member;
use crate::raft::Core;

/// The Cluster service.
#[derive(Debug, Clone)]
pub struct ClusterService {
    core: Core,
}

impl ClusterService {
    pub fn new(core: Core) -> Self {
        ClusterService { core }
    }

    fn header(&self) -> Option<pb::ResponseHeader> {
        self.core
            .header()
            .with(self.core.store().current_revision())
    }

    fn members(&self) -> Vec<pb::Member> {
        self.core.members().members.values().map(to_pb).collect()
    }
}

/// A member as etcd's API lists it.
pub fn to_pb(m: &Member) -> pb::Member {
    pb::Member {
        id: m.id,
        name: m.name.clone(),
        peer_ur_ls: m.peer_urls.clone(),
        client_ur_ls: m.client_urls.clone(),
        is_learner: m.is_learner,
    }
}

/// Membership changes arrive with runtime reconfiguration; until then they are refused with a
/// clear reason rather than half-done.
fn not_yet(what: &str) -> Status {
    Status::failed_precondition(format!(
        "etcdserver: {what}: runtime reconfiguration is not available in this version of Keel \
         (the membership is the one bootstrapped with --initial-cluster)"
    ))
}

#[tonic::async_trait]
impl pb::cluster_server::Cluster for ClusterService {
    async fn member_add(
        &self,
        _request: Request<pb::MemberAddRequest>,
    ) -> Result<Response<pb::MemberAddResponse>, Status> {
        Err(not_yet("member add"))
    }

    async fn member_remove(
        &self,
        _request: Request<pb::MemberRemoveRequest>,
    ) -> Result<Response<pb::MemberRemoveResponse>, Status> {
        Err(not_yet("member remove"))
    }

    async fn member_update(
        &self,
        _request: Request<pb::MemberUpdateRequest>,
    ) -> Result<Response<pb::MemberUpdateResponse>, Status> {
        Err(not_yet("member update"))
    }

    async fn member_list(
        &self,
        _request: Request<pb::MemberListRequest>,
    ) -> Result<Response<pb::MemberListResponse>, Status> {
        Ok(Response::new(pb::MemberListResponse {
            header: self.header(),
            members: self.members(),
        }))
    }

    async fn member_promote(
        &self,
        _request: Request<pb::MemberPromoteRequest>,
    ) -> Result<Response<pb::MemberPromoteResponse>, Status> {
        Err(not_yet("member promote"))
    }
}
