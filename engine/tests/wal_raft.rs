//! The WAL as the storage of a real raft-rs `RawNode`: a single voter campaigns, commits proposals
//! through the `Ready` loop (entries and hard state saved with one durable append per `Ready`),
//! and after a restart from the WAL alone it has the same log, term and commit index.

mod common;

use common::{open, run, small_options};
use keel_engine::wal::{RecordRef, SnapshotMarker, Wal, WalStorage};
use raft::eraftpb::ConfState;
use raft::{Config, RawNode, StateRole, Storage};

fn config() -> Config {
    Config {
        id: 1,
        election_tick: 10,
        heartbeat_tick: 1,
        ..Config::default()
    }
}

/// Handles one `Ready`: persist, then advance. Returns how many committed entries were seen.
async fn handle_ready(node: &mut RawNode<WalStorage>, wal: &Wal) -> usize {
    if !node.has_ready() {
        return 0;
    }
    let mut ready = node.ready();
    let mut committed = ready.take_committed_entries().len();
    wal.save(ready.entries(), ready.hs()).await.unwrap();
    let mut light = node.advance(ready);
    if let Some(commit) = light.commit_index() {
        let mut hs = wal.hard_state();
        hs.commit = commit;
        wal.save(&[], Some(&hs)).await.unwrap();
    }
    committed += light.take_committed_entries().len();
    node.advance_apply();
    committed
}

#[test]
fn raw_node_commits_through_the_wal_and_restarts_from_it() {
    let dir = tempfile::tempdir().unwrap();
    let logger = raft::default_logger();
    run(async {
        let (wal, _) = open(dir.path(), small_options()).await;
        // Bootstrap membership the way a new single-member cluster does: a snapshot marker at
        // index 0 carrying the initial configuration.
        let conf = ConfState {
            voters: vec![1],
            ..Default::default()
        };
        let marker = SnapshotMarker {
            index: 0,
            term: 0,
            conf_state: conf.clone(),
        };
        wal.append(&[RecordRef::Snapshot(&marker)]).await.unwrap();

        let mut node = RawNode::new(&config(), wal.storage(), &logger).unwrap();
        node.campaign().unwrap();
        let mut committed = handle_ready(&mut node, &wal).await;
        assert_eq!(node.raft.state, StateRole::Leader);
        for i in 0..300 {
            node.propose(vec![], format!("proposal {i}").into_bytes())
                .unwrap();
            committed += handle_ready(&mut node, &wal).await;
        }
        while node.has_ready() {
            committed += handle_ready(&mut node, &wal).await;
        }
        assert_eq!(committed, 301, "the leader's empty entry and 300 proposals");
        let (term, commit, last) = (
            node.raft.term,
            node.raft.raft_log.committed,
            wal.last_index(),
        );
        assert_eq!(commit, last);
        assert!(wal.stats().segments_cut >= 1);
        wal.close().await.unwrap();

        let (wal, rec) = open(dir.path(), small_options()).await;
        assert_eq!(rec.hard_state.term, term);
        assert_eq!(rec.hard_state.commit, commit);
        let storage = wal.storage();
        assert_eq!(storage.initial_state().unwrap().conf_state, conf);
        let node = RawNode::new(&config(), storage.clone(), &logger).unwrap();
        assert_eq!(node.raft.term, term);
        assert_eq!(node.raft.raft_log.committed, commit);
        assert_eq!(node.raft.raft_log.last_index(), last);
        let entries = storage
            .entries(2, last + 1, None, raft::GetEntriesContext::empty(false))
            .unwrap();
        for (i, e) in entries.iter().enumerate() {
            assert_eq!(e.data.as_ref(), format!("proposal {i}").as_bytes());
        }
        // Size-limited reads return at least one entry and respect the limit after that.
        let limited = storage
            .entries(2, last + 1, 40, raft::GetEntriesContext::empty(false))
            .unwrap();
        assert!(!limited.is_empty() && limited.len() < entries.len());
        // Outside the log: raft's own errors, no panic.
        assert!(
            storage
                .entries(2, last + 5, None, raft::GetEntriesContext::empty(false))
                .is_err()
        );
        assert!(storage.term(last + 1).is_err());
        let snap = storage.snapshot(0, 2).unwrap();
        assert_eq!(snap.get_metadata().get_conf_state(), &conf);
        assert!(
            storage.snapshot(5, 2).is_err(),
            "no snapshot that recent yet"
        );
        wal.close().await.unwrap();
    });
}
