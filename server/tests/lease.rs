//! End-to-end Lease tests against the real `keel` binary, beside a real etcd 3.4 where outputs are
//! compared: etcdctl's lease commands, expiry (within TTL + 1 s, every attached key gone in one
//! revision), and remaining TTLs surviving kill -9 through lease checkpoints.

mod common;

use std::time::{Duration, Instant};

use common::{etcdctl, free_port, ok};

/// Lease IDs are random: replaced by `ID` so both servers' outputs compare.
fn normalize(text: &str, id: &str) -> String {
    let mut t = text.replace(id, "ID");
    // "remaining(99s)" depends on timing: checked apart.
    if let Some(start) = t.find("remaining(") {
        let end = t[start..].find(')').map_or(t.len(), |e| start + e + 1);
        t.replace_range(start..end, "remaining(N)");
    }
    // etcd lists attached keys in no particular order.
    if let Some(start) = t.find("attached keys([") {
        let from = start + "attached keys([".len();
        if let Some(len) = t[from..].find(']') {
            let mut keys: Vec<&str> = t[from..from + len].split(' ').collect();
            keys.sort_unstable();
            let sorted = keys.join(" ");
            t.replace_range(from..from + len, &sorted);
        }
    }
    t
}

fn grant(e: &str, ttl: &str) -> String {
    let out = ok(e, &["lease", "grant", ttl]);
    // "lease 694d7a3b9c1e0a04 granted with TTL(100s)"
    out.split_whitespace().nth(1).unwrap().to_string()
}

/// The etcdctl lease session; returns its normalized transcript.
fn session(e: &str) -> Vec<String> {
    let id = grant(e, "100");
    let mut log = Vec::new();
    let mut run = |template: &[&str]| {
        let args: Vec<String> = template.iter().map(|a| a.replace("{ID}", &id)).collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (success, out) = etcdctl(e, &args);
        log.push(format!(
            "{template:?} -> {success} {}",
            normalize(&out, &id)
        ));
        out
    };
    run(&["put", "--lease={ID}", "k1", "v1"]);
    run(&["put", "--lease={ID}", "k2", "v2"]);
    run(&["put", "k3", "v3"]);
    let ttl = run(&["lease", "timetolive", "{ID}", "--keys"]);
    let remaining: u64 = ttl
        .split("remaining(")
        .nth(1)
        .and_then(|r| r.split('s').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{ttl}"));
    assert!((95..=100).contains(&remaining), "{ttl}");
    run(&["lease", "timetolive", "{ID}"]);
    run(&["lease", "list"]);
    run(&["lease", "keep-alive", "--once", "{ID}"]);
    run(&["get", "k", "--prefix", "--print-value-only"]);
    // ignore_lease keeps the lease; a plain put detaches the key.
    run(&["put", "--ignore-lease", "k1", "v1b"]);
    run(&["put", "k2", "v2b"]);
    run(&["lease", "timetolive", "{ID}", "--keys"]);
    run(&["lease", "revoke", "{ID}"]);
    run(&["get", "k", "--prefix", "--print-value-only"]);
    run(&["lease", "timetolive", "{ID}"]);
    run(&["lease", "revoke", "{ID}"]);
    run(&["put", "--lease={ID}", "k4", "v4"]);
    run(&["lease", "keep-alive", "--once", "{ID}"]);
    run(&["lease", "grant", "9000000001"]);
    run(&["lease", "grant", "1"]);
    run(&["lease", "list"]);
    log
}

#[test]
fn etcdctl_lease_commands_answer_like_etcd() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = common::etcd(&dir.path().join("etcd"), &[]);
    let keel = common::keel(&dir.path().join("keel"), free_port(), &[]);
    let expected = session(&etcd.endpoint);
    let mut got = session(&keel.endpoint);
    // The last grant's ID differs between the servers.
    let last = |log: &mut Vec<String>| {
        let grant = log[log.len() - 2].clone();
        let id = grant
            .split("lease ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .unwrap()
            .to_string();
        for line in log.iter_mut().rev().take(2) {
            *line = line.replace(&id, "ID2");
        }
    };
    let mut expected = expected;
    last(&mut expected);
    last(&mut got);
    for (e, g) in expected.iter().zip(&got) {
        assert_eq!(g, e);
    }
    assert_eq!(got.len(), expected.len());
}

fn revision(e: &str) -> i64 {
    let json = ok(e, &["get", "nothing", "-w", "json"]);
    let start = json.find("\"revision\":").unwrap() + "\"revision\":".len();
    json[start..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn an_expired_lease_deletes_its_keys_in_one_revision_within_ttl_plus_one_second() {
    let dir = tempfile::tempdir().unwrap();
    let keel = common::keel(&dir.path().join("keel"), free_port(), &[]);
    let e = keel.endpoint.as_str();
    let id = grant(e, "2");
    for k in ["x1", "x2", "x3"] {
        ok(e, &["put", &format!("--lease={id}"), k, "v"]);
    }
    let granted = Instant::now();
    let before = revision(e);
    while ok(e, &["get", "x", "--prefix", "--keys-only"])
        .lines()
        .count()
        > 1
    {
        assert!(
            granted.elapsed() < Duration::from_secs(3),
            "keys still there {:?} after a 2 s lease was granted",
            granted.elapsed()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(ok(e, &["get", "x", "--prefix"]), "");
    assert_eq!(
        revision(e),
        before + 1,
        "the three deletes share one revision"
    );
    assert_eq!(
        ok(e, &["lease", "timetolive", &id]),
        format!("lease {id} already expired\n")
    );
}

#[test]
fn remaining_ttl_survives_kill9_through_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("keel");
    let port = free_port();
    let flags = ["--experimental-lease-checkpoint-interval=500ms"];
    let keel = common::keel(&data, port, &flags);
    let id = grant(&keel.endpoint, "30");
    ok(
        &keel.endpoint,
        &["put", &format!("--lease={id}"), "held", "v"],
    );
    std::thread::sleep(Duration::from_millis(3500));
    drop(keel); // SIGKILL
    let keel = common::keel(&data, port, &flags);
    let out = ok(&keel.endpoint, &["lease", "timetolive", &id, "--keys"]);
    let remaining: u64 = out
        .split("remaining(")
        .nth(1)
        .and_then(|r| r.split('s').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        (10..=28).contains(&remaining),
        "remaining {remaining}: the TTL restarted instead of continuing: {out}"
    );
    assert!(out.contains("attached keys([held])"), "{out}");
}
