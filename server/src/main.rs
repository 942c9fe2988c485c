//! `keel`: starts one member. Flags and `ETCD_*` variables as etcd's (see `keel --help`).

use std::process::ExitCode;

use clap::Parser;
use keel::config::Flags;

/// mimalloc instead of glibc's malloc: per-thread free lists without glibc's bin consolidation
/// (see bench/RESULTS.md, "CPU per put").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let mut flags = Flags::parse();
    if let Some(path) = keel::config::set(flags.compat.config_file.clone()) {
        flags = match keel::config::file::load(&path) {
            Ok(mut f) => {
                f.compat.config_file = Some(path);
                f
            }
            Err(e) => {
                eprintln!("keel: {e}");
                return ExitCode::from(2);
            }
        };
    }
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
