//! `keelctl db check --data-dir DIR`: the engine's full check of a stopped member's backend
//! (every page reached once, checksums, key order, the free list), with its figures.

use std::path::PathBuf;

use anyhow::Context;
use keel_engine::btree::{Backend, BackendOptions};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The member's data dir (the member must be stopped).
    #[arg(long)]
    pub data_dir: PathBuf,
}

/// The backend file of a data dir.
pub fn db_path(data_dir: &std::path::Path) -> PathBuf {
    data_dir.join("member").join("snap").join("db")
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    let db = db_path(&args.data_dir);
    let backend = Backend::open(&db, BackendOptions::default())
        .with_context(|| format!("opening {}", db.display()))?;
    let r = backend
        .check()
        .with_context(|| format!("checking {}", db.display()))?;
    println!(
        "{}: OK ({} pages: {} used, {} free, {} free list; {} entries; depth {})",
        db.display(),
        r.pages,
        r.used,
        r.free,
        r.freelist,
        r.entries,
        r.depth
    );
    Ok(())
}
