//! `keel gateway start`: etcd's L4 gateway (`etcd gateway start`), a TCP proxy in front of a
//! cluster's client URLs, so that clients that know one address reach whichever members are up.
//!
//! Each accepted connection goes to the next endpoint in turn (round robin) among those not
//! marked down, and its bytes are copied both ways until either side closes. An endpoint that
//! refuses a connection is marked down for `--retry-delay` and the next one is tried; a monitor
//! dials the endpoints marked down every `--retry-delay` and brings back those that answer. With
//! every endpoint down, the client's connection is closed. As etcd's gateway, it does not look
//! into the bytes: TLS, gRPC and HTTP pass through unchanged.
//!
//! Flags are etcd's: `--endpoints` (schemes are stripped), `--listen-addr`, `--retry-delay`.
//! `--discovery-srv` (with `--discovery-srv-name`) takes the endpoints from the
//! `_etcd-client-ssl._tcp` and `_etcd-client._tcp` SRV records of a domain, as etcd's.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// `keel gateway start` flags, etcd's.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "keel gateway start",
    about = "Starts an L4 TCP gateway in front of a cluster"
)]
pub struct GatewayFlags {
    /// Comma separated etcd cluster endpoints.
    #[arg(long, default_value = "127.0.0.1:2379", value_delimiter = ',')]
    pub endpoints: Vec<String>,
    /// Listen address.
    #[arg(long, default_value = "127.0.0.1:23790")]
    pub listen_addr: String,
    /// Duration of delay before retrying failed endpoints.
    #[arg(long, default_value = "1m0s")]
    pub retry_delay: String,
    /// DNS domain used to bootstrap initial cluster.
    #[arg(long, default_value = "")]
    pub discovery_srv: String,
    /// Service name to query when using DNS discovery.
    #[arg(long, default_value = "")]
    pub discovery_srv_name: String,
    /// Accept insecure SRV records.
    #[arg(long, default_value_t = false, num_args = 0..=1, default_missing_value = "true", value_parser = crate::config::go_bool, action = clap::ArgAction::Set)]
    pub insecure_discovery: bool,
    /// Path to the client server TLS CA file for verifying the discovered endpoints.
    #[arg(long, default_value = "")]
    pub trusted_ca_file: String,
}

/// One endpoint and until when it is marked down.
#[derive(Debug)]
struct Remote {
    addr: String,
    down_until: std::sync::Mutex<Option<Instant>>,
}

impl Remote {
    fn active(&self) -> bool {
        self.down_until.lock().map(|d| d.is_none()).unwrap_or(true)
    }

    fn mark(&self, down: Option<Instant>) {
        if let Ok(mut d) = self.down_until.lock() {
            *d = down;
        }
    }
}

/// The gateway's endpoints and its round-robin position.
#[derive(Debug)]
struct Remotes {
    list: Vec<Remote>,
    next: AtomicUsize,
    retry_delay: Duration,
}

impl Remotes {
    /// The next active endpoint after the last one picked (etcd's unweighted `pick`).
    fn pick(&self) -> Option<&Remote> {
        let n = self.list.len();
        for _ in 0..n {
            let r = &self.list[self.next.fetch_add(1, Ordering::Relaxed) % n];
            if r.active() {
                return Some(r);
            }
        }
        None
    }
}

/// An endpoint without its scheme (`http://a:2379` → `a:2379`), as etcd's `stripSchema`.
pub fn strip_scheme(endpoint: &str) -> String {
    let rest = endpoint
        .split_once("://")
        .map_or(endpoint, |(_, rest)| rest);
    rest.split('/').next().unwrap_or(rest).to_string()
}

/// Runs the gateway until SIGINT or SIGTERM.
pub fn run(flags: GatewayFlags) -> anyhow::Result<()> {
    let retry_delay = crate::config::parse_go_duration(&flags.retry_delay)
        .with_context(|| format!("--retry-delay: {:?} is not a duration", flags.retry_delay))?;
    // etcd's tcpproxy: no delay means its default of 5 minutes.
    let retry_delay = if retry_delay.is_zero() {
        Duration::from_secs(300)
    } else {
        retry_delay
    };
    crate::logging::init("info", false, &[crate::config::compat::LogOutput::Stderr])
        .context("starting the log")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let listed = if flags.discovery_srv.is_empty() {
        flags.endpoints.clone()
    } else {
        // etcd's gateway: the client endpoints from `_etcd-client(-ssl)._tcp` SRV records;
        // unless `--insecure-discovery`, only the https ones that accept a connection. None:
        // `--endpoints`.
        let found = crate::discovery::srv::client_endpoints(
            &flags.discovery_srv,
            &flags.discovery_srv_name,
        )
        .context("cannot discover the cluster's endpoints")?;
        let found = if flags.insecure_discovery {
            found
        } else {
            runtime.block_on(secure_endpoints(
                found,
                &flags.trusted_ca_file,
                &flags.discovery_srv,
            ))?
        };
        if found.is_empty() {
            tracing::warn!("no endpoints discovered; using --endpoints");
            flags.endpoints.clone()
        } else {
            found
        }
    };
    let endpoints: Vec<String> = listed
        .iter()
        .map(|e| e.trim())
        .filter(|e| !e.is_empty())
        .map(strip_scheme)
        .collect();
    if endpoints.is_empty() {
        bail!("--endpoints: no endpoint given");
    }
    not_itself(&flags.listen_addr, &endpoints)?;
    runtime.block_on(serve(flags.listen_addr, endpoints, retry_delay))
}

/// etcd's check that the gateway does not proxy to itself: an endpoint whose host resolves to
/// an address of the listen host, on the same port, stops the start; so does an endpoint that
/// is not `host:port` or does not resolve.
fn not_itself(listen: &str, endpoints: &[String]) -> anyhow::Result<()> {
    let split = |a: &str| -> anyhow::Result<(String, u16)> {
        let (h, p) = a
            .rsplit_once(':')
            .with_context(|| format!("error parsing endpoint {a:?}: missing port"))?;
        let port = p
            .parse()
            .with_context(|| format!("error parsing endpoint {a:?}: bad port"))?;
        Ok((
            h.trim_start_matches('[').trim_end_matches(']').to_string(),
            port,
        ))
    };
    let resolve = |h: &str| -> anyhow::Result<Vec<std::net::IpAddr>> {
        use std::net::ToSocketAddrs as _;
        Ok((h, 0)
            .to_socket_addrs()
            .with_context(|| format!("error looking up {h:?}"))?
            .map(|a| a.ip())
            .collect())
    };
    let (lhost, lport) = split(listen)?;
    let local = resolve(&lhost)?;
    for e in endpoints {
        let (host, port) = split(e)?;
        let addrs = resolve(&host)?;
        if port == lport && addrs.iter().any(|a| local.contains(a)) {
            bail!("{e:?} is an endpoint and the listen address");
        }
    }
    Ok(())
}

/// The https endpoints of `found` that accept a connection (etcd's `ValidateSecureEndpoints`:
/// a TCP dial; the gateway passes bytes, so the certificates' names are the clients' business).
/// A `--trusted-ca-file` that does not load leaves none, as etcd's transport fails then.
async fn secure_endpoints(
    found: Vec<String>,
    ca: &str,
    _domain: &str,
) -> anyhow::Result<Vec<String>> {
    if !ca.is_empty()
        && let Err(e) = crate::tls::load_certs("trusted CA file", std::path::Path::new(ca))
    {
        tracing::warn!(error = %e, "cannot check the discovered endpoints");
        return Ok(Vec::new());
    }
    let mut secure = Vec::new();
    for ep in found {
        if !ep.starts_with("https://") {
            tracing::warn!(endpoint = %ep, "is insecure; skipped (--insecure-discovery to use it)");
            continue;
        }
        let dial = tokio::net::TcpStream::connect(strip_scheme(&ep));
        match tokio::time::timeout(DIAL_TIMEOUT, dial).await {
            Ok(Ok(_)) => secure.push(ep),
            Ok(Err(e)) => tracing::warn!(endpoint = %ep, error = %e, "skipped: cannot connect"),
            Err(_) => tracing::warn!(endpoint = %ep, "skipped: connecting timed out"),
        }
    }
    Ok(secure)
}

async fn serve(
    listen: String,
    endpoints: Vec<String>,
    retry_delay: Duration,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let remotes = Arc::new(Remotes {
        list: endpoints
            .iter()
            .map(|addr| Remote {
                addr: addr.clone(),
                down_until: std::sync::Mutex::new(None),
            })
            .collect(),
        next: AtomicUsize::new(0),
        retry_delay,
    });
    tokio::spawn(monitor(remotes.clone()));
    tracing::info!(address = %listen, ?endpoints, "ready to proxy client requests");
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((client, _)) => {
                    let _ = client.set_nodelay(true);
                    tokio::spawn(proxy(client, remotes.clone()));
                }
                // Out of file descriptors and the like: wait a little rather than spin.
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            _ = int.recv() => break,
            _ = term.recv() => break,
        }
    }
    tracing::info!("stopped");
    Ok(())
}

/// How long a dial to an endpoint may take before the next one is tried.
const DIAL_TIMEOUT: Duration = Duration::from_secs(5);

/// Connects `client` to the first endpoint that answers and copies bytes both ways.
async fn proxy(mut client: tokio::net::TcpStream, remotes: Arc<Remotes>) {
    let mut upstream = None;
    while let Some(remote) = remotes.pick() {
        match tokio::time::timeout(DIAL_TIMEOUT, tokio::net::TcpStream::connect(&remote.addr)).await
        {
            Ok(Ok(stream)) => {
                upstream = Some(stream);
                break;
            }
            Ok(Err(e)) => {
                remote.mark(Some(Instant::now() + remotes.retry_delay));
                tracing::warn!(address = %remote.addr, interval = ?remotes.retry_delay, error = %e, "deactivated endpoint");
            }
            Err(_) => {
                remote.mark(Some(Instant::now() + remotes.retry_delay));
                tracing::warn!(address = %remote.addr, interval = ?remotes.retry_delay, "deactivated endpoint: the dial timed out");
            }
        }
    }
    let Some(mut upstream) = upstream else {
        tracing::warn!("no endpoint is up: closing the client's connection");
        return;
    };
    let _ = upstream.set_nodelay(true);
    // As etcd's gateway: when either side ends, both connections are closed.
    let (mut client_read, mut client_write) = client.split();
    let (mut up_read, mut up_write) = upstream.split();
    tokio::select! {
        _ = tokio::io::copy(&mut client_read, &mut up_write) => {}
        _ = tokio::io::copy(&mut up_read, &mut client_write) => {}
    }
}

/// Every `retry_delay`, dials the endpoints marked down and brings back those that answer.
async fn monitor(remotes: Arc<Remotes>) {
    loop {
        tokio::time::sleep(remotes.retry_delay).await;
        for remote in remotes.list.iter().filter(|r| !r.active()) {
            match tokio::time::timeout(DIAL_TIMEOUT, tokio::net::TcpStream::connect(&remote.addr))
                .await
            {
                Ok(Ok(_)) => {
                    remote.mark(None);
                    tracing::info!(address = %remote.addr, "activated");
                }
                _ => {
                    remote.mark(Some(Instant::now() + remotes.retry_delay));
                    tracing::warn!(address = %remote.addr, interval = ?remotes.retry_delay,
                        "failed to activate endpoint (stay inactive for another interval)");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gateway_does_not_proxy_to_itself() {
        let e = |v: &[&str]| v.iter().map(ToString::to_string).collect::<Vec<_>>();
        assert!(not_itself("localhost:23790", &e(&["127.0.0.1:23790"])).is_err());
        assert!(not_itself("127.0.0.1:23790", &e(&["[::1]:23790", "127.0.0.1:2379"])).is_ok());
        let err = not_itself("127.0.0.1:23790", &e(&["127.0.0.1"])).unwrap_err();
        assert!(err.to_string().contains("missing port"), "{err}");
    }

    #[test]
    fn schemes_are_stripped_as_etcd_does() {
        assert_eq!(strip_scheme("http://127.0.0.1:2379"), "127.0.0.1:2379");
        assert_eq!(strip_scheme("https://a.example:2379/"), "a.example:2379");
        assert_eq!(strip_scheme("10.0.0.1:2379"), "10.0.0.1:2379");
    }

    #[test]
    fn picks_go_round_robin_over_active_endpoints() {
        let remotes = Remotes {
            list: ["a", "b", "c"]
                .iter()
                .map(|a| Remote {
                    addr: a.to_string(),
                    down_until: std::sync::Mutex::new(None),
                })
                .collect(),
            next: AtomicUsize::new(0),
            retry_delay: Duration::from_secs(60),
        };
        let picks: Vec<&str> = (0..4)
            .map(|_| remotes.pick().unwrap().addr.as_str())
            .collect();
        assert_eq!(picks, ["a", "b", "c", "a"]);
        remotes.list[1].mark(Some(Instant::now()));
        let picks: Vec<&str> = (0..3)
            .map(|_| remotes.pick().unwrap().addr.as_str())
            .collect();
        assert_eq!(picks, ["c", "a", "c"]);
        for r in &remotes.list {
            r.mark(Some(Instant::now()));
        }
        assert!(remotes.pick().is_none());
    }
}
