//! `keel`: starts one member. Flags and `ETCD_*` variables as etcd's (see `keel --help`).

use std::process::ExitCode;

use clap::Parser;
use keel::config::Flags;

/// mimalloc instead of glibc's malloc: per-thread free lists without glibc's bin consolidation
/// (see bench/RESULTS.md, "CPU per put").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let flags = Flags::parse();
    let config = match flags.validate() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("keel: {e}");
            return ExitCode::from(2);
        }
    };
    match keel::server::run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keel: {e:#}");
            ExitCode::FAILURE
        }
    }
}
