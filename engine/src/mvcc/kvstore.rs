//! The MVCC key-value store: etcd's `mvcc` store (`kvstore.go`, `kvstore_txn.go`,
//! `kvstore_compaction.go`, `hash.go`) on Keel's backend.
//!
//! # Layout on disk
//! - bucket `key`: revision key (17 bytes, 18 with the tombstone marker; see [`revision`]) ->
//!   `mvccpb.KeyValue` in protobuf encoding. A delete stores `KeyValue { key }` under a tombstone
//!   revision. So the bucket is the full history, as in etcd.
//! - bucket `meta`: `consistent_index` and `term` (8-byte big-endian, written in the same backend
//!   transaction as the data they describe), `scheduledCompactRev` and `finishedCompactRev`
//!   (17-byte revision keys `{rev, 0}`), as in etcd.
//!
//! # Concurrency
//! One writer (the storage core) and any number of readers on any thread. Readers never wait for
//! the writer beyond the short index lock. The ordering that makes this safe:
//! - A write transaction updates the index in place with revisions `current + 1`, which no reader
//!   at `<= current` can see; at the end it commits the backend *and then* publishes
//!   `current + 1`. A reader loads the current revision, then pins a backend version, which
//!   therefore holds every revision up to it.
//! - A compaction publishes the new compacted revision *before* it compacts the index or deletes
//!   anything, and a read checks the compacted revision *after* it read the index: a read that
//!   could miss history fails with `ErrCompacted` instead.
//!
//! [`revision`]: super::revision

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use prost::Message as _;

use super::index::{Leased, Restored, TreeIndex};
use super::key_index::KeyMark;
use super::kv::{KeyHeader, KeyValue};
use super::revision::Revision;
use crate::btree::{self, Backend, BackendOptions};
use crate::error::{Error, Result};

/// The bucket of revisions.
pub const KEY_BUCKET: &[u8] = b"key";
/// The bucket of store metadata.
pub const META_BUCKET: &[u8] = b"meta";
const CONSISTENT_INDEX: &[u8] = b"consistent_index";
const TERM: &[u8] = b"term";
const SCHEDULED_COMPACT: &[u8] = b"scheduledCompactRev";
const FINISHED_COMPACT: &[u8] = b"finishedCompactRev";
/// Revisions deleted per backend transaction during a physical compaction (etcd's
/// `compactionBatchLimit`).
pub const COMPACTION_BATCH: usize = 1000;
/// Revisions examined per step of a physical compaction at most: a history where most
/// revisions stay still advances in bounded steps.
pub const COMPACTION_EXAMINE: usize = 10_000;
/// Stored revisions one [`ReadView::changes`] call examines at most (a revision is never split,
/// so one with more changes than this is read whole).
pub const CHANGES_EXAMINE: usize = 10_000;
/// Keys of the index compacted per step (the index lock is held for one step).
pub const COMPACTION_INDEX_KEYS: usize = 10_000;

/// A compaction in progress (see [`Store::schedule_compaction`]).
#[derive(Debug)]
pub struct Compaction {
    rev: i64,
    /// Revisions at or below `rev` that stay (filled while the index is compacted).
    keep: HashSet<Revision>,
    /// The index is compacted from this key on next; `None` once done.
    index_from: Option<Vec<u8>>,
    /// The deletion continues from this revision key.
    from: Vec<u8>,
}

impl Compaction {
    /// The revision compacted at.
    pub fn revision(&self) -> i64 {
        self.rev
    }
}

/// Options of a store-level range.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RangeOptions {
    /// Most keys to return (0 or negative: no limit).
    pub limit: i64,
    /// Revision to read at (0 or negative: current).
    pub rev: i64,
    /// Count only, return no keys.
    pub count: bool,
    /// Fail with `ResponseTooLarge` once the keys (and values, unless `keys_only`) read pass
    /// this many bytes (0: no limit), counting 32 bytes of framing per key.
    pub max_bytes: usize,
    /// Values will not be returned: they do not count towards `max_bytes`.
    pub keys_only: bool,
}

/// A store-level range result.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RangeResult {
    /// The keys, in key order.
    pub kvs: Vec<KeyValue>,
    /// Keys live in the range at the revision, before the limit.
    pub count: usize,
    /// The store's current revision (etcd answers with it, whatever revision was read).
    pub rev: i64,
}

/// A change made by a write transaction (the input of watch).
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    /// The key's new state (for a delete: only the key and `mod_revision`).
    pub kv: KeyValue,
    /// True for a delete.
    pub delete: bool,
}

/// The key field of a stored `mvccpb.KeyValue` (field 1), without copying the value.
#[derive(Clone, PartialEq, prost::Message)]
struct KeyOnly {
    #[prost(bytes = "vec", tag = "1")]
    key: Vec<u8>,
}

/// etcd's HashKV answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HashKv {
    /// CRC-32C of the `key` bucket's content up to the revision (see [`Store::hash_kv`]).
    pub hash: u32,
    /// The compacted revision (-1 if never compacted).
    pub compact_revision: i64,
    /// The store's current revision.
    pub revision: i64,
}

/// The store.
#[derive(Debug)]
pub struct Store {
    backend: Backend,
    index: RwLock<TreeIndex>,
    current_rev: AtomicI64,
    compact_rev: AtomicI64,
    /// The leased keys found while the index was rebuilt, and the revision they are of: taken
    /// once by [`Store::take_leased_keys`].
    leased_at_open: Mutex<Option<(i64, Leased)>>,
}

fn read_index(lock: &RwLock<TreeIndex>) -> RwLockReadGuard<'_, TreeIndex> {
    lock.read().unwrap_or_else(|e| e.into_inner())
}

fn write_index(lock: &RwLock<TreeIndex>) -> RwLockWriteGuard<'_, TreeIndex> {
    lock.write().unwrap_or_else(|e| e.into_inner())
}

#[allow(
    clippy::big_endian_bytes,
    reason = "etcd stores these meta values big-endian"
)]
fn u64_be(v: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(v.try_into().ok()?))
}

#[allow(
    clippy::big_endian_bytes,
    reason = "etcd stores these meta values big-endian"
)]
fn be_u64(v: u64) -> [u8; 8] {
    v.to_be_bytes()
}

fn corrupt_kv(rev: Revision, what: &str) -> Error {
    Error::CorruptRecord(format!(
        "key bucket entry at revision {}/{}: {what}",
        rev.main, rev.sub
    ))
}

impl Store {
    /// Opens (or creates) the store's backend file and rebuilds the index from it.
    pub fn open(path: impl AsRef<Path>, options: BackendOptions) -> Result<Store> {
        let backend = Backend::open(path, options)?;
        backend.create_etcd_buckets()?;
        let mut last = 1i64;
        let started = std::time::Instant::now();
        let (index, leased, changes_read, finished, scheduled) = {
            let r = backend.begin_read();
            let mut changes = Vec::new();
            for kv in r.range(KEY_BUCKET, b"", None)? {
                let (k, v) = kv?;
                let (rev, tombstone) = Revision::from_bytes(k)?;
                let kv = KeyHeader::decode(v).map_err(|e| corrupt_kv(rev, &e.to_string()))?;
                changes.push(if tombstone {
                    Restored::tombstone(kv.key, rev)
                } else {
                    let created = Revision::new(kv.create_revision, 0);
                    Restored::put(kv.key, rev, created, kv.version, kv.lease)
                });
                last = last.max(rev.main);
            }
            let changes_read = changes.len();
            let (index, leased) = TreeIndex::restore(changes)
                .map_err(|rev| corrupt_kv(rev, "two changes of one key at the same revision"))?;
            let meta_rev = |key: &[u8]| -> Result<Option<i64>> {
                r.get(META_BUCKET, key)?
                    .map(|v| Revision::from_bytes(v).map(|(r, _)| r.main))
                    .transpose()
            };
            (
                index,
                leased,
                changes_read,
                meta_rev(FINISHED_COMPACT)?,
                meta_rev(SCHEDULED_COMPACT)?,
            )
        };
        if !index.is_empty() {
            // What a long restart was doing: on a large store, most of it is this.
            tracing::info!(
                keys = index.len(),
                changes = changes_read,
                ms = started.elapsed().as_millis() as u64,
                "rebuilt the key index from the backend"
            );
        }
        let compact = finished.unwrap_or(-1);
        let current = last.max(compact).max(scheduled.unwrap_or(-1));
        let store = Store {
            backend,
            index: RwLock::new(index),
            current_rev: AtomicI64::new(current),
            compact_rev: AtomicI64::new(compact),
            leased_at_open: Mutex::new(Some((current, leased))),
        };
        // An interrupted compaction is finished before anything else.
        if let Some(s) = scheduled
            && s > compact
        {
            store.compact_rev.store(s, Ordering::SeqCst);
            let mut job = Compaction {
                rev: s,
                keep: HashSet::new(),
                index_from: Some(Vec::new()),
                from: Vec::new(),
            };
            while !store.compact_step(&mut job)? {}
        }
        Ok(store)
    }

    /// The backend (for checkpoints, defragmentation, snapshots).
    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    /// The live keys attached to a lease, with the lease (what a lessor recovers). The first
    /// call after `open`, with nothing written since, gets what the index rebuild found; any
    /// other reads every live key.
    pub fn take_leased_keys(&self) -> Result<Leased> {
        let found = self
            .leased_at_open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        match found {
            Some((rev, leased)) if rev == self.current_revision() => Ok(leased),
            _ => self.read().leased_keys(),
        }
    }

    /// The current revision.
    pub fn current_revision(&self) -> i64 {
        self.current_rev.load(Ordering::SeqCst)
    }

    /// The compacted revision (-1 if never compacted).
    pub fn compact_revision(&self) -> i64 {
        self.compact_rev.load(Ordering::SeqCst)
    }

    /// The applied raft index and term recorded with the data (0, 0 if none).
    pub fn consistent_index(&self) -> Result<(u64, u64)> {
        let r = self.backend.begin_read();
        let get =
            |k: &[u8]| -> Result<u64> { Ok(r.get(META_BUCKET, k)?.and_then(u64_be).unwrap_or(0)) };
        Ok((get(CONSISTENT_INDEX)?, get(TERM)?))
    }

    /// The value of `key` in bucket `bucket` (state kept beside the history: `meta`, `lease`,
    /// `members`, ...), as of the latest commit.
    pub fn get_raw(&self, bucket: &[u8], key: &[u8]) -> Result<Option<Vec<u8>>> {
        let r = self.backend.begin_read();
        Ok(r.get(bucket, key)?.map(<[u8]>::to_vec))
    }

    /// A read view at the current revision. It pins a backend version: hold it briefly.
    pub fn read(&self) -> ReadView<'_> {
        let rev = self.current_revision();
        let txn = self.backend.begin_read();
        ReadView {
            store: self,
            txn,
            rev,
        }
    }

    /// Starts the write transaction (one at a time).
    pub fn write(&self) -> Result<WriteTxn<'_>> {
        let txn = self.backend.begin_write()?;
        let begin_rev = self.current_revision();
        Ok(WriteTxn {
            store: self,
            txn: Some(txn),
            begin_rev,
            changes: Vec::new(),
            undo: HashMap::new(),
            ended: false,
            failed: false,
        })
    }

    /// Compacts the history at `rev` in one go (see [`Store::schedule_compaction`] for the
    /// stepwise form the server uses).
    pub fn compact(&self, rev: i64) -> Result<()> {
        let mut job = self.schedule_compaction(rev)?;
        while !self.compact_step(&mut job)? {}
        Ok(())
    }

    /// Schedules a compaction at `rev`: recorded (so that a restart finishes it) and published at
    /// once (reads below `rev` fail with `ErrCompacted` from now on). The work (compacting the
    /// key index, then deleting every revision no read at or after `rev` needs) is done by
    /// [`Store::compact_step`], in bounded steps, as etcd's compactor does between its batches.
    pub fn schedule_compaction(&self, rev: i64) -> Result<Compaction> {
        let mut txn = self.backend.begin_write()?;
        if rev <= self.compact_revision() {
            return Err(Error::Compacted);
        }
        if rev > self.current_revision() {
            return Err(Error::FutureRev);
        }
        txn.put(
            META_BUCKET,
            SCHEDULED_COMPACT,
            &Revision::new(rev, 0).to_bytes(false),
        )?;
        txn.commit(false)?;
        // Published first: a read that started before now and could miss history fails.
        self.compact_rev.store(rev, Ordering::SeqCst);
        Ok(Compaction {
            rev,
            keep: HashSet::new(),
            index_from: Some(Vec::new()),
            from: Vec::new(),
        })
    }

    /// One bounded step of `job`: [`COMPACTION_INDEX_KEYS`] keys of the index, or one backend
    /// transaction deleting at most [`COMPACTION_BATCH`] revisions after examining at most
    /// [`COMPACTION_EXAMINE`]. Returns `true` once the compaction is finished (and recorded as
    /// such). A job superseded by a newer compaction may simply be dropped: the newer one
    /// deletes everything it would have.
    pub fn compact_step(&self, job: &mut Compaction) -> Result<bool> {
        if let Some(from) = job.index_from.take() {
            job.index_from = write_index(&self.index).compact_some(
                job.rev,
                &from,
                COMPACTION_INDEX_KEYS,
                &mut job.keep,
            );
            return Ok(false);
        }
        let end = Revision::main_prefix(job.rev + 1);
        let mut txn = self.backend.begin_write()?;
        let mut victims = Vec::new();
        let mut next = None;
        for (examined, kv) in txn.range(KEY_BUCKET, &job.from, Some(&end))?.enumerate() {
            let (k, _) = kv?;
            if victims.len() == COMPACTION_BATCH || examined == COMPACTION_EXAMINE {
                next = Some(k.to_vec());
                break;
            }
            let (r, _) = Revision::from_bytes(k)?;
            if !job.keep.contains(&r) {
                victims.push(k.to_vec());
            }
        }
        for k in &victims {
            txn.delete(KEY_BUCKET, k)?;
        }
        if next.is_none() {
            txn.put(
                META_BUCKET,
                FINISHED_COMPACT,
                &Revision::new(job.rev, 0).to_bytes(false),
            )?;
        }
        txn.commit(false)?;
        match next {
            Some(k) => {
                job.from = k;
                Ok(false)
            }
            None => Ok(true),
        }
    }

    /// etcd's HashKV: CRC-32C (Castagnoli) of the bucket name `key`, then of every revision key
    /// and value up to `rev` (0: current) that a compaction at `rev` would keep, skipping a
    /// tombstone at exactly the compacted revision. Matches etcd given the same history.
    pub fn hash_kv(&self, rev: i64) -> Result<HashKv> {
        let view = self.read();
        let compact = self.compact_revision();
        if rev > 0 && rev < compact {
            return Err(Error::Compacted);
        }
        if rev > 0 && rev > view.rev {
            return Err(Error::FutureRev);
        }
        let at = if rev == 0 { view.rev } else { rev };
        let keep = read_index(&self.index).keep(at);
        // A compaction past `at` that ran meanwhile may have deleted revisions the hash needs.
        if at < self.compact_revision() {
            return Err(Error::Compacted);
        }
        let mut hash = crc32c::crc32c(KEY_BUCKET);
        let end = Revision::main_prefix(at + 1);
        for kv in view.txn.range(KEY_BUCKET, b"", Some(&end))? {
            let (k, v) = kv?;
            let (r, tombstone) = Revision::from_bytes(k)?;
            if r.main <= compact && !keep.is_empty() && !keep.contains(&r) {
                continue;
            }
            if r.main == compact && tombstone {
                continue;
            }
            hash = crc32c::crc32c_append(hash, k);
            hash = crc32c::crc32c_append(hash, v);
        }
        Ok(HashKv {
            hash,
            compact_revision: compact,
            revision: view.rev,
        })
    }

    /// etcd's Hash: CRC-32C over every bucket's name and entries, except the meta bucket's
    /// `consistent_index` and `term`.
    pub fn hash(&self) -> Result<u32> {
        let r = self.backend.begin_read();
        let mut hash = 0u32;
        for bucket in r.buckets() {
            hash = crc32c::crc32c_append(hash, &bucket);
            for kv in r.range(&bucket, b"", None)? {
                let (k, v) = kv?;
                if bucket == META_BUCKET && (k == CONSISTENT_INDEX || k == TERM) {
                    continue;
                }
                hash = crc32c::crc32c_append(hash, k);
                hash = crc32c::crc32c_append(hash, v);
            }
        }
        Ok(hash)
    }

    /// Makes everything committed durable in the backend (a checkpoint). Returns the applied
    /// raft index and term recorded in what is now durable, at least: commits that race with the
    /// sync may make it more. Commits and reads continue while it runs (see [`Backend::sync`]).
    pub fn sync(&self) -> Result<(u64, u64)> {
        let applied = self.consistent_index()?;
        self.backend.sync()?;
        Ok(applied)
    }
}

/// Reads at the store's revision when the view was made. `Send`: readers can be on any thread.
#[derive(Debug)]
pub struct ReadView<'s> {
    store: &'s Store,
    txn: btree::ReadTxn,
    rev: i64,
}

/// A key and the revision holding its value.
type KeyRevision = (Vec<u8>, Revision);

/// The index part of a range: validates the revision, returns the revisions to fetch.
fn index_range(
    store: &Store,
    key: &[u8],
    end: Option<&[u8]>,
    current: i64,
    opts: RangeOptions,
) -> Result<(Vec<KeyRevision>, usize)> {
    if opts.rev > current {
        return Err(Error::FutureRev);
    }
    let rev = if opts.rev <= 0 { current } else { opts.rev };
    if rev < store.compact_revision() {
        return Err(Error::Compacted);
    }
    let index = read_index(&store.index);
    let result = if opts.count {
        (Vec::new(), index.count(key, end, rev))
    } else {
        let limit = if opts.limit > 0 {
            opts.limit as usize
        } else {
            0
        };
        let (live, total) = index.revisions(key, end, rev, limit);
        (
            live.into_iter()
                .map(|(k, f)| (k.to_vec(), f.modified))
                .collect(),
            total,
        )
    };
    drop(index);
    // Checked again after reading the index: a compaction that began meanwhile may have removed
    // history this read needs.
    if rev < store.compact_revision() {
        return Err(Error::Compacted);
    }
    Ok(result)
}

/// A range at `current` (the reader's revision): the index gives the revisions, `get` reads
/// their values from the reader's backend view.
fn range_with<'t>(
    store: &Store,
    key: &[u8],
    end: Option<&[u8]>,
    current: i64,
    opts: RangeOptions,
    get: impl Fn(&[u8]) -> Result<Option<&'t [u8]>>,
) -> Result<RangeResult> {
    let (revs, count) = index_range(store, key, end, current, opts)?;
    let mut kvs = Vec::with_capacity(revs.len());
    let mut size = 0usize;
    for (k, rev) in &revs {
        let bytes = get(&rev.to_bytes(false))?.ok_or_else(|| {
            corrupt_kv(
                *rev,
                &format!("missing value of key {:?}", String::from_utf8_lossy(k)),
            )
        })?;
        let mut kv = KeyValue::decode(bytes).map_err(|e| corrupt_kv(*rev, &e.to_string()))?;
        if opts.keys_only {
            // Not answered, and not counted: not kept either (a keys-only range of the whole
            // store would otherwise hold every value).
            kv.value = Vec::new();
        }
        if opts.max_bytes > 0 {
            size += 32 + kv.key.len() + kv.value.len();
            if size > opts.max_bytes {
                return Err(Error::ResponseTooLarge {
                    limit: opts.max_bytes,
                });
            }
        }
        kvs.push(kv);
    }
    Ok(RangeResult {
        kvs,
        count,
        rev: current,
    })
}

impl ReadView<'_> {
    /// The revision this view reads at by default.
    pub fn rev(&self) -> i64 {
        self.rev
    }

    /// The compacted revision.
    pub fn compact_revision(&self) -> i64 {
        self.store.compact_revision()
    }

    /// Keys in the range (see [`super::index`] for `end`).
    pub fn range(&self, key: &[u8], end: Option<&[u8]>, opts: RangeOptions) -> Result<RangeResult> {
        range_with(self.store, key, end, self.rev, opts, |k| {
            self.txn.get(KEY_BUCKET, k)
        })
    }

    /// Every entry of bucket `bucket` (not the `key` bucket), in key order.
    pub fn raw_range(&self, bucket: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut out = Vec::new();
        for kv in self.txn.range(bucket, b"", None)? {
            let (k, v) = kv?;
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    /// The live keys whose current value is attached to a lease, with the lease.
    pub fn leased_keys(&self) -> Result<Vec<(Vec<u8>, i64)>> {
        let all = self.range(b"", Some(b""), RangeOptions::default())?;
        Ok(all
            .kvs
            .into_iter()
            .filter(|kv| kv.lease != 0)
            .map(|kv| (kv.key, kv.lease))
            .collect())
    }

    /// The changes of revisions `from..=to` to keys in the range (see [`super::index`] for
    /// `end`), in revision order: what a watcher catching up from `from` is sent. One call is
    /// bounded: it stops after about `max` changes or `max_bytes` of keys and values (never
    /// splitting a revision), or after examining [`CHANGES_EXAMINE`] stored revisions, matching
    /// or not. Returns the changes and the revision to continue from (`to + 1` once done).
    /// Fails with `Compacted` if `from` is below the compacted revision (whose own changes are
    /// kept), as etcd's watchers.
    pub fn changes(
        &self,
        from: i64,
        to: i64,
        key: &[u8],
        end: Option<&[u8]>,
        max: usize,
        max_bytes: usize,
    ) -> Result<(Vec<Change>, i64)> {
        if from < self.store.compact_revision() {
            return Err(Error::Compacted);
        }
        let start = Revision::new(from, 0).to_bytes(false);
        let stop = Revision::new(to.saturating_add(1), 0).to_bytes(false);
        let in_range = |k: &[u8]| match end {
            None => k == key,
            Some([]) => k >= key,
            Some(e) => k >= key && k < e,
        };
        let mut out: Vec<Change> = Vec::new();
        let mut last_main = from - 1;
        let mut bytes = 0;
        let mut next = to.saturating_add(1);
        for (examined, kv) in self.txn.range(KEY_BUCKET, &start, Some(&stop))?.enumerate() {
            let (k, v) = kv?;
            let (rev, tombstone) = Revision::from_bytes(k)?;
            let full = out.len() >= max || bytes >= max_bytes || examined >= CHANGES_EXAMINE;
            if full && rev.main != last_main {
                next = rev.main;
                break;
            }
            last_main = rev.main;
            // The key alone first (prost skips the value): most of a busy history is usually
            // outside a watcher's range.
            let key = KeyOnly::decode(v).map_err(|e| corrupt_kv(rev, &e.to_string()))?;
            if !in_range(&key.key) {
                continue;
            }
            let mut kv = KeyValue::decode(v).map_err(|e| corrupt_kv(rev, &e.to_string()))?;
            if tombstone {
                // A tombstone's value holds only the key: its revision is the delete's.
                kv.mod_revision = rev.main;
            }
            bytes += kv.key.len() + kv.value.len();
            out.push(Change {
                kv,
                delete: tombstone,
            });
        }
        // A compaction that began meanwhile may have removed part of what was read.
        if from < self.store.compact_revision() {
            return Err(Error::Compacted);
        }
        Ok((out, next))
    }
}

/// The write transaction: every write in it gets the revision `begin + 1`, with increasing subs.
pub struct WriteTxn<'s> {
    store: &'s Store,
    /// The backend transaction (taken by `end`).
    txn: Option<btree::WriteTxn<'s>>,
    begin_rev: i64,
    changes: Vec<Change>,
    /// Where each key's history stood before this transaction first changed it (`None`: the
    /// key had none): an O(1) mark, since a transaction only appends to histories. The index is
    /// updated in place as the transaction writes (later operations must see earlier ones); if
    /// the transaction does not end successfully, `Drop` rolls each key back to its mark, so a
    /// failed transaction leaves the index exactly as it found it.
    undo: HashMap<Vec<u8>, Option<KeyMark>>,
    ended: bool,
    /// A write failed part-way: the transaction may hold half a request, so it must not commit.
    failed: bool,
}

impl Drop for WriteTxn<'_> {
    fn drop(&mut self) {
        if self.ended || self.undo.is_empty() {
            return;
        }
        let mut index = write_index(&self.store.index);
        for (key, before) in self.undo.drain() {
            index.rollback_key(&key, before);
        }
    }
}

impl<'s> WriteTxn<'s> {
    fn btx(&self) -> &btree::WriteTxn<'s> {
        self.txn.as_ref().expect("open until end")
    }

    fn btx_mut(&mut self) -> &mut btree::WriteTxn<'s> {
        self.txn.as_mut().expect("open until end")
    }

    /// Writes `key` = `value` in bucket `bucket` (not the `key` bucket) in this transaction:
    /// state kept beside the MVCC history (leases, ...), committed atomically with it.
    pub fn put_raw(&mut self, bucket: &[u8], key: &[u8], value: &[u8]) -> Result<()> {
        if bucket == KEY_BUCKET {
            return Err(Error::InvalidArgument(
                "the key bucket is written by puts".into(),
            ));
        }
        self.btx_mut().put(bucket, key, value)
    }

    /// Deletes `key` from bucket `bucket` (not the `key` bucket); whether it was there.
    pub fn delete_raw(&mut self, bucket: &[u8], key: &[u8]) -> Result<bool> {
        if bucket == KEY_BUCKET {
            return Err(Error::InvalidArgument(
                "the key bucket is written by deletes".into(),
            ));
        }
        self.btx_mut().delete(bucket, key)
    }

    /// Marks the transaction failed: `end` will refuse to commit, and dropping it undoes
    /// everything it did.
    pub fn fail(&mut self) {
        self.failed = true;
    }

    /// The revision reads in this transaction see: `begin + 1` once it has written.
    pub fn rev(&self) -> i64 {
        if self.changes.is_empty() {
            self.begin_rev
        } else {
            self.begin_rev + 1
        }
    }

    /// The compacted revision.
    pub fn compact_revision(&self) -> i64 {
        self.store.compact_revision()
    }

    /// The changes so far.
    pub fn changes(&self) -> &[Change] {
        &self.changes
    }

    /// Keys in the range, seeing this transaction's writes.
    pub fn range(&self, key: &[u8], end: Option<&[u8]>, opts: RangeOptions) -> Result<RangeResult> {
        range_with(self.store, key, end, self.rev(), opts, |k| {
            self.btx().get(KEY_BUCKET, k)
        })
    }

    /// Puts `key` = `value` with `lease` (0: none). Returns the revision. On error the
    /// transaction is marked failed.
    pub fn put(&mut self, key: &[u8], value: &[u8], lease: i64) -> Result<i64> {
        self.put_inner(key, value, lease)
            .inspect_err(|_| self.failed = true)
    }

    fn put_inner(&mut self, key: &[u8], value: &[u8], lease: i64) -> Result<i64> {
        let rev = self.begin_rev + 1;
        let found = read_index(&self.store.index).get(key, rev);
        let (created, version) = match found {
            Some(f) => (f.created.main, f.version),
            None => (rev, 0),
        };
        let kv = KeyValue {
            key: key.to_vec(),
            create_revision: created,
            mod_revision: rev,
            version: version + 1,
            value: value.to_vec(),
            lease,
        };
        let revision = Revision::new(rev, self.changes.len() as i64);
        self.btx_mut()
            .put_owned(KEY_BUCKET, &revision.to_bytes(false), kv.encode_to_vec())?;
        let mut index = write_index(&self.store.index);
        if !self.undo.contains_key(key) {
            self.undo.insert(key.to_vec(), index.mark(key));
        }
        index.put(key, revision);
        drop(index);
        self.changes.push(Change { kv, delete: false });
        Ok(rev)
    }

    /// Deletes the keys live in the range. Returns how many, and the revision (unchanged if
    /// nothing was deleted and nothing written before in this transaction).
    pub fn delete_range(&mut self, key: &[u8], end: Option<&[u8]>) -> Result<(i64, i64)> {
        self.delete_inner(key, end)
            .inspect_err(|_| self.failed = true)
    }

    fn delete_inner(&mut self, key: &[u8], end: Option<&[u8]>) -> Result<(i64, i64)> {
        let at = self.rev();
        let keys: Vec<Vec<u8>> = {
            let index = read_index(&self.store.index);
            index
                .revisions(key, end, at, 0)
                .0
                .into_iter()
                .map(|(k, _)| k.to_vec())
                .collect()
        };
        let rev = self.begin_rev + 1;
        for k in &keys {
            let revision = Revision::new(rev, self.changes.len() as i64);
            let kv = KeyValue {
                key: k.clone(),
                mod_revision: rev,
                ..KeyValue::default()
            };
            let stored = KeyValue {
                key: k.clone(),
                ..KeyValue::default()
            };
            self.btx_mut().put(
                KEY_BUCKET,
                &revision.to_bytes(true),
                &stored.encode_to_vec(),
            )?;
            let mut index = write_index(&self.store.index);
            self.undo.entry(k.clone()).or_insert_with(|| index.mark(k));
            index.tombstone(k, revision);
            drop(index);
            self.changes.push(Change { kv, delete: true });
        }
        let n = keys.len() as i64;
        Ok((
            n,
            if n != 0 || !self.changes.is_empty() {
                rev
            } else {
                self.begin_rev
            },
        ))
    }

    /// Closes the current revision and starts the next one in the same backend transaction, so
    /// that a batch of requests (each its own revision, as in etcd) costs one backend commit.
    /// Returns the changes of the closed revision. Readers see none of the batch until `end`.
    pub fn finish_revision(&mut self) -> Vec<Change> {
        let changes = std::mem::take(&mut self.changes);
        if !changes.is_empty() {
            self.begin_rev += 1;
        }
        changes
    }

    /// Commits (without syncing: the WAL is the durability point) and publishes the new
    /// revision. `applied` = (raft index, term) is recorded with the data. Returns the changes of
    /// the last revision (see [`WriteTxn::finish_revision`] for the earlier ones).
    pub fn end(mut self, applied: Option<(u64, u64)>) -> Result<Vec<Change>> {
        if self.failed {
            return Err(Error::InvalidArgument(
                "a write failed part-way: the transaction was discarded".into(),
            ));
        }
        if let Some((index, term)) = applied {
            self.btx_mut()
                .put(META_BUCKET, CONSISTENT_INDEX, &be_u64(index))?;
            if term > 0 {
                self.btx_mut().put(META_BUCKET, TERM, &be_u64(term))?;
            }
        }
        self.txn.take().expect("end runs once").commit(false)?;
        // Committed: the index changes stay.
        self.ended = true;
        let last = if self.changes.is_empty() {
            self.begin_rev
        } else {
            self.begin_rev + 1
        };
        if last > self.store.current_revision() {
            self.store.current_rev.store(last, Ordering::SeqCst);
        }
        Ok(std::mem::take(&mut self.changes))
    }
}
