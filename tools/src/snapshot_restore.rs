//! `keelctl snapshot restore FILE`: a keel data dir from an etcd snapshot, made by etcd 3.4 or
//! by keel (the one-command migration from etcd).
//!
//! - The sha256 trailer is checked first (unless `--skip-hash-check`), with etcd's messages.
//! - The bbolt database is walked and checked whole ([`bbolt::visit`]) while its entries go into
//!   a new keel backend in a temporary directory beside the target; the MVCC store is then
//!   opened on it (every revision must decode), and only then is the directory renamed to
//!   `--data-dir`. On any error nothing is left at the target.
//! - Carried over: every bucket (keys and their whole history, compaction state, leases, auth,
//!   alarms), as `etcdctl snapshot restore` carries them. Not carried: the old cluster's
//!   membership (`members`, `members_removed`, keel's `meta/confState`) and its raft position
//!   (`meta/consistent_index`, `meta/term`), since the restored members form a new cluster.
//! - The new cluster is made when keel first starts on the data dir: start each member with the
//!   `--name`, `--initial-cluster`, `--initial-cluster-token` and
//!   `--initial-advertise-peer-urls` given here (checked here as etcd checks them).

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use keel_engine::btree::{Backend, BackendOptions, bbolt};

use crate::snapshot_file::SnapshotFile;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The snapshot file.
    pub file: PathBuf,
    #[command(flatten)]
    pub cluster: Cluster,
    /// Ignore snapshot integrity hash value (required if copied from data directory).
    #[arg(long)]
    pub skip_hash_check: bool,
}

/// The new member and cluster a restore makes (etcdctl's flags).
#[derive(Debug, clap::Args)]
pub struct Cluster {
    /// Human-readable name for this member.
    #[arg(long, default_value = "default")]
    pub name: String,
    /// Path to the data directory (default: `<name>.keel`).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Initial cluster configuration for restore bootstrap.
    #[arg(long, default_value = "default=http://localhost:2380")]
    pub initial_cluster: String,
    /// Initial cluster token for the cluster during restore bootstrap.
    #[arg(long, default_value = "etcd-cluster")]
    pub initial_cluster_token: String,
    /// List of this member's peer URLs to advertise to the rest of the cluster.
    #[arg(long, default_value = "http://localhost:2380")]
    pub initial_advertise_peer_urls: String,
}

/// Buckets of the old cluster's membership, not carried into a new cluster.
const DROPPED_BUCKETS: &[&[u8]] = &[b"members", b"members_removed"];
/// The old raft position and voters, in `meta`.
const DROPPED_META: &[&[u8]] = &[b"consistent_index", b"term", b"confState"];
/// Entries, and bytes of keys and values, per backend transaction while restoring: a
/// transaction holds its changed pages in memory until it commits.
const BATCH: usize = 10_000;
const BATCH_BYTES: usize = 64 << 20;

/// Checks `--name` against `--initial-cluster` and `--initial-advertise-peer-urls`, as etcd.
fn check_cluster(args: &Cluster) -> anyhow::Result<()> {
    let mut mine: Vec<&str> = Vec::new();
    for member in args.initial_cluster.split(',').filter(|m| !m.is_empty()) {
        let (name, url) = member
            .split_once('=')
            .with_context(|| format!("--initial-cluster: {member:?} is not name=URL"))?;
        if name == args.name {
            mine.push(url);
        }
    }
    if mine.is_empty() {
        bail!(
            "couldn't find local name {:?} in the initial cluster configuration",
            args.name
        );
    }
    let mut advertised: Vec<&str> = args.initial_advertise_peer_urls.split(',').collect();
    advertised.sort_unstable();
    mine.sort_unstable();
    if advertised != mine {
        bail!(
            "--initial-cluster has {}={} but missing from --initial-advertise-peer-urls={}",
            args.name,
            mine.join(","),
            args.initial_advertise_peer_urls
        );
    }
    Ok(())
}

/// Writes the entries of `file` into a keel backend at `db`.
fn convert(file: &SnapshotFile, db: &Path) -> anyhow::Result<u64> {
    let backend = Backend::open(db, BackendOptions::default())
        .with_context(|| format!("creating {}", db.display()))?;
    backend.create_etcd_buckets()?;
    let names = bbolt::bucket_names(file.db(), &file.name())?;
    {
        let mut w = backend.begin_write()?;
        for n in &names {
            if !DROPPED_BUCKETS.contains(&n.as_slice()) {
                w.create_bucket(n)?;
            }
        }
        w.commit(false)?;
    }
    let mut w = Some(backend.begin_write()?);
    let mut pending = 0usize;
    let mut pending_bytes = 0usize;
    let mut copied = 0u64;
    bbolt::visit(file.db(), &file.name(), &mut |bucket, k, v| {
        if DROPPED_BUCKETS.contains(&bucket) || (bucket == b"meta" && DROPPED_META.contains(&k)) {
            return Ok(());
        }
        w.as_mut().expect("open").put(bucket, k, v)?;
        copied += 1;
        pending += 1;
        pending_bytes += k.len() + v.len();
        if pending >= BATCH || pending_bytes >= BATCH_BYTES {
            w.take().expect("open").commit(false)?;
            w = Some(backend.begin_write()?);
            pending = 0;
            pending_bytes = 0;
        }
        Ok(())
    })?;
    w.take().expect("open").commit(true)?;
    Ok(copied)
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    restore(&args.file, &args.cluster, args.skip_hash_check)
}

/// Restores the snapshot `path` as the member `args` describes.
pub fn restore(path: &Path, args: &Cluster, skip_hash_check: bool) -> anyhow::Result<()> {
    check_cluster(args)?;
    let data_dir = args
        .data_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("{}.keel", args.name)));
    if data_dir.exists() {
        bail!("data-dir {:?} exists", data_dir.display().to_string());
    }
    let file = SnapshotFile::open(path)?;
    file.verify(skip_hash_check)?;
    let parent = data_dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)?;
    // This run's own directory (two restores to one data dir must not share one), removed on
    // any error; a run killed midway leaves it beside the data dir, never at it.
    let tmp = parent.join(format!(
        ".{}.restoring.{}",
        data_dir.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    if tmp.exists() {
        // Left by a killed run of a process with the same ID.
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let result = (|| {
        let snap = tmp.join("member").join("snap");
        std::fs::create_dir_all(&snap)?;
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o700))?;
        let db = snap.join("db");
        let copied = convert(&file, &db)?;
        // The MVCC store opens on it: every revision decodes, the index rebuilds.
        let store = keel_engine::mvcc::Store::open(&db, BackendOptions::default())
            .with_context(|| format!("checking the restored store {}", db.display()))?;
        let revision = store.current_revision();
        drop(store);
        // The new directories themselves, durable before the rename makes them the data dir.
        for dir in [&snap, &tmp.join("member"), &tmp] {
            std::fs::File::open(dir)?.sync_all()?;
        }
        // etcd refuses a data dir that exists; one made meanwhile (by another restore) too.
        if data_dir.exists() {
            bail!("data-dir {:?} exists", data_dir.display().to_string());
        }
        std::fs::rename(&tmp, &data_dir)?;
        std::fs::File::open(parent)?.sync_all()?;
        anyhow::Ok((copied, revision))
    })();
    match result {
        Ok((copied, revision)) => {
            println!(
                "Restored {} into {} ({copied} entries, revision {revision}).",
                path.display(),
                data_dir.display()
            );
            println!(
                "Start the member with: keel --name {} --data-dir {} --initial-cluster {} \
                 --initial-cluster-token {} --initial-advertise-peer-urls {}",
                args.name,
                data_dir.display(),
                args.initial_cluster,
                args.initial_cluster_token,
                args.initial_advertise_peer_urls
            );
            Ok(())
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}
