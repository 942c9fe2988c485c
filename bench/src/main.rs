//! `keel-bench`: see the crate documentation and `keel-bench --help`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use keel_bench::client::ConnectOptions;
use keel_bench::compare::{self, CompareOptions};
use keel_bench::mvcc;
use keel_bench::report::{Recorder, Stats};
use keel_bench::run::{self, Outcome, RunOptions, Workload};
use keel_bench::storesize;
use keel_bench::watchlease::{self, LeaseKeepalive, WatchLatency};
use keel_bench::workloads::{Put, Range, TxnMixed, TxnPut, value};

/// The allocator keel uses, so that `noop-server` measures keel's stack (and the load generator
/// costs less of the shared CPUs).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn duration(s: &str) -> Result<Duration, String> {
    keel::config::parse_go_duration(s)
        .ok_or_else(|| format!("{s:?} is not a duration like 5s or 100ms"))
}

/// etcd's benchmark tool, for Keel and etcd alike.
#[derive(Debug, Parser)]
#[command(name = "keel-bench", version, about, long_about = None)]
struct Cli {
    /// gRPC endpoints (host:port or URLs), comma separated.
    #[arg(
        long,
        global = true,
        value_delimiter = ',',
        default_value = "127.0.0.1:2379"
    )]
    endpoints: Vec<String>,
    /// Total number of gRPC connections.
    #[arg(long, global = true, default_value_t = 1)]
    conns: usize,
    /// Total number of gRPC clients.
    #[arg(long, global = true, default_value_t = 1)]
    clients: usize,
    /// Print every digit of the figures instead of 4 decimals.
    #[arg(long, global = true)]
    precise: bool,
    /// Also report each second's latencies and throughput.
    #[arg(long, global = true)]
    sample: bool,
    /// Dial timeout for connecting to the endpoints (0: 5s).
    #[arg(long, global = true, default_value = "0s", value_parser = duration)]
    dial_timeout: Duration,
    /// Credentials, `username[:password]`.
    #[arg(long, global = true)]
    user: Option<String>,
    /// CA bundle verifying the servers' TLS certificates.
    #[arg(long, global = true)]
    cacert: Option<PathBuf>,
    /// Client TLS certificate.
    #[arg(long, global = true)]
    cert: Option<PathBuf>,
    /// Client TLS key.
    #[arg(long, global = true)]
    key: Option<PathBuf>,
    /// Report format.
    #[arg(long, global = true, value_enum, default_value = "text")]
    output: Output,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Consistency {
    /// Linearizable.
    L,
    /// Serializable.
    S,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Benchmark put.
    Put {
        #[arg(long, default_value_t = 8)]
        key_size: usize,
        #[arg(long, default_value_t = 8)]
        val_size: usize,
        #[arg(long, default_value_t = 10_000)]
        total: u64,
        /// Maximum puts per second (0 is no limit).
        #[arg(long, default_value_t = 0.0)]
        rate: f64,
        /// Number of distinct keys.
        #[arg(long, default_value_t = 1)]
        key_space_size: u64,
        /// Use sequential keys.
        #[arg(long)]
        sequential_keys: bool,
        /// Compact every this often (0: never).
        #[arg(long, default_value = "0s", value_parser = duration)]
        compact_interval: Duration,
        /// Compact to the current revision minus this.
        #[arg(long, default_value_t = 1000)]
        compact_index_delta: i64,
    },
    /// Benchmark range.
    Range {
        #[arg(id = "range-key", value_name = "KEY")]
        key: String,
        #[arg(value_name = "END")]
        end: Option<String>,
        #[arg(long, value_enum, default_value = "l")]
        consistency: Consistency,
        #[arg(long, default_value_t = 10_000)]
        total: u64,
        #[arg(long, default_value_t = 0.0)]
        rate: f64,
        /// Maximum keys per range.
        #[arg(long, default_value_t = 0)]
        limit: i64,
        /// Only count the keys.
        #[arg(long)]
        count_only: bool,
    },
    /// Benchmark put through transactions.
    TxnPut {
        #[arg(long, default_value_t = 8)]
        key_size: usize,
        #[arg(long, default_value_t = 8)]
        val_size: usize,
        #[arg(long, default_value_t = 10_000)]
        total: u64,
        #[arg(long, default_value_t = 0.0)]
        rate: f64,
        /// Puts per transaction.
        #[arg(long, default_value_t = 1)]
        txn_ops: u64,
        #[arg(long, default_value_t = 1)]
        key_space_size: u64,
    },
    /// Benchmark a mix of read and write transactions.
    TxnMixed {
        #[arg(id = "range-key", value_name = "KEY")]
        key: String,
        #[arg(value_name = "END")]
        end: Option<String>,
        #[arg(long, default_value_t = 8)]
        key_size: usize,
        #[arg(long, default_value_t = 8)]
        val_size: usize,
        #[arg(long, default_value_t = 10_000)]
        total: u64,
        #[arg(long, default_value_t = 0.0)]
        rate: f64,
        #[arg(long, default_value_t = 1)]
        key_space_size: u64,
        #[arg(long, value_enum, default_value = "l")]
        consistency: Consistency,
        #[arg(long, default_value_t = 0)]
        limit: i64,
        /// Reads per write.
        #[arg(long, default_value_t = 1.0)]
        rw_ratio: f64,
    },
    /// Benchmark watch: watcher creation, then puts to the watched keys.
    Watch {
        /// Watch streams.
        #[arg(long, default_value_t = 10)]
        streams: usize,
        /// Watchers per stream.
        #[arg(long, default_value_t = 100)]
        watch_per_stream: usize,
        /// Enable prev_kv on the watches.
        #[arg(long)]
        prevkv: bool,
        /// Puts per second (0: as fast as possible).
        #[arg(long, default_value_t = 0.0)]
        put_rate: f64,
        #[arg(long, default_value_t = 1000)]
        put_total: u64,
        #[arg(long, default_value_t = 32)]
        key_size: usize,
        #[arg(long, default_value_t = 1)]
        key_space_size: u64,
        #[arg(long)]
        sequential_keys: bool,
    },
    /// Benchmark ranges while watchers receive events.
    WatchGet {
        /// Watchers in all.
        #[arg(long, default_value_t = 10_000)]
        watchers: usize,
        /// Watch streams.
        #[arg(long, default_value_t = 1)]
        streams: usize,
        /// Events (puts) each watcher receives.
        #[arg(long, default_value_t = 8)]
        events: u64,
    },
    /// Benchmark the latency from a put to its watchers' events (`--clients` watchers).
    WatchLatency {
        #[arg(long, default_value_t = 10_000)]
        total: u64,
        /// Puts per second.
        #[arg(long, default_value_t = 100.0)]
        put_rate: f64,
        #[arg(long, default_value_t = 32)]
        key_size: usize,
        #[arg(long, default_value_t = 32)]
        val_size: usize,
        /// Watch the key as a prefix (Keel's extension).
        #[arg(long)]
        prefix: bool,
    },
    /// Benchmark lease keep-alives.
    LeaseKeepalive {
        /// Keep-alive requests in all.
        #[arg(long, default_value_t = 10_000)]
        total: u64,
        /// Leases granted first, over the clients (Keel's extension; default one per client).
        #[arg(long, default_value_t = 0)]
        leases: u64,
        /// TTL of the granted leases, seconds.
        #[arg(long, default_value_t = 100)]
        ttl: i64,
    },
    /// Benchmark the MVCC store directly (no network).
    Mvcc {
        #[command(subcommand)]
        command: MvccCmd,
    },
    /// Serve etcd's KV service with no-op handlers on keel's network stack (the floor `compare`
    /// measures keel against), until stopped.
    NoopServer {
        /// The address to listen on.
        #[arg(long, default_value = "127.0.0.1:2379")]
        listen: std::net::SocketAddr,
        /// Network threads (default: one per CPU, as keel's `--net-threads`).
        #[arg(long)]
        net_threads: Option<usize>,
        /// The size of the value every range answers with (the key is the requested one).
        #[arg(long, default_value_t = 0)]
        range_value_size: usize,
    },
    /// Start fresh etcd and keel servers and run the etcd docs' workloads on both.
    Compare {
        /// The keel binary (default: next to this one).
        #[arg(long)]
        keel: Option<PathBuf>,
        /// The etcd binary.
        #[arg(long, default_value = "etcd")]
        etcd: PathBuf,
        /// Where the servers' temporary data dirs go (same disk for both).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Measurements per workload and server, interleaved.
        #[arg(long, default_value_t = 2)]
        rounds: usize,
        /// Multiplier of every workload's total.
        #[arg(long, default_value_t = 1.0)]
        scale: f64,
        /// Members per cluster.
        #[arg(long, default_value_t = 1)]
        members: usize,
        /// Only workloads whose name contains this (repeatable).
        #[arg(long)]
        only: Vec<String>,
        /// The load generator: `keel-bench` (this tool) or `etcd-benchmark` (etcd's own
        /// `benchmark`, whose path `--etcd-benchmark` gives).
        #[arg(long, default_value = "keel-bench", value_parser = ["keel-bench", "etcd-benchmark"])]
        client: String,
        /// etcd's `benchmark` binary (see ../shared/tools/build-etcd-benchmark.sh).
        #[arg(long, default_value = "/tmp/etcd-bench-bin/benchmark")]
        etcd_benchmark: PathBuf,
        /// An extra flag for keel's members (repeatable; etcd gets none).
        #[arg(long)]
        keel_flag: Vec<String>,
        /// Append the report, with date, machine and command, to this file.
        #[arg(long)]
        results: Option<PathBuf>,
        /// Append the figures that `bench/plot.sh` draws to this file (tab-separated `series
        /// server x y` lines).
        #[arg(long)]
        data: Option<PathBuf>,
        /// Run the store-size comparison instead of the KV table: for each of these key counts,
        /// load, random reads and a restart after SIGKILL (e.g. `10000,1000000,10000000`).
        #[arg(long, value_delimiter = ',')]
        store_keys: Vec<u64>,
        /// Run the watch and lease scale comparison instead of the KV table.
        #[arg(long)]
        watch_lease: bool,
        /// Watchers of the scale comparison.
        #[arg(long, default_value_t = 10_000)]
        watchers: usize,
        /// Puts per second while they watch.
        #[arg(long, default_value_t = 1000.0)]
        put_rate: f64,
        /// Puts in all while they watch.
        #[arg(long, default_value_t = 5000)]
        puts: u64,
        /// Leases granted and kept alive.
        #[arg(long, default_value_t = 100_000)]
        leases: u64,
    },
}

#[derive(Debug, Subcommand)]
enum MvccCmd {
    /// Puts in write transactions.
    Put {
        #[arg(long, default_value_t = 100)]
        total: u64,
        #[arg(long, default_value_t = 64)]
        key_size: usize,
        #[arg(long, default_value_t = 128)]
        val_size: usize,
        /// Puts per transaction.
        #[arg(long, default_value_t = 1)]
        txn_ops: u64,
    },
}

impl Cli {
    fn connect_options(&self) -> ConnectOptions {
        ConnectOptions {
            endpoints: self.endpoints.clone(),
            dial_timeout: self.dial_timeout,
            user: self.user.clone(),
            cacert: self.cacert.clone(),
            cert: self.cert.clone(),
            key: self.key.clone(),
        }
    }

    fn run_options(&self, total: u64, rate: f64) -> RunOptions {
        RunOptions {
            clients: self.clients,
            total,
            rate,
            sample: self.sample,
            progress: self.output == Output::Text,
            compact_interval: Duration::ZERO,
            compact_delta: 0,
        }
    }

    /// Prints the reports; whether everything succeeded.
    fn print(&self, names: &[&str], recorders: &[Recorder], elapsed: Duration) -> bool {
        let stats: Vec<Stats> = recorders.iter().map(|r| Stats::new(r, elapsed)).collect();
        match self.output {
            Output::Text => {
                for (name, s) in names.iter().zip(&stats) {
                    if !name.is_empty() {
                        print!("\n{name} summary:");
                    }
                    print!("{}", s.text(self.precise));
                }
            }
            Output::Json => {
                let j: serde_json::Map<String, serde_json::Value> = names
                    .iter()
                    .zip(&stats)
                    .map(|(n, s)| {
                        (
                            if n.is_empty() { "report" } else { n }.to_lowercase(),
                            s.json(),
                        )
                    })
                    .collect();
                println!("{}", serde_json::Value::Object(j));
            }
        }
        stats.iter().all(|s| s.failures == 0)
    }
}

async fn network(cli: &Cli, workload: Arc<dyn Workload>, opts: RunOptions) -> anyhow::Result<bool> {
    let (channels, token) = cli.connect_options().connect(cli.conns).await?;
    let names = workload.classes();
    let outcome = run::run(workload, &channels, &token, &opts).await;
    finish(cli, &names, outcome, opts.total)
}

/// Prints a run's report; fails if the server stopped answering.
fn finish(cli: &Cli, names: &[&str], outcome: Outcome, total: u64) -> anyhow::Result<bool> {
    let Outcome {
        recorders,
        elapsed,
        aborted,
    } = outcome;
    let ok = cli.print(names, &recorders, elapsed);
    if let Some(why) = aborted {
        let done: u64 = recorders.iter().map(|r| r.successes()).sum();
        anyhow::bail!(
            "the run stopped after {done} of {total} requests: the server cannot be reached ({why})"
        );
    }
    Ok(ok)
}

async fn main_async(cli: Cli) -> anyhow::Result<bool> {
    match &cli.command {
        Cmd::Put {
            key_size,
            val_size,
            total,
            rate,
            key_space_size,
            sequential_keys,
            compact_interval,
            compact_index_delta,
        } => {
            let w = Put {
                key_size: *key_size,
                value: value(*val_size),
                sequential: *sequential_keys,
                key_space: *key_space_size,
            };
            let mut opts = cli.run_options(*total, *rate);
            opts.compact_interval = *compact_interval;
            opts.compact_delta = *compact_index_delta;
            network(&cli, Arc::new(w), opts).await
        }
        Cmd::Range {
            key,
            end,
            consistency,
            total,
            rate,
            limit,
            count_only,
        } => {
            let w = Range {
                key: key.clone().into_bytes(),
                end: end.clone().unwrap_or_default().into_bytes(),
                serializable: *consistency == Consistency::S,
                limit: *limit,
                count_only: *count_only,
            };
            network(&cli, Arc::new(w), cli.run_options(*total, *rate)).await
        }
        Cmd::TxnPut {
            key_size,
            val_size,
            total,
            rate,
            txn_ops,
            key_space_size,
        } => {
            let w = TxnPut {
                key_size: *key_size,
                value: value(*val_size),
                ops: *txn_ops,
                key_space: *key_space_size,
            };
            network(&cli, Arc::new(w), cli.run_options(*total, *rate)).await
        }
        Cmd::TxnMixed {
            key,
            end,
            key_size,
            val_size,
            total,
            rate,
            key_space_size,
            consistency,
            limit,
            rw_ratio,
        } => {
            let w = TxnMixed {
                read: Range {
                    key: key.clone().into_bytes(),
                    end: end.clone().unwrap_or_default().into_bytes(),
                    serializable: *consistency == Consistency::S,
                    limit: *limit,
                    count_only: false,
                },
                rw_ratio: *rw_ratio,
                key_size: *key_size,
                value: value(*val_size),
                key_space: *key_space_size,
            };
            network(&cli, Arc::new(w), cli.run_options(*total, *rate)).await
        }
        Cmd::Watch {
            streams,
            watch_per_stream,
            prevkv,
            put_rate,
            put_total,
            key_size,
            key_space_size,
            sequential_keys,
        } => {
            let o = watchlease::WatchBench {
                streams: *streams,
                per_stream: *watch_per_stream,
                put_total: *put_total,
                put_rate: *put_rate,
                key_size: *key_size,
                key_space: *key_space_size,
                sequential: *sequential_keys,
                prev_kv: *prevkv,
                sample: cli.sample,
            };
            let (channels, token) = cli.connect_options().connect(cli.conns).await?;
            let out = watchlease::watch(&o, &channels, &token).await;
            if cli.output == Output::Text {
                println!("Watch creation summary:");
            }
            let created = finish(&cli, &[""], out.creation, (o.streams * o.per_stream) as u64)?;
            if cli.output == Output::Text {
                println!("\nWatch put summary:");
            }
            let puts = finish(&cli, &[""], out.puts, o.put_total)?;
            Ok(created && puts)
        }
        Cmd::WatchGet {
            watchers,
            streams,
            events,
        } => {
            let o = watchlease::WatchGet {
                watchers: *watchers,
                streams: *streams,
                events: *events,
                sample: cli.sample,
            };
            let (channels, token) = cli.connect_options().connect(cli.conns).await?;
            let outcome = watchlease::watch_get(&o, &channels, &token, cli.clients).await;
            if cli.output == Output::Text {
                println!("Get summary:");
            }
            finish(&cli, &[""], outcome, 0)
        }
        Cmd::WatchLatency {
            total,
            put_rate,
            key_size,
            val_size,
            prefix,
        } => {
            let o = WatchLatency {
                total: *total,
                put_rate: *put_rate,
                key: value(*key_size),
                value: value(*val_size),
                prefix: *prefix,
                sample: cli.sample,
            };
            let (channels, token) = cli.connect_options().connect(cli.conns + 1).await?;
            let (put, watch) = channels.split_first().expect("at least one");
            let outcome =
                watchlease::watch_latency(&o, watch, put.clone(), &token, cli.clients).await;
            finish(&cli, &[""], outcome, o.total * cli.clients.max(1) as u64)
        }
        Cmd::LeaseKeepalive { total, leases, ttl } => {
            let o = LeaseKeepalive {
                total: *total,
                leases: *leases,
                ttl: *ttl,
                sample: cli.sample,
            };
            let (channels, token) = cli.connect_options().connect(cli.conns).await?;
            let outcome = watchlease::lease_keepalive(&o, &channels, &token, cli.clients).await;
            finish(&cli, &[""], outcome, o.total)
        }
        Cmd::Mvcc {
            command:
                MvccCmd::Put {
                    total,
                    key_size,
                    val_size,
                    txn_ops,
                },
        } => {
            let o = mvcc::MvccPut {
                total: *total,
                key_size: *key_size,
                val_size: *val_size,
                txn_ops: *txn_ops,
                sample: cli.sample,
            };
            let (rec, elapsed) = mvcc::put(&o, &std::env::temp_dir())?;
            Ok(cli.print(&[""], &[rec], elapsed))
        }
        Cmd::NoopServer { .. } => anyhow::bail!("noop-server runs on its own runtime"),
        Cmd::Compare {
            keel,
            etcd,
            dir,
            rounds,
            scale,
            members,
            only,
            client,
            etcd_benchmark,
            keel_flag,
            results,
            data,
            store_keys,
            watch_lease,
            watchers,
            put_rate,
            puts,
            leases,
        } => {
            let keel = match keel {
                Some(k) => k.clone(),
                None => std::env::current_exe()?.with_file_name("keel"),
            };
            let o = CompareOptions {
                keel,
                etcd: etcd.clone(),
                dir: dir.clone().unwrap_or_else(std::env::temp_dir),
                rounds: *rounds,
                scale: *scale,
                members: *members,
                only: only.clone(),
                etcd_benchmark: (client == "etcd-benchmark").then(|| etcd_benchmark.clone()),
                keel_flags: keel_flag.clone(),
                data: data.clone(),
            };
            let table = if !store_keys.is_empty() {
                storesize::compare_store_size(&o, store_keys).await?
            } else if *watch_lease {
                let s = compare::ScaleOptions {
                    watchers: *watchers,
                    put_rate: *put_rate,
                    puts: *puts,
                    leases: *leases,
                };
                compare::compare_scale(&o, &s).await?
            } else {
                compare::compare(&o).await?
            };
            let command: Vec<String> = std::env::args().collect();
            let section = format!(
                "## {} · keel vs etcd (keel-bench compare)\n\nMachine: {}. etcd: `{}`.\n\nCommand:\n\n```sh\n{}\n```\n\n{table}",
                compare::today(),
                compare::machine(),
                o.etcd.display(),
                command.join(" ")
            );
            println!("{section}");
            if let Some(path) = results {
                use std::io::Write;
                let mut f = std::fs::OpenOptions::new()
                    .append(true)
                    .create(true)
                    .open(path)
                    .with_context(|| format!("opening {}", path.display()))?;
                writeln!(f, "\n{section}")?;
            }
            Ok(true)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Cmd::NoopServer {
        listen,
        net_threads,
        range_value_size,
    } = cli.command
    {
        let threads = keel::net::threads(net_threads);
        return match keel_bench::noop::serve(listen, threads, range_value_size) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("keel-bench: noop-server: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("keel-bench: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(main_async(cli)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("keel-bench: some requests failed (see the error distribution)");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("keel-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn etcd_benchmark_command_lines_parse() {
        let cli = Cli::try_parse_from([
            "keel-bench",
            "--endpoints=10.0.0.1:2379,10.0.0.2:2379",
            "--conns=100",
            "--clients=1000",
            "put",
            "--key-size=8",
            "--sequential-keys",
            "--total=100000",
            "--val-size=256",
            "--compact-interval=10s",
        ])
        .unwrap();
        assert_eq!(cli.endpoints, ["10.0.0.1:2379", "10.0.0.2:2379"]);
        assert_eq!((cli.conns, cli.clients), (100, 1000));
        match cli.command {
            Cmd::Put {
                key_size,
                val_size,
                total,
                sequential_keys,
                compact_interval,
                key_space_size,
                ..
            } => {
                assert_eq!((key_size, val_size, total), (8, 256, 100_000));
                assert!(sequential_keys);
                assert_eq!(compact_interval, Duration::from_secs(10));
                assert_eq!(key_space_size, 1);
            }
            other => panic!("{other:?}"),
        }
        let cli = Cli::try_parse_from([
            "keel-bench",
            "range",
            "foo",
            "fop",
            "--consistency=s",
            "--total=10",
            "--key=/tls.key",
        ])
        .unwrap();
        assert_eq!(cli.key, Some(PathBuf::from("/tls.key")));
        match cli.command {
            Cmd::Range {
                key,
                end,
                consistency,
                total,
                ..
            } => {
                assert_eq!((key.as_str(), end.as_deref()), ("foo", Some("fop")));
                assert_eq!((consistency, total), (Consistency::S, 10));
            }
            other => panic!("{other:?}"),
        }
        assert!(
            Cli::try_parse_from(["keel-bench", "range"]).is_err(),
            "KEY is required"
        );
        assert!(Cli::try_parse_from(["keel-bench", "put", "--total=x"]).is_err());
        assert!(Cli::try_parse_from(["keel-bench", "--dial-timeout=5 parsecs", "put"]).is_err());
        let cli = Cli::try_parse_from(["keel-bench", "mvcc", "put", "--txn-ops=10"]).unwrap();
        assert!(matches!(
            cli.command,
            Cmd::Mvcc {
                command: MvccCmd::Put { txn_ops: 10, .. }
            }
        ));
    }
}
