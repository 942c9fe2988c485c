//! The consistency checker (`keelctl db check`, and every test after a recovery).
//!
//! It walks every bucket tree and the free page sets and verifies: page checksums and kinds, key
//! order inside each page and against the separators above it, entry counts against the catalog,
//! overflow runs, and that every page below the high-water mark is referenced exactly once, by a
//! tree, an overflow run, the catalog, the durable free list, or the free/pending sets. As bbolt's
//! `tx.check` and redb's `check_integrity` do.

use super::node::MAX_DEPTH;
use super::page::{self, Kind, PageView, StoredValue, corrupt};
use super::{Backend, Version, lock};
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
    /// Pages holding the durable free list.
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
        Ok(walk.report)
    }
}
