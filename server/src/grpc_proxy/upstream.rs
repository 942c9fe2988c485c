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

    /// Forwards a gRPC request as it is. A request whose endpoint cannot be reached before it
    /// is sent goes to the next endpoint; once its body has started to flow it cannot.
    pub async fn forward(&self, request: axum::http::Request<Body>) -> axum::http::Response<Body> {
        use tower_service::Service as _;
        let (parts, body) = request.into_parts();
        let body = tonic::body::Body::new(body);
        let mut channel = self.channel();
        let ready = futures::future::poll_fn(|cx| channel.poll_ready(cx)).await;
        if let Err(e) = ready {
            return unavailable(&e.to_string());
        }
        let request = axum::http::Request::from_parts(parts, body);
        match channel.call(request).await {
            Ok(response) => response.map(Body::new),
            Err(e) => unavailable(&e.to_string()),
        }
    }
}

/// A gRPC `Unavailable` answer (the cluster could not be reached).
fn unavailable(why: &str) -> axum::http::Response<Body> {
    tonic::Status::unavailable(format!("grpc-proxy: {why}")).into_http::<Body>()
}
