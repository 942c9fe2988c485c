//! `keel grpc-proxy start`, end to end:
//!
//! - the same etcdctl session through keel's proxy in front of keel and through etcd's
//!   `grpc-proxy` in front of etcd 3.4 prints the same (KV, serializable reads, txn, leases,
//!   members, auth, lock, watch);
//! - watch coalescing, counted upstream: many watchers of one key through the proxy are one
//!   watcher on the member, and every one of them gets each event;
//! - the cache: serializable reads are answered by the proxy, and stay right after writes made
//!   through the proxy and after writes made on the member directly.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{Server, free_port, start_server, wait_for};

/// A proxy process, killed when dropped.
struct Proxy {
    child: Child,
    endpoint: String,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts a gRPC proxy (`keel grpc-proxy start` or `etcd grpc-proxy start`) in front of
/// `server`.
fn proxy(program: &str, server: &Server) -> Proxy {
    proxy_to(program, &format!("127.0.0.1:{}", server.port))
}

/// A gRPC proxy in front of `endpoints` (`--endpoints`).
fn proxy_to(program: &str, endpoints: &str) -> Proxy {
    let port = free_port();
    let mut child = Command::new(program)
        .args(["grpc-proxy", "start"])
        .arg(format!("--endpoints={endpoints}"))
        .arg(format!("--listen-addr=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    common::wait_listening(&mut child, port, "grpc-proxy");
    Proxy {
        child,
        endpoint: format!("http://127.0.0.1:{port}"),
    }
}

/// etcdctl against `endpoint`, the output with lease IDs and member IDs left out.
fn ctl(endpoint: &str, args: &[&str]) -> String {
    let (ok, out) = common::etcdctl(endpoint, args);
    format!("{args:?} {ok}\n{out}")
}

/// A proxy's metric.
fn metric(port: u16, name: &str) -> Option<f64> {
    let (_, text) = common::try_http_get(port, "/metrics")?;
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// A keel member with data dir under `dir`, and keel's proxy in front of it.
fn keel_and_proxy(dir: &std::path::Path) -> (Server, Proxy) {
    let server = start_server(
        env!("CARGO_BIN_EXE_keel"),
        &dir.join("k"),
        free_port(),
        "http",
        &[],
    );
    let p = proxy(env!("CARGO_BIN_EXE_keel"), &server);
    (server, p)
}

/// The next response of `s` that carries events (created and progress responses skipped).
async fn next_events(s: &mut etcd_client::WatchStream) -> etcd_client::WatchResponse {
    loop {
        let r = tokio::time::timeout(Duration::from_secs(10), s.message())
            .await
            .expect("an event in time")
            .unwrap()
            .unwrap();
        if !r.events().is_empty() {
            return r;
        }
    }
}

fn port_of(endpoint: &str) -> u16 {
    endpoint.rsplit(':').next().unwrap().parse().unwrap()
}

#[test]
fn an_etcdctl_session_through_the_proxy_prints_what_etcds_proxy_prints() {
    let dir = tempfile::tempdir().unwrap();
    let mut transcripts = Vec::new();
    for program in [env!("CARGO_BIN_EXE_keel"), "etcd"] {
        let server = start_server(
            program,
            &dir.path().join(program.replace('/', "_")),
            free_port(),
            "http",
            &[],
        );
        let p = proxy(program, &server);
        let e = p.endpoint.clone();
        wait_for("the proxy to answer", || {
            common::etcdctl(&e, &["get", "x"]).0.then_some(())
        });
        let mut t = Vec::new();
        for args in [
            &["put", "a", "1"][..],
            &["put", "b", "2"],
            &["get", "a"],
            &["get", "a", "--consistency=s"],
            &["get", "a", "--consistency=s"],
            &["put", "a", "3"],
            &["get", "a", "--consistency=s"],
            &["get", "", "--prefix", "--consistency=s", "-w", "json"],
            &["get", "a", "--rev=2", "--consistency=s"],
            &["txn", "--interactive=false"],
            &["del", "b", "--prev-kv"],
            &["get", "b", "--consistency=s"],
            &["compaction", "3"],
            &["get", "a", "--rev=2"],
            &["lease", "grant", "100"],
            &["lease", "list"],
            &["member", "list", "-w", "json"],
            &["member", "list"],
            &["lock", "mylock", "echo", "held"],
            &["user", "add", "root:pw"],
            &["user", "list"],
            &["role", "list"],
            &["alarm", "list"],
            &["watch", "a", "--rev=4"],
        ] {
            if args[0] == "txn" {
                let out = Command::new("etcdctl")
                    .env("ETCDCTL_API", "3")
                    .arg(format!("--endpoints={e}"))
                    .args(args)
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .spawn()
                    .and_then(|mut c| {
                        use std::io::Write as _;
                        c.stdin
                            .take()
                            .unwrap()
                            .write_all(b"value(\"a\") = \"3\"\n\nput b 4\n\nput b 5\n\n")?;
                        c.wait_with_output()
                    })
                    .unwrap();
                t.push(format!("txn\n{}", String::from_utf8_lossy(&out.stdout)));
                continue;
            }
            if args[0] == "watch" {
                // A watch from a past revision: its history, then the proxy's stream goes on.
                let mut child = Command::new("etcdctl")
                    .env("ETCDCTL_API", "3")
                    .arg(format!("--endpoints={e}"))
                    .args(args)
                    .stdout(Stdio::piped())
                    .spawn()
                    .unwrap();
                std::thread::sleep(Duration::from_secs(1));
                let _ = child.kill();
                let out = child.wait_with_output().unwrap();
                t.push(format!("watch\n{}", String::from_utf8_lossy(&out.stdout)));
                continue;
            }
            let out = ctl(&e, args);
            // Lease IDs, the cluster and member IDs and raft terms are the servers' own.
            let out = if args[0] == "lease" || args[0] == "get" && args.contains(&"json") {
                out.chars().filter(|c| !c.is_ascii_hexdigit()).collect()
            } else {
                out
            };
            t.push(out);
        }
        transcripts.push(t);
    }
    assert_eq!(transcripts[0].len(), transcripts[1].len());
    for (k, e) in transcripts[0].iter().zip(&transcripts[1]) {
        assert_eq!(k, e, "\n--- keel ---\n{k}\n--- etcd ---\n{e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_watchers_of_one_key_are_one_upstream_watcher() {
    let dir = tempfile::tempdir().unwrap();
    let (server, p) = keel_and_proxy(dir.path());
    let mut direct = etcd_client::Client::connect([server.endpoint.clone()], None)
        .await
        .unwrap();
    direct.put("hot", "0", None).await.unwrap();
    const N: usize = 100;
    let mut streams = Vec::new();
    for _ in 0..N {
        let mut c = etcd_client::Client::connect([p.endpoint.clone()], None)
            .await
            .unwrap();
        let s = c.watch("hot", None).await.unwrap();
        streams.push((c, s));
    }
    let member_watchers = || {
        common::try_http_get(server.port, "/metrics").and_then(|(_, t)| {
            t.lines()
                .find(|l| l.starts_with("etcd_debugging_mvcc_watcher_total "))
                .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        })
    };
    // Every watcher is in (each client has had its created response or is about to), and the
    // member serves one watcher for them all (the cache's watch starts with the first read the
    // cache could answer; none here).
    let pport = port_of(&p.endpoint);
    wait_for("every watcher to be coalesced", || {
        let n = metric(pport, "etcd_grpc_proxy_watchers_coalescing_total")?;
        (n == (N - 1) as f64).then_some(())
    });
    let upstream = wait_for("one upstream watcher", || {
        let n = member_watchers()?;
        (n <= 1.0).then_some(n)
    });
    assert_eq!(upstream, 1.0);
    let put = direct.put("hot", "1", None).await.unwrap();
    let rev = put.header().unwrap().revision();
    for (_, s) in &mut streams {
        let r = next_events(s).await;
        let ev = &r.events()[0];
        assert_eq!(ev.kv().unwrap().value(), b"1");
        assert_eq!(ev.kv().unwrap().mod_revision(), rev);
    }
    // A watcher from the past gets a broadcast of its own, catches up with the history, then
    // joins the others: one upstream watcher again.
    let mut late = etcd_client::Client::connect([p.endpoint.clone()], None)
        .await
        .unwrap();
    let mut history = late
        .watch(
            "hot",
            Some(etcd_client::WatchOptions::new().with_start_revision(1)),
        )
        .await
        .unwrap();
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let r = tokio::time::timeout(Duration::from_secs(10), history.message())
            .await
            .expect("history in time")
            .unwrap()
            .unwrap();
        seen.extend(r.events().iter().map(|e| e.kv().unwrap().value().to_vec()));
    }
    assert_eq!(seen, [b"0".to_vec(), b"1".to_vec()]);
    direct.put("hot", "2", None).await.unwrap();
    wait_for("the late watcher to coalesce", || {
        (member_watchers()? == 1.0).then_some(())
    });
    let r = next_events(&mut history).await;
    assert_eq!(r.events()[0].kv().unwrap().value(), b"2");
    drop((late, history));
    // Watchers that go away are gone upstream too.
    drop(streams);
    wait_for("the upstream watcher to go", || {
        (member_watchers()? == 0.0).then_some(())
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_ranges_follow_writes_from_anywhere() {
    let dir = tempfile::tempdir().unwrap();
    let (server, p) = keel_and_proxy(dir.path());
    let ser = || Some(etcd_client::GetOptions::new().with_serializable());
    let mut via = etcd_client::Client::connect([p.endpoint.clone()], None)
        .await
        .unwrap();
    let mut direct = etcd_client::Client::connect([server.endpoint.clone()], None)
        .await
        .unwrap();
    via.put("k", "1", None).await.unwrap();
    let value = |r: etcd_client::GetResponse| r.kvs().first().map(|kv| kv.value().to_vec());
    // The cache's watch starts with the first serializable read: wait until reads hit it.
    let pport = port_of(&p.endpoint);
    let mut hit = false;
    for _ in 0..500 {
        let _ = via.get("k", ser()).await.unwrap();
        if metric(pport, "etcd_grpc_proxy_cache_hits_total").unwrap_or(0.0) >= 1.0 {
            hit = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(hit, "serializable reads are answered from the cache");
    for round in 0..20 {
        // Through the proxy: the next serializable read sees it at once.
        let v = format!("via-{round}");
        via.put("k", v.as_str(), None).await.unwrap();
        assert_eq!(
            value(via.get("k", ser()).await.unwrap()),
            Some(v.into_bytes())
        );
        // On the member: the proxy's watch drops the cached answer shortly.
        let v = format!("direct-{round}");
        direct.put("k", v.as_str(), None).await.unwrap();
        let mut seen = None;
        for _ in 0..500 {
            seen = value(via.get("k", ser()).await.unwrap());
            if seen.as_deref() == Some(v.as_bytes()) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(seen, Some(v.into_bytes()), "round {round}");
    }
    // Deleted on the member: gone through the proxy too.
    direct.delete("k", None).await.unwrap();
    let mut gone = false;
    for _ in 0..500 {
        if value(via.get("k", ser()).await.unwrap()).is_none() {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(gone);
    let hits = metric(pport, "etcd_grpc_proxy_cache_hits_total").unwrap();
    assert!(hits >= 1.0, "{hits}");
    // A failing Authenticate changes no auth: the cache keeps answering.
    let _ = via.get("k2", ser()).await.unwrap();
    let mut auth = keel_proto::etcdserverpb::auth_client::AuthClient::connect(p.endpoint.clone())
        .await
        .unwrap();
    for _ in 0..5 {
        let failed = auth
            .authenticate(keel_proto::etcdserverpb::AuthenticateRequest {
                name: "nobody".into(),
                password: "x".into(),
            })
            .await;
        assert!(failed.is_err(), "{failed:?}");
        let _ = via.get("k2", ser()).await.unwrap();
    }
    let after = metric(pport, "etcd_grpc_proxy_cache_hits_total").unwrap();
    assert!(after >= hits + 5.0, "{hits} then {after}");

    // Auth turned on: a read without credentials is refused, never answered from the cache.
    direct.put("secret", "s", None).await.unwrap();
    for _ in 0..3 {
        assert!(via.get("secret", ser()).await.is_ok());
    }
    via.user_add("root", "pw", None).await.unwrap();
    via.user_grant_role("root", "root").await.unwrap();
    via.auth_enable().await.unwrap();
    for _ in 0..20 {
        let refused = via.get("secret", ser()).await;
        assert!(refused.is_err(), "{refused:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What an operator sees of the proxy: `/health` true while the cluster answers through it,
/// false (503) once it cannot; `/metrics` with etcd's proxy metrics; calls forwarded to a
/// cluster that is gone fail with `Unavailable` rather than hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_metrics_tell_the_operator() {
    let dir = tempfile::tempdir().unwrap();
    let (mut server, p) = keel_and_proxy(dir.path());
    let port = port_of(&p.endpoint);
    wait_for("a healthy proxy", || {
        common::try_http_get(port, "/health")
            .filter(|(code, body)| *code == 200 && body.contains(r#""health":"true""#))
    });
    let (_, metrics) = common::http_get(port, "/metrics");
    for name in [
        "etcd_grpc_proxy_cache_hits_total",
        "etcd_grpc_proxy_watchers_coalescing_total",
        "etcd_grpc_proxy_events_coalescing_total",
    ] {
        assert!(metrics.contains(name), "{name} missing:\n{metrics}");
    }
    let _ = server.child.kill();
    let _ = server.child.wait();
    wait_for("an unhealthy proxy", || {
        common::try_http_get(port, "/health")
            .filter(|(code, body)| *code == 503 && body.contains(r#""health":"false""#))
    });
    let mut c = etcd_client::Client::connect([p.endpoint.clone()], None)
        .await
        .unwrap();
    let lease = tokio::time::timeout(Duration::from_secs(30), c.lease_grant(10, None))
        .await
        .expect("an answer, not a hang");
    match lease {
        Err(etcd_client::Error::GRpcStatus(s)) => {
            assert_eq!(s.code(), tonic::Code::Unavailable, "{s:?}")
        }
        other => panic!("{other:?}"),
    }
}

/// An endpoint that cannot be reached costs no call: writes and forwarded calls whose request
/// never left go to the next endpoint (as clientv3's balancer skips it); the proxy's answers
/// stay complete. Non-gRPC paths are not passed to members (etcd's proxy answers 404).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_endpoint_costs_no_write_and_no_forwarded_call() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(
        env!("CARGO_BIN_EXE_keel"),
        &dir.path().join("k"),
        free_port(),
        "http",
        &[],
    );
    let dead = free_port();
    let p = proxy_to(
        env!("CARGO_BIN_EXE_keel"),
        &format!("127.0.0.1:{dead},127.0.0.1:{}", server.port),
    );
    let port = port_of(&p.endpoint);
    let mut c = etcd_client::Client::connect([p.endpoint.as_str()], None)
        .await
        .unwrap();
    for i in 0..12 {
        c.put(format!("k{i}"), "v", None).await.unwrap();
        c.lease_grant(60, None).await.unwrap();
        c.delete(format!("k{i}"), None).await.unwrap();
    }
    let (status, body) = common::http_get(port, "/v3/kv/range");
    assert_eq!((status, body.as_str()), (404, "404 page not found\n"));
}
