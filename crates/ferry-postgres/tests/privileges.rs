//! Ferry connected as a role without every power: a write the app's
//! row-level security refuses is a refusal of that write (the device gets
//! a rejected outcome), while a privilege Ferry's role lacks stays a
//! database error (the device's write waits until it is granted, not
//! refused and lost).

use std::collections::BTreeMap;

use ferry_core::{ColumnType, RowData, Schema, Table, Value};
use ferry_postgres::scratch::{test_database_url, ScratchSchemas};
use ferry_postgres::PgSourceDb;
use ferry_source::{SourceDb, SourceError, SourceTx};

/// A login role of its own, dropped with what it owns when the test ends
/// (the test's schemas first: the app's triggers use Ferry's capture
/// function, which the role owns).
struct Role {
    name: String,
    schemas: [String; 2],
    admin: ScratchSchemas,
}

impl Drop for Role {
    fn drop(&mut self) {
        let n = &self.name;
        let [a, f] = &self.schemas;
        let sql = format!(
            "DROP SCHEMA IF EXISTS \"{a}\" CASCADE; DROP SCHEMA IF EXISTS \"{f}\" CASCADE; \
             DROP OWNED BY {n}; DROP ROLE {n};"
        );
        if let Err(e) = self.admin.execute(&sql) {
            eprintln!("role {n} not dropped: {e}");
        }
    }
}

fn items() -> Table {
    Table::new("items").column("name", ColumnType::Text)
}

fn write(db: &PgSourceDb, id: &str, name: &str) -> Result<(), SourceError> {
    let row: RowData = [("name".to_owned(), Value::from(name))].into_iter().collect();
    db.write(&mut |tx: &mut dyn SourceTx| {
        tx.write_row(&items(), id, &row, &BTreeMap::new())?;
        Ok(())
    })
}

#[test]
fn a_row_level_security_refusal_refuses_the_write_and_a_missing_grant_does_not() {
    let s = ScratchSchemas::for_test();
    let (a, f) = (s.app.clone(), s.ferry.clone());
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let name = format!("ferry_rls_{}_{stamp:x}", std::process::id());
    s.execute(&format!(
        "CREATE ROLE {name} LOGIN;
         CREATE SCHEMA \"{f}\";
         GRANT ALL ON SCHEMA \"{f}\" TO {name};
         GRANT USAGE ON SCHEMA \"{a}\" TO {name};
         CREATE TABLE \"{a}\".items (id text PRIMARY KEY, name text);
         CREATE TABLE \"{a}\".locked (id text PRIMARY KEY, name text);
         GRANT ALL ON \"{a}\".items TO {name};
         GRANT SELECT, TRIGGER ON \"{a}\".locked TO {name};
         ALTER TABLE \"{a}\".items ENABLE ROW LEVEL SECURITY;
         CREATE POLICY no_forbidden ON \"{a}\".items USING (true) WITH CHECK (name <> 'forbidden');"
    ))
    .expect("role and tables");
    let role = Role {
        name: name.clone(),
        schemas: [a.clone(), f.clone()],
        admin: ScratchSchemas::for_test(),
    };
    let mut url: tokio_postgres::Config = test_database_url().parse().expect("test database url");
    url.user(&name);
    let host = match url.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        _ => panic!("this test needs a TCP host in the test database url"),
    };
    let conninfo = format!(
        "host={host} port={} user={name} dbname={}",
        url.get_ports().first().copied().unwrap_or(5432),
        url.get_dbname().unwrap_or("postgres")
    );
    let options = ferry_postgres::PgOptions::new(conninfo).app_schema(&a).ferry_schema(&f);
    let db = PgSourceDb::connect(&options).expect("connect as the role");
    db.migrate(&Schema::new([items(), Table::new("locked").column("name", ColumnType::Text)]).expect("schema"))
        .expect("migrate");

    write(&db, "1", "fine").expect("a write the policy lets through");
    match write(&db, "2", "forbidden") {
        Err(SourceError::Refused(m)) => assert!(m.contains("row-level security"), "{m}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    // Ferry's role may not write `locked`: not the write's fault.
    let row: RowData = [("name".to_owned(), Value::from("x"))].into_iter().collect();
    let locked = Table::new("locked").column("name", ColumnType::Text);
    let e = db
        .write(&mut |tx: &mut dyn SourceTx| {
            tx.write_row(&locked, "1", &row, &BTreeMap::new())?;
            Ok(())
        })
        .expect_err("no insert privilege");
    assert!(!matches!(e, SourceError::Refused(_)), "{e:?}");
    let count = s
        .query(&format!("SELECT count(*)::text FROM \"{a}\".items"))
        .expect("count");
    assert_eq!(count[0][0].as_deref(), Some("1"), "only the accepted row is written");
    drop(db);
    drop(role);
}
