//! Applying committed entries: every request of a batch in one backend transaction (each its own
//! revision, as in etcd), then the replies and the watch feeds.
//!
//! A request that fails (a compare that refuses, an unknown lease, an undecodable entry) gets its
//! error and the member goes on, as etcd does. Only errors that mean the member's own state can
//! no longer be trusted (I/O, a poisoned backend, corruption: `Error::is_fatal`) stop the core,
//! and with it the process.

use std::sync::Arc;
use std::time::Instant;

use keel_engine::mvcc::apply as a;
use keel_engine::mvcc::{Store, WriteTxn};
use keel_engine::{Error, Result};
use keel_proto::etcdserverpb as pb;
use raft::eraftpb::{Entry, EntryType};

use super::events::Published;
use super::node::Node;
use super::proposal::{self, Request};
use super::{Applied, Reply, lock};
use crate::api::convert;
use crate::membership::{MEMBERS_BUCKET, MEMBERS_REMOVED_BUCKET, Member};
use keel_engine::mvcc::kvstore::META_BUCKET;
use protobuf::Message as _;
use raft::eraftpb::{ConfChange, ConfChangeType};

use super::node::CONF_STATE_KEY;

/// What applying one request gave.
enum Outcome {
    /// The reply, now.
    Done(Result<Applied>),
    /// A physical compaction: the reply waits until it finishes.
    AfterCompaction(Applied),
}

impl Node {
    /// Applies committed entries (all persisted locally): one backend transaction for the batch,
    /// one revision per request; replies after the commit. An error returned is fatal.
    pub(super) fn apply(&mut self, entries: Vec<Entry>) -> Result<()> {
        let Some(last) = entries.last() else {
            return Ok(());
        };
        let (last_index, last_term) = (last.index, last.term);
        if last_index <= self.applied {
            return Ok(());
        }
        let store = self.store.clone();
        let mut replies: Vec<(Reply<Applied>, Result<Applied>)> = Vec::new();
        let mut published = Vec::new();
        let mut txn = Some(store.write()?);
        let mut prev = (self.applied, self.applied_meta.borrow().term);
        for e in entries {
            if e.index <= self.applied {
                // Already in the backend (replayed after a restart).
                continue;
            }
            let here = (e.index, e.term);
            let before = prev;
            prev = here;
            match e.get_entry_type() {
                EntryType::EntryNormal if e.data.is_empty() => {
                    // The empty entry a new leader commits first: reads it dropped until now
                    // can be asked again, and (ours) everything the old leader committed is
                    // applied, so its lease table is current.
                    self.term_started = true;
                    if e.term == self.raw.raft.term {
                        self.promote_lessor();
                    }
                    continue;
                }
                EntryType::EntryNormal => {}
                EntryType::EntryConfChange => {
                    let w = txn.as_mut().expect("open");
                    let (id, result) = match ConfChange::parse_from_bytes(&e.data) {
                        Ok(cc) => (cc.id, self.apply_conf_change(w, &cc)?),
                        Err(err) => {
                            tracing::error!(index = e.index, error = %err, "skipping an undecodable membership change");
                            continue;
                        }
                    };
                    if let Some(pending) = self.pending.remove(&id) {
                        replies.push((pending.reply, result));
                    }
                    continue;
                }
                EntryType::EntryConfChangeV2 => {
                    tracing::error!(
                        index = e.index,
                        "skipping a joint membership change: Keel proposes simple ones only"
                    );
                    continue;
                }
            }
            let proposal = match proposal::decode(&e.data) {
                Ok(p) => p,
                Err(err) => {
                    // Checked before it was proposed, so this is not a request of this version;
                    // the entry is skipped, and the member goes on.
                    tracing::error!(index = e.index, error = %err, "skipping an undecodable entry");
                    self.shared.metrics.proposals_failed.inc();
                    continue;
                }
            };
            let outcome = match proposal.request {
                Some(Request::Compaction(_)) if self.alarmed(pb::AlarmType::Corrupt) => {
                    Outcome::Done(Err(Error::Corrupt))
                }
                Some(Request::Compaction(c)) => {
                    // Compaction runs its own backend transactions: commit the batch so far.
                    let w = txn.take().expect("open");
                    w.end(Some(before))?;
                    let outcome = self.schedule_compaction(&store, c.revision, c.physical);
                    txn = Some(store.write()?);
                    outcome
                }
                request => {
                    let w = txn.as_mut().expect("open");
                    let result = match self.auth_fence(proposal.auth.as_ref(), &request) {
                        Ok(()) => self.apply_request(w, request, e.index),
                        Err(refused) => Err(refused),
                    };
                    if let Err(err) = &result
                        && err.is_fatal()
                    {
                        return Err(err.clone());
                    }
                    let changes = w.finish_revision();
                    if !changes.is_empty() {
                        lock(&self.shared.lessor).apply_changes(&changes);
                        published.push(Published {
                            revision: changes[0].kv.mod_revision,
                            changes,
                        });
                    }
                    Outcome::Done(result)
                }
            };
            if proposal.member == self.shared.member_id
                && let Some(pending) = self.pending.remove(&proposal.id)
            {
                match outcome {
                    Outcome::Done(result) => replies.push((pending.reply, result)),
                    Outcome::AfterCompaction(applied) => {
                        if let Some(job) = self.compaction.as_mut() {
                            job.waiters.push((pending.reply, applied));
                        } else {
                            replies.push((pending.reply, Ok(applied)));
                        }
                    }
                }
            }
        }
        txn.take()
            .expect("open")
            .end(Some((last_index, last_term)))?;
        self.applied = last_index;
        {
            let mut meta = self.applied_meta.borrow_mut();
            meta.index = last_index;
            meta.term = last_term;
        }
        // Committed and readable: watchers may see these revisions now. A hub without
        // watchers gets none (see `events`).
        for p in published {
            let p = Arc::new(p);
            for feed in &self.cfg.feeds {
                if feed.watched() {
                    feed.push(p.clone());
                }
            }
        }
        if self
            .shared
            .revokes_in_batch
            .swap(false, std::sync::atomic::Ordering::AcqRel)
        {
            self.shared.revokes_published.notify_waiters();
        }
        for (reply, result) in replies {
            let _ = reply.send(result);
        }
        Ok(())
    }

    /// One request in the batch's transaction. The lessor is locked per operation, never across
    /// the batch, so keep-alives never wait for an apply.
    /// A client request checked against an older auth state than the applied one (or while
    /// auth was off, and it is on now) is refused: etcd's "revision of auth store is old".
    /// What only the apply can check is checked here: write permission on the keys attached,
    /// now, to a lease the request revokes or puts with (etcd's `checkLeasePuts`, made for puts
    /// inside txns too).
    fn auth_fence(
        &self,
        stamp: Option<&super::proposal::AuthStamp>,
        request: &Option<Request>,
    ) -> Result<()> {
        let Some(stamp) = stamp else {
            return Ok(());
        };
        let auth = self.shared.auth.load();
        if !auth.enabled {
            return Ok(());
        }
        if !stamp.enabled || stamp.revision < auth.revision {
            return Err(keel_engine::error::AuthError::AuthOldRevision.into());
        }
        let mut leases = Vec::new();
        fn txn_leases(t: &pb::TxnRequest, out: &mut Vec<i64>) {
            for op in t.success.iter().chain(&t.failure) {
                match &op.request {
                    Some(pb::request_op::Request::RequestPut(p)) => out.push(p.lease),
                    Some(pb::request_op::Request::RequestTxn(n)) => txn_leases(n, out),
                    _ => {}
                }
            }
        }
        match request {
            Some(Request::Put(p)) => leases.push(p.lease),
            Some(Request::Txn(t)) => txn_leases(t, &mut leases),
            Some(Request::LeaseRevoke(r)) => leases.push(r.id),
            _ => {}
        }
        leases.retain(|l| *l != 0);
        if leases.is_empty() {
            return Ok(());
        }
        let info = crate::auth::AuthInfo {
            username: stamp.username.clone(),
            revision: auth.revision,
        };
        for id in leases {
            let keys = lock(&self.shared.lessor).keys_of(id).unwrap_or_default();
            for key in keys {
                auth.permitted(Some(&info), &key, b"", true)?;
            }
        }
        Ok(())
    }

    fn apply_request(
        &mut self,
        w: &mut WriteTxn<'_>,
        request: Option<Request>,
        index: u64,
    ) -> Result<Applied> {
        // etcd's appliers under an alarm: CORRUPT refuses every write, NOSPACE those that add
        // data (`applierV3Corrupt`, `applierV3Capped`).
        let refused = match &request {
            Some(
                Request::Put(_)
                | Request::DeleteRange(_)
                | Request::Txn(_)
                | Request::LeaseGrant(_)
                | Request::LeaseRevoke(_),
            ) if self.alarmed(pb::AlarmType::Corrupt) => Some(Error::Corrupt),
            Some(Request::Put(_) | Request::LeaseGrant(_))
                if self.alarmed(pb::AlarmType::Nospace) =>
            {
                Some(Error::NoSpace)
            }
            Some(Request::Txn(t))
                if self.alarmed(pb::AlarmType::Nospace) && crate::api::kv::txn_puts(t) =>
            {
                Some(Error::NoSpace)
            }
            _ => None,
        };
        if let Some(e) = refused {
            return Err(e);
        }
        match request {
            Some(Request::Alarm(r)) => self.apply_alarm(w, &r).map(Applied::Alarms),
            // Counted as applied, on every member, as etcd's store counts them.
            Some(Request::Put(r)) => {
                let put = convert::put_request(r);
                let lessor = lock(&self.shared.lessor);
                let applied = a::put(w, &put, &*lessor).map(Applied::Put);
                if applied.is_ok() {
                    self.shared.metrics.puts.inc();
                }
                applied
            }
            Some(Request::DeleteRange(r)) => {
                let applied =
                    a::delete_range(w, &convert::delete_request(r)).map(Applied::DeleteRange);
                if applied.is_ok() {
                    self.shared.metrics.deletes.inc();
                }
                applied
            }
            Some(Request::Txn(t)) => match convert::txn_request(t) {
                Ok(t) => {
                    let lessor = lock(&self.shared.lessor);
                    let applied = a::txn_in(w, &t, &*lessor);
                    if let Ok(resp) = &applied {
                        self.shared.metrics.count_txn(resp);
                    }
                    applied.map(Applied::Txn)
                }
                Err(status) => Err(Error::InvalidArgument(status.message().to_string())),
            },
            Some(Request::LeaseGrant(g)) => lock(&self.shared.lessor)
                .grant(w, g.id, g.ttl, Instant::now())
                .map(|ttl| Applied::LeaseGrant {
                    id: g.id,
                    ttl,
                    revision: w.rev(),
                }),
            Some(Request::LeaseRevoke(r)) => {
                self.revoking.remove(&r.id);
                // The keys are deleted without holding the lessor: a lease may have many.
                let keys = lock(&self.shared.lessor).keys_of(r.id)?;
                for key in &keys {
                    w.delete_range(key, None)?;
                }
                // Keep-alives that find the lease gone wait until this batch is readable.
                self.shared
                    .revokes_in_batch
                    .store(true, std::sync::atomic::Ordering::Release);
                lock(&self.shared.lessor)
                    .finish_revoke(w, r.id)
                    .map(|()| Applied::LeaseRevoke { revision: w.rev() })
            }
            Some(Request::LeaseCheckpoint(c)) => {
                let mut lessor = lock(&self.shared.lessor);
                c.checkpoints
                    .iter()
                    .try_for_each(|cp| lessor.checkpoint(w, cp.id, cp.remaining_ttl))
                    .map(|()| Applied::LeaseCheckpoint)
            }
            Some(Request::MemberUpdate(u)) => {
                // Not a raft configuration change (raft-rs has no `UpdateNode`): the members
                // bucket and the transport only.
                let mut members = self.members.clone();
                let taken = members
                    .members
                    .values()
                    .any(|m| m.id != u.id && m.peer_urls.iter().any(|p| u.peer_ur_ls.contains(p)));
                if taken {
                    return Err(Error::PeerUrlExists);
                }
                let Some(m) = members.members.get_mut(&u.id) else {
                    return Err(Error::MemberNotFound);
                };
                m.peer_urls = u.peer_ur_ls;
                m.peer_urls.sort();
                let member = m.clone();
                w.put_raw(MEMBERS_BUCKET, &Member::key(u.id), &member.to_json())?;
                let list: Vec<Member> = members.members.values().cloned().collect();
                self.set_members(members);
                tracing::info!(member = format!("{:x}", u.id), peer_urls = ?member.peer_urls, "updated a member's peer URLs");
                Ok(Applied::Members {
                    member,
                    members: list,
                })
            }
            Some(Request::MemberAttributes(attrs)) => {
                let mut members = self.members.clone();
                let Some(m) = members.members.get_mut(&attrs.id) else {
                    return Err(Error::InvalidArgument(format!(
                        "member {:x} is not in the cluster",
                        attrs.id
                    )));
                };
                m.name = attrs.name;
                m.client_urls = attrs.client_urls;
                w.put_raw(MEMBERS_BUCKET, &Member::key(m.id), &m.to_json())?;
                if attrs.id == self.shared.member_id && !self.published {
                    self.published = true;
                    tracing::info!(
                        local_member_id = format!("{:x}", m.id),
                        local_member_attributes =
                            format!("{{Name:{} ClientURLs:{:?}}}", m.name, m.client_urls),
                        cluster_id = format!("{:x}", self.shared.cluster_id),
                        "published local member to cluster through raft"
                    );
                }
                self.set_members(members);
                Ok(Applied::MemberAttributes)
            }
            Some(Request::Auth(r)) => {
                let op =
                    r.op.ok_or_else(|| Error::InvalidArgument("empty auth request".into()))?;
                let (state, applied, effect) = self.shared.auth.load().apply(w, op, index)?;
                self.shared.auth.store(Arc::new(state));
                use crate::auth::TokenEffect;
                match effect {
                    TokenEffect::None => {}
                    TokenEffect::DropUser(u) => self.shared.tokens.drop_user(&u),
                    TokenEffect::DropAll => self.shared.tokens.drop_all(),
                    TokenEffect::Assign { token, user } => self.shared.tokens.assign(token, user),
                }
                Ok(Applied::Auth(applied))
            }
            Some(Request::Compaction(_)) => unreachable!("applied by the caller"),
            None => Err(Error::InvalidArgument("empty proposal".into())),
        }
    }

    /// Whether an alarm of type `kind` is active.
    fn alarmed(&self, kind: pb::AlarmType) -> bool {
        self.shared
            .alarms
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .active(kind)
    }

    /// etcd's `applierV3backend.Alarm`: the alarms asked for, or the one raised or cleared.
    fn apply_alarm(
        &mut self,
        w: &mut WriteTxn<'_>,
        r: &pb::AlarmRequest,
    ) -> Result<Vec<pb::AlarmMember>> {
        let mut alarms = self
            .shared
            .alarms
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let out = match pb::alarm_request::AlarmAction::try_from(r.action) {
            Ok(pb::alarm_request::AlarmAction::Get) => alarms.get(r.alarm),
            Ok(pb::alarm_request::AlarmAction::Activate) => {
                let m = alarms.activate(w, r.member_id, r.alarm)?;
                tracing::warn!(
                    member = format!("{:x}", r.member_id),
                    alarm = %crate::alarm::name(r.alarm),
                    "alarm raised"
                );
                vec![m]
            }
            Ok(pb::alarm_request::AlarmAction::Deactivate) => {
                match alarms.deactivate(w, r.member_id, r.alarm)? {
                    Some(m) => {
                        tracing::info!(
                            member = format!("{:x}", r.member_id),
                            alarm = %crate::alarm::name(r.alarm),
                            "alarm cleared"
                        );
                        vec![m]
                    }
                    None => Vec::new(),
                }
            }
            Err(_) => {
                return Err(Error::InvalidArgument(format!(
                    "unknown alarm action {}",
                    r.action
                )));
            }
        };
        Ok(out)
    }

    /// Applies a membership change (etcd's `applyConfChange`): checked against the membership
    /// (a change that no longer makes sense, e.g. adding an ID twice, is an error for its
    /// proposer and changes nothing), then the members bucket and `confState` in this batch's
    /// transaction, raft's configuration, and the transport's peers. The outer error is fatal.
    fn apply_conf_change(
        &mut self,
        w: &mut WriteTxn<'_>,
        cc: &ConfChange,
    ) -> Result<Result<Applied>> {
        let id = cc.node_id;
        let mut members = self.members.clone();
        let context = || {
            Member::from_json(&cc.context)
                .map_err(|e| Error::InvalidArgument(format!("membership change context: {e}")))
        };
        let change = match cc.get_change_type() {
            ConfChangeType::AddNode | ConfChangeType::AddLearnerNode => {
                let learner = cc.get_change_type() == ConfChangeType::AddLearnerNode;
                match members.members.get_mut(&id) {
                    // A voter added for an existing learner: the promotion.
                    Some(m) if m.is_learner && !learner => {
                        m.is_learner = false;
                        Ok(m.clone())
                    }
                    Some(_) => Err(Error::MemberExists),
                    None if members.removed.contains(&id) => Err(Error::MemberRemoved),
                    None => match context() {
                        // Checked again here, as etcd's apply does: the proposer checked its
                        // own applied membership, which may lag behind a change applied since.
                        Ok(m)
                            if members
                                .members
                                .values()
                                .any(|o| o.peer_urls.iter().any(|u| m.peer_urls.contains(u))) =>
                        {
                            Err(Error::PeerUrlExists)
                        }
                        Ok(_) if learner && members.members.values().any(|o| o.is_learner) => {
                            Err(Error::TooManyLearners)
                        }
                        Ok(mut m) => {
                            m.id = id;
                            m.is_learner = learner;
                            members.members.insert(id, m.clone());
                            Ok(m)
                        }
                        Err(e) => Err(e),
                    },
                }
            }
            ConfChangeType::RemoveNode => match members.members.remove(&id) {
                Some(m) => {
                    members.removed.insert(id);
                    w.delete_raw(MEMBERS_BUCKET, &Member::key(id))?;
                    w.put_raw(MEMBERS_REMOVED_BUCKET, &Member::key(id), b"removed")?;
                    Ok(m)
                }
                None => Err(Error::MemberNotFound),
            },
        };
        let member = match change {
            Ok(m) => m,
            // Nothing changes: not raft's configuration either.
            Err(e) => return Ok(Err(e)),
        };
        if cc.get_change_type() != ConfChangeType::RemoveNode {
            w.put_raw(MEMBERS_BUCKET, &Member::key(id), &member.to_json())?;
        }
        let conf_state = self
            .raw
            .apply_conf_change(cc)
            .map_err(|e| Error::InvalidArgument(format!("raft: {e}")))?;
        let encoded = conf_state
            .write_to_bytes()
            .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        w.put_raw(META_BUCKET, CONF_STATE_KEY, &encoded)?;
        self.applied_meta.borrow_mut().conf_state = conf_state;
        tracing::info!(
            change = ?cc.get_change_type(),
            member = format!("{id:x}"),
            peer_urls = ?member.peer_urls,
            "applied a membership change"
        );
        if cc.get_change_type() == ConfChangeType::RemoveNode && id == self.shared.member_id {
            tracing::error!(
                "the member has been permanently removed from the cluster; the data-dir used by \
                 this member must be removed"
            );
            self.removed = true;
        }
        let list: Vec<Member> = members.members.values().cloned().collect();
        self.set_members(members);
        Ok(Ok(Applied::Members {
            member,
            members: list,
        }))
    }

    /// Schedules a compaction at `revision` (its deletion proceeds in bounded steps between
    /// `Ready`s); a newer compaction supersedes one in progress, whose waiters it inherits.
    fn schedule_compaction(&mut self, store: &Store, revision: i64, physical: bool) -> Outcome {
        match store.schedule_compaction(revision) {
            Ok(job) => {
                let applied = Applied::Compaction(store.current_revision());
                let waiters = self
                    .compaction
                    .take()
                    .map(|old| old.waiters)
                    .unwrap_or_default();
                self.compaction = Some(super::node::CompactionJob { job, waiters });
                if physical {
                    Outcome::AfterCompaction(applied)
                } else {
                    Outcome::Done(Ok(applied))
                }
            }
            Err(e) => Outcome::Done(Err(e)),
        }
    }
}
