//! An in-process client of the member's own KV, Lease and Watch services, for the services etcd
//! builds on its client library: Lock and Election. etcd serves them through `v3client`, a
//! `clientv3.Client` whose calls go straight to its own gRPC handlers; this is the same thing.
//!
//! Every call carries the original caller's credentials (its token and its client certificate's
//! CN), so auth checks them as the caller's own requests, and every write takes the usual path:
//! validation, quota, raft, apply. Nothing here reads or writes the store behind the services'
//! backs.
//!
//! It also holds the two primitives etcd's `clientv3/concurrency` package builds locks and
//! elections from: [`V3Client::wait_delete`] and [`V3Client::wait_deletes`].

use futures::StreamExt;
use keel_proto::etcdserverpb as pb;
use pb::kv_server::Kv as _;
use pb::lease_server::Lease as _;
use tonic::metadata::MetadataMap;
use tonic::{Request, Status};

use super::kv::KvService;
use super::lease::LeaseService;
use super::watch::{WatchService, WatchStream};
use crate::auth::gate::{Credentials, Gate};
use crate::tls::incoming::Identity;

/// The member's services an in-process client calls. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Local {
    pub kv: KvService,
    pub lease: LeaseService,
    pub watch: WatchService,
}

/// A client acting for the caller of one request.
#[derive(Debug, Clone)]
pub struct V3Client {
    local: Local,
    metadata: MetadataMap,
    identity: Option<Identity>,
    /// The same token and CN, as a watch stream keeps them.
    credentials: Credentials,
}

/// An error of the member's services as the Lock and Election services return it. etcd's go
/// through its client library, which turns an etcd error into a plain Go error (`rpctypes`),
/// and gRPC sends a plain error with code Unknown: "etcdserver: requested lease not found"
/// arrives as Unknown, not NotFound. So do ours.
fn as_client_error(s: Status) -> Status {
    Status::unknown(s.message())
}

/// The end of the range of every key that starts with `prefix` (etcd's `GetPrefixRangeEnd`):
/// the prefix with its last byte below 0xff incremented and what follows dropped; `\0` (every
/// key from `prefix` on) when all its bytes are 0xff.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

impl V3Client {
    /// A client with the credentials of `request`'s caller.
    pub fn new<T>(local: &Local, request: &Request<T>) -> V3Client {
        V3Client {
            local: local.clone(),
            metadata: request.metadata().clone(),
            identity: request.extensions().get::<Identity>().cloned(),
            credentials: Gate::credentials(request),
        }
    }

    /// `message` as a request of the caller's.
    fn request<T>(&self, message: T) -> Request<T> {
        let mut r = Request::new(message);
        *r.metadata_mut() = self.metadata.clone();
        if let Some(identity) = &self.identity {
            r.extensions_mut().insert(identity.clone());
        }
        r
    }

    pub async fn txn(&self, t: pb::TxnRequest) -> Result<pb::TxnResponse, Status> {
        let resp = self.local.kv.txn(self.request(t)).await;
        Ok(resp.map_err(as_client_error)?.into_inner())
    }

    pub async fn range(&self, r: pb::RangeRequest) -> Result<pb::RangeResponse, Status> {
        let resp = self.local.kv.range(self.request(r)).await;
        Ok(resp.map_err(as_client_error)?.into_inner())
    }

    /// Deletes one key.
    pub async fn delete(&self, key: Vec<u8>) -> Result<pb::DeleteRangeResponse, Status> {
        let r = pb::DeleteRangeRequest {
            key,
            ..Default::default()
        };
        let resp = self.local.kv.delete_range(self.request(r)).await;
        Ok(resp.map_err(as_client_error)?.into_inner())
    }

    /// Grants a lease of `ttl` seconds with an ID of the member's choosing.
    pub async fn grant(&self, ttl: i64) -> Result<i64, Status> {
        let r = pb::LeaseGrantRequest { ttl, id: 0 };
        let resp = self.local.lease.lease_grant(self.request(r)).await;
        Ok(resp.map_err(as_client_error)?.into_inner().id)
    }

    /// Opens a watch stream with one watcher; the stream ends when the returned value is
    /// dropped.
    pub fn watch(&self, create: pb::WatchCreateRequest) -> Result<Watcher, Status> {
        let (tx, requests) = futures::channel::mpsc::unbounded();
        let create = pb::WatchRequest {
            request_union: Some(pb::watch_request::RequestUnion::CreateRequest(create)),
        };
        // The channel holds one request; the stream stays open while `tx` lives.
        tx.unbounded_send(Ok(create))
            .expect("the receiver is alive");
        let responses = self
            .local
            .watch
            .open(self.credentials.clone(), false, requests)
            .map_err(as_client_error)?;
        Ok(Watcher {
            _requests: tx,
            responses,
            created: false,
        })
    }

    /// Waits until `key` is deleted, watching from revision `rev` (etcd's `waitDelete`).
    pub async fn wait_delete(&self, key: &[u8], rev: i64) -> Result<(), Status> {
        let mut watcher = self.watch(pb::WatchCreateRequest {
            key: key.to_vec(),
            start_revision: rev,
            ..Default::default()
        })?;
        loop {
            let events = watcher.next().await?;
            let deleted = mvcc_delete();
            if events.iter().any(|e| e.r#type == deleted) {
                return Ok(());
            }
        }
    }

    /// Waits until no key under `prefix` with a create revision up to `max_create_rev` is
    /// left, deleting nothing (etcd's `waitDeletes`): the last created of them is waited for,
    /// then the next, so each waiter watches one key. The header of the last range.
    pub async fn wait_deletes(
        &self,
        prefix: &[u8],
        max_create_rev: i64,
    ) -> Result<pb::ResponseHeader, Status> {
        loop {
            let resp = self
                .range(pb::RangeRequest {
                    key: prefix.to_vec(),
                    range_end: prefix_end(prefix),
                    limit: 1,
                    sort_order: pb::range_request::SortOrder::Descend as i32,
                    sort_target: pb::range_request::SortTarget::Create as i32,
                    max_create_revision: max_create_rev,
                    ..Default::default()
                })
                .await?;
            let header = resp.header.unwrap_or_default();
            let Some(last) = resp.kvs.into_iter().next() else {
                return Ok(header);
            };
            self.wait_delete(&last.key, header.revision).await?;
        }
    }

    /// The key under `prefix` created first, and the range's header (`WithFirstCreate`).
    pub async fn first_created(
        &self,
        prefix: &[u8],
    ) -> Result<(pb::ResponseHeader, Option<keel_proto::mvccpb::KeyValue>), Status> {
        let resp = self.range(first_created(prefix)).await?;
        Ok((resp.header.unwrap_or_default(), resp.kvs.into_iter().next()))
    }
}

/// The range of the key under `prefix` created first (etcd's `WithFirstCreate`).
pub fn first_created(prefix: &[u8]) -> pb::RangeRequest {
    pb::RangeRequest {
        key: prefix.to_vec(),
        range_end: prefix_end(prefix),
        limit: 1,
        sort_order: pb::range_request::SortOrder::Ascend as i32,
        sort_target: pb::range_request::SortTarget::Create as i32,
        ..Default::default()
    }
}

fn mvcc_delete() -> i32 {
    keel_proto::mvccpb::event::EventType::Delete as i32
}

/// One watcher on its own stream.
pub struct Watcher {
    /// Keeps the request side, and so the stream, open.
    _requests: futures::channel::mpsc::UnboundedSender<Result<pb::WatchRequest, Status>>,
    responses: WatchStream,
    created: bool,
}

impl std::fmt::Debug for Watcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Watcher")
    }
}

impl Watcher {
    /// The next events with their response's header, past the creation. A refused create, a
    /// compacted start revision, a cancel or the end of the stream is an error, as etcd's
    /// client reports them (the waiters then fail instead of waiting forever).
    pub async fn next_response(&mut self) -> Result<pb::WatchResponse, Status> {
        loop {
            // Errors as etcd's client library reports them (code Unknown, see
            // `as_client_error`); Unavailable would make clients retry a Lock.
            let resp = match self.responses.next().await {
                Some(r) => r.map_err(as_client_error)?,
                None => return Err(Status::unknown("lost watcher waiting for delete")),
            };
            if resp.compact_revision != 0 {
                return Err(as_client_error(crate::api::convert::status(
                    &keel_engine::Error::Compacted,
                )));
            }
            if resp.canceled {
                let reason = if resp.cancel_reason.is_empty() {
                    "watch canceled".to_string()
                } else {
                    resp.cancel_reason
                };
                return Err(Status::unknown(reason));
            }
            if resp.created && !self.created {
                self.created = true;
                if resp.events.is_empty() {
                    continue;
                }
            }
            if resp.events.is_empty() {
                // A progress notification.
                continue;
            }
            return Ok(resp);
        }
    }

    /// The next events, past the creation.
    pub async fn next(&mut self) -> Result<Vec<keel_proto::mvccpb::Event>, Status> {
        Ok(self.next_response().await?.events)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ends_as_etcds() {
        assert_eq!(prefix_end(b"lock/"), b"lock0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
        assert_eq!(prefix_end(b""), vec![0]);
    }
}
