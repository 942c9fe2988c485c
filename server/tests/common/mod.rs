//! What the end-to-end tests share: free loopback ports, starting `keel` and the real etcd as
//! child processes with temporary data dirs (killed by PID when dropped), and a bare HTTP GET.

#![allow(dead_code)] // each test binary uses a part

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub mod certs;

/// A server process, killed (SIGKILL) and reaped when dropped.
pub struct Server {
    pub child: Child,
    pub port: u16,
    pub endpoint: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[path = "../../../bench/src/ports.rs"]
mod ports;

/// A free loopback port, never handed out before by this test binary (see `ports`).
pub fn free_port() -> u16 {
    ports::free_port().unwrap()
}

pub fn wait_listening(child: &mut Child, port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited before listening: {status}");
        }
        assert!(Instant::now() < deadline, "{what} did not start listening");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts `keel` on `port` with data dir `data` and the extra flags.
pub fn keel(data: &Path, port: u16, extra: &[&str]) -> Server {
    keel_with(data, port, extra, &[], None)
}

/// The `keel` command for data dir `data` on `port`, with the extra flags and environment.
pub fn keel_command(data: &Path, port: u16, extra: &[&str], env: &[(&str, &str)]) -> Command {
    server_command(env!("CARGO_BIN_EXE_keel"), data, port, extra, env)
}

/// The command of `program` (keel, or etcd: the same flags) for data dir `data` on `port`.
pub fn server_command(
    program: &str,
    data: &Path,
    port: u16,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Command {
    let endpoint = format!("http://127.0.0.1:{port}");
    let mut cmd = Command::new(program);
    if !extra.iter().any(|a| a.starts_with("--initial-cluster=")) {
        // A single member still listens for peers: on a port of its own, not etcd's default
        // 2380 (tests run in parallel).
        let name = extra
            .iter()
            .find_map(|a| a.strip_prefix("--name="))
            .unwrap_or("default");
        let peer = format!("http://127.0.0.1:{}", free_port());
        cmd.arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster={name}={peer}"));
    }
    cmd.args(extra)
        .arg(format!("--data-dir={}", data.display()));
    if !extra.iter().any(|a| a.starts_with("--listen-client-urls=")) {
        cmd.arg(format!("--listen-client-urls={endpoint}"))
            .arg(format!("--advertise-client-urls={endpoint}"));
    }
    cmd.envs(env.iter().copied()).stdout(Stdio::null());
    cmd
}

/// Starts `program` (keel, or `etcd`: the same flags) on client `port` of `scheme` (`http` or
/// `https`) with the extra flags, stderr discarded; returns once it listens.
pub fn start_server(program: &str, data: &Path, port: u16, scheme: &str, flags: &[&str]) -> Server {
    let mut child = server_command(program, data, port, flags, &[])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_listening(&mut child, port, program);
    Server {
        child,
        port,
        endpoint: format!("{scheme}://127.0.0.1:{port}"),
    }
}

/// The HashKV `etcdctl endpoint hashkv` reports for `endpoint` (extra etcdctl flags first).
pub fn hashkv(endpoint: &str, flags: &[&str]) -> String {
    let mut args = flags.to_vec();
    args.extend_from_slice(&["endpoint", "hashkv", "-w", "json"]);
    let out = ok(endpoint, &args);
    out.split("\"hash\":")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .unwrap_or_else(|| panic!("no hash in {out}"))
        .to_string()
}

/// Starts `keel` with an environment, its stderr going to `log` (else discarded).
pub fn keel_with(
    data: &Path,
    port: u16,
    extra: &[&str],
    env: &[(&str, &str)],
    log: Option<&Path>,
) -> Server {
    let mut cmd = keel_command(data, port, extra, env);
    match log {
        Some(path) => cmd.stderr(std::fs::File::create(path).unwrap()),
        None => cmd.stderr(Stdio::null()),
    };
    let mut child = cmd.spawn().unwrap();
    wait_listening(&mut child, port, "keel");
    Server {
        child,
        port,
        endpoint: format!("http://127.0.0.1:{port}"),
    }
}

/// A keel member under `dir` whose WAL writes stall for as long as the returned file says
/// (`KEEL_FAULT_WAL_SYNC_DELAY_FILE`, e.g. "3s"; no file: no stall).
pub fn keel_stallable(dir: &Path) -> (Server, std::path::PathBuf) {
    let stall = dir.join("stall");
    let stall_env = stall.display().to_string();
    let keel = keel_with(
        &dir.join("keel"),
        free_port(),
        &[],
        &[("KEEL_FAULT_WAL_SYNC_DELAY_FILE", stall_env.as_str())],
        None,
    );
    (keel, stall)
}

/// Runs `keel`, expecting it to refuse to start: its exit code and stderr.
pub fn keel_refused(data: &Path, extra: &[&str]) -> (Option<i32>, String) {
    let port = free_port();
    let mut child = keel_command(data, port, extra, &[])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Generous: a start that hangs instead of refusing fails the test rather than blocking it.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            return (status.code(), err);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("keel did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Server {
    /// Sends SIGTERM and waits for the process to exit (at most a generous minute, so that a
    /// hang fails the test): its exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        // SAFETY: kill(2) on the PID of our own child process.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.wait_exit()
    }

    /// Waits for the process to exit on its own (at most a generous minute).
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "keel did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Starts a single-member etcd 3.4 (Debian's `etcd-server`) with data dir `data`.
pub fn etcd(data: &Path, extra: &[&str]) -> Server {
    let (port, peer) = (free_port(), free_port());
    let endpoint = format!("http://127.0.0.1:{port}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let mut child = Command::new("etcd")
        .args(["--name", "oracle"])
        .args(extra)
        .arg(format!("--data-dir={}", data.display()))
        .arg(format!("--listen-client-urls={endpoint}"))
        .arg(format!("--advertise-client-urls={endpoint}"))
        .arg(format!("--listen-peer-urls={peer_url}"))
        .arg(format!("--initial-advertise-peer-urls={peer_url}"))
        .arg(format!("--initial-cluster=oracle={peer_url}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("etcd (apt-get install etcd-server)");
    wait_listening(&mut child, port, "etcd");
    Server {
        child,
        port,
        endpoint,
    }
}

/// A plain HTTP/1.1 GET on 127.0.0.1: the status code and the body.
pub fn http_get(port: u16, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    let code = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    (code, if chunked { dechunk(body) } else { body.into() })
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// Runs etcdctl 3.4 (`ETCDCTL_API=3`) against `endpoint`: success, and stdout (or on failure
/// the `Error:` lines of stderr, without the client's retry logging).
pub fn etcdctl(endpoint: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoint}"))
        .args(args)
        .output()
        .expect("etcdctl (apt-get install etcd-client)");
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        // Error text only: drop the client's retry logging.
        text = String::from_utf8_lossy(&out.stderr)
            .lines()
            .filter(|l| l.starts_with("Error:"))
            .collect::<Vec<_>>()
            .join("\n");
    }
    (out.status.success(), text)
}

/// etcdctl that must succeed: its stdout.
pub fn ok(endpoint: &str, args: &[&str]) -> String {
    let (success, out) = etcdctl(endpoint, args);
    assert!(success, "etcdctl {args:?} failed: {out}");
    out
}

/// A cluster of `keel` members on loopback, each with its own client and peer ports, data dir
/// and log file. Members are killed (SIGKILL) when dropped.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub names: Vec<String>,
    pub client_ports: Vec<u16>,
    pub peer_ports: Vec<u16>,
    pub members: Vec<Option<Server>>,
    pub flags: Vec<String>,
    pub token: String,
    /// For a member joining a running cluster: the `--initial-cluster` that `etcdctl member
    /// add` printed for it (it starts with `--initial-cluster-state=existing`).
    pub joining: Vec<Option<String>>,
    /// The server binary: keel, or `etcd` for the same cluster run by etcd 3.4.
    pub program: String,
    /// `http` or `https`, for the peer URLs and for the client URLs.
    pub peer_scheme: &'static str,
    pub client_scheme: &'static str,
}

impl Cluster {
    /// Starts `n` members with the extra flags (each member gets them all).
    pub fn start(n: usize, flags: &[&str]) -> Cluster {
        let mut c = Cluster::new(n, flags);
        for i in 0..n {
            c.start_member(i);
        }
        c
    }

    /// A cluster of `n` members, none started yet.
    pub fn new(n: usize, flags: &[&str]) -> Cluster {
        Cluster {
            dir: tempfile::tempdir().unwrap(),
            names: (1..=n).map(|i| format!("m{i}")).collect(),
            client_ports: (0..n).map(|_| free_port()).collect(),
            peer_ports: (0..n).map(|_| free_port()).collect(),
            members: (0..n).map(|_| None).collect(),
            flags: flags.iter().map(ToString::to_string).collect(),
            token: "keel-test".into(),
            joining: (0..n).map(|_| None).collect(),
            program: env!("CARGO_BIN_EXE_keel").to_string(),
            peer_scheme: "http",
            client_scheme: "http",
        }
    }

    /// `n` members of etcd 3.4, started with the same flags as a keel cluster.
    pub fn start_etcd(n: usize) -> Cluster {
        let mut c = Cluster::new(n, &[]);
        c.program = "etcd".into();
        // etcd members wait for each other at their first start: start them all first.
        for i in 0..n {
            c.spawn_member(i, &[]);
        }
        for i in 0..n {
            let port = c.client_ports[i];
            let child = &mut c.members[i].as_mut().expect("spawned").child;
            wait_listening(child, port, "etcd member");
        }
        c
    }

    /// A slot for a member added later (not started): its index.
    pub fn add_slot(&mut self) -> usize {
        let i = self.names.len();
        self.names.push(format!("m{}", i + 1));
        self.client_ports.push(free_port());
        self.peer_ports.push(free_port());
        self.members.push(None);
        self.joining.push(None);
        i
    }

    pub fn peer_url(&self, i: usize) -> String {
        format!("{}://127.0.0.1:{}", self.peer_scheme, self.peer_ports[i])
    }

    /// Starts member `i` joining the running cluster, with the `--initial-cluster` that
    /// `etcdctl member add` printed.
    pub fn start_joining(&mut self, i: usize, initial_cluster: &str) {
        self.joining[i] = Some(initial_cluster.to_string());
        self.start_member(i);
    }

    /// `--initial-cluster` of every member.
    pub fn initial_cluster(&self) -> String {
        self.names
            .iter()
            .zip(&self.peer_ports)
            .map(|(n, p)| format!("{n}={}://127.0.0.1:{p}", self.peer_scheme))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn data_dir(&self, i: usize) -> std::path::PathBuf {
        self.dir.path().join(&self.names[i])
    }

    pub fn log(&self, i: usize) -> std::path::PathBuf {
        self.dir.path().join(format!("{}.log", self.names[i]))
    }

    /// The member's log so far.
    pub fn log_text(&self, i: usize) -> String {
        std::fs::read_to_string(self.log(i)).unwrap_or_default()
    }

    pub fn endpoint(&self, i: usize) -> String {
        format!(
            "{}://127.0.0.1:{}",
            self.client_scheme, self.client_ports[i]
        )
    }

    /// Every member's client endpoint.
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.names.len()).map(|i| self.endpoint(i)).collect()
    }

    /// The arguments of member `i`.
    pub fn args(&self, i: usize) -> Vec<String> {
        let peer = self.peer_url(i);
        let client = self.endpoint(i);
        let mut args = vec![
            format!("--listen-client-urls={client}"),
            format!("--advertise-client-urls={client}"),
            format!("--name={}", self.names[i]),
            format!("--listen-peer-urls={peer}"),
            format!("--initial-advertise-peer-urls={peer}"),
            match &self.joining[i] {
                Some(ic) => format!("--initial-cluster={ic}"),
                None => format!("--initial-cluster={}", self.initial_cluster()),
            },
            format!("--initial-cluster-token={}", self.token),
            // Short elections keep the tests quick; the ratio is etcd's default.
            "--heartbeat-interval=50".into(),
            "--election-timeout=500".into(),
        ];
        if self.joining[i].is_some() {
            args.push("--initial-cluster-state=existing".into());
        }
        args.extend(self.flags.iter().cloned());
        args
    }

    /// Starts (or restarts) member `i`, with extra environment variables.
    pub fn start_member_with(&mut self, i: usize, env: &[(&str, &str)]) {
        self.spawn_member(i, env);
        let port = self.client_ports[i];
        let child = &mut self.members[i].as_mut().expect("spawned").child;
        wait_listening(child, port, "keel member");
    }

    /// Starts member `i` without waiting for it to listen.
    fn spawn_member(&mut self, i: usize, env: &[(&str, &str)]) {
        let args = self.args(i);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log(i))
            .unwrap();
        let mut cmd = server_command(
            &self.program,
            &self.data_dir(i),
            self.client_ports[i],
            &args,
            env,
        );
        cmd.stderr(log);
        let child = cmd.spawn().unwrap();
        self.members[i] = Some(Server {
            child,
            port: self.client_ports[i],
            endpoint: self.endpoint(i),
        });
    }

    pub fn start_member(&mut self, i: usize) {
        self.start_member_with(i, &[]);
    }

    /// SIGKILLs member `i`.
    pub fn kill(&mut self, i: usize) {
        self.members[i] = None;
    }

    /// SIGTERMs member `i` and waits for it to exit: its exit status.
    pub fn terminate(&mut self, i: usize) -> std::process::ExitStatus {
        let mut s = self.members[i].take().expect("running");
        s.terminate()
    }

    /// A gauge or counter of member `i`'s `/metrics` (its value, summed over label sets).
    pub fn metric(&self, i: usize, name: &str) -> Option<f64> {
        let (code, body) = try_http_get(self.client_ports[i], "/metrics")?;
        if code != 200 {
            return None;
        }
        let values: Vec<f64> = body
            .lines()
            .filter(|l| {
                l.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
            .collect();
        (!values.is_empty()).then(|| values.iter().sum())
    }

    /// The index of the member that is leader now, if one says so.
    pub fn leader(&self) -> Option<usize> {
        (0..self.names.len())
            .filter(|&i| self.members[i].is_some())
            .find(|&i| self.metric(i, "etcd_server_is_leader") == Some(1.0))
    }

    /// Waits (a generous minute, as a hang guard) until a running member leads and every
    /// running member knows a leader; the leader's index.
    pub fn wait_leader(&self) -> usize {
        wait_for("a leader known to every running member", || {
            let leader = self.leader()?;
            (0..self.names.len())
                .filter(|&i| self.members[i].is_some())
                .all(|i| self.metric(i, "etcd_server_has_leader") == Some(1.0))
                .then_some(leader)
        })
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // A failing test shows what the members logged.
        if std::thread::panicking() {
            for i in 0..self.names.len() {
                let text = self.log_text(i);
                let tail: Vec<&str> = text.lines().rev().take(40).collect();
                eprintln!("--- {} (last lines)", self.names[i]);
                for l in tail.iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
    }
}

/// Polls `f` until it gives a value; a minute without one fails the test (a hang guard, not a
/// timing assertion).
pub fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "gave up waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A GET that tolerates a member that is down or restarting.
pub fn try_http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    Some((code, if chunked { dechunk(body) } else { body.into() }))
}

/// Why network namespaces cannot be made here (they need root and `ip`), if they cannot.
pub fn netns_unavailable() -> Option<&'static str> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root to make network namespaces");
    }
    if Command::new("ip").arg("-V").output().is_err() {
        return Some("needs ip (iproute2)");
    }
    None
}
