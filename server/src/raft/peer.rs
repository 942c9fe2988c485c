//! The peer transport's receiving side: the `Peer` gRPC service on `--listen-peer-urls`.
//!
//! Every call is checked first, as etcd's `rafthttp` checks `X-Etcd-Cluster-ID`: a call from
//! another cluster, from an unknown or removed member, or meant for another member is refused
//! (`FailedPrecondition`, `NotFound`, `PermissionDenied`) and logged with etcd's words. Each raft
//! message must also name the calling member as its sender and this member as its receiver.
//! Messages are size-limited by the server's decoding limit
//! ([`super::transport::MAX_PEER_MESSAGE`]).

use std::path::PathBuf;
use std::time::Instant;

use keel_proto::keelpeer as pp;
use protobuf::Message as _;
use raft::eraftpb::{Message, MessageType};
use tonic::{Request, Response, Status, Streaming};

use super::Core;
use super::snapshot::Receiver;
use super::transport::{CLUSTER_HEADER, FROM_HEADER, TO_HEADER};
use crate::metrics::{self, Metrics};

/// The `Peer` service.
#[derive(Debug, Clone)]
pub struct PeerService {
    core: Core,
    /// Where received snapshots are written (`member/snap`).
    snap_dir: PathBuf,
    /// `--strict-reconfig-check`, for promotions forwarded here.
    strict: bool,
}

/// The refusal a removed member gets; its transport reports it to its core, which stops.
pub const REMOVED: &str = "removed member";

fn header(md: &tonic::metadata::MetadataMap, key: &str) -> Option<u64> {
    u64::from_str_radix(md.get(key)?.to_str().ok()?, 16).ok()
}

impl PeerService {
    pub fn new(core: Core, snap_dir: PathBuf, strict: bool) -> Self {
        PeerService {
            core,
            snap_dir,
            strict,
        }
    }

    /// Checks a call's headers; returns the calling member's ID.
    fn check(&self, md: &tonic::metadata::MetadataMap) -> Result<u64, Status> {
        let (cluster_id, member_id) = self.core.ids();
        let got = header(md, CLUSTER_HEADER).unwrap_or(0);
        if got != cluster_id {
            tracing::error!("request cluster ID mismatch (got {got:x} want {cluster_id:x})");
            return Err(Status::failed_precondition("cluster ID mismatch"));
        }
        let to = header(md, TO_HEADER).unwrap_or(0);
        if to != member_id {
            tracing::error!(
                "streaming request ignored (ID mismatch got {to:x} want {member_id:x})"
            );
            return Err(Status::failed_precondition("to field mismatch"));
        }
        let from = header(md, FROM_HEADER).unwrap_or(0);
        let members = self.core.members();
        if members.removed.contains(&from) {
            tracing::warn!("rejected the stream from peer {from:x} since it was removed");
            return Err(Status::permission_denied(REMOVED));
        }
        if !members.members.contains_key(&from) {
            tracing::error!("failed to find member {from:x} in cluster {cluster_id:x}");
            return Err(Status::not_found("error sender not found"));
        }
        Ok(from)
    }

    /// Decodes one raft message from `from`, checking its sender and receiver.
    fn decode(&self, from: u64, bytes: &[u8]) -> Result<Message, Status> {
        let m = Message::parse_from_bytes(bytes)
            .map_err(|e| Status::invalid_argument(format!("undecodable raft message: {e}")))?;
        let me = self.core.ids().1;
        if m.from != from || m.to != me {
            tracing::warn!(
                "dropping a raft message from {:x} to {:x} on the stream from {from:x}",
                m.from,
                m.to
            );
            return Err(Status::invalid_argument(
                "raft message sender or receiver mismatch",
            ));
        }
        Ok(m)
    }

    /// Whether this member leads with a current lease table, waiting for a new leader to
    /// become the primary lessor ([`crate::raft::Core::wait_lease_primary`]).
    async fn primary(&self) -> Result<bool, Status> {
        self.core
            .wait_lease_primary()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))
    }

    /// Steps the batches of `from`'s stream until it ends.
    async fn receive(&self, from: u64, mut stream: Streaming<pp::RaftBatch>) -> Result<(), Status> {
        let label = metrics::from(from);
        while let Some(batch) = stream.message().await? {
            if self.core.members().removed.contains(&from) {
                // Removed while its stream was open: it learns so from this answer, and stops
                // (etcd's HTTP 410 to a removed member).
                tracing::warn!("rejected the stream from peer {from:x} since it was removed");
                return Err(Status::permission_denied(REMOVED));
            }
            let mut messages = Vec::with_capacity(batch.messages.len());
            let mut size = 0;
            for bytes in &batch.messages {
                size += bytes.len();
                messages.push(self.decode(from, bytes)?);
            }
            self.core
                .metrics()
                .peer_received_bytes
                .get_or_create(&label)
                .inc_by(size as u64);
            if messages
                .iter()
                .any(|m| m.get_msg_type() == MessageType::MsgSnapshot)
            {
                return Err(Status::invalid_argument(
                    "a snapshot must come on the Snapshot call",
                ));
            }
            self.core
                .step(messages)
                .await
                .map_err(|e| Status::unavailable(e.to_string()))?;
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl pp::peer_server::Peer for PeerService {
    async fn raft(
        &self,
        request: Request<Streaming<pp::RaftBatch>>,
    ) -> Result<Response<pp::StreamEnd>, Status> {
        let from = self.check(request.metadata())?;
        let result = self.receive(from, request.into_inner()).await;
        if let Err(s) = &result
            && s.message() != REMOVED
        {
            // etcd logs the loss of a peer's stream on the receiving side too; here it also
            // says why a stream was refused (an undecodable or oversized message).
            tracing::warn!(peer = format!("{from:x}"), error = %s.message(), "lost the stream from a peer");
        }
        result.map(|()| Response::new(pp::StreamEnd {}))
    }

    async fn snapshot(
        &self,
        request: Request<Streaming<pp::SnapshotChunk>>,
    ) -> Result<Response<pp::SnapshotAck>, Status> {
        let from = self.check(request.metadata())?;
        let started = Instant::now();
        let mut stream = request.into_inner();
        let first = stream
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("an empty snapshot call"))?;
        let message = self.decode(from, &first.message)?;
        if message.get_msg_type() != MessageType::MsgSnapshot {
            return Err(Status::invalid_argument(
                "the first chunk is not a MsgSnapshot",
            ));
        }
        let index = message.get_snapshot().get_metadata().index;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let path = self.snap_dir.join(format!("{from:x}-{nanos}.recv"));
        tracing::info!(peer = format!("{from:x}"), index, "receiving a snapshot");
        let (tx, mut rx) = tokio::sync::mpsc::channel::<pp::SnapshotChunk>(4);
        let target = path.clone();
        // The backend file is written on a blocking thread, which removes it if the snapshot
        // is not whole: also when this call is dropped (the leader's connection lost), which
        // closes the channel.
        let writer = tokio::task::spawn_blocking(move || {
            let received = (|| {
                let mut r = Receiver::create(target.clone())?;
                while let Some(chunk) = rx.blocking_recv() {
                    r.feed(&chunk.data)?;
                    if chunk.done {
                        return r.finish(chunk.crc32);
                    }
                }
                Err(keel_engine::Error::InvalidArgument(
                    "snapshot: the sender stopped before the end".into(),
                ))
            })();
            if received.is_err() {
                let _ = std::fs::remove_file(&target);
            }
            received
        });
        let mut receive_error = None;
        loop {
            match stream.message().await {
                Ok(Some(chunk)) => {
                    if tx.send(chunk).await.is_err() {
                        break;
                    }
                }
                Ok(None) => break,
                Err(s) => {
                    receive_error = Some(s);
                    break;
                }
            }
        }
        drop(tx);
        let written = writer.await.map_err(|e| Status::internal(e.to_string()))?;
        let result = match (receive_error, written) {
            (Some(s), _) => Err(s),
            (None, Err(e)) => Err(Status::data_loss(e.to_string())),
            (None, Ok((_, got))) if got != index => Err(Status::data_loss(format!(
                "snapshot: the data is at index {got}, the message says {index}"
            ))),
            (None, Ok((path, _))) => self
                .core
                .snapshot_received(message, path)
                .await
                .map_err(|e| Status::failed_precondition(e.to_string())),
        };
        if let Err(s) = &result {
            let _ = std::fs::remove_file(&path);
            tracing::warn!(peer = format!("{from:x}"), error = %s.message(), "refused a snapshot");
        } else {
            Metrics::observe(
                &self
                    .core
                    .metrics()
                    .snapshot_receive
                    .get_or_create(&metrics::from(from)),
                started.elapsed(),
            );
        }
        result.map(|()| Response::new(pp::SnapshotAck {}))
    }

    async fn probe(
        &self,
        request: Request<pp::ProbeRequest>,
    ) -> Result<Response<pp::ProbeResponse>, Status> {
        self.check(request.metadata())?;
        Ok(Response::new(pp::ProbeResponse {}))
    }

    async fn lease_renew(
        &self,
        request: Request<pp::LeaseRenewRequest>,
    ) -> Result<Response<pp::LeaseRenewResponse>, Status> {
        self.check(request.metadata())?;
        if !self.primary().await? {
            return Err(Status::failed_precondition("etcdserver: not leader"));
        }
        let id = request.into_inner().id;
        let Some(ttl) = self
            .core
            // Half the forwarding timeout: the follower that asked, whose clock started
            // earlier, still gets the answer (or the timeout) before giving up itself.
            .renew_on_primary(id, Instant::now() + super::FORWARD_TIMEOUT / 2)
            .await
            .map_err(|e| crate::api::convert::status(&e))?
        else {
            return Err(Status::failed_precondition("etcdserver: not leader"));
        };
        Ok(Response::new(pp::LeaseRenewResponse { ttl }))
    }

    async fn members(
        &self,
        _request: Request<pp::MembersRequest>,
    ) -> Result<Response<pp::MembersResponse>, Status> {
        // Not checked: a joining member does not know the cluster ID yet.
        let members = self.core.members();
        Ok(Response::new(pp::MembersResponse {
            cluster_id: self.core.ids().0,
            members: members
                .members
                .values()
                .map(|m| m.to_json().into())
                .collect(),
            member: Default::default(),
        }))
    }

    async fn hash_kv(
        &self,
        request: Request<pp::HashKvRequest>,
    ) -> Result<Response<pp::HashKvResponse>, Status> {
        self.check(request.metadata())?;
        let rev = request.into_inner().revision;
        let store = self.core.store();
        let h = tokio::task::spawn_blocking(move || store.hash_kv(rev))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| crate::api::convert::status(&e))?;
        Ok(Response::new(pp::HashKvResponse {
            hash: h.hash,
            revision: h.revision,
            compact_revision: h.compact_revision,
        }))
    }

    async fn member_promote(
        &self,
        request: Request<pp::MemberPromoteRequest>,
    ) -> Result<Response<pp::MembersResponse>, Status> {
        self.check(request.metadata())?;
        if !self.core.is_leader() {
            return Err(Status::failed_precondition("etcdserver: not leader"));
        }
        let id = request.into_inner().id;
        let (member, members) = crate::api::cluster::promote(&self.core, self.strict, id)
            .await
            .map_err(|e| crate::api::convert::status(&e))?;
        Ok(Response::new(pp::MembersResponse {
            cluster_id: self.core.ids().0,
            members: members.iter().map(|m| m.to_json().into()).collect(),
            member: member.to_json().into(),
        }))
    }

    async fn lease_time_to_live(
        &self,
        request: Request<pp::LeaseTimeToLiveRequest>,
    ) -> Result<Response<pp::LeaseTimeToLiveResponse>, Status> {
        self.check(request.metadata())?;
        if !self.primary().await? {
            return Err(Status::failed_precondition("etcdserver: not leader"));
        }
        let r = request.into_inner();
        let lessor = self.core.lessor();
        Ok(Response::new(match lessor.get(r.id) {
            None => pp::LeaseTimeToLiveResponse {
                ttl: -1,
                ..Default::default()
            },
            Some(l) => pp::LeaseTimeToLiveResponse {
                ttl: l.remaining(Instant::now()).as_secs() as i64,
                granted_ttl: l.ttl,
                keys: if r.keys {
                    l.keys.iter().map(|k| k.clone().into()).collect()
                } else {
                    Vec::new()
                },
            },
        }))
    }
}
