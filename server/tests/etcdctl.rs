//! End-to-end: the real `keel` binary on a free loopback port with a temporary data dir, driven by
//! etcdctl 3.4 (Debian's `etcd-client`), outputs compared with a real etcd 3.4's where both
//! behave alike (kill -9 under load is in `crash.rs`).

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Server as Keel, free_port};

fn start(data: &Path, port: u16) -> Keel {
    common::keel(data, port, &[])
}

fn start_with(data: &Path, port: u16, extra: &[&str]) -> Keel {
    common::keel(data, port, extra)
}

use common::{etcdctl, ok};

/// JSON output with the header's cluster and member IDs and raft term (which differ between
/// servers) replaced by `_`.
fn without_ids(json: &str) -> String {
    let mut out = json.to_string();
    for field in ["\"cluster_id\":", "\"member_id\":", "\"raft_term\":"] {
        if let Some(at) = out.find(field) {
            let from = at + field.len();
            let len = out[from..]
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(out.len() - from);
            out.replace_range(from..from + len, "_");
        }
    }
    out
}

/// etcdctl's KV commands on a fresh server: the transcript of every output (the expected ones
/// are asserted too, so that a difference shared by both servers is noticed as well).
fn kv_session(e: &str) -> Vec<String> {
    let log = std::cell::RefCell::new(Vec::new());
    let run = |args: &[&str]| -> (bool, String) {
        let (success, out) = etcdctl(e, args);
        log.borrow_mut()
            .push(format!("{args:?} -> {success} {}", without_ids(&out)));
        (success, out)
    };
    let ok = |args: &[&str]| -> String {
        let (success, out) = run(args);
        assert!(success, "etcdctl {args:?} failed: {out}");
        out
    };
    assert_eq!(ok(&["put", "foo", "bar"]), "OK\n");
    assert_eq!(ok(&["put", "foo/a", "1"]), "OK\n");
    assert_eq!(ok(&["put", "foo/b", "2"]), "OK\n");
    assert_eq!(ok(&["get", "foo"]), "foo\nbar\n");
    assert_eq!(
        ok(&["get", "foo", "--prefix", "--keys-only"]),
        "foo\n\nfoo/a\n\nfoo/b\n\n"
    );
    assert_eq!(ok(&["get", "foo/", "--prefix", "--limit=1"]), "foo/a\n1\n");
    assert_eq!(
        ok(&["get", "foo/a", "--from-key", "--keys-only"]),
        "foo/a\n\nfoo/b\n\n"
    );
    assert_eq!(
        ok(&[
            "get",
            "foo",
            "--prefix",
            "--sort-by=KEY",
            "--order=DESCEND",
            "--keys-only"
        ]),
        "foo/b\n\nfoo/a\n\nfoo\n\n"
    );
    assert_eq!(ok(&["put", "foo", "baz"]), "OK\n");
    assert_eq!(ok(&["get", "foo", "--rev=2"]), "foo\nbar\n");
    let json = ok(&["get", "foo", "-w", "json"]);
    assert!(
        json.contains(r#""revision":5"#)
            && json.contains(r#""create_revision":2,"mod_revision":5,"version":2"#),
        "{json}"
    );
    assert_eq!(
        ok(&["del", "foo/", "--prefix", "--prev-kv"]),
        "2\nfoo/a\n1\nfoo/b\n2\n"
    );
    // The interactive txn form on stdin.
    let mut txn = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={e}"))
        .args(["txn"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    txn.stdin
        .take()
        .unwrap()
        .write_all(b"value(\"foo\") = \"baz\"\n\nput foo qux\nget foo\n\nput foo no\n\n")
        .unwrap();
    let out = txn.wait_with_output().unwrap();
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out, "SUCCESS\n\nOK\n\nfoo\nqux\n");
    ok(&["get", "foo"]);
    assert_eq!(ok(&["compaction", "3"]), "compacted revision 3\n");
    let (success, err) = run(&["get", "foo", "--rev=2"]);
    assert!(!success);
    assert_eq!(
        err,
        "Error: etcdserver: mvcc: required revision has been compacted"
    );
    let (success, err) = run(&["get", "foo", "--rev=100"]);
    assert!(!success);
    assert_eq!(
        err,
        "Error: etcdserver: mvcc: required revision is a future revision"
    );
    let (success, err) = run(&["put", "", "x"]);
    assert!(!success);
    assert_eq!(err, "Error: etcdserver: key is not provided");
    run(&["get", "", "--from-key"]);
    let mut log = log.into_inner();
    log.push(out);
    log
}

#[test]
fn etcdctl_kv_commands_answer_like_etcd() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = common::etcd(&dir.path().join("etcd"), &[]);
    let keel = start(&dir.path().join("data"), free_port());
    let expected = kv_session(&etcd.endpoint);
    let got = kv_session(&keel.endpoint);
    for (e, g) in expected.iter().zip(&got) {
        assert_eq!(g, e);
    }
    assert_eq!(got.len(), expected.len());
}

/// A quota below the size Keel's backend starts with (16 MiB, grown in steps as bbolt's) refuses
/// every put with etcd's error, while reads and deletes are served. (etcd's file starts smaller,
/// so this quota does not refuse its first put: not compared.)
#[test]
fn a_quota_below_the_backend_size_refuses_puts_with_etcds_error() {
    let dir = tempfile::tempdir().unwrap();
    let keel = start_with(
        &dir.path().join("a"),
        free_port(),
        &["--quota-backend-bytes=1048576"],
    );
    let e = keel.endpoint.as_str();
    let (success, err) = etcdctl(e, &["put", "k", "v"]);
    assert!(!success);
    assert_eq!(err, "Error: etcdserver: mvcc: database space exceeded");
    assert_eq!(ok(e, &["get", "k"]), "");
    assert_eq!(ok(e, &["del", "k"]), "0\n");
}

/// `etcdctl put KEY` with the value on stdin, which must fail: its `Error:` lines.
fn put_from_stdin(endpoint: &str, key: &str, value: &str) -> String {
    use std::io::Write;
    let mut child = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args([&format!("--endpoints={endpoint}"), "put", key])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("etcdctl (apt-get install etcd-client)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(value.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        !out.status.success(),
        "put of {} bytes succeeded",
        value.len()
    );
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| l.starts_with("Error:"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn request_size_limits_answer_like_etcd() {
    let dir = tempfile::tempdir().unwrap();
    let flags = ["--max-request-bytes=1024"];
    let etcd = common::etcd(&dir.path().join("etcd"), &flags);
    let keel = start_with(&dir.path().join("keel"), free_port(), &flags);
    let big = "x".repeat(2000);
    for e in [&etcd.endpoint, &keel.endpoint] {
        let (success, err) = etcdctl(e, &["put", "k", &big]);
        assert!(!success, "{e}");
        assert_eq!(err, "Error: etcdserver: request is too large", "{e}");
        // Over the gRPC limit (--max-request-bytes + 512 KiB): refused before it is decoded,
        // in grpc-go's words. The value comes on stdin (too long for an argument).
        let err = put_from_stdin(e, "k", &"y".repeat(600 << 10));
        assert_eq!(
            err,
            "Error: rpc error: code = ResourceExhausted desc = grpc: received message larger \
             than max (614407 vs. 525312)",
            "{e}"
        );
        assert_eq!(ok(e, &["put", "k", "small"]), "OK\n", "{e}");
        assert_eq!(ok(e, &["get", "k", "--print-value-only"]), "small\n", "{e}");
    }
}

#[test]
fn bad_flags_exit_with_code_2_and_a_clear_message() {
    let out = Command::new(env!("CARGO_BIN_EXE_keel"))
        .arg("--no-such-flag")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--no-such-flag"));
    let out = Command::new(env!("CARGO_BIN_EXE_keel"))
        .arg("--listen-client-urls=localhost:2379")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("invalid value for --listen-client-urls")
    );
    let out = Command::new(env!("CARGO_BIN_EXE_keel"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("keel "));
}

/// `/health`, `/version` and the metrics whose values both servers determine alike, after the
/// same put and get; then the ones only Keel's own run determines.
fn http_endpoints(e: &str, port: u16) -> (Vec<String>, String) {
    ok(e, &["put", "k", "v"]);
    ok(e, &["get", "k"]);
    let (refused, _) = etcdctl(e, &["get", ""]);
    assert!(!refused);
    let mut out = vec![
        format!("{:?}", common::http_get(port, "/health")),
        format!("{:?}", common::http_get(port, "/version")),
    ];
    // `/version`'s content type (a JSON body).
    let head = {
        use std::io::{Read as _, Write as _};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        write!(
            s,
            "GET /version HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut raw = String::new();
        s.read_to_string(&mut raw).unwrap();
        raw.to_ascii_lowercase()
    };
    let content_type = head
        .lines()
        .find_map(|l| l.strip_prefix("content-type: "))
        .unwrap_or("none")
        .to_string();
    out.push(format!("/version content-type {content_type}"));
    let (code, metrics) = common::http_get(port, "/metrics");
    assert_eq!(code, 200);
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("{name} missing from:\n{metrics}"))
            .parse()
            .unwrap()
    };
    for name in [
        "etcd_mvcc_put_total",
        "etcd_mvcc_range_total",
        "etcd_server_has_leader",
        "etcd_server_is_leader",
        "etcd_server_is_learner",
        "etcd_server_health_success",
        "etcd_debugging_mvcc_current_revision",
    ] {
        out.push(format!("{name} {}", value(name)));
    }
    // go-grpc-prometheus's counters (label order aside: Go's client sorts them).
    let labelled = |name: &str, labels: &[&str]| -> String {
        metrics
            .lines()
            .filter(|l| l.starts_with(&format!("{name}{{")))
            .find(|l| labels.iter().all(|want| l.contains(want)))
            .and_then(|l| l.rsplit(' ').next())
            .unwrap_or("missing")
            .to_string()
    };
    for (name, labels) in [
        ("grpc_server_started_total", &[r#"grpc_method="Put""#][..]),
        (
            "grpc_server_handled_total",
            &[
                r#"grpc_method="Put""#,
                r#"grpc_code="OK""#,
                r#"grpc_type="unary""#,
            ],
        ),
        (
            "grpc_server_handled_total",
            &[r#"grpc_method="Range""#, r#"grpc_code="OK""#],
        ),
        (
            "grpc_server_handled_total",
            &[r#"grpc_method="Range""#, r#"grpc_code="InvalidArgument""#],
        ),
        (
            "grpc_server_handled_total",
            &[
                r#"grpc_method="Watch""#,
                r#"grpc_code="OK""#,
                r#"grpc_type="bidi_stream""#,
            ],
        ),
    ] {
        out.push(format!("{name} {labels:?} {}", labelled(name, labels)));
    }
    // The leader's empty entry and the put, at least.
    assert!(value("etcd_server_proposals_committed_total") >= 2.0, "{e}");
    assert!(value("etcd_server_proposals_applied_total") >= 2.0, "{e}");
    assert!(
        value("etcd_disk_wal_fsync_duration_seconds_count") >= 1.0,
        "{e}"
    );
    assert!(value("etcd_mvcc_db_total_size_in_bytes") > 0.0, "{e}");
    assert!(value("process_resident_memory_bytes") > 0.0, "{e}");
    (out, metrics)
}

#[test]
fn http_endpoints_answer_like_etcd() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = common::etcd(&dir.path().join("etcd"), &[]);
    let keel = start(&dir.path().join("data"), free_port());
    let (expected, _) = http_endpoints(&etcd.endpoint, etcd.port);
    let (got, _) = http_endpoints(&keel.endpoint, keel.port);
    assert_eq!(got, expected);
    assert_eq!(got[0], format!("{:?}", (200, r#"{"health":"true"}"#)));
    assert!(
        got[1].contains(r#"\"etcdserver\":\"3.4.23\""#),
        "{}",
        got[1]
    );
    assert_eq!(got[9], "etcd_debugging_mvcc_current_revision 2");
}

/// Periodic compaction with a one-second retention: both servers compact revision 2 away (the
/// test waits until they have) and keep revision 3.
#[test]
fn periodic_auto_compaction_compacts_like_etcd() {
    let dir = tempfile::tempdir().unwrap();
    let flags = [
        "--auto-compaction-mode=periodic",
        "--auto-compaction-retention=1s",
    ];
    let etcd = common::etcd(&dir.path().join("etcd"), &flags);
    let keel = start_with(&dir.path().join("keel"), free_port(), &flags);
    for e in [&etcd.endpoint, &keel.endpoint] {
        ok(e, &["put", "k", "v1"]);
        ok(e, &["put", "k", "v2"]);
    }
    // Generous: it only guards a hang.
    let deadline = Instant::now() + Duration::from_secs(60);
    for e in [&etcd.endpoint, &keel.endpoint] {
        let err = loop {
            let (success, out) = etcdctl(e, &["get", "k", "--rev=2"]);
            if !success {
                break out;
            }
            assert!(Instant::now() < deadline, "{e}: revision 2 never compacted");
            std::thread::sleep(Duration::from_millis(100));
        };
        assert_eq!(
            err,
            "Error: etcdserver: mvcc: required revision has been compacted"
        );
        assert_eq!(
            ok(e, &["get", "k", "--rev=3", "--print-value-only"]),
            "v2\n"
        );
    }
}
