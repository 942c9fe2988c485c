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
    let out = ok(
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
    let out = ok(
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
    let out = ok(&endpoints[1], &["member", "remove", &victim_id]);
    assert!(
        out.contains(&format!("{victim_id} removed from cluster")),
        "{out}"
    );
    // The removed member stops itself, with etcd's words, and a failure status.
    let status = c.members[victim].as_mut().unwrap().wait_exit();
    c.members[victim] = None;
    assert!(!status.success());
    assert!(
        c.log_text(victim)
            .contains("the member has been permanently removed from the cluster"),
        "{}",
        c.log_text(victim)
    );
    // It cannot come back with its data dir.
    let (code, text) = common::keel_refused(
        &c.data_dir(victim),
        &c.args(victim)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert_ne!(code, Some(0));
    assert!(text.contains("was removed from the cluster"), "{text}");

    let new = c.add_slot();
    let out = ok(
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
    ok(&c.endpoint(other), &["member", "remove", &leader_id]);
    let status = c.members[leader].as_mut().unwrap().wait_exit();
    c.members[leader] = None;
    assert!(!status.success());
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

/// `--strict-reconfig-check`: voters that never started count against the quorum, and a change
/// that would leave too few started voters is refused, as etcd does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_that_would_lose_quorum_are_refused() {
    let c = Cluster::start(3, &[]);
    c.wait_leader();
    let e = c.endpoint(0);
    // 3 started voters: adding two that never start leaves 3 of 5 started, still a quorum.
    let mut unstarted = Vec::new();
    for port in [1, 2] {
        let out = ok(
            &e,
            &[
                "member",
                "add",
                "ghost",
                &format!("--peer-urls=http://127.0.0.1:{port}"),
            ],
        );
        unstarted.push(added(&out).0);
    }
    ok(&e, &["put", "still", "writable"]);
    // A sixth would need 4 started.
    let (good, out) = etcdctl(
        &e,
        &["member", "add", "x", "--peer-urls=http://127.0.0.1:3"],
    );
    assert!(!good);
    assert_eq!(
        out,
        "Error: etcdserver: re-configuration failed due to not enough started members"
    );
    // Removing a started voter would leave 2 of 4 started.
    let list = ok(&e, &["member", "list"]);
    let started = list
        .lines()
        .find(|l| l.contains(", started, "))
        .and_then(|l| l.split(',').next())
        .unwrap();
    let (good, out) = etcdctl(&e, &["member", "remove", started]);
    assert!(!good);
    assert_eq!(
        out,
        "Error: etcdserver: re-configuration failed due to not enough started members"
    );
    // Removing the ones that never started is fine.
    for id in &unstarted {
        ok(&e, &["member", "remove", id]);
    }
    assert_eq!(member_list(&e).len(), 3);
    ok(&e, &["put", "after", "cleanup"]);
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
        let mut out = Vec::new();
        let mut run = |args: &[&str]| {
            let (good, text) = etcdctl(endpoint, args);
            // Members are listed by ID, and IDs differ between the two clusters: compare the
            // lines (and the entries of ETCD_INITIAL_CLUSTER) as sets.
            let mut lines: Vec<String> = mask(&text)
                .lines()
                .map(|l| match l.strip_prefix("ETCD_INITIAL_CLUSTER=") {
                    Some(v) => {
                        let mut parts: Vec<&str> = v.trim_matches('"').split(',').collect();
                        parts.sort_unstable();
                        format!("ETCD_INITIAL_CLUSTER={}", parts.join(","))
                    }
                    None => l.to_string(),
                })
                .collect();
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
        run(&["member", "list"]);
        // (etcd 3.4's `member update` of a learner lists it as a voter afterwards while raft
        // keeps it a learner, a bug fixed in 3.5: Keel keeps it a learner in both.)
        run(&["member", "remove", &learner]);
        run(&["member", "remove", &learner]);
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
