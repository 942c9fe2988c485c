//! The subject common name (CN) of an X.509 certificate: the user of a client that
//! authenticates by certificate (`--client-cert-auth`), and `--peer-cert-allowed-cn`.
//!
//! # Format (RFC 5280, DER)
//! `Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm, signature }` and
//! `TBSCertificate ::= SEQUENCE { [0] version OPTIONAL, serialNumber INTEGER, signature
//! SEQUENCE, issuer Name, validity SEQUENCE, subject Name, ... }`, where a `Name` is a SEQUENCE
//! of SETs of `SEQUENCE { type OID, value ANY }`. The CN is the value whose type is 2.5.4.3. As
//! Go's `pkix.Name` (what etcd reads), the last CN wins when there are several.
//!
//! Only certificates that already passed rustls's verification reach this code, but it never
//! trusts a length: malformed input gives `None`.

/// One DER TLV at the start of `b`: its tag, its contents, and what follows it.
pub(super) fn tlv(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, b) = b.split_first()?;
    let (&first, mut b) = b.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || b.len() < n {
            return None;
        }
        let len = b[..n]
            .iter()
            .fold(0usize, |l, &x| (l << 8) | usize::from(x));
        b = &b[n..];
        len
    };
    if b.len() < len {
        return None;
    }
    Some((tag, &b[..len], &b[len..]))
}

const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const OID: u8 = 0x06;
const VERSION: u8 = 0xa0;
/// 2.5.4.3, id-at-commonName.
const COMMON_NAME: &[u8] = &[0x55, 0x04, 0x03];

/// The subject CN of the DER certificate `der`, if it has one.
#[allow(clippy::big_endian_bytes, reason = "a BMPString is UTF-16BE")]
pub fn common_name(der: &[u8]) -> Option<String> {
    let (SEQUENCE, cert, _) = tlv(der)? else {
        return None;
    };
    let (SEQUENCE, tbs, _) = tlv(cert)? else {
        return None;
    };
    let mut rest = tbs;
    let (tag, _, after) = tlv(rest)?;
    if tag == VERSION {
        rest = after;
    }
    // serialNumber, signature, issuer, validity.
    for _ in 0..4 {
        rest = tlv(rest)?.2;
    }
    let (SEQUENCE, mut rdns, _) = tlv(rest)? else {
        return None;
    };
    let mut found = None;
    while !rdns.is_empty() {
        let (SET, mut set, next) = tlv(rdns)? else {
            return None;
        };
        rdns = next;
        while !set.is_empty() {
            let (SEQUENCE, attr, next) = tlv(set)? else {
                return None;
            };
            set = next;
            let (OID, oid, value) = tlv(attr)? else {
                return None;
            };
            if oid == COMMON_NAME {
                let (tag, value, _) = tlv(value)?;
                found = Some(match tag {
                    // BMPString: UTF-16BE.
                    0x1e => {
                        let units: Vec<u16> = value
                            .chunks_exact(2)
                            .map(|c| u16::from_be_bytes([c[0], c[1]]))
                            .collect();
                        String::from_utf16(&units).ok()?
                    }
                    // UTF8String, PrintableString, IA5String, T61String.
                    _ => String::from_utf8(value.to_vec()).ok()?,
                });
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert_with(dn: &[(rcgen::DnType, &str)]) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        for (t, v) in dn {
            params.distinguished_name.push(t.clone(), *v);
        }
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn reads_the_subject_common_name() {
        let der = cert_with(&[
            (rcgen::DnType::OrganizationName, "etcd"),
            (rcgen::DnType::CommonName, "root"),
        ]);
        assert_eq!(common_name(&der).as_deref(), Some("root"));
        let der = cert_with(&[(rcgen::DnType::OrganizationName, "etcd")]);
        assert_eq!(common_name(&der), None);
    }

    #[test]
    fn malformed_input_gives_none() {
        let der = cert_with(&[(rcgen::DnType::CommonName, "user")]);
        for cut in 0..der.len() {
            // Any prefix: no panic (the full length is the only one guaranteed to parse).
            let _ = common_name(&der[..cut]);
        }
        assert_eq!(common_name(&[]), None);
        assert_eq!(common_name(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
    }
}
