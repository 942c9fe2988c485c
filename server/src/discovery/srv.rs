//! `--discovery-srv DOMAIN` (and `--discovery-srv-name NAME`), as etcd's `srv.GetCluster`:
//!
//! - the SRV records of `_etcd-server-ssl[-NAME]._tcp.DOMAIN` give `https` peer URLs, those of
//!   `_etcd-server[-NAME]._tcp.DOMAIN` `http` ones (both are used; etcd 3.4.23 drops the `http`
//!   ones through a bug fixed in 3.5, which Keel does not copy);
//! - each target is resolved; the one whose address and port are those of this member's
//!   `--initial-advertise-peer-urls` is this member (named `--name`), the others are named
//!   `0`, `1`, … until they publish their names;
//! - the URLs keep the target's host name (`http://m1.example.com:2380`).
//!
//! The result is the initial cluster, in `--initial-cluster` form.

use std::net::{SocketAddr, ToSocketAddrs};

use super::dns::{self, DnsError, Srv};
use crate::config::Url;

#[derive(Debug, thiserror::Error)]
pub enum SrvError {
    #[error("error querying DNS SRV records for _{service} {source}")]
    Lookup {
        service: String,
        #[source]
        source: DnsError,
    },
    #[error("cannot resolve {host}: {reason}")]
    Resolve { host: String, reason: String },
    #[error(
        "bootstrap at {found} from DNS for {service} has scheme mismatch with expected peer {expected}"
    )]
    SchemeMismatch {
        found: String,
        service: String,
        expected: String,
    },
    #[error("cannot find local etcd member {0:?} in SRV records")]
    NotListed(String),
}

/// The addresses `host:port` resolves to.
fn resolve(host: &str, port: u16) -> Result<Vec<SocketAddr>, SrvError> {
    (host, port)
        .to_socket_addrs()
        .map(Iterator::collect)
        .map_err(|e| SrvError::Resolve {
            host: format!("{host}:{port}"),
            reason: e.to_string(),
        })
}

/// The members of one service's records: `(name, url)`, numbering unknown members from
/// `*next_name`.
fn members_of(
    records: &[Srv],
    service: &str,
    scheme: &str,
    name: &str,
    mine: &[(Vec<SocketAddr>, &Url)],
    next_name: &mut usize,
) -> Result<Vec<(String, String)>, SrvError> {
    let mut out = Vec::new();
    let mut last_error = None;
    for srv in records {
        let addrs = match resolve(&srv.target, srv.port) {
            Ok(a) => a,
            Err(e) => {
                last_error = Some(e);
                continue;
            }
        };
        let url = format!("{scheme}://{}:{}", srv.target, srv.port);
        let matched = mine
            .iter()
            .find(|(own, _)| own.iter().any(|a| addrs.contains(a)));
        match matched {
            Some((_, own)) if own.tls != (scheme == "https") => {
                last_error = Some(SrvError::SchemeMismatch {
                    found: url,
                    service: service.to_string(),
                    expected: own.to_string(),
                });
            }
            Some(_) => out.push((name.to_string(), url)),
            None => {
                out.push((next_name.to_string(), url));
                *next_name += 1;
            }
        }
    }
    match (out.is_empty(), last_error) {
        (true, Some(e)) => Err(e),
        _ => Ok(out),
    }
}

/// The initial cluster the SRV records of `domain` give, with `lookup` for the records.
pub fn cluster_with(
    domain: &str,
    service_name: &str,
    name: &str,
    advertise: &[Url],
    lookup: impl Fn(&str) -> Result<Vec<Srv>, DnsError>,
) -> Result<Vec<(String, Url)>, SrvError> {
    let suffix = if service_name.is_empty() {
        String::new()
    } else {
        format!("-{service_name}")
    };
    let mut mine = Vec::new();
    for url in advertise {
        mine.push((resolve(url.host.trim_matches(['[', ']']), url.port)?, url));
    }
    let mut next_name = 0;
    let mut found = Vec::new();
    let mut errors = Vec::new();
    for (service, scheme) in [
        (format!("etcd-server-ssl{suffix}"), "https"),
        (format!("etcd-server{suffix}"), "http"),
    ] {
        let records =
            lookup(&format!("_{service}._tcp.{domain}")).map_err(|source| SrvError::Lookup {
                service: service.clone(),
                source,
            });
        match records.and_then(|r| members_of(&r, &service, scheme, name, &mine, &mut next_name)) {
            Ok(m) => found.extend(m),
            Err(e) => {
                tracing::info!(service = %service, error = %e, "no peers from this SRV service");
                errors.push(e);
            }
        }
    }
    if found.is_empty() {
        // Both failed: a problem with records found first (a scheme mismatch, a target that
        // does not resolve), else the https lookup's error, as etcd reports it.
        let at = errors
            .iter()
            .position(|e| !matches!(e, SrvError::Lookup { .. }))
            .unwrap_or(0);
        return Err(errors.swap_remove(at));
    }
    if !found.iter().any(|(n, _)| n == name) {
        return Err(SrvError::NotListed(name.to_string()));
    }
    let mut cluster = Vec::new();
    for (n, url) in found {
        let url = crate::config::parse_url(&url).map_err(|reason| SrvError::Resolve {
            host: url.clone(),
            reason,
        })?;
        cluster.push((n, url));
    }
    Ok(cluster)
}

/// The client endpoints the SRV records of `domain` list (etcd's `srv.GetClient`, for the
/// gateway and the gRPC proxy): `https://target:port` from `_etcd-client-ssl[-NAME]._tcp`,
/// `http://target:port` from `_etcd-client[-NAME]._tcp`; an error only if both lookups fail.
pub fn client_endpoints_with(
    domain: &str,
    service_name: &str,
    lookup: impl Fn(&str) -> Result<Vec<Srv>, DnsError>,
) -> Result<Vec<String>, SrvError> {
    let suffix = if service_name.is_empty() {
        String::new()
    } else {
        format!("-{service_name}")
    };
    let mut out = Vec::new();
    let mut first_error = None;
    for (service, scheme) in [
        (format!("etcd-client-ssl{suffix}"), "https"),
        (format!("etcd-client{suffix}"), "http"),
    ] {
        match lookup(&format!("_{service}._tcp.{domain}")) {
            Ok(records) => out.extend(
                records
                    .iter()
                    .map(|r| format!("{scheme}://{}:{}", r.target, r.port)),
            ),
            Err(source) => {
                first_error.get_or_insert(SrvError::Lookup { service, source });
            }
        }
    }
    match (out.is_empty(), first_error) {
        (true, Some(e)) => Err(e),
        _ => Ok(out),
    }
}

/// [`client_endpoints_with`] through DNS.
pub fn client_endpoints(domain: &str, service_name: &str) -> Result<Vec<String>, SrvError> {
    client_endpoints_with(domain, service_name, dns::lookup_srv)
}

/// [`cluster_with`] through DNS.
pub fn cluster(
    domain: &str,
    service_name: &str,
    name: &str,
    advertise: &[Url],
) -> Result<Vec<(String, Url)>, SrvError> {
    cluster_with(domain, service_name, name, advertise, dns::lookup_srv)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn srv(target: &str, port: u16) -> Srv {
        Srv {
            priority: 0,
            weight: 0,
            port,
            target: target.into(),
        }
    }

    fn url(s: &str) -> Url {
        crate::config::parse_url(s).unwrap()
    }

    #[test]
    fn the_member_is_found_by_address_and_the_others_numbered() {
        let lookup = |q: &str| match q {
            "_etcd-server._tcp.example.com" => Ok(vec![
                srv("127.0.0.1", 2380),
                srv("localhost", 2381),
                srv("127.0.0.1", 2382),
            ]),
            _ => Err(DnsError::NoSuchHost { name: q.into() }),
        };
        let c = cluster_with(
            "example.com",
            "",
            "me",
            &[url("http://localhost:2381")],
            lookup,
        )
        .unwrap();
        let c: Vec<(String, String)> = c.into_iter().map(|(n, u)| (n, u.to_string())).collect();
        assert_eq!(
            c,
            [
                ("0".to_string(), "http://127.0.0.1:2380".to_string()),
                ("me".into(), "http://localhost:2381".into()),
                ("1".into(), "http://127.0.0.1:2382".into()),
            ]
        );
    }

    #[test]
    fn both_services_with_a_name_suffix() {
        let lookup = |q: &str| match q {
            "_etcd-server-ssl-blue._tcp.example.com" => Ok(vec![srv("127.0.0.1", 2380)]),
            "_etcd-server-blue._tcp.example.com" => Ok(vec![srv("127.0.0.1", 2390)]),
            _ => Err(DnsError::NoSuchHost { name: q.into() }),
        };
        let c = cluster_with(
            "example.com",
            "blue",
            "me",
            &[url("https://127.0.0.1:2380")],
            lookup,
        )
        .unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].0, "me");
        assert_eq!(c[1].1.to_string(), "http://127.0.0.1:2390");
    }

    #[test]
    fn client_endpoints_from_both_services() {
        let lookup = |q: &str| match q {
            "_etcd-client-ssl._tcp.example.com" => Ok(vec![srv("a.example.com", 2379)]),
            "_etcd-client._tcp.example.com" => Ok(vec![srv("b.example.com", 2379)]),
            _ => Err(DnsError::NoSuchHost { name: q.into() }),
        };
        assert_eq!(
            client_endpoints_with("example.com", "", lookup).unwrap(),
            ["https://a.example.com:2379", "http://b.example.com:2379"]
        );
        let none = |q: &str| Err(DnsError::NoSuchHost { name: q.into() });
        assert!(client_endpoints_with("example.com", "", none).is_err());
    }

    #[test]
    fn errors_name_the_problem() {
        let none = |q: &str| Err(DnsError::NoSuchHost { name: q.into() });
        let e = cluster_with(
            "example.com",
            "",
            "me",
            &[url("http://127.0.0.1:2380")],
            none,
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "error querying DNS SRV records for _etcd-server-ssl lookup _etcd-server-ssl._tcp.example.com: no such host"
        );
        let others = |q: &str| match q {
            "_etcd-server._tcp.example.com" => Ok(vec![srv("127.0.0.1", 2390)]),
            _ => Err(DnsError::NoSuchHost { name: q.into() }),
        };
        let e = cluster_with(
            "example.com",
            "",
            "me",
            &[url("http://127.0.0.1:2380")],
            others,
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "cannot find local etcd member \"me\" in SRV records"
        );
        let https_me = |q: &str| match q {
            "_etcd-server._tcp.example.com" => Ok(vec![srv("127.0.0.1", 2380)]),
            _ => Err(DnsError::NoSuchHost { name: q.into() }),
        };
        let e = cluster_with(
            "example.com",
            "",
            "me",
            &[url("https://127.0.0.1:2380")],
            https_me,
        )
        .unwrap_err();
        assert!(e.to_string().contains("scheme mismatch"), "{e}");
    }
}
