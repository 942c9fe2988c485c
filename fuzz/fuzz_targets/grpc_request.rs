//! The path of a client request through a member, on arbitrary bytes: the gRPC decode (with the
//! txn nesting check that runs before prost), etcd's validation, the proposal the network side
//! would encode and check, its decode on the storage core, and its apply to a real MVCC store
//! and lessor as the core applies it. Every input is answered (a result or an error), never a
//! panic, and a write that passes the checks applies without a fatal error.

#![no_main]

use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use keel::api::convert;
use keel::raft::proposal::{self, Proposal, Request};
use keel_engine::lease::Lessor;
use keel_engine::mvcc::Store;
use keel_engine::mvcc::apply as a;
use keel_proto::codec;
use keel_proto::etcdserverpb as pb;
use libfuzzer_sys::fuzz_target;
use prost::Message as _;

struct State {
    store: Store,
    lessor: Lessor,
}

fn state() -> &'static Mutex<State> {
    static STATE: OnceLock<Mutex<State>> = OnceLock::new();
    STATE.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("keel-fuzz-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let store = Store::open(dir.join("db"), Default::default()).unwrap();
        let lessor = Lessor::recover(&store, 1, Instant::now()).unwrap();
        Mutex::new(State { store, lessor })
    })
}

/// Applies a checked proposal as the storage core does; a fatal error is a bug.
fn apply(request: Request) {
    let data = Proposal {
        id: 1,
        request: Some(request),
        member: 1,
        auth: None,
    }
    .encode_checked(1_572_864);
    let Ok(data) = data else { return };
    let proposal = proposal::decode(&data).expect("a checked proposal decodes");
    let mut guard = state().lock().unwrap();
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

fuzz_target!(|data: &[u8]| {
    let Some((&kind, body)) = data.split_first() else {
        return;
    };
    match kind % 7 {
        0 => {
            let Ok(r) = pb::RangeRequest::decode(body) else { return };
            if let Ok(r) = convert::range_request(r)
                && a::check_range(&r).is_ok()
            {
                let guard = state().lock().unwrap();
                let _ = a::range(&guard.store.read(), &r);
            }
        }
        1 => {
            let Ok(p) = pb::PutRequest::decode(body) else { return };
            if a::check_put(&convert::put_request(p.clone())).is_ok() {
                apply(Request::Put(p));
            }
        }
        2 => {
            let Ok(d) = pb::DeleteRangeRequest::decode(body) else { return };
            if a::check_delete(&convert::delete_request(d.clone())).is_ok() {
                apply(Request::DeleteRange(d));
            }
        }
        3 => {
            // The codec's check runs before prost decodes a txn.
            if codec::check_txn_request(body).is_err() {
                return;
            }
            let Ok(t) = pb::TxnRequest::decode(body) else { return };
            let Ok(checked) = convert::txn_request(t.clone()) else { return };
            if a::check_txn(&checked, 128).is_ok() {
                apply(Request::Txn(t));
            }
        }
        4 => {
            let Ok(c) = pb::CompactionRequest::decode(body) else { return };
            apply(Request::Compaction(c));
        }
        5 => {
            let Ok(g) = pb::LeaseGrantRequest::decode(body) else { return };
            if g.ttl <= keel_engine::lease::MAX_LEASE_TTL {
                apply(Request::LeaseGrant(g));
            }
        }
        _ => {
            let Ok(r) = pb::LeaseRevokeRequest::decode(body) else { return };
            apply(Request::LeaseRevoke(r));
        }
    }
});
