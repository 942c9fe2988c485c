//! Backend benchmark: Keel's B+tree beside LMDB (heed) and redb, same data, same run.
//!
//! ```text
//! cargo bench -p keel-engine --bench btree -- [--dir DIR] [--sizes 100000,1000000] [--quick]
//! ```
//! For each size N: 8-byte keys, 256-byte values.
//! - insert: sequential and random key order, in durable commits of 1,000 entries (LMDB default
//!   sync, redb `Durability::Immediate`, Keel `commit(sync = true)`);
//! - get: N point lookups in random order, one read transaction;
//! - scan: ranges of 1,000 consecutive keys from random starts;
//! - file size after the random load, and after compaction (Keel `defrag`, LMDB
//!   `copy_to_path(Compaction)`, redb `compact`);
//!
//! Then MVCC put (one write transaction per put, deferred sync) and range throughput.

use std::path::{Path, PathBuf};
use std::time::Instant;

use heed::types::Bytes;
use keel_engine::btree::{Backend, BackendOptions};
use keel_engine::mvcc::Store;
use keel_engine::mvcc::apply::{self, PutRequest, RangeRequest};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use redb::ReadableDatabase;

const VALUE: usize = 256;
const BATCH: usize = 1000;
const SCAN: usize = 1000;

fn key(i: u64) -> [u8; 8] {
    // Big-endian so that key order is numeric order, as etcd's revision keys.
    #[allow(
        clippy::big_endian_bytes,
        reason = "sequential keys must sort bytewise"
    )]
    i.to_be_bytes()
}

fn value(i: u64) -> [u8; VALUE] {
    [(i % 251) as u8; VALUE]
}

/// What one engine does in the benchmark.
trait Engine {
    fn name(&self) -> &'static str;
    fn insert_batch(&mut self, keys: &[u64]);
    /// Looks every key up; returns the total value length (so nothing is optimized away).
    fn get_all(&self, keys: &[u64]) -> usize;
    /// Scans `SCAN` entries from each start; returns entries seen.
    fn scan(&self, starts: &[u64]) -> usize;
    fn file_size(&self) -> u64;
    /// Compacts into a fresh file; returns its size.
    fn compact(&mut self) -> u64;
}

struct Keel(Backend, PathBuf);

impl Engine for Keel {
    fn name(&self) -> &'static str {
        "keel"
    }
    fn insert_batch(&mut self, keys: &[u64]) {
        let mut txn = self.0.begin_write().unwrap();
        for &k in keys {
            txn.put(b"key", &key(k), &value(k)).unwrap();
        }
        txn.commit(true).unwrap();
    }
    fn get_all(&self, keys: &[u64]) -> usize {
        let r = self.0.begin_read();
        keys.iter()
            .map(|&k| r.get(b"key", &key(k)).unwrap().unwrap().len())
            .sum()
    }
    fn scan(&self, starts: &[u64]) -> usize {
        let r = self.0.begin_read();
        starts
            .iter()
            .map(|&s| {
                r.range(b"key", &key(s), None)
                    .unwrap()
                    .take(SCAN)
                    .map(|kv| kv.unwrap().1.len().min(1))
                    .sum::<usize>()
            })
            .sum()
    }
    fn file_size(&self) -> u64 {
        std::fs::metadata(&self.1).unwrap().len()
    }
    fn compact(&mut self) -> u64 {
        self.0.defrag().unwrap().size_after
    }
}

struct Lmdb(heed::Env, heed::Database<Bytes, Bytes>, PathBuf);

impl Engine for Lmdb {
    fn name(&self) -> &'static str {
        "lmdb"
    }
    fn insert_batch(&mut self, keys: &[u64]) {
        let mut txn = self.0.write_txn().unwrap();
        for &k in keys {
            self.1.put(&mut txn, &key(k), &value(k)).unwrap();
        }
        txn.commit().unwrap();
    }
    fn get_all(&self, keys: &[u64]) -> usize {
        let r = self.0.read_txn().unwrap();
        keys.iter()
            .map(|&k| self.1.get(&r, &key(k)).unwrap().unwrap().len())
            .sum()
    }
    fn scan(&self, starts: &[u64]) -> usize {
        let r = self.0.read_txn().unwrap();
        starts
            .iter()
            .map(|&s| {
                let from = key(s);
                let bounds = (
                    std::ops::Bound::Included(&from[..]),
                    std::ops::Bound::Unbounded,
                );
                self.1
                    .range(&r, &bounds)
                    .unwrap()
                    .take(SCAN)
                    .map(|kv| kv.unwrap().1.len().min(1))
                    .sum::<usize>()
            })
            .sum()
    }
    fn file_size(&self) -> u64 {
        std::fs::metadata(self.2.join("data.mdb")).unwrap().len()
    }
    fn compact(&mut self) -> u64 {
        let out = self.2.join("compact.mdb");
        let _ = std::fs::remove_file(&out);
        self.0
            .copy_to_path(&out, heed::CompactionOption::Enabled)
            .unwrap();
        std::fs::metadata(&out).unwrap().len()
    }
}

const TABLE: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("key");

struct Redb(Option<redb::Database>, PathBuf);

impl Engine for Redb {
    fn name(&self) -> &'static str {
        "redb"
    }
    fn insert_batch(&mut self, keys: &[u64]) {
        let txn = self.0.as_ref().unwrap().begin_write().unwrap();
        {
            let mut t = txn.open_table(TABLE).unwrap();
            for &k in keys {
                t.insert(&key(k)[..], &value(k)[..]).unwrap();
            }
        }
        txn.commit().unwrap();
    }
    fn get_all(&self, keys: &[u64]) -> usize {
        let r = self.0.as_ref().unwrap().begin_read().unwrap();
        let t = r.open_table(TABLE).unwrap();
        keys.iter()
            .map(|&k| t.get(&key(k)[..]).unwrap().unwrap().value().len())
            .sum()
    }
    fn scan(&self, starts: &[u64]) -> usize {
        let r = self.0.as_ref().unwrap().begin_read().unwrap();
        let t = r.open_table(TABLE).unwrap();
        starts
            .iter()
            .map(|&s| {
                let from = key(s);
                t.range(&from[..]..)
                    .unwrap()
                    .take(SCAN)
                    .map(|kv| kv.unwrap().1.value().len().min(1))
                    .sum::<usize>()
            })
            .sum()
    }
    fn file_size(&self) -> u64 {
        std::fs::metadata(&self.1).unwrap().len()
    }
    fn compact(&mut self) -> u64 {
        self.0.as_mut().unwrap().compact().unwrap();
        std::fs::metadata(&self.1).unwrap().len()
    }
}

fn open_all(dir: &Path, tag: &str, n: usize) -> Vec<Box<dyn Engine>> {
    let keel_path = dir.join(format!("keel-{tag}.db"));
    let keel = Backend::open(&keel_path, BackendOptions::default()).unwrap();
    let mut txn = keel.begin_write().unwrap();
    txn.create_bucket(b"key").unwrap();
    txn.commit(true).unwrap();
    let lmdb_dir = dir.join(format!("lmdb-{tag}"));
    std::fs::create_dir_all(&lmdb_dir).unwrap();
    // SAFETY: LMDB requires that an environment is opened at most once per process and not
    // modified by others while open; each one here has its own fresh directory.
    let env = unsafe {
        heed::EnvOpenOptions::new()
            .map_size((n * 1024).max(1 << 30))
            .max_dbs(1)
            .open(&lmdb_dir)
            .unwrap()
    };
    let mut wtxn = env.write_txn().unwrap();
    let db: heed::Database<Bytes, Bytes> = env.create_database(&mut wtxn, None).unwrap();
    wtxn.commit().unwrap();
    let redb_path = dir.join(format!("redb-{tag}.db"));
    let redb = redb::Database::create(&redb_path).unwrap();
    vec![
        Box::new(Keel(keel, keel_path)),
        Box::new(Lmdb(env, db, lmdb_dir)),
        Box::new(Redb(Some(redb), redb_path)),
    ]
}

fn rate(count: usize, secs: f64) -> String {
    let r = count as f64 / secs;
    if r >= 1e6 {
        format!("{:.2} M/s", r / 1e6)
    } else {
        format!("{:.0} k/s", r / 1e3)
    }
}

fn bench_size(dir: &Path, n: usize, rng: &mut rand::rngs::StdRng) {
    let mut random: Vec<u64> = (0..n as u64).collect();
    random.shuffle(rng);
    let sequential: Vec<u64> = (0..n as u64).collect();
    let gets: Vec<u64> = random.clone();
    let scans: Vec<u64> = (0..(n / 100).max(100))
        .map(|i| random[i % n] % (n as u64 - SCAN as u64))
        .collect();
    let mut seq_engines = open_all(dir, &format!("seq-{n}"), n);
    let mut rnd_engines = open_all(dir, &format!("rnd-{n}"), n);
    let mut seq = [0.0f64; 3];
    let mut rnd = [0.0f64; 3];
    for e in 0..3 {
        let t = Instant::now();
        for chunk in sequential.chunks(BATCH) {
            seq_engines[e].insert_batch(chunk);
        }
        seq[e] = t.elapsed().as_secs_f64();
        let t = Instant::now();
        for chunk in random.chunks(BATCH) {
            rnd_engines[e].insert_batch(chunk);
        }
        rnd[e] = t.elapsed().as_secs_f64();
    }
    drop(seq_engines);
    // Reads alternate between engines (A B C A B C ...), and the median of the rounds is kept,
    // so drift of the machine affects all three alike.
    const ROUNDS: usize = 3;
    let mut get = [[0.0f64; ROUNDS]; 3];
    let mut scan = [[0.0f64; ROUNDS]; 3];
    for round in 0..ROUNDS {
        for e in 0..3 {
            let t = Instant::now();
            let total = rnd_engines[e].get_all(&gets);
            get[e][round] = t.elapsed().as_secs_f64();
            assert_eq!(total, n * VALUE);
            let t = Instant::now();
            let seen = rnd_engines[e].scan(&scans);
            scan[e][round] = t.elapsed().as_secs_f64();
            assert_eq!(seen, scans.len() * SCAN);
        }
    }
    let median = |mut v: [f64; ROUNDS]| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[ROUNDS / 2]
    };
    let mut rows: Vec<[String; 7]> = Vec::new();
    for e in 0..3 {
        let loaded = rnd_engines[e].file_size();
        let compacted = rnd_engines[e].compact();
        rows.push([
            rnd_engines[e].name().to_string(),
            rate(n, seq[e]),
            rate(n, rnd[e]),
            rate(n, median(get[e])),
            rate(scans.len() * SCAN, median(scan[e])),
            format!("{:.1} MiB", loaded as f64 / 1048576.0),
            format!("{:.1} MiB", compacted as f64 / 1048576.0),
        ]);
    }
    println!("\n### {n} keys (8-byte keys, 256-byte values, commits of {BATCH})\n");
    println!(
        "| engine | seq insert | random insert | point get | scan (entries) | file after random load | after compaction |"
    );
    println!("|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} |",
            r[0], r[1], r[2], r[3], r[4], r[5], r[6]
        );
    }
}

fn bench_mvcc(dir: &Path, n: usize) {
    let store = Store::open(dir.join("mvcc.db"), BackendOptions::default()).unwrap();
    let t = Instant::now();
    for i in 0..n as u64 {
        let req = PutRequest {
            key: format!("/registry/pods/ns/pod-{i:08}").into_bytes(),
            value: value(i).to_vec(),
            ..Default::default()
        };
        apply::put_request(&store, &req, &apply::NoLeases, Some((i + 1, 1))).unwrap();
        if i % 10_000 == 9_999 {
            store.sync().unwrap(); // a checkpoint every 10k entries, as the storage core does
        }
    }
    let put = t.elapsed().as_secs_f64();
    // As the storage core applies: a batch of requests, each its own revision, one backend
    // transaction per batch.
    let batched = Store::open(dir.join("mvcc-batched.db"), BackendOptions::default()).unwrap();
    let t = Instant::now();
    for (b, chunk) in (0..n as u64).collect::<Vec<_>>().chunks(BATCH).enumerate() {
        let mut w = batched.write().unwrap();
        for &i in chunk {
            let req = PutRequest {
                key: format!("/registry/pods/ns/pod-{i:08}").into_bytes(),
                value: value(i).to_vec(),
                ..Default::default()
            };
            apply::put(&mut w, &req, &apply::NoLeases).unwrap();
            w.finish_revision();
        }
        w.end(Some(((b + 1) as u64, 1))).unwrap();
        if b % 10 == 9 {
            batched.sync().unwrap();
        }
    }
    let put_batched = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let view = store.read();
    let reads = n.min(200_000);
    for i in 0..reads as u64 {
        let k = (i * 7919) % n as u64;
        let req = RangeRequest {
            key: format!("/registry/pods/ns/pod-{k:08}").into_bytes(),
            ..Default::default()
        };
        assert_eq!(apply::range(&view, &req).unwrap().kvs.len(), 1);
    }
    let get = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let ranges = 2000;
    for i in 0..ranges as u64 {
        let from = (i * 7919) % (n as u64 - 100);
        let req = RangeRequest {
            key: format!("/registry/pods/ns/pod-{from:08}").into_bytes(),
            range_end: b"/registry/pods/ns/pod-~".to_vec(),
            limit: 100,
            ..Default::default()
        };
        assert_eq!(apply::range(&view, &req).unwrap().kvs.len(), 100);
    }
    let range = t.elapsed().as_secs_f64();
    println!("\n### MVCC store ({n} keys, ~30-byte keys, 256-byte values)\n");
    println!("| operation | throughput |");
    println!("|---|---|");
    println!(
        "| put (one write txn each, backend synced every 10k) | {} |",
        rate(n, put)
    );
    println!(
        "| put (batches of {BATCH}: one backend commit each, synced every 10k) | {} |",
        rate(n, put_batched)
    );
    println!("| range, single key | {} |", rate(reads, get));
    println!(
        "| range, 100 keys with limit | {} ranges ({} keys) |",
        rate(ranges, range),
        rate(ranges * 100, range)
    );
}

fn main() {
    let mut dir_arg: Option<PathBuf> = None;
    let mut sizes = vec![100_000usize, 1_000_000];
    let mut mvcc_n = 100_000usize;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--dir" => dir_arg = Some(it.next().expect("--dir DIR").into()),
            "--sizes" => {
                sizes = it
                    .next()
                    .expect("--sizes N,M")
                    .split(',')
                    .map(|s| s.parse().unwrap())
                    .collect()
            }
            "--quick" => {
                sizes = vec![20_000];
                mvcc_n = 20_000;
            }
            "--bench" => {}
            other => panic!("unknown argument {other}"),
        }
    }
    let base = match dir_arg {
        Some(d) => tempfile::tempdir_in(d).unwrap(),
        None => tempfile::tempdir_in(".").unwrap(),
    };
    println!(
        "Backend benchmark; data directory {}",
        base.path().display()
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    for n in sizes {
        let dir = base.path().join(format!("n{n}"));
        std::fs::create_dir_all(&dir).unwrap();
        bench_size(&dir, n, &mut rng);
        std::fs::remove_dir_all(&dir).unwrap();
    }
    let dir = base.path().join("mvcc");
    std::fs::create_dir_all(&dir).unwrap();
    bench_mvcc(&dir, mvcc_n);
}
