//! The path of a client request through a member, on arbitrary bytes: the gRPC decode (with the
//! txn nesting check that runs before prost), etcd's validation, the proposal the network side
//! would encode and check, its decode on the storage core, and its apply to a real MVCC store
//! and lessor as the core applies it. Every input is answered (a result or an error), never a
//! panic, and a write that passes the checks applies without a fatal error.
//!
//! Shared by the fuzz target (`fuzz_targets/grpc_request.rs`) and the test that replays inputs
//! through it in the test suite (`server/tests/fuzz_inputs.rs`).

use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

use keel::api::convert;
use keel::raft::proposal::{self, Proposal, Request};
use keel_engine::lease::Lessor;
use keel_engine::mvcc::Store;
use keel_engine::mvcc::apply as a;
use keel_proto::codec;
use keel_proto::etcdserverpb as pb;
use prost::Message as _;

/// The store and lessor that inputs are applied to, as a member's storage core holds them.
pub struct State {
    store: Store,
    lessor: Lessor,
}

impl State {
    /// A new store in `dir` (created).
    pub fn open(dir: &Path) -> State {
        std::fs::create_dir_all(dir).unwrap();
        let store = Store::open(dir.join("db"), Default::default()).unwrap();
        let lessor = Lessor::recover(&store, 1, Instant::now()).unwrap();
        State { store, lessor }
    }

    /// The store's current revision: how many writes applied (the test suite's check; the fuzz
    /// target does not use it).
    #[allow(dead_code)]
    pub fn revision(&self) -> i64 {
        self.store.current_revision()
    }
}

/// Applies a checked proposal as the storage core does; a fatal error is a bug.
fn apply(state: &Mutex<State>, request: Request) {
    let data = Proposal {
        id: 1,
        request: Some(request),
        member: 1,
        auth: None,
    }
    .encode_checked(1_572_864);
    let Ok(data) = data else { return };
    let proposal = proposal::decode(&data).expect("a checked proposal decodes");
    let mut guard = state.lock().unwrap();
    let State { store, lessor } = &mut *guard;
    let result = match proposal.request.expect("set") {
        Request::Compaction(c) => store.compact(c.revision),
        request => {
            let mut w = store.write().unwrap();
            let r = match request {
                Request::Put(p) => a::put(&mut w, &convert::put_request(p), &*lessor).map(drop),
                Request::DeleteRange(d) => {
                    a::delete_range(&mut w, &convert::delete_request(d)).map(drop)
                }
                Request::Txn(t) => match convert::txn_request(t) {
                    Ok(t) => a::txn_in(&mut w, &t, &*lessor).map(drop),
                    Err(_) => Ok(()),
                },
                Request::LeaseGrant(g) if g.id != 0 => {
                    lessor.grant(&mut w, g.id, g.ttl, Instant::now()).map(drop)
                }
                Request::LeaseRevoke(r) => lessor.revoke(&mut w, r.id),
                _ => Ok(()),
            };
            let changes = w.finish_revision();
            lessor.apply_changes(&changes);
            match r {
                Ok(()) => w.end(None).map(drop),
                Err(e) => {
                    assert!(!e.is_fatal(), "fatal apply error: {e}");
                    w.end(None).map(drop)
                }
            }
        }
    };
    if let Err(e) = result {
        assert!(!e.is_fatal(), "fatal error: {e}");
    }
}

/// One input: its first byte picks the request type (see [`KINDS`]), the rest is the request's
/// protobuf encoding.
pub fn run(state: &Mutex<State>, data: &[u8]) {
    let Some((&kind, body)) = data.split_first() else {
        return;
    };
    match kind % KINDS {
        0 => {
            let Ok(r) = pb::RangeRequest::decode(body) else {
                return;
            };
            if let Ok(r) = convert::range_request(r)
                && a::check_range(&r).is_ok()
            {
                let guard = state.lock().unwrap();
                let _ = a::range(&guard.store.read(), &r);
            }
        }
        1 => {
            let Ok(p) = pb::PutRequest::decode(body) else {
                return;
            };
            if a::check_put(&convert::put_request(p.clone())).is_ok() {
                apply(state, Request::Put(p));
            }
        }
        2 => {
            let Ok(d) = pb::DeleteRangeRequest::decode(body) else {
                return;
            };
            if a::check_delete(&convert::delete_request(d.clone())).is_ok() {
                apply(state, Request::DeleteRange(d));
            }
        }
        3 => {
            // The codec's check runs before prost decodes a txn.
            if codec::check_txn_request(body).is_err() {
                return;
            }
            let Ok(t) = pb::TxnRequest::decode(body) else {
                return;
            };
            let Ok(checked) = convert::txn_request(t.clone()) else {
                return;
            };
            if a::check_txn(&checked, 128).is_ok() {
                apply(state, Request::Txn(t));
            }
        }
        4 => {
            let Ok(c) = pb::CompactionRequest::decode(body) else {
                return;
            };
            apply(state, Request::Compaction(c));
        }
        5 => {
            let Ok(g) = pb::LeaseGrantRequest::decode(body) else {
                return;
            };
            if g.ttl <= keel_engine::lease::MAX_LEASE_TTL {
                apply(state, Request::LeaseGrant(g));
            }
        }
        _ => {
            let Ok(r) = pb::LeaseRevokeRequest::decode(body) else {
                return;
            };
            apply(state, Request::LeaseRevoke(r));
        }
    }
}

/// Request types, by the first byte of an input modulo this: range, put, delete-range, txn,
/// compaction, lease grant, lease revoke.
pub const KINDS: u8 = 7;
