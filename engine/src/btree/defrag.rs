//! Defragmentation: rewrite the live data compactly into a new file and switch to it (etcd's
//! `defrag`), **without stopping writes**.
//!
//! etcd's defrag holds the backend's locks for its whole duration, so a member serves no write
//! while it runs (etcd issues #9222, #15477). Here the copy is made beside the writer:
//!
//! 1. A read transaction pins version V0; its trees are copied in key order into a new file
//!    (keys inserted in order leave full pages behind, so the copy is dense). Writes continue.
//! 2. Catch-up rounds, still beside the writer: pin the newest version V1 and bring the copy
//!    from V0 to V1. Copy-on-write makes this cheap: a page of V1 that was reachable in V0 is
//!    the same page with the same content (V0 is pinned, so its pages are not reused), so only
//!    the paths to pages written since V0 are visited. A new leaf replaces its key range in the
//!    copy; an old subtree keeps the copy's keys between its first and last key and clears the
//!    rest of its (possibly wider) range. Rounds repeat while they keep finding many changes.
//! 3. Under the writer lock, a last round brings the copy to the current version (only what
//!    changed since the previous round), then the copy is synced, cut to exactly its pages,
//!    renamed over the original, and becomes the backend's file. Writes wait only for this
//!    last step.
//!
//! Read transactions begun before the switch keep reading the old file through their own map
//! (its inode lives until they finish), so they never see it happen.
//!
//! Why "same page ⇒ same keys in the copy" holds between round i−1 and round i: the copy equals
//! V(i−1) exactly (by induction), and a page P reachable in both V(i−1) and Vi has the same
//! content in both. In V(i−1), P's subtree covered a contiguous range holding exactly P's keys
//! from its first to its last key, so the copy holds exactly those keys there. Only P's range
//! edges can differ in Vi, and those are cleared.

use std::collections::HashSet;
use std::sync::Arc;

use super::mmap::Map;
use super::node::{ChildRef, RangeIter, Source};
use super::page::Kind;
use super::write::WriteTxn;
use super::{Backend, BackendOptions, Version, lock, open_file};
use crate::error::{Error, Result};

/// Sizes before and after a defragmentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DefragReport {
    /// File size before, in bytes.
    pub size_before: u64,
    /// File size after, in bytes.
    pub size_after: u64,
    /// Bytes in use before (file size minus free pages).
    pub in_use_before: u64,
    /// Catch-up rounds run beside the writer.
    pub rounds: u32,
    /// Leaves brought over while writes waited (the last round).
    pub locked_leaves: u64,
}

/// Entries per copy transaction: bounds the memory of the copy.
const CHUNK: usize = 20_000;

/// Catch-up rounds beside the writer at most.
const MAX_ROUNDS: u32 = 8;

/// A round that brings over fewer leaves than this is the last one beside the writer.
const SMALL_ROUND: u64 = 256;

/// Every tree page reachable from `v` (branch pages are read; leaf ids come from them).
fn reachable(v: &Version) -> Result<HashSet<u64>> {
    let mut out = HashSet::new();
    let mut stack: Vec<u64> = v
        .buckets
        .values()
        .map(|b| b.root)
        .filter(|&r| r != 0)
        .collect();
    while let Some(id) = stack.pop() {
        out.insert(id);
        let p = v.view(id)?;
        if p.kind() == Kind::Branch {
            for i in 0..p.len() {
                stack.push(p.child(i));
            }
        }
    }
    Ok(out)
}

/// The first or last key of the subtree at `id`.
fn edge_key(v: &Version, mut id: u64, last: bool) -> Result<Option<Vec<u8>>> {
    loop {
        let p = v.view(id)?;
        if p.is_empty() {
            return Ok(None);
        }
        let i = if last { p.len() - 1 } else { 0 };
        if p.kind() == Kind::Branch {
            id = p.child(i);
        } else {
            return Ok(Some(p.key(i)?.to_vec()));
        }
    }
}

/// The smallest key after `k`.
fn successor(k: &[u8]) -> Vec<u8> {
    let mut s = k.to_vec();
    s.push(0);
    s
}

/// Writes into the copy in transactions of at most [`CHUNK`] operations.
struct Copier<'a> {
    copy: &'a Backend,
    txn: Option<WriteTxn<'a>>,
    ops: usize,
}

impl<'a> Copier<'a> {
    fn txn(&mut self) -> Result<&mut WriteTxn<'a>> {
        if self.ops >= CHUNK
            && let Some(t) = self.txn.take()
        {
            // Synced per chunk: the pages a chunk frees are reused either way (see the module
            // docs of `btree`, "Page reuse"), but a sync bounds what the copy's writer tracks
            // as fresh and what the final sync writes back.
            t.commit(true)?;
            self.ops = 0;
        }
        if self.txn.is_none() {
            self.txn = Some(self.copy.begin_write()?);
        }
        Ok(self.txn.as_mut().expect("just set"))
    }

    fn put(&mut self, bucket: &[u8], k: &[u8], v: &[u8]) -> Result<()> {
        self.txn()?.put(bucket, k, v)?;
        self.ops += 1;
        Ok(())
    }

    /// Deletes the copy's keys in `[lo, hi)` (`None`: unbounded).
    fn clear(&mut self, bucket: &[u8], lo: Option<&[u8]>, hi: Option<&[u8]>) -> Result<()> {
        if let (Some(lo), Some(hi)) = (lo, hi)
            && lo >= hi
        {
            return Ok(());
        }
        let txn = self.txn()?;
        let keys: Vec<Vec<u8>> = txn
            .range(bucket, lo.unwrap_or(b""), hi)?
            .map(|kv| kv.map(|(k, _)| k.to_vec()))
            .collect::<Result<_>>()?;
        for k in &keys {
            txn.delete(bucket, k)?;
        }
        self.ops += keys.len();
        Ok(())
    }

    fn finish(mut self, at_least_txid: Option<u64>) -> Result<()> {
        let mut txn = match self.txn.take() {
            Some(t) => t,
            None => self.copy.begin_write()?,
        };
        if let Some(txid) = at_least_txid {
            txn.set_txid_at_least(txid);
        }
        txn.commit(true)
    }
}

/// A page still to visit, with the lower and upper bounds of its keys (`None`: unbounded).
type Subtree = (u64, Option<Vec<u8>>, Option<Vec<u8>>);

/// Brings the copy's bucket `name` from `old` (whose reachable pages are `old_pages`) to the tree
/// at `root` in `new`: the leaves brought over.
fn catch_up_tree(
    new: &Version,
    name: &[u8],
    root: u64,
    old_pages: &HashSet<u64>,
    copier: &mut Copier<'_>,
) -> Result<u64> {
    let mut leaves = 0;
    // (page, lower bound, upper bound) of the subtrees still to visit.
    let mut stack: Vec<Subtree> = vec![(root, None, None)];
    while let Some((id, lo, hi)) = stack.pop() {
        if old_pages.contains(&id) {
            // The same subtree as in the copy: clear only the edges of its range.
            match (edge_key(new, id, false)?, edge_key(new, id, true)?) {
                (Some(first), Some(last)) => {
                    copier.clear(name, lo.as_deref(), Some(&first))?;
                    let after = successor(&last);
                    copier.clear(name, Some(&after), hi.as_deref())?;
                }
                _ => copier.clear(name, lo.as_deref(), hi.as_deref())?,
            }
            continue;
        }
        let p = new.view(id)?;
        if p.kind() == Kind::Branch {
            for i in 0..p.len() {
                let child_lo = if i == 0 {
                    lo.clone()
                } else {
                    Some(p.key(i)?.to_vec())
                };
                let child_hi = if i + 1 < p.len() {
                    Some(p.key(i + 1)?.to_vec())
                } else {
                    hi.clone()
                };
                stack.push((p.child(i), child_lo, child_hi));
            }
        } else {
            copier.clear(name, lo.as_deref(), hi.as_deref())?;
            for i in 0..p.len() {
                let (k, v) = p.entry(i)?;
                copier.put(name, k, new.resolve(v)?)?;
            }
            leaves += 1;
        }
    }
    Ok(leaves)
}

/// Brings the whole copy from `old` to `new`: the leaves brought over.
fn catch_up(
    new: &Version,
    old: &Version,
    old_pages: &HashSet<u64>,
    copier: &mut Copier<'_>,
) -> Result<u64> {
    let mut leaves = 0;
    for (name, b) in &new.buckets {
        if old.buckets.get(name).map(|o| o.root) == Some(b.root) {
            continue;
        }
        if !old.buckets.contains_key(name) {
            copier.txn()?.create_bucket(name)?;
        }
        if b.root == 0 {
            copier.clear(name, None, None)?;
        } else {
            leaves += catch_up_tree(new, name, b.root, old_pages, copier)?;
        }
    }
    for name in old.buckets.keys() {
        if !new.buckets.contains_key(name) {
            // Buckets are never dropped by Keel; emptied if one were.
            copier.clear(name, None, None)?;
        }
    }
    Ok(leaves)
}

impl Backend {
    /// Rewrites the database into a compact new file and switches to it; writes wait only for
    /// the last catch-up round and the switch.
    pub fn defrag(&self) -> Result<DefragReport> {
        // A second defragmentation waits: both would use the same copy's name, and one would
        // rename the other's half-made copy over the file.
        let _one = lock(&self.shared.defrag);
        let in_use_before = self.size_in_use();
        let (path, options) = {
            let w = lock(&self.shared.writer);
            if let Some(why) = &w.poisoned {
                return Err(Error::Poisoned(why.clone()));
            }
            (w.path.clone(), w.options.clone())
        };
        let mut tmp = path.clone().into_os_string();
        tmp.push(".defrag");
        let tmp = std::path::PathBuf::from(tmp);
        match std::fs::remove_file(&tmp) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io("removing", &tmp, e)),
        }
        // Phase 1: the pinned version, copied beside the writer.
        let mut base = self.begin_read();
        let options = BackendOptions {
            page_size: base.version.page_size,
            ..options
        };
        let copy = open_file(&tmp, options, base.version.txid + 1)?;
        let result = self.fill_and_switch(copy, &mut base, &path, &tmp, in_use_before);
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }

    fn fill_and_switch(
        &self,
        copy: Backend,
        base: &mut super::ReadTxn,
        path: &std::path::Path,
        tmp: &std::path::Path,
        in_use_before: u64,
    ) -> Result<DefragReport> {
        {
            let mut copier = Copier {
                copy: &copy,
                txn: None,
                ops: 0,
            };
            let v = base.version.clone();
            for (name, b) in &v.buckets {
                copier.txn()?.create_bucket(name)?;
                let root = if b.root == 0 {
                    ChildRef::Empty
                } else {
                    ChildRef::Page(b.root)
                };
                for kv in RangeIter::new(&v, Source::Pages, root, b"", None)? {
                    let (k, v) = kv?;
                    copier.put(name, k, v)?;
                }
            }
            copier.finish(None)?;
        }
        // Phase 2: catch-up rounds beside the writer.
        let mut base_pages = reachable(&base.version)?;
        let mut rounds = 0;
        while rounds < MAX_ROUNDS {
            let next = self.begin_read();
            if next.version.txid == base.version.txid {
                break;
            }
            let mut copier = Copier {
                copy: &copy,
                txn: None,
                ops: 0,
            };
            let leaves = catch_up(&next.version, &base.version, &base_pages, &mut copier)?;
            copier.finish(None)?;
            base_pages = reachable(&next.version)?;
            *base = next;
            rounds += 1;
            if leaves < SMALL_ROUND {
                break;
            }
        }
        // Phase 3: the last round and the switch, with writes (and syncs, whose plan names the
        // old file) waiting.
        let _one = lock(&self.shared.sync);
        let mut w = lock(&self.shared.writer);
        // A backend poisoned meanwhile (a failed sync: the cached pages may not be what was
        // committed) is not copied, and stays poisoned until reopened; one whose file a
        // snapshot replaced (`Backend::replace_file`) is not switched either.
        if let Some(why) = &w.poisoned {
            return Err(Error::Poisoned(why.clone()));
        }
        let current = lock(&self.shared.readers).current.clone();
        let size_before = w.file_len;
        let mut copier = Copier {
            copy: &copy,
            txn: None,
            ops: 0,
        };
        let locked_leaves = catch_up(&current, &base.version, &base_pages, &mut copier)?;
        // The copy's versions continue the txid sequence past the current one, so reader
        // bookkeeping stays ordered after the switch.
        copier.finish(Some(current.txid + 1))?;
        copy.sync()?;
        let shared = Arc::try_unwrap(copy.shared)
            .map_err(|_| Error::InvalidArgument("defrag copy still in use".into()))?;
        let mut new_writer = shared
            .writer
            .into_inner()
            .unwrap_or_else(|e| e.into_inner());
        let copied = shared
            .readers
            .into_inner()
            .unwrap_or_else(|e| e.into_inner())
            .current;
        // The copy grew in steps; cut it to exactly its pages. Nothing else maps it yet (its only
        // version is `copied`, remade here with a map of the new length), so shrinking is safe.
        let exact = new_writer.high_water * copied.page_size as u64;
        new_writer
            .file
            .set_len(exact)
            .map_err(|e| Error::io("truncating", tmp, e))?;
        new_writer
            .file
            .sync_all()
            .map_err(|e| Error::io("fsync", tmp, e))?;
        new_writer.file_len = exact;
        let map =
            Map::new(&new_writer.file, exact as usize).map_err(|e| Error::io("mapping", tmp, e))?;
        new_writer.map = Arc::new(map);
        let copied = Arc::try_unwrap(copied)
            .map_err(|_| Error::InvalidArgument("defrag copy version still in use".into()))?;
        let new_current = Arc::new(Version {
            map: new_writer.map.clone(),
            ..copied
        });
        std::fs::rename(tmp, path).map_err(|e| Error::io("renaming", tmp, e))?;
        // From the rename on, the path names the copy: switch to it before anything else can
        // fail, so that no later write goes to the old, unlinked file.
        new_writer.path = path.to_path_buf();
        new_writer.observer = w.observer.take();
        new_writer.sizes = w.sizes.clone();
        new_writer.update_sizes(&new_current);
        let size_after = new_writer.file_len;
        // The copy's file descriptor carries its flock; the old one is released with the old
        // state (its inode stays alive for readers mapping it).
        *w = new_writer;
        lock(&self.shared.readers).current = new_current;
        if let Some(dir) = path.parent() {
            let dir = if dir.as_os_str().is_empty() {
                std::path::Path::new(".")
            } else {
                dir
            };
            let synced = std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| Error::io("fsync of directory", dir, e));
            super::poison_on_error(&mut w, synced)?;
        }
        Ok(DefragReport {
            size_before,
            size_after,
            in_use_before,
            rounds,
            locked_leaves,
        })
    }
}
