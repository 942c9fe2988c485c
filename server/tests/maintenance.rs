//! The Maintenance service, end to end: status, hashes equal on every member and to etcd's,
//! alarms raised by the quota and through the API (replicated, persisted, refusing writes on
//! every member until disarmed, and in `/health`), move-leader, and defragmentation.

mod common;

use common::{Cluster, etcd, etcdctl, ok, try_http_get, wait_for};
use etcd_client::{AlarmAction, AlarmOptions, AlarmType, Client};

/// `etcdctl endpoint hashkv` of each endpoint: the hashes.
fn hashkv(endpoint: &str) -> String {
    let out = ok(endpoint, &["endpoint", "hashkv"]);
    out.trim().rsplit(", ").next().unwrap().to_string()
}

/// The same history on a single etcd and a single keel: equal HashKV (now and at an older
/// revision), and `endpoint status` in the same shape.
#[test]
fn status_and_hashkv_match_etcd() {
    let dir = tempfile::tempdir().unwrap();
    let e = etcd(&dir.path().join("etcd"), &[]);
    let c = Cluster::start(1, &[]);
    c.wait_leader();
    let k = c.endpoint(0);
    for endpoint in [&e.endpoint, &k] {
        for i in 0..20 {
            ok(endpoint, &["put", &format!("k{}", i % 7), &format!("v{i}")]);
        }
        ok(endpoint, &["del", "k3"]);
        ok(endpoint, &["compact", "10"]);
        ok(endpoint, &["put", "after", "compaction"]);
    }
    assert_eq!(hashkv(&k), hashkv(&e.endpoint));
    let at = |endpoint: &str, rev: &str| {
        ok(endpoint, &["endpoint", "hashkv", &format!("--rev={rev}")])
            .trim()
            .rsplit(", ")
            .next()
            .unwrap()
            .to_string()
    };
    assert_eq!(at(&k, "15"), at(&e.endpoint, "15"));
    // A compacted revision is refused alike.
    assert_eq!(
        etcdctl(&k, &["endpoint", "hashkv", "--rev=5"]),
        etcdctl(&e.endpoint, &["endpoint", "hashkv", "--rev=5"])
    );

    let status = |endpoint: &str| -> serde_json::Value {
        let out = ok(endpoint, &["endpoint", "status", "-w", "json"]);
        serde_json::from_str::<serde_json::Value>(&out).unwrap()[0]["Status"].clone()
    };
    let (ks, es) = (status(&k), status(&e.endpoint));
    let mut kf: Vec<&String> = ks.as_object().unwrap().keys().collect();
    let mut ef: Vec<&String> = es.as_object().unwrap().keys().collect();
    kf.sort();
    ef.sort();
    assert_eq!(kf, ef, "{ks}\n{es}");
    assert_eq!(ks["version"], es["version"]);
    assert_eq!(ks["leader"], ks["header"]["member_id"]);
    assert_eq!(ks["raftIndex"], ks["raftAppliedIndex"]);
    assert!(ks["dbSizeInUse"].as_i64().unwrap() <= ks["dbSize"].as_i64().unwrap());
}

/// A put past `--quota-backend-bytes` raises NOSPACE for the whole cluster: every member lists
/// it, refuses puts, txns that put and lease grants (deletes still work), and `/health` says
/// false (unless NOSPACE is excluded), until compaction, defragmentation and a disarm.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_backend_raises_nospace_on_every_member_until_disarmed() {
    let quota = (24u64 << 20).to_string();
    let mut c = Cluster::start(3, &[&format!("--quota-backend-bytes={quota}")]);
    c.wait_leader();
    let endpoints = c.endpoints();
    let mut cl = Client::connect(endpoints.clone(), None).await.unwrap();
    let value = vec![b'v'; 512 << 10];
    let mut refused = None;
    for i in 0..200 {
        if let Err(e) = cl.put(format!("big/{i:03}"), value.clone(), None).await {
            refused = Some(e.to_string());
            break;
        }
    }
    let refused = refused.expect("the quota never refused a put");
    assert!(
        refused.contains("etcdserver: mvcc: database space exceeded"),
        "{refused}"
    );

    for e in &endpoints {
        let list = ok(e, &["alarm", "list"]);
        assert!(
            list.starts_with("memberID:") && list.contains(" alarm:NOSPACE"),
            "{list}"
        );
        let (good, out) = etcdctl(e, &["put", "small", "x"]);
        assert!(!good);
        assert_eq!(out, "Error: etcdserver: mvcc: database space exceeded");
        let (good, out) = etcdctl(e, &["lease", "grant", "60"]);
        assert!(!good);
        assert!(
            out.contains("etcdserver: mvcc: database space exceeded"),
            "{out}"
        );
    }
    for i in 0..3 {
        let port = c.client_ports[i];
        assert_eq!(try_http_get(port, "/health").unwrap().0, 503);
        assert_eq!(
            try_http_get(port, "/health?exclude=NOSPACE").unwrap().0,
            200
        );
    }
    let status = ok(&endpoints[1], &["endpoint", "status"]);
    assert!(status.contains("alarm:NOSPACE"), "{status}");

    // Persisted: a restarted member still has it.
    c.kill(2);
    c.start_member(2);
    wait_for("the restarted member to list the alarm", || {
        let (good, out) = etcdctl(&endpoints[2], &["alarm", "list"]);
        (good && out.contains("alarm:NOSPACE")).then_some(())
    });

    // Deletes still work; compaction and defragmentation give the space back.
    ok(&endpoints[0], &["del", "--prefix", "big/"]);
    let rev = cl
        .get("x", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    ok(&endpoints[0], &["compact", &rev.to_string(), "--physical"]);
    for e in &endpoints {
        let out = ok(e, &["defrag"]);
        assert!(out.contains("Finished defragmenting etcd member"), "{out}");
    }
    ok(&endpoints[0], &["alarm", "disarm"]);
    for e in &endpoints {
        assert_eq!(ok(e, &["alarm", "list"]), "");
        ok(e, &["put", "small", "x"]);
    }
    for i in 0..3 {
        let port = c.client_ports[i];
        wait_for("healthy again", || {
            (try_http_get(port, "/health")?.0 == 200).then_some(())
        });
    }
}

/// CORRUPT raised through the API: every member refuses writes with etcd's error, reads go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_alarm_stops_writes_everywhere() {
    let c = Cluster::start(3, &[]);
    c.wait_leader();
    let endpoints = c.endpoints();
    ok(&endpoints[0], &["put", "before", "alarm"]);
    let mut cl = Client::connect([endpoints[0].clone()], None).await.unwrap();
    let me = cl.status().await.unwrap().header().unwrap().member_id();
    let mut opts = AlarmOptions::new();
    opts.with_member(me);
    let r = cl
        .alarm(AlarmAction::Activate, AlarmType::Corrupt, Some(opts))
        .await
        .unwrap();
    assert_eq!(r.alarms().len(), 1);
    for e in &endpoints {
        let (good, out) = etcdctl(e, &["put", "k", "v"]);
        assert!(!good);
        assert_eq!(out, "Error: etcdserver: corrupt cluster");
        assert_eq!(
            ok(e, &["get", "before", "--print-value-only"]).trim(),
            "alarm"
        );
    }
    let mut opts = AlarmOptions::new();
    opts.with_member(me);
    cl.alarm(AlarmAction::Deactivate, AlarmType::Corrupt, Some(opts))
        .await
        .unwrap();
    for e in &endpoints {
        ok(e, &["put", "k", "v"]);
    }
}

/// MoveLeader: only the leader takes it, only toward a voter; then the chosen member leads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn move_leader_hands_leadership_to_the_chosen_voter() {
    let c = Cluster::start(3, &[]);
    let leader = c.wait_leader();
    let target = (leader + 1) % 3;
    let id = |i: usize| -> u64 {
        let out = ok(&c.endpoint(i), &["endpoint", "status", "-w", "json"]);
        serde_json::from_str::<serde_json::Value>(&out).unwrap()[0]["Status"]["header"]["member_id"]
            .as_u64()
            .unwrap()
    };
    let target_id = id(target);
    // A follower refuses; an unknown member is a bad transferee.
    let mut follower = Client::connect([c.endpoint(target)], None).await.unwrap();
    let e = follower.move_leader(id(leader)).await.unwrap_err();
    assert!(e.to_string().contains("etcdserver: not leader"), "{e}");
    let mut at_leader = Client::connect([c.endpoint(leader)], None).await.unwrap();
    let e = at_leader.move_leader(12345).await.unwrap_err();
    assert!(
        e.to_string().contains("etcdserver: bad leader transferee"),
        "{e}"
    );
    // etcdctl finds the leader among the endpoints.
    let out = ok(
        &c.endpoints().join(","),
        &["move-leader", &format!("{target_id:x}")],
    );
    assert!(out.contains("Leadership transferred from"), "{out}");
    assert_eq!(c.wait_leader(), target);
    ok(&c.endpoint(leader), &["put", "after", "move"]);
}

/// Changes the value of the newest revision in member `i`'s stopped backend, keeping it
/// decodable: the kind of silent damage HashKV exists to find.
fn corrupt_backend(c: &Cluster, i: usize) {
    use keel_engine::btree::{Backend, BackendOptions};
    use prost::Message as _;
    let path = c.data_dir(i).join("member").join("snap").join("db");
    let backend = Backend::open(&path, BackendOptions::default()).unwrap();
    let (key, value) = backend
        .begin_read()
        .range(b"key", b"", None)
        .unwrap()
        .map(|kv| kv.unwrap())
        .map(|(k, v)| (k.to_vec(), v.to_vec()))
        .last()
        .unwrap();
    let mut kv = keel_proto::mvccpb::KeyValue::decode(value.as_slice()).unwrap();
    kv.value = b"silently changed".to_vec().into();
    let mut w = backend.begin_write().unwrap();
    w.put(b"key", &key, &kv.encode_to_vec()).unwrap();
    w.commit(true).unwrap();
}

/// Writes through member 0 and waits until every running member has applied them.
fn write_and_settle(c: &Cluster) {
    for i in 0..20 {
        ok(&c.endpoint(0), &["put", &format!("k{i}"), "v"]);
    }
    for i in 0..c.names.len() {
        if c.members[i].is_none() {
            continue;
        }
        wait_for("every member to apply the writes", || {
            let (good, out) = etcdctl(&c.endpoint(i), &["get", "k19", "--consistency=s"]);
            (good && out.contains("k19")).then_some(())
        });
    }
}

/// `--experimental-initial-corrupt-check`: a member whose data differs from its peers' at the
/// same revision refuses to start; one whose data agrees starts.
#[test]
fn the_initial_corruption_check_refuses_a_member_with_other_data() {
    let mut c = Cluster::start(3, &["--experimental-initial-corrupt-check"]);
    c.wait_leader();
    write_and_settle(&c);
    // A clean restart passes the check.
    assert!(c.terminate(1).success());
    c.start_member(1);
    assert!(
        c.log_text(1).contains("initial corruption checking passed"),
        "{}",
        c.log_text(1)
    );
    c.wait_leader();
    // Damaged data does not.
    assert!(c.terminate(2).success());
    corrupt_backend(&c, 2);
    let args = c.args(2);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, err) = common::keel_refused(&c.data_dir(2), &args);
    assert_ne!(code, Some(0));
    assert!(err.contains("found data inconsistency with peers"), "{err}");
    assert!(
        err.contains("found different hash values from remote peer"),
        "{err}"
    );
}

/// `--experimental-corrupt-check-time`: the leader finds a member whose data differs and raises
/// CORRUPT, and the cluster refuses writes.
#[test]
fn the_periodic_corruption_check_raises_the_corrupt_alarm() {
    let mut c = Cluster::start(3, &["--experimental-corrupt-check-time=500ms"]);
    c.wait_leader();
    write_and_settle(&c);
    let victim = (c.wait_leader() + 1) % 3;
    assert!(c.terminate(victim).success());
    corrupt_backend(&c, victim);
    c.start_member(victim);
    let survivor = (victim + 1) % 3;
    wait_for("the CORRUPT alarm", || {
        let (good, out) = etcdctl(&c.endpoint(survivor), &["alarm", "list"]);
        (good && out.contains("alarm:CORRUPT")).then_some(())
    });
    let (good, out) = etcdctl(&c.endpoint(survivor), &["put", "k", "v"]);
    assert!(!good);
    assert_eq!(out, "Error: etcdserver: corrupt cluster");
}
