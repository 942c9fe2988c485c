//! `keelctl check disk --data-dir DIR`: is the data dir's disk fit for a member's WAL?
//!
//! It does what the fio recipe etcd's docs give does (`fio --rw=write --ioengine=sync
//! --fdatasync=1 --size=22m --bs=2300`): sequential writes of 2,300 bytes to a new file in the
//! data dir's filesystem, each followed by an fdatasync, and reports:
//! - sequential write IOPS (writes and syncs per second);
//! - fdatasync latency p50 and p99.
//!
//! Verdict against the documented targets: at least 50 IOPS required, 500 recommended, and a
//! fdatasync p99 under 10 ms. Exit status 0 when the requirements are met, 1 when not. The test
//! file is removed afterwards.

use std::io::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;

/// Fewest sequential IOPS a member can run on.
pub const REQUIRED_IOPS: f64 = 50.0;
/// IOPS recommended for a member under load.
pub const RECOMMENDED_IOPS: f64 = 500.0;
/// The largest fdatasync p99 a member's WAL tolerates without slowing elections.
pub const MAX_P99: Duration = Duration::from_millis(10);

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The directory whose disk is measured (created if missing).
    #[arg(long)]
    pub data_dir: PathBuf,
    /// Writes to make (fio's recipe: 22 MiB of 2,300-byte writes, about 10,000).
    #[arg(long, default_value_t = 10_000)]
    pub count: usize,
    /// Bytes per write.
    #[arg(long, default_value_t = 2300)]
    pub block_size: usize,
}

/// The figures of one run.
#[derive(Debug, Clone, Copy)]
pub struct Report {
    pub iops: f64,
    pub p50: Duration,
    pub p99: Duration,
}

/// Runs the measurement in `dir`.
pub fn measure(dir: &std::path::Path, count: usize, block: usize) -> anyhow::Result<Report> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(format!(".keelctl-disk-check-{}", std::process::id()));
    let result = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        let data = vec![0x5au8; block];
        let mut syncs = Vec::with_capacity(count);
        let started = Instant::now();
        for _ in 0..count.max(1) {
            file.write_all(&data)
                .with_context(|| format!("writing {}", path.display()))?;
            let t = Instant::now();
            file.sync_data()
                .with_context(|| format!("fdatasync of {}", path.display()))?;
            syncs.push(t.elapsed());
        }
        let total = started.elapsed();
        syncs.sort_unstable();
        let at = |q: f64| syncs[((syncs.len() - 1) as f64 * q).round() as usize];
        anyhow::Ok(Report {
            iops: syncs.len() as f64 / total.as_secs_f64(),
            p50: at(0.50),
            p99: at(0.99),
        })
    })();
    let _ = std::fs::remove_file(&path);
    result
}

pub fn run(args: &Args) -> anyhow::Result<bool> {
    let r = measure(&args.data_dir, args.count, args.block_size)?;
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "{} ({} writes of {} bytes, each followed by fdatasync)",
        args.data_dir.display(),
        args.count,
        args.block_size
    );
    println!("sequential write IOPS: {:.0}", r.iops);
    println!(
        "fdatasync p50: {:.3} ms, p99: {:.3} ms",
        ms(r.p50),
        ms(r.p99)
    );
    let iops_ok = r.iops >= REQUIRED_IOPS;
    let p99_ok = r.p99 < MAX_P99;
    println!(
        "IOPS: {} (required {REQUIRED_IOPS:.0}, recommended {RECOMMENDED_IOPS:.0}{})",
        if iops_ok { "PASS" } else { "FAIL" },
        if r.iops >= RECOMMENDED_IOPS {
            ": met"
        } else {
            ": not met"
        }
    );
    println!(
        "fdatasync p99: {} (under {} ms)",
        if p99_ok { "PASS" } else { "FAIL" },
        MAX_P99.as_millis()
    );
    Ok(iops_ok && p99_ok)
}
