//! TLS to PostgreSQL, against the machine's PostgreSQL (which offers TLS
//! with its own certificate, as Debian sets it up): `sslmode` and
//! `sslrootcert` as libpq reads them. Every connection Ferry makes (the
//! pool's and the one listening for notifications) is encrypted when the
//! URL asks for it, plain when it says `disable`, and a server whose
//! certificate fails the check asked for is refused with a message saying
//! so.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_core::{ColumnType, Schema, Table};
use ferry_postgres::scratch::{test_database_url, ScratchSchemas};
use ferry_postgres::{PgOptions, PgSourceDb};
use ferry_source::{SourceDb, SourceTx};
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

/// How long a notification may take to arrive.
const NOTIFY_WAIT_MS: u64 = 10_000;

fn schema() -> Schema {
    Schema::new([Table::new("items").column("name", ColumnType::Text)]).expect("schema")
}

/// The test database's place, for connection strings of our own.
struct Place {
    host: String,
    port: u16,
    user: String,
    dbname: String,
    password: Option<String>,
}

fn place() -> Place {
    let url = test_database_url();
    let c: tokio_postgres::Config = url.parse().expect("test database url");
    let host = match c.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        _ => panic!("the TLS tests need a TCP host in {url}"),
    };
    Place {
        host,
        port: c.get_ports().first().copied().unwrap_or(5432),
        user: c.get_user().unwrap_or("postgres").to_owned(),
        dbname: c.get_dbname().unwrap_or("postgres").to_owned(),
        password: c.get_password().map(|p| String::from_utf8_lossy(p).into_owned()),
    }
}

/// A key=value connection string to the test database on `host`, with
/// `extra` parameters.
fn conninfo(p: &Place, host: &str, extra: &str) -> String {
    let password = p
        .password
        .as_deref()
        .map(|pw| format!(" password={pw}"))
        .unwrap_or_default();
    format!(
        "host={host} port={} user={} dbname={}{password} {extra}",
        p.port, p.user, p.dbname
    )
}

/// The server's certificate file (it must offer TLS, and the file must be
/// readable here: the same machine).
fn server_certificate(s: &ScratchSchemas) -> (String, CertificateDer<'static>) {
    let rows = s.query("SHOW ssl; SHOW ssl_cert_file;").expect("show ssl");
    let ssl = rows.first().and_then(|r| r.first().cloned().flatten());
    assert_eq!(
        ssl.as_deref(),
        Some("on"),
        "the TLS tests need PostgreSQL at {} to offer TLS (ssl = on, Debian's default)",
        s.url
    );
    let path = rows
        .get(1)
        .and_then(|r| r.first().cloned().flatten())
        .expect("ssl_cert_file");
    let pem =
        std::fs::read(&path).unwrap_or_else(|e| panic!("the TLS tests read the server's certificate {path}: {e}"));
    let cert = CertificateDer::from_pem_slice(&pem).unwrap_or_else(|e| panic!("{path} is not a PEM certificate: {e}"));
    (path, cert)
}

/// Whether `cert`, trusted as its own root, is valid for `name`.
fn valid_for(cert: &CertificateDer<'static>, name: &str) -> bool {
    let mut roots = rustls::RootCertStore::empty();
    if roots.add(cert.clone()).is_err() {
        return false;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let Ok(verifier) = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider).build()
    else {
        return false;
    };
    let Ok(server_name) = ServerName::try_from(name.to_owned()) else {
        return false;
    };
    verifier
        .verify_server_cert(cert, &[], &server_name, &[], UnixTime::now())
        .is_ok()
}

/// A unique application name, to find this test's connections in
/// `pg_stat_activity`.
fn app_name(what: &str) -> String {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("ferry_tls_{what}_{}_{stamp:x}", std::process::id())
}

fn options(s: &ScratchSchemas, url: String) -> PgOptions {
    PgOptions::new(url)
        .app_schema(&s.app)
        .ferry_schema(&s.ferry)
        .max_connections(4)
}

/// (connections, encrypted ones) of `application_name`.
fn connections(s: &ScratchSchemas, name: &str) -> (u64, u64) {
    let rows = s
        .query(&format!(
            "SELECT count(*), count(*) FILTER (WHERE s.ssl) FROM pg_stat_activity a \
             JOIN pg_stat_ssl s USING (pid) WHERE a.application_name = '{name}'"
        ))
        .expect("pg_stat_ssl");
    let n = |i: usize| -> u64 {
        rows.first()
            .and_then(|r| r.get(i).cloned().flatten())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (n(0), n(1))
}

/// Start Ferry on `url`, write and read a row, and see an app write's
/// notification arrive (over the listening connection).
fn use_database(s: &ScratchSchemas, url: String) -> PgSourceDb {
    let id = app_name("row");
    s.execute(&format!(
        "CREATE TABLE IF NOT EXISTS \"{}\".items (id text PRIMARY KEY, name text)",
        s.app
    ))
    .expect("app table");
    let db = PgSourceDb::connect(&options(s, url)).expect("connect");
    db.migrate(&schema()).expect("migrate");
    let table = schema().table("items").expect("items").clone();
    let mut captures = db.captures();
    captures.mark_unchanged();
    s.execute(&format!("INSERT INTO \"{}\".items VALUES ('{id}', 'x')", s.app))
        .expect("app insert");
    let deadline = Instant::now() + Duration::from_millis(NOTIFY_WAIT_MS);
    while !captures.has_changed().unwrap_or(false) {
        assert!(Instant::now() < deadline, "no capture notification arrived");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut taken = Vec::new();
    db.write(&mut |tx: &mut dyn SourceTx| {
        taken = tx.take_captured(10)?;
        Ok(())
    })
    .expect("take captured");
    assert_eq!(taken.len(), 1, "{taken:?}");
    let row = db.get_row(&table, &id).expect("read").expect("row");
    assert!(row.data.is_some(), "{row:?}");
    db
}

#[test]
fn require_encrypts_every_connection_and_disable_none() {
    let s = ScratchSchemas::for_test();
    server_certificate(&s);
    let p = place();

    let name = app_name("require");
    let db = use_database(
        &s,
        conninfo(&p, &p.host, &format!("sslmode=require application_name={name}")),
    );
    let (all, encrypted) = connections(&s, &name);
    assert!(all >= 2, "the pool's and the listener's connections: {all}");
    assert_eq!(encrypted, all, "sslmode=require: every connection encrypted");
    drop(db);

    // The URL form, percent escapes and all.
    let name = app_name("url");
    let password = p.password.as_deref().map(|pw| format!(":{pw}")).unwrap_or_default();
    let url = format!(
        "postgres://{}{password}@{}:{}/{}?application_name={name}&sslmode=require",
        p.user, p.host, p.port, p.dbname
    );
    let db = use_database(&s, url);
    let (all, encrypted) = connections(&s, &name);
    assert!(all >= 2 && encrypted == all, "{encrypted} of {all} encrypted");
    drop(db);

    let name = app_name("disable");
    let db = use_database(
        &s,
        conninfo(&p, &p.host, &format!("sslmode=disable application_name={name}")),
    );
    let (all, encrypted) = connections(&s, &name);
    assert!(all >= 2, "{all}");
    assert_eq!(encrypted, 0, "sslmode=disable: no connection encrypted");
    drop(db);
}

#[test]
fn verify_ca_and_verify_full_check_the_server_certificate() {
    let s = ScratchSchemas::for_test();
    let (path, cert) = server_certificate(&s);
    let p = place();

    // A root that did not sign the server's certificate (the built-in
    // Mozilla roots) is refused, saying why; nothing is created.
    let url = conninfo(&p, &p.host, "sslmode=verify-ca sslrootcert=system");
    let e = PgSourceDb::connect(&options(&s, url))
        .expect_err("an untrusted certificate is refused")
        .to_string();
    assert!(
        e.contains("certificate") && e.contains(&p.host) && e.matches("unavailable").count() == 1,
        "{e}"
    );
    let ferry_schema = s
        .query(&format!(
            "SELECT count(*) FROM pg_namespace WHERE nspname = '{}'",
            s.ferry
        ))
        .expect("schema");
    assert_eq!(
        ferry_schema[0][0].as_deref(),
        Some("0"),
        "nothing created on a refused connection"
    );

    // The chain is checked, the name is not: the server's own certificate
    // as the root, on an address the certificate does not name.
    let name = app_name("verify_ca");
    let db = use_database(
        &s,
        conninfo(
            &p,
            &p.host,
            &format!("sslmode=verify-ca sslrootcert={path} application_name={name}"),
        ),
    );
    let (all, encrypted) = connections(&s, &name);
    assert!(all >= 2 && encrypted == all, "{encrypted} of {all} encrypted");
    drop(db);

    // verify-full: the name must match too.
    let named = ["localhost".to_owned(), p.host.clone()]
        .into_iter()
        .find(|h| valid_for(&cert, h))
        .unwrap_or_else(|| panic!("the server's certificate {path} names neither localhost nor {}", p.host));
    let name = app_name("verify_full");
    let db = use_database(
        &s,
        conninfo(
            &p,
            &named,
            &format!("sslmode=verify-full sslrootcert={path} application_name={name}"),
        ),
    );
    let (all, encrypted) = connections(&s, &name);
    assert!(all >= 2 && encrypted == all, "{encrypted} of {all} encrypted");
    drop(db);
    // An address the certificate does not name is refused.
    if !valid_for(&cert, "127.0.0.1") {
        let url = conninfo(&p, "127.0.0.1", &format!("sslmode=verify-full sslrootcert={path}"));
        let e = PgSourceDb::connect(&options(&s, url))
            .expect_err("a certificate for another name is refused")
            .to_string();
        assert!(e.contains("certificate"), "{e}");
    }
}

/// A TCP proxy to the test database that answers every TLS request with
/// yes and then bytes that are no TLS (as a server whose key or protocol
/// rustls refuses fails the handshake), and passes every other connection
/// through. Counts both.
struct HandshakeBreaker {
    port: u16,
    broken: Arc<std::sync::atomic::AtomicUsize>,
    passed: Arc<std::sync::atomic::AtomicUsize>,
}

/// The first 8 bytes of a TLS request (length 8, code 80877103).
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

impl HandshakeBreaker {
    fn start(upstream: (String, u16)) -> HandshakeBreaker {
        use std::io::{Read, Write};
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let port = listener.local_addr().expect("proxy addr").port();
        let broken = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let passed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (b, p) = (broken.clone(), passed.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut client) = conn else { continue };
                let (b, p, upstream) = (b.clone(), p.clone(), upstream.clone());
                std::thread::spawn(move || {
                    let mut first = [0u8; 8];
                    if client.read_exact(&mut first).is_err() {
                        return;
                    }
                    if first == SSL_REQUEST {
                        b.fetch_add(1, Ordering::SeqCst);
                        let _ = client.write_all(b"Sthis is not a tls server hello at all\n");
                        return;
                    }
                    p.fetch_add(1, Ordering::SeqCst);
                    let Ok(mut server) = std::net::TcpStream::connect((upstream.0.as_str(), upstream.1)) else {
                        return;
                    };
                    if server.write_all(&first).is_err() {
                        return;
                    }
                    let (Ok(mut client_r), Ok(mut server_w)) = (client.try_clone(), server.try_clone()) else {
                        return;
                    };
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut client_r, &mut server_w);
                        let _ = server_w.shutdown(std::net::Shutdown::Write);
                    });
                    let _ = std::io::copy(&mut server, &mut client);
                    let _ = client.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        HandshakeBreaker { port, broken, passed }
    }
}

/// A server that offers TLS but whose handshake fails: under `prefer`
/// (the default) every connection Ferry makes falls back to one without
/// TLS, as libpq's does; under `require` the failed handshake is the
/// error, naming the host.
#[test]
fn a_failed_handshake_under_prefer_connects_without_tls_and_under_require_is_refused() {
    use std::sync::atomic::Ordering;
    let s = ScratchSchemas::for_test();
    let p = place();
    let proxy = HandshakeBreaker::start((p.host.clone(), p.port));
    let via_proxy = Place {
        host: "127.0.0.1".to_owned(),
        port: proxy.port,
        user: p.user.clone(),
        dbname: p.dbname.clone(),
        password: p.password.clone(),
    };

    let name = app_name("prefer");
    let db = use_database(
        &s,
        conninfo(&via_proxy, "127.0.0.1", &format!("application_name={name}")),
    );
    let (all, encrypted) = connections(&s, &name);
    assert!(all >= 2, "the pool's and the listener's connections: {all}");
    assert_eq!(encrypted, 0, "the fallback connections are plain");
    assert!(
        proxy.broken.load(Ordering::SeqCst) >= 2 && proxy.passed.load(Ordering::SeqCst) >= 2,
        "each connection tried TLS first: {} broken, {} passed",
        proxy.broken.load(Ordering::SeqCst),
        proxy.passed.load(Ordering::SeqCst)
    );
    drop(db);

    let Err(e) = PgSourceDb::connect(&options(&s, conninfo(&via_proxy, "127.0.0.1", "sslmode=require"))) else {
        panic!("sslmode=require refuses a failed handshake");
    };
    let e = e.to_string();
    assert!(e.contains("TLS handshake") && e.contains("127.0.0.1"), "{e}");
}
