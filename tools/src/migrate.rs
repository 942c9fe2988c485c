//! `keelctl migrate --etcd-data-dir DIR`: a keel data dir from a **stopped** etcd 3.4 member's
//! data dir, as a restore of its backend file (`DIR/member/snap/db`, a bbolt file without a
//! sha256 trailer). etcd commits its backend when it stops cleanly; after a crash, the last
//! writes may be only in its WAL, so start and stop the etcd member once first. The cluster
//! flags and their checks are `snapshot restore`'s.

use std::path::PathBuf;

use anyhow::bail;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The stopped etcd member's data dir.
    #[arg(long)]
    pub etcd_data_dir: PathBuf,
    #[command(flatten)]
    pub cluster: crate::snapshot_restore::Cluster,
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    let db = args.etcd_data_dir.join("member").join("snap").join("db");
    if !db.is_file() {
        bail!(
            "{} is not an etcd data dir: {} does not exist",
            args.etcd_data_dir.display(),
            db.display()
        );
    }
    crate::snapshot_restore::restore(&db, &args.cluster, true)
}
