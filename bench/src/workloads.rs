//! The requests of each subcommand, built as etcd's benchmark builds them (keys are the varint of
//! a number in the key space, written at the start of a `--key-size` buffer).

use keel_proto::etcdserverpb as pb;
use pb::request_op::Request as OpRequest;
use rand::Rng;
use rand::rngs::SmallRng;

use crate::run::{Op, Workload};

/// Key number `n` as etcd's benchmark writes it: `binary.PutVarint` (zig-zag) into `size` bytes.
/// A key size too small for the varint keeps its first `size` bytes, as Go's would panic instead.
pub fn key(n: u64, size: usize) -> Vec<u8> {
    let mut k = vec![0u8; size.max(1)];
    let mut v = (n << 1) ^ ((n as i64 >> 63) as u64);
    let mut i = 0;
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if i < k.len() {
            k[i] = if v == 0 { byte } else { byte | 0x80 };
        }
        i += 1;
        if v == 0 {
            break;
        }
    }
    k
}

/// A value of `size` random-looking bytes (made once per run).
pub fn value(size: usize) -> Vec<u8> {
    let mut rng = rand::rng();
    (0..size).map(|_| rng.random_range(b'a'..=b'z')).collect()
}

fn key_number(i: u64, sequential: bool, space: u64, rng: &mut SmallRng) -> u64 {
    if sequential {
        i % space.max(1)
    } else {
        rng.random_range(0..space.max(1))
    }
}

/// `put`.
#[derive(Debug, Clone)]
pub struct Put {
    pub key_size: usize,
    pub value: Vec<u8>,
    pub sequential: bool,
    pub key_space: u64,
}

impl Workload for Put {
    fn op(&self, i: u64, rng: &mut SmallRng) -> (usize, Op) {
        let n = key_number(i, self.sequential, self.key_space, rng);
        let r = pb::PutRequest {
            key: key(n, self.key_size),
            value: self.value.clone(),
            ..Default::default()
        };
        (0, Op::Put(r))
    }
}

/// `range KEY [END]`.
#[derive(Debug, Clone)]
pub struct Range {
    pub key: Vec<u8>,
    pub end: Vec<u8>,
    pub serializable: bool,
    pub limit: i64,
    pub count_only: bool,
}

impl Range {
    fn request(&self) -> pb::RangeRequest {
        pb::RangeRequest {
            key: self.key.clone(),
            range_end: self.end.clone(),
            serializable: self.serializable,
            limit: self.limit,
            count_only: self.count_only,
            ..Default::default()
        }
    }
}

impl Workload for Range {
    fn op(&self, _i: u64, _rng: &mut SmallRng) -> (usize, Op) {
        (0, Op::Range(self.request()))
    }
}

/// Point reads of random keys of a key space (the keys `put`, `txn-put` and `compare
/// --store-keys` write): how a read scales with the size of the store.
#[derive(Debug, Clone)]
pub struct RangeRandom {
    pub key_size: usize,
    pub key_space: u64,
    pub serializable: bool,
}

impl Workload for RangeRandom {
    fn op(&self, _i: u64, rng: &mut SmallRng) -> (usize, Op) {
        let n = rng.random_range(0..self.key_space.max(1));
        let r = pb::RangeRequest {
            key: key(n, self.key_size),
            serializable: self.serializable,
            ..Default::default()
        };
        (0, Op::Range(r))
    }
}

fn put_op(key: Vec<u8>, value: &[u8]) -> pb::RequestOp {
    pb::RequestOp {
        request: Some(OpRequest::RequestPut(pb::PutRequest {
            key,
            value: value.to_vec(),
            ..Default::default()
        })),
    }
}

/// `txn-put`: transactions of `--txn-ops` puts of consecutive keys.
#[derive(Debug, Clone)]
pub struct TxnPut {
    pub key_size: usize,
    pub value: Vec<u8>,
    pub ops: u64,
    pub key_space: u64,
}

impl Workload for TxnPut {
    fn op(&self, i: u64, _rng: &mut SmallRng) -> (usize, Op) {
        let success = (0..self.ops)
            .map(|j| {
                let n = (i * self.ops + j) % self.key_space.max(1);
                put_op(key(n, self.key_size), &self.value)
            })
            .collect();
        (
            0,
            Op::Txn(pb::TxnRequest {
                success,
                ..Default::default()
            }),
        )
    }
}

/// `txn-mixed KEY [END]`: transactions that read the range (a share of `rw_ratio / (1 +
/// rw_ratio)`) or put one random key; reads and writes are reported apart.
#[derive(Debug, Clone)]
pub struct TxnMixed {
    pub read: Range,
    pub rw_ratio: f64,
    pub key_size: usize,
    pub value: Vec<u8>,
    pub key_space: u64,
}

impl Workload for TxnMixed {
    fn op(&self, _i: u64, rng: &mut SmallRng) -> (usize, Op) {
        let read_share = self.rw_ratio / (1.0 + self.rw_ratio);
        if rng.random::<f64>() < read_share {
            let op = pb::RequestOp {
                request: Some(OpRequest::RequestRange(self.read.request())),
            };
            (
                0,
                Op::Txn(pb::TxnRequest {
                    success: vec![op],
                    ..Default::default()
                }),
            )
        } else {
            let n = rng.random_range(0..self.key_space.max(1));
            let op = put_op(key(n, self.key_size), &self.value);
            (
                1,
                Op::Txn(pb::TxnRequest {
                    success: vec![op],
                    ..Default::default()
                }),
            )
        }
    }

    fn classes(&self) -> Vec<&'static str> {
        vec!["Read", "Write"]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn keys_are_go_varints_in_a_fixed_size_buffer() {
        assert_eq!(key(0, 8), vec![0; 8]);
        assert_eq!(key(1, 8), vec![2, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(key(64, 4), vec![0x80, 0x01, 0, 0]);
        assert_eq!(key(300, 3), vec![0xd8, 0x04, 0]);
        assert_eq!(key(u64::from(u32::MAX), 2).len(), 2, "truncated, no panic");
    }

    #[test]
    fn sequential_puts_cycle_through_the_key_space() {
        let w = Put {
            key_size: 8,
            value: value(16),
            sequential: true,
            key_space: 3,
        };
        let mut rng = SmallRng::seed_from_u64(1);
        let keys: Vec<Vec<u8>> = (0..6)
            .map(|i| match w.op(i, &mut rng).1 {
                Op::Put(p) => p.key,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(keys[0], keys[3]);
        assert_eq!(keys[2], key(2, 8));
        assert_ne!(keys[0], keys[1]);
    }

    #[test]
    fn random_ranges_stay_in_the_key_space() {
        let w = RangeRandom {
            key_size: 8,
            key_space: 5,
            serializable: true,
        };
        let mut rng = SmallRng::seed_from_u64(1);
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..200 {
            match w.op(i, &mut rng).1 {
                Op::Range(r) => {
                    assert!(r.serializable && r.range_end.is_empty());
                    seen.insert(r.key);
                }
                other => panic!("{other:?}"),
            }
        }
        let all: std::collections::BTreeSet<Vec<u8>> = (0..5).map(|n| key(n, 8)).collect();
        assert_eq!(seen, all);
    }

    #[test]
    fn txn_put_has_distinct_keys_and_mixed_follows_the_ratio() {
        let w = TxnPut {
            key_size: 8,
            value: value(8),
            ops: 4,
            key_space: 1000,
        };
        let mut rng = SmallRng::seed_from_u64(1);
        match w.op(7, &mut rng).1 {
            Op::Txn(t) => {
                assert_eq!(t.success.len(), 4);
                assert_eq!(t.success[0], put_op(key(28, 8), &w.value));
            }
            other => panic!("{other:?}"),
        }
        let m = TxnMixed {
            read: Range {
                key: b"foo".to_vec(),
                end: vec![],
                serializable: false,
                limit: 0,
                count_only: false,
            },
            rw_ratio: 3.0,
            key_size: 8,
            value: value(8),
            key_space: 10,
        };
        let reads = (0..10_000).filter(|&i| m.op(i, &mut rng).0 == 0).count();
        assert!(
            (7000..8000).contains(&reads),
            "{reads} reads of 10000 at 3:1"
        );
    }
}
