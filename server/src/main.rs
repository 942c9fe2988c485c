//! `keel`: starts one member. Flags and `ETCD_*` variables as etcd's (see `keel --help`).

use std::process::ExitCode;

use clap::Parser;
use keel::config::Flags;

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
