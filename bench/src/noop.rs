//! `keel-bench noop-server`: etcd's KV service with handlers that do nothing, served on keel's
//! own network stack (`keel::net`: the same runtime, listener and tonic/hyper/h2 settings as a
//! member's client URLs). Every request is decoded and answered with a response of the size a
//! member's has: a header like a member's; a range answers one key-value of the requested key
//! with a value of `--range-value-size` bytes (what `compare` stored under the key it reads); a
//! txn answers one response per operation of its success branch. So the client sends and
//! receives the same bytes as against keel.
//! The server CPU per request it measures is the floor of any request/response server on this
//! stack: `compare` reports keel's throughput as a fraction of it.

use std::net::SocketAddr;

use keel_proto::etcdserverpb as pb;
use pb::kv_server::{Kv, KvServer};
use tonic::{Request, Response, Status};

/// The no-op KV service.
#[derive(Debug, Clone, Default)]
struct Noop {
    /// The value every range answers with.
    range_value: tonic::codegen::Bytes,
}

/// A response header as a single member sends it (IDs and numbers of a realistic size).
fn header() -> Option<pb::ResponseHeader> {
    Some(pb::ResponseHeader {
        cluster_id: 0xcdf8_1819_4e3a_8c32,
        member_id: 0x8e9e_05c5_2164_694d,
        revision: 100_000,
        raft_term: 2,
    })
}

impl Noop {
    /// A range's answer: one key-value, `key` with the configured value.
    fn range_response(&self, key: Vec<u8>) -> pb::RangeResponse {
        pb::RangeResponse {
            header: header(),
            kvs: vec![keel_proto::mvccpb::KeyValue {
                key: key.into(),
                create_revision: 2,
                mod_revision: 2,
                version: 1,
                value: self.range_value.clone(),
                lease: 0,
            }],
            count: 1,
            more: false,
        }
    }
}

#[tonic::async_trait]
impl Kv for Noop {
    async fn range(
        &self,
        request: Request<pb::RangeRequest>,
    ) -> Result<Response<pb::RangeResponse>, Status> {
        Ok(Response::new(self.range_response(request.into_inner().key)))
    }

    type RangeStreamStream =
        futures::stream::Once<std::future::Ready<Result<pb::RangeStreamResponse, Status>>>;

    async fn range_stream(
        &self,
        request: Request<pb::RangeRequest>,
    ) -> Result<Response<Self::RangeStreamStream>, Status> {
        let response = self.range_response(request.into_inner().key);
        Ok(Response::new(futures::stream::once(std::future::ready(
            Ok(pb::RangeStreamResponse {
                range_response: Some(response),
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

    async fn txn(
        &self,
        request: Request<pb::TxnRequest>,
    ) -> Result<Response<pb::TxnResponse>, Status> {
        let responses = request
            .into_inner()
            .success
            .into_iter()
            .map(|op| {
                use pb::request_op::Request as Op;
                use pb::response_op::Response as R;
                let response = match op.request {
                    Some(Op::RequestRange(r)) => R::ResponseRange(self.range_response(r.key)),
                    Some(Op::RequestPut(_)) => R::ResponsePut(pb::PutResponse {
                        header: header(),
                        ..Default::default()
                    }),
                    Some(Op::RequestDeleteRange(_)) => {
                        R::ResponseDeleteRange(pb::DeleteRangeResponse {
                            header: header(),
                            ..Default::default()
                        })
                    }
                    Some(Op::RequestTxn(_)) | None => R::ResponseTxn(pb::TxnResponse {
                        header: header(),
                        ..Default::default()
                    }),
                };
                pb::ResponseOp {
                    response: Some(response),
                }
            })
            .collect();
        Ok(Response::new(pb::TxnResponse {
            header: header(),
            succeeded: true,
            responses,
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
pub fn serve(addr: SocketAddr, threads: usize, range_value_size: usize) -> anyhow::Result<()> {
    let runtime = keel::net::runtime(threads)?;
    runtime.block_on(async {
        let incoming = keel::net::bind(addr)?;
        eprintln!("keel-bench: no-op KV server listening on {addr}");
        // keel's own defaults (etcd's): the same stack as a member's client listeners.
        let options = keel::net::ClientOptions::default();
        // The service itself, as a member serves each gRPC service (`keel::api::dispatch`).
        keel::net::serve_service(
            incoming,
            KvServer::new(Noop {
                range_value: vec![b'v'; range_value_size].into(),
            }),
            options,
            std::future::pending(),
        )
        .await?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The floor answers with keel's message sizes: a range gets the requested key with a value
    /// of the configured size, a txn one response per operation.
    #[tokio::test]
    async fn responses_have_the_size_of_a_members() {
        let noop = Noop {
            range_value: vec![b'v'; 256].into(),
        };
        let range = noop
            .range(Request::new(pb::RangeRequest {
                key: b"foo".to_vec(),
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(range.count, 1);
        assert_eq!(&range.kvs[0].key[..], b"foo");
        assert_eq!(range.kvs[0].value.len(), 256);
        let put = pb::RequestOp {
            request: Some(pb::request_op::Request::RequestPut(
                pb::PutRequest::default(),
            )),
        };
        let txn = noop
            .txn(Request::new(pb::TxnRequest {
                success: vec![put.clone(), put],
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_inner();
        assert!(txn.succeeded);
        assert_eq!(txn.responses.len(), 2);
    }
}
