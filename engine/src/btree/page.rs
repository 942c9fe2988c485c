//! Page formats of the backend file, with bounds-checked accessors.
//!
//! # File layout
//! The file is an array of pages of `page_size` bytes (4 KiB by default, stored in the meta).
//! Pages 0 and 1 are the two meta pages; every other page is a branch, leaf, overflow, free-list or
//! catalog page, or free.
//!
//! # Meta page (pages 0 and 1), little-endian
//! ```text
//! offset size field
//!      0    8 magic          "KEELBT\0\0"
//!      8    4 version        1
//!     12    4 page_size
//!     16    8 txid           version number of the tree this meta describes
//!     24    8 catalog        page of the bucket catalog (0: no buckets)
//!     32    8 freelist       first page of the free list (0: none)
//!     40    8 page_count     high-water mark: pages [0, page_count) are in use or free
//!     48    4 crc            CRC-32 (IEEE) of bytes [0, 48)
//! ```
//! The valid meta with the highest txid wins on open. A meta is only written by `sync`, into the
//! slot that does *not* hold the newest durable meta, after everything it references is durable.
//!
//! # Other pages: common 16-byte header
//! ```text
//!      0    4 crc            CRC-32 (IEEE) of bytes [4, run_len) of the page (run)
//!      4    1 kind           1 branch, 2 leaf, 3 overflow, 4 free list, 5 catalog
//!      5    1 reserved       0
//!      6    2 count          entries (branch, leaf, catalog)
//!      8    4 extra_pages    pages following this one in the same run (overflow, free list)
//!     12    4 reserved       0
//! ```
//! - **Leaf / catalog**: `count` slots of 8 bytes after the header: `key_off u16, key_len u16,
//!   value u32`. If the high bit of `value` is clear, the value is inline, `value` bytes long,
//!   right after the key. If set, the value lives in an overflow run: 12 bytes after the key hold
//!   `first_page u64, length u32`. Keys are sorted, unique.
//! - **Branch**: `count` slots of 12 bytes: `key_off u16, key_len u16, child u64`. Child `i` holds
//!   keys in `[key_i, key_{i+1})`; `key_0` is not used for routing (child 0 takes everything below
//!   `key_1`).
//! - **Overflow**: the value's bytes from offset 16, over `1 + extra_pages` consecutive pages.
//! - **Free list**: `count u64` at 16, then `count` page numbers (u64), over a run of pages.
//!
//! Checksums are written on every page and verified by `check()` and when the writer copies a page
//! (copy-on-write); readers validate structure (bounds, sizes, page numbers) on every access.

use crate::error::{Error, Result};

/// Bytes of the common page header.
pub const HEADER: usize = 16;
/// Size of a leaf slot.
pub const LEAF_SLOT: usize = 8;
/// Size of a branch slot.
pub const BRANCH_SLOT: usize = 12;
/// Bytes an overflow reference takes in a leaf.
pub const OVERFLOW_REF: usize = 12;
/// High bit of a leaf slot's value field: the value is in an overflow run.
const OVERFLOW_FLAG: u32 = 1 << 31;

/// Page kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Interior node.
    Branch = 1,
    /// Leaf node.
    Leaf = 2,
    /// Large value.
    Overflow = 3,
    /// Free page list.
    Freelist = 4,
    /// Bucket catalog (leaf format).
    Catalog = 5,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        match v {
            1 => Some(Kind::Branch),
            2 => Some(Kind::Leaf),
            3 => Some(Kind::Overflow),
            4 => Some(Kind::Freelist),
            5 => Some(Kind::Catalog),
            _ => None,
        }
    }
}

pub(crate) fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes(b[off..off + 2].try_into().expect("2 bytes"))
}
pub(crate) fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}
pub(crate) fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

/// Magic of a meta page.
pub const META_MAGIC: &[u8; 8] = b"KEELBT\0\0";
/// Format version.
pub const VERSION: u32 = 1;
const META_CRC_AT: usize = 48;

/// The content of a meta page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    /// Page size of the file.
    pub page_size: u32,
    /// Version number.
    pub txid: u64,
    /// Catalog page (0: none).
    pub catalog: u64,
    /// First page of the free list (0: none).
    pub freelist: u64,
    /// High-water mark in pages.
    pub page_count: u64,
}

impl Meta {
    /// Encodes into a page-sized buffer.
    pub fn encode(&self, page: &mut [u8]) {
        page.fill(0);
        page[0..8].copy_from_slice(META_MAGIC);
        page[8..12].copy_from_slice(&VERSION.to_le_bytes());
        page[12..16].copy_from_slice(&self.page_size.to_le_bytes());
        page[16..24].copy_from_slice(&self.txid.to_le_bytes());
        page[24..32].copy_from_slice(&self.catalog.to_le_bytes());
        page[32..40].copy_from_slice(&self.freelist.to_le_bytes());
        page[40..48].copy_from_slice(&self.page_count.to_le_bytes());
        let crc = crc32fast::hash(&page[..META_CRC_AT]);
        page[META_CRC_AT..META_CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
    }

    /// Decodes and validates a meta page; the error says what is wrong.
    pub fn decode(page: &[u8]) -> Result<Meta, String> {
        if page.len() < META_CRC_AT + 4 {
            return Err("meta page is truncated".into());
        }
        if &page[0..8] != META_MAGIC {
            return Err("bad magic: not a Keel backend file".into());
        }
        let crc = crc32fast::hash(&page[..META_CRC_AT]);
        if crc != u32_at(page, META_CRC_AT) {
            return Err("meta checksum mismatch".into());
        }
        let version = u32_at(page, 8);
        if version != VERSION {
            return Err(format!("unsupported format version {version}"));
        }
        let meta = Meta {
            page_size: u32_at(page, 12),
            txid: u64_at(page, 16),
            catalog: u64_at(page, 24),
            freelist: u64_at(page, 32),
            page_count: u64_at(page, 40),
        };
        if !valid_page_size(meta.page_size as usize) {
            return Err(format!("invalid page size {}", meta.page_size));
        }
        if meta.page_count < 2
            || meta.catalog >= meta.page_count
            || meta.freelist >= meta.page_count
            || meta.catalog == 1
            || meta.freelist == 1
        {
            return Err("meta references pages outside the file".into());
        }
        Ok(meta)
    }
}

/// Page sizes the format supports (slot offsets are 16-bit).
pub fn valid_page_size(size: usize) -> bool {
    size.is_power_of_two() && (1024..=32768).contains(&size)
}

/// Writes the common header and the checksum of a page run `buf` (whole run).
pub fn seal(buf: &mut [u8], kind: Kind, count: u16, extra_pages: u32) {
    buf[4] = kind as u8;
    buf[5] = 0;
    buf[6..8].copy_from_slice(&count.to_le_bytes());
    buf[8..12].copy_from_slice(&extra_pages.to_le_bytes());
    buf[12..16].fill(0);
    let crc = crc32fast::hash(&buf[4..]);
    buf[0..4].copy_from_slice(&crc.to_le_bytes());
}

/// Verifies the checksum of a whole page run.
pub fn checksum_ok(run: &[u8]) -> bool {
    run.len() >= HEADER && crc32fast::hash(&run[4..]) == u32_at(run, 0)
}

/// A leaf value as stored: inline bytes, or a reference to an overflow run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoredValue<'a> {
    /// The value itself.
    Inline(&'a [u8]),
    /// `(first_page, length)` of an overflow run.
    Overflow(u64, u32),
}

/// A validated view of one branch, leaf or catalog page.
#[derive(Debug, Clone, Copy)]
pub struct PageView<'a> {
    /// The page's number (for error messages).
    pub id: u64,
    bytes: &'a [u8],
    /// The slot table (`count` slots of `slot` bytes), validated to lie inside the page.
    slots: &'a [u8],
    slot: usize,
    kind: Kind,
    count: usize,
}

/// Builds the corruption error for page `id`.
pub fn corrupt(id: u64, what: impl std::fmt::Display) -> Error {
    Error::CorruptPage {
        page: id,
        reason: what.to_string(),
    }
}

/// Bytewise order, as `<[u8]>::cmp`, but deciding most comparisons with one 8-byte word compare
/// instead of a `memcmp` call: the hot step of every lookup.
#[inline]
#[allow(
    clippy::big_endian_bytes,
    reason = "big-endian words order like their bytes"
)]
pub fn compare_keys(a: &[u8], b: &[u8]) -> std::cmp::Ordering {
    if let (Some(x), Some(y)) = (a.get(..8), b.get(..8)) {
        let x = u64::from_be_bytes(x.try_into().expect("8 bytes"));
        let y = u64::from_be_bytes(y.try_into().expect("8 bytes"));
        if x != y {
            return x.cmp(&y);
        }
    }
    a.cmp(b)
}

#[cold]
#[inline(never)]
fn outside(id: u64, what: &str, i: usize) -> Error {
    corrupt(id, format!("{what} {i} lies outside the page"))
}

impl<'a> PageView<'a> {
    /// Validates the header and the slot table of `bytes` (one page). Entries are checked lazily,
    /// each time one is read.
    pub fn new(id: u64, bytes: &'a [u8]) -> Result<PageView<'a>> {
        let kind = Kind::from_u8(bytes[4]).ok_or_else(|| corrupt(id, "unknown page kind"))?;
        let count = u16_at(bytes, 6) as usize;
        let slot = match kind {
            Kind::Branch => BRANCH_SLOT,
            Kind::Leaf | Kind::Catalog => LEAF_SLOT,
            _ => return Err(corrupt(id, format!("expected a tree page, found {kind:?}"))),
        };
        let slots = bytes
            .get(HEADER..HEADER + count * slot)
            .ok_or_else(|| corrupt(id, format!("{count} slots do not fit in the page")))?;
        if kind == Kind::Branch && count == 0 {
            return Err(corrupt(id, "branch page without children"));
        }
        Ok(PageView {
            id,
            bytes,
            slots,
            slot,
            kind,
            count,
        })
    }

    /// The page's kind.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Number of entries (leaf) or children (branch).
    pub fn len(&self) -> usize {
        self.count
    }

    /// True if the page has no entries.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Slot `i`'s bytes (`i < count`, checked by the slice).
    #[inline]
    fn slot(&self, i: usize) -> &'a [u8] {
        &self.slots[i * self.slot..(i + 1) * self.slot]
    }

    #[inline]
    fn key_of(&self, slot: &[u8]) -> Option<&'a [u8]> {
        let off = u16_at(slot, 0) as usize;
        let len = u16_at(slot, 2) as usize;
        self.bytes.get(off..off + len)
    }

    /// Key `i`.
    #[inline]
    pub fn key(&self, i: usize) -> Result<&'a [u8]> {
        self.key_of(self.slot(i))
            .ok_or_else(|| outside(self.id, "key", i))
    }

    /// Key and stored value `i` of a leaf, reading the slot once.
    #[inline]
    pub fn entry(&self, i: usize) -> Result<(&'a [u8], StoredValue<'a>)> {
        let slot = self.slot(i);
        let key = self
            .key_of(slot)
            .ok_or_else(|| outside(self.id, "key", i))?;
        let off = u16_at(slot, 0) as usize + key.len();
        let v = u32_at(slot, 4);
        let value = if v & OVERFLOW_FLAG == 0 {
            StoredValue::Inline(
                self.bytes
                    .get(off..off + v as usize)
                    .ok_or_else(|| outside(self.id, "value", i))?,
            )
        } else {
            let r = self
                .bytes
                .get(off..off + OVERFLOW_REF)
                .ok_or_else(|| outside(self.id, "value", i))?;
            StoredValue::Overflow(u64_at(r, 0), u32_at(r, 8))
        };
        Ok((key, value))
    }

    /// Value `i` of a leaf.
    pub fn value(&self, i: usize) -> Result<StoredValue<'a>> {
        Ok(self.entry(i)?.1)
    }

    /// Child `i` of a branch.
    pub fn child(&self, i: usize) -> u64 {
        u64_at(self.slot(i), 4)
    }

    /// For a branch: the child that may hold `key`. For a leaf: `Ok(i)` if entry `i` has `key`,
    /// `Err(i)` where it would be inserted.
    #[inline]
    pub fn search(&self, key: &[u8]) -> Result<std::result::Result<usize, usize>> {
        let (mut lo, mut hi) = (0, self.count);
        while lo < hi {
            let mid = (lo + hi) / 2;
            let k = self
                .key_of(self.slot(mid))
                .ok_or_else(|| outside(self.id, "key", mid))?;
            match compare_keys(k, key) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => return Ok(Ok(mid)),
            }
        }
        Ok(Err(lo))
    }

    /// For a branch: index of the child covering `key`.
    pub fn child_index(&self, key: &[u8]) -> Result<usize> {
        Ok(match self.search(key)? {
            Ok(i) => i,
            Err(i) => i.saturating_sub(1),
        })
    }
}

/// Serialized size of a leaf entry.
pub fn leaf_entry_size(key_len: usize, stored_value_len: usize) -> usize {
    LEAF_SLOT + key_len + stored_value_len
}

/// Serialized size of a branch entry.
pub fn branch_entry_size(key_len: usize) -> usize {
    BRANCH_SLOT + key_len
}

/// Writes a leaf (or catalog) page from entries already in order. `value_bytes(i)` returns what to
/// store for entry `i`. The caller guarantees the entries fit.
pub fn write_leaf<'v>(page: &mut [u8], kind: Kind, keys: &[&[u8]], values: &[StoredValue<'v>]) {
    let n = keys.len();
    page.fill(0);
    let mut data = HEADER + n * LEAF_SLOT;
    for i in 0..n {
        let s = HEADER + i * LEAF_SLOT;
        let key = keys[i];
        page[s..s + 2].copy_from_slice(&(data as u16).to_le_bytes());
        page[s + 2..s + 4].copy_from_slice(&(key.len() as u16).to_le_bytes());
        page[data..data + key.len()].copy_from_slice(key);
        data += key.len();
        match values[i] {
            StoredValue::Inline(v) => {
                page[s + 4..s + 8].copy_from_slice(&(v.len() as u32).to_le_bytes());
                page[data..data + v.len()].copy_from_slice(v);
                data += v.len();
            }
            StoredValue::Overflow(first, len) => {
                page[s + 4..s + 8].copy_from_slice(&OVERFLOW_FLAG.to_le_bytes());
                page[data..data + 8].copy_from_slice(&first.to_le_bytes());
                page[data + 8..data + 12].copy_from_slice(&len.to_le_bytes());
                data += OVERFLOW_REF;
            }
        }
    }
    seal(page, kind, n as u16, 0);
}

/// Writes a branch page.
pub fn write_branch(page: &mut [u8], keys: &[&[u8]], children: &[u64]) {
    let n = keys.len();
    page.fill(0);
    let mut data = HEADER + n * BRANCH_SLOT;
    for i in 0..n {
        let s = HEADER + i * BRANCH_SLOT;
        let key = keys[i];
        page[s..s + 2].copy_from_slice(&(data as u16).to_le_bytes());
        page[s + 2..s + 4].copy_from_slice(&(key.len() as u16).to_le_bytes());
        page[s + 4..s + 12].copy_from_slice(&children[i].to_le_bytes());
        page[data..data + key.len()].copy_from_slice(key);
        data += key.len();
    }
    seal(page, Kind::Branch, n as u16, 0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_round_trip_and_damage() {
        let meta = Meta {
            page_size: 4096,
            txid: 9,
            catalog: 5,
            freelist: 7,
            page_count: 10,
        };
        let mut page = vec![0u8; 4096];
        meta.encode(&mut page);
        assert_eq!(Meta::decode(&page).unwrap(), meta);
        for i in 0..52 {
            let mut bad = page.clone();
            bad[i] ^= 1;
            assert!(Meta::decode(&bad).is_err(), "byte {i}");
        }
        let mut outside = meta;
        outside.catalog = 10;
        outside.encode(&mut page);
        assert!(Meta::decode(&page).is_err());
    }

    #[test]
    fn leaf_and_branch_round_trip() {
        let mut page = vec![0u8; 4096];
        let keys: Vec<&[u8]> = vec![b"a", b"bb", b"ccc"];
        let values = vec![
            StoredValue::Inline(b"1"),
            StoredValue::Overflow(42, 5000),
            StoredValue::Inline(b""),
        ];
        write_leaf(&mut page, Kind::Leaf, &keys, &values);
        assert!(checksum_ok(&page));
        let view = PageView::new(3, &page).unwrap();
        assert_eq!(view.len(), 3);
        for i in 0..3 {
            assert_eq!(view.key(i).unwrap(), keys[i]);
            assert_eq!(view.value(i).unwrap(), values[i]);
        }
        assert_eq!(view.search(b"bb").unwrap(), Ok(1));
        assert_eq!(view.search(b"b").unwrap(), Err(1));

        write_branch(&mut page, &keys, &[10, 11, 12]);
        let view = PageView::new(4, &page).unwrap();
        assert_eq!(view.child_index(b"0").unwrap(), 0);
        assert_eq!(view.child_index(b"bz").unwrap(), 1);
        assert_eq!(view.child_index(b"zz").unwrap(), 2);
        assert_eq!(view.child(2), 12);
    }

    #[test]
    fn compare_keys_is_bytewise_order() {
        let keys: Vec<&[u8]> = vec![
            b"",
            b"a",
            b"abcdefgh",
            b"abcdefgh\0",
            b"abcdefgi",
            b"abcdefghij",
            b"b",
            b"\xff\xff",
            b"abcdefg",
            b"abcdefgh\x01",
        ];
        for a in &keys {
            for b in &keys {
                assert_eq!(compare_keys(a, b), a.cmp(b), "{a:?} vs {b:?}");
            }
        }
    }

    #[test]
    fn damaged_slots_are_errors_not_panics() {
        let mut page = vec![0u8; 4096];
        write_leaf(&mut page, Kind::Leaf, &[b"k"], &[StoredValue::Inline(b"v")]);
        page[16..18].copy_from_slice(&4095u16.to_le_bytes());
        page[18..20].copy_from_slice(&100u16.to_le_bytes());
        let view = PageView::new(3, &page).unwrap();
        assert!(view.key(0).is_err());
        page[6..8].copy_from_slice(&1000u16.to_le_bytes());
        assert!(PageView::new(3, &page).is_err());
        page[4] = 77;
        assert!(PageView::new(3, &page).is_err());
    }
}
