//! Helpers shared by the engine's integration tests.
#![allow(dead_code)]

use std::future::Future;

use glommio::{LocalExecutorBuilder, Placement};
use keel_engine::wal::{Wal, WalOptions};
use raft::eraftpb::Entry;

/// Runs `f` to completion on a fresh glommio executor on this thread (1 MiB of I/O memory, as the
/// storage core uses).
pub fn run<F: Future>(f: F) -> F::Output {
    let ex = LocalExecutorBuilder::new(Placement::Unbound)
        .io_memory(1 << 20)
        .make()
        .expect("glommio executor");
    ex.run(f)
}

/// Deterministic entry content for `index`: its size varies so records straddle blocks.
pub fn entry(index: u64, term: u64) -> Entry {
    let len = (index * 37 % 700) as usize;
    let mut data = format!("entry-{index}-term-{term}-").into_bytes();
    data.resize(data.len() + len, (index % 251) as u8);
    Entry {
        index,
        term,
        data: data.into(),
        ..Default::default()
    }
}

/// Small segments so tests cut, seal and recycle segments often.
pub fn small_options() -> WalOptions {
    WalOptions {
        segment_size: 64 << 10,
        max_record_size: 16 << 10,
        max_batch_bytes: 16 << 10,
        cache_bytes: 8 << 10,
        ..WalOptions::default()
    }
}

/// Opens `dir`, panicking with the error on failure.
pub async fn open(dir: &std::path::Path, options: WalOptions) -> (Wal, keel_engine::wal::Recovery) {
    match Wal::open(dir, options).await {
        Ok(x) => x,
        Err(e) => panic!("opening {}: {e}", dir.display()),
    }
}

/// Every entry of the WAL's log.
pub fn all_entries(wal: &Wal) -> Vec<Entry> {
    wal.entries(wal.first_index(), wal.last_index() + 1)
        .expect("entries")
}

/// `entry(i, term)` for every `i` in `indexes`.
pub fn entries(indexes: impl IntoIterator<Item = u64>, term: u64) -> Vec<Entry> {
    indexes.into_iter().map(|i| entry(i, term)).collect()
}

/// Appends entries one by one from `first` until the WAL has cut `cuts` segments; returns the
/// next index to append.
pub async fn fill_until_cut(wal: &Wal, first: u64, cuts: u64) -> u64 {
    let mut i = first;
    while wal.stats().segments_cut < cuts {
        wal.save(&[entry(i, 1)], None).await.expect("append");
        i += 1;
    }
    i
}
