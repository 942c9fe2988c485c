//! Starting a member: ids, the storage core, the client listeners (gRPC and the HTTP endpoints
//! etcd serves on the same port), and an orderly stop on SIGINT/SIGTERM.

use std::net::SocketAddr;

use anyhow::{Context, bail};
use axum::routing::get;
use keel_proto::etcdserverpb::kv_server::KvServer;
use keel_proto::etcdserverpb::lease_server::LeaseServer;
use keel_proto::etcdserverpb::watch_server::WatchServer;

use crate::config::{Config, Url};
use crate::core::{Core, CoreConfig, stable_id};
use crate::kv::KvService;
use crate::lease::LeaseService;
use crate::metrics::{ETCD_VERSION, Metrics};
use crate::watch::WatchService;

/// etcd answers `/version` with the server and cluster versions; Keel reports the etcd API level
/// it implements.
fn version_json() -> String {
    format!(r#"{{"etcdserver":"{ETCD_VERSION}","etcdcluster":"3.4.0"}}"#)
}

async fn resolve(url: &Url) -> anyhow::Result<SocketAddr> {
    let host = url.host.trim_start_matches('[').trim_end_matches(']');
    let mut addrs = tokio::net::lookup_host((host, url.port))
        .await
        .with_context(|| format!("resolving {url}"))?
        .collect::<Vec<_>>();
    // Like Go's resolver for "localhost", prefer IPv4.
    addrs.sort_by_key(|a| !a.is_ipv4());
    addrs
        .first()
        .copied()
        .with_context(|| format!("{url} resolves to no address"))
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing the SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Runs a member until it is stopped.
pub fn run(config: Config) -> anyhow::Result<()> {
    let level = match config.log_level.as_str() {
        "debug" => tracing::Level::DEBUG,
        "info" => tracing::Level::INFO,
        "warn" => tracing::Level::WARN,
        _ => tracing::Level::ERROR,
    };
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .init();
    if let Some(url) = config.listen_client_urls.iter().find(|u| u.tls) {
        bail!("TLS client URLs are not supported yet: {url}");
    }
    let peers: Vec<String> = config
        .initial_advertise_peer_urls
        .iter()
        .map(ToString::to_string)
        .collect();
    let mut cluster_parts: Vec<String> = config
        .initial_cluster
        .iter()
        .flat_map(|(name, urls)| urls.iter().map(move |u| format!("{name}={u}")))
        .collect();
    cluster_parts.sort();
    let mut parts: Vec<&str> = vec![&config.initial_cluster_token];
    parts.extend(cluster_parts.iter().map(String::as_str));
    let cluster_id = stable_id(&parts);
    let mut member_parts: Vec<&str> = vec![&config.initial_cluster_token];
    member_parts.extend(peers.iter().map(String::as_str));
    let member_id = stable_id(&member_parts);
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating the data directory {}", config.data_dir.display()))?;
    let election_ticks = (config.election_timeout.as_millis()
        / config.heartbeat_interval.as_millis().max(1)) as usize;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let net_threads = config.net_threads.unwrap_or(cpus);
    // One watch hub per network thread.
    let (events_tx, events_rx): (Vec<_>, Vec<_>) = (0..net_threads)
        .map(|_| tokio::sync::mpsc::unbounded_channel())
        .unzip();
    let (core, core_thread) = Core::start(CoreConfig {
        data_dir: config.data_dir.clone(),
        cluster_id,
        member_id,
        heartbeat: config.heartbeat_interval,
        election_ticks,
        cpu: config.storage_core,
        max_request_bytes: config.max_request_bytes as usize,
        snapshot_count: config.snapshot_count,
        metrics: Metrics::new(config.quota_backend_bytes),
        lease_checkpoint_interval: config.lease_checkpoint_interval,
        watch_events: events_tx,
    })
    .context("starting the storage core")?;
    tracing::info!(
        name = %config.name,
        data_dir = %config.data_dir.display(),
        member_id = format!("{member_id:x}"),
        cluster_id = format!("{cluster_id:x}"),
        "member ready"
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(net_threads)
        .thread_name("keel-net")
        .enable_all()
        .build()
        .context("starting the network runtime")?;
    let result = runtime.block_on(async {
        let limit = config.max_request_bytes as usize + 512 * 1024;
        let kv = KvServer::new(KvService::new(
            core.clone(),
            config.max_txn_ops as usize,
            config.quota_backend_bytes,
        ))
        .max_decoding_message_size(limit);
        let lease = LeaseServer::new(LeaseService::new(core.clone()));
        let watch = WatchServer::new(WatchService::start(
            core.clone(),
            events_rx,
            limit,
            config.watch_progress_notify_interval,
        ));
        let router = tonic::service::Routes::new(kv)
            .add_service(lease)
            .add_service(watch)
            .into_axum_router()
            .route("/health", get(|| async { r#"{"health":"true"}"# }))
            .route("/version", get(|| async { version_json() }))
            .route(
                "/metrics",
                get({
                    let core = core.clone();
                    move || async move {
                        (
                            [(
                                axum::http::header::CONTENT_TYPE,
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            )],
                            core.metrics().render(core.store(), core.lessor().len()),
                        )
                    }
                }),
            );
        let routes = tonic::service::Routes::from(router);
        let compactor = tokio::spawn(crate::compactor::run(core.clone(), config.auto_compaction));
        let (stop_tx, _) = tokio::sync::broadcast::channel::<()>(1);
        let mut servers = Vec::new();
        for url in &config.listen_client_urls {
            let addr = resolve(url).await?;
            let mut stop = stop_tx.subscribe();
            let server = tonic::transport::Server::builder()
                .accept_http1(true)
                .add_routes(routes.clone())
                .serve_with_shutdown(addr, async move {
                    let _ = stop.recv().await;
                });
            tracing::info!(%url, %addr, "serving client requests");
            servers.push(tokio::spawn(server));
        }
        shutdown_signal().await;
        tracing::info!("stopping");
        let _ = stop_tx.send(());
        compactor.abort();
        for s in servers {
            s.await
                .context("client server task")?
                .context("client server")?;
        }
        anyhow::Ok(())
    });
    drop(runtime);
    drop(core);
    match core_thread.join() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e).context("storage core"),
        Err(_) => bail!("the storage core panicked"),
    }
    result
}
