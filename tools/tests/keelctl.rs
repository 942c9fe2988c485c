//! keelctl end to end: the golden etcd 3.4 snapshot (`tests/data/etcd-3.4.23.db`, made by
//! etcd 3.4.23 with `etcdctl snapshot save`) read and restored into a keel member that serves
//! the same data; a keel snapshot saved by keelctl and read by etcdctl; damaged inputs.
//!
//! The golden snapshot holds 40 keys `key/N` (`key/5` updated, `key/7` deleted), a lease
//! `1cd8a21d82766c2f` with the key `leased`, users `root` and `app` with role `app`, a
//! compaction at revision 20, and `last` at revision 45. etcd reported HashKV 195984961 there.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const GOLDEN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/etcd-3.4.23.db");
const GOLDEN_STATUS: &str = "ed07837a, 45, 54, 33 kB\n";
const GOLDEN_HASHKV: &str = "195984961";

fn keelctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_keelctl"))
        .args(args)
        .output()
        .unwrap()
}

fn etcdctl(endpoint: &str, args: &[&str]) -> String {
    let out = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoint}"))
        .args(args)
        .output()
        .expect("etcdctl (apt-get install etcd-client)");
    assert!(
        out.status.success(),
        "etcdctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
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

#[path = "../../bench/src/ports.rs"]
mod ports;

#[path = "../../server/tests/common/certs.rs"]
mod certs;

/// A keel member on loopback, killed when dropped.
struct Member {
    child: std::process::Child,
    endpoint: String,
}

impl Drop for Member {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_keel(data_dir: &Path, name: &str, peer: u16) -> Member {
    let cluster = format!("{name}=http://127.0.0.1:{peer}");
    start_member(data_dir, name, peer, &cluster)
}

fn start_member(data_dir: &Path, name: &str, peer: u16, cluster: &str) -> Member {
    let port = ports::free_port().unwrap();
    let endpoint = format!("http://127.0.0.1:{port}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let mut child = Command::new(keel_bin())
        .arg(format!("--name={name}"))
        .arg(format!("--data-dir={}", data_dir.display()))
        .arg(format!("--listen-client-urls={endpoint}"))
        .arg(format!("--advertise-client-urls={endpoint}"))
        .arg(format!("--listen-peer-urls={peer_url}"))
        .arg(format!("--initial-advertise-peer-urls={peer_url}"))
        .arg(format!("--initial-cluster={cluster}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(s)) = child.try_wait() {
            panic!("keel exited: {s}");
        }
        assert!(Instant::now() < deadline, "keel did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    Member { child, endpoint }
}

fn restore(file: &str, data_dir: &Path, name: &str, peer: u16, extra: &[&str]) -> Output {
    let peer_url = format!("http://127.0.0.1:{peer}");
    let dd = format!("--data-dir={}", data_dir.display());
    let n = format!("--name={name}");
    let ic = format!("--initial-cluster={name}={peer_url}");
    let ap = format!("--initial-advertise-peer-urls={peer_url}");
    let mut args = vec!["snapshot", "restore", file, &dd, &n, &ic, &ap];
    args.extend_from_slice(extra);
    keelctl(&args)
}

fn hashkv(endpoint: &str) -> String {
    let out = etcdctl(endpoint, &["endpoint", "hashkv", "-w", "json"]);
    out.split("\"hash\":")
        .nth(1)
        .unwrap()
        .split(',')
        .next()
        .unwrap()
        .to_string()
}

#[test]
fn the_golden_etcd_snapshot_reads_and_restores_into_keel() {
    let status = keelctl(&["snapshot", "status", GOLDEN]);
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&status.stdout), GOLDEN_STATUS);
    // etcdctl says the same of the same file.
    let theirs = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["snapshot", "status", GOLDEN])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&theirs.stdout), GOLDEN_STATUS);

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("m1.keel");
    let peer = ports::free_port().unwrap();
    let out = restore(GOLDEN, &data, "m1", peer, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m = start_keel(&data, "m1", peer);
    let e = &m.endpoint;
    assert_eq!(hashkv(e), GOLDEN_HASHKV, "HashKV equal to etcd's");
    assert_eq!(
        etcdctl(e, &["get", "key/5", "--print-value-only"]),
        "updated\n"
    );
    assert_eq!(etcdctl(e, &["get", "key/7"]), "");
    let json = etcdctl(e, &["get", "last", "-w", "json"]);
    assert!(json.contains("\"revision\":45"), "{json}");
    assert!(json.contains("\"mod_revision\":45"), "{json}");
    let ttl = etcdctl(e, &["lease", "timetolive", "1cd8a21d82766c2f", "--keys"]);
    assert!(ttl.contains("attached keys([leased])"), "{ttl}");
    assert_eq!(etcdctl(e, &["user", "list"]), "app\nroot\n");
    assert!(etcdctl(e, &["role", "get", "app"]).contains("(prefix key/)"));
    let old = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={e}"))
        .args(["get", "key/1", "--rev=10"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&old.stderr).contains("required revision has been compacted"),
        "the compaction came along"
    );
    assert_eq!(etcdctl(e, &["put", "new", "v"]), "OK\n");
}

#[test]
fn a_keel_snapshot_saved_by_keelctl_is_read_by_etcdctl_and_restores() {
    let dir = tempfile::tempdir().unwrap();
    let peer = ports::free_port().unwrap();
    let m = start_keel(&dir.path().join("src"), "src", peer);
    for i in 0..200 {
        etcdctl(&m.endpoint, &["put", &format!("k{i}"), &"v".repeat(i)]);
    }
    let hash = hashkv(&m.endpoint);
    let file = dir.path().join("keel.db");
    let file = file.to_str().unwrap();
    let addr = m.endpoint.trim_start_matches("http://").to_string();
    let out = keelctl(&["snapshot", "save", file, "--endpoints", &addr]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Readable by its owner only, as etcdctl makes it: it holds every key and password hash.
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    let ours = keelctl(&["snapshot", "status", file]);
    let theirs = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["snapshot", "status", file])
        .output()
        .unwrap();
    assert!(theirs.status.success());
    assert_eq!(ours.stdout, theirs.stdout);
    drop(m);
    let data = dir.path().join("copy");
    let peer = ports::free_port().unwrap();
    let out = restore(file, &data, "copy", peer, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The old cluster's voters are not carried over (a first start would read them back).
    {
        let db = data.join("member").join("snap").join("db");
        let store = keel_engine::mvcc::Store::open(&db, Default::default()).unwrap();
        assert_eq!(store.get_raw(b"meta", b"confState").unwrap(), None);
    }
    let copy = start_keel(&data, "copy", peer);
    assert_eq!(hashkv(&copy.endpoint), hash);
    // No temporary directory left beside the data dir.
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("restoring"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn damaged_snapshots_are_refused_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let golden = std::fs::read(GOLDEN).unwrap();
    let target = dir.path().join("target");
    let peer = ports::free_port().unwrap();
    let check = |bytes: &[u8], name: &str, extra: &[&str], want: &str| {
        let file = dir.path().join(name);
        std::fs::write(&file, bytes).unwrap();
        let out = restore(file.to_str().unwrap(), &target, "m1", peer, extra);
        assert!(!out.status.success(), "{name}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{name}: want {want:?} in {err}");
        assert!(!target.exists(), "{name}: nothing at the target");
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().contains("restoring"))
            .collect();
        assert!(leftovers.is_empty(), "{name}: temporary files left");
    };
    // A flipped byte in the data: the sha256 trailer no longer matches.
    let mut flipped = golden.clone();
    flipped[3 * 4096 + 100] ^= 0xff;
    check(&flipped, "flipped.db", &[], "expected sha256");
    // Damage in the tree itself (the root bucket page's id), trusted with --skip-hash-check:
    // found while walking, with the file and offset.
    let root = u64::from_le_bytes(golden[32..40].try_into().unwrap()) as usize;
    let mut torn = golden.clone();
    torn[root * 4096] ^= 1;
    check(
        &torn,
        "torn.db",
        &["--skip-hash-check"],
        &format!("corruption in {}", dir.path().join("torn.db").display()),
    );
    // Cut short: no trailer, and pages missing.
    check(
        &golden[..4 * 4096],
        "short.db",
        &[],
        "snapshot missing hash",
    );
    check(
        &golden[..4 * 4096],
        "short2.db",
        &["--skip-hash-check"],
        "the file ends before",
    );
    // Not a snapshot at all.
    check(
        &[7u8; 8192],
        "junk.db",
        &["--skip-hash-check"],
        "no valid bbolt meta page",
    );
    // An existing data dir is never overwritten.
    std::fs::create_dir(&target).unwrap();
    let out = restore(GOLDEN, &target, "m1", peer, &[]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("exists"));
    // A name missing from the initial cluster.
    let out = keelctl(&[
        "snapshot",
        "restore",
        GOLDEN,
        "--name=x",
        "--initial-cluster=m1=http://127.0.0.1:1",
    ]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("couldn't find local name \"x\""),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Disaster recovery: a 3-member keel cluster restored from one snapshot, each member with its
/// own name and the new cluster's `--initial-cluster`, serves the snapshot's data everywhere.
#[test]
fn a_three_member_cluster_restores_from_one_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let peers: Vec<u16> = (0..3).map(|_| ports::free_port().unwrap()).collect();
    let cluster = (0..3)
        .map(|i| format!("m{i}=http://127.0.0.1:{}", peers[i]))
        .collect::<Vec<_>>()
        .join(",");
    let mut members = Vec::new();
    for (i, peer) in peers.iter().enumerate() {
        let data = dir.path().join(format!("m{i}"));
        let out = keelctl(&[
            "snapshot",
            "restore",
            GOLDEN,
            &format!("--data-dir={}", data.display()),
            &format!("--name=m{i}"),
            &format!("--initial-cluster={cluster}"),
            &format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer}"),
            "--initial-cluster-token=restored",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Each member starts with flags that name itself alone (as a static pod left unchanged
    // might): the restored WAL makes it a member of the cluster it was restored into, as
    // etcd's restore does, and the flags are ignored.
    for (i, peer) in peers.iter().enumerate() {
        members.push(start_member(
            &dir.path().join(format!("m{i}")),
            &format!("m{i}"),
            *peer,
            &format!("m{i}=http://127.0.0.1:{peer}"),
        ));
    }
    // A write through one member reaches all; each has the snapshot's data.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", members[0].endpoint))
            .args(["put", "after", "dr"])
            .output()
            .unwrap();
        if out.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no leader in the restored cluster"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    for m in &members {
        assert_eq!(
            etcdctl(&m.endpoint, &["get", "key/5", "--print-value-only"]),
            "updated\n"
        );
        assert_eq!(
            etcdctl(&m.endpoint, &["get", "after", "--print-value-only"]),
            "dr\n"
        );
        let list = etcdctl(&m.endpoint, &["member", "list"]);
        assert_eq!(list.lines().count(), 3, "{list}");
    }
    assert_eq!(hashkv(&members[0].endpoint), hashkv(&members[2].endpoint));
}

/// `keelctl migrate`: a stopped etcd member's data dir becomes a keel member with the same data.
#[test]
fn a_stopped_etcd_member_migrates_to_keel() {
    let dir = tempfile::tempdir().unwrap();
    let etcd_dir = dir.path().join("etcd");
    let (port, peer) = (ports::free_port().unwrap(), ports::free_port().unwrap());
    let endpoint = format!("http://127.0.0.1:{port}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let mut etcd = Command::new("etcd")
        .args(["--name", "e"])
        .arg(format!("--data-dir={}", etcd_dir.display()))
        .arg(format!("--listen-client-urls={endpoint}"))
        .arg(format!("--advertise-client-urls={endpoint}"))
        .arg(format!("--listen-peer-urls={peer_url}"))
        .arg(format!("--initial-advertise-peer-urls={peer_url}"))
        .arg(format!("--initial-cluster=e={peer_url}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("etcd (apt-get install etcd-server)");
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "etcd did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    for i in 0..100 {
        etcdctl(&endpoint, &["put", &format!("m/{i}"), &format!("v{i}")]);
    }
    etcdctl(&endpoint, &["del", "m/3"]);
    let hash = hashkv(&endpoint);
    let data = dir.path().join("keel");
    let kpeer = ports::free_port().unwrap();
    let migrate = || {
        keelctl(&[
            "migrate",
            &format!("--etcd-data-dir={}", etcd_dir.display()),
            &format!("--data-dir={}", data.display()),
            "--name=k",
            &format!("--initial-cluster=k=http://127.0.0.1:{kpeer}"),
            &format!("--initial-advertise-peer-urls=http://127.0.0.1:{kpeer}"),
        ])
    };
    // While etcd runs, its database is locked: refused at once, nothing written.
    let out = migrate();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is etcd still running"), "{err}");
    assert!(!data.exists());
    // A clean stop commits etcd's backend.
    // SAFETY: kill(2) on our own child's PID.
    unsafe { libc::kill(etcd.id() as i32, libc::SIGTERM) };
    etcd.wait().unwrap();
    let out = migrate();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let k = start_keel(&data, "k", kpeer);
    assert_eq!(hashkv(&k.endpoint), hash);
    assert_eq!(
        etcdctl(&k.endpoint, &["get", "m/99", "--print-value-only"]),
        "v99\n"
    );
    assert_eq!(etcdctl(&k.endpoint, &["get", "m/3"]), "");
    let out = keelctl(&[
        "migrate",
        "--etcd-data-dir=/nonexistent",
        "--data-dir=/tmp/x",
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not an etcd data dir"));
}

/// `db check`, `db dump` and `db defrag` on a stopped member's data dir; a running member's
/// backend is locked, and refused with the reason.
#[test]
fn db_commands_on_a_stopped_member() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("m");
    let peer = ports::free_port().unwrap();
    let out = restore(GOLDEN, &data, "m", peer, &[]);
    assert!(out.status.success());
    let dd = format!("--data-dir={}", data.display());
    let check = keelctl(&["db", "check", &dd]);
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(String::from_utf8_lossy(&check.stdout).contains(": OK ("));
    let dump = keelctl(&["db", "dump", &dd]);
    assert!(dump.status.success());
    let dump = String::from_utf8_lossy(&dump.stdout).into_owned();
    // The golden history from the compaction on: key/5's update, key/7's deletion, `last`.
    assert!(dump.contains(" key/5 create="), "{dump}");
    assert!(
        dump.lines().any(|l| l.contains("t key/7 ")),
        "a tombstone: {dump}"
    );
    assert!(
        dump.lines()
            .last()
            .unwrap()
            .starts_with("45_0 last create=45 mod=45"),
        "{dump}"
    );
    let defrag = keelctl(&["db", "defrag", &dd]);
    assert!(
        defrag.status.success(),
        "{}",
        String::from_utf8_lossy(&defrag.stderr)
    );
    assert!(keelctl(&["db", "check", &dd]).status.success());
    // While the member runs, its backend is its own.
    let m = start_keel(&data, "m", peer);
    let locked = keelctl(&["db", "check", &dd]);
    assert!(!locked.status.success());
    assert!(
        String::from_utf8_lossy(&locked.stderr).contains("locked by another process"),
        "{}",
        String::from_utf8_lossy(&locked.stderr)
    );
    drop(m);
}

/// `keelctl check disk` measures and gives a verdict in its documented format (no timing is
/// asserted: whether this machine passes is not the test's business).
#[test]
fn check_disk_reports_iops_and_fdatasync_latency() {
    let dir = tempfile::tempdir().unwrap();
    let out = keelctl(&[
        "check",
        "disk",
        &format!("--data-dir={}", dir.path().display()),
        "--count=50",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(matches!(out.status.code(), Some(0 | 1)), "{text}");
    assert!(text.contains("sequential write IOPS: "), "{text}");
    assert!(text.contains("fdatasync p50: "), "{text}");
    let verdicts = text
        .lines()
        .filter(|l| l.ends_with("PASS") || l.contains(": PASS") || l.contains(": FAIL"))
        .count();
    assert_eq!(verdicts, 2, "{text}");
    assert_eq!(out.status.success(), !text.contains("FAIL"), "{text}");
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "the test file is removed"
    );
}

/// `keelctl wal dump` prints a member's WAL records, and names the segment and offset of a
/// damaged record in a sealed segment.
#[test]
fn wal_dump_prints_the_records() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("w");
    let peer = ports::free_port().unwrap();
    let m = start_keel(&data, "w", peer);
    for i in 0..20 {
        etcdctl(&m.endpoint, &["put", &format!("k{i}"), "v"]);
    }
    drop(m);
    let dd = format!("--data-dir={}", data.display());
    let out = keelctl(&["wal", "dump", &dd]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(" metadata cluster="), "{text}");
    assert!(text.contains(" hardstate term="), "{text}");
    assert!(
        text.lines().filter(|l| l.contains(" entry index=")).count() >= 20,
        "{text}"
    );
    assert!(
        text.contains("type=EntryConfChange"),
        "the bootstrap entry: {text}"
    );
    // Damage in an early record, with later writes after it: corruption, named with its place.
    let wal_dir = data.join("member").join("wal");
    let seg = std::fs::read_dir(&wal_dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "wal"))
        .unwrap();
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes[4096 + 30] ^= 0xff;
    std::fs::write(&seg, &bytes).unwrap();
    let out = keelctl(&["wal", "dump", &dd]);
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let name = seg.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        text.contains(&format!("{name}@4096 CORRUPT: checksum mismatch")),
        "{text}"
    );
    let missing = keelctl(&["wal", "dump", "--data-dir=/nonexistent"]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/nonexistent/member/wal"));
}

/// `keelctl snapshot save` from a member served over TLS with client-certificate auth and auth
/// enabled (`--cacert`, `--cert`, `--key`, `--user`); without a user allowed to, it is refused.
#[test]
fn snapshot_save_over_tls_with_a_user() {
    let dir = tempfile::tempdir().unwrap();
    let ca = certs::Ca::new(dir.path(), "ca");
    let (cert, key) = ca.sign(dir.path(), "member", "member", &["127.0.0.1"]);
    // The client's certificate names a user that does not exist: only `--user` gives rights.
    let (ccert, ckey) = ca.sign(dir.path(), "client", "alice", &[]);
    let (port, peer) = (ports::free_port().unwrap(), ports::free_port().unwrap());
    let endpoint = format!("https://127.0.0.1:{port}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let child = Command::new(keel_bin())
        .arg(format!("--data-dir={}", dir.path().join("d").display()))
        .arg(format!("--listen-client-urls={endpoint}"))
        .arg(format!("--advertise-client-urls={endpoint}"))
        .arg(format!("--listen-peer-urls={peer_url}"))
        .arg(format!("--initial-advertise-peer-urls={peer_url}"))
        .arg(format!("--initial-cluster=default={peer_url}"))
        .arg(format!("--cert-file={}", cert.display()))
        .arg(format!("--key-file={}", key.display()))
        .arg(format!("--trusted-ca-file={}", ca.path.display()))
        .arg("--client-cert-auth")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _member = Member {
        child,
        endpoint: endpoint.clone(),
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "keel did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    let tls = [
        format!("--cacert={}", ca.path.display()),
        format!("--cert={}", ccert.display()),
        format!("--key={}", ckey.display()),
    ];
    let tls: Vec<&str> = tls.iter().map(String::as_str).collect();
    for args in [
        &["user", "add", "root:pw"][..],
        &["auth", "enable"],
        &["--user=root:pw", "put", "k", "v"],
    ] {
        let all: Vec<&str> = tls.iter().copied().chain(args.iter().copied()).collect();
        etcdctl(&endpoint, &all);
    }
    let save = |file: &str, user: Option<&str>| {
        let mut args = vec!["snapshot", "save", file, "--endpoints", &endpoint];
        args.extend(tls.iter().copied());
        args.extend(user);
        keelctl(&args)
    };
    let file = dir.path().join("tls.db");
    let out = save(file.to_str().unwrap(), Some("--user=root:pw"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        keelctl(&["snapshot", "status", file.to_str().unwrap()])
            .status
            .success()
    );
    // As alice (the certificate's CN, no such user): refused, and no file is left.
    let denied = dir.path().join("denied.db");
    let out = save(denied.to_str().unwrap(), None);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("auth: user not found"), "{err}");
    assert!(!denied.exists());
    assert!(!dir.path().join("denied.db.part").exists());
}
