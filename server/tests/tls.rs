//! TLS end to end: etcdctl against keel and etcd 3.4 with the same certificates, a 3-member
//! cluster with peer TLS and client-certificate auth, auto TLS, refused setups, and certificate
//! rotation without a restart.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::certs::Ca;
use common::*;

/// A CA and the certificates of one test: a server/peer certificate for 127.0.0.1 (CN
/// `member`), a client certificate (CN `root`), and a client certificate of another CA.
struct Certs {
    dir: tempfile::TempDir,
    signer: Ca,
    ca: PathBuf,
    server: (PathBuf, PathBuf),
    client: (PathBuf, PathBuf),
    rogue: (PathBuf, PathBuf),
}

impl Certs {
    fn new() -> Certs {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new(dir.path(), "ca");
        let other = Ca::new(dir.path(), "other-ca");
        let server = ca.sign(dir.path(), "member", "member", &["127.0.0.1", "localhost"]);
        let client = ca.sign(dir.path(), "client", "root", &[]);
        let rogue = other.sign(dir.path(), "rogue", "root", &[]);
        Certs {
            ca: ca.path.clone(),
            signer: ca,
            server,
            client,
            rogue,
            dir,
        }
    }

    fn p(path: &Path) -> String {
        path.display().to_string()
    }

    /// The server flags: client certificates required.
    fn server_flags(&self, https: u16, http: u16) -> Vec<String> {
        vec![
            format!("--listen-client-urls=https://127.0.0.1:{https},http://127.0.0.1:{http}"),
            format!("--advertise-client-urls=https://127.0.0.1:{https}"),
            format!("--cert-file={}", Self::p(&self.server.0)),
            format!("--key-file={}", Self::p(&self.server.1)),
            format!("--trusted-ca-file={}", Self::p(&self.ca)),
            "--client-cert-auth".into(),
        ]
    }

    /// etcdctl's flags for a client with `cert` (or none).
    fn client_flags(&self, cert: Option<&(PathBuf, PathBuf)>) -> Vec<String> {
        let mut f = vec![
            format!("--cacert={}", Self::p(&self.ca)),
            "--dial-timeout=2s".into(),
            "--command-timeout=3s".into(),
        ];
        if let Some((c, k)) = cert {
            f.push(format!("--cert={}", Self::p(c)));
            f.push(format!("--key={}", Self::p(k)));
        }
        f
    }
}

fn start(program: &str, data: &Path, flags: &[String], https: u16) -> Server {
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    start_server(program, data, https, "https", &flags)
}

/// etcdctl against `endpoint` with `tls` flags, then `args`.
fn ctl(endpoint: &str, tls: &[String], args: &[&str]) -> (bool, String) {
    let mut all: Vec<&str> = tls.iter().map(String::as_str).collect();
    all.extend_from_slice(args);
    etcdctl(endpoint, &all)
}

/// The same etcdctl session, over TLS with client certificates, against keel and etcd: the
/// outputs are compared line by line.
#[test]
fn etcdctl_over_tls_prints_what_etcd_prints() {
    let certs = Certs::new();
    let mut transcripts = Vec::new();
    for program in [env!("CARGO_BIN_EXE_keel"), "etcd"] {
        let data = tempfile::tempdir().unwrap();
        let (https, http) = (free_port(), free_port());
        let server = start(
            program,
            data.path(),
            &certs.server_flags(https, http),
            https,
        );
        let endpoint = server.endpoint.clone();
        let good = certs.client_flags(Some(&certs.client));
        let wait = |args: &[&str]| {
            wait_for("the first write", || {
                let (ok, out) = ctl(&endpoint, &good, args);
                ok.then_some(out)
            })
        };
        let mut t = vec![wait(&["put", "tls/a", "1"])];
        for args in [
            &["put", "tls/b", "2"][..],
            &["get", "tls/", "--prefix"],
            &["get", "tls/a", "--print-value-only"],
            &["del", "tls/a"],
        ] {
            let (ok, out) = ctl(&endpoint, &good, args);
            t.push(format!("{ok} {out}"));
        }
        // No client certificate, and one from another CA: refused at the handshake.
        t.push(format!(
            "{:?}",
            ctl(&endpoint, &certs.client_flags(None), &["get", "tls/b"])
        ));
        t.push(format!(
            "{:?}",
            ctl(
                &endpoint,
                &certs.client_flags(Some(&certs.rogue)),
                &["get", "tls/b"]
            )
        ));
        // The plain URL beside it serves the same store.
        let plain = format!("http://127.0.0.1:{http}");
        t.push(format!(
            "{:?}",
            etcdctl(&plain, &["get", "tls/b", "--print-value-only"])
        ));
        // Health over https.
        let (ok, out) = ctl(&endpoint, &good, &["endpoint", "health"]);
        let health = out.split(": took").next().unwrap_or_default().to_string();
        t.push(format!("{ok} {}", health.replace(&endpoint, "ENDPOINT")));
        transcripts.push(t);
    }
    let (keel, etcd) = (&transcripts[0], &transcripts[1]);
    for (k, e) in keel.iter().zip(etcd) {
        assert_eq!(k, e);
    }
    assert_eq!(keel.len(), etcd.len());
    // The refusals are refusals, not empty successes that happen to match.
    assert!(keel[5].starts_with("(false,"), "{}", keel[5]);
    assert!(keel[6].starts_with("(false,"), "{}", keel[6]);
    assert_eq!(keel[7], "(true, \"2\\n\")");
}

/// Three members whose peers talk TLS and check each other's certificates (with
/// `--peer-cert-allowed-cn`), serving clients over TLS with client-certificate auth.
#[test]
fn three_members_with_peer_tls_and_client_cert_auth() {
    let certs = Certs::new();
    let p = Certs::p;
    let flags = [
        format!("--peer-cert-file={}", p(&certs.server.0)),
        format!("--peer-key-file={}", p(&certs.server.1)),
        format!("--peer-trusted-ca-file={}", p(&certs.ca)),
        "--peer-client-cert-auth".into(),
        "--peer-cert-allowed-cn=member".into(),
        format!("--cert-file={}", p(&certs.server.0)),
        format!("--key-file={}", p(&certs.server.1)),
        format!("--trusted-ca-file={}", p(&certs.ca)),
        "--client-cert-auth".into(),
    ];
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let mut c = Cluster::new(3, &flags);
    c.peer_scheme = "https";
    c.client_scheme = "https";
    for i in 0..3 {
        c.start_member(i);
    }
    let good = certs.client_flags(Some(&certs.client));
    wait_for("a write through member 1", || {
        ctl(&c.endpoint(0), &good, &["put", "k", "v"])
            .0
            .then_some(())
    });
    // Replicated to the others, and linearizable reads there go through the leader.
    for i in 1..3 {
        let out = wait_for("the write on every member", || {
            let (ok, out) = ctl(
                &c.endpoint(i),
                &good,
                &["get", "k", "--consistency=s", "--print-value-only"],
            );
            (ok && out == "v\n").then_some(out)
        });
        assert_eq!(out, "v\n");
        let (ok, out) = ctl(&c.endpoint(i), &good, &["get", "k", "--print-value-only"]);
        assert!(ok, "{out}");
        assert_eq!(out, "v\n");
    }
    let (ok, list) = ctl(&c.endpoint(2), &good, &["member", "list"]);
    assert!(ok, "{list}");
    for i in 0..3 {
        assert!(list.contains(&c.peer_url(i)), "{list}");
        assert!(c.peer_url(i).starts_with("https://"));
    }
    // A client without a certificate gets nothing.
    let (ok, _) = ctl(&c.endpoint(1), &certs.client_flags(None), &["get", "k"]);
    assert!(!ok);
}

/// `--auto-tls` and `--peer-auto-tls`: self-signed certificates made at the first start, in
/// `<data-dir>/fixtures`, on both sides of a 3-member cluster.
#[test]
fn auto_tls_on_clients_and_peers() {
    let mut c = Cluster::new(3, &["--auto-tls", "--peer-auto-tls"]);
    c.peer_scheme = "https";
    c.client_scheme = "https";
    for i in 0..3 {
        c.start_member(i);
    }
    // etcdctl 3.4 dials without TLS unless told `--insecure-transport=false`.
    let insecure = vec![
        "--insecure-transport=false".to_string(),
        "--insecure-skip-tls-verify".to_string(),
        "--dial-timeout=2s".into(),
        "--command-timeout=3s".into(),
    ];
    wait_for("a write", || {
        ctl(&c.endpoint(0), &insecure, &["put", "auto", "tls"])
            .0
            .then_some(())
    });
    let out = wait_for("the write on member 3", || {
        let (ok, out) = ctl(
            &c.endpoint(2),
            &insecure,
            &["get", "auto", "--consistency=s", "--print-value-only"],
        );
        (ok && out == "tls\n").then_some(out)
    });
    assert_eq!(out, "tls\n");
    for side in ["client", "peer"] {
        let dir = c.data_dir(0).join("fixtures").join(side);
        assert!(dir.join("cert.pem").exists(), "{}", dir.display());
        assert!(dir.join("key.pem").exists(), "{}", dir.display());
    }
    // Plain-text clients are refused on an https URL (the handshake fails).
    let (ok, _) = etcdctl(
        &c.endpoint(1).replace("https", "http"),
        &["--dial-timeout=2s", "--command-timeout=3s", "get", "auto"],
    );
    assert!(!ok);
}

/// What cannot work stops the start with a message that says why, and no panic.
#[test]
fn bad_tls_setups_refuse_to_start() {
    let certs = Certs::new();
    let p = |x: &Path| x.display().to_string();
    let port = free_port();
    let https = format!("--listen-client-urls=https://127.0.0.1:{port}");
    let adv = format!("--advertise-client-urls=https://127.0.0.1:{port}");
    let cert = format!("--cert-file={}", p(&certs.server.0));
    let key = format!("--key-file={}", p(&certs.server.1));
    let wrong_key = format!("--key-file={}", p(&certs.client.1));
    let missing = format!(
        "--trusted-ca-file={}",
        p(&certs.dir.path().join("nope.pem"))
    );
    let cases: Vec<(Vec<&str>, String)> = vec![
        (
            vec![&https, &adv],
            format!(
                "TLS key/cert (--cert-file, --key-file) must be provided for client url \
                 https://127.0.0.1:{port} with HTTPS scheme"
            ),
        ),
        (
            vec![&https, &adv, &cert],
            "the client TLS certificate and key are given together".into(),
        ),
        (
            vec![&https, &adv, &cert, &wrong_key],
            "does not match the certificate in".into(),
        ),
        (
            vec![&https, &adv, &cert, &key, &missing],
            "cannot read trusted CA file".into(),
        ),
        (
            vec![&https, &adv, &cert, &key, "--client-cert-auth"],
            "needs a trusted CA file".into(),
        ),
        (
            vec![
                &https,
                &adv,
                &cert,
                &key,
                "--cipher-suites=TLS_RSA_WITH_AES_128_CBC_SHA",
            ],
            "is not supported by Keel".into(),
        ),
        (
            vec!["--cipher-suites=TLS_MADE_UP"],
            "unexpected TLS cipher suite \"TLS_MADE_UP\"".into(),
        ),
        (
            vec!["--peer-cert-allowed-cn=a", "--peer-cert-allowed-hostname=b"],
            "AllowedCN and AllowedHostname are mutually exclusive".into(),
        ),
    ];
    for (flags, want) in cases {
        let data = tempfile::tempdir().unwrap();
        let (code, err) = keel_refused(data.path(), &flags);
        assert!(
            matches!(code, Some(c) if c != 0),
            "{flags:?}: {code:?} {err}"
        );
        assert!(err.contains(&want), "{flags:?}: want {want:?} in:\n{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

/// The certificate a TLS server on `port` presents: its subject line, as openssl prints it.
fn served_subject(port: u16, certs: &Certs) -> String {
    let p = Certs::p;
    let out = Command::new("openssl")
        .args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
        .args(["-CAfile", &p(&certs.ca)])
        .args(["-cert", &p(&certs.client.0), "-key", &p(&certs.client.1)])
        .stdin(Stdio::null())
        .output()
        .expect("openssl");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.starts_with("subject="))
        .unwrap_or_default()
        .to_string()
}

/// Certificates replaced on disk are used by the next connection, without a restart.
#[test]
fn rotated_certificates_apply_to_new_connections() {
    let certs = Certs::new();
    let ca = Ca::new(certs.dir.path(), "rotation-ca");
    let (cert, key) = ca.sign(certs.dir.path(), "live", "first", &["127.0.0.1"]);
    // The clients trust both CAs.
    let bundle = certs.dir.path().join("bundle.pem");
    let mut pem = std::fs::read(&certs.ca).unwrap();
    pem.extend(std::fs::read(&ca.path).unwrap());
    std::fs::write(&bundle, pem).unwrap();
    let data = tempfile::tempdir().unwrap();
    let (https, http) = (free_port(), free_port());
    let flags = vec![
        format!("--listen-client-urls=https://127.0.0.1:{https},http://127.0.0.1:{http}"),
        format!("--advertise-client-urls=https://127.0.0.1:{https}"),
        format!("--cert-file={}", cert.display()),
        format!("--key-file={}", key.display()),
        format!("--trusted-ca-file={}", bundle.display()),
        "--client-cert-auth".into(),
    ];
    let _server = start(env!("CARGO_BIN_EXE_keel"), data.path(), &flags, https);
    let certs_for_client = Certs {
        ca: bundle.clone(),
        ..certs
    };
    let first = served_subject(https, &certs_for_client);
    assert!(
        first.contains("CN=first") || first.contains("CN = first"),
        "{first}"
    );
    // The operator's rotation: new files renamed over the old ones.
    let (c2, k2) = ca.sign(
        certs_for_client.dir.path(),
        "next",
        "second",
        &["127.0.0.1"],
    );
    std::fs::rename(&k2, &key).unwrap();
    std::fs::rename(&c2, &cert).unwrap();
    let second = served_subject(https, &certs_for_client);
    assert!(
        second.contains("CN=second") || second.contains("CN = second"),
        "{second}"
    );
    let (ok, out) = ctl(
        &format!("https://127.0.0.1:{https}"),
        &certs_for_client.client_flags(Some(&certs_for_client.client)),
        &["put", "after", "rotation"],
    );
    assert!(ok, "{out}");
}

/// Under `--client-cert-auth`, a request without a token is the user its certificate names
/// (CN), as in etcd: the same session against keel and etcd.
#[test]
fn the_client_certificate_common_name_is_the_user() {
    let certs = Certs::new();
    // Signed by the CA the server trusts.
    let alice = certs_sign(&certs, "alice");
    let mut transcripts = Vec::new();
    for program in [env!("CARGO_BIN_EXE_keel"), "etcd"] {
        let data = tempfile::tempdir().unwrap();
        let (https, http) = (free_port(), free_port());
        let server = start(
            program,
            data.path(),
            &certs.server_flags(https, http),
            https,
        );
        let root = certs.client_flags(Some(&certs.client));
        let as_alice = certs.client_flags(Some(&alice));
        let e = server.endpoint.clone();
        wait_for("the server to answer", || {
            ctl(&e, &root, &["get", "x"]).0.then_some(())
        });
        let mut t = Vec::new();
        for (who, args) in [
            (&root, &["user", "add", "root", "--no-password"][..]),
            (&root, &["user", "grant-role", "root", "root"]),
            (&root, &["user", "add", "alice", "--no-password"]),
            (&root, &["role", "add", "app"]),
            (
                &root,
                &[
                    "role",
                    "grant-permission",
                    "--prefix",
                    "app",
                    "readwrite",
                    "app/",
                ],
            ),
            (&root, &["user", "grant-role", "alice", "app"]),
            (&root, &["auth", "enable"]),
            (&root, &["put", "top", "1"]),
            (&as_alice, &["put", "app/1", "1"]),
            (&as_alice, &["put", "top", "2"]),
            (&as_alice, &["get", "app/", "--prefix"]),
            (&as_alice, &["user", "list"]),
            (&root, &["user", "list"]),
        ] {
            let (ok, out) = ctl(&e, who, args);
            t.push(format!("{args:?} {ok} {out}"));
        }
        transcripts.push(t);
    }
    assert_eq!(transcripts[0], transcripts[1]);
    let text = transcripts[0].join("\n");
    assert!(
        text.contains("\"top\", \"2\"] false Error: etcdserver: permission denied"),
        "{text}"
    );
}

/// `--client-cert-allowed-hostname`: only client certificates valid for that name get in, on
/// keel as on etcd.
#[test]
fn only_client_certificates_for_the_allowed_hostname_get_in() {
    let certs = Certs::new();
    let named = certs
        .signer
        .sign(certs.dir.path(), "named", "root", &["allowed.example"]);
    let mut outcomes = Vec::new();
    for program in [env!("CARGO_BIN_EXE_keel"), "etcd"] {
        let data = tempfile::tempdir().unwrap();
        let (https, http) = (free_port(), free_port());
        let mut flags = certs.server_flags(https, http);
        flags.push("--client-cert-allowed-hostname=allowed.example".into());
        let server = start(program, data.path(), &flags, https);
        let e = server.endpoint.clone();
        let with_name = certs.client_flags(Some(&named));
        wait_for("the server to answer", || {
            ctl(&e, &with_name, &["get", "x"]).0.then_some(())
        });
        let (ok_named, _) = ctl(&e, &with_name, &["put", "k", "v"]);
        let (ok_other, _) = ctl(
            &e,
            &certs.client_flags(Some(&certs.client)),
            &["put", "k", "w"],
        );
        outcomes.push((ok_named, ok_other));
    }
    assert_eq!(outcomes[0], (true, false), "keel");
    assert_eq!(outcomes[0], outcomes[1], "keel beside etcd");
}

/// A client certificate for `cn`, from the test's CA.
fn certs_sign(certs: &Certs, cn: &str) -> (PathBuf, PathBuf) {
    certs.signer.sign(certs.dir.path(), cn, cn, &[])
}

/// The JSON gateway over TLS with client certificates: served while auth is off; once auth is
/// on, a certificate with a CN is refused (400) with etcd's message, on keel as on etcd (its
/// gateway could not use the CN, and says so rather than ignore it).
#[test]
fn the_gateway_refuses_a_certificate_cn_once_auth_is_on() {
    let certs = Certs::new();
    let mut transcripts = Vec::new();
    for program in [env!("CARGO_BIN_EXE_keel"), "etcd"] {
        let data = tempfile::tempdir().unwrap();
        let (https, http) = (free_port(), free_port());
        let server = start(
            program,
            data.path(),
            &certs.server_flags(https, http),
            https,
        );
        let root = certs.client_flags(Some(&certs.client));
        let e = server.endpoint.clone();
        wait_for("the server to answer", || {
            ctl(&e, &root, &["get", "x"]).0.then_some(())
        });
        let curl = || {
            let out = std::process::Command::new("curl")
                .args(["-sS", "-m", "10", "-w", "\n%{http_code}", "-X", "POST"])
                .args(["--cacert", &Certs::p(&certs.ca)])
                .args(["--cert", &Certs::p(&certs.client.0)])
                .args(["--key", &Certs::p(&certs.client.1)])
                .args(["-d", r#"{"key":"eA=="}"#])
                .arg(format!("{e}/v3/kv/range"))
                .output()
                .expect("curl");
            let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
            if text.ends_with("000") {
                // curl got no answer: say why.
                text.push_str(&String::from_utf8_lossy(&out.stderr));
            }
            // Before auth, only whether it answered (the header's IDs differ).
            if text.contains("\"header\"") {
                text.lines().last().unwrap_or_default().to_string()
            } else {
                text
            }
        };
        let before = curl();
        for args in [
            &["user", "add", "root", "--no-password"][..],
            &["user", "grant-role", "root", "root"],
            &["auth", "enable"],
        ] {
            assert!(ctl(&e, &root, args).0, "{args:?}");
        }
        transcripts.push(format!("{before}\n{}", curl()));
    }
    assert_eq!(transcripts[0], transcripts[1]);
    assert_eq!(
        transcripts[0],
        "200\nCommonName of client sending a request against gateway will be ignored and not used as expected\n\n400"
    );
}

/// A peer URL refuses a client certificate that does not name the address it comes from
/// (etcd's `checkSAN`: a peer certificate copied to another host does not work there), unless
/// `--experimental-peer-skip-client-san-verification`.
#[test]
fn peer_certificates_must_name_the_address_they_connect_from() {
    let certs = Certs::new();
    let p = Certs::p;
    let elsewhere = certs
        .signer
        .sign(certs.dir.path(), "elsewhere", "member", &["10.9.9.9"]);
    for skip in [false, true] {
        let mut flags = vec![
            format!("--peer-cert-file={}", p(&certs.server.0)),
            format!("--peer-key-file={}", p(&certs.server.1)),
            format!("--peer-trusted-ca-file={}", p(&certs.ca)),
            "--peer-client-cert-auth".into(),
        ];
        if skip {
            flags.push("--experimental-peer-skip-client-san-verification".into());
        }
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let mut c = Cluster::new(1, &flags);
        c.peer_scheme = "https";
        c.start_member(0);
        let reaches = |cert: &(PathBuf, PathBuf)| {
            Command::new("curl")
                .args(["-sS", "--http2", "-o", "/dev/null", "--max-time", "10"])
                .args(["--cacert", &p(&certs.ca)])
                .args(["--cert", &p(&cert.0), "--key", &p(&cert.1)])
                .arg(format!("{}/members", c.peer_url(0)))
                .status()
                .expect("curl")
                .success()
        };
        assert!(reaches(&certs.server), "a certificate naming 127.0.0.1");
        assert_eq!(
            reaches(&elsewhere),
            skip,
            "a certificate naming 10.9.9.9 only"
        );
        if !skip {
            // The refusal is logged (the log file is written a little after).
            wait_for("the refusal in the log", || {
                let log = c.log_text(0);
                (log.contains("rejected connection") && log.contains("10.9.9.9")).then_some(())
            });
        }
    }
}

/// `--peer-auto-tls` replaces the peer TLS flags, as etcd's: with `--peer-client-cert-auth`
/// (which needs a CA file otherwise) the members still start and replicate.
#[test]
fn peer_auto_tls_replaces_the_other_peer_tls_flags() {
    let mut c = Cluster::new(3, &["--peer-auto-tls", "--peer-client-cert-auth"]);
    c.peer_scheme = "https";
    for i in 0..3 {
        c.start_member(i);
    }
    wait_for("a write through member 1", || {
        ctl(&c.endpoint(0), &[], &["put", "k", "v"]).0.then_some(())
    });
    let out = wait_for("the write on member 3", || {
        let (ok, out) = ctl(&c.endpoint(2), &[], &["get", "k", "--print-value-only"]);
        (ok && out == "v\n").then_some(out)
    });
    assert_eq!(out, "v\n");
}
