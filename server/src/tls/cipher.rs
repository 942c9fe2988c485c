//! `--cipher-suites`: etcd's names (Go's `crypto/tls` names) mapped to rustls's suites.
//!
//! etcd accepts every name Go knows, secure or not (`pkg/tlsutil/cipher_suites.go`), and applies
//! the list to TLS 1.2 only: Go's TLS 1.3 suites are always on. Keel does the same with the
//! suites rustls implements: the ECDHE suites with AES-GCM or ChaCha20-Poly1305. A name Go knows
//! but rustls does not implement (CBC, RC4, 3DES, RSA key exchange) is refused at start, saying
//! so, rather than silently dropped: the operator asked for a suite Keel cannot offer.

use rustls::SupportedCipherSuite;
use rustls::crypto::ring::cipher_suite as ring;

/// Go's names for suites rustls has (TLS 1.2), and Go's two aliases for the ChaCha20 ones.
const SUPPORTED: &[(&str, SupportedCipherSuite)] = &[
    (
        "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
        ring::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
    ),
    (
        "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
        ring::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
    ),
    (
        "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
        ring::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
    ),
    (
        "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
        ring::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
    ),
    (
        "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
        ring::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
    ),
    (
        "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305",
        ring::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
    ),
    (
        "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
        ring::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
    ),
    (
        "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305",
        ring::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
    ),
];

/// Go's TLS 1.3 suite names: accepted, as etcd accepts them, and always on.
const TLS13: &[&str] = &[
    "TLS_AES_128_GCM_SHA256",
    "TLS_AES_256_GCM_SHA384",
    "TLS_CHACHA20_POLY1305_SHA256",
];

/// Names Go (and so etcd) knows that rustls does not implement.
const UNSUPPORTED: &[&str] = &[
    "TLS_RSA_WITH_RC4_128_SHA",
    "TLS_RSA_WITH_3DES_EDE_CBC_SHA",
    "TLS_RSA_WITH_AES_128_CBC_SHA",
    "TLS_RSA_WITH_AES_256_CBC_SHA",
    "TLS_RSA_WITH_AES_128_CBC_SHA256",
    "TLS_RSA_WITH_AES_128_GCM_SHA256",
    "TLS_RSA_WITH_AES_256_GCM_SHA384",
    "TLS_ECDHE_ECDSA_WITH_RC4_128_SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA",
    "TLS_ECDHE_RSA_WITH_RC4_128_SHA",
    "TLS_ECDHE_RSA_WITH_3DES_EDE_CBC_SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256",
];

/// The TLS 1.2 suites to offer: `None` for rustls's defaults (no `--cipher-suites`), else the
/// listed ones in the listed order (possibly none: then TLS 1.2 is off and only 1.3 is spoken).
#[derive(Debug, Clone, Default)]
pub struct Suites(pub Option<Vec<SupportedCipherSuite>>);

impl PartialEq for Suites {
    fn eq(&self, other: &Self) -> bool {
        let names = |s: &Suites| {
            s.0.as_ref()
                .map(|v| v.iter().map(|c| c.suite()).collect::<Vec<_>>())
        };
        names(self) == names(other)
    }
}

/// Parses `--cipher-suites` (comma-separated; empty: the defaults).
pub fn parse(list: &str) -> Result<Suites, String> {
    let names: Vec<&str> = list
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    if names.is_empty() {
        return Ok(Suites(None));
    }
    let mut suites = Vec::new();
    for name in names {
        if let Some((_, suite)) = SUPPORTED.iter().find(|(n, _)| *n == name) {
            if !suites.contains(suite) {
                suites.push(*suite);
            }
        } else if TLS13.contains(&name) {
            // Always on, as in Go.
        } else if UNSUPPORTED.contains(&name) {
            return Err(format!(
                "TLS cipher suite {name:?} is not supported by Keel (only ECDHE with AES-GCM or \
                 ChaCha20-Poly1305; supported: {})",
                supported_names()
            ));
        } else {
            // etcd's own message.
            return Err(format!("unexpected TLS cipher suite {name:?}"));
        }
    }
    Ok(Suites(Some(suites)))
}

fn supported_names() -> String {
    SUPPORTED
        .iter()
        .map(|(n, _)| *n)
        .chain(TLS13.iter().copied())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_rustls_suites() {
        let s = parse(
            "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256, TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305,\
             TLS_AES_128_GCM_SHA256",
        )
        .unwrap();
        let got: Vec<_> = s.0.unwrap().iter().map(|c| c.suite()).collect();
        assert_eq!(
            got,
            vec![
                rustls::CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
                rustls::CipherSuite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
            ]
        );
        assert_eq!(parse("").unwrap(), Suites(None));
        // Only TLS 1.3 names: TLS 1.2 offers nothing.
        assert_eq!(
            parse("TLS_AES_256_GCM_SHA384").unwrap(),
            Suites(Some(vec![]))
        );
    }

    #[test]
    fn unknown_and_unsupported_names_are_refused() {
        assert_eq!(
            parse("TLS_NOPE").unwrap_err(),
            "unexpected TLS cipher suite \"TLS_NOPE\""
        );
        let e = parse("TLS_RSA_WITH_AES_128_CBC_SHA").unwrap_err();
        assert!(e.contains("is not supported by Keel"), "{e}");
        assert!(e.contains("TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256"), "{e}");
    }
}
