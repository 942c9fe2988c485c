//! `Maintenance.Snapshot`: the backend as etcd 3.4 streams it, a bbolt file followed by its
//! sha256, so that `etcdctl snapshot save`, `status` and `restore` (and etcd itself, after a
//! restore) take a snapshot of a keel member.
//!
//! # Stream format (etcd's `v3rpc/maintenance.go`)
//! `SnapshotResponse { remaining_bytes, blob }` messages with 32 KiB blobs of the file, then one
//! message whose blob is the 32-byte sha256 of every byte before it (`remaining_bytes` 0).
//!
//! The file is written from one pinned backend version (`keel_engine::btree::bbolt`) on a
//! blocking thread: writes go on meanwhile; memory holds the first key of each leaf and four
//! chunks in flight, never the data; the plan (a first pass over the data) gives the size up
//! front. A client that goes away stops the writer at its next chunk.

use std::io::Write;
use std::pin::Pin;

use futures::Stream;
use keel_engine::btree::bbolt::Plan;
use keel_proto::etcdserverpb as pb;
use tokio::sync::mpsc;
use tonic::Status;

use super::convert::status;
use crate::raft::Core;

/// Bytes per message (etcd's `snapshotSendBufferSize`).
pub const CHUNK: usize = 32 * 1024;
/// Snapshots streamed at once (Keel's limit; etcd has none): each reads the whole backend and
/// pins a version whose freed pages cannot be reused until it ends, so a client opening many
/// must not take the disk and the file's space. One more is refused with `ResourceExhausted`.
pub const MAX_SNAPSHOTS: usize = 4;

/// Snapshots in progress.
static IN_PROGRESS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// One snapshot's place among [`MAX_SNAPSHOTS`], given back when dropped.
struct Slot;

impl Slot {
    fn take() -> Option<Slot> {
        use std::sync::atomic::Ordering;
        IN_PROGRESS
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_SNAPSHOTS).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        IN_PROGRESS.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}
/// Messages buffered toward a slow client.
const IN_FLIGHT: usize = 4;

pub type SnapshotStream = Pin<Box<dyn Stream<Item = Result<pb::SnapshotResponse, Status>> + Send>>;

/// Sends what is written as chunks, hashing it.
struct Chunks {
    tx: mpsc::Sender<Result<pb::SnapshotResponse, Status>>,
    buf: Vec<u8>,
    sha: ring::digest::Context,
    remaining: u64,
}

impl Chunks {
    fn send(&mut self) -> std::io::Result<()> {
        let blob = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        self.sha.update(&blob);
        self.remaining = self.remaining.saturating_sub(blob.len() as u64);
        self.tx
            .blocking_send(Ok(pb::SnapshotResponse {
                header: None,
                remaining_bytes: self.remaining,
                blob,
                ..Default::default()
            }))
            .map_err(|_| std::io::Error::other("the client went away"))
    }
}

impl Write for Chunks {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let n = data.len().min(CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == CHUNK {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if !self.buf.is_empty() {
            self.send()?;
        }
        Ok(())
    }
}

/// The stream of a snapshot of `core`'s backend now, or `ResourceExhausted` when
/// [`MAX_SNAPSHOTS`] are being sent already.
pub fn stream(core: &Core) -> Result<SnapshotStream, Status> {
    let slot = Slot::take().ok_or_else(|| {
        Status::resource_exhausted(format!(
            "etcdserver: too many snapshots in progress (the limit is {MAX_SNAPSHOTS})"
        ))
    })?;
    let store = core.store();
    let (tx, mut rx) = mpsc::channel(IN_FLIGHT);
    tokio::task::spawn_blocking(move || {
        let _slot = slot;
        let started = std::time::Instant::now();
        let txn = store.backend().begin_read();
        let result = Plan::new(&txn).and_then(|plan| {
            let mut out = Chunks {
                tx: tx.clone(),
                buf: Vec::with_capacity(CHUNK),
                sha: ring::digest::Context::new(&ring::digest::SHA256),
                remaining: plan.size(),
            };
            let size = plan.write(&txn, &mut out)?;
            out.flush()
                .map_err(|e| keel_engine::Error::io("sending a snapshot", "<stream>", e))?;
            let sha = out.sha.finish();
            let _ = tx.blocking_send(Ok(pb::SnapshotResponse {
                header: None,
                remaining_bytes: 0,
                blob: sha.as_ref().to_vec(),
                ..Default::default()
            }));
            Ok(size)
        });
        match result {
            Ok(size) => tracing::info!(
                bytes = size,
                took = ?started.elapsed(),
                "sent a database snapshot to a client"
            ),
            Err(e) => {
                tracing::warn!(error = %e, "failed to send a database snapshot");
                let _ = tx.blocking_send(Err(status(&e)));
            }
        }
    });
    Ok(Box::pin(futures::stream::poll_fn(move |cx| {
        rx.poll_recv(cx)
    })))
}

#[cfg(test)]
mod tests {
    #[test]
    fn slots_are_bounded_and_given_back() {
        let taken: Vec<_> = (0..super::MAX_SNAPSHOTS)
            .map(|_| super::Slot::take().expect("a free slot"))
            .collect();
        assert!(super::Slot::take().is_none());
        drop(taken);
        assert!(super::Slot::take().is_some());
    }
}
