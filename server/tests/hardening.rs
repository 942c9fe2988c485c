//! Hardening: no request, flag or disk state stops a member; fatal disk errors stop the process
//! (so a supervisor restarts it); the data dir is private; a stop signal ends open streams.
//! Each test runs real `keel` processes (and etcd where a behaviour is compared).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use common::free_port;
use etcd_client::Client;
use keel_proto::etcdserverpb as pb;
use pb::kv_client::KvClient;
use pb::watch_client::WatchClient;

/// Runs `f` on a runtime whose threads have large stacks: a txn nested 256 deep is decoded by
/// prost recursively, on the client as on the server.
fn with_big_stacks<F: std::future::Future<Output = ()> + Send + 'static>(f: F) {
    std::thread::Builder::new()
        .stack_size(64 << 20)
        .spawn(move || {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_stack_size(64 << 20)
                .enable_all()
                .build()
                .unwrap()
                .block_on(f)
        })
        .unwrap()
        .join()
        .unwrap();
}

/// A txn nested `depth` levels deep (the request itself is level 1), putting `key` at the bottom.
fn nested(depth: usize, key: &str) -> pb::TxnRequest {
    let mut t = pb::TxnRequest {
        success: vec![pb::RequestOp {
            request: Some(pb::request_op::Request::RequestPut(pb::PutRequest {
                key: key.as_bytes().to_vec(),
                value: b"deep".to_vec(),
                ..Default::default()
            })),
        }],
        ..Default::default()
    };
    for _ in 1..depth {
        t = pb::TxnRequest {
            success: vec![pb::RequestOp {
                request: Some(pb::request_op::Request::RequestTxn(t)),
            }],
            ..Default::default()
        };
    }
    t
}

/// What a server answers to txns nested 49, 60, 128 (etcd's default limit) and 129 deep.
async fn nested_outcomes(endpoint: &str) -> Vec<String> {
    let mut kv = KvClient::connect(endpoint.to_string())
        .await
        .unwrap()
        .max_decoding_message_size(64 << 20);
    let mut out = Vec::new();
    for depth in [49, 60, 128, 129] {
        let r = kv.txn(nested(depth, &format!("deep/{depth}"))).await;
        out.push(match r {
            Ok(r) => format!("{depth}: succeeded={}", r.into_inner().succeeded),
            Err(s) => format!("{depth}: {:?} {}", s.code(), s.message()),
        });
    }
    out
}

/// The reproduction of the issue: a txn nested 49 deep used to be committed and then stop the
/// storage core for good (and again after every restart). Txns nest as deep as etcd allows,
/// answered as etcd answers, and the member keeps serving, across a kill -9 and restart too.
#[test]
fn nested_txns_are_answered_as_etcd_and_never_stop_the_member() {
    with_big_stacks(async {
        let dir = tempfile::tempdir().unwrap();
        let etcd = common::etcd(&dir.path().join("etcd"), &[]);
        let port = free_port();
        let data = dir.path().join("keel");
        let keel = common::keel(&data, port, &[]);
        let expected = nested_outcomes(&etcd.endpoint).await;
        let got = nested_outcomes(&keel.endpoint).await;
        assert_eq!(got, expected);
        assert!(got[2].contains("succeeded=true"), "{got:?}");
        assert!(got[3].contains("too many operations"), "{got:?}");
        // Deeper than Keel decodes: refused before anything reaches raft.
        let mut kv = KvClient::connect(keel.endpoint.clone()).await.unwrap();
        let err = kv.txn(nested(300, "deep/300")).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains("nested deeper than 256"), "{err:?}");
        // The member still writes, and the nested writes replay after a kill -9.
        kv.put(pb::PutRequest {
            key: b"after".to_vec(),
            value: b"1".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap();
        drop(keel);
        let keel = common::keel(&data, port, &[]);
        let mut c = Client::connect([keel.endpoint.as_str()], None)
            .await
            .unwrap();
        for key in ["deep/49", "deep/60", "deep/128", "after"] {
            let r = c.get(key, None).await.unwrap();
            assert_eq!(r.kvs().len(), 1, "{key} after restart");
        }
        assert!(c.get("deep/129", None).await.unwrap().kvs().is_empty());
        c.put("after/restart", "ok", None).await.unwrap();
    });
}

/// Runs `n` puts of `prefix{i}` one after another.
async fn puts(endpoint: &str, prefix: &str, n: usize) {
    let mut c = Client::connect([endpoint], None).await.unwrap();
    for i in 0..n {
        c.put(format!("{prefix}{i}"), "v", None).await.unwrap();
    }
}

/// A backend behind the WAL's snapshot (a deleted or rolled-back `db`) would serve a partial
/// dataset: the member refuses to start, naming both indexes; with the right `db` it serves
/// everything again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_or_rolled_back_backend_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("keel");
    let db = data.join("member/snap/db");
    // The raft log is compacted every 10 entries, keeping 1: the WAL soon starts past index 1.
    let flags = [
        "--snapshot-count=10",
        "--experimental-snapshot-catchup-entries=1",
    ];
    let port = free_port();
    let mut keel = common::keel(&data, port, &flags);
    puts(&keel.endpoint, "early/", 5).await;
    assert!(keel.terminate().success());
    std::fs::copy(&db, dir.path().join("old-db")).unwrap();
    let mut keel = common::keel(&data, port, &flags);
    puts(&keel.endpoint, "late/", 100).await;
    assert!(keel.terminate().success());
    std::fs::rename(&db, dir.path().join("good-db")).unwrap();
    for case in ["deleted", "rolled back"] {
        if case == "rolled back" {
            std::fs::copy(dir.path().join("old-db"), &db).unwrap();
        }
        let (code, err) = common::keel_refused(&data, &flags);
        assert_ne!(code, Some(0), "{case}: {err}");
        assert!(
            err.contains("behind the WAL's snapshot at index"),
            "{case}: {err}"
        );
        assert!(err.contains("applied raft index"), "{case}: {err}");
    }
    std::fs::rename(dir.path().join("good-db"), &db).unwrap();
    let keel = common::keel(&data, port, &flags);
    let mut c = Client::connect([keel.endpoint.as_str()], None)
        .await
        .unwrap();
    let all = c
        .get("", Some(etcd_client::GetOptions::new().with_all_keys()))
        .await
        .unwrap();
    assert_eq!(all.count(), 105);
}

fn modes(dir: &Path, out: &mut Vec<(String, u32, bool)>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let meta = e.metadata().unwrap();
        let mode = meta.permissions().mode() & 0o777;
        out.push((e.path().display().to_string(), mode, meta.is_dir()));
        if meta.is_dir() {
            modes(&e.path(), out);
        }
    }
}

/// The data dir, `member/`, `wal/`, `snap/` are 0700 and every file 0600, as etcd's; an existing
/// data dir with wider permissions gets etcd 3.4's warning.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_dir_is_private() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("keel");
    let mut keel = common::keel(&data, free_port(), &[]);
    puts(&keel.endpoint, "k", 3).await;
    assert!(keel.terminate().success());
    let mut all = vec![(
        data.display().to_string(),
        std::fs::metadata(&data).unwrap().permissions().mode() & 0o777,
        true,
    )];
    modes(&data, &mut all);
    assert!(all.len() >= 5, "{all:?}");
    for (path, mode, is_dir) in &all {
        let want = if *is_dir { 0o700 } else { 0o600 };
        assert_eq!(*mode, want, "{path} has mode {mode:o}");
    }
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    let log = dir.path().join("log");
    let mut keel = common::keel_with(&data, free_port(), &[], &[], Some(&log));
    assert!(keel.terminate().success());
    let text = std::fs::read_to_string(&log).unwrap();
    let warning = format!(
        "check file permission: directory \"{}\" exist, but the permission is \"drwxr-xr-x\". \
         The recommended permission is \"-rwx------\" to prevent possible unprivileged access to \
         the data.",
        data.display()
    );
    assert!(text.contains(&warning), "{text}");
}

/// SIGTERM with open watch and keep-alive streams: the streams end, the member checkpoints and
/// exits with success, and a restart finds every acknowledged write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_signal_ends_open_streams_and_the_member_exits() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("keel");
    let port = free_port();
    let mut keel = common::keel(&data, port, &[]);
    let mut c = Client::connect([keel.endpoint.as_str()], None)
        .await
        .unwrap();
    let lease = c.lease_grant(60, None).await.unwrap().id();
    let (mut keeper, mut responses) = c.lease_keep_alive(lease).await.unwrap();
    keeper.keep_alive().await.unwrap();
    assert!(responses.message().await.unwrap().is_some());
    let mut events = c.watch("w", None).await.unwrap();
    assert!(events.message().await.unwrap().unwrap().created());
    c.put("kept", "yes", None).await.unwrap();
    let status = keel.terminate();
    assert!(status.success(), "{status}");
    // Both streams were ended by the server.
    assert!(!matches!(events.message().await, Ok(Some(_))));
    assert!(!matches!(responses.message().await, Ok(Some(_))));
    let keel = common::keel(&data, port, &[]);
    let mut c = Client::connect([keel.endpoint.as_str()], None)
        .await
        .unwrap();
    assert_eq!(c.get("kept", None).await.unwrap().kvs()[0].value(), b"yes");
    assert!(c.lease_time_to_live(lease, None).await.unwrap().ttl() > 0);
}

/// systemd's readiness protocol, as a `Type=notify` unit (the Ansible role's) sees it: `READY=1`
/// once clients are served, `STOPPING=1` when a stop begins.
#[test]
fn systemd_is_told_when_the_member_is_ready_and_when_it_stops() {
    use std::os::unix::net::UnixDatagram;
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let port = free_port();
    let notify = socket_path.to_str().unwrap();
    let mut keel = common::keel_with(
        &dir.path().join("keel"),
        port,
        &[],
        &[("NOTIFY_SOCKET", notify)],
        None,
    );
    let mut buf = [0u8; 256];
    let n = socket.recv(&mut buf).expect("READY=1 from keel");
    assert_eq!(&buf[..n], b"READY=1");
    // Ready means serving: the client port answers.
    assert_eq!(common::http_get(port, "/health").0, 200);
    assert!(keel.terminate().success());
    let n = socket.recv(&mut buf).expect("STOPPING=1 from keel");
    assert_eq!(&buf[..n], b"STOPPING=1");
}

/// What keeps a watch stream open.
type OpenStream = (
    tokio::sync::mpsc::Sender<pb::WatchRequest>,
    tonic::Streaming<pb::WatchResponse>,
);

/// Creates `n` watchers on one stream; returns the create responses and the open stream.
async fn create_watchers(endpoint: &str, n: usize) -> (Vec<pb::WatchResponse>, OpenStream) {
    let mut client = WatchClient::connect(endpoint.to_string()).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let mut responses = client
        .watch(tokio_stream_from(rx))
        .await
        .unwrap()
        .into_inner();
    let sender = tokio::spawn(async move {
        for i in 0..n {
            let req = pb::WatchRequest {
                request_union: Some(pb::watch_request::RequestUnion::CreateRequest(
                    pb::WatchCreateRequest {
                        key: format!("flood/{i}").into_bytes(),
                        ..Default::default()
                    },
                )),
            };
            if tx.send(req).await.is_err() {
                break;
            }
        }
        // The stream stays open while the caller holds the sender.
        tx
    });
    let mut out = Vec::new();
    while out.len() < n {
        out.push(responses.message().await.unwrap().unwrap());
    }
    let tx = sender.await.unwrap();
    (out, (tx, responses))
}

/// A request stream from a channel.
fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<pb::WatchRequest>,
) -> impl futures::Stream<Item = pb::WatchRequest> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// Far more creates than a stream may have queued at its hub (1,024) are all answered, in
/// order: the reader waits for the hub instead of queuing without bound, and never stalls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_creates_beyond_the_hub_queue_is_all_answered() {
    let dir = tempfile::tempdir().unwrap();
    let keel = common::keel(&dir.path().join("keel"), free_port(), &[]);
    let (created, _open) = create_watchers(&keel.endpoint, 5000).await;
    assert!(created.iter().all(|r| r.created && !r.canceled));
    let ids: Vec<i64> = created.iter().map(|r| r.watch_id).collect();
    assert_eq!(ids, (0..5000).collect::<Vec<i64>>());
}

/// A flood of watch creates is bounded per stream and per member, each refusal a clear answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_watch_creates_is_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let keel = common::keel(
        &dir.path().join("keel"),
        free_port(),
        &["--max-watchers-per-stream=100", "--max-watchers=150"],
    );
    let (first, _open) = create_watchers(&keel.endpoint, 120).await;
    assert!(first[..100].iter().all(|r| r.created && !r.canceled));
    for r in &first[100..] {
        assert!(r.created && r.canceled && r.watch_id == -1, "{r:?}");
        assert!(r.cancel_reason.contains("too many watchers on one stream"));
    }
    let (second, _open_too) = create_watchers(&keel.endpoint, 60).await;
    assert!(second[..50].iter().all(|r| r.created && !r.canceled));
    for r in &second[50..] {
        assert!(
            r.canceled && r.cancel_reason.contains("member's limit is 150"),
            "{r:?}"
        );
    }
}

/// With every WAL fdatasync stalled by 2 s, a put waits for it, but keep-alives, TimeToLive,
/// serializable reads and `/metrics` answer meanwhile: a whole round of them is answered before
/// the put is (no count of rounds is asserted: only that they do not wait for the disk).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alives_answer_while_the_wal_stalls() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let keel = common::keel_with(
        &dir.path().join("keel"),
        port,
        &[],
        &[("KEEL_FAULT_WAL_SYNC_DELAY", "2s")],
        None,
    );
    let mut c = Client::connect([keel.endpoint.as_str()], None)
        .await
        .unwrap();
    let lease = c.lease_grant(60, None).await.unwrap().id();
    let (mut keeper, mut responses) = c.lease_keep_alive(lease).await.unwrap();
    let mut writer = c.clone();
    let put = tokio::spawn(async move { writer.put("slow", "1", None).await.unwrap() });
    let mut answered_before_the_put = 0;
    while !put.is_finished() {
        keeper.keep_alive().await.unwrap();
        let r = responses.message().await.unwrap().unwrap();
        assert!(r.ttl() > 0);
        assert!(c.lease_time_to_live(lease, None).await.unwrap().ttl() > 0);
        c.get(
            "slow",
            Some(etcd_client::GetOptions::new().with_serializable()),
        )
        .await
        .unwrap();
        let (code, body) = common::http_get(port, "/metrics");
        assert_eq!(code, 200);
        assert!(body.contains("etcd_disk_wal_fsync_duration_seconds"));
        if !put.is_finished() {
            answered_before_the_put += 1;
        }
    }
    put.await.unwrap();
    assert!(
        answered_before_the_put > 0,
        "no round of keep-alive, TimeToLive, read and /metrics was answered before the put"
    );
}

/// A failed fdatasync leaves memory and disk in doubt: the member stops the process (non-zero
/// exit, one clear log line) instead of serving as a zombie; restarted, it has every write it
/// acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_fdatasync_stops_the_process() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("keel");
    let port = free_port();
    let log = dir.path().join("log");
    let mut keel = common::keel_with(
        &data,
        port,
        &[],
        &[("KEEL_FAULT_WAL_SYNC_FAIL_AFTER", "20")],
        Some(&log),
    );
    let mut c = Client::connect([keel.endpoint.as_str()], None)
        .await
        .unwrap();
    let mut acknowledged = Vec::new();
    for i in 0..100 {
        match c.put(format!("k{i}"), "v", None).await {
            Ok(_) => acknowledged.push(i),
            Err(_) => break,
        }
    }
    assert!(acknowledged.len() < 100, "every put succeeded");
    let status = keel.wait_exit();
    assert!(!status.success(), "{status}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("the storage core stopped"), "{text}");
    assert!(text.contains("fdatasync"), "{text}");
    let keel = common::keel(&data, port, &[]);
    let mut c = Client::connect([keel.endpoint.as_str()], None)
        .await
        .unwrap();
    for i in acknowledged {
        assert_eq!(c.get(format!("k{i}"), None).await.unwrap().kvs().len(), 1);
    }
}

/// Appends one committed entry with undecodable data to a stopped member's WAL.
fn append_garbage_entry(data: &Path) {
    use keel_engine::wal::{Wal, WalOptions};
    let wal_dir = data.join("member/wal");
    glommio::LocalExecutorBuilder::default()
        .spawn(move || async move {
            let (wal, _) = Wal::open(&wal_dir, WalOptions::default()).await.unwrap();
            let mut hs = wal.hard_state();
            let e = raft::eraftpb::Entry {
                index: wal.last_index() + 1,
                term: hs.term,
                data: vec![0xff; 16].into(),
                ..Default::default()
            };
            hs.commit = e.index;
            wal.save(&[e], Some(&hs)).await.unwrap();
            wal.close().await.unwrap();
        })
        .unwrap()
        .join()
        .unwrap();
}

/// A committed entry that does not decode (it cannot come from this version's own checks) is
/// skipped with an error in the log; the member goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_committed_entry_does_not_stop_the_member() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("keel");
    let port = free_port();
    let mut keel = common::keel(&data, port, &[]);
    puts(&keel.endpoint, "before/", 3).await;
    assert!(keel.terminate().success());
    append_garbage_entry(&data);
    let log = dir.path().join("log");
    let keel = common::keel_with(&data, port, &[], &[], Some(&log));
    let mut c = Client::connect([keel.endpoint.as_str()], None)
        .await
        .unwrap();
    c.put("after", "ok", None).await.unwrap();
    assert_eq!(c.get("before/2", None).await.unwrap().kvs().len(), 1);
    let (code, body) = common::http_get(port, "/health");
    assert_eq!((code, body.as_str()), (200, r#"{"health":"true"}"#));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("skipping an undecodable entry"), "{text}");
}

/// Flags beyond what the engine can hold are refused at start with a clear message.
#[test]
fn flags_beyond_the_engines_limits_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("keel");
    for (flag, expect) in [
        ("--max-request-bytes=4294967295", "WAL record"),
        (
            "--auto-compaction-retention=18446744073709551615",
            "overflows",
        ),
        ("--election-timeout=60000", "50 seconds"),
    ] {
        let (code, err) = common::keel_refused(&data, &[flag]);
        assert_eq!(code, Some(2), "{flag}: {err}");
        assert!(err.contains(expect), "{flag}: {err}");
    }
    let _ = Duration::ZERO;
}

/// A listen URL whose port is taken stops the start with the reason: never a member that runs
/// without its listener (CI once met one: its port, briefly another test's, then refused).
#[test]
fn a_port_in_use_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let peer = format!("http://127.0.0.1:{port}");
    let (code, err) = common::keel_refused(
        &dir.path().join("data"),
        &[
            &format!("--listen-peer-urls={peer}"),
            &format!("--initial-advertise-peer-urls={peer}"),
            &format!("--initial-cluster=default={peer}"),
        ],
    );
    assert_ne!(code, Some(0));
    assert!(
        err.contains(&format!("cannot listen for peers on {peer}")),
        "{err}"
    );
    assert!(err.contains("Address already in use"), "{err}");
}

/// `/health` goes false when the member's disk hangs, even with no client writing: its check
/// goes through raft and the WAL, as etcd's QGET does; it comes back once the disk does.
#[test]
fn health_goes_false_while_the_wal_hangs() {
    let dir = tempfile::tempdir().unwrap();
    let (keel, stall) = common::keel_stallable(dir.path());
    let port = keel.port;
    common::wait_for("healthy", || {
        (common::http_get(port, "/health").0 == 200).then_some(())
    });
    std::fs::write(&stall, "3s").unwrap();
    let (code, body) = common::http_get(port, "/health");
    assert_eq!((code, body.as_str()), (503, "{\"health\":\"false\"}\n"));
    std::fs::remove_file(&stall).unwrap();
    common::wait_for("healthy again", || {
        (common::http_get(port, "/health").0 == 200).then_some(())
    });
}
