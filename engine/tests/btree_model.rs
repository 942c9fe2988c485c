//! Model-based test of the backend: random put / delete / commit (deferred or durable) / abort /
//! reopen / pinned-reader sequences against a `BTreeMap`. After every commit `check()` must pass
//! and the contents must equal the model; a reopen must find exactly the last *durable* state;
//! a reader pinned earlier must keep seeing its state. Small pages make deep trees and overflow
//! runs common. proptest prints the failing sequence, shrunk.

use std::collections::BTreeMap;

use keel_engine::btree::{Backend, BackendOptions, ReadTxn};
use proptest::prelude::*;

type Model = BTreeMap<Vec<u8>, Vec<u8>>;

#[derive(Debug, Clone)]
enum Op {
    Put { key: u16, len: u16, fill: u8 },
    Delete { key: u16 },
    DeleteRun { from: u16, count: u16 },
    Commit { sync: bool },
    Abort,
    Reopen,
    PinReader,
    CheckReader,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        20 => (0..400u16, prop_oneof![4 => 0..200u16, 1 => 200..3000u16], any::<u8>())
            .prop_map(|(key, len, fill)| Op::Put { key, len, fill }),
        6 => (0..400u16).prop_map(|key| Op::Delete { key }),
        1 => (0..400u16, 1..120u16).prop_map(|(from, count)| Op::DeleteRun { from, count }),
        4 => any::<bool>().prop_map(|sync| Op::Commit { sync }),
        1 => Just(Op::Abort),
        1 => Just(Op::Reopen),
        1 => Just(Op::PinReader),
        1 => Just(Op::CheckReader),
    ]
}

/// Keys of varied length (up to 205 bytes, near the limit for 1 KiB pages), so that splits and
/// merges meet separators of different sizes.
fn key(k: u16) -> Vec<u8> {
    let mut key = format!("k{k:05}").into_bytes();
    if k.is_multiple_of(4) {
        key.resize(6 + (k as usize * 37) % 200, b'~');
    }
    key
}

fn options() -> BackendOptions {
    BackendOptions {
        page_size: 1024,
        min_grow_bytes: 32 << 10,
        ..BackendOptions::default()
    }
}

fn contents(r: &ReadTxn) -> Model {
    r.range(b"b", b"", None)
        .unwrap()
        .map(|kv| kv.map(|(k, v)| (k.to_vec(), v.to_vec())).unwrap())
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
    #[test]
    fn backend_matches_a_btreemap(ops in proptest::collection::vec(op(), 1..120)) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let mut db = Backend::open(&path, options()).unwrap();
        let mut txn = db.begin_write().unwrap();
        txn.create_bucket(b"b").unwrap();
        txn.commit(true).unwrap();
        let mut committed = Model::new();
        let mut durable = Model::new();
        let mut pending = committed.clone();
        let mut reader: Option<(ReadTxn, Model)> = None;
        let mut writes: Vec<Op> = Vec::new();
        for op in &ops {
            match op {
                Op::Put { .. } | Op::Delete { .. } | Op::DeleteRun { .. } => writes.push(op.clone()),
                Op::Commit { sync } => {
                    let mut txn = db.begin_write().unwrap();
                    for w in writes.drain(..) {
                        match w {
                            Op::Put { key: k, len, fill } => {
                                let v = vec![fill; len as usize];
                                txn.put(b"b", &key(k), &v).unwrap();
                                pending.insert(key(k), v);
                            }
                            Op::Delete { key: k } => {
                                let had = txn.delete(b"b", &key(k)).unwrap();
                                prop_assert_eq!(had, pending.remove(&key(k)).is_some());
                            }
                            Op::DeleteRun { from, count } => {
                                for k in from..from.saturating_add(count) {
                                    let had = txn.delete(b"b", &key(k)).unwrap();
                                    prop_assert_eq!(had, pending.remove(&key(k)).is_some());
                                }
                            }
                            _ => unreachable!(),
                        }
                    }
                    txn.commit(*sync).unwrap();
                    committed = pending.clone();
                    if *sync {
                        durable = committed.clone();
                    }
                    db.check().unwrap();
                    prop_assert_eq!(contents(&db.begin_read()), committed.clone());
                }
                Op::Abort => {
                    writes.clear();
                    pending = committed.clone();
                }
                Op::Reopen => {
                    writes.clear();
                    reader = None;
                    drop(db);
                    db = Backend::open(&path, options()).unwrap();
                    committed = durable.clone();
                    pending = durable.clone();
                    db.check().unwrap();
                    prop_assert_eq!(contents(&db.begin_read()), durable.clone());
                }
                Op::PinReader => reader = Some((db.begin_read(), committed.clone())),
                Op::CheckReader => {
                    if let Some((r, m)) = &reader {
                        prop_assert_eq!(&contents(r), m);
                    }
                }
            }
        }
    }
}
