//! Compiles etcd's vendored v3 protos with protox (a Rust .proto compiler), so building Keel needs
//! no system `protoc`. Generates prost messages and tonic clients and servers; no default stubs:
//! every service Keel serves is implemented for real.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "keel/peer.proto",
        "etcd/api/etcdserverpb/rpc.proto",
        "etcd/server/etcdserver/api/v3lock/v3lockpb/v3lock.proto",
        "etcd/server/etcdserver/api/v3election/v3electionpb/v3election.proto",
        // gRPC's standard health service, which etcd registers on its client URLs.
        "grpc/health/v1/health.proto",
    ];
    let mut compiler = protox::Compiler::new(["proto"])?;
    compiler.include_imports(true);
    compiler.open_files(files)?;
    let descriptors = compiler.file_descriptor_set();
    // The descriptors with their options (the `google.api.http` annotations among them), for
    // the server's JSON gateway: the paths it serves and the JSON mapping of every message.
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("descriptors.bin"),
        compiler.encode_file_descriptor_set(),
    )?;
    tonic_prost_build::configure()
        // Keys and values of `mvccpb.KeyValue` as `bytes::Bytes`: a watch event delivered to
        // many watchers shares one copy of them instead of one per watcher.
        .bytes(".mvccpb.KeyValue")
        // Raft messages and snapshot data pass through without a copy.
        .bytes(".keelpeer")
        // prost's codec plus a nesting check of txns before they are decoded.
        .codec_path("crate::codec::KeelCodec")
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
