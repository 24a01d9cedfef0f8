//! TLS to PostgreSQL: rustls (through `tokio-postgres-rustls`), chosen by
//! libpq's connection parameters `sslmode` and `sslrootcert`, so a URL
//! that works with `psql` works with Ferry.
//!
//! | `sslmode`     | TLS                         | the server's certificate              |
//! |---------------|-----------------------------|---------------------------------------|
//! | `disable`     | never                       | -                                     |
//! | `prefer` (default) | when the server offers it | not checked                       |
//! | `require`     | always                      | not checked, unless `sslrootcert` is given: then as `verify-ca` |
//! | `verify-ca`   | always                      | signed by a trusted CA                |
//! | `verify-full` | always                      | signed by a trusted CA, and names the host |
//!
//! Trusted CAs: the PEM file `sslrootcert` names, or with `sslrootcert`
//! absent or `system`, the Mozilla root store (`webpki-roots`, built in: no
//! file of the machine is read). Where the certificate is not checked, the
//! handshake still proves the server holds the key of the certificate it
//! sent; that keeps out an eavesdropper, not a server in the middle (as
//! with libpq).
//!
//! The two parameters are taken out of the connection string before the
//! driver reads the rest (`tokio-postgres` knows only `disable`,
//! `prefer` and `require`, and not `sslrootcert`). In the key=value form,
//! their values must not be quoted.
//!
//! Under `prefer`, a TLS handshake that fails (the server offered TLS, but
//! with a key or protocol rustls refuses, an RSA key under 2,048 bits for
//! one) is followed by a connection without TLS, as libpq does; the failed
//! handshake is logged. Under `require` and the `verify-*` modes it is the
//! error.

use std::path::Path;
use std::sync::Arc;

use ferry_source::SourceError;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres_rustls::MakeRustlsConnect;

/// Most bytes of a `sslrootcert` file read (a CA bundle is tens of KiB).
pub const MAX_ROOT_CERT_FILE_BYTES: u64 = 4 * 1024 * 1024;

/// libpq's `sslmode`: whether to use TLS and what to check of the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    /// No TLS.
    Disable,
    /// TLS when the server offers it, the certificate not checked.
    Prefer,
    /// TLS always, the certificate not checked (unless a root is given).
    Require,
    /// TLS always, the certificate signed by a trusted CA.
    VerifyCa,
    /// TLS always, the certificate signed by a trusted CA and valid for
    /// the host connected to.
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Result<Self, SourceError> {
        Ok(match value {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(SourceError::Unavailable(format!(
                    "invalid postgresql url: sslmode {other:?} is not one of disable, prefer, require, \
                     verify-ca, verify-full"
                )))
            }
        })
    }
}

/// A connection string split: the driver's config and the connector.
pub(crate) struct Connect {
    pub config: tokio_postgres::Config,
    pub connector: Connector,
}

/// Opens connections with TLS as the `sslmode` says (see the module).
#[derive(Clone)]
pub(crate) struct Connector {
    tls: MakeRustlsConnect,
    /// `sslmode=prefer`: a failed handshake is followed by a connection
    /// without TLS.
    prefer: bool,
}

/// The stream of a connection with TLS.
type TlsStream = <MakeRustlsConnect as tokio_postgres::tls::MakeTlsConnect<tokio_postgres::Socket>>::Stream;

/// A connection just opened, with TLS or (under `prefer`) without (both
/// boxed: a connection is hundreds of bytes).
pub(crate) enum Opened {
    Tls(
        tokio_postgres::Client,
        Box<tokio_postgres::Connection<tokio_postgres::Socket, TlsStream>>,
    ),
    Plain(
        tokio_postgres::Client,
        Box<tokio_postgres::Connection<tokio_postgres::Socket, tokio_postgres::tls::NoTlsStream>>,
    ),
}

impl Connector {
    /// Open a connection (see the module on `prefer`).
    pub(crate) async fn open(&self, config: &tokio_postgres::Config) -> Result<Opened, tokio_postgres::Error> {
        match config.connect(self.tls.clone()).await {
            Ok((client, connection)) => Ok(Opened::Tls(client, Box::new(connection))),
            Err(e) if self.prefer && is_handshake_failure(&e) => {
                tracing::warn!(
                    error = %ferry_core::error_chain(&e),
                    "the tls handshake with postgresql failed under sslmode=prefer: connecting without tls, as libpq \
                     does (set sslmode=require to refuse, sslmode=disable to skip the handshake)"
                );
                let mut plain = config.clone();
                plain.ssl_mode(tokio_postgres::config::SslMode::Disable);
                let (client, connection) = plain.connect(tokio_postgres::NoTls).await?;
                Ok(Opened::Plain(client, Box::new(connection)))
            }
            Err(e) => Err(e),
        }
    }

    /// Open a connection, driven by a task of its own.
    pub(crate) async fn open_driven(
        &self,
        config: &tokio_postgres::Config,
    ) -> Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>), tokio_postgres::Error> {
        Ok(match self.open(config).await? {
            Opened::Tls(client, connection) => (client, drive(*connection)),
            Opened::Plain(client, connection) => (client, drive(*connection)),
        })
    }
}

/// A task driving a connection until it ends.
fn drive<T>(connection: tokio_postgres::Connection<tokio_postgres::Socket, T>) -> tokio::task::JoinHandle<()>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "a postgresql connection ended");
        }
    })
}

impl deadpool_postgres::Connect for Connector {
    fn connect(
        &self,
        pg_config: &tokio_postgres::Config,
    ) -> futures_util::future::BoxFuture<
        '_,
        Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>), tokio_postgres::Error>,
    > {
        let config = pg_config.clone();
        Box::pin(async move { self.open_driven(&config).await })
    }
}

/// The driver's error for a TLS handshake that failed (the server answered
/// the TLS request with yes; under `prefer` that is the only TLS error).
fn is_handshake_failure(e: &tokio_postgres::Error) -> bool {
    e.as_db_error().is_none() && e.to_string().starts_with("error performing TLS handshake")
}

/// Parse a connection string (URL or key=value form) with its TLS
/// parameters. Errors name the bad value.
pub(crate) fn parse(url: &str) -> Result<Connect, SourceError> {
    let (rest, sslmode, rootcert) = take_tls_params(url)?;
    let mode = sslmode.as_deref().map_or(Ok(SslMode::Prefer), SslMode::parse)?;
    let mut config: tokio_postgres::Config = rest
        .parse()
        .map_err(|e| SourceError::Unavailable(format!("invalid postgresql url: {e}")))?;
    config.ssl_mode(match mode {
        SslMode::Disable => tokio_postgres::config::SslMode::Disable,
        SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
        SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => tokio_postgres::config::SslMode::Require,
    });
    let tls = connector(mode, rootcert.as_deref())?;
    Ok(Connect {
        config,
        connector: Connector {
            tls,
            prefer: mode == SslMode::Prefer,
        },
    })
}

/// `url` without `sslmode` and `sslrootcert`, and their values.
fn take_tls_params(url: &str) -> Result<(String, Option<String>, Option<String>), SourceError> {
    let mut sslmode = None;
    let mut rootcert = None;
    let mut take = |key: &str, value: String| -> bool {
        match key {
            "sslmode" => sslmode = Some(value),
            "sslrootcert" => rootcert = Some(value),
            _ => return false,
        }
        true
    };
    let rest = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        match url.split_once('?') {
            None => url.to_owned(),
            Some((base, query)) => {
                let mut kept = Vec::new();
                for pair in query.split('&').filter(|p| !p.is_empty()) {
                    let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                    if !take(k, percent_decode(v)?) {
                        kept.push(pair);
                    }
                }
                if kept.is_empty() {
                    base.to_owned()
                } else {
                    format!("{base}?{}", kept.join("&"))
                }
            }
        }
    } else if !url
        .split_whitespace()
        .any(|t| t.starts_with("sslmode=") || t.starts_with("sslrootcert="))
    {
        // Left exactly as written (quoted values keep their spacing).
        url.to_owned()
    } else {
        let mut kept = Vec::new();
        for token in url.split_whitespace() {
            match token.split_once('=') {
                Some((k, v)) if k == "sslmode" || k == "sslrootcert" => {
                    if v.starts_with('\'') {
                        return Err(SourceError::Unavailable(format!(
                            "invalid postgresql connection string: {k} must not be quoted (got {v})"
                        )));
                    }
                    take(k, v.to_owned());
                }
                _ => kept.push(token),
            }
        }
        kept.join(" ")
    };
    Ok((rest, sslmode, rootcert))
}

/// A URL query value with its `%XX` escapes decoded.
fn percent_decode(v: &str) -> Result<String, SourceError> {
    let bad = || SourceError::Unavailable(format!("invalid postgresql url: bad percent escape in {v:?}"));
    let bytes = v.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = v.get(i + 1..i + 3).ok_or_else(bad)?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| bad())?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| bad())
}

/// The rustls connector for `mode`, trusting `rootcert`'s CAs.
fn connector(mode: SslMode, rootcert: Option<&str>) -> Result<MakeRustlsConnect, SourceError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| SourceError::Unavailable(format!("cannot set up tls for postgresql: {e}")))?;
    // libpq: `require` with a root certificate given checks as `verify-ca`.
    let mode = match (mode, rootcert) {
        (SslMode::Require, Some(_)) => SslMode::VerifyCa,
        (m, _) => m,
    };
    let verifier: Arc<dyn ServerCertVerifier> = match mode {
        SslMode::Disable | SslMode::Prefer | SslMode::Require => Arc::new(KeyOnly {
            schemes: provider.signature_verification_algorithms,
        }),
        SslMode::VerifyCa | SslMode::VerifyFull => {
            let roots = roots(rootcert)?;
            let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| SourceError::Unavailable(format!("cannot set up tls for postgresql: {e}")))?;
            if mode == SslMode::VerifyCa {
                Arc::new(ChainOnly(webpki))
            } else {
                webpki
            }
        }
    };
    let config = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

/// The CAs of `rootcert` (a PEM file), or the built-in Mozilla roots.
fn roots(rootcert: Option<&str>) -> Result<RootCertStore, SourceError> {
    let path = match rootcert {
        None | Some("system") => {
            return Ok(RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            })
        }
        Some(p) => p,
    };
    let io = |message: String| SourceError::Io {
        path: path.to_owned(),
        message,
    };
    let size = std::fs::metadata(Path::new(path))
        .map_err(|e| io(format!("cannot read sslrootcert: {e}")))?
        .len();
    if size > MAX_ROOT_CERT_FILE_BYTES {
        return Err(io(format!(
            "sslrootcert is {size} bytes, over the limit of {MAX_ROOT_CERT_FILE_BYTES} bytes"
        )));
    }
    let pem = std::fs::read(path).map_err(|e| io(format!("cannot read sslrootcert: {e}")))?;
    let mut store = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| io(format!("sslrootcert is not a PEM certificate file: {e}")))?;
        store
            .add(cert)
            .map_err(|e| io(format!("sslrootcert holds a certificate that cannot be a root: {e}")))?;
    }
    if store.is_empty() {
        return Err(io("sslrootcert holds no certificate".to_owned()));
    }
    Ok(store)
}

/// `verify-ca`: the chain is checked, the name in the certificate is not.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// `prefer` and `require`: the certificate is not checked, the handshake's
/// signatures are (the server holds the key of what it sent).
#[derive(Debug)]
struct KeyOnly {
    schemes: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for KeyOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.schemes)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.schemes)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_parameters_are_taken_out_of_urls_and_key_value_strings() {
        let (rest, mode, root) =
            take_tls_params("postgres://u@h:5/db?application_name=x&sslmode=verify-full&sslrootcert=%2Ftmp%2Fca.pem")
                .expect("url");
        assert_eq!(rest, "postgres://u@h:5/db?application_name=x");
        assert_eq!(mode.as_deref(), Some("verify-full"));
        assert_eq!(root.as_deref(), Some("/tmp/ca.pem"));
        let (rest, mode, root) = take_tls_params("postgresql://u@h/db?sslmode=disable").expect("url");
        assert_eq!(
            (rest.as_str(), mode.as_deref(), root),
            ("postgresql://u@h/db", Some("disable"), None)
        );
        let (rest, mode, _) = take_tls_params("host=h user=u sslmode=require dbname=d").expect("kv");
        assert_eq!(
            (rest.as_str(), mode.as_deref()),
            ("host=h user=u dbname=d", Some("require"))
        );
        assert!(take_tls_params("host=h sslrootcert='/a b'").is_err());
        let (rest, mode, _) = take_tls_params("host=h password='a  b'").expect("kv without tls parameters");
        assert_eq!((rest.as_str(), mode), ("host=h password='a  b'", None));
        assert!(take_tls_params("postgres://h/db?sslrootcert=%zz").is_err());
    }

    #[test]
    fn a_bad_sslmode_or_root_file_is_an_error_naming_it() {
        let e = parse("postgres://u@h/db?sslmode=always")
            .err()
            .expect("bad mode")
            .to_string();
        assert!(e.contains("\"always\""), "{e}");
        let e = parse("postgres://u@h/db?sslmode=verify-ca&sslrootcert=/nonexistent/ca.pem")
            .err()
            .expect("missing file")
            .to_string();
        assert!(e.contains("/nonexistent/ca.pem"), "{e}");
        let dir = std::env::temp_dir().join(format!("ferry-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").expect("write");
        let url = format!("postgres://u@h/db?sslmode=verify-full&sslrootcert={}", empty.display());
        let e = parse(&url).err().expect("no certificate").to_string();
        assert!(e.contains("no certificate"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
        use tokio_postgres::config::SslMode as Driver;
        for (given, driver) in [
            ("disable", Driver::Disable),
            ("prefer", Driver::Prefer),
            ("require", Driver::Require),
            ("verify-ca", Driver::Require),
            ("verify-full", Driver::Require),
        ] {
            let c = parse(&format!("postgres://u@h/db?sslmode={given}")).expect(given);
            assert_eq!(c.config.get_ssl_mode(), driver, "{given}");
        }
        let c = parse("postgres://u@h/db").expect("default");
        assert_eq!(c.config.get_ssl_mode(), Driver::Prefer);
    }
}
