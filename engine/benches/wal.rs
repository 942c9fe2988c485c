//! WAL benchmark, printed next to the physical reference measured in the same run.
//!
//! ```text
//! cargo bench -p keel-engine --bench wal -- [--dir DIR] [--samples N] [--seconds S] [--recovery-gib G]
//! ```
//! - `raw`: O_DIRECT `DmaFile` write of the block(s) a 256-byte entry record lands in, then
//!   fdatasync, into a pre-zeroed file, advancing as the WAL does (the physical floor).
//! - `wal 1 writer`: one appender, 256-byte entries, each awaited before the next. Raw and WAL
//!   samples alternate in four rounds, after the WAL's spare segment is ready.
//! - `wal N appenders`: N concurrent appenders for S seconds: entries/s and entries per fdatasync.
//! - `recovery`: opening a WAL holding G GiB of 256-byte entries: the first open after writing
//!   (O_DIRECT writes leave the page cache empty), after dropping caches (when
//!   `/proc/sys/vm/drop_caches` is writable), and with the page cache warm.
//!
//! `--dir` defaults to a temporary directory under the current directory (not /tmp, which may be
//! a tmpfs on some machines): the numbers are only meaningful on the disk being measured.

use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use glommio::io::{DmaFile, OpenOptions};
use glommio::{LocalExecutorBuilder, Placement};
use hdrhistogram::Histogram;
use keel_engine::wal::{Wal, WalOptions};
use raft::eraftpb::Entry;

const ENTRY_BYTES: usize = 256;

struct Args {
    dir: Option<PathBuf>,
    samples: usize,
    seconds: f64,
    recovery_gib: f64,
}

fn parse_args() -> Args {
    let mut args = Args {
        dir: None,
        samples: 3000,
        seconds: 3.0,
        recovery_gib: 1.0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--dir" => args.dir = Some(value().into()),
            "--samples" => args.samples = value().parse().expect("--samples N"),
            "--seconds" => args.seconds = value().parse().expect("--seconds S"),
            "--recovery-gib" => args.recovery_gib = value().parse().expect("--recovery-gib G"),
            "--bench" => {} // passed by `cargo bench`
            other => panic!("unknown argument {other}"),
        }
    }
    args
}

fn entry(index: u64) -> Entry {
    let data = vec![(index % 251) as u8; ENTRY_BYTES].into();
    Entry {
        index,
        term: 1,
        data,
        ..Default::default()
    }
}

fn us(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

/// The physical reference: the same blocks a 256-byte-entry WAL writes, without the WAL.
struct Raw {
    path: PathBuf,
    file: DmaFile,
    end: u64,
}

impl Raw {
    async fn new(dir: &Path) -> Raw {
        let path = dir.join("raw.bin");
        let size: u64 = 64 << 20;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .dma_open(&path)
            .await
            .unwrap();
        file.pre_allocate(size, false).await.unwrap();
        let zeros = Rc::new(file.alloc_dma_buffer(1 << 20));
        for pos in (0..size).step_by(1 << 20) {
            file.write_rc_at(zeros.clone(), pos).await.unwrap();
        }
        file.fdatasync().await.unwrap();
        Raw {
            path,
            file,
            end: 4096,
        }
    }

    async fn sample(&mut self, samples: usize, h: &mut Histogram<u64>) {
        // A framed 256-byte entry record is 24 + 24 + 256 = 304 bytes.
        let record = 304u64;
        for _ in 0..samples {
            let start = self.end;
            self.end += record;
            let pos = start - start % 4096;
            let len = (self.end.next_multiple_of(4096) - pos) as usize;
            let mut buf = self.file.alloc_dma_buffer(len);
            buf.as_bytes_mut().fill(0xab);
            let t = Instant::now();
            self.file.write_at(buf, pos).await.unwrap();
            self.file.fdatasync().await.unwrap();
            h.record(t.elapsed().as_nanos() as u64).unwrap();
        }
    }

    async fn remove(self) {
        self.file.close().await.unwrap();
        std::fs::remove_file(self.path).unwrap();
    }
}

/// Opens a WAL, appends one entry (the first append cuts the first segment) and waits until the
/// background spare preparation is done, so it does not disturb what is measured.
async fn ready_wal(dir: &Path) -> Wal {
    let (wal, _) = Wal::open(dir, WalOptions::default()).await.unwrap();
    wal.save(&[entry(1)], None).await.unwrap();
    while wal.file_counts().1 == 0 {
        glommio::timer::sleep(Duration::from_millis(5)).await;
    }
    wal
}

/// Raw and WAL one-writer latency, measured in alternating rounds (A B A B) so that drift of the
/// disk affects both alike.
async fn one_writer_vs_raw(dir: &Path, samples: usize) -> (Histogram<u64>, Histogram<u64>) {
    const ROUNDS: usize = 4;
    let mut raw = Raw::new(dir).await;
    let wal = ready_wal(&dir.join("one")).await;
    let mut raw_h = Histogram::<u64>::new(3).unwrap();
    let mut wal_h = Histogram::<u64>::new(3).unwrap();
    let mut next = 2u64;
    for _ in 0..ROUNDS {
        raw.sample(samples / ROUNDS, &mut raw_h).await;
        for _ in 0..samples / ROUNDS {
            let e = entry(next);
            next += 1;
            let t = Instant::now();
            wal.save(std::slice::from_ref(&e), None).await.unwrap();
            wal_h.record(t.elapsed().as_nanos() as u64).unwrap();
        }
    }
    wal.close().await.unwrap();
    raw.remove().await;
    (raw_h, wal_h)
}

/// Entries/s and entries per fdatasync with `appenders` concurrent appenders.
async fn concurrent(dir: &Path, appenders: usize, seconds: f64) -> (f64, f64) {
    let wal = ready_wal(dir).await;
    let next = Rc::new(Cell::new(2u64));
    let done = Rc::new(Cell::new(0u64));
    let stop = Rc::new(Cell::new(false));
    let before = wal.stats();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..appenders {
        let (wal, next, done, stop) = (wal.clone(), next.clone(), done.clone(), stop.clone());
        tasks.push(glommio::spawn_local(async move {
            while !stop.get() {
                let i = next.get();
                next.set(i + 1);
                wal.save(&[entry(i)], None).await.unwrap();
                done.set(done.get() + 1);
            }
        }));
    }
    glommio::timer::sleep(Duration::from_secs_f64(seconds)).await;
    stop.set(true);
    for t in tasks {
        t.await;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let after = wal.stats();
    wal.close().await.unwrap();
    let syncs = (after.batches - before.batches).max(1);
    (
        done.get() as f64 / elapsed,
        (after.records - before.records) as f64 / syncs as f64,
    )
}

fn drop_caches() -> bool {
    std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

/// Writes `gib` GiB of 256-byte entries, then times opening the WAL (warm and cold cache).
async fn recovery(dir: &Path, gib: f64) -> (u64, u64, f64, Option<f64>, f64) {
    let target = (gib * (1u64 << 30) as f64) as u64;
    {
        let (wal, _) = Wal::open(dir, WalOptions::default()).await.unwrap();
        let mut i = 1u64;
        while wal.stats().bytes_written < target {
            let batch: Vec<Entry> = (i..i + 4096).map(entry).collect();
            // Several appends in flight so writes are large.
            let futures: Vec<_> = batch.chunks(512).map(|c| wal.save(c, None)).collect();
            for f in futures {
                f.await.unwrap();
            }
            i += 4096;
        }
        wal.close().await.unwrap();
    }
    let bytes: u64 = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "wal"))
        .map(|e| e.metadata().unwrap().len())
        .sum();
    // Written with O_DIRECT, so the page cache does not hold it: the first open reads the disk.
    let (first, entries) = timed_open(dir).await;
    let cold = if drop_caches() {
        Some(timed_open(dir).await.0)
    } else {
        None
    };
    // Recovery reads through the page cache, so now it is warm.
    let (warm, _) = timed_open(dir).await;
    (bytes, entries, first, cold, warm)
}

async fn timed_open(dir: &Path) -> (f64, u64) {
    let t = Instant::now();
    let (wal, rec) = Wal::open(dir, WalOptions::default()).await.unwrap();
    let seconds = t.elapsed().as_secs_f64();
    wal.close().await.unwrap();
    (seconds, rec.last_index)
}

fn main() {
    let args = parse_args();
    let base = match &args.dir {
        Some(d) => tempfile::tempdir_in(d).unwrap(),
        None => tempfile::tempdir_in(".").unwrap(),
    };
    let base_path = base.path().to_path_buf();
    let core = std::thread::available_parallelism().map_or(0, |n| n.get() - 1);
    let ex = LocalExecutorBuilder::new(Placement::Fixed(core))
        .io_memory(1 << 20)
        .name("wal-bench")
        .make()
        .unwrap();
    ex.run(async move {
        let dir = |name: &str| {
            let d = base_path.join(name);
            std::fs::create_dir_all(&d).unwrap();
            d
        };
        println!("WAL benchmark: 256-byte entries, storage executor pinned to CPU {core}");
        println!("data directory: {}", base_path.display());
        let (raw, wal) = one_writer_vs_raw(&base_path, args.samples).await;
        let (raw_p50, raw_p99) = (us(&raw, 0.5), us(&raw, 0.99));
        let (wal_p50, wal_p99) = (us(&wal, 0.5), us(&wal, 0.99));
        println!();
        println!("| measurement | p50 µs | p99 µs | ratio to raw p50 |");
        println!("|---|---|---|---|");
        println!(
            "| raw DmaFile write + fdatasync (same blocks) | {raw_p50:.0} | {raw_p99:.0} | 1.00 |"
        );
        println!(
            "| WAL append, 1 writer | {wal_p50:.0} | {wal_p99:.0} | {:.2} |",
            wal_p50 / raw_p50
        );
        println!();
        println!("| appenders | entries/s | entries per fdatasync | × one-writer rate |");
        println!("|---|---|---|---|");
        let mut one_rate = None;
        for (k, n) in [1usize, 16, 256, 1024].into_iter().enumerate() {
            let (rate, per_sync) = concurrent(&dir(&format!("c{k}")), n, args.seconds).await;
            let base_rate = *one_rate.get_or_insert(rate);
            println!(
                "| {n} | {rate:.0} | {per_sync:.1} | {:.1} |",
                rate / base_rate
            );
        }
        if args.recovery_gib > 0.0 {
            let (bytes, entries, first, cold, warm) =
                recovery(&dir("recovery"), args.recovery_gib).await;
            println!();
            println!("| recovery of | entries | first open after writing, s | after drop_caches, s | page cache warm, s |");
            println!("|---|---|---|---|---|");
            println!(
                "| {:.2} GiB of segments | {entries} | {first:.2} | {} | {warm:.2} |",
                bytes as f64 / (1u64 << 30) as f64,
                cold.map_or("n/a (cannot drop caches)".into(), |c| format!("{c:.2}"))
            );
        }
    });
}
