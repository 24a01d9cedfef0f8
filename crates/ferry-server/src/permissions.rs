//! Write permissions: which client writes the server accepts, per table
//! and operation (the `[[permissions]]` entries of the sync rules; syntax
//! in the crate README, "Write permissions"; decision in
//! `docs/adr/0007-write-permissions.md`).
//!
//! A rule is a condition over the row before the write (`old.<column>`),
//! the row after it (`new.<column>`: the stored row with the op applied,
//! before any conflict strategy) and the uploader's token claims
//! (`auth.<claim>`, `auth.sub` being the user id):
//!
//! ```text
//! condition := or
//! or        := and ("or" and)*
//! and       := unary ("and" unary)*
//! unary     := "not" unary | "(" condition ")" | "true" | "false" | test
//! test      := operand ("==" | "!=") operand
//!            | operand ["not"] "in" "[" [operand ("," operand)*] "]"
//!            | operand "is" ["not"] "null"
//!            | operand ["not"] "starts" "with" operand
//! operand   := ("old" | "new") "." column | "auth" "." claim
//!            | 'text' | "text" | integer | real | true | false | null
//! ```
//!
//! Comparisons follow SQL: `==`, `!=` and `in` are false when a side is
//! NULL (test for NULL with `is null`); integers and reals compare as
//! numbers; `true`/`false` are the integers 1/0; `starts with` holds when
//! both sides are text and the left begins with the right (case matters),
//! so a rule can keep a URL column to `https://` addresses. A condition is parsed
//! when the rules load (the parser is total: every input is a condition
//! or an error naming the bad token and its byte offset) and is bounded
//! by [`MAX_CONDITION_BYTES`] and [`MAX_CONDITION_DEPTH_LEVELS`].
//!
//! Tables with no rule for an operation refuse it. Two tables are the
//! server's: `activity` is never written by clients, and a
//! `ferry_conflicts` row may only be updated by the user it belongs to
//! (`user_id`), changing nothing but `status` and `resolution` (what
//! `ferry_client::Database::resolve_conflict` writes).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use ferry_core::{RowData, Table, Value};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Longest condition accepted, in bytes of its source text.
pub const MAX_CONDITION_BYTES: usize = 4096;

/// Deepest nesting of a condition, in levels: each `not` and each
/// parenthesised group is one level.
pub const MAX_CONDITION_DEPTH_LEVELS: usize = 32;

/// The table of conflict records (see `ferry_conflict::Manual`).
pub const CONFLICTS_TABLE: &str = "ferry_conflicts";
/// The activity log (see `ferry_conflict::Audited`).
pub const ACTIVITY_TABLE: &str = "activity";
/// The columns of a conflict record its user may change.
pub const CONFLICT_RESOLUTION_COLUMNS: [&str; 2] = ["status", "resolution"];

/// A write operation, as rules name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum WriteOp {
    /// A row that has no stored values yet (never written, or deleted).
    Insert,
    /// A row with stored values, by PUT or PATCH.
    Update,
    /// A DELETE.
    Delete,
}

impl WriteOp {
    /// Every operation, in order.
    pub const ALL: [WriteOp; 3] = [WriteOp::Insert, WriteOp::Update, WriteOp::Delete];

    /// Its name in the rules (`insert`, `update`, `delete`).
    pub fn name(self) -> &'static str {
        match self {
            WriteOp::Insert => "insert",
            WriteOp::Update => "update",
            WriteOp::Delete => "delete",
        }
    }
}

impl fmt::Display for WriteOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A condition that does not parse, or names what the table does not have.
#[derive(Clone, Debug, Error, PartialEq)]
pub enum ConditionError {
    /// The source text is over [`MAX_CONDITION_BYTES`].
    #[error("condition is {bytes} bytes, over the limit of {max_bytes} bytes")]
    TooLong {
        /// Its length.
        bytes: usize,
        /// The limit.
        max_bytes: usize,
    },
    /// It nests deeper than [`MAX_CONDITION_DEPTH_LEVELS`].
    #[error("condition nests deeper than {max_levels} levels at byte {at}")]
    TooDeep {
        /// Byte offset of the level too many.
        at: usize,
        /// The limit.
        max_levels: usize,
    },
    /// A token where another was expected.
    #[error("unexpected {found} at byte {at}, expected {expected}")]
    Unexpected {
        /// The token found (quoted), or `end of condition`.
        found: String,
        /// Byte offset.
        at: usize,
        /// What would have been accepted.
        expected: &'static str,
    },
    /// A character that starts no token.
    #[error("unexpected character {found:?} at byte {at}")]
    BadCharacter {
        /// The character.
        found: char,
        /// Byte offset.
        at: usize,
    },
    /// A string literal without its closing quote.
    #[error("unterminated string starting at byte {at}")]
    UnterminatedString {
        /// Byte offset of the opening quote.
        at: usize,
    },
    /// A number that does not fit.
    #[error("bad number {text:?} at byte {at}")]
    BadNumber {
        /// The number as written.
        text: String,
        /// Byte offset.
        at: usize,
    },
    /// A name that is no row or claims reference.
    #[error("unknown name {name:?} at byte {at}, expected old.<column>, new.<column>, auth.<claim> or a literal")]
    UnknownName {
        /// The name.
        name: String,
        /// Byte offset.
        at: usize,
    },
    /// `old.x` / `new.x` with `x` not a column of the table (nor `id`).
    #[error("unknown column {column:?} in {row}.{column} at byte {at}: table {table:?} has no such column")]
    UnknownColumn {
        /// `old` or `new`.
        row: &'static str,
        /// The column.
        column: String,
        /// The table.
        table: String,
        /// Byte offset.
        at: usize,
    },
    /// `old.x` in an insert rule or `new.x` in a delete rule.
    #[error("{row}.{column} at byte {at}: {op} rules have no {row} row")]
    NoSuchRow {
        /// `old` or `new`.
        row: &'static str,
        /// The column.
        column: String,
        /// The operation of the rule.
        op: WriteOp,
        /// Byte offset.
        at: usize,
    },
}

/// A `[[permissions]]` entry that cannot be used.
#[derive(Clone, Debug, Error, PartialEq)]
pub enum PermissionsError {
    /// The entry names a table the schema does not have.
    #[error("permissions name unknown table {0:?}")]
    UnknownTable(String),
    /// Two entries for one table.
    #[error("table {0:?} has more than one [[permissions]] entry")]
    Duplicate(String),
    /// An entry for a table only the server writes.
    #[error(
        "table {0:?} is written by the server only: it takes no [[permissions]] entry (a conflict's own user \
         may update its status and resolution; activity rows are never written by clients)"
    )]
    ServerTable(String),
    /// A server-managed column the table does not have.
    #[error("permissions of table {table:?}: unknown server column {column:?}")]
    UnknownServerColumn {
        /// The table.
        table: String,
        /// The column.
        column: String,
    },
    /// A rule that does not parse.
    #[error("permissions of table {table:?}, {op} rule {source_text:?}: {error}")]
    Condition {
        /// The table.
        table: String,
        /// The rule's operation.
        op: WriteOp,
        /// The rule as written.
        source_text: String,
        /// What is wrong with it.
        error: ConditionError,
    },
}

/// One `[[permissions]]` entry as written in the rules file.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PermissionDef {
    /// The table.
    pub table: String,
    /// Condition a client insert must meet; none: inserts are refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub insert: Option<String>,
    /// Condition a client update must meet; none: updates are refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update: Option<String>,
    /// Condition a client delete must meet; none: deletes are refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delete: Option<String>,
    /// Columns only the server writes (strategies, imports): a client op
    /// that names one, or would change its stored value, is refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub server_columns: Vec<String>,
    /// Inserts and updates must leave the row only in buckets the user
    /// reads: every bucket instance of the new row is one of theirs.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub new_in_my_buckets: bool,
}

/// A parsed rule: its condition and its text.
#[derive(Clone, Debug, PartialEq)]
pub struct Rule {
    source: String,
    cond: Cond,
}

impl Rule {
    /// Parse `source` as a rule for `op` on `table`.
    pub fn parse(source: &str, table: &Table, op: WriteOp) -> Result<Rule, ConditionError> {
        let cond = parse_condition(source, table, op)?;
        Ok(Rule {
            source: source.to_owned(),
            cond,
        })
    }

    /// The rule as written.
    pub fn source(&self) -> &str {
        &self.source
    }
}

/// The write permissions of one table.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TablePermissions {
    rules: BTreeMap<WriteOp, Rule>,
    server_columns: BTreeSet<String>,
    new_in_my_buckets: bool,
}

impl TablePermissions {
    /// Whether a client's writes must leave the row only in buckets the
    /// client reads (`new_in_my_buckets`).
    pub fn new_in_my_buckets(&self) -> bool {
        self.new_in_my_buckets
    }

    /// Parse a `[[permissions]]` entry against its table.
    pub fn new(def: &PermissionDef, table: &Table) -> Result<Self, PermissionsError> {
        let mut rules = BTreeMap::new();
        for (op, text) in [
            (WriteOp::Insert, &def.insert),
            (WriteOp::Update, &def.update),
            (WriteOp::Delete, &def.delete),
        ] {
            let Some(text) = text else { continue };
            let rule = Rule::parse(text, table, op).map_err(|error| PermissionsError::Condition {
                table: table.name.clone(),
                op,
                source_text: shortened(text),
                error,
            })?;
            rules.insert(op, rule);
        }
        let mut server_columns = BTreeSet::new();
        for c in &def.server_columns {
            if table.column_def(c).is_none() {
                return Err(PermissionsError::UnknownServerColumn {
                    table: table.name.clone(),
                    column: c.clone(),
                });
            }
            server_columns.insert(c.clone());
        }
        Ok(TablePermissions {
            rules,
            server_columns,
            new_in_my_buckets: def.new_in_my_buckets,
        })
    }

    /// The operations clients may attempt (those with a rule).
    pub fn operations(&self) -> impl Iterator<Item = WriteOp> + '_ {
        self.rules.keys().copied()
    }
}

/// Most bytes of a rule's text quoted in a message.
const SHOWN_RULE_BYTES: usize = 200;

/// A rule's text in a message: at most [`SHOWN_RULE_BYTES`] of it (cut at
/// a character boundary), then `...`.
fn shortened(text: &str) -> String {
    const SHOWN_BYTES: usize = SHOWN_RULE_BYTES;
    if text.len() <= SHOWN_BYTES {
        return text.to_owned();
    }
    let mut end = SHOWN_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

/// Who writes: the claims of the uploader's token and their buckets.
#[derive(Clone, Copy, Debug)]
pub struct Writer<'a> {
    /// The user id (`sub`).
    pub user_id: &'a str,
    /// Every claim of the token.
    pub claims: &'a serde_json::Map<String, serde_json::Value>,
    /// The bucket instances the user reads.
    pub buckets: &'a BTreeSet<String>,
}

/// One client write, as the rules see it.
#[derive(Clone, Copy, Debug)]
pub struct WriteRequest<'a> {
    /// The table.
    pub table: &'a str,
    /// The row id.
    pub id: &'a str,
    /// Insert, update or delete.
    pub op: WriteOp,
    /// The stored values before the write (none for an insert; none for a
    /// delete of a row that has no stored values).
    pub old: Option<&'a RowData>,
    /// The values after it: the stored row with the op applied (none for a
    /// delete).
    pub new: Option<&'a RowData>,
    /// The columns the op itself names (a PUT's or PATCH's data as sent).
    pub sent: Option<&'a RowData>,
    /// The bucket instances the new row belongs to.
    pub new_buckets: &'a BTreeSet<String>,
    /// The stored row is one the writer cannot read: a reason names no
    /// bucket its values place the row in.
    pub old_hidden: bool,
}

/// Decide a client write against the table's permissions (`None`: the
/// table has no `[[permissions]]` entry). `Err` is the outcome's reason,
/// `permission denied: <op> on <table>/<id>: ...`.
pub fn check(perms: Option<&TablePermissions>, w: &WriteRequest<'_>, who: &Writer<'_>) -> Result<(), String> {
    judge(perms, w, who).map_err(|why| format!("permission denied: {} on {}/{}: {why}", w.op, w.table, w.id))
}

/// Why the rules refuse `w` (`Err`), without the reason's prefix.
fn judge(perms: Option<&TablePermissions>, w: &WriteRequest<'_>, who: &Writer<'_>) -> Result<(), String> {
    let denied = Err;
    if w.table == ACTIVITY_TABLE {
        return denied(format!("table {ACTIVITY_TABLE:?} is written by the server only"));
    }
    if w.table == CONFLICTS_TABLE {
        return check_conflict_resolution(w, who).or_else(denied);
    }
    let Some(perms) = perms else {
        return denied(format!(
            "table {:?} has no write permissions (no {} rule)",
            w.table, w.op
        ));
    };
    if w.op != WriteOp::Delete {
        for c in &perms.server_columns {
            let named = w.sent.is_some_and(|s| s.contains_key(c));
            if named || column(w.old, c) != column(w.new, c) {
                return denied(format!("column {c:?} is written by the server only"));
            }
        }
    }
    let Some(rule) = perms.rules.get(&w.op) else {
        return denied(format!("table {:?} has no {} rule", w.table, w.op));
    };
    let env = Env {
        id: w.id,
        old: w.old,
        new: w.new,
        who,
    };
    if !env.eval(&rule.cond) {
        return denied(format!("rule `{}` is not met", shortened(&rule.source)));
    }
    if let Some(why) = escaped_bucket(perms, w, w.new_buckets, who) {
        return denied(why);
    }
    Ok(())
}

/// After the conflict strategy: the row a client insert or update leaves
/// (`w.new`, in the buckets `w.new_buckets`) must meet the rules like the
/// row as sent ([`check`]): the operation's condition, server columns
/// and `new_in_my_buckets`. A strategy may keep stored values over sent
/// ones (last-write-wins keeps a stored column with a newer clock, manual
/// resolution a conflicting one, a CRDT merges text), so the row written
/// can fail a condition the row as sent met: `new.assignee == auth.sub or
/// new.status == 'open'` passes a write that sets both, and the merge can
/// keep another user's assignee with the new status. `Err` is the
/// outcome's reason.
pub fn check_written(perms: Option<&TablePermissions>, w: &WriteRequest<'_>, who: &Writer<'_>) -> Result<(), String> {
    judge(perms, w, who).map_err(|why| format!("permission denied: {} on {}/{}: as merged, {why}", w.op, w.table, w.id))
}

/// Under `new_in_my_buckets`, why a row in `buckets` escapes the buckets
/// the user reads (naming the bucket unless the stored row is hidden
/// from the user: its values may place it there); `None` when it does not.
fn escaped_bucket(
    perms: &TablePermissions,
    w: &WriteRequest<'_>,
    buckets: &BTreeSet<String>,
    who: &Writer<'_>,
) -> Option<String> {
    if !perms.new_in_my_buckets || w.op == WriteOp::Delete {
        return None;
    }
    let b = buckets.iter().find(|b| !who.buckets.contains(*b))?;
    Some(if w.old_hidden {
        "the row would be in a bucket this user does not read (new_in_my_buckets)".to_owned()
    } else {
        format!("the row would be in bucket {b:?}, which this user does not read (new_in_my_buckets)")
    })
}

/// The one client write of a conflict record: its user closes it.
fn check_conflict_resolution(w: &WriteRequest<'_>, who: &Writer<'_>) -> Result<(), String> {
    let rule = "only the conflict's own user (user_id) may update its status and resolution";
    if w.op != WriteOp::Update {
        return Err(format!("conflict records are written by the server; {rule}"));
    }
    if column(w.old, "user_id") != Value::Text(who.user_id.to_owned()) {
        return Err(format!("the conflict belongs to another user; {rule}"));
    }
    let mut names: BTreeSet<&String> = BTreeSet::new();
    names.extend(w.old.into_iter().flat_map(|r| r.keys()));
    names.extend(w.new.into_iter().flat_map(|r| r.keys()));
    for c in names {
        if !CONFLICT_RESOLUTION_COLUMNS.contains(&c.as_str()) && column(w.old, c) != column(w.new, c) {
            return Err(format!("column {c:?} would change; {rule}"));
        }
    }
    Ok(())
}

fn column(row: Option<&RowData>, c: &str) -> Value {
    row.and_then(|r| r.get(c)).cloned().unwrap_or(Value::Null)
}

// ---- the condition language ----

/// A parsed condition.
#[derive(Clone, Debug, PartialEq)]
enum Cond {
    Const(bool),
    And(Vec<Cond>),
    Or(Vec<Cond>),
    Not(Box<Cond>),
    Eq(Operand, Operand),
    Ne(Operand, Operand),
    In(Operand, Vec<Operand>),
    IsNull(Operand),
    StartsWith(Operand, Operand),
}

#[derive(Clone, Debug, PartialEq)]
enum Operand {
    Old(String),
    New(String),
    Claim(String),
    Lit(Value),
}

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Ident(String),
    Str(String),
    Int(i64),
    Real(f64),
    Dot,
    EqEq,
    NotEq,
    LParen,
    RParen,
    LBracket,
    RBracket,
    Comma,
    End,
}

impl fmt::Display for Tok {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Tok::Ident(s) => write!(f, "`{s}`"),
            Tok::Str(s) => write!(f, "string {s:?}"),
            Tok::Int(i) => write!(f, "`{i}`"),
            Tok::Real(r) => write!(f, "`{r}`"),
            Tok::Dot => f.write_str("`.`"),
            Tok::EqEq => f.write_str("`==`"),
            Tok::NotEq => f.write_str("`!=`"),
            Tok::LParen => f.write_str("`(`"),
            Tok::RParen => f.write_str("`)`"),
            Tok::LBracket => f.write_str("`[`"),
            Tok::RBracket => f.write_str("`]`"),
            Tok::Comma => f.write_str("`,`"),
            Tok::End => f.write_str("end of condition"),
        }
    }
}

fn tokenize(text: &str) -> Result<Vec<(Tok, usize)>, ConditionError> {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        let at = i;
        let single = match b {
            b' ' | b'\t' | b'\r' | b'\n' => {
                i += 1;
                continue;
            }
            b'.' => Some(Tok::Dot),
            b'(' => Some(Tok::LParen),
            b')' => Some(Tok::RParen),
            b'[' => Some(Tok::LBracket),
            b']' => Some(Tok::RBracket),
            b',' => Some(Tok::Comma),
            _ => None,
        };
        if let Some(t) = single {
            out.push((t, at));
            i += 1;
            continue;
        }
        match b {
            b'=' | b'!' => {
                if bytes.get(i + 1) != Some(&b'=') {
                    return Err(ConditionError::Unexpected {
                        found: format!("`{}`", char::from(b)),
                        at,
                        expected: "`==` or `!=`",
                    });
                }
                out.push((if b == b'=' { Tok::EqEq } else { Tok::NotEq }, at));
                i += 2;
            }
            b'\'' | b'"' => {
                let rest = bytes.get(i + 1..).unwrap_or_default();
                let Some(len) = rest.iter().position(|&c| c == b) else {
                    return Err(ConditionError::UnterminatedString { at });
                };
                // Both ends are ASCII quotes, so char boundaries.
                let s = text.get(i + 1..i + 1 + len).unwrap_or_default();
                out.push((Tok::Str(s.to_owned()), at));
                i += len + 2;
            }
            b'-' | b'0'..=b'9' => {
                let mut end = i + 1;
                while bytes
                    .get(end)
                    .is_some_and(|c| c.is_ascii_digit() || *c == b'.' || c.is_ascii_alphabetic() || *c == b'_')
                {
                    end += 1;
                }
                let s = text.get(i..end).unwrap_or_default();
                let bad = || ConditionError::BadNumber { text: s.to_owned(), at };
                let valid = {
                    let digits = s.strip_prefix('-').unwrap_or(s);
                    let mut parts = digits.split('.');
                    let whole = parts.next().unwrap_or_default();
                    let frac = parts.next();
                    !whole.is_empty()
                        && whole.bytes().all(|c| c.is_ascii_digit())
                        && frac.is_none_or(|f| !f.is_empty() && f.bytes().all(|c| c.is_ascii_digit()))
                        && parts.next().is_none()
                };
                if !valid {
                    return Err(bad());
                }
                let tok = if s.contains('.') {
                    s.parse::<f64>().ok().filter(|f| f.is_finite()).map(Tok::Real)
                } else {
                    s.parse::<i64>().ok().map(Tok::Int)
                };
                out.push((tok.ok_or_else(bad)?, at));
                i = end;
            }
            b if b.is_ascii_alphabetic() || b == b'_' => {
                let mut end = i + 1;
                while bytes.get(end).is_some_and(|c| c.is_ascii_alphanumeric() || *c == b'_') {
                    end += 1;
                }
                out.push((Tok::Ident(text.get(i..end).unwrap_or_default().to_owned()), at));
                i = end;
            }
            _ => {
                let found = text.get(i..).and_then(|s| s.chars().next()).unwrap_or('?');
                return Err(ConditionError::BadCharacter { found, at });
            }
        }
    }
    out.push((Tok::End, text.len()));
    Ok(out)
}

/// Parse a rule's condition for `op` on `table`.
fn parse_condition(text: &str, table: &Table, op: WriteOp) -> Result<Cond, ConditionError> {
    if text.len() > MAX_CONDITION_BYTES {
        return Err(ConditionError::TooLong {
            bytes: text.len(),
            max_bytes: MAX_CONDITION_BYTES,
        });
    }
    let toks = tokenize(text)?;
    let mut p = Parser {
        toks,
        pos: 0,
        table,
        op,
    };
    let cond = p.or(0)?;
    p.expect_end()?;
    Ok(cond)
}

struct Parser<'a> {
    toks: Vec<(Tok, usize)>,
    pos: usize,
    table: &'a Table,
    op: WriteOp,
}

const KEYWORDS: [&str; 8] = ["and", "or", "not", "in", "is", "null", "true", "false"];

impl Parser<'_> {
    fn peek(&self) -> (&Tok, usize) {
        match self.toks.get(self.pos) {
            Some((t, at)) => (t, *at),
            None => (&Tok::End, self.toks.last().map_or(0, |(_, at)| *at)),
        }
    }

    fn peek_at(&self, ahead: usize) -> &Tok {
        self.toks.get(self.pos + ahead).map_or(&Tok::End, |(t, _)| t)
    }

    fn next(&mut self) -> (Tok, usize) {
        let (t, at) = self.peek();
        let t = t.clone();
        self.pos += 1;
        (t, at)
    }

    fn is_word(&self, word: &str) -> bool {
        matches!(self.peek().0, Tok::Ident(w) if w == word)
    }

    fn unexpected<T>(&self, expected: &'static str) -> Result<T, ConditionError> {
        let (t, at) = self.peek();
        Err(ConditionError::Unexpected {
            found: t.to_string(),
            at,
            expected,
        })
    }

    fn expect(&mut self, tok: Tok, expected: &'static str) -> Result<(), ConditionError> {
        if *self.peek().0 == tok {
            self.pos += 1;
            Ok(())
        } else {
            self.unexpected(expected)
        }
    }

    fn expect_end(&self) -> Result<(), ConditionError> {
        if *self.peek().0 == Tok::End {
            Ok(())
        } else {
            self.unexpected("`and`, `or` or the end of the condition")
        }
    }

    fn or(&mut self, depth: usize) -> Result<Cond, ConditionError> {
        let mut items = vec![self.and(depth)?];
        while self.is_word("or") {
            self.pos += 1;
            items.push(self.and(depth)?);
        }
        Ok(if items.len() == 1 {
            items.pop().unwrap_or(Cond::Const(false))
        } else {
            Cond::Or(items)
        })
    }

    fn and(&mut self, depth: usize) -> Result<Cond, ConditionError> {
        let mut items = vec![self.unary(depth)?];
        while self.is_word("and") {
            self.pos += 1;
            items.push(self.unary(depth)?);
        }
        Ok(if items.len() == 1 {
            items.pop().unwrap_or(Cond::Const(false))
        } else {
            Cond::And(items)
        })
    }

    fn deeper(&self, depth: usize) -> Result<usize, ConditionError> {
        let depth = depth + 1;
        if depth > MAX_CONDITION_DEPTH_LEVELS {
            return Err(ConditionError::TooDeep {
                at: self.peek().1,
                max_levels: MAX_CONDITION_DEPTH_LEVELS,
            });
        }
        Ok(depth)
    }

    fn unary(&mut self, depth: usize) -> Result<Cond, ConditionError> {
        if self.is_word("not") {
            let d = self.deeper(depth)?;
            self.pos += 1;
            return Ok(Cond::Not(Box::new(self.unary(d)?)));
        }
        if *self.peek().0 == Tok::LParen {
            let d = self.deeper(depth)?;
            self.pos += 1;
            let c = self.or(d)?;
            self.expect(Tok::RParen, "`)`, `and` or `or`")?;
            return Ok(c);
        }
        // `true` / `false` alone are conditions; followed by a comparison
        // they are operands (the integers 1 / 0).
        if self.is_word("true") || self.is_word("false") {
            let compared = match self.peek_at(1) {
                Tok::EqEq | Tok::NotEq => true,
                Tok::Ident(w) => w == "in" || w == "is" || w == "not" || w == "starts",
                _ => false,
            };
            if !compared {
                let value = self.is_word("true");
                self.pos += 1;
                return Ok(Cond::Const(value));
            }
        }
        let left = self.operand()?;
        match self.peek().0 {
            Tok::EqEq => {
                self.pos += 1;
                Ok(Cond::Eq(left, self.operand()?))
            }
            Tok::NotEq => {
                self.pos += 1;
                Ok(Cond::Ne(left, self.operand()?))
            }
            Tok::Ident(w) if w == "in" => {
                self.pos += 1;
                Ok(Cond::In(left, self.list()?))
            }
            Tok::Ident(w) if w == "not" => {
                self.pos += 1;
                if self.is_word("starts") {
                    self.pos += 1;
                    let c = self.starts_with(left)?;
                    return Ok(Cond::Not(Box::new(c)));
                }
                if !self.is_word("in") {
                    return self.unexpected("`in` or `starts with` after `not`");
                }
                self.pos += 1;
                Ok(Cond::Not(Box::new(Cond::In(left, self.list()?))))
            }
            Tok::Ident(w) if w == "starts" => {
                self.pos += 1;
                self.starts_with(left)
            }
            Tok::Ident(w) if w == "is" => {
                self.pos += 1;
                let negated = self.is_word("not");
                if negated {
                    self.pos += 1;
                }
                if !self.is_word("null") {
                    return self.unexpected("`null` after `is`");
                }
                self.pos += 1;
                let c = Cond::IsNull(left);
                Ok(if negated { Cond::Not(Box::new(c)) } else { c })
            }
            _ => self.unexpected("`==`, `!=`, `in`, `not in`, `is` or `starts with` after an operand"),
        }
    }

    /// The rest of `left starts with <operand>`, after `starts`.
    fn starts_with(&mut self, left: Operand) -> Result<Cond, ConditionError> {
        if !self.is_word("with") {
            return self.unexpected("`with` after `starts`");
        }
        self.pos += 1;
        Ok(Cond::StartsWith(left, self.operand()?))
    }

    fn list(&mut self) -> Result<Vec<Operand>, ConditionError> {
        self.expect(Tok::LBracket, "`[` after `in`")?;
        let mut items = Vec::new();
        if *self.peek().0 == Tok::RBracket {
            self.pos += 1;
            return Ok(items);
        }
        loop {
            items.push(self.operand()?);
            match self.next() {
                (Tok::Comma, _) => {}
                (Tok::RBracket, _) => return Ok(items),
                (t, at) => {
                    return Err(ConditionError::Unexpected {
                        found: t.to_string(),
                        at,
                        expected: "`,` or `]`",
                    })
                }
            }
        }
    }

    fn operand(&mut self) -> Result<Operand, ConditionError> {
        let (tok, at) = self.next();
        let name = match tok {
            Tok::Str(s) => return Ok(Operand::Lit(Value::Text(s))),
            Tok::Int(i) => return Ok(Operand::Lit(Value::Integer(i))),
            Tok::Real(r) => return Ok(Operand::Lit(Value::Real(r))),
            Tok::Ident(name) => name,
            t => {
                return Err(ConditionError::Unexpected {
                    found: t.to_string(),
                    at,
                    expected: "old.<column>, new.<column>, auth.<claim> or a literal",
                })
            }
        };
        match name.as_str() {
            "null" => return Ok(Operand::Lit(Value::Null)),
            "true" => return Ok(Operand::Lit(Value::Integer(1))),
            "false" => return Ok(Operand::Lit(Value::Integer(0))),
            "old" | "new" | "auth" => {}
            w if KEYWORDS.contains(&w) => {
                return Err(ConditionError::Unexpected {
                    found: format!("`{w}`"),
                    at,
                    expected: "old.<column>, new.<column>, auth.<claim> or a literal",
                })
            }
            _ => return Err(ConditionError::UnknownName { name, at }),
        }
        self.expect(Tok::Dot, "`.` after old, new or auth")?;
        let (field, at) = match self.next() {
            (Tok::Ident(f), at) if !KEYWORDS.contains(&f.as_str()) || name == "auth" => (f, at),
            (t, at) => {
                return Err(ConditionError::Unexpected {
                    found: t.to_string(),
                    at,
                    expected: "a column or claim name",
                })
            }
        };
        if name == "auth" {
            return Ok(Operand::Claim(field));
        }
        let row: &'static str = if name == "old" { "old" } else { "new" };
        if field != "id" && self.table.column_def(&field).is_none() {
            return Err(ConditionError::UnknownColumn {
                row,
                column: field,
                table: self.table.name.clone(),
                at,
            });
        }
        let missing = matches!((row, self.op), ("old", WriteOp::Insert) | ("new", WriteOp::Delete));
        if missing {
            return Err(ConditionError::NoSuchRow {
                row,
                column: field,
                op: self.op,
                at,
            });
        }
        Ok(if row == "old" {
            Operand::Old(field)
        } else {
            Operand::New(field)
        })
    }
}

struct Env<'a> {
    id: &'a str,
    old: Option<&'a RowData>,
    new: Option<&'a RowData>,
    who: &'a Writer<'a>,
}

impl Env<'_> {
    fn value(&self, o: &Operand) -> Value {
        let row_value = |row: Option<&RowData>, c: &str| match row {
            None => Value::Null,
            Some(_) if c == "id" => Value::Text(self.id.to_owned()),
            Some(r) => r.get(c).cloned().unwrap_or(Value::Null),
        };
        match o {
            Operand::Old(c) => row_value(self.old, c),
            Operand::New(c) => row_value(self.new, c),
            Operand::Claim(c) if c == "sub" => Value::Text(self.who.user_id.to_owned()),
            Operand::Claim(c) => claim_value(self.who.claims.get(c)),
            Operand::Lit(v) => v.clone(),
        }
    }

    fn eval(&self, c: &Cond) -> bool {
        match c {
            Cond::Const(b) => *b,
            Cond::And(items) => items.iter().all(|c| self.eval(c)),
            Cond::Or(items) => items.iter().any(|c| self.eval(c)),
            Cond::Not(c) => !self.eval(c),
            Cond::Eq(a, b) => equal(&self.value(a), &self.value(b)) == Some(true),
            Cond::Ne(a, b) => equal(&self.value(a), &self.value(b)) == Some(false),
            Cond::In(a, items) => {
                let a = self.value(a);
                items.iter().any(|i| equal(&a, &self.value(i)) == Some(true))
            }
            Cond::IsNull(a) => self.value(a).is_null(),
            Cond::StartsWith(a, prefix) => match (self.value(a), self.value(prefix)) {
                (Value::Text(a), Value::Text(prefix)) => a.starts_with(&prefix),
                _ => false,
            },
        }
    }
}

/// SQL equality: `None` when a side is NULL; numbers compare as numbers.
fn equal(a: &Value, b: &Value) -> Option<bool> {
    Some(match (a, b) {
        (Value::Null, _) | (_, Value::Null) => return None,
        (Value::Integer(x), Value::Integer(y)) => x == y,
        (Value::Real(x), Value::Real(y)) => x == y,
        (Value::Integer(i), Value::Real(r)) | (Value::Real(r), Value::Integer(i)) => (*i as f64) == *r,
        (Value::Text(x), Value::Text(y)) => x == y,
        (Value::Blob(x), Value::Blob(y)) => x == y,
        _ => false,
    })
}

/// A claim as a value: strings, numbers and booleans (1 / 0); anything
/// else (arrays, objects, a missing claim) is NULL.
fn claim_value(v: Option<&serde_json::Value>) -> Value {
    match v {
        Some(serde_json::Value::String(s)) => Value::Text(s.clone()),
        Some(serde_json::Value::Bool(b)) => Value::Integer(i64::from(*b)),
        Some(serde_json::Value::Number(n)) => n
            .as_i64()
            .map(Value::Integer)
            .or_else(|| n.as_f64().map(Value::Real))
            .unwrap_or(Value::Null),
        _ => Value::Null,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_core::{row_data, ColumnType};

    fn table() -> Table {
        Table::new("notes")
            .column("owner", ColumnType::Text)
            .column("n", ColumnType::Integer)
    }

    fn eval(src: &str, old: Option<&RowData>, new: Option<&RowData>, claims: &[(&str, serde_json::Value)]) -> bool {
        let t = table();
        let cond = parse_condition(src, &t, WriteOp::Update).expect("parses");
        let claims: serde_json::Map<String, serde_json::Value> =
            claims.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect();
        let buckets = BTreeSet::new();
        let who = Writer {
            user_id: "u1",
            claims: &claims,
            buckets: &buckets,
        };
        Env {
            id: "r1",
            old,
            new,
            who: &who,
        }
        .eval(&cond)
    }

    #[test]
    fn conditions_evaluate_with_sql_nulls() {
        let old = row_data([("owner", "u1".into()), ("n", Value::Integer(3))]);
        let new = row_data([("owner", "u2".into()), ("n", Value::Null)]);
        let (o, n) = (Some(&old), Some(&new));
        let cases: &[(&str, bool)] = &[
            ("old.owner == auth.sub", true),
            ("new.owner == auth.sub", false),
            ("new.owner != auth.sub", true),
            ("new.n == null", false),
            ("new.n != 1", false),
            ("new.n is null", true),
            ("old.n is not null and old.n == 3.0", true),
            ("old.n in [1, 2, 3]", true),
            ("old.n not in [1, 2, 3]", false),
            ("new.n not in [1]", true),
            ("old.id == 'r1' and new.id == \"r1\"", true),
            ("auth.role == 'admin' or old.owner == auth.sub", true),
            ("auth.missing is null", true),
            ("not (old.owner == auth.sub)", false),
            ("true", true),
            ("false or not false", true),
            ("old.n == -3 or old.n in []", false),
            ("auth.admin == true", false),
            ("old.owner starts with 'u'", true),
            ("old.owner starts with 'U'", false),
            ("old.owner starts with old.owner", true),
            ("new.owner not starts with 'u1'", true),
            ("not new.owner starts with 'u'", false),
            ("old.n starts with '3'", false),
            ("new.n starts with ''", false),
            ("old.owner starts with null", false),
        ];
        for (src, want) in cases {
            assert_eq!(eval(src, o, n, &[]), *want, "{src}");
        }
        assert!(eval("auth.role == 'admin'", o, n, &[("role", "admin".into())]));
        assert!(eval("auth.admin == true", o, n, &[("admin", true.into())]));
        assert!(eval("auth.level in [2, 3]", o, n, &[("level", 3.into())]));
        assert!(!eval(
            "auth.roles == 'admin'",
            o,
            n,
            &[("roles", serde_json::json!(["admin"]))]
        ));
    }

    #[test]
    fn bad_conditions_name_the_token() {
        let t = table();
        let cases: &[(&str, &str)] = &[
            ("", "unexpected end of condition at byte 0"),
            ("old.owner = auth.sub", "unexpected `=` at byte 10"),
            ("old.owner == ", "unexpected end of condition at byte 13"),
            ("old.nope == 1", "unknown column \"nope\" in old.nope at byte 4"),
            ("who.x == 1", "unknown name \"who\" at byte 0"),
            ("old.owner == 'x", "unterminated string starting at byte 13"),
            ("old.n == 12x", "bad number \"12x\" at byte 9"),
            ("old.n == 99999999999999999999", "bad number"),
            ("old.n == 1 )", "unexpected `)` at byte 11"),
            ("(old.n == 1", "unexpected end of condition at byte 11, expected `)`"),
            ("old.n in [1, 2", "unexpected end of condition"),
            ("old.n", "expected `==`, `!=`, `in`, `not in`, `is` or `starts with`"),
            ("old.owner starts 'u'", "expected `with` after `starts`"),
            ("old.owner not with 'u'", "expected `in` or `starts with` after `not`"),
            ("old.owner starts with", "unexpected end of condition"),
            ("old.n is 1", "expected `null` after `is`"),
            ("old.owner == auth.sub €", "unexpected character '€' at byte 22"),
            ("and", "unexpected `and` at byte 0"),
        ];
        for (src, want) in cases {
            let e = parse_condition(src, &t, WriteOp::Update).expect_err(src).to_string();
            assert!(e.contains(want), "{src:?}: {e}");
        }
        let e = parse_condition("old.owner == auth.sub", &t, WriteOp::Insert).expect_err("no old row");
        assert_eq!(e.to_string(), "old.owner at byte 4: insert rules have no old row");
        let e = parse_condition("new.owner == auth.sub", &t, WriteOp::Delete).expect_err("no new row");
        assert_eq!(e.to_string(), "new.owner at byte 4: delete rules have no new row");
    }

    #[test]
    fn quoted_rules_are_cut_at_their_limit() {
        let at = "x".repeat(SHOWN_RULE_BYTES);
        assert_eq!(shortened(&at), at);
        let over = "x".repeat(SHOWN_RULE_BYTES + 1);
        assert_eq!(shortened(&over), format!("{at}..."));
        // A character across the cut is left out whole.
        let wide = format!("{}é", "x".repeat(SHOWN_RULE_BYTES - 1));
        assert_eq!(shortened(&wide), format!("{}...", "x".repeat(SHOWN_RULE_BYTES - 1)));
    }

    #[test]
    fn condition_length_limit_is_in_bytes() {
        let t = table();
        let at_limit = format!("old.owner == '{}'", "x".repeat(MAX_CONDITION_BYTES - 15));
        assert_eq!(at_limit.len(), MAX_CONDITION_BYTES);
        assert!(parse_condition(&at_limit, &t, WriteOp::Update).is_ok());
        let over = format!("old.owner == '{}'", "x".repeat(MAX_CONDITION_BYTES - 14));
        assert_eq!(
            parse_condition(&over, &t, WriteOp::Update),
            Err(ConditionError::TooLong {
                bytes: MAX_CONDITION_BYTES + 1,
                max_bytes: MAX_CONDITION_BYTES
            })
        );
    }

    #[test]
    fn condition_depth_limit_is_in_levels() {
        let t = table();
        let nested = |levels: usize| format!("{}true{}", "(".repeat(levels), ")".repeat(levels));
        assert!(parse_condition(&nested(MAX_CONDITION_DEPTH_LEVELS), &t, WriteOp::Update).is_ok());
        let e = parse_condition(&nested(MAX_CONDITION_DEPTH_LEVELS + 1), &t, WriteOp::Update).expect_err("too deep");
        assert!(matches!(e, ConditionError::TooDeep { .. }), "{e}");
        let nots = |levels: usize| format!("{}true", "not ".repeat(levels));
        assert!(parse_condition(&nots(MAX_CONDITION_DEPTH_LEVELS), &t, WriteOp::Update).is_ok());
        assert!(parse_condition(&nots(MAX_CONDITION_DEPTH_LEVELS + 1), &t, WriteOp::Update).is_err());
        // Far past the limit (and within the length limit): an error, no stack overflow.
        let deep = "(".repeat(MAX_CONDITION_BYTES);
        assert!(matches!(
            parse_condition(&deep, &t, WriteOp::Update),
            Err(ConditionError::TooDeep { .. })
        ));
        // A long flat chain is not deep.
        let chain = vec!["old.n == 1"; 250].join(" or ");
        assert!(chain.len() <= MAX_CONDITION_BYTES);
        assert!(parse_condition(&chain, &t, WriteOp::Update).is_ok());
    }

    #[test]
    fn the_parser_is_total_on_arbitrary_bytes() {
        let t = table();
        let alphabet: Vec<&str> = vec![
            "old", "new", "auth", ".", "owner", "n", "id", "sub", "==", "!=", "=", "!", "(", ")", "[", "]", ",", "and",
            "or", "not", "in", "is", "null", "true", "false", "'a'", "\"", "'", "-", "1", "2.5", "1.", "é", " ",
            "\u{0}",
        ];
        // A deterministic walk over many short token sequences.
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            let mut s = String::new();
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let len = (state % 12) as usize;
            for k in 0..len {
                let pick = (state.rotate_left(k as u32 * 5) % alphabet.len() as u64) as usize;
                s.push_str(alphabet[pick]);
                if state.rotate_left(k as u32).is_multiple_of(3) {
                    s.push(' ');
                }
            }
            for op in WriteOp::ALL {
                let _ = parse_condition(&s, &t, op);
            }
        }
    }
}
