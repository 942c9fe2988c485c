//! End-to-end: the real `keel` binary on a free loopback port with a temporary data dir, driven by
//! etcdctl 3.4 (Debian's `etcd-client`), outputs compared with etcd's (kill -9 under load is in
//! `crash.rs`).

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Server as Keel, free_port};

fn start(data: &Path, port: u16) -> Keel {
    common::keel(data, port, &[])
}

fn start_with(data: &Path, port: u16, extra: &[&str]) -> Keel {
    common::keel(data, port, extra)
}

use common::{etcdctl, ok};

#[test]
fn etcdctl_kv_commands_answer_like_etcd() {
    let dir = tempfile::tempdir().unwrap();
    let keel = start(&dir.path().join("data"), free_port());
    let e = keel.endpoint.as_str();
    assert_eq!(ok(e, &["put", "foo", "bar"]), "OK\n");
    assert_eq!(ok(e, &["put", "foo/a", "1"]), "OK\n");
    assert_eq!(ok(e, &["put", "foo/b", "2"]), "OK\n");
    assert_eq!(ok(e, &["get", "foo"]), "foo\nbar\n");
    assert_eq!(
        ok(e, &["get", "foo", "--prefix", "--keys-only"]),
        "foo\n\nfoo/a\n\nfoo/b\n\n"
    );
    assert_eq!(
        ok(e, &["get", "foo/", "--prefix", "--limit=1"]),
        "foo/a\n1\n"
    );
    assert_eq!(
        ok(e, &["get", "foo/a", "--from-key", "--keys-only"]),
        "foo/a\n\nfoo/b\n\n"
    );
    assert_eq!(
        ok(
            e,
            &[
                "get",
                "foo",
                "--prefix",
                "--sort-by=KEY",
                "--order=DESCEND",
                "--keys-only"
            ]
        ),
        "foo/b\n\nfoo/a\n\nfoo\n\n"
    );
    assert_eq!(ok(e, &["put", "foo", "baz"]), "OK\n");
    assert_eq!(ok(e, &["get", "foo", "--rev=2"]), "foo\nbar\n");
    let json = ok(e, &["get", "foo", "-w", "json"]);
    assert!(
        json.contains(r#""revision":5"#)
            && json.contains(r#""create_revision":2,"mod_revision":5,"version":2"#),
        "{json}"
    );
    assert_eq!(
        ok(e, &["del", "foo/", "--prefix", "--prev-kv"]),
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
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "SUCCESS\n\nOK\n\nfoo\nqux\n"
    );
    assert_eq!(ok(e, &["compaction", "3"]), "compacted revision 3\n");
    let (success, err) = etcdctl(e, &["get", "foo", "--rev=2"]);
    assert!(!success);
    assert_eq!(
        err,
        "Error: etcdserver: mvcc: required revision has been compacted"
    );
    let (success, err) = etcdctl(e, &["get", "foo", "--rev=100"]);
    assert!(!success);
    assert_eq!(
        err,
        "Error: etcdserver: mvcc: required revision is a future revision"
    );
    let (success, err) = etcdctl(e, &["put", "", "x"]);
    assert!(!success);
    assert_eq!(err, "Error: etcdserver: key is not provided");
}

#[test]
fn quota_and_request_size_limits_answer_like_etcd() {
    let dir = tempfile::tempdir().unwrap();
    // A quota below the size the backend starts with: every put is refused, reads and deletes
    // are still served.
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
    drop(keel);

    let keel = start_with(
        &dir.path().join("b"),
        free_port(),
        &["--max-request-bytes=1024"],
    );
    let e = keel.endpoint.as_str();
    let big = "x".repeat(2000);
    let (success, err) = etcdctl(e, &["put", "k", &big]);
    assert!(!success);
    assert_eq!(err, "Error: etcdserver: request is too large");
    assert_eq!(ok(e, &["put", "k", "small"]), "OK\n");
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

#[test]
fn http_endpoints_answer_like_etcd() {
    let dir = tempfile::tempdir().unwrap();
    let keel = start(&dir.path().join("data"), free_port());
    ok(&keel.endpoint, &["put", "k", "v"]);
    ok(&keel.endpoint, &["get", "k"]);
    assert_eq!(
        common::http_get(keel.port, "/health"),
        (200, r#"{"health":"true"}"#.to_string())
    );
    let (code, version) = common::http_get(keel.port, "/version");
    assert_eq!(code, 200);
    assert!(version.contains(r#""etcdserver":"3.4.23""#), "{version}");
    let (code, metrics) = common::http_get(keel.port, "/metrics");
    assert_eq!(code, 200);
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("{name} missing from:\n{metrics}"))
            .parse()
            .unwrap()
    };
    assert_eq!(value("etcd_mvcc_put_total"), 1.0);
    assert_eq!(value("etcd_mvcc_range_total"), 1.0);
    assert_eq!(value("etcd_server_has_leader"), 1.0);
    assert_eq!(value("etcd_server_is_leader"), 1.0);
    assert_eq!(value("etcd_debugging_mvcc_current_revision"), 2.0);
    // The leader's empty entry and the put, at least.
    assert!(value("etcd_server_proposals_committed_total") >= 2.0);
    assert!(value("etcd_server_proposals_applied_total") >= 2.0);
    assert!(value("etcd_disk_wal_fsync_duration_seconds_count") >= 1.0);
    assert!(value("etcd_mvcc_db_total_size_in_bytes") > 0.0);
    assert!(value("process_resident_memory_bytes") > 0.0);
}

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
    // Samples every 100 ms; compactions every second to the revision of a second ago.
    std::thread::sleep(Duration::from_millis(3500));
    for e in [&etcd.endpoint, &keel.endpoint] {
        let (success, err) = etcdctl(e, &["get", "k", "--rev=2"]);
        assert!(!success, "{e}: revision 2 still readable");
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
