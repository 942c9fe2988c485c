//! `keel gateway start`, etcd's L4 gateway, in front of a 3-member keel cluster: etcdctl
//! through the gateway reads and writes; with the member a connection would go to killed,
//! clients continue (the gateway marks it down and uses the others); an etcd 3.4 member behind
//! a keel gateway works the same (the gateway does not look into the bytes).

mod common;

use std::process::{Child, Command, Stdio};

use common::{Cluster, free_port, wait_listening};

/// The gateway process, killed by PID when dropped (also when a test fails).
struct Gateway(Child);

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn gateway(endpoints: &[String], port: u16) -> Gateway {
    let mut child = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(["gateway", "start"])
        .arg(format!("--endpoints={}", endpoints.join(",")))
        .arg(format!("--listen-addr=127.0.0.1:{port}"))
        .arg("--retry-delay=1h")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_listening(&mut child, port, "keel gateway");
    Gateway(child)
}

#[test]
fn clients_continue_through_the_gateway_when_a_member_dies() {
    let mut cluster = Cluster::start(3, &[]);
    let port = free_port();
    let endpoints: Vec<String> = (0..3).map(|i| cluster.endpoint(i)).collect();
    let _gateway = gateway(&endpoints, port);
    let through = format!("127.0.0.1:{port}");
    common::wait_for("a write through the gateway", || {
        common::etcdctl(&through, &["put", "k0", "v"])
            .0
            .then_some(())
    });
    cluster.kill(0);
    // If it led, the others elect a leader first (an election timeout): a client retries.
    common::wait_for("a write through the gateway after the kill", || {
        common::etcdctl(&through, &["put", "k0", "w"])
            .0
            .then_some(())
    });
    // Every request is a new connection, and every third one would go to the dead member.
    for i in 1..=12 {
        let key = format!("k{i}");
        let (ok, out) = common::etcdctl(&through, &["put", &key, "v"]);
        assert!(ok, "put {key} through the gateway: {out}");
        let (ok, out) = common::etcdctl(&through, &["get", &key, "--print-value-only"]);
        assert!(ok && out == "v\n", "get {key}: {out}");
    }
}

#[test]
fn bad_gateway_flags_are_refused() {
    let out = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args([
            "gateway",
            "start",
            "--endpoints=127.0.0.1:23790",
            "--listen-addr=localhost:23790",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    // The same address by another name is found too (etcd resolves both).
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("\"127.0.0.1:23790\" is an endpoint and the listen address")
    );
    // `--discovery-srv` is tested with a DNS server of its own in `tests/discovery.rs`.
}
