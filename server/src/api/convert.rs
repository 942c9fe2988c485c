//! Conversions between etcd's protobuf types (`keel_proto::etcdserverpb`) and the engine's request
//! types (`keel_engine::mvcc::apply`), and the one place engine errors become gRPC statuses with
//! etcd's codes and messages.

use keel_engine::Error;
use keel_engine::mvcc::{KeyValue, apply as a};
use keel_proto::etcdserverpb as pb;
use keel_proto::mvccpb;
use tonic::{Code, Status};

/// The largest range response sent, in bytes of keys and values: etcd's gRPC send limit
/// (`math.MaxInt32`). A larger range fails with `ResourceExhausted` before it is built whole.
pub const MAX_RANGE_RESPONSE_BYTES: usize = i32::MAX as usize;

/// etcd's message for an unknown sort order or target.
pub const INVALID_SORT_OPTION: &str = "etcdserver: invalid sort option";

/// The gRPC status of an auth error: etcd's code and message (`rpctypes`).
pub fn auth_status(e: keel_engine::error::AuthError) -> Status {
    use keel_engine::error::AuthError as A;
    let code = match e {
        A::RootUserNotExist
        | A::RootRoleNotExist
        | A::UserAlreadyExist
        | A::UserNotFound
        | A::RoleAlreadyExist
        | A::RoleNotFound
        | A::RoleNotGranted
        | A::PermissionNotGranted
        | A::AuthNotEnabled => Code::FailedPrecondition,
        A::UserEmpty | A::RoleEmpty | A::AuthFailed | A::InvalidAuthMgmt | A::AuthOldRevision => {
            Code::InvalidArgument
        }
        A::PermissionDenied => Code::PermissionDenied,
        A::InvalidAuthToken => Code::Unauthenticated,
        A::NoPasswordUser => Code::Unknown,
        A::TooManyAttempts => Code::ResourceExhausted,
    };
    Status::new(code, e.to_string())
}

/// tonic's status for a request message over the decoding limit, as grpc-go (etcd's server)
/// answers it: `ResourceExhausted`, "grpc: received message larger than max (N vs. LIMIT)".
/// tonic says `OutOfRange`, "Error, decoded message length too large: found N bytes, the limit
/// is: LIMIT bytes". Any other status is returned as it is.
pub fn grpc_go_status(status: Status) -> Status {
    if status.code() != Code::OutOfRange {
        return status;
    }
    let sizes = status
        .message()
        .strip_prefix("Error, decoded message length too large: found ")
        .and_then(|rest| rest.strip_suffix(" bytes"))
        .and_then(|rest| rest.split_once(" bytes, the limit is: "));
    match sizes {
        Some((found, limit)) => Status::resource_exhausted(format!(
            "grpc: received message larger than max ({found} vs. {limit})"
        )),
        None => status,
    }
}

/// An engine error as etcd's gRPC status.
pub fn status(e: &Error) -> Status {
    match e {
        Error::Compacted | Error::FutureRev => {
            Status::new(Code::OutOfRange, format!("etcdserver: {e}"))
        }
        Error::KeyNotFound
        | Error::EmptyKey
        | Error::ValueProvided
        | Error::LeaseProvided
        | Error::DuplicateKey
        | Error::TooManyOps
        | Error::RequestTooLarge => Status::new(Code::InvalidArgument, e.to_string()),
        Error::NoSpace | Error::TooManyRequests | Error::ResponseTooLarge { .. } => {
            Status::new(Code::ResourceExhausted, e.to_string())
        }
        Error::NoLeader
        | Error::Stopped
        | Error::Timeout
        | Error::TimeoutDueToLeaderFail
        | Error::TimeoutDueToConnectionLost
        | Error::LeaderChanged => Status::new(Code::Unavailable, e.to_string()),
        Error::LeaseNotFound | Error::MemberNotFound => Status::new(Code::NotFound, e.to_string()),
        Error::MemberExists
        | Error::MemberRemoved
        | Error::PeerUrlExists
        | Error::NotEnoughStartedMembers
        | Error::MemberNotLearner
        | Error::LearnerNotReady
        | Error::TooManyLearners
        | Error::NotLeader
        | Error::BadLeaderTransferee => Status::new(Code::FailedPrecondition, e.to_string()),
        Error::Unhealthy => Status::new(Code::Unavailable, e.to_string()),
        // Not in etcd's error map: gRPC's Unknown, with the message.
        Error::LeaderTransferTimeout | Error::NoLeaderDeadline => {
            Status::new(Code::Unknown, e.to_string())
        }
        Error::Corrupt => Status::new(Code::DataLoss, e.to_string()),
        Error::MemberBadUrls => Status::new(Code::InvalidArgument, e.to_string()),
        Error::NotSupportedForLearner => Status::new(Code::Unavailable, e.to_string()),
        Error::LeaseExists => Status::new(Code::FailedPrecondition, e.to_string()),
        Error::LeaseTtlTooLarge => Status::new(Code::OutOfRange, e.to_string()),
        Error::InvalidArgument(m) => Status::new(Code::InvalidArgument, m.clone()),
        Error::Auth(a) => auth_status(*a),
        other => Status::new(Code::Unavailable, format!("etcdserver: {other}")),
    }
}

pub fn kv(k: KeyValue) -> mvccpb::KeyValue {
    mvccpb::KeyValue {
        key: k.key.into(),
        create_revision: k.create_revision,
        mod_revision: k.mod_revision,
        version: k.version,
        value: k.value.into(),
        lease: k.lease,
    }
}

pub fn range_request(r: pb::RangeRequest) -> Result<a::RangeRequest, Status> {
    let sort_order = match r.sort_order {
        0 => a::SortOrder::None,
        1 => a::SortOrder::Ascend,
        2 => a::SortOrder::Descend,
        _ => return Err(Status::invalid_argument(INVALID_SORT_OPTION)),
    };
    let sort_target = match r.sort_target {
        0 => a::SortTarget::Key,
        1 => a::SortTarget::Version,
        2 => a::SortTarget::Create,
        3 => a::SortTarget::Mod,
        4 => a::SortTarget::Value,
        _ => return Err(Status::invalid_argument(INVALID_SORT_OPTION)),
    };
    Ok(a::RangeRequest {
        key: r.key,
        range_end: r.range_end,
        limit: r.limit,
        revision: r.revision,
        sort_order,
        sort_target,
        serializable: r.serializable,
        keys_only: r.keys_only,
        count_only: r.count_only,
        min_mod_revision: r.min_mod_revision,
        max_mod_revision: r.max_mod_revision,
        min_create_revision: r.min_create_revision,
        max_create_revision: r.max_create_revision,
        max_bytes: MAX_RANGE_RESPONSE_BYTES,
    })
}

pub fn put_request(r: pb::PutRequest) -> a::PutRequest {
    a::PutRequest {
        key: r.key,
        value: r.value,
        lease: r.lease,
        prev_kv: r.prev_kv,
        ignore_value: r.ignore_value,
        ignore_lease: r.ignore_lease,
    }
}

/// etcd's checks of a put (`a::check_put`'s), on the request as received: no copy of its key
/// and value on the hot path.
pub fn check_put(r: &pb::PutRequest) -> Result<(), Error> {
    if r.key.is_empty() {
        return Err(Error::EmptyKey);
    }
    if r.ignore_value && !r.value.is_empty() {
        return Err(Error::ValueProvided);
    }
    if r.ignore_lease && r.lease != 0 {
        return Err(Error::LeaseProvided);
    }
    Ok(())
}

pub fn delete_request(r: pb::DeleteRangeRequest) -> a::DeleteRangeRequest {
    a::DeleteRangeRequest {
        key: r.key,
        range_end: r.range_end,
        prev_kv: r.prev_kv,
    }
}

fn compare(c: pb::Compare) -> Result<a::Compare, Status> {
    use pb::compare::TargetUnion as U;
    let result = match c.result {
        0 => a::CompareResult::Equal,
        1 => a::CompareResult::Greater,
        2 => a::CompareResult::Less,
        3 => a::CompareResult::NotEqual,
        _ => {
            return Err(Status::invalid_argument(
                "etcdserver: invalid compare result",
            ));
        }
    };
    let target = match c.target {
        0 => a::CompareTarget::Version,
        1 => a::CompareTarget::Create,
        2 => a::CompareTarget::Mod,
        3 => a::CompareTarget::Value,
        4 => a::CompareTarget::Lease,
        _ => {
            return Err(Status::invalid_argument(
                "etcdserver: invalid compare target",
            ));
        }
    };
    let target_union = c.target_union.map(|u| match u {
        U::Version(v) => a::TargetUnion::Version(v),
        U::CreateRevision(v) => a::TargetUnion::CreateRevision(v),
        U::ModRevision(v) => a::TargetUnion::ModRevision(v),
        U::Value(v) => a::TargetUnion::Value(v),
        U::Lease(v) => a::TargetUnion::Lease(v),
    });
    Ok(a::Compare {
        result,
        target,
        key: c.key,
        target_union,
        range_end: c.range_end,
    })
}

fn request_op(op: pb::RequestOp) -> Result<a::RequestOp, Status> {
    use pb::request_op::Request as R;
    Ok(match op.request {
        Some(R::RequestRange(r)) => a::RequestOp::Range(range_request(r)?),
        Some(R::RequestPut(r)) => a::RequestOp::Put(put_request(r)),
        Some(R::RequestDeleteRange(r)) => a::RequestOp::DeleteRange(delete_request(r)),
        Some(R::RequestTxn(t)) => a::RequestOp::Txn(txn_request(t)?),
        None => a::RequestOp::Empty,
    })
}

pub fn txn_request(t: pb::TxnRequest) -> Result<a::TxnRequest, Status> {
    Ok(a::TxnRequest {
        compare: t
            .compare
            .into_iter()
            .map(compare)
            .collect::<Result<_, _>>()?,
        success: t
            .success
            .into_iter()
            .map(request_op)
            .collect::<Result<_, _>>()?,
        failure: t
            .failure
            .into_iter()
            .map(request_op)
            .collect::<Result<_, _>>()?,
    })
}

/// The response header: cluster, member, revision and term.
#[derive(Debug, Clone, Copy, Default)]
pub struct Header {
    pub cluster_id: u64,
    pub member_id: u64,
    pub raft_term: u64,
}

impl Header {
    pub fn with(&self, revision: i64) -> Option<pb::ResponseHeader> {
        Some(pb::ResponseHeader {
            cluster_id: self.cluster_id,
            member_id: self.member_id,
            revision,
            raft_term: self.raft_term,
        })
    }
}

/// Nested responses carry an empty header, as in etcd; ops keep their own revision.
fn nested_header(revision: i64) -> Option<pb::ResponseHeader> {
    Some(pb::ResponseHeader {
        revision,
        ..Default::default()
    })
}

pub fn range_response(
    r: a::RangeResponse,
    header: Option<pb::ResponseHeader>,
) -> pb::RangeResponse {
    pb::RangeResponse {
        header,
        kvs: r.kvs.into_iter().map(kv).collect(),
        more: r.more,
        count: r.count,
    }
}

pub fn put_response(r: a::PutResponse, header: Option<pb::ResponseHeader>) -> pb::PutResponse {
    pb::PutResponse {
        header,
        prev_kv: r.prev_kv.map(kv),
    }
}

pub fn delete_response(
    r: a::DeleteRangeResponse,
    header: Option<pb::ResponseHeader>,
) -> pb::DeleteRangeResponse {
    pb::DeleteRangeResponse {
        header,
        deleted: r.deleted,
        prev_kvs: r.prev_kvs.into_iter().map(kv).collect(),
    }
}

pub fn txn_response(t: a::TxnResponse, header: Option<pb::ResponseHeader>) -> pb::TxnResponse {
    use pb::response_op::Response as R;
    let responses = t
        .responses
        .into_iter()
        .map(|op| pb::ResponseOp {
            response: Some(match op {
                a::ResponseOp::Range(r) => {
                    let h = nested_header(r.revision);
                    R::ResponseRange(range_response(r, h))
                }
                a::ResponseOp::Put(r) => {
                    let h = nested_header(r.revision);
                    R::ResponsePut(put_response(r, h))
                }
                a::ResponseOp::DeleteRange(r) => {
                    let h = nested_header(r.revision);
                    R::ResponseDeleteRange(delete_response(r, h))
                }
                a::ResponseOp::Txn(t) => {
                    let h = nested_header(t.revision);
                    R::ResponseTxn(txn_response(t, h))
                }
            }),
        })
        .collect();
    pb::TxnResponse {
        header,
        succeeded: t.succeeded,
        responses,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_over_the_limit_gets_grpc_gos_status() {
        let tonic = Status::out_of_range(
            "Error, decoded message length too large: found 614413 bytes, the limit is: 525312 bytes",
        );
        let s = grpc_go_status(tonic);
        assert_eq!(s.code(), Code::ResourceExhausted);
        assert_eq!(
            s.message(),
            "grpc: received message larger than max (614413 vs. 525312)"
        );
        // Anything else is left alone, etcd's own OutOfRange statuses included.
        let lease = status(&Error::LeaseTtlTooLarge);
        let same = grpc_go_status(lease.clone());
        assert_eq!(
            (same.code(), same.message()),
            (lease.code(), lease.message())
        );
    }

    #[test]
    fn errors_map_to_etcds_codes_and_messages() {
        let s = status(&Error::Compacted);
        assert_eq!(s.code(), Code::OutOfRange);
        assert_eq!(
            s.message(),
            "etcdserver: mvcc: required revision has been compacted"
        );
        let s = status(&Error::FutureRev);
        assert_eq!(
            s.message(),
            "etcdserver: mvcc: required revision is a future revision"
        );
        let s = status(&Error::EmptyKey);
        assert_eq!(
            (s.code(), s.message()),
            (Code::InvalidArgument, "etcdserver: key is not provided")
        );
        let s = status(&Error::DuplicateKey);
        assert_eq!(
            s.message(),
            "etcdserver: duplicate key given in txn request"
        );
    }

    #[test]
    fn stopped_or_overloaded_cores_tell_clients_to_go_elsewhere() {
        for e in [
            Error::Stopped,
            Error::NoLeader,
            Error::Timeout,
            Error::TimeoutDueToLeaderFail,
            Error::LeaderChanged,
        ] {
            assert_eq!(status(&e).code(), Code::Unavailable, "{e}");
        }
        let s = status(&Error::TooManyRequests);
        assert_eq!(
            (s.code(), s.message()),
            (Code::ResourceExhausted, "etcdserver: too many requests")
        );
        assert_eq!(
            status(&Error::Stopped).message(),
            "etcdserver: server stopped"
        );
        // etcd 3.4's answer to a put that found no leader within its request timeout.
        let s = status(&Error::NoLeaderDeadline);
        assert_eq!(
            (s.code(), s.message()),
            (Code::Unknown, "context deadline exceeded")
        );
    }

    #[test]
    fn put_checks_agree_with_the_engines() {
        for (key, value, lease, ignore_value, ignore_lease) in [
            ("", "v", 0, false, false),
            ("k", "v", 0, true, false),
            ("k", "", 0, true, false),
            ("k", "v", 5, false, true),
            ("k", "v", 5, false, false),
        ] {
            let r = pb::PutRequest {
                key: key.into(),
                value: value.into(),
                lease,
                ignore_value,
                ignore_lease,
                prev_kv: false,
            };
            let here = check_put(&r).map_err(|e| e.to_string());
            let engine = a::check_put(&put_request(r)).map_err(|e| e.to_string());
            assert_eq!(here, engine);
        }
    }

    #[test]
    fn invalid_sort_options_are_refused() {
        let r = pb::RangeRequest {
            key: b"k".to_vec(),
            sort_order: 9,
            ..Default::default()
        };
        assert_eq!(range_request(r).unwrap_err().message(), INVALID_SORT_OPTION);
        let r = pb::RangeRequest {
            key: b"k".to_vec(),
            sort_target: 5,
            ..Default::default()
        };
        assert_eq!(range_request(r).unwrap_err().message(), INVALID_SORT_OPTION);
    }
}
