//! grpc-gateway's JSON mapping of messages, as etcd 3.4's gateway marshals them (golang
//! protobuf's `jsonpb` with `OrigName: true`):
//!
//! - field names as the .proto spells them (`create_revision`, `ID`, `dbSize`); on input the
//!   lowerCamelCase names are accepted too, and unknown fields are ignored;
//! - `bytes` as standard base64, 64-bit integers as strings (numbers accepted on input), enums
//!   by name (numbers accepted on input; an unknown name is refused as jsonpb refuses it, never
//!   dropped: a misspelt `NOT_EQUAL` must not make a compare `EQUAL`);
//! - fields at their default value left out;
//! - `<`, `>`, `&`, U+2028 and U+2029 escaped as `\u003c`… the way Go's `encoding/json` writes
//!   strings.
//!
//! Request bodies are a sequence of JSON values; a unary call takes the first (an empty body is
//! the empty message), a streaming one each in turn.

use axum::body::Body;
use bytes::{Bytes, BytesMut};
use futures::StreamExt as _;
use prost_reflect::{
    DeserializeOptions, DynamicMessage, EnumDescriptor, Kind, MessageDescriptor, SerializeOptions,
};

const SERIALIZE: SerializeOptions = SerializeOptions::new()
    .use_proto_field_name(true)
    .stringify_64_bit_integers(true)
    .use_enum_numbers(false)
    .skip_default_fields(true);

/// Unknown fields are taken out before (see [`known_fields_only`]), so anything unknown left is
/// an enum name: refused.
const DESERIALIZE: DeserializeOptions = DeserializeOptions::new().deny_unknown_fields(true);

/// Why a request body gave no message.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{0}")]
    Json(#[from] serde_json::Error),
    #[error("{0}")]
    Body(#[from] axum::Error),
    #[error("gateway: a request message larger than {0} bytes of JSON")]
    TooLarge(usize),
    /// jsonpb's refusal of an enum name the enum does not have.
    #[error("unknown value {0:?} for enum {1}")]
    UnknownEnumValue(String, String),
}

/// `message` as JSON, appended to `out`.
pub fn write_message(message: &DynamicMessage, out: &mut Vec<u8>) {
    let start = out.len();
    let mut serializer = serde_json::Serializer::new(&mut *out);
    // Serializing a decoded message into a Vec cannot fail.
    if message
        .serialize_with_options(&mut serializer, &SERIALIZE)
        .is_err()
    {
        out.truncate(start);
        out.extend_from_slice(b"{}");
    }
    escape_like_go(out, start);
}

/// `s` as a JSON string, quoted and escaped the way Go writes it.
pub fn quote(s: &str) -> String {
    let mut out = serde_json::to_vec(s).unwrap_or_else(|_| b"\"\"".to_vec());
    escape_like_go(&mut out, 0);
    String::from_utf8(out).unwrap_or_default()
}

/// Rewrites `out[start..]` as Go's `encoding/json` escapes strings: `<`, `>` and `&` as
/// `\u003c`, `\u003e`, `\u0026`, and U+2028, U+2029 as `\u2028`, `\u2029`. In JSON text these
/// bytes appear only inside strings, so the whole text can be rewritten.
fn escape_like_go(out: &mut Vec<u8>, start: usize) {
    let needs = out[start..]
        .iter()
        .any(|b| matches!(b, b'<' | b'>' | b'&' | 0xe2));
    if !needs {
        return;
    }
    let tail = out.split_off(start);
    let mut i = 0;
    while i < tail.len() {
        match tail[i] {
            b'<' => out.extend_from_slice(b"\\u003c"),
            b'>' => out.extend_from_slice(b"\\u003e"),
            b'&' => out.extend_from_slice(b"\\u0026"),
            0xe2 if tail.get(i + 1) == Some(&0x80)
                && matches!(tail.get(i + 2), Some(0xa8 | 0xa9)) =>
            {
                out.extend_from_slice(if tail[i + 2] == 0xa8 {
                    b"\\u2028"
                } else {
                    b"\\u2029"
                });
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
}

/// The message the first JSON value of `json` gives for `desc`, encoded as protobuf (what
/// follows the first value is not read, as Go's `json.Decoder` does not).
pub fn encode(desc: &MessageDescriptor, json: &[u8]) -> Result<Vec<u8>, ReadError> {
    use prost::Message as _;
    if json.iter().all(u8::is_ascii_whitespace) {
        // No value: the empty message.
        return Ok(Vec::new());
    }
    let mut values = serde_json::Deserializer::from_slice(json).into_iter::<serde_json::Value>();
    let mut value = match values.next() {
        Some(value) => value?,
        None => return Ok(Vec::new()),
    };
    known_fields_only(desc, &mut value)?;
    let message = DynamicMessage::deserialize_with_options(desc.clone(), value, &DESERIALIZE)?;
    Ok(message.encode_to_vec())
}

/// Takes the fields `desc` does not declare out of `value` (jsonpb ignores them, as grpc-gateway
/// sets it), in nested messages too, and refuses an enum name that is not one of the enum's.
/// What is not of the right JSON type is left for the deserializer to refuse.
fn known_fields_only(
    desc: &MessageDescriptor,
    value: &mut serde_json::Value,
) -> Result<(), ReadError> {
    let serde_json::Value::Object(fields) = value else {
        return Ok(());
    };
    let field = |name: &str| {
        desc.get_field_by_json_name(name)
            .or_else(|| desc.get_field_by_name(name))
    };
    fields.retain(|name, _| field(name).is_some());
    for (name, v) in fields.iter_mut() {
        let f = field(name).expect("kept");
        let kind = if f.is_map() {
            match f.kind() {
                Kind::Message(entry) => entry.map_entry_value_field().kind(),
                other => other,
            }
        } else {
            f.kind()
        };
        match v {
            serde_json::Value::Array(items) if f.is_list() => {
                for item in items {
                    known_kind(&kind, item)?;
                }
            }
            serde_json::Value::Object(entries) if f.is_map() => {
                for item in entries.values_mut() {
                    known_kind(&kind, item)?;
                }
            }
            v => known_kind(&kind, v)?,
        }
    }
    Ok(())
}

fn known_kind(kind: &Kind, value: &mut serde_json::Value) -> Result<(), ReadError> {
    match (kind, value) {
        (Kind::Message(m), v) => known_fields_only(m, v),
        (Kind::Enum(e), serde_json::Value::String(name)) if e.get_value_by_name(name).is_none() => {
            Err(ReadError::UnknownEnumValue(name.clone(), go_enum_name(e)))
        }
        _ => Ok(()),
    }
}

/// An enum's name as golang/protobuf registers it: the package, then the nesting joined by
/// `_` (`etcdserverpb.Compare_CompareResult`).
fn go_enum_name(e: &EnumDescriptor) -> String {
    let package = e.package_name();
    let full = e.full_name();
    match full.strip_prefix(package).and_then(|n| n.strip_prefix('.')) {
        Some(local) if !package.is_empty() => format!("{package}.{}", local.replace('.', "_")),
        _ => full.replace('.', "_"),
    }
}

/// Reads a whole request body, up to `limit` bytes.
pub async fn read_body(body: Body, limit: usize) -> Result<Bytes, ReadError> {
    let mut stream = body.into_data_stream();
    let mut all = BytesMut::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        if all.len() + chunk.len() > limit {
            return Err(ReadError::TooLarge(limit));
        }
        all.extend_from_slice(&chunk);
    }
    Ok(all.freeze())
}

/// Reads the JSON values of a streamed request body one at a time, as they arrive. It finds
/// where an object or array ends by scanning each byte once (strings and escapes included), so
/// a value sent a byte at a time costs no more than one sent at once; each value is parsed once
/// it is whole.
pub struct Values {
    body: axum::body::BodyDataStream,
    buffer: Vec<u8>,
    /// Where the unread part of `buffer` starts (values are not drained one by one: a body of
    /// many small values costs no more than one large value).
    start: usize,
    /// How far `buffer` has been scanned (0: the value at `start` not yet), and the scanner's
    /// state there.
    scanned: usize,
    depth: usize,
    in_string: bool,
    escaped: bool,
    eof: bool,
    limit: usize,
}

impl Values {
    pub fn new(body: Body, limit: usize) -> Values {
        Values {
            body: body.into_data_stream(),
            buffer: Vec::new(),
            start: 0,
            scanned: 0,
            depth: 0,
            in_string: false,
            escaped: false,
            eof: false,
            limit,
        }
    }

    /// The text of the next value; `None` at the end of the body.
    pub async fn next(&mut self) -> Result<Option<Vec<u8>>, ReadError> {
        loop {
            // Leading whitespace between values.
            while self
                .buffer
                .get(self.start)
                .is_some_and(u8::is_ascii_whitespace)
            {
                self.start += 1;
                self.scanned = 0;
            }
            if let Some(end) = self.value_end() {
                let value = self.buffer[self.start..end].to_vec();
                self.start = end;
                self.scanned = 0;
                return Ok(Some(value));
            }
            if self.eof {
                if self.start >= self.buffer.len() {
                    return Ok(None);
                }
                // Whatever is left is not a whole value: the parser says what is wrong.
                let value = self.buffer[self.start..].to_vec();
                self.start = self.buffer.len();
                return Ok(Some(value));
            }
            if self.buffer.len() - self.start > self.limit {
                return Err(ReadError::TooLarge(self.limit));
            }
            // Drop what was read before growing the buffer (the scan position moves along).
            if self.start > 0 {
                self.buffer.drain(..self.start);
                self.scanned = self.scanned.saturating_sub(self.start);
                self.start = 0;
            }
            match self.body.next().await {
                Some(chunk) => self.buffer.extend_from_slice(&chunk?),
                None => self.eof = true,
            }
        }
    }

    /// Where the value at `start` ends, once it is whole. Only objects and arrays are scanned
    /// for; any other value (never a message) is handed to the parser as it is, so the error
    /// comes at once.
    fn value_end(&mut self) -> Option<usize> {
        let first = *self.buffer.get(self.start)?;
        if first != b'{' && first != b'[' {
            return Some(self.buffer.len());
        }
        if self.scanned == 0 {
            self.scanned = self.start;
            self.depth = 0;
            self.in_string = false;
            self.escaped = false;
        }
        while self.scanned < self.buffer.len() {
            let b = self.buffer[self.scanned];
            self.scanned += 1;
            if self.in_string {
                if self.escaped {
                    self.escaped = false;
                } else if b == b'\\' {
                    self.escaped = true;
                } else if b == b'"' {
                    self.in_string = false;
                }
                continue;
            }
            match b {
                b'"' => self.in_string = true,
                b'{' | b'[' => self.depth += 1,
                b'}' | b']' => {
                    self.depth = self.depth.saturating_sub(1);
                    if self.depth == 0 {
                        return Some(self.scanned);
                    }
                }
                _ => {}
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(chunks: &[&'static str]) -> Body {
        let chunks: Vec<Result<Bytes, std::io::Error>> = chunks
            .iter()
            .map(|c| Ok(Bytes::from_static(c.as_bytes())))
            .collect();
        Body::from_stream(futures::stream::iter(chunks))
    }

    #[tokio::test]
    async fn values_split_anywhere_come_out_whole_and_in_order() {
        let mut v = Values::new(
            body(&[" {\"a\":\"}{\\\"\"", ",\"b\":[1,{}]} ", "\n{}", "[", "]"]),
            1 << 20,
        );
        let mut next = async || {
            let text = v.next().await.unwrap()?;
            Some(serde_json::from_slice::<serde_json::Value>(&text).unwrap())
        };
        assert_eq!(
            next().await.unwrap(),
            serde_json::json!({"a": "}{\"", "b": [1, {}]})
        );
        assert_eq!(next().await.unwrap(), serde_json::json!({}));
        assert_eq!(next().await.unwrap(), serde_json::json!([]));
        assert!(next().await.is_none());
    }

    #[tokio::test]
    async fn a_syntax_error_and_a_cut_value_are_errors() {
        let pool = prost_reflect::DescriptorPool::decode(keel_proto::FILE_DESCRIPTOR_SET).unwrap();
        let desc = pool
            .get_message_by_name("etcdserverpb.WatchRequest")
            .unwrap();
        let mut v = Values::new(body(&["{} xx"]), 1 << 20);
        assert!(encode(&desc, &v.next().await.unwrap().unwrap()).is_ok());
        let bad = v.next().await.unwrap().unwrap();
        assert!(matches!(encode(&desc, &bad), Err(ReadError::Json(_))));
        let mut v = Values::new(body(&["{\"a\":"]), 1 << 20);
        let cut = v.next().await.unwrap().unwrap();
        assert!(matches!(encode(&desc, &cut), Err(ReadError::Json(_))));
    }

    #[tokio::test]
    async fn a_value_over_the_limit_is_refused() {
        let mut v = Values::new(body(&["{\"a\":\"", "xxxxxxxxxxxxxxxxxxxx", "\"}"]), 8);
        assert!(matches!(v.next().await, Err(ReadError::TooLarge(8))));
    }

    #[test]
    fn an_unknown_enum_name_is_refused_as_jsonpb_refuses_it() {
        use keel_proto::etcdserverpb as pb;
        use prost::Message as _;
        let pool = prost_reflect::DescriptorPool::decode(keel_proto::FILE_DESCRIPTOR_SET).unwrap();
        let txn = pool.get_message_by_name("etcdserverpb.TxnRequest").unwrap();
        let bad = br#"{"compare":[{"result":"NOT_EQUALS","target":"VALUE","key":"Zm9v"}]}"#;
        let e = encode(&txn, bad).unwrap_err();
        assert_eq!(
            e.to_string(),
            r#"unknown value "NOT_EQUALS" for enum etcdserverpb.Compare_CompareResult"#
        );
        let grant = pool.get_message_by_name("authpb.Permission").unwrap();
        let e = encode(&grant, br#"{"permType":"READ_WRITE"}"#).unwrap_err();
        assert_eq!(
            e.to_string(),
            r#"unknown value "READ_WRITE" for enum authpb.Permission_Type"#
        );
        // Unknown fields in nested messages of a list are still ignored; numbers still go.
        let ok = br#"{"compare":[{"bogus":{"x":1},"result":"NOT_EQUAL","target":2,"key":"Zm9v"}],"zz":[1]}"#;
        let t = pb::TxnRequest::decode(encode(&txn, ok).unwrap().as_slice()).unwrap();
        assert_eq!(
            t.compare[0].result,
            pb::compare::CompareResult::NotEqual as i32
        );
        assert_eq!(t.compare[0].target, pb::compare::CompareTarget::Mod as i32);
    }

    #[test]
    fn strings_are_escaped_as_go_does() {
        assert_eq!(
            quote("a<b>&c\u{2028}d\u{2029}é\""),
            r#""a\u003cb\u003e\u0026c\u2028d\u2029é\"""#
        );
    }

    #[test]
    fn messages_use_etcd_gateway_names_and_forms() {
        use keel_proto::etcdserverpb as pb;
        use prost::Message as _;
        let pool = prost_reflect::DescriptorPool::decode(keel_proto::FILE_DESCRIPTOR_SET).unwrap();
        let desc = pool
            .get_message_by_name("etcdserverpb.RangeResponse")
            .unwrap();
        let response = pb::RangeResponse {
            header: Some(pb::ResponseHeader {
                cluster_id: 15118495548433857066,
                member_id: 1,
                revision: 2,
                raft_term: 0,
            }),
            kvs: vec![keel_proto::mvccpb::KeyValue {
                key: b"foo".to_vec().into(),
                create_revision: 2,
                mod_revision: 2,
                version: 1,
                value: b"bar".to_vec().into(),
                lease: 0,
            }],
            more: false,
            count: 1,
        };
        let message = DynamicMessage::decode(desc, response.encode_to_vec().as_slice()).unwrap();
        let mut out = Vec::new();
        write_message(&message, &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"header":{"cluster_id":"15118495548433857066","member_id":"1","revision":"2"},"kvs":[{"key":"Zm9v","create_revision":"2","mod_revision":"2","version":"1","value":"YmFy"}],"count":"1"}"#
        );
        // Input: either name, numbers or strings for 64-bit integers, enum names, unknown
        // fields ignored.
        let compare = pool.get_message_by_name("etcdserverpb.Compare").unwrap();
        let bytes = encode(
            &compare,
            br#"{"result": "GREATER", "target": "MOD", "key": "Zm9v", "modRevision": 7, "bogus": 1} trailing"#,
        )
        .unwrap();
        let c = pb::Compare::decode(bytes.as_slice()).unwrap();
        assert_eq!(c.result, pb::compare::CompareResult::Greater as i32);
        assert_eq!(c.target, pb::compare::CompareTarget::Mod as i32);
        assert_eq!(c.key, b"foo");
        assert_eq!(
            c.target_union,
            Some(pb::compare::TargetUnion::ModRevision(7))
        );
    }
}
