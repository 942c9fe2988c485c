//! The Election service (`v3electionpb.Election`), as etcd's `v3election` serves it: an
//! election of etcd's client library (`clientv3/concurrency.Election`) run on the member for
//! the caller.
//!
//! A candidate for election `N` under lease `L` is the key `N/<L in hex>`, its value the
//! candidate's proposal, attached to `L`. The oldest key (lowest create revision) is the leader;
//! `Campaign` returns once every older key is gone, with the leader key (`name`, `key`, `rev`:
//! its create revision, `lease`) the caller then proclaims with and resigns with. `Proclaim`
//! and `Resign` act only while that key still has that create revision, so a leader whose lease
//! expired cannot overwrite or delete a successor's key. `Observe` streams the leader's key each
//! time it changes. Errors are etcd's: "election: not leader", "election: no leader",
//! `"leader" field must be provided`, all with gRPC code Unknown as etcd sends them.

use std::pin::Pin;

use futures::Stream;
use keel_proto::etcdserverpb as pb;
use keel_proto::mvccpb;
use keel_proto::v3electionpb as epb;
use tonic::{Request, Response, Status};

use super::lock::{Release, created_at, get_op, put_op, range_kvs, resign, session_lease};
use super::v3client::{Local, V3Client, prefix_end};

/// etcd's `ErrElectionNotLeader`.
const NOT_LEADER: &str = "election: not leader";
/// etcd's `ErrElectionNoLeader`.
const NO_LEADER: &str = "election: no leader";
/// etcd's `ErrMissingLeaderKey`.
const MISSING_LEADER: &str = r#""leader" field must be provided"#;

/// Responses an `Observe` stream may have queued for a slow reader; then the observer waits.
const OBSERVE_QUEUE: usize = 16;

/// The Election service.
#[derive(Debug, Clone)]
pub struct ElectionService {
    local: Local,
}

impl ElectionService {
    pub fn new(local: Local) -> Self {
        ElectionService { local }
    }
}

fn prefix(name: &[u8]) -> Vec<u8> {
    let mut p = name.to_vec();
    p.push(b'/');
    p
}

/// `Proclaim`: the leader key, if it still has create revision `rev`, gets `value`, under the
/// session's `lease` (etcd 3.4 puts with the session's lease, so a leader key that does not
/// exist, proclaimed with revision 0, is created).
async fn proclaim(
    client: &V3Client,
    key: &[u8],
    rev: i64,
    value: &[u8],
    lease: i64,
) -> Result<pb::ResponseHeader, Status> {
    let resp = client
        .txn(pb::TxnRequest {
            compare: vec![created_at(key, rev)],
            success: vec![put_op(key, value, lease)],
            failure: vec![],
        })
        .await?;
    if !resp.succeeded {
        return Err(Status::unknown(NOT_LEADER));
    }
    Ok(resp.header.unwrap_or_default())
}

/// The leader key of a request that must carry one.
fn leader_key(leader: Option<epb::LeaderKey>) -> Result<epb::LeaderKey, Status> {
    leader.ok_or_else(|| Status::unknown(MISSING_LEADER))
}

type ObserveStream = Pin<Box<dyn Stream<Item = Result<epb::LeaderResponse, Status>> + Send>>;

#[tonic::async_trait]
impl epb::election_server::Election for ElectionService {
    async fn campaign(
        &self,
        request: Request<epb::CampaignRequest>,
    ) -> Result<Response<epb::CampaignResponse>, Status> {
        let client = V3Client::new(&self.local, &request);
        let req = request.into_inner();
        let lease = session_lease(&client, req.lease).await?;
        let prefix = prefix(&req.name);
        let key = [prefix.as_slice(), super::lock::go_hex(lease).as_bytes()].concat();
        let resp = client
            .txn(pb::TxnRequest {
                compare: vec![created_at(&key, 0)],
                success: vec![put_op(&key, &req.value, lease)],
                failure: vec![get_op(&key)],
            })
            .await?;
        let header = resp.header.unwrap_or_default();
        let mut rev = header.revision;
        if !resp.succeeded {
            // Already a candidate under this lease: campaign again with the new value.
            let kv = range_kvs(&resp, 0)?
                .first()
                .cloned()
                .ok_or_else(|| Status::internal("the candidate key vanished inside a txn"))?;
            rev = kv.create_revision;
            if kv.value != req.value
                && let Err(e) = proclaim(&client, &key, rev, &req.value, lease).await
            {
                let _ = resign(&client, &key, rev).await;
                return Err(e);
            }
        }
        // A caller that goes away while it waits resigns (etcd resigns when the campaign's
        // context ends: only the key of this create revision); a wait that fails otherwise
        // leaves the candidacy, as etcd does.
        let release = Release::created_at(client.clone(), key.clone(), rev);
        let waited = client.wait_deletes(&prefix, rev - 1).await;
        release.keep();
        waited?;
        Ok(Response::new(epb::CampaignResponse {
            header: Some(header),
            leader: Some(epb::LeaderKey {
                name: req.name,
                key,
                rev,
                lease,
            }),
        }))
    }

    async fn proclaim(
        &self,
        request: Request<epb::ProclaimRequest>,
    ) -> Result<Response<epb::ProclaimResponse>, Status> {
        let client = V3Client::new(&self.local, &request);
        let req = request.into_inner();
        let leader = leader_key(req.leader)?;
        // The session etcd's server makes for the call grants a lease when the key names none.
        let lease = session_lease(&client, leader.lease).await?;
        let header = proclaim(&client, &leader.key, leader.rev, &req.value, lease).await?;
        Ok(Response::new(epb::ProclaimResponse {
            header: Some(header),
        }))
    }

    async fn leader(
        &self,
        request: Request<epb::LeaderRequest>,
    ) -> Result<Response<epb::LeaderResponse>, Status> {
        let client = V3Client::new(&self.local, &request);
        let name = request.into_inner().name;
        let (header, kv) = client.first_created(&prefix(&name)).await?;
        let kv = kv.ok_or_else(|| Status::unknown(NO_LEADER))?;
        Ok(Response::new(epb::LeaderResponse {
            header: Some(header),
            kv: Some(kv),
        }))
    }

    type ObserveStream = ObserveStream;

    async fn observe(
        &self,
        request: Request<epb::LeaderRequest>,
    ) -> Result<Response<Self::ObserveStream>, Status> {
        let client = V3Client::new(&self.local, &request);
        // etcd's interceptor ends a stream that asked for a leader once the member has had
        // none for three election timeouts, with "no leader" (`monitorLeader`).
        let lost = super::requires_leader_metadata(request.metadata())
            .then(|| self.local.watch.leader_lost());
        let prefix = prefix(&request.into_inner().name);
        let (tx, rx) = tokio::sync::mpsc::channel(OBSERVE_QUEUE);
        tokio::spawn(async move {
            let lost = async move {
                match lost {
                    Some(lost) => lost.await,
                    None => std::future::pending().await,
                }
            };
            // Ends when the caller goes away (even while nothing changes: its receiver is
            // dropped), or a read or watch fails, which ends the stream without an error, as
            // etcd's.
            tokio::select! {
                _ = observe(&client, &prefix, &tx) => {}
                () = tx.closed() => {}
                () = lost => {
                    let status = super::convert::status(&keel_engine::Error::NoLeader);
                    let _ = tx.send(Err(status)).await;
                }
            }
        });
        let stream =
            futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn resign(
        &self,
        request: Request<epb::ResignRequest>,
    ) -> Result<Response<epb::ResignResponse>, Status> {
        let client = V3Client::new(&self.local, &request);
        let leader = leader_key(request.into_inner().leader)?;
        let header = resign(&client, &leader.key, leader.rev).await?;
        Ok(Response::new(epb::ResignResponse {
            header: Some(header),
        }))
    }
}

/// Why an observer stopped: the caller left, or a read or watch failed.
#[derive(Debug)]
struct Stopped;

impl From<Status> for Stopped {
    fn from(_: Status) -> Stopped {
        Stopped
    }
}

/// etcd's `Election.observe`: the current leader (or the first candidate to appear), then each
/// new value of its key until it is deleted; then the next leader, and so on.
async fn observe(
    client: &V3Client,
    prefix: &[u8],
    tx: &tokio::sync::mpsc::Sender<Result<epb::LeaderResponse, Status>>,
) -> Result<(), Stopped> {
    let put = mvccpb::event::EventType::Put as i32;
    let delete = mvccpb::event::EventType::Delete as i32;
    loop {
        let (mut header, leader) = client.first_created(prefix).await?;
        let kv = match leader {
            Some(kv) => kv,
            None => {
                // Wait for the first key put under the prefix.
                let mut watcher = client.watch(pb::WatchCreateRequest {
                    key: prefix.to_vec(),
                    range_end: prefix_end(prefix),
                    start_revision: header.revision,
                    ..Default::default()
                })?;
                loop {
                    let resp = watcher.next_response().await?;
                    let first_put = resp.events.into_iter().find(|e| e.r#type == put);
                    if let Some(kv) = first_put.and_then(|e| e.kv) {
                        header = resp.header.unwrap_or_default();
                        // The response may hold several revisions: the header says this one.
                        header.revision = kv.mod_revision;
                        break kv;
                    }
                }
            }
        };
        let from = header.revision + 1;
        let key = kv.key.clone();
        send(tx, header, kv).await?;
        let mut watcher = client.watch(pb::WatchCreateRequest {
            key: key.to_vec(),
            start_revision: from,
            ..Default::default()
        })?;
        'leader: loop {
            let resp = watcher.next_response().await?;
            for event in resp.events {
                if event.r#type == delete {
                    break 'leader;
                }
                if let Some(kv) = event.kv {
                    send(tx, resp.header.unwrap_or_default(), kv).await?;
                }
            }
        }
    }
}

async fn send(
    tx: &tokio::sync::mpsc::Sender<Result<epb::LeaderResponse, Status>>,
    header: pb::ResponseHeader,
    kv: mvccpb::KeyValue,
) -> Result<(), Stopped> {
    tx.send(Ok(epb::LeaderResponse {
        header: Some(header),
        kv: Some(kv),
    }))
    .await
    .map_err(|_| Stopped)
}
