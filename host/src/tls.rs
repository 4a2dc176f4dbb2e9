//! TLS on the listeners (rustls, with ring): a certificate chain and key from PEM files, read
//! again when either file changes, so a renewed certificate is served without a restart.
//!
//! The rustls config is built once; its certificate resolver hands each handshake the key in
//! force (an `ArcSwap`), and a task looks at the files' modification times every
//! [`RELOAD_CHECK`]. A file that cannot be read or does not match its key is logged and the
//! certificate in force is kept: a half-written renewal never takes the listener down. ALPN
//! offers `h2` and `http/1.1`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;
use tokio_rustls::TlsAcceptor;

/// How often the certificate files are looked at.
pub const RELOAD_CHECK: Duration = Duration::from_secs(1);

/// `[server] tls = { cert = "...", key = "..." }`: PEM files, relative to the manifest.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The certificate chain, leaf first.
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS certificate {path}: {reason}")]
    Cert { path: PathBuf, reason: String },
    #[error("TLS key {path}: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("TLS: {0}")]
    Config(String),
}

/// A listener's TLS: what accepts connections, and the certificate it serves now.
#[derive(Clone)]
pub struct Tls {
    acceptor: TlsAcceptor,
    resolver: Arc<Reloading>,
}

#[derive(Debug)]
struct Reloading {
    files: TlsConfig,
    current: ArcSwap<CertifiedKey>,
}

impl ResolvesServerCert for Reloading {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

impl Tls {
    /// Reads the files; an error here is a start-up error.
    pub fn load(files: &TlsConfig) -> Result<Self, TlsError> {
        let resolver = Arc::new(Reloading {
            current: ArcSwap::from_pointee(certified_key(files)?),
            files: files.clone(),
        });
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Self {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            resolver,
        })
    }

    pub fn acceptor(&self) -> &TlsAcceptor {
        &self.acceptor
    }

    /// Looks at the files every [`RELOAD_CHECK`] and serves them anew once they changed, until
    /// the returned task is aborted.
    pub fn watch(&self) -> tokio::task::JoinHandle<()> {
        let resolver = self.resolver.clone();
        tokio::spawn(async move {
            let mut seen = stamps(&resolver.files);
            loop {
                tokio::time::sleep(RELOAD_CHECK).await;
                let now = stamps(&resolver.files);
                if now == seen {
                    continue;
                }
                // Both files may be mid-rename; the next change tries again.
                match certified_key(&resolver.files) {
                    Ok(key) => {
                        resolver.current.store(Arc::new(key));
                        tracing::info!(cert = %resolver.files.cert.display(), "TLS certificate reloaded");
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "TLS certificate not reloaded; the one in force is kept");
                    }
                }
                seen = now;
            }
        })
    }
}

fn stamps(files: &TlsConfig) -> [Option<(SystemTime, u64)>; 2] {
    let stamp = |p: &Path| {
        std::fs::metadata(p)
            .ok()
            .and_then(|m| Some((m.modified().ok()?, m.len())))
    };
    [stamp(&files.cert), stamp(&files.key)]
}

fn certified_key(files: &TlsConfig) -> Result<CertifiedKey, TlsError> {
    let cert_error = |reason: String| TlsError::Cert {
        path: files.cert.clone(),
        reason,
    };
    let key_error = |reason: String| TlsError::Key {
        path: files.key.clone(),
        reason,
    };
    let chain = CertificateDer::pem_file_iter(&files.cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| cert_error(e.to_string()))?;
    if chain.is_empty() {
        return Err(cert_error("no certificate in the file".into()));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| key_error(e.to_string()))?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| key_error(e.to_string()))?;
    let certified = CertifiedKey::new(chain, signer);
    certified
        .keys_match()
        .map_err(|e| key_error(format!("does not match the certificate: {e}")))?;
    Ok(certified)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_and_garbled_files_are_clear_errors() {
        let dir = tempfile::tempdir().expect("tmp");
        let files = TlsConfig {
            cert: dir.path().join("cert.pem"),
            key: dir.path().join("key.pem"),
        };
        let err = Tls::load(&files).err().expect("no files").to_string();
        assert!(err.starts_with("TLS certificate"), "{err}");
        std::fs::write(&files.cert, "not a certificate").expect("write");
        let err = Tls::load(&files).err().expect("garbled").to_string();
        assert!(err.contains("no certificate"), "{err}");
    }
}
