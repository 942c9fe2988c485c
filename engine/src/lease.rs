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
            if !(0..=MAX_LEASE_TTL).contains(&r.ttl)
                || !(0..=MAX_LEASE_TTL).contains(&r.remaining_ttl)
            {
                return Err(Error::CorruptRecord(format!(
                    "lease {:x}: TTL {} or remaining TTL {} outside 0..={MAX_LEASE_TTL} seconds",
                    r.id, r.ttl, r.remaining_ttl
                )));
            }
            let left = if r.remaining_ttl > 0 {
                r.remaining_ttl
            } else {
                r.ttl
            };
            lessor.leases.insert(
                r.id,
                Lease {
                    id: r.id,
                    ttl: r.ttl,
                    remaining_ttl: r.remaining_ttl,
                    persisted_remaining_ttl: r.remaining_ttl,
                    expiry: now + Duration::from_secs(left.max(0) as u64),
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
        self.leases.insert(
            id,
            Lease {
                id,
                ttl,
                remaining_ttl: 0,
                persisted_remaining_ttl: 0,
                expiry: now + Duration::from_secs(ttl as u64),
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
        let lease = self.leases.remove(&id).expect("checked");
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
        let lease = self.leases.remove(&id).expect("checked");
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
        l.expiry = now + Duration::from_secs(l.ttl as u64);
        l.remaining_ttl = 0;
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

    /// Leases renewed since their last checkpoint: their stored remaining TTL must be cleared
    /// (a checkpoint of 0, as etcd proposes on the first renewal), or a restart would give them
    /// the old, shorter TTL.
    pub fn stale_checkpoints(&self) -> Vec<i64> {
        let mut ids: Vec<i64> = self
            .leases
            .values()
            .filter(|l| l.remaining_ttl == 0 && l.persisted_remaining_ttl != 0)
            .map(|l| l.id)
            .collect();
        ids.sort_unstable();
        ids
    }

    /// Lease `id`.
    pub fn get(&self, id: i64) -> Option<&Lease> {
        self.leases.get(&id)
    }

    /// Every lease, soonest expiry first.
    pub fn leases(&self) -> Vec<&Lease> {
        let mut all: Vec<&Lease> = self.leases.values().collect();
        all.sort_by_key(|l| (l.expiry, l.id));
        all
    }

    /// The leases expired at `now`.
    pub fn expired(&self, now: Instant) -> Vec<i64> {
        let mut ids: Vec<i64> = self
            .leases
            .values()
            .filter(|l| l.expiry <= now)
            .map(|l| l.id)
            .collect();
        ids.sort_unstable();
        ids
    }

    /// Makes every lease expire its (remaining) TTL plus `extend` after `now`: after this
    /// member becomes leader (etcd's `Promote`, extended by an election timeout so that no lease
    /// expires because of the failover), or restarts.
    pub fn promote(&mut self, now: Instant, extend: Duration) {
        for l in self.leases.values_mut() {
            let left = if l.remaining_ttl > 0 {
                l.remaining_ttl
            } else {
                l.ttl
            };
            l.expiry = now + extend + Duration::from_secs(left.max(0) as u64);
        }
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
        assert_eq!(lessor.expired(later + Duration::from_secs(3)), vec![7]);

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
        assert!(lessor.stale_checkpoints().is_empty());
        lessor.renew(7, later).unwrap();
        assert_eq!(lessor.stale_checkpoints(), vec![7]);
        let mut w = store.write().unwrap();
        lessor.checkpoint(&mut w, 7, 0).unwrap();
        w.end(None).unwrap();
        assert!(lessor.stale_checkpoints().is_empty());
        assert_eq!(
            lessor.get(7).unwrap().remaining(later),
            Duration::from_secs(2)
        );
    }
}
