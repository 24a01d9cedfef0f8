//! How a synced table of the rules lies in PostgreSQL: its primary key
//! (the Ferry row id), its columns and their types, and the SQL that reads
//! and writes Ferry values from and to them.
//!
//! Types map to Ferry values (a column's Ferry type is the rules'):
//!
//! | Ferry type | PostgreSQL types | read as | written from |
//! |---|---|---|---|
//! | integer | smallint, integer, bigint | integer | integer |
//! | integer | boolean | 0 / 1 | 0 is false, other numbers true |
//! | real | real, double precision, numeric | float | float |
//! | text | text, varchar, char, uuid, numeric, json, jsonb | their text | text cast to the type |
//! | text | date, timestamp, timestamptz, time | ISO 8601 text | ISO text cast to the type |
//! | blob | bytea | bytes | bytes |
//!
//! Anything else is refused when the server starts, naming the table, the
//! column and the type. The row id is a single-column primary key of
//! type text, varchar, char, uuid or an integer type.

use ferry_core::{ColumnType, Table, Value};
use ferry_source::SourceError;
use tokio_postgres::types::ToSql;

/// The alias of an app table in Ferry's statements: an alias hides the
/// table's own name, which could be a name the statement gives something
/// else (the `i` of its ids, `excluded` of `ON CONFLICT`).
pub(crate) const APP_ROW: &str = "ferry_app_row";

/// Ferry's inserts into an app table give the row id (and the rules'
/// columns) themselves, also to an identity column `GENERATED ALWAYS`,
/// which refuses a value otherwise (no effect on other columns).
pub(crate) const OVERRIDING: &str = "OVERRIDING SYSTEM VALUE";

/// How a column's values travel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Integer types, read and bound as `int8`.
    Int,
    /// `boolean`, read as 0/1 and bound as `int8`.
    Bool,
    /// Float types and numeric as real, read and bound as `float8`.
    Float,
    /// Everything kept as text in Ferry, bound as text cast to the type.
    Text,
    /// `bytea`.
    Bytea,
}

/// One column.
#[derive(Clone, Debug)]
pub(crate) struct ColLayout {
    /// The name (as in the rules and PostgreSQL).
    pub name: String,
    /// The quoted identifier.
    pub quoted: String,
    pub kind: Kind,
    /// PostgreSQL's type name (`pg_type.typname`), for casts.
    pub typname: String,
}

impl ColLayout {
    /// The capture trigger's test that an UPDATE changed the column as
    /// Ferry reads it. `IS DISTINCT FROM` on the values, except where the
    /// type's equality is not the text Ferry reads (`numeric`: `1.0 =
    /// 1.00`) or there is none (`json`): those compare as text, which
    /// never fails (a trigger that fails fails the app's write).
    pub(crate) fn changed_test(&self) -> String {
        let c = &self.quoted;
        match self.typname.as_str() {
            "json" | "numeric" => format!("OLD.{c}::text IS DISTINCT FROM NEW.{c}::text"),
            _ => format!("OLD.{c} IS DISTINCT FROM NEW.{c}"),
        }
    }

    /// The expression that reads the column as its [`Kind`]'s type.
    pub(crate) fn select_expr(&self) -> String {
        let c = &self.quoted;
        match self.kind {
            Kind::Int => format!("{c}::int8"),
            Kind::Bool => format!("{c}::int4::int8"),
            Kind::Float => format!("{c}::float8"),
            Kind::Text if is_temporal(&self.typname) => format!("to_json({c}) #>> '{{}}'"),
            Kind::Text => format!("{c}::text"),
            Kind::Bytea => c.clone(),
        }
    }

    /// The expression a value bound as parameter `n` is written with.
    pub(crate) fn param_expr(&self, n: usize) -> String {
        match self.kind {
            Kind::Int => format!("${n}::int8"),
            Kind::Bool => format!("(${n}::int8 <> 0)"),
            Kind::Float => format!("${n}::float8"),
            Kind::Text => format!("${n}::text::{}", self.typname),
            Kind::Bytea => format!("${n}::bytea"),
        }
    }

    /// Whether the column stores `v` so that reading it back gives `v`
    /// (a value it refuses fails the write instead): no cast, rounding,
    /// padding or normalization on the way.
    pub(crate) fn keeps_exactly(&self, v: &Value) -> bool {
        match (self.kind, self.typname.as_str(), v) {
            (_, _, Value::Null) => true,
            (Kind::Int, _, Value::Integer(_)) => true,
            (Kind::Float, "float8", Value::Real(r)) => r.is_finite(),
            (Kind::Text, "text" | "varchar", Value::Text(_)) => true,
            (Kind::Bytea, _, Value::Blob(_)) => true,
            _ => false,
        }
    }

    /// Read the column at `idx` of `row` as a Ferry value.
    pub(crate) fn read(&self, row: &tokio_postgres::Row, idx: usize) -> Result<Value, tokio_postgres::Error> {
        Ok(match self.kind {
            Kind::Int | Kind::Bool => row.try_get::<_, Option<i64>>(idx)?.map_or(Value::Null, Value::Integer),
            Kind::Float => row.try_get::<_, Option<f64>>(idx)?.map_or(Value::Null, Value::Real),
            Kind::Text => row.try_get::<_, Option<String>>(idx)?.map_or(Value::Null, Value::Text),
            Kind::Bytea => row.try_get::<_, Option<Vec<u8>>>(idx)?.map_or(Value::Null, Value::Blob),
        })
    }

    /// The parameter for `v`, or why the column cannot hold it.
    pub(crate) fn param(&self, table: &str, v: &Value) -> Result<Box<dyn ToSql + Sync + Send>, SourceError> {
        let refused = || {
            SourceError::Refused(format!(
                "{table}.{} ({}) cannot hold the value {v:?}",
                self.name, self.typname
            ))
        };
        Ok(match (self.kind, v) {
            (Kind::Int | Kind::Bool, Value::Null) => Box::new(None::<i64>),
            (Kind::Int | Kind::Bool, Value::Integer(i)) => Box::new(Some(*i)),
            (Kind::Int | Kind::Bool, Value::Real(r)) if r.fract() == 0.0 && r.abs() < 9.2e18 => {
                // Integral and in range: exact.
                Box::new(Some(*r as i64))
            }
            (Kind::Int | Kind::Bool, Value::Text(t)) => Box::new(Some(t.trim().parse::<i64>().map_err(|_| refused())?)),
            (Kind::Float, Value::Null) => Box::new(None::<f64>),
            (Kind::Float, Value::Integer(i)) => Box::new(Some(*i as f64)),
            (Kind::Float, Value::Real(r)) => Box::new(Some(*r)),
            (Kind::Float, Value::Text(t)) => Box::new(Some(t.trim().parse::<f64>().map_err(|_| refused())?)),
            (Kind::Text, Value::Null) => Box::new(None::<String>),
            (Kind::Text, Value::Text(t)) => Box::new(Some(t.clone())),
            (Kind::Text, Value::Integer(i)) => Box::new(Some(i.to_string())),
            (Kind::Text, Value::Real(r)) => Box::new(Some(r.to_string())),
            (Kind::Bytea, Value::Null) => Box::new(None::<Vec<u8>>),
            (Kind::Bytea, Value::Blob(b)) => Box::new(Some(b.clone())),
            (Kind::Bytea, Value::Text(t)) => Box::new(Some(t.clone().into_bytes())),
            _ => return Err(refused()),
        })
    }
}

fn is_temporal(typname: &str) -> bool {
    matches!(typname, "date" | "timestamp" | "timestamptz" | "time" | "timetz")
}

/// The kind a PostgreSQL type travels as when the rules declare `ty`;
/// `None` when the pair is not supported.
pub(crate) fn kind_of(ty: ColumnType, typname: &str) -> Option<Kind> {
    match (ty, typname) {
        (ColumnType::Integer, "int2" | "int4" | "int8") => Some(Kind::Int),
        (ColumnType::Integer, "bool") => Some(Kind::Bool),
        (ColumnType::Real, "float4" | "float8" | "numeric") => Some(Kind::Float),
        (
            ColumnType::Text,
            "text" | "varchar" | "bpchar" | "uuid" | "numeric" | "json" | "jsonb" | "date" | "timestamp"
            | "timestamptz" | "time" | "timetz",
        ) => Some(Kind::Text),
        (ColumnType::Blob, "bytea") => Some(Kind::Bytea),
        _ => None,
    }
}

/// What each Ferry type accepts, for error messages.
fn accepted(ty: ColumnType) -> &'static str {
    match ty {
        ColumnType::Integer => "smallint, integer, bigint or boolean",
        ColumnType::Real => "real, double precision or numeric",
        ColumnType::Text => "text, varchar, char, uuid, numeric, json, jsonb, date, timestamp, timestamptz or time",
        ColumnType::Blob => "bytea",
    }
}

/// The PostgreSQL type a table created from the rules gets.
pub(crate) fn created_type(ty: ColumnType) -> &'static str {
    match ty {
        ColumnType::Integer => "bigint",
        ColumnType::Real => "double precision",
        ColumnType::Text => "text",
        ColumnType::Blob => "bytea",
    }
}

/// The row id column.
#[derive(Clone, Debug)]
pub(crate) enum PkKind {
    /// Text-like (text, varchar, char, uuid): bound as text cast to the
    /// type. `uuid` ids must be in PostgreSQL's canonical form.
    Text { typname: String },
    /// Integer types: bound as `int8`; ids are decimal integers.
    Int,
}

/// A synced table's layout.
#[derive(Clone, Debug)]
pub(crate) struct TableLayout {
    /// The Ferry table name.
    pub name: String,
    /// `"schema"."table"`.
    pub qualified: String,
    /// The primary key's quoted name.
    pub pk: String,
    pub pk_kind: PkKind,
    /// The rules' columns, in the rules' order.
    pub cols: Vec<ColLayout>,
    /// Whether PostgreSQL keeps a row as written, as far as the table
    /// goes: no `BEFORE` row trigger or rewrite rule of the app may change
    /// it (see [`ColLayout::keeps_exactly`] for the values).
    pub keeps_rows: bool,
}

/// A row id as the parameter of the primary key.
#[derive(Debug)]
pub(crate) enum PkParam {
    /// The id as text (the same parameter as the id itself).
    Text,
    /// The id as an integer.
    Int(i64),
}

impl TableLayout {
    /// A one-row relation that, joined into Ferry's statement writing this
    /// table, sets `ferry.writing` to the table's name for the rest of the
    /// transaction: the capture trigger then skips the rows of this table
    /// the statement writes (at trigger depth 1), and captures the rows
    /// of other tables it changes in turn (a foreign key's `ON DELETE
    /// CASCADE` or `SET NULL`, whose triggers also fire at depth 1).
    ///
    /// `deleted_id`: for Ferry's delete of one row, the number of the text
    /// parameter holding its id, set as `ferry.writing_id`: only that row's
    /// delete is the statement's, so rows of this same table a foreign
    /// key's action deletes or updates in turn (a self-referencing `ON
    /// DELETE CASCADE`) are captured. `None` (an upsert): `ferry.writing_id`
    /// is empty, and every row of this table inserted or updated at depth
    /// 1 is the statement's.
    pub(crate) fn writing_marker(&self, deleted_id: Option<usize>) -> String {
        let id = deleted_id.map_or_else(|| "''".to_owned(), |n| format!("${n}::text"));
        format!(
            "(SELECT set_config('ferry.writing', {}, true) AS ferry_writing_table, \
             set_config('ferry.writing_id', {id}, true) AS ferry_writing_id) AS ferry_writing",
            quote_literal(&self.name)
        )
    }

    /// The row id as its primary key's parameter; `None` for an id no row
    /// of this table can have (not an integer for an integer key, not a
    /// canonical uuid for a uuid key).
    pub(crate) fn pk_param(&self, id: &str) -> Option<PkParam> {
        match &self.pk_kind {
            PkKind::Int => {
                let n = id.parse::<i64>().ok()?;
                (n.to_string() == id).then_some(PkParam::Int(n))
            }
            PkKind::Text { typname } if typname == "uuid" => is_canonical_uuid(id).then_some(PkParam::Text),
            // A char(n) key ignores trailing spaces: "a " is the row "a".
            PkKind::Text { typname } if typname == "bpchar" => (!id.ends_with(' ')).then_some(PkParam::Text),
            PkKind::Text { .. } => Some(PkParam::Text),
        }
    }

    /// The row id of a key as its JSON text (what the capture trigger
    /// records): a char(n) key's padding is not part of the id, as with
    /// the key's text (`::text`) that [`TableLayout::pk_from_text`] and
    /// reads of the keys give.
    pub(crate) fn id_of_key_text(&self, key: String) -> String {
        match &self.pk_kind {
            PkKind::Text { typname } if typname == "bpchar" && key.ends_with(' ') => {
                key.trim_end_matches(' ').to_owned()
            }
            _ => key,
        }
    }

    /// The expression comparing or setting the key: `id_param` is the
    /// number of the text id's parameter, `int_param` that of the integer.
    pub(crate) fn pk_expr(&self, id_param: usize, int_param: usize) -> String {
        match &self.pk_kind {
            PkKind::Int => format!("${int_param}::int8"),
            PkKind::Text { typname } => format!("${id_param}::text::{typname}"),
        }
    }

    /// The SQL expression turning the text id `expr` into the key's
    /// type, NULL (never an error) for an id no row of this table can
    /// have: what [`TableLayout::pk_param`] accepts, in SQL.
    pub(crate) fn pk_from_text(&self, expr: &str) -> String {
        match &self.pk_kind {
            // Nested: the inner CASE is evaluated only for digits.
            PkKind::Int => format!(
                "CASE WHEN {expr} ~ '^-?[0-9]{{1,19}}$' THEN CASE WHEN {expr}::numeric \
                 BETWEEN -9223372036854775808 AND 9223372036854775807 THEN {expr}::int8 END END"
            ),
            PkKind::Text { typname } if typname == "uuid" => format!(
                "CASE WHEN {expr} ~ '^[0-9a-f]{{8}}-[0-9a-f]{{4}}-[0-9a-f]{{4}}-[0-9a-f]{{4}}-[0-9a-f]{{12}}$' \
                 THEN {expr}::uuid END"
            ),
            PkKind::Text { typname } if typname == "bpchar" => {
                format!("CASE WHEN {expr} !~ ' $' THEN {expr}::text::bpchar END")
            }
            PkKind::Text { typname } => format!("{expr}::text::{typname}"),
        }
    }

    /// Why an id cannot be a row id of this table.
    pub(crate) fn bad_id(&self, id: &str) -> SourceError {
        let what = match &self.pk_kind {
            PkKind::Int => "a decimal integer".to_owned(),
            PkKind::Text { typname } if typname == "bpchar" => "a char(n) key without trailing spaces".to_owned(),
            PkKind::Text { typname } => format!("a canonical {typname}"),
        };
        SourceError::Refused(format!(
            "row id {id:?} is not {what}, as the primary key of {} needs",
            self.name
        ))
    }

    /// The select list of the rules' columns.
    pub(crate) fn select_list(&self) -> String {
        self.cols
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{} AS c{i}", c.select_expr()))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn is_canonical_uuid(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_digit() || (b'a'..=b'f').contains(c),
        })
}

/// A column as PostgreSQL describes it.
#[derive(Clone, Debug)]
pub(crate) struct PgColumn {
    pub name: String,
    pub typname: String,
    /// `format_type`'s name, for messages.
    pub display: String,
    /// A generated column (`GENERATED ALWAYS AS (..) STORED`): PostgreSQL
    /// computes it and refuses any value written to it.
    pub generated: bool,
}

/// Match a rules table against what PostgreSQL holds.
pub(crate) fn layout(
    table: &Table,
    schema: &str,
    qualified: String,
    columns: &[PgColumn],
    pk: &[String],
    rewrites_rows: bool,
) -> Result<TableLayout, SourceError> {
    let name = &table.name;
    let pk_name = match pk {
        [one] => one.clone(),
        [] => {
            return Err(SourceError::Schema(format!(
                "table {schema}.{name} has no primary key: ferry needs a single-column primary key as the row id"
            )))
        }
        more => {
            return Err(SourceError::Schema(format!(
                "table {schema}.{name} has a primary key of {} columns ({}): ferry needs a single-column \
                 primary key as the row id",
                more.len(),
                more.join(", ")
            )))
        }
    };
    let pk_col = columns
        .iter()
        .find(|c| c.name == pk_name)
        .ok_or_else(|| SourceError::Schema(format!("table {schema}.{name}: primary key column {pk_name} not found")))?;
    let pk_kind = match pk_col.typname.as_str() {
        "text" | "varchar" | "bpchar" | "uuid" => PkKind::Text {
            typname: pk_col.typname.clone(),
        },
        "int2" | "int4" | "int8" => PkKind::Int,
        _ => {
            return Err(SourceError::Schema(format!(
                "table {schema}.{name}: primary key {pk_name} has type {}, which ferry cannot use as a row id \
                 (use text, varchar, uuid or an integer type)",
                pk_col.display
            )))
        }
    };
    let mut cols = Vec::with_capacity(table.columns.len());
    for c in &table.columns {
        if c.name == pk_name {
            return Err(SourceError::Schema(format!(
                "table {schema}.{name}: column {} is the primary key, which is the row id, not a data column",
                c.name
            )));
        }
        let Some(pg) = columns.iter().find(|p| p.name == c.name) else {
            return Err(SourceError::Schema(format!(
                "table {schema}.{name} has no column {} (the sync rules name it)",
                c.name
            )));
        };
        if pg.generated {
            return Err(SourceError::Schema(format!(
                "table {schema}.{name} column {} is a generated column, which ferry cannot write (ferry writes \
                 every column the sync rules name: leave it out of them)",
                c.name
            )));
        }
        let Some(kind) = kind_of(c.ty, &pg.typname) else {
            return Err(SourceError::Schema(format!(
                "table {schema}.{name} column {} has type {}, which ferry cannot sync as {} (use {})",
                c.name,
                pg.display,
                c.ty.name(),
                accepted(c.ty)
            )));
        };
        cols.push(ColLayout {
            name: c.name.clone(),
            quoted: quote_ident(&c.name),
            kind,
            typname: pg.typname.clone(),
        });
    }
    Ok(TableLayout {
        name: name.clone(),
        qualified,
        pk: quote_ident(&pk_name),
        pk_kind,
        cols,
        keeps_rows: !rewrites_rows,
    })
}

/// A quoted identifier.
pub(crate) fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// A quoted string literal.
pub(crate) fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_uuids_only() {
        assert!(is_canonical_uuid("123e4567-e89b-12d3-a456-426614174000"));
        assert!(!is_canonical_uuid("123E4567-E89B-12D3-A456-426614174000"));
        assert!(!is_canonical_uuid("123e4567e89b12d3a456426614174000"));
        assert!(!is_canonical_uuid(""));
    }

    #[test]
    fn unsupported_pairs_are_refused() {
        assert_eq!(kind_of(ColumnType::Integer, "text"), None);
        assert_eq!(kind_of(ColumnType::Text, "inet"), None);
        assert_eq!(kind_of(ColumnType::Blob, "bytea"), Some(Kind::Bytea));
    }
}
