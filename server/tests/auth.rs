//! Authentication and RBAC end to end: the same etcdctl session against keel and etcd 3.4,
//! compared line by line, and auth in a 3-member cluster.

mod common;

use common::*;

/// The session: root, `auth enable`, users and roles, reads and writes inside and outside the
/// granted ranges, wrong passwords, the root rules, `auth disable`.
const SESSION: &[&[&str]] = &[
    &["user", "add", "root:rootpw"],
    &["auth", "enable"],
    &["put", "a", "1"],
    &["--user=root:rootpw", "put", "a", "1"],
    &["--user=root:rootpw", "user", "add", "alice:pw"],
    &["--user=root:rootpw", "user", "add", "bob", "--no-password"],
    &["--user=root:rootpw", "role", "add", "r1"],
    &["--user=root:rootpw", "role", "add", "r1"],
    &[
        "--user=root:rootpw",
        "role",
        "grant-permission",
        "--prefix",
        "r1",
        "readwrite",
        "foo/",
    ],
    &[
        "--user=root:rootpw",
        "role",
        "grant-permission",
        "r1",
        "read",
        "bar",
    ],
    &[
        "--user=root:rootpw",
        "role",
        "grant-permission",
        "r1",
        "write",
        "w1",
        "w3",
    ],
    &["--user=root:rootpw", "user", "grant-role", "alice", "r1"],
    &["--user=root:rootpw", "user", "grant-role", "alice", "nope"],
    &["--user=alice:pw", "put", "foo/x", "1"],
    &["--user=alice:pw", "put", "bar", "1"],
    &["--user=alice:pw", "get", "bar"],
    &["--user=alice:pw", "get", "foo/", "--prefix"],
    &["--user=alice:pw", "get", "", "--from-key"],
    // The empty key is refused as such before any permission is checked.
    &["--user=alice:pw", "get", ""],
    &["--user=alice:pw", "get", "", "--consistency=s"],
    &["--user=alice:pw", "del", "w1", "w3"],
    &["--user=alice:pw", "del", "w1", "w4"],
    &["--user=alice:pw", "txn"],
    &["--user=root:rootpw", "role", "get", "r1"],
    &["--user=root:rootpw", "user", "get", "alice"],
    &["--user=alice:pw", "user", "get", "alice"],
    &["--user=alice:pw", "user", "get", "root"],
    &["--user=alice:pw", "role", "get", "r1"],
    &["--user=root:rootpw", "user", "list"],
    &["--user=root:rootpw", "role", "list"],
    &["--user=alice:pw", "user", "list"],
    &["--user=alice:wrong", "get", "foo/x"],
    &["--user=nobody:pw", "get", "foo/x"],
    &["--user=bob:x", "get", "foo/x"],
    &["--user=alice:pw", "compaction", "1"],
    &["--user=alice:pw", "defrag"],
    &[
        "--user=root:rootpw",
        "role",
        "revoke-permission",
        "r1",
        "foo/",
        "--prefix",
    ],
    &[
        "--user=root:rootpw",
        "role",
        "revoke-permission",
        "r1",
        "foo/",
        "--prefix",
    ],
    &["--user=alice:pw", "put", "foo/y", "2"],
    &[
        "--user=root:rootpw",
        "user",
        "passwd",
        "alice",
        "--interactive=false",
    ],
    &["--user=root:rootpw", "user", "revoke-role", "alice", "r1"],
    &["--user=root:rootpw", "user", "revoke-role", "alice", "r1"],
    &["--user=root:rootpw", "user", "revoke-role", "root", "root"],
    &["--user=root:rootpw", "user", "delete", "root"],
    &["--user=root:rootpw", "role", "delete", "root"],
    &["--user=root:rootpw", "role", "delete", "r1"],
    &["--user=root:rootpw", "user", "delete", "alice"],
    &["--user=root:rootpw", "user", "get", "alice"],
    &["--user=root:rootpw", "auth", "disable"],
    &["put", "a", "2"],
    &["user", "list"],
    &["role", "list"],
    &["auth", "enable"],
    &["get", "a"],
];

fn run_session(endpoint: &str, tls: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for args in SESSION {
        let mut cmd = std::process::Command::new("etcdctl");
        cmd.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={endpoint}"))
            .arg("--dial-timeout=5s")
            .args(tls)
            .args(*args);
        // alice's txn compares foo/x (readable) and puts bar (not writable); `passwd` reads
        // the new password.
        let mut child = cmd
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .stdin(if args.contains(&"txn") || args.contains(&"passwd") {
                std::process::Stdio::piped()
            } else {
                std::process::Stdio::null()
            })
            .spawn()
            .expect("etcdctl");
        if let Some(mut stdin) = child.stdin.take() {
            use std::io::Write as _;
            let input: &[u8] = if args.contains(&"txn") {
                b"value(\"foo/x\") = \"1\"\n\nput bar 2\n\n\n"
            } else {
                b"newpw\n"
            };
            stdin.write_all(input).unwrap();
        }
        let o = child.wait_with_output().unwrap();
        let text = if o.status.success() {
            String::from_utf8_lossy(&o.stdout).into_owned()
        } else {
            String::from_utf8_lossy(&o.stderr)
                .lines()
                .filter(|l| l.starts_with("Error:"))
                .collect::<Vec<_>>()
                .join("\n")
        };
        out.push(format!("{args:?} -> {} {text}", o.status.success()));
    }
    out
}

/// The session over plain HTTP, and over TLS (the server's certificate from a test CA, the
/// client checking it), against keel and etcd.
#[test]
fn etcdctl_auth_session_prints_what_etcd_prints() {
    for tls in [false, true] {
        session_against_both(tls);
    }
}

fn session_against_both(tls: bool) {
    let certs = tempfile::tempdir().unwrap();
    let ca = common::certs::Ca::new(certs.path(), "ca");
    let (cert, key) = ca.sign(certs.path(), "server", "server", &["127.0.0.1"]);
    let mut transcripts = Vec::new();
    for program in [env!("CARGO_BIN_EXE_keel"), "etcd"] {
        let data = tempfile::tempdir().unwrap();
        let port = free_port();
        let scheme = if tls { "https" } else { "http" };
        let endpoint = format!("{scheme}://127.0.0.1:{port}");
        let mut flags = vec![
            format!("--listen-client-urls={endpoint}"),
            format!("--advertise-client-urls={endpoint}"),
        ];
        let mut client = Vec::new();
        if tls {
            flags.push(format!("--cert-file={}", cert.display()));
            flags.push(format!("--key-file={}", key.display()));
            client.push(format!("--cacert={}", ca.path.display()));
        }
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let server = start_server(program, data.path(), port, scheme, &flags);
        assert_eq!(server.endpoint, endpoint);
        transcripts.push(run_session(&server.endpoint, &client));
    }
    let (keel, etcd) = (&transcripts[0], &transcripts[1]);
    for (k, e) in keel.iter().zip(etcd) {
        assert_eq!(k, e);
    }
    assert_eq!(keel.len(), SESSION.len());
    // Not an empty agreement: the denials are there.
    let text = keel.join("\n");
    assert!(
        text.contains("Error: etcdserver: permission denied"),
        "{text}"
    );
    assert!(
        text.contains("Error: etcdserver: user name is empty"),
        "{text}"
    );
    assert!(text.contains("Authentication Enabled"), "{text}");
}

/// Users and roles made through one member hold on every member: a token from Authenticate on
/// one is good on the others, and each enforces the same permissions.
#[test]
fn auth_holds_on_every_member_of_a_cluster() {
    let mut c = Cluster::start(3, &[]);
    c.wait_leader();
    let endpoints = c.endpoints();
    let e = |i: usize| endpoints[i].clone();
    for args in [
        &["user", "add", "root:rootpw"][..],
        &["auth", "enable"],
        &["--user=root:rootpw", "user", "add", "carol:pw"],
        &["--user=root:rootpw", "role", "add", "app"],
        &[
            "--user=root:rootpw",
            "role",
            "grant-permission",
            "--prefix",
            "app",
            "readwrite",
            "app/",
        ],
        &["--user=root:rootpw", "user", "grant-role", "carol", "app"],
    ] {
        ok(&e(0), args);
    }
    for i in 0..3 {
        let (allowed, out) = etcdctl(&e(i), &["--user=carol:pw", "put", &format!("app/{i}"), "v"]);
        assert!(allowed, "member {i}: {out}");
        let (allowed, out) = etcdctl(&e(i), &["--user=carol:pw", "put", "other", "v"]);
        assert!(!allowed);
        assert_eq!(out, "Error: etcdserver: permission denied", "member {i}");
        let (allowed, out) = etcdctl(&e(i), &["get", "app/0"]);
        assert!(!allowed);
        assert_eq!(out, "Error: etcdserver: user name is empty", "member {i}");
    }
    let got = ok(
        &e(2),
        &["--user=carol:pw", "get", "app/", "--prefix", "--keys-only"],
    );
    assert_eq!(got, "app/0\n\napp/1\n\napp/2\n\n");
    // The auth state survives a restart of a member (it is in the backend, not in memory).
    c.kill(1);
    c.start_member(1);
    c.wait_leader();
    let (allowed, out) = etcdctl(
        &e(1),
        &["--user=carol:pw", "get", "app/1", "--print-value-only"],
    );
    assert!(allowed, "{out}");
    assert_eq!(out, "v\n");
    let (allowed, _) = etcdctl(&e(1), &["get", "app/1"]);
    assert!(!allowed);
}

/// The etcd-client crate's auth API against keel and etcd: the same calls give the same
/// answers. A watch opened by a user keeps its events after the user's role is revoked (etcd
/// checks a watch when it is made), and a new one is refused with etcd's cancel reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_client_auth_api_and_a_watch_whose_role_is_revoked() {
    use etcd_client::{Client, ConnectOptions, GetOptions, Permission, WatchOptions};
    let mut records = Vec::new();
    for program in [env!("CARGO_BIN_EXE_keel"), "etcd"] {
        let data = tempfile::tempdir().unwrap();
        let port = free_port();
        let _server = start_server(program, data.path(), port, "http", &[]);
        let endpoint = format!("127.0.0.1:{port}");
        let mut rec = Vec::new();
        let admin = Client::connect([&endpoint], None).await.unwrap();
        let mut auth = admin.auth_client();
        auth.user_add("root", "rootpw", None).await.unwrap();
        auth.user_grant_role("root", "root").await.unwrap();
        auth.role_add("watchers").await.unwrap();
        auth.role_grant_permission("watchers", Permission::read("w/").with_prefix())
            .await
            .unwrap();
        auth.user_add("dave", "pw", None).await.unwrap();
        auth.user_grant_role("dave", "watchers").await.unwrap();
        auth.auth_enable().await.unwrap();
        let with = |u: &str, p: &str| ConnectOptions::new().with_user(u, p);
        let mut root = Client::connect([&endpoint], Some(with("root", "rootpw")))
            .await
            .unwrap();
        let mut dave = Client::connect([&endpoint], Some(with("dave", "pw")))
            .await
            .unwrap();
        let wrong = Client::connect([&endpoint], Some(with("dave", "nope"))).await;
        rec.push(format!(
            "wrong password: {:?}",
            wrong.err().map(|e| e.to_string())
        ));
        let roles = root.auth_client().user_get("dave").await.unwrap();
        rec.push(format!("dave's roles: {:?}", roles.roles()));
        let perms = root.auth_client().role_get("watchers").await.unwrap();
        rec.push(format!("watchers: {:?}", perms.permissions()));

        let mut events = dave
            .watch("w/", Some(WatchOptions::new().with_prefix()))
            .await
            .unwrap();
        let created = events.message().await.unwrap().unwrap();
        rec.push(format!(
            "watch created: {} canceled: {}",
            created.created(),
            created.canceled()
        ));
        root.put("w/1", "a", None).await.unwrap();
        let got = events.message().await.unwrap().unwrap();
        rec.push(format!(
            "event: {:?}",
            got.events()
                .iter()
                .map(|e| e.kv().map(|kv| kv.key().to_vec()))
                .collect::<Vec<_>>()
        ));
        let read = dave.get("w/1", None).await.map(|r| r.kvs().len());
        rec.push(format!("dave reads w/1: {read:?}"));
        let denied = dave
            .put("w/2", "b", None)
            .await
            .err()
            .map(|e| e.to_string());
        rec.push(format!("dave writes w/2: {denied:?}"));

        root.auth_client()
            .user_revoke_role("dave", "watchers")
            .await
            .unwrap();
        root.put("w/3", "c", None).await.unwrap();
        let after = events.message().await.unwrap().unwrap();
        rec.push(format!(
            "after the revoke, the open watch sees: {:?}",
            after
                .events()
                .iter()
                .map(|e| e.kv().map(|kv| kv.key().to_vec()))
                .collect::<Vec<_>>()
        ));
        let read = dave
            .get("w/", Some(GetOptions::new().with_prefix()))
            .await
            .map(|r| r.kvs().len())
            .map_err(|e| e.to_string());
        rec.push(format!("dave reads w/ after the revoke: {read:?}"));
        let mut refused = dave
            .watch("w/", Some(WatchOptions::new().with_prefix()))
            .await
            .unwrap();
        let first = refused.message().await.unwrap().unwrap();
        rec.push(format!(
            "a new watch: created {} canceled {} reason {:?}",
            first.created(),
            first.canceled(),
            first.cancel_reason()
        ));
        records.push(rec);
    }
    let (keel, etcd) = (&records[0], &records[1]);
    for (k, e) in keel.iter().zip(etcd) {
        assert_eq!(k, e);
    }
    assert_eq!(keel.len(), etcd.len());
    assert!(
        keel.iter().any(|l| l.contains("PermissionDenied")),
        "{keel:#?}"
    );
}

/// JWT tokens (`--auth-token jwt,...`): etcdctl works with them, and a token signed with another
/// key, a malformed one, an expired one and one from before an auth change are refused with
/// etcd's errors, on keel as on etcd.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_tokens_and_bad_tokens_as_etcd_refuses_them() {
    use keel_proto::etcdserverpb as pb;
    let dir = tempfile::tempdir().unwrap();
    let key = |name: &str| {
        let private = dir.path().join(format!("{name}.pem"));
        let public = dir.path().join(format!("{name}.pub"));
        let ok = std::process::Command::new("openssl")
            .args(["genrsa", "-out"])
            .arg(&private)
            .arg("2048")
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap()
            .success()
            && std::process::Command::new("openssl")
                .args(["rsa", "-pubout", "-in"])
                .arg(&private)
                .arg("-out")
                .arg(&public)
                .stderr(std::process::Stdio::null())
                .status()
                .unwrap()
                .success();
        assert!(ok, "openssl");
        (private, public)
    };
    let (private, public) = key("server");
    let (other, _) = key("other");
    let flag = format!(
        "--auth-token=jwt,pub-key={},priv-key={},sign-method=RS256,ttl=10m",
        public.display(),
        private.display()
    );
    #[derive(serde::Serialize)]
    struct Claims {
        username: String,
        revision: u64,
        exp: u64,
    }
    let forge = |key: &std::path::Path, revision: u64, exp: u64| {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
            &Claims {
                username: "root".into(),
                revision,
                exp,
            },
            &jsonwebtoken::EncodingKey::from_rsa_pem(&std::fs::read(key).unwrap()).unwrap(),
        )
        .unwrap()
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut records = Vec::new();
    for program in [env!("CARGO_BIN_EXE_keel"), "etcd"] {
        let data = tempfile::tempdir().unwrap();
        let port = free_port();
        let server = start_server(program, data.path(), port, "http", &[&flag]);
        let mut rec = Vec::new();
        for args in [
            &["user", "add", "root:rootpw"][..],
            &["auth", "enable"],
            &["--user=root:rootpw", "put", "k", "v"],
            &["--user=root:rootpw", "get", "k", "--print-value-only"],
        ] {
            rec.push(format!("{:?}", etcdctl(&server.endpoint, args)));
        }
        let mut kv = pb::kv_client::KvClient::connect(server.endpoint.clone())
            .await
            .unwrap();
        let mut auth = pb::auth_client::AuthClient::connect(server.endpoint.clone())
            .await
            .unwrap();
        let good = auth
            .authenticate(pb::AuthenticateRequest {
                name: "root".into(),
                password: "rootpw".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .token;
        let mut get = async |token: &str| {
            let mut r = tonic::Request::new(pb::RangeRequest {
                key: b"k".to_vec(),
                ..Default::default()
            });
            r.metadata_mut().insert("token", token.parse().unwrap());
            match kv.range(r).await {
                Ok(resp) => format!("ok {}", resp.into_inner().kvs.len()),
                Err(s) => format!("{:?} {}", s.code(), s.message()),
            }
        };
        rec.push(format!("good: {}", get(&good).await));
        rec.push(format!(
            "other key: {}",
            get(&forge(&other, 2, now + 600)).await
        ));
        rec.push(format!("malformed: {}", get("not-a-token").await));
        rec.push(format!(
            "expired: {}",
            get(&forge(&private, 2, now - 120)).await
        ));
        // Alarm checks no permission, but a token it carries must be valid (etcd checks it
        // when proposing, and answers with the auth package's error as it is).
        let mut maintenance =
            pb::maintenance_client::MaintenanceClient::connect(server.endpoint.clone())
                .await
                .unwrap();
        let mut alarms = async |token: Option<&str>| {
            let mut r = tonic::Request::new(pb::AlarmRequest::default());
            if let Some(token) = token {
                r.metadata_mut().insert("token", token.parse().unwrap());
            }
            match maintenance.alarm(r).await {
                Ok(resp) => format!("ok {}", resp.into_inner().alarms.len()),
                Err(s) => format!("{:?} {}", s.code(), s.message()),
            }
        };
        rec.push(format!("alarm, no token: {}", alarms(None).await));
        rec.push(format!(
            "alarm, other key: {}",
            alarms(Some(&forge(&other, 2, now + 600))).await
        ));
        // Any auth change makes older JWTs stale.
        rec.push(format!(
            "{:?}",
            etcdctl(
                &server.endpoint,
                &["--user=root:rootpw", "user", "add", "u:pw"]
            )
        ));
        rec.push(format!("after a change: {}", get(&good).await));
        records.push(rec);
    }
    assert_eq!(records[0], records[1]);
    let text = records[0].join("\n");
    assert!(
        text.contains("other key: Unauthenticated etcdserver: invalid auth token"),
        "{text}"
    );
    assert!(
        text.contains("expired: Unauthenticated etcdserver: invalid auth token"),
        "{text}"
    );
    assert!(text.contains("good: ok 1"), "{text}");
    assert!(
        text.contains("alarm, other key: Unknown auth: invalid auth token"),
        "{text}"
    );
}

/// LeaseTimeToLive lists a lease's keys only to a caller who may read each of them (etcd
/// 3.4.26's fix of CVE-2023-32082; the Debian etcd 3.4.23 still lists them to anyone, so this
/// runs against keel alone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_keys_are_listed_only_to_who_may_read_them() {
    use etcd_client::{Client, ConnectOptions, LeaseTimeToLiveOptions, Permission, PutOptions};
    let data = tempfile::tempdir().unwrap();
    let port = free_port();
    let _server = start_server(env!("CARGO_BIN_EXE_keel"), data.path(), port, "http", &[]);
    let endpoint = format!("127.0.0.1:{port}");
    let admin = Client::connect([&endpoint], None).await.unwrap();
    let mut auth = admin.auth_client();
    auth.user_add("root", "rootpw", None).await.unwrap();
    auth.user_grant_role("root", "root").await.unwrap();
    auth.role_add("readers").await.unwrap();
    auth.role_grant_permission("readers", Permission::read("pub/").with_prefix())
        .await
        .unwrap();
    auth.user_add("eve", "pw", None).await.unwrap();
    auth.user_grant_role("eve", "readers").await.unwrap();
    auth.auth_enable().await.unwrap();
    let with = |u: &str, p: &str| ConnectOptions::new().with_user(u, p);
    let mut root = Client::connect([&endpoint], Some(with("root", "rootpw")))
        .await
        .unwrap();
    let mut eve = Client::connect([&endpoint], Some(with("eve", "pw")))
        .await
        .unwrap();
    let lease = root.lease_grant(60, None).await.unwrap().id();
    root.put("pub/1", "a", Some(PutOptions::new().with_lease(lease)))
        .await
        .unwrap();
    let keys = || Some(LeaseTimeToLiveOptions::new().with_keys());
    let r = eve.lease_time_to_live(lease, keys()).await.unwrap();
    assert_eq!(r.keys(), &[b"pub/1".to_vec()]);
    root.put("secret/1", "b", Some(PutOptions::new().with_lease(lease)))
        .await
        .unwrap();
    let e = eve
        .lease_time_to_live(lease, keys())
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("permission denied"), "{e}");
    // Without the keys, and for root, as before.
    assert!(eve.lease_time_to_live(lease, None).await.unwrap().ttl() > 0);
    let r = root.lease_time_to_live(lease, keys()).await.unwrap();
    assert_eq!(r.keys().len(), 2);
}
