//! A snapshot file as etcd writes it: a bbolt database, then (from `snapshot save`) the 32-byte
//! sha256 of the database. Shared by `snapshot status` and `snapshot restore`.
//!
//! - A file whose size is 32 more than a multiple of 512 has the trailer (etcd's test,
//!   `hasChecksum`); the database is the rest.
//! - The file is mapped, not read: memory stays small whatever its size.
//! - It is locked shared (`flock`, as bbolt) while mapped: a database a running etcd holds
//!   (bbolt locks it exclusively) is refused at once instead of being read torn.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

/// etcd's snapshot hash trailer.
const SHA_LEN: usize = 32;

/// A mapped snapshot file.
pub struct SnapshotFile {
    pub path: PathBuf,
    map: memmap2::Mmap,
    /// Holds the shared lock while the file is read.
    _file: std::fs::File,
    /// Length of the database part.
    db_len: usize,
    has_hash: bool,
}

impl SnapshotFile {
    /// Maps `path`.
    pub fn open(path: &Path) -> anyhow::Result<SnapshotFile> {
        let file = std::fs::File::open(path)
            .with_context(|| format!("cannot open snapshot {}", path.display()))?;
        let len = file
            .metadata()
            .with_context(|| format!("cannot read {}", path.display()))?
            .len() as usize;
        if len == 0 {
            bail!("snapshot {} is empty", path.display());
        }
        match file.try_lock_shared() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => bail!(
                "cannot read {}: it is locked; is etcd still running on it?",
                path.display()
            ),
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("cannot lock {}", path.display()));
            }
        }
        // SAFETY: the mapping is read-only and private to this process. Its bytes stay valid
        // while `map` lives unless another process truncates the file meanwhile, which would
        // end this short-lived tool with SIGBUS, not a wrong result; the operator names a file
        // at rest (a snapshot already saved).
        let map = unsafe { memmap2::Mmap::map(&file) }
            .with_context(|| format!("cannot map {}", path.display()))?;
        let has_hash = len % 512 == SHA_LEN;
        let db_len = if has_hash { len - SHA_LEN } else { len };
        Ok(SnapshotFile {
            path: path.to_path_buf(),
            map,
            _file: file,
            db_len,
            has_hash,
        })
    }

    /// The database bytes.
    pub fn db(&self) -> &[u8] {
        &self.map[..self.db_len]
    }

    /// Checks the sha256 trailer, as `etcdctl snapshot restore` does (etcd's messages).
    pub fn verify(&self, skip_hash_check: bool) -> anyhow::Result<()> {
        if skip_hash_check {
            return Ok(());
        }
        if !self.has_hash {
            bail!("snapshot missing hash but --skip-hash-check=false");
        }
        let want = &self.map[self.db_len..];
        let got = ring::digest::digest(&ring::digest::SHA256, self.db());
        if got.as_ref() != want {
            bail!(
                "{}: expected sha256 {:?}, got {:?}",
                self.path.display(),
                want,
                got.as_ref()
            );
        }
        Ok(())
    }

    /// The database's name in errors.
    pub fn name(&self) -> String {
        self.path.display().to_string()
    }
}
