//! `keel-bench noop-server`: etcd's KV service with handlers that do nothing, served on keel's
//! own network stack (`keel::net`: the same runtime, listener and tonic/hyper/h2 settings as a
//! member's client URLs). Every request is decoded and answered with an empty response carrying
//! a header like a member's, so the client sends and receives the same bytes as against keel.
//! The server CPU per request it measures is the floor of any request/response server on this
//! stack: `compare` reports keel's throughput as a fraction of it.

use std::net::SocketAddr;

use keel_proto::etcdserverpb as pb;
use pb::kv_server::{Kv, KvServer};
use tonic::{Request, Response, Status};

/// The no-op KV service.
#[derive(Debug, Clone, Default)]
struct Noop;

/// A response header as a single member sends it (IDs and numbers of a realistic size).
fn header() -> Option<pb::ResponseHeader> {
    Some(pb::ResponseHeader {
        cluster_id: 0xcdf8_1819_4e3a_8c32,
        member_id: 0x8e9e_05c5_2164_694d,
        revision: 100_000,
        raft_term: 2,
    })
}

#[tonic::async_trait]
impl Kv for Noop {
    async fn range(
        &self,
        _: Request<pb::RangeRequest>,
    ) -> Result<Response<pb::RangeResponse>, Status> {
        Ok(Response::new(pb::RangeResponse {
            header: header(),
            ..Default::default()
        }))
    }

    type RangeStreamStream =
        futures::stream::Once<std::future::Ready<Result<pb::RangeStreamResponse, Status>>>;

    async fn range_stream(
        &self,
        _: Request<pb::RangeRequest>,
    ) -> Result<Response<Self::RangeStreamStream>, Status> {
        Ok(Response::new(futures::stream::once(std::future::ready(
            Ok(pb::RangeStreamResponse {
                range_response: Some(pb::RangeResponse {
                    header: header(),
                    ..Default::default()
                }),
            }),
        ))))
    }

    async fn put(&self, _: Request<pb::PutRequest>) -> Result<Response<pb::PutResponse>, Status> {
        Ok(Response::new(pb::PutResponse {
            header: header(),
            ..Default::default()
        }))
    }

    async fn delete_range(
        &self,
        _: Request<pb::DeleteRangeRequest>,
    ) -> Result<Response<pb::DeleteRangeResponse>, Status> {
        Ok(Response::new(pb::DeleteRangeResponse {
            header: header(),
            ..Default::default()
        }))
    }

    async fn txn(&self, _: Request<pb::TxnRequest>) -> Result<Response<pb::TxnResponse>, Status> {
        Ok(Response::new(pb::TxnResponse {
            header: header(),
            succeeded: true,
            ..Default::default()
        }))
    }

    async fn compact(
        &self,
        _: Request<pb::CompactionRequest>,
    ) -> Result<Response<pb::CompactionResponse>, Status> {
        Ok(Response::new(pb::CompactionResponse { header: header() }))
    }
}

/// Serves the no-op KV service on `addr` with `threads` network threads until the process is
/// stopped.
pub fn serve(addr: SocketAddr, threads: usize) -> anyhow::Result<()> {
    let runtime = keel::net::runtime(threads)?;
    runtime.block_on(async {
        let incoming = keel::net::bind(addr)?;
        eprintln!("keel-bench: no-op KV server listening on {addr}");
        // keel's own defaults (etcd's): the same stack as a member's client listeners.
        let options = keel::net::ClientOptions::default();
        // The service itself, as a member serves each gRPC service (`keel::api::dispatch`).
        keel::net::serve_service(
            incoming,
            KvServer::new(Noop),
            options,
            std::future::pending(),
        )
        .await?;
        Ok(())
    })
}
