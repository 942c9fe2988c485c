//! Fuzz target: the WAL's record decoders (see `harness/wal_record.rs`).

#![no_main]

#[path = "../harness/wal_record.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::run(data));
