//! `keelctl db dump --data-dir DIR`: every stored revision of a stopped member's key bucket,
//! for debugging: `main_sub[t] key create=… mod=… version=… lease=… value=N bytes`, where `t`
//! marks a deletion (etcd's tombstone).

use std::io::Write as _;

use anyhow::Context;
use keel_engine::btree::{Backend, BackendOptions};
use prost::Message as _;

pub fn run(args: &crate::db_check::Args) -> anyhow::Result<()> {
    let db = crate::db_check::db_path(&args.data_dir);
    let backend = Backend::open(&db, BackendOptions::default())
        .with_context(|| format!("opening {}", db.display()))?;
    let txn = backend.begin_read();
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for kv in txn.range(b"key", b"", None)? {
        let (k, v) = kv?;
        if k.len() < 17 {
            anyhow::bail!("{}: a revision key of {} bytes", db.display(), k.len());
        }
        #[allow(
            clippy::big_endian_bytes,
            reason = "etcd's revision keys are big-endian"
        )]
        let (main, sub) = (
            i64::from_be_bytes(k[..8].try_into().expect("8 bytes")),
            i64::from_be_bytes(k[9..17].try_into().expect("8 bytes")),
        );
        let kv = keel_proto::mvccpb::KeyValue::decode(v)
            .with_context(|| format!("{}: revision {main}_{sub}", db.display()))?;
        writeln!(
            out,
            "{main}_{sub}{} {} create={} mod={} version={} lease={} value={} bytes",
            if k.len() > 17 { "t" } else { "" },
            String::from_utf8_lossy(&kv.key).escape_debug(),
            kv.create_revision,
            kv.mod_revision,
            kv.version,
            kv.lease,
            kv.value.len()
        )?;
    }
    out.flush()?;
    Ok(())
}
