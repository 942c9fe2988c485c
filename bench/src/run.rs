//! The runner: `--clients` concurrent clients spread over `--conns` connections send `--total`
//! requests (optionally paced to `--rate` per second), each client recording into its own
//! [`Recorder`]; a progress bar on a terminal; periodic compaction for `put`.
//!
//! A request the server refuses is counted in the error distribution and the run goes on (as
//! etcd's benchmark does). When a server cannot be reached any more (connection refused or
//! reset, request timeout), the run stops: the report then covers what completed.

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use keel_proto::etcdserverpb as pb;
use rand::SeedableRng;
use rand::rngs::SmallRng;
use tokio::sync::Mutex;
use tonic::transport::Channel;

use crate::client::{self, Kv, Token};
use crate::report::Recorder;

/// One request of a workload.
#[derive(Debug, Clone)]
pub enum Op {
    Put(pb::PutRequest),
    Range(pb::RangeRequest),
    Txn(pb::TxnRequest),
}

/// What a benchmark sends. `op` is called once per request with its sequence number.
pub trait Workload: Send + Sync + 'static {
    /// The request number `i`, and the index of the report it counts in (see `classes`).
    fn op(&self, i: u64, rng: &mut SmallRng) -> (usize, Op);

    /// Names of the separate reports (e.g. reads and writes of `txn-mixed`); one by default.
    fn classes(&self) -> Vec<&'static str> {
        vec![""]
    }
}

/// How to run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub clients: usize,
    pub total: u64,
    /// Requests per second over all clients; 0: as fast as possible.
    pub rate: f64,
    pub sample: bool,
    /// Draw a progress bar on stderr (only when it is a terminal).
    pub progress: bool,
    /// Every this often, compact to the current revision minus `compact_delta` (`put`).
    pub compact_interval: Duration,
    pub compact_delta: i64,
}

impl RunOptions {
    /// `total` requests from `clients` as fast as they go: no rate limit, no sampling, no
    /// progress bar, no compaction (how `compare` measures).
    pub fn flat_out(clients: usize, total: u64) -> RunOptions {
        RunOptions {
            clients,
            total,
            rate: 0.0,
            sample: false,
            progress: false,
            compact_interval: Duration::ZERO,
            compact_delta: 0,
        }
    }
}

/// The outcome of a run.
#[derive(Debug)]
pub struct Outcome {
    /// One recorder per workload class.
    pub recorders: Vec<Recorder>,
    pub elapsed: Duration,
    /// Why the run stopped early, if it did.
    pub aborted: Option<String>,
}

impl Outcome {
    /// The figures of every class together.
    pub fn stats(&self) -> crate::report::Stats {
        let mut all = Recorder::new(false);
        for r in &self.recorders {
            all.merge(r);
        }
        crate::report::Stats::new(&all, self.elapsed)
    }
}

/// Recorders shared by the clients.
const SHARDS: usize = 8;

struct Shared {
    next: AtomicU64,
    done: AtomicU64,
    stop: AtomicBool,
    abort: std::sync::Mutex<Option<String>>,
    revision: AtomicI64,
}

async fn send(kv: &mut Kv, op: Op) -> Result<i64, tonic::Status> {
    let header = match op {
        Op::Put(r) => kv.put(r).await?.into_inner().header,
        Op::Range(r) => kv.range(r).await?.into_inner().header,
        Op::Txn(r) => kv.txn(r).await?.into_inner().header,
    };
    Ok(header.map_or(0, |h| h.revision))
}

/// Runs `workload` over `channels`.
pub async fn run(
    workload: Arc<dyn Workload>,
    channels: &[Channel],
    token: &Token,
    opts: &RunOptions,
) -> Outcome {
    let classes = workload.classes().len();
    let shared = Arc::new(Shared {
        next: AtomicU64::new(0),
        done: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        abort: std::sync::Mutex::new(None),
        revision: AtomicI64::new(0),
    });
    // A histogram takes a few hundred KiB: clients share a few of them rather than one each.
    let shards: Arc<Vec<std::sync::Mutex<Vec<Recorder>>>> = Arc::new(
        (0..opts.clients.clamp(1, SHARDS))
            .map(|_| {
                std::sync::Mutex::new((0..classes).map(|_| Recorder::new(opts.sample)).collect())
            })
            .collect(),
    );
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(opts.clients);
    for c in 0..opts.clients.max(1) {
        let mut kv = client::kv(channels[c % channels.len()].clone(), token);
        let (workload, shared, opts) = (workload.clone(), shared.clone(), opts.clone());
        let shards = shards.clone();
        tasks.push(tokio::spawn(async move {
            let shard = &shards[c % shards.len()];
            let mut rng = SmallRng::seed_from_u64(c as u64);
            loop {
                if shared.stop.load(Ordering::Relaxed) {
                    break;
                }
                let i = shared.next.fetch_add(1, Ordering::Relaxed);
                if i >= opts.total {
                    break;
                }
                if opts.rate > 0.0 {
                    let at = start + Duration::from_secs_f64(i as f64 / opts.rate);
                    tokio::time::sleep_until(at.into()).await;
                }
                let (class, op) = workload.op(i, &mut rng);
                let (began, t) = (SystemTime::now(), Instant::now());
                match send(&mut kv, op).await {
                    Ok(rev) => {
                        let latency = t.elapsed();
                        shard.lock().expect("not poisoned")[class].success(began, latency);
                        shared.revision.fetch_max(rev, Ordering::Relaxed);
                    }
                    Err(s) => {
                        let text = client::status_text(&s);
                        shard.lock().expect("not poisoned")[class].error(text.clone());
                        if client::is_fatal(&s) {
                            shared.stop.store(true, Ordering::Relaxed);
                            shared
                                .abort
                                .lock()
                                .expect("not poisoned")
                                .get_or_insert(text);
                        }
                    }
                }
                shared.done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let progress = (opts.progress && std::io::stderr().is_terminal()).then(|| {
        let (shared, total) = (shared.clone(), opts.total);
        tokio::spawn(async move {
            loop {
                draw_progress(shared.done.load(Ordering::Relaxed), total, start.elapsed());
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    });
    let compactor = (!opts.compact_interval.is_zero()).then(|| {
        let kv = Arc::new(Mutex::new(client::kv(channels[0].clone(), token)));
        let (shared, interval, delta) = (shared.clone(), opts.compact_interval, opts.compact_delta);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(interval).await;
                let revision = shared.revision.load(Ordering::Relaxed) - delta;
                if revision > 0 {
                    let r = pb::CompactionRequest {
                        revision,
                        physical: false,
                    };
                    // A revision compacted already is fine; anything else shows in the run.
                    let _ = kv.lock().await.compact(r).await;
                }
            }
        })
    });
    let mut recorders: Vec<Recorder> = (0..classes).map(|_| Recorder::new(opts.sample)).collect();
    for t in tasks {
        if let Err(e) = t.await {
            recorders[0].error(format!("client task failed: {e}"));
        }
    }
    for shard in shards.iter() {
        for (mine, theirs) in recorders
            .iter_mut()
            .zip(shard.lock().expect("not poisoned").iter())
        {
            mine.merge(theirs);
        }
    }
    let elapsed = start.elapsed();
    for task in [progress, compactor].into_iter().flatten() {
        task.abort();
    }
    if opts.progress && std::io::stderr().is_terminal() {
        draw_progress(shared.done.load(Ordering::Relaxed), opts.total, elapsed);
        eprintln!();
    }
    let aborted = shared.abort.lock().expect("not poisoned").take();
    Outcome {
        recorders,
        elapsed,
        aborted,
    }
}

/// `  1234 / 10000 [=====>     ]  12.34% 3s`, redrawn in place.
fn draw_progress(done: u64, total: u64, elapsed: Duration) {
    let pct = if total == 0 {
        100.0
    } else {
        done as f64 * 100.0 / total as f64
    };
    let width = 40;
    let filled = ((pct / 100.0) * width as f64) as usize;
    let bar: String = (0..width)
        .map(|i| match i.cmp(&filled) {
            std::cmp::Ordering::Less => '=',
            std::cmp::Ordering::Equal => '>',
            std::cmp::Ordering::Greater => ' ',
        })
        .collect();
    let mut err = std::io::stderr().lock();
    let _ = write!(
        err,
        "\r{done:>8} / {total} [{bar}] {pct:6.2}% {}s",
        elapsed.as_secs()
    );
    let _ = err.flush();
}
