//! Fuzz target: a client request's path through a member (see `harness/grpc_request.rs`).

#![no_main]

#[path = "../harness/grpc_request.rs"]
mod harness;

use std::sync::{Mutex, OnceLock};

fn state() -> &'static Mutex<harness::State> {
    static STATE: OnceLock<Mutex<harness::State>> = OnceLock::new();
    STATE.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("keel-fuzz-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        Mutex::new(harness::State::open(&dir))
    })
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::run(state(), data));
