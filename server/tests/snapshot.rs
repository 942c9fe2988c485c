//! Snapshots in etcd's format: `etcdctl snapshot save` against keel, `snapshot status`, and
//! `snapshot restore` into a data dir that etcd 3.4 serves with the same keys, revisions,
//! leases, compaction and HashKV.

mod common;

use std::process::{Command, Stdio};

use common::*;

fn ctl(endpoint: &str, args: &[&str]) -> String {
    ok(endpoint, args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keel_snapshots_restore_into_etcd_with_the_same_data() {
    let dir = tempfile::tempdir().unwrap();
    let keel = keel(&dir.path().join("keel"), free_port(), &[]);
    let e = keel.endpoint.clone();
    // Enough data for branch pages in the key bucket, a value over a page, deletes, a lease and
    // a compaction.
    let mut c = etcd_client::Client::connect([&e], None).await.unwrap();
    for i in 0..3000 {
        c.put(format!("key/{i:05}"), vec![b'v'; 100 + i % 300], None)
            .await
            .unwrap();
    }
    c.put("big", vec![b'b'; 20_000], None).await.unwrap();
    c.delete("key/00007", None).await.unwrap();
    let lease = c.lease_grant(3600, None).await.unwrap().id();
    c.put(
        "leased",
        "x",
        Some(etcd_client::PutOptions::new().with_lease(lease)),
    )
    .await
    .unwrap();
    c.compact(1500, None).await.unwrap();
    c.put("last", "y", None).await.unwrap();
    let hash = hashkv(&e, &[]);
    let revision = c
        .get("last", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();

    let file = dir.path().join("snap.db");
    let saved = ctl(&e, &["snapshot", "save", file.to_str().unwrap()]);
    assert!(saved.contains("Snapshot saved at"), "{saved}");
    let status = ctl(
        &e,
        &["snapshot", "status", file.to_str().unwrap(), "-w", "json"],
    );
    assert!(
        status.contains(&format!("\"revision\":{revision}")),
        "{status}"
    );

    // Restore for etcd, and serve it.
    let (port, peer) = (free_port(), free_port());
    let peer_url = format!("http://127.0.0.1:{peer}");
    let restored = dir.path().join("restored");
    let out = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["snapshot", "restore", file.to_str().unwrap()])
        .arg(format!("--data-dir={}", restored.display()))
        .args(["--name", "r1"])
        .arg(format!("--initial-cluster=r1={peer_url}"))
        .arg(format!("--initial-advertise-peer-urls={peer_url}"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let endpoint = format!("http://127.0.0.1:{port}");
    let mut child = Command::new("etcd")
        .args(["--name", "r1"])
        .arg(format!("--data-dir={}", restored.display()))
        .arg(format!("--listen-client-urls={endpoint}"))
        .arg(format!("--advertise-client-urls={endpoint}"))
        .arg(format!("--listen-peer-urls={peer_url}"))
        .arg(format!("--initial-advertise-peer-urls={peer_url}"))
        .arg(format!("--initial-cluster=r1={peer_url}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_listening(&mut child, port, "etcd");
    let _etcd = Server {
        child,
        port,
        endpoint: endpoint.clone(),
    };
    assert_eq!(hashkv(&endpoint, &[]), hash, "HashKV");
    let mut r = etcd_client::Client::connect([&endpoint], None)
        .await
        .unwrap();
    let got = r.get("last", None).await.unwrap();
    assert_eq!(got.header().unwrap().revision(), revision);
    assert_eq!(got.kvs()[0].mod_revision(), revision);
    for (k, n) in [("key/00001", 1), ("key/00007", 0), ("big", 1)] {
        assert_eq!(r.get(k, None).await.unwrap().kvs().len(), n, "{k}");
    }
    assert_eq!(
        r.get("big", None).await.unwrap().kvs()[0].value().len(),
        20_000
    );
    let count = r
        .get(
            "key/",
            Some(
                etcd_client::GetOptions::new()
                    .with_prefix()
                    .with_count_only(),
            ),
        )
        .await
        .unwrap()
        .count();
    assert_eq!(count, 2999);
    // The lease and its key came along; compacted history stays compacted.
    let ttl = r
        .lease_time_to_live(
            lease,
            Some(etcd_client::LeaseTimeToLiveOptions::new().with_keys()),
        )
        .await
        .unwrap();
    assert_eq!(ttl.keys(), &[b"leased".to_vec()]);
    let old = r
        .get(
            "key/00001",
            Some(etcd_client::GetOptions::new().with_revision(100)),
        )
        .await;
    assert!(
        old.unwrap_err()
            .to_string()
            .contains("required revision has been compacted"),
        "compaction carried over"
    );
    // etcd writes on it.
    r.put("after", "restore", None).await.unwrap();
}
