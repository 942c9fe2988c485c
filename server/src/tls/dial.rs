//! Dialing other members: lazily connected gRPC channels to peer URLs, over TLS for `https`
//! URLs with the member's peer client configuration (`--peer-cert-file`, `--peer-key-file`,
//! `--peer-trusted-ca-file`, or `--peer-auto-tls`).
//!
//! tonic's own TLS connector is not used: it cannot reload rotated files, and a member dials
//! with the same reloading configuration as it serves. The channel is built for an `http://`
//! URI (tonic refuses `https` without its TLS feature) and the connector wraps the TCP stream in
//! TLS itself, verifying the peer against the URL's host (a name or an IP address).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tonic::transport::{Channel, Endpoint};

use super::ClientTls;
use crate::config::parse_url;

/// The errors of a dial that timed out before any request was sent on it.
pub const DIAL_TIMED_OUT: &str = "peer dial timed out";
pub const HANDSHAKE_TIMED_OUT: &str = "peer TLS handshake timed out";

/// How long a TLS handshake with a peer may take once connected (etcd's transport's
/// `TLSHandshakeTimeout`).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The TCP connect timeout of a dialer made without an election timeout.
const DEFAULT_DIAL_TIMEOUT: Duration = Duration::from_secs(1);

/// How a member reaches its peers. Cheap to clone.
#[derive(Clone)]
pub struct Dialer {
    tls: Option<Arc<ClientTls>>,
    /// The TCP connect timeout (etcd's `peerDialTimeout`: 1 s plus the election timeout).
    dial_timeout: Duration,
}

impl Default for Dialer {
    fn default() -> Dialer {
        Dialer::new(None)
    }
}

impl std::fmt::Debug for Dialer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dialer")
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl Dialer {
    /// A dialer that uses `tls` for `https` peer URLs.
    pub fn new(tls: Option<Arc<ClientTls>>) -> Dialer {
        Dialer {
            tls,
            dial_timeout: DEFAULT_DIAL_TIMEOUT,
        }
    }

    /// The same, connecting within 1 s plus `election_timeout` as etcd's peers do (then the
    /// TLS handshake has its own 10 s): a member a long round trip away still connects.
    pub fn with_election_timeout(self, election_timeout: Duration) -> Dialer {
        Dialer {
            dial_timeout: DEFAULT_DIAL_TIMEOUT + election_timeout,
            ..self
        }
    }

    /// An endpoint for `url` with the peer transport's settings, and the connector it needs:
    /// `None` if the URL is not valid.
    fn endpoint(&self, url: &str) -> Option<(Endpoint, Option<TlsConnect>)> {
        let parsed = parse_url(url).ok()?;
        let host = parsed.host.trim_start_matches('[').trim_end_matches(']');
        let plain = format!("http://{}:{}", parsed.host, parsed.port);
        let endpoint = Endpoint::from_shared(plain).ok()?;
        let connect = if parsed.tls {
            let name = ServerName::try_from(host.to_string()).ok()?;
            Some(TlsConnect {
                tls: self.tls.clone(),
                name,
                addr: (host.to_string(), parsed.port),
                dial_timeout: self.dial_timeout,
            })
        } else {
            None
        };
        Some((endpoint, connect))
    }

    /// A lazily connected channel to `url` (keep-alive pings every 5 s; the dial timeout to
    /// connect, and for TLS the handshake timeout after that).
    pub fn channel(&self, url: &str) -> Option<Channel> {
        let (endpoint, connect) = self.endpoint(url)?;
        // The connector of an https URL times its own steps; tonic's timeout wraps them all.
        let timeout = match connect {
            Some(_) => self.dial_timeout + HANDSHAKE_TIMEOUT,
            None => self.dial_timeout,
        };
        let endpoint = endpoint
            .connect_timeout(timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true);
        Some(match connect {
            Some(c) => endpoint.connect_with_connector_lazy(c),
            None => endpoint.connect_lazy(),
        })
    }

    /// A channel to `url`, connected now (for one-off calls at start).
    pub async fn connect(&self, url: &str) -> anyhow::Result<Channel> {
        let (endpoint, connect) = self
            .endpoint(url)
            .ok_or_else(|| anyhow::anyhow!("invalid peer URL {url:?}"))?;
        let endpoint = endpoint.connect_timeout(Duration::from_secs(2));
        Ok(match connect {
            Some(c) => endpoint.connect_with_connector(c).await?,
            None => endpoint.connect().await?,
        })
    }
}

/// The connector of one `https` peer URL.
#[derive(Clone)]
struct TlsConnect {
    tls: Option<Arc<ClientTls>>,
    name: ServerName<'static>,
    addr: (String, u16),
    dial_timeout: Duration,
}

type Connecting = Pin<
    Box<
        dyn Future<
                Output = std::io::Result<
                    TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
                >,
            > + Send,
    >,
>;

impl tower_service::Service<tonic::codegen::http::Uri> for TlsConnect {
    type Response = TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;
    type Error = std::io::Error;
    type Future = Connecting;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: tonic::codegen::http::Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let Some(tls) = this.tls else {
                return Err(std::io::Error::other(
                    "an https peer URL, but this member has no peer TLS configuration \
                     (--peer-cert-file and --peer-key-file, --peer-trusted-ca-file, or \
                     --peer-auto-tls)",
                ));
            };
            let timed_out =
                |what: &str| std::io::Error::new(std::io::ErrorKind::TimedOut, what.to_string());
            let tcp = tokio::time::timeout(
                this.dial_timeout,
                tokio::net::TcpStream::connect((this.addr.0.as_str(), this.addr.1)),
            )
            .await
            .map_err(|_| timed_out(DIAL_TIMED_OUT))??;
            tcp.set_nodelay(true)?;
            let connector = tokio_rustls::TlsConnector::from(tls.get());
            let stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, connector.connect(this.name, tcp))
                .await
                .map_err(|_| timed_out(HANDSHAKE_TIMED_OUT))??;
            Ok(TokioIo::new(stream))
        })
    }
}
