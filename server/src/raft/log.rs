//! raft-rs logs through `slog`; this drain forwards its records to `tracing` (target `raft`), so
//! elections, leader changes and refused messages reach the member's log.

use slog::{Drain, KV, Level, OwnedKVList, Record, Serializer};

/// A `slog` drain into `tracing`.
#[derive(Debug, Clone, Copy)]
pub struct TracingDrain;

/// Collects a record's key-values as `key=value` text.
struct Collect(String);

impl Serializer for Collect {
    fn emit_arguments(&mut self, key: slog::Key, val: &std::fmt::Arguments<'_>) -> slog::Result {
        use std::fmt::Write as _;
        let _ = write!(self.0, " {key}={val}");
        Ok(())
    }
}

impl Drain for TracingDrain {
    type Ok = ();
    type Err = slog::Never;

    fn log(&self, record: &Record<'_>, values: &OwnedKVList) -> Result<(), slog::Never> {
        let mut kv = Collect(String::new());
        let _ = record.kv().serialize(record, &mut kv);
        let _ = values.serialize(record, &mut kv);
        let msg = record.msg();
        match record.level() {
            Level::Critical | Level::Error => tracing::error!(target: "raft", "{msg}{}", kv.0),
            Level::Warning => tracing::warn!(target: "raft", "{msg}{}", kv.0),
            Level::Info => tracing::info!(target: "raft", "{msg}{}", kv.0),
            Level::Debug => tracing::debug!(target: "raft", "{msg}{}", kv.0),
            Level::Trace => tracing::trace!(target: "raft", "{msg}{}", kv.0),
        }
        Ok(())
    }
}

/// The logger given to raft-rs.
pub fn logger() -> slog::Logger {
    slog::Logger::root(TracingDrain, slog::o!())
}
