//! Calls of the member's own gRPC services from the gateway, in process: the request goes
//! through the same router (and the same leader check, auth, limits) as a gRPC client's, without
//! a loopback connection (etcd's gateway dials its own gRPC port).
//!
//! gRPC's message framing (the wire format of every request and response body): each message is
//! one byte of flags (0: not compressed; the gateway never compresses and the services do not
//! either), four bytes of big-endian length, then the protobuf bytes. The call's status comes in
//! the trailers (`grpc-status`, `grpc-message`), or in the headers of a response without a body.

use axum::body::Body;
use bytes::{Buf, Bytes, BytesMut};
use http_body_util::BodyExt as _;
use tonic::{Code, Status};

/// The largest response message the gateway takes from a service: etcd's gateway dials with
/// `MaxCallRecvMsgSize(math.MaxInt32)`.
const MAX_MESSAGE: usize = i32::MAX as usize;

/// `message` framed as one gRPC message.
#[allow(
    clippy::big_endian_bytes,
    reason = "gRPC's message length is big-endian"
)]
pub fn frame(message: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(5 + message.len());
    out.extend_from_slice(&[0]);
    out.extend_from_slice(&(message.len() as u32).to_be_bytes());
    out.extend_from_slice(message);
    out.freeze()
}

/// The gRPC request for `path` with `body` (framed messages), the caller's `metadata` and
/// `extensions` (its connection's identity).
pub fn request(
    path: &str,
    metadata: axum::http::HeaderMap,
    extensions: axum::http::Extensions,
    body: Body,
) -> axum::http::Request<Body> {
    let mut request = axum::http::Request::new(body);
    *request.method_mut() = axum::http::Method::POST;
    *request.version_mut() = axum::http::Version::HTTP_2;
    *request.uri_mut() = axum::http::Uri::builder()
        .path_and_query(path)
        .build()
        .unwrap_or_default();
    *request.headers_mut() = metadata;
    let headers = request.headers_mut();
    headers.insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/grpc"),
    );
    headers.insert(
        axum::http::header::TE,
        axum::http::HeaderValue::from_static("trailers"),
    );
    *request.extensions_mut() = extensions;
    request
}

/// Calls the gRPC router with `request`.
pub async fn call(
    router: &axum::Router,
    request: axum::http::Request<Body>,
) -> axum::http::Response<Body> {
    use tower_service::Service as _;
    let mut router = router.clone();
    // The router is always ready; a Service is still asked first.
    let ready = futures::future::poll_fn(|cx| {
        tower_service::Service::<axum::http::Request<Body>>::poll_ready(&mut router, cx)
    })
    .await;
    match ready {
        Ok(()) => match router.call(request).await {
            Ok(response) => response,
            Err(never) => match never {},
        },
        Err(never) => match never {},
    }
}

/// What a response body yields, one item at a time.
#[derive(Debug)]
pub enum Item {
    Message(Bytes),
    /// The end of the call (its status, `Ok` included).
    End(Status),
}

/// Reads the messages and the status of a gRPC response.
pub struct Responses {
    body: Body,
    buffer: BytesMut,
    /// Set once the call's status is known (from the headers, or at the end).
    ended: Option<Status>,
}

impl Responses {
    pub fn new(response: axum::http::Response<Body>) -> Responses {
        let (parts, body) = response.into_parts();
        // A response with its status in the headers has no messages (gRPC's trailers-only).
        let ended = status_of(&parts.headers);
        Responses {
            body,
            buffer: BytesMut::new(),
            ended,
        }
    }

    /// The next message, or the end of the call. After the end, the end again.
    pub async fn next(&mut self) -> Item {
        loop {
            if let Some(status) = &self.ended {
                return Item::End(status.clone());
            }
            if let Some(message) = self.take_message() {
                return match message {
                    Ok(m) => Item::Message(m),
                    Err(status) => {
                        self.ended = Some(status.clone());
                        Item::End(status)
                    }
                };
            }
            match self.body.frame().await {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => self.buffer.extend_from_slice(&data),
                    Err(frame) => {
                        if let Some(trailers) = frame.trailers_ref() {
                            self.ended = Some(status_of(trailers).unwrap_or_else(|| {
                                Status::internal("gateway: the call ended without a status")
                            }));
                        }
                    }
                },
                Some(Err(e)) => {
                    self.ended = Some(Status::unknown(format!("gateway: {e}")));
                }
                None => {
                    let status = if self.buffer.is_empty() {
                        Status::internal("gateway: the call ended without a status")
                    } else {
                        Status::internal("gateway: a response message was cut short")
                    };
                    self.ended = Some(status);
                }
            }
        }
    }

    /// One whole message from the buffer, if it holds one.
    #[allow(
        clippy::big_endian_bytes,
        reason = "gRPC's message length is big-endian"
    )]
    fn take_message(&mut self) -> Option<Result<Bytes, Status>> {
        if self.buffer.len() < 5 {
            return None;
        }
        if self.buffer[0] != 0 {
            return Some(Err(Status::internal(
                "gateway: a compressed response message",
            )));
        }
        let len = u32::from_be_bytes([
            self.buffer[1],
            self.buffer[2],
            self.buffer[3],
            self.buffer[4],
        ]) as usize;
        if len > MAX_MESSAGE {
            return Some(Err(Status::resource_exhausted(format!(
                "grpc: received message larger than max ({len} vs. {MAX_MESSAGE})"
            ))));
        }
        if self.buffer.len() < 5 + len {
            return None;
        }
        self.buffer.advance(5);
        Some(Ok(self.buffer.split_to(len).freeze()))
    }
}

/// The status a header map carries, if it carries one.
fn status_of(headers: &axum::http::HeaderMap) -> Option<Status> {
    headers.get("grpc-status")?;
    Some(Status::from_header_map(headers).unwrap_or_else(|| Status::new(Code::Unknown, "")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn messages_split_across_frames_and_the_trailers_status() {
        let mut data = frame(b"hello").to_vec();
        data.extend_from_slice(&frame(b""));
        data.extend_from_slice(&frame(b"world"));
        let (a, b) = data.split_at(7);
        let mut trailers = axum::http::HeaderMap::new();
        trailers.insert("grpc-status", "5".parse().unwrap());
        trailers.insert("grpc-message", "not%20here".parse().unwrap());
        let frames = vec![
            Ok::<_, std::convert::Infallible>(http_body::Frame::data(Bytes::copy_from_slice(a))),
            Ok(http_body::Frame::data(Bytes::copy_from_slice(b))),
            Ok(http_body::Frame::trailers(trailers)),
        ];
        let body = Body::new(http_body_util::StreamBody::new(futures::stream::iter(
            frames,
        )));
        let mut r = Responses::new(axum::http::Response::new(body));
        let mut got = Vec::new();
        loop {
            match r.next().await {
                Item::Message(m) => got.push(m),
                Item::End(s) => {
                    assert_eq!(s.code(), Code::NotFound);
                    assert_eq!(s.message(), "not here");
                    break;
                }
            }
        }
        assert_eq!(got, [&b"hello"[..], b"", b"world"]);
    }

    #[tokio::test]
    async fn a_status_in_the_headers_ends_the_call_at_once() {
        let mut response = axum::http::Response::new(Body::empty());
        response
            .headers_mut()
            .insert("grpc-status", "3".parse().unwrap());
        let mut r = Responses::new(response);
        assert!(matches!(r.next().await, Item::End(s) if s.code() == Code::InvalidArgument));
    }

    #[tokio::test]
    async fn a_body_without_a_status_is_an_error() {
        let body = Body::from(frame(b"x").slice(..3));
        let mut r = Responses::new(axum::http::Response::new(body));
        assert!(matches!(r.next().await, Item::End(s) if s.code() == Code::Internal));
    }
}
