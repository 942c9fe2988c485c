//! Starting a member: the data dir, the storage core, the client listeners (gRPC and the HTTP
//! endpoints etcd serves on the same port); an orderly stop on SIGINT/SIGTERM, and an exit with
//! an error when the storage core stops on its own (a failed fdatasync, a poisoned backend), so
//! that a supervisor restarts the member and clients fail over rather than talk to a zombie.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use keel_proto::etcdserverpb::auth_server::AuthServer;
use keel_proto::etcdserverpb::cluster_server::ClusterServer;
use keel_proto::etcdserverpb::kv_server::KvServer;
use keel_proto::etcdserverpb::lease_server::LeaseServer;
use keel_proto::etcdserverpb::maintenance_server::MaintenanceServer;
use keel_proto::etcdserverpb::watch_server::WatchServer;
use keel_proto::health::health_server::HealthServer;
use keel_proto::keelpeer::peer_server::PeerServer;
use keel_proto::v3electionpb::election_server::ElectionServer;
use keel_proto::v3lockpb::lock_server::LockServer;
use tonic::transport::server::TcpIncoming;

use crate::api::auth::AuthService;
use crate::api::cluster::ClusterService;
use crate::api::election::ElectionService;
use crate::api::kv::KvService;
use crate::api::lease::LeaseService;
use crate::api::lock::LockService;
use crate::api::maintenance::MaintenanceService;
use crate::api::watch::WatchService;
use crate::config::{Config, Url};
use crate::metrics::Metrics;
use crate::raft::peer::PeerService;
use crate::raft::transport::MAX_PEER_MESSAGE;
use crate::raft::{self, CoreConfig, Feed};

/// How long an orderly stop waits for client connections to close after their streams were
/// ended, before it drops them.
pub const STOP_CONNECTIONS: Duration = Duration::from_secs(5);
/// How long an orderly stop waits for the storage core to checkpoint and close the WAL.
pub const STOP_CORE: Duration = Duration::from_secs(10);

/// A stop signal the services' long-lived streams (watch, keep-alive) end on. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Shutdown(tokio::sync::watch::Receiver<bool>);

/// Fires a [`Shutdown`].
#[derive(Debug)]
pub struct ShutdownTrigger(tokio::sync::watch::Sender<bool>);

impl Shutdown {
    /// A new signal and its trigger.
    pub fn new() -> (ShutdownTrigger, Shutdown) {
        let (tx, rx) = tokio::sync::watch::channel(false);
        (ShutdownTrigger(tx), Shutdown(rx))
    }

    /// Resolves once the stop is fired.
    pub async fn wait(&self) {
        let mut rx = self.0.clone();
        let _ = rx.wait_for(|fired| *fired).await;
    }

    /// Whether the stop was fired.
    pub fn fired(&self) -> bool {
        *self.0.borrow()
    }
}

impl ShutdownTrigger {
    /// Fires the stop.
    pub fn fire(&self) {
        let _ = self.0.send(true);
    }
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

/// A file mode as Go's `os.FileMode.String` prints it (etcd's permission warning quotes it).
fn go_mode(mode: u32, dir: bool) -> String {
    let mut s = String::from(if dir { "d" } else { "-" });
    for (i, c) in "rwxrwxrwx".chars().enumerate() {
        s.push(if mode & (1 << (8 - i)) != 0 { c } else { '-' });
    }
    s
}

/// Creates the data dir with mode 0700, or warns (as etcd 3.4) if it exists with another mode.
pub fn prepare_data_dir(dir: &Path) -> anyhow::Result<()> {
    match std::fs::metadata(dir) {
        Ok(meta) => {
            let mode = meta.permissions().mode() & 0o777;
            if mode != 0o700 {
                tracing::warn!(
                    "check file permission: directory {:?} exist, but the permission is {:?}. The \
                     recommended permission is {:?} to prevent possible unprivileged access to \
                     the data.",
                    dir.display().to_string(),
                    go_mode(mode, true),
                    go_mode(0o700, false)
                );
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => raft::node::private_dir(dir)
            .with_context(|| format!("creating the data directory {}", dir.display())),
        Err(e) => Err(e).with_context(|| format!("reading the data directory {}", dir.display())),
    }
}

/// The members of the running cluster a new member joins, asked of the other members listed in
/// `--initial-cluster` (etcd's `GetClusterFromRemotePeers`): the cluster ID and the members.
async fn fetch_members(
    config: &Config,
    dialer: &crate::tls::dial::Dialer,
) -> anyhow::Result<(u64, Vec<crate::membership::Member>)> {
    use keel_proto::keelpeer::peer_client::PeerClient;
    let mine: Vec<&Url> = config.initial_advertise_peer_urls.iter().collect();
    let mut errors = Vec::new();
    for (_, urls) in &config.initial_cluster {
        for url in urls.iter().filter(|u| !mine.contains(u)) {
            let attempt = async {
                let mut c = PeerClient::new(dialer.connect(&url.to_string()).await?);
                let r = c
                    .members(keel_proto::keelpeer::MembersRequest {})
                    .await?
                    .into_inner();
                let members = r
                    .members
                    .iter()
                    .map(|b| crate::membership::Member::from_json(b).map_err(anyhow::Error::msg))
                    .collect::<anyhow::Result<Vec<_>>>()?;
                anyhow::Ok((r.cluster_id, members))
            };
            match tokio::time::timeout(Duration::from_secs(2), attempt).await {
                Ok(Ok(found)) => return Ok(found),
                Ok(Err(e)) => errors.push(format!("{url}: {e}")),
                Err(_) => errors.push(format!("{url}: timed out")),
            }
        }
    }
    bail!("no member answered: {}", errors.join("; "))
}

/// Whether the WAL dir (`--wal-dir`, or the data dir's) holds a WAL (a member restarting, not a
/// new one).
fn has_wal(data_dir: &Path, wal_dir: Option<&Path>) -> bool {
    let dir = wal_dir.map_or_else(|| data_dir.join("member").join("wal"), Path::to_path_buf);
    std::fs::read_dir(dir).is_ok_and(|entries| {
        entries
            .flatten()
            .any(|e| e.file_name().to_string_lossy().ends_with(".wal"))
    })
}

/// The member's TLS: what its `https` client and peer URLs serve with, and how it dials peers.
struct Tls {
    client: Option<Arc<crate::tls::ServerTls>>,
    /// `--client-cert-auth` as it applies: an `--auto-tls` certificate drops it, as etcd's.
    client_cert_auth: bool,
    peer: Option<Arc<crate::tls::ServerTls>>,
    dialer: crate::tls::dial::Dialer,
}

impl Tls {
    /// Reads the certificates (or makes the `--auto-tls` ones), as etcd checks them at start:
    /// an `https` URL without a certificate, or a file that does not load, stops the start.
    fn load(config: &Config) -> anyhow::Result<Tls> {
        // The metrics URLs serve with the client certificate, as etcd's.
        let client_urls: Vec<Url> = config
            .listen_client_urls
            .iter()
            .chain(&config.compat.listen_metrics_urls)
            .cloned()
            .collect();
        let client = Self::side(
            config,
            "client",
            &config.client_tls,
            &client_urls,
            ("cert-file", "key-file"),
        )?;
        let (peer, peer_settings) = Self::side(
            config,
            "peer",
            &config.peer_tls,
            &config.listen_peer_urls,
            ("peer-cert-file", "peer-key-file"),
        )?;
        let dialer = crate::tls::dial::Dialer::new(Some(
            crate::tls::client("peer", &peer_settings).context("peer TLS")?,
        ))
        .with_election_timeout(config.election_timeout);
        Ok(Tls {
            client: client.0,
            client_cert_auth: client.1.client_cert_auth,
            peer,
            dialer,
        })
    }

    fn side(
        config: &Config,
        side: &'static str,
        settings: &crate::tls::Settings,
        urls: &[Url],
        (cert_flag, key_flag): (&str, &str),
    ) -> anyhow::Result<(Option<Arc<crate::tls::ServerTls>>, crate::tls::Settings)> {
        let mut settings = settings.clone();
        if settings.auto_tls {
            if settings.has_cert() {
                tracing::warn!("ignoring {side} auto TLS since certs given");
            } else {
                let hosts: Vec<String> = urls.iter().map(|u| u.host.clone()).collect();
                let dir = config.data_dir.join("fixtures").join(side);
                let (cert, key) = crate::tls::auto::self_cert(&dir, &hosts)
                    .with_context(|| format!("{side} auto TLS"))?;
                // etcd's `SelfCert` replaces the whole TLS configuration of the side: client
                // certificate authentication, the CA and CRL files and the allowed CN and
                // hostname go with it (only the cipher suites are set again).
                settings = crate::tls::Settings {
                    cert_file: Some(cert),
                    key_file: Some(key),
                    self_signed: true,
                    auto_tls: true,
                    suites: settings.suites.clone(),
                    ..Default::default()
                };
            }
        }
        let mut server = None;
        for url in urls {
            if !url.tls {
                if settings.has_cert() && !settings.self_signed {
                    tracing::warn!(
                        %url,
                        "scheme is HTTP while key and cert files are present; ignoring key and cert files"
                    );
                }
                if settings.client_cert_auth {
                    let flag = if side == "peer" {
                        "--peer-client-cert-auth"
                    } else {
                        "--client-cert-auth"
                    };
                    tracing::warn!(
                        %url,
                        "scheme is HTTP while {flag} is enabled; ignoring client cert auth for this URL"
                    );
                }
                continue;
            }
            if !settings.has_cert() {
                bail!(
                    "TLS key/cert (--{cert_flag}, --{key_flag}) must be provided for {side} url \
                     {url} with HTTPS scheme"
                );
            }
            if server.is_none() {
                server = Some(
                    crate::tls::server(side, &settings).with_context(|| format!("{side} TLS"))?,
                );
            }
        }
        Ok((server, settings))
    }
}

/// etcd's largest recommended backend quota (`MaxQuotaBytes`).
pub const MAX_QUOTA_BYTES: u64 = 8 << 30;

/// The warnings a backend quota deserves: over etcd's recommended 8 GiB (etcd's "quota exceeds
/// the maximum value"), and over the machine's memory (the backend is mapped: reads of a larger
/// one wait on the disk).
pub fn quota_warnings(quota: u64, ram: Option<u64>) -> Vec<String> {
    let mut w = Vec::new();
    if quota > MAX_QUOTA_BYTES {
        w.push(format!(
            "quota exceeds the maximum value: --quota-backend-bytes={quota} is over the \
             recommended maximum of {MAX_QUOTA_BYTES} bytes (8 GiB)"
        ));
    }
    if let Some(ram) = ram.filter(|r| quota > *r) {
        w.push(format!(
            "quota exceeds the machine's memory: --quota-backend-bytes={quota} is over the \
             {ram} bytes of RAM; the backend is memory-mapped, and a larger one makes reads wait \
             on the disk"
        ));
    }
    w
}

/// File descriptors kept for the process's own files when limiting client connections
/// (etcd's `reservedInternalFDNum`).
const RESERVED_FDS: u64 = 150;

/// How many client connections may be open at once: the file descriptor limit, raised to its
/// hard limit first (as Go's runtime does for etcd), less [`RESERVED_FDS`]. A limit too low
/// for that stops the start, as etcd's "file descriptor limit of etcd process is too low".
fn client_connection_limit() -> anyhow::Result<usize> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the limit into the struct it is given, which lives on the stack
    // for the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut limit) } != 0 {
        return Err(std::io::Error::last_os_error()).context("reading the file descriptor limit");
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit only reads the struct, which lives for the call.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const raised) } == 0 {
            limit = raised;
        }
    }
    let current = limit.rlim_cur;
    if current <= RESERVED_FDS {
        bail!(
            "file descriptor limit of the keel process is too low ({current}); please set higher \
             (over {RESERVED_FDS})"
        );
    }
    Ok(usize::try_from(current - RESERVED_FDS).unwrap_or(usize::MAX))
}

/// The machine's physical memory in bytes.
fn physical_memory() -> Option<u64> {
    // SAFETY: sysconf only reads system configuration values.
    let (pages, size) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    (pages > 0 && size > 0).then(|| pages as u64 * size as u64)
}

/// Counts SIGINT/SIGTERM: the first starts an orderly stop, a second exits at once.
async fn signals(trigger: Arc<ShutdownTrigger>) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install the signal handlers");
        return;
    };
    let mut seen = 0;
    loop {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        seen += 1;
        if seen == 1 {
            tracing::info!("received a stop signal: stopping (a second signal exits at once)");
            trigger.fire();
        } else {
            tracing::warn!("received a second stop signal: exiting at once");
            std::process::exit(1);
        }
    }
}

/// Runs a member until it is stopped.
pub fn run(mut config: Config) -> anyhow::Result<()> {
    let level = if config.compat.debug {
        "debug"
    } else {
        config.log_level.as_str()
    };
    crate::logging::init(level, config.compat.json_logs, &config.compat.log_outputs)
        .context("opening the log outputs (--log-outputs)")?;
    for notice in &config.compat.notices {
        tracing::warn!("{notice}");
    }
    // Everything the member creates is private to its user (dirs 0700, files 0600), as etcd's.
    // SAFETY: umask only sets the process's file-creation mask; it cannot fail.
    unsafe { libc::umask(0o077) };
    prepare_data_dir(&config.data_dir)?;
    for warning in quota_warnings(config.quota_backend_bytes, physical_memory()) {
        tracing::warn!("{warning}");
    }
    let tls = Tls::load(&config)?;
    let jwt = match &config.auth_token {
        crate::auth::jwt::TokenType::Jwt(o) => Some(Arc::new(
            crate::auth::jwt::Jwt::load(o).map_err(anyhow::Error::msg)?,
        )),
        crate::auth::jwt::TokenType::Simple => None,
    };
    let restarting = has_wal(&config.data_dir, config.compat.wal_dir.as_deref());
    if !restarting && !config.compat.discovery_srv.is_empty() {
        // `--discovery-srv`: the initial cluster from DNS SRV records.
        let found = crate::discovery::srv::cluster(
            &config.compat.discovery_srv,
            &config.compat.discovery_srv_name,
            &config.name,
            &config.initial_advertise_peer_urls,
        )
        .context("error setting up initial cluster")?;
        let mut cluster: Vec<(String, Vec<crate::config::Url>)> = Vec::new();
        for (name, url) in found {
            match cluster.iter_mut().find(|(n, _)| *n == name) {
                Some((_, urls)) => urls.push(url),
                None => cluster.push((name, vec![url])),
            }
        }
        let listed: Vec<String> = cluster
            .iter()
            .flat_map(|(n, urls)| urls.iter().map(move |u| format!("{n}={u}")))
            .collect();
        tracing::info!(
            discovery_srv = %config.compat.discovery_srv,
            found_cluster = %listed.join(","),
            "got the initial cluster from DNS SRV records"
        );
        config.initial_cluster = cluster;
    }
    if !restarting && !config.compat.discovery.is_empty() && config.initial_cluster_state_new {
        // `--discovery`: register with the discovery service, wait for the others.
        let me = crate::membership::member_id(
            &config.initial_advertise_peer_urls,
            &config.initial_cluster_token,
        );
        let mine: Vec<String> = config
            .initial_advertise_peer_urls
            .iter()
            .map(|u| format!("{}={u}", config.name))
            .collect();
        tracing::info!(discovery = %config.compat.discovery, member_id = %format!("{me:x}"), "bootstrapping through the discovery service");
        let found = crate::discovery::service::join_cluster(
            &config.compat.discovery,
            Some(&config.compat.discovery_proxy),
            me,
            &mine.join(","),
        )
        .map_err(|e| match e {
            crate::discovery::service::DiscoveryError::FullCluster => anyhow::anyhow!(
                "{e} (Keel has no v2 proxy to fall back to, whatever --discovery-fallback says)"
            ),
            e => anyhow::Error::new(e),
        })
        .context("cannot join the cluster through the discovery service")?;
        let mut cluster: Vec<(String, Vec<crate::config::Url>)> = Vec::new();
        for member in found.split(',') {
            let (name, url) = member
                .split_once('=')
                .ok_or_else(|| anyhow::anyhow!("discovery: bad registration {member:?}"))?;
            let url = crate::config::parse_url(url).map_err(anyhow::Error::msg)?;
            match cluster.iter_mut().find(|(n, _)| n == name) {
                Some((_, urls)) => urls.push(url),
                None => cluster.push((name.to_string(), vec![url])),
            }
        }
        tracing::info!(found_cluster = %found, "got the initial cluster from the discovery service");
        config.initial_cluster = cluster;
    }
    let mut ids = crate::membership::Ids::new(&config);
    let mut known_members = Vec::new();
    if restarting {
        tracing::info!("restarting a member: the --initial-cluster* flags are ignored");
    }
    let election_ticks = (config.election_timeout.as_millis()
        / config.heartbeat_interval.as_millis().max(1)) as usize;
    let net_threads = crate::net::threads(config.net_threads);
    let runtime = crate::net::runtime(net_threads)?;
    // One watch hub per network thread.
    let feeds: Vec<Arc<Feed>> = (0..net_threads)
        .map(|_| Arc::new(Feed::default()))
        .collect();
    let metrics = Metrics::new(config.quota_backend_bytes);
    if !restarting {
        if config.initial_cluster_state_new {
            crate::membership::verify_bootstrap(&config).map_err(anyhow::Error::msg)?;
        } else {
            // Joining a running cluster: its members, from any of them, and this member's ID
            // as `etcdctl member add` recorded it.
            let (cluster_id, members) = runtime
                .block_on(fetch_members(&config, &tls.dialer))
                .context("cannot fetch cluster info from peer urls")?;
            let mine: Vec<String> = config
                .initial_advertise_peer_urls
                .iter()
                .map(ToString::to_string)
                .collect();
            let me = members
                .iter()
                .find(|m| {
                    let mut a = m.peer_urls.clone();
                    let mut b = mine.clone();
                    a.sort();
                    b.sort();
                    a == b
                })
                .with_context(|| {
                    format!(
                        "error validating peerURLs: PeerURLs: no match found for existing member \
                         ({}): add this member first (etcdctl member add {} --peer-urls={})",
                        mine.join(","),
                        config.name,
                        mine.join(",")
                    )
                })?;
            ids = crate::membership::Ids {
                cluster_id,
                member_id: me.id,
                members: Vec::new(),
            };
            known_members = members;
        }
    }
    let started = raft::start(
        CoreConfig {
            data_dir: config.data_dir.clone(),
            cluster_id: ids.cluster_id,
            member_id: ids.member_id,
            initial_members: ids.members.clone(),
            known_members,
            name: config.name.clone(),
            client_urls: config
                .advertise_client_urls
                .iter()
                .map(ToString::to_string)
                .collect(),
            heartbeat: config.heartbeat_interval,
            election_ticks,
            cpu: config.storage_core,
            spin: config.storage_core_spin,
            max_request_bytes: config.max_request_bytes as usize,
            snapshot_count: config.snapshot_count,
            snapshot_catchup_entries: config.snapshot_catchup_entries,
            metrics,
            lease_checkpoint_interval: config.lease_checkpoint_interval,
            feeds: feeds.clone(),
            faults: crate::faults::Faults::from_env(),
            fixed_election_tick: None,
            wal_segment_size: 64 << 20,
            dialer: tls.dialer.clone(),
            auth_token_ttl: config.auth_token_ttl,
            force_new_cluster: config.force_new_cluster,
            wal_dir: config.compat.wal_dir.clone(),
            pre_vote: config.compat.pre_vote,
        },
        runtime.handle().clone(),
    )
    .context("starting the storage core")?;
    let core = started.core;
    let mut done = started.done;
    let (cluster_id, member_id) = core.ids();
    tracing::info!(
        name = %config.name,
        data_dir = %config.data_dir.display(),
        member_id = format!("{member_id:x}"),
        cluster_id = format!("{cluster_id:x}"),
        "member ready"
    );
    // Keel serves etcd 3.4's API: the capabilities of cluster version 3.4.
    tracing::info!(cluster_version = "3.4", "enabled capabilities for version");
    if config.initial_corrupt_check {
        // Before serving peers or clients, as etcd.
        runtime.block_on(crate::corrupt::initial_check(&core))?;
    }
    runtime.block_on(async {
        let (trigger, shutdown) = Shutdown::new();
        let trigger = Arc::new(trigger);
        tokio::spawn(signals(trigger.clone()));
        let limit = config.max_request_bytes as usize + 512 * 1024;
        let gate = crate::auth::gate::Gate::new(core.clone(), tls.client_cert_auth, jwt.clone());
        let auth = AuthServer::new(AuthService::new(gate.clone(), config.bcrypt_cost))
            .max_decoding_message_size(limit);
        let kv_service = KvService::new(
            core.clone(),
            gate.clone(),
            config.max_txn_ops as usize,
            config.quota_backend_bytes,
        );
        let kv = KvServer::new(kv_service.clone())
            .max_decoding_message_size(limit)
            .max_encoding_message_size(i32::MAX as usize);
        let lease_service = LeaseService::new(
            core.clone(),
            gate.clone(),
            shutdown.clone(),
            config.quota_backend_bytes,
        );
        let lease = LeaseServer::new(lease_service.clone()).max_decoding_message_size(limit);
        let watch_service = WatchService::start(
            core.clone(),
            gate.clone(),
            feeds,
            limit,
            config.watch_progress_notify_interval,
            crate::api::watch::Limits {
                per_stream: config.max_watchers_per_stream,
                total: config.max_watchers,
            },
            config.election_timeout,
            shutdown.clone(),
        );
        let watch = WatchServer::new(watch_service.clone()).max_decoding_message_size(limit);
        // Lock and Election call the KV, Lease and Watch services as etcd's v3client does.
        let local = crate::api::v3client::Local {
            kv: kv_service,
            lease: lease_service,
            watch: watch_service,
        };
        let lock =
            LockServer::new(LockService::new(local.clone())).max_decoding_message_size(limit);
        let election =
            ElectionServer::new(ElectionService::new(local)).max_decoding_message_size(limit);
        let cluster = ClusterServer::new(ClusterService::new(
            core.clone(),
            gate.clone(),
            config.strict_reconfig_check,
        ));
        let maintenance = MaintenanceServer::new(MaintenanceService::new(
            core.clone(),
            gate.clone(),
            Duration::from_secs(5) + 2 * config.election_timeout,
            config.heartbeat_interval,
        ));
        let services = crate::api::dispatch::Services {
            kv,
            lease,
            watch,
            cluster,
            maintenance,
            auth,
            lock,
            election,
            health: HealthServer::new(crate::api::health::HealthService::new(shutdown.clone())),
        };
        // The router the JSON gateway calls (the services behind etcd's interceptors, as an axum
        // middleware); merged with the HTTP endpoints below, the client URLs' fallback.
        let grpc =
            services
                .routes()
                .into_axum_router()
                .layer(axum::middleware::from_fn_with_state(
                    core.clone(),
                    crate::api::require_leader,
                ));
        // The HTTP endpoints, and the JSON gateway calling the gRPC services in process.
        let mut http = crate::http::router(core.clone());
        if config.compat.enable_grpc_gateway {
            let gateway = crate::http::grpc_gateway::Gateway::new(
                grpc.clone(),
                core.clone(),
                tls.client_cert_auth,
                config.max_request_bytes as usize,
            )
            .context("cannot set up the JSON gateway")?;
            http = http.merge(gateway.router());
        }
        let access =
            crate::http::access::Access::new(&config.compat.cors, &config.compat.host_whitelist);
        let http = http.layer(axum::middleware::from_fn_with_state(
            std::sync::Arc::new(access),
            crate::http::access::check,
        ));
        let router = grpc.merge(http);
        let client_service = crate::api::dispatch::ClientService::new(
            core.clone(),
            services,
            tonic::service::Routes::from(router),
        );
        let compactor = tokio::spawn(crate::compactor::run(core.clone(), config.auto_compaction));
        let corruption = (!config.corrupt_check_time.is_zero()).then(|| {
            tokio::spawn(crate::corrupt::run_periodic(
                core.clone(),
                config.corrupt_check_time,
            ))
        });
        // The peer listeners stop only after the core has handed leadership over.
        let (peer_stop, peer_stopped) = Shutdown::new();
        let peer = PeerServer::new(PeerService::new(
            core.clone(),
            config.data_dir.join("member").join("snap"),
            config.strict_reconfig_check,
        ))
        .max_decoding_message_size(MAX_PEER_MESSAGE)
        .max_encoding_message_size(MAX_PEER_MESSAGE);
        let mut peer_servers = Vec::new();
        for url in &config.listen_peer_urls {
            let addr = resolve(url).await?;
            let stop = peer_stopped.clone();
            // Bound here, so that a port in use stops the start with the reason (a server task
            // failing to bind on its own would leave a member that cannot be reached).
            let incoming = TcpIncoming::bind(addr)
                .with_context(|| format!("cannot listen for peers on {url} ({addr})"))?
                .with_nodelay(Some(true));
            let builder = tonic::transport::Server::builder().add_service(peer.clone());
            let stop = async move { stop.wait().await };
            let server = match (&tls.peer, url.tls) {
                (Some(t), true) => tokio::spawn(builder.serve_with_incoming_shutdown(
                    crate::tls::incoming::incoming(
                        incoming,
                        t.clone(),
                        "peer",
                        !config.compat.peer_skip_client_san_verification,
                    ),
                    stop,
                )),
                _ => tokio::spawn(builder.serve_with_incoming_shutdown(incoming, stop)),
            };
            tracing::info!(%url, %addr, "serving peer traffic");
            peer_servers.push(server);
        }
        let mut servers = Vec::new();
        let client_options = crate::net::ClientOptions {
            max_concurrent_streams: config.compat.max_concurrent_streams,
            keepalive_interval: config.compat.keepalive_interval,
            keepalive_timeout: config.compat.keepalive_timeout,
        };
        // Each client URL has its own limit, as etcd's `LimitListener`s; the metrics URLs none,
        // so /health still answers a prober while clients hold every permit.
        let limit = client_connection_limit()?.min(tokio::sync::Semaphore::MAX_PERMITS);
        for url in &config.listen_client_urls {
            let addr = resolve(url).await?;
            let stop = shutdown.clone();
            let incoming = crate::net::bind(addr)
                .with_context(|| format!("cannot listen for clients on {url} ({addr})"))?;
            let permits = Arc::new(tokio::sync::Semaphore::new(limit));
            let incoming = crate::net::Listener::limited(incoming, permits);
            let stop = async move { stop.wait().await };
            let server = match (&tls.client, url.tls) {
                (Some(t), true) => tokio::spawn(crate::net::serve_service(
                    crate::tls::incoming::incoming(incoming, t.clone(), "client", false),
                    client_service.clone(),
                    client_options,
                    stop,
                )),
                _ => tokio::spawn(crate::net::serve_service(
                    incoming.into_stream(),
                    client_service.clone(),
                    client_options,
                    stop,
                )),
            };
            if url.tls {
                tracing::info!(address = %addr, "serving client traffic securely");
            } else {
                tracing::info!(
                    address = %addr,
                    "serving client traffic insecurely; this is strongly discouraged!"
                );
            }
            servers.push(server);
        }
        // `--listen-metrics-urls`: /metrics and /health (and /version) alone, for monitoring
        // that should not reach the client port.
        for url in &config.compat.listen_metrics_urls {
            let addr = resolve(url).await?;
            let stop = shutdown.clone();
            let incoming = crate::net::bind(addr)
                .with_context(|| format!("cannot listen for metrics on {url} ({addr})"))?;
            let incoming = crate::net::Listener::from(incoming);
            let stop = async move { stop.wait().await };
            let metrics_routes = tonic::service::Routes::from(crate::http::router(core.clone()));
            let server = match (&tls.client, url.tls) {
                (None, true) => bail!("no client TLS for the metrics URL {url}"),
                (Some(t), true) => tokio::spawn(crate::net::serve_clients(
                    crate::tls::incoming::incoming(incoming, t.clone(), "metrics", false),
                    metrics_routes,
                    client_options,
                    stop,
                )),
                _ => tokio::spawn(crate::net::serve_clients(
                    incoming.into_stream(),
                    metrics_routes,
                    client_options,
                    stop,
                )),
            };
            tracing::info!(%url, %addr, "serving metrics and health");
            servers.push(server);
        }
        tracing::info!("ready to serve client requests");
        crate::notify::notify("READY=1");
        let fatal = tokio::select! {
            _ = shutdown.wait() => None,
            result = &mut done => Some(result),
        };
        if let Some(result) = fatal {
            trigger.fire();
            if core.removed() {
                tracing::warn!(
                    "the member has been permanently removed from the cluster; the data-dir used \
                     by this member must be removed: stopping"
                );
                return Ok(());
            }
            return match result {
                Ok(Err(e)) => Err(e).context("the storage core stopped"),
                _ => bail!("the storage core stopped"),
            };
        }
        crate::notify::notify("STOPPING=1");
        compactor.abort();
        if let Some(task) = corruption {
            task.abort();
        }
        // Watch and keep-alive streams have ended; connections close as their calls finish.
        let closing = futures::future::join_all(servers);
        if tokio::time::timeout(STOP_CONNECTIONS, closing)
            .await
            .is_err()
        {
            tracing::warn!(
                "client connections still open after {STOP_CONNECTIONS:?}: dropping them"
            );
        }
        core.stop(STOP_CORE).await;
        peer_stop.fire();
        let _ =
            tokio::time::timeout(STOP_CONNECTIONS, futures::future::join_all(peer_servers)).await;
        match tokio::time::timeout(STOP_CORE, &mut done).await {
            Ok(Ok(Ok(()))) => {
                tracing::info!("stopped");
                Ok(())
            }
            Ok(Ok(Err(e))) => Err(e).context("stopping the storage core"),
            Ok(Err(_)) => bail!("the storage core ended without a result"),
            Err(_) => bail!("the storage core did not stop within {STOP_CORE:?}"),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_quotas_are_warned_about() {
        assert!(quota_warnings(2 << 30, Some(24 << 30)).is_empty());
        let w = quota_warnings(9 << 30, Some(24 << 30));
        assert_eq!(w.len(), 1);
        assert!(w[0].starts_with("quota exceeds the maximum value"));
        let w = quota_warnings(4 << 30, Some(2 << 30));
        assert_eq!(w.len(), 1);
        assert!(w[0].starts_with("quota exceeds the machine's memory"));
        assert_eq!(quota_warnings(16 << 30, Some(8 << 30)).len(), 2);
    }

    #[test]
    fn modes_print_as_go_prints_them() {
        assert_eq!(go_mode(0o755, true), "drwxr-xr-x");
        assert_eq!(go_mode(0o700, false), "-rwx------");
        assert_eq!(go_mode(0o640, false), "-rw-r-----");
    }
}
