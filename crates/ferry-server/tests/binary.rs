//! The built binary: `dev-token` prints a token that `serve` accepts.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn http(addr: &str, request: &str) -> anyhow::Result<String> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(request.as_bytes())?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

#[test]
fn dev_token_is_accepted_by_serve() -> anyhow::Result<()> {
    let exe = env!("CARGO_BIN_EXE_ferry-server");
    let dir = tempfile::tempdir()?;
    let out = Command::new(exe)
        .args(["dev-token", "--user", "u1", "--claim", "team=a"])
        .env("FERRY_JWT_SECRET", "bin-secret")
        .output()?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let token = String::from_utf8(out.stdout)?.trim().to_owned();
    assert_eq!(token.split('.').count(), 3, "{token}");

    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let addr = format!("127.0.0.1:{port}");
    let mut child = Command::new(exe)
        .args(["serve", "--listen", &addr, "--data-dir"])
        .arg(dir.path())
        .env("FERRY_JWT_SECRET", "bin-secret")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let result = (|| -> anyhow::Result<()> {
        let start = Instant::now();
        let health = loop {
            match http(&addr, "GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n") {
                Ok(r) => break r,
                Err(_) if start.elapsed() < Duration::from_secs(20) => std::thread::sleep(Duration::from_millis(50)),
                Err(e) => return Err(e),
            }
        };
        assert!(health.starts_with("HTTP/1.1 200"), "{health}");
        let body = r#"{"client_id":"c1","transactions":[]}"#;
        let upload = |tok: &str| {
            http(
                &addr,
                &format!(
                    "POST /sync/upload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {tok}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                ),
            )
        };
        let ok = upload(&token)?;
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        assert!(ok.contains("\"write_checkpoint\":0"), "{ok}");
        let bad = upload("not-a-token")?;
        assert!(bad.starts_with("HTTP/1.1 401"), "{bad}");
        Ok(())
    })();
    child.kill()?;
    child.wait()?;
    result
}
