//! Kill -9 test of the backend: a child process commits durably in a loop (each transaction's
//! content is a pure function of its number, and it records that number under `last`), printing
//! each number once `commit(sync = true)` returned. The parent kills it with SIGKILL once it has
//! read a number of such reports drawn from the seed (an observed point, not a moment), reopens, runs `check()`, and verifies the database holds exactly the state after
//! transaction `last`, with `last` at least the last number the child reported. The child is this
//! test binary running the ignored test `commit_child`.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use keel_engine::btree::{Backend, BackendOptions};
use rand::{Rng, SeedableRng};

const DIR_ENV: &str = "KEEL_BTREE_CRASH_DIR";

fn options() -> BackendOptions {
    BackendOptions {
        page_size: 4096,
        min_grow_bytes: 1 << 20,
        ..BackendOptions::default()
    }
}

/// Transaction `n`: puts (`Some(value)`) and deletes (`None`) decided by `n` alone.
fn ops(n: u64) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
    let mut out = Vec::new();
    for j in 0..40u64 {
        let k = format!("k{:05}", (n * 7919 + j * 104_729) % 5000).into_bytes();
        if (n + j).is_multiple_of(5) {
            out.push((k, None));
        } else {
            let big = if j == 0 && n.is_multiple_of(10) {
                9000
            } else {
                0
            };
            let len = ((n * 31 + j * 17) % 1500) as usize + big;
            out.push((k, Some(vec![(n + j) as u8; len])));
        }
    }
    out.push((b"last".to_vec(), Some(n.to_le_bytes().to_vec())));
    out
}

fn model_after(last: u64) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let mut m = BTreeMap::new();
    for n in 1..=last {
        for (k, v) in ops(n) {
            match v {
                Some(v) => m.insert(k, v),
                None => m.remove(&k),
            };
        }
    }
    m
}

fn last_of(db: &Backend) -> u64 {
    db.begin_read()
        .get(b"b", b"last")
        .unwrap()
        .map_or(0, |v| u64::from_le_bytes(v.try_into().unwrap()))
}

#[test]
#[ignore = "child process of kill9_during_commits_keeps_every_synced_state"]
fn commit_child() {
    let dir = std::env::var(DIR_ENV).expect("run by kill9_during_commits_keeps_every_synced_state");
    let db = Backend::open(std::path::Path::new(&dir).join("db"), options()).unwrap();
    let mut txn = db.begin_write().unwrap();
    txn.create_bucket(b"b").unwrap();
    txn.commit(true).unwrap();
    let mut n = last_of(&db);
    loop {
        n += 1;
        let mut txn = db.begin_write().unwrap();
        for (k, v) in ops(n) {
            match v {
                Some(v) => txn.put(b"b", &k, &v).unwrap(),
                None => {
                    txn.delete(b"b", &k).unwrap();
                }
            }
        }
        // Every third commit is deferred, then made durable by the next one's sync.
        txn.commit(!n.is_multiple_of(3)).unwrap();
        if !n.is_multiple_of(3) {
            println!("SYNCED {n}");
        }
    }
}

#[test]
fn kill9_during_commits_keeps_every_synced_state() {
    let seed: u64 = std::env::var("KEEL_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("seed {seed} (set KEEL_CRASH_SEED to replay the kill points)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let mut reported = 0u64;
    for round in 1..=5 {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--ignored",
                "--exact",
                "commit_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(DIR_ENV, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let seen = Arc::new(AtomicUsize::new(0));
        let counter = seen.clone();
        let reader = std::thread::spawn(move || {
            BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                .filter_map(|l| l.strip_prefix("SYNCED ").map(|n| n.parse::<u64>().unwrap()))
                .inspect(|_| {
                    counter.fetch_add(1, Ordering::Relaxed);
                })
                .max()
        });
        // Killed once this many durable commits were reported; the deadline only guards a hang.
        let kill_after = rng.random_range(1..300);
        let deadline = Instant::now() + Duration::from_secs(60);
        while seen.load(Ordering::Relaxed) < kill_after {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("seed {seed} round {round}: the child exited ({status})");
            }
            assert!(
                Instant::now() < deadline,
                "seed {seed} round {round}: {} of {kill_after} durable commits",
                seen.load(Ordering::Relaxed)
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        child.kill().unwrap();
        child.wait().unwrap();
        if let Some(n) = reader.join().unwrap() {
            reported = reported.max(n);
        }
        let db = Backend::open(dir.path().join("db"), options()).unwrap();
        db.check()
            .unwrap_or_else(|e| panic!("seed {seed} round {round}: {e}"));
        let last = last_of(&db);
        assert!(
            last >= reported,
            "seed {seed} round {round}: state {last} < acknowledged {reported}"
        );
        let got: BTreeMap<Vec<u8>, Vec<u8>> = db
            .begin_read()
            .range(b"b", b"", None)
            .unwrap()
            .map(|kv| kv.map(|(k, v)| (k.to_vec(), v.to_vec())).unwrap())
            .collect();
        assert!(
            got == model_after(last),
            "seed {seed} round {round}: state is not exactly transaction {last}'s"
        );
        println!("round {round}: acknowledged {reported}, recovered {last}");
    }
}
