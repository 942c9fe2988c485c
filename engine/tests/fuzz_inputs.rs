//! The fuzz targets' harnesses (`fuzz/harness/`) in the test suite: every input of a fixed,
//! seeded set goes through the same code the fuzzer drives, so a decoder that panics on bad
//! bytes fails here, in seconds, without cargo-fuzz's instrumented build. The inputs are real
//! encodings (WAL records, the pages of a real backend file) damaged in many ways, random
//! bytes, and whatever a local fuzzing run left in `fuzz/corpus/` and `fuzz/artifacts/`.
//! Coverage-guided fuzzing itself is `scripts/fuzz`.

#[path = "../../fuzz/harness/btree_page.rs"]
mod btree_page;
#[path = "../../fuzz/harness/inputs.rs"]
mod inputs;
#[path = "../../fuzz/harness/wal_record.rs"]
mod wal_record;

use inputs::{mutations, random_inputs, saved_inputs};
use keel_engine::btree::{Backend, BackendOptions};
use keel_engine::wal::record::{Metadata, RecordRef, SnapshotMarker};
use raft::eraftpb::{ConfState, Entry, EntryType, HardState};
use rand::SeedableRng;
use rand::rngs::StdRng;

fn wal_seeds() -> Vec<Vec<u8>> {
    let mut entry = Entry::default();
    entry.set_entry_type(EntryType::EntryNormal);
    entry.index = 42;
    entry.term = 3;
    entry.data = b"a proposal's bytes".to_vec().into();
    entry.context = b"ctx".to_vec().into();
    let mut conf = Entry::default();
    conf.set_entry_type(EntryType::EntryConfChange);
    conf.index = 43;
    conf.term = 3;
    let hs = HardState {
        term: 3,
        vote: 1,
        commit: 42,
        ..Default::default()
    };
    let conf_state = ConfState {
        voters: vec![1, 2, 3],
        learners: vec![4],
        ..Default::default()
    };
    let snapshot = SnapshotMarker {
        index: 40,
        term: 2,
        conf_state,
    };
    let metadata = Metadata {
        cluster_id: 0x1234,
        member_id: 0x5678,
    };
    let records = [
        RecordRef::Metadata(&metadata),
        RecordRef::Snapshot(&snapshot),
        RecordRef::Entry(&entry),
        RecordRef::Entry(&conf),
        RecordRef::HardState(&hs),
    ];
    let mut seeds = Vec::new();
    let mut all = Vec::new();
    for r in records {
        let mut one = Vec::new();
        r.encode(0, 0, &mut one);
        seeds.push(one);
        r.encode(0, 0, &mut all);
    }
    seeds.push(all);
    seeds
}

#[test]
fn wal_record_decoders_take_damaged_and_random_bytes() {
    let mut rng = StdRng::seed_from_u64(0x0057_414c);
    let mut inputs = saved_inputs("wal_record");
    for seed in wal_seeds() {
        inputs.extend(mutations(&mut rng, &seed, 2000));
        // The harness frames everything after the first byte as a payload of the type it
        // picks: so the payload decoders see real payloads, damaged.
        let payload = seed
            .get(keel_engine::wal::record::HEADER_LEN..)
            .unwrap_or_default();
        for t in 0..5u8 {
            let framed: Vec<u8> = std::iter::once(t).chain(payload.iter().copied()).collect();
            inputs.extend(mutations(&mut rng, &framed, 400));
        }
    }
    inputs.extend(random_inputs(&mut rng, 5000, 256));
    for input in &inputs {
        wal_record::run(input);
    }
}

/// Pages of a real backend file: meta pages, branches, leaves, the catalog, overflow.
fn btree_seeds() -> Vec<Vec<u8>> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    {
        let b = Backend::open(&path, BackendOptions::default()).unwrap();
        b.create_etcd_buckets().unwrap();
        let mut txn = b.begin_write().unwrap();
        for i in 0..3000u32 {
            let key = format!("key-{i:06}");
            let value = vec![b'v'; (i % 200) as usize];
            txn.put(b"key", key.as_bytes(), &value).unwrap();
        }
        txn.put(b"key", b"large", &vec![7u8; 10_000]).unwrap();
        txn.commit(true).unwrap();
    }
    let bytes = std::fs::read(&path).unwrap();
    bytes
        .chunks(4096)
        .filter(|p| p.iter().any(|&b| b != 0))
        .map(<[u8]>::to_vec)
        .collect()
}

#[test]
fn btree_page_accessors_take_damaged_and_random_pages() {
    let mut rng = StdRng::seed_from_u64(0x4254_5245);
    let mut inputs = saved_inputs("btree_page");
    let seeds = btree_seeds();
    assert!(
        seeds.len() > 10,
        "the backend file has {} pages",
        seeds.len()
    );
    let per_seed = 4000 / seeds.len().min(40);
    for seed in seeds.iter().take(40) {
        inputs.extend(mutations(&mut rng, seed, per_seed));
    }
    inputs.extend(random_inputs(&mut rng, 500, 4096));
    for input in &inputs {
        btree_page::run(input);
    }
}
