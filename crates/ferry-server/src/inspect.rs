//! `ferry-server inspect`: the admin diagnostics of a running server,
//! read over HTTP with the admin token (so it works for a remote server
//! and any source database), printed for an operator.

use std::fmt::Write as _;
use std::time::Duration;

use ferry_protocol::Outcome;
use serde::de::DeserializeOwned;

use crate::admin::{AdminErrorBody, BucketInfo, BucketsAnswer, ClientAnswer, UserBucketsAnswer};
use crate::error::{Result, ServiceError};

/// What to inspect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Inspect {
    /// Every bucket (a page of them).
    Buckets {
        /// Buckets after this name.
        after: Option<String>,
        /// Most buckets.
        limit: Option<usize>,
    },
    /// A user's buckets.
    User {
        /// The user id.
        user_id: String,
        /// Extra claims, `(name, value)`.
        claims: Vec<(String, String)>,
        /// Most buckets.
        limit: Option<usize>,
    },
    /// A client's progress and stored outcomes.
    Client {
        /// The client id.
        client_id: String,
        /// Outcomes after this seq.
        after_seq: Option<u64>,
        /// Most outcomes.
        limit: Option<usize>,
    },
    /// The metrics as the server renders them.
    Metrics,
}

/// Percent-encode one path segment or query value.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

impl Inspect {
    /// The path and query of the admin route.
    pub fn path(&self) -> String {
        let mut query: Vec<String> = Vec::new();
        let path = match self {
            Inspect::Buckets { after, limit } => {
                if let Some(a) = after {
                    query.push(format!("after={}", encode(a)));
                }
                if let Some(l) = limit {
                    query.push(format!("limit={l}"));
                }
                "/admin/buckets".to_owned()
            }
            Inspect::User { user_id, claims, limit } => {
                for (k, v) in claims {
                    query.push(format!("claim.{}={}", encode(k), encode(v)));
                }
                if let Some(l) = limit {
                    query.push(format!("limit={l}"));
                }
                format!("/admin/users/{}/buckets", encode(user_id))
            }
            Inspect::Client {
                client_id,
                after_seq,
                limit,
            } => {
                if let Some(a) = after_seq {
                    query.push(format!("after_seq={a}"));
                }
                if let Some(l) = limit {
                    query.push(format!("limit={l}"));
                }
                format!("/admin/clients/{}", encode(client_id))
            }
            Inspect::Metrics => "/metrics".to_owned(),
        };
        if query.is_empty() {
            path
        } else {
            format!("{path}?{}", query.join("&"))
        }
    }
}

/// Ask the server at `base_url` (`http://host:port`) with the admin
/// token; the answer's body as text. A refusal is an error with the
/// server's message.
pub async fn fetch(base_url: &str, admin_token: &str, what: &Inspect) -> Result<String> {
    let url = format!("{}{}", base_url.trim_end_matches('/'), what.path());
    let io = |e: &dyn std::fmt::Display| ServiceError::Io {
        path: url.clone(),
        message: e.to_string(),
    };
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| io(&e))?;
    let response = client
        .get(&url)
        .bearer_auth(admin_token)
        .send()
        .await
        .map_err(|e| io(&e))?;
    let status = response.status();
    let body = response.text().await.map_err(|e| io(&e))?;
    if status.is_success() {
        return Ok(body);
    }
    let message = serde_json::from_str::<AdminErrorBody>(&body)
        .map(|b| b.message)
        .unwrap_or(body);
    let message = format!("{url} answered {status}: {message}");
    Err(match status.as_u16() {
        401 | 403 => ServiceError::Unauthorized(message),
        _ => ServiceError::BadRequest(message),
    })
}

fn parse<T: DeserializeOwned>(body: &str) -> Result<T> {
    serde_json::from_str(body).map_err(|e| ServiceError::BadRequest(format!("the server's answer does not parse: {e}")))
}

fn bucket_table(out: &mut String, buckets: &[BucketInfo]) {
    let width = buckets.iter().map(|b| b.bucket.len()).max().unwrap_or(0).max(6);
    let _ = writeln!(out, "{:<width$}  {:>10}  {:>10}", "bucket", "ops", "checksum");
    for b in buckets {
        let _ = writeln!(out, "{:<width$}  {:>10}  {:>10}", b.bucket, b.op_count, b.checksum);
    }
}

fn outcome_text(o: &Outcome) -> String {
    match o {
        Outcome::Applied => "applied".to_owned(),
        Outcome::Merged { reason, .. } => format!("merged: {reason}"),
        Outcome::Rejected { reason } => format!("rejected: {reason}"),
        Outcome::NeedsReview { conflict_id } => format!("needs_review: {conflict_id}"),
    }
}

/// An answer as text for an operator.
pub fn render(what: &Inspect, body: &str) -> Result<String> {
    let mut out = String::new();
    match what {
        Inspect::Metrics => out.push_str(body),
        Inspect::Buckets { .. } => {
            let a: BucketsAnswer = parse(body)?;
            let _ = writeln!(out, "last op id {}; {} buckets", a.last_op_id, a.buckets.len());
            bucket_table(&mut out, &a.buckets);
            if let Some(next) = a.next_after {
                let _ = writeln!(out, "more: --after {next}");
            }
        }
        Inspect::User { .. } => {
            let a: UserBucketsAnswer = parse(body)?;
            let _ = writeln!(
                out,
                "user {}; last op id {}; {} buckets{}",
                a.user_id,
                a.last_op_id,
                a.buckets.len(),
                if a.truncated { " (more past the limit)" } else { "" }
            );
            bucket_table(&mut out, &a.buckets);
        }
        Inspect::Client { .. } => {
            let a: ClientAnswer = parse(body)?;
            let _ = writeln!(out, "client {}", a.client_id);
            let _ = writeln!(out, "user {}", a.user_id);
            let _ = writeln!(out, "last seq {}", a.last_seq);
            let _ = writeln!(out, "{} stored outcomes", a.outcomes.len());
            for o in &a.outcomes {
                let _ = writeln!(out, "  seq {:>8}  {}", o.seq, outcome_text(&o.outcome));
            }
            if let Some(next) = a.next_after_seq {
                let _ = writeln!(out, "more: --after-seq {next}");
            }
        }
    }
    Ok(out)
}
