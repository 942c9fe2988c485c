//! Fault injection: a crash at any point of a commit or a sync loses nothing durable and never
//! leaves a file that fails to open.
//!
//! The write observer records every write and fdatasync after a durable state S0. A crash image is
//! S0's file plus: every write before the last fdatasync that completed, then any subset of the
//! writes after it, one of them torn at a 512-byte sector boundary. Each image must open, pass
//! `check()`, and hold S0, or S1 (the state being synced) when the sync's meta write survived.
//! Corrupt and truncated files must be refused with an error naming the page, never a panic.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use keel_engine::Error;
use keel_engine::btree::{Backend, BackendOptions, IoEvent};
use rand::{Rng, SeedableRng};

type Model = BTreeMap<Vec<u8>, Vec<u8>>;

#[derive(Debug, Clone)]
enum Event {
    Write(u64, Vec<u8>),
    Sync,
}

fn options() -> BackendOptions {
    BackendOptions {
        page_size: 1024,
        min_grow_bytes: 32 << 10,
        ..BackendOptions::default()
    }
}

fn contents(b: &Backend) -> Model {
    let r = b.begin_read();
    r.range(b"b", b"", None)
        .unwrap()
        .map(|kv| kv.map(|(k, v)| (k.to_vec(), v.to_vec())).unwrap())
        .collect()
}

fn mutate(b: &Backend, round: u64, model: &mut Model, sync: bool) {
    let mut txn = b.begin_write().unwrap();
    for i in 0..150u64 {
        let k = format!("k{:04}", (i * 37 + round * 11) % 600).into_bytes();
        if (i + round).is_multiple_of(4) {
            txn.delete(b"b", &k).unwrap();
            model.remove(&k);
        } else {
            let v = vec![(round + i) as u8; ((i * round) % 700) as usize];
            txn.put(b"b", &k, &v).unwrap();
            model.insert(k, v);
        }
    }
    txn.commit(sync).unwrap();
}

#[test]
fn crash_images_open_to_the_last_durable_state() {
    let seed: u64 = std::env::var("KEEL_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("seed {seed} (set KEEL_FAULT_SEED to replay)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    for scenario in 0..6u64 {
        let _ = std::fs::remove_file(&path);
        let b = Backend::open(&path, options()).unwrap();
        let mut txn = b.begin_write().unwrap();
        txn.create_bucket(b"b").unwrap();
        txn.commit(true).unwrap();
        let mut model = Model::new();
        for round in 0..3 + scenario {
            mutate(&b, round, &mut model, true);
        }
        let s0 = model.clone();
        let image0 = std::fs::read(&path).unwrap();
        let events: Arc<Mutex<Vec<Event>>> = Arc::default();
        let sink = events.clone();
        b.set_write_observer(Some(Box::new(move |e: IoEvent<'_>| {
            sink.lock().unwrap().push(match e {
                IoEvent::Write(off, bytes) => Event::Write(off, bytes.to_vec()),
                IoEvent::Sync => Event::Sync,
            })
        })));
        // Deferred commits, then a durable one.
        for round in 10..12 {
            mutate(&b, round, &mut model, false);
        }
        mutate(&b, 12, &mut model, true);
        let s1 = model.clone();
        b.set_write_observer(None);
        drop(b);
        let events = events.lock().unwrap().clone();
        let syncs: Vec<usize> = events
            .iter()
            .enumerate()
            .filter(|(_, e)| matches!(e, Event::Sync))
            .map(|(i, _)| i)
            .collect();
        assert_eq!(
            syncs.len(),
            2,
            "a sync is two fdatasyncs: data and free list, then meta"
        );
        // Crash after each number of completed fdatasyncs (0 = none completed).
        for completed in 0..=syncs.len() {
            let durable_upto = if completed == 0 {
                0
            } else {
                syncs[completed - 1] + 1
            };
            let next_sync = syncs.get(completed).copied().unwrap_or(events.len());
            for _ in 0..8 {
                let mut img = image0.clone();
                let apply = |img: &mut Vec<u8>, off: u64, bytes: &[u8]| {
                    let end = off as usize + bytes.len();
                    if img.len() < end {
                        img.resize(end, 0);
                    }
                    img[off as usize..end].copy_from_slice(bytes);
                };
                for e in &events[..durable_upto] {
                    if let Event::Write(off, bytes) = e {
                        apply(&mut img, *off, bytes);
                    }
                }
                // Unsynced writes: each may be lost, applied, or torn at a sector boundary.
                for e in &events[durable_upto..next_sync] {
                    if let Event::Write(off, bytes) = e {
                        match rng.random_range(0..3) {
                            0 => {}
                            1 => apply(&mut img, *off, bytes),
                            _ => {
                                let sectors = bytes.len().div_ceil(512);
                                let keep = rng.random_range(0..sectors) * 512;
                                apply(&mut img, *off, &bytes[..keep.min(bytes.len())]);
                            }
                        }
                    }
                }
                let case = dir.path().join("case");
                std::fs::write(&case, &img).unwrap();
                let db = Backend::open(&case, options()).unwrap_or_else(|e| {
                    panic!("seed {seed} scenario {scenario} after {completed} syncs: {e}")
                });
                db.check()
                    .unwrap_or_else(|e| panic!("seed {seed} scenario {scenario}: check: {e}"));
                let got = contents(&db);
                assert!(
                    got == s0 || (got == s1 && completed + 1 >= syncs.len()),
                    "seed {seed} scenario {scenario} after {completed} of {} syncs: neither S0 nor S1",
                    syncs.len()
                );
                if completed == syncs.len() {
                    assert_eq!(got, s1, "seed {seed}: every sync completed");
                }
            }
        }
    }
}

#[test]
fn corrupt_and_truncated_files_are_refused_without_panics() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    {
        let b = Backend::open(&path, options()).unwrap();
        let mut txn = b.begin_write().unwrap();
        txn.create_bucket(b"b").unwrap();
        txn.commit(true).unwrap();
        let mut model = Model::new();
        for round in 0..5 {
            mutate(&b, round, &mut model, true);
        }
    }
    let pristine = std::fs::read(&path).unwrap();
    let case = dir.path().join("case");
    let page = 1024;
    let pages = pristine.len() / page;

    // Truncated well below what the meta needs.
    std::fs::write(&case, &pristine[..pristine.len() / 3]).unwrap();
    match Backend::open(&case, options()) {
        Err(Error::CorruptPage { reason, .. }) => assert!(reason.contains("truncated"), "{reason}"),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("opened a truncated file"),
    }
    // Both metas damaged.
    let mut img = pristine.clone();
    img[20] ^= 1;
    img[page + 20] ^= 1;
    std::fs::write(&case, &img).unwrap();
    let err = Backend::open(&case, options()).unwrap_err();
    assert!(err.to_string().contains("no valid meta"), "{err}");
    // One meta damaged: the other one serves.
    let mut img = pristine.clone();
    img[20] ^= 1;
    std::fs::write(&case, &img).unwrap();
    Backend::open(&case, options()).unwrap().check().unwrap();

    // Random damage to any other page: open, reads and check may fail, but with errors.
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut detected = 0;
    for _ in 0..200 {
        let mut img = pristine.clone();
        let p = rng.random_range(2..pages);
        for _ in 0..rng.random_range(1..8) {
            let at = p * page + rng.random_range(0..page);
            img[at] = rng.random();
        }
        std::fs::write(&case, &img).unwrap();
        let Ok(db) = Backend::open(&case, options()) else {
            detected += 1;
            continue;
        };
        let r = db.begin_read();
        let reads_ok = r
            .range(b"b", b"", None)
            .map(|it| it.filter(|x| x.is_err()).count() == 0)
            .unwrap_or(false);
        let _ = r.get(b"b", b"k0001");
        drop(r);
        if db.check().is_err() || !reads_ok {
            detected += 1;
        }
    }
    // Damage to free pages is harmless; damage to live pages must be noticed by check().
    assert!(
        detected > 50,
        "only {detected} of 200 damaged files were noticed"
    );
}

/// The txid a meta page records (see `btree::page`: offset 16, little-endian).
fn meta_txid(img: &[u8], page: usize, slot: usize) -> u64 {
    u64::from_le_bytes(img[slot * page + 16..slot * page + 24].try_into().unwrap())
}

/// A sync whose meta write was torn (a 512-byte sector tear cannot split the 52-byte meta, so
/// the tear is written on purpose, in the middle of the newest meta): the file opens at the
/// previous durable version, exactly, and passes `check()`; writing then works and survives a
/// reopen. Both metas torn is an error naming the problem, not a panic.
#[test]
fn a_torn_newest_meta_opens_the_previous_durable_version() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let page = 1024;
    let mut model_a = Model::new();
    let (txid_a, txid_b, model_b) = {
        let b = Backend::open(&path, options()).unwrap();
        let mut txn = b.begin_write().unwrap();
        txn.create_bucket(b"b").unwrap();
        txn.commit(true).unwrap();
        for round in 0..4 {
            mutate(&b, round, &mut model_a, true);
        }
        let txid_a = b.durable_txid();
        let mut model_b = model_a.clone();
        // Commits that are not synced, then one sync: the previous durable version's pages
        // must survive all of them.
        for round in 4..8 {
            mutate(&b, round, &mut model_b, round == 7);
        }
        assert_eq!(b.durable_txid(), b.txid());
        (txid_a, b.durable_txid(), model_b)
    };
    assert!(txid_b > txid_a);
    let pristine = std::fs::read(&path).unwrap();
    assert!(pristine.len() > 2 * page, "a file with data");
    let newest = (0..2)
        .find(|&s| meta_txid(&pristine, page, s) == txid_b)
        .unwrap();
    let older = 1 - newest;
    assert_eq!(meta_txid(&pristine, page, older), txid_a);
    let (new_at, old_at) = (newest * page, older * page);

    let tears: Vec<(&str, Vec<u8>)> = vec![
        ("txid to checksum zeroed", {
            let mut img = pristine.clone();
            img[new_at + 16..new_at + 48].fill(0);
            img
        }),
        ("new first half, older meta's second half", {
            let mut img = pristine.clone();
            img.copy_within(old_at + 26..old_at + 52, new_at + 26);
            img
        }),
        ("one bit of the catalog page number", {
            let mut img = pristine.clone();
            img[new_at + 25] ^= 0x10;
            img
        }),
    ];
    let case = dir.path().join("case");
    for (what, img) in &tears {
        std::fs::write(&case, img).unwrap();
        let b = Backend::open(&case, options()).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(b.durable_txid(), txid_a, "{what}");
        b.check().unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(
            contents(&b) == model_a,
            "{what}: not the previous durable state"
        );
        // Writing goes on from there, into the torn slot, and survives a reopen.
        let mut model = model_a.clone();
        mutate(&b, 20, &mut model, true);
        mutate(&b, 21, &mut model, true);
        drop(b);
        let b = Backend::open(&case, options()).unwrap();
        b.check()
            .unwrap_or_else(|e| panic!("{what}, written again: {e}"));
        assert!(contents(&b) == model, "{what}: written again");
    }
    assert_ne!(model_a, model_b, "the torn sync changed something");

    // Both metas torn: refused, naming the problem.
    let mut img = pristine.clone();
    img[new_at + 16..new_at + 48].fill(0);
    img.copy_within(new_at + 26..new_at + 52, old_at + 26);
    std::fs::write(&case, &img).unwrap();
    match Backend::open(&case, options()) {
        Err(Error::CorruptPage { page: 0, reason }) => {
            assert!(reason.contains("no valid meta page"), "{reason}");
            assert!(reason.contains("checksum"), "{reason}");
        }
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("opened a file with both metas torn"),
    }
}
