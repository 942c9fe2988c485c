//! `keelctl snapshot status FILE`: what `etcdctl snapshot status` prints, from the file alone
//! (etcd's `snapshot.Status`):
//! - hash: CRC-32C over each bucket's name, then each key and value, in order;
//! - revision: the main revision of the last key of the `key` bucket;
//! - total keys: entries in every bucket;
//! - total size: the database's size (without the sha256 trailer).

use std::path::PathBuf;

use keel_engine::btree::bbolt;

use crate::snapshot_file::SnapshotFile;

/// Output formats, as etcdctl's `-w`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Simple,
    Table,
    Json,
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The snapshot file.
    pub file: PathBuf,
    /// Output format.
    #[arg(short = 'w', long = "write-out", value_enum, default_value = "simple")]
    pub write_out: Format,
}

/// etcd's figures for a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub hash: u32,
    pub revision: i64,
    pub total_key: u64,
    pub total_size: u64,
}

/// The status of the database bytes of `file`.
pub fn status(file: &SnapshotFile) -> anyhow::Result<Status> {
    let db = file.db();
    let mut hash = 0u32;
    let mut total_key = 0u64;
    let mut last_rev = None;
    let mut bucket: Vec<u8> = Vec::new();
    let mut first = true;
    let names = bbolt::bucket_names(db, &file.name())?;
    let mut names = names.into_iter().peekable();
    // Empty buckets still hash their names: walk the names and the entries together.
    let mut emit_until = |upto: Option<&[u8]>, hash: &mut u32| {
        while let Some(n) = names.peek() {
            if upto.is_some_and(|u| n.as_slice() > u) {
                break;
            }
            let n = names.next().expect("peeked");
            if upto == Some(n.as_slice()) {
                *hash = crc32c::crc32c_append(*hash, &n);
                break;
            }
            *hash = crc32c::crc32c_append(*hash, &n);
        }
    };
    bbolt::visit(db, &file.name(), &mut |b, k, v| {
        if first || b != bucket.as_slice() {
            first = false;
            bucket = b.to_vec();
            emit_until(Some(b), &mut hash);
        }
        hash = crc32c::crc32c_append(hash, k);
        hash = crc32c::crc32c_append(hash, v);
        total_key += 1;
        if b == b"key" && k.len() >= 8 {
            #[allow(
                clippy::big_endian_bytes,
                reason = "etcd's revision keys are big-endian"
            )]
            let main = i64::from_be_bytes(k[..8].try_into().expect("8 bytes"));
            last_rev = Some(main);
        }
        Ok(())
    })?;
    emit_until(None, &mut hash);
    Ok(Status {
        hash,
        revision: last_rev.unwrap_or(0),
        total_key,
        total_size: db.len() as u64,
    })
}

/// go-humanize's `Bytes`, which etcdctl prints sizes with ("53 kB").
pub fn humanize(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["B", "kB", "MB", "GB", "TB", "PB", "EB"];
    if bytes < 10 {
        return format!("{bytes} B");
    }
    let e = ((bytes as f64).ln() / 1000f64.ln()).floor() as usize;
    let v = (bytes as f64 / 1000f64.powi(e as i32) * 10.0 + 0.5).floor() / 10.0;
    if v < 10.0 {
        format!("{v:.1} {}", UNITS[e])
    } else {
        format!("{v:.0} {}", UNITS[e])
    }
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    let file = SnapshotFile::open(&args.file)?;
    let s = status(&file)?;
    match args.write_out {
        Format::Simple => println!(
            "{:x}, {}, {}, {}",
            s.hash,
            s.revision,
            s.total_key,
            humanize(s.total_size)
        ),
        Format::Json => println!(
            "{{\"hash\":{},\"revision\":{},\"totalKey\":{},\"totalSize\":{}}}",
            s.hash, s.revision, s.total_key, s.total_size
        ),
        Format::Table => {
            let cells = [
                format!("{:x}", s.hash),
                s.revision.to_string(),
                s.total_key.to_string(),
                humanize(s.total_size),
            ];
            let heads = ["HASH", "REVISION", "TOTAL KEYS", "TOTAL SIZE"];
            let widths: Vec<usize> = heads
                .iter()
                .zip(&cells)
                .map(|(h, c)| h.len().max(c.len()) + 2)
                .collect();
            let line: String = widths
                .iter()
                .map(|w| format!("+{}", "-".repeat(*w)))
                .collect::<String>()
                + "+";
            // As etcdctl's table: headers centred, values right-aligned.
            let head: String = heads
                .iter()
                .zip(&widths)
                .map(|(c, w)| format!("|{:^w$}", c, w = *w))
                .collect::<String>()
                + "|";
            let row: String = cells
                .iter()
                .zip(&widths)
                .map(|(c, w)| format!("| {:>w$} ", c, w = *w - 2))
                .collect::<String>()
                + "|";
            println!("{line}");
            println!("{head}");
            println!("{line}");
            println!("{row}");
            println!("{line}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes_print_as_go_humanize_prints_them() {
        assert_eq!(super::humanize(5), "5 B");
        assert_eq!(super::humanize(53_248), "53 kB");
        assert_eq!(super::humanize(1_500), "1.5 kB");
        assert_eq!(super::humanize(2_147_483_648), "2.1 GB");
    }
}
