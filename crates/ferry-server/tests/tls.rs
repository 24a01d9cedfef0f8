//! TLS end to end: `ferry-server` terminating TLS with a certificate made
//! here (a CA and a server certificate for 127.0.0.1), a client over
//! `https://` that trusts the CA syncing with it, a client that does not
//! refused with a clear error, and a server that will not start on a
//! missing or bad key file. Loopback only.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{entry, put, upload_req};
use ferry_http::{HttpClientOptions, HttpTransport};
use ferry_protocol::{decode_line, StreamLine, StreamRequest, UploadResponse, DEFAULT_MAX_LINE_BYTES};
use ferry_server::{mint_token, BoundServer, ServerConfig};
use ferry_transport::{Transport, TransportError};

const SECRET: &str = "tls-secret";

struct Pki {
    dir: tempfile::TempDir,
    ca_pem: String,
}

impl Pki {
    /// A CA and a server certificate it signed for 127.0.0.1 and localhost.
    fn new() -> Pki {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca_key = rcgen::KeyPair::generate().expect("ca key");
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("ca params");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "ferry test ca");
        let ca = ca_params.self_signed(&ca_key).expect("ca cert");
        let key = rcgen::KeyPair::generate().expect("server key");
        let params =
            rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).expect("params");
        let cert = params.signed_by(&key, &ca, &ca_key).expect("server cert");
        std::fs::write(dir.path().join("server.crt"), cert.pem()).expect("write cert");
        std::fs::write(dir.path().join("server.key"), key.serialize_pem()).expect("write key");
        Pki { dir, ca_pem: ca.pem() }
    }

    fn cert(&self) -> PathBuf {
        self.dir.path().join("server.crt")
    }

    fn key(&self) -> PathBuf {
        self.dir.path().join("server.key")
    }
}

fn config(data: &Path, cert: Option<PathBuf>, key: Option<PathBuf>) -> ServerConfig {
    ServerConfig {
        data_dir: data.to_path_buf(),
        listen_addr: "127.0.0.1:0".parse().expect("addr"),
        jwt_secret: Some(SECRET.into()),
        tls_cert: cert,
        tls_key: key,
        ..ServerConfig::default()
    }
}

async fn start(pki: &Pki, data: &Path) -> BoundServer {
    ferry_server::run(config(data, Some(pki.cert()), Some(pki.key())), std::future::pending())
        .await
        .expect("start with tls")
}

fn token(user: &str) -> String {
    mint_token(SECRET, user, 3600, &serde_json::Map::new())
}

#[tokio::test]
async fn a_client_that_trusts_the_ca_syncs_over_https() {
    let pki = Pki::new();
    let data = tempfile::tempdir().expect("data");
    let server = start(&pki, data.path()).await;
    assert!(server.tls);
    let options = HttpClientOptions {
        tls_ca_pem: Some(pki.ca_pem.clone().into_bytes()),
        ..HttpClientOptions::default()
    };
    let transport = HttpTransport::with_options(format!("https://127.0.0.1:{}", server.addr.port()), options)
        .expect("https transport");
    // Upload a ticket...
    let upload = upload_req(
        "c1",
        vec![entry(
            1,
            put(
                "tickets",
                "t1",
                &[("title", "over tls".into()), ("status", "pending".into())],
            ),
            1_000,
            "c1",
        )],
    );
    let answer = transport
        .upload(&token("u1"), serde_json::to_vec(&upload).expect("json"))
        .await
        .expect("upload over https");
    let answer: UploadResponse = serde_json::from_slice(&answer).expect("answer");
    assert_eq!(answer.write_checkpoint, 1);
    // ... and stream it back.
    let request = StreamRequest {
        client_id: "c1".into(),
        buckets: Vec::new(),
    };
    let mut lines = transport
        .open_stream(&token("u1"), serde_json::to_vec(&request).expect("json"))
        .await
        .expect("stream over https");
    let mut saw_row = false;
    for _ in 0..20 {
        let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
            .await
            .expect("a line in time")
            .expect("line")
            .expect("stream open");
        match decode_line(&line, DEFAULT_MAX_LINE_BYTES).expect("decode") {
            StreamLine::Data(d) => saw_row |= d.ops.iter().any(|o| o.object_id.as_deref() == Some("t1")),
            StreamLine::CheckpointComplete { .. } => break,
            _ => {}
        }
    }
    assert!(saw_row, "the uploaded row came back over the https stream");
    server.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn a_client_that_does_not_trust_the_ca_is_refused_with_a_clear_error() {
    let pki = Pki::new();
    let data = tempfile::tempdir().expect("data");
    let server = start(&pki, data.path()).await;
    let transport = HttpTransport::new(format!("https://127.0.0.1:{}", server.addr.port())).expect("https transport");
    let upload = upload_req("c1", Vec::new());
    let err = transport
        .upload(&token("u1"), serde_json::to_vec(&upload).expect("json"))
        .await
        .expect_err("an untrusted certificate is refused");
    let TransportError::Connection(message) = &err else {
        panic!("expected a connection error, got {err:?}")
    };
    assert!(
        message.contains("tls: invalid peer certificate: unknownissuer"),
        "{message}"
    );
    assert!(message.contains("tls_ca_pem"), "{message}");
    // Plain http to the https port gets no answer it can use.
    let plain = HttpTransport::new(format!("http://127.0.0.1:{}", server.addr.port())).expect("http transport");
    assert!(plain
        .upload(&token("u1"), serde_json::to_vec(&upload).expect("json"))
        .await
        .is_err());
    // The server is unharmed.
    let trusted = HttpTransport::with_options(
        format!("https://127.0.0.1:{}", server.addr.port()),
        HttpClientOptions {
            tls_ca_pem: Some(pki.ca_pem.clone().into_bytes()),
            ..HttpClientOptions::default()
        },
    )
    .expect("transport");
    trusted
        .upload(&token("u1"), serde_json::to_vec(&upload).expect("json"))
        .await
        .expect("a trusting client is served");
    server.shutdown().await.expect("shutdown");
}

#[test]
fn a_ca_option_that_is_not_pem_is_refused() {
    let err = HttpTransport::with_options(
        "https://127.0.0.1:1",
        HttpClientOptions {
            tls_ca_pem: Some(b"not a certificate".to_vec()),
            ..HttpClientOptions::default()
        },
    )
    .expect_err("refused");
    assert_eq!(
        err,
        TransportError::Refused("tls_ca_pem holds no pem certificate".into())
    );
}

async fn start_error(cert: Option<PathBuf>, key: Option<PathBuf>) -> String {
    let data = tempfile::tempdir().expect("data");
    match ferry_server::run(config(data.path(), cert, key), std::future::pending()).await {
        Ok(_) => panic!("the server started"),
        Err(e) => e.to_string(),
    }
}

#[tokio::test]
async fn the_server_refuses_to_start_on_a_missing_or_bad_key_file() {
    let pki = Pki::new();
    let missing = pki.dir.path().join("missing.key");
    let e = start_error(Some(pki.cert()), Some(missing.clone())).await;
    assert!(
        e.contains(&format!("cannot read tls key file {}", missing.display())),
        "{e}"
    );
    assert!(e.contains("no such file"), "{e}");

    let garbage = pki.dir.path().join("garbage.key");
    std::fs::write(&garbage, "this is not a key\n").expect("write");
    let e = start_error(Some(pki.cert()), Some(garbage.clone())).await;
    assert_eq!(
        e,
        format!(
            "invalid config: tls key file {} holds no private key",
            garbage.display()
        )
    );

    // A valid key of another certificate.
    let other = pki.dir.path().join("other.key");
    std::fs::write(&other, rcgen::KeyPair::generate().expect("key").serialize_pem()).expect("write");
    let e = start_error(Some(pki.cert()), Some(other.clone())).await;
    assert!(
        e.contains(&format!(
            "tls certificate {} and key {}",
            pki.cert().display(),
            other.display()
        )),
        "{e}"
    );

    let e = start_error(Some(pki.key()), Some(pki.key())).await;
    assert!(e.contains("holds no certificate"), "{e}");

    let e = start_error(Some(pki.cert()), None).await;
    assert!(e.contains("is set without tls_key"), "{e}");
}
