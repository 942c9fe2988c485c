//! `mvcc put`: the engine's MVCC store directly, no network (etcd's `benchmark mvcc put`). Each
//! request is one write transaction of `--txn-ops` puts (one revision), committed to the backend;
//! a backend sync closes the run, and its time counts in the total.

use std::time::{Instant, SystemTime};

use keel_engine::mvcc::Store;
use keel_engine::mvcc::apply::{self, PutRequest};

use crate::report::Recorder;
use crate::workloads::{key, value};

/// Settings of `mvcc put`.
#[derive(Debug, Clone)]
pub struct MvccPut {
    pub total: u64,
    pub key_size: usize,
    pub val_size: usize,
    pub txn_ops: u64,
    pub sample: bool,
}

/// Runs it in a temporary directory under `dir`; returns the recorder and the wall time.
pub fn put(o: &MvccPut, dir: &std::path::Path) -> anyhow::Result<(Recorder, std::time::Duration)> {
    let tmp = tempfile::tempdir_in(dir)?;
    let store = Store::open(tmp.path().join("db"), Default::default())?;
    let v = value(o.val_size);
    let mut rec = Recorder::new(o.sample);
    let start = Instant::now();
    for i in 0..o.total {
        let (began, t) = (SystemTime::now(), Instant::now());
        let mut w = store.write()?;
        for j in 0..o.txn_ops.max(1) {
            let r = PutRequest {
                key: key(i * o.txn_ops.max(1) + j, o.key_size),
                value: v.clone(),
                ..Default::default()
            };
            if let Err(e) = apply::put(&mut w, &r, &apply::NoLeases) {
                rec.error(e.to_string());
            }
        }
        w.finish_revision();
        match w.end(None) {
            Ok(_) => rec.success(began, t.elapsed()),
            Err(e) => rec.error(e.to_string()),
        }
    }
    store.sync()?;
    Ok((rec, start.elapsed()))
}
