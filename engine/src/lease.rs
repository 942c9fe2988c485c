//! Leases, as etcd's lessor: granted with a TTL, keys attached by Put, revoked (every attached key
//! deleted in one revision) by a client or on expiry, kept alive by clients, and checkpointed so
//! the remaining TTL survives a restart.
//!
//! Every change goes through a write transaction of the MVCC store (so it is applied from the raft
//! log, in order, atomically with the revision it belongs to). Expiry times are the leader's
//! monotonic clock and are not persisted: on recovery each lease gets its checkpointed remaining
//! TTL, or its whole TTL, from the time of recovery (as etcd's `Promote`).
//!
//! # On disk
//! Bucket `lease`: key = the lease ID as 8 bytes big-endian; value = etcd's `leasepb.Lease`
//! protobuf (`ID` = 1, `TTL` = 2, `RemainingTTL` = 3, int64 varints), the same bytes etcd writes.
//! Attached keys are not stored: they are the `lease` fields of the keys' current values in the
//! `key` bucket, read back on recovery.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use prost::Message as _;

use crate::error::{Error, Result};
use crate::mvcc::apply::Leases;
use crate::mvcc::{Change, Store, WriteTxn};

/// The `lease` bucket.
pub const LEASE_BUCKET: &[u8] = b"lease";
/// etcd's largest TTL (`MaxLeaseTTL`), in seconds.
pub const MAX_LEASE_TTL: i64 = 9_000_000_000;

/// `leasepb.Lease`, as stored.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct LeaseRecord {
    #[prost(int64, tag = "1")]
    pub id: i64,
    #[prost(int64, tag = "2")]
    pub ttl: i64,
    #[prost(int64, tag = "3")]
    pub remaining_ttl: i64,
}

/// A live lease.
#[derive(Debug, Clone, PartialEq)]
pub struct Lease {
    pub id: i64,
    /// Granted TTL, seconds.
    pub ttl: i64,
    /// Remaining TTL at the last checkpoint, seconds (0: none since the last grant or renewal).
    pub remaining_ttl: i64,
    /// The remaining TTL in the stored record (a renewal clears `remaining_ttl` at once, the
    /// record only through a checkpoint of 0: see [`Lessor::stale_checkpoints`]).
    pub persisted_remaining_ttl: i64,
    /// When it expires, unless renewed.
    pub expiry: Instant,
    pub keys: BTreeSet<Vec<u8>>,
}

impl Lease {
    /// Time left at `now` (zero once expired).
    pub fn remaining(&self, now: Instant) -> Duration {
        self.expiry.saturating_duration_since(now)
    }
}

/// The lease table.
#[derive(Debug, Default)]
pub struct Lessor {
    leases: HashMap<i64, Lease>,
    /// `(expiry, id)` of every lease: the expired ones are found soonest first without a scan
    /// (etcd's expiry heap), so a lease cannot wait behind others that keep expiring.
    by_expiry: BTreeSet<(Instant, i64)>,
    /// Leases renewed since a non-zero remaining TTL was stored (see
    /// [`Lessor::stale_checkpoints`]).
    stale: BTreeSet<i64>,
    /// Key -> the lease it is attached to.
    items: HashMap<Vec<u8>, i64>,
    /// Granted TTLs below this are raised to it (etcd: 1.5 election timeouts, in seconds).
    min_ttl: i64,
}

#[expect(
    clippy::big_endian_bytes,
    reason = "etcd's lease bucket keys are big-endian IDs (int64ToBytes)"
)]
fn id_key(id: i64) -> [u8; 8] {
    id.to_be_bytes()
}

/// etcd's `leaseRevokeRate`: expired leases revoked per second at most.
pub const LEASE_REVOKE_RATE: usize = 1000;

impl Leases for Lessor {
    fn exists(&self, id: i64) -> bool {
        self.leases.contains_key(&id)
    }
}

impl Lessor {
    /// Reads the leases of `store` and attaches the keys whose current value names them; every
    /// lease expires its (remaining) TTL after `now`.
    pub fn recover(store: &Store, min_ttl: i64, now: Instant) -> Result<Lessor> {
        let mut lessor = Lessor {
            min_ttl: min_ttl.max(1),
            ..Lessor::default()
        };
        let view = store.read();
        for (k, v) in view.raw_range(LEASE_BUCKET)? {
            let r = LeaseRecord::decode(v.as_slice())
                .map_err(|e| Error::CorruptRecord(format!("lease bucket entry {k:02x?}: {e}")))?;
            if !(0..=MAX_LEASE_TTL).contains(&r.ttl) || r.remaining_ttl < 0 {
                return Err(Error::CorruptRecord(format!(
                    "lease {:x}: TTL {} outside 0..={MAX_LEASE_TTL} seconds or negative \
                     remaining TTL {}",
                    r.id, r.ttl, r.remaining_ttl
                )));
            }
            // As etcd's recovery: a TTL below today's minimum is raised to it. A remaining TTL
            // over the largest TTL (an earlier version could checkpoint a just-promoted lease's
            // extended time) is cut to it rather than keep the member from starting.
            let ttl = r.ttl.max(lessor.min_ttl);
            let remaining_ttl = r.remaining_ttl.min(MAX_LEASE_TTL);
            let left = if remaining_ttl > 0 {
                remaining_ttl
            } else {
                ttl
            };
            let expiry = now + Duration::from_secs(left as u64);
            lessor.by_expiry.insert((expiry, r.id));
            lessor.leases.insert(
                r.id,
                Lease {
                    id: r.id,
                    ttl,
                    remaining_ttl,
                    persisted_remaining_ttl: r.remaining_ttl,
                    expiry,
                    keys: BTreeSet::new(),
                },
            );
        }
        drop(view);
        for (key, lease) in store.take_leased_keys()? {
            if let Some(l) = lessor.leases.get_mut(&lease) {
                l.keys.insert(key.clone());
                lessor.items.insert(key, lease);
            }
        }
        Ok(lessor)
    }

    /// The smallest TTL a grant gets.
    pub fn min_ttl(&self) -> i64 {
        self.min_ttl
    }

    /// Checks a grant before it is proposed: etcd refuses these without a raft round.
    pub fn check_grant(&self, id: i64, ttl: i64) -> Result<()> {
        if ttl > MAX_LEASE_TTL {
            return Err(Error::LeaseTtlTooLarge);
        }
        if self.leases.contains_key(&id) {
            return Err(Error::LeaseExists);
        }
        Ok(())
    }

    /// Grants lease `id` (non-zero) for `ttl` seconds at `now`; returns the TTL granted.
    pub fn grant(
        &mut self,
        txn: &mut WriteTxn<'_>,
        id: i64,
        ttl: i64,
        now: Instant,
    ) -> Result<i64> {
        if id == 0 {
            return Err(Error::InvalidArgument("lease ID 0 is reserved".into()));
        }
        self.check_grant(id, ttl)?;
        let ttl = ttl.max(self.min_ttl);
        let record = LeaseRecord {
            id,
            ttl,
            remaining_ttl: 0,
        };
        txn.put_raw(LEASE_BUCKET, &id_key(id), &record.encode_to_vec())?;
        let expiry = now + Duration::from_secs(ttl as u64);
        self.by_expiry.insert((expiry, id));
        self.leases.insert(
            id,
            Lease {
                id,
                ttl,
                remaining_ttl: 0,
                persisted_remaining_ttl: 0,
                expiry,
                keys: BTreeSet::new(),
            },
        );
        Ok(ttl)
    }

    /// Revokes lease `id`: deletes every attached key (in the transaction's revision) and the
    /// lease.
    pub fn revoke(&mut self, txn: &mut WriteTxn<'_>, id: i64) -> Result<()> {
        let lease = self.leases.get(&id).ok_or(Error::LeaseNotFound)?;
        for key in &lease.keys {
            txn.delete_range(key, None)?;
        }
        txn.delete_raw(LEASE_BUCKET, &id_key(id))?;
        let lease = self.remove(id).expect("checked");
        for key in lease.keys {
            self.items.remove(&key);
        }
        Ok(())
    }

    /// The keys attached to lease `id`: the first half of a revocation that deletes them without
    /// holding the lessor (delete them in the transaction, then [`Lessor::finish_revoke`]).
    pub fn keys_of(&self, id: i64) -> Result<Vec<Vec<u8>>> {
        let lease = self.leases.get(&id).ok_or(Error::LeaseNotFound)?;
        Ok(lease.keys.iter().cloned().collect())
    }

    /// The second half of a revocation: removes lease `id` (its keys were deleted in `txn`).
    pub fn finish_revoke(&mut self, txn: &mut WriteTxn<'_>, id: i64) -> Result<()> {
        if !self.leases.contains_key(&id) {
            return Err(Error::LeaseNotFound);
        }
        txn.delete_raw(LEASE_BUCKET, &id_key(id))?;
        let lease = self.remove(id).expect("checked");
        for key in lease.keys {
            if self.items.get(&key) == Some(&id) {
                self.items.remove(&key);
            }
        }
        Ok(())
    }

    /// Records the remaining TTL of lease `id` (a lease gone meanwhile is skipped, as etcd).
    pub fn checkpoint(
        &mut self,
        txn: &mut WriteTxn<'_>,
        id: i64,
        remaining_ttl: i64,
    ) -> Result<()> {
        let Some(l) = self.leases.get_mut(&id) else {
            return Ok(());
        };
        let record = LeaseRecord {
            id,
            ttl: l.ttl,
            remaining_ttl,
        };
        txn.put_raw(LEASE_BUCKET, &id_key(id), &record.encode_to_vec())?;
        l.remaining_ttl = remaining_ttl;
        l.persisted_remaining_ttl = remaining_ttl;
        self.stale.remove(&id);
        Ok(())
    }

    /// Follows the keys written in a revision: a put attaches its key to the lease its value
    /// names (detaching it from any other), a delete detaches it.
    pub fn apply_changes(&mut self, changes: &[Change]) {
        if self.leases.is_empty() {
            // Nothing can attach, and nothing is attached (a revoke detaches its keys): the
            // usual case, kept off the storage core's path.
            return;
        }
        for c in changes {
            let new = if c.delete { 0 } else { c.kv.lease };
            let old = self.items.get(&c.kv.key).copied().unwrap_or(0);
            if old == new {
                continue;
            }
            if old != 0 {
                if let Some(l) = self.leases.get_mut(&old) {
                    l.keys.remove(&c.kv.key);
                }
                self.items.remove(&c.kv.key);
            }
            if new != 0
                && let Some(l) = self.leases.get_mut(&new)
            {
                l.keys.insert(c.kv.key.clone());
                self.items.insert(c.kv.key.clone(), new);
            }
        }
    }

    /// Renews lease `id` at `now` (a keep-alive); returns its TTL. The checkpointed remaining TTL
    /// no longer applies.
    pub fn renew(&mut self, id: i64, now: Instant) -> Result<i64> {
        let l = self.leases.get_mut(&id).ok_or(Error::LeaseNotFound)?;
        if l.expiry <= now {
            // Expired: its revocation is on its way.
            return Err(Error::LeaseNotFound);
        }
        self.by_expiry.remove(&(l.expiry, id));
        l.expiry = now + Duration::from_secs(l.ttl as u64);
        self.by_expiry.insert((l.expiry, id));
        l.remaining_ttl = 0;
        if l.persisted_remaining_ttl != 0 {
            self.stale.insert(id);
        }
        Ok(l.ttl)
    }

    /// Number of leases.
    pub fn len(&self) -> usize {
        self.leases.len()
    }

    /// Whether there are no leases.
    pub fn is_empty(&self) -> bool {
        self.leases.is_empty()
    }

    /// Leases renewed since their last checkpoint, lowest ID first, at most `max`: their stored
    /// remaining TTL must be cleared (a checkpoint of 0, as etcd proposes on the first renewal),
    /// or a restart would give them the old, shorter TTL.
    pub fn stale_checkpoints(&self, max: usize) -> Vec<i64> {
        self.stale.iter().copied().take(max).collect()
    }

    /// Lease `id`.
    pub fn get(&self, id: i64) -> Option<&Lease> {
        self.leases.get(&id)
    }

    /// The IDs of every lease, soonest expiry first: a copy, so that the lock is held for no
    /// more than that.
    pub fn ids_by_expiry(&self) -> Vec<i64> {
        self.by_expiry.iter().map(|&(_, id)| id).collect()
    }

    /// The leases expired at `now`, soonest expired first.
    pub fn expired(&self, now: Instant) -> impl Iterator<Item = i64> + '_ {
        self.by_expiry
            .iter()
            .take_while(move |&&(expiry, _)| expiry <= now)
            .map(|&(_, id)| id)
    }

    /// Whether lease `id` exists and has expired at `now`.
    pub fn is_expired(&self, id: i64, now: Instant) -> bool {
        self.leases.get(&id).is_some_and(|l| l.expiry <= now)
    }

    /// Makes every lease expire its (remaining) TTL plus `extend` after `now`: after this
    /// member becomes leader (etcd's `Promote`, extended by an election timeout so that no lease
    /// expires because of the failover), or restarts. As etcd's, expiries that would pile up are
    /// spread so that at most three quarters of the revocation rate expire in any second: leases
    /// that all had the same TTL left are not all expired at once, then refused renewal while
    /// they wait to be revoked.
    pub fn promote(&mut self, now: Instant, extend: Duration) {
        let left = |l: &Lease| {
            let secs = if l.remaining_ttl > 0 {
                l.remaining_ttl
            } else {
                l.ttl
            };
            Duration::from_secs(secs.max(0) as u64)
        };
        for l in self.leases.values_mut() {
            l.expiry = now + extend + left(l);
        }
        if self.leases.len() >= LEASE_REVOKE_RATE {
            // etcd's windows: from the soonest expiry, each second takes at most the target;
            // the rest are pushed back in proportion, and the next window starts there.
            let mut order: Vec<(Instant, i64)> =
                self.leases.values().map(|l| (l.expiry, l.id)).collect();
            order.sort_unstable();
            let target = (3 * LEASE_REVOKE_RATE / 4) as f64;
            let mut base = order[0].0;
            let mut next = base + Duration::from_secs(1);
            let mut expires = 0usize;
            for (expiry, id) in order {
                if expiry > next {
                    base = expiry;
                    next = base + Duration::from_secs(1);
                    expires = 1;
                    continue;
                }
                expires += 1;
                if expires as f64 <= target {
                    continue;
                }
                // Leases already `expiry - base` into the window need that much less delay.
                let delay = Duration::from_secs_f64(expires as f64 / target)
                    .saturating_sub(expiry.duration_since(base));
                next = base + delay;
                let l = self.leases.get_mut(&id).expect("listed");
                l.expiry = now + extend + delay + left(l);
            }
        }
        self.by_expiry = self.leases.values().map(|l| (l.expiry, l.id)).collect();
    }

    /// Removes lease `id` from the table and its indexes.
    fn remove(&mut self, id: i64) -> Option<Lease> {
        let lease = self.leases.remove(&id)?;
        self.by_expiry.remove(&(lease.expiry, id));
        self.stale.remove(&id);
        Some(lease)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mvcc::apply::{self, PutRequest};

    fn open(dir: &std::path::Path) -> Store {
        Store::open(dir.join("db"), Default::default()).unwrap()
    }

    fn put(store: &Store, lessor: &Lessor, key: &str, lease: i64) -> Vec<Change> {
        let mut w = store.write().unwrap();
        let r = PutRequest {
            key: key.into(),
            value: b"v".to_vec(),
            lease,
            ..Default::default()
        };
        apply::put(&mut w, &r, lessor).unwrap();
        let changes = w.finish_revision();
        w.end(None).unwrap();
        changes
    }

    #[test]
    fn grant_attach_revoke_and_recover() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let now = Instant::now();
        let mut lessor = Lessor::recover(&store, 2, now).unwrap();
        let mut w = store.write().unwrap();
        assert_eq!(
            lessor.grant(&mut w, 7, 1, now).unwrap(),
            2,
            "raised to the minimum"
        );
        assert_eq!(lessor.grant(&mut w, 8, 60, now).unwrap(), 60);
        assert!(matches!(
            lessor.grant(&mut w, 8, 60, now),
            Err(Error::LeaseExists)
        ));
        assert!(matches!(
            lessor.grant(&mut w, 9, MAX_LEASE_TTL + 1, now),
            Err(Error::LeaseTtlTooLarge)
        ));
        w.end(None).unwrap();
        for (k, l) in [("a", 7), ("b", 7), ("c", 8)] {
            let ch = put(&store, &lessor, k, l);
            lessor.apply_changes(&ch);
        }
        // Moving "b" to lease 8, and overwriting "c" without a lease.
        let ch = put(&store, &lessor, "b", 8);
        lessor.apply_changes(&ch);
        let ch = put(&store, &lessor, "c", 0);
        lessor.apply_changes(&ch);
        let keys = |l: &Lessor, id| l.get(id).unwrap().keys.iter().cloned().collect::<Vec<_>>();
        assert_eq!(keys(&lessor, 7), [b"a".to_vec()]);
        assert_eq!(keys(&lessor, 8), [b"b".to_vec()]);

        let mut w = store.write().unwrap();
        lessor.checkpoint(&mut w, 8, 42).unwrap();
        w.end(None).unwrap();
        store.sync().unwrap();
        drop(store);
        let store = open(dir.path());
        let later = now + Duration::from_secs(100);
        let mut lessor = Lessor::recover(&store, 2, later).unwrap();
        assert_eq!(keys(&lessor, 7), [b"a".to_vec()]);
        assert_eq!(keys(&lessor, 8), [b"b".to_vec()]);
        // The recovery took what the index rebuild found; a second call reads the live keys
        // back, and finds the same.
        let mut scanned = store.take_leased_keys().unwrap();
        scanned.sort();
        assert_eq!(scanned, [(b"a".to_vec(), 7), (b"b".to_vec(), 8)]);
        let l8 = lessor.get(8).unwrap();
        assert_eq!((l8.ttl, l8.remaining_ttl), (60, 42));
        assert_eq!(
            l8.remaining(later),
            Duration::from_secs(42),
            "checkpointed TTL kept"
        );
        let expired: Vec<i64> = lessor.expired(later + Duration::from_secs(3)).collect();
        assert_eq!(expired, [7]);

        // Revoke: both attached keys go in one revision.
        let before = store.current_revision();
        let mut w = store.write().unwrap();
        lessor.revoke(&mut w, 8).unwrap();
        let changes = w.finish_revision();
        w.end(None).unwrap();
        assert_eq!(store.current_revision(), before + 1);
        assert_eq!(changes.len(), 1);
        assert!(changes[0].delete);
        assert!(lessor.get(8).is_none());
        let mut w = store.write().unwrap();
        assert!(matches!(
            lessor.revoke(&mut w, 8),
            Err(Error::LeaseNotFound)
        ));
        drop(w);
        assert!(matches!(lessor.renew(8, later), Err(Error::LeaseNotFound)));
        assert_eq!(lessor.renew(7, later).unwrap(), 2);
        // A renewal after a checkpoint leaves the stored remaining TTL to clear.
        let mut w = store.write().unwrap();
        lessor.checkpoint(&mut w, 7, 1).unwrap();
        w.end(None).unwrap();
        assert!(lessor.stale_checkpoints(10).is_empty());
        lessor.renew(7, later).unwrap();
        assert_eq!(lessor.stale_checkpoints(10), vec![7]);
        let mut w = store.write().unwrap();
        lessor.checkpoint(&mut w, 7, 0).unwrap();
        w.end(None).unwrap();
        assert!(lessor.stale_checkpoints(10).is_empty());
        assert_eq!(
            lessor.get(7).unwrap().remaining(later),
            Duration::from_secs(2)
        );
    }

    #[test]
    fn expired_leases_come_soonest_expired_first_whatever_their_ids() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let now = Instant::now();
        let mut lessor = Lessor::recover(&store, 1, now).unwrap();
        let mut w = store.write().unwrap();
        // The highest ID expires first; low IDs after it.
        lessor.grant(&mut w, i64::MAX, 8, now).unwrap();
        for id in 1..=2000 {
            lessor.grant(&mut w, id, 10, now).unwrap();
        }
        w.end(None).unwrap();
        let at = now + Duration::from_secs(20);
        let first: Vec<i64> = lessor.expired(at).take(3).collect();
        assert_eq!(first, [i64::MAX, 1, 2]);
        assert_eq!(lessor.expired(at).count(), 2001);
        assert_eq!(lessor.expired(now + Duration::from_secs(9)).count(), 1);
        // A renewal moves it in the order; a revocation takes it out.
        lessor
            .renew(i64::MAX, now + Duration::from_secs(7))
            .unwrap();
        assert_eq!(lessor.expired(at).last(), Some(i64::MAX));
        assert!(!lessor.is_expired(i64::MAX, now + Duration::from_secs(12)));
        let mut w = store.write().unwrap();
        lessor.revoke(&mut w, 1).unwrap();
        w.end(None).unwrap();
        assert_eq!(lessor.expired(at).count(), 2000);
        assert_eq!(lessor.ids_by_expiry().len(), 2000);
        assert_eq!(lessor.ids_by_expiry()[0], 2);
    }

    #[test]
    fn a_promotion_spreads_expiries_that_would_pile_up() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let now = Instant::now();
        let mut lessor = Lessor::recover(&store, 1, now).unwrap();
        let mut w = store.write().unwrap();
        for id in 1..=3000 {
            lessor.grant(&mut w, id, 60, now).unwrap();
        }
        w.end(None).unwrap();
        let extend = Duration::from_secs(1);
        lessor.promote(now, extend);
        // All had 60 s left: spread over 4 seconds, 750 a second at most (etcd's target).
        let mut per_second = std::collections::BTreeMap::<u64, usize>::new();
        for id in lessor.ids_by_expiry() {
            let at = lessor.get(id).unwrap().expiry.duration_since(now);
            assert!(at >= Duration::from_secs(61), "{at:?}");
            *per_second.entry(at.as_secs()).or_default() += 1;
        }
        assert!(per_second.values().all(|&n| n <= 751), "{per_second:?}");
        assert!(per_second.len() >= 4, "{per_second:?}");
        // Fewer leases than the rate: no spreading.
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let mut lessor = Lessor::recover(&store, 1, now).unwrap();
        let mut w = store.write().unwrap();
        for id in 1..=10 {
            lessor.grant(&mut w, id, 60, now).unwrap();
        }
        w.end(None).unwrap();
        lessor.promote(now, extend);
        let expiries: BTreeSet<Instant> =
            (1..=10).map(|id| lessor.get(id).unwrap().expiry).collect();
        assert_eq!(expiries.len(), 1);
        assert_eq!(lessor.expired(now + Duration::from_secs(61)).count(), 10);
    }

    #[test]
    fn recovery_raises_ttls_to_the_minimum_and_cuts_remaining_ttls_to_the_largest() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let mut w = store.write().unwrap();
        for (id, ttl, remaining_ttl) in [(1, 1, 0), (2, MAX_LEASE_TTL, MAX_LEASE_TTL + 5)] {
            let record = LeaseRecord {
                id,
                ttl,
                remaining_ttl,
            };
            w.put_raw(LEASE_BUCKET, &id_key(id), &record.encode_to_vec())
                .unwrap();
        }
        w.end(None).unwrap();
        let now = Instant::now();
        let lessor = Lessor::recover(&store, 3, now).unwrap();
        assert_eq!(lessor.get(1).unwrap().ttl, 3);
        assert_eq!(
            lessor.get(1).unwrap().remaining(now),
            Duration::from_secs(3)
        );
        assert_eq!(lessor.get(2).unwrap().remaining_ttl, MAX_LEASE_TTL);
        // A negative remaining TTL is no value any version writes: refused as corrupt.
        let mut w = store.write().unwrap();
        let record = LeaseRecord {
            id: 3,
            ttl: 5,
            remaining_ttl: -1,
        };
        w.put_raw(LEASE_BUCKET, &id_key(3), &record.encode_to_vec())
            .unwrap();
        w.end(None).unwrap();
        assert!(matches!(
            Lessor::recover(&store, 3, now),
            Err(Error::CorruptRecord(_))
        ));
    }
}
