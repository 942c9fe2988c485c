//! Certificates for tests: a CA, and certificates it signs (rcgen). Used by the unit tests of
//! `keel::tls` and by the end-to-end TLS tests.

#![allow(dead_code)] // each user takes a part
use std::path::{Path, PathBuf};

/// A CA that signs certificates into a directory.
pub struct Ca {
    pub issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    pub path: PathBuf,
}

/// The serial number of the certificate signed as `file`.
fn serial(file: &str) -> rcgen::SerialNumber {
    let n = file.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    rcgen::SerialNumber::from(n >> 1)
}

/// The parameters of a CA certificate named `name`.
fn ca_params(name: &str) -> rcgen::CertificateParams {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    params
}

impl Ca {
    pub fn new(dir: &Path, name: &str) -> Ca {
        let params = ca_params(name);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let path = dir.join(format!("{name}.pem"));
        std::fs::write(&path, cert.pem()).unwrap();
        Ca {
            issuer: rcgen::Issuer::new(params, key),
            path,
        }
    }

    /// An intermediate CA signed by this one, its serial that of `name` (so [`Ca::revoke`]
    /// can revoke it); its certificate file is `name.pem`.
    pub fn intermediate(&self, dir: &Path, name: &str) -> Ca {
        let mut params = ca_params(name);
        params.serial_number = Some(serial(name));
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let path = dir.join(format!("{name}.pem"));
        std::fs::write(&path, cert.pem()).unwrap();
        Ca {
            issuer: rcgen::Issuer::new(params, key),
            path,
        }
    }

    /// A certificate for `sans` with common name `cn`, for servers and clients: its cert
    /// and key files.
    pub fn sign(&self, dir: &Path, file: &str, cn: &str, sans: &[&str]) -> (PathBuf, PathBuf) {
        let mut params =
            rcgen::CertificateParams::new(sans.iter().map(ToString::to_string).collect::<Vec<_>>())
                .unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        params.serial_number = Some(serial(file));
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let (c, k) = (
            dir.join(format!("{file}.pem")),
            dir.join(format!("{file}-key.pem")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }

    /// A CRL file revoking the certificate [`Ca::sign`] made as `file`.
    pub fn revoke(&self, dir: &Path, file: &str) -> PathBuf {
        let now = rcgen::date_time_ymd(2026, 1, 1);
        let crl = rcgen::CertificateRevocationListParams {
            this_update: now,
            next_update: rcgen::date_time_ymd(2099, 1, 1),
            crl_number: rcgen::SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: vec![rcgen::RevokedCertParams {
                serial_number: serial(file),
                revocation_time: now,
                reason_code: None,
                invalidity_date: None,
            }],
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        }
        .signed_by(&self.issuer)
        .unwrap();
        let path = dir.join("crl.pem");
        std::fs::write(&path, crl.pem().unwrap()).unwrap();
        path
    }
}
