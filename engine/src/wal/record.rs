//! WAL record framing: how one record is laid out in a segment.
//!
//! # Encoding format
//!
//! Every record is a 24-byte header followed by its payload and zero padding up to a multiple of
//! 8 bytes, so headers are always 8-byte aligned within a segment. All integers are little-endian.
//!
//! ```text
//! offset size field
//!      0    4 crc          CRC-32 (IEEE, crc32fast) of header bytes [4, 24) then the payload
//!      4    4 length       payload length in bytes (padding excluded)
//!      8    1 type         1 entry, 2 hard state, 3 snapshot marker, 4 metadata (0 is never valid)
//!      9    3 reserved     zero
//!     12    4 salt         low 32 bits of the sequence number of the segment holding the record
//!     16    4 batch_start  offset in the segment of the first record of the write that carried it
//!     20    4 reserved     zero
//!     24    n payload      see below
//!   24+n  pad zero padding to the next multiple of 8
//! ```
//!
//! Payloads:
//! - entry: `index u64, term u64, entry_type u8, 3 zero bytes, context_len u32, context, data`
//! - hard state: `term u64, vote u64, commit u64`
//! - snapshot marker: `index u64, term u64, conf_state` (raft `ConfState` in protobuf encoding)
//! - metadata: `cluster_id u64, member_id u64`
//!
//! # Why the salt and the batch start
//! - Recycled segments are zeroed again before reuse (`segment::prepare_spare`); should stale
//!   records of a previous life ever remain past the live end, they carry another salt, so they
//!   never parse as records of this segment.
//! - A crash in the middle of a write can leave any subset of that write's sectors on disk. Recovery
//!   must tell such a torn tail (truncate) from corruption of acknowledged data (fail). A write is
//!   only issued after the previous one was made durable, so a valid record whose `batch_start`
//!   lies *past* a damaged record proves the damaged record belonged to an earlier, durable write:
//!   that is corruption. A damaged record followed only by records of its own write is a torn
//!   tail. See `recovery.rs`.
//! - The length is checked against the bytes left in the segment before anything is allocated, and
//!   the CRC covers the length, so a damaged length cannot make recovery read past a record.

use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, EntryType, HardState};

/// Size of the record header.
pub const HEADER_LEN: usize = 24;
/// Records start at multiples of this within a segment.
pub const RECORD_ALIGN: usize = 8;
const _: () = assert!(HEADER_LEN.is_multiple_of(RECORD_ALIGN));

/// Fixed part of an entry payload (index, term, type, reserved, context length).
const ENTRY_FIXED_LEN: usize = 24;
const HARD_STATE_LEN: usize = 24;
const METADATA_LEN: usize = 16;
const SNAPSHOT_FIXED_LEN: usize = 16;

/// The record types, as stored in the header's type byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RecordType {
    /// A raft log entry.
    Entry = 1,
    /// The raft hard state (term, vote, commit).
    HardState = 2,
    /// A snapshot marker: the log up to (index, term) is covered by a snapshot.
    Snapshot = 3,
    /// Segment metadata: the cluster and member this WAL belongs to.
    Metadata = 4,
}

impl RecordType {
    fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Entry),
            2 => Some(Self::HardState),
            3 => Some(Self::Snapshot),
            4 => Some(Self::Metadata),
            _ => None,
        }
    }
}

/// The cluster and member a WAL belongs to, written at the start of every segment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Metadata {
    /// Raft cluster id.
    pub cluster_id: u64,
    /// This member's raft id.
    pub member_id: u64,
}

/// A snapshot marker: everything up to `index` (at `term`) is covered by a snapshot held elsewhere
/// (the backend), so the log restarts at `index + 1`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SnapshotMarker {
    /// Last raft index covered by the snapshot.
    pub index: u64,
    /// Term of that index.
    pub term: u64,
    /// Raft membership as of that index.
    pub conf_state: ConfState,
}

/// A record to append, borrowing its content so encoding copies it only once, into the batch.
#[derive(Debug, Clone, Copy)]
pub enum RecordRef<'a> {
    /// A raft entry.
    Entry(&'a Entry),
    /// The raft hard state.
    HardState(&'a HardState),
    /// A snapshot marker.
    Snapshot(&'a SnapshotMarker),
    /// Segment metadata.
    Metadata(&'a Metadata),
}

/// Size of a record on disk, header and padding included, given its payload length.
pub fn framed_len(payload_len: usize) -> usize {
    (HEADER_LEN + payload_len).next_multiple_of(RECORD_ALIGN)
}

impl RecordRef<'_> {
    /// Payload length of this record once encoded.
    pub fn payload_len(&self) -> usize {
        match self {
            RecordRef::Entry(e) => ENTRY_FIXED_LEN + e.context.len() + e.data.len(),
            RecordRef::HardState(_) => HARD_STATE_LEN,
            RecordRef::Snapshot(s) => SNAPSHOT_FIXED_LEN + s.conf_state.compute_size() as usize,
            RecordRef::Metadata(_) => METADATA_LEN,
        }
    }

    fn record_type(&self) -> RecordType {
        match self {
            RecordRef::Entry(_) => RecordType::Entry,
            RecordRef::HardState(_) => RecordType::HardState,
            RecordRef::Snapshot(_) => RecordType::Snapshot,
            RecordRef::Metadata(_) => RecordType::Metadata,
        }
    }

    /// Appends the framed record (header, payload, padding) to `out`.
    pub fn encode(&self, salt: u32, batch_start: u32, out: &mut Vec<u8>) {
        let start = out.len();
        let payload_len = self.payload_len();
        out.resize(start + HEADER_LEN, 0);
        match self {
            RecordRef::Entry(e) => {
                out.extend_from_slice(&e.index.to_le_bytes());
                out.extend_from_slice(&e.term.to_le_bytes());
                out.push(e.get_entry_type() as u8);
                out.extend_from_slice(&[0; 3]);
                let context_len = u32::try_from(e.context.len()).expect("context bounded by max");
                out.extend_from_slice(&context_len.to_le_bytes());
                out.extend_from_slice(&e.context);
                out.extend_from_slice(&e.data);
            }
            RecordRef::HardState(h) => {
                out.extend_from_slice(&h.term.to_le_bytes());
                out.extend_from_slice(&h.vote.to_le_bytes());
                out.extend_from_slice(&h.commit.to_le_bytes());
            }
            RecordRef::Snapshot(s) => {
                out.extend_from_slice(&s.index.to_le_bytes());
                out.extend_from_slice(&s.term.to_le_bytes());
                s.conf_state
                    .write_to_vec(out)
                    .expect("encoding a ConfState into a Vec");
            }
            RecordRef::Metadata(m) => {
                out.extend_from_slice(&m.cluster_id.to_le_bytes());
                out.extend_from_slice(&m.member_id.to_le_bytes());
            }
        }
        debug_assert_eq!(out.len() - start - HEADER_LEN, payload_len);
        let header = &mut out[start..start + HEADER_LEN];
        let length = u32::try_from(payload_len).expect("payload bounded by max record size");
        header[4..8].copy_from_slice(&length.to_le_bytes());
        header[8] = self.record_type() as u8;
        header[12..16].copy_from_slice(&salt.to_le_bytes());
        header[16..20].copy_from_slice(&batch_start.to_le_bytes());
        let mut crc = crc32fast::Hasher::new();
        crc.update(&out[start + 4..]);
        let crc = crc.finalize();
        out[start..start + 4].copy_from_slice(&crc.to_le_bytes());
        out.resize(start + framed_len(payload_len), 0);
    }
}

/// A record read back from a segment.
#[derive(Debug, Clone, Copy)]
pub struct RawRecord<'a> {
    /// Its type.
    pub record_type: RecordType,
    /// Offset of the first record of the write that carried it.
    pub batch_start: u32,
    /// The payload (padding excluded).
    pub payload: &'a [u8],
    /// Offset just past this record and its padding.
    pub next: usize,
}

/// What is found at an offset of a segment.
#[derive(Debug, Clone, Copy)]
pub enum Scan<'a> {
    /// A record whose checksum matches.
    Record(RawRecord<'a>),
    /// A zeroed header, or too few bytes left for a header: nothing was ever written here.
    Zero,
    /// A well-formed header of another segment's life (recycled segment): the live log ends here.
    Stale,
    /// Something that is not a valid record: torn or corrupt. The string says what is wrong.
    Invalid(&'static str),
}

fn u32_at(buf: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(buf[off..off + 4].try_into().expect("4 bytes"))
}

fn u64_at(buf: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(buf[off..off + 8].try_into().expect("8 bytes"))
}

/// Reads the record at `off` of segment bytes `buf` (whose records carry `salt`).
///
/// Never panics and never allocates, whatever the bytes are.
pub fn scan(buf: &[u8], off: usize, salt: u32) -> Scan<'_> {
    let Some(header) = buf.get(off..off + HEADER_LEN) else {
        return Scan::Zero;
    };
    if header.iter().all(|&b| b == 0) {
        return Scan::Zero;
    }
    if u32_at(header, 12) != salt {
        return Scan::Stale;
    }
    let length = u32_at(header, 4) as usize;
    let Some(record_type) = RecordType::from_u8(header[8]) else {
        return Scan::Invalid("unknown record type");
    };
    if header[9..12] != [0; 3] || header[20..24] != [0; 4] {
        return Scan::Invalid("reserved header bytes are not zero");
    }
    let batch_start = u32_at(header, 16);
    if batch_start as usize > off {
        return Scan::Invalid("batch start lies after the record");
    }
    let payload_end = off + HEADER_LEN + length;
    if payload_end > buf.len() {
        return Scan::Invalid("record length runs past the end of the segment");
    }
    let mut crc = crc32fast::Hasher::new();
    crc.update(&header[4..]);
    crc.update(&buf[off + HEADER_LEN..payload_end]);
    if crc.finalize() != u32_at(header, 0) {
        return Scan::Invalid("checksum mismatch");
    }
    Scan::Record(RawRecord {
        record_type,
        batch_start,
        payload: &buf[off + HEADER_LEN..payload_end],
        next: off + framed_len(length),
    })
}

/// Checks the CRC of one framed record read back on its own (`frame` = header + payload).
pub fn frame_checksum_ok(frame: &[u8]) -> bool {
    if frame.len() < HEADER_LEN {
        return false;
    }
    let mut crc = crc32fast::Hasher::new();
    crc.update(&frame[4..]);
    crc.finalize() == u32_at(frame, 0)
}

/// The index and term of an entry payload, without decoding the rest.
pub fn entry_index_term(payload: &[u8]) -> Result<(u64, u64), &'static str> {
    if payload.len() < ENTRY_FIXED_LEN {
        return Err("entry record too short");
    }
    Ok((u64_at(payload, 0), u64_at(payload, 8)))
}

/// Decodes an entry payload.
pub fn decode_entry(payload: &[u8]) -> Result<Entry, &'static str> {
    let (index, term) = entry_index_term(payload)?;
    let entry_type = match payload[16] {
        0 => EntryType::EntryNormal,
        1 => EntryType::EntryConfChange,
        2 => EntryType::EntryConfChangeV2,
        _ => return Err("unknown entry type"),
    };
    let context_len = u32_at(payload, 20) as usize;
    let rest = &payload[ENTRY_FIXED_LEN..];
    if context_len > rest.len() {
        return Err("entry context length runs past the record");
    }
    Ok(Entry {
        index,
        term,
        entry_type,
        context: rest[..context_len].to_vec().into(),
        data: rest[context_len..].to_vec().into(),
        ..Default::default()
    })
}

/// Decodes a hard state payload.
pub fn decode_hard_state(payload: &[u8]) -> Result<HardState, &'static str> {
    if payload.len() != HARD_STATE_LEN {
        return Err("hard state record has the wrong length");
    }
    Ok(HardState {
        term: u64_at(payload, 0),
        vote: u64_at(payload, 8),
        commit: u64_at(payload, 16),
        ..Default::default()
    })
}

/// Decodes a snapshot marker payload.
pub fn decode_snapshot(payload: &[u8]) -> Result<SnapshotMarker, &'static str> {
    if payload.len() < SNAPSHOT_FIXED_LEN {
        return Err("snapshot record too short");
    }
    let conf_state = ConfState::parse_from_bytes(&payload[SNAPSHOT_FIXED_LEN..])
        .map_err(|_| "snapshot record holds an undecodable ConfState")?;
    Ok(SnapshotMarker {
        index: u64_at(payload, 0),
        term: u64_at(payload, 8),
        conf_state,
    })
}

/// Decodes a metadata payload.
pub fn decode_metadata(payload: &[u8]) -> Result<Metadata, &'static str> {
    if payload.len() != METADATA_LEN {
        return Err("metadata record has the wrong length");
    }
    Ok(Metadata {
        cluster_id: u64_at(payload, 0),
        member_id: u64_at(payload, 8),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, term: u64, data: &[u8]) -> Entry {
        Entry {
            index,
            term,
            data: data.to_vec().into(),
            ..Default::default()
        }
    }

    fn one(rec: RecordRef<'_>) -> Vec<u8> {
        let mut out = Vec::new();
        rec.encode(7, 0, &mut out);
        out
    }

    fn payload(buf: &[u8]) -> (RecordType, &[u8]) {
        match scan(buf, 0, 7) {
            Scan::Record(r) => {
                assert_eq!(r.next, buf.len());
                (r.record_type, r.payload)
            }
            other => panic!("expected a record, got {other:?}"),
        }
    }

    #[test]
    fn entry_round_trip_keeps_every_field() {
        let mut e = entry(42, 3, b"hello world");
        e.context = b"ctx".to_vec().into();
        e.set_entry_type(EntryType::EntryConfChangeV2);
        let buf = one(RecordRef::Entry(&e));
        assert_eq!(buf.len() % RECORD_ALIGN, 0);
        let (t, p) = payload(&buf);
        assert_eq!(t, RecordType::Entry);
        assert_eq!(decode_entry(p).unwrap(), e);
        assert_eq!(entry_index_term(p).unwrap(), (42, 3));
    }

    #[test]
    fn empty_entry_round_trips() {
        let e = entry(1, 1, b"");
        let buf = one(RecordRef::Entry(&e));
        let (_, p) = payload(&buf);
        assert_eq!(decode_entry(p).unwrap(), e);
    }

    #[test]
    fn hard_state_snapshot_metadata_round_trip() {
        let hs = HardState {
            term: 5,
            vote: 2,
            commit: 99,
            ..Default::default()
        };
        let buf = one(RecordRef::HardState(&hs));
        let (t, p) = payload(&buf);
        assert_eq!(t, RecordType::HardState);
        assert_eq!(decode_hard_state(p).unwrap(), hs);

        let cs = ConfState {
            voters: vec![1, 2, 3],
            learners: vec![4],
            ..Default::default()
        };
        let snap = SnapshotMarker {
            index: 1000,
            term: 4,
            conf_state: cs,
        };
        let buf = one(RecordRef::Snapshot(&snap));
        let (t, p) = payload(&buf);
        assert_eq!(t, RecordType::Snapshot);
        assert_eq!(decode_snapshot(p).unwrap(), snap);

        let md = Metadata {
            cluster_id: 0xdead_beef,
            member_id: 0x1234,
        };
        let buf = one(RecordRef::Metadata(&md));
        let (t, p) = payload(&buf);
        assert_eq!(t, RecordType::Metadata);
        assert_eq!(decode_metadata(p).unwrap(), md);
    }

    #[test]
    fn every_single_byte_flip_is_detected() {
        let e = entry(9, 2, b"some payload bytes");
        let buf = one(RecordRef::Entry(&e));
        let payload_end = HEADER_LEN + RecordRef::Entry(&e).payload_len();
        for i in 0..payload_end {
            let mut bad = buf.clone();
            bad[i] ^= 0x40;
            assert!(
                !matches!(scan(&bad, 0, 7), Scan::Record(_)),
                "flip at byte {i} was not detected"
            );
        }
    }

    #[test]
    fn other_salt_zero_and_short_buffers() {
        let e = entry(9, 2, b"x");
        let buf = one(RecordRef::Entry(&e));
        assert!(matches!(scan(&buf, 0, 8), Scan::Stale));
        assert!(matches!(scan(&[0u8; 64], 0, 7), Scan::Zero));
        assert!(matches!(scan(&buf[..10], 0, 7), Scan::Zero));
        // A header promising more bytes than the segment has is invalid, not a panic.
        let mut long = buf.clone();
        long.truncate(HEADER_LEN + 4);
        assert!(matches!(scan(&long, 0, 7), Scan::Invalid(_)));
    }

    #[test]
    fn malformed_payloads_are_errors() {
        assert!(decode_entry(&[0; 10]).is_err());
        let mut p = vec![0u8; ENTRY_FIXED_LEN];
        p[20..24].copy_from_slice(&100u32.to_le_bytes());
        assert!(decode_entry(&p).is_err());
        p[16] = 9;
        assert!(decode_entry(&p).is_err());
        assert!(decode_hard_state(&[0; 23]).is_err());
        assert!(decode_metadata(&[0; 17]).is_err());
        assert!(decode_snapshot(&[0; 15]).is_err());
        let mut s = vec![0u8; 16];
        s.extend_from_slice(&[0xff, 0xff, 0xff]);
        assert!(decode_snapshot(&s).is_err());
    }
}
