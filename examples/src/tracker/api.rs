//! The tracker's HTTP endpoints: the embedded page, JSON reads and
//! writes, and the event stream. Every write is checked before anything
//! is written: bad input answers 4xx with `{"error": message}` and the
//! local database is left as it was.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query as UrlQuery, Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use ferry_client::query::{col, Order};
use ferry_client::{ClientError, Query, Resolution};
use ferry_core::{row_data, RowData, Value};
use ferry_queue::QueueError;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value as JsonValue};
use tokio::sync::broadcast::error::RecvError;

use super::{row_json, Event, Tracker, DESCRIPTION_DOC};
use ferry_conflict::crdt;

const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_CSS: &str = include_str!("assets/app.css");
const APP_JS: &str = include_str!("assets/app.js");

/// Ticket statuses, in board order.
pub const STATUSES: &[&str] = &["pending", "in_progress", "done"];
/// Longest ticket title, in characters.
pub const MAX_TITLE_CHARS: usize = 200;
/// Longest ticket description, in characters.
pub const MAX_DESCRIPTION_CHARS: usize = 10_000;
/// Longest comment, in characters.
pub const MAX_COMMENT_CHARS: usize = 2_000;
/// Longest attachment URL, in characters.
pub const MAX_URL_CHARS: usize = 2_000;
/// Longest request body.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// An answer to bad input or a failure: a status and a message, sent as
/// `{"error": message}`.
#[derive(Debug)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// What went wrong, for the page.
    pub message: String,
}

impl ApiError {
    fn bad(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
        }
    }

    fn not_found(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: message.into(),
        }
    }
}

impl From<QueueError> for ApiError {
    fn from(e: QueueError) -> Self {
        let status = match &e {
            // The offline policy refused the change.
            QueueError::Refused { .. } => StatusCode::CONFLICT,
            QueueError::RowMissing { .. } => StatusCode::NOT_FOUND,
            QueueError::RowExists { .. } => StatusCode::CONFLICT,
            QueueError::Schema(_) | QueueError::TooManyOps { .. } | QueueError::Record { .. } => {
                StatusCode::BAD_REQUEST
            }
            QueueError::QueueFull { .. } => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError {
            status,
            message: e.to_string(),
        }
    }
}

impl From<ClientError> for ApiError {
    fn from(e: ClientError) -> Self {
        match e {
            ClientError::Queue(q) => q.into(),
            other => ApiError {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                message: other.to_string(),
            },
        }
    }
}

impl From<crate::ExampleError> for ApiError {
    fn from(e: crate::ExampleError) -> Self {
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: e.to_string(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({ "error": self.message }))).into_response()
    }
}

type ApiResult<T = Json<JsonValue>> = Result<T, ApiError>;
type AppState = State<Arc<Tracker>>;

/// The tracker's routes.
pub fn router(tracker: Arc<Tracker>) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/app.css", get(css))
        .route("/app.js", get(js))
        .route("/favicon.ico", get(|| async { StatusCode::NO_CONTENT }))
        .route("/api/status", get(status))
        .route("/api/sync", post(set_sync))
        .route("/api/events", get(events))
        .route("/api/users", get(users))
        .route("/api/outcomes", get(outcomes))
        .route("/api/tickets", get(list_tickets).post(create_ticket))
        .route(
            "/api/tickets/{id}",
            get(get_ticket).patch(edit_ticket).delete(delete_ticket),
        )
        .route("/api/tickets/{id}/assignments", post(add_assignment))
        .route("/api/tickets/{id}/comments", post(add_comment))
        .route("/api/tickets/{id}/attachments", post(add_attachment))
        .route("/api/assignments/{id}", axum::routing::delete(remove_assignment))
        .route("/api/comments/{id}", axum::routing::delete(remove_comment))
        .route("/api/attachments/{id}", axum::routing::delete(remove_attachment))
        .route("/api/conflicts", get(conflicts))
        .route("/api/conflicts/{id}/resolve", post(resolve_conflict))
        .fallback(not_found)
        .layer(middleware::from_fn(same_site_only))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(tracker)
}

/// The tracker has no login: a web page of another site the user visits
/// is kept out by the browser's same-origin policy, which holds only if
/// the tracker answers nothing such a page may send without asking
/// first. A page may POST `text/plain` (or a form's types) anywhere
/// without a CORS preflight, so a request with a body must declare it
/// `application/json` (one that does is preflighted, and the tracker
/// answers no preflight): anything else is a 415 before any handler runs.
/// A page of another site may also rebind its own host name to 127.0.0.1
/// (DNS rebinding) and so be same-origin with the tracker: a request
/// naming a host other than a loopback one (`localhost`, `127.0.0.1`,
/// `[::1]`) is a 403, reads included.
async fn same_site_only(request: Request, next: Next) -> Response {
    if let Err(e) = loopback_host(request.headers()) {
        return e.into_response();
    }
    if let Err(e) = json_body_declared(request.method(), request.headers()) {
        return e.into_response();
    }
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    for (name, value) in SECURITY_HEADERS {
        headers.insert(name, header::HeaderValue::from_static(value));
    }
    response
}

/// Sent with every answer: no type sniffing, no framing by another site
/// (its buttons under a decoy page), and the page runs only its own script.
const SECURITY_HEADERS: [(header::HeaderName, &str); 3] = [
    (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
    (header::X_FRAME_OPTIONS, "DENY"),
    (
        header::CONTENT_SECURITY_POLICY,
        "default-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    ),
];

fn loopback_host(headers: &HeaderMap) -> ApiResult<()> {
    // HTTP/1.0 clients may send no Host; a browser always does.
    let Some(host) = headers.get(header::HOST) else {
        return Ok(());
    };
    let host = String::from_utf8_lossy(host.as_bytes());
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or_default(),
        None => host.rsplit_once(':').map_or(&*host, |(name, _port)| name),
    };
    let loopback =
        name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
    if loopback {
        Ok(())
    } else {
        Err(ApiError {
            status: StatusCode::FORBIDDEN,
            message: format!("host {host:?} is not this tracker's: open it at its loopback address"),
        })
    }
}

fn json_body_declared(method: &Method, headers: &HeaderMap) -> ApiResult<()> {
    if matches!(*method, Method::GET | Method::HEAD | Method::DELETE | Method::OPTIONS) {
        return Ok(());
    }
    let declared = headers
        .get(header::CONTENT_TYPE)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let media_type = declared.as_deref().and_then(|v| v.split(';').next()).map(str::trim);
    if media_type.is_some_and(|m| m.eq_ignore_ascii_case("application/json")) {
        return Ok(());
    }
    Err(ApiError {
        status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
        message: match declared {
            Some(d) => format!("a request body must be application/json, not {d:?}"),
            None => "a request body must be application/json: no content-type was given".to_owned(),
        },
    })
}

async fn index() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], INDEX_HTML)
}

async fn css() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], APP_CSS)
}

async fn js() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/javascript; charset=utf-8")], APP_JS)
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such endpoint")
}

/// Parse a JSON body, refusing unknown fields and wrong types with a
/// message.
fn parse<T: DeserializeOwned>(body: &Bytes) -> ApiResult<T> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad(format!("malformed body: {e}")))
}

fn new_id() -> ApiResult<String> {
    let mut bytes = [0u8; 8];
    getrandom::getrandom(&mut bytes).map_err(|e| ApiError {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        message: format!("no random id: {e}"),
    })?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn now_text() -> String {
    crate::now_text()
}

/// A text field: trimmed (when `trim`), not empty (when `required`), at
/// most `max` characters.
fn text_field(name: &str, value: &str, max: usize, required: bool) -> ApiResult<String> {
    let value = value.trim();
    if required && value.is_empty() {
        return Err(ApiError::bad(format!("the {name} must not be empty")));
    }
    let chars = value.chars().count();
    if chars > max {
        return Err(ApiError::bad(format!(
            "the {name} is too long: {chars} characters, at most {max}"
        )));
    }
    Ok(value.to_owned())
}

fn status_field(value: &str) -> ApiResult<String> {
    if STATUSES.contains(&value) {
        Ok(value.to_owned())
    } else {
        Err(ApiError::bad(format!(
            "unknown status {value:?}: one of {}",
            STATUSES.join(", ")
        )))
    }
}

fn rows(tracker: &Tracker, query: &Query) -> ApiResult<Vec<JsonValue>> {
    Ok(tracker.db.query(query)?.rows.iter().map(row_json).collect())
}

fn children(tracker: &Tracker, table: &str, ticket_id: &str) -> ApiResult<Vec<JsonValue>> {
    rows(
        tracker,
        &Query::from(table)
            .filter(col("ticket_id").eq(ticket_id))
            .order_by(col("id"), Order::Asc),
    )
}

async fn status(State(t): AppState) -> Json<JsonValue> {
    Json(t.status_json())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SyncSwitch {
    offline: bool,
}

async fn set_sync(State(t): AppState, body: Bytes) -> ApiResult {
    let switch: SyncSwitch = parse(&body)?;
    t.set_offline(switch.offline).await;
    Ok(Json(t.status_json()))
}

async fn users(State(t): AppState) -> ApiResult {
    Ok(Json(json!(rows(
        &t,
        &Query::from("app_user").order_by(col("id"), Order::Asc)
    )?)))
}

async fn outcomes(State(t): AppState) -> Json<JsonValue> {
    Json(json!(t.outcomes()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListParams {
    status: Option<String>,
}

async fn list_tickets(
    State(t): AppState,
    params: Result<UrlQuery<ListParams>, axum::extract::rejection::QueryRejection>,
) -> ApiResult {
    let UrlQuery(params) = params.map_err(|e| ApiError::bad(e.body_text()))?;
    let mut query = Query::from("tickets");
    match params.status.as_deref() {
        None | Some("" | "all") => {}
        Some(s) => query = query.filter(col("status").eq(status_field(s)?)),
    }
    let query = query
        .order_by(col("updated_at"), Order::Desc)
        .order_by(col("id"), Order::Asc);
    Ok(Json(json!(rows(&t, &query)?)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewTicket {
    title: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    status: Option<String>,
}

async fn create_ticket(State(t): AppState, body: Bytes) -> ApiResult<(StatusCode, Json<JsonValue>)> {
    let new: NewTicket = parse(&body)?;
    let title = text_field("title", &new.title, MAX_TITLE_CHARS, true)?;
    let description = text_field("description", &new.description, MAX_DESCRIPTION_CHARS, false)?;
    let status = status_field(new.status.as_deref().unwrap_or("pending"))?;
    let id = new_id()?;
    let now = now_text();
    let mut row = row_data([
        ("title", Value::from(title.as_str())),
        ("description", Value::from(description.as_str())),
        ("status", Value::from(status.as_str())),
        ("created_at", Value::from(now.as_str())),
        ("updated_at", Value::from(now.as_str())),
        ("version", Value::from(0)),
    ]);
    if t.crdt_description {
        row.insert(DESCRIPTION_DOC.into(), Value::Blob(crdt::new_text_doc(&description)));
    }
    t.write(&format!("created ticket \u{201c}{title}\u{201d}"), |tx| {
        tx.insert("tickets", &id, row)
    })
    .map_err(ApiError::from)?;
    Ok((StatusCode::CREATED, Json(json!({ "id": id }))))
}

async fn get_ticket(State(t): AppState, Path(id): Path<String>) -> ApiResult {
    let ticket = rows(&t, &Query::from("tickets").filter(col("id").eq(id.as_str())))?
        .into_iter()
        .next()
        .ok_or_else(|| ApiError::not_found(format!("no ticket {id:?}")))?;
    Ok(Json(json!({
        "ticket": ticket,
        "assignments": children(&t, "assignments", &id)?,
        "comments": children(&t, "comments", &id)?,
        "attachments": children(&t, "attachments", &id)?,
        "activity": rows(&t, &Query::from("activity")
            .filter(col("table_name").eq("tickets").and(col("row_id").eq(id.as_str())))
            .order_by(col("created_at"), Order::Asc))?,
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TicketEdit {
    title: Option<String>,
    description: Option<String>,
    status: Option<String>,
}

async fn edit_ticket(State(t): AppState, Path(id): Path<String>, body: Bytes) -> ApiResult {
    let edit: TicketEdit = parse(&body)?;
    let mut changes = RowData::new();
    let mut what = Vec::new();
    if let Some(title) = &edit.title {
        changes.insert(
            "title".into(),
            Value::from(text_field("title", title, MAX_TITLE_CHARS, true)?),
        );
        what.push("title");
    }
    if let Some(description) = &edit.description {
        changes.insert(
            "description".into(),
            Value::from(text_field("description", description, MAX_DESCRIPTION_CHARS, false)?),
        );
        what.push("description");
    }
    if let Some(status) = &edit.status {
        changes.insert("status".into(), Value::from(status_field(status)?));
        what.push("status");
    }
    if changes.is_empty() {
        return Err(ApiError::bad("nothing to change: give a title, description or status"));
    }
    let Some(current) = t.db.local().get("tickets", &id)? else {
        return Err(ApiError::not_found(format!("no ticket {id:?}")));
    };
    let label = match current.get("title") {
        Some(Value::Text(title)) => format!("edited {} of \u{201c}{title}\u{201d}", what.join(", ")),
        _ => format!("edited {} of ticket {id}", what.join(", ")),
    };
    t.write(&label, |tx| {
        if tx.get("tickets", &id)?.is_none() {
            return Err(ApiError::not_found(format!("no ticket {id:?}")));
        }
        // Only what differs is queued (`update` compares), so an unchanged
        // save queues nothing; `updated_at` moves only with a real change.
        let current = tx.get("tickets", &id)?.unwrap_or_default();
        let mut changes = changes;
        if t.crdt_description {
            edit_description_doc(&t, &current, &mut changes)?;
        }
        let real: RowData = changes.into_iter().filter(|(k, v)| current.get(k) != Some(v)).collect();
        if real.is_empty() {
            return Ok(());
        }
        let mut real = real;
        real.insert("updated_at".into(), Value::from(now_text()));
        tx.update("tickets", &id, real)?;
        Ok(())
    })?;
    Ok(Json(json!({ "id": id })))
}

/// CRDT descriptions: turn a new description into an edit of the ticket's
/// automerge document (a minimal diff of its text, so a concurrent edit of
/// another part survives the server's merge), or drop it when the
/// document already reads so.
fn edit_description_doc(t: &Tracker, current: &RowData, changes: &mut RowData) -> ApiResult<()> {
    let Some(Value::Text(text)) = changes.get("description").cloned() else {
        return Ok(());
    };
    let doc_error = |e: ferry_conflict::ConflictError| ApiError {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        message: format!("the description document: {e}"),
    };
    let doc = match current.get(DESCRIPTION_DOC) {
        Some(Value::Blob(doc)) => doc.clone(),
        _ => crdt::new_text_doc(current.get("description").and_then(Value::as_text).unwrap_or_default()),
    };
    if crdt::read_text(&doc).map_err(doc_error)? == text {
        changes.remove("description");
        return Ok(());
    }
    let edited = crdt::edit_text(&doc, t.db.client_id(), |e| {
        e.replace(&text);
    })
    .map_err(doc_error)?;
    changes.insert(DESCRIPTION_DOC.into(), Value::Blob(edited));
    Ok(())
}

async fn delete_ticket(State(t): AppState, Path(id): Path<String>) -> ApiResult {
    let label = match t.db.local().get("tickets", &id)?.and_then(|mut r| r.remove("title")) {
        Some(Value::Text(title)) => format!("deleted \u{201c}{title}\u{201d}"),
        _ => format!("deleted ticket {id}"),
    };
    t.write(&label, |tx| {
        if tx.get("tickets", &id)?.is_none() {
            return Err(ApiError::not_found(format!("no ticket {id:?}")));
        }
        tx.delete("tickets", &id)?;
        Ok(())
    })?;
    Ok(Json(json!({ "id": id })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewAssignment {
    user_id: String,
}

async fn add_assignment(
    State(t): AppState,
    Path(ticket): Path<String>,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<JsonValue>)> {
    let new: NewAssignment = parse(&body)?;
    let user = text_field("user", &new.user_id, 64, true)?;
    if t.db.local().get("app_user", &user)?.is_none() {
        return Err(ApiError::bad(format!("unknown user {user:?}")));
    }
    let id = new_id()?;
    t.write(&format!("assigned {user} to ticket {ticket}"), |tx| {
        if tx.get("tickets", &ticket)?.is_none() {
            return Err(ApiError::not_found(format!("no ticket {ticket:?}")));
        }
        tx.insert(
            "assignments",
            &id,
            row_data([
                ("ticket_id", Value::from(ticket.as_str())),
                ("user_id", Value::from(user.as_str())),
                ("created_at", Value::from(now_text())),
            ]),
        )?;
        Ok(())
    })?;
    Ok((StatusCode::CREATED, Json(json!({ "id": id }))))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewComment {
    body: String,
}

async fn add_comment(
    State(t): AppState,
    Path(ticket): Path<String>,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<JsonValue>)> {
    let new: NewComment = parse(&body)?;
    let text = text_field("comment", &new.body, MAX_COMMENT_CHARS, true)?;
    let id = new_id()?;
    t.write(&format!("commented on ticket {ticket}"), |tx| {
        if tx.get("tickets", &ticket)?.is_none() {
            return Err(ApiError::not_found(format!("no ticket {ticket:?}")));
        }
        tx.insert(
            "comments",
            &id,
            row_data([
                ("ticket_id", Value::from(ticket.as_str())),
                ("user_id", Value::from(t.user.as_str())),
                ("body", Value::from(text.as_str())),
                ("created_at", Value::from(now_text())),
            ]),
        )?;
        Ok(())
    })?;
    Ok((StatusCode::CREATED, Json(json!({ "id": id }))))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewAttachment {
    url: String,
}

async fn add_attachment(
    State(t): AppState,
    Path(ticket): Path<String>,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<JsonValue>)> {
    let new: NewAttachment = parse(&body)?;
    let url = text_field("URL", &new.url, MAX_URL_CHARS, true)?;
    if !(url.starts_with("http://") || url.starts_with("https://")) || url.contains(char::is_whitespace) {
        return Err(ApiError::bad(format!(
            "not a web address: {url:?} (it must start with http:// or https://)"
        )));
    }
    let id = new_id()?;
    t.write(&format!("attached a link to ticket {ticket}"), |tx| {
        if tx.get("tickets", &ticket)?.is_none() {
            return Err(ApiError::not_found(format!("no ticket {ticket:?}")));
        }
        tx.insert(
            "attachments",
            &id,
            row_data([
                ("ticket_id", Value::from(ticket.as_str())),
                ("url", Value::from(url.as_str())),
                ("created_at", Value::from(now_text())),
            ]),
        )?;
        Ok(())
    })?;
    Ok((StatusCode::CREATED, Json(json!({ "id": id }))))
}

fn remove_row(t: &Tracker, table: &str, what: &str, id: &str) -> ApiResult {
    t.write(&format!("removed {what} {id}"), |tx| {
        let Some(row) = tx.get(table, id)? else {
            return Err(ApiError::not_found(format!("no {what} {id:?}")));
        };
        if table == "comments" && row.get("user_id") != Some(&Value::from(t.user.as_str())) {
            return Err(ApiError {
                status: StatusCode::FORBIDDEN,
                message: "only its author removes a comment".into(),
            });
        }
        tx.delete(table, id)?;
        Ok(())
    })?;
    Ok(Json(json!({ "id": id })))
}

async fn remove_assignment(State(t): AppState, Path(id): Path<String>) -> ApiResult {
    remove_row(&t, "assignments", "assignment", &id)
}

async fn remove_comment(State(t): AppState, Path(id): Path<String>) -> ApiResult {
    remove_row(&t, "comments", "comment", &id)
}

async fn remove_attachment(State(t): AppState, Path(id): Path<String>) -> ApiResult {
    remove_row(&t, "attachments", "attachment", &id)
}

fn conflict_json(c: &ferry_client::Conflict) -> JsonValue {
    json!({
        "id": c.id,
        "table": c.table,
        "row_id": c.row_id,
        "field": c.field,
        "local": c.local,
        "server": c.server,
        "base": c.base,
        "user_id": c.user_id,
        "status": c.status,
        "resolution": c.resolution,
        "created_at": c.created_at,
    })
}

async fn conflicts(State(t): AppState) -> ApiResult {
    let all: Vec<JsonValue> = t.db.conflicts()?.iter().map(conflict_json).collect();
    Ok(Json(json!(all)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Resolve {
    /// `local`, `server` or `custom`.
    choice: String,
    value: Option<String>,
}

async fn resolve_conflict(State(t): AppState, Path(id): Path<String>, body: Bytes) -> ApiResult {
    let r: Resolve = parse(&body)?;
    let resolution = match (r.choice.as_str(), r.value) {
        ("local", None) => Resolution::Local,
        ("server", None) => Resolution::Server,
        ("custom", Some(v)) => Resolution::Custom(Value::from(text_field("value", &v, MAX_DESCRIPTION_CHARS, false)?)),
        ("custom", None) => return Err(ApiError::bad("a custom resolution needs a value")),
        (other, _) => {
            return Err(ApiError::bad(format!(
                "unknown choice {other:?}: local, server or custom (with a value)"
            )))
        }
    };
    let Some(conflict) = t.db.conflict(&id)? else {
        return Err(ApiError::not_found(format!("no conflict {id:?}")));
    };
    if conflict.user_id != t.user {
        return Err(ApiError {
            status: StatusCode::FORBIDDEN,
            message: format!(
                "conflict {id:?} is {}'s to resolve: only the user whose change conflicted decides",
                conflict.user_id
            ),
        });
    }
    if !conflict.is_open() {
        return Err(ApiError {
            status: StatusCode::CONFLICT,
            message: format!("conflict {id:?} is already {}", conflict.status),
        });
    }
    let before = t.db.local().last_seq();
    let value = t.db.resolve_conflict(&id, resolution)?;
    t.label_range(
        before,
        &format!("resolved conflict on {}.{}", conflict.row_id, conflict.field),
    );
    Ok(Json(json!({ "id": id, "value": value })))
}

fn sse(e: &Event) -> SseEvent {
    SseEvent::default().event(e.name).data(e.data.to_string())
}

/// The page's event stream: first a `snapshot` of everything, then every
/// live query diff (`rows`), `status` and `outcome` as they happen. A
/// page too slow to keep up gets `resync` and reconnects for a fresh
/// snapshot.
async fn events(State(t): AppState) -> ApiResult<impl IntoResponse> {
    // Subscribe before reading the snapshot: a change in between arrives
    // again as a diff, which the page applies idempotently.
    let rx = t.subscribe();
    let first = Event {
        name: "snapshot",
        data: t.snapshot()?,
    };
    let stream = futures_util::stream::unfold((rx, Some(first)), |(mut rx, first)| async move {
        if let Some(e) = first {
            return Some((Ok::<_, Infallible>(sse(&e)), (rx, None)));
        }
        match rx.recv().await {
            Ok(e) => Some((Ok(sse(&e)), (rx, None))),
            Err(RecvError::Lagged(_)) => Some((Ok(SseEvent::default().event("resync").data("{}")), (rx, None))),
            Err(RecvError::Closed) => None,
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}
