//! The member's log: etcd's `--logger`, `--log-outputs`, `--log-level` and `--debug`.
//!
//! - `capnslog` (etcd 3.4's default): plain text lines, coloured only on a terminal.
//! - `zap`: one JSON object per line with etcd's zap keys: `level`, `ts` (ISO 8601, UTC, with
//!   milliseconds), `caller`, `msg`, then the event's fields, so that tools written for etcd's
//!   JSON logs read Keel's. Lifecycle messages use etcd's words ("ready to serve client
//!   requests", "published local member to cluster through raft", "slow fdatasync", ...).
//!
//! Outputs: `default` and `stderr` (a systemd unit's stderr goes to the journal), `stdout`, or
//! files, appended to; several at once, comma-separated.

use std::io::Write as _;
use std::sync::{Arc, Mutex};

use tracing::field::{Field, Visit};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, MakeWriter};
use tracing_subscriber::registry::LookupSpan;

use crate::config::compat::LogOutput;

/// One place a log line goes.
#[derive(Clone)]
enum Target {
    Stderr,
    Stdout,
    File(Arc<Mutex<std::fs::File>>),
}

/// Every output of `--log-outputs`; each line is written whole to each.
#[derive(Clone)]
pub struct Outputs(Vec<Target>);

impl Outputs {
    /// Opens the outputs (files are created, mode 0600, or appended to).
    pub fn open(outputs: &[LogOutput]) -> std::io::Result<Outputs> {
        let mut targets = Vec::new();
        for o in outputs {
            targets.push(match o {
                LogOutput::Stderr => Target::Stderr,
                LogOutput::Stdout => Target::Stdout,
                LogOutput::File(path) => {
                    use std::os::unix::fs::OpenOptionsExt;
                    let file = std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .mode(0o600)
                        .open(path)
                        .map_err(|e| {
                            std::io::Error::new(e.kind(), format!("{}: {e}", path.display()))
                        })?;
                    Target::File(Arc::new(Mutex::new(file)))
                }
            });
        }
        Ok(Outputs(targets))
    }

    /// Whether every output is a terminal (then colours help).
    fn terminal(&self) -> bool {
        use std::io::IsTerminal;
        self.0.iter().all(|t| match t {
            Target::Stderr => std::io::stderr().is_terminal(),
            Target::Stdout => std::io::stdout().is_terminal(),
            Target::File(_) => false,
        })
    }
}

/// A line being written: buffered, then written to every target at once, so that lines of
/// different threads never interleave.
pub struct Line {
    buf: Vec<u8>,
    targets: Outputs,
}

impl std::io::Write for Line {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        // A log write that fails has nowhere to be reported: it is dropped.
        for t in &self.targets.0 {
            let _ = match t {
                Target::Stderr => std::io::stderr().lock().write_all(&self.buf),
                Target::Stdout => std::io::stdout().lock().write_all(&self.buf),
                Target::File(f) => match f.lock() {
                    Ok(mut f) => f.write_all(&self.buf),
                    Err(_) => Ok(()),
                },
            };
        }
    }
}

impl<'a> MakeWriter<'a> for Outputs {
    type Writer = Line;

    fn make_writer(&'a self) -> Line {
        Line {
            buf: Vec::with_capacity(256),
            targets: self.clone(),
        }
    }
}

/// Installs the member's logger.
pub fn init(level: &str, json: bool, outputs: &[LogOutput]) -> std::io::Result<()> {
    let level = match level {
        "debug" => tracing::Level::DEBUG,
        "info" => tracing::Level::INFO,
        "warn" => tracing::Level::WARN,
        _ => tracing::Level::ERROR,
    };
    let outputs = Outputs::open(outputs)?;
    let builder = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_ansi(!json && outputs.terminal());
    if json {
        builder.event_format(ZapJson).with_writer(outputs).init();
    } else {
        builder.with_writer(outputs).init();
    }
    Ok(())
}

/// etcd's zap JSON lines.
pub struct ZapJson;

/// The fields of one event, as JSON members.
#[derive(Default)]
struct Fields {
    msg: String,
    members: serde_json::Map<String, serde_json::Value>,
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let text = format!("{value:?}");
        if field.name() == "message" {
            self.msg = text;
        } else {
            self.members.insert(
                field.name().replace('_', "-"),
                serde_json::Value::String(text),
            );
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.msg = value.to_string();
        } else {
            self.members.insert(
                field.name().replace('_', "-"),
                serde_json::Value::String(value.to_string()),
            );
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.members
            .insert(field.name().replace('_', "-"), value.into());
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.members
            .insert(field.name().replace('_', "-"), value.into());
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.members
            .insert(field.name().replace('_', "-"), value.into());
    }
}

impl<S, N> FormatEvent<S, N> for ZapJson
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let meta = event.metadata();
        let mut fields = Fields::default();
        event.record(&mut fields);
        let caller = match (meta.file(), meta.line()) {
            (Some(f), Some(l)) => format!("{}:{l}", short_path(f)),
            _ => meta.target().to_string(),
        };
        // zap's order: level, ts, caller, msg, then the fields.
        let json = |v: &str| serde_json::Value::from(v).to_string();
        let mut text = format!(
            "{{\"level\":{},\"ts\":{},\"caller\":{},\"msg\":{}",
            json(&meta.level().as_str().to_ascii_lowercase()),
            json(&iso8601(std::time::SystemTime::now())),
            json(&caller),
            json(&fields.msg),
        );
        for (k, v) in fields.members {
            text.push(',');
            text.push_str(&json(&k));
            text.push(':');
            text.push_str(&v.to_string());
        }
        text.push('}');
        writer.write_str(&text)?;
        writer.write_char('\n')
    }
}

/// The last two components of a source path (zap's short caller: `etcdserver/server.go:2036`).
fn short_path(path: &str) -> &str {
    let mut slashes = path.rmatch_indices('/');
    slashes.next();
    match slashes.next() {
        Some((i, _)) => &path[i + 1..],
        None => path,
    }
}

/// The proleptic Gregorian date (year, month, day) of `days` since 1970-01-01 (Howard
/// Hinnant's `civil_from_days`). Also keel-bench's dates.
pub fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

/// `t` as zap's ISO 8601 encoder writes it in UTC: `2026-11-27T17:45:31.123Z`.
fn iso8601(t: std::time::SystemTime) -> String {
    let since = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days as i64);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_zaps_iso8601_in_utc() {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(1_795_801_531_123);
        assert_eq!(iso8601(t), "2026-11-27T17:45:31.123Z");
        assert_eq!(iso8601(std::time::UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let leap = std::time::UNIX_EPOCH + std::time::Duration::from_secs(951_782_400);
        assert_eq!(iso8601(leap), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn callers_are_short() {
        assert_eq!(short_path("server/src/raft/node.rs"), "raft/node.rs");
        assert_eq!(short_path("node.rs"), "node.rs");
    }
}
