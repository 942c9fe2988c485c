//! The etcd v3 KV gRPC service: validation as etcd's `v3rpc/key.go`, writes through the storage
//! core (raft, WAL, apply), reads served on the network thread from a read view (after a batched
//! ReadIndex unless serializable).
//!
//! Limits: a range response over [`convert::MAX_RANGE_RESPONSE_BYTES`] (etcd's gRPC send limit)
//! fails with `ResourceExhausted` while it is read, before it is built whole; `RangeStream` sends
//! key-ordered ranges in pages of [`STREAM_CHUNK`] keys read one at a time, so its memory is one
//! page whatever the range.

use keel_engine::mvcc::apply as a;
use keel_proto::etcdserverpb as pb;
use tonic::{Request, Response, Status};

use super::convert::{self, Header, status};
use crate::auth::gate::{Checked, Gate};
use crate::raft::{Applied, Core, Request as Write};

/// The KV service.
#[derive(Debug, Clone)]
pub struct KvService {
    core: Core,
    gate: Gate,
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

/// etcd's quota check (`quotaAlarmer`) before a request that adds `cost` bytes: once the
/// backend would reach `quota_bytes`, the request is refused with NOSPACE and this member raises
/// the NOSPACE alarm, which refuses such requests on every member until it is disarmed.
/// Deletes, reads and compaction stay allowed.
pub(crate) async fn quota(core: &Core, quota_bytes: u64, cost: u64) -> Result<(), Status> {
    if cost > 0 && core.store().backend().file_size() + cost >= quota_bytes {
        super::maintenance::raise(core, pb::AlarmType::Nospace).await;
        return Err(status(&keel_engine::Error::NoSpace));
    }
    Ok(())
}

/// Whether a txn puts anything, in either branch (etcd's quota cost of a txn is above 0).
pub(crate) fn txn_puts(t: &pb::TxnRequest) -> bool {
    fn puts(ops: &[pb::RequestOp]) -> bool {
        ops.iter().any(|op| match &op.request {
            Some(pb::request_op::Request::RequestPut(_)) => true,
            Some(pb::request_op::Request::RequestTxn(t)) => txn_puts(t),
            _ => false,
        })
    }
    puts(&t.success) || puts(&t.failure)
}

impl KvService {
    pub fn new(core: Core, gate: Gate, max_txn_ops: usize, quota_bytes: u64) -> Self {
        KvService {
            core,
            gate,
            max_txn_ops,
            quota_bytes,
        }
    }

    /// etcd's quota check before a write that adds data: refused with NOSPACE once the backend
    /// would pass `--quota-backend-bytes`. Deletes, reads and compaction stay allowed.
    async fn check_quota(&self, cost: u64) -> Result<(), Status> {
        quota(&self.core, self.quota_bytes, cost).await
    }

    fn header(&self) -> Header {
        self.core.header()
    }

    async fn write(&self, request: Write, checked: &Checked) -> Result<Applied, Status> {
        self.core
            .write_stamped(request, Some(checked.stamp()))
            .await
            .map_err(|e| status(&e))
    }

    /// The keys attached to lease `id` now (for the permission check of a put with a lease).
    fn lease_keys(&self) -> impl Fn(i64) -> Vec<Vec<u8>> + '_ {
        |id| self.core.lessor().keys_of(id).unwrap_or_default()
    }
}

/// etcd's `isTxnSerializable`: ranges only, all serializable (a nested txn is not a range).
fn is_serializable(t: &a::TxnRequest) -> bool {
    t.success.iter().chain(&t.failure).all(|op| match op {
        a::RequestOp::Range(r) => r.serializable,
        _ => false,
    })
}

/// etcd's `isTxnReadonly`: ranges only. A txn holding a nested txn goes through raft even if
/// the nested one only reads, as etcd sends it (so a member cut off from the leader does not
/// answer it from its own state).
fn read_only(t: &a::TxnRequest) -> bool {
    t.success
        .iter()
        .chain(&t.failure)
        .all(|op| matches!(op, a::RequestOp::Range(_)))
}

/// Keys per message of a `RangeStream`.
const STREAM_CHUNK: usize = 1000;

impl KvService {
    async fn do_range(
        &self,
        r: pb::RangeRequest,
        checked: &Checked,
    ) -> Result<pb::RangeResponse, Status> {
        // etcd's order: its learner interceptor, the request's own checks, the read index,
        // then the permission.
        if !r.serializable && self.core.is_learner() {
            return Err(status(&keel_engine::Error::NotSupportedForLearner));
        }
        let r = convert::range_request(r)?;
        a::check_range(&r).map_err(|e| status(&e))?;
        if !r.serializable {
            self.core.linearizable().await.map_err(|e| status(&e))?;
        }
        checked.read(&r.key, &r.range_end)?;
        // Counted when read, as etcd's store counts it (a refused range is not).
        self.core.metrics().ranges.inc();
        let store = self.core.store();
        let resp = a::range(&store.read(), &r).map_err(|e| status(&e))?;
        checked.still_current(&self.core)?;
        let header = self.header().with(resp.revision);
        Ok(convert::range_response(resp, header))
    }
}

/// A `RangeStream` read in pages: the next page starts after the last key sent.
struct Pager {
    core: Core,
    request: a::RangeRequest,
    /// Keys still to send under the client's limit (`None`: no limit).
    left: Option<i64>,
    /// Keys in the whole range, and the revision read (fixed by the first page).
    count: i64,
    revision: i64,
    first: bool,
    done: bool,
}

impl Pager {
    /// The next page, or `None` after the last.
    fn next_page(&mut self) -> Option<Result<pb::RangeStreamResponse, Status>> {
        if self.done {
            return None;
        }
        let mut page = self.request.clone();
        page.limit = match self.left {
            Some(left) => left.min(STREAM_CHUNK as i64),
            None => STREAM_CHUNK as i64,
        };
        let store = self.core.store();
        let resp = match a::range(&store.read(), &page) {
            Ok(r) => r,
            Err(e) => {
                self.done = true;
                return Some(Err(status(&e)));
            }
        };
        if self.first {
            self.first = false;
            self.revision = resp.revision;
            self.count = resp.count;
            if self.request.revision == 0 {
                // Every later page reads at the first one's revision.
                self.request.revision = resp.revision;
            }
        }
        if let Some(left) = self.left.as_mut() {
            *left -= resp.kvs.len() as i64;
        }
        let last = resp.kvs.last().map(|kv| kv.key.clone());
        let more_in_range = resp.more;
        let limit_reached = self.left.is_some_and(|l| l <= 0);
        let mut out = pb::RangeResponse {
            kvs: resp.kvs.into_iter().map(convert::kv).collect(),
            ..Default::default()
        };
        if !more_in_range || limit_reached || last.is_none() {
            // The last page carries the header, `more` and `count`, so that merging every page
            // gives Range's response.
            self.done = true;
            out.header = self.core.header().with(self.revision);
            out.more = limit_reached && more_in_range;
            out.count = self.count;
        } else if let Some(mut key) = last {
            key.push(0);
            self.request.key = key;
        }
        Some(Ok(pb::RangeStreamResponse {
            range_response: Some(out),
        }))
    }
}

#[tonic::async_trait]
impl pb::kv_server::Kv for KvService {
    async fn range(
        &self,
        request: Request<pb::RangeRequest>,
    ) -> Result<Response<pb::RangeResponse>, Status> {
        let checked = self.gate.check(&request).await?;
        Ok(Response::new(
            self.do_range(request.into_inner(), &checked).await?,
        ))
    }

    type RangeStreamStream = std::pin::Pin<
        Box<dyn futures::Stream<Item = Result<pb::RangeStreamResponse, Status>> + Send + 'static>,
    >;

    /// etcd 3.7's chunked Range: the keys in consecutive chunks; the header, `more` and `count`
    /// on the last one, so that merging every chunk gives Range's response. Ranges in key order
    /// are read page by page at one revision; sorted ones are read whole (within the response
    /// limit) and sent in chunks.
    async fn range_stream(
        &self,
        request: Request<pb::RangeRequest>,
    ) -> Result<Response<Self::RangeStreamStream>, Status> {
        let checked = self.gate.check(&request).await?;
        let r = request.into_inner();
        let key_order = matches!(r.sort_order, 0 | 1) && r.sort_target == 0;
        let filtered = r.min_mod_revision != 0
            || r.max_mod_revision != 0
            || r.min_create_revision != 0
            || r.max_create_revision != 0;
        if key_order && !filtered && !r.count_only {
            let req = convert::range_request(r.clone())?;
            a::check_range(&req).map_err(|e| status(&e))?;
            if !req.serializable {
                self.core.linearizable().await.map_err(|e| status(&e))?;
            }
            checked.read(&req.key, &req.range_end)?;
            checked.still_current(&self.core)?;
            self.core.metrics().ranges.inc();
            let mut pager = Pager {
                core: self.core.clone(),
                left: (req.limit > 0).then_some(req.limit),
                request: a::RangeRequest {
                    sort_order: a::SortOrder::None,
                    ..req
                },
                count: 0,
                revision: 0,
                first: true,
                done: false,
            };
            let stream = futures::stream::iter(std::iter::from_fn(move || pager.next_page()));
            return Ok(Response::new(Box::pin(stream)));
        }
        let mut full = self.do_range(r, &checked).await?;
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
        let checked = self.gate.check(&request).await?;
        let r = request.into_inner();
        convert::check_put(&r).map_err(|e| status(&e))?;
        checked.put(&r, &self.lease_keys())?;
        self.check_quota(KV_OVERHEAD + (r.key.len() + r.value.len()) as u64)
            .await?;
        match self.write(Write::Put(r), &checked).await? {
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
        let checked = self.gate.check(&request).await?;
        let r = request.into_inner();
        if r.key.is_empty() {
            return Err(status(&keel_engine::Error::EmptyKey));
        }
        checked.delete(&r)?;
        match self.write(Write::DeleteRange(r), &checked).await? {
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
        let checked = self.gate.check(&request).await?;
        let r = request.into_inner();
        let t = convert::txn_request(r.clone())?;
        a::check_txn(&t, self.max_txn_ops).map_err(|e| status(&e))?;
        checked.txn(&r, &self.lease_keys())?;
        let resp = if read_only(&t) {
            // Served like ranges: no raft entry, no new revision.
            if !is_serializable(&t) {
                self.core.linearizable().await.map_err(|e| status(&e))?;
            }
            let resp = a::txn(&self.core.store(), &t, &a::NoLeases, None)
                .map_err(|e| status(&e))?
                .0;
            checked.still_current(&self.core)?;
            // Counted where read, as etcd's store counts a read-only txn.
            self.core.metrics().count_txn(&resp);
            resp
        } else {
            self.check_quota(cost(&t.success).max(cost(&t.failure)))
                .await?;
            match self.write(Write::Txn(r), &checked).await? {
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
        // etcd 3.4 checks no permission on compaction, but a bad token is refused.
        let checked = self.gate.check(&request).await?;
        match self
            .write(Write::Compaction(request.into_inner()), &checked)
            .await?
        {
            Applied::Compaction(revision) => Ok(Response::new(pb::CompactionResponse {
                header: self.header().with(revision),
            })),
            other => Err(Status::internal(format!("unexpected result {other:?}"))),
        }
    }
}
