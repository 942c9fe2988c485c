//! The proxy's Cluster service (etcd's `clusterProxy`): `MemberList` answers the proxy itself
//! (this host's name and `--advertise-client-url`), so that clients that sync their endpoints
//! from the member list keep using the proxy; with an empty `--advertise-client-url` it is the
//! cluster's list. The other calls are forwarded (etcd's proxy refuses `MemberPromote` as not
//! implemented; Keel's passes it on).

use keel_proto::etcdserverpb as pb;
use pb::cluster_client::ClusterClient;
use tonic::{Request, Response, Status};

use super::upstream::Upstream;

#[derive(Debug, Clone)]
pub struct ClusterProxy {
    upstream: Upstream,
    advertise: String,
}

impl ClusterProxy {
    pub fn new(upstream: Upstream, advertise: String) -> ClusterProxy {
        ClusterProxy {
            upstream,
            advertise,
        }
    }

    fn client(&self) -> ClusterClient<tonic::transport::Channel> {
        ClusterClient::new(self.upstream.channel())
    }
}

/// `request` for the cluster: the same message and the caller's metadata.
fn onward<T>(request: Request<T>) -> Request<T> {
    let (md, _, message) = request.into_parts();
    let mut r = Request::new(message);
    *r.metadata_mut() = md;
    r
}

#[tonic::async_trait]
impl pb::cluster_server::Cluster for ClusterProxy {
    async fn member_add(
        &self,
        request: Request<pb::MemberAddRequest>,
    ) -> Result<Response<pb::MemberAddResponse>, Status> {
        self.client().member_add(onward(request)).await
    }

    async fn member_remove(
        &self,
        request: Request<pb::MemberRemoveRequest>,
    ) -> Result<Response<pb::MemberRemoveResponse>, Status> {
        self.client().member_remove(onward(request)).await
    }

    async fn member_update(
        &self,
        request: Request<pb::MemberUpdateRequest>,
    ) -> Result<Response<pb::MemberUpdateResponse>, Status> {
        self.client().member_update(onward(request)).await
    }

    async fn member_list(
        &self,
        request: Request<pb::MemberListRequest>,
    ) -> Result<Response<pb::MemberListResponse>, Status> {
        if self.advertise.is_empty() {
            return self.client().member_list(onward(request)).await;
        }
        let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        Ok(Response::new(pb::MemberListResponse {
            header: None,
            members: vec![pb::Member {
                name: hostname.trim().to_string(),
                client_ur_ls: vec![self.advertise.clone()],
                ..Default::default()
            }],
        }))
    }

    async fn member_promote(
        &self,
        request: Request<pb::MemberPromoteRequest>,
    ) -> Result<Response<pb::MemberPromoteResponse>, Status> {
        self.client().member_promote(onward(request)).await
    }
}
