//! `--discovery-srv`: a 3-member cluster bootstraps from DNS SRV records. The members run in a
//! network namespace of their own, whose `/etc/resolv.conf` (`/etc/netns/NAME/resolv.conf`, as
//! `ip netns exec` mounts it) names a DNS server the test serves on that namespace's loopback:
//! `_etcd-server._tcp.keel.test` lists the three members, `mN.keel.test` resolve to 127.0.0.1.
//!
//! Needs root and `ip` (iproute2), as CI has; elsewhere the test says why it did not run.

mod common;

use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{free_port, wait_for};

const DOMAIN: &str = "keel.test";

/// A network namespace with its own resolv.conf, its DNS server and the processes started in
/// it; all removed when dropped (processes killed by PID first).
struct Ns {
    name: String,
    stop: Arc<AtomicBool>,
    children: Vec<Child>,
    logs: Vec<std::path::PathBuf>,
}

#[allow(clippy::big_endian_bytes, reason = "DNS messages are big-endian")]
/// A DNS answer to `query`: SRV records for the SRV name, 127.0.0.1 for the members' names,
/// no address of another family, NXDOMAIN for anything else.
fn answer(query: &[u8], srv: &[(u16, String)], clients: &[(u16, String)]) -> Option<Vec<u8>> {
    // The question's name, its type.
    let mut at = 12;
    let mut labels = Vec::new();
    loop {
        let len = usize::from(*query.get(at)?);
        at += 1;
        if len == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(query.get(at..at + len)?).to_ascii_lowercase());
        at += len;
    }
    let qtype = u16::from_be_bytes([*query.get(at)?, *query.get(at + 1)?]);
    let question_end = at + 4;
    let name = labels.join(".");
    let mut m = query.get(..question_end)?.to_vec();
    m[2] = 0x85; // an authoritative answer to a recursive query
    m[3] = 0x80;
    m[6..12].fill(0);
    let mut records: Vec<(u16, Vec<u8>)> = Vec::new();
    let srv_name = format!("_etcd-server._tcp.{DOMAIN}");
    let client_name = format!("_etcd-client._tcp.{DOMAIN}");
    if (name == srv_name || name == client_name) && qtype == 33 {
        let list = if name == srv_name { srv } else { clients };
        for (port, target) in list {
            let mut data = vec![0, 10, 0, 10];
            data.extend_from_slice(&port.to_be_bytes());
            for label in target.split('.') {
                data.push(label.len() as u8);
                data.extend_from_slice(label.as_bytes());
            }
            data.push(0);
            records.push((33, data));
        }
    } else if name.ends_with(&format!(".{DOMAIN}")) && name.starts_with('m') {
        if qtype == 1 {
            records.push((1, vec![127, 0, 0, 1]));
        }
    } else {
        m[3] |= 3; // NXDOMAIN
    }
    m[7] = records.len() as u8;
    for (rtype, data) in records {
        m.extend_from_slice(&[0xc0, 12]);
        m.extend_from_slice(&rtype.to_be_bytes());
        m.extend_from_slice(&[0, 1, 0, 0, 0, 60]);
        m.extend_from_slice(&(data.len() as u16).to_be_bytes());
        m.extend_from_slice(&data);
    }
    Some(m)
}

impl Ns {
    fn new(srv: Vec<(u16, String)>, clients: Vec<(u16, String)>) -> Ns {
        let name = format!("keeldisc{}", std::process::id() % 10_000);
        let _ = Command::new("ip").args(["netns", "del", &name]).status();
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .unwrap()
            .success();
        assert!(ok, "ip netns add");
        let ok = Command::new("ip")
            .args(["netns", "exec", &name, "ip", "link", "set", "lo", "up"])
            .status()
            .unwrap()
            .success();
        assert!(ok, "lo up");
        let etc = format!("/etc/netns/{name}");
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::write(format!("{etc}/resolv.conf"), "nameserver 127.0.0.1\n").unwrap();
        // The DNS server: a thread that enters the namespace, then binds its port 53.
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let ns_file = std::fs::File::open(format!("/var/run/netns/{name}")).unwrap();
        let stopped = stop.clone();
        std::thread::spawn(move || {
            // SAFETY: setns on a namespace file we hold open; it changes this thread only.
            let r = unsafe { libc::setns(ns_file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns");
            let socket = UdpSocket::bind("127.0.0.1:53").unwrap();
            socket
                .set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            ready_tx.send(()).unwrap();
            let mut buf = [0u8; 512];
            while !stopped.load(Ordering::Relaxed) {
                let Ok((n, from)) = socket.recv_from(&mut buf) else {
                    continue;
                };
                if let Some(a) = answer(&buf[..n], &srv, &clients) {
                    let _ = socket.send_to(&a, from);
                }
            }
        });
        ready.recv().unwrap();
        Ns {
            name,
            stop,
            children: Vec::new(),
            logs: Vec::new(),
        }
    }

    /// `program` with `args`, inside the namespace.
    fn command(&self, program: &str, args: &[String]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]).args(args);
        c
    }

    fn etcdctl(&self, port: u16, args: &[&str]) -> (bool, String) {
        let mut all = vec![format!("--endpoints=http://127.0.0.1:{port}")];
        all.extend(args.iter().map(ToString::to_string));
        let out = self
            .command("etcdctl", &all)
            .env("ETCDCTL_API", "3")
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            for log in &self.logs {
                let text = std::fs::read_to_string(log).unwrap_or_default();
                eprintln!("--- {}", log.display());
                for l in text.lines().rev().take(20).collect::<Vec<_>>().iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
        self.stop.store(true, Ordering::Relaxed);
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        let _ = std::fs::remove_dir_all(format!("/etc/netns/{}", self.name));
    }
}

/// The flags of member `name` bootstrapping from the SRV records.
fn member_args(dir: &std::path::Path, name: &str, peer: u16, client: u16) -> Vec<String> {
    vec![
        format!("--name={name}"),
        format!("--data-dir={}", dir.join(name).display()),
        format!("--discovery-srv={DOMAIN}"),
        format!("--initial-advertise-peer-urls=http://{name}.{DOMAIN}:{peer}"),
        format!("--listen-peer-urls=http://127.0.0.1:{peer}"),
        format!("--listen-client-urls=http://127.0.0.1:{client}"),
        format!("--advertise-client-urls=http://127.0.0.1:{client}"),
        "--initial-cluster-token=srv-test".into(),
    ]
}

#[test]
fn a_cluster_bootstraps_from_dns_srv_records() {
    if let Some(why) = common::netns_unavailable() {
        eprintln!("skipped: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let peers: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let clients: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let srv: Vec<(u16, String)> = (0..3)
        .map(|i| (peers[i], format!("m{}.{DOMAIN}", i + 1)))
        .collect();
    let client_records: Vec<(u16, String)> = (0..3)
        .map(|i| (clients[i], format!("m{}.{DOMAIN}", i + 1)))
        .collect();
    let mut ns = Ns::new(srv, client_records);
    for i in 0..3 {
        let name = format!("m{}", i + 1);
        let log = dir.path().join(format!("{name}.log"));
        let child = ns
            .command(
                env!("CARGO_BIN_EXE_keel"),
                &member_args(dir.path(), &name, peers[i], clients[i]),
            )
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        ns.children.push(child);
        ns.logs.push(log);
    }
    // Every member is listed under the URL of its SRV record; named `0`, `1` until each
    // publishes its own name and client URLs, as etcd's.
    let expected: Vec<String> = (0..3)
        .map(|i| {
            format!(
                ", started, m{n}, http://m{n}.{DOMAIN}:{}, http://127.0.0.1:{}, false",
                peers[i],
                clients[i],
                n = i + 1
            )
        })
        .collect();
    let list = wait_for("three published members", || {
        let (ok, out) = ns.etcdctl(clients[0], &["member", "list"]);
        (ok && expected.iter().all(|e| out.contains(e))).then_some(out)
    });
    assert_eq!(list.lines().count(), 3, "{list}");
    let (ok, out) = ns.etcdctl(clients[0], &["put", "found", "by-srv"]);
    assert!(ok, "{out}");
    let got = wait_for("the write on m3", || {
        let (ok, out) = ns.etcdctl(clients[2], &["get", "found", "--print-value-only"]);
        (ok && out.trim() == "by-srv").then_some(out)
    });
    assert_eq!(got.trim(), "by-srv");
    let log = std::fs::read_to_string(&ns.logs[1]).unwrap();
    assert!(
        log.contains("got the initial cluster from DNS SRV records"),
        "{log}"
    );

    // The L4 gateway and the gRPC proxy find the members' client URLs from the
    // `_etcd-client._tcp` records (plain http ones: the gateway takes them only with
    // `--insecure-discovery`, as etcd's).
    for (what, args) in [
        ("gateway", &["gateway", "start", "--insecure-discovery"][..]),
        ("grpc-proxy", &["grpc-proxy", "start"][..]),
    ] {
        let port = free_port();
        let mut all: Vec<String> = args.iter().map(ToString::to_string).collect();
        all.push(format!("--discovery-srv={DOMAIN}"));
        all.push(format!("--listen-addr=127.0.0.1:{port}"));
        let child = ns
            .command(env!("CARGO_BIN_EXE_keel"), &all)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        ns.children.push(child);
        let got = wait_for(what, || {
            let (ok, out) = ns.etcdctl(port, &["get", "found", "--print-value-only"]);
            (ok && out.trim() == "by-srv").then_some(out)
        });
        assert_eq!(got.trim(), "by-srv", "{what}");
    }
    // Without `--insecure-discovery`, the http records are skipped and `--endpoints` used.
    let log_path = dir.path().join("secure-gateway.log");
    let child = ns
        .command(
            env!("CARGO_BIN_EXE_keel"),
            &[
                "gateway".into(),
                "start".into(),
                format!("--discovery-srv={DOMAIN}"),
                format!("--listen-addr=127.0.0.1:{}", free_port()),
            ],
        )
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    ns.children.push(child);
    wait_for("the secure gateway's fallback", || {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        (log.contains("is insecure; skipped") && log.contains("no endpoints discovered"))
            .then_some(())
    });
    // A domain without records: the gateway says so and does not start.
    let out = ns
        .command(
            env!("CARGO_BIN_EXE_keel"),
            &[
                "gateway".into(),
                "start".into(),
                "--discovery-srv=nothing.test".into(),
            ],
        )
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot discover the cluster's endpoints"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A member whose address no record lists does not start, and says why.
    let out = ns
        .command(
            env!("CARGO_BIN_EXE_keel"),
            &member_args(dir.path(), "m4", free_port(), free_port()),
        )
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("cannot find local etcd member \"m4\" in SRV records"),
        "{stderr}"
    );
}

/// `--discovery-srv` with an explicit `--initial-cluster` is refused as etcd refuses it.
#[test]
fn discovery_and_an_initial_cluster_conflict() {
    let dir = tempfile::tempdir().unwrap();
    let (code, stderr) =
        common::keel_refused(&dir.path().join("d"), &["--discovery-srv=example.com"]);
    assert_ne!(code, Some(0));
    assert!(
        stderr.contains("multiple discovery or bootstrap flags are set"),
        "{stderr}"
    );
}

/// `--discovery`: three members register with a discovery service (a real etcd 3.4 serving
/// its v2 keys API, as etcd's docs suggest for a self-hosted one), wait for each other and form
/// one cluster; a fourth finds it full and does not start.
#[test]
fn a_cluster_bootstraps_through_a_discovery_service() {
    let dir = tempfile::tempdir().unwrap();
    let service = common::etcd(&dir.path().join("service"), &["--enable-v2"]);
    let durl = format!(
        "{}/v2/keys/discovery/6c007a14875d53d9bf0ef5a6fc0257c8",
        service.endpoint
    );
    let size = Command::new("curl")
        .args([
            "-s",
            "-X",
            "PUT",
            &format!("{durl}/_config/size"),
            "-d",
            "value=3",
        ])
        .output()
        .unwrap();
    let size = String::from_utf8_lossy(&size.stdout);
    assert!(size.contains(r#""value":"3""#), "{size}");
    let member = |name: &str, peer: u16, client: u16| -> Vec<String> {
        vec![
            format!("--name={name}"),
            format!("--data-dir={}", dir.path().join(name).display()),
            format!("--discovery={durl}"),
            format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer}"),
            format!("--listen-peer-urls=http://127.0.0.1:{peer}"),
            format!("--listen-client-urls=http://127.0.0.1:{client}"),
            format!("--advertise-client-urls=http://127.0.0.1:{client}"),
        ]
    };
    let peers: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let clients: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let mut children = Vec::new();
    let mut logs = Vec::new();
    for i in 0..3 {
        let name = format!("d{}", i + 1);
        let log = dir.path().join(format!("{name}.log"));
        // One at a time, a moment apart: the first ones wait for the others.
        children.push(KillOnDrop(
            Command::new(env!("CARGO_BIN_EXE_keel"))
                .args(member(&name, peers[i], clients[i]))
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .unwrap(),
        ));
        logs.push(log);
        std::thread::sleep(Duration::from_millis(300));
    }
    let endpoint = format!("http://127.0.0.1:{}", clients[0]);
    let expected: Vec<String> = (0..3)
        .map(|i| {
            format!(
                ", started, d{n}, http://127.0.0.1:{}, http://127.0.0.1:{}, false",
                peers[i],
                clients[i],
                n = i + 1
            )
        })
        .collect();
    let list = wait_for("three published members", || {
        let (ok, out) = common::etcdctl(&endpoint, &["member", "list"]);
        (ok && expected.iter().all(|e| out.contains(e))).then_some(out)
    });
    assert_eq!(list.lines().count(), 3, "{list}");
    common::ok(&endpoint, &["put", "found", "by-discovery"]);
    let on_d3 = format!("http://127.0.0.1:{}", clients[2]);
    wait_for("the write on d3", || {
        let (ok, out) = common::etcdctl(&on_d3, &["get", "found", "--print-value-only"]);
        (ok && out.trim() == "by-discovery").then_some(())
    });
    let log = std::fs::read_to_string(&logs[0]).unwrap();
    assert!(log.contains("waiting for more"), "{log}");
    // The service lists the three registrations.
    let listed = Command::new("curl").args(["-s", &durl]).output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&listed.stdout)
            .matches("\"createdIndex\"")
            .count(),
        4, // the size key's directory and three members
    );

    // A fourth member finds the cluster full.
    let out = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(member("d4", free_port(), free_port()))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("discovery: cluster is full"), "{stderr}");
}

/// A child process killed and reaped when dropped.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
