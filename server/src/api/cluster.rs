//! The etcd v3 Cluster gRPC service: the member list, and runtime reconfiguration through raft
//! conf changes as etcd does it (`v3_server.go` `MemberAdd`/`MemberRemove`/`MemberUpdate`/
//! `MemberPromote`, `etcdserver/server.go` `mayAddMember` and friends).
//!
//! Checks before anything is proposed, with etcd's messages:
//! - peer URLs must parse ("given member URLs are invalid") and belong to no other member
//!   ("Peer URLs already exists");
//! - at most one learner ("too many learner members in cluster");
//! - with `--strict-reconfig-check` (on by default), adding or promoting a voter needs the
//!   started voters to stay a quorum, and so does removing one ("re-configuration failed due to
//!   not enough started members"); a member is started once it has published its name. Adding
//!   needs every voter reachable for 5 s, and removing a reachable voter needs the voters
//!   reachable for 5 s, less it, to stay a quorum ("unhealthy cluster"), as etcd;
//! - removing, updating or promoting an unknown ID fails with "member not found"; promoting a
//!   voter with "can only promote a learner member"; promoting a learner whose log is not
//!   within 10 % of the leader's with "can only promote a learner member which is in sync with
//!   leader" (checked by the leader: a follower forwards the promotion).
//!
//! Adds and removes are raft conf changes (the member's JSON as the entry's context); an update
//! of peer URLs is an ordinary entry (raft-rs has no `UpdateNode`). All are answered once
//! applied, with the members after the change.

use keel_engine::Error;
use keel_proto::etcdserverpb as pb;
use raft::eraftpb::{ConfChange, ConfChangeType};
use tonic::{Request, Response, Status};

use super::convert::status;
use crate::config::parse_url;
use crate::membership::{Member, added_member_id};
use crate::raft::{Applied, Core, Request as Write};

/// A learner is promotable once its log is within this share of the leader's (etcd's
/// `readyPercent`).
pub const LEARNER_READY: f64 = 0.9;

/// The Cluster service.
#[derive(Debug, Clone)]
pub struct ClusterService {
    core: Core,
    gate: crate::auth::gate::Gate,
    strict: bool,
}

impl ClusterService {
    /// The service; `strict` is `--strict-reconfig-check`.
    pub fn new(core: Core, gate: crate::auth::gate::Gate, strict: bool) -> Self {
        ClusterService { core, gate, strict }
    }

    /// etcd's Cluster responses carry no revision: cluster and member IDs and the term only.
    fn header(&self) -> Option<pb::ResponseHeader> {
        self.core.header().with(0)
    }

    fn members(&self) -> Vec<pb::Member> {
        self.core.members().members.values().map(to_pb).collect()
    }
}

/// A member as etcd's API lists it.
pub fn to_pb(m: &Member) -> pb::Member {
    pb::Member {
        id: m.id,
        name: m.name.clone(),
        peer_ur_ls: m.peer_urls.clone(),
        client_ur_ls: m.client_urls.clone(),
        is_learner: m.is_learner,
    }
}

/// How long peers must have been reachable for a reconfiguration (etcd's `HealthInterval`).
pub const HEALTH_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// The instant peers must have been reachable since.
fn health_since() -> std::time::Instant {
    let now = std::time::Instant::now();
    now.checked_sub(HEALTH_INTERVAL).unwrap_or(now)
}

/// Peer URLs as etcd's `types.NewURLs` accepts them, normalised and sorted.
fn peer_urls(urls: &[String]) -> Result<Vec<String>, Error> {
    if urls.is_empty() {
        return Err(Error::MemberBadUrls);
    }
    let mut out = Vec::new();
    for u in urls {
        out.push(parse_url(u).map_err(|_| Error::MemberBadUrls)?.to_string());
    }
    out.sort();
    Ok(out)
}

/// The members after a change.
fn members_of(applied: Applied) -> Result<(Member, Vec<Member>), Error> {
    match applied {
        Applied::Members { member, members } => Ok((member, members)),
        other => Err(Error::InvalidArgument(format!(
            "unexpected result {other:?}"
        ))),
    }
}

/// Adds a member (a learner if asked).
pub async fn add(
    core: &Core,
    strict: bool,
    urls: &[String],
    learner: bool,
) -> Result<(Member, Vec<Member>), Error> {
    let urls = peer_urls(urls)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let id = added_member_id(&urls, now);
    {
        let members = core.members();
        // etcd checks the ID first (the same URLs added twice within a second give the same
        // ID), then the URLs.
        if members.members.contains_key(&id) {
            return Err(Error::MemberExists);
        }
        if members.removed.contains(&id) {
            return Err(Error::MemberRemoved);
        }
        if members
            .members
            .values()
            .any(|m| m.peer_urls.iter().any(|u| urls.contains(u)))
        {
            return Err(Error::PeerUrlExists);
        }
        if learner {
            if members.members.values().any(|m| m.is_learner) {
                return Err(Error::TooManyLearners);
            }
        } else if strict && !members.ready_to_add_voter() {
            return Err(Error::NotEnoughStartedMembers);
        }
        if strict
            && !members
                .connected_fully_since(core.ids().1, health_since(), |id| core.active_since(id))
        {
            tracing::warn!(
                "rejecting member add request; local member has not been connected to all \
                 peers, reconfigure breaks active quorum"
            );
            return Err(Error::Unhealthy);
        }
    }
    let member = Member {
        id,
        peer_urls: urls,
        is_learner: learner,
        name: String::new(),
        client_urls: Vec::new(),
    };
    let mut cc = ConfChange::default();
    cc.set_change_type(if learner {
        ConfChangeType::AddLearnerNode
    } else {
        ConfChangeType::AddNode
    });
    cc.node_id = member.id;
    cc.context = member.to_json().into();
    members_of(core.conf_change(cc).await?)
}

/// Removes a member.
pub async fn remove(core: &Core, strict: bool, id: u64) -> Result<Vec<Member>, Error> {
    {
        let members = core.members();
        let Some(m) = members.members.get(&id) else {
            return Err(Error::MemberNotFound);
        };
        if strict && !m.is_learner {
            if !members.ready_to_remove_voter(id) {
                return Err(Error::NotEnoughStartedMembers);
            }
            // A member that is down is not part of the active quorum: safe to remove. Else the
            // members reachable for a while, less the removed one, must stay a quorum.
            let me = core.ids().1;
            let down = id != me && core.active_since(id).is_none();
            let voters = members.voters().count();
            let active = members.connected_since(me, health_since(), |p| core.active_since(p));
            if !down && active.saturating_sub(1) < 1 + voters.saturating_sub(1) / 2 {
                tracing::warn!(
                    active_peers = active,
                    "rejecting member remove request; local member has not been connected to \
                     all peers, reconfigure breaks active quorum"
                );
                return Err(Error::Unhealthy);
            }
        }
    }
    let mut cc = ConfChange::default();
    cc.set_change_type(ConfChangeType::RemoveNode);
    cc.node_id = id;
    Ok(members_of(core.conf_change(cc).await?)?.1)
}

/// Promotes a learner to a voter: on the leader, which knows whether it is in sync; a follower
/// forwards it there.
pub async fn promote(core: &Core, strict: bool, id: u64) -> Result<(Member, Vec<Member>), Error> {
    {
        let members = core.members();
        match members.members.get(&id) {
            None => return Err(Error::MemberNotFound),
            Some(m) if !m.is_learner => return Err(Error::MemberNotLearner),
            Some(_) => {}
        }
        if strict && !members.ready_to_promote() {
            return Err(Error::NotEnoughStartedMembers);
        }
    }
    let Some(progress) = core.progress().await? else {
        return forward_promote(core, id).await;
    };
    let learner = progress.matched.get(&id).copied().unwrap_or(0);
    if (learner as f64) < progress.leader_matched as f64 * LEARNER_READY {
        return Err(Error::LearnerNotReady);
    }
    let member = core
        .members()
        .members
        .get(&id)
        .cloned()
        .ok_or(Error::MemberNotFound)?;
    let mut cc = ConfChange::default();
    cc.set_change_type(ConfChangeType::AddNode);
    cc.node_id = id;
    cc.context = member.to_json().into();
    members_of(core.conf_change(cc).await?)
}

async fn forward_promote(core: &Core, id: u64) -> Result<(Member, Vec<Member>), Error> {
    let (leader, mut client) = core.leader_peer()?;
    let (cluster_id, member_id) = core.ids();
    let request = crate::raft::transport::peer_request(
        cluster_id,
        member_id,
        leader,
        tonic::Request::new(keel_proto::keelpeer::MemberPromoteRequest { id }),
    );
    let r = match tokio::time::timeout(crate::raft::FORWARD_TIMEOUT, client.member_promote(request))
        .await
    {
        Ok(Ok(r)) => r.into_inner(),
        // The leader's answer, with etcd's message.
        Ok(Err(s)) => return Err(from_status(&s)),
        Err(_) => return Err(Error::Timeout),
    };
    let parse = |b: &[u8]| Member::from_json(b).map_err(Error::CorruptRecord);
    let member = parse(&r.member)?;
    let members = r
        .members
        .iter()
        .map(|b| parse(b))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((member, members))
}

/// The engine error a forwarded call's status stands for (by etcd's message).
fn from_status(s: &Status) -> Error {
    for e in [
        Error::MemberNotFound,
        Error::MemberNotLearner,
        Error::LearnerNotReady,
        Error::NotEnoughStartedMembers,
        Error::NoLeader,
        Error::Timeout,
    ] {
        if s.message() == e.to_string() {
            return e;
        }
    }
    Error::InvalidArgument(s.message().to_string())
}

#[tonic::async_trait]
impl pb::cluster_server::Cluster for ClusterService {
    async fn member_add(
        &self,
        request: Request<pb::MemberAddRequest>,
    ) -> Result<Response<pb::MemberAddResponse>, Status> {
        // etcd: membership changes are for administrators.
        self.gate.check(&request).await?.admin()?;
        let r = request.into_inner();
        let (member, members) = add(&self.core, self.strict, &r.peer_ur_ls, r.is_learner)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(pb::MemberAddResponse {
            header: self.header(),
            member: Some(to_pb(&member)),
            members: members.iter().map(to_pb).collect(),
        }))
    }

    async fn member_remove(
        &self,
        request: Request<pb::MemberRemoveRequest>,
    ) -> Result<Response<pb::MemberRemoveResponse>, Status> {
        // etcd: membership changes are for administrators.
        self.gate.check(&request).await?.admin()?;
        let id = request.into_inner().id;
        let members = remove(&self.core, self.strict, id)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(pb::MemberRemoveResponse {
            header: self.header(),
            members: members.iter().map(to_pb).collect(),
        }))
    }

    async fn member_update(
        &self,
        request: Request<pb::MemberUpdateRequest>,
    ) -> Result<Response<pb::MemberUpdateResponse>, Status> {
        // etcd: membership changes are for administrators.
        self.gate.check(&request).await?.admin()?;
        let mut r = request.into_inner();
        r.peer_ur_ls = peer_urls(&r.peer_ur_ls).map_err(|e| status(&e))?;
        {
            let members = self.core.members();
            if !members.members.contains_key(&r.id) {
                return Err(status(&Error::MemberNotFound));
            }
            if members
                .members
                .values()
                .any(|m| m.id != r.id && m.peer_urls.iter().any(|u| r.peer_ur_ls.contains(u)))
            {
                return Err(status(&Error::PeerUrlExists));
            }
        }
        let applied = self
            .core
            .write(Write::MemberUpdate(r))
            .await
            .map_err(|e| status(&e))?;
        let (_, members) = members_of(applied).map_err(|e| status(&e))?;
        Ok(Response::new(pb::MemberUpdateResponse {
            header: self.header(),
            members: members.iter().map(to_pb).collect(),
        }))
    }

    async fn member_list(
        &self,
        _request: Request<pb::MemberListRequest>,
    ) -> Result<Response<pb::MemberListResponse>, Status> {
        Ok(Response::new(pb::MemberListResponse {
            header: self.header(),
            members: self.members(),
        }))
    }

    async fn member_promote(
        &self,
        request: Request<pb::MemberPromoteRequest>,
    ) -> Result<Response<pb::MemberPromoteResponse>, Status> {
        // etcd: membership changes are for administrators.
        self.gate.check(&request).await?.admin()?;
        let id = request.into_inner().id;
        let (_, members) = promote(&self.core, self.strict, id)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(pb::MemberPromoteResponse {
            header: self.header(),
            members: members.iter().map(to_pb).collect(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::membership::Members;

    fn member(id: u64, started: bool, learner: bool) -> Member {
        Member {
            id,
            peer_urls: vec![format!("http://10.0.0.{id}:2380")],
            is_learner: learner,
            name: if started {
                format!("m{id}")
            } else {
                String::new()
            },
            client_urls: Vec::new(),
        }
    }

    #[test]
    fn strict_checks_count_started_voters_as_etcd() {
        let mut m = Members::default();
        for (id, started) in [(1, true), (2, true), (3, false)] {
            m.members.insert(id, member(id, started, false));
        }
        // 3 voters (2 started) + 1 new: quorum 3, started 2.
        assert!(!m.ready_to_add_voter());
        // Without member 3: 2 voters left, quorum 2, started 2.
        assert!(m.ready_to_remove_voter(3));
        // Without member 1: 2 voters left (1 started), quorum 2.
        assert!(!m.ready_to_remove_voter(1));
        // A learner counts as started once promoted: 4 members, 3 started, quorum 3.
        assert!(m.ready_to_promote());
        let mut alone = Members::default();
        alone.members.insert(1, member(1, true, false));
        // Removing the last member leaves no quorum.
        assert!(!alone.ready_to_remove_voter(1));
        assert!(alone.ready_to_add_voter());
    }

    #[test]
    fn peer_urls_are_checked_and_normalised() {
        assert_eq!(
            peer_urls(&["http://b:2380".into(), "http://a:2380/".into()]).unwrap(),
            vec!["http://a:2380".to_string(), "http://b:2380".to_string()]
        );
        assert!(matches!(peer_urls(&[]), Err(Error::MemberBadUrls)));
        assert!(matches!(
            peer_urls(&["2380".into()]),
            Err(Error::MemberBadUrls)
        ));
    }
}
