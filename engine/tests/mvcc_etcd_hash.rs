//! HashKV against real etcd: the same history applied to Keel's store and to etcd 3.4 (Debian's
//! `etcd-server`, started on free loopback ports with a temporary data dir, killed by PID) must
//! give the same HashKV at every revision, before and after a compaction. This checks that the
//! stored bytes (revision keys, `KeyValue` encoding) and the hash rules are etcd's.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use keel_engine::btree::BackendOptions;
use keel_engine::mvcc::Store;
use keel_engine::mvcc::apply::{self, DeleteRangeRequest, PutRequest};

struct Etcd {
    child: Child,
    endpoint: String,
    _dir: tempfile::TempDir,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[path = "../../bench/src/ports.rs"]
mod ports;

fn free_port() -> u16 {
    ports::free_port().unwrap()
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
    String::from_utf8(out.stdout).unwrap()
}

fn start_etcd() -> Etcd {
    let dir = tempfile::tempdir().unwrap();
    let (client, peer) = (free_port(), free_port());
    let endpoint = format!("http://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let child = Command::new("etcd")
        .args(["--name", "hash-test"])
        .arg(format!("--data-dir={}", dir.path().join("etcd").display()))
        .arg(format!("--listen-client-urls={endpoint}"))
        .arg(format!("--advertise-client-urls={endpoint}"))
        .arg(format!("--listen-peer-urls={peer_url}"))
        .arg(format!("--initial-advertise-peer-urls={peer_url}"))
        .arg(format!("--initial-cluster=hash-test={peer_url}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("etcd (apt-get install etcd-server)");
    let etcd = Etcd {
        child,
        endpoint,
        _dir: dir,
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ok = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", etcd.endpoint))
            .args(["endpoint", "health"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return etcd;
        }
        assert!(Instant::now() < deadline, "etcd did not become healthy");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// etcd's HashKV at `rev` (0: current), and its compact revision.
fn etcd_hashkv(endpoint: &str, rev: i64) -> (u32, i64) {
    let out = etcdctl(
        endpoint,
        &["endpoint", "hashkv", &format!("--rev={rev}"), "-w", "json"],
    );
    let field = |name: &str| -> i64 {
        let at = out
            .find(&format!("\"{name}\":"))
            .unwrap_or_else(|| panic!("{name} in {out}"));
        let rest = &out[at + name.len() + 3..];
        let end = rest
            .find(|c: char| c != '-' && !c.is_ascii_digit())
            .unwrap();
        rest[..end].parse().unwrap()
    };
    (field("hash") as u32, field("compact_revision"))
}

#[test]
fn hashkv_matches_etcd_over_the_same_history() {
    let etcd = start_etcd();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("db"), BackendOptions::default()).unwrap();
    let ep = etcd.endpoint.clone();
    let put = |k: &str, v: &str| {
        etcdctl(&ep, &["put", k, v]);
        let req = PutRequest {
            key: k.into(),
            value: v.into(),
            ..Default::default()
        };
        apply::put_request(&store, &req, &apply::NoLeases, None).unwrap();
    };
    let del = |k: &str, prefix: bool| {
        let mut args = vec!["del", k];
        if prefix {
            args.push("--prefix");
        }
        etcdctl(&ep, &args);
        let range_end = if prefix {
            let mut e = k.as_bytes().to_vec();
            *e.last_mut().unwrap() += 1;
            e
        } else {
            Vec::new()
        };
        let req = DeleteRangeRequest {
            key: k.into(),
            range_end,
            ..Default::default()
        };
        apply::delete_request(&store, &req, None).unwrap();
    };
    put("a", "1");
    put("b", "2");
    put("a", "3");
    del("b", false);
    put("dir/x", &"x".repeat(3000));
    put("dir/y", "y");
    put("b", "again");
    del("dir/", true);
    put("c", "");
    put("a", "4");
    let current = store.current_revision();
    for rev in 0..=current {
        let (hash, compact) = etcd_hashkv(&ep, rev);
        let ours = store.hash_kv(rev).unwrap();
        assert_eq!(
            (ours.hash, ours.compact_revision),
            (hash, compact),
            "HashKV at revision {rev}"
        );
    }
    // Compact both at a revision whose change is a delete, then compare again.
    let compact_at = 9; // del dir/ --prefix
    etcdctl(&ep, &["compaction", "--physical", &compact_at.to_string()]);
    store.compact(compact_at).unwrap();
    // etcd 3.4 refuses HashKV at exactly the compacted revision (`rev <= compactRev`); 3.5 serves
    // it (`rev < compactRev` in hash.go), as Keel does. Compare where both answer.
    assert!(store.hash_kv(compact_at).is_ok());
    assert!(store.hash_kv(compact_at - 1).is_err());
    for rev in (compact_at + 1..=current).chain([0]) {
        let (hash, compact) = etcd_hashkv(&ep, rev);
        let ours = store.hash_kv(rev).unwrap();
        assert_eq!(
            (ours.hash, ours.compact_revision),
            (hash, compact),
            "HashKV at {rev} after compaction"
        );
    }
    assert_eq!(compact_at, etcd_hashkv(&ep, 0).1);
}
