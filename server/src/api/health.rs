//! gRPC's standard health service (`grpc.health.v1.Health`), as etcd 3.4 registers it on its
//! client URLs: grpc-go's `health.Server` with the empty service name serving. `Check("")`
//! answers `SERVING`; any other name `NotFound` "unknown service". `Watch` sends the status at
//! once (`SERVICE_UNKNOWN` for another name) and then stays open, as the status never changes,
//! until the client leaves or the member stops. (The member's own health, leader and alarms
//! included, is `/health`; etcd's gRPC health does not look at them.)

use std::pin::Pin;

use futures::{Stream, StreamExt as _};
use keel_proto::health as pb;
use pb::health_check_response::ServingStatus;
use tonic::{Request, Response, Status};

use crate::server::Shutdown;

/// The health service.
#[derive(Clone)]
pub struct HealthService {
    shutdown: Shutdown,
}

impl HealthService {
    /// Its `Watch` streams end when `shutdown` fires.
    pub fn new(shutdown: Shutdown) -> Self {
        HealthService { shutdown }
    }
}

/// The one service name with a status: the empty name, for the whole server.
fn status_of(service: &str) -> Option<ServingStatus> {
    service.is_empty().then_some(ServingStatus::Serving)
}

#[tonic::async_trait]
impl pb::health_server::Health for HealthService {
    async fn check(
        &self,
        request: Request<pb::HealthCheckRequest>,
    ) -> Result<Response<pb::HealthCheckResponse>, Status> {
        match status_of(&request.into_inner().service) {
            Some(status) => Ok(Response::new(pb::HealthCheckResponse {
                status: status as i32,
            })),
            None => Err(Status::not_found("unknown service")),
        }
    }

    type WatchStream =
        Pin<Box<dyn Stream<Item = Result<pb::HealthCheckResponse, Status>> + Send + 'static>>;

    async fn watch(
        &self,
        request: Request<pb::HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let status =
            status_of(&request.into_inner().service).unwrap_or(ServingStatus::ServiceUnknown);
        let stop = self.shutdown.clone();
        let stream = futures::stream::once(async move {
            Ok(pb::HealthCheckResponse {
                status: status as i32,
            })
        })
        .chain(futures::stream::pending())
        .take_until(async move { stop.wait().await });
        Ok(Response::new(Box::pin(stream)))
    }
}
