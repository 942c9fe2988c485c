//! Raft snapshots: a lagging follower receives the leader's backend whole, at the leader's
//! applied index, and installs it in place of its own.
//!
//! # Wire format of a snapshot's data
//! A sequence of records, split into chunks of about [`CHUNK_BYTES`] anywhere (a record may span
//! chunks), all little-endian:
//!
//! | record | bytes |
//! |---|---|
//! | bucket | `1`, name length (u16), name |
//! | entry of the last bucket | `2`, key length (u32), key, value length (u32), value |
//! | end | `3` |
//!
//! The last chunk carries the CRC-32 (IEEE) of all the data. The sender reads a pinned backend
//! version (`ReadTxn`): writes go on meanwhile and the snapshot stays consistent. The receiver
//! writes a new backend file as the records arrive (bounded memory: one record, one transaction
//! of about [`COMMIT_BYTES`]), checks the end record, the CRC and that the file's applied index
//! is the snapshot's, and only then hands it to the storage core, which installs it atomically
//! (`node.rs`: the file is renamed `<index>.snap.db`, the WAL records the snapshot, then the file
//! replaces `db`; a crash in between finishes the install at the next start).

use std::path::{Path, PathBuf};

use bytes::{BufMut, Bytes, BytesMut};
use keel_engine::btree::{Backend, BackendOptions, ReadTxn};
use keel_engine::mvcc::kvstore::META_BUCKET;
use keel_engine::{Error, Result};

/// Data bytes per chunk sent.
pub const CHUNK_BYTES: usize = 1 << 20;
/// Bytes written to the receiving backend between commits.
pub const COMMIT_BYTES: usize = 16 << 20;
/// The largest key or value a snapshot record may declare (the backend's own limits are lower).
pub const MAX_FIELD: usize = 32 << 20;

const BUCKET: u8 = 1;
const ENTRY: u8 = 2;
const END: u8 = 3;

/// Reads `txn` whole, handing `sink` chunks of about [`CHUNK_BYTES`]; stops early if `sink`
/// returns false. Returns the CRC-32 of everything handed out.
pub fn encode(txn: &ReadTxn, mut sink: impl FnMut(Bytes) -> bool) -> Result<Option<u32>> {
    let mut crc = crc32fast::Hasher::new();
    let mut buf = BytesMut::with_capacity(CHUNK_BYTES + 1024);
    let mut flush = |buf: &mut BytesMut, crc: &mut crc32fast::Hasher| {
        let chunk = buf.split().freeze();
        crc.update(&chunk);
        sink(chunk)
    };
    for bucket in txn.buckets() {
        buf.put_u8(BUCKET);
        buf.put_u16_le(bucket.len() as u16);
        buf.put_slice(&bucket);
        for kv in txn.range(&bucket, b"", None)? {
            let (k, v) = kv?;
            buf.put_u8(ENTRY);
            buf.put_u32_le(k.len() as u32);
            buf.put_slice(k);
            buf.put_u32_le(v.len() as u32);
            buf.put_slice(v);
            if buf.len() >= CHUNK_BYTES && !flush(&mut buf, &mut crc) {
                return Ok(None);
            }
        }
    }
    buf.put_u8(END);
    if !flush(&mut buf, &mut crc) {
        return Ok(None);
    }
    Ok(Some(crc.finalize()))
}

fn bad(path: &Path, why: impl Into<String>) -> Error {
    Error::corruption(path, 0, format!("snapshot: {}", why.into()))
}

/// A write of the snapshot, waiting for its batch to be committed.
enum Op {
    Bucket(Vec<u8>),
    Put(Vec<u8>, Vec<u8>),
}

/// Builds a backend file from snapshot data as it arrives.
pub struct Receiver {
    path: PathBuf,
    backend: Backend,
    /// Bytes not yet parsed (at most one record plus a chunk).
    pending: BytesMut,
    /// Parsed writes not yet committed (about [`COMMIT_BYTES`] at most), and their size.
    ops: Vec<Op>,
    ops_bytes: usize,
    /// The bucket the last committed batch ended in.
    bucket: Option<Vec<u8>>,
    crc: crc32fast::Hasher,
    ended: bool,
}

impl std::fmt::Debug for Receiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver")
            .field("path", &self.path)
            .finish()
    }
}

#[allow(clippy::big_endian_bytes, reason = "etcd's meta values are big-endian")]
fn be_u64(v: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(v.try_into().ok()?))
}

impl Receiver {
    /// Starts a new backend file at `path` (removing what was there).
    pub fn create(path: PathBuf) -> Result<Receiver> {
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io("removing", &path, e)),
        }
        let backend = Backend::open(&path, BackendOptions::default())?;
        Ok(Receiver {
            path,
            backend,
            pending: BytesMut::new(),
            ops: Vec::new(),
            ops_bytes: 0,
            bucket: None,
            crc: crc32fast::Hasher::new(),
            ended: false,
        })
    }

    /// Writes the parsed ops in one backend transaction (committed, not synced).
    fn flush(&mut self) -> Result<()> {
        if self.ops.is_empty() {
            return Ok(());
        }
        let mut txn = self.backend.begin_write()?;
        for op in self.ops.drain(..) {
            match op {
                Op::Bucket(name) => {
                    txn.create_bucket(&name)?;
                    self.bucket = Some(name);
                }
                Op::Put(k, v) => {
                    let Some(bucket) = &self.bucket else {
                        return Err(bad(&self.path, "an entry before any bucket"));
                    };
                    txn.put(bucket, &k, &v)?;
                }
            }
        }
        txn.commit(false)?;
        self.ops_bytes = 0;
        Ok(())
    }

    /// Feeds the next piece of data.
    pub fn feed(&mut self, data: &[u8]) -> Result<()> {
        if self.ended && !data.is_empty() {
            return Err(bad(&self.path, "data after the end record"));
        }
        self.crc.update(data);
        self.pending.extend_from_slice(data);
        loop {
            let buf = &self.pending[..];
            let Some(&kind) = buf.first() else {
                return Ok(());
            };
            let need = |n: usize| buf.len() >= n;
            let consumed = match kind {
                BUCKET => {
                    if !need(3) {
                        return Ok(());
                    }
                    let len = u16::from_le_bytes([buf[1], buf[2]]) as usize;
                    if !need(3 + len) {
                        return Ok(());
                    }
                    self.ops.push(Op::Bucket(buf[3..3 + len].to_vec()));
                    // Each held record costs its bytes and its `Op` (64 counted): a stream of
                    // empty records is bounded like one of large values.
                    self.ops_bytes += len + 64;
                    3 + len
                }
                ENTRY => {
                    if !need(5) {
                        return Ok(());
                    }
                    let klen = u32::from_le_bytes(buf[1..5].try_into().expect("4")) as usize;
                    if klen > MAX_FIELD {
                        return Err(bad(&self.path, format!("a key of {klen} bytes")));
                    }
                    if !need(9 + klen) {
                        return Ok(());
                    }
                    let vlen =
                        u32::from_le_bytes(buf[5 + klen..9 + klen].try_into().expect("4")) as usize;
                    if vlen > MAX_FIELD {
                        return Err(bad(&self.path, format!("a value of {vlen} bytes")));
                    }
                    if !need(9 + klen + vlen) {
                        return Ok(());
                    }
                    self.ops.push(Op::Put(
                        buf[5..5 + klen].to_vec(),
                        buf[9 + klen..9 + klen + vlen].to_vec(),
                    ));
                    self.ops_bytes += klen + vlen + 64;
                    9 + klen + vlen
                }
                END => {
                    if buf.len() > 1 {
                        return Err(bad(&self.path, "data after the end record"));
                    }
                    self.ended = true;
                    1
                }
                other => return Err(bad(&self.path, format!("unknown record type {other}"))),
            };
            let _ = self.pending.split_to(consumed);
            if self.ops_bytes >= COMMIT_BYTES {
                self.flush()?;
            }
        }
    }

    /// Checks the end and the CRC, commits and syncs the file; returns its path and the applied
    /// raft index it holds.
    pub fn finish(mut self, crc32: u32) -> Result<(PathBuf, u64)> {
        if !self.ended || !self.pending.is_empty() {
            return Err(bad(&self.path, "truncated: no end record"));
        }
        let got = std::mem::replace(&mut self.crc, crc32fast::Hasher::new()).finalize();
        if got != crc32 {
            return Err(bad(
                &self.path,
                format!("checksum mismatch: the data has {got:08x}, the sender said {crc32:08x}"),
            ));
        }
        self.flush()?;
        self.backend.sync()?;
        let r = self.backend.begin_read();
        let index = r
            .get(META_BUCKET, b"consistent_index")?
            .and_then(be_u64)
            .ok_or_else(|| bad(&self.path, "no consistent index in the meta bucket"))?;
        drop(r);
        Ok((self.path.clone(), index))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_engine::mvcc::Store;

    #[test]
    fn a_backend_round_trips_and_damage_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("db"), Default::default()).unwrap();
        {
            let mut w = store.write().unwrap();
            for i in 0..5000 {
                w.put(format!("k{i:05}").as_bytes(), &vec![b'v'; i % 700], 0)
                    .unwrap();
                if i % 1000 == 0 {
                    w.finish_revision();
                }
            }
            w.end(Some((42, 3))).unwrap();
        }
        let txn = store.backend().begin_read();
        let mut chunks = Vec::new();
        let crc = encode(&txn, |c| {
            chunks.push(c);
            true
        })
        .unwrap()
        .unwrap();
        assert!(chunks.len() > 1, "several chunks");
        let mut r = Receiver::create(dir.path().join("copy")).unwrap();
        // Fed in odd-sized pieces: records span pieces.
        let all: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
        for piece in all.chunks(777) {
            r.feed(piece).unwrap();
        }
        let (path, index) = r.finish(crc).unwrap();
        assert_eq!(index, 42);
        let copy = Store::open(&path, Default::default()).unwrap();
        assert_eq!(copy.hash().unwrap(), store.hash().unwrap());
        assert_eq!(copy.current_revision(), store.current_revision());
        drop(copy);
        // A flipped byte: the CRC catches it (or the parse does).
        let mut damaged = all.clone();
        damaged[all.len() / 2] ^= 0x40;
        let mut r = Receiver::create(dir.path().join("bad")).unwrap();
        let result = r.feed(&damaged).and_then(|()| r.finish(crc).map(drop));
        assert!(result.is_err());
        // Truncated.
        let mut r = Receiver::create(dir.path().join("short")).unwrap();
        r.feed(&all[..all.len() - 1]).unwrap();
        assert!(r.finish(crc).is_err());
        // A huge declared value is refused before it is buffered.
        let mut r = Receiver::create(dir.path().join("huge")).unwrap();
        let mut evil = vec![BUCKET, 3, 0, b'k', b'e', b'y', ENTRY, 1, 0, 0, 0, b'k'];
        evil.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(r.feed(&evil).is_err());
    }
}
