//! The B+tree backend on real files: buckets, get/put/delete/range, overflow values, readers
//! isolated from the writer, durability across reopen, limits, defragmentation.

use std::collections::BTreeMap;

use keel_engine::Error;
use keel_engine::btree::{Backend, BackendOptions};

fn small() -> BackendOptions {
    BackendOptions {
        page_size: 1024,
        min_grow_bytes: 64 << 10,
        ..BackendOptions::default()
    }
}

fn key(i: u64) -> Vec<u8> {
    format!("key-{i:08}").into_bytes()
}

fn value(i: u64, len: usize) -> Vec<u8> {
    (0..len).map(|j| (i as usize + j) as u8).collect()
}

fn contents(b: &Backend, bucket: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
    let r = b.begin_read();
    r.range(bucket, b"", None)
        .unwrap()
        .map(|kv| kv.map(|(k, v)| (k.to_vec(), v.to_vec())))
        .collect::<Result<_, _>>()
        .unwrap()
}

/// A new backend in `dir` holding keys `0..n` with 100-byte values, durably.
fn loaded(dir: &tempfile::TempDir, n: u64) -> (std::path::PathBuf, Backend) {
    let path = dir.path().join("db");
    let b = Backend::open(&path, small()).unwrap();
    b.create_etcd_buckets().unwrap();
    let mut txn = b.begin_write().unwrap();
    for i in 0..n {
        txn.put(b"key", &key(i), &value(i, 100)).unwrap();
    }
    txn.commit(true).unwrap();
    (path, b)
}

/// The file of `b` as it is now (as a crash right now would leave it, all writes done), opened
/// as a copy and checked.
fn copy_as_is(dir: &tempfile::TempDir, path: &std::path::Path, b: Backend) -> Backend {
    let copy = dir.path().join("copy");
    std::fs::copy(path, &copy).unwrap();
    drop(b);
    let c = Backend::open(&copy, small()).unwrap();
    c.check().unwrap();
    c
}

#[test]
fn put_get_delete_range_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let mut model = BTreeMap::new();
    {
        let b = Backend::open(&path, small()).unwrap();
        b.create_etcd_buckets().unwrap();
        let mut txn = b.begin_write().unwrap();
        for i in 0..5000u64 {
            let v = value(i, (i % 300) as usize);
            txn.put(b"key", &key(i), &v).unwrap();
            model.insert(key(i), v);
        }
        // A few large values: overflow runs.
        for i in [7u64, 1234, 4999] {
            let v = value(i, 10_000 + i as usize);
            txn.put(b"key", &key(i), &v).unwrap();
            model.insert(key(i), v);
        }
        assert_eq!(
            txn.get(b"key", &key(1234)).unwrap().unwrap(),
            &model[&key(1234)][..]
        );
        txn.commit(true).unwrap();
        let report = b.check().unwrap();
        assert_eq!(report.entries, 5000);
        assert!(
            report.depth >= 3,
            "1 KiB pages make a deep tree: {report:?}"
        );

        let mut txn = b.begin_write().unwrap();
        for i in (0..5000u64).step_by(3) {
            assert!(txn.delete(b"key", &key(i)).unwrap());
            model.remove(&key(i));
        }
        assert!(!txn.delete(b"key", b"missing").unwrap());
        txn.commit(true).unwrap();
        b.check().unwrap();
        let r = b.begin_read();
        let got: Vec<_> = r
            .range(b"key", &key(100), Some(&key(200)))
            .unwrap()
            .map(|kv| kv.unwrap().0.to_vec())
            .collect();
        let want: Vec<_> = model
            .range(key(100)..key(200))
            .map(|(k, _)| k.clone())
            .collect();
        assert_eq!(got, want);
        assert_eq!(r.count(b"key").unwrap(), model.len() as u64);
    }
    let b = Backend::open(&path, small()).unwrap();
    assert_eq!(contents(&b, b"key"), model.into_iter().collect::<Vec<_>>());
    b.check().unwrap();
}

#[test]
fn readers_keep_their_version_while_the_writer_churns() {
    let dir = tempfile::tempdir().unwrap();
    let b = Backend::open(dir.path().join("db"), small()).unwrap();
    b.create_etcd_buckets().unwrap();
    let mut txn = b.begin_write().unwrap();
    for i in 0..2000 {
        txn.put(b"key", &key(i), &value(i, 50)).unwrap();
    }
    txn.commit(false).unwrap();
    let reader = b.begin_read();
    let before = contents(&b, b"key");
    // Rewrite everything many times: freed pages must not be reused under the reader.
    for round in 0..20u64 {
        let mut txn = b.begin_write().unwrap();
        for i in 0..2000 {
            txn.put(b"key", &key(i), &value(i + round, 60)).unwrap();
        }
        txn.commit(round % 5 == 0).unwrap();
    }
    let seen: Vec<_> = reader
        .range(b"key", b"", None)
        .unwrap()
        .map(|kv| kv.map(|(k, v)| (k.to_vec(), v.to_vec())).unwrap())
        .collect();
    assert_eq!(seen, before);
    drop(reader);
    b.check().unwrap();
    // Readers can live on other threads.
    let r = b.begin_read();
    let handle = std::thread::spawn(move || r.get(b"key", &key(5)).unwrap().map(<[u8]>::to_vec));
    assert_eq!(handle.join().unwrap().unwrap(), value(5 + 19, 60));
}

#[test]
fn aborted_transactions_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let b = Backend::open(dir.path().join("db"), small()).unwrap();
    b.create_etcd_buckets().unwrap();
    let mut txn = b.begin_write().unwrap();
    txn.put(b"key", b"a", b"1").unwrap();
    txn.commit(true).unwrap();
    let mut txn = b.begin_write().unwrap();
    for i in 0..1000 {
        txn.put(b"key", &key(i), b"x").unwrap();
    }
    txn.delete(b"key", b"a").unwrap();
    drop(txn);
    assert_eq!(contents(&b, b"key"), vec![(b"a".to_vec(), b"1".to_vec())]);
    b.check().unwrap();
}

#[test]
fn limits_and_missing_buckets_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let b = Backend::open(
        dir.path().join("db"),
        BackendOptions {
            max_value_size: 1 << 20,
            ..small()
        },
    )
    .unwrap();
    b.create_etcd_buckets().unwrap();
    let mut txn = b.begin_write().unwrap();
    let err = txn.put(b"key", &vec![b'k'; 5000], b"v").unwrap_err();
    assert!(matches!(err, Error::KeyTooLarge { .. }), "{err}");
    let err = txn.put(b"key", b"k", &vec![0; (1 << 20) + 1]).unwrap_err();
    assert!(matches!(err, Error::ValueTooLarge { .. }), "{err}");
    // 1.5 MiB is an etcd request's limit: with the default maximum it is stored.
    let err = txn.put(b"nope", b"k", b"v").unwrap_err();
    assert!(matches!(err, Error::BucketNotFound(_)), "{err}");
    drop(txn);
    let b2 = Backend::open(dir.path().join("db2"), BackendOptions::default()).unwrap();
    b2.create_etcd_buckets().unwrap();
    let mut txn = b2.begin_write().unwrap();
    let big = vec![3u8; 1536 * 1024];
    txn.put(b"key", b"big", &big).unwrap();
    txn.commit(true).unwrap();
    assert_eq!(
        b2.begin_read().get(b"key", b"big").unwrap().unwrap(),
        &big[..]
    );
    b2.check().unwrap();
    // A second open of a locked file is refused.
    let err = Backend::open(dir.path().join("db2"), BackendOptions::default()).unwrap_err();
    assert!(matches!(err, Error::Locked(_)), "{err}");
}

#[test]
fn defrag_shrinks_the_file_while_a_reader_reads() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let b = Backend::open(&path, BackendOptions::default()).unwrap();
    b.create_etcd_buckets().unwrap();
    for chunk in 0..10u64 {
        let mut txn = b.begin_write().unwrap();
        for i in chunk * 5000..(chunk + 1) * 5000 {
            txn.put(b"key", &key(i), &value(i, 200)).unwrap();
        }
        txn.commit(true).unwrap();
    }
    let mut txn = b.begin_write().unwrap();
    for i in 0..50_000u64 {
        if i % 10 != 0 {
            txn.delete(b"key", &key(i)).unwrap();
        }
    }
    txn.commit(true).unwrap();
    let reader = b.begin_read();
    let expected = contents(&b, b"key");
    let report = b.defrag().unwrap();
    // 10% of the data is left: the copy needs about a tenth of the pages (the file itself grows
    // in 16 MiB steps).
    assert!(report.size_after < report.size_before, "{report:?}");
    assert!(
        report.size_after <= report.in_use_before / 5 + (16 << 20),
        "{report:?}"
    );
    // The reader still sees its version through the old file.
    assert_eq!(
        reader.range(b"key", b"", None).unwrap().count(),
        expected.len()
    );
    drop(reader);
    assert_eq!(contents(&b, b"key"), expected);
    b.check().unwrap();
    // Writes go on in the new file, and it reopens.
    let mut txn = b.begin_write().unwrap();
    txn.put(b"key", b"after", b"defrag").unwrap();
    txn.commit(true).unwrap();
    drop(b);
    let b = Backend::open(&path, BackendOptions::default()).unwrap();
    assert_eq!(
        b.begin_read().get(b"key", b"after").unwrap().unwrap(),
        b"defrag"
    );
    b.check().unwrap();
}

/// A file renamed over the backend's (a raft snapshot installed) is never replaced by a
/// defragmentation of the old backend: it refuses, and the path keeps naming the new file.
#[test]
fn a_defrag_after_the_file_was_replaced_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let old = Backend::open(&path, BackendOptions::default()).unwrap();
    old.create_etcd_buckets().unwrap();
    let mut txn = old.begin_write().unwrap();
    txn.put(b"key", b"which", b"old").unwrap();
    txn.commit(true).unwrap();
    let received = dir.path().join("received.db");
    {
        let new = Backend::open(&received, BackendOptions::default()).unwrap();
        new.create_etcd_buckets().unwrap();
        let mut txn = new.begin_write().unwrap();
        txn.put(b"key", b"which", b"new").unwrap();
        txn.commit(true).unwrap();
    }
    old.replace_file(&received).unwrap();
    let err = old.defrag().unwrap_err();
    assert!(matches!(err, Error::Poisoned(_)), "{err}");
    // The old backend writes nothing more either.
    assert!(old.begin_write().is_err());
    drop(old);
    let b = Backend::open(&path, BackendOptions::default()).unwrap();
    assert_eq!(
        b.begin_read().get(b"key", b"which").unwrap().unwrap(),
        b"new"
    );
    assert!(!dir.path().join("db.defrag").exists());
}

/// Keys of very different lengths on small pages, deleted in runs of different widths: many
/// leaf and branch merges with separators of different sizes; every commit must pass `check()`.
/// (The exact branch-merge sizing case found in review is a unit test in `btree/write.rs`.)
#[test]
fn branch_merges_with_keys_of_varied_length_stay_within_a_page() {
    let dir = tempfile::tempdir().unwrap();
    let b = Backend::open(dir.path().join("db"), small()).unwrap();
    b.create_etcd_buckets().unwrap();
    let k = |i: u64| {
        // Long keys sort first in every group of 8 and become separators; short ones follow.
        let mut key = format!("{:06}-{}", i / 8, i % 8).into_bytes();
        if i.is_multiple_of(8) {
            key.resize(200, b'~');
        }
        key
    };
    let n = 30_000u64;
    for chunk in (0..n).collect::<Vec<_>>().chunks(5000) {
        let mut txn = b.begin_write().unwrap();
        for &i in chunk {
            txn.put(b"key", &k(i), b"v").unwrap();
        }
        txn.commit(false).unwrap();
    }
    b.check().unwrap();
    // Delete in runs of different widths and phases, committing often.
    for (round, (width, phase)) in [(7u64, 1u64), (5, 3), (3, 0), (2, 1)]
        .into_iter()
        .enumerate()
    {
        let mut txn = b.begin_write().unwrap();
        for i in 0..n {
            if (i / width + phase).is_multiple_of(2) {
                txn.delete(b"key", &k(i)).unwrap();
            }
            if i % 2000 == 1999 {
                txn.commit(false).unwrap();
                b.check()
                    .unwrap_or_else(|e| panic!("round {round} at {i}: {e}"));
                txn = b.begin_write().unwrap();
            }
        }
        txn.commit(true).unwrap();
        b.check().unwrap();
    }
}

/// Defragmentation beside a writer: a thread keeps putting, overwriting (some values large
/// enough for overflow pages) and deleting keys of two buckets, on small pages so that splits
/// and merges move subtrees between parents, while the main thread defragments again and
/// again. At the end the backend holds exactly what the writer's model says, passes `check()`,
/// and reopens the same.
#[test]
fn defrag_beside_a_writer_loses_and_resurrects_nothing() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    for seed in 1..=2u64 {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let b = Arc::new(
            Backend::open(
                &path,
                BackendOptions {
                    page_size: 1024,
                    min_grow_bytes: 1 << 20,
                    ..Default::default()
                },
            )
            .unwrap(),
        );
        b.create_etcd_buckets().unwrap();
        // A starting dataset.
        let mut txn = b.begin_write().unwrap();
        for i in 0..10_000u64 {
            txn.put(b"key", &key(i), &value(i, 40)).unwrap();
        }
        txn.commit(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (b, stop) = (b.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut model: BTreeMap<(Vec<u8>, Vec<u8>), Vec<u8>> = BTreeMap::new();
                for i in 0..10_000u64 {
                    model.insert((b"key".to_vec(), key(i)), value(i, 40));
                }
                let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
                let mut next = move || {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x
                };
                let mut round = 0u64;
                while !stop.load(Ordering::Relaxed) || round < 50 {
                    round += 1;
                    let mut txn = b.begin_write().unwrap();
                    for _ in 0..200 {
                        let bucket: &[u8] = if next().is_multiple_of(4) {
                            b"lease"
                        } else {
                            b"key"
                        };
                        let k = key(next() % 15_000);
                        match next() % 10 {
                            0..=3 => {
                                txn.delete(bucket, &k).unwrap();
                                model.remove(&(bucket.to_vec(), k));
                            }
                            r => {
                                let len = if r == 9 {
                                    3000
                                } else {
                                    10 + (next() % 100) as usize
                                };
                                let v = value(next(), len);
                                txn.put(bucket, &k, &v).unwrap();
                                model.insert((bucket.to_vec(), k), v);
                            }
                        }
                    }
                    txn.commit(round.is_multiple_of(10)).unwrap();
                }
                model
            })
        };
        let mut reports = Vec::new();
        for _ in 0..3 {
            reports.push(b.defrag().unwrap());
        }
        stop.store(true, Ordering::Relaxed);
        let model = writer.join().unwrap();
        let expect = |bucket: &[u8]| -> Vec<(Vec<u8>, Vec<u8>)> {
            model
                .iter()
                .filter(|((bk, _), _)| bk.as_slice() == bucket)
                .map(|((_, k), v)| (k.clone(), v.clone()))
                .collect()
        };
        eprintln!("seed {seed}: {reports:?}");
        // The writer ran during the copies: catch-up rounds had work.
        assert!(reports.iter().any(|r| r.rounds > 0), "{reports:?}");
        for bucket in [&b"key"[..], b"lease"] {
            assert_eq!(
                contents(&b, bucket),
                expect(bucket),
                "seed {seed} {reports:?}"
            );
        }
        b.check().unwrap();
        // Commits without `sync` are durable once synced.
        b.sync().unwrap();
        drop(b);
        let b = Backend::open(&path, BackendOptions::default()).unwrap();
        b.check().unwrap();
        assert_eq!(
            contents(&b, b"key"),
            expect(b"key"),
            "seed {seed} after reopen"
        );
        assert_eq!(
            contents(&b, b"lease"),
            expect(b"lease"),
            "seed {seed} after reopen"
        );
    }
}

/// A defragmentation cut short leaves `db.defrag` beside an untouched `db`: the next open
/// removes it and serves the original.
#[test]
fn an_interrupted_defrag_leaves_the_original_and_its_copy_is_removed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let b = Backend::open(&path, BackendOptions::default()).unwrap();
    b.create_etcd_buckets().unwrap();
    let mut txn = b.begin_write().unwrap();
    txn.put(b"key", b"k", b"v").unwrap();
    txn.commit(true).unwrap();
    drop(b);
    let copy = dir.path().join("db.defrag");
    std::fs::write(&copy, vec![7u8; 8192]).unwrap();
    let b = Backend::open(&path, BackendOptions::default()).unwrap();
    assert!(!copy.exists());
    assert_eq!(contents(&b, b"key"), vec![(b"k".to_vec(), b"v".to_vec())]);
    b.check().unwrap();
}

/// Between two syncs the writer reuses the pages it keeps replacing: a page allocated after the
/// last sync was planned is in no durable version and in none being synced, so once replaced it
/// waits for readers only. 500 deferred commits of one key grow the file by a few pages, not by
/// a root-to-leaf path per commit, and a sync then finds the store as committed.
#[test]
fn deferred_commits_reuse_the_pages_they_replace() {
    let dir = tempfile::tempdir().unwrap();
    let (path, b) = loaded(&dir, 2000);
    let before = b.check().unwrap().pages;
    for round in 0..500u64 {
        let mut txn = b.begin_write().unwrap();
        txn.put(b"key", &key(round % 7), &value(round, 100))
            .unwrap();
        txn.commit(false).unwrap();
    }
    let after = b.check().unwrap();
    assert!(
        after.pages < before + 40,
        "500 deferred commits grew the file from {before} to {} pages",
        after.pages
    );
    b.sync().unwrap();
    drop(b);
    let b = Backend::open(&path, small()).unwrap();
    b.check().unwrap();
    let r = b.begin_read();
    for round in 493..500u64 {
        assert_eq!(
            r.get(b"key", &key(round % 7)).unwrap().unwrap(),
            &value(round, 100)[..]
        );
    }
}

/// Commits made while a sync writes (the sync releases the writer mutex for its I/O) may reuse
/// fresh pages, but never a page of the version being synced: the file as it is after the sync,
/// with those commits' pages in it, opens to exactly the synced version.
#[test]
fn commits_during_a_sync_never_overwrite_the_synced_version() {
    let dir = tempfile::tempdir().unwrap();
    let (path, b) = loaded(&dir, 500);
    let mut model: BTreeMap<_, _> = (0..500u64).map(|i| (key(i), value(i, 100))).collect();
    // Deferred commits after the durable version: fresh pages, replaced and reused among
    // themselves. The sync below makes the last of them durable.
    for round in 0..200u64 {
        let mut txn = b.begin_write().unwrap();
        let k = key((round * 37) % 500);
        txn.put(b"key", &k, &value(round, 120)).unwrap();
        model.insert(k, value(round, 120));
        txn.commit(false).unwrap();
    }
    // During the sync's I/O (at each write and fdatasync it issues), other commits change every
    // key the synced version holds, and delete some.
    let writer = b.clone();
    let mut calls = 0u64;
    b.set_write_observer(Some(Box::new(move |_| {
        calls += 1;
        for i in 0..500u64 {
            let mut txn = writer.begin_write().unwrap();
            if i % 5 == 0 {
                txn.delete(b"key", &key(i)).unwrap();
            } else {
                txn.put(b"key", &key(i), &value(i + calls * 1000, 90))
                    .unwrap();
            }
            txn.commit(false).unwrap();
        }
    })));
    b.sync().unwrap();
    b.set_write_observer(None);
    let c = copy_as_is(&dir, &path, b);
    let expected: Vec<(Vec<u8>, Vec<u8>)> = model.into_iter().collect();
    assert_eq!(contents(&c, b"key"), expected);
}

/// A durable commit made on another thread while a sync does its I/O waits for that sync, then
/// makes its own version durable: the two never plan into the same meta slot (the older sync's
/// meta would replace the newer one after the newer one's pages were released and reused).
#[test]
fn a_durable_commit_during_a_sync_stays_durable() {
    use std::sync::{Arc, Mutex};
    let dir = tempfile::tempdir().unwrap();
    let (path, b) = loaded(&dir, 300);
    // Something for the sync below to make durable.
    for i in 0..50u64 {
        let mut txn = b.begin_write().unwrap();
        txn.put(b"key", &key(i), &value(i + 1, 100)).unwrap();
        txn.commit(false).unwrap();
    }
    let other = b.clone();
    let thread: Arc<Mutex<Option<std::thread::JoinHandle<()>>>> = Arc::default();
    let slot = thread.clone();
    let spawned = std::sync::atomic::AtomicBool::new(false);
    b.set_write_observer(Some(Box::new(move |_| {
        // Once: the other thread's own sync comes through this observer too.
        if spawned.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let mut slot = slot.lock().unwrap();
        let o = other.clone();
        *slot = Some(std::thread::spawn(move || {
            // Rewrites every key (so it frees every page of the version being synced), durably,
            // then keeps committing: pages its sync released would be reused here.
            let mut txn = o.begin_write().unwrap();
            for i in 0..300u64 {
                txn.put(b"key", &key(i), &value(i + 7, 120)).unwrap();
            }
            txn.commit(true).unwrap();
            for round in 0..20u64 {
                let mut txn = o.begin_write().unwrap();
                txn.put(b"key", &key(round), &value(round + 99, 120))
                    .unwrap();
                txn.commit(false).unwrap();
            }
        }));
        drop(slot);
        // Leave the other thread time to commit and try to sync while this sync is writing.
        std::thread::sleep(std::time::Duration::from_millis(200));
    })));
    b.sync().unwrap();
    let handle = thread.lock().unwrap().take().unwrap();
    handle.join().unwrap();
    b.set_write_observer(None);
    // The file as it is now: its newest durable meta must be the other thread's durable commit.
    let c = copy_as_is(&dir, &path, b);
    let expected: Vec<(Vec<u8>, Vec<u8>)> =
        (0..300u64).map(|i| (key(i), value(i + 7, 120))).collect();
    assert_eq!(contents(&c, b"key"), expected);
}
