//! etcd's v3 gRPC API, generated from etcd's own `.proto` files (vendored under `proto/`, Apache-2.0,
//! see `NOTICE`): the messages (prost) and the services (tonic clients and servers) of
//! `etcdserverpb` (KV, Watch, Lease, Cluster, Maintenance, Auth), `mvccpb`, `authpb`, `v3lockpb`
//! and `v3electionpb`, and gRPC's `grpc.health.v1`. (`versionpb` and the HTTP-gateway
//! annotations only declare options; no code is generated from them.)
//!
//! The generated code is not edited and carries no documentation of its own, hence the allows.

#![allow(missing_docs, clippy::all, clippy::pedantic)]

pub mod codec;

/// The encoded `FileDescriptorSet` of every message and service above, with their imports and
/// options (the `google.api.http` annotations that give the JSON gateway's paths).
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptors.bin"));

/// `mvccpb`: KeyValue and Event.
pub mod mvccpb {
    tonic::include_proto!("mvccpb");
}

/// `authpb`: users, roles, permissions.
pub mod authpb {
    tonic::include_proto!("authpb");
}

/// `etcdserverpb`: the v3 API.
pub mod etcdserverpb {
    tonic::include_proto!("etcdserverpb");
}

/// `v3lockpb`: the Lock service.
pub mod v3lockpb {
    tonic::include_proto!("v3lockpb");
}

/// `grpc.health.v1`: gRPC's standard health service (etcd serves it on its client URLs).
pub mod health {
    tonic::include_proto!("grpc.health.v1");
}

/// `keelpeer`: Keel's member-to-member protocol (raft messages, snapshots, probes, forwarded
/// lease requests), served on the peer URLs.
pub mod keelpeer {
    tonic::include_proto!("keelpeer");
}

/// `v3electionpb`: the Election service.
pub mod v3electionpb {
    tonic::include_proto!("v3electionpb");
}

#[cfg(test)]
mod tests {
    use prost::Message as _;

    #[test]
    fn keyvalue_bytes_match_the_engines_and_etcds() {
        let kv = super::mvccpb::KeyValue {
            key: b"foo".to_vec().into(),
            create_revision: 2,
            mod_revision: 2,
            version: 1,
            value: b"bar".to_vec().into(),
            lease: 0,
        };
        let engine = keel_engine::mvcc::KeyValue {
            key: b"foo".to_vec(),
            create_revision: 2,
            mod_revision: 2,
            version: 1,
            value: b"bar".to_vec(),
            lease: 0,
        };
        // What etcd's gogo marshaller writes for the same KeyValue.
        let etcd = [
            0x0a, 3, b'f', b'o', b'o', 0x10, 2, 0x18, 2, 0x20, 1, 0x2a, 3, b'b', b'a', b'r',
        ];
        assert_eq!(kv.encode_to_vec(), etcd);
        assert_eq!(engine.encode_to_vec(), etcd);
    }

    #[test]
    fn services_are_generated() {
        // The server traits exist for every service (compile-time check through the paths).
        fn _kv<T: super::etcdserverpb::kv_server::Kv>() {}
        fn _watch<T: super::etcdserverpb::watch_server::Watch>() {}
        fn _lease<T: super::etcdserverpb::lease_server::Lease>() {}
        fn _lock<T: super::v3lockpb::lock_server::Lock>() {}
        fn _election<T: super::v3electionpb::election_server::Election>() {}
        let req = super::etcdserverpb::RangeRequest {
            key: b"k".to_vec(),
            ..Default::default()
        };
        let bytes = req.encode_to_vec();
        assert_eq!(
            super::etcdserverpb::RangeRequest::decode(bytes.as_slice()).unwrap(),
            req
        );
    }
}
