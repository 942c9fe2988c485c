//! The Lock service (`v3lockpb.Lock`), as etcd's `v3lock` serves it: a mutex of etcd's client
//! library (`clientv3/concurrency.Mutex`) run on the member for the caller.
//!
//! A lock named `N` held under lease `L` is the key `N/<L in hex>`, attached to `L`. Waiters
//! queue by the create revision of their keys: the oldest key holds the lock, and each waiter
//! watches only the key created just before its own (`waitDeletes`), so a release wakes one
//! waiter. The lock is lost when its key goes: `Unlock` deletes it, and so does the expiry or
//! revocation of the lease. Lock with lease 0 holds the lock under a new 60-second lease, as
//! etcd's session does.
//!
//! A caller that goes away while it waits leaves no key behind: its key is deleted then (etcd
//! unlocks when the wait fails).

use keel_proto::etcdserverpb as pb;
use keel_proto::v3lockpb as lpb;
use tonic::{Request, Response, Status};

use super::v3client::{Local, V3Client, first_created};

/// The TTL of the lease granted for a lock or a campaign that names none (etcd's
/// `defaultSessionTTL`).
pub const SESSION_TTL: i64 = 60;

/// The Lock service.
#[derive(Debug, Clone)]
pub struct LockService {
    local: Local,
}

impl LockService {
    pub fn new(local: Local) -> Self {
        LockService { local }
    }
}

/// Deletes a waiter's key if the wait does not end with the lock (the caller went away, or the
/// wait failed). Deleting from `Drop` needs a task: the caller's future is gone by then.
pub(crate) struct Release {
    client: V3Client,
    key: Option<Vec<u8>>,
    /// Delete only while the key has this create revision (a candidate resigns so: a key
    /// made again meanwhile, under the same lease, is another campaign's).
    created: Option<i64>,
}

impl Release {
    pub(crate) fn new(client: V3Client, key: Vec<u8>) -> Release {
        Release {
            client,
            key: Some(key),
            created: None,
        }
    }

    /// A release that deletes the key only while it has create revision `rev`.
    pub(crate) fn created_at(client: V3Client, key: Vec<u8>, rev: i64) -> Release {
        Release {
            client,
            key: Some(key),
            created: Some(rev),
        }
    }

    /// The wait ended with the lock: the key stays.
    pub(crate) fn keep(mut self) {
        self.key = None;
    }

    /// Deletes the key now, before the caller is answered (etcd unlocks, and waits for it,
    /// before returning a failed wait's error: a caller retrying at once with the same lease
    /// must not find the old key, then lose it to a delete still on its way).
    pub(crate) async fn now(mut self) {
        if let Some(key) = self.key.take() {
            // A task of its own: the caller going away meanwhile must not abort the delete.
            let (client, created) = (self.client.clone(), self.created);
            let _ = tokio::spawn(async move { delete(&client, key, created).await }).await;
        }
    }
}

async fn delete(client: &V3Client, key: Vec<u8>, created: Option<i64>) {
    let deleted = match created {
        Some(rev) => resign(client, &key, rev).await.map(drop),
        None => client.delete(key.clone()).await.map(drop),
    };
    if let Err(e) = deleted {
        tracing::warn!(key = %String::from_utf8_lossy(&key), error = %e,
            "cannot delete the key of an abandoned lock or campaign wait");
    }
}

impl Drop for Release {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            let client = self.client.clone();
            let created = self.created;
            tokio::spawn(async move { delete(&client, key, created).await });
        }
    }
}

/// etcd's `Resign`: deletes `key` if it still has create revision `rev`.
pub(crate) async fn resign(
    client: &V3Client,
    key: &[u8],
    rev: i64,
) -> Result<pb::ResponseHeader, Status> {
    let resp = client
        .txn(pb::TxnRequest {
            compare: vec![created_at(key, rev)],
            success: vec![pb::RequestOp {
                request: Some(pb::request_op::Request::RequestDeleteRange(
                    pb::DeleteRangeRequest {
                        key: key.to_vec(),
                        ..Default::default()
                    },
                )),
            }],
            failure: vec![],
        })
        .await?;
    Ok(resp.header.unwrap_or_default())
}

/// A lease ID as Go's `%x` prints it (a negative one with a minus sign), the suffix of the lock
/// and candidate keys etcd makes.
pub(crate) fn go_hex(id: i64) -> String {
    if id < 0 {
        format!("-{:x}", id.unsigned_abs())
    } else {
        format!("{id:x}")
    }
}

/// A compare of `key`'s create revision with `rev`.
pub(crate) fn created_at(key: &[u8], rev: i64) -> pb::Compare {
    pb::Compare {
        result: pb::compare::CompareResult::Equal as i32,
        target: pb::compare::CompareTarget::Create as i32,
        key: key.to_vec(),
        target_union: Some(pb::compare::TargetUnion::CreateRevision(rev)),
        ..Default::default()
    }
}

pub(crate) fn put_op(key: &[u8], value: &[u8], lease: i64) -> pb::RequestOp {
    pb::RequestOp {
        request: Some(pb::request_op::Request::RequestPut(pb::PutRequest {
            key: key.to_vec(),
            value: value.to_vec(),
            lease,
            ..Default::default()
        })),
    }
}

pub(crate) fn range_op(r: pb::RangeRequest) -> pb::RequestOp {
    pb::RequestOp {
        request: Some(pb::request_op::Request::RequestRange(r)),
    }
}

pub(crate) fn get_op(key: &[u8]) -> pb::RequestOp {
    range_op(pb::RangeRequest {
        key: key.to_vec(),
        ..Default::default()
    })
}

/// The key-values of the `i`th response of a txn, if it is a range.
pub(crate) fn range_kvs(
    resp: &pb::TxnResponse,
    i: usize,
) -> Result<&[keel_proto::mvccpb::KeyValue], Status> {
    match resp.responses.get(i).and_then(|r| r.response.as_ref()) {
        Some(pb::response_op::Response::ResponseRange(r)) => Ok(&r.kvs),
        _ => Err(Status::internal("unexpected txn response")),
    }
}

/// The session's lease: `lease`, or a new one of [`SESSION_TTL`] seconds for 0.
pub(crate) async fn session_lease(client: &V3Client, lease: i64) -> Result<i64, Status> {
    if lease == 0 {
        client.grant(SESSION_TTL).await
    } else {
        Ok(lease)
    }
}

#[tonic::async_trait]
impl lpb::lock_server::Lock for LockService {
    async fn lock(
        &self,
        request: Request<lpb::LockRequest>,
    ) -> Result<Response<lpb::LockResponse>, Status> {
        let client = V3Client::new(&self.local, &request);
        let req = request.into_inner();
        let lease = session_lease(&client, req.lease).await?;
        let mut prefix = req.name;
        prefix.push(b'/');
        let key = [prefix.as_slice(), go_hex(lease).as_bytes()].concat();
        // Queue up, unless this lease is already queued (or holds the lock), and read the
        // holder in the same round trip.
        let resp = client
            .txn(pb::TxnRequest {
                compare: vec![created_at(&key, 0)],
                success: vec![put_op(&key, b"", lease), range_op(first_created(&prefix))],
                failure: vec![get_op(&key), range_op(first_created(&prefix))],
            })
            .await?;
        let header = resp.header.unwrap_or_default();
        let my_rev = if resp.succeeded {
            header.revision
        } else {
            range_kvs(&resp, 0)?
                .first()
                .map(|kv| kv.create_revision)
                .ok_or_else(|| Status::internal("the lock key vanished inside a txn"))?
        };
        let owner = range_kvs(&resp, 1)?.first().map(|kv| kv.create_revision);
        if owner.is_none() || owner == Some(my_rev) {
            return Ok(Response::new(lpb::LockResponse {
                header: Some(header),
                key,
            }));
        }
        let release = Release::new(client.clone(), key.clone());
        let header = match client.wait_deletes(&prefix, my_rev - 1).await {
            Ok(header) => header,
            Err(e) => {
                release.now().await;
                return Err(e);
            }
        };
        release.keep();
        Ok(Response::new(lpb::LockResponse {
            header: Some(header),
            key,
        }))
    }

    async fn unlock(
        &self,
        request: Request<lpb::UnlockRequest>,
    ) -> Result<Response<lpb::UnlockResponse>, Status> {
        let client = V3Client::new(&self.local, &request);
        let resp = client.delete(request.into_inner().key).await?;
        Ok(Response::new(lpb::UnlockResponse {
            header: resp.header,
        }))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn lease_ids_print_as_gos_hex() {
        assert_eq!(super::go_hex(0x694d), "694d");
        assert_eq!(super::go_hex(-0x1f), "-1f");
        assert_eq!(super::go_hex(i64::MIN), "-8000000000000000");
    }
}
