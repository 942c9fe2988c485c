//! The proxy's KV service (etcd's `kvProxy`): serializable ranges answered from the cache when
//! they can be ([`super::cache`]), every call forwarded with the caller's metadata otherwise,
//! and the cache told about writes made through the proxy as soon as they are answered.
//!
//! Requests that carry credentials (a token) are never answered from the cache: a cached
//! answer was read with someone else's permissions.

use std::sync::Arc;

use keel_proto::etcdserverpb as pb;
use pb::kv_client::KvClient;
use tonic::{Request, Response, Status};

use super::cache::{Cache, Cached};
use super::upstream::Upstream;

#[derive(Debug, Clone)]
pub struct KvProxy {
    upstream: Upstream,
    cache: Arc<Cache>,
    /// Whether the cache's keyspace watch has been started.
    watching: Arc<std::sync::Once>,
}

/// `request` for the cluster: the same message and the caller's metadata.
fn onward<T: Clone>(request: &Request<T>) -> Request<T> {
    let mut r = Request::new(request.get_ref().clone());
    *r.metadata_mut() = request.metadata().clone();
    r
}

/// Whether `request` carries credentials.
fn has_token<T>(request: &Request<T>) -> bool {
    let md = request.metadata();
    md.contains_key("token") || md.contains_key("authorization")
}

/// The key ranges a txn reads or writes (its compares and its operations, nested ones too).
fn txn_ranges(t: &pb::TxnRequest, out: &mut Vec<(Vec<u8>, Vec<u8>)>) {
    use pb::request_op::Request as Op;
    for c in &t.compare {
        out.push((c.key.clone(), c.range_end.clone()));
    }
    for op in t.success.iter().chain(&t.failure) {
        match &op.request {
            Some(Op::RequestPut(p)) => out.push((p.key.clone(), Vec::new())),
            Some(Op::RequestDeleteRange(d)) => out.push((d.key.clone(), d.range_end.clone())),
            Some(Op::RequestTxn(inner)) => txn_ranges(inner, out),
            Some(Op::RequestRange(_)) | None => {}
        }
    }
}

impl KvProxy {
    pub fn new(upstream: Upstream, cache: Arc<Cache>) -> KvProxy {
        KvProxy {
            upstream,
            cache,
            watching: Arc::new(std::sync::Once::new()),
        }
    }

    /// A write, on the next endpoint: tried on the following ones only while the request
    /// never left (the endpoint could not be connected to); once sent, one attempt (a write
    /// whose answer was lost may have been applied, so it is not sent again).
    async fn write<T, R, F, Fut>(&self, request: &Request<T>, f: F) -> Result<Response<R>, Status>
    where
        T: Clone,
        F: Fn(KvClient<tonic::transport::Channel>, Request<T>) -> Fut,
        Fut: std::future::Future<Output = Result<Response<R>, Status>>,
    {
        self.each_endpoint(request, f, |s| super::upstream::never_sent(s))
            .await
    }

    /// A read on the next endpoint; tried on each endpoint in turn while the cluster cannot be
    /// reached.
    async fn call<T, R, F, Fut>(&self, request: &Request<T>, f: F) -> Result<Response<R>, Status>
    where
        T: Clone,
        F: Fn(KvClient<tonic::transport::Channel>, Request<T>) -> Fut,
        Fut: std::future::Future<Output = Result<Response<R>, Status>>,
    {
        self.each_endpoint(request, f, |s| {
            s.code() == tonic::Code::Unavailable && is_transport(s)
        })
        .await
    }

    /// `f` on the endpoints in turn, going on to the next while its answer is one `retry`
    /// accepts.
    async fn each_endpoint<T, R, F, Fut>(
        &self,
        request: &Request<T>,
        f: F,
        retry: impl Fn(&Status) -> bool,
    ) -> Result<Response<R>, Status>
    where
        T: Clone,
        F: Fn(KvClient<tonic::transport::Channel>, Request<T>) -> Fut,
        Fut: std::future::Future<Output = Result<Response<R>, Status>>,
    {
        let mut last = Status::unavailable("grpc-proxy: no endpoint");
        for channel in self.upstream.order() {
            let client = KvClient::new(channel.clone())
                .max_decoding_message_size(usize::MAX)
                .max_encoding_message_size(usize::MAX);
            match f(client, onward(request)).await {
                Err(s) if retry(&s) => last = s,
                other => return other,
            }
        }
        Err(last)
    }
}

/// Whether `s` says the endpoint could not be reached (rather than the member refusing).
fn is_transport(s: &Status) -> bool {
    !s.message().starts_with("etcdserver:")
}

#[tonic::async_trait]
impl pb::kv_server::Kv for KvProxy {
    type RangeStreamStream = tonic::codec::Streaming<pb::RangeStreamResponse>;

    /// Forwarded (a stream is not cached).
    async fn range_stream(
        &self,
        request: Request<pb::RangeRequest>,
    ) -> Result<Response<Self::RangeStreamStream>, Status> {
        self.call(&request, |mut c, r| async move { c.range_stream(r).await })
            .await
    }

    async fn range(
        &self,
        request: Request<pb::RangeRequest>,
    ) -> Result<Response<pb::RangeResponse>, Status> {
        let cacheable = !has_token(&request);
        if cacheable {
            self.watching.call_once(|| {
                tokio::spawn(super::keep_cache_current(
                    self.upstream.clone(),
                    self.cache.clone(),
                ));
            });
        }
        if cacheable && request.get_ref().serializable {
            match self.cache.get(request.get_ref()) {
                Cached::Hit(r) => return Ok(Response::new(r)),
                Cached::Compacted => {
                    return Err(Status::out_of_range(
                        "etcdserver: mvcc: required revision has been compacted",
                    ));
                }
                Cached::Miss => {}
            }
        }
        let response = self
            .call(&request, |mut c, r| async move { c.range(r).await })
            .await?;
        if cacheable {
            // etcd: a linearizable answer is a good serializable one too.
            self.cache.add(request.get_ref(), response.get_ref());
        }
        Ok(response)
    }

    async fn put(
        &self,
        request: Request<pb::PutRequest>,
    ) -> Result<Response<pb::PutResponse>, Status> {
        let r = self
            .write(&request, |mut c, r| async move { c.put(r).await })
            .await;
        self.cache.invalidate(&request.get_ref().key, &[]);
        r
    }

    async fn delete_range(
        &self,
        request: Request<pb::DeleteRangeRequest>,
    ) -> Result<Response<pb::DeleteRangeResponse>, Status> {
        let r = self
            .write(&request, |mut c, r| async move { c.delete_range(r).await })
            .await;
        let d = request.get_ref();
        self.cache.invalidate(&d.key, &d.range_end);
        r
    }

    async fn txn(
        &self,
        request: Request<pb::TxnRequest>,
    ) -> Result<Response<pb::TxnResponse>, Status> {
        let r = self
            .write(&request, |mut c, r| async move { c.txn(r).await })
            .await;
        let mut ranges = Vec::new();
        txn_ranges(request.get_ref(), &mut ranges);
        for (key, end) in ranges {
            self.cache.invalidate(&key, &end);
        }
        r
    }

    async fn compact(
        &self,
        request: Request<pb::CompactionRequest>,
    ) -> Result<Response<pb::CompactionResponse>, Status> {
        let r = self
            .write(&request, |mut c, r| async move { c.compact(r).await })
            .await?;
        self.cache.compact(request.get_ref().revision);
        Ok(r)
    }
}
