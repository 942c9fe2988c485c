//! What a raft entry carries: a [`Proposal`], one client write (or a write the member makes
//! itself: lease expiry, checkpoints, compaction), as etcd's own request messages.
//!
//! # Wire format
//! A protobuf message (prost), stored as the data of an `EntryNormal`:
//!
//! | field | tag | meaning |
//! |---|---|---|
//! | `id` | 1 | matches the reply to the waiting request on the proposing member |
//! | `request` | 2–9 | the request: `PutRequest`, `DeleteRangeRequest`, `TxnRequest`, `CompactionRequest`, `LeaseGrantRequest`, `LeaseRevokeRequest`, `LeaseCheckpointRequest` (etcd's messages), a member's published attributes ([`MemberAttributes`]: ID 1, name 2, client URLs 3), or a member's new peer URLs (10, etcd's `MemberUpdateRequest`) |
//! | `request` | 12 | an auth change ([`AuthRequest`]: etcd's Auth request messages, tags 1–12, passwords replaced by their bcrypt hashes, and Authenticate's token prefix) |
//! | `auth` | 14 | [`AuthStamp`]: the auth revision a client request was checked against, and whether auth was on; absent in the member's own proposals |
//! | `member` | 15 | the proposing member's ID (0 in entries written before replication) |
//!
//! The network side encodes exactly the bytes that will be proposed and checks them (size and
//! txn nesting) before anything reaches raft, so every committed entry decodes; [`decode`]
//! checks the nesting again before prost recurses, because a committed entry that cannot be
//! decoded must cost one request an error, never the member its storage core.

use keel_engine::Error;
use keel_proto::codec::{self, DepthError, MAX_TXN_DEPTH, Nested};
use keel_proto::etcdserverpb as pb;
use prost::Message as _;
use prost::encoding::{WireType, decode_key, decode_varint};

/// A write, as carried in a raft entry: etcd's own request messages.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Proposal {
    /// Matches the reply to the request on the proposing member.
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(oneof = "Request", tags = "2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12")]
    pub request: Option<Request>,
    /// What a client request's permissions were checked against (none: the member's own).
    #[prost(message, optional, tag = "14")]
    pub auth: Option<AuthStamp>,
    /// The member that proposed it (only its waiter gets the reply).
    #[prost(uint64, tag = "15")]
    pub member: u64,
}

/// The request of a proposal.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Request {
    #[prost(message, tag = "2")]
    Put(pb::PutRequest),
    #[prost(message, tag = "3")]
    DeleteRange(pb::DeleteRangeRequest),
    #[prost(message, tag = "4")]
    Txn(pb::TxnRequest),
    #[prost(message, tag = "5")]
    Compaction(pb::CompactionRequest),
    /// A grant; the ID is chosen (non-zero) before the proposal.
    #[prost(message, tag = "6")]
    LeaseGrant(pb::LeaseGrantRequest),
    #[prost(message, tag = "7")]
    LeaseRevoke(pb::LeaseRevokeRequest),
    #[prost(message, tag = "8")]
    LeaseCheckpoint(pb::LeaseCheckpointRequest),
    /// A member publishes its name and client URLs (etcd's `publish`).
    #[prost(message, tag = "9")]
    MemberAttributes(MemberAttributes),
    /// A member's new peer URLs (etcd's `MemberUpdate`; raft's configuration is unchanged).
    #[prost(message, tag = "10")]
    MemberUpdate(pb::MemberUpdateRequest),
    /// Get, raise or clear an alarm (etcd's `InternalRaftRequest.Alarm`).
    #[prost(message, tag = "11")]
    Alarm(pb::AlarmRequest),
    /// An auth change.
    #[prost(message, tag = "12")]
    Auth(AuthRequest),
}

/// The auth state a client request was checked against: applying it with a newer auth
/// revision (or with auth turned on meanwhile) refuses it ("revision of auth store is old").
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct AuthStamp {
    #[prost(uint64, tag = "1")]
    pub revision: u64,
    #[prost(bool, tag = "2")]
    pub enabled: bool,
    /// The caller ("" without one).
    #[prost(string, tag = "3")]
    pub username: String,
}

/// An auth change, as carried in a proposal.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AuthRequest {
    #[prost(oneof = "AuthOp", tags = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12")]
    pub op: Option<AuthOp>,
}

/// etcd's Auth requests that change the auth store (`UserAdd` and `UserChangePassword` carry
/// `hashedPassword`, never the password).
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum AuthOp {
    #[prost(message, tag = "1")]
    Enable(pb::AuthEnableRequest),
    #[prost(message, tag = "2")]
    Disable(pb::AuthDisableRequest),
    #[prost(message, tag = "3")]
    Authenticate(InternalAuthenticate),
    #[prost(message, tag = "4")]
    UserAdd(pb::AuthUserAddRequest),
    #[prost(message, tag = "5")]
    UserDelete(pb::AuthUserDeleteRequest),
    #[prost(message, tag = "6")]
    UserChangePassword(pb::AuthUserChangePasswordRequest),
    #[prost(message, tag = "7")]
    UserGrantRole(pb::AuthUserGrantRoleRequest),
    #[prost(message, tag = "8")]
    UserRevokeRole(pb::AuthUserRevokeRoleRequest),
    #[prost(message, tag = "9")]
    RoleAdd(pb::AuthRoleAddRequest),
    #[prost(message, tag = "10")]
    RoleDelete(pb::AuthRoleDeleteRequest),
    #[prost(message, tag = "11")]
    RoleGrantPermission(pb::AuthRoleGrantPermissionRequest),
    #[prost(message, tag = "12")]
    RoleRevokePermission(pb::AuthRoleRevokePermissionRequest),
}

/// Authenticate, once the password was checked (etcd's `InternalAuthenticateRequest`): the user
/// and the random part of the token, whose index part is the entry's.
#[derive(Clone, PartialEq, prost::Message)]
pub struct InternalAuthenticate {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub simple_token: String,
}

/// A member's name and client URLs, as it publishes them through raft.
#[derive(Clone, PartialEq, prost::Message)]
pub struct MemberAttributes {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(string, tag = "2")]
    pub name: String,
    #[prost(string, repeated, tag = "3")]
    pub client_urls: Vec<String>,
}

/// The tag of `Request::Txn` in a proposal.
const TXN_TAG: u32 = 4;

/// Checks the nesting of a txn inside encoded proposal bytes without decoding them.
fn check_nesting(mut buf: &[u8]) -> Result<(), Error> {
    let malformed = |why: &str| Error::InvalidArgument(format!("undecodable proposal: {why}"));
    while !buf.is_empty() {
        let (tag, wire) = decode_key(&mut buf).map_err(|e| malformed(&e.to_string()))?;
        match wire {
            WireType::Varint => {
                decode_varint(&mut buf).map_err(|e| malformed(&e.to_string()))?;
            }
            WireType::LengthDelimited => {
                let len = decode_varint(&mut buf).map_err(|e| malformed(&e.to_string()))?;
                let len = usize::try_from(len)
                    .ok()
                    .filter(|&l| l <= buf.len())
                    .ok_or_else(|| malformed("a field runs past the end"))?;
                let (field, rest) = buf.split_at(len);
                if tag == TXN_TAG {
                    match codec::txn_depth(field, Nested::TxnRequest, MAX_TXN_DEPTH) {
                        Ok(_) => {}
                        Err(DepthError::TooDeep) => {
                            return Err(Error::InvalidArgument(codec::too_deep_message()));
                        }
                        Err(DepthError::Malformed(why)) => return Err(malformed(why)),
                    }
                }
                buf = rest;
            }
            WireType::SixtyFourBit if buf.len() >= 8 => buf = &buf[8..],
            WireType::ThirtyTwoBit if buf.len() >= 4 => buf = &buf[4..],
            _ => return Err(malformed("unsupported wire type")),
        }
    }
    Ok(())
}

/// Decodes an entry's proposal, refusing (not recursing into) a txn nested too deep.
pub fn decode(data: &[u8]) -> Result<Proposal, Error> {
    check_nesting(data)?;
    Proposal::decode(data).map_err(|e| Error::InvalidArgument(format!("undecodable proposal: {e}")))
}

impl Proposal {
    /// The encoded proposal, checked as it will be applied: nesting within [`MAX_TXN_DEPTH`]
    /// and at most `max_bytes` (etcd's `--max-request-bytes`; 0: no limit).
    pub fn encode_checked(&self, max_bytes: usize) -> Result<Vec<u8>, Error> {
        let data = self.encode_to_vec();
        if max_bytes > 0 && data.len() > max_bytes {
            return Err(Error::RequestTooLarge);
        }
        check_nesting(&data)?;
        Ok(data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nested(depth: usize) -> pb::TxnRequest {
        let mut t = pb::TxnRequest {
            success: vec![pb::RequestOp {
                request: Some(pb::request_op::Request::RequestPut(pb::PutRequest {
                    key: b"k".to_vec(),
                    ..Default::default()
                })),
            }],
            ..Default::default()
        };
        for _ in 1..depth {
            t = pb::TxnRequest {
                success: vec![pb::RequestOp {
                    request: Some(pb::request_op::Request::RequestTxn(t)),
                }],
                ..Default::default()
            };
        }
        t
    }

    #[test]
    fn proposals_round_trip_and_deep_txns_are_refused_before_decoding() {
        let p = Proposal {
            id: 7,
            member: 9,
            request: Some(Request::Txn(nested(MAX_TXN_DEPTH))),
            auth: None,
        };
        let bytes = p.encode_checked(0).unwrap();
        assert_eq!(decode(&bytes).unwrap(), p);
        let deep = Proposal {
            id: 7,
            member: 9,
            request: Some(Request::Txn(nested(MAX_TXN_DEPTH + 1))),
            auth: None,
        };
        assert!(
            matches!(deep.encode_checked(0), Err(Error::InvalidArgument(m)) if m.contains("nested"))
        );
        assert!(matches!(
            decode(&deep.encode_to_vec()),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(p.encode_checked(10), Err(Error::RequestTooLarge)));
    }

    #[test]
    fn every_kind_of_request_round_trips() {
        // A variant missing from the oneof's tag list would decode as an empty proposal.
        let requests = vec![
            Request::Put(pb::PutRequest::default()),
            Request::DeleteRange(pb::DeleteRangeRequest::default()),
            Request::Txn(pb::TxnRequest::default()),
            Request::Compaction(pb::CompactionRequest::default()),
            Request::LeaseGrant(pb::LeaseGrantRequest::default()),
            Request::LeaseRevoke(pb::LeaseRevokeRequest::default()),
            Request::LeaseCheckpoint(pb::LeaseCheckpointRequest::default()),
            Request::MemberAttributes(MemberAttributes::default()),
            Request::MemberUpdate(pb::MemberUpdateRequest::default()),
            Request::Alarm(pb::AlarmRequest::default()),
            Request::Auth(AuthRequest {
                op: Some(AuthOp::RoleRevokePermission(Default::default())),
            }),
        ];
        for request in requests {
            let p = Proposal {
                id: 1,
                member: 2,
                request: Some(request),
                auth: Some(AuthStamp {
                    revision: 3,
                    enabled: true,
                    username: "u".into(),
                }),
            };
            assert_eq!(decode(&p.encode_checked(0).unwrap()).unwrap(), p);
        }
    }

    #[test]
    fn garbage_is_an_error() {
        for bytes in [&[0x22][..], &[0x22, 0x09, 1], &[0xff; 12], &[0x0b]] {
            assert!(decode(bytes).is_err(), "{bytes:?}");
        }
    }
}
