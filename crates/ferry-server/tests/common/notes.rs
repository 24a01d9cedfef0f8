//! A notes table for fan-out tests: each note is in its owner's bucket
//! and its team's; a token's `teams` claim (an array) gives its user one
//! bucket per team.

use ferry_core::{CrudOp, Value};
use ferry_server::mint_token;

use super::{put, SECRET};

/// Notes in their owner's bucket and in their team's; a token's `teams`
/// claim (an array) gives its user one bucket per team.
pub const RULES: &str = r#"
[[tables]]
name = "notes"
columns = [{ name = "owner", type = "text" }, { name = "team", type = "text" }, { name = "body", type = "text" }]

[[buckets]]
name = "mine"
parameters = ["sub"]
data = [{ table = "notes", where = { owner = "sub" } }]

[[buckets]]
name = "team"
parameters = ["teams"]
data = [{ table = "notes", where = { team = "teams" } }]

[[permissions]]
table = "notes"
insert = "true"
update = "true"
delete = "true"
"#;

pub fn token_with(user: &str, teams: &[String]) -> String {
    let mut claims = serde_json::Map::new();
    if !teams.is_empty() {
        claims.insert("teams".into(), serde_json::json!(teams));
    }
    mint_token(SECRET, user, 3600, &claims)
}

pub fn note(owner: &str, team: &str, body: &str) -> Vec<(&'static str, Value)> {
    vec![
        ("owner", Value::from(owner)),
        ("team", Value::from(team)),
        ("body", Value::from(body)),
    ]
}

pub fn put_note(id: &str, owner: &str, team: &str, body: &str) -> CrudOp {
    put("notes", id, &note(owner, team, body))
}
