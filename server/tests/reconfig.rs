//! Runtime reconfiguration, end to end, with etcdctl as an operator runs it: a cluster grown
//! from one member through a learner, a member replaced under writes, the leader removed,
//! membership kept across restarts, and etcd's refusals (checked against etcd 3.4 itself).

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::{Cluster, etcd, etcdctl, ok, wait_for};
use etcd_client::{Client, GetOptions};

/// What `etcdctl member add` printed: the new member's ID and its `ETCD_INITIAL_CLUSTER`.
fn added(out: &str) -> (String, String) {
    let id = out
        .split_whitespace()
        .nth(1)
        .unwrap_or_else(|| panic!("no member ID in {out:?}"))
        .to_string();
    let ic = out
        .lines()
        .find_map(|l| l.strip_prefix("ETCD_INITIAL_CLUSTER=\""))
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or_else(|| panic!("no ETCD_INITIAL_CLUSTER in {out:?}"))
        .to_string();
    assert!(
        out.contains("ETCD_INITIAL_CLUSTER_STATE=\"existing\""),
        "{out}"
    );
    (id, ic)
}

/// etcdctl for a membership change that must succeed: asked again while the member has not
/// reached every peer for 5 s ("unhealthy cluster", as etcd answers right after a start).
fn reconfigure(endpoint: &str, args: &[&str]) -> String {
    wait_for("the cluster to allow the change", || {
        let (good, out) = etcdctl(endpoint, args);
        if good {
            return Some(out);
        }
        assert_eq!(out, "Error: etcdserver: unhealthy cluster", "{args:?}");
        std::thread::sleep(std::time::Duration::from_millis(200));
        None
    })
}

/// `etcdctl member list` as sorted lines.
fn member_list(endpoint: &str) -> BTreeSet<String> {
    ok(endpoint, &["member", "list"])
        .lines()
        .map(str::to_string)
        .collect()
}

/// Every key with its value and mod revision, read serializably from `endpoint`.
async fn dump(endpoint: &str) -> Vec<(Vec<u8>, Vec<u8>, i64)> {
    let mut cl = Client::connect([endpoint], None).await.unwrap();
    let r = cl
        .get(
            "",
            Some(GetOptions::new().with_all_keys().with_serializable()),
        )
        .await
        .unwrap();
    r.kvs()
        .iter()
        .map(|kv| (kv.key().to_vec(), kv.value().to_vec(), kv.mod_revision()))
        .collect()
}

/// Waits until every listed member holds the same keys as `reference` does.
async fn converged(endpoints: &[String]) -> Vec<(Vec<u8>, Vec<u8>, i64)> {
    for _ in 0..3000 {
        let first = dump(&endpoints[0]).await;
        let mut same = true;
        for e in &endpoints[1..] {
            same &= dump(e).await == first;
        }
        if same {
            return first;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("members did not converge");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_grows_from_one_member_through_a_learner_and_keeps_its_membership() {
    let mut c = Cluster::start(1, &[]);
    c.wait_leader();
    let e0 = c.endpoint(0);
    for i in 0..200 {
        ok(&e0, &["put", &format!("k{i:03}"), &format!("v{i}")]);
    }

    // A learner: added, started with what etcdctl printed, catches up.
    let l = c.add_slot();
    let out = reconfigure(
        &e0,
        &[
            "member",
            "add",
            &c.names[l],
            "--learner",
            &format!("--peer-urls={}", c.peer_url(l)),
        ],
    );
    assert!(out.contains("added to cluster"), "{out}");
    let (learner_id, ic) = added(&out);
    assert!(
        ic.contains(&format!("{}={}", c.names[l], c.peer_url(l))),
        "{ic}"
    );
    c.start_joining(l, &ic);
    let el = c.endpoint(l);
    wait_for("the learner to catch up", || {
        let (good, out) = etcdctl(
            &el,
            &["get", "k199", "--consistency=s", "--print-value-only"],
        );
        (good && out.trim() == "v199").then_some(())
    });

    // A learner serves serializable reads only, with etcd's error for the rest.
    for args in [
        &["put", "on", "learner"][..],
        &["get", "k000"][..],
        &["member", "list"][..],
    ] {
        let (good, out) = etcdctl(&el, args);
        assert!(!good, "{args:?} on a learner: {out}");
        assert_eq!(
            out, "Error: etcdserver: rpc not supported for learner",
            "{args:?}"
        );
    }
    // gRPC's health check too: etcd's interceptor refuses every call on a learner but Status
    // and serializable ranges.
    let mut health = keel_proto::health::health_client::HealthClient::connect(el.clone())
        .await
        .unwrap();
    let refused = health
        .check(keel_proto::health::HealthCheckRequest::default())
        .await
        .unwrap_err();
    assert_eq!(
        refused.message(),
        "etcdserver: rpc not supported for learner"
    );
    let list = ok(&e0, &["member", "list"]);
    assert!(
        list.contains(&format!("{learner_id}, started, {}", c.names[l])),
        "{list}"
    );
    assert!(
        list.lines()
            .any(|x| x.starts_with(&learner_id) && x.ends_with(", true")),
        "{list}"
    );

    // Promoted: a voter; then a third member joins as a voter.
    let out = ok(&e0, &["member", "promote", &learner_id]);
    assert!(
        out.contains(&format!("{learner_id} promoted in cluster")),
        "{out}"
    );
    ok(&el, &["put", "via", "promoted"]);
    let v = c.add_slot();
    let out = reconfigure(
        &el,
        &[
            "member",
            "add",
            &c.names[v],
            &format!("--peer-urls={}", c.peer_url(v)),
        ],
    );
    let (_, ic) = added(&out);
    assert_eq!(ic.split(',').count(), 3, "{ic}");
    c.start_joining(v, &ic);
    let all = c.endpoints();
    let data = converged(&all).await;
    assert_eq!(data.len(), 201);
    let list = member_list(&e0);
    assert_eq!(list.len(), 3);
    assert!(
        list.iter()
            .all(|m| m.contains(", started, ") && m.ends_with(", false")),
        "{list:?}"
    );
    for e in &all[1..] {
        assert_eq!(member_list(e), list);
    }

    // The first member down: the two others are a quorum.
    c.kill(0);
    c.wait_leader();
    let ev = c.endpoint(v);
    ok(&ev, &["put", "without", "m1"]);

    // Every member restarted (the --initial-* flags are ignored then): the same membership,
    // the same data, and writes through each.
    for i in 1..3 {
        c.kill(i);
    }
    for i in 0..3 {
        c.start_member(i);
    }
    c.wait_leader();
    for e in &all {
        assert_eq!(member_list(e), list, "{e}");
    }
    for (i, e) in all.iter().enumerate() {
        ok(e, &["put", &format!("after/{i}"), "restart"]);
    }
    assert_eq!(converged(&all).await.len(), 205);
}

/// A follower is removed while a client writes, and a new member takes its place: the removed
/// member stops itself, and no acknowledged write is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_is_replaced_under_writes() {
    // Snapshots often and a short log kept behind them: the new member catches up by snapshot.
    let mut c = Cluster::start(
        3,
        &[
            "--snapshot-count=100",
            "--experimental-snapshot-catchup-entries=20",
        ],
    );
    let leader = c.wait_leader();
    let victim = (leader + 1) % 3;
    let keep: Vec<usize> = (0..3).filter(|&i| i != victim).collect();
    let endpoints: Vec<String> = keep.iter().map(|&i| c.endpoint(i)).collect();

    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let endpoints = endpoints.clone();
        tokio::spawn(async move {
            let mut cl = Client::connect(endpoints, None).await.unwrap();
            let mut acked = Vec::new();
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let key = format!("w{n:06}");
                if cl.put(key.clone(), "x", None).await.is_ok() {
                    acked.push(key);
                } else {
                    // Never a busy loop, even with every member gone.
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
            }
            acked
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;

    let list = ok(&c.endpoint(leader), &["member", "list"]);
    let victim_id = list
        .lines()
        .find(|l| l.contains(&format!(", {}, ", c.names[victim])))
        .and_then(|l| l.split(',').next())
        .unwrap()
        .to_string();
    let out = reconfigure(&endpoints[1], &["member", "remove", &victim_id]);
    assert!(
        out.contains(&format!("{victim_id} removed from cluster")),
        "{out}"
    );
    // The removed member stops itself, with etcd's words, and (as etcd) a success status: a
    // supervisor has nothing to restart.
    let status = c.members[victim].as_mut().unwrap().wait_exit();
    c.members[victim] = None;
    assert!(status.success());
    assert!(
        c.log_text(victim)
            .contains("the member has been permanently removed from the cluster"),
        "{}",
        c.log_text(victim)
    );
    // It cannot come back with its data dir: it refuses to start if it applied its removal,
    // else its peers refuse it and it stops again.
    let (_, text) = common::keel_refused(
        &c.data_dir(victim),
        &c.args(victim)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert!(
        text.contains("was removed from the cluster")
            || text.contains("permanently removed from the cluster"),
        "{text}"
    );

    let new = c.add_slot();
    let out = reconfigure(
        &endpoints[0],
        &[
            "member",
            "add",
            &c.names[new],
            &format!("--peer-urls={}", c.peer_url(new)),
        ],
    );
    let (_, ic) = added(&out);
    c.start_joining(new, &ic);
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let acked = writer.await.unwrap();
    assert!(acked.len() > 10, "only {} writes acknowledged", acked.len());

    let mut now: Vec<String> = endpoints.clone();
    now.push(c.endpoint(new));
    let data = converged(&now).await;
    let keys: BTreeSet<Vec<u8>> = data.into_iter().map(|(k, _, _)| k).collect();
    for k in &acked {
        assert!(keys.contains(k.as_bytes()), "acknowledged {k} lost");
    }
    assert!(
        c.log_text(new)
            .contains("installed a snapshot from the leader"),
        "{}",
        c.log_text(new)
    );
    let list = member_list(&now[2]);
    assert_eq!(list.len(), 3, "{list:?}");
    assert!(!list.iter().any(|m| m.starts_with(&victim_id)));
}

/// Removing the leader: it steps down once the change is committed and stops; the two others
/// elect a leader and serve.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_the_leader_hands_over() {
    let mut c = Cluster::start(3, &[]);
    let leader = c.wait_leader();
    let other = (leader + 1) % 3;
    ok(&c.endpoint(other), &["put", "before", "removal"]);
    let list = ok(&c.endpoint(other), &["member", "list"]);
    let leader_id = list
        .lines()
        .find(|l| l.contains(&format!(", {}, ", c.names[leader])))
        .and_then(|l| l.split(',').next())
        .unwrap()
        .to_string();
    reconfigure(&c.endpoint(other), &["member", "remove", &leader_id]);
    let status = c.members[leader].as_mut().unwrap().wait_exit();
    c.members[leader] = None;
    assert!(status.success());
    let new_leader = c.wait_leader();
    assert_ne!(new_leader, leader);
    ok(&c.endpoint(other), &["put", "after", "removal"]);
    let e = c.endpoint(3 - leader - other);
    assert_eq!(
        ok(&e, &["get", "after", "--print-value-only"]).trim(),
        "removal"
    );
    assert_eq!(member_list(&e).len(), 2);
}

/// `--strict-reconfig-check`: voters that never started count against the quorum, and peers
/// that are not reachable block changes ("unhealthy cluster"), as etcd does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_that_would_lose_quorum_are_refused() {
    let c = Cluster::start(3, &[]);
    c.wait_leader();
    let e = c.endpoint(0);
    // 3 started voters: one more that never starts leaves 3 of 4 started, still a quorum.
    let out = reconfigure(
        &e,
        &["member", "add", "ghost", "--peer-urls=http://127.0.0.1:1"],
    );
    let (ghost, _) = added(&out);
    ok(&e, &["put", "still", "writable"]);
    // Now a voter is unreachable: no more additions.
    let (good, out) = etcdctl(
        &e,
        &["member", "add", "x", "--peer-urls=http://127.0.0.1:3"],
    );
    assert!(!good);
    assert_eq!(out, "Error: etcdserver: unhealthy cluster");
    // Removing the one that never started is fine (it is down: not part of the quorum).
    ok(&e, &["member", "remove", &ghost]);
    assert_eq!(member_list(&e).len(), 3);
    ok(&e, &["put", "after", "cleanup"]);

    // One member plus one that never starts: the first may add it (etcd's exception for growing
    // a restored member), but a third would leave too few started members.
    let single = Cluster::start(1, &[]);
    single.wait_leader();
    let s = single.endpoint(0);
    ok(
        &s,
        &["member", "add", "g1", "--peer-urls=http://127.0.0.1:5"],
    );
    let (good, out) = etcdctl(
        &s,
        &["member", "add", "g2", "--peer-urls=http://127.0.0.1:6"],
    );
    assert!(!good);
    assert_eq!(
        out,
        "Error: etcdserver: re-configuration failed due to not enough started members"
    );
}

/// The refusals a single member gives, side by side with etcd 3.4's (IDs masked).
#[test]
fn refusals_match_etcd() {
    let dir = tempfile::tempdir().unwrap();
    let e = etcd(&dir.path().join("etcd"), &[]);
    let c = Cluster::start(1, &[]);
    c.wait_leader();
    let k = c.endpoint(0);
    let script = |endpoint: &str| -> Vec<String> {
        let own = ok(endpoint, &["member", "list"]);
        let own_peer = own.split(", ").nth(3).unwrap().to_string();
        let own_id = own.split(", ").next().unwrap().to_string();
        let mut out = Vec::new();
        let mut run = |args: &[&str]| {
            let (good, text) = etcdctl(endpoint, args);
            // Members are listed by ID, and IDs differ between the two clusters: compare the
            // lines (and the entries of ETCD_INITIAL_CLUSTER) as sets.
            let mut lines: Vec<String> = mask(&text).lines().map(sorted_cluster).collect();
            lines.sort();
            out.push(format!("{} -> {good} {lines:?}", mask(&args.join(" "))));
            text
        };
        run(&["member", "remove", "1234"]);
        run(&["member", "update", "1234", "--peer-urls=http://127.0.0.1:1"]);
        run(&["member", "add", "dup", &format!("--peer-urls={own_peer}")]);
        let text = run(&[
            "member",
            "add",
            "l1",
            "--learner",
            "--peer-urls=http://127.0.0.1:1",
        ]);
        let learner = text
            .split_whitespace()
            .nth(1)
            .unwrap_or_default()
            .to_string();
        run(&[
            "member",
            "add",
            "l2",
            "--learner",
            "--peer-urls=http://127.0.0.1:2",
        ]);
        run(&[
            "member",
            "add",
            "l2",
            "--peer-urls=http://127.0.0.1:1,http://127.0.0.1:9",
        ]);
        run(&["member", "promote", &learner]);
        run(&["move-leader", &learner]);
        run(&["member", "list"]);
        // (etcd 3.4's `member update` of a learner lists it as a voter afterwards while raft
        // keeps it a learner, a bug fixed in 3.5: Keel keeps it a learner in both.)
        run(&["member", "remove", &learner]);
        run(&["member", "remove", &learner]);
        // Promoting a voter; removing the last member.
        run(&["member", "promote", &own_id]);
        run(&["member", "remove", &own_id]);
        run(&["member", "list"]);
        out
    };
    let theirs = script(&e.endpoint);
    let ours = script(&k);
    assert_eq!(ours, theirs);
}

/// `text` with hex member and cluster IDs, ports and the member name replaced, so that outputs
/// of two clusters compare.
fn mask(text: &str) -> String {
    let text = squeeze(text);
    let mut out = String::new();
    for word in text.split_inclusive([' ', ',', '\n', '=', '"', ':', '/']) {
        let core = word.trim_end_matches([' ', ',', '\n', '=', '"', ':', '/']);
        let tail = &word[core.len()..];
        let hex = core.len() >= 12 && core.chars().all(|ch| ch.is_ascii_hexdigit());
        let port = core.len() >= 4 && core.chars().all(|ch| ch.is_ascii_digit());
        if hex {
            out.push_str("<id>");
        } else if port {
            out.push_str("<port>");
        } else if core == "m1" || core == "oracle" {
            out.push_str("<name>");
        } else {
            out.push_str(core);
        }
        out.push_str(tail);
    }
    out
}

/// A line of `etcdctl member add`'s output with the members of `ETCD_INITIAL_CLUSTER` sorted:
/// they come in ID order, and IDs differ between clusters.
fn sorted_cluster(line: &str) -> String {
    match line.strip_prefix("ETCD_INITIAL_CLUSTER=") {
        Some(v) => {
            let mut parts: Vec<&str> = v.trim_matches('"').split(',').collect();
            parts.sort_unstable();
            format!("ETCD_INITIAL_CLUSTER={}", parts.join(","))
        }
        None => line.to_string(),
    }
}

/// `text` with runs of spaces as one: etcdctl pads IDs to 16 columns.
fn squeeze(text: &str) -> String {
    text.split('\n')
        .map(|l| {
            l.split(' ')
                .filter(|w| !w.is_empty())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// `text` with what differs between two clusters by construction made neutral: member IDs,
/// ports, raft indexes and terms, sizes and their units, hashes; then its lines sorted (members
/// are listed by ID).
fn neutral(text: &str) -> String {
    let text = squeeze(text);
    let mut out = String::new();
    let mut token = String::new();
    let flush = |token: &mut String, out: &mut String| {
        let t = std::mem::take(token);
        let hex = t.len() >= 8 && t.chars().all(|c| c.is_ascii_hexdigit());
        let number = !t.is_empty() && t.chars().all(|c| c.is_ascii_digit() || c == '.');
        if hex && !number {
            out.push_str("<id>");
        } else if number {
            out.push_str("<n>");
        } else if matches!(t.as_str(), "B" | "kB" | "MB" | "GB") {
            out.push_str("<unit>");
        } else {
            out.push_str(&t);
        }
    };
    for c in text.chars() {
        if c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-' {
            token.push(c);
        } else {
            flush(&mut token, &mut out);
            out.push(c);
        }
    }
    flush(&mut token, &mut out);
    // Members are listed by ID, and IDs differ between clusters.
    let mut lines: Vec<String> = out.lines().map(sorted_cluster).collect();
    lines.sort_unstable();
    lines.join("\n")
}

/// The operator's reconfiguration and maintenance session of the issue, run against a cluster:
/// the transcript (neutral) and the HashKV of each member.
fn session(c: &mut Cluster) -> (Vec<String>, Vec<String>) {
    let e0 = c.endpoint(0);
    let all = c.endpoints().join(",");
    for i in 0..10 {
        ok(&e0, &["put", &format!("k{i}"), &format!("v{i}")]);
    }
    let mut t = Vec::new();
    let run = |t: &mut Vec<String>, endpoint: &str, args: &[&str]| -> String {
        let (mut good, mut text) = etcdctl(endpoint, args);
        for _ in 0..100 {
            if text != "Error: etcdserver: unhealthy cluster" {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
            (good, text) = etcdctl(endpoint, args);
        }
        t.push(format!(
            "{} -> {good}\n{}",
            neutral(&args.join(" ")),
            neutral(&text)
        ));
        text
    };
    run(&mut t, &e0, &["member", "list"]);
    let l = c.add_slot();
    let out = run(
        &mut t,
        &e0,
        &[
            "member",
            "add",
            &c.names[l],
            "--learner",
            &format!("--peer-urls={}", c.peer_url(l)),
        ],
    );
    let (id, ic) = added(&out);
    // Not started yet: not in sync.
    run(&mut t, &e0, &["member", "promote", &id]);
    c.start_joining(l, &ic);
    let out = wait_for("the learner to be promotable", || {
        let (good, out) = etcdctl(&e0, &["member", "promote", &id]);
        good.then_some(out)
    });
    t.push(format!("member promote -> true\n{}", neutral(&out)));
    run(
        &mut t,
        &e0,
        &[
            "member",
            "update",
            &id,
            &format!("--peer-urls={}", c.peer_url(l)),
        ],
    );
    run(&mut t, &e0, &["member", "list"]);
    run(&mut t, &all, &["endpoint", "status", "--cluster"]);
    let hashes: Vec<String> = ok(&e0, &["endpoint", "hashkv", "--cluster"])
        .lines()
        .map(|l| l.rsplit(", ").next().unwrap().to_string())
        .collect();
    run(&mut t, &e0, &["alarm", "list"]);
    run(&mut t, &e0, &["alarm", "disarm"]);
    run(&mut t, &e0, &["defrag", "--cluster"]);
    let leader = c.wait_leader();
    let target = if leader == 1 { 2 } else { 1 };
    let target_id = ok(&c.endpoint(target), &["endpoint", "status"])
        .split(", ")
        .nth(1)
        .unwrap()
        .to_string();
    run(&mut t, &all, &["move-leader", &target_id]);
    run(&mut t, &e0, &["member", "remove", &id]);
    let status = c.members[l].as_mut().unwrap().wait_exit();
    c.members[l] = None;
    t.push(format!(
        "removed member exits with success: {}",
        status.success()
    ));
    run(&mut t, &e0, &["member", "list"]);
    (t, hashes)
}

/// The same operator session against a keel cluster and an etcd 3.4 cluster started the same
/// way: the same outputs line by line (IDs, ports, indexes and sizes masked), and the same
/// HashKV on every member of both.
#[test]
fn an_operator_session_reads_the_same_on_keel_and_etcd() {
    let mut etcd_cluster = Cluster::start_etcd(3);
    etcd_cluster.wait_leader();
    let (theirs, their_hashes) = session(&mut etcd_cluster);
    drop(etcd_cluster);
    let mut keel_cluster = Cluster::start(3, &[]);
    keel_cluster.wait_leader();
    let (ours, our_hashes) = session(&mut keel_cluster);
    for (a, b) in ours.iter().zip(&theirs) {
        assert_eq!(a, b);
    }
    assert_eq!(ours.len(), theirs.len());
    assert_eq!(our_hashes.len(), 4);
    assert!(
        our_hashes.iter().all(|h| h == &their_hashes[0]),
        "{our_hashes:?} vs {their_hashes:?}"
    );
    assert!(their_hashes.iter().all(|h| h == &their_hashes[0]));
}

/// etcd's `--force-new-cluster`: two of three members are gone for good; the survivor restarts
/// with the flag as a one-member cluster with all its data and history, and takes writes; a
/// later restart without the flag stays that one-member cluster.
#[test]
fn force_new_cluster_makes_a_one_member_cluster_of_a_survivor() {
    let mut c = Cluster::start(3, &[]);
    c.wait_leader();
    for i in 0..50 {
        ok(&c.endpoint(0), &["put", &format!("k{i}"), &format!("v{i}")]);
    }
    wait_for("the survivor to have every write", || {
        let (ok, out) = etcdctl(
            &c.endpoint(2),
            &["get", "k49", "--consistency=s", "--print-value-only"],
        );
        (ok && out == "v49\n").then_some(())
    });
    for i in 0..3 {
        c.kill(i);
    }
    c.flags.push("--force-new-cluster".into());
    c.start_member(2);
    let e = c.endpoint(2);
    wait_for("a write on the forced member", || {
        etcdctl(&e, &["put", "after", "force"]).0.then_some(())
    });
    let list = ok(&e, &["member", "list"]);
    assert_eq!(list.lines().count(), 1, "{list}");
    assert!(list.contains("m3"), "{list}");
    let keys = ok(&e, &["get", "k", "--prefix", "--keys-only"]);
    assert_eq!(keys.lines().filter(|l| !l.is_empty()).count(), 50);
    assert!(c.log_text(2).contains("forcing a new one-member cluster"));
    // Without the flag, it stays so.
    c.kill(2);
    c.flags.pop();
    c.start_member(2);
    wait_for("a write after a plain restart", || {
        etcdctl(&e, &["put", "again", "x"]).0.then_some(())
    });
    assert_eq!(ok(&e, &["member", "list"]).lines().count(), 1);
    assert_eq!(ok(&e, &["get", "after", "--print-value-only"]), "force\n");
}
