//! TLS for the mesh (rustls with ring only). Certificates, keys and the trust
//! bundle are read from files and re-read when they change, so a rotated
//! certificate is served by new connections without a restart while open
//! connections carry on.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {0}: {1}")]
    Read(PathBuf, String),
    #[error("{0} holds no certificate")]
    Empty(PathBuf),
    #[error("TLS configuration: {0}")]
    Config(String),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Where this workload's identity and trust live on disk.
#[derive(Debug, Clone)]
pub struct Files {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub bundle: PathBuf,
}

struct Built {
    stamp: Vec<Option<SystemTime>>,
    internal: Arc<ServerConfig>,
    public: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
}

/// The current TLS configurations, rebuilt when a file changes.
#[derive(Clone)]
pub struct Tls {
    files: Files,
    built: Arc<RwLock<Arc<Built>>>,
}

fn mtime(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| TlsError::Read(path.into(), e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Read(path.into(), e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsError::Empty(path.into()));
    }
    Ok(certs)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::Read(path.into(), e.to_string()))
}

fn roots(path: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in certs(path)? {
        roots.add(c).map_err(|e| TlsError::Config(e.to_string()))?;
    }
    Ok(Arc::new(roots))
}

const ALPN_H2: &[u8] = b"h2";

fn build(f: &Files) -> Result<Built, TlsError> {
    let stamp = vec![mtime(&f.cert), mtime(&f.key), mtime(&f.bundle)];
    let chain = certs(&f.cert)?;
    let roots = roots(&f.bundle)?;
    let err = |e: rustls::Error| TlsError::Config(e.to_string());

    // Internal listener: a client certificate from our CA is required.
    let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut internal = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(err)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain.clone(), key(&f.key)?)
        .map_err(err)?;
    internal.alpn_protocols = vec![ALPN_H2.to_vec()];

    // Public listener: the server proves itself; callers bring tokens.
    let mut public = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(err)?
        .with_no_client_auth()
        .with_single_cert(chain.clone(), key(&f.key)?)
        .map_err(err)?;
    public.alpn_protocols = vec![ALPN_H2.to_vec()];

    // Outbound: our certificate as client, and the server must be the
    // service we meant (its SPIFFE id), signed by our CA.
    let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut client = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(err)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier { inner: webpki }))
        .with_client_auth_cert(chain, key(&f.key)?)
        .map_err(err)?;
    client.alpn_protocols = vec![ALPN_H2.to_vec()];

    Ok(Built {
        stamp,
        internal: Arc::new(internal),
        public: Arc::new(public),
        client: Arc::new(client),
    })
}

impl Tls {
    pub fn load(files: Files) -> Result<Self, TlsError> {
        let built = build(&files)?;
        Ok(Self {
            files,
            built: Arc::new(RwLock::new(Arc::new(built))),
        })
    }

    fn current(&self) -> Arc<Built> {
        match self.built.read() {
            Ok(b) => b.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    pub fn internal(&self) -> Arc<ServerConfig> {
        self.current().internal.clone()
    }

    pub fn public(&self) -> Arc<ServerConfig> {
        self.current().public.clone()
    }

    pub fn client(&self) -> Arc<ClientConfig> {
        self.current().client.clone()
    }

    /// Rebuilds the configurations if a file changed; keeps the old ones if
    /// the new files are unreadable (say, half-written), and says so.
    pub fn reload_if_changed(&self) -> bool {
        let f = &self.files;
        let stamp = vec![mtime(&f.cert), mtime(&f.key), mtime(&f.bundle)];
        if stamp == self.current().stamp {
            return false;
        }
        match build(f) {
            Ok(b) => {
                if let Ok(mut w) = self.built.write() {
                    *w = Arc::new(b);
                }
                tracing::info!(cert = %f.cert.display(), "reloaded certificate, key and trust bundle");
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "certificate files changed but cannot be loaded; keeping the previous ones");
                false
            }
        }
    }

    /// Polls the files every `period` until the task is dropped.
    pub fn spawn_reloader(&self, period: Duration) -> tokio::task::JoinHandle<()> {
        let tls = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            loop {
                tick.tick().await;
                tls.reload_if_changed();
            }
        })
    }
}

/// A client configuration for a user's tool: trust `bundle`, check the
/// server's SPIFFE id, and present `client` (certificate, key) if given.
pub fn client_config(
    bundle: &Path,
    client: Option<(&Path, &Path)>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let webpki = WebPkiServerVerifier::builder_with_provider(roots(bundle)?, provider())
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier { inner: webpki }));
    let mut config = match client {
        Some((cert, key_path)) => builder
            .with_client_auth_cert(certs(cert)?, key(key_path)?)
            .map_err(|e| TlsError::Config(e.to_string()))?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// The expected SPIFFE id of a service reached by name.
pub fn expected_spiffe(service: &str) -> String {
    format!("spiffe://{}/svc/{service}", certs::TRUST_DOMAIN)
}

/// Chain and DNS-name verification by webpki, plus: the certificate's SPIFFE
/// id must name the service we dialled (the server name), or one of its hosts.
#[derive(Debug)]
struct SpiffeServerVerifier {
    inner: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)?;
        let ServerName::DnsName(name) = server_name else {
            return Err(rustls::Error::General(
                "mesh peers are dialled by service name".into(),
            ));
        };
        let want = expected_spiffe(name.as_ref());
        match certs::spiffe_id_of_der(end_entity) {
            Some(id) if id == want || id.starts_with(&format!("{want}/host/")) => {
                Ok(ServerCertVerified::assertion())
            }
            Some(id) => Err(rustls::Error::General(format!(
                "server is {id}, expected {want}"
            ))),
            None => Err(rustls::Error::General(
                "server certificate has no SPIFFE id".into(),
            )),
        }
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
