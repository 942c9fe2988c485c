//! `keelctl snapshot save FILE --endpoints URL`: a member's backend as an etcd snapshot, from
//! `Maintenance.Snapshot` (keel's or etcd's). As `etcdctl snapshot save`, it writes `FILE.part`
//! and renames it once complete and synced; unlike etcdctl, it also checks the sha256 trailer
//! against the bytes received before keeping the file.

use std::path::PathBuf;

use anyhow::{Context, bail};
use futures::StreamExt as _;
use keel_proto::etcdserverpb as pb;
use tokio::io::AsyncWriteExt as _;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where to write the snapshot.
    pub file: PathBuf,
    /// The member to take it from (one endpoint, as etcdctl).
    #[arg(long, default_value = "127.0.0.1:2379")]
    pub endpoints: String,
    /// CA file to verify the member's certificate (https).
    #[arg(long)]
    pub cacert: Option<PathBuf>,
    /// Client certificate file.
    #[arg(long)]
    pub cert: Option<PathBuf>,
    /// Client key file.
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// user:password, for a member with auth enabled.
    #[arg(long)]
    pub user: Option<String>,
}

async fn channel(args: &Args) -> anyhow::Result<tonic::transport::Channel> {
    if args.endpoints.contains(',') {
        bail!("snapshot must be requested to one selected node, not multiple");
    }
    let tls = args.cacert.is_some() || args.cert.is_some();
    let url = if args.endpoints.contains("://") {
        args.endpoints.clone()
    } else if tls {
        format!("https://{}", args.endpoints)
    } else {
        format!("http://{}", args.endpoints)
    };
    let mut endpoint = Endpoint::from_shared(url.clone())?;
    if url.starts_with("https://") {
        let mut config = ClientTlsConfig::new();
        if let Some(ca) = &args.cacert {
            config = config.ca_certificate(Certificate::from_pem(std::fs::read(ca)?));
        }
        if let (Some(c), Some(k)) = (&args.cert, &args.key) {
            config = config.identity(Identity::from_pem(std::fs::read(c)?, std::fs::read(k)?));
        }
        endpoint = endpoint.tls_config(config)?;
    }
    endpoint
        .connect()
        .await
        .with_context(|| format!("cannot connect to {url}"))
}

pub async fn run(args: &Args) -> anyhow::Result<()> {
    let channel = channel(args).await?;
    let mut token = None;
    if let Some(user) = &args.user {
        let (name, password) = user.split_once(':').unwrap_or((user.as_str(), ""));
        let r = pb::auth_client::AuthClient::new(channel.clone())
            .authenticate(pb::AuthenticateRequest {
                name: name.into(),
                password: password.into(),
            })
            .await
            .map_err(|s| anyhow::anyhow!("{}", s.message()))?;
        token = Some(r.into_inner().token);
    }
    let mut request = tonic::Request::new(pb::SnapshotRequest {});
    if let Some(t) = token {
        request.metadata_mut().insert("token", t.parse()?);
    }
    let mut stream = pb::maintenance_client::MaintenanceClient::new(channel)
        .max_decoding_message_size(64 << 20)
        .snapshot(request)
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner();
    let part = args.file.with_extension(match args.file.extension() {
        Some(e) => format!("{}.part", e.to_string_lossy()),
        None => "part".into(),
    });
    let result = async {
        // 0600 as etcdctl: the file holds every key and the users' password hashes.
        let mut out = tokio::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&part)
            .await
            .with_context(|| format!("cannot create {}", part.display()))?;
        let mut sha = ring::digest::Context::new(&ring::digest::SHA256);
        let mut last: Vec<u8> = Vec::new();
        let mut total = 0u64;
        while let Some(msg) = stream.next().await {
            let msg = msg.map_err(|s| anyhow::anyhow!("snapshot stream: {}", s.message()))?;
            // The previous blob was data: the last one is the sha256.
            if !last.is_empty() {
                sha.update(&last);
                out.write_all(&last).await?;
                total += last.len() as u64;
            }
            last = msg.blob;
        }
        let digest = sha.finish();
        if last.as_slice() != digest.as_ref() {
            bail!("the snapshot's sha256 does not match the {total} bytes received");
        }
        out.write_all(&last).await?;
        out.sync_all().await?;
        anyhow::Ok(total)
    }
    .await;
    match result {
        Ok(total) => {
            if let Err(e) = tokio::fs::rename(&part, &args.file).await {
                let _ = tokio::fs::remove_file(&part).await;
                return Err(e).with_context(|| format!("cannot rename to {}", args.file.display()));
            }
            if let Some(dir) = args.file.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::File::open(dir)?.sync_all()?;
            }
            println!("Snapshot saved at {} ({total} bytes)", args.file.display());
            Ok(())
        }
        Err(e) => {
            let _ = tokio::fs::remove_file(&part).await;
            Err(e)
        }
    }
}
