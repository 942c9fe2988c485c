//! Keel's write-ahead log: the durability point of every raft write.
//!
//! # Layout
//! - [`record`]: how one record is framed (length, type, CRC, payload, padding).
//! - [`segment`]: segment files, their header block, pre-zeroed and recycled spares.
//! - [`recovery`](self::recovery): reading a directory back, torn tail versus corruption.
//! - `log`: the logical raft log in memory (entry locations, terms, tail cache).
//! - `writer`: the group-commit writer task.
//! - [`WalStorage`]: raft-rs's `Storage` over the WAL, for the raft node.
//!
//! # Calling order
//! The WAL runs on a glommio executor (it is `!Send`; the storage core owns it).
//! 1. [`Wal::open`] recovers the directory and returns the handle and what it found.
//! 2. For each raft `Ready`: [`Wal::append`] the entries and the hard state in one call; the
//!    returned future resolves once they are durable. Appends may be issued while earlier ones are
//!    in flight: everything that arrives while a durable write is running is made durable by
//!    the next single write (group commit).
//! 3. After the backend has durably applied up to index `i`: append a snapshot marker at `i`,
//!    await it, then [`Wal::release`]`(i + 1)` so whole segments before it are recycled.
//!
//! # Durability contract
//! An append's future resolves `Ok` only after the write carrying its records is durable. The
//! active segment is open `O_DIRECT | O_DSYNC`, so a write completes only once its data, and the
//! metadata needed to read it back, are on stable storage: a write and an fdatasync in one I/O
//! request (one executor wake-up instead of two, and no fsync handed to an io_uring worker
//! thread). Writes are issued strictly one after the other, each only after the previous one
//! completed: recovery relies on this (see `recovery.rs`). If a write fails, the WAL is poisoned: that append and every later one fail, and reopening recovers to
//! the last durable record.

pub mod record;
mod recovery;
pub mod segment;

mod log;
mod storage;
mod writer;

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::task::Waker;

use futures::channel::oneshot;
use raft::eraftpb::{Entry, HardState};

use self::log::{EntryLoc, LogState};
pub use self::record::{Metadata, RecordRef, SnapshotMarker};
use self::segment::{BLOCK, DATA_START};
pub use self::storage::WalStorage;
use crate::error::{Error, Result};

/// WAL settings.
#[derive(Debug, Clone)]
pub struct WalOptions {
    /// Size of each segment file; pre-allocated and pre-zeroed. Default 64 MiB.
    pub segment_size: u64,
    /// Largest framed record accepted. Default 8 MiB (etcd's requests are at most 1.5 MiB).
    pub max_record_size: usize,
    /// A group-commit batch stops taking new records once it holds this many bytes; later records
    /// go to the next batch. Default 4 MiB.
    pub max_batch_bytes: usize,
    /// Memory budget of the tail cache of recent entries. Default 4 MiB: what followers and the
    /// apply need next is the newest few thousand entries, and 16 MiB held about 20 MiB of peak
    /// RSS for nothing (bench/RESULTS.md, 2026-11-28, "WAL tail cache").
    pub cache_bytes: usize,
    /// Released segments kept for recycling (beyond these, they are deleted). Default 2.
    pub max_spares: usize,
    /// Metadata written into a new WAL (an existing WAL keeps its own).
    pub metadata: Metadata,
    /// Called with the duration of every group-commit durable write (for metrics: etcd's WAL
    /// fsync histogram).
    pub on_sync: Option<SyncObserver>,
    /// Fault injection for tests: awaited before every group-commit durable write; an error fails
    /// it as the OS would (and poisons the WAL), a delay stalls it like a slow disk.
    pub sync_fault: Option<SyncFault>,
}

/// A fault injected before each WAL durable write (see [`WalOptions::sync_fault`]).
#[derive(Clone)]
pub struct SyncFault(
    #[allow(clippy::type_complexity)]
    pub  std::sync::Arc<
        dyn Fn() -> std::pin::Pin<Box<dyn Future<Output = std::io::Result<()>>>> + Send + Sync,
    >,
);

impl std::fmt::Debug for SyncFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SyncFault")
    }
}

/// A callback given the duration of each WAL durable write.
#[derive(Clone)]
pub struct SyncObserver(pub std::sync::Arc<dyn Fn(std::time::Duration) + Send + Sync>);

impl std::fmt::Debug for SyncObserver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SyncObserver")
    }
}

impl Default for WalOptions {
    fn default() -> Self {
        WalOptions {
            segment_size: 64 << 20,
            max_record_size: 8 << 20,
            max_batch_bytes: 4 << 20,
            cache_bytes: 4 << 20,
            max_spares: 2,
            metadata: Metadata::default(),
            on_sync: None,
            sync_fault: None,
        }
    }
}

impl WalOptions {
    fn validate(&self) -> Result<()> {
        let min_segment = DATA_START + BLOCK + 2 * self.max_record_size as u64;
        if !self.segment_size.is_multiple_of(BLOCK) || self.segment_size < min_segment {
            return Err(Error::InvalidArgument(format!(
                "segment size {} must be a multiple of {BLOCK} and at least {min_segment} \
                 (header block plus twice the maximum record size)",
                self.segment_size
            )));
        }
        if self.segment_size > u32::MAX as u64 {
            return Err(Error::InvalidArgument(
                "segment size must be below 4 GiB".into(),
            ));
        }
        if self.max_record_size < 1024 {
            return Err(Error::InvalidArgument(
                "maximum record size must be at least 1 KiB".into(),
            ));
        }
        Ok(())
    }
}

/// What opening the WAL found.
#[derive(Debug, Clone)]
pub struct Recovery {
    /// The latest raft hard state.
    pub hard_state: HardState,
    /// The latest snapshot marker (index 0 if none).
    pub snapshot: SnapshotMarker,
    /// The WAL's metadata.
    pub metadata: Metadata,
    /// First and last index of the entries after the snapshot (`first > last` when none); read
    /// them with [`Wal::entries`] or through [`WalStorage`].
    pub first_index: u64,
    /// See `first_index`.
    pub last_index: u64,
    /// Where a torn tail was truncated, if one was.
    pub truncated: Option<(PathBuf, u64)>,
}

/// Counters of the writer, for benchmarks and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WalStats {
    /// Records made durable.
    pub records: u64,
    /// Durable writes (group-commit batches).
    pub batches: u64,
    /// Durable writes and fdatasyncs of segments (one per batch, plus one per segment cut).
    pub syncs: u64,
    /// Bytes written, block padding included.
    pub bytes_written: u64,
    /// Segments cut.
    pub segments_cut: u64,
}

/// A live segment.
#[derive(Debug)]
struct SegmentInfo {
    seq: u64,
    path: PathBuf,
    /// Read handle, opened by the writer when the segment is created (`None` before: its records
    /// are still pending and every entry in it is in the tail cache).
    file: Option<std::fs::File>,
    /// Highest entry index written into it.
    max_entry_index: u64,
    /// Its first write (the start records describing the log: metadata, hard state, snapshot
    /// marker) is durable. Until then the previous segment may not be released: it may hold the
    /// only durable copy of those records.
    start_durable: bool,
}

/// One contiguous run of encoded records destined for one segment.
#[derive(Debug)]
struct Chunk {
    seq: u64,
    /// `Some(first_index)` if the writer must create this segment first.
    create: Option<u64>,
    /// Offset in the segment where `data` goes.
    start: u64,
    data: Vec<u8>,
}

/// Records waiting to be written together, and the appends waiting on them.
#[derive(Debug)]
struct Batch {
    id: u64,
    chunks: Vec<Chunk>,
    bytes: usize,
    records: u64,
    /// Highest snapshot marker index in this batch.
    snapshot_index: Option<u64>,
    waiters: Vec<oneshot::Sender<Result<()>>>,
}

/// State shared by the [`Wal`] handle, the writer task and [`WalStorage`]. Single-threaded: all of
/// them live on the storage core's executor.
#[derive(Debug)]
struct Shared {
    dir: PathBuf,
    options: WalOptions,
    log: LogState,
    /// Live segments in sequence order, including a pending one the writer has yet to create.
    segments: VecDeque<SegmentInfo>,
    /// Segment receiving the next encoded record, and the offset there.
    tail_seq: u64,
    tail_offset: u64,
    /// Encoded batches not yet taken by the writer; appends join the last one.
    queue: VecDeque<Batch>,
    next_batch_id: u64,
    /// Index of the latest snapshot marker known durable (release may not pass it).
    durable_snapshot_index: u64,
    /// Set by the first failed write or sync; refuses all later appends.
    poisoned: Option<Error>,
    closing: bool,
    writer_waker: Option<Waker>,
    /// Spare files ready to become segments.
    spares: Vec<PathBuf>,
    next_spare: u64,
    /// Encoding buffers of written batches, kept for the next chunks: a fresh buffer per
    /// batch cost page faults (the allocator had returned its pages) and regrowth copies.
    spare_buffers: Vec<Vec<u8>>,
    stats: WalStats,
}

/// At most this many spare encoding buffers are kept ([`Shared::spare_buffers`]).
const MAX_SPARE_BUFFERS: usize = 2;
/// A buffer larger than this (a batch of large entries) is freed rather than kept.
const MAX_SPARE_BUFFER_BYTES: usize = 1 << 20;

/// The write-ahead log. Cheap to clone; all clones share one writer.
#[derive(Clone)]
pub struct Wal {
    shared: Rc<RefCell<Shared>>,
    writer: Rc<RefCell<Option<glommio::task::JoinHandle<()>>>>,
}

impl std::fmt::Debug for Wal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wal")
            .field("dir", &self.shared.borrow().dir)
            .finish()
    }
}

impl Wal {
    /// Opens (or creates) the WAL in `dir`, recovering whatever it holds. Must run on a glommio
    /// executor.
    pub async fn open(dir: impl AsRef<Path>, options: WalOptions) -> Result<(Wal, Recovery)> {
        options.validate()?;
        // Absolute: glommio opens directories relative to fd -1, not the working directory, so a
        // relative path fails with EBADF at the first segment cut.
        let dir = std::path::absolute(dir.as_ref())
            .map_err(|e| Error::io("resolving directory", dir.as_ref(), e))?;
        std::fs::create_dir_all(&dir).map_err(|e| Error::io("creating directory", &dir, e))?;
        let rec = recovery::recover(&dir, options.segment_size, options.cache_bytes).await?;
        let mut log = rec.log;
        let recovery = Recovery {
            hard_state: log.hard_state.clone(),
            snapshot: log.snapshot.clone(),
            metadata: log.metadata,
            first_index: log.first_index(),
            last_index: log.last_index(),
            truncated: rec.truncated,
        };
        let mut segments = VecDeque::new();
        for meta in rec.segments {
            let file =
                std::fs::File::open(&meta.path).map_err(|e| Error::io("opening", &meta.path, e))?;
            segments.push_back(SegmentInfo {
                seq: meta.seq,
                path: meta.path,
                file: Some(file),
                max_entry_index: meta.max_entry_index,
                start_durable: true,
            });
        }
        // A new WAL starts "full" at segment 0, so the first append cuts segment 1 (which writes
        // the metadata).
        let (tail_seq, tail_offset, writer_tail) = match (segments.back(), rec.tail) {
            (Some(last), Some(tail)) => {
                // No metadata record survived (the only segment's first write was torn).
                if log.metadata == Metadata::default() {
                    log.metadata = options.metadata;
                }
                (last.seq, tail.offset, Some((last.path.clone(), tail)))
            }
            _ => {
                log.metadata = options.metadata;
                (0, options.segment_size, None)
            }
        };
        let durable_snapshot_index = log.snapshot.index;
        let shared = Rc::new(RefCell::new(Shared {
            dir: dir.clone(),
            log,
            segments,
            tail_seq,
            tail_offset,
            queue: VecDeque::new(),
            next_batch_id: 1,
            durable_snapshot_index,
            poisoned: None,
            closing: false,
            writer_waker: None,
            spares: rec.spares,
            next_spare: rec.max_spare + 1,
            spare_buffers: Vec::new(),
            stats: WalStats::default(),
            options,
        }));
        let last_segment_empty = writer_tail
            .as_ref()
            .is_some_and(|(_, t)| t.offset == DATA_START);
        let writer = writer::Writer::start(shared.clone(), writer_tail).await?;
        let handle = glommio::spawn_local(writer.run()).detach();
        let wal = Wal {
            shared,
            writer: Rc::new(RefCell::new(Some(handle))),
        };
        if last_segment_empty {
            // A crash tore the first write of a new segment: write its start records again, so
            // that every segment describes the log's state at its start (release relies on it).
            wal.write_start_records().await?;
        }
        Ok((wal, recovery))
    }

    /// Appends `records` in order. They are validated and placed in the log immediately (so the
    /// order of calls is the order on disk, and later calls see these entries); the returned
    /// future resolves once they are durable. An empty append resolves at once: it is not a
    /// barrier for earlier appends.
    ///
    /// Refused without any effect: a record larger than `max_record_size`
    /// ([`Error::RecordTooLarge`]), entries that leave a gap ([`Error::IndexGap`]) or reach at or
    /// below the snapshot, a snapshot marker older than the current one, and any append after a
    /// failure ([`Error::Poisoned`]) or close.
    pub fn append(&self, records: &[RecordRef<'_>]) -> impl Future<Output = Result<()>> + use<> {
        let result = self.shared.borrow_mut().enqueue(records, true);
        async move {
            match result {
                Ok(Some(rx)) => rx.await.unwrap_or(Err(Error::Closed)),
                Ok(None) => Ok(()),
                Err(e) => Err(e),
            }
        }
    }

    /// Appends raft entries and, if given, the hard state, durably (one raft `Ready`).
    pub fn save(
        &self,
        entries: &[Entry],
        hard_state: Option<&HardState>,
    ) -> impl Future<Output = Result<()>> + use<> {
        let mut records: Vec<RecordRef<'_>> = entries.iter().map(RecordRef::Entry).collect();
        records.extend(hard_state.map(RecordRef::HardState));
        self.append(&records)
    }

    /// Records a hard state without asking for it to be durable now: it joins the open batch
    /// and reaches the disk with the next append that waits for durability (or at close). For
    /// raft's commit index, which need not be synced (etcd's `MustSync` is false when only the
    /// commit changes): a crash may lose it, and the leader tells it again. Returns at once.
    pub fn save_lazily(&self, hard_state: &HardState) -> Result<()> {
        self.shared
            .borrow_mut()
            .enqueue(&[RecordRef::HardState(hard_state)], false)
            .map(drop)
    }

    /// Recycles or removes every segment whose entries all lie before `index`. `index` may be at
    /// most one past the latest *durable* snapshot marker, and the segment being written is never
    /// released. Returns how many segments were released.
    pub async fn release(&self, index: u64) -> Result<usize> {
        let (victims, dir) = {
            let mut s = self.shared.borrow_mut();
            if let Some(e) = &s.poisoned {
                return Err(Error::Poisoned(e.to_string()));
            }
            if index > s.durable_snapshot_index + 1 {
                return Err(Error::InvalidArgument(format!(
                    "cannot release up to index {index}: the latest durable snapshot marker is at \
                     {}",
                    s.durable_snapshot_index
                )));
            }
            let mut victims = Vec::new();
            // A segment may go once its successor's start records are durable.
            while s.segments.len() >= 2
                && s.segments[1].start_durable
                && s.segments[0].max_entry_index < index
            {
                victims.push(s.segments.pop_front().expect("len checked"));
            }
            (victims, s.dir.clone())
        };
        // Victims are out of `segments` already: if a step fails midway, the files left behind
        // are only read again by the next open, which handles a longer prefix of segments (and
        // removes half-prepared `.tmp` files).
        let count = victims.len();
        let size = self.shared.borrow().options.segment_size;
        for victim in victims {
            drop(victim.file);
            let recycle = {
                let mut s = self.shared.borrow_mut();
                if s.spares.len() < s.options.max_spares {
                    let n = s.next_spare;
                    s.next_spare += 1;
                    Some(n)
                } else {
                    None
                }
            };
            match recycle {
                // Zeroed again: stale records must never be read as log (see `recovery.rs`).
                // Rewriting allocated blocks keeps the speed advantage of a written file.
                Some(n) => {
                    let spare = segment::prepare_spare(&dir, n, size, Some(&victim.path)).await?;
                    self.shared.borrow_mut().spares.push(spare);
                }
                None => std::fs::remove_file(&victim.path)
                    .map_err(|e| Error::io("removing", &victim.path, e))?,
            }
        }
        if count > 0 {
            segment::sync_dir(&dir).await?;
        }
        Ok(count)
    }

    async fn write_start_records(&self) -> Result<()> {
        let (metadata, hard_state, snapshot) = {
            let s = self.shared.borrow();
            (
                s.log.metadata,
                s.log.hard_state.clone(),
                s.log.snapshot.clone(),
            )
        };
        let mut records = vec![
            RecordRef::Metadata(&metadata),
            RecordRef::HardState(&hard_state),
        ];
        if snapshot.index > 0 {
            records.push(RecordRef::Snapshot(&snapshot));
        }
        self.append(&records).await
    }

    /// Entries `[low, high)`, from the tail cache or read back from their segments.
    pub fn entries(&self, low: u64, high: u64) -> Result<Vec<Entry>> {
        self.shared.borrow().read_entries(low, high, u64::MAX)
    }

    /// The raft-rs `Storage` view of this WAL.
    pub fn storage(&self) -> WalStorage {
        WalStorage::new(self.shared.clone())
    }

    /// First index after the snapshot.
    pub fn first_index(&self) -> u64 {
        self.shared.borrow().log.first_index()
    }

    /// Index of the last entry (durable or not yet).
    pub fn last_index(&self) -> u64 {
        self.shared.borrow().log.last_index()
    }

    /// The latest hard state appended.
    pub fn hard_state(&self) -> HardState {
        self.shared.borrow().log.hard_state.clone()
    }

    /// The latest snapshot marker appended.
    pub fn snapshot(&self) -> SnapshotMarker {
        self.shared.borrow().log.snapshot.clone()
    }

    /// Writer counters so far.
    pub fn stats(&self) -> WalStats {
        self.shared.borrow().stats
    }

    /// Number of live segment files and of spares, for tests and metrics.
    pub fn file_counts(&self) -> (usize, usize) {
        let s = self.shared.borrow();
        (
            s.segments.iter().filter(|x| x.file.is_some()).count(),
            s.spares.len(),
        )
    }

    /// Writes what is queued, then stops the writer. Later appends fail with [`Error::Closed`].
    pub async fn close(&self) -> Result<()> {
        {
            let mut s = self.shared.borrow_mut();
            s.closing = true;
            if let Some(w) = s.writer_waker.take() {
                w.wake();
            }
        }
        let handle = self.writer.borrow_mut().take();
        if let Some(handle) = handle {
            handle.await;
        }
        match &self.shared.borrow().poisoned {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }
}

impl Shared {
    /// Keeps the encoding buffers of a written batch's chunks for later chunks.
    fn recycle(&mut self, chunks: Vec<Chunk>) {
        for chunk in chunks {
            let mut data = chunk.data;
            if self.spare_buffers.len() < MAX_SPARE_BUFFERS
                && data.capacity() <= MAX_SPARE_BUFFER_BYTES
            {
                data.clear();
                self.spare_buffers.push(data);
            }
        }
    }

    /// Validates and encodes `records` into the open batch. Returns the receiver to await, or
    /// `None` for an empty append.
    fn enqueue(
        &mut self,
        records: &[RecordRef<'_>],
        durable: bool,
    ) -> Result<Option<oneshot::Receiver<Result<()>>>> {
        if let Some(e) = &self.poisoned {
            return Err(Error::Poisoned(e.to_string()));
        }
        if self.closing {
            return Err(Error::Closed);
        }
        if records.is_empty() {
            return Ok(None);
        }
        let mut seen_marker = false;
        for r in records {
            let size = record::framed_len(r.payload_len());
            if size > self.options.max_record_size {
                return Err(Error::RecordTooLarge {
                    size,
                    max: self.options.max_record_size,
                });
            }
            match r {
                RecordRef::Snapshot(m) => {
                    if m.index < self.log.snapshot.index || m.index == u64::MAX {
                        return Err(Error::InvalidArgument(format!(
                            "snapshot marker at index {} is older than the current one at {} \
                             (or out of range)",
                            m.index, self.log.snapshot.index
                        )));
                    }
                    seen_marker = true;
                }
                RecordRef::Entry(e) => {
                    // Entries are validated against the log before this call's marker applies.
                    if seen_marker {
                        return Err(Error::InvalidArgument(
                            "entries must come before a snapshot marker in one append".into(),
                        ));
                    }
                    if e.index == 0 || e.index == u64::MAX {
                        return Err(Error::InvalidArgument(format!(
                            "entry index {} is out of range",
                            e.index
                        )));
                    }
                }
                _ => {}
            }
        }
        self.log
            .check_append(records.iter().filter_map(|r| match r {
                RecordRef::Entry(e) => Some(e.index),
                _ => None,
            }))?;

        let needs_new_batch = self
            .queue
            .back()
            .is_none_or(|b| b.bytes >= self.options.max_batch_bytes);
        if needs_new_batch {
            let id = self.next_batch_id;
            self.next_batch_id += 1;
            self.queue.push_back(Batch {
                id,
                chunks: Vec::new(),
                bytes: 0,
                records: 0,
                snapshot_index: None,
                waiters: Vec::new(),
            });
        }
        for r in records {
            self.encode(*r);
        }
        if !durable {
            // Written with the next batch someone waits for; the writer is not woken for it.
            return Ok(None);
        }
        let (tx, rx) = oneshot::channel();
        self.queue
            .back_mut()
            .expect("pushed above")
            .waiters
            .push(tx);
        if let Some(w) = self.writer_waker.take() {
            w.wake();
        }
        Ok(Some(rx))
    }

    /// Encodes one validated record into the open batch and applies it to the logical log.
    fn encode(&mut self, r: RecordRef<'_>) {
        let size = record::framed_len(r.payload_len()) as u64;
        if self.tail_offset + size > self.options.segment_size {
            self.cut();
        }
        let batch = self.queue.back_mut().expect("open batch");
        let seq = self.tail_seq;
        if batch.chunks.last().is_none_or(|c| c.seq != seq) {
            batch.chunks.push(Chunk {
                seq,
                create: None,
                start: self.tail_offset,
                data: self.spare_buffers.pop().unwrap_or_default(),
            });
        }
        let chunk = batch.chunks.last_mut().expect("pushed above");
        let offset = chunk.start + chunk.data.len() as u64;
        debug_assert_eq!(offset, self.tail_offset);
        r.encode(segment::salt(seq), chunk.start as u32, &mut chunk.data);
        self.tail_offset += size;
        batch.bytes += size as usize;
        batch.records += 1;
        match r {
            RecordRef::Entry(e) => {
                let loc = EntryLoc {
                    term: e.term,
                    seq,
                    offset: offset + record::HEADER_LEN as u64,
                    len: r.payload_len() as u32,
                    batch: batch.id,
                };
                self.log.append(Some(e.clone()), e.index, loc);
                let info = self
                    .segments
                    .back_mut()
                    .expect("a segment receives the record");
                info.max_entry_index = info.max_entry_index.max(e.index);
            }
            RecordRef::HardState(h) => self.log.hard_state = h.clone(),
            RecordRef::Snapshot(m) => {
                batch.snapshot_index = Some(m.index);
                self.log.apply_snapshot(m.clone());
            }
            RecordRef::Metadata(m) => self.log.metadata = *m,
        }
    }

    /// Starts a new segment for the open batch, beginning with the records that make each
    /// segment self-describing: metadata, hard state and the snapshot marker.
    fn cut(&mut self) {
        self.tail_seq += 1;
        self.tail_offset = DATA_START;
        let first_index = self.log.last_index() + 1;
        self.segments.push_back(SegmentInfo {
            seq: self.tail_seq,
            path: self
                .dir
                .join(segment::segment_name(self.tail_seq, first_index)),
            file: None,
            max_entry_index: 0,
            start_durable: false,
        });
        let batch = self.queue.back_mut().expect("open batch");
        batch.chunks.push(Chunk {
            seq: self.tail_seq,
            create: Some(first_index),
            start: DATA_START,
            data: self.spare_buffers.pop().unwrap_or_default(),
        });
        let metadata = self.log.metadata;
        let hard_state = self.log.hard_state.clone();
        let snapshot = self.log.snapshot.clone();
        self.encode(RecordRef::Metadata(&metadata));
        self.encode(RecordRef::HardState(&hard_state));
        if snapshot.index > 0 {
            self.encode(RecordRef::Snapshot(&snapshot));
        }
    }

    /// Entries `[low, high)`, stopping once `max_bytes` is exceeded (at least one is returned).
    fn read_entries(&self, low: u64, high: u64, max_bytes: u64) -> Result<Vec<Entry>> {
        if low < self.log.first_index() || high > self.log.last_index() + 1 || low > high {
            return Err(Error::InvalidArgument(format!(
                "entries [{low}, {high}) are outside the log [{}, {}]",
                self.log.first_index(),
                self.log.last_index()
            )));
        }
        // `high` may lie far beyond what `max_bytes` lets through (a follower catching up).
        let mut out = Vec::with_capacity((high - low).min(1024) as usize);
        let mut bytes = 0u64;
        for index in low..high {
            let entry = match self.log.cached(index) {
                Some(e) => e.clone(),
                None => self.read_entry(index)?,
            };
            bytes += (entry.data.len() + entry.context.len()) as u64;
            if !out.is_empty() && bytes > max_bytes {
                break;
            }
            out.push(entry);
        }
        Ok(out)
    }

    fn read_entry(&self, index: u64) -> Result<Entry> {
        use std::os::unix::fs::FileExt;
        let loc = *self.log.loc(index).expect("index checked by caller");
        let first_seq = self.segments.front().map_or(0, |s| s.seq);
        let seg = loc
            .seq
            .checked_sub(first_seq)
            .and_then(|i| self.segments.get(i as usize))
            .filter(|s| s.seq == loc.seq);
        let Some(SegmentInfo {
            path,
            file: Some(file),
            ..
        }) = seg
        else {
            return Err(Error::InvalidArgument(format!(
                "entry {index} lies in segment {} which is not open",
                loc.seq
            )));
        };
        // Read the whole frame back so its checksum is verified again.
        let header_at = loc.offset - record::HEADER_LEN as u64;
        let mut frame = vec![0u8; record::HEADER_LEN + loc.len as usize];
        file.read_exact_at(&mut frame, header_at)
            .map_err(|e| Error::io("reading", path, e))?;
        if !record::frame_checksum_ok(&frame) {
            return Err(Error::corruption(
                path,
                header_at,
                "checksum mismatch reading an entry back",
            ));
        }
        let entry = record::decode_entry(&frame[record::HEADER_LEN..])
            .map_err(|why| Error::corruption(path, header_at, why))?;
        if entry.index != index || entry.term != loc.term {
            return Err(Error::corruption(
                path,
                loc.offset,
                format!(
                    "expected entry {index} term {}, found {} term {}",
                    loc.term, entry.index, entry.term
                ),
            ));
        }
        Ok(entry)
    }
}
