//! Disk full: when the WAL cannot get space the append fails with a clear I/O error, later
//! appends are refused, and the WAL still opens and recovers to the last durable record.
//!
//! "Full" is a file-size limit (RLIMIT_FSIZE, with SIGXFSZ ignored) set in a child process, which
//! needs no privileges: writes past the limit and new pre-allocated segments fail with EFBIG, as
//! they would with ENOSPC on a full file system. The child is this binary running `full_child`.

mod common;

use std::process::Command;

use common::{entries, entry, open, run, small_options};
use keel_engine::Error;

const DIR_ENV: &str = "KEEL_FULL_DIR";

#[test]
#[ignore = "child process of appends_fail_cleanly_when_the_disk_is_full"]
fn full_child() {
    let dir = std::env::var(DIR_ENV).expect("run by appends_fail_cleanly_when_the_disk_is_full");
    let limit = small_options().segment_size - 4096;
    // SAFETY: plain libc calls with valid arguments; ignoring SIGXFSZ turns the signal into EFBIG.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
        let rl = libc::rlimit {
            rlim_cur: limit,
            rlim_max: limit,
        };
        assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &rl), 0);
    }
    run(async move {
        let (wal, rec) = open(dir.as_ref(), small_options()).await;
        let mut index = rec.last_index;
        let err = loop {
            index += 1;
            match wal.save(&[entry(index, 1)], None).await {
                Ok(()) => println!("DURABLE {index}"),
                Err(e) => break e,
            }
        };
        println!("ERROR {err}");
        assert!(matches!(err, Error::Io { .. }), "{err}");
        // Refused from now on, without touching the disk.
        let again = wal.save(&[entry(index, 1)], None).await.unwrap_err();
        assert!(matches!(again, Error::Poisoned(_)), "{again}");
        let _ = wal.close().await;
        // Still "full": opening and recovering must work anyway.
        let (wal, rec) = open(dir.as_ref(), small_options()).await;
        println!("REOPENED {}", rec.last_index);
        let _ = wal.close().await;
    });
}

#[test]
fn appends_fail_cleanly_when_the_disk_is_full() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let (wal, _) = open(dir.path(), small_options()).await;
        for i in 1..=50 {
            wal.save(&[entry(i, 1)], None).await.unwrap();
        }
        wal.close().await.unwrap();
    });
    // No spare left: the child must allocate its next segment under the limit.
    for e in std::fs::read_dir(dir.path()).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "spare") {
            std::fs::remove_file(p).unwrap();
        }
    }
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "full_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(DIR_ENV, dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "child failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last_durable = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("DURABLE "))
        .map(|i| i.parse::<u64>().unwrap())
        .max()
        .unwrap();
    assert!(
        last_durable > 50,
        "the child appended nothing before the disk filled"
    );
    let error = stdout
        .lines()
        .find_map(|l| l.strip_prefix("ERROR "))
        .unwrap();
    assert!(error.contains("File too large"), "unclear error: {error}");
    assert!(
        error.contains(dir.path().to_str().unwrap()),
        "error names no path: {error}"
    );
    let reopened = stdout
        .lines()
        .find_map(|l| l.strip_prefix("REOPENED "))
        .unwrap();
    assert_eq!(reopened.parse::<u64>().unwrap(), last_durable);

    run(async {
        let (wal, rec) = open(dir.path(), small_options()).await;
        assert_eq!(rec.last_index, last_durable);
        assert_eq!(common::all_entries(&wal), entries(1..=last_durable, 1));
        // With space back, appending resumes.
        wal.save(&[entry(last_durable + 1, 1)], None).await.unwrap();
        wal.close().await.unwrap();
    });
}
