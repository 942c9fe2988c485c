//! Fuzz target: the backend's page accessors (see `harness/btree_page.rs`).

#![no_main]

#[path = "../harness/btree_page.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::run(data));
