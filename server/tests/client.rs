//! End-to-end with the `etcd-client` crate (an independent etcd v3 client) as the client: every KV
//! call and option. The same scenario runs against a real etcd 3.4 and against `keel`; its
//! assertions hold on both, and the transcripts of every response (headers' ids and terms aside)
//! are equal.

mod common;

use etcd_client::{
    Client, CompactionOptions, Compare, CompareOp, DeleteOptions, Error, GetOptions, KeyValue,
    LeaseGrantOptions, LeaseTimeToLiveOptions, PutOptions, SortOrder, SortTarget, Txn, TxnOp,
    TxnOpResponse, TxnResponse,
};

fn kv(kv: &KeyValue) -> String {
    format!(
        "{}={} c{} m{} v{} l{}",
        kv.key_str().unwrap(),
        kv.value_str().unwrap(),
        kv.create_revision(),
        kv.mod_revision(),
        kv.version(),
        kv.lease()
    )
}

fn kvs(list: &[KeyValue]) -> Vec<String> {
    list.iter().map(kv).collect()
}

fn keys(list: &[KeyValue]) -> Vec<&str> {
    list.iter().map(|k| k.key_str().unwrap()).collect()
}

/// The gRPC code and message of a refused call.
fn refused<T: std::fmt::Debug>(result: Result<T, Error>) -> String {
    match result {
        Err(Error::GRpcStatus(s)) => format!("{:?}: {}", s.code(), s.message()),
        other => panic!("expected a gRPC error, got {other:?}"),
    }
}

fn txn_text(t: &TxnResponse) -> String {
    let parts: Vec<String> = t
        .op_responses()
        .iter()
        .map(|r| match r {
            TxnOpResponse::Put(p) => format!("put rev {:?}", p.header().map(|h| h.revision())),
            TxnOpResponse::Get(g) => format!("get {:?} count {}", kvs(g.kvs()), g.count()),
            TxnOpResponse::Delete(d) => format!("del {} {:?}", d.deleted(), kvs(d.prev_kvs())),
            TxnOpResponse::Txn(t) => format!("txn [{}]", txn_text(t)),
        })
        .collect();
    format!("succeeded {} {}", t.succeeded(), parts.join("; "))
}

/// Runs every KV call and option; returns the transcript.
async fn scenario(endpoint: &str) -> Vec<String> {
    let mut c = Client::connect([endpoint], None).await.unwrap();
    let mut log = Vec::new();

    // Put, with prev_kv.
    let r = c.put("foo", "bar", None).await.unwrap();
    assert_eq!(r.header().unwrap().revision(), 2);
    assert!(r.prev_key().is_none());
    let r = c
        .put("foo", "baz", Some(PutOptions::new().with_prev_key()))
        .await
        .unwrap();
    assert_eq!(r.header().unwrap().revision(), 3);
    assert_eq!(kv(r.prev_key().unwrap()), "foo=bar c2 m2 v1 l0");
    for (k, v) in [
        ("foo/a", "5"),
        ("foo/b", "4"),
        ("foo/c", "3"),
        ("foo/d", "2"),
        ("foo/e", "1"),
        ("fop", "x"),
        ("a", "1"),
    ] {
        c.put(k, v, None).await.unwrap();
    }
    log.push(format!(
        "rev {:?}",
        c.get("a", None)
            .await
            .unwrap()
            .header()
            .map(|h| h.revision())
    ));

    // Get and its options.
    let r = c.get("foo", None).await.unwrap();
    assert_eq!(kvs(r.kvs()), ["foo=baz c2 m3 v2 l0"]);
    let r = c
        .get("foo", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    assert_eq!(
        keys(r.kvs()),
        ["foo", "foo/a", "foo/b", "foo/c", "foo/d", "foo/e"]
    );
    assert_eq!((r.count(), r.more()), (6, false));
    let r = c
        .get("foo", Some(GetOptions::new().with_prefix().with_limit(2)))
        .await
        .unwrap();
    assert_eq!(keys(r.kvs()), ["foo", "foo/a"]);
    assert_eq!((r.count(), r.more()), (6, true));
    let r = c
        .get("foo/c", Some(GetOptions::new().with_from_key()))
        .await
        .unwrap();
    assert_eq!(keys(r.kvs()), ["foo/c", "foo/d", "foo/e", "fop"]);
    let r = c
        .get("foo/b", Some(GetOptions::new().with_range("foo/d")))
        .await
        .unwrap();
    assert_eq!(keys(r.kvs()), ["foo/b", "foo/c"]);
    let r = c
        .get("", Some(GetOptions::new().with_all_keys()))
        .await
        .unwrap();
    assert_eq!(r.count(), 8);
    let r = c
        .get("foo", Some(GetOptions::new().with_revision(2)))
        .await
        .unwrap();
    assert_eq!(kvs(r.kvs()), ["foo=bar c2 m2 v1 l0"]);
    assert_eq!(
        r.header().unwrap().revision(),
        10,
        "the header has the current revision"
    );
    for target in [
        SortTarget::Key,
        SortTarget::Version,
        SortTarget::Create,
        SortTarget::Mod,
        SortTarget::Value,
    ] {
        for order in [SortOrder::Ascend, SortOrder::Descend] {
            let r = c
                .get(
                    "foo/",
                    Some(
                        GetOptions::new()
                            .with_prefix()
                            .with_sort(target, order)
                            .with_limit(3),
                    ),
                )
                .await
                .unwrap();
            log.push(format!("sort {target:?} {order:?}: {:?}", keys(r.kvs())));
        }
    }
    let r = c
        .get(
            "foo/",
            Some(
                GetOptions::new()
                    .with_prefix()
                    .with_sort(SortTarget::Value, SortOrder::Ascend),
            ),
        )
        .await
        .unwrap();
    assert_eq!(keys(r.kvs()), ["foo/e", "foo/d", "foo/c", "foo/b", "foo/a"]);
    let r = c
        .get(
            "foo",
            Some(GetOptions::new().with_prefix().with_serializable()),
        )
        .await
        .unwrap();
    assert_eq!(r.count(), 6);
    let r = c
        .get(
            "foo/",
            Some(GetOptions::new().with_prefix().with_keys_only()),
        )
        .await
        .unwrap();
    assert!(r.kvs().iter().all(|k| k.value().is_empty()));
    assert_eq!(r.kvs().len(), 5);
    let r = c
        .get(
            "foo/",
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
        .await
        .unwrap();
    assert_eq!((r.kvs().len(), r.count()), (0, 5));
    let r = c
        .get(
            "",
            Some(
                GetOptions::new()
                    .with_all_keys()
                    .with_min_mod_revision(5)
                    .with_max_mod_revision(7),
            ),
        )
        .await
        .unwrap();
    assert_eq!(keys(r.kvs()), ["foo/b", "foo/c", "foo/d"]);
    let r = c
        .get(
            "",
            Some(
                GetOptions::new()
                    .with_all_keys()
                    .with_min_create_revision(8)
                    .with_max_create_revision(9),
            ),
        )
        .await
        .unwrap();
    assert_eq!(keys(r.kvs()), ["foo/e", "fop"]);

    // Put's other options.
    let r = c
        .put(
            "fop",
            "",
            Some(PutOptions::new().with_ignore_value().with_prev_key()),
        )
        .await
        .unwrap();
    assert_eq!(kv(r.prev_key().unwrap()), "fop=x c9 m9 v1 l0");
    let r = c.get("fop", None).await.unwrap();
    assert_eq!(
        kvs(r.kvs()),
        ["fop=x c9 m11 v2 l0"],
        "ignore_value keeps the value"
    );
    log.push(refused(
        c.put("missing", "", Some(PutOptions::new().with_ignore_value()))
            .await,
    ));
    log.push(refused(
        c.put("foo", "v", Some(PutOptions::new().with_lease(12345)))
            .await,
    ));
    log.push(refused(c.put("", "v", None).await));
    log.push(refused(
        c.put("x", "", Some(PutOptions::new().with_ignore_lease()))
            .await,
    ));
    let r = c
        .put("fop", "y", Some(PutOptions::new().with_ignore_lease()))
        .await
        .unwrap();
    assert_eq!(r.header().unwrap().revision(), 12);

    // Delete and its options.
    let r = c
        .delete("foo/a", Some(DeleteOptions::new().with_prev_key()))
        .await
        .unwrap();
    assert_eq!(
        (r.deleted(), kvs(r.prev_kvs())),
        (1, vec!["foo/a=5 c4 m4 v1 l0".to_string()])
    );
    let r = c
        .delete("foo/", Some(DeleteOptions::new().with_prefix()))
        .await
        .unwrap();
    assert_eq!((r.deleted(), r.header().unwrap().revision()), (4, 14));
    let r = c
        .delete("z", Some(DeleteOptions::new().with_from_key()))
        .await
        .unwrap();
    assert_eq!((r.deleted(), r.header().unwrap().revision()), (0, 14));
    let r = c
        .delete(
            "a",
            Some(DeleteOptions::new().with_range("b").with_prev_key()),
        )
        .await
        .unwrap();
    assert_eq!(kvs(r.prev_kvs()), ["a=1 c10 m10 v1 l0"]);

    // Txn: every compare target and operator, both branches, nesting, errors.
    let t = Txn::new()
        .when([
            Compare::value("foo", CompareOp::Equal, "baz"),
            Compare::version("foo", CompareOp::Greater, 1),
            Compare::create_revision("foo", CompareOp::Less, 3),
            Compare::mod_revision("foo", CompareOp::NotEqual, 2),
            Compare::lease("foo", CompareOp::Equal, 0),
        ])
        .and_then([
            TxnOp::put("foo", "qux", Some(PutOptions::new().with_prev_key())),
            TxnOp::get("f", Some(GetOptions::new().with_prefix())),
            TxnOp::delete("fop", Some(DeleteOptions::new().with_prev_key())),
        ])
        .or_else([TxnOp::get("foo", None)]);
    let r = c.txn(t).await.unwrap();
    assert!(r.succeeded());
    assert_eq!(r.header().unwrap().revision(), 16);
    log.push(txn_text(&r));
    let t = Txn::new()
        .when([Compare::version("foo", CompareOp::Greater, 100)])
        .and_then([TxnOp::put("never", "1", None)])
        .or_else([
            TxnOp::get("foo", None),
            TxnOp::txn(
                Txn::new()
                    .when([Compare::value("foo", CompareOp::Equal, "qux")])
                    .and_then([TxnOp::put("nested", "1", None)]),
            ),
        ]);
    let r = c.txn(t).await.unwrap();
    assert!(!r.succeeded());
    log.push(txn_text(&r));
    assert_eq!(c.get("nested", None).await.unwrap().count(), 1);
    assert_eq!(c.get("never", None).await.unwrap().count(), 0);
    // A compare over a range: every key in it must match.
    c.put("r/1", "v", None).await.unwrap();
    c.put("r/2", "v", None).await.unwrap();
    let r = c
        .txn(Txn::new().when([Compare::value("r/", CompareOp::Equal, "v").with_prefix()]))
        .await
        .unwrap();
    assert!(r.succeeded());
    let r = c
        .txn(Txn::new().when([Compare::version("r/1", CompareOp::Equal, 1).with_range("r/3")]))
        .await
        .unwrap();
    assert!(r.succeeded());
    // A read-only txn takes no revision.
    let before = c
        .get("foo", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    let r = c
        .txn(Txn::new().and_then([TxnOp::get("foo", None)]))
        .await
        .unwrap();
    assert_eq!(r.header().unwrap().revision(), before);
    log.push(refused(
        c.txn(Txn::new().and_then([TxnOp::put("d", "1", None), TxnOp::put("d", "2", None)]))
            .await,
    ));
    log.push(refused(
        c.txn(Txn::new().and_then([
            TxnOp::put("r/1", "1", None),
            TxnOp::delete("r/", Some(DeleteOptions::new().with_prefix())),
        ]))
        .await,
    ));
    let too_many: Vec<TxnOp> = (0..129)
        .map(|i| TxnOp::put(format!("m{i}"), "", None))
        .collect();
    log.push(refused(c.txn(Txn::new().and_then(too_many)).await));

    // Compaction and reads of compacted or future revisions.
    let current = c
        .get("foo", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    let r = c.compact(current - 2, None).await.unwrap();
    assert_eq!(r.header().unwrap().revision(), current);
    log.push(refused(
        c.get("foo", Some(GetOptions::new().with_revision(current - 3)))
            .await,
    ));
    log.push(refused(
        c.get("foo", Some(GetOptions::new().with_revision(current + 1)))
            .await,
    ));
    log.push(refused(c.compact(current - 2, None).await));
    log.push(refused(c.compact(current + 5, None).await));
    c.compact(current, Some(CompactionOptions::new().with_physical()))
        .await
        .unwrap();
    let r = c
        .get("foo", Some(GetOptions::new().with_revision(current)))
        .await
        .unwrap();
    assert_eq!(kvs(r.kvs()), ["foo=qux c2 m16 v3 l0"]);
    let r = c
        .get("", Some(GetOptions::new().with_all_keys()))
        .await
        .unwrap();
    log.push(format!("final {:?}", kvs(r.kvs())));
    log
}

/// Every Lease call and option; returns the transcript.
async fn lease_scenario(endpoint: &str) -> Vec<String> {
    let mut c = Client::connect([endpoint], None).await.unwrap();
    let mut log = Vec::new();
    // Client-chosen ID; the same ID again is refused.
    let r = c
        .lease_grant(60, Some(LeaseGrantOptions::new().with_id(4242)))
        .await
        .unwrap();
    assert_eq!((r.id(), r.ttl()), (4242, 60));
    log.push(refused(
        c.lease_grant(60, Some(LeaseGrantOptions::new().with_id(4242)))
            .await,
    ));
    log.push(refused(c.lease_grant(9_000_000_001, None).await));
    // The minimum TTL: such a lease may expire at any moment, so it is revoked at once, whether
    // or not it is still there.
    let r = c.lease_grant(1, None).await.unwrap();
    assert!(r.id() > 0);
    log.push(format!("min ttl {}", r.ttl()));
    let _ = c.lease_revoke(r.id()).await;
    // A generated ID.
    let r = c.lease_grant(60, None).await.unwrap();
    assert!(r.id() > 0);
    let generated = r.id();
    c.put("l/a", "1", Some(PutOptions::new().with_lease(4242)))
        .await
        .unwrap();
    c.put("l/b", "2", Some(PutOptions::new().with_lease(4242)))
        .await
        .unwrap();
    let r = c
        .lease_time_to_live(4242, Some(LeaseTimeToLiveOptions::new().with_keys()))
        .await
        .unwrap();
    assert!((1..=60).contains(&r.ttl()), "{}", r.ttl());
    log.push(format!(
        "ttl granted {} keys {:?}",
        r.granted_ttl(),
        // etcd lists them in no particular order.
        {
            let mut keys: Vec<String> = r
                .keys()
                .iter()
                .map(|k| String::from_utf8_lossy(k).into_owned())
                .collect();
            keys.sort();
            keys
        }
    ));
    let r = c.lease_time_to_live(4242, None).await.unwrap();
    assert!(r.keys().is_empty());
    let mut ids: Vec<i64> = c
        .leases()
        .await
        .unwrap()
        .leases()
        .iter()
        .map(|l| l.id())
        .collect();
    ids.sort_unstable();
    let mut want = vec![4242, generated];
    want.sort_unstable();
    assert_eq!(ids, want);
    // Keep-alives on one stream: a live lease, then an unknown one (TTL 0, no error).
    let (mut keeper, mut stream) = c.lease_keep_alive(4242).await.unwrap();
    keeper.keep_alive().await.unwrap();
    let r = stream.message().await.unwrap().unwrap();
    log.push(format!("keepalive {} ttl {}", r.id(), r.ttl()));
    // The client turns the TTL 0 answer into its own error.
    match c.lease_keep_alive(777).await {
        Ok(_) => log.push("keepalive 777 accepted".into()),
        Err(e) => log.push(format!("keepalive 777: {e}")),
    }
    // Revoke deletes the attached keys in one revision.
    let before = c
        .get("l/", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    let r = c.lease_revoke(4242).await.unwrap();
    assert_eq!(r.header().unwrap().revision(), before + 1);
    assert_eq!(
        c.get("l/", Some(GetOptions::new().with_prefix()))
            .await
            .unwrap()
            .count(),
        0
    );
    let r = c.lease_time_to_live(4242, None).await.unwrap();
    log.push(format!("after revoke ttl {}", r.ttl()));
    log.push(refused(c.lease_revoke(4242).await));
    log.push(refused(
        c.put("l/c", "3", Some(PutOptions::new().with_lease(4242)))
            .await,
    ));
    c.lease_revoke(generated).await.unwrap();
    log
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_client_lease_calls_answer_like_etcd() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = common::etcd(&dir.path().join("etcd"), &[]);
    let keel = common::keel(&dir.path().join("keel"), common::free_port(), &[]);
    let expected = lease_scenario(&etcd.endpoint).await;
    let got = lease_scenario(&keel.endpoint).await;
    assert_eq!(got, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_client_kv_calls_answer_like_etcd() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = common::etcd(&dir.path().join("etcd"), &[]);
    let keel = common::keel(&dir.path().join("keel"), common::free_port(), &[]);
    let expected = scenario(&etcd.endpoint).await;
    let got = scenario(&keel.endpoint).await;
    for (e, g) in expected.iter().zip(&got) {
        assert_eq!(g, e);
    }
    assert_eq!(got.len(), expected.len());
}

/// Calls `path` with a range request; returns the gRPC code and message, or "ok".
async fn raw_call(endpoint: &str, path: &'static str) -> String {
    let channel = tonic::transport::Channel::from_shared(endpoint.to_string())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let request = keel_proto::etcdserverpb::RangeRequest {
        key: b"k".to_vec(),
        ..Default::default()
    };
    let answer: Result<tonic::Response<keel_proto::etcdserverpb::RangeResponse>, _> = grpc
        .unary(
            tonic::Request::new(request),
            tonic::codegen::http::uri::PathAndQuery::from_static(path),
            tonic_prost::ProstCodec::default(),
        )
        .await;
    match answer {
        Ok(_) => "ok".to_string(),
        Err(s) => format!("{:?}: {}", s.code(), s.message()),
    }
}

/// A call of a service or method etcd does not serve gets grpc-go's answer: `Unimplemented`,
/// "unknown service S" or "unknown method M for service S".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_services_and_methods_answer_like_etcd() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = common::etcd(&dir.path().join("etcd"), &[]);
    let keel = common::keel(&dir.path().join("keel"), common::free_port(), &[]);
    let paths = [
        "/etcdserverpb.KV/Range",
        "/etcdserverpb.Nope/Range",
        "/etcdserverpb.KV/Nope",
        "/etcdserverpb.Maintenance/Downgrade",
        "/v3lockpb.Lock/Nope",
        "/a/b/c",
        "/nomethod",
    ];
    for path in paths {
        let expected = raw_call(&etcd.endpoint, path).await;
        let got = raw_call(&keel.endpoint, path).await;
        assert_eq!(got, expected, "{path}");
    }
    assert_eq!(
        raw_call(&keel.endpoint, "/etcdserverpb.Nope/Range").await,
        "Unimplemented: unknown service etcdserverpb.Nope"
    );
}

/// gRPC's health service answers as etcd's: `SERVING` for the server (the empty name),
/// `NotFound` for another name; a watch gets the status at once and stays open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_health_answers_like_etcd() {
    use keel_proto::health::HealthCheckRequest;
    use keel_proto::health::health_client::HealthClient;
    async fn session(endpoint: &str) -> Vec<String> {
        let mut c = HealthClient::connect(endpoint.to_string()).await.unwrap();
        let mut log = Vec::new();
        for service in ["", "etcdserverpb.KV"] {
            let request = HealthCheckRequest {
                service: service.into(),
            };
            match c.check(request.clone()).await {
                Ok(r) => log.push(format!("check {service:?}: {:?}", r.into_inner().status())),
                Err(s) => log.push(format!("check {service:?}: {:?} {}", s.code(), s.message())),
            }
            let mut watch = c.watch(request).await.unwrap().into_inner();
            let first = watch.message().await.unwrap().unwrap();
            log.push(format!("watch {service:?}: {:?}", first.status()));
            // Nothing more while the status does not change.
            let next =
                tokio::time::timeout(std::time::Duration::from_millis(300), watch.message()).await;
            log.push(format!(
                "then: {}",
                if next.is_err() { "open" } else { "ended" }
            ));
        }
        log
    }
    let dir = tempfile::tempdir().unwrap();
    let etcd = common::etcd(&dir.path().join("etcd"), &[]);
    let keel = common::keel(&dir.path().join("keel"), common::free_port(), &[]);
    let expected = session(&etcd.endpoint).await;
    assert_eq!(expected[0], "check \"\": Serving");
    assert_eq!(session(&keel.endpoint).await, expected);
}

/// With no `--data-dir`, a member keeps its data in `<name>.keel` under the working directory
/// (etcd's `<name>.etcd`), and works: a relative data dir once stopped the storage core at
/// start (glommio opened its WAL directory relative to fd -1).
#[test]
fn the_default_data_dir_is_relative_to_the_working_directory() {
    let cwd = tempfile::tempdir().unwrap();
    let (port, peer) = (common::free_port(), common::free_port());
    let client = format!("http://127.0.0.1:{port}");
    let peer = format!("http://127.0.0.1:{peer}");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_keel"))
        .current_dir(cwd.path())
        .arg(format!("--listen-client-urls={client}"))
        .arg(format!("--advertise-client-urls={client}"))
        .arg(format!("--listen-peer-urls={peer}"))
        .arg(format!("--initial-advertise-peer-urls={peer}"))
        .arg(format!("--initial-cluster=default={peer}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    common::wait_listening(&mut child, port, "keel");
    let server = common::Server {
        child,
        port,
        endpoint: client.clone(),
    };
    assert_eq!(common::ok(&server.endpoint, &["put", "k", "v"]), "OK\n");
    assert_eq!(
        common::ok(&server.endpoint, &["get", "k", "--print-value-only"]),
        "v\n"
    );
    assert!(cwd.path().join("default.keel/member/wal").is_dir());
}
