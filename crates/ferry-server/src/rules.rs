//! Sync rules: the server schema and the bucket definitions, loaded from
//! TOML (format in the crate README, "Sync rules").
//!
//! A bucket definition has parameters (token claim names; none for a
//! global bucket) and data entries: a table and, for parameterised buckets,
//! which column equals which parameter. A bucket *instance* is named
//! `name[<json array of parameter values>]`, e.g. `global[]` or
//! `my_assignments["u1"]`. Rows are placed in instances from their own
//! values when written; a user gets the instances their claims name.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use ferry_conflict::TableStrategy;
use ferry_core::{Column, RowData, Schema, Table, Value};
use serde::{Deserialize, Serialize};

use crate::error::{Result, ServiceError};
use crate::permissions::{PermissionDef, PermissionsError, TablePermissions, WriteOp, ACTIVITY_TABLE, CONFLICTS_TABLE};

/// The prefix of Ferry's own table names (see
/// [`SyncRules::is_reserved_table_name`]).
pub const RESERVED_TABLE_PREFIX: &str = "ferry_";

/// The ticket tracker rules, used when no rules file is configured. The
/// tracker's rules for other conflict strategies (`examples/tracker-*.toml`
/// in the workspace) extend this file.
pub const TICKET_TRACKER_RULES: &str = include_str!("../examples/ticket-tracker.toml");

/// How many files a chain of `extends` may have on top of the first one
/// (a longer chain is refused: most likely a cycle).
pub const MAX_EXTENDS_DEPTH: usize = 8;

/// The rules file as written.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RulesFile {
    /// A rules file these rules build on (`extends = "base.toml"`, relative
    /// to the directory of the file that names it). Its tables, buckets,
    /// strategies, permissions and added columns come first and this
    /// file's are added to them: a table, bucket, strategy or permission
    /// declared in both is refused as a duplicate, and a column is added
    /// to a table of the base with [`RulesFile::add_columns`].
    /// [`SyncRules::from_file`] follows it (up to [`MAX_EXTENDS_DEPTH`]
    /// files); [`SyncRules::from_toml`] has no directory to resolve it in
    /// and refuses it (merge with [`RulesFile::extending`] instead).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extends: Option<String>,
    /// The server schema, with server-side table options.
    #[serde(default)]
    pub tables: Vec<TableDef>,
    /// Bucket definitions.
    #[serde(default)]
    pub buckets: Vec<BucketDef>,
    /// Conflict strategies per table (`[[strategies]] table = "tickets"
    /// kind = "domain" ...`; kinds in `ferry_conflict::StrategyConfig`).
    /// Tables without one use the service's default; a strategy set with
    /// `SyncServiceBuilder::strategy` overrides the file's.
    #[serde(default)]
    pub strategies: Vec<TableStrategy>,
    /// Write permissions per table (`[[permissions]] table = "comments"
    /// insert = "new.user_id == auth.sub" ...`; syntax in
    /// [`crate::permissions`]). A table without an entry, or an operation
    /// without a rule, refuses client writes.
    #[serde(default)]
    pub permissions: Vec<PermissionDef>,
    /// Columns added to a table declared elsewhere, typically in the file
    /// this one extends (`[[add_columns]] table = "tickets" columns =
    /// [{ name = "description_doc", type = "blob" }]`). They come after
    /// the table's own columns; an unknown table or a column the table
    /// already has is refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub add_columns: Vec<AddColumns>,
}

/// Columns added to a table declared elsewhere (see
/// [`RulesFile::add_columns`]).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AddColumns {
    /// The table.
    pub table: String,
    /// The columns, added after the table's own.
    pub columns: Vec<Column>,
}

impl RulesFile {
    /// Parse a rules file from TOML text, without validating it or
    /// following its `extends`.
    pub fn from_toml(text: &str) -> Result<Self> {
        toml::from_str(text).map_err(|e| ServiceError::Config(format!("sync rules: {}", e.message())))
    }

    /// Read a rules file and the files it extends, merged into one (its
    /// `extends` is then `None`). Each `extends` is relative to the
    /// directory of the file naming it.
    pub fn from_file(path: &Path) -> Result<Self> {
        let read = |path: &Path| {
            let text = std::fs::read_to_string(path).map_err(|e| ServiceError::Io {
                path: path.display().to_string(),
                message: e.to_string(),
            })?;
            Self::from_toml(&text).map_err(|e| match e {
                ServiceError::Config(m) => ServiceError::Config(format!("{}: {m}", path.display())),
                other => other,
            })
        };
        let mut file = read(path)?;
        let mut current = path.to_path_buf();
        let mut depth = 0;
        while let Some(base) = file.extends.take() {
            depth += 1;
            if depth > MAX_EXTENDS_DEPTH {
                return Err(ServiceError::Config(format!(
                    "sync rules {}: more than {MAX_EXTENDS_DEPTH} files extend one another (a cycle?)",
                    path.display()
                )));
            }
            let base_path = current.parent().unwrap_or_else(|| Path::new("")).join(&base);
            let base_file = read(&base_path).map_err(|e| match e {
                ServiceError::Io { path: p, message } => ServiceError::Io {
                    path: p,
                    message: format!("{message} (extended by {})", current.display()),
                },
                other => other,
            })?;
            file = file.extending(base_file);
            current = base_path;
        }
        Ok(file)
    }

    /// These rules on top of `base`: `base`'s tables, buckets, strategies,
    /// permissions and added columns first, then these. The result extends
    /// what `base` extends; this file's own `extends` is dropped (the
    /// caller resolved it to `base`). Duplicates are refused when the
    /// result is validated ([`SyncRules::new`]).
    #[must_use]
    pub fn extending(self, base: RulesFile) -> RulesFile {
        fn cat<T>(mut first: Vec<T>, then: Vec<T>) -> Vec<T> {
            first.extend(then);
            first
        }
        RulesFile {
            extends: base.extends,
            tables: cat(base.tables, self.tables),
            buckets: cat(base.buckets, self.buckets),
            strategies: cat(base.strategies, self.strategies),
            permissions: cat(base.permissions, self.permissions),
            add_columns: cat(base.add_columns, self.add_columns),
        }
    }
}

/// A table of the rules file: the schema table plus server-side options.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct TableDef {
    /// The table as the schema declares it.
    #[serde(flatten)]
    pub table: Table,
    /// A rejected op on this table is rejected alone: the other ops of its
    /// client transaction still apply (default: the whole transaction is
    /// rolled back, `docs/adr/0005-transactions-all-or-nothing.md`).
    #[serde(default)]
    pub per_op_outcomes: bool,
}

impl From<Table> for TableDef {
    fn from(table: Table) -> Self {
        TableDef {
            table,
            per_op_outcomes: false,
        }
    }
}

/// One bucket definition.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BucketDef {
    /// The definition's name (letters, digits, underscores).
    pub name: String,
    /// Token claim names whose values select the instance; empty: global.
    #[serde(default)]
    pub parameters: Vec<String>,
    /// Which rows belong.
    #[serde(default)]
    pub data: Vec<DataDef>,
}

/// Rows of one table that belong to a bucket.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DataDef {
    /// The table.
    pub table: String,
    /// `column = "parameter"`: the row belongs to the instance whose
    /// parameter equals the column's value (`id` is the row id). Every
    /// parameter of the bucket must be matched by one column.
    #[serde(default, rename = "where")]
    pub filter: BTreeMap<String, String>,
}

/// Validated sync rules.
#[derive(Clone, Debug)]
pub struct SyncRules {
    schema: Schema,
    buckets: Vec<BucketDef>,
    /// For each table, the (bucket index, data index) pairs that use it.
    by_table: BTreeMap<String, Vec<(usize, usize)>>,
    strategies: Vec<TableStrategy>,
    /// The schema clients open their store with (see
    /// [`SyncRules::client_schema`]).
    client_schema: Schema,
    /// Tables whose rejected ops do not roll back their transaction.
    per_op_outcomes: BTreeSet<String>,
    /// Write permissions, per table with a `[[permissions]]` entry.
    permissions: BTreeMap<String, TablePermissions>,
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.as_bytes()[0].is_ascii_digit()
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

impl SyncRules {
    /// Parse and validate rules from TOML text (rules that `extends`
    /// another file are refused: see [`SyncRules::from_file`]).
    pub fn from_toml(text: &str) -> Result<Self> {
        Self::new(RulesFile::from_toml(text)?)
    }

    /// Load rules from a TOML file, following its `extends`
    /// ([`RulesFile::from_file`]).
    pub fn from_file(path: &Path) -> Result<Self> {
        Self::new(RulesFile::from_file(path)?)
    }

    /// The embedded ticket tracker rules.
    pub fn ticket_tracker() -> Result<Self> {
        Self::from_toml(TICKET_TRACKER_RULES)
    }

    /// Validate a parsed rules file (its `extends` resolved: see
    /// [`RulesFile::from_file`] and [`RulesFile::extending`]).
    pub fn new(mut file: RulesFile) -> Result<Self> {
        if let Some(base) = &file.extends {
            return Err(ServiceError::Config(format!(
                "sync rules: `extends = {base:?}` names a file, which only a rules file on disk can \
                 resolve (SyncRules::from_file, or RulesFile::extending)"
            )));
        }
        for add in std::mem::take(&mut file.add_columns) {
            let Some(t) = file.tables.iter_mut().find(|t| t.table.name == add.table) else {
                return Err(ServiceError::Config(format!(
                    "add_columns names unknown table {:?}",
                    add.table
                )));
            };
            // A column the table already has is refused by Schema::new.
            t.table.columns.extend(add.columns);
        }
        let per_op_outcomes = file
            .tables
            .iter()
            .filter(|t| t.per_op_outcomes)
            .map(|t| t.table.name.clone())
            .collect();
        let schema =
            Schema::new(file.tables.into_iter().map(|t| t.table)).map_err(|e| ServiceError::Config(e.to_string()))?;
        let bad = |m: String| Err(ServiceError::Config(m));
        if let Some(t) = schema.tables().find(|t| Self::is_reserved_table_name(&t.name)) {
            return bad(format!(
                "table name {:?} is reserved: names starting with {RESERVED_TABLE_PREFIX:?} are Ferry's own \
                 (only {CONFLICTS_TABLE:?} may be declared)",
                t.name
            ));
        }
        let mut names = BTreeSet::new();
        let mut by_table: BTreeMap<String, Vec<(usize, usize)>> = BTreeMap::new();
        for (bi, b) in file.buckets.iter().enumerate() {
            if !valid_name(&b.name) || !names.insert(b.name.clone()) {
                return bad(format!("invalid or duplicate bucket name {:?}", b.name));
            }
            let params: BTreeSet<&String> = b.parameters.iter().collect();
            if params.len() != b.parameters.len() {
                return bad(format!("bucket {:?} repeats a parameter", b.name));
            }
            if b.data.is_empty() {
                return bad(format!("bucket {:?} has no data entries", b.name));
            }
            for (di, d) in b.data.iter().enumerate() {
                let table = schema.table(&d.table).map_err(|_| {
                    ServiceError::Config(format!("bucket {:?} names unknown table {:?}", b.name, d.table))
                })?;
                for (col, param) in &d.filter {
                    if col != "id" && table.column_def(col).is_none() {
                        return bad(format!(
                            "bucket {:?} filters on unknown column {:?} of table {:?}",
                            b.name, col, d.table
                        ));
                    }
                    if !params.contains(param) {
                        return bad(format!("bucket {:?} filters on unknown parameter {:?}", b.name, param));
                    }
                }
                let used: BTreeSet<&String> = d.filter.values().collect();
                if used.len() != params.len() || d.filter.len() != params.len() {
                    return bad(format!(
                        "bucket {:?}: table {:?} must match each parameter with exactly one column",
                        b.name, d.table
                    ));
                }
                by_table.entry(d.table.clone()).or_default().push((bi, di));
            }
        }
        let mut configured = BTreeSet::new();
        for st in &file.strategies {
            let table = schema
                .table(&st.table)
                .map_err(|_| ServiceError::Config(format!("strategy names unknown table {:?}", st.table)))?;
            if !configured.insert(st.table.clone()) {
                return bad(format!("table {:?} has more than one strategy", st.table));
            }
            let columns: Vec<&str> = table.columns.iter().map(|c| c.name.as_str()).collect();
            st.check_columns(&columns)
                .and_then(|()| st.build().map(drop))
                .map_err(|e| ServiceError::Config(e.to_string()))?;
        }
        let mut permissions = BTreeMap::new();
        for p in &file.permissions {
            let perm_err = |e: PermissionsError| ServiceError::Config(e.to_string());
            let table = schema
                .table(&p.table)
                .map_err(|_| perm_err(PermissionsError::UnknownTable(p.table.clone())))?;
            if p.table == CONFLICTS_TABLE || p.table == ACTIVITY_TABLE {
                return Err(perm_err(PermissionsError::ServerTable(p.table.clone())));
            }
            if permissions.contains_key(&p.table) {
                return Err(perm_err(PermissionsError::Duplicate(p.table.clone())));
            }
            permissions.insert(p.table.clone(), TablePermissions::new(p, table).map_err(perm_err)?);
        }
        let client_schema = Schema::new(
            schema
                .tables()
                .filter(|t| by_table.contains_key(&t.name) || t.insert_only || t.local_only)
                .cloned(),
        )
        .map_err(|e| ServiceError::Config(format!("client schema: {e}")))?;
        Ok(SyncRules {
            schema,
            buckets: file.buckets,
            by_table,
            strategies: file.strategies,
            client_schema,
            per_op_outcomes,
            permissions,
        })
    }

    /// Whether `name` is one of Ferry's own table names, which the rules
    /// may not declare: every name starting with
    /// [`RESERVED_TABLE_PREFIX`] except `ferry_conflicts`, the synced
    /// table of manual conflict records. Source databases keep their
    /// bookkeeping under such names.
    pub fn is_reserved_table_name(name: &str) -> bool {
        name.starts_with(RESERVED_TABLE_PREFIX) && name != CONFLICTS_TABLE
    }

    /// The write permissions of `table` (`None`: it has no
    /// `[[permissions]]` entry, so clients cannot write it).
    pub fn permissions(&self, table: &str) -> Option<&TablePermissions> {
        self.permissions.get(table)
    }

    /// Log (tracing info) which tables clients may write and by which
    /// operations, and which synced tables they cannot write. Called when
    /// the service is built, so `ferry-server` logs it at start.
    pub fn log_write_permissions(&self) {
        let writable = self.writable_tables();
        for (table, ops) in &writable {
            let ops: Vec<&str> = ops.iter().map(|o| o.name()).collect();
            tracing::info!(table = %table, operations = %ops.join(", "), "clients may write");
        }
        let read_only: Vec<&str> = self
            .schema
            .tables()
            .filter(|t| !t.local_only && !writable.iter().any(|(w, _)| *w == t.name))
            .map(|t| t.name.as_str())
            .collect();
        if !read_only.is_empty() {
            tracing::info!(tables = %read_only.join(", "), "clients may not write (no [[permissions]] rule)");
        }
    }

    /// The tables clients may write and by which operations (tables with
    /// at least one rule; `ferry_conflicts`, when declared, by update:
    /// its user closes a conflict). What the server logs at start.
    pub fn writable_tables(&self) -> Vec<(String, Vec<WriteOp>)> {
        let mut out: Vec<(String, Vec<WriteOp>)> = self
            .permissions
            .iter()
            .map(|(t, p)| (t.clone(), p.operations().collect::<Vec<_>>()))
            .filter(|(_, ops)| !ops.is_empty())
            .collect();
        if self.schema.table(CONFLICTS_TABLE).is_ok() {
            out.push((CONFLICTS_TABLE.to_owned(), vec![WriteOp::Update]));
        }
        out.sort();
        out
    }

    /// Whether a rejected op on `table` is rejected alone instead of
    /// rolling back its client transaction (`per_op_outcomes = true`).
    pub fn per_op_outcomes(&self, table: &str) -> bool {
        self.per_op_outcomes.contains(table)
    }

    /// The schema clients open their store with, derived from the rules:
    /// the tables clients sync (those some bucket holds, plus tables
    /// declared `insert_only` or `local_only`, which only clients write),
    /// with their columns, indexes and client options as declared. Tables
    /// no bucket holds are the server's own and left out, as are the
    /// server-side options (strategies, table options such as
    /// `per_op_outcomes`). Apps add what only the client has (indexes,
    /// `track_previous_values`, local-only tables) to these tables rather
    /// than keeping a copy of the schema.
    pub fn client_schema(&self) -> Schema {
        self.client_schema.clone()
    }

    /// The configured conflict strategies, per table.
    pub fn strategies(&self) -> &[TableStrategy] {
        &self.strategies
    }

    /// The server schema.
    pub fn schema(&self) -> &Schema {
        &self.schema
    }

    /// The bucket definitions.
    pub fn buckets(&self) -> &[BucketDef] {
        &self.buckets
    }

    /// The bucket instances a row belongs to, from its values.
    pub fn row_buckets(&self, table: &str, id: &str, data: &RowData) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        let Some(uses) = self.by_table.get(table) else {
            return out;
        };
        // The id as a value, made once a parameter takes it.
        let mut id_value: Option<Value> = None;
        'defs: for &(bi, di) in uses {
            let b = &self.buckets[bi];
            let d = &b.data[di];
            let mut values = Vec::with_capacity(b.parameters.len());
            for p in &b.parameters {
                // Validation guarantees one column per parameter.
                let Some((col, _)) = d.filter.iter().find(|(_, param)| *param == p) else {
                    continue 'defs;
                };
                let v = if col == "id" {
                    &*id_value.get_or_insert_with(|| Value::Text(id.to_owned()))
                } else {
                    data.get(col).unwrap_or(&Value::Null)
                };
                if v.is_null() {
                    continue 'defs;
                }
                values.push(v.clone());
            }
            out.insert(instance_name(&b.name, &values));
        }
        out
    }

    /// The bucket instances a user with these claims gets, at most `max`.
    pub fn user_buckets(&self, claims: &serde_json::Map<String, serde_json::Value>, max: usize) -> Result<Vec<String>> {
        let mut out = BTreeSet::new();
        for b in &self.buckets {
            // Each parameter has one or more values (array claims expand);
            // a missing or null claim means no instance of this bucket.
            let mut combos: Vec<Vec<Value>> = vec![Vec::new()];
            for p in &b.parameters {
                let vals = claim_values(claims.get(p));
                let mut next = Vec::new();
                for c in &combos {
                    for v in &vals {
                        let mut c = c.clone();
                        c.push(v.clone());
                        next.push(c);
                    }
                }
                combos = next;
                if combos.len() > max {
                    return Err(ServiceError::TooLarge(format!(
                        "bucket {:?} expands to more than {max} instances",
                        b.name
                    )));
                }
            }
            for c in combos {
                out.insert(instance_name(&b.name, &c));
            }
            if out.len() > max {
                return Err(ServiceError::TooLarge(format!("user gets more than {max} buckets")));
            }
        }
        Ok(out.into_iter().collect())
    }
}

/// `name[<json array>]`.
pub fn instance_name(name: &str, values: &[Value]) -> String {
    if values.is_empty() {
        // A global bucket's one instance: `serde_json`'s empty array.
        let mut out = String::with_capacity(name.len() + 2);
        out.push_str(name);
        out.push_str("[]");
        return out;
    }
    // Serializing Values cannot fail (string keys only, no maps).
    let params = serde_json::to_string(values).unwrap_or_else(|_| "[]".to_owned());
    format!("{name}{params}")
}

fn claim_values(v: Option<&serde_json::Value>) -> Vec<Value> {
    fn scalar(v: &serde_json::Value) -> Option<Value> {
        match v {
            serde_json::Value::String(s) => Some(Value::Text(s.clone())),
            serde_json::Value::Bool(b) => Some(Value::Integer(i64::from(*b))),
            serde_json::Value::Number(n) => n.as_i64().map(Value::Integer).or_else(|| n.as_f64().map(Value::Real)),
            _ => None,
        }
    }
    match v {
        Some(serde_json::Value::Array(items)) => items.iter().filter_map(scalar).collect(),
        Some(v) => scalar(v).into_iter().collect(),
        None => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_core::row_data;

    #[test]
    fn instance_names_are_the_name_and_the_values_as_json() {
        let json = |values: &[Value]| serde_json::to_string(values).expect("encode");
        for values in [vec![], vec![Value::Text("u\"1".into()), Value::Integer(3)]] {
            assert_eq!(instance_name("b", &values), format!("b{}", json(&values)));
        }
    }

    #[test]
    fn ticket_tracker_rules_load_and_place_rows() {
        let rules = SyncRules::ticket_tracker().expect("embedded rules are valid");
        let row = row_data([("ticket_id", "t1".into()), ("user_id", "u1".into())]);
        let b = rules.row_buckets("assignments", "a1", &row);
        assert!(b.contains("global[]"), "{b:?}");
        assert!(b.contains("my_assignments[\"u1\"]"), "{b:?}");
        let mut claims = serde_json::Map::new();
        claims.insert("sub".into(), "u1".into());
        let ub = rules.user_buckets(&claims, 100).expect("few buckets");
        assert!(ub.contains(&"my_assignments[\"u1\"]".to_owned()), "{ub:?}");
    }

    #[test]
    fn bad_rules_are_refused() {
        let cases = [
            "[[buckets]]\nname = \"b\"\n[[buckets.data]]\ntable = \"nope\"\n",
            "[[tables]]\nname = \"t\"\ncolumns = []\n[[buckets]]\nname = \"b\"\nparameters = [\"sub\"]\n[[buckets.data]]\ntable = \"t\"\n",
            "[[tables]]\nname = \"t\"\ncolumns = []\n[[buckets]]\nname = \"b\"\nparameters = [\"sub\"]\n[[buckets.data]]\ntable = \"t\"\nwhere = { x = \"sub\" }\n",
        ];
        for c in cases {
            assert!(SyncRules::from_toml(c).is_err(), "{c}");
        }
    }

    const BASE: &str = r#"
[[tables]]
name = "notes"
columns = [{ name = "body", type = "text" }]

[[buckets]]
name = "global"
data = [{ table = "notes" }]

[[permissions]]
table = "notes"
insert = "true"
"#;

    fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
        let path = dir.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).expect("mkdir");
        }
        std::fs::write(&path, text).expect("write rules");
        path
    }

    #[test]
    fn a_rules_file_extends_a_base_relative_to_itself_and_adds_columns_and_strategies() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), "base/notes.toml", BASE);
        let variant = write(
            dir.path(),
            "variants/crdt.toml",
            r#"
extends = "../base/notes.toml"

[[add_columns]]
table = "notes"
columns = [{ name = "doc", type = "blob" }]

[[strategies]]
table = "notes"
kind = "crdt"
columns = ["doc"]
"#,
        );
        let rules = SyncRules::from_file(&variant).expect("variant rules");
        let notes = rules.client_schema().table("notes").expect("notes").clone();
        let columns: Vec<&str> = notes.columns.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(columns, ["body", "doc"]);
        assert_eq!(rules.strategies().len(), 1);
        assert!(rules.permissions("notes").is_some(), "the base's permissions apply");
        assert_eq!(rules.buckets().len(), 1);
        // A chain: a file extending the variant gets both.
        let chained = write(
            dir.path(),
            "variants/more/audit.toml",
            "extends = \"../crdt.toml\"\n[[tables]]\nname = \"extra\"\ncolumns = []\n",
        );
        let rules = SyncRules::from_file(&chained).expect("chained rules");
        assert!(rules.schema().table("extra").is_ok());
        assert!(rules
            .schema()
            .table("notes")
            .expect("notes")
            .column_def("doc")
            .is_some());
        // The same merge in memory.
        let merged = RulesFile::from_toml(
            "extends = \"x\"\n[[add_columns]]\ntable = \"notes\"\ncolumns = [{ name = \"doc\", type = \"blob\" }]\n",
        )
        .expect("parse")
        .extending(RulesFile::from_toml(BASE).expect("base"));
        assert!(merged.extends.is_none());
        let rules = SyncRules::new(merged).expect("merged rules");
        assert!(rules
            .client_schema()
            .table("notes")
            .expect("notes")
            .column_def("doc")
            .is_some());
    }

    #[test]
    fn bad_extends_and_added_columns_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), "base.toml", BASE);
        write(dir.path(), "unknown_field.toml", "[[nope]]\n");
        let refused = |name: &str, text: &str, wanted: &str| {
            let path = write(dir.path(), name, text);
            let e = SyncRules::from_file(&path).expect_err(text).to_string();
            assert!(e.contains(wanted), "{text}: {e}");
        };
        refused(
            "unknown_table.toml",
            "extends = \"base.toml\"\n[[add_columns]]\ntable = \"nope\"\ncolumns = []\n",
            "add_columns names unknown table \"nope\"",
        );
        refused(
            "twice.toml",
            "extends = \"base.toml\"\n[[add_columns]]\ntable = \"notes\"\ncolumns = [{ name = \"body\", type = \"text\" }]\n",
            "duplicate column \"body\"",
        );
        refused(
            "table_again.toml",
            "extends = \"base.toml\"\n[[tables]]\nname = \"notes\"\ncolumns = []\n",
            "duplicate table \"notes\"",
        );
        refused(
            "permission_again.toml",
            "extends = \"base.toml\"\n[[permissions]]\ntable = \"notes\"\ninsert = \"false\"\n",
            "notes",
        );
        refused("missing.toml", "extends = \"nowhere.toml\"\n", "extended by");
        refused("cycle.toml", "extends = \"cycle.toml\"\n", "more than 8 files");
        refused(
            "bad_base.toml",
            "extends = \"unknown_field.toml\"\n",
            "unknown_field.toml: sync rules: unknown field",
        );
        // No directory to resolve `extends` in.
        let e = SyncRules::from_toml("extends = \"base.toml\"\n").expect_err("from_toml");
        assert!(e.to_string().contains("SyncRules::from_file"), "{e}");
    }
}
