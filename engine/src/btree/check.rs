//! The consistency checker (`keelctl db check`, and every test after a recovery).
//!
//! It walks every bucket tree and the free page sets and verifies: page checksums and kinds, key
//! order inside each page and against the separators above it, entry counts against the catalog,
//! overflow runs, and that every page below the high-water mark is referenced exactly once, by a
//! tree, an overflow run, the catalog, the durable free list (or the one a sync in progress is
//! writing), or the free/pending sets. As bbolt's `tx.check` and redb's `check_integrity` do.
//!
//! It also walks the durable version (the newest synced meta's) when it differs from the current
//! one, and verifies what a crash relies on: none of its pages is free to reuse now, nor counted
//! as fresh (allocated since the last sync was planned, so reusable without waiting for a sync).

use super::node::MAX_DEPTH;
use super::page::{self, Kind, PageView, StoredValue, corrupt};
use super::{Backend, Version, WriterState, load_catalog, lock};
use crate::error::Result;

/// What `check` found (it returns an error for the first problem instead).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Pages below the high-water mark (metas included).
    pub pages: u64,
    /// Pages in trees, overflow runs and the catalog.
    pub used: u64,
    /// Free pages, reusable now or once readers finish.
    pub free: u64,
    /// Pages holding the durable free list, and the one a sync in progress is writing.
    pub freelist: u64,
    /// Entries in all buckets.
    pub entries: u64,
    /// Deepest tree.
    pub depth: usize,
}

struct Walk<'a> {
    version: &'a Version,
    seen: Vec<u8>,
    report: CheckReport,
}

impl Walk<'_> {
    fn mark(&mut self, id: u64, what: &str) -> Result<()> {
        let slot = self
            .seen
            .get_mut(id as usize)
            .ok_or_else(|| corrupt(id, format!("{what} page lies beyond the high-water mark")))?;
        if *slot != 0 {
            return Err(corrupt(
                id,
                format!("page referenced twice (again as {what})"),
            ));
        }
        *slot = 1;
        Ok(())
    }

    /// Walks the subtree at `id`, whose keys must lie in `[low, high)`; returns its entry count.
    fn tree(
        &mut self,
        id: u64,
        low: Option<&[u8]>,
        high: Option<&[u8]>,
        depth: usize,
    ) -> Result<u64> {
        if depth > MAX_DEPTH {
            return Err(corrupt(id, format!("tree deeper than {MAX_DEPTH} levels")));
        }
        self.report.depth = self.report.depth.max(depth);
        self.mark(id, "tree")?;
        let bytes = self.version.page(id)?;
        if !page::checksum_ok(bytes) {
            return Err(corrupt(id, "checksum mismatch"));
        }
        let view = PageView::new(id, bytes)?;
        if view.kind() == Kind::Catalog {
            return Err(corrupt(id, "catalog page inside a tree"));
        }
        let n = view.len();
        let mut prev: Option<&[u8]> = None;
        let mut count = 0;
        for i in 0..n {
            let key = view.key(i)?;
            let routing = view.kind() == Kind::Leaf || i > 0;
            if routing {
                if prev.is_some_and(|p| p >= key) {
                    return Err(corrupt(id, format!("key {i} is out of order")));
                }
                if low.is_some_and(|l| key < l) || high.is_some_and(|h| key >= h) {
                    return Err(corrupt(
                        id,
                        format!("key {i} lies outside its parent's range"),
                    ));
                }
                prev = Some(key);
            }
            match view.kind() {
                Kind::Leaf => {
                    count += 1;
                    if let StoredValue::Overflow(first, len) = view.value(i)? {
                        let run = self.version.whole_run(first, Kind::Overflow)?;
                        if !page::checksum_ok(run) {
                            return Err(corrupt(first, "overflow checksum mismatch"));
                        }
                        if page::HEADER + len as usize > run.len() {
                            return Err(corrupt(first, "overflow run shorter than its value"));
                        }
                        let pages = (run.len() / self.version.page_size) as u64;
                        for p in first..first + pages {
                            self.mark(p, "overflow")?;
                        }
                    }
                }
                Kind::Branch => {
                    let child_low = if i == 0 { low } else { Some(key) };
                    let child_high = if i + 1 < n {
                        Some(view.key(i + 1)?)
                    } else {
                        high
                    };
                    count += self.tree(view.child(i), child_low, child_high, depth + 1)?;
                }
                _ => unreachable!("PageView accepts tree pages only"),
            }
        }
        Ok(count)
    }
}

impl Backend {
    /// Verifies the whole database (see the module docs). Holds the writer lock while it runs;
    /// readers are not blocked.
    pub fn check(&self) -> Result<CheckReport> {
        let w = lock(&self.shared.writer);
        let version = lock(&self.shared.readers).current.clone();
        let mut walk = Walk {
            version: &version,
            seen: vec![0; w.high_water as usize],
            report: CheckReport {
                pages: w.high_water,
                ..CheckReport::default()
            },
        };
        walk.seen[0] = 1;
        walk.seen[1] = 1;
        if version.catalog != 0 {
            walk.mark(version.catalog, "catalog")?;
        }
        for (name, b) in &version.buckets {
            if b.root == 0 {
                if b.count != 0 {
                    return Err(corrupt(
                        version.catalog,
                        "empty bucket with a non-zero count",
                    ));
                }
                continue;
            }
            let count = walk.tree(b.root, None, None, 1)?;
            if count != b.count {
                return Err(corrupt(
                    b.root,
                    format!(
                        "bucket {:?} holds {count} entries, the catalog says {}",
                        String::from_utf8_lossy(name),
                        b.count
                    ),
                ));
            }
            walk.report.entries += count;
        }
        walk.report.used = walk.seen.iter().filter(|&&s| s != 0).count() as u64 - 2;
        for &id in &w.durable_freelist {
            walk.mark(id, "free list")?;
            walk.report.freelist += 1;
        }
        for &id in &w.syncing_freelist {
            walk.mark(id, "free list being synced")?;
            walk.report.freelist += 1;
        }
        for &id in w
            .free
            .iter()
            .chain(w.pending.values().flatten())
            .chain(w.pending_fresh.values().flatten())
        {
            walk.mark(id, "free")?;
            walk.report.free += 1;
        }
        if let Some(leaked) = walk.seen.iter().position(|&s| s == 0) {
            return Err(corrupt(
                leaked as u64,
                "page is neither in use nor free (leaked)",
            ));
        }
        if w.durable_txid != version.txid {
            check_durable(&w, &version)?;
        }
        Ok(walk.report)
    }
}

/// Walks the durable version (the meta in `w.durable_slot`) and fails if any of its pages could
/// be written over before the next sync: free now, fresh, freed as fresh, or taken by the free
/// list a sync in progress is writing.
fn check_durable(w: &WriterState, current: &Version) -> Result<()> {
    let p = current.page_size;
    let slot = w.durable_slot;
    let head = w
        .map
        .bytes(slot as usize * p, 64)
        .ok_or_else(|| corrupt(slot, "durable meta page lies beyond the mapped file"))?;
    let meta = page::Meta::decode(head).map_err(|e| corrupt(slot, format!("durable meta: {e}")))?;
    if meta.txid != w.durable_txid {
        return Err(corrupt(
            slot,
            format!(
                "durable meta holds txid {}, the writer says {}",
                meta.txid, w.durable_txid
            ),
        ));
    }
    if meta.page_count > w.high_water {
        return Err(corrupt(
            slot,
            format!(
                "durable meta counts {} pages, beyond the high-water mark {}",
                meta.page_count, w.high_water
            ),
        ));
    }
    let mut durable = Version {
        txid: meta.txid,
        catalog: meta.catalog,
        page_count: meta.page_count,
        page_size: p,
        buckets: Default::default(),
        map: w.map.clone(),
    };
    durable.buckets = load_catalog(&durable)?;
    let mut walk = Walk {
        version: &durable,
        seen: vec![0; meta.page_count as usize],
        report: CheckReport::default(),
    };
    if durable.catalog != 0 {
        walk.mark(durable.catalog, "catalog")?;
    }
    for b in durable.buckets.values() {
        if b.root != 0 {
            walk.tree(b.root, None, None, 1)?;
        }
    }
    let fresh_freed = w.pending_fresh.values().flatten();
    let syncing = w.syncing_freelist.iter();
    for (id, set) in w
        .free
        .iter()
        .map(|&id| (id, "free"))
        .chain(w.fresh.iter().map(|&id| (id, "fresh")))
        .chain(fresh_freed.map(|&id| (id, "freed as fresh")))
        .chain(syncing.map(|&id| (id, "being written by a sync")))
    {
        if walk.seen.get(id as usize).is_some_and(|&s| s != 0) {
            return Err(corrupt(
                id,
                format!("page of the durable version (txid {}) is {set}", meta.txid),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::btree::BackendOptions;

    /// A backend of 1 KiB pages (trees grow several levels with few keys), etcd's buckets made.
    fn small_pages(dir: &tempfile::TempDir) -> Backend {
        let options = BackendOptions {
            page_size: 1024,
            min_grow_bytes: 64 << 10,
            ..BackendOptions::default()
        };
        let b = Backend::open(dir.path().join("db"), options).unwrap();
        b.create_etcd_buckets().unwrap();
        b
    }

    /// A durable page handed to the free set before the next sync (what a wrong reuse rule would
    /// do) passes the current version's walk, since the current tree no longer references it,
    /// and is caught by the durable one.
    #[test]
    fn a_page_of_the_durable_version_on_the_free_set_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let b = small_pages(&dir);
        let mut txn = b.begin_write().unwrap();
        for i in 0..200u32 {
            txn.put(b"key", format!("key-{i:04}").as_bytes(), &[7; 100])
                .unwrap();
        }
        txn.commit(true).unwrap();
        // A deferred commit replaces the path to key 0: its old pages wait in `pending`.
        let mut txn = b.begin_write().unwrap();
        txn.put(b"key", b"key-0000", b"new").unwrap();
        txn.commit(false).unwrap();
        b.check().unwrap();

        let mut w = lock(&b.shared.writer);
        let (&txid, pages) = w
            .pending
            .iter_mut()
            .next()
            .expect("the deferred commit left pages pending");
        let page = pages.pop().unwrap();
        if pages.is_empty() {
            w.pending.remove(&txid);
        }
        w.free.insert(page);
        drop(w);
        let err = b.check().unwrap_err().to_string();
        assert!(
            err.contains("durable version") && err.contains("is free"),
            "{err}"
        );

        // The same page counted as fresh instead.
        let mut w = lock(&b.shared.writer);
        w.free.remove(&page);
        w.pending.entry(txid).or_default().push(page);
        w.fresh.insert(page);
        drop(w);
        let err = b.check().unwrap_err().to_string();
        assert!(err.contains("is fresh"), "{err}");

        // Put back, the backend checks clean; after a sync the durable version is the current.
        lock(&b.shared.writer).fresh.remove(&page);
        b.check().unwrap();
        b.sync().unwrap();
        b.check().unwrap();
    }

    /// While a sync writes its free list (the writer mutex released), the pages it reserved for
    /// the list are neither in use nor free: `check` counts them as the list being synced, and
    /// reports them if one of them is a page of the durable version.
    #[test]
    fn a_check_during_a_sync_counts_the_free_list_being_written() {
        let dir = tempfile::tempdir().unwrap();
        let b = small_pages(&dir);
        for round in 0..3u32 {
            let mut txn = b.begin_write().unwrap();
            for i in 0..100u32 {
                let value = format!("{round}-{i}");
                txn.put(b"key", format!("key-{i:04}").as_bytes(), value.as_bytes())
                    .unwrap();
            }
            txn.commit(round == 0).unwrap();
        }
        let before = b.check().unwrap();

        // What `Backend::sync` does, stopped between the plan and the I/O.
        let mut plan = {
            let mut w = lock(&b.shared.writer);
            let current = lock(&b.shared.readers).current.clone();
            super::super::plan_sync(&mut w, &current).unwrap()
        };
        let during = b.check().unwrap();
        assert_eq!(
            during.freelist,
            before.freelist + lock(&b.shared.writer).syncing_freelist.len() as u64
        );
        assert!(during.freelist > before.freelist);

        // A page the durable version still uses, reserved for the list instead of waiting in
        // `pending` (what a wrong reservation would do), is reported by the durable walk.
        let (txid, durable_page) = {
            let mut w = lock(&b.shared.writer);
            let current = lock(&b.shared.readers).current.clone();
            assert_ne!(
                w.durable_txid, current.txid,
                "the deferred commits are not synced"
            );
            let (&txid, pages) = w.pending.iter_mut().next().expect("pages wait for a sync");
            let page = pages.pop().unwrap();
            w.syncing_freelist.push(page);
            (txid, page)
        };
        let err = b.check().unwrap_err().to_string();
        assert!(err.contains("is being written by a sync"), "{err}");
        {
            let mut w = lock(&b.shared.writer);
            w.syncing_freelist.pop();
            w.pending.entry(txid).or_default().push(durable_page);
        }
        assert_eq!(b.check().unwrap(), during);

        super::super::write_sync(&mut plan).unwrap();
        super::super::finish_sync(&mut lock(&b.shared.writer), plan);
        assert!(lock(&b.shared.writer).syncing_freelist.is_empty());
        b.check().unwrap();
    }
}
