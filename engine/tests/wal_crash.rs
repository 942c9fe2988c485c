//! Kill -9 test: a child process appends as fast as it can with many concurrent appenders,
//! printing each index once its append is durable; the parent kills it with SIGKILL once it has
//! read a number of acknowledgements drawn from the seed (an observed point of the run, not a
//! moment in time), reopens the WAL, and checks that every index the child reported is there
//! with its content. Several rounds continue the same WAL, so each round also recovers the torn tail of the
//! previous one. The child also writes snapshot markers and releases segments, so segment cuts,
//! recycling and release are all crossed by kills.
//!
//! The child is this test binary itself, running the ignored test `crash_child`.

mod common;

use std::cell::Cell;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{entry, open, run};
use keel_engine::wal::{RecordRef, SnapshotMarker, WalOptions};
use rand::{Rng, SeedableRng};

const DIR_ENV: &str = "KEEL_CRASH_DIR";
const TERM_ENV: &str = "KEEL_CRASH_TERM";
const APPENDERS: usize = 16;

fn options() -> WalOptions {
    WalOptions {
        segment_size: 256 << 10,
        max_record_size: 16 << 10,
        cache_bytes: 64 << 10,
        ..WalOptions::default()
    }
}

#[test]
#[ignore = "child process of kill9_rounds_lose_no_acknowledged_append"]
fn crash_child() {
    let dir = std::env::var(DIR_ENV).expect("run by kill9_rounds_lose_no_acknowledged_append");
    let term: u64 = std::env::var(TERM_ENV).unwrap().parse().unwrap();
    run(async move {
        let (wal, rec) = open(dir.as_ref(), options()).await;
        println!("OPENED {}", rec.last_index);
        let next = Rc::new(Cell::new(rec.last_index + 1));
        let durable = Rc::new(Cell::new(rec.last_index));
        let mut tasks = Vec::new();
        for _ in 0..APPENDERS {
            let (wal, next, durable) = (wal.clone(), next.clone(), durable.clone());
            tasks.push(glommio::spawn_local(async move {
                loop {
                    // Taking the index and queueing the append happen in one step, so indexes
                    // reach the WAL in order.
                    let index = next.get();
                    next.set(index + 1);
                    wal.save(&[entry(index, term)], None).await.expect("append");
                    durable.set(durable.get().max(index));
                    println!("DURABLE {index}");
                }
            }));
        }
        // Every so often, cover the older log with a snapshot marker and release segments.
        loop {
            glommio::timer::sleep(Duration::from_millis(20)).await;
            let upto = durable.get().saturating_sub(200);
            if upto > wal.snapshot().index {
                let marker = SnapshotMarker {
                    index: upto,
                    term: wal.storage_term(upto),
                    ..Default::default()
                };
                wal.append(&[RecordRef::Snapshot(&marker)])
                    .await
                    .expect("marker");
                wal.release(upto + 1).await.expect("release");
            }
        }
    });
}

trait TermOf {
    fn storage_term(&self, index: u64) -> u64;
}

impl TermOf for keel_engine::wal::Wal {
    fn storage_term(&self, index: u64) -> u64 {
        raft::Storage::term(&self.storage(), index).expect("term of a live index")
    }
}

#[test]
fn kill9_rounds_lose_no_acknowledged_append() {
    let seed: u64 = std::env::var("KEEL_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("seed {seed} (set KEEL_CRASH_SEED to replay the kill points)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    // Index -> term of every append a child reported durable.
    let mut acknowledged: BTreeMap<u64, u64> = BTreeMap::new();
    let rounds = 5;
    for term in 1..=rounds {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--ignored",
                "--exact",
                "crash_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(DIR_ENV, dir.path())
            .env(TERM_ENV, term.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let seen = Arc::new(AtomicUsize::new(0));
        let counter = seen.clone();
        let reader = std::thread::spawn(move || {
            let mut durable = Vec::new();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(i) = line.strip_prefix("DURABLE ") {
                    durable.push(i.parse::<u64>().unwrap());
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            }
            durable
        });
        // Killed once this many appends were acknowledged; the deadline only guards a hang.
        let kill_after = rng.random_range(1..4000);
        let deadline = Instant::now() + Duration::from_secs(60);
        while seen.load(Ordering::Relaxed) < kill_after {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("seed {seed} round {term}: the child exited ({status})");
            }
            assert!(
                Instant::now() < deadline,
                "seed {seed} round {term}: {} of {kill_after} acknowledgements",
                seen.load(Ordering::Relaxed)
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let durable = reader.join().unwrap();
        for i in durable {
            acknowledged.insert(i, term);
        }

        // Verify in this process: everything acknowledged and not covered by a snapshot is there.
        run(async {
            let (wal, rec) = open(dir.path(), options()).await;
            let max_acknowledged = acknowledged.keys().next_back().copied().unwrap_or(0);
            assert!(
                rec.last_index >= max_acknowledged,
                "seed {seed} round {term}: log ends at {} but {max_acknowledged} was acknowledged",
                rec.last_index
            );
            let entries = common::all_entries(&wal);
            for (k, e) in entries.iter().enumerate() {
                assert_eq!(
                    e.index,
                    rec.first_index + k as u64,
                    "seed {seed}: contiguous log"
                );
                assert_eq!(
                    *e,
                    entry(e.index, e.term),
                    "seed {seed}: content of {}",
                    e.index
                );
            }
            for (&index, &term_acked) in acknowledged.range(rec.first_index..) {
                let e = &entries[(index - rec.first_index) as usize];
                assert_eq!(
                    e.term, term_acked,
                    "seed {seed}: entry {index} acknowledged in round {term_acked}"
                );
            }
            println!(
                "round {term}: {} acknowledged so far, log [{}, {}], torn tail: {:?}",
                acknowledged.len(),
                rec.first_index,
                rec.last_index,
                rec.truncated
            );
            wal.close().await.unwrap();
        });
    }
}
