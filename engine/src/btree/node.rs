//! Tree nodes as a transaction sees them, lookups and range cursors.
//!
//! A read transaction sees only clean pages of its version. A write transaction also sees the
//! nodes it has copied and changed ("dirty" nodes, decoded in memory until commit). [`NodeRef`]
//! gives both one interface, so lookups and cursors are written once.

use super::Version;
use super::page::{self, Kind, PageView, StoredValue, corrupt};
use crate::error::Result;

/// Bound on tree depth: a corrupt tree with a cycle ends as an error, not a hang. A 4 KiB-page
/// tree of depth 32 would hold more than 2^64 entries.
pub const MAX_DEPTH: usize = 32;

/// Where a child (or root) is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChildRef {
    /// No tree (empty bucket).
    Empty,
    /// A clean page of the base version.
    Page(u64),
    /// A dirty node in the write transaction's arena.
    Dirty(usize),
}

/// A leaf value held by a dirty node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// The bytes (spilled to an overflow run at commit if too large to store inline).
    Bytes(Vec<u8>),
    /// An existing overflow run, kept as is.
    Overflow(u64, u32),
}

/// A dirty node.
#[derive(Debug, Clone)]
pub enum Node {
    /// Leaf: sorted keys and their values.
    Leaf {
        keys: Vec<Vec<u8>>,
        values: Vec<Value>,
    },
    /// Branch: `children[i]` holds keys in `[keys[i], keys[i + 1])`.
    Branch {
        keys: Vec<Vec<u8>>,
        children: Vec<ChildRef>,
    },
}

/// Which nodes a lookup may meet.
#[derive(Debug, Clone, Copy)]
pub enum Source<'a> {
    /// Clean pages only (read transactions).
    Pages,
    /// Clean pages and the dirty nodes of a write transaction.
    Dirty(&'a [Node]),
}

/// One node, clean or dirty.
#[derive(Debug, Clone, Copy)]
pub enum NodeRef<'a> {
    /// A page of the version.
    Page(PageView<'a>),
    /// A dirty node.
    Dirty(&'a Node),
}

impl<'a> NodeRef<'a> {
    /// Resolves `r` in `version` / `source`.
    pub(crate) fn get(
        version: &'a Version,
        source: Source<'a>,
        r: ChildRef,
    ) -> Result<Option<NodeRef<'a>>> {
        Ok(match r {
            ChildRef::Empty => None,
            ChildRef::Page(id) => {
                let view = version.view(id)?;
                if view.kind() == Kind::Catalog {
                    return Err(corrupt(id, "catalog page inside a tree"));
                }
                Some(NodeRef::Page(view))
            }
            ChildRef::Dirty(i) => match source {
                Source::Dirty(nodes) => Some(NodeRef::Dirty(&nodes[i])),
                Source::Pages => unreachable!("read transactions have no dirty nodes"),
            },
        })
    }

    pub fn is_leaf(&self) -> bool {
        match self {
            NodeRef::Page(p) => p.kind() != Kind::Branch,
            NodeRef::Dirty(n) => matches!(n, Node::Leaf { .. }),
        }
    }

    pub fn len(&self) -> usize {
        match self {
            NodeRef::Page(p) => p.len(),
            NodeRef::Dirty(Node::Leaf { keys, .. }) | NodeRef::Dirty(Node::Branch { keys, .. }) => {
                keys.len()
            }
        }
    }

    pub fn key(&self, i: usize) -> Result<&'a [u8]> {
        match self {
            NodeRef::Page(p) => p.key(i),
            NodeRef::Dirty(Node::Leaf { keys, .. }) | NodeRef::Dirty(Node::Branch { keys, .. }) => {
                Ok(&keys[i])
            }
        }
    }

    /// Key and value `i` of a leaf, the value resolved to its bytes.
    #[inline]
    pub(crate) fn entry(&self, version: &'a Version, i: usize) -> Result<(&'a [u8], &'a [u8])> {
        match self {
            NodeRef::Page(p) => {
                let (k, v) = p.entry(i)?;
                Ok((k, version.resolve(v)?))
            }
            NodeRef::Dirty(_) => Ok((self.key(i)?, self.value(version, i)?)),
        }
    }

    /// Value `i` of a leaf, resolved to its bytes.
    pub(crate) fn value(&self, version: &'a Version, i: usize) -> Result<&'a [u8]> {
        match self {
            NodeRef::Page(p) => version.resolve(p.value(i)?),
            NodeRef::Dirty(Node::Leaf { values, .. }) => match &values[i] {
                Value::Bytes(b) => Ok(b),
                Value::Overflow(first, len) => version.resolve(StoredValue::Overflow(*first, *len)),
            },
            NodeRef::Dirty(Node::Branch { .. }) => unreachable!("value of a branch"),
        }
    }

    pub fn child(&self, i: usize) -> ChildRef {
        match self {
            NodeRef::Page(p) => ChildRef::Page(p.child(i)),
            NodeRef::Dirty(Node::Branch { children, .. }) => children[i],
            NodeRef::Dirty(Node::Leaf { .. }) => unreachable!("child of a leaf"),
        }
    }

    /// `Ok(i)`: entry `i` has `key`; `Err(i)`: where it would go.
    pub fn search(&self, key: &[u8]) -> Result<std::result::Result<usize, usize>> {
        match self {
            NodeRef::Page(p) => p.search(key),
            NodeRef::Dirty(Node::Leaf { keys, .. }) | NodeRef::Dirty(Node::Branch { keys, .. }) => {
                Ok(keys.binary_search_by(|k| k.as_slice().cmp(key)))
            }
        }
    }

    /// Branch: the child covering `key`.
    pub fn child_index(&self, key: &[u8]) -> Result<usize> {
        Ok(match self.search(key)? {
            Ok(i) => i,
            Err(i) => i.saturating_sub(1),
        })
    }
}

fn page_id(r: ChildRef) -> u64 {
    match r {
        ChildRef::Page(id) => id,
        _ => 0,
    }
}

/// The value of `key` in the tree rooted at `root`.
pub(crate) fn get<'a>(
    version: &'a Version,
    source: Source<'a>,
    root: ChildRef,
    key: &[u8],
) -> Result<Option<&'a [u8]>> {
    let mut r = root;
    for _ in 0..MAX_DEPTH {
        let Some(node) = NodeRef::get(version, source, r)? else {
            return Ok(None);
        };
        if node.is_leaf() {
            return match node.search(key)? {
                Ok(i) => node.value(version, i).map(Some),
                Err(_) => Ok(None),
            };
        }
        r = node.child(node.child_index(key)?);
    }
    Err(corrupt(
        page_id(r),
        format!("tree deeper than {MAX_DEPTH} levels"),
    ))
}

/// `get` for read transactions: clean pages only, so no dirty-node dispatch on the hot path.
pub(crate) fn get_clean<'a>(
    version: &'a Version,
    root: u64,
    key: &[u8],
) -> Result<Option<&'a [u8]>> {
    let mut id = root;
    for _ in 0..MAX_DEPTH {
        let view = version.view(id)?;
        match view.kind() {
            Kind::Leaf => {
                return match view.search(key)? {
                    Ok(i) => version.resolve(view.entry(i)?.1).map(Some),
                    Err(_) => Ok(None),
                };
            }
            Kind::Branch => id = view.child(view.child_index(key)?),
            _ => return Err(corrupt(id, "catalog page inside a tree")),
        }
    }
    Err(corrupt(id, format!("tree deeper than {MAX_DEPTH} levels")))
}

/// An in-order iterator over `[start, end)` of one tree.
pub struct RangeIter<'a> {
    version: &'a Version,
    source: Source<'a>,
    /// Branches from the root to the current leaf, with the child taken in each.
    path: Vec<(NodeRef<'a>, usize)>,
    /// The current leaf (kept out of `path` so the per-entry step touches only these fields),
    /// the next entry in it, and its length.
    leaf: Option<NodeRef<'a>>,
    idx: usize,
    len: usize,
    end: Option<&'a [u8]>,
    done: bool,
}

fn too_deep(r: ChildRef) -> crate::error::Error {
    corrupt(page_id(r), format!("tree deeper than {MAX_DEPTH} levels"))
}

impl<'a> RangeIter<'a> {
    /// Positions a cursor at the first key `>= start`.
    pub(crate) fn new(
        version: &'a Version,
        source: Source<'a>,
        root: ChildRef,
        start: &[u8],
        end: Option<&'a [u8]>,
    ) -> Result<RangeIter<'a>> {
        let mut it = RangeIter {
            version,
            source,
            path: Vec::new(),
            leaf: None,
            idx: 0,
            len: 0,
            end,
            done: false,
        };
        let mut r = root;
        loop {
            if it.path.len() >= MAX_DEPTH {
                return Err(too_deep(r));
            }
            let Some(node) = NodeRef::get(version, source, r)? else {
                it.done = true;
                return Ok(it);
            };
            if node.is_leaf() {
                it.idx = match node.search(start)? {
                    Ok(i) | Err(i) => i,
                };
                it.len = node.len();
                it.leaf = Some(node);
                return Ok(it);
            }
            let i = node.child_index(start)?;
            it.path.push((node, i));
            r = node.child(i);
        }
    }

    /// Moves to the next leaf. `false` at the end of the tree.
    fn next_leaf(&mut self) -> Result<bool> {
        let mut r = loop {
            let Some((node, i)) = self.path.last_mut() else {
                return Ok(false);
            };
            *i += 1;
            if *i < node.len() {
                break node.child(*i);
            }
            self.path.pop();
        };
        // Descend to the leftmost leaf below.
        loop {
            if self.path.len() >= MAX_DEPTH {
                return Err(too_deep(r));
            }
            let node = NodeRef::get(self.version, self.source, r)?
                .ok_or_else(|| corrupt(0, "branch with an empty child"))?;
            if node.is_leaf() {
                self.leaf = Some(node);
                self.idx = 0;
                self.len = node.len();
                return Ok(true);
            }
            self.path.push((node, 0));
            r = node.child(0);
        }
    }

    #[inline]
    fn next_entry(&mut self) -> Result<Option<(&'a [u8], &'a [u8])>> {
        if self.done {
            return Ok(None);
        }
        loop {
            if self.idx < self.len {
                let leaf = self.leaf.as_ref().expect("a leaf while entries remain");
                let (key, value) = leaf.entry(self.version, self.idx)?;
                if self.end.is_some_and(|end| key >= end) {
                    self.done = true;
                    return Ok(None);
                }
                self.idx += 1;
                return Ok(Some((key, value)));
            }
            if !self.next_leaf()? {
                self.done = true;
                return Ok(None);
            }
        }
    }
}

impl<'a> Iterator for RangeIter<'a> {
    type Item = Result<(&'a [u8], &'a [u8])>;

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        match self.next_entry() {
            Ok(Some(kv)) => Some(Ok(kv)),
            Ok(None) => None,
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

/// Decodes a clean tree page into a dirty node (copy-on-write), verifying its checksum.
pub fn decode(id: u64, bytes: &[u8]) -> Result<Node> {
    if !page::checksum_ok(bytes) {
        return Err(corrupt(id, "checksum mismatch"));
    }
    let view = PageView::new(id, bytes)?;
    let n = view.len();
    let mut keys = Vec::with_capacity(n);
    for i in 0..n {
        keys.push(view.key(i)?.to_vec());
    }
    match view.kind() {
        Kind::Branch => {
            let children = (0..n).map(|i| ChildRef::Page(view.child(i))).collect();
            Ok(Node::Branch { keys, children })
        }
        Kind::Leaf => {
            let mut values = Vec::with_capacity(n);
            for i in 0..n {
                values.push(match view.value(i)? {
                    StoredValue::Inline(b) => Value::Bytes(b.to_vec()),
                    StoredValue::Overflow(first, len) => Value::Overflow(first, len),
                });
            }
            Ok(Node::Leaf { keys, values })
        }
        other => Err(corrupt(
            id,
            format!("expected a tree page, found {other:?}"),
        )),
    }
}
