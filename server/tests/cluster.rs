//! Replication, end to end: 3 (and 5) `keel` processes on loopback. Writes and reads through
//! every member, failover under load with no acknowledged write lost, catch-up by snapshot,
//! leadership handed over on stop, a stalled disk causing no election, leases across a
//! failover, and refusals of peers from elsewhere.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::{Cluster, ok, wait_for};
use etcd_client::{Client, GetOptions};

/// A client of member `i` only.
async fn client(c: &Cluster, i: usize) -> Client {
    Client::connect([c.endpoint(i)], None).await.unwrap()
}

/// Every key with its value and revisions, read serializably from member `i`.
async fn dump(c: &Cluster, i: usize) -> (i64, BTreeMap<Vec<u8>, (Vec<u8>, i64, i64)>) {
    let mut cl = client(c, i).await;
    let r = cl
        .get(
            "",
            Some(GetOptions::new().with_all_keys().with_serializable()),
        )
        .await
        .unwrap();
    let rev = r.header().unwrap().revision();
    let kvs = r
        .kvs()
        .iter()
        .map(|kv| {
            (
                kv.key().to_vec(),
                (kv.value().to_vec(), kv.mod_revision(), kv.version()),
            )
        })
        .collect();
    (rev, kvs)
}

/// Waits until every running member has applied up to the same revision; returns it.
async fn converged(c: &Cluster) -> i64 {
    let running: Vec<usize> = (0..c.names.len())
        .filter(|&i| c.members[i].is_some())
        .collect();
    for _ in 0..3000 {
        let mut revs = Vec::new();
        for &i in &running {
            revs.push(dump(c, i).await.0);
        }
        if revs.windows(2).all(|w| w[0] == w[1]) {
            return revs[0];
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("members did not converge");
}

/// Three members whose WAL writes stall for as long as the file at each one's path says
/// (`KEEL_FAULT_WAL_SYNC_DELAY_FILE`, "300ms"; no file: no stall).
fn stallable(flags: &[&str]) -> (Cluster, Vec<std::path::PathBuf>) {
    let mut c = Cluster::new(3, flags);
    let stall: Vec<_> = (0..3)
        .map(|i| c.dir.path().join(format!("stall-{i}")))
        .collect();
    for (i, path) in stall.iter().enumerate() {
        let path = path.display().to_string();
        c.start_member_with(i, &[("KEEL_FAULT_WAL_SYNC_DELAY_FILE", path.as_str())]);
    }
    (c, stall)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_serve_writes_and_reads_through_every_member() {
    let c = Cluster::start(3, &[]);
    c.wait_leader();
    for i in 0..3 {
        let mut cl = client(&c, i).await;
        let r = cl
            .put(format!("via/{i}"), format!("{i}"), None)
            .await
            .unwrap();
        // Each member answers with its own ID and the current term.
        let h = r.header().unwrap();
        assert!(h.raft_term() >= 1);
        let (_, member_id) = (h.cluster_id(), h.member_id());
        let listed = cl.member_list().await.unwrap();
        let me = listed
            .members()
            .iter()
            .find(|m| m.id() == member_id)
            .expect("the answering member is listed");
        assert_eq!(me.name(), c.names[i]);
    }
    for i in 0..3 {
        // Linearizable reads through every member see every write acknowledged before.
        let mut cl = client(&c, i).await;
        let r = cl
            .get("via/", Some(GetOptions::new().with_prefix()))
            .await
            .unwrap();
        assert_eq!(r.kvs().len(), 3, "member {i}");
    }
    let rev = converged(&c).await;
    let (_, first) = dump(&c, 0).await;
    for i in 1..3 {
        let (r, kvs) = dump(&c, i).await;
        assert_eq!((r, &kvs), (rev, &first), "member {i} differs");
    }
    // Every member counts the three puts it applied, whichever member took them (etcd's store
    // counts them so).
    for i in 0..3 {
        assert_eq!(c.metric(i, "etcd_mvcc_put_total"), Some(3.0), "member {i}");
    }
    // etcdctl against the cluster: the member list with names and URLs, health of every member.
    let all = c.endpoints().join(",");
    let list = ok(&all, &["member", "list"]);
    for i in 0..3 {
        assert!(list.contains(&format!(
            "started, {}, http://127.0.0.1:{}, {}, false",
            c.names[i],
            c.peer_ports[i],
            c.endpoint(i)
        )));
    }
    // etcdctl 3.4 prints endpoint health on stderr.
    let out = std::process::Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", c.endpoint(0)))
        .args(["endpoint", "health", "--cluster"])
        .output()
        .unwrap();
    let health = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{health}");
    for i in 0..3 {
        assert!(
            health.contains(&format!("{} is healthy", c.endpoint(i))),
            "{health}"
        );
    }
}

/// A watch on a follower sees the writes made through the leader, with the same revisions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_on_a_follower_sees_writes_made_on_the_leader() {
    let c = Cluster::start(3, &[]);
    let leader = c.wait_leader();
    let follower = (leader + 1) % 3;
    let mut on_follower = client(&c, follower).await;
    let mut events = on_follower
        .watch("w/", Some(etcd_client::WatchOptions::new().with_prefix()))
        .await
        .unwrap();
    assert!(events.message().await.unwrap().unwrap().created());
    let mut on_leader = client(&c, leader).await;
    let mut revisions = Vec::new();
    for i in 0..10 {
        let r = on_leader.put(format!("w/{i}"), "v", None).await.unwrap();
        revisions.push(r.header().unwrap().revision());
    }
    let mut seen = Vec::new();
    while seen.len() < 10 {
        let r = events.message().await.unwrap().unwrap();
        for e in r.events() {
            seen.push(e.kv().unwrap().mod_revision());
        }
    }
    assert_eq!(seen, revisions);
}

/// kill -9 of the leader while clients write through every member: a new leader is elected;
/// after the killed member restarts, every acknowledged write is on every member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_under_load_loses_no_acknowledged_write() {
    let mut c = Cluster::start(3, &[]);
    let leader = c.wait_leader();
    let stop = Arc::new(AtomicBool::new(false));
    let acknowledged = Arc::new(std::sync::Mutex::new(BTreeMap::new()));
    let mut writers = Vec::new();
    for w in 0..3 {
        let endpoints = c.endpoints();
        let stop = stop.clone();
        let acknowledged = acknowledged.clone();
        writers.push(tokio::spawn(async move {
            let mut cl = Client::connect(endpoints, None).await.unwrap();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let key = format!("load/{w}/{n}");
                if let Ok(r) = cl.put(key.clone(), format!("{n}"), None).await {
                    let rev = r.header().unwrap().revision();
                    acknowledged.lock().unwrap().insert(key, rev);
                }
                n += 1;
            }
        }));
    }
    // Kill once writes are flowing (observed, not timed).
    wait_for("writes before the kill", || {
        (acknowledged.lock().unwrap().len() >= 50).then_some(())
    });
    let changes_before = c.metric((leader + 1) % 3, "etcd_server_leader_changes_seen_total");
    c.kill(leader);
    let new_leader = c.wait_leader();
    assert_ne!(new_leader, leader);
    let after = acknowledged.lock().unwrap().len();
    wait_for("writes after the failover", || {
        (acknowledged.lock().unwrap().len() >= after + 50).then_some(())
    });
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    assert!(
        c.metric(new_leader, "etcd_server_leader_changes_seen_total") > changes_before,
        "the survivors saw the leader change"
    );
    c.start_member(leader);
    converged(&c).await;
    let acknowledged = acknowledged.lock().unwrap().clone();
    for i in 0..3 {
        let (_, kvs) = dump(&c, i).await;
        for (key, rev) in &acknowledged {
            let (_, mod_rev, version) = kvs
                .get(key.as_bytes())
                .unwrap_or_else(|| panic!("{key} missing on member {i}"));
            assert_eq!((mod_rev, version), (rev, &1), "{key} on member {i}");
        }
    }
}

/// A member kept down while the others compact their raft log past what it has catches up by
/// snapshot: it receives the leader's backend and then has every key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_behind_the_compacted_log_catches_up_by_snapshot() {
    let mut c = Cluster::start(
        3,
        &[
            "--snapshot-count=20",
            "--experimental-snapshot-catchup-entries=5",
        ],
    );
    c.wait_leader();
    let behind = 2;
    assert!(c.terminate(behind).success());
    let mut cl = Client::connect(&c.endpoints()[..2], None).await.unwrap();
    for i in 0..300 {
        cl.put(format!("snap/{i:03}"), vec![b'x'; 1000], None)
            .await
            .unwrap();
    }
    c.start_member(behind);
    wait_for("the snapshot to be installed", || {
        c.log_text(behind)
            .contains("installed a snapshot from the leader")
            .then_some(())
    });
    let rev = converged(&c).await;
    let (r, kvs) = dump(&c, behind).await;
    assert_eq!(r, rev);
    assert_eq!(kvs.keys().filter(|k| k.starts_with(b"snap/")).count(), 300);
    // It goes on replicating normally afterwards.
    let mut on_it = client(&c, behind).await;
    on_it.put("after/snapshot", "1", None).await.unwrap();
    converged(&c).await;
    let leader = c.wait_leader();
    assert!(
        c.metric(leader, "etcd_network_snapshot_send_success_total")
            .unwrap_or(0.0)
            >= 1.0
            || c.log_text(leader).contains("sent a snapshot")
    );
}

/// A member down while more than a peer message's worth (64 MiB) of entries was written
/// catches up from the leader's log. raft-rs merges the appends of the catch-up into one
/// message per `Ready`; the leader sends it in pieces (unsplit, it exceeded the peer message
/// limit, the stream failed, and the follower advanced one probe per reconnection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_behind_by_more_than_a_peer_message_catches_up_from_the_log() {
    let mut c = Cluster::start(3, &[]);
    c.wait_leader();
    let behind = 2;
    assert!(c.terminate(behind).success());
    let mut cl = Client::connect(&c.endpoints()[..2], None).await.unwrap();
    let value = vec![b'v'; 1 << 20];
    for i in 0..72 {
        cl.put(format!("big/{i:02}"), value.clone(), None)
            .await
            .unwrap();
    }
    let want = cl.get("big/71", None).await.unwrap();
    let want = want.header().unwrap().revision();
    c.start_member(behind);
    let mut on_it = client(&c, behind).await;
    let count_only = GetOptions::new()
        .with_prefix()
        .with_serializable()
        .with_count_only();
    for _ in 0..3000 {
        if let Ok(r) = on_it.get("big/", Some(count_only.clone())).await
            && r.header().unwrap().revision() >= want
        {
            assert_eq!(r.count(), 72);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let r = on_it
        .get("big/71", Some(GetOptions::new().with_serializable()))
        .await
        .unwrap();
    assert!(r.header().unwrap().revision() >= want, "caught up");
    assert_eq!(r.kvs()[0].value(), &value[..]);
    assert!(!c.log_text(behind).contains("installed a snapshot"));
    for i in 0..3 {
        let log = c.log_text(i);
        assert!(
            !log.contains("exceeds the peer message limit") && !log.contains("length too large"),
            "member {i}: {log}"
        );
    }
}

/// SIGTERM of the leader hands leadership to a follower first (etcd's TransferLeadership),
/// rather than leaving the cluster to wait for an election timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_leader_hands_leadership_over() {
    let mut c = Cluster::start(3, &[]);
    let leader = c.wait_leader();
    let mut cl = client(&c, (leader + 1) % 3).await;
    cl.put("before", "stop", None).await.unwrap();
    assert!(c.terminate(leader).success());
    let new_leader = c.wait_leader();
    assert_ne!(new_leader, leader);
    assert!(
        c.log_text(leader).contains("transferring leadership"),
        "{}",
        c.log_text(leader)
    );
    assert!(
        c.log_text(new_leader).contains("MsgTimeoutNow"),
        "the new leader was asked to campaign at once"
    );
    cl.put("after", "stop", None).await.unwrap();
}

/// Every WAL fdatasync of the leader stalls 500 ms while clients write: heartbeats and ticks do
/// not wait for the disk, so no election happens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_disk_on_the_leader_causes_no_election() {
    let (c, stall) = stallable(&[]);
    let leader = c.wait_leader();
    let mut cl = Client::connect(c.endpoints(), None).await.unwrap();
    cl.put("warm", "up", None).await.unwrap();
    let changes: Vec<_> = (0..3)
        .map(|i| c.metric(i, "etcd_server_leader_changes_seen_total"))
        .collect();
    std::fs::write(&stall[leader], "500ms").unwrap();
    for i in 0..10 {
        cl.put(format!("stalled/{i}"), "v", None).await.unwrap();
    }
    std::fs::remove_file(&stall[leader]).unwrap();
    assert_eq!(c.leader(), Some(leader));
    for (i, before) in changes.iter().enumerate() {
        assert_eq!(
            c.metric(i, "etcd_server_leader_changes_seen_total"),
            *before,
            "member {i} saw a leader change"
        );
    }
}

/// Leases through a follower: grant and keep-alives sent to a follower reach the leader; after
/// the leader is killed, the lease survives the failover (a new leader extends TTLs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_through_a_follower_survive_a_failover() {
    let mut c = Cluster::start(3, &[]);
    let leader = c.wait_leader();
    let follower = (leader + 1) % 3;
    let mut cl = client(&c, follower).await;
    let lease = cl.lease_grant(30, None).await.unwrap().id();
    cl.put(
        "leased",
        "v",
        Some(etcd_client::PutOptions::new().with_lease(lease)),
    )
    .await
    .unwrap();
    let (mut keeper, mut responses) = cl.lease_keep_alive(lease).await.unwrap();
    for _ in 0..5 {
        keeper.keep_alive().await.unwrap();
        assert_eq!(responses.message().await.unwrap().unwrap().ttl(), 30);
    }
    let ttl = cl.lease_time_to_live(lease, None).await.unwrap();
    assert!(ttl.ttl() > 0 && ttl.ttl() <= 30);
    c.kill(leader);
    let new_leader = c.wait_leader();
    let mut on_new = client(&c, new_leader).await;
    let ttl = on_new.lease_time_to_live(lease, None).await.unwrap();
    assert!(ttl.ttl() > 0, "the lease survived the failover");
    assert_eq!(on_new.get("leased", None).await.unwrap().kvs().len(), 1);
    let other = (0..3).find(|&i| i != leader && i != new_leader).unwrap();
    let mut on_other = client(&c, other).await;
    let (mut keeper, mut responses) = on_other.lease_keep_alive(lease).await.unwrap();
    keeper.keep_alive().await.unwrap();
    assert_eq!(responses.message().await.unwrap().unwrap().ttl(), 30);
}

/// A lease kept alive through the leader for longer than its TTL survives the leader's
/// death. A follower's copy of the lease table is never renewed (keep-alives go to the
/// leader); the new leader expires leases only once it is the primary lessor (its first entry
/// applied and every lease promoted, as etcd), so it does not revoke live leases with the
/// expiries it held as a follower, and its keep-alives wait for that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_kept_alive_past_its_ttl_survives_a_failover() {
    let mut c = Cluster::start(3, &[]);
    let leader = c.wait_leader();
    let mut on_leader = client(&c, leader).await;
    let lease = on_leader.lease_grant(3, None).await.unwrap().id();
    on_leader
        .put(
            "kept",
            "v",
            Some(etcd_client::PutOptions::new().with_lease(lease)),
        )
        .await
        .unwrap();
    let (mut keeper, mut responses) = on_leader.lease_keep_alive(lease).await.unwrap();
    for _ in 0..7 {
        keeper.keep_alive().await.unwrap();
        assert_eq!(responses.message().await.unwrap().unwrap().ttl(), 3);
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
    c.kill(leader);
    let new_leader = c.wait_leader();
    let mut on_new = client(&c, new_leader).await;
    let (mut keeper, mut responses) = on_new.lease_keep_alive(lease).await.unwrap();
    for _ in 0..5 {
        keeper.keep_alive().await.unwrap();
        let ttl = responses.message().await.unwrap().unwrap().ttl();
        assert_eq!(ttl, 3, "the lease is alive after the failover");
        tokio::time::sleep(std::time::Duration::from_millis(700)).await;
    }
    assert_eq!(on_new.get("kept", None).await.unwrap().kvs().len(), 1);
    let ttl = on_new.lease_time_to_live(lease, None).await.unwrap();
    assert!(ttl.ttl() > 0, "{ttl:?}");
}

/// A write made while the cluster has no leader waits for one, as etcd's raft node holds
/// proposals until there is a leader, and succeeds once a quorum is back (it used to fail at
/// once with "no leader", which etcd's clients do not retry for a write).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_without_a_leader_waits_for_one() {
    let mut c = Cluster::start(3, &[]);
    let leader = c.wait_leader();
    let others: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
    let (lone, back) = (others[0], others[1]);
    c.kill(leader);
    c.kill(back);
    wait_for("the lone member to lose its leader", || {
        (c.metric(lone, "etcd_server_has_leader") == Some(0.0)).then_some(())
    });
    let mut cl = client(&c, lone).await;
    let put = tokio::spawn(async move { cl.put("waited", "for a leader", None).await });
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert!(!put.is_finished(), "the write waits");
    c.start_member(back);
    let r = put.await.unwrap();
    assert!(r.is_ok(), "{r:?}");
    let mut cl = client(&c, lone).await;
    let got = cl.get("waited", None).await.unwrap();
    assert_eq!(got.kvs()[0].value(), b"for a leader");
}

/// A lease granted through one member and revoked at once through another is revoked, even
/// when the second has not applied the grant yet (etcd always proposes the revoke).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_revoked_through_another_member_right_after_its_grant_is_revoked() {
    let (c, stall) = stallable(&[]);
    let leader = c.wait_leader();
    let lagging = (leader + 1) % 3;
    let mut on_leader = client(&c, leader).await;
    let mut on_lagging = client(&c, lagging).await;
    // The lagging member's WAL writes take 300 ms: the grant commits without it, and it
    // applies the grant only after its own write.
    std::fs::write(&stall[lagging], "300ms").unwrap();
    for _ in 0..3 {
        let id = on_leader.lease_grant(60, None).await.unwrap().id();
        on_lagging.lease_revoke(id).await.unwrap();
        let ttl = on_leader.lease_time_to_live(id, None).await.unwrap();
        assert_eq!(ttl.ttl(), -1, "revoked");
    }
    std::fs::remove_file(&stall[lagging]).unwrap();
}

/// A learner added through a member that has not applied the previous learner yet is refused
/// when applied (etcd checks the membership again there), so the cluster never holds two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_learner_added_through_a_lagging_member_is_refused() {
    // Not etcd's 5 s of connectivity before a change (`--strict-reconfig-check`).
    let (c, stall) = stallable(&["--strict-reconfig-check=false"]);
    let leader = c.wait_leader();
    let lagging = (leader + 1) % 3;
    let mut on_leader = client(&c, leader).await;
    let mut on_lagging = client(&c, lagging).await;
    std::fs::write(&stall[lagging], "300ms").unwrap();
    let learner = || Some(etcd_client::MemberAddOptions::new().with_is_learner());
    on_leader
        .member_add(["http://127.0.0.1:1"], learner())
        .await
        .unwrap();
    let e = on_lagging
        .member_add(["http://127.0.0.1:2"], learner())
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("too many learner members in cluster"), "{e}");
    std::fs::remove_file(&stall[lagging]).unwrap();
    let list = on_leader.member_list().await.unwrap();
    let learners = list.members().iter().filter(|m| m.is_learner()).count();
    assert_eq!(learners, 1);
}

/// Auto compaction runs on the leader only (etcd pauses a follower's compactor): one member's
/// compactions, not one per member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_leader_auto_compacts() {
    let c = Cluster::start(
        3,
        &[
            "--auto-compaction-mode=periodic",
            "--auto-compaction-retention=1s",
        ],
    );
    let leader = c.wait_leader();
    let mut cl = client(&c, leader).await;
    let compacting = |i: usize| c.log_text(i).contains("starting auto compaction");
    let mut n = 0;
    while !compacting(leader) {
        n += 1;
        assert!(n < 100, "no auto compaction on the leader in 10 s");
        cl.put("compacted", n.to_string(), None).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // Two more periods: a follower's compactor would have run by now.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    assert_eq!(c.leader(), Some(leader), "leadership moved during the test");
    for i in (0..3).filter(|&i| i != leader) {
        assert!(!compacting(i), "member {i} compacted:\n{}", c.log_text(i));
    }
}

/// An Observe stream that asks for a leader (`hasleader`: clientv3's `WithRequireLeader`) ends
/// with etcd's "no leader" once its member has had none for three election timeouts, so the
/// client can move to another member (etcd's stream interceptor).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_observe_requiring_a_leader_ends_when_its_member_loses_it() {
    use keel_proto::v3electionpb as epb;
    let mut c = Cluster::start(3, &[]);
    let leader = c.wait_leader();
    let follower = (0..3).find(|&i| i != leader).unwrap();
    let mut election = epb::election_client::ElectionClient::connect(c.endpoint(follower))
        .await
        .unwrap();
    let mut request = tonic::Request::new(epb::LeaderRequest {
        name: b"E".to_vec(),
    });
    request
        .metadata_mut()
        .insert("hasleader", "true".parse().unwrap());
    let mut stream = election.observe(request).await.unwrap().into_inner();
    // The observer is watching once it has sent the first leader.
    let mut cl = client(&c, leader).await;
    let lease = cl.lease_grant(60, None).await.unwrap().id();
    cl.campaign("E", "v", lease).await.unwrap();
    let first = stream.message().await.unwrap().unwrap();
    assert_eq!(first.kv.unwrap().value.as_ref(), b"v");
    for i in (0..3).filter(|&i| i != follower) {
        c.kill(i);
    }
    let end = tokio::time::timeout(std::time::Duration::from_secs(30), stream.message())
        .await
        .expect("the stream went on without a leader");
    let status = end.expect_err("a message, or the end without an error");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert_eq!(status.message(), "etcdserver: no leader");
}

/// Five members: writes through each, all converge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_members_replicate() {
    let c = Cluster::start(5, &[]);
    c.wait_leader();
    for i in 0..5 {
        let mut cl = client(&c, i).await;
        cl.put(format!("five/{i}"), "v", None).await.unwrap();
    }
    let rev = converged(&c).await;
    for i in 0..5 {
        let (r, kvs) = dump(&c, i).await;
        assert_eq!(r, rev);
        assert_eq!(kvs.len(), 5);
    }
}

/// A raft call to member `i`'s peer service with the given headers.
async fn peer_call(
    c: &Cluster,
    i: usize,
    cluster_id: u64,
    from: u64,
    to: u64,
    batch: keel_proto::keelpeer::RaftBatch,
) -> Result<(), tonic::Status> {
    let mut peer = keel_proto::keelpeer::peer_client::PeerClient::connect(format!(
        "http://127.0.0.1:{}",
        c.peer_ports[i]
    ))
    .await
    .unwrap();
    let request = keel::raft::transport::peer_request(
        cluster_id,
        from,
        to,
        tonic::Request::new(futures::stream::iter(vec![batch])),
    );
    peer.raft(request).await.map(drop)
}

/// Peer calls from another cluster, from a non-member, for another member, with messages that
/// lie about their sender or do not decode, and snapshots that are corrupt or truncated: each
/// refused with a clear status (and a log line), nothing applied, the cluster unharmed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_calls_from_elsewhere_are_refused() {
    use keel_proto::keelpeer::{RaftBatch, SnapshotChunk};
    use protobuf::Message as _;
    let c = Cluster::start(3, &[]);
    c.wait_leader();
    let mut cl = client(&c, 0).await;
    let header = cl
        .put("k", "v", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .clone();
    let (cluster_id, me) = (header.cluster_id(), header.member_id());
    let other = cl
        .member_list()
        .await
        .unwrap()
        .members()
        .iter()
        .map(|m| m.id())
        .find(|&id| id != me)
        .unwrap();
    let empty = RaftBatch::default();
    let e = peer_call(&c, 0, cluster_id ^ 1, other, me, empty.clone())
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), e.message()),
        (tonic::Code::FailedPrecondition, "cluster ID mismatch")
    );
    assert!(c.log_text(0).contains("request cluster ID mismatch"));
    let e = peer_call(&c, 0, cluster_id, 0xdead, me, empty.clone())
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), e.message()),
        (tonic::Code::NotFound, "error sender not found")
    );
    let e = peer_call(&c, 0, cluster_id, other, other, empty.clone())
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    // A message claiming another sender than the call's.
    let mut m = raft::eraftpb::Message::default();
    m.set_msg_type(raft::eraftpb::MessageType::MsgHeartbeat);
    m.from = 0xdead;
    m.to = me;
    let lying = RaftBatch {
        messages: vec![m.write_to_bytes().unwrap().into()],
    };
    let e = peer_call(&c, 0, cluster_id, other, me, lying)
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    let garbage = RaftBatch {
        messages: vec![vec![0xff; 40].into()],
    };
    let e = peer_call(&c, 0, cluster_id, other, me, garbage)
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    // Snapshots: corrupt data, then a stream cut before its end.
    let mut snap = raft::eraftpb::Message::default();
    snap.set_msg_type(raft::eraftpb::MessageType::MsgSnapshot);
    snap.from = other;
    snap.to = me;
    snap.mut_snapshot().mut_metadata().index = 1_000_000;
    let header_chunk = SnapshotChunk {
        message: snap.write_to_bytes().unwrap().into(),
        ..Default::default()
    };
    for chunks in [
        vec![
            header_chunk.clone(),
            SnapshotChunk {
                data: vec![1, 3, 0, b'k', b'e', b'y', 9, 9, 9].into(),
                ..Default::default()
            },
            SnapshotChunk {
                done: true,
                crc32: 7,
                ..Default::default()
            },
        ],
        vec![
            header_chunk.clone(),
            SnapshotChunk {
                data: vec![1, 3, 0, b'k', b'e', b'y'].into(),
                ..Default::default()
            },
        ],
    ] {
        let mut peer = keel_proto::keelpeer::peer_client::PeerClient::connect(format!(
            "http://127.0.0.1:{}",
            c.peer_ports[0]
        ))
        .await
        .unwrap();
        let request = keel::raft::transport::peer_request(
            cluster_id,
            other,
            me,
            tonic::Request::new(futures::stream::iter(chunks)),
        );
        let e = peer.snapshot(request).await.unwrap_err();
        assert!(
            matches!(
                e.code(),
                tonic::Code::DataLoss | tonic::Code::InvalidArgument
            ),
            "{e:?}"
        );
    }
    assert!(!c.log_text(0).contains("installed a snapshot"));
    // Unharmed: no partial snapshot file left, and the member still serves.
    let snap_dir = c.data_dir(0).join("member/snap");
    let leftovers: Vec<_> = std::fs::read_dir(&snap_dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name() != "db")
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    cl.put("still", "serving", None).await.unwrap();
}

/// A member started with another cluster token computes other IDs: its peers refuse it (and it
/// them), the two others keep a quorum and serve, and it never gets a leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_of_another_cluster_token_is_refused() {
    let mut c = Cluster::new(3, &[]);
    c.start_member(0);
    c.start_member(1);
    c.token = "another-cluster".into();
    c.start_member(2);
    let leader = wait_for("a leader among the two", || {
        [0, 1]
            .into_iter()
            .find(|&i| c.metric(i, "etcd_server_is_leader") == Some(1.0))
    });
    let mut cl = client(&c, leader).await;
    cl.put("two", "members", None).await.unwrap();
    wait_for("the mismatch to be logged", || {
        (c.log_text(0).contains("request cluster ID mismatch")
            || c.log_text(1).contains("request cluster ID mismatch"))
        .then_some(())
    });
    assert_eq!(c.metric(2, "etcd_server_has_leader"), Some(0.0));
    let (code, body) = common::try_http_get(c.client_ports[2], "/health").unwrap();
    assert_eq!((code, body.as_str()), (503, "{\"health\":\"false\"}\n"));
    // etcd holds a write until there is a leader, and answers its context's error after the
    // request timeout (7 s by default).
    let mut lone = client(&c, 2).await;
    let e = lone.put("alone", "x", None).await.unwrap_err().to_string();
    assert!(e.contains("context deadline exceeded"), "{e}");
}

/// A peer URL that never answers: two of three members keep a quorum and serve; one member of
/// three alone has no leader and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_that_do_not_answer() {
    let mut c = Cluster::new(3, &[]);
    c.start_member(0);
    c.start_member(1);
    wait_for("a leader among the two", || {
        [0, 1]
            .into_iter()
            .find(|&i| c.metric(i, "etcd_server_is_leader") == Some(1.0))
    });
    let mut cl = Client::connect(&c.endpoints()[..2], None).await.unwrap();
    cl.put("quorum", "2 of 3", None).await.unwrap();
    assert!(c.log_text(0).contains("lost the stream to a peer"));
    c.kill(1);
    wait_for("the lone member to lose its leader", || {
        (c.metric(0, "etcd_server_has_leader") == Some(0.0)).then_some(())
    });
    let mut lone = client(&c, 0).await;
    let e = lone.put("alone", "x", None).await.unwrap_err().to_string();
    assert!(e.contains("context deadline exceeded"), "{e}");
    let (code, _) = common::try_http_get(c.client_ports[0], "/health").unwrap();
    assert_eq!(code, 503);
}
