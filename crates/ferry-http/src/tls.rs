//! TLS for the server side: certificates and keys from PEM files, and
//! serving over rustls (`docs/adr/0010-tls.md`).

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::Router;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;

use crate::server::{serve_connections, Handshaker, HttpServerOptions, Io};

/// Why a TLS configuration could not be built. None of these goes away
/// by retrying: the files must be fixed.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate or key file could not be read.
    #[error("cannot read tls {what} file {}: {message}", path.display())]
    Read {
        /// `certificate` or `key`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// A file was read but holds no usable PEM item.
    #[error("tls {what} file {} holds no {expected}", path.display())]
    Empty {
        /// `certificate` or `key`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What was looked for.
        expected: &'static str,
    },
    /// rustls refused the certificate chain and key together.
    #[error("tls certificate {} and key {} do not make a server config: {message}", cert.display(), key.display())]
    Refused {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// rustls' reason (a key that does not match the certificate, ...).
        message: String,
    },
}

impl TlsError {
    /// Whether trying again can help: never, the files must change.
    pub fn is_retryable(&self) -> bool {
        false
    }
}

/// The rustls crypto provider Ferry uses (ring).
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path, what: &'static str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::Read {
        what,
        path: path.to_path_buf(),
        message: e.to_string().to_lowercase(),
    })
}

/// The certificates of a PEM file, in order (the server's first, then its
/// chain).
pub fn load_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path, "certificate")?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Read {
            what: "certificate",
            path: path.to_path_buf(),
            message: format!("bad pem: {e}").to_lowercase(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            what: "certificate",
            path: path.to_path_buf(),
            expected: "certificate",
        });
    }
    Ok(certs)
}

/// The private key of a PEM file (PKCS#8, PKCS#1 RSA or SEC1 EC).
pub fn load_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(path, "key")?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => TlsError::Empty {
            what: "key",
            path: path.to_path_buf(),
            expected: "private key",
        },
        e => TlsError::Read {
            what: "key",
            path: path.to_path_buf(),
            message: format!("bad pem: {e}").to_lowercase(),
        },
    })
}

/// A server TLS configuration from a PEM certificate chain and its PEM
/// private key: TLS 1.2 and 1.3, HTTP/1.1 by ALPN, no client
/// certificates.
pub fn server_config_from_pem_files(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let certs = load_certificates(cert)?;
    let private_key = load_private_key(key)?;
    let refused = |message: String| TlsError::Refused {
        cert: cert.to_path_buf(),
        key: key.to_path_buf(),
        message: message.to_lowercase(),
    };
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| refused(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, private_key)
        .map_err(|e| refused(e.to_string()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// [`crate::serve_with_options`] over TLS: each accepted connection does
/// its handshake (within `header_timeout_ms`) before HTTP is spoken on
/// it; a failed handshake closes it.
pub async fn serve_tls_with_options(
    listener: TcpListener,
    router: Router,
    options: HttpServerOptions,
    tls: Arc<rustls::ServerConfig>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let handshake: Handshaker = Arc::new(move |tcp| {
        let accept = acceptor.accept(tcp);
        Box::pin(async move {
            let stream = accept.await?;
            Ok(Box::new(stream) as Box<dyn Io>)
        })
    });
    serve_connections(listener, router, options, Some(handshake), shutdown).await
}
