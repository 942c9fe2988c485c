//! End-to-end runs of the `keel-bench` binary against a real `keel` and a real etcd 3.4 on
//! loopback: each subcommand completes against both with the requested number of requests
//! (checked in the JSON report); unreachable endpoints, refused requests and a server killed
//! mid-run give a clear message, a partial report and a non-zero exit. No timings are asserted,
//! and nothing waits for time to pass: the kill waits for the server to have applied puts.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use keel_bench::compare::Server;

fn free_port() -> u16 {
    keel_bench::ports::free_port().unwrap()
}

/// The `keel` binary of this build (built by the workspace's test run; built here if missing).
fn keel_bin() -> PathBuf {
    let deps = std::env::current_exe().unwrap();
    let bin = deps.parent().unwrap().parent().unwrap().join("keel");
    if !bin.exists() {
        let status = Command::new(env!("CARGO"))
            .args(["build", "-p", "keel", "--bin", "keel"])
            .status()
            .unwrap();
        assert!(status.success(), "building keel");
    }
    bin
}

fn start(name: &'static str, bin: &Path, dir: &Path, extra: &[&str]) -> Server {
    Server::start_with(name, bin, dir, extra).unwrap()
}

fn bench(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_keel-bench"))
        .args(args)
        .output()
        .unwrap()
}

/// Waits for `child` to exit (a generous minute guards a hang, killing it): its output.
fn wait_output(mut child: std::process::Child, hang: &str) -> Output {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{hang}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A metric's value from `/metrics` of the server at `endpoint` (`http://127.0.0.1:port`).
fn metric(endpoint: &str, name: &str) -> std::io::Result<f64> {
    use std::io::{Read, Write};
    let addr = endpoint.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        // HTTP/1.0: the body comes whole, never chunked.
        "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .map_or(0.0, |v| v.trim().parse().unwrap()))
}

fn json(out: &Output) -> serde_json::Value {
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim())
        .unwrap_or_else(|e| panic!("{e}: {text}\n{}", String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn every_subcommand_runs_against_keel_and_etcd() {
    let dir = tempfile::tempdir().unwrap();
    let keel = start("keel", &keel_bin(), dir.path(), &[]);
    let etcd = start("etcd", Path::new("etcd"), dir.path(), &[]);
    for server in [&keel, &etcd] {
        let e = format!("--endpoints={}", server.endpoint);
        let common = [e.as_str(), "--conns=2", "--clients=8", "--output=json"];
        let run = |args: &[&str]| {
            let out = bench(&[&common[..], args].concat());
            assert!(
                out.status.success(),
                "{args:?} on {}: {}",
                server.endpoint,
                String::from_utf8_lossy(&out.stderr)
            );
            json(&out)
        };
        let put = run(&[
            "put",
            "--key-size=8",
            "--val-size=64",
            "--sequential-keys",
            "--key-space-size=50",
            "--total=300",
            "--compact-interval=50ms",
            "--compact-index-delta=10",
        ]);
        assert_eq!(put["report"]["requests"], 300);
        assert_eq!(put["report"]["failures"], 0);
        assert_eq!(put["report"]["histogram"].as_array().unwrap().len(), 11);
        let range = run(&["range", "\u{1}", "\u{ff}", "--consistency=s", "--total=200"]);
        assert_eq!(range["report"]["requests"], 200);
        let range = run(&["range", "a", "--limit=5", "--count-only", "--total=100"]);
        assert_eq!(range["report"]["requests"], 100);
        let txn = run(&[
            "txn-put",
            "--txn-ops=4",
            "--key-space-size=1000",
            "--total=100",
        ]);
        assert_eq!(txn["report"]["requests"], 100);
        let mixed = run(&[
            "txn-mixed",
            "a",
            "--rw-ratio=2",
            "--total=300",
            "--rate=2000",
        ]);
        let (reads, writes) = (
            mixed["read"]["requests"].as_u64().unwrap(),
            mixed["write"]["requests"].as_u64().unwrap(),
        );
        assert_eq!(reads + writes, 300);
        assert!(reads > writes, "{reads} reads, {writes} writes at 2:1");
        // 5 watchers × 40 puts: every event timed.
        let watch = run(&["watch-latency", "--total=40", "--put-rate=400", "--prefix"]);
        // The whole report on a mismatch: a put that failed under load shows its error there.
        assert_eq!(watch["report"]["requests"], 8 * 40, "{watch}");
        assert_eq!(watch["report"]["failures"], 0, "{watch}");
        let keepalive = run(&["lease-keepalive", "--total=400", "--leases=20"]);
        assert_eq!(keepalive["report"]["requests"], 400);
        // watch prints two JSON reports (creation, puts); watch-get one (ranges).
        let out = bench(
            &[
                &common[..],
                &[
                    "watch",
                    "--streams=3",
                    "--watch-per-stream=10",
                    "--put-total=50",
                    "--key-space-size=5",
                    "--sequential-keys",
                ],
            ]
            .concat(),
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let reports: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(reports[0]["report"]["requests"], 30, "watchers created");
        assert_eq!(reports[1]["report"]["requests"], 50, "puts");
        assert_eq!(reports[1]["report"]["failures"], 0, "every event arrived");
        let get = run(&["watch-get", "--watchers=50", "--streams=5", "--events=4"]);
        assert_eq!(get["report"]["failures"], 0);
        assert!(get["report"]["requests"].as_u64().unwrap() > 0);
    }
    // Text output: etcd's layout.
    let out = bench(&[
        &format!("--endpoints={}", keel.endpoint),
        "put",
        "--total=50",
    ]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for section in [
        "Summary:\n  Total:\t",
        "  Requests/sec:\t",
        "Response time histogram:\n",
        "Latency distribution:\n  10% in ",
    ] {
        assert!(text.contains(section), "{section:?} missing from {text}");
    }
}

#[test]
fn mvcc_put_runs_the_engine_directly() {
    let out = bench(&["--output=json", "mvcc", "put", "--total=200", "--txn-ops=5"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(json(&out)["report"]["requests"], 200);
}

#[test]
fn an_unreachable_endpoint_fails_with_a_clear_message() {
    let port = free_port(); // nobody listens
    let run = Command::new(env!("CARGO_BIN_EXE_keel-bench"))
        .args([
            &format!("--endpoints=127.0.0.1:{port}"),
            "--dial-timeout=2s",
            "put",
            "--total=10",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = wait_output(run, "keel-bench hangs on an unreachable endpoint");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("cannot connect to http://127.0.0.1:{port}")),
        "{err}"
    );
}

#[test]
fn refused_requests_are_reported_and_fail_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let keel = start(
        "keel",
        &keel_bin(),
        dir.path(),
        &["--max-request-bytes=1024"],
    );
    let out = bench(&[
        &format!("--endpoints={}", keel.endpoint),
        "put",
        "--val-size=4000",
        "--total=20",
    ]);
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("Error distribution:\n  [20]\tetcdserver: request is too large\n"),
        "{text}"
    );
}

#[test]
fn a_server_killed_mid_run_gives_a_partial_report_and_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut keel = start("keel", &keel_bin(), dir.path(), &[]);
    let run = Command::new(env!("CARGO_BIN_EXE_keel-bench"))
        .args([
            &format!("--endpoints={}", keel.endpoint),
            "--clients=4",
            "put",
            "--total=10000000",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Killed once the server has received 5 puts: each of the 4 clients sends its next put
    // only after recording the answer to its previous one, so at least one put is in the
    // partial report. (The deadline only guards a hang.)
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match metric(&keel.endpoint, "etcd_mvcc_put_total") {
            Ok(puts) if puts >= 5.0 => break,
            Ok(_) => {}
            // A member that died is a failure with its log; a failed scrape of a live one
            // (CI once saw a reset under load) is asked again.
            Err(e) => {
                if let Some(why) = keel.exited() {
                    panic!("{why}");
                }
                eprintln!("scraping /metrics: {e}");
            }
        }
        assert!(Instant::now() < deadline, "keel-bench sent no put");
        std::thread::sleep(Duration::from_millis(20));
    }
    keel.kill().unwrap();
    let out = wait_output(run, "keel-bench hangs after its server died");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("the run stopped after"), "{err}");
    assert!(err.contains("the server cannot be reached"), "{err}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Summary:"), "partial report missing: {text}");
    assert!(text.contains("Error distribution:"), "{text}");
}

/// `noop-server` answers every KV request keel-bench sends (nothing stored), and refuses to start
/// on a port in use with the reason.
#[test]
fn the_noop_server_answers_every_request() {
    let port = free_port();
    let mut server = Command::new(env!("CARGO_BIN_EXE_keel-bench"))
        .args(["noop-server", &format!("--listen=127.0.0.1:{port}")])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(server.try_wait().unwrap().is_none(), "noop-server exited");
        assert!(Instant::now() < deadline, "noop-server did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    let e = format!("--endpoints=127.0.0.1:{port}");
    for args in [
        &["put", "--key-size=8", "--val-size=256", "--total=500"][..],
        &["range", "foo", "--consistency=s", "--total=500"],
        &["range", "foo", "--total=500"],
        &["txn-put", "--txn-ops=2", "--total=500"],
    ] {
        let out = bench(
            &[
                &[e.as_str(), "--conns=2", "--clients=10", "--output=json"],
                args,
            ]
            .concat(),
        );
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report = json(&out);
        assert_eq!(report["report"]["requests"], 500, "{args:?}");
        assert_eq!(report["report"]["failures"], 0, "{args:?}");
    }
    let second = Command::new(env!("CARGO_BIN_EXE_keel-bench"))
        .args(["noop-server", &format!("--listen=127.0.0.1:{port}")])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = wait_output(second, "a second noop-server on the same port hangs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Address already in use"), "{err}");
    server.kill().unwrap();
    server.wait().unwrap();
}

/// `compare` beside a single member reports the same run's ceilings: the client-bound one (from
/// the load generator's measured CPU) and the no-op server's.
#[test]
fn compare_reports_the_ceilings_of_the_same_run() {
    let dir = tempfile::tempdir().unwrap();
    let keel = keel_bin();
    let out = bench(&[
        "compare",
        &format!("--keel={}", keel.display()),
        &format!("--dir={}", dir.path().display()),
        "--rounds=1",
        "--scale=0.003",
        "--only=put, 100 conns",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let row = text
        .lines()
        .find(|l| l.starts_with("| put, 100 conns, 1000 clients |"))
        .unwrap_or_else(|| panic!("no ceiling row: {text}"));
    // workload, client CPU, client-bound ceiling, fraction, no-op req/s, no-op CPU, keel/no-op.
    let cells: Vec<&str> = row
        .split('|')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect();
    assert_eq!(cells.len(), 7, "{row}");
    let number = |c: &str| -> f64 {
        c.trim_matches(|ch: char| ch == '*' || ch == '×')
            .parse()
            .unwrap_or_else(|_| panic!("{c:?} in {row}"))
    };
    for cell in &cells[1..] {
        assert!(number(cell) > 0.0, "{row}");
    }
}

/// `compare --store-keys` loads each size into fresh servers, reads, restarts them after SIGKILL
/// (checking every key is back), and writes the figures `bench/plot.sh` draws; the script makes a
/// PNG of them.
#[test]
fn store_size_comparison_and_its_plot() {
    let dir = tempfile::tempdir().unwrap();
    let keel = keel_bin();
    let data = dir.path().join("data.tsv");
    let out = bench(&[
        "compare",
        &format!("--keel={}", keel.display()),
        &format!("--dir={}", dir.path().display()),
        &format!("--data={}", data.display()),
        "--store-keys=300,1000",
        "--scale=0.01",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for keys in ["300", "1000"] {
        for server in ["etcd", "keel", "**keel/etcd**"] {
            let row = format!("| {keys} | {server} |");
            assert!(text.contains(&row), "no {row:?} in {text}");
        }
    }
    let figures = std::fs::read_to_string(&data).unwrap();
    let lines: Vec<Vec<&str>> = figures.lines().map(|l| l.split('\t').collect()).collect();
    assert_eq!(lines.len(), 12, "{figures}");
    for l in &lines {
        assert_eq!(l.len(), 4, "{figures}");
        assert!(
            ["range-keys", "range-keys-after-load", "restart-keys"].contains(&l[0]),
            "{figures}"
        );
        assert!(l[3].parse::<f64>().unwrap() > 0.0, "{figures}");
    }
    // The plot (gnuplot is installed by scripts/install-deps).
    let png = dir.path().join("scale.png");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("plot.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg(&data)
        .arg(&png)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    // A file with none of its series is refused with a message.
    let empty = dir.path().join("empty.tsv");
    std::fs::write(&empty, "other\tetcd\t1\t2\n").unwrap();
    let out = Command::new("bash")
        .arg(&script)
        .arg(&empty)
        .arg(dir.path().join("none.png"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("none of the series"));
}

/// Makes (with openssl) a CA and a certificate for 127.0.0.1 with CN `root`, for servers and
/// clients: the paths of the CA, the certificate and its key.
fn openssl_certs(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let run = |args: &[&str]| {
        let ok = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stderr(Stdio::null())
            .status()
            .expect("openssl (apt-get install openssl)")
            .success();
        assert!(ok, "openssl {args:?}");
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    run(&[
        &["req", "-x509"][..],
        &ec,
        &[
            "-keyout",
            "ca-key.pem",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=ca",
        ],
    ]
    .concat());
    run(&[
        &["req"][..],
        &ec,
        &[
            "-keyout", "key.pem", "-out", "cert.csr", "-subj", "/CN=root",
        ],
    ]
    .concat());
    std::fs::write(
        dir.join("ext"),
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "cert.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca-key.pem",
        "-CAcreateserial",
        "-out",
        "cert.pem",
        "-days",
        "2",
        "-extfile",
        "ext",
    ]);
    (
        dir.join("ca.pem"),
        dir.join("cert.pem"),
        dir.join("key.pem"),
    )
}

/// keel-bench with TLS flags and `--user` against a secured member (client-certificate TLS,
/// auth enabled), keel and etcd alike; a wrong password is a clear error.
#[test]
fn tls_and_a_user_against_secured_keel_and_etcd() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = openssl_certs(dir.path());
    let p = |x: &Path| x.display().to_string();
    for bin in [keel_bin(), PathBuf::from("etcd")] {
        let (port, peer) = (free_port(), free_port());
        let data = tempfile::tempdir().unwrap();
        let endpoint = format!("https://127.0.0.1:{port}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let mut child = Command::new(&bin)
            .arg(format!("--data-dir={}", data.path().display()))
            .arg(format!("--listen-client-urls={endpoint}"))
            .arg(format!("--advertise-client-urls={endpoint}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=default={peer_url}"))
            .arg(format!("--cert-file={}", p(&cert)))
            .arg(format!("--key-file={}", p(&key)))
            .arg(format!("--trusted-ca-file={}", p(&ca)))
            .arg("--client-cert-auth")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "{} did not listen",
                bin.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let tls = [
            format!("--cacert={}", p(&ca)),
            format!("--cert={}", p(&cert)),
            format!("--key={}", p(&key)),
        ];
        for args in [&["user", "add", "root:rootpw"][..], &["auth", "enable"]] {
            let ok = Command::new("etcdctl")
                .env("ETCDCTL_API", "3")
                .arg(format!("--endpoints={endpoint}"))
                .args(&tls)
                .args(args)
                .output()
                .unwrap()
                .status
                .success();
            assert!(ok, "etcdctl {args:?} on {}", bin.display());
        }
        let e = format!("--endpoints={endpoint}");
        let common: Vec<&str> = [e.as_str(), "--conns=2", "--clients=4", "--output=json"]
            .into_iter()
            .chain(tls.iter().map(String::as_str))
            .collect();
        let out = bench(&[&common[..], &["--user=root:rootpw", "put", "--total=200"]].concat());
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report = json(&out);
        assert_eq!(report["report"]["requests"], 200, "{}", bin.display());
        assert_eq!(report["report"]["failures"], 0);
        let out = bench(&[&common[..], &["--user=root:wrong", "put", "--total=10"]].concat());
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("authentication failed, invalid user ID or password"),
            "{err}"
        );
        let _ = child.kill();
        let _ = child.wait();
    }
}
