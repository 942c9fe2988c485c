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

fn run_session(endpoint: &str) -> Vec<String> {
    let mut out = Vec::new();
    for args in SESSION {
        let mut cmd = std::process::Command::new("etcdctl");
        cmd.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={endpoint}"))
            .arg("--dial-timeout=5s")
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

#[test]
fn etcdctl_auth_session_prints_what_etcd_prints() {
    let mut transcripts = Vec::new();
    for program in [env!("CARGO_BIN_EXE_keel"), "etcd"] {
        let data = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut child = server_command(program, data.path(), port, &[], &[])
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        wait_listening(&mut child, port, program);
        let server = Server {
            child,
            port,
            endpoint: format!("http://127.0.0.1:{port}"),
        };
        transcripts.push(run_session(&server.endpoint));
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
