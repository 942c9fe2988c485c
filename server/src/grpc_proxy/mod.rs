//! `keel grpc-proxy start`: etcd's gRPC proxy (`etcd grpc-proxy start`), a stateless L7 proxy
//! in front of a cluster that takes load off it:
//!
//! - **Watch** ([`watch`]): watchers of the same range from any number of clients share one
//!   upstream watch;
//! - **KV** ([`kv`]): serializable ranges are answered from a cache ([`cache`]) that writes
//!   through the proxy and a watch of the whole keyspace keep current;
//! - everything else (Lease, Cluster, Maintenance, Auth, Lock, Election) is forwarded as it
//!   is ([`upstream`]), the caller's token included;
//! - `/health` (a read through the cluster, as etcd's proxy checks it) and `/metrics`
//!   (`etcd_grpc_proxy_*`) on the same address, and `/metrics` on `--metrics-addr`.
//!
//! Flags are etcd's. `--namespace`, `--resolver-prefix`, `--enable-pprof`,
//! `--experimental-leasing-prefix` and `--experimental-serializable-ordering` are refused with
//! the reason; the rest are implemented.

pub mod cache;
pub mod cluster;
pub mod kv;
pub mod upstream;
pub mod watch;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, bail};
use futures::StreamExt as _;
use keel_proto::etcdserverpb as pb;

use self::cache::Cache;
use self::upstream::Upstream;
use self::watch::{WatchProxy, WatchStats};

/// The largest request message a client may send the proxy: grpc-go's default receive limit
/// (etcd's proxy server keeps it; `--max-recv-bytes` applies to its calls to members).
const GRPC_GO_MAX_RECV: usize = 4 << 20;

/// `keel grpc-proxy start` flags, etcd's.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "keel grpc-proxy start",
    about = "Starts a gRPC proxy in front of a cluster: coalesced watches, cached serializable ranges"
)]
pub struct ProxyFlags {
    /// Comma separated etcd cluster endpoints.
    #[arg(long, default_value = "127.0.0.1:2379", value_delimiter = ',')]
    pub endpoints: Vec<String>,
    /// Listen address.
    #[arg(long, default_value = "127.0.0.1:23790")]
    pub listen_addr: String,
    /// Listen for /metrics requests on an additional interface (a URL).
    #[arg(long, default_value = "")]
    pub metrics_addr: String,
    /// Advertise address to register (used with --resolver-prefix, which Keel refuses).
    #[arg(long, default_value = "127.0.0.1:23790")]
    pub advertise_client_url: String,
    /// Prefix to use for registering proxy (refused: proxies do not register themselves).
    #[arg(long, default_value = "")]
    pub resolver_prefix: String,
    /// TTL, in seconds, when registering proxy endpoints.
    #[arg(long, default_value_t = 0)]
    pub resolver_ttl: i64,
    /// String to prefix to all keys for namespacing requests (refused).
    #[arg(long, default_value = "")]
    pub namespace: String,
    /// Enable runtime profiling (refused: Go's profiler).
    #[arg(long, default_value_t = false, num_args = 0..=1, default_missing_value = "true", value_parser = crate::config::go_bool, action = clap::ArgAction::Set)]
    pub enable_pprof: bool,
    /// Data directory for persistent data (etcd's proxy keeps its generated certificates there).
    #[arg(long, default_value = "default.proxy")]
    pub data_dir: String,
    /// Identify secure connections with etcd servers using this TLS certificate file.
    #[arg(long, default_value = "")]
    pub cert: String,
    /// Identify secure connections with etcd servers using this TLS key file.
    #[arg(long, default_value = "")]
    pub key: String,
    /// Verify certificates of TLS-enabled secure etcd servers using this CA bundle.
    #[arg(long, default_value = "")]
    pub cacert: String,
    /// Skip authentication of etcd server TLS certificates (testing only).
    #[arg(long, default_value_t = false, num_args = 0..=1, default_missing_value = "true", value_parser = crate::config::go_bool, action = clap::ArgAction::Set)]
    pub insecure_skip_tls_verify: bool,
    /// Identify secure connections to the proxy using this TLS certificate file.
    #[arg(long, default_value = "")]
    pub cert_file: String,
    /// Identify secure connections to the proxy using this TLS key file.
    #[arg(long, default_value = "")]
    pub key_file: String,
    /// Verify certificates of TLS-enabled secure proxy using this CA bundle.
    #[arg(long, default_value = "")]
    pub trusted_ca_file: String,
    /// Proxy client certificate revocation list file.
    #[arg(long, default_value = "")]
    pub client_crl_file: String,
    /// Proxy TLS using generated certificates.
    #[arg(long, default_value_t = false, num_args = 0..=1, default_missing_value = "true", value_parser = crate::config::go_bool, action = clap::ArgAction::Set)]
    pub auto_tls: bool,
    /// Comma-separated list of supported TLS cipher suites between client/proxy.
    #[arg(long, default_value = "")]
    pub listen_cipher_suites: String,
    /// Domain name to query for SRV records describing cluster endpoints.
    #[arg(long, default_value = "")]
    pub discovery_srv: String,
    /// Service name to query when using DNS discovery.
    #[arg(long, default_value = "")]
    pub discovery_srv_name: String,
    /// Accept insecure SRV records.
    #[arg(long, default_value_t = false, num_args = 0..=1, default_missing_value = "true", value_parser = crate::config::go_bool, action = clap::ArgAction::Set)]
    pub insecure_discovery: bool,
    /// Maximum concurrent streams that each client can open at a time.
    #[arg(long, default_value_t = u32::MAX)]
    pub max_concurrent_streams: u32,
    /// Message receive limits in bytes.
    #[arg(long, default_value_t = i32::MAX as i64)]
    pub max_recv_bytes: i64,
    /// Message send limits in bytes.
    #[arg(long, default_value_t = 1_572_864)]
    pub max_send_bytes: i64,
    /// Ensure serializable reads have monotonically increasing store revisions (refused).
    #[arg(long, default_value_t = false, num_args = 0..=1, default_missing_value = "true", value_parser = crate::config::go_bool, action = clap::ArgAction::Set)]
    pub experimental_serializable_ordering: bool,
    /// Leasing metadata prefix for disconnected linearized reads (refused).
    #[arg(long, default_value = "")]
    pub experimental_leasing_prefix: String,
    /// Enable debug-level logging for grpc-proxy.
    #[arg(long, default_value_t = false, num_args = 0..=1, default_missing_value = "true", value_parser = crate::config::go_bool, action = clap::ArgAction::Set)]
    pub debug: bool,
}

fn set(s: &str) -> Option<std::path::PathBuf> {
    (!s.is_empty()).then(|| std::path::PathBuf::from(s))
}

/// The proxy's counters and gauges in Prometheus' text format.
fn metrics_text(cache: &Cache, watch: &WatchProxy, stats: &WatchStats) -> String {
    let (keys, hits, misses) = cache.stats();
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: String| {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
        ));
    };
    metric(
        "etcd_grpc_proxy_cache_keys_total",
        "gauge",
        "Total number of keys/ranges cached",
        keys.to_string(),
    );
    metric(
        "etcd_grpc_proxy_cache_hits_total",
        "gauge",
        "Total number of cache hits",
        hits.to_string(),
    );
    metric(
        "etcd_grpc_proxy_cache_misses_total",
        "gauge",
        "Total number of cache misses",
        misses.to_string(),
    );
    metric(
        "etcd_grpc_proxy_watchers_coalescing_total",
        "gauge",
        "Total number of current watchers coalescing",
        watch.coalescing().to_string(),
    );
    metric(
        "etcd_grpc_proxy_events_coalescing_total",
        "counter",
        "Total number of events coalescing",
        stats.events_coalescing.load(Ordering::Relaxed).to_string(),
    );
    metric(
        "keel_grpc_proxy_upstream_watches",
        "gauge",
        "Upstream watches open (the coalesced watchers' and the cache's)",
        stats.upstream.load(Ordering::Relaxed).to_string(),
    );
    out
}

/// etcd's proxy health: a read through the cluster answers (permission denied counts).
async fn health(upstream: Upstream) -> (axum::http::StatusCode, &'static str) {
    let mut c = pb::kv_client::KvClient::new(upstream.channel());
    let read = c.range(pb::RangeRequest {
        key: b"a".to_vec(),
        ..Default::default()
    });
    let ok = match tokio::time::timeout(Duration::from_secs(1), read).await {
        Ok(Ok(_)) => true,
        Ok(Err(s)) => s.message() == "etcdserver: permission denied",
        Err(_) => false,
    };
    if ok {
        (axum::http::StatusCode::OK, "{\"health\":\"true\"}")
    } else {
        (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "{\"health\":\"false\"}",
        )
    }
}

/// Each second, a read without credentials: refused (auth is on), the cache is emptied and
/// kept empty; answered, it may serve again.
async fn probe_auth(upstream: Upstream, cache: Arc<Cache>) {
    loop {
        let mut c = pb::kv_client::KvClient::new(upstream.channel());
        let read = c.range(pb::RangeRequest {
            key: vec![0],
            range_end: vec![0],
            serializable: true,
            count_only: true,
            limit: 1,
            ..Default::default()
        });
        match tokio::time::timeout(Duration::from_secs(5), read).await {
            Ok(Ok(_)) => cache.enable(),
            Ok(Err(s))
                if matches!(
                    s.code(),
                    tonic::Code::PermissionDenied
                        | tonic::Code::Unauthenticated
                        | tonic::Code::InvalidArgument
                ) =>
            {
                cache.disable();
            }
            // Unreachable: the keyspace watch's state decides.
            _ => {}
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The keyspace watch that keeps the cache current: every event drops the cached answers it
/// could change. Opened again when it breaks (the cache holds no current answer meanwhile).
/// Started by the first read the cache could answer, so a proxy that only coalesces watches
/// adds no watcher of its own to the cluster.
pub async fn keep_cache_current(upstream: Upstream, cache: Arc<Cache>) {
    tokio::spawn(probe_auth(upstream.clone(), cache.clone()));
    let mut backoff = Duration::from_millis(100);
    loop {
        let (tx, rx) = tokio::sync::mpsc::channel::<pb::WatchRequest>(1);
        let _ = tx
            .send(pb::WatchRequest {
                request_union: Some(pb::watch_request::RequestUnion::CreateRequest(
                    pb::WatchCreateRequest {
                        key: vec![0],
                        range_end: vec![0],
                        progress_notify: true,
                        ..Default::default()
                    },
                )),
            })
            .await;
        let requests =
            futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) });
        let mut client = pb::watch_client::WatchClient::new(upstream.channel())
            .max_decoding_message_size(usize::MAX);
        if let Ok(r) = client.watch(requests).await {
            let mut responses = r.into_inner();
            while let Some(Ok(r)) = responses.next().await {
                if r.canceled {
                    tracing::warn!(reason = %r.cancel_reason, "grpc-proxy: the cache's watch was canceled");
                    break;
                }
                backoff = Duration::from_millis(100);
                let applied = match r.events.last().and_then(|e| e.kv.as_ref()) {
                    Some(kv) => kv.mod_revision,
                    None => r.header.map_or(0, |h| h.revision),
                };
                let keys = r
                    .events
                    .iter()
                    .filter_map(|e| e.kv.as_ref())
                    .map(|kv| kv.key.as_ref());
                cache.watched_events(keys, applied);
            }
        }
        cache.unwatched();
        drop(tx);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

/// The address `host:port` (or a URL's) names.
fn listen_addr(s: &str) -> anyhow::Result<std::net::SocketAddr> {
    use std::net::ToSocketAddrs as _;
    let hostport = crate::gateway::strip_scheme(s);
    hostport
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve {s}"))?
        .next()
        .with_context(|| format!("{s} names no address"))
}

/// Runs the proxy until SIGTERM or SIGINT.
pub fn run(flags: ProxyFlags) -> anyhow::Result<()> {
    let level = if flags.debug { "debug" } else { "info" };
    crate::logging::init(level, false, &[crate::config::compat::LogOutput::Stderr])
        .context("starting the log")?;
    for (set, flag, why) in [
        (
            !flags.namespace.is_empty(),
            "namespace",
            "Keel's proxy does not rewrite keys; give each application its own prefix",
        ),
        (
            !flags.resolver_prefix.is_empty(),
            "resolver-prefix",
            "Keel's proxies do not register themselves in the cluster",
        ),
        (
            flags.enable_pprof,
            "enable-pprof",
            "pprof is Go's profiler and Keel is not a Go program; profile it with perf",
        ),
        (
            !flags.experimental_leasing_prefix.is_empty(),
            "experimental-leasing-prefix",
            "Keel's proxy has no leasing KV",
        ),
        (
            flags.experimental_serializable_ordering,
            "experimental-serializable-ordering",
            "Keel's proxy does not order serializable reads across endpoints",
        ),
        (
            flags.auto_tls,
            "auto-tls",
            "Keel's proxy serves TLS with --cert-file and --key-file only",
        ),
        (
            !flags.client_crl_file.is_empty() || !flags.listen_cipher_suites.is_empty(),
            "client-crl-file/listen-cipher-suites",
            "Keel's proxy does not take them; put the proxy behind a member-side policy",
        ),
    ] {
        if set {
            bail!("--{flag} is not supported: {why}");
        }
    }
    let mut endpoints = flags.endpoints.clone();
    let upstream_tls = !flags.cert.is_empty()
        || !flags.key.is_empty()
        || !flags.cacert.is_empty()
        || flags.insecure_skip_tls_verify;
    if !flags.discovery_srv.is_empty() {
        endpoints = crate::discovery::srv::client_endpoints(
            &flags.discovery_srv,
            &flags.discovery_srv_name,
        )
        .context("cannot discover the cluster's endpoints")?;
        tracing::info!(endpoints = ?endpoints, "discovered the cluster's endpoints from SRV records");
    }
    let runtime = crate::net::runtime(crate::net::threads(None))?;
    runtime.block_on(async move {
        let client_tls = if upstream_tls {
            let s = crate::tls::Settings {
                cert_file: set(&flags.cert),
                key_file: set(&flags.key),
                trusted_ca_file: set(&flags.cacert),
                self_signed: flags.insecure_skip_tls_verify,
                ..Default::default()
            };
            Some(crate::tls::client("grpc-proxy upstream", &s).map_err(anyhow::Error::msg)?)
        } else {
            None
        };
        let dialer = crate::tls::dial::Dialer::new(client_tls);
        let upstream = Upstream::new(&endpoints, &dialer, upstream_tls)?;
        let cache = Arc::new(Cache::default());
        let stats = Arc::new(WatchStats::default());
        let watch = WatchProxy::new(upstream.clone(), stats.clone());
        let kv = kv::KvProxy::new(upstream.clone(), cache.clone());
        let recv = usize::try_from(flags.max_recv_bytes).unwrap_or(usize::MAX);
        let send = usize::try_from(flags.max_send_bytes).unwrap_or(usize::MAX);
        // What the proxy's own server takes from clients: grpc-go's default, as etcd's proxy
        // server (the flags bound its calls to the members).
        let inbound = recv.min(GRPC_GO_MAX_RECV);
        let metrics_router = {
            let (cache, watch, stats) = (cache.clone(), watch.clone(), stats.clone());
            axum::Router::new().route(
                "/metrics",
                axum::routing::get(move || {
                    let text = metrics_text(&cache, &watch, &stats);
                    async move { text }
                }),
            )
        };
        let forwarder = upstream.clone();
        let fallback_cache = cache.clone();
        let health_upstream = upstream.clone();
        let router = tonic::service::Routes::new(
            pb::kv_server::KvServer::new(kv)
                .max_decoding_message_size(inbound)
                .max_encoding_message_size(send.max(recv)),
        )
        .add_service(pb::watch_server::WatchServer::new(watch).max_decoding_message_size(inbound))
        .add_service(pb::cluster_server::ClusterServer::new(
            cluster::ClusterProxy::new(upstream.clone(), flags.advertise_client_url.clone()),
        ))
        .into_axum_router()
        .route(
            "/health",
            axum::routing::get(move || health(health_upstream.clone())),
        )
        .merge(metrics_router.clone())
        .fallback(move |request: axum::extract::Request| {
            let forwarder = forwarder.clone();
            let cache = fallback_cache.clone();
            async move {
                // Only gRPC calls go on to the members: etcd's proxy serves nothing else
                // (a member's JSON gateway must not be reached with the proxy's identity).
                let grpc = request
                    .headers()
                    .get(axum::http::header::CONTENT_TYPE)
                    .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
                if !grpc {
                    return axum::response::IntoResponse::into_response((
                        axum::http::StatusCode::NOT_FOUND,
                        "404 page not found\n",
                    ));
                }
                // Auth may change: nothing cached is served until the probe says reads
                // without credentials are still answered. Only calls that change auth count
                // (an Authenticate, even a failing one, must not keep the cache empty).
                let changes_auth = request
                    .uri()
                    .path()
                    .strip_prefix("/etcdserverpb.Auth/")
                    .is_some_and(|m| {
                        !matches!(
                            m,
                            "Authenticate"
                                | "AuthStatus"
                                | "UserGet"
                                | "UserList"
                                | "RoleGet"
                                | "RoleList"
                        )
                    });
                if changes_auth {
                    cache.disable();
                }
                forwarder.forward(request).await
            }
        });
        let routes = tonic::service::Routes::from(router);
        let addr = listen_addr(&flags.listen_addr)?;
        let incoming = crate::net::bind(addr)
            .with_context(|| format!("cannot listen on {}", flags.listen_addr))?;
        let options = crate::net::ClientOptions {
            max_concurrent_streams: flags.max_concurrent_streams,
            ..Default::default()
        };
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        if !flags.metrics_addr.is_empty() {
            let url = crate::config::parse_url(&flags.metrics_addr).map_err(anyhow::Error::msg)?;
            let maddr = listen_addr(&format!("{}:{}", url.host, url.port))?;
            let mincoming = crate::net::bind(maddr)
                .with_context(|| format!("cannot listen for metrics on {}", flags.metrics_addr))?;
            let mroutes = tonic::service::Routes::from(metrics_router);
            tokio::spawn(crate::net::serve_clients(
                mincoming,
                mroutes,
                crate::net::ClientOptions::default(),
                stopped(stop_rx.clone()),
            ));
        }
        let serving = if flags.cert_file.is_empty() && flags.key_file.is_empty() {
            tracing::info!(address = %addr, endpoints = ?endpoints, "grpc-proxy: serving");
            tokio::spawn(crate::net::serve_clients(
                incoming,
                routes,
                options,
                stopped(stop_rx.clone()),
            ))
        } else {
            let s = crate::tls::Settings {
                cert_file: set(&flags.cert_file),
                key_file: set(&flags.key_file),
                trusted_ca_file: set(&flags.trusted_ca_file),
                ..Default::default()
            };
            let tls = crate::tls::server("grpc-proxy", &s).map_err(anyhow::Error::msg)?;
            tracing::info!(address = %addr, endpoints = ?endpoints, "grpc-proxy: serving over TLS");
            tokio::spawn(crate::net::serve_clients(
                crate::tls::incoming::incoming(incoming, tls, "grpc-proxy", false),
                routes,
                options,
                stopped(stop_rx.clone()),
            ))
        };
        {
            use tokio::signal::unix::{SignalKind, signal};
            let mut term = signal(SignalKind::terminate())?;
            let mut int = signal(SignalKind::interrupt())?;
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        tracing::info!("grpc-proxy: stopping");
        let _ = stop_tx.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(5), serving).await;
        Ok(())
    })
}
