//! Configuration: etcd's flag names, defaults and `ETCD_*` environment variables (etcd 3.4), plus
//! Keel's own flags (`KEEL_*` variables): `--storage-core`, `--storage-core-spin`, `--net-threads`,
//! `--max-watchers-per-stream`, `--max-watchers`.
//!
//! Parsing is two steps: clap reads flags and environment variables into [`Flags`] (an unknown or
//! malformed flag is a usage error: message and exit code 2, as etcd), then [`Flags::validate`]
//! checks values clap cannot (URLs, the initial cluster, retention) and builds the [`Config`] the
//! server uses.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::raft::node::MAX_REQUEST_BYTES_LIMIT;

pub mod compat;

/// etcd's default `--initial-cluster`.
const DEFAULT_INITIAL_CLUSTER: &str = "default=http://localhost:2380";
pub mod file;

/// etcd's default backend quota (2 GiB), used when `--quota-backend-bytes` is 0.
pub const DEFAULT_QUOTA_BYTES: u64 = 2 << 30;
/// etcd's longest election timeout (50 s).
pub const MAX_ELECTION_TIMEOUT_MS: u64 = 50_000;

/// Flags as given, before validation. Each has etcd's name and environment variable.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "keel",
    about = "Keel: an etcd v3-compatible, replicated key-value store",
    version = concat!(env!("CARGO_PKG_VERSION"), " (etcd API 3.4)"),
)]
pub struct Flags {
    /// Human-readable name for this member.
    #[arg(long, env = "ETCD_NAME", default_value = "default")]
    pub name: String,
    /// Path to the data directory (default: `<name>.keel`).
    #[arg(long, env = "ETCD_DATA_DIR", value_parser = crate::config::path_flag)]
    pub data_dir: Option<PathBuf>,
    /// List of URLs to listen on for client traffic.
    #[arg(
        long,
        env = "ETCD_LISTEN_CLIENT_URLS",
        default_value = "http://localhost:2379"
    )]
    pub listen_client_urls: String,
    /// List of this member's client URLs to advertise to the public.
    #[arg(
        long,
        env = "ETCD_ADVERTISE_CLIENT_URLS",
        default_value = "http://localhost:2379"
    )]
    pub advertise_client_urls: String,
    /// List of URLs to listen on for peer traffic.
    #[arg(
        long,
        env = "ETCD_LISTEN_PEER_URLS",
        default_value = "http://localhost:2380"
    )]
    pub listen_peer_urls: String,
    /// List of this member's peer URLs to advertise to the rest of the cluster.
    #[arg(
        long,
        env = "ETCD_INITIAL_ADVERTISE_PEER_URLS",
        default_value = "http://localhost:2380"
    )]
    pub initial_advertise_peer_urls: String,
    /// Initial cluster configuration for bootstrapping (`name=url,...`).
    #[arg(
        long,
        env = "ETCD_INITIAL_CLUSTER",
        default_value = DEFAULT_INITIAL_CLUSTER
    )]
    pub initial_cluster: String,
    /// Initial cluster state ('new' or 'existing').
    #[arg(long, env = "ETCD_INITIAL_CLUSTER_STATE", default_value = "new", value_parser = ["new", "existing"])]
    pub initial_cluster_state: String,
    /// Initial cluster token for the cluster during bootstrap.
    #[arg(
        long,
        env = "ETCD_INITIAL_CLUSTER_TOKEN",
        default_value = "etcd-cluster"
    )]
    pub initial_cluster_token: String,
    /// Reject reconfiguration requests that would cause quorum loss.
    #[arg(
        long,
        env = "ETCD_STRICT_RECONFIG_CHECK",
        default_value_t = true,
        num_args = 0..=1,
        default_missing_value = "true", value_parser = crate::config::go_bool,
        action = clap::ArgAction::Set
    )]
    pub strict_reconfig_check: bool,
    /// Number of committed transactions to trigger a snapshot to disk.
    #[arg(long, env = "ETCD_SNAPSHOT_COUNT", default_value_t = 100_000)]
    pub snapshot_count: u64,
    /// Number of entries kept in the raft log after a compaction, for slow followers to catch
    /// up from (etcd 3.5's flag).
    #[arg(
        long,
        env = "ETCD_EXPERIMENTAL_SNAPSHOT_CATCHUP_ENTRIES",
        default_value_t = 5000
    )]
    pub experimental_snapshot_catchup_entries: u64,
    /// Time (in milliseconds) of a heartbeat interval.
    #[arg(long, env = "ETCD_HEARTBEAT_INTERVAL", default_value_t = 100)]
    pub heartbeat_interval: u64,
    /// Time (in milliseconds) for an election to timeout.
    #[arg(long, env = "ETCD_ELECTION_TIMEOUT", default_value_t = 1000)]
    pub election_timeout: u64,
    /// Raise alarms when backend size exceeds the given quota (0 defaults to 2 GiB).
    #[arg(long, env = "ETCD_QUOTA_BACKEND_BYTES", default_value_t = 0)]
    pub quota_backend_bytes: u64,
    /// Maximum client request size in bytes the server will accept.
    #[arg(long, env = "ETCD_MAX_REQUEST_BYTES", default_value_t = 1_572_864)]
    pub max_request_bytes: u32,
    /// Maximum number of operations permitted in a transaction.
    #[arg(long, env = "ETCD_MAX_TXN_OPS", default_value_t = 128)]
    pub max_txn_ops: u32,
    /// Interpret 'auto-compaction-retention' one of: periodic|revision.
    #[arg(long, env = "ETCD_AUTO_COMPACTION_MODE", default_value = "periodic", value_parser = ["periodic", "revision"])]
    pub auto_compaction_mode: String,
    /// Auto compaction retention length. 0 means disable auto compaction.
    #[arg(long, env = "ETCD_AUTO_COMPACTION_RETENTION", default_value = "0")]
    pub auto_compaction_retention: String,
    /// Configures log level. Only supports debug, info, warn, error, panic, or fatal.
    #[arg(long, env = "ETCD_LOG_LEVEL", default_value = "info", value_parser = ["debug", "info", "warn", "error", "panic", "fatal"])]
    pub log_level: String,
    /// Interval at which the leader records the leases' remaining TTLs, so that they survive a
    /// restart (etcd 3.5's flag; Keel always checkpoints).
    #[arg(
        long,
        env = "ETCD_EXPERIMENTAL_LEASE_CHECKPOINT_INTERVAL",
        default_value = "5m"
    )]
    pub experimental_lease_checkpoint_interval: String,
    /// Force to create a new one member cluster.
    #[arg(
        long,
        env = "ETCD_FORCE_NEW_CLUSTER",
        default_value_t = false,
        num_args = 0..=1,
        default_missing_value = "true", value_parser = crate::config::go_bool,
        action = clap::ArgAction::Set
    )]
    pub force_new_cluster: bool,
    /// Enable to check data corruption before serving any client/peer traffic.
    #[arg(
        long,
        env = "ETCD_EXPERIMENTAL_INITIAL_CORRUPT_CHECK",
        default_value_t = false,
        num_args = 0..=1,
        default_missing_value = "true", value_parser = crate::config::go_bool,
        action = clap::ArgAction::Set
    )]
    pub experimental_initial_corrupt_check: bool,
    /// Duration of time between cluster corruption check passes.
    #[arg(
        long,
        env = "ETCD_EXPERIMENTAL_CORRUPT_CHECK_TIME",
        default_value = "0s"
    )]
    pub experimental_corrupt_check_time: String,
    /// Interval between progress notifications to watchers that asked for them.
    #[arg(
        long,
        env = "ETCD_EXPERIMENTAL_WATCH_PROGRESS_NOTIFY_INTERVAL",
        default_value = "10m"
    )]
    pub experimental_watch_progress_notify_interval: String,
    /// Path to the client server TLS cert file.
    #[arg(long, env = "ETCD_CERT_FILE", value_parser = crate::config::path_flag)]
    pub cert_file: Option<PathBuf>,
    /// Path to the client server TLS key file.
    #[arg(long, env = "ETCD_KEY_FILE", value_parser = crate::config::path_flag)]
    pub key_file: Option<PathBuf>,
    /// Enable client cert authentication.
    #[arg(
        long,
        env = "ETCD_CLIENT_CERT_AUTH",
        default_value_t = false,
        num_args = 0..=1,
        default_missing_value = "true", value_parser = crate::config::go_bool,
        action = clap::ArgAction::Set
    )]
    pub client_cert_auth: bool,
    /// Path to the client certificate revocation list file.
    #[arg(long, env = "ETCD_CLIENT_CRL_FILE", value_parser = crate::config::path_flag)]
    pub client_crl_file: Option<PathBuf>,
    /// Path to the client server TLS trusted CA cert file.
    #[arg(long, env = "ETCD_TRUSTED_CA_FILE", value_parser = crate::config::path_flag)]
    pub trusted_ca_file: Option<PathBuf>,
    /// Client TLS using generated certificates.
    #[arg(
        long,
        env = "ETCD_AUTO_TLS",
        default_value_t = false,
        num_args = 0..=1,
        default_missing_value = "true", value_parser = crate::config::go_bool,
        action = clap::ArgAction::Set
    )]
    pub auto_tls: bool,
    /// Path to the peer server TLS cert file.
    #[arg(long, env = "ETCD_PEER_CERT_FILE", value_parser = crate::config::path_flag)]
    pub peer_cert_file: Option<PathBuf>,
    /// Path to the peer server TLS key file.
    #[arg(long, env = "ETCD_PEER_KEY_FILE", value_parser = crate::config::path_flag)]
    pub peer_key_file: Option<PathBuf>,
    /// Enable peer client cert authentication.
    #[arg(
        long,
        env = "ETCD_PEER_CLIENT_CERT_AUTH",
        default_value_t = false,
        num_args = 0..=1,
        default_missing_value = "true", value_parser = crate::config::go_bool,
        action = clap::ArgAction::Set
    )]
    pub peer_client_cert_auth: bool,
    /// Path to the peer server TLS trusted CA file.
    #[arg(long, env = "ETCD_PEER_TRUSTED_CA_FILE", value_parser = crate::config::path_flag)]
    pub peer_trusted_ca_file: Option<PathBuf>,
    /// Allowed CN for inter peer authentication.
    #[arg(long, env = "ETCD_PEER_CERT_ALLOWED_CN")]
    pub peer_cert_allowed_cn: Option<String>,
    /// Allowed TLS hostname for inter peer authentication.
    #[arg(long, env = "ETCD_PEER_CERT_ALLOWED_HOSTNAME")]
    pub peer_cert_allowed_hostname: Option<String>,
    /// Peer TLS using self-generated certificates if --peer-key-file and --peer-cert-file are not provided.
    #[arg(
        long,
        env = "ETCD_PEER_AUTO_TLS",
        default_value_t = false,
        num_args = 0..=1,
        default_missing_value = "true", value_parser = crate::config::go_bool,
        action = clap::ArgAction::Set
    )]
    pub peer_auto_tls: bool,
    /// Path to the peer certificate revocation list file.
    #[arg(long, env = "ETCD_PEER_CRL_FILE", value_parser = crate::config::path_flag)]
    pub peer_crl_file: Option<PathBuf>,
    /// Comma-separated list of supported TLS cipher suites between client/server and peers
    /// (empty will be auto-populated by Go; here: rustls's defaults).
    #[arg(long, env = "ETCD_CIPHER_SUITES", default_value = "")]
    pub cipher_suites: String,
    /// Specify auth token type and options, e.g. `simple` or
    /// `jwt,pub-key=PATH,priv-key=PATH,sign-method=RS256,ttl=5m`.
    #[arg(long, env = "ETCD_AUTH_TOKEN", default_value = "simple")]
    pub auth_token: String,
    /// The lifetime in seconds of the auth token.
    #[arg(long, env = "ETCD_AUTH_TOKEN_TTL", default_value_t = 300)]
    pub auth_token_ttl: u64,
    /// Specify bcrypt algorithm cost factor for auth password hashing.
    #[arg(long, env = "ETCD_BCRYPT_COST", default_value_t = 10)]
    pub bcrypt_cost: u32,
    /// Watchers one watch stream may hold (Keel's limit; etcd has none).
    #[arg(long, env = "KEEL_MAX_WATCHERS_PER_STREAM", default_value_t = 100_000)]
    pub max_watchers_per_stream: usize,
    /// Watchers the member may hold in all (Keel's limit; etcd has none).
    #[arg(long, env = "KEEL_MAX_WATCHERS", default_value_t = 1_000_000)]
    pub max_watchers: usize,
    /// CPU the storage core (raft, WAL, apply) is pinned to (default: the last CPU).
    #[arg(long, env = "KEEL_STORAGE_CORE")]
    pub storage_core: Option<usize>,
    // Measured on 2026-11-27 (bench/RESULTS.md): one-client puts 1,228–1,319/s at 480–503 µs
    // of server CPU each without polling, 1,161–1,186/s at 800–820 µs with 200 µs; 3–4 µs less
    // per put at 1000 clients without it.
    /// How long the storage core polls for work before it sleeps (a Go duration; 0: never, the
    /// default). Polling can save a wake-up per request on a member that has its CPUs to itself,
    /// at the price of that much CPU after each burst of work.
    #[arg(long, env = "KEEL_STORAGE_CORE_SPIN", default_value = "0s")]
    pub storage_core_spin: String,
    /// Network threads (gRPC, HTTP) (default: one per CPU; the storage core mostly waits on
    /// the disk, so it shares a CPU well).
    #[arg(long, env = "KEEL_NET_THREADS")]
    pub net_threads: Option<usize>,
    /// The rest of etcd 3.4's flags (`compat`).
    #[command(flatten)]
    pub compat: compat::CompatFlags,
}

/// A `http://host:port` or `https://host:port` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    /// `true` for https.
    pub tls: bool,
    /// Host name or address.
    pub host: String,
    /// Port.
    pub port: u16,
}

impl std::fmt::Display for Url {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.tls { "https" } else { "http" };
        write!(f, "{scheme}://{}:{}", self.host, self.port)
    }
}

/// Auto compaction, as etcd: keep a time window, or a number of revisions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AutoCompaction {
    /// Disabled (retention 0).
    Off,
    /// Compact to the revision of `retention` ago, periodically.
    Periodic(Duration),
    /// Keep the last `n` revisions.
    Revision(u64),
}

/// The validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub name: String,
    pub data_dir: PathBuf,
    pub listen_client_urls: Vec<Url>,
    pub advertise_client_urls: Vec<Url>,
    pub listen_peer_urls: Vec<Url>,
    pub initial_advertise_peer_urls: Vec<Url>,
    /// Members of the initial cluster: name and peer URLs (one name may list several URLs).
    pub initial_cluster: Vec<(String, Vec<Url>)>,
    pub initial_cluster_state_new: bool,
    pub initial_cluster_token: String,
    pub strict_reconfig_check: bool,
    pub snapshot_count: u64,
    pub snapshot_catchup_entries: u64,
    pub heartbeat_interval: Duration,
    pub election_timeout: Duration,
    pub quota_backend_bytes: u64,
    pub max_request_bytes: u32,
    pub max_txn_ops: u32,
    pub auto_compaction: AutoCompaction,
    pub log_level: String,
    pub lease_checkpoint_interval: Duration,
    pub watch_progress_notify_interval: Duration,
    pub initial_corrupt_check: bool,
    /// `--force-new-cluster`: a restarting member makes itself a one-member cluster.
    pub force_new_cluster: bool,
    /// Zero: no periodic check.
    pub corrupt_check_time: Duration,
    pub storage_core: Option<usize>,
    pub storage_core_spin: Duration,
    pub net_threads: Option<usize>,
    pub max_watchers_per_stream: usize,
    pub max_watchers: usize,
    /// Client-side TLS (what `https` client URLs serve with).
    pub client_tls: crate::tls::Settings,
    /// Peer-side TLS (what `https` peer URLs serve and dial with).
    pub peer_tls: crate::tls::Settings,
    /// `--auth-token`: simple tokens, or JWT and its keys.
    pub auth_token: crate::auth::jwt::TokenType,
    pub auth_token_ttl: Duration,
    pub bcrypt_cost: u32,
    /// What the rest of etcd's flags configure.
    pub compat: compat::Compat,
}

/// A value clap accepted but Keel cannot use; printed as `invalid value for --flag: why`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid value for --{flag}: {reason}")]
pub struct ConfigError {
    /// The flag (without dashes).
    pub flag: &'static str,
    /// What is wrong.
    pub reason: String,
}

/// The value of `flag`, a Go duration above zero.
fn positive_duration(flag: &'static str, value: &str) -> Result<Duration, ConfigError> {
    parse_go_duration(value)
        .filter(|d| !d.is_zero())
        .ok_or_else(|| err(flag, format!("{value:?} is not a positive duration")))
}

fn err(flag: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        flag,
        reason: reason.into(),
    }
}

/// A boolean flag's value as Go's `strconv.ParseBool` reads it (etcd's flags and `ETCD_*`
/// variables): `1`, `t`, `T`, `TRUE`, `true`, `True`, and their opposites.
pub fn go_bool(s: &str) -> Result<bool, String> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Ok(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Ok(false),
        _ => Err(format!("{s:?} is not a boolean (true or false)")),
    }
}

/// A path flag's value. Unlike clap's own path parser it takes an empty value, which means
/// "not set", as etcd reads `--cert-file=''` or `ETCD_WAL_DIR=` (see [`set`]).
pub fn path_flag(s: &str) -> Result<PathBuf, std::convert::Infallible> {
    Ok(PathBuf::from(s))
}

/// A path flag given a value, or `None` when it is unset or empty.
pub fn set(path: Option<PathBuf>) -> Option<PathBuf> {
    path.filter(|p| !p.as_os_str().is_empty())
}

/// Parses one URL (`http(s)://host:port`, an IPv6 host in brackets).
pub fn parse_url(s: &str) -> Result<Url, String> {
    let (tls, rest) = if let Some(r) = s.strip_prefix("http://") {
        (false, r)
    } else if let Some(r) = s.strip_prefix("https://") {
        (true, r)
    } else {
        return Err(format!("URL scheme must be http or https: {s:?}"));
    };
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() => (h, p),
        _ => return Err(format!("URL must be scheme://host:port: {s:?}")),
    };
    if host.contains('/') || (host.contains(':') && !(host.starts_with('[') && host.ends_with(']')))
    {
        return Err(format!("URL must be scheme://host:port: {s:?}"));
    }
    let port = port
        .parse::<u16>()
        .map_err(|_| format!("invalid port in {s:?}"))?;
    Ok(Url {
        tls,
        host: host.to_string(),
        port,
    })
}

fn parse_urls(flag: &'static str, s: &str) -> Result<Vec<Url>, ConfigError> {
    let urls = s
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(parse_url)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(flag, e))?;
    if urls.is_empty() {
        return Err(err(flag, "at least one URL is required"));
    }
    Ok(urls)
}

/// Parses a Go duration as etcd accepts (`"90s"`, `"1h30m"`, `"500ms"`).
pub fn parse_go_duration(s: &str) -> Option<Duration> {
    let mut total = Duration::ZERO;
    let mut rest = s;
    if rest.is_empty() {
        return None;
    }
    if rest == "0" {
        return Some(Duration::ZERO);
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit() && c != '.')?;
        let number: f64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = match &rest[..unit_len] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        total += Duration::try_from_secs_f64(number * unit).ok()?;
        rest = &rest[unit_len..];
    }
    Some(total)
}

impl Flags {
    /// Checks the values and builds the configuration.
    pub fn validate(self) -> Result<Config, ConfigError> {
        if self.name.is_empty() {
            return Err(err("name", "must not be empty"));
        }
        let data_dir =
            set(self.data_dir).unwrap_or_else(|| PathBuf::from(format!("{}.keel", self.name)));
        // Relative to the working directory at start, as etcd's; logged and used absolute.
        let data_dir = std::path::absolute(&data_dir)
            .map_err(|e| err("data-dir", format!("{}: {e}", data_dir.display())))?;
        // etcd: a discovery flag replaces the default initial cluster; an initial cluster
        // given as well is a conflict.
        let durl = self.compat.discovery.trim();
        let srv = self.compat.discovery_srv.trim();
        if !durl.is_empty() && crate::discovery::http::Target::parse(durl).is_err() {
            return Err(err("discovery", "discovery: invalid URL"));
        }
        if !durl.is_empty() && !srv.is_empty() {
            return Err(err(
                "discovery",
                "multiple discovery or bootstrap flags are set. Choose one of \"initial-cluster\", \"discovery\" or \"discovery-srv\"",
            ));
        }
        let discovering = !durl.is_empty() || !srv.is_empty();
        let default_cluster = self.initial_cluster == DEFAULT_INITIAL_CLUSTER
            || self.initial_cluster.trim().is_empty();
        if discovering && !default_cluster {
            return Err(err(
                "initial-cluster",
                "multiple discovery or bootstrap flags are set. Choose one of \"initial-cluster\", \"discovery\" or \"discovery-srv\"",
            ));
        }
        let listed = if discovering {
            ""
        } else {
            self.initial_cluster.as_str()
        };
        let mut initial_cluster: Vec<(String, Vec<Url>)> = Vec::new();
        for member in listed.split(',').map(str::trim).filter(|m| !m.is_empty()) {
            let (name, url) = member
                .split_once('=')
                .ok_or_else(|| err("initial-cluster", format!("{member:?} is not name=URL")))?;
            let url = parse_url(url).map_err(|e| err("initial-cluster", e))?;
            match initial_cluster.iter_mut().find(|(n, _)| n == name) {
                Some((_, urls)) => urls.push(url),
                None => initial_cluster.push((name.to_string(), vec![url])),
            }
        }
        let advertise = parse_urls(
            "initial-advertise-peer-urls",
            &self.initial_advertise_peer_urls,
        )?;
        // etcd: with a discovery service, the member starts from a cluster of itself, and the
        // discovery URL is the cluster token (every member's IDs derive from it).
        let discovery_token = self.compat.discovery.trim().to_string();
        if !discovery_token.is_empty() {
            initial_cluster = vec![(self.name.clone(), advertise.clone())];
        }
        if self.heartbeat_interval == 0 {
            return Err(err("heartbeat-interval", "must be positive"));
        }
        // etcd's own bound ("should be set less than 50 seconds").
        if self.election_timeout > MAX_ELECTION_TIMEOUT_MS {
            return Err(err(
                "election-timeout",
                format!(
                    "{} is too long, and should be set less than {MAX_ELECTION_TIMEOUT_MS} ms (50 seconds)",
                    self.election_timeout
                ),
            ));
        }
        if self
            .heartbeat_interval
            .checked_mul(5)
            .is_none_or(|min| self.election_timeout < min)
        {
            return Err(err(
                "election-timeout",
                "must be at least 5 times --heartbeat-interval",
            ));
        }
        if self.max_request_bytes as usize > MAX_REQUEST_BYTES_LIMIT {
            return Err(err(
                "max-request-bytes",
                format!(
                    "{} exceeds the largest request a WAL record holds ({MAX_REQUEST_BYTES_LIMIT} bytes)",
                    self.max_request_bytes
                ),
            ));
        }
        if self.max_txn_ops == 0 {
            return Err(err("max-txn-ops", "must be positive"));
        }
        let auto_compaction = match (
            self.auto_compaction_mode.as_str(),
            self.auto_compaction_retention.as_str(),
        ) {
            (_, "0") => AutoCompaction::Off,
            ("revision", r) => AutoCompaction::Revision(r.parse().map_err(|_| {
                err(
                    "auto-compaction-retention",
                    format!("{r:?} is not a revision count"),
                )
            })?),
            (_, r) => AutoCompaction::Periodic(match r.parse::<u64>() {
                // A bare number means hours in periodic mode, as in etcd.
                Ok(hours) => hours
                    .checked_mul(3600)
                    .map(Duration::from_secs)
                    .ok_or_else(|| {
                        err("auto-compaction-retention", format!("{r} hours overflows"))
                    })?,
                Err(_) => parse_go_duration(r).ok_or_else(|| {
                    err(
                        "auto-compaction-retention",
                        format!("{r:?} is not a duration"),
                    )
                })?,
            }),
        };
        let lease_checkpoint_interval = positive_duration(
            "experimental-lease-checkpoint-interval",
            &self.experimental_lease_checkpoint_interval,
        )?;
        let corrupt_check_time = parse_go_duration(&self.experimental_corrupt_check_time)
            .ok_or_else(|| {
                err(
                    "experimental-corrupt-check-time",
                    format!(
                        "{:?} is not a duration",
                        self.experimental_corrupt_check_time
                    ),
                )
            })?;
        let watch_progress_notify_interval = positive_duration(
            "experimental-watch-progress-notify-interval",
            &self.experimental_watch_progress_notify_interval,
        )?;
        if self.storage_core.is_some_and(|c| c >= 1024) {
            return Err(err("storage-core", "not a CPU number"));
        }
        if self.net_threads.is_some_and(|n| n == 0 || n > 1024) {
            return Err(err("net-threads", "must be between 1 and 1024"));
        }
        let suites =
            crate::tls::cipher::parse(&self.cipher_suites).map_err(|e| err("cipher-suites", e))?;
        // Empty means unset, as etcd reads them.
        let allowed_cn = self.peer_cert_allowed_cn.clone().filter(|s| !s.is_empty());
        let allowed_hostname = self
            .peer_cert_allowed_hostname
            .clone()
            .filter(|s| !s.is_empty());
        if let (Some(cn), Some(host)) = (&allowed_cn, &allowed_hostname) {
            // etcd's message.
            return Err(err(
                "peer-cert-allowed-cn",
                format!(
                    "AllowedCN and AllowedHostname are mutually exclusive (cn={cn:?}, hostname={host:?})"
                ),
            ));
        }
        // --client-cert-allowed-hostname: a client certificate must be valid for that name.
        // Without client certificate authentication it could not take effect (etcd would start
        // and ignore it): refused instead, with the reason.
        let client_allowed_hostname =
            Some(self.compat.client_cert_allowed_hostname.clone()).filter(|h| !h.is_empty());
        if client_allowed_hostname.is_some() && !self.client_cert_auth {
            return Err(err(
                "client-cert-allowed-hostname",
                "needs --client-cert-auth (and --trusted-ca-file) to take effect",
            ));
        }
        let client_tls = crate::tls::Settings {
            cert_file: set(self.cert_file),
            key_file: set(self.key_file),
            trusted_ca_file: set(self.trusted_ca_file),
            client_cert_auth: self.client_cert_auth,
            crl_file: set(self.client_crl_file),
            auto_tls: self.auto_tls,
            suites: suites.clone(),
            allowed_hostname: client_allowed_hostname,
            ..Default::default()
        };
        let peer_tls = crate::tls::Settings {
            cert_file: set(self.peer_cert_file),
            key_file: set(self.peer_key_file),
            trusted_ca_file: set(self.peer_trusted_ca_file),
            client_cert_auth: self.peer_client_cert_auth,
            crl_file: set(self.peer_crl_file),
            auto_tls: self.peer_auto_tls,
            allowed_cn,
            allowed_hostname,
            suites,
            self_signed: false,
        };
        for (side, tls, cert, key) in [
            ("client", &client_tls, "cert-file", "key-file"),
            ("peer", &peer_tls, "peer-cert-file", "peer-key-file"),
        ] {
            if tls.cert_file.is_some() != tls.key_file.is_some() {
                return Err(err(
                    if tls.cert_file.is_some() { key } else { cert },
                    format!(
                        "the {side} TLS certificate and key are given together (--{cert} and --{key})"
                    ),
                ));
            }
        }
        let auth_token =
            crate::auth::jwt::parse(&self.auth_token).map_err(|e| err("auth-token", e))?;
        // etcd's bounds: anything else is bcrypt's default.
        let bcrypt_cost = if (4..=31).contains(&self.bcrypt_cost) {
            self.bcrypt_cost
        } else {
            10
        };
        let compat = self.compat.resolve()?;
        Ok(Config {
            compat,
            auth_token,
            auth_token_ttl: Duration::from_secs(self.auth_token_ttl),
            bcrypt_cost,
            client_tls,
            peer_tls,
            data_dir,
            listen_client_urls: parse_urls("listen-client-urls", &self.listen_client_urls)?,
            advertise_client_urls: parse_urls(
                "advertise-client-urls",
                &self.advertise_client_urls,
            )?,
            listen_peer_urls: parse_urls("listen-peer-urls", &self.listen_peer_urls)?,
            initial_advertise_peer_urls: advertise,
            initial_cluster,
            initial_cluster_state_new: self.initial_cluster_state == "new",
            initial_cluster_token: if discovery_token.is_empty() {
                self.initial_cluster_token
            } else {
                discovery_token
            },
            strict_reconfig_check: self.strict_reconfig_check,
            // 0 means the default, as in etcd.
            snapshot_count: if self.snapshot_count == 0 {
                100_000
            } else {
                self.snapshot_count
            },
            snapshot_catchup_entries: self.experimental_snapshot_catchup_entries,
            heartbeat_interval: Duration::from_millis(self.heartbeat_interval),
            election_timeout: Duration::from_millis(self.election_timeout),
            quota_backend_bytes: if self.quota_backend_bytes == 0 {
                DEFAULT_QUOTA_BYTES
            } else {
                self.quota_backend_bytes
            },
            max_request_bytes: self.max_request_bytes,
            max_txn_ops: self.max_txn_ops,
            auto_compaction,
            log_level: self.log_level,
            storage_core: self.storage_core,
            storage_core_spin: parse_go_duration(&self.storage_core_spin)
                .filter(|d| *d <= Duration::from_millis(10))
                .ok_or_else(|| {
                    err(
                        "storage-core-spin",
                        format!("{:?} is not a duration up to 10ms", self.storage_core_spin),
                    )
                })?,
            net_threads: self.net_threads,
            max_watchers_per_stream: self.max_watchers_per_stream,
            max_watchers: self.max_watchers,
            lease_checkpoint_interval,
            watch_progress_notify_interval,
            initial_corrupt_check: self.experimental_initial_corrupt_check,
            force_new_cluster: self.force_new_cluster,
            corrupt_check_time,
            name: self.name,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, String> {
        let mut argv = vec!["keel"];
        argv.extend_from_slice(args);
        let flags = Flags::try_parse_from(argv).map_err(|e| e.to_string())?;
        flags.validate().map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_match_etcd() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.name, "default");
        assert_eq!(
            c.data_dir,
            std::env::current_dir().unwrap().join("default.keel")
        );
        assert_eq!(c.listen_client_urls[0].to_string(), "http://localhost:2379");
        assert_eq!(
            c.initial_cluster,
            vec![(
                "default".to_string(),
                vec![parse_url("http://localhost:2380").unwrap()]
            )]
        );
        assert_eq!(
            (c.snapshot_count, c.max_request_bytes, c.max_txn_ops),
            (100_000, 1_572_864, 128)
        );
        assert_eq!(c.heartbeat_interval, Duration::from_millis(100));
        assert_eq!(c.election_timeout, Duration::from_millis(1000));
        assert_eq!(c.quota_backend_bytes, 2 << 30);
        assert_eq!(c.auto_compaction, AutoCompaction::Off);
    }

    #[test]
    fn flags_and_derived_values() {
        let c = parse(&[
            "--name",
            "n1",
            "--listen-client-urls",
            "http://127.0.0.1:23790,https://[::1]:23791",
            "--initial-cluster",
            "n1=http://localhost:2380,n2=http://10.0.0.2:2380",
            "--auto-compaction-retention",
            "1h30m",
            "--quota-backend-bytes",
            "1024",
        ])
        .unwrap();
        assert_eq!(c.data_dir, std::env::current_dir().unwrap().join("n1.keel"));
        assert_eq!(c.listen_client_urls.len(), 2);
        assert!(c.listen_client_urls[1].tls);
        assert_eq!(c.listen_client_urls[1].host, "[::1]");
        assert_eq!(c.initial_cluster.len(), 2);
        assert_eq!(
            c.auto_compaction,
            AutoCompaction::Periodic(Duration::from_secs(5400))
        );
        assert_eq!(c.quota_backend_bytes, 1024);
        let c = parse(&["--auto-compaction-retention", "2"]).unwrap();
        assert_eq!(
            c.auto_compaction,
            AutoCompaction::Periodic(Duration::from_secs(7200)),
            "hours"
        );
        let c = parse(&[
            "--auto-compaction-mode",
            "revision",
            "--auto-compaction-retention",
            "1000",
        ])
        .unwrap();
        assert_eq!(c.auto_compaction, AutoCompaction::Revision(1000));
    }

    #[test]
    fn bad_values_are_clear_errors() {
        for (args, expect) in [
            (
                vec!["--listen-client-urls", "localhost:2379"],
                "--listen-client-urls",
            ),
            (
                vec!["--listen-client-urls", "http://localhost:99999"],
                "invalid port",
            ),
            (vec!["--initial-cluster", "default"], "not name=URL"),
            (vec!["--election-timeout", "100"], "5 times"),
            (
                vec!["--auto-compaction-retention", "5 minutes"],
                "not a duration",
            ),
            (vec!["--initial-cluster-state", "maybe"], "invalid value"),
            (vec!["--snapshot-count=-1"], "invalid value"),
            (vec!["--no-such-flag"], "unexpected argument"),
            (
                vec!["--auto-compaction-retention", "18446744073709551615"],
                "overflows",
            ),
            (
                vec!["--heartbeat-interval", "18446744073709551615"],
                "5 times",
            ),
            (
                vec![
                    "--heartbeat-interval",
                    "4611686018427387904",
                    "--election-timeout",
                    "40000",
                ],
                "5 times",
            ),
            (vec!["--election-timeout", "60000"], "50 seconds"),
            (vec!["--max-request-bytes", "4294967295"], "WAL record"),
        ] {
            let e = parse(&args).unwrap_err();
            assert!(e.contains(expect), "{args:?}: {e}");
        }
    }

    #[test]
    fn every_etcd_flag_reads_its_etcd_environment_variable() {
        use clap::CommandFactory;
        let cmd = Flags::command();
        let mut checked = 0;
        for arg in cmd.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if matches!(long, "help" | "version") {
                continue;
            }
            let env = arg
                .get_env()
                .unwrap_or_else(|| panic!("--{long} has no environment variable"));
            let expected = if matches!(
                long,
                "storage-core"
                    | "storage-core-spin"
                    | "net-threads"
                    | "max-watchers-per-stream"
                    | "max-watchers"
            ) {
                format!("KEEL_{}", long.to_uppercase().replace('-', "_"))
            } else {
                format!("ETCD_{}", long.to_uppercase().replace('-', "_"))
            };
            assert_eq!(env.to_str().unwrap(), expected, "--{long}");
            checked += 1;
        }
        assert_eq!(checked, 92);
    }

    #[test]
    fn booleans_as_go_reads_them() {
        for t in ["1", "t", "T", "TRUE", "true", "True"] {
            assert_eq!(go_bool(t), Ok(true));
        }
        for f in ["0", "f", "F", "FALSE", "false", "False"] {
            assert_eq!(go_bool(f), Ok(false));
        }
        assert!(go_bool("yes").is_err());
        let flags = Flags::try_parse_from(["keel", "--debug=1", "--force-new-cluster=F"]).unwrap();
        assert!(flags.compat.debug && !flags.force_new_cluster);
    }

    #[test]
    fn go_durations() {
        assert_eq!(parse_go_duration("90s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_go_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_go_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_go_duration("1.5h"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_go_duration("5"), None);
        assert_eq!(parse_go_duration("5x"), None);
        assert_eq!(parse_go_duration(""), None);
    }
}
