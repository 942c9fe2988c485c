//! End-to-end Lease tests against the real `keel` binary, beside a real etcd 3.4 where outputs are
//! compared: etcdctl's lease commands, expiry (every attached key gone in one revision, also for
//! a lease granted before a restart), remaining TTLs surviving kill -9 through lease checkpoints,
//! and keep-alive streams carrying thousands of renewals. Nothing is timed: tests wait for what
//! they check (keys gone, a checkpoint applied), with a generous deadline that only guards a
//! hang.

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
    assert!((1..=100).contains(&remaining), "{ttl}");
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
    header_revision(&json)
}

fn header_revision(json: &str) -> i64 {
    let start = json.find("\"revision\":").unwrap() + "\"revision\":".len();
    json[start..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// A hang guard, never the behaviour under test.
const HANG: Duration = Duration::from_secs(60);

/// Grants a lease of `ttl` seconds and attaches `keys` to it; the revision of the last put, or
/// `None` if the lease expired before every key was attached (a slow machine: the caller tries
/// again with a longer TTL).
fn lease_with_keys(e: &str, ttl: u64, keys: &[&str]) -> Option<(String, i64)> {
    let id = grant(e, &ttl.to_string());
    let mut rev = 0;
    for k in keys {
        let (success, out) = etcdctl(e, &["put", &format!("--lease={id}"), k, "v", "-w", "json"]);
        if !success {
            assert!(out.contains("requested lease not found"), "{out}");
            return None;
        }
        rev = header_revision(&out);
    }
    Some((id, rev))
}

/// Waits until no key has `prefix`: the revision then.
fn wait_gone(e: &str, prefix: &str) -> i64 {
    let deadline = Instant::now() + HANG;
    while !ok(e, &["get", prefix, "--prefix", "--keys-only"]).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the lease's keys are still there"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    revision(e)
}

#[test]
fn an_expired_lease_deletes_its_keys_in_one_revision() {
    let dir = tempfile::tempdir().unwrap();
    let keel = common::keel(&dir.path().join("keel"), free_port(), &[]);
    let e = keel.endpoint.as_str();
    let keys = ["x1", "x2", "x3"];
    let (id, last_put) = [2, 4, 8, 16, 32]
        .into_iter()
        .find_map(|ttl| lease_with_keys(e, ttl, &keys))
        .expect("a lease outlived its puts");
    let gone = wait_gone(e, "x");
    assert_eq!(gone, last_put + 1, "the three deletes share one revision");
    for k in keys {
        let rev = (last_put + 1).to_string();
        assert_eq!(
            ok(e, &["get", k, "--rev", &rev]),
            "",
            "{k} after the expiry"
        );
    }
    assert_eq!(
        ok(e, &["lease", "timetolive", &id]),
        format!("lease {id} already expired\n")
    );
}

/// A lease granted before a graceful stop still expires after the restart, its keys deleted in
/// one revision.
#[test]
fn a_lease_granted_before_a_restart_expires_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("keel");
    let port = free_port();
    let keys = ["r1", "r2", "r3"];
    // The keys must still be there once the restarted member answers: else try a longer TTL.
    for ttl in [4, 8, 16, 32] {
        let _ = std::fs::remove_dir_all(&data);
        let mut keel = common::keel(&data, port, &[]);
        let Some((id, last_put)) = lease_with_keys(&keel.endpoint, ttl, &keys) else {
            continue;
        };
        assert!(keel.terminate().success());
        let keel = common::keel(&data, port, &[]);
        let e = keel.endpoint.as_str();
        let before = ok(e, &["get", "r", "--prefix", "--keys-only"]);
        if before.lines().filter(|l| !l.is_empty()).count() != keys.len() {
            continue;
        }
        let gone = wait_gone(e, "r");
        assert_eq!(gone, last_put + 1, "the three deletes share one revision");
        assert_eq!(
            ok(e, &["lease", "timetolive", &id]),
            format!("lease {id} already expired\n")
        );
        return;
    }
    panic!("every lease expired before the restarted member answered");
}

/// The remaining TTL a `lease timetolive` output gives.
fn remaining(out: &str) -> i64 {
    out.split("remaining(")
        .nth(1)
        .and_then(|r| r.split('s').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{out}"))
}

fn metric(port: u16, name: &str) -> f64 {
    let (_, text) = common::http_get(port, "/metrics");
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("{name} missing"))
        .parse()
        .unwrap()
}

/// After kill -9 the remaining TTL continues from the last checkpoint instead of starting again
/// from the granted TTL: once the TTL is seen well below the granted one and two checkpoints were
/// applied after that (nothing else is proposed meanwhile), the restarted member reports at most
/// that TTL (plus rounding up and the new leader's extension of one election timeout, as etcd).
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
    let deadline = Instant::now() + HANG;
    let seen = loop {
        let left = remaining(&ok(&keel.endpoint, &["lease", "timetolive", &id]));
        if left <= 24 {
            break left;
        }
        assert!(
            Instant::now() < deadline,
            "the TTL does not go down: {left}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let applied = "etcd_server_proposals_applied_total";
    let after = metric(port, applied);
    while metric(port, applied) < after + 2.0 {
        assert!(Instant::now() < deadline, "no lease checkpoint applied");
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(keel); // SIGKILL
    let keel = common::keel(&data, port, &flags);
    let out = ok(&keel.endpoint, &["lease", "timetolive", &id, "--keys"]);
    let left = remaining(&out);
    assert!(
        left > 0 && left <= seen + 2,
        "remaining {left} after {seen} was seen: the TTL restarted instead of continuing: {out}"
    );
    assert!(out.contains("attached keys([held])"), "{out}");
}

/// Keep-alives of `LEASES` leases interleaved on one stream, `RENEWALS` each: every answer in
/// order, each with the full TTL; the leases are alive after. Returns a summary to compare.
async fn keep_alive_stream(endpoint: &str) -> Vec<String> {
    use futures::StreamExt;
    use keel_proto::etcdserverpb as pb;
    const LEASES: i64 = 4;
    const RENEWALS: usize = 1000;
    let mut client = pb::lease_client::LeaseClient::connect(endpoint.to_string())
        .await
        .unwrap();
    let ids: Vec<i64> = (1..=LEASES).map(|i| 7000 + i).collect();
    for &id in &ids {
        let r = client
            .lease_grant(pb::LeaseGrantRequest { ttl: 60, id })
            .await
            .unwrap()
            .into_inner();
        assert_eq!((r.id, r.ttl), (id, 60));
    }
    let sent: Vec<i64> = (0..RENEWALS * ids.len())
        .map(|i| ids[i % ids.len()])
        .collect();
    let requests = futures::stream::iter(
        sent.clone()
            .into_iter()
            .map(|id| pb::LeaseKeepAliveRequest { id }),
    )
    // The request side stays open until every answer is read.
    .chain(futures::stream::pending());
    let mut answers = client
        .lease_keep_alive(requests)
        .await
        .unwrap()
        .into_inner();
    for (n, &id) in sent.iter().enumerate() {
        let r = tokio::time::timeout(HANG, answers.message())
            .await
            .unwrap_or_else(|_| panic!("{endpoint}: no answer to keep-alive {n}"))
            .unwrap()
            .expect("the stream stays open");
        assert_eq!((r.id, r.ttl), (id, 60), "{endpoint}: keep-alive {n}");
    }
    drop(answers);
    let mut summary = vec![format!("{} keep-alives answered", sent.len())];
    for &id in &ids {
        let r = client
            .lease_time_to_live(pb::LeaseTimeToLiveRequest { id, keys: false })
            .await
            .unwrap()
            .into_inner();
        assert!(
            r.ttl > 0 && r.ttl <= 60,
            "{endpoint}: lease {id} TTL {}",
            r.ttl
        );
        summary.push(format!("lease {id} granted {} alive", r.granted_ttl));
    }
    summary
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_keep_alives_on_one_stream_answer_like_etcd() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = common::etcd(&dir.path().join("etcd"), &[]);
    let keel = common::keel(&dir.path().join("keel"), free_port(), &[]);
    let expected = keep_alive_stream(&etcd.endpoint).await;
    let got = keep_alive_stream(&keel.endpoint).await;
    assert_eq!(got, expected);
}

/// Revokes leases with a key each while other clients write; returns, for each revoke, the
/// revision its response gave and the revision its key was deleted at.
async fn revoke_revisions(endpoint: &str, revokes: usize) -> Vec<(i64, i64)> {
    use etcd_client::{Client, EventType, PutOptions, WatchOptions};
    use std::sync::atomic::{AtomicBool, Ordering};
    let mut c = Client::connect([endpoint], None).await.unwrap();
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let (mut c, stop) = (c.clone(), stop.clone());
            tokio::spawn(async move {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    c.put(format!("load/{w}"), i.to_string(), None)
                        .await
                        .unwrap();
                    i += 1;
                }
            })
        })
        .collect();
    let mut answered = Vec::new();
    for i in 0..revokes {
        let id = c.lease_grant(60, None).await.unwrap().id();
        c.put(
            format!("rv/{i:04}"),
            "v",
            Some(PutOptions::new().with_lease(id)),
        )
        .await
        .unwrap();
        answered.push(
            c.lease_revoke(id)
                .await
                .unwrap()
                .header()
                .unwrap()
                .revision(),
        );
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    let mut s = c
        .watch(
            "rv/",
            Some(WatchOptions::new().with_prefix().with_start_revision(1)),
        )
        .await
        .unwrap();
    let mut deleted = Vec::new();
    while deleted.len() < revokes {
        let r = tokio::time::timeout(HANG, s.message())
            .await
            .expect("history")
            .unwrap()
            .unwrap();
        for e in r.events() {
            if e.event_type() == EventType::Delete {
                deleted.push(e.kv().unwrap().mod_revision());
            }
        }
    }
    answered.into_iter().zip(deleted).collect()
}

/// etcd answers a LeaseRevoke with the revision as of its apply, which is the revision of the
/// deletes of its keys, even with writes of other clients in the same raft batch. (Keel used
/// to read the store's revision when replying, which could be later.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoke_answers_with_its_own_revision() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = common::etcd(&dir.path().join("etcd"), &[]);
    let keel = common::keel(&dir.path().join("keel"), free_port(), &[]);
    for e in [&etcd.endpoint, &keel.endpoint] {
        let pairs = revoke_revisions(e, 100).await;
        let wrong: Vec<&(i64, i64)> = pairs.iter().filter(|(a, d)| a != d).collect();
        assert!(
            wrong.is_empty(),
            "{e}: {} of {} revokes answered with another revision than their deletes' \
             (answered, deleted): {wrong:?}",
            wrong.len(),
            pairs.len()
        );
    }
}

/// A keep-alive of a lease that has expired but whose revocation is not yet applied answers
/// once it is (TTL 0, the keys gone), as etcd's lessor waits for the revocation: a client told
/// its lease is gone finds its keys gone. The revocation is held back by a stalled WAL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keep_alive_of_an_expired_lease_answers_once_it_is_revoked() {
    let dir = tempfile::tempdir().unwrap();
    let (keel, stall) = common::keel_stallable(dir.path());
    let mut c = etcd_client::Client::connect([keel.endpoint.as_str()], None)
        .await
        .unwrap();
    let lease = c.lease_grant(2, None).await.unwrap().id();
    c.put(
        "leased",
        "v",
        Some(etcd_client::PutOptions::new().with_lease(lease)),
    )
    .await
    .unwrap();
    // Writes stall from now: the revocation cannot commit until the file goes.
    std::fs::write(&stall, "4s").unwrap();
    tokio::time::sleep(Duration::from_millis(3500)).await;
    std::fs::remove_file(&stall).unwrap();
    // etcd-client reports the answer's TTL 0 as "lease not found".
    match c.lease_keep_alive(lease).await {
        Ok((_, mut answers)) => {
            let answer = answers.message().await.unwrap().unwrap();
            assert_eq!(answer.ttl(), 0);
        }
        Err(e) => assert!(e.to_string().contains("lease not found"), "{e}"),
    }
    let got = c
        .get(
            "leased",
            Some(etcd_client::GetOptions::new().with_serializable()),
        )
        .await
        .unwrap();
    assert!(
        got.kvs().is_empty(),
        "told the lease is gone, the key is still there"
    );
}
