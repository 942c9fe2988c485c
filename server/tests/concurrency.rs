//! The Lock and Election services (etcd's concurrency API), end to end: the same session runs
//! against a real etcd 3.4 and against `keel` through the `etcd-client` crate's lock and election
//! APIs, and the transcripts (lease IDs replaced by names) are equal. It covers a queue of lock
//! waiters served in order when the holder's lease is revoked or the holder unlocks, a waiter
//! that goes away, a lock under lease 0 (a 60-second session lease), elections with observers,
//! proclaims and resignations, and etcd's errors. `etcdctl lock` and `etcdctl elect`, which
//! build the same on the KV, Lease and Watch APIs, are compared too.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use etcd_client::{
    Client, Error, GetOptions, LeaderKey, LockOptions, ProclaimOptions, ResignOptions,
};

/// The gRPC code and message of a refused call, or what an accepted one answered (its
/// header's revision).
fn refused<T: std::fmt::Debug>(result: Result<T, Error>) -> String {
    match result {
        Err(Error::GRpcStatus(s)) => format!("{:?}: {}", s.code(), s.message()),
        Err(e) => format!("error {e}"),
        Ok(r) => {
            let text = format!("{r:?}");
            let revision = text
                .split("revision: ")
                .nth(1)
                .and_then(|t| t.split(',').next())
                .unwrap_or("-");
            format!("accepted at {revision}")
        }
    }
}

/// Lease IDs differ between servers: they are replaced by the names the session gave them.
struct Names(Vec<(String, &'static str)>);

impl Names {
    fn add(&mut self, id: i64, name: &'static str) {
        self.0.push((format!("{id:x}"), name));
    }

    fn of(&self, text: &str) -> String {
        let mut t = text.to_string();
        for (hex, name) in &self.0 {
            t = t.replace(hex, name);
        }
        t
    }
}

/// Waits until `n` keys exist under `prefix`.
async fn wait_keys(c: &mut Client, prefix: &str, n: i64) {
    for _ in 0..3000 {
        let count = c
            .get(
                prefix,
                Some(GetOptions::new().with_prefix().with_count_only()),
            )
            .await
            .unwrap()
            .count();
        if count == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("never {n} keys under {prefix}");
}

async fn lock_session(endpoint: &str) -> Vec<String> {
    let mut c = Client::connect([endpoint], None).await.unwrap();
    let mut names = Names(Vec::new());
    let mut out = Vec::new();
    let lease = |name| {
        let mut c = c.clone();
        async move {
            let id = c.lease_grant(60, None).await.unwrap().id();
            (id, name)
        }
    };
    let (a, _) = lease("A").await;
    let (b, _) = lease("B").await;
    let (d, _) = lease("D").await;
    let (e, _) = lease("E").await;
    names.add(a, "A");
    names.add(b, "B");
    names.add(d, "D");
    names.add(e, "E");

    // Uncontended: the lock is taken at once; taken again under the same lease, the same key.
    let held = c
        .lock("L", Some(LockOptions::new().with_lease(a)))
        .await
        .unwrap();
    let key_a = held.key().to_vec();
    out.push(format!(
        "lock A: {} at {}",
        names.of(std::str::from_utf8(&key_a).unwrap()),
        held.header().unwrap().revision()
    ));
    let again = c
        .lock("L", Some(LockOptions::new().with_lease(a)))
        .await
        .unwrap();
    out.push(format!(
        "lock A again: same key {} at {}",
        again.key() == key_a.as_slice(),
        again.header().unwrap().revision()
    ));

    // Two waiters queue behind A, in order.
    let base = c.clone();
    let waiter = move |lease: i64| {
        let mut c = base.clone();
        tokio::spawn(async move {
            let r = c
                .lock("L", Some(LockOptions::new().with_lease(lease)))
                .await
                .unwrap();
            (r.key().to_vec(), r.header().unwrap().revision())
        })
    };
    let wb = waiter(b);
    wait_keys(&mut c, "L/", 2).await;
    let wd = waiter(d);
    wait_keys(&mut c, "L/", 3).await;

    // A waiter that goes away leaves no key behind.
    let we = waiter(e);
    wait_keys(&mut c, "L/", 4).await;
    we.abort();
    wait_keys(&mut c, "L/", 3).await;
    out.push("a waiter that left: its key deleted".into());

    // A's lease is revoked: B (the older waiter) gets the lock, D still waits.
    c.lease_revoke(a).await.unwrap();
    let (key_b, rev_b) = wb.await.unwrap();
    out.push(format!(
        "after A's lease was revoked, B holds {} (header {rev_b}); D still waits: {}",
        names.of(std::str::from_utf8(&key_b).unwrap()),
        !wd.is_finished()
    ));
    let unlocked = c.unlock(key_b).await.unwrap();
    let (key_d, rev_d) = wd.await.unwrap();
    out.push(format!(
        "B unlocked at {}; D holds {} (header {rev_d})",
        unlocked.header().unwrap().revision(),
        names.of(std::str::from_utf8(&key_d).unwrap()),
    ));
    c.unlock(key_d).await.unwrap();

    // Lease 0: a session lease of 60 s is granted for the lock.
    let own = c.lock("M", None).await.unwrap();
    let key = std::str::from_utf8(own.key()).unwrap().to_string();
    let id = i64::from_str_radix(key.strip_prefix("M/").unwrap(), 16).unwrap();
    let ttl = c.lease_time_to_live(id, None).await.unwrap();
    out.push(format!(
        "lock under lease 0: granted TTL {}, the key attached: {}",
        ttl.granted_ttl(),
        c.get(key.as_str(), None).await.unwrap().kvs()[0].lease() == id
    ));

    // A lease that does not exist.
    out.push(format!(
        "lock with an unknown lease: {}",
        refused(
            c.lock("L", Some(LockOptions::new().with_lease(0x1234)))
                .await
        )
    ));
    out.push(format!(
        "unlock of no key: {:?}",
        c.unlock("L/none").await.map(|_| ())
    ));
    out
}

async fn election_session(endpoint: &str) -> Vec<String> {
    let mut c = Client::connect([endpoint], None).await.unwrap();
    let mut names = Names(Vec::new());
    let mut out = Vec::new();
    let a = c.lease_grant(60, None).await.unwrap().id();
    let b = c.lease_grant(60, None).await.unwrap().id();
    names.add(a, "A");
    names.add(b, "B");

    out.push(format!(
        "leader of no election: {}",
        refused(c.leader("E").await)
    ));
    let won = c.campaign("E", "a1", a).await.unwrap();
    let leader_a = won.leader().unwrap().clone();
    out.push(format!(
        "A campaigns: leader {} rev {} lease A {} (header {})",
        names.of(leader_a.key_str().unwrap()),
        leader_a.rev(),
        leader_a.lease() == a,
        won.header().unwrap().revision()
    ));
    let mut observer = c.observe("E").await.unwrap();
    let mut observed = Vec::new();
    let next_observed = async |observer: &mut etcd_client::ObserveStream| {
        let r = observer.message().await.unwrap().unwrap();
        let kv = r.kv().unwrap();
        format!(
            "{}={} (header {})",
            kv.key_str().unwrap(),
            kv.value_str().unwrap(),
            r.header().unwrap().revision()
        )
    };
    observed.push(next_observed(&mut observer).await);

    let proclaimed = c
        .proclaim(
            "a2",
            Some(ProclaimOptions::new().with_leader(leader_a.clone())),
        )
        .await
        .unwrap();
    out.push(format!(
        "A proclaims a2 at {}",
        proclaimed.header().unwrap().revision()
    ));
    observed.push(next_observed(&mut observer).await);
    let leader = c.leader("E").await.unwrap();
    out.push(format!(
        "leader: {} (header {})",
        leader.kv().unwrap().value_str().unwrap(),
        leader.header().unwrap().revision()
    ));

    // B waits behind A; A resigns; B leads.
    let mut cb = c.clone();
    let campaign_b = tokio::spawn(async move { cb.campaign("E", "b1", b).await.unwrap() });
    wait_keys(&mut c, "E/", 2).await;
    let resigned = c
        .resign(Some(ResignOptions::new().with_leader(leader_a.clone())))
        .await
        .unwrap();
    out.push(format!(
        "A resigns at {}",
        resigned.header().unwrap().revision()
    ));
    let won_b = campaign_b.await.unwrap();
    let leader_b = won_b.leader().unwrap().clone();
    out.push(format!(
        "B leads: {} rev {} (header {})",
        names.of(leader_b.key_str().unwrap()),
        leader_b.rev(),
        won_b.header().unwrap().revision()
    ));
    observed.push(next_observed(&mut observer).await);

    // A's old leader key no longer leads.
    out.push(format!(
        "A proclaims again: {}",
        refused(
            c.proclaim(
                "a3",
                Some(ProclaimOptions::new().with_leader(leader_a.clone()))
            )
            .await
        )
    ));
    out.push(format!(
        "A resigns again: {:?}",
        c.resign(Some(ResignOptions::new().with_leader(leader_a)))
            .await
            .map(|r| r.header().unwrap().revision())
    ));
    // A leader key with the wrong create revision.
    let stranger = LeaderKey::new()
        .with_name("E")
        .with_key(leader_b.key().to_vec())
        .with_rev(1)
        .with_lease(b);
    out.push(format!(
        "a stranger's proclaim: {}",
        refused(
            c.proclaim("x", Some(ProclaimOptions::new().with_leader(stranger)))
                .await
        )
    ));
    out.push(format!(
        "proclaim without a leader: {}",
        refused(c.proclaim("x", None).await)
    ));
    out.push(format!(
        "resign without a leader: {}",
        refused(c.resign(None).await)
    ));

    // B's lease expires (revoked here): the election has no leader; the next candidate leads.
    c.lease_revoke(b).await.unwrap();
    out.push(format!("after B's lease: {}", refused(c.leader("E").await)));
    out.push(format!(
        "B campaigns with its lease gone: {}",
        refused(c.campaign("E", "b2", b).await)
    ));
    let won = c.campaign("E", "a3", a).await.unwrap();
    out.push(format!(
        "A campaigns again: rev {} (header {})",
        won.leader().unwrap().rev(),
        won.header().unwrap().revision()
    ));
    observed.push(next_observed(&mut observer).await);
    for o in observed {
        out.push(format!("observed {}", names.of(&o)));
    }
    // etcd 3.4 proclaims under the session's lease: a key that is not there, proclaimed with
    // revision 0 and no lease, is created under a new lease.
    let absent = LeaderKey::new().with_name("P").with_key("P/1");
    out.push(format!(
        "proclaim of an absent key: {}",
        refused(
            c.proclaim("p", Some(ProclaimOptions::new().with_leader(absent)))
                .await
        )
    ));
    let created = c.get("P/1", None).await.unwrap();
    let kv = &created.kvs()[0];
    out.push(format!(
        "P/1={} under a lease of {} s",
        kv.value_str().unwrap(),
        c.lease_time_to_live(kv.lease(), None)
            .await
            .unwrap()
            .granted_ttl()
    ));
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_and_election_sessions_match_etcds() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = common::etcd(&dir.path().join("etcd"), &[]);
    let keel = common::keel(&dir.path().join("keel"), common::free_port(), &[]);
    let expected = [
        lock_session(&etcd.endpoint).await,
        election_session(&etcd.endpoint).await,
    ]
    .concat();
    let got = [
        lock_session(&keel.endpoint).await,
        election_session(&keel.endpoint).await,
    ]
    .concat();
    for line in &expected {
        eprintln!("etcd: {line}");
    }
    assert_eq!(got, expected);
}

/// Starts etcdctl with `args`, its output piped.
fn etcdctl_spawn(endpoint: &str, args: &[&str]) -> std::process::Child {
    Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoint}"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("etcdctl")
}

/// etcdctl's lock and elect (client-side recipes on KV, Lease and Watch): a command run under
/// the lock, a second locker that waits for the first, and an election observed.
fn etcdctl_session(endpoint: &str) -> Vec<String> {
    let mut out = Vec::new();
    let run = |args: &[&str]| {
        let o = etcdctl_spawn(endpoint, args).wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&o.stdout).to_string();
        // Lock keys and election keys end in a lease ID: the part that differs.
        let text: Vec<String> = text
            .lines()
            .map(|l| match l.rsplit_once('/') {
                Some((name, id)) if id.chars().all(|c| c.is_ascii_hexdigit()) && id.len() > 8 => {
                    format!("{name}/<lease>")
                }
                _ => l.to_string(),
            })
            .collect();
        format!("{:?} -> {} {:?}", args, o.status.success(), text.join("|"))
    };
    out.push(run(&["lock", "L", "echo", "held"]));
    out.push(run(&[
        "lock",
        "--ttl=5",
        "L",
        "--",
        "sh",
        "-c",
        "echo $ETCD_LOCK_KEY | cut -d/ -f1",
    ]));
    out.push(run(&["put", "after", "x"]));
    // An elected leader; an observer sees it.
    // etcdctl with its output going to a file, read while it runs.
    let to_file = |args: &[&str], out: &tempfile::NamedTempFile| {
        Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={endpoint}"))
            .args(args)
            .stdout(Stdio::from(out.reopen().unwrap()))
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let elected = tempfile::NamedTempFile::new().unwrap();
    let mut leader = to_file(&["elect", "E", "v1"], &elected);
    let seen = tempfile::NamedTempFile::new().unwrap();
    let mut observer = to_file(&["elect", "-l", "E"], &seen);
    let observed = common::wait_for("the observer to see the leader", || {
        let text = std::fs::read_to_string(seen.path()).unwrap();
        text.lines().any(|l| l == "v1").then_some(text)
    });
    // The leader is interrupted only once it has printed its key: before its campaign's put has
    // been answered, etcdctl leaves without resigning (the key stays until its session's lease
    // expires), whichever server it talks to, and the observer can see the key before that.
    common::wait_for("the leader to print its key", || {
        let text = std::fs::read_to_string(elected.path()).unwrap();
        text.lines().any(|l| l == "v1").then_some(())
    });
    // SAFETY: kill(2) on our own children's PIDs.
    unsafe {
        libc::kill(leader.id() as i32, libc::SIGINT);
        libc::kill(observer.id() as i32, libc::SIGINT);
    }
    let _ = leader.wait();
    let _ = observer.wait();
    let lines: Vec<String> = observed
        .lines()
        .map(|l| match l.rsplit_once('/') {
            Some(("E", _)) => "E/<lease>".to_string(),
            _ => l.to_string(),
        })
        .collect();
    out.push(format!("observer saw: {}", lines.join("|")));
    // The interrupted leader resigned: its key is gone.
    out.push(run(&["get", "E/", "--prefix", "--keys-only"]));
    out
}

#[test]
fn etcdctl_lock_and_elect_match_etcds() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = common::etcd(&dir.path().join("etcd"), &[]);
    let keel = common::keel(&dir.path().join("keel"), common::free_port(), &[]);
    let expected = etcdctl_session(&etcd.endpoint);
    let got = etcdctl_session(&keel.endpoint);
    for line in &expected {
        eprintln!("etcd: {line}");
    }
    assert_eq!(got, expected);
}

/// A lock wait that fails deletes the waiter's key before Lock answers (etcd unlocks, and waits
/// for it, first): a caller retrying at once with the same lease must not find its old key,
/// then lose it to a delete still on its way. The wait fails here because the member may hold
/// no watcher (a Keel limit; etcd has none, so this runs against keel alone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_lock_wait_deletes_its_key_before_answering() {
    let dir = tempfile::tempdir().unwrap();
    let keel = common::keel(dir.path(), common::free_port(), &["--max-watchers=0"]);
    let mut c = Client::connect([keel.endpoint.as_str()], None)
        .await
        .unwrap();
    let holder = c.lease_grant(60, None).await.unwrap().id();
    let waiter = c.lease_grant(60, None).await.unwrap().id();
    c.lock("L", Some(LockOptions::new().with_lease(holder)))
        .await
        .unwrap();
    for _ in 0..20 {
        let failed = c
            .lock("L", Some(LockOptions::new().with_lease(waiter)))
            .await;
        assert!(failed.is_err(), "{failed:?}");
        let keys = c
            .get("L/", Some(GetOptions::new().with_prefix().with_keys_only()))
            .await
            .unwrap();
        let keys: Vec<_> = keys
            .kvs()
            .iter()
            .map(|kv| kv.key_str().unwrap().to_string())
            .collect();
        assert_eq!(keys, [format!("L/{holder:x}")], "{failed:?}");
    }
}

/// A campaign abandoned while it waits resigns only its own candidacy: the key of the same
/// lease made again since by another campaign stays (etcd resigns by create revision).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_campaign_resigns_only_its_own_key() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = common::etcd(&dir.path().join("etcd"), &[]);
    let keel = common::keel(&dir.path().join("keel"), common::free_port(), &[]);
    let mut seen = Vec::new();
    for endpoint in [&etcd.endpoint, &keel.endpoint] {
        let mut c = Client::connect([endpoint.as_str()], None).await.unwrap();
        let leader = c.lease_grant(60, None).await.unwrap().id();
        let shared = c.lease_grant(60, None).await.unwrap().id();
        c.campaign("E", "leader", leader).await.unwrap();
        // The first campaign of `shared` waits behind the leader...
        let mut first = c.clone();
        let waiting = tokio::spawn(async move { first.campaign("E", "first", shared).await });
        wait_keys(&mut c, "E/", 2).await;
        let key = format!("E/{shared:x}");
        let rev = c.get(key.as_str(), None).await.unwrap().kvs()[0].create_revision();
        // ...is resigned by someone, and a second campaign of the same lease queues again.
        let old = LeaderKey::new()
            .with_name("E")
            .with_key(key.as_str())
            .with_rev(rev)
            .with_lease(shared);
        c.resign(Some(ResignOptions::new().with_leader(old)))
            .await
            .unwrap();
        let mut second = c.clone();
        let again = tokio::spawn(async move { second.campaign("E", "second", shared).await });
        wait_keys(&mut c, "E/", 2).await;
        // The first one's caller goes away.
        waiting.abort();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let kv = c.get(key.as_str(), None).await.unwrap();
        seen.push(
            kv.kvs()
                .iter()
                .map(|kv| kv.value_str().unwrap().to_string())
                .collect::<Vec<_>>(),
        );
        again.abort();
    }
    assert_eq!(seen[1], seen[0]);
    assert_eq!(seen[0], ["second"]);
}
