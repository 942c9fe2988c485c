//! The WAL's record framing and payload decoders on arbitrary bytes: every input is a record,
//! zeros, a stale record or an error, never a panic. Inputs are tried as they are (most fail the
//! CRC) and framed with a valid CRC, so the payload decoders see arbitrary payloads too.
//!
//! Shared by the fuzz target (`fuzz_targets/wal_record.rs`) and the test that replays inputs
//! through it in the test suite (`engine/tests/fuzz_inputs.rs`).

use keel_engine::wal::record::{self, RecordType, Scan};

fn decode(record_type: RecordType, payload: &[u8]) {
    let _ = match record_type {
        RecordType::Entry => record::decode_entry(payload).map(drop),
        RecordType::HardState => record::decode_hard_state(payload).map(drop),
        RecordType::Snapshot => record::decode_snapshot(payload).map(drop),
        RecordType::Metadata => record::decode_metadata(payload).map(drop),
    };
    let _ = record::entry_index_term(payload);
}

/// Walks `buf` as segment bytes from `off`, as recovery does.
fn walk(buf: &[u8], mut off: usize, salt: u32) {
    while off < buf.len() {
        match record::scan(buf, off, salt) {
            Scan::Record(r) => {
                decode(r.record_type, r.payload);
                if r.next <= off {
                    panic!("scan did not advance");
                }
                off = r.next;
            }
            Scan::Zero | Scan::Stale | Scan::Invalid(_) => return,
        }
    }
}

/// One input: walked as segment bytes, then framed as a record with a valid checksum (type
/// from the first byte, the rest as the payload) and walked again.
pub fn run(data: &[u8]) {
    if data.is_empty() {
        return;
    }
    walk(data, 0, 0);
    let mut frame = vec![0u8; record::HEADER_LEN];
    let payload = &data[1..];
    frame[4..8].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    frame[8] = data[0] % 5;
    frame.extend_from_slice(payload);
    while !frame.len().is_multiple_of(record::RECORD_ALIGN) {
        frame.push(0);
    }
    let mut crc = crc32fast::Hasher::new();
    crc.update(&frame[4..record::HEADER_LEN]);
    crc.update(payload);
    let crc = crc.finalize();
    frame[0..4].copy_from_slice(&crc.to_le_bytes());
    assert!(record::frame_checksum_ok(
        &frame[..record::HEADER_LEN + payload.len()]
    ));
    walk(&frame, 0, 0);
}
