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

use sha1::{Digest, Sha1};

use crate::config::{Config, Url};

#[allow(
    clippy::big_endian_bytes,
    reason = "etcd reads the digest's first 8 bytes big-endian"
)]
fn first_u64(digest: &[u8]) -> u64 {
    u64::from_be_bytes(digest[..8].try_into().expect("SHA-1 has 20 bytes"))
}

/// etcd's member ID for `peer_urls` in the cluster named by `token`.
pub fn member_id(peer_urls: &[Url], token: &str) -> u64 {
    let mut urls: Vec<String> = peer_urls.iter().map(ToString::to_string).collect();
    urls.sort();
    let mut h = Sha1::new();
    for u in &urls {
        h.update(u.as_bytes());
    }
    h.update(token.as_bytes());
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

/// The IDs a new member starts with, from its flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ids {
    pub cluster_id: u64,
    pub member_id: u64,
    /// Every initial member's ID, in `--initial-cluster` order.
    pub voters: Vec<u64>,
}

impl Ids {
    /// The IDs `--initial-cluster`, `--initial-cluster-token` and `--name` give.
    pub fn new(config: &Config) -> Ids {
        let token = &config.initial_cluster_token;
        let voters: Vec<u64> = config
            .initial_cluster
            .iter()
            .map(|(_, urls)| member_id(urls, token))
            .collect();
        let member = config
            .initial_cluster
            .iter()
            .find(|(name, _)| *name == config.name)
            .map_or_else(
                || member_id(&config.initial_advertise_peer_urls, token),
                |(_, urls)| member_id(urls, token),
            );
        Ids {
            cluster_id: cluster_id(&voters),
            member_id: member,
            voters,
        }
    }
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
