//! TLS for clients and peers (rustls), with etcd's flags and behaviour.
//!
//! - [`Settings`] is one side's flags: the client side (`--cert-file`, `--key-file`,
//!   `--trusted-ca-file`, `--client-cert-auth`, `--client-crl-file`, `--auto-tls`) or the peer
//!   side (the same with `--peer-`, plus `--peer-cert-allowed-cn` and
//!   `--peer-cert-allowed-hostname`).
//! - As etcd's `TLSInfo.ServerConfig`, a server requires and verifies client certificates when a
//!   trusted CA file is given or client-cert auth is on; TLS 1.2 is the minimum; `--cipher-suites`
//!   restricts TLS 1.2 (TLS 1.3 suites are always on, as in Go).
//! - **Rotation without restart:** the certificate, key, CA and CRL files are looked at (their
//!   size, modification time and inode) at every handshake, and the configuration is rebuilt
//!   when one changed. etcd re-reads its certificate per handshake. A change that does not load
//!   (a key that no longer matches its certificate mid-rotation, a truncated file) keeps the
//!   previous configuration and logs why, once per change.
//! - Everything wrong with the files at start (missing, not PEM, a key that does not match, a
//!   CA without certificates) is a [`TlsError`] naming the file, and the member does not start.
//!
//! Rooms: [`cipher`] (suite names), [`cn`] (a certificate's common name), [`auto`] (`--auto-tls`
//! certificates), [`incoming`] (the TLS listener for tonic), [`dial`] (peer connections).

pub mod auto;
pub mod cipher;
pub mod cn;
pub mod dial;
pub mod incoming;
pub mod san;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{
    CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName, UnixTime,
};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};

pub use cipher::Suites;

/// A TLS file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {reason}")]
    File {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("the key in {key} does not match the certificate in {cert}")]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// One side's TLS flags (client or peer).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Settings {
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub trusted_ca_file: Option<PathBuf>,
    pub client_cert_auth: bool,
    pub crl_file: Option<PathBuf>,
    pub auto_tls: bool,
    /// Peer side only: the CN a connecting member's certificate must have.
    pub allowed_cn: Option<String>,
    /// Peer side only: a name the connecting member's certificate must be valid for.
    pub allowed_hostname: Option<String>,
    pub suites: Suites,
    /// Set by `--auto-tls`: the certificate is self-signed, so a peer dialing with it does not
    /// verify the other side's (etcd's `InsecureSkipVerify` for self-signed certificates).
    pub self_signed: bool,
}

impl Settings {
    /// Whether a certificate and key are configured (etcd's `!TLSInfo.Empty()`).
    pub fn has_cert(&self) -> bool {
        self.cert_file.is_some() && self.key_file.is_some()
    }

    fn files(&self) -> Vec<PathBuf> {
        [
            &self.cert_file,
            &self.key_file,
            &self.trusted_ca_file,
            &self.crl_file,
        ]
        .into_iter()
        .flatten()
        .cloned()
        .collect()
    }

    fn provider(&self) -> Arc<CryptoProvider> {
        let mut provider = rustls::crypto::ring::default_provider();
        if let Some(allowed) = &self.suites.0 {
            provider.cipher_suites.retain(|s| match s {
                rustls::SupportedCipherSuite::Tls13(_) => true,
                _ => allowed.contains(s),
            });
        }
        Arc::new(provider)
    }

    fn versions(&self) -> &'static [&'static rustls::SupportedProtocolVersion] {
        match &self.suites.0 {
            Some(s) if s.is_empty() => TLS13_ONLY,
            _ => rustls::ALL_VERSIONS,
        }
    }
}

/// TLS 1.3 alone: `--cipher-suites` listed no TLS 1.2 suite.
static TLS13_ONLY: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];

fn read_err(what: &'static str, path: &Path) -> impl FnOnce(String) -> TlsError {
    let path = path.to_path_buf();
    move |reason| TlsError::File { what, path, reason }
}

/// Every certificate in the PEM file `path`.
pub fn load_certs(
    what: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| read_err(what, path)(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| read_err(what, path)(e.to_string()))?;
    if certs.is_empty() {
        return Err(read_err(what, path)("no PEM certificate in it".into()));
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| read_err("key file", path)(e.to_string()))
}

fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs("trusted CA file", path)? {
        roots
            .add(cert)
            .map_err(|e| read_err("trusted CA file", path)(e.to_string()))?;
    }
    Ok(roots)
}

/// The CRLs of `path`: PEM, or one DER CRL (Go's `x509.ParseCRL` takes either).
fn load_crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    let bytes = std::fs::read(path).map_err(|e| read_err("CRL file", path)(e.to_string()))?;
    if bytes.first() == Some(&0x30) {
        // A DER SEQUENCE: the CRL itself (webpki checks it when it is used).
        return Ok(vec![CertificateRevocationListDer::from(bytes)]);
    }
    let crls = CertificateRevocationListDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| read_err("CRL file", path)(e.to_string()))?;
    if crls.is_empty() {
        return Err(read_err("CRL file", path)("no PEM or DER CRL in it".into()));
    }
    Ok(crls)
}

/// The certificate chain and key of `s`, checked to belong together.
fn identity(
    s: &Settings,
    provider: &CryptoProvider,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let (Some(cert), Some(key)) = (&s.cert_file, &s.key_file) else {
        return Err(TlsError::Config(
            "a certificate and its key are both needed".into(),
        ));
    };
    let certs = load_certs("certificate file", cert)?;
    let der = load_key(key)?;
    let signing = provider
        .key_provider
        .load_private_key(der.clone_key())
        .map_err(|e| read_err("key file", key)(e.to_string()))?;
    let certified = rustls::sign::CertifiedKey::new(certs.clone(), signing);
    if certified.keys_match().is_err() {
        return Err(TlsError::KeyMismatch {
            cert: cert.clone(),
            key: key.clone(),
        });
    }
    Ok((certs, der))
}

/// The rustls server configuration of `s` (ALPN h2 for gRPC, http/1.1 for `/health` and
/// `/metrics`).
pub fn server_config(s: &Settings) -> Result<rustls::ServerConfig, TlsError> {
    let provider = s.provider();
    let (certs, key) = identity(s, &provider)?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(s.versions())
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = if s.trusted_ca_file.is_some() || s.client_cert_auth {
        let Some(ca) = &s.trusted_ca_file else {
            return Err(TlsError::Config(
                "client certificate authentication needs a trusted CA file \
                 (--trusted-ca-file or --peer-trusted-ca-file)"
                    .into(),
            ));
        };
        let mut verifier = WebPkiClientVerifier::builder_with_provider(
            Arc::new(load_roots(ca)?),
            provider.clone(),
        );
        if let Some(crl) = &s.crl_file {
            // As etcd's check: a revoked certificate anywhere in the client's chain is refused;
            // one whose issuer has no CRL in the file (another CA of the bundle, an
            // intermediate's issuer) is not.
            verifier = verifier
                .with_crls(load_crls(crl)?)
                .allow_unknown_revocation_status();
        }
        let inner = verifier
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        builder.with_client_cert_verifier(Arc::new(AllowedPeer {
            inner,
            cn: s.allowed_cn.clone(),
            hostname: s.allowed_hostname.clone(),
        }))
    } else {
        builder.with_no_client_auth()
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// The rustls client configuration a member dials its peers with: its own certificate (if it
/// has one), and the peers' CA (or, with a self-signed `--peer-auto-tls` certificate, no
/// verification, as etcd).
pub fn client_config(s: &Settings) -> Result<rustls::ClientConfig, TlsError> {
    let provider = s.provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(s.versions())
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = if s.self_signed {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoServerVerification(provider.clone())))
    } else {
        let roots = match &s.trusted_ca_file {
            Some(ca) => load_roots(ca)?,
            None => system_roots(),
        };
        // (With no root at all every handshake fails anyway: the plain verifier says so then,
        // rather than this configuration failing to build.)
        if (s.allowed_cn.is_some() || s.allowed_hostname.is_some()) && !roots.is_empty() {
            // etcd's `VerifyPeerCertificate` is in the dialing configuration too: the member
            // dialed must have the allowed CN or hostname as well.
            let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
                Arc::new(roots),
                provider.clone(),
            )
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AllowedServer {
                    inner,
                    cn: s.allowed_cn.clone(),
                    hostname: s.allowed_hostname.clone(),
                }))
        } else {
            builder.with_root_certificates(roots)
        }
    };
    let mut config = if s.has_cert() {
        let (certs, key) = identity(s, &provider)?;
        builder
            .with_client_auth_cert(certs, key)
            .map_err(|e| TlsError::Config(e.to_string()))?
    } else {
        builder.with_no_client_auth()
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// The system's CA bundle (Debian's `ca-certificates`), as Go uses without a CA file.
pub(crate) fn system_roots() -> RootCertStore {
    let mut roots = RootCertStore::empty();
    let bundle = Path::new("/etc/ssl/certs/ca-certificates.crt");
    if let Ok(iter) = CertificateDer::pem_file_iter(bundle) {
        for cert in iter.flatten() {
            let _ = roots.add(cert);
        }
    }
    roots
}

/// The check of `--peer-cert-allowed-cn` / `--peer-cert-allowed-hostname` on a verified
/// certificate: etcd's message when it fails.
fn allowed(
    end_entity: &CertificateDer<'_>,
    cn: Option<&str>,
    hostname: Option<&str>,
) -> Result<(), rustls::Error> {
    let refused = || rustls::Error::General("client certificate authentication failed".into());
    if let Some(cn) = cn
        && cn::common_name(end_entity).as_deref() != Some(cn)
    {
        return Err(refused());
    }
    if let Some(host) = hostname {
        let name = ServerName::try_from(host).map_err(|_| refused())?;
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_name(&parsed, &name).map_err(|_| refused())?;
    }
    Ok(())
}

/// The server verifier a member dials its peers with when `--peer-cert-allowed-cn` or
/// `--peer-cert-allowed-hostname` is set: the chain as usual, then the same check as on the
/// peers' incoming certificates.
#[derive(Debug)]
struct AllowedServer {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    cn: Option<String>,
    hostname: Option<String>,
}

impl rustls::client::danger::ServerCertVerifier for AllowedServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let verified = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        allowed(end_entity, self.cn.as_deref(), self.hostname.as_deref())?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The client verifier with etcd's `--peer-cert-allowed-cn` / `--peer-cert-allowed-hostname`
/// checks on top of chain (and CRL) verification.
#[derive(Debug)]
struct AllowedPeer {
    inner: Arc<dyn ClientCertVerifier>,
    cn: Option<String>,
    hostname: Option<String>,
}

impl ClientCertVerifier for AllowedPeer {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        allowed(end_entity, self.cn.as_deref(), self.hostname.as_deref())?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Accepts any server certificate (but still checks the handshake signatures): for peers that
/// use `--peer-auto-tls` certificates, which nobody can verify.
#[derive(Debug)]
struct NoServerVerification(Arc<CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoServerVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// What identifies a file's version: size, modification time, inode (a rename of a new file
/// into place changes the inode even within one second).
type Stamp = Option<(u64, std::time::SystemTime, u64)>;

fn stamp(path: &Path) -> Stamp {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(path).ok()?;
    Some((m.len(), m.modified().ok()?, m.ino()))
}

/// A configuration built from files, rebuilt when one of them changes (checked on each use).
pub struct Reloading<T> {
    what: &'static str,
    settings: Settings,
    build: fn(&Settings) -> Result<T, TlsError>,
    state: Mutex<ReloadState<T>>,
}

/// The files' stamps when last read, the configuration in use, and, after a failed reload, when
/// to try again (a fix that changes no stamp, such as a `chmod`, must still be picked up).
struct ReloadState<T> {
    stamps: Vec<Stamp>,
    current: Arc<T>,
    retry_at: Option<std::time::Instant>,
}

/// How soon a reload that failed is tried again.
const RELOAD_RETRY: std::time::Duration = std::time::Duration::from_secs(5);

impl<T> std::fmt::Debug for Reloading<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloading")
            .field("what", &self.what)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl<T> Reloading<T> {
    /// Builds the configuration now: an error here stops the start.
    pub fn new(
        what: &'static str,
        settings: Settings,
        build: fn(&Settings) -> Result<T, TlsError>,
    ) -> Result<Reloading<T>, TlsError> {
        let stamps = settings.files().iter().map(|p| stamp(p)).collect();
        let current = Arc::new(build(&settings)?);
        Ok(Reloading {
            what,
            settings,
            build,
            state: Mutex::new(ReloadState {
                stamps,
                current,
                retry_at: None,
            }),
        })
    }

    /// The configuration, rebuilt first if a file changed since it was built.
    pub fn get(&self) -> Arc<T> {
        let stamps: Vec<Stamp> = self.settings.files().iter().map(|p| stamp(p)).collect();
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = std::time::Instant::now();
        if state.stamps != stamps || state.retry_at.is_some_and(|at| now >= at) {
            state.stamps = stamps;
            match (self.build)(&self.settings) {
                Ok(config) => {
                    tracing::info!(what = self.what, "TLS files changed: reloaded them");
                    state.current = Arc::new(config);
                    state.retry_at = None;
                }
                Err(e) => {
                    tracing::warn!(
                        what = self.what,
                        error = %e,
                        "TLS files changed but cannot be loaded: keeping the previous ones, \
                         trying again in {RELOAD_RETRY:?}"
                    );
                    state.retry_at = Some(now + RELOAD_RETRY);
                }
            }
        }
        state.current.clone()
    }
}

/// A server side's reloading configuration.
pub type ServerTls = Reloading<rustls::ServerConfig>;
/// A dialing side's reloading configuration.
pub type ClientTls = Reloading<rustls::ClientConfig>;

/// The server TLS of `s` (its files read now).
pub fn server(what: &'static str, s: &Settings) -> Result<Arc<ServerTls>, TlsError> {
    Reloading::new(what, s.clone(), server_config).map(Arc::new)
}

/// The client TLS of `s` (its files read now).
pub fn client(what: &'static str, s: &Settings) -> Result<Arc<ClientTls>, TlsError> {
    Reloading::new(what, s.clone(), client_config).map(Arc::new)
}

/// Certificates for tests (shared with the end-to-end tests).
#[cfg(test)]
#[path = "../../tests/common/certs.rs"]
pub(crate) mod testing;

#[cfg(test)]
mod tests {
    use super::testing::Ca;
    use super::*;

    fn settings(cert: &Path, key: &Path) -> Settings {
        Settings {
            cert_file: Some(cert.into()),
            key_file: Some(key.into()),
            ..Settings::default()
        }
    }

    #[test]
    fn bad_files_are_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new(dir.path(), "ca");
        let (cert, key) = ca.sign(dir.path(), "server", "server", &["127.0.0.1"]);
        let (_, other_key) = ca.sign(dir.path(), "other", "other", &["127.0.0.1"]);

        let missing = dir.path().join("missing.pem");
        let e = server_config(&settings(&missing, &key)).unwrap_err();
        assert!(
            e.to_string().starts_with(&format!(
                "cannot read certificate file {}",
                missing.display()
            )),
            "{e}"
        );
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "not a certificate").unwrap();
        let e = server_config(&settings(&garbage, &key)).unwrap_err();
        assert!(e.to_string().contains("no PEM certificate"), "{e}");
        let e = server_config(&settings(&cert, &garbage)).unwrap_err();
        assert!(e.to_string().starts_with("cannot read key file"), "{e}");
        let e = server_config(&settings(&cert, &other_key)).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "the key in {} does not match the certificate in {}",
                other_key.display(),
                cert.display()
            )
        );
        let mut s = settings(&cert, &key);
        s.client_cert_auth = true;
        let e = server_config(&s).unwrap_err();
        assert!(e.to_string().contains("needs a trusted CA file"), "{e}");
        s.trusted_ca_file = Some(garbage);
        let e = server_config(&s).unwrap_err();
        assert!(
            e.to_string().starts_with("cannot read trusted CA file"),
            "{e}"
        );
        s.trusted_ca_file = Some(ca.path.clone());
        server_config(&s).unwrap();
    }

    /// A handshake of a client with `client` settings against a server with `server` settings:
    /// the CN the server saw, or the error.
    async fn handshake(server: &Settings, client: &Settings) -> Result<Option<String>, String> {
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config(server).unwrap()));
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config(client).unwrap()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let serve = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let tls = acceptor.accept(tcp).await.map_err(|e| e.to_string())?;
            Ok::<_, String>(
                tls.get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(|c| cn::common_name(c)),
            )
        });
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("127.0.0.1").unwrap();
        let mut stream = connector
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        // TLS 1.3: the server's verdict on the client certificate comes after the client's
        // handshake ends; read to see it.
        use tokio::io::AsyncReadExt as _;
        let mut byte = [0u8; 1];
        let _ = tokio::time::timeout(
            std::time::Duration::from_millis(200),
            stream.read(&mut byte),
        )
        .await;
        serve.await.unwrap()
    }

    #[tokio::test]
    async fn client_certificates_are_checked_as_etcd_checks_them() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new(dir.path(), "ca");
        let other = Ca::new(dir.path(), "other-ca");
        let (cert, key) = ca.sign(dir.path(), "server", "server", &["127.0.0.1"]);
        let (peer_cert, peer_key) = ca.sign(dir.path(), "peer", "m1", &["m1.example", "127.0.0.1"]);
        let (rogue_cert, rogue_key) = other.sign(dir.path(), "rogue", "m1", &["127.0.0.1"]);
        let mut server = settings(&cert, &key);
        server.trusted_ca_file = Some(ca.path.clone());
        server.client_cert_auth = true;
        let client = |c: &Path, k: &Path| Settings {
            trusted_ca_file: Some(ca.path.clone()),
            ..settings(c, k)
        };
        let anonymous = Settings {
            trusted_ca_file: Some(ca.path.clone()),
            ..Settings::default()
        };

        assert_eq!(
            handshake(&server, &client(&peer_cert, &peer_key)).await,
            Ok(Some("m1".into()))
        );
        let e = handshake(&server, &anonymous).await.unwrap_err();
        assert!(e.contains("no certificates"), "{e}");
        let e = handshake(&server, &client(&rogue_cert, &rogue_key))
            .await
            .unwrap_err();
        assert!(e.contains("UnknownIssuer"), "{e}");

        // --peer-cert-allowed-cn / --peer-cert-allowed-hostname.
        let mut only = server.clone();
        only.allowed_cn = Some("m1".into());
        assert!(
            handshake(&only, &client(&peer_cert, &peer_key))
                .await
                .is_ok()
        );
        only.allowed_cn = Some("m2".into());
        let e = handshake(&only, &client(&peer_cert, &peer_key))
            .await
            .unwrap_err();
        assert!(
            e.contains("client certificate authentication failed"),
            "{e}"
        );
        only.allowed_cn = None;
        only.allowed_hostname = Some("m1.example".into());
        assert!(
            handshake(&only, &client(&peer_cert, &peer_key))
                .await
                .is_ok()
        );
        only.allowed_hostname = Some("m2.example".into());
        let e = handshake(&only, &client(&peer_cert, &peer_key))
            .await
            .unwrap_err();
        assert!(
            e.contains("client certificate authentication failed"),
            "{e}"
        );

        // The member dialing checks the dialed one's certificate the same way (etcd's
        // `VerifyPeerCertificate` is in its client configuration too).
        let mut picky = client(&peer_cert, &peer_key);
        picky.allowed_cn = Some("not-the-server".into());
        let e = handshake(&server, &picky).await.unwrap_err();
        assert!(
            e.contains("client certificate authentication failed"),
            "{e}"
        );
        picky.allowed_cn = Some("server".into());
        assert!(handshake(&server, &picky).await.is_ok());

        // A revoked certificate (--client-crl-file).
        let mut revoking = server.clone();
        revoking.crl_file = Some(ca.revoke(dir.path(), "peer"));
        let e = handshake(&revoking, &client(&peer_cert, &peer_key))
            .await
            .unwrap_err();
        assert!(e.contains("Revoked"), "{e}");
        let (good_cert, good_key) = ca.sign(dir.path(), "good", "m3", &["127.0.0.1"]);
        assert!(
            handshake(&revoking, &client(&good_cert, &good_key))
                .await
                .is_ok()
        );
        // A CA bundle with a CRL for one of its CAs only: the other CA's clients still get in
        // (etcd looks serial numbers up; an issuer without a CRL is no reason to refuse).
        let bundle = dir.path().join("bundle.pem");
        let pems = [&ca.path, &other.path].map(|p| std::fs::read_to_string(p).unwrap());
        std::fs::write(&bundle, pems.concat()).unwrap();
        let mut both = revoking.clone();
        both.trusted_ca_file = Some(bundle);
        assert!(
            handshake(&both, &client(&rogue_cert, &rogue_key))
                .await
                .is_ok()
        );
        assert!(
            handshake(&both, &client(&peer_cert, &peer_key))
                .await
                .unwrap_err()
                .contains("Revoked")
        );
        // A DER CRL file, as Go's x509.ParseCRL reads too.
        let pem = revoking.crl_file.clone().unwrap();
        let der = CertificateRevocationListDer::pem_file_iter(&pem)
            .unwrap()
            .next()
            .unwrap()
            .unwrap();
        let der_file = dir.path().join("crl.der");
        std::fs::write(&der_file, der.as_ref()).unwrap();
        let mut der_revoking = server.clone();
        der_revoking.crl_file = Some(der_file);
        assert!(
            handshake(&der_revoking, &client(&peer_cert, &peer_key))
                .await
                .unwrap_err()
                .contains("Revoked")
        );
        // An intermediate CA the root's CRL revokes: its leaves are refused (etcd looks up
        // every certificate of the chain the client sends).
        let inter = ca.intermediate(dir.path(), "inter");
        let (leaf, leaf_key) = inter.sign(dir.path(), "leaf", "m4", &["127.0.0.1"]);
        let chain = dir.path().join("chain.pem");
        let pems = [&leaf, &inter.path].map(|p| std::fs::read_to_string(p).unwrap());
        std::fs::write(&chain, pems.concat()).unwrap();
        let mut inter_revoked = server.clone();
        inter_revoked.crl_file = Some(ca.revoke(dir.path(), "inter"));
        assert!(
            handshake(&inter_revoked, &client(&chain, &leaf_key))
                .await
                .unwrap_err()
                .contains("Revoked")
        );
        assert!(handshake(&server, &client(&chain, &leaf_key)).await.is_ok());
    }

    #[tokio::test]
    async fn cipher_suites_restrict_tls12() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new(dir.path(), "ca");
        let (cert, key) = ca.sign(dir.path(), "server", "server", &["127.0.0.1"]);
        // The certificates are ECDSA: an RSA-only TLS 1.2 list leaves nothing in common.
        let mut server = settings(&cert, &key);
        server.suites = cipher::parse("TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256").unwrap();
        let mut tls12 = Settings {
            trusted_ca_file: Some(ca.path.clone()),
            ..Settings::default()
        };
        tls12.suites = cipher::parse("TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256").unwrap();
        let only12 = |s: &Settings| {
            // TLS 1.2 only on the client.
            rustls::ClientConfig::builder_with_provider(s.provider())
                .with_protocol_versions(&[&rustls::version::TLS12])
                .unwrap()
                .with_root_certificates(load_roots(s.trusted_ca_file.as_ref().unwrap()).unwrap())
                .with_no_client_auth()
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config(&server).unwrap()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let a = acceptor.clone();
                tokio::spawn(async move {
                    let _ = a.accept(tcp).await;
                });
            }
        });
        let name = ServerName::try_from("127.0.0.1").unwrap();
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let e = tokio_rustls::TlsConnector::from(Arc::new(only12(&tls12)))
            .connect(name.clone(), tcp)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("HandshakeFailure"), "{e}");
        // TLS 1.3 is always on.
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tokio_rustls::TlsConnector::from(Arc::new(client_config(&tls12).unwrap()))
            .connect(name, tcp)
            .await
            .unwrap();
    }

    #[test]
    fn a_changed_file_is_reloaded_and_a_broken_change_keeps_the_old_config() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new(dir.path(), "ca");
        let (cert, key) = ca.sign(dir.path(), "server", "one", &["127.0.0.1"]);
        let tls = server("test", &settings(&cert, &key)).unwrap();
        let first = tls.get();
        assert!(Arc::ptr_eq(&first, &tls.get()), "nothing changed");
        // A new pair, renamed into place.
        let (c2, k2) = ca.sign(dir.path(), "next", "two", &["127.0.0.1"]);
        std::fs::rename(&c2, &cert).unwrap();
        std::fs::rename(&k2, &key).unwrap();
        let second = tls.get();
        assert!(!Arc::ptr_eq(&first, &second), "reloaded");
        // Half a rotation: a certificate whose key is not there yet.
        let (c3, _k3) = ca.sign(dir.path(), "third", "three", &["127.0.0.1"]);
        std::fs::rename(&c3, &cert).unwrap();
        assert!(Arc::ptr_eq(&second, &tls.get()), "kept the working config");
    }
}
