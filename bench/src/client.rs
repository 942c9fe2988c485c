//! Connections to the servers under test: plain etcd v3 gRPC (so the same run works against
//! Keel and etcd), optional TLS (`--cacert`, `--cert`, `--key`) and etcd authentication
//! (`--user name:password`: a token from `Auth/Authenticate` sent with every request).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use keel_proto::etcdserverpb as pb;
use pb::auth_client::AuthClient;
use pb::kv_client::KvClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// Longest a single request may take before it counts as failed (a stopped server must not hang
/// the run).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Connection timeout used when `--dial-timeout` is 0.
pub const DEFAULT_DIAL_TIMEOUT: Duration = Duration::from_secs(5);

/// How to reach the servers.
#[derive(Debug, Clone, Default)]
pub struct ConnectOptions {
    pub endpoints: Vec<String>,
    pub dial_timeout: Duration,
    /// `name:password` (or just `name`, password empty).
    pub user: Option<String>,
    pub cacert: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// Adds the auth token, if any, to each request.
#[derive(Debug, Clone, Default)]
pub struct Token(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for Token {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(t) = &self.0 {
            req.metadata_mut().insert("token", t.clone());
        }
        Ok(req)
    }
}

/// A KV client on one connection.
pub type Kv = KvClient<InterceptedService<Channel, Token>>;

impl ConnectOptions {
    fn tls(&self) -> anyhow::Result<Option<ClientTlsConfig>> {
        if self.cacert.is_none() && self.cert.is_none() && self.key.is_none() {
            return Ok(None);
        }
        let read =
            |p: &PathBuf| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
        let mut tls = ClientTlsConfig::new();
        if let Some(ca) = &self.cacert {
            tls = tls.ca_certificate(Certificate::from_pem(read(ca)?));
        }
        match (&self.cert, &self.key) {
            (Some(c), Some(k)) => tls = tls.identity(Identity::from_pem(read(c)?, read(k)?)),
            (None, None) => {}
            _ => bail!("--cert and --key go together"),
        }
        Ok(Some(tls))
    }

    /// The URL of endpoint `e` (`host:port` gets the scheme TLS settings imply).
    fn url(&self, e: &str, tls: bool) -> String {
        if e.contains("://") {
            e.to_string()
        } else if tls {
            format!("https://{e}")
        } else {
            format!("http://{e}")
        }
    }

    /// Opens `conns` connections, spread over the endpoints, and authenticates if asked. Fails
    /// with the endpoint and the reason when a server cannot be reached.
    pub async fn connect(&self, conns: usize) -> anyhow::Result<(Vec<Channel>, Token)> {
        if self.endpoints.is_empty() {
            bail!("no endpoints given");
        }
        let tls = self.tls()?;
        let dial = if self.dial_timeout.is_zero() {
            DEFAULT_DIAL_TIMEOUT
        } else {
            self.dial_timeout
        };
        let mut channels = Vec::with_capacity(conns);
        for i in 0..conns.max(1) {
            let e = &self.endpoints[i % self.endpoints.len()];
            let url = self.url(e, tls.is_some());
            let mut endpoint = Endpoint::from_shared(url.clone())
                .with_context(|| format!("invalid endpoint {e:?}"))?
                .connect_timeout(dial)
                .timeout(REQUEST_TIMEOUT)
                .tcp_nodelay(true);
            if let Some(tls) = &tls {
                endpoint = endpoint
                    .tls_config(tls.clone())
                    .with_context(|| format!("TLS settings for {url}"))?;
            }
            let channel = tokio::time::timeout(dial, endpoint.connect())
                .await
                .map_err(|_| anyhow::anyhow!("timed out after {dial:?}"))
                .and_then(|r| r.map_err(|e| anyhow::anyhow!(error_chain(&e))))
                .with_context(|| format!("cannot connect to {url}"))?;
            channels.push(channel);
        }
        let token = match &self.user {
            None => Token(None),
            Some(user) => {
                let (name, password) = user.split_once(':').unwrap_or((user, ""));
                let resp = AuthClient::new(channels[0].clone())
                    .authenticate(pb::AuthenticateRequest {
                        name: name.into(),
                        password: password.into(),
                    })
                    .await
                    .map_err(|s| anyhow::anyhow!("{}", s.message()))
                    .with_context(|| format!("authenticating as {name}"))?;
                Token(Some(
                    resp.into_inner()
                        .token
                        .parse()
                        .context("the server's auth token is not valid metadata")?,
                ))
            }
        };
        Ok((channels, token))
    }
}

/// A KV client on `channel`.
pub fn kv(channel: Channel, token: &Token) -> Kv {
    KvClient::with_interceptor(channel, token.clone())
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX)
}

/// An error with its sources, as one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let c = cause.to_string();
        if !s.contains(&c) {
            s += ": ";
            s += &c;
        }
        source = cause.source();
    }
    s
}

/// How a failed request is reported: etcd's message for refusals, the transport's for
/// connection trouble.
pub fn status_text(s: &tonic::Status) -> String {
    if is_fatal(s) {
        format!("{:?}: {}", s.code(), error_chain(s))
    } else {
        s.message().to_string()
    }
}

/// Whether a failure means the server cannot be reached any more (the run stops), rather than
/// a request it refused.
pub fn is_fatal(s: &tonic::Status) -> bool {
    matches!(
        s.code(),
        tonic::Code::Unavailable
            | tonic::Code::Cancelled
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Unknown
    ) && !s.message().starts_with("etcdserver:")
}
