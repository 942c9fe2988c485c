//! Backend checkpoints off the storage core: the backend's two fdatasyncs run on a thread of
//! their own (`keel-sync`), so the core keeps ticking, sending heartbeats and applying while a
//! slow disk syncs. The backend lets commits continue during a sync (see
//! `keel_engine::btree::Backend::sync`).

use std::sync::Arc;
use std::time::Instant;

use futures::channel::oneshot;
use keel_engine::mvcc::Store;
use keel_engine::{Error, Result};

use crate::metrics::Metrics;

struct Job {
    store: Arc<Store>,
    reply: oneshot::Sender<Result<(u64, u64)>>,
}

/// The sync thread's handle. Dropping it ends the thread once its job is done.
#[derive(Debug)]
pub struct Checkpointer {
    tx: std::sync::mpsc::Sender<Job>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Job")
    }
}

impl Checkpointer {
    /// Starts the sync thread; each sync's duration goes to `etcd_disk_backend_commit_duration_seconds`.
    pub fn start(metrics: Arc<Metrics>) -> Result<Checkpointer> {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("keel-sync".into())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    let started = Instant::now();
                    let result = job.store.sync();
                    Metrics::observe(&metrics.backend_commit, started.elapsed());
                    let _ = job.reply.send(result);
                }
            })
            .map_err(|e| Error::io("starting thread", "keel-sync", e))?;
        Ok(Checkpointer { tx })
    }

    /// Makes everything `store` has committed durable; resolves to the applied (index, term)
    /// now durable (at least).
    pub fn sync(&self, store: Arc<Store>) -> oneshot::Receiver<Result<(u64, u64)>> {
        let (reply, rx) = oneshot::channel();
        // If the thread is gone, `reply` is dropped with the job and the receiver sees it.
        let _ = self.tx.send(Job { store, reply });
        rx
    }
}
