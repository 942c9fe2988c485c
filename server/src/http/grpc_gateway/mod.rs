//! The gRPC gateway: etcd's v3 API as HTTP/JSON on the client URLs, as etcd 3.4 serves it with
//! grpc-gateway (`--enable-grpc-gateway`, on by default).
//!
//! - Every RPC is `POST /v3/<path>` with the request message as the JSON body (paths from the
//!   protos' `google.api.http` annotations, [`rules`]); `/v3beta/` is an alias, as in etcd 3.4,
//!   and so is `/v3alpha/` (etcd 3.2's prefix, which 3.4 no longer serves).
//! - A unary call answers `200` with the response message; a streaming one (Watch,
//!   LeaseKeepAlive, Snapshot, Observe) answers one `{"result": …}` object and a newline per
//!   message, flushed as each comes. Watch and LeaseKeepAlive read their requests as a sequence
//!   of JSON objects from the request body, so a client can send more while it reads.
//! - Errors: `{"error": msg, "message": msg, "code": grpc-code}` with grpc-gateway's HTTP status
//!   for the code (`400` for InvalidArgument, `401` Unauthenticated, `503` Unavailable…); an
//!   error after a stream has started is its last object, `{"error": {"grpc_code", "http_code",
//!   "message", "http_status"}}`. A path outside the API is `404 Not Found`, another method
//!   `405 Method Not Allowed`, as plain text.
//! - The auth token is read from the `Authorization` header; `Grpc-Metadata-<Name>` headers
//!   become gRPC metadata, as grpc-gateway maps them. Over TLS with client certificate auth and
//!   auth enabled, a client certificate with a CN is refused (`400`): etcd's gateway cannot use
//!   it, and says so rather than ignore it.
//!
//! Each call goes through the member's own gRPC router in process ([`grpc`]), so it is checked,
//! limited and answered exactly as the same call made over gRPC.

pub mod grpc;
pub mod json;
pub mod rules;

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use bytes::Bytes;
use futures::StreamExt as _;
use prost_reflect::DynamicMessage;
use tonic::{Code, Status};

use self::grpc::{Item, Responses};
use self::json::ReadError;
use self::rules::Rpc;
use crate::http::access::text_response;
use crate::raft::Core;

/// etcd's message when a gateway client presents a certificate with a CN while client
/// certificate auth and auth are on.
const CN_REFUSED: &str = "CommonName of client sending a request against gateway will be ignored and not used as expected\n";

/// The gateway: its paths and the gRPC router it calls.
pub struct Gateway {
    rules: HashMap<String, Arc<Rpc>>,
    grpc: axum::Router,
    core: Core,
    client_cert_auth: bool,
    /// The most JSON one request message may take: twice the gRPC limit (a message somewhat over
    /// it, in base64, is still read, to be refused with grpc-go's words and its size), and 64 KiB
    /// for JSON's field names and quoting. Beyond, the gateway's own refusal.
    json_limit: usize,
    /// The members' gRPC receive limit (`--max-request-bytes` + 512 KiB): a larger message is
    /// refused as grpc-go refuses it (etcd's gateway calls its own gRPC server).
    grpc_limit: usize,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("paths", &self.rules.len())
            .finish_non_exhaustive()
    }
}

impl Gateway {
    /// A gateway in front of `grpc`, the member's gRPC router.
    pub fn new(
        grpc: axum::Router,
        core: Core,
        client_cert_auth: bool,
        max_request_bytes: usize,
    ) -> Result<Gateway, rules::RulesError> {
        Ok(Gateway {
            rules: rules::load()?,
            grpc,
            core,
            client_cert_auth,
            json_limit: max_request_bytes
                .saturating_add(512 << 10)
                .saturating_mul(2)
                .saturating_add(64 << 10),
            grpc_limit: max_request_bytes.saturating_add(512 << 10),
        })
    }

    /// The routes of the gateway.
    pub fn router(self) -> axum::Router {
        let gateway = Arc::new(self);
        let handler = axum::routing::any(serve).with_state(gateway);
        axum::Router::new()
            .route("/v3/{*path}", handler.clone())
            .route("/v3beta/{*path}", handler.clone())
            .route("/v3alpha/{*path}", handler)
    }
}

/// grpc-gateway's HTTP status for a gRPC code.
fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::Cancelled => StatusCode::REQUEST_TIMEOUT,
        Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::FailedPrecondition => StatusCode::PRECONDITION_FAILED,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn json_response(status: StatusCode, body: impl Into<Body>) -> Response<Body> {
    let mut response = Response::new(body.into());
    *response.status_mut() = status;
    response.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// An error of a call that has not answered yet: grpc-gateway's `DefaultHTTPError`.
fn error_response(status: &Status) -> Response<Body> {
    let message = json::quote(status.message());
    let code = status.code() as i32;
    let body = format!(r#"{{"error":{message},"message":{message},"code":{code}}}"#);
    json_response(http_status(status.code()), body)
}

/// The last object of a stream that fails: grpc-gateway's stream error chunk.
fn stream_error(status: &Status) -> Vec<u8> {
    let http = http_status(status.code());
    format!(
        r#"{{"error":{{"grpc_code":{},"http_code":{},"message":{},"http_status":{}}}}}"#,
        status.code() as i32,
        http.as_u16(),
        json::quote(status.message()),
        json::quote(http.canonical_reason().unwrap_or_default()),
    )
    .into_bytes()
}

/// The gRPC metadata grpc-gateway makes of an HTTP request's headers: `Authorization` as
/// `authorization` (where the member reads the token), `Grpc-Metadata-<Name>` as `<name>`.
/// Names gRPC reserves (`grpc-*`, `content-type`, `te`…) are not taken from the client.
fn metadata(headers: &HeaderMap) -> HeaderMap {
    let mut md = HeaderMap::new();
    for (name, value) in headers {
        let name = name.as_str();
        let target = if name == "authorization" {
            Some(name)
        } else {
            name.strip_prefix("grpc-metadata-")
        };
        let Some(target) = target else { continue };
        let reserved = target.starts_with("grpc-")
            || target.starts_with(':')
            || matches!(
                target,
                "content-type" | "te" | "host" | "connection" | "transfer-encoding" | "user-agent"
            );
        if reserved || target.is_empty() {
            continue;
        }
        if let Ok(n) = HeaderName::from_bytes(target.as_bytes()) {
            md.append(n, value.clone());
        }
    }
    md
}

/// The response headers grpc-gateway passes on: the call's header metadata as
/// `Grpc-Metadata-<Name>` (the services send `content-type: application/grpc`).
fn pass_headers(from: &HeaderMap, to: &mut HeaderMap) {
    for (name, value) in from {
        let name = name.as_str();
        if name.starts_with("grpc-") {
            continue;
        }
        if let Ok(n) = HeaderName::from_bytes(format!("grpc-metadata-{name}").as_bytes()) {
            to.append(n, value.clone());
        }
    }
}

/// One request to the gateway.
async fn serve(State(gw): State<Arc<Gateway>>, request: Request<Body>) -> Response<Body> {
    let path = request.uri().path();
    let path = if let Some(rest) = path.strip_prefix("/v3beta/") {
        format!("/v3/{rest}")
    } else if let Some(rest) = path.strip_prefix("/v3alpha/") {
        format!("/v3/{rest}")
    } else {
        path.to_string()
    };
    let (parts, body) = request.into_parts();
    let mut extensions = parts.extensions;
    if let Some(identity) = extensions.get_mut::<crate::tls::incoming::Identity>() {
        if identity.common_name.is_some() && gw.client_cert_auth && gw.core.auth().enabled {
            return refuse(&gw, body, StatusCode::BAD_REQUEST, CN_REFUSED.trim_end()).await;
        }
        // The gateway authenticates by token only, as etcd's.
        identity.common_name = None;
    }
    let Some(rpc) = gw.rules.get(&path).cloned() else {
        return refuse(&gw, body, StatusCode::NOT_FOUND, "Not Found").await;
    };
    if parts.method != Method::POST {
        return refuse(
            &gw,
            body,
            StatusCode::METHOD_NOT_ALLOWED,
            "Method Not Allowed",
        )
        .await;
    }
    let md = metadata(&parts.headers);
    if rpc.client_streaming {
        bidi(&gw, &rpc, md, extensions, body).await
    } else {
        let message = match read_request(&gw, &rpc, body).await {
            Ok(m) => m,
            Err(status) => return error_response(&status),
        };
        let request = grpc::request(&rpc.grpc_path, md, extensions, Body::from(message));
        let response = grpc::call(&gw.grpc, request).await;
        if rpc.server_streaming {
            stream(&rpc, response).await
        } else {
            unary(&rpc, response).await
        }
    }
}

/// A refusal sent once the request's body has been read (as far as a request message may go).
/// Answered before the body's end, an HTTP/2 request is reset (RST_STREAM) while the client
/// may still be sending, and curl, among others, then reports a framing error instead of the
/// answer.
async fn refuse(gw: &Gateway, body: Body, status: StatusCode, text: &str) -> Response<Body> {
    let _ = axum::body::to_bytes(body, gw.json_limit).await;
    text_response(status, text)
}

/// The framed request message of a unary or server-streaming call: the body's first JSON value
/// (none: the empty message). Bad JSON is InvalidArgument, as grpc-gateway's.
async fn read_request(gw: &Gateway, rpc: &Rpc, body: Body) -> Result<Bytes, Status> {
    let body = json::read_body(body, gw.json_limit)
        .await
        .map_err(|e| read_status(&e, Code::InvalidArgument))?;
    let message =
        json::encode(&rpc.input, &body).map_err(|e| read_status(&e, Code::InvalidArgument))?;
    if message.len() > gw.grpc_limit {
        return Err(Status::resource_exhausted(format!(
            "grpc: received message larger than max ({} vs. {})",
            message.len(),
            gw.grpc_limit
        )));
    }
    Ok(grpc::frame(&message))
}

/// The status of a request body that gave no message.
fn read_status(e: &ReadError, code: Code) -> Status {
    match e {
        ReadError::TooLarge(_) => Status::resource_exhausted(e.to_string()),
        _ => Status::new(code, e.to_string()),
    }
}

/// The response message of `rpc` as JSON.
fn to_json(rpc: &Rpc, message: Bytes, out: &mut Vec<u8>) -> Result<(), Status> {
    let message = DynamicMessage::decode(rpc.output.clone(), message)
        .map_err(|e| Status::internal(format!("gateway: {e}")))?;
    json::write_message(&message, out);
    Ok(())
}

async fn unary(rpc: &Rpc, response: Response<Body>) -> Response<Body> {
    let mut headers = HeaderMap::new();
    pass_headers(response.headers(), &mut headers);
    let mut responses = Responses::new(response);
    let message = match responses.next().await {
        Item::Message(m) => m,
        Item::End(status) if status.code() == Code::Ok => {
            return error_response(&Status::internal("gateway: no response message"));
        }
        Item::End(status) => return error_response(&status),
    };
    match responses.next().await {
        Item::End(status) if status.code() == Code::Ok => {}
        Item::End(status) => return error_response(&status),
        Item::Message(_) => {
            return error_response(&Status::internal("gateway: more than one response"));
        }
    }
    let mut out = Vec::new();
    if let Err(status) = to_json(rpc, message, &mut out) {
        return error_response(&status);
    }
    let mut answer = json_response(StatusCode::OK, out);
    answer.headers_mut().extend(headers);
    answer
}

/// A streamed answer: one `{"result": …}` line per message. Its status line is sent with the
/// first message, or is the error's when the call fails first (as grpc-gateway's).
async fn stream(rpc: &Arc<Rpc>, response: Response<Body>) -> Response<Body> {
    let mut headers = HeaderMap::new();
    pass_headers(response.headers(), &mut headers);
    let mut responses = Responses::new(response);
    let (status, first, done) = match responses.next().await {
        Item::Message(m) => match result_line(rpc, m) {
            Some(line) => (StatusCode::OK, Some(line), false),
            None => {
                let e = undecodable();
                (http_status(e.code()), Some(stream_error(&e)), true)
            }
        },
        Item::End(s) if s.code() == Code::Ok => (StatusCode::OK, None, true),
        Item::End(s) => (http_status(s.code()), Some(stream_error(&s)), true),
    };
    let rpc = rpc.clone();
    let rest = futures::stream::unfold((responses, done), move |(mut responses, done)| {
        let rpc = rpc.clone();
        async move {
            if done {
                return None;
            }
            match responses.next().await {
                Item::Message(m) => match result_line(&rpc, m) {
                    Some(line) => Some((line, (responses, false))),
                    None => Some((stream_error(&undecodable()), (responses, true))),
                },
                Item::End(s) if s.code() == Code::Ok => None,
                Item::End(s) => Some((stream_error(&s), (responses, true))),
            }
        }
    });
    let lines = futures::stream::iter(first)
        .chain(rest)
        .map(|l| Ok::<_, std::convert::Infallible>(Bytes::from(l)));
    let mut answer = json_response(status, Body::from_stream(lines));
    answer.headers_mut().extend(headers);
    answer
}

fn undecodable() -> Status {
    Status::internal("gateway: a response message does not decode")
}

/// `{"result": message}` and a newline; `None` if the message does not decode.
fn result_line(rpc: &Rpc, message: Bytes) -> Option<Vec<u8>> {
    let mut out = b"{\"result\":".to_vec();
    to_json(rpc, message, &mut out).ok()?;
    out.extend_from_slice(b"}\n");
    Some(out)
}

/// A bidirectional stream (Watch, LeaseKeepAlive). The first request is read before the call
/// starts: if it is not JSON the answer is grpc-gateway's error (`500`, code Unknown). The rest
/// are passed on as they arrive; a later bad one ends the requests (the stream stays open, as
/// when the body ends: a watch keeps sending events).
async fn bidi(
    gw: &Gateway,
    rpc: &Arc<Rpc>,
    md: HeaderMap,
    extensions: axum::http::Extensions,
    body: Body,
) -> Response<Body> {
    let mut values = json::Values::new(body, gw.json_limit);
    let first = match values.next().await {
        Ok(Some(value)) => match json::encode(&rpc.input, &value) {
            Ok(m) => Some(grpc::frame(&m)),
            Err(e) => return error_response(&read_status(&e, Code::Unknown)),
        },
        Ok(None) => None,
        Err(e) => return error_response(&read_status(&e, Code::Unknown)),
    };
    let input = rpc.input.clone();
    let rest = futures::stream::unfold(Some(values), move |values| {
        let input = input.clone();
        async move {
            let mut values = values?;
            match values.next().await {
                Ok(Some(value)) => match json::encode(&input, &value) {
                    Ok(m) => Some((grpc::frame(&m), Some(values))),
                    Err(e) => {
                        tracing::debug!(error = %e, "gateway: a bad request ends the stream's requests");
                        None
                    }
                },
                Ok(None) => None,
                Err(e) => {
                    tracing::debug!(error = %e, "gateway: a bad request ends the stream's requests");
                    None
                }
            }
        }
    });
    let requests = futures::stream::iter(first)
        .chain(rest)
        .map(Ok::<_, std::convert::Infallible>);
    let request = grpc::request(&rpc.grpc_path, md, extensions, Body::from_stream(requests));
    let response = grpc::call(&gw.grpc, request).await;
    stream(rpc, response).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_authorization_and_grpc_metadata_headers_pass() {
        let mut h = HeaderMap::new();
        h.insert("authorization", "tok".parse().unwrap());
        h.insert("grpc-metadata-hasleader", "true".parse().unwrap());
        h.insert("grpc-metadata-grpc-timeout", "1n".parse().unwrap());
        h.insert("grpc-metadata-content-type", "x".parse().unwrap());
        h.insert("token", "other".parse().unwrap());
        h.insert("accept", "*/*".parse().unwrap());
        let md = metadata(&h);
        assert_eq!(md.len(), 2);
        assert_eq!(md["authorization"], "tok");
        assert_eq!(md["hasleader"], "true");
    }

    #[test]
    fn errors_have_grpc_gateways_shapes() {
        let s = Status::invalid_argument("etcdserver: key is not provided");
        let r = error_response(&s);
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        assert_eq!(
            String::from_utf8(stream_error(&Status::unknown("auth: invalid auth token"))).unwrap(),
            r#"{"error":{"grpc_code":2,"http_code":500,"message":"auth: invalid auth token","http_status":"Internal Server Error"}}"#
        );
    }
}
