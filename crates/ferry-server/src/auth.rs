//! JWT bearer tokens (HS256): `sub` is the user id, `exp` and `iat` are
//! seconds since the epoch, any other claim can feed the sync rules.

use ferry_core::Clock;
use jsonwebtoken::{
    decode, encode, errors::ErrorKind as JwtKind, Algorithm, DecodingKey, EncodingKey, Header, Validation,
};
use serde_json::{Map, Value as Json};

use crate::error::{Result, ServiceError};

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

/// Verifies tokens with a shared secret.
#[derive(Clone)]
pub struct Authenticator {
    key: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator").finish_non_exhaustive()
    }
}

impl Authenticator {
    /// An authenticator for HS256 tokens signed with `secret`.
    pub fn new(secret: &str) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        // Expiry is checked against the service's clock below, so that
        // tests and simulations can move time.
        validation.validate_exp = false;
        validation.required_spec_claims.clear();
        Authenticator {
            key: DecodingKey::from_secret(secret.as_bytes()),
            validation,
        }
    }

    /// Verify `token` at the clock's current time.
    pub fn verify(&self, token: &str, clock: &dyn Clock) -> Result<AuthUser> {
        let token = token.strip_prefix("Bearer ").unwrap_or(token).trim();
        if token.is_empty() {
            return Err(ServiceError::Unauthorized("missing bearer token".into()));
        }
        let data = decode::<Map<String, Json>>(token, &self.key, &self.validation).map_err(|e| {
            ServiceError::Unauthorized(match e.kind() {
                JwtKind::InvalidSignature => "bad token signature".to_owned(),
                JwtKind::InvalidAlgorithm => "token algorithm is not hs256".to_owned(),
                _ => format!("malformed token: {}", e.to_string().to_lowercase()),
            })
        })?;
        let claims = data.claims;
        let user_id = match claims.get("sub") {
            Some(Json::String(s)) if !s.is_empty() => s.clone(),
            _ => return Err(ServiceError::Unauthorized("token has no sub claim".into())),
        };
        let exp_s = claims
            .get("exp")
            .and_then(Json::as_u64)
            .ok_or_else(|| ServiceError::Unauthorized("token has no exp claim".into()))?;
        let now_s = clock.now_ms() / 1000;
        if exp_s <= now_s {
            return Err(ServiceError::Unauthorized(format!(
                "token expired at {exp_s} (now {now_s})"
            )));
        }
        Ok(AuthUser { user_id, exp_s, claims })
    }
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
