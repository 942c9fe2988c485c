//! End-to-end WAL behaviour on real files: append, group commit, overwrite, cut, release, reopen.

mod common;

use common::{all_entries, entries, entry, fill_until_cut, open, run, small_options};
use keel_engine::Error;
use keel_engine::wal::{Metadata, RecordRef, SnapshotMarker, WalOptions};
use raft::eraftpb::HardState;

#[test]
fn appends_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let options = WalOptions {
        metadata: Metadata {
            cluster_id: 7,
            member_id: 3,
        },
        ..small_options()
    };
    run(async {
        let (wal, rec) = open(dir.path(), options.clone()).await;
        assert_eq!((rec.first_index, rec.last_index), (1, 0));
        let entries = entries(1..=200, 1);
        let hs = HardState {
            term: 1,
            vote: 3,
            commit: 150,
            ..Default::default()
        };
        for chunk in entries.chunks(10) {
            wal.save(chunk, Some(&hs)).await.unwrap();
        }
        assert_eq!(all_entries(&wal), entries);
        wal.close().await.unwrap();

        let (wal, rec) = open(dir.path(), small_options()).await;
        assert_eq!(
            rec.metadata,
            Metadata {
                cluster_id: 7,
                member_id: 3
            }
        );
        assert_eq!(rec.hard_state, hs);
        assert_eq!((rec.first_index, rec.last_index), (1, 200));
        assert!(rec.truncated.is_none());
        assert_eq!(all_entries(&wal), entries);
        assert!(wal.stats().syncs == 0);
        wal.close().await.unwrap();
    });
}

#[test]
fn group_commit_batches_concurrent_appends() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let (wal, _) = open(dir.path(), WalOptions::default()).await;
        let futures: Vec<_> = (1..=1000).map(|i| wal.save(&[entry(i, 1)], None)).collect();
        for f in futures {
            f.await.unwrap();
        }
        let stats = wal.stats();
        assert_eq!(
            stats.records,
            1000 + 2,
            "entries plus the first segment's metadata and hard state"
        );
        assert!(
            stats.batches < 10,
            "1000 appends issued together took {} batches",
            stats.batches
        );
        wal.close().await.unwrap();
        let (wal, rec) = open(dir.path(), WalOptions::default()).await;
        assert_eq!(rec.last_index, 1000);
        assert_eq!(all_entries(&wal), entries(1..=1000, 1));
    });
}

#[test]
fn overwrite_discards_conflicting_suffix_on_disk_too() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let (wal, _) = open(dir.path(), small_options()).await;
        let first = entries(1..=50, 1);
        wal.save(&first, None).await.unwrap();
        let second = entries(30..=40, 2);
        wal.save(&second, None).await.unwrap();
        let mut expected = entries(1..30, 1);
        expected.extend(second.clone());
        assert_eq!(all_entries(&wal), expected);
        wal.close().await.unwrap();
        let (wal, rec) = open(dir.path(), small_options()).await;
        assert_eq!(rec.last_index, 40);
        assert_eq!(all_entries(&wal), expected);
    });
}

#[test]
fn segments_are_cut_released_and_recycled() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let (wal, _) = open(dir.path(), small_options()).await;
        for i in 1..=2000 {
            wal.save(&[entry(i, 1)], None).await.unwrap();
        }
        assert!(
            wal.stats().segments_cut > 5,
            "cut {} segments",
            wal.stats().segments_cut
        );
        let (segments_before, _) = wal.file_counts();

        // Releasing needs a durable snapshot marker.
        assert!(matches!(
            wal.release(1500).await,
            Err(Error::InvalidArgument(_))
        ));
        let marker = SnapshotMarker {
            index: 1500,
            term: 1,
            ..Default::default()
        };
        wal.append(&[RecordRef::Snapshot(&marker)]).await.unwrap();
        let released = wal.release(1501).await.unwrap();
        assert!(released > 0);
        let (segments_after, spares) = wal.file_counts();
        assert_eq!(segments_after, segments_before - released);
        assert!(spares >= 1, "released segments are kept as spares");
        assert_eq!(wal.first_index(), 1501);
        assert!(matches!(
            wal.entries(1400, 1501),
            Err(Error::InvalidArgument(_))
        ));

        // Recycled spares are reused for new segments; stale records in them stay invisible.
        for i in 2001..=4000 {
            wal.save(&[entry(i, 1)], None).await.unwrap();
        }
        wal.close().await.unwrap();
        let (wal, rec) = open(dir.path(), small_options()).await;
        assert_eq!(rec.snapshot.index, 1500);
        assert_eq!((rec.first_index, rec.last_index), (1501, 4000));
        assert_eq!(all_entries(&wal), entries(1501..=4000, 1));
    });
}

#[test]
fn refused_appends_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let (wal, _) = open(dir.path(), small_options()).await;
        wal.save(&entries(1..=5, 1), None).await.unwrap();

        let mut big = entry(6, 1);
        big.data = vec![0u8; 20 << 10].into();
        let err = wal.save(&[entry(6, 1), big], None).await.unwrap_err();
        assert!(
            matches!(err, Error::RecordTooLarge { max: 16384, .. }),
            "{err}"
        );

        let err = wal.save(&[entry(8, 1)], None).await.unwrap_err();
        assert!(
            matches!(
                err,
                Error::IndexGap {
                    expected: 6,
                    got: 8
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("gap"), "{err}");

        let err = wal
            .save(&[entry(6, 1), entry(8, 1)], None)
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::IndexGap {
                    expected: 7,
                    got: 8
                }
            ),
            "{err}"
        );

        let marker = SnapshotMarker {
            index: 3,
            term: 1,
            ..Default::default()
        };
        wal.append(&[RecordRef::Snapshot(&marker)]).await.unwrap();
        let err = wal.save(&[entry(2, 1)], None).await.unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
        let older = SnapshotMarker {
            index: 2,
            term: 1,
            ..Default::default()
        };
        let err = wal
            .append(&[RecordRef::Snapshot(&older)])
            .await
            .unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err}");

        assert_eq!(wal.last_index(), 5);
        wal.close().await.unwrap();
        let (wal, rec) = open(dir.path(), small_options()).await;
        assert_eq!((rec.first_index, rec.last_index), (4, 5));
        assert_eq!(all_entries(&wal), vec![entry(4, 1), entry(5, 1)]);
        let err = wal.save(&[entry(1, 1)], None).await.unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    });
}

#[test]
fn invalid_options_are_refused() {
    run(async {
        let dir = tempfile::tempdir().unwrap();
        let bad = WalOptions {
            segment_size: 10_000,
            ..WalOptions::default()
        };
        assert!(matches!(
            keel_engine::wal::Wal::open(dir.path(), bad).await,
            Err(Error::InvalidArgument(_))
        ));
    });
}

/// Regression (found by the model test): after release, the first remaining segment held an
/// overwrite reaching below its own first entry, and recovery called it corruption.
#[test]
fn overwrite_below_the_first_remaining_segment_recovers() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let (wal, _) = open(dir.path(), small_options()).await;
        // Fill until a segment is cut, then overwrite two entries back into the new segment.
        fill_until_cut(&wal, 1, 2).await;
        let last = wal.last_index();
        wal.save(&[entry(last - 2, 2), entry(last - 1, 2)], None)
            .await
            .unwrap();
        for j in last..last + 20 {
            wal.save(&[entry(j, 2)], None).await.unwrap();
        }
        let marker = SnapshotMarker {
            index: last + 5,
            term: 2,
            ..Default::default()
        };
        wal.append(&[RecordRef::Snapshot(&marker)]).await.unwrap();
        assert_eq!(wal.release(last + 6).await.unwrap(), 1);
        wal.close().await.unwrap();

        let (wal, rec) = open(dir.path(), small_options()).await;
        assert_eq!((rec.first_index, rec.last_index), (last + 6, last + 19));
        assert_eq!(all_entries(&wal), entries(last + 6..last + 20, 2));
    });
}

/// Review finding: entries after a snapshot marker in one append were validated against the log
/// before the marker and could panic. They are refused, and nothing changes.
#[test]
fn entries_after_a_marker_in_one_append_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let (wal, _) = open(dir.path(), small_options()).await;
        wal.save(&entries(1..=100, 1), None).await.unwrap();
        let marker = SnapshotMarker {
            index: 100,
            term: 1,
            ..Default::default()
        };
        let e = entry(90, 1);
        let err = wal
            .append(&[RecordRef::Snapshot(&marker), RecordRef::Entry(&e)])
            .await
            .unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
        let e0 = entry(0, 1);
        let err = wal.append(&[RecordRef::Entry(&e0)]).await.unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
        assert_eq!((wal.first_index(), wal.last_index()), (1, 100));
        wal.close().await.unwrap();
    });
}

/// Review finding: `release` must not drop a segment while its successor's first write (the
/// records describing the log: metadata, hard state, snapshot marker) is not yet durable.
#[test]
fn release_waits_for_the_successors_start_records() {
    let dir = tempfile::tempdir().unwrap();
    let big = |index: u64| {
        let mut e = entry(index, 1);
        e.data = vec![1u8; 15000].into();
        e
    };
    run(async {
        let (wal, _) = open(dir.path(), small_options()).await;
        // Four 15 kB entries nearly fill the first 64 KiB segment; the fifth cannot fit.
        for i in 1..=4 {
            wal.save(&[big(i)], None).await.unwrap();
        }
        let marker = SnapshotMarker {
            index: 4,
            term: 1,
            ..Default::default()
        };
        wal.append(&[RecordRef::Snapshot(&marker)]).await.unwrap();
        assert_eq!(wal.stats().segments_cut, 1);
        // Queue the fifth (it cuts segment 2) without letting the writer run yet.
        let pending = wal.save(&[big(5)], None);
        assert_eq!(
            wal.release(5).await.unwrap(),
            0,
            "successor's start is not durable yet"
        );
        pending.await.unwrap();
        assert_eq!(wal.stats().segments_cut, 2);
        assert_eq!(wal.release(5).await.unwrap(), 1);
        wal.close().await.unwrap();
        let (wal, rec) = open(dir.path(), small_options()).await;
        assert_eq!(rec.snapshot.index, 4);
        assert_eq!((rec.first_index, rec.last_index), (5, 5));
        assert_eq!(all_entries(&wal), vec![big(5)]);
    });
}

/// The WAL no longer calls fdatasync after each batch: the active segment's file description
/// must carry `O_DSYNC` (and `O_DIRECT`), or an acknowledged append could sit in a disk cache.
#[test]
fn the_active_segment_is_open_for_durable_writes() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let (wal, _) = open(dir.path(), small_options()).await;
        wal.save(&entries(1..=3, 1), None).await.unwrap();
        let mut flags = Vec::new();
        for fd in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            if target.starts_with(dir.path()) && target.extension().is_some_and(|e| e == "wal") {
                let info = std::fs::read_to_string(format!(
                    "/proc/self/fdinfo/{}",
                    fd.file_name().to_string_lossy()
                ))
                .unwrap();
                let octal = info
                    .lines()
                    .find_map(|l| l.strip_prefix("flags:"))
                    .unwrap()
                    .trim();
                flags.push(i32::from_str_radix(octal, 8).unwrap());
            }
        }
        assert!(!flags.is_empty(), "no open segment found");
        assert!(
            flags
                .iter()
                .any(|f| f & libc::O_DSYNC == libc::O_DSYNC && f & libc::O_DIRECT != 0),
            "segment flags {flags:?}"
        );
        wal.close().await.unwrap();
    });
}

/// The writer keeps the encoding buffers of written batches for later ones: a large batch
/// followed by small ones must leave none of its bytes in theirs.
#[test]
fn small_batches_after_a_large_one_read_back_exactly() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let (wal, _) = open(dir.path(), WalOptions::default()).await;
        let large: Vec<_> = (1..=40)
            .map(|i| raft::eraftpb::Entry {
                index: i,
                term: 1,
                data: vec![0xAB; 8 << 10].into(),
                ..Default::default()
            })
            .collect();
        wal.save(&large, None).await.unwrap();
        let mut expected = large;
        for i in 41..=140 {
            let e = entry(i, 1);
            wal.save(std::slice::from_ref(&e), None).await.unwrap();
            expected.push(e);
        }
        assert_eq!(all_entries(&wal), expected);
        wal.close().await.unwrap();
        let (wal, rec) = open(dir.path(), WalOptions::default()).await;
        assert_eq!((rec.first_index, rec.last_index), (1, 140));
        assert!(rec.truncated.is_none());
        assert_eq!(all_entries(&wal), expected);
        wal.close().await.unwrap();
    });
}
