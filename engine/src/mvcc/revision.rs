//! Revisions and their 17-byte encoding, as etcd's `mvcc/revision.go`.
//!
//! A revision is `(main, sub)`: `main` is the store revision of a write transaction, `sub` the
//! order of the change inside it. The `key` bucket is keyed by
//! ```text
//! main (8 bytes, big-endian) | '_' | sub (8 bytes, big-endian) [ | 't' for a tombstone ]
//! ```
//! Big-endian so that bytewise order is revision order; a tombstone's 18-byte key sorts right
//! after its 17-byte prefix. This module is the one place that encodes integers big-endian.

use crate::error::{Error, Result};

/// Length of an encoded revision.
pub const REV_BYTES: usize = 17;
/// Length of an encoded tombstone revision.
pub const MARKED_REV_BYTES: usize = 18;
/// The tombstone marker byte.
pub const TOMBSTONE: u8 = b't';

/// A revision: `(main, sub)`, ordered by `main` then `sub`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Revision {
    /// Store revision of the write transaction.
    pub main: i64,
    /// Position of the change inside it.
    pub sub: i64,
}

impl Revision {
    /// `(main, sub)`.
    pub const fn new(main: i64, sub: i64) -> Self {
        Revision { main, sub }
    }

    /// The bucket key of this revision (18 bytes with the tombstone marker).
    #[allow(
        clippy::big_endian_bytes,
        reason = "revision keys sort bytewise, as in etcd"
    )]
    pub fn to_bytes(self, tombstone: bool) -> Vec<u8> {
        let mut b = Vec::with_capacity(MARKED_REV_BYTES);
        b.extend_from_slice(&(self.main as u64).to_be_bytes());
        b.push(b'_');
        b.extend_from_slice(&(self.sub as u64).to_be_bytes());
        if tombstone {
            b.push(TOMBSTONE);
        }
        b
    }

    /// The 8-byte big-endian prefix of revision `main` (an exclusive or inclusive range bound).
    #[allow(
        clippy::big_endian_bytes,
        reason = "revision keys sort bytewise, as in etcd"
    )]
    pub fn main_prefix(main: i64) -> Vec<u8> {
        (main as u64).to_be_bytes().to_vec()
    }

    /// Decodes a bucket key: the revision and whether it is a tombstone.
    #[allow(
        clippy::big_endian_bytes,
        reason = "revision keys sort bytewise, as in etcd"
    )]
    pub fn from_bytes(b: &[u8]) -> Result<(Revision, bool)> {
        let tombstone = match b.len() {
            REV_BYTES => false,
            MARKED_REV_BYTES if b[17] == TOMBSTONE => true,
            _ => {
                return Err(Error::CorruptRecord(format!(
                    "malformed revision key of {} bytes in the key bucket",
                    b.len()
                )));
            }
        };
        let main = u64::from_be_bytes(b[0..8].try_into().expect("8 bytes")) as i64;
        let sub = u64::from_be_bytes(b[9..17].try_into().expect("8 bytes")) as i64;
        Ok((Revision { main, sub }, tombstone))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_round_trips_and_sorts_like_revisions() {
        let revs = [
            Revision::new(1, 0),
            Revision::new(1, 5),
            Revision::new(2, 0),
            Revision::new(256, 1),
        ];
        for w in revs.windows(2) {
            assert!(w[0].to_bytes(false) < w[1].to_bytes(false));
            assert!(w[0].to_bytes(true) < w[1].to_bytes(false));
        }
        for r in revs {
            assert_eq!(r.to_bytes(false).len(), REV_BYTES);
            assert_eq!(
                Revision::from_bytes(&r.to_bytes(false)).unwrap(),
                (r, false)
            );
            assert_eq!(Revision::from_bytes(&r.to_bytes(true)).unwrap(), (r, true));
        }
        // Same bytes as etcd's revToBytes for (2, 1).
        let mut etcd = vec![0, 0, 0, 0, 0, 0, 0, 2, b'_', 0, 0, 0, 0, 0, 0, 0, 1];
        assert_eq!(Revision::new(2, 1).to_bytes(false), etcd);
        etcd.push(b't');
        assert_eq!(Revision::new(2, 1).to_bytes(true), etcd);
        assert!(Revision::from_bytes(&[0; 5]).is_err());
        let mut bad = Revision::new(1, 1).to_bytes(true);
        bad[17] = b'x';
        assert!(Revision::from_bytes(&bad).is_err());
    }
}
