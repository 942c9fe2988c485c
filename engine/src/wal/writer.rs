//! The group-commit writer: one task that turns queued batches into one durable write each (the
//! active segment is open `O_DSYNC`: see the durability contract in `mod.rs`).
//!
//! Appends encode their records into the open batch (`Shared::queue`) synchronously and wake this
//! task. The task takes the oldest batch, writes it, and only once the write is durable takes the
//! next one: everything appended while a write is in flight lands in the next batch. This is the
//! whole group-commit mechanism, and the "one write at a time" rule recovery depends on.
//!
//! Writes are O_DIRECT in whole 4 KiB blocks. A batch rarely ends on a block boundary, so the next
//! write starts at the beginning of that last partial block and rewrites its earlier bytes
//! unchanged (`partial_block`): sector writes are atomic, and a sector rewritten with identical
//! bytes cannot lose what it held.

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::path::PathBuf;
use std::rc::Rc;
use std::task::Poll;

use glommio::io::DmaFile;

use super::recovery::Tail;
use super::segment::{self, BLOCK, DATA_START};
use super::{Batch, Chunk, Shared};
use crate::error::{Error, Result};

/// The active segment as the writer sees it.
struct Active {
    seq: u64,
    path: PathBuf,
    file: DmaFile,
    /// Bytes of the block holding the end of the data, from that block's start to the end.
    partial_block: Vec<u8>,
    /// Offset of the end of the data written so far.
    end: u64,
}

pub(super) struct Writer {
    shared: Rc<RefCell<Shared>>,
    active: Option<Active>,
    /// A spare being prepared in the background, if any (it adds itself to `Shared::spares`).
    preparing: Option<glommio::task::JoinHandle<()>>,
    /// True while that task runs.
    preparing_now: Rc<Cell<bool>>,
    /// When preparing a spare last failed: the next try waits [`SPARE_RETRY`] (a full disk
    /// would otherwise see a 64 MiB file allocated and removed after every write).
    spare_failed_at: Rc<Cell<Option<std::time::Instant>>>,
}

/// How long after a failed spare preparation the next one starts, at the earliest.
const SPARE_RETRY: std::time::Duration = std::time::Duration::from_secs(5);

impl Writer {
    /// Opens the last segment for writing (if the WAL has one) and starts preparing a spare.
    pub(super) async fn start(
        shared: Rc<RefCell<Shared>>,
        tail: Option<(PathBuf, Tail)>,
    ) -> Result<Writer> {
        let active = match tail {
            Some((path, tail)) => {
                let file = segment::open_dma_dsync(&path).await?;
                let seq = shared.borrow().tail_seq;
                Some(Active {
                    seq,
                    path,
                    file,
                    partial_block: tail.partial_block,
                    end: tail.offset,
                })
            }
            None => None,
        };
        let mut writer = Writer {
            shared,
            active,
            preparing: None,
            preparing_now: Rc::new(Cell::new(false)),
            spare_failed_at: Rc::new(Cell::new(None)),
        };
        writer.maybe_prepare_spare();
        Ok(writer)
    }

    /// The task body: write batches until closed.
    pub(super) async fn run(mut self) {
        while let Some(batch) = self.next_batch().await {
            let id = batch.id;
            let result = self.write_batch(&batch).await;
            let mut s = self.shared.borrow_mut();
            match result {
                Ok(()) => {
                    s.log.durable_batch = id;
                    s.log.evict();
                    if let Some(index) = batch.snapshot_index {
                        s.durable_snapshot_index = s.durable_snapshot_index.max(index);
                    }
                    s.stats.batches += 1;
                    s.stats.records += batch.records;
                    s.recycle(batch.chunks);
                    drop(s);
                    for w in batch.waiters {
                        let _ = w.send(Ok(()));
                    }
                    self.maybe_prepare_spare();
                }
                Err(e) => {
                    tracing::error!(error = %e, "WAL write failed; refusing further appends");
                    s.poisoned = Some(e.clone());
                    let failed: Vec<Batch> = s.queue.drain(..).collect();
                    drop(s);
                    for w in batch
                        .waiters
                        .into_iter()
                        .chain(failed.into_iter().flat_map(|b| b.waiters))
                    {
                        let _ = w.send(Err(e.clone()));
                    }
                    break;
                }
            }
        }
        if let Some(active) = self.active.take() {
            let _ = active.file.close().await;
        }
        if let Some(task) = self.preparing.take() {
            task.await;
        }
    }

    /// Waits for a batch; `None` once closing with nothing queued.
    async fn next_batch(&self) -> Option<Batch> {
        poll_fn(|cx| {
            let mut s = self.shared.borrow_mut();
            // A batch of lazy records only (`Wal::save_lazily`) waits for one that someone
            // waits on (which joins it, or queues behind it), or for the close.
            let wanted = s
                .queue
                .front()
                .is_some_and(|b| !b.waiters.is_empty() || s.queue.len() > 1 || s.closing);
            if wanted && let Some(batch) = s.queue.pop_front() {
                return Poll::Ready(Some(batch));
            }
            if s.closing || s.poisoned.is_some() {
                return Poll::Ready(None);
            }
            s.writer_waker = Some(cx.waker().clone());
            Poll::Pending
        })
        .await
    }

    async fn write_batch(&mut self, batch: &Batch) -> Result<()> {
        for chunk in &batch.chunks {
            if let Some(first_index) = chunk.create {
                self.create_segment(chunk.seq, first_index).await?;
            }
            self.write_chunk(chunk).await?;
            if chunk.create.is_some() {
                let mut s = self.shared.borrow_mut();
                let info = s
                    .segments
                    .iter_mut()
                    .find(|i| i.seq == chunk.seq)
                    .expect("registered");
                info.start_durable = true;
            }
        }
        Ok(())
    }

    async fn write_chunk(&mut self, chunk: &Chunk) -> Result<()> {
        let active = self
            .active
            .as_mut()
            .expect("a segment exists before its first chunk");
        assert_eq!(active.seq, chunk.seq, "chunks arrive in segment order");
        assert_eq!(active.end, chunk.start, "chunks continue the segment");
        let write_pos = chunk.start - chunk.start % BLOCK;
        let end = chunk.start + chunk.data.len() as u64;
        let len = (end.next_multiple_of(BLOCK) - write_pos) as usize;
        let mut buf = active.file.alloc_dma_buffer(len);
        let bytes = buf.as_bytes_mut();
        let prefix = active.partial_block.len();
        debug_assert_eq!(prefix as u64, chunk.start - write_pos);
        bytes[..prefix].copy_from_slice(&active.partial_block);
        bytes[prefix..prefix + chunk.data.len()].copy_from_slice(&chunk.data);
        bytes[prefix + chunk.data.len()..].fill(0);
        let started = std::time::Instant::now();
        let fault = self.shared.borrow().options.sync_fault.clone();
        if let Some(fault) = fault {
            (fault.0)()
                .await
                .map_err(|e| Error::io("fdatasync", &active.path, e))?;
        }
        // The segment is open `O_DSYNC`: the write returns once durable (write + fdatasync).
        segment::write_all(&active.file, &active.path, buf, write_pos).await?;
        let observer = self.shared.borrow().options.on_sync.clone();
        if let Some(observe) = observer {
            (observe.0)(started.elapsed());
        }
        // Remember the bytes of the block holding the new end, for the next write to rewrite.
        let tail_start = end - end % BLOCK;
        if tail_start >= chunk.start {
            active.partial_block.clear();
            active
                .partial_block
                .extend_from_slice(&chunk.data[(tail_start - chunk.start) as usize..]);
        } else {
            // The chunk ended in the block it started in: the old prefix stays part of it.
            active.partial_block.extend_from_slice(&chunk.data);
        }
        active.end = end;
        let mut s = self.shared.borrow_mut();
        s.stats.syncs += 1;
        s.stats.bytes_written += len as u64;
        Ok(())
    }

    /// Turns a spare into segment `seq`: header written and synced, then renamed into place.
    async fn create_segment(&mut self, seq: u64, first_index: u64) -> Result<()> {
        let spare = self.take_spare().await?;
        let (dir, size, path) = {
            let s = self.shared.borrow();
            (
                s.dir.clone(),
                s.options.segment_size,
                s.dir.join(segment::segment_name(seq, first_index)),
            )
        };
        let file = segment::open_dma_dsync(&spare).await?;
        let mut header = vec![0u8; DATA_START as usize];
        segment::encode_header(&mut header, seq, first_index, size);
        segment::write_block_aligned(&file, &spare, &header, 0).await?;
        segment::fdatasync(&file, &spare).await?;
        std::fs::rename(&spare, &path).map_err(|e| Error::io("renaming", &spare, e))?;
        segment::sync_dir(&dir).await?;
        let reader = std::fs::File::open(&path).map_err(|e| Error::io("opening", &path, e))?;
        if let Some(old) = self.active.take() {
            let _ = old.file.close().await;
        }
        self.active = Some(Active {
            seq,
            path: path.clone(),
            file,
            partial_block: Vec::new(),
            end: DATA_START,
        });
        let mut s = self.shared.borrow_mut();
        let info = s
            .segments
            .iter_mut()
            .find(|i| i.seq == seq)
            .expect("cut registered it");
        debug_assert_eq!(info.path, path);
        info.file = Some(reader);
        s.stats.syncs += 1;
        s.stats.segments_cut += 1;
        Ok(())
    }

    /// A spare file: a ready one, the one being prepared, or one prepared now.
    async fn take_spare(&mut self) -> Result<PathBuf> {
        if let Some(spare) = self.shared.borrow_mut().spares.pop() {
            return Ok(spare);
        }
        if let Some(task) = self.preparing.take() {
            task.await;
            if let Some(spare) = self.shared.borrow_mut().spares.pop() {
                return Ok(spare);
            }
        }
        let (dir, n, size) = self.next_spare_params();
        segment::prepare_spare(&dir, n, size, None).await
    }

    fn next_spare_params(&self) -> (PathBuf, u64, u64) {
        let mut s = self.shared.borrow_mut();
        let n = s.next_spare;
        s.next_spare += 1;
        (s.dir.clone(), n, s.options.segment_size)
    }

    /// Starts preparing a spare in the background when none is ready, so cutting a segment does
    /// not wait for 64 MiB of zeroes. The task adds the spare to the pool itself; a failure (disk
    /// full) is logged here and surfaces as an error only if a cut then needs the spare.
    fn maybe_prepare_spare(&mut self) {
        if self.preparing_now.get() || !self.shared.borrow().spares.is_empty() {
            return;
        }
        if self
            .spare_failed_at
            .get()
            .is_some_and(|at| at.elapsed() < SPARE_RETRY)
        {
            return;
        }
        let (dir, n, size) = self.next_spare_params();
        let shared = self.shared.clone();
        let preparing_now = self.preparing_now.clone();
        let failed_at = self.spare_failed_at.clone();
        preparing_now.set(true);
        let task = glommio::spawn_local(async move {
            match segment::prepare_spare(&dir, n, size, None).await {
                Ok(path) => {
                    failed_at.set(None);
                    shared.borrow_mut().spares.push(path);
                }
                Err(e) => {
                    failed_at.set(Some(std::time::Instant::now()));
                    tracing::warn!(error = %e, "preparing a spare WAL segment failed");
                }
            }
            preparing_now.set(false);
        });
        self.preparing = Some(task.detach());
    }
}
