//! Model-based test of the MVCC store: random Put / DeleteRange / Txn / Compact / Range (at old
//! revisions too) / Reopen sequences, applied through etcd's request semantics
//! (`mvcc::apply`) and to a naive model that keeps a full copy of the key space per revision.
//! Every response must equal the model's. proptest prints the failing sequence, shrunk.

use std::collections::BTreeMap;

use keel_engine::Error;
use keel_engine::btree::BackendOptions;
use keel_engine::mvcc::apply::{
    self, Compare, CompareResult, CompareTarget, DeleteRangeRequest, PutRequest, RangeRequest,
    RequestOp, ResponseOp, TargetUnion, TxnRequest,
};
use keel_engine::mvcc::{KeyValue, Store};
use proptest::prelude::*;

type State = BTreeMap<Vec<u8>, KeyValue>;

/// The model: the key space after every revision.
struct Model {
    states: BTreeMap<i64, State>,
    current: i64,
    compact: i64,
}

impl Model {
    fn new() -> Model {
        Model {
            states: BTreeMap::from([(1, State::new())]),
            current: 1,
            compact: -1,
        }
    }

    fn at(&self, rev: i64) -> &State {
        self.states
            .range(..=rev)
            .next_back()
            .expect("revision 1 exists")
            .1
    }

    fn range(&self, r: &RangeRequest) -> Result<(i64, Vec<KeyValue>, i64, bool), Error> {
        if r.revision > self.current {
            return Err(Error::FutureRev);
        }
        let rev = if r.revision <= 0 {
            self.current
        } else {
            r.revision
        };
        if rev < self.compact {
            return Err(Error::Compacted);
        }
        let kvs: Vec<KeyValue> = self
            .at(rev)
            .values()
            .filter(|kv| in_range(&kv.key, &r.key, &r.range_end))
            .cloned()
            .collect();
        let count = kvs.len() as i64;
        let mut kvs = if r.count_only { Vec::new() } else { kvs };
        let mut more = false;
        if r.limit > 0 && kvs.len() > r.limit as usize {
            kvs.truncate(r.limit as usize);
            more = true;
        }
        Ok((self.current, kvs, count, more))
    }
}

fn in_range(k: &[u8], key: &[u8], end: &[u8]) -> bool {
    match end {
        [] => k == key,
        [0] => k >= key,
        end => k >= key && k < end,
    }
}

/// Applies write ops to `state` at revision `rev` (a txn's working copy). Returns whether
/// anything changed.
fn model_write(state: &mut State, rev: i64, op: &ModelOp) -> bool {
    match op {
        ModelOp::Put(k, v) => {
            let (create, version) = match state.get(k) {
                Some(p) => (p.create_revision, p.version + 1),
                None => (rev, 1),
            };
            state.insert(
                k.clone(),
                KeyValue {
                    key: k.clone(),
                    create_revision: create,
                    mod_revision: rev,
                    version,
                    value: v.clone(),
                    lease: 0,
                },
            );
            true
        }
        ModelOp::Delete(k, end) => {
            let victims: Vec<_> = state
                .keys()
                .filter(|x| in_range(x, k, end))
                .cloned()
                .collect();
            for v in &victims {
                state.remove(v);
            }
            !victims.is_empty()
        }
    }
}

#[derive(Debug, Clone)]
enum ModelOp {
    Put(Vec<u8>, Vec<u8>),
    Delete(Vec<u8>, Vec<u8>),
}

#[derive(Debug, Clone)]
enum Op {
    Write(ModelOp),
    /// A txn: compare a key's version, then one branch of writes or the other.
    Txn {
        key: Vec<u8>,
        version: i64,
        result: u8,
        success: Vec<ModelOp>,
        failure: Vec<ModelOp>,
    },
    Range {
        key: Vec<u8>,
        end: Vec<u8>,
        back: i64,
        limit: i64,
        count_only: bool,
    },
    Compact {
        back: i64,
    },
    Reopen,
}

fn key() -> impl Strategy<Value = Vec<u8>> {
    (0..12u8).prop_map(|k| format!("k{k:02}").into_bytes())
}

fn range_end() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        2 => Just(Vec::new()),
        1 => Just(vec![0u8]),
        2 => (0..13u8).prop_map(|k| format!("k{k:02}").into_bytes()),
    ]
}

fn write() -> impl Strategy<Value = ModelOp> {
    prop_oneof![
        3 => (key(), proptest::collection::vec(any::<u8>(), 0..20)).prop_map(|(k, v)| ModelOp::Put(k, v)),
        1 => (key(), range_end()).prop_map(|(k, e)| ModelOp::Delete(k, e)),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => write().prop_map(Op::Write),
        3 => (key(), 0..4i64, 0..4u8, proptest::collection::vec(write(), 0..3), proptest::collection::vec(write(), 0..3))
            .prop_map(|(key, version, result, success, failure)| Op::Txn { key, version, result, success, failure }),
        5 => (key(), range_end(), 0..6i64, 0..4i64, any::<bool>())
            .prop_map(|(key, end, back, limit, count_only)| Op::Range { key, end, back, limit, count_only }),
        1 => (0..8i64).prop_map(|back| Op::Compact { back }),
        1 => Just(Op::Reopen),
    ]
}

fn to_request(op: &ModelOp) -> RequestOp {
    match op {
        ModelOp::Put(k, v) => RequestOp::Put(PutRequest {
            key: k.clone(),
            value: v.clone(),
            ..Default::default()
        }),
        ModelOp::Delete(k, e) => RequestOp::DeleteRange(DeleteRangeRequest {
            key: k.clone(),
            range_end: e.clone(),
            ..Default::default()
        }),
    }
}

fn options() -> BackendOptions {
    BackendOptions {
        page_size: 1024,
        min_grow_bytes: 32 << 10,
        ..BackendOptions::default()
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]
    #[test]
    fn store_matches_a_model(ops in proptest::collection::vec(op(), 1..80)) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let mut store = Store::open(&path, options()).unwrap();
        let mut model = Model::new();
        for op in &ops {
            match op {
                Op::Write(w) => {
                    let rev = model.current + 1;
                    let mut state = model.at(model.current).clone();
                    let changed = model_write(&mut state, rev, w);
                    match to_request(w) {
                        RequestOp::Put(p) => {
                            let (resp, _) = apply::put_request(&store, &p, &apply::NoLeases, None).unwrap();
                            prop_assert_eq!(resp.revision, rev);
                        }
                        RequestOp::DeleteRange(d) => {
                            let (resp, _) = apply::delete_request(&store, &d, None).unwrap();
                            let deleted = model.at(model.current).keys().filter(|k| in_range(k, &d.key, &d.range_end)).count();
                            prop_assert_eq!(resp.deleted, deleted as i64);
                            prop_assert_eq!(resp.revision, if changed { rev } else { model.current });
                        }
                        _ => unreachable!(),
                    }
                    if changed {
                        model.states.insert(rev, state);
                        model.current = rev;
                    }
                }
                Op::Txn { key, version, result, success, failure } => {
                    let results = [CompareResult::Equal, CompareResult::Greater, CompareResult::Less, CompareResult::NotEqual];
                    let cmp = Compare {
                        result: results[*result as usize],
                        target: CompareTarget::Version,
                        key: key.clone(),
                        target_union: Some(TargetUnion::Version(*version)),
                        range_end: Vec::new(),
                    };
                    let req = TxnRequest {
                        compare: vec![cmp],
                        success: success.iter().map(to_request).collect(),
                        failure: failure.iter().map(to_request).collect(),
                    };
                    if apply::check_txn(&req, 128).is_err() {
                        continue; // duplicate keys: refused before it reaches the store
                    }
                    let have = model.at(model.current).get(key).map_or(0, |kv| kv.version);
                    let ok = match results[*result as usize] {
                        CompareResult::Equal => have == *version,
                        CompareResult::Greater => have > *version,
                        CompareResult::Less => have < *version,
                        CompareResult::NotEqual => have != *version,
                    };
                    let rev = model.current + 1;
                    let mut state = model.at(model.current).clone();
                    let mut changed = false;
                    for w in if ok { success } else { failure } {
                        changed |= model_write(&mut state, rev, w);
                    }
                    let (resp, changes) = apply::txn(&store, &req, &apply::NoLeases, None).unwrap();
                    prop_assert_eq!(resp.succeeded, ok);
                    // Puts always change; deletes only if they hit something.
                    prop_assert_eq!(!changes.is_empty(), changed);
                    prop_assert_eq!(resp.revision, if changed { rev } else { model.current });
                    if changed {
                        model.states.insert(rev, state);
                        model.current = rev;
                    }
                }
                Op::Range { key, end, back, limit, count_only } => {
                    let revision = if *back == 0 { 0 } else { model.current - back + 1 };
                    let req = RangeRequest { key: key.clone(), range_end: end.clone(), limit: *limit, revision, count_only: *count_only, ..Default::default() };
                    let got = apply::range(&store.read(), &req);
                    match (got, model.range(&req)) {
                        (Ok(resp), Ok((rev, kvs, count, more))) => {
                            prop_assert_eq!(resp.revision, rev);
                            prop_assert_eq!(resp.kvs, kvs);
                            prop_assert_eq!(resp.count, count);
                            prop_assert_eq!(resp.more, more);
                        }
                        (Err(a), Err(b)) => prop_assert_eq!(a.to_string(), b.to_string()),
                        (a, b) => prop_assert!(false, "store {:?} model {:?}", a, b),
                    }
                }
                Op::Compact { back } => {
                    let rev = model.current - back;
                    let expected = if rev <= model.compact {
                        Err(Error::Compacted)
                    } else if rev > model.current {
                        Err(Error::FutureRev)
                    } else {
                        Ok(())
                    };
                    let got = store.compact(rev);
                    prop_assert_eq!(got.is_ok(), expected.is_ok(), "compact {} got {:?}", rev, got);
                    if let (Err(a), Err(b)) = (&got, &expected) {
                        prop_assert_eq!(a.to_string(), b.to_string());
                    }
                    if got.is_ok() {
                        model.compact = rev;
                    }
                    store.backend().check().unwrap();
                }
                Op::Reopen => {
                    store.sync().unwrap();
                    drop(store);
                    store = Store::open(&path, options()).unwrap();
                    prop_assert_eq!(store.current_revision(), model.current);
                    prop_assert_eq!(store.compact_revision(), model.compact);
                }
            }
            // Every readable revision still reads as the model says.
            let from = model.compact.max(1);
            for rev in [from, (from + model.current) / 2, model.current] {
                let req = RangeRequest { key: vec![0], range_end: vec![0], revision: rev, ..Default::default() };
                let resp = apply::range(&store.read(), &req).unwrap();
                prop_assert_eq!(resp.kvs, model.at(rev).values().cloned().collect::<Vec<_>>(), "at revision {}", rev);
            }
        }
    }
}

#[test]
fn consistent_index_is_stored_with_the_data() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let store = Store::open(&path, options()).unwrap();
    assert_eq!(store.consistent_index().unwrap(), (0, 0));
    let put = PutRequest {
        key: b"a".to_vec(),
        value: b"1".to_vec(),
        ..Default::default()
    };
    apply::put_request(&store, &put, &apply::NoLeases, Some((41, 3))).unwrap();
    // Not synced: a crash now would lose both the data and the index, together.
    assert_eq!(store.consistent_index().unwrap(), (41, 3));
    store.sync().unwrap();
    drop(store);
    let store = Store::open(&path, options()).unwrap();
    assert_eq!(store.consistent_index().unwrap(), (41, 3));
    assert_eq!(store.current_revision(), 2);
    let kv = &apply::range(
        &store.read(),
        &RangeRequest {
            key: b"a".to_vec(),
            ..Default::default()
        },
    )
    .unwrap()
    .kvs[0];
    assert_eq!((kv.create_revision, kv.mod_revision, kv.version), (2, 2, 1));
}

#[test]
fn put_options_and_txn_responses_follow_etcd() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("db"), options()).unwrap();
    let put = |k: &str, v: &str| PutRequest {
        key: k.into(),
        value: v.into(),
        ..Default::default()
    };
    // ignore_value on a missing key: "key not found", nothing written.
    let p = PutRequest {
        key: b"a".to_vec(),
        ignore_value: true,
        ..Default::default()
    };
    let err = apply::put_request(&store, &p, &apply::NoLeases, None).unwrap_err();
    assert_eq!(err.to_string(), "etcdserver: key not found");
    assert_eq!(store.current_revision(), 1);
    // A lease that does not exist: etcd's error, nothing written.
    let err = apply::put_request(
        &store,
        &PutRequest {
            lease: 7,
            ..put("a", "v1")
        },
        &apply::NoLeases,
        None,
    )
    .unwrap_err();
    assert_eq!(err.to_string(), "etcdserver: requested lease not found");
    assert_eq!(store.current_revision(), 1);
    let lease_7 = |id: i64| id == 7;
    apply::put_request(
        &store,
        &PutRequest {
            lease: 7,
            ..put("a", "v1")
        },
        &lease_7,
        None,
    )
    .unwrap();
    // prev_kv and ignore_value/ignore_lease keep the old value and lease.
    let p = PutRequest {
        key: b"a".to_vec(),
        ignore_value: true,
        ignore_lease: true,
        prev_kv: true,
        ..Default::default()
    };
    let (resp, _) = apply::put_request(&store, &p, &apply::NoLeases, None).unwrap();
    assert_eq!(resp.revision, 3);
    assert_eq!(resp.prev_kv.unwrap().value, b"v1");
    let kv = &apply::range(
        &store.read(),
        &RangeRequest {
            key: b"a".to_vec(),
            ..Default::default()
        },
    )
    .unwrap()
    .kvs[0];
    assert_eq!(
        (kv.value.as_slice(), kv.lease, kv.version),
        (&b"v1"[..], 7, 2)
    );

    // A txn: all writes share one revision; later ops see earlier ones; nested txns.
    let txn = TxnRequest {
        compare: vec![Compare {
            key: b"a".to_vec(),
            target: CompareTarget::Value,
            result: CompareResult::Equal,
            target_union: Some(TargetUnion::Value(b"v1".to_vec())),
            range_end: vec![],
        }],
        success: vec![
            RequestOp::Put(put("b", "1")),
            RequestOp::Range(RangeRequest {
                key: b"b".to_vec(),
                ..Default::default()
            }),
            RequestOp::Txn(TxnRequest {
                compare: vec![],
                success: vec![RequestOp::Put(put("c", "2"))],
                failure: vec![],
            }),
            RequestOp::DeleteRange(DeleteRangeRequest {
                key: b"a".to_vec(),
                prev_kv: true,
                ..Default::default()
            }),
        ],
        failure: vec![],
    };
    apply::check_txn(&txn, 128).unwrap();
    let (resp, changes) = apply::txn(&store, &txn, &apply::NoLeases, None).unwrap();
    assert!(resp.succeeded);
    assert_eq!(resp.revision, 4);
    assert_eq!(changes.len(), 3);
    let ResponseOp::Range(r) = &resp.responses[1] else {
        panic!()
    };
    assert_eq!((r.revision, r.kvs[0].mod_revision), (4, 4));
    let ResponseOp::Txn(n) = &resp.responses[2] else {
        panic!()
    };
    assert_eq!(n.revision, 0, "nested txn headers are empty in etcd");
    let ResponseOp::DeleteRange(d) = &resp.responses[3] else {
        panic!()
    };
    assert_eq!((d.deleted, d.prev_kvs.len(), d.revision), (1, 1, 4));
    // A value compare against a missing key is false; a version compare sees version 0.
    let t = TxnRequest {
        compare: vec![Compare {
            key: b"zz".to_vec(),
            target: CompareTarget::Version,
            result: CompareResult::Equal,
            target_union: Some(TargetUnion::Version(0)),
            range_end: vec![],
        }],
        ..Default::default()
    };
    assert!(
        apply::txn(&store, &t, &apply::NoLeases, None)
            .unwrap()
            .0
            .succeeded
    );
    let t = TxnRequest {
        compare: vec![Compare {
            key: b"zz".to_vec(),
            target: CompareTarget::Value,
            result: CompareResult::Equal,
            target_union: Some(TargetUnion::Value(vec![])),
            range_end: vec![],
        }],
        ..Default::default()
    };
    let (resp, changes) = apply::txn(&store, &t, &apply::NoLeases, None).unwrap();
    assert!(!resp.succeeded);
    assert!(changes.is_empty());
    assert_eq!(
        resp.revision, 4,
        "a read-only txn does not bump the revision"
    );
    // Sorting and filters.
    for (k, v) in [("s1", "c"), ("s2", "a"), ("s3", "b")] {
        apply::put_request(&store, &put(k, v), &apply::NoLeases, None).unwrap();
    }
    let r = RangeRequest {
        key: b"s".to_vec(),
        range_end: b"t".to_vec(),
        sort_target: apply::SortTarget::Value,
        sort_order: apply::SortOrder::Descend,
        limit: 2,
        ..Default::default()
    };
    let resp = apply::range(&store.read(), &r).unwrap();
    let keys: Vec<_> = resp.kvs.iter().map(|kv| kv.key.clone()).collect();
    assert_eq!(keys, vec![b"s1".to_vec(), b"s3".to_vec()]);
    assert!(resp.more);
    assert_eq!(resp.count, 3);
    let r = RangeRequest {
        key: b"s".to_vec(),
        range_end: b"t".to_vec(),
        min_mod_revision: 6,
        keys_only: true,
        ..Default::default()
    };
    let resp = apply::range(&store.read(), &r).unwrap();
    assert_eq!(resp.kvs.len(), 2);
    assert!(resp.kvs.iter().all(|kv| kv.value.is_empty()));
    assert_eq!(resp.count, 3, "count ignores the filters, as in etcd");
}

/// A batch of requests in one backend transaction: each still gets its own revision, later ones
/// see earlier ones, and readers see none of them until the batch ends.
#[test]
fn a_batch_applies_many_revisions_in_one_backend_commit() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("db"), options()).unwrap();
    let before = store.backend().txid();
    let mut w = store.write().unwrap();
    let mut revisions = Vec::new();
    for i in 0..5 {
        let req = PutRequest {
            key: b"k".to_vec(),
            value: vec![i],
            ..Default::default()
        };
        revisions.push(apply::put(&mut w, &req, &apply::NoLeases).unwrap().revision);
        assert_eq!(w.finish_revision().len(), 1);
    }
    // A read-only txn in the batch does not take a revision.
    let t = TxnRequest {
        success: vec![RequestOp::Range(RangeRequest {
            key: b"k".to_vec(),
            ..Default::default()
        })],
        ..Default::default()
    };
    let resp = apply::txn_in(&mut w, &t, &apply::NoLeases).unwrap();
    assert!(w.finish_revision().is_empty());
    let ResponseOp::Range(r) = &resp.responses[0] else {
        panic!()
    };
    assert_eq!((r.kvs[0].version, r.kvs[0].value.clone()), (5, vec![4]));
    assert_eq!(
        store.current_revision(),
        1,
        "nothing published before the end"
    );
    assert!(w.end(Some((10, 2))).unwrap().is_empty());
    assert_eq!(revisions, vec![2, 3, 4, 5, 6]);
    assert_eq!(store.current_revision(), 6);
    assert_eq!(
        store.backend().txid(),
        before + 1,
        "one backend commit for the batch"
    );
    let old = RangeRequest {
        key: b"k".to_vec(),
        revision: 3,
        ..Default::default()
    };
    assert_eq!(
        apply::range(&store.read(), &old).unwrap().kvs[0].value,
        vec![1]
    );
}

/// Reads at fixed revisions from other threads while the writer keeps writing and compacting
/// below them: every read returns the same answer as before, or fails with ErrCompacted once
/// its revision is compacted. Readers never wait for the writer.
#[test]
fn reads_at_a_revision_run_beside_the_writer() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path().join("db"), options()).unwrap());
    for i in 0..200u32 {
        let req = PutRequest {
            key: format!("k{:03}", i % 50).into_bytes(),
            value: i.to_le_bytes().to_vec(),
            ..Default::default()
        };
        apply::put_request(&store, &req, &apply::NoLeases, None).unwrap();
    }
    let pinned = store.current_revision();
    let all = RangeRequest {
        key: vec![0],
        range_end: vec![0],
        revision: pinned,
        ..Default::default()
    };
    let expected = apply::range(&store.read(), &all).unwrap().kvs;
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..3)
        .map(|_| {
            let (store, stop, all, expected) =
                (store.clone(), stop.clone(), all.clone(), expected.clone());
            std::thread::spawn(move || {
                let mut reads = 0;
                while !stop.load(Ordering::Relaxed) {
                    assert_eq!(apply::range(&store.read(), &all).unwrap().kvs, expected);
                    reads += 1;
                }
                reads
            })
        })
        .collect();
    for i in 0..3000u32 {
        let req = PutRequest {
            key: format!("k{:03}", i % 80).into_bytes(),
            value: vec![1; (i % 300) as usize],
            ..Default::default()
        };
        apply::put_request(&store, &req, &apply::NoLeases, None).unwrap();
        if i % 1000 == 999 {
            store.sync().unwrap();
        }
    }
    // Compact below the pinned revision: the pinned reads must keep working.
    store.compact(pinned - 1).unwrap();
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        assert!(r.join().unwrap() > 0);
    }
    assert_eq!(apply::range(&store.read(), &all).unwrap().kvs, expected);
    store.compact(pinned + 10).unwrap();
    let err = apply::range(&store.read(), &all).unwrap_err();
    assert_eq!(
        err.to_string(),
        "mvcc: required revision has been compacted"
    );
    store.backend().check().unwrap();
}

/// Review finding: a txn whose later put (`ignore_value`) needs a key its own earlier delete
/// removed used to fail half-applied, leaving tombstones in the index that never reached the
/// backend. It is refused before it writes anything, and the store is unchanged.
#[test]
fn a_txn_that_would_fail_half_way_is_refused_whole() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("db"), options()).unwrap();
    for k in ["a", "b", "c"] {
        apply::put_request(
            &store,
            &PutRequest {
                key: k.into(),
                value: b"v".to_vec(),
                ..Default::default()
            },
            &apply::NoLeases,
            None,
        )
        .unwrap();
    }
    let before = apply::range(
        &store.read(),
        &RangeRequest {
            key: vec![0],
            range_end: vec![0],
            ..Default::default()
        },
    )
    .unwrap();
    let t = TxnRequest {
        success: vec![
            RequestOp::DeleteRange(DeleteRangeRequest {
                key: b"a".to_vec(),
                range_end: vec![0],
                ..Default::default()
            }),
            RequestOp::Put(PutRequest {
                key: b"b".to_vec(),
                ignore_value: true,
                ..Default::default()
            }),
        ],
        ..Default::default()
    };
    apply::check_txn(&t, 128).unwrap(); // etcd's duplicate-key rule lets it through
    let err = apply::txn(&store, &t, &apply::NoLeases, None).unwrap_err();
    assert_eq!(err.to_string(), "etcdserver: key not found");
    let after = apply::range(
        &store.read(),
        &RangeRequest {
            key: vec![0],
            range_end: vec![0],
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(after, before);
    // The next writes see a consistent index (this used to panic on an out-of-order revision).
    let (resp, _) = apply::put_request(
        &store,
        &PutRequest {
            key: b"b".into(),
            value: b"w".to_vec(),
            prev_kv: true,
            ..Default::default()
        },
        &apply::NoLeases,
        None,
    )
    .unwrap();
    assert_eq!(resp.revision, 5);
    assert_eq!(resp.prev_kv.unwrap().version, 1);
    // A put after a delete of its key in the same txn, with a re-put in between, is fine.
    let t = TxnRequest {
        success: vec![
            RequestOp::DeleteRange(DeleteRangeRequest {
                key: b"c".to_vec(),
                ..Default::default()
            }),
            RequestOp::Txn(TxnRequest {
                success: vec![RequestOp::Put(PutRequest {
                    key: b"c".into(),
                    value: b"new".to_vec(),
                    ..Default::default()
                })],
                ..Default::default()
            }),
        ],
        ..Default::default()
    };
    assert!(
        apply::txn(&store, &t, &apply::NoLeases, None)
            .unwrap()
            .0
            .succeeded
    );
}

/// A write transaction dropped without `end` leaves the index as it found it.
#[test]
fn a_dropped_write_transaction_undoes_its_index_changes() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("db"), options()).unwrap();
    apply::put_request(
        &store,
        &PutRequest {
            key: b"a".into(),
            value: b"1".to_vec(),
            ..Default::default()
        },
        &apply::NoLeases,
        None,
    )
    .unwrap();
    {
        let mut w = store.write().unwrap();
        w.put(b"a", b"2", 0).unwrap();
        w.put(b"new", b"x", 0).unwrap();
        w.delete_range(b"a", None).unwrap();
    }
    let (resp, _) = apply::put_request(
        &store,
        &PutRequest {
            key: b"a".into(),
            value: b"3".to_vec(),
            prev_kv: true,
            ..Default::default()
        },
        &apply::NoLeases,
        None,
    )
    .unwrap();
    assert_eq!(resp.revision, 3);
    let prev = resp.prev_kv.unwrap();
    assert_eq!((prev.value.as_slice(), prev.version), (&b"1"[..], 1));
    let r = apply::range(
        &store.read(),
        &RangeRequest {
            key: b"new".to_vec(),
            ..Default::default()
        },
    )
    .unwrap();
    assert!(r.kvs.is_empty());
    let mut w = store.write().unwrap();
    w.put(b"a", b"4", 0).unwrap();
    w.fail();
    assert!(w.end(None).is_err());
    assert_eq!(store.current_revision(), 3);
}
