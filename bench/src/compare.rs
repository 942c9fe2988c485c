//! `keel-bench compare`: a fresh single-member etcd (Debian's `etcd-server`) and a fresh `keel`,
//! on loopback with temporary data dirs on the same disk, run the etcd docs' workload table (plus
//! puts at 10 and 100 clients, for the scale between its 1 and 1000)
//! interleaved (for each workload and round: etcd, then keel). Each row has both servers'
//! requests/s and p50 latency (medians over the rounds), their ratio, and the server CPU time per
//! request; each server's peak RSS and CPU seconds close the table.
//!
//! A second table gives the ceilings of the same run: the client-bound one, `(c + etcd CPU) /
//! (c + keel CPU)` with `c` the load generator's measured CPU per request (its own process for
//! keel-bench, the reaped child for etcd's tool), and, beside a single member, the throughput of
//! `keel-bench noop-server` (keel's network stack doing nothing) under the same load.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use keel_proto::etcdserverpb as pb;

use crate::client::{self, ConnectOptions};
use crate::report::Stats;
use crate::run::{self, RunOptions, Workload};
use crate::workloads::{Put, Range, TxnPut, value};

/// Settings of a comparison.
#[derive(Debug, Clone)]
pub struct CompareOptions {
    pub keel: PathBuf,
    pub etcd: PathBuf,
    pub dir: PathBuf,
    pub rounds: usize,
    /// Multiplies every workload's total (e.g. 0.1 for a quick run).
    pub scale: f64,
    pub members: usize,
    /// Only the workloads whose names contain one of these (all when empty).
    pub only: Vec<String>,
    /// The load generator: keel-bench itself, or etcd's own `benchmark` tool at this path.
    pub etcd_benchmark: Option<PathBuf>,
    /// Extra flags for keel's members (Keel's own tuning flags; etcd gets none).
    pub keel_flags: Vec<String>,
    /// Append the plotted figures here, as `series server x y` lines (see `bench/plot.sh`).
    pub data: Option<PathBuf>,
}

/// One row of the table.
pub struct Spec {
    pub name: &'static str,
    pub conns: usize,
    pub clients: usize,
    pub total: u64,
    pub workload: Arc<dyn Workload>,
    /// The same workload as etcd's `benchmark` command line (after the global flags; the
    /// total is appended).
    pub etcd_args: &'static [&'static str],
}

/// How long a fresh server may take to listen.
const START_LIMIT: Duration = Duration::from_secs(30);
/// How long a restarted server may take to listen and answer: it recovers its data dir, which
/// for etcd and keel alike grows with the keys it holds.
pub const RESTART_LIMIT: Duration = Duration::from_secs(600);

/// The key the range workloads read (written before the runs, with a value of
/// [`RANGE_VALUE_SIZE`] bytes; the no-op server answers ranges with a value of that size).
pub const RANGE_KEY: &[u8] = b"foo";
/// The size of the value under [`RANGE_KEY`].
pub const RANGE_VALUE_SIZE: usize = 256;

/// The etcd docs' performance table: key 8 B, value 256 B.
pub fn table() -> Vec<Spec> {
    let v = value(256);
    let put = |space| -> Arc<dyn Workload> {
        Arc::new(Put {
            key_size: 8,
            value: v.clone(),
            sequential: true,
            key_space: space,
        })
    };
    let range = |serializable| -> Arc<dyn Workload> {
        Arc::new(Range {
            key: RANGE_KEY.to_vec(),
            end: vec![],
            serializable,
            limit: 0,
            count_only: false,
        })
    };
    let spec = |name, conns, clients, total, workload, etcd_args| Spec {
        name,
        conns,
        clients,
        total,
        workload,
        etcd_args,
    };
    const PUT_1: &[&str] = &[
        "put",
        "--key-size=8",
        "--val-size=256",
        "--sequential-keys",
        "--key-space-size=10000",
    ];
    const PUT: &[&str] = &[
        "put",
        "--key-size=8",
        "--val-size=256",
        "--sequential-keys",
        "--key-space-size=100000",
    ];
    const RANGE_L: &[&str] = &["range", "foo", "--consistency=l"];
    const RANGE_S: &[&str] = &["range", "foo", "--consistency=s"];
    const TXN_PUT: &[&str] = &[
        "txn-put",
        "--key-size=8",
        "--val-size=256",
        "--txn-ops=1",
        "--key-space-size=100000",
    ];
    vec![
        spec("put, 1 conn, 1 client", 1, 1, 10_000, put(10_000), PUT_1),
        // Between the docs' two put rows: how throughput scales with clients.
        spec(
            "put, 10 conns, 10 clients",
            10,
            10,
            20_000,
            put(100_000),
            PUT,
        ),
        spec(
            "put, 100 conns, 100 clients",
            100,
            100,
            50_000,
            put(100_000),
            PUT,
        ),
        spec(
            "put, 100 conns, 1000 clients",
            100,
            1000,
            100_000,
            put(100_000),
            PUT,
        ),
        spec(
            "range linearizable, 1 conn, 1 client",
            1,
            1,
            10_000,
            range(false),
            RANGE_L,
        ),
        spec(
            "range serializable, 1 conn, 1 client",
            1,
            1,
            10_000,
            range(true),
            RANGE_S,
        ),
        spec(
            "range linearizable, 100 conns, 1000 clients",
            100,
            1000,
            100_000,
            range(false),
            RANGE_L,
        ),
        spec(
            "range serializable, 100 conns, 1000 clients",
            100,
            1000,
            100_000,
            range(true),
            RANGE_S,
        ),
        spec(
            "txn-put, 100 conns, 1000 clients",
            100,
            1000,
            100_000,
            Arc::new(TxnPut {
                key_size: 8,
                value: v.clone(),
                ops: 1,
                key_space: 100_000,
            }),
            TXN_PUT,
        ),
    ]
}

/// A server under test (etcd or keel: the same flags), killed when dropped.
pub struct Server {
    name: &'static str,
    child: Child,
    /// Its client URL.
    pub endpoint: String,
    log: PathBuf,
    /// How it was started, for [`restart`](Self::restart): binary, arguments, client port.
    bin: PathBuf,
    args: Vec<String>,
    port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(crate::ports::free_port()?)
}

impl Server {
    /// Starts `bin` as member `name` on free loopback ports, data in `dir/name`, log in
    /// `dir/name.log`; waits until it listens.
    pub fn start(name: &'static str, bin: &Path, dir: &Path) -> anyhow::Result<Server> {
        Server::start_with(name, bin, dir, &[])
    }

    /// [`start`](Self::start) with extra flags.
    pub fn start_with(
        name: &'static str,
        bin: &Path,
        dir: &Path,
        extra: &[&str],
    ) -> anyhow::Result<Server> {
        let (port, peer) = (free_port()?, free_port()?);
        let endpoint = format!("http://127.0.0.1:{port}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let mut args = vec![
            "--name=bench".to_string(),
            format!("--data-dir={}", dir.join(name).display()),
            format!("--listen-client-urls={endpoint}"),
            format!("--advertise-client-urls={endpoint}"),
            format!("--listen-peer-urls={peer_url}"),
            format!("--initial-advertise-peer-urls={peer_url}"),
            format!("--initial-cluster=bench={peer_url}"),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        let log = dir.join(format!("{name}.log"));
        Server::spawn(name, bin, args, port, log, START_LIMIT)
    }

    /// Starts `bin args` (its client URL on `port`, stderr to `log`) and waits until it listens
    /// (`limit` at most).
    fn spawn(
        name: &'static str,
        bin: &Path,
        args: Vec<String>,
        port: u16,
        log: PathBuf,
        limit: Duration,
    ) -> anyhow::Result<Server> {
        let child = Command::new(bin)
            .args(&args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut s = Server {
            name,
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
            log,
            bin: bin.to_path_buf(),
            args,
            port,
        };
        s.wait_listening(port, limit)?;
        Ok(s)
    }

    /// Kills it (SIGKILL: no clean shutdown) and starts it again with the same data dir, flags
    /// and ports; returns once it listens (its log is kept beside, as `NAME.log.1` and so on).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        let mut n = 1;
        while self.log.with_extension(format!("log.{n}")).exists() {
            n += 1;
        }
        std::fs::rename(&self.log, self.log.with_extension(format!("log.{n}")))?;
        let fresh = Server::spawn(
            self.name,
            &self.bin.clone(),
            self.args.clone(),
            self.port,
            self.log.clone(),
            RESTART_LIMIT,
        )?;
        *self = fresh;
        Ok(())
    }

    /// Waits until the server listens on `port` (`START_LIMIT` at most, or `RESTART_LIMIT` when
    /// it recovers a data dir); an error if it exits first.
    fn wait_listening(&mut self, port: u16, limit: Duration) -> anyhow::Result<()> {
        let name = self.name;
        let deadline = Instant::now() + limit;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = self.child.try_wait()? {
                bail!("{name} exited ({status}); its log: {}", self.log.display());
            }
            if Instant::now() > deadline {
                bail!(
                    "{name} did not listen within {limit:?}; its log: {}",
                    self.log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    fn proc(&self) -> ProcStats {
        ProcStats::of(self.child.id()).unwrap_or_default()
    }

    /// Starts `bin` as member `member` of a cluster (`initial_cluster`), on `client` and `peer`
    /// ports; waits until it listens.
    fn start_member(
        name: &'static str,
        bin: &Path,
        dir: &Path,
        member: &str,
        (client, peer): (u16, u16),
        initial_cluster: &str,
        extra: &[String],
    ) -> anyhow::Result<Server> {
        let endpoint = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let mut args = vec![
            format!("--name={member}"),
            format!(
                "--data-dir={}",
                dir.join(format!("{name}-{member}")).display()
            ),
            format!("--listen-client-urls={endpoint}"),
            format!("--advertise-client-urls={endpoint}"),
            format!("--listen-peer-urls={peer_url}"),
            format!("--initial-advertise-peer-urls={peer_url}"),
            format!("--initial-cluster={initial_cluster}"),
            "--initial-cluster-token=bench".to_string(),
        ];
        args.extend(extra.iter().cloned());
        let log = dir.join(format!("{name}-{member}.log"));
        Server::spawn(name, bin, args, client, log, START_LIMIT)
    }

    /// Starts `keel-bench noop-server` (`bench`: this tool's binary) on a free port: keel's network
    /// stack answering every KV request with nothing done, its responses the size of keel's.
    /// Log in `dir/no-op.log`.
    fn start_noop(bench: &Path, dir: &Path) -> anyhow::Result<Server> {
        let port = free_port()?;
        let args = vec![
            "noop-server".to_string(),
            format!("--listen=127.0.0.1:{port}"),
            format!("--range-value-size={RANGE_VALUE_SIZE}"),
        ];
        let log = dir.join("no-op.log");
        Server::spawn("no-op", bench, args, port, log, START_LIMIT)
    }

    /// Kills it now (SIGKILL).
    pub fn kill(&mut self) -> std::io::Result<()> {
        self.child.kill()
    }

    /// Kills it (SIGKILL) and waits until it has exited.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Its process ID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its CPU time so far (user + system seconds).
    pub fn cpu_seconds(&self) -> f64 {
        self.proc().cpu_seconds
    }

    /// If the process has exited: its status and the end of its log.
    pub fn exited(&mut self) -> Option<String> {
        let status = self.child.try_wait().ok()??;
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        Some(format!(
            "{} exited ({status}); its log ends:\n{}",
            self.name,
            tail.join("\n")
        ))
    }
}

/// CPU seconds and peak resident memory of a process, from `/proc`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProcStats {
    pub cpu_seconds: f64,
    pub peak_rss_bytes: u64,
}

impl ProcStats {
    pub fn of(pid: u32) -> Option<ProcStats> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        ProcStats::parse(&stat, &status)
    }

    /// CPU time from `stat`; peak RSS from `status` (`VmHWM`, in kB).
    pub fn parse(stat: &str, status: &str) -> Option<ProcStats> {
        let hwm_kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(ProcStats {
            cpu_seconds: keel::metrics::cpu_seconds(stat)?,
            peak_rss_bytes: hwm_kb * 1024,
        })
    }
}

/// The servers of one system under test: one member, or a cluster started the same way for
/// etcd and keel (loopback, same flags).
pub struct Deployment {
    pub name: &'static str,
    pub members: Vec<Server>,
}

impl Deployment {
    /// Starts `n` members of `bin`, each with the `extra` flags.
    pub fn start(
        name: &'static str,
        bin: &Path,
        dir: &Path,
        n: usize,
        extra: &[String],
    ) -> anyhow::Result<Self> {
        let ports: Vec<(u16, u16)> = (0..n)
            .map(|_| Ok((free_port()?, free_port()?)))
            .collect::<anyhow::Result<_>>()?;
        let cluster: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(i, (_, p))| format!("m{i}=http://127.0.0.1:{p}"))
            .collect();
        let cluster = cluster.join(",");
        let mut members = Vec::new();
        for (i, p) in ports.iter().enumerate() {
            let member = format!("m{i}");
            members.push(Server::start_member(
                name, bin, dir, &member, *p, &cluster, extra,
            )?);
        }
        Ok(Deployment { name, members })
    }

    /// Every member's client URL.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.endpoint.clone()).collect()
    }

    /// CPU summed over the members; peak RSS of the largest member.
    fn proc(&self) -> ProcStats {
        let all: Vec<ProcStats> = self.members.iter().map(Server::proc).collect();
        ProcStats {
            cpu_seconds: all.iter().map(|p| p.cpu_seconds).sum(),
            peak_rss_bytes: all.iter().map(|p| p.peak_rss_bytes).max().unwrap_or(0),
        }
    }
}

/// One measurement of a workload on a server.
#[derive(Debug, Clone, Copy)]
struct Sample {
    rps: f64,
    p50: f64,
    cpu_per_request: f64,
    /// The load generator's CPU time per request (user + system).
    client_cpu_per_request: f64,
    /// Requests the server refused (overload: "too many requests"); counted, not fatal.
    refused: u64,
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Runs etcd's own `benchmark` tool for `spec` against `server`: its requests/s and p50 from its
/// report, the servers' CPU from `/proc`.
fn measure_with_etcd_benchmark(
    tool: &Path,
    server: &Deployment,
    spec: &Spec,
    total: u64,
) -> anyhow::Result<Sample> {
    let endpoints: Vec<String> = server
        .endpoints()
        .iter()
        .map(|e| e.trim_start_matches("http://").to_string())
        .collect();
    let before = server.proc();
    let client_before = cpu_seconds(libc::RUSAGE_CHILDREN);
    let out = Command::new(tool)
        .arg(format!("--endpoints={}", endpoints.join(",")))
        .arg(format!("--conns={}", spec.conns))
        .arg(format!("--clients={}", spec.clients))
        .args(spec.etcd_args)
        .arg(format!("--total={total}"))
        .output()
        .with_context(|| format!("running {}", tool.display()))?;
    let after = server.proc();
    // The servers are children too, but are reaped only at the end: the children's usage grew
    // by the benchmark tool's alone.
    let client = cpu_seconds(libc::RUSAGE_CHILDREN) - client_before;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "etcd's benchmark failed on {} during {:?}: {}",
            server.name,
            spec.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let (rps, p50) = parse_etcd_report(&text)
        .with_context(|| format!("reading etcd's benchmark report: {text}"))?;
    Ok(Sample {
        refused: 0,
        rps,
        p50,
        cpu_per_request: (after.cpu_seconds - before.cpu_seconds) / total.max(1) as f64,
        client_cpu_per_request: client / total.max(1) as f64,
    })
}

/// User + system CPU seconds of `who` (`RUSAGE_SELF`: this process, the in-process load
/// generator; `RUSAGE_CHILDREN`: its reaped children, the benchmark tool runs).
fn cpu_seconds(who: libc::c_int) -> f64 {
    // SAFETY: `getrusage` writes one `rusage` into the zeroed value it is given; `who` is one of
    // the two constants above, so it cannot fail.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(who, &mut usage);
        usage
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// Requests/s and the p50 latency (seconds) of etcd's `benchmark` report.
pub fn parse_etcd_report(text: &str) -> anyhow::Result<(f64, f64)> {
    let rps = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .context("no Requests/sec")?;
    let p50 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("50% in "))
        .and_then(|v| v.trim().trim_end_matches("secs.").trim().parse().ok())
        .context("no 50% latency")?;
    Ok((rps, p50))
}

async fn measure(
    o: &CompareOptions,
    server: &Deployment,
    spec: &Spec,
    total: u64,
) -> anyhow::Result<Sample> {
    if let Some(tool) = &o.etcd_benchmark {
        return measure_with_etcd_benchmark(tool, server, spec, total);
    }
    let opts = ConnectOptions {
        endpoints: server.endpoints(),
        ..Default::default()
    };
    let (channels, token) = opts.connect(spec.conns).await?;
    let before = server.proc();
    let client_before = cpu_seconds(libc::RUSAGE_SELF);
    let outcome = run::run(
        spec.workload.clone(),
        &channels,
        &token,
        &RunOptions::flat_out(spec.clients, total),
    )
    .await;
    let after = server.proc();
    let client = cpu_seconds(libc::RUSAGE_SELF) - client_before;
    let stats = outcome.stats();
    if let Some(why) = outcome.aborted {
        bail!(
            "{} stopped answering during {:?}: {why}",
            server.name,
            spec.name
        );
    }
    if stats.failures > 0 {
        eprintln!(
            "{} refused requests during {:?}: {:?}",
            server.name, spec.name, stats.errors
        );
    }
    Ok(Sample {
        refused: stats.failures,
        rps: stats.rps,
        p50: stats.percentile(50.0),
        cpu_per_request: (after.cpu_seconds - before.cpu_seconds) / stats.requests.max(1) as f64,
        client_cpu_per_request: client / stats.requests.max(1) as f64,
    })
}

/// Writes the range workloads' key, retrying while a new cluster elects its leader.
async fn preload(server: &Deployment) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    for endpoint in server.endpoints() {
        let opts = ConnectOptions {
            endpoints: vec![endpoint],
            ..Default::default()
        };
        let (channels, token) = opts.connect(1).await?;
        loop {
            let put = client::kv(channels[0].clone(), &token)
                .put(pb::PutRequest {
                    key: RANGE_KEY.to_vec(),
                    value: value(RANGE_VALUE_SIZE),
                    ..Default::default()
                })
                .await;
            match put {
                Ok(_) => break,
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(s) => bail!("{}: {}", server.name, s.message()),
            }
        }
    }
    Ok(())
}

/// The disk's reference latency, measured beside the servers: p50 of a 4 KiB overwrite plus
/// fdatasync of a file in `dir` (500 rounds over a pre-written, synced 2 MiB file).
pub fn raw_fdatasync_p50(dir: &Path) -> anyhow::Result<f64> {
    use std::os::unix::fs::FileExt;
    let path = dir.join("fdatasync-probe");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)?;
    let block = vec![7u8; 4096];
    for i in 0..512u64 {
        f.write_at(&block, i * 4096)?;
    }
    f.sync_all()?;
    let mut lat = Vec::with_capacity(500);
    for i in 0..500u64 {
        let t = Instant::now();
        f.write_at(&block, (i % 512) * 4096)?;
        f.sync_data()?;
        lat.push(t.elapsed().as_secs_f64());
    }
    std::fs::remove_file(&path)?;
    Ok(median(lat))
}

/// Runs the comparison; returns the Markdown report.
pub async fn compare(o: &CompareOptions) -> anyhow::Result<String> {
    if !(1..=7).contains(&o.members) {
        bail!("--members must be between 1 and 7, not {}", o.members);
    }
    if !o.keel.exists() {
        bail!(
            "no keel binary at {} (build it: cargo build --release -p keel, or pass --keel)",
            o.keel.display()
        );
    }
    std::fs::create_dir_all(&o.dir)?;
    let dir = tempfile::tempdir_in(&o.dir)?;
    let etcd = Deployment::start("etcd", &o.etcd, dir.path(), o.members, &[])?;
    let keel = Deployment::start("keel", &o.keel, dir.path(), o.members, &o.keel_flags)?;
    // The floor of keel's network stack, beside a single member (the same client, connections
    // and messages; nothing stored).
    let noop = if o.members == 1 {
        let bench = std::env::current_exe().context("finding keel-bench's own binary")?;
        Some(Deployment {
            name: "no-op",
            members: vec![Server::start_noop(&bench, dir.path())?],
        })
    } else {
        None
    };
    preload(&etcd).await?;
    preload(&keel).await?;
    let raw = raw_fdatasync_p50(dir.path())?;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Members per cluster: **{}** (clients spread over every member). Load generator: **{}**. \
         Keel's extra flags: {}. Raw disk, same run: 4 KiB overwrite + fdatasync p50 \
         **{:.3} ms**. CPU per request sums every member's.\n",
        o.members,
        match &o.etcd_benchmark {
            Some(p) => format!("etcd's benchmark tool ({})", p.display()),
            None => "keel-bench".to_string(),
        },
        if o.keel_flags.is_empty() {
            "none".to_string()
        } else {
            format!("`{}`", o.keel_flags.join(" "))
        },
        raw * 1e3
    );
    out += "| workload | etcd req/s | keel req/s | keel/etcd | etcd p50 ms | keel p50 ms | etcd CPU µs/req | keel CPU µs/req | keel/etcd CPU |\n";
    out += "|---|---|---|---|---|---|---|---|---|\n";
    let mut ceilings = String::new();
    let mut tsv = String::new();
    let servers: Vec<&Deployment> = [Some(&etcd), Some(&keel), noop.as_ref()]
        .into_iter()
        .flatten()
        .collect();
    for spec in table() {
        if !o.only.is_empty() && !o.only.iter().any(|w| spec.name.contains(w.as_str())) {
            continue;
        }
        let total = ((spec.total as f64 * o.scale) as u64).max(100);
        let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); servers.len()];
        for round in 0..o.rounds.max(1) {
            for (i, server) in servers.iter().enumerate() {
                eprintln!("round {}: {} on {}", round + 1, spec.name, server.name);
                samples[i].push(measure(o, server, &spec, total).await?);
            }
        }
        let pick = |i: usize, f: fn(&Sample) -> f64| median(samples[i].iter().map(f).collect());
        let (e, k) = (pick(0, |s| s.rps), pick(1, |s| s.rps));
        let refused = |i: usize| -> String {
            let n: u64 = samples[i].iter().map(|s| s.refused).sum();
            if n == 0 {
                String::new()
            } else {
                format!(" ({n} refused)")
            }
        };
        let (ecpu, kcpu) = (
            pick(0, |s| s.cpu_per_request),
            pick(1, |s| s.cpu_per_request),
        );
        let _ = writeln!(
            out,
            "| {} (total {total}) | {e:.0}{} | {k:.0}{} | **{:.2}×** | {:.3} | {:.3} | {:.1} | {:.1} | **{:.2}×** |",
            spec.name,
            refused(0),
            refused(1),
            k / e.max(f64::MIN_POSITIVE),
            pick(0, |s| s.p50) * 1e3,
            pick(1, |s| s.p50) * 1e3,
            ecpu * 1e6,
            kcpu * 1e6,
            kcpu / ecpu.max(f64::MIN_POSITIVE),
        );
        // The best keel/etcd ratio a server could reach with this load generator on the same
        // CPUs: (c + etcd's CPU) / (c + keel's CPU), c the client's CPU per request.
        let client: Vec<f64> = samples[..2]
            .iter()
            .flatten()
            .map(|s| s.client_cpu_per_request)
            .collect();
        let c = median(client);
        let ceiling = (c + ecpu) / (c + kcpu).max(f64::MIN_POSITIVE);
        let ratio = k / e.max(f64::MIN_POSITIVE);
        let _ = write!(
            ceilings,
            "| {} | {:.1} | {ceiling:.2}× | **{:.2}** |",
            spec.name,
            c * 1e6,
            ratio / ceiling.max(f64::MIN_POSITIVE),
        );
        if noop.is_some() {
            let (n, ncpu) = (pick(2, |s| s.rps), pick(2, |s| s.cpu_per_request));
            let _ = write!(
                ceilings,
                " {n:.0} | {:.1} | **{:.2}** |",
                ncpu * 1e6,
                k / n.max(f64::MIN_POSITIVE)
            );
        }
        ceilings.push('\n');
        if spec.name.starts_with("put,") {
            for (server, rps, cpu) in [("etcd", e, ecpu), ("keel", k, kcpu)] {
                let _ = writeln!(tsv, "put-clients\t{server}\t{}\t{rps:.1}", spec.clients);
                let _ = writeln!(
                    tsv,
                    "put-cpu-clients\t{server}\t{}\t{:.1}",
                    spec.clients,
                    cpu * 1e6
                );
            }
        }
    }
    if let Some(path) = &o.data {
        append(path, &tsv)?;
    }
    out += "\nCeilings, same run. *Client-bound*: with the load generator on the same CPUs, costing \
            `c` of CPU per request, keel/etcd can reach at most `(c + etcd CPU) / (c + keel CPU)`; \
            the fraction is the measured keel/etcd over that. ";
    if noop.is_some() {
        out += "*No-op*: keel-bench's `noop-server`, keel's network stack answering every request \
                with nothing done (the same client, connections and messages): the ceiling of any \
                server on this stack here; the fraction is keel's req/s over the no-op's.\n\n\
                | workload | client CPU µs/req | client-bound ceiling | keel/etcd ÷ ceiling | no-op req/s | no-op CPU µs/req | keel/no-op |\n\
                |---|---|---|---|---|---|---|\n";
    } else {
        out += "\n\n| workload | client CPU µs/req | client-bound ceiling | keel/etcd ÷ ceiling |\n\
                |---|---|---|---|\n";
    }
    out += &ceilings;
    let (ep, kp) = (etcd.proc(), keel.proc());
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let _ = writeln!(
        out,
        "\nPeak RSS (the largest member): etcd {:.1} MiB, keel {:.1} MiB (keel/etcd **{:.2}×**). Server CPU over the whole run (all members): etcd {:.1} s, keel {:.1} s.",
        mib(ep.peak_rss_bytes),
        mib(kp.peak_rss_bytes),
        kp.peak_rss_bytes as f64 / ep.peak_rss_bytes.max(1) as f64,
        ep.cpu_seconds,
        kp.cpu_seconds,
    );
    Ok(out)
}

/// Settings of the watch and lease scale comparison.
#[derive(Debug, Clone)]
pub struct ScaleOptions {
    pub watchers: usize,
    pub put_rate: f64,
    pub puts: u64,
    pub leases: u64,
}

/// The resident memory of process `pid` now (`VmRSS`), 0 if it is gone.
pub(crate) fn rss_now(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// The watch and lease scale comparison on fresh servers: `watchers` watchers of one prefix
/// while puts arrive at `put_rate` (event latency from put to receipt), then `leases` leases
/// granted and each kept alive twice. Server CPU seconds and resident memory after each.
pub async fn compare_scale(o: &CompareOptions, s: &ScaleOptions) -> anyhow::Result<String> {
    use crate::watchlease::{LeaseKeepalive, WatchLatency, lease_keepalive, watch_latency};
    std::fs::create_dir_all(&o.dir)?;
    let dir = tempfile::tempdir_in(&o.dir)?;
    let etcd = Server::start("etcd", &o.etcd, dir.path())?;
    let keel = Server::start("keel", &o.keel, dir.path())?;
    let mut out = String::new();
    out += "| workload | server | p50 ms | p99 ms | requests or events/s | failures | server CPU s | server RSS after MiB |\n";
    out += "|---|---|---|---|---|---|---|---|\n";
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    for server in [&etcd, &keel] {
        let opts = ConnectOptions {
            endpoints: vec![server.endpoint.clone()],
            ..Default::default()
        };
        let conns = 100.min(s.watchers.max(1));
        let (channels, token) = opts.connect(conns + 1).await?;
        let (put, watch) = channels.split_first().expect("at least one");
        let w = WatchLatency {
            total: s.puts,
            put_rate: s.put_rate,
            key: b"scale/".to_vec(),
            value: value(256),
            prefix: true,
            sample: false,
        };
        eprintln!("{} watchers on {}", s.watchers, server.name);
        let before = server.proc();
        let outcome = watch_latency(&w, watch, put.clone(), &token, s.watchers).await;
        let cpu = server.proc().cpu_seconds - before.cpu_seconds;
        let workload = format!(
            "{} watchers of one prefix, {} puts at {}/s",
            s.watchers, s.puts, s.put_rate
        );
        scale_row(&mut out, &workload, server, &outcome.stats(), cpu);
        drop(channels);
        let (channels, token) = opts.connect(100).await?;
        let l = LeaseKeepalive {
            total: s.leases * 2,
            leases: s.leases,
            ttl: 600,
            sample: false,
        };
        eprintln!("{} leases on {}", s.leases, server.name);
        let before = server.proc();
        let outcome = lease_keepalive(&l, &channels, &token, 1000).await;
        let cpu = server.proc().cpu_seconds - before.cpu_seconds;
        let workload = format!(
            "{} leases granted, each kept alive twice (1000 clients)",
            s.leases
        );
        scale_row(&mut out, &workload, server, &outcome.stats(), cpu);
    }
    let _ = writeln!(
        out,
        "\nPeak RSS over the run: etcd {:.1} MiB, keel {:.1} MiB.",
        mib(etcd.proc().peak_rss_bytes),
        mib(keel.proc().peak_rss_bytes)
    );
    Ok(out)
}

/// A row of the scale table: latencies, rate, failures, the server's CPU seconds during the
/// workload and its RSS after it.
fn scale_row(out: &mut String, workload: &str, server: &Server, st: &Stats, cpu: f64) {
    let _ = writeln!(
        out,
        "| {workload} | {} | {:.3} | {:.3} | {:.0} | {} | {cpu:.1} | {:.1} |",
        server.name,
        st.percentile(50.0) * 1e3,
        st.percentile(99.0) * 1e3,
        st.rps,
        st.failures,
        rss_now(server.child.id()) as f64 / (1 << 20) as f64,
    );
}

/// Appends `text` to the file at `path` (created if missing).
pub fn append(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .with_context(|| format!("appending to {}", path.display()))
}

/// Today's UTC date as `YYYY-MM-DD`.
pub fn today() -> String {
    let days = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 86_400) as i64;
    let (y, m, d) = keel::logging::civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02}")
}

/// CPUs, CPU model, memory and kernel, from `/proc`.
pub fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map_or("unknown CPU", |m| m.trim_start_matches([' ', '\t', ':']));
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mem_kb: u64 = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{cpus} CPUs ({model}), {:.0} GiB, Linux {}",
        mem_kb as f64 / (1 << 20) as f64,
        kernel.trim()
    )
}

#[cfg(test)]
mod report_tests {
    #[test]
    fn reads_etcds_benchmark_report() {
        let text = "\nSummary:\n  Total:\t4.5 secs.\n  Requests/sec:\t22222.5\n\nLatency distribution:\n  10% in 0.0100 secs.\n  50% in 0.0412 secs.\n";
        let (rps, p50) = super::parse_etcd_report(text).unwrap();
        assert_eq!(rps, 22222.5);
        assert_eq!(p50, 0.0412);
        assert!(super::parse_etcd_report("nothing").is_err());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_figures_parse() {
        let stat = "77 (etcd) S 1 77 77 0 -1 0 0 0 0 0 1234 566 0 0 20 0 9 0 1 2 3";
        let status = "Name:\tetcd\nVmPeak:\t  900 kB\nVmHWM:\t  204800 kB\nVmRSS:\t 1000 kB\n";
        let p = ProcStats::parse(stat, status).unwrap();
        assert!((p.cpu_seconds - 18.0).abs() < 1e-9);
        assert_eq!(p.peak_rss_bytes, 200 << 20);
        assert!(ProcStats::of(std::process::id()).unwrap().peak_rss_bytes > 0);
    }

    #[test]
    fn medians_and_dates() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(vec![]), 0.0);
        let d = today();
        assert_eq!(d.len(), 10);
        assert!(d.starts_with("20"), "{d}");
    }

    #[test]
    fn the_table_has_the_docs_workloads() {
        let names: Vec<&str> = table().iter().map(|s| s.name).collect();
        // The etcd docs' 7 rows, and puts at 10 and 100 clients between their 1 and 1000.
        assert_eq!(names.len(), 9);
        for clients in ["1 client", "10 clients", "100 clients", "1000 clients"] {
            assert!(
                names
                    .iter()
                    .any(|n| n.starts_with("put, ") && n.ends_with(clients)),
                "{clients}"
            );
        }
        assert!(names.iter().any(|n| n.starts_with("put, 1 conn")));
        assert!(names.iter().any(|n| n.starts_with("txn-put")));
    }
}
