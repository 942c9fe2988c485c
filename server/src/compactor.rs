//! Auto compaction (`--auto-compaction-mode`, `--auto-compaction-retention`) as etcd 3.4 does it.
//!
//! - **periodic** with period `p`: the current revision is sampled every `min(p, 1h) / 10`,
//!   keeping the samples of the last `p`. Once `p` has passed since the start, the member compacts
//!   to the oldest sample (the revision of about `p` ago), then again every `min(p, 1h)`; a failed
//!   compaction is retried at the next sample.
//! - **revision** with retention `n`: every 5 minutes, compact to `current - n` unless that is not
//!   positive or was already compacted to.
//!
//! Only the leader compacts (etcd pauses a follower's compactor): a follower goes on sampling, so
//! that the member elected next compacts to the revision of one period ago at once.
//!
//! [`Compactor`] is the clock-free decision logic (tested with simulated time); [`run`] drives it
//! on the network runtime and proposes the compactions through raft like a client's.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use keel_engine::Error;

use crate::config::AutoCompaction;
use crate::raft::{Core, Request};

/// How often revision mode checks (etcd's `revInterval`).
pub const REVISION_INTERVAL: Duration = Duration::from_secs(300);
const HOUR: Duration = Duration::from_secs(3600);

/// The auto compaction decisions.
#[derive(Debug)]
pub struct Compactor {
    mode: AutoCompaction,
    /// Periodic: the sampled revisions, oldest first.
    revs: VecDeque<i64>,
    last_success: Instant,
    /// Periodic: the time to wait since the last success (the period at first, then the
    /// compaction interval).
    base: Duration,
    /// Revision: the last revision compacted to.
    prev: i64,
}

impl Compactor {
    /// A compactor started at `now` with the store at `revision`; `None` when disabled.
    pub fn new(mode: AutoCompaction, now: Instant, revision: i64) -> Option<Compactor> {
        let base = match mode {
            AutoCompaction::Off => return None,
            AutoCompaction::Periodic(p) if p.is_zero() => return None,
            AutoCompaction::Revision(0) => return None,
            AutoCompaction::Periodic(p) => p,
            AutoCompaction::Revision(_) => REVISION_INTERVAL,
        };
        let mut c = Compactor {
            mode,
            revs: VecDeque::new(),
            last_success: now,
            base,
            prev: 0,
        };
        c.record(revision);
        Some(c)
    }

    /// Time between two [`tick`](Self::tick)s.
    pub fn interval(&self) -> Duration {
        match self.mode {
            AutoCompaction::Periodic(p) => p.min(HOUR) / 10,
            _ => REVISION_INTERVAL,
        }
    }

    /// Called every [`interval`](Self::interval) with the store's current revision: the revision
    /// to compact to now, if any. Report the outcome with [`compacted`](Self::compacted).
    pub fn tick(&mut self, now: Instant, current: i64) -> Option<i64> {
        let due = match self.mode {
            AutoCompaction::Periodic(p) => {
                if now.duration_since(self.last_success) < self.base {
                    None
                } else {
                    self.base = p.min(HOUR);
                    self.revs.front().copied()
                }
            }
            AutoCompaction::Revision(n) => {
                let rev = current.saturating_sub(i64::try_from(n).unwrap_or(i64::MAX));
                (rev > 0 && rev != self.prev).then_some(rev)
            }
            AutoCompaction::Off => None,
        };
        self.record(current);
        due
    }

    /// The outcome of compacting to `revision`: done (or already compacted), or failed.
    pub fn compacted(&mut self, now: Instant, revision: i64, done: bool) {
        if done {
            self.last_success = now;
            self.prev = revision;
        }
    }

    /// A tick while paused (not the leader): the revision is sampled, nothing compacted.
    pub fn paused_tick(&mut self, current: i64) {
        self.record(current);
    }

    fn record(&mut self, revision: i64) {
        if let AutoCompaction::Periodic(p) = self.mode {
            self.revs.push_back(revision);
            let keep = (p.as_nanos() / self.interval().as_nanos().max(1)) as usize + 1;
            while self.revs.len() > keep {
                self.revs.pop_front();
            }
        }
    }
}

/// Runs auto compaction for `core` until the runtime stops.
pub async fn run(core: Core, mode: AutoCompaction) {
    let Some(mut c) = Compactor::new(mode, Instant::now(), core.store().current_revision()) else {
        return;
    };
    loop {
        tokio::time::sleep(c.interval()).await;
        let current = core.store().current_revision();
        if !core.is_leader() {
            c.paused_tick(current);
            continue;
        }
        let Some(revision) = c.tick(Instant::now(), current) else {
            continue;
        };
        tracing::info!(revision, ?mode, "starting auto compaction");
        let request = Request::Compaction(keel_proto::etcdserverpb::CompactionRequest {
            revision,
            physical: false,
        });
        let done = match core.write(request).await {
            Ok(_) | Err(Error::Compacted) => true,
            Err(e) => {
                tracing::warn!(revision, error = %e, "auto compaction failed");
                false
            }
        };
        c.compacted(Instant::now(), revision, done);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Drives a compactor for `ticks` intervals with the revision growing by `per_tick`,
    /// compactions always succeeding; returns (tick number, revision compacted to).
    fn simulate(mode: AutoCompaction, ticks: u32, per_tick: i64) -> Vec<(u32, i64)> {
        let t0 = Instant::now();
        let mut rev = 1;
        let mut c = Compactor::new(mode, t0, rev).unwrap();
        let step = c.interval();
        let mut out = Vec::new();
        for i in 1..=ticks {
            rev += per_tick;
            let now = t0 + step * i;
            if let Some(r) = c.tick(now, rev) {
                out.push((i, r));
                c.compacted(now, r, true);
            }
        }
        out
    }

    #[test]
    fn periodic_compacts_to_the_revision_of_one_period_ago() {
        // 10 s period: samples every second; first compaction after 10 s to the revision of
        // 10 s before, then every 10 s.
        let out = simulate(AutoCompaction::Periodic(Duration::from_secs(10)), 35, 100);
        assert_eq!(out, vec![(10, 1), (20, 901), (30, 1901)]);
    }

    #[test]
    fn periodic_over_an_hour_compacts_hourly_with_the_whole_window() {
        // 2 h period: samples every 6 min; first compaction at 2 h, then hourly, each to the
        // revision of 2 h before.
        let out = simulate(AutoCompaction::Periodic(Duration::from_secs(7200)), 45, 1);
        assert_eq!(out, vec![(20, 1), (30, 10), (40, 20)]);
    }

    #[test]
    fn periodic_retries_a_failed_compaction_at_the_next_sample() {
        let t0 = Instant::now();
        let mut c =
            Compactor::new(AutoCompaction::Periodic(Duration::from_secs(10)), t0, 5).unwrap();
        let s = Duration::from_secs(1);
        for i in 1..10 {
            assert_eq!(c.tick(t0 + s * i, 5 + i64::from(i)), None);
        }
        let first = c.tick(t0 + s * 10, 15).unwrap();
        assert_eq!(first, 5);
        c.compacted(t0 + s * 10, first, false);
        // Retried one sample later, to the oldest revision still in the window (as etcd).
        assert_eq!(c.tick(t0 + s * 11, 16), Some(5));
        c.compacted(t0 + s * 11, 5, true);
        assert_eq!(c.tick(t0 + s * 12, 17), None);
    }

    #[test]
    fn a_paused_compactor_samples_and_compacts_once_it_leads() {
        let t0 = Instant::now();
        let mut c =
            Compactor::new(AutoCompaction::Periodic(Duration::from_secs(10)), t0, 1).unwrap();
        let s = Duration::from_secs(1);
        // A follower for 15 s: samples only.
        for i in 1..=15 {
            c.paused_tick(1 + 100 * i64::from(i));
        }
        // Elected: compacts at once to the revision of 10 s before.
        assert_eq!(c.tick(t0 + s * 16, 1601), Some(501));
    }

    #[test]
    fn revision_mode_keeps_the_last_n_revisions() {
        let out = simulate(AutoCompaction::Revision(1000), 4, 700);
        // Revisions 701, 1401, 2101, 2801: the first is within the retention.
        assert_eq!(out, vec![(2, 401), (3, 1101), (4, 1801)]);
        // No new revisions: nothing to do again.
        let t0 = Instant::now();
        let mut c = Compactor::new(AutoCompaction::Revision(10), t0, 50).unwrap();
        assert_eq!(c.tick(t0, 50), Some(40));
        c.compacted(t0, 40, true);
        assert_eq!(c.tick(t0, 50), None);
    }

    #[test]
    fn disabled_modes_make_no_compactor() {
        let now = Instant::now();
        assert!(Compactor::new(AutoCompaction::Off, now, 1).is_none());
        assert!(Compactor::new(AutoCompaction::Revision(0), now, 1).is_none());
        assert!(Compactor::new(AutoCompaction::Periodic(Duration::ZERO), now, 1).is_none());
    }
}
