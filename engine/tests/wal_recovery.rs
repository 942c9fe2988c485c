//! Recovery from damaged WAL directories: torn tails are truncated to exactly the records before
//! them; damage anywhere else is a corruption error naming the file and offset.

mod common;

use std::path::{Path, PathBuf};

use common::{all_entries, entries, entry, fill_until_cut, open, run, small_options};
use keel_engine::Error;
use keel_engine::wal::record::{self, Scan};
use keel_engine::wal::segment;
use keel_engine::wal::{Wal, WalOptions};
use raft::eraftpb::Entry;

/// Live segment files of `dir`, in sequence order.
fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| segment::parse_segment_name(p.file_name().unwrap().to_str().unwrap()).is_some())
        .collect();
    v.sort();
    v
}

/// `(start, end_of_payload)` of every record in segment file `path`.
fn records(path: &Path) -> Vec<(usize, usize)> {
    let name = path.file_name().unwrap().to_str().unwrap();
    let (seq, _) = segment::parse_segment_name(name).unwrap();
    let buf = std::fs::read(path).unwrap();
    let mut off = segment::DATA_START as usize;
    let mut out = Vec::new();
    while let Scan::Record(r) = record::scan(&buf, off, segment::salt(seq)) {
        out.push((off, off + record::HEADER_LEN + r.payload.len()));
        off = r.next;
    }
    out
}

fn copy_dir(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn patch(path: &Path, f: impl FnOnce(&mut Vec<u8>)) {
    let mut bytes = std::fs::read(path).unwrap();
    f(&mut bytes);
    std::fs::write(path, bytes).unwrap();
}

async fn open_err(dir: &Path, options: WalOptions) -> Error {
    match Wal::open(dir, options).await {
        Ok(_) => panic!("opening {} should fail", dir.display()),
        Err(e) => e,
    }
}

/// Writes entries 1..=19 (one append each) and then entry 20, whose record crosses a 4 KiB block
/// boundary, each in its own group-commit write.
async fn build_wal(dir: &Path) -> Vec<Entry> {
    let (wal, _) = open(dir, small_options()).await;
    let mut entries = entries(1..=19, 1);
    for e in &entries {
        wal.save(std::slice::from_ref(e), None).await.unwrap();
    }
    let mut last = entry(20, 1);
    last.data = (0..300u32).map(|i| i as u8).collect::<Vec<u8>>().into();
    wal.save(std::slice::from_ref(&last), None).await.unwrap();
    wal.close().await.unwrap();
    entries.push(last);
    entries
}

#[test]
fn every_damaged_offset_of_the_last_record_recovers_the_records_before_it() {
    let base = tempfile::tempdir().unwrap();
    let pristine = base.path().join("pristine");
    let case = base.path().join("case");
    run(async {
        let entries = build_wal(&pristine).await;
        let seg = segments(&pristine).pop().unwrap();
        let (start, end) = *records(&seg).last().unwrap();
        let name = seg.file_name().unwrap().to_owned();
        let before = &entries[..19];
        let mut cases = 0;
        for offset in start..end {
            for damage in ["zero-from", "truncate-at", "flip"] {
                copy_dir(&pristine, &case);
                let file = case.join(&name);
                match damage {
                    "zero-from" => patch(&file, |b| b[offset..end].fill(0)),
                    "truncate-at" => {
                        std::fs::OpenOptions::new()
                            .write(true)
                            .open(&file)
                            .unwrap()
                            .set_len(offset as u64)
                            .unwrap();
                    }
                    _ => patch(&file, |b| b[offset] ^= 0xff),
                }
                let (wal, rec) = open(&case, small_options()).await;
                assert_eq!(rec.last_index, 19, "{damage} at {offset}");
                assert_eq!(all_entries(&wal), before, "{damage} at {offset}");
                if damage == "flip" {
                    assert_eq!(rec.truncated.as_ref().map(|t| t.1), Some(start as u64));
                }
                // The log continues cleanly where it was cut, on every seventh case (each check
                // costs a second open).
                cases += 1;
                if cases % 7 == 0 {
                    wal.save(&[entry(20, 2)], None).await.unwrap();
                    wal.close().await.unwrap();
                    let (wal, rec) = open(&case, small_options()).await;
                    assert_eq!(rec.last_index, 20);
                    assert!(
                        rec.truncated.is_none(),
                        "{damage} at {offset}: clean after the repair"
                    );
                    let mut expected = before.to_vec();
                    expected.push(entry(20, 2));
                    assert_eq!(all_entries(&wal), expected, "{damage} at {offset}");
                }
                wal.close().await.unwrap();
            }
        }
        assert!(end - start > 300);
    });
}

#[test]
fn damage_before_the_last_write_is_corruption_with_file_and_offset() {
    let base = tempfile::tempdir().unwrap();
    let pristine = base.path().join("pristine");
    let case = base.path().join("case");
    run(async {
        build_wal(&pristine).await;
        let seg = segments(&pristine).pop().unwrap();
        let recs = records(&seg);
        // Records 0 and 1 are the segment's metadata and hard state; then entries 1..=20.
        for (which, &(start, end)) in recs.iter().enumerate().take(recs.len() - 1) {
            for offset in [start, start + 4, start + 12, end - 1] {
                copy_dir(&pristine, &case);
                let file = case.join(seg.file_name().unwrap());
                patch(&file, |b| b[offset] ^= 0x10);
                match open_err(&case, small_options()).await {
                    Error::Corruption {
                        path,
                        offset: at,
                        reason,
                    } => {
                        assert_eq!(path, file, "record {which}");
                        assert_eq!(at, start as u64, "record {which}: {reason}");
                        assert!(reason.contains("not a torn tail"), "{reason}");
                    }
                    other => {
                        panic!("record {which} byte {offset}: expected corruption, got {other}")
                    }
                }
            }
        }
    });
}

#[test]
fn sealed_segments_and_headers_must_be_intact() {
    let base = tempfile::tempdir().unwrap();
    let pristine = base.path().join("pristine");
    let case = base.path().join("case");
    run(async {
        let (wal, _) = open(&pristine, small_options()).await;
        for i in 1..=400 {
            wal.save(&[entry(i, 1)], None).await.unwrap();
        }
        wal.close().await.unwrap();
        let segs = segments(&pristine);
        assert!(segs.len() >= 3);

        // The last record of a sealed (non-last) segment.
        let (start, _) = *records(&segs[0]).last().unwrap();
        copy_dir(&pristine, &case);
        patch(&case.join(segs[0].file_name().unwrap()), |b| {
            b[start + 30] ^= 1
        });
        let err = open_err(&case, small_options()).await;
        assert!(
            matches!(&err, Error::Corruption { offset, reason, .. }
                if *offset == start as u64 && reason.contains("sealed")),
            "{err}"
        );

        // A damaged header.
        copy_dir(&pristine, &case);
        patch(&case.join(segs[1].file_name().unwrap()), |b| b[20] ^= 1);
        let err = open_err(&case, small_options()).await;
        assert!(
            matches!(&err, Error::Corruption { offset: 12, .. }),
            "{err}"
        );

        // A missing segment in the middle.
        copy_dir(&pristine, &case);
        std::fs::remove_file(case.join(segs[1].file_name().unwrap())).unwrap();
        let err = open_err(&case, small_options()).await;
        assert!(err.to_string().contains("missing"), "{err}");

        // Not a segment at all.
        copy_dir(&pristine, &case);
        patch(&case.join(segs[0].file_name().unwrap()), |b| {
            b[..8].copy_from_slice(b"GARBAGE!")
        });
        let err = open_err(&case, small_options()).await;
        assert!(err.to_string().contains("magic"), "{err}");
    });
}

/// A torn write can leave later records of the same write intact after a damaged one. They are
/// discarded with the tail, and zeroed, so they can never reappear after new appends.
#[test]
fn fragments_of_a_torn_write_never_resurface() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let (wal, _) = open(dir.path(), small_options()).await;
        wal.save(&entries(1..=5, 1), None).await.unwrap();
        // One write carrying entries 6, 7, 8.
        wal.save(&entries(6..=8, 1), None).await.unwrap();
        wal.close().await.unwrap();
        let seg = segments(dir.path()).pop().unwrap();
        let recs = records(&seg);
        let (start6, _) = recs[recs.len() - 3];
        patch(&seg, |b| b[start6 + 40] ^= 0xff);

        let (wal, rec) = open(dir.path(), small_options()).await;
        assert_eq!(rec.last_index, 5);
        assert_eq!(rec.truncated.as_ref().map(|t| t.1), Some(start6 as u64));
        // New, shorter entries overwrite the region; a crash-free reopen must not find 7 or 8.
        let mut short = entry(6, 2);
        short.data = b"x".to_vec().into();
        wal.save(std::slice::from_ref(&short), None).await.unwrap();
        wal.close().await.unwrap();
        let (wal, rec) = open(dir.path(), small_options()).await;
        assert_eq!(rec.last_index, 6);
        assert!(rec.truncated.is_none());
        let mut expected = entries(1..=5, 1);
        expected.push(short);
        assert_eq!(all_entries(&wal), expected);
    });
}

/// A crash can tear the very first write into a freshly cut segment, leaving it without the
/// records that describe the log at its start (metadata, hard state, snapshot marker). Opening
/// must write them again; otherwise, once the older segments are released, the metadata is lost.
#[test]
fn a_torn_first_write_of_a_new_segment_gets_its_start_records_back() {
    let dir = tempfile::tempdir().unwrap();
    let metadata = keel_engine::wal::Metadata {
        cluster_id: 9,
        member_id: 4,
    };
    let options = WalOptions {
        metadata,
        ..small_options()
    };
    run(async {
        let (wal, _) = open(dir.path(), options.clone()).await;
        let i = fill_until_cut(&wal, 1, 2).await;
        wal.close().await.unwrap();
        // Tear everything written into the new segment.
        let last = segments(dir.path()).pop().unwrap();
        patch(&last, |b| b[segment::DATA_START as usize..].fill(0));

        let (wal, rec) = open(dir.path(), small_options()).await;
        let last_index = rec.last_index;
        assert_eq!(last_index, i - 2, "the entry in the torn write is gone");
        for j in last_index + 1..last_index + 50 {
            wal.save(&[entry(j, 1)], None).await.unwrap();
        }
        let marker = keel_engine::wal::SnapshotMarker {
            index: last_index + 10,
            term: 1,
            ..Default::default()
        };
        wal.append(&[keel_engine::wal::RecordRef::Snapshot(&marker)])
            .await
            .unwrap();
        assert_eq!(wal.release(last_index + 11).await.unwrap(), 1);
        wal.close().await.unwrap();

        let (wal, rec) = open(dir.path(), small_options()).await;
        assert_eq!(rec.metadata, metadata);
        assert_eq!(
            (rec.first_index, rec.last_index),
            (last_index + 11, last_index + 49)
        );
        let expected = entries(last_index + 11..last_index + 50, 1);
        assert_eq!(all_entries(&wal), expected);
    });
}

/// The only segment's first write torn: the configured metadata still applies.
#[test]
fn a_torn_first_write_of_a_new_wal_keeps_the_configured_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let metadata = keel_engine::wal::Metadata {
        cluster_id: 5,
        member_id: 6,
    };
    let options = WalOptions {
        metadata,
        ..small_options()
    };
    run(async {
        let (wal, _) = open(dir.path(), options.clone()).await;
        wal.save(&[entry(1, 1)], None).await.unwrap();
        wal.close().await.unwrap();
        let only = segments(dir.path()).pop().unwrap();
        patch(&only, |b| b[segment::DATA_START as usize..].fill(0));
        let (wal, rec) = open(dir.path(), options.clone()).await;
        assert_eq!(rec.last_index, 0);
        wal.close().await.unwrap();
        let (_, rec) = open(dir.path(), small_options()).await;
        assert_eq!(rec.metadata, metadata);
    });
}

/// Review finding: a torn tail that is not overwritten because the next append cuts a new
/// segment must not turn into "corruption in a sealed segment" on the open after that.
#[test]
fn a_torn_tail_sealed_by_a_cut_reopens_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    // Framed sizes: start records 88 bytes; an entry with `n` data bytes takes 48 + n.
    let sized = |index: u64, term: u64, n: usize| {
        let mut e = entry(index, term);
        e.data = vec![index as u8; n].into();
        e
    };
    run(async {
        let (wal, _) = open(dir.path(), small_options()).await;
        for i in 1..=4 {
            wal.save(&[sized(i, 1, 15000)], None).await.unwrap();
        }
        wal.close().await.unwrap();
        let seg = segments(dir.path()).pop().unwrap();
        let (start4, _) = *records(&seg).last().unwrap();
        patch(&seg, |b| b[start4 + 5000] ^= 0xff);

        let (wal, rec) = open(dir.path(), small_options()).await;
        assert_eq!(rec.last_index, 3);
        assert_eq!(rec.truncated.as_ref().map(|t| t.1), Some(start4 as u64));
        // 16 208 bytes are left in the segment; this re-sent entry needs 16 248: a new segment.
        let resent = sized(4, 2, 16200);
        wal.save(std::slice::from_ref(&resent), None).await.unwrap();
        assert_eq!(
            wal.stats().segments_cut,
            1,
            "the re-sent entry went to a new segment"
        );
        wal.close().await.unwrap();
        let (wal, rec) = open(dir.path(), small_options()).await;
        assert_eq!(rec.last_index, 4);
        assert!(rec.truncated.is_none());
        assert_eq!(wal.entries(4, 5).unwrap(), vec![resent]);
    });
}

/// Review finding: in a sealed segment, a damaged header that reads as zeros must not hide the
/// records after it.
#[test]
fn a_zeroed_record_inside_a_sealed_segment_is_corruption() {
    let base = tempfile::tempdir().unwrap();
    let dir = base.path().join("wal");
    run(async {
        let (wal, _) = open(&dir, small_options()).await;
        fill_until_cut(&wal, 1, 3).await;
        wal.close().await.unwrap();
        let first = segments(&dir).remove(0);
        let recs = records(&first);
        let (start, _) = recs[recs.len() / 2];
        patch(&first, |b| b[start..start + record::HEADER_LEN].fill(0));
        let err = open_err(&dir, small_options()).await;
        assert!(
            matches!(&err, Error::Corruption { offset, .. } if *offset == start as u64),
            "{err}"
        );
    });
}
