//! Segment files: naming, the header block, and preparing pre-zeroed or recycled files.
//!
//! # Files in a WAL directory
//! - `{seq:016x}-{first_index:016x}.wal`: a live segment. `seq` increases by one per segment;
//!   `first_index` is the raft index the log expected next when the segment was cut (informational,
//!   as in etcd: an overwrite can later rewrite lower indices inside it).
//! - `{n:016x}.spare`: a segment-sized file ready to become the next segment: either freshly
//!   pre-allocated and zeroed, or a released segment kept for recycling. Its content is zeros or
//!   stale records with another salt, so it is never read as log.
//! - `*.tmp`: a spare being prepared when the process stopped; removed on open.
//!
//! # Header block
//! The first [`DATA_START`] bytes of a segment hold its header; records start at `DATA_START`.
//! Little-endian:
//! ```text
//! offset size field
//!      0    8 magic        "KEELWAL\0"
//!      8    4 version      1
//!     12    4 crc          CRC-32 (IEEE) of bytes [0, 12) and [16, 40)
//!     16    8 seq          segment sequence number (must match the file name)
//!     24    8 first_index  (must match the file name)
//!     32    8 size         segment size in bytes when it was cut
//! ```
//! The header is written and fdatasync'd into the spare *before* the spare is renamed to its
//! segment name, so a live segment always has a durable header: a bad header is corruption.

use std::path::{Path, PathBuf};

use glommio::io::{DmaBuffer, DmaFile, OpenOptions};

use crate::error::{Error, Result};

/// Magic bytes at the start of every segment.
pub const MAGIC: &[u8; 8] = b"KEELWAL\0";
/// Current segment format version.
pub const VERSION: u32 = 1;
/// Size of the header block; also the O_DIRECT write granularity of the WAL.
pub const BLOCK: u64 = 4096;
/// Offset of the first record in a segment.
pub const DATA_START: u64 = BLOCK;
const HEADER_USED: usize = 40;

/// Name of the live segment `seq` whose log starts at `first_index`.
pub fn segment_name(seq: u64, first_index: u64) -> String {
    format!("{seq:016x}-{first_index:016x}.wal")
}

/// Parses a live segment's file name into `(seq, first_index)`.
pub fn parse_segment_name(name: &str) -> Option<(u64, u64)> {
    let stem = name.strip_suffix(".wal")?;
    let (seq, first) = stem.split_once('-')?;
    if seq.len() != 16 || first.len() != 16 {
        return None;
    }
    Some((
        u64::from_str_radix(seq, 16).ok()?,
        u64::from_str_radix(first, 16).ok()?,
    ))
}

/// Name of spare file number `n`.
pub fn spare_name(n: u64) -> String {
    format!("{n:016x}.spare")
}

/// Parses a spare file's name into its number.
pub fn parse_spare_name(name: &str) -> Option<u64> {
    let stem = name.strip_suffix(".spare")?;
    if stem.len() != 16 {
        return None;
    }
    u64::from_str_radix(stem, 16).ok()
}

fn crc_of_header(block: &[u8]) -> u32 {
    let mut crc = crc32fast::Hasher::new();
    crc.update(&block[0..12]);
    crc.update(&block[16..HEADER_USED]);
    crc.finalize()
}

/// Encodes a segment header into the first bytes of `block` (which must be zeroed).
pub fn encode_header(block: &mut [u8], seq: u64, first_index: u64, size: u64) {
    block[0..8].copy_from_slice(MAGIC);
    block[8..12].copy_from_slice(&VERSION.to_le_bytes());
    block[16..24].copy_from_slice(&seq.to_le_bytes());
    block[24..32].copy_from_slice(&first_index.to_le_bytes());
    block[32..40].copy_from_slice(&size.to_le_bytes());
    let crc = crc_of_header(block);
    block[12..16].copy_from_slice(&crc.to_le_bytes());
}

/// Validates the header of segment `path`, whose name says `(seq, first_index)`.
pub fn check_header(path: &Path, buf: &[u8], seq: u64, first_index: u64) -> Result<()> {
    if buf.len() < DATA_START as usize {
        return Err(Error::corruption(
            path,
            0,
            "segment is shorter than its header block",
        ));
    }
    if &buf[0..8] != MAGIC {
        return Err(Error::corruption(
            path,
            0,
            "bad magic: not a Keel WAL segment",
        ));
    }
    let version = u32::from_le_bytes(buf[8..12].try_into().expect("4 bytes"));
    if version != VERSION {
        return Err(Error::corruption(
            path,
            8,
            format!("unsupported segment version {version}"),
        ));
    }
    let stored = u32::from_le_bytes(buf[12..16].try_into().expect("4 bytes"));
    if stored != crc_of_header(buf) {
        return Err(Error::corruption(
            path,
            12,
            "segment header checksum mismatch",
        ));
    }
    let header_seq = u64::from_le_bytes(buf[16..24].try_into().expect("8 bytes"));
    let header_first = u64::from_le_bytes(buf[24..32].try_into().expect("8 bytes"));
    if header_seq != seq || header_first != first_index {
        return Err(Error::corruption(
            path,
            16,
            format!("header says segment {header_seq} from index {header_first}, name disagrees"),
        ));
    }
    Ok(())
}

/// The salt carried by records of segment `seq`.
pub fn salt(seq: u64) -> u32 {
    // Truncation is the point: two live segments 2^32 sequence numbers apart cannot coexist.
    seq as u32
}

fn glommio_io(op: &'static str, path: &Path) -> impl FnOnce(glommio::GlommioError<()>) -> Error {
    let path = path.to_path_buf();
    move |e| Error::io(op, path, std::io::Error::from(e))
}

/// Opens `path` for O_DIRECT reads and writes.
pub async fn open_dma(path: &Path) -> Result<DmaFile> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .dma_open(path)
        .await
        .map_err(glommio_io("opening", path))
}

/// Opens the active segment `path` for O_DIRECT reads and `O_DSYNC` writes: a write completes
/// once its data (and the metadata needed to read it back) is durable, as a write followed by
/// an fdatasync, but in one I/O request. The executor then sleeps and wakes once per group
/// commit instead of twice, and the fsync is not handed to an io_uring worker thread.
pub async fn open_dma_dsync(path: &Path) -> Result<DmaFile> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DSYNC)
        .dma_open(path)
        .await
        .map_err(glommio_io("opening", path))
}

/// Writes all of `buf` (block-aligned length) at the block-aligned `pos` of `file` (`path`).
///
/// A short write (the kernel wrote only part, as it does at a file-size limit or when space runs
/// out mid-write) is continued with the rest, so that the error finally returned is the OS's own
/// (`ENOSPC`, `EFBIG`, ...) rather than a bare "short write".
pub async fn write_all(file: &DmaFile, path: &Path, buf: DmaBuffer, pos: u64) -> Result<()> {
    debug_assert_eq!(pos % BLOCK, 0);
    let len = buf.len();
    let buf = std::rc::Rc::new(buf);
    let mut done = file
        .write_rc_at(buf.clone(), pos)
        .await
        .map_err(glommio_io("writing", path))?;
    while done < len {
        if done == 0 || !(done as u64).is_multiple_of(BLOCK) {
            return Err(Error::io(
                "writing",
                path,
                std::io::Error::other(format!("short write: {done} of {len} bytes")),
            ));
        }
        let mut rest = file.alloc_dma_buffer(len - done);
        rest.as_bytes_mut().copy_from_slice(&buf.as_bytes()[done..]);
        done += file
            .write_at(rest, pos + done as u64)
            .await
            .map_err(glommio_io("writing", path))?;
    }
    Ok(())
}

/// Writes `data` (a multiple of [`BLOCK`] long) at `pos` of `file`, which is `path`.
pub async fn write_block_aligned(file: &DmaFile, path: &Path, data: &[u8], pos: u64) -> Result<()> {
    debug_assert_eq!(data.len() as u64 % BLOCK, 0);
    let mut buf = file.alloc_dma_buffer(data.len());
    buf.as_bytes_mut().copy_from_slice(data);
    write_all(file, path, buf, pos).await
}

/// fdatasync of `file`, which is `path`.
pub async fn fdatasync(file: &DmaFile, path: &Path) -> Result<()> {
    file.fdatasync()
        .await
        .map_err(glommio_io("fdatasync", path))
}

/// fsync of directory `dir`, making renames and creations in it durable.
pub async fn sync_dir(dir: &Path) -> Result<()> {
    let d = glommio::io::Directory::open(dir)
        .await
        .map_err(glommio_io("opening directory", dir))?;
    d.sync()
        .await
        .map_err(glommio_io("fsync of directory", dir))?;
    d.close()
        .await
        .map_err(glommio_io("closing directory", dir))
}

/// Makes a zeroed spare file of `size` bytes at `dir/{n}.spare`: a new pre-allocated file, or,
/// with `recycle`, a released segment whose blocks are already allocated and written.
///
/// The file is filled under a `.tmp` name, made durable, then renamed, so a `.spare` file is
/// always complete and all zeros: past the end of the log a segment holds nothing but zeros, which
/// is what lets recovery call any other byte there a torn write (or corruption).
pub async fn prepare_spare(
    dir: &Path,
    n: u64,
    size: u64,
    recycle: Option<&Path>,
) -> Result<PathBuf> {
    const CHUNK: u64 = 1 << 20;
    let tmp = dir.join(format!("{n:016x}.tmp"));
    if let Some(old) = recycle {
        std::fs::rename(old, &tmp).map_err(|e| Error::io("renaming", old, e))?;
        // Durable before the first zero is written: otherwise a power loss could leave the
        // old name on a half-zeroed file, which recovery would call corrupt.
        sync_dir(dir).await?;
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(recycle.is_none())
        .dma_open(&tmp)
        .await
        .map_err(glommio_io("creating", &tmp))?;
    let result = async {
        file.pre_allocate(size, false)
            .await
            .map_err(glommio_io("pre-allocating", &tmp))?;
        let zeros = vec![0u8; CHUNK.min(size) as usize];
        let mut pos = 0;
        while pos < size {
            let len = CHUNK.min(size - pos);
            write_block_aligned(&file, &tmp, &zeros[..len as usize], pos).await?;
            pos += len;
        }
        fdatasync(&file, &tmp).await
    }
    .await;
    let _ = file.close().await;
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    let spare = dir.join(spare_name(n));
    std::fs::rename(&tmp, &spare).map_err(|e| Error::io("renaming", &tmp, e))?;
    sync_dir(dir).await?;
    Ok(spare)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        let n = segment_name(3, 0x1234);
        assert_eq!(n, "0000000000000003-0000000000001234.wal");
        assert_eq!(parse_segment_name(&n), Some((3, 0x1234)));
        assert_eq!(parse_segment_name("3-1234.wal"), None);
        assert_eq!(
            parse_segment_name("0000000000000003-0000000000001234.wa"),
            None
        );
        assert_eq!(parse_spare_name(&spare_name(77)), Some(77));
        assert_eq!(parse_spare_name("x.spare"), None);
    }

    #[test]
    fn header_round_trip_and_damage() {
        let p = Path::new("seg");
        let mut block = vec![0u8; BLOCK as usize];
        encode_header(&mut block, 5, 100, 1 << 26);
        check_header(p, &block, 5, 100).unwrap();
        assert!(check_header(p, &block, 6, 100).is_err());
        for i in 0..HEADER_USED {
            let mut bad = block.clone();
            bad[i] ^= 1;
            let err = check_header(p, &bad, 5, 100).unwrap_err();
            assert!(matches!(err, Error::Corruption { .. }), "byte {i}: {err}");
        }
        assert!(check_header(p, &block[..100], 5, 100).is_err());
    }
}
