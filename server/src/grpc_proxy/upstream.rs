//! The proxy's way to the cluster: one lazily connected gRPC channel per endpoint, calls spread
//! round robin, and a call that cannot reach its endpoint tried on the next one. Everything the
//! proxy does not serve itself (Lease, Cluster, Maintenance, Auth, Lock, Election) is forwarded
//! here untouched: the HTTP/2 request, its metadata (the caller's token) and its body stream go
//! to an endpoint, and the answer comes back as it is.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::body::Body;
use tonic::transport::Channel;

use crate::tls::dial::Dialer;

/// The endpoints. Cheap to clone.
#[derive(Clone)]
pub struct Upstream {
    channels: Arc<Vec<(String, Channel)>>,
    next: Arc<AtomicUsize>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.channels.iter().map(|(n, _)| n.as_str()).collect();
        f.debug_struct("Upstream")
            .field("endpoints", &names)
            .finish()
    }
}

impl Upstream {
    /// Channels to `endpoints` (`host:port`, or URLs; `https` ones dial with `dialer`'s TLS).
    pub fn new(endpoints: &[String], dialer: &Dialer, tls: bool) -> anyhow::Result<Upstream> {
        let mut channels = Vec::new();
        for e in endpoints {
            let url = if e.contains("://") {
                e.clone()
            } else if tls {
                format!("https://{e}")
            } else {
                format!("http://{e}")
            };
            let channel = dialer
                .channel(&url)
                .ok_or_else(|| anyhow::anyhow!("invalid endpoint {e:?}"))?;
            channels.push((url, channel));
        }
        if channels.is_empty() {
            anyhow::bail!("no endpoints given (--endpoints)");
        }
        Ok(Upstream {
            channels: Arc::new(channels),
            next: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// The channels in the order to try them for the next call.
    pub fn order(&self) -> impl Iterator<Item = &Channel> {
        let n = self.channels.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        (0..n).map(move |i| &self.channels[(start + i) % n].1)
    }

    /// One channel for a call (round robin).
    pub fn channel(&self) -> Channel {
        self.order()
            .next()
            .cloned()
            .unwrap_or_else(|| self.channels[0].1.clone())
    }

    /// Forwards a gRPC request as it is. A call whose client sends one message (unary, or
    /// server streaming) is read whole first, so that when its endpoint cannot be connected to
    /// (the request was never sent) it goes to the next one, as clientv3's balancer skips
    /// endpoints it is not connected to; a client stream goes to one endpoint as it flows.
    pub async fn forward(&self, request: axum::http::Request<Body>) -> axum::http::Response<Body> {
        use http_body_util::BodyExt as _;
        use tower_service::Service as _;
        let (parts, body) = request.into_parts();
        if client_streaming(parts.uri.path()) {
            let mut channel = self.channel();
            if let Err(e) = futures::future::poll_fn(|cx| channel.poll_ready(cx)).await {
                return unavailable(&e.to_string());
            }
            let request = axum::http::Request::from_parts(parts, tonic::body::Body::new(body));
            return match channel.call(request).await {
                Ok(response) => response.map(Body::new),
                Err(e) => unavailable(&e.to_string()),
            };
        }
        let limited = http_body_util::Limited::new(body, super::GRPC_GO_MAX_RECV + 5);
        let bytes = match limited.collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(e) => {
                return tonic::Status::resource_exhausted(format!("grpc-proxy: {e}")).into_http();
            }
        };
        let mut last = String::from("no endpoint");
        for channel in self.order() {
            let mut request = axum::http::Request::builder()
                .method(parts.method.clone())
                .uri(parts.uri.clone())
                .version(parts.version)
                .body(tonic::body::Body::new(http_body_util::Full::new(
                    bytes.clone(),
                )))
                .expect("the parts of a request received");
            *request.headers_mut() = parts.headers.clone();
            let mut channel = channel.clone();
            if let Err(e) = futures::future::poll_fn(|cx| channel.poll_ready(cx)).await {
                last = e.to_string();
                continue;
            }
            match channel.call(request).await {
                Ok(response) => return response.map(Body::new),
                Err(e) if never_sent(&e) => last = e.to_string(),
                Err(e) => return unavailable(&e.to_string()),
            }
        }
        unavailable(&last)
    }
}

/// Whether `path` names a method whose client streams its requests (from the protos).
fn client_streaming(path: &str) -> bool {
    static STREAMING: std::sync::LazyLock<Vec<String>> = std::sync::LazyLock::new(|| {
        prost_reflect::DescriptorPool::decode(keel_proto::FILE_DESCRIPTOR_SET)
            .map(|pool| {
                pool.services()
                    .flat_map(|s| {
                        s.methods()
                            .filter(|m| m.is_client_streaming())
                            .map(|m| format!("/{}/{}", s.full_name(), m.name()))
                            .collect::<Vec<_>>()
                    })
                    .collect()
            })
            .unwrap_or_default()
    });
    STREAMING.iter().any(|p| p == path)
}

/// Whether a call's error means its request never left: the connection to the endpoint could
/// not be made (hyper-util's connector's "tcp connect error", a refused connection, or the TLS
/// dialer's own timeouts). An error on a connection already made (a reset, a timeout) may have
/// come after the member applied the request: not retried.
pub(super) fn never_sent(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(e) = next {
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::ConnectionRefused
        {
            return true;
        }
        let text = e.to_string();
        if text.starts_with("tcp connect error")
            || text == crate::tls::dial::DIAL_TIMED_OUT
            || text == crate::tls::dial::HANDSHAKE_TIMED_OUT
        {
            return true;
        }
        next = e.source();
    }
    false
}

/// A gRPC `Unavailable` answer (the cluster could not be reached).
fn unavailable(why: &str) -> axum::http::Response<Body> {
    tonic::Status::unavailable(format!("grpc-proxy: {why}")).into_http::<Body>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Wrapped(String, Option<std::io::Error>);

    impl std::fmt::Display for Wrapped {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(&self.0)
        }
    }

    impl std::error::Error for Wrapped {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_ref().map(|e| e as _)
        }
    }

    /// Only an error of the connection's making is retried elsewhere; one on a connection
    /// already made may follow the member's apply.
    #[test]
    fn only_a_connection_never_made_is_retried() {
        use std::io::{Error, ErrorKind};
        let refused = Wrapped(
            "transport error".into(),
            Some(Error::from(ErrorKind::ConnectionRefused)),
        );
        assert!(never_sent(&refused));
        let connect = Wrapped(
            "tcp connect error".into(),
            Some(Error::from(ErrorKind::TimedOut)),
        );
        assert!(never_sent(&connect));
        let dial = Error::new(ErrorKind::TimedOut, crate::tls::dial::DIAL_TIMED_OUT);
        assert!(never_sent(&dial));
        for kind in [
            ErrorKind::TimedOut,
            ErrorKind::ConnectionReset,
            ErrorKind::HostUnreachable,
        ] {
            let later = Wrapped("transport error".into(), Some(Error::from(kind)));
            assert!(!never_sent(&later), "{kind:?}");
        }
    }
}
