//! JWT bearer tokens: `sub` is the user id, `exp` (and `nbf`, `iat`) are
//! seconds since the epoch, any other claim can feed the sync rules.
//!
//! Keys come from an identity provider's JWKS URL (fetched, cached,
//! refreshed on an unknown `kid` at most once per
//! `jwks_min_refresh_interval_ms`), from static PEM or JWK files, or are
//! an HS256 shared secret. Each key carries its algorithm (from the JWK's
//! `alg`, its key type, or the config); a token is verified with the
//! algorithm of the key it names, never the one its header claims, so
//! `alg: none` and algorithm confusion (an RSA public key used as an HMAC
//! secret) are refused (`docs/adr/0008-authentication.md`).

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_core::Clock;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse};
use jsonwebtoken::{
    decode, decode_header, encode, errors::ErrorKind as JwtKind, Algorithm, DecodingKey, EncodingKey, Header,
    Validation,
};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as Json};

use crate::error::{Result, ServiceError};

/// Longest user id (a token's `sub`) taken, in bytes: identity providers'
/// ids and e-mail addresses are far shorter.
pub const MAX_USER_ID_BYTES: usize = 1_024;

/// A verified token.
#[derive(Clone, Debug, PartialEq)]
pub struct AuthUser {
    /// The `sub` claim.
    pub user_id: String,
    /// Expiry, seconds since the epoch.
    pub exp_s: u64,
    /// Every claim, `sub` included (the sync rules' parameter source).
    pub claims: Map<String, Json>,
}

/// The `[auth]` section of the server config: where verification keys
/// come from and which claims are checked. The HS256 secret is the
/// config's `jwt_secret`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthOptions {
    /// An identity provider's JWKS URL (`https://` needs the default
    /// `jwks-https` feature).
    pub jwks_url: Option<String>,
    /// Static keys: PEM public keys or JWK (set) files.
    pub keys: Vec<StaticKey>,
    /// When set, a token's `aud` (a string or an array) must contain it.
    pub audience: Option<String>,
    /// When set, a token's `iss` must equal it.
    pub issuer: Option<String>,
    /// Clock skew allowed on `exp` and `nbf`, in seconds.
    pub leeway_s: u64,
    /// Longest wait for one JWKS fetch.
    pub jwks_timeout_ms: u64,
    /// Shortest time between two JWKS fetches: a token with an unknown
    /// `kid` inside it is refused without a fetch.
    pub jwks_min_refresh_interval_ms: u64,
    /// Age after which cached JWKS keys are fetched again (so a key the
    /// provider removed stops being accepted).
    pub jwks_max_age_s: u64,
    /// Largest JWKS document accepted.
    pub jwks_max_bytes: usize,
    /// Let the server listen on a non-loopback address with the
    /// development secret (never in production).
    pub allow_dev_secret: bool,
}

impl Default for AuthOptions {
    fn default() -> Self {
        AuthOptions {
            jwks_url: None,
            keys: Vec::new(),
            audience: None,
            issuer: None,
            leeway_s: 30,
            jwks_timeout_ms: 5_000,
            jwks_min_refresh_interval_ms: 30_000,
            jwks_max_age_s: 3_600,
            jwks_max_bytes: 1024 * 1024,
            allow_dev_secret: false,
        }
    }
}

impl AuthOptions {
    /// Whether any key besides an HS256 secret is configured.
    pub fn has_keys(&self) -> bool {
        self.jwks_url.is_some() || !self.keys.is_empty()
    }
}

/// A static verification key from a file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticKey {
    /// The key id tokens name in their `kid` header; none: the key
    /// verifies tokens without a `kid`. For a JWK file, the JWK's own
    /// `kid` when this is not set.
    #[serde(default)]
    pub kid: Option<String>,
    /// `RS256`, `RS384`, `RS512`, `PS256`.., `ES256`, `ES384`, `EdDSA`.
    /// Required for a PEM file; for a JWK, overrides nothing: it must
    /// agree with the JWK's `alg` when both are given.
    #[serde(default)]
    pub algorithm: Option<String>,
    /// A PEM public key (`-----BEGIN PUBLIC KEY-----`, or an RSA
    /// `BEGIN RSA PUBLIC KEY`).
    #[serde(default)]
    pub pem_file: Option<PathBuf>,
    /// A JWK or a JWK Set (JSON).
    #[serde(default)]
    pub jwk_file: Option<PathBuf>,
}

/// One verification key and the only algorithm it verifies.
#[derive(Clone)]
struct VerifyKey {
    kid: Option<String>,
    algorithm: Algorithm,
    key: DecodingKey,
    validation: Validation,
}

impl VerifyKey {
    fn new(kid: Option<String>, algorithm: Algorithm, key: DecodingKey) -> Self {
        let mut validation = Validation::new(algorithm);
        // Time and audience claims are checked below against the
        // service's clock and with messages naming the bad value.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        validation.required_spec_claims.clear();
        VerifyKey {
            kid,
            algorithm,
            key,
            validation,
        }
    }
}

fn alg_name(a: Algorithm) -> String {
    format!("{a:?}").to_lowercase()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    Hmac,
    Rsa,
    Ec,
    Ed,
}

fn family(a: Algorithm) -> Family {
    match a {
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => Family::Hmac,
        Algorithm::ES256 | Algorithm::ES384 => Family::Ec,
        Algorithm::EdDSA => Family::Ed,
        Algorithm::RS256
        | Algorithm::RS384
        | Algorithm::RS512
        | Algorithm::PS256
        | Algorithm::PS384
        | Algorithm::PS512 => Family::Rsa,
    }
}

fn parse_algorithm(name: &str, what: &str) -> Result<Algorithm> {
    let canonical = if name.eq_ignore_ascii_case("eddsa") {
        "EdDSA".to_owned()
    } else {
        name.to_ascii_uppercase()
    };
    Algorithm::from_str(&canonical).map_err(|_| {
        ServiceError::Config(format!(
            "{what}: unknown algorithm {name:?} (expected rs256, rs384, rs512, ps256, ps384, ps512, es256, es384, eddsa or hs256)"
        ))
    })
}

/// The key of one JWK, with its algorithm: the JWK's `alg` when present
/// (it must fit the key type), else the key type's (RSA: RS256, P-256:
/// ES256, P-384: ES384, Ed25519: EdDSA, oct: HS256). `Ok(None)`: an
/// encryption key, skipped.
fn key_from_jwk(jwk: &Jwk, allow_oct: bool, what: &str) -> Result<Option<VerifyKey>> {
    let kid = jwk.common.key_id.clone();
    let name = kid.as_deref().unwrap_or("(no kid)");
    let bad = |m: String| ServiceError::Config(format!("{what}: key {name:?}: {m}"));
    if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
        return Ok(None);
    }
    let declared = match jwk.common.key_algorithm {
        None => None,
        Some(ka) => match ka.to_string().parse::<Algorithm>() {
            Ok(a) => Some(a),
            // An encryption algorithm (RSA-OAEP, ...): not a signing key.
            Err(_) => return Ok(None),
        },
    };
    let (key_family, by_type) = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => (Family::Rsa, Algorithm::RS256),
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 => (Family::Ec, Algorithm::ES256),
            EllipticCurve::P384 => (Family::Ec, Algorithm::ES384),
            ref c => return Err(bad(format!("unsupported curve {c:?}").to_lowercase())),
        },
        AlgorithmParameters::OctetKeyPair(p) => match p.curve {
            EllipticCurve::Ed25519 => (Family::Ed, Algorithm::EdDSA),
            ref c => return Err(bad(format!("unsupported curve {c:?}").to_lowercase())),
        },
        AlgorithmParameters::OctetKey(_) if allow_oct => (Family::Hmac, Algorithm::HS256),
        AlgorithmParameters::OctetKey(_) => {
            return Err(bad("symmetric (oct) keys are not taken from a jwks url".into()));
        }
    };
    let algorithm = declared.unwrap_or(by_type);
    if family(algorithm) != key_family {
        return Err(bad(format!(
            "algorithm {} does not fit its key type",
            alg_name(algorithm)
        )));
    }
    if key_family == Family::Ec && algorithm != by_type {
        return Err(bad(format!("algorithm {} does not fit its curve", alg_name(algorithm))));
    }
    let key = DecodingKey::from_jwk(jwk).map_err(|e| bad(e.to_string().to_lowercase()))?;
    Ok(Some(VerifyKey::new(kid, algorithm, key)))
}

/// The keys of a JWK Set document (or of a single JWK when `single_ok`).
/// Keys that do not parse are skipped with a warning, so one exotic key
/// does not hide the others.
fn keys_from_jwks_json(text: &[u8], allow_oct: bool, what: &str) -> Result<Vec<VerifyKey>> {
    let doc: Json = serde_json::from_slice(text).map_err(|e| ServiceError::Config(format!("{what}: not json: {e}")))?;
    let entries = match doc.get("keys") {
        Some(Json::Array(keys)) => keys.clone(),
        Some(_) => return Err(ServiceError::Config(format!("{what}: \"keys\" is not an array"))),
        None if doc.get("kty").is_some() => vec![doc],
        None => return Err(ServiceError::Config(format!("{what}: no \"keys\" array"))),
    };
    let mut keys = Vec::new();
    for entry in entries {
        let jwk: Jwk = match serde_json::from_value(entry) {
            Ok(j) => j,
            Err(e) => {
                tracing::warn!("{what}: skipping a key that does not parse: {e}");
                continue;
            }
        };
        match key_from_jwk(&jwk, allow_oct, what) {
            Ok(Some(k)) => keys.push(k),
            Ok(None) => {}
            Err(e) => tracing::warn!("skipping a key: {e}"),
        }
    }
    Ok(keys)
}

fn load_static_key(k: &StaticKey) -> Result<Vec<VerifyKey>> {
    let read = |p: &PathBuf| {
        std::fs::read(p).map_err(|e| ServiceError::Io {
            path: p.display().to_string(),
            message: e.to_string(),
        })
    };
    match (&k.pem_file, &k.jwk_file) {
        (Some(p), None) => {
            let what = format!("key file {}", p.display());
            let name = k
                .algorithm
                .as_deref()
                .ok_or_else(|| ServiceError::Config(format!("{what}: a pem key needs an algorithm")))?;
            let algorithm = parse_algorithm(name, &what)?;
            let pem = read(p)?;
            let key = match family(algorithm) {
                Family::Rsa => DecodingKey::from_rsa_pem(&pem),
                Family::Ec => DecodingKey::from_ec_pem(&pem),
                Family::Ed => DecodingKey::from_ed_pem(&pem),
                Family::Hmac => {
                    return Err(ServiceError::Config(format!(
                        "{what}: {} is a shared secret, set jwt_secret instead",
                        alg_name(algorithm)
                    )))
                }
            }
            .map_err(|e| ServiceError::Config(format!("{what}: {}", e.to_string().to_lowercase())))?;
            Ok(vec![VerifyKey::new(k.kid.clone(), algorithm, key)])
        }
        (None, Some(p)) => {
            let what = format!("key file {}", p.display());
            let mut keys = keys_from_jwks_json(&read(p)?, true, &what)?;
            if keys.is_empty() {
                return Err(ServiceError::Config(format!("{what}: no usable signing key")));
            }
            if let Some(name) = &k.algorithm {
                let algorithm = parse_algorithm(name, &what)?;
                if let Some(other) = keys.iter().find(|v| v.algorithm != algorithm) {
                    return Err(ServiceError::Config(format!(
                        "{what}: the key's algorithm {} is not the configured {}",
                        alg_name(other.algorithm),
                        alg_name(algorithm)
                    )));
                }
            }
            if let Some(kid) = &k.kid {
                if keys.len() != 1 {
                    return Err(ServiceError::Config(format!(
                        "{what}: a kid is given but the file holds {} keys",
                        keys.len()
                    )));
                }
                for v in &mut keys {
                    v.kid = Some(kid.clone());
                }
            }
            Ok(keys)
        }
        _ => Err(ServiceError::Config(
            "an [[auth.keys]] entry needs exactly one of pem_file and jwk_file".into(),
        )),
    }
}

/// Keys fetched from a JWKS URL, and when.
struct JwksState {
    keys: Arc<Vec<VerifyKey>>,
    /// Last successful fetch.
    fetched_at: Option<Instant>,
    /// Last fetch attempt, successful or not (the refresh rate bound).
    attempted_at: Option<Instant>,
    /// Why the last attempt failed, if it did.
    last_error: Option<String>,
}

struct Jwks {
    url: String,
    client: reqwest::Client,
    timeout: Duration,
    min_refresh: Duration,
    max_age: Duration,
    max_bytes: usize,
    state: parking_lot::Mutex<JwksState>,
    /// One fetch at a time; others wait for it and use its result.
    fetching: tokio::sync::Mutex<()>,
}

impl Jwks {
    fn keys(&self) -> Arc<Vec<VerifyKey>> {
        self.state.lock().keys.clone()
    }

    fn has_kid(&self, kid: Option<&str>) -> bool {
        self.state.lock().keys.iter().any(|k| k.kid.as_deref() == kid)
    }

    fn stale(&self) -> bool {
        self.state.lock().fetched_at.is_none_or(|t| t.elapsed() >= self.max_age)
    }

    /// Fetch the document once if the rate bound allows; `Ok(false)`: it
    /// did not allow (a fetch happened less than `min_refresh` ago).
    async fn refresh(&self) -> Result<bool> {
        let started = Instant::now();
        let _one = self.fetching.lock().await;
        {
            let s = self.state.lock();
            if let Some(t) = s.attempted_at {
                // A fetch finished while this one waited: use it.
                if t >= started {
                    return match &s.last_error {
                        None => Ok(true),
                        Some(e) => Err(ServiceError::Busy(e.clone())),
                    };
                }
                if t.elapsed() < self.min_refresh {
                    // No fetch now; a provider that failed last time is
                    // still reported as unavailable (retrying helps).
                    return match &s.last_error {
                        None => Ok(false),
                        Some(e) => Err(ServiceError::Busy(e.clone())),
                    };
                }
            }
        }
        let result = self.fetch().await;
        let mut s = self.state.lock();
        s.attempted_at = Some(Instant::now());
        match result {
            Ok(keys) => {
                tracing::info!(url = %self.url, keys = keys.len(), "fetched jwks");
                s.keys = Arc::new(keys);
                s.fetched_at = Some(Instant::now());
                s.last_error = None;
                Ok(true)
            }
            Err(e) => {
                tracing::warn!(url = %self.url, "jwks fetch failed: {e}");
                s.last_error = Some(e.clone());
                Err(ServiceError::Busy(e))
            }
        }
    }

    async fn fetch(&self) -> std::result::Result<Vec<VerifyKey>, String> {
        let url = &self.url;
        let get = async {
            let mut response = self
                .client
                .get(url)
                .header("accept", "application/json")
                .send()
                .await
                .map_err(|e| format!("could not fetch jwks from {url}: {e}"))?;
            if !response.status().is_success() {
                return Err(format!("jwks url {url} answered http status {}", response.status()));
            }
            let mut body = Vec::new();
            while let Some(chunk) = response
                .chunk()
                .await
                .map_err(|e| format!("could not read jwks from {url}: {e}"))?
            {
                if body.len() + chunk.len() > self.max_bytes {
                    return Err(format!(
                        "jwks from {url} exceeds jwks_max_bytes ({} bytes)",
                        self.max_bytes
                    ));
                }
                body.extend_from_slice(&chunk);
            }
            keys_from_jwks_json(&body, false, &format!("jwks from {url}")).map_err(|e| e.to_string())
        };
        tokio::time::timeout(self.timeout, get).await.unwrap_or_else(|_| {
            Err(format!(
                "jwks fetch from {url} timed out after {} ms",
                self.timeout.as_millis()
            ))
        })
    }
}

struct AuthInner {
    /// The HS256 secret and static file keys.
    fixed: Vec<VerifyKey>,
    jwks: Option<Jwks>,
    audience: Option<String>,
    issuer: Option<String>,
    leeway_s: u64,
}

/// Verifies bearer tokens. Cheap to clone (the JWKS cache is shared).
#[derive(Clone)]
pub struct Authenticator {
    inner: Arc<AuthInner>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("fixed_keys", &self.inner.fixed.len())
            .field("jwks_url", &self.inner.jwks.as_ref().map(|j| &j.url))
            .field("audience", &self.inner.audience)
            .field("issuer", &self.inner.issuer)
            .field("leeway_s", &self.inner.leeway_s)
            .finish_non_exhaustive()
    }
}

impl Authenticator {
    /// An authenticator for HS256 tokens signed with `secret` (tokens
    /// without a `kid`), with the default [`AuthOptions`] checks.
    pub fn new(secret: &str) -> Self {
        let key = VerifyKey::new(None, Algorithm::HS256, DecodingKey::from_secret(secret.as_bytes()));
        let o = AuthOptions::default();
        Authenticator {
            inner: Arc::new(AuthInner {
                fixed: vec![key],
                jwks: None,
                audience: o.audience,
                issuer: o.issuer,
                leeway_s: o.leeway_s,
            }),
        }
    }

    /// An authenticator for `options`, with `hs256_secret` (if any) as a
    /// key for tokens without a `kid`. Loads the static key files; the
    /// JWKS is fetched by [`Authenticator::refresh_jwks`] or on the first
    /// token that needs it. Refuses a configuration without any key.
    pub fn from_options(options: &AuthOptions, hs256_secret: Option<&str>) -> Result<Self> {
        let mut fixed = Vec::new();
        if let Some(secret) = hs256_secret {
            if secret.is_empty() {
                return Err(ServiceError::Config("jwt_secret is empty".into()));
            }
            fixed.push(VerifyKey::new(
                None,
                Algorithm::HS256,
                DecodingKey::from_secret(secret.as_bytes()),
            ));
        }
        for k in &options.keys {
            fixed.extend(load_static_key(k)?);
        }
        let jwks = match &options.jwks_url {
            None => None,
            Some(url) => {
                let parsed = reqwest::Url::parse(url)
                    .map_err(|e| ServiceError::Config(format!("jwks_url {url:?} is not a url: {e}")))?;
                if !matches!(parsed.scheme(), "http" | "https") {
                    return Err(ServiceError::Config(format!("jwks_url {url:?} is not http or https")));
                }
                let timeout = Duration::from_millis(options.jwks_timeout_ms);
                // The whole fetch is bounded by `timeout` in `fetch`.
                let client = reqwest::Client::builder()
                    .connect_timeout(timeout)
                    .build()
                    .map_err(|e| ServiceError::Config(format!("jwks http client: {e}")))?;
                Some(Jwks {
                    url: url.clone(),
                    client,
                    timeout,
                    min_refresh: Duration::from_millis(options.jwks_min_refresh_interval_ms),
                    max_age: Duration::from_secs(options.jwks_max_age_s),
                    max_bytes: options.jwks_max_bytes,
                    state: parking_lot::Mutex::new(JwksState {
                        keys: Arc::new(Vec::new()),
                        fetched_at: None,
                        attempted_at: None,
                        last_error: None,
                    }),
                    fetching: tokio::sync::Mutex::new(()),
                })
            }
        };
        if fixed.is_empty() && jwks.is_none() {
            return Err(ServiceError::Config(
                "no token key configured: set jwt_secret, auth.jwks_url or auth.keys".into(),
            ));
        }
        Ok(Authenticator {
            inner: Arc::new(AuthInner {
                fixed,
                jwks,
                audience: options.audience.clone(),
                issuer: options.issuer.clone(),
                leeway_s: options.leeway_s,
            }),
        })
    }

    /// Fetch the JWKS now (subject to the refresh rate bound). Returns the
    /// number of JWKS keys held afterwards; 0 without a JWKS URL.
    pub async fn refresh_jwks(&self) -> Result<usize> {
        match &self.inner.jwks {
            None => Ok(0),
            Some(j) => {
                j.refresh().await?;
                Ok(j.keys().len())
            }
        }
    }

    /// Make sure the key `token` names is at hand: when it names a `kid`
    /// no key has, or the cached JWKS is older than `jwks_max_age_s`,
    /// fetch the JWKS (at most once per `jwks_min_refresh_interval_ms`;
    /// `Busy` when the fetch fails and no key is at hand). Malformed
    /// tokens pass through: [`Authenticator::verify`] refuses them.
    pub async fn resolve(&self, token: &str) -> Result<()> {
        let Some(jwks) = &self.inner.jwks else {
            return Ok(());
        };
        let token = bare_token(token);
        let Ok(header) = decode_header(token) else {
            return Ok(());
        };
        let kid = header.kid.as_deref();
        let known = self.inner.fixed.iter().any(|k| k.kid.as_deref() == kid) || jwks.has_kid(kid);
        if known && !jwks.stale() {
            return Ok(());
        }
        match jwks.refresh().await {
            Ok(_) => Ok(()),
            // Stale keys still verify while the provider is down.
            Err(_) if known => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Resolve the token's key ([`Authenticator::resolve`]), then verify.
    pub async fn verify_async(&self, token: &str, clock: &dyn Clock) -> Result<AuthUser> {
        self.resolve(token).await?;
        self.verify(token, clock)
    }

    /// Verify `token` at the clock's current time with the keys at hand
    /// (no fetch): the signature with the algorithm of the key it names,
    /// then `exp`, `nbf` (with `leeway_s`), `aud`, `iss` and `sub`.
    pub fn verify(&self, token: &str, clock: &dyn Clock) -> Result<AuthUser> {
        let unauthorized = |m: String| ServiceError::Unauthorized(m);
        let token = bare_token(token);
        if token.is_empty() {
            return Err(unauthorized("missing bearer token".into()));
        }
        let header = decode_header(token)
            .map_err(|e| unauthorized(format!("malformed token: {}", e.to_string().to_lowercase())))?;
        if let Some(crit) = critical_extensions(token) {
            return Err(unauthorized(format!(
                "token header names critical extensions {crit} that ferry does not understand"
            )));
        }
        let kid = header.kid.as_deref();
        let jwks_keys = self.inner.jwks.as_ref().map(Jwks::keys);
        let named: Vec<&VerifyKey> = self
            .inner
            .fixed
            .iter()
            .chain(jwks_keys.iter().flat_map(|k| k.iter()))
            .filter(|k| k.kid.as_deref() == kid)
            .collect();
        if named.is_empty() {
            return Err(unauthorized(match kid {
                Some(kid) => format!("token key id {kid:?} matches no known key"),
                None => "token has no kid and no key without a kid is configured".into(),
            }));
        }
        let candidates: Vec<&&VerifyKey> = named.iter().filter(|k| k.algorithm == header.alg).collect();
        if candidates.is_empty() {
            let algs: Vec<String> = named.iter().map(|k| alg_name(k.algorithm)).collect();
            return Err(unauthorized(format!(
                "token algorithm {} is not the algorithm of key {:?} ({})",
                alg_name(header.alg),
                kid.unwrap_or("(no kid)"),
                algs.join(", ")
            )));
        }
        let mut last = None;
        let mut claims = None;
        for k in candidates {
            match decode::<Map<String, Json>>(token, &k.key, &k.validation) {
                Ok(data) => {
                    claims = Some(data.claims);
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let claims = match (claims, last) {
            (Some(c), _) => c,
            (None, Some(e)) => {
                return Err(unauthorized(match e.kind() {
                    JwtKind::InvalidSignature => "bad token signature".to_owned(),
                    JwtKind::InvalidAlgorithm => "token algorithm does not fit the key".to_owned(),
                    _ => format!("malformed token: {}", e.to_string().to_lowercase()),
                }))
            }
            (None, None) => return Err(unauthorized("no key verified the token".into())),
        };
        self.check_claims(claims, clock)
    }

    fn check_claims(&self, claims: Map<String, Json>, clock: &dyn Clock) -> Result<AuthUser> {
        let unauthorized = |m: String| ServiceError::Unauthorized(m);
        let user_id = match claims.get("sub") {
            Some(Json::String(s)) if !s.is_empty() => s.clone(),
            _ => return Err(unauthorized("token has no sub claim".into())),
        };
        // The user id is stored (client ownership) and named in bucket
        // parameters: one no backend can store is refused here, not by
        // the database on every request.
        if user_id.contains('\0') {
            return Err(unauthorized(format!("token sub claim {user_id:?} contains a NUL byte")));
        }
        if user_id.len() > MAX_USER_ID_BYTES {
            return Err(unauthorized(format!(
                "token sub claim of {} bytes is over the limit of {MAX_USER_ID_BYTES} bytes",
                user_id.len()
            )));
        }
        let exp_s = claims
            .get("exp")
            .and_then(Json::as_u64)
            .ok_or_else(|| unauthorized("token has no exp claim".into()))?;
        let now_s = clock.now_ms() / 1000;
        let leeway = self.inner.leeway_s;
        if exp_s.saturating_add(leeway) <= now_s {
            return Err(unauthorized(format!(
                "token expired at {exp_s} (now {now_s}, leeway {leeway} s)"
            )));
        }
        if let Some(nbf) = claims.get("nbf") {
            let nbf_s = nbf
                .as_u64()
                .ok_or_else(|| unauthorized(format!("token nbf claim {nbf} is not a number of seconds")))?;
            if nbf_s > now_s.saturating_add(leeway) {
                return Err(unauthorized(format!(
                    "token not valid before {nbf_s} (now {now_s}, leeway {leeway} s)"
                )));
            }
        }
        if let Some(want) = &self.inner.issuer {
            match claims.get("iss") {
                Some(Json::String(iss)) if iss == want => {}
                Some(other) => {
                    return Err(unauthorized(format!("token issuer {other} is not {want:?}")));
                }
                None => return Err(unauthorized(format!("token has no iss claim (expected {want:?})"))),
            }
        }
        if let Some(want) = &self.inner.audience {
            let ok = match claims.get("aud") {
                Some(Json::String(a)) => a == want,
                Some(Json::Array(list)) => list.iter().any(|a| a.as_str() == Some(want.as_str())),
                _ => false,
            };
            if !ok {
                return Err(unauthorized(match claims.get("aud") {
                    Some(aud) => format!("token audience {aud} does not include {want:?}"),
                    None => format!("token has no aud claim (expected {want:?})"),
                }));
            }
        }
        Ok(AuthUser { user_id, exp_s, claims })
    }
}

/// The header's `crit` list (RFC 7515 4.1.11), if it has one: a token
/// whose header names extensions the recipient must understand is
/// refused, as Ferry understands none (`jsonwebtoken` ignores the member).
fn critical_extensions(token: &str) -> Option<String> {
    use base64::Engine as _;
    let encoded = token.split('.').next()?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(encoded).ok()?;
    let header: Map<String, Json> = serde_json::from_slice(&bytes).ok()?;
    header.get("crit").map(|crit| crit.to_string())
}

fn bare_token(token: &str) -> &str {
    token.strip_prefix("Bearer ").unwrap_or(token).trim()
}

/// Sign a token for `user_id` valid `ttl_s` seconds from `now_s`, with
/// extra claims.
pub fn mint_token_at(secret: &str, user_id: &str, now_s: u64, ttl_s: u64, extra: &Map<String, Json>) -> String {
    let mut claims = extra.clone();
    claims.insert("sub".into(), Json::String(user_id.to_owned()));
    claims.insert("iat".into(), Json::from(now_s));
    claims.insert("exp".into(), Json::from(now_s.saturating_add(ttl_s)));
    // HS256 signing of a JSON map with a byte key does not fail; the empty
    // fallback is a token every verifier refuses.
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap_or_default()
}

/// Sign a token for `user_id` valid `ttl_s` seconds from now (system time).
pub fn mint_token(secret: &str, user_id: &str, ttl_s: u64, extra: &Map<String, Json>) -> String {
    let now_s = ferry_core::SystemClock.now_ms() / 1000;
    mint_token_at(secret, user_id, now_s, ttl_s, extra)
}
