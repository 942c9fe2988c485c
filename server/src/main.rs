//! `keel`: starts one member. Flags and `ETCD_*` variables as etcd's (see `keel --help`).

use std::process::ExitCode;

use clap::Parser;
use keel::config::Flags;

/// mimalloc instead of glibc's malloc: per-thread free lists without glibc's bin consolidation
/// (see bench/RESULTS.md, "CPU per put").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // `keel gateway start [flags]`: etcd's L4 gateway instead of a member.
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == "gateway") {
        if args.get(2).is_none_or(|a| a != "start") {
            eprintln!(
                "usage: keel gateway start [--endpoints=...] [--listen-addr=...] [--retry-delay=...]"
            );
            return ExitCode::from(2);
        }
        let flags = keel::gateway::GatewayFlags::parse_from(
            std::iter::once(std::ffi::OsString::from("keel gateway start"))
                .chain(args[3..].iter().cloned()),
        );
        return match keel::gateway::run(flags) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("keel gateway: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    // `keel grpc-proxy start [flags]`: etcd's gRPC proxy instead of a member.
    if args.get(1).is_some_and(|a| a == "grpc-proxy") {
        if args.get(2).is_none_or(|a| a != "start") {
            eprintln!("usage: keel grpc-proxy start [--endpoints=...] [--listen-addr=...] ...");
            return ExitCode::from(2);
        }
        let flags = keel::grpc_proxy::ProxyFlags::parse_from(
            std::iter::once(std::ffi::OsString::from("keel grpc-proxy start"))
                .chain(args[3..].iter().cloned()),
        );
        return match keel::grpc_proxy::run(flags) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("keel grpc-proxy: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
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
