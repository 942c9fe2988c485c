//! Differential test: a seeded random sequence of KV and Lease operations (Put with its options
//! and leases, Range with every option, DeleteRange, Txn with compares and nested txns, Compact,
//! lease Grant/Revoke/TimeToLive/Leases) sent to `keel` and to a real etcd 3.4 (Debian's
//! `etcd-server`), both on free loopback ports with temporary data dirs. Every response must be
//! equal field by field (cluster and member ids and the raft term in the top header excepted),
//! and every error must have the same gRPC code and message. Watches opened before the run (all
//! keys with previous values; a range with a filter) must deliver the same events. The seed is
//! printed; `KEEL_DIFF_SEED` replays it, `KEEL_DIFF_OPS` sets the length.
//!
//! A second test runs four clients at once, each in its own key space, and replays their
//! operations on etcd in the order Keel's history gives them (see
//! `concurrent_clients_answer_like_etcd_replaying_their_order`).

mod common;

use keel_proto::etcdserverpb as pb;
use keel_proto::etcdserverpb::kv_client::KvClient;
use keel_proto::etcdserverpb::lease_client::LeaseClient;
use keel_proto::etcdserverpb::watch_client::WatchClient;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tonic::transport::Channel;

const KEYS: u32 = 10;

/// Where a client's operations go: its keys are `{prefix}0` .. `{prefix}9`, its lease IDs
/// `lease_base + 1..=5`. The single-client test has the whole key space (`k`, ranges up to the
/// end of all keys, future revisions); concurrent clients each keep to their own, so that
/// every answer they get depends only on their own operations and the order of the revisions.
struct Space {
    prefix: String,
    lease_base: i64,
    shared: bool,
}

impl Space {
    fn whole() -> Space {
        Space {
            prefix: "k".into(),
            lease_base: 0,
            shared: true,
        }
    }

    fn client(c: usize) -> Space {
        Space {
            prefix: format!("c{c}/k"),
            lease_base: 1000 * (c as i64 + 1),
            shared: false,
        }
    }

    /// Just past every key of the space.
    fn end(&self) -> Vec<u8> {
        let mut e = self.prefix.clone().into_bytes();
        e.pop();
        *e.last_mut().unwrap() += 1;
        e
    }
}

/// Lease IDs used: 1..=4 are granted now and then, 5 never.
fn lease_id(rng: &mut StdRng, sp: &Space) -> i64 {
    sp.lease_base + rng.random_range(1..=5)
}

fn key(rng: &mut StdRng, sp: &Space) -> Vec<u8> {
    format!("{}{}", sp.prefix, rng.random_range(0..KEYS)).into_bytes()
}

/// A range end: single key, prefix, from-key ("\0", or the end of the space), or an explicit
/// end.
fn range_end(rng: &mut StdRng, sp: &Space, key: &[u8]) -> Vec<u8> {
    match rng.random_range(0..4) {
        0 => Vec::new(),
        1 => {
            let mut e = key.to_vec();
            *e.last_mut().unwrap() += 1;
            e
        }
        2 if sp.shared => vec![0],
        2 => sp.end(),
        _ => format!("{}{}", sp.prefix, rng.random_range(0..KEYS + 1)).into_bytes(),
    }
}

fn range(rng: &mut StdRng, sp: &Space, current: i64) -> pb::RangeRequest {
    let key = if rng.random_bool(0.02) {
        Vec::new()
    } else {
        key(rng, sp)
    };
    let range_end = if key.is_empty() {
        Vec::new()
    } else {
        range_end(rng, sp, &key)
    };
    let revision = match rng.random_range(0..10) {
        0..=5 => 0,
        6..=8 => (current - rng.random_range(0..8)).max(1),
        // A future revision: only where the client knows the current one.
        _ if sp.shared => current + rng.random_range(1..3),
        _ => 0,
    };
    let filter = |rng: &mut StdRng| {
        if rng.random_bool(0.15) {
            (current - rng.random_range(0..10)).max(1)
        } else {
            0
        }
    };
    pb::RangeRequest {
        key,
        range_end,
        limit: if rng.random_bool(0.3) {
            rng.random_range(1..4)
        } else {
            0
        },
        revision,
        sort_order: if rng.random_bool(0.3) {
            rng.random_range(0..3)
        } else {
            0
        },
        sort_target: if rng.random_bool(0.3) {
            rng.random_range(0..5)
        } else {
            0
        },
        serializable: rng.random_bool(0.3),
        keys_only: rng.random_bool(0.2),
        count_only: rng.random_bool(0.1),
        min_mod_revision: filter(rng),
        max_mod_revision: filter(rng),
        min_create_revision: filter(rng),
        max_create_revision: filter(rng),
    }
}

fn put(rng: &mut StdRng, sp: &Space, standalone: bool) -> pb::PutRequest {
    let ignore_value = standalone && rng.random_bool(0.05);
    pb::PutRequest {
        key: key(rng, sp),
        value: if ignore_value {
            Vec::new()
        } else {
            format!("v{}", rng.random_range(0..1000)).into_bytes()
        },
        lease: if rng.random_bool(0.15) {
            lease_id(rng, sp)
        } else {
            0
        },
        prev_kv: rng.random_bool(0.4),
        ignore_value,
        ignore_lease: standalone && rng.random_bool(0.05),
    }
}

fn delete(rng: &mut StdRng, sp: &Space) -> pb::DeleteRangeRequest {
    let key = key(rng, sp);
    let range_end = range_end(rng, sp, &key);
    pb::DeleteRangeRequest {
        key,
        range_end,
        prev_kv: rng.random_bool(0.4),
    }
}

fn compare(rng: &mut StdRng, sp: &Space, current: i64) -> pb::Compare {
    use pb::compare::TargetUnion as U;
    let key = key(rng, sp);
    let target = rng.random_range(0..4);
    let union = match target {
        0 => U::Version(rng.random_range(0..4)),
        1 => U::CreateRevision((current - rng.random_range(0..10)).max(0)),
        2 => U::ModRevision((current - rng.random_range(0..10)).max(0)),
        _ => U::Value(format!("v{}", rng.random_range(0..1000)).into_bytes()),
    };
    pb::Compare {
        result: rng.random_range(0..4),
        target,
        range_end: if rng.random_bool(0.2) {
            range_end(rng, sp, &key)
        } else {
            Vec::new()
        },
        key,
        target_union: Some(union),
    }
}

fn ops(rng: &mut StdRng, sp: &Space, current: i64, depth: u32) -> Vec<pb::RequestOp> {
    use pb::request_op::Request as R;
    (0..rng.random_range(0..4))
        .map(|_| pb::RequestOp {
            request: Some(match rng.random_range(0..10) {
                0..=2 => R::RequestRange(range(rng, sp, current)),
                3..=6 => R::RequestPut(put(rng, sp, false)),
                7..=8 => R::RequestDeleteRange(delete(rng, sp)),
                _ if depth == 0 => R::RequestTxn(txn(rng, sp, current, depth + 1)),
                _ => R::RequestPut(put(rng, sp, false)),
            }),
        })
        .collect()
}

fn txn(rng: &mut StdRng, sp: &Space, current: i64, depth: u32) -> pb::TxnRequest {
    pb::TxnRequest {
        compare: (0..rng.random_range(0..3))
            .map(|_| compare(rng, sp, current))
            .collect(),
        success: ops(rng, sp, current, depth),
        failure: ops(rng, sp, current, depth),
    }
}

/// The next operation: everything the single client does; concurrent clients leave out
/// Compact and Leases (they concern every client), turned into ranges.
fn operation(rng: &mut StdRng, sp: &Space, current: i64) -> Op {
    match rng.random_range(0..100) {
        0..=25 => Op::Range(range(rng, sp, current)),
        26..=52 => Op::Put(put(rng, sp, true)),
        53..=63 => Op::Delete(delete(rng, sp)),
        64..=87 => Op::Txn(txn(rng, sp, current, 0)),
        88..=89 if sp.shared => Op::Compact(pb::CompactionRequest {
            revision: current - rng.random_range(0..6),
            physical: rng.random_bool(0.5),
        }),
        90..=93 => Op::Grant(pb::LeaseGrantRequest {
            ttl: 300,
            id: sp.lease_base + rng.random_range(1..=4),
        }),
        94..=95 => Op::Revoke(pb::LeaseRevokeRequest {
            id: lease_id(rng, sp),
        }),
        96..=98 => Op::TimeToLive(pb::LeaseTimeToLiveRequest {
            id: lease_id(rng, sp),
            keys: rng.random_bool(0.5),
        }),
        _ if sp.shared => Op::Leases,
        _ => Op::Range(range(rng, sp, current)),
    }
}

#[derive(Debug, Clone)]
enum Op {
    Range(pb::RangeRequest),
    Put(pb::PutRequest),
    Delete(pb::DeleteRangeRequest),
    Txn(pb::TxnRequest),
    Compact(pb::CompactionRequest),
    Grant(pb::LeaseGrantRequest),
    Revoke(pb::LeaseRevokeRequest),
    TimeToLive(pb::LeaseTimeToLiveRequest),
    Leases,
}

/// The clients of one server.
struct Clients {
    kv: KvClient<Channel>,
    lease: LeaseClient<Channel>,
}

/// The response as text with the top header's ids and term cleared, or the error's code and
/// message.
async fn send(clients: &mut Clients, op: &Op) -> (Option<i64>, String) {
    let (client, lease) = (&mut clients.kv, &mut clients.lease);
    fn clean(h: &mut Option<pb::ResponseHeader>) -> Option<i64> {
        let h = h.as_mut()?;
        h.cluster_id = 0;
        h.member_id = 0;
        h.raft_term = 0;
        Some(h.revision)
    }
    let result = match op {
        Op::Range(r) => client.range(r.clone()).await.map(|r| {
            let mut r = r.into_inner();
            (clean(&mut r.header), format!("{r:?}"))
        }),
        Op::Put(r) => client.put(r.clone()).await.map(|r| {
            let mut r = r.into_inner();
            (clean(&mut r.header), format!("{r:?}"))
        }),
        Op::Delete(r) => client.delete_range(r.clone()).await.map(|r| {
            let mut r = r.into_inner();
            (clean(&mut r.header), format!("{r:?}"))
        }),
        Op::Txn(r) => client.txn(r.clone()).await.map(|r| {
            let mut r = r.into_inner();
            (clean(&mut r.header), format!("{r:?}"))
        }),
        Op::Compact(r) => client.compact(*r).await.map(|r| {
            let mut r = r.into_inner();
            (clean(&mut r.header), format!("{r:?}"))
        }),
        Op::Grant(r) => lease.lease_grant(*r).await.map(|r| {
            let mut r = r.into_inner();
            (clean(&mut r.header), format!("{r:?}"))
        }),
        Op::Revoke(r) => lease.lease_revoke(*r).await.map(|r| {
            let mut r = r.into_inner();
            (clean(&mut r.header), format!("{r:?}"))
        }),
        Op::TimeToLive(r) => lease.lease_time_to_live(*r).await.map(|r| {
            let mut r = r.into_inner();
            // The remaining TTL depends on timing: whether it is positive is compared. etcd
            // lists the keys in no particular order.
            r.ttl = r.ttl.signum();
            r.keys.sort();
            (clean(&mut r.header), format!("{r:?}"))
        }),
        Op::Leases => lease
            .lease_leases(pb::LeaseLeasesRequest {})
            .await
            .map(|r| {
                let mut r = r.into_inner();
                r.leases.sort_by_key(|l| l.id);
                (clean(&mut r.header), format!("{r:?}"))
            }),
    };
    match result {
        Ok(x) => x,
        Err(s) => (None, format!("error {:?}: {}", s.code(), s.message())),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn random_kv_operations_answer_exactly_like_etcd() {
    let seed: u64 = std::env::var("KEEL_DIFF_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    let count: usize = std::env::var("KEEL_DIFF_OPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3000);
    println!("seed {seed}, {count} operations (KEEL_DIFF_SEED / KEEL_DIFF_OPS to replay)");
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let etcd_server = common::etcd(&dir.path().join("etcd"), &[]);
    let keel_server = common::keel(&dir.path().join("keel"), common::free_port(), &[]);
    let connect = |endpoint: String| async move {
        let channel = Channel::from_shared(endpoint)
            .unwrap()
            .connect()
            .await
            .unwrap();
        Clients {
            kv: KvClient::new(channel.clone()),
            lease: LeaseClient::new(channel),
        }
    };
    let mut etcd = connect(etcd_server.endpoint.clone()).await;
    let mut keel = connect(keel_server.endpoint.clone()).await;
    let etcd_watch = Watches::open(&etcd_server.endpoint).await;
    let keel_watch = Watches::open(&keel_server.endpoint).await;
    let mut current = 1i64;
    let space = Space::whole();
    for i in 0..count {
        let op = operation(&mut rng, &space, current);
        let (etcd_rev, expected) = send(&mut etcd, &op).await;
        let (_, got) = send(&mut keel, &op).await;
        assert_eq!(got, expected, "seed {seed}, operation {i}: {op:?}");
        if let Some(rev) = etcd_rev {
            current = current.max(rev);
        }
    }
    // The watches saw the same events.
    let (_, end) = send(
        &mut etcd,
        &Op::Put(pb::PutRequest {
            key: b"zz-end".to_vec(),
            ..Default::default()
        }),
    )
    .await;
    send(
        &mut keel,
        &Op::Put(pb::PutRequest {
            key: b"zz-end".to_vec(),
            ..Default::default()
        }),
    )
    .await;
    let expected = etcd_watch.finish().await;
    let got = keel_watch.finish().await;
    assert!(!expected[0].is_empty(), "no events watched ({end})");
    for (w, (e, g)) in expected.iter().zip(&got).enumerate() {
        for (n, (e, g)) in e.iter().zip(g).enumerate() {
            assert_eq!(g, e, "seed {seed}: watch {w}, event {n}");
        }
        assert_eq!(g.len(), e.len(), "seed {seed}: watch {w}: events");
    }
}

/// Two watches on one stream, opened before the operations: every key from revision 1 with
/// previous values, and keys from "k5" on without deletes. Collected until the "zz-end" key.
struct Watches {
    task: tokio::task::JoinHandle<[Vec<String>; 2]>,
}

impl Watches {
    async fn open(endpoint: &str) -> Watches {
        use futures::StreamExt;
        use pb::watch_request::RequestUnion;
        let create = |req: pb::WatchCreateRequest| pb::WatchRequest {
            request_union: Some(RequestUnion::CreateRequest(req)),
        };
        let requests = vec![
            create(pb::WatchCreateRequest {
                key: vec![0],
                range_end: vec![0],
                start_revision: 1,
                prev_kv: true,
                ..Default::default()
            }),
            create(pb::WatchCreateRequest {
                key: b"k5".to_vec(),
                range_end: vec![0],
                filters: vec![pb::watch_create_request::FilterType::Nodelete as i32],
                ..Default::default()
            }),
        ];
        // The request side stays open for the whole run.
        let requests = futures::stream::iter(requests).chain(futures::stream::pending());
        let mut client = WatchClient::connect(endpoint.to_string()).await.unwrap();
        let mut stream = client.watch(requests).await.unwrap().into_inner();
        let mut created = 0;
        while created < 2 {
            let r = stream.message().await.unwrap().unwrap();
            created += usize::from(r.created);
        }
        // The history watch must be caught up before the operations start: a compaction while
        // it is still replaying would cancel it, on etcd as on keel.
        let mut seen: [Vec<String>; 2] = [Vec::new(), Vec::new()];
        KvClient::connect(endpoint.to_string())
            .await
            .unwrap()
            .put(pb::PutRequest {
                key: b"a-sync".to_vec(),
                ..Default::default()
            })
            .await
            .unwrap();
        'sync: loop {
            let r = stream.message().await.unwrap().unwrap();
            for e in &r.events {
                seen[r.watch_id as usize].push(format!("{e:?}"));
                if e.kv.as_ref().is_some_and(|kv| kv.key.as_ref() == b"a-sync") {
                    break 'sync;
                }
            }
        }
        let endpoint = endpoint.to_string();
        let task = tokio::spawn(async move {
            let mut ended = [false, false];
            while !(ended[0] && ended[1]) {
                let r = tokio::time::timeout(std::time::Duration::from_secs(30), stream.message())
                    .await
                    .unwrap_or_else(|_| {
                        panic!(
                            "{endpoint}: no watch events for 30 s; ended {ended:?}, seen {} and {}",
                            seen[0].len(),
                            seen[1].len()
                        )
                    })
                    .unwrap()
                    .unwrap();
                assert!(
                    !r.canceled,
                    "{endpoint}: watch {} canceled: {r:?} after {} and {} events",
                    r.watch_id,
                    seen[0].len(),
                    seen[1].len()
                );
                let w = r.watch_id as usize;
                for e in &r.events {
                    if e.kv.as_ref().is_some_and(|kv| kv.key.as_ref() == b"zz-end") {
                        ended[w] = true;
                    }
                    seen[w].push(format!("{e:?}"));
                }
            }
            seen
        });
        Watches { task }
    }

    async fn finish(self) -> [Vec<String>; 2] {
        self.task.await.unwrap()
    }
}

/// An operation of a concurrent client as Keel answered it: the header's revision (`None` for
/// an error) and the answer's text.
struct Answered {
    op: Op,
    rev: Option<i64>,
    text: String,
}

async fn connect(endpoint: &str) -> Clients {
    let channel = Channel::from_shared(endpoint.to_string())
        .unwrap()
        .connect()
        .await
        .unwrap();
    Clients {
        kv: KvClient::new(channel.clone()),
        lease: LeaseClient::new(channel),
    }
}

/// Client `c`'s operations, each sent once the previous one was answered.
async fn concurrent_client(endpoint: String, c: usize, seed: u64, count: usize) -> Vec<Answered> {
    let mut rng = StdRng::seed_from_u64(seed ^ (c as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let space = Space::client(c);
    let mut clients = connect(&endpoint).await;
    let mut current = 1;
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let op = operation(&mut rng, &space, current);
        let (rev, text) = send(&mut clients, &op).await;
        if let Some(r) = rev {
            current = current.max(r);
        }
        out.push(Answered { op, rev, text });
    }
    out
}

/// Every event from revision 1 to `upto`: its revision, its key and the whole event formatted.
async fn history(endpoint: &str, upto: i64) -> Vec<(i64, Vec<u8>, String)> {
    use futures::StreamExt;
    use pb::watch_request::RequestUnion;
    let mut events = Vec::new();
    if upto < 2 {
        return events;
    }
    let create = pb::WatchRequest {
        request_union: Some(RequestUnion::CreateRequest(pb::WatchCreateRequest {
            key: vec![0],
            range_end: vec![0],
            start_revision: 1,
            ..Default::default()
        })),
    };
    let requests = futures::stream::iter([create]).chain(futures::stream::pending());
    let mut client = WatchClient::connect(endpoint.to_string()).await.unwrap();
    let mut stream = client.watch(requests).await.unwrap().into_inner();
    let mut last = 0;
    while last < upto {
        let r = tokio::time::timeout(std::time::Duration::from_secs(60), stream.message())
            .await
            .expect("history events")
            .unwrap()
            .unwrap();
        assert!(!r.canceled, "{endpoint}: history watch canceled: {r:?}");
        for e in &r.events {
            let kv = e.kv.as_ref().unwrap();
            last = kv.mod_revision;
            events.push((last, kv.key.to_vec(), format!("{e:?}")));
        }
    }
    events
}

/// Differential test with concurrent clients: four clients, each in its own key space and with
/// its own lease IDs, send seeded random operations to Keel at the same time (so Keel batches
/// them). The history then tells which client wrote each revision; with each client's answers
/// that fixes one order of all the operations: a write at its revision, anything else after the
/// revision its answer carries, each client's operations in its own order. Replayed in that
/// order by one client on etcd, every answer must equal Keel's, field by field, and the two
/// histories must be equal event by event. The seed is printed; `KEEL_DIFF_SEED` replays the
/// operations (not their interleaving), `KEEL_DIFF_OPS` sets each client's count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_clients_answer_like_etcd_replaying_their_order() {
    const CLIENTS: usize = 4;
    let seed: u64 = std::env::var("KEEL_DIFF_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    let count: usize = std::env::var("KEEL_DIFF_OPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(500);
    println!(
        "seed {seed}, {CLIENTS} clients of {count} operations (KEEL_DIFF_SEED / KEEL_DIFF_OPS)"
    );
    let dir = tempfile::tempdir().unwrap();
    let etcd_server = common::etcd(&dir.path().join("etcd"), &[]);
    let keel_server = common::keel(&dir.path().join("keel"), common::free_port(), &[]);
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|c| {
            tokio::spawn(concurrent_client(
                keel_server.endpoint.clone(),
                c,
                seed,
                count,
            ))
        })
        .collect();
    let mut answered = Vec::new();
    for t in tasks {
        answered.push(t.await.unwrap());
    }
    let mut keel = connect(&keel_server.endpoint).await;
    let (current, _) = send(
        &mut keel,
        &Op::Range(pb::RangeRequest {
            key: b"zz".to_vec(),
            ..Default::default()
        }),
    )
    .await;
    let current = current.unwrap();
    let keel_history = history(&keel_server.endpoint, current).await;

    // Which client wrote each revision.
    let mut owned: Vec<std::collections::VecDeque<i64>> = vec![Default::default(); CLIENTS];
    let mut rev = 1;
    for (r, key, _) in &keel_history {
        let (r, key) = (*r, String::from_utf8_lossy(key));
        let client: usize = key[1..key.find('/').unwrap()].parse().unwrap();
        if r != rev {
            assert_eq!(r, rev + 1, "seed {seed}: revisions are dense");
            owned[client].push_back(r);
            rev = r;
        } else {
            assert_eq!(
                owned[client].back(),
                Some(&r),
                "seed {seed}: one writer per revision"
            );
        }
    }
    assert_eq!(
        rev, current,
        "seed {seed}: the history reaches the current revision"
    );

    // One order of every operation.
    let mut order = Vec::new();
    for (c, ops) in answered.iter().enumerate() {
        let mut owned = owned[c].clone();
        let mut last = (0, 0, c, 0);
        for (i, a) in ops.iter().enumerate() {
            let at = match a.rev {
                None => (last.0.max(1), 1, c, i),
                Some(r) => {
                    let writes = match (&a.op, owned.front()) {
                        (_, None) => false,
                        (Op::Revoke(_), Some(&w)) => w <= r,
                        (_, Some(&w)) => w == r,
                    };
                    if writes {
                        (owned.pop_front().unwrap(), 0, c, i)
                    } else {
                        (r, 1, c, i)
                    }
                }
            };
            assert!(
                at > last,
                "seed {seed}: client {c} operation {i} answered at {at:?} after {last:?}"
            );
            last = at;
            order.push(at);
        }
        assert!(
            owned.is_empty(),
            "seed {seed}: client {c} wrote revisions {owned:?} no answer accounts for"
        );
    }
    order.sort_unstable();
    let errors = answered
        .iter()
        .flatten()
        .filter(|a| a.rev.is_none())
        .count();
    println!(
        "{} operations, {} revisions, {errors} errors",
        order.len(),
        current - 1
    );

    // Replayed on etcd in that order.
    let mut etcd = connect(&etcd_server.endpoint).await;
    for (n, &(_, _, c, i)) in order.iter().enumerate() {
        let a = &answered[c][i];
        let (_, expected) = send(&mut etcd, &a.op).await;
        assert_eq!(
            a.text, expected,
            "seed {seed}: client {c} operation {i} (replayed {n}th): {:?}",
            a.op
        );
    }
    let etcd_history = history(&etcd_server.endpoint, current).await;
    assert_eq!(
        etcd_history.len(),
        keel_history.len(),
        "seed {seed}: events"
    );
    for (n, (e, k)) in etcd_history.iter().zip(&keel_history).enumerate() {
        assert_eq!(k.2, e.2, "seed {seed}: event {n}");
    }
}
