//! Prometheus metrics served on `/metrics`, under etcd's names where etcd has the metric (so
//! existing dashboards and alerts work), in the OpenMetrics text format Prometheus scrapes.
//!
//! Counters and histograms are updated where the work happens (the storage core, the KV
//! service). Sizes, revisions and process figures are read when scraped.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use keel_engine::mvcc::Store;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// The etcd version Keel reports (`etcd_server_version`, `/version`).
pub const ETCD_VERSION: &str = "3.4.23";

/// Every metric of a member.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// go-grpc-prometheus's server counters, as etcd registers them.
    pub grpc: GrpcMetrics,
    /// `etcd_disk_wal_fsync_duration_seconds`: each WAL group-commit fdatasync.
    pub wal_fsync: Histogram,
    /// `etcd_disk_backend_commit_duration_seconds`: each durable backend commit (checkpoint).
    pub backend_commit: Histogram,
    /// `etcd_disk_wal_write_bytes_total`.
    pub wal_write_bytes: Gauge,
    pub has_leader: Gauge,
    pub is_leader: Gauge,
    /// `etcd_server_leader_changes_seen_total`.
    pub leader_changes: Counter,
    /// `etcd_server_proposals_committed_total` (a gauge in etcd: the commit index).
    pub proposals_committed: Gauge,
    /// `etcd_server_proposals_applied_total` (a gauge in etcd: the applied index).
    pub proposals_applied: Gauge,
    pub proposals_pending: Gauge,
    /// `etcd_server_proposals_failed_total`.
    pub proposals_failed: Counter,
    /// `etcd_mvcc_range_total`, `_put_total`, `_delete_total`, `_txn_total`.
    pub ranges: Counter,
    pub puts: Counter,
    pub deletes: Counter,
    pub txns: Counter,
    db_total_size: Gauge,
    db_in_use_size: Gauge,
    current_revision: Gauge,
    compact_revision: Gauge,
    resident_memory: Gauge,
    cpu_seconds: Gauge<f64, AtomicU64>,
    open_fds: Gauge,
    /// `os_fd_used` / `os_fd_limit` (etcd's own) and `process_max_fds`,
    /// `process_virtual_memory_bytes`, `process_start_time_seconds` (Go's process collector).
    os_fd_used: Gauge,
    os_fd_limit: Gauge,
    max_fds: Gauge,
    virtual_memory: Gauge,
    start_time: Gauge<f64, AtomicU64>,
    /// `etcd_server_id{server_id}` (1) and `etcd_server_is_learner`.
    server_id: Family<Label, Gauge>,
    is_learner: Gauge,
    /// `etcd_server_health_success` / `_failures`: `/health` answers (counters in etcd, kept
    /// as gauges that only grow for their names, as the snapshot counters).
    pub health_success: Gauge,
    pub health_failures: Gauge,
    /// `etcd_debugging_mvcc_watcher_total` and `etcd_debugging_mvcc_watch_stream_total`.
    pub watchers: Gauge,
    pub watch_streams: Gauge,
    /// `etcd_debugging_mvcc_slow_watcher_total`: watchers catching up from history.
    pub slow_watchers: Gauge,
    /// Leases alive (`etcd_debugging_lease_total` is not in etcd 3.4; Keel's name).
    leases: Gauge,
    /// `etcd_network_peer_sent_bytes_total{To}` and `_received_bytes_total{From}`.
    pub peer_sent_bytes: Family<Label, Counter>,
    pub peer_received_bytes: Family<Label, Counter>,
    /// `etcd_network_peer_sent_failures_total{To}`.
    pub peer_sent_failures: Family<Label, Counter>,
    /// `etcd_network_peer_round_trip_time_seconds{To}`.
    pub peer_round_trip: Family<Label, Histogram, fn() -> Histogram>,
    /// `etcd_network_snapshot_send_total_duration_seconds{To}` and
    /// `etcd_network_snapshot_receive_total_duration_seconds{From}`.
    pub snapshot_send: Family<Label, Histogram, fn() -> Histogram>,
    pub snapshot_receive: Family<Label, Histogram, fn() -> Histogram>,
    /// `etcd_network_snapshot_send_success{To}` / `_failures{To}`: counters in etcd, without
    /// the `_total` suffix prometheus-client gives every counter, so kept as gauges that only
    /// grow, to keep etcd's names.
    pub snapshot_send_success: Family<Label, Gauge>,
    pub snapshot_send_failures: Family<Label, Gauge>,
}

/// A metric's labels (etcd's `To`/`From` with a member ID in hex).
pub type Label = Vec<(String, String)>;

/// The `To` label of member `id`.
pub fn to(id: u64) -> Label {
    vec![("To".into(), format!("{id:x}"))]
}

/// The `From` label of member `id`.
pub fn from(id: u64) -> Label {
    vec![("From".into(), format!("{id:x}"))]
}

/// etcd's buckets for round-trip times: 0.1 ms to about 3.3 s, doubling (16).
fn rtt_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

/// etcd's buckets for snapshot transfers: 0.1 s to 51.2 s, doubling (10).
fn snapshot_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.1, 2.0, 10))
}

/// etcd's buckets for disk latencies: 1 ms to about 8 s, doubling.
fn disk_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.001, 2.0, 14)
}

impl Metrics {
    /// The metrics of a member with backend quota `quota_bytes`.
    pub fn new(quota_bytes: u64) -> Arc<Metrics> {
        let mut r = Registry::default();
        let wal_fsync = Histogram::new(disk_buckets());
        r.register(
            "etcd_disk_wal_fsync_duration_seconds",
            "The latency distributions of fsync called by WAL.",
            wal_fsync.clone(),
        );
        let backend_commit = Histogram::new(disk_buckets());
        r.register(
            "etcd_disk_backend_commit_duration_seconds",
            "The latency distributions of commit called by backend.",
            backend_commit.clone(),
        );
        let gauge = |r: &mut Registry, name: &str, help: &str| {
            let g = Gauge::default();
            r.register(name, help, g.clone());
            g
        };
        // Counters get their `_total` suffix from the encoder.
        let counter = |r: &mut Registry, name: &str, help: &str| {
            let c = Counter::default();
            r.register(name, help, c.clone());
            c
        };
        let wal_write_bytes = gauge(
            &mut r,
            "etcd_disk_wal_write_bytes_total",
            "Total number of bytes written in WAL.",
        );
        let has_leader = gauge(
            &mut r,
            "etcd_server_has_leader",
            "Whether or not a leader exists. 1 is existence, 0 is not.",
        );
        let is_leader = gauge(
            &mut r,
            "etcd_server_is_leader",
            "Whether or not this member is a leader. 1 if is, 0 otherwise.",
        );
        let leader_changes = counter(
            &mut r,
            "etcd_server_leader_changes_seen",
            "The number of leader changes seen.",
        );
        let proposals_committed = gauge(
            &mut r,
            "etcd_server_proposals_committed_total",
            "The total number of consensus proposals committed.",
        );
        let proposals_applied = gauge(
            &mut r,
            "etcd_server_proposals_applied_total",
            "The total number of consensus proposals applied.",
        );
        let proposals_pending = gauge(
            &mut r,
            "etcd_server_proposals_pending",
            "The current number of pending proposals to commit.",
        );
        let proposals_failed = counter(
            &mut r,
            "etcd_server_proposals_failed",
            "The total number of failed proposals seen.",
        );
        let quota = gauge(
            &mut r,
            "etcd_server_quota_backend_bytes",
            "Current backend storage quota size in bytes.",
        );
        quota.set(i64::try_from(quota_bytes).unwrap_or(i64::MAX));
        let version = Family::<Vec<(String, String)>, Gauge>::default();
        r.register(
            "etcd_server_version",
            "Which version is running. 1 for 'server_version' label with current version.",
            version.clone(),
        );
        version
            .get_or_create(&vec![("server_version".into(), ETCD_VERSION.into())])
            .set(1);
        let ranges = counter(
            &mut r,
            "etcd_mvcc_range",
            "Total number of ranges seen by this member.",
        );
        let puts = counter(
            &mut r,
            "etcd_mvcc_put",
            "Total number of puts seen by this member.",
        );
        let deletes = counter(
            &mut r,
            "etcd_mvcc_delete",
            "Total number of deletes seen by this member.",
        );
        let txns = counter(
            &mut r,
            "etcd_mvcc_txn",
            "Total number of txns seen by this member.",
        );
        let db_total_size = gauge(
            &mut r,
            "etcd_mvcc_db_total_size_in_bytes",
            "Total size of the underlying database physically allocated in bytes.",
        );
        let db_in_use_size = gauge(
            &mut r,
            "etcd_mvcc_db_total_size_in_use_in_bytes",
            "Total size of the underlying database logically in use in bytes.",
        );
        let current_revision = gauge(
            &mut r,
            "etcd_debugging_mvcc_current_revision",
            "The current revision of store.",
        );
        let compact_revision = gauge(
            &mut r,
            "etcd_debugging_mvcc_compact_revision",
            "The revision of the last compaction in store.",
        );
        let resident_memory = gauge(
            &mut r,
            "process_resident_memory_bytes",
            "Resident memory size in bytes.",
        );
        let cpu_seconds = Gauge::<f64, AtomicU64>::default();
        r.register(
            "process_cpu_seconds_total",
            "Total user and system CPU time spent in seconds.",
            cpu_seconds.clone(),
        );
        let watchers = gauge(
            &mut r,
            "etcd_debugging_mvcc_watcher_total",
            "Total number of watchers.",
        );
        let watch_streams = gauge(
            &mut r,
            "etcd_debugging_mvcc_watch_stream_total",
            "Total number of watch streams.",
        );
        let slow_watchers = gauge(
            &mut r,
            "etcd_debugging_mvcc_slow_watcher_total",
            "Total number of unsynced slow watchers.",
        );
        let leases = gauge(&mut r, "keel_lease_total", "Number of leases alive.");
        let open_fds = gauge(
            &mut r,
            "process_open_fds",
            "Number of open file descriptors.",
        );
        let os_fd_used = gauge(&mut r, "os_fd_used", "The number of used file descriptors.");
        let os_fd_limit = gauge(&mut r, "os_fd_limit", "The file descriptor limit.");
        let max_fds = gauge(
            &mut r,
            "process_max_fds",
            "Maximum number of open file descriptors.",
        );
        let virtual_memory = gauge(
            &mut r,
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes.",
        );
        let start_time = Gauge::<f64, AtomicU64>::default();
        r.register(
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds.",
            start_time.clone(),
        );
        let server_id = Family::<Label, Gauge>::default();
        r.register(
            "etcd_server_id",
            "Server or member ID in hexadecimal format. 1 for 'server_id' label with current ID.",
            server_id.clone(),
        );
        let is_learner = gauge(
            &mut r,
            "etcd_server_is_learner",
            "Whether or not this member is a learner. 1 if is, 0 otherwise.",
        );
        let health_success = gauge(
            &mut r,
            "etcd_server_health_success",
            "The total number of successful health checks",
        );
        let health_failures = gauge(
            &mut r,
            "etcd_server_health_failures",
            "The total number of failed health checks",
        );
        let peer_sent_bytes = Family::<Label, Counter>::default();
        r.register(
            "etcd_network_peer_sent_bytes",
            "The total number of bytes sent to peers.",
            peer_sent_bytes.clone(),
        );
        let peer_received_bytes = Family::<Label, Counter>::default();
        r.register(
            "etcd_network_peer_received_bytes",
            "The total number of bytes received from peers.",
            peer_received_bytes.clone(),
        );
        let peer_sent_failures = Family::<Label, Counter>::default();
        r.register(
            "etcd_network_peer_sent_failures",
            "The total number of send failures from peers.",
            peer_sent_failures.clone(),
        );
        let peer_round_trip =
            Family::<Label, Histogram, fn() -> Histogram>::new_with_constructor(rtt_histogram);
        r.register(
            "etcd_network_peer_round_trip_time_seconds",
            "Round-Trip-Time histogram between peers.",
            peer_round_trip.clone(),
        );
        let snapshot_send =
            Family::<Label, Histogram, fn() -> Histogram>::new_with_constructor(snapshot_histogram);
        r.register(
            "etcd_network_snapshot_send_total_duration_seconds",
            "Total latency distributions of v3 snapshot sends",
            snapshot_send.clone(),
        );
        let snapshot_receive =
            Family::<Label, Histogram, fn() -> Histogram>::new_with_constructor(snapshot_histogram);
        r.register(
            "etcd_network_snapshot_receive_total_duration_seconds",
            "Total latency distributions of v3 snapshot receives",
            snapshot_receive.clone(),
        );
        let snapshot_send_success = Family::<Label, Gauge>::default();
        r.register(
            "etcd_network_snapshot_send_success",
            "Total number of successful snapshot sends",
            snapshot_send_success.clone(),
        );
        let snapshot_send_failures = Family::<Label, Gauge>::default();
        r.register(
            "etcd_network_snapshot_send_failures",
            "Total number of snapshot send failures",
            snapshot_send_failures.clone(),
        );
        let grpc = GrpcMetrics::register(&mut r);
        Arc::new(Metrics {
            grpc,
            os_fd_used,
            os_fd_limit,
            max_fds,
            virtual_memory,
            start_time,
            server_id,
            is_learner,
            health_success,
            health_failures,
            peer_sent_bytes,
            peer_received_bytes,
            peer_sent_failures,
            peer_round_trip,
            snapshot_send,
            snapshot_receive,
            snapshot_send_success,
            snapshot_send_failures,
            registry: r,
            wal_fsync,
            backend_commit,
            wal_write_bytes,
            has_leader,
            is_leader,
            leader_changes,
            proposals_committed,
            proposals_applied,
            proposals_pending,
            proposals_failed,
            ranges,
            puts,
            deletes,
            txns,
            db_total_size,
            db_in_use_size,
            current_revision,
            compact_revision,
            resident_memory,
            cpu_seconds,
            open_fds,
            watchers,
            watch_streams,
            slow_watchers,
            leases,
        })
    }

    /// Records a duration in seconds.
    pub fn observe(h: &Histogram, d: Duration) {
        h.observe(d.as_secs_f64());
    }

    /// The text a scrape returns, with the store's and the process's current figures.
    pub fn render(&self, store: &Store, leases: usize, member: Option<(u64, bool)>) -> String {
        self.leases.set(leases as i64);
        if let Some((id, learner)) = member {
            self.server_id
                .get_or_create(&vec![("server_id".into(), format!("{id:x}"))])
                .set(1);
            self.is_learner.set(i64::from(learner));
        }
        let backend = store.backend();
        self.db_total_size.set(as_i64(backend.file_size()));
        self.db_in_use_size.set(as_i64(backend.size_in_use()));
        self.current_revision.set(store.current_revision());
        self.compact_revision.set(store.compact_revision());
        if let Some(p) = ProcessStats::read() {
            self.resident_memory.set(as_i64(p.resident_bytes));
            self.cpu_seconds.set(p.cpu_seconds);
            self.open_fds.set(as_i64(p.open_fds));
            self.os_fd_used.set(as_i64(p.open_fds));
            self.os_fd_limit.set(as_i64(p.max_fds));
            self.max_fds.set(as_i64(p.max_fds));
            self.virtual_memory.set(as_i64(p.virtual_bytes));
            self.start_time.set(p.start_time_seconds);
        }
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

impl Metrics {
    /// Counts the operations a txn ran (its chosen branch, nested txns included) as etcd's
    /// store counts them: ranges, puts and deletes each, and the txn itself when it ran more
    /// than one operation (`metricsTxnWrite.End`).
    pub fn count_txn(&self, resp: &keel_engine::mvcc::apply::TxnResponse) {
        fn ops(resp: &keel_engine::mvcc::apply::TxnResponse, n: &mut [u64; 3]) {
            use keel_engine::mvcc::apply::ResponseOp as R;
            for op in &resp.responses {
                match op {
                    R::Range(_) => n[0] += 1,
                    R::Put(_) => n[1] += 1,
                    R::DeleteRange(_) => n[2] += 1,
                    R::Txn(inner) => ops(inner, n),
                }
            }
        }
        let mut n = [0u64; 3];
        ops(resp, &mut n);
        if n.iter().sum::<u64>() > 1 {
            self.txns.inc();
        }
        self.ranges.inc_by(n[0]);
        self.puts.inc_by(n[1]);
        self.deletes.inc_by(n[2]);
    }
}

/// gRPC codes as Go's `codes.Code.String()` names them, by number.
const GRPC_CODES: [&str; 17] = [
    "OK",
    "Canceled",
    "Unknown",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
];

/// `grpc_server_started_total` and `grpc_server_handled_total` (go-grpc-prometheus, which etcd
/// registers on its client server), labelled `grpc_type`, `grpc_service`, `grpc_method` (and
/// `grpc_code`). Every method the protos declare has its series from the start, with zeros,
/// as `grpc_prometheus.Register` makes them; labels come only from that fixed table, so no
/// client can add series.
#[derive(Debug)]
pub struct GrpcMetrics {
    /// `/service/Method` → its index in `started` and `handled`.
    methods: std::collections::HashMap<String, usize>,
    started: Vec<Counter>,
    handled: Vec<Vec<Counter>>,
}

impl GrpcMetrics {
    fn register(r: &mut Registry) -> GrpcMetrics {
        let started_family = Family::<Label, Counter>::default();
        r.register(
            "grpc_server_started",
            "Total number of RPCs started on the server.",
            started_family.clone(),
        );
        let handled_family = Family::<Label, Counter>::default();
        r.register(
            "grpc_server_handled",
            "Total number of RPCs completed on the server, regardless of success or failure.",
            handled_family.clone(),
        );
        let mut metrics = GrpcMetrics {
            methods: std::collections::HashMap::new(),
            started: Vec::new(),
            handled: Vec::new(),
        };
        let Ok(pool) = prost_reflect::DescriptorPool::decode(keel_proto::FILE_DESCRIPTOR_SET)
        else {
            return metrics;
        };
        for service in pool.services() {
            for method in service.methods() {
                let kind = match (method.is_client_streaming(), method.is_server_streaming()) {
                    (false, false) => "unary",
                    (true, false) => "client_stream",
                    (false, true) => "server_stream",
                    (true, true) => "bidi_stream",
                };
                let labels: Label = vec![
                    ("grpc_type".into(), kind.into()),
                    ("grpc_service".into(), service.full_name().into()),
                    ("grpc_method".into(), method.name().into()),
                ];
                let handled = GRPC_CODES
                    .iter()
                    .map(|code| {
                        let mut l = labels.clone();
                        l.push(("grpc_code".into(), (*code).into()));
                        handled_family.get_or_create(&l).clone()
                    })
                    .collect();
                metrics.methods.insert(
                    format!("/{}/{}", service.full_name(), method.name()),
                    metrics.started.len(),
                );
                metrics
                    .started
                    .push(started_family.get_or_create(&labels).clone());
                metrics.handled.push(handled);
            }
        }
        metrics
    }

    /// The method a call's path names, counted as started.
    pub fn start(&self, path: &str) -> Option<usize> {
        let i = *self.methods.get(path)?;
        self.started[i].inc();
        Some(i)
    }

    /// Method `i`'s call ended with gRPC code `code`.
    pub fn handled(&self, i: usize, code: i32) {
        // A code gRPC does not define counts as Unknown, as grpc-go reads it.
        let code = usize::try_from(code)
            .ok()
            .filter(|&c| c < GRPC_CODES.len())
            .unwrap_or(2);
        if let Some(counters) = self.handled.get(i) {
            counters[code].inc();
        }
    }
}

fn as_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// CPU, memory and file descriptors of this process, from `/proc/self`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProcessStats {
    pub resident_bytes: u64,
    pub cpu_seconds: f64,
    pub open_fds: u64,
    /// The soft limit of open files (`/proc/PID/limits`).
    pub max_fds: u64,
    pub virtual_bytes: u64,
    /// Seconds since the Unix epoch the process started at.
    pub start_time_seconds: f64,
}

/// `/proc` reports CPU times in USER_HZ ticks, which is 100 on every Linux ABI Keel runs on.
const USER_HZ: f64 = 100.0;
const PAGE_SIZE: u64 = 4096;

impl ProcessStats {
    /// Reads the figures; `None` without `/proc`.
    pub fn read() -> Option<ProcessStats> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
        let open_fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64);
        let mut p = ProcessStats::parse(&stat, &statm)?;
        p.open_fds = open_fds;
        p.max_fds = std::fs::read_to_string("/proc/self/limits")
            .ok()
            .as_deref()
            .and_then(max_open_files)
            .unwrap_or(0);
        let fields = stat_fields(&stat);
        p.virtual_bytes = fields.get(20).and_then(|v| v.parse().ok()).unwrap_or(0);
        let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("btime "))
                .and_then(|v| v.trim().parse::<f64>().ok())
        });
        let started: Option<f64> = fields.get(19).and_then(|v| v.parse().ok());
        if let (Some(boot), Some(started)) = (boot, started) {
            p.start_time_seconds = boot + started / USER_HZ;
        }
        // The resident size in bytes whatever the page size (statm counts pages; 64 KiB pages
        // on some arm64 kernels).
        if let Some(kib) = std::fs::read_to_string("/proc/self/status")
            .ok()
            .as_deref()
            .and_then(vm_rss_kib)
        {
            p.resident_bytes = kib * 1024;
        }
        Some(p)
    }

    /// Parses `/proc/PID/stat` (utime and stime are fields 14 and 15, counted after the
    /// parenthesised command name, which may itself hold spaces) and `/proc/PID/statm`
    /// (resident pages second).
    pub fn parse(stat: &str, statm: &str) -> Option<ProcessStats> {
        let resident_pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
        Some(ProcessStats {
            resident_bytes: resident_pages * PAGE_SIZE,
            cpu_seconds: cpu_seconds(stat)?,
            open_fds: 0,
            max_fds: 0,
            virtual_bytes: 0,
            start_time_seconds: 0.0,
        })
    }
}

/// The fields of `/proc/PID/stat` after the command name: index 0 is field 3 (state).
fn stat_fields(stat: &str) -> Vec<&str> {
    stat.rfind(')')
        .map(|i| stat[i + 1..].split_whitespace().collect())
        .unwrap_or_default()
}

/// The soft "Max open files" of `/proc/PID/limits`.
fn max_open_files(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// The `VmRSS:` line of `/proc/PID/status`, in KiB.
fn vm_rss_kib(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// User plus system CPU seconds from the text of `/proc/PID/stat`.
pub fn cpu_seconds(stat: &str) -> Option<f64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // after_name starts at field 3 (state): utime is field 14, so index 11.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / USER_HZ)
}

impl ProcessStats {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_stat_with_spaces_in_the_name() {
        let stat = "4242 (keel storage) S 1 4242 4242 0 -1 4194560 1000 0 0 0 250 75 0 0 20 0 3 0 \
                    12345 1000000 512 18446744073709551615";
        let p = ProcessStats::parse(stat, "2000 512 100 1 0 300 0").unwrap();
        assert_eq!(p.resident_bytes, 512 * 4096);
        assert!((p.cpu_seconds - 3.25).abs() < 1e-9);
        assert_eq!(ProcessStats::parse("garbage", "1 2"), None);
    }

    #[test]
    fn renders_etcd_names() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("db"), Default::default()).unwrap();
        let m = Metrics::new(2 << 30);
        m.puts.inc();
        m.snapshot_send_success.get_or_create(&to(2)).inc();
        Metrics::observe(&m.wal_fsync, Duration::from_micros(300));
        let text = m.render(&store, 0, Some((0x2a, false)));
        for line in [
            "etcd_mvcc_put_total 1",
            "etcd_disk_wal_fsync_duration_seconds_bucket{le=\"0.001\"} 1",
            "etcd_disk_wal_fsync_duration_seconds_count 1",
            "etcd_server_quota_backend_bytes 2147483648",
            "etcd_server_version{server_version=\"3.4.23\"} 1",
            "etcd_debugging_mvcc_current_revision 1",
            "etcd_network_snapshot_send_success{To=\"2\"} 1",
            "etcd_server_id{server_id=\"2a\"} 1",
            "etcd_server_is_learner 0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from:\n{text}"
            );
        }
        let size = text
            .lines()
            .find_map(|l| l.strip_prefix("etcd_mvcc_db_total_size_in_bytes "))
            .unwrap();
        assert_eq!(size.parse::<u64>().unwrap(), store.backend().file_size());
        let p = ProcessStats::read().unwrap();
        assert!(p.resident_bytes > 0);
        assert!(p.max_fds > 0 && p.virtual_bytes > 0, "{p:?}");
        // Started after 2020, and not in the future.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(
            p.start_time_seconds > 1.6e9 && p.start_time_seconds <= now + 1.0,
            "{p:?}"
        );
    }
}
