//! Keel's backend: one file holding a copy-on-write B+tree per named bucket, read through mmap.
//!
//! # Layout
//! - [`page`]: the on-disk formats (meta, branch, leaf, overflow, free list, catalog).
//! - `mmap`: the read-only map; the only `unsafe` here, with the invariant that makes it sound.
//! - `node`: tree nodes as a transaction sees them (clean pages or dirty in-memory nodes), lookup
//!   and cursors.
//! - `write`: the write transaction: copy-on-write path copying, splits, merges, spilling pages.
//! - `check`: the consistency checker. `defrag`: compaction into a new file.
//!
//! # Versions, readers and the writer
//! Every commit publishes a new immutable [`Version`] (txid, catalog, bucket roots, page count,
//! map). A [`ReadTxn`] pins one: it reads through the map without locks and never blocks the
//! writer or other readers. One [`WriteTxn`] at a time copies the pages it changes (never writing
//! a page of a live version), then `commit` writes the new pages with `pwrite` and publishes.
//!
//! # Durability: deferred commits and `sync`
//! `commit(sync = false)` makes a version visible in memory only; its pages may or may not reach
//! the disk. [`Backend::sync`] makes the latest version durable: fdatasync of the pages, then the
//! free list is written, both are made durable by one fdatasync, then a meta page is written into
//! the slot that does *not* hold the newest durable meta, then fdatasync: two syncs in all. So a
//! crash at any point leaves the previous durable meta intact, and the pages it references are
//! intact too: a page of the durable version (or of the version being synced) is not reused
//! until a newer version is durable (they count as readers; see "Page reuse").
//! `commit(sync = true)` is `commit` then `sync`. The MVCC layer defers: the WAL is Keel's
//! durability point, and the backend is synced at checkpoints.
//!
//! # Page reuse
//! Pages a commit replaces were visible in the versions before it. They wait in `pending` under
//! the txid of the commit that freed them, and move to the free set once every live reader and the
//! durable version are at least that new.
//!
//! A page allocated after the newest version that is durable or being synced (a *fresh* page) is
//! in neither of those versions: once replaced, it waits in `pending_fresh` for the live readers
//! only. Between two syncs the writer therefore reuses the pages it keeps replacing (the path
//! from the root to the leaf it writes) instead of taking new ones for every commit, and a sync
//! writes back about what changed since the last one, not every page of every commit in between
//! (bench/RESULTS.md, 2026-11-28, "Backend syncs").

pub mod bbolt;
mod check;
mod defrag;
mod mmap;
mod node;
pub mod page;
mod write;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

pub use self::check::CheckReport;
pub use self::defrag::DefragReport;
use self::mmap::Map;
pub use self::node::RangeIter;
use self::page::{HEADER, Kind, Meta, PageView, StoredValue, corrupt};
pub use self::write::WriteTxn;
use crate::error::{Error, Result};

/// etcd's bucket names, created by [`Backend::create_etcd_buckets`].
pub const ETCD_BUCKETS: &[&str] = &[
    "key",
    "meta",
    "lease",
    "members",
    "members_removed",
    "auth",
    "authUsers",
    "authRoles",
    "alarm",
    "cluster",
];

/// Backend settings.
#[derive(Debug, Clone)]
pub struct BackendOptions {
    /// Page size of a new file (an existing file keeps its own). Default 4096.
    pub page_size: usize,
    /// Largest value accepted. Default 16 MiB (etcd requests are at most 1.5 MiB).
    pub max_value_size: usize,
    /// The file grows in steps of this many bytes, or 1/32 of its size if that is more.
    /// Default 16 MiB.
    pub min_grow_bytes: u64,
}

impl Default for BackendOptions {
    fn default() -> Self {
        BackendOptions {
            page_size: 4096,
            max_value_size: 16 << 20,
            min_grow_bytes: 16 << 20,
        }
    }
}

/// One bucket in a version: its root page (0 = empty) and number of entries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct BucketRoot {
    pub root: u64,
    pub count: u64,
}

/// An immutable, committed state of the database.
#[derive(Debug)]
pub(crate) struct Version {
    pub txid: u64,
    pub catalog: u64,
    pub page_count: u64,
    pub page_size: usize,
    pub buckets: BTreeMap<Vec<u8>, BucketRoot>,
    pub map: Arc<Map>,
}

impl Version {
    /// Pages `[id, id + pages)`, bounds-checked against the version and the map.
    pub fn run(&self, id: u64, pages: u64) -> Result<&[u8]> {
        let end = id
            .checked_add(pages)
            .ok_or_else(|| corrupt(id, "page run overflows"))?;
        if id < 2 || end > self.page_count {
            return Err(corrupt(
                id,
                format!(
                    "page run of {pages} lies outside the file ({} pages)",
                    self.page_count
                ),
            ));
        }
        let p = self.page_size;
        self.map
            .bytes(id as usize * p, pages as usize * p)
            .ok_or_else(|| corrupt(id, "page lies beyond the mapped file"))
    }

    /// One page.
    pub fn page(&self, id: u64) -> Result<&[u8]> {
        self.run(id, 1)
    }

    /// A validated view of a tree page.
    pub fn view(&self, id: u64) -> Result<PageView<'_>> {
        PageView::new(id, self.page(id)?)
    }

    /// The whole run of an overflow or free-list page starting at `id`.
    pub fn whole_run(&self, id: u64, kind: Kind) -> Result<&[u8]> {
        let first = self.page(id)?;
        if first[4] != kind as u8 {
            return Err(corrupt(id, format!("expected a {kind:?} page")));
        }
        let extra = page::u32_at(first, 8) as u64;
        self.run(id, 1 + extra)
    }

    /// The bytes of a value stored in an overflow run.
    pub fn overflow(&self, first: u64, len: u32) -> Result<&[u8]> {
        let run = self.whole_run(first, Kind::Overflow)?;
        run.get(HEADER..HEADER + len as usize).ok_or_else(|| {
            corrupt(
                first,
                format!("overflow run shorter than its {len}-byte value"),
            )
        })
    }

    /// Resolves a stored value to its bytes.
    #[inline]
    pub fn resolve<'a>(&'a self, v: StoredValue<'a>) -> Result<&'a [u8]> {
        match v {
            StoredValue::Inline(b) => Ok(b),
            StoredValue::Overflow(first, len) => self.overflow(first, len),
        }
    }
}

/// Sizes readable without any lock: the quota check and `/metrics` read them on network threads
/// and must never wait behind a commit or an fdatasync holding the writer mutex.
#[derive(Debug, Default)]
pub(crate) struct Sizes {
    /// The file's length in bytes.
    pub file_len: AtomicU64,
    /// Bytes in use: pages in use by the newest version (free and pending pages excluded).
    pub in_use: AtomicU64,
}

/// State only the writer touches (behind the writer mutex).
pub(crate) struct WriterState {
    pub file: Arc<File>,
    pub path: PathBuf,
    pub file_len: u64,
    /// Lock-free copies of the sizes (shared with [`Shared::sizes`]).
    pub sizes: Arc<Sizes>,
    /// Pages free to reuse now.
    pub free: BTreeSet<u64>,
    /// Pages freed by the commit with this txid, reusable once no reader or durable version is
    /// older than it.
    pub pending: BTreeMap<u64, Vec<u64>>,
    /// Pages allocated since the newest sync was planned: in no durable version and in no version
    /// being synced (the next plan clears the set).
    pub fresh: HashSet<u64>,
    /// Fresh pages freed by the commit with this txid, reusable once no reader is older than it:
    /// no durable version, nor the one a sync is writing, can hold them.
    pub pending_fresh: BTreeMap<u64, Vec<u64>>,
    /// Newest durable txid, its meta slot, and the pages holding its free list.
    pub durable_txid: u64,
    pub durable_slot: u64,
    pub durable_freelist: Vec<u64>,
    /// Pages reserved for the free list of the sync in progress (empty when none is): out of
    /// the free set from its plan until it completes and they become `durable_freelist`. A
    /// failed sync leaves them here; the backend is poisoned then and writes nothing more.
    pub syncing_freelist: Vec<u64>,
    /// Pages `[0, high_water)` are in use or free: the largest page count any version or the
    /// durable free list has used. New pages are allocated from here.
    pub high_water: u64,
    /// The newest map of the file (remade whenever the file grows).
    pub map: Arc<Map>,
    pub options: BackendOptions,
    /// Test hook: sees every write (offset, bytes) before it is issued.
    pub observer: Option<WriteObserver>,
    /// Set by the first failed commit or sync: what is on disk and in memory may disagree (for
    /// instance, Linux may drop dirty pages after a failed fdatasync), so nothing more is written
    /// until the backend is reopened, which recovers the last durable version.
    pub poisoned: Option<String>,
}

impl std::fmt::Debug for WriterState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriterState")
            .field("path", &self.path)
            .field("file_len", &self.file_len)
            .field("high_water", &self.high_water)
            .field("durable_txid", &self.durable_txid)
            .finish_non_exhaustive()
    }
}

/// What the observer sees: each write, and each fdatasync.
#[derive(Debug, Clone, Copy)]
pub enum IoEvent<'a> {
    /// `bytes` are about to be written at byte `offset`.
    Write(u64, &'a [u8]),
    /// An fdatasync is about to be issued.
    Sync,
}

/// A callback that sees every write and fdatasync the backend issues, for fault-injection tests.
pub type WriteObserver = Box<dyn FnMut(IoEvent<'_>) + Send>;

/// The current version and the reader table, under one lock so that registering a reader and
/// reading the current version are atomic.
#[derive(Debug)]
pub(crate) struct Readers {
    pub current: Arc<Version>,
    /// txid -> number of live read transactions on it.
    pub live: BTreeMap<u64, usize>,
}

#[derive(Debug)]
pub(crate) struct Shared {
    pub writer: Mutex<WriterState>,
    pub readers: Mutex<Readers>,
    /// One [`Backend::sync`] at a time (it releases the writer mutex during its I/O).
    pub sync: Mutex<()>,
    /// One [`Backend::defrag`] at a time: they would share the copy's file name.
    pub defrag: Mutex<()>,
    pub sizes: Arc<Sizes>,
    /// Held for the lifetime of the backend: the exclusive flock.
    _lock: Arc<File>,
}

/// The backend: cheap to clone, `Send + Sync`; readers may live on any thread.
#[derive(Debug, Clone)]
pub struct Backend {
    shared: Arc<Shared>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves consistent state (every mutation is a whole
    // assignment), so a poisoned lock is still usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl Fn(std::io::Error) -> Error + 'a {
    move |e| Error::io(op, path, e)
}

impl Backend {
    /// Opens (or creates) the backend file at `path`, locking it exclusively.
    pub fn open(path: impl AsRef<Path>, options: BackendOptions) -> Result<Backend> {
        let backend = open_file(path.as_ref(), options, 0)?;
        // A defragmentation cut short (kill -9, power loss) leaves its partial copy beside the
        // file; the original was never touched. Holding the file's lock, no defrag runs now.
        let mut copy = path.as_ref().as_os_str().to_owned();
        copy.push(".defrag");
        match std::fs::remove_file(&copy) {
            Ok(()) => {
                tracing::info!(path = %Path::new(&copy).display(), "removed the copy of an interrupted defragmentation")
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io("removing", Path::new(&copy), e)),
        }
        Ok(backend)
    }

    /// Starts a read transaction on the latest committed version. Never blocks on the writer.
    pub fn begin_read(&self) -> ReadTxn {
        let mut r = lock(&self.shared.readers);
        let version = r.current.clone();
        *r.live.entry(version.txid).or_default() += 1;
        ReadTxn {
            version,
            shared: self.shared.clone(),
        }
    }

    /// Starts the write transaction, waiting for the previous one to finish.
    pub fn begin_write(&self) -> Result<WriteTxn<'_>> {
        let mut w = lock(&self.shared.writer);
        if let Some(why) = &w.poisoned {
            return Err(Error::Poisoned(why.clone()));
        }
        let base = {
            let r = lock(&self.shared.readers);
            let oldest = r.live.keys().next().copied().unwrap_or(u64::MAX);
            let limit = oldest.min(w.durable_txid);
            // Pages freed by commit `t` were last visible in version `t - 1`.
            let ready: Vec<u64> = w.pending.range(..=limit).map(|(t, _)| *t).collect();
            for t in ready {
                let pages = w.pending.remove(&t).expect("listed");
                w.free.extend(pages);
            }
            let ready: Vec<u64> = w.pending_fresh.range(..=oldest).map(|(t, _)| *t).collect();
            for t in ready {
                let pages = w.pending_fresh.remove(&t).expect("listed");
                w.free.extend(pages);
            }
            r.current.clone()
        };
        Ok(WriteTxn::new(self, w, base))
    }

    /// Makes the latest committed version durable (see the module docs for the protocol) and
    /// returns its txid. The writer mutex is held only to plan the sync and to record it: the
    /// writes and fdatasyncs run without it, so commits (and readers of [`Backend::file_size`])
    /// continue meanwhile. Syncs run one at a time.
    pub fn sync(&self) -> Result<u64> {
        let _one = lock(&self.shared.sync);
        let (current, plan) = {
            let mut w = lock(&self.shared.writer);
            // The latest version, read under the writer mutex: every page freed so far was freed
            // by a commit no newer than it, so none of them is in it (`plan_sync` relies on it).
            let current = lock(&self.shared.readers).current.clone();
            if let Some(why) = &w.poisoned {
                return Err(Error::Poisoned(why.clone()));
            }
            if current.txid == w.durable_txid {
                return Ok(current.txid);
            }
            let plan = plan_sync(&mut w, &current);
            (current, poison_on_error(&mut w, plan)?)
        };
        // The version's pages stay intact meanwhile: pages it uses that a newer commit frees
        // wait in `pending` until the durable version passes them, and the durable version only
        // moves in `finish_sync` below.
        let mut plan = plan;
        let written = write_sync(&mut plan);
        let mut w = lock(&self.shared.writer);
        if let Some(obs) = plan.observer.take() {
            // Unless a test installed another one meanwhile.
            w.observer.get_or_insert(obs);
        }
        let written = poison_on_error(&mut w, written);
        written?;
        finish_sync(&mut w, plan);
        Ok(current.txid)
    }

    /// Renames `from` over this backend's file, under the writer mutex, and poisons this
    /// backend (its path names another file now): a defragmentation finishing meanwhile finds
    /// it poisoned in its last phase, under the same mutex, and does not rename its copy over
    /// the new file (nor does one started later). Readers keep reading the old file through
    /// their maps; syncs of it are refused.
    pub fn replace_file(&self, from: &Path) -> Result<()> {
        let mut w = lock(&self.shared.writer);
        let to = w.path.clone();
        std::fs::rename(from, &to).map_err(|e| Error::io("renaming", from, e))?;
        w.poisoned
            .get_or_insert_with(|| format!("{} was replaced", to.display()));
        Ok(())
    }

    /// Creates every bucket etcd uses, if missing, and commits durably.
    pub fn create_etcd_buckets(&self) -> Result<()> {
        let mut txn = self.begin_write()?;
        for name in ETCD_BUCKETS {
            txn.create_bucket(name.as_bytes())?;
        }
        txn.commit(true)
    }

    /// Size of the file in bytes. Lock-free: never waits for a commit or a sync.
    pub fn file_size(&self) -> u64 {
        self.shared.sizes.file_len.load(Ordering::Acquire)
    }

    /// Bytes in use: the pages of the newest version, free and pending pages excluded (etcd's
    /// "size in use"). Lock-free, as of the latest commit or sync.
    pub fn size_in_use(&self) -> u64 {
        self.shared.sizes.in_use.load(Ordering::Acquire)
    }

    /// The txid of the latest committed version.
    pub fn txid(&self) -> u64 {
        lock(&self.shared.readers).current.txid
    }

    /// The txid of the newest durable version.
    pub fn durable_txid(&self) -> u64 {
        lock(&self.shared.writer).durable_txid
    }

    /// Installs a callback that sees every write before it is issued (fault-injection tests).
    pub fn set_write_observer(&self, observer: Option<WriteObserver>) {
        lock(&self.shared.writer).observer = observer;
    }
}

/// Opens or creates the file; a new file's first version gets txid `base + 1`.
pub(crate) fn open_file(path: &Path, options: BackendOptions, base: u64) -> Result<Backend> {
    let path = path.to_path_buf();
    if !page::valid_page_size(options.page_size) {
        return Err(Error::InvalidArgument(format!(
            "page size {} must be a power of two between 1 KiB and 32 KiB",
            options.page_size
        )));
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io("opening", &path))?;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
    // SAFETY: flock on a valid open descriptor; no memory is involved.
    if unsafe { libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(Error::Locked(path));
    }
    let mut file_len = file.metadata().map_err(io("stat", &path))?.len();
    if file_len == 0 {
        init_file(&file, &path, options.page_size, base)?;
        file_len = file.metadata().map_err(io("stat", &path))?.len();
    }
    let (meta, slot) = match read_metas(&file, &path, file_len) {
        Ok(found) => found,
        // No valid meta in a file no bigger than its two meta pages: its creation was torn by a
        // crash before the first sync completed, and it holds no data. Create it again.
        Err(_) if file_len <= 2 * options.page_size as u64 => {
            tracing::warn!(path = %path.display(), "re-initialising a backend file whose creation was interrupted");
            file.set_len(0).map_err(io("truncating", &path))?;
            init_file(&file, &path, options.page_size, base)?;
            file_len = file.metadata().map_err(io("stat", &path))?.len();
            read_metas(&file, &path, file_len)?
        }
        Err(e) => return Err(e),
    };
    let p = meta.page_size as usize;
    let needed = meta.page_count.saturating_mul(p as u64);
    if file_len < needed {
        return Err(Error::CorruptPage {
            page: meta.page_count - 1,
            reason: format!(
                "file is truncated: meta txid {} needs {} pages ({needed} bytes), the file has \
                 {file_len} bytes",
                meta.txid, meta.page_count
            ),
        });
    }
    let map = Arc::new(Map::new(&file, file_len as usize).map_err(io("mapping", &path))?);
    let mut version = Version {
        txid: meta.txid,
        catalog: meta.catalog,
        page_count: meta.page_count,
        page_size: p,
        buckets: BTreeMap::new(),
        map,
    };
    version.buckets = load_catalog(&version)?;
    let (free, durable_freelist) = load_freelist(&version, meta.freelist)?;
    let file = Arc::new(file);
    let high_water = version
        .page_count
        .max(durable_freelist.iter().max().map_or(0, |m| m + 1));
    let sizes = Arc::new(Sizes::default());
    let writer = WriterState {
        high_water,
        map: version.map.clone(),
        file: file.clone(),
        path,
        file_len,
        sizes: sizes.clone(),
        free,
        pending: BTreeMap::new(),
        fresh: HashSet::new(),
        pending_fresh: BTreeMap::new(),
        durable_txid: meta.txid,
        durable_slot: slot,
        durable_freelist,
        syncing_freelist: Vec::new(),
        options,
        observer: None,
        poisoned: None,
    };
    let version = Arc::new(version);
    writer.update_sizes(&version);
    let readers = Readers {
        current: version,
        live: BTreeMap::new(),
    };
    Ok(Backend {
        shared: Arc::new(Shared {
            writer: Mutex::new(writer),
            readers: Mutex::new(readers),
            sync: Mutex::new(()),
            defrag: Mutex::new(()),
            sizes,
            _lock: file,
        }),
    })
}

/// Writes two meta pages describing an empty database, at txids `base` and `base + 1`.
fn init_file(file: &File, path: &Path, page_size: usize, base: u64) -> Result<()> {
    let mut buf = vec![0u8; 2 * page_size];
    for slot in 0..2 {
        let meta = Meta {
            page_size: page_size as u32,
            txid: base + slot as u64,
            catalog: 0,
            freelist: 0,
            page_count: 2,
        };
        meta.encode(&mut buf[slot * page_size..(slot + 1) * page_size]);
    }
    file.write_all_at(&buf, 0).map_err(io("writing", path))?;
    file.sync_all().map_err(io("fsync", path))?;
    if let Some(dir) = path.parent()
        && let Ok(d) = File::open(if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        })
    {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Reads both meta pages and returns the newest valid one and its slot.
fn read_metas(file: &File, path: &Path, file_len: u64) -> Result<(Meta, u64)> {
    let mut head = vec![0u8; 64];
    let read = |offset: u64, buf: &mut [u8]| -> Result<bool> {
        if offset + buf.len() as u64 > file_len {
            return Ok(false);
        }
        file.read_exact_at(buf, offset)
            .map_err(io("reading", path))?;
        Ok(true)
    };
    let mut found: Vec<(Meta, u64)> = Vec::new();
    let mut reasons = Vec::new();
    if read(0, &mut head)? {
        match Meta::decode(&head) {
            Ok(m) => found.push((m, 0)),
            Err(e) => reasons.push(format!("page 0: {e}")),
        }
    } else {
        reasons.push("page 0: file too short".into());
    }
    // Page 1's offset depends on the page size: use page 0's if it is valid, else try each.
    let sizes: Vec<u64> = match found.first() {
        Some((m, _)) => vec![m.page_size as u64],
        None => (10..=15).map(|s| 1u64 << s).collect(),
    };
    let mut page1 = None;
    for size in sizes {
        if read(size, &mut head)? {
            match Meta::decode(&head) {
                Ok(m) if m.page_size as u64 == size => {
                    page1 = Some(m);
                    break;
                }
                Ok(_) => {}
                Err(e) => {
                    if !found.is_empty() {
                        reasons.push(format!("page 1: {e}"));
                    }
                }
            }
        }
    }
    if let Some(m) = page1 {
        found.push((m, 1));
    } else if found.is_empty() {
        reasons.push("page 1: no valid meta at any page size".into());
    }
    if let [(a, _), (b, _)] = found.as_slice()
        && a.page_size != b.page_size
    {
        return Err(Error::CorruptPage {
            page: 1,
            reason: "meta pages disagree on the page size".into(),
        });
    }
    found
        .into_iter()
        .max_by_key(|(m, _)| m.txid)
        .ok_or_else(|| Error::CorruptPage {
            page: 0,
            reason: format!("no valid meta page ({})", reasons.join("; ")),
        })
}

fn load_catalog(version: &Version) -> Result<BTreeMap<Vec<u8>, BucketRoot>> {
    let mut buckets = BTreeMap::new();
    if version.catalog == 0 {
        return Ok(buckets);
    }
    let bytes = version.page(version.catalog)?;
    if !page::checksum_ok(bytes) {
        return Err(corrupt(version.catalog, "catalog checksum mismatch"));
    }
    let view = PageView::new(version.catalog, bytes)?;
    if view.kind() != Kind::Catalog {
        return Err(corrupt(version.catalog, "expected the bucket catalog"));
    }
    for i in 0..view.len() {
        let name = view.key(i)?.to_vec();
        let StoredValue::Inline(v) = view.value(i)? else {
            return Err(corrupt(
                version.catalog,
                "catalog entry with an overflow value",
            ));
        };
        if v.len() != 16 {
            return Err(corrupt(version.catalog, "catalog entry of the wrong size"));
        }
        let root = BucketRoot {
            root: page::u64_at(v, 0),
            count: page::u64_at(v, 8),
        };
        if root.root == 1 || root.root >= version.page_count {
            return Err(corrupt(
                version.catalog,
                format!("bucket root {} outside the file", root.root),
            ));
        }
        buckets.insert(name, root);
    }
    Ok(buckets)
}

/// Reads the free list: the free pages and the pages holding the list itself.
fn load_freelist(version: &Version, first: u64) -> Result<(BTreeSet<u64>, Vec<u64>)> {
    let mut free = BTreeSet::new();
    if first == 0 {
        return Ok((free, Vec::new()));
    }
    let run = version.whole_run(first, Kind::Freelist)?;
    if !page::checksum_ok(run) {
        return Err(corrupt(first, "free list checksum mismatch"));
    }
    let pages = (run.len() / version.page_size) as u64;
    let count = page::u64_at(run, HEADER) as usize;
    let ids = run.get(HEADER + 8..HEADER + 8 + count * 8).ok_or_else(|| {
        corrupt(
            first,
            format!("free list of {count} entries overflows its pages"),
        )
    })?;
    for chunk in ids.chunks_exact(8) {
        let id = page::u64_at(chunk, 0);
        if id < 2 || id >= version.page_count || (first..first + pages).contains(&id) {
            return Err(corrupt(
                first,
                format!("free list names page {id}, which cannot be free"),
            ));
        }
        if !free.insert(id) {
            return Err(corrupt(first, format!("free list names page {id} twice")));
        }
    }
    Ok((free, (first..first + pages).collect()))
}

/// Grows the file (and remaps it) to hold `pages` pages if needed.
pub(crate) fn ensure_len(w: &mut WriterState, pages: u64, page_size: usize) -> Result<()> {
    let needed = pages * page_size as u64;
    if needed <= w.file_len {
        return Ok(());
    }
    // Small steps, as bbolt's (16 MiB), so the file's size stays close to what it holds: etcd's
    // quota counts the file's size. Large files grow by 1/32 of their size, bounding the remaps.
    let step = (w.file_len / 32).max(w.options.min_grow_bytes);
    let new_len = needed
        .max(w.file_len + step)
        .next_multiple_of(page_size as u64);
    w.file.set_len(new_len).map_err(io("growing", &w.path))?;
    w.file_len = new_len;
    w.sizes.file_len.store(new_len, Ordering::Release);
    let map = Map::new(&w.file, new_len as usize).map_err(io("mapping", &w.path))?;
    w.map = Arc::new(map);
    Ok(())
}

/// Writes `bytes` at `offset`, through the observer.
pub(crate) fn write_at(w: &mut WriterState, offset: u64, bytes: &[u8]) -> Result<()> {
    if let Some(obs) = w.observer.as_mut() {
        obs(IoEvent::Write(offset, bytes));
    }
    w.file
        .write_all_at(bytes, offset)
        .map_err(io("writing", &w.path))
}

/// A sync in progress: what `plan_sync` decided under the writer mutex, for `write_sync` (no
/// lock) and `finish_sync` (under the mutex again).
pub(crate) struct SyncPlan {
    file: Arc<File>,
    path: PathBuf,
    page_size: usize,
    /// The version made durable.
    txid: u64,
    catalog: u64,
    /// Pages the version's meta declares (its own, plus the free list's if they extend the file).
    page_count: u64,
    /// Where the free list goes (reserved: out of the free set from planning on).
    list_pages: Vec<u64>,
    /// The free list's encoded pages.
    list: Vec<u8>,
    slot: u64,
    /// The test observer, moved out of the writer state while the lock is released.
    observer: Option<WriteObserver>,
}

/// Plans a sync of `current`: encodes the free list and reserves the pages it goes to.
pub(crate) fn plan_sync(w: &mut WriterState, current: &Version) -> Result<SyncPlan> {
    let p = current.page_size;
    // The free list lists every page free or pending: after a restart there are no readers.
    // So do the pages of the previous durable list: once the new meta is durable they are free.
    // (In memory they are reused only after that, so the old meta stays intact if this sync tears.)
    // Pages a commit takes from the free set after this point were free in `current` too, so
    // listing them is right for the version this sync makes durable.
    let mut listed: Vec<u64> = w.free.iter().copied().collect();
    listed.extend(w.pending.values().flatten().copied());
    listed.extend(w.pending_fresh.values().flatten().copied());
    listed.extend(w.durable_freelist.iter().copied());
    // Pages for the list itself: taken from the free pages (not listed) or from the end.
    // Enough pages for the whole list (taking them from the list only shortens it).
    let pages = (HEADER + 8 + listed.len() * 8).div_ceil(p) as u64;
    let mut list_pages: Vec<u64> = Vec::new();
    let mut page_count = w.high_water;
    // A contiguous run: the first `pages` consecutive free pages, else new pages at the end.
    if let Some(start) = find_run(&w.free, pages) {
        list_pages.extend(start..start + pages);
    } else {
        list_pages.extend(page_count..page_count + pages);
        page_count += pages;
    }
    listed.retain(|id| !list_pages.contains(id));
    listed.sort_unstable();
    let mut buf = vec![0u8; pages as usize * p];
    buf[HEADER..HEADER + 8].copy_from_slice(&(listed.len() as u64).to_le_bytes());
    for (i, id) in listed.iter().enumerate() {
        buf[HEADER + 8 + i * 8..HEADER + 16 + i * 8].copy_from_slice(&id.to_le_bytes());
    }
    page::seal(&mut buf, Kind::Freelist, 0, (pages - 1) as u32);
    ensure_len(w, page_count, p)?;
    // Every page allocated so far may be in `current` (it is the latest version, taken under the
    // writer mutex): from here on only pages allocated later are fresh.
    w.fresh.clear();
    // Reserved: no commit may allocate the list's pages while it is being written.
    for id in &list_pages {
        w.free.remove(id);
    }
    w.syncing_freelist.clone_from(&list_pages);
    w.high_water = w.high_water.max(page_count);
    Ok(SyncPlan {
        file: w.file.clone(),
        path: w.path.clone(),
        page_size: p,
        txid: current.txid,
        catalog: current.catalog,
        page_count,
        list_pages,
        list: buf,
        slot: 1 - w.durable_slot,
        observer: w.observer.take(),
    })
}

/// The I/O of a sync: the free list, fdatasync (covering the version's pages, written at their
/// commits), the meta into the slot not holding the newest durable meta, fdatasync.
pub(crate) fn write_sync(plan: &mut SyncPlan) -> Result<()> {
    let p = plan.page_size;
    let SyncPlan {
        file,
        path,
        observer,
        ..
    } = plan;
    let mut observe = |event: IoEvent<'_>| {
        if let Some(obs) = observer.as_mut() {
            obs(event);
        }
    };
    let write = |offset: u64, bytes: &[u8], observe: &mut dyn FnMut(IoEvent<'_>)| {
        observe(IoEvent::Write(offset, bytes));
        file.write_all_at(bytes, offset)
            .map_err(io("writing", path))
    };
    // One fdatasync covers the version's pages and the free list: both lie in pages no durable
    // meta references yet.
    write(plan.list_pages[0] * p as u64, &plan.list, &mut observe)?;
    observe(IoEvent::Sync);
    file.sync_data().map_err(io("fdatasync", path))?;
    let meta = Meta {
        page_size: p as u32,
        txid: plan.txid,
        catalog: plan.catalog,
        freelist: plan.list_pages[0],
        page_count: plan.page_count,
    };
    let mut mbuf = vec![0u8; p];
    meta.encode(&mut mbuf);
    write(plan.slot * p as u64, &mbuf, &mut observe)?;
    observe(IoEvent::Sync);
    file.sync_data().map_err(io("fdatasync", path))
}

/// Records a sync that completed: the old list's pages become free, the new list's pages are
/// accounted as in use by the durable meta.
pub(crate) fn finish_sync(w: &mut WriterState, plan: SyncPlan) {
    w.syncing_freelist.clear();
    let old = std::mem::replace(&mut w.durable_freelist, plan.list_pages);
    w.free.extend(old);
    w.durable_txid = plan.txid;
    w.durable_slot = plan.slot;
    w.high_water = w.high_water.max(plan.page_count);
    let sizes = w.sizes.clone();
    sizes
        .in_use
        .store(w.in_use(plan.page_count, plan.page_size), Ordering::Release);
}

impl WriterState {
    /// Bytes in use by a version of `page_count` pages.
    fn in_use(&self, page_count: u64, page_size: usize) -> u64 {
        let free = (self.free.len()
            + self.pending.values().map(Vec::len).sum::<usize>()
            + self.pending_fresh.values().map(Vec::len).sum::<usize>()) as u64;
        page_count.saturating_sub(free) * page_size as u64
    }

    /// Publishes the lock-free sizes after a change of `version`'s pages.
    pub(crate) fn update_sizes(&self, version: &Version) {
        self.sizes.file_len.store(self.file_len, Ordering::Release);
        self.sizes.in_use.store(
            self.in_use(version.page_count, version.page_size),
            Ordering::Release,
        );
    }
}

/// Poisons the backend if `result` is an error (see `WriterState::poisoned`).
pub(crate) fn poison_on_error<T>(w: &mut WriterState, result: Result<T>) -> Result<T> {
    if let Err(e) = &result {
        tracing::error!(error = %e, "backend write failed; refusing further writes until reopened");
        w.poisoned.get_or_insert_with(|| e.to_string());
    }
    result
}

/// First page of `n` consecutive free pages, if any.
pub(crate) fn find_run(free: &BTreeSet<u64>, n: u64) -> Option<u64> {
    if n == 1 {
        return free.first().copied();
    }
    let mut start = None;
    let mut len = 0;
    let mut prev = 0;
    for &id in free {
        if start.is_some() && id == prev + 1 {
            len += 1;
        } else {
            start = Some(id);
            len = 1;
        }
        if len == n {
            return start;
        }
        prev = id;
    }
    None
}

/// A read transaction: a pinned version, read without locks. `Send`: it may move between
/// threads. Dropping it lets the pages it could see be reused.
#[derive(Debug)]
pub struct ReadTxn {
    version: Arc<Version>,
    shared: Arc<Shared>,
}

impl ReadTxn {
    /// The version's txid.
    pub fn txid(&self) -> u64 {
        self.version.txid
    }

    /// The value of `key` in `bucket`.
    pub fn get(&self, bucket: &[u8], key: &[u8]) -> Result<Option<&[u8]>> {
        match bucket_root(&self.version, bucket)? {
            node::ChildRef::Page(root) => node::get_clean(&self.version, root, key),
            _ => Ok(None),
        }
    }

    /// Entries of `bucket` with `start <= key < end` (`end = None`: to the last key), in order.
    pub fn range<'t>(
        &'t self,
        bucket: &[u8],
        start: &[u8],
        end: Option<&'t [u8]>,
    ) -> Result<RangeIter<'t>> {
        let root = bucket_root(&self.version, bucket)?;
        RangeIter::new(&self.version, node::Source::Pages, root, start, end)
    }

    /// Number of entries in `bucket`.
    pub fn count(&self, bucket: &[u8]) -> Result<u64> {
        self.version
            .buckets
            .get(bucket)
            .map(|b| b.count)
            .ok_or_else(|| Error::BucketNotFound(String::from_utf8_lossy(bucket).into_owned()))
    }

    /// Bucket names.
    pub fn buckets(&self) -> Vec<Vec<u8>> {
        self.version.buckets.keys().cloned().collect()
    }
}

fn bucket_root(version: &Version, bucket: &[u8]) -> Result<node::ChildRef> {
    let b = version
        .buckets
        .get(bucket)
        .ok_or_else(|| Error::BucketNotFound(String::from_utf8_lossy(bucket).into_owned()))?;
    Ok(if b.root == 0 {
        node::ChildRef::Empty
    } else {
        node::ChildRef::Page(b.root)
    })
}

impl Drop for ReadTxn {
    fn drop(&mut self) {
        let mut r = lock(&self.shared.readers);
        let txid = self.version.txid;
        if let Some(n) = r.live.get_mut(&txid) {
            *n -= 1;
            if *n == 0 {
                r.live.remove(&txid);
            }
        }
    }
}
