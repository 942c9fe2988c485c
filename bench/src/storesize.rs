//! `keel-bench compare --store-keys N,…`: how etcd and keel scale with the size of the store.
//!
//! For each size `N` and each server (a fresh single member; etcd, then keel; one at a time, so
//! they never hold their stores in memory together):
//! 1. **load** `N` distinct keys (8-byte keys as etcd's benchmark makes them, 64-byte values) in
//!    transactions of 128 puts (etcd's `--max-txn-ops`) from 100 clients;
//! 2. **read** random keys of those `N` with serializable single-key ranges, 1000 clients over
//!    100 connections: requests/s, p50, server CPU per request;
//! 3. **restart**: SIGKILL, then start the member again on the same data dir and ports. The time
//!    runs from the spawn to the first answered read of the last key loaded (recovery from the
//!    backend and the WAL). Then every key is counted, and a wrong count is an error;
//! 4. **read again**, the same reads by the restarted process. etcd 3.4 copies its whole write
//!    buffer into every read transaction (`bucketBuffer.Copy` copies `len(buf)`, which keeps the
//!    size of the largest batch since start), so its reads right after a bulk load are slower
//!    than a fresh process's: both figures are kept.
//!
//! Resident memory after the load and the data dir's allocated size are reported too. The load
//! generator is keel-bench: etcd's tool cannot read random keys.
//!
//! With `--data FILE`, the figures are also appended to FILE as tab-separated `series server x y`
//! lines (series `range-keys`: x keys, y requests/s after the restart; `range-keys-after-load`;
//! `restart-keys`: x keys, y seconds), which `bench/plot.sh` draws.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use keel_proto::etcdserverpb as pb;

use crate::client::{self, ConnectOptions};
use crate::compare::{CompareOptions, RESTART_LIMIT, Server, rss_now};
use crate::run::{self, RunOptions};
use crate::workloads::{RangeRandom, TxnPut, key, value};

/// Key size, value size and puts per transaction of the load.
const KEY_SIZE: usize = 8;
const VALUE_SIZE: usize = 64;
const TXN_OPS: u64 = 128;
/// Backend quota for both servers: above etcd's 2 GiB default, which 10M keys would reach.
const QUOTA: &str = "--quota-backend-bytes=8589934592";

/// What one server did at one size.
#[derive(Debug, Clone, Copy)]
struct Row {
    load_keys_per_s: f64,
    /// Reads right after the load, by the process that loaded.
    loaded: Reads,
    /// The same reads by the restarted process.
    restarted: Reads,
    rss: u64,
    disk: u64,
    restart: f64,
    /// Peak resident memory of the restarted process, once it has counted every key.
    restart_peak: u64,
}

/// Requests/s and server CPU per request of one read run.
#[derive(Debug, Clone, Copy)]
struct Reads {
    rps: f64,
    cpu: f64,
}

/// Runs the store-size comparison; returns the Markdown report (and appends to `o.data`).
pub async fn compare_store_size(o: &CompareOptions, sizes: &[u64]) -> anyhow::Result<String> {
    if sizes.is_empty() || sizes.contains(&0) {
        bail!("--store-keys needs sizes above 0");
    }
    std::fs::create_dir_all(&o.dir)?;
    let reads = ((100_000.0 * o.scale) as u64).max(1000);
    let mut out = format!(
        "Store sizes: keys of {KEY_SIZE} B, values of {VALUE_SIZE} B, loaded in transactions of \
         {TXN_OPS} puts by 100 clients; then {reads} serializable reads of random keys by 1000 \
         clients over 100 connections; then SIGKILL and restart on the same data dir (seconds \
         from the spawn to the first answered read of the last key loaded); the restarted \
         member counts its keys, and the same reads run again. Both servers run with \
         `{QUOTA}`. Load generator: keel-bench.\n\n\
         | keys | server | load keys/s | range req/s after load | CPU µs/range after load | restart s | range req/s after restart | CPU µs/range after restart | RSS after load MiB | peak RSS after restart MiB | data dir MiB |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n"
    );
    for &n in sizes {
        let mut rows = Vec::new();
        for (name, bin) in [("etcd", &o.etcd), ("keel", &o.keel)] {
            let dir = tempfile::tempdir_in(&o.dir)?;
            eprintln!("{n} keys on {name}");
            let mut extra = vec![QUOTA];
            let flags: Vec<&str> = o.keel_flags.iter().map(String::as_str).collect();
            if name == "keel" {
                extra.extend(flags);
            }
            let row = one(name, bin, dir.path(), n, reads, &extra)
                .await
                .with_context(|| format!("{name} with {n} keys"))?;
            rows.push(row);
            // Each figure is kept as soon as it is measured: a later size may fail.
            if let Some(path) = &o.data {
                let tsv = format!(
                    "range-keys\t{name}\t{n}\t{:.1}\nrange-keys-after-load\t{name}\t{n}\t{:.1}\n\
                     restart-keys\t{name}\t{n}\t{:.3}\n",
                    row.restarted.rps, row.loaded.rps, row.restart
                );
                crate::compare::append(path, &tsv)?;
            }
            let mib = |b: u64| b as f64 / (1 << 20) as f64;
            let line = format!(
                "| {n} | {name} | {:.0} | {:.0} | {:.1} | {:.2} | {:.0} | {:.1} | {:.1} | {:.1} | {:.1} |",
                row.load_keys_per_s,
                row.loaded.rps,
                row.loaded.cpu * 1e6,
                row.restart,
                row.restarted.rps,
                row.restarted.cpu * 1e6,
                mib(row.rss),
                mib(row.restart_peak),
                mib(row.disk),
            );
            eprintln!("{line}");
            out += &line;
            out.push('\n');
        }
        let (e, k) = (rows[0], rows[1]);
        let ratio = |k: f64, e: f64| k / e.max(f64::MIN_POSITIVE);
        let bytes = |k: u64, e: u64| k as f64 / e.max(1) as f64;
        let _ = writeln!(
            out,
            "| {n} | **keel/etcd** | **{:.2}×** | **{:.2}×** | **{:.2}×** | **{:.2}×** | **{:.2}×** | **{:.2}×** | **{:.2}×** | **{:.2}×** | **{:.2}×** |",
            ratio(k.load_keys_per_s, e.load_keys_per_s),
            ratio(k.loaded.rps, e.loaded.rps),
            ratio(k.loaded.cpu, e.loaded.cpu),
            ratio(k.restart, e.restart),
            ratio(k.restarted.rps, e.restarted.rps),
            ratio(k.restarted.cpu, e.restarted.cpu),
            bytes(k.rss, e.rss),
            bytes(k.restart_peak, e.restart_peak),
            bytes(k.disk, e.disk),
        );
    }
    Ok(out)
}

/// Load, read and restart one fresh server of `n` keys.
async fn one(
    name: &'static str,
    bin: &Path,
    dir: &Path,
    n: u64,
    reads: u64,
    extra: &[&str],
) -> anyhow::Result<Row> {
    let mut server = Server::start_with(name, bin, dir, extra)?;
    let opts = ConnectOptions {
        endpoints: vec![server.endpoint.clone()],
        ..Default::default()
    };
    // Load.
    let load = TxnPut {
        key_size: KEY_SIZE,
        value: value(VALUE_SIZE),
        // One transaction never repeats a key (etcd refuses that).
        ops: TXN_OPS.min(n),
        key_space: n,
    };
    let (channels, token) = opts.connect(100).await?;
    wait_ready(&channels[0], &token, None).await?;
    let started = Instant::now();
    let outcome = run::run(
        Arc::new(load),
        &channels,
        &token,
        &RunOptions::flat_out(100, n.div_ceil(TXN_OPS.min(n))),
    )
    .await;
    let load_secs = started.elapsed().as_secs_f64();
    check(name, "the load", &outcome)?;
    let rss = rss_now(server.pid());
    let read = RangeRandom {
        key_size: KEY_SIZE,
        key_space: n,
        serializable: true,
    };
    let loaded = reads_of(name, &server, &read, &channels, &token, reads).await?;
    drop(channels);
    // Restart.
    let disk = allocated_bytes(&dir.join(name))?;
    server.stop();
    let started = Instant::now();
    server.restart()?;
    let (channels, token) = opts.connect(1).await?;
    let last = key(n - 1, KEY_SIZE);
    wait_ready(&channels[0], &token, Some(&last)).await?;
    let restart = started.elapsed().as_secs_f64();
    let count = client::kv(channels[0].clone(), &token)
        .range(pb::RangeRequest {
            key: vec![0],
            range_end: vec![0],
            count_only: true,
            ..Default::default()
        })
        .await
        .map_err(|s| anyhow::anyhow!("counting the keys: {}", s.message()))?
        .into_inner()
        .count;
    // The range key of nothing else was written: every key is a loaded one.
    if count != n as i64 {
        bail!("{name} holds {count} keys after its restart, not {n}");
    }
    let restart_peak = crate::compare::ProcStats::of(server.pid())
        .unwrap_or_default()
        .peak_rss_bytes;
    let (channels, token) = opts.connect(100).await?;
    let restarted = reads_of(name, &server, &read, &channels, &token, reads).await?;
    Ok(Row {
        load_keys_per_s: n as f64 / load_secs.max(f64::MIN_POSITIVE),
        loaded,
        restarted,
        rss,
        disk,
        restart,
        restart_peak,
    })
}

/// `total` random reads by 1000 clients over `channels`: requests/s and server CPU per read.
async fn reads_of(
    name: &str,
    server: &Server,
    read: &RangeRandom,
    channels: &[tonic::transport::Channel],
    token: &client::Token,
    total: u64,
) -> anyhow::Result<Reads> {
    let before = server.cpu_seconds();
    let outcome = run::run(
        Arc::new(read.clone()),
        channels,
        token,
        &RunOptions::flat_out(1000, total),
    )
    .await;
    let cpu = server.cpu_seconds() - before;
    check(name, "the reads", &outcome)?;
    let stats = outcome.stats();
    Ok(Reads {
        rps: stats.rps,
        cpu: cpu / stats.requests.max(1) as f64,
    })
}

/// An error if a run stopped or had a failed request.
fn check(name: &str, what: &str, outcome: &run::Outcome) -> anyhow::Result<()> {
    if let Some(why) = &outcome.aborted {
        bail!("{name} stopped answering during {what}: {why}");
    }
    let stats = outcome.stats();
    if stats.failures > 0 {
        bail!(
            "{name} failed {} requests during {what}: {:?}",
            stats.failures,
            stats.errors
        );
    }
    Ok(())
}

/// Retries a serializable read (of `key`, which must exist, or of anything) until the server
/// answers it; an error after [`RESTART_LIMIT`].
async fn wait_ready(
    channel: &tonic::transport::Channel,
    token: &client::Token,
    key: Option<&[u8]>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + RESTART_LIMIT;
    loop {
        let r = client::kv(channel.clone(), token)
            .range(pb::RangeRequest {
                key: key.unwrap_or(b"ready").to_vec(),
                serializable: true,
                ..Default::default()
            })
            .await;
        match r {
            Ok(r) if key.is_none() || r.get_ref().count == 1 => return Ok(()),
            Ok(_) => bail!("the last key loaded is missing after the restart"),
            Err(s) if Instant::now() > deadline => {
                bail!("no answer within {RESTART_LIMIT:?}: {}", s.message())
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// The disk space the files under `dir` take (allocated blocks, so sparse files count as
/// written).
fn allocated_bytes(dir: &Path) -> anyhow::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let mut stack: Vec<PathBuf> = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let entry = entry?;
            let meta = entry.metadata()?;
            if meta.is_dir() {
                stack.push(entry.path());
            } else {
                total += meta.blocks() * 512;
            }
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocated_bytes_counts_nested_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("a"), vec![1u8; 10_000]).unwrap();
        std::fs::write(dir.path().join("sub/b"), vec![1u8; 5_000]).unwrap();
        let n = allocated_bytes(dir.path()).unwrap();
        assert!((15_000..=15_000 + 4 * 4096).contains(&n), "{n}");
    }
}
