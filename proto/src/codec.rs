//! The gRPC codec of every generated service: prost's, plus a nesting check of the one
//! recursive request type before it is decoded.
//!
//! etcd's `TxnRequest` nests (`RequestOp.request_txn`), and etcd accepts nesting as deep as
//! `--max-txn-ops` lets a request be (128 levels by default: each level passes what is left of
//! the op budget to the next, see `v3rpc/key.go` `checkTxnRequest`, so level 129 fails with
//! "too many operations"). Two protobuf levels per txn level would pass prost's default recursion
//! limit (100) at 50 txn levels, so the workspace builds prost with `no-recursion-limit`, and
//! this codec bounds the depth instead: it walks the wire bytes of a `TxnRequest` (or
//! `TxnResponse`) *iteratively* before prost decodes them, and refuses more than
//! [`MAX_TXN_DEPTH`] levels with `InvalidArgument`. The bound is twice etcd's default, so with
//! the default `--max-txn-ops` every depth gets etcd's own answer from the server's checks. No
//! other message of the API is recursive, so nothing else can nest deeper than its schema.

use std::any::TypeId;
use std::marker::PhantomData;

use bytes::Buf;
use prost::Message;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};

use crate::etcdserverpb::{TxnRequest, TxnResponse};

/// Deepest txn nesting decoded (the request itself is level 1): twice the 128 levels etcd's
/// default `--max-txn-ops` allows.
pub const MAX_TXN_DEPTH: usize = 256;

/// etcd-style message for a txn nested deeper than [`MAX_TXN_DEPTH`].
pub fn too_deep_message() -> String {
    format!("etcdserver: txn request is nested deeper than {MAX_TXN_DEPTH} levels")
}

/// Which recursive message the bytes hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nested {
    /// `TxnRequest`: `success` (2) and `failure` (3) are `RequestOp`s, whose `request_txn` (4) is
    /// a `TxnRequest`.
    TxnRequest,
    /// `TxnResponse`: `responses` (3) are `ResponseOp`s, whose `response_txn` (4) is a
    /// `TxnResponse`.
    TxnResponse,
}

/// Why [`txn_depth`] stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DepthError {
    /// Deeper than the limit.
    TooDeep,
    /// Not valid protobuf wire data.
    Malformed(&'static str),
}

/// Reads a varint at `*pos`.
fn varint(buf: &[u8], pos: &mut usize) -> Result<u64, DepthError> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *buf
            .get(*pos)
            .ok_or(DepthError::Malformed("truncated varint"))?;
        *pos += 1;
        value |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(DepthError::Malformed("varint too long"))
}

/// The nesting depth of the txn in `buf` (1 for a txn without nested txns), walking the wire
/// format without recursion; fails once deeper than `max`.
pub fn txn_depth(buf: &[u8], kind: Nested, max: usize) -> Result<usize, DepthError> {
    // The fields holding the op list and, inside an op, the nested txn.
    let op_fields: &[u64] = match kind {
        Nested::TxnRequest => &[2, 3],
        Nested::TxnResponse => &[3],
    };
    const NESTED_TXN: u64 = 4;
    // Each frame: the end of the message being walked and whether it is a txn (else an op).
    let mut stack: Vec<(usize, bool)> = vec![(buf.len(), true)];
    let mut txns = 1usize;
    let mut deepest = 1usize;
    let mut pos = 0usize;
    while let Some(&(end, is_txn)) = stack.last() {
        if pos == end {
            stack.pop();
            if is_txn {
                txns -= 1;
            }
            continue;
        }
        let key = varint(buf, &mut pos)?;
        let (field, wire) = (key >> 3, key & 7);
        match wire {
            0 => {
                varint(buf, &mut pos)?;
            }
            1 => pos += 8,
            5 => pos += 4,
            2 => {
                let len = usize::try_from(varint(buf, &mut pos)?)
                    .map_err(|_| DepthError::Malformed("length overflows"))?;
                let start = pos;
                pos = start
                    .checked_add(len)
                    .ok_or(DepthError::Malformed("length overflows"))?;
                if pos > end {
                    return Err(DepthError::Malformed("field runs past its message"));
                }
                let descend = if is_txn {
                    op_fields.contains(&field).then_some(false)
                } else {
                    (field == NESTED_TXN).then_some(true)
                };
                if let Some(child_is_txn) = descend {
                    if child_is_txn {
                        txns += 1;
                        deepest = deepest.max(txns);
                        if deepest > max {
                            return Err(DepthError::TooDeep);
                        }
                    }
                    stack.push((pos, child_is_txn));
                    pos = start;
                }
            }
            _ => return Err(DepthError::Malformed("unsupported wire type")),
        }
        if pos > end {
            return Err(DepthError::Malformed("field runs past its message"));
        }
    }
    Ok(deepest)
}

/// Checks the nesting of an encoded txn request: `Ok` if prost may decode it.
pub fn check_txn_request(buf: &[u8]) -> Result<(), Status> {
    check(buf, Nested::TxnRequest)
}

fn check(buf: &[u8], kind: Nested) -> Result<(), Status> {
    match txn_depth(buf, kind, MAX_TXN_DEPTH) {
        Ok(_) => Ok(()),
        Err(DepthError::TooDeep) => Err(Status::invalid_argument(too_deep_message())),
        Err(DepthError::Malformed(why)) => Err(Status::internal(format!(
            "failed to decode Protobuf message: {why}"
        ))),
    }
}

/// prost's codec with the nesting check (see the module docs). Named in `build.rs` as the codec
/// of every generated client and server.
#[derive(Debug, Clone)]
pub struct KeelCodec<T, U> {
    _pd: PhantomData<(T, U)>,
}

impl<T, U> Default for KeelCodec<T, U> {
    fn default() -> Self {
        KeelCodec { _pd: PhantomData }
    }
}

impl<T, U> Codec for KeelCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = tonic_prost::ProstEncoder<T>;
    type Decoder = KeelDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        tonic_prost::ProstEncoder::new(BufferSettings::default())
    }

    fn decoder(&mut self) -> Self::Decoder {
        KeelDecoder { _pd: PhantomData }
    }
}

/// The decoder of [`KeelCodec`].
#[derive(Debug, Clone)]
pub struct KeelDecoder<U> {
    _pd: PhantomData<U>,
}

impl<U: Message + Default + 'static> Decoder for KeelDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        let kind = if TypeId::of::<U>() == TypeId::of::<TxnRequest>() {
            Some(Nested::TxnRequest)
        } else if TypeId::of::<U>() == TypeId::of::<TxnResponse>() {
            Some(Nested::TxnResponse)
        } else {
            None
        };
        let decoded = match kind {
            Some(kind) => {
                let bytes = buf.copy_to_bytes(buf.remaining());
                check(&bytes, kind)?;
                U::decode(bytes)
            }
            None => U::decode(buf),
        };
        decoded
            .map(Some)
            .map_err(|e| Status::internal(e.to_string()))
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}

/// A codec whose messages are sent already encoded: the caller hands over each message's wire
/// bytes, which are copied into the call's buffer as they are; answers are decoded as
/// [`KeelCodec`] does. For the peer transport's `Raft` stream, whose batches are written in one
/// pass by the sender (`RaftBatch`'s wire form, built without a `RaftBatch` value).
#[derive(Debug, Clone)]
pub struct EncodedCodec<U> {
    _pd: PhantomData<U>,
}

impl<U> Default for EncodedCodec<U> {
    fn default() -> Self {
        EncodedCodec { _pd: PhantomData }
    }
}

impl<U> Codec for EncodedCodec<U>
where
    U: Message + Default + Send + 'static,
{
    type Encode = bytes::Bytes;
    type Decode = U;
    type Encoder = EncodedEncoder;
    type Decoder = KeelDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        EncodedEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        KeelDecoder { _pd: PhantomData }
    }
}

/// The encoder of [`EncodedCodec`]: copies the wire bytes it is given.
#[derive(Debug, Clone, Copy, Default)]
pub struct EncodedEncoder;

impl tonic::codec::Encoder for EncodedEncoder {
    type Item = bytes::Bytes;
    type Error = Status;

    fn encode(
        &mut self,
        item: bytes::Bytes,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), Status> {
        bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::etcdserverpb::{PutRequest, RequestOp, request_op};

    /// A txn nested `depth` levels deep with a put at the bottom.
    fn nested(depth: usize) -> TxnRequest {
        let mut t = TxnRequest {
            success: vec![RequestOp {
                request: Some(request_op::Request::RequestPut(PutRequest {
                    key: b"k".to_vec(),
                    value: b"v".to_vec(),
                    ..Default::default()
                })),
            }],
            ..Default::default()
        };
        for _ in 1..depth {
            t = TxnRequest {
                success: vec![RequestOp {
                    request: Some(request_op::Request::RequestTxn(t)),
                }],
                ..Default::default()
            };
        }
        t
    }

    #[test]
    fn depth_is_measured_without_decoding() {
        for depth in [1, 2, 49, 60, 128, MAX_TXN_DEPTH] {
            let bytes = nested(depth).encode_to_vec();
            assert_eq!(
                txn_depth(&bytes, Nested::TxnRequest, MAX_TXN_DEPTH),
                Ok(depth)
            );
            // Within the limit, prost decodes it (the workspace lifts prost's own limit).
            assert_eq!(TxnRequest::decode(bytes.as_slice()).unwrap(), nested(depth));
        }
        let bytes = nested(MAX_TXN_DEPTH + 1).encode_to_vec();
        assert_eq!(
            txn_depth(&bytes, Nested::TxnRequest, MAX_TXN_DEPTH),
            Err(DepthError::TooDeep)
        );
    }

    #[test]
    fn a_million_levels_are_refused_without_recursion() {
        // Hand-built (prost would recurse to encode it): each level is
        // `TxnRequest { success (2): RequestOp { request_txn (4): <inner> } }`. The headers are
        // computed from the inside out, then written from the outside in.
        use prost::encoding::{WireType, encode_key, encode_varint};
        let levels = 1_000_000;
        let mut headers: Vec<Vec<u8>> = Vec::with_capacity(levels);
        let mut inner_len = 0usize;
        for _ in 0..levels {
            let mut op = Vec::new();
            encode_key(4, WireType::LengthDelimited, &mut op);
            encode_varint(inner_len as u64, &mut op);
            let op_len = op.len() + inner_len;
            let mut txn = Vec::new();
            encode_key(2, WireType::LengthDelimited, &mut txn);
            encode_varint(op_len as u64, &mut txn);
            inner_len = txn.len() + op_len;
            txn.extend_from_slice(&op);
            headers.push(txn);
        }
        let bytes: Vec<u8> = headers.iter().rev().flatten().copied().collect();
        assert_eq!(bytes.len(), inner_len);
        assert_eq!(
            txn_depth(&bytes, Nested::TxnRequest, MAX_TXN_DEPTH),
            Err(DepthError::TooDeep)
        );
        // And a limit above the depth walks all of it.
        assert_eq!(
            txn_depth(&bytes, Nested::TxnRequest, usize::MAX),
            Ok(levels + 1)
        );
    }

    #[test]
    fn malformed_input_is_an_error_not_a_panic() {
        for bytes in [
            vec![0x12],             // field 2, no length
            vec![0x12, 0x05, 0x01], // length past the end
            vec![0xff; 11],         // endless varint
            vec![0x13],             // wire type 3 (groups)
            vec![0x12, 0x02, 0x22, 0x05],
        ] {
            assert!(matches!(
                txn_depth(&bytes, Nested::TxnRequest, MAX_TXN_DEPTH),
                Err(DepthError::Malformed(_))
            ));
        }
    }
}
