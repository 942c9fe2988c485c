//! etcd's peer SAN check (`checkSAN`): a member connecting with a client certificate must
//! connect from an address the certificate names, so a peer certificate copied to another host
//! is refused there. Skipped with `--experimental-peer-skip-client-san-verification`.
//!
//! As etcd: a certificate naming IP addresses passes if one is the remote address; otherwise,
//! if it names DNS names, the remote address's reverse lookup must give one of them (`*.`
//! wildcards match a suffix), or one of them must resolve to the remote address; a certificate
//! naming neither passes.
//!
//! # Format (RFC 5280, DER)
//! After the subject, `TBSCertificate` holds `subjectPublicKeyInfo SEQUENCE`, optional
//! `[1]`/`[2]` unique IDs and `[3] EXPLICIT Extensions`, a SEQUENCE of `SEQUENCE { extnID OID,
//! critical BOOLEAN DEFAULT FALSE, extnValue OCTET STRING }`. The subjectAltName extension
//! (2.5.29.17) holds `GeneralNames ::= SEQUENCE OF GeneralName`, where `[2] IMPLICIT IA5String`
//! is a DNS name and `[7] IMPLICIT OCTET STRING` an IP address (4 or 16 bytes). Malformed input
//! gives no names (only certificates rustls verified reach this code).

use std::net::IpAddr;

use super::cn::tlv;

const SEQUENCE: u8 = 0x30;
const VERSION: u8 = 0xa0;
const EXTENSIONS: u8 = 0xa3;
const OID: u8 = 0x06;
const BOOLEAN: u8 = 0x01;
const OCTET_STRING: u8 = 0x04;
const DNS_NAME: u8 = 0x82;
const IP_ADDRESS: u8 = 0x87;
/// 2.5.29.17, id-ce-subjectAltName.
const SUBJECT_ALT_NAME: &[u8] = &[0x55, 0x1d, 0x11];

/// The DNS names and IP addresses of a certificate's subjectAltName.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct AltNames {
    pub dns: Vec<String>,
    pub ips: Vec<IpAddr>,
}

/// The subjectAltName of the DER certificate `der` (empty when it has none or is malformed).
pub fn alt_names(der: &[u8]) -> AltNames {
    parse(der).unwrap_or_default()
}

fn parse(der: &[u8]) -> Option<AltNames> {
    let (SEQUENCE, cert, _) = tlv(der)? else {
        return None;
    };
    let (SEQUENCE, tbs, _) = tlv(cert)? else {
        return None;
    };
    let mut rest = tbs;
    if tlv(rest)?.0 == VERSION {
        rest = tlv(rest)?.2;
    }
    // serialNumber, signature, issuer, validity, subject, subjectPublicKeyInfo.
    for _ in 0..6 {
        rest = tlv(rest)?.2;
    }
    // The optional unique IDs, then the extensions.
    let extensions = loop {
        let (tag, value, next) = tlv(rest)?;
        if tag == EXTENSIONS {
            break value;
        }
        rest = next;
    };
    let (SEQUENCE, mut list, _) = tlv(extensions)? else {
        return None;
    };
    let mut names = AltNames::default();
    while !list.is_empty() {
        let (SEQUENCE, ext, next) = tlv(list)? else {
            return None;
        };
        list = next;
        let (OID, oid, mut ext) = tlv(ext)? else {
            return None;
        };
        if oid != SUBJECT_ALT_NAME {
            continue;
        }
        if tlv(ext)?.0 == BOOLEAN {
            ext = tlv(ext)?.2;
        }
        let (OCTET_STRING, value, _) = tlv(ext)? else {
            return None;
        };
        let (SEQUENCE, mut general, _) = tlv(value)? else {
            return None;
        };
        while !general.is_empty() {
            let (tag, value, next) = tlv(general)?;
            general = next;
            match tag {
                DNS_NAME => names.dns.push(String::from_utf8(value.to_vec()).ok()?),
                IP_ADDRESS => match value.len() {
                    4 => names
                        .ips
                        .push(IpAddr::from(<[u8; 4]>::try_from(value).ok()?)),
                    16 => names
                        .ips
                        .push(IpAddr::from(<[u8; 16]>::try_from(value).ok()?)),
                    _ => {}
                },
                _ => {}
            }
        }
    }
    Some(names)
}

/// Why a peer's certificate does not fit its address.
#[derive(Debug, thiserror::Error)]
pub enum SanError {
    #[error("tls: certificate is valid for {ips:?}, not {host}")]
    Ip { host: IpAddr, ips: Vec<IpAddr> },
    #[error("tls: {host:?} does not match any of DNSNames {dns:?}")]
    Dns { host: String, dns: Vec<String> },
}

/// etcd's `checkSAN` of the certificate `der` against the remote address `host`.
pub async fn check(der: &[u8], host: IpAddr) -> Result<(), SanError> {
    // Compare IPv4-mapped IPv6 remotes as IPv4, as Go's IP comparison does.
    let host = host.to_canonical();
    let names = alt_names(der);
    if !names.ips.is_empty() {
        if names.ips.iter().any(|ip| ip.to_canonical() == host) {
            return Ok(());
        }
        if names.dns.is_empty() {
            return Err(SanError::Ip {
                host,
                ips: names.ips,
            });
        }
    }
    if names.dns.is_empty() {
        return Ok(());
    }
    let (wildcards, plain): (Vec<&str>, Vec<&str>) = names
        .dns
        .iter()
        .map(String::as_str)
        .partition(|d| d.starts_with("*."));
    // Reverse lookup.
    if let Ok(Some(name)) = tokio::task::spawn_blocking(move || reverse_lookup(host)).await {
        let name = name.trim_end_matches('.');
        if wildcards.iter().any(|w| name.ends_with(&w[1..])) || plain.contains(&name) {
            return Ok(());
        }
    }
    // Forward lookups.
    for dns in &plain {
        if let Ok(addrs) = tokio::net::lookup_host((*dns, 0)).await
            && addrs.into_iter().any(|a| a.ip().to_canonical() == host)
        {
            return Ok(());
        }
    }
    Err(SanError::Dns {
        host: host.to_string(),
        dns: names.dns,
    })
}

/// The name the resolver gives for `ip` (a PTR lookup), if any. Blocking.
fn reverse_lookup(ip: IpAddr) -> Option<String> {
    let addr = std::net::SocketAddr::new(ip, 0);
    let (storage, len) = sockaddr(&addr);
    let mut host = [0 as libc::c_char; 1025];
    // SAFETY: `storage` is a valid sockaddr of `len` bytes for the call's duration; `host` is a
    // writable buffer of the length given; no service buffer is asked for (null, length 0).
    let rc = unsafe {
        libc::getnameinfo(
            (&raw const storage).cast::<libc::sockaddr>(),
            len,
            host.as_mut_ptr(),
            host.len() as libc::socklen_t,
            std::ptr::null_mut(),
            0,
            libc::NI_NAMEREQD,
        )
    };
    if rc != 0 {
        return None;
    }
    // getnameinfo NUL-terminates what it writes into `host` on success.
    let bytes: Vec<u8> = host
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8(bytes).ok()
}

/// `addr` as a C socket address.
fn sockaddr(addr: &std::net::SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: an all-zero sockaddr_storage is a valid value (plain integers and arrays).
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        std::net::SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    // Network byte order in memory.
                    s_addr: u32::from(*a.ip()).to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { std::ptr::write((&raw mut storage).cast::<libc::sockaddr_in>(), sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        std::net::SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { std::ptr::write((&raw mut storage).cast::<libc::sockaddr_in6>(), sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(names: &[&str]) -> Vec<u8> {
        let params = rcgen::CertificateParams::new(
            names.iter().map(ToString::to_string).collect::<Vec<_>>(),
        )
        .unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn reads_dns_names_and_ip_addresses() {
        let der = cert(&["localhost", "10.9.9.9", "::1", "*.example.org"]);
        let names = alt_names(&der);
        assert_eq!(names.dns, ["localhost", "*.example.org"]);
        assert_eq!(
            names.ips,
            [
                "10.9.9.9".parse::<IpAddr>().unwrap(),
                "::1".parse().unwrap()
            ]
        );
        for cut in 0..der.len() {
            let _ = alt_names(&der[..cut]);
        }
        assert_eq!(alt_names(&[]), AltNames::default());
    }

    #[tokio::test]
    async fn a_peer_must_connect_from_an_address_its_certificate_names() {
        let local: IpAddr = "127.0.0.1".parse().unwrap();
        // By IP.
        assert!(check(&cert(&["127.0.0.1"]), local).await.is_ok());
        let e = check(&cert(&["10.9.9.9"]), local).await.unwrap_err();
        assert_eq!(
            e.to_string(),
            "tls: certificate is valid for [10.9.9.9], not 127.0.0.1"
        );
        // By name, resolved forward (localhost is 127.0.0.1 in /etc/hosts).
        assert!(
            check(&cert(&["10.9.9.9", "localhost"]), local)
                .await
                .is_ok()
        );
        let e = check(&cert(&["keel-no-such-host.invalid"]), local)
            .await
            .unwrap_err();
        assert!(
            e.to_string().contains("does not match any of DNSNames"),
            "{e}"
        );
        // IPv4-mapped IPv6 remotes compare as IPv4.
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        assert!(check(&cert(&["127.0.0.1"]), mapped).await.is_ok());
    }
}
