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
use raft::eraftpb::{Entry, EntryType};

use super::events::Published;
use super::node::Node;
use super::proposal::{self, Request};
use super::{Applied, Reply, lock};
use crate::api::convert;
use crate::membership::{MEMBERS_BUCKET, Member};

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
                    // can be asked again.
                    self.term_started = true;
                    continue;
                }
                EntryType::EntryNormal => {}
                other => {
                    tracing::error!(index = e.index, kind = ?other, "ignoring a membership change: not supported by this member");
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
                    let result = self.apply_request(w, request);
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
        // Committed and readable: watchers may see these revisions now.
        for p in published {
            let p = Arc::new(p);
            for feed in &self.cfg.feeds {
                feed.push(p.clone());
            }
        }
        for (reply, result) in replies {
            let _ = reply.send(result);
        }
        Ok(())
    }

    /// One request in the batch's transaction. The lessor is locked per operation, never across
    /// the batch, so keep-alives never wait for an apply.
    fn apply_request(&mut self, w: &mut WriteTxn<'_>, request: Option<Request>) -> Result<Applied> {
        match request {
            Some(Request::Put(r)) => {
                let put = convert::put_request(r);
                let lessor = lock(&self.shared.lessor);
                a::put(w, &put, &*lessor).map(Applied::Put)
            }
            Some(Request::DeleteRange(r)) => {
                a::delete_range(w, &convert::delete_request(r)).map(Applied::DeleteRange)
            }
            Some(Request::Txn(t)) => match convert::txn_request(t) {
                Ok(t) => {
                    let lessor = lock(&self.shared.lessor);
                    a::txn_in(w, &t, &*lessor).map(Applied::Txn)
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
            Some(Request::MemberAttributes(attrs)) => {
                let mut members = self
                    .shared
                    .members
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
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
                        name = %m.name,
                        client_urls = ?m.client_urls,
                        "published local member to cluster through raft"
                    );
                }
                Ok(Applied::MemberAttributes)
            }
            Some(Request::Compaction(_)) => unreachable!("applied by the caller"),
            None => Err(Error::InvalidArgument("empty proposal".into())),
        }
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
