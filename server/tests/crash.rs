//! Kill -9 of a loaded `keel`, over several rounds on the same data dir: nothing acknowledged is
//! lost, nothing unacknowledged is half applied, and the history stays dense.
//!
//! Four clients (the `etcd-client` crate, one connection each) run puts, deletes, txns, lease
//! grants, revokes and puts attached to leases. Each client owns its key space and its lease IDs
//! and sends one request at a time, so it keeps an exact model of its keys (value, create and mod
//! revision, version, lease) and leases from the responses it gets: every response is checked
//! against the model as it arrives (a txn takes the branch the model predicts, a delete removes
//! what the model holds). The process is killed (SIGKILL) once the round has seen a number of
//! acknowledgements drawn from the seed, and restarted on the same data dir. Each client then has
//! at most one request whose fate is unknown (in flight at the kill): applied or not, never half.
//!
//! After each restart, with the whole history read back by a watch from revision 1:
//! - every revision from 2 to the current one has events, each revision the events of one
//!   request of one client (no gap, no duplicate);
//! - every acknowledged write is at the revision its response gave, with exactly its events;
//! - each client has at most one revision it was not told about, after all those it was, with the
//!   events of its request in flight (which is then known to have been applied);
//! - replaying the history gives exactly the stored keys, and so do the clients' models: each
//!   key's value, create and mod revision, version and lease, deleted keys absent;
//! - every lease granted (acknowledged, or applied in flight) and not revoked is alive with its
//!   full granted TTL ahead and exactly its attached keys; revoked ones are gone.
//!
//! Nothing is timed: the kill waits for acknowledgements, the checks wait for revisions. The seed
//! is printed; `KEEL_CRASH_SEED` replays the kill points and the requests (not the interleaving
//! of the clients), and `KEEL_CRASH_DEBUG=1` prints every write and the history at each check.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use etcd_client::{
    Client, Compare, CompareOp, EventType, GetOptions, LeaseGrantOptions, LeaseTimeToLiveOptions,
    PutOptions, Txn, TxnOp, WatchOptions,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const CLIENTS: usize = 4;
const KEYS: usize = 12;
const ROUNDS: usize = 5;
/// Long enough that no lease expires during the test: leases end only by revocation.
const LEASE_TTL: i64 = 3600;
/// A hang guard, never the behaviour under test.
const HANG: Duration = Duration::from_secs(60);

/// A key's state as a client's model holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Kv {
    value: String,
    create: i64,
    modified: i64,
    version: i64,
    lease: i64,
}

/// An event as the history shows it: (is a put, key, value).
type Ev = (bool, String, String);

/// A request of one client.
#[derive(Debug, Clone)]
enum Op {
    Put {
        key: String,
        value: String,
        lease: i64,
    },
    Delete {
        key: String,
    },
    /// If `cmp`'s version equals `version`: put `put` = `value` and delete `del`; else put `alt`
    /// = `value`.
    Txn {
        cmp: String,
        version: i64,
        put: String,
        del: String,
        alt: String,
        value: String,
    },
    Grant {
        id: i64,
    },
    Revoke {
        id: i64,
    },
}

/// One client's exact knowledge of its key space and leases.
#[derive(Debug, Default, Clone)]
struct Model {
    keys: BTreeMap<String, Kv>,
    /// Lease ID -> alive (false once revoked).
    leases: BTreeMap<i64, bool>,
}

impl Model {
    /// Whether `op` writes (takes a revision), and its events, in the model's current state.
    fn effect(&self, op: &Op) -> (bool, Vec<Ev>) {
        let mut evs = Vec::new();
        match op {
            Op::Put { key, value, .. } => evs.push((true, key.clone(), value.clone())),
            Op::Delete { key } => {
                if self.keys.contains_key(key) {
                    evs.push((false, key.clone(), String::new()));
                }
            }
            Op::Txn {
                cmp,
                version,
                put,
                del,
                alt,
                value,
            } => {
                if self.version(cmp) == *version {
                    evs.push((true, put.clone(), value.clone()));
                    if self.keys.contains_key(del) {
                        evs.push((false, del.clone(), String::new()));
                    }
                } else {
                    evs.push((true, alt.clone(), value.clone()));
                }
            }
            Op::Grant { .. } => {}
            Op::Revoke { id } => {
                for (k, kv) in &self.keys {
                    if kv.lease == *id {
                        evs.push((false, k.clone(), String::new()));
                    }
                }
            }
        }
        (!evs.is_empty(), sorted(evs))
    }

    fn version(&self, key: &str) -> i64 {
        self.keys.get(key).map_or(0, |kv| kv.version)
    }

    fn put(&mut self, key: &str, value: &str, lease: i64, rev: i64) {
        let (create, version) = match self.keys.get(key) {
            Some(kv) => (kv.create, kv.version + 1),
            None => (rev, 1),
        };
        self.keys.insert(
            key.to_string(),
            Kv {
                value: value.to_string(),
                create,
                modified: rev,
                version,
                lease,
            },
        );
    }

    /// Applies `op`, which took revision `rev` if it writes.
    fn apply(&mut self, op: &Op, rev: i64) {
        match op {
            Op::Put { key, value, lease } => self.put(key, value, *lease, rev),
            Op::Delete { key } => {
                self.keys.remove(key);
            }
            Op::Txn {
                cmp,
                version,
                put,
                del,
                alt,
                value,
            } => {
                if self.version(cmp) == *version {
                    self.put(put, value, 0, rev);
                    self.keys.remove(del);
                } else {
                    self.put(alt, value, 0, rev);
                }
            }
            Op::Grant { id } => {
                self.leases.insert(*id, true);
            }
            Op::Revoke { id } => {
                self.keys.retain(|_, kv| kv.lease != *id);
                self.leases.insert(*id, false);
            }
        }
    }
}

fn sorted(mut evs: Vec<Ev>) -> Vec<Ev> {
    evs.sort();
    evs
}

/// A client across rounds.
struct ClientState {
    id: usize,
    rng: StdRng,
    seq: u64,
    model: Model,
    /// Revision -> events of every write known to be applied (acknowledged, or found in the
    /// history after being in flight at a kill).
    writes: BTreeMap<i64, Vec<Ev>>,
    /// Acknowledged revokes that deleted keys, in order: their events and the revision their
    /// response gave (the revision of their deletes, checked against the history).
    revokes: Vec<(Vec<Ev>, i64)>,
    /// The request sent and not answered when the server died.
    in_flight: Option<Op>,
    /// Highest revision any response of this client carried.
    seen: i64,
    acknowledged: usize,
}

impl ClientState {
    fn key(&mut self) -> String {
        format!("c{}/k{:02}", self.id, self.rng.random_range(0..KEYS))
    }

    fn next_op(&mut self) -> Op {
        self.seq += 1;
        let value = format!("c{}-{}", self.id, self.seq);
        let alive: Vec<i64> = self
            .model
            .leases
            .iter()
            .filter(|(_, alive)| **alive)
            .map(|(id, _)| *id)
            .collect();
        match self.rng.random_range(0..100) {
            0..=34 => Op::Put {
                key: self.key(),
                value,
                lease: 0,
            },
            35..=49 if !alive.is_empty() => Op::Put {
                key: self.key(),
                value,
                lease: alive[self.rng.random_range(0..alive.len())],
            },
            50..=64 => Op::Delete { key: self.key() },
            65..=84 => {
                let cmp = self.key();
                // Half the time the version the model holds: both branches are taken.
                let version = self.model.version(&cmp) + i64::from(self.rng.random_bool(0.5));
                let put = self.key();
                let mut del = self.key();
                while del == put {
                    del = self.key();
                }
                Op::Txn {
                    cmp,
                    version,
                    put,
                    del,
                    alt: self.key(),
                    value,
                }
            }
            85..=94 => Op::Grant {
                id: (self.id as i64 + 1) * 1_000_000 + self.seq as i64,
            },
            _ if !alive.is_empty() => Op::Revoke {
                id: alive[self.rng.random_range(0..alive.len())],
            },
            _ => Op::Delete { key: self.key() },
        }
    }

    /// Sends `op`; the response's revision, after checking the response against the model.
    async fn send(&mut self, c: &mut Client, op: &Op) -> Result<i64, etcd_client::Error> {
        let who = format!("client {} op {}: {op:?}", self.id, self.seq);
        let rev = match op {
            Op::Put { key, value, lease } => {
                let opts = (*lease != 0).then(|| PutOptions::new().with_lease(*lease));
                c.put(key.as_str(), value.as_str(), opts)
                    .await?
                    .header()
                    .unwrap()
                    .revision()
            }
            Op::Delete { key } => {
                let r = c.delete(key.as_str(), None).await?;
                let expected = i64::from(self.model.keys.contains_key(key));
                assert_eq!(r.deleted(), expected, "{who}: deleted");
                r.header().unwrap().revision()
            }
            Op::Txn {
                cmp,
                version,
                put,
                del,
                alt,
                value,
            } => {
                let t = Txn::new()
                    .when([Compare::version(cmp.as_str(), CompareOp::Equal, *version)])
                    .and_then([
                        TxnOp::put(put.as_str(), value.as_str(), None),
                        TxnOp::delete(del.as_str(), None),
                    ])
                    .or_else([TxnOp::put(alt.as_str(), value.as_str(), None)]);
                let r = c.txn(t).await?;
                assert_eq!(
                    r.succeeded(),
                    self.model.version(cmp) == *version,
                    "{who}: branch"
                );
                r.header().unwrap().revision()
            }
            Op::Grant { id } => {
                let r = c
                    .lease_grant(LEASE_TTL, Some(LeaseGrantOptions::new().with_id(*id)))
                    .await?;
                assert_eq!((r.id(), r.ttl()), (*id, LEASE_TTL), "{who}");
                r.header().unwrap().revision()
            }
            Op::Revoke { id } => c.lease_revoke(*id).await?.header().unwrap().revision(),
        };
        let (writes, _) = self.model.effect(op);
        if writes {
            assert!(rev > self.seen, "{who}: revision {rev} after {}", self.seen);
        } else {
            assert!(
                rev >= self.seen,
                "{who}: revision {rev} after {}",
                self.seen
            );
        }
        Ok(rev)
    }

    /// Runs requests one at a time until one fails (the server was killed).
    async fn run(mut self, endpoint: String, acks: Arc<AtomicUsize>) -> ClientState {
        let Ok(mut c) = Client::connect([endpoint.as_str()], None).await else {
            return self;
        };
        loop {
            let op = self.next_op();
            self.in_flight = Some(op.clone());
            let result = tokio::time::timeout(HANG, self.send(&mut c, &op))
                .await
                .unwrap_or_else(|_| panic!("client {}: no answer to {op:?}", self.id));
            let rev = match result {
                Ok(rev) => rev,
                Err(etcd_client::Error::GRpcStatus(s))
                    if !matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Unknown) =>
                {
                    panic!("client {}: {op:?} refused: {s:?}", self.id)
                }
                // The server is gone: the request's fate is unknown.
                Err(_) => return self,
            };
            self.in_flight = None;
            let (writes, evs) = self.model.effect(&op);
            match op {
                Op::Revoke { .. } if writes => self.revokes.push((evs, rev)),
                _ if writes => {
                    self.writes.insert(rev, evs);
                }
                _ => {}
            }
            self.model.apply(&op, rev);
            self.seen = self.seen.max(rev);
            self.acknowledged += 1;
            acks.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The whole history: revision -> events (sorted), and every event's key-value in order.
async fn history(
    c: &mut Client,
    current: i64,
) -> (BTreeMap<i64, Vec<Ev>>, Vec<etcd_client::Event>) {
    let mut by_rev: BTreeMap<i64, Vec<Ev>> = BTreeMap::new();
    let mut all = Vec::new();
    if current < 2 {
        return (by_rev, all);
    }
    let mut s = c
        .watch(
            "",
            Some(WatchOptions::new().with_all_keys().with_start_revision(1)),
        )
        .await
        .unwrap();
    let mut last = 0;
    while last < current {
        let r = tokio::time::timeout(HANG, s.message())
            .await
            .expect("history events")
            .unwrap()
            .expect("the watch stays open");
        assert!(!r.canceled(), "history watch canceled: {r:?}");
        for e in r.events() {
            let kv = e.kv().unwrap();
            let rev = kv.mod_revision();
            assert!(rev >= last, "event of revision {rev} after {last}");
            last = rev;
            by_rev.entry(rev).or_default().push((
                e.event_type() == EventType::Put,
                kv.key_str().unwrap().to_string(),
                kv.value_str().unwrap().to_string(),
            ));
            all.push(e.clone());
        }
    }
    assert_eq!(last, current, "the history ends at the current revision");
    for evs in by_rev.values_mut() {
        evs.sort();
    }
    (by_rev, all)
}

fn owner(evs: &[Ev]) -> usize {
    let client = |k: &str| -> usize { k[1..k.find('/').unwrap()].parse().unwrap() };
    let first = client(&evs[0].1);
    assert!(
        evs.iter().all(|e| client(&e.1) == first),
        "one revision holds events of several clients: {evs:?}"
    );
    first
}

/// Everything the module docs promise, after a restart.
async fn verify(endpoint: &str, clients: &mut [ClientState], round: usize, seed: u64) {
    let ctx = format!("seed {seed} round {round}");
    let mut c = Client::connect([endpoint], None).await.unwrap();
    // A restarted member serves clients only once it has applied what its WAL holds as
    // committed, so even a serializable read, the first request after the restart, sees every
    // acknowledged write.
    let serializable = c
        .get(
            "",
            Some(GetOptions::new().with_all_keys().with_serializable()),
        )
        .await
        .unwrap();
    let newest_acked = clients
        .iter()
        .flat_map(|cs| cs.writes.keys().copied())
        .max()
        .unwrap_or(0);
    assert!(
        serializable.header().unwrap().revision() >= newest_acked,
        "{ctx}: a serializable read after the restart is at revision {}, before acknowledged \
         revision {newest_acked}",
        serializable.header().unwrap().revision()
    );
    let all = c
        .get("", Some(GetOptions::new().with_all_keys()))
        .await
        .unwrap();
    let current = all.header().unwrap().revision();
    let (history, events) = history(&mut c, current).await;

    // Dense: every revision has events, of one client.
    let revs: Vec<i64> = history.keys().copied().collect();
    let expected: Vec<i64> = (2..=current).collect();
    assert_eq!(revs, expected, "{ctx}: revisions with events");
    let mut owned: Vec<BTreeSet<i64>> = vec![BTreeSet::new(); clients.len()];
    for (rev, evs) in &history {
        owned[owner(evs)].insert(*rev);
    }

    if std::env::var("KEEL_CRASH_DEBUG").is_ok() {
        for cs in clients.iter() {
            println!(
                "client {} in flight {:?} seen {}",
                cs.id, cs.in_flight, cs.seen
            );
            for (rev, evs) in &cs.writes {
                let ok = if history.get(rev) == Some(evs) {
                    ""
                } else {
                    "  <-- MISMATCH"
                };
                println!("  acked {rev}: {evs:?}{ok}");
            }
        }
        for (rev, evs) in &history {
            println!("history {rev}: {evs:?}");
        }
    }
    for (cs, owned) in clients.iter_mut().zip(&owned) {
        let who = format!("{ctx} client {}", cs.id);
        // Every known write at its revision, with exactly its events.
        for (rev, evs) in &cs.writes {
            if history.get(rev) != Some(evs) {
                let found: Vec<i64> = history
                    .iter()
                    .filter(|(_, h)| *h == evs)
                    .map(|(r, _)| *r)
                    .collect();
                let near: Vec<String> = history
                    .range(rev - 3..rev + 4)
                    .map(|(r, h)| format!("{r}: {h:?}"))
                    .collect();
                let acked: Vec<String> = clients_writes_near(&*cs, *rev);
                panic!(
                    "{who}: write at revision {rev} is {evs:?}; those events are at {found:?}; \
                     history near it: {near:#?}; this client's writes near it: {acked:#?}; \
                     current {current}"
                );
            }
        }
        let mut unknown: Vec<i64> = owned
            .iter()
            .filter(|r| !cs.writes.contains_key(r))
            .copied()
            .collect();
        // The acknowledged revokes take the first of them, in order.
        for (evs, answered) in std::mem::take(&mut cs.revokes) {
            assert!(
                !unknown.is_empty(),
                "{who}: revoke {evs:?} not in the history"
            );
            let rev = unknown.remove(0);
            assert_eq!(history[&rev], evs, "{who}: revoke at revision {rev}");
            assert_eq!(rev, answered, "{who}: revoke at {rev}, answered {answered}");
            cs.writes.insert(rev, evs);
        }
        let op = cs.in_flight.take();
        match (unknown.as_slice(), op) {
            ([], None) => {}
            ([], Some(op)) => {
                println!("{who}: in flight, no revision: {op:?}");
                // Not applied, or applied without a revision: leases tell.
                let applied = match &op {
                    Op::Grant { id } => ttl(&mut c, *id).await.0 > 0,
                    Op::Revoke { id } => ttl(&mut c, *id).await.0 == -1,
                    _ => false,
                };
                if applied {
                    let (writes, _) = cs.model.effect(&op);
                    assert!(!writes, "{who}: {op:?} applied without its events");
                    cs.model.apply(&op, 0);
                }
            }
            (&[rev], Some(op)) => {
                println!("{who}: in flight, applied at {rev}: {op:?}");
                assert!(
                    rev > cs.seen,
                    "{who}: unacknowledged revision {rev} before acknowledged {}",
                    cs.seen
                );
                let (writes, evs) = cs.model.effect(&op);
                assert!(writes, "{who}: revision {rev} for {op:?}");
                assert_eq!(history[&rev], evs, "{who}: in-flight {op:?} at {rev}");
                cs.model.apply(&op, rev);
                cs.writes.insert(rev, evs);
                cs.seen = rev;
            }
            (unknown, op) => {
                panic!("{who}: revisions {unknown:?} it never wrote (in flight: {op:?})")
            }
        }
    }

    // Replaying the history gives the stored keys; so do the models.
    let mut replay: BTreeMap<String, Kv> = BTreeMap::new();
    for e in &events {
        let kv = e.kv().unwrap();
        let key = kv.key_str().unwrap().to_string();
        if e.event_type() == EventType::Put {
            replay.insert(key, stored(kv));
        } else {
            replay.remove(&key);
        }
    }
    let store: BTreeMap<String, Kv> = all
        .kvs()
        .iter()
        .map(|kv| (kv.key_str().unwrap().to_string(), stored(kv)))
        .collect();
    assert!(
        replay == store,
        "{ctx}: the history does not replay to the store"
    );
    let mut models: BTreeMap<String, Kv> = BTreeMap::new();
    for cs in clients.iter() {
        models.extend(cs.model.keys.clone());
    }
    for (k, kv) in &models {
        assert_eq!(store.get(k), Some(kv), "{ctx}: key {k}");
    }
    let extra: Vec<&String> = store.keys().filter(|k| !models.contains_key(*k)).collect();
    assert!(extra.is_empty(), "{ctx}: keys no model has: {extra:?}");

    // Leases: alive with their keys, or gone.
    let mut alive = BTreeSet::new();
    for cs in clients.iter() {
        for (&id, &is_alive) in &cs.model.leases {
            let (left, granted, keys) = ttl(&mut c, id).await;
            if is_alive {
                alive.insert(id);
                assert!(
                    left > 0 && left <= LEASE_TTL,
                    "{ctx}: lease {id} TTL {left}"
                );
                assert_eq!(granted, LEASE_TTL, "{ctx}: lease {id}");
                let attached: Vec<String> = cs
                    .model
                    .keys
                    .iter()
                    .filter(|(_, kv)| kv.lease == id)
                    .map(|(k, _)| k.clone())
                    .collect();
                assert_eq!(keys, attached, "{ctx}: keys of lease {id}");
            } else {
                assert_eq!(left, -1, "{ctx}: revoked lease {id}");
            }
        }
    }
    let listed: BTreeSet<i64> = c
        .leases()
        .await
        .unwrap()
        .leases()
        .iter()
        .map(|l| l.id())
        .collect();
    assert_eq!(listed, alive, "{ctx}: leases");
}

fn clients_writes_near(cs: &ClientState, rev: i64) -> Vec<String> {
    cs.writes
        .range(rev - 10..rev + 10)
        .map(|(r, e)| format!("{r}: {e:?}"))
        .collect()
}

fn stored(kv: &etcd_client::KeyValue) -> Kv {
    Kv {
        value: kv.value_str().unwrap().to_string(),
        create: kv.create_revision(),
        modified: kv.mod_revision(),
        version: kv.version(),
        lease: kv.lease(),
    }
}

/// A lease's remaining and granted TTL and its keys (sorted).
async fn ttl(c: &mut Client, id: i64) -> (i64, i64, Vec<String>) {
    let r = c
        .lease_time_to_live(id, Some(LeaseTimeToLiveOptions::new().with_keys()))
        .await
        .unwrap();
    let mut keys: Vec<String> = r
        .keys()
        .iter()
        .map(|k| String::from_utf8(k.clone()).unwrap())
        .collect();
    keys.sort();
    (r.ttl(), r.granted_ttl(), keys)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_under_concurrent_load_loses_no_acknowledged_write() {
    let seed: u64 = std::env::var("KEEL_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("seed {seed} (KEEL_CRASH_SEED replays the kill points and the requests)");
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("keel");
    let port = common::free_port();
    let mut clients: Vec<ClientState> = (0..CLIENTS)
        .map(|id| ClientState {
            id,
            rng: StdRng::seed_from_u64(seed ^ (id as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)),
            seq: 0,
            model: Model::default(),
            writes: BTreeMap::new(),
            revokes: Vec::new(),
            in_flight: None,
            seen: 0,
            acknowledged: 0,
        })
        .collect();
    for round in 1..=ROUNDS {
        let keel = common::keel(&data, port, &[]);
        let acks = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = clients
            .drain(..)
            .map(|cs| tokio::spawn(cs.run(keel.endpoint.clone(), acks.clone())))
            .collect();
        // Kill once this many requests of the round were acknowledged: an observed point of the
        // load, drawn from the seed.
        let kill_after = rng.random_range(1..400);
        let deadline = Instant::now() + HANG;
        while acks.load(Ordering::Relaxed) < kill_after {
            assert!(
                Instant::now() < deadline,
                "seed {seed} round {round}: {} of {kill_after} acknowledgements",
                acks.load(Ordering::Relaxed)
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        drop(keel); // SIGKILL
        for t in tasks {
            clients.push(t.await.unwrap());
        }
        let keel = common::keel(&data, port, &[]);
        verify(&keel.endpoint, &mut clients, round, seed).await;
        let in_round = acks.load(Ordering::Relaxed);
        println!("round {round}: killed after {kill_after} acknowledgements, {in_round} in all");
        drop(keel);
    }
    let total: usize = clients.iter().map(|c| c.acknowledged).sum();
    assert!(total > 0, "no write acknowledged");
}
