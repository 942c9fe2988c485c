//! Differential test: a seeded random sequence of KV operations (Put with its options, Range with
//! every option, DeleteRange, Txn with compares and nested txns, Compact) sent to `keel` and to a
//! real etcd 3.4 (Debian's `etcd-server`), both on free loopback ports with temporary data dirs.
//! Every response must be equal field by field (cluster and member ids and the raft term in the
//! top header excepted), and every error must have the same gRPC code and message. The seed is
//! printed; `KEEL_DIFF_SEED` replays it, `KEEL_DIFF_OPS` sets the length.

mod common;

use keel_proto::etcdserverpb as pb;
use keel_proto::etcdserverpb::kv_client::KvClient;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tonic::transport::Channel;

const KEYS: u32 = 10;

fn key(rng: &mut StdRng) -> Vec<u8> {
    format!("k{}", rng.random_range(0..KEYS)).into_bytes()
}

/// A range end: single key, prefix, from-key ("\0"), or an explicit end.
fn range_end(rng: &mut StdRng, key: &[u8]) -> Vec<u8> {
    match rng.random_range(0..4) {
        0 => Vec::new(),
        1 => {
            let mut e = key.to_vec();
            *e.last_mut().unwrap() += 1;
            e
        }
        2 => vec![0],
        _ => format!("k{}", rng.random_range(0..KEYS + 1)).into_bytes(),
    }
}

fn range(rng: &mut StdRng, current: i64) -> pb::RangeRequest {
    let key = if rng.random_bool(0.02) {
        Vec::new()
    } else {
        key(rng)
    };
    let range_end = if key.is_empty() {
        Vec::new()
    } else {
        range_end(rng, &key)
    };
    let revision = match rng.random_range(0..10) {
        0..=5 => 0,
        6..=8 => (current - rng.random_range(0..8)).max(1),
        _ => current + rng.random_range(1..3),
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

fn put(rng: &mut StdRng, standalone: bool) -> pb::PutRequest {
    let ignore_value = standalone && rng.random_bool(0.05);
    pb::PutRequest {
        key: key(rng),
        value: if ignore_value {
            Vec::new()
        } else {
            format!("v{}", rng.random_range(0..1000)).into_bytes()
        },
        lease: if rng.random_bool(0.03) { 12345 } else { 0 },
        prev_kv: rng.random_bool(0.4),
        ignore_value,
        ignore_lease: standalone && rng.random_bool(0.05),
    }
}

fn delete(rng: &mut StdRng) -> pb::DeleteRangeRequest {
    let key = key(rng);
    let range_end = range_end(rng, &key);
    pb::DeleteRangeRequest {
        key,
        range_end,
        prev_kv: rng.random_bool(0.4),
    }
}

fn compare(rng: &mut StdRng, current: i64) -> pb::Compare {
    use pb::compare::TargetUnion as U;
    let key = key(rng);
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
            range_end(rng, &key)
        } else {
            Vec::new()
        },
        key,
        target_union: Some(union),
    }
}

fn ops(rng: &mut StdRng, current: i64, depth: u32) -> Vec<pb::RequestOp> {
    use pb::request_op::Request as R;
    (0..rng.random_range(0..4))
        .map(|_| pb::RequestOp {
            request: Some(match rng.random_range(0..10) {
                0..=2 => R::RequestRange(range(rng, current)),
                3..=6 => R::RequestPut(put(rng, false)),
                7..=8 => R::RequestDeleteRange(delete(rng)),
                _ if depth == 0 => R::RequestTxn(txn(rng, current, depth + 1)),
                _ => R::RequestPut(put(rng, false)),
            }),
        })
        .collect()
}

fn txn(rng: &mut StdRng, current: i64, depth: u32) -> pb::TxnRequest {
    pb::TxnRequest {
        compare: (0..rng.random_range(0..3))
            .map(|_| compare(rng, current))
            .collect(),
        success: ops(rng, current, depth),
        failure: ops(rng, current, depth),
    }
}

#[derive(Debug)]
enum Op {
    Range(pb::RangeRequest),
    Put(pb::PutRequest),
    Delete(pb::DeleteRangeRequest),
    Txn(pb::TxnRequest),
    Compact(pb::CompactionRequest),
}

/// The response as text with the top header's ids and term cleared, or the error's code and
/// message.
async fn send(client: &mut KvClient<Channel>, op: &Op) -> (Option<i64>, String) {
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
        .unwrap_or(1500);
    println!("seed {seed}, {count} operations (KEEL_DIFF_SEED / KEEL_DIFF_OPS to replay)");
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let etcd_server = common::etcd(&dir.path().join("etcd"), &[]);
    let keel_server = common::keel(&dir.path().join("keel"), common::free_port(), &[]);
    let mut etcd = KvClient::connect(etcd_server.endpoint.clone())
        .await
        .unwrap();
    let mut keel = KvClient::connect(keel_server.endpoint.clone())
        .await
        .unwrap();
    let mut current = 1i64;
    for i in 0..count {
        let op = match rng.random_range(0..100) {
            0..=29 => Op::Range(range(&mut rng, current)),
            30..=59 => Op::Put(put(&mut rng, true)),
            60..=71 => Op::Delete(delete(&mut rng)),
            72..=97 => Op::Txn(txn(&mut rng, current, 0)),
            _ => Op::Compact(pb::CompactionRequest {
                revision: current - rng.random_range(0..6),
                physical: rng.random_bool(0.5),
            }),
        };
        let (etcd_rev, expected) = send(&mut etcd, &op).await;
        let (_, got) = send(&mut keel, &op).await;
        assert_eq!(got, expected, "seed {seed}, operation {i}: {op:?}");
        if let Some(rev) = etcd_rev {
            current = current.max(rev);
        }
    }
}
