//! `--auto-tls` and `--peer-auto-tls`: a self-signed certificate made at the first start, as
//! etcd's `transport.SelfCert`.
//!
//! The pair lives in `<data-dir>/fixtures/client` or `<data-dir>/fixtures/peer` as `cert.pem`
//! and `key.pem` (mode 0600, like every file of the member), and is reused by later starts.
//! It is valid for one year for the listen URLs' hosts (IP addresses as IP SANs, names as DNS
//! SANs), with organization "etcd". etcd uses a P-521 key; rustls cannot sign with P-521, so the
//! key is P-256 ECDSA. Nobody can verify such a certificate, so a member dialing its peers with
//! one does not verify theirs (etcd's `InsecureSkipVerify`).

use std::path::{Path, PathBuf};

use super::TlsError;

/// The certificate and key files in `dir`, made for `hosts` if they do not exist yet.
pub fn self_cert(dir: &Path, hosts: &[String]) -> Result<(PathBuf, PathBuf), TlsError> {
    let cert_path = dir.join("cert.pem");
    let key_path = dir.join("key.pem");
    if cert_path.exists() && key_path.exists() {
        return Ok((cert_path, key_path));
    }
    let fail = |reason: String| TlsError::File {
        what: "auto TLS directory",
        path: dir.to_path_buf(),
        reason,
    };
    std::fs::create_dir_all(dir).map_err(|e| fail(e.to_string()))?;
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "etcd");
    let now = std::time::SystemTime::now();
    params.not_before = now.into();
    params.not_after = (now + std::time::Duration::from_secs(365 * 24 * 3600)).into();
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyEncipherment,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    for host in hosts {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        params.subject_alt_names.push(match host.parse() {
            Ok(ip) => rcgen::SanType::IpAddress(ip),
            Err(_) => rcgen::SanType::DnsName(
                host.to_string()
                    .try_into()
                    .map_err(|e| fail(format!("host {host:?}: {e}")))?,
            ),
        });
    }
    let key = rcgen::KeyPair::generate().map_err(|e| fail(e.to_string()))?;
    let cert = params.self_signed(&key).map_err(|e| fail(e.to_string()))?;
    // Key first: a crash between the two leaves no certificate, and the next start makes both.
    write_private(&key_path, key.serialize_pem().as_bytes()).map_err(|e| fail(e.to_string()))?;
    write_private(&cert_path, cert.pem().as_bytes()).map_err(|e| fail(e.to_string()))?;
    tracing::info!(dir = %dir.display(), "generated a self-signed certificate (auto TLS)");
    Ok((cert_path, key_path))
}

/// Writes `data` to `path` with mode 0600, durably, through a temporary file and a rename.
fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn makes_a_usable_pair_once_and_reuses_it() {
        let dir = tempfile::tempdir().unwrap();
        let fixtures = dir.path().join("fixtures").join("client");
        let hosts = vec!["127.0.0.1".to_string(), "localhost".to_string()];
        let (cert, key) = self_cert(&fixtures, &hosts).unwrap();
        let pem = std::fs::read(&cert).unwrap();
        let s = super::super::Settings {
            cert_file: Some(cert.clone()),
            key_file: Some(key.clone()),
            ..Default::default()
        };
        super::super::server_config(&s).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        self_cert(&fixtures, &hosts).unwrap();
        assert_eq!(std::fs::read(&cert).unwrap(), pem, "reused, not remade");
    }
}
