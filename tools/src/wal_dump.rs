//! `keelctl wal dump --data-dir DIR`: the records of a member's WAL, read-only (recovery, which
//! truncates a torn tail, is not run): one line per record with its segment and offset:
//! `entry index=… term=… type=… data=N bytes`, `hardstate term=… vote=… commit=…`,
//! `snapshot index=… term=…`, `metadata cluster=… member=…`.
//!
//! A record that does not check is reported with the file and offset. As recovery judges it: if
//! a valid record of a later write follows it (its batch start lies past the damage), the damage
//! hit durable data, and the exit status is 1; otherwise, in the last segment, it is the torn
//! tail a crash leaves, which the member truncates when it starts.

use std::io::Write as _;
use std::path::PathBuf;

use anyhow::{Context, bail};
use keel_engine::wal::record::{self, RecordType, Scan};
use keel_engine::wal::segment;

pub fn run(args: &crate::db_check::Args) -> anyhow::Result<()> {
    let dir = args.data_dir.join("member").join("wal");
    let mut segments: Vec<(u64, u64, PathBuf)> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            segment::parse_segment_name(&name).map(|(seq, first)| (seq, first, e.path()))
        })
        .collect();
    segments.sort();
    if segments.is_empty() {
        bail!("{} holds no WAL segment", dir.display());
    }
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let last = segments.len() - 1;
    let mut damaged = false;
    for (i, (seq, first, path)) in segments.iter().enumerate() {
        let buf = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        segment::check_header(path, &buf, *seq, *first)?;
        let name = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        writeln!(out, "# {name}: segment {seq}, first index {first}")?;
        let salt = segment::salt(*seq);
        let mut off = segment::DATA_START as usize;
        loop {
            match record::scan(&buf, off, salt) {
                Scan::Record(r) => {
                    let line = match r.record_type {
                        RecordType::Entry => {
                            let e = record::decode_entry(r.payload)
                                .map_err(|e| anyhow::anyhow!("{name}@{off}: {e}"))?;
                            format!(
                                "entry index={} term={} type={:?} data={} bytes",
                                e.index,
                                e.term,
                                e.get_entry_type(),
                                e.data.len()
                            )
                        }
                        RecordType::HardState => {
                            let h = record::decode_hard_state(r.payload)
                                .map_err(|e| anyhow::anyhow!("{name}@{off}: {e}"))?;
                            format!(
                                "hardstate term={} vote={:x} commit={}",
                                h.term, h.vote, h.commit
                            )
                        }
                        RecordType::Snapshot => {
                            let s = record::decode_snapshot(r.payload)
                                .map_err(|e| anyhow::anyhow!("{name}@{off}: {e}"))?;
                            format!("snapshot index={} term={}", s.index, s.term)
                        }
                        RecordType::Metadata => {
                            let m = record::decode_metadata(r.payload)
                                .map_err(|e| anyhow::anyhow!("{name}@{off}: {e}"))?;
                            format!(
                                "metadata cluster={:x} member={:x}",
                                m.cluster_id, m.member_id
                            )
                        }
                    };
                    writeln!(out, "{name}@{off} {line}")?;
                    off = r.next;
                }
                Scan::Zero | Scan::Stale => break,
                Scan::Invalid(why) => {
                    let later_write = (off + record::RECORD_ALIGN..buf.len())
                        .step_by(record::RECORD_ALIGN)
                        .any(|o| {
                            matches!(record::scan(&buf, o, salt),
                                Scan::Record(r) if r.batch_start as usize > off)
                        });
                    if i == last && !later_write {
                        writeln!(
                            out,
                            "{name}@{off} end: {why} (a torn tail if it is the last write; the \
                             member truncates it at start)"
                        )?;
                    } else {
                        writeln!(out, "{name}@{off} CORRUPT: {why}")?;
                        damaged = true;
                    }
                    break;
                }
            }
        }
    }
    out.flush()?;
    if damaged {
        bail!("{} has a damaged sealed segment (see above)", dir.display());
    }
    Ok(())
}
