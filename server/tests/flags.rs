//! Every flag of etcd 3.4's `etcd --help`, read from the installed etcd at test time, run
//! against `keel`: given at etcd's default value, each is accepted (on the command line, and as
//! its `ETCD_*` variable); given a value that asks for something Keel does not serve, each of
//! those is refused at start with its reason. The implemented ones are checked for their
//! effect: `--wal-dir`, `--listen-metrics-urls`, `--logger=zap` with `--log-outputs`, and
//! `--config-file` (etcd's YAML configuration file).

mod common;

use std::process::{Command, Stdio};

use common::free_port;

/// `(flag, etcd's default)` for every flag `etcd --help` lists.
fn etcd_flags() -> Vec<(String, String)> {
    let out = Command::new("etcd").arg("--help").output().expect("etcd");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    let mut flags = Vec::new();
    for line in text.lines() {
        let line = line.trim_start();
        let Some(rest) = line.strip_prefix("--") else {
            continue;
        };
        let (name, default) = rest.split_once(' ').unwrap_or((rest, ""));
        if name == "version" || name == "help" || name.is_empty() {
            continue;
        }
        let default = default.trim();
        let default = default
            .strip_prefix('\'')
            .and_then(|d| d.strip_suffix('\''))
            .unwrap_or(default);
        flags.push((name.to_string(), default.to_string()));
    }
    assert!(
        flags.len() >= 80,
        "etcd --help listed {} flags",
        flags.len()
    );
    flags
}

/// Flags the test harness sets itself (ports and directories of this test), and etcd defaults
/// that are not values (`math.MaxUint32`, `${name}.etcd`).
const SET_BY_THE_TEST: &[&str] = &[
    "name",
    "data-dir",
    "listen-client-urls",
    "advertise-client-urls",
    "listen-peer-urls",
    "initial-advertise-peer-urls",
    "initial-cluster",
    "max-concurrent-streams",
    "config-file",
];

fn defaults() -> Vec<(String, String)> {
    etcd_flags()
        .into_iter()
        .filter(|(f, _)| !SET_BY_THE_TEST.contains(&f.as_str()))
        .collect()
}

#[test]
fn keel_knows_every_flag_of_etcd() {
    let help = Command::new(env!("CARGO_BIN_EXE_keel"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    let missing: Vec<String> = etcd_flags()
        .into_iter()
        .map(|(f, _)| f)
        .filter(|f| !help.contains(&format!("--{f} ")) && !help.contains(&format!("--{f}\n")))
        .collect();
    assert!(missing.is_empty(), "not in keel --help: {missing:?}");
}

#[test]
fn every_etcd_flag_at_its_default_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let args: Vec<String> = defaults()
        .iter()
        .map(|(f, v)| format!("--{f}={v}"))
        .collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut keel = common::keel(&dir.path().join("flags"), free_port(), &args);
    assert_eq!(common::http_get(keel.port, "/health").0, 200);
    assert!(keel.terminate().success());
}

#[test]
fn every_etcd_variable_at_its_default_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let env: Vec<(String, String)> = defaults()
        .iter()
        .map(|(f, v)| {
            (
                format!("ETCD_{}", f.to_uppercase().replace('-', "_")),
                v.clone(),
            )
        })
        .collect();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut keel = common::keel_with(&dir.path().join("env"), free_port(), &[], &env, None);
    assert_eq!(common::http_get(keel.port, "/health").0, 200);
    assert!(keel.terminate().success());
}

/// Values that ask for what Keel does not serve, and the reason it gives.
const REFUSED: &[(&str, &str)] = &[
    ("--enable-v2=true", "only etcd's v3 API"),
    ("--experimental-enable-v2v3=/v2", "only etcd's v3 API"),
    ("--proxy=on", "no v2 proxy"),
    ("--proxy=readonly", "no v2 proxy"),
    ("--enable-pprof=true", "Go's profiler"),
    ("--unsafe-no-fsync=1", "loses acknowledged writes"),
    // An https metrics URL needs the client certificate, as etcd's.
    // (etcd's message names the URL and the certificate flags.)
    (
        "--listen-metrics-urls=https://127.0.0.1:1",
        "--cert-file, --key-file) must be provided for client url https://127.0.0.1:1",
    ),
    ("--discovery=ftp://127.0.0.1:1/d", "discovery: invalid URL"),
    (
        "--cors=http://example.com",
        "does not have the form \"host:port\"",
    ),
    (
        "--client-cert-allowed-hostname=example.com",
        "needs --client-cert-auth",
    ),
    ("--logger=log4j", "invalid value"),
    ("--max-concurrent-streams=0", "must be positive"),
    ("--grpc-keepalive-interval=often", "not a duration"),
];

#[test]
fn flags_keel_does_not_serve_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    for (flag, reason) in REFUSED {
        let (code, stderr) = common::keel_refused(&dir.path().join("refused"), &[flag]);
        assert_ne!(code, Some(0), "{flag} was accepted");
        let name = flag.split('=').next().unwrap();
        let named = stderr.contains(name) || flag.starts_with("--listen-metrics-urls");
        assert!(
            named && stderr.contains(reason),
            "{flag}: expected {name} and {reason:?} in: {stderr}"
        );
    }
}

#[test]
fn flags_tuning_what_keel_does_differently_start_with_a_notice() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let flags = [
        "--backend-batch-limit=100",
        "--max-wals=10",
        "--experimental-compaction-batch-limit=10",
        "--metrics=extensive",
        "--log-package-levels=etcdserver=DEBUG",
        "--grpc-keepalive-min-time=1s",
    ];
    let mut keel = common::keel_with(&dir.path().join("k"), free_port(), &flags, &[], Some(&log));
    assert!(keel.terminate().success());
    let text = std::fs::read_to_string(&log).unwrap();
    for flag in [
        "--backend-batch-interval/--backend-batch-limit",
        "--max-snapshots/--max-wals",
        "--experimental-compaction-batch-limit",
        "--metrics",
        "--log-package-levels",
        "--grpc-keepalive-min-time",
    ] {
        assert!(
            text.contains(&format!("{flag} is accepted for etcd compatibility")),
            "no notice for {flag}: {text}"
        );
    }
}

/// `--wal-dir`: the WAL lives there, the data dir has none, and a restart finds the writes.
#[test]
fn a_dedicated_wal_dir_holds_the_wal() {
    let dir = tempfile::tempdir().unwrap();
    let wal = dir.path().join("wal");
    let data = dir.path().join("data");
    let flag = format!("--wal-dir={}", wal.display());
    let port = free_port();
    let mut keel = common::keel(&data, port, &[&flag]);
    common::ok(&keel.endpoint, &["put", "k", "v"]);
    assert!(keel.terminate().success());
    let wals = |d: &std::path::Path| {
        std::fs::read_dir(d).map_or(0, |e| {
            e.flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".wal"))
                .count()
        })
    };
    assert!(wals(&wal) > 0, "no WAL in --wal-dir");
    assert_eq!(wals(&data.join("member").join("wal")), 0);
    let keel = common::keel(&data, port, &[&flag]);
    assert_eq!(
        common::ok(&keel.endpoint, &["get", "k", "--print-value-only"]),
        "v\n"
    );
}

/// `--listen-metrics-urls`: metrics and health on a port of their own, and no KV there.
#[test]
fn metrics_and_health_on_their_own_url() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = free_port();
    let flag = format!("--listen-metrics-urls=http://127.0.0.1:{metrics}");
    let _keel = common::keel(&dir.path().join("k"), free_port(), &[&flag]);
    // Healthy (a leader) first: the port opens before the member has elected itself.
    common::wait_for("a healthy member", || {
        (common::http_get(metrics, "/health").0 == 200).then_some(())
    });
    let (code, body) = common::http_get(metrics, "/metrics");
    assert_eq!(code, 200);
    assert!(body.contains("etcd_server_has_leader 1"), "{body}");
    assert_eq!(common::http_get(metrics, "/health").0, 200);
    let (ok, _) = common::etcdctl(&format!("http://127.0.0.1:{metrics}"), &["get", "k"]);
    assert!(!ok, "the metrics URL served a KV request");
}

/// `--logger=zap --log-outputs=FILE,stderr`: JSON lines with etcd's keys and lifecycle
/// messages, in the file.
#[test]
fn zap_logs_are_json_lines_with_etcds_keys_and_messages() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keel.log");
    let outputs = format!("--log-outputs={},stderr", file.display());
    let mut keel = common::keel(
        &dir.path().join("k"),
        free_port(),
        &["--logger=zap", &outputs],
    );
    // The member publishes itself once it has elected itself, after its port opened.
    common::wait_for("the member to publish itself", || {
        std::fs::read_to_string(&file)
            .ok()?
            .contains("published local member to cluster through raft")
            .then_some(())
    });
    assert!(keel.terminate().success());
    let text = std::fs::read_to_string(&file).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    for line in &lines {
        for key in ["level", "ts", "caller", "msg"] {
            assert!(line.get(key).is_some(), "no {key} in {line}");
        }
    }
    let messages: Vec<&str> = lines.iter().filter_map(|l| l["msg"].as_str()).collect();
    for expected in [
        "enabled capabilities for version",
        "serving client traffic insecurely; this is strongly discouraged!",
        "ready to serve client requests",
        "published local member to cluster through raft",
    ] {
        assert!(
            messages.contains(&expected),
            "no {expected:?} in {messages:?}"
        );
    }
    assert!(
        messages
            .iter()
            .any(|m| m.starts_with("raft.node: ") && m.contains(" elected leader ")),
        "no leader line in {messages:?}"
    );
    let published = lines
        .iter()
        .find(|l| l["msg"] == "published local member to cluster through raft")
        .unwrap();
    assert!(published.get("local-member-id").is_some(), "{published}");
    assert!(published.get("cluster-id").is_some(), "{published}");
}

/// `--config-file`: etcd's YAML configuration file, with its transport-security sections.
#[test]
fn etcds_configuration_file_configures_keel() {
    let dir = tempfile::tempdir().unwrap();
    let (port, peer) = (free_port(), free_port());
    let data = dir.path().join("from-file");
    let config = dir.path().join("etcd.conf.yml");
    std::fs::write(
        &config,
        format!(
            "# an etcd 3.4 configuration file\n\
             name: 'filed'\n\
             data-dir: {data}\n\
             listen-client-urls: http://127.0.0.1:{port}\n\
             advertise-client-urls: http://127.0.0.1:{port}\n\
             listen-peer-urls: http://127.0.0.1:{peer}\n\
             initial-advertise-peer-urls: http://127.0.0.1:{peer}\n\
             initial-cluster: filed=http://127.0.0.1:{peer}\n\
             initial-cluster-token: 'from-a-file'\n\
             initial-cluster-state: 'new'\n\
             heartbeat-interval: 100\n\
             election-timeout: 1000\n\
             snapshot-count: 10000\n\
             quota-backend-bytes: 0\n\
             enable-v2: false\n\
             logger: zap\n\
             log-outputs: [stderr]\n\
             client-transport-security:\n  \
               cert-file:\n  \
               key-file:\n  \
               client-cert-auth: false\n  \
               auto-tls: false\n\
             peer-transport-security:\n  \
               client-cert-auth: false\n  \
               auto-tls: false\n",
            data = data.display()
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_keel"))
        .arg(format!("--config-file={}", config.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    common::wait_listening(&mut child, port, "keel");
    let endpoint = format!("http://127.0.0.1:{port}");
    let members = common::ok(&endpoint, &["member", "list"]);
    assert!(members.contains(", started, filed, "), "{members}");
    assert!(data.join("member").exists());
    // SAFETY: kill(2) on our own child's PID.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");

    // A key Keel does not know (a later etcd's, say) is ignored, as etcd ignores it, and named.
    let text = std::fs::read_to_string(&config).unwrap() + "frobnicate: true\n";
    std::fs::write(&config, text).unwrap();
    let log = dir.path().join("stderr");
    let mut child = Command::new(env!("CARGO_BIN_EXE_keel"))
        .arg(format!("--config-file={}", config.display()))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    common::wait_listening(&mut child, port, "keel");
    // SAFETY: kill(2) on our own child's PID.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("keys frobnicate are not etcd 3.4's or not Keel's: ignored"),
        "{text}"
    );
}
