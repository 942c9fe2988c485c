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
//! - The new cluster is written into the data dir as etcd's restore writes it: a WAL with the
//!   new member's and cluster's IDs (derived from `--initial-cluster`, `--initial-cluster-token`
//!   and `--name` as the server derives them) and one committed member-add entry per member of
//!   `--initial-cluster`. The member then starts as that cluster whatever its `--initial-*`
//!   flags say (ignored on a data dir, as etcd ignores them): restore every member with the
//!   same `--initial-cluster` and token, then start them as usual.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use keel::membership::{self, Member};
use keel_engine::btree::{Backend, BackendOptions, bbolt};
use keel_engine::wal::{Wal, WalOptions, record::Metadata};

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

/// The new cluster `args` describes: its ID, this member's ID, and every member, with the IDs
/// the server derives from the same flags.
fn new_cluster(args: &Cluster) -> anyhow::Result<(u64, u64, Vec<Member>)> {
    let mut by_name: Vec<(String, Vec<keel::config::Url>)> = Vec::new();
    for member in args.initial_cluster.split(',').filter(|m| !m.is_empty()) {
        let (name, url) = member
            .split_once('=')
            .with_context(|| format!("--initial-cluster: {member:?} is not name=URL"))?;
        let url =
            keel::config::parse_url(url).map_err(|e| anyhow::anyhow!("--initial-cluster: {e}"))?;
        match by_name.iter_mut().find(|(n, _)| n == name) {
            Some((_, urls)) => urls.push(url),
            None => by_name.push((name.to_string(), vec![url])),
        }
    }
    let token = &args.initial_cluster_token;
    let members: Vec<Member> = by_name
        .iter()
        .map(|(name, urls)| {
            let mut peer_urls: Vec<String> = urls.iter().map(ToString::to_string).collect();
            peer_urls.sort();
            Member {
                id: membership::member_id(urls, token),
                peer_urls,
                is_learner: false,
                name: name.clone(),
                client_urls: Vec::new(),
            }
        })
        .collect();
    let ids: Vec<u64> = members.iter().map(|m| m.id).collect();
    let me = members
        .iter()
        .find(|m| m.name == args.name)
        .map(|m| m.id)
        .context("the member is not in --initial-cluster")?;
    Ok((membership::cluster_id(&ids), me, members))
}

/// Writes the WAL of a restored member into `dir`: its IDs, and the bootstrap entries of
/// `members` (what the server writes for a new cluster).
fn write_wal(
    dir: &Path,
    cluster_id: u64,
    member_id: u64,
    members: Vec<Member>,
) -> anyhow::Result<()> {
    let dir = dir.to_path_buf();
    // The WAL is written by glommio's I/O, as the server's storage core writes it.
    let handle = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .name("keelctl-wal")
        .spawn(move || async move {
            let options = WalOptions {
                metadata: Metadata {
                    cluster_id,
                    member_id,
                },
                ..WalOptions::default()
            };
            let (wal, _) = Wal::open(&dir, options).await?;
            keel::raft::node::write_bootstrap(&wal, &members).await?;
            wal.close().await
        })
        .map_err(|e| anyhow::anyhow!("starting the WAL writer: {e}"))?;
    handle
        .join()
        .map_err(|e| anyhow::anyhow!("the WAL writer: {e}"))?
        .context("writing the WAL")
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
        let (cluster_id, member_id, members) = new_cluster(args)?;
        let wal = tmp.join("member").join("wal");
        std::fs::create_dir_all(&wal)?;
        std::fs::set_permissions(&wal, std::fs::Permissions::from_mode(0o700))?;
        write_wal(&wal, cluster_id, member_id, members)?;
        // The new directories themselves, durable before the rename makes them the data dir.
        for dir in [&snap, &wal, &tmp.join("member"), &tmp] {
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
                "Start the member with: keel --name {} --data-dir {} (it is a member of \
                 --initial-cluster {} already)",
                args.name,
                data_dir.display(),
                args.initial_cluster,
            );
            Ok(())
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}
