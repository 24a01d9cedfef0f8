//! Operations over HTTP (`docs/adr/0013-metrics-and-admin-api.md`):
//! `GET /metrics` and the admin diagnostics API, on the sync port, behind
//! the admin token ([`AdminOptions`]), never a user's token.
//!
//! | route | answer |
//! |---|---|
//! | `GET /metrics` | the service's metrics ([`crate::metrics`]), Prometheus text format |
//! | `GET /admin/buckets?limit=&after=` | [`BucketsAnswer`]: buckets by name after `after`, with op counts and checksums |
//! | `GET /admin/users/{user_id}/buckets?limit=&claim.<name>=<value>` | [`UserBucketsAnswer`]: the buckets the sync rules give that user (claims: `sub` = the user id, plus those given) |
//! | `GET /admin/clients/{client_id}?limit=&after_seq=` | [`ClientAnswer`]: the client's owner, last seq and stored outcomes after `after_seq` |
//!
//! Access: the admin routes need `Authorization: Bearer <admin token>`
//! (compared in constant time: both sides hashed with SHA-256, the
//! digests compared with `subtle`); a missing or wrong token, a user's
//! JWT included, is a 401 with no data. Without a configured admin
//! token the admin routes answer 404: never open. `/metrics` needs the
//! admin token when one is configured, unless `metrics_public` is set;
//! without an admin token it is open (it holds aggregates only: no user,
//! client, bucket or row names).
//!
//! `limit` defaults to [`DEFAULT_LIMIT`]; one outside `1..=MAX_LIMIT` is
//! refused with a 400 naming it.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::header::{AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE, WWW_AUTHENTICATE};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use ferry_protocol::Outcome;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use crate::error::{Result, ServiceError};
use crate::metrics::METRICS_CONTENT_TYPE;
use crate::service::SyncService;

/// A page's size when no `limit` is given.
pub const DEFAULT_LIMIT: usize = 100;
/// The largest `limit` accepted.
pub const MAX_LIMIT: usize = 1000;
/// The shortest admin token accepted.
pub const MIN_ADMIN_TOKEN_BYTES: usize = 16;

/// The `[admin]` section of the server config.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminOptions {
    /// The admin API's bearer token (`--admin-token`,
    /// `FERRY_ADMIN_TOKEN`), at least [`MIN_ADMIN_TOKEN_BYTES`] bytes;
    /// `None`: the admin API answers 404.
    pub token: Option<String>,
    /// Serve `/metrics` without the admin token (`--metrics-public`).
    pub metrics_public: bool,
}

impl std::fmt::Debug for AdminOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminOptions")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("metrics_public", &self.metrics_public)
            .finish()
    }
}

impl AdminOptions {
    /// Refuse an admin token too short to be one.
    pub fn check(&self) -> Result<()> {
        match &self.token {
            Some(t) if t.len() < MIN_ADMIN_TOKEN_BYTES => Err(ServiceError::Config(format!(
                "admin token of {} bytes is shorter than {MIN_ADMIN_TOKEN_BYTES} bytes",
                t.len()
            ))),
            _ => Ok(()),
        }
    }
}

/// One bucket: its op count (entries in its log now) and checksum.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketInfo {
    /// The bucket instance.
    pub bucket: String,
    /// Entries in its op log (after compaction).
    pub op_count: u64,
    /// The wrapping sum of its entries' checksums.
    pub checksum: u32,
}

/// `GET /admin/buckets`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketsAnswer {
    /// The newest op id when the states were read.
    pub last_op_id: u64,
    /// Buckets by name, at most `limit`.
    pub buckets: Vec<BucketInfo>,
    /// The `after` of the next page, when there are more.
    pub next_after: Option<String>,
}

/// `GET /admin/users/{user_id}/buckets`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserBucketsAnswer {
    /// The user id (the `sub` claim).
    pub user_id: String,
    /// The newest op id when the states were read.
    pub last_op_id: u64,
    /// The user's buckets by name, at most `limit` (a bucket without
    /// entries has count and checksum 0).
    pub buckets: Vec<BucketInfo>,
    /// Whether the user has more buckets than `limit`.
    pub truncated: bool,
}

/// A stored outcome.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OutcomeInfo {
    /// The op's client seq.
    pub seq: u64,
    /// The outcome as stored.
    #[serde(flatten)]
    pub outcome: Outcome,
    /// The fingerprint of the op it answered (none for old outcomes).
    pub fingerprint: Option<u64>,
}

/// `GET /admin/clients/{client_id}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClientAnswer {
    /// The client id.
    pub client_id: String,
    /// The user it belongs to (the first to upload with it).
    pub user_id: String,
    /// The highest seq processed (its write checkpoint).
    pub last_seq: u64,
    /// Stored outcomes after `after_seq`, by seq, at most `limit`.
    pub outcomes: Vec<OutcomeInfo>,
    /// The `after_seq` of the next page, when there may be more.
    pub next_after_seq: Option<u64>,
}

/// An admin error answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminErrorBody {
    /// `unauthorized`, `not_found`, `bad_request` or `internal`.
    pub code: String,
    /// What went wrong, naming the bad value.
    pub message: String,
}

fn error_response(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    let body = AdminErrorBody {
        code: code.to_owned(),
        message: message.into(),
    };
    let mut r = (status, axum::Json(body)).into_response();
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut().insert(
            WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"ferry-admin\""),
        );
    }
    r
}

fn service_error_response(e: &ServiceError) -> Response {
    match e {
        ServiceError::BadRequest(m) | ServiceError::TooLarge(m) => {
            error_response(StatusCode::BAD_REQUEST, "bad_request", m.clone())
        }
        other => {
            tracing::warn!(error = %other, "admin request failed");
            error_response(StatusCode::INTERNAL_SERVER_ERROR, "internal", other.to_string())
        }
    }
}

fn digest(token: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, token);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

#[derive(Clone)]
struct AdminState {
    service: SyncService,
    /// SHA-256 of the admin token.
    token: Option<Arc<[u8; 32]>>,
    metrics_public: bool,
}

impl AdminState {
    /// `None` when the request may go on, else the refusal.
    fn refuse(&self, headers: &HeaderMap) -> Option<Response> {
        let Some(expected) = &self.token else {
            return Some(error_response(
                StatusCode::NOT_FOUND,
                "not_found",
                "the admin api is off: no admin token is configured",
            ));
        };
        let given = headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty());
        let Some(given) = given else {
            return Some(error_response(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing admin token (authorization: bearer <admin token>)",
            ));
        };
        if bool::from(digest(given.as_bytes()).ct_eq(expected.as_ref())) {
            None
        } else {
            Some(error_response(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "wrong admin token",
            ))
        }
    }
}

/// The `/metrics` and `/admin/*` routes over `service`, to merge into
/// the sync router.
pub fn router(service: SyncService, options: &AdminOptions) -> Router {
    let state = AdminState {
        service,
        token: options.token.as_deref().map(|t| Arc::new(digest(t.as_bytes()))),
        metrics_public: options.metrics_public,
    };
    Router::new()
        .route("/metrics", get(metrics_route))
        .route("/admin/buckets", get(buckets_route))
        .route("/admin/users/{user_id}/buckets", get(user_buckets_route))
        .route("/admin/clients/{client_id}", get(client_route))
        .with_state(state)
}

fn no_store(mut r: Response) -> Response {
    r.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn json<T: Serialize>(value: &T) -> Response {
    no_store((StatusCode::OK, axum::Json(value)).into_response())
}

async fn metrics_route(State(state): State<AdminState>, headers: HeaderMap) -> Response {
    if state.token.is_some() && !state.metrics_public {
        if let Some(refused) = state.refuse(&headers) {
            return refused;
        }
    }
    match state.service.render_metrics().await {
        Ok(text) => {
            let mut r = (StatusCode::OK, text).into_response();
            r.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static(METRICS_CONTENT_TYPE));
            no_store(r)
        }
        Err(e) => service_error_response(&e),
    }
}

/// The `limit` query parameter: [`DEFAULT_LIMIT`] when absent, refused
/// outside `1..=MAX_LIMIT`.
pub fn parse_limit(query: &HashMap<String, String>) -> Result<usize> {
    let Some(raw) = query.get("limit") else {
        return Ok(DEFAULT_LIMIT);
    };
    let n: u64 = raw
        .parse()
        .map_err(|_| ServiceError::BadRequest(format!("limit {raw:?} is not a whole number")))?;
    if n == 0 || n > MAX_LIMIT as u64 {
        return Err(ServiceError::BadRequest(format!(
            "limit {n} is outside 1..={MAX_LIMIT}"
        )));
    }
    Ok(n as usize)
}

fn parse_u64(query: &HashMap<String, String>, name: &str) -> Result<u64> {
    match query.get(name) {
        None => Ok(0),
        Some(raw) => raw
            .parse()
            .map_err(|_| ServiceError::BadRequest(format!("{name} {raw:?} is not a whole number"))),
    }
}

async fn buckets_route(
    State(state): State<AdminState>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    if let Some(refused) = state.refuse(&headers) {
        return refused;
    }
    let answer = async {
        let limit = parse_limit(&query)?;
        let after = query.get("after").cloned().unwrap_or_default();
        state.service.admin_buckets(&after, limit).await
    };
    match answer.await {
        Ok(a) => json(&a),
        Err(e) => service_error_response(&e),
    }
}

async fn user_buckets_route(
    State(state): State<AdminState>,
    headers: HeaderMap,
    Path(user_id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    if let Some(refused) = state.refuse(&headers) {
        return refused;
    }
    let answer = async {
        let limit = parse_limit(&query)?;
        let claims: Vec<(String, String)> = query
            .iter()
            .filter_map(|(k, v)| k.strip_prefix("claim.").map(|k| (k.to_owned(), v.clone())))
            .collect();
        state.service.admin_user_buckets(&user_id, &claims, limit).await
    };
    match answer.await {
        Ok(a) => json(&a),
        Err(e) => service_error_response(&e),
    }
}

async fn client_route(
    State(state): State<AdminState>,
    headers: HeaderMap,
    Path(client_id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    if let Some(refused) = state.refuse(&headers) {
        return refused;
    }
    let answer = async {
        let limit = parse_limit(&query)?;
        let after_seq = parse_u64(&query, "after_seq")?;
        state.service.admin_client(&client_id, after_seq, limit).await
    };
    match answer.await {
        Ok(Some(a)) => json(&a),
        Ok(None) => error_response(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("client {client_id:?} never uploaded"),
        ),
        Err(e) => service_error_response(&e),
    }
}

fn blocking_error(e: ferry_transport::blocking::BlockingError) -> ServiceError {
    ServiceError::Database(e.to_string())
}

fn infos(states: Vec<ferry_protocol::BucketChecksum>) -> Vec<BucketInfo> {
    states
        .into_iter()
        .map(|b| BucketInfo {
            bucket: b.bucket,
            op_count: b.count,
            checksum: b.checksum,
        })
        .collect()
}

/// The diagnostics the admin API and `ferry-server inspect` show.
impl SyncService {
    /// Buckets with entries, by name, after `after`, at most `limit`,
    /// with their op counts and checksums read in one checkpoint.
    pub async fn admin_buckets(&self, after: &str, limit: usize) -> Result<BucketsAnswer> {
        let db = self.db().clone();
        let after = after.to_owned();
        ferry_transport::blocking::run(move || {
            let names = db.bucket_names()?;
            let mut page: Vec<String> = names
                .into_iter()
                .filter(|n| n.as_str() > after.as_str())
                .take(limit.saturating_add(1))
                .collect();
            let more = page.len() > limit;
            page.truncate(limit);
            let cp = db.checkpoint("", &page)?;
            let next_after = if more { page.last().cloned() } else { None };
            Ok(BucketsAnswer {
                last_op_id: cp.last_op_id,
                buckets: infos(cp.buckets),
                next_after,
            })
        })
        .await
        .map_err(blocking_error)?
    }

    /// The buckets the sync rules give `user_id` (its `sub`, plus
    /// `claims` as string claims), at most `limit`, with op counts and
    /// checksums.
    pub async fn admin_user_buckets(
        &self,
        user_id: &str,
        claims: &[(String, String)],
        limit: usize,
    ) -> Result<UserBucketsAnswer> {
        let mut map = serde_json::Map::new();
        for (k, v) in claims {
            map.insert(k.clone(), serde_json::Value::String(v.clone()));
        }
        map.insert("sub".to_owned(), serde_json::Value::String(user_id.to_owned()));
        let max = self.options().max_buckets_per_user;
        let mut names = self.rules().user_buckets(&map, max)?;
        let truncated = names.len() > limit;
        names.truncate(limit);
        let db = self.db().clone();
        let cp = ferry_transport::blocking::run(move || db.checkpoint("", &names))
            .await
            .map_err(blocking_error)??;
        Ok(UserBucketsAnswer {
            user_id: user_id.to_owned(),
            last_op_id: cp.last_op_id,
            buckets: infos(cp.buckets),
            truncated,
        })
    }

    /// A client's owner, last seq and stored outcomes after `after_seq`
    /// (at most `limit`); `None` for a client that never uploaded.
    pub async fn admin_client(&self, client_id: &str, after_seq: u64, limit: usize) -> Result<Option<ClientAnswer>> {
        let db = self.db().clone();
        let client_id = client_id.to_owned();
        ferry_transport::blocking::run(move || {
            let Some(user_id) = db.client_owner(&client_id)? else {
                return Ok(None);
            };
            let last_seq = db.checkpoint(&client_id, &[])?.write_checkpoint.unwrap_or(0);
            let stored = db.client_outcomes(&client_id, after_seq, limit)?;
            let next_after_seq = if stored.len() >= limit {
                stored.last().map(|(seq, _)| *seq)
            } else {
                None
            };
            let outcomes = stored
                .into_iter()
                .map(|(seq, o)| OutcomeInfo {
                    seq,
                    outcome: o.outcome,
                    fingerprint: o.fingerprint,
                })
                .collect();
            Ok(Some(ClientAnswer {
                client_id,
                user_id,
                last_seq,
                outcomes,
                next_after_seq,
            }))
        })
        .await
        .map_err(blocking_error)?
    }
}
