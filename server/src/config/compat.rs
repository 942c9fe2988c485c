//! The rest of etcd 3.4's flags (`etcd --help` lists 80), so that a command line, an
//! environment of `ETCD_*` variables or a configuration file written for etcd starts Keel.
//! Each flag is one of:
//!
//! - **implemented**: `--wal-dir`, `--pre-vote`, `--client-cert-allowed-hostname` (in
//!   `config.rs`, with the TLS settings), `--max-concurrent-streams`, the
//!   `--grpc-keepalive-*` flags, `--listen-metrics-urls`, `--logger`, `--log-outputs`, `--debug`,
//!   `--enable-grpc-gateway`, `--cors`, `--host-whitelist`, `--discovery-srv(-name)`,
//!   `--discovery`, `--discovery-proxy`, `--discovery-fallback` (`exit`; with `proxy`, the
//!   default, a full cluster also stops the start: Keel has no v2 proxy to become);
//! - **refused** at start with the reason, when it asks for something Keel does not serve: the
//!   v2 API (`--enable-v2`, `--experimental-enable-v2v3`), the v2 proxy (`--proxy`), Go's
//!   profiler (`--enable-pprof`), `--unsafe-no-fsync`;
//! - **accepted with a notice** when it tunes a part of etcd that Keel does differently (bbolt's
//!   batching and freelist, file retention, compaction batches, lease checkpoints, metrics
//!   detail, capnslog package levels): the member starts and logs what the flag would have done
//!   and what Keel does instead. Left at etcd's default, such a flag says nothing.
//!
//! `--config-file` reads etcd's YAML configuration file (`config::file`).

use std::path::PathBuf;
use std::time::Duration;

use super::{ConfigError, Url, err, parse_go_duration, parse_urls};

/// Flags of etcd 3.4 not declared in `Flags` itself, flattened into it.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct CompatFlags {
    /// Path to the server configuration file (etcd's YAML). The command line and the
    /// environment are then ignored, as etcd does.
    #[arg(long, env = "ETCD_CONFIG_FILE", value_parser = crate::config::path_flag)]
    pub config_file: Option<PathBuf>,
    /// Path to the dedicated wal directory.
    #[arg(long, env = "ETCD_WAL_DIR", value_parser = crate::config::path_flag)]
    pub wal_dir: Option<PathBuf>,
    /// Maximum number of snapshot files to retain (0 is unlimited).
    #[arg(long, env = "ETCD_MAX_SNAPSHOTS", default_value_t = 5)]
    pub max_snapshots: u64,
    /// Maximum number of wal files to retain (0 is unlimited).
    #[arg(long, env = "ETCD_MAX_WALS", default_value_t = 5)]
    pub max_wals: u64,
    /// BackendBatchInterval is the maximum time before commit the backend transaction.
    #[arg(long, env = "ETCD_BACKEND_BATCH_INTERVAL", default_value = "")]
    pub backend_batch_interval: String,
    /// BackendBatchLimit is the maximum operations before commit the backend transaction.
    #[arg(long, env = "ETCD_BACKEND_BATCH_LIMIT", default_value_t = 0)]
    pub backend_batch_limit: u64,
    /// Maximum concurrent streams that each client can open at a time.
    #[arg(long, env = "ETCD_MAX_CONCURRENT_STREAMS", default_value_t = u32::MAX)]
    pub max_concurrent_streams: u32,
    /// Minimum duration interval that a client should wait before pinging server.
    #[arg(long, env = "ETCD_GRPC_KEEPALIVE_MIN_TIME", default_value = "5s")]
    pub grpc_keepalive_min_time: String,
    /// Frequency duration of server-to-client ping to check if a connection is alive (0 to
    /// disable).
    #[arg(long, env = "ETCD_GRPC_KEEPALIVE_INTERVAL", default_value = "2h")]
    pub grpc_keepalive_interval: String,
    /// Additional duration of wait before closing a non-responsive connection (0 to disable).
    #[arg(long, env = "ETCD_GRPC_KEEPALIVE_TIMEOUT", default_value = "20s")]
    pub grpc_keepalive_timeout: String,
    /// List of URLs to listen on for the metrics and health endpoints.
    #[arg(long, env = "ETCD_LISTEN_METRICS_URLS", default_value = "")]
    pub listen_metrics_urls: String,
    /// Allowed TLS hostname for client cert authentication.
    #[arg(long, env = "ETCD_CLIENT_CERT_ALLOWED_HOSTNAME", default_value = "")]
    pub client_cert_allowed_hostname: String,
    /// Skip verification of SAN field in client certificate for peer connections.
    #[arg(long, env = "ETCD_EXPERIMENTAL_PEER_SKIP_CLIENT_SAN_VERIFICATION", default_value_t = false, num_args = 0..=1, default_missing_value = "true", value_parser = crate::config::go_bool, action = clap::ArgAction::Set)]
    pub experimental_peer_skip_client_san_verification: bool,
    /// Comma-separated whitelist of origins for CORS (empty or * means allow all).
    #[arg(long, env = "ETCD_CORS", default_value = "*")]
    pub cors: String,
    /// Acceptable hostnames from HTTP client requests, if server is not secure (empty or *
    /// means allow all).
    #[arg(long, env = "ETCD_HOST_WHITELIST", default_value = "*")]
    pub host_whitelist: String,
    /// Discovery URL used to bootstrap the cluster.
    #[arg(long, env = "ETCD_DISCOVERY", default_value = "")]
    pub discovery: String,
    /// Expected behavior ('exit' or 'proxy') when discovery services fails.
    #[arg(long, env = "ETCD_DISCOVERY_FALLBACK", default_value = "proxy", value_parser = ["exit", "proxy"])]
    pub discovery_fallback: String,
    /// HTTP proxy to use for traffic to discovery service.
    #[arg(long, env = "ETCD_DISCOVERY_PROXY", default_value = "")]
    pub discovery_proxy: String,
    /// DNS srv domain used to bootstrap the cluster.
    #[arg(long, env = "ETCD_DISCOVERY_SRV", default_value = "")]
    pub discovery_srv: String,
    /// Suffix to the dns srv name queried when bootstrapping.
    #[arg(long, env = "ETCD_DISCOVERY_SRV_NAME", default_value = "")]
    pub discovery_srv_name: String,
    /// Proxy mode setting ('off', 'readonly' or 'on').
    #[arg(long, env = "ETCD_PROXY", default_value = "off", value_parser = ["off", "readonly", "on"])]
    pub proxy: String,
    /// Time (in milliseconds) an endpoint will be held in a failed state (v2 proxy).
    #[arg(long, env = "ETCD_PROXY_FAILURE_WAIT", default_value_t = 5000)]
    pub proxy_failure_wait: u64,
    /// Time (in milliseconds) of the endpoints refresh interval (v2 proxy).
    #[arg(long, env = "ETCD_PROXY_REFRESH_INTERVAL", default_value_t = 30000)]
    pub proxy_refresh_interval: u64,
    /// Time (in milliseconds) for a dial to timeout (v2 proxy).
    #[arg(long, env = "ETCD_PROXY_DIAL_TIMEOUT", default_value_t = 1000)]
    pub proxy_dial_timeout: u64,
    /// Time (in milliseconds) for a write to timeout (v2 proxy).
    #[arg(long, env = "ETCD_PROXY_WRITE_TIMEOUT", default_value_t = 5000)]
    pub proxy_write_timeout: u64,
    /// Time (in milliseconds) for a read to timeout (v2 proxy).
    #[arg(long, env = "ETCD_PROXY_READ_TIMEOUT", default_value_t = 0)]
    pub proxy_read_timeout: u64,
    /// Accept etcd V2 client requests (Keel serves only v3).
    #[arg(long, env = "ETCD_ENABLE_V2", default_value_t = false, num_args = 0..=1, default_missing_value = "true", value_parser = crate::config::go_bool, action = clap::ArgAction::Set)]
    pub enable_v2: bool,
    /// Serve v2 requests through the v3 backend under a given prefix (Keel serves only v3).
    #[arg(long, env = "ETCD_EXPERIMENTAL_ENABLE_V2V3", default_value = "")]
    pub experimental_enable_v2v3: String,
    /// Enable runtime profiling data via HTTP server (Go's pprof; Keel has none).
    #[arg(long, env = "ETCD_ENABLE_PPROF", default_value_t = false, num_args = 0..=1, default_missing_value = "true", value_parser = crate::config::go_bool, action = clap::ArgAction::Set)]
    pub enable_pprof: bool,
    /// Enable to run an additional Raft election phase (Keel's default: true; etcd 3.4's:
    /// false).
    #[arg(long, env = "ETCD_PRE_VOTE", default_value_t = true, num_args = 0..=1, default_missing_value = "true", value_parser = crate::config::go_bool, action = clap::ArgAction::Set)]
    pub pre_vote: bool,
    /// Whether to fast-forward initial election ticks on boot for faster election.
    #[arg(long, env = "ETCD_INITIAL_ELECTION_TICK_ADVANCE", default_value_t = true, num_args = 0..=1, default_missing_value = "true", value_parser = crate::config::go_bool, action = clap::ArgAction::Set)]
    pub initial_election_tick_advance: bool,
    /// Enables the leader to persist leases' remaining TTLs (Keel always does).
    #[arg(long, env = "ETCD_EXPERIMENTAL_ENABLE_LEASE_CHECKPOINT", default_value_t = false, num_args = 0..=1, default_missing_value = "true", value_parser = crate::config::go_bool, action = clap::ArgAction::Set)]
    pub experimental_enable_lease_checkpoint: bool,
    /// Maximum revisions deleted in each compaction batch.
    #[arg(
        long,
        env = "ETCD_EXPERIMENTAL_COMPACTION_BATCH_LIMIT",
        default_value_t = 1000
    )]
    pub experimental_compaction_batch_limit: u64,
    /// Warning is generated if requests take more than this duration.
    #[arg(
        long,
        env = "ETCD_EXPERIMENTAL_WARNING_APPLY_DURATION",
        default_value = "100ms"
    )]
    pub experimental_warning_apply_duration: String,
    /// The type of freelist the bbolt backend uses (Keel's backend is not bbolt).
    #[arg(long, env = "ETCD_EXPERIMENTAL_BACKEND_BBOLT_FREELIST_TYPE", default_value = "array", value_parser = ["array", "map"])]
    pub experimental_backend_bbolt_freelist_type: String,
    /// Set level of detail for exported metrics, specify 'extensive' to include histogram
    /// metrics.
    #[arg(long, env = "ETCD_METRICS", default_value = "basic", value_parser = ["basic", "extensive"])]
    pub metrics: String,
    /// Specify 'zap' for structured logging (JSON lines) or 'capnslog'.
    #[arg(long, env = "ETCD_LOGGER", default_value = "capnslog", value_parser = ["capnslog", "zap"])]
    pub logger: String,
    /// 'default', 'stderr', 'stdout', or a comma-separated list of targets (files too).
    #[arg(long, env = "ETCD_LOG_OUTPUTS", default_value = "default")]
    pub log_outputs: String,
    /// A log level for each etcd package (capnslog's; Keel has one level, --log-level).
    #[arg(long, env = "ETCD_LOG_PACKAGE_LEVELS", default_value = "")]
    pub log_package_levels: String,
    /// Enable gRPC gateway.
    #[arg(long, env = "ETCD_ENABLE_GRPC_GATEWAY", default_value_t = true, num_args = 0..=1, default_missing_value = "true", value_parser = crate::config::go_bool, action = clap::ArgAction::Set)]
    pub enable_grpc_gateway: bool,
    /// Disables fsync, unsafe, will cause data loss (refused: Keel always syncs its WAL).
    #[arg(long, env = "ETCD_UNSAFE_NO_FSYNC", default_value_t = false, num_args = 0..=1, default_missing_value = "true", value_parser = crate::config::go_bool, action = clap::ArgAction::Set)]
    pub unsafe_no_fsync: bool,
    /// Persist lease checkpoints (Keel always does).
    #[arg(long, env = "ETCD_EXPERIMENTAL_ENABLE_LEASE_CHECKPOINT_PERSIST", default_value_t = false, num_args = 0..=1, default_missing_value = "true", value_parser = crate::config::go_bool, action = clap::ArgAction::Set)]
    pub experimental_enable_lease_checkpoint_persist: bool,
    /// Deprecated: use --log-outputs (etcd 3.4 still reads it).
    #[arg(long, env = "ETCD_LOG_OUTPUT", default_value = "")]
    pub log_output: String,
    /// Keys of a configuration file that Keel does not know, ignored as etcd ignores them.
    #[arg(skip)]
    pub ignored_config_keys: Vec<String>,
    /// Enable debug-level logging (as --log-level=debug).
    #[arg(long, env = "ETCD_DEBUG", default_value_t = false, num_args = 0..=1, default_missing_value = "true", value_parser = crate::config::go_bool, action = clap::ArgAction::Set)]
    pub debug: bool,
}

/// Where log lines go (`--log-outputs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogOutput {
    Stderr,
    Stdout,
    File(PathBuf),
}

/// What the flags of this module configure.
#[derive(Debug, Clone, PartialEq)]
pub struct Compat {
    /// `--wal-dir`: the WAL's own directory (default: `<data-dir>/member/wal`).
    pub wal_dir: Option<PathBuf>,
    /// `--experimental-peer-skip-client-san-verification`: peers' client certificates need
    /// not name the address they connect from.
    pub peer_skip_client_san_verification: bool,
    pub pre_vote: bool,
    pub max_concurrent_streams: u32,
    /// Zero: no server pings.
    pub keepalive_interval: Duration,
    /// Zero: no deadline for a ping's answer.
    pub keepalive_timeout: Duration,
    pub listen_metrics_urls: Vec<Url>,
    /// `--logger=zap`: JSON lines with etcd's field names.
    pub json_logs: bool,
    pub log_outputs: Vec<LogOutput>,
    /// `--debug`.
    pub debug: bool,
    /// `--discovery`, `--discovery-proxy` (empty: none).
    pub discovery: String,
    pub discovery_proxy: String,
    /// `--discovery-srv` and `--discovery-srv-name` (empty: none).
    pub discovery_srv: String,
    pub discovery_srv_name: String,
    /// `--cors`, `--host-whitelist`: comma-separated lists, `*` or empty for all.
    pub cors: String,
    pub host_whitelist: String,
    /// `--enable-grpc-gateway`: the JSON gateway under `/v3/` on the client URLs.
    pub enable_grpc_gateway: bool,
    /// What accepted flags that Keel handles differently would have done; logged at start.
    pub notices: Vec<String>,
}

fn duration(flag: &'static str, value: &str) -> Result<Duration, ConfigError> {
    parse_go_duration(value).ok_or_else(|| err(flag, format!("{value:?} is not a duration")))
}

impl CompatFlags {
    /// Validates the flags: refused ones give the reason, accepted ones that Keel handles
    /// differently add a notice when they are not at etcd's default.
    pub fn resolve(&self) -> Result<Compat, ConfigError> {
        if self.enable_v2 {
            return Err(err(
                "enable-v2",
                "Keel serves only etcd's v3 API (the v2 API is deprecated since etcd 3.4)",
            ));
        }
        if !self.experimental_enable_v2v3.is_empty() {
            return Err(err(
                "experimental-enable-v2v3",
                "Keel serves only etcd's v3 API, not v2 requests over it",
            ));
        }
        if self.proxy != "off" {
            return Err(err(
                "proxy",
                "Keel has no v2 proxy mode; run a member, or an L4 proxy in front of members",
            ));
        }
        if self.unsafe_no_fsync {
            return Err(err(
                "unsafe-no-fsync",
                "Keel acknowledges a write only once its WAL record is synced; it has no mode \
                 that loses acknowledged writes",
            ));
        }
        if self.enable_pprof {
            return Err(err(
                "enable-pprof",
                "pprof is Go's profiler and Keel is not a Go program; profile it with perf",
            ));
        }
        // etcd 3.4 parses each origin as a URL with a port (`flags.UniqueURLs`), and a request's
        // `Origin` must then equal it.
        for origin in self.cors.split(',').map(str::trim) {
            let has_port = origin
                .split_once("://")
                .and_then(|(_, host)| host.trim_end_matches('/').rsplit_once(':'))
                .is_some_and(|(_, port)| {
                    !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit())
                });
            if !matches!(origin, "" | "*") && !has_port {
                return Err(err(
                    "cors",
                    format!("URL address does not have the form \"host:port\": {origin}"),
                ));
            }
        }
        let keepalive_min = duration("grpc-keepalive-min-time", &self.grpc_keepalive_min_time)?;
        let keepalive_interval =
            duration("grpc-keepalive-interval", &self.grpc_keepalive_interval)?;
        let keepalive_timeout = duration("grpc-keepalive-timeout", &self.grpc_keepalive_timeout)?;
        if self.max_concurrent_streams == 0 {
            return Err(err("max-concurrent-streams", "must be positive"));
        }
        let listen_metrics_urls = if self.listen_metrics_urls.is_empty() {
            Vec::new()
        } else {
            parse_urls("listen-metrics-urls", &self.listen_metrics_urls)?
        };
        let mut log_outputs = Vec::new();
        // etcd 3.4's deprecated --log-output counts when --log-outputs is left at its default.
        let targets = if self.log_outputs == "default" && !self.log_output.is_empty() {
            &self.log_output
        } else {
            &self.log_outputs
        };
        for target in targets.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            log_outputs.push(match target {
                // etcd's "default" is stderr, or journald under systemd; the journal takes a
                // service's stderr anyway.
                "default" | "stderr" => LogOutput::Stderr,
                "stdout" => LogOutput::Stdout,
                path => LogOutput::File(PathBuf::from(path)),
            });
        }
        if log_outputs.is_empty() {
            log_outputs.push(LogOutput::Stderr);
        }
        let wal_dir = match &super::set(self.wal_dir.clone()) {
            Some(dir) => Some(
                std::path::absolute(dir)
                    .map_err(|e| err("wal-dir", format!("{}: {e}", dir.display())))?,
            ),
            None => None,
        };
        let mut notices = Vec::new();
        if let Some(path) = &super::set(self.config_file.clone()) {
            // etcd 3.4's words.
            notices.push(format!(
                "loaded server configuration, other configuration command line flags and \
                 environment variables will be ignored if provided (path {})",
                path.display()
            ));
        }
        if !self.ignored_config_keys.is_empty() {
            notices.push(format!(
                "the configuration file's keys {} are not etcd 3.4's or not Keel's: ignored, as \
                 etcd ignores unknown keys",
                self.ignored_config_keys.join(", ")
            ));
        }
        let mut notice = |flag: &str, text: &str| {
            notices.push(format!(
                "--{flag} is accepted for etcd compatibility: {text}"
            ));
        };
        if !self.discovery_srv_name.is_empty() && self.discovery_srv.is_empty() {
            notice(
                "discovery-srv-name",
                "it only names the SRV service of --discovery-srv, which is not set",
            );
        }
        if keepalive_min != Duration::from_secs(5) {
            notice(
                "grpc-keepalive-min-time",
                "Keel does not police how often clients ping; HTTP/2 pings are answered at any rate",
            );
        }
        if !self.backend_batch_interval.is_empty() || self.backend_batch_limit != 0 {
            notice(
                "backend-batch-interval/--backend-batch-limit",
                "Keel's backend is written at checkpoints after the WAL made each entry durable, \
                 not in bbolt batches",
            );
        }
        if self.max_snapshots != 5 || self.max_wals != 5 {
            notice(
                "max-snapshots/--max-wals",
                "Keel recycles WAL segments once the backend has checkpointed them and keeps no \
                 snapshot files beyond the one being sent or received",
            );
        }
        if self.experimental_compaction_batch_limit != 1000 {
            notice(
                "experimental-compaction-batch-limit",
                "Keel compacts in its own bounded steps",
            );
        }
        if !self.log_output.is_empty() {
            notice("log-output", "deprecated in etcd 3.4: use --log-outputs");
        }
        if self.experimental_enable_lease_checkpoint_persist {
            notice(
                "experimental-enable-lease-checkpoint-persist",
                "Keel always persists lease checkpoints",
            );
        }
        if self.experimental_enable_lease_checkpoint {
            notice(
                "experimental-enable-lease-checkpoint",
                "Keel always checkpoints leases' remaining TTLs",
            );
        }
        if self.experimental_warning_apply_duration != "100ms" {
            duration(
                "experimental-warning-apply-duration",
                &self.experimental_warning_apply_duration,
            )?;
            notice(
                "experimental-warning-apply-duration",
                "Keel reports slow requests through its latency metrics, not per request",
            );
        }
        if self.experimental_backend_bbolt_freelist_type != "array" {
            notice(
                "experimental-backend-bbolt-freelist-type",
                "Keel's backend is not bbolt and has one freelist format",
            );
        }
        if self.metrics != "basic" {
            notice(
                "metrics",
                "Keel exports the same metrics, histograms included, at every level",
            );
        }
        if !self.log_package_levels.is_empty() {
            notice("log-package-levels", "Keel has one log level, --log-level");
        }
        if !self.initial_election_tick_advance {
            notice(
                "initial-election-tick-advance",
                "Keel does not fast-forward the initial election ticks, with or without it",
            );
        }
        Ok(Compat {
            wal_dir,
            pre_vote: self.pre_vote,
            max_concurrent_streams: self.max_concurrent_streams,
            keepalive_interval,
            keepalive_timeout,
            listen_metrics_urls,
            json_logs: self.logger == "zap",
            log_outputs,
            debug: self.debug,
            enable_grpc_gateway: self.enable_grpc_gateway,
            discovery: self.discovery.trim().to_string(),
            discovery_proxy: self.discovery_proxy.trim().to_string(),
            discovery_srv: self.discovery_srv.trim().to_string(),
            discovery_srv_name: self.discovery_srv_name.trim().to_string(),
            cors: self.cors.clone(),
            host_whitelist: self.host_whitelist.clone(),
            peer_skip_client_san_verification: self.experimental_peer_skip_client_san_verification,
            notices,
        })
    }
}
