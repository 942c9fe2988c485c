//! The etcd v3 KV gRPC service: validation as etcd's `v3rpc/key.go`, writes through the storage
//! core (raft, WAL, apply), reads served on the network thread from a read view (after a batched
//! ReadIndex unless serializable).

use keel_engine::mvcc::apply as a;
use keel_proto::etcdserverpb as pb;
use tonic::{Request, Response, Status};

use crate::convert::{self, Header, status};
use crate::core::{Applied, Core, Request as Write};

/// The KV service.
#[derive(Debug, Clone)]
pub struct KvService {
    core: Core,
    max_txn_ops: usize,
    quota_bytes: u64,
}

/// etcd's per-key overhead estimate in its quota arithmetic (`kvOverhead`).
const KV_OVERHEAD: u64 = 256;

/// What a write may add to the backend, as etcd's quota counts it: puts only.
fn cost(ops: &[a::RequestOp]) -> u64 {
    ops.iter()
        .map(|op| match op {
            a::RequestOp::Put(p) => KV_OVERHEAD + (p.key.len() + p.value.len()) as u64,
            a::RequestOp::Txn(t) => cost(&t.success).max(cost(&t.failure)),
            _ => 0,
        })
        .sum()
}

impl KvService {
    pub fn new(core: Core, max_txn_ops: usize, quota_bytes: u64) -> Self {
        KvService {
            core,
            max_txn_ops,
            quota_bytes,
        }
    }

    /// etcd's quota check before a write that adds data: refused with NOSPACE once the backend
    /// would pass `--quota-backend-bytes`. Deletes, reads and compaction stay allowed.
    fn check_quota(&self, cost: u64) -> Result<(), Status> {
        if cost > 0 && self.core.store().backend().file_size() + cost > self.quota_bytes {
            return Err(status(&keel_engine::Error::NoSpace));
        }
        Ok(())
    }

    fn header(&self) -> Header {
        self.core.header()
    }

    async fn write(&self, request: Write) -> Result<Applied, Status> {
        self.core.write(request).await.map_err(|e| status(&e))
    }
}

fn is_serializable(t: &a::TxnRequest) -> bool {
    t.success.iter().chain(&t.failure).all(|op| match op {
        a::RequestOp::Range(r) => r.serializable,
        a::RequestOp::Txn(n) => is_serializable(n),
        _ => false,
    })
}

fn read_only(t: &a::TxnRequest) -> bool {
    t.success.iter().chain(&t.failure).all(|op| match op {
        a::RequestOp::Range(_) => true,
        a::RequestOp::Txn(n) => read_only(n),
        _ => false,
    })
}

/// Keys per message of a `RangeStream`.
const STREAM_CHUNK: usize = 1000;

impl KvService {
    async fn do_range(&self, r: pb::RangeRequest) -> Result<pb::RangeResponse, Status> {
        self.core.metrics().ranges.inc();
        let r = convert::range_request(r)?;
        a::check_range(&r).map_err(|e| status(&e))?;
        if !r.serializable {
            self.core.linearizable().await.map_err(|e| status(&e))?;
        }
        let resp = a::range(&self.core.store().read(), &r).map_err(|e| status(&e))?;
        let header = self.header().with(resp.revision);
        Ok(convert::range_response(resp, header))
    }
}

#[tonic::async_trait]
impl pb::kv_server::Kv for KvService {
    async fn range(
        &self,
        request: Request<pb::RangeRequest>,
    ) -> Result<Response<pb::RangeResponse>, Status> {
        Ok(Response::new(self.do_range(request.into_inner()).await?))
    }

    type RangeStreamStream = std::pin::Pin<
        Box<dyn futures::Stream<Item = Result<pb::RangeStreamResponse, Status>> + Send + 'static>,
    >;

    /// etcd 3.7's chunked Range: the keys in consecutive chunks; the header, `more` and `count`
    /// on the last one, so that merging every chunk gives Range's response.
    async fn range_stream(
        &self,
        request: Request<pb::RangeRequest>,
    ) -> Result<Response<Self::RangeStreamStream>, Status> {
        let mut full = self.do_range(request.into_inner()).await?;
        let mut chunks = Vec::new();
        let kvs = std::mem::take(&mut full.kvs);
        let mut iter = kvs.into_iter().peekable();
        while iter.peek().is_some() {
            let part: Vec<_> = iter.by_ref().take(STREAM_CHUNK).collect();
            chunks.push(pb::RangeResponse {
                kvs: part,
                ..Default::default()
            });
        }
        match chunks.last_mut() {
            Some(last) => {
                last.header = full.header;
                last.more = full.more;
                last.count = full.count;
            }
            None => chunks.push(full),
        }
        let stream = futures::stream::iter(chunks.into_iter().map(|c| {
            Ok(pb::RangeStreamResponse {
                range_response: Some(c),
            })
        }));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn put(
        &self,
        request: Request<pb::PutRequest>,
    ) -> Result<Response<pb::PutResponse>, Status> {
        self.core.metrics().puts.inc();
        let r = request.into_inner();
        let put = convert::put_request(r.clone());
        a::check_put(&put).map_err(|e| status(&e))?;
        let ops = [a::RequestOp::Put(put)];
        self.check_quota(cost(&ops))?;
        match self.write(Write::Put(r)).await? {
            Applied::Put(resp) => {
                let header = self.header().with(resp.revision);
                Ok(Response::new(convert::put_response(resp, header)))
            }
            other => Err(Status::internal(format!("unexpected result {other:?}"))),
        }
    }

    async fn delete_range(
        &self,
        request: Request<pb::DeleteRangeRequest>,
    ) -> Result<Response<pb::DeleteRangeResponse>, Status> {
        self.core.metrics().deletes.inc();
        let r = request.into_inner();
        a::check_delete(&convert::delete_request(r.clone())).map_err(|e| status(&e))?;
        match self.write(Write::DeleteRange(r)).await? {
            Applied::DeleteRange(resp) => {
                let header = self.header().with(resp.revision);
                Ok(Response::new(convert::delete_response(resp, header)))
            }
            other => Err(Status::internal(format!("unexpected result {other:?}"))),
        }
    }

    async fn txn(
        &self,
        request: Request<pb::TxnRequest>,
    ) -> Result<Response<pb::TxnResponse>, Status> {
        self.core.metrics().txns.inc();
        let r = request.into_inner();
        let t = convert::txn_request(r.clone())?;
        a::check_txn(&t, self.max_txn_ops).map_err(|e| status(&e))?;
        let resp = if read_only(&t) {
            // Served like ranges: no raft entry, no new revision.
            if !is_serializable(&t) {
                self.core.linearizable().await.map_err(|e| status(&e))?;
            }
            a::txn(self.core.store(), &t, &a::NoLeases, None)
                .map_err(|e| status(&e))?
                .0
        } else {
            self.check_quota(cost(&t.success).max(cost(&t.failure)))?;
            match self.write(Write::Txn(r)).await? {
                Applied::Txn(resp) => resp,
                other => return Err(Status::internal(format!("unexpected result {other:?}"))),
            }
        };
        let header = self.header().with(resp.revision);
        Ok(Response::new(convert::txn_response(resp, header)))
    }

    async fn compact(
        &self,
        request: Request<pb::CompactionRequest>,
    ) -> Result<Response<pb::CompactionResponse>, Status> {
        match self.write(Write::Compaction(request.into_inner())).await? {
            Applied::Compaction(revision) => Ok(Response::new(pb::CompactionResponse {
                header: self.header().with(revision),
            })),
            other => Err(Status::internal(format!("unexpected result {other:?}"))),
        }
    }
}
