//! Tokens from identity providers: keys from a JWKS served by the test on
//! a loopback port (RSA keys from `tests/keys`, EC and Ed25519 keys
//! generated here with ring), static PEM and JWK files, key rotation and
//! unknown `kid`s, and every refused token answered 401 with a message
//! and without reading or writing any data.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use common::{entry, put, upload_req};
use ferry_core::ManualClock;
use ferry_server::{AuthOptions, Authenticator, BoundServer, ServerConfig, ServiceError, StaticKey};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use parking_lot::Mutex;
use ring::rand::SystemRandom;
use ring::signature::{self, KeyPair};
use serde_json::{json, Map, Value as Json};

// ---------------------------------------------------------------------------
// Keys
// ---------------------------------------------------------------------------

/// A signing key and its public JWK.
#[derive(Clone)]
struct TestKey {
    kid: String,
    alg: Algorithm,
    signing: EncodingKey,
    jwk: Json,
}

fn keys_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/keys")
}

fn pem_der(pem: &str) -> Vec<u8> {
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    STANDARD.decode(body).expect("pem base64")
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn alg_str(alg: Algorithm) -> String {
    format!("{alg:?}")
}

/// An RSA key of `tests/keys/<file>.pem`.
fn rsa(file: &str, kid: &str, alg: Algorithm) -> TestKey {
    let pem = std::fs::read_to_string(keys_dir().join(format!("{file}.pem"))).expect("read key");
    let pair = signature::RsaKeyPair::from_pkcs8(&pem_der(&pem)).expect("rsa pkcs8");
    let public = ring::rsa::PublicKeyComponents::<Vec<u8>>::from(pair.public());
    TestKey {
        kid: kid.into(),
        alg,
        signing: EncodingKey::from_rsa_pem(pem.as_bytes()).expect("rsa pem"),
        jwk: json!({"kty": "RSA", "use": "sig", "kid": kid, "alg": alg_str(alg), "n": b64(&public.n), "e": b64(&public.e)}),
    }
}

fn ec(kid: &str, alg: Algorithm) -> TestKey {
    let (ring_alg, crv, len) = match alg {
        Algorithm::ES256 => (&signature::ECDSA_P256_SHA256_FIXED_SIGNING, "P-256", 32),
        Algorithm::ES384 => (&signature::ECDSA_P384_SHA384_FIXED_SIGNING, "P-384", 48),
        other => panic!("not an ec algorithm: {other:?}"),
    };
    let rng = SystemRandom::new();
    let pkcs8 = signature::EcdsaKeyPair::generate_pkcs8(ring_alg, &rng).expect("ec keygen");
    let pair = signature::EcdsaKeyPair::from_pkcs8(ring_alg, pkcs8.as_ref(), &rng).expect("ec pkcs8");
    let point = pair.public_key().as_ref(); // 0x04 || x || y
    TestKey {
        kid: kid.into(),
        alg,
        signing: EncodingKey::from_ec_der(pkcs8.as_ref()),
        jwk: json!({"kty": "EC", "use": "sig", "kid": kid, "alg": alg_str(alg), "crv": crv,
                    "x": b64(&point[1..1 + len]), "y": b64(&point[1 + len..])}),
    }
}

fn ed(kid: &str) -> TestKey {
    let rng = SystemRandom::new();
    let pkcs8 = signature::Ed25519KeyPair::generate_pkcs8(&rng).expect("ed keygen");
    let pair = signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("ed pkcs8");
    TestKey {
        kid: kid.into(),
        alg: Algorithm::EdDSA,
        signing: EncodingKey::from_ed_der(pkcs8.as_ref()),
        jwk: json!({"kty": "OKP", "use": "sig", "kid": kid, "crv": "Ed25519", "x": b64(pair.public_key().as_ref())}),
    }
}

fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("time")
        .as_secs()
}

fn claims(user: &str, extra: Json) -> Map<String, Json> {
    let mut c = Map::new();
    c.insert("sub".into(), json!(user));
    c.insert("iat".into(), json!(now_s()));
    c.insert("exp".into(), json!(now_s() + 3600));
    c.insert("aud".into(), json!("ferry"));
    c.insert("iss".into(), json!("https://idp.test"));
    if let Json::Object(m) = extra {
        for (k, v) in m {
            if v.is_null() {
                c.remove(&k);
            } else {
                c.insert(k, v);
            }
        }
    }
    c
}

/// A token signed by `key`, naming its kid, with the default claims
/// changed by `extra` (a null removes a claim).
fn sign(key: &TestKey, user: &str, extra: Json) -> String {
    sign_as(key, Some(&key.kid), key.alg, user, extra)
}

fn sign_as(key: &TestKey, kid: Option<&str>, alg: Algorithm, user: &str, extra: Json) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    encode(&header, &claims(user, extra), &key.signing).expect("sign")
}

/// A token with an arbitrary header, signed by `key`.
fn sign_raw_header(key: &TestKey, header: Json, claims: &Map<String, Json>) -> String {
    let message = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(Json::Object(claims.clone()).to_string().as_bytes())
    );
    let signature = jsonwebtoken::crypto::sign(message.as_bytes(), &key.signing, key.alg).expect("sign");
    format!("{message}.{signature}")
}

/// A token with an arbitrary header and no valid signature.
fn raw_token(header: Json, claims: &Map<String, Json>, signature: &str) -> String {
    format!(
        "{}.{}.{}",
        b64(header.to_string().as_bytes()),
        b64(Json::Object(claims.clone()).to_string().as_bytes()),
        signature
    )
}

// ---------------------------------------------------------------------------
// A JWKS server on a loopback port
// ---------------------------------------------------------------------------

#[derive(Clone)]
struct Jwks {
    addr: SocketAddr,
    doc: Arc<Mutex<Json>>,
    fetches: Arc<AtomicUsize>,
    delay_ms: Arc<AtomicU64>,
}

impl Jwks {
    async fn start(keys: &[&TestKey]) -> Jwks {
        let doc = Arc::new(Mutex::new(Json::Null));
        let fetches = Arc::new(AtomicUsize::new(0));
        let delay_ms = Arc::new(AtomicU64::new(0));
        let app = {
            let (doc, fetches, delay_ms) = (doc.clone(), fetches.clone(), delay_ms.clone());
            axum::Router::new().route(
                "/.well-known/jwks.json",
                axum::routing::get(move || {
                    let (doc, fetches, delay_ms) = (doc.clone(), fetches.clone(), delay_ms.clone());
                    async move {
                        fetches.fetch_add(1, Ordering::SeqCst);
                        let delay = delay_ms.load(Ordering::SeqCst);
                        if delay > 0 {
                            tokio::time::sleep(Duration::from_millis(delay)).await;
                        }
                        let body = doc.lock().to_string();
                        ([(axum::http::header::CONTENT_TYPE, "application/json")], body)
                    }
                }),
            )
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind jwks");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        let jwks = Jwks {
            addr,
            doc,
            fetches,
            delay_ms,
        };
        jwks.publish(keys);
        jwks
    }

    fn publish(&self, keys: &[&TestKey]) {
        *self.doc.lock() = json!({"keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>()});
    }

    fn url(&self) -> String {
        format!("http://{}/.well-known/jwks.json", self.addr)
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

// ---------------------------------------------------------------------------
// The server under test, over HTTP
// ---------------------------------------------------------------------------

struct Server {
    _dir: tempfile::TempDir,
    server: BoundServer,
    http: reqwest::Client,
}

/// What a request got.
#[derive(Debug)]
struct Answer {
    status: u16,
    retry_after: Option<String>,
    body: String,
}

impl Answer {
    fn message(&self) -> String {
        serde_json::from_str::<Json>(&self.body)
            .ok()
            .and_then(|v| v.get("message").and_then(Json::as_str).map(str::to_owned))
            .unwrap_or_default()
    }
}

fn auth_options(jwks: Option<&Jwks>) -> AuthOptions {
    AuthOptions {
        jwks_url: jwks.map(Jwks::url),
        audience: Some("ferry".into()),
        issuer: Some("https://idp.test".into()),
        jwks_min_refresh_interval_ms: 200,
        jwks_timeout_ms: 1_000,
        ..AuthOptions::default()
    }
}

impl Server {
    async fn start(auth: AuthOptions, jwt_secret: Option<&str>) -> Server {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = ServerConfig {
            data_dir: dir.path().to_path_buf(),
            listen_addr: "127.0.0.1:0".parse().expect("addr"),
            jwt_secret: jwt_secret.map(str::to_owned),
            auth,
            ..ServerConfig::default()
        };
        let server = ferry_server::run(config, std::future::pending())
            .await
            .expect("start server");
        Server {
            _dir: dir,
            server,
            http: reqwest::Client::new(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.server.addr)
    }

    async fn post(&self, path: &str, token: &str, body: Json) -> Answer {
        let response = self
            .http
            .post(self.url(path))
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .expect("send");
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        // A stream that opened is read up to its first line only.
        let body = if status == 200 && path == "/sync/stream" {
            let mut response = response;
            let mut out = Vec::new();
            while !out.contains(&b'\n') {
                match tokio::time::timeout(Duration::from_secs(10), response.chunk()).await {
                    Ok(Ok(Some(chunk))) => out.extend_from_slice(&chunk),
                    _ => break,
                }
            }
            String::from_utf8_lossy(&out).into_owned()
        } else {
            response.text().await.unwrap_or_default()
        };
        Answer {
            status,
            retry_after,
            body,
        }
    }

    /// Open a stream (its first line) with `token`.
    async fn stream(&self, token: &str) -> Answer {
        self.post("/sync/stream", token, json!({"client_id": "c-stream", "buckets": []}))
            .await
    }

    /// Upload one ticket with `token`.
    async fn upload(&self, token: &str, client_id: &str, id: &str) -> Answer {
        let request = upload_req(
            client_id,
            vec![entry(
                1,
                put(
                    "tickets",
                    id,
                    &[("title", "secret".into()), ("status", "pending".into())],
                ),
                1_000,
                client_id,
            )],
        );
        self.post("/sync/upload", token, serde_json::to_value(request).expect("json"))
            .await
    }

    fn oplog_len(&self) -> u64 {
        self.server.service.db().oplog_len().expect("oplog len")
    }
}

/// `token` is refused on both routes with 401, a message containing
/// `expect`, no stream line and no write.
async fn assert_refused(server: &Server, token: &str, expect: &str, what: &str) -> String {
    let before = server.oplog_len();
    let s = server.stream(token).await;
    assert_eq!(s.status, 401, "{what}: stream answered {s:?}");
    assert!(s.message().contains(expect), "{what}: stream message {:?}", s.message());
    assert!(
        !s.body.contains("checkpoint"),
        "{what}: a refused stream sent data: {}",
        s.body
    );
    let u = server.upload(token, "c-refused", "t-refused").await;
    assert_eq!(u.status, 401, "{what}: upload answered {u:?}");
    assert!(u.message().contains(expect), "{what}: upload message {:?}", u.message());
    assert_eq!(server.oplog_len(), before, "{what}: a refused upload wrote");
    s.message()
}

async fn assert_accepted(server: &Server, token: &str, what: &str) {
    let s = server.stream(token).await;
    assert_eq!(s.status, 200, "{what}: stream answered {s:?}");
    assert!(s.body.contains("checkpoint"), "{what}: first line {:?}", s.body);
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[tokio::test]
async fn every_supported_algorithm_verifies_from_the_jwks() {
    let keys = [
        rsa("rsa1", "rs256", Algorithm::RS256),
        rsa("rsa2", "rs384", Algorithm::RS384),
        rsa("rsa_other", "rs512", Algorithm::RS512),
        ec("es256", Algorithm::ES256),
        ec("es384", Algorithm::ES384),
        ed("eddsa"),
    ];
    let jwks = Jwks::start(&keys.iter().collect::<Vec<_>>()).await;
    let server = Server::start(auth_options(Some(&jwks)), Some("shared-secret")).await;
    for key in &keys {
        assert_accepted(&server, &sign(key, "u1", json!({})), &key.kid).await;
    }
    // The HS256 secret verifies tokens without a kid.
    let hs = TestKey {
        kid: String::new(),
        alg: Algorithm::HS256,
        signing: EncodingKey::from_secret(b"shared-secret"),
        jwk: Json::Null,
    };
    assert_accepted(&server, &sign_as(&hs, None, Algorithm::HS256, "u1", json!({})), "hs256").await;
    // An upload with a good token is answered (the write path decides).
    let u = server.upload(&sign(&keys[0], "u1", json!({})), "c-good", "t1").await;
    assert_eq!(u.status, 200, "{u:?}");
    // One fetch at start served every key.
    assert_eq!(jwks.fetches(), 1);
}

#[tokio::test]
async fn bad_tokens_are_refused_with_401_and_read_nothing() {
    let k1 = rsa("rsa1", "k1", Algorithm::RS256);
    let es = ec("e1", Algorithm::ES256);
    let jwks = Jwks::start(&[&k1, &es]).await;
    let server = Server::start(auth_options(Some(&jwks)), Some("shared-secret")).await;
    assert_accepted(&server, &sign(&k1, "u1", json!({})), "good token").await;

    let other = TestKey {
        kid: "k1".into(),
        ..rsa("rsa_other", "k1", Algorithm::RS256)
    };
    let public_pem = std::fs::read(keys_dir().join("rsa1.pub.pem")).expect("pub pem");
    let confused = TestKey {
        kid: "k1".into(),
        alg: Algorithm::HS256,
        signing: EncodingKey::from_secret(&public_pem),
        jwk: Json::Null,
    };
    let good_claims = claims("u1", json!({}));
    let cases: Vec<(&str, String, &str)> = vec![
        ("garbage", "not-a-jwt".into(), "malformed token"),
        (
            "expired",
            sign(&k1, "u1", json!({"exp": now_s() - 3600})),
            "token expired",
        ),
        (
            "nbf in the future",
            sign(&k1, "u1", json!({"nbf": now_s() + 3600})),
            "token not valid before",
        ),
        (
            "wrong aud",
            sign(&k1, "u1", json!({"aud": "other-api"})),
            "does not include \"ferry\"",
        ),
        (
            "no aud",
            sign(&k1, "u1", json!({"aud": null})),
            "token has no aud claim",
        ),
        (
            "wrong iss",
            sign(&k1, "u1", json!({"iss": "https://evil.test"})),
            "is not \"https://idp.test\"",
        ),
        (
            "no sub",
            sign(&k1, "u1", json!({"sub": null})),
            "token has no sub claim",
        ),
        (
            "no exp",
            sign(&k1, "u1", json!({"exp": null})),
            "token has no exp claim",
        ),
        (
            "alg none",
            raw_token(json!({"alg": "none", "typ": "JWT", "kid": "k1"}), &good_claims, ""),
            "malformed token",
        ),
        (
            "alg none without kid",
            raw_token(json!({"alg": "none"}), &good_claims, ""),
            "malformed token",
        ),
        (
            // RFC 7515 4.1.11: extensions the recipient does not
            // understand must be refused; Ferry understands none.
            "crit header extension",
            sign_raw_header(
                &k1,
                json!({"alg": "RS256", "typ": "JWT", "kid": "k1", "b64": false, "crit": ["b64"]}),
                &good_claims,
            ),
            "token header names critical extensions [\"b64\"]",
        ),
        (
            "hs256 signed with the rsa public key (algorithm confusion)",
            sign(&confused, "u1", json!({})),
            "token algorithm hs256 is not the algorithm of key \"k1\" (rs256)",
        ),
        (
            "hs256 with the rsa public key, no kid",
            sign_as(&confused, None, Algorithm::HS256, "u1", json!({})),
            "bad token signature",
        ),
        (
            "rs384 header on an rs256 key",
            sign_as(&k1, Some("k1"), Algorithm::RS384, "u1", json!({})),
            "token algorithm rs384 is not the algorithm of key \"k1\" (rs256)",
        ),
        (
            "es256 key's kid on an rsa-signed token",
            sign_as(&k1, Some("e1"), Algorithm::RS256, "u1", json!({})),
            "token algorithm rs256 is not the algorithm of key \"e1\" (es256)",
        ),
        (
            "signed by another key",
            sign(&other, "u1", json!({})),
            "bad token signature",
        ),
        (
            "unknown kid",
            sign_as(&k1, Some("ghost"), Algorithm::RS256, "u1", json!({})),
            "token key id \"ghost\" matches no known key",
        ),
        (
            "tampered claims",
            {
                let t = sign(&k1, "u1", json!({}));
                let parts: Vec<&str> = t.split('.').collect();
                let evil = claims("admin", json!({}));
                format!(
                    "{}.{}.{}",
                    parts[0],
                    b64(Json::Object(evil).to_string().as_bytes()),
                    parts[2]
                )
            },
            "bad token signature",
        ),
    ];
    let mut table = Vec::new();
    for (what, token, expect) in &cases {
        let message = assert_refused(&server, token, expect, what).await;
        table.push(format!("{what}: 401 {message}"));
    }
    println!("{}", table.join("\n"));
}

#[tokio::test]
async fn a_rotated_key_is_fetched_on_its_unknown_kid_and_the_old_one_stops_working() {
    let k1 = rsa("rsa1", "k1", Algorithm::RS256);
    let k2 = ec("k2", Algorithm::ES256);
    let jwks = Jwks::start(&[&k1]).await;
    let server = Server::start(auth_options(Some(&jwks)), None).await;
    let old = sign(&k1, "u1", json!({}));
    assert_accepted(&server, &old, "k1 before rotation").await;
    assert_eq!(jwks.fetches(), 1);

    // The provider rotates: k2 replaces k1.
    jwks.publish(&[&k2]);
    tokio::time::sleep(Duration::from_millis(250)).await; // past the refresh bound
    assert_accepted(&server, &sign(&k2, "u1", json!({})), "k2 after rotation").await;
    assert_eq!(jwks.fetches(), 2, "the unknown kid fetched the jwks once");
    // k1 left the set: its tokens are refused now.
    assert_refused(
        &server,
        &old,
        "token key id \"k1\" matches no known key",
        "k1 after rotation",
    )
    .await;
}

#[tokio::test]
async fn unknown_kids_refresh_at_most_once_per_interval() {
    let k1 = rsa("rsa1", "k1", Algorithm::RS256);
    let k3 = ed("k3");
    let jwks = Jwks::start(&[&k1]).await;
    let server = Server::start(
        AuthOptions {
            jwks_min_refresh_interval_ms: 60_000,
            ..auth_options(Some(&jwks))
        },
        None,
    )
    .await;
    assert_eq!(jwks.fetches(), 1, "fetched at start");
    // 30 tokens naming made-up kids: at most one more fetch... none, in
    // fact: the start fetch is less than a minute old.
    for i in 0..30 {
        let t = sign_as(&k1, Some(&format!("ghost-{i}")), Algorithm::RS256, "u1", json!({}));
        let a = server.stream(&t).await;
        assert_eq!(a.status, 401, "{a:?}");
    }
    assert_eq!(jwks.fetches(), 1, "unknown kids inside the interval fetch nothing");
    // A key published inside the interval is not fetched yet: refused.
    jwks.publish(&[&k1, &k3]);
    let t3 = sign(&k3, "u1", json!({}));
    assert_refused(
        &server,
        &t3,
        "token key id \"k3\" matches no known key",
        "k3 inside the interval",
    )
    .await;
    assert_eq!(jwks.fetches(), 1);

    // With a short interval the same key is fetched and accepted.
    jwks.publish(&[&k1]);
    let quick = Server::start(auth_options(Some(&jwks)), None).await;
    let before = jwks.fetches();
    tokio::time::sleep(Duration::from_millis(250)).await;
    jwks.publish(&[&k1, &k3]);
    assert_accepted(&quick, &t3, "k3 after a refresh").await;
    assert_eq!(jwks.fetches(), before + 1);
}

#[tokio::test]
async fn an_unreachable_or_slow_jwks_is_busy_not_unauthorized() {
    let k1 = rsa("rsa1", "k1", Algorithm::RS256);
    let jwks = Jwks::start(&[&k1]).await;
    jwks.delay_ms.store(3_000, Ordering::SeqCst);
    let started = std::time::Instant::now();
    let server = Server::start(
        AuthOptions {
            jwks_timeout_ms: 300,
            ..auth_options(Some(&jwks))
        },
        None,
    )
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "start waited for the slow jwks"
    );
    tokio::time::sleep(Duration::from_millis(250)).await;
    let a = server.stream(&sign(&k1, "u1", json!({}))).await;
    assert_eq!(a.status, 503, "{a:?}");
    assert_eq!(a.retry_after.as_deref(), Some("1"));
    assert!(a.message().contains("timed out after 300 ms"), "{a:?}");
    // The provider recovers: the next fetch (after the interval) works.
    jwks.delay_ms.store(0, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_accepted(&server, &sign(&k1, "u1", json!({})), "after recovery").await;
}

#[tokio::test]
async fn static_pem_and_jwk_files_verify_without_a_jwks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let k1 = rsa("rsa1", "pem1", Algorithm::RS256);
    let e = ed("edfile");
    let jwk_path = dir.path().join("ed.jwk.json");
    std::fs::write(&jwk_path, e.jwk.to_string()).expect("write jwk");
    let auth = AuthOptions {
        keys: vec![
            StaticKey {
                kid: Some("pem1".into()),
                algorithm: Some("RS256".into()),
                pem_file: Some(keys_dir().join("rsa1.pub.pem")),
                jwk_file: None,
            },
            StaticKey {
                kid: None,
                algorithm: None,
                pem_file: None,
                jwk_file: Some(jwk_path),
            },
        ],
        ..auth_options(None)
    };
    let server = Server::start(auth, None).await;
    assert_accepted(&server, &sign(&k1, "u1", json!({})), "pem key").await;
    assert_accepted(&server, &sign(&e, "u1", json!({})), "jwk file key").await;
    // No secret and no kid-less key: a kid-less HS256 token has no key.
    let hs = TestKey {
        kid: String::new(),
        alg: Algorithm::HS256,
        signing: EncodingKey::from_secret(ferry_server::DEV_JWT_SECRET.as_bytes()),
        jwk: Json::Null,
    };
    assert_refused(
        &server,
        &sign_as(&hs, None, Algorithm::HS256, "u1", json!({})),
        "token has no kid and no key without a kid is configured",
        "dev secret token with [auth] keys",
    )
    .await;
}

#[test]
fn bad_key_config_is_refused_with_a_message() {
    let cases = [
        (
            StaticKey {
                kid: None,
                algorithm: None,
                pem_file: Some(keys_dir().join("rsa1.pub.pem")),
                jwk_file: None,
            },
            "a pem key needs an algorithm",
        ),
        (
            StaticKey {
                kid: None,
                algorithm: Some("RS999".into()),
                pem_file: Some(keys_dir().join("rsa1.pub.pem")),
                jwk_file: None,
            },
            "unknown algorithm \"RS999\"",
        ),
        (
            StaticKey {
                kid: None,
                algorithm: Some("HS256".into()),
                pem_file: Some(keys_dir().join("rsa1.pub.pem")),
                jwk_file: None,
            },
            "is a shared secret",
        ),
        (
            StaticKey {
                kid: None,
                algorithm: Some("ES256".into()),
                pem_file: Some(keys_dir().join("README.md")),
                jwk_file: None,
            },
            "key file",
        ),
        (
            StaticKey {
                kid: None,
                algorithm: None,
                pem_file: None,
                jwk_file: None,
            },
            "exactly one of pem_file and jwk_file",
        ),
    ];
    for (key, expect) in cases {
        let options = AuthOptions {
            keys: vec![key],
            ..AuthOptions::default()
        };
        let err = Authenticator::from_options(&options, None).expect_err(expect);
        assert!(matches!(err, ServiceError::Config(_)), "{err}");
        assert!(err.to_string().contains(expect), "{err} does not say {expect:?}");
    }
    let err = Authenticator::from_options(&AuthOptions::default(), None).expect_err("no key");
    assert!(err.to_string().contains("no token key configured"), "{err}");
    let err = Authenticator::from_options(
        &AuthOptions {
            jwks_url: Some("ftp://idp.test/jwks".into()),
            ..AuthOptions::default()
        },
        None,
    )
    .expect_err("ftp");
    assert!(err.to_string().contains("is not http or https"), "{err}");
}

/// `exp` and `nbf` at the leeway's edge, on a manual clock.
#[test]
fn leeway_bounds_exp_and_nbf_exactly() {
    let key = ed("k");
    let jwk_dir = tempfile::tempdir().expect("tempdir");
    let path = jwk_dir.path().join("k.json");
    std::fs::write(&path, json!({"keys": [key.jwk]}).to_string()).expect("write");
    let auth = Authenticator::from_options(
        &AuthOptions {
            keys: vec![StaticKey {
                kid: None,
                algorithm: None,
                pem_file: None,
                jwk_file: Some(path),
            }],
            leeway_s: 30,
            ..AuthOptions::default()
        },
        None,
    )
    .expect("auth");
    let now = 1_000_000u64;
    let clock = ManualClock::new(now * 1000);
    let token = |extra: Json| sign(&key, "u1", extra);
    // exp + leeway == now: expired; one second later than that: valid.
    let at_limit = token(json!({"exp": now - 30}));
    let err = auth.verify(&at_limit, &clock).expect_err("exp + leeway == now");
    assert!(
        err.to_string()
            .contains("token expired at 999970 (now 1000000, leeway 30 s)"),
        "{err}"
    );
    auth.verify(&token(json!({"exp": now - 29})), &clock)
        .expect("exp + leeway one second ahead");
    // nbf == now + leeway: valid; one second more: refused.
    auth.verify(&token(json!({"exp": now + 60, "nbf": now + 30})), &clock)
        .expect("nbf at the leeway");
    let err = auth
        .verify(&token(json!({"exp": now + 60, "nbf": now + 31})), &clock)
        .expect_err("nbf past the leeway");
    assert!(err.to_string().contains("token not valid before 1000031"), "{err}");
    // A non-numeric nbf is refused, not ignored.
    let err = auth
        .verify(&token(json!({"exp": now + 60, "nbf": "soon"})), &clock)
        .expect_err("string nbf");
    assert!(err.to_string().contains("nbf claim \"soon\" is not a number"), "{err}");
}

#[tokio::test]
async fn the_development_secret_is_refused_off_loopback_unless_allowed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = ServerConfig {
        data_dir: dir.path().to_path_buf(),
        listen_addr: "0.0.0.0:0".parse().expect("addr"),
        ..ServerConfig::default()
    };
    let err = ferry_server::run(config.clone(), std::future::pending())
        .await
        .expect_err("dev secret on 0.0.0.0");
    assert!(matches!(err, ServiceError::Config(_)), "{err}");
    assert!(
        err.to_string()
            .contains("refusing to listen on 0.0.0.0:0 with the development jwt secret"),
        "{err}"
    );
    // Nothing was created: the refusal comes before the database opens.
    assert!(!dir.path().join("source.db").exists());
    // Allowed explicitly, or with a real secret, or with [auth] keys.
    let mut allowed = config.clone();
    allowed.auth.allow_dev_secret = true;
    allowed.check().expect("allowed explicitly");
    let mut secret = config.clone();
    secret.jwt_secret = Some("a real secret".into());
    secret.check().expect("a real secret");
    let mut jwks = config.clone();
    jwks.auth.jwks_url = Some("https://idp.test/jwks".into());
    jwks.check().expect("a jwks");
    assert_eq!(jwks.hs256_secret(), (None, false), "no dev secret next to [auth] keys");
    // Loopback with the dev secret: the demo.
    let mut demo = config;
    demo.listen_addr = "127.0.0.1:0".parse().expect("addr");
    demo.check().expect("loopback demo");
    assert!(demo.hs256_secret().1, "the demo uses the development secret");
}

#[test]
fn auth_and_http_sections_parse_from_toml() {
    let config = ServerConfig::from_toml(
        r#"
        listen_addr = "127.0.0.1:9000"
        [auth]
        jwks_url = "https://idp.test/.well-known/jwks.json"
        audience = "ferry"
        issuer = "https://idp.test/"
        leeway_s = 10
        jwks_min_refresh_interval_ms = 5000
        [[auth.keys]]
        kid = "static-1"
        algorithm = "ES256"
        pem_file = "/etc/ferry/es256.pub.pem"
        [http]
        header_timeout_ms = 5000
        max_streams_per_user = 4
        max_uploads_per_user_per_s = 10
        "#,
    )
    .expect("parse");
    assert_eq!(config.auth.audience.as_deref(), Some("ferry"));
    assert_eq!(config.auth.leeway_s, 10);
    assert_eq!(config.auth.keys.len(), 1);
    assert_eq!(config.http.header_timeout_ms, 5000);
    assert_eq!(config.http.max_streams_per_user, 4);
    assert_eq!(config.http.max_uploads_per_user_per_s, 10);
    // Unknown keys in [auth] are refused with their name.
    let err = ServerConfig::from_toml("[auth]\naudiance = \"x\"\n").expect_err("typo");
    assert!(err.to_string().contains("audiance"), "{err}");
}
