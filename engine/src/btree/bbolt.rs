//! etcd's backend file format, bbolt 1.3 (what etcd 3.4 snapshots are): written from a pinned
//! backend version, and read back.
//!
//! # Format (bbolt 1.3.6, `page.go`, `db.go`, `node.go`; all integers little-endian)
//! - Pages of [`PAGE`] bytes; page `n` starts at `n * PAGE`, and the file is `hwm * PAGE` bytes.
//! - Every page starts with a 16-byte header: `id` u64 (its own index), `flags` u16 (branch
//!   0x01, leaf 0x02, meta 0x04, freelist 0x10: a file's freelist page, if it has one, is never
//!   reached from the root and is not read), `count` u16 (elements), `overflow` u32 (extra
//!   contiguous pages the node spans).
//! - Pages 0 and 1 are metas, after the header: magic `0xED0CDAED` u32, version 2 u32, page size
//!   u32, flags u32, root bucket `{root pgid u64, sequence u64}`, freelist pgid u64 (all ones:
//!   none, as etcd 3.4 on Linux writes), hwm pgid u64, txid u64, and the FNV-1a 64 checksum of
//!   those 56 bytes. The valid meta with the larger txid wins.
//! - Leaf element, 16 bytes from offset 16: `flags` u32 (1: the value is a bucket), `pos` u32
//!   (from the element to its key), `ksize` u32, `vsize` u32; the value follows the key. Branch
//!   element: `pos` u32, `ksize` u32, child `pgid` u64; its key is the child's first key.
//! - The root bucket's tree holds one leaf element per bucket (flag 1), whose value is the
//!   16-byte header `{root pgid, sequence 0}` of that bucket's own tree (never inline here).
//!
//! # Writing ([`Plan`])
//! Two passes over a pinned version, so memory holds only the first key of each leaf, never the
//! data: [`Plan::new`] packs each bucket's entries greedily into leaves (a node larger than a
//! page spans overflow pages), builds the branch levels over them (every branch has at least two
//! children, its keys the children's first keys) and numbers the pages in file order; then
//! [`Plan::write`] streams the pages, reading the entries again.
//!
//! # Reading ([`read`])
//! Walks a file and checks what bbolt and etcd rely on (metas and checksums, page ids, kinds and
//! bounds, sorted keys, branch keys equal to the children's first keys, uniform depth) before
//! returning any entry; an error names the offset.

use std::io::Write;

use super::ReadTxn;
use crate::error::{Error, Result};

/// bbolt's page size on Linux amd64.
pub const PAGE: usize = 4096;
const HEADER: usize = 16;
const ELEMENT: usize = 16;
const BRANCH: u16 = 0x01;
const LEAF: u16 = 0x02;
const META: u16 = 0x04;
const BUCKET_LEAF: u32 = 0x01;
const MAGIC: u32 = 0xED0C_DAED;
const VERSION: u32 = 2;
const NO_FREELIST: u64 = u64::MAX;

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Pages a node of `size` bytes spans.
fn pages_for(size: usize) -> u64 {
    size.div_ceil(PAGE).max(1) as u64
}

/// A leaf as planned: its first page, its pages, and its number of entries.
#[derive(Debug, Clone)]
struct Leaf {
    pgid: u64,
    pages: u64,
    count: usize,
}

/// A branch page: its first page, its pages, and its children (first key, pgid).
#[derive(Debug, Clone)]
struct Branch {
    pgid: u64,
    pages: u64,
    children: Vec<(Vec<u8>, u64)>,
}

/// One tree (a bucket's, or the root bucket's): leaves in key order, then its branch pages in
/// the order they are numbered; its root page.
#[derive(Debug, Clone, Default)]
struct Tree {
    leaves: Vec<Leaf>,
    branches: Vec<Branch>,
    root: u64,
}

/// Packs `(first key, pgid)` children into branch levels above them until one node remains,
/// numbering the pages from `*next`.
fn build_branches(mut level: Vec<(Vec<u8>, u64)>, next: &mut u64, out: &mut Vec<Branch>) -> u64 {
    while level.len() > 1 {
        let mut groups: Vec<Vec<(Vec<u8>, u64)>> = Vec::new();
        let mut size = HEADER;
        for child in level {
            let esize = ELEMENT + child.0.len();
            match groups.last_mut() {
                Some(g) if size + esize <= PAGE || g.len() < 2 => {
                    size += esize;
                    g.push(child);
                }
                _ => {
                    size = HEADER + esize;
                    groups.push(vec![child]);
                }
            }
        }
        // Every branch needs two children: a lone last child joins the group before it.
        if groups.len() > 1 && groups.last().is_some_and(|g| g.len() < 2) {
            let lone = groups.pop().expect("checked");
            groups.last_mut().expect("checked").extend(lone);
        }
        level = Vec::with_capacity(groups.len());
        for children in groups {
            let size = HEADER + children.iter().map(|c| ELEMENT + c.0.len()).sum::<usize>();
            let pages = pages_for(size);
            let pgid = *next;
            *next += pages;
            level.push((children[0].0.clone(), pgid));
            out.push(Branch {
                pgid,
                pages,
                children,
            });
        }
    }
    level.first().map_or(0, |c| c.1)
}

/// Plans one tree over `entries`, numbering its pages from `*next`.
fn plan_tree<'a>(
    entries: impl Iterator<Item = Result<(&'a [u8], usize)>>,
    next: &mut u64,
) -> Result<Tree> {
    let mut tree = Tree::default();
    let mut firsts: Vec<(Vec<u8>, u64)> = Vec::new();
    let (mut size, mut count, mut first): (usize, usize, Option<Vec<u8>>) = (HEADER, 0, None);
    let mut close = |size: usize, count: usize, first: Vec<u8>, tree: &mut Tree| {
        let pages = pages_for(size);
        tree.leaves.push(Leaf {
            pgid: *next,
            pages,
            count,
        });
        firsts.push((first, *next));
        *next += pages;
    };
    for entry in entries {
        let (key, vsize) = entry?;
        let esize = ELEMENT + key.len() + vsize;
        if count > 0 && size + esize > PAGE {
            close(
                size,
                count,
                first.take().expect("a leaf has a first key"),
                &mut tree,
            );
            size = HEADER;
            count = 0;
        }
        if count == 0 {
            first = Some(key.to_vec());
        }
        size += esize;
        count += 1;
    }
    if count > 0 || tree.leaves.is_empty() {
        // An empty tree is one empty leaf.
        close(size, count, first.unwrap_or_default(), &mut tree);
    }
    tree.root = build_branches(firsts, next, &mut tree.branches);
    Ok(tree)
}

/// What [`Plan::write`] will write: every page numbered, the size known before a byte is sent.
#[derive(Debug)]
pub struct Plan {
    buckets: Vec<(Vec<u8>, Tree)>,
    root: Tree,
    hwm: u64,
}

impl Plan {
    /// Plans the file of `txn`'s buckets (first pass over the data).
    pub fn new(txn: &ReadTxn) -> Result<Plan> {
        let mut next = 2u64;
        let mut buckets = Vec::new();
        for name in txn.buckets() {
            if name.is_empty() {
                continue;
            }
            let iter = txn.range(&name, b"", None)?;
            let tree = plan_tree(iter.map(|kv| kv.map(|(k, v)| (k, v.len()))), &mut next)?;
            buckets.push((name, tree));
        }
        let names: Vec<Vec<u8>> = buckets.iter().map(|(n, _)| n.clone()).collect();
        let root = plan_tree(names.iter().map(|n| Ok((n.as_slice(), 16))), &mut next)?;
        Ok(Plan {
            buckets,
            root,
            hwm: next,
        })
    }

    /// The file's size in bytes.
    pub fn size(&self) -> u64 {
        self.hwm * PAGE as u64
    }

    /// Writes the file (second pass over the data, which must be the same pinned version).
    pub fn write(&self, txn: &ReadTxn, out: &mut dyn Write) -> Result<u64> {
        let io = |e: std::io::Error| Error::io("writing a bbolt file", "<stream>", e);
        for (pgid, txid) in [(0u64, 2u64), (1, 1)] {
            out.write_all(&self.meta(pgid, txid)).map_err(io)?;
        }
        let mut written = 2u64;
        for (name, tree) in &self.buckets {
            let mut iter = txn.range(name, b"", None)?;
            for leaf in &tree.leaves {
                let mut items = Vec::with_capacity(leaf.count);
                for _ in 0..leaf.count {
                    let (k, v) = iter.next().ok_or_else(|| changed(name))??;
                    items.push((0u32, k, v));
                }
                written += write_leaf(out, leaf, &items).map_err(io)?;
            }
            if iter.next().is_some() {
                return Err(changed(name));
            }
            for b in &tree.branches {
                written += write_branch(out, b).map_err(io)?;
            }
        }
        let headers: Vec<(Vec<u8>, [u8; 16])> = self
            .buckets
            .iter()
            .map(|(n, t)| {
                let mut h = [0u8; 16];
                h[..8].copy_from_slice(&t.root.to_le_bytes());
                (n.clone(), h)
            })
            .collect();
        let mut rest = headers.iter();
        for leaf in &self.root.leaves {
            let items: Vec<(u32, &[u8], &[u8])> = rest
                .by_ref()
                .take(leaf.count)
                .map(|(n, h)| (BUCKET_LEAF, n.as_slice(), h.as_slice()))
                .collect();
            written += write_leaf(out, leaf, &items).map_err(io)?;
        }
        for b in &self.root.branches {
            written += write_branch(out, b).map_err(io)?;
        }
        if written != self.hwm {
            return Err(Error::InvalidArgument(format!(
                "bbolt writer: wrote {written} pages of a plan of {}",
                self.hwm
            )));
        }
        Ok(self.size())
    }

    fn meta(&self, pgid: u64, txid: u64) -> Vec<u8> {
        let mut p = vec![0u8; PAGE];
        p[..8].copy_from_slice(&pgid.to_le_bytes());
        p[8..10].copy_from_slice(&META.to_le_bytes());
        let m = &mut p[HEADER..HEADER + 64];
        m[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        m[4..8].copy_from_slice(&VERSION.to_le_bytes());
        m[8..12].copy_from_slice(&(PAGE as u32).to_le_bytes());
        m[16..24].copy_from_slice(&self.root.root.to_le_bytes());
        m[32..40].copy_from_slice(&NO_FREELIST.to_le_bytes());
        m[40..48].copy_from_slice(&self.hwm.to_le_bytes());
        m[48..56].copy_from_slice(&txid.to_le_bytes());
        let sum = fnv1a(&m[..56]);
        m[56..64].copy_from_slice(&sum.to_le_bytes());
        p
    }
}

fn changed(bucket: &[u8]) -> Error {
    Error::InvalidArgument(format!(
        "bucket {:?} changed between the passes of a bbolt write (the version must be pinned)",
        String::from_utf8_lossy(bucket)
    ))
}

fn header(pgid: u64, flags: u16, count: usize, pages: u64) -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    h[..8].copy_from_slice(&pgid.to_le_bytes());
    h[8..10].copy_from_slice(&flags.to_le_bytes());
    h[10..12].copy_from_slice(&(count as u16).to_le_bytes());
    h[12..16].copy_from_slice(&((pages - 1) as u32).to_le_bytes());
    h
}

/// Writes a leaf of `items` (flags, key, value): its pages.
fn write_leaf(
    out: &mut dyn Write,
    leaf: &Leaf,
    items: &[(u32, &[u8], &[u8])],
) -> std::io::Result<u64> {
    let mut p = vec![0u8; leaf.pages as usize * PAGE];
    p[..HEADER].copy_from_slice(&header(leaf.pgid, LEAF, items.len(), leaf.pages));
    let mut data = HEADER + ELEMENT * items.len();
    for (i, (flags, k, v)) in items.iter().enumerate() {
        let at = HEADER + ELEMENT * i;
        let e = &mut p[at..at + ELEMENT];
        e[0..4].copy_from_slice(&flags.to_le_bytes());
        e[4..8].copy_from_slice(&((data - at) as u32).to_le_bytes());
        e[8..12].copy_from_slice(&(k.len() as u32).to_le_bytes());
        e[12..16].copy_from_slice(&(v.len() as u32).to_le_bytes());
        p[data..data + k.len()].copy_from_slice(k);
        data += k.len();
        p[data..data + v.len()].copy_from_slice(v);
        data += v.len();
    }
    out.write_all(&p)?;
    Ok(leaf.pages)
}

fn write_branch(out: &mut dyn Write, b: &Branch) -> std::io::Result<u64> {
    let mut p = vec![0u8; b.pages as usize * PAGE];
    p[..HEADER].copy_from_slice(&header(b.pgid, BRANCH, b.children.len(), b.pages));
    let mut data = HEADER + ELEMENT * b.children.len();
    for (i, (k, child)) in b.children.iter().enumerate() {
        let at = HEADER + ELEMENT * i;
        let e = &mut p[at..at + ELEMENT];
        e[0..4].copy_from_slice(&((data - at) as u32).to_le_bytes());
        e[4..8].copy_from_slice(&(k.len() as u32).to_le_bytes());
        e[8..16].copy_from_slice(&child.to_le_bytes());
        p[data..data + k.len()].copy_from_slice(k);
        data += k.len();
    }
    out.write_all(&p)?;
    Ok(b.pages)
}

/// Every bucket of a bbolt file and its entries, in order.
pub type Buckets = Vec<(Vec<u8>, Vec<(Vec<u8>, Vec<u8>)>)>;

/// Reads the whole bbolt file `bytes` into memory (see [`visit`]).
pub fn read(bytes: &[u8], what: &str) -> Result<Buckets> {
    let mut out: Buckets = Vec::new();
    visit(bytes, what, &mut |bucket, k, v| {
        if out.last().is_none_or(|(b, _)| b.as_slice() != bucket) {
            out.push((bucket.to_vec(), Vec::new()));
        }
        out.last_mut()
            .expect("pushed")
            .1
            .push((k.to_vec(), v.to_vec()));
        Ok(())
    })?;
    Ok(out)
}

/// The names of the buckets of the bbolt file `bytes`, in order (empty ones too).
pub fn bucket_names(bytes: &[u8], what: &str) -> Result<Vec<Vec<u8>>> {
    let (reader, root) = open(bytes, what)?;
    let mut names = Vec::new();
    reader.walk(root, 0, &mut None, None, &mut None, &mut |name, _, _| {
        names.push(name.to_vec());
        Ok(())
    })?;
    Ok(names)
}

/// Walks the bbolt file `bytes` (its length at least `hwm` pages; anything after is ignored,
/// such as etcd's sha256 trailer) and calls `f(bucket, key, value)` for every entry, in order,
/// checking as it goes what bbolt and etcd rely on: metas and checksums, page ids, kinds and
/// bounds, sorted keys, branch keys equal to their children's first keys, leaves at one depth.
/// `what` names the file in errors, which give the offset. Mapping the file (rather than reading
/// it) keeps memory to what the caller keeps.
pub fn visit(bytes: &[u8], what: &str, f: &mut EntryFn<'_>) -> Result<()> {
    let (reader, root) = open(bytes, what)?;
    reader.walk(
        root,
        0,
        &mut None,
        None,
        &mut None,
        &mut |name, flags, value| {
            if flags & BUCKET_LEAF == 0 || value.len() < 16 {
                return Err(reader.bad(
                    root as usize * PAGE,
                    format!(
                        "root bucket entry {:?} is not a bucket",
                        String::from_utf8_lossy(name)
                    ),
                ));
            }
            let sub = u64::from_le_bytes(value[..8].try_into().expect("8 bytes"));
            let mut each = |k: &[u8], flags: u32, v: &[u8]| {
                if flags & BUCKET_LEAF != 0 {
                    return Err(reader.bad(0, "nested buckets are not etcd's".into()));
                }
                f(name, k, v)
            };
            if sub == 0 {
                // An inline bucket: one leaf page after the 16-byte header.
                let page = &value[16..];
                if page.len() < HEADER {
                    return Err(reader.bad(0, "a truncated inline bucket".into()));
                }
                let count = usize::from(u16::from_le_bytes([page[10], page[11]]));
                reader.elements(page, count, 0, None, &mut None, &mut each)
            } else {
                reader.walk(sub, 0, &mut None, None, &mut None, &mut each)
            }
        },
    )
}

/// The checked meta of `bytes`: a reader over its pages, and the root bucket's page.
fn open<'a>(bytes: &'a [u8], what: &str) -> Result<(Reader<'a>, u64)> {
    let bad = |offset: usize, reason: String| Error::Corruption {
        path: what.into(),
        offset: offset as u64,
        reason,
    };
    let meta = |n: usize| -> Option<(u64, u64, u64)> {
        let m = bytes.get(n * PAGE + HEADER..n * PAGE + HEADER + 64)?;
        let u32_at = |i: usize| u32::from_le_bytes(m[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_le_bytes(m[i..i + 8].try_into().expect("8 bytes"));
        (u32_at(0) == MAGIC
            && u32_at(4) == VERSION
            && u32_at(8) as usize == PAGE
            && u64_at(56) == fnv1a(&m[..56]))
        .then(|| (u64_at(48), u64_at(16), u64_at(40)))
    };
    let (_, root, hwm) = match (meta(0), meta(1)) {
        (Some(a), Some(b)) => {
            if a.0 >= b.0 {
                a
            } else {
                b
            }
        }
        (Some(a), None) | (None, Some(a)) => a,
        (None, None) => {
            return Err(bad(
                0,
                "no valid bbolt meta page (magic, version 2, page size 4096 and checksum)".into(),
            ));
        }
    };
    let size = usize::try_from(hwm)
        .ok()
        .and_then(|h| h.checked_mul(PAGE))
        .ok_or_else(|| bad(0, format!("high-water mark {hwm} is too large")))?;
    if bytes.len() < size {
        return Err(bad(
            bytes.len(),
            format!("the file ends before its {hwm} pages ({size} bytes)"),
        ));
    }
    Ok((
        Reader {
            file: &bytes[..size],
            what: what.to_string(),
        },
        root,
    ))
}

/// What [`visit`] calls for each entry: bucket, key, value.
pub type EntryFn<'a> = dyn FnMut(&[u8], &[u8], &[u8]) -> Result<()> + 'a;
/// What the walk calls for each leaf element: key, flags, value.
type ElementFn<'a> = dyn FnMut(&[u8], u32, &[u8]) -> Result<()> + 'a;

struct Reader<'a> {
    file: &'a [u8],
    what: String,
}

impl Reader<'_> {
    fn bad(&self, offset: usize, reason: String) -> Error {
        Error::Corruption {
            path: self.what.clone().into(),
            offset: offset as u64,
            reason,
        }
    }

    /// The page `id` and the bytes it spans, checked.
    fn page(&self, id: u64, kinds: &[u16]) -> Result<(u16, usize, &[u8])> {
        let start = usize::try_from(id)
            .ok()
            .and_then(|i| i.checked_mul(PAGE))
            .filter(|s| s.checked_add(PAGE).is_some_and(|e| e <= self.file.len()) && id >= 2)
            .ok_or_else(|| self.bad(0, format!("page {id} is out of range")))?;
        let h = &self.file[start..start + HEADER];
        let got = u64::from_le_bytes(h[..8].try_into().expect("8 bytes"));
        let flags = u16::from_le_bytes([h[8], h[9]]);
        let count = usize::from(u16::from_le_bytes([h[10], h[11]]));
        let overflow = u32::from_le_bytes(h[12..16].try_into().expect("4 bytes")) as usize;
        if got != id {
            return Err(self.bad(start, format!("page {id} says it is page {got}")));
        }
        if !kinds.contains(&flags) {
            return Err(self.bad(start, format!("page {id} has flags {flags:#x}")));
        }
        let end = (overflow + 1)
            .checked_mul(PAGE)
            .and_then(|l| l.checked_add(start))
            .filter(|e| *e <= self.file.len())
            .ok_or_else(|| self.bad(start, format!("page {id} overflows the file")))?;
        Ok((flags, count, &self.file[start..end]))
    }

    /// Calls `f(key, flags, value)` for the `count` elements of leaf bytes `p` (at file offset
    /// `at`), checking their order after `last`, and that the first is `first`.
    fn elements(
        &self,
        p: &[u8],
        count: usize,
        at: usize,
        first: Option<&[u8]>,
        last: &mut Option<Vec<u8>>,
        f: &mut ElementFn<'_>,
    ) -> Result<()> {
        if count == 0 && first.is_some() {
            return Err(self.bad(at, "an empty leaf below a branch".into()));
        }
        for i in 0..count {
            let e = HEADER + ELEMENT * i;
            let field = |o: usize| {
                p.get(e + o..e + o + 4)
                    .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize)
                    .ok_or_else(|| self.bad(at, format!("element {i} is out of its page")))
            };
            let (flags, pos, ksize, vsize) = (field(0)?, field(4)?, field(8)?, field(12)?);
            let k = e + pos;
            let (Some(key), Some(value)) = (
                p.get(k..k.saturating_add(ksize)),
                p.get(k.saturating_add(ksize)..k.saturating_add(ksize).saturating_add(vsize)),
            ) else {
                return Err(self.bad(at, format!("element {i} points out of its page")));
            };
            if i == 0
                && let Some(first) = first
                && key != first
            {
                return Err(self.bad(at, "a branch key is not its child's first key".into()));
            }
            if last.as_deref().is_some_and(|prev| prev >= key) {
                return Err(self.bad(at, format!("element {i}: keys out of order")));
            }
            *last = Some(key.to_vec());
            f(key, flags as u32, value)?;
        }
        Ok(())
    }

    /// Walks the tree rooted at `id` in key order; `depth` checks that leaves are level, `first`
    /// is the key the parent branch gave this page.
    fn walk(
        &self,
        id: u64,
        level: usize,
        depth: &mut Option<usize>,
        first: Option<&[u8]>,
        last: &mut Option<Vec<u8>>,
        f: &mut ElementFn<'_>,
    ) -> Result<()> {
        let at = usize::try_from(id)
            .unwrap_or(usize::MAX)
            .saturating_mul(PAGE);
        if level > 64 {
            return Err(self.bad(at, "the tree is too deep (a cycle?)".into()));
        }
        let (flags, count, p) = self.page(id, &[BRANCH, LEAF])?;
        if flags == LEAF {
            if depth.is_some_and(|d| d != level) {
                return Err(self.bad(at, "leaves at different depths".into()));
            }
            *depth = Some(level);
            return self.elements(p, count, at, first, last, f);
        }
        if count == 0 {
            return Err(self.bad(at, "an empty branch page".into()));
        }
        for i in 0..count {
            let e = HEADER + ELEMENT * i;
            let word = |o: usize, n: usize| {
                p.get(e + o..e + o + n)
                    .ok_or_else(|| self.bad(at, format!("element {i} is out of its page")))
            };
            let pos = u32::from_le_bytes(word(0, 4)?.try_into().expect("4 bytes")) as usize;
            let ksize = u32::from_le_bytes(word(4, 4)?.try_into().expect("4 bytes")) as usize;
            let child = u64::from_le_bytes(word(8, 8)?.try_into().expect("8 bytes"));
            let key = p
                .get(e + pos..(e + pos).saturating_add(ksize))
                .ok_or_else(|| self.bad(at, format!("element {i} points out of its page")))?;
            if i == 0
                && let Some(first) = first
                && key != first
            {
                return Err(self.bad(at, "a branch key is not its child's first key".into()));
            }
            self.walk(child, level + 1, depth, Some(key), last, f)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::btree::{Backend, BackendOptions};

    #[test]
    fn written_files_read_back_whole_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let b = Backend::open(dir.path().join("db"), BackendOptions::default()).unwrap();
        b.create_etcd_buckets().unwrap();
        let mut w = b.begin_write().unwrap();
        // Enough keys for branch levels, a value over a page, and an empty bucket.
        for i in 0..20_000u32 {
            w.put(b"key", format!("k{i:08}").as_bytes(), &[i as u8; 40])
                .unwrap();
        }
        w.put(b"meta", b"big", &vec![7u8; 3 * PAGE + 5]).unwrap();
        w.put(b"meta", b"consistent_index", &[0, 0, 0, 0, 0, 0, 0, 9])
            .unwrap();
        w.commit(true).unwrap();
        let txn = b.begin_read();
        let plan = Plan::new(&txn).unwrap();
        let mut bytes = Vec::new();
        assert_eq!(plan.write(&txn, &mut bytes).unwrap(), bytes.len() as u64);
        assert_eq!(bytes.len() as u64, plan.size());
        assert_eq!(bucket_names(&bytes, "test.db").unwrap(), txn.buckets());
        let got = read(&bytes, "test.db").unwrap();
        assert_eq!(got.len(), 2, "the non-empty buckets");
        for (name, entries) in &got {
            let want: Vec<(Vec<u8>, Vec<u8>)> = txn
                .range(name, b"", None)
                .unwrap()
                .map(|kv| kv.map(|(k, v)| (k.to_vec(), v.to_vec())).unwrap())
                .collect();
            assert_eq!(entries, &want, "{}", String::from_utf8_lossy(name));
        }
        // Damage is found and placed.
        let mut torn = bytes.clone();
        torn.truncate(bytes.len() - PAGE);
        assert!(matches!(read(&torn, "t.db"), Err(Error::Corruption { .. })));
        let mut flipped = bytes.clone();
        flipped[3 * PAGE] ^= 0xff;
        assert!(read(&flipped, "f.db").is_err());
        // A root page number whose offset overflows: an error, not a panic.
        let mut far = bytes.clone();
        for slot in [0, PAGE] {
            let m = slot + HEADER;
            far[m + 16..m + 24].copy_from_slice(&0x000F_FFFF_FFFF_FFFFu64.to_le_bytes());
            let sum = fnv1a(&far[m..m + 56]);
            far[m + 56..m + 64].copy_from_slice(&sum.to_le_bytes());
        }
        assert!(
            read(&far, "far.db")
                .unwrap_err()
                .to_string()
                .contains("out of range")
        );
        let mut metas = bytes;
        metas[HEADER] ^= 1;
        metas[PAGE + HEADER] ^= 1;
        assert!(
            read(&metas, "m.db")
                .unwrap_err()
                .to_string()
                .contains("meta")
        );
    }
}
