//! Defragmentation: rewrite the live data compactly into a new file and switch to it (etcd's
//! `defrag`).
//!
//! The copy is made from a pinned version while the writer lock is held: writes wait (as in etcd),
//! readers do not. Keys are inserted in order, and splits at the end of a node leave full pages
//! behind, so the new file is dense; it is cut to exactly its pages at the end. The copy is synced, renamed over the original, and becomes
//! the backend's file; read transactions begun before keep reading the old file through their
//! own map (its inode lives until they finish), so they never see the switch.

use std::sync::Arc;

use super::mmap::Map;
use super::node::{ChildRef, RangeIter, Source};
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
}

/// Entries per copy transaction: bounds the memory of the copy.
const CHUNK: usize = 20_000;

impl Backend {
    /// Rewrites the database into a compact new file and switches to it.
    pub fn defrag(&self) -> Result<DefragReport> {
        let in_use_before = self.size_in_use();
        let mut w = lock(&self.shared.writer);
        let current = lock(&self.shared.readers).current.clone();
        let path = w.path.clone();
        let mut tmp = path.clone().into_os_string();
        tmp.push(".defrag");
        let tmp = std::path::PathBuf::from(tmp);
        match std::fs::remove_file(&tmp) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io("removing", &tmp, e)),
        }
        let size_before = w.file_len;
        let options = BackendOptions {
            page_size: current.page_size,
            ..w.options.clone()
        };
        // Versions of the copy continue the txid sequence, so reader bookkeeping stays ordered.
        let copy = open_file(&tmp, options, current.txid + 1)?;
        for (name, b) in &current.buckets {
            let mut txn = copy.begin_write()?;
            txn.create_bucket(name)?;
            let root = if b.root == 0 {
                ChildRef::Empty
            } else {
                ChildRef::Page(b.root)
            };
            let mut n = 0;
            for kv in RangeIter::new(&current, Source::Pages, root, b"", None)? {
                let (k, v) = kv?;
                txn.put(name, k, v)?;
                n += 1;
                if n % CHUNK == 0 {
                    // Synced, so that the pages the next chunk copies are reused, not leaked.
                    txn.commit(true)?;
                    txn = copy.begin_write()?;
                }
            }
            txn.commit(true)?;
        }
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
            .map_err(|e| Error::io("truncating", &tmp, e))?;
        new_writer
            .file
            .sync_all()
            .map_err(|e| Error::io("fsync", &tmp, e))?;
        new_writer.file_len = exact;
        let map = Map::new(&new_writer.file, exact as usize)
            .map_err(|e| Error::io("mapping", &tmp, e))?;
        new_writer.map = Arc::new(map);
        let copied = Arc::try_unwrap(copied)
            .map_err(|_| Error::InvalidArgument("defrag copy version still in use".into()))?;
        let new_current = Arc::new(Version {
            map: new_writer.map.clone(),
            ..copied
        });
        std::fs::rename(&tmp, &path).map_err(|e| Error::io("renaming", &tmp, e))?;
        // From the rename on, the path names the copy: switch to it before anything else can
        // fail, so that no later write goes to the old, unlinked file.
        new_writer.path = path.clone();
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
        })
    }
}
