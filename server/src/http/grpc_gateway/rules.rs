//! The gateway's paths, read from the `google.api.http` annotations of etcd's protos (as
//! grpc-gateway generates its handlers from them): `post: "/v3/kv/range"`, `body: "*"`, and
//! their `additional_bindings` (`/v3/kv/lease/revoke` beside `/v3/lease/revoke`).

use std::collections::HashMap;
use std::sync::Arc;

use prost_reflect::{
    DescriptorPool, DynamicMessage, MessageDescriptor, ReflectMessage as _, Value,
};

/// One RPC the gateway serves.
#[derive(Debug)]
pub struct Rpc {
    /// The gRPC path: `/etcdserverpb.KV/Range`.
    pub grpc_path: String,
    pub input: MessageDescriptor,
    pub output: MessageDescriptor,
    /// The request body is a stream of messages (Watch, LeaseKeepAlive).
    pub client_streaming: bool,
    /// The response is a stream of `{"result": …}` objects (Watch, LeaseKeepAlive, Snapshot,
    /// Observe).
    pub server_streaming: bool,
}

/// Methods whose annotations the vendored protos (etcd 3.5's) carry but that etcd 3.4 does not
/// serve: Keel answers them over gRPC as 3.4 does ("unknown method") and gives them no path, so
/// the gateway answers 404 for them as 3.4's.
const NOT_SERVED: &[&str] = &["etcdserverpb.Maintenance.Downgrade"];

/// The HTTP method every etcd path is bound to.
const POST: &str = "post";

#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    #[error("the protos' descriptors do not decode: {0}")]
    Descriptors(#[from] prost_reflect::DescriptorError),
    #[error("the google.api.http extension is missing from the descriptors")]
    NoHttpExtension,
    #[error("{method}: the gateway serves only POST with body \"*\" (etcd's only form)")]
    Unsupported { method: String },
    #[error("{path} is bound to two methods")]
    Duplicate { path: String },
}

/// Every path under `/v3/` and the RPC it calls.
pub fn load() -> Result<HashMap<String, Arc<Rpc>>, RulesError> {
    let pool = DescriptorPool::decode(keel_proto::FILE_DESCRIPTOR_SET)?;
    let http = pool
        .get_extension_by_name("google.api.http")
        .ok_or(RulesError::NoHttpExtension)?;
    let mut rules = HashMap::new();
    for service in pool.services() {
        for method in service.methods() {
            if NOT_SERVED.contains(&method.full_name()) {
                continue;
            }
            let options = method.options();
            if !options.has_extension(&http) {
                continue;
            }
            let rpc = Arc::new(Rpc {
                grpc_path: format!("/{}/{}", service.full_name(), method.name()),
                input: method.input(),
                output: method.output(),
                client_streaming: method.is_client_streaming(),
                server_streaming: method.is_server_streaming(),
            });
            let unsupported = || RulesError::Unsupported {
                method: method.full_name().to_string(),
            };
            let Value::Message(rule) = options.get_extension(&http).into_owned() else {
                return Err(unsupported());
            };
            let mut bindings = vec![rule.clone()];
            if let Some(Value::List(more)) = rule
                .get_field_by_name("additional_bindings")
                .map(|v| v.into_owned())
            {
                bindings.extend(more.into_iter().filter_map(|v| match v {
                    Value::Message(m) => Some(m),
                    _ => None,
                }));
            }
            for binding in bindings {
                let path = post_path(&binding).ok_or_else(unsupported)?;
                if rules.insert(path.clone(), rpc.clone()).is_some() {
                    return Err(RulesError::Duplicate { path });
                }
            }
        }
    }
    Ok(rules)
}

/// The path of a `HttpRule` if it is `post: PATH` with `body: "*"`.
fn post_path(rule: &DynamicMessage) -> Option<String> {
    let string = |name: &str| match rule.get_field_by_name(name)?.into_owned() {
        Value::String(s) => Some(s),
        _ => None,
    };
    // `pattern` is a oneof: only the field that is set counts.
    let post = rule.get_field_by_name(POST).filter(|_| {
        rule.descriptor()
            .get_field_by_name(POST)
            .is_some_and(|f| rule.has_field(&f))
    })?;
    let Value::String(path) = post.into_owned() else {
        return None;
    };
    (string("body").as_deref() == Some("*")).then_some(path)
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_path_of_etcd_3_4_is_served() {
        let rules = super::load().unwrap();
        // etcd 3.4.23's rpc.proto, v3lock.proto and v3election.proto, path by path (its
        // duplicate `/v3/maintenance/hash` for HashKV is unreachable there: Hash is registered
        // first; the vendored protos bind HashKV to `/v3/maintenance/hashkv`, as etcd 3.5).
        let etcd_3_4 = [
            ("/v3/kv/range", "/etcdserverpb.KV/Range"),
            ("/v3/kv/put", "/etcdserverpb.KV/Put"),
            ("/v3/kv/deleterange", "/etcdserverpb.KV/DeleteRange"),
            ("/v3/kv/txn", "/etcdserverpb.KV/Txn"),
            ("/v3/kv/compaction", "/etcdserverpb.KV/Compact"),
            ("/v3/watch", "/etcdserverpb.Watch/Watch"),
            ("/v3/lease/grant", "/etcdserverpb.Lease/LeaseGrant"),
            ("/v3/lease/revoke", "/etcdserverpb.Lease/LeaseRevoke"),
            ("/v3/kv/lease/revoke", "/etcdserverpb.Lease/LeaseRevoke"),
            ("/v3/lease/keepalive", "/etcdserverpb.Lease/LeaseKeepAlive"),
            (
                "/v3/lease/timetolive",
                "/etcdserverpb.Lease/LeaseTimeToLive",
            ),
            (
                "/v3/kv/lease/timetolive",
                "/etcdserverpb.Lease/LeaseTimeToLive",
            ),
            ("/v3/lease/leases", "/etcdserverpb.Lease/LeaseLeases"),
            ("/v3/kv/lease/leases", "/etcdserverpb.Lease/LeaseLeases"),
            ("/v3/cluster/member/add", "/etcdserverpb.Cluster/MemberAdd"),
            (
                "/v3/cluster/member/remove",
                "/etcdserverpb.Cluster/MemberRemove",
            ),
            (
                "/v3/cluster/member/update",
                "/etcdserverpb.Cluster/MemberUpdate",
            ),
            (
                "/v3/cluster/member/list",
                "/etcdserverpb.Cluster/MemberList",
            ),
            (
                "/v3/cluster/member/promote",
                "/etcdserverpb.Cluster/MemberPromote",
            ),
            ("/v3/maintenance/alarm", "/etcdserverpb.Maintenance/Alarm"),
            ("/v3/maintenance/status", "/etcdserverpb.Maintenance/Status"),
            (
                "/v3/maintenance/defragment",
                "/etcdserverpb.Maintenance/Defragment",
            ),
            ("/v3/maintenance/hash", "/etcdserverpb.Maintenance/Hash"),
            (
                "/v3/maintenance/snapshot",
                "/etcdserverpb.Maintenance/Snapshot",
            ),
            (
                "/v3/maintenance/transfer-leadership",
                "/etcdserverpb.Maintenance/MoveLeader",
            ),
            ("/v3/auth/enable", "/etcdserverpb.Auth/AuthEnable"),
            ("/v3/auth/disable", "/etcdserverpb.Auth/AuthDisable"),
            ("/v3/auth/authenticate", "/etcdserverpb.Auth/Authenticate"),
            ("/v3/auth/user/add", "/etcdserverpb.Auth/UserAdd"),
            ("/v3/auth/user/get", "/etcdserverpb.Auth/UserGet"),
            ("/v3/auth/user/list", "/etcdserverpb.Auth/UserList"),
            ("/v3/auth/user/delete", "/etcdserverpb.Auth/UserDelete"),
            (
                "/v3/auth/user/changepw",
                "/etcdserverpb.Auth/UserChangePassword",
            ),
            ("/v3/auth/user/grant", "/etcdserverpb.Auth/UserGrantRole"),
            ("/v3/auth/user/revoke", "/etcdserverpb.Auth/UserRevokeRole"),
            ("/v3/auth/role/add", "/etcdserverpb.Auth/RoleAdd"),
            ("/v3/auth/role/get", "/etcdserverpb.Auth/RoleGet"),
            ("/v3/auth/role/list", "/etcdserverpb.Auth/RoleList"),
            ("/v3/auth/role/delete", "/etcdserverpb.Auth/RoleDelete"),
            (
                "/v3/auth/role/grant",
                "/etcdserverpb.Auth/RoleGrantPermission",
            ),
            (
                "/v3/auth/role/revoke",
                "/etcdserverpb.Auth/RoleRevokePermission",
            ),
            ("/v3/lock/lock", "/v3lockpb.Lock/Lock"),
            ("/v3/lock/unlock", "/v3lockpb.Lock/Unlock"),
            ("/v3/election/campaign", "/v3electionpb.Election/Campaign"),
            ("/v3/election/proclaim", "/v3electionpb.Election/Proclaim"),
            ("/v3/election/leader", "/v3electionpb.Election/Leader"),
            ("/v3/election/observe", "/v3electionpb.Election/Observe"),
            ("/v3/election/resign", "/v3electionpb.Election/Resign"),
        ];
        for (path, grpc) in etcd_3_4 {
            let rpc = rules
                .get(path)
                .unwrap_or_else(|| panic!("{path} is not served"));
            assert_eq!(rpc.grpc_path, grpc, "{path}");
        }
        // Beyond 3.4: AuthStatus and HashKV (etcd 3.5's paths); Downgrade is not served.
        assert_eq!(rules.len(), etcd_3_4.len() + 2);
        assert!(rules.contains_key("/v3/auth/status"));
        assert!(rules.contains_key("/v3/maintenance/hashkv"));
        assert!(!rules.contains_key("/v3/maintenance/downgrade"));
        let watch = &rules["/v3/watch"];
        assert!(watch.client_streaming && watch.server_streaming);
        let snapshot = &rules["/v3/maintenance/snapshot"];
        assert!(!snapshot.client_streaming && snapshot.server_streaming);
    }
}
