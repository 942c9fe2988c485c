//! Model-based test: random sequences of append / overwrite / concurrent appends / hard state /
//! snapshot marker / release / reopen, run against the WAL and against a plain `Vec` model of the
//! raft log. After every step the WAL (through its own API and through raft-rs's `Storage`) must
//! equal the model. proptest prints the failing sequence, shrunk.

mod common;

use common::{entries, entry, open, run, small_options};
use keel_engine::wal::{RecordRef, SnapshotMarker, Wal};
use proptest::prelude::*;
use raft::Storage;
use raft::eraftpb::{Entry, HardState};

#[derive(Debug, Clone)]
enum Op {
    /// Append `count` entries starting `back` entries before the end (0: plain append).
    Append {
        back: u64,
        count: u64,
        term_bump: bool,
    },
    /// Issue `count` single-entry appends before awaiting any of them (group commit).
    Concurrent {
        count: u64,
    },
    HardState {
        vote: u64,
    },
    /// Snapshot marker at a fraction (per mille) of the way through the log.
    Snapshot {
        per_mille: u64,
    },
    /// A snapshot marker past the end (a snapshot received from a leader).
    SnapshotAhead {
        by: u64,
    },
    Release,
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..4u64, 1..40u64, any::<bool>())
            .prop_map(|(back, count, term_bump)| Op::Append { back, count, term_bump }),
        2 => (1..30u64).prop_map(|count| Op::Concurrent { count }),
        1 => (0..4u64).prop_map(|vote| Op::HardState { vote }),
        2 => (0..=1000u64).prop_map(|per_mille| Op::Snapshot { per_mille }),
        1 => (1..5u64).prop_map(|by| Op::SnapshotAhead { by }),
        2 => Just(Op::Release),
        2 => Just(Op::Reopen),
    ]
}

#[derive(Debug, Default)]
struct Model {
    snapshot_index: u64,
    snapshot_term: u64,
    /// Entries after the snapshot.
    entries: Vec<Entry>,
    hard_state: HardState,
    term: u64,
}

impl Model {
    fn last_index(&self) -> u64 {
        self.snapshot_index + self.entries.len() as u64
    }

    fn term_of(&self, index: u64) -> u64 {
        if index == self.snapshot_index {
            self.snapshot_term
        } else {
            self.entries[(index - self.snapshot_index - 1) as usize].term
        }
    }

    fn append(&mut self, entries: &[Entry]) {
        let first = entries[0].index;
        self.entries
            .truncate((first - self.snapshot_index - 1) as usize);
        self.entries.extend_from_slice(entries);
    }

    fn snapshot(&mut self, index: u64, term: u64) {
        if index <= self.last_index() && self.term_of(index) == term {
            self.entries.drain(..(index - self.snapshot_index) as usize);
        } else {
            self.entries.clear();
        }
        self.snapshot_index = index;
        self.snapshot_term = term;
    }
}

fn check(wal: &Wal, model: &Model) {
    assert_eq!(wal.first_index(), model.snapshot_index + 1);
    assert_eq!(wal.last_index(), model.last_index());
    assert_eq!(wal.hard_state(), model.hard_state);
    assert_eq!(wal.snapshot().index, model.snapshot_index);
    let got = wal
        .entries(wal.first_index(), wal.last_index() + 1)
        .unwrap();
    assert_eq!(got, model.entries);
    let storage = wal.storage();
    assert_eq!(storage.first_index().unwrap(), model.snapshot_index + 1);
    assert_eq!(storage.last_index().unwrap(), model.last_index());
    for index in model.snapshot_index..=model.last_index() {
        assert_eq!(
            storage.term(index).unwrap(),
            model.term_of(index),
            "term of {index}"
        );
    }
    if model.snapshot_index > 0 {
        assert!(storage.term(model.snapshot_index - 1).is_err());
    }
}

async fn apply(wal: &mut Wal, model: &mut Model, dir: &std::path::Path, op: &Op) {
    match *op {
        Op::Append {
            back,
            count,
            term_bump,
        } => {
            let back = back.min(model.entries.len() as u64);
            if back > 0 && term_bump {
                model.term += 1;
            }
            let first = model.last_index() + 1 - back;
            let entries = entries(first..first + count, model.term);
            wal.save(&entries, None).await.unwrap();
            model.append(&entries);
        }
        Op::Concurrent { count } => {
            let first = model.last_index() + 1;
            let mut pending = Vec::new();
            for i in first..first + count {
                let e = entry(i, model.term);
                pending.push(wal.save(std::slice::from_ref(&e), None));
                model.append(&[e]);
            }
            for p in pending {
                p.await.unwrap();
            }
        }
        Op::HardState { vote } => {
            let hs = HardState {
                term: model.term,
                vote,
                commit: model.last_index(),
                ..Default::default()
            };
            wal.save(&[], Some(&hs)).await.unwrap();
            model.hard_state = hs;
        }
        Op::Snapshot { per_mille } => {
            let span = model.last_index() - model.snapshot_index;
            let index = model.snapshot_index + span * per_mille / 1000;
            let term = model.term_of(index);
            let marker = SnapshotMarker {
                index,
                term,
                ..Default::default()
            };
            wal.append(&[RecordRef::Snapshot(&marker)]).await.unwrap();
            model.snapshot(index, term);
        }
        Op::SnapshotAhead { by } => {
            model.term += 1;
            let index = model.last_index() + by;
            let marker = SnapshotMarker {
                index,
                term: model.term,
                ..Default::default()
            };
            wal.append(&[RecordRef::Snapshot(&marker)]).await.unwrap();
            model.snapshot(index, model.term);
        }
        Op::Release => {
            wal.release(model.snapshot_index + 1).await.unwrap();
        }
        Op::Reopen => {
            wal.close().await.unwrap();
            let (reopened, rec) = open(dir, small_options()).await;
            assert!(
                rec.truncated.is_none(),
                "a clean close leaves no torn tail: {:?}",
                rec.truncated
            );
            *wal = reopened;
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn wal_matches_a_vec_model(ops in proptest::collection::vec(op(), 1..60)) {
        let dir = tempfile::tempdir().unwrap();
        run(async {
            let (mut wal, _) = open(dir.path(), small_options()).await;
            let mut model = Model { term: 1, ..Model::default() };
            for op in &ops {
                apply(&mut wal, &mut model, dir.path(), op).await;
                check(&wal, &model);
            }
            wal.close().await.unwrap();
            let (wal, _) = open(dir.path(), small_options()).await;
            check(&wal, &model);
            wal.close().await.unwrap();
        });
    }
}
