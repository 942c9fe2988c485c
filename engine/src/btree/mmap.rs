//! The read-only memory map of the database file: the only `unsafe` of the backend.
//!
//! # Why this is sound (the invariant every other module upholds)
//! `memmap2` cannot promise that mapped bytes do not change behind Rust's back, so mapping is
//! `unsafe`. Keel follows LMDB and bbolt and makes the promise itself:
//! 1. **No other writer.** The database file is locked exclusively (`flock`) for as long as a
//!    [`super::Backend`] has it open, so no other cooperating process writes or truncates it.
//! 2. **Pages in use are immutable.** A page is handed out as a `&[u8]` only to a transaction whose
//!    version contains it. The writer only writes pages that no live version references: pages it
//!    allocated beyond the high-water mark, or free pages whose last reader has finished (the
//!    reader table in `super`), so bytes behind a live slice never change.
//! 3. **Never past the end.** The file is never shrunk while mapped; a map covers the file length at
//!    the time it was made, and every page access is bounds-checked against both the version's page
//!    count and the map length, so a corrupt page number is an error, not a SIGBUS.
//! 4. **Page-sized borrows.** Slices are formed for the requested pages only, never for the whole
//!    map, so no reference ever covers bytes the writer may be changing.

use std::fs::File;

/// A read-only shared mapping of the first `len` bytes of the database file.
#[derive(Debug)]
pub(crate) struct Map {
    map: Option<memmap2::Mmap>,
    len: usize,
}

impl Map {
    /// Maps the first `len` bytes of `file` (an empty map for `len == 0`).
    pub(crate) fn new(file: &File, len: usize) -> std::io::Result<Map> {
        if len == 0 {
            return Ok(Map { map: None, len: 0 });
        }
        // SAFETY: see the module documentation: the file is flock'ed by this process, never shrunk
        // while mapped, and the bytes of any page a borrow covers are not written while borrowed.
        let map = unsafe { memmap2::MmapOptions::new().len(len).map(file)? };
        Ok(Map {
            map: Some(map),
            len,
        })
    }

    /// The bytes `[offset, offset + len)` of the file, if the mapping covers them.
    pub(crate) fn bytes(&self, offset: usize, len: usize) -> Option<&[u8]> {
        let end = offset.checked_add(len)?;
        if end > self.len {
            return None;
        }
        let map = self.map.as_ref()?;
        // SAFETY: `offset + len <= self.len`, the mapped length, so the range is inside the live
        // mapping, which outlives `&self`. The pages it covers are immutable while a version that
        // contains them is alive (module invariant 2), and callers hold that version.
        Some(unsafe { std::slice::from_raw_parts(map.as_ptr().add(offset), len) })
    }
}
