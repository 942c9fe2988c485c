//! The gRPC request fuzz target's harness (`fuzz/harness/grpc_request.rs`) in the test suite:
//! real requests of every type, damaged in many ways, and random bytes go through the decode,
//! etcd's validation, the proposal's encode and decode, and the apply to a real store, as the
//! fuzzer drives them. A panic or a fatal apply error fails the test. Whatever a local fuzzing
//! run left in `fuzz/corpus/grpc_request` and `fuzz/artifacts/grpc_request` is replayed too.
//! Coverage-guided fuzzing itself is `scripts/fuzz`.

#[path = "../../fuzz/harness/grpc_request.rs"]
mod grpc_request;
#[path = "../../fuzz/harness/inputs.rs"]
mod inputs;

use std::sync::Mutex;

use keel_proto::etcdserverpb as pb;
use pb::compare::{CompareResult, CompareTarget, TargetUnion};
use pb::request_op::Request as Op;
use prost::Message as _;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn put(key: &[u8], value: &[u8], lease: i64) -> pb::PutRequest {
    pb::PutRequest {
        key: key.to_vec(),
        value: value.to_vec(),
        lease,
        prev_kv: true,
        ..Default::default()
    }
}

fn range(key: &[u8], end: &[u8]) -> pb::RangeRequest {
    pb::RangeRequest {
        key: key.to_vec(),
        range_end: end.to_vec(),
        limit: 10,
        revision: 0,
        ..Default::default()
    }
}

/// One valid request of each type, as (type byte, encoding).
fn seeds() -> Vec<(u8, Vec<u8>)> {
    let txn = pb::TxnRequest {
        compare: vec![
            pb::Compare {
                result: CompareResult::Equal as i32,
                target: CompareTarget::Value as i32,
                key: b"a".to_vec(),
                target_union: Some(TargetUnion::Value(b"1".to_vec())),
                ..Default::default()
            },
            pb::Compare {
                result: CompareResult::Greater as i32,
                target: CompareTarget::Mod as i32,
                key: b"a".to_vec(),
                range_end: b"z".to_vec(),
                target_union: Some(TargetUnion::ModRevision(3)),
            },
        ],
        success: vec![
            pb::RequestOp {
                request: Some(Op::RequestPut(put(b"b", b"2", 0))),
            },
            pb::RequestOp {
                request: Some(Op::RequestRange(range(b"a", b"\0"))),
            },
            pb::RequestOp {
                request: Some(Op::RequestTxn(pb::TxnRequest {
                    success: vec![pb::RequestOp {
                        request: Some(Op::RequestDeleteRange(pb::DeleteRangeRequest {
                            key: b"c".to_vec(),
                            range_end: b"d".to_vec(),
                            prev_kv: true,
                        })),
                    }],
                    ..Default::default()
                })),
            },
        ],
        failure: vec![pb::RequestOp {
            request: Some(Op::RequestPut(put(b"a", b"1", 0))),
        }],
    };
    vec![
        (0, range(b"a", b"z").encode_to_vec()),
        (0, range(b"\0", b"\0").encode_to_vec()),
        (1, put(b"a", b"1", 0).encode_to_vec()),
        (1, put(b"k", &[9u8; 300], 7).encode_to_vec()),
        (
            2,
            pb::DeleteRangeRequest {
                key: b"a".to_vec(),
                range_end: b"b".to_vec(),
                prev_kv: true,
            }
            .encode_to_vec(),
        ),
        (3, txn.encode_to_vec()),
        (
            4,
            pb::CompactionRequest {
                revision: 2,
                physical: false,
            }
            .encode_to_vec(),
        ),
        (5, pb::LeaseGrantRequest { ttl: 60, id: 7 }.encode_to_vec()),
        (6, pb::LeaseRevokeRequest { id: 7 }.encode_to_vec()),
    ]
}

#[test]
fn requests_damaged_and_random_are_answered_without_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let state = Mutex::new(grpc_request::State::open(dir.path()));
    let mut rng = StdRng::seed_from_u64(0x6772_7063);
    let mut all = inputs::saved_inputs("grpc_request");
    let with_kind = |k: u8, body: &[u8]| -> Vec<u8> {
        std::iter::once(k).chain(body.iter().copied()).collect()
    };
    for (kind, body) in seeds() {
        // Each valid request as it is (it applies), then damaged, and also read as every
        // other type: a field of one message is garbage to another.
        for k in 0..grpc_request::KINDS {
            all.push(with_kind(k, &body));
        }
        for m in inputs::mutations(&mut rng, &body, 600) {
            let k = if rng.random_range(0..4) == 0 {
                rng.random_range(0..grpc_request::KINDS)
            } else {
                kind
            };
            all.push(with_kind(k, &m));
        }
    }
    all.extend(inputs::random_inputs(&mut rng, 2000, 128));
    for input in &all {
        grpc_request::run(&state, input);
    }
    // The valid requests and many damaged ones were writes that applied.
    let revision = state.lock().unwrap().revision();
    assert!(revision > 100, "only {revision} revisions applied");
}
