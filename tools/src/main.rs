//! `keelctl`: Keel's admin tool. One file per command, as bbolt's `cmd/`:
//! - `snapshot save` ([`snapshot_save`]), `snapshot status` ([`snapshot_status`]),
//!   `snapshot restore` ([`snapshot_restore`]): snapshots in etcd's format, made by keel or by
//!   etcd 3.4, and the one-command migration from etcd;
//! - `migrate --etcd-data-dir DIR` ([`migrate`]): the same from a stopped etcd member's data dir;
//! - `db check`, `db defrag`, `db dump` ([`db_check`], [`db_defrag`], [`db_dump`]): a stopped
//!   member's backend;
//! - `check disk` ([`check_disk`]): the data dir's disk against a WAL's needs;
//! - `wal dump` ([`wal_dump`]): a member's WAL records, read-only.
//!
//! Errors name the file (and, for damaged snapshots, the offset); the exit status is 1.

mod check_disk;
mod db_check;
mod db_defrag;
mod db_dump;
mod migrate;
mod snapshot_file;
mod snapshot_restore;
mod snapshot_save;
mod snapshot_status;
mod wal_dump;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "keelctl", about = "Keel's admin tool", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Snapshots in etcd's format.
    #[command(subcommand)]
    Snapshot(Snapshot),
    /// Makes a keel data dir from a stopped etcd 3.4 member's data dir.
    Migrate(migrate::Args),
    /// A stopped member's backend.
    #[command(subcommand)]
    Db(Db),
    /// Fitness checks.
    #[command(subcommand)]
    Check(Check),
    /// A stopped member's WAL.
    #[command(subcommand)]
    Wal(Wal),
}

#[derive(Debug, Subcommand)]
enum Wal {
    /// Prints every record, read-only.
    Dump(db_check::Args),
}

#[derive(Debug, Subcommand)]
enum Check {
    /// Measures the data dir's disk as a WAL uses it (sequential writes with fdatasync).
    Disk(check_disk::Args),
}

#[derive(Debug, Subcommand)]
enum Db {
    /// Checks every page of the backend.
    Check(db_check::Args),
    /// Rewrites the backend compactly.
    Defrag(db_check::Args),
    /// Prints every stored revision (keys and revisions, for debugging).
    Dump(db_check::Args),
}

#[derive(Debug, Subcommand)]
enum Snapshot {
    /// Stores a member's backend in a snapshot file.
    Save(snapshot_save::Args),
    /// Prints a snapshot file's hash, revision, keys and size (as etcdctl).
    Status(snapshot_status::Args),
    /// Makes a keel data dir from a snapshot (etcd's or keel's).
    Restore(snapshot_restore::Args),
}

fn main() {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Snapshot(Snapshot::Status(a)) => snapshot_status::run(a),
        Command::Migrate(a) => migrate::run(a),
        Command::Db(Db::Check(a)) => db_check::run(a),
        Command::Db(Db::Defrag(a)) => db_defrag::run(a),
        Command::Db(Db::Dump(a)) => db_dump::run(a),
        Command::Wal(Wal::Dump(a)) => wal_dump::run(a),
        Command::Check(Check::Disk(a)) => match check_disk::run(a) {
            Ok(true) => Ok(()),
            Ok(false) => std::process::exit(1),
            Err(e) => Err(e),
        },
        Command::Snapshot(Snapshot::Restore(a)) => snapshot_restore::run(a),
        Command::Snapshot(Snapshot::Save(a)) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(snapshot_save::run(a))),
    };
    if let Err(e) = result {
        eprintln!("Error: {e:#}");
        std::process::exit(1);
    }
}
