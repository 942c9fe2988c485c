//! Fault injection for tests, from environment variables that are inert unless set. They let the
//! end-to-end tests show what a slow or failing disk does to a real `keel` process:
//!
//! - `KEEL_FAULT_WAL_SYNC_DELAY` (a Go duration, e.g. `500ms`): every WAL fdatasync takes this
//!   much longer, as on a stalling disk. The storage core keeps running meanwhile (the delay is a
//!   timer on its executor, like the fdatasync itself).
//! - `KEEL_FAULT_WAL_SYNC_DELAY_FILE` (a path): the same delay, read from that file before each
//!   fdatasync (a Go duration; no file or an empty one: no delay), so a test can stall a running
//!   member's disk and release it.
//! - `KEEL_FAULT_WAL_SYNC_FAIL_AFTER` (a count `n`): the WAL fdatasyncs after the first `n` fail
//!   with EIO, as a dying disk's would.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use keel_engine::wal::SyncFault;

use crate::config::parse_go_duration;

/// The faults to inject.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Faults {
    pub wal_sync_delay: Option<Duration>,
    pub wal_sync_delay_file: Option<std::path::PathBuf>,
    pub wal_sync_fail_after: Option<u64>,
}

impl Faults {
    /// The faults the environment asks for (none normally). A malformed value is ignored with a
    /// warning: these variables are test hooks, not configuration.
    pub fn from_env() -> Faults {
        let mut f = Faults::default();
        if let Ok(v) = std::env::var("KEEL_FAULT_WAL_SYNC_DELAY") {
            f.wal_sync_delay = parse_go_duration(&v);
            if f.wal_sync_delay.is_none() {
                tracing::warn!(value = %v, "ignoring KEEL_FAULT_WAL_SYNC_DELAY: not a duration");
            }
        }
        if let Ok(v) = std::env::var("KEEL_FAULT_WAL_SYNC_DELAY_FILE") {
            f.wal_sync_delay_file = Some(v.into());
        }
        if let Ok(v) = std::env::var("KEEL_FAULT_WAL_SYNC_FAIL_AFTER") {
            f.wal_sync_fail_after = v.parse().ok();
            if f.wal_sync_fail_after.is_none() {
                tracing::warn!(value = %v, "ignoring KEEL_FAULT_WAL_SYNC_FAIL_AFTER: not a count");
            }
        }
        if f != Faults::default() {
            tracing::warn!(faults = ?f, "fault injection is on (test hooks)");
        }
        f
    }

    /// The WAL's hook, if any fault concerns it.
    pub fn wal_sync_fault(&self) -> Option<SyncFault> {
        if *self == Faults::default() {
            return None;
        }
        let delay = self.wal_sync_delay;
        let delay_file = self.wal_sync_delay_file.clone();
        let fail_after = self.wal_sync_fail_after;
        let syncs = Arc::new(AtomicU64::new(0));
        Some(SyncFault(Arc::new(move || {
            let n = syncs.fetch_add(1, Ordering::Relaxed);
            let from_file = delay_file.as_ref().and_then(|p| {
                std::fs::read_to_string(p)
                    .ok()
                    .and_then(|v| parse_go_duration(v.trim()))
            });
            Box::pin(async move {
                if let Some(d) = delay.or(from_file) {
                    glommio::timer::sleep(d).await;
                }
                match fail_after {
                    Some(limit) if n >= limit => Err(std::io::Error::from_raw_os_error(libc::EIO)),
                    _ => Ok(()),
                }
            })
        })))
    }
}
