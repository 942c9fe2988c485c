//! Disk full in the backend (the WAL has its own test, `wal_disk_full`): when the backend file
//! cannot grow, the commit fails with a clear I/O error naming the file, the backend is poisoned
//! (later writes and syncs are refused, reads still serve the last committed version), and
//! reopening recovers the last durable version intact (`check()` passes). The same through the
//! MVCC store: the failed revision is not published, its key index changes are undone, and a
//! reopen finds the last synced revision.
//!
//! "Full" is a file-size limit (RLIMIT_FSIZE, with SIGXFSZ ignored) set in a child process, which
//! needs no privileges: growing the file past it fails with EFBIG, as it would with ENOSPC on a
//! full file system. The children are this binary running the ignored tests `backend_child` and
//! `store_child`; they report on stdout, the parent checks again without the limit.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use keel_engine::Error;
use keel_engine::btree::{Backend, BackendOptions};
use keel_engine::mvcc::{RangeOptions, Store};

const DIR_ENV: &str = "KEEL_BTREE_FULL_DIR";
/// The file-size limit of the children.
const LIMIT: u64 = 4 << 20;

fn options() -> BackendOptions {
    BackendOptions {
        page_size: 4096,
        min_grow_bytes: 256 << 10,
        ..BackendOptions::default()
    }
}

/// Applies the limit to this (child) process.
fn limit_file_size() {
    // SAFETY: plain libc calls with valid arguments; ignoring SIGXFSZ turns the signal into EFBIG.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
        let rl = libc::rlimit {
            rlim_cur: LIMIT,
            rlim_max: LIMIT,
        };
        assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &rl), 0);
    }
}

/// Runs the ignored test `name` of this binary as a child with `dir`; its stdout.
fn child(name: &str, dir: &Path) -> String {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            name,
            "--nocapture",
            "--test-threads=1",
        ])
        .env(DIR_ENV, dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{name} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn reported(stdout: &str, what: &str) -> Vec<u64> {
    stdout
        .lines()
        .filter_map(|l| l.strip_prefix(what)?.strip_prefix(' '))
        .map(|n| n.parse().unwrap())
        .collect()
}

fn error_line(stdout: &str, dir: &Path) -> String {
    let error = stdout
        .lines()
        .find_map(|l| l.strip_prefix("ERROR "))
        .unwrap_or_else(|| panic!("no error reported:\n{stdout}"))
        .to_string();
    assert!(error.contains("File too large"), "unclear error: {error}");
    assert!(
        error.contains(dir.to_str().unwrap()),
        "error names no path: {error}"
    );
    error
}

// ---------------------------------------------------------------------------------------------
// The backend.

/// Transaction `n`'s puts: a function of `n` alone, about 40 KiB, plus `last` = `n`.
fn ops(n: u64) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut out: Vec<(Vec<u8>, Vec<u8>)> = (0..10u64)
        .map(|j| {
            let k = format!("k{n:05}-{j}").into_bytes();
            let len = 1000 + ((n * 31 + j * 17) % 6000) as usize;
            (k, vec![(n + j) as u8; len])
        })
        .collect();
    out.push((b"last".to_vec(), n.to_le_bytes().to_vec()));
    out
}

fn model_after(last: u64) -> BTreeMap<Vec<u8>, Vec<u8>> {
    (1..=last).flat_map(ops).collect()
}

fn last_of(db: &Backend) -> u64 {
    db.begin_read()
        .get(b"b", b"last")
        .unwrap()
        .map_or(0, |v| u64::from_le_bytes(v.try_into().unwrap()))
}

fn contents(db: &Backend) -> BTreeMap<Vec<u8>, Vec<u8>> {
    db.begin_read()
        .range(b"b", b"", None)
        .unwrap()
        .map(|kv| kv.map(|(k, v)| (k.to_vec(), v.to_vec())).unwrap())
        .collect()
}

/// The state after transaction `last`, and the file passes `check()`.
fn assert_state(db: &Backend, last: u64, ctx: &str) {
    db.check().unwrap_or_else(|e| panic!("{ctx}: check: {e}"));
    assert!(
        contents(db) == model_after(last),
        "{ctx}: the state is not exactly transaction {last}'s"
    );
}

#[test]
#[ignore = "child process of a_full_disk_poisons_the_backend_and_reopening_recovers"]
fn backend_child() {
    let dir = std::env::var(DIR_ENV).expect("run by its parent test");
    limit_file_size();
    let path = Path::new(&dir).join("db");
    let db = Backend::open(&path, options()).unwrap();
    let mut txn = db.begin_write().unwrap();
    txn.create_bucket(b"b").unwrap();
    txn.commit(true).unwrap();
    let (mut committed, mut durable) = (0u64, 0u64);
    let err = loop {
        let n = committed + 1;
        let mut txn = db.begin_write().expect("not poisoned before the error");
        for (k, v) in ops(n) {
            txn.put(b"b", &k, &v).unwrap();
        }
        // Every other commit is durable at once; the others wait for the next sync.
        let sync = n.is_multiple_of(2);
        if let Err(e) = txn.commit(sync) {
            break e;
        }
        committed = n;
        if sync {
            durable = n;
            println!("DURABLE {n}");
        }
    };
    println!("ERROR {err}");
    assert!(matches!(err, Error::Io { .. }), "{err}");
    // Poisoned: writes and syncs are refused without touching the disk.
    let again = db.begin_write().err().expect("a write after the failure");
    assert!(matches!(again, Error::Poisoned(_)), "{again}");
    let sync = db.sync().unwrap_err();
    assert!(matches!(sync, Error::Poisoned(_)), "{sync}");
    // Reads still serve the last committed version.
    assert_eq!(last_of(&db), committed);
    assert!(
        contents(&db) == model_after(committed),
        "reads after the failure"
    );
    println!("COMMITTED {committed}");
    drop(db);
    // Still "full": reopening recovers the last durable version (or a later one whose sync
    // completed before the failure).
    let db = Backend::open(&path, options()).unwrap();
    let last = last_of(&db);
    assert!(
        (durable..=committed).contains(&last),
        "reopened at {last}: durable {durable}, committed {committed}"
    );
    assert_state(&db, last, "reopened while full");
    println!("REOPENED {last}");
}

#[test]
fn a_full_disk_poisons_the_backend_and_reopening_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let stdout = child("backend_child", dir.path());
    let durable = reported(&stdout, "DURABLE");
    assert!(
        !durable.is_empty(),
        "nothing was durable before the disk filled:\n{stdout}"
    );
    error_line(&stdout, dir.path());
    let reopened = reported(&stdout, "REOPENED")[0];
    let db = Backend::open(dir.path().join("db"), options()).unwrap();
    assert_eq!(last_of(&db), reopened);
    assert_state(&db, reopened, "reopened with space");
    // With space back, writing resumes.
    let n = reopened + 1;
    let mut txn = db.begin_write().unwrap();
    for (k, v) in ops(n) {
        txn.put(b"b", &k, &v).unwrap();
    }
    txn.commit(true).unwrap();
    drop(db);
    let db = Backend::open(dir.path().join("db"), options()).unwrap();
    assert_state(&db, n, "after writing again");
}

// ---------------------------------------------------------------------------------------------
// The MVCC store.

/// The value revision `rev` puts (each revision puts one key of 50, about 3 KiB).
fn store_put(rev: i64) -> (Vec<u8>, Vec<u8>) {
    let key = format!("key{:02}", rev % 50).into_bytes();
    let value = format!("value of revision {rev};").repeat(120).into_bytes();
    (key, value)
}

/// Key -> (value, mod revision) at `rev`.
fn store_model(rev: i64) -> BTreeMap<Vec<u8>, (Vec<u8>, i64)> {
    (2..=rev)
        .map(|r| {
            let (k, v) = store_put(r);
            (k, (v, r))
        })
        .collect()
}

fn store_contents(store: &Store) -> BTreeMap<Vec<u8>, (Vec<u8>, i64)> {
    store
        .read()
        // From the smallest key, unbounded.
        .range(b"\0", Some(&[]), RangeOptions::default())
        .unwrap()
        .kvs
        .into_iter()
        .map(|kv| (kv.key.to_vec(), (kv.value.to_vec(), kv.mod_revision)))
        .collect()
}

#[test]
#[ignore = "child process of a_full_disk_fails_the_store_cleanly"]
fn store_child() {
    let dir = std::env::var(DIR_ENV).expect("run by its parent test");
    limit_file_size();
    let path = Path::new(&dir).join("db");
    let store = Store::open(&path, options()).unwrap();
    store.sync().unwrap();
    let mut durable = store.current_revision();
    let err = loop {
        let rev = store.current_revision() + 1;
        let (k, v) = store_put(rev);
        let step = (|| {
            let mut w = store.write()?;
            assert_eq!(w.put(&k, &v, 0)?, rev);
            w.end(Some((rev as u64, 1)))?;
            // A checkpoint every fifth revision, as the server syncs now and then.
            if rev % 5 == 0 {
                store.sync()?;
                durable = rev;
                println!("DURABLE {rev}");
            }
            Ok::<(), Error>(())
        })();
        if let Err(e) = step {
            break e;
        }
    };
    println!("ERROR {err}");
    assert!(matches!(err, Error::Io { .. }), "{err}");
    // The failed revision is not published; reads see exactly the last committed one, the key
    // index having dropped the failed revision's change.
    let current = store.current_revision();
    assert!(current >= durable, "current {current} < durable {durable}");
    assert!(
        store_contents(&store) == store_model(current),
        "reads after the failure are not revision {current}'s"
    );
    let again = store.write().err().expect("a write after the failure");
    assert!(matches!(again, Error::Poisoned(_)), "{again}");
    println!("COMMITTED {current}");
    drop(store);
    let store = Store::open(&path, options()).unwrap();
    let reopened = store.current_revision();
    assert!(
        (durable..=current).contains(&reopened),
        "reopened at {reopened}: durable {durable}, committed {current}"
    );
    store.backend().check().unwrap();
    assert!(
        store_contents(&store) == store_model(reopened),
        "reopened while full: not revision {reopened}'s state"
    );
    assert_eq!(store.consistent_index().unwrap(), (reopened as u64, 1));
    println!("REOPENED {reopened}");
}

#[test]
fn a_full_disk_fails_the_store_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let stdout = child("store_child", dir.path());
    assert!(
        !reported(&stdout, "DURABLE").is_empty(),
        "nothing was durable before the disk filled:\n{stdout}"
    );
    error_line(&stdout, dir.path());
    let reopened = reported(&stdout, "REOPENED")[0] as i64;
    let store = Store::open(dir.path().join("db"), options()).unwrap();
    assert_eq!(store.current_revision(), reopened);
    store.backend().check().unwrap();
    assert!(
        store_contents(&store) == store_model(reopened),
        "reopened with space: not revision {reopened}'s state"
    );
    // With space back, writing resumes at the next revision.
    let (k, v) = store_put(reopened + 1);
    let mut w = store.write().unwrap();
    assert_eq!(w.put(&k, &v, 0).unwrap(), reopened + 1);
    w.end(None).unwrap();
    store.sync().unwrap();
    assert!(
        store_contents(&store) == store_model(reopened + 1),
        "written again"
    );
}
