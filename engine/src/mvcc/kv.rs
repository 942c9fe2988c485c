//! `mvccpb.KeyValue`, the value stored in the `key` bucket, with etcd's field numbers.
//!
//! Encoded with prost, which writes fields in tag order and omits zero values, as etcd's gogo
//! marshaller does: the bytes are identical, so `HashKV` matches and a Keel backend's history is a
//! faithful etcd history.

/// A key's state at one revision.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct KeyValue {
    /// The key.
    #[prost(bytes = "vec", tag = "1")]
    pub key: Vec<u8>,
    /// Revision of the last creation of the key.
    #[prost(int64, tag = "2")]
    pub create_revision: i64,
    /// Revision of the last modification.
    #[prost(int64, tag = "3")]
    pub mod_revision: i64,
    /// Number of modifications since creation (a delete resets it).
    #[prost(int64, tag = "4")]
    pub version: i64,
    /// The value.
    #[prost(bytes = "vec", tag = "5")]
    pub value: Vec<u8>,
    /// Attached lease ID (0: none).
    #[prost(int64, tag = "6")]
    pub lease: i64,
}

/// The fields of a stored [`KeyValue`] that rebuilding the index needs. Decoding the same
/// bytes as this skips the value instead of copying it.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct KeyHeader {
    #[prost(bytes = "vec", tag = "1")]
    pub key: Vec<u8>,
    #[prost(int64, tag = "2")]
    pub create_revision: i64,
    #[prost(int64, tag = "4")]
    pub version: i64,
    #[prost(int64, tag = "6")]
    pub lease: i64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;

    #[test]
    fn encoding_matches_etcd_bytes() {
        // gogo-marshalled mvccpb.KeyValue{Key:"foo", CreateRevision:2, ModRevision:2, Version:1,
        // Value:"bar"}: field tags 1..5 in order, lease omitted.
        let kv = KeyValue {
            key: b"foo".to_vec(),
            create_revision: 2,
            mod_revision: 2,
            version: 1,
            value: b"bar".to_vec(),
            lease: 0,
        };
        let expected = [
            0x0a, 3, b'f', b'o', b'o', 0x10, 2, 0x18, 2, 0x20, 1, 0x2a, 3, b'b', b'a', b'r',
        ];
        assert_eq!(kv.encode_to_vec(), expected);
        assert_eq!(KeyValue::decode(&expected[..]).unwrap(), kv);
        let tombstone = KeyValue {
            key: b"foo".to_vec(),
            ..KeyValue::default()
        };
        assert_eq!(tombstone.encode_to_vec(), [0x0a, 3, b'f', b'o', b'o']);
    }

    #[test]
    fn the_header_is_the_key_value_without_its_value() {
        let kv = KeyValue {
            key: b"k".to_vec(),
            create_revision: 7,
            mod_revision: 9,
            version: 3,
            value: vec![b'x'; 300],
            lease: 42,
        };
        let bytes = kv.encode_to_vec();
        let h = KeyHeader::decode(bytes.as_slice()).unwrap();
        assert_eq!(
            (h.key, h.create_revision, h.version, h.lease),
            (b"k".to_vec(), 7, 3, 42)
        );
        // A value cut short is an error, as for the whole message.
        assert!(KeyHeader::decode(&bytes[..bytes.len() - 10]).is_err());
        assert!(KeyValue::decode(&bytes[..bytes.len() - 10]).is_err());
    }
}
