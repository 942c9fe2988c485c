//! Members and their IDs, derived exactly as etcd derives them, so that the same flags give the
//! same member and cluster IDs on every member (and the same as etcd's).
//!
//! - **Member ID** (etcd's `membership.NewMember`): SHA-1 of the member's peer URLs, sorted and
//!   concatenated, followed by the cluster token (`--initial-cluster-token`); the first 8 bytes
//!   of the digest, big-endian. The member's name plays no part.
//! - **Cluster ID** (etcd's `RaftCluster.genID`): SHA-1 of the sorted member IDs, each as 8
//!   bytes big-endian; the first 8 bytes of the digest, big-endian.
//!
//! IDs print as lowercase hexadecimal without padding, as etcd's `types.ID`.
//!
//! # On disk
//! Bucket `members`: key = the member ID as lowercase hex (etcd's `types.ID.String()`); value =
//! the member as etcd's JSON, fields in etcd's order and with its `omitempty`s:
//! `{"id":2681083982177880140,"peerURLs":["http://127.0.0.1:23800"],"name":"n1","clientURLs":["http://127.0.0.1:23790"]}`
//! (`"isLearner":true` after `peerURLs` for a learner). Bucket `members_removed`: key = the ID,
//! value `removed`. Written in the same backend transaction as the entry that changes them, so
//! the membership is always the one at the backend's applied index.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use sha1::{Digest, Sha1};

use crate::config::{Config, Url};

/// The backend bucket of members.
pub const MEMBERS_BUCKET: &[u8] = b"members";
/// The backend bucket of removed members' IDs.
pub const MEMBERS_REMOVED_BUCKET: &[u8] = b"members_removed";

/// A member, as etcd stores and lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub id: u64,
    #[serde(rename = "peerURLs")]
    pub peer_urls: Vec<String>,
    #[serde(rename = "isLearner", default, skip_serializing_if = "is_false")]
    pub is_learner: bool,
    /// Empty until the member publishes it (etcd: the same).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// Empty until the member publishes them.
    #[serde(rename = "clientURLs", default, skip_serializing_if = "Vec::is_empty")]
    pub client_urls: Vec<String>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl Member {
    /// The bucket key.
    pub fn key(id: u64) -> Vec<u8> {
        format!("{id:x}").into_bytes()
    }

    /// etcd's JSON.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a member serializes")
    }

    /// From etcd's JSON.
    pub fn from_json(bytes: &[u8]) -> Result<Member, String> {
        serde_json::from_slice(bytes).map_err(|e| e.to_string())
    }
}

/// The members of the cluster as of the backend's applied index.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Members {
    pub members: BTreeMap<u64, Member>,
    pub removed: BTreeSet<u64>,
}

impl Members {
    /// A member's peer URLs.
    pub fn peer_urls(&self, id: u64) -> Option<&[String]> {
        self.members.get(&id).map(|m| m.peer_urls.as_slice())
    }

    /// The voters (not learners).
    pub fn voters(&self) -> impl Iterator<Item = &Member> {
        self.members.values().filter(|m| !m.is_learner)
    }

    /// etcd's "started": a member that has published its name.
    fn started(m: &Member) -> bool {
        !m.name.is_empty()
    }

    /// etcd's `IsReadyToAddVotingMember`: the started voters would still be a quorum with one
    /// more voter.
    pub fn ready_to_add_voter(&self) -> bool {
        let (mut members, mut started) = (1, 0);
        for m in self.voters() {
            members += 1;
            started += usize::from(Members::started(m));
        }
        // etcd's exception: a second member added to a one-member cluster (the way a cluster
        // restored from a snapshot grows back).
        (started == 1 && members == 2) || started >= quorum(members)
    }

    /// etcd's `IsReadyToRemoveVotingMember`: the started voters other than `id` are a quorum of
    /// the voters left.
    pub fn ready_to_remove_voter(&self, id: u64) -> bool {
        let (mut members, mut started) = (0, 0);
        for m in self.voters().filter(|m| m.id != id) {
            members += 1;
            started += usize::from(Members::started(m));
        }
        started >= quorum(members)
    }

    /// etcd's `isConnectedFullySince`: every voter but `me` has been reachable since `since`.
    pub fn connected_fully_since(
        &self,
        me: u64,
        since: std::time::Instant,
        active: impl Fn(u64) -> Option<std::time::Instant>,
    ) -> bool {
        self.voters()
            .filter(|m| m.id != me)
            .all(|m| active(m.id).is_some_and(|t| t <= since))
    }

    /// etcd's `numConnectedSince`: the voters reachable since `since`, `me` included.
    pub fn connected_since(
        &self,
        me: u64,
        since: std::time::Instant,
        active: impl Fn(u64) -> Option<std::time::Instant>,
    ) -> usize {
        self.voters()
            .filter(|m| m.id == me || active(m.id).is_some_and(|t| t <= since))
            .count()
    }

    /// etcd's `IsReadyToPromoteMember`: as adding a voter, the learner counted as started.
    pub fn ready_to_promote(&self) -> bool {
        let (mut members, mut started) = (1, 1);
        for m in self.voters() {
            members += 1;
            started += usize::from(Members::started(m));
        }
        started >= quorum(members)
    }
}

/// A majority of `voters`.
fn quorum(voters: usize) -> usize {
    voters / 2 + 1
}

#[allow(
    clippy::big_endian_bytes,
    reason = "etcd reads the digest's first 8 bytes big-endian"
)]
fn first_u64(digest: &[u8]) -> u64 {
    u64::from_be_bytes(digest[..8].try_into().expect("SHA-1 has 20 bytes"))
}

/// etcd's member ID for `peer_urls` in the cluster named by `token`.
pub fn member_id(peer_urls: &[Url], token: &str) -> u64 {
    let urls: Vec<String> = peer_urls.iter().map(ToString::to_string).collect();
    id_of(&urls, token, None)
}

/// etcd's ID of a member added at runtime (`MemberAdd`): no token, the time in Unix seconds.
pub fn added_member_id(peer_urls: &[String], unix_seconds: i64) -> u64 {
    id_of(peer_urls, "", Some(unix_seconds))
}

fn id_of(peer_urls: &[String], token: &str, time: Option<i64>) -> u64 {
    let mut urls = peer_urls.to_vec();
    urls.sort();
    let mut h = Sha1::new();
    for u in &urls {
        h.update(u.as_bytes());
    }
    h.update(token.as_bytes());
    if let Some(t) = time {
        h.update(t.to_string().as_bytes());
    }
    first_u64(&h.finalize())
}

/// etcd's cluster ID for a cluster of these members.
#[allow(
    clippy::big_endian_bytes,
    reason = "etcd hashes the member IDs big-endian"
)]
pub fn cluster_id(member_ids: &[u64]) -> u64 {
    let mut ids = member_ids.to_vec();
    ids.sort_unstable();
    let mut h = Sha1::new();
    for id in ids {
        h.update(id.to_be_bytes());
    }
    first_u64(&h.finalize())
}

/// What a new member bootstraps with, from its flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ids {
    pub cluster_id: u64,
    pub member_id: u64,
    /// Every initial member, with its name and peer URLs, in `--initial-cluster` order.
    pub members: Vec<Member>,
}

impl Ids {
    /// The IDs `--initial-cluster`, `--initial-cluster-token` and `--name` give.
    pub fn new(config: &Config) -> Ids {
        let token = &config.initial_cluster_token;
        let members: Vec<Member> = config
            .initial_cluster
            .iter()
            .map(|(name, urls)| {
                let mut peer_urls: Vec<String> = urls.iter().map(ToString::to_string).collect();
                peer_urls.sort();
                Member {
                    id: member_id(urls, token),
                    peer_urls,
                    is_learner: false,
                    name: name.clone(),
                    client_urls: Vec::new(),
                }
            })
            .collect();
        let member = config
            .initial_cluster
            .iter()
            .find(|(name, _)| *name == config.name)
            .map_or_else(
                || member_id(&config.initial_advertise_peer_urls, token),
                |(_, urls)| member_id(urls, token),
            );
        let ids: Vec<u64> = members.iter().map(|m| m.id).collect();
        Ids {
            cluster_id: cluster_id(&ids),
            member_id: member,
            members,
        }
    }
}

/// etcd's `URLsMap.String()`: `name=url` pairs, sorted, joined by commas.
fn urls_map(pairs: impl Iterator<Item = (String, String)>) -> String {
    let mut all: Vec<String> = pairs.map(|(n, u)| format!("{n}={u}")).collect();
    all.sort();
    all.join(",")
}

/// etcd's checks of a new member's bootstrap flags (`ServerConfig.VerifyBootstrap`), with its
/// messages: the member's name is in `--initial-cluster`, its URLs there are its
/// `--initial-advertise-peer-urls`, and no URL appears twice.
pub fn verify_bootstrap(config: &Config) -> Result<(), String> {
    let Some((_, listed)) = config
        .initial_cluster
        .iter()
        .find(|(n, _)| *n == config.name)
    else {
        return Err(format!(
            "couldn't find local name {:?} in the initial cluster configuration",
            config.name
        ));
    };
    let mut urls: Vec<String> = listed.iter().map(ToString::to_string).collect();
    let mut apurls: Vec<String> = config
        .initial_advertise_peer_urls
        .iter()
        .map(ToString::to_string)
        .collect();
    urls.sort();
    apurls.sort();
    if urls != apurls {
        let first_difference = apurls.iter().zip(&urls).find(|(a, b)| a != b).map_or_else(
            || format!("{:?} != {:?}", apurls.join(","), urls.join(",")),
            |(a, b)| format!("{a:?} != {b:?}"),
        );
        let missing: Vec<String> = urls
            .iter()
            .filter(|u| !apurls.contains(u))
            .map(|u| format!("{}={u}", config.name))
            .collect();
        if !missing.is_empty() {
            return Err(format!(
                "--initial-cluster has {} but missing from --initial-advertise-peer-urls={} (resolved urls: {first_difference})",
                missing.join(","),
                apurls.join(",")
            ));
        }
        let missing: Vec<&String> = apurls.iter().filter(|u| !urls.contains(u)).collect();
        let missing: Vec<&str> = missing.iter().map(|s| s.as_str()).collect();
        return Err(format!(
            "--initial-advertise-peer-urls has {} but missing from --initial-cluster={}",
            missing.join(","),
            urls_map(apurls.iter().map(|u| (config.name.clone(), u.clone())))
        ));
    }
    let all: Vec<(String, String)> = config
        .initial_cluster
        .iter()
        .flat_map(|(n, urls)| urls.iter().map(move |u| (n.clone(), u.to_string())))
        .collect();
    let mut seen = BTreeSet::new();
    if all.iter().any(|(_, u)| !seen.insert(u.clone())) {
        return Err(format!(
            "initial cluster {} has duplicate url",
            urls_map(all.into_iter())
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_url;

    #[test]
    fn ids_match_etcds() {
        // etcd 3.4.23, `--initial-cluster n1=http://127.0.0.1:23800 --initial-cluster-token tok`:
        // `etcdctl member list -w json` printed member 2681083982177880140 in cluster
        // 4413477065597753003.
        let urls = [parse_url("http://127.0.0.1:23800").unwrap()];
        let m = member_id(&urls, "tok");
        assert_eq!(m, 2_681_083_982_177_880_140);
        assert_eq!(format!("{m:x}"), "25351fad42b3c84c");
        assert_eq!(cluster_id(&[m]), 4_413_477_065_597_753_003);
    }

    #[test]
    fn members_are_stored_as_etcds_json() {
        // The bytes etcd 3.4.23 wrote into its `members` bucket.
        let etcd = br#"{"id":2681083982177880140,"peerURLs":["http://127.0.0.1:23800"],"name":"n1","clientURLs":["http://127.0.0.1:23790"]}"#;
        let m = Member::from_json(etcd).unwrap();
        assert_eq!(m.id, 2_681_083_982_177_880_140);
        assert_eq!(m.to_json(), etcd);
        assert_eq!(Member::key(m.id), b"25351fad42b3c84c");
        let unpublished = Member {
            client_urls: Vec::new(),
            name: String::new(),
            is_learner: true,
            ..m
        };
        assert_eq!(
            unpublished.to_json(),
            br#"{"id":2681083982177880140,"peerURLs":["http://127.0.0.1:23800"],"isLearner":true}"#
        );
    }

    fn config(args: &[&str]) -> Config {
        use clap::Parser;
        let mut argv = vec!["keel"];
        argv.extend_from_slice(args);
        crate::config::Flags::try_parse_from(argv)
            .unwrap()
            .validate()
            .unwrap()
    }

    #[test]
    fn bootstrap_checks_give_etcds_messages() {
        // Each message as etcd 3.4.23 printed it for the same flags.
        let cases = [
            (
                vec![
                    "--name",
                    "n1",
                    "--initial-cluster",
                    "n2=http://127.0.0.1:23810",
                ],
                r#"couldn't find local name "n1" in the initial cluster configuration"#,
            ),
            (
                vec![
                    "--name",
                    "n1",
                    "--initial-advertise-peer-urls",
                    "http://127.0.0.1:23810",
                    "--initial-cluster",
                    "n1=http://127.0.0.1:23811",
                ],
                r#"--initial-cluster has n1=http://127.0.0.1:23811 but missing from --initial-advertise-peer-urls=http://127.0.0.1:23810 (resolved urls: "http://127.0.0.1:23810" != "http://127.0.0.1:23811")"#,
            ),
            (
                vec![
                    "--name",
                    "n1",
                    "--initial-advertise-peer-urls",
                    "http://127.0.0.1:23810,http://127.0.0.1:23812",
                    "--initial-cluster",
                    "n1=http://127.0.0.1:23810",
                ],
                "--initial-advertise-peer-urls has http://127.0.0.1:23812 but missing from --initial-cluster=n1=http://127.0.0.1:23810,n1=http://127.0.0.1:23812",
            ),
            (
                vec![
                    "--name",
                    "n1",
                    "--initial-advertise-peer-urls",
                    "http://127.0.0.1:23810",
                    "--initial-cluster",
                    "n1=http://127.0.0.1:23810,n2=http://127.0.0.1:23810",
                ],
                "initial cluster n1=http://127.0.0.1:23810,n2=http://127.0.0.1:23810 has duplicate url",
            ),
        ];
        for (args, expected) in cases {
            assert_eq!(verify_bootstrap(&config(&args)).unwrap_err(), expected);
        }
        assert_eq!(verify_bootstrap(&config(&[])), Ok(()));
    }

    #[test]
    fn peer_url_order_does_not_matter() {
        let a = parse_url("http://10.0.0.1:2380").unwrap();
        let b = parse_url("http://10.0.0.2:2380").unwrap();
        assert_eq!(
            member_id(&[a.clone(), b.clone()], "t"),
            member_id(&[b, a], "t")
        );
        assert_eq!(cluster_id(&[1, 2, 3]), cluster_id(&[3, 1, 2]));
        assert_ne!(cluster_id(&[1, 2]), cluster_id(&[1, 3]));
    }
}
