//! `keelctl db defrag --data-dir DIR`: the backend of a stopped member rewritten compactly
//! (the engine's defragmentation, which copies beside the original and switches by a rename:
//! an error or a crash leaves the original).

use anyhow::Context;
use keel_engine::btree::{Backend, BackendOptions};

pub fn run(args: &crate::db_check::Args) -> anyhow::Result<()> {
    let db = crate::db_check::db_path(&args.data_dir);
    let backend = Backend::open(&db, BackendOptions::default())
        .with_context(|| format!("opening {}", db.display()))?;
    let r = backend
        .defrag()
        .with_context(|| format!("defragmenting {}", db.display()))?;
    println!(
        "{}: {} bytes before, {} after",
        db.display(),
        r.size_before,
        r.size_after
    );
    Ok(())
}
